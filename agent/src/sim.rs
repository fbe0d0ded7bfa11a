//! The `sim` runner backend: ARC's EphemeralRunnerSet controller ([`arcfed_agent_core::sim`])
//! driving the emulator's simulated runners (DESIGN §9).
//!
//! ```text
//!  patch_replicas / job started / job completed
//!        │ lock, ErsModel::on_* → SimActions, persist (tmp + fsync + rename)
//!        ▼
//!  worker task ──Create──▶ SimGitHub::generate_jit  ─▶ on_runner_registered + online (or failed)
//!              ──Remove──▶ SimGitHub::remove_runner ─▶ on_remove_result  ─▶ more actions
//! ```
//! The whole simulated ERS (spec, annotations, runners) lives in one JSON state file, so an agent
//! that is SIGKILLed and restarted finds its ERS and its session record as it would in a real
//! cluster. With the emulator's `auto_runners`, a runner whose JIT config was generated is online
//! and takes jobs by itself; the holder's JobStarted/JobCompleted routing tells the model.

use crate::kube::{JobStarted, SESSION_ANNOTATION};
use arcfed_agent_core::scaler::Patch;
use arcfed_agent_core::sim::{ErsModel, SimAction};
use backon::{ExponentialBuilder, Retryable};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;

/// The two GitHub calls ARC's controller makes for its runners. Implemented for the agent's
/// GitHub client elsewhere; tests use an in-memory fake.
pub trait SimGitHub: Send + Sync + 'static {
    /// Generates a JIT runner config for `name`; returns the runner id.
    fn generate_jit(&self, name: &str) -> impl Future<Output = Result<i64, String>> + Send;
    /// `RemoveRunner(id)`: `Ok(true)` removed (or already gone), `Ok(false)` = `JobStillRunningException`.
    fn remove_runner(&self, id: i64) -> impl Future<Output = Result<bool, String>> + Send;
    /// `GetRunner(id)`: `Ok(false)` once GitHub no longer lists the runner (deregistered after its job).
    fn runner_registered(&self, id: i64) -> impl Future<Output = Result<bool, String>> + Send;
}

/// How often the controller asks GitHub whether its online runners are still registered. In a
/// cluster the runner pod's exit tells ARC's controller that the job ended; here GitHub's runner
/// list stands in for the pod, so a lost JobCompleted message cannot pin a runner as busy.
pub const RUNNER_CHECK_EVERY: Duration = Duration::from_secs(2);

/// The simulated EphemeralRunnerSet object, as stored in the state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimErs {
    pub namespace: String,
    pub name: String,
    /// `metadata.annotations` (the session record lives here, as on a real ERS).
    pub annotations: BTreeMap<String, String>,
    /// `spec` and the children, as ARC's controller sees them.
    pub model: ErsModel,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sim state file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sim state file {path} is not a simulated EphemeralRunnerSet: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("sim state file {path} holds ephemeralrunnersets/{found}, not {want}")]
    OtherSet { path: PathBuf, found: String, want: String },
    #[error("the sim controller task for ephemeralrunnersets/{0} has stopped")]
    WorkerGone(String),
}

struct Inner<G> {
    /// `<name> in namespace <ns>`, for errors.
    object: String,
    gh: G,
    /// Held across the state-file write, so the file always holds the latest state and writes never reorder.
    state: Mutex<SimErs>,
    file: Option<PathBuf>,
}

/// The sim backend for one member's ERS. Cheap to clone; the controller task stops when the last clone drops.
pub struct SimRunners<G: SimGitHub> {
    inner: Arc<Inner<G>>,
    actions: mpsc::UnboundedSender<SimAction>,
}

impl<G: SimGitHub> Clone for SimRunners<G> {
    fn clone(&self) -> Self {
        SimRunners { inner: self.inner.clone(), actions: self.actions.clone() }
    }
}

impl<G: SimGitHub> std::fmt::Debug for SimRunners<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimRunners").field("file", &self.inner.file).finish_non_exhaustive()
    }
}

/// How often a GitHub call of the simulated controller is tried before its result is taken as a failure.
fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(5)
        .with_jitter()
}

