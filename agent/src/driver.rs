//! The one driver loop: it owns every side effect of the agent.
//!
//! ```text
//!            ┌──────────── select! (biased) ─────────────┐
//!  shutdown ─┤ timers (link, holder, re-patch)            │
//!  stream  ──┤ coordinator messages ──▶ core::link ───────┼──▶ Join / Keepalive / Attach / Close
//!  GitHub  ──┤ result of the one request in flight ─┐     │
//!            └──────────────────────────────────────┼─────┘
//!                                                   ▼
//!                        core::holder ──▶ GitHub request (fence-gated) · SessionOpened/Progress/Release
//!  Assignment ─▶ core::scaler ─▶ runner task (ERS merge patch, EphemeralRunner status)
//! ```
//! The decisions live in `arcfed_agent_core` (pure, property-tested); this file only executes
//! them and feeds results back. The fence is checked three times: by the holder machine before
//! it emits a request, by the [`FenceGate`] before every HTTP attempt (retries included), and
//! by the holder machine again when a result arrives (a 200 after the fence is dropped).
//!
//! Modes: **federated** (`--coordinator`): the coordinator grants the session and splits the
//! runners. **standalone** (no coordinator): the fence is open, GitHub's one-session rule is the
//! mutex, the session id is recorded on our own ERS (`arcfed.io/session-id`) before the first
//! poll, and a successor deletes a recorded session that is not its own (DESIGN §5.12).
//! **fallback**: a federated agent that has had no coordinator for `--coordinator-lost-for`
//! runs as standalone until the quorum returns, then reports its session with `Adopt`.

use crate::config::{Backend, Config};
use crate::coordinator_client::{self as cc, JoinInfo, Stream};
use crate::github::{self, Client, Gate, wire};
use crate::http::{HttpState, Readiness};
use crate::kube::{JobStarted, KubeRunners};
use crate::metrics::Metrics;
use crate::runners::Runners;
use crate::sim::{SimGitHub, SimRunners};
use arcfed_agent_core::holder::{
    Action, CoordOp, CreateOutcome, GitHubOp, Holder, HolderConfig, Input, Note, Phase as HolderPhase, PollOutcome,
    ReleaseReason, resume_on_grant,
};
use arcfed_agent_core::link::{FenceView, Link, LinkAction, LinkConfig, LinkEvent};
use arcfed_agent_core::scaler::{Patch, Scaler};
use arcfed_proto as pb;
use arcfed_proto::clock::boottime_ms;
use arcfed_proto::coordinator_message::Msg as Out;
use futures::future::BoxFuture;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// ARC's ERS controller replaces finished runners only on a new patchID: re-patch at least
/// this often even when nothing changed (DESIGN §5.6).
const REPATCH_EVERY_MS: u64 = 50_000;
/// A coordinator request with no answer after this is resent (its outcome is unknown).
const COORD_TIMEOUT_MS: u64 = 3_000;
/// On SIGTERM the release must be done well inside ARC's 60 s grace period (DESIGN §5.7).
const SHUTDOWN_BUDGET_MS: u64 = 25_000;
/// Every holder-only request other than the long poll must answer within this (or half the
/// holder-stall time, if shorter: see `op_timeout`); a hung one is dropped and counts as
/// failed, so the holder-stall rule sees a dead GitHub path in time.
const GITHUB_OP_TIMEOUT: Duration = Duration::from_secs(10);

/// The bound on one holder-only request (not the long poll): at most `GITHUB_OP_TIMEOUT`, at
/// most half of `--holder-stall`, at least 1 s. With a silent GitHub path a hung ack and the
/// release's session delete then fit in the stall time plus a few seconds, not 20 s.
fn op_timeout(holder_stall: Duration) -> Duration {
    (holder_stall / 2).clamp(Duration::from_secs(1), GITHUB_OP_TIMEOUT)
}
/// A standalone or fallback holder that let go (a stall) contends again after this.
const REGRANT_AFTER_MS: u64 = 5_000;
/// Attach (connect + TLS + Join) must answer within this.
const ATTACH_TIMEOUT_MS: u64 = 1_500;

/// The gate every holder-only HTTP attempt passes (DESIGN §4): the driver updates the view
/// after every event; `check` compares it with the clock at the moment of the attempt.
pub struct FenceGate {
    view: Mutex<(FenceView, Option<u64>)>,
    /// `arcfed/<cluster>/<member>/t`: with the token, the `ownerName` of the session the
    /// holder opens, sent as `X-Arcfed-Owner` on every holder-only request.
    owner_prefix: String,
}

impl FenceGate {
    fn new(owner_prefix: String) -> FenceGate {
        FenceGate { view: Mutex::new((FenceView::default(), None)), owner_prefix }
    }

    fn set(&self, view: FenceView, token: Option<u64>) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = (view, token);
    }
}

impl Gate for FenceGate {
    fn check(&self) -> Result<(), github::Fenced> {
        let (view, token) = *self.view.lock().unwrap_or_else(|p| p.into_inner());
        // The fence must still cover the attempt after a fresh connect (bounded by the holder
        // client's connect timeout): a request that passes here is on the wire before the
        // fence ends, or not at all.
        let lead = github::HOLDER_CONNECT_TIMEOUT.as_millis() as u64;
        match token {
            Some(t) if view.allows(t, boottime_ms() + lead) => Ok(()),
            _ => Err(github::Fenced),
        }
    }

    fn owner(&self) -> Option<String> {
        let (_, token) = *self.view.lock().unwrap_or_else(|p| p.into_inner());
        token.map(|t| format!("{}{t}", self.owner_prefix))
    }
}

/// A request's gate that refuses every attempt once the driver abandoned the request
/// ([`Driver::abandon_github`]), whatever the fence says by then (a later token, fallback's open
/// fence): an abandoned request is finished only if it was already on its way.
struct Abandonable {
    inner: Arc<dyn Gate>,
    abandoned: Arc<AtomicBool>,
}

impl Gate for Abandonable {
    fn check(&self) -> Result<(), github::Fenced> {
        if self.abandoned.load(Ordering::Relaxed) {
            return Err(github::Fenced);
        }
        self.inner.check()
    }

    fn owner(&self) -> Option<String> {
        self.inner.owner()
    }
}

/// The GitHub calls ARC's controller makes for its runners, for the `sim` backend.
#[derive(Clone)]
pub struct SimVia(pub Client);

impl SimGitHub for SimVia {
    async fn generate_jit(&self, name: &str) -> Result<i64, String> {
        self.0.generate_jit_config(name).await.map(|j| j.runner.id).map_err(|e| e.to_string())
    }
    async fn remove_runner(&self, id: i64) -> Result<bool, String> {
        match self.0.remove_runner(id).await {
            Ok(()) => Ok(true),
            Err(github::Error::JobStillRunning { .. }) => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    }
    async fn runner_registered(&self, id: i64) -> Result<bool, String> {
        self.0.runner_registered(id).await.map_err(|e| e.to_string())
    }
}

/// Work for the runner task: patches are applied in order, off the driver loop.
#[derive(Debug)]
enum RunnerCmd {
    Patch(Patch),
    /// Record our federated session on our ERS (`arcfed.io/session-id`), so that the next
    /// listener of this cluster can delete it once the quorum lists it stale.
    Record(String),
    /// Clear the record if it still names this session.
    ClearRecord(String),
    JobStarted(String, JobStarted),
    JobCompleted(String),
}

/// Result of the one GitHub request in flight.
struct GhDone {
    input: Input,
    /// The session after the call (a 401 refreshes it: new queue URL and token).
    session: Option<wire::Session>,
    message: Option<wire::MessageEnvelope>,
    opened: Option<wire::Session>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CoordKind {
    Commit,
    Progress,
    Release,
    Adopt,
    Leave,
}

enum Event {
    Shutdown,
    Timer,
    Attached(Result<Stream, cc::AttachError>),
    Message(Result<Option<pb::CoordinatorMessage>, tonic::Status>),
    GitHub(GhDone),
    Local(Input),
    /// The stale-session sweep finished: (session id, deleted or already gone).
    Swept(String, bool),
}

pub struct Driver {
    cfg: Config,
    client: Client,
    metrics: Arc<Metrics>,
    http: Arc<HttpState>,
    gate: Arc<FenceGate>,
    github_ready: Arc<AtomicBool>,
    runners_tx: mpsc::Sender<RunnerCmd>,
    runners: Arc<Runners<SimVia>>,
    join: JoinInfo,

