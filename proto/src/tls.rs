//! mTLS material and identities.
//!
//! Every arcfed process carries one certificate whose URI SAN names it:
//!
//! ```text
//!  spiffe://arcfed/coordinator/<node id>   a voter: may call RaftService
//!  spiffe://arcfed/agent/<cluster>         an agent: may call AgentService, only for <cluster>
//!  spiffe://arcfed/admin/<name>            an operator: may call AdminService
//! ```
//!
//! The identity is taken from the verified client certificate and never from a request field
//! (docs/DESIGN.md §6 invariant 6): rustls checks the leaf against `--tls-ca` during the handshake
//! (servers take their configuration from [`crate::tls_reload`], which admits only the configured
//! CA certificates as a leaf's issuer),
//! then [`require_role`] reads the URI SAN, refuses a wrong role, and hands the [`Identity`] to
//! the handler through the request extensions.
//!
//! PEM is parsed with `rustls_pki_types::pem` (rustls-pemfile is unmaintained), and every load
//! error names the flag and the file, because a bad path is the most common operator mistake.
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tonic::transport::{Certificate, ClientTlsConfig};
use tonic::{Request, Status};

/// The trust domain every arcfed identity lives in.
const SPIFFE_PREFIX: &str = "spiffe://arcfed/";

/// Longest name accepted. Names end up in directory names, log fields and metric labels;
/// a bound keeps a hostile certificate from inflating them.
const MAX_NAME_LEN: usize = 128;

/// Errors from identities and TLS files. File errors carry the flag and the path so that the
/// binaries can print them as they are.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {}: cannot read: {source}", path.display())]
    Read { flag: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{flag} {}: {problem}", path.display())]
    Pem { flag: &'static str, path: PathBuf, problem: String },
    #[error("{flag} {}: {source}", path.display())]
    Leaf { flag: &'static str, path: PathBuf, source: Box<TlsError> },
    #[error("invalid arcfed identity {uri:?}: {reason}")]
    BadUri { uri: String, reason: String },
    #[error("unknown role {0:?} (expected coordinator, agent or admin)")]
    UnknownRole(String),
    #[error("invalid name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("certificate is not valid X.509: {0}")]
    BadCertificate(String),
    #[error("certificate has no spiffe://arcfed/<role>/<name> URI SAN")]
    NoIdentity,
    #[error("certificate has {0} spiffe://arcfed/ URI SANs; exactly one is allowed")]
    AmbiguousIdentity(usize),
    #[error("address {addr:?}: {problem}")]
    BadAddress { addr: String, problem: String },
}

/// What a certificate's holder may do. Each role may call exactly one gRPC service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Coordinator,
    Agent,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Coordinator, Role::Agent, Role::Admin];

    /// The path segment used in the URI SAN and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Agent => "agent",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Role, TlsError> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| TlsError::UnknownRole(s.to_owned()))
    }
}

/// Who is on the other end of a verified connection: `spiffe://arcfed/<role>/<name>`.
/// `name` is the node id (coordinator), the cluster (agent) or the operator (admin).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

impl Identity {
    /// Builds an identity, checking the name with the same rule as [`Identity::parse_uri`].
    pub fn new(role: Role, name: impl Into<String>) -> Result<Identity, TlsError> {
        let name = name.into();
        validate_name(&name)?;
        Ok(Identity { role, name })
    }

    /// Parses exactly `spiffe://arcfed/<role>/<name>`: no trailing slash, query, fragment,
    /// port or user info, and a name of `[A-Za-z0-9._-]`. Strict on purpose: anything looser
    /// would let two spellings of one URI name different principals.
    pub fn parse_uri(uri: &str) -> Result<Identity, TlsError> {
        let bad = |reason: &str| TlsError::BadUri { uri: uri.to_owned(), reason: reason.to_owned() };
        let rest = uri.strip_prefix(SPIFFE_PREFIX).ok_or_else(|| bad("must start with spiffe://arcfed/"))?;
        let (role, name) = rest.split_once('/').ok_or_else(|| bad("expected spiffe://arcfed/<role>/<name>"))?;
        let role: Role = role.parse().map_err(|e: TlsError| bad(&e.to_string()))?;
        validate_name(name).map_err(|e| bad(&e.to_string()))?;
        Ok(Identity { role, name: name.to_owned() })
    }

