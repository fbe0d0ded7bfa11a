//! AgentService: one bidirectional stream per agent process (member).
//!
//! ```text
//!  inbound ──▶ Join (first) ─propose─▶ Joined{epoch}; lessor.on_join
//!          ──▶ Keepalive ─lessor (memory only)─▶ Ack{seq, held} | EXPIRED | (no quorum: nothing)
//!          ──▶ Progress/SessionOpened/Release/Adopt/Leave ─▶ ordered queue ─propose─▶ CommandResult
//!  applied state / effects ──▶ Grant · HandoverRequest · Assignment · RoutedJobEvent · DeleteSessions
//! ```
//! The cluster is the certificate's; a member id owned by another cluster is refused (by
//! `apply`, in log order). Errors become statuses in one place, [`status_of`].

use super::convert::{self, InvalidField};
use super::{Ctx, ProposeError};
use crate::clock;
use crate::core::{Command, Effect, GroupKey, KeepaliveVerdict, MemberId, Outcome, RejectReason};
use crate::tls::Identity;
use arcfed_proto as pb;
use arcfed_proto::agent_message::Msg as In;
use arcfed_proto::coordinator_message::Msg as Out;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

pub struct AgentSvc {
    pub ctx: Arc<Ctx>,
}

/// One message to an agent stream, boxed: a channel allocates its slots 32 at a time, and a
/// slot of a pointer costs 8 bytes where an unboxed message with its status costs ~200. A
/// leader holds one such channel per agent stream (50,000 at 10,000 scale sets × 5).
pub type OutItem = Box<Result<pb::CoordinatorMessage, Status>>;
pub type OutTx = mpsc::Sender<OutItem>;

