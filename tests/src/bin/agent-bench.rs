//! `agent-bench`: the agent's footprint and holder-crash failover, measured with real
//! processes (a benchmark, not a test: it asserts nothing, it writes JSON).
//!
//! It starts the in-process actions-emulator (adversarial knobs), three `arcfed-coordinator`
//! voters and three `arcfed-agent` processes (`sim` backend) of one scale set, runs a steady
//! job workload, reads each agent's resident set size (`VmRSS`) as standby and as holder, then
//! SIGKILLs the holder `--runs` times and measures, on the emulator's clock, how long until the
//! successor's session is open and polling. Build with `--release` for the README's numbers:
//! `cargo run --release -p arcfed-tests --bin agent-bench -- --runs 10`.

use anyhow::Context;
use arcfed_tests::agent_proc::{AgentProc, AgentSpec, GitHubSide};
use arcfed_tests::emulator::{Cursor, Emulator, EmulatorConfig, PathClass, SessionTtlFrom};
use arcfed_tests::harness::{Quorum, QuorumOptions};
use clap::Parser;
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(name = "agent-bench", version, about)]
struct Args {
    /// Holder crashes to measure.
    #[arg(long, env = "ARCFED_BENCH_RUNS", default_value = "10")]
    runs: usize,
    /// Jobs enqueued per second during the run.
    #[arg(long, env = "ARCFED_BENCH_JOBS_PER_SECOND", default_value = "2")]
    jobs_per_second: u32,
    /// Keep logs and data here instead of a temporary directory.
    #[arg(long, env = "ARCFED_BENCH_DIR")]
    dir: Option<std::path::PathBuf>,
    /// Lease TTL of the quorum (the LAN default is 3s).
    #[arg(long, env = "ARCFED_BENCH_LEASE_TTL", default_value = "3s")]
    lease_ttl: String,
}

#[derive(Serialize)]
struct Summary {
    p50: f64,
    p99: f64,
    max: f64,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    profile: &'static str,
    lease_ttl: String,
    runs: usize,
    /// Resident set size of each agent (KiB) while standing by and while holding.
    rss_standby_kib: Vec<u64>,
    rss_holder_kib: Vec<u64>,
    /// SIGKILL of the holder → the successor's session is open / has polled (ms).
    failover_ms: Option<Summary>,
    first_poll_ms: Option<Summary>,
    failover_runs_ms: Vec<u64>,
    conflicts_409: u64,
    sessions_overlap_ms: u64,
    jobs_acquired_twice: u64,
}

