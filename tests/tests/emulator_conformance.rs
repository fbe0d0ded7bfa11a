//! Conformance of the actions-emulator with `docs/protocol.md`, driven with requests
//! shaped as ARC sends them (sorted form-encoded queries, `RunnerSetting`, zero `createdOn`,
//! JSON User-Agent, `X-ScaleSetMaxCapacity`, `api-version=6.0-preview`), through
//! [`ArcClient`]. Each test starts its own emulator on 127.0.0.1:0. Waits are conditions
//! with deadlines; no test asserts a duration.

use arcfed_tests::emulator::client::{ArcClient, ClientError, Resp};
use arcfed_tests::emulator::core::UNKNOWN_JOB_MESSAGE_TYPE;
use arcfed_tests::emulator::model::{JobMessage, MessageEnvelope, Session, Statistics, ZERO_TIME};
use arcfed_tests::emulator::{
    AppKey, CloseReason, CrossCredentialDelete, Cursor, Emulator, EmulatorConfig, EmulatorHandle, FaultKind, FaultSpec,
    Layout, MAX_REASSIGNMENTS, Mode, PathClass, RateLimitStatus, SessionTtlFrom, Settings, TlsFiles, token,
};
use reqwest::Method;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use std::future::Future;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);
const RT: &str = "GitHub.Actions.Runtime.WebApi";

fn fast() -> Settings {
    Settings { long_poll: Duration::from_millis(300), auto_runners: false, ..Settings::default() }
}

async fn start_with(settings: Settings, pats: &[&str]) -> EmulatorHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let config =
        EmulatorConfig { pats: pats.iter().map(|p| p.to_string()).collect(), settings, ..EmulatorConfig::default() };
    Emulator::start(config, listener).await.expect("start emulator")
}

async fn start(settings: Settings) -> EmulatorHandle {
    start_with(settings, &["emulator-pat"]).await
}

async fn client(h: &EmulatorHandle) -> ArcClient {
    client_for(h, h.pat()).await
}

async fn client_for(h: &EmulatorHandle, pat: &str) -> ArcClient {
    let mut c = ArcClient::new(&h.config_url(), pat).expect("client");
    c.auth().await.expect("auth chain");
    c
}

/// Retries `f` until it returns `Some`, or panics after `WAIT`.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_exception(r: &Resp, status: u16, type_name: &str) -> String {
    assert_eq!(r.status, status, "body: {}", String::from_utf8_lossy(&r.body));
    assert!(r.header("activityid").is_some(), "ActivityId header missing");
    assert!(!r.body.is_empty(), "error bodies have a non-zero length");
    let v = r.value();
    let t = v["typeName"].as_str().unwrap_or_default();
    assert!(t.contains(type_name), "typeName {t:?} lacks {type_name}");
    v["message"].as_str().expect("message").to_string()
}

fn jobs_of(env: &MessageEnvelope) -> Vec<JobMessage> {
    serde_json::from_str(&env.body).expect("body is a JSON array of job messages")
}

fn assert_consistent(s: &Statistics) {
    assert!(s.total_assigned_jobs >= s.total_running_jobs, "{s:?}");
    assert_eq!(s.total_registered_runners, s.total_busy_runners + s.total_idle_runners, "{s:?}");
    assert!(s.total_busy_runners <= s.total_running_jobs, "{s:?}");
}

/// Polls until a 200 arrives, returning the envelope.
async fn next_message(c: &ArcClient, s: &Session, last: i64, cap: Option<i64>) -> MessageEnvelope {
    eventually("a message", || async {
        let r = c.poll(&s.message_queue_url, &s.message_queue_access_token, last, cap).await.expect("poll");
        match r.status {
            200 => Some(r.json::<MessageEnvelope>().expect("envelope")),
            202 => None,
            other => panic!("poll answered {other}: {}", String::from_utf8_lossy(&r.body)),
        }
    })
    .await
}

#[tokio::test]
async fn auth_chain_mints_an_admin_jwt_with_exp_and_refuses_unknown_tokens() {
    let h = start(fast()).await;
    let mut c = ArcClient::new(&h.config_url(), h.pat()).unwrap();
    let reg = c.registration_token().await.unwrap();
    assert_eq!(reg.status, 201);
    assert!(reg.value()["token"].is_string() && reg.value()["expires_at"].is_string());
    c.auth().await.unwrap();
    assert_eq!(c.service_url, h.service_url());
    assert!(c.service_url.starts_with("http://127.0.0.1:") && c.service_url.ends_with('/'));
    let claims = token::parse_unverified(&c.admin_token).expect("admin token is a JWT");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((claims.exp - now - 600).abs() <= 5, "exp is admin-token-ttl (10m) away: {claims:?}");

    // Wrong PAT and a garbage RemoteAuth get 401.
    let bad = ArcClient::new(&h.config_url(), "nope").unwrap();
    assert_eq!(bad.registration_token().await.unwrap().status, 401);
    assert_eq!(c.runner_registration("garbage").await.unwrap().status, 401);
    // Admin endpoints refuse the PAT itself.
    let r = c.admin_with("emulator-pat", Method::GET, "_apis/runtime/runnergroups/", &[], None).await.unwrap();
    assert_exception(&r, 401, "VssUnauthorizedException");

    // Only the configured scope (organization arcfed) mints registration tokens.
    let http = ArcClient::builder().build().unwrap();
    for path in [
        "orgs/other/actions/runners/registration-token",
        "enterprises/e/actions/runners/registration-token",
        "repos/arcfed/r/actions/runners/registration-token",
    ] {
        let r = http
            .post(format!("{}/{path}", c.api_base()))
            .header("Authorization", format!("Bearer {}", h.pat()))
            .header("User-Agent", "conformance")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    let r = http
        .post(format!("{}/orgs/ARCFED/actions/runners/registration-token", c.api_base()))
        .header("Authorization", format!("Bearer {}", h.pat()))
        .header("User-Agent", "conformance")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "organization names are case-insensitive");
}

#[tokio::test]
async fn admin_token_is_refused_after_its_exp() {
    let h = start(Settings { admin_token_ttl: Duration::from_secs(1), ..fast() }).await;
    let c = client(&h).await;
    let ok = c.admin(Method::GET, "_apis/runtime/runnergroups/", &[("groupName", "Default")], None).await.unwrap();
    assert_eq!(ok.status, 200);
    let exp = token::parse_unverified(&c.admin_token).unwrap().exp;
    let r = eventually("the admin token to expire", || async {
        let r = c.admin(Method::GET, "_apis/runtime/runnergroups/", &[], None).await.unwrap();
        (r.status != 200).then_some(r)
    })
    .await;
    assert_exception(&r, 401, "VssUnauthorizedException");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(now >= exp - 1, "refused only around exp");
}

#[tokio::test]
async fn runner_groups_and_scale_sets_follow_the_reference_tables() {
    let h = start(fast()).await;
    let c = client(&h).await;
    let g = c.admin(Method::GET, "_apis/runtime/runnergroups/", &[("groupName", "Default")], None).await.unwrap();
    assert_eq!(g.status, 200);
    assert_eq!(
        g.value(),
        json!({"count": 1, "value": [{"id": 1, "name": "Default", "size": 0, "isDefaultGroup": true}]})
    );

    let set = c.create_scale_set("my set", 1).await.unwrap();
    assert!(set.id > 0);
    assert_eq!((set.name.as_str(), set.runner_group_name.as_str()), ("my set", "Default"));
    assert_eq!(set.runner_setting, json!({"disableUpdate": true}));
    assert!(set.statistics.is_some());

    // List by group + name: the name arrives as `my+set` in a sorted query.
    let l = c
        .admin(Method::GET, "_apis/runtime/runnerscalesets", &[("runnerGroupId", "1"), ("name", "my set")], None)
        .await
        .unwrap();
    assert_eq!(l.status, 200);
    assert_eq!(l.value()["count"], 1);
    assert_eq!(l.value()["value"][0]["id"], set.id);
    assert!(l.value()["value"][0].get("RunnerSetting").is_some(), "capitalised key kept");
    let none = c
        .admin(Method::GET, "_apis/runtime/runnerscalesets", &[("runnerGroupId", "1"), ("name", "other")], None)
        .await
        .unwrap();
    assert_eq!(none.value(), json!({"count": 0, "value": []}));
    let ev = h.timeline().into_iter().find(|e| e.query.contains("name=my set")).expect("recorded");
    assert_eq!(ev.query, "api-version=6.0-preview&name=my set&runnerGroupId=1");

    // Duplicate name in the group → 400; the same name in another group is another set.
    let dup = c
        .admin(
            Method::POST,
            "_apis/runtime/runnerscalesets",
            &[],
            Some(&json!({"name": "my set", "runnerGroupId": 1, "RunnerSetting": {}, "createdOn": "0001-01-01T00:00:00Z"})),
        )
        .await
        .unwrap();
    assert_exception(&dup, 400, "RunnerScaleSetExistsException");
    let g2 = h.add_runner_group("west");
    let other = c.create_scale_set("my set", g2).await.unwrap();
    assert_ne!(other.id, set.id);

    let path = format!("_apis/runtime/runnerscalesets/{}", set.id);
    let got = c.admin(Method::GET, &path, &[], None).await.unwrap();
    assert_eq!((got.status, got.value()["name"].clone()), (200, json!("my set")));
    let patched = c
        .admin(
            Method::PATCH,
            &path,
            &[],
            Some(&json!({"runnerGroupId": g2, "RunnerSetting": {}, "createdOn": "0001-01-01T00:00:00Z", "name": "renamed"})),
        )
        .await
        .unwrap();
    assert_eq!(patched.status, 200);
    assert_eq!(
        (patched.value()["runnerGroupName"].clone(), patched.value()["name"].clone()),
        (json!("west"), json!("renamed"))
    );
    let del = c.admin(Method::DELETE, &path, &[], None).await.unwrap();
    assert_eq!((del.status, del.body.len()), (204, 0));
    let gone = c.admin(Method::GET, &path, &[], None).await.unwrap();
    assert_exception(&gone, 404, "RunnerScaleSetNotFoundException");
    let s = c.create_session(set.id, "x").await.unwrap();
    assert_exception(&s, 404, "RunnerScaleSetNotFoundException");
}

