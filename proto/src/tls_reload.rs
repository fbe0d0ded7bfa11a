//! Certificates that rotate without a restart, and the server side of mTLS.
//!
//! cert-manager renews a certificate about a month before it expires and rewrites the
//! Secret's files in place (kubelet swaps the projected directory atomically). A process
//! that read its files once would keep serving the old certificate until it expires, and a
//! whole quorum started on the same day would lose every certificate at the same moment.
//! [`TlsSource`] re-reads the three files every few seconds and takes them when they changed
//! and still pass every check of [`TlsPaths::load`] with the same identity; otherwise it keeps
//! what it has, logs why and counts the failure (`reload_errors`).
//!
//! The gRPC server takes its TLS from here ([`incoming`]): every new connection is accepted
//! with the configuration of the files current at that moment, so a renewed certificate is
//! served within one check interval while existing connections carry on.
//!
//! Client certificates are checked against the configured CA certificates as the issuers of
//! the leaf, with one exception: a *cluster issuer*, an intermediate that a configured CA
//! signed, with `pathlen:0`, whose own URI SAN is the one agent identity it may issue
//! (`arcfedctl certs issuer`). An agent cluster holds only such an issuer's key, never the
//! federation CA's, so a compromised cluster can mint its own agent identity and nothing else.
//! Any other intermediate a client sends is refused, so a `CA:TRUE` certificate minted under
//! the CA cannot mint identities (webpki does not enforce `pathlen`; this check does).
use crate::tls::{TlsError, TlsMaterial, TlsPaths};
use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// How often the files are checked by [`TlsSource::watch`] (the issue asks for a renewed
/// certificate to be served within a minute).
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);

/// A handshake that has not finished after this long is dropped: a frozen or hostile client
/// must not hold a task and a socket for ever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS handshakes in progress at once. A connection that arrives while this many are pending
/// is closed at once: a flood of half-open connections costs at most this many sockets and
/// buffers (about 11 KB each), not memory without bound, and finished connections (agents'
/// streams, tens of thousands at scale) are not limited by it.
pub const MAX_PENDING_HANDSHAKES: usize = 1024;

/// TCP keepalive of accepted connections: a peer that vanished without a FIN (a node lost, a
/// NAT entry dropped) is found within about idle + interval × retries = 30 s.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;

struct Current {
    material: Arc<TlsMaterial>,
    /// Built on first use for this material (clients never need it).
    server: Option<Arc<ServerConfig>>,
    generation: u64,
}

/// The TLS files of one process, re-read when they change. See the module docs.
pub struct TlsSource {
    paths: TlsPaths,
    current: RwLock<Current>,
    reload_errors: AtomicU64,
    handshake_failures: AtomicU64,
    connections_shed: AtomicU64,
}

impl std::fmt::Debug for TlsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSource").field("paths", &self.paths).field("generation", &self.generation()).finish()
    }
}

impl TlsSource {
    /// Loads and checks the files once (an error names the flag and the file).
    pub fn load(paths: TlsPaths) -> Result<Arc<TlsSource>, TlsError> {
        let material = Arc::new(paths.load()?);
        Ok(Arc::new(TlsSource {
            paths,
            current: RwLock::new(Current { material, server: None, generation: 1 }),
            reload_errors: AtomicU64::new(0),
            handshake_failures: AtomicU64::new(0),
            connections_shed: AtomicU64::new(0),
        }))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The material in use now.
    pub fn current(&self) -> Arc<TlsMaterial> {
        self.read().material.clone()
    }

    /// Starts at 1 and grows by one for every reload that took new files: a client that
    /// caches connections rebuilds them when it changed.
    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    /// Reloads that found changed files which failed a check (kept the old ones).
    pub fn reload_errors(&self) -> u64 {
        self.reload_errors.load(Ordering::Relaxed)
    }

    /// TLS handshakes refused or abandoned on this process's server side.
    pub fn handshake_failures(&self) -> u64 {
        self.handshake_failures.load(Ordering::Relaxed)
    }

    /// Connections closed unserved because [`MAX_PENDING_HANDSHAKES`] were in progress.
    pub fn connections_shed(&self) -> u64 {
        self.connections_shed.load(Ordering::Relaxed)
    }

    /// Checks the files once. `Ok(true)`: they changed and were taken; `Ok(false)`: unchanged.
    /// An error leaves the current material in place. A certificate for another identity is
    /// refused: a process keeps the identity it started with.
    pub fn refresh(&self) -> Result<bool, TlsError> {
        let now = self.current();
        let same = |path: &std::path::Path, have: &[u8]| std::fs::read(path).is_ok_and(|b| b == have);
        if same(&self.paths.cert, now.cert_pem())
            && same(&self.paths.key, now.key_pem())
            && same(&self.paths.ca, now.ca_pem())
        {
            return Ok(false);
        }
        let fresh = self.paths.load()?;
        if fresh.identity() != now.identity() {
            return Err(TlsError::Pem {
                flag: "--tls-cert",
                path: self.paths.cert.clone(),
                problem: format!(
                    "the new certificate names {} but this process runs as {}: restart it to change its identity",
                    fresh.identity(),
                    now.identity()
                ),
            });
        }
        // Build the server side now, so a CA or key rustls refuses is found here, not at
        // the next connection.
        let server = Arc::new(server_config(&fresh)?);
        let mut cur = self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        cur.material = Arc::new(fresh);
        cur.server = Some(server);
        cur.generation += 1;
        Ok(true)
    }

    /// Checks the files every `every` until the returned task is aborted; logs each reload
    /// (with the new expiry) and each refused one.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                match me.refresh() {
                    Ok(false) => {}
                    Ok(true) => tracing::info!(
                        cert = %me.paths.cert.display(),
                        not_after = me.current().not_after_unix(),
                        generation = me.generation(),
                        "TLS files changed: serving the new certificate"
                    ),
                    Err(e) => {
                        me.reload_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "TLS files changed but were not taken; keeping the current certificate");
                    }
                }
            }
        })
    }

    /// The server configuration of the current material.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        if let Some(s) = self.read().server.clone() {
            return Ok(s);
        }
        let mut cur = self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cur.server.is_none() {
            cur.server = Some(Arc::new(server_config(&cur.material)?));
        }
        Ok(cur.server.clone().expect("just set"))
    }
}