/// Numbers streams, so a closing stream unregisters only itself.
static NEXT_STREAM: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Why the agent service ends a stream. [`status_of`] is the one place it becomes a
/// `Status`; the error stays attached as the status's source.
#[derive(Debug, thiserror::Error)]
enum AgentError {
    #[error("no verified client identity")]
    Unauthenticated,
    #[error("the first message on a stream must be Join")]
    FirstNotJoin,
    #[error("no Join within {0:?}")]
    JoinTimeout(Duration),
    #[error("empty AgentMessage")]
    EmptyMessage,
    #[error("a stream speaks for one member; open a new stream")]
    OtherMember,
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    #[error("join rejected: {reason}: {detail}")]
    Rejected { reason: RejectReason, detail: String },
    #[error("unexpected join outcome {0:?}")]
    Unexpected(Outcome),
    #[error("join not committed: {0}")]
    Propose(#[from] ProposeError),
}

/// The one mapping of agent-service errors to gRPC statuses (STYLE: errors in layers):
/// not-leader is UNAVAILABLE with the leader hint, bad input INVALID_ARGUMENT naming the
/// field, a member of another cluster PERMISSION_DENIED, a refused Join FAILED_PRECONDITION.
fn status_of(ctx: &Ctx, e: AgentError) -> Status {
    use AgentError as E;
    let msg = e.to_string();
    let mut st = match &e {
        E::Propose(ProposeError::NotLeader) => ctx.not_leader(),
        E::Propose(ProposeError::Raft(_)) => Status::unavailable(msg),
        E::Unauthenticated => Status::unauthenticated(msg),
        E::FirstNotJoin | E::EmptyMessage | E::OtherMember | E::Invalid(_) => Status::invalid_argument(msg),
        E::JoinTimeout(_) => Status::deadline_exceeded(msg),
        E::Rejected { reason: RejectReason::WrongCluster | RejectReason::Policy, .. } => Status::permission_denied(msg),
        E::Rejected { reason: RejectReason::InvalidInput, .. } => Status::invalid_argument(msg),
        E::Rejected { .. } => Status::failed_precondition(msg),
        E::Unexpected(_) => Status::internal(msg),
    };
    st.set_source(Arc::new(e));
    st
}

const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued towards one agent before a sender waits (or a relayed effect is dropped,
/// see [`deliver`]): grants and assignments resync from the state, so a short queue is enough.
const OUT_QUEUE: usize = 64;
/// Agent commands (Progress, SessionOpened, Release, Adopt, Leave) queued for proposal.
const CMD_QUEUE: usize = 32;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentSvc {
    type AttachStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

    async fn attach(&self, req: Request<Streaming<pb::AgentMessage>>) -> Result<Response<Self::AttachStream>, Status> {
        let ident = req
            .extensions()
            .get::<Identity>()
            .cloned()
            .ok_or_else(|| status_of(&self.ctx, AgentError::Unauthenticated))?;
        let term = match self.ctx.serving_term() {
            Some(term) => term,
            // Not serving: an agent that may wait does so until a leader is live (or this node
            // serves), so it is not sent to the dead leader its followers still name.
            None => {
                let wait = arcfed_proto::leader::await_leader(req.metadata());
                match self.ctx.await_leader(wait).await {
                    Some(term) => term,
                    None => return Err(self.ctx.not_leader()),
                }
            }
        };
        let slot = StreamSlot::take(&self.ctx, &ident.name)?;
        let (tx, rx) = mpsc::channel::<OutItem>(OUT_QUEUE);
        let ctx = self.ctx.clone();
        let span = info_span!("member", cluster = %ident.name, term, member = tracing::field::Empty, epoch = tracing::field::Empty);
        let inbound = req.into_inner();
        tokio::spawn(
            async move {
                session(ctx, ident.name, term, inbound, tx).await;
                drop(slot);
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(|m| *m))))
    }
}

/// One open agent stream of a cluster, counted against `--max-streams-per-cluster` until
/// dropped.
struct StreamSlot {
    ctx: Arc<Ctx>,
    cluster: String,
}

impl StreamSlot {
    fn take(ctx: &Arc<Ctx>, cluster: &str) -> Result<StreamSlot, Status> {
        let mut m = lock_map(&ctx.streams_per_cluster);
        let n = m.entry(cluster.to_string()).or_default();
        if *n >= ctx.cfg.max_streams_per_cluster {
            warn!(cluster, open = *n, "stream refused: --max-streams-per-cluster reached");
            return Err(Status::resource_exhausted(format!(
                "cluster {cluster} has {} agent streams open on this voter, the most --max-streams-per-cluster allows",
                *n
            )));
        }
        *n += 1;
        Ok(StreamSlot { ctx: ctx.clone(), cluster: cluster.to_string() })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut m = lock_map(&self.ctx.streams_per_cluster);
        if let Some(n) = m.get_mut(&self.cluster) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.cluster);
            }
        }
    }
}

fn out(msg: Out) -> OutItem {
    Box::new(Ok(pb::CoordinatorMessage { msg: Some(msg) }))
}

/// A status that ends the stream.
fn fail(st: Status) -> OutItem {
    Box::new(Err(st))
}

/// The member this stream speaks for, once joined.
#[derive(Clone)]
struct Joined {
    member: MemberId,
    group: GroupKey,
    epoch: u64,
}

