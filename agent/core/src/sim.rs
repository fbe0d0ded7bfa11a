//! ARC's EphemeralRunnerSet controller as a pure model (reference §5.5, DESIGN §9 "The sim backend").
//!
//! ```text
//!  on_patch(replicas, patchID) ─┐                          ┌─▶ Create{name}          (generate a JIT config)
//!  runner registered / online ──┼─▶ ErsModel::reconcile ───┤
//!  job started / completed ─────┤   (ARC's rules, no I/O)  └─▶ Remove{name, id}      (RemoveRunner, then delete)
//!  RemoveRunner result ─────────┘
//! ```
//! It is deliberately *not* "runners = replicas": each runner carries the `actions.github.com/patch-id`
//! annotation of the spec it was created under, and the controller scales only when
//! `spec.patchID == 0` or `spec.patchID != latestPatchID` (the largest annotation among the children).
//! A `patchID > 0` never deletes (scale-down is deferred until runners finish); `patchID == 0` culls
//! idle runners (pending first, oldest first, never unregistered or busy ones). Finished runners are
//! deleted, and replaced only once the controller scales again — which is why the listener must send a
//! fresh patch id on every push (DESIGN §5.6).
//!
//! Runner names are `<ers>-runner-<5 chars>` like Kubernetes' `generateName`; the random part comes
//! from a seed kept in the (serialisable) state, so the model stays pure and a restored model never
//! reuses a name.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The annotation ARC's controller puts on every EphemeralRunner it creates.
pub const PATCH_ID_ANNOTATION: &str = "actions.github.com/patch-id";

/// Kubernetes' `generateName` alphabet (no vowels, no look-alikes).
const NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// What the driver must do for the model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SimAction {
    /// Create an EphemeralRunner: generate its JIT config, then report
    /// [`ErsModel::on_runner_registered`] and [`ErsModel::on_runner_online`] (or
    /// [`ErsModel::on_runner_failed`]).
    Create { name: String },
    /// `RemoveRunner(runner_id)` at GitHub, then report [`ErsModel::on_remove_result`].
    Remove { name: String, runner_id: i64 },
}

/// An EphemeralRunner's `status.phase`, as far as the ERS controller distinguishes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Created; not (yet) online. May or may not be registered (`runner_id != 0`).
    Pending,
    /// Online (`status.ready`).
    Running,
    /// Its registration failed for good; counts towards the total, never culled (ARC keeps it).
    Failed,
    /// Its job finished (`Succeeded`): deleted by the controller, not counted.
    Finished,
}

/// One EphemeralRunner child of the set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimRunner {
    pub name: String,
    /// `status.runnerId`; 0 until the JIT config is generated.
    pub runner_id: i64,
    /// The `actions.github.com/patch-id` annotation: `spec.patchID` when it was created.
    pub patch_id: i64,
    pub phase: Phase,
    /// `status.jobId` is set (JobStarted patch), or GitHub answered JobStillRunning.
    pub busy: bool,
    /// `metadata.deletionTimestamp` is set: RemoveRunner is pending or in flight. Not counted in the total.
    pub deleting: bool,
    /// A RemoveRunner call for it is in flight (so it is not issued twice).
    pub remove_in_flight: bool,
    /// Creation order (`creationTimestamp`); "oldest first" sorts on it.
    pub created: u64,
}

impl SimRunner {
    fn counted(&self) -> bool {
        !self.deleting && matches!(self.phase, Phase::Pending | Phase::Running | Phase::Failed)
    }
}

/// The EphemeralRunnerSet and its children, from the controller's point of view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErsModel {
    /// The ERS name: runner names are `<ers>-runner-<5 chars>`.
    pub ers: String,
    /// `spec.replicas` (absent = 0).
    replicas: i64,
    /// `spec.patchID`.
    patch_id: i64,
    runners: BTreeMap<String, SimRunner>,
    /// State of the name generator (splitmix64), so names stay unique across restarts.
    name_state: u64,
    next_created: u64,
}

impl ErsModel {
    /// An empty set named `ers`; `seed` feeds the runner-name suffixes.
    pub fn new(ers: &str, seed: u64) -> ErsModel {
        ErsModel {
            ers: ers.to_string(),
            replicas: 0,
            patch_id: 0,
            runners: BTreeMap::new(),
            name_state: seed,
            next_created: 0,
        }
    }

