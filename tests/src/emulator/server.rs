//! Serving: the accept loop (plain or TLS), the tick task, and the in-process handle.
//! The caller binds the socket (mini-redis style), so tests bind port 0 and run many
//! emulators in one process.

use super::config::{EmulatorConfig, Layout, Settings, SettingsPatch};
use super::core::{ApiError, Core, GitHubSide};
use super::faults::{Fault, FaultSpec};
use super::http::{BROKER_SERVICE_PREFIX, Ctx, SERVICE_PREFIX, Shared, Side, handle};
use super::model::{RunnerScaleSet, ScaleSetInput, Statistics};
use super::report::{Event, Report};
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Why the emulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the listener's local address: {0}")]
    LocalAddr(#[source] std::io::Error),
    #[error("TLS certificate {path}: {source}")]
    TlsCert {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("TLS key {path}: {source}")]
    TlsKey {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("--advertise-url {0:?} must start with http:// or https://")]
    AdvertiseUrl(String),
    #[error("--advertise-url applies to --layout ghes only; the dotcom layout advertises github.localhost")]
    AdvertiseUrlDotcom,
    #[error("binding the broker listener: {0}")]
    BrokerBind(#[source] std::io::Error),
}

/// The host the dotcom layout plays github.com on (reference §1.1 lists it as a hosted host,
/// so clients map it to `api.github.localhost`).
pub const DOTCOM_HOST: &str = "github.localhost";

/// 0.0.0.0 and :: shown as loopback: where a local client connects.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(v) if v.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], addr.port())),
        std::net::IpAddr::V6(v) if v.is_unspecified() => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
        _ => addr,
    }
}

/// Entry point for in-process use.
pub struct Emulator;

impl Emulator {
    /// Serves on `listener` until [`EmulatorHandle::shutdown`] or the handle is dropped. In
    /// the dotcom layout the broker gets a second listener on the same address, port 0.
    pub async fn start(config: EmulatorConfig, listener: TcpListener) -> Result<EmulatorHandle, Error> {
        let broker = match config.layout {
            Layout::Ghes => None,
            Layout::Dotcom => {
                let ip = listener.local_addr().map_err(Error::LocalAddr)?.ip();
                Some(TcpListener::bind((ip, 0)).await.map_err(Error::BrokerBind)?)
            }
        };
        Self::start_with_broker(config, listener, broker).await
    }

