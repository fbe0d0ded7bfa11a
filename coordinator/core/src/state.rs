//! The replicated state and `apply`, a pure and total function of (state, command).
//!
//! `apply` never reads a clock, never does I/O and never panics: a panic would replay on
//! every voter and take the quorum down for good. Invalid or stale commands return
//! `Outcome::Rejected`. Arithmetic is i64 and saturating.

use crate::split::{SplitInput, split};
use crate::types::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Expired and left members are kept this long (leader time) for `status`, then collected.
pub const MEMBER_RETENTION_MS: i64 = 10 * 60 * 1000;
/// First holder-stall cooldown; it doubles per strike up to [`MAX_COOLDOWN_MS`].
pub const STALL_COOLDOWN_MS: i64 = 60 * 1000;
pub const MAX_COOLDOWN_MS: i64 = 60 * 60 * 1000;
/// `X-ScaleSetMaxCapacity` must fit GitHub's int32.
pub const MAX_CAPACITY: i64 = i32::MAX as i64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberStatus {
    Live,
    /// No stream for TTL·(1−margin)·(1+2ρ). A new leader gives it only `reconnect_grace`.
    Silent,
    Expired,
    Left,
}

impl MemberStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberStatus::Live => "live",
            MemberStatus::Silent => "silent",
            MemberStatus::Expired => "expired",
            MemberStatus::Left => "left",
        }
    }
    /// Holds a lease (it may still be renewed).
    pub fn has_lease(self) -> bool {
        matches!(self, MemberStatus::Live | MemberStatus::Silent)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: MemberId,
    pub cluster: String,
    pub group: GroupKey,
    pub ers_namespace: String,
    pub ers_name: String,
    pub weight: i64,
    pub min_runners: i64,
    pub max_runners: i64,
    pub priority: i64,
    pub github_ready: bool,
    pub status: MemberStatus,
    /// Log index of the Join that started the current lease.
    pub epoch: u64,
    pub draining: bool,
    /// Superseded by a newer incarnation of the same (cluster, ERS): never patches, never granted.
    pub standby: bool,
    pub status_since_ms: i64,
}

impl Member {
    fn counts_for_split(&self) -> bool {
        self.status.has_lease() && !self.draining && !self.standby
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    pub from: MemberId,
    pub token: u64,
    pub to: Option<MemberId>,
    /// Leader wall-clock deadline, for display; the leader times the handover on its own
    /// monotonic clock.
    pub deadline_ms: i64,
    /// How long the holder has, from when the leader first saw the request.
    pub timeout_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cooldown {
    pub until_ms: i64,
    pub strikes: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub key: GroupKey,
    pub holder: Option<MemberId>,
    /// Log index of the latest Grant (or Adopt). Only grows.
    pub token: u64,
    pub session_id: Option<String>,
    /// Session ids still to delete. A set: the same id reported twice is one id.
    pub stale_sessions: BTreeSet<String>,
    pub last_acked_message_id: i64,
    pub statistics: Statistics,
    /// Runner name → job id, from committed JobStarted/JobCompleted events.
    pub busy_runners: BTreeMap<String, String>,
    pub assignments: BTreeMap<MemberId, i64>,
    /// Members with a job event in the latest revision.
    pub dirty: BTreeSet<MemberId>,
    pub revision: u64,
    pub handover: Option<Handover>,
    pub allow_clusters: Option<BTreeSet<String>>,
    pub policy: SplitPolicy,
    /// Holder-stall cooldowns, by cluster.
    pub cooldowns: BTreeMap<String, Cooldown>,
    pub holder_since_ms: i64,
    /// Target of a handover whose holder released: preferred by the next Grant.
    pub prefer_next: Option<MemberId>,
    /// Leader time each id entered `stale_sessions`, so `Collect` can drop ids older than
    /// GitHub's session TTL (GitHub has expired them by then). Kept beside the set rather than
    /// replacing it, so readers of `stale_sessions` stay as they are.
    #[serde(default)]
    pub stale_since_ms: BTreeMap<String, i64>,
    /// Leader time since which no member of the group holds a lease (`None` while one does);
    /// `Collect` removes the group once this is old enough and no member record is left.
    #[serde(default)]
    pub vacant_since_ms: Option<i64>,
}

impl Group {
    fn new(key: GroupKey, policy: SplitPolicy) -> Group {
        Group {
            key,
            holder: None,
            token: 0,
            session_id: None,
            stale_sessions: BTreeSet::new(),
            last_acked_message_id: 0,
            statistics: Statistics::default(),
            busy_runners: BTreeMap::new(),
            assignments: BTreeMap::new(),
            dirty: BTreeSet::new(),
            revision: 0,
            handover: None,
            allow_clusters: None,
            policy,
            cooldowns: BTreeMap::new(),
            holder_since_ms: 0,
            prefer_next: None,
            stale_since_ms: BTreeMap::new(),
            vacant_since_ms: None,
        }
    }

    /// Adds a session id to the stale set, stamped with the (clamped) leader time `ts`. An id
    /// already there keeps its first stamp.
    fn add_stale(&mut self, id: String, ts: i64) {
        self.stale_since_ms.entry(id.clone()).or_insert(ts);
        self.stale_sessions.insert(id);
    }

    fn forget_stale(&mut self, id: &str) {
        self.stale_sessions.remove(id);
        self.stale_since_ms.remove(id);
    }

    /// Moves the current session (if any) to the stale set and clears the holder.
    fn clear_holder(&mut self, ts: i64) {
        if let Some(s) = self.session_id.take() {
            self.add_stale(s, ts);
        }
        self.holder = None;
        self.prefer_next = self.handover.take().and_then(|h| h.to);
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub grants: u64,
    pub expirations: u64,
    pub stale_token_rejections: u64,
    pub handovers: u64,
    pub revocations: u64,
    /// Things `Collect` removed (groups, busy runners, stale-session ids).
    #[serde(default)]
    pub collected: u64,
}

/// The replicated state. Only the first six fields are data (serialized, compared); the rest
/// are indexes derived from them by `apply`, never serialized and rebuilt by one function
/// ([`State::rebuild_indexes`]) whenever a state is deserialized (snapshot install, restore
/// at start), so a restored state cannot carry a stale index.
#[derive(Clone, Debug, Default, Serialize)]
pub struct State {
    /// Clamped leader timestamp of the last applied entry (display and accounting only).
    pub last_ts_ms: i64,
    pub last_index: u64,
    pub groups: BTreeMap<GroupKey, Group>,
    pub members: BTreeMap<MemberId, Member>,
    /// Raft node id → agent-facing address, recorded by each leader on promotion.
    pub leader_addrs: BTreeMap<u64, String>,
    pub counters: Counters,
    /// Which clusters may join which groups (set by operators; empty: everyone).
    #[serde(default)]
    pub policy: crate::policy::Policy,
    /// Derived; see [`Indexes`].
    #[serde(skip)]
    idx: Indexes,
    /// Derived: which group changed at which log index, so each agent stream wakes only for
    /// its own group (see [`State::groups_changed_since`]).
    #[serde(skip)]
    changes: ChangeLog,
    /// Groups the entry being applied touched; synced into the indexes at the end of `apply`.
    #[serde(skip)]
    pending: BTreeSet<GroupKey>,
}

/// Indexes of `groups` and `members`, so the hot paths (holder choice, keepalive acks, the
/// lessor loop, agent pushes, and `apply` itself) cost what one group or one member costs,
/// not what the whole state costs (issue 8, Scale). Each is a pure function of the data;
/// [`Indexes::compute`] computes them from scratch and a property test checks that `apply`
/// keeps them equal to that.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Indexes {
    /// Every member record, by its group (member records never change group).
    by_group: BTreeMap<GroupKey, BTreeSet<MemberId>>,
    /// The holder of each held group.
    holder_of: BTreeMap<GroupKey, MemberId>,
    /// The groups each member holds.
    holdings: BTreeMap<MemberId, BTreeSet<GroupKey>>,
    /// Groups held, by the holder's cluster (holders with a member record): the load term of
    /// [`State::choose_holder`]. No zero entries.
    held_by_cluster: BTreeMap<String, usize>,
    /// Groups without a holder (what the leader grants).
    holderless: BTreeSet<GroupKey>,
    /// Groups with a handover in progress.
    handovers: BTreeSet<GroupKey>,
    /// Member records without a lease, by (status_since_ms, id): the retention GC takes the
    /// due ones from the front.
    retired: BTreeSet<(i64, MemberId)>,
    /// Σ max_runners of each group's members that count for the split, uncapped (no zero
    /// entries): [`State::max_capacity`], which every Assignment carries. Summing at read time
    /// walked the group's other member records, cold in a 50,000-member map, on each of the
    /// 50,000 re-attaches after a leader change (7 % of the new leader's CPU at 10,000 × 5).
    capacity: BTreeMap<GroupKey, i64>,
}

impl Indexes {
    /// The indexes of `groups` and `members`, computed from scratch.
    pub fn compute(groups: &BTreeMap<GroupKey, Group>, members: &BTreeMap<MemberId, Member>) -> Indexes {
        let mut idx = Indexes::default();
        for m in members.values() {
            idx.by_group.entry(m.group.clone()).or_default().insert(m.id.clone());
            if !m.status.has_lease() {
                idx.retired.insert((m.status_since_ms, m.id.clone()));
            }
            if m.counts_for_split() && m.max_runners > 0 {
                let c = idx.capacity.entry(m.group.clone()).or_default();
                *c = c.saturating_add(m.max_runners);
            }
        }
        for g in groups.values() {
            match &g.holder {
                Some(h) => {
                    idx.holder_of.insert(g.key.clone(), h.clone());
                    idx.holdings.entry(h.clone()).or_default().insert(g.key.clone());
                    if let Some(m) = members.get(h) {
                        *idx.held_by_cluster.entry(m.cluster.clone()).or_default() += 1;
                    }
                }
                None => {
                    idx.holderless.insert(g.key.clone());
                }
            }
            if g.handover.is_some() {
                idx.handovers.insert(g.key.clone());
            }
        }
        idx
    }

    fn add_held(&mut self, cluster: &str, n: usize) {
        if n > 0 {
            *self.held_by_cluster.entry(cluster.to_string()).or_default() += n;
        }
    }

    fn sub_held(&mut self, cluster: &str, n: usize) {
        if let Some(c) = self.held_by_cluster.get_mut(cluster) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                self.held_by_cluster.remove(cluster);
            }
        }
    }

