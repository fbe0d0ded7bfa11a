//! A private CA and leaf certificates for `arcfedctl certs init|issue`, so that labs and tests
//! need no openssl.
//!
//! ```text
//!  certs init  --out CA_DIR        → CA_DIR/ca.crt, CA_DIR/ca.key (0600)
//!  certs issue --ca CA_DIR ...     → OUT/tls.crt, OUT/tls.key (0600), OUT/ca.crt
//!                                    (cert-manager's layout, so a Secret mounts unchanged)
//! ```
//!
//! A leaf carries the URI SAN `spiffe://arcfed/<role>/<name>` (see [`crate::tls`]) plus any DNS
//! and IP SANs that clients dial. Keys are ECDSA P-256 (rcgen's default), which ring supports.
use crate::tls::{Identity, Role, TlsError};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyIdMethod, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a CA created by `certs init` is valid. Long, because rotating a CA means
/// re-issuing every certificate; leaves are short-lived instead (`--days`).
const CA_DAYS: u64 = 3650;

/// Certificates start this long in the past, so that a freshly issued certificate is already
/// valid on a machine whose clock is a little behind.
const BACKDATE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{}: already exists; refusing to overwrite a CA (every certificate it signed would stop working)", path.display())]
    Exists { path: PathBuf },
    #[error("{}: {action}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{}: not found; create a CA first with `arcfedctl certs init --out {}`", path.display(), dir.display())]
    MissingCa { path: PathBuf, dir: PathBuf },
    #[error("{}: {problem}", path.display())]
    CorruptCa { path: PathBuf, problem: String },
    #[error(transparent)]
    Name(#[from] TlsError),
    #[error("invalid DNS name {name:?}: {reason}")]
    BadDns { name: String, reason: &'static str },
    #[error("--days must be at least 1")]
    BadDays,
    #[error("{}: this CA has pathlen:0 (made before cluster issuers existed) and may sign leaves only; issue the agent certificate centrally with `arcfedctl certs issue --role agent` and copy its three files, or create a new CA", path.display())]
    CaCannotSignIssuers { path: PathBuf },
    #[error("cannot create the certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// What `certs issue` needs.
#[derive(Clone, Debug)]
pub struct IssueRequest {
    /// Directory holding `ca.crt` and `ca.key`.
    pub ca_dir: PathBuf,
    pub role: Role,
    /// Node id (coordinator), cluster (agent) or operator name (admin).
    pub name: String,
    /// DNS SANs; coordinators need every name their clients dial.
    pub dns: Vec<String>,
    /// IP SANs; coordinators dialled by address (e.g. 127.0.0.1) need them.
    pub ips: Vec<IpAddr>,
    /// Directory to write `tls.crt`, `tls.key` and `ca.crt` into (created if missing).
    pub out: PathBuf,
    /// Validity in days.
    pub days: u32,
}

/// Creates a CA in `out` (`ca.crt`, `ca.key`), refusing to replace an existing one.
pub fn init_ca(out: &Path) -> Result<(), CertError> {
    init_ca_with(out, false)
}

/// Like [`init_ca`]; with `force`, an existing CA is replaced.
pub fn init_ca_with(out: &Path, force: bool) -> Result<(), CertError> {
    let (crt, key_path) = (out.join("ca.crt"), out.join("ca.key"));
    if !force {
        for p in [&crt, &key_path] {
            if p.exists() {
                return Err(CertError::Exists { path: p.clone() });
            }
        }
    }
    create_dir(out)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "arcfed");
    params.distinguished_name.push(DnType::CommonName, "arcfed CA");
    // pathlen 1: this CA signs leaves and cluster issuers (`issue_cluster_issuer`, pathlen 0)
    // only; a stolen leaf key can never mint certificates, and the coordinator refuses any
    // other intermediate (arcfed_proto::tls_reload).
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, CA_DAYS, None);
    let cert = params.self_signed(&key)?;
    // The key first: a ca.crt without its key would block a rerun for no benefit.
    write_file(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_file(&crt, cert.pem().as_bytes(), false)?;
    Ok(())
}

/// Issues a leaf certificate signed by the CA in `req.ca_dir`, in cert-manager's layout.
/// Re-issuing into the same directory replaces the files (renewal).
pub fn issue(req: &IssueRequest) -> Result<(), CertError> {
    let identity = Identity::new(req.role, req.name.clone())?;
    if req.days == 0 {
        return Err(CertError::BadDays);
    }
    let mut sans = vec![SanType::URI(identity.uri().try_into()?)];
    for name in &req.dns {
        validate_dns(name)?;
        sans.push(SanType::DnsName(name.as_str().try_into()?));
    }
    sans.extend(req.ips.iter().map(|ip| SanType::IpAddress(*ip)));

    let ca = load_ca(&req.ca_dir)?;
    let issuer = Issuer::new(ca.params, &ca.key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "arcfed");
    params.distinguished_name.push(DnType::CommonName, format!("{}/{}", identity.role, identity.name));
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Coordinators serve (agents, admins, peers) and also dial peers. Agents and admins only
    // dial, so their certificates cannot be presented as a server's.
    params.extended_key_usages = match req.role {
        Role::Coordinator => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        Role::Agent | Role::Admin => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    // A leaf outliving its CA would fail verification after the CA expires anyway; end it
    // with the CA so `openssl x509 -enddate` tells the truth.
    set_validity(&mut params, u64::from(req.days), Some(ca.not_after));
    let cert = params.signed_by(&key, &issuer)?;

    // The issuer name is rebuilt from ca.crt (see `load_ca`); make sure it came out byte-equal,
    // or verifiers would not chain the leaf to the CA.
    let issuer_matches = x509_parser::parse_x509_certificate(cert.der())
        .map(|(_, leaf)| leaf.issuer().as_raw() == ca.subject_raw.as_slice())
        .unwrap_or(false);
    if !issuer_matches {
        return Err(CertError::CorruptCa {
            path: ca.crt_path,
            problem: "its subject name uses attributes this tool cannot reproduce; issue with openssl or cert-manager instead".into(),
        });
    }

    create_dir(&req.out)?;
    write_file(&req.out.join("tls.key"), key.serialize_pem().as_bytes(), true)?;
    write_file(&req.out.join("tls.crt"), cert.pem().as_bytes(), false)?;
    write_file(&req.out.join("ca.crt"), &ca.crt_pem, false)?;
    Ok(())
}

/// Issues a *cluster issuer* for agent cluster `cluster`: an intermediate CA (pathlen 0) signed
/// by the CA in `ca_dir`, whose URI SAN is `spiffe://arcfed/agent/<cluster>`, the one identity
/// the coordinator lets it issue. Written in cert-manager's CA-issuer layout: `tls.crt` (the
/// issuer, then the CA, so cert-manager puts the CA into every issued Secret's `ca.crt`),
/// `tls.key` and `ca.crt`. The agent cluster gets these, never the CA's key.
pub fn issue_cluster_issuer(ca_dir: &Path, cluster: &str, out: &Path, days: u32) -> Result<(), CertError> {
    let identity = Identity::new(Role::Agent, cluster.to_owned())?;
    if days == 0 {
        return Err(CertError::BadDays);
    }
    let ca = load_ca(ca_dir)?;
    if ca.path_len == Some(0) {
        return Err(CertError::CaCannotSignIssuers { path: ca.crt_path });
    }
    let issuer = Issuer::new(ca.params, &ca.key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "arcfed");
    params.distinguished_name.push(DnType::CommonName, format!("arcfed issuer for agent/{cluster}"));
    params.subject_alt_names = vec![SanType::URI(identity.uri().try_into()?)];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, u64::from(days), Some(ca.not_after));
    let cert = params.signed_by(&key, &issuer)?;
    create_dir(out)?;
    write_file(&out.join("tls.key"), key.serialize_pem().as_bytes(), true)?;
    let mut chain = cert.pem().into_bytes();
    chain.extend_from_slice(&ca.crt_pem);
    write_file(&out.join("tls.crt"), &chain, false)?;
    write_file(&out.join("ca.crt"), &ca.crt_pem, false)?;
    Ok(())
}

/// A loaded CA: what rcgen needs to sign (subject, key identifier, key usages, key) plus the
/// raw subject to check the result against.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    subject_raw: Vec<u8>,
    crt_pem: Vec<u8>,
    crt_path: PathBuf,
    /// The CA's notAfter, in seconds since the Unix epoch.
    not_after: i64,
    /// The CA's pathlen constraint (None: unconstrained).
    path_len: Option<u32>,
}

