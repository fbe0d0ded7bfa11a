//! `quorum-bench vs-etcd`: arcfed beside a 3-member etcd 3.4 on loopback, in one run.
//!
//! (a) Failover at equal TTL: a holder process is SIGKILLed while a candidate waits; the
//!     time until the candidate holds. etcd: `etcdctl lock NAME --ttl T` (holder) and a
//!     second one waiting, which prints the key once it holds. arcfed: a holder child agent
//!     and a waiting member; the time until the Grant reaches it.
//! (b) Throughput with the same number of closed-loop clients: lease keepalives
//!     (etcd `/v3/lease/keepalive` vs arcfed keepalive acks) and fresh-lock grants (etcd:
//!     lease grant + put-if-absent txn, two writes; arcfed: Join + Grant, two log entries).
//!     etcd is driven through its JSON gateway over HTTP/1.1 keep-alive (no etcd gRPC
//!     client in this workspace): that adds per-request cost on etcd's side, which the README
//!     states beside the numbers.
//!
//! etcd and arcfed never run at the same time (2 cores): etcd first, then arcfed.

use super::fleet::{self, Pools, Spec, Stats};
use anyhow::{Context, bail};
use arcfed_tests::agent_client::{AgentOptions, TestAgent};
use arcfed_tests::harness::{Quorum, QuorumOptions, free_port};
use base64::Engine;
use serde::Serialize;
use serde_json::json;
use std::collections::HashMap;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct VsEtcdArgs {
    /// Lease TTLs to compare failover at (whole seconds: etcd's TTL is in seconds).
    #[arg(long, value_parser = humantime::parse_duration, default_values = ["2s", "3s"])]
    ttl: Vec<Duration>,
    /// Holder SIGKILLs per TTL and system.
    #[arg(long, default_value = "5")]
    runs: usize,
    /// Closed-loop clients for the throughput part.
    #[arg(long, default_value = "64")]
    concurrency: usize,
    /// How long each throughput measurement runs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    throughput_duration: Duration,
    /// Print one JSON object (the only output format; the flag is the scripts' contract).
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Summary {
    n: usize,
    p50: f64,
    p99: f64,
    samples: Vec<f64>,
}

fn summary(v: Vec<f64>) -> Summary {
    let mut s = v.clone();
    Summary { n: v.len(), p50: super::pct(&mut s, 0.5), p99: super::pct(&mut s, 0.99), samples: v }
}

#[derive(Serialize)]
struct Failover {
    ttl_ms: u64,
    etcd_ms: Summary,
    arcfed_ms: Summary,
    ratio_p50: f64,
    ratio_p99: f64,
}

#[derive(Serialize)]
struct Throughput {
    concurrency: usize,
    duration_s: f64,
    etcd_keepalives_per_s: f64,
    arcfed_keepalives_per_s: f64,
    keepalive_ratio: f64,
    etcd_grants_per_s: f64,
    arcfed_grants_per_s: f64,
    grant_ratio: f64,
}

#[derive(Serialize)]
struct Report {
    etcd_version: String,
    runs: usize,
    failover: Vec<Failover>,
    throughput: Throughput,
    method: &'static str,
}

/// Installs etcd through the script the README names, if `etcd` is not on PATH.
fn ensure_etcd() -> anyhow::Result<String> {
    let have = |b: &str, arg: &str| Command::new(b).arg(arg).output().is_ok_and(|o| o.status.success());
    if !have("etcd", "--version") || !have("etcdctl", "version") {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/install-etcd.sh");
        eprintln!("etcd not found: running {script}");
        let st = Command::new("sh").arg(script).status().context("run install-etcd.sh")?;
        if !st.success() {
            bail!("{script} failed");
        }
    }
    let out = Command::new("etcd").arg("--version").output()?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string())
}

