//! Conformance of the actions-emulator with `reference/arc-protocol.md`, driven with requests
//! shaped as ARC sends them (sorted form-encoded queries, `RunnerSetting`, zero `createdOn`,
//! JSON User-Agent, `X-ScaleSetMaxCapacity`, `api-version=6.0-preview`), through
//! [`ArcClient`]. Each test starts its own emulator on 127.0.0.1:0. Waits are conditions
//! with deadlines; no test asserts a duration.

use arcfed_tests::emulator::client::{ArcClient, Resp};
use arcfed_tests::emulator::model::{JobMessage, MessageEnvelope, Session, Statistics};
use arcfed_tests::emulator::{
    CloseReason, CrossCredentialDelete, Cursor, Emulator, EmulatorConfig, EmulatorHandle, FaultKind, FaultSpec, Mode,
    PathClass, SessionTtlFrom, Settings, TlsFiles, token,
};
use reqwest::Method;
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

    // GitHub App flow: any app JWT → installation token (201) → registration token.
    let http = ArcClient::builder().build().unwrap();
    let app_jwt = token::mint_jwt("12345", now - 60, now + 540);
    let r = http
        .post(format!("{}/app/installations/77/access_tokens", c.api_base()))
        .header("Authorization", format!("Bearer {app_jwt}"))
        .header("Content-Type", "application/vnd.github+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let inst = v["token"].as_str().unwrap().to_string();
    assert!(v["expires_at"].is_string());
    for path in ["enterprises/e/actions/runners/registration-token", "repos/o/r/actions/runners/registration-token"] {
        let r = http
            .post(format!("{}/{path}", c.api_base()))
            .header("Authorization", format!("Bearer {inst}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{path}");
    }
    let mut app = ArcClient::new(&h.config_url(), &inst).unwrap();
    app.auth().await.expect("installation token works as the chain's credential");
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

    for owner in ["owner-b", "owner-a"] {
        let again = c.create_session(set.id, owner).await.unwrap();
        let msg = assert_exception(&again, 409, "RunnerScaleSetSessionConflictException");
        assert_eq!(again.value()["typeName"], format!("{RT}.RunnerScaleSetSessionConflictException, {RT}"),);
        assert_eq!(msg, "The runner scale set gha-rs already has an active session for owner owner-a.");
    }
    let rep = h.report();
    let s = rep.scale_set(set.id).unwrap();
    assert_eq!((s.conflicts_409, s.sessions.len()), (2, 1));
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