/// Reads `ca.crt` and `ca.key` and rebuilds the issuer from them.
///
/// rcgen can parse a CA certificate itself only with its `x509-parser` feature, which pulls a
/// second x509-parser major version into the build; the few fields an issuer needs are read
/// here with the x509-parser we already use.
fn load_ca(dir: &Path) -> Result<Ca, CertError> {
    let crt_path = dir.join("ca.crt");
    let key_path = dir.join("ca.key");
    let crt_pem = read_ca_file(dir, &crt_path)?;
    let key_pem = read_ca_file(dir, &key_path)?;
    let corrupt = |path: &Path, problem: String| CertError::CorruptCa { path: path.to_owned(), problem };

    let der = CertificateDer::from_pem_slice(&crt_pem)
        .map_err(|e| corrupt(&crt_path, format!("no usable PEM certificate: {e}")))?;
    let key_str = std::str::from_utf8(&key_pem).map_err(|_| corrupt(&key_path, "not a PEM file".into()))?;
    let key = KeyPair::from_pem(key_str).map_err(|e| corrupt(&key_path, format!("not a usable private key: {e}")))?;

    let (_, x509) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| corrupt(&crt_path, format!("not a valid X.509 certificate: {e}")))?;
    if !x509.is_ca() {
        return Err(corrupt(&crt_path, "not a CA certificate (basicConstraints CA:TRUE is missing)".into()));
    }
    if x509.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
        return Err(corrupt(&key_path, format!("does not match the certificate in {}", crt_path.display())));
    }

    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    for attr in x509.subject().iter_attributes() {
        let Some(oid) = attr.attr_type().iter() else {
            return Err(corrupt(&crt_path, "subject has an unreadable attribute type".into()));
        };
        let oid: Vec<u64> = oid.collect();
        let value =
            attr.as_str().map_err(|_| corrupt(&crt_path, "subject has a non-string attribute".into()))?.to_owned();
        // Keep the string type, so the rebuilt name is byte-equal to the CA's subject.
        let value = match attr.attr_value().header.tag() {
            x509_parser::der_parser::asn1_rs::Tag::PrintableString => DnValue::PrintableString(
                value.try_into().map_err(|_| corrupt(&crt_path, "subject has an invalid PrintableString".into()))?,
            ),
            _ => DnValue::Utf8String(value),
        };
        params.distinguished_name.push(DnType::from_oid(&oid), value);
    }
    // The leaf's authority key id must equal the CA's subject key id.
    if let Some(ski) = x509.iter_extensions().find_map(|e| match e.parsed_extension() {
        x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
        _ => None,
    }) {
        params.key_identifier_method = KeyIdMethod::PreSpecified(ski);
    }
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let subject_raw = x509.subject().as_raw().to_vec();
    let not_after = x509.validity().not_after.timestamp();
    if not_after <= unix_now().as_secs().try_into().unwrap_or(i64::MAX) {
        return Err(corrupt(&crt_path, format!("the CA expired at {}", x509.validity().not_after)));
    }
    let path_len = x509.basic_constraints().ok().flatten().and_then(|b| b.value.path_len_constraint);
    Ok(Ca { params, key, subject_raw, crt_pem, crt_path, not_after, path_len })
}