    /// The URI SAN that carries this identity.
    pub fn uri(&self) -> String {
        format!("{SPIFFE_PREFIX}{}/{}", self.role, self.name)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SPIFFE_PREFIX}{}/{}", self.role, self.name)
    }
}

/// The name rule shared by identities and `arcfedctl certs issue`: non-empty, at most
/// [`MAX_NAME_LEN`] characters of `[A-Za-z0-9._-]`, and not `.` or `..` (URI normalisation
/// would collapse those, and they are awkward as directory names).
pub fn validate_name(name: &str) -> Result<(), TlsError> {
    let bad = |reason| Err(TlsError::BadName { name: name.to_owned(), reason });
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 128 characters");
    }
    if name == "." || name == ".." {
        return bad("`.` and `..` are not names");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return bad("only A-Z, a-z, 0-9, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// The arcfed identity of a DER certificate: its one `spiffe://arcfed/...` URI SAN.
/// URI SANs of other trust domains are ignored; two arcfed ones are refused, since it would be
/// ambiguous which principal the holder is.
pub fn identity_of_cert(der: &[u8]) -> Result<Identity, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let san = cert.subject_alternative_name().map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) if u.starts_with(SPIFFE_PREFIX) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(TlsError::NoIdentity),
        [one] => Identity::parse_uri(one),
        many => Err(TlsError::AmbiguousIdentity(many.len())),
    }
}

/// The verified identity of the client that sent `req`. The first peer certificate is the
/// leaf; rustls has already checked the chain against the CA during the handshake.
pub fn peer_identity<T>(req: &Request<T>) -> Result<Identity, Status> {
    let certs = req.peer_certs().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let leaf = certs.first().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    recent_identity(leaf).map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))
}

/// Identities of the leaf certificates seen last. Parsing one costs more than the rest of
/// accepting a stream, and a coordinator sees a handful of certificates (one per cluster)
/// across tens of thousands of streams: after a leader change all of them attach again
/// within seconds. An entry is keyed by the whole DER, so only an identical certificate
/// shares it, and [`identity_of_cert`] reads nothing but the certificate.
static RECENT_IDENTITIES: std::sync::Mutex<Vec<(Vec<u8>, Identity)>> = std::sync::Mutex::new(Vec::new());
const RECENT_IDENTITIES_MAX: usize = 64;

fn recent_identity(der: &[u8]) -> Result<Identity, TlsError> {
    let lock = || RECENT_IDENTITIES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(ident) = lock().iter().find(|(d, _)| d.as_slice() == der).map(|(_, i)| i.clone()) {
        return Ok(ident);
    }
    let ident = identity_of_cert(der)?;
    let mut recent = lock();
    if recent.len() >= RECENT_IDENTITIES_MAX {
        recent.remove(0);
    }
    recent.push((der.to_vec(), ident.clone()));
    Ok(ident)
}

/// A tonic interceptor that admits only clients of one role. See [`require_role`].
#[derive(Clone, Copy, Debug)]
pub struct RequireRole {
    expected: Role,
}

/// Admits only clients whose certificate carries `expected`, and puts their [`Identity`] into
/// the request extensions so handlers never parse certificates themselves. A refusal is logged
/// with the peer's identity and address, since it means a misissued or misused certificate.
pub fn require_role(expected: Role) -> RequireRole {
    RequireRole { expected }
}