async fn session(ctx: Arc<Ctx>, cluster: String, term: u64, mut inbound: Streaming<pb::AgentMessage>, tx: OutTx) {
    ctx.metrics.streams_open.inc();
    let first = match tokio::time::timeout(JOIN_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(pb::AgentMessage { msg: Some(In::Join(j)) }))) => j,
        Ok(Ok(_)) => {
            let _ = tx.send(fail(status_of(&ctx, AgentError::FirstNotJoin))).await;
            ctx.metrics.streams_open.dec();
            return;
        }
        Ok(Err(e)) => {
            debug!(error = %e, "stream failed before Join");
            ctx.metrics.streams_open.dec();
            return;
        }
        Err(_) => {
            let _ = tx.send(fail(status_of(&ctx, AgentError::JoinTimeout(JOIN_TIMEOUT)))).await;
            ctx.metrics.streams_open.dec();
            return;
        }
    };
    let Some(mut joined) = Box::pin(join(&ctx, &cluster, term, first, &tx)).await else {
        ctx.metrics.streams_open.dec();
        return;
    };
    tracing::Span::current().record("member", tracing::field::display(&joined.member));
    tracing::Span::current().record("epoch", joined.epoch);
    let stream_id = NEXT_STREAM.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ctx.streams().insert(joined.member.clone(), (stream_id, tx.clone()));

    // One task per stream: grants and assignments are pushed from this loop, and the command
    // task starts only when the member sends its first command (most members are standbys
    // that never do). A leader holds 50,000 of these at 10,000 scale sets × 5 clusters.
    let mut commands: Option<Commands> = None;
    let mut push = Push::new(&ctx, &joined.group);
    let mut serving = ctx.serving.subscribe();
    let mut pushing = true;

    'stream: loop {
        if pushing {
            pushing = false;
            for m in push.pending(&ctx, &joined) {
                if tx.send(out(m)).await.is_err() {
                    break 'stream;
                }
            }
        }
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(pb::AgentMessage { msg: Some(In::Keepalive(k)) })) => keepalive(&ctx, term, &joined, k, &tx).await,
                Ok(Some(pb::AgentMessage { msg: Some(In::Join(j)) })) => match Box::pin(join(&ctx, &cluster, term, j, &tx)).await {
                    Some(j) if j.member == joined.member => {
                        joined = j;
                        tracing::Span::current().record("epoch", joined.epoch);
                        if let Some(c) = &commands {
                            let _ = c.who.send(joined.clone());
                        }
                        pushing = true;
                    }
                    Some(_) => {
                        let _ = tx.send(fail(status_of(&ctx, AgentError::OtherMember))).await;
                        break;
                    }
                    None => break,
                },
                Ok(Some(m @ pb::AgentMessage { msg: Some(_) })) => {
                    let c = commands.get_or_insert_with(|| Commands::start(&ctx, &joined, &tx));
                    if c.queue.send(Box::new(m)).await.is_err() {
                        break;
                    }
                }
                Ok(Some(pb::AgentMessage { msg: None })) => {
                    let _ = tx.send(fail(status_of(&ctx, AgentError::EmptyMessage))).await;
                    break;
                }
                Ok(None) => { debug!("agent closed its stream"); break; }
                Err(e) => { debug!(error = %e, "agent stream failed"); break; }
            },
            r = push.changes.changed() => {
                if r.is_err() {
                    break;
                }
                pushing = true;
            }
            changed = serving.changed() => {
                if changed.is_err() || *serving.borrow() != Some(term) {
                    let _ = tx.send(fail(ctx.not_leader())).await;
                    break;
                }
            }
            _ = tx.closed() => break,
        }
    }
    if let Some(c) = commands {
        c.task.abort();
    }
    // Only the member's current stream speaks for its lease: a resumed lease keeps its epoch,
    // so an older stream of the same member that closes late must not move the deadline.
    let current = {
        let mut streams = ctx.streams();
        let current = streams.get(&joined.member).is_some_and(|(id, _)| *id == stream_id);
        if current {
            streams.remove(&joined.member);
        }
        current
    };
    if current {
        ctx.lessor().on_stream_closed(&joined.member, joined.epoch, term, ctx.now());
    }
    ctx.metrics.streams_open.dec();
    info!("stream closed");
}

/// Proposes a Join and answers Joined; None (after answering the error) if refused.
async fn join(ctx: &Arc<Ctx>, cluster: &str, term: u64, j: pb::Join, tx: &OutTx) -> Option<Joined> {
    match try_join(ctx, cluster, term, j).await {
        Ok((joined, msg)) => {
            let _ = tx.send(out(msg)).await;
            Some(joined)
        }
        Err(e) => {
            if let AgentError::Rejected { reason: RejectReason::WrongCluster | RejectReason::Policy, detail } = &e {
                warn!(cluster, "refused: {detail}");
            }
            let _ = tx.send(fail(status_of(ctx, e))).await;
            None
        }
    }
}

