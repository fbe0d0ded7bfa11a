//! The operators' policy: which clusters may serve which federated scale sets, and within
//! which bounds. A certificate says *who* an agent is (its cluster); the policy says what that
//! cluster may do. It is replicated state, set only through the admin service
//! (`arcfedctl policy set`), and enforced in `apply` when a member joins, so every voter
//! decides the same and a Join admitted by one leader cannot be refused by the next.
//!
//! ```json
//! {"rules": [{"groups": "https://github.com/acme#*", "clusters": ["eu-1", "us-1"],
//!             "priority_min": 0, "priority_max": 10, "weight_max": 100, "members_per_cluster": 2}],
//!  "unmatched": "deny"}
//! ```
//! The first rule whose `groups` glob matches the group key (`<configure_url>#<scale set id>`)
//! applies. With no policy set, or no rule matching and `unmatched: allow`, any cluster may
//! join any group (arcfed's behaviour before policies existed).
//!
//! A policy applies to Joins after it is set; members already joined keep their lease until
//! they leave or are drained (`arcfedctl drain`), and a rejoin meets the new policy.
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Bounds on a policy, so an admin mistake cannot grow the replicated state without limit.
pub const MAX_RULES: usize = 256;
pub const MAX_CLUSTERS_PER_RULE: usize = 256;
pub const MAX_PATTERN_LEN: usize = 512;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// In order; the first whose `groups` matches applies.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// What a Join of a group no rule matches meets.
    #[serde(default)]
    pub unmatched: Unmatched,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    #[default]
    Allow,
    Deny,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Glob over the group key; `*` matches any run of characters (`*` alone: every group).
    pub groups: String,
    /// Clusters whose agents may join these groups; empty: any cluster.
    #[serde(default)]
    pub clusters: BTreeSet<String>,
    /// The `--priority` range a member may ask for, inclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_min: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_max: Option<i64>,
    /// The largest `--weight` a member may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_max: Option<i64>,
    /// How many runner sets (distinct ERS) one cluster may bring to one group; a restarted
    /// agent for the same ERS does not count twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members_per_cluster: Option<u32>,
}

/// What a Join asks for, as the policy sees it.
#[derive(Clone, Copy, Debug)]
pub struct JoinAsk<'a> {
    pub group: &'a str,
    pub cluster: &'a str,
    pub priority: i64,
    pub weight: i64,
    /// Other runner sets (distinct ERS) of this cluster holding a lease in this group.
    pub other_sets_of_cluster: usize,
}

impl Policy {
    /// Checks sizes, names and ranges; the error names the rule and the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.rules.len() > MAX_RULES {
            return Err(format!("rules: {} rules, at most {MAX_RULES}", self.rules.len()));
        }
        for (i, r) in self.rules.iter().enumerate() {
            let at = |field: &str| format!("rules[{i}].{field}");
            if r.groups.is_empty() || r.groups.len() > MAX_PATTERN_LEN || r.groups.chars().any(char::is_control) {
                return Err(format!("{}: 1 to {MAX_PATTERN_LEN} characters, no control characters", at("groups")));
            }
            if r.clusters.len() > MAX_CLUSTERS_PER_RULE {
                return Err(format!("{}: at most {MAX_CLUSTERS_PER_RULE} clusters", at("clusters")));
            }
            if let Some(c) = r.clusters.iter().find(|c| !valid_cluster(c)) {
                return Err(format!("{}: {c:?} is not a cluster name ([A-Za-z0-9._-], 1 to 128)", at("clusters")));
            }
            if let (Some(lo), Some(hi)) = (r.priority_min, r.priority_max)
                && lo > hi
            {
                return Err(format!("{}: {lo} is above priority_max {hi}", at("priority_min")));
            }
            if r.weight_max.is_some_and(|w| w < 1) {
                return Err(format!("{}: at least 1", at("weight_max")));
            }
            if r.members_per_cluster == Some(0) {
                return Err(format!(
                    "{}: at least 1 (leave the cluster out of `clusters` to refuse it)",
                    at("members_per_cluster")
                ));
            }
        }
        Ok(())
    }

    /// The rule for `group` and its position.
    pub fn rule_for(&self, group: &str) -> Option<(usize, &Rule)> {
        self.rules.iter().enumerate().find(|(_, r)| glob(&r.groups, group))
    }

    /// Whether the Join may be admitted; the error says which rule refused and why.
    pub fn admit(&self, ask: &JoinAsk<'_>) -> Result<(), String> {
        let Some((i, r)) = self.rule_for(ask.group) else {
            return match self.unmatched {
                Unmatched::Allow => Ok(()),
                Unmatched::Deny => Err(format!("no policy rule covers group {} (unmatched: deny)", ask.group)),
            };
        };
        let rule = format!("policy rule {i} (groups {:?})", r.groups);
        if !r.clusters.is_empty() && !r.clusters.contains(ask.cluster) {
            return Err(format!("{rule} does not allow cluster {}", ask.cluster));
        }
        if r.priority_min.is_some_and(|lo| ask.priority < lo) || r.priority_max.is_some_and(|hi| ask.priority > hi) {
            return Err(format!(
                "{rule} allows priority {}..={}, not {}",
                r.priority_min.map_or("-inf".into(), |v| v.to_string()),
                r.priority_max.map_or("inf".into(), |v| v.to_string()),
                ask.priority
            ));
        }
        if let Some(w) = r.weight_max
            && ask.weight > w
        {
            return Err(format!("{rule} allows weight up to {w}, not {}", ask.weight));
        }
        if let Some(q) = r.members_per_cluster
            && ask.other_sets_of_cluster >= q as usize
        {
            return Err(format!(
                "{rule} allows {q} runner set(s) per cluster in a group; cluster {} already has {}",
                ask.cluster, ask.other_sets_of_cluster
            ));
        }
        Ok(())
    }
}