fn read_ca_file(dir: &Path, path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => CertError::MissingCa { path: path.to_owned(), dir: dir.to_owned() },
        _ => CertError::Io { action: "cannot read", path: path.to_owned(), source },
    })
}

/// A light check of DNS SANs; rcgen only requires ASCII, and a typo here would otherwise
/// surface as a handshake failure on some other machine.
fn validate_dns(name: &str) -> Result<(), CertError> {
    let bad = |reason| Err(CertError::BadDns { name: name.to_owned(), reason });
    if name.is_empty() || name.len() > 253 {
        return bad("must be 1 to 253 characters");
    }
    let labels: Vec<&str> = name.split('.').collect();
    for (i, label) in labels.iter().enumerate() {
        let wildcard = i == 0 && *label == "*" && labels.len() > 1;
        if wildcard {
            continue;
        }
        if label.is_empty() || label.len() > 63 {
            return bad("each label must be 1 to 63 characters");
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return bad("labels are letters, digits and inner '-'");
        }
    }
    Ok(())
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Sets not_before/not_after from the wall clock, ending no later than `cap` (Unix seconds).
/// (rcgen takes `time::OffsetDateTime`; we get one from `date_time_ymd` plus a std Duration,
/// which spares a direct dependency on `time`.)
fn set_validity(params: &mut CertificateParams, days: u64, cap: Option<i64>) {
    let now = unix_now();
    let mut end = now.saturating_add(Duration::from_secs(days.saturating_mul(86_400)));
    if let Some(cap) = cap.and_then(|c| u64::try_from(c).ok()) {
        end = end.min(Duration::from_secs(cap));
    }
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(BACKDATE);
    params.not_after = epoch + end;
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        action: "cannot create directory",
        path: dir.to_owned(),
        source,
    })
}

