//! The coordinator link (DESIGN §4, agent side), as a pure state machine.
//!
//! ```text
//!   Down ──Connect{addr}──▶ Connecting ──Connected──▶ Joining ──Joined{epoch,ttl}──▶ Up
//!    ▲                                                                               │
//!    └──── StreamFailed{redirect?} / no ack for 1.5 keepalive periods / Expired ─────┘
//! ```
//! Up, it sends a keepalive every TTL/4 with a sequence number and remembers when each was
//! sent. An ack echoes the sequence number and lists the (group, token) pairs held; the fence
//! for (G, T) then ends at `sent_at(k) + TTL × (1 − margin)` for the latest such k
//! ([`arcfed_core::fence`], the formula the coordinator's lessor uses too). A closed stream ends
//! every fence at once. A follower's redirect is followed at once; other failures rotate
//! through the endpoints with a short, jittered backoff, so a new leader is found within a few
//! hundred milliseconds of its promotion.
//!
//! `now` is milliseconds of `CLOCK_BOOTTIME`, passed in by the driver.

use arcfed_core::fence;
use std::collections::{BTreeMap, VecDeque};

/// Settings known before the first Join. The coordinator's `Joined` overrides TTL and margin.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    pub endpoints: Vec<String>,
    /// TTL assumed until `Joined` names the coordinator's (for the keepalive cadence only).
    pub initial_ttl_ms: u64,
    /// A connect + Join that takes longer than this is abandoned (a frozen coordinator
    /// accepts TCP but never answers).
    pub attach_timeout_ms: u64,
    /// Seed of the backoff jitter (pure: no randomness is read here).
    pub seed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not connected; the next attempt is at `retry_at`.
    Down { retry_at: u64 },
    /// A stream to `addr` is being opened (and the Join sent).
    Attaching { addr: String, since: u64 },
    /// Joined with lease epoch `epoch`.
    Up { addr: String, epoch: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// Time passed.
    Tick,
    /// The coordinator answered the Join. `ack`: the Join re-attached to the live lease and
    /// is acked as the keepalive it stood for (seq, held pairs), as an `Ack` would be.
    Joined { epoch: u64, ttl_ms: u64, margin_permille: u64, ack: Option<(u64, Vec<(String, u64)>)> },
    /// An ack of keepalive `seq`, listing the (group key, token) pairs this member holds.
    Ack { seq: u64, held: Vec<(String, u64)> },
    /// A Grant that doubles as the ack of keepalive `seq` (DESIGN §4).
    GrantAck { seq: u64, held: Vec<(String, u64)> },
    /// The lease is gone: Join again for a new epoch (DESIGN §4 "No renewal past death").
    Expired,
    /// The stream ended or could not be opened. `redirect`: a follower named the leader.
    StreamFailed { redirect: Option<String> },
    /// Nothing answered at the address being attached to (no TCP or TLS connection). A
    /// redirect target that does not answer is a dead leader a follower still names: it is
    /// passed over for a TTL. Otherwise as `StreamFailed` without a redirect.
    Unreachable,
    /// Send a keepalive now instead of at the next TTL/4 tick (fence (c) of DESIGN §5.2).
    KeepaliveNow,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkAction {
    /// Open a stream to `addr` and send a Join on it. `keepalive_seq` (0: none) goes in the
    /// Join with the lease epoch to resume: the Join stands for that keepalive, sent now.
    Attach {
        addr: String,
        keepalive_seq: u64,
    },
    /// Send a Join on the open stream (after `Expired`).
    SendJoin,
    SendKeepalive {
        seq: u64,
    },
    /// Close the current stream (no ack in time, attach timed out).
    Close {
        reason: &'static str,
    },
}

/// What the holder may rely on for one group, at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FenceView {
    /// No coordinator at all (standalone or fallback): GitHub's one-session rule is the mutex.
    pub open: bool,
    /// The token the latest ack lists for the group.
    pub token: Option<u64>,
    /// End of the fence for `token` (BOOTTIME ms); `None` when the stream is down.
    pub fence_end: Option<u64>,
    /// When the latest keepalive whose ack lists (group, token) was sent.
    pub listed_sent_at: Option<u64>,
    /// The sequence number of that keepalive.
    pub listed_seq: Option<u64>,
    /// The sequence number of the latest keepalive sent on this link (fence (c) compares
    /// sequence numbers, not clock readings: two events in one millisecond stay ordered).
    pub sent_seq: u64,
}

