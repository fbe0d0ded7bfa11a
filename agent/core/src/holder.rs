//! The holder's session state machine (DESIGN §5.2–§5.9), pure.
//!
//! ```text
//!  Standby ─Grant{T}─▶ Revoke stale ids ─▶ WaitAck (fence (c)) ─▶ Create ─200─▶ Commit ─Accepted─▶ Poll ◀─┐
//!                                            ▲                     │409                              │      │
//!                                            └──── Backoff ◀───────┘                     200: [Acquire] → Progress → Ack
//!  Handover / Shutdown: stop polling → delete our session → Release{T, deleted, reason}
//!  Token lost (EXPIRED, newer token, not listed): drop everything at once → Standby
//! ```
//! One GitHub or coordinator operation is in flight at a time; the driver executes the
//! [`Action`]s and feeds each result back as an [`Input`]. The invariant the property tests
//! check: **every holder-only action is emitted only while the fence allows it** (DESIGN §4),
//! and an in-flight holder-only request is cancelled before the fence ends; a result that
//! arrives after the fence is dropped (a polled message is then neither reported nor acked).
//!
//! In standalone and fallback mode the driver passes [`FenceView::open`]: GitHub's one-session
//! rule is then the only mutex, "commit" records the session id on the agent's own ERS
//! (DESIGN §5.12) and "progress" is decided locally.

use crate::link::FenceView;
use std::collections::BTreeSet;

#[derive(Clone, Debug)]
pub struct HolderConfig {
    /// `ownerName` = `arcfed/<cluster>/<member>/t<token>` (DESIGN §5.3).
    pub cluster: String,
    pub member_id: String,
    /// An in-flight long poll is abandoned this long before the fence ends when acks stop,
    /// so a 200 is not delivered (and, with a per-scale-set cursor, lost) after it.
    pub poll_margin_ms: u64,
    /// Every holder-only request must be able to leave this long before the fence ends: it
    /// is started only while `now + send_margin_ms < fence_end`, and one still in flight at
    /// that instant is dropped (a request not yet on the wire is then never sent). The driver
    /// keeps the HTTP client's connect timeout for holder calls below it, so a request that
    /// needs a new connection is written before the fence ends or not at all.
    pub send_margin_ms: u64,
    /// No successful create or poll for this long, for a local reason → release (§5.9).
    pub holder_stall_ms: u64,
    /// Continuous 409s for this long raise an alert (past GitHub's ~90 s orphan expiry).
    pub conflict_alert_ms: u64,
    /// A fallback holder (quorum lost): its tokens are local, see [`Holder::owner_name`].
    pub fallback: bool,
    pub seed: u64,
}

/// Holder-only GitHub requests (DESIGN §2): only inside the fence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GitHubOp {
    DeleteSession {
        id: String,
    },
    CreateSession {
        owner: String,
    },
    /// Long poll. The driver drops it when `Holder::next_wakeup` passes while it runs: the
    /// deadline moves with every ack, so it is asked again after every event.
    Poll {
        last_message_id: i64,
    },
    /// Acquire the listed JobAvailable jobs of the message just polled.
    Acquire {
        message_id: i64,
    },
    /// A new session's first holder-only request after its commit: acquire whatever jobs the
    /// scale set has available (GHES's `acquirablejobs`). A predecessor may have received
    /// their `JobAvailable` message and died before acquiring; a cursor that never offers that
    /// message again would otherwise leave them queued for good. Best effort.
    AcquireAvailable,
    AckMessage {
        message_id: i64,
    },
}

/// Requests to the coordinator (or, open fence, to the local record).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoordOp {
    /// `SessionOpened{token, id}`, committed before the first poll.
    Commit {
        token: u64,
        session_id: String,
    },
    /// `Progress{token, message id}`: `None` is the idle Progress of a 202.
    Progress {
        token: u64,
        message_id: Option<i64>,
    },
    Release {
        token: u64,
        deleted: Vec<String>,
        reason: ReleaseReason,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseReason {
    StaleRevoked,
    Shutdown,
    Handover,
    Stall,
    /// The coordinator rejected our command for this token: let it go explicitly, so the
    /// group is granted again instead of staying with a holder that no longer acts.
    LostLease,
}

/// What the driver counts in metrics and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    Conflict { foreign: bool },
    RevocationIneffective,
    ConflictAlert,
    SelfFenced,
    LostLease,
    SessionOpened,
    TookOver { token: u64 },
    Released { reason: ReleaseReason },
    StaleTokenRejected,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    GitHub(GitHubOp),
    Coord(CoordOp),
    /// A report whose answer nothing waits for (`Release{STALE_REVOKED}`: the revocation
    /// must not delay the create; if the report is lost, the ids stay in `stale_sessions` and
    /// a later holder's DELETE finds them gone, which counts as done).
    Notify(CoordOp),
    /// Drop the in-flight GitHub request (fence deadline, handover).
    Cancel,
    /// Send a keepalive now (fence (c) needs an ack for one sent after the decision to POST).
    KeepaliveNow,
    /// The session `id` is no longer ours to use (lost lease): forget its URL and token.
    Forget {
        session_id: String,
    },
    Note(Note),
}

