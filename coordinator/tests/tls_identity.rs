//! mTLS as the coordinator serves it: a real tonic server on 127.0.0.1 fed by
//! `tls_reload::incoming`, with certificates from `certs`, and `require_role` in front of a
//! service. Shows that the right role passes with its identity handed to the handler, and that
//! a wrong role, an unknown CA, a missing client certificate and a leaf minted by a `CA:TRUE`
//! certificate under our CA are all refused; that renewed files are served without a restart
//! (and another identity's are not); plus the error messages of `TlsPaths::load`.
use arcfed_coordinator::certs::{self, IssueRequest};
use arcfed_coordinator::tls::{Identity, Role, TlsError, TlsMaterial, TlsPaths, require_role};
use arcfed_proto::RaftPayload;
use arcfed_proto::raft_service_client::RaftServiceClient;
use arcfed_proto::raft_service_server::{RaftService, RaftServiceServer};
use arcfed_proto::tls_reload::{self, TlsSource};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Server};
use tonic::{Code, Request, Response, Status};

/// Answers `Vote` with the caller's identity as `require_role` recorded it.
struct WhoAmI;

#[tonic::async_trait]
impl RaftService for WhoAmI {
    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let id = req.extensions().get::<Identity>().ok_or_else(|| Status::internal("no identity"))?;
        Ok(Response::new(RaftPayload { json: id.uri().into_bytes() }))
    }
    async fn append(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        Err(Status::unimplemented("append"))
    }
    async fn snapshot(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        Err(Status::unimplemented("snapshot"))
    }
    async fn pre_vote(
        &self,
        _: Request<arcfed_proto::PreVoteRequest>,
    ) -> Result<Response<arcfed_proto::PreVoteReply>, Status> {
        Err(Status::unimplemented("pre_vote"))
    }
}

struct Pki {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        certs::init_ca(&root.join("ca")).unwrap();
        certs::init_ca(&root.join("foreign-ca")).unwrap();
        Pki { _dir: dir, root }
    }

    fn issue_from(&self, ca: &str, role: Role, name: &str) -> TlsPaths {
        let out = self.root.join(format!("{ca}-{role}-{name}"));
        certs::issue(&IssueRequest {
            ca_dir: self.root.join(ca),
            role,
            name: name.into(),
            dns: vec!["localhost".into()],
            ips: if role == Role::Coordinator { vec!["127.0.0.1".parse().unwrap()] } else { vec![] },
            out: out.clone(),
            days: 1,
        })
        .unwrap();
        paths_in(&out)
    }

    fn issue(&self, role: Role, name: &str) -> TlsMaterial {
        self.issue_from("ca", role, name).load().unwrap()
    }

    /// Issues (or renews) `role/name` into `out`, valid for `days`.
    fn issue_into(&self, out: &Path, role: Role, name: &str, days: u32) -> TlsPaths {
        certs::issue(&IssueRequest {
            ca_dir: self.root.join("ca"),
            role,
            name: name.into(),
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
            out: out.to_owned(),
            days,
        })
        .unwrap();
        paths_in(out)
    }
}

fn paths_in(dir: &Path) -> TlsPaths {
    TlsPaths { cert: dir.join("tls.crt"), key: dir.join("tls.key"), ca: dir.join("ca.crt") }
}

/// Starts a peer service that admits only coordinators, on an ephemeral port, with TLS as
/// the coordinator serves it.
async fn serve(paths: &TlsPaths) -> (SocketAddr, std::sync::Arc<TlsSource>) {
    serve_bounded(paths, tls_reload::MAX_PENDING_HANDSHAKES).await
}

async fn serve_bounded(paths: &TlsPaths, max_pending: usize) -> (SocketAddr, std::sync::Arc<TlsSource>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let source = TlsSource::load(paths.clone()).unwrap();
    let router = Server::builder()
        .add_service(InterceptedService::new(RaftServiceServer::new(WhoAmI), require_role(Role::Coordinator)));
    tokio::spawn(router.serve_with_incoming(tls_reload::incoming_with(listener, source.clone(), max_pending)));
    (addr, source)
}

