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

    /// How often the rule is checked.
    fn tick(&self) -> Duration {
        (self.heartbeat / 4).clamp(Duration::from_millis(5), Duration::from_millis(50))
    }
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
        let (stand_after, why, voters, vote) = {
            let m = rx.borrow_and_update();
            if last_vote.as_ref() != Some(&m.vote) {
                last_vote = Some(m.vote);
                since = now;
            }
            let mut ids: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
            ids.sort_unstable();
            let Some(rank) = ids.iter().position(|v| *v == id) else {
                continue; // a learner (or removed): never stands
            };
            if m.state == ServerState::Leader {
                since = now;
                continue;
            }
            if ids.len() == 1 {
                // The only voter stands at once (openraft's own rule), once per delay.
                (Duration::ZERO, "the only voter", 1, m.vote)
            } else {
                let committed = m.vote.is_committed();
                let mut silent = Duration::MAX;
                if committed
                    && let Some(leader) = m.current_leader
                    && let Some(heard) = contacts.last_heard(leader)
                {
                    since = since.max(heard);
                    silent = now.saturating_duration_since(heard);
                }
                let term = m.vote.leader_id.term;
                let better = contacts
                    .shorter_candidate()
                    .is_some_and(|(t, at)| t >= term && now.saturating_duration_since(at) < 2 * timing.max);
                if better && silent >= timing.max && now >= not_before {
                    (Duration::ZERO, "refused a candidate with a shorter log", ids.len(), m.vote)
                } else {
                    let lease = if committed { timing.max } else { Duration::ZERO };
                    (lease + timing.delay(rank, ids.len(), jitter), "no leader heard", ids.len(), m.vote)
                }
            }
        };
        if now < not_before || now.saturating_duration_since(since) < stand_after {
            continue;
        }
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
