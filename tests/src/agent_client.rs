//! A library agent for tests and benchmarks: it Joins, keeps alive, reports, can be told to
//! go silent, and records what it saw with timestamps from this process's clock.
//!
//! It follows the agent side of DESIGN §4: a keepalive every TTL/4 carrying a sequence
//! number, and the fence `sent_at(k) + TTL×(1−margin)` for the latest keepalive k whose ack
//! lists (group, token). When no ack arrives for TTL/2 it reconnects to the next endpoint,
//! so it finds a new leader; a redirect (`x-arcfed-leader`) is followed at once.

use arcfed_proto as pb;
use arcfed_proto::agent_message::Msg as In;
use arcfed_proto::agent_service_client::AgentServiceClient;
use arcfed_proto::coordinator_message::Msg as Out;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// PEM files in cert-manager's layout: the one shared type (`arcfed_proto::tls::TlsPaths`).
pub use arcfed_proto::tls::TlsPaths as TlsFiles;

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub endpoints: Vec<String>,
    pub tls: TlsFiles,
    pub member_id: String,
    pub configure_url: String,
    pub scale_set_id: i64,
    pub ers_namespace: String,
    pub ers_name: String,
    pub weight: i64,
    pub min_runners: i64,
    pub max_runners: i64,
    pub priority: i64,
    pub github_ready: bool,
    /// Name the lease held (as the real agent does) when attaching again, so a leader that
    /// holds it live re-attaches without a log write. Off: every attach is a log Join.
    pub resume: bool,
}

impl AgentOptions {
    pub fn new(endpoints: Vec<String>, tls: TlsFiles, cluster: &str) -> AgentOptions {
        AgentOptions {
            endpoints,
            tls,
            member_id: format!("{:032x}", rand::random::<u128>()),
            configure_url: "https://github.example/arcfed-org".into(),
            scale_set_id: 1,
            ers_namespace: "arc-runners".into(),
            ers_name: format!("set-{cluster}"),
            weight: 1,
            min_runners: 0,
            max_runners: 10,
            priority: 0,
            github_ready: true,
            resume: true,
        }
    }
}

#[derive(Clone, Debug)]
pub struct AckSeen {
    pub seq: u64,
    pub sent_at: Instant,
    pub received_at: Instant,
    pub held: Vec<(String, u64)>,
    /// Carried by a Joined: the ack of the keepalive a resuming Join stood for.
    pub in_joined: bool,
}

#[derive(Clone, Debug)]
pub struct GrantSeen {
    pub group: String,
    pub token: u64,
    pub stale_sessions: Vec<String>,
    pub received_at: Instant,
}

/// Everything the agent saw, in order.
#[derive(Debug, Default)]
pub struct Record {
    pub joined: Vec<(u64, Instant)>,
    /// The lease held: the latest Joined epoch, cleared by EXPIRED.
    pub lease: Option<u64>,
    pub acks: Vec<AckSeen>,
    pub grants: Vec<GrantSeen>,
    pub expired: Vec<(String, Instant)>,
    pub handovers: Vec<(pb::HandoverRequest, Instant)>,
    pub assignments: Vec<(pb::Assignment, Instant)>,
    pub job_events: Vec<pb::RoutedJobEvent>,
    pub delete_sessions: Vec<pb::DeleteSessions>,
    /// Stream errors (status code, message, leader hint).
    pub errors: Vec<(tonic::Code, String, Option<String>)>,
    /// Keepalives sent: seq → (sent_at, endpoint).
    pub sent: BTreeMap<u64, Instant>,
    pub ttl_ms: u64,
    pub margin_permille: u64,
}

