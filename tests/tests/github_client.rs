//! The agent's production GitHub client (`arcfed_agent::github::Client`) against the in-process
//! actions-emulator, in the GHES layout (REST under `/api/v3`, one host) and the github.com
//! layout (REST on `api.github.localhost`, the Actions service and the queue on a broker host
//! whose queue URL changes on every refresh), with a PAT and with a GitHub App whose RSA key is
//! generated at test time with `openssl` (CI needs the `openssl` binary).
//!
//! Every check reads what the emulator recorded (timeline, report), not what the client says.
//! Waits are conditions with deadlines; no test asserts a duration.

use arcfed_agent::github::{
    Client, Credentials, Error, Fenced, Gate, GitHubSettings, HOLDER_CONNECT_TIMEOUT, MAX_BODY_BYTES, Open, Resolve,
    RetryPolicy, job_messages, wire,
};
use arcfed_tests::emulator::{
    AppKey, CloseReason, DOTCOM_HOST, Emulator, EmulatorConfig, EmulatorHandle, Event, FaultSpec, Layout, Mode,
    PathClass, Settings, TlsFiles,
};
use arcfed_tests::fault_proxy::{FaultProxy, Mode as ProxyMode};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// Short long polls, no automatic runners, and GitHub's strictness about `api-version` (admin
/// calls without it in the query, or queue calls without it in `Accept`, get 400).
fn fast() -> Settings {
    Settings {
        long_poll: Duration::from_millis(300),
        auto_runners: false,
        strict_api_version: true,
        ..Settings::default()
    }
}

/// Short backoff so retries do not slow the suite; the production default is 1 s → 8 s.
fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        max_retries: 4,
        min_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
        retry_after_cap: Duration::from_secs(5),
    }
}

async fn start(layout: Layout, settings: Settings, app: Option<AppKey>) -> EmulatorHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let config = EmulatorConfig { layout, app, settings, ..EmulatorConfig::default() };
    Emulator::start(config, listener).await.expect("start emulator")
}

fn settings_for(h: &EmulatorHandle, scale_set_id: i64, credentials: Credentials) -> GitHubSettings {
    GitHubSettings {
        configure_url: h.config_url(),
        credentials,
        root_ca_pem: None,
        resolve: h
            .resolve_overrides()
            .iter()
            .map(|(host, a)| Resolve { host: host.clone(), port: a.port(), addr: a.ip() })
            .collect(),
        scale_set_id,
    }
}

fn client(h: &EmulatorHandle, scale_set_id: i64) -> Client {
    Client::with_retry(settings_for(h, scale_set_id, Credentials::Pat(h.pat().to_string())), quick_retries())
        .expect("client")
}

fn fault(spec: serde_json::Value) -> FaultSpec {
    serde_json::from_value(spec).expect("fault spec")
}

fn events(h: &EmulatorHandle, class: PathClass) -> Vec<Event> {
    h.timeline().into_iter().filter(|e| e.class == class).collect()
}

fn holder_only_requests(h: &EmulatorHandle) -> usize {
    h.timeline().iter().filter(|e| e.class.holder_only() || e.class == PathClass::SessionRefresh).count()
}

/// Polls until a message arrives (202s are "no message yet").
async fn next_message(c: &Client, session: &mut wire::Session, last: i64) -> wire::MessageEnvelope {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(m) = c.get_message(&Open, session, last, 10).await.expect("poll") {
            return m;
        }
        assert!(tokio::time::Instant::now() < deadline, "no message within {WAIT:?}");
    }
}

/// A gate that allows `allow` checks, then refuses; counts every check.
struct CountingGate {
    allow: AtomicUsize,
    checks: AtomicUsize,
}

impl CountingGate {
    fn new(allow: usize) -> Self {
        Self { allow: AtomicUsize::new(allow), checks: AtomicUsize::new(0) }
    }
}

impl Gate for CountingGate {
    fn check(&self) -> Result<(), Fenced> {
        self.checks.fetch_add(1, Ordering::SeqCst);
        self.allow
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |a| a.checked_sub(1))
            .map(|_| ())
            .map_err(|_| Fenced)
    }
}