/// issue 22 item 6: connections that never finish a handshake occupy at most the bound;
/// the next one is closed at once, and service resumes when they go.
#[tokio::test]
async fn half_open_connections_beyond_the_bound_are_shed_and_service_resumes() {
    use tokio::io::AsyncReadExt;
    let pki = Pki::new();
    let (addr, source) = serve_bounded(&pki.issue_from("ca", Role::Coordinator, "1"), 4).await;
    let client = pki.issue(Role::Coordinator, "2");
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // The fifth is accepted and closed without a handshake.
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let closed =
            matches!(tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf)).await, Ok(Ok(0) | Err(_)));
        if closed && source.connections_shed() > 0 {
            break;
        }
        assert!(std::time::Instant::now() < end, "a connection past the bound was not shed");
    }
    drop(idle);
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while vote(addr, client.client_config("127.0.0.1")).await.is_err() {
        assert!(std::time::Instant::now() < end, "no service after the half-open connections went away");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Connects and calls `Vote` once, with a deadline so a stuck handshake fails the test.
async fn vote(addr: SocketAddr, tls: ClientTlsConfig) -> Result<String, Status> {
    let call = async {
        let ch = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .map_err(|e| Status::unavailable(format!("tls config: {e}")))?
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("connect: {e:?}")))?;
        let reply = RaftServiceClient::new(ch).vote(RaftPayload::default()).await?;
        Ok(String::from_utf8_lossy(&reply.into_inner().json).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), call).await.expect("call finished within 10 s")
}

#[tokio::test]
async fn a_coordinator_certificate_passes_with_its_identity() {
    let pki = Pki::new();
    let (addr, _) = serve(&pki.issue_from("ca", Role::Coordinator, "1")).await;
    let client = pki.issue(Role::Coordinator, "2");
    assert_eq!(vote(addr, client.client_config("127.0.0.1")).await.unwrap(), "spiffe://arcfed/coordinator/2");
    // DNS SANs work as well as IP SANs.
    assert!(vote(addr, client.client_config("localhost")).await.is_ok());
}

#[tokio::test]
async fn an_agent_certificate_is_denied_peer_rpcs() {
    let pki = Pki::new();
    let (addr, _) = serve(&pki.issue_from("ca", Role::Coordinator, "1")).await;
    let agent = pki.issue(Role::Agent, "a");
    let e = vote(addr, agent.client_config("127.0.0.1")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("spiffe://arcfed/agent/a"), "{e:?}");
    assert!(e.message().contains("coordinator"), "{e:?}");
}

#[tokio::test]
async fn a_client_certificate_from_an_unknown_ca_is_refused() {
    let pki = Pki::new();
    let server = pki.issue(Role::Coordinator, "1");
    let (addr, _) = serve(&pki.issue_from("ca", Role::Coordinator, "1")).await;
    // Same role and name, but minted by another CA; the client trusts the real server.
    let foreign = pki.issue_from("foreign-ca", Role::Coordinator, "2").load().unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server.ca_pem()))
        .identity(tonic::transport::Identity::from_pem(foreign.cert_pem(), foreign.key_pem()))
        .domain_name("127.0.0.1");
    let e = vote(addr, tls).await.unwrap_err();
    assert_refused_in_handshake(&e);
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let pki = Pki::new();
    let server = pki.issue(Role::Coordinator, "1");
    let (addr, _) = serve(&pki.issue_from("ca", Role::Coordinator, "1")).await;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(server.ca_pem())).domain_name("127.0.0.1");
    let e = vote(addr, tls).await.unwrap_err();
    assert_refused_in_handshake(&e);
}

#[tokio::test]
async fn a_server_from_an_unknown_ca_is_refused_by_the_client() {
    let pki = Pki::new();
    let (addr, _) = serve(&pki.issue_from("foreign-ca", Role::Coordinator, "1")).await;
    let client = pki.issue(Role::Coordinator, "2");
    assert!(vote(addr, client.client_config("127.0.0.1")).await.is_err());
}