fn summary(mut v: Vec<f64>) -> Option<Summary> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| v[(((v.len() - 1) as f64) * p).round() as usize].round();
    Some(Summary { p50: at(0.5), p99: at(0.99), max: at(1.0) })
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let tmp = tempfile::Builder::new().prefix("agent-bench-").tempdir()?;
    let root = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let mut cfg = EmulatorConfig::default();
    cfg.settings.long_poll = Duration::from_secs(10);
    cfg.settings.queue_token_survives_session_delete = true;
    cfg.settings.session_ttl_from = SessionTtlFrom::Creation;
    cfg.settings.cursor = Cursor::PerScaleSet;
    let emu = Emulator::start(cfg, tokio::net::TcpListener::bind("127.0.0.1:0").await?).await?;
    let set = emu.create_scale_set("bench", 1).map_err(|e| anyhow::anyhow!("{e:?}"))?.id;
    let ttl: &'static str = Box::leak(args.lease_ttl.clone().into_boxed_str());
    let q = Quorum::start(root.as_path(), QuorumOptions { lease_ttl: ttl, ..QuorumOptions::default() }).await?;
    q.wait_serving(Duration::from_secs(30)).await?;
    let gh =
        GitHubSide { config_url: emu.config_url(), pat: emu.pat().to_string(), scale_set_id: set, resolve: vec![] };
    let mut agents = Vec::new();
    for c in ["a", "b", "c"] {
        let mut spec = AgentSpec::new(c, gh.clone()).federated(q.endpoints(), q.certs.agent(c)?);
        spec.lease_ttl = Some(args.lease_ttl.clone());
        agents.push(AgentProc::start(&root.as_path().join(c), spec)?);
    }
    let wait = Duration::from_secs(60);
    let holder_of = |s: &arcfed_proto::StatusResponse| {
        s.groups.first().filter(|g| !g.holder.is_empty()).map(|g| (g.holder.clone(), g.holder_cluster.clone(), g.token))
    };
    q.wait_status("three live agents and a holder", wait, |s| {
        s.members.iter().filter(|m| m.status == "live").count() == 3 && holder_of(s).is_some()
    })
    .await?;
    // Steady workload.
    let every = Duration::from_secs_f64(1.0 / f64::from(args.jobs_per_second.max(1)));
    let url = format!("{}/_emulator/jobs", emu.base_url());
    let load = tokio::spawn(async move {
        let http = reqwest::Client::new();
        loop {
            tokio::time::sleep(every).await;
            let body = serde_json::json!({"scaleSetId": set, "count": 1, "durationSeconds": 5});
            let _ = http.post(&url).json(&body).send().await;
        }
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    let s = q.status().await?;
    let (_, holder_cluster, _) = holder_of(&s).context("holder")?;
    let mut rss_standby = vec![];
    let mut rss_holder = vec![];
    for a in &agents {
        let Some(kib) = a.pid().and_then(rss_kib) else { continue };
        if a.spec.cluster == holder_cluster { rss_holder.push(kib) } else { rss_standby.push(kib) }
    }
    let mut failover = vec![];
    let mut first_poll = vec![];
    let mut runs_ms = vec![];
    for _ in 0..args.runs {
        let s = q.wait_status("a holder", wait, |s| holder_of(s).is_some()).await?;
        let (holder, cluster, token) = holder_of(&s).context("holder")?;
        let polled_before = |tok: u64| {
            let suffix = format!("/t{tok}");
            let rep = emu.report();
            rep.scale_set(set)
                .and_then(|x| x.sessions.iter().find(|s| s.owner.ends_with(&suffix) && s.polls > 0).cloned())
        };
        let end = Instant::now() + wait;
        while polled_before(token).is_none() {
            anyhow::ensure!(Instant::now() < end, "the holder never polled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let fault = emu.now_ms();
        let a = agents.iter_mut().find(|a| a.spec.cluster == cluster).context("holder agent")?;
        a.kill();
        let s2 = q.wait_status("a successor", wait, |s| holder_of(s).is_some_and(|h| h.0 != holder)).await?;
        let (_, _, new_token) = holder_of(&s2).context("successor")?;
        let end = Instant::now() + wait;
        let sess = loop {
            if let Some(s) = polled_before(new_token) {
                break s;
            }
            anyhow::ensure!(Instant::now() < end, "the successor never polled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let first = emu
            .timeline()
            .iter()
            .filter(|e| e.class == PathClass::Poll && e.session_id.as_deref() == Some(sess.session_id.as_str()))
            .map(|e| e.at_ms)
            .min()
            .unwrap_or(sess.opened_at);
        let f = sess.opened_at.saturating_sub(fault);
        failover.push(f as f64);
        first_poll.push(first.saturating_sub(fault) as f64);
        runs_ms.push(f);
        let a = agents.iter_mut().find(|a| a.spec.cluster == cluster).context("holder agent")?;
        a.restart()?;
        q.wait_status("the restarted agent joined", wait, |s| {
            s.members.iter().filter(|m| m.status == "live").count() >= 3
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    load.abort();
    let rep = emu.report();
    let ss = rep.scale_set(set).context("scale set")?;
    let report = Report {
        benchmark: "agent-bench",
        profile: if cfg!(debug_assertions) { "debug" } else { "release" },
        lease_ttl: args.lease_ttl.clone(),
        runs: args.runs,
        rss_standby_kib: rss_standby,
        rss_holder_kib: rss_holder,
        failover_ms: summary(failover),
        first_poll_ms: summary(first_poll),
        failover_runs_ms: runs_ms,
        conflicts_409: ss.conflicts_409,
        sessions_overlap_ms: ss.sessions_overlap_ms,
        jobs_acquired_twice: ss.jobs_acquired_twice,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    drop(agents);
    drop(q);
    emu.shutdown().await;
    Ok(())
}
