//! The sim runner backend: ARC's ERS controller model driving a fake GitHub, its state file
//! surviving a restart, and the `Runners` enum delegating to both backends.

use arcfed_agent::kube::{JobStarted, KubeRunners, SESSION_ANNOTATION};
use arcfed_agent::runners::Runners;
use arcfed_agent::scaler::Patch;
use arcfed_agent::sim::{SimErs, SimGitHub, SimRunners};
use arcfed_agent_core::sim::{ErsModel, Phase};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const NS: &str = "arc-runners";
const ERS: &str = "ci-b-q2w8r";

/// GitHub's side of the runners, as the emulator keeps it.
#[derive(Default)]
struct Gh {
    next_id: i64,
    /// name → id of every registered runner not yet removed.
    runners: BTreeMap<String, i64>,
    /// Runner ids running a job (RemoveRunner answers JobStillRunning).
    busy: BTreeSet<i64>,
    jit_calls: Vec<String>,
    removed: Vec<i64>,
    /// Fail this many JIT calls before answering.
    jit_failures: usize,
}

#[derive(Clone, Default)]
struct FakeGitHub(Arc<Mutex<Gh>>);

impl FakeGitHub {
    fn with<T>(&self, f: impl FnOnce(&mut Gh) -> T) -> T {
        f(&mut self.0.lock().unwrap())
    }
}

impl SimGitHub for FakeGitHub {
    fn generate_jit(&self, name: &str) -> impl Future<Output = Result<i64, String>> + Send {
        let r = self.with(|g| {
            g.jit_calls.push(name.to_string());
            if g.jit_failures > 0 {
                g.jit_failures -= 1;
                return Err("503 Service Unavailable".to_string());
            }
            if g.runners.contains_key(name) {
                return Err(format!("AgentExistsException: {name}"));
            }
            g.next_id += 1;
            let id = g.next_id;
            g.runners.insert(name.to_string(), id);
            Ok(id)
        });
        async move { r }
    }

    fn remove_runner(&self, id: i64) -> impl Future<Output = Result<bool, String>> + Send {
        let r = self.with(|g| {
            if g.busy.contains(&id) {
                return Ok(false);
            }
            g.runners.retain(|_, v| *v != id);
            g.removed.push(id);
            Ok(true)
        });
        async move { r }
    }

    fn runner_registered(&self, id: i64) -> impl Future<Output = Result<bool, String>> + Send {
        let r = self.with(|g| g.runners.values().any(|v| *v == id));
        async move { Ok(r) }
    }
}

