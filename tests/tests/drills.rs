//! The DESIGN §10 drills, once each, and a short randomized fault run, over the same sandbox
//! world and drill code as `arcfed-sandbox --drill …` (real voters, real agents, the
//! adversarial emulator, a steady workload). Assertions are on the §6 invariants and the §11
//! counters that must be zero, never on timings.

use arcfed_tests::drill::{DrillReport, Scenario, random_faults, run_drill};
use arcfed_tests::emulator::Mode as JobMode;
use arcfed_tests::sandbox::{Sandbox, SandboxOptions};

async fn world(opts: SandboxOptions) -> anyhow::Result<(tempfile::TempDir, Sandbox)> {
    let dir = tempfile::tempdir()?;
    // Short jobs, so that each drill's closing check (every enqueued job ran) drains quickly.
    let opts = SandboxOptions { job_seconds: (2, 6), ..opts };
    let sb = Sandbox::start(dir.path(), opts).await?;
    Ok((dir, sb))
}

/// The §11 counters every drill must keep at zero, and every §6 invariant.
fn assert_clean(r: &DrillReport) {
    let text = serde_json::to_string_pretty(r).unwrap_or_default();
    assert!(r.invariants_hold(), "invariants: {:?}\n{text}", r.failed_invariants());
    assert_eq!(r.sessions_overlap_ms, 0, "{text}");
    assert_eq!(r.zombie_requests, 0, "{text}");
    assert_eq!(r.late_requests, 0, "{text}");
    assert_eq!(r.messages_lost, 0, "{text}");
    assert_eq!(r.token_regressions, 0, "{text}");
    assert_eq!(r.jobs_unfinished, 0, "{text}");
}

async fn drill_once(scenario: Scenario, opts: SandboxOptions) -> anyhow::Result<DrillReport> {
    let (_dir, mut sb) = world(opts).await?;
    let r = run_drill(&mut sb, scenario, 1).await;
    sb.shutdown().await;
    let r = r?;
    assert_eq!(r.runs.len(), 1);
    assert_clean(&r);
    Ok(r)
}