    /// Like [`Emulator::start`], with the broker's listener given (dotcom layout; ignored in
    /// the GHES layout).
    pub async fn start_with_broker(
        config: EmulatorConfig,
        listener: TcpListener,
        broker: Option<TcpListener>,
    ) -> Result<EmulatorHandle, Error> {
        let addr = reachable(listener.local_addr().map_err(Error::LocalAddr)?);
        let tls = match &config.tls {
            Some(files) => Some(acceptor(&files.cert, &files.key)?),
            None => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let broker = match (config.layout, broker) {
            (Layout::Ghes, _) => None,
            (Layout::Dotcom, Some(b)) => Some(b),
            (Layout::Dotcom, None) => Some(TcpListener::bind((addr.ip(), 0)).await.map_err(Error::BrokerBind)?),
        };
        let broker_addr = match &broker {
            Some(b) => Some(reachable(b.local_addr().map_err(Error::LocalAddr)?)),
            None => None,
        };
        let (base_url, api_url, broker_url, service_url) = match broker_addr {
            None => {
                let base_url = match &config.advertise_url {
                    Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
                        u.trim_end_matches('/').to_string()
                    }
                    Some(u) => return Err(Error::AdvertiseUrl(u.clone())),
                    None => format!("{scheme}://{addr}"),
                };
                let service = format!("{base_url}/{}/{}/", SERVICE_PREFIX[0], SERVICE_PREFIX[1]);
                (base_url.clone(), format!("{base_url}/api/v3"), None, service)
            }
            Some(b) => {
                if config.advertise_url.is_some() {
                    return Err(Error::AdvertiseUrlDotcom);
                }
                let broker_url = format!("{scheme}://broker.{DOTCOM_HOST}:{}", b.port());
                let service = format!("{broker_url}/{BROKER_SERVICE_PREFIX}/");
                (
                    format!("{scheme}://{DOTCOM_HOST}:{}", addr.port()),
                    format!("{scheme}://api.{DOTCOM_HOST}:{}", addr.port()),
                    Some(broker_url),
                    service,
                )
            }
        };
        let mut core = Core::new(
            config.settings.clone(),
            config.org.clone(),
            config.pats.clone(),
            service_url.clone(),
            config.max_timeline_events,
        );
        core.set_github(GitHubSide {
            registration_token_path: config.registration_token_path(),
            app: config.app.clone(),
            broker_url: broker_url.clone(),
        });
        let shared = Arc::new(Shared { core: Mutex::new(core), started: Instant::now(), arrivals: AtomicU64::new(0) });
        let (stop_tx, stop_rx) = watch::channel(false);
        let router = |side| Router::new().fallback(handle).with_state(Ctx { sh: shared.clone(), side });
        let mut tasks = JoinSet::new();
        let mut resolve = Vec::new();
        match broker {
            Some(b) => {
                tasks.spawn(accept_loop(listener, tls.clone(), router(Side::Api), stop_rx.clone()));
                tasks.spawn(accept_loop(b, tls, router(Side::Broker), stop_rx.clone()));
                resolve.push((DOTCOM_HOST.to_string(), addr));
                resolve.push((format!("api.{DOTCOM_HOST}"), addr));
                if let Some(ba) = broker_addr {
                    resolve.push((format!("broker.{DOTCOM_HOST}"), ba));
                }
            }
            None => {
                tasks.spawn(accept_loop(listener, tls, router(Side::Both), stop_rx.clone()));
            }
        }
        tasks.spawn(tick_loop(shared.clone(), stop_rx));
        Ok(EmulatorHandle {
            shared,
            base_url,
            api_url,
            broker_url,
            service_url,
            scope: config.scope_path(),
            pats: config.pats,
            resolve,
            stop: stop_tx,
            tasks,
        })
    }
}

fn acceptor(cert: &PathBuf, key: &PathBuf) -> Result<tokio_rustls::TlsAcceptor, Error> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| Error::TlsCert { path: cert.clone(), source })?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|source| Error::TlsKey { path: key.clone(), source })?;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    mut stop: watch::Receiver<bool>,
) {
    // Connections live in this set so that shutdown ends them, long polls included.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "emulator accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                // The client's address reaches the handler as an extension (the timeline records it).
                let svc = TowerToHyperService::new(
                    router.clone().layer(axum::Extension(peer)),
                );
                let tls = tls.clone();
                conns.spawn(async move {
                    let builder = hyper::server::conn::http1::Builder::new();
                    let result = match tls {
                        Some(acc) => match acc.accept(stream).await {
                            Ok(s) => builder.serve_connection(TokioIo::new(s), svc).await,
                            Err(e) => {
                                tracing::debug!(error = %e, "emulator TLS handshake failed");
                                return;
                            }
                        },
                        None => builder.serve_connection(TokioIo::new(stream), svc).await,
                    };
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "emulator connection ended with an error");
                    }
                });
            }
        }
    }
    conns.abort_all();
}

async fn tick_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(Duration::from_millis(50));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = every.tick() => {
                let now = shared.now();
                shared.lock().tick(now);
            }
        }
    }
}

