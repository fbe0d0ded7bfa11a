//! Prometheus metrics of the coordinator (prometheus-client, one registry).
//!
//! Gauges that mirror the Raft and applied state are refreshed at scrape time; counters of
//! replicated events (grants, expirations, …) come from the replicated counters, so every
//! voter reports the same totals.
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
    pub commit: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub term: Gauge,
    pub leader: Gauge,
    pub is_leader: Gauge,
    pub serving: Gauge,
    pub commit_index: Gauge,
    pub applied_index: Gauge,
    pub purged_index: Gauge,
    pub quorum_contact_age_ms: Gauge,
    pub members: Family<StatusLabel, Gauge>,
    pub groups: Gauge,
    pub holders: Gauge,
    pub grants: Gauge<u64, AtomicU64>,
    pub expirations: Gauge<u64, AtomicU64>,
    pub stale_token_rejections: Gauge<u64, AtomicU64>,
    pub handovers: Gauge<u64, AtomicU64>,
    pub revocations: Gauge<u64, AtomicU64>,
    pub grant_latency: Histogram,
    pub keepalives: Counter,
    pub acks_withheld: Counter,
    pub expired_replies: Counter,
    pub resumes: Counter,
    pub batched: Counter,
    pub streams_open: Gauge,
    pub lessor_late: Counter,
    pub proposal_errors: Counter,
    pub elections_stood: Counter,
    pub prevotes_lost: Counter,
    pub tls_not_after: Gauge,
    pub leader_contact_age: Gauge<f64, AtomicU64>,
    pub tls_reload_errors: Counter,
    pub tls_handshake_failures: Counter,
    pub connections_shed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("arcfed");
        let m = Metrics {
            term: Gauge::default(),
            leader: Gauge::default(),
            is_leader: Gauge::default(),
            serving: Gauge::default(),
            commit_index: Gauge::default(),
            applied_index: Gauge::default(),
            purged_index: Gauge::default(),
            quorum_contact_age_ms: Gauge::default(),
            members: Family::default(),
            groups: Gauge::default(),
            holders: Gauge::default(),
            grants: Gauge::default(),
            expirations: Gauge::default(),
            stale_token_rejections: Gauge::default(),
            handovers: Gauge::default(),
            revocations: Gauge::default(),
            grant_latency: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            keepalives: Counter::default(),
            acks_withheld: Counter::default(),
            expired_replies: Counter::default(),
            resumes: Counter::default(),
            batched: Counter::default(),
            streams_open: Gauge::default(),
            lessor_late: Counter::default(),
            proposal_errors: Counter::default(),
            elections_stood: Counter::default(),
            prevotes_lost: Counter::default(),
            tls_not_after: Gauge::default(),
            leader_contact_age: Gauge::default(),
            tls_reload_errors: Counter::default(),
            tls_handshake_failures: Counter::default(),
            connections_shed: Counter::default(),
            registry: Registry::default(),
        };
        r.register("raft_term", "Current Raft term", m.term.clone());
        r.register("raft_leader", "Node id of the known leader (0 = none)", m.leader.clone());
        r.register("raft_is_leader", "1 when this node is the Raft leader", m.is_leader.clone());
        r.register("serving", "1 when this node serves agents (leader, linearizable, promoted)", m.serving.clone());
        r.register("raft_commit_index", "Last committed log index known to this node", m.commit_index.clone());
        r.register("raft_applied_index", "Last applied log index", m.applied_index.clone());
        r.register(
            "raft_purged_index",
            "Last log index purged after a snapshot (a follower behind it needs a snapshot)",
            m.purged_index.clone(),
        );
        r.register(
            "quorum_contact_age_ms",
            "Milliseconds since the leader last heard from a quorum (-1 when not leader)",
            m.quorum_contact_age_ms.clone(),
        );
        r.register("members", "Members by status", m.members.clone());
        r.register("groups", "Federated scale sets (groups)", m.groups.clone());
        r.register("holders", "Groups that have a holder", m.holders.clone());
        r.register("replicated_grants", "Grants applied (replicated counter)", m.grants.clone());
        r.register("replicated_expirations", "Lease expirations applied (replicated counter)", m.expirations.clone());
        r.register(
            "replicated_stale_token_rejections",
            "Commands rejected for a stale fencing token (replicated counter)",
            m.stale_token_rejections.clone(),
        );
        r.register("replicated_handovers", "Handovers requested (replicated counter)", m.handovers.clone());
        r.register("replicated_revocations", "Holders revoked after an ignored handover", m.revocations.clone());
        r.register(
            "grant_latency_seconds",
            "Leader time from a group seen holderless to its Grant applied",
            m.grant_latency.clone(),
        );
        r.register(
            "keepalives",
            "Keepalives received by this leader (a resuming Join that stands for one included)",
            m.keepalives.clone(),
        );
        r.register("acks_withheld", "Keepalives not acked for lack of recent quorum contact", m.acks_withheld.clone());
        r.register("expired_replies", "EXPIRED answers to keepalives", m.expired_replies.clone());
        r.register(
            "lease_resumes",
            "Joins that re-attached to a lease this leader holds live, without a log entry",
            m.resumes.clone(),
        );
        r.register(
            "batched_proposals",
            "Proposals written as part of a multi-command log entry (group commit)",
            m.batched.clone(),
        );
        r.register("agent_streams_open", "Open agent streams on this node", m.streams_open.clone());
        r.register(
            "lessor_late_ticks",
            "Lessor ticks that fired late enough (>20ms) to extend every deadline",
            m.lessor_late.clone(),
        );
        r.register("proposal_errors", "Raft proposals that failed", m.proposal_errors.clone());
        r.register(
            "elections_stood",
            "Times this voter stood for election (--elections coordinator, after a granted pre-vote)",
            m.elections_stood.clone(),
        );
        r.register(
            "prevotes_lost",
            "Times this voter would have stood but a majority refused its pre-vote (they still heard a live leader)",
            m.prevotes_lost.clone(),
        );
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: arcfed_proto::ops::VERSION.into(),
                commit: arcfed_proto::ops::COMMIT.into(),
            })
            .set(1);
        r.register("build_info", "1, labelled with this binary's version and commit", build);
        r.register(
            "leader_contact_age_seconds",
            "Seconds since this voter was last in contact with a leader: on the serving leader the age of its quorum contact, on a follower since the leader was last heard; +Inf when it knows none. Evaluable per cluster: min() over the voters one Prometheus sees",
            m.leader_contact_age.clone(),
        );
        r.register(
            "tls_cert_not_after_seconds",
            "Expiry (Unix seconds) of the certificate this voter serves and presents now; it moves when renewed files are taken",
            m.tls_not_after.clone(),
        );
        r.register(
            "tls_reload_errors",
            "Times changed TLS files were refused (unreadable, mismatched key, another identity) and the current certificate kept",
            m.tls_reload_errors.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshakes this voter's gRPC port refused or abandoned (unknown issuer, expired, timed out)",
            m.tls_handshake_failures.clone(),
        );
        r.register(
            "grpc_connections_shed",
            "Connections closed unserved because 1024 TLS handshakes were already in progress (a flood of half-open connections)",
            m.connections_shed.clone(),
        );
        Metrics { registry: r, ..m }
    }
}
