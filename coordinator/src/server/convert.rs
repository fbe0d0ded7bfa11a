//! Conversions between protobuf messages and core types: the only place that knows both.
use crate::core::{self, GroupKey, JobEvent, JobEventKind, JoinSpec, MemberId, Outcome, ReleaseReason, SplitPolicy};
use arcfed_proto as pb;

/// Bad input from an agent, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {why}")]
pub struct InvalidField {
    pub field: &'static str,
    pub why: String,
}

fn invalid(field: &'static str, why: impl Into<String>) -> InvalidField {
    InvalidField { field, why: why.into() }
}

pub fn stats(s: Option<pb::Statistics>) -> core::Statistics {
    let s = s.unwrap_or_default();
    core::Statistics {
        total_available_jobs: s.total_available_jobs,
        total_acquired_jobs: s.total_acquired_jobs,
        total_assigned_jobs: s.total_assigned_jobs,
        total_running_jobs: s.total_running_jobs,
        total_registered_runners: s.total_registered_runners,
        total_busy_runners: s.total_busy_runners,
        total_idle_runners: s.total_idle_runners,
    }
}

pub fn job_event(e: pb::JobEvent) -> Result<JobEvent, InvalidField> {
    let kind = match pb::JobEventKind::try_from(e.kind) {
        Ok(pb::JobEventKind::Started) => JobEventKind::Started,
        Ok(pb::JobEventKind::Completed) => JobEventKind::Completed,
        _ => return Err(invalid("events.kind", format!("unknown job event kind {}", e.kind))),
    };
    if e.runner_name.is_empty() {
        return Err(invalid("events.runner_name", "empty"));
    }
    Ok(JobEvent {
        kind,
        runner_name: e.runner_name,
        runner_id: e.runner_id,
        job_id: e.job_id,
        runner_request_id: e.runner_request_id,
        repository_name: e.repository_name,
        owner_name: e.owner_name,
        job_workflow_ref: e.job_workflow_ref,
        job_display_name: e.job_display_name,
        workflow_run_id: e.workflow_run_id,
        result: e.result,
    })
}

pub fn job_event_pb(e: &JobEvent) -> pb::JobEvent {
    pb::JobEvent {
        kind: match e.kind {
            JobEventKind::Started => pb::JobEventKind::Started as i32,
            JobEventKind::Completed => pb::JobEventKind::Completed as i32,
        },
        runner_name: e.runner_name.clone(),
        runner_id: e.runner_id,
        job_id: e.job_id.clone(),
        runner_request_id: e.runner_request_id,
        repository_name: e.repository_name.clone(),
        owner_name: e.owner_name.clone(),
        job_workflow_ref: e.job_workflow_ref.clone(),
        job_display_name: e.job_display_name.clone(),
        workflow_run_id: e.workflow_run_id,
        result: e.result.clone(),
    }
}

/// A Join from the wire; `cluster` comes from the client certificate, never the message.
pub fn join(j: pb::Join, cluster: &str) -> Result<JoinSpec, InvalidField> {
    let member = MemberId::parse(&j.member_id).map_err(|e| invalid("join.member_id", e))?;
    let g = j.group.ok_or_else(|| invalid("join.group", "missing"))?;
    let group = GroupKey::new(&g.configure_url, g.scale_set_id).map_err(|e| invalid("join.group", e))?;
    let policy = match pb::SplitPolicy::try_from(j.policy) {
        Ok(pb::SplitPolicy::Prefer) => SplitPolicy::Prefer,
        Ok(pb::SplitPolicy::Spread) => SplitPolicy::Spread,
        Err(_) => return Err(invalid("join.policy", format!("unknown policy {}", j.policy))),
    };
    let spec = JoinSpec {
        member,
        cluster: cluster.to_string(),
        group,
        ers_namespace: j.ers_namespace,
        ers_name: j.ers_name,
        weight: j.weight,
        min_runners: j.min_runners,
        max_runners: j.max_runners,
        priority: j.priority,
        github_ready: j.github_ready,
        policy,
    };
    // The same checks `apply` makes, so invalid input never reaches the log.
    spec.validate().map_err(|e| invalid(e.field, e.why))?;
    Ok(spec)
}

pub fn release_reason(r: i32) -> ReleaseReason {
    match pb::ReleaseReason::try_from(r) {
        Ok(pb::ReleaseReason::StaleRevoked) => ReleaseReason::StaleRevoked,
        Ok(pb::ReleaseReason::Shutdown) => ReleaseReason::Shutdown,
        Ok(pb::ReleaseReason::Handover) => ReleaseReason::Handover,
        Ok(pb::ReleaseReason::Stall) => ReleaseReason::Stall,
        Ok(pb::ReleaseReason::LostLease) => ReleaseReason::LostLease,
        _ => ReleaseReason::Unspecified,
    }
}

pub fn result(request_id: u64, o: &Outcome) -> pb::CommandResult {
    use pb::command_result::Result as R;
    let r = match o {
        Outcome::Rejected { reason, detail } => R::Rejected(pb::Rejected { reason: format!("{reason}: {detail}") }),
        Outcome::Accepted { duplicate } => R::Accepted(pb::Accepted { duplicate: *duplicate, token: 0 }),
        Outcome::Granted { token } => R::Accepted(pb::Accepted { duplicate: false, token: *token }),
        Outcome::Joined { .. } | Outcome::Done | Outcome::None => R::Accepted(pb::Accepted::default()),
        // The proposer unpacks batches before answering; an agent never sends one.
        Outcome::Batch(_) => R::Rejected(pb::Rejected { reason: "internal: an unpacked batch outcome".into() }),
    };
    pb::CommandResult { request_id, result: Some(r) }
}

pub fn rejected(request_id: u64, why: impl Into<String>) -> pb::CommandResult {
    pb::CommandResult {
        request_id,
        result: Some(pb::command_result::Result::Rejected(pb::Rejected { reason: why.into() })),
    }
}