    link: Option<Link>,
    group_key: Option<String>,
    holder: Holder,
    /// The mode the holder machine runs in: false = federated (fence from the link).
    open_fence: bool,
    fallback: bool,
    stream: Option<Stream>,
    attaching: Option<BoxFuture<'static, Result<Stream, cc::AttachError>>>,
    /// The last attach failure's message, so a repeated one is not logged at warn again.
    last_attach_error: Option<String>,
    gh: Option<BoxFuture<'static, GhDone>>,
    /// The address of the attach in flight.
    attaching_addr: Option<String>,
    /// The request in `gh` is a session create (see [`Driver::abandon_github`]).
    gh_create: bool,
    /// Set when the request in `gh` is abandoned: its gate then refuses every further attempt.
    gh_abandoned: Arc<AtomicBool>,
    local: Option<BoxFuture<'static, Input>>,
    coord: Option<(u64, CoordKind, u64)>,
    next_request: u64,

    session: Option<wire::Session>,
    /// The fallback session reported with `Adopt` and accepted: resumed under the next Grant.
    adopted: Option<String>,
    /// Reported with `Adopt`, no answer yet.
    adopt_pending: Option<String>,
    /// A Grant that arrived while the Adopt was unanswered.
    deferred_grant: Option<pb::Grant>,
    /// Standalone/fallback: when to contend again after the holder let go.
    regrant_at: Option<u64>,
    /// A freeze drill holds the loop until then.
    frozen_until: Option<u64>,
    local_token: u64,
    /// (token, session) held when the quorum was lost: the same token granted again after it
    /// returns (the coordinator kept our holding) resumes the same session.
    held_before_fallback: Option<(u64, String)>,
    message: Option<wire::MessageEnvelope>,
    stats: wire::Statistics,
    scaler: Scaler,
    assignment: Option<pb::Assignment>,
    capacity: i64,
    next_repatch: u64,
    shutdown_at: Option<u64>,
    pending: VecDeque<Input>,
    /// cert-manager rotates the agent's certificate in place: a change closes the stream, and
    /// the next attach reads the new files.
    tls_watch: Option<(crate::config::TlsWatcher, u64)>,
    /// Raft term of the leader that accepted our last Join (log spans only).
    term: u64,
    /// Federated: the session id our cluster's previous listener recorded on our ERS. Once the
    /// quorum lists it stale (nobody holds it), this member deletes it with its own cluster's
    /// credentials, holder or not (DESIGN §5.12; see `maybe_sweep`).
    predecessor: Option<String>,
    sweep: Option<BoxFuture<'static, (String, bool)>>,
    sweep_next_at: u64,
    sweep_failures: u32,
}

/// How often the TLS files are checked for a rotation.
const TLS_CHECK_EVERY_MS: u64 = 5_000;

/// Runs the agent until `shutdown` turns true (SIGTERM) and the session is released.
pub async fn run(cfg: Config, http: Arc<HttpState>, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let metrics = http.metrics.clone();
    let client = Client::new(cfg.github.clone())?;
    let runners = match &cfg.runner_backend {
        Backend::Kube => Runners::Kube(KubeRunners::from_env(&cfg.ers_namespace, &cfg.ers_name).await?),
        Backend::Sim { state_file } => Runners::Sim(
            SimRunners::open(&cfg.ers_namespace, &cfg.ers_name, Some(state_file.clone()), SimVia(client.clone()))
                .await?,
        ),
    };
    let runners = Arc::new(runners);
    let (runners_tx, runners_rx) = mpsc::channel(256);
    let runner_task = tokio::spawn(runner_task(runners.clone(), runners_rx, metrics.clone()));
    let github_ready = Arc::new(AtomicBool::new(false));
    let ready_task = tokio::spawn(keep_github_ready(client.clone(), github_ready.clone(), metrics.clone()));
    metrics.set_runner_limits(cfg.min_runners, cfg.max_runners);

    let now = boottime_ms();
    let member_id = format!("{:032x}", rand::random::<u128>());
    let standalone = cfg.standalone();
    let holder_cfg = holder_config(&cfg, &member_id);
    let owner_prefix = format!("arcfed/{}/{}/t", holder_cfg.cluster, holder_cfg.member_id);
    let link = (!standalone).then(|| {
        Link::new(
            LinkConfig {
                endpoints: cfg.coordinators.clone(),
                initial_ttl_ms: cfg.lease_ttl.as_millis() as u64,
                attach_timeout_ms: ATTACH_TIMEOUT_MS,
                seed: rand::random(),
            },
            now,
        )
    });
    let join = JoinInfo {
        member_id,
        configure_url: cfg.github.configure_url.clone(),
        scale_set_id: cfg.github.scale_set_id,
        ers_namespace: cfg.ers_namespace.clone(),
        ers_name: cfg.ers_name.clone(),
        weight: cfg.weight,
        min_runners: cfg.min_runners,
        max_runners: cfg.max_runners,
        priority: cfg.priority,
    };
    tracing::info!(
        member = %join.member_id, cluster = %cfg.cluster, scale_set = cfg.github.scale_set_id,
        mode = if standalone { "standalone" } else { "federated" }, "arcfed-agent starting"
    );
    let mut d = Driver {
        scaler: Scaler::new(cfg.min_runners, cfg.max_runners),
        capacity: cfg.max_runners.clamp(0, i32::MAX as i64),
        holder: Holder::new(holder_cfg, now),
        cfg,
        client,
        metrics,
        http,
        gate: Arc::new(FenceGate::new(owner_prefix)),
        github_ready,
        runners_tx,
        runners: runners.clone(),
        join,
        link,
        group_key: None,
        open_fence: standalone,
        fallback: false,
        stream: None,
        attaching: None,
        last_attach_error: None,
        gh: None,
        attaching_addr: None,
        gh_create: false,
        gh_abandoned: Arc::new(AtomicBool::new(false)),
        local: None,
        coord: None,
        next_request: 1,
        session: None,
        adopted: None,
        adopt_pending: None,
        deferred_grant: None,
        regrant_at: None,
        frozen_until: None,
        local_token: 0,
        held_before_fallback: None,
        message: None,
        stats: wire::Statistics::default(),
        assignment: None,
        next_repatch: now + REPATCH_EVERY_MS,
        shutdown_at: None,
        pending: VecDeque::new(),
        tls_watch: None,
        term: 0,
        predecessor: None,
        sweep: None,
        sweep_next_at: 0,
        sweep_failures: 0,
    };
    d.tls_watch = d.cfg.tls.clone().map(|p| (crate::config::TlsWatcher::new(p), now + TLS_CHECK_EVERY_MS));
    if standalone {
        d.start_open_holder().await;
    } else {
        d.predecessor = match runners.session_record().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the session record on the EphemeralRunnerSet; continuing without it");
                None
            }
        };
        if let Some(id) = &d.predecessor {
            tracing::info!(session = %id, "our cluster's previous listener recorded a session: deleting it once the quorum lists it stale");
        }
    }
    let result = d.run_loop(&mut shutdown).await;
    ready_task.abort();
    // Let queued ERS patches land (the drain's force-zero patch in particular).
    drop(d);
    let _ = tokio::time::timeout(Duration::from_secs(5), runner_task).await;
    result
}