#[tokio::test]
async fn one_session_per_scale_set_and_the_409_whatever_the_owner() {
    let h = start(fast()).await;
    let c = client(&h).await;
    let set = c.create_scale_set("gha-rs", 1).await.unwrap();
    let r = c.create_session(set.id, "owner-a").await.unwrap();
    assert_eq!(r.status, 200);
    let v = r.value();
    for f in ["sessionId", "ownerName", "runnerScaleSet", "messageQueueUrl", "messageQueueAccessToken", "statistics"] {
        assert!(v.get(f).is_some(), "session lacks {f}: {v}");
    }
    for f in [
        "totalAvailableJobs",
        "totalAcquiredJobs",
        "totalAssignedJobs",
        "totalRunningJobs",
        "totalRegisteredRunners",
        "totalBusyRunners",
        "totalIdleRunners",
    ] {
        assert!(v["statistics"][f].is_i64(), "statistics lacks {f}");
    }
    assert_eq!(v["runnerScaleSet"]["id"], set.id);
    assert!(v["messageQueueUrl"].as_str().unwrap().starts_with("http://127.0.0.1:"));
    assert_eq!(v["ownerName"], "owner-a");

    // Both texts seen in the wild, alternating.
    let texts = [
        "The runner scale set gha-rs already has an active session for owner owner-a.",
        "The actions runner scaleset gha-rs already has an active session.",
    ];
    for (i, owner) in ["owner-b", "owner-a", "owner-c"].into_iter().enumerate() {
        let again = c.create_session(set.id, owner).await.unwrap();
        let msg = assert_exception(&again, 409, "RunnerScaleSetSessionConflictException");
        assert_eq!(again.value()["typeName"], format!("{RT}.RunnerScaleSetSessionConflictException, {RT}"),);
        assert_eq!(msg, texts[i % 2]);
    }
    let rep = h.report();
    let s = rep.scale_set(set.id).unwrap();
    assert_eq!((s.conflicts_409, s.sessions.len()), (3, 1));
}

#[tokio::test]
async fn refresh_gives_a_new_token_and_deleting_twice_is_400_expired() {
    let h = start(fast()).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let s = c.open_session(set.id, "o").await.unwrap();
    let path = format!("_apis/runtime/runnerscalesets/{}/sessions/{}", set.id, s.session_id);
    let r = c.admin(Method::PATCH, &path, &[], None).await.unwrap();
    assert_eq!(r.status, 200);
    let fresh: Session = r.json().unwrap();
    assert_eq!(fresh.session_id, s.session_id);
    assert_ne!(fresh.message_queue_access_token, s.message_queue_access_token);
    assert_eq!(
        c.poll(&fresh.message_queue_url, &fresh.message_queue_access_token, 0, Some(1)).await.unwrap().status,
        202
    );

    let d = c.admin(Method::DELETE, &path, &[], None).await.unwrap();
    assert_eq!(d.status, 204);
    let d2 = c.admin(Method::DELETE, &path, &[], None).await.unwrap();
    let msg = assert_exception(&d2, 400, "RunnerScaleSetSessionExpiredException");
    assert_eq!(msg, format!("The session identifier {} is not valid.", s.session_id));
    let refresh = c.admin(Method::PATCH, &path, &[], None).await.unwrap();
    assert_exception(&refresh, 404, "RunnerAdminException");
    assert_eq!(h.report().scale_set(set.id).unwrap().sessions[0].close_reason, CloseReason::Deleted);
}

#[tokio::test]
async fn empty_long_poll_answers_202_within_the_window() {
    let h = start(fast()).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let s = c.open_session(set.id, "o").await.unwrap();
    let r = c.poll(&s.message_queue_url, &s.message_queue_access_token, 0, Some(10)).await.unwrap();
    assert_eq!(r.status, 202);
    let ev = h.timeline().into_iter().find(|e| e.class == PathClass::Poll).unwrap();
    assert_eq!(ev.capacity, Some(10));
    assert!(ev.user_agent.unwrap().contains("\"subsystem\":\"ghalistener\""));
    assert_eq!(ev.session_id.as_deref(), Some(s.session_id.as_str()));
}

#[tokio::test]
async fn dotcom_jobs_flow_assigned_started_completed_with_consistent_statistics() {
    let h = start(fast()).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let s = c.open_session(set.id, "o").await.unwrap();
    let r = c
        .emulator(Method::POST, "jobs", Some(&json!({"scaleSetId": set.id, "count": 2, "durationSeconds": 60})))
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    let env = next_message(&c, &s, 0, Some(10)).await;
    assert_eq!(env.message_type, "RunnerScaleSetJobMessages");
    let jobs = jobs_of(&env);
    assert_eq!(jobs.len(), 2);
    for j in &jobs {
        assert_eq!((j.message_type.as_str(), j.runner_request_id), ("JobAssigned", 0));
        assert!(uuid::Uuid::parse_str(&j.job_id).is_ok(), "GUID jobId");
    }
    assert_eq!(env.statistics.total_assigned_jobs, 2);
    assert_consistent(&env.statistics);
    assert_eq!(c.ack(&s.message_queue_url, &s.message_queue_access_token, env.message_id).await.unwrap().status, 204);

    // A JIT runner comes online, takes a job, finishes it.
    let jit = c
        .admin(
            Method::POST,
            &format!("_apis/runtime/runnerscalesets/{}/generatejitconfig", set.id),
            &[],
            Some(&json!({"name": "runner-1", "workFolder": ""})),
        )
        .await
        .unwrap();
    assert_eq!(jit.status, 200);
    let runner_id = jit.value()["runner"]["id"].as_i64().unwrap();
    assert_eq!(c.emulator(Method::POST, "runners/runner-1/online", None).await.unwrap().status, 204);
    assert_eq!(c.emulator(Method::POST, "runners/runner-1/start", None).await.unwrap().status, 200);
    let started = next_message(&c, &s, env.message_id, Some(10)).await;
    let j = &jobs_of(&started)[0];
    assert_eq!(
        (j.message_type.as_str(), j.runner_id, j.runner_name.as_deref()),
        ("JobStarted", Some(runner_id), Some("runner-1"))
    );
    let st = started.statistics;
    assert_eq!(
        (st.total_assigned_jobs, st.total_running_jobs, st.total_busy_runners, st.total_idle_runners),
        (2, 1, 1, 0)
    );
    assert_consistent(&st);

    let fin = c.emulator(Method::POST, "runners/runner-1/finish", Some(&json!({"result": "failed"}))).await.unwrap();
    assert_eq!(fin.status, 200);
    let done = next_message(&c, &s, started.message_id, Some(10)).await;
    let j = &jobs_of(&done)[0];
    assert_eq!((j.message_type.as_str(), j.result.as_deref()), ("JobCompleted", Some("failed")));
    assert_eq!((done.statistics.total_assigned_jobs, done.statistics.total_running_jobs), (1, 0));
    assert_consistent(&done.statistics);
}