/// Input is checked before the log (`convert::join`); who owns a member id is decided by
/// `apply`, in log order (invariant 6), never by a read made before proposing. A Join that
/// names a lease this leader still holds live re-attaches without a log entry ([`resume`]).
async fn try_join(ctx: &Arc<Ctx>, cluster: &str, term: u64, j: pb::Join) -> Result<(Joined, Out), AgentError> {
    let (resume_epoch, keepalive_seq) = (j.resume_epoch, j.keepalive_seq);
    let spec = convert::join(j, cluster)?;
    let member = spec.member.clone();
    let group = spec.group.clone();
    if resume_epoch != 0
        && let Some(r) = resume(ctx, term, &spec, resume_epoch, keepalive_seq)
    {
        ctx.metrics.resumes.inc();
        debug!(member = %member, epoch = resume_epoch, group = %group, acked = r.ack.is_some(), "re-attached to a live lease (no log entry)");
        if r.ready_now.is_some_and(|ready| ready != spec.github_ready) {
            sync_ready(ctx, &member, spec.github_ready);
        }
        return Ok(joined(ctx, cluster, term, member, group, resume_epoch, r.ack));
    }
    let applied = ctx.propose(Command::Join(spec)).await?;
    match applied.outcome {
        Outcome::Joined { epoch } => {
            ctx.lessor().on_join(&member, epoch, ctx.now());
            // The group may be holderless with this member eligible: grant now, not at the tick.
            ctx.grant_wake.notify_one();
            info!(member = %member, epoch, group = %group, "joined");
            Ok(joined(ctx, cluster, term, member, group, epoch, None))
        }
        Outcome::Rejected { reason, detail } => Err(AgentError::Rejected { reason, detail }),
        other => Err(AgentError::Unexpected(other)),
    }
}

/// Re-attach to a live lease: the applied state must hold the member unchanged under that
/// epoch ([`crate::core::State::resumable`]; a member id never changes cluster while it is in
/// the state, so this read cannot race invariant 6), and this leader's lessor must hold the
/// lease live in the term the stream serves ([`crate::core::LeaseTable::on_resume`]), which
/// renews it as a keepalive would. The state is read under the lessor lock, so an `Expire`
/// proposed in between has already marked the entry.
///
/// The Join then stands for keepalive `keepalive_seq` (0: none) sent with it: with quorum
/// contact it is acked in the same lessor section, listing what an Ack would (DESIGN §4:
/// the renewal happened no earlier than the Join was sent, as for a keepalive).
/// `None`: the Join must go through the log.
fn resume(ctx: &Ctx, term: u64, spec: &crate::core::JoinSpec, epoch: u64, keepalive_seq: u64) -> Option<Resumed> {
    let mut l = ctx.lessor();
    if ctx.serving_term() != Some(term) {
        return None;
    }
    let (now, quorum) = (ctx.now(), ctx.quorum_age_ms());
    let (resumable, pairs, ready_now) = ctx.shared.read(|s| {
        let ok = s.resumable(spec, epoch);
        let pairs: Vec<(GroupKey, u64)> = if ok && keepalive_seq != 0 {
            s.holdings_of(&spec.member).map(|(g, t)| (g.clone(), t)).collect()
        } else {
            Vec::new()
        };
        (ok, pairs, s.members.get(&spec.member).map(|m| m.github_ready))
    });
    if !resumable || !l.on_resume(&spec.member, epoch, term, now) {
        return None;
    }
    if keepalive_seq == 0 {
        return Some(Resumed { ack: None, ready_now });
    }
    ctx.metrics.keepalives.inc();
    if !l.may_ack(quorum) {
        ctx.metrics.acks_withheld.inc();
        return Some(Resumed { ack: None, ready_now });
    }
    let held = listable(&mut l, pairs, now);
    Some(Resumed { ack: Some(ack(ctx, keepalive_seq, held)), ready_now })
}

/// A re-attach to a live lease: the ack of the keepalive the Join stood for, if any, and
/// the member's readiness in the applied state.
struct Resumed {
    ack: Option<pb::Ack>,
    ready_now: Option<bool>,
}

/// Of a member's holdings, those an ack may list (a holder asked to hand over is listed only
/// until the handover deadline), marking them listed. Inside the lessor section that judged
/// the keepalive.
fn listable(l: &mut crate::core::LeaseTable, pairs: Vec<(GroupKey, u64)>, now: u64) -> Vec<pb::HeldGroup> {
    let mut held = Vec::new();
    for (g, t) in pairs {
        if l.may_list(&g, t, now) {
            l.listed(&g, t, now);
            held.push(pb::HeldGroup { group_key: g.0, token: t });
        }
    }
    held
}

