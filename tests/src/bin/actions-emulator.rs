//! `actions-emulator`: GitHub's runner scale-set service, for drills, the sandbox and staging
//! rehearsals. Prints `githubConfigUrl=<url>` as its first stdout line (with `--layout dotcom`
//! then `brokerUrl=<url>` and `resolve=<host:port:addr,…>`), then serves until SIGINT/SIGTERM.
//! See tests/EMULATOR.md.

use anyhow::Context;
use arcfed_tests::emulator::{
    AppKey, CrossCredentialDelete, Cursor, Emulator, EmulatorConfig, Layout, Mode, RateLimitStatus, SessionTtlFrom,
    Settings, TlsFiles,
};
use clap::Parser;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 50s or 300ms: {e}"))
}

/// Emulates GitHub's runner scale-set service for ARC listeners and arcfed agents, in GHES's
/// layout or github.com's (--layout). Use the printed githubConfigUrl with `--pat`'s token, or
/// with the GitHub App given by --app-id and --app-key.
#[derive(Debug, Parser)]
#[command(name = "actions-emulator", version)]
struct Args {
    /// Address to listen on; port 0 picks a free port (the printed URL shows the real one).
    #[arg(long, env = "ARCFED_EMULATOR_LISTEN", default_value = "127.0.0.1:0")]
    listen: String,

    /// PEM certificate chain: serve HTTPS (needs --tls-key).
    #[arg(long, env = "ARCFED_EMULATOR_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "ARCFED_EMULATOR_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Organization in the githubConfigUrl (`<base>/<org>`).
    #[arg(long, env = "ARCFED_EMULATOR_ORG", default_value = "arcfed")]
    org: String,

    /// Repository scope: the githubConfigUrl is `<base>/<org>/<repo>` and only
    /// `repos/<org>/<repo>/actions/runners/registration-token` mints registration tokens.
    #[arg(long, env = "ARCFED_EMULATOR_REPO")]
    repo: Option<String>,

    /// Enterprise scope: the githubConfigUrl is `<base>/enterprises/<name>` (wins over --org/--repo).
    #[arg(long, env = "ARCFED_EMULATOR_ENTERPRISE")]
    enterprise: Option<String>,

    /// ghes: one listener, REST under /api/v3, queue URLs carry the scale set and session ids.
    /// dotcom: githubConfigUrl is http://github.localhost:<port>/<org>, REST at the root of
    /// api.github.localhost:<port>, and the Actions service and message queue on a second
    /// listener, broker.github.localhost:<broker port>. Clients must resolve those names
    /// themselves (the printed resolve= line).
    #[arg(long, env = "ARCFED_EMULATOR_LAYOUT", value_enum, default_value = "ghes")]
    layout: Layout,

    /// dotcom layout: address of the broker listener (port 0 picks a free port).
    #[arg(long, env = "ARCFED_EMULATOR_BROKER_LISTEN")]
    broker_listen: Option<String>,

    /// The GitHub App whose JWTs are accepted: the `iss` they carry (App ID or Client ID).
    #[arg(long, env = "ARCFED_EMULATOR_APP_ID", requires = "app_key")]
    app_id: Option<String>,

    /// PEM file with the App's RSA public key (`openssl pkey -in app.pem -pubout`); the App's
    /// private key file also works. App JWTs must be RS256 with iat, exp at most 10 min after
    /// iat, and iss = --app-id; others get 401. Without --app-id every App JWT gets 401.
    #[arg(long, env = "ARCFED_EMULATOR_APP_KEY", requires = "app_id")]
    app_key: Option<PathBuf>,

    /// Personal access token accepted as `Authorization: Bearer <pat>`; other tokens get 401.
    /// Repeat (or comma-separate in the env var) to model several clusters: each PAT is its
    /// own credential identity for --cross-credential-delete.
    #[arg(long, env = "ARCFED_EMULATOR_PAT", default_value = "emulator-pat", value_delimiter = ',')]
    pat: Vec<String>,

