//! Table-driven tests and property tests of `State::apply` (DESIGN §3, §5, §6).
use crate::state::*;
use crate::types::*;
use proptest::prelude::*;

fn gk() -> GroupKey {
    GroupKey::new("https://GitHub.example/Org/", 7).expect("valid key")
}
fn mid(s: &str) -> MemberId {
    MemberId(s.into())
}
fn join(member: &str, cluster: &str, max: i64) -> Command {
    Command::Join(JoinSpec {
        member: mid(member),
        cluster: cluster.into(),
        group: gk(),
        ers_namespace: "arc-runners".into(),
        ers_name: format!("set-{cluster}"),
        weight: 1,
        min_runners: 0,
        max_runners: max,
        priority: 0,
        github_ready: true,
        policy: SplitPolicy::Spread,
    })
}

/// Applies commands at consecutive log indexes, like a Raft log would.
struct World {
    state: State,
    index: u64,
}
impl World {
    fn new() -> World {
        World { state: State::default(), index: 0 }
    }
    fn apply(&mut self, cmd: Command) -> Applied {
        self.index += 1;
        self.state.apply(self.index, &Request { ts_ms: self.index as i64 * 10, cmd })
    }
    fn group(&self) -> &Group {
        &self.state.groups[&gk()]
    }
    fn grant(&mut self, m: &str) -> u64 {
        match self.apply(Command::Grant { group: gk(), member: mid(m) }).outcome {
            Outcome::Granted { token } => token,
            other => panic!("grant to {m} failed: {other:?}"),
        }
    }
    fn epoch(&self, m: &str) -> u64 {
        self.state.members[&mid(m)].epoch
    }
}

#[test]
fn group_key_is_normalized() {
    assert_eq!(gk().0, "https://github.example/Org#7");
    assert!(GroupKey::new("", 1).is_err());
    assert!(GroupKey::new("https://x/o", 0).is_err());
    assert!(GroupKey::new("x/o", 1).is_err());
}

#[test]
fn exactly_one_holder_and_the_token_is_the_grant_index() {
    let mut w = World::new();
    assert!(matches!(w.apply(join("a1", "a", 10)).outcome, Outcome::Joined { .. }));
    assert!(matches!(w.apply(join("b1", "b", 10)).outcome, Outcome::Joined { .. }));
    assert_eq!(w.state.choose_holder(&gk(), 0, &|_| true), Some(mid("a1")));
    let t = w.grant("a1");
    assert_eq!(t, w.index);
    // A second grant while held is refused.
    assert!(w.apply(Command::Grant { group: gk(), member: mid("b1") }).outcome.is_rejected());
    assert_eq!(w.group().holder, Some(mid("a1")));
}

#[test]
fn expiry_moves_the_session_to_stale_and_the_next_token_is_larger() {
    let mut w = World::new();
    w.apply(join("a1", "a", 10));
    w.apply(join("b1", "b", 10));
    let t1 = w.grant("a1");
    let o = w.apply(Command::SessionOpened {
        member: mid("a1"),
        group: gk(),
        token: t1,
        session_id: "s-a".into(),
        statistics: Statistics::default(),
    });
    assert_eq!(o.outcome, Outcome::Accepted { duplicate: false });
    let ea = w.epoch("a1");
    w.apply(Command::Expire { members: vec![(mid("a1"), ea)] });
    assert_eq!(w.group().holder, None);
    assert!(w.group().stale_sessions.contains("s-a"));
    assert_eq!(w.state.choose_holder(&gk(), 0, &|_| true), Some(mid("b1")));
    let t2 = w.grant("b1");
    assert!(t2 > t1);
    // The new holder deletes the stale session and reports it; it keeps holding.
    let o = w.apply(Command::Release {
        member: mid("b1"),
        group: gk(),
        token: t2,
        deleted: vec!["s-a".into()],
        reason: ReleaseReason::StaleRevoked,
    });
    assert_eq!(o.outcome, Outcome::Accepted { duplicate: false });
    assert!(w.group().stale_sessions.is_empty());
    assert_eq!(w.group().holder, Some(mid("b1")));
}

#[test]
fn old_tokens_are_rejected_and_a_stale_session_lands_in_the_stale_set() {
    let mut w = World::new();
    w.apply(join("a1", "a", 10));
    w.apply(join("b1", "b", 10));
    let t1 = w.grant("a1");
    let ea = w.epoch("a1");
    w.apply(Command::Expire { members: vec![(mid("a1"), ea)] });
    let t2 = w.grant("b1");
    let stats = Statistics::default();
    let p = w.apply(Command::Progress {
        member: mid("a1"),
        group: gk(),
        token: t1,
        message_id: Some(1),
        statistics: stats,
        events: vec![],
    });
    assert!(matches!(p.outcome, Outcome::Rejected { reason: RejectReason::StaleToken, .. }));
    let r = w.apply(Command::Release {
        member: mid("a1"),
        group: gk(),
        token: t1,
        deleted: vec![],
        reason: ReleaseReason::Shutdown,
    });
    assert!(matches!(r.outcome, Outcome::Rejected { reason: RejectReason::StaleToken, .. }));
    let s = w.apply(Command::SessionOpened {
        member: mid("a1"),
        group: gk(),
        token: t1,
        session_id: "late".into(),
        statistics: stats,
    });
    assert!(matches!(s.outcome, Outcome::Rejected { reason: RejectReason::StaleToken, .. }));
    assert!(w.group().stale_sessions.contains("late"));
    assert_eq!(s.effects, vec![Effect::DeleteSessions { group: gk(), token: t2, session_ids: vec!["late".into()] }]);
    assert_eq!(w.group().holder, Some(mid("b1")));
    assert_eq!(w.state.counters.stale_token_rejections, 3);
}

#[test]
fn duplicate_progress_changes_nothing() {
    let mut w = World::new();
    w.apply(join("a1", "a", 10));
    let t = w.grant("a1");
    let stats = Statistics { total_assigned_jobs: 4, ..Statistics::default() };
    let p = |m: i64, s: Statistics| Command::Progress {
        member: mid("a1"),
        group: gk(),
        token: t,
        message_id: Some(m),
        statistics: s,
        events: vec![],
    };
    assert_eq!(w.apply(p(5, stats)).outcome, Outcome::Accepted { duplicate: false });
    let before = w.group().clone();
    assert_eq!(w.apply(p(5, Statistics::default())).outcome, Outcome::Accepted { duplicate: true });
    assert_eq!(w.apply(p(3, Statistics::default())).outcome, Outcome::Accepted { duplicate: true });
    assert_eq!(w.group(), &before);
    assert_eq!(w.group().assignments[&mid("a1")], 4);
}