#[tokio::test]
async fn automatic_runners_take_and_finish_jobs() {
    let h = start(Settings { auto_runners: true, ..fast() }).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let s = c.open_session(set.id, "o").await.unwrap();
    h.enqueue_jobs(set.id, 1, Duration::from_millis(100)).unwrap();
    let mut last = 0;
    let mut seen = Vec::new();
    while !seen.contains(&"JobCompleted".to_string()) {
        let env = next_message(&c, &s, last, Some(5)).await;
        assert_consistent(&env.statistics);
        c.ack(&s.message_queue_url, &s.message_queue_access_token, env.message_id).await.unwrap();
        last = env.message_id;
        for j in jobs_of(&env) {
            if j.message_type == "JobAssigned" {
                let body = json!({"name": format!("r-{}", seen.len()), "workFolder": ""});
                let path = format!("_apis/runtime/runnerscalesets/{}/generatejitconfig", set.id);
                assert_eq!(c.admin(Method::POST, &path, &[], Some(&body)).await.unwrap().status, 200);
            }
            seen.push(j.message_type);
        }
    }
    assert_eq!(seen, ["JobAssigned", "JobStarted", "JobCompleted"]);
    let r = h.report();
    let rs = r.scale_set(set.id).unwrap();
    assert_eq!((rs.jobs_completed, rs.messages_delivered, rs.messages_deleted), (1, 3, 3));
    assert_eq!(rs.statistics, Statistics::default());
}

#[tokio::test]
async fn capacity_header_bounds_assignments_on_every_poll() {
    let h = start(fast()).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let s = c.open_session(set.id, "o").await.unwrap();
    h.enqueue_jobs(set.id, 5, Duration::from_secs(1)).unwrap();
    let first = next_message(&c, &s, 0, Some(2)).await;
    assert_eq!(jobs_of(&first).len(), 2);
    assert_eq!(first.statistics.total_assigned_jobs, 2);
    c.ack(&s.message_queue_url, &s.message_queue_access_token, first.message_id).await.unwrap();
    let r = c.poll(&s.message_queue_url, &s.message_queue_access_token, first.message_id, Some(2)).await.unwrap();
    assert_eq!(r.status, 202, "capacity 2 is used up");
    let more = next_message(&c, &s, first.message_id, Some(10)).await;
    assert_eq!(jobs_of(&more).len(), 3, "raising capacity pulls the backlog");
    assert_eq!(more.statistics.total_assigned_jobs, 5);
}

#[tokio::test]
async fn an_envelope_holds_at_most_50_job_messages() {
    let h = start(fast()).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let s = c.open_session(set.id, "o").await.unwrap();
    h.enqueue_jobs(set.id, 120, Duration::from_secs(1)).unwrap();
    let mut sizes = Vec::new();
    let mut last = 0;
    while sizes.iter().sum::<usize>() < 120 {
        let env = next_message(&c, &s, last, None).await;
        assert!(env.message_id > last, "ids increase");
        last = env.message_id;
        sizes.push(jobs_of(&env).len());
    }
    assert_eq!(sizes, [50, 50, 20]);
}

#[tokio::test]
async fn ghes_mode_offers_job_available_and_acquire_refuses_the_admin_token() {
    let h = start(Settings { mode: Mode::Ghes, ..fast() }).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let s = c.open_session(set.id, "o").await.unwrap();
    h.enqueue_jobs(set.id, 1, Duration::from_secs(1)).unwrap();
    let env = next_message(&c, &s, 0, Some(3)).await;
    let j = &jobs_of(&env)[0];
    assert_eq!(j.message_type, "JobAvailable");
    assert!(j.runner_request_id > 0 && j.acquire_job_url.is_some());
    assert_eq!(env.statistics.total_available_jobs, 1);

    let admin = c.acquire(set.id, &c.admin_token, &[j.runner_request_id]).await.unwrap();
    assert_exception(&admin, 401, "VssUnauthorizedException");
    let ok = c.acquire(set.id, &s.message_queue_access_token, &[j.runner_request_id]).await.unwrap();
    assert_eq!(ok.status, 200);
    assert_eq!(ok.value(), json!({"count": 1, "value": [j.runner_request_id]}));
    let st = h.statistics(set.id).unwrap();
    assert_eq!((st.total_available_jobs, st.total_acquired_jobs, st.total_assigned_jobs), (0, 1, 1));

    // The same session asking again: granted again, counted as a repeat.
    let again = c.acquire(set.id, &s.message_queue_access_token, &[j.runner_request_id]).await.unwrap();
    assert_eq!(again.value()["count"], 1);
    let rs = h.report();
    let rs = rs.scale_set(set.id).unwrap();
    assert_eq!((rs.acquire_repeats, rs.jobs_acquired_twice), (1, 1));
    let legacy = c
        .admin(Method::GET, &format!("_apis/runtime/runnerscalesets/{}/acquirablejobs", set.id), &[], None)
        .await
        .unwrap();
    assert_eq!(legacy.status, 204, "nothing left to acquire");
}

/// Opens session A, lets it poll one message without deleting it, deletes the session and
/// opens B, which polls from 0.
async fn handover_with_undeleted_message(cursor: Cursor) -> (EmulatorHandle, i64, Resp, i64) {
    let h = start(Settings { cursor, ..fast() }).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let a = c.open_session(set.id, "a").await.unwrap();
    h.enqueue_jobs(set.id, 1, Duration::from_secs(1)).unwrap();
    let env = next_message(&c, &a, 0, Some(5)).await;
    let path = format!("_apis/runtime/runnerscalesets/{}/sessions/{}", set.id, a.session_id);
    assert_eq!(c.admin(Method::DELETE, &path, &[], None).await.unwrap().status, 204);
    let b = c.open_session(set.id, "b").await.unwrap();
    let r = c.poll(&b.message_queue_url, &b.message_queue_access_token, 0, Some(5)).await.unwrap();
    (h, set.id, r, env.message_id)
}

#[tokio::test]
async fn per_session_cursor_redelivers_an_undeleted_message_to_the_next_session() {
    let (h, set, r, id) = handover_with_undeleted_message(Cursor::PerSession).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json::<MessageEnvelope>().unwrap().message_id, id);
    let rep = h.report();
    let s = rep.scale_set(set).unwrap();
    assert_eq!((s.messages_delivered, s.messages_redelivered, s.messages_deleted), (2, 1, 0));
}

#[tokio::test]
async fn per_scale_set_cursor_loses_what_the_predecessor_polled() {
    let (h, set, r, _) = handover_with_undeleted_message(Cursor::PerScaleSet).await;
    assert_eq!(r.status, 202);
    assert_eq!(h.report().scale_set(set).unwrap().messages_redelivered, 0);
}

#[tokio::test]
async fn an_abandoned_session_expires_after_its_ttl() {
    let h = start(Settings { session_ttl: Duration::from_millis(800), ..fast() }).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let a = c.open_session(set.id, "killed").await.unwrap();
    let first = c.create_session(set.id, "successor").await.unwrap();
    assert_eq!(first.status, 409, "refused while the abandoned session lives");
    let b = eventually("the abandoned session to expire", || async {
        let r = c.create_session(set.id, "successor").await.unwrap();
        match r.status {
            200 => Some(r.json::<Session>().unwrap()),
            409 => None,
            s => panic!("unexpected {s}"),
        }
    })
    .await;
    assert_ne!(a.session_id, b.session_id);
    let rep = h.report();
    let s = rep.scale_set(set.id).unwrap();
    assert_eq!(s.sessions[0].close_reason, CloseReason::Expired);
    assert_eq!(s.sessions[1].close_reason, CloseReason::Open);
    assert!(s.conflicts_409 >= 1);
    assert!(s.no_session_ms > 0 || s.sessions[0].closed_at == Some(s.sessions[1].opened_at));
    let old = c.poll(&a.message_queue_url, &a.message_queue_access_token, 0, None).await.unwrap();
    assert_eq!(old.status, 401, "an expired session's token is dead");
}

/// Polls for a while past the TTL; returns the first non-202 status, if any.
async fn poll_past_ttl(from: SessionTtlFrom) -> (EmulatorHandle, i64, Option<u16>) {
    let h = start(Settings { session_ttl: Duration::from_millis(700), session_ttl_from: from, ..fast() }).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let s = c.open_session(set.id, "o").await.unwrap();
    let until = h.now_ms() + 2_000;
    while h.now_ms() < until {
        let r = c.poll(&s.message_queue_url, &s.message_queue_access_token, 0, Some(1)).await.unwrap();
        if r.status != 202 {
            return (h, set.id, Some(r.status));
        }
    }
    (h, set.id, None)
}