/// The leaf certificate the server at `addr` presents to a new connection from `client`.
async fn served_leaf(addr: SocketAddr, client: &TlsMaterial) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(client.ca_pem()) {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_slice_iter(client.cert_pem()).map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_slice(client.key_pem()).unwrap();
    let cfg = rustls::ClientConfig::builder().with_root_certificates(roots).with_client_auth_cert(chain, key).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let connect = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)).connect(name, tcp);
    let tls = tokio::time::timeout(Duration::from_secs(10), connect).await.expect("handshake within 10 s").unwrap();
    tls.get_ref().1.peer_certificates().expect("server certificate")[0].to_vec()
}

fn leaf_der(paths: &TlsPaths) -> Vec<u8> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_file_iter(&paths.cert).unwrap().next().unwrap().unwrap().to_vec()
}

#[tokio::test]
async fn renewed_files_are_served_to_new_connections_without_a_restart() {
    let pki = Pki::new();
    let dir = pki.root.join("voter-1");
    let paths = pki.issue_into(&dir, Role::Coordinator, "1", 1);
    let (addr, source) = serve(&paths).await;
    let client = pki.issue(Role::Coordinator, "2");
    let first = served_leaf(addr, &client).await;
    assert_eq!(first, leaf_der(&paths));
    let before = source.current().not_after_unix();
    assert!(!source.refresh().unwrap(), "unchanged files are not taken again");
    assert_eq!(source.generation(), 1);

    // cert-manager renews: a new key and certificate for the same identity, in place.
    pki.issue_into(&dir, Role::Coordinator, "1", 2);
    assert!(source.refresh().unwrap(), "changed files are taken");
    assert_eq!(source.generation(), 2);
    assert!(source.current().not_after_unix() > before, "the expiry moved");
    let second = served_leaf(addr, &client).await;
    assert_ne!(second, first, "a new connection gets the renewed certificate");
    assert_eq!(second, leaf_der(&paths));
    assert_eq!(vote(addr, client.client_config("127.0.0.1")).await.unwrap(), "spiffe://arcfed/coordinator/2");

    // Another identity's certificate is refused, and the current one stays in service.
    pki.issue_into(&dir, Role::Coordinator, "9", 3);
    let e = source.refresh().unwrap_err().to_string();
    assert!(e.contains("coordinator/9") && e.contains("restart"), "{e}");
    assert_eq!(source.generation(), 2);
    assert_eq!(served_leaf(addr, &client).await, second);

    // So is a half-written file.
    std::fs::write(&paths.cert, b"-----BEGIN CERTIFICATE-----\nAAAA").unwrap();
    assert!(source.refresh().is_err());
    assert_eq!(served_leaf(addr, &client).await, second);
}

