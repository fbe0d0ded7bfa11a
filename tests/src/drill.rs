//! Failover drills: every fault of DESIGN §10 over a [`Sandbox`], each ending in the typed
//! §11 [`DrillReport`], and a randomized fault run whose schedule comes from a seed.
//!
//! ```text
//!  run_drill(scenario, runs) ─▶ per run: settle → fault → measure (quorum status + emulator
//!                               timeline) → heal → RunReport
//!  random_faults(seed, n)    ─▶ plan(seed) → apply/hold/heal each fault → settle
//!  both                      ─▶ finish(): the emulator's counters + check_invariants()
//! ```
//!
//! Every report carries the DESIGN §6 invariant checks: one session at a time (overlap 0), no
//! holder-only request after the fence (by the sender's token), no message lost, acks only
//! after an accepted Progress, every enqueued job ran, tokens never decrease (the quorum's
//! unsorted status history and GitHub's session owners in opening order), and Σ assignments ≤
//! Σ max_i.
//! Times are measured; nothing here asserts one.

use crate::agent_proc::metric_value;
use crate::emulator::{FaultKind, FaultSpec, PathClass, Settings};
use crate::fault_proxy::Mode;
use crate::harness::arcfedctl;
use crate::sandbox::{Sample, Sandbox, WAIT, is_holder, wait_standby};
use anyhow::{Context, bail};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use std::time::{Duration, Instant};

/// The faults of DESIGN §10.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// SIGKILL the holder's agent; the pod is recreated as a standby.
    KillHolder,
    /// SIGSTOP the holder past its TTL, then SIGCONT: it must come back as a standby.
    FreezeHolder,
    /// The holder's coordinator links reset the coordinator side and blackhole the agent side.
    HalfCloseHolder,
    /// The holder's region (its agent and its voter) is cut from the quorum; GitHub stays reachable.
    PartitionRegion,
    /// SIGKILL the Raft leader: no holder change, every region served again.
    KillLeader,
    /// SIGSTOP the Raft leader past the lease TTL, then SIGCONT: the old leader, waking with
    /// every lease overdue on its clock, expires none; no holder change, no token regression.
    FreezeLeader,
    /// SIGTERM and restart every voter, then every agent, one at a time.
    RollingRestart,
    /// The holder's region is lost: its agent and its voter SIGKILLed together.
    RegionLoss,
    /// Every voter SIGKILLed: agents fall back (one holds), then the quorum returns and adopts.
    QuorumLoss,
    /// GitHub answers 503 to the holder's region only: it releases after `--holder-stall`.
    HolderStall,
    /// `acquirejobs` hangs once, then answers 503, to the holder only: the message whose jobs
    /// it could not acquire is never acked, the holder hands over after `--holder-stall`, and
    /// every job still runs (GHES mode; in dotcom mode nothing is acquired).
    AcquireFault,
    /// `arcfedctl handover` to another region.
    Handover,
    /// The holder's region is cut from the quorum and, at the same moment, its TCP connects to
    /// GitHub stall in the handshake (open connections reset, SYNs dropped) until after the
    /// successor has taken over: a request whose connect outlived the holder's fence must never
    /// be sent (`late_requests` 0). Loopback sandbox only (it uses the region's GitHub proxy).
    ConnectStall,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::KillHolder => "kill-holder",
            Scenario::FreezeHolder => "freeze-holder",
            Scenario::HalfCloseHolder => "half-close-holder",
            Scenario::PartitionRegion => "partition-region",
            Scenario::KillLeader => "kill-leader",
            Scenario::FreezeLeader => "freeze-leader",
            Scenario::RollingRestart => "rolling-restart",
            Scenario::RegionLoss => "region-loss",
            Scenario::QuorumLoss => "quorum-loss",
            Scenario::HolderStall => "holder-stall",
            Scenario::AcquireFault => "acquire-fault",
            Scenario::Handover => "handover",
            Scenario::ConnectStall => "connect-stall",
        }
    }
}

/// p50 / p99 / max of one measurement over the runs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

impl Summary {
    pub fn of(values: impl IntoIterator<Item = u64>) -> Option<Summary> {
        let mut v: Vec<u64> = values.into_iter().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let at = |p: f64| v[(((v.len() - 1) as f64) * p).round() as usize];
        Some(Summary { p50: at(0.5), p99: at(0.99), max: at(1.0) })
    }
}

/// One run of a drill. Times are milliseconds from the fault.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunReport {
    pub run: usize,
    /// What happened, e.g. `a → b`.
    pub what: String,
    /// The fault → the holder change committed (quorum status).
    pub detect_ms: Option<u64>,
    /// The fault → the successor's session opened (emulator clock).
    pub failover_ms: Option<u64>,
    /// The fault → the successor's first poll (emulator clock).
    pub first_poll_ms: Option<u64>,
    /// kill-leader, rolling-restart: the fault → the holder polls again under the new leader.
    pub served_again_ms: Option<u64>,
    /// quorum-loss: the fault → every agent in fallback.
    pub fallback_ms: Option<u64>,
    /// quorum-loss: the voters' restart → every agent attached again and the session adopted.
    pub adopt_ms: Option<u64>,
    pub token_before: u64,
    pub token_after: u64,
    /// kill-leader, rolling-restart: whether leader changes alone moved the holder (§6.5).
    pub leader_change_moved_holder: Option<bool>,
    /// kill-leader: the fault → the holder's agent attached to the new leader again (its
    /// `arcfed_agent_coordinator_connected` back to 1; its first keepalive is acked right
    /// after). While its stream is down the holder pauses holder-only requests (DESIGN §4)
    /// and resumes under the same token with that ack. The goal (issue 8, item 7) is that
    /// this fits its fence: TTL×(1−margin) after its last acked keepalive, at least
    /// TTL×(1−margin) − TTL/4 after the fault (1,250 ms at the LAN defaults).
    pub holder_reattached_ms: Option<u64>,
    /// freeze-leader: lease expirations applied from the freeze until the old leader is back
    /// as a follower (must be 0: a stalled leader that wakes up expires nothing, §6.8).
    pub leases_expired: Option<u64>,
}

/// One DESIGN §6 invariant, as checked at the end of a drill.
#[derive(Clone, Debug, Serialize)]
pub struct InvariantCheck {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// A fault of the randomized run, as planned from the seed.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedFault {
    pub fault: Scenario,
    /// Which region a region-targeted fault picks (index mod the region count); holder
    /// faults hit whoever holds when the fault fires.
    pub pick: usize,
    pub hold_ms: u64,
    pub gap_ms: u64,
    /// What it hit, filled in when it ran.
    pub target: String,
}

/// The DESIGN §11 drill report. `--json` prints exactly this; scripts rely on its shape.
#[derive(Clone, Debug, Serialize)]
pub struct DrillReport {
    /// A §10 fault name, or `random`.
    pub scenario: String,
    pub seed: Option<u64>,
    pub emulator_settings: Settings,
    pub runs: Vec<RunReport>,
    pub detect_ms: Option<Summary>,
    pub failover_ms: Option<Summary>,
    pub first_poll_ms: Option<Summary>,
    /// kill-leader: the fault → the holder attached to the new leader (see [`RunReport`]).
    pub holder_reattached_ms: Option<Summary>,
    pub sessions_overlap_ms: u64,
    pub zombie_requests: u64,
    /// Holder-only requests of token T that reached GitHub after the first of a higher token
    /// (must be 0; see the emulator's `late_requests`).
    pub late_requests: u64,
    pub stale_token_rejections: Option<u64>,
    pub conflicts_409: u64,
    /// Delivered to a holder that went on talking, and never deleted (must be 0).
    pub messages_lost: u64,
    /// Delivered into the last poll of a holder that then died or froze: GitHub's per-scale-set
    /// cursor never re-offers them (see [`message_accounting`]).
    pub messages_stranded: u64,
    pub acquire_repeats: u64,
    pub jobs_acquired_twice: u64,
    pub token_regressions: u64,
    pub max_concurrent_sessions: u64,
    pub no_session_ms: u64,
    pub messages_delivered: u64,
    pub messages_deleted: u64,
    pub messages_redelivered: u64,
    pub jobs_enqueued: u64,
    pub jobs_completed: u64,
    /// Enqueued jobs neither completed nor cancelled by GitHub once the workload stopped and
    /// the runners drained (must be 0): the one number a user of this product cares about.
    pub jobs_unfinished: u64,
    /// The randomized run's schedule (empty for a scripted drill).
    pub faults: Vec<PlannedFault>,
    pub invariants: Vec<InvariantCheck>,
}

