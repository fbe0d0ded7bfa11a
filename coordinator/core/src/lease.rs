//! The lessor: lease deadlines the leader keeps in memory (DESIGN §4).
//!
//! Keepalives are never written to the log. Only the leader keeps deadlines, as etcd's
//! lessor does; when one passes, the driver proposes `Expire` through the log. All times
//! are milliseconds of a monotonic clock that keeps counting during suspend
//! (`CLOCK_BOOTTIME`), passed in by the driver: this module never reads a clock.

use crate::types::{GroupKey, MemberId};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Lease timing. Ratios are in permille so everything stays integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    pub ttl_ms: u64,
    /// Safety margin of the agent's fence (default 333 = 1/3).
    pub margin_permille: u64,
    pub reconnect_grace_ms: u64,
    /// Bound on the relative clock-rate error used by the fast path (ρ, default 10 = 0.01).
    pub rho_permille: u64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig { ttl_ms: 3000, margin_permille: 333, reconnect_grace_ms: 500, rho_permille: 10 }
    }
}

impl LeaseConfig {
    /// TTL × (1 − margin): how long after sending keepalive k an agent may act on its ack.
    pub fn fence_ms(&self) -> u64 {
        crate::fence::fence_ms(self.ttl_ms, self.margin_permille)
    }
    /// TTL × (1 − margin) × (1 + 2ρ): after this, the agent's fence has surely ended.
    pub fn fence_bound_ms(&self) -> u64 {
        crate::fence::fence_bound_ms(self.ttl_ms, self.margin_permille, self.rho_permille)
    }
    /// TTL × margin: a keepalive is acked only with quorum contact this recent.
    pub fn quorum_window_ms(&self) -> u64 {
        self.ttl_ms.saturating_mul(self.margin_permille) / 1000
    }
    pub fn keepalive_interval_ms(&self) -> u64 {
        (self.ttl_ms / 4).max(1)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseEntry {
    pub epoch: u64,
    /// Inside the table this is relative to [`LeaseTable`]'s `shift` (the accumulated timer
    /// lateness); [`LeaseTable::entry`] returns it as the real deadline.
    pub deadline: u64,
    pub last_keepalive: Option<u64>,
    pub stream_open: bool,
    pub closed_at: Option<u64>,
    /// Set once `Expire`/`MarkSilent` is proposed, so a tick does not propose it twice.
    pub expire_proposed: bool,
    pub silent_proposed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeepaliveVerdict {
    /// Ack it (echo the seq and list held groups).
    Ack,
    /// The deadline passed or the epoch is unknown: the agent must Join again.
    Expired(&'static str),
    /// Alive, but this leader has no recent quorum contact: no ack.
    NoQuorum,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TickOutput {
    pub expire: Vec<(MemberId, u64)>,
    pub silent: Vec<(MemberId, u64)>,
    /// Handovers whose deadline + TTL since the last listing ack passed: revoke these.
    pub revoke: Vec<(GroupKey, u64)>,
    /// How late this tick fired; every deadline was extended by it.
    pub late_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct HandoverTimer {
    deadline: u64,
    last_listed: u64,
}

#[derive(Clone, Debug, Default)]
pub struct LeaseTable {
    pub cfg: LeaseConfig,
    /// The Raft term this table serves (set by `promote`, cleared by `clear`). Only streams
    /// of this term may move a deadline earlier: a stream of an earlier term of this node
    /// closes after a re-promotion against fresh entries that know no keepalive, and
    /// judging it would collapse the fast-path floor to `now + grace` (issue 8, item 1).
    term: Option<u64>,
    /// Looked up by member id on every keepalive and resume (66,000/s at 10,000 scale sets ×
    /// 5 clusters): hashed, not searched in a tree of string keys.
    entries: HashMap<MemberId, Slot>,
    /// The member behind each slot number in the two indexes.
    names: HashMap<u64, MemberId>,
    next_slot: u64,
    /// Lateness of late ticks added so far this term: an entry's real deadline is its stored
    /// deadline + `shift`, so extending every deadline costs one addition.
    shift: u64,
    /// (stored deadline, slot) of every entry whose Expire is not proposed yet: a tick
    /// takes the due ones from the front, so it costs O(due), not O(members). Keyed by the
    /// entry's slot number, so a renewal moves two integers and copies no member id.
    by_deadline: BTreeSet<(u64, u64)>,
    /// (when the no-stream rule makes it Silent, slot) of every entry without a stream whose
    /// MarkSilent and Expire are not proposed yet. Real time: lateness does not move it.
    by_silence: BTreeSet<(u64, u64)>,
    /// Members whose entry `on_join` created since the driver last asked
    /// ([`LeaseTable::take_joined`]): the driver checks them against the applied state once,
    /// so a Join answered after a later Leave cannot leave an entry behind.
    joined: Vec<MemberId>,
    handovers: BTreeMap<(GroupKey, u64), HandoverTimer>,
    /// Groups known at the promotion, and until when Grants for them wait: a fallback
    /// holder that reattaches after a quorum loss reports `Adopt` first (DESIGN §5.11).
    grant_hold: BTreeSet<GroupKey>,
    grant_hold_until: u64,
}

impl LeaseTable {
    pub fn new(cfg: LeaseConfig) -> LeaseTable {
        LeaseTable {
            cfg,
            term: None,
            entries: HashMap::new(),
            names: HashMap::new(),
            next_slot: 0,
            shift: 0,
            by_deadline: BTreeSet::new(),
            by_silence: BTreeSet::new(),
            joined: Vec::new(),
            handovers: BTreeMap::new(),
            grant_hold: BTreeSet::new(),
            grant_hold_until: 0,
        }
    }

    /// The term this table serves, if any.
    pub fn term(&self) -> Option<u64> {
        self.term
    }

    /// Forget everything (this node stopped leading); the next promotion rebuilds the table.
    pub fn clear(&mut self) {
        self.term = None;
        self.grant_hold.clear();
        self.clear_entries();
        self.handovers.clear();
    }

    fn clear_entries(&mut self) {
        self.entries.clear();
        self.names.clear();
        self.by_deadline.clear();
        self.by_silence.clear();
        self.joined.clear();
        self.shift = 0;
    }

    /// Members `on_join` gave an entry since the last call.
    pub fn take_joined(&mut self) -> Vec<MemberId> {
        std::mem::take(&mut self.joined)
    }

    /// A copy of a member's entry, with its real deadline.
    pub fn entry(&self, m: &MemberId) -> Option<LeaseEntry> {
        self.entries.get(m).map(|s| LeaseEntry { deadline: s.e.deadline.saturating_add(self.shift), ..s.e.clone() })
    }

    /// Where an entry sits in the two indexes (deadline stored relative to `shift`).
    fn keys(e: &LeaseEntry, bound: u64) -> (Option<u64>, Option<u64>) {
        let deadline = (!e.expire_proposed).then_some(e.deadline);
        let silence = match e.closed_at {
            Some(closed) if !e.stream_open && !e.silent_proposed && !e.expire_proposed => {
                Some(closed.max(e.last_keepalive.unwrap_or(0)).saturating_add(bound))
            }
            _ => None,
        };
        (deadline, silence)
    }

    /// Moves slot `id` in both indexes from where `from` put it to where `to` puts it (None:
    /// not indexed).
    fn reindex(&mut self, id: u64, from: Option<&LeaseEntry>, to: Option<&LeaseEntry>) {
        let bound = self.cfg.fence_bound_ms();
        let (d0, s0) = from.map_or((None, None), |e| Self::keys(e, bound));
        let (d1, s1) = to.map_or((None, None), |e| Self::keys(e, bound));
        if d0 != d1 {
            if let Some(d) = d0 {
                self.by_deadline.remove(&(d, id));
            }
            if let Some(d) = d1 {
                self.by_deadline.insert((d, id));
            }
        }
        if s0 != s1 {
            if let Some(s) = s0 {
                self.by_silence.remove(&(s, id));
            }
            if let Some(s) = s1 {
                self.by_silence.insert((s, id));
            }
        }
    }

    /// Inserts or replaces an entry; `deadline` is real time.
    fn put(&mut self, m: &MemberId, mut e: LeaseEntry) {
        e.deadline = e.deadline.saturating_sub(self.shift);
        let (id, old) = match self.entries.get_mut(m) {
            Some(slot) => (slot.id, Some(std::mem::replace(&mut slot.e, e.clone()))),
            None => {
                let id = self.next_slot;
                self.next_slot += 1;
                self.names.insert(id, m.clone());
                self.entries.insert(m.clone(), Slot { id, e: e.clone() });
                (id, None)
            }
        };
        self.reindex(id, old.as_ref(), Some(&e));
    }

    /// Changes an entry in place and moves it in the indexes. `f` sees the stored deadline.
    fn update<T>(&mut self, m: &MemberId, f: impl FnOnce(&mut LeaseEntry, u64) -> T) -> Option<T> {
        let shift = self.shift;
        let slot = self.entries.get_mut(m)?;
        let before = slot.e.clone();
        let out = f(&mut slot.e, shift);
        let (id, after) = (slot.id, slot.e.clone());
        self.reindex(id, Some(&before), Some(&after));
        Some(out)
    }

    /// A committed Join started (or restarted) a lease.
    pub fn on_join(&mut self, m: &MemberId, epoch: u64, now: u64) {
        let e = LeaseEntry {
            epoch,
            deadline: now.saturating_add(self.cfg.ttl_ms),
            last_keepalive: Some(now),
            stream_open: true,
            closed_at: None,
            expire_proposed: false,
            silent_proposed: false,
        };
        self.put(m, e);
        self.joined.push(m.clone());
    }

    /// A Join that names a lease this table holds (`resume_epoch`) re-attaches to it without a
    /// log entry: allowed only for the term this table serves, the same epoch, and a lease
    /// that is still live (not past its deadline, no Expire or MarkSilent proposed). It then
    /// counts as a keepalive: the deadline is renewed and the stream is open. No renewal past
    /// death holds as for a keepalive; `false` means the Join must go through the log.
    ///
    /// This is what lets a leader change cost no log write per member: after `promote` every
    /// live lease has a fresh deadline, and each member's first message on the new leader
    /// renews it as etcd's lease keepalive would.
    pub fn on_resume(&mut self, m: &MemberId, epoch: u64, term: u64, now: u64) -> bool {
        if self.term != Some(term) {
            return false;
        }
        let Some(Slot { e, .. }) = self.entries.get(m) else { return false };
        let live =
            e.epoch == epoch && now < e.deadline.saturating_add(self.shift) && !e.expire_proposed && !e.silent_proposed;
        if !live {
            return false;
        }
        self.renew(m, now);
        self.joined.push(m.clone());
        true
    }

    /// A live member was heard from at `now` (a keepalive or a resume): a full TTL from now,
    /// its stream open.
    fn renew(&mut self, m: &MemberId, now: u64) {
        let ttl = self.cfg.ttl_ms;
        self.update(m, |e, shift| {
            e.deadline = now.saturating_add(ttl).saturating_sub(shift);
            e.last_keepalive = Some(now);
            e.stream_open = true;
            e.closed_at = None;
        });
    }

    /// A keepalive for `epoch` arrived at `now`. `quorum_age_ms` is how long ago this
    /// leader last heard from a quorum (None: unknown / not leader).
    pub fn on_keepalive(&mut self, m: &MemberId, epoch: u64, now: u64, quorum_age_ms: Option<u64>) -> KeepaliveVerdict {
        let Some(Slot { e, .. }) = self.entries.get(m) else {
            return KeepaliveVerdict::Expired("no lease on this leader; join again");
        };
        if e.epoch != epoch {
            return KeepaliveVerdict::Expired("lease epoch is not current; join again");
        }
        // No renewal past death: once the deadline passed, only a new Join helps.
        if now >= e.deadline.saturating_add(self.shift) || e.expire_proposed {
            return KeepaliveVerdict::Expired("lease deadline passed; join again");
        }
        if e.silent_proposed {
            return KeepaliveVerdict::Expired("member was marked silent; join again");
        }
        // The member is alive and talks to us: keep its deadline fresh even without quorum,
        // so that a leader that regains quorum does not expire a healthy member. Safety does
        // not depend on the deadline but on the ack, which needs quorum.
        self.renew(m, now);
        if self.may_ack(quorum_age_ms) { KeepaliveVerdict::Ack } else { KeepaliveVerdict::NoQuorum }
    }

    /// Whether a leader that last heard from a quorum `quorum_age_ms` ago may ack a keepalive
    /// (or a resume that stands for one): no quorum means no ack.
    pub fn may_ack(&self, quorum_age_ms: Option<u64>) -> bool {
        quorum_age_ms.is_some_and(|age| age <= self.cfg.quorum_window_ms())
    }

    /// Fast path for a dead process: move the deadline earlier, but never below
    /// `max(now + grace, last_keepalive + fence_bound)`, so it never undercuts the fence of
    /// an agent whose close was one-sided.
    ///
    /// `term` is the term the closing stream was opened in. Only a stream of the term this
    /// table serves may move a deadline, and only when the member's last keepalive in this
    /// term is known: after a promotion the entries know no keepalive (another leader may
    /// have acked the agent since), so a close then leaves the fresh deadline alone.
    pub fn on_stream_closed(&mut self, m: &MemberId, epoch: u64, term: u64, now: u64) {
        if self.term != Some(term) {
            return;
        }
        let grace = self.cfg.reconnect_grace_ms;
        let bound = self.cfg.fence_bound_ms();
        let Some(Slot { e, .. }) = self.entries.get(m) else { return };
        if e.epoch != epoch || e.last_keepalive.is_none() {
            return;
        }
        self.update(m, |e, shift| {
            let last = e.last_keepalive.unwrap_or(now);
            e.stream_open = false;
            e.closed_at = Some(now);
            let floor = now.saturating_add(grace).max(last.saturating_add(bound));
            e.deadline = e.deadline.saturating_add(shift).min(floor).saturating_sub(shift);
        });
    }

    /// The lease ended through the log (Expire/Leave applied) or the member was collected.
    pub fn remove(&mut self, m: &MemberId) {
        if let Some(slot) = self.entries.remove(m) {
            self.names.remove(&slot.id);
            self.reindex(slot.id, Some(&slot.e), None);
        }
    }

    /// Periodic check. `expected` is when this tick was due: if it fired late (a stalled
    /// leader), every deadline is first extended by the lateness, because a stalled leader
    /// must not revoke every lease.
    pub fn tick(&mut self, now: u64, expected: u64) -> TickOutput {
        let late = now.saturating_sub(expected);
        let mut out = TickOutput { late_ms: late, ..TickOutput::default() };
        let ttl = self.cfg.ttl_ms;
        self.shift = self.shift.saturating_add(late);
        // Due deadlines first: an entry due for both gets only Expire.
        out.expire = self.take_due(now, Index::Deadline, |e| e.expire_proposed = true);
        out.silent = self.take_due(now, Index::Silence, |e| e.silent_proposed = true);
        out.expire.sort();
        out.silent.sort();
        for ((g, t), h) in self.handovers.iter_mut() {
            if late > 0 {
                h.deadline = h.deadline.saturating_add(late);
                h.last_listed = h.last_listed.saturating_add(late);
            }
            if now >= h.deadline && now >= h.last_listed.saturating_add(ttl) {
                out.revoke.push((g.clone(), *t));
            }
        }
        out
    }

    /// Takes the due front of one index: marks each entry there (`mark` takes it out of that
    /// index) and returns (member, epoch) of each. A deadline is due at its stored value plus
    /// `shift`; a Silent time is real time.
    fn take_due(&mut self, now: u64, which: Index, mark: fn(&mut LeaseEntry)) -> Vec<(MemberId, u64)> {
        let shift = match which {
            Index::Deadline => self.shift,
            Index::Silence => 0,
        };
        let mut due = Vec::new();
        while let Some(&(at, slot)) = self.index(which).first() {
            if now < at.saturating_add(shift) {
                break;
            }
            let member = self.names.get(&slot).cloned();
            let epoch = member.as_ref().and_then(|id| {
                self.update(id, |e, _| {
                    mark(e);
                    e.epoch
                })
            });
            match (member, epoch) {
                (Some(id), Some(epoch)) => due.push((id, epoch)),
                // An index entry without a member (`remove` leaves none): drop it.
                _ => {
                    self.index(which).remove(&(at, slot));
                }
            }
        }
        due
    }

    fn index(&mut self, which: Index) -> &mut BTreeSet<(u64, u64)> {
        match which {
            Index::Deadline => &mut self.by_deadline,
            Index::Silence => &mut self.by_silence,
        }
    }

    /// The earliest time (real, ms) a [`LeaseTable::tick`] would find something due among the
    /// leases (a deadline, or the no-stream rule's Silent time), if any. The lessor wakes then
    /// instead of at its next fixed tick, so a dead holder is expired at its deadline rather
    /// than up to one tick after it. Handover timers are not counted (the fixed tick serves
    /// them). A value at or before `now` means an Expire or MarkSilent is due again after a
    /// failed proposal; the lessor then keeps its fixed tick, so it never retries in a spin.
    pub fn next_due(&self) -> Option<u64> {
        let deadline = self.by_deadline.first().map(|(d, _)| d.saturating_add(self.shift));
        let silent = self.by_silence.first().map(|(s, _)| *s);
        match (deadline, silent) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A proposal failed (e.g. leadership lost): allow proposing again.
    pub fn retry_expire(&mut self, m: &MemberId) {
        self.update(m, |e, _| e.expire_proposed = false);
    }

    /// Promotion (etcd's promote): once the new leader has applied every earlier entry, every
    /// lease gets a fresh deadline; Silent members only `reconnect_grace`, so frequent leader
    /// changes cannot keep a dead holder alive. `members` = (id, epoch, silent).
    /// `term` is the term this node now serves; only its streams may use the fast path.
    pub fn promote(&mut self, now: u64, term: u64, members: impl IntoIterator<Item = (MemberId, u64, bool)>) {
        self.term = Some(term);
        self.clear_entries();
        self.handovers.clear();
        // A deposed leader may still ack for up to TTL×margin after its last quorum contact,
        // and this leader cannot see those acks. So the no-stream (Silent) clock starts only
        // after that window: MarkSilent never lands before a stale ack's fence has ended.
        let silent_clock = now.saturating_add(self.cfg.quorum_window_ms());
        for (id, epoch, silent) in members {
            let deadline = now.saturating_add(if silent { self.cfg.reconnect_grace_ms } else { self.cfg.ttl_ms });
            self.put(
                &id,
                LeaseEntry {
                    epoch,
                    deadline,
                    last_keepalive: None,
                    stream_open: false,
                    closed_at: Some(silent_clock),
                    expire_proposed: false,
                    silent_proposed: silent,
                },
            );
        }
    }

    /// After a promotion at `now`, Grants for these groups (those in the applied state) wait
    /// one TTL stretched by the clock-drift bound, TTL·(1+2ρ) (DESIGN §6.8). Two reasons:
    /// fallback holders reattaching to the new leader can `Adopt` their session first instead
    /// of being replaced by a fresh Grant; and, a safety rule, a deposed leader's ack (a
    /// resume-as-keepalive ack in particular) is bounded by its quorum window, which the
    /// hold outlasts on any clock within the drift bound, so no Grant lands inside that
    /// ack's fence.
    pub fn hold_grants(&mut self, now: u64, groups: impl IntoIterator<Item = GroupKey>) {
        self.grant_hold = groups.into_iter().collect();
        self.grant_hold_until = now.saturating_add(self.grant_hold_ms());
    }

    /// TTL·(1+2ρ), rounded up.
    pub fn grant_hold_ms(&self) -> u64 {
        let ttl = self.cfg.ttl_ms;
        ttl.saturating_add((ttl.saturating_mul(2 * self.cfg.rho_permille)).div_ceil(1000))
    }

    /// Whether a Grant for `g` must still wait at `now` (see [`LeaseTable::hold_grants`]).
    /// Groups first seen after the promotion have no fallback holder to wait for.
    pub fn grant_held(&self, g: &GroupKey, now: u64) -> bool {
        now < self.grant_hold_until && self.grant_hold.contains(g)
    }

    /// Members whose lease this leader still holds valid at `now`.
    pub fn is_live(&self, m: &MemberId, now: u64) -> bool {
        self.entries
            .get(m)
            .map(|s| &s.e)
            .is_some_and(|e| now < e.deadline.saturating_add(self.shift) && !e.expire_proposed && !e.silent_proposed)
    }

    pub fn remaining_ms(&self, m: &MemberId, now: u64) -> Option<i64> {
        self.entries.get(m).map(|s| s.e.deadline.saturating_add(self.shift).saturating_sub(now) as i64)
    }

    /// The leader saw a handover for (group, token) in the applied state; start its timer
    /// (idempotent). `timeout_ms` is the handover deadline relative to now.
    pub fn handover_seen(&mut self, g: &GroupKey, token: u64, now: u64, timeout_ms: u64) {
        self.handovers
            .entry((g.clone(), token))
            .or_insert(HandoverTimer { deadline: now.saturating_add(timeout_ms), last_listed: now });
    }

    /// Whether an ack may still list (group, token): not after a handover's deadline.
    pub fn may_list(&self, g: &GroupKey, token: u64, now: u64) -> bool {
        self.handovers.get(&(g.clone(), token)).is_none_or(|h| now < h.deadline)
    }

    /// Record that an ack sent at `now` listed (group, token).
    pub fn listed(&mut self, g: &GroupKey, token: u64, now: u64) {
        if let Some(h) = self.handovers.get_mut(&(g.clone(), token)) {
            h.last_listed = h.last_listed.max(now);
        }
    }

    /// The handover ended (Release, Revoke or a new Grant).
    pub fn handover_done(&mut self, g: &GroupKey, token: u64) {
        self.handovers.remove(&(g.clone(), token));
    }

    pub fn handovers(&self) -> impl Iterator<Item = &(GroupKey, u64)> {
        self.handovers.keys()
    }

    /// Every member with an entry, with its lease epoch.
    pub fn members(&self) -> impl Iterator<Item = (&MemberId, u64)> {
        self.entries.iter().map(|(m, s)| (m, s.e.epoch))
    }

    /// The epoch of a member's entry, if it has one.
    pub fn epoch_of(&self, m: &MemberId) -> Option<u64> {
        self.entries.get(m).map(|s| s.e.epoch)
    }
}

/// The two deadline indexes of a [`LeaseTable`].
#[derive(Clone, Copy)]
enum Index {
    Deadline,
    Silence,
}

/// A member's entry and the number that stands for it in the deadline indexes.
#[derive(Clone, Debug)]
struct Slot {
    id: u64,
    e: LeaseEntry,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mid(s: &str) -> MemberId {
        MemberId(s.into())
    }

    /// The term every test table serves.
    const TERM: u64 = 3;

    fn table() -> LeaseTable {
        let mut t = LeaseTable::new(LeaseConfig::default());
        t.promote(0, TERM, Vec::new());
        t
    }

    #[test]
    fn keepalive_after_deadline_is_expired_and_never_renewed() {
        let mut t = table();
        t.on_join(&mid("a"), 7, 0);
        assert_eq!(t.on_keepalive(&mid("a"), 7, 1000, Some(0)), KeepaliveVerdict::Ack);
        assert_eq!(
            t.on_keepalive(&mid("a"), 7, 4000, Some(0)),
            KeepaliveVerdict::Expired("lease deadline passed; join again")
        );
        // Still expired, however fast the next one comes.
        assert!(matches!(t.on_keepalive(&mid("a"), 7, 4001, Some(0)), KeepaliveVerdict::Expired(_)));
        // A new Join (new epoch) starts a new lease.
        t.on_join(&mid("a"), 9, 4002);
        assert!(matches!(t.on_keepalive(&mid("a"), 7, 4003, Some(0)), KeepaliveVerdict::Expired(_)));
        assert_eq!(t.on_keepalive(&mid("a"), 9, 4003, Some(0)), KeepaliveVerdict::Ack);
    }

    #[test]
    fn a_resume_renews_only_a_live_lease_of_the_served_term() {
        let ttl = LeaseConfig::default().ttl_ms;
        // After a promotion every live lease is fresh: its holder re-attaches with its epoch.
        let mut t = LeaseTable::new(LeaseConfig::default());
        t.promote(100, TERM, vec![(mid("a"), 7, false), (mid("s"), 8, true)]);
        assert!(t.on_resume(&mid("a"), 7, TERM, 200), "a live lease resumes");
        assert_eq!(t.entry(&mid("a")).map(|e| e.deadline), Some(200 + ttl), "renewed as by a keepalive");
        assert_eq!(t.entry(&mid("a")).and_then(|e| e.last_keepalive), Some(200), "the fast path floor is known");
        assert_eq!(t.take_joined(), vec![mid("a")], "the driver checks a resumed entry against the state");
        assert!(!t.on_resume(&mid("a"), 6, TERM, 210), "another epoch is not this lease");
        assert!(!t.on_resume(&mid("a"), 7, TERM + 1, 210), "a stream of another term may not renew");
        assert!(!t.on_resume(&mid("s"), 8, TERM, 210), "a Silent member joins through the log");
        assert!(!t.on_resume(&mid("x"), 1, TERM, 210), "no entry, no resume");
        // No renewal past death: once the deadline passed, only a log Join helps.
        assert!(!t.on_resume(&mid("a"), 7, TERM, 200 + ttl), "the deadline passed");
        // Nor once an Expire is proposed (the tick marks it before the deadline is reached
        // again by a late keepalive).
        let mut t = table();
        t.on_join(&mid("b"), 5, 0);
        let out = t.tick(ttl, ttl);
        assert_eq!(out.expire, vec![(mid("b"), 5)]);
        assert!(!t.on_resume(&mid("b"), 5, TERM, ttl), "Expire proposed");
        // A table that serves no term (a follower, or a deposed leader) resumes nothing.
        let mut t = LeaseTable::new(LeaseConfig::default());
        assert!(!t.on_resume(&mid("a"), 7, TERM, 0));
    }

    #[test]
    fn no_quorum_means_no_ack() {
        let mut t = table();
        t.on_join(&mid("a"), 1, 0);
        let window = t.cfg.quorum_window_ms();
        assert_eq!(t.on_keepalive(&mid("a"), 1, 10, Some(window + 1)), KeepaliveVerdict::NoQuorum);
        assert_eq!(t.on_keepalive(&mid("a"), 1, 20, None), KeepaliveVerdict::NoQuorum);
        assert_eq!(t.on_keepalive(&mid("a"), 1, 30, Some(window)), KeepaliveVerdict::Ack);
    }

    #[test]
    fn expiry_is_proposed_once() {
        let mut t = table();
        t.on_join(&mid("a"), 1, 0);
        assert!(t.tick(2999, 2999).expire.is_empty());
        assert_eq!(t.tick(3000, 3000).expire, vec![(mid("a"), 1)]);
        assert!(t.tick(3100, 3100).expire.is_empty());
    }

    #[test]
    fn stream_close_fast_path_never_undercuts_the_fence() {
        let mut t = table();
        let cfg = t.cfg;
        t.on_join(&mid("a"), 1, 0);
        assert_eq!(t.on_keepalive(&mid("a"), 1, 1000, Some(0)), KeepaliveVerdict::Ack);
        t.on_stream_closed(&mid("a"), 1, TERM, 1100);
        let floor = (1100 + cfg.reconnect_grace_ms).max(1000 + cfg.fence_bound_ms());
        assert_eq!(t.entry(&mid("a")).unwrap().deadline, floor);
        assert!(t.tick(floor - 1, floor - 1).expire.is_empty());
        assert_eq!(t.tick(floor, floor).expire.len(), 1);
        // ~TTL·(1−margin) after the last keepalive instead of a full TTL.
        assert!(floor < 1000 + cfg.ttl_ms);
    }

    /// Issue 8, item 1: this node led term 5, lost it, another leader acked the agent, and
    /// this node was re-elected in term 7. The term-5 stream's close is handled only now,
    /// against fresh entries that know no keepalive. It must not move the deadline: the
    /// agent's fence from the other leader's ack may still run.
    #[test]
    fn a_close_from_an_earlier_term_after_re_promotion_leaves_the_fresh_deadline_alone() {
        let mut t = LeaseTable::new(LeaseConfig::default());
        let cfg = t.cfg;
        let a = mid("a");
        t.promote(0, 5, Vec::new());
        t.on_join(&a, 1, 0);
        assert_eq!(t.on_keepalive(&a, 1, 1000, Some(0)), KeepaliveVerdict::Ack);
        t.clear(); // term 5 ends here
        // Another leader (term 6) acks a keepalive sent at 5000: the agent's fence runs to 7001.
        let other_ack_sent = 5000;
        t.promote(5500, 7, vec![(a.clone(), 1, false)]);
        // The term-5 stream's close is handled after the re-promotion.
        t.on_stream_closed(&a, 1, 5, 5600);
        assert_eq!(t.entry(&a).unwrap().deadline, 5500 + cfg.ttl_ms);
        // A term-7 close with no keepalive seen in term 7 leaves it alone too.
        t.on_stream_closed(&a, 1, 7, 5700);
        assert_eq!(t.entry(&a).unwrap().deadline, 5500 + cfg.ttl_ms);
        let mut now = 5600;
        while now < other_ack_sent + cfg.fence_bound_ms() {
            assert!(t.tick(now, now).expire.is_empty(), "expired at {now}, inside the other leader's fence");
            now += 10;
        }
        // Once a keepalive arrives in term 7, the fast path works again, bounded by it.
        assert_eq!(t.on_keepalive(&a, 1, 7100, Some(0)), KeepaliveVerdict::Ack);
        t.on_stream_closed(&a, 1, 7, 7200);
        assert_eq!(t.entry(&a).unwrap().deadline, (7200 + cfg.reconnect_grace_ms).max(7100 + cfg.fence_bound_ms()));
    }

    #[test]
    fn grants_for_groups_known_at_promotion_wait_one_ttl_stretched_by_the_drift_bound() {
        let mut t = table();
        // TTL·(1+2ρ): 3000 ms at ρ = 1 % is 3060 ms.
        let ttl = t.cfg.ttl_ms + (t.cfg.ttl_ms * 2 * t.cfg.rho_permille).div_ceil(1000);
        assert!(ttl > t.cfg.ttl_ms, "the hold is longer than one TTL: {ttl}");
        let old = GroupKey("https://h/o#1".into());
        let new = GroupKey("https://h/o#2".into());
        t.promote(10_000, TERM + 1, vec![]);
        t.hold_grants(10_000, vec![old.clone()]);
        assert!(t.grant_held(&old, 10_000));
        assert!(t.grant_held(&old, 10_000 + ttl - 1));
        assert!(!t.grant_held(&old, 10_000 + ttl));
        assert!(!t.grant_held(&new, 10_000), "a group created after the promotion has no fallback holder");
        // Losing leadership forgets the hold; the next promotion sets its own.
        t.hold_grants(20_000, vec![old.clone()]);
        t.clear();
        assert!(!t.grant_held(&old, 20_001));
    }

    #[test]
    fn a_table_that_serves_no_term_ignores_closes() {
        let mut t = LeaseTable::new(LeaseConfig::default());
        t.on_join(&mid("a"), 1, 0);
        let before = t.entry(&mid("a")).unwrap().deadline;
        t.on_stream_closed(&mid("a"), 1, 0, 10);
        assert_eq!(t.entry(&mid("a")).unwrap().deadline, before);
        assert_eq!(t.term(), None);
    }

    #[test]
    fn after_promotion_silence_is_judged_only_after_a_stale_leaders_ack_window() {
        let mut t = table();
        let cfg = t.cfg;
        t.promote(10_000, TERM, vec![(mid("m"), 1, false)]);
        let silent_at = 10_000 + cfg.quorum_window_ms() + cfg.fence_bound_ms();
        let mut now = 10_000;
        while now < silent_at.min(10_000 + cfg.ttl_ms) {
            assert!(t.tick(now, now).silent.is_empty(), "marked silent at {now}, before {silent_at}");
            now += 50;
        }
        // window + fence bound exceeds a TTL, so a member that never reconnects after a
        // promotion is expired at the fresh deadline rather than marked silent first.
        assert_eq!(t.tick(10_000 + cfg.ttl_ms, 10_000 + cfg.ttl_ms).expire, vec![(mid("m"), 1)]);
    }

    #[test]
    fn next_due_is_the_earliest_deadline_or_silent_time() {
        let mut t = table();
        let cfg = t.cfg;
        assert_eq!(t.next_due(), None);
        t.on_join(&mid("a"), 1, 0);
        t.on_join(&mid("b"), 2, 500);
        assert_eq!(t.next_due(), Some(cfg.ttl_ms), "a's deadline");
        // A late tick moves every deadline, and so the wake.
        assert!(t.tick(1000, 900).expire.is_empty());
        assert_eq!(t.next_due(), Some(cfg.ttl_ms + 100));
        // Once a's Expire is proposed only b is left; a failed proposal makes a due again, at
        // a time already past (the lessor then keeps its fixed tick: no spin).
        assert_eq!(t.tick(cfg.ttl_ms + 100, cfg.ttl_ms + 100).expire, vec![(mid("a"), 1)]);
        assert_eq!(t.next_due(), Some(500 + cfg.ttl_ms + 100));
        t.retry_expire(&mid("a"));
        assert!(t.next_due().is_some_and(|d| d <= cfg.ttl_ms + 100));
        t.remove(&mid("a"));
        t.remove(&mid("b"));
        assert_eq!(t.next_due(), None);
    }

    #[test]
    fn late_timer_extends_every_deadline_first() {
        let mut t = table();
        t.on_join(&mid("a"), 1, 0);
        // The tick due at 100 fired at 5000: the leader was stalled, not the member.
        let out = t.tick(5000, 100);
        assert_eq!(out.late_ms, 4900);
        assert!(out.expire.is_empty());
    }

    #[test]
    fn promotion_gives_silent_members_only_the_grace() {
        let mut t = table();
        let cfg = t.cfg;
        t.promote(10_000, TERM, vec![(mid("live"), 1, false), (mid("quiet"), 2, true)]);
        assert_eq!(t.entry(&mid("live")).unwrap().deadline, 10_000 + cfg.ttl_ms);
        assert_eq!(t.entry(&mid("quiet")).unwrap().deadline, 10_000 + cfg.reconnect_grace_ms);
        assert!(!t.is_live(&mid("quiet"), 10_001));
    }

    #[test]
    fn handover_stops_listing_after_deadline_then_revokes_a_ttl_later() {
        let mut t = table();
        let g = GroupKey("https://h/o#1".into());
        t.on_join(&mid("a"), 1, 0);
        t.handover_seen(&g, 5, 0, 10_000);
        assert!(t.may_list(&g, 5, 9_999));
        t.listed(&g, 5, 9_999);
        assert!(!t.may_list(&g, 5, 10_000));
        assert!(t.tick(12_000, 12_000).revoke.is_empty());
        assert_eq!(t.tick(9_999 + t.cfg.ttl_ms, 9_999 + t.cfg.ttl_ms).revoke, vec![(g.clone(), 5)]);
    }

    type Proposals = Vec<(MemberId, u64)>;

    /// The lessor as it was before the deadline indexes: every entry scanned on every tick,
    /// every deadline moved on a late tick. The indexed table must decide exactly as it does.
    #[derive(Default)]
    struct Scan {
        entries: BTreeMap<MemberId, LeaseEntry>,
    }

    impl Scan {
        fn tick(&mut self, cfg: &LeaseConfig, now: u64, expected: u64) -> (Proposals, Proposals) {
            let late = now.saturating_sub(expected);
            let bound = cfg.fence_bound_ms();
            let (mut expire, mut silent) = (Vec::new(), Vec::new());
            for (id, e) in self.entries.iter_mut() {
                e.deadline = e.deadline.saturating_add(late);
                if !e.expire_proposed && now >= e.deadline {
                    e.expire_proposed = true;
                    expire.push((id.clone(), e.epoch));
                } else if !e.stream_open
                    && !e.silent_proposed
                    && !e.expire_proposed
                    && now >= e.closed_at.unwrap_or(now).max(e.last_keepalive.unwrap_or(0)).saturating_add(bound)
                {
                    e.silent_proposed = true;
                    silent.push((id.clone(), e.epoch));
                }
            }
            (expire, silent)
        }
    }

    proptest! {
        /// The indexed tick decides what a scan of every entry decides: the same Expire and
        /// MarkSilent proposals at the same ticks, and the same deadline for every member,
        /// through joins, keepalives, closes, removals, retries, late ticks and promotions.
        #[test]
        fn indexed_tick_decides_what_a_full_scan_decides(
            ops in proptest::collection::vec((0u8..8, 0usize..5, 0u64..900, 0u64..3), 1..200)
        ) {
            let mut t = table();
            let mut scan = Scan::default();
            let cfg = t.cfg;
            let ids: Vec<MemberId> = (0..5).map(|i| mid(&format!("m{i}"))).collect();
            let mut now = 0u64;
            for (op, who, gap, epoch) in ops {
                now += gap;
                let m = &ids[who];
                match op {
                    0 => {
                        t.on_join(m, epoch, now);
                        scan.entries.insert(m.clone(), t.entry(m).unwrap());
                    }
                    1 | 2 => {
                        let _ = t.on_keepalive(m, epoch, now, Some(0));
                    }
                    3 => t.on_stream_closed(m, epoch, TERM, now),
                    4 => t.remove(m),
                    5 => t.retry_expire(m),
                    6 => {
                        // A tick that fired `gap` late.
                        let (e, s) = scan.tick(&cfg, now, now - gap.min(now) / 2);
                        let out = t.tick(now, now - gap.min(now) / 2);
                        prop_assert_eq!(out.expire, e);
                        prop_assert_eq!(out.silent, s);
                    }
                    _ => {
                        let members: Vec<_> = ids.iter().take(who + 1).map(|i| (i.clone(), epoch, gap % 2 == 0)).collect();
                        t.promote(now, TERM, members);
                        scan.entries.clear();
                    }
                }
                // The scan model learns every entry's state from the table except what the
                // tick decides, which it computes itself.
                for id in &ids {
                    match (t.entry(id), scan.entries.get_mut(id)) {
                        (None, _) => { scan.entries.remove(id); }
                        (Some(e), Some(s)) if op != 6 => *s = e,
                        (Some(e), None) => { scan.entries.insert(id.clone(), e); }
                        (Some(e), Some(s)) => prop_assert_eq!(&e, &*s, "after a tick"),
                    }
                }
                let (e, s) = scan.tick(&cfg, now, now);
                let due = t.next_due();
                let out = t.tick(now, now);
                // `next_due` names exactly when a tick finds work: the lessor sleeps until it.
                prop_assert_eq!(
                    due.is_some_and(|d| d <= now),
                    !out.expire.is_empty() || !out.silent.is_empty(),
                    "next_due {:?} at {}", due, now
                );
                prop_assert_eq!(out.expire, e);
                prop_assert_eq!(out.silent, s);
                prop_assert!(t.next_due().is_none_or(|d| d > now), "a tick leaves nothing due");
            }
        }

        /// Invariant 5 at the lessor: a member that keeps sending keepalives every ≤ TTL/4 is
        /// never expired, whatever the leader changes (promotions) in between.
        #[test]
        fn leader_changes_alone_never_expire_a_live_member(
            steps in proptest::collection::vec((1u64..=750, any::<bool>()), 1..200)
        ) {
            let mut t = table();
            let m = mid("holder");
            t.on_join(&m, 1, 0);
            let mut now = 0u64;
            for (gap, promote) in steps {
                now += gap;
                if promote {
                    t.promote(now, TERM, vec![(m.clone(), 1, false)]);
                }
                let out = t.tick(now, now);
                prop_assert!(out.expire.is_empty());
                prop_assert_eq!(t.on_keepalive(&m, 1, now, Some(0)), KeepaliveVerdict::Ack);
            }
        }

        /// Whatever closes arrive after a promotion (from any earlier term of this node, or
        /// from this term before or after a keepalive), no expiry comes before the fence bound
        /// of a keepalive another leader acked before the promotion, nor of one this leader
        /// acked after it.
        #[test]
        fn closes_after_a_re_promotion_never_undercut_any_acked_fence(
            other_ka in 0u64..5_000,
            promote_gap in 0u64..3_000,
            events in proptest::collection::vec((0u64..400, 0u8..4), 1..30),
        ) {
            let mut t = LeaseTable::new(LeaseConfig::default());
            let a = mid("a");
            let bound = t.cfg.fence_bound_ms();
            let promoted = other_ka + promote_gap;
            t.promote(promoted, 9, vec![(a.clone(), 1, false)]);
            let mut now = promoted;
            let mut last_ka = other_ka;
            for (gap, what) in events {
                now += gap;
                match what {
                    0 => t.on_stream_closed(&a, 1, 8, now),
                    1 => t.on_stream_closed(&a, 1, 9, now),
                    2 if t.on_keepalive(&a, 1, now, Some(0)) == KeepaliveVerdict::Ack => last_ka = now,
                    _ => {}
                }
                let out = t.tick(now, now);
                if !out.expire.is_empty() {
                    prop_assert!(now >= other_ka + bound, "expired at {} before {}", now, other_ka + bound);
                    prop_assert!(now >= last_ka + bound, "expired at {} before {}", now, last_ka + bound);
                    break;
                }
            }
        }

        /// A silent member's stream-close deadline is never below last keepalive + fence bound.
        #[test]
        fn fast_path_respects_fence_bound(ka in 0u64..10_000, close_after in 0u64..5_000) {
            let mut t = table();
            let m = mid("x");
            t.on_join(&m, 1, ka.saturating_sub(100));
            prop_assert_eq!(t.on_keepalive(&m, 1, ka, Some(0)), KeepaliveVerdict::Ack);
            t.on_stream_closed(&m, 1, TERM, ka + close_after);
            let d = t.entry(&m).unwrap().deadline;
            prop_assert!(d >= ka + t.cfg.fence_bound_ms());
            prop_assert!(d >= ka + close_after + t.cfg.reconnect_grace_ms || d == ka + t.cfg.ttl_ms);
        }
    }
}
