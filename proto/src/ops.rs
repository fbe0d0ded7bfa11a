//! What every arcfed daemon and `arcfedctl` share on the operations side: the TLS and log
//! flag groups (one definition, one set of `ARCFED_*` env vars, one help text) and the
//! admin HTTP server (`/live`, `/ready`, metrics).
//!
//! ```text
//!  arcfed-coordinator ─┐  TlsArgs · LogArgs (clap, flattened)      init_logging
//!  arcfed-agent ───────┼─▶ serve_admin(listener, Arc<dyn Probe>, metrics path, shutdown)
//!  arcfedctl ──────────┘  TlsArgs
//! ```
//! Each daemon decides *what* live and ready mean (a `Probe`); this module only serves it.

use crate::tls::TlsPaths;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

/// This build's version (the workspace's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit this build came from: `ARCFED_COMMIT` in the build's environment (the image
/// build passes it), else "unknown".
pub const COMMIT: &str = match option_env!("ARCFED_COMMIT") {
    Some(c) => c,
    None => "unknown",
};

/// `--version` of every binary: `<version> (commit <commit>)`.
pub fn version_line() -> &'static str {
    static LINE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LINE.get_or_init(|| format!("{VERSION} (commit {COMMIT})"))
}

/// TLS files in cert-manager's layout (`tls.crt`, `tls.key`, `ca.crt`). All three or none;
/// whether they are required is the binary's call (`require`, `all_or_none`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// PEM certificate chain of this process (cert-manager's tls.crt). Its URI SAN
    /// spiffe://arcfed/<role>/<name> is its identity: coordinator/<node>, agent/<cluster> or
    /// admin/<name>. Required by arcfed-coordinator (re-reads the three files every 10 s and
    /// serves renewed ones without a restart) and arcfedctl's quorum commands; arcfed-agent
    /// needs them only with --coordinator and reads them at every attach.
    #[arg(long, env = "ARCFED_TLS_CERT", value_name = "FILE", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert (cert-manager's tls.key).
    #[arg(long, env = "ARCFED_TLS_KEY", value_name = "FILE", global = true)]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle that signs every arcfed certificate (cert-manager's ca.crt); peers from
    /// any other CA are refused.
    #[arg(long, env = "ARCFED_TLS_CA", value_name = "FILE", global = true)]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The flags that are missing, in flag order.
    pub fn missing(&self) -> Vec<&'static str> {
        [
            ("--tls-cert", self.tls_cert.is_none()),
            ("--tls-key", self.tls_key.is_none()),
            ("--tls-ca", self.tls_ca.is_none()),
        ]
        .into_iter()
        .filter_map(|(f, m)| m.then_some(f))
        .collect()
    }

    /// All three files, or an error naming the missing flags and why they are needed.
    pub fn require(&self, why: &str) -> Result<TlsPaths, String> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Ok(TlsPaths { cert: cert.clone(), key: key.clone(), ca: ca.clone() }),
            _ => Err(format!("{} required {why}", self.missing().join(", "))),
        }
    }

    /// None when no TLS flag is given; all three when all are; else an error naming the rest.
    pub fn all_or_none(&self, why: &str) -> Result<Option<TlsPaths>, String> {
        if self.missing().len() == 3 { Ok(None) } else { self.require(why).map(Some) }
    }
}

/// Log output format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    /// tracing's JSON (`timestamp`, `level`, `fields`, `target`, `span`).
    Json,
    /// JSON with the keys of ARC's listener (zap, production encoder): `severity` (lowercase),
    /// `ts` (Unix seconds), `logger`, `message`, then the span and event fields at the top level,
    /// so log queries and alerts written for ARC's listener keep matching.
    Arc,
}

/// The log flags. Each binary supplies its own defaults (the agent's come from ARC's listener
/// config first), so both are optional here.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct LogArgs {
    /// Log format: text, json (tracing's keys) or arc (JSON with the keys of ARC's listener:
    /// severity, ts, logger, message). Default: text (arcfed-agent: the listener config's
    /// log_format first, where ARC's `json` means arc).
    #[arg(long, env = "ARCFED_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter in tracing's EnvFilter syntax, e.g. `info` or `arcfed_agent=debug,info`.
    /// Default: RUST_LOG when set, else info (arcfed-agent: then the listener config's
    /// log_level, where ARC's `debug` applies to arcfed's crates only).
    #[arg(long, env = "ARCFED_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
}

/// `RUST_LOG`, when set and not empty: the filter used when `--log-level` is not given.
pub fn rust_log() -> Option<String> {
    std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty())
}

/// Installs the global subscriber on stderr (ANSI colours only on a terminal). A filter that
/// does not parse falls back to `info`; binaries check theirs while reading the config.
pub fn init_logging(format: LogFormat, filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
        LogFormat::Arc => b.fmt_fields(tracing_subscriber::fmt::format::JsonFields::new()).event_format(ArcJson).init(),
    }
}

/// [`LogFormat::Arc`]: one JSON object per event with ARC's listener keys.
pub struct ArcJson;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for ArcJson
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let line = arc_json_line(event.metadata().level(), ts, event.metadata().target(), |map| {
            // Span fields (cluster, scale_set, group, token, …), outermost first; JsonFields
            // stored each span's fields as a JSON object.
            if let Some(scope) = ctx.event_scope() {
                for span in scope.from_root() {
                    let ext = span.extensions();
                    if let Some(f) = ext.get::<tracing_subscriber::fmt::FormattedFields<N>>()
                        && let Ok(serde_json::Value::Object(o)) = serde_json::from_str(&f.fields)
                    {
                        map.extend(o);
                    }
                }
            }
            event.record(&mut JsonVisitor(map));
        });
        writeln!(writer, "{line}")
    }
}