impl DrillReport {
    /// Whether every invariant held.
    pub fn invariants_hold(&self) -> bool {
        self.invariants.iter().all(|c| c.ok)
    }

    pub fn failed_invariants(&self) -> Vec<&InvariantCheck> {
        self.invariants.iter().filter(|c| !c.ok).collect()
    }
}

fn ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

/// Runs `scenario` `runs` times and reports.
pub async fn run_drill(sb: &mut Sandbox, scenario: Scenario, runs: usize) -> anyhow::Result<DrillReport> {
    let mut out = Vec::new();
    for run in 0..runs {
        sb.wait_settled().await?;
        let mut r = match scenario {
            Scenario::KillHolder => kill_holder(sb).await,
            Scenario::FreezeHolder => freeze_holder(sb).await,
            Scenario::HalfCloseHolder => half_close_holder(sb).await,
            Scenario::PartitionRegion => partition_region(sb).await,
            Scenario::KillLeader => kill_leader(sb).await,
            Scenario::FreezeLeader => freeze_leader(sb).await,
            Scenario::RollingRestart => rolling_restart(sb).await,
            Scenario::RegionLoss => region_loss(sb).await,
            Scenario::QuorumLoss => quorum_loss(sb).await,
            Scenario::HolderStall => holder_stall(sb).await,
            Scenario::AcquireFault => acquire_fault(sb).await,
            Scenario::Handover => handover(sb, None).await,
            Scenario::ConnectStall => connect_stall(sb).await,
        }
        .with_context(|| format!("{} run {run}; logs in {}", scenario.name(), sb.dir.display()))?;
        r.run = run;
        out.push(r);
    }
    finish(sb, scenario.name(), None, out, vec![]).await
}

/// The current holder: (region index, member id, token, session id).
async fn holder(sb: &Sandbox) -> anyhow::Result<(usize, String, u64, String)> {
    let (s, sid) = sb.wait_settled().await?;
    let g = &s.groups[0];
    let i = sb.region_index(&g.holder_cluster).context("the holder's region")?;
    Ok((i, g.holder.clone(), g.token, sid))
}

/// Waits for a holder other than `old`, then its polling session; fills the §11 times.
async fn takeover(
    sb: &Sandbox,
    old: &str,
    fault: Instant,
    fault_emu: u64,
    r: &mut RunReport,
) -> anyhow::Result<String> {
    let s = sb
        .wait_status("another holder", |s| s.groups.first().is_some_and(|g| !g.holder.is_empty() && g.holder != old))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", sb.agent_logs()))?;
    r.detect_ms = Some(ms(fault));
    let g = &s.groups[0];
    let (_, opened, polled) = sb.wait_session(g.token, fault_emu).await?;
    r.failover_ms = Some(opened.saturating_sub(fault_emu));
    r.first_poll_ms = Some(polled.saturating_sub(fault_emu));
    r.token_after = g.token;
    Ok(g.holder_cluster.clone())
}

async fn kill_holder(sb: &mut Sandbox) -> anyhow::Result<RunReport> {
    let (i, member, token, _) = holder(sb).await?;
    let mut r = RunReport { token_before: token, ..RunReport::default() };
    let (fault, fault_emu) = (Instant::now(), sb.emu.now_ms());
    sb.regions[i].agent.kill();
    if sb.opts.per_region_credentials {
        // ARC recreates the listener pod at once; with per-region credentials only that pod
        // (same cluster, same credential) can delete the orphan, and it does so once the
        // quorum lists it stale.
        let leader = sb.status().await?.leader;
        sb.regions[i].respawn(Some(leader)).await?;
        let to = takeover(sb, &member, fault, fault_emu, &mut r).await?;
        r.what = format!("{} → {to} (pod recreated at once)", sb.regions[i].name);
        return Ok(r);
    }
    let to = takeover(sb, &member, fault, fault_emu, &mut r).await?;
    r.what = format!("{} → {to}", sb.regions[i].name);
    let leader = sb.status().await?.leader;
    sb.regions[i].respawn(Some(leader)).await?;
    Ok(r)
}

async fn freeze_holder(sb: &mut Sandbox) -> anyhow::Result<RunReport> {
    let (i, member, token, _) = holder(sb).await?;
    let mut r = RunReport { token_before: token, ..RunReport::default() };
    let (fault, fault_emu) = (Instant::now(), sb.emu.now_ms());
    sb.regions[i].agent.freeze();
    let to = takeover(sb, &member, fault, fault_emu, &mut r).await;
    sb.regions[i].agent.thaw();
    let to = to?;
    wait_standby(&sb.regions[i].agent).await?;
    r.what = format!("{} frozen {} ms → {to}; thawed as a standby", sb.regions[i].name, r.first_poll_ms.unwrap_or(0));
    Ok(r)
}

/// Makes sure the holder's stream runs through its region's link proxies, so that cutting
/// them cuts it (an agent that followed a redirect dials the leader directly): otherwise
/// recreate the standbys (their links list the leader first) and hand over to one of them.
async fn holder_behind_link(sb: &mut Sandbox) -> anyhow::Result<()> {
    let (i, _, _, _) = holder(sb).await?;
    let leader = sb.status().await?.leader;
    if sb.regions[i].behind_link(leader).await {
        return Ok(());
    }
    let mut behind = None;
    for j in (0..sb.regions.len()).filter(|j| *j != i) {
        if sb.regions[j].behind_link(leader).await {
            behind = Some(j);
            break;
        }
    }
    let target = match behind {
        Some(j) => j,
        None => {
            let j = (i + 1) % sb.regions.len();
            sb.regions[j].respawn(Some(leader)).await?;
            sb.wait_settled().await?;
            j
        }
    };
    handover(sb, Some(target)).await?;
    sb.wait_settled().await?;
    Ok(())
}

async fn half_close_holder(sb: &mut Sandbox) -> anyhow::Result<RunReport> {
    holder_behind_link(sb).await?;
    let (i, member, token, _) = holder(sb).await?;
    let mut r = RunReport { token_before: token, ..RunReport::default() };
    let (fault, fault_emu) = (Instant::now(), sb.emu.now_ms());
    sb.regions[i].cut(Mode::ResetUpstreamBlackholeDownstream);
    let to = takeover(sb, &member, fault, fault_emu, &mut r).await;
    sb.regions[i].cut(Mode::Pass);
    let to = to?;
    wait_standby(&sb.regions[i].agent).await?;
    r.what = format!("{} half-closed → {to}", sb.regions[i].name);
    Ok(r)
}

/// Cuts (`up` false) or restores a region from the quorum and the other regions, keeping its
/// GitHub: with `--netns` its WAN link goes down, else its proxies blackhole.
fn partition(sb: &Sandbox, i: usize, up: bool) -> anyhow::Result<()> {
    if let Some(w) = &sb.wan {
        return w.set_wan_link(&sb.regions[i].name, up);
    }
    let mode = if up { Mode::Pass } else { Mode::Blackhole };
    sb.q.isolate(sb.regions[i].voter, mode.clone());
    sb.regions[i].cut(mode);
    Ok(())
}