/// How a create attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateOutcome {
    Opened {
        session_id: String,
    },
    Conflict {
        foreign: bool,
    },
    /// No session known to exist (4xx other than 409): back off.
    Failed {
        local: bool,
    },
    /// Transport error or 5xx after sending: a session may exist (a possible orphan).
    Ambiguous {
        local: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PollOutcome {
    /// 202: no message within the server's window.
    Empty,
    Message {
        message_id: i64,
        job_available: bool,
    },
    /// The session is gone server-side (refresh 404, 404 on the queue): open another.
    Gone,
    /// An empty 200 or a retryable glitch: poll again.
    Glitch,
    Failed {
        local: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Tick,
    /// A Grant: we hold `token`. `resume`: a session this agent already has open and the
    /// coordinator already knows (an accepted `Adopt` after fallback): poll it instead of
    /// opening another (no session churn when the quorum returns).
    Granted {
        token: u64,
        stale_sessions: Vec<String>,
        last_acked_message_id: i64,
        resume: Option<String>,
    },
    /// The coordinator asks the holder to delete these sessions (stale SessionOpened, Adopt race).
    DeleteSessions {
        token: u64,
        ids: Vec<String>,
    },
    Handover {
        token: u64,
    },
    Shutdown,
    /// Results of the in-flight operation.
    Deleted {
        id: String,
        done: bool,
    },
    Created(CreateOutcome),
    Committed {
        accepted: bool,
    },
    Polled(PollOutcome),
    Acquired,
    /// The result of `AcquireAvailable` (best effort: polling starts either way).
    Swept,
    /// The acquire failed (`local`: a transport, TLS, auth or 5xx reason).
    AcquireFailed {
        local: bool,
    },
    Reported {
        accepted: bool,
        duplicate: bool,
    },
    Acked {
        ok: bool,
        /// A failed ack's cause was this member's (its GitHub path or credentials), not the
        /// fence or the quorum: only then does it count toward the holder-stall rule.
        local: bool,
    },
    ReleaseSent,
    /// The coordinator operation in flight got no answer (stream down, timeout): its outcome
    /// is unknown, so it is sent again later (Commit and Progress are idempotent in `apply`).
    CoordUnavailable,
}

/// What is in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    None,
    /// A GitHub request; `poll` = a long poll, the only one cancelled at the fence deadline.
    GitHub {
        poll: bool,
    },
    Coord,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    Standby,
    /// Deleting the predecessors' sessions, one id at a time (`pending` is this round's list).
    Revoke {
        pending: Vec<String>,
    },
    /// Fence (c): a session is POSTed only after an ack lists (group, token) for a keepalive
    /// sent after the decision, taken at `decided_at` when `after_seq` was the latest keepalive.
    WaitAck {
        decided_at: u64,
        after_seq: u64,
    },
    Create,
    Backoff {
        until: u64,
    },
    Commit {
        session_id: String,
    },
    /// Acquiring the jobs left available before the first poll of a new session.
    Sweep {
        session_id: String,
    },
    Poll {
        session_id: String,
    },
    Acquire {
        session_id: String,
        message_id: i64,
    },
    Report {
        session_id: String,
        message_id: Option<i64>,
    },
    Ack {
        session_id: String,
        message_id: i64,
    },
    /// Deleting our own session before a release.
    Closing {
        session_id: Option<String>,
        reason: ReleaseReason,
    },
    Releasing,
    /// Shut down for good.
    Done,
}

#[derive(Clone, Debug)]
pub struct Holder {
    cfg: HolderConfig,
    pub phase: Phase,
    pub token: Option<u64>,
    op: Op,
    /// Session ids still to delete (stale_sessions of the Grant, DeleteSessions effects).
    stale: BTreeSet<String>,
    /// Deleted and not yet reported to the coordinator.
    deleted: Vec<String>,
    /// Tokens given up: never used again.
    done_tokens: BTreeSet<u64>,
    /// Given-up tokens already released explicitly because acks still listed them.
    released_notified: BTreeSet<u64>,
    /// Whether an ack has listed our token yet (a Grant can arrive before that ack).
    listed: bool,
    last_acked: i64,
    last_message: i64,
    backoff_ms: u64,
    /// Polls and acks that failed wait until then (no hot loop on a persistent error).
    retry_at: u64,
    retry_ms: u64,
    conflict_since: Option<u64>,
    alerted: bool,
    revoked_recently: bool,
    last_success: u64,
    local_failure_since: Option<u64>,
    pending_release: Option<ReleaseReason>,
    /// The coordinator operation in flight (or to resend after `CoordUnavailable`).
    last_coord: Option<CoordOp>,
    /// A stale session whose DELETE failed while polling is tried again only after this, so
    /// polling goes on in between (no hot loop, no starved poll).
    stale_retry_at: u64,
    stale_retry_ms: u64,
    shutdown: bool,
    rng: u64,
}

const BACKOFF_MIN_MS: u64 = 250;
const BACKOFF_MAX_MS: u64 = 5000;
/// With no fresh ack this long after asking, ask again.
const REASK_MS: u64 = 2_000;

impl Holder {
    pub fn new(cfg: HolderConfig, now: u64) -> Holder {
        let rng = cfg.seed | 1;
        Holder {
            cfg,
            phase: Phase::Standby,
            token: None,
            op: Op::None,
            stale: BTreeSet::new(),
            deleted: Vec::new(),
            done_tokens: BTreeSet::new(),
            released_notified: BTreeSet::new(),
            listed: false,
            last_acked: 0,
            last_message: 0,
            backoff_ms: BACKOFF_MIN_MS,
            retry_at: 0,
            retry_ms: BACKOFF_MIN_MS,
            conflict_since: None,
            alerted: false,
            revoked_recently: false,
            last_success: now,
            local_failure_since: None,
            pending_release: None,
            last_coord: None,
            stale_retry_at: 0,
            stale_retry_ms: BACKOFF_MIN_MS,
            shutdown: false,
            rng,
        }
    }

    /// `arcfed/<cluster>/<member>/t<token>`: a 409 then shows whose session it is. A fallback
    /// holder's token is a local counter, not a fencing token: it names its sessions
    /// `…/f<n>` so that nobody (an operator reading a 409, a check of token order) takes it
    /// for one.
    pub fn owner_name(&self, token: u64) -> String {
        let tag = if self.cfg.fallback { 'f' } else { 't' };
        format!("arcfed/{}/{}/{tag}{token}", self.cfg.cluster, self.cfg.member_id)
    }

    /// The session this holder has open, if any.
    pub fn session_id(&self) -> Option<&str> {
        match &self.phase {
            Phase::Commit { session_id }
            | Phase::Sweep { session_id }
            | Phase::Poll { session_id }
            | Phase::Acquire { session_id, .. }
            | Phase::Report { session_id, .. }
            | Phase::Ack { session_id, .. } => Some(session_id),
            Phase::Closing { session_id, .. } => session_id.as_deref(),
            _ => None,
        }
    }

    pub fn is_holding(&self) -> bool {
        !matches!(self.phase, Phase::Standby | Phase::Done)
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    pub fn last_message_id(&self) -> i64 {
        self.last_message
    }

    pub fn in_flight(&self) -> bool {
        self.op != Op::None
    }

    /// When the driver must call `step(Tick)` at the latest (it also steps on every event).
    pub fn next_wakeup(&self, now: u64, fence: &FenceView) -> Option<u64> {
        if let Op::GitHub { poll } = self.op
            && !fence.open
        {
            // Every holder-only request in flight is dropped before the fence ends (a long
            // poll earlier than the others); no fence means drop it now.
            return Some(fence.fence_end.map_or(0, |e| e.saturating_sub(self.margin(poll))));
        }
        if self.op != Op::None {
            return None;
        }
        // Only future instants: a retry that is due but blocked by the fence waits for the
        // next link event (an ack), not for a timer that would fire again at once.
        let t = match &self.phase {
            Phase::Backoff { until } => Some(*until),
            Phase::WaitAck { decided_at, .. } => Some(decided_at + REASK_MS),
            Phase::Poll { .. } => {
                let stale = (!self.stale.is_empty() && self.stale_retry_at > now).then_some(self.stale_retry_at);
                [stale, (self.retry_at > now).then_some(self.retry_at)].into_iter().flatten().min()
            }
            Phase::Ack { .. }
            | Phase::Acquire { .. }
            | Phase::Commit { .. }
            | Phase::Report { .. }
            | Phase::Releasing => (self.retry_at > 0).then_some(self.retry_at),
            _ => None,
        };
        t.filter(|t| *t > now)
    }

    fn jitter(&mut self, max: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        if max == 0 { 0 } else { self.rng % max }
    }

    /// How long before the fence end a holder-only request must be able to leave (`poll`: the
    /// long poll, which must also be able to end by then).
    fn margin(&self, poll: bool) -> u64 {
        if poll { self.cfg.poll_margin_ms.max(self.cfg.send_margin_ms) } else { self.cfg.send_margin_ms }
    }

    /// Is the fence still open at `now + margin`? (Always, in standalone and fallback mode.)
    fn fence_covers(&self, fence: &FenceView, now: u64, poll: bool) -> bool {
        fence.open || fence.fence_end.is_some_and(|e| now + self.margin(poll) < e)
    }

    /// Emits a holder-only request only inside the fence, and only while it can still leave
    /// (a long poll: still end) `margin` before the fence does; otherwise emits nothing and
    /// waits for the fence.
    fn github(&mut self, fence: &FenceView, now: u64, op: GitHubOp, out: &mut Vec<Action>) -> bool {
        let Some(t) = self.token else { return false };
        let poll = matches!(op, GitHubOp::Poll { .. });
        if !fence.allows(t, now) || !self.fence_covers(fence, now, poll) {
            return false;
        }
        self.op = Op::GitHub { poll };
        out.push(Action::GitHub(op));
        true
    }

    /// Drops an in-flight long poll (handover, shutdown): a 200 it would bring is not acked,
    /// so nothing is lost.
    fn cancel_poll(&mut self, out: &mut Vec<Action>) {
        if self.op == (Op::GitHub { poll: true }) {
            out.push(Action::Cancel);
            self.op = Op::None;
        }
    }

    fn coord(&mut self, op: CoordOp, out: &mut Vec<Action>) {
        self.op = Op::Coord;
        self.last_coord = Some(op.clone());
        out.push(Action::Coord(op));
    }

    /// Lost the lease: stop at once, forget the session, stand by (DESIGN §5.8). The session
    /// is not deleted: that would be a holder-only request outside the fence. The successor
    /// revokes it by its replicated id.
    fn lose(&mut self, out: &mut Vec<Action>) {
        if matches!(self.op, Op::GitHub { .. }) {
            out.push(Action::Cancel);
        }
        if let Some(s) = self.session_id() {
            out.push(Action::Forget { session_id: s.to_string() });
        }
        out.push(Action::Note(Note::LostLease));
        self.reset_to_standby();
    }

    /// The coordinator rejected a command for our token: lose it, and say so with a
    /// `Release{LostLease}` so that a holding the applied state still lists is not left idle
    /// (for a truly stale token the coordinator ignores the report).
    fn let_go(&mut self, out: &mut Vec<Action>) {
        if let Some(token) = self.token {
            out.push(Action::Notify(CoordOp::Release { token, deleted: vec![], reason: ReleaseReason::LostLease }));
        }
        self.lose(out);
    }

    fn reset_to_standby(&mut self) {
        if let Some(t) = self.token.take() {
            self.done_tokens.insert(t);
        }
        self.phase = if self.shutdown { Phase::Done } else { Phase::Standby };
        self.op = Op::None;
        self.stale.clear();
        self.deleted.clear();
        self.listed = false;
        self.conflict_since = None;
        self.alerted = false;
        self.revoked_recently = false;
        self.pending_release = None;
        self.backoff_ms = BACKOFF_MIN_MS;
        self.retry_at = 0;
        self.retry_ms = BACKOFF_MIN_MS;
        self.stale_retry_at = 0;
        self.stale_retry_ms = BACKOFF_MIN_MS;
    }

    fn success(&mut self, now: u64) {
        self.last_success = now;
        self.local_failure_since = None;
        self.retry_at = 0;
        self.retry_ms = BACKOFF_MIN_MS;
    }

    fn failure(&mut self, now: u64, local: bool) {
        if local {
            self.local_failure_since.get_or_insert(now);
        }
        let j = self.jitter(self.retry_ms / 2 + 1);
        self.retry_at = now + self.retry_ms + j;
        self.retry_ms = (self.retry_ms * 2).min(BACKOFF_MAX_MS);
    }

    fn back_off(&mut self, now: u64) {
        let j = self.jitter(self.backoff_ms / 2 + 1);
        self.phase = Phase::Backoff { until: now + self.backoff_ms + j };
        self.backoff_ms = (self.backoff_ms * 2).min(BACKOFF_MAX_MS);
    }

    pub fn step(&mut self, now: u64, fence: &FenceView, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        self.on_input(now, fence, input, &mut out);
        self.advance(now, fence, &mut out);
        out
    }

    fn on_input(&mut self, now: u64, fence: &FenceView, input: Input, out: &mut Vec<Action>) {
        // A result answers the operation in flight, of its own kind; any other is stale (the
        // answer to a coordinator request of a token given up since, while a GitHub request of
        // the new token runs) and must not clear what is in flight now.
        let github_result = matches!(
            input,
            Input::Deleted { .. }
                | Input::Created(_)
                | Input::Polled(_)
                | Input::Acquired
                | Input::Swept
                | Input::AcquireFailed { .. }
                | Input::Acked { .. }
        );
        let coord_result = matches!(input, Input::Committed { .. } | Input::Reported { .. } | Input::ReleaseSent);
        if (github_result && !matches!(self.op, Op::GitHub { .. })) || (coord_result && self.op != Op::Coord) {
            return;
        }
        match input {
            Input::Tick => {}
            Input::Granted { token, stale_sessions, last_acked_message_id, resume } => {
                if self.done_tokens.contains(&token) || self.shutdown || self.token.is_some_and(|t| t > token) {
                    return;
                }
                if self.token == Some(token) {
                    let mine = self.session_id().map(str::to_string);
                    self.stale.extend(stale_sessions.into_iter().filter(|i| Some(i) != mine.as_ref()));
                    return;
                }
                if self.token.is_some() {
                    self.lose(out);
                }
                self.token = Some(token);
                self.stale = stale_sessions.into_iter().filter(|s| Some(s) != resume.as_ref()).collect();
                self.last_acked = last_acked_message_id;
                self.last_success = now;
                self.local_failure_since = None;
                self.phase = match resume {
                    // The adopted session is already committed: its stale peers are deleted
                    // between polls (Poll phase), like any stale session that appears late.
                    Some(session_id) => Phase::Poll { session_id },
                    None => Phase::Revoke { pending: self.stale.iter().cloned().collect() },
                };
                out.push(Action::Note(Note::TookOver { token }));
                // The fence starts with an ack that lists the new token: ask for one now rather
                // than at the next TTL/4 tick (a Grant need not carry an ack).
                out.push(Action::KeepaliveNow);
            }
            Input::DeleteSessions { token, ids } => {
                if self.token == Some(token) {
                    let mine = self.session_id().map(str::to_string);
                    self.stale.extend(ids.into_iter().filter(|i| Some(i) != mine.as_ref()));
                }
            }
            Input::Handover { token } => {
                if self.token == Some(token) && self.pending_release.is_none() {
                    self.pending_release = Some(ReleaseReason::Handover);
                    self.cancel_poll(out);
                }
            }
            Input::Shutdown => {
                self.shutdown = true;
                if self.token.is_some() {
                    self.pending_release.get_or_insert(ReleaseReason::Shutdown);
                    self.cancel_poll(out);
                } else {
                    self.phase = Phase::Done;
                }
            }
            Input::Deleted { id, done } => {
                self.op = Op::None;
                if done {
                    self.stale.remove(&id);
                    self.deleted.push(id.clone());
                }
                if done {
                    self.stale_retry_ms = BACKOFF_MIN_MS;
                } else if !matches!(self.phase, Phase::Revoke { .. } | Phase::Closing { .. }) {
                    let j = self.jitter(self.stale_retry_ms / 2 + 1);
                    self.stale_retry_at = now + self.stale_retry_ms + j;
                    self.stale_retry_ms = (self.stale_retry_ms * 2).min(30_000);
                }
                match &mut self.phase {
                    Phase::Revoke { pending } => {
                        pending.retain(|p| *p != id);
                        self.revoked_recently |= done;
                    }
                    // Best effort: if it failed, GitHub frees it after its orphan TTL and a
                    // successor revokes it by the replicated id.
                    Phase::Closing { session_id, .. } if session_id.as_deref() == Some(id.as_str()) => {
                        *session_id = None
                    }
                    _ => {}
                }
            }
            Input::Created(outcome) => {
                self.op = Op::None;
                let Some(token) = self.token else { return };
                if self.phase != Phase::Create {
                    return;
                }
                match outcome {
                    CreateOutcome::Opened { session_id } => {
                        self.success(now);
                        self.conflict_since = None;
                        self.alerted = false;
                        self.backoff_ms = BACKOFF_MIN_MS;
                        out.push(Action::Note(Note::SessionOpened));
                        self.phase = Phase::Commit { session_id: session_id.clone() };
                        // Committed before the first poll (§5.3), whatever the fence says now:
                        // apply rejects a stale token, and the id then joins stale_sessions.
                        self.coord(CoordOp::Commit { token, session_id }, out);
                    }
                    CreateOutcome::Conflict { foreign } => {
                        out.push(Action::Note(Note::Conflict { foreign }));
                        if std::mem::take(&mut self.revoked_recently) {
                            out.push(Action::Note(Note::RevocationIneffective));
                        }
                        let since = *self.conflict_since.get_or_insert(now);
                        if !self.alerted && now.saturating_sub(since) >= self.cfg.conflict_alert_ms {
                            self.alerted = true;
                            out.push(Action::Note(Note::ConflictAlert));
                        }
                        self.back_off(now);
                    }
                    CreateOutcome::Failed { local } | CreateOutcome::Ambiguous { local } => {
                        if local {
                            self.local_failure_since.get_or_insert(now);
                        }
                        self.back_off(now);
                    }
                }
            }
            Input::Committed { accepted } => {
                self.op = Op::None;
                self.retry_at = 0;
                if let Phase::Commit { session_id } = self.phase.clone() {
                    if accepted {
                        self.phase = Phase::Sweep { session_id };
                        // A new session long-polls from lastMessageId 0 (§5.4).
                        self.last_message = 0;
                    } else {
                        out.push(Action::Note(Note::StaleTokenRejected));
                        self.let_go(out);
                    }
                }
            }
            Input::Polled(outcome) => {
                self.op = Op::None;
                let (Phase::Poll { session_id }, Some(token)) = (self.phase.clone(), self.token) else { return };
                // A 200 after the fence deadline is dropped without being reported or acked.
                if !fence.allows(token, now) {
                    if matches!(outcome, PollOutcome::Message { .. }) {
                        out.push(Action::Note(Note::SelfFenced));
                    }
                    return;
                }
                match outcome {
                    PollOutcome::Empty => {
                        self.success(now);
                        self.phase = Phase::Report { session_id, message_id: None };
                        self.coord(CoordOp::Progress { token, message_id: None }, out);
                    }
                    PollOutcome::Message { message_id, job_available } => {
                        self.success(now);
                        if job_available && message_id > self.last_acked {
                            self.phase = Phase::Acquire { session_id, message_id };
                        } else {
                            // Already accepted once (≤ last acked): ack it without acquiring again.
                            self.phase = Phase::Report { session_id, message_id: Some(message_id) };
                            self.coord(CoordOp::Progress { token, message_id: Some(message_id) }, out);
                        }
                    }
                    PollOutcome::Gone => {
                        // Re-created under the fence after a backoff; a refresh-404 loop counts
                        // toward the holder-stall rule (§5.9).
                        out.push(Action::Forget { session_id });
                        self.local_failure_since.get_or_insert(now);
                        self.back_off(now);
                    }
                    PollOutcome::Glitch => self.failure(now, false),
                    PollOutcome::Failed { local } => self.failure(now, local),
                }
            }
            Input::Acquired => {
                self.op = Op::None;
                if let (Phase::Acquire { session_id, message_id }, Some(token)) = (self.phase.clone(), self.token) {
                    self.retry_at = 0;
                    self.phase = Phase::Report { session_id, message_id: Some(message_id) };
                    self.coord(CoordOp::Progress { token, message_id: Some(message_id) }, out);
                }
            }
            Input::Swept => {
                self.op = Op::None;
                if let Phase::Sweep { session_id } = self.phase.clone() {
                    self.phase = Phase::Poll { session_id };
                }
            }
            Input::AcquireFailed { .. } => {
                self.op = Op::None;
                if matches!(self.phase, Phase::Acquire { .. }) {
                    // A message whose available jobs were not acquired is never reported or
                    // acked: on GHES an unacquired job that was acked stays queued for good.
                    // The acquire is retried inside the fence with backoff; if it keeps
                    // failing, whatever the cause, the holder-stall rule hands the scale set
                    // over with the message unacked, and GitHub gives it to the next session.
                    self.failure(now, true);
                }
            }
            Input::Reported { accepted, duplicate: _ } => {
                self.op = Op::None;
                self.retry_at = 0;
                if let Phase::Report { session_id, message_id } = self.phase.clone() {
                    if !accepted {
                        out.push(Action::Note(Note::StaleTokenRejected));
                        self.let_go(out);
                        return;
                    }
                    match message_id {
                        Some(m) => {
                            self.last_acked = self.last_acked.max(m);
                            self.phase = Phase::Ack { session_id, message_id: m };
                        }
                        None => self.phase = Phase::Poll { session_id },
                    }
                }
            }
            Input::Acked { ok, local } => {
                self.op = Op::None;
                if let Phase::Ack { session_id, message_id } = self.phase.clone() {
                    if ok {
                        self.success(now);
                        self.last_message = self.last_message.max(message_id);
                        self.phase = Phase::Poll { session_id };
                    } else {
                        // The Progress is committed: retry the ack (inside the fence) later.
                        // A fenced ack (a quorum outage) is no reason to give the set away.
                        self.failure(now, local);
                    }
                }
            }
            Input::CoordUnavailable => {
                if self.op == Op::Coord {
                    self.op = Op::None;
                    self.retry_at = now + 200;
                }
            }
            Input::ReleaseSent => {
                self.op = Op::None;
                self.last_coord = None;
                if self.phase == Phase::Releasing {
                    if let Some(r) = self.pending_release {
                        out.push(Action::Note(Note::Released { reason: r }));
                    }
                    // Already released: acks that still list it until the coordinator moves on
                    // need no second report.
                    if let Some(t) = self.token {
                        self.released_notified.insert(t);
                    }
                    self.reset_to_standby();
                }
            }
        }
    }

    /// Starts whatever the current phase needs next.
    fn advance(&mut self, now: u64, fence: &FenceView, out: &mut Vec<Action>) {
        // A token we gave up that the coordinator still lists: say so, or the group would
        // stay with a holder that no longer acts (the coordinator ignores a stale report).
        if let Some(t) = fence.token
            && self.token != Some(t)
            && self.done_tokens.contains(&t)
            && self.released_notified.insert(t)
        {
            out.push(Action::Notify(CoordOp::Release { token: t, deleted: vec![], reason: ReleaseReason::LostLease }));
        }
        let Some(token) = self.token else { return };
        if fence.token == Some(token) {
            self.listed = true;
        }
        // Lost lease: the acks stopped listing our token, or list a newer one (EXPIRED clears
        // the link's holdings). A stream gap keeps the listing; only the fence end moves.
        if !fence.open && (fence.token.is_some_and(|t| t > token) || (self.listed && fence.token != Some(token))) {
            self.lose(out);
            return;
        }
        // The fence deadline (less the margin) drops whatever holder-only request is in
        // flight: one not yet on the wire is never sent, and a long poll's 200 is not taken.
        if let Op::GitHub { poll } = self.op
            && !self.fence_covers(fence, now, poll)
        {
            out.push(Action::Cancel);
            out.push(Action::Note(Note::SelfFenced));
            self.op = Op::None;
            if self.phase == Phase::Create {
                // The POST may have reached GitHub: an outcome we cannot know, as after a
                // timeout. Back off; the next attempt goes through the fence again.
                self.back_off(now);
            }
        }
        if self.op != Op::None {
            return;
        }
        // Holder stall (§5.9): no success, for a local reason, for too long.
        if self.pending_release.is_none()
            && self.local_failure_since.is_some()
            && now.saturating_sub(self.last_success) >= self.cfg.holder_stall_ms
        {
            self.pending_release = Some(ReleaseReason::Stall);
        }
        if let Some(reason) = self.pending_release
            && !matches!(self.phase, Phase::Closing { .. } | Phase::Releasing)
        {
            let session_id = self.session_id().map(str::to_string);
            self.phase = Phase::Closing { session_id, reason };
        }
        match self.phase.clone() {
            Phase::Standby | Phase::Done | Phase::Create => {}
            Phase::Commit { .. } | Phase::Report { .. } | Phase::Releasing => {
                // Resend what got no answer (the result of a previous CoordUnavailable).
                if now >= self.retry_at
                    && let Some(op) = self.last_coord.clone()
                {
                    self.coord(op, out);
                }
            }
            Phase::Revoke { pending } => {
                if let Some(id) = pending.first().cloned() {
                    self.github(fence, now, GitHubOp::DeleteSession { id }, out);
                } else {
                    self.phase = Phase::WaitAck { decided_at: now, after_seq: fence.sent_seq };
                    out.push(Action::KeepaliveNow);
                    if !self.deleted.is_empty() {
                        let deleted = std::mem::take(&mut self.deleted);
                        out.push(Action::Notify(CoordOp::Release {
                            token,
                            deleted,
                            reason: ReleaseReason::StaleRevoked,
                        }));
                    }
                }
            }
            Phase::WaitAck { decided_at, after_seq } => {
                if fence.listed_after(token, after_seq) {
                    self.phase = Phase::Create;
                    let owner = self.owner_name(token);
                    if !self.github(fence, now, GitHubOp::CreateSession { owner }, out) {
                        self.phase = Phase::WaitAck { decided_at: now, after_seq: fence.sent_seq };
                        out.push(Action::KeepaliveNow);
                    }
                } else if now >= decided_at + REASK_MS {
                    self.phase = Phase::WaitAck { decided_at: now, after_seq: fence.sent_seq };
                    out.push(Action::KeepaliveNow);
                }
            }
            Phase::Backoff { until } => {
                if now >= until {
                    // Late stale sessions are revoked, not waited out (issue 6, item 4).
                    self.phase = Phase::Revoke { pending: self.stale.iter().cloned().collect() };
                    self.advance(now, fence, out);
                }
            }
            Phase::Poll { session_id } => {
                let stale =
                    self.stale.iter().find(|i| **i != session_id).cloned().filter(|_| now >= self.stale_retry_at);
                if let Some(id) = stale {
                    // A stale session that appears while we hold is deleted between polls.
                    self.github(fence, now, GitHubOp::DeleteSession { id }, out);
                } else if !self.deleted.is_empty() {
                    let deleted = std::mem::take(&mut self.deleted);
                    out.push(Action::Notify(CoordOp::Release { token, deleted, reason: ReleaseReason::StaleRevoked }));
                    self.advance(now, fence, out);
                } else if now >= self.retry_at {
                    let last_message_id = self.last_message;
                    self.github(fence, now, GitHubOp::Poll { last_message_id }, out);
                }
            }
            Phase::Sweep { .. } => {
                self.github(fence, now, GitHubOp::AcquireAvailable, out);
            }
            Phase::Acquire { message_id, .. } => {
                if now >= self.retry_at {
                    self.github(fence, now, GitHubOp::Acquire { message_id }, out);
                }
            }
            Phase::Ack { message_id, .. } => {
                if now >= self.retry_at {
                    self.github(fence, now, GitHubOp::AckMessage { message_id }, out);
                }
            }
            Phase::Closing { session_id, reason } => {
                let deleting =
                    session_id.is_some_and(|id| self.github(fence, now, GitHubOp::DeleteSession { id }, out));
                if !deleting {
                    // Deleted, or it cannot be deleted inside the fence: report and let go.
                    let deleted = std::mem::take(&mut self.deleted);
                    self.phase = Phase::Releasing;
                    self.coord(CoordOp::Release { token, deleted, reason }, out);
                }
            }
        }
    }
}

/// Which session a Grant resumes (`Input::Granted::resume`): the session this agent has
/// `open`, if it is one of the candidates, else none (a new one is opened).
/// - `adopted`: its fallback session, whose Adopt was answered "committed";
/// - `kept`: the session it held under the same token before a quorum loss;
/// - `current`: the group's committed session as the Grant states it — an Adopt that was
///   committed but whose answer never came (safety review M3.1) still resumes the adopted
///   session, which, being the group's current session, nobody would delete otherwise;
/// - never a session the Grant lists as stale.
///
/// The adopted one is preferred over `kept` (a fallback that deleted the pre-loss session and
/// won a new one keeps the new one; taking `kept` first forgot it and met it with 409s).
pub fn resume_on_grant(
    open: Option<&str>,
    adopted: Option<String>,
    kept: Option<String>,
    current: Option<&str>,
    stale: &[String],
) -> Option<String> {
    let open = open?;
    [adopted.as_deref(), kept.as_deref(), current]
        .into_iter()
        .flatten()
        .find(|id| *id == open && !stale.iter().any(|s| s == id))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> HolderConfig {
        HolderConfig {
            cluster: "a".into(),
            member_id: "m1".into(),
            poll_margin_ms: 400,
            send_margin_ms: 300,
            holder_stall_ms: 15_000,
            conflict_alert_ms: 120_000,
            fallback: false,
            seed: 3,
        }
    }

    /// A fence whose latest listing ack is for keepalive `listed` (sequence numbers mimic
    /// times here), the latest sent.
    fn fence(token: u64, end: u64, listed: u64) -> FenceView {
        FenceView {
            open: false,
            token: Some(token),
            fence_end: Some(end),
            listed_sent_at: Some(listed),
            listed_seq: Some(listed),
            sent_seq: listed,
        }
    }

    /// The same fence after one more keepalive was sent and acked (listing the token).
    fn fresh(f: &FenceView) -> FenceView {
        FenceView { listed_seq: f.listed_seq.map(|s| s + 1), sent_seq: f.sent_seq + 1, ..*f }
    }

    /// Grants token 7 under `f` and brings the holder to its first poll of session "s1"
    /// (a poll is then in flight), at times 10–50.
    fn to_polling(h: &mut Holder, f: &FenceView) {
        h.step(10, f, Input::Granted { token: 7, stale_sessions: vec![], last_acked_message_id: 0, resume: None });
        h.step(30, &fresh(f), Input::Tick);
        h.step(40, f, Input::Created(CreateOutcome::Opened { session_id: "s1".into() }));
        let a = h.step(45, f, Input::Committed { accepted: true });
        assert_eq!(gh(&a), vec![GitHubOp::AcquireAvailable], "{a:?}");
        let a = h.step(50, f, Input::Swept);
        assert_eq!(gh(&a), vec![GitHubOp::Poll { last_message_id: 0 }], "{a:?}");
    }

    fn gh(a: &[Action]) -> Vec<GitHubOp> {
        a.iter().filter_map(|x| if let Action::GitHub(op) = x { Some(op.clone()) } else { None }).collect()
    }

    #[test]
    fn takeover_revokes_then_waits_for_a_fresh_ack_then_opens_commits_and_polls() {
        let mut h = Holder::new(cfg(), 0);
        let f = fence(7, 2000, 0);
        let a = h.step(
            10,
            &f,
            Input::Granted { token: 7, stale_sessions: vec!["old".into()], last_acked_message_id: 4, resume: None },
        );
        assert_eq!(gh(&a), vec![GitHubOp::DeleteSession { id: "old".into() }]);
        let a = h.step(20, &f, Input::Deleted { id: "old".into(), done: true });
        assert!(a.contains(&Action::KeepaliveNow), "{a:?}");
        assert!(a.contains(&Action::Notify(CoordOp::Release {
            token: 7,
            deleted: vec!["old".into()],
            reason: ReleaseReason::StaleRevoked
        })));
        // The ack in `f` is for a keepalive sent at 0, before the decision: no POST yet.
        assert!(gh(&h.step(30, &f, Input::Tick)).is_empty());
        let fresh = fence(7, 2800, 25);
        let a = h.step(40, &fresh, Input::Tick);
        assert_eq!(gh(&a), vec![GitHubOp::CreateSession { owner: "arcfed/a/m1/t7".into() }]);
        let a = h.step(50, &fresh, Input::Created(CreateOutcome::Opened { session_id: "s1".into() }));
        assert!(a.contains(&Action::Coord(CoordOp::Commit { token: 7, session_id: "s1".into() })));
        assert!(gh(&a).is_empty(), "no poll before the commit: {a:?}");
        // A new session first acquires whatever a predecessor left available, then polls.
        let a = h.step(60, &fresh, Input::Committed { accepted: true });
        assert_eq!(gh(&a), vec![GitHubOp::AcquireAvailable]);
        let a = h.step(65, &fresh, Input::Swept);
        assert_eq!(gh(&a), vec![GitHubOp::Poll { last_message_id: 0 }]);
    }

    #[test]
    fn message_is_acked_only_after_progress_is_accepted() {
        let mut h = Holder::new(cfg(), 0);
        let f = fence(7, 2800, 25);
        to_polling(&mut h, &f);
        let a = h.step(60, &f, Input::Polled(PollOutcome::Message { message_id: 5, job_available: true }));
        assert_eq!(gh(&a), vec![GitHubOp::Acquire { message_id: 5 }]);
        let a = h.step(70, &f, Input::Acquired);
        assert_eq!(a, vec![Action::Coord(CoordOp::Progress { token: 7, message_id: Some(5) })]);
        let a = h.step(80, &f, Input::CoordUnavailable);
        assert!(gh(&a).is_empty(), "no ack without an accepted Progress: {a:?}");
        let a = h.step(300, &f, Input::Tick);
        assert_eq!(a, vec![Action::Coord(CoordOp::Progress { token: 7, message_id: Some(5) })]);
        let a = h.step(310, &f, Input::Reported { accepted: true, duplicate: false });
        assert_eq!(gh(&a), vec![GitHubOp::AckMessage { message_id: 5 }]);
        let a = h.step(320, &f, Input::Acked { ok: true, local: true });
        assert_eq!(gh(&a), vec![GitHubOp::Poll { last_message_id: 5 }]);
        // A rejected Progress (stale token) loses the lease: nothing is acked.
        let a = h.step(330, &f, Input::Polled(PollOutcome::Message { message_id: 6, job_available: false }));
        assert_eq!(a, vec![Action::Coord(CoordOp::Progress { token: 7, message_id: Some(6) })]);
        let a = h.step(340, &f, Input::Reported { accepted: false, duplicate: false });
        assert!(gh(&a).is_empty() && a.contains(&Action::Note(Note::LostLease)), "{a:?}");
        assert_eq!(h.phase, Phase::Standby);
    }

    #[test]
    fn a_poll_is_cancelled_before_the_fence_ends_and_a_late_200_is_dropped() {
        let mut h = Holder::new(cfg(), 0);
        let f = fence(7, 2000, 25);
        to_polling(&mut h, &f);
        assert_eq!(h.next_wakeup(50, &f), Some(1600));
        let a = h.step(1600, &f, Input::Tick);
        assert!(a.contains(&Action::Cancel), "{a:?}");
        // Too close to the fence end to start another poll.
        assert!(gh(&h.step(1700, &f, Input::Tick)).is_empty());
        // A fresh ack moves the fence: polling resumes on the same session.
        let f2 = fence(7, 3500, 1500);
        assert_eq!(gh(&h.step(1710, &f2, Input::Tick)), vec![GitHubOp::Poll { last_message_id: 0 }]);
        // The stream drops (fence_end None): the poll is cancelled at once.
        let down = FenceView { fence_end: None, ..f2 };
        let a = h.step(1720, &down, Input::Tick);
        assert!(a.contains(&Action::Cancel), "{a:?}");
        // A 200 arriving outside the fence is neither reported nor acked.
        let a = h.step(1730, &down, Input::Polled(PollOutcome::Message { message_id: 9, job_available: false }));
        assert!(!a.iter().any(|x| matches!(x, Action::Coord(_) | Action::GitHub(_))), "{a:?}");
    }

    #[test]
    fn a_message_whose_jobs_were_not_acquired_is_never_acked_and_a_stuck_acquire_hands_over() {
        let mut h = Holder::new(cfg(), 0);
        let f0 = fence(7, 2800, 25);
        to_polling(&mut h, &f0);
        let a = h.step(60, &f0, Input::Polled(PollOutcome::Message { message_id: 5, job_available: true }));
        assert_eq!(gh(&a), vec![GitHubOp::Acquire { message_id: 5 }]);
        // The acquire fails again and again (5xx, timeouts, a 4xx): it is retried inside the
        // fence with backoff, the message is neither reported nor acked, and after the
        // holder-stall time the holder lets go with the message unacked.
        let mut now = 60;
        let mut released = None;
        let mut acquires = 1;
        h.step(now, &f0, Input::AcquireFailed { local: false });
        while now < 40_000 && released.is_none() {
            now += 100;
            let f = fence(7, now + 2000, now);
            let mut todo: std::collections::VecDeque<Action> = h.step(now, &f, Input::Tick).into();
            while let Some(a) = todo.pop_front() {
                match a {
                    Action::GitHub(GitHubOp::Acquire { .. }) => {
                        acquires += 1;
                        todo.extend(h.step(now, &f, Input::AcquireFailed { local: false }));
                    }
                    Action::GitHub(GitHubOp::DeleteSession { id }) => {
                        todo.extend(h.step(now, &f, Input::Deleted { id, done: true }));
                    }
                    Action::GitHub(op) => panic!("{op:?} while the message's jobs are not acquired"),
                    Action::Coord(CoordOp::Progress { .. }) => {
                        panic!("Progress for a message whose jobs were not acquired")
                    }
                    Action::Coord(CoordOp::Release { reason, deleted, .. }) => released = Some((reason, deleted, now)),
                    _ => {}
                }
            }
        }
        let (reason, deleted, at) = released.expect("a stuck acquire hands the scale set over");
        assert_eq!((reason, deleted), (ReleaseReason::Stall, vec!["s1".to_string()]));
        assert!(at >= 15_000 && acquires > 3, "released at {at} after {acquires} acquires");
    }

    #[test]
    fn every_holder_only_request_in_flight_is_dropped_before_the_fence_ends() {
        let mut h = Holder::new(cfg(), 0);
        let f = fence(7, 2000, 25);
        to_polling(&mut h, &f);
        h.step(60, &f, Input::Polled(PollOutcome::Message { message_id: 5, job_available: true }));
        assert!(h.in_flight(), "the acquire is in flight");
        // Not only the long poll: the acquire is dropped `send_margin` before the fence end.
        assert_eq!(h.next_wakeup(70, &f), Some(1700));
        let a = h.step(1700, &f, Input::Tick);
        assert!(a.contains(&Action::Cancel) && !h.in_flight(), "{a:?}");
        // It is not sent again while the fence cannot cover it.
        assert!(gh(&h.step(1750, &f, Input::Tick)).is_empty());
        // A create cancelled at the fence may have opened a session: back off, then try again.
        let mut h = Holder::new(cfg(), 0);
        h.step(10, &f, Input::Granted { token: 7, stale_sessions: vec![], last_acked_message_id: 0, resume: None });
        let a = h.step(30, &fresh(&f), Input::Tick);
        assert!(matches!(gh(&a).as_slice(), [GitHubOp::CreateSession { .. }]), "{a:?}");
        let a = h.step(1700, &fresh(&f), Input::Tick);
        assert!(a.contains(&Action::Cancel), "{a:?}");
        assert!(matches!(h.phase, Phase::Backoff { .. }), "{:?}", h.phase);
    }

    #[test]
    fn conflicts_back_off_with_jitter_and_never_give_up() {
        let mut h = Holder::new(cfg(), 0);
        let mut now = 10;
        let mut f = fence(7, now + 2000, now);
        h.step(now, &f, Input::Granted { token: 7, stale_sessions: vec![], last_acked_message_id: 0, resume: None });
        let mut waits = vec![];
        for _ in 0..12 {
            now += 5;
            f = fence(7, now + 2000, now);
            let a = h.step(now, &f, Input::Tick);
            assert!(matches!(gh(&a).as_slice(), [GitHubOp::CreateSession { .. }]), "{a:?}");
            let a = h.step(now + 1, &f, Input::Created(CreateOutcome::Conflict { foreign: true }));
            assert!(a.contains(&Action::Note(Note::Conflict { foreign: true })));
            let Phase::Backoff { until } = h.phase else { panic!("{:?}", h.phase) };
            waits.push(until - now - 1);
            now = until;
            h.step(now, &f, Input::Tick);
        }
        assert!(waits[0] >= 250 && waits[0] < 400, "{waits:?}");
        assert!(waits.iter().all(|w| *w <= 7_500), "{waits:?}");
        assert!(waits.last().copied().unwrap_or(0) >= 5_000, "{waits:?}");
    }

    #[test]
    fn handover_deletes_our_session_then_releases() {
        let mut h = Holder::new(cfg(), 0);
        let f = fence(7, 2800, 25);
        to_polling(&mut h, &f);
        // The long poll in flight is dropped at once (a 200 it brings is never acked), then
        // the session is deleted.
        let a = h.step(60, &f, Input::Handover { token: 7 });
        assert_eq!(a.first(), Some(&Action::Cancel), "{a:?}");
        assert_eq!(gh(&a), vec![GitHubOp::DeleteSession { id: "s1".into() }]);
        let a = h.step(90, &f, Input::Deleted { id: "s1".into(), done: true });
        assert_eq!(
            a,
            vec![Action::Coord(CoordOp::Release {
                token: 7,
                deleted: vec!["s1".into()],
                reason: ReleaseReason::Handover
            })]
        );
        let a = h.step(100, &f, Input::ReleaseSent);
        assert!(a.contains(&Action::Note(Note::Released { reason: ReleaseReason::Handover })));
        assert_eq!(h.phase, Phase::Standby);
        // Acks that still list 7 until the grant moves on bring no second report.
        let a = h.step(105, &f, Input::Tick);
        assert!(!a.iter().any(|x| matches!(x, Action::Notify(_))), "{a:?}");
        // The released token is never used again.
        let a = h.step(
            110,
            &f,
            Input::Granted { token: 7, stale_sessions: vec![], last_acked_message_id: 0, resume: None },
        );
        assert!(a.is_empty());
    }

    #[test]
    fn holder_stall_for_a_local_reason_releases() {
        let mut h = Holder::new(cfg(), 0);
        let mut now = 10;
        h.step(
            now,
            &fence(7, now + 2000, now),
            Input::Granted { token: 7, stale_sessions: vec![], last_acked_message_id: 0, resume: None },
        );
        let mut released = false;
        while now < 40_000 && !released {
            now += 100;
            let f = fence(7, now + 2000, now);
            for a in h.step(now, &f, Input::Tick) {
                match a {
                    Action::GitHub(GitHubOp::CreateSession { .. }) => {
                        h.step(now, &f, Input::Created(CreateOutcome::Failed { local: true }));
                    }
                    Action::Coord(CoordOp::Release { reason: ReleaseReason::Stall, .. }) => released = true,
                    _ => {}
                }
            }
        }
        assert!(released && now >= 15_000, "released={released} at {now}");
    }

    #[test]
    fn a_grant_resumes_only_the_open_session_it_names_or_was_told_of() {
        let s = |x: &str| Some(x.to_string());
        let none: &[String] = &[];
        // An Adopt answered "committed", or the pre-loss session kept under the same token.
        assert_eq!(resume_on_grant(Some("f1"), s("f1"), None, None, none), s("f1"));
        assert_eq!(resume_on_grant(Some("p1"), None, s("p1"), Some("p1"), none), s("p1"));
        // M3.1: the Adopt was committed but its answer never came; the Grant names the session.
        assert_eq!(resume_on_grant(Some("f1"), None, None, Some("f1"), none), s("f1"));
        // The group's session is someone else's (a predecessor's): never resumed.
        assert_eq!(resume_on_grant(Some("mine"), None, None, Some("theirs"), none), None);
        // A stale session is never resumed, whoever names it.
        let stale = vec!["f1".to_string()];
        assert_eq!(resume_on_grant(Some("f1"), None, None, Some("f1"), &stale), None);
        assert_eq!(resume_on_grant(Some("f1"), s("f1"), None, None, &stale), None);
        // Nothing open: nothing to resume.
        assert_eq!(resume_on_grant(None, s("f1"), s("p1"), Some("f1"), none), None);
        // The adopted session wins over a kept one that is not open any more.
        assert_eq!(resume_on_grant(Some("f2"), s("f2"), s("p1"), Some("f2"), none), s("f2"));
    }

    /// Safety review L4: acks refused by the fence (the quorum is away) are not a local
    /// failure, so a quorum outage longer than the stall limit does not make the holder give
    /// the set away and put its cluster in cooldown; a local ack failure still does.
    #[test]
    fn fenced_ack_failures_do_not_count_toward_the_stall_rule() {
        for local in [false, true] {
            let mut h = Holder::new(cfg(), 0);
            let f = fence(7, 2800, 25);
            to_polling(&mut h, &f);
            h.step(60, &f, Input::Polled(PollOutcome::Message { message_id: 5, job_available: false }));
            let mut acts = h.step(70, &f, Input::Reported { accepted: true, duplicate: false });
            assert_eq!(gh(&acts), vec![GitHubOp::AckMessage { message_id: 5 }]);
            let mut now = 70;
            let mut released = false;
            while now < 40_000 && !released {
                now += 100;
                let f = fence(7, now + 2000, now);
                acts = match gh(&acts).first() {
                    Some(GitHubOp::AckMessage { .. }) => h.step(now, &f, Input::Acked { ok: false, local }),
                    // Stalled: it closes its session, then releases.
                    Some(GitHubOp::DeleteSession { id }) => {
                        h.step(now, &f, Input::Deleted { id: id.clone(), done: true })
                    }
                    _ => h.step(now, &f, Input::Tick),
                };
                released |= acts
                    .iter()
                    .any(|a| matches!(a, Action::Coord(CoordOp::Release { reason: ReleaseReason::Stall, .. })));
            }
            assert_eq!(released, local, "local={local}: released={released} at {now}");
        }
    }

    #[test]
    fn an_adopted_session_is_polled_again_without_a_new_create() {
        let mut h = Holder::new(cfg(), 0);
        let f = fence(9, 2800, 25);
        let a = h.step(
            10,
            &f,
            Input::Granted {
                token: 9,
                stale_sessions: vec!["s-fb".into()],
                last_acked_message_id: 3,
                resume: Some("s-fb".into()),
            },
        );
        assert_eq!(gh(&a), vec![GitHubOp::Poll { last_message_id: 0 }], "{a:?}");
        assert_eq!(h.session_id(), Some("s-fb"));
    }

    #[test]
    fn a_given_up_token_that_acks_still_list_is_released_once() {
        let mut h = Holder::new(cfg(), 0);
        let f = fence(7, 2800, 25);
        to_polling(&mut h, &f);
        // The lease is lost (not listed), then the acks list 7 again: the holder stays down
        // (7 is given up) and tells the coordinator, once.
        h.step(60, &FenceView::default(), Input::Tick);
        let release = Action::Notify(CoordOp::Release { token: 7, deleted: vec![], reason: ReleaseReason::LostLease });
        let a = h.step(70, &f, Input::Tick);
        assert!(a.contains(&release) && gh(&a).is_empty(), "{a:?}");
        assert!(!h.step(80, &f, Input::Tick).contains(&release));
    }

    #[test]
    fn lost_listing_drops_the_session_without_a_request() {
        let mut h = Holder::new(cfg(), 0);
        let f = fence(7, 2800, 25);
        to_polling(&mut h, &f);
        let gone = FenceView::default();
        let a = h.step(60, &gone, Input::Tick);
        assert!(a.contains(&Action::Cancel) && a.contains(&Action::Forget { session_id: "s1".into() }), "{a:?}");
        assert!(gh(&a).is_empty());
        assert_eq!(h.phase, Phase::Standby);
    }

    fn arb_input() -> impl Strategy<Value = Input> {
        let ids = prop_oneof![Just("s1".to_string()), Just("s2".to_string()), Just("old".to_string())];
        prop_oneof![
            4 => Just(Input::Tick),
            1 => (1u64..5, proptest::collection::vec(ids.clone(), 0..3), 0i64..5).prop_map(|(token, stale_sessions, last_acked_message_id)| Input::Granted { token, stale_sessions, last_acked_message_id, resume: None }),
            1 => (1u64..5, proptest::collection::vec(ids.clone(), 0..2)).prop_map(|(token, ids)| Input::DeleteSessions { token, ids }),
            1 => (1u64..5).prop_map(|token| Input::Handover { token }),
            1 => Just(Input::Shutdown),
            2 => (ids.clone(), any::<bool>()).prop_map(|(id, done)| Input::Deleted { id, done }),
            2 => prop_oneof![
                ids.clone().prop_map(|session_id| CreateOutcome::Opened { session_id }),
                any::<bool>().prop_map(|foreign| CreateOutcome::Conflict { foreign }),
                any::<bool>().prop_map(|local| CreateOutcome::Failed { local }),
                any::<bool>().prop_map(|local| CreateOutcome::Ambiguous { local }),
            ].prop_map(Input::Created),
            2 => any::<bool>().prop_map(|accepted| Input::Committed { accepted }),
            3 => prop_oneof![
                Just(PollOutcome::Empty),
                (1i64..8, any::<bool>()).prop_map(|(message_id, job_available)| PollOutcome::Message { message_id, job_available }),
                Just(PollOutcome::Gone),
                Just(PollOutcome::Glitch),
                any::<bool>().prop_map(|local| PollOutcome::Failed { local }),
            ].prop_map(Input::Polled),
            1 => Just(Input::Acquired),
            1 => Just(Input::Swept),
            1 => any::<bool>().prop_map(|local| Input::AcquireFailed { local }),
            2 => (any::<bool>(), any::<bool>()).prop_map(|(accepted, duplicate)| Input::Reported { accepted, duplicate }),
            2 => (any::<bool>(), any::<bool>()).prop_map(|(ok, local)| Input::Acked { ok, local }),
            1 => Just(Input::ReleaseSent),
            1 => Just(Input::CoordUnavailable),
        ]
    }

    /// A fence as the link could present it at `now`: `None` is a healthy fence for the
    /// holder's own token; otherwise any token, up or down, any deadline.
    #[allow(clippy::type_complexity)]
    fn arb_fence() -> impl Strategy<Value = Option<(Option<u64>, Option<i64>, Option<u64>)>> {
        prop::option::weighted(
            0.3,
            (
                // 0 stands for the holder's own token: a deadline or listing problem, not a new holder.
                prop::option::weighted(0.9, prop_oneof![2 => Just(0u64), 1 => 1u64..9]),
                prop::option::weighted(0.8, -3000i64..3000),
                prop::option::of(0u64..3000),
            ),
        )
    }

    #[derive(Clone, Debug)]
    enum Step {
        Raw(Input),
        /// The result of whatever is in flight (its outcome picked by the byte).
        Respond(u8),
        /// A handover of the token the holder has.
        HandoverCurrent,
        /// A Grant of a token above every one seen so far.
        GrantNext,
    }

    fn arb_step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => arb_input().prop_map(Step::Raw),
            16 => any::<u8>().prop_map(Step::Respond),
            1 => Just(Step::HandoverCurrent),
            1 => Just(Step::GrantNext),
        ]
    }

    /// The driver's answer to the request in flight (GitHub first, then the coordinator's).
    fn respond(
        gh: bool,
        coord: bool,
        op: &Option<GitHubOp>,
        coord_op: &Option<CoordOp>,
        last_message: i64,
        b: u8,
    ) -> Input {
        let ok = !b.is_multiple_of(4);
        match (gh, op, coord, coord_op) {
            (true, Some(GitHubOp::DeleteSession { id }), ..) => Input::Deleted { id: id.clone(), done: ok },
            (true, Some(GitHubOp::CreateSession { .. }), ..) => Input::Created(match b % 5 {
                0 => CreateOutcome::Conflict { foreign: b.is_multiple_of(2) },
                1 => CreateOutcome::Ambiguous { local: true },
                _ => CreateOutcome::Opened { session_id: format!("s{}", b % 3) },
            }),
            (true, Some(GitHubOp::Poll { .. }), ..) => Input::Polled(match b % 6 {
                0 => PollOutcome::Empty,
                1 => PollOutcome::Failed { local: b.is_multiple_of(2) },
                2 => PollOutcome::Gone,
                _ => PollOutcome::Message {
                    message_id: last_message + 1 + i64::from(b % 3),
                    job_available: b.is_multiple_of(2),
                },
            }),
            (true, Some(GitHubOp::Acquire { .. }), ..) => {
                if ok {
                    Input::Acquired
                } else {
                    Input::AcquireFailed { local: b.is_multiple_of(2) }
                }
            }
            (true, Some(GitHubOp::AckMessage { .. }), ..) => Input::Acked { ok, local: true },
            (true, Some(GitHubOp::AcquireAvailable), ..) => Input::Swept,
            (_, _, true, Some(CoordOp::Commit { .. })) => Input::Committed { accepted: !b.is_multiple_of(8) },
            (_, _, true, Some(CoordOp::Progress { .. })) => {
                if b.is_multiple_of(9) {
                    Input::CoordUnavailable
                } else {
                    Input::Reported { accepted: !b.is_multiple_of(8), duplicate: false }
                }
            }
            (_, _, true, Some(CoordOp::Release { .. })) => Input::ReleaseSent,
            _ => Input::Tick,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        /// DESIGN §4: no interleaving of acks, time, EXPIRED (token cleared) and stream loss
        /// (fence_end None) lets the machine emit a holder-only request outside the fence, or
        /// start a long poll that could outlive it; at most one GitHub request is in flight;
        /// a message is acked only after a Progress for it was accepted (§5.2 fence (b)).
        #[test]
        fn no_holder_only_request_outside_the_fence(
            script in proptest::collection::vec((0u64..700, arb_fence(), arb_step()), 1..160)
        ) {
            let mut h = Holder::new(cfg(), 0);
            let mut now = 1_000u64;
            let mut accepted: BTreeSet<i64> = BTreeSet::new();
            // The driver's view: a GitHub request is in flight until its result is fed back
            // or the machine cancels it. A result is fed only for a request in flight.
            let mut outstanding = false;
            // Likewise for the coordinator request (the driver matches results by request id).
            let mut coord_outstanding = false;
            // Messages whose JobAvailable jobs must be acquired before the ack, and those acquired.
            let mut needs_acquire: BTreeSet<i64> = BTreeSet::new();
            let mut acquired: BTreeSet<i64> = BTreeSet::new();
            let mut token_seen = h.token;
            let mut last_op: Option<GitHubOp> = None;
            let mut max_token = 4u64;
            let mut last_coord: Option<CoordOp> = None;
            for (dt, fence_choice, step) in script {
                now += dt;
                let f = match fence_choice {
                    // The holder's own token with a healthy fence: lets scripts reach deep phases.
                    None => FenceView {
                        open: false,
                        token: h.token.or(Some(1)),
                        fence_end: Some(now + 2_500),
                        listed_sent_at: Some(now),
                        listed_seq: Some(now / 100 + 1),
                        sent_seq: now / 100 + 1,
                    },
                    Some((token, end, listed)) => FenceView {
                        open: false,
                        token: token.and_then(|t| if t == 0 { h.token } else { Some(t) }),
                        fence_end: end.map(|d| (now as i64 + d).max(0) as u64),
                        listed_sent_at: listed.map(|l| now.saturating_sub(l)),
                        listed_seq: listed.map(|l| l / 100),
                        sent_seq: now / 100,
                    },
                };
                let input = match step {
                    Step::Raw(i) => {
                        if let Input::Granted { token, .. } = &i {
                            max_token = max_token.max(*token);
                        }
                        i
                    }
                    Step::HandoverCurrent => Input::Handover { token: h.token.unwrap_or(0) },
                    Step::GrantNext => {
                        max_token += 1;
                        Input::Granted { token: max_token, stale_sessions: vec!["old".into()], last_acked_message_id: 0, resume: None }
                    }
                    // The answer to whatever is in flight, as the driver would deliver it.
                    Step::Respond(b) => respond(outstanding, coord_outstanding, &last_op, &last_coord, h.last_message_id(), b),
                };
                let gh_result = matches!(
                    input,
                    Input::Deleted { .. } | Input::Created(_) | Input::Polled(_) | Input::Acquired | Input::Swept | Input::AcquireFailed { .. } | Input::Acked { .. }
                );
                let coord_result = matches!(
                    input,
                    Input::Committed { .. } | Input::Reported { .. } | Input::ReleaseSent | Input::CoordUnavailable
                );
                let input = if (gh_result && !outstanding) || (coord_result && !coord_outstanding) { Input::Tick } else { input };
                if gh_result && outstanding {
                    outstanding = false;
                }
                if coord_result && coord_outstanding {
                    coord_outstanding = false;
                }
                let reported = match (&h.phase, &input) {
                    (Phase::Report { message_id: Some(m), .. }, Input::Reported { accepted: true, .. }) if h.in_flight() => Some(*m),
                    _ => None,
                };
                match (&h.phase, &input) {
                    (Phase::Poll { .. }, Input::Polled(PollOutcome::Message { message_id, job_available: true }))
                        if *message_id > h.last_acked && h.token.is_some_and(|t| f.allows(t, now)) =>
                    {
                        needs_acquire.insert(*message_id);
                    }
                    (Phase::Acquire { message_id, .. }, Input::Acquired) => {
                        acquired.insert(*message_id);
                    }
                    _ => {}
                }
                let actions = h.step(now, &f, input.clone());
                if h.token != token_seen {
                    token_seen = h.token;
                    needs_acquire.clear();
                    acquired.clear();
                }
                if let Some(m) = reported { accepted.insert(m); }
                for a in &actions {
                    match a {
                        Action::Cancel => outstanding = false,
                        Action::Coord(op) => {
                            coord_outstanding = true;
                            last_coord = Some(op.clone());
                        }
                        Action::GitHub(op) => {
                            let t = h.token.expect("a holder-only request needs a token");
                            prop_assert!(f.allows(t, now), "{op:?} outside the fence {f:?} at {now}");
                            prop_assert!(f.fence_end.is_some_and(|e| now + 300 < e), "{op:?} too close to the fence end");
                            if let GitHubOp::Poll { .. } = op {
                                prop_assert!(f.fence_end.is_some_and(|e| now + 400 < e), "poll too close to the fence end");
                            }
                            if let GitHubOp::AckMessage { message_id } = op {
                                prop_assert!(accepted.contains(message_id), "ack of {message_id} without an accepted Progress");
                                prop_assert!(
                                    !needs_acquire.contains(message_id) || acquired.contains(message_id),
                                    "ack of {message_id} whose jobs were never acquired"
                                );
                            }
                            prop_assert!(!outstanding, "{op:?} while another GitHub request is in flight");
                            outstanding = true;
                            last_op = Some(op.clone());
                        }
                        _ => {}
                    }
                }
                prop_assert_eq!(outstanding, matches!(h.op, Op::GitHub { .. }), "the machine and the driver disagree on what is in flight");
                // Nothing holder-only stays in flight past the fence end less the margin.
                if outstanding {
                    prop_assert!(f.fence_end.is_some_and(|e| now + 300 < e), "a request left in flight at {now} under {f:?}");
                }
            }
        }
    }
}
