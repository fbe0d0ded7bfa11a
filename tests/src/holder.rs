//! The holder side of the session protocol (DESIGN §5.2–§5.4, §5.7), for the library agent.
//!
//! The sandbox and drills use it so that a region that holds its group's lease really talks
//! to (emulated) GitHub: it revokes the predecessor's sessions, opens its own with
//! `ownerName = arcfed/<cluster>/<member>/t<token>`, commits the session id before the first
//! poll, long-polls, reports `Progress` and acks a message only after `Accepted`. Every
//! request is gated by the fence of [`crate::agent_client::Record::fence_end`], and an
//! in-flight poll is cancelled at the fence deadline. The production agent (agent issue)
//! implements the same protocol with its own adapters; this one is deliberately small.

use crate::agent_client::{TestAgent, is_accepted};
use crate::emulator::client::ArcClient;
use crate::emulator::model::{JobMessage, MessageEnvelope, Session, Statistics};
use arcfed_proto as pb;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where this region's GitHub is, and with which credentials.
#[derive(Clone, Debug)]
pub struct GitHubSide {
    pub config_url: String,
    pub pat: String,
    pub scale_set_id: i64,
    pub cluster: String,
}

/// How long before the fence's end an in-flight long poll is abandoned (see `poll_loop`).
const POLL_MARGIN: Duration = Duration::from_millis(400);

/// Why the session loop stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    Fenced,
    Handover,
    Rejected,
    Error,
}

fn fence_ok(agent: &TestAgent, token: u64) -> bool {
    agent.rec().fence_end(token).is_some_and(|e| Instant::now() < e)
}

fn handover_asked(agent: &TestAgent, token: u64) -> bool {
    agent.rec().handovers.iter().any(|(h, _)| h.token == token)
}

fn stats_pb(s: &Statistics) -> pb::Statistics {
    pb::Statistics {
        total_available_jobs: s.total_available_jobs,
        total_acquired_jobs: s.total_acquired_jobs,
        total_assigned_jobs: s.total_assigned_jobs,
        total_running_jobs: s.total_running_jobs,
        total_registered_runners: s.total_registered_runners,
        total_busy_runners: s.total_busy_runners,
        total_idle_runners: s.total_idle_runners,
    }
}

fn job_events(body: &str) -> Vec<pb::JobEvent> {
    let jobs: Vec<JobMessage> = serde_json::from_str(body).unwrap_or_default();
    jobs.into_iter()
        .filter_map(|j| {
            let kind = match j.message_type.as_str() {
                "JobStarted" => pb::JobEventKind::Started,
                "JobCompleted" => pb::JobEventKind::Completed,
                _ => return None,
            };
            Some(pb::JobEvent {
                kind: kind as i32,
                runner_name: j.runner_name.clone()?,
                runner_id: j.runner_id.unwrap_or(0),
                job_id: j.job_id,
                runner_request_id: j.runner_request_id,
                repository_name: j.repository_name,
                owner_name: j.owner_name,
                job_workflow_ref: j.job_workflow_ref,
                job_display_name: j.job_display_name,
                workflow_run_id: j.workflow_run_id,
                result: j.result.unwrap_or_default(),
            })
        })
        .collect()
}