    /// dotcom: jobs arrive as JobAssigned (runnerRequestId 0, GUID jobId). ghes: JobAvailable,
    /// and the listener must acquirejobs with its queue token.
    #[arg(long, env = "ARCFED_EMULATOR_MODE", value_enum, default_value = "dotcom")]
    mode: Mode,

    /// Longest a message poll is held before it answers 202 (GitHub: about 50 s).
    #[arg(long, env = "ARCFED_EMULATOR_LONG_POLL", default_value = "50s", value_parser = duration)]
    long_poll: Duration,

    /// An abandoned session (not polled) expires after this; until then every new session on
    /// its scale set gets 409 (GitHub: about 90 s observed).
    #[arg(long, env = "ARCFED_EMULATOR_SESSION_TTL", default_value = "90s", value_parser = duration)]
    session_ttl: Duration,

    /// Lifetime of a session's messageQueueAccessToken; after it polls, acks and acquires get
    /// 401 and the listener must refresh (GitHub: about 50 min observed).
    #[arg(long, env = "ARCFED_EMULATOR_QUEUE_TOKEN_TTL", default_value = "50m", value_parser = duration)]
    queue_token_ttl: Duration,

    /// `exp` of the admin JWT from runner-registration; after it admin calls get 401.
    #[arg(long, env = "ARCFED_EMULATOR_ADMIN_TOKEN_TTL", default_value = "10m", value_parser = duration)]
    admin_token_ttl: Duration,