fn ack(ctx: &Ctx, seq: u64, held: Vec<pb::HeldGroup>) -> pb::Ack {
    let ttl = ctx.cfg.lease.ttl_ms as i64;
    pb::Ack { seq, held, deadline_unix_ms: clock::wall_ms().saturating_add(ttl) }
}

/// The member reported a different GitHub readiness than the state holds: propose it, and
/// wake the lessor (a ready member may be grantable now).
fn sync_ready(ctx: &Arc<Ctx>, member: &MemberId, ready: bool) {
    let ctx = ctx.clone();
    let member = member.clone();
    tokio::spawn(async move {
        if ctx.propose(Command::SetReady { member, ready }).await.is_ok() {
            ctx.grant_wake.notify_one();
        }
    });
}

fn joined(
    ctx: &Ctx,
    cluster: &str,
    term: u64,
    member: MemberId,
    group: GroupKey,
    epoch: u64,
    ack: Option<pb::Ack>,
) -> (Joined, Out) {
    let cfg = ctx.cfg.lease;
    let msg = Out::Joined(pb::Joined {
        member_id: member.0.clone(),
        epoch,
        group_key: group.0.clone(),
        cluster: cluster.to_string(),
        lease_ttl_ms: cfg.ttl_ms,
        margin_permille: cfg.margin_permille as u32,
        term,
        ack,
    });
    (Joined { member, group, epoch }, msg)
}

/// Keepalives never touch the log: the lessor judges them in memory.
async fn keepalive(ctx: &Arc<Ctx>, term: u64, j: &Joined, k: pb::Keepalive, tx: &OutTx) {
    ctx.metrics.keepalives.inc();
    let now = ctx.now();
    let quorum = ctx.quorum_age_ms();
    // One lessor section judges the keepalive and lists what the ack may carry (the lock is
    // taken by every keepalive, 20,000/s at 10,000 × 5, and by every re-attach after a
    // leader change); the member's readiness is read from the state in the same pass.
    let (verdict, held, ready_now) = {
        let mut l = ctx.lessor();
        // Only a stream of the term this node serves may ack: a stream opened in an earlier
        // term of this node must not ack holdings from a state it no longer serves.
        if ctx.serving_term() != Some(term) {
            return;
        }
        let verdict = l.on_keepalive(&j.member, j.epoch, now, quorum);
        // The member's own holdings, from the state's index: an ack costs what the member
        // holds, not what the quorum holds.
        let (pairs, ready_now) = ctx.shared.read(|s| {
            let pairs = match verdict {
                KeepaliveVerdict::Ack => s.holdings_of(&j.member).map(|(g, t)| (g.clone(), t)).collect(),
                _ => Vec::new(),
            };
            (pairs, s.members.get(&j.member).map(|m| m.github_ready))
        });
        (verdict, listable(&mut l, pairs, now), ready_now)
    };
    match verdict {
        KeepaliveVerdict::Ack => {
            let _ = tx.send(out(Out::Ack(ack(ctx, k.seq, held)))).await;
        }
        KeepaliveVerdict::Expired(why) => {
            ctx.metrics.expired_replies.inc();
            let _ = tx.send(out(Out::Expired(pb::Expired { reason: why.to_string() }))).await;
        }
        KeepaliveVerdict::NoQuorum => {
            ctx.metrics.acks_withheld.inc();
            debug!(quorum_age_ms = ?quorum, "no recent quorum contact: keepalive not acked");
        }
    }
    if ready_now.is_some_and(|r| r != k.github_ready) {
        sync_ready(ctx, &j.member, k.github_ready);
    }
}

