//! Wire types of the Actions scale-set service, spelled exactly as the reference (§2–§4) gives
//! them. Both the emulator and the tests use these, so a renamed field breaks the build in one
//! place instead of silently changing the wire.

use serde::{Deserialize, Serialize};

/// Go's zero time, which ARC sends for every absent timestamp (reference §2.3, §4.2).
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// The seven counters of `RunnerScaleSetStatistic` (reference §4.3). All present, no omitempty:
/// listeners exit when statistics are missing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Statistics {
    pub total_available_jobs: i64,
    pub total_acquired_jobs: i64,
    pub total_assigned_jobs: i64,
    pub total_running_jobs: i64,
    pub total_registered_runners: i64,
    pub total_busy_runners: i64,
    pub total_idle_runners: i64,
}

/// `{"type": "System", "name": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    #[serde(rename = "type", default)]
    pub kind: String,
    pub name: String,
}

/// `RunnerScaleSet` (reference §2.3). `RunnerSetting` keeps its capitalised key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunnerScaleSet {
    #[serde(default)]
    pub id: i64,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub runner_group_id: i64,
    #[serde(default)]
    pub runner_group_name: String,
    #[serde(default)]
    pub labels: Vec<Label>,
    #[serde(rename = "RunnerSetting", default)]
    pub runner_setting: serde_json::Value,
    #[serde(default = "zero_time")]
    pub created_on: String,
    #[serde(default)]
    pub runner_jit_config_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistics: Option<Statistics>,
}

fn zero_time() -> String {
    ZERO_TIME.to_string()
}

/// A scale-set create/PATCH body: every field optional, unknown fields ignored (reference §8.5).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScaleSetInput {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub runner_group_id: Option<i64>,
    #[serde(default)]
    pub labels: Option<Vec<Label>>,
    #[serde(rename = "RunnerSetting", default)]
    pub runner_setting: Option<serde_json::Value>,
}

/// `RunnerGroup` (reference §2.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunnerGroup {
    pub id: i64,
    pub name: String,
    pub size: i64,
    pub is_default_group: bool,
}

/// `{"count": n, "value": [...]}`: the only list envelope; no pagination anywhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListOf<T> {
    pub count: usize,
    pub value: Vec<T>,
}

impl<T> ListOf<T> {
    pub fn new(value: Vec<T>) -> Self {
        Self { count: value.len(), value }
    }
}

/// `RunnerScaleSetSession` (reference §2.7): every field present, including `statistics`
/// (listeners exit without it) and `runnerScaleSet` (old listeners dereference its id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    pub session_id: String,
    pub owner_name: String,
    pub runner_scale_set: RunnerScaleSet,
    pub message_queue_url: String,
    pub message_queue_access_token: String,
    pub statistics: Statistics,
}

/// The 200 envelope of a long poll (reference §4.1); `body` is JSON-in-JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageEnvelope {
    pub message_id: i64,
    pub message_type: String,
    pub body: String,
    pub statistics: Statistics,
}

/// One element of an envelope's `body` (reference §4.2). Optional fields are omitted when
/// empty, as the captured github.com `JobAssigned` shows: github.com leaves out unset times
/// (its `JobAssigned` has no `queueTime`), GHES sends them as [`ZERO_TIME`]. A reader treats
/// an absent time and [`ZERO_TIME`] alike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobMessage {
    pub message_type: String,
    pub runner_request_id: i64,
    pub repository_name: String,
    pub owner_name: String,
    pub job_id: String,
    pub job_workflow_ref: String,
    pub job_display_name: String,
    pub workflow_run_id: i64,
    pub event_name: String,
    pub request_labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_set_assign_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_assign_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquire_job_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
}

/// `RunnerReference` as returned by JIT config and the agents endpoints (reference §2.14–2.15).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunnerReference {
    pub id: i64,
    pub name: String,
    pub runner_scale_set_id: i64,
}

/// 200 body of `generatejitconfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JitConfig {
    pub runner: RunnerReference,
    #[serde(rename = "encodedJITConfig")]
    pub encoded_jit_config: String,
}

/// The exception body every Actions-service error carries (reference §8.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub type_name: String,
    pub message: String,
}

/// Is `id` of the shape GitHub gives session ids: a UUID in its hyphenated form (8-4-4-4-12
/// hex digits)? Ids of any other shape are refused where they enter the quorum and before a
/// URL is built from them: an id is pasted into `…/sessions/{id}`, so `../../2` would name
/// another path.
pub fn is_session_id(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod session_id_tests {
    use super::is_session_id;

    #[test]
    fn only_uuid_shaped_session_ids_pass() {
        assert!(is_session_id("3f1e2d4c-5b6a-4789-9abc-def012345678"));
        assert!(is_session_id("00000000-0000-0000-0000-000000000000"));
        for bad in ["", "../../2", "s1", "3f1e2d4c-5b6a-4789-9abc-def01234567/", "3f1e2d4c5b6a47899abcdef012345678abcd"]
        {
            assert!(!is_session_id(bad), "{bad:?}");
        }
    }
}
