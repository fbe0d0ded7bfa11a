//! quorum-bench: measures the coordinator quorum on this machine and writes JSON.
//!
//! Not a test: numbers on a shared 2-core machine are noisy, so they live here and in the
//! README, never in assertions. It starts three real `arcfed-coordinator` processes
//! (binaries found like the tests find them; set ARCFED_BIN_DIR to use release builds),
//! then measures:
//! - grants/s and Join→Grant latency for `--groups` groups, one member each;
//! - keepalives/s acked with `--agents` agents keeping alive at TTL/4;
//! - leader SIGKILL → every agent acked again by the new leader;
//! - holder SIGKILL (a child process holding a group) → Grant to the other member.
//!
//! Two subcommands measure what issue 8 asks (see `scale.rs` and `vs_etcd.rs` beside this
//! file, and the README's "Scale and etcd side by side"):
//! - `quorum-bench scale --groups N --clusters C [--profile lan|wan] [--duration 60s] --json`
//! - `quorum-bench vs-etcd [--ttl 2s --ttl 3s] [--runs 5] --json`
use anyhow::Context;
use arcfed_tests::agent_client::{AgentOptions, TestAgent};
use arcfed_tests::harness::{Quorum, QuorumOptions};
use clap::Parser;
use serde_json::json;
use std::time::{Duration, Instant};

#[path = "quorum_bench/fleet.rs"]
mod fleet;
#[path = "quorum_bench/scale.rs"]
mod scale;
#[path = "quorum_bench/vs_etcd.rs"]
mod vs_etcd;

#[derive(Parser, Debug)]
#[command(name = "quorum-bench", about, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Groups (federated scale sets) to grant, one member each.
    #[arg(long, env = "ARCFED_BENCH_GROUPS", default_value = "200")]
    groups: usize,
    /// Extra agents that only keep alive, for the keepalive rate.
    #[arg(long, env = "ARCFED_BENCH_AGENTS", default_value = "300")]
    agents: usize,
    /// How long to measure keepalives.
    #[arg(long, env = "ARCFED_BENCH_WINDOW", value_parser = humantime::parse_duration, default_value = "10s")]
    window: Duration,
    /// Repetitions of the two SIGKILL measurements.
    #[arg(long, env = "ARCFED_BENCH_RUNS", default_value = "3")]
    runs: usize,
    /// Write the JSON here as well as to stdout.
    #[arg(long, env = "ARCFED_BENCH_OUT")]
    out: Option<std::path::PathBuf>,
    /// Internal: run as the holder child process (endpoints, cert dir, member id).
    #[arg(long, hide = true, num_args = 3)]
    child: Option<Vec<String>>,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// N groups × C clusters of real mTLS agent streams keeping alive against three voters:
    /// keepalive rate, ack latency, leader/follower CPU and RSS, grant and leader-kill
    /// recovery under that load, snapshot size.
    Scale(scale::ScaleArgs),
    /// Failover (holder SIGKILL → waiting candidate holds) and keepalive/grant throughput,
    /// arcfed beside a 3-member etcd 3.4 on loopback, at equal TTLs.
    VsEtcd(vs_etcd::VsEtcdArgs),
}

pub(crate) fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn summary(mut v: Vec<f64>) -> serde_json::Value {
    json!({"n": v.len(), "p50": pct(&mut v, 0.5), "p99": pct(&mut v, 0.99), "max": pct(&mut v, 1.0)})
}