    fn held_count(&self, m: &MemberId) -> usize {
        self.holdings.get(m).map_or(0, BTreeSet::len)
    }
}

/// Which group changed at which log index (derived, not replicated data). A group appears
/// once, at its latest change, so the log holds at most one entry per group.
#[derive(Clone, Debug, Default)]
struct ChangeLog {
    at: BTreeMap<GroupKey, u64>,
    by_index: BTreeSet<(u64, GroupKey)>,
    /// Changes at or before this index are unknown (the state was deserialized there).
    floor: u64,
}

/// The replicated part of [`State`], as serialized.
#[derive(Deserialize)]
struct StateData {
    last_ts_ms: i64,
    last_index: u64,
    groups: BTreeMap<GroupKey, Group>,
    members: BTreeMap<MemberId, Member>,
    leader_addrs: BTreeMap<u64, String>,
    counters: Counters,
}

/// Every deserialized state (snapshot install, restore at start, tests) goes through
/// [`State::rebuild_indexes`].
impl<'de> Deserialize<'de> for State {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<State, D::Error> {
        let data = StateData::deserialize(d)?;
        let mut s = State {
            last_ts_ms: data.last_ts_ms,
            last_index: data.last_index,
            groups: data.groups,
            members: data.members,
            leader_addrs: data.leader_addrs,
            counters: data.counters,
            ..State::default()
        };
        s.rebuild_indexes();
        Ok(s)
    }
}

/// Equality of the replicated data; the derived indexes follow from it (and the change log
/// depends on how the state was reached, not on what it is).
impl PartialEq for State {
    fn eq(&self, o: &State) -> bool {
        self.last_ts_ms == o.last_ts_ms
            && self.last_index == o.last_index
            && self.groups == o.groups
            && self.members == o.members
            && self.leader_addrs == o.leader_addrs
            && self.counters == o.counters
    }
}
impl Eq for State {}

impl State {
    /// Applies one committed entry. `index` is the entry's Raft log index.
    pub fn apply(&mut self, index: u64, req: &Request) -> Applied {
        let ts = self.last_ts_ms.max(req.ts_ms);
        self.last_ts_ms = ts;
        self.last_index = self.last_index.max(index);
        let Command::Batch(cmds) = &req.cmd else { return self.apply_one(index, ts, &req.cmd) };
        // In order, at this one index; the entry's effects are every command's.
        let mut all = Vec::with_capacity(cmds.len());
        let mut effects = Vec::new();
        for cmd in cmds {
            let a = match cmd {
                Command::Batch(_) => Applied {
                    outcome: Outcome::rejected(RejectReason::InvalidInput, "a batch inside a batch"),
                    effects: Vec::new(),
                },
                cmd => self.apply_one(index, ts, cmd),
            };
            effects.extend(a.effects.iter().cloned());
            all.push(a);
        }
        Applied { outcome: Outcome::Batch(all), effects }
    }