impl FenceView {
    /// The fence of standalone and fallback mode: nothing to ask.
    pub fn open() -> FenceView {
        FenceView { open: true, ..FenceView::default() }
    }

    /// May a holder-only request for `token` be sent at `now`?
    pub fn allows(&self, token: u64, now: u64) -> bool {
        self.open || (self.token == Some(token) && self.fence_end.is_some_and(|e| now < e))
    }

    /// Has an ack listing `token` arrived for a keepalive sent after keepalive `seq`, that is,
    /// after a decision taken when `seq` was the latest sent? (fence (c))
    pub fn listed_after(&self, token: u64, seq: u64) -> bool {
        self.open || (self.token == Some(token) && self.listed_seq.is_some_and(|s| s > seq))
    }
}

#[derive(Clone, Debug)]
struct Held {
    token: u64,
    /// Sent-at and sequence number of the latest keepalive whose ack listed this (group, token).
    listed_sent_at: u64,
    listed_seq: u64,
}

#[derive(Clone, Debug)]
pub struct Link {
    cfg: LinkConfig,
    pub phase: Phase,
    next_endpoint: usize,
    redirect: Option<String>,
    /// Addresses passed over until a time: the endpoint whose established stream failed, and
    /// a redirect target that could not be attached to. After a leader dies, followers still
    /// name it (by its advertised address, which may differ from the endpoint dialled) until
    /// they elect another, and each attempt on it only costs the holder time inside its
    /// fence. Each is passed over for one TTL at most.
    lost: Vec<(String, u64)>,
    /// The redirect target being attached to, if the current attempt follows one.
    following: Option<String>,
    failures: u32,
    ttl_ms: u64,
    margin_permille: u64,
    seq: u64,
    /// Keepalives sent and not yet acked: (seq, sent_at). Bounded.
    sent: VecDeque<(u64, u64)>,
    next_keepalive_at: u64,
    held: BTreeMap<String, Held>,
    /// Since when no stream has been up (for `coordinator_lost_for`).
    down_since: Option<u64>,
    rng: u64,
    /// Epoch of the lease this process holds: set by `Joined` on any stream, cleared by
    /// EXPIRED (a re-Join then gets a new one). A Join names it to re-attach to it.
    pub epoch: Option<u64>,
}

/// Keepalives remembered while unacked. Acks for older ones prove nothing we still need.
const SENT_WINDOW: usize = 64;

impl Link {
    pub fn new(cfg: LinkConfig, now: u64) -> Link {
        let ttl = cfg.initial_ttl_ms.max(40);
        let rng = cfg.seed | 1;
        Link {
            cfg,
            phase: Phase::Down { retry_at: now },
            next_endpoint: 0,
            redirect: None,
            lost: Vec::new(),
            following: None,
            failures: 0,
            ttl_ms: ttl,
            margin_permille: 333,
            seq: 0,
            sent: VecDeque::new(),
            next_keepalive_at: now,
            held: BTreeMap::new(),
            down_since: Some(now),
            rng,
            epoch: None,
        }
    }

    pub fn ttl_ms(&self) -> u64 {
        self.ttl_ms
    }

    pub fn keepalive_interval_ms(&self) -> u64 {
        (self.ttl_ms / 4).max(10)
    }

    /// An unacked keepalive older than this closes the stream: the fence is TTL×(1−margin)
    /// and a keepalive goes out every TTL/4, so 1.5 periods leaves room to find another
    /// leader before a healthy holder's fence ends.
    pub fn no_ack_timeout_ms(&self) -> u64 {
        self.keepalive_interval_ms() * 3 / 2
    }

    pub fn is_up(&self) -> bool {
        matches!(self.phase, Phase::Up { .. })
    }

    /// How long no stream has been up, if none is.
    pub fn down_for(&self, now: u64) -> Option<u64> {
        self.down_since.map(|s| now.saturating_sub(s))
    }

    /// The holder's view of `group` at `now`.
    pub fn fence(&self, group: &str) -> FenceView {
        let Some(h) = self.held.get(group) else { return FenceView { sent_seq: self.seq, ..FenceView::default() } };
        let up = self.is_up();
        FenceView {
            open: false,
            token: Some(h.token),
            fence_end: up.then(|| fence::fence_end(h.listed_sent_at, self.ttl_ms, self.margin_permille)),
            listed_sent_at: Some(h.listed_sent_at),
            listed_seq: Some(h.listed_seq),
            sent_seq: self.seq,
        }
    }