    pub fn replicas(&self) -> i64 {
        self.replicas
    }

    pub fn patch_id(&self) -> i64 {
        self.patch_id
    }

    /// Largest `patch-id` annotation among the children (deleting and finished ones included, as ARC), 0 if none.
    pub fn latest_patch_id(&self) -> i64 {
        self.runners.values().map(|r| r.patch_id).max().unwrap_or(0).max(0)
    }

    /// `pending + running + failed`, the count the controller compares with `replicas`.
    pub fn total(&self) -> i64 {
        self.runners.values().filter(|r| r.counted()).count() as i64
    }

    pub fn pending(&self) -> usize {
        self.runners.values().filter(|r| !r.deleting && r.phase == Phase::Pending).count()
    }

    pub fn running(&self) -> usize {
        self.runners.values().filter(|r| !r.deleting && r.phase == Phase::Running).count()
    }

    pub fn failed(&self) -> usize {
        self.runners.values().filter(|r| !r.deleting && r.phase == Phase::Failed).count()
    }

    /// Running runners with a job.
    pub fn busy(&self) -> usize {
        self.runners.values().filter(|r| !r.deleting && r.phase == Phase::Running && r.busy).count()
    }

    /// Running runners without a job.
    pub fn idle(&self) -> usize {
        self.runners.values().filter(|r| !r.deleting && r.phase == Phase::Running && !r.busy).count()
    }

    /// Runners being deleted (finished, or culled and waiting for RemoveRunner).
    pub fn deleting(&self) -> usize {
        self.runners.values().filter(|r| r.deleting).count()
    }

    pub fn runner(&self, name: &str) -> Option<&SimRunner> {
        self.runners.get(name)
    }

    /// Every child, in name order.
    pub fn runners(&self) -> impl Iterator<Item = &SimRunner> {
        self.runners.values()
    }

    /// The listener's merge patch `{"spec":{"patchID":P,"replicas":R}}` landed.
    pub fn on_patch(&mut self, replicas: i64, patch_id: i64) -> Vec<SimAction> {
        self.replicas = replicas.max(0);
        self.patch_id = patch_id.max(0);
        self.reconcile()
    }

    /// The runner's JIT config was generated: `status.runnerId` is known. Unknown names are ignored.
    /// (The runner may already have taken a job: the emulator's runners race the driver.)
    pub fn on_runner_registered(&mut self, name: &str, runner_id: i64) {
        if let Some(r) = self.runners.get_mut(name)
            && r.runner_id == 0
        {
            r.runner_id = runner_id;
        }
    }

    /// The runner's pod is up and the runner connected (`status.ready`).
    pub fn on_runner_online(&mut self, name: &str) {
        if let Some(r) = self.runners.get_mut(name)
            && r.phase == Phase::Pending
        {
            r.phase = Phase::Running;
        }
    }

    /// The runner could not be registered (ARC marks it `Failed` after its retries); it keeps counting.
    pub fn on_runner_failed(&mut self, name: &str) {
        if let Some(r) = self.runners.get_mut(name)
            && r.phase == Phase::Pending
        {
            r.phase = Phase::Failed;
        }
    }

    /// The listener's JobStarted status patch: `status.jobId` is set, so scale-down skips it.
    /// Unknown names are ignored (the status patch of a gone runner is a 404).
    pub fn on_job_started(&mut self, name: &str) {
        if let Some(r) = self.runners.get_mut(name)
            && r.phase != Phase::Finished
        {
            r.busy = true;
            // A runner that takes a job is online even if we missed that event.
            if r.phase == Phase::Pending {
                r.phase = Phase::Running;
            }
        }
    }

    /// The runner's job ended and the ephemeral runner exited: it is `Succeeded` and the controller deletes it.
    pub fn on_job_completed(&mut self, name: &str) -> Vec<SimAction> {
        match self.runners.get_mut(name) {
            Some(r) if r.phase != Phase::Finished => {
                r.phase = Phase::Finished;
                r.busy = false;
                r.deleting = true;
            }
            _ => return Vec::new(),
        }
        self.reconcile()
    }