impl<G: SimGitHub> SimRunners<G> {
    /// Opens the simulated ERS `namespace/name`: from `state_file` if it exists (resuming the
    /// controller's in-flight work), else empty. Without a state file the ERS lives in memory.
    /// Must be called inside a tokio runtime (it spawns the controller task).
    pub async fn open(namespace: &str, name: &str, state_file: Option<PathBuf>, gh: G) -> Result<Self, Error> {
        let loaded = match &state_file {
            Some(path) => load(path).await?,
            None => None,
        };
        let mut ers = match loaded {
            Some(ers) => {
                if ers.namespace != namespace || ers.name != name {
                    return Err(Error::OtherSet {
                        path: state_file.clone().unwrap_or_default(),
                        found: format!("{} in namespace {}", ers.name, ers.namespace),
                        want: format!("{name} in namespace {namespace}"),
                    });
                }
                ers
            }
            None => SimErs {
                namespace: namespace.into(),
                name: name.into(),
                annotations: BTreeMap::new(),
                model: ErsModel::new(name, rand::random()),
            },
        };
        let resumed = ers.model.resume();
        if let Some(path) = &state_file {
            persist(path, &ers).await?;
        }
        let object = format!("{name} in namespace {namespace}");
        let inner = Arc::new(Inner { object, gh, state: Mutex::new(ers), file: state_file });
        let (tx, rx) = mpsc::unbounded_channel();
        let worker = tokio::spawn(controller(inner.clone(), rx));
        // Supervised: a panic in the controller is logged; callers then see WorkerGone.
        tokio::spawn({
            let name = name.to_string();
            async move {
                if let Err(e) = worker.await {
                    tracing::error!(ers = %name, error = %e, "sim controller task died");
                }
            }
        });
        let runners = SimRunners { inner, actions: tx };
        runners.send(resumed)?;
        Ok(runners)
    }

    fn send(&self, actions: Vec<SimAction>) -> Result<(), Error> {
        for a in actions {
            self.actions.send(a).map_err(|_| Error::WorkerGone(self.inner.object.clone()))?;
        }
        Ok(())
    }

    /// Applies `f` to the state and persists it; returns f's output.
    async fn update<T>(&self, f: impl FnOnce(&mut SimErs) -> T) -> Result<T, Error> {
        let mut st = self.inner.state.lock().await;
        let out = f(&mut st);
        if let Some(path) = &self.inner.file {
            persist(path, &st).await?;
        }
        Ok(out)
    }

    /// The listener's merge patch `{"spec":{"patchID":P,"replicas":R}}`.
    pub async fn patch_replicas(&self, p: Patch) -> Result<(), Error> {
        let actions = self.update(|s| s.model.on_patch(p.replicas, p.patch_id)).await?;
        self.send(actions)
    }

    /// JobStarted status patch: the runner is busy. An unknown runner is gone (a 404 in kube): Ok.
    pub async fn patch_job_started(&self, runner_name: &str, _job: &JobStarted) -> Result<(), Error> {
        self.update(|s| s.model.on_job_started(runner_name)).await
    }

    /// The runner's job completed: the ephemeral runner is finished and the controller deletes it.
    pub async fn on_job_completed(&self, runner_name: &str) -> Result<(), Error> {
        let actions = self.update(|s| s.model.on_job_completed(runner_name)).await?;
        self.send(actions)
    }

    /// The `arcfed.io/session-id` annotation of the simulated ERS.
    pub async fn session_record(&self) -> Result<Option<String>, Error> {
        Ok(self.inner.state.lock().await.annotations.get(SESSION_ANNOTATION).filter(|v| !v.is_empty()).cloned())
    }

    /// Records (Some) or clears (None) the session id.
    pub async fn set_session_record(&self, id: Option<&str>) -> Result<(), Error> {
        self.update(|s| match id {
            Some(id) => {
                s.annotations.insert(SESSION_ANNOTATION.into(), id.into());
            }
            None => {
                s.annotations.remove(SESSION_ANNOTATION);
            }
        })
        .await
    }

    /// A copy of the simulated ERS (for metrics, the admin endpoint and tests).
    pub async fn snapshot(&self) -> SimErs {
        self.inner.state.lock().await.clone()
    }
}

/// What executing one action found out.
enum Outcome {
    Registered(String, i64),
    RegistrationFailed(String, String),
    Removed(String, bool),
    RemoveFailed(String, String),
    /// A check of the online runners: the ones GitHub no longer lists.
    Checked(Vec<String>),
}

async fn execute<G: SimGitHub>(inner: Arc<Inner<G>>, action: SimAction) -> Outcome {
    match action {
        SimAction::Create { name } => match (|| inner.gh.generate_jit(&name)).retry(retry_policy()).await {
            Ok(id) => Outcome::Registered(name, id),
            Err(e) => Outcome::RegistrationFailed(name, e),
        },
        // Never registered: nothing to remove at GitHub.
        SimAction::Remove { name, runner_id: 0 } => Outcome::Removed(name, true),
        SimAction::Remove { name, runner_id } => {
            match (|| inner.gh.remove_runner(runner_id)).retry(retry_policy()).await {
                Ok(removed) => Outcome::Removed(name, removed),
                Err(e) => Outcome::RemoveFailed(name, e),
            }
        }
    }
}

