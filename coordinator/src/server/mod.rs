//! The coordinator's driver: it owns every side effect around the pure core.
//!
//! ```text
//!  run() ─┬─ gRPC server (mTLS): RaftService · AgentService · AdminService, each behind a role check
//!         ├─ leadership tracker: metrics → quorum contact; on promotion ensure_linearizable →
//!         │                      Advertise → lessor.promote → serve
//!         ├─ lessor loop (leader): tick → propose Expire / MarkSilent / Revoke / Grant
//!         └─ admin HTTP: /live /ready /metrics
//! ```
//! `run` takes already-bound listeners (as mini-redis does), so tests can bind port 0.

pub mod admin;
pub mod agent;
pub mod convert;
pub mod http;
pub mod metrics;

use crate::clock;
use crate::config::Config;
use crate::core::{Applied, Command, LeaseTable, Request};
use crate::raft::network::{PeerContacts, PeerNetwork, PeerService};
use crate::raft::{NodeId, Raft, Shared, store};
use crate::tls::{Role, require_role};
use arcfed_proto::admin_service_server::AdminServiceServer;
use arcfed_proto::agent_service_server::AgentServiceServer;
use arcfed_proto::raft_service_server::RaftServiceServer;
use arcfed_proto::tls_reload::{self, TlsSource};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState, SnapshotPolicy};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tracing::{info, warn};

// Max gRPC message size between voters: the largest is a snapshot chunk, bounded by
// `--snapshot-chunk-size` (validated against this limit).
use crate::config::{MAX_CLIENT_MESSAGE, MAX_MESSAGE};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--listen {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(
        "--tls-cert names {found}, but this voter is --node-id {node}: a voter must present its own coordinator identity (spiffe://arcfed/coordinator/{node}), or peers would take its messages for another voter's"
    )]
    WrongIdentity { found: String, node: u64 },
}

