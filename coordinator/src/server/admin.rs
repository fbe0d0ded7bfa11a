//! AdminService (arcfedctl): status, handover, drain, voter changes. Leader only.
use super::{Ctx, ProposeError};
use crate::core::{Command, GroupKey, MemberId, Outcome, RejectReason, State};
use arcfed_proto as pb;
use openraft::{BasicNode, ChangeMembers};
use std::collections::BTreeSet;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct AdminSvc {
    pub ctx: Arc<Ctx>,
}

/// Why an admin call failed. [`status_of`] is the one place it becomes a `Status`; the
/// error stays attached as the status's source.
#[derive(Debug, thiserror::Error)]
enum AdminError {
    #[error("not the serving leader")]
    NotLeader,
    #[error("not committed: {0}")]
    Propose(#[from] ProposeError),
    #[error("{field}: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("{field}: {why}")]
    NotFound { field: &'static str, why: String },
    #[error("{reason}: {detail}")]
    Rejected { reason: RejectReason, detail: String },
    #[error("{what}: {source}")]
    Membership { what: String, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("{0}")]
    Refused(String),
}

/// The one mapping of admin errors to gRPC statuses: not-leader is UNAVAILABLE with the
/// leader hint, bad input INVALID_ARGUMENT naming the field, a refused command
/// FAILED_PRECONDITION.
fn status_of(ctx: &Ctx, e: AdminError) -> Status {
    use AdminError as E;
    let msg = e.to_string();
    let mut st = match &e {
        E::NotLeader | E::Propose(ProposeError::NotLeader) => ctx.not_leader(),
        E::Propose(ProposeError::Raft(_)) => Status::unavailable(msg),
        E::Invalid { .. } | E::Rejected { reason: RejectReason::InvalidInput, .. } => Status::invalid_argument(msg),
        E::NotFound { .. } => Status::not_found(msg),
        E::Rejected { .. } | E::Membership { .. } | E::Refused(_) => Status::failed_precondition(msg),
    };
    st.set_source(Arc::new(e));
    st
}

fn outcome_to_reply(o: Outcome, ok: String) -> Result<pb::AdminReply, AdminError> {
    match o {
        Outcome::Rejected { reason, detail } => Err(AdminError::Rejected { reason, detail }),
        _ => Ok(pb::AdminReply { message: ok }),
    }
}

/// Exact key, or a unique substring of one.
fn resolve_group(s: &State, q: &str) -> Result<GroupKey, AdminError> {
    if q.is_empty() {
        return Err(AdminError::Invalid { field: "group", why: "empty".into() });
    }
    if let Some(g) = s.groups.keys().find(|k| k.0 == q) {
        return Ok(g.clone());
    }
    let found: Vec<_> = s.groups.keys().filter(|k| k.0.contains(q)).collect();
    match found.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(AdminError::NotFound { field: "group", why: format!("no group matches {q:?}") }),
        many => Err(AdminError::Invalid {
            field: "group",
            why: format!("{q:?} matches {} groups; be more specific", many.len()),
        }),
    }
}

/// Exact member id, or a unique prefix of one.
fn resolve_member(s: &State, q: &str) -> Result<MemberId, AdminError> {
    if q.is_empty() {
        return Err(AdminError::Invalid { field: "member", why: "empty".into() });
    }
    let found: Vec<_> = s.members.keys().filter(|k| k.0 == q || k.0.starts_with(q)).collect();
    match found.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(AdminError::NotFound { field: "member", why: format!("no member matches {q:?}") }),
        _ => Err(AdminError::Invalid { field: "member", why: format!("{q:?} is ambiguous") }),
    }
}

impl AdminSvc {
    fn require_serving(&self) -> Result<(), Status> {
        match self.ctx.serving_term() {
            Some(_) => Ok(()),
            None => Err(status_of(&self.ctx, AdminError::NotLeader)),
        }
    }