    /// Registered, online runners not being deleted: the ones whose pod could have exited since.
    /// The driver asks GitHub about each now and then and reports [`ErsModel::on_runner_gone`].
    pub fn runners_to_check(&self) -> Vec<(String, i64)> {
        self.runners
            .values()
            .filter(|r| r.phase == Phase::Running && r.runner_id != 0 && !r.deleting)
            .map(|r| (r.name.clone(), r.runner_id))
            .collect()
    }

    /// GitHub no longer lists the registered runner `name`: an ephemeral runner deregisters when
    /// its one job ends and its pod exits, so it is finished whatever messages about it were lost
    /// (a JobCompleted in a deleted session's queue, or a JobStarted never routed here). Without
    /// this a busy runner whose JobCompleted never arrived is counted forever and blocks the
    /// replacement the set needs.
    pub fn on_runner_gone(&mut self, name: &str) -> Vec<SimAction> {
        match self.runners.get(name) {
            Some(r) if r.phase == Phase::Running && r.runner_id != 0 && !r.deleting => self.on_job_completed(name),
            _ => Vec::new(),
        }
    }

    /// Result of a `Remove` action. `removed = false` is GitHub's `JobStillRunningException`.
    pub fn on_remove_result(&mut self, name: &str, removed: bool) -> Vec<SimAction> {
        let Some(r) = self.runners.get_mut(name) else { return Vec::new() };
        if removed {
            self.runners.remove(name);
            return self.reconcile();
        }
        r.remove_in_flight = false;
        if r.phase == Phase::Finished {
            // GitHub still sees the job; ARC requeues (30 s). The next reconcile retries it,
            // not this one, so the driver does not spin.
            return Vec::new();
        }
        // A culled runner that GitHub says is running a job: ARC skips it and it stays. We also
        // know it is busy now (the JobStarted may not have reached us yet).
        r.deleting = false;
        r.busy = true;
        if r.phase == Phase::Pending {
            r.phase = Phase::Running;
        }
        self.reconcile()
    }

    /// A `Remove` failed for another reason (transport, 5xx after retries). ARC returns the error
    /// and requeues: the runner stays as it was, and a later reconcile decides again. Nothing is
    /// retried from here, so a persistent failure cannot spin the driver.
    pub fn on_remove_failed(&mut self, name: &str) {
        if let Some(r) = self.runners.get_mut(name) {
            r.remove_in_flight = false;
            if r.phase != Phase::Finished {
                r.deleting = false;
            }
        }
    }

    /// After a restart of the driver: the actions that were in flight when it stopped.
    ///
    /// A runner whose JIT config may or may not have been generated is given a fresh name (a
    /// second JIT for the same name would be refused as `AgentExists`); its annotation is kept,
    /// so the patch-id bookkeeping does not change. Removals are re-issued (RemoveRunner of a gone
    /// runner succeeds).
    pub fn resume(&mut self) -> Vec<SimAction> {
        let stuck: Vec<SimRunner> = self
            .runners
            .values()
            .filter(|r| r.phase == Phase::Pending && r.runner_id == 0 && !r.deleting)
            .cloned()
            .collect();
        let mut out = Vec::new();
        for old in stuck {
            self.runners.remove(&old.name);
            let name = self.fresh_name();
            self.runners.insert(name.clone(), SimRunner { name: name.clone(), ..old });
            out.push(SimAction::Create { name });
        }
        for r in self.runners.values_mut() {
            r.remove_in_flight = false;
        }
        out.extend(self.reconcile());
        out
    }

    /// ARC's EphemeralRunnerSet reconcile (reference §5.5), run after every change of the set or its children.
    pub fn reconcile(&mut self) -> Vec<SimAction> {
        let mut out = Vec::new();
        // Finished runners are deleted (RemoveRunner first: the registration finalizer).
        for r in self.runners.values_mut().filter(|r| r.deleting && !r.remove_in_flight) {
            r.remove_in_flight = true;
            out.push(SimAction::Remove { name: r.name.clone(), runner_id: r.runner_id });
        }
        let total = self.total();
        if self.patch_id != 0 && self.patch_id == self.latest_patch_id() {
            return out;
        }
        if total < self.replicas {
            for _ in total..self.replicas {
                let name = self.fresh_name();
                let created = self.next_created;
                self.next_created += 1;
                self.runners.insert(
                    name.clone(),
                    SimRunner {
                        name: name.clone(),
                        runner_id: 0,
                        patch_id: self.patch_id,
                        phase: Phase::Pending,
                        busy: false,
                        deleting: false,
                        remove_in_flight: false,
                        created,
                    },
                );
                out.push(SimAction::Create { name });
            }
        } else if self.patch_id == 0 && total > self.replicas {
            out.extend(self.cull((total - self.replicas) as usize));
        }
        // patchID > 0 and total >= replicas: scale-down is deferred; runners finish naturally.
        out
    }