async fn partition_region(sb: &mut Sandbox) -> anyhow::Result<RunReport> {
    if sb.wan.is_none() {
        holder_behind_link(sb).await?;
    }
    let (i, member, token, _) = holder(sb).await?;
    let mut r = RunReport { token_before: token, ..RunReport::default() };
    let voter = sb.regions[i].voter;
    let (fault, fault_emu) = (Instant::now(), sb.emu.now_ms());
    partition(sb, i, false)?;
    let to = takeover(sb, &member, fault, fault_emu, &mut r).await;
    // `--hold`: the partition lasts this long from the fault (past the agents'
    // `--coordinator-lost-for`, the cut-off region falls back while the quorum's holder serves).
    if to.is_ok()
        && let Some(hold) = sb.opts.hold
    {
        tokio::time::sleep(hold.saturating_sub(fault.elapsed())).await;
    }
    partition(sb, i, true)?;
    let to = to?;
    let healed = sb.emu.now_ms();
    wait_standby(&sb.regions[i].agent).await?;
    // After the heal the quorum's holder goes on polling: it does not wait out GitHub's TTL.
    wait_any_poll(sb, healed).await?;
    r.served_again_ms = Some(sb.emu.now_ms().saturating_sub(fault_emu));
    let held = sb.opts.hold.map(|h| format!(", held {}", humantime::format_duration(h))).unwrap_or_default();
    r.what = format!("region {} (voter {voter}) partitioned{held} → {to}", sb.regions[i].name);
    Ok(r)
}

async fn connect_stall(sb: &mut Sandbox) -> anyhow::Result<RunReport> {
    if sb.wan.is_some() {
        bail!("connect-stall runs in the loopback sandbox (it stalls the region's GitHub proxy); drop --netns");
    }
    holder_behind_link(sb).await?;
    let (i, member, token, _) = holder(sb).await?;
    let mut r = RunReport { token_before: token, ..RunReport::default() };
    let (fault, fault_emu) = (Instant::now(), sb.emu.now_ms());
    // The holder's poll is reset, and every connect it tries from now on hangs in the
    // handshake while its fence runs out.
    sb.regions[i].cut_github(Mode::StallConnects)?;
    partition(sb, i, false)?;
    let to = takeover(sb, &member, fault, fault_emu, &mut r).await;
    // GitHub's path heals first: a connect of the old holder still waiting completes at its
    // next retransmitted SYN (about 1, 3, 7 s after its first) and would send a late request.
    // Watch past that window before the quorum link heals too.
    sb.regions[i].cut_github(Mode::Pass)?;
    if to.is_ok() {
        tokio::time::sleep(Duration::from_secs(8)).await;
    }
    partition(sb, i, true)?;
    let to = to?;
    wait_standby(&sb.regions[i].agent).await?;
    r.what = format!("region {} cut from the quorum, its GitHub connects stalled → {to}", sb.regions[i].name);
    Ok(r)
}