impl Record {
    pub fn epoch(&self) -> Option<u64> {
        self.joined.last().map(|j| j.0)
    }
    /// The token of `group` listed by the latest ack, if any.
    pub fn held_token(&self) -> Option<u64> {
        self.acks.last().and_then(|a| a.held.first().map(|h| h.1))
    }
    /// End of the fence for (group, token): sent_at(k) + TTL×(1−margin) for the latest k
    /// whose ack lists it.
    pub fn fence_end(&self, token: u64) -> Option<Instant> {
        let fence = Duration::from_millis(self.ttl_ms * (1000 - self.margin_permille) / 1000);
        self.acks.iter().rev().find(|a| a.held.iter().any(|h| h.1 == token)).map(|a| a.sent_at + fence)
    }
    pub fn last_grant(&self) -> Option<&GrantSeen> {
        self.grants.last()
    }
}

enum Ctl {
    Command(In, oneshot::Sender<pb::CommandResult>),
    /// Send a keepalive now (fence (c): a fresh ack after a decision to POST).
    KeepaliveNow,
}

/// A running test agent. Dropping it stops it (the stream closes).
pub struct TestAgent {
    pub opts: AgentOptions,
    pub record: Arc<Mutex<Record>>,
    silent: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    ctl: mpsc::Sender<Ctl>,
    next_request: std::sync::atomic::AtomicU64,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestAgent {
    /// Starts the agent; it connects and Joins in the background.
    pub fn start(opts: AgentOptions) -> TestAgent {
        let record = Arc::new(Mutex::new(Record::default()));
        let (silent, silent_rx) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let (ctl, ctl_rx) = mpsc::channel(64);
        let task = tokio::spawn(run(opts.clone(), record.clone(), silent_rx, stop_rx, ctl_rx));
        TestAgent { opts, record, silent, stop, ctl, next_request: 1.into(), task }
    }

    pub fn rec(&self) -> MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stop sending keepalives (the stream stays open), or resume.
    pub fn set_silent(&self, silent: bool) {
        let _ = self.silent.send(silent);
    }

    /// Close the stream and stop for good.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until `cond` holds on the record, or fails after `deadline`.
    pub async fn wait_for(&self, what: &str, deadline: Duration, cond: impl Fn(&Record) -> bool) -> anyhow::Result<()> {
        let end = Instant::now() + deadline;
        loop {
            if cond(&self.rec()) {
                return Ok(());
            }
            if Instant::now() > end {
                anyhow::bail!(
                    "timed out after {deadline:?} waiting for {what}; record: {:?}",
                    short_record(&self.rec())
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for a Joined, returns its epoch.
    pub async fn joined(&self, deadline: Duration) -> anyhow::Result<u64> {
        self.wait_for("Joined", deadline, |r| !r.joined.is_empty()).await?;
        Ok(self.rec().epoch().unwrap_or(0))
    }

    async fn command(&self, msg: In) -> anyhow::Result<pb::CommandResult> {
        let (tx, rx) = oneshot::channel();
        self.ctl.send(Ctl::Command(msg, tx)).await.map_err(|_| anyhow::anyhow!("agent stopped"))?;
        Ok(tokio::time::timeout(Duration::from_secs(10), rx).await??)
    }

    /// Sends a keepalive at once instead of at the next TTL/4 tick.
    pub async fn keepalive_now(&self) {
        let _ = self.ctl.send(Ctl::KeepaliveNow).await;
    }

    fn rid(&self) -> u64 {
        self.next_request.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    pub async fn progress(
        &self,
        token: u64,
        message_id: Option<i64>,
        assigned_jobs: i64,
    ) -> anyhow::Result<pb::CommandResult> {
        let stats = pb::Statistics { total_assigned_jobs: assigned_jobs, ..Default::default() };
        self.command(In::Progress(pb::Progress {
            request_id: self.rid(),
            token,
            message_id,
            statistics: Some(stats),
            events: vec![],
        }))
        .await
    }

    /// A Progress with everything: message id (None = idle 202), statistics and job events.
    pub async fn progress_full(
        &self,
        token: u64,
        message_id: Option<i64>,
        statistics: pb::Statistics,
        events: Vec<pb::JobEvent>,
    ) -> anyhow::Result<pb::CommandResult> {
        self.command(In::Progress(pb::Progress {
            request_id: self.rid(),
            token,
            message_id,
            statistics: Some(statistics),
            events,
        }))
        .await
    }

    pub async fn session_opened_with(
        &self,
        token: u64,
        session_id: &str,
        statistics: pb::Statistics,
    ) -> anyhow::Result<pb::CommandResult> {
        self.command(In::SessionOpened(pb::SessionOpened {
            request_id: self.rid(),
            token,
            session_id: session_id.into(),
            statistics: Some(statistics),
        }))
        .await
    }

    pub async fn session_opened(&self, token: u64, session_id: &str) -> anyhow::Result<pb::CommandResult> {
        self.command(In::SessionOpened(pb::SessionOpened {
            request_id: self.rid(),
            token,
            session_id: session_id.into(),
            statistics: Some(pb::Statistics::default()),
        }))
        .await
    }

    pub async fn release(
        &self,
        token: u64,
        deleted: Vec<String>,
        reason: pb::ReleaseReason,
    ) -> anyhow::Result<pb::CommandResult> {
        self.command(In::Release(pb::Release {
            request_id: self.rid(),
            token,
            deleted,
            reason: reason as i32,
            detail: String::new(),
        }))
        .await
    }
}

fn short_record(r: &Record) -> String {
    format!(
        "joined={:?} acks={} last_held={:?} grants={:?} expired={} errors={:?}",
        r.joined.iter().map(|j| j.0).collect::<Vec<_>>(),
        r.acks.len(),
        r.acks.last().map(|a| a.held.clone()),
        r.grants.iter().map(|g| g.token).collect::<Vec<_>>(),
        r.expired.len(),
        r.errors.iter().rev().take(3).collect::<Vec<_>>()
    )
}

pub fn is_accepted(r: &pb::CommandResult) -> bool {
    matches!(r.result, Some(pb::command_result::Result::Accepted(_)))
}

pub fn rejection(r: &pb::CommandResult) -> Option<&str> {
    match &r.result {
        Some(pb::command_result::Result::Rejected(x)) => Some(&x.reason),
        _ => None,
    }
}

fn lock(r: &Arc<Mutex<Record>>) -> MutexGuard<'_, Record> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

async fn run(
    opts: AgentOptions,
    record: Arc<Mutex<Record>>,
    mut silent: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    mut ctl: mpsc::Receiver<Ctl>,
) {
    let mut endpoint_idx = 0usize;
    let mut redirect: Option<String> = None;
    let mut seq = 0u64;
    loop {
        if *stop.borrow() {
            return;
        }
        let addr = redirect.take().unwrap_or_else(|| opts.endpoints[endpoint_idx % opts.endpoints.len()].clone());
        let outcome = one_stream(&opts, &addr, &record, &mut seq, &mut silent, &mut stop, &mut ctl).await;
        match outcome {
            StreamEnd::Stopped => return,
            StreamEnd::Redirect(l) => redirect = Some(l),
            StreamEnd::Failed => {
                endpoint_idx += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

enum StreamEnd {
    Stopped,
    Redirect(String),
    Failed,
}

/// `keepalive_seq` (0: none): the keepalive a resuming Join stands for (its Joined acks it).
fn join_msg(o: &AgentOptions, lease: Option<u64>, keepalive_seq: u64) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(In::Join(pb::Join {
            member_id: o.member_id.clone(),
            group: Some(pb::GroupRef { configure_url: o.configure_url.clone(), scale_set_id: o.scale_set_id }),
            ers_namespace: o.ers_namespace.clone(),
            ers_name: o.ers_name.clone(),
            weight: o.weight,
            min_runners: o.min_runners,
            max_runners: o.max_runners,
            priority: o.priority,
            github_ready: o.github_ready,
            policy: 0,
            resume_epoch: if o.resume { lease.unwrap_or(0) } else { 0 },
            keepalive_seq,
        })),
    }
}

async fn one_stream(
    opts: &AgentOptions,
    addr: &str,
    record: &Arc<Mutex<Record>>,
    seq: &mut u64,
    silent: &mut watch::Receiver<bool>,
    stop: &mut watch::Receiver<bool>,
    ctl: &mut mpsc::Receiver<Ctl>,
) -> StreamEnd {
    let channel = match opts.tls.channel(addr) {
        Ok(c) => c,
        Err(e) => {
            lock(record).errors.push((tonic::Code::Unknown, e.to_string(), None));
            return StreamEnd::Failed;
        }
    };
    let mut client = AgentServiceClient::new(channel);
    let (out_tx, out_rx) = mpsc::channel::<pb::AgentMessage>(64);
    // As the real agent does: a Join that resumes the lease stands for a keepalive sent now
    // (not while silenced, which sends none).
    let (lease, keepalive_seq) = {
        let mut r = lock(record);
        let ks = if opts.resume && r.lease.is_some() && !*silent.borrow() {
            *seq += 1;
            r.sent.insert(*seq, Instant::now());
            *seq
        } else {
            0
        };
        (r.lease, ks)
    };
    let _ = out_tx.send(join_msg(opts, lease, keepalive_seq)).await;
    // Bounded: a frozen coordinator accepts TCP but never completes the handshake.
    // Like the real agent: a coordinator that knows no live leader may wait for one.
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(out_rx));
    arcfed_proto::leader::set_await_leader(&mut req, Duration::from_secs(2));
    let attach = client.attach(req);
    let mut inbound = match tokio::time::timeout(Duration::from_secs(3), attach).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(st)) => return status_end(record, st),
        Err(_) => {
            lock(record).errors.push((tonic::Code::DeadlineExceeded, format!("attach to {addr} timed out"), None));
            return StreamEnd::Failed;
        }
    };
    let mut pending: BTreeMap<u64, oneshot::Sender<pb::CommandResult>> = BTreeMap::new();
    let mut last_ack = Instant::now();
    let mut ka_every = Duration::from_millis(250);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut next_ka = Instant::now();
    let mut quiet = *silent.borrow_and_update();
    loop {
        tokio::select! {
            _ = stop.changed() => if *stop.borrow() { return StreamEnd::Stopped },
            // Leaving silence: judge ack freshness from now, so the first keepalive is sent.
            // `quiet` changes only here: a tick that wins the race against this branch must not
            // see the new value with the old `last_ack` (it would close the stream for "no ack"
            // at once, and the agent would never hear the EXPIRED it is waiting for).
            _ = silent.changed() => {
                quiet = *silent.borrow_and_update();
                last_ack = Instant::now();
                next_ka = Instant::now();
            }
            c = ctl.recv() => match c {
                Some(Ctl::Command(msg, reply)) => {
                    let rid = match &msg {
                        In::Progress(p) => p.request_id,
                        In::SessionOpened(s) => s.request_id,
                        In::Release(r) => r.request_id,
                        In::Adopt(a) => a.request_id,
                        In::Leave(l) => l.request_id,
                        _ => 0,
                    };
                    pending.insert(rid, reply);
                    if out_tx.send(pb::AgentMessage { msg: Some(msg) }).await.is_err() { return StreamEnd::Failed }
                }
                Some(Ctl::KeepaliveNow) => next_ka = Instant::now(),
                None => return StreamEnd::Stopped,
            },
            _ = tick.tick() => {
                let now = Instant::now();
                let joined = !lock(record).joined.is_empty();
                if joined && !quiet && now >= next_ka {
                    *seq += 1;
                    lock(record).sent.insert(*seq, now);
                    let ready = opts.github_ready;
                    if out_tx.send(pb::AgentMessage { msg: Some(In::Keepalive(pb::Keepalive { seq: *seq, github_ready: ready })) }).await.is_err() {
                        return StreamEnd::Failed;
                    }
                    next_ka = now + ka_every;
                }
                // No ack for two keepalive periods past the expected one: this endpoint is not
                // (or no longer) a serving leader with quorum. Try another.
                if joined && !quiet && now.duration_since(last_ack) > ka_every * 3 {
                    lock(record).errors.push((tonic::Code::DeadlineExceeded, format!("no ack from {addr}"), None));
                    return StreamEnd::Failed;
                }
            }
            msg = inbound.message() => match msg {
                Ok(Some(pb::CoordinatorMessage { msg: Some(m) })) => {
                    let now = Instant::now();
                    // Record under the lock; act (send, reply) after releasing it.
                    let mut rejoin = false;
                    let mut reply = None;
                    {
                        let mut r = lock(record);
                        match m {
                            Out::Joined(j) => {
                                r.joined.push((j.epoch, now));
                                r.lease = Some(j.epoch);
                                r.ttl_ms = j.lease_ttl_ms;
                                r.margin_permille = u64::from(j.margin_permille);
                                ka_every = Duration::from_millis((j.lease_ttl_ms / 4).max(10));
                                last_ack = now;
                                next_ka = now;
                                // The resume was acked as the keepalive the Join stood for.
                                if let Some(a) = j.ack
                                    && let Some(sent_at) = r.sent.get(&a.seq).copied()
                                {
                                    let held = a.held.into_iter().map(|h| (h.group_key, h.token)).collect();
                                    r.acks.push(AckSeen { seq: a.seq, sent_at, received_at: now, held, in_joined: true });
                                    next_ka = now + ka_every;
                                }
                            }
                            Out::Ack(a) => {
                                last_ack = now;
                                // An ack for a keepalive this agent never sent proves nothing.
                                if let Some(sent_at) = r.sent.get(&a.seq).copied() {
                                    let held = a.held.into_iter().map(|h| (h.group_key, h.token)).collect();
                                    r.acks.push(AckSeen { seq: a.seq, sent_at, received_at: now, held, in_joined: false });
                                }
                            }
                            Out::Expired(e) => {
                                r.expired.push((e.reason, now));
                                r.lease = None;
                                rejoin = true;
                            }
                            Out::Grant(g) => r.grants.push(GrantSeen {
                                group: g.group_key,
                                token: g.token,
                                stale_sessions: g.stale_sessions,
                                received_at: now,
                            }),
                            Out::Handover(h) => r.handovers.push((h, now)),
                            Out::Assignment(a) => r.assignments.push((a, now)),
                            Out::JobEvent(e) => r.job_events.push(e),
                            Out::DeleteSessions(d) => r.delete_sessions.push(d),
                            Out::Result(res) => reply = Some(res),
                            Out::Drill(_) => {}
                        }
                    }
                    if let Some(res) = reply
                        && let Some(tx) = pending.remove(&res.request_id)
                    {
                        let _ = tx.send(res);
                    }
                    // The lease is gone: Join again for a new epoch.
                    if rejoin && out_tx.send(join_msg(opts, None, 0)).await.is_err() {
                        return StreamEnd::Failed;
                    }
                }
                Ok(Some(pb::CoordinatorMessage { msg: None })) => {}
                Ok(None) => { lock(record).errors.push((tonic::Code::Unavailable, "stream ended".into(), None)); return StreamEnd::Failed }
                Err(st) => return status_end(record, st),
            },
        }
    }
}

fn status_end(record: &Arc<Mutex<Record>>, st: tonic::Status) -> StreamEnd {
    let leader = arcfed_proto::leader::leader_hint(&st);
    lock(record).errors.push((st.code(), st.message().to_string(), leader.clone()));
    match leader {
        Some(l) if st.code() == tonic::Code::Unavailable => StreamEnd::Redirect(l),
        _ => StreamEnd::Failed,
    }
}