#[tokio::test]
async fn session_ttl_from_last_poll_keeps_a_polled_session_alive() {
    let (h, set, failed) = poll_past_ttl(SessionTtlFrom::LastPoll).await;
    assert_eq!(failed, None);
    assert_eq!(h.report().scale_set(set).unwrap().sessions[0].close_reason, CloseReason::Open);
}

#[tokio::test]
async fn session_ttl_from_creation_expires_even_a_polled_session() {
    let (h, set, failed) = poll_past_ttl(SessionTtlFrom::Creation).await;
    assert_eq!(failed, Some(401));
    assert_eq!(h.report().scale_set(set).unwrap().sessions[0].close_reason, CloseReason::Expired);
}

async fn poll_after_delete(survives: bool) -> (EmulatorHandle, i64, u16) {
    let h = start(Settings { queue_token_survives_session_delete: survives, ..fast() }).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let s = c.open_session(set.id, "o").await.unwrap();
    let path = format!("_apis/runtime/runnerscalesets/{}/sessions/{}", set.id, s.session_id);
    assert_eq!(c.admin(Method::DELETE, &path, &[], None).await.unwrap().status, 204);
    let r = c.poll(&s.message_queue_url, &s.message_queue_access_token, 0, Some(1)).await.unwrap();
    (h, set.id, r.status)
}

#[tokio::test]
async fn deleted_sessions_queue_token_is_refused_by_default() {
    let (h, set, status) = poll_after_delete(false).await;
    assert_eq!(status, 401);
    assert_eq!(h.report().scale_set(set).unwrap().zombie_requests, 1);
}

#[tokio::test]
async fn deleted_sessions_queue_token_survives_when_the_knob_says_so() {
    let (h, set, status) = poll_after_delete(true).await;
    assert_eq!(status, 202);
    let rep = h.report();
    assert_eq!(rep.scale_set(set).unwrap().zombie_requests, 1);
    assert!(h.timeline().iter().any(|e| e.zombie && e.status == 202));
}

async fn delete_with_other_credential(mode: CrossCredentialDelete) -> (u16, CloseReason) {
    let h = start_with(Settings { cross_credential_delete: mode, ..fast() }, &["pat-east", "pat-west"]).await;
    let east = client_for(&h, "pat-east").await;
    let west = client_for(&h, "pat-west").await;
    let set = east.create_scale_set("s", 1).await.unwrap();
    let s = east.open_session(set.id, "east-listener").await.unwrap();
    let path = format!("_apis/runtime/runnerscalesets/{}/sessions/{}", set.id, s.session_id);
    let r = west.admin(Method::DELETE, &path, &[], None).await.unwrap();
    if r.status != 204 {
        assert_exception(&r, 403, "AccessDeniedException");
    }
    let rep = h.report();
    let sess = &rep.scale_set(set.id).unwrap().sessions[0];
    assert_eq!(sess.credential, "pat#1");
    (r.status, sess.close_reason)
}

#[tokio::test]
async fn cross_credential_delete_allow_lets_another_cluster_kill_the_session() {
    assert_eq!(delete_with_other_credential(CrossCredentialDelete::Allow).await, (204, CloseReason::Deleted));
}

#[tokio::test]
async fn cross_credential_delete_deny_keeps_the_session() {
    assert_eq!(delete_with_other_credential(CrossCredentialDelete::Deny).await, (403, CloseReason::Open));
}

#[tokio::test]
async fn jit_runners_conflict_on_names_and_cannot_be_removed_while_busy() {
    let h = start(fast()).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let jit_path = format!("_apis/runtime/runnerscalesets/{}/generatejitconfig", set.id);
    let body = json!({"name": "er-1", "workFolder": "/work"});
    let r = c.admin(Method::POST, &jit_path, &[], Some(&body)).await.unwrap();
    assert_eq!(r.status, 200);
    let v = r.value();
    assert!(v["encodedJITConfig"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!((v["runner"]["name"].clone(), v["runner"]["runnerScaleSetId"].clone()), (json!("er-1"), json!(set.id)));
    let id = v["runner"]["id"].as_i64().unwrap();
    let dup = c.admin(Method::POST, &jit_path, &[], Some(&body)).await.unwrap();
    assert_exception(&dup, 409, "AgentExistsException");

    let by_name =
        c.admin(Method::GET, "_apis/distributedtask/pools/0/agents", &[("agentName", "er-1")], None).await.unwrap();
    assert_eq!(by_name.value(), json!({"count": 1, "value": [{"id": id, "name": "er-1", "runnerScaleSetId": set.id}]}));
    let agent = format!("_apis/distributedtask/pools/0/agents/{id}");
    assert_eq!(c.admin(Method::GET, &agent, &[], None).await.unwrap().value()["name"], "er-1");

    let s = c.open_session(set.id, "o").await.unwrap();
    h.enqueue_jobs(set.id, 1, Duration::from_secs(60)).unwrap();
    next_message(&c, &s, 0, Some(1)).await;
    assert_eq!(c.emulator(Method::POST, "runners/er-1/start", None).await.unwrap().status, 200);
    let busy = c.admin(Method::DELETE, &agent, &[], None).await.unwrap();
    assert_exception(&busy, 400, "JobStillRunningException");
    assert_eq!(c.emulator(Method::POST, "runners/er-1/finish", None).await.unwrap().status, 200);
    assert_eq!(c.admin(Method::DELETE, &agent, &[], None).await.unwrap().status, 204);
    assert_eq!(c.admin(Method::DELETE, &agent, &[], None).await.unwrap().status, 204, "unknown runner: 204 too");
    let none =
        c.admin(Method::GET, "_apis/distributedtask/pools/0/agents", &[("agentName", "er-1")], None).await.unwrap();
    assert_eq!(none.value()["count"], 0);
}

#[tokio::test]
async fn faults_inject_statuses_retry_after_empty_bodies_bursts_and_latency() {
    let h = start(fast()).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let s = c.open_session(set.id, "o").await.unwrap();
    let poll = || c.poll(&s.message_queue_url, &s.message_queue_access_token, 0, Some(1));

    let add = |spec: Value| {
        let c = c.clone();
        async move {
            let r = c.emulator(Method::POST, "faults", Some(&spec)).await.unwrap();
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        }
    };
    add(json!({"kind": "status", "status": 503, "retryAfter": "2", "pathClass": "poll", "count": 1})).await;
    let r = poll().await.unwrap();
    assert_eq!((r.status, r.header("retry-after")), (503, Some("2")));
    assert!(r.value()["typeName"].is_string());
    assert_eq!(poll().await.unwrap().status, 202, "count 1 retired");

    add(json!({"kind": "status", "status": 429, "retryAfter": "1", "count": 1})).await;
    let r = c.admin(Method::GET, "_apis/runtime/runnergroups/", &[], None).await.unwrap();
    assert_eq!((r.status, r.header("retry-after")), (429, Some("1")));

    add(json!({"kind": "empty_body", "pathClass": "poll", "count": 1})).await;
    let r = poll().await.unwrap();
    assert_eq!((r.status, r.body.len()), (200, 0));

    add(json!({"kind": "status", "status": 404, "pathClass": "session_refresh", "count": 1})).await;
    let path = format!("_apis/runtime/runnerscalesets/{}/sessions/{}", set.id, s.session_id);
    let r = c.admin(Method::PATCH, &path, &[], None).await.unwrap();
    assert_exception(&r, 404, "RunnerAdminException");

    add(json!({"kind": "status", "status": 401, "pathClass": "poll", "owner": "someone-else"})).await;
    assert_eq!(poll().await.unwrap().status, 202, "owner-scoped fault skips other owners");
    add(json!({"kind": "status", "status": 401, "pathClass": "poll", "owner": "o", "count": 1})).await;
    assert_exception(&poll().await.unwrap(), 401, "VssUnauthorizedException");

    add(json!({"kind": "status", "status": 500, "pathClass": "poll", "count": 3})).await;
    let statuses: Vec<u16> =
        futures::future::join_all((0..4).map(|_| poll())).await.into_iter().map(|r| r.unwrap().status).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 500).count(), 3);
    add(json!({"kind": "status", "status": 502, "pathClass": "ack", "duration": "30s"})).await;
    for _ in 0..3 {
        assert_eq!(c.ack(&s.message_queue_url, &s.message_queue_access_token, 1).await.unwrap().status, 502);
    }
    assert_eq!(c.emulator(Method::DELETE, "faults", None).await.unwrap().status, 204);
    assert_eq!(c.ack(&s.message_queue_url, &s.message_queue_access_token, 1).await.unwrap().status, 204);

    h.add_fault(FaultSpec {
        kind: FaultKind::Latency { ms: 20 },
        handle_first: false,
        path_class: Some(PathClass::RunnerGroups),
        owner: None,
        session_id: None,
        scale_set_id: None,
        count: Some(1),
        duration: None,
    })
    .unwrap();
    assert_eq!(c.admin(Method::GET, "_apis/runtime/runnergroups/", &[], None).await.unwrap().status, 200);
    assert!(h.timeline().iter().any(|e| e.fault.as_deref() == Some("latency 20ms") && e.status == 200));

    // Token expiry as a fault: every token dies; the chain mints a new admin token.
    assert_eq!(c.emulator(Method::POST, "expire-tokens", None).await.unwrap().status, 204);
    assert_eq!(poll().await.unwrap().status, 401);
    assert_eq!(c.admin(Method::GET, "_apis/runtime/runnergroups/", &[], None).await.unwrap().status, 401);
    let c2 = client(&h).await;
    assert_eq!(c2.admin(Method::GET, "_apis/runtime/runnergroups/", &[], None).await.unwrap().status, 200);
}

