//! The `kube` runner backend: the merge patches ARC's listener sends to its EphemeralRunnerSet
//! (reference §5.4, DESIGN §5.6), and the session record annotation (DESIGN §5.12).
//!
//! ```text
//!  Scaler ──Patch{replicas,patchID}──▶ PATCH ephemeralrunnersets/<ers>          (merge-patch+json)
//!  JobStarted (routed to this member) ▶ PATCH ephemeralrunners/<runner>/status   (404 = gone)
//!  session record ◀──────────────────▶ PATCH ephemeralrunnersets/<ers>          (annotation arcfed.io/session-id)
//! ```
//! Only the verbs of ARC's listener Role are used: `patch` on `ephemeralrunnersets/<ers>`, `patch`
//! on `ephemeralrunners` and `ephemeralrunners/status`. No get, list or watch: the session record is
//! read with a no-op merge patch, which returns the object.

use ::kube::api::{Api, ApiResource, DynamicObject, Patch as KubePatch, PatchParams};
use arcfed_agent_core::scaler::Patch;
use serde_json::json;

/// ARC's API group and version for its CRDs (reference §6.1).
pub const GROUP: &str = "actions.github.com";
pub const VERSION: &str = "v1alpha1";
/// The annotation holding the id of the session this cluster's listener opened (DESIGN §5.12).
pub const SESSION_ANNOTATION: &str = "arcfed.io/session-id";

/// What a JobStarted message tells the runner's EphemeralRunner (ARC's status fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobStarted {
    /// `jobRequestId`; omitted from the patch when 0, as ARC does.
    pub job_request_id: i64,
    /// `jobRepositoryName`: `owner/repo`.
    pub repository: String,
    pub job_id: String,
    pub workflow_run_id: i64,
    pub job_workflow_ref: String,
    pub job_display_name: String,
}

impl JobStarted {
    /// The status merge patch ARC's listener sends (reference §5.4).
    pub fn status_patch(&self) -> serde_json::Value {
        let mut status = serde_json::Map::new();
        if self.job_request_id != 0 {
            status.insert("jobRequestId".into(), json!(self.job_request_id));
        }
        status.insert("jobRepositoryName".into(), json!(self.repository));
        status.insert("jobId".into(), json!(self.job_id));
        status.insert("workflowRunId".into(), json!(self.workflow_run_id));
        status.insert("jobWorkflowRef".into(), json!(self.job_workflow_ref));
        status.insert("jobDisplayName".into(), json!(self.job_display_name));
        json!({ "status": status })
    }
}

/// The ERS merge patch for a scaler decision.
///
/// A target of 0 is sent as `"replicas": null`, byte for byte what ARC's listener sends
/// (`replicas` is `omitempty` in Go, reference §5.4, observed in ARC #3450). In a merge patch null
/// removes the field and the controller reads the absent field as 0, so it means the same as an
/// explicit 0 (§5.8); we keep ARC's form so that an ERS managed by arcfed looks exactly like one
/// managed by ARC's listener, and a request log compares equal. `patchID` is always sent (it is
/// `required` in the CRD, and 0 is meaningful).
pub fn replicas_patch(p: Patch) -> serde_json::Value {
    let replicas = if p.replicas == 0 { serde_json::Value::Null } else { json!(p.replicas) };
    json!({ "spec": { "patchID": p.patch_id, "replicas": replicas } })
}

/// Errors of the kube backend; each names the object it was about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no Kubernetes client (in-cluster config or KUBECONFIG): {0}")]
    Client(#[source] ::kube::Error),
    #[error(
        "patch of {object} refused (403): the listener's Role must allow `patch` on {resource} \
         (ARC's listener Role has exactly that); {message}"
    )]
    Forbidden { object: String, resource: &'static str, message: String },
    #[error("patch of {object} failed ({code} {reason}): {message}")]
    Api { object: String, code: u16, reason: String, message: String },
    #[error("patch of {object} failed: {source}")]
    Transport {
        object: String,
        #[source]
        source: ::kube::Error,
    },
}