/// Writes through a temporary file and a rename, so a reader (or a crash) never sees half a
/// file; keys are created 0600 from the start rather than narrowed after the fact.
fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), CertError> {
    let io = |action, source| CertError::Io { action, path: path.to_owned(), source };
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut opts = std::fs::OpenOptions::new();
    // O_CREAT|O_EXCL: never write through a file or symlink someone placed at the temporary
    // name (a planted symlink would otherwise receive a private key).
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let _ = std::fs::remove_file(&tmp); // a leftover may carry wider permissions
    let mut f = opts.open(&tmp).map_err(|e| io("cannot write", e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| io("cannot write", e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io("cannot write", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::identity_of_cert;

    fn request(ca: &Path, out: &Path, role: Role, name: &str) -> IssueRequest {
        IssueRequest {
            ca_dir: ca.to_owned(),
            role,
            name: name.into(),
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
            out: out.to_owned(),
            days: 30,
        }
    }

    fn leaf_der(dir: &Path) -> Vec<u8> {
        let pem = std::fs::read(dir.join("tls.crt")).unwrap();
        CertificateDer::from_pem_slice(&pem).unwrap().to_vec()
    }

    #[test]
    fn issued_certificates_carry_their_identity_and_chain_to_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca).unwrap();
        for (role, name) in [(Role::Coordinator, "1"), (Role::Agent, "eu-west"), (Role::Admin, "ops.alice")] {
            let out = dir.path().join(format!("{role}-{name}"));
            issue(&request(&ca, &out, role, name)).unwrap();
            let der = leaf_der(&out);
            assert_eq!(identity_of_cert(&der).unwrap(), Identity { role, name: name.into() });
            assert_eq!(std::fs::read(out.join("ca.crt")).unwrap(), std::fs::read(ca.join("ca.crt")).unwrap());

            // The leaf verifies against the CA's public key.
            let ca_pem = std::fs::read(ca.join("ca.crt")).unwrap();
            let ca_der = CertificateDer::from_pem_slice(&ca_pem).unwrap();
            let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
            let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
            assert_eq!(leaf.issuer().as_raw(), ca_x509.subject().as_raw());
            let eku = leaf.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.client_auth);
            assert_eq!(eku.server_auth, role == Role::Coordinator);
        }
    }

    #[test]
    fn a_leaf_never_outlives_its_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca).unwrap();
        let out = dir.path().join("leaf");
        let mut r = request(&ca, &out, Role::Agent, "a");
        r.days = 100 * 365;
        issue(&r).unwrap();
        let ca_pem = std::fs::read(ca.join("ca.crt")).unwrap();
        let ca_der = CertificateDer::from_pem_slice(&ca_pem).unwrap();
        let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let der = leaf_der(&out);
        let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(leaf.validity().not_after, ca_x509.validity().not_after);
        assert!(leaf.validity().is_valid(), "valid now: {:?}", leaf.validity());
    }

    #[cfg(unix)]
    #[test]
    fn private_keys_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca).unwrap();
        let out = dir.path().join("leaf");
        issue(&request(&ca, &out, Role::Agent, "a")).unwrap();
        for key in [ca.join("ca.key"), out.join("tls.key")] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
    }

    #[test]
    fn init_refuses_to_overwrite_a_ca_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let before = std::fs::read(dir.path().join("ca.crt")).unwrap();
        let e = init_ca(dir.path()).unwrap_err();
        assert!(matches!(e, CertError::Exists { .. }), "{e}");
        assert_eq!(std::fs::read(dir.path().join("ca.crt")).unwrap(), before);
        init_ca_with(dir.path(), true).unwrap();
        assert_ne!(std::fs::read(dir.path().join("ca.crt")).unwrap(), before);
    }

    #[test]
    fn issue_refuses_bad_names_dns_and_days() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let out = dir.path().join("leaf");
        for name in ["", "a/b", "..", "a b", "ä"] {
            let e = issue(&request(dir.path(), &out, Role::Agent, name)).unwrap_err();
            assert!(matches!(e, CertError::Name(_)), "{name:?}: {e}");
        }
        let mut r = request(dir.path(), &out, Role::Coordinator, "1");
        r.dns = vec!["bad_name.example".into()];
        assert!(matches!(issue(&r), Err(CertError::BadDns { .. })));
        let mut r = request(dir.path(), &out, Role::Coordinator, "1");
        r.days = 0;
        assert!(matches!(issue(&r), Err(CertError::BadDays)));
        assert!(!out.exists(), "nothing is written on bad input");
    }

    #[test]
    fn issue_names_a_missing_or_corrupt_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("nope");
        let e = issue(&request(&ca, &dir.path().join("out"), Role::Agent, "a")).unwrap_err();
        assert!(matches!(e, CertError::MissingCa { .. }), "{e}");
        assert!(e.to_string().contains(&ca.join("ca.crt").display().to_string()), "{e}");

        init_ca(&ca).unwrap();
        std::fs::write(ca.join("ca.key"), "-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n").unwrap();
        let e = issue(&request(&ca, &dir.path().join("out"), Role::Agent, "a")).unwrap_err();
        assert!(e.to_string().contains(&ca.join("ca.key").display().to_string()), "{e}");

        // A key from another CA is caught before signing anything.
        let other = dir.path().join("other");
        init_ca(&other).unwrap();
        std::fs::copy(other.join("ca.key"), ca.join("ca.key")).unwrap();
        let e = issue(&request(&ca, &dir.path().join("out"), Role::Agent, "a")).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
    }
}
