//! Who stands for election, and when.
//!
//! openraft 0.9 draws each node's election timeout once, when the process starts, and a
//! candidate whose vote was refused because its log is shorter waits two more election
//! timeouts before it stands again. After a leader dies that costs a second or more in about
//! one run in five: two followers with close timeouts split their votes again on every retry,
//! and when the follower that stands first is the one behind, the follower ahead is refused by
//! the first one's self-vote and must wait out its own timeout once more.
//!
//! So this node turns openraft's election timer off and stands by this rule instead:
//!
//! - it stands after `--election-timeout-max` (openraft's leader lease: a voter refuses every
//!   vote while it heard a leader less than that ago) plus its own delay without hearing a
//!   leader; after its vote changed (it granted one, or stood itself) it waits its delay only;
//! - the delay lies in `[--election-timeout-min, --election-timeout-max)`, in a slot by the
//!   node's rank among the voters (so two followers never stand within one vote round trip of
//!   each other) plus fresh jitter inside the slot;
//! - a node whose vote was refused by a voter with a longer log waits two more
//!   `--election-timeout-max` before it stands again (openraft's rule), and the voter that
//!   refused it stands at once, above the refused candidate's term, if it too has heard no
//!   leader for a lease: it is the better candidate, and waiting for its own slot while the
//!   shorter log keeps standing only lets the terms climb (seen in the kill-leader drill: nine
//!   terms in 1.5 s).
//!
//! The longest regular wait is still below the lease plus `--election-timeout-max`, the two
//! election timeouts the startup timing rule counts. Standing is always safe in Raft; this
//! only decides liveness.

use super::network::PeerContacts;
use super::{NodeId, Raft};
use openraft::ServerState;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// The election timing this node follows (the coordinator's flags).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub heartbeat: Duration,
    pub min: Duration,
    pub max: Duration,
}

impl Timing {
    /// How long after its last event (leader heard, vote changed) a node stands. `rank` is the
    /// node's position among `voters` (sorted ids); `jitter` is in `[0, 1)`.
    pub fn delay(&self, rank: usize, voters: usize, jitter: f64) -> Duration {
        let slot = (self.max - self.min) / voters.max(1) as u32;
        self.min + slot * rank.min(voters.saturating_sub(1)) as u32 + slot.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
    }

    /// The rule: whether a node that sees `t` stands now, and why.
    pub fn decide(&self, t: &Seen) -> Option<&'static str> {
        if t.held_back {
            return None;
        }
        if t.voters == 1 {
            return Some("the only voter");
        }
        // How long the leader this node follows has been silent (no known leader: forever).
        let silent = if t.committed { t.leader_silent.unwrap_or(Duration::MAX) } else { Duration::MAX };
        let better = t.shorter_candidate.is_some_and(|(term, ago)| term >= t.term && ago < 2 * self.max);
        if better && silent >= self.max {
            return Some("refused a candidate with a shorter log");
        }
        let lease = if t.committed { self.max } else { Duration::ZERO };
        (t.quiet >= lease + self.delay(t.rank, t.slots, t.jitter)).then_some("no leader heard")
    }

    /// How often the rule is checked.
    fn tick(&self) -> Duration {
        (self.heartbeat / 4).clamp(Duration::from_millis(5), Duration::from_millis(50))
    }
}

/// This node's slot among `voters` (sorted ids, this node among them), and how many slots.
///
/// Every voter has a slot, also the leader this node follows (it is usually the one that
/// died). Leaving the followed leader out, so the first survivor has the first slot, was
/// tried: the kill-leader drill did not get faster (p50 510 ms, p99 682 ms in 30 runs) and
/// followers stood 50 ms sooner, which made a spurious election at startup under a loaded
/// debug build (quorum test a: a second grant) show up in about 1 of 30 runs.
pub fn slot_of(id: NodeId, voters: &[NodeId]) -> (usize, usize) {
    (voters.iter().position(|v| *v == id).unwrap_or(0), voters.len().max(1))
}