    /// When the driver must call `step(Tick)` at the latest.
    pub fn next_wakeup(&self) -> u64 {
        match &self.phase {
            Phase::Down { retry_at } => *retry_at,
            Phase::Attaching { since, .. } => since.saturating_add(self.cfg.attach_timeout_ms),
            Phase::Up { .. } => {
                let no_ack = self.sent.front().map(|(_, t)| t + self.no_ack_timeout_ms()).unwrap_or(u64::MAX);
                self.next_keepalive_at.min(no_ack)
            }
        }
    }

    fn jitter(&mut self, max: u64) -> u64 {
        // xorshift64: deterministic for a seed, good enough to spread reconnects.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        if max == 0 { 0 } else { self.rng % max }
    }

    /// The longest pause between attach attempts now (see `go_down`).
    pub fn retry_cap_ms(&self, now: u64) -> u64 {
        let down = self.down_since.map_or(0, |d| now.saturating_sub(d));
        // After the first TTL, TTL/4: a returning quorum holds Grants for one TTL after its
        // promotion so that a fallback holder can Adopt its session first (DESIGN §5.11), so
        // every agent must attach well within a TTL of the leader serving again.
        if down < self.ttl_ms { (self.ttl_ms / 20).max(20) } else { (self.ttl_ms / 4).max(100) }
    }

    /// Whether `addr` is the endpoint whose stream just failed, still passed over at `now`.
    fn passed_over(&self, addr: &str, now: u64) -> bool {
        self.lost.iter().any(|(a, until)| a == addr && now < *until)
    }

    fn go_down(&mut self, now: u64, immediate: bool) {
        self.sent.clear();
        if self.down_since.is_none() {
            self.down_since = Some(now);
        }
        let delay = if immediate {
            0
        } else {
            // 50 ms, 100 ms, … with up to 50 % jitter, never above `retry_cap_ms`: while the
            // fence could still be saved (the first TTL without a stream) the agent retries at
            // least every TTL/20 (150 ms on LAN, the coordinator's --agent-retry-max), so it
            // attaches to a new leader right after its promotion; after that a dead quorum is
            // tried every TTL/4 at most.
            let cap = self.retry_cap_ms(now);
            let base = 50u64.saturating_mul(1 << self.failures.min(6)).min(cap * 2 / 3).max(1);
            (base + self.jitter(base / 2 + 1)).min(cap)
        };
        self.failures = self.failures.saturating_add(1);
        self.phase = Phase::Down { retry_at: now.saturating_add(delay) };
    }

    /// Numbers a keepalive sent at `now` and remembers it until acked.
    fn next_seq(&mut self, now: u64) -> u64 {
        self.seq += 1;
        self.sent.push_back((self.seq, now));
        if self.sent.len() > SENT_WINDOW {
            self.sent.pop_front();
        }
        self.seq
    }

    fn record_ack(&mut self, seq: u64, held: Vec<(String, u64)>) {
        // An ack for a keepalive this stream never sent (or one already superseded) proves nothing.
        let Some(pos) = self.sent.iter().position(|(s, _)| *s == seq) else { return };
        let sent_at = self.sent[pos].1;
        self.sent.drain(..=pos);
        let listed: BTreeMap<String, u64> = held.into_iter().collect();
        // A group no longer listed is no longer held: its fence ends now.
        self.held.retain(|g, _| listed.contains_key(g));
        for (g, token) in listed {
            match self.held.get_mut(&g) {
                Some(h) if h.token == token => {
                    h.listed_sent_at = h.listed_sent_at.max(sent_at);
                    h.listed_seq = h.listed_seq.max(seq);
                }
                Some(h) if h.token > token => {} // an older token never comes back
                _ => {
                    self.held.insert(g, Held { token, listed_sent_at: sent_at, listed_seq: seq });
                }
            }
        }
        self.failures = 0;
    }