/// Polls the sim's state until `cond` holds; panics with the last state after a deadline.
async fn wait_for(sim: &SimRunners<FakeGitHub>, what: &str, cond: impl Fn(&SimErs) -> bool) -> SimErs {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = sim.snapshot().await;
        if cond(&s) {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {s:#?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn settled(s: &SimErs) -> bool {
    s.model.pending() == 0 && s.model.deleting() == 0
}

fn job() -> JobStarted {
    JobStarted {
        job_request_id: 1,
        repository: "octo/app".into(),
        job_id: "j-1".into(),
        workflow_run_id: 2,
        job_workflow_ref: "octo/app/.github/workflows/ci.yml@refs/heads/main".into(),
        job_display_name: "build".into(),
    }
}

#[tokio::test]
async fn a_patch_creates_runners_registered_at_github() {
    let gh = FakeGitHub::default();
    let sim = SimRunners::open(NS, ERS, None, gh.clone()).await.expect("open");
    sim.patch_replicas(Patch { replicas: 3, patch_id: 0 }).await.expect("patch");
    let s = wait_for(&sim, "3 running runners", |s| s.model.running() == 3 && settled(s)).await;
    let names: BTreeSet<String> = s.model.runners().map(|r| r.name.clone()).collect();
    assert_eq!(names, gh.with(|g| g.runners.keys().cloned().collect()));
    for r in s.model.runners() {
        assert!(r.name.starts_with(&format!("{ERS}-runner-")) && r.name.len() == ERS.len() + 13, "{}", r.name);
        assert_eq!(gh.with(|g| g.runners[&r.name]), r.runner_id);
    }
    assert_eq!(s.model.idle(), 3);
}

#[tokio::test]
async fn finished_runners_are_removed_and_replaced_only_on_a_new_patch_id() {
    let gh = FakeGitHub::default();
    let sim = SimRunners::open(NS, ERS, None, gh.clone()).await.expect("open");
    sim.patch_replicas(Patch { replicas: 2, patch_id: 4 }).await.expect("patch");
    let s = wait_for(&sim, "2 running", |s| s.model.running() == 2 && settled(s)).await;
    let first = s.model.runners().next().expect("a runner").clone();
    sim.patch_job_started(&first.name, &job()).await.expect("job started");
    assert_eq!(sim.snapshot().await.model.busy(), 1);
    sim.on_job_completed(&first.name).await.expect("job completed");
    let s = wait_for(&sim, "the finished runner removed", |s| s.model.runner(&first.name).is_none()).await;
    assert_eq!(gh.with(|g| g.removed.clone()), vec![first.runner_id]);
    assert_eq!(s.model.total(), 1, "same patch id as the remaining runner: not replaced");
    sim.patch_replicas(Patch { replicas: 2, patch_id: 4 }).await.expect("same patch");
    assert_eq!(sim.snapshot().await.model.total(), 1);
    sim.patch_replicas(Patch { replicas: 2, patch_id: 5 }).await.expect("fresh patch");
    let s = wait_for(&sim, "replacement running", |s| s.model.running() == 2 && settled(s)).await;
    assert_eq!(s.model.runners().filter(|r| r.patch_id == 5).count(), 1);
    // A JobStarted for a runner that is gone is fine, as a 404 is in kube.
    sim.patch_job_started(&first.name, &job()).await.expect("gone runner");
}

/// A JobCompleted lost with a deleted session's queue must not pin the runner as busy: GitHub
/// deregisters an ephemeral runner after its job, and the controller's check notices.
#[tokio::test]
async fn a_busy_runner_github_no_longer_lists_is_finished_without_its_job_completed() {
    let gh = FakeGitHub::default();
    let sim = SimRunners::open(NS, ERS, None, gh.clone()).await.expect("open");
    sim.patch_replicas(Patch { replicas: 2, patch_id: 1 }).await.expect("patch");
    let s = wait_for(&sim, "2 running", |s| s.model.running() == 2 && settled(s)).await;
    let first = s.model.runners().next().expect("a runner").clone();
    sim.patch_job_started(&first.name, &job()).await.expect("job started");
    // The job ends at GitHub; no JobCompleted reaches this ERS.
    gh.with(|g| g.runners.remove(&first.name));
    let s = wait_for(&sim, "the deregistered runner finished and removed", |s| {
        s.model.runner(&first.name).is_none() && s.model.busy() == 0
    })
    .await;
    assert_eq!(s.model.total(), 1);
    sim.patch_replicas(Patch { replicas: 2, patch_id: 2 }).await.expect("fresh patch");
    wait_for(&sim, "replacement running", |s| s.model.running() == 2 && settled(s)).await;
}

#[tokio::test]
async fn zero_patch_culls_idle_runners_and_keeps_one_github_says_is_still_running() {
    let gh = FakeGitHub::default();
    let sim = SimRunners::open(NS, ERS, None, gh.clone()).await.expect("open");
    sim.patch_replicas(Patch { replicas: 3, patch_id: 0 }).await.expect("patch");
    let s = wait_for(&sim, "3 running", |s| s.model.running() == 3 && settled(s)).await;
    let runners: Vec<_> = s.model.runners().cloned().collect();
    // One took a job at GitHub; its JobStarted has not arrived yet.
    gh.with(|g| g.busy.insert(runners[0].runner_id));
    // A positive patch id never deletes.
    sim.patch_replicas(Patch { replicas: 0, patch_id: 9 }).await.expect("deferred");
    assert_eq!(sim.snapshot().await.model.total(), 3);
    sim.patch_replicas(Patch { replicas: 0, patch_id: 0 }).await.expect("force state");
    let s = wait_for(&sim, "cull done", |s| settled(s) && s.model.total() == 1).await;
    let kept = s.model.runners().next().expect("one left");
    assert_eq!(kept.name, runners[0].name);
    assert!(kept.busy && kept.phase == Phase::Running, "JobStillRunning marks it busy: {kept:?}");
    let mut removed = gh.with(|g| g.removed.clone());
    removed.sort();
    let mut want = vec![runners[1].runner_id, runners[2].runner_id];
    want.sort();
    assert_eq!(removed, want);
}

#[tokio::test]
async fn the_state_file_survives_a_restart_with_its_session_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ers.json");
    let gh = FakeGitHub::default();
    let sim = SimRunners::open(NS, ERS, Some(file.clone()), gh.clone()).await.expect("open");
    assert_eq!(sim.session_record().await.expect("record"), None);
    sim.patch_replicas(Patch { replicas: 2, patch_id: 3 }).await.expect("patch");
    sim.set_session_record(Some("sess-1")).await.expect("record");
    let before = wait_for(&sim, "2 running", |s| s.model.running() == 2 && settled(s)).await;
    // The file holds exactly the settled state (written after the last registration).
    let on_disk: SimErs = serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("json");
    assert_eq!(on_disk, before);
    assert_eq!(on_disk.annotations.get(SESSION_ANNOTATION).map(String::as_str), Some("sess-1"));
    drop(sim);

    let again = SimRunners::open(NS, ERS, Some(file.clone()), gh.clone()).await.expect("reopen");
    assert_eq!(again.session_record().await.expect("record").as_deref(), Some("sess-1"));
    let after = again.snapshot().await;
    assert_eq!(after.model, before.model, "the ERS and its runners are as they were");
    assert_eq!(gh.with(|g| g.jit_calls.len()), 2, "no runner created twice");
    again.set_session_record(None).await.expect("clear");
    assert_eq!(again.session_record().await.expect("record"), None);
    let on_disk: SimErs = serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("json");
    assert!(!on_disk.annotations.contains_key(SESSION_ANNOTATION));

    let err = SimRunners::open(NS, "another-ers", Some(file), gh).await.expect_err("another set's file");
    assert!(err.to_string().contains(ERS), "{err}");
}

#[tokio::test]
async fn a_restart_during_registration_gives_the_runner_a_fresh_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ers.json");
    // The previous process created two runners and was killed before either JIT answered; the
    // first JIT did reach GitHub.
    let mut model = ErsModel::new(ERS, 42);
    model.on_patch(2, 6);
    let stale: Vec<String> = model.runners().map(|r| r.name.clone()).collect();
    let ers = SimErs { namespace: NS.into(), name: ERS.into(), annotations: BTreeMap::new(), model };
    std::fs::write(&file, serde_json::to_vec(&ers).expect("json")).expect("write");
    let gh = FakeGitHub::default();
    gh.with(|g| {
        g.next_id = 100;
        g.runners.insert(stale[0].clone(), 100);
    });
    let sim = SimRunners::open(NS, ERS, Some(file), gh.clone()).await.expect("open");
    let s = wait_for(&sim, "2 running", |s| s.model.running() == 2 && settled(s)).await;
    for r in s.model.runners() {
        assert!(!stale.contains(&r.name), "{} reused", r.name);
        assert_eq!(r.patch_id, 6, "the annotation is kept");
    }
    assert_eq!(s.model.failed(), 0);
}

