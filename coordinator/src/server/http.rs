//! What the coordinator's admin HTTP port (`--admin-listen`, served by the shared
//! `arcfed_proto::ops::serve_admin`; plain HTTP, cluster-internal) answers on `/live`,
//! `/ready` and `/metrics`.
use super::Ctx;
use openraft::ServerState;
use std::sync::Arc;

pub async fn serve(ctx: Arc<Ctx>, listener: tokio::net::TcpListener) {
    let probe = Arc::new(Probe(ctx));
    if let Err(e) = arcfed_proto::ops::serve_admin(listener, probe, "/metrics".into(), std::future::pending()).await {
        tracing::error!(error = %e, "admin HTTP server stopped");
    }
}

struct Probe(Arc<Ctx>);

impl arcfed_proto::ops::Probe for Probe {
    /// Live = the Raft core still runs. After a fatal error (a store write that failed, a
    /// panic in the core) the process would answer gRPC with errors for ever: the kubelet
    /// restarts it instead.
    fn live(&self) -> Result<String, String> {
        liveness(&self.0.raft.metrics().borrow().running_state)
    }

    /// Ready = this node knows a leader and has applied the log (a leader must also serve).
    fn ready(&self) -> Result<String, String> {
        let ctx = &self.0;
        let m = ctx.raft.metrics().borrow().clone();
        match m.current_leader {
            None => Err("no known leader".into()),
            Some(l) if l == ctx.id && ctx.serving_term().is_none() => Err("leader not serving yet".into()),
            Some(l) => Ok(format!("ok (leader {l})\n")),
        }
    }

    fn metrics(&self) -> Result<String, String> {
        refresh(&self.0);
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &self.0.metrics.registry).map_err(|e| e.to_string())?;
        Ok(body)
    }
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
    mm.purged_index.set(m.purged.map(|l| l.index).unwrap_or(0) as i64);
    mm.commit_index.set(commit_index(&m) as i64);
    mm.quorum_contact_age_ms.set(ctx.quorum_age_ms().map(|v| v as i64).unwrap_or(-1));
    mm.tls_not_after.set(ctx.tls.current().not_after_unix());
    let contact = if ctx.serving_term().is_some() {
        ctx.quorum_age_ms().map_or(0.0, |ms| ms as f64 / 1000.0)
    } else {
        m.current_leader
            .filter(|l| *l != ctx.id)
            .and_then(|l| ctx.contacts.age(l))
            .map_or(f64::INFINITY, |d| d.as_secs_f64())
    };
    mm.leader_contact_age.set(contact);
    // Counters kept by the TLS source, copied forward (they only grow).
    mm.tls_reload_errors.inc_by(ctx.tls.reload_errors().saturating_sub(mm.tls_reload_errors.get()));
    mm.tls_handshake_failures.inc_by(ctx.tls.handshake_failures().saturating_sub(mm.tls_handshake_failures.get()));
    mm.connections_shed.inc_by(ctx.tls.connections_shed().saturating_sub(mm.connections_shed.get()));
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

/// `/live` from the Raft core's running state (see `live`).
fn liveness(running: &Result<(), openraft::error::Fatal<u64>>) -> Result<String, String> {
    match running {
        Ok(()) => Ok("ok\n".into()),
        Err(fatal) => Err(format!("raft stopped: {fatal}")),
    }
}

#[cfg(test)]
mod live_tests {
    #[test]
    fn a_stopped_raft_core_fails_live() {
        assert!(super::liveness(&Ok(())).is_ok());
        let e = super::liveness(&Err(openraft::error::Fatal::Stopped)).unwrap_err();
        assert!(e.contains("raft stopped"), "{e}");
    }
}
