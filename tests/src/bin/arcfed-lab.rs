//! arcfed-lab: real Kubernetes API servers and real ARC, built from their Go modules, beside
//! arcfed's own binaries (docs/lab.md). Build the peers once with `tests/peers/build.sh`.
use anyhow::{Context, bail};
use arcfed_tests::lab::cluster::Cluster;
use arcfed_tests::lab::install::install_check;
use arcfed_tests::lab::peers::Peers;
use arcfed_tests::lab::seed::{Listener, SeedOptions, seed_compare};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// arcfed-lab: real kube-apiservers and real ARC next to arcfed.
#[derive(Parser, Debug)]
#[command(name = "arcfed-lab", version)]
struct Args {
    /// Working directory for the clusters' PKI, etcd data and logs (default: a new temp dir, kept).
    #[arg(long, global = true, env = "ARCFED_LAB_DIR")]
    dir: Option<PathBuf>,
    /// Where tests/peers/build.sh put the peers (default: $XDG_CACHE_HOME/arcfed/peers or
    /// ~/.cache/arcfed/peers).
    #[arg(long, global = true, env = "ARCFED_PEERS_DIR")]
    peers: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Apply deploy/ to a real API server as deploy/README.md says, from an empty cluster: the
    /// documented steps verbatim, every object's namespace, a server-side dry run of every
    /// kustomization, the admission policy evaluated by the API server, ARC's chart with our
    /// values. Exits 1 when anything fails.
    InstallCheck {
        /// Print the report as one JSON object instead of a table.
        #[arg(long, env = "ARCFED_LAB_JSON")]
        json: bool,
    },
    /// The seed problem measured with ARC's own listener: the same clusters, same-named scale
    /// set and workload, once with ARC's listener and once with arcfed's listenerTemplate;
    /// listener restarts, 409s, jobs, time to the first job, and SIGKILL of the session
    /// holder's listener → time until jobs run again. One JSON object with keys `arc_listener`
    /// and `arcfed_agent` (--json), or a table.
    SeedCompare {
        /// Kills (and recoveries measured) per row.
        #[arg(long, env = "ARCFED_LAB_RUNS", default_value_t = 5)]
        runs: usize,
        /// Clusters, each with the same-named scale set (2 or 3).
        #[arg(long, env = "ARCFED_LAB_CLUSTERS", default_value_t = 2)]
        clusters: usize,
        /// How long the emulated GitHub keeps a session nobody polls (GitHub's is about 90 s).
        #[arg(long, env = "ARCFED_LAB_SESSION_TTL", default_value = "90s", value_parser = humantime::parse_duration)]
        session_ttl: std::time::Duration,
        /// Steady workload before each kill.
        #[arg(long, env = "ARCFED_LAB_WARMUP", default_value = "15s", value_parser = humantime::parse_duration)]
        warmup: std::time::Duration,
        /// Measure one row only (the other is null in the JSON).
        #[arg(long, env = "ARCFED_LAB_ONLY", value_enum)]
        only: Option<Listener>,
        /// Print the report as one JSON object.
        #[arg(long, env = "ARCFED_LAB_JSON")]
        json: bool,
    },
    /// The runner image's program in lab pods: reads ARC's JIT config
    /// ($ACTIONS_RUNNER_INPUT_JITCONFIG), comes online at the emulator ($ARCFED_LAB_EMULATOR),
    /// runs one job there and exits 0, as an ephemeral runner does.
    #[command(hide = true)]
    Runner,
    /// Start clusters and keep them running until Ctrl-C; prints each one's kubeconfig.
    Up {
        /// How many clusters.
        #[arg(long, env = "ARCFED_LAB_CLUSTERS", default_value_t = 1)]
        clusters: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let code = rt.block_on(lab_main());
    // The runtime's shutdown drops the kubelet tasks, and with the last of them the lab
    // network (its bridge and pod namespaces), before the process exits.
    rt.shutdown_timeout(std::time::Duration::from_secs(10));
    match code {
        Ok(0) => Ok(()),
        Ok(code) => std::process::exit(code),
        Err(e) => Err(e),
    }
}

async fn lab_main() -> anyhow::Result<i32> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Cmd::Runner = args.cmd {
        return arcfed_tests::lab::runner::run().await.map(|()| 0);
    }
    let peers = match &args.peers {
        Some(d) => Peers::at(d),
        None => Peers::locate(),
    }
    .map_err(|e| anyhow::anyhow!(e))?;
    let dir = match args.dir {
        Some(d) => d,
        None => tempfile::Builder::new().prefix("arcfed-lab-").tempdir()?.keep(),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    eprintln!("arcfed-lab: working in {}", dir.display());
    // On SIGINT/SIGTERM the command's future is dropped, and with it every cluster, pod and
    // the lab network (their Drop stops and removes them).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let code = tokio::select! {
        r = run(args.cmd, &peers, &dir) => r?,
        _ = tokio::signal::ctrl_c() => { eprintln!("arcfed-lab: interrupted; stopping"); 130 }
        _ = term.recv() => { eprintln!("arcfed-lab: terminated; stopping"); 143 }
    };
    Ok(code)
}

