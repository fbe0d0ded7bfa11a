//! The timeline (one [`Event`] per request) and the report (docs/DESIGN.md §11). Times are
//! milliseconds on the emulator's clock, which starts at 0 when the emulator starts;
//! `started_unix_ms` converts them to wall time.

use super::faults::PathClass;
use super::model::Statistics;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How a request authenticated, as the emulator saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthKind {
    None,
    Pat,
    AppJwt,
    Installation,
    RemoteAuth,
    Admin,
    Queue,
    /// Something was presented that the emulator does not know or no longer accepts.
    Invalid,
}

/// One request as received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    /// When the request arrived.
    pub at_ms: u64,
    /// Its place in the order requests arrived in (1, 2, …): orders requests that arrived
    /// in the same millisecond.
    #[serde(default)]
    pub arrival: u64,
    /// How long the emulator took to answer (long polls included).
    pub duration_ms: u64,
    pub method: String,
    pub path: String,
    /// Decoded `key=value` pairs, sorted by key, joined with `&`.
    pub query: String,
    pub class: PathClass,
    pub auth: AuthKind,
    /// `X-ScaleSetMaxCapacity`, when sent.
    pub capacity: Option<i64>,
    pub user_agent: Option<String>,
    pub status: u16,
    pub scale_set_id: Option<i64>,
    pub session_id: Option<String>,
    pub owner: Option<String>,
    /// Made with the queue token of a session that had already closed.
    pub zombie: bool,
    /// `X-Arcfed-Owner`: the holder and fencing token the agent made this request for
    /// (`arcfed/<cluster>/<member>/t<token>`), whatever session or credential it names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// The message a 200 poll delivered, or the one an ack deletes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<i64>,
    /// Set when an injected fault answered or delayed the request.
    pub fault: Option<String>,
    /// The credential behind the request (`pat#1`, `installation:42`, `app:123`), whatever
    /// token carried it (PAT, installation, registration, admin or queue token).
    #[serde(default)]
    pub credential: Option<String>,
    /// Refused by the secondary rate limit.
    #[serde(default)]
    pub rate_limited: bool,
    /// The client's address (IP:port) as the emulator's socket saw it: tells apart listeners
    /// that share a hostname (same-named scale sets in two clusters give their listener pods
    /// one name).
    #[serde(default)]
    pub peer: Option<String>,
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// Still open.
    Open,
    /// `DELETE …/sessions/{id}`.
    Deleted,
    /// Not polled within the session TTL (abandoned).
    Expired,
    /// Evicted by `POST /_emulator/sessions/{id}/evict` (GitHub losing it server-side).
    Evicted,
    /// Its scale set was deleted.
    ScaleSetDeleted,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionReport {
    pub session_id: String,
    pub owner: String,
    /// The credential that opened it (`pat#1`, `installation:42`).
    pub credential: String,
    pub opened_at: u64,
    pub closed_at: Option<u64>,
    pub close_reason: CloseReason,
    /// First and last holder-only request attributed to this session (open/delete session,
    /// poll, ack, acquire), zombie requests included.
    pub first_holder_request_at: u64,
    pub last_holder_request_at: u64,
    /// The arrival numbers ([`Event::arrival`]) of those two requests: they order this
    /// session's activity against another's within one millisecond.
    #[serde(default)]
    pub first_holder_arrival: u64,
    #[serde(default)]
    pub last_holder_arrival: u64,
    pub polls: u64,
    pub zombie_requests: u64,
    /// Successful `PATCH …/sessions/{id}`.
    #[serde(default)]
    pub refreshes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScaleSetReport {
    pub id: i64,
    pub name: String,
    pub runner_group_id: i64,
    pub deleted: bool,
    /// Most sessions whose holder-only activity overlapped in time. The service never has
    /// more than one *open* session, so above 1 means a closed session's holder kept acting
    /// (zombie requests) after its successor started.
    pub max_concurrent_sessions: u64,
    pub conflicts_409: u64,
    /// Time since the first session opened during which no session was open.
    pub no_session_ms: u64,
    pub messages_delivered: u64,
    pub messages_deleted: u64,
    /// Deliveries of a message id that had been delivered before (to any session).
    pub messages_redelivered: u64,
    /// Job ids in `acquirejobs` requests that had already been acquired.
    pub acquire_repeats: u64,
    /// Jobs returned as acquired by more than one successful `acquirejobs` response.
    pub jobs_acquired_twice: u64,
    /// Requests made with the queue token of a closed session.
    pub zombie_requests: u64,
    /// Requests sent for fencing token T (`X-Arcfed-Owner: …/t<T>`) that arrived after the
    /// first request sent for a higher token: a holder acting after its fence ended (DESIGN
    /// §6 invariant 1, attributed to the sender, not to the session a path names).
    #[serde(default)]
    pub late_requests: u64,
    /// The first few late requests, each as `t<T> <METHOD> <path> at <ms> (t<T'> first at <ms>)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub late_request_examples: Vec<String>,
    /// Σ over consecutive sessions of max(0, last holder-only request of the predecessor −
    /// first holder-only request of the successor) (docs/DESIGN.md §11).
    pub sessions_overlap_ms: u64,
    pub jobs_enqueued: u64,
    pub jobs_completed: u64,
    /// Assigned jobs cancelled because no runner started them in `assign_timeout`.
    #[serde(default)]
    pub jobs_cancelled: u64,
    /// Of those, the ones offered again.
    #[serde(default)]
    pub jobs_reassigned: u64,
    /// Jobs enqueued and not yet finished: queued, available (not acquired), assigned or
    /// running. Once the workload stops and the runners drain, this must reach 0: a job
    /// that stays is one the listener lost (e.g. a `JobAvailable` acked without an acquire).
    #[serde(default)]
    pub jobs_unfinished: u64,
    /// Of those, the ones offered as `JobAvailable` and never acquired.
    #[serde(default)]
    pub jobs_available_unacquired: u64,
    /// The unfinished jobs (at most 20), each as `<job id>: <state> since <ms>`: what a
    /// failed "every job ran" check reads to tell a lost message from a runner that never came.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unfinished_jobs: Vec<String>,
    /// Successful session refreshes on this scale set.
    #[serde(default)]
    pub session_refreshes: u64,
    pub statistics: Statistics,
    pub sessions: Vec<SessionReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub started_unix_ms: u64,
    pub now_ms: u64,
    pub requests: u64,
    /// Requests (recorded ones) per credential.
    #[serde(default)]
    pub requests_by_credential: BTreeMap<String, u64>,
    /// Requests refused by the secondary rate limit, per credential.
    #[serde(default)]
    pub rate_limited_by_credential: BTreeMap<String, u64>,
    #[serde(default)]
    pub rate_limited_requests: u64,
    /// Injected faults that fired, by kind (`status`, `empty_body`, `latency`, `reset`, `hang`).
    #[serde(default)]
    pub faults_fired: BTreeMap<String, u64>,
    pub scale_sets: Vec<ScaleSetReport>,
}

impl Report {
    pub fn scale_set(&self, id: i64) -> Option<&ScaleSetReport> {
        self.scale_sets.iter().find(|s| s.id == id)
    }
}

/// One request sent for a fencing token: (arrival ms, arrival number, "METHOD path").
pub type TokenRequest = (u64, u64, String);

/// The fencing token in an `X-Arcfed-Owner` value `arcfed/<cluster>/<member>/t<token>`;
/// `None` for anything else (a fallback holder's local `…/f<n>` is not a quorum token).
pub fn sender_token(sender: &str) -> Option<u64> {
    let last = sender.rsplit('/').next()?;
    last.strip_prefix('t')?.parse().ok()
}

/// Late requests: those of token T that arrived (by arrival order) after the first request of
/// any higher token. Returns the count and up to `examples` descriptions.
pub fn late_requests(by_token: &BTreeMap<u64, Vec<TokenRequest>>, examples: usize) -> (u64, Vec<String>) {
    // first arrival of every token, then the earliest first arrival among higher tokens.
    let firsts: Vec<(u64, (u64, u64))> = by_token
        .iter()
        .filter_map(|(t, reqs)| reqs.iter().map(|(ms, n, _)| (*n, *ms)).min().map(|(n, ms)| (*t, (n, ms))))
        .collect();
    let mut count = 0;
    let mut out = Vec::new();
    for (i, (t, _)) in firsts.iter().enumerate() {
        let Some((t2, (n2, ms2))) = firsts[i + 1..].iter().min_by_key(|(_, (n, _))| *n).copied() else { continue };
        for (ms, n, what) in &by_token[t] {
            if *n > n2 {
                count += 1;
                if out.len() < examples {
                    out.push(format!("t{t} {what} at {ms} ms (t{t2} first at {ms2} ms)"));
                }
            }
        }
    }
    (count, out)
}

/// docs/DESIGN.md §11's overlap over sessions in opening order.
pub fn overlap_ms(sessions: &[SessionReport]) -> u64 {
    sessions.windows(2).map(|w| w[0].last_holder_request_at.saturating_sub(w[1].first_holder_request_at)).sum()
}

/// The most holder-activity intervals `[first, last]` that cover one instant. Requests are
/// placed by arrival time, then by arrival order, so two sessions whose activity shares a
/// millisecond are concurrent only if their requests interleave: a successor that deletes
/// the orphan and then opens its own session in the same millisecond is not, a zombie poll
/// that arrives after the successor's open is.
pub fn max_concurrent(sessions: &[SessionReport]) -> u64 {
    // At one (time, arrival) a start sorts before an end: that is one request opening and
    // closing the same session's activity.
    let mut edges: Vec<(u64, u64, i64)> = sessions
        .iter()
        .flat_map(|s| {
            [
                (s.first_holder_request_at, s.first_holder_arrival, 1),
                (s.last_holder_request_at, s.last_holder_arrival, -1),
            ]
        })
        .collect();
    edges.sort_by_key(|&(t, n, d)| (t, n, -d));
    let (mut cur, mut max) = (0i64, 0i64);
    for (_, _, d) in edges {
        cur += d;
        max = max.max(cur);
    }
    max as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(first: u64, last: u64) -> SessionReport {
        SessionReport {
            session_id: String::new(),
            owner: String::new(),
            credential: String::new(),
            opened_at: first,
            closed_at: None,
            close_reason: CloseReason::Open,
            first_holder_request_at: first,
            last_holder_request_at: last,
            first_holder_arrival: 0,
            last_holder_arrival: 0,
            polls: 0,
            zombie_requests: 0,
            refreshes: 0,
        }
    }

    #[test]
    fn overlap_sums_only_positive_takeovers() {
        // clean handover, then a zombie predecessor acting 300 ms into its successor
        let ss = [s(0, 100), s(200, 1000), s(700, 900)];
        assert_eq!(overlap_ms(&ss), 300);
        assert_eq!(max_concurrent(&ss), 2);
        assert_eq!(max_concurrent(&ss[..2]), 1);
    }

    fn at(first: (u64, u64), last: (u64, u64)) -> SessionReport {
        SessionReport { first_holder_arrival: first.1, last_holder_arrival: last.1, ..s(first.0, last.0) }
    }

    #[test]
    fn activity_within_one_millisecond_is_ordered_by_arrival() {
        // The successor deletes the orphan (arrival 7), then opens its own session (arrival 8),
        // all in millisecond 500: one after the other.
        let handover = [at((0, 1), (500, 7)), at((500, 8), (900, 20))];
        assert_eq!(max_concurrent(&handover), 1);
        assert_eq!(overlap_ms(&handover), 0);
        // A zombie poll that arrives after the successor's open in the same millisecond
        // acted while the successor held: two at once, though no millisecond overlaps.
        let zombie = [at((0, 1), (500, 9)), at((500, 8), (900, 20))];
        assert_eq!(max_concurrent(&zombie), 2);
        assert_eq!(overlap_ms(&zombie), 0);
        // A session of a single request is one interval, not a start after its own end.
        assert_eq!(max_concurrent(&[at((300, 4), (300, 4))]), 1);
    }

    #[test]
    fn a_request_of_an_older_token_after_a_newer_tokens_first_is_late() {
        assert_eq!(sender_token("arcfed/a/0f/t12"), Some(12));
        assert_eq!(sender_token("arcfed/a/0f/f3"), None, "a fallback's local counter is no token");
        assert_eq!(sender_token("arcfed/a/0f/tx"), None);
        let req = |ms: u64, n: u64, what: &str| (ms, n, what.to_string());
        let mut by: BTreeMap<u64, Vec<TokenRequest>> = BTreeMap::new();
        // t5's long poll arrived before t6's first request and ended after it: not late.
        by.insert(5, vec![req(100, 1, "POST /sessions"), req(200, 2, "GET /message")]);
        by.insert(6, vec![req(300, 3, "DELETE /sessions/s5"), req(310, 4, "POST /sessions")]);
        assert_eq!(late_requests(&by, 10), (0, vec![]));
        // t5's ack reaching GitHub after t6's revoke: late, whatever session it names.
        by.get_mut(&5).expect("t5").push(req(305, 5, "DELETE /messages/9"));
        // t4 acting after t6 (t5 came between) is late too, and counted against the earliest higher first.
        by.insert(4, vec![req(50, 0, "POST /sessions"), req(400, 6, "POST /acquirejobs")]);
        let (n, ex) = late_requests(&by, 1);
        assert_eq!(n, 2);
        assert_eq!(ex, vec!["t4 POST /acquirejobs at 400 ms (t5 first at 100 ms)".to_string()]);
    }
}
