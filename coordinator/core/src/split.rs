//! The split (DESIGN §5.5): how many runners each member of a group provisions.
//!
//! `assignment_i = min(max_i, min_i + busy_i + share_i(waiting))` where
//! `waiting = max(0, totalAssignedJobs − Σ busy_i)` is shared by weight (water-filling,
//! capped by each member's room, ties broken by cluster name). A rebalance never lowers an
//! assignment below `min_i + busy_i` (clamped to max_i): a running job is pinned to the
//! cluster that runs it. Pure and total: i64, saturating, no panics.

use crate::types::SplitPolicy;

/// One live member's inputs to the split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitInput {
    pub cluster: String,
    pub weight: i64,
    pub min: i64,
    pub max: i64,
    pub busy: i64,
    pub priority: i64,
}

/// Returns one assignment per input, in input order.
pub fn split(total_assigned_jobs: i64, members: &[SplitInput], policy: SplitPolicy) -> Vec<i64> {
    let n = members.len();
    let max_of = |m: &SplitInput| m.max.max(0);
    let min_of = |m: &SplitInput| m.min.clamp(0, max_of(m));
    let busy_sum = members.iter().fold(0i64, |a, m| a.saturating_add(m.busy.max(0)));
    let mut waiting = total_assigned_jobs.max(0).saturating_sub(busy_sum).max(0);
    // The floor each member keeps no matter what: min + busy, capped at max.
    let floor: Vec<i64> = members.iter().map(|m| min_of(m).saturating_add(m.busy.max(0)).min(max_of(m))).collect();
    let room: Vec<i64> = members.iter().zip(&floor).map(|(m, f)| max_of(m).saturating_sub(*f).max(0)).collect();
    let mut share = vec![0i64; n];

    // Deterministic order for ties and overflow: (priority, cluster) for prefer, cluster for spread.
    let mut order: Vec<usize> = (0..n).collect();
    match policy {
        SplitPolicy::Prefer => order.sort_by(|&a, &b| {
            (members[a].priority, &members[a].cluster, a).cmp(&(members[b].priority, &members[b].cluster, b))
        }),
        SplitPolicy::Spread => order.sort_by(|&a, &b| (&members[a].cluster, a).cmp(&(&members[b].cluster, b))),
    }

    match policy {
        SplitPolicy::Prefer => {
            for &i in &order {
                let give = waiting.min(room[i]);
                share[i] = give;
                waiting = waiting.saturating_sub(give);
            }
        }
        SplitPolicy::Spread => {
            // Water-filling: each round gives every member with room and weight its
            // proportional share (floored, capped). Members that cap out leave; when the
            // floors hand out nothing, the remainder goes one by one in cluster order.
            // Every round hands out at least one runner or caps a member out, and after one
            // uncapped round the remainder is below n: O(n) rounds, whatever the demand.
            let mut active: Vec<usize> =
                order.iter().copied().filter(|&i| room[i] > 0 && members[i].weight > 0).collect();
            while waiting > 0 && !active.is_empty() {
                let total_w: i128 = active.iter().map(|&i| i128::from(members[i].weight)).sum();
                let mut given = 0i64;
                for &i in &active {
                    let want = (i128::from(waiting) * i128::from(members[i].weight) / total_w.max(1)) as i64;
                    let give = want.min(room[i] - share[i]).max(0);
                    share[i] += give;
                    given = given.saturating_add(give);
                }
                waiting = waiting.saturating_sub(given);
                active.retain(|&i| share[i] < room[i]);
                if given == 0 {
                    // Every floored share was 0: the remainder is smaller than the weights.
                    // Hand it out one by one, each to the member with the least work per
                    // weight ((busy + share) / weight), ties by cluster. Jobs usually arrive
                    // one at a time, so "first cluster in name order" would pile every new
                    // job onto the same cluster while the others idle.
                    while waiting > 0 && !active.is_empty() {
                        let load = |i: usize| i128::from(members[i].busy.max(0).saturating_add(share[i]));
                        let Some(&i) = active.iter().min_by(|&&a, &&b| {
                            (load(a) * i128::from(members[b].weight))
                                .cmp(&(load(b) * i128::from(members[a].weight)))
                                .then_with(|| (&members[a].cluster, a).cmp(&(&members[b].cluster, b)))
                        }) else {
                            break;
                        };
                        share[i] += 1;
                        waiting -= 1;
                        active.retain(|&i| share[i] < room[i]);
                    }
                }
            }
        }
    }

    (0..n).map(|i| floor[i].saturating_add(share[i]).min(max_of(&members[i]))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(cluster: &str, weight: i64, min: i64, max: i64, busy: i64) -> SplitInput {
        SplitInput { cluster: cluster.into(), weight, min, max, busy, priority: 0 }
    }

    #[test]
    fn single_arrivals_go_to_the_least_loaded_cluster_not_the_first_name() {
        // a already runs one job: the next single job goes to b, then c, then a again.
        let ms = |a: i64, b: i64, c: i64| vec![m("a", 1, 0, 10, a), m("b", 1, 0, 10, b), m("c", 1, 0, 10, c)];
        assert_eq!(split(2, &ms(1, 0, 0), SplitPolicy::Spread), vec![1, 1, 0]);
        assert_eq!(split(3, &ms(1, 1, 0), SplitPolicy::Spread), vec![1, 1, 1]);
        assert_eq!(split(4, &ms(1, 1, 1), SplitPolicy::Spread), vec![2, 1, 1]);
        // Weight counts: b has twice a's weight, so it takes two for a's one.
        let w = vec![m("a", 1, 0, 10, 1), m("b", 2, 0, 10, 1)];
        assert_eq!(split(3, &w, SplitPolicy::Spread), vec![1, 2]);
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            jobs: i64,
            members: Vec<SplitInput>,
            policy: SplitPolicy,
            want: Vec<i64>,
        }
        let cases = vec![
            Case {
                name: "no demand gives min",
                jobs: 0,
                members: vec![m("a", 1, 1, 10, 0), m("b", 1, 2, 10, 0)],
                policy: SplitPolicy::Spread,
                want: vec![1, 2],
            },
            Case {
                name: "even split",
                jobs: 10,
                members: vec![m("a", 1, 0, 10, 0), m("b", 1, 0, 10, 0)],
                policy: SplitPolicy::Spread,
                want: vec![5, 5],
            },
            Case {
                name: "odd remainder goes to first cluster by name",
                jobs: 3,
                members: vec![m("b", 1, 0, 10, 0), m("a", 1, 0, 10, 0)],
                policy: SplitPolicy::Spread,
                want: vec![1, 2],
            },
            Case {
                name: "weights 3:1",
                jobs: 8,
                members: vec![m("a", 3, 0, 10, 0), m("b", 1, 0, 10, 0)],
                policy: SplitPolicy::Spread,
                want: vec![6, 2],
            },
            Case {
                name: "cap spills to others",
                jobs: 10,
                members: vec![m("a", 1, 0, 2, 0), m("b", 1, 0, 20, 0)],
                policy: SplitPolicy::Spread,
                want: vec![2, 8],
            },
            Case {
                name: "busy is pinned",
                jobs: 4,
                members: vec![m("a", 1, 0, 10, 4), m("b", 1, 0, 10, 0)],
                policy: SplitPolicy::Spread,
                want: vec![4, 0],
            },
            Case {
                name: "busy plus waiting",
                jobs: 6,
                members: vec![m("a", 1, 0, 10, 4), m("b", 1, 0, 10, 0)],
                policy: SplitPolicy::Spread,
                want: vec![5, 1],
            },
            Case {
                name: "demand beyond capacity",
                jobs: 100,
                members: vec![m("a", 1, 0, 3, 0), m("b", 1, 0, 4, 0)],
                policy: SplitPolicy::Spread,
                want: vec![3, 4],
            },
            Case {
                name: "weight zero takes only its floor",
                jobs: 5,
                members: vec![m("a", 0, 1, 10, 0), m("b", 1, 0, 10, 0)],
                policy: SplitPolicy::Spread,
                want: vec![1, 5],
            },
            Case {
                name: "prefer fills first",
                jobs: 5,
                members: vec![m("a", 1, 0, 3, 0), m("b", 1, 0, 10, 0)],
                policy: SplitPolicy::Prefer,
                want: vec![3, 2],
            },
            Case {
                name: "i32 max capacities",
                jobs: i64::from(i32::MAX),
                members: vec![m("a", 1, 0, i64::from(i32::MAX), 0), m("b", 1, 0, i64::from(i32::MAX), 0)],
                policy: SplitPolicy::Spread,
                want: vec![1073741824, 1073741823],
            },
            Case { name: "no members", jobs: 5, members: vec![], policy: SplitPolicy::Spread, want: vec![] },
        ];
        for c in cases {
            assert_eq!(split(c.jobs, &c.members, c.policy), c.want, "{}", c.name);
        }
    }

    fn arb_member() -> impl Strategy<Value = SplitInput> {
        (0i64..4, 0i64..5, prop_oneof![0i64..50, Just(i64::from(i32::MAX))], 0i64..20, 0i64..3, "[a-d]").prop_map(
            |(weight, min, max, busy, priority, cluster)| SplitInput { cluster, weight, min, max, busy, priority },
        )
    }

    proptest! {
        #[test]
        fn assignments_respect_bounds(jobs in prop_oneof![0i64..200, Just(i64::from(i32::MAX)), Just(i64::MAX), Just(-5)],
                                      members in proptest::collection::vec(arb_member(), 0..6),
                                      prefer in any::<bool>()) {
            let policy = if prefer { SplitPolicy::Prefer } else { SplitPolicy::Spread };
            let out = split(jobs, &members, policy);
            prop_assert_eq!(out.len(), members.len());
            let mut sum: i64 = 0;
            let mut max_sum: i64 = 0;
            for (a, mm) in out.iter().zip(&members) {
                // invariant 4: each ≤ max_i; never below min+busy (capped at max).
                prop_assert!(*a <= mm.max.max(0));
                prop_assert!(*a >= mm.min.clamp(0, mm.max.max(0)).saturating_add(mm.busy).min(mm.max.max(0)));
                sum = sum.saturating_add(*a);
                max_sum = max_sum.saturating_add(mm.max.max(0));
            }
            prop_assert!(sum <= max_sum);
            // Work-conserving: waiting demand is placed while anyone with weight has room.
            let busy: i64 = members.iter().map(|m| m.busy).sum();
            let waiting = jobs.max(0).saturating_sub(busy).max(0);
            let floors: i64 = members.iter().map(|m| m.min.clamp(0, m.max.max(0)).saturating_add(m.busy).min(m.max.max(0))).sum();
            let placeable: i64 = members.iter().filter(|m| policy == SplitPolicy::Prefer || m.weight > 0)
                .map(|m| m.max.max(0) - m.min.clamp(0, m.max.max(0)).saturating_add(m.busy).min(m.max.max(0))).sum();
            prop_assert_eq!(sum - floors, waiting.min(placeable));
        }
    }
}