/// The PAT chain, a session's whole life and ARC's headers, in one layout.
async fn session_life(layout: Layout) {
    let h = start(layout, fast(), None).await;
    let set = h.create_scale_set("gha-rs", 1).expect("scale set").id;
    let c = client(&h, set);
    assert!(!c.github_ready(), "not ready before any token or scale-set check");
    c.refresh_admin_token().await.expect("auth chain");
    assert_eq!(c.service_url().as_deref(), Some(h.service_url()));
    assert!(!c.github_ready(), "a token alone is not ready: the scale set was never read");
    let got = c.get_scale_set().await.expect("get scale set");
    assert_eq!((got.id, got.name.as_str()), (set, "gha-rs"));
    assert!(c.github_ready());

    let mut s = c.create_session(&Open, "arcfed/a/m1/t1").await.expect("create session");
    assert_eq!(s.owner_name, "arcfed/a/m1/t1");
    assert!(c.get_message(&Open, &mut s, 0, 10).await.expect("idle poll").is_none(), "202 is no message");

    h.enqueue_jobs(set, 1, Duration::from_secs(30)).expect("enqueue");
    let m = next_message(&c, &mut s, 0).await;
    assert_eq!(m.message_type, "RunnerScaleSetJobMessages");
    let (jobs, skipped) = job_messages(&m.body);
    assert_eq!((jobs.len(), skipped), (1, 0), "body: {}", m.body);
    assert_eq!(jobs[0].message_type, "JobAssigned");
    assert_eq!(m.statistics.total_assigned_jobs, 1);
    c.delete_message(&Open, &mut s, m.message_id).await.expect("ack");
    c.delete_message(&Open, &mut s, m.message_id).await.expect("a second ack of a gone message is done");
    assert!(c.get_message(&Open, &mut s, m.message_id, 10).await.expect("poll after ack").is_none());

    c.delete_session(&Open, &s.session_id).await.expect("delete session");
    c.delete_session(&Open, &s.session_id).await.expect("deleting a deleted session is done (400 expired)");

    let report = h.report();
    let r = report.scale_set(set).expect("report");
    assert_eq!(r.sessions.len(), 1);
    assert_eq!(r.sessions[0].close_reason, CloseReason::Deleted);
    assert_eq!((r.messages_delivered, r.messages_deleted, r.conflicts_409), (1, 1, 0));

    // ARC's headers and query (reference §1.7, §2.10), as the emulator recorded them.
    let timeline = h.timeline();
    for e in &timeline {
        let ua = e.user_agent.as_deref().unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(ua).unwrap_or_else(|_| panic!("UA is JSON: {ua:?}"));
        assert_eq!(v["system"], "arcfed-agent", "{ua}");
        assert_eq!(v["version"], env!("CARGO_PKG_VERSION"), "{ua}");
        assert_eq!((v["scale_set_id"].as_i64(), v["subsystem"].as_str()), (Some(set), Some("ghalistener")), "{ua}");
        let admin = matches!(
            e.class,
            PathClass::ScaleSets | PathClass::SessionCreate | PathClass::SessionDelete | PathClass::SessionRefresh
        );
        if admin {
            assert!(e.query.contains("api-version=6.0-preview"), "{e:?}");
        }
    }
    let polls = events(&h, PathClass::Poll);
    assert!(polls.len() >= 3, "{polls:?}");
    assert!(polls.iter().all(|e| e.capacity == Some(10)), "{polls:?}");
    assert!(polls.iter().any(|e| e.status == 200) && polls.iter().any(|e| e.status == 202));
    assert!(polls.iter().any(|e| e.query.contains(&format!("lastMessageId={}", m.message_id))), "{polls:?}");
    assert_eq!(events(&h, PathClass::Ack).len(), 2);
    h.shutdown().await;
}

#[tokio::test]
async fn ghes_pat_chain_opens_polls_acks_and_deletes_a_session_with_arc_headers() {
    session_life(Layout::Ghes).await;
}

#[tokio::test]
async fn dotcom_pat_chain_opens_polls_acks_and_deletes_a_session_on_the_broker() {
    session_life(Layout::Dotcom).await;
}

fn conflict_of(r: Result<wire::Session, Error>) -> (Option<String>, bool) {
    match r {
        Err(e @ Error::Conflict { .. }) => {
            assert!(!e.is_local(), "a 409 is never a local failure");
            assert!(e.activity_id().is_some(), "ActivityId is carried: {e}");
            let Error::Conflict { owner, foreign, .. } = e else { unreachable!() };
            (owner, foreign)
        }
        other => panic!("expected a typed 409, got {other:?}"),
    }
}

/// A 409 is typed by status and typeName; the owner comes from the message when it names one
/// (the emulator alternates GitHub's two texts, one of which names no owner).
async fn conflicts(layout: Layout) {
    let h = start(layout, fast(), None).await;
    let set = h.create_scale_set("gha-rs", 1).unwrap().id;
    let c = client(&h, set);
    let s = c.create_session(&Open, "arcfed/a/m1/t1").await.expect("first session");
    let mut seen = [
        conflict_of(c.create_session(&Open, "arcfed/b/m2/t2").await),
        conflict_of(c.create_session(&Open, "arcfed/b/m2/t2").await),
    ];
    seen.sort();
    assert_eq!(seen, [(None, false), (Some("arcfed/a/m1/t1".to_string()), false)], "an arcfed owner is not foreign");
    c.delete_session(&Open, &s.session_id).await.unwrap();

    let stock = c.create_session(&Open, "gha-rs-754b578d-listener").await.expect("stock listener's session");
    let mut seen = [
        conflict_of(c.create_session(&Open, "arcfed/b/m2/t2").await),
        conflict_of(c.create_session(&Open, "arcfed/b/m2/t2").await),
    ];
    seen.sort();
    assert_eq!(seen, [(None, false), (Some("gha-rs-754b578d-listener".to_string()), true)], "a stock owner is foreign");
    c.delete_session(&Open, &stock.session_id).await.unwrap();
    // Each refused create was one request: POST …/sessions is never retried.
    assert_eq!(h.report().scale_set(set).unwrap().conflicts_409, 4);
    assert_eq!(events(&h, PathClass::SessionCreate).len(), 6);
    h.shutdown().await;
}

#[tokio::test]
async fn ghes_409_is_typed_with_foreign_and_arcfed_owners() {
    conflicts(Layout::Ghes).await;
}

#[tokio::test]
async fn dotcom_409_is_typed_with_foreign_and_arcfed_owners() {
    conflicts(Layout::Dotcom).await;
}