impl tonic::service::Interceptor for RequireRole {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        // Formatted only for a refusal: this runs for every stream an agent opens.
        let remote = |req: &Request<()>| req.remote_addr().map(|a| a.to_string()).unwrap_or_else(|| "unknown".into());
        let ident = match peer_identity(&req) {
            Ok(i) => i,
            Err(status) => {
                tracing::warn!(remote = %remote(&req), expected = %self.expected, reason = status.message(), "refused client: no valid identity");
                return Err(status);
            }
        };
        if ident.role != self.expected {
            tracing::warn!(remote = %remote(&req), peer = %ident, expected = %self.expected, "refused client: wrong role");
            return Err(Status::permission_denied(format!(
                "{ident} may not call this service: it requires role {}",
                self.expected
            )));
        }
        req.extensions_mut().insert(ident);
        Ok(req)
    }
}

/// The three TLS files in cert-manager's layout, as given by `--tls-cert`, `--tls-key` and
/// `--tls-ca`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Loaded and checked TLS material. The PEM bytes are kept as read because tonic's
/// `Identity`/`Certificate` take PEM, and so `server_config`/`client_config` can be called for
/// every connection without touching the disk again.
#[derive(Clone)]
pub struct TlsMaterial {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    ca_pem: Vec<u8>,
    identity: Identity,
    /// The leaf's notAfter, seconds since the Unix epoch.
    not_after: i64,
}

/// Redacts the private key.
impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial").field("identity", &self.identity).finish_non_exhaustive()
    }
}

const CERT_FLAG: &str = "--tls-cert";
const KEY_FLAG: &str = "--tls-key";
const CA_FLAG: &str = "--tls-ca";

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { flag, path: path.to_owned(), source })
}

fn pem_problem(flag: &'static str, path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::Pem { flag, path: path.to_owned(), problem: problem.into() }
}

/// Every certificate in `bytes`, or an error naming the file: a malformed PEM section is an
/// error rather than skipped, so a truncated file is not mistaken for a shorter chain.
fn parse_certs(flag: &'static str, path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| pem_problem(flag, path, format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(pem_problem(flag, path, "no PEM certificate found"));
    }
    for (i, c) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(c)
            .map_err(|e| pem_problem(flag, path, format!("certificate #{} is not valid X.509: {e}", i + 1)))?;
    }
    Ok(certs)
}

impl TlsPaths {
    /// cert-manager's layout in `dir`: `tls.crt`, `tls.key` and `ca.crt`.
    pub fn in_dir(dir: impl Into<PathBuf>) -> TlsPaths {
        let d = dir.into();
        TlsPaths { cert: d.join("tls.crt"), key: d.join("tls.key"), ca: d.join("ca.crt") }
    }

    /// A lazily connected mTLS channel to `addr` (`HOST:PORT`) with these files, for
    /// short-lived clients (arcfedctl-like tools, tests). The agent opens its streams in its
    /// coordinator client.
    pub fn channel(&self, addr: &str) -> Result<tonic::transport::Channel, TlsError> {
        let material = self.load()?;
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
        let bad = |e: tonic::transport::Error| TlsError::BadAddress { addr: addr.into(), problem: e.to_string() };
        Ok(tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .map_err(bad)?
            .connect_timeout(std::time::Duration::from_millis(500))
            .tls_config(material.client_config(host))
            .map_err(bad)?
            .connect_lazy())
    }

