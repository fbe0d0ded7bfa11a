//! The load generator of `quorum-bench scale` and `vs-etcd`: many lean agents in one process,
//! each a real mTLS `Attach` stream that Joins and keeps alive like an agent, sharing a few
//! HTTP/2 connections per (cluster, endpoint).
//!
//! Why lean: `TestAgent` records every message and ticks every 20 ms, right for tests of
//! a few agents and far too heavy for 50,000. Why shared connections: one TCP connection
//! per stream needs one file descriptor on each side per agent; this machine allows 20,000
//! per process. `--streams-per-conn` says how many streams share one connection (a real
//! agent has one connection of its own; the coordinator's per-stream work is the same).

use arcfed_proto as pb;
use arcfed_proto::agent_message::Msg as In;
use arcfed_proto::agent_service_client::AgentServiceClient;
use arcfed_proto::coordinator_message::Msg as Out;
use arcfed_tests::agent_client::TlsFiles;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Latency histogram: 50 µs buckets up to 20 s, lock-free.
pub struct Hist {
    buckets: Vec<AtomicU64>,
}

const BUCKET_US: u64 = 50;

impl Hist {
    pub fn new() -> Hist {
        Hist { buckets: (0..400_001).map(|_| AtomicU64::new(0)).collect() }
    }
    pub fn record(&self, d: Duration) {
        let i = (d.as_micros() as u64 / BUCKET_US).min(self.buckets.len() as u64 - 1) as usize;
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> Vec<u64> {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect()
    }
    /// Percentiles (ms) of the samples recorded between two snapshots.
    pub fn quantiles(before: &[u64], after: &[u64], qs: &[f64]) -> (u64, Vec<f64>) {
        let diff: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
        let n: u64 = diff.iter().sum();
        let out = qs
            .iter()
            .map(|q| {
                if n == 0 {
                    return f64::NAN;
                }
                let target = ((n as f64) * q).ceil().max(1.0) as u64;
                let mut acc = 0;
                for (i, c) in diff.iter().enumerate() {
                    acc += c;
                    if acc >= target {
                        return (i as u64 * BUCKET_US + BUCKET_US / 2) as f64 / 1000.0;
                    }
                }
                f64::NAN
            })
            .collect();
        (n, out)
    }
}

/// Why a stream ended: the attach was redirected, refused without a leader named, not
/// answered in time, or the stream stopped acking or broke after it was open.
#[derive(Clone, Copy)]
enum EndKind {
    Redirect,
    Refused,
    AttachTimeout,
    NoAck,
    Broken,
}

/// The names of [`EndKind`], in its order (the JSON keys).
pub const END_KINDS: [&str; 5] = ["redirect", "refused", "attach_timeout", "no_ack", "broken"];

/// What every agent of the fleet reports.
pub struct Stats {
    pub t0: Instant,
    pub acks: AtomicU64,
    pub sent: AtomicU64,
    pub joins: AtomicU64,
    pub reconnects: AtomicU64,
    /// How streams ended, by [`END_KINDS`] (where reconnects come from).
    pub ends: [AtomicU64; END_KINDS.len()],
    pub hist: Hist,
    /// Per agent: ms since `t0` of the latest ack (0 = none yet).
    pub last_ack: Vec<AtomicU64>,
    /// Per agent: ms since `t0` of the latest Grant (0 = none).
    pub grant_at: Vec<AtomicU64>,
}

impl Stats {
    fn ended(&self, kind: EndKind) {
        self.ends[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts of [`END_KINDS`] so far.
    pub fn end_counts(&self) -> Vec<(&'static str, u64)> {
        END_KINDS.iter().zip(&self.ends).map(|(k, n)| (*k, n.load(Ordering::Relaxed))).collect()
    }

    pub fn new(n: usize) -> Arc<Stats> {
        Arc::new(Stats {
            t0: Instant::now(),
            acks: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            joins: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            ends: Default::default(),
            hist: Hist::new(),
            last_ack: (0..n).map(|_| AtomicU64::new(0)).collect(),
            grant_at: (0..n).map(|_| AtomicU64::new(0)).collect(),
        })
    }
    pub fn ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64 + 1
    }
    /// Agents whose latest ack came after `since` (ms since t0).
    pub fn acked_since(&self, since: u64) -> usize {
        self.last_ack.iter().filter(|a| a.load(Ordering::Relaxed) > since).count()
    }
}

/// Shared HTTP/2 connections, `per_endpoint` per (cluster, endpoint).
pub struct Pools {
    tls: HashMap<String, TlsFiles>,
    per_endpoint: usize,
    channels: Mutex<HashMap<(String, String), Vec<tonic::transport::Channel>>>,
}

impl Pools {
    pub fn new(tls: HashMap<String, TlsFiles>, per_endpoint: usize) -> Arc<Pools> {
        Arc::new(Pools { tls, per_endpoint: per_endpoint.max(1), channels: Mutex::new(HashMap::new()) })
    }
    fn channel(&self, cluster: &str, addr: &str, i: usize) -> anyhow::Result<tonic::transport::Channel> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let key = (cluster.to_string(), addr.to_string());
        if !map.contains_key(&key) {
            let tls = self.tls.get(cluster).ok_or_else(|| anyhow::anyhow!("no certificate for cluster {cluster}"))?;
            let chans = (0..self.per_endpoint).map(|_| tls.channel(addr)).collect::<Result<Vec<_>, _>>()?;
            map.insert(key.clone(), chans);
        }
        let v = &map[&key];
        Ok(v[i % v.len()].clone())
    }
}

/// One lean agent.
#[derive(Clone)]
pub struct Spec {
    pub index: usize,
    pub cluster: String,
    pub member: String,
    pub scale_set_id: i64,
    /// None: closed loop (the next keepalive as soon as the previous one is acked).
    pub ka_every: Option<Duration>,
}

/// `lease`: the epoch held (0: none), named so a leader holding it live re-attaches without a
/// log write; `keepalive_seq` (0: none): the keepalive that Join stands for, acked in Joined.
fn join_msg(s: &Spec, lease: u64, keepalive_seq: u64) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(In::Join(pb::Join {
            member_id: s.member.clone(),
            group: Some(pb::GroupRef {
                configure_url: "https://github.example/arcfed-bench".into(),
                scale_set_id: s.scale_set_id,
            }),
            ers_namespace: "arc-runners".into(),
            ers_name: format!("set-{}", s.cluster),
            weight: 1,
            min_runners: 0,
            max_runners: 10,
            priority: 0,
            github_ready: true,
            policy: 0,
            resume_epoch: lease,
            keepalive_seq,
        })),
    }
}