#[test]
fn job_events_pin_busy_runners_and_are_routed_by_ers_prefix() {
    let mut w = World::new();
    w.apply(join("a1", "a", 10));
    w.apply(join("b1", "b", 10));
    let t = w.grant("a1");
    let started = JobEvent {
        kind: JobEventKind::Started,
        runner_name: "set-b-runner-x1".into(),
        runner_id: 1,
        job_id: "j1".into(),
        runner_request_id: 0,
        repository_name: String::new(),
        owner_name: String::new(),
        job_workflow_ref: String::new(),
        job_display_name: String::new(),
        workflow_run_id: 0,
        result: String::new(),
    };
    let stats = Statistics { total_assigned_jobs: 1, ..Statistics::default() };
    let out = w.apply(Command::Progress {
        member: mid("a1"),
        group: gk(),
        token: t,
        message_id: Some(1),
        statistics: stats,
        events: vec![started.clone()],
    });
    assert_eq!(out.effects, vec![Effect::JobEvent { member: mid("b1"), group: gk(), event: started }]);
    assert_eq!(w.state.busy_of(&mid("b1")), 1);
    assert_eq!(w.group().assignments[&mid("b1")], 1);
    assert_eq!(w.group().assignments[&mid("a1")], 0);
    assert!(w.group().dirty.contains(&mid("b1")));
}

#[test]
fn ers_name_of_another_cluster_is_refused_and_older_incarnations_become_standby() {
    let mut w = World::new();
    w.apply(join("a1", "a", 10));
    let mut clash = join("b1", "b", 10);
    if let Command::Join(spec) = &mut clash {
        spec.ers_name = "set-a".into();
    }
    assert!(matches!(w.apply(clash).outcome, Outcome::Rejected { reason: RejectReason::Conflict, .. }));
    // Same cluster, same ERS, new process: the old one becomes a standby with 0 runners.
    w.apply(join("a2", "a", 10));
    assert!(w.state.members[&mid("a1")].standby);
    assert!(!w.group().assignments.contains_key(&mid("a1")));
    assert!(w.apply(Command::Grant { group: gk(), member: mid("a1") }).outcome.is_rejected());
}

/// A re-attach without a log entry is allowed only for a member the state holds live and
/// unchanged under the named epoch; anything a log Join would change goes through the log.
#[test]
fn only_an_unchanged_live_member_may_resume_its_epoch() {
    let mut w = World::new();
    w.apply(join("a1", "a", 10));
    let e = w.epoch("a1");
    let spec = |f: &dyn Fn(&mut JoinSpec)| match join("a1", "a", 10) {
        Command::Join(mut s) => {
            f(&mut s);
            s
        }
        _ => unreachable!(),
    };
    assert!(w.state.resumable(&spec(&|_| {}), e));
    assert!(w.state.resumable(&spec(&|s| s.github_ready = false), e), "readiness goes by SetReady");
    assert!(!w.state.resumable(&spec(&|_| {}), 0), "epoch 0 names no lease");
    assert!(!w.state.resumable(&spec(&|_| {}), e + 1), "another epoch");
    assert!(!w.state.resumable(&spec(&|s| s.cluster = "b".into()), e), "a member id never changes cluster");
    assert!(!w.state.resumable(&spec(&|s| s.max_runners = 11), e), "new bounds are a log Join");
    assert!(!w.state.resumable(&spec(&|s| s.weight = 2), e), "a new weight is a log Join");
    assert!(!w.state.resumable(&spec(&|s| s.ers_name = "other".into()), e), "a new ERS is a log Join");
    assert!(!w.state.resumable(&spec(&|s| s.member = mid("zz")), e), "unknown member");
    // A superseded incarnation (standby) must Join through the log to be the latest again.
    w.apply(join("a2", "a", 10));
    assert!(!w.state.resumable(&spec(&|_| {}), e), "standby");
    // Silent or expired members do not resume either.
    let e2 = w.epoch("a2");
    let a2 = match join("a2", "a", 10) {
        Command::Join(s) => s,
        _ => unreachable!(),
    };
    assert!(w.state.resumable(&a2, e2));
    w.apply(Command::MarkSilent { members: vec![(mid("a2"), e2)] });
    assert!(!w.state.resumable(&a2, e2), "silent");
    w.apply(Command::Expire { members: vec![(mid("a2"), e2)] });
    assert!(!w.state.resumable(&a2, e2), "expired");
}

#[test]
fn expire_of_an_old_epoch_does_not_end_a_new_lease() {
    let mut w = World::new();
    w.apply(join("a1", "a", 10));
    let old = w.epoch("a1");
    w.apply(join("a1", "a", 10));
    assert!(w.epoch("a1") > old);
    w.apply(Command::Expire { members: vec![(mid("a1"), old)] });
    assert_eq!(w.state.members[&mid("a1")].status, MemberStatus::Live);
}

#[test]
fn stall_release_puts_the_cluster_in_cooldown() {
    let mut w = World::new();
    w.apply(join("a1", "a", 10));
    w.apply(join("b1", "b", 10));
    let t = w.grant("a1");
    w.apply(Command::Release {
        member: mid("a1"),
        group: gk(),
        token: t,
        deleted: vec![],
        reason: ReleaseReason::Stall,
    });
    let ts = w.state.last_ts_ms;
    assert!(w.state.eligible(&gk(), &mid("a1"), ts).is_err());
    assert_eq!(w.state.choose_holder(&gk(), ts, &|_| true), Some(mid("b1")));
    assert!(w.state.eligible(&gk(), &mid("a1"), ts + STALL_COOLDOWN_MS).is_ok());
}

#[test]
fn handover_then_release_grants_the_target() {
    let mut w = World::new();
    w.apply(join("a1", "a", 10));
    w.apply(join("b1", "b", 10));
    w.apply(join("c1", "c", 10));
    let t = w.grant("a1");
    assert_eq!(
        w.apply(Command::RequestHandover { group: gk(), to: Some(mid("c1")), deadline_ms: 10_000 }).outcome,
        Outcome::Done
    );
    assert_eq!(w.group().handover.as_ref().map(|h| h.token), Some(t));
    w.apply(Command::Release {
        member: mid("a1"),
        group: gk(),
        token: t,
        deleted: vec![],
        reason: ReleaseReason::Handover,
    });
    let h = w.group().holder.clone();
    assert_eq!(h, None);
    // The handover target comes first, ahead of b by cluster name.
    assert_eq!(w.state.choose_holder(&gk(), 0, &|_| true), Some(mid("c1")));
    let t2 = w.grant("c1");
    assert!(t2 > t);
}