    /// Reads and checks the three files: at least one certificate in `--tls-cert` whose leaf
    /// carries an arcfed identity, exactly one private key in `--tls-key` that matches that
    /// leaf, and at least one CA certificate in `--tls-ca`. Checking here turns a handshake
    /// failure at run time into a clear error at start.
    pub fn load(&self) -> Result<TlsMaterial, TlsError> {
        let cert_pem = read(CERT_FLAG, &self.cert)?;
        let key_pem = read(KEY_FLAG, &self.key)?;
        let ca_pem = read(CA_FLAG, &self.ca)?;

        let certs = parse_certs(CERT_FLAG, &self.cert, &cert_pem)?;
        let leaf = &certs[0];
        let identity = identity_of_cert(leaf).map_err(|e| TlsError::Leaf {
            flag: CERT_FLAG,
            path: self.cert.clone(),
            source: Box::new(e),
        })?;

        let keys = PrivateKeyDer::pem_slice_iter(&key_pem)
            .collect::<Result<Vec<_>, pem::Error>>()
            .map_err(|e| pem_problem(KEY_FLAG, &self.key, format!("invalid PEM: {e}")))?;
        let key = match <[_; 1]>::try_from(keys) {
            Ok([key]) => key,
            Err(keys) if keys.is_empty() => return Err(pem_problem(KEY_FLAG, &self.key, "no PEM private key found")),
            Err(keys) => {
                return Err(pem_problem(
                    KEY_FLAG,
                    &self.key,
                    format!("{} private keys found; exactly one is allowed", keys.len()),
                ));
            }
        };
        check_key_matches(&self.key, &key, leaf, &self.cert)?;

        parse_certs(CA_FLAG, &self.ca, &ca_pem)?;
        let not_after = x509_parser::parse_x509_certificate(leaf)
            .map(|(_, c)| c.validity().not_after.timestamp())
            .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
        // An expired certificate fails every handshake with an alert the peer logs, not us:
        // say so here, by file, where the operator looks.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        if not_after < now {
            return Err(pem_problem(
                CERT_FLAG,
                &self.cert,
                format!("the certificate expired {} s ago (notAfter {not_after}); renew it", now - not_after),
            ));
        }
        Ok(TlsMaterial { cert_pem, key_pem, ca_pem, identity, not_after })
    }
}

/// Refuses a key that does not belong to the leaf certificate (a common mix-up when several
/// certificate directories sit side by side), which rustls would only report at handshake.
fn check_key_matches(
    key_path: &Path,
    key: &PrivateKeyDer<'_>,
    leaf: &CertificateDer<'_>,
    cert_path: &Path,
) -> Result<(), TlsError> {
    let signer = rustls::crypto::ring::sign::any_supported_type(key)
        .map_err(|e| pem_problem(KEY_FLAG, key_path, format!("unusable private key: {e}")))?;
    let Some(spki) = signer.public_key() else {
        return Ok(()); // the provider cannot tell; rustls will check at handshake
    };
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    if cert.public_key().raw != spki.as_ref() {
        return Err(pem_problem(
            KEY_FLAG,
            key_path,
            format!("private key does not match the certificate in --tls-cert {}", cert_path.display()),
        ));
    }
    Ok(())
}

impl TlsMaterial {
    /// This process's own identity (from its leaf certificate).
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Client side: trust only our CA, present our certificate, and verify the server against
    /// `server_host` — a DNS name or an IP address (brackets of `[::1]` are stripped), which
    /// must appear among the server certificate's DNS or IP SANs.
    pub fn client_config(&self, server_host: &str) -> ClientTlsConfig {
        let host = server_host.trim_start_matches('[').trim_end_matches(']');
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(host)
    }

    /// When the leaf certificate expires, in seconds since the Unix epoch
    /// (`arcfed_tls_cert_not_after_seconds`).
    pub fn not_after_unix(&self) -> i64 {
        self.not_after
    }

    /// The certificate chain as read from `--tls-cert`.
    pub fn cert_pem(&self) -> &[u8] {
        &self.cert_pem
    }

    /// The private key as read from `--tls-key`.
    pub fn key_pem(&self) -> &[u8] {
        &self.key_pem
    }

