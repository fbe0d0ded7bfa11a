//! `quorum-bench scale`: three voters as child processes, N groups × C clusters of agent
//! streams keeping alive at the profile's cadence, and what the quorum costs under it.

use super::fleet::{self, Hist, Pools, ProcSample, Spec, Stats};
use anyhow::{Context, bail};
use arcfed_tests::agent_client::{AgentOptions, TestAgent};
use arcfed_tests::harness::{Quorum, QuorumOptions, Voter};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct ScaleArgs {
    /// Groups (federated scale sets).
    #[arg(long, default_value = "1000")]
    groups: usize,
    /// Clusters: one member per group in each.
    #[arg(long, default_value = "5")]
    clusters: usize,
    /// The coordinator's timing profile (lan: TTL 3 s; wan: TTL 10 s); agents keep alive
    /// every TTL/4.
    #[arg(long, default_value = "lan", value_parser = ["lan", "wan"])]
    profile: String,
    /// How long to measure the steady keepalive load.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    duration: Duration,
    /// Agent streams sharing one HTTP/2 connection (file descriptors: see fleet.rs).
    #[arg(long, default_value = "100")]
    streams_per_conn: usize,
    /// Holder SIGKILLs under load.
    #[arg(long, default_value = "3")]
    runs: usize,
    /// Print one JSON object (the only output format; the flag is the scripts' contract).
    #[arg(long)]
    json: bool,
    /// The load generator's nice value during the leader kill only (this process's threads;
    /// the voters are child processes and keep theirs). On a bench host the 50,000 simulated
    /// agents share the voters' cores, which real agents in other clusters do not: at equal
    /// priority the generator takes as much CPU as the new leader while the herd attaches.
    /// It must still do its own part of each re-attach promptly (read Joined, send the first
    /// keepalive, read the ack), so not too low a share: 5 gives it about a quarter of a
    /// contended core. 0 keeps equal priority throughout. Lowering it back after the kill
    /// needs root (CAP_SYS_NICE); without it the rest of the run stays niced, which nothing
    /// after the kill measures.
    #[arg(long, default_value = "5", allow_negative_numbers = true)]
    generator_nice: i32,
    /// Keep the voters' data dirs and logs after the run (the path goes to stderr), to read
    /// what the voters did during the leader kill.
    #[arg(long)]
    keep: bool,
}

#[derive(Serialize)]
struct Quantiles {
    n: u64,
    p50: f64,
    p99: f64,
}

#[derive(Serialize)]
struct ProcCost {
    node: u64,
    cpu_cores: f64,
    rss_mib: f64,
    rss_max_mib: f64,
}

#[derive(Serialize)]
struct ScaleReport {
    groups: usize,
    clusters: usize,
    members: usize,
    profile: String,
    lease_ttl_ms: u64,
    keepalive_interval_ms: u64,
    streams_per_connection: usize,
    generator_connections: usize,
    open_files_limit: Option<u64>,
    machine_cpus: usize,
    join_all_s: f64,
    window_s: f64,
    keepalives_per_s: f64,
    keepalives_sent_per_s: f64,
    ack_ms: Quantiles,
    leader_rss_mib: f64,
    leader_cpu_cores: f64,
    leader: ProcCost,
    followers: Vec<ProcCost>,
    generator_cpu_cores: f64,
    /// Holder SIGKILL (a child process) under load → Grant to the waiting member.
    grant_under_load_ms: Vec<f64>,
    /// Leader SIGKILL under load → every member acked again by the new leader.
    leader_kill_all_acked_ms: Option<f64>,
    leader_kill_members_recovered: usize,
    /// (ms after the kill, members acked again), sampled every 250 ms.
    leader_kill_timeline: Vec<(u64, usize)>,
    /// How agent streams ended between the leader kill and full recovery (redirect, refused,
    /// attach_timeout, no_ack, broken).
    leader_kill_stream_ends: BTreeMap<&'static str, u64>,
    /// After the recovery: the new leader's `acks_withheld_total` (no quorum contact),
    /// `lease_resumes_total`, `lessor_late_ticks_total`, `keepalives_total`, and the running
    /// voters' `elections_stood_total` and `prevotes_lost_total` (summed over the run).
    leader_kill_counters: BTreeMap<String, u64>,
    /// The generator's nice value during the leader kill (`--generator-nice`; 0: equal
    /// priority with the voters).
    generator_nice_during_leader_kill: i32,
    /// TTL × (1 − margin): the goal for the leader-kill recovery.
    fence_ms: u64,
    /// Size of the snapshot the killed leader installed when it came back, or else of the
    /// newest one a voter built (from their logs).
    snapshot_bytes: Option<u64>,
    reconnects: u64,
}