/// A 401 on each queue call refreshes the session (PATCH) and retries once with the new token
/// (and, on the broker, the new URL).
async fn queue_401_refreshes(layout: Layout) {
    let h = start(layout, Settings { mode: Mode::Ghes, ..fast() }, None).await;
    let set = h.create_scale_set("gha-rs", 1).unwrap().id;
    let c = client(&h, set);
    let mut s = c.create_session(&Open, "arcfed/a/m1/t1").await.unwrap();

    for (class, name) in [(PathClass::Poll, "poll"), (PathClass::Ack, "ack"), (PathClass::Acquire, "acquire")] {
        let before = s.clone();
        h.add_fault(fault(json!({"kind": "status", "status": 401, "pathClass": name, "count": 1}))).unwrap();
        match class {
            PathClass::Poll => {
                assert!(c.get_message(&Open, &mut s, 0, 10).await.expect("poll after refresh").is_none())
            }
            PathClass::Ack => c.delete_message(&Open, &mut s, 999).await.expect("ack after refresh"),
            _ => {
                c.acquire_jobs(&Open, &mut s, &[]).await.expect("acquire after refresh");
            }
        }
        assert_eq!(s.session_id, before.session_id);
        assert_ne!(s.message_queue_access_token, before.message_queue_access_token, "{name}: new token taken");
        if layout == Layout::Dotcom {
            assert_ne!(s.message_queue_url, before.message_queue_url, "{name}: the broker's URL rotates");
        }
        let evs = events(&h, class);
        let last_two: Vec<u16> = evs.iter().rev().take(2).rev().map(|e| e.status).collect();
        assert_eq!(last_two[0], 401, "{name}: {evs:?}");
        assert!(last_two[1] < 300, "{name}: the retry succeeded: {evs:?}");
        assert_eq!(evs.last().unwrap().session_id.as_deref(), Some(s.session_id.as_str()));
    }
    assert_eq!(events(&h, PathClass::SessionRefresh).len(), 3);
    c.delete_session(&Open, &s.session_id).await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn ghes_401_on_poll_ack_and_acquire_refreshes_the_session_and_retries_with_the_new_token() {
    queue_401_refreshes(Layout::Ghes).await;
}

#[tokio::test]
async fn dotcom_401_on_poll_ack_and_acquire_refreshes_and_follows_the_rotated_queue_url() {
    queue_401_refreshes(Layout::Dotcom).await;
}

#[tokio::test]
async fn refresh_404_after_eviction_is_session_gone() {
    let h = start(Layout::Ghes, fast(), None).await;
    let set = h.create_scale_set("gha-rs", 1).unwrap().id;
    let c = client(&h, set);
    let mut s = c.create_session(&Open, "arcfed/a/m1/t1").await.unwrap();
    h.evict_session(&s.session_id).expect("evict");
    match c.get_message(&Open, &mut s, 0, 10).await {
        Err(e @ Error::SessionGone { .. }) => {
            assert!(e.is_local(), "a refresh 404 counts toward holder-stall");
            assert!(e.to_string().contains(&s.session_id), "{e}");
        }
        other => panic!("expected SessionGone, got {other:?}"),
    }
    let refreshes = events(&h, PathClass::SessionRefresh);
    assert_eq!(refreshes.iter().map(|e| e.status).collect::<Vec<_>>(), vec![404]);
    h.shutdown().await;
}

#[tokio::test]
async fn rate_limit_with_retry_after_is_retried_and_a_long_retry_after_is_capped() {
    let h = start(Layout::Ghes, fast(), None).await;
    let set = h.create_scale_set("gha-rs", 1).unwrap().id;
    let c = client(&h, set);
    let mut s = c.create_session(&Open, "arcfed/a/m1/t1").await.unwrap();
    h.add_fault(fault(json!({"kind": "status", "status": 429, "retryAfter": "1", "pathClass": "poll", "count": 2})))
        .unwrap();
    assert!(c.get_message(&Open, &mut s, 0, 10).await.expect("retried past two 429s").is_none());
    let statuses: Vec<u16> = events(&h, PathClass::Poll).iter().map(|e| e.status).collect();
    assert_eq!(statuses, vec![429, 429, 202]);

    // An hour's Retry-After is capped (5 s in this policy), so the call ends well before the
    // deadline instead of sleeping for an hour.
    h.add_fault(fault(json!({"kind": "status", "status": 503, "retryAfter": "3600", "pathClass": "poll", "count": 1})))
        .unwrap();
    let polled = tokio::time::timeout(WAIT, c.get_message(&Open, &mut s, 0, 10)).await;
    assert!(polled.expect("Retry-After is capped").expect("503 retried").is_none());

    // Retries are bounded: past max_retries the error surfaces, typed.
    h.add_fault(fault(json!({"kind": "status", "status": 429, "pathClass": "poll", "count": 5}))).unwrap();
    match c.get_message(&Open, &mut s, 0, 10).await {
        Err(e @ Error::RateLimited { .. }) => assert!(e.activity_id().is_some()),
        other => panic!("expected RateLimited after 5 attempts, got {other:?}"),
    }
    assert_eq!(events(&h, PathClass::Poll).iter().filter(|e| e.status == 429).count(), 2 + 5);
    h.shutdown().await;
}

#[tokio::test]
async fn create_session_is_never_retried_but_other_calls_retry_5xx() {
    let h = start(Layout::Ghes, fast(), None).await;
    let set = h.create_scale_set("gha-rs", 1).unwrap().id;
    let c = client(&h, set);
    c.refresh_admin_token().await.unwrap();
    h.add_fault(fault(json!({"kind": "status", "status": 500, "pathClass": "session_create", "count": 3}))).unwrap();
    match c.create_session(&Open, "arcfed/a/m1/t1").await {
        Err(e @ Error::Status { status: 500, .. }) => assert!(e.is_local()),
        other => panic!("expected the 500, got {other:?}"),
    }
    assert_eq!(events(&h, PathClass::SessionCreate).len(), 1, "exactly one POST …/sessions");

    h.add_fault(fault(json!({"kind": "status", "status": 502, "pathClass": "scale_sets", "count": 2}))).unwrap();
    c.get_scale_set().await.expect("GET scale set retried past two 502s");
    let statuses: Vec<u16> = events(&h, PathClass::ScaleSets).iter().map(|e| e.status).collect();
    assert_eq!(statuses, vec![502, 502, 200]);

    // 501 is not retried (go-retryablehttp).
    h.add_fault(fault(json!({"kind": "status", "status": 501, "pathClass": "scale_sets", "count": 1}))).unwrap();
    assert!(matches!(c.get_scale_set().await, Err(Error::Status { status: 501, .. })));
    assert!(!c.github_ready(), "a failed scale-set read makes the member not ready");
    h.shutdown().await;
}

#[tokio::test]
async fn a_refusing_gate_fences_every_holder_only_call_before_anything_is_sent() {
    let h = start(Layout::Ghes, fast(), None).await;
    let set = h.create_scale_set("gha-rs", 1).unwrap().id;
    let c = client(&h, set);
    let mut s = c.create_session(&Open, "arcfed/a/m1/t1").await.unwrap();
    c.refresh_admin_token().await.unwrap();
    let sent_before = holder_only_requests(&h);

    let shut = CountingGate::new(0);
    assert!(matches!(c.create_session(&shut, "arcfed/a/m1/t2").await, Err(Error::Fenced)));
    assert!(matches!(c.get_message(&shut, &mut s, 0, 10).await, Err(Error::Fenced)));
    assert!(matches!(c.delete_message(&shut, &mut s, 1).await, Err(Error::Fenced)));
    assert!(matches!(c.acquire_jobs(&shut, &mut s, &[1]).await, Err(Error::Fenced)));
    assert!(matches!(c.acquirable_jobs(&shut).await, Err(Error::Fenced)));
    assert!(matches!(c.delete_session(&shut, &s.session_id).await, Err(Error::Fenced)));
    assert!(matches!(c.refresh_session(&shut, &mut s).await, Err(Error::Fenced)));
    assert_eq!(shut.checks.load(Ordering::SeqCst), 7);
    assert_eq!(holder_only_requests(&h), sent_before, "a fenced call sends nothing");
    assert!(!Error::Fenced.is_local());

    // The gate is checked before each retry too: a fence that ends during 5xx retries stops
    // them at once.
    h.add_fault(fault(json!({"kind": "status", "status": 503, "pathClass": "poll", "count": 5}))).unwrap();
    let once = CountingGate::new(1);
    assert!(matches!(c.get_message(&once, &mut s, 0, 10).await, Err(Error::Fenced)));
    assert_eq!(once.checks.load(Ordering::SeqCst), 2);
    assert_eq!(events(&h, PathClass::Poll).len(), 1, "one attempt went out, the retry was fenced");

    // And before the retry after a 401's refresh: allow the poll, refuse the PATCH.
    h.clear_faults();
    h.add_fault(fault(json!({"kind": "status", "status": 401, "pathClass": "poll", "count": 1}))).unwrap();
    let once = CountingGate::new(1);
    assert!(matches!(c.get_message(&once, &mut s, 0, 10).await, Err(Error::Fenced)));
    assert!(events(&h, PathClass::SessionRefresh).is_empty());
    c.delete_session(&Open, &s.session_id).await.unwrap();
    h.shutdown().await;
}

/// The agent's fence rule (driver.rs `FenceGate`): an attempt is admitted only while the fence
/// still covers it after a fresh connect, bounded by the holder client's connect timeout.
struct FenceUntil {
    end: tokio::time::Instant,
    owner: String,
}

impl Gate for FenceUntil {
    fn check(&self) -> Result<(), Fenced> {
        if tokio::time::Instant::now() + HOLDER_CONNECT_TIMEOUT < self.end { Ok(()) } else { Err(Fenced) }
    }
    fn owner(&self) -> Option<String> {
        Some(self.owner.clone())
    }
}

/// Safety review H3: a holder-only request whose TCP connect stalls (SYNs dropped) until after
/// the fence has ended must never reach GitHub, not even once the path heals. The connect
/// timeout of holder calls is far below the fence margin and every attempt re-checks the gate.
#[tokio::test]
async fn a_holder_request_whose_connect_stalls_past_the_fence_never_reaches_github() {
    // GitHub behind a fault proxy; the emulator hands out URLs that go through it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy = FaultProxy::start(listener.local_addr().expect("addr")).await.expect("proxy");
    let config = EmulatorConfig {
        layout: Layout::Ghes,
        settings: fast(),
        advertise_url: Some(format!("http://{}", proxy.addr())),
        ..EmulatorConfig::default()
    };
    let h = Emulator::start(config, listener).await.expect("start emulator");
    let set = h.create_scale_set("gha-rs", 1).unwrap().id;
    let c = client(&h, set);
    let owner = "arcfed/a/m1/t1".to_string();
    let mut s = c.create_session(&Open, &owner).await.unwrap();
    c.refresh_admin_token().await.unwrap();
    assert!(h.timeline().iter().all(|e| e.class != PathClass::Ack));

    proxy.set_mode(ProxyMode::StallConnects);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !proxy.connects_stalled() {
        assert!(tokio::time::Instant::now() < deadline, "the proxy never stalled connects");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The fence ends 1.5 s from now, while every connect is stuck in the handshake.
    let end = tokio::time::Instant::now() + Duration::from_millis(1500);
    let gate = FenceUntil { end, owner };
    let ack = tokio::spawn({
        let (c, mut s) = (c.clone(), s.clone());
        async move { c.delete_message(&gate, &mut s, 1).await }
    });
    tokio::time::sleep_until(end).await;
    let fence_end_ms = h.now_ms();
    // The path heals just after the fence ended: a connect still waiting now completes at the
    // next retransmitted SYN (about 1 s, 3 s, 7 s after the first) and its request would
    // arrive late. Watch until past the 7 s retransmission.
    proxy.set_mode(ProxyMode::Pass);
    let until = tokio::time::Instant::now() + Duration::from_secs(8);
    while tokio::time::Instant::now() < until {
        let late: Vec<Event> =
            h.timeline().into_iter().filter(|e| e.class == PathClass::Ack && e.at_ms >= fence_end_ms).collect();
        assert!(late.is_empty(), "a holder request reached GitHub after its fence: {late:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = tokio::time::timeout(WAIT, ack).await.expect("the fenced ack returned").expect("ack task");
    assert!(matches!(r, Err(Error::Fenced | Error::Transport { .. })), "{r:?}");
    // The path works again for a holder whose fence is valid.
    let fresh = FenceUntil { end: tokio::time::Instant::now() + WAIT, owner: "arcfed/a/m1/t1".into() };
    c.delete_message(&fresh, &mut s, 1).await.expect("ack after the heal");
    let acks = events(&h, PathClass::Ack);
    assert_eq!(acks.len(), 1, "{acks:#?}");
    assert_eq!(acks[0].sender.as_deref(), Some("arcfed/a/m1/t1"), "the ack names its sender's token");
    h.shutdown().await;
}

/// ARC hands its listener pod the ARS's proxy settings as lowercase `http_proxy`, `https_proxy`
/// and `no_proxy`; the agent's GitHub client (the same pod, the same variables) honours them.
/// The client runs in a child process of this test binary, whose environment carries them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lowercase_proxy_variables_arc_sets_are_honoured() {
    const TEST: &str = "the_lowercase_proxy_variables_arc_sets_are_honoured";
    if let (Ok(url), Ok(set)) = (std::env::var("ARCFED_PROXY_TEST_URL"), std::env::var("ARCFED_PROXY_TEST_SET")) {
        // The child: one session opened and deleted, with whatever proxy the environment names.
        let settings = GitHubSettings {
            configure_url: url,
            credentials: Credentials::Pat(std::env::var("ARCFED_PROXY_TEST_PAT").expect("pat")),
            root_ca_pem: None,
            resolve: vec![],
            scale_set_id: set.parse().expect("set id"),
        };
        let c = Client::with_retry(settings, quick_retries()).expect("client");
        let s = c.create_session(&Open, "arcfed/a/m1/t1").await.expect("create");
        c.delete_session(&Open, &s.session_id).await.expect("delete");
        return;
    }
    let h = start(Layout::Ghes, fast(), None).await;
    let set = h.create_scale_set("gha-rs", 1).unwrap().id;
    let url = reqwest::Url::parse(&h.config_url()).expect("config url");
    let host = url.host_str().expect("host").to_string();
    let upstream: std::net::SocketAddr = format!("{host}:{}", url.port().expect("port")).parse().expect("addr");
    // A plain TCP relay: a proxied plain-HTTP request is just an absolute-form request line.
    let proxy = FaultProxy::start(upstream).await.expect("proxy");
    let run = |extra: &[(&str, String)]| {
        let mut cmd = std::process::Command::new(std::env::current_exe().expect("exe"));
        cmd.args(["--exact", TEST, "--nocapture", "--test-threads=1"]);
        for k in ["HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"] {
            cmd.env_remove(k);
        }
        cmd.env("ARCFED_PROXY_TEST_URL", h.config_url())
            .env("ARCFED_PROXY_TEST_SET", set.to_string())
            .env("ARCFED_PROXY_TEST_PAT", h.pat())
            .env("http_proxy", format!("http://{}", proxy.addr()));
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.output().expect("run the child")
    };
    let out = tokio::task::block_in_place(|| run(&[]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let proxied = proxy.accepted();
    assert!(proxied > 0, "the client did not use http_proxy");
    // no_proxy naming GitHub's host: straight there.
    let out = tokio::task::block_in_place(|| run(&[("no_proxy", host.clone())]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(proxy.accepted(), proxied, "no_proxy was ignored");
    h.shutdown().await;
}

#[tokio::test]
async fn a_queue_that_no_longer_knows_the_session_is_session_gone_in_either_error_form() {
    let h = start(Layout::Dotcom, fast(), None).await;
    let set = h.create_scale_set("gha-rs", 1).unwrap().id;
    let c = client(&h, set);
    let mut s = c.create_session(&Open, "arcfed/a/m1/t1").await.unwrap();
    let gone = |r: Result<Option<wire::MessageEnvelope>, Error>| matches!(r, Err(Error::SessionGone { .. }));
    // The broker's structured 400 (2026) and a plain 404 on the queue both mean: open another.
    h.add_fault(fault(
        json!({"kind": "status", "status": 400, "errorKind": "RunnerSessionInvalid", "pathClass": "poll", "count": 1}),
    ))
    .unwrap();
    assert!(gone(c.get_message(&Open, &mut s, 0, 10).await));
    h.add_fault(fault(json!({"kind": "status", "status": 404, "pathClass": "poll", "count": 1}))).unwrap();
    assert!(gone(c.get_message(&Open, &mut s, 0, 10).await));
    // A 404 that names the scale set (seen on a live set during an incident) stays typed as
    // what it is, not as a lost session.
    h.add_fault(fault(json!({"kind": "status", "status": 404, "pathClass": "poll", "count": 1,
        "typeName": "GitHub.Actions.Runtime.WebApi.RunnerScaleSetNotFoundException, GitHub.Actions.Runtime.WebApi"})))
        .unwrap();
    let r = c.get_message(&Open, &mut s, 0, 10).await;
    assert!(matches!(r, Err(Error::Status { status: 404, .. })), "{r:?}");
    // The ack answered with the structured 400 did not ack: SessionGone, not done.
    h.add_fault(fault(
        json!({"kind": "status", "status": 400, "errorKind": "RunnerSessionInvalid", "pathClass": "ack", "count": 1}),
    ))
    .unwrap();
    assert!(matches!(c.delete_message(&Open, &mut s, 1).await, Err(Error::SessionGone { .. })));
    assert!(c.get_message(&Open, &mut s, 0, 10).await.expect("the next poll").is_none());
    h.shutdown().await;
}

#[tokio::test]
async fn the_long_poll_is_not_retried_on_a_transport_error_so_the_holder_sees_each_failure() {
    let h = start(Layout::Ghes, fast(), None).await;
    let set = h.create_scale_set("gha-rs", 1).unwrap().id;
    let c = client(&h, set);
    let mut s = c.create_session(&Open, "arcfed/a/m1/t1").await.unwrap();
    h.add_fault(fault(json!({"kind": "reset", "pathClass": "poll", "count": 3}))).unwrap();
    let r = c.get_message(&Open, &mut s, 0, 10).await;
    assert!(matches!(r, Err(Error::Transport { .. })), "{r:?}");
    assert_eq!(events(&h, PathClass::Poll).len(), 1, "one attempt, no hidden retries");
    h.shutdown().await;
}

#[tokio::test]
async fn a_session_id_that_is_not_a_uuid_is_never_pasted_into_a_url() {
    let h = start(Layout::Ghes, fast(), None).await;
    let set = h.create_scale_set("gha-rs", 1).unwrap().id;
    let c = client(&h, set);
    c.refresh_admin_token().await.unwrap();
    let before = h.timeline().len();
    for id in ["../../2", "../runnerscalesets/1", "x?y"] {
        match c.delete_session(&Open, id).await {
            Err(e @ Error::Config(_)) => assert!(e.to_string().contains("not a UUID"), "{e}"),
            other => panic!("{id:?}: expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(h.timeline().len(), before, "nothing was sent");
    assert!(h.report().scale_set(set).is_some(), "the scale set is still there");
    h.shutdown().await;
}

/// A server that answers every request with a 200 whose body is larger than the client reads:
/// announced by Content-Length (`chunked` false) or streamed without one.
async fn oversized_body_server(chunked: bool) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let chunk = vec![b' '; 64 * 1024];
                if chunked {
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
                        )
                        .await;
                    for _ in 0..(MAX_BODY_BYTES / chunk.len() + 8) {
                        let head = format!("{:x}\r\n", chunk.len());
                        if s.write_all(head.as_bytes()).await.is_err()
                            || s.write_all(&chunk).await.is_err()
                            || s.write_all(b"\r\n").await.is_err()
                        {
                            return;
                        }
                    }
                    let _ = s.write_all(b"0\r\n\r\n").await;
                } else {
                    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 300000000\r\n\r\n";
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(&chunk).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_oversized_response_body_is_an_error_not_a_memory_spike() {
    let h = start(Layout::Ghes, fast(), None).await;
    let set = h.create_scale_set("gha-rs", 1).unwrap().id;
    let c = client(&h, set);
    let mut s = c.create_session(&Open, "arcfed/a/m1/t1").await.unwrap();
    for chunked in [false, true] {
        let addr = oversized_body_server(chunked).await;
        s.message_queue_url = format!("http://{addr}/_apis/queue?sessionId={}", s.session_id);
        match tokio::time::timeout(WAIT, c.get_message(&Open, &mut s, 0, 10)).await.expect("no hang") {
            Err(e @ Error::TooLarge { .. }) => assert!(e.to_string().contains(&MAX_BODY_BYTES.to_string()), "{e}"),
            other => panic!("chunked={chunked}: expected TooLarge, got {other:?}"),
        }
    }
    h.shutdown().await;
}

#[tokio::test]
async fn ghes_mode_acquires_available_jobs_with_the_queue_token() {
    let h = start(Layout::Ghes, Settings { mode: Mode::Ghes, ..fast() }, None).await;
    let set = h.create_scale_set("gha-rs", 1).unwrap().id;
    let c = client(&h, set);
    let mut s = c.create_session(&Open, "arcfed/a/m1/t1").await.unwrap();
    h.enqueue_jobs(set, 2, Duration::from_secs(30)).unwrap();
    let listed = c.acquirable_jobs(&Open).await.expect("acquirable").expect("the emulator has the endpoint");
    let mut available = Vec::new();
    let mut last = 0;
    while available.len() < 2 {
        let m = next_message(&c, &mut s, last).await;
        last = m.message_id;
        let (jobs, _) = job_messages(&m.body);
        available.extend(jobs.iter().filter(|j| j.message_type == "JobAvailable").map(|j| j.runner_request_id));
        c.delete_message(&Open, &mut s, m.message_id).await.unwrap();
    }
    assert!(listed.len() <= 2, "{listed:?}");
    let mut acquired = c.acquire_jobs(&Open, &mut s, &available).await.expect("acquire");
    acquired.sort();
    available.sort();
    assert_eq!(acquired, available);
    let acq: Vec<Event> = events(&h, PathClass::Acquire).into_iter().filter(|e| e.method == "POST").collect();
    assert_eq!(acq.len(), 1, "{acq:#?}");
    assert_eq!(acq[0].auth, arcfed_tests::emulator::report::AuthKind::Queue, "acquire uses the queue token");
    assert_eq!(h.report().scale_set(set).unwrap().jobs_acquired_twice, 0);
    c.delete_session(&Open, &s.session_id).await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn an_empty_200_is_a_typed_glitch_and_the_next_poll_works() {
    let h = start(Layout::Ghes, fast(), None).await;
    let set = h.create_scale_set("gha-rs", 1).unwrap().id;
    let c = client(&h, set);
    let mut s = c.create_session(&Open, "arcfed/a/m1/t1").await.unwrap();
    h.add_fault(fault(json!({"kind": "empty_body", "pathClass": "poll", "count": 1}))).unwrap();
    match c.get_message(&Open, &mut s, 0, 10).await {
        Err(e @ Error::EmptyBody { .. }) => assert!(!e.is_local()),
        other => panic!("expected EmptyBody, got {other:?}"),
    }
    assert!(c.get_message(&Open, &mut s, 0, 10).await.expect("the next poll").is_none());
    h.shutdown().await;
}

#[tokio::test]
async fn jit_config_and_runner_removal_for_the_sim_backend() {
    let h = start(Layout::Ghes, fast(), None).await;
    let set = h.create_scale_set("gha-rs", 1).unwrap().id;
    let c = client(&h, set);
    let jit = c.generate_jit_config("gha-rs-abcde-runner-1").await.expect("jit");
    assert_eq!((jit.runner.name.as_str(), jit.runner.runner_scale_set_id), ("gha-rs-abcde-runner-1", set));
    assert!(!jit.encoded_jit_config.is_empty());
    match c.generate_jit_config("gha-rs-abcde-runner-1").await {
        Err(Error::Status { status: 409, type_name, .. }) => assert!(type_name.contains("AgentExistsException")),
        other => panic!("expected 409 AgentExists, got {other:?}"),
    }
    c.remove_runner(jit.runner.id).await.expect("remove");
    c.remove_runner(jit.runner.id).await.expect("removing an unknown runner is 204");
    h.shutdown().await;
}

#[tokio::test]
async fn a_missing_scale_set_is_typed() {
    let h = start(Layout::Ghes, fast(), None).await;
    let c = client(&h, 4242);
    match c.get_scale_set().await {
        Err(Error::ScaleSetNotFound { scale_set_id: 4242, .. }) => {}
        other => panic!("expected ScaleSetNotFound, got {other:?}"),
    }
    assert!(matches!(c.create_session(&Open, "arcfed/a/m1/t1").await, Err(Error::ScaleSetNotFound { .. })));
    assert!(!c.github_ready());
    h.shutdown().await;
}

#[tokio::test]
async fn a_wrong_pat_is_unauthorized_and_local() {
    let h = start(Layout::Ghes, fast(), None).await;
    let c = Client::with_retry(settings_for(&h, 1, Credentials::Pat("nope".into())), quick_retries()).unwrap();
    match c.refresh_admin_token().await {
        Err(e @ Error::Unauthorized { .. }) => assert!(e.is_local()),
        other => panic!("expected 401, got {other:?}"),
    }
    assert!(!c.github_ready());
    h.shutdown().await;
}

#[tokio::test]
async fn bad_settings_are_refused_naming_the_setting() {
    let base = GitHubSettings {
        configure_url: "https://github.com/a/b/c".into(),
        credentials: Credentials::Pat("p".into()),
        root_ca_pem: None,
        resolve: Vec::new(),
        scale_set_id: 1,
    };
    let e = Client::new(base.clone()).unwrap_err().to_string();
    assert!(e.contains("configure_url") && e.contains("https://github.com/a/b/c"), "{e}");
    let bad_key = GitHubSettings {
        configure_url: "https://github.com/acme".into(),
        credentials: Credentials::App { app_id: "1".into(), installation_id: 2, private_key_pem: "junk".into() },
        ..base.clone()
    };
    assert!(Client::new(bad_key).unwrap_err().to_string().contains("github_app_private_key"));
    let bad_ca = GitHubSettings {
        configure_url: "https://github.com/acme".into(),
        root_ca_pem: Some("not a pem".into()),
        ..base
    };
    assert!(Client::new(bad_ca).unwrap_err().to_string().contains("server_root_ca"));
}

/// Generates an RSA key with `openssl` (PKCS#8 from genpkey, PKCS#1 by conversion).
fn openssl_key(dir: &std::path::Path, pkcs1: bool) -> std::path::PathBuf {
    let p8 = dir.join("app.pem");
    let st = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
        .arg(&p8)
        .status()
        .expect("the openssl binary is needed to generate a test App key");
    assert!(st.success());
    if !pkcs1 {
        return p8;
    }
    let p1 = dir.join("app-pkcs1.pem");
    let st = std::process::Command::new("openssl")
        .args(["rsa", "-traditional", "-in"])
        .arg(&p8)
        .arg("-out")
        .arg(&p1)
        .status()
        .expect("openssl rsa");
    assert!(st.success());
    p1
}

async fn app_chain(layout: Layout, pkcs1: bool) {
    let dir = tempfile::tempdir().unwrap();
    let key = openssl_key(dir.path(), pkcs1);
    let pem = std::fs::read_to_string(&key).unwrap();
    assert_eq!(pem.contains("BEGIN RSA PRIVATE KEY"), pkcs1, "the key is in the form under test");
    let app = AppKey::from_pem_file("123456", &key).expect("app key");
    let h = start(layout, fast(), Some(app)).await;
    let set = h.create_scale_set("gha-rs", 1).unwrap().id;
    let creds = Credentials::App { app_id: "123456".into(), installation_id: 77, private_key_pem: pem };
    let c = Client::with_retry(settings_for(&h, set, creds), quick_retries()).unwrap();
    c.get_scale_set().await.expect("App chain then GET scale set");
    assert!(c.github_ready());
    let s = c.create_session(&Open, "arcfed/a/m1/t1").await.expect("session with the App's admin token");
    let report = h.report();
    assert_eq!(report.scale_set(set).unwrap().sessions[0].credential, "installation:77");
    let auth: Vec<u16> = events(&h, PathClass::Auth).iter().map(|e| e.status).collect();
    assert_eq!(auth, vec![201, 201, 200], "installation token, registration token, runner-registration");
    c.delete_session(&Open, &s.session_id).await.unwrap();

    // Another App's key is refused by the installation endpoint.
    let other_dir = tempfile::tempdir().unwrap();
    let other = openssl_key(other_dir.path(), false);
    let wrong = Credentials::App {
        app_id: "123456".into(),
        installation_id: 77,
        private_key_pem: std::fs::read_to_string(other).unwrap(),
    };
    let c2 = Client::with_retry(settings_for(&h, set, wrong), quick_retries()).unwrap();
    assert!(matches!(c2.refresh_admin_token().await, Err(Error::Unauthorized { .. })));
    h.shutdown().await;
}

#[tokio::test]
async fn ghes_app_credentials_run_the_rs256_chain_with_a_pkcs8_key() {
    app_chain(Layout::Ghes, false).await;
}

#[tokio::test]
async fn dotcom_app_credentials_run_the_rs256_chain_with_a_pkcs1_key() {
    app_chain(Layout::Dotcom, true).await;
}

/// HTTPS with `server_root_ca`: the emulator's certificate is trusted only through it.
async fn https_with_root_ca(layout: Layout) {
    let dir = tempfile::tempdir().unwrap();
    let names = ["localhost", "127.0.0.1", DOTCOM_HOST, "api.github.localhost", "broker.github.localhost"];
    let ck = rcgen::generate_simple_self_signed(names.map(String::from).to_vec()).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config =
        EmulatorConfig { layout, tls: Some(TlsFiles { cert, key }), settings: fast(), ..EmulatorConfig::default() };
    let h = Emulator::start(config, listener).await.expect("emulator over HTTPS");
    assert!(h.config_url().starts_with("https://"));
    let set = h.create_scale_set("tls", 1).unwrap().id;

    let untrusted = client(&h, set);
    match untrusted.refresh_admin_token().await {
        Err(e @ Error::Transport { .. }) => assert!(e.is_local(), "TLS failures are local"),
        other => panic!("an unknown CA must be refused, got {other:?}"),
    }
    let mut settings = settings_for(&h, set, Credentials::Pat(h.pat().to_string()));
    settings.root_ca_pem = Some(ck.cert.pem());
    let c = Client::with_retry(settings, quick_retries()).unwrap();
    let mut s = c.create_session(&Open, "arcfed/a/m1/t1").await.expect("session over HTTPS");
    assert!(s.message_queue_url.starts_with("https://"));
    assert!(c.get_message(&Open, &mut s, 0, 10).await.expect("poll over HTTPS").is_none());
    c.delete_session(&Open, &s.session_id).await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn ghes_https_trusts_the_server_root_ca() {
    https_with_root_ca(Layout::Ghes).await;
}

#[tokio::test]
async fn dotcom_https_trusts_the_server_root_ca() {
    https_with_root_ca(Layout::Dotcom).await;
}

#[tokio::test]
async fn an_admin_token_refused_before_its_exp_is_dropped_and_the_next_call_reauthenticates() {
    let h = start(Layout::Ghes, fast(), None).await;
    let set = h.create_scale_set("gha-rs", 1).unwrap().id;
    let c = client(&h, set);
    c.get_scale_set().await.expect("first read");
    let expired = reqwest::Client::new().post(format!("{}/_emulator/expire-tokens", h.base_url())).send().await;
    assert!(expired.expect("side channel").status().is_success());
    match c.get_scale_set().await {
        Err(e @ Error::Unauthorized { .. }) => assert!(e.is_local()),
        other => panic!("expected 401 from the expired admin token, got {other:?}"),
    }
    assert!(!c.github_ready(), "a refused token is not ready");
    c.get_scale_set().await.expect("the next call runs the chain again");
    assert!(c.github_ready());
    let chains = events(&h, PathClass::Auth).iter().filter(|e| e.path.ends_with("runner-registration")).count();
    assert_eq!(chains, 2);
    h.shutdown().await;
}

#[tokio::test]
async fn a_rate_limit_403_is_retried_and_a_plain_403_is_not() {
    let h = start(Layout::Ghes, fast(), None).await;
    let set = h.create_scale_set("gha-rs", 1).unwrap().id;
    let c = client(&h, set);
    c.refresh_admin_token().await.unwrap();
    h.add_fault(fault(
        json!({"kind": "status", "status": 403, "retryAfter": "1", "pathClass": "scale_sets", "count": 1}),
    ))
    .unwrap();
    c.get_scale_set().await.expect("a secondary-rate-limit 403 is waited out");
    h.add_fault(fault(json!({"kind": "status", "status": 403, "pathClass": "scale_sets", "count": 1}))).unwrap();
    match c.get_scale_set().await {
        Err(e @ Error::Forbidden { .. }) => assert!(e.is_local()),
        other => panic!("expected Forbidden, got {other:?}"),
    }
    let statuses: Vec<u16> = events(&h, PathClass::ScaleSets).iter().map(|e| e.status).collect();
    assert_eq!(statuses, vec![403, 200, 403]);
    h.shutdown().await;
}

#[tokio::test]
async fn acquirable_jobs_absent_is_none_and_odd_envelopes_are_counted() {
    let settings = Settings { acquirable_jobs: false, odd_messages_every: 1, ..fast() };
    let h = start(Layout::Dotcom, settings, None).await;
    let set = h.create_scale_set("gha-rs", 1).unwrap().id;
    let c = client(&h, set);
    assert_eq!(c.acquirable_jobs(&Open).await.expect("404 is not an error"), None);
    let mut s = c.create_session(&Open, "arcfed/a/m1/t1").await.unwrap();
    h.enqueue_jobs(set, 1, Duration::from_secs(30)).unwrap();
    let (mut assigned, mut skipped, mut last) = (0, 0, 0);
    while assigned == 0 {
        let m = next_message(&c, &mut s, last).await;
        let (jobs, unknown) = job_messages(&m.body);
        assigned += jobs.iter().filter(|j| j.message_type == "JobAssigned").count();
        skipped += unknown;
        last = m.message_id;
        c.delete_message(&Open, &mut s, m.message_id).await.unwrap();
    }
    assert_eq!(assigned, 1);
    assert!(skipped >= 1, "the unknown job message type was counted");
    c.delete_session(&Open, &s.session_id).await.unwrap();
    h.shutdown().await;
}
