//! A kubelet stand-in: registers one node per cluster, binds every unscheduled pod to it (the lab
//! runs no scheduler) and runs each container as a local process.
//!
//! A pod gets its own network namespace on the lab bridge ([`super::net`]), its own UTS
//! namespace (hostname = pod name, which ARC's listener uses as the session owner), and a
//! private mount namespace where its volumes are bind-mounted at the paths the pod asks for:
//! Secret, ConfigMap, emptyDir and projected volumes (a real service-account token from the
//! TokenRequest API, the cluster CA, the namespace). Env, envFrom and the Downward API fields
//! ARC uses are resolved from the API server; `KUBERNETES_SERVICE_HOST/PORT` point at the
//! cluster's API server. The image (or the command's program) maps to a local binary
//! ([`Programs`]). Phases, container states, exit codes and restart counts go to the pod's
//! status; `restartPolicy` is honoured (with back-off), and deletion sends SIGTERM, waits the
//! grace period, then SIGKILL, then removes the pod, as the kubelet does.

use crate::lab::cluster::Cluster;
use crate::lab::net::{LabNet, PodNet};
use anyhow::{Context, anyhow, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::process::{Child, Command};

/// How containers become processes: which local program an image or command runs.
#[derive(Clone, Debug, Default)]
pub struct Programs {
    /// (substring of the command's program or of the image, program, arguments put before
    /// the container's, env added for it). The first rule whose pattern the command's
    /// program contains wins; else the first whose pattern the image contains.
    pub rules: Vec<Rule>,
}

/// (pattern, program, arguments before the container's, env added).
pub type Rule = (String, PathBuf, Vec<String>, Vec<(String, String)>);

type Resolved = (PathBuf, Vec<String>, Vec<(String, String)>);

impl Programs {
    fn resolve(&self, c: &Container) -> Option<Resolved> {
        let image = c.image.clone().unwrap_or_default();
        let program = c.command.as_ref().and_then(|v| v.first()).cloned().unwrap_or_default();
        let hit = |pat: &str| -> bool { !program.is_empty() && program.contains(pat) };
        self.rules
            .iter()
            .find(|(pat, ..)| hit(pat))
            .or_else(|| self.rules.iter().find(|(pat, ..)| image.contains(pat.as_str())))
            .map(|(_, p, args, env)| (p.clone(), args.clone(), env.clone()))
    }
}

/// What happened to a container, for the lab's measurements.
#[derive(Clone, Debug)]
pub struct ContainerEvent {
    pub at: Instant,
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// `None`: started; `Some(code)`: exited (128+signal when killed).
    pub exit: Option<i32>,
}

struct Run {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    pid: Option<u32>,
    started_at: Option<SystemTime>,
    restarts: u32,
    last_exit: Option<(i32, SystemTime)>,
    next_start: Option<Instant>,
    done: bool,
}

struct PodRun {
    ns: String,
    name: String,
    uid: String,
    net: PodNet,
    dir: PathBuf,
    mounts: Vec<(PathBuf, String, bool)>,
    restart_policy: String,
    runs: Vec<Run>,
    terminating: Option<Instant>,
    failed_setup: Option<String>,
    last_status: Value,
}

#[derive(Default)]
struct Shared {
    events: Vec<ContainerEvent>,
    pids: HashMap<(String, String, String), u32>,
    ips: HashMap<std::net::Ipv4Addr, (String, String)>,
}

/// The running stand-in; stops (and kills its pods) when dropped.
pub struct Kubelet {
    pub node: String,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Kubelet {
    /// Starts the stand-in for cluster `c` (node `lab-<cluster>`), its pods on `net`.
    pub async fn start(c: &Cluster, net: Arc<LabNet>, programs: Programs) -> anyhow::Result<Kubelet> {
        let client = client(c).await?;
        let node = format!("lab-{}", c.name);
        register_node(&client, &node).await?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let mut k = Loop {
            client,
            node: node.clone(),
            net,
            programs,
            dir: c.dir.join("pods"),
            api: (c.advertise.to_string(), c.api_port),
            pods: BTreeMap::new(),
            shared: shared.clone(),
        };
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = k.sync().await {
                    tracing::warn!(error = %format!("{e:#}"), "kubelet stand-in: sync failed");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Ok(Kubelet { node, shared, task })
    }

    /// Every container start and exit so far.
    pub fn events(&self) -> Vec<ContainerEvent> {
        self.shared.lock().expect("lock").events.clone()
    }

    /// The pid of a running container, if any.
    pub fn pid(&self, namespace: &str, pod: &str, container: &str) -> Option<u32> {
        self.shared.lock().expect("lock").pids.get(&(namespace.into(), pod.into(), container.into())).copied()
    }

    /// The pod (namespace, name) that has address `ip`.
    pub fn pod_at(&self, ip: std::net::Ipv4Addr) -> Option<(String, String)> {
        self.shared.lock().expect("lock").ips.get(&ip).cloned()
    }

    /// Running containers whose pod name starts with `prefix`: (namespace, pod, container, pid).
    pub fn running(&self, prefix: &str) -> Vec<(String, String, String, u32)> {
        self.shared
            .lock()
            .expect("lock")
            .pids
            .iter()
            .filter(|((_, p, _), _)| p.starts_with(prefix))
            .map(|((n, p, c), pid)| (n.clone(), p.clone(), c.clone(), *pid))
            .collect()
    }
}

/// A kube client as the cluster's admin.
pub async fn client(c: &Cluster) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(&c.kubeconfig)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(cfg)?)
}

async fn register_node(client: &kube::Client, node: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let body: Node = serde_json::from_value(json!({
        "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}},
    }))?;
    if nodes.get_opt(node).await?.is_none() {
        nodes.create(&PostParams::default(), &body).await?;
    }
    let now = chrono_now();
    let status = json!({"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "arcfed-lab kubelet stand-in",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}],
        "capacity": {"cpu": "64", "memory": "256Gi", "pods": "500"},
        "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "500"},
        "nodeInfo": {"kubeletVersion": "arcfed-lab", "architecture": "amd64", "operatingSystem": "linux",
                     "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "", "osImage": "",
                     "containerRuntimeVersion": "arcfed-lab://processes", "kubeProxyVersion": ""},
    }});
    nodes.patch_status(node, &PatchParams::default(), &Patch::Merge(&status)).await?;
    Ok(())
}