#[test]
fn handover_to_an_ineligible_member_is_refused() {
    let mut w = World::new();
    w.apply(join("a1", "a", 10));
    w.apply(join("b1", "b", 10));
    w.grant("a1");
    w.apply(Command::Drain { member: mid("b1"), handover_deadline_ms: 1 });
    let o = w.apply(Command::RequestHandover { group: gk(), to: Some(mid("b1")), deadline_ms: 10_000 }).outcome;
    assert!(matches!(o, Outcome::Rejected { reason: RejectReason::NotEligible, .. }), "{o:?}");
    assert!(w.group().handover.is_none());
}

#[test]
fn drain_zeroes_the_member_and_starts_a_handover() {
    let mut w = World::new();
    w.apply(join("a1", "a", 10));
    w.apply(join("b1", "b", 10));
    w.grant("a1");
    w.apply(Command::Drain { member: mid("a1"), handover_deadline_ms: 10_000 });
    assert!(!w.group().assignments.contains_key(&mid("a1")));
    assert!(w.group().handover.is_some());
    assert_eq!(w.state.max_capacity(&gk()), 10);
}

#[test]
fn adopt_takes_a_holderless_group_and_conflicts_otherwise() {
    let mut w = World::new();
    w.apply(join("a1", "a", 10));
    w.apply(join("b1", "b", 10));
    let o = w.apply(Command::Adopt {
        member: mid("a1"),
        group: gk(),
        session_id: "fallback".into(),
        statistics: Statistics::default(),
    });
    assert!(matches!(o.outcome, Outcome::Granted { .. }));
    assert_eq!(w.group().session_id.as_deref(), Some("fallback"));
    let o = w.apply(Command::Adopt {
        member: mid("b1"),
        group: gk(),
        session_id: "other".into(),
        statistics: Statistics::default(),
    });
    assert!(matches!(o.outcome, Outcome::Rejected { reason: RejectReason::Conflict, .. }));
    assert!(w.group().stale_sessions.contains("other"));
}

fn adopt(m: &str, session: &str) -> Command {
    Command::Adopt { member: mid(m), group: gk(), session_id: session.into(), statistics: Statistics::default() }
}

/// Issue 8, item 3: an Adopt obeys the eligibility a Grant does. Each case makes the only
/// member ineligible in one way; its Adopt is refused and its session is left for the next
/// holder to delete.
#[test]
fn adopt_obeys_grant_eligibility() {
    type Spoil = fn(&mut World);
    let cases: Vec<(&str, Spoil)> = vec![
        ("standby", |w| {
            w.apply(join("a2", "a", 10));
        }),
        ("draining", |w| {
            w.apply(Command::Drain { member: mid("a1"), handover_deadline_ms: 1 });
        }),
        ("not github_ready", |w| {
            w.apply(Command::SetReady { member: mid("a1"), ready: false });
        }),
        ("allow-list", |w| {
            w.state.groups.get_mut(&gk()).expect("group").allow_clusters = Some(["z".to_string()].into());
        }),
        ("cooldown", |w| {
            let t = w.grant("a1");
            w.apply(Command::Release {
                member: mid("a1"),
                group: gk(),
                token: t,
                deleted: vec![],
                reason: ReleaseReason::Stall,
            });
        }),
    ];
    for (why, spoil) in cases {
        let mut w = World::new();
        w.apply(join("a1", "a", 10));
        spoil(&mut w);
        assert!(w.group().holder.is_none(), "{why}: the group must be holderless");
        let token_before = w.group().token;
        let o = w.apply(adopt("a1", "fallback-a")).outcome;
        assert!(matches!(o, Outcome::Rejected { reason: RejectReason::NotEligible, .. }), "{why}: {o:?}");
        assert!(w.group().holder.is_none(), "{why}");
        assert_eq!(w.group().token, token_before, "{why}");
        assert!(w.group().stale_sessions.contains("fallback-a"), "{why}: the refused session must be deleted later");
        // The same member, eligible, adopts: the control for each case.
        let mut ok = World::new();
        ok.apply(join("a1", "a", 10));
        assert!(matches!(ok.apply(adopt("a1", "fallback-a")).outcome, Outcome::Granted { .. }), "{why}");
    }
}

/// The agent forgets its session when its Adopt loses the race; the current holder must be
/// told to delete it (DeleteSessions with the holder's token), even when the adopter itself
/// would not be eligible.
#[test]
fn a_lost_adopt_race_reaches_the_holder_as_delete_sessions() {
    for adopter_ready in [true, false] {
        let mut w = World::new();
        w.apply(join("a1", "a", 10));
        w.apply(join("b1", "b", 10));
        if !adopter_ready {
            w.apply(Command::SetReady { member: mid("b1"), ready: false });
        }
        let t = w.grant("a1");
        let out = w.apply(adopt("b1", "fallback-b"));
        assert!(matches!(out.outcome, Outcome::Rejected { reason: RejectReason::Conflict, .. }), "{out:?}");
        assert_eq!(
            out.effects,
            vec![Effect::DeleteSessions { group: gk(), token: t, session_ids: vec!["fallback-b".into()] }]
        );
        assert_eq!(w.group().holder, Some(mid("a1")));
        assert!(w.group().stale_sessions.contains("fallback-b"));
    }
}