/// Agent commands are proposed one at a time, in the order they were sent.
async fn run_commands(
    ctx: Arc<Ctx>,
    who: tokio::sync::watch::Receiver<Joined>,
    mut rx: mpsc::Receiver<Box<pb::AgentMessage>>,
    tx: OutTx,
) {
    while let Some(m) = rx.recv().await {
        let j = who.borrow().clone();
        let (request_id, cmd) = match to_command(&j, *m) {
            Ok(x) => x,
            Err((rid, why)) => {
                let _ = tx.send(out(Out::Result(convert::rejected(rid, format!("invalid_input: {why}"))))).await;
                continue;
            }
        };
        let leave = matches!(cmd, Command::Leave { .. });
        let vacates = leave || matches!(cmd, Command::Release { .. });
        if let Command::Adopt { member, group, .. } = &cmd {
            wait_for_absent_holder(&ctx, group, member).await;
        }
        match ctx.propose(cmd).await {
            Ok(a) => {
                if leave {
                    ctx.lessor().remove(&j.member);
                }
                if vacates {
                    // A released or departed holder leaves its group grantable now.
                    ctx.grant_wake.notify_one();
                }
                let _ = tx.send(out(Out::Result(convert::result(request_id, &a.outcome)))).await;
            }
            Err(ProposeError::NotLeader) => {
                let _ = tx.send(fail(ctx.not_leader())).await;
                return;
            }
            Err(e) => {
                let _ = tx.send(out(Out::Result(convert::rejected(request_id, format!("not_committed: {e}"))))).await;
            }
        }
    }
}

/// The safety review's M4 (DESIGN §5.11): a fallback holder's Adopt meets a group whose
/// holder has not been heard by this leader since its promotion: the pre-loss holder may have
/// died during the quorum loss. Refusing at once would have the fallback holder forget its
/// session and let a Grant replace it when that holder's lease ends. Instead the Adopt waits
/// until the holder is heard (then it is refused, as before: the holder is alive) or its lease
/// ends (then it is adopted, and no Grant is made for the group while it waits). Bounded by
/// the grant hold plus a second.
pub(crate) async fn wait_for_absent_holder(ctx: &Ctx, group: &GroupKey, member: &MemberId) {
    let absent = |ctx: &Ctx| -> bool {
        let holder = ctx.shared.read(|s| s.groups.get(group).and_then(|g| g.holder.clone()));
        holder
            .filter(|h| h != member)
            .is_some_and(|h| ctx.lessor().entry(&h).is_none_or(|e| e.last_keepalive.is_none()))
    };
    if !absent(ctx) {
        return;
    }
    let limit =
        tokio::time::Instant::now() + Duration::from_millis(ctx.lessor().grant_hold_ms()) + Duration::from_secs(1);
    *lock_map(&ctx.adopts_waiting).entry(group.clone()).or_default() += 1;
    info!(%group, %member, "Adopt waits: the holder has not been heard since this leader's promotion");
    while absent(ctx) && tokio::time::Instant::now() < limit {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut w = lock_map(&ctx.adopts_waiting);
    if let Some(n) = w.get_mut(group) {
        *n -= 1;
        if *n == 0 {
            w.remove(group);
        }
    }
}

fn lock_map<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn to_command(j: &Joined, m: pb::AgentMessage) -> Result<(u64, Command), (u64, String)> {
    let member = j.member.clone();
    let group = j.group.clone();
    Ok(match m.msg {
        Some(In::Progress(p)) => {
            let events = p
                .events
                .into_iter()
                .map(convert::job_event)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| (p.request_id, e.to_string()))?;
            (
                p.request_id,
                Command::Progress {
                    member,
                    group,
                    token: p.token,
                    message_id: p.message_id,
                    statistics: convert::stats(p.statistics),
                    events,
                },
            )
        }
        Some(In::SessionOpened(s)) => (
            session_ids(s.request_id, std::slice::from_ref(&s.session_id))?,
            Command::SessionOpened {
                member,
                group,
                token: s.token,
                session_id: s.session_id,
                statistics: convert::stats(s.statistics),
            },
        ),
        Some(In::Release(r)) => (
            session_ids(r.request_id, &r.deleted)?,
            Command::Release {
                member,
                group,
                token: r.token,
                deleted: r.deleted,
                reason: convert::release_reason(r.reason),
            },
        ),
        Some(In::Adopt(a)) => (
            session_ids(a.request_id, std::slice::from_ref(&a.session_id))?,
            Command::Adopt { member, group, session_id: a.session_id, statistics: convert::stats(a.statistics) },
        ),
        Some(In::Leave(l)) => (l.request_id, Command::Leave { member }),
        _ => return Err((0, "unexpected message".into())),
    })
}