fn valid_cluster(c: &str) -> bool {
    !c.is_empty() && c.len() <= 128 && c.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `*` matches any run of characters (including none); everything else matches itself.
pub fn glob(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask<'a>(group: &'a str, cluster: &'a str) -> JoinAsk<'a> {
        JoinAsk { group, cluster, priority: 0, weight: 1, other_sets_of_cluster: 0 }
    }

    #[test]
    fn globs_match_runs_of_characters() {
        for (p, s, want) in [
            ("*", "", true),
            ("*", "https://github.com/acme#1", true),
            ("https://github.com/acme#*", "https://github.com/acme#12", true),
            ("https://github.com/acme#*", "https://github.com/acme-evil#12", false),
            ("*#1", "https://x#1", true),
            ("*#1", "https://x#12", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(glob(p, s), want, "{p} ~ {s}");
        }
    }

    #[test]
    fn no_policy_admits_everyone_and_deny_refuses_the_unmatched() {
        assert!(Policy::default().admit(&ask("g#1", "any")).is_ok());
        let p = Policy { rules: vec![], unmatched: Unmatched::Deny };
        assert!(p.admit(&ask("g#1", "any")).unwrap_err().contains("no policy rule covers"));
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let p = Policy {
            rules: vec![
                Rule { groups: "https://github.com/acme#*".into(), clusters: ["eu".into()].into(), ..Rule::default() },
                Rule { groups: "*".into(), ..Rule::default() },
            ],
            unmatched: Unmatched::Deny,
        };
        assert!(p.admit(&ask("https://github.com/acme#3", "eu")).is_ok());
        let e = p.admit(&ask("https://github.com/acme#3", "us")).unwrap_err();
        assert!(e.contains("rule 0") && e.contains("cluster us"), "{e}");
        assert!(p.admit(&ask("https://github.com/other#3", "us")).is_ok(), "rule 1 covers the rest");
    }

    #[test]
    fn priority_weight_and_quota_bounds_are_enforced() {
        let p = Policy {
            rules: vec![Rule {
                groups: "*".into(),
                priority_min: Some(5),
                priority_max: Some(9),
                weight_max: Some(10),
                members_per_cluster: Some(2),
                ..Rule::default()
            }],
            unmatched: Unmatched::Allow,
        };
        let ok = JoinAsk { group: "g", cluster: "c", priority: 5, weight: 10, other_sets_of_cluster: 1 };
        assert!(p.admit(&ok).is_ok());
        assert!(p.admit(&JoinAsk { priority: 4, ..ok }).unwrap_err().contains("priority"));
        assert!(p.admit(&JoinAsk { priority: 10, ..ok }).unwrap_err().contains("priority"));
        assert!(p.admit(&JoinAsk { weight: 11, ..ok }).unwrap_err().contains("weight"));
        assert!(p.admit(&JoinAsk { other_sets_of_cluster: 2, ..ok }).unwrap_err().contains("2 runner set"));
    }

    #[test]
    fn invalid_policies_name_the_rule_and_field() {
        let bad = |r: Rule| Policy { rules: vec![Rule::default(), r], unmatched: Unmatched::Allow };
        let base = Rule { groups: "*".into(), ..Rule::default() };
        let ok = Policy { rules: vec![base.clone()], unmatched: Unmatched::Allow };
        assert!(ok.validate().is_ok());
        for (p, field) in [
            (bad(Rule { groups: String::new(), ..base.clone() }), "rules[0].groups"),
            (Policy { rules: vec![Rule { groups: "a\nb".into(), ..base.clone() }], ..ok.clone() }, "rules[0].groups"),
            (
                Policy { rules: vec![Rule { clusters: ["a/b".into()].into(), ..base.clone() }], ..ok.clone() },
                "rules[0].clusters",
            ),
            (
                Policy {
                    rules: vec![Rule { priority_min: Some(3), priority_max: Some(1), ..base.clone() }],
                    ..ok.clone()
                },
                "rules[0].priority_min",
            ),
            (Policy { rules: vec![Rule { weight_max: Some(0), ..base.clone() }], ..ok.clone() }, "rules[0].weight_max"),
            (
                Policy { rules: vec![Rule { members_per_cluster: Some(0), ..base.clone() }], ..ok.clone() },
                "rules[0].members_per_cluster",
            ),
            (Policy { rules: vec![base.clone(); MAX_RULES + 1], ..ok.clone() }, "rules:"),
        ] {
            let e = p.validate().unwrap_err();
            assert!(e.starts_with(field), "{field}: {e}");
        }
        // Unknown fields are refused when parsing, not ignored.
        assert!(serde_json::from_str::<Policy>(r#"{"rules":[{"groups":"*","cluster":["a"]}]}"#).is_err());
    }
}
