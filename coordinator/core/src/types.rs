//! Domain types of the replicated state: what a command says and what `apply` answers.
//!
//! These are plain data (serde for the Raft log and snapshots). Conversions from and to
//! protobuf live in `grpc::convert`, never here.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;

/// A federated scale set: normalized `configure_url` + scale-set id.
///
/// Scale-set ids are tenant-local and github.com serves every tenant from one host, so the
/// id alone (or host + id) would merge unrelated scale sets.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupKey(pub String);

impl GroupKey {
    /// Host lower-cased, trailing `/` trimmed, then `#<scale set id>`.
    pub fn new(configure_url: &str, scale_set_id: i64) -> Result<GroupKey, String> {
        let url = configure_url.trim().trim_end_matches('/');
        if url.is_empty() {
            return Err("configure_url is empty".into());
        }
        if url.len() > MAX_CONFIGURE_URL {
            return Err(format!("configure_url is {} bytes long (at most {MAX_CONFIGURE_URL})", url.len()));
        }
        if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err("configure_url has a control or space character".into());
        }
        if scale_set_id <= 0 {
            return Err(format!("scale_set_id must be > 0, got {scale_set_id}"));
        }
        let (scheme, rest) = match url.split_once("://") {
            Some((s, r)) => (s.to_ascii_lowercase(), r),
            None => return Err(format!("configure_url {url:?} has no scheme (https://...)")),
        };
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if host.is_empty() {
            return Err(format!("configure_url {url:?} has no host"));
        }
        Ok(GroupKey(format!("{scheme}://{}{path}#{scale_set_id}", host.to_ascii_lowercase())))
    }
}

/// The longest `configure_url` a group key is made of (GitHub URLs are far shorter).
pub const MAX_CONFIGURE_URL: usize = 2048;

impl fmt::Display for GroupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One agent *process*: a random 128-bit value chosen at process start (hex).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MemberId(pub String);

impl MemberId {
    /// 1..=64 characters of `[0-9a-zA-Z-]`; agents use 32 hex digits.
    pub fn parse(s: &str) -> Result<MemberId, String> {
        if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(format!("member_id {s:?} must be 1-64 characters of [0-9a-zA-Z-]"));
        }
        Ok(MemberId(s.to_string()))
    }
}

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// GitHub's seven scale-set counters, kept as i64 so sums never overflow: the wire type itself.
pub use crate::github::Statistics;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobEventKind {
    Started,
    Completed,
}

/// A JobStarted/JobCompleted from GitHub, routed to the member whose ERS name prefixes
/// the runner name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    pub kind: JobEventKind,
    pub runner_name: String,
    pub runner_id: i64,
    pub job_id: String,
    pub runner_request_id: i64,
    pub repository_name: String,
    pub owner_name: String,
    pub job_workflow_ref: String,
    pub job_display_name: String,
    pub workflow_run_id: i64,
    pub result: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SplitPolicy {
    /// Weighted water-filling over the live members.
    #[default]
    Spread,
    /// Ordered overflow: fill members by priority, then cluster name.
    Prefer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReleaseReason {
    /// The (new) holder deleted predecessor sessions and keeps holding.
    StaleRevoked,
    Shutdown,
    Handover,
    /// Holder health (DESIGN §5.9): the member gets a cooldown for this group.
    Stall,
    LostLease,
    Unspecified,
}

/// What a member asks for when it joins. The cluster comes from its certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinSpec {
    pub member: MemberId,
    pub cluster: String,
    pub group: GroupKey,
    pub ers_namespace: String,
    pub ers_name: String,
    pub weight: i64,
    pub min_runners: i64,
    pub max_runners: i64,
    pub priority: i64,
    pub github_ready: bool,
    pub policy: SplitPolicy,
}

/// A Join field that is not acceptable, by its protobuf name (`join.<field>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidJoin {
    pub field: &'static str,
    pub why: &'static str,
}

impl fmt::Display for InvalidJoin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.why)
    }
}

impl std::error::Error for InvalidJoin {}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