    fn apply_one(&mut self, index: u64, ts: i64, cmd: &Command) -> Applied {
        let mut effects = Vec::new();
        self.note_named_groups(cmd);
        let outcome = self.apply_cmd(index, ts, cmd, &mut effects);
        if let Outcome::Rejected { reason: RejectReason::StaleToken, .. } = outcome {
            self.counters.stale_token_rejections = self.counters.stale_token_rejections.saturating_add(1);
        }
        for key in std::mem::take(&mut self.pending) {
            self.sync_group(&key, index);
        }
        Applied { outcome, effects }
    }

    /// Recomputes every derived index from the data. The one way a deserialized state gets
    /// its indexes; changes before `last_index` become unknown to [`State::groups_changed_since`].
    pub fn rebuild_indexes(&mut self) {
        self.idx = Indexes::compute(&self.groups, &self.members);
        self.changes = ChangeLog { floor: self.last_index, ..ChangeLog::default() };
        self.pending.clear();
    }

    /// The indexes `apply` keeps (for tests comparing them with [`Indexes::compute`]).
    pub fn indexes(&self) -> &Indexes {
        &self.idx
    }

    /// Marks the groups a command names, directly or through its members, as touched: the
    /// end of `apply` syncs their index entries and records the change. Functions that touch
    /// other groups (`recompute`, `gc`, `collect`) mark those themselves.
    fn note_named_groups(&mut self, cmd: &Command) {
        let group_of = |members: &BTreeMap<MemberId, Member>, id: &MemberId| members.get(id).map(|m| m.group.clone());
        match cmd {
            Command::Join(spec) => {
                self.pending.insert(spec.group.clone());
            }
            Command::Leave { member } | Command::SetReady { member, .. } | Command::Drain { member, .. } => {
                self.pending.extend(group_of(&self.members, member));
            }
            Command::Expire { members } | Command::MarkSilent { members } => {
                for (id, _) in members {
                    self.pending.extend(group_of(&self.members, id));
                }
            }
            Command::Grant { group, .. }
            | Command::Revoke { group, .. }
            | Command::Progress { group, .. }
            | Command::SessionOpened { group, .. }
            | Command::Release { group, .. }
            | Command::Adopt { group, .. }
            | Command::RequestHandover { group, .. } => {
                self.pending.insert(group.clone());
            }
            Command::Advertise { .. } | Command::Collect(_) | Command::Batch(_) | Command::SetPolicy(_) => {}
        }
    }

    /// Brings the per-group indexes of `key` in line with `groups[key]` and records that the
    /// group changed at `index`.
    fn sync_group(&mut self, key: &GroupKey, index: u64) {
        let g = self.groups.get(key);
        let new = g.and_then(|g| g.holder.clone());
        let old = self.idx.holder_of.get(key).cloned();
        if old != new {
            if let Some(o) = old {
                self.idx.holder_of.remove(key);
                if let Some(set) = self.idx.holdings.get_mut(&o) {
                    set.remove(key);
                    if set.is_empty() {
                        self.idx.holdings.remove(&o);
                    }
                }
                if let Some(m) = self.members.get(&o) {
                    self.idx.sub_held(&m.cluster, 1);
                }
            }
            if let Some(n) = new {
                self.idx.holder_of.insert(key.clone(), n.clone());
                self.idx.holdings.entry(n.clone()).or_default().insert(key.clone());
                if let Some(m) = self.members.get(&n) {
                    self.idx.add_held(&m.cluster, 1);
                }
            }
        }
        match g {
            Some(g) if g.holder.is_none() => self.idx.holderless.insert(key.clone()),
            _ => self.idx.holderless.remove(key),
        };
        match g {
            Some(g) if g.handover.is_some() => self.idx.handovers.insert(key.clone()),
            _ => self.idx.handovers.remove(key),
        };
        // Every change of a member record puts its group in `pending`, so this sum follows
        // each of them (the index property test checks it against `Indexes::compute`).
        let capacity = self
            .members_of(key)
            .filter(|m| m.counts_for_split() && m.max_runners > 0)
            .fold(0i64, |a, m| a.saturating_add(m.max_runners));
        if capacity > 0 {
            self.idx.capacity.insert(key.clone(), capacity);
        } else {
            self.idx.capacity.remove(key);
        }
        if let Some(prev) = self.changes.at.insert(key.clone(), index) {
            self.changes.by_index.remove(&(prev, key.clone()));
        }
        self.changes.by_index.insert((index, key.clone()));
    }

    /// Inserts (or replaces) a member record, keeping the member indexes.
    fn put_member(&mut self, m: Member) {
        let held = self.idx.held_count(&m.id);
        if let Some(old) = self.members.get(&m.id) {
            let old = old.clone();
            self.unindex_member(&old, held);
        }
        self.idx.by_group.entry(m.group.clone()).or_default().insert(m.id.clone());
        if !m.status.has_lease() {
            self.idx.retired.insert((m.status_since_ms, m.id.clone()));
        }
        self.idx.add_held(&m.cluster, held);
        self.pending.insert(m.group.clone());
        self.members.insert(m.id.clone(), m);
    }

    /// Removes a member record, keeping the member indexes.
    fn drop_member(&mut self, id: &MemberId) {
        let held = self.idx.held_count(id);
        if let Some(old) = self.members.remove(id) {
            self.unindex_member(&old, held);
            self.pending.insert(old.group);
        }
    }

    fn unindex_member(&mut self, old: &Member, held: usize) {
        if let Some(set) = self.idx.by_group.get_mut(&old.group) {
            set.remove(&old.id);
            if set.is_empty() {
                self.idx.by_group.remove(&old.group);
            }
        }
        if !old.status.has_lease() {
            self.idx.retired.remove(&(old.status_since_ms, old.id.clone()));
        }
        self.idx.sub_held(&old.cluster, held);
    }

    /// Sets a member's status (stamped `ts`), keeping the retention index.
    fn set_status(&mut self, id: &MemberId, status: MemberStatus, ts: i64) {
        let Some(m) = self.members.get_mut(id) else { return };
        if !m.status.has_lease() {
            self.idx.retired.remove(&(m.status_since_ms, id.clone()));
        }
        m.status = status;
        m.status_since_ms = ts;
        if !status.has_lease() {
            self.idx.retired.insert((ts, id.clone()));
        }
    }

