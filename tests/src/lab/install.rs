//! `arcfed-lab install-check`: deploy/ applied to a real API server the way deploy/README.md says,
//! from an empty cluster that has only what the README lists as requirements (cert-manager's and
//! prometheus-operator's CRDs, ARC's controller chart in `arc-systems`, a `monitoring` namespace).
//!
//! 1. **The documented steps, verbatim.** Each command of deploy/README.md's "Install next to ARC"
//!    is run as written (`sh -c`, from a directory where `deploy/` is this repository's), after
//!    checking it is still in the README word for word. Only the chart reference is local: the
//!    lab has no registry, so ARC's `oci://` chart is the pinned module's chart directory.
//! 2. **Placement.** Every kustomization under deploy/ is rendered; every namespaced object
//!    (namespaced by the API server's discovery, not by a list of ours) must name the namespace
//!    the docs give its directory; every kustomization must pass a server-side dry run.
//! 3. **Admission.** Each case of deploy/ci/admission-cases.yaml is a real request against the
//!    API server, which evaluates deploy/arc/admission itself; allowed or denied as stated.
//! 4. **ARC's chart with our values.** `helm template` of ARC's scale-set chart with
//!    deploy/arc/values, server-side dry run: ARC's CRD schema accepts what we render.
//! 5. **Our chart, installed.** `helm upgrade --install` of deploy/helm/arcfed with the quorum
//!    and agent examples into namespaces of their own (the kustomize install owns the documented
//!    ones), and its admission policy rendered and dry-run on the server (the kustomize install
//!    owns that cluster-scoped name).

use crate::lab::cluster::{Cluster, run, tail};
use crate::lab::peers::{ARC_VERSION, Peers};
use anyhow::Context;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// ARC's scale-set chart as the README names it; the lab substitutes the local chart.
pub const ARC_CHART_OCI: &str = "oci://ghcr.io/actions/actions-runner-controller-charts/gha-runner-scale-set";

/// The install steps of deploy/README.md, in order, exactly as written there (a trailing `\`
/// continuation is joined with one space). The lab fails when one is no longer in the README.
pub const DOCUMENTED_STEPS: &[&str] = &[
    "arcfedctl certs init --out ca",
    "arcfedctl certs issuer --ca ca --cluster region-a --out issuer-region-a",
    "kubectl create namespace arcfed-system",
    "kubectl -n arcfed-system create secret tls arcfed-ca --cert ca/ca.crt --key ca/ca.key",
    "kubectl -n arc-systems create secret tls arcfed-agent-issuer --cert issuer-region-a/tls.crt --key issuer-region-a/tls.key",
    "kubectl apply -k deploy/coordinator/overlays/lan-3",
    "kubectl apply -k deploy/arc/agent/overlays/region-a",
    "kubectl apply -k deploy/arc/admission",
    "helm upgrade --install arc-runners-region-a oci://ghcr.io/actions/actions-runner-controller-charts/gha-runner-scale-set --namespace arc-runners --create-namespace -f deploy/arc/values/gha-runner-scale-set.yaml",
    "kubectl apply -k deploy/observability",
];

/// The namespace deploy/README.md gives each directory's objects (longest prefix wins);
/// `None`: only cluster-scoped objects belong there.
pub const DOCUMENTED_NAMESPACES: &[(&str, Option<&str>)] = &[
    ("deploy/coordinator", Some("arcfed-system")),
    ("deploy/arc/agent", Some("arc-systems")),
    ("deploy/arc/scale-set", Some("arc-runners")),
    ("deploy/arc/admission", None),
    ("deploy/observability", Some("monitoring")),
];