    /// Whether a deleted session's queue token still works (true: a zombie listener keeps
    /// polling, acking and acquiring after its session was deleted; false: it gets 401).
    #[arg(
        long,
        env = "ARCFED_EMULATOR_QUEUE_TOKEN_SURVIVES_SESSION_DELETE",
        default_value_t = false,
        action = clap::ArgAction::Set,
        value_name = "true|false"
    )]
    queue_token_survives_session_delete: bool,

    /// What the session TTL counts from: last-poll (a poll in flight keeps the session alive)
    /// or creation (the session dies TTL after opening, even while polled).
    #[arg(long, env = "ARCFED_EMULATOR_SESSION_TTL_FROM", value_enum, default_value = "last-poll")]
    session_ttl_from: SessionTtlFrom,

    /// per-session: lastMessageId is the request's own cursor, so a new session polling from
    /// 0 gets every undeleted message again. per-scale-set: the service never delivers an id
    /// at or below the highest it delivered on the set, so messages a predecessor polled but
    /// did not delete are lost to its successor.
    #[arg(long, env = "ARCFED_EMULATOR_CURSOR", value_enum, default_value = "per-session")]
    cursor: Cursor,

    /// allow: any valid admin token may DELETE any session. deny: only an admin token of the
    /// credential (PAT or App installation) that opened the session; others get 403
    /// AccessDeniedException.
    #[arg(long, env = "ARCFED_EMULATOR_CROSS_CREDENTIAL_DELETE", value_enum, default_value = "allow")]
    cross_credential_delete: CrossCredentialDelete,

    /// Registered runners come online, take assigned jobs and finish them after the job's
    /// duration by themselves; false leaves that to POST /_emulator/runners/{name}/...
    #[arg(
        long,
        env = "ARCFED_EMULATOR_AUTO_RUNNERS",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "true|false"
    )]
    auto_runners: bool,

    /// dotcom layout: whether a queue URL keeps working after a session refresh gave a new
    /// one (false: the old URL gets 404).
    #[arg(
        long,
        env = "ARCFED_EMULATOR_QUEUE_URL_SURVIVES_REFRESH",
        default_value_t = false,
        action = clap::ArgAction::Set,
        value_name = "true|false"
    )]
    queue_url_survives_refresh: bool,

    /// Admin and queue calls without an api-version (query parameter, or the Accept header on
    /// queue calls) get 400 VssVersionNotSpecifiedException.
    #[arg(long, env = "ARCFED_EMULATOR_STRICT_API_VERSION")]
    strict_api_version: bool,

    /// An assigned job no runner starts within this is cancelled (JobCompleted, result
    /// canceled) and offered again, up to 3 times. 0s: never.
    #[arg(long, env = "ARCFED_EMULATOR_ASSIGN_TIMEOUT", default_value = "0s", value_parser = duration)]
    assign_timeout: Duration,

    /// Every Nth envelope is preceded by one with an empty body and carries a job message of
    /// an unknown messageType (github.com does both now and then). 0: never.
    #[arg(long, env = "ARCFED_EMULATOR_ODD_MESSAGES_EVERY", default_value_t = 0)]
    odd_messages_every: u32,

    /// Secondary rate limit: REST and admin requests per credential per minute (0: off).
    #[arg(long, env = "ARCFED_EMULATOR_RATE_LIMIT_PER_MINUTE", default_value_t = 0)]
    rate_limit_per_minute: u32,

    /// Status over the secondary rate limit, always with Retry-After (GitHub sends both).
    #[arg(long, env = "ARCFED_EMULATOR_RATE_LIMIT_STATUS", value_enum, default_value = "403")]
    rate_limit_status: RateLimitStatus,

    /// acquirablejobs answers 404, as a service without the legacy endpoint would.
    #[arg(long, env = "ARCFED_EMULATOR_NO_ACQUIRABLE_JOBS")]
    no_acquirable_jobs: bool,

    /// Advertise this scheme://host:port instead of the listener's address (behind a proxy).
    /// GHES layout only.
    #[arg(long, env = "ARCFED_EMULATOR_ADVERTISE_URL")]
    advertise_url: Option<String>,

    /// Keep at most this many requests in the timeline (the report does not depend on it).
    #[arg(long, env = "ARCFED_EMULATOR_MAX_TIMELINE_EVENTS", default_value_t = 200_000)]
    max_timeline_events: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let tls = match (a.tls_cert, a.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        _ => None,
    };
    let app = match (&a.app_id, &a.app_key) {
        (Some(id), Some(key)) => Some(AppKey::from_pem_file(id, key).map_err(|e| anyhow::anyhow!("--app-key {e}"))?),
        _ => None,
    };
    let config = EmulatorConfig {
        org: a.org,
        repo: a.repo,
        enterprise: a.enterprise,
        layout: a.layout,
        app,
        pats: a.pat,
        tls,
        advertise_url: a.advertise_url,
        max_timeline_events: a.max_timeline_events,
        settings: Settings {
            mode: a.mode,
            long_poll: a.long_poll,
            session_ttl: a.session_ttl,
            queue_token_ttl: a.queue_token_ttl,
            admin_token_ttl: a.admin_token_ttl,
            queue_token_survives_session_delete: a.queue_token_survives_session_delete,
            session_ttl_from: a.session_ttl_from,
            cursor: a.cursor,
            cross_credential_delete: a.cross_credential_delete,
            auto_runners: a.auto_runners,
            queue_url_survives_refresh: a.queue_url_survives_refresh,
            strict_api_version: a.strict_api_version,
            assign_timeout: a.assign_timeout,
            odd_messages_every: a.odd_messages_every,
            rate_limit_per_minute: a.rate_limit_per_minute,
            rate_limit_status: a.rate_limit_status,
            acquirable_jobs: !a.no_acquirable_jobs,
        },
    };
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", a.listen))?;
    let broker = match (&a.broker_listen, a.layout) {
        (Some(addr), Layout::Dotcom) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--broker-listen {addr}: cannot bind"))?,
        ),
        (Some(_), Layout::Ghes) => anyhow::bail!("--broker-listen needs --layout dotcom"),
        (None, _) => None,
    };
    let handle = Emulator::start_with_broker(config, listener, broker).await.context("starting the emulator")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "githubConfigUrl={}", handle.config_url())?;
        if let Some(b) = handle.broker_url() {
            writeln!(out, "brokerUrl={b}")?;
            let resolve: Vec<String> = handle
                .resolve_overrides()
                .iter()
                .map(|(host, addr)| format!("{host}:{}:{}", addr.port(), addr.ip()))
                .collect();
            writeln!(out, "resolve={}", resolve.join(","))?;
        }
        out.flush()?;
    }
    tracing::info!(url = %handle.config_url(), service = %handle.service_url(), "actions-emulator serving");
    shutdown_signal().await;
    handle.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