    /// The member records of a group (any status), in id order.
    pub fn members_of<'a>(&'a self, group: &GroupKey) -> impl Iterator<Item = &'a Member> + 'a {
        self.idx.by_group.get(group).into_iter().flatten().filter_map(|id| self.members.get(id))
    }

    /// The groups `member` holds, with their tokens.
    pub fn holdings_of<'a>(&'a self, member: &MemberId) -> impl Iterator<Item = (&'a GroupKey, u64)> + 'a {
        self.idx.holdings.get(member).into_iter().flatten().filter_map(|k| self.groups.get(k).map(|g| (k, g.token)))
    }

    /// Groups without a holder.
    pub fn holderless_groups(&self) -> impl Iterator<Item = &GroupKey> {
        self.idx.holderless.iter()
    }

    /// Groups with a handover in progress.
    pub fn handover_groups(&self) -> impl Iterator<Item = &Group> {
        self.idx.handovers.iter().filter_map(|k| self.groups.get(k))
    }

    /// Groups that changed after log index `since` (their record, holder, assignments or a
    /// member record of theirs), or `None` when this state does not know (it was
    /// deserialized after `since`): then the caller must treat every group as changed.
    pub fn groups_changed_since(&self, since: u64) -> Option<Vec<GroupKey>> {
        if since < self.changes.floor {
            return None;
        }
        let from = (since.saturating_add(1), GroupKey(String::new()));
        Some(self.changes.by_index.range(from..).map(|(_, k)| k.clone()).collect())
    }

    fn apply_cmd(&mut self, index: u64, ts: i64, cmd: &Command, effects: &mut Vec<Effect>) -> Outcome {
        match cmd {
            Command::Join(spec) => self.join(index, ts, spec),
            Command::Leave { member } => {
                let Some(m) = self.members.get(member) else {
                    return Outcome::rejected(RejectReason::UnknownMember, member.0.clone());
                };
                let group = m.group.clone();
                self.set_status(member, MemberStatus::Left, ts);
                if let Some(g) = self.groups.get_mut(&group)
                    && g.holder.as_ref() == Some(member)
                {
                    g.clear_holder(ts);
                }
                self.recompute(&group, BTreeSet::new());
                self.note_vacancy(&group, ts);
                self.gc(ts);
                Outcome::Done
            }
            Command::Expire { members } => {
                let mut touched = BTreeSet::new();
                for (id, epoch) in members {
                    let Some(m) = self.members.get(id) else { continue };
                    // A Join applied after the leader decided may have started a new lease.
                    if m.epoch != *epoch || !m.status.has_lease() {
                        continue;
                    }
                    let group = m.group.clone();
                    self.set_status(id, MemberStatus::Expired, ts);
                    self.counters.expirations = self.counters.expirations.saturating_add(1);
                    if let Some(g) = self.groups.get_mut(&group)
                        && g.holder.as_ref() == Some(id)
                    {
                        g.clear_holder(ts);
                    }
                    touched.insert(group);
                }
                for g in touched {
                    self.recompute(&g, BTreeSet::new());
                    self.note_vacancy(&g, ts);
                }
                self.gc(ts);
                Outcome::Done
            }
            Command::MarkSilent { members } => {
                for (id, epoch) in members {
                    if self.members.get(id).is_some_and(|m| m.epoch == *epoch && m.status == MemberStatus::Live) {
                        self.set_status(id, MemberStatus::Silent, ts);
                    }
                }
                Outcome::Done
            }
            Command::SetReady { member, ready } => match self.members.get_mut(member) {
                Some(m) => {
                    m.github_ready = *ready;
                    Outcome::Done
                }
                None => Outcome::rejected(RejectReason::UnknownMember, member.0.clone()),
            },
            Command::Grant { group, member } => self.grant(index, ts, group, member),
            Command::Revoke { group, token } => {
                let Some(g) = self.groups.get_mut(group) else {
                    return Outcome::rejected(RejectReason::UnknownGroup, group.0.clone());
                };
                if g.holder.is_none() || g.token != *token {
                    return Outcome::rejected(
                        RejectReason::StaleToken,
                        format!("token {token} is not current ({})", g.token),
                    );
                }
                g.clear_holder(ts);
                self.counters.revocations = self.counters.revocations.saturating_add(1);
                Outcome::Done
            }
            Command::Progress { member, group, token, message_id, statistics, events } => {
                if let Err(o) = self.check_holder(group, member, *token) {
                    return o;
                }
                let Some(g) = self.groups.get_mut(group) else {
                    return Outcome::rejected(RejectReason::UnknownGroup, group.0.clone());
                };
                let mut dirty = BTreeSet::new();
                if let Some(mid) = message_id {
                    if *mid <= g.last_acked_message_id {
                        return Outcome::Accepted { duplicate: true };
                    }
                    g.last_acked_message_id = *mid;
                    g.statistics = sanitize(*statistics);
                    for ev in events {
                        let owner = route_runner(&self.idx, &self.members, group, &ev.runner_name);
                        match ev.kind {
                            JobEventKind::Started => {
                                g.busy_runners.insert(ev.runner_name.clone(), ev.job_id.clone());
                            }
                            JobEventKind::Completed => {
                                g.busy_runners.remove(&ev.runner_name);
                            }
                        }
                        if let Some(owner) = owner {
                            dirty.insert(owner.clone());
                            effects.push(Effect::JobEvent { member: owner, group: group.clone(), event: ev.clone() });
                        }
                    }
                }
                self.recompute(group, dirty);
                Outcome::Accepted { duplicate: false }
            }
            Command::SessionOpened { member, group, token, session_id, statistics } => {
                if session_id.is_empty() {
                    return Outcome::rejected(RejectReason::InvalidInput, "session_id is empty");
                }
                if let Err(o) = self.check_holder(group, member, *token) {
                    // A stale holder opened a session: it must be deleted by the current holder.
                    if let Some(g) = self.groups.get_mut(group)
                        && g.session_id.as_deref() != Some(session_id.as_str())
                    {
                        g.add_stale(session_id.clone(), ts);
                        if g.holder.is_some() {
                            effects.push(Effect::DeleteSessions {
                                group: group.clone(),
                                token: g.token,
                                session_ids: vec![session_id.clone()],
                            });
                        }
                    }
                    return o;
                }
                let Some(g) = self.groups.get_mut(group) else {
                    return Outcome::rejected(RejectReason::UnknownGroup, group.0.clone());
                };
                if g.session_id.as_deref() == Some(session_id.as_str()) {
                    return Outcome::Accepted { duplicate: true };
                }
                if let Some(old) = g.session_id.replace(session_id.clone()) {
                    g.add_stale(old, ts);
                }
                g.forget_stale(session_id);
                g.statistics = sanitize(*statistics);
                self.recompute(group, BTreeSet::new());
                Outcome::Accepted { duplicate: false }
            }
            Command::Release { member, group, token, deleted, reason } => {
                if let Err(o) = self.check_holder(group, member, *token) {
                    return o;
                }
                let Some(g) = self.groups.get_mut(group) else {
                    return Outcome::rejected(RejectReason::UnknownGroup, group.0.clone());
                };
                for id in deleted {
                    g.forget_stale(id);
                }
                if *reason == ReleaseReason::StaleRevoked {
                    return Outcome::Accepted { duplicate: false };
                }
                if let Some(s) = &g.session_id
                    && deleted.contains(s)
                {
                    g.session_id = None;
                }
                g.clear_holder(ts);
                if *reason == ReleaseReason::Stall
                    && let Some(m) = self.members.get(member)
                {
                    let cd = g.cooldowns.entry(m.cluster.clone()).or_insert(Cooldown { until_ms: 0, strikes: 0 });
                    let len = STALL_COOLDOWN_MS.saturating_mul(1i64 << cd.strikes.min(6)).min(MAX_COOLDOWN_MS);
                    cd.strikes = cd.strikes.saturating_add(1);
                    cd.until_ms = ts.saturating_add(len);
                }
                self.recompute(group, BTreeSet::new());
                Outcome::Accepted { duplicate: false }
            }
            Command::Adopt { member, group, session_id, statistics } => {
                if session_id.is_empty() {
                    return Outcome::rejected(RejectReason::InvalidInput, "session_id is empty");
                }
                let in_group = self.members.get(member).is_some_and(|m| &m.group == group && m.status.has_lease());
                if !in_group {
                    return Outcome::rejected(
                        RejectReason::NotEligible,
                        format!("member {member} has no lease in {group}"),
                    );
                }
                // An Adopt is a Grant the member asks for: it obeys the same eligibility
                // (standby, draining, cooldown, allow-list, github_ready). Checked only for a
                // holderless group: a lost race must still reach the holder below.
                let holderless = self.groups.get(group).is_some_and(|g| g.holder.is_none());
                let refused = if holderless { self.eligible(group, member, ts).err() } else { None };
                let Some(g) = self.groups.get_mut(group) else {
                    return Outcome::rejected(RejectReason::UnknownGroup, group.0.clone());
                };
                if let Some(why) = refused {
                    // The refused adopter forgets its session; the next holder deletes it.
                    if g.session_id.as_deref() != Some(session_id.as_str()) {
                        g.add_stale(session_id.clone(), ts);
                    }
                    return Outcome::rejected(RejectReason::NotEligible, why);
                }
                match &g.holder {
                    None => {
                        if index <= g.token {
                            return Outcome::rejected(
                                RejectReason::StaleToken,
                                "log index not above the current token",
                            );
                        }
                        if let Some(old) = g.session_id.replace(session_id.clone())
                            && &old != session_id
                        {
                            g.add_stale(old, ts);
                        }
                        g.forget_stale(session_id);
                        g.holder = Some(member.clone());
                        g.token = index;
                        g.prefer_next = None;
                        g.holder_since_ms = ts;
                        g.statistics = sanitize(*statistics);
                        self.counters.grants = self.counters.grants.saturating_add(1);
                        self.recompute(group, BTreeSet::new());
                        Outcome::Granted { token: index }
                    }
                    Some(h) if h == member => {
                        if let Some(old) = g.session_id.replace(session_id.clone())
                            && &old != session_id
                        {
                            g.add_stale(old, ts);
                        }
                        g.forget_stale(session_id);
                        Outcome::Accepted { duplicate: false }
                    }
                    Some(_) => {
                        if g.session_id.as_deref() != Some(session_id.as_str()) {
                            g.add_stale(session_id.clone(), ts);
                            effects.push(Effect::DeleteSessions {
                                group: group.clone(),
                                token: g.token,
                                session_ids: vec![session_id.clone()],
                            });
                        }
                        Outcome::rejected(RejectReason::Conflict, "the group already has a holder")
                    }
                }
            }
            Command::RequestHandover { group, to, deadline_ms } => {
                if let Some(t) = to {
                    let ok = self.members.get(t).is_some_and(|m| &m.group == group);
                    if !ok {
                        return Outcome::rejected(RejectReason::NotEligible, format!("member {t} is not in {group}"));
                    }
                    let holds = self.groups.get(group).is_some_and(|g| g.holder.as_ref() == Some(t));
                    if !holds && let Err(why) = self.eligible(group, t, ts) {
                        return Outcome::rejected(RejectReason::NotEligible, why);
                    }
                }
                let Some(g) = self.groups.get_mut(group) else {
                    return Outcome::rejected(RejectReason::UnknownGroup, group.0.clone());
                };
                let Some(from) = g.holder.clone() else {
                    return Outcome::rejected(RejectReason::NotEligible, "the group has no holder");
                };
                if to.as_ref() == Some(&from) {
                    return Outcome::rejected(RejectReason::InvalidInput, "the target already holds the group");
                }
                g.handover = Some(Handover {
                    from,
                    token: g.token,
                    to: to.clone(),
                    deadline_ms: ts.saturating_add((*deadline_ms).max(0)),
                    timeout_ms: (*deadline_ms).max(0),
                });
                self.counters.handovers = self.counters.handovers.saturating_add(1);
                Outcome::Done
            }
            Command::Drain { member, handover_deadline_ms } => {
                let Some(m) = self.members.get_mut(member) else {
                    return Outcome::rejected(RejectReason::UnknownMember, member.0.clone());
                };
                m.draining = true;
                let group = m.group.clone();
                if let Some(g) = self.groups.get_mut(&group)
                    && g.holder.as_ref() == Some(member)
                    && g.handover.is_none()
                {
                    g.handover = Some(Handover {
                        from: member.clone(),
                        token: g.token,
                        to: None,
                        deadline_ms: ts.saturating_add((*handover_deadline_ms).max(0)),
                        timeout_ms: (*handover_deadline_ms).max(0),
                    });
                    self.counters.handovers = self.counters.handovers.saturating_add(1);
                }
                self.recompute(&group, BTreeSet::new());
                Outcome::Done
            }
            Command::Advertise { node, addr } => {
                self.leader_addrs.insert(*node, addr.clone());
                Outcome::Done
            }
            // Checked again here: an entry written by another version must not install a
            // policy this version would refuse.
            Command::SetPolicy(p) => match p.validate() {
                Ok(()) => {
                    self.policy = p.clone();
                    Outcome::Done
                }
                Err(e) => Outcome::rejected(RejectReason::InvalidInput, e),
            },
            Command::Collect(policy) => {
                self.collect(ts, policy);
                Outcome::Done
            }
            // `apply` unpacks batches; one nested in a batch is refused there.
            Command::Batch(_) => Outcome::rejected(RejectReason::InvalidInput, "a batch inside a batch"),
        }
    }

    /// Stamps the group vacant at `ts` once no member of it holds a lease.
    fn note_vacancy(&mut self, group: &GroupKey, ts: i64) {
        let leased = self.members_of(group).any(|m| m.status.has_lease());
        if let Some(g) = self.groups.get_mut(group) {
            if leased {
                g.vacant_since_ms = None;
            } else if g.vacant_since_ms.is_none() {
                g.vacant_since_ms = Some(ts);
            }
        }
    }

    /// What a `Collect` with `policy` applied at leader time `ts` would remove. The leader
    /// proposes one only when this is not empty; `apply` computes it again from the same
    /// inputs (state, entry timestamp, policy), so every voter removes the same things.
    ///
    /// Cost: one pass over members and groups, with members indexed by group, so a runner is
    /// matched against its own group's members only.
    pub fn garbage(&self, ts: i64, policy: &GcPolicy) -> Garbage {
        let group_after = policy.group_gc_after_ms.max(0);
        let session_ttl = policy.stale_session_ttl_ms.max(0);
        let mut by_group: BTreeMap<&GroupKey, Vec<&Member>> = BTreeMap::new();
        let mut out = Garbage::default();
        for m in self.members.values() {
            by_group.entry(&m.group).or_default().push(m);
            if member_due(m, ts) {
                out.members = out.members.saturating_add(1);
            }
        }
        for g in self.groups.values() {
            // Member records that survive this Collect's member pass (it runs first).
            let members: Vec<&Member> = by_group
                .get(&g.key)
                .map(|v| v.iter().copied().filter(|m| !member_due(m, ts)).collect())
                .unwrap_or_default();
            let leased = members.iter().any(|m| m.status.has_lease());
            match g.vacant_since_ms {
                None if !leased => out.unstamped = out.unstamped.saturating_add(1),
                Some(since) if members.is_empty() && g.holder.is_none() && ts.saturating_sub(since) >= group_after => {
                    out.groups.push(g.key.clone());
                    continue;
                }
                _ => {}
            }
            for runner in g.busy_runners.keys() {
                let owned = members
                    .iter()
                    .any(|m| runner.strip_prefix(m.ers_name.as_str()).is_some_and(|rest| rest.starts_with('-')));
                if !owned {
                    out.busy_runners.push((g.key.clone(), runner.clone()));
                }
            }
            for id in &g.stale_sessions {
                if g.session_id.as_ref() == Some(id) {
                    continue;
                }
                match g.stale_since_ms.get(id) {
                    Some(since) if ts.saturating_sub(*since) >= session_ttl => {
                        out.stale_sessions.push((g.key.clone(), id.clone()))
                    }
                    Some(_) => {}
                    None => out.unstamped = out.unstamped.saturating_add(1),
                }
            }
        }
        out
    }

    /// Applies a `Collect`: member records past retention first, then what
    /// [`State::garbage`] names; entries without a stamp (state written before stamps
    /// existed) are stamped with `ts`. Never touches a holder, a token or a current session.
    fn collect(&mut self, ts: i64, policy: &GcPolicy) {
        self.gc(ts);
        let garbage = self.garbage(ts, policy);
        let mut removed = 0u64;
        for key in &garbage.groups {
            if self.groups.remove(key).is_some() {
                removed += 1;
                self.pending.insert(key.clone());
            }
        }
        let mut touched = BTreeSet::new();
        for (key, runner) in &garbage.busy_runners {
            if let Some(g) = self.groups.get_mut(key)
                && g.busy_runners.remove(runner).is_some()
            {
                removed += 1;
                touched.insert(key.clone());
            }
        }
        for (key, id) in &garbage.stale_sessions {
            if let Some(g) = self.groups.get_mut(key)
                && g.stale_sessions.contains(id)
            {
                g.forget_stale(id);
                removed += 1;
                self.pending.insert(key.clone());
            }
        }
        if garbage.unstamped > 0 {
            let leased: BTreeSet<&GroupKey> =
                self.members.values().filter(|m| m.status.has_lease()).map(|m| &m.group).collect();
            for g in self.groups.values_mut() {
                let before = (g.vacant_since_ms, g.stale_since_ms.len());
                if g.vacant_since_ms.is_none() && !leased.contains(&g.key) {
                    g.vacant_since_ms = Some(ts);
                }
                for id in &g.stale_sessions {
                    g.stale_since_ms.entry(id.clone()).or_insert(ts);
                }
                if before != (g.vacant_since_ms, g.stale_since_ms.len()) {
                    self.pending.insert(g.key.clone());
                }
            }
        }
        for key in touched {
            self.recompute(&key, BTreeSet::new());
        }
        self.counters.collected = self.counters.collected.saturating_add(removed);
    }

    fn join(&mut self, index: u64, ts: i64, spec: &JoinSpec) -> Outcome {
        if let Err(e) = spec.validate() {
            return Outcome::rejected(RejectReason::InvalidInput, e.to_string());
        }
        // A member id belongs to the cluster that first joined it, for as long as the state
        // remembers the member (invariant 6). Decided here, in log order, so two racing
        // Joins from different clusters cannot both pass a read made before proposing.
        if let Some(existing) = self.members.get(&spec.member)
            && existing.cluster != spec.cluster
        {
            return Outcome::rejected(
                RejectReason::WrongCluster,
                format!(
                    "a certificate of cluster {} tried to act for a member of cluster {} ({})",
                    spec.cluster, existing.cluster, spec.member
                ),
            );
        }
        if let Some(existing) = self.members.get(&spec.member)
            && existing.group != spec.group
        {
            return Outcome::rejected(
                RejectReason::InvalidInput,
                format!("member {} already joined group {}", spec.member, existing.group),
            );
        }
        // The operators' policy: may this cluster join this group, with these bounds?
        let other_sets: BTreeSet<(&str, &str)> = self
            .members_of(&spec.group)
            .filter(|m| m.status.has_lease() && m.cluster == spec.cluster && m.id != spec.member)
            .map(|m| (m.ers_namespace.as_str(), m.ers_name.as_str()))
            .filter(|ers| *ers != (spec.ers_namespace.as_str(), spec.ers_name.as_str()))
            .collect();
        let ask = crate::policy::JoinAsk {
            group: &spec.group.0,
            cluster: &spec.cluster,
            priority: spec.priority,
            weight: spec.weight,
            other_sets_of_cluster: other_sets.len(),
        };
        if let Err(why) = self.policy.admit(&ask) {
            return Outcome::rejected(RejectReason::Policy, why);
        }
        // The ERS name routes runners to members: it must be unique within the group.
        let clash = self
            .members_of(&spec.group)
            .find(|m| m.status.has_lease() && m.ers_name == spec.ers_name && m.cluster != spec.cluster);
        if let Some(c) = clash {
            return Outcome::rejected(
                RejectReason::Conflict,
                format!("ERS name {} is already used by cluster {} in this group", spec.ers_name, c.cluster),
            );
        }
        let group =
            self.groups.entry(spec.group.clone()).or_insert_with(|| Group::new(spec.group.clone(), spec.policy));
        if let Some(allow) = &group.allow_clusters
            && !allow.contains(&spec.cluster)
        {
            return Outcome::rejected(RejectReason::NotEligible, format!("cluster {} is not allowed", spec.cluster));
        }
        // Older incarnations of the same (cluster, ERS) become standbys.
        let superseded: Vec<MemberId> = self
            .members_of(&spec.group)
            .filter(|m| {
                m.id != spec.member
                    && m.cluster == spec.cluster
                    && m.ers_namespace == spec.ers_namespace
                    && m.ers_name == spec.ers_name
            })
            .map(|m| m.id.clone())
            .collect();
        for id in superseded {
            if let Some(m) = self.members.get_mut(&id) {
                m.standby = true;
            }
        }
        let keep = self.members.get(&spec.member).filter(|m| m.status.has_lease());
        let draining = keep.is_some_and(|m| m.draining);
        let member = Member {
            id: spec.member.clone(),
            cluster: spec.cluster.clone(),
            group: spec.group.clone(),
            ers_namespace: spec.ers_namespace.clone(),
            ers_name: spec.ers_name.clone(),
            weight: spec.weight,
            min_runners: spec.min_runners,
            max_runners: spec.max_runners,
            priority: spec.priority,
            github_ready: spec.github_ready,
            status: MemberStatus::Live,
            epoch: index,
            draining,
            standby: false,
            status_since_ms: ts,
        };
        self.put_member(member);
        if let Some(g) = self.groups.get_mut(&spec.group) {
            g.vacant_since_ms = None;
        }
        self.recompute(&spec.group, BTreeSet::new());
        self.gc(ts);
        Outcome::Joined { epoch: index }
    }

    /// Whether a Join carrying `epoch` may re-attach to the member's existing lease without a
    /// log entry: the member is live in this state under that epoch, of the same cluster and
    /// group, not a standby, allowed in its group, and asks for nothing a log Join would change
    /// (ERS, weight, bounds, priority). `github_ready` may differ: the keepalive proposes
    /// `SetReady` for it as it does on any stream. The leader must also hold the lease live
    /// ([`crate::LeaseTable::on_resume`]); a `false` here means the Join goes through the log.
    pub fn resumable(&self, spec: &JoinSpec, epoch: u64) -> bool {
        let Some(m) = self.members.get(&spec.member) else { return false };
        let allowed = self
            .groups
            .get(&spec.group)
            .is_some_and(|g| g.allow_clusters.as_ref().is_none_or(|a| a.contains(&spec.cluster)));
        epoch != 0
            && allowed
            && m.epoch == epoch
            && m.status == MemberStatus::Live
            && !m.standby
            && m.cluster == spec.cluster
            && m.group == spec.group
            && m.ers_namespace == spec.ers_namespace
            && m.ers_name == spec.ers_name
            && m.weight == spec.weight
            && m.min_runners == spec.min_runners
            && m.max_runners == spec.max_runners
            && m.priority == spec.priority
    }

    fn grant(&mut self, index: u64, ts: i64, group: &GroupKey, member: &MemberId) -> Outcome {
        if let Err(why) = self.eligible(group, member, ts) {
            return Outcome::rejected(RejectReason::NotEligible, why);
        }
        let Some(g) = self.groups.get_mut(group) else {
            return Outcome::rejected(RejectReason::UnknownGroup, group.0.clone());
        };
        if g.holder.is_some() {
            return Outcome::rejected(RejectReason::Conflict, "the group already has a holder");
        }
        if index <= g.token {
            return Outcome::rejected(RejectReason::StaleToken, "log index not above the current token");
        }
        if let Some(s) = g.session_id.take() {
            g.add_stale(s, ts);
        }
        g.holder = Some(member.clone());
        g.token = index;
        g.handover = None;
        g.prefer_next = None;
        g.holder_since_ms = ts;
        self.counters.grants = self.counters.grants.saturating_add(1);
        self.recompute(group, BTreeSet::new());
        Outcome::Granted { token: index }
    }

    /// Why `member` may not be granted `group` now (`ts` is the clamped leader time).
    pub fn eligible(&self, group: &GroupKey, member: &MemberId, ts: i64) -> Result<(), String> {
        let m = self.members.get(member).ok_or_else(|| format!("unknown member {member}"))?;
        let g = self.groups.get(group).ok_or_else(|| format!("unknown group {group}"))?;
        if &m.group != group {
            return Err(format!("member {member} is in group {}", m.group));
        }
        if m.status != MemberStatus::Live {
            return Err(format!("member {member} is {}", m.status.as_str()));
        }
        if m.draining {
            return Err(format!("member {member} is draining"));
        }
        if m.standby {
            return Err(format!("member {member} is a standby (superseded)"));
        }
        if !m.github_ready {
            return Err(format!("member {member} is not github_ready"));
        }
        if let Some(allow) = &g.allow_clusters
            && !allow.contains(&m.cluster)
        {
            return Err(format!("cluster {} is not allowed", m.cluster));
        }
        if let Some(cd) = g.cooldowns.get(&m.cluster)
            && ts < cd.until_ms
        {
            return Err(format!("cluster {} is in holder-stall cooldown", m.cluster));
        }
        Ok(())
    }

    /// The deterministic choice for a holderless group: the handover target if eligible,
    /// else by configured priority, then lowest load (groups held by the cluster), then
    /// cluster name. `live` says which members the leader currently holds a valid lease for.
    pub fn choose_holder(&self, group: &GroupKey, ts: i64, live: &dyn Fn(&MemberId) -> bool) -> Option<MemberId> {
        let g = self.groups.get(group)?;
        if g.holder.is_some() {
            return None;
        }
        let ok = |id: &MemberId| live(id) && self.eligible(group, id, ts).is_ok();
        if let Some(p) = &g.prefer_next
            && ok(p)
        {
            return Some(p.clone());
        }
        // Groups held by the cluster, from the index: the choice costs what the group's
        // members cost, whatever the number of groups.
        let load = |cluster: &str| self.idx.held_by_cluster.get(cluster).copied().unwrap_or(0);
        self.members_of(group)
            .filter(|m| ok(&m.id))
            .min_by(|a, b| {
                (a.priority, load(&a.cluster), &a.cluster, &a.id).cmp(&(
                    b.priority,
                    load(&b.cluster),
                    &b.cluster,
                    &b.id,
                ))
            })
            .map(|m| m.id.clone())
    }

    fn check_holder(&self, group: &GroupKey, member: &MemberId, token: u64) -> Result<(), Outcome> {
        let Some(g) = self.groups.get(group) else {
            return Err(Outcome::rejected(RejectReason::UnknownGroup, group.0.clone()));
        };
        if g.token != token || g.holder.as_ref() != Some(member) {
            return Err(Outcome::rejected(
                RejectReason::StaleToken,
                format!("token {token} of {member} is not the current one ({}) of {group}", g.token),
            ));
        }
        Ok(())
    }

    /// Σ max_i of the live, non-draining members, capped to int32 (X-ScaleSetMaxCapacity).
    pub fn max_capacity(&self, group: &GroupKey) -> i64 {
        self.idx.capacity.get(group).copied().unwrap_or(0).min(MAX_CAPACITY)
    }

    /// Busy runners of a member: those whose name its ERS name prefixes.
    pub fn busy_of(&self, member: &MemberId) -> i64 {
        let Some(m) = self.members.get(member) else { return 0 };
        let Some(g) = self.groups.get(&m.group) else { return 0 };
        g.busy_runners
            .keys()
            .filter(|r| route_runner(&self.idx, &self.members, &m.group, r).as_ref() == Some(member))
            .count() as i64
    }

    /// Recomputes the split of one group and bumps its revision.
    fn recompute(&mut self, group: &GroupKey, dirty: BTreeSet<MemberId>) {
        self.pending.insert(group.clone());
        let live: Vec<&Member> = self.members_of(group).filter(|m| m.counts_for_split()).collect();
        let Some(g) = self.groups.get(group) else { return };
        let inputs: Vec<SplitInput> = live
            .iter()
            .map(|m| SplitInput {
                cluster: m.cluster.clone(),
                weight: m.weight,
                min: m.min_runners,
                max: m.max_runners,
                busy: self.busy_of(&m.id),
                priority: m.priority,
            })
            .collect();
        let out = split(g.statistics.total_assigned_jobs, &inputs, g.policy);
        let assignments: BTreeMap<MemberId, i64> = live.iter().map(|m| m.id.clone()).zip(out).collect();
        let Some(g) = self.groups.get_mut(group) else { return };
        g.assignments = assignments;
        g.dirty = dirty;
        g.revision = g.revision.saturating_add(1);
    }

    /// Drops expired/left members after the retention period, so snapshots stay small.
    /// Takes the due records from the front of the retention index (oldest first).
    fn gc(&mut self, ts: i64) {
        while let Some((_, id)) = self.idx.retired.first().cloned() {
            if !self.members.get(&id).is_some_and(|m| member_due(m, ts)) {
                break;
            }
            self.drop_member(&id);
        }
    }

    /// Assignment of a member in the applied state (0 when it has none).
    pub fn assignment_of(&self, member: &MemberId) -> i64 {
        self.members
            .get(member)
            .and_then(|m| self.groups.get(&m.group))
            .and_then(|g| g.assignments.get(member).copied())
            .unwrap_or(0)
    }
}