#[tokio::test]
async fn runtime_config_changes_ttls_and_knobs() {
    let h = start(fast()).await;
    let c = client(&h).await;
    let r = c
        .emulator(
            Method::PUT,
            "config",
            Some(&json!({"longPoll": "200ms", "sessionTtl": "5s", "queueTokenTtl": 1000, "adminTokenTtl": "1m",
                "queueTokenSurvivesSessionDelete": true, "sessionTtlFrom": "creation", "cursor": "per-scale-set",
                "crossCredentialDelete": "deny", "mode": "ghes"})),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let s = h.settings();
    assert_eq!(s.long_poll, Duration::from_millis(200));
    assert_eq!(s.queue_token_ttl, Duration::from_secs(1));
    assert_eq!((s.cursor, s.session_ttl_from, s.mode), (Cursor::PerScaleSet, SessionTtlFrom::Creation, Mode::Ghes));
    assert!(s.queue_token_survives_session_delete);
    assert_eq!(c.emulator(Method::GET, "config", None).await.unwrap().value()["cursor"], "per-scale-set");
    let bad = c.emulator(Method::PUT, "config", Some(&json!({"cursor": "sideways"}))).await.unwrap();
    assert_eq!(bad.status, 400);

    // The new queue-token TTL applies to sessions opened from now on.
    let set = c.create_scale_set("s", 1).await.unwrap();
    let sess = c.open_session(set.id, "o").await.unwrap();
    eventually("the 1 s queue token to expire", || async {
        let r = c.poll(&sess.message_queue_url, &sess.message_queue_access_token, 0, None).await.unwrap();
        (r.status == 401).then_some(())
    })
    .await;
}

#[tokio::test]
async fn report_counts_a_session_fight_a_zombie_and_the_overlap() {
    let h = start(Settings { queue_token_survives_session_delete: true, ..fast() }).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let a = c.open_session(set.id, "member-a").await.unwrap();
    for _ in 0..2 {
        assert_eq!(c.create_session(set.id, "member-b").await.unwrap().status, 409);
    }
    let path = format!("_apis/runtime/runnerscalesets/{}/sessions/{}", set.id, a.session_id);
    assert_eq!(c.admin(Method::DELETE, &path, &[], None).await.unwrap().status, 204);
    let b = c.open_session(set.id, "member-b").await.unwrap();
    let opened = h.report().scale_set(set.id).unwrap().sessions[1].opened_at;
    eventually("the emulator clock to move", || async { (h.now_ms() > opened).then_some(()) }).await;
    // The old holder keeps polling with its deleted session's token.
    let z = c.poll(&a.message_queue_url, &a.message_queue_access_token, 0, Some(1)).await.unwrap();
    assert_eq!(z.status, 202);
    assert_eq!(c.poll(&b.message_queue_url, &b.message_queue_access_token, 0, Some(1)).await.unwrap().status, 202);

    let rep: arcfed_tests::emulator::Report = c.emulator(Method::GET, "report", None).await.unwrap().json().unwrap();
    let s = rep.scale_set(set.id).unwrap();
    assert_eq!(s.conflicts_409, 2);
    assert_eq!(s.zombie_requests, 1);
    assert_eq!(s.max_concurrent_sessions, 2);
    assert!(s.sessions_overlap_ms > 0);
    assert_eq!(s.sessions_overlap_ms, s.sessions[0].last_holder_request_at - s.sessions[1].first_holder_request_at);
    assert_eq!(
        s.sessions.iter().map(|x| (x.owner.as_str(), x.close_reason)).collect::<Vec<_>>(),
        [("member-a", CloseReason::Deleted), ("member-b", CloseReason::Open)]
    );
    assert!(s.sessions[0].closed_at.is_some());

    let tl: Vec<Value> = c.emulator(Method::GET, "timeline", None).await.unwrap().json().unwrap();
    let conflicts = tl.iter().filter(|e| e["status"] == 409).count();
    assert_eq!(conflicts, 2);
    let zombie = tl.iter().find(|e| e["zombie"] == true).expect("zombie event");
    assert_eq!(
        (zombie["owner"].clone(), zombie["auth"].clone(), zombie["capacity"].clone()),
        (json!("member-a"), json!("queue"), json!(1))
    );
    assert!(tl.iter().any(|e| e["auth"] == "remote_auth") && tl.iter().any(|e| e["auth"] == "pat"));
}

#[tokio::test]
async fn serves_https_with_a_given_certificate() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = EmulatorConfig { tls: Some(TlsFiles { cert, key }), settings: fast(), ..EmulatorConfig::default() };
    let h = Emulator::start(config, listener).await.unwrap();
    assert!(h.config_url().starts_with("https://127.0.0.1:"));
    let root = reqwest::Certificate::from_pem(ck.cert.pem().as_bytes()).unwrap();
    let http = ArcClient::builder().tls_certs_only([root]).build().unwrap();
    let mut c = ArcClient::with_http(&h.config_url(), h.pat(), http).unwrap();
    c.auth().await.expect("auth chain over HTTPS");
    let set = c.create_scale_set("tls", 1).await.unwrap();
    let s = c.open_session(set.id, "o").await.unwrap();
    assert!(s.message_queue_url.starts_with("https://"));
    assert_eq!(c.poll(&s.message_queue_url, &s.message_queue_access_token, 0, None).await.unwrap().status, 202);
    h.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// issue 7: github.com's shape, GitHub's strictness, faults with side effects

async fn start_config(config: EmulatorConfig) -> EmulatorHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    Emulator::start(config, listener).await.expect("start emulator")
}

async fn start_dotcom(settings: Settings) -> EmulatorHandle {
    start_config(EmulatorConfig { layout: Layout::Dotcom, settings, ..EmulatorConfig::default() }).await
}

/// An authenticated client that resolves github.localhost and its api./broker. hosts.
async fn dotcom_client(h: &EmulatorHandle) -> ArcClient {
    let mut c = ArcClient::with_resolve(&h.config_url(), h.pat(), h.resolve_overrides()).expect("client");
    c.auth().await.expect("auth chain");
    c
}

fn http_resolving(h: &EmulatorHandle) -> reqwest::Client {
    let mut b = ArcClient::builder();
    for (host, addr) in h.resolve_overrides() {
        b = b.resolve(host, *addr);
    }
    b.build().unwrap()
}

fn refresh_path(set: i64, s: &Session) -> String {
    format!("_apis/runtime/runnerscalesets/{set}/sessions/{}", s.session_id)
}