#[derive(Debug, Serialize)]
pub struct StepResult {
    pub command: String,
    pub in_readme: bool,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Misplaced {
    pub kustomization: String,
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
    pub expected: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DryRun {
    pub kustomization: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct AdmissionResult {
    pub case: String,
    pub expect: String,
    pub got: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct ChartResult {
    pub arc_version: String,
    pub ok: bool,
    pub detail: String,
}

/// One `helm` command of step 5 (deploy/helm/arcfed).
#[derive(Debug, Serialize)]
pub struct HelmResult {
    pub command: String,
    pub ok: bool,
    pub detail: String,
}

/// Step 5's commands, run from a directory where `deploy/` is this repository's.
pub const CHART_COMMANDS: &[&str] = &[
    "helm upgrade --install arcfed deploy/helm/arcfed -n arcfed-chart --create-namespace -f deploy/helm/examples/quorum-lan-3.yaml --set coordinator.selfSignedCA=true --wait=false",
    "helm upgrade --install arcfed-agent deploy/helm/arcfed -n arc-chart-agent --create-namespace -f deploy/helm/examples/agent-region-a.yaml --wait=false",
    "helm template arcfed-admission deploy/helm/arcfed -n arc-chart-agent --set admission.enabled=true --kube-version 1.31.0 > admission.yaml && kubectl apply --dry-run=server -f admission.yaml",
    "helm list -A",
];

#[derive(Debug, Serialize)]
pub struct InstallReport {
    pub passed: bool,
    pub kube_apiserver: String,
    pub steps: Vec<StepResult>,
    pub kustomizations: usize,
    pub namespaced_objects: usize,
    pub misplaced: Vec<Misplaced>,
    pub dry_runs: Vec<DryRun>,
    pub admission: Vec<AdmissionResult>,
    pub arc_chart: Vec<ChartResult>,
    /// Step 5: deploy/helm/arcfed installed with helm.
    pub arcfed_chart: Vec<HelmResult>,
}

/// The repository root (tests/ is one level below it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Collapses whitespace and joins `\`-continued lines, so a command compares as one line.
pub fn normalize(cmd: &str) -> String {
    cmd.replace("\\\n", " ").split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The commands of deploy/README.md's install section: inline code spans and fenced lines that
/// start with a command the install uses, normalized.
pub fn readme_commands(readme: &str) -> Vec<String> {
    let section = readme.split("\n## ").find(|s| s.starts_with("Install next to ARC")).unwrap_or_default();
    let mut out = Vec::new();
    let mut in_fence = false;
    let mut pending = String::new();
    for line in section.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            let body = t.split("  #").next().unwrap_or(t).trim_end();
            pending.push_str(body);
            if body.ends_with('\\') {
                pending.pop();
                pending.push(' ');
                continue;
            }
            if !pending.trim().is_empty() {
                out.push(normalize(&pending));
            }
            pending.clear();
        } else {
            for (i, span) in line.split('`').enumerate() {
                if i % 2 == 1 && ["kubectl ", "helm ", "arcfedctl "].iter().any(|p| span.starts_with(p)) {
                    out.push(normalize(span));
                }
            }
        }
    }
    out
}

/// Kinds the API server serves as cluster-scoped (from discovery).
fn cluster_scoped_kinds(c: &Cluster) -> anyhow::Result<BTreeSet<String>> {
    let out = c.kubectl_ok(&["api-resources", "--namespaced=false", "--no-headers"])?;
    Ok(out.lines().filter_map(|l| l.split_whitespace().last().map(str::to_string)).collect())
}

/// Every directory under deploy/ with a `kind: Kustomization` (components are rendered through
/// the overlays that use them).
pub fn kustomizations(root: &Path) -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        let mut entries: Vec<_> = rd.filter_map(Result::ok).map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.file_name().is_some_and(|n| n == "kustomization.yaml")
                && std::fs::read_to_string(&p).is_ok_and(|s| s.lines().any(|l| l.trim() == "kind: Kustomization"))
            {
                out.push(p.parent().expect("file has a dir").to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(&root.join("deploy"), &mut out);
    out
}

fn expected_namespace(rel: &str) -> Option<Option<&'static str>> {
    DOCUMENTED_NAMESPACES
        .iter()
        .filter(|(p, _)| rel == *p || rel.starts_with(&format!("{p}/")))
        .max_by_key(|(p, _)| p.len())
        .map(|(_, ns)| *ns)
}

fn yaml_docs(text: &str) -> anyhow::Result<Vec<Value>> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(doc).context("parse rendered YAML")?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// RFC 7386 merge patch (`null` removes a key): how the admission cases layer `old`/`new`.
pub fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(k);
                } else {
                    merge(b.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// The environment the documented commands run in: the peers' kubectl and helm, the workspace's
/// arcfedctl, this cluster's kubeconfig, and a working directory whose `deploy` is the repo's.
struct Shell {
    path: String,
    kubeconfig: PathBuf,
    cwd: PathBuf,
}

impl Shell {
    fn new(peers: &Peers, c: &Cluster, cwd: &Path) -> anyhow::Result<Shell> {
        std::fs::create_dir_all(cwd)?;
        let link = cwd.join("deploy");
        if !link.exists() {
            std::os::unix::fs::symlink(repo_root().join("deploy"), &link)?;
        }
        let ws_bin = crate::harness::bin_path("arcfedctl");
        let ws_dir = ws_bin.parent().expect("bin dir").display().to_string();
        let path = format!("{}:{ws_dir}:{}", peers.dir.display(), std::env::var("PATH").unwrap_or_default());
        Ok(Shell { path, kubeconfig: c.kubeconfig.clone(), cwd: cwd.to_path_buf() })
    }

    fn sh(&self, cmd: &str) -> anyhow::Result<String> {
        run(
            Command::new("sh")
                .args(["-c", cmd])
                .current_dir(&self.cwd)
                .env("PATH", &self.path)
                .env("KUBECONFIG", &self.kubeconfig)
                .env("HELM_CACHE_HOME", self.cwd.join(".helm/cache"))
                .env("HELM_CONFIG_HOME", self.cwd.join(".helm/config"))
                .env("HELM_DATA_HOME", self.cwd.join(".helm/data")),
            cmd,
        )
    }
}

/// What every ARC cluster has before arcfed's install starts (deploy/README.md, Requirements):
/// cert-manager's and prometheus-operator's CRDs, ARC's controller chart (CRDs, RBAC,
/// Deployment) in `arc-systems`, and a `monitoring` namespace (kube-prometheus-stack's).
pub async fn install_requirements(peers: &Peers, c: &Cluster, work: &Path) -> anyhow::Result<()> {
    crate::lab::arc::apply_operator_crds(peers, c)?;
    crate::lab::arc::apply_controller_chart(peers, c, work).await?;
    c.kubectl_ok(&["create", "namespace", "monitoring"])?;
    Ok(())
}

/// Runs the whole check in cluster `c` (fresh) and returns the report.
pub async fn install_check(peers: &Peers, c: &Cluster, work: &Path) -> anyhow::Result<InstallReport> {
    let root = repo_root();
    install_requirements(peers, c, &work.join("requirements")).await?;
    let version = c.kubectl_ok(&["version", "-o", "json"]).ok();
    let kube_apiserver = version
        .and_then(|v| serde_json::from_str::<Value>(&v).ok())
        .and_then(|v| v["serverVersion"]["gitVersion"].as_str().map(str::to_string))
        .unwrap_or_default();

    // 1. The documented steps.
    let readme = std::fs::read_to_string(root.join("deploy/README.md")).context("read deploy/README.md")?;
    let documented = readme_commands(&readme);
    let sh = Shell::new(peers, c, &work.join("install"))?;
    let mut steps = Vec::new();
    let mut failed = false;
    for step in DOCUMENTED_STEPS {
        let in_readme = documented.iter().any(|d| d == step);
        let cmd = step.replace(ARC_CHART_OCI, &peers.arc_scale_set_chart().display().to_string());
        let (ok, detail) = if failed {
            (false, "not run: an earlier step failed".to_string())
        } else {
            match sh.sh(&cmd) {
                Ok(out) => (true, tail(out.trim(), 3)),
                Err(e) => (false, format!("{e:#}")),
            }
        };
        // A step missing from the README fails the check but does not stop the install: the
        // steps after it still tell whether the rest of the path works.
        failed |= !ok;
        let ok = ok && in_readme;
        steps.push(StepResult { command: step.to_string(), in_readme, ok, detail });
    }

    // 2. Placement and server-side dry runs of every kustomization.
    let scoped = cluster_scoped_kinds(c)?;
    let dirs = kustomizations(&root);
    let mut misplaced = Vec::new();
    let mut dry_runs = Vec::new();
    let mut namespaced_objects = 0;
    for d in &dirs {
        let rel = d.strip_prefix(&root).unwrap_or(d).display().to_string();
        let rendered = c.kubectl_ok(&["kustomize", &d.display().to_string()]);
        let objs = match rendered.and_then(|r| yaml_docs(&r)) {
            Ok(o) => o,
            Err(e) => {
                dry_runs.push(DryRun { kustomization: rel, ok: false, detail: format!("render: {e:#}") });
                continue;
            }
        };
        let expected = expected_namespace(&rel);
        for o in &objs {
            let kind = o["kind"].as_str().unwrap_or_default().to_string();
            if scoped.contains(&kind) {
                continue;
            }
            namespaced_objects += 1;
            let ns = o["metadata"]["namespace"].as_str().map(str::to_string);
            let want = expected.flatten().map(str::to_string);
            if ns != want || want.is_none() {
                misplaced.push(Misplaced {
                    kustomization: rel.clone(),
                    kind,
                    name: o["metadata"]["name"].as_str().unwrap_or_default().to_string(),
                    namespace: ns,
                    expected: want,
                });
            }
        }
        let dr = c.kubectl_ok(&["apply", "--dry-run=server", "-k", &d.display().to_string()]);
        dry_runs.push(DryRun {
            kustomization: rel,
            ok: dr.is_ok(),
            detail: dr.map(|o| format!("{} objects", o.lines().count())).unwrap_or_else(|e| format!("{e:#}")),
        });
    }

    // 3. Admission, evaluated by the API server.
    let admission = admission_cases(c, &root)?;

    // 4. ARC's chart with our values, as ARC's CRD schema sees it.
    // In a namespace of its own: the installed release owns `arc-runners`' objects.
    let chart = sh.sh(&format!(
        "kubectl create namespace arc-chart-check && helm template chart-check {} --namespace arc-chart-check --dry-run=server -f deploy/arc/values/gha-runner-scale-set.yaml > chart.yaml && kubectl apply --dry-run=server -n arc-chart-check -f chart.yaml",
        peers.arc_scale_set_chart().display()
    ));
    let arc_chart = vec![ChartResult {
        arc_version: ARC_VERSION.to_string(),
        ok: chart.is_ok(),
        detail: chart.map(|o| tail(o.trim(), 4)).unwrap_or_else(|e| format!("{e:#}")),
    }];

    // 5. Our chart, installed with helm (its own namespaces: the documented install above owns
    //    the documented ones, and helm never adopts objects it did not create).
    let arcfed_chart: Vec<HelmResult> = CHART_COMMANDS
        .iter()
        .map(|cmd| {
            let r = sh.sh(cmd);
            HelmResult {
                command: cmd.to_string(),
                ok: r.is_ok(),
                detail: r.map(|o| tail(o.trim(), 4)).unwrap_or_else(|e| format!("{e:#}")),
            }
        })
        .collect();

    let passed = steps.iter().all(|s| s.ok)
        && misplaced.is_empty()
        && dry_runs.iter().all(|d| d.ok)
        && admission.iter().all(|a| a.ok)
        && arc_chart.iter().all(|a| a.ok)
        && arcfed_chart.iter().all(|a| a.ok);
    Ok(InstallReport {
        passed,
        kube_apiserver,
        steps,
        kustomizations: dirs.len(),
        namespaced_objects,
        misplaced,
        dry_runs,
        admission,
        arc_chart,
        arcfed_chart,
    })
}

/// deploy/ci/admission-cases.yaml against the API server: each case creates its `old` object
/// (CREATE is not matched by the policy), then sends the DELETE or the merge-patch UPDATE.
pub fn admission_cases(c: &Cluster, root: &Path) -> anyhow::Result<Vec<AdmissionResult>> {
    let text = std::fs::read_to_string(root.join("deploy/ci/admission-cases.yaml"))?;
    let doc: Value = serde_yaml::from_str(&text).context("parse admission-cases.yaml")?;
    let base = doc["base"].clone();
    let ns = base["metadata"]["namespace"].as_str().unwrap_or("arc-runners").to_string();
    let _ = c.kubectl_ok(&["create", "namespace", &ns]);
    let mut out = Vec::new();
    for (i, case) in doc["cases"].as_array().cloned().unwrap_or_default().iter().enumerate() {
        let name = format!("admission-case-{i}");
        let mut old = base.clone();
        if case["old"].is_object() {
            merge(&mut old, &case["old"]);
        }
        old["metadata"]["name"] = Value::String(name.clone());
        old["metadata"]["namespace"] = Value::String(ns.clone());
        let created = c.kubectl_stdin(&["create", "-f", "-"], &old.to_string());
        let expect = case["expect"].as_str().unwrap_or_default().to_string();
        let case_name = case["name"].as_str().unwrap_or_default().to_string();
        if let Err(e) = created {
            out.push(AdmissionResult {
                case: case_name,
                expect,
                got: "setup failed".into(),
                ok: false,
                detail: format!("{e:#}"),
            });
            continue;
        }
        let res = match case["operation"].as_str() {
            Some("DELETE") => c.kubectl_ok(&["-n", &ns, "delete", "autoscalingrunnerset", &name, "--wait=false"]),
            Some("UPDATE") => {
                let mut patch = case["new"].clone();
                // A merge patch's null removes; the case's null means the same.
                if patch.is_null() {
                    patch = Value::Object(Default::default());
                }
                c.kubectl_ok(&[
                    "-n",
                    &ns,
                    "patch",
                    "autoscalingrunnerset",
                    &name,
                    "--type=merge",
                    "-p",
                    &patch.to_string(),
                ])
            }
            other => Err(anyhow::anyhow!("unknown operation {other:?}")),
        };
        let (got, detail) = match &res {
            Ok(_) => ("allow".to_string(), String::new()),
            Err(e) => {
                let msg = format!("{e:#}");
                let denied = msg.contains("denied request") || msg.contains("ValidatingAdmissionPolicy");
                (if denied { "deny" } else { "error" }.to_string(), msg)
            }
        };
        let message_ok = case["message"].as_str().is_none_or(|m| got != "deny" || detail.contains(m));
        out.push(AdmissionResult { case: case_name, ok: got == expect && message_ok, expect, got, detail });
    }
    Ok(out)
}
