//! Where a member's assignments land: its EphemeralRunnerSet in Kubernetes (`kube`) or ARC's
//! controller simulated against the emulator (`sim`). The driver holds one [`Runners`] value.
//!
//! ```text
//!  driver ──patch_replicas / patch_job_started / on_job_completed / session record──▶ Runners
//!                                                                      ├─ Kube(KubeRunners)  merge patches
//!                                                                      └─ Sim(SimRunners)    ErsModel + JIT/RemoveRunner
//! ```

use crate::kube::{JobStarted, KubeRunners};
use crate::sim::{SimGitHub, SimRunners};
use arcfed_agent_core::scaler::Patch;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kube(#[from] crate::kube::Error),
    #[error(transparent)]
    Sim(#[from] crate::sim::Error),
}

/// The runner backend (`--runner-backend kube|sim`).
#[derive(Debug, Clone)]
pub enum Runners<G: SimGitHub> {
    Kube(KubeRunners),
    Sim(SimRunners<G>),
}

impl<G: SimGitHub> Runners<G> {
    /// Merge-patches `spec.replicas` and `spec.patchID` of this member's ERS.
    pub async fn patch_replicas(&self, p: Patch) -> Result<(), Error> {
        match self {
            Runners::Kube(k) => Ok(k.patch_replicas(p).await?),
            Runners::Sim(s) => Ok(s.patch_replicas(p).await?),
        }
    }

    /// JobStarted for one of this member's runners (a gone runner is Ok).
    pub async fn patch_job_started(&self, runner_name: &str, job: &JobStarted) -> Result<(), Error> {
        match self {
            Runners::Kube(k) => Ok(k.patch_job_started(runner_name, job).await?),
            Runners::Sim(s) => Ok(s.patch_job_started(runner_name, job).await?),
        }
    }

    /// JobCompleted for one of this member's runners. In Kubernetes the runner's pod exits and ARC's
    /// controller sees it, so this is a no-op; the simulation needs to be told.
    pub async fn on_job_completed(&self, runner_name: &str) -> Result<(), Error> {
        match self {
            Runners::Kube(_) => Ok(()),
            Runners::Sim(s) => Ok(s.on_job_completed(runner_name).await?),
        }
    }

    /// The `arcfed.io/session-id` annotation on this member's ERS (DESIGN §5.12).
    pub async fn session_record(&self) -> Result<Option<String>, Error> {
        match self {
            Runners::Kube(k) => Ok(k.session_record().await?),
            Runners::Sim(s) => Ok(s.session_record().await?),
        }
    }

    /// Records (Some) or clears (None) the session id on this member's ERS.
    pub async fn set_session_record(&self, id: Option<&str>) -> Result<(), Error> {
        match self {
            Runners::Kube(k) => Ok(k.set_session_record(id).await?),
            Runners::Sim(s) => Ok(s.set_session_record(id).await?),
        }
    }
}