#[tokio::test]
async fn dotcom_layout_serves_rest_at_the_api_host_and_the_service_on_the_broker() {
    let h = start_dotcom(fast()).await;
    let port = |u: &str| u.rsplit(':').next().unwrap().split('/').next().unwrap().to_string();
    let config_url = h.config_url();
    assert!(config_url.starts_with("http://github.localhost:") && config_url.ends_with("/arcfed"), "{config_url}");
    let broker = h.broker_url().expect("dotcom has a broker").to_string();
    assert!(broker.starts_with("http://broker.github.localhost:"), "{broker}");
    assert_ne!(port(&broker), port(&config_url), "the broker is a second listener");
    assert_eq!(h.api_url(), format!("http://api.github.localhost:{}", port(&config_url)));

    let c = dotcom_client(&h).await;
    assert_eq!(c.api_base(), h.api_url());
    assert_eq!(c.service_url, format!("{broker}/rest/"));
    // GHES paths do not exist on github.com's hosts.
    let http = http_resolving(&h);
    let ghes = http
        .post(format!("{}/api/v3/orgs/arcfed/actions/runners/registration-token", h.api_url()))
        .header("Authorization", format!("Bearer {}", h.pat()))
        .header("User-Agent", "conformance")
        .send()
        .await
        .unwrap();
    assert_eq!(ghes.status(), 404);

    let set = c.create_scale_set("dotcom", 1).await.unwrap();
    assert!(set.runner_jit_config_url.starts_with(&broker));
    let s = c.open_session(set.id, "o").await.unwrap();
    assert!(s.message_queue_url.starts_with(&format!("{broker}/scalesets/")), "{}", s.message_queue_url);
    assert!(!s.message_queue_url.contains(&s.session_id) && !s.message_queue_url.contains("runnerscalesets"));
    h.enqueue_jobs(set.id, 1, Duration::from_secs(1)).unwrap();
    let env = next_message(&c, &s, 0, Some(1)).await;
    let raw: Vec<Value> = serde_json::from_str(&env.body).unwrap();
    assert_eq!(raw[0]["messageType"], "JobAssigned");
    assert_eq!(raw[0]["runnerRequestId"], 0);
    assert!(raw[0]["scaleSetAssignTime"].is_string());
    for absent in ["queueTime", "runnerAssignTime", "finishTime"] {
        assert!(raw[0].get(absent).is_none(), "github.com's JobAssigned has no {absent}: {}", raw[0]);
    }
    assert_eq!(c.ack(&s.message_queue_url, &s.message_queue_access_token, env.message_id).await.unwrap().status, 204);
    assert_eq!(h.report().scale_set(set.id).unwrap().messages_deleted, 1);
}

#[tokio::test]
async fn ghes_job_mode_sends_every_time_with_go_zero_for_unset_ones() {
    let h = start(Settings { mode: Mode::Ghes, ..fast() }).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let s = c.open_session(set.id, "o").await.unwrap();
    h.enqueue_jobs(set.id, 1, Duration::from_secs(1)).unwrap();
    let env = next_message(&c, &s, 0, Some(1)).await;
    let m = &jobs_of(&env)[0];
    assert_eq!(m.message_type, "JobAvailable");
    assert!(m.queue_time.as_deref().is_some_and(|t| t != ZERO_TIME));
    assert_eq!(m.runner_assign_time.as_deref(), Some(ZERO_TIME));
    assert_eq!(m.finish_time.as_deref(), Some(ZERO_TIME));
}

/// Opens a dotcom session and refreshes it; returns the client, the scale set, the old and
/// the refreshed session.
async fn dotcom_refreshed(survives: bool) -> (EmulatorHandle, ArcClient, i64, Session, Session) {
    let h = start_dotcom(Settings { queue_url_survives_refresh: survives, ..fast() }).await;
    let c = dotcom_client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let old = c.open_session(set.id, "o").await.unwrap();
    let r = c.admin(Method::PATCH, &refresh_path(set.id, &old), &[], None).await.unwrap();
    assert_eq!(r.status, 200);
    let new: Session = r.json().unwrap();
    assert_ne!(new.message_queue_url, old.message_queue_url, "every refresh gives a new queue URL");
    assert_ne!(new.message_queue_access_token, old.message_queue_access_token);
    (h, c, set.id, old, new)
}

#[tokio::test]
async fn dotcom_pre_refresh_queue_url_and_hard_coded_queue_paths_get_404() {
    let (h, c, set, old, new) = dotcom_refreshed(false).await;
    let t = &new.message_queue_access_token;
    assert_eq!(c.poll(&new.message_queue_url, t, 0, Some(1)).await.unwrap().status, 202);
    // A client that keeps the pre-refresh URL fails.
    assert_eq!(c.poll(&old.message_queue_url, t, 0, Some(1)).await.unwrap().status, 404);
    assert_eq!(c.ack(&old.message_queue_url, t, 1).await.unwrap().status, 404);
    // A client that builds the queue path itself fails: github.com's observed path, and the
    // GHES path under the broker's service.
    let broker = h.broker_url().unwrap();
    assert_eq!(c.poll(&format!("{broker}/scalesets/message"), t, 0, Some(1)).await.unwrap().status, 404);
    let ghes_path =
        format!("{}_apis/runtime/runnerscalesets/{set}/messages?sessionId={}", c.service_url, new.session_id);
    assert_eq!(c.poll(&ghes_path, t, 0, Some(1)).await.unwrap().status, 404);

    let rep = h.report();
    let rs = rep.scale_set(set).unwrap();
    assert_eq!((rs.session_refreshes, rs.sessions[0].refreshes), (1, 1));
    assert!(rep.requests_by_credential.get("pat#1").is_some_and(|n| *n >= 6), "{:?}", rep.requests_by_credential);
}

#[tokio::test]
async fn dotcom_pre_refresh_queue_url_keeps_working_when_the_knob_says_so() {
    let (_h, c, _set, old, new) = dotcom_refreshed(true).await;
    let t = &new.message_queue_access_token;
    assert_eq!(c.poll(&old.message_queue_url, t, 0, Some(1)).await.unwrap().status, 202);
    assert_eq!(c.poll(&new.message_queue_url, t, 0, Some(1)).await.unwrap().status, 202);
}

/// A fresh 2048-bit RSA key from `openssl genpkey` (PKCS#8 private, SPKI public, both PEM).
fn rsa_key(dir: &std::path::Path, name: &str) -> (Vec<u8>, std::path::PathBuf) {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    let ok = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
        .arg(&private)
        .status()
        .expect("openssl must be installed to mint a throwaway App key")
        .success();
    assert!(ok, "openssl genpkey");
    let ok = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl pkey -pubout");
    let pem = std::fs::read(&private).unwrap();
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(&pem).expect("PKCS#8 PEM");
    (der.secret_pkcs8_der().to_vec(), public)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test]
async fn app_jwts_must_be_rs256_fresh_short_lived_and_from_the_known_app() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = rsa_key(dir.path(), "app");
    let (other_key, _) = rsa_key(dir.path(), "other");
    let app = AppKey::from_pem_file("12345", &public).expect("public key");
    let h = start_config(EmulatorConfig { app: Some(app), settings: fast(), ..EmulatorConfig::default() }).await;
    let now = unix_now();
    let mut c = ArcClient::new(&h.config_url(), "unused").unwrap();
    let status = |r: Resp| r.status;

    let sign = |k: &[u8], iss: &str, iat: i64, exp: i64| token::sign_app_jwt(k, iss, iat, exp).unwrap();
    let bad = [
        ("unsigned (HS256, random signature)", token::mint_jwt("12345", now - 60, now + 540)),
        ("signed by another key", sign(&other_key, "12345", now - 60, now + 540)),
        ("unknown iss", sign(&key, "999", now - 60, now + 540)),
        ("exp more than 10 min after iat", sign(&key, "12345", now - 60, now + 600)),
        ("expired", sign(&key, "12345", now - 700, now - 100)),
        ("iat in the future", sign(&key, "12345", now + 300, now + 500)),
    ];
    for (what, jwt) in bad {
        let r = c.app_installation_token(&jwt, 77).await.unwrap();
        assert_eq!(r.status, 401, "{what}");
        assert!(r.value()["message"].is_string(), "{what}: GitHub's REST error body");
    }
    // What ARC sends: iat = now - 60 s, exp = iat + 9 min, iss = the App ID.
    let good = sign(&key, "12345", now - 60, now + 480);
    assert_eq!(status(c.app_installation_token(&good, 77).await.unwrap()), 201);
    c.auth().await.expect("the installation token is the chain's credential");
    let set = c.create_scale_set("app", 1).await.unwrap();
    c.open_session(set.id, "o").await.unwrap();
    let rep = h.report();
    assert_eq!(rep.scale_set(set.id).unwrap().sessions[0].credential, "installation:77");
    assert!(rep.requests_by_credential.contains_key("app:12345"), "{:?}", rep.requests_by_credential);
}