fn chrono_now() -> String {
    rfc3339(SystemTime::now())
}

/// RFC 3339 in UTC, seconds precision (what Kubernetes' `metav1.Time` takes).
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

struct Loop {
    client: kube::Client,
    node: String,
    net: Arc<LabNet>,
    programs: Programs,
    dir: PathBuf,
    api: (String, u16),
    pods: BTreeMap<String, PodRun>,
    shared: Arc<Mutex<Shared>>,
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl Loop {
    async fn sync(&mut self) -> anyhow::Result<()> {
        let all: Api<Pod> = Api::all(self.client.clone());
        // Bind what no scheduler will.
        for p in all.list(&ListParams::default().fields("spec.nodeName=")).await?.items {
            let (ns, name) =
                (p.metadata.namespace.clone().unwrap_or_default(), p.metadata.name.clone().unwrap_or_default());
            if p.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                                 "target": {"apiVersion": "v1", "kind": "Node", "name": self.node}});
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            if let Err(e) =
                api.create_subresource::<Value, Value>("binding", &name, &PostParams::default(), &binding).await
            {
                tracing::debug!(pod = %name, error = %e, "bind failed (will retry)");
            }
        }
        let mine = all.list(&ListParams::default().fields(&format!("spec.nodeName={}", self.node))).await?.items;
        let mut seen = std::collections::BTreeSet::new();
        for p in &mine {
            let uid = p.metadata.uid.clone().unwrap_or_default();
            seen.insert(uid.clone());
            if !self.pods.contains_key(&uid) {
                if p.metadata.deletion_timestamp.is_some() {
                    // Never started here: nothing to stop.
                    self.finalize(p).await;
                    continue;
                }
                let terminal =
                    matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded") | Some("Failed"));
                if terminal {
                    continue;
                }
                let run = self.setup(p).await;
                self.pods.insert(uid.clone(), run);
            }
            let deleting = p.metadata.deletion_timestamp.is_some();
            let grace = p.metadata.deletion_grace_period_seconds.unwrap_or(30).max(0) as u64;
            let run = self.pods.get_mut(&uid).expect("inserted");
            if deleting && run.terminating.is_none() {
                run.terminating = Some(Instant::now() + Duration::from_secs(grace));
                for r in &run.runs {
                    if let Some(pid) = r.pid {
                        signal(pid, "-TERM");
                    }
                }
            }
        }
        // Pods removed behind our back (force-deleted): stop them.
        let gone: Vec<String> = self.pods.keys().filter(|u| !seen.contains(*u)).cloned().collect();
        for uid in gone {
            if let Some(mut run) = self.pods.remove(&uid) {
                self.stop_all(&mut run).await;
            }
        }
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for uid in uids {
            self.step(&uid).await?;
        }
        Ok(())
    }

    /// Prepares a pod's network, volumes and container commands. A failure is kept in the run
    /// and reported as the pod's status.
    async fn setup(&mut self, p: &Pod) -> PodRun {
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        let name = p.metadata.name.clone().unwrap_or_default();
        let uid = p.metadata.uid.clone().unwrap_or_default();
        let dir = self.dir.join(format!("{ns}_{name}_{}", &uid[..uid.len().min(8)]));
        let spec = p.spec.clone().unwrap_or_default();
        let net = match self.net.pod() {
            Ok(n) => n,
            Err(e) => {
                return PodRun {
                    ns,
                    name,
                    uid,
                    net: PodNet { ns: String::new(), ip: std::net::Ipv4Addr::UNSPECIFIED },
                    dir,
                    mounts: vec![],
                    restart_policy: "Never".into(),
                    runs: vec![],
                    terminating: None,
                    failed_setup: Some(format!("pod network: {e:#}")),
                    last_status: Value::Null,
                };
            }
        };
        self.shared.lock().expect("lock").ips.insert(net.ip, (ns.clone(), name.clone()));
        let mut run = PodRun {
            ns: ns.clone(),
            name: name.clone(),
            uid: uid.clone(),
            net,
            dir: dir.clone(),
            mounts: vec![],
            restart_policy: spec.restart_policy.clone().unwrap_or_else(|| "Always".into()),
            runs: vec![],
            terminating: None,
            failed_setup: None,
            last_status: Value::Null,
        };
        if let Err(e) = self.prepare(p, &mut run).await {
            run.failed_setup = Some(format!("{e:#}"));
        }
        run
    }

    async fn prepare(&mut self, p: &Pod, run: &mut PodRun) -> anyhow::Result<()> {
        let spec = p.spec.clone().unwrap_or_default();
        let ns = run.ns.clone();
        std::fs::create_dir_all(run.dir.join("volumes"))?;
        // Volumes, as directories under the pod's dir.
        let mut vols: HashMap<String, PathBuf> = HashMap::new();
        for v in spec.volumes.clone().unwrap_or_default() {
            let d = run.dir.join("volumes").join(&v.name);
            std::fs::create_dir_all(&d)?;
            if let Some(s) = &v.secret {
                let name = s.secret_name.clone().unwrap_or_default();
                let data =
                    self.secret(&ns, &name).await.with_context(|| format!("volume {}: secret {name}", v.name))?;
                write_items(&d, &data, key_paths(&s.items))?;
            } else if let Some(c) = &v.config_map {
                let data = self
                    .config_map(&ns, &c.name)
                    .await
                    .with_context(|| format!("volume {}: configmap {}", v.name, c.name))?;
                write_items(&d, &data, key_paths(&c.items))?;
            } else if v.empty_dir.is_some() {
            } else if let Some(pr) = &v.projected {
                for src in pr.sources.clone().unwrap_or_default() {
                    if let Some(t) = &src.service_account_token {
                        let token = self.token(p, t.expiration_seconds.unwrap_or(3607), t.audience.clone()).await?;
                        std::fs::write(d.join(&t.path), token)?;
                    }
                    if let Some(c) = &src.config_map {
                        let data = self.config_map(&ns, &c.name).await?;
                        write_items(&d, &data, key_paths(&c.items))?;
                    }
                    if let Some(s) = &src.secret {
                        let data = self.secret(&ns, &s.name).await?;
                        write_items(&d, &data, key_paths(&s.items))?;
                    }
                    if let Some(dw) = &src.downward_api {
                        for item in dw.items.clone().unwrap_or_default() {
                            let path = item.field_ref.as_ref().map(|f| f.field_path.as_str()).unwrap_or_default();
                            std::fs::write(d.join(&item.path), field(p, path, &run.net))?;
                        }
                    }
                }
            } else {
                bail!("volume {}: this stand-in supports secret, configMap, emptyDir and projected only", v.name);
            }
            vols.insert(v.name.clone(), d);
        }
        for c in spec.containers.clone() {
            let (program, mut args, extra_env) = self
                .programs
                .resolve(&c)
                .ok_or_else(|| anyhow!("container {}: no local program for image {:?}", c.name, c.image))?;
            args.extend(c.command.clone().unwrap_or_default().into_iter().skip(1));
            args.extend(c.args.clone().unwrap_or_default());
            let mut env: Vec<(String, String)> = vec![
                ("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()),
                ("HOSTNAME".into(), run.name.clone()),
                ("HOME".into(), "/root".into()),
                ("KUBERNETES_SERVICE_HOST".into(), self.api.0.clone()),
                ("KUBERNETES_SERVICE_PORT".into(), self.api.1.to_string()),
            ];
            for ef in c.env_from.clone().unwrap_or_default() {
                let prefix = ef.prefix.clone().unwrap_or_default();
                let data = if let Some(r) = &ef.config_map_ref {
                    match self.config_map(&ns, &r.name).await {
                        Ok(d) => d,
                        Err(_) if r.optional == Some(true) => BTreeMap::new(),
                        Err(e) => return Err(e.context(format!("container {}: envFrom configmap {}", c.name, r.name))),
                    }
                } else if let Some(r) = &ef.secret_ref {
                    match self.secret(&ns, &r.name).await {
                        Ok(d) => d,
                        Err(_) if r.optional == Some(true) => BTreeMap::new(),
                        Err(e) => return Err(e.context(format!("container {}: envFrom secret {}", c.name, r.name))),
                    }
                } else {
                    BTreeMap::new()
                };
                for (k, v) in data {
                    env.push((format!("{prefix}{k}"), String::from_utf8_lossy(&v).into_owned()));
                }
            }
            for e in c.env.clone().unwrap_or_default() {
                let value = if let Some(v) = e.value.clone() {
                    expand(&v, &env)
                } else if let Some(vf) = &e.value_from {
                    if let Some(f) = &vf.field_ref {
                        field(p, &f.field_path, &run.net)
                    } else if let Some(s) = &vf.secret_key_ref {
                        let d = self.secret(&ns, &s.name).await;
                        match d.ok().and_then(|d| d.get(&s.key).cloned()) {
                            Some(v) => String::from_utf8_lossy(&v).into_owned(),
                            None if s.optional == Some(true) => continue,
                            None => {
                                bail!("container {}: env {}: secret {} key {} not found", c.name, e.name, s.name, s.key)
                            }
                        }
                    } else if let Some(s) = &vf.config_map_key_ref {
                        let d = self.config_map(&ns, &s.name).await;
                        match d.ok().and_then(|d| d.get(&s.key).cloned()) {
                            Some(v) => String::from_utf8_lossy(&v).into_owned(),
                            None if s.optional == Some(true) => continue,
                            None => bail!(
                                "container {}: env {}: configmap {} key {} not found",
                                c.name,
                                e.name,
                                s.name,
                                s.key
                            ),
                        }
                    } else {
                        String::new()
                    }
                } else {
                    String::new()
                };
                env.push((e.name.clone(), value));
            }
            env.extend(extra_env);
            let args = args.iter().map(|a| expand(a, &env)).collect();
            for m in c.volume_mounts.clone().unwrap_or_default() {
                let src = vols
                    .get(&m.name)
                    .ok_or_else(|| anyhow!("container {}: volumeMount {} names no volume", c.name, m.name))?;
                let src = match &m.sub_path {
                    Some(sp) if !sp.is_empty() => src.join(sp),
                    _ => src.clone(),
                };
                run.mounts.push((src, m.mount_path.clone(), m.read_only == Some(true)));
            }
            run.runs.push(Run {
                name: c.name.clone(),
                program,
                args,
                env,
                child: None,
                pid: None,
                started_at: None,
                restarts: 0,
                last_exit: None,
                next_start: Some(Instant::now()),
                done: false,
            });
        }
        Ok(())
    }

    async fn secret(&self, ns: &str, name: &str) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
        let s: Secret = Api::namespaced(self.client.clone(), ns).get(name).await?;
        let mut out: BTreeMap<String, Vec<u8>> =
            s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
        for (k, v) in s.string_data.unwrap_or_default() {
            out.insert(k, v.into_bytes());
        }
        Ok(out)
    }

    async fn config_map(&self, ns: &str, name: &str) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
        let c: ConfigMap = Api::namespaced(self.client.clone(), ns).get(name).await?;
        let mut out: BTreeMap<String, Vec<u8>> =
            c.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
        for (k, v) in c.binary_data.unwrap_or_default() {
            out.insert(k, v.0);
        }
        Ok(out)
    }

    /// A bound service-account token for the pod, from the TokenRequest API.
    async fn token(&self, p: &Pod, seconds: i64, audience: Option<String>) -> anyhow::Result<String> {
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        let sa = p.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
        let mut spec = json!({"expirationSeconds": seconds,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": p.metadata.name, "uid": p.metadata.uid}});
        if let Some(a) = audience {
            spec["audiences"] = json!([a]);
        }
        let req = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec});
        let api: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(self.client.clone(), &ns);
        let out: Value = api
            .create_subresource::<Value, Value>("token", &sa, &PostParams::default(), &req)
            .await
            .with_context(|| format!("token for service account {ns}/{sa}"))?;
        out["status"]["token"].as_str().map(str::to_string).ok_or_else(|| anyhow!("TokenRequest answered no token"))
    }

    async fn step(&mut self, uid: &str) -> anyhow::Result<()> {
        let Some(mut run) = self.pods.remove(uid) else { return Ok(()) };
        if run.failed_setup.is_none() {
            self.reap_and_start(&mut run);
        }
        if let Some(deadline) = run.terminating {
            if Instant::now() >= deadline {
                for r in &run.runs {
                    if let Some(pid) = r.pid {
                        signal(pid, "-KILL");
                    }
                }
            }
            if run.runs.iter().all(|r| r.child.is_none()) {
                self.stop_all(&mut run).await;
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &run.ns);
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(kube::api::Preconditions {
                        uid: Some(run.uid.clone()),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                let _ = api.delete(&run.name, &dp).await;
                return Ok(());
            }
        }
        let status = self.status(&run);
        if status != run.last_status {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &run.ns);
            match api.patch_status(&run.name, &PatchParams::default(), &Patch::Merge(&json!({"status": status}))).await
            {
                Ok(_) => run.last_status = status,
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    self.stop_all(&mut run).await;
                    return Ok(());
                }
                Err(e) => tracing::debug!(pod = %run.name, error = %e, "status patch failed (will retry)"),
            }
        }
        self.pods.insert(uid.to_string(), run);
        Ok(())
    }

    /// Collects exits, restarts per policy, starts what is due.
    fn reap_and_start(&mut self, run: &mut PodRun) {
        let terminating = run.terminating.is_some();
        for i in 0..run.runs.len() {
            let exited = {
                let r = &mut run.runs[i];
                match r.child.as_mut().map(|c| c.try_wait()) {
                    Some(Ok(Some(st))) => {
                        use std::os::unix::process::ExitStatusExt;
                        Some(st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)))
                    }
                    _ => None,
                }
            };
            if let Some(code) = exited {
                let r = &mut run.runs[i];
                r.child = None;
                r.pid = None;
                r.last_exit = Some((code, SystemTime::now()));
                self.record(&run.ns, &run.name, &r.name, Some(code));
                let restart = !terminating
                    && match run.restart_policy.as_str() {
                        "Always" => true,
                        "OnFailure" => code != 0,
                        _ => false,
                    };
                if restart {
                    // The kubelet's crash-loop back-off: 10 s doubling, at most 5 min.
                    let backoff = Duration::from_secs(10u64.saturating_mul(1 << r.restarts.min(5)).min(300));
                    r.restarts += 1;
                    r.next_start = Some(Instant::now() + backoff);
                } else {
                    r.done = true;
                }
            }
            let due = run.runs[i].next_start.is_some_and(|t| Instant::now() >= t) && !terminating;
            if due {
                run.runs[i].next_start = None;
                if let Err(e) = self.spawn(run, i) {
                    let r = &mut run.runs[i];
                    tracing::warn!(pod = %run.name, container = %r.name, error = %format!("{e:#}"), "start failed");
                    r.last_exit = Some((127, SystemTime::now()));
                    r.done = true;
                }
            }
        }
    }

    fn spawn(&mut self, run: &mut PodRun, i: usize) -> anyhow::Result<()> {
        // In the pod's network namespace (`ip netns exec` also gives a private mount
        // namespace), with its own hostname, its volumes bind-mounted where it asks.
        // The program is opened before the mounts and run from that descriptor: a volume on
        // its directory (an emptyDir on /tmp while the binaries live under /tmp) would hide it.
        let mut script = String::from("set -e; hostname \"$ARCFED_LAB_POD\"; exec 3<\"$1\"; shift; ");
        // Parents before children; a target that would hide the volumes' own directory (an
        // emptyDir on /tmp while the lab works under /tmp) goes last.
        let mut mounts = run.mounts.clone();
        mounts.sort_by_key(|(_, t, _)| (run.dir.starts_with(t), t.matches('/').count()));
        for (src, target, ro) in &mounts {
            let is_file = src.is_file();
            let (s, t) = (shell_quote(&src.display().to_string()), shell_quote(target));
            if is_file {
                script.push_str(&format!("mkdir -p \"$(dirname {t})\"; [ -e {t} ] || : > {t}; "));
            } else {
                script.push_str(&format!("mkdir -p {t}; "));
            }
            script.push_str(&format!("mount --bind {s} {t}; "));
            if *ro {
                script.push_str(&format!("mount -o remount,bind,ro {t}; "));
            }
        }
        script.push_str("unset ARCFED_LAB_POD; exec /proc/self/fd/3 \"$@\"");
        let r = &mut run.runs[i];
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(run.dir.join(format!("{}.log", r.name)))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &run.net.ns, "unshare", "--uts", "sh", "-c", &script, "sh"])
            .arg(&r.program)
            .args(&r.args)
            .env_clear()
            .env("ARCFED_LAB_POD", &run.name)
            .envs(r.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("spawn {}", r.program.display()))?;
        r.pid = child.id();
        r.child = Some(child);
        r.started_at = Some(SystemTime::now());
        if let Some(pid) = r.pid {
            self.shared.lock().expect("lock").pids.insert((run.ns.clone(), run.name.clone(), r.name.clone()), pid);
        }
        let name = r.name.clone();
        self.record(&run.ns, &run.name, &name, None);
        Ok(())
    }

    fn record(&self, ns: &str, pod: &str, container: &str, exit: Option<i32>) {
        let mut s = self.shared.lock().expect("lock");
        if exit.is_some() {
            s.pids.remove(&(ns.into(), pod.into(), container.into()));
        }
        s.events.push(ContainerEvent {
            at: Instant::now(),
            namespace: ns.into(),
            pod: pod.into(),
            container: container.into(),
            exit,
        });
    }

    async fn stop_all(&mut self, run: &mut PodRun) {
        for r in &mut run.runs {
            if let Some(mut c) = r.child.take() {
                let _ = c.kill().await;
                let _ = c.wait().await;
                let name = r.name.clone();
                self.record(&run.ns, &run.name, &name, Some(137));
            }
        }
        if !run.net.ns.is_empty() {
            self.net.release(&run.net);
        }
    }

    async fn finalize(&self, p: &Pod) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), p.metadata.namespace.as_deref().unwrap_or_default());
        let _ = api
            .delete(
                p.metadata.name.as_deref().unwrap_or_default(),
                &DeleteParams { grace_period_seconds: Some(0), ..Default::default() },
            )
            .await;
    }

    fn status(&self, run: &PodRun) -> Value {
        let host = self.net.host.to_string();
        if let Some(why) = &run.failed_setup {
            return json!({"phase": "Failed", "reason": "LabSetupFailed", "message": why, "hostIP": host});
        }
        let statuses: Vec<Value> = run
            .runs
            .iter()
            .map(|r| {
                let state = if r.child.is_some() {
                    json!({"running": {"startedAt": rfc3339(r.started_at.unwrap_or(SystemTime::now()))}})
                } else if let Some((code, at)) = r.last_exit {
                    if r.done {
                        json!({"terminated": {"exitCode": code, "finishedAt": rfc3339(at), "reason": if code == 0 { "Completed" } else { "Error" }}})
                    } else {
                        json!({"waiting": {"reason": "CrashLoopBackOff"}})
                    }
                } else {
                    json!({"waiting": {"reason": "ContainerCreating"}})
                };
                json!({"name": r.name, "ready": r.child.is_some(), "started": r.child.is_some(), "restartCount": r.restarts,
                       "image": "", "imageID": "", "state": state})
            })
            .collect();
        let all_done = !run.runs.is_empty() && run.runs.iter().all(|r| r.done);
        let phase = if all_done {
            if run.runs.iter().all(|r| r.last_exit.is_some_and(|(c, _)| c == 0)) { "Succeeded" } else { "Failed" }
        } else if run.runs.iter().any(|r| r.child.is_some() || r.last_exit.is_some()) {
            "Running"
        } else {
            "Pending"
        };
        let ready = run.runs.iter().all(|r| r.child.is_some());
        let cond = |t: &str, ok: bool| json!({"type": t, "status": if ok { "True" } else { "False" }});
        json!({
            "phase": phase,
            "hostIP": host,
            "podIP": run.net.ip.to_string(),
            "podIPs": [{"ip": run.net.ip.to_string()}],
            "conditions": [cond("PodScheduled", true), cond("Initialized", true), cond("ContainersReady", ready), cond("Ready", ready)],
            "containerStatuses": statuses,
        })
    }
}