/// A 3-member etcd on 127.0.0.1 in a temp dir, killed on drop.
struct Etcd {
    procs: Vec<Child>,
    clients: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

impl Etcd {
    async fn start() -> anyhow::Result<Etcd> {
        let dir = tempfile::tempdir()?;
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}")).collect();
        let mut procs = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let log = std::fs::File::create(dir.path().join(format!("e{i}.log")))?;
            let c = Command::new("etcd")
                .args(["--name", &format!("e{i}")])
                .args(["--data-dir", &dir.path().join(format!("e{i}")).display().to_string()])
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-state", "new", "--initial-cluster-token", "arcfed-bench"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("spawn etcd")?;
            procs.push(c);
        }
        let clients: Vec<String> = ports.iter().map(|(c, _)| format!("127.0.0.1:{c}")).collect();
        let etcd = Etcd { procs, clients, _dir: dir };
        let http = reqwest::Client::new();
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let mut ok = 0;
            for c in &etcd.clients {
                if let Ok(r) = http.get(format!("http://{c}/health")).send().await
                    && r.text().await.is_ok_and(|t| t.contains("true"))
                {
                    ok += 1;
                }
            }
            if ok == 3 {
                return Ok(etcd);
            }
            if Instant::now() > end {
                bail!("etcd did not become healthy within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The client URL of the current leader (clients pinned there, as arcfed's agents are).
    async fn leader(&self, http: &reqwest::Client) -> anyhow::Result<String> {
        for c in &self.clients {
            let r: serde_json::Value =
                http.post(format!("http://{c}/v3/maintenance/status")).json(&json!({})).send().await?.json().await?;
            if r["leader"] == r["header"]["member_id"] {
                return Ok(c.clone());
            }
        }
        bail!("no etcd member says it leads")
    }
}

/// Spawns `etcdctl lock NAME --ttl T`; returns the child and a receiver of its first line.
fn etcd_lock(endpoints: &str, name: &str, ttl_s: u64) -> anyhow::Result<(Child, std::sync::mpsc::Receiver<Instant>)> {
    let mut c = Command::new("etcdctl")
        .args(["--endpoints", endpoints, "lock", name, "--ttl", &ttl_s.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn etcdctl")?;
    let out = c.stdout.take().context("etcdctl stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if std::io::BufReader::new(out).lines().next().is_some() {
            let _ = tx.send(Instant::now());
        }
    });
    Ok((c, rx))
}

async fn wait_line(rx: &std::sync::mpsc::Receiver<Instant>, within: Duration) -> anyhow::Result<Instant> {
    let end = Instant::now() + within;
    loop {
        if let Ok(t) = rx.try_recv() {
            return Ok(t);
        }
        if Instant::now() > end {
            bail!("etcdctl lock printed nothing within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn etcd_failover(etcd: &Etcd, ttl_s: u64, runs: usize) -> anyhow::Result<Vec<f64>> {
    let eps = etcd.clients.join(",");
    let mut out = Vec::new();
    for run in 0..runs {
        let name = format!("bench-ttl{ttl_s}-run{run}");
        let (mut holder, held) = etcd_lock(&eps, &name, ttl_s)?;
        wait_line(&held, Duration::from_secs(20)).await?;
        let (mut waiter, acquired) = etcd_lock(&eps, &name, ttl_s)?;
        // Let the waiter open its session and start waiting, and the holder renew.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let killed = Instant::now();
        holder.kill()?;
        let _ = holder.wait();
        let at = wait_line(&acquired, Duration::from_secs(ttl_s * 5 + 10)).await?;
        out.push(at.duration_since(killed).as_secs_f64() * 1000.0);
        let _ = waiter.kill();
        let _ = waiter.wait();
        eprintln!("etcd ttl {ttl_s}s run {run}: {:.0} ms", out.last().copied().unwrap_or(0.0));
    }
    Ok(out)
}

async fn etcd_throughput(etcd: &Etcd, workers: usize, d: Duration) -> anyhow::Result<(f64, f64)> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(workers).build()?;
    let leader = etcd.leader(&http).await?;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    // Keepalives: one lease per worker, renewed in a closed loop.
    let count = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + d;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (http, leader, count) = (http.clone(), leader.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let r: serde_json::Value = http
                .post(format!("http://{leader}/v3/lease/grant"))
                .json(&json!({"TTL": "60"}))
                .send()
                .await?
                .json()
                .await?;
            let id = r["ID"].clone();
            while Instant::now() < end {
                let r =
                    http.post(format!("http://{leader}/v3/lease/keepalive")).json(&json!({"ID": id})).send().await?;
                if r.status().is_success() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                let _ = r.bytes().await?;
            }
            anyhow::Ok(())
        }));
    }
    let t0 = Instant::now();
    for t in tasks {
        t.await??;
    }
    let keepalives = count.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    // Grants: a fresh lock per operation, as a lock acquire without contention does it.
    let count = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + d;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (http, leader, count) = (http.clone(), leader.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < end {
                let r: serde_json::Value = http
                    .post(format!("http://{leader}/v3/lease/grant"))
                    .json(&json!({"TTL": "10"}))
                    .send()
                    .await?
                    .json()
                    .await?;
                let key = b64(&format!("bench/lock/{w}/{i}"));
                let txn = json!({
                    "compare": [{"target": "CREATE", "result": "EQUAL", "key": key, "create_revision": "0"}],
                    "success": [{"request_put": {"key": key, "value": b64("holder"), "lease": r["ID"]}}],
                });
                let r: serde_json::Value =
                    http.post(format!("http://{leader}/v3/kv/txn")).json(&txn).send().await?.json().await?;
                if r["succeeded"] == json!(true) {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
            anyhow::Ok(())
        }));
    }
    let t0 = Instant::now();
    for t in tasks {
        t.await??;
    }
    let grants = count.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    Ok((keepalives, grants))
}