/// Runs until aborted: whenever this agent holds its group, it runs one session.
pub async fn run(agent: Arc<TestAgent>, gh: GitHubSide) {
    let mut backoff = Duration::from_millis(250);
    let client = loop {
        match ArcClient::new(&gh.config_url, &gh.pat) {
            Ok(mut c) => match c.auth().await {
                Ok(()) => break c,
                Err(e) => tracing::warn!(error = %e, "GitHub auth failed; retrying"),
            },
            Err(e) => tracing::warn!(error = %e, "GitHub client"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    };
    let mut done: BTreeSet<u64> = BTreeSet::new();
    // The session opened under a token, kept across fence gaps: after a gap the holder
    // resumes polling it instead of opening another (which would meet its own 409).
    let mut current: Option<(u64, Session)> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let Some(token) = agent.rec().last_grant().map(|g| g.token) else { continue };
        if done.contains(&token) || !fence_ok(&agent, token) {
            continue;
        }
        let stop = session(&agent, &client, &gh, token, &mut current).await;
        tracing::info!(cluster = %gh.cluster, token, ?stop, "session loop ended");
        // Only a release ends a token for good. After a fence gap (say a leader change) the
        // holder resumes as soon as a fresh ack lists the token again; a stale token is
        // never listed again, so it is skipped without bookkeeping.
        if stop == Stop::Handover {
            done.insert(token);
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Waits for an ack listing (group, token) for a keepalive sent after `since` (fence (c)).
async fn fresh_ack(agent: &TestAgent, token: u64, since: Instant) -> bool {
    let end = since + Duration::from_secs(5);
    agent.keepalive_now().await;
    while Instant::now() < end {
        if agent.rec().acks.iter().rev().any(|a| a.sent_at > since && a.held.iter().any(|h| h.1 == token)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

async fn session(
    agent: &TestAgent,
    client: &ArcClient,
    gh: &GitHubSide,
    token: u64,
    current: &mut Option<(u64, Session)>,
) -> Stop {
    let set = gh.scale_set_id;
    let resumed = current.as_ref().filter(|(t, _)| *t == token).map(|(_, s)| s.clone());
    let session = match resumed {
        Some(s) => s,
        None => match open(agent, client, gh, token).await {
            Ok(s) => {
                *current = Some((token, s.clone()));
                s
            }
            Err(stop) => return stop,
        },
    };
    let stop = poll_loop(agent, client, token, &session).await;
    if stop == Stop::Error {
        // The session may be gone server-side (expired, evicted): open a fresh one next time.
        *current = None;
    }
    if stop == Stop::Handover {
        *current = None;
        // Orderly release: delete our session, then tell the coordinator.
        let path = format!("_apis/runtime/runnerscalesets/{set}/sessions/{}", session.session_id);
        let deleted = match client.admin(reqwest::Method::DELETE, &path, &[], None).await {
            Ok(r) if matches!(r.status, 204 | 404 | 400) => vec![session.session_id.clone()],
            _ => vec![],
        };
        let _ = agent.release(token, deleted, pb::ReleaseReason::Handover).await;
    }
    stop
}

/// Revokes the predecessors' sessions, opens ours and commits its id (fences (a)–(c)).
async fn open(agent: &TestAgent, client: &ArcClient, gh: &GitHubSide, token: u64) -> Result<Session, Stop> {
    let set = gh.scale_set_id;
    // Revoke the predecessors' sessions by their replicated ids.
    let stale: BTreeSet<String> = {
        let r = agent.rec();
        let mut s: BTreeSet<String> =
            r.grants.iter().filter(|g| g.token == token).flat_map(|g| g.stale_sessions.clone()).collect();
        s.extend(r.delete_sessions.iter().filter(|d| d.token == token).flat_map(|d| d.session_ids.clone()));
        s
    };
    let mut deleted = Vec::new();
    for id in stale {
        if !fence_ok(agent, token) {
            return Err(Stop::Fenced);
        }
        let path = format!("_apis/runtime/runnerscalesets/{set}/sessions/{id}");
        match client.admin(reqwest::Method::DELETE, &path, &[], None).await {
            // 204 deleted, 404 gone, 400 expired: all count as done.
            Ok(r) if matches!(r.status, 204 | 404 | 400) => deleted.push(id),
            Ok(r) => tracing::warn!(status = r.status, session = %id, "stale session delete refused"),
            Err(e) => tracing::warn!(error = %e, session = %id, "stale session delete failed"),
        }
    }
    if !deleted.is_empty() {
        let _ = agent.release(token, deleted, pb::ReleaseReason::StaleRevoked).await;
    }
    // Open, with 409 backoff for as long as the lease is held; POST only after an ack for a
    // keepalive sent after the decision to POST.
    let owner = format!("arcfed/{}/{}/t{token}", gh.cluster, agent.opts.member_id);
    let mut backoff = Duration::from_millis(250);
    let session = loop {
        let decided = Instant::now();
        if !fresh_ack(agent, token, decided).await || !fence_ok(agent, token) {
            return Err(Stop::Fenced);
        }
        if handover_asked(agent, token) {
            let _ = agent.release(token, vec![], pb::ReleaseReason::Handover).await;
            return Err(Stop::Handover);
        }
        match client.create_session(set, &owner).await {
            Ok(r) if r.status == 200 => match r.json::<Session>() {
                Ok(s) => break s,
                Err(_) => return Err(Stop::Error),
            },
            Ok(r) => tracing::info!(status = r.status, "session create refused; backing off"),
            Err(e) => tracing::warn!(error = %e, "session create failed (possible orphan); backing off"),
        }
        let jitter = Duration::from_millis(rand::random::<u64>() % 100);
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    };
    // Commit the session id before the first poll.
    let opened = agent.session_opened_with(token, &session.session_id, stats_pb(&session.statistics)).await;
    if !opened.as_ref().is_ok_and(is_accepted) {
        return Err(Stop::Rejected);
    }
    Ok(session)
}

/// Long-polls behind the fence; acks a message only after its Progress was accepted.
async fn poll_loop(agent: &TestAgent, client: &ArcClient, token: u64, session: &Session) -> Stop {
    let mut last = 0i64;
    loop {
        if handover_asked(agent, token) {
            break Stop::Handover;
        }
        let capacity = agent.rec().assignments.last().map(|a| a.0.max_capacity).unwrap_or(0);
        let poll = client.poll(&session.message_queue_url, &session.message_queue_access_token, last, Some(capacity));
        tokio::pin!(poll);
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let resp = loop {
            tokio::select! {
                r = &mut poll => break Some(r),
                _ = tick.tick() => {
                    // The fence deadline moves with every ack; re-check it while polling. A
                    // healthy holder always has more than TTL×(1−margin) − TTL/4 left; when
                    // acks stop, stop polling POLL_MARGIN before the fence ends, so a 200 is
                    // not delivered (and, with a per-scale-set cursor, lost) after it.
                    let near_end = agent.rec().fence_end(token).is_none_or(|e| Instant::now() + POLL_MARGIN >= e);
                    if near_end || handover_asked(agent, token) {
                        break None;
                    }
                }
            }
        };
        let Some(resp) = resp else {
            if handover_asked(agent, token) {
                break Stop::Handover;
            }
            break Stop::Fenced;
        };
        if !fence_ok(agent, token) {
            // A 200 after the fence deadline is dropped without being acked.
            break Stop::Fenced;
        }
        let resp = match resp {
            Ok(r) => r,
            Err(_) => break Stop::Error,
        };
        match resp.status {
            202 => {
                let _ = agent.progress_full(token, None, pb::Statistics::default(), vec![]).await;
            }
            200 => {
                let Ok(env) = resp.json::<MessageEnvelope>() else { break Stop::Error };
                let events = job_events(&env.body);
                let p = agent.progress_full(token, Some(env.message_id), stats_pb(&env.statistics), events).await;
                match p {
                    Ok(r) if is_accepted(&r) => {
                        if !fence_ok(agent, token) {
                            break Stop::Fenced;
                        }
                        let _ = client
                            .ack(&session.message_queue_url, &session.message_queue_access_token, env.message_id)
                            .await;
                        last = env.message_id;
                    }
                    _ => break Stop::Rejected,
                }
            }
            _ => break Stop::Error,
        }
    }
}