/// What the rule sees of one voter at one tick.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    /// How many voters there are; this node's slot, and how many slots ([`slot_of`]).
    pub voters: usize,
    pub rank: usize,
    pub slots: usize,
    /// This node's vote: committed (it follows a leader it heard of), and its term.
    pub committed: bool,
    pub term: u64,
    /// Since the last event: start, the vote changed, the leader was heard, this node stood.
    pub quiet: Duration,
    /// Since the leader this node follows was last heard (None: never).
    pub leader_silent: Option<Duration>,
    /// A candidate this node refused for a shorter log: its term, and how long ago.
    pub shorter_candidate: Option<(u64, Duration)>,
    /// A longer log refused this node's own vote a moment ago: it holds back.
    pub held_back: bool,
    /// In `[0, 1)`, drawn afresh after each stand.
    pub jitter: f64,
}

/// Turns openraft's own election timer off and runs the rule above until the node stops.
pub async fn drive(raft: Raft, id: NodeId, contacts: Arc<PeerContacts>, timing: Timing) {
    raft.runtime_config().elect(false);
    let mut rx = raft.metrics();
    let mut last_vote = None;
    // The last event the wait counts from: start, a vote change, a stand.
    let mut since = Instant::now();
    // Not before this (a longer log refused this node's vote).
    let mut not_before = since;
    let mut jitter: f64 = rand::random();
    let mut ticker = tokio::time::interval(timing.tick());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now = Instant::now();
        if contacts.take_greater_log() {
            not_before = now + 2 * timing.max;
        }
        let (why, voters, vote) = {
            let m = rx.borrow_and_update();
            if last_vote.as_ref() != Some(&m.vote) {
                last_vote = Some(m.vote);
                since = now;
            }
            let mut ids: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
            if !ids.contains(&id) {
                continue; // a learner (or removed): never stands
            }
            if m.state == ServerState::Leader {
                since = now;
                continue;
            }
            let committed = m.vote.is_committed();
            ids.sort_unstable();
            let (rank, slots) = slot_of(id, &ids);
            let heard = if committed { m.current_leader.and_then(|l| contacts.last_heard(l)) } else { None };
            if let Some(heard) = heard {
                since = since.max(heard);
            }
            let seen = Seen {
                rank,
                voters: ids.len(),
                slots,
                committed,
                term: m.vote.leader_id.term,
                quiet: now.saturating_duration_since(since),
                leader_silent: heard.map(|h| now.saturating_duration_since(h)),
                shorter_candidate: contacts.shorter_candidate().map(|(t, at)| (t, now.saturating_duration_since(at))),
                held_back: now < not_before,
                jitter,
            };
            match timing.decide(&seen) {
                Some(why) => (why, ids.len(), m.vote),
                None => continue,
            }
        };
        info!(%vote, voters, waited_ms = now.saturating_duration_since(since).as_millis() as u64, "{why}: standing for election");
        match raft.trigger().elect().await {
            Ok(()) => debug!("election triggered"),
            Err(e) => {
                warn!(error = %e, "raft stopped: the election driver ends");
                return;
            }
        }
        since = Instant::now();
        jitter = rand::random();
        if voters == 1 {
            // Give the lone candidate time to win before standing again.
            not_before = since + timing.min;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lan() -> Timing {
        Timing {
            heartbeat: Duration::from_millis(50),
            min: Duration::from_millis(150),
            max: Duration::from_millis(300),
        }
    }

    fn follower() -> Seen {
        Seen {
            rank: 0,
            voters: 3,
            slots: 3,
            committed: true,
            term: 5,
            quiet: Duration::ZERO,
            leader_silent: Some(Duration::ZERO),
            shorter_candidate: None,
            held_back: false,
            jitter: 0.0,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_follower_stands_only_after_the_lease_and_its_slot() {
        let t = lan();
        for rank in 0..3 {
            let slot = t.delay(rank, 3, 0.0);
            let quiet = |q| Seen { rank, quiet: q, leader_silent: Some(q), ..follower() };
            assert_eq!(t.decide(&quiet(t.max + slot - ms(1))), None, "rank {rank}");
            assert_eq!(t.decide(&quiet(t.max + slot)), Some("no leader heard"), "rank {rank}");
        }
        // Without a committed vote (it granted one, or stood) there is no lease to wait out.
        let cand = Seen { committed: false, quiet: t.delay(0, 3, 0.0), ..follower() };
        assert_eq!(t.decide(&cand), Some("no leader heard"));
    }

    #[test]
    fn the_voter_that_refused_a_shorter_log_stands_at_once_once_its_leader_is_silent_for_a_lease() {
        let t = lan();
        let refused = Seen { rank: 2, shorter_candidate: Some((6, ms(1))), ..follower() };
        // The leader is still heard: a spurious candidate behind does not unseat it.
        assert_eq!(t.decide(&Seen { leader_silent: Some(t.max - ms(1)), ..refused }), None);
        let silent = Seen { leader_silent: Some(t.max), quiet: t.max, ..refused };
        assert_eq!(t.decide(&silent), Some("refused a candidate with a shorter log"));
        // Not for a candidate below its own term, nor for an old refusal.
        assert_eq!(t.decide(&Seen { term: 7, ..silent }), None);
        assert_eq!(t.decide(&Seen { shorter_candidate: Some((6, 2 * t.max)), ..silent }), None);
        // A voter whose own vote a longer log just refused holds back.
        assert_eq!(t.decide(&Seen { held_back: true, ..silent }), None);
    }

    #[test]
    fn a_held_back_voter_never_stands_and_a_lone_voter_always_does() {
        let t = lan();
        let long = Seen { quiet: ms(60_000), leader_silent: Some(ms(60_000)), ..follower() };
        assert_eq!(t.decide(&Seen { held_back: true, ..long }), None);
        assert_eq!(t.decide(&Seen { voters: 1, ..follower() }), Some("the only voter"));
    }

    #[test]
    fn every_voter_has_its_own_slot_and_the_follower_of_two_still_waits_its_lease() {
        assert_eq!(slot_of(2, &[1, 2, 3]), (1, 3));
        assert_eq!(slot_of(3, &[1, 2, 3]), (2, 3));
        assert_eq!(slot_of(5, &[1, 2, 3, 4, 5]), (4, 5));
        // Two voters: the follower is not "the only voter"; it waits the lease and its slot.
        let t = lan();
        let (rank, slots) = slot_of(2, &[1, 2]);
        let seen = Seen { voters: 2, rank, slots, ..follower() };
        assert_eq!(t.decide(&seen), None);
        let quiet = t.max + t.delay(rank, slots, 0.0);
        assert_eq!(t.decide(&Seen { quiet, leader_silent: Some(quiet), ..seen }), Some("no leader heard"));
    }

    #[test]
    fn voters_of_different_rank_stand_at_least_half_a_slot_apart() {
        let t = lan();
        for voters in [3, 5] {
            for r in 1..voters {
                let gap = t.delay(r, voters, 0.0) - t.delay(r - 1, voters, 0.999);
                assert!(gap >= (t.max - t.min) / voters as u32 / 2 - Duration::from_millis(1), "{gap:?}");
            }
        }
    }

    #[test]
    fn every_delay_stays_inside_the_configured_election_timeout() {
        let t = lan();
        for voters in 1..=7 {
            for rank in 0..voters {
                for j in [0.0, 0.5, 0.999, 5.0] {
                    let d = t.delay(rank, voters, j);
                    assert!(d >= t.min && d < t.max, "{d:?} rank {rank} of {voters}");
                }
            }
        }
    }
}