impl JoinSpec {
    /// The input checks of a Join, run before it reaches the log (the server answers
    /// INVALID_ARGUMENT naming the field) and again by `apply`, which must stay total.
    pub fn validate(&self) -> Result<(), InvalidJoin> {
        let bad = |field, why| Err(InvalidJoin { field, why });
        if !valid_name(&self.cluster, 63) {
            return bad("join.cluster", "must be 1-63 characters of [A-Za-z0-9._-]");
        }
        // Checked again here, not only where the key is built: `apply` runs this too, so a
        // committed entry from an older version cannot bring in an unbounded key.
        if self.group.0.len() > MAX_CONFIGURE_URL + 32 || self.group.0.chars().any(|c| c.is_control()) {
            return bad("join.group", "configure_url too long or with control characters");
        }
        if !valid_name(&self.ers_namespace, 63) {
            return bad("join.ers_namespace", "must be 1-63 characters of [A-Za-z0-9._-]");
        }
        if !valid_name(&self.ers_name, 253) {
            return bad("join.ers_name", "must be 1-253 characters of [A-Za-z0-9._-]");
        }
        if self.weight < 0 {
            return bad("join.weight", "must be >= 0");
        }
        if self.min_runners < 0 {
            return bad("join.min_runners", "must be >= 0");
        }
        if self.max_runners < self.min_runners {
            return bad("join.max_runners", "must be >= min_runners");
        }
        Ok(())
    }
}

/// A state-machine command. Every entry in the Raft log is one of these plus the leader's
/// timestamp (see [`Request`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Join(JoinSpec),
    Leave {
        member: MemberId,
    },
    /// Proposed by the leader's lessor when deadlines pass.
    Expire {
        members: Vec<(MemberId, u64)>,
    },
    /// Proposed by the leader for members with no stream for TTL·(1−margin)·(1+2ρ).
    MarkSilent {
        members: Vec<(MemberId, u64)>,
    },
    /// Readiness (admin token fresh, last GET ok) changed; carried by keepalives, written only on change.
    SetReady {
        member: MemberId,
        ready: bool,
    },
    /// Proposed by the leader for a holderless group. The token is this entry's log index.
    Grant {
        group: GroupKey,
        member: MemberId,
    },
    /// Proposed by the leader when a handover deadline + TTL passed without a Release.
    Revoke {
        group: GroupKey,
        token: u64,
    },
    Progress {
        member: MemberId,
        group: GroupKey,
        token: u64,
        message_id: Option<i64>,
        statistics: Statistics,
        events: Vec<JobEvent>,
    },
    SessionOpened {
        member: MemberId,
        group: GroupKey,
        token: u64,
        session_id: String,
        statistics: Statistics,
    },
    Release {
        member: MemberId,
        group: GroupKey,
        token: u64,
        deleted: Vec<String>,
        reason: ReleaseReason,
    },
    Adopt {
        member: MemberId,
        group: GroupKey,
        session_id: String,
        statistics: Statistics,
    },
    RequestHandover {
        group: GroupKey,
        to: Option<MemberId>,
        deadline_ms: i64,
    },
    Drain {
        member: MemberId,
        handover_deadline_ms: i64,
    },
    /// An operator set the policy of which clusters may join which groups
    /// ([`crate::policy`]); it replaces the previous one.
    SetPolicy(crate::policy::Policy),
    /// The leader records its agent-facing address so followers can redirect agents to it.
    Advertise {
        node: u64,
        addr: String,
    },
    /// Proposed by the leader's lessor when [`crate::State::garbage`] finds something: vacant
    /// groups, busy runners of departed members and old stale-session ids are removed in
    /// `apply`, judged against this entry's timestamp and these thresholds.
    Collect(GcPolicy),
    /// Commands proposed concurrently, applied in order at one log index: the leader's
    /// proposer packs what queued while the previous entry was being written, so one fsync
    /// and one replication round serve them all. Each keeps its own outcome
    /// ([`Outcome::Batch`]); a Grant's token and a Join's epoch are this index, so two
    /// groups granted in one batch share a token value (tokens grow per group, which is what
    /// fencing compares). A batch inside a batch is refused.
    Batch(Vec<Command>),
}