/// A quorum at `ttl` (LAN profile). Below 3 s the elections, heartbeat and agent retry are
/// shortened so the startup timing rule (the leader-change path, two election timeouts
/// among it, fits the fence after one keepalive interval) still holds.
async fn arcfed_quorum(dir: &std::path::Path, ttl_s: u64) -> anyhow::Result<Quorum> {
    let ttl: &'static str = Box::leak(format!("{ttl_s}s").into_boxed_str());
    let mut extra: Vec<String> = ["--profile", "lan", "--log-level", "warn"].iter().map(|s| s.to_string()).collect();
    if ttl_s < 3 {
        extra.extend(
            [
                "--heartbeat-interval",
                "50ms",
                "--election-timeout-min",
                "150ms",
                "--election-timeout-max",
                "300ms",
                "--agent-retry-max",
                "100ms",
            ]
            .map(String::from),
        );
    }
    let q = Quorum::start(dir, QuorumOptions { lease_ttl: ttl, extra_args: extra, ..QuorumOptions::default() }).await?;
    q.wait_serving(Duration::from_secs(60)).await?;
    Ok(q)
}

async fn arcfed_failover(q: &Quorum, ttl_s: u64, runs: usize) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::new();
    for run in 0..runs {
        let set = 7000 + (ttl_s as i64) * 100 + run as i64;
        let member = format!("{:032x}", rand::random::<u128>());
        let certdir = q.certs.agent("a")?.cert.parent().map(|p| p.display().to_string()).context("cert dir")?;
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--child", &q.endpoints().join(","), &certdir, &format!("{member}:{set}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let out_pipe = child.stdout.take().context("child stdout")?;
        let granted = tokio::task::spawn_blocking(move || {
            std::io::BufReader::new(out_pipe).lines().map_while(Result::ok).any(|l| l.starts_with("granted"))
        });
        if !tokio::time::timeout(Duration::from_secs(60), granted).await.is_ok_and(|r| r.unwrap_or(false)) {
            let _ = child.kill();
            bail!("the holder child was not granted within 60 s");
        }
        let mut o = AgentOptions::new(q.endpoints(), q.certs.agent("b")?, "b");
        o.scale_set_id = set;
        let other = TestAgent::start(o);
        other.joined(Duration::from_secs(30)).await?;
        // As for etcd: the candidate waits, the holder renews, then the holder dies.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let killed = Instant::now();
        child.kill()?;
        let _ = child.wait();
        other.wait_for("grant after holder kill", Duration::from_secs(60), |r| !r.grants.is_empty()).await?;
        let g = other.rec().grants[0].received_at;
        out.push(g.duration_since(killed).as_secs_f64() * 1000.0);
        eprintln!("arcfed ttl {ttl_s}s run {run}: {:.0} ms", out.last().copied().unwrap_or(0.0));
    }
    Ok(out)
}

