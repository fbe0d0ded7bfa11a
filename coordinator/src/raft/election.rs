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
//!   vote while it heard a leader less than that ago), one `--heartbeat-interval` (the skew
//!   between followers) and its own stagger without hearing a leader; after its vote changed
//!   (it granted one, or stood itself) there is no lease, and it waits its delay instead;
//! - the stagger lies in `[0, --election-timeout-max − --election-timeout-min)`, in a slot
//!   by the node's rank among the voters (so two followers never stand within one vote round
//!   trip of each other) plus fresh jitter inside the slot; the delay is
//!   `--election-timeout-min` plus the stagger, inside the election timeout ([`Timing::stand_after`]);
//! - a node whose vote was refused by a voter with a longer log waits two more
//!   `--election-timeout-max` before it stands again (openraft's rule), and the voter that
//!   refused it stands at once, above the refused candidate's term, if it too has heard no
//!   leader for a lease: it is the better candidate, and waiting for its own slot while the
//!   shorter log keeps standing only lets the terms climb (seen in the kill-leader drill: nine
//!   terms in 1.5 s).
//!
//! The longest regular wait is below the lease plus `--election-timeout-max`, the two
//! election timeouts the startup timing rule counts (the heartbeat is below the minimum
//! timeout). Standing is always safe in Raft; this
//! only decides liveness.
//!
//! **Pre-vote.** When the rule says stand, the node first asks the other voters (the
//! `PreVote` RPC, Raft thesis §9.6) and stands only if a majority, itself included, says yes;
//! asking changes nothing on either side. A voter says no while it still hears a live
//! leader: a follower that heard its leader less than `--election-timeout-max` ago, or the
//! leader itself while its last quorum contact, as openraft last reported it, is younger than
//! one lease TTL ([`Timing::pre_vote`]). Two things this stops:
//!
//! - a leader that is alive but late with its heartbeats to one follower is not deposed by
//!   that follower. Seen at 10,000 scale sets × 5: the new leader, working through 50,000
//!   re-attaching agent streams on two shared cores, sent a follower nothing for two seconds;
//!   the follower stood, three more terms followed, and every stream attached all over again.
//!   The leader still answers the pre-vote (or answers too late, which is a no as well);
//! - a voter cut off from the others does not climb terms while alone and then depose the
//!   leader when the link heals: nobody grants its pre-vote, so its term never moves.
//!
//! Where the leader is dead, the surviving followers have heard nothing from it for at least
//! the lease plus a heartbeat interval (less any skew between them), so they grant each
//! other at once: a failover costs one more round trip. A peer that predates `PreVote`
//! (UNIMPLEMENTED, during a rolling upgrade) counts as a yes, as before the RPC existed.

use super::network::{PeerContacts, PeerNetwork};
use super::{NodeId, Raft};
use arcfed_proto as pb;
use openraft::{BasicNode, ServerState};
use prometheus_client::metrics::counter::Counter;
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
        self.min + self.stagger(rank, voters, jitter)
    }

    /// The node's place in `[0, --election-timeout-max − --election-timeout-min)`: its slot
    /// by rank, plus jitter inside the first half of the slot.
    fn stagger(&self, rank: usize, voters: usize, jitter: f64) -> Duration {
        let slot = (self.max - self.min) / voters.max(1) as u32;
        slot * rank.min(voters.saturating_sub(1)) as u32 + slot.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
    }

    /// How long a node that sees `committed` stays quiet before it stands. Under a committed
    /// vote: openraft's leader lease (`--election-timeout-max`), one heartbeat interval for
    /// the skew between the followers (they heard the leader's last heartbeat at times that
    /// differ by their one-way delays, or one of them missed it), then its stagger. The lease
    /// already is a full election timeout, so a second one (the old `lease + delay`, 1.6 s
    /// of the 10,000 × 5 leader kill at the WAN profile) buys nothing: the stagger still keeps
    /// the followers a slot apart. Without a committed vote (it granted one, or stood) there
    /// is no lease, and it waits its delay, inside the election timeout.
    pub fn stand_after(&self, committed: bool, rank: usize, voters: usize, jitter: f64) -> Duration {
        if committed {
            self.max + self.heartbeat + self.stagger(rank, voters, jitter)
        } else {
            self.delay(rank, voters, jitter)
        }
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
        (t.quiet >= self.stand_after(t.committed, t.rank, t.slots, t.jitter)).then_some("no leader heard")
    }

    /// How often the rule is checked.
    fn tick(&self) -> Duration {
        (self.heartbeat / 4).clamp(Duration::from_millis(5), Duration::from_millis(50))
    }

    /// How long a candidate waits for pre-vote answers: the minimum election timeout (lan
    /// 150 ms, wan 600 ms, several round trips in both). No answer in time is a no.
    pub fn pre_vote_timeout(&self) -> Duration {
        self.min
    }

    /// The answer of a voter that sees `a` to a pre-vote (see the module docs): `Err` names
    /// why not. `hold` is how long a leader keeps refusing after its last quorum contact (the
    /// lease TTL).
    pub fn pre_vote(&self, a: &Asked, hold: Duration) -> Result<(), String> {
        if a.leads {
            // A leader that a quorum elected but that has no ack reported yet is as alive as
            // one just acked.
            let age = a.quorum_ack.unwrap_or(Duration::ZERO);
            if age < hold {
                return Err(format!("this voter leads and heard a quorum {} ms ago", age.as_millis()));
            }
            return Ok(());
        }
        match a.leader {
            Some((leader, Some(silent))) if leader != a.candidate && silent < self.max => {
                Err(format!("this voter heard its leader {leader} {} ms ago", silent.as_millis()))
            }
            _ => Ok(()),
        }
    }
}