/// Most session ids one Release may report deleted (a holder reports one round of stale ids).
const MAX_IDS_PER_COMMAND: usize = 64;

/// Session ids enter the replicated state only in GitHub's shape (a UUID): another cluster's
/// holder later pastes them into `DELETE …/sessions/{id}`. Returns `request_id` when all pass.
fn session_ids(request_id: u64, ids: &[String]) -> Result<u64, (u64, String)> {
    if ids.len() > MAX_IDS_PER_COMMAND {
        return Err((
            request_id,
            format!("invalid_argument: {} session ids (at most {MAX_IDS_PER_COMMAND})", ids.len()),
        ));
    }
    match ids.iter().find(|id| !arcfed_core::github::is_session_id(id)) {
        Some(bad) => {
            let shown: String = bad.chars().take(64).collect();
            Err((request_id, format!("invalid_argument: session id {shown:?} is not a UUID")))
        }
        None => Ok(request_id),
    }
}

/// The member's command task, started at its first command: commands are proposed one at a
/// time, in the order they were sent, without holding up keepalives.
struct Commands {
    queue: mpsc::Sender<Box<pb::AgentMessage>>,
    who: tokio::sync::watch::Sender<Joined>,
    task: tokio::task::JoinHandle<()>,
}

impl Commands {
    fn start(ctx: &Arc<Ctx>, joined: &Joined, tx: &OutTx) -> Commands {
        let (queue, rx) = mpsc::channel::<Box<pb::AgentMessage>>(CMD_QUEUE);
        let (who, who_rx) = tokio::sync::watch::channel(joined.clone());
        let task = tokio::spawn(run_commands(ctx.clone(), who_rx, rx, tx.clone()).in_current_span());
        Commands { queue, who, task }
    }
}

/// What the applied state says about this member, pushed when it changes: grants, handover
/// requests and assignments. The stream wakes only when its own group changed (the
/// per-group bus of [`super::relay_changes`]), so a change costs the streams of that group,
/// not every stream; routed job events and sessions to delete reach the stream through the
/// same relay.
struct Push {
    group: GroupKey,
    changes: tokio::sync::watch::Receiver<u64>,
    sent_grant: Option<(GroupKey, u64)>,
    sent_handover: Option<u64>,
    sent_revision: Option<(u64, u64)>,
    sent_stale: Option<Vec<String>>,
}

impl Push {
    fn new(ctx: &Ctx, group: &GroupKey) -> Push {
        Push {
            group: group.clone(),
            changes: ctx.bus.subscribe(group),
            sent_grant: None,
            sent_handover: None,
            sent_revision: None,
            sent_stale: None,
        }
    }

