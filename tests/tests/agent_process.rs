//! Process tests of `arcfed-agent` (issue 6): real coordinator voters, real agent processes
//! (clusters a, b, c with the `sim` runner backend), the emulated GitHub with the adversarial
//! knob values, real signals. Every check reads what GitHub (the emulator's report and
//! timeline) and the quorum (status) saw; nothing asserts a timing.

use arcfed_tests::agent_proc::{AgentProc, AgentSpec, GitHubSide, metric_value};
use arcfed_tests::emulator::{
    CloseReason, Cursor, Emulator, EmulatorConfig, EmulatorHandle, PathClass, SessionTtlFrom,
};
use arcfed_tests::harness::{Quorum, QuorumOptions};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(40);

/// Fields drop in order: the agents stop first, then the quorum, and the temp dir (which
/// holds every log) goes last.
struct World {
    agents: Vec<AgentProc>,
    q: Option<Quorum>,
    emu: EmulatorHandle,
    set: i64,
    dir: tempfile::TempDir,
}

/// The emulator with the adversarial values of the undocumented knobs (tests/EMULATOR.md).
async fn emulator(long_poll: Duration) -> anyhow::Result<(EmulatorHandle, i64)> {
    emulator_with(long_poll, |_| {}).await
}

/// [`emulator`], with `tune` applied to the config last.
async fn emulator_with(
    long_poll: Duration,
    tune: impl FnOnce(&mut EmulatorConfig),
) -> anyhow::Result<(EmulatorHandle, i64)> {
    let mut cfg = EmulatorConfig::default();
    cfg.settings.long_poll = long_poll;
    cfg.settings.queue_token_survives_session_delete = true;
    cfg.settings.session_ttl_from = SessionTtlFrom::Creation;
    cfg.settings.cursor = Cursor::PerScaleSet;
    tune(&mut cfg);
    let emu = Emulator::start(cfg, tokio::net::TcpListener::bind("127.0.0.1:0").await?).await?;
    let set = emu.create_scale_set("federated", 1).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok((emu, set.id))
}

fn github(emu: &EmulatorHandle, set: i64) -> GitHubSide {
    GitHubSide { config_url: emu.config_url(), pat: emu.pat().to_string(), scale_set_id: set, resolve: vec![] }
}

impl World {
    async fn start(clusters: &[&str]) -> anyhow::Result<World> {
        World::start_with(clusters, |_| {}).await
    }

    /// A world whose agents' specs `tune` adjusts (extra flags, shorter timers).
    async fn start_with(clusters: &[&str], tune: impl Fn(&mut AgentSpec)) -> anyhow::Result<World> {
        let (emu, set) = emulator(Duration::from_secs(2)).await?;
        World::start_on(emu, set, clusters, tune).await
    }

    /// A world on a given emulator and scale set.
    async fn start_on(
        emu: EmulatorHandle,
        set: i64,
        clusters: &[&str],
        tune: impl Fn(&mut AgentSpec),
    ) -> anyhow::Result<World> {
        let dir = tempfile::tempdir()?;
        let q = Quorum::start(dir.path(), QuorumOptions::default()).await?;
        q.wait_serving(WAIT).await?;
        let mut w = World { agents: vec![], q: Some(q), emu, set, dir };
        for c in clusters {
            let mut spec = w.spec(c)?;
            tune(&mut spec);
            w.add_spec(spec)?;
        }
        Ok(w)
    }

    fn q(&self) -> &Quorum {
        self.q.as_ref().expect("quorum")
    }

    fn spec(&self, cluster: &str) -> anyhow::Result<AgentSpec> {
        let q = self.q();
        Ok(AgentSpec::new(cluster, github(&self.emu, self.set)).federated(q.endpoints(), q.certs.agent(cluster)?))
    }

    fn add_spec(&mut self, spec: AgentSpec) -> anyhow::Result<()> {
        let a = AgentProc::start(&self.dir.path().join(&spec.cluster), spec)?;
        self.agents.push(a);
        Ok(())
    }

    fn agent(&mut self, cluster: &str) -> &mut AgentProc {
        self.agents.iter_mut().find(|a| a.spec.cluster == cluster).expect("agent")
    }

    /// (cluster, member id, token) of the holder, once every agent is live and one holds.
    async fn holder(&self) -> anyhow::Result<(String, String, u64)> {
        let n = self.agents.len();
        let s = self
            .q()
            .wait_status("every agent live and a holder", WAIT, |s| {
                s.members.iter().filter(|m| m.status == "live").count() >= n
                    && s.groups.first().is_some_and(|g| !g.holder.is_empty())
            })
            .await?;
        let g = &s.groups[0];
        Ok((g.holder_cluster.clone(), g.holder.clone(), g.token))
    }

