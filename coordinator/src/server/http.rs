//! Admin HTTP: `/live`, `/ready` and `/metrics` (plain HTTP, cluster-internal).
use super::Ctx;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use openraft::ServerState;
use std::sync::Arc;

pub async fn serve(ctx: Arc<Ctx>, listener: tokio::net::TcpListener) {
    let app = Router::new()
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(ctx);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "admin HTTP server stopped");
    }
}

/// Ready = this node knows a leader and has applied the log (a leader must also serve).
async fn ready(State(ctx): State<Arc<Ctx>>) -> impl IntoResponse {
    let m = ctx.raft.metrics().borrow().clone();
    match m.current_leader {
        None => (StatusCode::SERVICE_UNAVAILABLE, "no known leader\n".to_string()),
        Some(l) if l == ctx.id && ctx.serving_term().is_none() => {
            (StatusCode::SERVICE_UNAVAILABLE, "leader not serving yet\n".to_string())
        }
        Some(l) => (StatusCode::OK, format!("ok (leader {l})\n")),
    }
}

async fn metrics(State(ctx): State<Arc<Ctx>>) -> impl IntoResponse {
    refresh(&ctx);
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &ctx.metrics.registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("encode: {e}\n")).into_response();
    }
    ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
        .into_response()
}

/// Copies Raft metrics and the applied state into the gauges.
pub fn refresh(ctx: &Ctx) {
    let mm = &ctx.metrics;
    let m = ctx.raft.metrics().borrow().clone();
    mm.term.set(m.current_term as i64);
    mm.leader.set(m.current_leader.unwrap_or(0) as i64);
    mm.is_leader.set(i64::from(m.state == ServerState::Leader));
    mm.serving.set(i64::from(ctx.serving_term().is_some()));
    mm.applied_index.set(m.last_applied.map(|l| l.index).unwrap_or(0) as i64);
    mm.commit_index.set(commit_index(&m) as i64);
    mm.quorum_contact_age_ms.set(ctx.quorum_age_ms().map(|v| v as i64).unwrap_or(-1));
    ctx.shared.read(|s| {
        for status in ["live", "silent", "expired", "left"] {
            let n = s.members.values().filter(|m| m.status.as_str() == status).count();
            mm.members.get_or_create(&super::metrics::StatusLabel { status: status.into() }).set(n as i64);
        }
        mm.groups.set(s.groups.len() as i64);
        mm.holders.set(s.groups.values().filter(|g| g.holder.is_some()).count() as i64);
        mm.grants.set(s.counters.grants);
        mm.expirations.set(s.counters.expirations);
        mm.stale_token_rejections.set(s.counters.stale_token_rejections);
        mm.handovers.set(s.counters.handovers);
        mm.revocations.set(s.counters.revocations);
    });
}

/// The commit index: on the leader, the highest index a majority of voters has matched;
/// elsewhere the applied index (a follower applies only committed entries).
pub fn commit_index(m: &openraft::RaftMetrics<u64, openraft::BasicNode>) -> u64 {
    let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
    let Some(rep) = &m.replication else { return applied };
    let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
    let mut matched: Vec<u64> = voters
        .iter()
        .map(|v| {
            if *v == m.id {
                m.last_log_index.unwrap_or(0)
            } else {
                rep.get(v).cloned().flatten().map(|l| l.index).unwrap_or(0)
            }
        })
        .collect();
    matched.sort_unstable_by(|a, b| b.cmp(a));
    matched.get(voters.len() / 2).copied().unwrap_or(applied).max(applied)
}