/// A running emulator. Dropping it stops the server.
pub struct EmulatorHandle {
    shared: Arc<Shared>,
    base_url: String,
    api_url: String,
    broker_url: Option<String>,
    service_url: String,
    /// The config URL's path (`org`, `org/repo` or `enterprises/e`).
    scope: String,
    pats: Vec<String>,
    resolve: Vec<(String, SocketAddr)>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl EmulatorHandle {
    /// `scheme://host:port` (dotcom layout: `http://github.localhost:<api port>`).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// What to give an agent as `githubConfigUrl` (`<base>/<org>`, `<base>/<org>/<repo>` or
    /// `<base>/enterprises/<e>`).
    pub fn config_url(&self) -> String {
        format!("{}/{}", self.base_url, self.scope)
    }

    /// The REST API base a client derives from the config URL: `<base>/api/v3` (GHES) or
    /// `http://api.github.localhost:<api port>` (dotcom).
    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// dotcom layout: the broker's `scheme://broker.github.localhost:<port>`.
    pub fn broker_url(&self) -> Option<&str> {
        self.broker_url.as_deref()
    }

    /// dotcom layout: the host names a client must resolve itself (`github.localhost`,
    /// `api.github.localhost`, `broker.github.localhost`) and where they are. Empty for GHES.
    pub fn resolve_overrides(&self) -> &[(String, SocketAddr)] {
        &self.resolve
    }

    /// The Actions service URL that runner-registration returns (ends in `/`).
    pub fn service_url(&self) -> &str {
        &self.service_url
    }

    /// The first accepted PAT.
    pub fn pat(&self) -> &str {
        self.pats.first().map_or("", String::as_str)
    }

    /// Milliseconds on the emulator clock (the report's time base).
    pub fn now_ms(&self) -> u64 {
        self.shared.now()
    }

    pub fn settings(&self) -> Settings {
        self.shared.lock().settings.clone()
    }

    pub fn update_settings(&self, patch: SettingsPatch) -> Settings {
        let now = self.shared.now();
        let mut c = self.shared.lock();
        c.settings.apply(patch);
        c.tick(now);
        c.settings.clone()
    }

    /// Creates a scale set in `runner_group_id` (1 = Default) without the auth chain.
    pub fn create_scale_set(&self, name: &str, runner_group_id: i64) -> Result<RunnerScaleSet, ApiError> {
        let now = self.shared.now();
        let input =
            ScaleSetInput { name: Some(name.into()), runner_group_id: Some(runner_group_id), ..Default::default() };
        self.shared.lock().create_scale_set(input, now)
    }

    /// Adds a runner group, returning its id.
    pub fn add_runner_group(&self, name: &str) -> i64 {
        self.shared.lock().add_runner_group(name)
    }

    /// Queues `count` jobs that run for `duration` once a runner takes them.
    pub fn enqueue_jobs(&self, scale_set_id: i64, count: u32, duration: Duration) -> Result<Vec<String>, ApiError> {
        let now = self.shared.now();
        self.shared.lock().enqueue_jobs(scale_set_id, count, duration, now)
    }

    /// See [`super::core::Core::first_start_after`].
    pub fn first_start_after(&self, scale_set_id: i64, after_ms: u64) -> Option<u64> {
        self.shared.lock().first_start_after(scale_set_id, after_ms)
    }

    /// Starts (or with 0 jobs per minute stops) a scale set's job generator.
    pub fn set_workload(
        &self,
        scale_set_id: i64,
        jobs_per_minute: f64,
        durations_s: (f64, f64),
    ) -> Result<(), ApiError> {
        let w: super::core::Workload = serde_json::from_value(serde_json::json!({
            "scaleSetId": scale_set_id, "jobsPerMinute": jobs_per_minute,
            "minDurationSeconds": durations_s.0, "maxDurationSeconds": durations_s.1,
        }))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
        self.shared.lock().set_workload(w)
    }

    pub fn statistics(&self, scale_set_id: i64) -> Result<Statistics, ApiError> {
        self.shared.lock().statistics(scale_set_id)
    }

    pub fn add_fault(&self, spec: FaultSpec) -> Result<Fault, String> {
        let now = self.shared.now();
        self.shared.lock().faults.add(spec, now)
    }

    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Loses a session server-side (GitHub's broker evicting it).
    pub fn evict_session(&self, session_id: &str) -> Result<(), ApiError> {
        let now = self.shared.now();
        self.shared.lock().evict_session(session_id, now)
    }

    pub fn report(&self) -> Report {
        let now = self.shared.now();
        self.shared.lock().report(now)
    }

    /// See [`super::core::Core::secrets`] (emulator-side names).
    pub fn secrets(&self) -> Vec<String> {
        self.shared.lock().secrets()
    }

    pub fn timeline(&self) -> Vec<Event> {
        self.shared.lock().timeline(0, usize::MAX)
    }

    /// Stops accepting, ends every connection (long polls included) and the tick task.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