/// A failover drill: the holder changed, and the successor's token is higher.
fn assert_failed_over(r: &DrillReport) {
    let run = &r.runs[0];
    assert!(run.failover_ms.is_some() && run.first_poll_ms.is_some(), "{run:?}");
    assert!(run.token_after > run.token_before, "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_holder_fails_over_without_overlap_or_loss() -> anyhow::Result<()> {
    let r = drill_once(Scenario::KillHolder, SandboxOptions::default()).await?;
    assert_failed_over(&r);
    Ok(())
}

/// DESIGN §6.7: GitHub credentials never leave their cluster. After a failover with
/// per-region PATs (each region's admin, registration and queue tokens issued), none of the
/// emulator's credentials appears in any voter's store or log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_credentials_never_reach_the_quorum() -> anyhow::Result<()> {
    let (_dir, mut sb) = world(SandboxOptions { per_region_credentials: true, ..SandboxOptions::default() }).await?;
    let r = run_drill(&mut sb, Scenario::KillHolder, 1).await;
    let secrets = sb.emu.secrets();
    let files: Vec<std::path::PathBuf> =
        sb.q.voters
            .iter()
            .flat_map(|v| {
                let mut f = vec![v.log.clone()];
                f.extend(std::fs::read_dir(&v.data_dir).into_iter().flatten().flatten().map(|e| e.path()));
                f
            })
            .collect();
    sb.shutdown().await;
    assert_clean(&r?);
    // PATs, and tokens the emulator issued during the run (admin, registration, queue).
    assert!(secrets.len() > 3, "the run issued tokens: {}", secrets.len());
    let mut scanned = 0;
    for f in files.iter().filter(|f| f.is_file()) {
        let bytes = std::fs::read(f)?;
        scanned += bytes.len();
        for s in &secrets {
            assert!(
                !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                "a GitHub credential ({}…) is in {}",
                &s[..s.len().min(8)],
                f.display()
            );
        }
    }
    assert!(scanned > 0, "no voter file was scanned");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_holder_is_replaced_and_returns_as_standby() -> anyhow::Result<()> {
    let r = drill_once(Scenario::FreezeHolder, SandboxOptions::default()).await?;
    assert_failed_over(&r);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_holder_is_replaced_without_overlap() -> anyhow::Result<()> {
    let r = drill_once(Scenario::HalfCloseHolder, SandboxOptions::default()).await?;
    assert_failed_over(&r);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_region_that_still_reaches_github_stops_holding() -> anyhow::Result<()> {
    let r = drill_once(Scenario::PartitionRegion, SandboxOptions::default()).await?;
    assert_failed_over(&r);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_keeps_one_session_and_every_message() -> anyhow::Result<()> {
    let r = drill_once(Scenario::RollingRestart, SandboxOptions::default()).await?;
    // The holder's own SIGTERM hands over; the voter restarts alone never do (§6.5).
    assert_failed_over(&r);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_loss_moves_the_regions_share_to_the_others() -> anyhow::Result<()> {
    let r = drill_once(Scenario::RegionLoss, SandboxOptions::default()).await?;
    assert_failed_over(&r);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_loss_falls_back_to_one_holder_and_is_adopted() -> anyhow::Result<()> {
    let opts = SandboxOptions { coordinator_lost_for: Some("5s".into()), ..SandboxOptions::default() };
    let r = drill_once(Scenario::QuorumLoss, opts).await?;
    let run = &r.runs[0];
    assert!(run.fallback_ms.is_some() && run.adopt_ms.is_some(), "{run:?}");
    assert!(run.token_after >= run.token_before, "{run:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_holder_hands_over() -> anyhow::Result<()> {
    let opts = SandboxOptions { holder_stall: Some("4s".into()), ..SandboxOptions::default() };
    let r = drill_once(Scenario::HolderStall, opts).await?;
    assert_failed_over(&r);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_leader_changes_no_holder() -> anyhow::Result<()> {
    let r = drill_once(Scenario::KillLeader, SandboxOptions::default()).await?;
    let run = &r.runs[0];
    assert_eq!(run.token_after, run.token_before, "the same grant serves on: {run:?}");
    assert!(run.served_again_ms.is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_moves_the_session() -> anyhow::Result<()> {
    let r = drill_once(Scenario::Handover, SandboxOptions::default()).await?;
    assert_failed_over(&r);
    Ok(())
}

/// Safety review H3: the holder's region loses the quorum while its connects to GitHub hang
/// in the handshake; GitHub's path heals after the successor took over. No request of the old
/// token may reach GitHub after the successor's first (`late_requests`, checked in
/// `assert_clean`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_stall_sends_nothing_after_the_fence() -> anyhow::Result<()> {
    let r = drill_once(Scenario::ConnectStall, SandboxOptions::default()).await?;
    assert_failed_over(&r);
    Ok(())
}

/// Safety review M3.3: a session create whose POST landed while the holder's fence then ended
/// before the answer came. The session it opened is named only by that answer; forgotten, it
/// would meet the next holder with 409s until GitHub expires it (90 s here). The abandoned
/// create is left to finish, and the session it opened is deleted with the agent's own
/// credentials, so the next holder serves within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_abandoned_at_the_fence_leaves_no_orphan_for_the_next_holder() -> anyhow::Result<()> {
    use anyhow::Context;
    use arcfed_tests::emulator::CloseReason;
    use arcfed_tests::fault_proxy::Mode;
    use std::time::{Duration, Instant};
    let (_dir, mut sb) = world(SandboxOptions::default()).await?;
    let r = async {
        let (s, _) = sb.wait_settled().await?;
        let old = s.groups[0].holder.clone();
        let i = sb.region_index(&s.groups[0].holder_cluster).context("the holder's region")?;
        // The next session create is served at once; its answer is held back 5 s (past the
        // fence below, within the agent's 7.5 s timeout for one GitHub operation).
        let fault = serde_json::json!({"kind": "latency", "ms": 5000, "handleFirst": true,
            "pathClass": "session_create", "count": 1});
        sb.emu.add_fault(serde_json::from_value(fault)?).map_err(|e| anyhow::anyhow!(e))?;
        let fault_emu = sb.emu.now_ms();
        sb.regions[i].agent.kill();
        let s = sb
            .wait_status("a successor", |s| s.groups.first().is_some_and(|g| !g.holder.is_empty() && g.holder != old))
            .await?;
        let j = sb.region_index(&s.groups[0].holder_cluster).context("the successor's region")?;
        let prefix = format!("arcfed/{}/", sb.regions[j].name);
        // Once its POST has opened a session (the answer still on its way), the successor is
        // cut from the quorum: its fence ends first, and the create is abandoned.
        let end = Instant::now() + Duration::from_secs(30);
        let orphan = loop {
            let rep = sb.emu.report();
            let ss = rep.scale_set(sb.set).context("the scale set")?;
            if let Some(o) = ss.sessions.iter().find(|x| x.owner.starts_with(&prefix) && x.opened_at > fault_emu) {
                break o.session_id.clone();
            }
            anyhow::ensure!(Instant::now() < end, "the successor opened no session\n{}", sb.agent_logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        sb.regions[j].cut(Mode::Blackhole);
        // A third region takes over and polls well before GitHub would expire the orphan.
        let end = Instant::now() + Duration::from_secs(40);
        let polled = loop {
            let rep = sb.emu.report();
            let ss = rep.scale_set(sb.set).context("the scale set")?;
            if let Some(o) = ss.sessions.iter().find(|x| {
                x.opened_at > fault_emu && !x.owner.starts_with(&prefix) && x.polls > 0
            }) {
                break o.owner.clone();
            }
            anyhow::ensure!(
                Instant::now() < end,
                "no other region polled within 40 s of the fault (the orphan {orphan} blocks it?)\n{}\n--- {} in full\n{}",
                sb.agent_logs(),
                sb.regions[j].name,
                sb.regions[j].agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let rep = sb.emu.report();
        let o = rep.scale_set(sb.set).and_then(|ss| ss.sessions.iter().find(|x| x.session_id == orphan).cloned());
        let reason = o.map(|o| o.close_reason);
        anyhow::ensure!(reason == Some(CloseReason::Deleted), "the orphan {orphan} was not deleted: {reason:?}");
        sb.regions[j].cut(Mode::Pass);
        anyhow::Ok(polled)
    }
    .await;
    sb.shutdown().await;
    r.map(|_| ())
}

/// A region cut off from the quorum, but not from GitHub, for longer than
/// `--coordinator-lost-for`: it falls back while the quorum's holder serves. Its lapsed
/// federated session is deleted, never resumed (with the adversarial queue token a resumed
/// one would poll as a zombie beside the successor), and after the heal the quorum's holder
/// goes on polling without waiting out GitHub's TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_held_past_coordinator_lost_for_never_resumes_the_lapsed_session() -> anyhow::Result<()> {
    let opts = SandboxOptions {
        coordinator_lost_for: Some("5s".into()),
        hold: Some(std::time::Duration::from_secs(15)),
        ..SandboxOptions::default()
    };
    let r = drill_once(Scenario::PartitionRegion, opts).await?;
    assert_failed_over(&r);
    assert_eq!(r.max_concurrent_sessions, 1, "one session at a time");
    Ok(())
}

/// The Raft leader SIGSTOPped past the lease TTL, then SIGCONT (etcd #15247): the woken old
/// leader expires no lease, the holder and its token stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_leader_expires_no_lease_and_moves_no_holder() -> anyhow::Result<()> {
    let r = drill_once(Scenario::FreezeLeader, SandboxOptions::default()).await?;
    let run = &r.runs[0];
    assert_eq!(run.leases_expired, Some(0), "{run:?}");
    assert_eq!(run.leader_change_moved_holder, Some(false), "{run:?}");
    assert_eq!(run.token_after, run.token_before, "{run:?}");
    Ok(())
}

/// GHES: `acquirejobs` hangs, then answers 503, to the holder only. The message whose jobs it
/// could not acquire is never acked, the holder hands over after `--holder-stall`, and the
/// successor acquires what was left available: every job runs (the adversarial cursor never
/// offers that message again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_acquires_hand_over_and_every_job_still_runs() -> anyhow::Result<()> {
    let opts = SandboxOptions { holder_stall: Some("4s".into()), ..SandboxOptions::default() };
    let r = drill_once(Scenario::AcquireFault, opts).await?;
    assert_failed_over(&r);
    Ok(())
}

/// github.com's form (`JobAssigned`, nothing to acquire): a killed holder is replaced and every
/// job runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dotcom_mode_kill_holder_runs_every_job() -> anyhow::Result<()> {
    let opts = SandboxOptions { job_mode: JobMode::Dotcom, ..SandboxOptions::default() };
    let r = drill_once(Scenario::KillHolder, opts).await?;
    assert_failed_over(&r);
    assert!(r.jobs_enqueued > 0, "the workload ran");
    Ok(())
}

/// A short randomized run: a few random §10 faults under the workload, then every invariant.
/// The seed comes from `ARCFED_DRILL_SEED` (to replay a failure) or is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_faults_keep_every_invariant() -> anyhow::Result<()> {
    let seed = std::env::var("ARCFED_DRILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20_240_909);
    let opts = SandboxOptions {
        coordinator_lost_for: Some("5s".into()),
        holder_stall: Some("5s".into()),
        ..SandboxOptions::default()
    };
    let (_dir, mut sb) = world(opts).await?;
    eprintln!("random faults: seed {seed}");
    let r = random_faults(&mut sb, seed, 5).await;
    sb.shutdown().await;
    let r = r?;
    assert_eq!(r.faults.len(), 5, "every planned fault ran");
    assert!(r.faults.iter().all(|f| !f.target.is_empty()));
    assert!(r.invariants_hold(), "seed {seed}: {:?}", r.failed_invariants());
    assert_eq!(r.late_requests, 0, "seed {seed}");
    assert_eq!(r.messages_lost, 0, "seed {seed}");
    assert_eq!(r.token_regressions, 0, "seed {seed}");
    assert_eq!(r.jobs_unfinished, 0, "seed {seed}");
    Ok(())
}

/// Real regions (network namespaces joined by a WAN with 40 ms between regions, WAN profile):
/// the partitioned region's WAN link is cut (`ip link set down`) and it still reaches GitHub.
/// Needs root, as CI runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_wan_partitioned_region_by_a_link_cut_stops_holding() -> anyhow::Result<()> {
    let opts = SandboxOptions {
        netns: Some(arcfed_tests::netns::WanOptions::default()),
        profile: Some("wan".into()),
        lease_ttl: "10s".into(),
        ..SandboxOptions::default()
    };
    let r = drill_once(Scenario::PartitionRegion, opts).await?;
    assert_failed_over(&r);
    assert!(r.runs[0].what.contains("partitioned"), "{:?}", r.runs[0]);
    Ok(())
}

/// Real regions: the holder region's link to GitHub is cut (frames dropped silently, in the
/// middle of whatever request is in flight). The holder sees the dead path through its holder
/// client's short TCP timeouts and bounded requests, releases after `--holder-stall`, and
/// another region takes over. Needs root, as CI runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_wan_holder_whose_github_link_is_cut_hands_over() -> anyhow::Result<()> {
    let opts = SandboxOptions {
        netns: Some(arcfed_tests::netns::WanOptions::default()),
        profile: Some("wan".into()),
        lease_ttl: "10s".into(),
        holder_stall: Some("4s".into()),
        ..SandboxOptions::default()
    };
    let r = drill_once(Scenario::HolderStall, opts).await?;
    assert_failed_over(&r);
    assert!(r.runs[0].what.contains("link"), "{:?}", r.runs[0]);
    Ok(())
}