async fn metrics(v: &Voter) -> Option<String> {
    let url = format!("http://{}/metrics", v.http);
    let c = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().ok()?;
    c.get(url).send().await.ok()?.text().await.ok()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// The serving leader's node id, from each voter's /metrics (status would list every
/// member: too large under this load).
async fn serving_leader(q: &mut Quorum, deadline: Duration) -> anyhow::Result<u64> {
    let end = Instant::now() + deadline;
    loop {
        for v in q.voters.iter_mut() {
            if !v.running() {
                continue;
            }
            if let Some(t) = metrics(v).await
                && metric(&t, "arcfed_serving") == Some(1.0)
            {
                return Ok(v.id);
            }
        }
        if Instant::now() > end {
            bail!("no serving leader within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `bytes=` of every line of a voter's log that contains `event` ("built a snapshot",
/// "installed a snapshot from the leader").
fn logged_snapshot_sizes(log: &str, event: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(event))
        .filter_map(|l| l.split("bytes=").nth(1))
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect()
}

pub async fn run(a: ScaleArgs) -> anyhow::Result<()> {
    let (ttl_ms, ttl) = if a.profile == "wan" { (10_000u64, "10s") } else { (3_000, "3s") };
    let every = Duration::from_millis(ttl_ms / 4);
    let total = a.groups * a.clusters;
    let per_endpoint = a.groups.div_ceil(a.streams_per_conn.max(1));
    let conns = per_endpoint * a.clusters * 3;
    let limit = fleet::open_files_limit();
    if let Some(l) = limit
        && (conns as u64 + 256) > l
    {
        bail!(
            "{total} streams at {} per connection need up to {conns} connections (3 endpoints) but `ulimit -n` is {l}; raise it or --streams-per-conn",
            a.streams_per_conn
        );
    }
    let mut dir = tempfile::tempdir()?;
    if a.keep {
        dir.disable_cleanup(true);
        eprintln!("voters' data dirs and logs: {} (kept)", dir.path().display());
    }
    let opts = QuorumOptions {
        lease_ttl: ttl,
        extra_args: [
            "--profile",
            &a.profile,
            "--log-level",
            "warn,arcfed_coordinator::raft::network=info,arcfed_coordinator::raft::store=info,arcfed_coordinator::raft::election=info,arcfed_coordinator::server=info,arcfed_coordinator::server::agent=warn",
            "--snapshot-keep-log",
            "1000",
            // Joins share entries (group commit), so the default 5,000 entries between
            // snapshots may not pass in a run: snapshot often enough to measure one.
            "--snapshot-every",
            "20",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        ..QuorumOptions::default()
    };
    let mut q = Quorum::start(dir.path(), opts).await?;
    q.wait_serving(Duration::from_secs(60)).await?;
    let endpoints = Arc::new(q.endpoints());
    let clusters: Vec<String> = (0..a.clusters).map(|c| format!("c{c}")).collect();
    let mut tls = HashMap::new();
    for c in &clusters {
        tls.insert(c.clone(), q.certs.agent(c)?);
    }
    let pools = Pools::new(tls, per_endpoint);
    let stats = Stats::new(total);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    // Ramp: start agents in batches, so Joins queue at the leader rather than all at once.
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for g in 0..a.groups {
        for (c, cluster) in clusters.iter().enumerate() {
            let spec = Spec {
                index: g * a.clusters + c,
                cluster: cluster.clone(),
                member: format!("{:032x}", rand::random::<u128>()),
                scale_set_id: g as i64 + 1,
                ka_every: Some(every),
            };
            tasks.push(tokio::spawn(fleet::agent(
                spec,
                endpoints.clone(),
                pools.clone(),
                stats.clone(),
                stop_rx.clone(),
            )));
        }
        if (g + 1) % 400 == 0 {
            let want = ((g + 1) * a.clusters) as u64;
            let end = Instant::now() + Duration::from_secs(60);
            while stats.joins.load(Ordering::Relaxed) + (want / 10) < want && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let end = Instant::now() + Duration::from_secs(300);
    loop {
        let since = stats.ms().saturating_sub(3 * every.as_millis() as u64);
        let acked = stats.acked_since(since);
        if acked == total {
            break;
        }
        if Instant::now() > end {
            bail!("only {acked} of {total} members acked within 300 s of the start");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let join_all_s = started.elapsed().as_secs_f64();
    let granted = stats.grant_at.iter().filter(|g| g.load(Ordering::Relaxed) > 0).count();
    eprintln!("{granted} members hold a group after the ramp");
    eprintln!("all {total} members joined and acked in {join_all_s:.1}s; measuring {:?}", a.duration);
    tokio::time::sleep(every * 2).await;

    // Steady window.
    let leader = serving_leader(&mut q, Duration::from_secs(10)).await?;
    let tck = fleet::clk_tck();
    let pids: Vec<(u64, u32)> = q.voters.iter().filter_map(|v| v.pid().map(|p| (v.id, p))).collect();
    let me = std::process::id();
    let first: HashMap<u64, ProcSample> =
        pids.iter().filter_map(|(id, p)| fleet::sample(*p, tck).map(|s| (*id, s))).collect();
    let me0 = fleet::sample(me, tck);
    let h0 = stats.hist.snapshot();
    let (acks0, sent0) = (stats.acks.load(Ordering::Relaxed), stats.sent.load(Ordering::Relaxed));
    let t0 = Instant::now();
    let mut rss_max: HashMap<u64, f64> = HashMap::new();
    while t0.elapsed() < a.duration {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (id, p) in &pids {
            if let Some(s) = fleet::sample(*p, tck) {
                let m = rss_max.entry(*id).or_default();
                *m = m.max(s.rss_mib);
            }
        }
    }
    let window = t0.elapsed().as_secs_f64();
    let h1 = stats.hist.snapshot();
    let (acks1, sent1) = (stats.acks.load(Ordering::Relaxed), stats.sent.load(Ordering::Relaxed));
    let (n, qs) = Hist::quantiles(&h0, &h1, &[0.5, 0.99]);
    let cost = |id: u64, pid: u32| -> Option<ProcCost> {
        let (s0, s1) = (first.get(&id)?, fleet::sample(pid, tck)?);
        Some(ProcCost {
            node: id,
            cpu_cores: (s1.cpu_s - s0.cpu_s) / s1.at.duration_since(s0.at).as_secs_f64(),
            rss_mib: s1.rss_mib,
            rss_max_mib: rss_max.get(&id).copied().unwrap_or(s1.rss_mib),
        })
    };
    let mut leader_cost = None;
    let mut followers = Vec::new();
    for (id, pid) in &pids {
        if let Some(c) = cost(*id, *pid) {
            if *id == leader {
                leader_cost = Some(c);
            } else {
                followers.push(c);
            }
        }
    }
    let leader_cost = leader_cost.context("no /proc sample of the leader")?;
    let generator_cpu_cores = match (me0, fleet::sample(me, tck)) {
        (Some(s0), Some(s1)) => (s1.cpu_s - s0.cpu_s) / s1.at.duration_since(s0.at).as_secs_f64(),
        _ => f64::NAN,
    };
    eprintln!("window done: {:.0} keepalives/s acked", (acks1 - acks0) as f64 / window);

    // Holder SIGKILL under load → Grant to the other member.
    let mut grant_under_load_ms = Vec::new();
    for run in 0..a.runs {
        let set = 1_000_000 + run as i64;
        let member = format!("{:032x}", rand::random::<u128>());
        let certdir = q.certs.agent("a")?.cert.parent().map(|p| p.display().to_string()).context("cert dir")?;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(["--child", &endpoints.join(","), &certdir, &format!("{member}:{set}")])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let out = child.stdout.take().context("child stdout")?;
        let granted = tokio::task::spawn_blocking(move || {
            std::io::BufReader::new(out).lines().map_while(Result::ok).any(|l| l.starts_with("granted"))
        });
        if !tokio::time::timeout(Duration::from_secs(90), granted).await.is_ok_and(|r| r.unwrap_or(false)) {
            let _ = child.kill();
            bail!("the holder child was not granted set {set} within 90 s");
        }
        let mut o = AgentOptions::new(endpoints.to_vec(), q.certs.agent("b")?, "b");
        o.scale_set_id = set;
        o.configure_url = "https://github.example/arcfed-org".into();
        let other = TestAgent::start(o);
        other.joined(Duration::from_secs(60)).await?;
        other.wait_for("acked", Duration::from_secs(30), |r| r.acks.len() >= 2).await?;
        let killed = Instant::now();
        child.kill()?;
        let _ = child.wait();
        other.wait_for("grant after holder kill", Duration::from_secs(120), |r| !r.grants.is_empty()).await?;
        let g = other.rec().grants[0].received_at;
        grant_under_load_ms.push(g.duration_since(killed).as_secs_f64() * 1000.0);
        eprintln!("holder kill {run}: grant after {:.0} ms", grant_under_load_ms.last().copied().unwrap_or(0.0));
    }

    // Leader SIGKILL under load → every member acked again.
    let leader = serving_leader(&mut q, Duration::from_secs(10)).await?;
    if a.generator_nice != 0 {
        let n = fleet::renice_self(a.generator_nice)?;
        eprintln!("leader kill: the generator's {n} threads at nice {}", a.generator_nice);
    }
    let killed_at = stats.ms();
    let ends_before = stats.end_counts();
    let killed = Instant::now();
    q.voter(leader).kill();
    let end = Instant::now() + Duration::from_secs(120);
    let mut recovered;
    // (ms after the kill, members acked again) every 250 ms: where the recovery time goes.
    let mut leader_kill_timeline: Vec<(u64, usize)> = Vec::new();
    let leader_kill_all_acked_ms = loop {
        recovered = stats.acked_since(killed_at);
        let ms = killed.elapsed().as_millis() as u64;
        if leader_kill_timeline.last().is_none_or(|(t, _)| ms >= t + 250) {
            leader_kill_timeline.push((ms, recovered));
        }
        if recovered == total {
            break Some(killed.elapsed().as_secs_f64() * 1000.0);
        }
        if Instant::now() > end {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("leader kill: {recovered} of {total} acked again, all after {leader_kill_all_acked_ms:?} ms");
    eprintln!("leader kill timeline (ms, acked again): {leader_kill_timeline:?}");
    let leader_kill_stream_ends: BTreeMap<&str, u64> =
        stats.end_counts().iter().zip(&ends_before).map(|((k, n), (_, b))| (*k, n - b)).collect();
    eprintln!("leader kill: how streams ended meanwhile {leader_kill_stream_ends:?}");
    // What the new leader counted in its term (it was a follower until the kill) and what
    // the voters' election drivers did: where the recovery time went.
    let mut leader_kill_counters = BTreeMap::new();
    if let Ok(new_leader) = serving_leader(&mut q, Duration::from_secs(10)).await
        && let Some(text) = metrics(q.voter(new_leader)).await
    {
        for name in ["acks_withheld_total", "lease_resumes_total", "lessor_late_ticks_total", "keepalives_total"] {
            if let Some(v) = metric(&text, &format!("arcfed_{name}")) {
                leader_kill_counters.insert(format!("new_leader_{name}"), v as u64);
            }
        }
    }
    for v in q.voters.iter().filter(|v| v.running()) {
        if let Some(text) = metrics(v).await {
            for name in ["elections_stood_total", "prevotes_lost_total"] {
                *leader_kill_counters.entry(format!("voters_{name}")).or_insert(0) +=
                    metric(&text, &format!("arcfed_{name}")).unwrap_or(0.0) as u64;
            }
        }
    }
    eprintln!("leader kill: counters {leader_kill_counters:?}");
    if a.generator_nice != 0
        && let Err(e) = fleet::renice_self(0)
    {
        eprintln!("leader kill: could not set the generator back to nice 0 ({e}); nothing after this is timed");
    }
    // The killed leader comes back as a follower. Re-attaches no longer write the log, so it
    // may catch up from the log alone; the snapshot size is the one it installed if it needed
    // one, else the newest one a voter built (from their logs).
    q.voter(leader).restart()?;
    let end = Instant::now() + Duration::from_secs(20);
    let snapshot_bytes = loop {
        if let Some(b) =
            logged_snapshot_sizes(&q.voter(leader).log_text(), "installed a snapshot from the leader").last()
        {
            break Some(*b);
        }
        if Instant::now() > end {
            break q
                .voters
                .iter()
                .filter_map(|v| logged_snapshot_sizes(&v.log_text(), "built a snapshot").last().copied())
                .max();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let _ = stop_tx.send(true);
    for t in tasks {
        t.abort();
    }
    let report = ScaleReport {
        groups: a.groups,
        clusters: a.clusters,
        members: total,
        profile: a.profile.clone(),
        lease_ttl_ms: ttl_ms,
        keepalive_interval_ms: every.as_millis() as u64,
        streams_per_connection: a.streams_per_conn,
        generator_connections: per_endpoint * a.clusters,
        open_files_limit: limit,
        machine_cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        join_all_s,
        window_s: window,
        keepalives_per_s: (acks1 - acks0) as f64 / window,
        keepalives_sent_per_s: (sent1 - sent0) as f64 / window,
        ack_ms: Quantiles { n, p50: qs[0], p99: qs[1] },
        leader_rss_mib: leader_cost.rss_max_mib,
        leader_cpu_cores: leader_cost.cpu_cores,
        leader: leader_cost,
        followers,
        generator_cpu_cores,
        grant_under_load_ms,
        leader_kill_all_acked_ms,
        leader_kill_members_recovered: recovered,
        leader_kill_timeline,
        leader_kill_stream_ends,
        leader_kill_counters,
        generator_nice_during_leader_kill: a.generator_nice,
        fence_ms: ttl_ms * 667 / 1000,
        snapshot_bytes,
        reconnects: stats.reconnects.load(Ordering::Relaxed),
    };
    if !a.json {
        eprintln!("(--json is the only output format)");
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