impl Error {
    fn from_kube(object: String, resource: &'static str, e: ::kube::Error) -> Error {
        match e {
            ::kube::Error::Api(s) if s.code == 403 => Error::Forbidden { object, resource, message: s.message },
            ::kube::Error::Api(s) => Error::Api { object, code: s.code, reason: s.reason, message: s.message },
            source => Error::Transport { object, source },
        }
    }

    /// The object does not exist (404).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Api { code: 404, .. })
    }
}

/// The kube side of one member: its EphemeralRunnerSet and that set's EphemeralRunners.
#[derive(Clone)]
pub struct KubeRunners {
    namespace: String,
    name: String,
    sets: Api<DynamicObject>,
    runners: Api<DynamicObject>,
}

impl std::fmt::Debug for KubeRunners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeRunners").field("namespace", &self.namespace).field("name", &self.name).finish()
    }
}

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

impl KubeRunners {
    /// In-cluster config, or `KUBECONFIG` / `~/.kube/config` (`kube::Client::try_default`).
    pub async fn from_env(namespace: &str, name: &str) -> Result<KubeRunners, Error> {
        let client = ::kube::Client::try_default().await.map_err(Error::Client)?;
        Ok(KubeRunners::with_client(client, namespace, name))
    }

    pub fn with_client(client: ::kube::Client, namespace: &str, name: &str) -> KubeRunners {
        let sets = resource("EphemeralRunnerSet", "ephemeralrunnersets");
        let runners = resource("EphemeralRunner", "ephemeralrunners");
        KubeRunners {
            namespace: namespace.into(),
            name: name.into(),
            sets: Api::namespaced_with(client.clone(), namespace, &sets),
            runners: Api::namespaced_with(client, namespace, &runners),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn ers_object(&self) -> String {
        format!("ephemeralrunnersets/{} in namespace {}", self.name, self.namespace)
    }

    async fn patch_ers(&self, body: &serde_json::Value) -> Result<DynamicObject, Error> {
        self.sets
            .patch(&self.name, &PatchParams::default(), &KubePatch::Merge(body))
            .await
            .map_err(|e| Error::from_kube(self.ers_object(), "ephemeralrunnersets", e))
    }

    /// `{"spec":{"patchID":P,"replicas":R}}` onto the ERS, as ARC's listener (reference §5.4).
    pub async fn patch_replicas(&self, p: Patch) -> Result<(), Error> {
        self.patch_ers(&replicas_patch(p)).await.map(drop)
    }

    /// ARC's JobStarted status patch on the runner's EphemeralRunner. 404 ⇒ Ok: the runner is gone.
    pub async fn patch_job_started(&self, runner_name: &str, job: &JobStarted) -> Result<(), Error> {
        let object = format!("ephemeralrunners/{runner_name}/status in namespace {}", self.namespace);
        match self
            .runners
            .patch_status(runner_name, &PatchParams::default(), &KubePatch::Merge(job.status_patch()))
            .await
        {
            Ok(_) => Ok(()),
            Err(::kube::Error::Api(s)) if s.code == 404 => {
                tracing::debug!(runner = runner_name, "EphemeralRunner already gone; JobStarted status patch skipped");
                Ok(())
            }
            Err(e) => Err(Error::from_kube(object, "ephemeralrunners/status", e)),
        }
    }

    /// The recorded session id, read with a no-op merge patch (`{}`) because the listener's
    /// Role has no `get`.
    pub async fn session_record(&self) -> Result<Option<String>, Error> {
        let obj = self.patch_ers(&json!({})).await?;
        match obj.metadata.annotations.as_ref().and_then(|a| a.get(SESSION_ANNOTATION)) {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => Ok(Some(v.clone())),
        }
    }

    /// Records (Some) or clears (None, a merge-patch null removes the key) the session id.
    pub async fn set_session_record(&self, id: Option<&str>) -> Result<(), Error> {
        let body = json!({ "metadata": { "annotations": { SESSION_ANNOTATION: id } } });
        self.patch_ers(&body).await.map(drop)
    }
}