/// Runs one agent until `stop` turns true: attach (following leader hints), Join, keep
/// alive, Join again on EXPIRED, reconnect when acks stop.
pub async fn agent(
    spec: Spec,
    endpoints: Arc<Vec<String>>,
    pools: Arc<Pools>,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ep = spec.index;
    let mut redirect: Option<String> = None;
    let mut st = StreamState::default();
    let mut first = true;
    // As the agent's link does: the endpoint whose joined stream failed is passed over for a
    // TTL, and so are redirects to it (followers name a dead leader until they elect another).
    let ttl = spec.ka_every.map_or(Duration::from_secs(3), |k| k * 4);
    let mut lost: Vec<(String, Instant)> = Vec::new();
    loop {
        if *stop.borrow() {
            return;
        }
        if !first {
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        let passed_over =
            |a: &str, lost: &Vec<(String, Instant)>| lost.iter().any(|(l, until)| l == a && Instant::now() < *until);
        lost.retain(|(_, until)| Instant::now() < *until);
        let addr = match redirect.take() {
            Some(a) => a,
            None => {
                if endpoints.len() > 1 && passed_over(&endpoints[ep % endpoints.len()], &lost) {
                    ep += 1;
                }
                endpoints[ep % endpoints.len()].clone()
            }
        };
        st.was_up = false;
        let end = one_stream(&spec, &addr, &pools, &stats, &mut st, &mut stop).await;
        // A dead leader: the endpoint its stream was on. (The agent also passes over a
        // redirect target that does not answer at all; these shared channels do not tell a
        // dead address from a coordinator that said no, so the bench does not.)
        if st.was_up {
            lost.push((addr.clone(), Instant::now() + ttl));
        }
        match end {
            End::Stopped => return,
            End::Redirect(l) if !passed_over(&l, &lost) => redirect = Some(l),
            End::Redirect(_) | End::Failed => {
                ep += 1;
                // Spread the retries of thousands of agents (an agent retries ≤ 150 ms on LAN).
                let jitter = rand::random::<u64>() % 100;
                tokio::time::sleep(Duration::from_millis(50 + jitter)).await;
            }
        }
    }
}

/// What one agent keeps across its streams.
#[derive(Default)]
struct StreamState {
    seq: u64,
    /// The lease epoch held (0: none), named in the next Join to re-attach to it.
    lease: u64,
    /// Whether the last stream got as far as Joined.
    was_up: bool,
}

enum End {
    Stopped,
    Redirect(String),
    Failed,
}

fn status_end(st: &tonic::Status, stats: &Stats) -> End {
    match arcfed_proto::leader::leader_hint(st) {
        Some(l) => {
            stats.ended(EndKind::Redirect);
            End::Redirect(l)
        }
        None => {
            stats.ended(if st.code() == tonic::Code::Unavailable { EndKind::Refused } else { EndKind::Broken });
            End::Failed
        }
    }
}

async fn one_stream(
    spec: &Spec,
    addr: &str,
    pools: &Pools,
    stats: &Stats,
    st: &mut StreamState,
    stop: &mut watch::Receiver<bool>,
) -> End {
    let Ok(ch) = pools.channel(&spec.cluster, addr, spec.index) else { return End::Failed };
    let mut client = AgentServiceClient::new(ch);
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(8);
    // Sent keepalives not yet acked: (seq, sent_at); a few at most.
    let mut inflight: Vec<(u64, Instant)> = Vec::new();
    // As the real agent does: a Join that resumes the lease stands for a keepalive.
    let keepalive_seq = if st.lease != 0 {
        st.seq += 1;
        inflight.push((st.seq, Instant::now()));
        stats.sent.fetch_add(1, Ordering::Relaxed);
        st.seq
    } else {
        0
    };
    let _ = tx.send(join_msg(spec, st.lease, keepalive_seq)).await;
    // As the real agent does: a coordinator that knows no live leader may wait for one.
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    arcfed_proto::leader::set_await_leader(&mut req, Duration::from_secs(3));
    let attach = client.attach(req);
    let mut inbound = match tokio::time::timeout(Duration::from_secs(5), attach).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(st)) => return status_end(&st, stats),
        Err(_) => {
            stats.ended(EndKind::AttachTimeout);
            return End::Failed;
        }
    };
    let mut joined = false;
    let mut last_ack = Instant::now();
    let every = spec.ka_every.unwrap_or(Duration::from_millis(250));
    // Spread the fleet's keepalives over the interval.
    let offset = Duration::from_micros(rand::random::<u64>() % (every.as_micros() as u64).max(1));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => if *stop.borrow() { return End::Stopped },
            _ = ticker.tick(), if spec.ka_every.is_some() => {
                if joined {
                    if send_ka(&tx, &mut st.seq, &mut inflight, stats).await.is_err() {
                        return End::Failed;
                    }
                    // Two intervals without an ack past the expected one: not (or no longer) a
                    // serving leader. Try another endpoint.
                    if last_ack.elapsed() > every * 3 {
                        stats.ended(EndKind::NoAck);
                        return End::Failed;
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_secs(3)), if spec.ka_every.is_none() => {
                if last_ack.elapsed() > Duration::from_secs(3) {
                    stats.ended(EndKind::NoAck);
                    return End::Failed;
                }
            }
            msg = inbound.message() => match msg {
                Ok(Some(pb::CoordinatorMessage { msg: Some(m) })) => match m {
                    Out::Joined(j) => {
                        joined = true;
                        st.was_up = true;
                        st.lease = j.epoch;
                        last_ack = Instant::now();
                        stats.joins.fetch_add(1, Ordering::Relaxed);
                        match j.ack {
                            // The resume was acked as the keepalive the Join stood for.
                            Some(a) => on_ack(spec, stats, &mut inflight, a.seq),
                            // As an agent does: the first keepalive right after Joined.
                            None => {
                                inflight.clear();
                                if send_ka(&tx, &mut st.seq, &mut inflight, stats).await.is_err() {
                                    return End::Failed;
                                }
                            }
                        }
                    }
                    Out::Ack(a) => {
                        last_ack = Instant::now();
                        on_ack(spec, stats, &mut inflight, a.seq);
                        if spec.ka_every.is_none() && send_ka(&tx, &mut st.seq, &mut inflight, stats).await.is_err() {
                            return End::Failed;
                        }
                    }
                    Out::Expired(_) => {
                        joined = false;
                        st.lease = 0;
                        inflight.clear();
                        if tx.send(join_msg(spec, 0, 0)).await.is_err() {
                            return End::Failed;
                        }
                    }
                    Out::Grant(_) => stats.grant_at[spec.index].store(stats.ms(), Ordering::Relaxed),
                    _ => {}
                },
                Ok(Some(_)) => {}
                Ok(None) => {
                    stats.ended(EndKind::Broken);
                    return End::Failed;
                }
                Err(st) => return status_end(&st, stats),
            },
        }
    }
}