/// The attack of the security review: a `CA:TRUE` certificate issued by our CA (its
/// `pathlen:0` says it may not) mints an identity. webpki does not enforce pathlen, so the
/// server must refuse any issuer it was not given.
#[tokio::test]
async fn a_leaf_minted_by_a_ca_true_certificate_under_our_ca_is_refused() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "arcfed CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = Issuer::new(ca_params, &ca_key);

    let leaf = |uri: &str, ip: bool, issuer: &Issuer<'_, &KeyPair>| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".into()]).unwrap();
        p.subject_alt_names.push(SanType::URI(uri.try_into().unwrap()));
        if ip {
            p.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        }
        p.is_ca = IsCa::ExplicitNoCa;
        (p.signed_by(&key, issuer).unwrap(), key)
    };
    let write = |name: &str, chain: &[&rcgen::Certificate], key: &KeyPair| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("tls.crt"), chain.iter().map(|c| c.pem()).collect::<String>()).unwrap();
        std::fs::write(d.join("tls.key"), key.serialize_pem()).unwrap();
        std::fs::write(d.join("ca.crt"), ca_cert.pem()).unwrap();
        paths_in(&d)
    };
    let (server_cert, server_key) = leaf("spiffe://arcfed/coordinator/1", true, &ca);
    let (addr, _) = serve(&write("server", &[&server_cert], &server_key)).await;

    // The rogue intermediate, unconstrained, signed by our CA's key.
    let rogue_key = KeyPair::generate().unwrap();
    let mut rogue_params = CertificateParams::new(vec![]).unwrap();
    rogue_params.distinguished_name.push(rcgen::DnType::CommonName, "rogue");
    rogue_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let rogue_cert = rogue_params.signed_by(&rogue_key, &ca).unwrap();
    let rogue = Issuer::new(rogue_params, &rogue_key);
    let (minted, minted_key) = leaf("spiffe://arcfed/coordinator/2", false, &rogue);
    let minted = write("minted", &[&minted, &rogue_cert], &minted_key).load().unwrap();
    let e = vote(addr, minted.client_config("127.0.0.1")).await.unwrap_err();
    assert_refused_in_handshake(&e);

    // The same identity issued by the CA itself passes: the refusal is about the issuer.
    let (honest, honest_key) = leaf("spiffe://arcfed/coordinator/2", false, &ca);
    let honest = write("honest", &[&honest], &honest_key).load().unwrap();
    assert_eq!(vote(addr, honest.client_config("127.0.0.1")).await.unwrap(), "spiffe://arcfed/coordinator/2");
}

/// An agent cluster holds a cluster issuer (`certs issuer`), not the CA's key: what that
/// issuer signs is accepted for its own agent identity only.
#[tokio::test]
async fn a_cluster_issuer_issues_its_own_agent_identity_and_nothing_else() {
    let pki = Pki::new();
    let (addr, _) = serve(&pki.issue_from("ca", Role::Coordinator, "1")).await;
    let issuer_dir = pki.root.join("issuer-region-a");
    certs::issue_cluster_issuer(&pki.root.join("ca"), "region-a", &issuer_dir, 30).unwrap();
    // What cert-manager's CA issuer in that cluster does with the Secret: sign leaves with the
    // issuer's key; the issued tls.crt is the leaf followed by the issuer.
    let signer = pki.root.join("issuer-as-ca");
    std::fs::create_dir_all(&signer).unwrap();
    let issuer_pem = std::fs::read_to_string(issuer_dir.join("tls.crt")).unwrap();
    let first = issuer_pem.split_inclusive("-----END CERTIFICATE-----\n").next().unwrap().to_owned();
    std::fs::write(signer.join("ca.crt"), &first).unwrap();
    std::fs::copy(issuer_dir.join("tls.key"), signer.join("ca.key")).unwrap();
    let minted = |role: Role, name: &str| {
        let out = pki.root.join(format!("minted-{role}-{name}"));
        certs::issue(&IssueRequest {
            ca_dir: signer.clone(),
            role,
            name: name.into(),
            dns: vec![],
            ips: vec![],
            out: out.clone(),
            days: 1,
        })
        .unwrap();
        let crt = std::fs::read_to_string(out.join("tls.crt")).unwrap();
        std::fs::write(out.join("tls.crt"), crt + &first).unwrap();
        std::fs::copy(issuer_dir.join("ca.crt"), out.join("ca.crt")).unwrap();
        paths_in(&out).load().unwrap()
    };
    // Its own identity passes the handshake (and is then refused by role: this service is
    // for coordinators, which shows the identity reached the interceptor).
    let own = minted(Role::Agent, "region-a");
    let e = vote(addr, own.client_config("127.0.0.1")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("spiffe://arcfed/agent/region-a"), "{e:?}");
    // Another cluster's agent, and a coordinator, are refused in the handshake.
    for (role, name) in [(Role::Agent, "region-b"), (Role::Coordinator, "2"), (Role::Admin, "root")] {
        let e = vote(addr, minted(role, name).client_config("127.0.0.1")).await.unwrap_err();
        assert_refused_in_handshake(&e);
    }
}