/// Why a proposal did not produce an outcome.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader")]
    NotLeader,
    #[error("raft: {0}")]
    Raft(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// When this node last learned how long ago it heard from a quorum.
#[derive(Clone, Copy, Debug)]
struct QuorumSeen {
    at: Instant,
    millis: Option<u64>,
}

/// Everything the services and loops share.
pub struct Ctx {
    pub id: NodeId,
    pub cfg: Config,
    pub raft: Raft,
    pub shared: Arc<Shared>,
    /// Leader-only lease deadlines. A std Mutex: every critical section is short and
    /// never spans an `.await`.
    lessor: Mutex<LeaseTable>,
    /// `Some(term)` once this node may serve agents and admins in `term`.
    pub serving: watch::Sender<Option<u64>>,
    quorum: Mutex<QuorumSeen>,
    pub metrics: metrics::Metrics,
    /// When each peer last answered this node's Raft RPCs (voter reachability in `status`).
    pub contacts: Arc<PeerContacts>,
    /// Leader memory: when each holderless group was first seen, for the grant-latency histogram.
    holderless_since: Mutex<HashMap<crate::core::GroupKey, Instant>>,
    /// The open agent streams of this node, by member (stream id, sender): where an
    /// operator's drill is relayed. Only the latest stream of a member is kept.
    pub streams: Mutex<HashMap<crate::core::MemberId, (u64, agent::OutTx)>>,
    /// One watch per group with an open stream: an agent stream wakes when its group changed,
    /// not on every applied entry (50,000 streams × every change would not fit).
    pub bus: GroupBus,
    /// Wakes the lessor loop between ticks when a group may have become grantable (a member
    /// joined, a holder released or left), so a Grant follows at once instead of at the
    /// next 50 ms tick.
    pub grant_wake: tokio::sync::Notify,
    /// Where [`Ctx::propose`] queues proposals for [`batch_proposals`].
    proposals: tokio::sync::mpsc::Sender<Proposal>,
    /// This voter's certificate files, re-read when they change (served expiry in metrics).
    pub tls: Arc<TlsSource>,
    /// Groups with an Adopt waiting for an absent holder's lease to end
    /// ([`agent::wait_for_absent_holder`]): no Grant for them meanwhile.
    pub adopts_waiting: Mutex<BTreeMap<crate::core::GroupKey, usize>>,
    /// Open agent streams per cluster identity (`--max-streams-per-cluster`).
    pub streams_per_cluster: Mutex<HashMap<String, usize>>,
}

/// Per-group change notification for agent streams. [`relay_changes`] sends the applied
/// index on the watch of every group the state reports changed.
#[derive(Default)]
pub struct GroupBus {
    /// A std Mutex: held for a map lookup or insert, never across an `.await`.
    senders: Mutex<HashMap<crate::core::GroupKey, watch::Sender<u64>>>,
}

impl GroupBus {
    /// A receiver that sees every later change of `group`.
    pub fn subscribe(&self, group: &crate::core::GroupKey) -> watch::Receiver<u64> {
        lock(&self.senders).entry(group.clone()).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    /// Wakes the streams of these groups; drops watches nobody listens to any more.
    fn notify<'a>(&self, groups: impl IntoIterator<Item = &'a crate::core::GroupKey>, index: u64) {
        let mut senders = lock(&self.senders);
        for g in groups {
            if let Some(tx) = senders.get(g) {
                if tx.receiver_count() == 0 {
                    senders.remove(g);
                } else {
                    tx.send_replace(index);
                }
            }
        }
    }

    /// Wakes every stream (the state was replaced: its change log starts afresh).
    fn notify_all(&self, index: u64) {
        lock(&self.senders).retain(|_, tx| {
            tx.send_replace(index);
            tx.receiver_count() > 0
        });
    }
}

/// Relays applied changes to the agent streams: the groups that changed (from the state's
/// change log, O(changed groups)) wake their streams, and each effect goes to the one stream
/// it concerns ([`agent::deliver`]).
async fn relay_changes(ctx: Arc<Ctx>) {
    let mut applied = ctx.shared.applied.subscribe();
    let mut effects = ctx.shared.effects.subscribe();
    let mut seen = ctx.shared.read(|s| s.last_index);
    loop {
        tokio::select! {
            r = applied.changed() => {
                if r.is_err() {
                    return;
                }
                let (changed, last) = ctx.shared.read(|s| (s.groups_changed_since(seen), s.last_index));
                match changed {
                    Some(groups) => ctx.bus.notify(&groups, last),
                    None => ctx.bus.notify_all(last),
                }
                seen = seen.max(last);
            }
            ev = effects.recv() => match ev {
                Ok((_, effect)) => agent::deliver(&ctx, effect),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    warn!(skipped = n, "effects lagged: skipped job events and session deletions are lost (state resyncs)");
                }
                Err(_) => return,
            },
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ctx {
    pub fn now(&self) -> u64 {
        clock::boottime_ms()
    }

    pub fn lessor(&self) -> MutexGuard<'_, LeaseTable> {
        lock(&self.lessor)
    }

    /// The open agent streams (for drills).
    pub fn streams(&self) -> MutexGuard<'_, HashMap<crate::core::MemberId, (u64, agent::OutTx)>> {
        lock(&self.streams)
    }

    pub fn serving_term(&self) -> Option<u64> {
        *self.serving.borrow()
    }

    /// The election timing of the flags (`--heartbeat`, `--election-timeout-min/max`).
    pub fn election_timing(&self) -> crate::raft::election::Timing {
        crate::raft::election::Timing {
            heartbeat: self.cfg.heartbeat,
            min: self.cfg.election_min,
            max: self.cfg.election_max,
        }
    }

    /// How long ago this node (as leader) last heard from a quorum; None if unknown.
    pub fn quorum_age_ms(&self) -> Option<u64> {
        let q = *lock(&self.quorum);
        q.millis.map(|m| m.saturating_add(q.at.elapsed().as_millis() as u64))
    }

    /// The current leader's id and agent-facing address, as far as this node knows.
    pub fn leader_hint(&self) -> Option<(NodeId, String)> {
        let leader = self.current_leader()?;
        let addr = self
            .shared
            .read(|s| s.leader_addrs.get(&leader).cloned())
            .or_else(|| {
                let m = self.raft.metrics();
                let m = m.borrow();
                m.membership_config.membership().get_node(&leader).map(|n| n.addr.clone())
            })
            .unwrap_or_default();
        Some((leader, addr))
    }

    /// The leader this node's Raft knows of (no clone of the metrics).
    fn current_leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// For a client that may wait (`x-arcfed-await-leader-ms`): waits up to `wait` until this
    /// node serves (→ its term) or another node is the leader, serves, and proves it is alive
    /// by an AppendEntries (a heartbeat comes every `--heartbeat-interval`) received after the
    /// call began (→ None: redirect there). None at the deadline too; the caller then answers
    /// with whatever leader it knows.
    ///
    /// Right after a leader dies its followers still name it, and an agent whose stream broke
    /// asks within milliseconds: the AppendEntries after the call began tells the dead leader
    /// from a live one. A new leader serves only after `ensure_linearizable` and its
    /// `Advertise` committed (`promote`), so a follower holds its waiting agents until that
    /// `Advertise` is applied here ([`crate::raft::Shared::announced`]): sent on at the
    /// leader's first heartbeat, tens of thousands of agents would arrive before the leader
    /// serves, and answering them all would take the CPU both need for those two quorum
    /// rounds (seen at 10,000 scale sets × 5: a follower's acks of the new leader's appends
    /// came 150 ms late three times in a row). A follower that missed the announcement (it
    /// restarted, or caught up by snapshot) sends agents on once it has followed the leader
    /// for `--election-timeout-max`.
    pub async fn await_leader(&self, wait: Duration) -> Option<u64> {
        if wait.is_zero() {
            return self.serving_term();
        }
        let since = Instant::now();
        let deadline = tokio::time::Instant::from_std(since) + wait.min(MAX_AWAIT_LEADER);
        let grace = self.cfg.election_max;
        let mut serving = self.serving.subscribe();
        let mut announced = self.shared.announced.subscribe();
        // Woken by this node's promotion, an applied announcement, and (only once the leader
        // serves, or while no leader is followed yet) the AppendEntries of a leader; not by
        // every heartbeat or metrics change: after a leader change tens of thousands of agents
        // may wait here.
        loop {
            // Registered before the checks, so a heartbeat between them is not missed.
            let heard = self.contacts.leader_heard.notified();
            tokio::pin!(heard);
            heard.as_mut().enable();
            let news = *announced.borrow_and_update();
            if let Some(term) = self.serving_term() {
                return Some(term);
            }
            let (leader, term) = {
                let m = self.raft.metrics();
                let m = m.borrow();
                (m.current_leader, m.current_term)
            };
            // Wait for a heartbeat (the leader serves, or none is followed yet), or until the
            // leader followed has had `grace` to announce itself.
            let mut listen = true;
            let mut wake = deadline;
            if let Some(l) = leader.filter(|l| *l != self.id) {
                let following = self.contacts.following_since(l, term);
                if news == Some((l, term)) || following.is_some_and(|at| at.elapsed() >= grace) {
                    if self.contacts.heard_since(l, since) {
                        return None;
                    }
                } else if let Some(at) = following {
                    listen = false;
                    wake = wake.min(tokio::time::Instant::from_std(at + grace));
                }
            }
            tokio::select! {
                _ = &mut heard, if listen => {}
                r = serving.changed() => if r.is_err() { return None },
                r = announced.changed() => if r.is_err() { return None },
                _ = tokio::time::sleep_until(wake) => if tokio::time::Instant::now() >= deadline { return None },
            }
        }
    }

    /// UNAVAILABLE naming the leader in metadata, so clients can follow it.
    pub fn not_leader(&self) -> tonic::Status {
        let hint = self.leader_hint().filter(|(id, _)| *id != self.id);
        let mut st = tonic::Status::unavailable(match &hint {
            Some((id, addr)) => {
                format!("node {} is not the serving leader; the leader is node {id} at {addr}", self.id)
            }
            None => format!("node {} is not the serving leader and knows no leader yet", self.id),
        });
        if let Some((id, addr)) = hint {
            arcfed_proto::leader::set_leader_hint(&mut st, &addr, Some(id));
        }
        arcfed_proto::leader::mark_not_leader(&mut st, self.id);
        st
    }

    /// Proposes a command with the leader's wall-clock timestamp and waits for its outcome.
    /// It goes through the batcher ([`batch_proposals`]): proposals that queue while earlier
    /// entries are written share the next entry.
    pub async fn propose(&self, cmd: Command) -> Result<Applied, ProposeError> {
        let stopped = || ProposeError::Raft("the proposer stopped".into());
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.proposals.send((cmd, tx)).await.is_err() {
            return Err(stopped());
        }
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// Writes one batch: a lone command as itself, several as one [`Command::Batch`] whose
    /// outcomes go back to their callers in order.
    async fn write_batch(&self, mut batch: Vec<Proposal>) {
        if batch.len() == 1 {
            let Some((cmd, tx)) = batch.pop() else { return };
            let _ = tx.send(self.write(cmd).await);
            return;
        }
        let (cmds, txs): (Vec<Command>, Vec<_>) = batch.into_iter().unzip();
        let n = cmds.len();
        self.metrics.batched.inc_by(n as u64);
        match self.write(Command::Batch(cmds)).await {
            Ok(Applied { outcome: crate::core::Outcome::Batch(all), .. }) if all.len() == n => {
                for (tx, a) in txs.into_iter().zip(all) {
                    let _ = tx.send(Ok(a));
                }
            }
            Ok(other) => {
                let why = format!("a batch of {n} commands was answered with {:?}", other.outcome);
                for tx in txs {
                    let _ = tx.send(Err(ProposeError::Raft(why.clone().into())));
                }
            }
            Err(e) => {
                let not_leader = matches!(e, ProposeError::NotLeader);
                let why = e.to_string();
                for tx in txs {
                    let _ = tx.send(Err(if not_leader {
                        ProposeError::NotLeader
                    } else {
                        ProposeError::Raft(why.clone().into())
                    }));
                }
            }
        }
    }

    /// One `client_write` with the leader's wall-clock timestamp.
    async fn write(&self, cmd: Command) -> Result<Applied, ProposeError> {
        let name = cmd.name();
        let req = Request { ts_ms: clock::wall_ms(), cmd };
        match self.raft.client_write(req).await {
            Ok(resp) => Ok(resp.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(ProposeError::NotLeader),
            Err(e) => {
                self.metrics.proposal_errors.inc();
                warn!(command = name, error = %e, "proposal failed");
                Err(ProposeError::Raft(Box::new(e)))
            }
        }
    }
}

/// A proposal waiting for the batcher, with where its outcome goes.
type Proposal = (Command, tokio::sync::oneshot::Sender<Result<Applied, ProposeError>>);

/// Commands packed into one log entry at most (a Join is ~300 bytes of JSON: 512 of them
/// stay far below the gRPC message limit between voters).
const MAX_BATCH: usize = 512;
/// Log entries per AppendEntries RPC (see `start`).
const MAX_APPEND_ENTRIES: u64 = 64;
/// The longest an agent's attach waits on a node that knows no live leader, whatever the
/// agent asks for: a few LAN or one WAN election.
const MAX_AWAIT_LEADER: Duration = Duration::from_secs(5);
/// Entries the batcher keeps in flight: openraft writes them one after another, so a second
/// one waiting lets the next batch grow while the first is written and replicated.
const BATCHES_IN_FLIGHT: usize = 2;

/// Group commit. openraft 0.9 writes (fsyncs) and replicates each `client_write` on its own,
/// so a burst of N proposals costs N fsyncs in a row. Here every proposal that queued while
/// earlier entries were being written goes into the next entry as one [`Command::Batch`]:
/// one fsync, one replication round, each command with its own outcome.
async fn batch_proposals(ctx: std::sync::Weak<Ctx>, mut rx: tokio::sync::mpsc::Receiver<Proposal>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        // What queued while waiting for a slot joins this entry.
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let Some(ctx) = ctx.upgrade() else { return };
        tokio::spawn(async move {
            ctx.write_batch(batch).await;
            drop(slot);
        });
    }
}

/// HTTP/2 streams one connection may have open (see `run`).
const MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// Streams reset by the client before the server accepted them, per connection.
const MAX_PENDING_RESETS: usize = 32;

/// Handles of a running node.
pub struct Node {
    pub ctx: Arc<Ctx>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Opens the store, starts Raft and every service, and runs until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    grpc: tokio::net::TcpListener,
    http_listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let tls = TlsSource::load(cfg.tls.clone())?;
    let own = crate::tls::Identity { role: Role::Coordinator, name: cfg.node_id.to_string() };
    if tls.current().identity() != &own {
        return Err(Error::WrongIdentity { found: tls.current().identity().to_string(), node: cfg.node_id });
    }
    let node = start(cfg, tls.clone(), http_listener).await?;
    // Renewed certificate files are served to new connections without a restart.
    let reload = tls.watch(tls_reload::RELOAD_EVERY);
    let ctx = node.ctx.clone();

    let (stop_tx, stop_rx) = watch::channel(false);
    let peer = RaftServiceServer::new(PeerService {
        raft: ctx.raft.clone(),
        contacts: ctx.contacts.clone(),
        me: ctx.id,
        timing: ctx.election_timing(),
        hold: Duration::from_millis(ctx.cfg.lease.ttl_ms),
    })
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE);
    // An agent's or an operator's message is small (a Join is well under 4 KiB): anything
    // larger is refused before it is decoded, so it cannot reach memory or the log. Status
    // answers may be large (many groups), so only what comes in is bounded.
    let agent_svc =
        AgentServiceServer::new(agent::AgentSvc { ctx: ctx.clone() }).max_decoding_message_size(MAX_CLIENT_MESSAGE);
    let admin_svc = AdminServiceServer::new(admin::AdminSvc { ctx: ctx.clone() })
        .max_decoding_message_size(MAX_CLIENT_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let mut stop_for_server = stop_rx.clone();
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        // One agent uses one stream per connection, a peer a handful, arcfedctl a few: a
        // connection asking for hundreds is hostile. Rapid resets (CVE-2023-44487) are
        // bounded by hyper's pending-reset limit.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .add_service(InterceptedService::new(peer, require_role(Role::Coordinator)))
        .add_service(InterceptedService::new(agent_svc, require_role(Role::Agent)))
        .add_service(InterceptedService::new(admin_svc, require_role(Role::Admin)))
        .serve_with_incoming_shutdown(tls_reload::incoming(grpc, tls), async move {
            let _ = stop_for_server.wait_for(|s| *s).await;
        });
    let server = tokio::spawn(server);

    shutdown.await;
    info!("shutting down: closing agent streams, stopping Raft");
    // Stop serving first so agents move to another leader at once.
    ctx.serving.send_replace(None);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    if let Err(e) = ctx.raft.shutdown().await {
        warn!(error = %e, "raft shutdown");
    }
    for t in node.tasks {
        t.abort();
    }
    reload.abort();
    info!("stopped");
    Ok(())
}

/// Starts Raft, the leadership tracker, the lessor loop and the admin HTTP server.
pub async fn start(cfg: Config, tls: Arc<TlsSource>, http_listener: tokio::net::TcpListener) -> Result<Node, Error> {
    let shared = Shared::new();
    let (log, sm) = store::open(&cfg.data_dir, shared.clone()).await?;
    let raft_cfg = openraft::Config {
        cluster_name: "arcfed".into(),
        heartbeat_interval: cfg.heartbeat.as_millis() as u64,
        election_timeout_min: cfg.election_min.as_millis() as u64,
        election_timeout_max: cfg.election_max.as_millis() as u64,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
        install_snapshot_timeout: 5_000,
        // A snapshot larger than one chunk is sent as several InstallSnapshot RPCs (openraft's
        // chunked transport), so a lagging follower of a big quorum catches up.
        snapshot_max_chunk_size: cfg.snapshot_chunk_size,
        max_in_snapshot_log_to_keep: cfg.snapshot_keep_log,
        // Entries per AppendEntries (openraft's default is 300). A new leader knows no
        // follower's log and binary-searches it with full payloads, and retries a dead voter
        // every few hundred ms, each time reading, decoding and encoding a whole payload of
        // group-commit batches (up to 512 commands each): at 10,000 scale sets × 5 that was
        // ~11 % of the new leader's CPU while 50,000 agents re-attached. 64 entries per round
        // trip still outpace the leader's own entry rate (one entry per fsync) on WAN RTTs.
        max_payload_entries: MAX_APPEND_ENTRIES,
        // With `--elections coordinator`, `raft::election::drive` decides when this node
        // stands, not openraft's timer.
        enable_elect: cfg.elections == crate::config::Elections::Openraft,
        ..Default::default()
    }
    .validate()
    .map_err(|e| Error::Raft(format!("config: {e}")))?;
    let contacts = Arc::new(PeerContacts::default());
    let network = PeerNetwork {
        contacts: contacts.clone(),
        overrides: Arc::new(
            cfg.peers.iter().filter(|(id, _)| **id != cfg.node_id).map(|(k, v)| (*k, v.clone())).collect(),
        ),
        tls: tls.clone(),
        channels: Default::default(),
        retry: (cfg.heartbeat, cfg.election_min / 2),
    };
    // The election driver asks peers for pre-votes over the same channels.
    let elections_net = network.clone();
    let raft =
        Raft::new(cfg.node_id, Arc::new(raft_cfg), network, log, sm).await.map_err(|e| Error::Raft(e.to_string()))?;

    // The lowest id bootstraps an empty quorum; the others wait to be contacted.
    let lowest = cfg.peers.keys().next().copied();
    if lowest == Some(cfg.node_id) && !raft.is_initialized().await.map_err(|e| Error::Raft(e.to_string()))? {
        let members: BTreeMap<NodeId, BasicNode> =
            cfg.peers.iter().map(|(id, addr)| (*id, BasicNode { addr: addr.clone() })).collect();
        info!(voters = ?members.keys().collect::<Vec<_>>(), "bootstrapping a new quorum");
        if let Err(e) = raft.initialize(members).await {
            warn!(error = %e, "initialize (already initialized?)");
        }
    }

    let (serving, _) = watch::channel(None);
    let (proposals, proposal_rx) = tokio::sync::mpsc::channel(4 * MAX_BATCH);
    let ctx = Arc::new(Ctx {
        id: cfg.node_id,
        lessor: Mutex::new(LeaseTable::new(cfg.lease)),
        cfg,
        raft,
        shared,
        serving,
        quorum: Mutex::new(QuorumSeen { at: Instant::now(), millis: None }),
        metrics: metrics::Metrics::new(),
        contacts,
        holderless_since: Mutex::new(HashMap::new()),
        streams: Mutex::new(HashMap::new()),
        bus: GroupBus::default(),
        grant_wake: tokio::sync::Notify::new(),
        proposals,
        tls,
        adopts_waiting: Mutex::new(BTreeMap::new()),
        streams_per_cluster: Mutex::new(HashMap::new()),
    });
    let timing = ctx.election_timing();
    let mut tasks = vec![
        tokio::spawn(batch_proposals(Arc::downgrade(&ctx), proposal_rx)),
        tokio::spawn(relay_changes(ctx.clone())),
        tokio::spawn(track_leadership(ctx.clone())),
        tokio::spawn(lessor_loop(ctx.clone())),
        tokio::spawn(http::serve(ctx.clone(), http_listener)),
    ];
    if ctx.cfg.elections == crate::config::Elections::Coordinator {
        let counters = crate::raft::election::ElectionCounters {
            stood: ctx.metrics.elections_stood.clone(),
            prevote_lost: ctx.metrics.prevotes_lost.clone(),
        };
        tasks.push(tokio::spawn(crate::raft::election::drive(
            ctx.raft.clone(),
            ctx.id,
            ctx.contacts.clone(),
            elections_net,
            timing,
            counters,
        )));
    }
    Ok(Node { ctx, tasks })
}

/// Follows Raft metrics: records quorum contact, and promotes this node to a *serving*
/// leader only after `ensure_linearizable` succeeded in its term (so every earlier
/// `Expire` is applied), then resets every lease deadline (etcd's promote).
async fn track_leadership(ctx: Arc<Ctx>) {
    let mut rx = ctx.raft.metrics();
    let mut promoting: Option<(u64, tokio::task::JoinHandle<()>)> = None;
    loop {
        let m = rx.borrow_and_update().clone();
        {
            let mut q = lock(&ctx.quorum);
            *q = QuorumSeen {
                at: Instant::now(),
                millis: if m.state == ServerState::Leader { m.millis_since_quorum_ack } else { None },
            };
        }
        let leads = m.state == ServerState::Leader && m.current_leader == Some(ctx.id);
        let term = m.current_term;
        if leads {
            let already = ctx.serving_term() == Some(term)
                || promoting.as_ref().is_some_and(|(t, h)| *t == term && !h.is_finished());
            if !already {
                if let Some((_, h)) = promoting.take() {
                    h.abort();
                }
                // Only a change wakes the receivers: every agent waiting in `await_leader`
                // holds one (25,000 per voter after a leader dies at 10,000 × 5).
                ctx.serving.send_if_modified(|s| s.take().is_some());
                promoting = Some((term, tokio::spawn(promote(ctx.clone(), term))));
            }
        } else {
            if let Some((_, h)) = promoting.take() {
                h.abort();
            }
            if ctx.serving_term().is_some() {
                info!(term, leader = ?m.current_leader, "no longer the leader: closing agent streams");
                // Under the lessor lock, so no keepalive of the old term is judged after this.
                let mut l = ctx.lessor();
                ctx.serving.send_replace(None);
                l.clear();
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn promote(ctx: Arc<Ctx>, term: u64) {
    loop {
        match ctx.raft.ensure_linearizable().await {
            Ok(_) => break,
            Err(e) => {
                warn!(term, error = %e, "ensure_linearizable failed; not serving yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let advertise = Command::Advertise { node: ctx.id, addr: ctx.cfg.advertise.clone() };
    while let Err(e) = ctx.propose(advertise.clone()).await {
        warn!(term, error = %e, "advertise failed; not serving yet");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let now = ctx.now();
    let (members, groups): (Vec<_>, Vec<_>) = ctx.shared.read(|s| {
        (
            s.members
                .values()
                .filter(|m| m.status.has_lease())
                .map(|m| (m.id.clone(), m.epoch, m.status == crate::core::MemberStatus::Silent))
                .collect(),
            s.groups.keys().cloned().collect(),
        )
    });
    {
        let mut l = ctx.lessor();
        l.promote(now, term, members);
        // Fallback holders reattach and Adopt before any Grant (DESIGN §5.11).
        l.hold_grants(now, groups);
    }
    lock(&ctx.holderless_since).clear();
    ctx.serving.send_replace(Some(term));
    info!(term, node = ctx.id, "serving as leader");
}

/// Tick period of the lessor.
const TICK: Duration = Duration::from_millis(50);
/// Timer lateness below this is jitter, not a stall.
const LATE_SLACK_MS: u64 = 20;

/// The leader's lease loop: expiries, silences and overdue handovers go through the log,
/// then holderless groups get a Grant. Between ticks, [`Ctx::grant_wake`] runs the Grant
/// pass alone, so a group that became grantable is granted without waiting for the tick.
async fn lessor_loop(ctx: Arc<Ctx>) {
    let mut last_gc = Instant::now();
    let mut sweep = Sweep::default();
    loop {
        // `expected` is taken right before sleeping, so the time spent proposing below is
        // not mistaken for timer lateness; wakes for grants do not move the tick. The tick
        // comes sooner when a lease falls due before it (`LeaseTable::next_due`): a dead
        // holder is expired at its deadline, not up to one TICK after. A due time already
        // past (an Expire to retry after a failed proposal) keeps the fixed TICK.
        let start = ctx.now();
        let wait = match ctx.lessor().next_due() {
            Some(due) if due > start => Duration::from_millis(due - start).min(TICK),
            _ => TICK,
        };
        let mut expected = start + wait.as_millis() as u64;
        let next_tick = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next_tick) => break,
                _ = ctx.grant_wake.notified() => {
                    if ctx.serving_term().is_some() {
                        grant_holderless(&ctx, &mut sweep).await;
                        // Time spent waiting for a Grant to commit is not timer lateness:
                        // only a stall past the end of this work extends the deadlines.
                        expected = expected.max(ctx.now());
                    }
                }
            }
        }
        let now = ctx.now();
        if ctx.serving_term().is_none() {
            continue;
        }
        // Let stream tasks that are ready run first, so queued keepalives land before
        // deadlines are judged (the inbox drain).
        tokio::task::yield_now().await;
        let now = ctx.now().max(now);
        // Scheduler jitter below LATE_SLACK counts as on time; beyond it the leader was
        // stalled and every deadline is extended by the whole lateness.
        let expected = if now.saturating_sub(expected) < LATE_SLACK_MS { now } else { expected };
        let out = ctx.lessor().tick(now, expected);
        if out.late_ms > 0 {
            ctx.metrics.lessor_late.inc();
            warn!(late_ms = out.late_ms, "lessor tick fired late; extended every deadline by the lateness");
        }
        if !out.expire.is_empty() {
            info!(members = ?out.expire, "leases passed their deadline: proposing Expire");
            if ctx.propose(Command::Expire { members: out.expire.clone() }).await.is_err() {
                let mut l = ctx.lessor();
                for (m, _) in &out.expire {
                    l.retry_expire(m);
                }
                continue;
            }
        }
        if !out.silent.is_empty() {
            info!(members = ?out.silent, "no stream: proposing MarkSilent");
            let _ = ctx.propose(Command::MarkSilent { members: out.silent.clone() }).await;
        }
        for (g, token) in out.revoke {
            info!(group = %g, token, "handover deadline + TTL passed without Release: revoking");
            // On a failed proposal keep the timer: the next tick retries the Revoke.
            if let Ok(a) = ctx.propose(Command::Revoke { group: g.clone(), token }).await {
                ctx.lessor().handover_done(&g, token);
                if a.outcome.is_rejected() {
                    info!(group = %g, token, "revoke found the token already replaced");
                }
            }
        }
        if last_gc.elapsed() >= ctx.cfg.gc_interval {
            last_gc = Instant::now();
            collect_garbage(&ctx).await;
        }
        grant_holderless(&ctx, &mut sweep).await;
    }
}

/// Proposes a `Collect` when the applied state holds garbage (DESIGN §3): vacant groups, busy
/// runners of departed members, stale-session ids older than `--stale-session-ttl`. `apply`
/// judges the same rules on the entry's timestamp, so every voter removes the same things.
async fn collect_garbage(ctx: &Arc<Ctx>) {
    let policy = ctx.cfg.gc;
    let garbage = ctx.shared.read(|s| s.garbage(s.last_ts_ms.max(clock::wall_ms()), &policy));
    if garbage.is_empty() {
        return;
    }
    info!(
        members = garbage.members,
        groups = garbage.groups.len(),
        busy_runners = garbage.busy_runners.len(),
        stale_sessions = garbage.stale_sessions.len(),
        unstamped = garbage.unstamped,
        "collecting garbage through the log"
    );
    if ctx.propose(Command::Collect(policy)).await.is_ok() {
        // Leader memory of groups that no longer exist.
        ctx.shared.read(|s| lock(&ctx.holderless_since).retain(|g, _| s.groups.contains_key(g)));
    }
}

/// Where the lessor loop's sweep of ended leases stands: the term it serves and the applied
/// index up to which it has checked the changed groups.
#[derive(Default)]
struct Sweep {
    term: Option<u64>,
    index: u64,
}

/// Reads only what changed: handover groups, holderless groups, and the members of groups
/// changed since the last tick (a full pass once per term, or after a snapshot replaced the
/// state). The applied state is read under its lock, never cloned.
async fn grant_holderless(ctx: &Arc<Ctx>, sweep: &mut Sweep) {
    let now = ctx.now();
    let wall = clock::wall_ms();
    {
        let mut l = ctx.lessor();
        // Start timers of handovers the leader has not seen yet; drop finished ones.
        let (current, changed, last_index) = ctx.shared.read(|s| {
            let current: Vec<_> = s
                .handover_groups()
                .filter_map(|g| {
                    g.handover.as_ref().map(|h| (g.key.clone(), h.token, g.token, g.holder.is_some(), h.timeout_ms))
                })
                .collect();
            let full = sweep.term != l.term();
            (current, if full { None } else { s.groups_changed_since(sweep.index) }, s.last_index)
        });
        let timers: Vec<_> = l.handovers().cloned().collect();
        for (g, t) in timers {
            if !current.iter().any(|(k, ht, ..)| *k == g && *ht == t) {
                l.handover_done(&g, t);
            }
        }
        for (key, ht, token, held, timeout) in current {
            if ht == token && held {
                l.handover_seen(&key, token, now, timeout.max(0) as u64);
            }
        }
        // Lease entries of members that no longer hold a lease are dropped. Candidates: the
        // members of groups changed since the last sweep, and members whose entry a Join
        // created since then. An entry whose Join was applied after the state was read
        // (epoch = that Join's log index, above the read's last index) is new, not gone.
        let mut candidates = l.take_joined();
        let gone: Vec<_> = ctx.shared.read(|s| {
            match &changed {
                Some(groups) => {
                    for g in groups {
                        candidates.extend(s.members_of(g).map(|m| m.id.clone()));
                    }
                }
                None => candidates.extend(l.members().map(|(id, _)| id.clone())),
            }
            candidates
                .into_iter()
                .filter(|id| {
                    l.epoch_of(id).is_some_and(|epoch| {
                        epoch <= s.last_index && !s.members.get(id).is_some_and(|m| m.status.has_lease())
                    })
                })
                .collect()
        });
        for id in gone {
            l.remove(&id);
        }
        sweep.term = l.term();
        sweep.index = sweep.index.max(last_index);
    }
    // Pick every holderless group's next holder, then propose the grants together so
    // openraft batches them into few log writes (one fsync each) instead of one per group.
    let picks: Vec<_> = {
        let waiting: BTreeSet<crate::core::GroupKey> = lock(&ctx.adopts_waiting).keys().cloned().collect();
        let l = ctx.lessor();
        ctx.shared.read(|s| {
            let ts = s.last_ts_ms.max(wall);
            let mut since = lock(&ctx.holderless_since);
            // Leader memory of holderless groups only: a group granted (or adopted) since
            // leaves it, so a later vacancy starts a fresh clock.
            since.retain(|g, _| s.groups.get(g).is_some_and(|g| g.holder.is_none()));
            s.holderless_groups()
                .filter_map(|g| {
                    let first = *since.entry(g.clone()).or_insert_with(Instant::now);
                    if l.grant_held(g, now) || waiting.contains(g) {
                        return None;
                    }
                    s.choose_holder(g, ts, &|m| l.is_live(m, now)).map(|m| (g.clone(), m, first))
                })
                .collect()
        })
    };
    let proposals = picks.into_iter().map(|(group, member, since)| async move {
        let r = ctx.propose(Command::Grant { group: group.clone(), member: member.clone() }).await;
        (group, member, since, r)
    });
    for (group, member, since, r) in futures::future::join_all(proposals).await {
        match r {
            Ok(applied) => {
                if let crate::core::Outcome::Granted { token } = applied.outcome {
                    ctx.metrics.grant_latency.observe(since.elapsed().as_secs_f64());
                    lock(&ctx.holderless_since).remove(&group);
                    info!(group = %group, member = %member, token, "granted");
                }
            }
            Err(e) => warn!(group = %group, error = %e, "grant proposal failed"),
        }
    }
}