/// Records the ack of keepalive `seq`, if this stream sent it.
fn on_ack(spec: &Spec, stats: &Stats, inflight: &mut Vec<(u64, Instant)>, seq: u64) {
    if let Some(pos) = inflight.iter().position(|(s, _)| *s == seq) {
        let (_, sent) = inflight.swap_remove(pos);
        stats.hist.record(sent.elapsed());
        stats.acks.fetch_add(1, Ordering::Relaxed);
        stats.last_ack[spec.index].store(stats.ms(), Ordering::Relaxed);
    }
}

async fn send_ka(
    tx: &mpsc::Sender<pb::AgentMessage>,
    seq: &mut u64,
    inflight: &mut Vec<(u64, Instant)>,
    stats: &Stats,
) -> Result<(), ()> {
    *seq += 1;
    // Keep only recent keepalives: an ack older than four sends is not waited for.
    if inflight.len() >= 4 {
        inflight.remove(0);
    }
    inflight.push((*seq, Instant::now()));
    stats.sent.fetch_add(1, Ordering::Relaxed);
    let m = pb::AgentMessage { msg: Some(In::Keepalive(pb::Keepalive { seq: *seq, github_ready: true })) };
    tx.send(m).await.map_err(|_| ())
}

/// Sets the nice value of every thread of this process (on Linux a nice value belongs to a
/// thread); the voters are child processes and keep theirs. Returns how many threads.
pub fn renice_self(nice: i32) -> anyhow::Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir("/proc/self/task")? {
        let name = e?.file_name();
        let tid: i32 = name.to_string_lossy().parse()?;
        let Some(pid) = rustix::process::Pid::from_raw(tid) else { continue };
        match rustix::process::setpriority_process(Some(pid), nice) {
            Ok(()) => n += 1,
            // A thread that ended since the listing.
            Err(rustix::io::Errno::SRCH) => {}
            Err(e) => anyhow::bail!("setpriority({tid}, {nice}): {e}"),
        }
    }
    Ok(n)
}

/// CPU seconds (user + system) and RSS (MiB) of a process, from /proc.
#[derive(Clone, Copy, Debug)]
pub struct ProcSample {
    pub at: Instant,
    pub cpu_s: f64,
    pub rss_mib: f64,
}

pub fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn sample(pid: u32, tck: f64) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(ProcSample { at: Instant::now(), cpu_s: (utime + stime) / tck, rss_mib: rss_kb / 1024.0 })
}

/// The soft limit on open files of this process (`ulimit -n`), from /proc/self/limits.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