    async fn handover_call(&self, r: pb::HandoverCall) -> Result<pb::AdminReply, AdminError> {
        let (group, to) = self.ctx.shared.read(|s| -> Result<_, AdminError> {
            let g = resolve_group(s, &r.group)?;
            let to = if r.to_member.is_empty() { None } else { Some(resolve_member(s, &r.to_member)?) };
            Ok((g, to))
        })?;
        let timeout =
            if r.deadline_ms == 0 { self.ctx.cfg.handover_timeout.as_millis() as i64 } else { r.deadline_ms as i64 };
        let a = self
            .ctx
            .propose(Command::RequestHandover { group: group.clone(), to: to.clone(), deadline_ms: timeout })
            .await?;
        let target = to.map(|t| t.0).unwrap_or_else(|| "the coordinator's choice".into());
        outcome_to_reply(
            a.outcome,
            format!(
                "handover of {group} to {target} requested; deadline {}",
                humantime::format_duration(std::time::Duration::from_millis(timeout.max(0) as u64))
            ),
        )
    }

    /// Relays a drill to the member's open stream on this (leader) node.
    async fn drill_call(&self, r: pb::DrillCall) -> Result<pb::AdminReply, AdminError> {
        let member = self.ctx.shared.read(|s| resolve_member(s, &r.member))?;
        if !matches!(r.action.as_str(), "crash" | "freeze") {
            return Err(AdminError::Invalid {
                field: "action",
                why: format!("{:?}: expected crash or freeze", r.action),
            });
        }
        if r.action == "freeze" && r.duration_ms == 0 {
            return Err(AdminError::Invalid { field: "duration_ms", why: "a freeze needs a duration".into() });
        }
        let tx = self.ctx.streams().get(&member).map(|(_, tx)| tx.clone());
        let Some(tx) = tx else {
            return Err(AdminError::NotFound {
                field: "member",
                why: format!("{member} has no open stream on the leader"),
            });
        };
        let msg = pb::CoordinatorMessage {
            msg: Some(pb::coordinator_message::Msg::Drill(pb::DrillRequest {
                action: r.action.clone(),
                duration_ms: r.duration_ms,
            })),
        };
        tx.send(Box::new(Ok(msg))).await.map_err(|_| AdminError::Refused(format!("{member}'s stream closed")))?;
        tracing::warn!(%member, action = %r.action, duration_ms = r.duration_ms, "drill relayed to an agent");
        Ok(pb::AdminReply {
            message: format!("drill {} relayed to {member} (it obeys only if started with --allow-drills)", r.action),
        })
    }

    async fn set_policy_call(&self, r: pb::SetPolicyCall) -> Result<pb::AdminReply, AdminError> {
        let policy: crate::core::policy::Policy = serde_json::from_str(&r.policy_json)
            .map_err(|e| AdminError::Invalid { field: "policy_json", why: e.to_string() })?;
        policy.validate().map_err(|why| AdminError::Invalid { field: "policy_json", why })?;
        let rules = policy.rules.len();
        let a = self.ctx.propose(Command::SetPolicy(policy)).await?;
        outcome_to_reply(a.outcome, format!("policy set ({rules} rule(s)); it applies to Joins from now on"))
    }

    async fn drain_call(&self, r: pb::DrainCall) -> Result<pb::AdminReply, AdminError> {
        let member = self.ctx.shared.read(|s| resolve_member(s, &r.member))?;
        let deadline = self.ctx.cfg.handover_timeout.as_millis() as i64;
        let a = self.ctx.propose(Command::Drain { member: member.clone(), handover_deadline_ms: deadline }).await?;
        outcome_to_reply(a.outcome, format!("member {member} is draining (assignment 0; handover if it holds)"))
    }

