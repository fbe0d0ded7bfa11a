//! `actions-emulator`: GitHub's runner scale-set service, for drills, the sandbox and staging
//! rehearsals. Prints `githubConfigUrl=<url>` as its first stdout line, then serves until
//! SIGINT/SIGTERM. See tests/EMULATOR.md.

use anyhow::Context;
use arcfed_tests::emulator::{
    CrossCredentialDelete, Cursor, Emulator, EmulatorConfig, Mode, SessionTtlFrom, Settings, TlsFiles,
};
use clap::Parser;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 50s or 300ms: {e}"))
}

/// Emulates GitHub's runner scale-set service (GHES API layout) for ARC listeners and arcfed
/// agents. Use the printed githubConfigUrl with `--pat`'s token, or with any GitHub App
/// credentials (any app JWT is accepted).
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

    /// Advertise this scheme://host:port instead of the listener's address (behind a proxy).
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
    let config = EmulatorConfig {
        org: a.org,
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
        },
    };
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", a.listen))?;
    let handle = Emulator::start(config, listener).await.context("starting the emulator")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "githubConfigUrl={}", handle.config_url())?;
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