impl Driver {
    /// Standalone and fallback: hold with an open fence; first delete a recorded session
    /// that is not ours (a SIGKILLed predecessor's), then open our own.
    async fn start_open_holder(&mut self) {
        let recorded = match self.runners.session_record().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the session record on the EphemeralRunnerSet; continuing without it");
                None
            }
        };
        if let Some(id) = &recorded {
            tracing::info!(session = %id, "a predecessor's session is recorded on our ERS: deleting it first");
        }
        self.open_fence = true;
        self.pending.push_back(Input::Granted {
            token: 0,
            stale_sessions: recorded.into_iter().collect(),
            last_acked_message_id: 0,
            resume: None,
        });
    }

    fn now(&self) -> u64 {
        boottime_ms()
    }

    /// The fence the holder machine and the HTTP gate see now.
    fn fence(&self) -> FenceView {
        if self.open_fence {
            return FenceView::open();
        }
        match (&self.link, &self.group_key) {
            (Some(l), Some(g)) => l.fence(g),
            _ => FenceView::default(),
        }
    }

    fn next_wakeup(&self) -> u64 {
        let fence = self.fence();
        let mut t = self.next_repatch;
        if let Some(l) = &self.link {
            t = t.min(l.next_wakeup());
            if !self.fallback && !self.cfg.coordinator_lost_for.is_zero() {
                // Fallback check (DESIGN §5.11).
                if let Some(down) = l.down_for(self.now()) {
                    let left = (self.cfg.coordinator_lost_for.as_millis() as u64).saturating_sub(down);
                    t = t.min(self.now() + left.max(1));
                }
            }
        }
        if let Some(h) = self.holder.next_wakeup(self.now(), &fence) {
            t = t.min(h);
        }
        if let Some((_, _, deadline)) = self.coord {
            t = t.min(deadline);
        }
        if let Some(s) = self.shutdown_at {
            t = t.min(s);
        }
        if let Some((_, next)) = &self.tls_watch {
            t = t.min(*next);
        }
        if let Some(r) = self.regrant_at {
            t = t.min(r);
        }
        if self.sweep_due().is_some() {
            t = t.min(self.sweep_next_at);
        }
        t
    }

    async fn next_event(&mut self, shutdown: &mut watch::Receiver<bool>) -> Event {
        let wake = self.next_wakeup();
        let sleep_ms = wake.saturating_sub(self.now()).min(60_000);
        let shutting = self.shutdown_at.is_some();
        tokio::select! {
            biased;
            r = shutdown.changed(), if !shutting => {
                if r.is_err() || *shutdown.borrow() { Event::Shutdown } else { Event::Timer }
            }
            // The fence deadline wins over everything else that is ready.
            _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => Event::Timer,
            r = async { match self.attaching.as_mut() { Some(f) => f.await, None => std::future::pending().await } } => {
                self.attaching = None;
                Event::Attached(r)
            }
            m = async { match self.stream.as_mut() { Some(s) => s.rx.message().await, None => std::future::pending().await } } => Event::Message(m),
            g = async { match self.gh.as_mut() { Some(f) => f.await, None => std::future::pending().await } } => {
                self.gh = None;
                Event::GitHub(g)
            }
            i = async { match self.local.as_mut() { Some(f) => f.await, None => std::future::pending().await } } => {
                self.local = None;
                Event::Local(i)
            }
            (id, ok) = async { match self.sweep.as_mut() { Some(f) => f.await, None => std::future::pending().await } } => {
                self.sweep = None;
                Event::Swept(id, ok)
            }
        }
    }

    async fn run_loop(&mut self, shutdown: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
        loop {
            self.pump_link(LinkEvent::Tick);
            self.pump_holder(Input::Tick);
            self.periodic();
            self.publish();
            self.http.beat();
            if let Some(t) = self.frozen_until.take() {
                // Blocks this loop only (the admin HTTP server keeps answering), like SIGSTOP.
                tokio::time::sleep(Duration::from_millis(t.saturating_sub(self.now()))).await;
                tracing::warn!("drill: freeze over");
                continue;
            }
            if self.holder.is_done() || self.shutdown_at.is_some_and(|s| self.now() >= s) {
                self.leave().await;
                return Ok(());
            }
            match self.next_event(shutdown).await {
                Event::Shutdown => {
                    tracing::info!("shutting down: releasing the session if held");
                    self.shutdown_at = Some(self.now() + SHUTDOWN_BUDGET_MS);
                    if self.holder.is_holding() {
                        self.pump_holder(Input::Shutdown);
                    } else {
                        self.leave().await;
                        return Ok(());
                    }
                }
                Event::Timer => {
                    if let Some((_, kind, deadline)) = self.coord
                        && self.now() >= deadline
                    {
                        tracing::warn!(?kind, "no answer from the coordinator; will resend");
                        self.coord = None;
                        if kind == CoordKind::Adopt {
                            // Unanswered: never resume an uncommitted session.
                            self.adopt_pending = None;
                            if let Some(g) = self.deferred_grant.take() {
                                self.on_coordinator(pb::CoordinatorMessage { msg: Some(Out::Grant(g)) });
                            }
                        }
                        if kind != CoordKind::Adopt && kind != CoordKind::Leave {
                            self.pump_holder(Input::CoordUnavailable);
                        }
                    }
                }
                Event::Attached(Ok(stream)) => {
                    let endpoint = self.attaching_addr.take().unwrap_or_default();
                    tracing::info!(%endpoint, "coordinator stream attached; Join sent");
                    self.metrics.set_coordinator_endpoint(Some(&endpoint));
                    self.last_attach_error = None;
                    self.metrics.tls_not_after.set(stream.cert_not_after);
                    self.stream = Some(stream);
                }
                Event::Attached(Err(e)) => {
                    // A new reason is a warning (an expired certificate, a refused Join); the
                    // same reason again, while the link retries with back-off, is debug.
                    if self.last_attach_error.as_deref() != Some(e.message.as_str()) {
                        tracing::warn!(error = %e.message, redirect = ?e.redirect, unreachable = e.unreachable, "attach failed");
                        self.last_attach_error = Some(e.message.clone());
                    } else {
                        tracing::debug!(error = %e.message, redirect = ?e.redirect, unreachable = e.unreachable, "attach failed");
                    }
                    if e.unreachable {
                        self.stream = None;
                        self.pump_link(LinkEvent::Unreachable);
                    } else {
                        self.stream_failed(e.redirect);
                    }
                }
                Event::Message(Ok(Some(m))) => self.on_coordinator(m),
                Event::Message(Ok(None)) => {
                    tracing::info!("coordinator closed the stream");
                    self.stream_failed(None);
                }
                Event::Message(Err(st)) => {
                    tracing::info!(code = ?st.code(), message = st.message(), "coordinator stream failed");
                    self.stream_failed(arcfed_proto::leader::leader_hint(&st));
                }
                Event::GitHub(done) => self.on_github(done),
                Event::Local(input) => self.pump_holder(input),
                Event::Swept(id, ok) => self.on_swept(id, ok),
            }
        }
    }

    fn stream_failed(&mut self, redirect: Option<String>) {
        self.stream = None;
        self.metrics.coordinator_connected.set(0);
        self.metrics.set_coordinator_endpoint(None);
        if self.coord.take().is_some_and(|(_, k, _)| k != CoordKind::Adopt && k != CoordKind::Leave) {
            self.pending.push_back(Input::CoordUnavailable);
        }
        self.pump_link(LinkEvent::StreamFailed { redirect });
    }

    fn send(&mut self, m: pb::agent_message::Msg) -> bool {
        match &self.stream {
            Some(s) => s.tx.try_send(cc::msg(m)).is_ok(),
            None => false,
        }
    }

    /// Steps the link and executes what it asks for.
    fn pump_link(&mut self, ev: LinkEvent) {
        let now = self.now();
        let Some(link) = self.link.as_mut() else { return };
        let actions = link.step(now, ev);
        // The lease this process holds, if any (None after EXPIRED): a Join names it so that a
        // leader that still holds it live re-attaches without a log write.
        let resume_epoch = link.epoch.unwrap_or(0);
        for a in actions {
            match a {
                LinkAction::Attach { addr, keepalive_seq } => {
                    let Some(tls) = self.cfg.tls.clone() else { continue };
                    let ready = self.github_ready.load(Ordering::Relaxed);
                    let join = cc::join(&self.join, ready, resume_epoch, keepalive_seq);
                    tracing::debug!(%addr, "attaching to coordinator");
                    self.stream = None;
                    self.attaching_addr = Some(addr.clone());
                    self.attaching = Some(Box::pin(async move {
                        cc::attach(&tls, &addr, join, Duration::from_millis(ATTACH_TIMEOUT_MS)).await
                    }));
                }
                LinkAction::SendJoin => {
                    // After EXPIRED: a new lease, so no keepalive to stand for.
                    let join = cc::join(&self.join, self.github_ready.load(Ordering::Relaxed), resume_epoch, 0);
                    if let Some(s) = &self.stream {
                        let _ = s.tx.try_send(join);
                    }
                }
                LinkAction::SendKeepalive { seq } => {
                    tracing::trace!(seq, "keepalive");
                    let ready = self.github_ready.load(Ordering::Relaxed);
                    self.send(pb::agent_message::Msg::Keepalive(pb::Keepalive { seq, github_ready: ready }));
                }
                LinkAction::Close { reason } => {
                    tracing::info!(reason, "leaving this coordinator");
                    self.attaching = None;
                    self.stream = None;
                    self.metrics.coordinator_connected.set(0);
                    self.metrics.set_coordinator_endpoint(None);
                    if self.coord.take().is_some_and(|(_, k, _)| k != CoordKind::Adopt && k != CoordKind::Leave) {
                        self.pending.push_back(Input::CoordUnavailable);
                    }
                }
            }
        }
        self.gate.set(self.fence(), self.holder.token);
    }

    /// Steps the holder with `input` (and anything queued), executing its actions.
    fn pump_holder(&mut self, input: Input) {
        // Every log line about the session carries the group and the fencing token.
        let span = tracing::info_span!(
            "holder",
            group = self.group_key.as_deref().unwrap_or(""),
            token = self.holder.token.map_or(-1, |t| t as i64),
            term = self.term
        );
        let _entered = span.enter();
        self.pending.push_back(input);
        while let Some(input) = self.pending.pop_front() {
            let fence = self.fence();
            let actions = self.holder.step(self.now(), &fence, input);
            self.gate.set(self.fence(), self.holder.token);
            for a in actions {
                self.exec(a);
            }
        }
        self.gate.set(self.fence(), self.holder.token);
    }

    fn exec(&mut self, a: Action) {
        match a {
            Action::GitHub(op) => self.start_github(op),
            Action::Coord(op) => self.start_coord(op),
            Action::Notify(op) => self.notify(op),
            Action::Cancel => self.abandon_github("the fence deadline"),
            // One executor for every link action: a timer that falls due in this step (a no-ack
            // close, a retry's attach) is carried out, not dropped. A Close queues
            // `CoordUnavailable`, which the pump_holder loop running this drains.
            Action::KeepaliveNow => self.pump_link(LinkEvent::KeepaliveNow),
            Action::Forget { session_id } => {
                if self.session.as_ref().is_some_and(|s| s.session_id == session_id) {
                    self.session = None;
                }
                self.message = None;
            }
            Action::Note(n) => self.note(n),
        }
    }

    fn note(&mut self, n: Note) {
        let m = &self.metrics;
        match &n {
            Note::Conflict { foreign } => {
                m.conflicts_409.inc();
                m.foreign_session.set(i64::from(*foreign));
                if *foreign {
                    tracing::error!(
                        "409: the session belongs to a non-arcfed owner; a stock ARC listener still runs somewhere (foreign_session)"
                    );
                } else {
                    tracing::info!("409: the scale set still has a session; backing off");
                }
            }
            Note::RevocationIneffective => {
                m.revocation_ineffective.inc();
                tracing::warn!("409 right after revoking the predecessor's sessions (revocation_ineffective)");
            }
            Note::ConflictAlert => {
                tracing::error!(
                    "409s for over 120 s, past GitHub's ~90 s orphan expiry: someone else holds the session"
                )
            }
            Note::SelfFenced => {
                m.self_fence.inc();
                tracing::warn!(token = ?self.holder.token, "fence reached: holder-only requests stopped");
            }
            Note::LostLease => {
                tracing::warn!("lease lost: stopped holder-only requests; standing by");
                self.session = None;
                self.message = None;
            }
            Note::SessionOpened => {
                m.session_creates.inc();
                m.foreign_session.set(0);
            }
            Note::TookOver { token } => {
                m.takeovers.inc();
                tracing::info!(token, "granted: taking over the session");
            }
            Note::Released { reason } => {
                tracing::info!(?reason, "session released");
            }
            Note::StaleTokenRejected => {
                m.stale_token_rejections.inc();
                tracing::warn!("coordinator rejected our token as stale");
            }
        }
    }

    /// Drops the GitHub request in flight, except a session create, which is left to finish
    /// on its own: its POST left inside the fence and may have opened a session that only its
    /// answer names. Such a session is ours and nobody's live session, so it is deleted with
    /// our own credentials (safety review M3.3); forgetting it would leave the next holder
    /// meeting 409s until GitHub expires it.
    fn abandon_github(&mut self, why: &'static str) {
        let Some(fut) = self.gh.take() else { return };
        // An attempt not yet through its gate (an admin token still being fetched, a retry
        // waiting) is never sent: only a POST already on its way can have opened a session.
        self.gh_abandoned.store(true, Ordering::Relaxed);
        if !std::mem::take(&mut self.gh_create) {
            tracing::info!(why, "in-flight GitHub request abandoned");
            return;
        }
        tracing::info!(why, "in-flight session create abandoned; a session it opens will be deleted");
        let client = self.client.clone();
        tokio::spawn(async move {
            let Some(s) = fut.await.opened else { return };
            let id = s.session_id;
            let r = tokio::time::timeout(Duration::from_secs(60), client.delete_session(&github::Open, &id)).await;
            match r {
                Ok(Ok(())) => tracing::warn!(session = %id, why, "session opened by an abandoned create deleted"),
                Ok(Err(e)) => {
                    tracing::warn!(session = %id, error = %e, "session opened by an abandoned create not deleted")
                }
                Err(_) => tracing::warn!(session = %id, "session opened by an abandoned create not deleted (timeout)"),
            }
        });
    }

    fn start_github(&mut self, op: GitHubOp) {
        tracing::debug!(?op, token = ?self.holder.token, "GitHub request");
        self.gh_create = matches!(op, GitHubOp::CreateSession { .. });
        let client = self.client.clone();
        let inner: Arc<dyn Gate> = if self.open_fence { Arc::new(github::Open) } else { self.gate.clone() };
        self.gh_abandoned = Arc::new(AtomicBool::new(false));
        let gate: Arc<dyn Gate> = Arc::new(Abandonable { inner, abandoned: self.gh_abandoned.clone() });
        let session = self.session.clone();
        let message = self.message.clone();
        let capacity = self.capacity;
        let metrics = self.metrics.clone();
        let timeout = op_timeout(self.cfg.holder_stall);
        let fut: BoxFuture<'static, GhDone> = match op {
            GitHubOp::DeleteSession { id } => Box::pin(async move {
                let r = match tokio::time::timeout(timeout, client.delete_session(gate.as_ref(), &id)).await {
                    Ok(r) => r,
                    Err(_) => Err(github::Error::Config(format!("session delete timed out after {timeout:?}"))),
                };
                if let Err(e) = &r {
                    tracing::warn!(session = %id, error = %e, "session delete failed");
                    metrics.github_error(error_kind(e));
                } else {
                    metrics.session_deletes.inc();
                }
                GhDone { input: Input::Deleted { id, done: r.is_ok() }, session, message, opened: None }
            }),
            GitHubOp::CreateSession { owner } => Box::pin(async move {
                let r = tokio::time::timeout(timeout, client.create_session(gate.as_ref(), &owner)).await;
                let (outcome, opened) = match r {
                    // No answer in time: the session may exist (a possible orphan).
                    Err(_) => {
                        metrics.github_error("timeout");
                        (CreateOutcome::Ambiguous { local: true }, None)
                    }
                    Ok(r) => match r {
                        Ok(s) => (CreateOutcome::Opened { session_id: s.session_id.clone() }, Some(s)),
                        Err(github::Error::Conflict { foreign, owner, .. }) => {
                            tracing::info!(?owner, "409 on session create");
                            (CreateOutcome::Conflict { foreign }, None)
                        }
                        Err(e) => {
                            metrics.github_error(error_kind(&e));
                            tracing::warn!(error = %e, "session create failed");
                            let ambiguous = matches!(e, github::Error::Transport { .. })
                                || matches!(e, github::Error::Status { status, .. } if status >= 500);
                            let local = e.is_local();
                            if ambiguous {
                                (CreateOutcome::Ambiguous { local }, None)
                            } else {
                                (CreateOutcome::Failed { local }, None)
                            }
                        }
                    },
                };
                GhDone { input: Input::Created(outcome), session, message, opened }
            }),
            GitHubOp::Poll { last_message_id } => Box::pin(async move {
                let Some(mut s) = session else {
                    return GhDone {
                        input: Input::Polled(PollOutcome::Gone),
                        session: None,
                        message: None,
                        opened: None,
                    };
                };
                let started = std::time::Instant::now();
                let r = client.get_message(gate.as_ref(), &mut s, last_message_id, capacity).await;
                metrics.observe_github_request("get_message", started.elapsed());
                let (outcome, msg) = match r {
                    Ok(None) => (PollOutcome::Empty, None),
                    Ok(Some(m)) => {
                        let (jobs, _) = github::job_messages(&m.body);
                        let job_available = jobs.iter().any(|j| j.message_type == "JobAvailable");
                        (PollOutcome::Message { message_id: m.message_id, job_available }, Some(m))
                    }
                    Err(github::Error::SessionGone { .. }) => (PollOutcome::Gone, None),
                    Err(e @ (github::Error::EmptyBody { .. } | github::Error::Decode { .. })) => {
                        metrics.github_error(error_kind(&e));
                        tracing::warn!(error = %e, "poll glitch; polling again");
                        (PollOutcome::Glitch, None)
                    }
                    Err(github::Error::Fenced) => (PollOutcome::Failed { local: false }, None),
                    Err(e) => {
                        metrics.github_error(error_kind(&e));
                        tracing::warn!(error = %e, "poll failed");
                        (PollOutcome::Failed { local: e.is_local() }, None)
                    }
                };
                GhDone { input: Input::Polled(outcome), session: Some(s), message: msg, opened: None }
            }),
            GitHubOp::Acquire { message_id } => Box::pin(async move {
                let ids: Vec<i64> = message
                    .as_ref()
                    .filter(|m| m.message_id == message_id)
                    .map(|m| {
                        github::job_messages(&m.body)
                            .0
                            .into_iter()
                            .filter(|j| j.message_type == "JobAvailable")
                            .map(|j| j.runner_request_id)
                            .collect()
                    })
                    .unwrap_or_default();
                let mut s = session;
                let mut input = Input::Acquired;
                if let Some(sess) = s.as_mut()
                    && !ids.is_empty()
                {
                    match tokio::time::timeout(timeout, client.acquire_jobs(gate.as_ref(), sess, &ids)).await {
                        Ok(Ok(got)) => {
                            let missed = ids.len().saturating_sub(got.len());
                            if missed > 0 {
                                metrics.acquire_repeats.inc_by(missed as u64);
                            }
                        }
                        Ok(Err(e)) => {
                            metrics.github_error(error_kind(&e));
                            tracing::warn!(error = %e, "acquire failed; will retry before reporting the message");
                            input = Input::AcquireFailed { local: e.is_local() };
                        }
                        Err(_) => {
                            metrics.github_error("timeout");
                            input = Input::AcquireFailed { local: true };
                        }
                    }
                }
                GhDone { input, session: s, message, opened: None }
            }),
            GitHubOp::AcquireAvailable => Box::pin(async move {
                let mut s = session;
                if let Some(sess) = s.as_mut() {
                    let swept = tokio::time::timeout(timeout, async {
                        let Some(jobs) = client.acquirable_jobs(gate.as_ref()).await? else { return Ok(0) };
                        let ids: Vec<i64> = jobs
                            .iter()
                            .filter_map(|j| j.get("runnerRequestId").and_then(serde_json::Value::as_i64))
                            .filter(|id| *id > 0)
                            .collect();
                        if ids.is_empty() {
                            return Ok(0);
                        }
                        client.acquire_jobs(gate.as_ref(), sess, &ids).await.map(|got| got.len())
                    })
                    .await;
                    match swept {
                        Ok(Ok(0)) => {}
                        Ok(Ok(n)) => tracing::info!(jobs = n, "acquired jobs a predecessor left available"),
                        Ok(Err(e)) => {
                            metrics.github_error(error_kind(&e));
                            tracing::warn!(error = %e, "acquiring the available jobs failed; polling anyway");
                        }
                        Err(_) => metrics.github_error("timeout"),
                    }
                }
                GhDone { input: Input::Swept, session: s, message, opened: None }
            }),
            GitHubOp::AckMessage { message_id } => Box::pin(async move {
                let mut s = session;
                let (ok, local) = match s.as_mut() {
                    Some(sess) => {
                        match tokio::time::timeout(timeout, client.delete_message(gate.as_ref(), sess, message_id))
                            .await
                            .unwrap_or_else(|_| Err(github::Error::Config("message ack timed out".into())))
                        {
                            Ok(()) => (true, false),
                            Err(e) => {
                                metrics.github_error(error_kind(&e));
                                tracing::warn!(error = %e, message_id, "message ack failed; will retry");
                                // Only the fence is no reason of ours (safety review L4):
                                // any other failure, persistent, must still end in a stall.
                                (false, !matches!(e, github::Error::Fenced))
                            }
                        }
                    }
                    None => (false, true),
                };
                if ok {
                    metrics.last_message_id.set(message_id);
                }
                GhDone { input: Input::Acked { ok, local }, session: s, message, opened: None }
            }),
        };
        self.gh = Some(fut);
    }

    fn on_github(&mut self, done: GhDone) {
        tracing::debug!(input = ?done.input, "GitHub result");
        if let Some(s) = done.opened {
            self.stats = s.statistics;
            self.session = Some(s);
            self.message = None;
        } else if let Some(s) = done.session
            && self.session.as_ref().is_some_and(|cur| cur.session_id == s.session_id)
        {
            self.session = Some(s);
        }
        if let Some(m) = done.message {
            self.message = Some(m);
        }
        self.pump_holder(done.input);
    }

    fn request_id(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    fn start_coord(&mut self, op: CoordOp) {
        if self.open_fence {
            self.start_local(op);
            return;
        }
        let rid = self.request_id();
        let (kind, msg) = match op {
            CoordOp::Commit { token, session_id } => (
                {
                    self.metrics.record_statistics(&self.stats);
                    // Best effort and off the commit's path: the record only lets this
                    // cluster's next listener free the slot early (see `maybe_sweep`).
                    let _ = self.runners_tx.try_send(RunnerCmd::Record(session_id.clone()));
                    CoordKind::Commit
                },
                pb::agent_message::Msg::SessionOpened(pb::SessionOpened {
                    request_id: rid,
                    token,
                    session_id,
                    statistics: Some(cc::stats(&self.stats)),
                }),
            ),
            CoordOp::Progress { token, message_id } => {
                let (statistics, events) = match (&self.message, message_id) {
                    (Some(m), Some(id)) if m.message_id == id => {
                        let (jobs, ignored) = github::job_messages(&m.body);
                        if ignored > 0 {
                            self.metrics.ignored_message("job_message");
                        }
                        self.holder_job_metrics(&jobs);
                        (m.statistics, jobs.iter().filter_map(cc::job_event).collect())
                    }
                    _ => (self.stats, vec![]),
                };
                if message_id.is_some() {
                    self.stats = statistics;
                }
                // Scale-set-wide gauges come from the holder only (DESIGN §7).
                self.metrics.record_statistics(&statistics);
                (
                    CoordKind::Progress,
                    pb::agent_message::Msg::Progress(pb::Progress {
                        request_id: rid,
                        token,
                        message_id,
                        statistics: Some(cc::stats(&statistics)),
                        events,
                    }),
                )
            }
            CoordOp::Release { token, deleted, reason } => (
                {
                    for id in &deleted {
                        let _ = self.runners_tx.try_send(RunnerCmd::ClearRecord(id.clone()));
                    }
                    CoordKind::Release
                },
                pb::agent_message::Msg::Release(pb::Release {
                    request_id: rid,
                    token,
                    deleted,
                    reason: release_reason(reason) as i32,
                    detail: String::new(),
                }),
            ),
        };
        if self.send(msg) {
            self.coord = Some((rid, kind, self.now() + COORD_TIMEOUT_MS));
        } else {
            self.pending.push_back(Input::CoordUnavailable);
        }
    }

    /// Sends a report nothing waits for (its answer is ignored: no request slot is taken).
    fn notify(&mut self, op: CoordOp) {
        if self.open_fence {
            return; // nobody to tell: standalone and fallback keep no stale set
        }
        if let CoordOp::Release { token, deleted, reason } = op {
            let rid = self.request_id();
            self.send(pb::agent_message::Msg::Release(pb::Release {
                request_id: rid,
                token,
                deleted,
                reason: release_reason(reason) as i32,
                detail: String::new(),
            }));
        }
    }

    /// Standalone and fallback: what the coordinator would do, done locally.
    fn start_local(&mut self, op: CoordOp) {
        let runners = self.runners.clone();
        match op {
            CoordOp::Commit { session_id, .. } => {
                // The session's statistics drive the first scaling, as ARC's listener does.
                let stats = self.stats;
                self.local_scale(&stats, false);
                self.local = Some(Box::pin(async move {
                    if let Err(e) = runners.set_session_record(Some(&session_id)).await {
                        tracing::warn!(error = %e, "cannot record the session id on the EphemeralRunnerSet");
                    }
                    Input::Committed { accepted: true }
                }));
            }
            CoordOp::Progress { message_id, .. } => {
                let mut stats = self.stats;
                let mut dirty = false;
                if let (Some(m), Some(id)) = (self.message.clone(), message_id)
                    && m.message_id == id
                {
                    stats = m.statistics;
                    self.stats = stats;
                    let (jobs, _) = github::job_messages(&m.body);
                    self.holder_job_metrics(&jobs);
                    for j in &jobs {
                        if let Some(ev) = cc::job_event(j) {
                            dirty = true;
                            self.route_job_event(&ev);
                        }
                    }
                }
                self.local_scale(&stats, dirty);
                self.pending.push_back(Input::Reported { accepted: true, duplicate: false });
            }
            CoordOp::Release { deleted, .. } => {
                let ours = self.session.as_ref().map(|s| s.session_id.clone());
                self.local = Some(Box::pin(async move {
                    if ours.is_some_and(|o| deleted.contains(&o))
                        && let Err(e) = runners.set_session_record(None).await
                    {
                        tracing::warn!(error = %e, "cannot clear the session record");
                    }
                    Input::ReleaseSent
                }));
            }
        }
    }

    /// ARC's single-cluster algorithm: desired = min(min + totalAssignedJobs, max).
    fn local_scale(&mut self, stats: &wire::Statistics, dirty: bool) {
        let runners = self.cfg.min_runners.saturating_add(stats.total_assigned_jobs.max(0));
        self.metrics.record_statistics(stats);
        self.apply_assignment(runners, dirty, false);
    }

    fn holder_job_metrics(&self, jobs: &[wire::JobMessage]) {
        for j in jobs {
            match j.message_type.as_str() {
                "JobStarted" => self.metrics.job_started(j),
                "JobCompleted" => self.metrics.job_completed(j),
                "JobAvailable" | "JobAssigned" => {}
                other => {
                    tracing::debug!(kind = other, "unknown job message type ignored");
                    self.metrics.ignored_message("job_type");
                }
            }
        }
    }

    fn apply_assignment(&mut self, runners: i64, dirty: bool, force_zero: bool) {
        let before = self.scaler.last_target();
        let p = self.scaler.on_assignment(runners, dirty, force_zero);
        if p.replicas != before {
            tracing::info!(replicas = p.replicas, patch_id = p.patch_id, "desired runners changed");
        }
        self.metrics.set_desired_runners(p.replicas);
        self.next_repatch = self.now() + REPATCH_EVERY_MS;
        if self.runners_tx.try_send(RunnerCmd::Patch(p)).is_err() {
            tracing::warn!("runner task is behind; dropping a patch (the next push re-patches)");
        }
    }

    fn route_job_event(&mut self, ev: &pb::JobEvent) {
        // Only this member's runners (name prefixed by our ERS name) are ours to patch.
        if !ev.runner_name.starts_with(&self.cfg.ers_name) {
            return;
        }
        let cmd = if ev.kind == pb::JobEventKind::Started as i32 {
            RunnerCmd::JobStarted(
                ev.runner_name.clone(),
                JobStarted {
                    job_request_id: ev.runner_request_id,
                    repository: format!("{}/{}", ev.owner_name, ev.repository_name),
                    job_id: ev.job_id.clone(),
                    workflow_run_id: ev.workflow_run_id,
                    job_workflow_ref: ev.job_workflow_ref.clone(),
                    job_display_name: ev.job_display_name.clone(),
                },
            )
        } else {
            RunnerCmd::JobCompleted(ev.runner_name.clone())
        };
        let _ = self.runners_tx.try_send(cmd);
    }

    fn on_coordinator(&mut self, m: pb::CoordinatorMessage) {
        let Some(m) = m.msg else { return };
        match m {
            Out::Joined(j) => {
                tracing::info!(epoch = j.epoch, term = j.term, group = %j.group_key, cluster = %j.cluster, ttl_ms = j.lease_ttl_ms, "joined");
                self.term = j.term;
                self.group_key = Some(j.group_key.clone());
                self.metrics.coordinator_connected.set(1);
                self.pump_link(LinkEvent::Joined {
                    epoch: j.epoch,
                    ttl_ms: j.lease_ttl_ms,
                    margin_permille: u64::from(j.margin_permille),
                    ack: j.ack.map(|a| (a.seq, a.held.into_iter().map(|h| (h.group_key, h.token)).collect())),
                });
                if self.fallback && self.shutdown_at.is_none() {
                    self.end_fallback();
                }
            }
            Out::Ack(a) => {
                let held = a.held.into_iter().map(|h| (h.group_key, h.token)).collect();
                self.pump_link(LinkEvent::Ack { seq: a.seq, held });
            }
            Out::Expired(e) => {
                tracing::warn!(reason = %e.reason, "lease expired: joining again for a new epoch");
                self.pump_link(LinkEvent::Expired);
            }
            Out::Grant(mut g) => {
                if let Some(a) = g.ack.take() {
                    let held = a.held.into_iter().map(|h| (h.group_key, h.token)).collect();
                    self.pump_link(LinkEvent::GrantAck { seq: a.seq, held });
                }
                if !self.fallback {
                    // Resume the adopted session only if it is still the one we have open.
                    if self.coord.is_some_and(|(_, k, _)| k == CoordKind::Adopt) {
                        // The Adopt's answer decides whether this Grant resumes our session.
                        self.deferred_grant = Some(g);
                        return;
                    }
                    let open = self.session.as_ref().map(|s| s.session_id.clone());
                    // Both resume candidates are consumed by this Grant, whichever is used: a
                    // leftover would make a much later Grant resume a session that has since
                    // been released or deleted (found by a 200-fault random run: a holder
                    // polled a deleted session's queue token under a new token).
                    let kept = self.held_before_fallback.take().filter(|(t, _)| *t == g.token).map(|(_, s)| s);
                    let adopted = self.adopted.take();
                    let resume = resume_on_grant(
                        open.as_deref(),
                        adopted,
                        kept,
                        (!g.session_id.is_empty()).then_some(g.session_id.as_str()),
                        &g.stale_sessions,
                    );
                    if resume.is_none() && self.holder.token.is_none() {
                        self.session = None;
                    }
                    self.pump_holder(Input::Granted {
                        token: g.token,
                        stale_sessions: g.stale_sessions,
                        last_acked_message_id: g.last_acked_message_id,
                        resume,
                    });
                }
            }
            Out::Handover(h) => {
                tracing::info!(token = h.token, to = %h.to_member, "handover requested");
                self.pump_holder(Input::Handover { token: h.token });
            }
            Out::Assignment(a) => {
                let stale = self.assignment.as_ref().is_some_and(|p| p.revision > a.revision);
                if stale {
                    return;
                }
                self.metrics.assigned_replicas.set(a.runners);
                if a.max_capacity > 0 || self.holder.is_holding() {
                    self.capacity = a.max_capacity.clamp(0, i32::MAX as i64);
                }
                if !self.fallback {
                    self.apply_assignment(a.runners, a.dirty, a.force_zero_patch);
                }
                // A DeleteSessions effect can be lost (a full stream queue, a lagged
                // broadcast); the Assignment is re-pushed whenever the stale list changes, so
                // the holder takes its stale ids from there too.
                if let Some(token) = self.holder.token
                    && !a.stale_sessions.is_empty()
                {
                    self.pump_holder(Input::DeleteSessions { token, ids: a.stale_sessions.clone() });
                }
                self.assignment = Some(a);
                self.maybe_sweep();
            }
            Out::JobEvent(e) => {
                if let Some(ev) = e.event {
                    self.route_job_event(&ev);
                }
            }
            Out::Drill(d) => self.drill(d),
            Out::DeleteSessions(d) => {
                self.pump_holder(Input::DeleteSessions { token: d.token, ids: d.session_ids });
            }
            Out::Result(r) => {
                let Some((rid, kind, _)) = self.coord else { return };
                if r.request_id != rid {
                    return;
                }
                self.coord = None;
                let (accepted, duplicate) = match &r.result {
                    Some(pb::command_result::Result::Accepted(a)) => (true, a.duplicate),
                    Some(pb::command_result::Result::Rejected(x)) => {
                        tracing::warn!(?kind, reason = %x.reason, "coordinator rejected");
                        // Not committed (a Raft hiccup): the outcome is unknown, resend. Only a
                        // decided rejection (stale token, …) means the holding is gone.
                        if x.reason.starts_with("not_committed") && kind != CoordKind::Adopt && kind != CoordKind::Leave
                        {
                            self.pump_holder(Input::CoordUnavailable);
                            return;
                        }
                        (false, false)
                    }
                    None => (false, false),
                };
                match kind {
                    CoordKind::Commit => self.pump_holder(Input::Committed { accepted }),
                    CoordKind::Progress => self.pump_holder(Input::Reported { accepted, duplicate }),
                    CoordKind::Release => self.pump_holder(Input::ReleaseSent),
                    CoordKind::Adopt => {
                        if accepted {
                            // Committed: the Grant that follows resumes this session.
                            self.adopted = self.adopt_pending.take();
                        } else {
                            // Another member holds (it deletes our session through
                            // DeleteSessions), or the coordinator kept our own holding.
                            self.adopt_pending = None;
                            if self.holder.token.is_none() && self.held_before_fallback.is_none() {
                                self.session = None;
                            }
                        }
                        if let Some(g) = self.deferred_grant.take() {
                            self.on_coordinator(pb::CoordinatorMessage { msg: Some(Out::Grant(g)) });
                        }
                    }
                    CoordKind::Leave => {}
                }
            }
        }
    }

    /// An operator's failover drill (`arcfedctl drill`), relayed by the coordinator. Obeyed only
    /// with `--allow-drills`; without it the request is logged and ignored.
    fn drill(&mut self, d: pb::DrillRequest) {
        if !self.cfg.allow_drills {
            tracing::warn!(action = %d.action, "drill refused: this agent was not started with --allow-drills");
            return;
        }
        match d.action.as_str() {
            "crash" => {
                // What a SIGKILL leaves behind: no Release, no DELETE, an orphaned session.
                tracing::error!("drill: crashing now (exit 137, nothing released)");
                std::process::exit(137);
            }
            "freeze" => {
                // What a SIGSTOP does to the protocol: no keepalive, no GitHub request, no
                // event handled until the freeze ends; in-flight work resumes after it.
                let d = Duration::from_millis(d.duration_ms.min(600_000));
                tracing::warn!(?d, "drill: freezing the agent loop");
                self.frozen_until = Some(self.now() + d.as_millis() as u64);
            }
            other => tracing::warn!(action = other, "unknown drill action ignored"),
        }
    }

    /// Timers that are not the machines': re-patch, fallback, certificate rotation, and
    /// contending again in open mode after a release (never below ARC: keep trying).
    /// The predecessor's session, when the quorum lists it stale and this member may delete
    /// it now: not in fallback or shutdown, and not the session our own holder machine has.
    fn sweep_due(&self) -> Option<&String> {
        let id = self.predecessor.as_ref()?;
        let listed = self.assignment.as_ref().is_some_and(|a| a.stale_sessions.contains(id));
        let ours =
            self.holder.session_id() == Some(id.as_str()) || self.session.as_ref().is_some_and(|s| &s.session_id == id);
        (listed
            && !ours
            && !self.holder.is_holding()
            && !self.fallback
            && !self.open_fence
            && self.shutdown_at.is_none()
            && self.sweep.is_none())
        .then_some(id)
    }

    /// Deletes the session our cluster's previous listener left, once the quorum lists it
    /// stale. This is the one DELETE a non-holder sends, and it is safe outside the fence: an id
    /// enters the stale set only after its holder's fence has ended (a lapsed or revoked lease,
    /// or a late SessionOpened under an old token), so it cannot cut a live holder's session.
    /// It matters with per-cluster credentials, where GitHub refuses the successor's DELETE
    /// of another credential's session: the dead holder's restarted pod frees the slot instead
    /// of GitHub's ~90 s orphan expiry. The holder's own revoke then sees the id gone.
    fn maybe_sweep(&mut self) {
        let now = self.now();
        if now < self.sweep_next_at {
            return;
        }
        let Some(id) = self.sweep_due().cloned() else { return };
        tracing::info!(session = %id, "deleting the stale session our cluster's previous listener opened");
        let client = self.client.clone();
        let runners = self.runners.clone();
        let metrics = self.metrics.clone();
        self.sweep = Some(Box::pin(async move {
            let r = tokio::time::timeout(GITHUB_OP_TIMEOUT, client.delete_session(&github::Open, &id))
                .await
                .unwrap_or_else(|_| {
                    Err(github::Error::Config(format!("session delete timed out after {GITHUB_OP_TIMEOUT:?}")))
                });
            match r {
                Ok(()) => {
                    metrics.session_deletes.inc();
                    metrics.stale_sweeps.inc();
                    if let Ok(Some(rec)) = runners.session_record().await
                        && rec == id
                        && let Err(e) = runners.set_session_record(None).await
                    {
                        tracing::warn!(error = %e, "cannot clear the session record");
                    }
                    (id, true)
                }
                Err(e) => {
                    metrics.github_error(error_kind(&e));
                    tracing::warn!(session = %id, error = %e, "stale session delete failed; will retry");
                    (id, false)
                }
            }
        }));
    }

    fn on_swept(&mut self, id: String, ok: bool) {
        if ok {
            tracing::info!(session = %id, "stale session of our cluster's previous listener deleted");
            if self.predecessor.as_ref() == Some(&id) {
                self.predecessor = None;
            }
            self.sweep_failures = 0;
        } else {
            // Exponential backoff with full jitter, 0.5 s .. 15 s.
            self.sweep_failures = self.sweep_failures.saturating_add(1);
            let cap = (500u64 << self.sweep_failures.min(5)).min(15_000);
            self.sweep_next_at = self.now() + 250 + rand::random::<u64>() % cap;
        }
    }

    fn periodic(&mut self) {
        let now = self.now();
        if !(self.open_fence && self.shutdown_at.is_none() && self.holder.phase == HolderPhase::Standby) {
            // Safety review L5: a pending re-contend that no longer applies (the quorum came
            // back, or the holder left standby) must not stay in the past and wake the loop
            // every millisecond for the life of the process.
            self.regrant_at = None;
        } else {
            match self.regrant_at {
                None => self.regrant_at = Some(now + REGRANT_AFTER_MS),
                Some(t) if now >= t => {
                    self.regrant_at = None;
                    self.local_token += 1;
                    tracing::info!("contending for the session again");
                    self.pump_holder(Input::Granted {
                        token: self.local_token,
                        stale_sessions: vec![],
                        last_acked_message_id: 0,
                        resume: None,
                    });
                }
                Some(_) => {}
            }
        }
        if let Some((w, next)) = self.tls_watch.as_mut()
            && now >= *next
        {
            *next = now + TLS_CHECK_EVERY_MS;
            if w.changed() && self.stream.is_some() {
                tracing::info!("TLS files changed: reconnecting with the new certificate");
                self.stream_failed(None);
            }
        }
        self.maybe_sweep();
        if now >= self.next_repatch {
            // At least every 50 s with a fresh patchID (DESIGN §5.6), holder or not.
            // Standalone, and the fallback winner, run ARC's algorithm; everyone else keeps
            // applying the last assignment the quorum gave (fail-static, DESIGN §5.11).
            let own_algorithm = self.open_fence && (self.link.is_none() || self.holder.session_id().is_some());
            let runners = match &self.assignment {
                _ if own_algorithm => Some(self.cfg.min_runners.saturating_add(self.stats.total_assigned_jobs.max(0))),
                Some(a) => Some(a.runners),
                None => None,
            };
            match runners {
                Some(r) => self.apply_assignment(r, false, false),
                None => self.next_repatch = now + REPATCH_EVERY_MS,
            }
        }
        if let Some(l) = &self.link
            && !self.fallback
            && !self.cfg.coordinator_lost_for.is_zero()
            && l.down_for(now).is_some_and(|d| d >= self.cfg.coordinator_lost_for.as_millis() as u64)
            && self.shutdown_at.is_none()
        {
            self.start_fallback();
        }
    }

    /// No coordinator for `--coordinator-lost-for`: degrade to ARC, never below (DESIGN §5.11).
    fn start_fallback(&mut self) {
        tracing::warn!("no coordinator for {:?}: fallback to a single-cluster listener", self.cfg.coordinator_lost_for);
        self.fallback = true;
        self.metrics.fallback.set(1);
        // Every member contends with 409 backoff, the federated holder too: its fence has
        // ended, and only a whole-quorum loss would guarantee that nobody was granted since
        // (a partition of this region alone lets the live quorum grant another region, whose
        // session must not meet a resumed one of ours). So the session it had is deleted with
        // our own credentials first (404 is fine) and a new one contended for. The federated
        // machine stops; a fresh one runs with an open fence.
        let keep = self.holder.session_id().map(str::to_string);
        self.held_before_fallback = self.holder.token.zip(keep.clone());
        self.local_token += 1;
        let now = self.now();
        self.abandon_github("the start of fallback");
        self.coord = None;
        self.holder = Holder::new(HolderConfig { fallback: true, ..self.holder_config() }, now);
        self.open_fence = true;
        self.session = None;
        // A session recorded on our ERS by a predecessor of ours in fallback is deleted too.
        let runners = self.runners.clone();
        let token = self.local_token;
        self.local = Some(Box::pin(async move {
            let recorded = runners.session_record().await.ok().flatten().filter(|r| Some(r) != keep.as_ref());
            Input::Granted {
                token,
                stale_sessions: keep.into_iter().chain(recorded).collect(),
                last_acked_message_id: 0,
                resume: None,
            }
        }));
    }

    /// The quorum is back: report our fallback session (Adopt) before any Grant, then return
    /// to the federated machine. If the Adopt is accepted, the Grant that follows resumes the
    /// same session (no churn); if another member already holds, the coordinator tells that
    /// holder to delete our session and we forget it.
    fn end_fallback(&mut self) {
        tracing::info!("coordinator back: leaving fallback");
        self.fallback = false;
        self.metrics.fallback.set(0);
        // Our session is open only if the fallback holder reached polling.
        let open = self.holder.session_id().map(str::to_string);
        self.session = self.session.take().filter(|s| open.as_deref() == Some(s.session_id.as_str()));
        if let Some(s) = self.session.clone() {
            let rid = self.request_id();
            let adopt = pb::agent_message::Msg::Adopt(pb::Adopt {
                request_id: rid,
                session_id: s.session_id.clone(),
                statistics: Some(cc::stats(&self.stats)),
            });
            if self.send(adopt) {
                tracing::info!(session = %s.session_id, "reporting the fallback session (Adopt)");
                self.adopt_pending = Some(s.session_id.clone());
                // The leader may hold an Adopt until the pre-loss holder's lease ends (up to
                // about one TTL after its promotion): wait that long for the answer.
                let wait = COORD_TIMEOUT_MS + 2 * self.cfg.lease_ttl.as_millis() as u64;
                self.coord = Some((rid, CoordKind::Adopt, self.now() + wait));
            }
        }
        let now = self.now();
        self.abandon_github("the end of fallback");
        self.local = None;
        self.holder = Holder::new(self.holder_config(), now);
        self.open_fence = false;
        self.message = None;
    }

    fn holder_config(&self) -> HolderConfig {
        holder_config(&self.cfg, &self.join.member_id)
    }

    /// Metrics and readiness.
    fn publish(&mut self) {
        let holding =
            self.holder.session_id().is_some() && self.fence().allows(self.holder.token.unwrap_or(0), self.now());
        self.metrics.set_holder(if holding { self.holder.token.or(Some(0)) } else { None });
        if !holding {
            self.metrics.clear_scale_set_gauges();
        }
        self.metrics.github_ready.set(i64::from(self.github_ready.load(Ordering::Relaxed)));
        let ready = if self.open_fence {
            if holding {
                Readiness::Ready("holder (standalone)".into())
            } else {
                Readiness::Ready("contending for the session".into())
            }
        } else if self.link.as_ref().is_some_and(Link::is_up) {
            Readiness::Ready(if holding {
                format!("holder t{}", self.holder.token.unwrap_or(0))
            } else {
                "standby".into()
            })
        } else {
            Readiness::NotReady("no coordinator stream".into())
        };
        if self.http.readiness() != ready {
            self.http.set_ready(ready);
        }
    }

    /// Graceful leave (after the release on SIGTERM).
    async fn leave(&mut self) {
        let mut left = false;
        if self.link.is_some() && self.stream.is_some() && !self.fallback {
            let rid = self.request_id();
            self.send(pb::agent_message::Msg::Leave(pb::Leave { request_id: rid }));
            // Give the Leave a moment to be written before the stream closes.
            let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
            while tokio::time::Instant::now() < deadline {
                let Some(s) = self.stream.as_mut() else { break };
                match tokio::time::timeout_at(deadline, s.rx.message()).await {
                    Ok(Ok(Some(pb::CoordinatorMessage { msg: Some(Out::Result(r)) }))) if r.request_id == rid => {
                        left = true;
                        break;
                    }
                    Ok(Ok(Some(_))) => continue,
                    _ => break,
                }
            }
        }
        // A federated member that leaves gets 0 (patchID 0 allowed, DESIGN §5.6); its share
        // moves to the others. Standalone, the ERS is left as ARC's listener leaves it.
        if left {
            let p = self.scaler.on_assignment(0, false, true);
            let _ = self.runners_tx.try_send(RunnerCmd::Patch(p));
        }
    }
}

