//! The drill report (DESIGN §11): the JSON shape tools rely on, one type for every producer
//! that reports from the quorum's side (`arcfedctl drill`). GitHub-side fields that a producer
//! cannot observe are `null` and named in `unobservable`, never made up.

use serde::Serialize;

/// p50/p99/max of a list of milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

/// Nearest-rank percentiles; `None` for no samples.
pub fn summarize(values: &[u64]) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let at = |p: f64| v[(((v.len() - 1) as f64) * p).round() as usize];
    Some(Summary { p50: at(0.5), p99: at(0.99), max: at(1.0) })
}

/// One run of a drill.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DrillRun {
    pub run: usize,
    pub from_cluster: String,
    pub to_cluster: String,
    pub token_before: u64,
    pub token_after: u64,
    /// The fault → the holder change committed.
    pub detect_ms: Option<u64>,
    /// The fault → the successor's session committed (open, before its first poll).
    pub failover_ms: Option<u64>,
    /// The fault → the successor's first poll (GitHub side; null when not observable).
    pub first_poll_ms: Option<u64>,
    pub note: String,
}

/// The report of a drill, with the DESIGN §11 fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DrillReport {
    pub scenario: String,
    /// Who measured: `quorum` (arcfedctl, from the coordinator's state) or `emulator`.
    pub source: String,
    pub runs: Vec<DrillRun>,
    pub detect_ms: Option<Summary>,
    pub failover_ms: Option<Summary>,
    pub first_poll_ms: Option<Summary>,
    pub sessions_overlap_ms: Option<u64>,
    pub zombie_requests: Option<u64>,
    pub stale_token_rejections: Option<u64>,
    pub conflicts_409: Option<u64>,
    pub messages_lost: Option<u64>,
    pub acquire_repeats: Option<u64>,
    pub jobs_acquired_twice: Option<u64>,
    pub token_regressions: u64,
    /// Fields this producer cannot observe (they stay null).
    pub unobservable: Vec<String>,
}

impl DrillReport {
    /// Fills the summaries from the runs.
    pub fn summarize_runs(&mut self) {
        let pick = |f: fn(&DrillRun) -> Option<u64>| self.runs.iter().filter_map(f).collect::<Vec<_>>();
        self.detect_ms = summarize(&pick(|r| r.detect_ms));
        self.failover_ms = summarize(&pick(|r| r.failover_ms));
        self.first_poll_ms = summarize(&pick(|r| r.first_poll_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(summarize(&[]), None);
        assert_eq!(summarize(&[5]), Some(Summary { p50: 5, p99: 5, max: 5 }));
        let v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(summarize(&v), Some(Summary { p50: 51, p99: 99, max: 100 }));
    }

    #[test]
    fn unobservable_fields_serialize_as_null() {
        let mut r = DrillReport { scenario: "kill-holder".into(), source: "quorum".into(), ..Default::default() };
        r.runs.push(DrillRun { detect_ms: Some(10), failover_ms: Some(20), ..Default::default() });
        r.summarize_runs();
        let j = serde_json::to_value(&r).expect("json");
        assert_eq!(j["failover_ms"]["p50"], 20);
        assert!(j["sessions_overlap_ms"].is_null() && j["first_poll_ms"].is_null());
    }
}
