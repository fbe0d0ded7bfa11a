//! mTLS as the coordinator serves it: a real tonic server on 127.0.0.1 with certificates from
//! `certs`, and `require_role` in front of a service. Shows that the right role passes with its
//! identity handed to the handler, and that a wrong role, an unknown CA and a missing client
//! certificate are all refused; plus the error messages of `TlsPaths::load`.
use arcfed_coordinator::certs::{self, IssueRequest};
use arcfed_coordinator::tls::{Identity, Role, TlsError, TlsMaterial, TlsPaths, require_role};
use arcfed_proto::RaftPayload;
use arcfed_proto::raft_service_client::RaftServiceClient;
use arcfed_proto::raft_service_server::{RaftService, RaftServiceServer};
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
}

fn paths_in(dir: &Path) -> TlsPaths {
    TlsPaths { cert: dir.join("tls.crt"), key: dir.join("tls.key"), ca: dir.join("ca.crt") }
}

/// Starts a peer service that admits only coordinators, on an ephemeral port.
async fn serve(tls: &TlsMaterial) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Server::builder()
        .tls_config(tls.server_config())
        .unwrap()
        .add_service(InterceptedService::new(RaftServiceServer::new(WhoAmI), require_role(Role::Coordinator)));
    tokio::spawn(router.serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)));
    addr
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
    let addr = serve(&pki.issue(Role::Coordinator, "1")).await;
    let client = pki.issue(Role::Coordinator, "2");
    assert_eq!(vote(addr, client.client_config("127.0.0.1")).await.unwrap(), "spiffe://arcfed/coordinator/2");
    // DNS SANs work as well as IP SANs.
    assert!(vote(addr, client.client_config("localhost")).await.is_ok());
}

#[tokio::test]
async fn an_agent_certificate_is_denied_peer_rpcs() {
    let pki = Pki::new();
    let addr = serve(&pki.issue(Role::Coordinator, "1")).await;
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
    let addr = serve(&server).await;
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
    let addr = serve(&server).await;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(server.ca_pem())).domain_name("127.0.0.1");
    let e = vote(addr, tls).await.unwrap_err();
    assert_refused_in_handshake(&e);
}

#[tokio::test]
async fn a_server_from_an_unknown_ca_is_refused_by_the_client() {
    let pki = Pki::new();
    let addr = serve(&pki.issue_from("foreign-ca", Role::Coordinator, "1").load().unwrap()).await;
    let client = pki.issue(Role::Coordinator, "2");
    assert!(vote(addr, client.client_config("127.0.0.1")).await.is_err());
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