    /// Deletes up to `count` idle runners: pending first, then running, oldest first, skipping
    /// unregistered and busy ones.
    fn cull(&mut self, count: usize) -> Vec<SimAction> {
        let mut candidates: Vec<&mut SimRunner> = self
            .runners
            .values_mut()
            .filter(|r| {
                !r.deleting && matches!(r.phase, Phase::Pending | Phase::Running) && r.runner_id != 0 && !r.busy
            })
            .collect();
        candidates.sort_by_key(|r| (r.phase != Phase::Pending, r.created));
        candidates
            .into_iter()
            .take(count)
            .map(|r| {
                r.deleting = true;
                r.remove_in_flight = true;
                SimAction::Remove { name: r.name.clone(), runner_id: r.runner_id }
            })
            .collect()
    }

    fn fresh_name(&mut self) -> String {
        loop {
            // splitmix64: tiny, pure, good enough to spread 27^5 names.
            self.name_state = self.name_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.name_state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let suffix: String =
                (0..5).map(|i| NAME_ALPHABET[((z >> (i * 8)) % NAME_ALPHABET.len() as u64) as usize] as char).collect();
            let name = format!("{}-runner-{suffix}", self.ers);
            if !self.runners.contains_key(&name) {
                return name;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn created(actions: &[SimAction]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                SimAction::Create { name } => Some(name.clone()),
                _ => None,
            })
            .collect()
    }

    fn removed(actions: &[SimAction]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                SimAction::Remove { name, .. } => Some(name.clone()),
                _ => None,
            })
            .collect()
    }

    /// Registers and brings online every runner a batch created; ids from `next_id`.
    fn bring_up(m: &mut ErsModel, actions: &[SimAction], next_id: &mut i64) {
        for name in created(actions) {
            *next_id += 1;
            m.on_runner_registered(&name, *next_id);
            m.on_runner_online(&name);
        }
    }

    #[test]
    fn names_follow_generate_name_and_differ() {
        let mut m = ErsModel::new("ci-abcde", 7);
        let names = created(&m.on_patch(50, 0));
        assert_eq!(names.len(), 50);
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), 50);
        for n in &names {
            let suffix = n.strip_prefix("ci-abcde-runner-").expect("prefix");
            assert_eq!(suffix.len(), 5);
            assert!(suffix.bytes().all(|b| NAME_ALPHABET.contains(&b)), "{n}");
        }
    }

    #[test]
    fn same_patch_id_does_not_replace_finished_runners_until_a_new_one() {
        let mut m = ErsModel::new("ers", 1);
        let mut id = 0;
        let a = m.on_patch(3, 1);
        assert_eq!(created(&a).len(), 3);
        bring_up(&mut m, &a, &mut id);
        let first = created(&a)[0].clone();
        m.on_job_started(&first);
        let a = m.on_job_completed(&first);
        assert_eq!(removed(&a), vec![first.clone()]);
        assert!(m.on_remove_result(&first, true).is_empty(), "latestPatchID == spec.patchID: no replacement");
        assert_eq!(m.total(), 2);
        // The same patch again changes nothing either.
        assert!(m.on_patch(3, 1).is_empty());
        // A fresh id does.
        let a = m.on_patch(3, 2);
        assert_eq!(created(&a).len(), 1);
        assert_eq!(m.runner(&created(&a)[0]).map(|r| r.patch_id), Some(2));
        assert_eq!(m.latest_patch_id(), 2);
    }

    #[test]
    fn positive_patch_id_defers_scale_down_and_zero_culls_idle_pending_first_oldest_first() {
        let mut m = ErsModel::new("ers", 2);
        let mut id = 0;
        let a = m.on_patch(4, 0);
        let names = created(&a);
        // Register all, bring only the last two online: the first two stay pending.
        for n in &names {
            id += 1;
            m.on_runner_registered(n, id);
        }
        m.on_runner_online(&names[2]);
        m.on_runner_online(&names[3]);
        m.on_job_started(&names[3]);
        assert!(m.on_patch(0, 5).is_empty(), "patchID > 0 never deletes");
        assert_eq!(m.total(), 4);
        let a = m.on_patch(1, 0);
        // total 4 → 1: delete 3, pending first (0, 1), then running (2); busy 3 is skipped.
        assert_eq!(removed(&a), vec![names[0].clone(), names[1].clone(), names[2].clone()]);
        assert_eq!(m.total(), 1);
        // JobStillRunning on one: it stays, counted as busy, and nothing else is eligible.
        let a = m.on_remove_result(&names[2], false);
        assert!(a.is_empty(), "{a:?}");
        assert!(m.runner(&names[2]).is_some_and(|r| r.busy && !r.deleting));
        assert!(m.on_remove_result(&names[0], true).is_empty());
        assert_eq!(m.total(), 2);
        assert_eq!(m.busy(), 2);
    }

    #[test]
    fn a_busy_runner_whose_job_completed_was_lost_is_finished_once_github_no_longer_lists_it() {
        let mut m = ErsModel::new("ers", 9);
        let mut id = 0;
        let a = m.on_patch(2, 1);
        bring_up(&mut m, &a, &mut id);
        let names = created(&a);
        m.on_job_started(&names[0]);
        assert_eq!(m.runners_to_check().len(), 2);
        // Its JobCompleted never arrives; GitHub deregisters it.
        let a = m.on_runner_gone(&names[0]);
        assert_eq!(removed(&a), vec![names[0].clone()]);
        assert_eq!((m.busy(), m.total()), (0, 1));
        assert_eq!(m.runners_to_check(), vec![(names[1].clone(), 2)]);
        // A second report, or one for a runner being deleted or unknown, changes nothing.
        assert!(m.on_runner_gone(&names[0]).is_empty());
        assert!(m.on_runner_gone("nobody").is_empty());
        assert!(m.on_remove_result(&names[0], true).is_empty());
        // The next patch id replaces it.
        assert_eq!(created(&m.on_patch(2, 2)).len(), 1);
    }

    #[test]
    fn unregistered_runners_are_not_culled() {
        let mut m = ErsModel::new("ers", 3);
        let a = m.on_patch(2, 0);
        assert_eq!(created(&a).len(), 2);
        let a = m.on_patch(0, 0);
        assert!(removed(&a).is_empty(), "runner_id 0 is skipped");
        assert_eq!(m.pending(), 2);
    }

    #[test]
    fn resume_renames_runners_whose_registration_was_in_flight() {
        let mut m = ErsModel::new("ers", 4);
        let a = m.on_patch(2, 3);
        let names = created(&a);
        m.on_runner_registered(&names[0], 11);
        m.on_runner_online(&names[0]);
        let a = m.resume();
        let renamed = created(&a);
        assert_eq!(renamed.len(), 1);
        assert!(m.runner(&names[1]).is_none());
        assert_eq!(m.runner(&renamed[0]).map(|r| r.patch_id), Some(3));
        assert_eq!(m.total(), 2);
    }

    /// Events a property test can throw at the model.
    #[derive(Clone, Debug)]
    enum Ev {
        Patch(i64, bool),
        Register(usize),
        Start(usize),
        Complete(usize),
        RemoveResult(usize, bool),
        Fail(usize),
        Reconcile,
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            3 => (0i64..8, any::<bool>()).prop_map(|(r, z)| Ev::Patch(r, z)),
            4 => any::<usize>().prop_map(Ev::Register),
            3 => any::<usize>().prop_map(Ev::Start),
            2 => any::<usize>().prop_map(Ev::Complete),
            3 => (any::<usize>(), any::<bool>()).prop_map(|(i, ok)| Ev::RemoveResult(i, ok)),
            1 => any::<usize>().prop_map(Ev::Fail),
            1 => Just(Ev::Reconcile),
        ]
    }

    fn pick(m: &ErsModel, i: usize) -> Option<String> {
        let n = m.runners.len();
        (n > 0).then(|| m.runners.keys().nth(i % n).cloned().unwrap_or_default())
    }

    proptest! {
        #[test]
        fn arc_rules_hold_under_any_interleaving(seed in any::<u64>(), evs in proptest::collection::vec(ev(), 1..120)) {
            let mut m = ErsModel::new("ers", seed);
            let mut next_patch = 0i64;
            let mut next_id = 0i64;
            for e in evs {
                let before = m.clone();
                let actions = match e {
                    Ev::Patch(r, zero) => {
                        let p = if zero { 0 } else { next_patch += 1; next_patch };
                        let a = m.on_patch(r, p);
                        let made = created(&a).len() as i64;
                        // Never more runners created from a patch than it asks for.
                        prop_assert!(made <= r);
                        prop_assert!(made == 0 || before.total() + made == r);
                        if p > 0 {
                            // A positive patch id never deletes a live runner.
                            for n in removed(&a) {
                                prop_assert!(before.runners[&n].deleting, "culled {} under patchID {}", n, p);
                            }
                        }
                        a
                    }
                    Ev::Register(i) => {
                        if let Some(n) = pick(&m, i) {
                            next_id += 1;
                            m.on_runner_registered(&n, next_id);
                            m.on_runner_online(&n);
                        }
                        Vec::new()
                    }
                    Ev::Start(i) => {
                        if let Some(n) = pick(&m, i).filter(|n| m.runners[n].phase != Phase::Finished) {
                            m.on_job_started(&n);
                        }
                        Vec::new()
                    }
                    Ev::Complete(i) => match pick(&m, i).filter(|n| m.runners[n].busy) {
                        Some(n) => m.on_job_completed(&n),
                        None => Vec::new(),
                    },
                    Ev::RemoveResult(i, ok) => match pick(&m, i).filter(|n| m.runners[n].remove_in_flight) {
                        // GitHub only says JobStillRunning for a runner that has a job.
                        Some(n) => m.on_remove_result(&n, ok || !m.runners[&n].busy),
                        None => Vec::new(),
                    },
                    Ev::Fail(i) => {
                        if let Some(n) = pick(&m, i) {
                            m.on_runner_failed(&n);
                        }
                        Vec::new()
                    }
                    Ev::Reconcile => m.reconcile(),
                };
                for n in removed(&actions) {
                    let finished = m.runners.get(&n).is_some_and(|r| r.phase == Phase::Finished);
                    // Busy runners are never culled; unregistered ones neither. (Finished ones are
                    // deleted whatever their patch id.)
                    if let Some(r) = before.runners.get(&n)
                        && !r.deleting
                        && !finished
                    {
                        prop_assert!(!r.busy, "culled busy runner {}", n);
                        prop_assert!(r.runner_id != 0, "culled unregistered runner {}", n);
                        prop_assert_eq!(m.patch_id(), 0);
                    }
                }
                // A removal is never issued twice at once.
                let mut seen = std::collections::BTreeSet::new();
                for n in removed(&actions) {
                    prop_assert!(seen.insert(n.clone()));
                    prop_assert!(!before.runners.get(&n).is_some_and(|r| r.remove_in_flight));
                }
                // Scaling happens only when ARC's condition allows it, so it settles: a second
                // reconcile right away creates nothing more.
                let mut again = m.clone();
                prop_assert!(created(&again.reconcile()).is_empty());
                // The state is serialisable and round-trips.
                let json = serde_json::to_string(&m).expect("serialise");
                let back: ErsModel = serde_json::from_str(&json).expect("deserialise");
                prop_assert_eq!(&back, &m);
            }
        }

        #[test]
        fn a_new_patch_id_after_jobs_finish_restores_the_count(
            seed in any::<u64>(), replicas in 2i64..10, finish in 1usize..10
        ) {
            let mut m = ErsModel::new("ers", seed);
            let mut id = 0;
            let a = m.on_patch(replicas, 1);
            bring_up(&mut m, &a, &mut id);
            let names = created(&a);
            // Some (not all) runners take jobs and finish them: with the same patch id they stay gone.
            let done = finish.min(names.len() - 1);
            for n in &names[..done] {
                m.on_job_started(n);
                let a = m.on_job_completed(n);
                prop_assert_eq!(removed(&a), vec![n.clone()]);
                prop_assert!(created(&m.on_remove_result(n, true)).is_empty());
            }
            prop_assert_eq!(m.total(), replicas - done as i64);
            prop_assert!(m.on_patch(replicas, 1).is_empty());
            let a = m.on_patch(replicas, 2);
            prop_assert_eq!(created(&a).len(), done);
            prop_assert_eq!(m.total(), replicas);
        }
    }
}