/// The server's TLS stack sent a fatal alert, so the request never reached the interceptor.
fn assert_refused_in_handshake(e: &Status) {
    assert!(matches!(e.code(), Code::Unknown | Code::Unavailable), "{e:?}");
    assert!(format!("{e:?}").contains("fatal alert"), "refused in the handshake, not later: {e:?}");
}

fn load_err(paths: &TlsPaths) -> String {
    let e: TlsError = paths.load().unwrap_err();
    e.to_string()
}

#[test]
fn load_errors_name_the_flag_and_the_file() {
    let pki = Pki::new();
    let good = pki.issue_from("ca", Role::Agent, "a");
    let m = good.load().unwrap();
    assert_eq!(m.identity(), &Identity { role: Role::Agent, name: "a".into() });
    let scratch = pki.root.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let write = |name: &str, body: &[u8]| {
        let p = scratch.join(name);
        std::fs::write(&p, body).unwrap();
        p
    };

    let missing = scratch.join("missing.crt");
    let e = load_err(&TlsPaths { cert: missing.clone(), ..good.clone() });
    assert!(e.starts_with(&format!("--tls-cert {}: cannot read:", missing.display())), "{e}");

    let empty = write("empty.crt", b"");
    let e = load_err(&TlsPaths { cert: empty.clone(), ..good.clone() });
    assert_eq!(e, format!("--tls-cert {}: no PEM certificate found", empty.display()));

    let corrupt = write("corrupt.crt", b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n");
    let e = load_err(&TlsPaths { cert: corrupt.clone(), ..good.clone() });
    assert!(e.starts_with(&format!("--tls-cert {}: invalid PEM", corrupt.display())), "{e}");

    let no_key = write("nokey.key", b"hello\n");
    let e = load_err(&TlsPaths { key: no_key.clone(), ..good.clone() });
    assert_eq!(e, format!("--tls-key {}: no PEM private key found", no_key.display()));

    let key = std::fs::read(&good.key).unwrap();
    let two = write("two.key", &[key.as_slice(), key.as_slice()].concat());
    let e = load_err(&TlsPaths { key: two.clone(), ..good.clone() });
    assert!(e.starts_with(&format!("--tls-key {}: 2 private keys", two.display())), "{e}");

    let other = pki.issue_from("ca", Role::Agent, "b");
    let e = load_err(&TlsPaths { key: other.key.clone(), ..good.clone() });
    assert!(e.contains("--tls-key") && e.contains("does not match"), "{e}");

    let no_ca = write("ca.crt", b"");
    let e = load_err(&TlsPaths { ca: no_ca.clone(), ..good.clone() });
    assert_eq!(e, format!("--tls-ca {}: no PEM certificate found", no_ca.display()));

    // A CA certificate is valid PEM but carries no arcfed identity.
    let ca_as_leaf =
        TlsPaths { cert: pki.root.join("ca/ca.crt"), key: pki.root.join("ca/ca.key"), ca: good.ca.clone() };
    let e = load_err(&ca_as_leaf);
    assert!(e.starts_with("--tls-cert ") && e.contains("no spiffe://arcfed/<role>/<name> URI SAN"), "{e}");
}

/// An expired own certificate is named at load (start, reload, every agent attach), by flag
/// and file, instead of surfacing as a peer's handshake alert.
#[test]
fn an_expired_certificate_is_named_at_load() {
    use rcgen::{CertificateParams, KeyPair, SanType};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(vec![]).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, &ca_key);
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec![]).unwrap();
    p.subject_alt_names.push(SanType::URI("spiffe://arcfed/agent/a".try_into().unwrap()));
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = p.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.path().join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("ca.crt"), ca_cert.pem()).unwrap();
    let e = load_err(&paths_in(dir.path()));
    assert!(e.contains("--tls-cert") && e.contains("tls.crt") && e.contains("expired"), "{e}");
}
