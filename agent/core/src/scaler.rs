//! ARC's `patchSeq` arithmetic for one EphemeralRunnerSet (reference §5.4, DESIGN §5.6).
//!
//! ARC's ERS controller replaces finished ephemeral runners only when it sees a new
//! `patchID`, and `patchID = 0` lets it delete idle runners. So every assignment push gets a
//! fresh patch id, and 0 is used exactly when ARC's own listener would use it (or on drain
//! and leave), never for ordinary rebalancing.

/// What to merge-patch onto the ERS: `{"spec":{"replicas":R,"patchID":P}}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Patch {
    pub replicas: i64,
    pub patch_id: i64,
}

/// Largest patch sequence before it wraps, as ARC's int32 counter does.
pub const PATCH_SEQ_MAX: i64 = i32::MAX as i64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scaler {
    pub min_runners: i64,
    pub max_runners: i64,
    patch_seq: i64,
    last_target: i64,
}

impl Scaler {
    pub fn new(min_runners: i64, max_runners: i64) -> Scaler {
        let max_runners = max_runners.clamp(0, PATCH_SEQ_MAX);
        Scaler { min_runners: min_runners.clamp(0, max_runners), max_runners, patch_seq: -1, last_target: -1 }
    }

    /// The replicas of the last patch (-1 before the first).
    pub fn last_target(&self) -> i64 {
        self.last_target
    }

    /// The patch for an assignment push. `dirty`: a JobStarted/JobCompleted for this
    /// member's runners since the last push. `force_zero`: drain or leave.
    pub fn on_assignment(&mut self, runners: i64, dirty: bool, force_zero: bool) -> Patch {
        self.patch_seq = if self.patch_seq >= PATCH_SEQ_MAX { 0 } else { self.patch_seq + 1 };
        // ARC wraps to 0 and then moves on, so 0 never doubles as an ordinary id.
        if self.patch_seq == 0 && self.last_target >= 0 {
            self.patch_seq = 1;
        }
        let target = if force_zero { 0 } else { runners.clamp(0, self.max_runners) };
        let force_state = !dirty && target == self.last_target && target == self.min_runners;
        let patch_id = if force_zero || force_state || self.last_target < 0 { 0 } else { self.patch_seq };
        self.last_target = target;
        Patch { replicas: target, patch_id }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_patch_is_zero_then_fresh_ids() {
        let mut s = Scaler::new(1, 10);
        assert_eq!(s.on_assignment(1, false, false), Patch { replicas: 1, patch_id: 0 });
        assert_eq!(s.on_assignment(3, false, false), Patch { replicas: 3, patch_id: 1 });
        // Same count, not dirty, but not min: a fresh id so finished runners are replaced.
        assert_eq!(s.on_assignment(3, false, false), Patch { replicas: 3, patch_id: 2 });
        assert_eq!(s.on_assignment(1, false, false), Patch { replicas: 1, patch_id: 3 });
        // Back at min and unchanged and not dirty: ARC's "force state" 0.
        assert_eq!(s.on_assignment(1, false, false), Patch { replicas: 1, patch_id: 0 });
        // Dirty keeps a fresh id even at min.
        assert_eq!(s.on_assignment(1, true, false), Patch { replicas: 1, patch_id: 5 });
    }

    #[test]
    fn drain_uses_zero_and_capacity_is_capped() {
        let mut s = Scaler::new(0, 4);
        s.on_assignment(2, false, false);
        assert_eq!(s.on_assignment(9, false, false), Patch { replicas: 4, patch_id: 1 });
        assert_eq!(s.on_assignment(3, false, true), Patch { replicas: 0, patch_id: 0 });
    }

    proptest! {
        #[test]
        fn patches_never_exceed_max_and_zero_only_when_arc_would(
            min in 0i64..5, max in prop_oneof![0i64..20, Just(PATCH_SEQ_MAX)],
            pushes in proptest::collection::vec((prop_oneof![-3i64..30, Just(i64::MAX)], any::<bool>(), any::<bool>()), 1..60)
        ) {
            let mut s = Scaler::new(min, max);
            let mut prev = -1i64;
            for (i, (runners, dirty, force)) in pushes.into_iter().enumerate() {
                let p = s.on_assignment(runners, dirty, force);
                prop_assert!(p.replicas >= 0 && p.replicas <= max.max(0));
                if p.patch_id == 0 {
                    prop_assert!(i == 0 || force || (!dirty && p.replicas == prev && p.replicas == s.min_runners));
                }
                prev = p.replicas;
            }
        }
    }
}