/// Keepalive acks/s with `workers` closed-loop streams, and grants/s for a burst of fresh
/// groups (one member each: Join, then the lessor's Grant).
async fn arcfed_throughput(q: &Quorum, workers: usize, d: Duration) -> anyhow::Result<(f64, f64)> {
    let endpoints = Arc::new(q.endpoints());
    let mut tls = HashMap::new();
    tls.insert("t".to_string(), q.certs.agent("t")?);
    let pools = Pools::new(tls, 4);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stats = Stats::new(workers);
    let mut tasks = Vec::new();
    for i in 0..workers {
        let spec = Spec {
            index: i,
            cluster: "t".into(),
            member: format!("{:032x}", rand::random::<u128>()),
            scale_set_id: 50_000 + i as i64,
            ka_every: None,
        };
        tasks.push(tokio::spawn(fleet::agent(spec, endpoints.clone(), pools.clone(), stats.clone(), stop_rx.clone())));
    }
    let end = Instant::now() + Duration::from_secs(60);
    while stats.acked_since(0) < workers {
        if Instant::now() > end {
            bail!("arcfed throughput clients did not all get acks");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a0 = stats.acks.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(d).await;
    let keepalives = (stats.acks.load(Ordering::Relaxed) - a0) as f64 / t0.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    for t in tasks {
        t.abort();
    }

    // Grants: fresh groups, one member each, as many as etcd's workers would acquire in the
    // same time at the keepalive-measured pace, started together.
    let burst = 2000usize;
    let mut tls = HashMap::new();
    tls.insert("t".to_string(), q.certs.agent("t")?);
    // 100 streams per connection: below the server's HTTP/2 concurrent-stream limit.
    let pools = Pools::new(tls, burst / 100);
    let stats = Stats::new(burst);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..burst {
        let spec = Spec {
            index: i,
            cluster: "t".into(),
            member: format!("{:032x}", rand::random::<u128>()),
            scale_set_id: 100_000 + i as i64,
            ka_every: Some(Duration::from_millis(750)),
        };
        tasks.push(tokio::spawn(fleet::agent(spec, endpoints.clone(), pools.clone(), stats.clone(), stop_rx.clone())));
    }
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let granted = stats.grant_at.iter().filter(|g| g.load(Ordering::Relaxed) > 0).count();
        if granted == burst {
            break;
        }
        if Instant::now() > end {
            bail!("only {granted} of {burst} fresh groups granted within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let grants = burst as f64 / t0.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    for t in tasks {
        t.abort();
    }
    Ok((keepalives, grants))
}

pub async fn run(a: VsEtcdArgs) -> anyhow::Result<()> {
    let version = ensure_etcd()?;
    let ttls: Vec<u64> = a.ttl.iter().map(|d| d.as_secs().max(1)).collect();
    let mut etcd_fail = HashMap::new();
    let (etcd_ka, etcd_grants) = {
        let etcd = Etcd::start().await?;
        for t in &ttls {
            etcd_fail.insert(*t, etcd_failover(&etcd, *t, a.runs).await?);
        }
        etcd_throughput(&etcd, a.concurrency, a.throughput_duration).await?
    };
    eprintln!("etcd: {etcd_ka:.0} keepalives/s, {etcd_grants:.0} lock grants/s");
    let mut failover = Vec::new();
    let mut arcfed_tp = None;
    for t in &ttls {
        let dir = tempfile::tempdir()?;
        let q = arcfed_quorum(dir.path(), *t).await?;
        let arc = arcfed_failover(&q, *t, a.runs).await?;
        if *t == 3 || (arcfed_tp.is_none() && Some(t) == ttls.last()) {
            arcfed_tp = Some(arcfed_throughput(&q, a.concurrency, a.throughput_duration).await?);
        }
        let e = summary(etcd_fail.remove(t).unwrap_or_default());
        let f = summary(arc);
        failover.push(Failover {
            ttl_ms: t * 1000,
            ratio_p50: f.p50 / e.p50,
            ratio_p99: f.p99 / e.p99,
            etcd_ms: e,
            arcfed_ms: f,
        });
    }
    let (arc_ka, arc_grants) = arcfed_tp.context("no arcfed throughput measured")?;
    let report = Report {
        etcd_version: version,
        runs: a.runs,
        failover,
        throughput: Throughput {
            concurrency: a.concurrency,
            duration_s: a.throughput_duration.as_secs_f64(),
            etcd_keepalives_per_s: etcd_ka,
            arcfed_keepalives_per_s: arc_ka,
            keepalive_ratio: arc_ka / etcd_ka,
            etcd_grants_per_s: etcd_grants,
            arcfed_grants_per_s: arc_grants,
            grant_ratio: arc_grants / etcd_grants,
        },
        method: "failover: holder SIGKILL -> candidate holds (etcd: waiting `etcdctl lock --ttl T` prints its key; arcfed: Grant reaches the waiting member). keepalives: closed-loop clients, etcd /v3/lease/keepalive via the JSON gateway (HTTP/1.1) vs arcfed keepalive acks on mTLS gRPC streams. grants: etcd lease grant + put-if-absent txn per lock (closed loop) vs arcfed Join + Grant for a burst of 2000 fresh groups.",
    };
    if !a.json {
        eprintln!("(--json is the only output format)");
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