#[tokio::test]
async fn without_a_configured_app_every_app_jwt_gets_401() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = rsa_key(dir.path(), "app");
    let h = start(fast()).await;
    let mut c = ArcClient::new(&h.config_url(), "unused").unwrap();
    let now = unix_now();
    let jwt = token::sign_app_jwt(&key, "12345", now - 60, now + 480).unwrap();
    assert_eq!(c.app_installation_token(&jwt, 1).await.unwrap().status, 401);
}

#[tokio::test]
async fn repository_scope_takes_only_its_registration_path_and_runner_registration_must_register() {
    let h =
        start_config(EmulatorConfig { repo: Some("app".into()), settings: fast(), ..EmulatorConfig::default() }).await;
    assert!(h.config_url().ends_with("/arcfed/app"));
    let mut c = ArcClient::new(&h.config_url(), h.pat()).unwrap();
    c.auth().await.expect("repos/arcfed/app/... mints the registration token");
    let org = ArcClient::new(&format!("{}/arcfed", h.base_url()), h.pat()).unwrap();
    assert_eq!(org.registration_token().await.unwrap().status, 404, "the organization is not the scope");

    let reg = c.registration_token().await.unwrap().value()["token"].as_str().unwrap().to_string();
    let http = ArcClient::builder().build().unwrap();
    for body in [json!({"url": h.config_url()}), json!({"runner_event": "register"}), json!({})] {
        let r = http
            .post(format!("{}/actions/runner-registration", c.api_base()))
            .header("Authorization", format!("RemoteAuth {reg}"))
            .header("User-Agent", "conformance")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
    }
    assert_eq!(c.runner_registration(&reg).await.unwrap().status, 200);

    let ent =
        start_config(EmulatorConfig { enterprise: Some("ent".into()), settings: fast(), ..EmulatorConfig::default() })
            .await;
    assert!(ent.config_url().ends_with("/enterprises/ent"));
    let mut e = ArcClient::new(&ent.config_url(), ent.pat()).unwrap();
    e.auth().await.expect("enterprise scope");
}

#[tokio::test]
async fn rest_calls_without_a_user_agent_get_403() {
    let h = start(fast()).await;
    let c = client(&h).await;
    let http = ArcClient::builder().build().unwrap(); // reqwest sends no User-Agent by default
    let url = format!("{}/orgs/arcfed/actions/runners/registration-token", c.api_base());
    let r = http.post(&url).header("Authorization", format!("Bearer {}", h.pat())).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains("User-Agent"), "{v}");
    let ok = http
        .post(&url)
        .header("Authorization", format!("Bearer {}", h.pat()))
        .header("User-Agent", "x")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 201);
    // The Actions service does not ask for one.
    let groups = http
        .get(format!("{}_apis/runtime/runnergroups/?api-version=6.0-preview", c.service_url))
        .header("Authorization", format!("Bearer {}", c.admin_token))
        .send()
        .await
        .unwrap();
    assert_eq!(groups.status(), 200);
}

async fn calls_without_api_version(strict: bool) -> (u16, u16, u16) {
    let h = start(Settings { strict_api_version: strict, ..fast() }).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let s = c.open_session(set.id, "o").await.unwrap();
    let http = ArcClient::builder().build().unwrap();
    let admin = http
        .get(format!("{}_apis/runtime/runnergroups/", c.service_url))
        .header("Authorization", format!("Bearer {}", c.admin_token))
        .send()
        .await
        .unwrap();
    let (admin_status, admin_body) = (admin.status().as_u16(), admin.text().await.unwrap());
    if strict {
        assert!(admin_body.contains("VssVersionNotSpecifiedException"), "{admin_body}");
    }
    // The queue URL carries api-version; the poll without the Accept header and without it.
    let bare = s.message_queue_url.replace("&api-version=6.0-preview", "");
    let poll = http
        .get(&bare)
        .header("Authorization", format!("Bearer {}", s.message_queue_access_token))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    // What ARC sends always works.
    let arc = c.poll(&bare, &s.message_queue_access_token, 0, Some(1)).await.unwrap().status;
    (admin_status, poll, arc)
}

#[tokio::test]
async fn strict_api_version_refuses_admin_and_queue_calls_without_one() {
    assert_eq!(calls_without_api_version(true).await, (400, 400, 202));
}

#[tokio::test]
async fn without_strict_api_version_calls_without_one_are_served() {
    assert_eq!(calls_without_api_version(false).await, (200, 202, 202));
}

/// Polls and acks until `done` holds for the job messages seen so far (a deadline applies).
async fn collect_jobs(c: &ArcClient, s: &Session, done: impl Fn(&[JobMessage]) -> bool) -> Vec<JobMessage> {
    let mut seen = Vec::new();
    let mut last = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done(&seen) {
        assert!(tokio::time::Instant::now() < deadline, "timed out; seen {seen:?}");
        let r = c.poll(&s.message_queue_url, &s.message_queue_access_token, last, Some(10)).await.unwrap();
        if r.status == 200 {
            let env: MessageEnvelope = r.json().unwrap();
            last = env.message_id;
            seen.extend(jobs_of(&env));
            assert_eq!(c.ack(&s.message_queue_url, &s.message_queue_access_token, last).await.unwrap().status, 204);
        }
    }
    seen
}

#[tokio::test]
async fn an_unstarted_job_is_cancelled_and_offered_again_up_to_three_times() {
    let h = start(Settings { assign_timeout: Duration::from_millis(200), ..fast() }).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let s = c.open_session(set.id, "o").await.unwrap();
    let id = h.enqueue_jobs(set.id, 1, Duration::from_secs(1)).unwrap().remove(0);
    let cancels = |m: &[JobMessage]| m.iter().filter(|m| m.result.as_deref() == Some("canceled")).count();
    let seen = collect_jobs(&c, &s, |m| cancels(m) == 1 + MAX_REASSIGNMENTS as usize).await;
    let kinds: Vec<&str> = seen.iter().map(|m| m.message_type.as_str()).collect();
    assert_eq!(kinds, ["JobAssigned", "JobCompleted"].repeat(1 + MAX_REASSIGNMENTS as usize));
    for m in seen.iter().filter(|m| m.message_type == "JobCompleted") {
        assert_eq!((m.job_id.as_str(), m.result.as_deref()), (id.as_str(), Some("canceled")));
        assert_eq!((m.runner_id, m.runner_name.as_deref(), m.scale_set_assign_time.as_deref()), (None, None, None));
    }
    let rs = h.report().scale_set(set.id).unwrap().clone();
    assert_eq!((rs.jobs_cancelled, rs.jobs_reassigned), (4, 3));
    assert_eq!(rs.statistics.total_assigned_jobs, 0, "dropped after the last cancellation");
    // Nothing more comes: a poll holds its window and answers 202.
    assert_eq!(c.poll(&s.message_queue_url, &s.message_queue_access_token, 99, Some(10)).await.unwrap().status, 202);
    assert_eq!(h.report().scale_set(set.id).unwrap().jobs_cancelled, 4);
}

#[tokio::test]
async fn without_an_assign_timeout_an_unstarted_job_stays_assigned() {
    let h = start(fast()).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let s = c.open_session(set.id, "o").await.unwrap();
    h.enqueue_jobs(set.id, 1, Duration::from_secs(1)).unwrap();
    let seen = collect_jobs(&c, &s, |m| !m.is_empty()).await;
    assert_eq!(seen[0].message_type, "JobAssigned");
    // Three empty long-poll windows later it is still assigned and never cancelled.
    for _ in 0..3 {
        assert_eq!(
            c.poll(&s.message_queue_url, &s.message_queue_access_token, 99, Some(10)).await.unwrap().status,
            202
        );
    }
    let rs = h.report().scale_set(set.id).unwrap().clone();
    assert_eq!((rs.jobs_cancelled, rs.statistics.total_assigned_jobs), (0, 1));
}