fn holder_config(cfg: &Config, member_id: &str) -> HolderConfig {
    HolderConfig {
        cluster: if cfg.cluster.is_empty() { cfg.owner_name.clone() } else { cfg.cluster.clone() },
        member_id: member_id.to_string(),
        poll_margin_ms: 400,
        // The gate lets a request start only while the fence covers a fresh connect too, so
        // the machine stops starting them at the same lead (and a little more).
        send_margin_ms: github::HOLDER_CONNECT_TIMEOUT.as_millis() as u64 + 100,
        holder_stall_ms: cfg.holder_stall.as_millis() as u64,
        conflict_alert_ms: 120_000,
        fallback: false,
        seed: rand::random(),
    }
}

fn release_reason(r: ReleaseReason) -> pb::ReleaseReason {
    match r {
        ReleaseReason::StaleRevoked => pb::ReleaseReason::StaleRevoked,
        ReleaseReason::Shutdown => pb::ReleaseReason::Shutdown,
        ReleaseReason::Handover => pb::ReleaseReason::Handover,
        ReleaseReason::Stall => pb::ReleaseReason::Stall,
        ReleaseReason::LostLease => pb::ReleaseReason::LostLease,
    }
}

fn error_kind(e: &github::Error) -> &'static str {
    match e {
        github::Error::Fenced => "fenced",
        github::Error::Conflict { .. } => "conflict",
        github::Error::ScaleSetNotFound { .. } => "scale_set_not_found",
        github::Error::SessionGone { .. } => "session_gone",
        github::Error::Unauthorized { .. } => "unauthorized",
        github::Error::Forbidden { .. } => "forbidden",
        github::Error::RateLimited { .. } => "rate_limited",
        github::Error::Status { .. } => "status",
        github::Error::Transport { .. } => "transport",
        github::Error::EmptyBody { .. } => "empty_body",
        github::Error::Decode { .. } => "decode",
        github::Error::TooLarge { .. } => "too_large",
        github::Error::JobStillRunning { .. } => "job_still_running",
        github::Error::Config(_) => "config",
    }
}