    /// Waits until exactly one session is open, it is not `federated`, and it has polled (the
    /// fallback holder's); returns its id.
    async fn fallback_session(&self, federated: &str) -> anyhow::Result<String> {
        let end = Instant::now() + WAIT;
        loop {
            let open: Vec<(String, u64)> = self
                .emu
                .report()
                .scale_set(self.set)
                .map(|s| {
                    s.sessions
                        .iter()
                        .filter(|x| x.closed_at.is_none())
                        .map(|x| (x.session_id.clone(), x.polls))
                        .collect()
                })
                .unwrap_or_default();
            if let [(id, polls)] = open.as_slice()
                && id != federated
                && *polls > 0
            {
                return Ok(id.clone());
            }
            anyhow::ensure!(Instant::now() < end, "no fallback session polls ({open:?}); logs:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for a session of the holder with `token` that has polled; returns its id.
    async fn polling_session(&self, token: u64) -> anyhow::Result<String> {
        let suffix = format!("/t{token}");
        let end = Instant::now() + WAIT;
        loop {
            let rep = self.emu.report();
            if let Some(s) = rep
                .scale_set(self.set)
                .and_then(|s| s.sessions.iter().find(|x| x.owner.ends_with(&suffix) && x.polls > 0))
            {
                return Ok(s.session_id.clone());
            }
            if Instant::now() > end {
                anyhow::bail!("no polling session for token {token}; logs:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for a holder other than `old` (member id) whose session polls.
    async fn successor(&self, old: &str) -> anyhow::Result<(String, u64, String)> {
        let s = self
            .q()
            .wait_status("another holder", WAIT, |s| {
                s.groups.first().is_some_and(|g| !g.holder.is_empty() && g.holder != old)
            })
            .await?;
        let g = &s.groups[0];
        let sid = self.polling_session(g.token).await?;
        Ok((g.holder_cluster.clone(), g.token, sid))
    }

    fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| {
                let l = a.log_text();
                let tail: Vec<&str> = l.lines().rev().take(15).collect();
                format!("--- {}\n{}", a.spec.cluster, tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The GitHub-side invariants every scenario must keep (DESIGN §6, §11).
    fn assert_clean(&self) {
        let rep = self.emu.report();
        let ss = rep.scale_set(self.set).expect("scale set");
        assert_eq!(ss.max_concurrent_sessions, 1, "one session at a time; logs:\n{}", self.logs());
        assert_eq!(ss.sessions_overlap_ms, 0, "no holder-only request overlaps its successor's");
        assert_eq!(ss.zombie_requests, 0, "no request with a deleted session's credentials");
        assert_eq!(ss.jobs_acquired_twice, 0);
        let lost = ss.messages_delivered.saturating_sub(ss.messages_redelivered).saturating_sub(ss.messages_deleted);
        // A message in flight at the end may still be unacked: allow only that one.
        assert!(
            lost <= 1,
            "messages lost: {lost} (delivered {}, deleted {})",
            ss.messages_delivered,
            ss.messages_deleted
        );
    }
}

/// (a) One session, the others stand by, no steady 409s, owners in arcfed's format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_session_the_others_stand_by_with_arcfed_owner_names() -> anyhow::Result<()> {
    let w = World::start(&["a", "b", "c"]).await?;
    let (cluster, member, token) = w.holder().await?;
    let sid = w.polling_session(token).await?;
    let rep = w.emu.report();
    let ss = rep.scale_set(w.set).expect("scale set");
    let s = ss.sessions.iter().find(|s| s.session_id == sid).expect("session");
    assert_eq!(s.owner, format!("arcfed/{cluster}/{member}/t{token}"));
    // Steady state: a few long polls later, still one session and no 409 at all.
    let polls = s.polls;
    let end = Instant::now() + WAIT;
    while w.emu.report().scale_set(w.set).and_then(|x| x.sessions.iter().find(|s| s.session_id == sid)).map(|s| s.polls)
        < Some(polls + 3)
    {
        assert!(Instant::now() < end, "the holder stopped polling");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rep = w.emu.report();
    let ss = rep.scale_set(w.set).expect("scale set");
    assert_eq!(ss.conflicts_409, 0, "no 409 in steady state");
    assert_eq!(ss.sessions.len(), 1, "one session was ever opened");
    // The replicated session id is the holder's.
    let st = w.q().status().await?;
    assert_eq!(st.groups[0].session_id, sid);
    // Metrics: exactly the holder says it holds.
    for a in &w.agents {
        let m = a.metrics().await?;
        let want = if a.spec.cluster == cluster { 1.0 } else { 0.0 };
        assert_eq!(metric_value(&m, "arcfed_agent_is_holder"), Some(want), "{}: {m}", a.spec.cluster);
        assert_eq!(metric_value(&m, "arcfed_agent_coordinator_connected"), Some(1.0));
    }
    w.assert_clean();
    Ok(())
}

/// (b) Jobs run in all three clusters, split per DESIGN §5.5; every ERS patch ≤ its max.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_jobs_run_in_every_cluster() -> anyhow::Result<()> {
    let w = World::start(&["a", "b", "c"]).await?;
    let (_, _, token) = w.holder().await?;
    w.polling_session(token).await?;
    w.emu.enqueue_jobs(w.set, 9, Duration::from_secs(20)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let s = w
        .q()
        .wait_status("busy runners in every cluster", WAIT, |s| s.members.iter().filter(|m| m.busy > 0).count() == 3)
        .await
        .map_err(|e| anyhow::anyhow!("{e}; logs:\n{}", w.logs()))?;
    let g = &s.groups[0];
    let total: i64 = g.assignments.iter().map(|a| a.runners).sum();
    let max: i64 = s.members.iter().map(|m| m.max_runners).sum();
    assert!(total <= max, "Σ assignments {total} ≤ Σ max {max}");
    for m in &s.members {
        let a = g.assignments.iter().find(|a| a.member == m.id).map(|a| a.runners).unwrap_or(0);
        assert!(a >= m.busy, "{}: a running job is pinned to its cluster ({a} < busy {})", m.cluster, m.busy);
        assert!(a <= m.max_runners);
    }
    w.assert_clean();
    Ok(())
}

/// (c) SIGKILL the holder: the successor deletes the orphan by its replicated id and opens its
/// own session: no 409, no overlap, nothing lost, no job acquired twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_sigkill_holder_successor_revokes_the_orphan_and_takes_over() -> anyhow::Result<()> {
    let mut w = World::start(&["a", "b", "c"]).await?;
    let (cluster, member, token) = w.holder().await?;
    let orphan = w.polling_session(token).await?;
    w.emu.enqueue_jobs(w.set, 3, Duration::from_secs(30)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    w.agent(&cluster).kill();
    let (new_cluster, new_token, sid) = w.successor(&member).await?;
    assert_ne!(new_cluster, cluster);
    assert!(new_token > token, "tokens only grow");
    let rep = w.emu.report();
    let ss = rep.scale_set(w.set).expect("scale set");
    let o = ss.sessions.iter().find(|s| s.session_id == orphan).expect("orphan");
    assert_eq!(o.close_reason, CloseReason::Deleted, "the successor deleted the orphan");
    assert_eq!(ss.conflicts_409, 0, "the orphan was revoked before the create");
    let st = w
        .q()
        .wait_status("the revocation reported", WAIT, |s| {
            s.groups[0].session_id == sid && s.groups[0].stale_sessions.is_empty()
        })
        .await?;
    assert_eq!(st.groups[0].token, new_token);
    // The killed pod is recreated and comes back as a standby.
    w.agent(&cluster).restart()?;
    w.q()
        .wait_status("the recreated agent joins", WAIT, |s| {
            s.members.iter().filter(|m| m.cluster == cluster && m.status == "live").count() == 1
        })
        .await?;
    assert_eq!(w.q().status().await?.groups[0].token, new_token, "no failback");
    w.assert_clean();
    Ok(())
}

/// Per-cluster credentials, and GitHub refusing to delete another credential's session: the
/// successor cannot revoke the SIGKILLed holder's orphan, so the dead holder's recreated pod
/// (same cluster, same credentials) deletes it once the quorum lists it stale, instead of
/// everyone waiting for GitHub's orphan expiry (10 min here, so expiry cannot be the cure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_cluster_credentials_the_recreated_pod_deletes_its_predecessors_orphan() -> anyhow::Result<()> {
    use arcfed_tests::emulator::CrossCredentialDelete;
    let (emu, set) = emulator_with(Duration::from_secs(2), |c| {
        c.pats = vec!["pat-a".into(), "pat-b".into()];
        c.settings.cross_credential_delete = CrossCredentialDelete::Deny;
        c.settings.session_ttl = Duration::from_secs(600);
    })
    .await?;
    let mut w = World::start_on(emu, set, &["a", "b"], |s| s.github.pat = format!("pat-{}", s.cluster)).await?;
    let (cluster, member, token) = w.holder().await?;
    let orphan = w.polling_session(token).await?;
    w.agent(&cluster).kill();
    // The other cluster is granted, and its revocation is refused (403, another credential).
    w.q()
        .wait_status("a grant to the other cluster", WAIT, |s| {
            s.groups.first().is_some_and(|g| !g.holder.is_empty() && g.holder != member)
        })
        .await?;
    let open = |w: &World| {
        let rep = w.emu.report();
        rep.scale_set(w.set)
            .and_then(|s| s.sessions.iter().find(|x| x.session_id == orphan).map(|x| x.closed_at.is_none()))
    };
    assert_eq!(open(&w), Some(true), "the successor alone cannot delete another credential's session");
    // ARC recreates the killed listener pod: it reads its predecessor's session off its ERS.
    w.agent(&cluster).restart()?;
    let (new_cluster, new_token, _) = w.successor(&member).await?;
    assert_ne!(new_cluster, cluster, "the successor is the other cluster");
    assert!(new_token > token, "tokens only grow");
    let rep = w.emu.report();
    let ss = rep.scale_set(w.set).expect("scale set");
    let o = ss.sessions.iter().find(|s| s.session_id == orphan).expect("orphan");
    assert_eq!(o.close_reason, CloseReason::Deleted, "deleted, not expired");
    let swept = w
        .agent(&cluster)
        .wait_metric("the recreated pod's stale sweep", WAIT, |t| {
            metric_value(t, "arcfed_agent_stale_sweeps_total").is_some_and(|v| v >= 1.0)
        })
        .await;
    assert!(swept.is_ok(), "the recreated pod deleted it; logs:\n{}", w.logs());
    w.q().wait_status("the stale list drained", WAIT, |s| s.groups[0].stale_sessions.is_empty()).await?;
    w.assert_clean();
    Ok(())
}

/// (d) SIGSTOP the holder past its TTL, then SIGCONT: no holder-only request after its fence,
/// and it comes back as a standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_frozen_holder_sends_nothing_after_its_fence_and_returns_as_standby() -> anyhow::Result<()> {
    let mut w = World::start(&["a", "b", "c"]).await?;
    let (cluster, member, token) = w.holder().await?;
    w.polling_session(token).await?;
    w.agent(&cluster).freeze();
    let (_, new_token, _) = w.successor(&member).await?;
    w.agent(&cluster).thaw();
    let frozen = w.agent(&cluster).admin;
    let end = Instant::now() + WAIT;
    loop {
        let a = w.agents.iter().find(|a| a.admin == frozen).expect("agent");
        if let Ok(m) = a.metrics().await
            && metric_value(&m, "arcfed_agent_is_holder") == Some(0.0)
            && metric_value(&m, "arcfed_agent_coordinator_connected") == Some(1.0)
        {
            break;
        }
        assert!(Instant::now() < end, "the thawed agent did not return as a standby; logs:\n{}", w.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let anything the thawed agent might still send arrive, then check the history.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(w.q().status().await?.groups[0].token, new_token, "the successor still holds");
    w.assert_clean();
    Ok(())
}

/// (e) SIGTERM the holder: it deletes its session and releases; the successor opens its
/// own at once, with no 409 and no wait for GitHub's orphan expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_sigterm_holder_deletes_its_session_and_hands_over() -> anyhow::Result<()> {
    let mut w = World::start(&["a", "b"]).await?;
    let (cluster, member, token) = w.holder().await?;
    let sid = w.polling_session(token).await?;
    let code = w.agent(&cluster).terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "a clean exit within the grace period; logs:\n{}", w.logs());
    let rep = w.emu.report();
    let s = rep.scale_set(w.set).and_then(|s| s.sessions.iter().find(|x| x.session_id == sid).cloned()).expect("s");
    assert_eq!(s.close_reason, CloseReason::Deleted, "the holder deleted its own session");
    let (_, new_token, _) = w.successor(&member).await?;
    assert!(new_token > token);
    let st = w.q().status().await?;
    let left = st.members.iter().find(|m| m.id == member).map(|m| m.status.clone());
    assert!(left.is_none() || left.as_deref() == Some("left"), "the old member left: {left:?}");
    assert_eq!(w.emu.report().scale_set(w.set).map(|s| s.conflicts_409), Some(0));
    w.assert_clean();
    Ok(())
}

/// Standalone (no coordinator): a SIGKILLed agent's successor deletes the recorded session
/// and opens its own in seconds, with no 409 loop (DESIGN §5.12).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_restart_after_sigkill_deletes_the_recorded_session() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (emu, set) = emulator(Duration::from_secs(2)).await?;
    let mut a = AgentProc::start(dir.path(), AgentSpec::new("solo", github(&emu, set)))?;
    let first = wait_polling_owner(&emu, set, "arcfed/solo/", None).await?;
    let record = std::fs::read_to_string(&a.state_file)?;
    assert!(record.contains(&first), "the session id is recorded on the ERS before polling: {record}");
    a.kill();
    a.restart()?;
    let second = wait_polling_owner(&emu, set, "arcfed/solo/", Some(&first)).await?;
    let rep = emu.report();
    let ss = rep.scale_set(set).expect("scale set");
    let old = ss.sessions.iter().find(|s| s.session_id == first).expect("first session");
    assert_eq!(old.close_reason, CloseReason::Deleted, "deleted by the recorded id, not expired");
    assert_eq!(ss.conflicts_409, 0, "no 409 loop after the restart");
    assert!(std::fs::read_to_string(&a.state_file)?.contains(&second));
    assert_eq!(a.metric("arcfed_agent_is_holder").await, Some(1.0));
    Ok(())
}

async fn wait_polling_owner(emu: &EmulatorHandle, set: i64, prefix: &str, not: Option<&str>) -> anyhow::Result<String> {
    let end = Instant::now() + WAIT;
    loop {
        let rep = emu.report();
        if let Some(s) = rep.scale_set(set).and_then(|s| {
            s.sessions.iter().find(|x| x.owner.starts_with(prefix) && x.polls > 0 && Some(x.session_id.as_str()) != not)
        }) {
            return Ok(s.session_id.clone());
        }
        anyhow::ensure!(Instant::now() < end, "no polling session with owner {prefix}*");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (f) GitHub faults are survived without an exit: 401 on the queue (refresh), refresh 404
/// (re-create under the fence), 429 with Retry-After, a 5xx burst, a reset connection, an
/// empty 200, and a 409 from a foreign (non-arcfed) owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_github_faults_are_survived_without_exit() -> anyhow::Result<()> {
    use arcfed_tests::emulator::{FaultKind, FaultSpec, PathClass};
    let mut w = World::start(&["a", "b"]).await?;
    let (cluster, _, token) = w.holder().await?;
    let first = w.polling_session(token).await?;
    let fault = |kind: FaultKind, class: PathClass, count: u64| FaultSpec {
        kind,
        handle_first: false,
        path_class: Some(class),
        owner: None,
        session_id: None,
        scale_set_id: None,
        count: Some(count),
        duration: None,
    };
    let status = |status: u16, retry_after: Option<&str>| FaultKind::Status {
        status,
        retry_after: retry_after.map(str::to_string),
        type_name: None,
        message: None,
        error_kind: None,
    };
    let polls_of = |w: &World, sid: &str| {
        w.emu.report().scale_set(w.set).and_then(|s| s.sessions.iter().find(|x| x.session_id == sid).map(|x| x.polls))
    };
    // Each fault, then the holder polls its session again.
    for spec in [
        fault(status(401, None), PathClass::Poll, 1),
        fault(status(429, Some("1")), PathClass::Poll, 1),
        fault(status(503, None), PathClass::Poll, 2),
        fault(FaultKind::Reset, PathClass::Poll, 1),
        fault(FaultKind::EmptyBody, PathClass::Poll, 1),
    ] {
        let before = polls_of(&w, &first).unwrap_or(0);
        w.emu.add_fault(spec.clone()).map_err(|e| anyhow::anyhow!(e))?;
        let end = Instant::now() + WAIT;
        while polls_of(&w, &first).unwrap_or(0) < before + 2 {
            anyhow::ensure!(Instant::now() < end, "no polling after {spec:?}; logs:\n{}", w.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Refresh 404: GitHub evicted the session; the holder opens another under its fence.
    w.emu.evict_session(&first).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    w.emu.add_fault(fault(status(401, None), PathClass::Poll, 1)).map_err(|e| anyhow::anyhow!(e))?;
    let end = Instant::now() + WAIT;
    let second = loop {
        let rep = w.emu.report();
        let s = rep.scale_set(w.set).and_then(|s| {
            s.sessions.iter().find(|x| x.session_id != first && x.owner.ends_with(&format!("/t{token}")) && x.polls > 0)
        });
        if let Some(s) = s {
            break s.session_id.clone();
        }
        anyhow::ensure!(Instant::now() < end, "no new session after the eviction; logs:\n{}", w.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A foreign owner (a stock listener) takes the slot: 409s, foreign_session, no exit.
    let holder = w.agent(&cluster).admin;
    w.emu.evict_session(&second).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut stock = arcfed_tests::emulator::client::ArcClient::new(&w.emu.config_url(), w.emu.pat())?;
    stock.auth().await?;
    let foreign = stock.open_session(w.set, "arc-runners-set-754b578d-listener").await?;
    let a = w.agents.iter().find(|a| a.admin == holder).expect("holder");
    a.wait_metric("foreign_session", WAIT, |m| metric_value(m, "arcfed_agent_foreign_session") == Some(1.0)).await?;
    let path = format!("_apis/runtime/runnerscalesets/{}/sessions/{}", w.set, foreign.session_id);
    stock.admin(reqwest::Method::DELETE, &path, &[], None).await?;
    a.wait_metric("holding again", WAIT, |m| {
        metric_value(m, "arcfed_agent_is_holder") == Some(1.0)
            && metric_value(m, "arcfed_agent_foreign_session") == Some(0.0)
    })
    .await?;
    for a in w.agents.iter_mut() {
        assert!(a.running(), "{} exited; log:\n{}", a.spec.cluster, a.log_text());
    }
    let m = w.agent(&cluster).metrics().await?;
    assert!(metric_value(&m, "arcfed_agent_conflicts_409_total").unwrap_or(0.0) >= 1.0, "{m}");
    // (No overlap check here: the test itself evicts sessions under the holder, so its
    // requests on an evicted session are expected, and GitHub refuses them.)
    let rep = w.emu.report();
    let ss = rep.scale_set(w.set).expect("scale set");
    assert_eq!(ss.jobs_acquired_twice, 0);
    let open: Vec<_> = ss.sessions.iter().filter(|s| s.closed_at.is_none()).map(|s| s.owner.clone()).collect();
    assert_eq!(open.len(), 1, "one session open at the end: {open:?}");
    assert!(open[0].starts_with("arcfed/"), "and it is arcfed's: {open:?}");
    Ok(())
}

/// (g) Holder stall: GitHub fails for the holder only (5xx on its polls); it releases after
/// `--holder-stall` and another member serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_a_stalled_holder_releases_and_another_member_serves() -> anyhow::Result<()> {
    use arcfed_tests::emulator::{FaultKind, FaultSpec, PathClass};
    let w = World::start_with(&["a", "b"], |s| s.holder_stall = Some("4s".into())).await?;
    let (cluster, member, token) = w.holder().await?;
    let sid = w.polling_session(token).await?;
    let owner = format!("arcfed/{cluster}/{member}/t{token}");
    w.emu
        .add_fault(FaultSpec {
            kind: FaultKind::Status {
                status: 503,
                retry_after: None,
                type_name: None,
                message: None,
                error_kind: None,
            },
            handle_first: false,
            path_class: Some(PathClass::Poll),
            owner: Some(owner),
            session_id: Some(sid),
            scale_set_id: None,
            count: None,
            duration: Some("120s".into()),
        })
        .map_err(|e| anyhow::anyhow!(e))?;
    let (new_cluster, new_token, _) = w.successor(&member).await?;
    assert_ne!(new_cluster, cluster);
    assert!(new_token > token);
    w.assert_clean();
    Ok(())
}

/// (h) Quorum loss: after `--coordinator-lost-for` exactly one agent holds (fallback, GitHub's
/// one-session rule as the mutex); when the quorum returns the holder keeps its session
/// (Adopt or its kept grant): no session churn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_quorum_loss_falls_back_to_one_holder_and_the_quorum_adopts_it() -> anyhow::Result<()> {
    let mut w = World::start_with(&["a", "b", "c"], |s| s.coordinator_lost_for = Some("3s".into())).await?;
    let set = w.set;
    let (_, _, token) = w.holder().await?;
    let sid = w.polling_session(token).await?;
    let ids: Vec<u64> = w.q().voters.iter().map(|v| v.id).collect();
    for id in &ids {
        w.q.as_mut().expect("quorum").voter(*id).kill();
    }
    for a in &w.agents {
        a.wait_metric("fallback", WAIT, |m| metric_value(m, "arcfed_agent_fallback") == Some(1.0)).await?;
    }
    // The federated session is not resumed (its fence ended; only a whole-quorum loss would
    // guarantee nobody was granted since): it is deleted and one agent contends and wins a
    // new one, which it polls. Exactly one agent holds.
    let session = |w: &World, id: &str| {
        w.emu.report().scale_set(set).and_then(|s| s.sessions.iter().find(|x| x.session_id == id).cloned())
    };
    let fallback_sid = w.fallback_session(&sid).await?;
    assert!(session(&w, &sid).is_some_and(|s| s.closed_at.is_some()), "the lapsed federated session was deleted");
    let mut holders = 0;
    for a in &w.agents {
        if a.metric("arcfed_agent_is_holder").await == Some(1.0) {
            holders += 1;
        }
    }
    assert_eq!(holders, 1, "exactly one agent holds in fallback");
    for id in &ids {
        w.q.as_mut().expect("quorum").voter(*id).restart()?;
    }
    for a in &w.agents {
        a.wait_metric("fallback over", WAIT, |m| {
            metric_value(m, "arcfed_agent_fallback") == Some(0.0)
                && metric_value(m, "arcfed_agent_coordinator_connected") == Some(1.0)
        })
        .await?;
    }
    // The quorum adopts the fallback session when its Adopt comes first. When the pre-loss
    // holder is alive and re-attaches before the Adopt is decided, the Adopt is refused and
    // the holder replaces the fallback session with one of its own: one session more, still
    // one at a time. (A dead pre-loss holder is waited out: test i.) Either way a session the
    // quorum knows is polled.
    // Until the holder re-created it, the quorum may still name the pre-loss session (deleted
    // in fallback): wait for the session it names to be polled after the voters came back.
    let back = w.emu.now_ms();
    let end = Instant::now() + WAIT;
    let (st, known) = loop {
        anyhow::ensure!(Instant::now() < end, "no session the quorum knows is polled; logs:\n{}", w.logs());
        let Ok(st) = w.q().status().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let known = st.groups.first().map(|g| g.session_id.clone()).unwrap_or_default();
        let polled = !known.is_empty()
            && w.emu.timeline().iter().any(|e| {
                e.class == PathClass::Poll && e.at_ms >= back && e.session_id.as_deref() == Some(known.as_str())
            });
        if polled && st.groups.first().is_some_and(|g| !g.holder.is_empty()) {
            break (st, known);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(st.groups[0].token >= token, "tokens never decrease across a full restart");
    let rep = w.emu.report();
    let ss = rep.scale_set(set).expect("scale set");
    let adopted = known == fallback_sid;
    assert_eq!(
        ss.sessions.len(),
        if adopted { 2 } else { 3 },
        "the federated session, the fallback one, and a new one only if the Adopt was refused: {:?}",
        ss.sessions
    );
    w.assert_clean();
    Ok(())
}

/// The safety review's M4: the pre-loss holder dies during the quorum loss and another agent
/// wins the session in fallback. When the quorum returns, that agent's Adopt waits for the dead
/// holder's lease to end instead of being refused, and the quorum adopts the fallback session:
/// no new session, no 409 streak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i_the_fallback_winner_keeps_its_session_when_the_pre_loss_holder_died() -> anyhow::Result<()> {
    // The dead holder's session is orphaned: GitHub expires it after a while without polls
    // (8 s here instead of ~90 s), then a fallback agent wins the slot.
    let (emu, set) = emulator_with(Duration::from_secs(2), |c| {
        c.settings.session_ttl = Duration::from_secs(8);
        c.settings.session_ttl_from = SessionTtlFrom::LastPoll;
    })
    .await?;
    let mut w = World::start_on(emu, set, &["a", "b", "c"], |s| s.coordinator_lost_for = Some("3s".into())).await?;
    let set = w.set;
    let (cluster, _, token) = w.holder().await?;
    let sid = w.polling_session(token).await?;
    let ids: Vec<u64> = w.q().voters.iter().map(|v| v.id).collect();
    for id in &ids {
        w.q.as_mut().expect("quorum").voter(*id).kill();
    }
    let dead = w.agents.iter().position(|a| a.spec.cluster == cluster).expect("the holder's agent");
    w.agents[dead].kill();
    for (i, a) in w.agents.iter().enumerate().filter(|(i, _)| *i != dead) {
        a.wait_metric(&format!("fallback of agent {i}"), WAIT, |m| {
            metric_value(m, "arcfed_agent_fallback") == Some(1.0)
        })
        .await?;
    }
    let fallback_sid = w.fallback_session(&sid).await?;
    for id in &ids {
        w.q.as_mut().expect("quorum").voter(*id).restart()?;
    }
    // The quorum adopts the fallback session, and it is the one polled afterwards.
    let back = w.emu.now_ms();
    let end = Instant::now() + WAIT;
    loop {
        anyhow::ensure!(Instant::now() < end, "the fallback session was not adopted; logs:\n{}", w.logs());
        let known = match w.q().status().await {
            Ok(st) if st.groups.first().is_some_and(|g| !g.holder.is_empty()) => st.groups[0].session_id.clone(),
            _ => String::new(),
        };
        let polled = w.emu.timeline().iter().any(|e| {
            e.class == PathClass::Poll && e.at_ms >= back && e.session_id.as_deref() == Some(fallback_sid.as_str())
        });
        if known == fallback_sid && polled {
            break;
        }
        anyhow::ensure!(
            known.is_empty() || known == sid || known == fallback_sid,
            "the quorum names another session ({known}): the fallback session was replaced; logs:\n{}",
            w.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rep = w.emu.report();
    let ss = rep.scale_set(set).expect("scale set");
    assert_eq!(ss.sessions.len(), 2, "the federated session and the fallback one, no third: {:?}", ss.sessions);
    w.assert_clean();
    Ok(())
}

/// What a fake Kubernetes API server saw: (method, path, content type, body).
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String, String, serde_json::Value)>>>;

/// A stand-in for the Kubernetes API server (the only Kubernetes double the tests use at the
/// process level): it records every request and answers a PATCH with the patched object.
async fn fake_kube_api() -> anyhow::Result<(std::net::SocketAddr, Seen)> {
    use axum::extract::{Request, State};
    let seen: Seen = Default::default();
    async fn handle(State(seen): State<Seen>, req: Request) -> axum::response::Response {
        use axum::response::IntoResponse;
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let ct = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = axum::body::to_bytes(req.into_body(), 1 << 20).await.unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        seen.lock().unwrap_or_else(|p| p.into_inner()).push((method, path.clone(), ct, v.clone()));
        let name = path.rsplit('/').find(|s| *s != "status").unwrap_or("x").to_string();
        let mut obj = serde_json::json!({
            "apiVersion": "actions.github.com/v1alpha1", "kind": "EphemeralRunnerSet",
            "metadata": {"name": name, "namespace": "arc-runners", "annotations": {}}, "spec": {}
        });
        if let (Some(m), Some(a)) = (obj.get_mut("metadata"), v.get("metadata").and_then(|p| p.get("annotations"))) {
            m["annotations"] = a.clone();
        }
        (axum::http::StatusCode::OK, axum::Json(obj)).into_response()
    }
    let app = axum::Router::new().fallback(handle).with_state(seen.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move { axum::serve(l, app).await });
    Ok((addr, seen))
}

/// An agent started as ARC starts its listener: the listener config JSON at
/// $LISTENER_CONFIG_PATH, the `kube` backend, no coordinator. It makes the requests ARC's
/// listener would: a session, long polls, and ERS merge patches shaped as ARC's
/// (`{"spec":{"patchID":…,"replicas":…}}`, merge-patch+json), plus the session record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_from_arcs_listener_config_patches_the_ers_as_arc_does() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (emu, set) = emulator(Duration::from_secs(2)).await?;
    let (kube, seen) = fake_kube_api().await?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{kube}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: arc-runners\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n"
        ),
    )?;
    // deploy/examples/listener-config.json with this test's GitHub and metrics address.
    let sample =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/listener-config.json"))?;
    let mut cfg: serde_json::Value = serde_json::from_str(&sample)?;
    let admin = arcfed_tests::harness::free_port();
    cfg["configure_url"] = emu.config_url().into();
    cfg["github_token"] = emu.pat().into();
    cfg["runner_scale_set_id"] = set.into();
    cfg["metrics_addr"] = format!("127.0.0.1:{admin}").into();
    let path = dir.path().join("config.json");
    std::fs::write(&path, serde_json::to_vec(&cfg)?)?;
    let log = std::fs::File::create(dir.path().join("agent.log"))?;
    let mut child = std::process::Command::new(arcfed_tests::harness::bin_path("arcfed-agent"))
        .env("LISTENER_CONFIG_PATH", &path)
        .env("KUBECONFIG", &kubeconfig)
        .env("ARCFED_CONFIG_ERROR_DELAY", "0s")
        .stderr(log)
        .spawn()?;
    let ers_path = format!(
        "/apis/actions.github.com/v1alpha1/namespaces/arc-runners/ephemeralrunnersets/{}",
        cfg["ephemeral_runner_set_name"].as_str().unwrap_or_default()
    );
    let wait_patch = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        let end = Instant::now() + WAIT;
        loop {
            let found =
                seen.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|(m, p, ct, b)| {
                    m == "PATCH" && *p == ers_path && ct == "application/merge-patch+json" && pred(b)
                });
            if found {
                return Ok(());
            }
            if Instant::now() > end {
                let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
                anyhow::bail!(
                    "no such ERS patch; seen {:?}\nlog:\n{log}",
                    seen.lock().unwrap_or_else(|p| p.into_inner())
                );
            }
            // A synchronous closure: let the runtime move other tasks off this worker.
            tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(50)));
        }
    };
    let min = cfg["min_runners"].as_i64().unwrap_or(0);
    // The first patch after the session opens: ARC's first patch has patchID 0 and min replicas.
    wait_patch(&|b| b["spec"]["patchID"] == 0 && b["spec"]["replicas"] == min)?;
    // The session id is recorded on the ERS (annotation) with the same patch verb.
    wait_patch(&|b| b["metadata"]["annotations"]["arcfed.io/session-id"].is_string())?;
    let sid = wait_polling_owner(&emu, set, "arcfed/", None).await?;
    wait_patch(&|b| b["metadata"]["annotations"]["arcfed.io/session-id"] == sid.as_str())?;
    // A job assigned: min + 1 runners with a fresh patchID.
    emu.enqueue_jobs(set, 1, Duration::from_secs(30)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    wait_patch(&|b| b["spec"]["replicas"] == min + 1 && b["spec"]["patchID"].as_i64().is_some_and(|p| p > 0))?;
    // Every request went to the ERS or its runners, with the merge-patch content type only.
    for (m, p, ct, _) in seen.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        assert_eq!(m, "PATCH", "the listener role has only patch: {m} {p}");
        assert_eq!(ct, "application/merge-patch+json");
        assert!(p.starts_with("/apis/actions.github.com/v1alpha1/namespaces/arc-runners/ephemeralrunner"), "{p}");
    }
    // /metrics on the listener config's metrics_addr carries ARC's names.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let m = reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await?.text().await?;
    assert!(m.contains("gha_desired_runners{"), "{m}");
    assert_eq!(metric_value(&m, "arcfed_agent_is_holder"), Some(1.0));
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}

/// `arcfedctl drill kill-holder` against the deployment: the leader relays the drill to the
/// holder's agent (started with --allow-drills), which exits as if SIGKILLed; the report
/// (DESIGN §11, measured from the quorum) shows the holder change and the successor's
/// session, tokens growing, and names the GitHub-side fields it cannot observe. An agent
/// without --allow-drills refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arcfedctl_drill_kill_holder_reports_from_the_quorum() -> anyhow::Result<()> {
    let mut w = World::start_with(&["a", "b"], |s| s.extra.push("--allow-drills".into())).await?;
    let (cluster, _, token) = w.holder().await?;
    w.polling_session(token).await?;
    let q = w.q();
    let mut args: Vec<String> = vec![
        "--endpoints".into(),
        q.endpoints().join(","),
        "--tls-cert".into(),
        q.admin.cert.display().to_string(),
        "--tls-key".into(),
        q.admin.key.display().to_string(),
        "--tls-ca".into(),
        q.admin.ca.display().to_string(),
    ];
    args.extend(["drill", "kill-holder", "--runs", "1", "--json", "--wait", "30s"].map(String::from));
    let ctl = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        arcfed_tests::harness::arcfedctl(&refs)
    });
    tokio::pin!(ctl);
    // Play ARC's controller: recreate the listener pod that died.
    let out = loop {
        tokio::select! {
            r = &mut ctl => break r??,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                let a = w.agent(&cluster);
                if !a.running() {
                    a.restart()?;
                }
            }
        }
    };
    let report: serde_json::Value = serde_json::from_str(out.trim())?;
    assert_eq!(report["scenario"], "kill-holder");
    assert_eq!(report["source"], "quorum");
    let run = &report["runs"][0];
    assert_eq!(run["from_cluster"], cluster.as_str());
    // (The successor may be the recreated pod of the same cluster: a new member.)
    assert!(run["token_after"].as_u64() > run["token_before"].as_u64(), "{report}");
    assert!(report["failover_ms"]["p50"].as_u64() >= report["detect_ms"]["p50"].as_u64(), "{report}");
    assert_eq!(report["token_regressions"], 0);
    assert!(report["sessions_overlap_ms"].is_null(), "GitHub-side fields are not made up: {report}");
    assert!(report["unobservable"].as_array().is_some_and(|u| u.iter().any(|f| f == "sessions_overlap_ms")));
    // The crash left an orphan: the successor deleted it by its replicated id (GitHub side).
    w.assert_clean();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_allow_drills_refuses_a_drill() -> anyhow::Result<()> {
    let w = World::start(&["a", "b"]).await?;
    let (_, member, token) = w.holder().await?;
    w.polling_session(token).await?;
    let q = w.q();
    let out = arcfed_tests::harness::arcfedctl(&[
        "--endpoints",
        &q.endpoints().join(","),
        "--tls-cert",
        &q.admin.cert.display().to_string(),
        "--tls-key",
        &q.admin.key.display().to_string(),
        "--tls-ca",
        &q.admin.ca.display().to_string(),
        "drill",
        "kill-holder",
        "--wait",
        "4s",
    ]);
    let err = out.expect_err("the drill must not take effect");
    assert!(format!("{err:#}").contains("--allow-drills"), "{err:#}");
    let st = w.q().status().await?;
    assert_eq!(st.groups[0].holder, member, "the holder is untouched");
    let holder = w.agents.iter().find(|a| st.groups[0].holder_cluster == a.spec.cluster).expect("holder agent");
    assert!(holder.log_text().contains("drill refused"), "the agent logs the refusal");
    Ok(())
}

/// Standalone, a holder stall (GitHub failing on the session's polls past the client's own
/// retries) releases the session and the agent contends again by itself: never below ARC,
/// never an exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_holder_stall_releases_and_contends_again() -> anyhow::Result<()> {
    use arcfed_tests::emulator::{FaultKind, FaultSpec, PathClass};
    let dir = tempfile::tempdir()?;
    let (emu, set) = emulator(Duration::from_secs(2)).await?;
    let mut spec = AgentSpec::new("solo", github(&emu, set));
    spec.holder_stall = Some("2s".into());
    let mut a = AgentProc::start(dir.path(), spec)?;
    let first = wait_polling_owner(&emu, set, "arcfed/solo/", None).await?;
    emu.add_fault(FaultSpec {
        kind: FaultKind::Status { status: 503, retry_after: None, type_name: None, message: None, error_kind: None },
        handle_first: false,
        path_class: Some(PathClass::Poll),
        owner: None,
        session_id: Some(first.clone()),
        scale_set_id: None,
        count: None,
        duration: Some("120s".into()),
    })
    .map_err(|e| anyhow::anyhow!(e))?;
    let second = wait_polling_owner(&emu, set, "arcfed/solo/", Some(&first))
        .await
        .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", a.log_text()))?;
    assert_ne!(second, first);
    assert!(a.running(), "the agent never exits; log:\n{}", a.log_text());
    let rep = emu.report();
    let ss = rep.scale_set(set).expect("scale set");
    let old = ss.sessions.iter().find(|s| s.session_id == first).expect("first");
    assert_eq!(old.close_reason, CloseReason::Deleted, "the stalled session was released (deleted), not abandoned");
    assert!(a.log_text().contains("contending for the session again"));
    Ok(())
}
