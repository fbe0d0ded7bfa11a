//! `arcfed-lab seed-compare`: the mission's headline measured with ARC's own listener. The same
//! world is built twice: N clusters (real API servers, ARC's real controller running as a pod),
//! each with the same-named scale set against one emulated GitHub, a steady job workload. Once
//! with ARC's listener (the seed), once with deploy/arc/values' `listenerTemplate` (arcfed's
//! agent, federated through a 3-voter quorum). In each: listener restarts, 409s, jobs enqueued
//! and completed, time to the first job, and SIGKILL of the listener that holds GitHub's session
//! → time until a job queued after the kill reaches a runner.

use crate::emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use crate::harness::{Quorum, QuorumOptions};
use crate::lab::arc::{self, CONTROLLER_NS, SCALE_SET};
use crate::lab::cluster::Cluster;
use crate::lab::install::repo_root;
use crate::lab::kubelet::Kubelet;
use crate::lab::net::LabNet;
use crate::lab::peers::{ARC_VERSION, Peers};
use anyhow::{Context, bail};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Listener {
    /// ARC's own listener, as ARC's controller builds its pod.
    ArcListener,
    /// arcfed-agent through deploy/arc/values' `listenerTemplate`, federated.
    ArcfedAgent,
}

#[derive(Clone, Debug)]
pub struct SeedOptions {
    pub clusters: usize,
    pub runs: usize,
    /// How long GitHub keeps a session nobody polls (GitHub: about 90 s).
    pub session_ttl: Duration,
    pub jobs_per_minute: f64,
    pub job_seconds: (f64, f64),
    /// Steady workload before the first kill, and between kills once jobs run again.
    pub warmup: Duration,
    /// A run that has no job reach a runner this long after the kill counts as not recovered.
    pub recover_within: Duration,
    /// After the workload stops: how long unfinished jobs may take to finish.
    pub settle: Duration,
}

impl Default for SeedOptions {
    fn default() -> Self {
        SeedOptions {
            clusters: 2,
            runs: 5,
            session_ttl: Duration::from_secs(90),
            jobs_per_minute: 20.0,
            job_seconds: (2.0, 5.0),
            warmup: Duration::from_secs(15),
            recover_within: Duration::from_secs(300),
            settle: Duration::from_secs(120),
        }
    }
}