    async fn add_voter_call(&self, r: pb::AddVoterCall) -> Result<pb::AdminReply, AdminError> {
        if r.id == 0 {
            return Err(AdminError::Invalid { field: "id", why: "node ids start at 1".into() });
        }
        if r.address.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
            return Err(AdminError::Invalid { field: "address", why: format!("{:?} is not HOST:PORT", r.address) });
        }
        let raft = &self.ctx.raft;
        raft.add_learner(r.id, BasicNode { addr: r.address.clone() }, true)
            .await
            .map_err(|e| AdminError::Membership { what: format!("add learner {}", r.id), source: Box::new(e) })?;
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([r.id])), false)
            .await
            .map_err(|e| AdminError::Membership { what: format!("promote {} to voter", r.id), source: Box::new(e) })?;
        Ok(pb::AdminReply { message: format!("node {} at {} is a voter", r.id, r.address) })
    }

    async fn remove_voter_call(&self, r: pb::RemoveVoterCall) -> Result<pb::AdminReply, AdminError> {
        let m = self.ctx.raft.metrics().borrow().clone();
        let voters: BTreeSet<u64> = m.membership_config.membership().voter_ids().collect();
        if !voters.contains(&r.id) {
            return Err(AdminError::NotFound { field: "id", why: format!("node {} is not a voter", r.id) });
        }
        if voters.len() <= 1 {
            return Err(AdminError::Refused("cannot remove the last voter".into()));
        }
        self.ctx
            .raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([r.id])), false)
            .await
            .map_err(|e| AdminError::Membership { what: format!("remove voter {}", r.id), source: Box::new(e) })?;
        Ok(pb::AdminReply { message: format!("node {} removed from the voters", r.id) })
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminSvc {
    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        self.require_serving()?;
        let ctx = &self.ctx;
        let m = ctx.raft.metrics().borrow().clone();
        let now = ctx.now();
        let lessor = ctx.lessor();
        let remaining = |id: &MemberId| lessor.remaining_ms(id, now).unwrap_or(-1);
        let resp = ctx.shared.read(|s| {
            let membership = m.membership_config.membership();
            let voter_ids: BTreeSet<u64> = membership.voter_ids().collect();
            // A voter that has not answered within an election timeout is not following:
            // it is stopped, partitioned or frozen.
            let within = ctx.cfg.election_max;
            let voters = membership
                .nodes()
                .map(|(id, node)| {
                    let age = if *id == ctx.id { Some(std::time::Duration::ZERO) } else { ctx.contacts.age(*id) };
                    let reachable = age.is_some_and(|a| a <= within);
                    pb::Voter {
                        id: *id,
                        address: s.leader_addrs.get(id).cloned().unwrap_or_else(|| node.addr.clone()),
                        role: if Some(*id) == m.current_leader {
                            "leader".into()
                        } else if !reachable {
                            "unreachable".into()
                        } else if voter_ids.contains(id) {
                            "follower".into()
                        } else {
                            "learner".into()
                        },
                        reachable,
                        last_contact_ms: age.map(|a| a.as_millis().min(i64::MAX as u128) as i64).unwrap_or(-1),
                    }
                })
                .collect();
            let members = s
                .members
                .values()
                .map(|mm| pb::MemberStatus {
                    id: mm.id.0.clone(),
                    cluster: mm.cluster.clone(),
                    group: mm.group.0.clone(),
                    status: mm.status.as_str().into(),
                    epoch: mm.epoch,
                    ers: format!("{}/{}", mm.ers_namespace, mm.ers_name),
                    draining: mm.draining,
                    standby: mm.standby,
                    github_ready: mm.github_ready,
                    weight: mm.weight,
                    min_runners: mm.min_runners,
                    max_runners: mm.max_runners,
                    busy: s.busy_of(&mm.id),
                    lease_remaining_ms: if mm.status.has_lease() { remaining(&mm.id) } else { -1 },
                    assignment: s.assignment_of(&mm.id),
                })
                .collect();
            let groups = s
                .groups
                .values()
                .map(|g| pb::GroupStatus {
                    key: g.key.0.clone(),
                    holder: g.holder.as_ref().map(|h| h.0.clone()).unwrap_or_default(),
                    holder_cluster: g
                        .holder
                        .as_ref()
                        .and_then(|h| s.members.get(h))
                        .map(|m| m.cluster.clone())
                        .unwrap_or_default(),
                    token: g.token,
                    session_id: g.session_id.clone().unwrap_or_default(),
                    stale_sessions: g.stale_sessions.iter().cloned().collect(),
                    lease_remaining_ms: g.holder.as_ref().map(&remaining).unwrap_or(-1),
                    assignments: g
                        .assignments
                        .iter()
                        .map(|(id, n)| pb::MemberAssignment {
                            member: id.0.clone(),
                            cluster: s.members.get(id).map(|m| m.cluster.clone()).unwrap_or_default(),
                            runners: *n,
                        })
                        .collect(),
                    revision: g.revision,
                    last_acked_message_id: g.last_acked_message_id,
                    total_assigned_jobs: g.statistics.total_assigned_jobs,
                    handover_to: g
                        .handover
                        .as_ref()
                        .and_then(|h| h.to.as_ref())
                        .map(|t| t.0.clone())
                        .unwrap_or_default(),
                    handover_deadline_unix_ms: g.handover.as_ref().map(|h| h.deadline_ms).unwrap_or(0),
                })
                .collect();
            pb::StatusResponse {
                leader: m.current_leader.unwrap_or(0),
                term: m.current_term,
                commit_index: super::http::commit_index(&m),
                applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
                voters,
                members,
                groups,
                quorum_contact_age_ms: ctx.quorum_age_ms().map(|v| v as i64).unwrap_or(-1),
            }
        });
        Ok(Response::new(resp))
    }

    async fn handover(&self, req: Request<pb::HandoverCall>) -> Result<Response<pb::AdminReply>, Status> {
        self.require_serving()?;
        self.handover_call(req.into_inner()).await.map(Response::new).map_err(|e| status_of(&self.ctx, e))
    }

    async fn drill(&self, req: Request<pb::DrillCall>) -> Result<Response<pb::AdminReply>, Status> {
        self.require_serving()?;
        self.drill_call(req.into_inner()).await.map(Response::new).map_err(|e| status_of(&self.ctx, e))
    }

    async fn set_policy(&self, req: Request<pb::SetPolicyCall>) -> Result<Response<pb::AdminReply>, Status> {
        self.require_serving()?;
        self.set_policy_call(req.into_inner()).await.map(Response::new).map_err(|e| status_of(&self.ctx, e))
    }

    async fn get_policy(&self, _req: Request<pb::GetPolicyCall>) -> Result<Response<pb::PolicyReply>, Status> {
        self.require_serving()?;
        let json = self
            .ctx
            .shared
            .read(|s| serde_json::to_string_pretty(&s.policy))
            .map_err(|e| Status::internal(format!("encode policy: {e}")))?;
        Ok(Response::new(pb::PolicyReply { policy_json: json }))
    }

    async fn drain(&self, req: Request<pb::DrainCall>) -> Result<Response<pb::AdminReply>, Status> {
        self.require_serving()?;
        self.drain_call(req.into_inner()).await.map(Response::new).map_err(|e| status_of(&self.ctx, e))
    }

    async fn add_voter(&self, req: Request<pb::AddVoterCall>) -> Result<Response<pb::AdminReply>, Status> {
        self.require_serving()?;
        self.add_voter_call(req.into_inner()).await.map(Response::new).map_err(|e| status_of(&self.ctx, e))
    }

    async fn remove_voter(&self, req: Request<pb::RemoveVoterCall>) -> Result<Response<pb::AdminReply>, Status> {
        self.require_serving()?;
        self.remove_voter_call(req.into_inner()).await.map(Response::new).map_err(|e| status_of(&self.ctx, e))
    }
}