    /// The CA bundle as read from `--tls-ca`.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_uri_accepts_exactly_the_three_roles() {
        for (uri, role, name) in [
            ("spiffe://arcfed/coordinator/1", Role::Coordinator, "1"),
            ("spiffe://arcfed/agent/eu-west_1.a", Role::Agent, "eu-west_1.a"),
            ("spiffe://arcfed/admin/Alice", Role::Admin, "Alice"),
        ] {
            let id = Identity::parse_uri(uri).unwrap_or_else(|e| panic!("{uri}: {e}"));
            assert_eq!(id, Identity { role, name: name.into() });
            assert_eq!(id.uri(), uri);
            assert_eq!(id.to_string(), uri);
        }
    }

    #[test]
    fn parse_uri_rejects_everything_else() {
        let long = format!("spiffe://arcfed/agent/{}", "a".repeat(129));
        for uri in [
            "",
            "spiffe://arcfed/",
            "spiffe://arcfed/agent",
            "spiffe://arcfed/agent/",
            "spiffe://arcfed/agent/a/",
            "spiffe://arcfed/agent/a/b",
            "spiffe://arcfed/agent/a?x=1",
            "spiffe://arcfed/agent/a#f",
            "spiffe://arcfed/agent/a b",
            "spiffe://arcfed/agent/é",
            "spiffe://arcfed/agent/..",
            "spiffe://arcfed/agent/.",
            "spiffe://arcfed/Agent/a",
            "spiffe://arcfed/operator/a",
            "spiffe://arcfed//a",
            "spiffe://ARCFED/agent/a",
            "spiffe://arcfed:443/agent/a",
            "spiffe://other/agent/a",
            "https://arcfed/agent/a",
            "spiffe://arcfed/agent/a%2Fb",
            long.as_str(),
        ] {
            assert!(Identity::parse_uri(uri).is_err(), "{uri:?} was accepted");
        }
    }

    #[test]
    fn role_round_trips_through_strings() {
        for r in Role::ALL {
            assert_eq!(r.to_string().parse::<Role>().unwrap(), r);
        }
        assert!("root".parse::<Role>().unwrap_err().to_string().contains("root"));
    }

    fn cert_with_sans(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> rcgen::SanType {
        rcgen::SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn identity_of_cert_finds_the_one_arcfed_uri() {
        let der = cert_with_sans(vec![
            rcgen::SanType::DnsName("localhost".try_into().unwrap()),
            uri("spiffe://other/agent/x"),
            uri("spiffe://arcfed/agent/b"),
        ]);
        assert_eq!(identity_of_cert(&der).unwrap(), Identity { role: Role::Agent, name: "b".into() });
    }

    #[test]
    fn identity_of_cert_refuses_none_two_or_malformed() {
        let none = cert_with_sans(vec![rcgen::SanType::DnsName("localhost".try_into().unwrap())]);
        assert!(matches!(identity_of_cert(&none), Err(TlsError::NoIdentity)));
        let two = cert_with_sans(vec![uri("spiffe://arcfed/agent/a"), uri("spiffe://arcfed/agent/b")]);
        assert!(matches!(identity_of_cert(&two), Err(TlsError::AmbiguousIdentity(2))));
        let bad = cert_with_sans(vec![uri("spiffe://arcfed/agent/a/b")]);
        assert!(matches!(identity_of_cert(&bad), Err(TlsError::BadUri { .. })));
        assert!(matches!(identity_of_cert(b"not a certificate"), Err(TlsError::BadCertificate(_))));
    }

    #[test]
    fn remembered_identities_belong_to_identical_certificates_only() {
        let a = cert_with_sans(vec![uri("spiffe://arcfed/agent/a")]);
        let b = cert_with_sans(vec![uri("spiffe://arcfed/agent/b")]);
        for _ in 0..2 {
            assert_eq!(recent_identity(&a).unwrap().name, "a");
            assert_eq!(recent_identity(&b).unwrap().name, "b");
        }
        // A refused certificate is not remembered, and stays refused.
        let none = cert_with_sans(vec![rcgen::SanType::DnsName("localhost".try_into().unwrap())]);
        for _ in 0..2 {
            assert!(matches!(recent_identity(&none), Err(TlsError::NoIdentity)));
        }
        // Past the bound the oldest entry goes; every answer is still the certificate's own.
        let many: Vec<_> = (0..RECENT_IDENTITIES_MAX + 3)
            .map(|i| cert_with_sans(vec![uri(&format!("spiffe://arcfed/agent/c{i}"))]))
            .collect();
        for (i, der) in many.iter().enumerate().chain(many.iter().enumerate()) {
            assert_eq!(recent_identity(der).unwrap().name, format!("c{i}"));
        }
        assert!(RECENT_IDENTITIES.lock().unwrap().len() <= RECENT_IDENTITIES_MAX);
        assert_eq!(recent_identity(&a).unwrap().name, "a");
    }
}