/// The thresholds of a `Collect` (the proposing leader's `--group-gc-after` and
/// `--stale-session-ttl`), carried in the command so every voter removes the same things.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcPolicy {
    /// A group with no member record left and no leased member for this long is removed.
    pub group_gc_after_ms: i64,
    /// A stale-session id older than this is dropped: GitHub expires an orphaned session
    /// (no long poll) in about 90 s, so deleting it later would only find it gone.
    pub stale_session_ttl_ms: i64,
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Join(_) => "join",
            Command::Leave { .. } => "leave",
            Command::Expire { .. } => "expire",
            Command::MarkSilent { .. } => "mark_silent",
            Command::SetReady { .. } => "set_ready",
            Command::Grant { .. } => "grant",
            Command::Revoke { .. } => "revoke",
            Command::Progress { .. } => "progress",
            Command::SessionOpened { .. } => "session_opened",
            Command::Release { .. } => "release",
            Command::Adopt { .. } => "adopt",
            Command::RequestHandover { .. } => "request_handover",
            Command::Drain { .. } => "drain",
            Command::Advertise { .. } => "advertise",
            Command::SetPolicy(_) => "set_policy",
            Command::Collect(_) => "collect",
            Command::Batch(_) => "batch",
        }
    }
}

/// One log entry's payload: the command plus the leader's wall-clock timestamp.
/// `apply` clamps the timestamp (`max(previous, ts)`) and uses it only for display,
/// accounting and cooldowns, never for safety.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub ts_ms: i64,
    pub cmd: Command,
}

/// Side effects the leader must deliver to members after an entry is applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    /// Route a job event to the member that owns the runner.
    JobEvent { member: MemberId, group: GroupKey, event: JobEvent },
    /// The current holder must delete these sessions.
    DeleteSessions { group: GroupKey, token: u64, session_ids: Vec<String> },
}

/// What `apply` answers. Never a panic: invalid or stale input is `Rejected`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    #[default]
    None,
    Joined {
        epoch: u64,
    },
    Granted {
        token: u64,
    },
    Accepted {
        duplicate: bool,
    },
    Rejected {
        reason: RejectReason,
        detail: String,
    },
    Done,
    /// One result per command of a [`Command::Batch`], in order.
    Batch(Vec<Applied>),
}

impl Outcome {
    pub fn rejected(reason: RejectReason, detail: impl Into<String>) -> Outcome {
        Outcome::Rejected { reason, detail: detail.into() }
    }
    pub fn is_rejected(&self) -> bool {
        matches!(self, Outcome::Rejected { .. })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    StaleToken,
    UnknownMember,
    UnknownGroup,
    InvalidInput,
    NotEligible,
    Conflict,
    /// The member id belongs to another cluster (invariant 6).
    WrongCluster,
    /// The operators' policy does not let this cluster do this ([`crate::policy`]).
    Policy,
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RejectReason::StaleToken => "stale_token",
            RejectReason::UnknownMember => "unknown_member",
            RejectReason::UnknownGroup => "unknown_group",
            RejectReason::InvalidInput => "invalid_input",
            RejectReason::NotEligible => "not_eligible",
            RejectReason::Conflict => "conflict",
            RejectReason::WrongCluster => "wrong_cluster",
            RejectReason::Policy => "policy",
        })
    }
}

/// Applied result: the outcome plus effects for the leader to deliver.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub outcome: Outcome,
    pub effects: Vec<Effect>,
}

pub type SessionSet = BTreeSet<String>;

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn a_group_key_is_bounded_and_has_no_control_characters() {
        assert!(GroupKey::new("https://github.com/org", 1).is_ok());
        let long = format!("https://github.com/{}", "x".repeat(3 * 1024 * 1024));
        let e = GroupKey::new(&long, 1).expect_err("3 MB");
        assert!(e.contains("at most 2048"), "{e}");
        assert!(GroupKey::new("https://github.com/org\u{1b}[2J", 1).is_err());
        assert!(GroupKey::new("https://github.com/o rg", 1).is_err());
    }
}