/// An expired or left member whose record has been kept for `status` long enough.
fn member_due(m: &Member, ts: i64) -> bool {
    !m.status.has_lease() && ts.saturating_sub(m.status_since_ms) >= MEMBER_RETENTION_MS
}

/// What a `Collect` would remove now (see [`State::garbage`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Garbage {
    /// Expired/left member records past [`MEMBER_RETENTION_MS`].
    pub members: usize,
    /// Groups with no member record and no leased member for `group_gc_after_ms`.
    pub groups: Vec<GroupKey>,
    /// Busy runners that no member record of their group owns (by ERS-name prefix). A
    /// departed member's record is kept [`MEMBER_RETENTION_MS`], so a restarted agent (a new
    /// member id with the same ERS) within that time takes its runners back.
    pub busy_runners: Vec<(GroupKey, String)>,
    /// Stale-session ids older than `stale_session_ttl_ms` (never the current session).
    pub stale_sessions: Vec<(GroupKey, String)>,
    /// Vacant groups and stale ids without a stamp (state from before stamps): stamped.
    pub unstamped: usize,
}

impl Garbage {
    pub fn is_empty(&self) -> bool {
        self.members == 0
            && self.groups.is_empty()
            && self.busy_runners.is_empty()
            && self.stale_sessions.is_empty()
            && self.unstamped == 0
    }
}

/// The member whose ERS name (followed by `-`) is the longest prefix of the runner name.
fn route_runner(
    idx: &Indexes,
    members: &BTreeMap<MemberId, Member>,
    group: &GroupKey,
    runner: &str,
) -> Option<MemberId> {
    idx.by_group
        .get(group)
        .into_iter()
        .flatten()
        .filter_map(|id| members.get(id))
        .filter(|m| !m.standby && m.status.has_lease())
        .filter(|m| runner.strip_prefix(m.ers_name.as_str()).is_some_and(|rest| rest.starts_with('-')))
        .max_by_key(|m| m.ers_name.len())
        .map(|m| m.id.clone())
}

fn sanitize(s: Statistics) -> Statistics {
    Statistics {
        total_available_jobs: s.total_available_jobs.max(0),
        total_acquired_jobs: s.total_acquired_jobs.max(0),
        total_assigned_jobs: s.total_assigned_jobs.max(0),
        total_running_jobs: s.total_running_jobs.max(0),
        total_registered_runners: s.total_registered_runners.max(0),
        total_busy_runners: s.total_busy_runners.max(0),
        total_idle_runners: s.total_idle_runners.max(0),
    }
}