/// `$(VAR)` references in env values and args, as Kubernetes expands them.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = s.to_string();
    for (k, v) in env.iter().rev() {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

fn field(p: &Pod, path: &str, net: &PodNet) -> String {
    match path {
        "metadata.name" => p.metadata.name.clone().unwrap_or_default(),
        "metadata.namespace" => p.metadata.namespace.clone().unwrap_or_default(),
        "metadata.uid" => p.metadata.uid.clone().unwrap_or_default(),
        "spec.nodeName" => p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => p.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_default(),
        "status.podIP" => net.ip.to_string(),
        _ => String::new(),
    }
}

/// A volume source's `items` (key → path), as [`write_items`] takes them.
fn key_paths(items: &Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>) -> Option<Vec<(String, String)>> {
    items.as_ref().map(|i| i.iter().map(|k| (k.key.clone(), k.path.clone())).collect())
}

fn write_items(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<Vec<(String, String)>>,
) -> anyhow::Result<()> {
    let pairs: Vec<(String, String)> = items.unwrap_or_else(|| data.keys().map(|k| (k.clone(), k.clone())).collect());
    for (key, path) in pairs {
        if let Some(v) = data.get(&key) {
            let target = dir.join(&path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&target, v)?;
        }
    }
    Ok(())
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill").args([sig, &pid.to_string()]).status();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_601_599);
        assert_eq!(rfc3339(t), "2026-12-06T23:59:59Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn expands_env_references() {
        let env = vec![("A".to_string(), "x".to_string()), ("B".to_string(), "y".to_string())];
        assert_eq!(expand("--a=$(A) --b=$(B) $(C)", &env), "--a=x --b=y $(C)");
    }
}