/// Issue 8, item 4: who owns a member id is decided by `apply`, in log order, so two
/// Joins for one id from two clusters cannot both pass a read made before proposing.
#[test]
fn a_member_id_belongs_to_the_cluster_that_joined_it_first() {
    let mut w = World::new();
    let mut impostor = join("a1", "b", 10);
    if let Command::Join(spec) = &mut impostor {
        spec.ers_name = "set-b".into();
    }
    // Both Joins were proposed before either was applied: the first in the log wins.
    assert!(matches!(w.apply(join("a1", "a", 10)).outcome, Outcome::Joined { .. }));
    match w.apply(impostor.clone()).outcome {
        Outcome::Rejected { reason: RejectReason::WrongCluster, detail } => {
            assert!(detail.contains("member of cluster a"), "{detail}")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(w.state.members[&mid("a1")].cluster, "a");
    // Still refused after the member expired (it is remembered until collected).
    let e = w.epoch("a1");
    w.apply(Command::Expire { members: vec![(mid("a1"), e)] });
    assert!(matches!(w.apply(impostor).outcome, Outcome::Rejected { reason: RejectReason::WrongCluster, .. }));
    // The owner itself joins again.
    assert!(matches!(w.apply(join("a1", "a", 10)).outcome, Outcome::Joined { .. }));
}

#[test]
fn join_validation_names_the_protobuf_field() {
    let base = match join("a1", "a", 10) {
        Command::Join(spec) => spec,
        _ => unreachable!("join builds a Join"),
    };
    assert_eq!(base.validate(), Ok(()));
    type Spoil = fn(&mut JoinSpec);
    let cases: Vec<(Spoil, &str)> = vec![
        (|s| s.cluster = String::new(), "join.cluster"),
        (|s| s.ers_namespace = "a/b".into(), "join.ers_namespace"),
        (|s| s.ers_name = "x".repeat(254), "join.ers_name"),
        (|s| s.weight = -1, "join.weight"),
        (|s| s.min_runners = -1, "join.min_runners"),
        (|s| s.max_runners = -1, "join.max_runners"),
    ];
    for (spoil, field) in cases {
        let mut spec = base.clone();
        spoil(&mut spec);
        let err = spec.validate().expect_err(field);
        assert_eq!(err.field, field);
        assert!(err.to_string().starts_with(field), "{err}");
        // apply refuses the same input (it stays total even if a bad Join reached the log).
        let mut w = World::new();
        assert!(matches!(
            w.apply(Command::Join(spec)).outcome,
            Outcome::Rejected { reason: RejectReason::InvalidInput, .. }
        ));
    }
}

#[test]
fn bad_join_input_is_rejected_with_the_field_name() {
    let mut w = World::new();
    let mut j = join("a1", "a", 10);
    if let Command::Join(spec) = &mut j {
        spec.min_runners = 5;
        spec.max_runners = 1;
    }
    match w.apply(j).outcome {
        Outcome::Rejected { reason: RejectReason::InvalidInput, detail } => assert!(detail.contains("min_runners")),
        other => panic!("unexpected {other:?}"),
    }
    assert!(w.state.members.is_empty());
}

#[test]
fn expired_members_are_collected_after_retention() {
    let mut w = World::new();
    w.apply(join("a1", "a", 10));
    let e = w.epoch("a1");
    w.apply(Command::Expire { members: vec![(mid("a1"), e)] });
    assert!(w.state.members.contains_key(&mid("a1")));
    w.index += 1;
    w.state.apply(w.index, &Request { ts_ms: MEMBER_RETENTION_MS * 2, cmd: join("b1", "b", 1) });
    assert!(!w.state.members.contains_key(&mid("a1")));
}

// ---- property tests over random command sequences ----

fn arb_member() -> impl Strategy<Value = MemberId> {
    prop_oneof![Just(mid("m1")), Just(mid("m2")), Just(mid("m3")), Just(mid("m4"))]
}

fn arb_cmd() -> impl Strategy<Value = Command> {
    let cluster = prop_oneof![Just("a"), Just("b"), Just("c")];
    let stats = (prop_oneof![Just(-3i64), 0i64..50, Just(i64::MAX)], 0i64..5).prop_map(|(a, r)| Statistics {
        total_assigned_jobs: a,
        total_running_jobs: r,
        ..Statistics::default()
    });
    let event =
        (any::<bool>(), prop_oneof![Just("set-a-runner-1"), Just("set-b-runner-2"), Just("zzz")]).prop_map(|(s, r)| {
            JobEvent {
                kind: if s { JobEventKind::Started } else { JobEventKind::Completed },
                runner_name: r.into(),
                runner_id: 1,
                job_id: "j".into(),
                runner_request_id: 0,
                repository_name: String::new(),
                owner_name: String::new(),
                job_workflow_ref: String::new(),
                job_display_name: String::new(),
                workflow_run_id: 0,
                result: String::new(),
            }
        });
    prop_oneof![
        (arb_member(), cluster, prop_oneof![Just(-1i64), 0i64..20, Just(i64::from(i32::MAX))], 0i64..3, any::<bool>())
            .prop_map(|(m, c, max, min, ready)| Command::Join(JoinSpec {
                member: m,
                cluster: c.into(),
                group: gk(),
                ers_namespace: "ns".into(),
                ers_name: format!("set-{c}"),
                weight: 1,
                min_runners: min,
                max_runners: max,
                priority: 0,
                github_ready: ready,
                policy: SplitPolicy::Spread,
            })),
        arb_member().prop_map(|m| Command::Leave { member: m }),
        (arb_member(), 0u64..40).prop_map(|(m, e)| Command::Expire { members: vec![(m, e)] }),
        (arb_member(), 0u64..40).prop_map(|(m, e)| Command::MarkSilent { members: vec![(m, e)] }),
        arb_member().prop_map(|m| Command::Grant { group: gk(), member: m }),
        (0u64..40).prop_map(|t| Command::Revoke { group: gk(), token: t }),
        (
            arb_member(),
            0u64..40,
            proptest::option::of(-2i64..30),
            stats.clone(),
            proptest::collection::vec(event, 0..3)
        )
            .prop_map(|(m, t, mid_, s, ev)| Command::Progress {
                member: m,
                group: gk(),
                token: t,
                message_id: mid_,
                statistics: s,
                events: ev
            }),
        (arb_member(), 0u64..40, "[a-c]{0,2}", stats.clone()).prop_map(|(m, t, s, st)| Command::SessionOpened {
            member: m,
            group: gk(),
            token: t,
            session_id: s,
            statistics: st
        }),
        (arb_member(), 0u64..40, any::<bool>()).prop_map(|(m, t, stall)| Command::Release {
            member: m,
            group: gk(),
            token: t,
            deleted: vec!["a".into()],
            reason: if stall { ReleaseReason::Stall } else { ReleaseReason::Shutdown }
        }),
        (arb_member(), "[a-c]{0,2}").prop_map(|(m, s)| Command::Adopt {
            member: m,
            group: gk(),
            session_id: s,
            statistics: Statistics::default()
        }),
        (proptest::option::of(arb_member()), -5i64..20_000).prop_map(|(to, d)| Command::RequestHandover {
            group: gk(),
            to,
            deadline_ms: d
        }),
        arb_member().prop_map(|m| Command::Drain { member: m, handover_deadline_ms: 100 }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Never panics; invariant 2 (tokens never decrease); invariant 4 (Σ assignments ≤ Σ max
    /// of live members, each ≤ max_i); a holder is always a member of its group; the current
    /// session is never also in the stale set.
    #[test]
    fn random_commands_keep_the_invariants(cmds in proptest::collection::vec(arb_cmd(), 1..80),
                                           ts in proptest::collection::vec(-100i64..1_000_000, 80)) {
        let mut state = State::default();
        let mut last_token = 0u64;
        let mut last_ts = i64::MIN;
        for (i, cmd) in cmds.into_iter().enumerate() {
            let index = i as u64 + 1;
            let _ = state.apply(index, &Request { ts_ms: ts[i % ts.len()], cmd });
            prop_assert!(state.last_ts_ms >= last_ts, "timestamps are clamped");
            last_ts = state.last_ts_ms;
            if let Some(g) = state.groups.get(&gk()) {
                prop_assert!(g.token >= last_token, "token went back from {} to {}", last_token, g.token);
                last_token = g.token;
                let live_max: i64 = state.members.values()
                    .filter(|m| m.group == gk() && m.status.has_lease())
                    .map(|m| m.max_runners.max(0)).fold(0i64, |a, b| a.saturating_add(b));
                let sum: i64 = g.assignments.values().fold(0i64, |a, b| a.saturating_add(*b));
                prop_assert!(sum <= live_max, "Σ assignments {} > Σ max {}", sum, live_max);
                for (m, a) in &g.assignments {
                    let mm = &state.members[m];
                    prop_assert!(*a <= mm.max_runners && *a >= 0);
                    prop_assert!(mm.status.has_lease() && !mm.draining && !mm.standby);
                }
                if let Some(h) = &g.holder {
                    prop_assert!(state.members.get(h).is_some_and(|m| m.group == gk()));
                }
                if let Some(s) = &g.session_id {
                    prop_assert!(!g.stale_sessions.contains(s));
                }
                prop_assert!(state.max_capacity(&gk()) <= MAX_CAPACITY);
                // The kept sum is what summing the group's counting members gives.
                let counted = state.members.values()
                    .filter(|m| m.group == gk() && m.status.has_lease() && !m.draining && !m.standby)
                    .map(|m| m.max_runners.max(0)).fold(0i64, |a, b| a.saturating_add(b));
                prop_assert_eq!(state.max_capacity(&gk()), counted.min(MAX_CAPACITY));
            }
        }
    }

    /// Replaying the same log gives the same state (every voter converges).
    #[test]
    fn apply_is_deterministic(cmds in proptest::collection::vec(arb_cmd(), 1..40)) {
        let mut a = State::default();
        let mut b = State::default();
        for (i, cmd) in cmds.iter().enumerate() {
            let r = Request { ts_ms: i as i64, cmd: cmd.clone() };
            prop_assert_eq!(a.apply(i as u64 + 1, &r), b.apply(i as u64 + 1, &r));
        }
        prop_assert_eq!(a, b);
    }
}

// ---- garbage (issue 8 item 6): removed through the log, judged on the entry's timestamp ----

const POLICY: GcPolicy = GcPolicy { group_gc_after_ms: 60 * 60 * 1000, stale_session_ttl_ms: 10 * 60 * 1000 };

impl World {
    /// Applies `cmd` at leader time `ts_ms` (the next log index).
    fn apply_at(&mut self, ts_ms: i64, cmd: Command) -> Applied {
        self.index += 1;
        self.state.apply(self.index, &Request { ts_ms, cmd })
    }
}

fn job(kind: JobEventKind, runner: &str) -> JobEvent {
    JobEvent {
        kind,
        runner_name: runner.into(),
        runner_id: 1,
        job_id: format!("job-of-{runner}"),
        runner_request_id: 0,
        repository_name: String::new(),
        owner_name: String::new(),
        job_workflow_ref: String::new(),
        job_display_name: String::new(),
        workflow_run_id: 0,
        result: String::new(),
    }
}

#[test]
fn stale_sessions_older_than_the_session_ttl_are_collected_and_the_current_one_stays() {
    let mut w = World::new();
    w.apply_at(1_000, join("a1", "a", 10));
    let t = w.apply_at(1_000, Command::Grant { group: gk(), member: mid("a1") });
    let Outcome::Granted { token } = t.outcome else { panic!("{t:?}") };
    let open = |id: &str| Command::SessionOpened {
        member: mid("a1"),
        group: gk(),
        token,
        session_id: id.into(),
        statistics: Statistics::default(),
    };
    w.apply_at(2_000, open("s-old"));
    // Replacing the session stamps "s-old" stale at 3 000.
    w.apply_at(3_000, open("s-new"));
    assert_eq!(w.group().stale_since_ms.get("s-old"), Some(&3_000));
    // Younger than the TTL: nothing to collect, and a Collect changes nothing.
    let young = 3_000 + POLICY.stale_session_ttl_ms - 1;
    assert!(w.state.garbage(young, &POLICY).is_empty());
    let before = w.state.groups.clone();
    w.apply_at(young, Command::Collect(POLICY));
    assert_eq!(w.state.groups[&gk()].stale_sessions, before[&gk()].stale_sessions);
    // Old enough: the stale id goes, the holder, token and current session stay.
    let old = 3_000 + POLICY.stale_session_ttl_ms;
    let g = w.state.garbage(old, &POLICY);
    assert_eq!(g.stale_sessions, vec![(gk(), "s-old".to_string())]);
    w.apply_at(old, Command::Collect(POLICY));
    assert!(w.group().stale_sessions.is_empty() && w.group().stale_since_ms.is_empty());
    assert_eq!(w.group().holder, Some(mid("a1")));
    assert_eq!(w.group().token, token);
    assert_eq!(w.group().session_id.as_deref(), Some("s-new"));
    assert_eq!(w.state.counters.collected, 1);
}

#[test]
fn collect_judges_the_entry_timestamp_not_a_clock() {
    // The same log applied twice gives the same result, and a Collect whose timestamp lies
    // before the clamped time is judged at the clamped time.
    let run = || {
        let mut w = World::new();
        w.apply_at(5_000, join("a1", "a", 10));
        w.apply_at(5_000, Command::Grant { group: gk(), member: mid("a1") });
        w.apply_at(6_000, Command::Leave { member: mid("a1") });
        w.apply_at(6_000 + MEMBER_RETENTION_MS + POLICY.group_gc_after_ms, Command::Leave { member: mid("zz") });
        // ts 0 is clamped up to the previous entry's time, which is past both thresholds.
        w.apply_at(0, Command::Collect(POLICY));
        w.state
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b);
    assert!(a.groups.is_empty(), "{:?}", a.groups);
}

#[test]
fn a_vacant_group_is_removed_only_after_its_members_are_gone_and_gc_after_passed() {
    let mut w = World::new();
    w.apply_at(1_000, join("a1", "a", 10));
    w.apply_at(1_000, Command::Grant { group: gk(), member: mid("a1") });
    // A group with a leased member is never collected, however old.
    assert!(w.state.garbage(i64::MAX / 2, &POLICY).groups.is_empty());
    let e = w.epoch("a1");
    w.apply_at(2_000, Command::Expire { members: vec![(mid("a1"), e)] });
    assert_eq!(w.group().vacant_since_ms, Some(2_000));
    assert_eq!(w.group().holder, None);
    // The expired member's record is still kept for status: the group stays, even with a
    // gc-after shorter than the retention.
    let short = GcPolicy { group_gc_after_ms: 0, ..POLICY };
    assert!(w.state.garbage(2_000 + MEMBER_RETENTION_MS - 1, &short).groups.is_empty());
    assert_eq!(w.state.garbage(2_000 + MEMBER_RETENTION_MS, &short).groups, vec![gk()]);
    let gone = 2_000 + POLICY.group_gc_after_ms.max(MEMBER_RETENTION_MS);
    w.apply_at(gone - 1, Command::Collect(POLICY));
    assert!(w.state.groups.contains_key(&gk()), "collected before gc-after");
    w.apply_at(gone, Command::Collect(POLICY));
    assert!(!w.state.groups.contains_key(&gk()));
    assert!(w.state.members.is_empty());
}

#[test]
fn a_join_resets_the_vacancy_clock() {
    let mut w = World::new();
    w.apply_at(1_000, join("a1", "a", 10));
    w.apply_at(2_000, Command::Leave { member: mid("a1") });
    assert_eq!(w.group().vacant_since_ms, Some(2_000));
    w.apply_at(3_000, join("b1", "b", 10));
    assert_eq!(w.group().vacant_since_ms, None);
    w.apply_at(4_000, Command::Leave { member: mid("b1") });
    assert_eq!(w.group().vacant_since_ms, Some(4_000));
    // Judged from 4 000, not from the first vacancy.
    let at = 4_000 + POLICY.group_gc_after_ms.max(MEMBER_RETENTION_MS) - 1;
    w.apply_at(at, Command::Collect(POLICY));
    assert!(w.state.groups.contains_key(&gk()));
}

#[test]
fn busy_runners_of_departed_members_are_collected_once_their_record_is_gone() {
    let mut w = World::new();
    w.apply_at(1_000, join("a1", "a", 10));
    w.apply_at(1_000, join("b1", "b", 10));
    let Outcome::Granted { token } = w.apply_at(1_000, Command::Grant { group: gk(), member: mid("a1") }).outcome
    else {
        panic!("grant")
    };
    w.apply_at(
        1_500,
        Command::Progress {
            member: mid("a1"),
            group: gk(),
            token,
            message_id: Some(1),
            statistics: Statistics { total_assigned_jobs: 2, ..Statistics::default() },
            events: vec![job(JobEventKind::Started, "set-a-r1"), job(JobEventKind::Started, "set-b-r2")],
        },
    );
    assert_eq!(w.state.busy_of(&mid("b1")), 1);
    w.apply_at(2_000, Command::Leave { member: mid("b1") });
    // Within retention a restarted b (new member id, same ERS) would own it again: kept.
    assert!(w.state.garbage(2_000 + MEMBER_RETENTION_MS - 1, &POLICY).busy_runners.is_empty());
    let at = 2_000 + MEMBER_RETENTION_MS;
    assert_eq!(w.state.garbage(at, &POLICY).busy_runners, vec![(gk(), "set-b-r2".to_string())]);
    let rev = w.group().revision;
    w.apply_at(at, Command::Collect(POLICY));
    let runners: Vec<&String> = w.group().busy_runners.keys().collect();
    assert_eq!(runners, vec!["set-a-r1"], "the live member's runner stays");
    assert!(w.group().revision > rev, "the split is recomputed");
    assert_eq!(w.group().holder, Some(mid("a1")));
    assert_eq!(w.group().token, token);
}

#[test]
fn entries_from_before_stamps_are_stamped_by_the_first_collect() {
    let mut w = World::new();
    w.apply_at(1_000, join("a1", "a", 10));
    let g = w.state.groups.get_mut(&gk()).expect("group");
    g.stale_sessions.insert("legacy".into());
    let g = w.state.garbage(5_000, &POLICY);
    assert_eq!(g.unstamped, 1);
    assert!(g.stale_sessions.is_empty(), "an unstamped id is not guessed old");
    w.apply_at(5_000, Command::Collect(POLICY));
    assert_eq!(w.group().stale_since_ms.get("legacy"), Some(&5_000));
    assert!(w.state.garbage(5_000, &POLICY).is_empty());
}

fn arb_policy() -> impl Strategy<Value = GcPolicy> {
    (prop_oneof![Just(0i64), 0i64..2_000_000], prop_oneof![Just(0i64), 0i64..2_000_000])
        .prop_map(|(g, s)| GcPolicy { group_gc_after_ms: g, stale_session_ttl_ms: s })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Collect never removes a group with a member record, never touches a holder, a token or
    /// the current session id, and tokens never decrease: a group's token only grows while it
    /// exists, and a recreated group's first token exceeds every earlier one.
    #[test]
    fn collect_keeps_holders_sessions_and_tokens(
        steps in proptest::collection::vec(
            (prop_oneof![3 => arb_cmd().prop_map(Some), 1 => Just(None)], 0i64..400_000, arb_policy()),
            1..80,
        ),
    ) {
        let mut state = State::default();
        let mut ts = 0i64;
        let mut max_token = 0u64;
        for (i, (cmd, step, policy)) in steps.into_iter().enumerate() {
            let index = i as u64 + 1;
            ts = ts.saturating_add(step);
            let Some(cmd) = cmd else {
                let before = state.clone();
                let _ = state.apply(index, &Request { ts_ms: ts, cmd: Command::Collect(policy) });
                for (key, g) in &before.groups {
                    let has_members = before.members.values().any(|m| &m.group == key && m.status.has_lease());
                    match state.groups.get(key) {
                        None => {
                            prop_assert!(!has_members, "a group with a leased member was removed");
                            prop_assert!(g.holder.is_none(), "a held group was removed");
                            prop_assert!(!state.members.values().any(|m| &m.group == key),
                                "a group whose member records remain was removed");
                        }
                        Some(after) => {
                            prop_assert_eq!(&after.holder, &g.holder);
                            prop_assert_eq!(after.token, g.token);
                            prop_assert_eq!(&after.session_id, &g.session_id);
                            prop_assert!(after.stale_sessions.is_subset(&g.stale_sessions));
                        }
                    }
                }
                for (id, m) in &before.members {
                    if m.status.has_lease() {
                        prop_assert_eq!(state.members.get(id), Some(m), "a leased member was touched");
                    }
                }
                continue;
            };
            let _ = state.apply(index, &Request { ts_ms: ts, cmd });
            for g in state.groups.values() {
                prop_assert!(g.token == 0 || g.token >= max_token,
                    "token {} is below an earlier token {}", g.token, max_token);
                max_token = max_token.max(g.token);
                if let Some(s) = &g.session_id {
                    prop_assert!(!g.stale_sessions.contains(s));
                }
                prop_assert!(g.stale_sessions.iter().all(|id| g.stale_since_ms.contains_key(id)),
                    "every stale id is stamped");
            }
        }
    }

    /// The leader's preview and apply agree: after a Collect at the same time with the same
    /// policy, nothing of what the preview named is left.
    #[test]
    fn garbage_preview_matches_what_collect_removes(
        cmds in proptest::collection::vec(arb_cmd(), 1..60),
        gap in 0i64..3_000_000,
        policy in arb_policy(),
    ) {
        let mut state = State::default();
        for (i, cmd) in cmds.into_iter().enumerate() {
            let _ = state.apply(i as u64 + 1, &Request { ts_ms: i as i64 * 1_000, cmd });
        }
        let at = state.last_ts_ms.saturating_add(gap);
        let g = state.garbage(at, &policy);
        let _ = state.apply(1_000, &Request { ts_ms: at, cmd: Command::Collect(policy) });
        for key in &g.groups {
            prop_assert!(!state.groups.contains_key(key));
        }
        for (key, r) in &g.busy_runners {
            prop_assert!(!state.groups.get(key).is_some_and(|x| x.busy_runners.contains_key(r)));
        }
        for (key, id) in &g.stale_sessions {
            prop_assert!(!state.groups.get(key).is_some_and(|x| x.stale_sessions.contains(id)));
        }
        // What is left is not garbage at the same time any more (stamps included).
        prop_assert!(state.garbage(at, &policy).is_empty(), "{:?}", state.garbage(at, &policy));
    }
}

// ---- derived indexes (issue 8, Scale): kept by apply, equal to a recomputation ----

fn gk_n(n: i64) -> GroupKey {
    GroupKey::new("https://GitHub.example/Org/", n).expect("valid key")
}

/// `arb_cmd` spread over three groups (the member ids stay shared, so Joins into a second
/// group are refused until the first record is collected).
fn arb_multi_cmd() -> impl Strategy<Value = Command> {
    (arb_cmd(), 1i64..=3, arb_policy(), 0u8..10).prop_map(|(mut cmd, n, policy, collect)| {
        if collect == 0 {
            return Command::Collect(policy);
        }
        let key = gk_n(n);
        match &mut cmd {
            Command::Join(spec) => spec.group = key,
            Command::Grant { group, .. }
            | Command::Revoke { group, .. }
            | Command::Progress { group, .. }
            | Command::SessionOpened { group, .. }
            | Command::Release { group, .. }
            | Command::Adopt { group, .. }
            | Command::RequestHandover { group, .. } => *group = key,
            _ => {}
        }
        cmd
    })
}

/// Groups whose record, or a member record of theirs, differs between two states.
fn changed_groups(before: &State, after: &State) -> std::collections::BTreeSet<GroupKey> {
    let mut out = std::collections::BTreeSet::new();
    for key in before.groups.keys().chain(after.groups.keys()) {
        if before.groups.get(key) != after.groups.get(key) {
            out.insert(key.clone());
        }
    }
    for id in before.members.keys().chain(after.members.keys()) {
        let (b, a) = (before.members.get(id), after.members.get(id));
        if b != a {
            out.extend(b.map(|m| m.group.clone()));
            out.extend(a.map(|m| m.group.clone()));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// After every entry the indexes `apply` keeps equal a from-scratch recomputation; every
    /// group whose data changed is reported by `groups_changed_since`; and a snapshot
    /// round-trip (serde, as install and restore do it) rebuilds equal indexes, after which
    /// both copies stay equal under the same entries.
    #[test]
    fn indexes_equal_a_recomputation_and_survive_a_snapshot(
        steps in proptest::collection::vec((arb_multi_cmd(), 0i64..400_000), 1..80),
        cut in 0usize..80,
    ) {
        let mut state = State::default();
        let mut restored: Option<State> = None;
        let mut ts = 0i64;
        for (i, (cmd, step)) in steps.into_iter().enumerate() {
            let index = i as u64 + 1;
            ts = ts.saturating_add(step);
            let req = Request { ts_ms: ts, cmd };
            let before = state.clone();
            let a = state.apply(index, &req);
            prop_assert_eq!(state.indexes(), &Indexes::compute(&state.groups, &state.members), "after {:?}", req.cmd);
            let reported: std::collections::BTreeSet<GroupKey> =
                state.groups_changed_since(index - 1).expect("the log reaches back one entry").into_iter().collect();
            let changed = changed_groups(&before, &state);
            prop_assert!(changed.is_subset(&reported), "changed {:?}, reported {:?}", changed, reported);
            if let Some(r) = restored.as_mut() {
                prop_assert_eq!(r.apply(index, &req), a);
                prop_assert_eq!(&*r, &state);
                prop_assert_eq!(r.indexes(), state.indexes());
            }
            if i == cut {
                let json = serde_json::to_vec(&state).expect("serialize");
                let r: State = serde_json::from_slice(&json).expect("deserialize");
                prop_assert_eq!(&r, &state);
                prop_assert_eq!(r.indexes(), state.indexes());
                prop_assert!(r.groups_changed_since(index - 1).is_none(), "a restored state knows no earlier change");
                restored = Some(r);
            }
        }
    }
}

#[test]
fn choose_holder_prefers_the_cluster_holding_fewer_groups() {
    let mut w = World::new();
    let spec = |m: &str, c: &str, g: i64| {
        Command::Join(JoinSpec {
            member: mid(m),
            cluster: c.into(),
            group: gk_n(g),
            ers_namespace: "ns".into(),
            ers_name: format!("set-{c}"),
            weight: 1,
            min_runners: 0,
            max_runners: 5,
            priority: 0,
            github_ready: true,
            policy: SplitPolicy::Spread,
        })
    };
    // Cluster a holds groups 1 and 2; b holds nothing; group 3 is holderless.
    for (m, c, g) in [("a1", "a", 1), ("a2", "a", 2), ("a3", "a", 3), ("b3", "b", 3)] {
        w.apply(spec(m, c, g));
    }
    for (g, m) in [(1, "a1"), (2, "a2")] {
        assert!(matches!(w.apply(Command::Grant { group: gk_n(g), member: mid(m) }).outcome, Outcome::Granted { .. }));
    }
    assert_eq!(w.state.holderless_groups().cloned().collect::<Vec<_>>(), vec![gk_n(3)]);
    assert_eq!(w.state.choose_holder(&gk_n(3), 0, &|_| true), Some(mid("b3")));
    assert_eq!(
        w.state.holdings_of(&mid("a1")).map(|(k, t)| (k.clone(), t)).collect::<Vec<_>>(),
        vec![(gk_n(1), w.state.groups[&gk_n(1)].token)]
    );
}

// ---- batched entries: the proposer packs concurrent commands into one log entry ----

#[test]
fn a_batch_applies_its_commands_in_order_at_one_index() {
    let mut w = World::new();
    let a = w.apply(Command::Batch(vec![
        join("a1", "a", 10),
        join("b1", "b", 10),
        Command::Grant { group: gk(), member: mid("a1") },
        Command::Grant { group: gk(), member: mid("b1") },
        Command::Batch(vec![]),
    ]));
    let Outcome::Batch(all) = a.outcome else { panic!("a batch answers a batch: {:?}", a.outcome) };
    let outcomes: Vec<Outcome> = all.into_iter().map(|x| x.outcome).collect();
    assert_eq!(outcomes[0], Outcome::Joined { epoch: 1 });
    assert_eq!(outcomes[1], Outcome::Joined { epoch: 1 }, "members joined in one entry share its index as epoch");
    assert_eq!(outcomes[2], Outcome::Granted { token: 1 }, "the token is the entry's index");
    assert!(
        matches!(&outcomes[3], Outcome::Rejected { reason: RejectReason::Conflict, .. }),
        "one holder, even inside one entry"
    );
    assert!(matches!(&outcomes[4], Outcome::Rejected { reason: RejectReason::InvalidInput, .. }), "no nesting");
    assert_eq!(w.group().holder, Some(mid("a1")));
    // The next entry's Grant token is above it (tokens grow per group).
    w.apply(Command::Expire { members: vec![(mid("a1"), 1)] });
    assert!(w.grant("b1") > 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// A batch gives the same state, outcomes and effects as its commands applied one after
    /// another at the same index, and the indexes `apply` keeps stay equal to a recomputation.
    #[test]
    fn a_batch_equals_its_commands_one_by_one(
        prefix in proptest::collection::vec(arb_multi_cmd(), 0..30),
        batch in proptest::collection::vec(arb_multi_cmd(), 1..12),
    ) {
        let mut one = State::default();
        for (i, cmd) in prefix.into_iter().enumerate() {
            let _ = one.apply(i as u64 + 1, &Request { ts_ms: i as i64 * 100, cmd });
        }
        let mut packed = one.clone();
        let index = one.last_index + 1;
        let ts = 1_000_000;
        let mut outcomes = Vec::new();
        let mut effects = Vec::new();
        for cmd in &batch {
            let a = one.apply(index, &Request { ts_ms: ts, cmd: cmd.clone() });
            effects.extend(a.effects.clone());
            outcomes.push(a);
        }
        let a = packed.apply(index, &Request { ts_ms: ts, cmd: Command::Batch(batch) });
        prop_assert_eq!(&a.outcome, &Outcome::Batch(outcomes));
        prop_assert_eq!(&a.effects, &effects);
        prop_assert_eq!(&packed.groups, &one.groups);
        prop_assert_eq!(&packed.members, &one.members);
        prop_assert_eq!(packed.indexes(), &Indexes::compute(&packed.groups, &packed.members));
    }
}

/// Issue 22, item 4: the operators' policy decides which clusters join which groups, with
/// which bounds, in `apply` (so every voter decides alike); an invalid policy never installs.
#[test]
fn the_policy_decides_who_joins_in_apply() {
    use crate::policy::{Policy, Rule, Unmatched};
    let mut w = World::new();
    let policy = Policy {
        rules: vec![Rule {
            groups: "https://github.example/Org#*".into(),
            clusters: ["a".into(), "b".into()].into(),
            priority_max: Some(5),
            members_per_cluster: Some(1),
            ..Rule::default()
        }],
        unmatched: Unmatched::Deny,
    };
    assert!(matches!(w.apply(Command::SetPolicy(policy.clone())).outcome, Outcome::Done));
    assert_eq!(w.state.policy, policy);
    assert!(matches!(w.apply(join("a1", "a", 10)).outcome, Outcome::Joined { .. }));
    // A cluster the rule does not list.
    match w.apply(join("c1", "c", 10)).outcome {
        Outcome::Rejected { reason: RejectReason::Policy, detail } => assert!(detail.contains("cluster c"), "{detail}"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(!w.state.members.contains_key(&mid("c1")), "a refused Join leaves no member");
    // A priority above the bound.
    let mut greedy = join("b1", "b", 10);
    if let Command::Join(s) = &mut greedy {
        s.priority = 9;
    }
    assert!(matches!(w.apply(greedy).outcome, Outcome::Rejected { reason: RejectReason::Policy, .. }));
    // A second runner set of cluster a (another ERS name) exceeds the quota; a restarted
    // agent for the same ERS (new member id) does not.
    let mut squat = join("a2", "a", 10);
    if let Command::Join(s) = &mut squat {
        s.ers_name = "squat".into();
    }
    assert!(matches!(w.apply(squat).outcome, Outcome::Rejected { reason: RejectReason::Policy, .. }));
    assert!(matches!(w.apply(join("a3", "a", 10)).outcome, Outcome::Joined { .. }));
    // A group no rule covers, with unmatched: deny.
    let mut elsewhere = join("b2", "b", 10);
    if let Command::Join(s) = &mut elsewhere {
        s.group = GroupKey::new("https://github.example/Other/", 1).expect("key");
    }
    assert!(matches!(w.apply(elsewhere).outcome, Outcome::Rejected { reason: RejectReason::Policy, .. }));
    // An invalid policy (as another version might have written it) is refused in apply and
    // leaves the current one in place.
    let bad = Policy { rules: vec![Rule { groups: String::new(), ..Rule::default() }], unmatched: Unmatched::Allow };
    assert!(w.apply(Command::SetPolicy(bad)).outcome.is_rejected());
    assert_eq!(w.state.policy, policy);
    // The empty policy admits everyone again.
    w.apply(Command::SetPolicy(Policy::default()));
    assert!(matches!(w.apply(join("c1", "c", 10)).outcome, Outcome::Joined { .. }));
}