/// Runs one subcommand; its exit code.
async fn run(cmd: Cmd, peers: &Peers, dir: &std::path::Path) -> anyhow::Result<i32> {
    let (peers, dir) = (peers.clone(), dir.to_path_buf());
    match cmd {
        Cmd::InstallCheck { json } => {
            let c = Cluster::start(&peers, &dir, "install", std::net::Ipv4Addr::LOCALHOST).await?;
            let report = install_check(&peers, &c, &dir.join("work")).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("kube-apiserver {}", report.kube_apiserver);
                for s in &report.steps {
                    let mark = if s.ok { "ok  " } else { "FAIL" };
                    let doc = if s.in_readme { "" } else { " (not in deploy/README.md as written)" };
                    println!("{mark} step: {}{doc}", s.command);
                    if !s.ok {
                        println!("       {}", s.detail.replace('\n', "\n       "));
                    }
                }
                println!(
                    "placement: {} kustomizations, {} namespaced objects, {} misplaced",
                    report.kustomizations,
                    report.namespaced_objects,
                    report.misplaced.len()
                );
                for m in &report.misplaced {
                    println!(
                        "FAIL {} {} {}: namespace {:?}, docs say {:?}",
                        m.kustomization, m.kind, m.name, m.namespace, m.expected
                    );
                }
                for d in report.dry_runs.iter().filter(|d| !d.ok) {
                    println!("FAIL dry run {}: {}", d.kustomization, d.detail);
                }
                for a in &report.admission {
                    let mark = if a.ok { "ok  " } else { "FAIL" };
                    println!("{mark} admission: {} (expect {}, got {})", a.case, a.expect, a.got);
                }
                for a in &report.arc_chart {
                    let mark = if a.ok { "ok  " } else { "FAIL" };
                    println!("{mark} ARC {} chart with deploy/arc/values: {}", a.arc_version, a.detail);
                }
                println!("install-check: {}", if report.passed { "PASSED" } else { "FAILED" });
            }
            if !report.passed {
                return Ok(1);
            }
        }
        Cmd::Runner => unreachable!("handled above"),
        Cmd::SeedCompare { runs, clusters, session_ttl, warmup, only, json } => {
            if !(2..=3).contains(&clusters) {
                bail!("--clusters must be 2 or 3");
            }
            let opts = SeedOptions { runs, clusters, session_ttl, warmup, ..SeedOptions::default() };
            let report = seed_compare(&peers, &dir, &opts, only).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "ARC {} on kube-apiserver {}, {clusters} clusters, {runs} kills per row",
                    report.arc_version, report.kube_apiserver
                );
                println!(
                    "{:<13} {:>8} {:>8} {:>6} {:>9} {:>9} {:>10} {:>12} {:>12}",
                    "listener",
                    "starts",
                    "restarts",
                    "409s",
                    "enqueued",
                    "completed",
                    "unfinished",
                    "kill→jobs p50",
                    "p99"
                );
                for r in [&report.arc_listener, &report.arcfed_agent].into_iter().flatten() {
                    let ms = |v: Option<u64>| v.map_or("never".to_string(), |v| format!("{:.1} s", v as f64 / 1000.0));
                    println!(
                        "{:<13} {:>8} {:>8} {:>6} {:>9} {:>9} {:>10} {:>12} {:>12}",
                        format!("{:?}", r.listener),
                        r.listener_starts,
                        r.listener_restarts,
                        r.conflicts_409,
                        r.jobs_enqueued,
                        r.jobs_completed,
                        r.jobs_unfinished,
                        ms(r.kill_to_jobs_p50_ms),
                        ms(r.kill_to_jobs_p99_ms)
                    );
                }
            }
        }
        Cmd::Up { clusters } => {
            if clusters == 0 {
                bail!("--clusters must be at least 1");
            }
            let mut running = Vec::new();
            for i in 0..clusters {
                let name = format!("region-{}", (b'a' + i as u8) as char);
                let c = Cluster::start(&peers, &dir, &name, std::net::Ipv4Addr::LOCALHOST).await?;
                println!("{name}: {}  KUBECONFIG={}", c.server, c.kubeconfig.display());
                running.push(c);
            }
            println!("running; Ctrl-C stops every cluster");
            std::future::pending::<()>().await;
        }
    }
    Ok(0)
}