/// One row of the comparison; both rows have the same fields.
#[derive(Clone, Debug, Serialize)]
pub struct SeedRow {
    pub listener: Listener,
    /// What ran as the listener container.
    pub program: String,
    pub clusters: usize,
    pub runs: usize,
    pub session_ttl_ms: u64,
    /// Listener container starts, in all clusters.
    pub listener_starts: u64,
    /// Listener containers that exited (or were replaced) without being killed by the lab.
    pub listener_restarts: u64,
    /// Session creates GitHub refused with 409 ("already has an active session").
    pub conflicts_409: u64,
    pub jobs_enqueued: u64,
    pub jobs_completed: u64,
    pub jobs_unfinished: u64,
    /// From installing the scale sets to the first completed job.
    pub time_to_first_job_ms: Option<u64>,
    /// Per run: SIGKILL of the session holder's listener → the first job queued after the kill
    /// reaching a runner (`null`: not within `recover_within`).
    pub kill_to_jobs_ms: Vec<Option<u64>>,
    pub kill_to_jobs_p50_ms: Option<u64>,
    pub kill_to_jobs_p99_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SeedReport {
    pub arc_version: String,
    pub kube_apiserver: String,
    /// `None` only when the run was limited to the other row (`--only`).
    pub arc_listener: Option<SeedRow>,
    pub arcfed_agent: Option<SeedRow>,
}

/// Nearest-rank percentile of the recovered runs; a run that did not recover counts as
/// infinitely slow, so a p99 over any such run is `None`.
pub fn percentile(samples: &[Option<u64>], p: f64) -> Option<u64> {
    if samples.is_empty() {
        return None;
    }
    let mut v: Vec<u64> = samples.iter().map(|s| s.unwrap_or(u64::MAX)).collect();
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    let x = v[rank.min(v.len()) - 1];
    (x != u64::MAX).then_some(x)
}

struct World {
    _net: Arc<LabNet>,
    emu: EmulatorHandle,
    _quorum: Option<Quorum>,
    regions: Vec<(Cluster, Kubelet)>,
}

/// Runs both rows, or only `only`'s.
pub async fn seed_compare(
    peers: &Peers,
    dir: &Path,
    opts: &SeedOptions,
    only: Option<Listener>,
) -> anyhow::Result<SeedReport> {
    let mut arc_listener = None;
    let mut arcfed_agent = None;
    if only != Some(Listener::ArcfedAgent) {
        arc_listener = Some(measure(peers, &dir.join("arc-listener"), Listener::ArcListener, opts).await?);
    }
    if only != Some(Listener::ArcListener) {
        arcfed_agent = Some(measure(peers, &dir.join("arcfed-agent"), Listener::ArcfedAgent, opts).await?);
    }
    Ok(SeedReport { arc_version: ARC_VERSION.into(), kube_apiserver: kube_version(peers), arc_listener, arcfed_agent })
}

fn kube_version(peers: &Peers) -> String {
    std::process::Command::new(peers.bin("kube-apiserver"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().trim_start_matches("Kubernetes ").to_string())
        .unwrap_or_default()
}

async fn build(peers: &Peers, dir: &Path, mode: Listener, opts: &SeedOptions) -> anyhow::Result<(World, Instant)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    std::fs::create_dir_all(dir)?;
    let net = Arc::new(LabNet::create()?);
    let listener = tokio::net::TcpListener::bind((net.host, 0)).await?;
    let mut ecfg = EmulatorConfig {
        org: "lab".into(),
        pats: vec!["lab-pat".into()],
        advertise_url: Some(format!("http://{}", listener.local_addr()?)),
        ..EmulatorConfig::default()
    };
    ecfg.settings.session_ttl = opts.session_ttl;
    ecfg.settings.auto_runners = false;
    let emu = Emulator::start(ecfg, listener).await?;
    let quorum = match mode {
        Listener::ArcListener => None,
        Listener::ArcfedAgent => {
            let q = Quorum::start(&dir.join("quorum"), QuorumOptions { bind_ip: net.host, ..QuorumOptions::default() })
                .await?;
            q.wait_serving(Duration::from_secs(60)).await?;
            Some(q)
        }
    };
    let mut regions = Vec::new();
    for i in 0..opts.clusters {
        let name = format!("region-{}", (b'a' + i as u8) as char);
        let c = Cluster::start(peers, dir, &name, net.host).await?;
        let k = Kubelet::start(&c, net.clone(), arc::programs(peers, emu.base_url())).await?;
        arc::install_controller(peers, &c, &dir.join("work").join(&name)).await?;
        if let Some(q) = &quorum {
            arc::apply_operator_crds(peers, &c)?;
            arc::install_agent_side(&c, &name, &q.endpoints(), &q.certs)?;
        }
        regions.push((c, k));
    }
    let installed = Instant::now();
    for (c, _) in &regions {
        let work = dir.join("work").join(&c.name);
        let values = match mode {
            Listener::ArcListener => vec![],
            // As deploy/README.md installs it. (ARC before 0.8 names the listener container
            // `autoscaler`, but merges a template container named `listener` into it, as
            // later releases do.)
            Listener::ArcfedAgent => vec![repo_root().join("deploy/arc/values/gha-runner-scale-set.yaml")],
        };
        let settings = arc::ScaleSetSettings { config_url: emu.config_url(), pat: "lab-pat".into(), max_runners: 10 };
        arc::install_scale_set(peers, c, &work, &format!("arc-runners-{}", c.name), &values, &settings)?;
    }
    Ok((World { _net: net, emu, _quorum: quorum, regions }, installed))
}

fn scale_set_id(emu: &EmulatorHandle) -> Option<i64> {
    emu.report().scale_sets.iter().find(|s| s.name == SCALE_SET && !s.deleted).map(|s| s.id)
}

async fn until<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let end = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > end {
            bail!("{what} did not happen within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The listener container holding GitHub's session now: (region index, pod, pid). The last
/// answered poll of the scale set came from its pod's address (pod names do not tell: the
/// same-named scale set gives the listener pods of every cluster one name).
fn holder(w: &World, set: i64) -> Option<(usize, String, u32)> {
    let timeline = w.emu.timeline();
    let last = timeline.iter().rev().find(|e| {
        e.class == crate::emulator::PathClass::Poll && e.scale_set_id == Some(set) && matches!(e.status, 200 | 202)
    })?;
    let ip: std::net::Ipv4Addr = last.peer.as_deref()?.parse::<std::net::SocketAddr>().ok().map(|a| match a.ip() {
        std::net::IpAddr::V4(v4) => v4,
        std::net::IpAddr::V6(_) => std::net::Ipv4Addr::UNSPECIFIED,
    })?;
    w.regions.iter().enumerate().find_map(|(i, (_, k))| {
        let (ns, pod) = k.pod_at(ip)?;
        (ns == CONTROLLER_NS).then_some(())?;
        k.running(&pod).into_iter().find(|(n, p, _, _)| *n == ns && *p == pod).map(|(_, pod, _, pid)| (i, pod, pid))
    })
}

fn listener_events(w: &World) -> (u64, u64) {
    let mut starts = 0;
    let mut exits = 0;
    for (_, k) in &w.regions {
        for e in k.events() {
            if e.namespace == CONTROLLER_NS && e.pod.ends_with("-listener") {
                match e.exit {
                    None => starts += 1,
                    Some(_) => exits += 1,
                }
            }
        }
    }
    (starts, exits)
}

async fn measure(peers: &Peers, dir: &Path, mode: Listener, opts: &SeedOptions) -> anyhow::Result<SeedRow> {
    eprintln!("seed-compare: {mode:?}: building {} clusters in {}", opts.clusters, dir.display());
    let (w, installed) = build(peers, dir, mode, opts).await?;
    let set = until(Duration::from_secs(180), "ARC creating the scale set on GitHub", || scale_set_id(&w.emu)).await?;
    eprintln!("seed-compare: {mode:?}: ARC created scale set {set}; workload on");
    w.emu.set_workload(set, opts.jobs_per_minute, opts.job_seconds).map_err(|e| anyhow::anyhow!("workload: {e:?}"))?;
    let first = until(Duration::from_secs(300), "the first job to complete", || {
        w.emu.report().scale_set(set).is_some_and(|s| s.jobs_completed > 0).then(Instant::now)
    })
    .await;
    let time_to_first_job_ms = first.as_ref().ok().map(|t| t.duration_since(installed).as_millis() as u64);
    match &first {
        Ok(_) => eprintln!("seed-compare: {mode:?}: first job completed after {time_to_first_job_ms:?} ms"),
        Err(e) => eprintln!("seed-compare: {mode:?}: {e:#}"),
    }
    let mut kills = 0u64;
    let mut kill_to_jobs_ms = Vec::new();
    for run in 0..opts.runs {
        tokio::time::sleep(opts.warmup).await;
        let Ok((region, pod, pid)) =
            until(opts.recover_within, "a listener holding the session", || holder(&w, set)).await
        else {
            eprintln!("seed-compare: {mode:?}: run {run}: no listener holds a session; not recovered");
            kill_to_jobs_ms.push(None);
            continue;
        };
        let t0 = w.emu.now_ms();
        let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        kills += 1;
        let got = until(opts.recover_within, "a job queued after the kill reaching a runner", || {
            w.emu.first_start_after(set, t0)
        })
        .await
        .ok()
        .map(|t| t.saturating_sub(t0));
        eprintln!(
            "seed-compare: {mode:?}: run {run}: killed {pod} in {} → jobs again after {:?} ms",
            w.regions[region].0.name, got
        );
        kill_to_jobs_ms.push(got);
    }
    w.emu.set_workload(set, 0.0, (0.0, 0.0)).map_err(|e| anyhow::anyhow!("workload: {e:?}"))?;
    let _ = until(opts.settle, "every enqueued job to finish", || {
        w.emu.report().scale_set(set).is_some_and(|s| s.jobs_unfinished == 0).then_some(())
    })
    .await;
    let report = w.emu.report();
    let s = report.scale_set(set).context("scale set gone")?;
    let (starts, exits) = listener_events(&w);
    let program = match mode {
        Listener::ArcListener => format!("ARC's githubrunnerscalesetlistener (ARC {ARC_VERSION})"),
        Listener::ArcfedAgent => "arcfed-agent (deploy/arc/values listenerTemplate)".into(),
    };
    Ok(SeedRow {
        listener: mode,
        program,
        clusters: opts.clusters,
        runs: opts.runs,
        session_ttl_ms: opts.session_ttl.as_millis() as u64,
        listener_starts: starts,
        listener_restarts: exits.saturating_sub(kills),
        conflicts_409: s.conflicts_409,
        jobs_enqueued: s.jobs_enqueued,
        jobs_completed: s.jobs_completed,
        jobs_unfinished: s.jobs_unfinished,
        time_to_first_job_ms,
        kill_to_jobs_p50_ms: percentile(&kill_to_jobs_ms, 50.0),
        kill_to_jobs_p99_ms: percentile(&kill_to_jobs_ms, 99.0),
        kill_to_jobs_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_count_unrecovered_runs_as_infinite() {
        assert_eq!(percentile(&[Some(3), Some(1), Some(2)], 50.0), Some(2));
        assert_eq!(percentile(&[Some(3), Some(1), Some(2)], 99.0), Some(3));
        assert_eq!(percentile(&[Some(3), None], 99.0), None);
        assert_eq!(percentile(&[Some(3), None, Some(1)], 50.0), Some(3));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
