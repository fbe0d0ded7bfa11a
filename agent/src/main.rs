//! `arcfed-agent`: the drop-in for ARC's listener container. See `--help` and the README.

use arcfed_agent::config;
use arcfed_agent::http::HttpState;
use arcfed_agent::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

fn main() {
    // One crypto provider for reqwest, tonic and kube (ring).
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Two workers are plenty for one stream, one HTTP request at a time and the admin port.
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("arcfed-agent: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    std::process::exit(rt.block_on(run()));
}

async fn run() -> i32 {
    let cfg = config::load_or_fail_slowly().await;
    init_logging(&cfg.log);
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    let metrics = Arc::new(Metrics::new(cfg.metrics_labels.clone(), &cfg.gha_metrics));
    metrics.set_info(if cfg.standalone() { "" } else { &cfg.cluster }, &cfg.scale_set_name);
    let state = Arc::new(HttpState::new(metrics, Duration::from_secs(30)));
    let (stop_tx, stop_rx) = watch::channel(false);

    let http_task = match cfg.admin_listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin HTTP: /live /ready {}", cfg.metrics_path);
                let mut rx = stop_rx.clone();
                let shutdown = async move {
                    let _ = rx.wait_for(|s| *s).await;
                };
                Some(tokio::spawn(arcfed_proto::ops::serve_admin(l, state.clone(), cfg.metrics_path.clone(), shutdown)))
            }
            Err(e) => config::fail_slowly(&format!("--admin-listen {addr}: cannot bind: {e}")).await,
        },
        None => None,
    };

    let signals = tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("SIGTERM/SIGINT received");
        let _ = stop_tx.send(true);
        // A second signal exits at once.
        wait_for_signal().await;
        std::process::exit(130);
    });

    // Every log line of the loop carries the cluster and the scale set.
    let span = tracing::info_span!("agent", cluster = %cfg.cluster, scale_set = cfg.github.scale_set_id);
    let code = match tracing::Instrument::instrument(arcfed_agent::driver::run(cfg, state.clone(), stop_rx), span).await
    {
        Ok(()) => 0,
        Err(e) => {
            // Only start-up problems reach here (a kube config, an unusable GitHub URL): the
            // loop itself never exits on a remote error.
            state.set_dead(format!("{e:#}"));
            config::fail_slowly(&format!("{e:#}")).await
        }
    };
    signals.abort();
    if let Some(t) = http_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    code
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn init_logging(log: &config::LogSettings) {
    arcfed_proto::ops::init_logging(log.format, &log.filter);
}
