//! `arcfed-coordinator`: one voter of the arcfed quorum. See `--help`.
use arcfed_coordinator::config::Cli;
use arcfed_coordinator::server;
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // One rustls provider for the whole process (ring), before any TLS object exists.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    arcfed_coordinator::config::init_logging(&cli.log);
    let cfg = match cli.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            tracing::error!(error = %format!("{e:#}"), "exiting");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: arcfed_coordinator::config::Config) -> anyhow::Result<()> {
    // Fail early, with the flag's name, on unreadable or corrupt certificates.
    cfg.tls.load()?;
    let grpc =
        tokio::net::TcpListener::bind(cfg.listen).await.map_err(|e| anyhow::anyhow!("--listen {}: {e}", cfg.listen))?;
    let http = tokio::net::TcpListener::bind(cfg.admin_listen)
        .await
        .map_err(|e| anyhow::anyhow!("--admin-listen {}: {e}", cfg.admin_listen))?;
    tracing::info!(
        node = cfg.node_id,
        listen = %cfg.listen,
        admin = %cfg.admin_listen,
        data_dir = %cfg.data_dir.display(),
        lease_ttl_ms = cfg.lease.ttl_ms,
        heartbeat_ms = cfg.heartbeat.as_millis() as u64,
        election_ms = %format!("{}-{}", cfg.election_min.as_millis(), cfg.election_max.as_millis()),
        "starting"
    );
    server::run(cfg, grpc, http, shutdown_signal()).await?;
    Ok(())
}

/// SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt"),
    }
}