    pub fn step(&mut self, now: u64, ev: LinkEvent) -> Vec<LinkAction> {
        let mut out = Vec::new();
        match ev {
            LinkEvent::Tick | LinkEvent::KeepaliveNow => {
                if ev == LinkEvent::KeepaliveNow && self.is_up() {
                    self.next_keepalive_at = now;
                }
            }
            LinkEvent::Joined { epoch, ttl_ms, margin_permille, ack } => {
                if let Phase::Attaching { addr, .. } | Phase::Up { addr, .. } = &self.phase {
                    let addr = addr.clone();
                    // A re-Join after a stream gap keeps the member's holding (the coordinator
                    // decides: its next ack lists the group, or no longer does and the holding
                    // ends). The fence from the last listing ack still bounds any action, and
                    // a lease that expired in between had already outlived that fence. Only
                    // EXPIRED clears holdings (no renewal past death).
                    self.epoch = Some(epoch);
                    self.ttl_ms = ttl_ms.max(40);
                    self.margin_permille = margin_permille.min(999);
                    self.phase = Phase::Up { addr, epoch };
                    self.down_since = None;
                    match ack {
                        // The Join was a keepalive, and acked: the next one is due in one interval.
                        Some((seq, held)) if self.sent.iter().any(|(s, _)| *s == seq) => {
                            self.record_ack(seq, held);
                            self.next_keepalive_at = now.saturating_add(self.keepalive_interval_ms());
                        }
                        // Not acked (a new epoch, or no quorum contact), or an ack of a seq
                        // this stream never sent: a keepalive now.
                        _ => {
                            self.sent.clear();
                            self.next_keepalive_at = now;
                        }
                    }
                }
            }
            LinkEvent::Ack { seq, held } | LinkEvent::GrantAck { seq, held } => {
                if self.is_up() {
                    self.record_ack(seq, held);
                }
            }
            LinkEvent::Expired => {
                // No renewal past death: drop every holding and the lease, Join again on
                // this stream for a new epoch.
                self.held.clear();
                self.epoch = None;
                self.sent.clear();
                if let Phase::Up { addr, .. } = &self.phase {
                    self.phase = Phase::Attaching { addr: addr.clone(), since: now };
                    out.push(LinkAction::SendJoin);
                }
            }
            LinkEvent::Unreachable => {
                let until = now.saturating_add(self.ttl_ms);
                if let (Phase::Attaching { addr, .. }, Some(f)) = (&self.phase, self.following.take())
                    && *addr == f
                {
                    self.lost.retain(|(_, u)| now < *u);
                    self.lost.push((f, until));
                    self.lost.truncate(8);
                }
                return self.step(now, LinkEvent::StreamFailed { redirect: None });
            }
            LinkEvent::StreamFailed { redirect } => {
                let until = now.saturating_add(self.ttl_ms);
                self.lost.retain(|(_, u)| now < *u);
                if let Phase::Up { addr, .. } = &self.phase {
                    self.lost.push((addr.clone(), until));
                }
                self.following = None;
                self.lost.truncate(8);
                // A redirect to the endpoint that just failed names a dead leader: go on.
                let redirect = redirect.filter(|r| !self.passed_over(r, now));
                let follow = redirect.is_some();
                self.redirect = redirect;
                if !follow {
                    self.next_endpoint = self.next_endpoint.wrapping_add(1);
                }
                self.go_down(now, follow && self.failures < 3);
            }
        }
        // Timers. A second round lets a close be followed by the next attach in one step.
        for _ in 0..2 {
            let before = self.phase.clone();
            match self.phase.clone() {
                Phase::Down { retry_at } if now >= retry_at => {
                    let addr = match self.redirect.take() {
                        Some(a) => {
                            self.following = Some(a.clone());
                            a
                        }
                        None if self.cfg.endpoints.is_empty() => break,
                        None => {
                            let n = self.cfg.endpoints.len();
                            if n > 1 && self.passed_over(&self.cfg.endpoints[self.next_endpoint % n], now) {
                                self.next_endpoint = self.next_endpoint.wrapping_add(1);
                            }
                            self.cfg.endpoints[self.next_endpoint % n].clone()
                        }
                    };
                    self.phase = Phase::Attaching { addr: addr.clone(), since: now };
                    // A Join that resumes the lease stands for a keepalive sent now; a new
                    // lease (no epoch) starts with Joined.
                    let keepalive_seq = match self.epoch {
                        Some(_) => self.next_seq(now),
                        None => 0,
                    };
                    out.push(LinkAction::Attach { addr, keepalive_seq });
                }
                Phase::Attaching { since, .. } if now >= since.saturating_add(self.cfg.attach_timeout_ms) => {
                    out.push(LinkAction::Close { reason: "attach timed out" });
                    self.next_endpoint = self.next_endpoint.wrapping_add(1);
                    self.go_down(now, true);
                }
                Phase::Up { .. } => {
                    if self.sent.front().is_some_and(|(_, t)| now >= t + self.no_ack_timeout_ms()) {
                        out.push(LinkAction::Close { reason: "no ack in time" });
                        self.next_endpoint = self.next_endpoint.wrapping_add(1);
                        self.go_down(now, true);
                    } else if now >= self.next_keepalive_at {
                        let seq = self.next_seq(now);
                        self.next_keepalive_at = now + self.keepalive_interval_ms();
                        out.push(LinkAction::SendKeepalive { seq });
                    }
                }
                _ => {}
            }
            if self.phase == before {
                break;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> Link {
        Link::new(
            LinkConfig {
                endpoints: vec!["a:1".into(), "b:1".into(), "c:1".into()],
                initial_ttl_ms: 3000,
                attach_timeout_ms: 1000,
                seed: 7,
            },
            0,
        )
    }

    /// Attaches and Joins at `now`; the first keepalive (seq 1) goes out with the Join's answer.
    fn up(l: &mut Link, now: u64) {
        let a = l.step(now, LinkEvent::Tick);
        assert!(matches!(a.as_slice(), [LinkAction::Attach { .. }]), "{a:?}");
        let a = l.step(now, LinkEvent::Joined { epoch: 1, ttl_ms: 3000, margin_permille: 333, ack: None });
        assert_eq!(a, vec![LinkAction::SendKeepalive { seq: 1 }]);
    }

    #[test]
    fn fence_runs_from_the_send_time_of_the_acked_keepalive() {
        let mut l = link();
        up(&mut l, 100);
        assert!(l.step(200, LinkEvent::Tick).is_empty());
        l.step(150, LinkEvent::Ack { seq: 1, held: vec![("g".into(), 9)] });
        let f = l.fence("g");
        assert_eq!(f.token, Some(9));
        assert_eq!(f.fence_end, Some(100 + 2001));
        assert!(f.allows(9, 2100) && !f.allows(9, 2101) && !f.allows(8, 200));
        assert!(f.listed_after(9, 0) && !f.listed_after(9, 1));
        assert_eq!(f.sent_seq, 1);
        assert_eq!(l.step(850, LinkEvent::Tick), vec![LinkAction::SendKeepalive { seq: 2 }]);
    }

    #[test]
    fn closed_stream_ends_the_fence_at_once_and_redirect_is_followed() {
        let mut l = link();
        up(&mut l, 0);
        l.step(10, LinkEvent::Ack { seq: 1, held: vec![("g".into(), 3)] });
        let a = l.step(20, LinkEvent::StreamFailed { redirect: Some("leader:9".into()) });
        // The Join that resumes lease 1 stands for keepalive 2.
        assert_eq!(a, vec![LinkAction::Attach { addr: "leader:9".into(), keepalive_seq: 2 }]);
        assert_eq!(l.fence("g").fence_end, None);
        assert!(!l.fence("g").allows(3, 21));
        assert_eq!(l.fence("g").token, Some(3), "a gap keeps the holding; only the fence ends");
    }

    #[test]
    fn a_resuming_join_is_a_keepalive_whose_ack_runs_the_fence_from_the_attach() {
        let mut l = link();
        up(&mut l, 0);
        l.step(10, LinkEvent::Ack { seq: 1, held: vec![("g".into(), 3)] });
        assert_eq!(l.fence("g").fence_end, Some(2001));
        let a = l.step(500, LinkEvent::StreamFailed { redirect: Some("leader:9".into()) });
        assert_eq!(a, vec![LinkAction::Attach { addr: "leader:9".into(), keepalive_seq: 2 }]);
        // The new leader resumed the lease and acked the Join as keepalive 2: the fence runs
        // from the attach (500), and no extra keepalive follows the Joined.
        let ack = Some((2, vec![("g".to_string(), 3)]));
        let a = l.step(600, LinkEvent::Joined { epoch: 1, ttl_ms: 3000, margin_permille: 333, ack });
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(l.fence("g").fence_end, Some(500 + 2001));
        assert!(l.fence("g").allows(3, 2500));
        assert!(l.step(1349, LinkEvent::Tick).is_empty());
        assert_eq!(l.step(1350, LinkEvent::Tick), vec![LinkAction::SendKeepalive { seq: 3 }]);

        // A resume the leader did not ack (a new epoch through the log, or no quorum contact)
        // is followed by a keepalive at once, and the Join's seq is forgotten: a late ack
        // naming it proves nothing.
        let a = l.step(1400, LinkEvent::StreamFailed { redirect: Some("other:9".into()) });
        assert_eq!(a, vec![LinkAction::Attach { addr: "other:9".into(), keepalive_seq: 4 }]);
        let a = l.step(1450, LinkEvent::Joined { epoch: 7, ttl_ms: 3000, margin_permille: 333, ack: None });
        assert_eq!(a, vec![LinkAction::SendKeepalive { seq: 5 }]);
        l.step(1460, LinkEvent::Ack { seq: 4, held: vec![("g".into(), 3)] });
        assert_eq!(l.fence("g").fence_end, Some(500 + 2001), "an ack of the unacked Join's seq moves nothing");
        l.step(1470, LinkEvent::Ack { seq: 5, held: vec![("g".into(), 3)] });
        assert_eq!(l.fence("g").fence_end, Some(1450 + 2001));

        // After EXPIRED there is no lease to resume: the next attach names no keepalive.
        l.step(1500, LinkEvent::Expired);
        l.step(1510, LinkEvent::StreamFailed { redirect: None });
        let a = l.step(5000, LinkEvent::Tick);
        assert!(a.iter().any(|x| matches!(x, LinkAction::Attach { keepalive_seq: 0, .. })), "{a:?}");
    }

    #[test]
    fn no_ack_rotates_endpoints_before_the_fence_ends() {
        let mut l = link();
        up(&mut l, 0); // ka 1 at 0
        l.step(5, LinkEvent::Ack { seq: 1, held: vec![("g".into(), 3)] });
        assert_eq!(l.step(750, LinkEvent::Tick), vec![LinkAction::SendKeepalive { seq: 2 }]); // never acked
        let at = 750 + l.no_ack_timeout_ms();
        assert!(at < l.fence("g").fence_end.unwrap_or(0) + 750);
        let a = l.step(at, LinkEvent::Tick);
        assert!(a.contains(&LinkAction::Close { reason: "no ack in time" }), "{a:?}");
        assert!(a.iter().any(|x| matches!(x, LinkAction::Attach { addr, .. } if addr == "b:1")), "{a:?}");
    }

    #[test]
    fn retries_stay_fast_for_a_ttl_then_back_off() {
        let mut l = link();
        up(&mut l, 0);
        let mut now = 100;
        let mut gaps = vec![];
        l.step(now, LinkEvent::StreamFailed { redirect: None });
        for _ in 0..40 {
            let Phase::Down { retry_at } = l.phase.clone() else {
                l.step(now, LinkEvent::StreamFailed { redirect: None });
                continue;
            };
            gaps.push((now, retry_at - now));
            now = retry_at;
            l.step(now, LinkEvent::Tick); // attach
            l.step(now, LinkEvent::StreamFailed { redirect: None }); // refused: no leader yet
        }
        assert!(gaps.iter().filter(|(t, _)| *t < 3000).all(|(_, g)| *g <= 150), "{gaps:?}");
        assert!(gaps.iter().any(|(t, g)| *t >= 3100 && *g > 150), "backs off after a TTL: {gaps:?}");
        assert!(gaps.iter().all(|(_, g)| *g <= 750), "never slower than TTL/4: {gaps:?}");
    }

    #[test]
    fn after_a_leader_dies_its_endpoint_and_stale_redirects_to_it_are_passed_over_for_a_ttl() {
        let mut l = link();
        up(&mut l, 0);
        let Phase::Up { addr: dead, .. } = l.phase.clone() else { panic!("up") };
        l.step(100, LinkEvent::StreamFailed { redirect: None });
        let mut now = 100;
        let mut tried = vec![];
        for _ in 0..12 {
            let Phase::Down { retry_at } = l.phase.clone() else { panic!("down: {:?}", l.phase) };
            now = retry_at;
            for a in l.step(now, LinkEvent::Tick) {
                if let LinkAction::Attach { addr, .. } = a {
                    tried.push(addr);
                }
            }
            // A follower that has not seen the election yet still names the dead leader.
            l.step(now, LinkEvent::StreamFailed { redirect: Some(dead.clone()) });
        }
        assert!(now < 3000, "all within one TTL: {now}");
        assert!(!tried.contains(&dead), "the dead endpoint was tried again: {tried:?}");
        assert!(tried.len() == 12 && tried.iter().collect::<std::collections::BTreeSet<_>>().len() == 2, "{tried:?}");
        // After a TTL it is an endpoint like any other again.
        let mut later = vec![];
        for _ in 0..40 {
            if let Phase::Down { retry_at } = l.phase.clone() {
                now = retry_at.max(now);
            }
            for a in l.step(now, LinkEvent::Tick) {
                if let LinkAction::Attach { addr, .. } = a {
                    later.push(addr);
                }
            }
            l.step(now, LinkEvent::StreamFailed { redirect: None });
            now += 1;
        }
        assert!(later.contains(&dead), "{later:?}");
    }

    #[test]
    fn a_redirect_target_that_cannot_be_attached_to_is_passed_over_for_a_ttl() {
        let mut l = link();
        up(&mut l, 0);
        l.step(100, LinkEvent::StreamFailed { redirect: None });
        let mut tried = vec![];
        for _ in 0..10 {
            let Phase::Down { retry_at } = l.phase.clone() else { panic!("down: {:?}", l.phase) };
            let now = retry_at;
            assert!(now < 3000, "within one TTL");
            let mut actions = l.step(now, LinkEvent::Tick);
            // Every attach fails at once: followers name the dead leader by its advertised
            // address (a redirect, followed in the same step), and that address refuses.
            while let Some(LinkAction::Attach { addr, .. }) =
                actions.into_iter().find(|a| matches!(a, LinkAction::Attach { .. }))
            {
                tried.push(addr.clone());
                actions = if addr == "advertised:9" {
                    l.step(now, LinkEvent::Unreachable)
                } else {
                    l.step(now, LinkEvent::StreamFailed { redirect: Some("advertised:9".into()) })
                };
            }
        }
        let refused = tried.iter().filter(|a| *a == "advertised:9").count();
        assert_eq!(refused, 1, "the refusing redirect target is tried once in a TTL: {tried:?}");
        // A redirect target that answers (a new leader not serving yet) is never passed over.
        let mut l = link();
        up(&mut l, 0);
        l.step(100, LinkEvent::StreamFailed { redirect: Some("new:9".into()) });
        assert!(matches!(&l.phase, Phase::Attaching { addr, .. } if addr == "new:9"), "{:?}", l.phase);
        l.step(100, LinkEvent::StreamFailed { redirect: None });
        assert!(!l.passed_over("new:9", 101), "a coordinator that said no is not dead");
    }

    #[test]
    fn expired_drops_holdings_and_rejoins() {
        let mut l = link();
        up(&mut l, 0);
        l.step(1, LinkEvent::Ack { seq: 1, held: vec![("g".into(), 3)] });
        assert_eq!(l.epoch, Some(1), "a Joined lease is remembered, to resume it on a new stream");
        assert_eq!(l.step(2, LinkEvent::Expired), vec![LinkAction::SendJoin]);
        assert_eq!(l.fence("g").token, None);
        assert_eq!(l.epoch, None, "an EXPIRED lease is never named again: the next Join starts a new one");
    }

    #[test]
    fn an_ack_that_no_longer_lists_the_group_ends_the_holding() {
        let mut l = link();
        up(&mut l, 0);
        l.step(1, LinkEvent::Ack { seq: 1, held: vec![("g".into(), 3)] });
        l.step(750, LinkEvent::Tick);
        l.step(751, LinkEvent::Ack { seq: 2, held: vec![] });
        assert!(!l.fence("g").allows(3, 752));
    }

    #[test]
    fn unknown_ack_sequence_proves_nothing() {
        let mut l = link();
        up(&mut l, 0);
        l.step(1, LinkEvent::Ack { seq: 42, held: vec![("g".into(), 3)] });
        assert_eq!(l.fence("g").token, None);
    }
}