#[tokio::test(start_paused = true)]
async fn jit_failures_are_retried_then_the_runner_is_failed() {
    let gh = FakeGitHub::default();
    gh.with(|g| g.jit_failures = 2);
    let sim = SimRunners::open(NS, ERS, None, gh.clone()).await.expect("open");
    sim.patch_replicas(Patch { replicas: 1, patch_id: 0 }).await.expect("patch");
    wait_for(&sim, "registered after retries", |s| s.model.running() == 1).await;
    assert_eq!(gh.with(|g| g.jit_calls.len()), 3);
    gh.with(|g| g.jit_failures = 100);
    sim.patch_replicas(Patch { replicas: 2, patch_id: 1 }).await.expect("patch");
    let s = wait_for(&sim, "failed after retries", |s| s.model.failed() == 1).await;
    assert_eq!(s.model.total(), 2, "a failed runner still counts, as in ARC");
}

#[tokio::test]
async fn runners_delegates_to_either_backend() {
    let gh = FakeGitHub::default();
    let sim: Runners<FakeGitHub> = Runners::Sim(SimRunners::open(NS, ERS, None, gh.clone()).await.expect("open"));
    sim.patch_replicas(Patch { replicas: 1, patch_id: 0 }).await.expect("patch");
    sim.set_session_record(Some("s-9")).await.expect("record");
    assert_eq!(sim.session_record().await.expect("record").as_deref(), Some("s-9"));
    let Runners::Sim(inner) = &sim else { unreachable!("built as Sim") };
    let s = wait_for(inner, "running", |s| s.model.running() == 1 && settled(s)).await;
    let name = s.model.runners().next().expect("runner").name.clone();
    sim.patch_job_started(&name, &job()).await.expect("started");
    sim.on_job_completed(&name).await.expect("completed");
    wait_for(inner, "removed", |s| s.model.runner(&name).is_none()).await;
    assert_eq!(gh.with(|g| g.removed.len()), 1);

    // kube: on_job_completed makes no request (the runner's pod exit is what ARC's controller sees);
    // a client with no server behind it would fail any request.
    let (svc, _) = tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
    let kube: Runners<FakeGitHub> = Runners::Kube(KubeRunners::with_client(kube::Client::new(svc, NS), NS, ERS));
    kube.on_job_completed(&name).await.expect("no-op");
}