/// Asks GitHub about each listed runner, one at a time; a failed call is skipped (asked again on
/// the next check).
async fn check_runners<G: SimGitHub>(inner: Arc<Inner<G>>, listed: Vec<(String, i64)>) -> Outcome {
    let mut gone = Vec::new();
    for (name, id) in listed {
        match inner.gh.runner_registered(id).await {
            Ok(false) => gone.push(name),
            Ok(true) => {}
            Err(e) => tracing::debug!(runner = %name, error = %e, "sim: runner check failed; asked again later"),
        }
    }
    Outcome::Checked(gone)
}

/// The simulated controller: runs actions concurrently and feeds their results back into the model.
/// Ends when every [`SimRunners`] clone is gone and the in-flight actions are done.
async fn controller<G: SimGitHub>(inner: Arc<Inner<G>>, mut rx: mpsc::UnboundedReceiver<SimAction>) {
    let mut running: JoinSet<Outcome> = JoinSet::new();
    let mut open = true;
    let mut check = tokio::time::interval(RUNNER_CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checking = false;
    loop {
        tokio::select! {
            a = rx.recv(), if open => match a {
                Some(a) => { running.spawn(execute(inner.clone(), a)); }
                None => open = false,
            },
            _ = check.tick(), if open && !checking => {
                let listed = inner.state.lock().await.model.runners_to_check();
                if !listed.is_empty() {
                    checking = true;
                    running.spawn(check_runners(inner.clone(), listed));
                }
            }
            Some(done) = running.join_next() => {
                let outcome = match done {
                    Ok(o) => o,
                    Err(e) => { tracing::error!(error = %e, "sim controller action panicked"); continue; }
                };
                let mut st = inner.state.lock().await;
                let next = match outcome {
                    Outcome::Registered(name, id) => {
                        st.model.on_runner_registered(&name, id);
                        // The emulator's auto_runners: a registered runner is online at once.
                        st.model.on_runner_online(&name);
                        Vec::new()
                    }
                    Outcome::RegistrationFailed(name, e) => {
                        tracing::warn!(runner = %name, error = %e, "sim: JIT config failed; runner marked Failed");
                        st.model.on_runner_failed(&name);
                        Vec::new()
                    }
                    Outcome::Removed(name, removed) => st.model.on_remove_result(&name, removed),
                    Outcome::RemoveFailed(name, e) => {
                        tracing::warn!(runner = %name, error = %e, "sim: RemoveRunner failed; retried on a later reconcile");
                        st.model.on_remove_failed(&name);
                        Vec::new()
                    }
                    Outcome::Checked(gone) => {
                        checking = false;
                        let mut next = Vec::new();
                        for name in gone {
                            let actions = st.model.on_runner_gone(&name);
                            if !actions.is_empty() {
                                tracing::info!(runner = %name, "sim: runner no longer registered at GitHub; finished");
                            }
                            next.extend(actions);
                        }
                        next
                    }
                };
                if let Some(path) = &inner.file
                    && let Err(e) = persist(path, &st).await
                {
                    tracing::error!(error = %e, "sim: state file not written");
                }
                drop(st);
                for a in next {
                    running.spawn(execute(inner.clone(), a));
                }
            }
            else => break,
        }
    }
}

async fn load(path: &Path) -> Result<Option<SimErs>, Error> {
    match tokio::fs::read(path).await {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| Error::Corrupt { path: path.to_path_buf(), source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io { path: path.to_path_buf(), source }),
    }
}

/// Writes the state to `<path>.tmp`, fsyncs it, renames it over `path` and fsyncs the directory,
/// so a SIGKILL leaves either the old or the new state, never a torn one.
async fn persist(path: &Path, ers: &SimErs) -> Result<(), Error> {
    let bytes = serde_json::to_vec_pretty(ers).map_err(|e| Error::Io { path: path.to_path_buf(), source: e.into() })?;
    let target = path.to_path_buf();
    tokio::task::spawn_blocking(move || write_atomic(&target, &bytes))
        .await
        .map_err(|e| Error::Io { path: path.to_path_buf(), source: std::io::Error::other(e) })?
        .map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}