    /// The messages not sent yet for the member's current view of the state.
    fn pending(&mut self, ctx: &Ctx, j: &Joined) -> Vec<Out> {
        if j.group != self.group {
            self.group = j.group.clone();
            self.changes = ctx.bus.subscribe(&self.group);
        }
        self.changes.borrow_and_update();
        ctx.shared.read(|s| {
            let mut msgs = Vec::new();
            let (Some(m), Some(g)) = (s.members.get(&j.member), s.groups.get(&j.group)) else { return msgs };
            if g.holder.as_ref() == Some(&j.member) && self.sent_grant != Some((g.key.clone(), g.token)) {
                self.sent_grant = Some((g.key.clone(), g.token));
                msgs.push(Out::Grant(pb::Grant {
                    group_key: g.key.0.clone(),
                    token: g.token,
                    stale_sessions: g.stale_sessions.iter().cloned().collect(),
                    last_acked_message_id: g.last_acked_message_id,
                    ack: None,
                    session_id: g.session_id.clone().unwrap_or_default(),
                }));
            }
            if let Some(h) = &g.handover
                && h.from == j.member
                && h.token == g.token
                && self.sent_handover != Some(h.token)
            {
                self.sent_handover = Some(h.token);
                msgs.push(Out::Handover(pb::HandoverRequest {
                    group_key: g.key.0.clone(),
                    token: h.token,
                    deadline_unix_ms: h.deadline_ms,
                    to_member: h.to.as_ref().map(|t| t.0.clone()).unwrap_or_default(),
                }));
            }
            // Stale ids change without a new revision: a changed list is pushed again too.
            let stale_changed = self.sent_stale.as_ref().is_none_or(|v| !v.iter().eq(g.stale_sessions.iter()));
            if self.sent_revision != Some((j.epoch, g.revision)) || stale_changed {
                self.sent_revision = Some((j.epoch, g.revision));
                self.sent_stale = Some(g.stale_sessions.iter().cloned().collect());
                msgs.push(Out::Assignment(pb::Assignment {
                    group_key: g.key.0.clone(),
                    revision: g.revision,
                    runners: g.assignments.get(&j.member).copied().unwrap_or(0),
                    dirty: g.dirty.contains(&j.member),
                    force_zero_patch: m.draining || !m.status.has_lease(),
                    max_capacity: s.max_capacity(&g.key),
                    stale_sessions: g.stale_sessions.iter().cloned().collect(),
                }));
            }
            msgs
        })
    }
}

/// Delivers one applied effect to the stream it concerns (the relay calls this once per
/// effect, not once per stream): a routed job event to its member, sessions to delete to
/// the group's current holder of that token. A stream whose queue is full loses it, as a
/// lagging receiver did: grants and assignments resync from the state, and the member's
/// `dirty` flag in the next Assignment says a job event concerned it.
pub(super) fn deliver(ctx: &Ctx, effect: Effect) {
    let (member, msg) = match effect {
        Effect::JobEvent { member, group, event } => (
            member,
            Out::JobEvent(pb::RoutedJobEvent { group_key: group.0, event: Some(convert::job_event_pb(&event)) }),
        ),
        Effect::DeleteSessions { group, token, session_ids } => {
            let holder =
                ctx.shared.read(|s| s.groups.get(&group).filter(|g| g.token == token).and_then(|g| g.holder.clone()));
            let Some(holder) = holder else { return };
            (holder, Out::DeleteSessions(pb::DeleteSessions { group_key: group.0, token, session_ids }))
        }
    };
    let tx = ctx.streams().get(&member).map(|(_, tx)| tx.clone());
    if let Some(tx) = tx
        && let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(out(msg))
    {
        warn!(member = %member, "stream queue full: an effect for this member is lost (state resyncs)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined() -> Joined {
        Joined { member: MemberId("m1".into()), group: GroupKey("https://github.example/org#1".into()), epoch: 1 }
    }

    #[test]
    fn session_ids_of_any_shape_but_a_uuid_never_reach_the_log() {
        let bad = |id: &str| pb::AgentMessage {
            msg: Some(In::Adopt(pb::Adopt { request_id: 7, session_id: id.into(), ..Default::default() })),
        };
        let err = to_command(&joined(), bad("../../2")).expect_err("a path is refused");
        assert_eq!(err.0, 7);
        assert!(err.1.starts_with("invalid_argument") && err.1.contains("../../2"), "{}", err.1);
        assert!(to_command(&joined(), bad("3f1e2d4c-5b6a-4789-9abc-def012345678")).is_ok());
        let opened = pb::AgentMessage {
            msg: Some(In::SessionOpened(pb::SessionOpened {
                request_id: 8,
                token: 1,
                session_id: "x/../y".into(),
                ..Default::default()
            })),
        };
        assert!(to_command(&joined(), opened).is_err());
        let release = |deleted: Vec<String>| pb::AgentMessage {
            msg: Some(In::Release(pb::Release { request_id: 9, token: 1, deleted, ..Default::default() })),
        };
        assert!(to_command(&joined(), release(vec!["../sessions".into()])).is_err());
        let many = vec!["3f1e2d4c-5b6a-4789-9abc-def012345678".to_string(); 65];
        assert!(to_command(&joined(), release(many)).is_err(), "the count is bounded");
    }
}