/// One ARC-shaped log line: the fixed keys, then whatever `fields` adds.
fn arc_json_line(
    level: &tracing::Level,
    ts: f64,
    logger: &str,
    fields: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    map.insert("severity".into(), level.as_str().to_ascii_lowercase().into());
    map.insert("ts".into(), ts.into());
    map.insert("logger".into(), logger.into());
    fields(&mut map);
    map.entry("message").or_insert_with(|| "".into());
    serde_json::Value::Object(map)
}

/// Event fields into a JSON map (the event's message under `message`, as ARC's listener has it).
struct JsonVisitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
}

/// What a daemon answers on its admin port. `Ok(text)` is a 200 with that body, `Err(why)` a
/// 503 naming the reason.
pub trait Probe: Send + Sync + 'static {
    fn live(&self) -> Result<String, String>;
    fn ready(&self) -> Result<String, String>;
    /// The OpenMetrics text exposition.
    fn metrics(&self) -> Result<String, String>;
}

/// Serves `/live`, `/ready` and `metrics_path` until `shutdown` completes (requests in
/// progress then finish on their own). The caller binds the socket (tests bind port 0).
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    probe: Arc<dyn Probe>,
    metrics_path: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/live", get(live))
        .route("/ready", get(ready))
        .route(&metrics_path, get(metrics))
        .with_state(probe);
    let mut shutdown = std::pin::pin!(shutdown);
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    loop {
        let tcp = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "admin port: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Probes and one Prometheus need a handful: past the bound a connection is closed.
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut b = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            b.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(ADMIN_HEADER_READ_TIMEOUT);
            let conn = b.serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(ADMIN_CONNECTION_MAX_AGE, conn).await;
            drop(slot);
        });
    }
}

/// The admin port's defences against slow or idle clients: a request's headers must arrive
/// within this, a connection lives at most `ADMIN_CONNECTION_MAX_AGE` (Prometheus reconnects),
/// and at most `ADMIN_MAX_CONNECTIONS` are open at once.
pub const ADMIN_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
pub const ADMIN_CONNECTION_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(120);
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

fn answer(r: Result<String, String>) -> Response {
    match r {
        Ok(body) => (StatusCode::OK, body).into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn live(State(p): State<Arc<dyn Probe>>) -> Response {
    answer(p.live())
}

async fn ready(State(p): State<Arc<dyn Probe>>) -> Response {
    answer(p.ready())
}

async fn metrics(State(p): State<Arc<dyn Probe>>) -> Response {
    match p.metrics() {
        Ok(body) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encode: {e}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {

    /// An in-memory log sink for the subscriber under test.
    #[derive(Clone, Default)]
    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn arc_log_format_uses_the_keys_of_arcs_listener() {
        let sink = Sink::default();
        let w = sink.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(ArcJson)
            .finish();
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("agent", cluster = "east", scale_set = 7u64);
            let _e = span.enter();
            tracing::warn!(token = 12u64, session = "s-1", "409 on session create");
        });
        let out = String::from_utf8(sink.0.lock().expect("sink").clone()).expect("utf8");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object per line");
        assert_eq!(v["severity"], "warn", "{out}");
        assert_eq!(v["message"], "409 on session create", "{out}");
        assert!(v["ts"].as_f64().is_some_and(|t| t > 1.7e9), "{out}");
        assert_eq!(v["logger"], module_path!(), "{out}");
        assert_eq!((v["cluster"].as_str(), v["scale_set"].as_u64()), (Some("east"), Some(7)), "{out}");
        assert_eq!((v["token"].as_u64(), v["session"].as_str()), (Some(12), Some("s-1")), "{out}");
        assert!(v.get("level").is_none() && v.get("fields").is_none(), "no tracing keys: {out}");
    }

    use super::*;

    struct Up;
    impl Probe for Up {
        fn live(&self) -> Result<String, String> {
            Ok("ok\n".into())
        }
        fn ready(&self) -> Result<String, String> {
            Ok("ok\n".into())
        }
        fn metrics(&self) -> Result<String, String> {
            Ok(String::new())
        }
    }

    /// issue 22 item 6: a client that never finishes its request headers is disconnected
    /// (slowloris), while a normal request is answered.
    #[tokio::test]
    async fn the_admin_port_drops_a_client_that_never_sends_its_headers() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve_admin(l, Arc::new(Up), "/metrics".into(), std::future::pending()));
        let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
        ok.write_all(b"GET /live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut body = String::new();
        ok.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /live HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(ADMIN_HEADER_READ_TIMEOUT * 3, slow.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "the half-sent request was still open after 3× the header timeout");
    }

    #[test]
    fn tls_flags_are_all_or_none_and_errors_name_the_missing_ones() {
        assert_eq!(TlsArgs::default().all_or_none("with --coordinator"), Ok(None));
        let partial = TlsArgs { tls_cert: Some("c".into()), ..TlsArgs::default() };
        assert_eq!(
            partial.all_or_none("with --coordinator"),
            Err("--tls-key, --tls-ca required with --coordinator".into())
        );
        let all = TlsArgs { tls_cert: Some("c".into()), tls_key: Some("k".into()), tls_ca: Some("a".into()) };
        assert_eq!(all.require("x").map(|p| p.key), Ok(PathBuf::from("k")));
    }
}
