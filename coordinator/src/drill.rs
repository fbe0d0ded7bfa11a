//! `arcfedctl drill`: failover drills against any deployment, measured from the quorum's side.
//!
//! ```text
//!  arcfedctl ──AdminService.Drill──▶ leader ──DrillRequest on the agent's stream──▶ holder agent
//!      │                                                   (obeys only with --allow-drills)
//!      └── polls Status: holder change committed (detect_ms), successor's session committed
//!          (failover_ms); tokens never decrease (token_regressions)
//! ```
//! A drill cannot reach GitHub, so the GitHub-side fields of DESIGN §11 (overlap, zombies,
//! 409s, lost messages) are reported as unobservable; `arcfed-sandbox --drill …` measures them
//! against the emulator. What a drill cannot do remotely (kill a voter's host, partition a
//! region) is left to the sandbox.

use crate::ctl::Admin;
use anyhow::{Context, bail};
use arcfed_core::report::{DrillReport, DrillRun};
use arcfed_proto as pb;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// The holder's agent exits at once (what a SIGKILL leaves: an orphaned session).
    KillHolder,
    /// The holder's agent loop stops for --freeze (past the TTL), then resumes as a standby.
    FreezeHolder,
    /// A planned handover to another member (what an upgrade does).
    Handover,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::KillHolder => "kill-holder",
            Scenario::FreezeHolder => "freeze-holder",
            Scenario::Handover => "handover",
        }
    }
}

/// How a drill runs.
#[derive(Clone, Debug)]
pub struct Options {
    pub scenario: Scenario,
    pub runs: usize,
    /// Group key or a unique substring; default: the first group with a holder.
    pub group: Option<String>,
    pub freeze: Duration,
    /// Longest wait for each step.
    pub wait: Duration,
}

struct Holding {
    group: String,
    member: String,
    cluster: String,
    token: u64,
    session: String,
}

fn holding(s: &pb::StatusResponse, group: Option<&str>) -> Option<Holding> {
    let g = s.groups.iter().find(|g| group.is_none_or(|f| g.key.contains(f)) && !g.holder.is_empty())?;
    Some(Holding {
        group: g.key.clone(),
        member: g.holder.clone(),
        cluster: g.holder_cluster.clone(),
        token: g.token,
        session: g.session_id.clone(),
    })
}

fn live_others<'a>(s: &'a pb::StatusResponse, group: &str, not: &str) -> Vec<&'a pb::MemberStatus> {
    let mut v: Vec<_> = s
        .members
        .iter()
        .filter(|m| m.group == group && m.id != not && m.status == "live" && !m.standby && !m.draining)
        .collect();
    v.sort_by(|a, b| a.cluster.cmp(&b.cluster));
    v
}

async fn status(admin: &mut Admin) -> anyhow::Result<pb::StatusResponse> {
    admin.call(|mut c| async move { c.status(pb::StatusRequest {}).await }).await
}

async fn wait_for(
    admin: &mut Admin,
    what: &str,
    wait: Duration,
    cond: impl Fn(&pb::StatusResponse) -> bool,
) -> anyhow::Result<pb::StatusResponse> {
    let end = Instant::now() + wait;
    loop {
        if let Ok(s) = status(admin).await
            && cond(&s)
        {
            return Ok(s);
        }
        if Instant::now() > end {
            bail!("timed out after {wait:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn run(admin: &mut Admin, o: &Options) -> anyhow::Result<DrillReport> {
    let mut report = DrillReport {
        scenario: o.scenario.name().into(),
        source: "quorum".into(),
        unobservable: [
            "first_poll_ms",
            "sessions_overlap_ms",
            "zombie_requests",
            "conflicts_409",
            "messages_lost",
            "acquire_repeats",
            "jobs_acquired_twice",
            "stale_token_rejections",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        ..DrillReport::default()
    };
    let mut last_token = 0u64;
    for run in 0..o.runs {
        let group = o.group.as_deref();
        let s = wait_for(admin, "a holder with an open session", o.wait, |s| {
            holding(s, group).is_some_and(|h| !h.session.is_empty())
        })
        .await?;
        let h = holding(&s, group).context("holder")?;
        let others = live_others(&s, &h.group, &h.member);
        let Some(target) = others.first().map(|m| (m.id.clone(), m.cluster.clone())) else {
            bail!("group {} has no other live member to take over; a drill needs at least two", h.group);
        };
        if h.token < last_token {
            report.token_regressions += 1;
        }
        let fault = Instant::now();
        match o.scenario {
            Scenario::KillHolder | Scenario::FreezeHolder => {
                let call = pb::DrillCall {
                    member: h.member.clone(),
                    action: if o.scenario == Scenario::KillHolder { "crash" } else { "freeze" }.into(),
                    duration_ms: o.freeze.as_millis() as u64,
                };
                admin
                    .call(|mut c| {
                        let call = call.clone();
                        async move { c.drill(call).await }
                    })
                    .await?;
            }
            Scenario::Handover => {
                let call = pb::HandoverCall { group: h.group.clone(), to_member: target.0.clone(), deadline_ms: 0 };
                admin
                    .call(|mut c| {
                        let call = call.clone();
                        async move { c.handover(call).await }
                    })
                    .await?;
            }
        }
        let hint = " (is the holder's agent started with --allow-drills?)";
        let s2 = wait_for(admin, "the holder change", o.wait, |s| {
            s.groups.iter().any(|g| g.key == h.group && !g.holder.is_empty() && g.holder != h.member)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}{}", if o.scenario == Scenario::Handover { "" } else { hint }))?;
        let detect = fault.elapsed().as_millis() as u64;
        let s3 = wait_for(admin, "the successor's session", o.wait, |s| {
            s.groups.iter().any(|g| g.key == h.group && !g.session_id.is_empty() && g.session_id != h.session)
        })
        .await?;
        let failover = fault.elapsed().as_millis() as u64;
        let after = holding(&s3, Some(&h.group)).map(|x| (x.token, x.cluster)).unwrap_or((0, String::new()));
        if after.0 < h.token {
            report.token_regressions += 1;
        }
        last_token = after.0;
        let _ = s2;
        // Let the faulted region come back before the next run (ARC recreates a dead
        // listener pod; a frozen one resumes as a standby).
        let back = wait_for(admin, "the faulted cluster back as a live member", o.wait, |s| {
            s.members.iter().any(|m| m.cluster == h.cluster && m.group == h.group && m.status == "live")
        })
        .await
        .is_ok();
        report.runs.push(DrillRun {
            run,
            from_cluster: h.cluster.clone(),
            to_cluster: after.1,
            token_before: h.token,
            token_after: after.0,
            detect_ms: Some(detect),
            failover_ms: Some(failover),
            first_poll_ms: None,
            note: if back {
                String::new()
            } else {
                format!("cluster {} did not come back within {:?}", h.cluster, o.wait)
            },
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    report.summarize_runs();
    Ok(report)
}