/// Applies ERS patches and runner status patches in order; a failure is logged and counted,
/// and the next push (at most 50 s later) patches again. Never exits on a remote error.
async fn runner_task(runners: Arc<Runners<SimVia>>, mut rx: mpsc::Receiver<RunnerCmd>, metrics: Arc<Metrics>) {
    while let Some(cmd) = rx.recv().await {
        let r = match &cmd {
            RunnerCmd::Patch(p) => runners.patch_replicas(*p).await,
            RunnerCmd::JobStarted(name, job) => runners.patch_job_started(name, job).await,
            RunnerCmd::JobCompleted(name) => runners.on_job_completed(name).await,
            RunnerCmd::Record(id) => runners.set_session_record(Some(id)).await,
            RunnerCmd::ClearRecord(id) => match runners.session_record().await {
                Ok(Some(r)) if &r == id => runners.set_session_record(None).await,
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            },
        };
        match r {
            Ok(()) => tracing::debug!(?cmd, "runner backend updated"),
            Err(e) => {
                metrics.github_error("runner_backend");
                tracing::warn!(?cmd, error = %e, "runner backend update failed");
            }
        }
    }
}

/// Keeps the admin token fresh and the scale set readable, holder or not (DESIGN §5.1: a
/// standby reports `github_ready`, which makes it eligible for a Grant).
async fn keep_github_ready(client: Client, ready: Arc<AtomicBool>, metrics: Arc<Metrics>) {
    let mut delay = Duration::from_millis(500);
    loop {
        let ok = match client.refresh_admin_token().await {
            Ok(()) => match client.get_scale_set().await {
                Ok(_) => true,
                Err(e) => {
                    metrics.github_error(error_kind(&e));
                    if matches!(e, github::Error::ScaleSetNotFound { .. }) {
                        tracing::error!(error = %e, "the scale set is gone: a federation-wide alert (DESIGN §5.10)");
                    } else {
                        tracing::warn!(error = %e, "scale set GET failed");
                    }
                    false
                }
            },
            Err(e) => {
                metrics.github_error(error_kind(&e));
                tracing::warn!(error = %e, "GitHub admin token refresh failed");
                false
            }
        };
        ready.store(ok && client.github_ready(), Ordering::Relaxed);
        if ok {
            delay = Duration::from_secs(20);
        } else {
            delay = (delay * 2).clamp(Duration::from_millis(500), Duration::from_secs(30));
        }
        let jitter = Duration::from_millis(rand::random::<u64>() % (delay.as_millis() as u64 / 4 + 1));
        tokio::time::sleep(delay + jitter).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An abandoned request's gate refuses every later attempt, even when the fence it was
    /// issued under has become open (a later token, or fallback): safety review of M3.3.
    #[test]
    fn an_abandoned_requests_gate_refuses_whatever_the_fence_says() {
        let abandoned = Arc::new(AtomicBool::new(false));
        let gate = Abandonable { inner: Arc::new(github::Open), abandoned: abandoned.clone() };
        assert!(gate.check().is_ok());
        abandoned.store(true, Ordering::Relaxed);
        assert!(gate.check().is_err());
        // The owner header still names the inner gate's holder (none for an open fence).
        assert_eq!(gate.owner(), None);
    }
}