async fn kill_leader(sb: &mut Sandbox) -> anyhow::Result<RunReport> {
    let (hi, member, token, _) = holder(sb).await?;
    let mut r = RunReport { token_before: token, token_after: token, ..RunReport::default() };
    let old = sb.status().await?.leader;
    let (fault, fault_emu) = (Instant::now(), sb.emu.now_ms());
    sb.q.voter(old).kill();
    // The holder's stream to the dead leader drops; time its attach to the new one.
    let mut dropped = false;
    let end = Instant::now() + WAIT;
    loop {
        let connected = sb.regions[hi].agent.metric("arcfed_agent_coordinator_connected").await;
        if connected == Some(0.0) {
            dropped = true;
        } else if connected == Some(1.0) && dropped {
            break;
        }
        if Instant::now() > end {
            anyhow::bail!("the holder's agent did not attach to a new leader within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    r.holder_reattached_ms = Some(ms(fault));
    let s = new_leader_serving_every_region(sb, old).await?;
    // Served again: GitHub sees a poll after the fault (the holder's, or a successor's if the
    // leader change moved the holder, which the report then flags).
    wait_any_poll(sb, fault_emu).await?;
    r.served_again_ms = Some(ms(fault));
    let now = sb.wait_status("a holder", |s| s.groups.first().is_some_and(|g| !g.holder.is_empty())).await?;
    r.token_after = now.groups.first().map(|g| g.token).unwrap_or(0);
    let same = now.groups.first().is_some_and(|g| g.holder == member);
    r.leader_change_moved_holder = Some(!same);
    sb.q.voter(old).restart()?;
    r.what = format!("leader {old} → {}; holder {}", s.leader, if same { "unchanged" } else { "CHANGED" });
    Ok(r)
}

/// Waits until a leader other than `old` serves status and every region has a live member.
async fn new_leader_serving_every_region(sb: &Sandbox, old: u64) -> anyhow::Result<arcfed_proto::StatusResponse> {
    let names: Vec<String> = sb.regions.iter().map(|r| r.name.clone()).collect();
    sb.wait_status("a new leader serving every region", |s| {
        s.leader != old && names.iter().all(|n| s.members.iter().any(|m| &m.cluster == n && m.status == "live"))
    })
    .await
}

async fn freeze_leader(sb: &mut Sandbox) -> anyhow::Result<RunReport> {
    let (_, member, token, _) = holder(sb).await?;
    let mut r = RunReport { token_before: token, token_after: token, ..RunReport::default() };
    let old = sb.status().await?.leader;
    let expired = "arcfed_replicated_expirations";
    let before = sb.leader_counter(expired).await.context("the leader's expiration counter")?;
    let ttl = humantime::parse_duration(&sb.opts.lease_ttl)?;
    let fault = Instant::now();
    sb.q.voter(old).freeze();
    let s = new_leader_serving_every_region(sb, old).await;
    // Frozen past the TTL: on the old leader's clock every lease it knew falls due.
    tokio::time::sleep((ttl + Duration::from_secs(1)).saturating_sub(fault.elapsed())).await;
    sb.q.voter(old).thaw();
    let s = s?;
    let addr = sb.q.voter(old).addr();
    let end = Instant::now() + WAIT;
    // Back as a follower: it answers UNAVAILABLE naming another leader (or status naming it).
    loop {
        let knows = match sb.q.status_at(&addr).await {
            Ok(st) => st.leader != old,
            Err(st) => arcfed_proto::leader::leader_hint(&st).is_some_and(|h| !h.is_empty()),
        };
        if knows {
            break;
        }
        if Instant::now() > end {
            bail!("the thawed leader {old} did not follow the new leader within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It has stepped down: whatever its woken lessor proposed before that could not commit
    // (no quorum in its old term), so the applied counter now says all there is to say.
    let now = sb.wait_status("a holder", |s| s.groups.first().is_some_and(|g| !g.holder.is_empty())).await?;
    let after = sb.leader_counter(expired).await.context("the leader's expiration counter")?;
    r.leases_expired = Some(after.saturating_sub(before));
    r.token_after = now.groups.first().map(|g| g.token).unwrap_or(0);
    let same = now.groups.first().is_some_and(|g| g.holder == member);
    r.leader_change_moved_holder = Some(!same);
    r.served_again_ms = Some(ms(fault));
    r.what = format!(
        "leader {old} frozen past the TTL → {}; holder {}",
        s.leader,
        if same { "unchanged" } else { "CHANGED" }
    );
    Ok(r)
}

async fn rolling_restart(sb: &mut Sandbox) -> anyhow::Result<RunReport> {
    let (_, member, token, _) = holder(sb).await?;
    let mut r = RunReport { token_before: token, ..RunReport::default() };
    let start = Instant::now();
    // Voters: followers first, the leader last, each back and serving before the next.
    let leader = sb.status().await?.leader;
    let mut ids: Vec<u64> = sb.q.voters.iter().map(|v| v.id).collect();
    ids.sort_by_key(|id| (*id == leader, *id));
    for id in ids {
        let t_emu = sb.emu.now_ms();
        sb.q.voter(id).terminate(Duration::from_secs(30));
        sb.q.voter(id).restart()?;
        sb.wait_settled().await?;
        wait_any_poll(sb, t_emu).await?;
    }
    let after_voters = sb.status().await?;
    let voters_kept_holder = after_voters.groups.first().is_some_and(|g| g.holder == member);
    r.served_again_ms = Some(ms(start));
    // Agents: standbys first, the holder last (its SIGTERM hands over).
    let hc = after_voters.groups.first().map(|g| g.holder_cluster.clone()).unwrap_or_default();
    let mut order: Vec<usize> = (0..sb.regions.len()).collect();
    order.sort_by_key(|i| (sb.regions[*i].name == hc, *i));
    for i in order {
        let s = sb.status().await?;
        let g = s.groups.first().context("group")?;
        let holds = g.holder_cluster == sb.regions[i].name;
        let (fault, fault_emu) = (Instant::now(), sb.emu.now_ms());
        let old = g.holder.clone();
        sb.regions[i].agent.terminate(Duration::from_secs(30));
        if holds {
            takeover(sb, &old, fault, fault_emu, &mut r).await?;
        }
        sb.regions[i].respawn(Some(s.leader)).await?;
        sb.wait_settled().await?;
    }
    r.what = format!(
        "{} voters then {} agents; holder {} across the voter restarts",
        sb.q.voters.len(),
        sb.regions.len(),
        if voters_kept_holder { "unchanged" } else { "CHANGED" }
    );
    r.leader_change_moved_holder = Some(!voters_kept_holder);
    Ok(r)
}

async fn region_loss(sb: &mut Sandbox) -> anyhow::Result<RunReport> {
    let (i, member, token, _) = holder(sb).await?;
    let mut r = RunReport { token_before: token, ..RunReport::default() };
    let (name, voter) = (sb.regions[i].name.clone(), sb.regions[i].voter);
    let (fault, fault_emu) = (Instant::now(), sb.emu.now_ms());
    sb.regions[i].agent.kill();
    sb.q.voter(voter).kill();
    let to = takeover(sb, &member, fault, fault_emu, &mut r).await?;
    // The lost region's share moves to the others: none of its members is assigned a runner.
    let s = sb
        .wait_status("the lost region's share moved", |s| {
            let g = &s.groups[0];
            g.assignments.iter().filter(|a| a.cluster == name).all(|a| a.runners == 0)
        })
        .await?;
    let shares: Vec<String> = s.groups[0].assignments.iter().map(|a| format!("{}={}", a.cluster, a.runners)).collect();
    sb.q.voter(voter).restart()?;
    let leader = sb.wait_status("a serving leader", |_| true).await?.leader;
    sb.regions[i].respawn(Some(leader)).await?;
    r.what = format!("region {name} (agent + voter {voter}) lost → {to}; runners {}", shares.join(" "));
    Ok(r)
}

async fn quorum_loss(sb: &mut Sandbox) -> anyhow::Result<RunReport> {
    let (_, _, token, sid) = holder(sb).await?;
    let mut r = RunReport { token_before: token, ..RunReport::default() };
    let fault = Instant::now();
    let ids: Vec<u64> = sb.q.voters.iter().map(|v| v.id).collect();
    for id in &ids {
        sb.q.voter(*id).kill();
    }
    for reg in &sb.regions {
        reg.agent.wait_metric("fallback", WAIT, |m| metric_value(m, "arcfed_agent_fallback") == Some(1.0)).await?;
    }
    r.fallback_ms = Some(ms(fault));
    let fell_back = sb.emu.now_ms();
    // In fallback GitHub's one-session rule is the mutex: the session polled is one agent's.
    let (fsid, _, _) = wait_any_poll(sb, fell_back).await?;
    let mut holders = Vec::new();
    for reg in &sb.regions {
        if is_holder(&reg.agent).await {
            holders.push(reg.name.clone());
        }
    }
    let restart = Instant::now();
    for id in &ids {
        sb.q.voter(*id).restart()?;
    }
    for reg in &sb.regions {
        reg.agent
            .wait_metric("attached again", WAIT, |m| {
                metric_value(m, "arcfed_agent_fallback") == Some(0.0)
                    && metric_value(m, "arcfed_agent_coordinator_connected") == Some(1.0)
            })
            .await?;
    }
    let s = sb
        .wait_status("the quorum knows a polling session", |s| {
            s.groups.first().is_some_and(|g| !g.holder.is_empty() && !g.session_id.is_empty())
        })
        .await?;
    r.adopt_ms = Some(ms(restart));
    r.token_after = s.groups[0].token;
    r.what = format!(
        "fallback holders {holders:?} kept session {}; quorum {} it",
        if fsid == sid { "unchanged" } else { "new" },
        if s.groups[0].session_id == fsid { "adopted" } else { "replaced" }
    );
    if holders.len() != 1 {
        bail!("fallback: {} agents say they hold ({holders:?}), want exactly one", holders.len());
    }
    Ok(r)
}

/// Waits for any session's poll after `after`: (session id, owner, at).
async fn wait_any_poll(sb: &Sandbox, after: u64) -> anyhow::Result<(String, String, u64)> {
    let end = Instant::now() + WAIT;
    loop {
        if let Some(e) = sb
            .emu
            .timeline()
            .iter()
            .find(|e| e.class == PathClass::Poll && e.at_ms > after && e.status != 0 && e.session_id.is_some())
        {
            return Ok((e.session_id.clone().unwrap_or_default(), e.owner.clone().unwrap_or_default(), e.at_ms));
        }
        if Instant::now() > end {
            bail!("no session polled after {after} ms\n{}", sb.agent_logs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GitHub answers 503 to this holder's requests of `class` (only on `session_id`, if given)
/// for `duration`.
fn holder_503(owner: String, class: PathClass, session_id: Option<String>, duration: Duration) -> FaultSpec {
    FaultSpec {
        kind: FaultKind::Status { status: 503, retry_after: None, type_name: None, message: None, error_kind: None },
        handle_first: false,
        path_class: Some(class),
        owner: Some(owner),
        session_id,
        scale_set_id: None,
        count: None,
        duration: Some(humantime::format_duration(duration).to_string()),
    }
}

async fn holder_stall(sb: &mut Sandbox) -> anyhow::Result<RunReport> {
    let (i, member, token, sid) = holder(sb).await?;
    let mut r = RunReport { token_before: token, ..RunReport::default() };
    let owner = format!("arcfed/{}/{member}/t{token}", sb.regions[i].name);
    let (fault, fault_emu) = (Instant::now(), sb.emu.now_ms());
    let region = sb.regions[i].name.clone();
    // With --netns the holder region's link to GitHub is cut for real (frames dropped
    // silently, mid long poll); otherwise GitHub answers this holder 503.
    let cut = if let Some(w) = &sb.wan {
        w.set_github_link(&region, false)?;
        true
    } else {
        sb.emu.add_fault(holder_503(owner, PathClass::Poll, Some(sid), WAIT)).map_err(|e| anyhow::anyhow!(e))?;
        false
    };
    let to = takeover(sb, &member, fault, fault_emu, &mut r).await;
    match &sb.wan {
        Some(w) if cut => w.set_github_link(&region, true)?,
        _ => sb.emu.clear_faults(),
    }
    let to = to?;
    r.what = if cut {
        format!("GitHub link of {region} cut → {to}")
    } else {
        format!("GitHub 503 for {region} only → {to}")
    };
    Ok(r)
}

async fn acquire_fault(sb: &mut Sandbox) -> anyhow::Result<RunReport> {
    if sb.emu.settings().mode != crate::emulator::Mode::Ghes {
        bail!(
            "acquire-fault needs --github-mode ghes: github.com offers jobs as JobAssigned and nothing is acquired, so the fault would never fire"
        );
    }
    let (i, member, token, _) = holder(sb).await?;
    let mut r = RunReport { token_before: token, ..RunReport::default() };
    let owner = format!("arcfed/{}/{member}/t{token}", sb.regions[i].name);
    let (fault, fault_emu) = (Instant::now(), sb.emu.now_ms());
    // The oldest replacing rule fires first: one acquire hangs (the agent's timeout), then 503s.
    let hang = FaultSpec {
        kind: FaultKind::Hang,
        count: Some(1),
        ..holder_503(owner.clone(), PathClass::Acquire, None, WAIT)
    };
    sb.emu.add_fault(hang).map_err(|e| anyhow::anyhow!(e))?;
    sb.emu.add_fault(holder_503(owner, PathClass::Acquire, None, WAIT)).map_err(|e| anyhow::anyhow!(e))?;
    let to = takeover(sb, &member, fault, fault_emu, &mut r).await;
    sb.emu.clear_faults();
    let to = to?;
    r.what = format!("acquirejobs failing for {} only → {to}", sb.regions[i].name);
    Ok(r)
}

/// Hands over to region `to` (default: the next region after the holder's).
async fn handover(sb: &mut Sandbox, to: Option<usize>) -> anyhow::Result<RunReport> {
    let (i, member, token, _) = holder(sb).await?;
    let mut r = RunReport { token_before: token, ..RunReport::default() };
    let target = to.unwrap_or((i + 1) % sb.regions.len());
    let tname = sb.regions[target].name.clone();
    let q = &sb.q;
    let eps = q.endpoints().join(",");
    let (cert, key, ca) =
        (q.admin.cert.display().to_string(), q.admin.key.display().to_string(), q.admin.ca.display().to_string());
    // A region whose agent was just recreated still lists its old incarnation as live until
    // the new one joins and makes it a standby: a target picked then is refused as not
    // eligible, and picked again.
    let end = Instant::now() + WAIT;
    let (fault, fault_emu) = loop {
        let s = sb.status().await?;
        let tm = s
            .members
            .iter()
            .filter(|m| m.cluster == tname && m.status == "live" && !m.standby)
            .map(|m| m.id.clone())
            .next_back()
            .context("a handover target")?;
        let (fault, fault_emu) = (Instant::now(), sb.emu.now_ms());
        match arcfedctl(&[
            "--endpoints",
            &eps,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-ca",
            &ca,
            "handover",
            &s.groups[0].key,
            "--to",
            &tm,
        ]) {
            Ok(_) => break (fault, fault_emu),
            Err(e) if e.to_string().contains("not_eligible") && Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let to = takeover(sb, &member, fault, fault_emu, &mut r).await?;
    r.what = format!("{} → {to}", sb.regions[i].name);
    Ok(r)
}

/// Plans `n` random faults from `seed`: the same seed, the same schedule.
pub fn plan(seed: u64, n: usize, regions: usize) -> Vec<PlannedFault> {
    const KINDS: [Scenario; 12] = [
        Scenario::KillHolder,
        Scenario::FreezeHolder,
        Scenario::HalfCloseHolder,
        Scenario::PartitionRegion,
        Scenario::KillLeader,
        Scenario::RollingRestart, // one voter restart (SIGTERM), not the whole roll
        Scenario::RegionLoss,
        Scenario::QuorumLoss,
        Scenario::HolderStall,
        Scenario::Handover,
        Scenario::AcquireFault,
        Scenario::ConnectStall,
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| PlannedFault {
            fault: KINDS[rng.random_range(0..KINDS.len())],
            pick: rng.random_range(0..regions.max(1)),
            hold_ms: rng.random_range(1_000..6_000),
            gap_ms: rng.random_range(2_000..4_000),
            target: String::new(),
        })
        .collect()
}

/// The randomized fault run: `n` faults planned from `seed` under the steady workload, one at
/// a time (apply, hold, heal, gap); then the world must settle, and every invariant is checked.
pub async fn random_faults(sb: &mut Sandbox, seed: u64, n: usize) -> anyhow::Result<DrillReport> {
    let mut faults = plan(seed, n, sb.regions.len());
    for f in faults.iter_mut() {
        f.target = apply_random(sb, f).await.with_context(|| format!("random fault {f:?}"))?;
        tokio::time::sleep(Duration::from_millis(f.gap_ms)).await;
    }
    sb.wait_settled().await?;
    finish(sb, "random", Some(seed), vec![], faults).await
}

/// Applies one planned fault, holds it, heals it; returns what it hit.
async fn apply_random(sb: &mut Sandbox, f: &PlannedFault) -> anyhow::Result<String> {
    let hold = Duration::from_millis(f.hold_ms);
    let latest = sb.sampler.latest();
    let pick = f.pick % sb.regions.len();
    let holder_idx = latest.as_ref().and_then(|s| sb.region_index(&s.holder_cluster)).unwrap_or(pick);
    let leader = latest.as_ref().map(|s| s.leader).filter(|l| *l != 0);
    match f.fault {
        Scenario::KillHolder => {
            sb.regions[holder_idx].agent.kill();
            tokio::time::sleep(hold).await;
            sb.regions[holder_idx].respawn(leader).await?;
            Ok(format!("agent {}", sb.regions[holder_idx].name))
        }
        Scenario::FreezeHolder => {
            sb.regions[holder_idx].agent.freeze();
            tokio::time::sleep(hold).await;
            sb.regions[holder_idx].agent.thaw();
            Ok(format!("agent {}", sb.regions[holder_idx].name))
        }
        Scenario::HalfCloseHolder => {
            sb.regions[holder_idx].cut(Mode::ResetUpstreamBlackholeDownstream);
            tokio::time::sleep(hold).await;
            sb.regions[holder_idx].cut(Mode::Pass);
            Ok(format!("links of {}", sb.regions[holder_idx].name))
        }
        Scenario::PartitionRegion => {
            let v = sb.regions[pick].voter;
            partition(sb, pick, false)?;
            tokio::time::sleep(hold).await;
            partition(sb, pick, true)?;
            Ok(format!("region {} + voter {v}", sb.regions[pick].name))
        }
        Scenario::KillLeader => {
            let Some(l) = leader else { return Ok("no leader known: skipped".into()) };
            sb.q.voter(l).kill();
            tokio::time::sleep(hold).await;
            sb.q.voter(l).restart()?;
            Ok(format!("voter {l}"))
        }
        Scenario::FreezeLeader => {
            let Some(l) = leader else { return Ok("no leader known: skipped".into()) };
            sb.q.voter(l).freeze();
            tokio::time::sleep(hold).await;
            sb.q.voter(l).thaw();
            Ok(format!("voter {l} frozen"))
        }
        Scenario::RollingRestart => {
            let v = sb.regions[pick].voter;
            sb.q.voter(v).terminate(Duration::from_secs(30));
            sb.q.voter(v).restart()?;
            Ok(format!("voter {v} (SIGTERM, restart)"))
        }
        Scenario::RegionLoss => {
            let v = sb.regions[pick].voter;
            sb.regions[pick].agent.kill();
            sb.q.voter(v).kill();
            tokio::time::sleep(hold).await;
            sb.q.voter(v).restart()?;
            sb.regions[pick].respawn(leader.filter(|l| *l != v)).await?;
            Ok(format!("region {} + voter {v}", sb.regions[pick].name))
        }
        Scenario::QuorumLoss => {
            let ids: Vec<u64> = sb.q.voters.iter().map(|v| v.id).collect();
            for id in &ids {
                sb.q.voter(*id).kill();
            }
            tokio::time::sleep(hold).await;
            for id in &ids {
                sb.q.voter(*id).restart()?;
            }
            Ok("every voter".into())
        }
        Scenario::HolderStall => {
            let Some(s) = latest.filter(|s| !s.holder.is_empty()) else { return Ok("no holder: skipped".into()) };
            let owner = format!("arcfed/{}/{}/t{}", s.holder_cluster, s.holder, s.token);
            sb.emu
                .add_fault(holder_503(owner, PathClass::Poll, Some(s.session_id.clone()), hold))
                .map_err(|e| anyhow::anyhow!(e))?;
            tokio::time::sleep(hold).await;
            Ok(format!("GitHub 503 for {}", s.holder_cluster))
        }
        Scenario::ConnectStall => {
            if sb.wan.is_some() {
                return Ok("--netns: skipped".into());
            }
            sb.regions[pick].cut_github(Mode::StallConnects)?;
            partition(sb, pick, false)?;
            tokio::time::sleep(hold).await;
            sb.regions[pick].cut_github(Mode::Pass)?;
            partition(sb, pick, true)?;
            Ok(format!("region {} cut, its GitHub connects stalled", sb.regions[pick].name))
        }
        Scenario::AcquireFault => {
            let Some(s) = latest.filter(|s| !s.holder.is_empty()) else { return Ok("no holder: skipped".into()) };
            let owner = format!("arcfed/{}/{}/t{}", s.holder_cluster, s.holder, s.token);
            sb.emu.add_fault(holder_503(owner, PathClass::Acquire, None, hold)).map_err(|e| anyhow::anyhow!(e))?;
            tokio::time::sleep(hold).await;
            Ok(format!("acquirejobs 503 for {}", s.holder_cluster))
        }
        Scenario::Handover => {
            let q = &sb.q;
            let target = sb.regions[pick].name.clone();
            let st = match sb.status().await {
                Ok(s) => s,
                Err(_) => return Ok("no quorum: skipped".into()),
            };
            let Some(m) = st.members.iter().rfind(|m| m.cluster == target && m.status == "live") else {
                return Ok(format!("{target} not live: skipped"));
            };
            let eps = q.endpoints().join(",");
            let (c, k, a) = (
                q.admin.cert.display().to_string(),
                q.admin.key.display().to_string(),
                q.admin.ca.display().to_string(),
            );
            let key = st.groups.first().map(|g| g.key.clone()).unwrap_or_default();
            // A refused handover (target already holds, no leader) is part of the chaos.
            let res = arcfedctl(&[
                "--endpoints",
                &eps,
                "--tls-cert",
                &c,
                "--tls-key",
                &k,
                "--tls-ca",
                &a,
                "handover",
                &key,
                "--to",
                &m.id,
            ]);
            Ok(format!("handover to {target}{}", if res.is_ok() { "" } else { " (refused)" }))
        }
    }
}

/// Lets in-flight messages settle, reads the emulator's counters and checks the invariants.
async fn finish(
    sb: &Sandbox,
    scenario: &str,
    seed: Option<u64>,
    runs: Vec<RunReport>,
    faults: Vec<PlannedFault>,
) -> anyhow::Result<DrillReport> {
    sb.sampler.check()?;
    // A message delivered a moment ago is deleted once its Progress is accepted: give it time.
    let end = Instant::now() + Duration::from_secs(10);
    while message_accounting(&sb.emu.timeline()).0 > 0 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every enqueued job must run: stop the workload and let the runners drain what is left.
    // A job still waiting after that was lost (an available job never acquired, a message
    // whose jobs nobody will see again). The workload resumes after the count.
    let (jobs_unfinished, unfinished_jobs) = settle_jobs(sb).await?;
    let timeline = sb.emu.timeline();
    let (messages_lost, messages_stranded) = message_accounting(&timeline);
    // Keep GitHub's side of the story next to the logs, for whoever reads a failed check.
    let _ = std::fs::write(sb.dir.join("emulator-timeline.json"), serde_json::to_vec(&timeline)?);
    let _ = std::fs::write(sb.dir.join("emulator-report.json"), serde_json::to_vec_pretty(&sb.emu.report())?);
    let rep = sb.emu.report();
    let ss = rep.scale_set(sb.set).context("the scale set in the emulator report")?;
    let history = sb.sampler.history();
    let mut token_regressions = token_regressions(history.iter().map(|s| s.token));
    for r in &runs {
        if r.token_after != 0 && r.token_after < r.token_before {
            token_regressions += 1;
        }
    }
    let mut invariants = check_invariants(ss, &history, messages_lost, messages_stranded);
    // DESIGN §6.3 itself: a federated holder acks a message only after the quorum accepted
    // its Progress. Acks carry their sender's token (`X-Arcfed-Owner`); the quorum's status
    // history says when its last acked id moved.
    let (emu_now, inst_now) = (sb.emu.now_ms(), Instant::now());
    let samples: Vec<(u64, i64)> = history
        .iter()
        .map(|s| (emu_now.saturating_sub(inst_now.duration_since(s.at).as_millis() as u64), s.last_acked))
        .collect();
    let final_acked = sb.status().await.ok().and_then(|s| s.groups.first().map(|g| g.last_acked_message_id));
    // Readings come from any voter in contact with the leader within 1 s, stamped after the
    // answer: 3 s of slack keeps a lagging follower's reading from inventing a violation.
    let bad = acks_without_progress(&federated_acks(&timeline), &samples, final_acked, 3_000);
    invariants.push(InvariantCheck {
        name: "acks only after an accepted Progress (federated acks vs the quorum's last acked id)",
        ok: bad.is_empty(),
        detail: if bad.is_empty() {
            format!("{} federated acks, {} status readings", federated_acks(&timeline).len(), samples.len())
        } else {
            bad.join("; ")
        },
    });
    invariants.push(InvariantCheck {
        name: "every enqueued job ran (or was cancelled by GitHub) after settle",
        ok: jobs_unfinished == 0,
        detail: format!(
            "enqueued {}, completed {}, cancelled and dropped {}, unfinished {jobs_unfinished} (of them available and never acquired {}){}",
            ss.jobs_enqueued,
            ss.jobs_completed,
            ss.jobs_cancelled.saturating_sub(ss.jobs_reassigned),
            ss.jobs_available_unacquired,
            if unfinished_jobs.is_empty() { String::new() } else { format!("; at settle: {}", unfinished_jobs.join("; ")) }
        ),
    });
    let moved: Vec<usize> = runs.iter().filter(|r| r.leader_change_moved_holder == Some(true)).map(|r| r.run).collect();
    if runs.iter().any(|r| r.leader_change_moved_holder.is_some()) {
        invariants.push(InvariantCheck {
            name: "a leader change alone never changes a holder",
            ok: moved.is_empty(),
            detail: if moved.is_empty() {
                "holder kept in every run".into()
            } else {
                format!("moved in runs {moved:?}")
            },
        });
    }
    let expired: Vec<String> = runs
        .iter()
        .filter_map(|r| r.leases_expired.filter(|n| *n > 0).map(|n| format!("run {}: {n}", r.run)))
        .collect();
    if runs.iter().any(|r| r.leases_expired.is_some()) {
        invariants.push(InvariantCheck {
            name: "a stalled old leader expires no lease",
            ok: expired.is_empty(),
            detail: if expired.is_empty() { "0 expirations in every run".into() } else { expired.join("; ") },
        });
    }
    Ok(DrillReport {
        scenario: scenario.to_string(),
        seed,
        emulator_settings: sb.emu.settings(),
        detect_ms: Summary::of(runs.iter().filter_map(|r| r.detect_ms)),
        failover_ms: Summary::of(runs.iter().filter_map(|r| r.failover_ms)),
        first_poll_ms: Summary::of(runs.iter().filter_map(|r| r.first_poll_ms)),
        holder_reattached_ms: Summary::of(runs.iter().filter_map(|r| r.holder_reattached_ms)),
        runs,
        sessions_overlap_ms: ss.sessions_overlap_ms,
        zombie_requests: ss.zombie_requests,
        late_requests: ss.late_requests,
        stale_token_rejections: sb.stale_token_rejections().await,
        conflicts_409: ss.conflicts_409,
        messages_lost,
        messages_stranded,
        acquire_repeats: ss.acquire_repeats,
        jobs_acquired_twice: ss.jobs_acquired_twice,
        token_regressions,
        max_concurrent_sessions: ss.max_concurrent_sessions,
        no_session_ms: ss.no_session_ms,
        messages_delivered: ss.messages_delivered,
        messages_deleted: ss.messages_deleted,
        messages_redelivered: ss.messages_redelivered,
        jobs_enqueued: ss.jobs_enqueued,
        jobs_completed: ss.jobs_completed,
        jobs_unfinished,
        faults,
        invariants,
    })
}

/// (arrival ms, message id) of every successful ack a fenced holder sent (its `X-Arcfed-Owner`
/// names a quorum token; a fallback holder's acks name none).
pub fn federated_acks(timeline: &[crate::emulator::Event]) -> Vec<(u64, i64)> {
    timeline
        .iter()
        .filter(|e| e.class == PathClass::Ack && (200..300).contains(&e.status))
        .filter(|e| e.sender.as_deref().and_then(owner_token).is_some())
        .filter_map(|e| Some((e.at_ms, e.path.rsplit('/').next()?.parse().ok()?)))
        .collect()
}

/// Safety review M5.3: acks GitHub received before the quorum had accepted their Progress.
/// `samples` are (ms, the quorum's last acked id) readings on the same clock as the acks. A
/// reading taken `slack_ms` or more after an ack of message M that still shows a last acked id
/// below M proves the ack came first (the id only grows); so does a final reading below the
/// highest acked id. Readings are sparse, so this misses some violations; it never invents one.
pub fn acks_without_progress(
    acks: &[(u64, i64)],
    samples: &[(u64, i64)],
    final_last_acked: Option<i64>,
    slack_ms: u64,
) -> Vec<String> {
    let mut out = Vec::new();
    for &(t, m) in acks {
        if let Some(&(ts, la)) = samples.iter().find(|(ts, la)| *ts >= t + slack_ms && *la < m) {
            out.push(format!("message {m} acked at {t} ms while the quorum's last acked id was {la} at {ts} ms"));
        }
    }
    if let (Some(f), Some(&(t, m))) = (final_last_acked, acks.iter().max_by_key(|(_, m)| *m))
        && m > f
    {
        out.push(format!("message {m} acked at {t} ms; the quorum's last acked id ends at {f}"));
    }
    out.truncate(5);
    out
}

/// Stops the workload, waits (with a deadline) until every enqueued job has finished, and
/// restarts the workload. Returns how many jobs were still unfinished at the deadline.
async fn settle_jobs(sb: &Sandbox) -> anyhow::Result<(u64, Vec<String>)> {
    sb.set_workload(0).await?;
    let unfinished = || sb.emu.report().scale_set(sb.set).map_or(0, |s| s.jobs_unfinished);
    // The longest job, a runner's start, and a few polls of slack.
    let end = Instant::now() + Duration::from_secs(u64::from(sb.opts.job_seconds.1) + 30);
    while unfinished() > 0 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let left =
        sb.emu.report().scale_set(sb.set).map_or((0, vec![]), |s| (s.jobs_unfinished, s.unfinished_jobs.clone()));
    sb.set_workload(sb.opts.jobs_per_minute).await?;
    Ok(left)
}

/// (lost, stranded) distinct message ids from the emulator's timeline: a message is delivered
/// by a 200 poll and deleted by a 2xx ack of any session (a redelivered message acked by a
/// successor is not lost). An undeleted delivery is *stranded* when it was the
/// session's last poll answer and the session neither polled nor acked after it (an acquire
/// of its jobs may follow): its holder died, froze, or was cut from the quorum with GitHub's
/// answer in hand, so no Progress could be accepted and DESIGN §4 forbids the ack; with the
/// adversarial per-scale-set cursor GitHub never offers it again (its jobs still count in the
/// next statistics). A delivery is stranded too when the session's next poll asks again from
/// the same point (the same `lastMessageId`, or none): the holder never saw that answer (its
/// poll was cancelled at the fence as GitHub sent it), and a cursor that honours
/// `lastMessageId` would hand it out again. Any other undeleted delivery went to a holder
/// that moved on without deleting it: *lost* (DESIGN §6.3).
pub fn message_accounting(timeline: &[crate::emulator::Event]) -> (u64, u64) {
    use std::collections::{BTreeMap, BTreeSet};
    /// A session's delivery not yet acked: (message id, `lastMessageId` of its poll, whether
    /// the holder showed it had read it: it acquired its jobs or tried to ack it).
    struct Pending {
        id: i64,
        from: i64,
        seen: bool,
    }
    let last_id = |q: &str| -> i64 {
        q.split('&').find_map(|kv| kv.strip_prefix("lastMessageId=")).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    // Distinct message ids (an event without one stands for a message of its own).
    let id_of = |e: &crate::emulator::Event| e.message_id.unwrap_or(-(e.seq as i64) - 1);
    let mut delivered: BTreeSet<i64> = BTreeSet::new();
    let mut deleted: BTreeSet<i64> = BTreeSet::new();
    let mut stranded: BTreeSet<i64> = BTreeSet::new();
    let mut pending: BTreeMap<&str, Option<Pending>> = BTreeMap::new();
    for e in timeline {
        let Some(sid) = e.session_id.as_deref() else { continue };
        let p = pending.entry(sid).or_insert(None);
        match e.class {
            PathClass::Poll => {
                let from = last_id(&e.query);
                // Asked again from the same point without having read the answer: it never
                // reached the holder (its poll was cancelled at the fence as GitHub sent it).
                if let Some(old) = p.take()
                    && !old.seen
                    && from <= old.from
                {
                    stranded.insert(old.id);
                }
                if e.status == 200 {
                    let id = id_of(e);
                    delivered.insert(id);
                    *p = Some(Pending { id, from, seen: false });
                }
            }
            // Acquiring the delivered jobs is part of handling that delivery: it was read.
            PathClass::Acquire => {
                if let Some(old) = p.as_mut() {
                    old.seen = true;
                }
            }
            PathClass::Ack if (200..300).contains(&e.status) => {
                let id = e.message_id.or(p.as_ref().map(|x| x.id)).unwrap_or_else(|| id_of(e));
                deleted.insert(id);
                if p.as_ref().is_some_and(|x| x.id == id) {
                    *p = None;
                }
            }
            PathClass::Ack => {
                if let Some(old) = p.as_mut() {
                    old.seen = true;
                }
            }
            _ => {}
        }
    }
    // A session's last delivery, never followed by a poll or ack of that session: its holder
    // died, froze or was cut off with GitHub's answer in hand (no Progress could be accepted,
    // so DESIGN §4 forbids the ack). Only that one message, not any other.
    stranded.extend(pending.into_values().flatten().map(|x| x.id));
    let undeleted = delivered.difference(&deleted);
    let (stranded_n, lost_n) =
        undeleted.fold((0, 0), |(s, l), id| if stranded.contains(id) { (s + 1, l) } else { (s, l + 1) });
    (lost_n, stranded_n)
}

/// How many times a value is lower than the one before it, in the order given (never sorted).
pub fn token_regressions(tokens: impl IntoIterator<Item = u64>) -> u64 {
    let mut prev = 0u64;
    let mut n = 0;
    for t in tokens {
        if t < prev {
            n += 1;
        }
        prev = prev.max(t);
    }
    n
}

use crate::emulator::report::sender_token as owner_token;

/// DESIGN §6 from GitHub's side (the emulator's report) and the quorum's (the status history).
pub fn check_invariants(
    ss: &crate::emulator::ScaleSetReport,
    history: &[Sample],
    lost: u64,
    stranded: u64,
) -> Vec<InvariantCheck> {
    let mut out = Vec::new();
    let mut check = |name: &'static str, ok: bool, detail: String| out.push(InvariantCheck { name, ok, detail });
    check(
        "one session at a time",
        ss.sessions_overlap_ms == 0 && ss.max_concurrent_sessions <= 1,
        format!("overlap {} ms, max concurrent {}", ss.sessions_overlap_ms, ss.max_concurrent_sessions),
    );
    // "No job acquired by two sessions" is GitHub's rule (it refuses a second session's
    // acquire; the emulator does too), so a check on it here could never fail (safety review
    // M5.1). arcfed's side of DESIGN §6.3 is checked instead: no request after the fence
    // (below), acks only after an accepted Progress and every enqueued job ran (in `finish`).
    // `jobs_acquired_twice` stays in the report as a counter.
    check(
        "no holder-only request after the fence (by the sender's token)",
        ss.late_requests == 0,
        if ss.late_requests == 0 {
            "0 late requests".into()
        } else {
            format!("{} late: {}", ss.late_requests, ss.late_request_examples.join("; "))
        },
    );
    check(
        "no message lost",
        lost == 0,
        format!(
            "lost {lost}, stranded in a dead holder's last poll {stranded} (delivered {}, deleted {})",
            ss.messages_delivered, ss.messages_deleted
        ),
    );
    let quorum = token_regressions(history.iter().map(|s| s.token));
    check(
        "tokens never decrease (quorum status, in reading order)",
        quorum == 0,
        format!("{quorum} regressions over {} readings", history.len()),
    );
    let github: Vec<u64> = ss.sessions.iter().filter_map(|s| owner_token(&s.owner)).collect();
    let gh = token_regressions(github.iter().copied());
    check(
        "tokens never decrease (GitHub session owners, in opening order)",
        gh == 0,
        format!("{gh} regressions in {github:?}"),
    );
    let over: Vec<String> = history
        .iter()
        .filter(|s| s.assigned > s.max_live)
        .map(|s| format!("Σ {} > max {}", s.assigned, s.max_live))
        .collect();
    check(
        "Σ assignments ≤ Σ max of live members",
        over.is_empty(),
        if over.is_empty() { format!("{} readings", history.len()) } else { over.join("; ") },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regressions_are_counted_in_reading_order() {
        assert_eq!(token_regressions([1, 2, 2, 3]), 0);
        assert_eq!(token_regressions([1, 3, 2, 3]), 1);
        assert_eq!(token_regressions([5, 1, 2, 6]), 2, "every reading below the highest seen counts");
    }

    #[test]
    fn the_same_seed_plans_the_same_schedule() {
        let a = serde_json::to_string(&plan(7, 20, 3)).expect("json");
        assert_eq!(a, serde_json::to_string(&plan(7, 20, 3)).expect("json"));
        assert_ne!(a, serde_json::to_string(&plan(8, 20, 3)).expect("json"));
    }

    #[test]
    fn summary_takes_percentiles_of_the_runs() {
        let s = Summary::of([300, 100, 200]).expect("summary");
        assert_eq!((s.p50, s.p99, s.max), (200, 300, 300));
        assert!(Summary::of([]).is_none());
    }

    #[test]
    fn an_ack_the_quorum_had_not_accepted_is_found_and_sparse_readings_invent_nothing() {
        // Progress of 7 accepted at ~100 ms, its ack at 150 ms: readings before and after agree.
        let samples = [(50, 6), (120, 7), (2_000, 9)];
        assert!(acks_without_progress(&[(150, 7), (1_900, 9)], &samples, Some(9), 1_000).is_empty());
        // A reading 1 s after the ack of 8 still says 7: the ack came first.
        let bad = acks_without_progress(&[(150, 7), (500, 8)], &[(50, 6), (120, 7), (1_600, 7)], Some(8), 1_000);
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].contains("message 8"), "{bad:?}");
        // No reading after it, but the quorum's final id never reached it.
        let bad = acks_without_progress(&[(150, 7), (500, 8)], &[(120, 7)], Some(7), 1_000);
        assert_eq!(bad.len(), 1, "{bad:?}");
        // A reading within the slack proves nothing (a follower may lag).
        assert!(acks_without_progress(&[(500, 8)], &[(900, 7)], Some(8), 1_000).is_empty());
    }

    /// The sender-attributed check fails on a late request, whatever else holds.
    #[test]
    fn the_invariants_refuse_a_late_request() {
        let clean = crate::emulator::ScaleSetReport { max_concurrent_sessions: 1, ..Default::default() };
        assert!(check_invariants(&clean, &[], 0, 0).iter().all(|c| c.ok));
        let late = crate::emulator::ScaleSetReport {
            late_requests: 1,
            late_request_examples: vec!["t5 DELETE /m/9 at 305 ms (t6 first at 300 ms)".into()],
            ..clean
        };
        let failed: Vec<_> = check_invariants(&late, &[], 0, 0).into_iter().filter(|c| !c.ok).collect();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].detail.contains("t5 DELETE /m/9"), "{failed:?}");
    }

    fn ev(seq: u64, class: PathClass, status: u16, session: &str) -> crate::emulator::Event {
        crate::emulator::Event {
            seq,
            at_ms: seq,
            arrival: seq,
            duration_ms: 0,
            method: "GET".into(),
            path: String::new(),
            query: String::new(),
            class,
            auth: crate::emulator::report::AuthKind::Queue,
            capacity: None,
            user_agent: None,
            status,
            scale_set_id: Some(1),
            session_id: Some(session.into()),
            owner: None,
            zombie: false,
            sender: None,
            message_id: None,
            fault: None,
            credential: None,
            rate_limited: false,
            peer: None,
        }
    }

    #[test]
    fn a_dead_holders_last_delivery_is_stranded_and_any_other_undeleted_one_is_lost() {
        use PathClass::{Ack, Poll};
        // s1 acked its first message, then died with the second in its last poll answer.
        let dead = [ev(1, Poll, 200, "s1"), ev(2, Ack, 204, "s1"), ev(3, Poll, 200, "s1")];
        assert_eq!(message_accounting(&dead), (0, 1));
        // s3 acquired its last delivery's jobs, then was cut from the quorum (no Progress
        // accepted, so no ack) and never polled again: stranded too.
        let cut = [ev(1, Poll, 200, "s3"), ev(2, PathClass::Acquire, 200, "s3")];
        assert_eq!(message_accounting(&cut), (0, 1));
        // s4 acquired, then polled on without deleting: lost.
        let mut moved_on = [ev(1, Poll, 200, "s4"), ev(2, PathClass::Acquire, 200, "s4"), ev(3, Poll, 202, "s4")];
        moved_on[2].query = "lastMessageId=7".into();
        assert_eq!(message_accounting(&moved_on), (1, 0));
        // s5's poll from message 7 brought a message, and its next poll asks from 7 again:
        // the answer never reached the holder (cancelled at the fence): stranded, not lost.
        let mut again = [ev(1, Poll, 200, "s5"), ev(2, Poll, 202, "s5")];
        again[0].query = "lastMessageId=7".into();
        again[1].query = "lastMessageId=7".into();
        assert_eq!(message_accounting(&again), (0, 1));
        // s2 received a message, never deleted it, and went on polling: lost.
        let mut skipped = dead.to_vec();
        let mut went_on = ev(5, Poll, 202, "s2");
        went_on.query = "api-version=6.0-preview&lastMessageId=4".into();
        skipped.extend([ev(4, Poll, 200, "s2"), went_on]);
        assert_eq!(message_accounting(&skipped), (1, 1));
        // Everything delivered was deleted.
        assert_eq!(message_accounting(&[ev(1, Poll, 200, "s"), ev(2, Ack, 204, "s"), ev(3, Poll, 202, "s")]), (0, 0));
    }

    /// The holes safety review H2 found in a count-based accounting, closed by message ids.
    #[test]
    fn message_accounting_counts_distinct_ids_across_sessions() {
        use PathClass::{Ack, Acquire, Poll};
        let with = |mut e: crate::emulator::Event, id: i64, from: i64| {
            e.message_id = Some(id);
            e.query = format!("lastMessageId={from}");
            e
        };
        // One free "stranded" per session is gone: s1 skipped message 5 (delivered, polled on
        // from 5 without an ack) and died holding 6. 5 is lost, 6 stranded.
        let t = [with(ev(1, Poll, 200, "s1"), 5, 4), with(ev(2, Poll, 200, "s1"), 6, 5)];
        assert_eq!(message_accounting(&t), (1, 1));
        // Acquire, then a poll from the same point: the holder read it and moved on: lost, not
        // "unseen".
        let t = [with(ev(1, Poll, 200, "s2"), 5, 4), ev(2, Acquire, 200, "s2"), with(ev(3, Poll, 202, "s2"), 0, 4)];
        assert_eq!(message_accounting(&t), (1, 0));
        // Deletes are distinct ids: two acks of message 5 do not cover message 6.
        let t = [
            with(ev(1, Poll, 200, "s3"), 5, 4),
            with(ev(2, Ack, 204, "s3"), 5, 0),
            with(ev(3, Ack, 204, "s3"), 5, 0),
            with(ev(4, Poll, 200, "s3"), 6, 5),
            with(ev(5, Poll, 202, "s3"), 0, 6),
        ];
        assert_eq!(message_accounting(&t), (1, 0));
        // Across sessions: a dead holder's message redelivered to the successor and acked there
        // is neither lost nor stranded.
        let t =
            [with(ev(1, Poll, 200, "s4"), 5, 4), with(ev(2, Poll, 200, "s5"), 5, 4), with(ev(3, Ack, 204, "s5"), 5, 0)];
        assert_eq!(message_accounting(&t), (0, 0));
    }

    #[test]
    fn owner_names_carry_the_token() {
        assert_eq!(owner_token("arcfed/a/m-1/t42"), Some(42));
        assert_eq!(owner_token("arc-runners-listener"), None);
    }
}