fn tls_problem(flag: &'static str, e: impl std::fmt::Display) -> TlsError {
    TlsError::BadCertificate(format!("{flag}: {e}"))
}

/// The rustls server configuration for `m`: our chain and key, client certificates required
/// and checked by [`DirectIssuerOnly`], HTTP/2 by ALPN (tonic's clients insist on it).
pub fn server_config(m: &TlsMaterial) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(m.ca_pem()) {
        let c = c.map_err(|e| tls_problem("--tls-ca", e))?;
        roots.add(c).map_err(|e| tls_problem("--tls-ca", format!("not usable as a CA: {e}")))?;
    }
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| tls_problem("--tls-ca", e))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(m.cert_pem())
        .collect::<Result<_, _>>()
        .map_err(|e| tls_problem("--tls-cert", e))?;
    let key = PrivateKeyDer::from_pem_slice(m.key_pem()).map_err(|e| tls_problem("--tls-key", e))?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_problem("--tls-cert", e))?
        .with_client_cert_verifier(Arc::new(DirectIssuerOnly(inner)))
        .with_single_cert(chain, key)
        .map_err(|e| tls_problem("--tls-cert", e))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Client certificate verification: a leaf verifies when a configured CA certificate signed
/// it, or when the first intermediate the client sent is a cluster issuer for exactly the
/// leaf's agent identity (see [`cluster_issuer_admits`]) and a configured CA signed that
/// issuer. Every other intermediate is dropped before webpki builds the path. (webpki also
/// refuses a `CA:TRUE` certificate as a leaf.)
#[derive(Debug)]
pub struct DirectIssuerOnly(Arc<dyn ClientCertVerifier>);

/// Whether `issuer` may have issued `leaf`: `issuer` is a CA certificate with `pathlen:0`
/// whose one arcfed URI SAN names an agent, and `leaf` carries that same identity. The
/// signatures are webpki's to check.
pub fn cluster_issuer_admits(issuer: &[u8], leaf: &[u8]) -> Result<(), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(issuer).map_err(|e| format!("intermediate: {e}"))?;
    let bc = cert
        .basic_constraints()
        .map_err(|e| format!("intermediate: {e}"))?
        .map(|b| b.value)
        .ok_or("intermediate without basicConstraints")?;
    if !bc.ca || bc.path_len_constraint != Some(0) {
        return Err("intermediate is not a cluster issuer (CA:TRUE with pathlen:0)".into());
    }
    let may = crate::tls::identity_of_cert(issuer).map_err(|e| format!("intermediate: {e}"))?;
    let is = crate::tls::identity_of_cert(leaf).map_err(|e| format!("leaf: {e}"))?;
    if may.role != crate::tls::Role::Agent {
        return Err(format!("intermediate names {may}: cluster issuers issue agent identities only"));
    }
    if may != is {
        return Err(format!("the issuer for {may} may not issue {is}"));
    }
    Ok(())
}

impl ClientCertVerifier for DirectIssuerOnly {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let direct = self.0.verify_client_cert(end_entity, &[], now);
        let Some(issuer) = intermediates.first().filter(|_| direct.is_err()) else { return direct };
        cluster_issuer_admits(issuer, end_entity).map_err(rustls::Error::General)?;
        self.0.verify_client_cert(end_entity, std::slice::from_ref(issuer), now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The gRPC server's connections: TCP accepted on `listener`, each TLS handshake done in its
/// own task with the configuration current at accept time (bounded by a timeout), and only
/// finished handshakes handed to tonic (`Server::serve_with_incoming*`). The accept loop ends,
/// and the port is released, when the server drops the stream.
pub fn incoming(listener: TcpListener, tls: Arc<TlsSource>) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    incoming_with(listener, tls, MAX_PENDING_HANDSHAKES)
}

/// [`incoming`] with another bound on handshakes in progress (tests use a small one).
pub fn incoming_with(
    listener: TcpListener,
    tls: Arc<TlsSource>,
    max_pending: usize,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let pending = Arc::new(tokio::sync::Semaphore::new(max_pending));
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                // Too many handshakes in progress: close this one now (RST on drop).
                tls.connections_shed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, "too many TLS handshakes in progress: connection closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
            let cfg = match tls.server_config() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "no usable TLS configuration: connection dropped");
                    continue;
                }
            };
            let (tx, tls) = (tx.clone(), tls.clone());
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_rustls::TlsAcceptor::from(cfg).accept(tcp)).await;
                drop(permit);
                match handshake {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        tls.handshake_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%peer, error = %e, "TLS handshake refused");
                    }
                    Err(_) => {
                        tls.handshake_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