/// What a voter knows when a peer asks it for a pre-vote.
#[derive(Debug, Clone, Copy)]
pub struct Asked {
    pub candidate: NodeId,
    /// openraft says this node leads, and its last quorum contact as openraft last reported
    /// it (a leader whose runtime is starved reports late, and so keeps refusing).
    pub leads: bool,
    pub quorum_ack: Option<Duration>,
    /// The leader this node follows under a committed vote, and how long since it was heard
    /// (None: never).
    pub leader: Option<(NodeId, Option<Duration>)>,
}

/// What `raft`'s metrics and `contacts` say a pre-vote of `candidate` meets on this node.
pub fn asked(raft: &Raft, contacts: &PeerContacts, me: NodeId, candidate: NodeId) -> Asked {
    let m = raft.metrics();
    let m = m.borrow();
    let leads = m.state == ServerState::Leader && m.current_leader == Some(me);
    let leader = if m.vote.is_committed() && !leads {
        m.current_leader.map(|l| (l, contacts.last_heard(l).map(|at| at.elapsed())))
    } else {
        None
    };
    Asked { candidate, leads, quorum_ack: m.millis_since_quorum_ack.map(Duration::from_millis), leader }
}

/// Asks `peers` for a pre-vote at `term` and returns once `need` said yes (true), or when
/// every answer is in or `timeout` passed without that many (false, with each no's reason).
async fn canvass(
    net: &PeerNetwork,
    me: NodeId,
    term: u64,
    peers: Vec<(NodeId, BasicNode)>,
    need: usize,
    timeout: Duration,
) -> (bool, Vec<String>) {
    let mut asks = tokio::task::JoinSet::new();
    for (id, node) in peers {
        let net = net.clone();
        asks.spawn(async move {
            let req = pb::PreVoteRequest { candidate: me, term };
            (id, net.pre_vote(id, &node, req, timeout).await)
        });
    }
    let mut granted = 0;
    let mut noes = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while granted < need {
        match tokio::time::timeout_at(deadline, asks.join_next()).await {
            Ok(Some(Ok((_, Ok(r))))) if r.granted => granted += 1,
            Ok(Some(Ok((id, Ok(r))))) => noes.push(format!("{id}: {}", r.reason)),
            Ok(Some(Ok((id, Err(e))))) => noes.push(format!("{id}: {e}")),
            Ok(Some(Err(e))) => noes.push(format!("pre-vote task: {e}")),
            Ok(None) => break,
            Err(_) => {
                noes.push(format!("{} without an answer within {} ms", asks.len(), timeout.as_millis()));
                break;
            }
        }
    }
    (granted >= need, noes)
}

