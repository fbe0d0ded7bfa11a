//! Tolerant decoding into the wire model (reference §4, §8.5): unknown fields are ignored and
//! missing optional fields take their zero value. What the agent cannot do without is still
//! required: a session's id, queue URL, queue token and statistics, and an envelope's id and
//! statistics. Zeroed statistics would scale every cluster down, so they are never invented.

use super::wire;
use serde::Deserialize;

/// A leading UTF-8 BOM is stripped from every body (reference §1.8).
pub(crate) fn strip_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatisticsIn {
    #[serde(default)]
    total_available_jobs: i64,
    #[serde(default)]
    total_acquired_jobs: i64,
    #[serde(default)]
    total_assigned_jobs: i64,
    #[serde(default)]
    total_running_jobs: i64,
    #[serde(default)]
    total_registered_runners: i64,
    #[serde(default)]
    total_busy_runners: i64,
    #[serde(default)]
    total_idle_runners: i64,
}

impl From<StatisticsIn> for wire::Statistics {
    fn from(s: StatisticsIn) -> Self {
        wire::Statistics {
            total_available_jobs: s.total_available_jobs,
            total_acquired_jobs: s.total_acquired_jobs,
            total_assigned_jobs: s.total_assigned_jobs,
            total_running_jobs: s.total_running_jobs,
            total_registered_runners: s.total_registered_runners,
            total_busy_runners: s.total_busy_runners,
            total_idle_runners: s.total_idle_runners,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SessionIn {
    session_id: String,
    #[serde(default)]
    owner_name: String,
    #[serde(default)]
    runner_scale_set: Option<wire::RunnerScaleSet>,
    message_queue_url: String,
    message_queue_access_token: String,
    statistics: StatisticsIn,
}

/// A session from a create or refresh. `scale_set_id` fills an absent `runnerScaleSet`.
pub fn session(body: &[u8], scale_set_id: i64) -> Result<wire::Session, String> {
    let s: SessionIn = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if s.session_id.is_empty() {
        return Err("empty sessionId".into());
    }
    if s.message_queue_url.is_empty() || s.message_queue_access_token.is_empty() {
        return Err("empty messageQueueUrl or messageQueueAccessToken".into());
    }
    reqwest::Url::parse(&s.message_queue_url).map_err(|e| format!("messageQueueUrl is not a URL ({e})"))?;
    Ok(wire::Session {
        session_id: s.session_id,
        owner_name: s.owner_name,
        runner_scale_set: s.runner_scale_set.unwrap_or_else(|| wire::RunnerScaleSet {
            id: scale_set_id,
            name: String::new(),
            runner_group_id: 0,
            runner_group_name: String::new(),
            labels: Vec::new(),
            runner_setting: serde_json::Value::Null,
            created_on: wire::ZERO_TIME.to_string(),
            runner_jit_config_url: String::new(),
            statistics: None,
        }),
        message_queue_url: s.message_queue_url,
        message_queue_access_token: s.message_queue_access_token,
        statistics: s.statistics.into(),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnvelopeIn {
    message_id: i64,
    #[serde(default)]
    message_type: String,
    #[serde(default)]
    body: Option<String>,
    statistics: StatisticsIn,
}

/// A long poll's 200 body. The envelope's `messageType` is passed through: the caller decides
/// what to do with anything but `RunnerScaleSetJobMessages`.
pub fn envelope(body: &[u8]) -> Result<wire::MessageEnvelope, String> {
    let e: EnvelopeIn = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    Ok(wire::MessageEnvelope {
        message_id: e.message_id,
        message_type: e.message_type,
        body: e.body.unwrap_or_default(),
        statistics: e.statistics.into(),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobMessageIn {
    message_type: String,
    #[serde(default)]
    runner_request_id: i64,
    #[serde(default)]
    repository_name: String,
    #[serde(default)]
    owner_name: String,
    #[serde(default)]
    job_id: String,
    #[serde(default)]
    job_workflow_ref: String,
    #[serde(default)]
    job_display_name: String,
    #[serde(default)]
    workflow_run_id: i64,
    #[serde(default)]
    event_name: String,
    #[serde(default)]
    request_labels: Vec<String>,
    #[serde(default)]
    queue_time: Option<String>,
    #[serde(default)]
    scale_set_assign_time: Option<String>,
    #[serde(default)]
    runner_assign_time: Option<String>,
    #[serde(default)]
    finish_time: Option<String>,
    #[serde(default)]
    acquire_job_url: Option<String>,
    #[serde(default)]
    runner_id: Option<i64>,
    #[serde(default)]
    runner_name: Option<String>,
    #[serde(default)]
    result: Option<String>,
}

/// The job message types the listener acts on (reference §4.2).
pub const KNOWN_JOB_MESSAGE_TYPES: [&str; 4] = ["JobAvailable", "JobAssigned", "JobStarted", "JobCompleted"];

/// Decodes an envelope's `body` (a JSON array in a string, possibly `""`). Returns the job
/// messages of known types, and how many elements were skipped: unknown `messageType`s and
/// elements that do not decode (a body that is not an array counts as one). ARC logs unknown
/// types and dies on malformed ones; the agent counts both and carries on.
pub fn job_messages(body: &str) -> (Vec<wire::JobMessage>, usize) {
    let body = body.strip_prefix('\u{feff}').unwrap_or(body).trim();
    if body.is_empty() {
        return (Vec::new(), 0);
    }
    let Ok(items) = serde_json::from_str::<Vec<serde_json::Value>>(body) else {
        return (Vec::new(), 1);
    };
    let mut out = Vec::with_capacity(items.len());
    let mut skipped = 0;
    for item in items {
        match serde_json::from_value::<JobMessageIn>(item) {
            Ok(m) if KNOWN_JOB_MESSAGE_TYPES.contains(&m.message_type.as_str()) => out.push(wire::JobMessage {
                message_type: m.message_type,
                runner_request_id: m.runner_request_id,
                repository_name: m.repository_name,
                owner_name: m.owner_name,
                job_id: m.job_id,
                job_workflow_ref: m.job_workflow_ref,
                job_display_name: m.job_display_name,
                workflow_run_id: m.workflow_run_id,
                event_name: m.event_name,
                request_labels: m.request_labels,
                queue_time: m.queue_time,
                scale_set_assign_time: m.scale_set_assign_time,
                runner_assign_time: m.runner_assign_time,
                finish_time: m.finish_time,
                acquire_job_url: m.acquire_job_url,
                runner_id: m.runner_id,
                runner_name: m.runner_name,
                result: m.result,
            }),
            _ => skipped += 1,
        }
    }
    (out, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_job_assigned_decodes_with_missing_fields_zeroed() {
        // The real github.com capture of reference §4.2 (no queueTime, zero fields omitted).
        let body = r#"[{"messageType":"JobAssigned","repositoryName":"r","ownerName":"o","workflowRunId":30225287326,"jobDisplayName":"probe-fast","eventName":"workflow_dispatch","jobWorkflowRef":"o/r/.github/workflows/p.yml@refs/heads/main","requestLabels":["l"],"scaleSetAssignTime":"2026-07-26T23:29:36Z","jobId":"bd59f43d-2e1a-567a-b5a4-c147b94d0766","runnerRequestId":0,"somethingNew":true}]"#;
        let (jobs, skipped) = job_messages(body);
        assert_eq!(skipped, 0);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].job_id, "bd59f43d-2e1a-567a-b5a4-c147b94d0766");
        assert_eq!(jobs[0].queue_time, None);
        assert_eq!(jobs[0].scale_set_assign_time.as_deref(), Some("2026-07-26T23:29:36Z"));
    }

    #[test]
    fn unknown_and_malformed_job_messages_are_counted_not_fatal() {
        let body = r#"[{"messageType":"JobStarted","runnerName":"r-1","runnerId":3},{"messageType":"JobTeleported"},{"messageType":7},"x"]"#;
        let (jobs, skipped) = job_messages(body);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].runner_name.as_deref(), Some("r-1"));
        assert_eq!(skipped, 3);
        assert_eq!(job_messages(""), (Vec::new(), 0));
        assert_eq!(job_messages("{not json").1, 1);
    }

    #[test]
    fn envelopes_need_statistics_and_an_id_but_not_a_body() {
        let e = envelope(br#"{"messageId":5,"messageType":"RunnerScaleSetJobMessages","statistics":{"totalAssignedJobs":2},"extra":1}"#).unwrap();
        assert_eq!((e.message_id, e.body.as_str(), e.statistics.total_assigned_jobs), (5, "", 2));
        assert!(envelope(br#"{"messageId":5,"messageType":"RunnerScaleSetJobMessages"}"#).is_err());
        assert!(envelope(b"").is_err());
    }

    #[test]
    fn sessions_fill_a_missing_scale_set_and_refuse_missing_queue_fields() {
        let ok = br#"{"sessionId":"s","messageQueueUrl":"https://broker.example/m","messageQueueAccessToken":"q","statistics":{}}"#;
        let s = session(ok, 9).unwrap();
        assert_eq!((s.runner_scale_set.id, s.owner_name.as_str()), (9, ""));
        let no_url = br#"{"sessionId":"s","messageQueueUrl":"","messageQueueAccessToken":"q","statistics":{}}"#;
        assert!(session(no_url, 9).is_err());
        let no_stats = br#"{"sessionId":"s","messageQueueUrl":"https://b/m","messageQueueAccessToken":"q"}"#;
        assert!(session(no_stats, 9).is_err());
    }

    #[test]
    fn a_bom_is_stripped() {
        assert_eq!(strip_bom(b"\xEF\xBB\xBF{}"), b"{}");
        assert_eq!(strip_bom(b"{}"), b"{}");
    }
}