#[tokio::test]
async fn odd_messages_bring_an_empty_body_and_an_unknown_job_type() {
    let h = start(Settings { odd_messages_every: 1, ..fast() }).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let s = c.open_session(set.id, "o").await.unwrap();
    h.enqueue_jobs(set.id, 1, Duration::from_secs(1)).unwrap();
    let first = next_message(&c, &s, 0, Some(1)).await;
    assert_eq!(first.body, "", "an envelope with an empty body");
    let second = next_message(&c, &s, first.message_id, Some(1)).await;
    let raw: Vec<Value> = serde_json::from_str(&second.body).unwrap();
    let kinds: Vec<&str> = raw.iter().map(|m| m["messageType"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["JobAssigned", UNKNOWN_JOB_MESSAGE_TYPE]);
}

async fn add_fault(c: &ArcClient, spec: Value) {
    let r = c.emulator(Method::POST, "faults", Some(&spec)).await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test]
async fn handled_then_500_session_create_makes_the_retry_meet_its_own_409() {
    let h = start(fast()).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    add_fault(
        &c,
        json!({"kind": "status", "status": 500, "pathClass": "session_create", "handleFirst": true, "count": 1}),
    )
    .await;
    assert_eq!(c.create_session(set.id, "o").await.unwrap().status, 500);
    let retry = c.create_session(set.id, "o").await.unwrap();
    let msg = assert_exception(&retry, 409, "RunnerScaleSetSessionConflictException");
    assert!(msg.contains("already has an active session"), "{msg}");
    let rep = h.report();
    let rs = rep.scale_set(set.id).unwrap();
    assert_eq!(rs.sessions.len(), 1, "the 500 created a session");
    assert_eq!(rs.sessions[0].close_reason, CloseReason::Open);
    assert_eq!(rep.faults_fired.get("status"), Some(&1));
    let ev = h.timeline().into_iter().find(|e| e.status == 500).unwrap();
    assert_eq!(ev.fault.as_deref(), Some("handled, then status 500"));
}

#[tokio::test]
async fn a_500_without_handle_first_creates_nothing() {
    let h = start(fast()).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    add_fault(&c, json!({"kind": "status", "status": 500, "pathClass": "session_create", "count": 1})).await;
    assert_eq!(c.create_session(set.id, "o").await.unwrap().status, 500);
    assert_eq!(c.create_session(set.id, "o").await.unwrap().status, 200);
    assert_eq!(h.report().scale_set(set.id).unwrap().sessions.len(), 1);
}

#[tokio::test]
async fn handled_then_500_ack_and_acquire_took_effect() {
    let h = start(Settings { mode: Mode::Ghes, ..fast() }).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let s = c.open_session(set.id, "o").await.unwrap();
    h.enqueue_jobs(set.id, 1, Duration::from_secs(1)).unwrap();
    let env = next_message(&c, &s, 0, Some(1)).await;
    let rid = jobs_of(&env)[0].runner_request_id;

    add_fault(&c, json!({"kind": "status", "status": 502, "pathClass": "acquire", "handleFirst": true, "count": 1}))
        .await;
    assert_eq!(c.acquire(set.id, &s.message_queue_access_token, &[rid]).await.unwrap().status, 502);
    assert_eq!(h.statistics(set.id).unwrap().total_assigned_jobs, 1, "the 502 acquired the job");
    let retry = c.acquire(set.id, &s.message_queue_access_token, &[rid]).await.unwrap();
    assert_eq!(retry.value()["value"], json!([rid]), "re-granted to the same session");

    add_fault(&c, json!({"kind": "status", "status": 500, "pathClass": "ack", "handleFirst": true, "count": 1})).await;
    assert_eq!(c.ack(&s.message_queue_url, &s.message_queue_access_token, env.message_id).await.unwrap().status, 500);
    let rs = h.report().scale_set(set.id).unwrap().clone();
    assert_eq!((rs.messages_deleted, rs.acquire_repeats), (1, 1), "the 500 deleted the message");
    // The retry meets a message that is already gone: 204 all the same.
    assert_eq!(c.ack(&s.message_queue_url, &s.message_queue_access_token, env.message_id).await.unwrap().status, 204);
}

#[tokio::test]
async fn a_reset_mid_response_fails_the_client_after_the_message_was_delivered() {
    let h = start(fast()).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let s = c.open_session(set.id, "o").await.unwrap();
    h.enqueue_jobs(set.id, 1, Duration::from_secs(1)).unwrap();
    add_fault(&c, json!({"kind": "reset", "pathClass": "poll", "handleFirst": true, "count": 1})).await;
    let r = c.poll(&s.message_queue_url, &s.message_queue_access_token, 0, Some(1)).await;
    assert!(r.is_err(), "the body never completes: {r:?}");
    // The poll happened: the message was delivered once, and comes again from cursor 0.
    assert_eq!(h.report().scale_set(set.id).unwrap().messages_delivered, 1);
    let again = next_message(&c, &s, 0, Some(1)).await;
    assert_eq!(jobs_of(&again)[0].message_type, "JobAssigned");
    assert_eq!(h.report().scale_set(set.id).unwrap().messages_redelivered, 1);
    assert_eq!(h.report().faults_fired.get("reset"), Some(&1));
}

#[tokio::test]
async fn a_hanging_request_lasts_until_the_client_gives_up() {
    let h = start(fast()).await;
    let http = ArcClient::builder().timeout(Duration::from_millis(500)).build().unwrap();
    let mut c = ArcClient::with_http(&h.config_url(), h.pat(), http).unwrap();
    c.auth().await.unwrap();
    add_fault(&c, json!({"kind": "hang", "pathClass": "runner_groups", "count": 1})).await;
    let err = c.admin(Method::GET, "_apis/runtime/runnergroups/", &[], None).await.unwrap_err();
    assert!(matches!(&err, ClientError::Http(e) if e.is_timeout()), "{err}");
    assert_eq!(c.admin(Method::GET, "_apis/runtime/runnergroups/", &[], None).await.unwrap().status, 200);
    assert!(h.timeline().iter().any(|e| e.fault.as_deref() == Some("hang") && e.class == PathClass::RunnerGroups));
}

async fn rate_limited(status: RateLimitStatus) -> (EmulatorHandle, Vec<u16>, Option<String>, u16) {
    let h = start_with(Settings { rate_limit_per_minute: 3, rate_limit_status: status, ..fast() }, &["pat-a", "pat-b"])
        .await;
    let a = ArcClient::new(&h.config_url(), "pat-a").unwrap();
    let b = ArcClient::new(&h.config_url(), "pat-b").unwrap();
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..4 {
        let r = a.registration_token().await.unwrap();
        statuses.push(r.status);
        retry_after = r.header("retry-after").map(str::to_string).or(retry_after);
    }
    let other = b.registration_token().await.unwrap().status;
    (h, statuses, retry_after, other)
}

#[tokio::test]
async fn secondary_rate_limit_answers_403_with_retry_after_per_credential() {
    let (h, statuses, retry_after, other) = rate_limited(RateLimitStatus::Forbidden).await;
    assert_eq!(statuses, [201, 201, 201, 403]);
    assert!(retry_after.is_some_and(|s| s.parse::<u64>().is_ok_and(|s| (1..=60).contains(&s))));
    assert_eq!(other, 201, "another credential has its own budget");
    let rep = h.report();
    assert_eq!((rep.rate_limited_requests, rep.rate_limited_by_credential.get("pat#1")), (1, Some(&1)));
    assert_eq!(rep.requests_by_credential.get("pat#1"), Some(&4));
    assert!(h.timeline().iter().any(|e| e.rate_limited && e.status == 403));
}

#[tokio::test]
async fn secondary_rate_limit_can_answer_429() {
    let (_h, statuses, retry_after, _) = rate_limited(RateLimitStatus::TooMany).await;
    assert_eq!(statuses, [201, 201, 201, 429]);
    assert!(retry_after.is_some());
}

#[tokio::test]
async fn secondary_rate_limit_counts_admin_calls_and_is_off_by_default() {
    let h = start(Settings { rate_limit_per_minute: 5, ..fast() }).await;
    let c = client(&h).await; // registration-token + runner-registration: 2 of 5
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(c.admin(Method::GET, "_apis/runtime/runnergroups/", &[], None).await.unwrap().status);
    }
    assert_eq!(statuses, [200, 200, 200, 403]);
    let off = start(fast()).await;
    let c = client(&off).await;
    for _ in 0..20 {
        assert_eq!(c.admin(Method::GET, "_apis/runtime/runnergroups/", &[], None).await.unwrap().status, 200);
    }
    assert_eq!(off.report().rate_limited_requests, 0);
}

async fn acquirable(enabled: bool) -> u16 {
    let h = start(Settings { acquirable_jobs: enabled, ..fast() }).await;
    let c = client(&h).await;
    let set = c.create_scale_set("s", 1).await.unwrap();
    let path = format!("_apis/runtime/runnerscalesets/{}/acquirablejobs", set.id);
    c.admin(Method::GET, &path, &[], None).await.unwrap().status
}

#[tokio::test]
async fn acquirablejobs_answers_204_by_default_and_404_without_it() {
    assert_eq!(acquirable(true).await, 204);
    assert_eq!(acquirable(false).await, 404);
}