/// The election driver's counters (`arcfed_elections_stood`, `arcfed_prevotes_lost`).
#[derive(Clone, Default)]
pub struct ElectionCounters {
    pub stood: Counter,
    pub prevote_lost: Counter,
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
pub async fn drive(
    raft: Raft,
    id: NodeId,
    contacts: Arc<PeerContacts>,
    net: PeerNetwork,
    timing: Timing,
    counters: ElectionCounters,
) {
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
        let (why, voters, vote, peers) = {
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
                Some(why) => {
                    let peers: Vec<(NodeId, BasicNode)> = ids
                        .iter()
                        .filter(|v| **v != id)
                        .filter_map(|v| m.membership_config.membership().get_node(v).map(|n| (*v, n.clone())))
                        .collect();
                    (why, ids.len(), m.vote, peers)
                }
                None => continue,
            }
        };
        let waited_ms = now.saturating_duration_since(since).as_millis() as u64;
        if voters > 1 {
            // A majority of the voters, this one included.
            let need = voters / 2;
            let (granted, noes) =
                canvass(&net, id, vote.leader_id.term + 1, peers, need, timing.pre_vote_timeout()).await;
            if !granted {
                counters.prevote_lost.inc();
                info!(%vote, voters, waited_ms, refused = ?noes, "{why}, but a majority did not grant the pre-vote: not standing");
                // Wait a full turn again, and ask no sooner than one election timeout from now.
                since = Instant::now();
                not_before = not_before.max(since + timing.min);
                jitter = rand::random();
                continue;
            }
        }
        counters.stood.inc();
        info!(%vote, voters, waited_ms, "{why}: standing for election");
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
            let wait = t.stand_after(true, rank, 3, 0.0);
            let quiet = |q| Seen { rank, quiet: q, leader_silent: Some(q), ..follower() };
            assert_eq!(t.decide(&quiet(wait - ms(1))), None, "rank {rank}");
            assert_eq!(t.decide(&quiet(wait)), Some("no leader heard"), "rank {rank}");
            // The lease and a heartbeat of skew first; not a second election timeout after it.
            assert!(wait >= t.max + t.heartbeat && wait < t.max + t.heartbeat + (t.max - t.min), "{wait:?}");
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
    fn a_pre_vote_is_refused_while_a_live_leader_is_heard() {
        let t = lan();
        let hold = ms(3000);
        let follower = |silent| Asked { candidate: 3, leads: false, quorum_ack: None, leader: Some((1, silent)) };
        // A follower that heard its leader within --election-timeout-max says no.
        let no = t.pre_vote(&follower(Some(t.max - ms(1))), hold).unwrap_err();
        assert!(no.contains("heard its leader 1"), "{no}");
        assert_eq!(t.pre_vote(&follower(Some(t.max)), hold), Ok(()));
        // Never heard, or no committed leader (it granted a vote, or stood): yes.
        assert_eq!(t.pre_vote(&follower(None), hold), Ok(()));
        assert_eq!(t.pre_vote(&Asked { leader: None, ..follower(None) }, hold), Ok(()));
        // The candidate is the leader this node follows: nothing to protect.
        assert_eq!(t.pre_vote(&Asked { candidate: 1, ..follower(Some(ms(1))) }, hold), Ok(()));
        // The leader itself says no while its last quorum contact is younger than the hold,
        // also before the first ack is reported; after that it lets the others elect.
        let leader = |ack| Asked { candidate: 3, leads: true, quorum_ack: ack, leader: None };
        let no = t.pre_vote(&leader(Some(hold - ms(1))), hold).unwrap_err();
        assert!(no.contains("leads"), "{no}");
        assert!(t.pre_vote(&leader(None), hold).is_err());
        assert_eq!(t.pre_vote(&leader(Some(hold)), hold), Ok(()));
    }

    #[test]
    fn survivors_of_a_dead_leader_grant_each_other_the_pre_vote_at_once() {
        // A follower stands after the lease, a heartbeat and its stagger; the other one lost the leader at
        // the same moment, give or take one heartbeat, so it is past its own lease and says
        // yes: a failover costs one more round trip, not another timeout.
        for t in [lan(), Timing { heartbeat: ms(150), min: ms(600), max: ms(1000) }] {
            for rank in 0..3 {
                let stands_after = t.stand_after(true, rank, 3, 0.0);
                let other_silent = stands_after - t.heartbeat;
                let asked =
                    Asked { candidate: 2, leads: false, quorum_ack: None, leader: Some((1, Some(other_silent))) };
                assert_eq!(t.pre_vote(&asked, ms(10_000)), Ok(()), "rank {rank} {t:?}");
            }
        }
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
        let quiet = t.stand_after(true, rank, slots, 0.0);
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
                    // A silent leader: within the two election timeouts the timing rule counts.
                    let w = t.stand_after(true, rank, voters, j);
                    assert!(w >= t.max + t.heartbeat && w < 2 * t.max, "{w:?} rank {rank} of {voters}");
                }
            }
        }
    }
}