fn opts(q: &Quorum, cluster: &str, set: i64) -> anyhow::Result<AgentOptions> {
    let mut o = AgentOptions::new(q.endpoints(), q.certs.agent(cluster)?, cluster);
    o.scale_set_id = set;
    Ok(o)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    if let Some(c) = args.child {
        return child(&c).await;
    }
    match args.cmd {
        Some(Cmd::Scale(a)) => return scale::run(a).await,
        Some(Cmd::VsEtcd(a)) => return vs_etcd::run(a).await,
        None => {}
    }
    let dir = tempfile::tempdir()?;
    let mut q = Quorum::start(dir.path(), QuorumOptions::default()).await?;
    q.wait_serving(Duration::from_secs(30)).await?;

    // 1. Grants: one member per group, all joining at once.
    let start = Instant::now();
    let holders: Vec<TestAgent> =
        (0..args.groups).map(|i| opts(&q, "a", 1000 + i as i64).map(TestAgent::start)).collect::<Result<_, _>>()?;
    let mut lat = Vec::new();
    for a in &holders {
        a.wait_for("grant", Duration::from_secs(120), |r| !r.grants.is_empty()).await?;
        let g = a.rec().grants[0].received_at;
        lat.push(g.duration_since(start).as_secs_f64() * 1000.0);
    }
    let all_granted = start.elapsed();
    let mut join_to_grant = Vec::new();
    for a in &holders {
        let r = a.rec();
        if let (Some(j), Some(g)) = (r.joined.first(), r.grants.first()) {
            join_to_grant.push(g.received_at.duration_since(j.1).as_secs_f64() * 1000.0);
        }
    }

    // 2. Keepalives: extra agents in one group, plus the holders.
    let extra: Vec<TestAgent> = (0..args.agents)
        .map(|i| opts(&q, &format!("k{}", i % 20), 1).map(TestAgent::start))
        .collect::<Result<_, _>>()?;
    for a in &extra {
        a.joined(Duration::from_secs(60)).await?;
    }
    let count = |all: &[&TestAgent]| all.iter().map(|a| a.rec().acks.len()).sum::<usize>();
    let everyone: Vec<&TestAgent> = holders.iter().chain(extra.iter()).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = count(&everyone);
    let t0 = Instant::now();
    tokio::time::sleep(args.window).await;
    let acked = count(&everyone) - before;
    let ka_per_s = acked as f64 / t0.elapsed().as_secs_f64();
    drop(extra);

    // 3. Leader SIGKILL → every agent acked again.
    let mut leader_kill = Vec::new();
    for _ in 0..args.runs {
        let s = q.status().await?;
        let killed = Instant::now();
        q.voter(s.leader).kill();
        for a in &holders {
            a.wait_for("ack after leader kill", Duration::from_secs(60), |r| {
                r.acks.last().is_some_and(|k| k.received_at > killed)
            })
            .await?;
        }
        leader_kill.push(killed.elapsed().as_secs_f64() * 1000.0);
        q.voter(s.leader).restart()?;
        q.wait_status("all voters back", Duration::from_secs(30), |s| s.voters.len() == 3).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    drop(holders);

    // 4. Holder SIGKILL (a separate process) → Grant to the other member.
    let mut holder_kill = Vec::new();
    for run in 0..args.runs {
        let set = 5000 + run as i64;
        let member = format!("{:032x}", rand::random::<u128>());
        let certdir = q.certs.agent("a")?.cert.parent().map(|p| p.display().to_string()).context("cert dir")?;
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["--child", &q.endpoints().join(","), &certdir, &format!("{member}:{set}")])
            .stdout(std::process::Stdio::null())
            .spawn()?;
        q.wait_status("child holds", Duration::from_secs(30), |s| s.groups.iter().any(|g| g.holder == member)).await?;
        let other = TestAgent::start(opts(&q, "b", set)?);
        other.joined(Duration::from_secs(30)).await?;
        q.wait_status("two members", Duration::from_secs(30), |s| {
            s.members.iter().filter(|m| m.group.ends_with(&format!("#{set}")) && m.status == "live").count() == 2
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let killed = Instant::now();
        child.start_kill()?;
        let _ = child.wait().await;
        other.wait_for("grant after holder kill", Duration::from_secs(60), |r| !r.grants.is_empty()).await?;
        let g = other.rec().grants[0].received_at;
        holder_kill.push(g.duration_since(killed).as_secs_f64() * 1000.0);
    }

    let report = json!({
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "config": {"voters": 3, "lease_ttl_ms": 3000, "fence_margin": 0.333, "groups": args.groups, "keepalive_agents": args.agents + args.groups},
        "grants_per_s": args.groups as f64 / all_granted.as_secs_f64(),
        "grant_latency_ms": summary(join_to_grant),
        "grant_since_burst_start_ms": summary(lat),
        "keepalives_acked_per_s": ka_per_s,
        "leader_sigkill_to_all_agents_served_ms": summary(leader_kill),
        "holder_sigkill_to_grant_elsewhere_ms": summary(holder_kill),
    });
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(p) = args.out {
        std::fs::write(p, &text)?;
    }
    Ok(())
}

/// The holder child: joins `member:set` and keeps alive until killed. It prints
/// `granted <token>` once it holds the group, so a parent under load need not poll status.
async fn child(c: &[String]) -> anyhow::Result<()> {
    let endpoints: Vec<String> = c[0].split(',').map(str::to_string).collect();
    let tls = arcfed_tests::agent_client::TlsFiles::in_dir(&c[1]);
    let (member, set) = c[2].split_once(':').context("member:set")?;
    let mut o = AgentOptions::new(endpoints, tls, "a");
    o.member_id = member.to_string();
    o.scale_set_id = set.parse()?;
    let a = TestAgent::start(o);
    a.joined(Duration::from_secs(60)).await?;
    a.wait_for("grant", Duration::from_secs(120), |r| !r.grants.is_empty()).await?;
    println!("granted {}", a.rec().grants[0].token);
    std::future::pending::<()>().await;
    Ok(())
}
