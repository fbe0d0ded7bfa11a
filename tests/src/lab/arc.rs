//! ARC in a lab cluster, installed the way users install it: ARC's controller chart rendered
//! with `helm` and applied with `kubectl` (its Deployment's pod then runs ARC's real controller
//! through the kubelet stand-in), and a scale set from ARC's `gha-runner-scale-set` chart with a
//! values file. In arcfed mode the values are deploy/arc/values (our `listenerTemplate`) and the
//! cluster gets deploy/arc/agent's overlay, as deploy/README.md says.

use crate::harness::{Certs, bin_path};
use crate::lab::cluster::{Cluster, run};
use crate::lab::install::repo_root;
use crate::lab::kubelet::Programs;
use crate::lab::peers::Peers;
use crate::lab::runner::EMULATOR_ENV;
use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// ARC's controller namespace and the scale sets' namespace (ARC's quickstart names).
pub const CONTROLLER_NS: &str = "arc-systems";
pub const RUNNERS_NS: &str = "arc-runners";
/// The GitHub-facing name of the lab's scale set, the same in every cluster.
pub const SCALE_SET: &str = "lab-runners";

/// Which local program each image of the lab's pods runs. ARC's listener pod uses the
/// controller's image with the listener's command, so the command is matched first.
pub fn programs(peers: &Peers, emulator_base: &str) -> Programs {
    Programs {
        rules: vec![
            ("github-runnerscaleset-listener".into(), peers.bin("arc-listener"), vec![], vec![]),
            ("arcfed-agent".into(), bin_path("arcfed-agent"), vec![], vec![]),
            (
                "actions-runner".into(),
                bin_path("arcfed-lab"),
                vec!["runner".into()],
                vec![(EMULATOR_ENV.into(), emulator_base.into())],
            ),
            ("gha-runner-scale-set-controller".into(), peers.bin("arc-manager"), vec![], vec![]),
        ],
    }
}

fn helm(peers: &Peers, c: &Cluster, work: &Path, args: &[&str]) -> anyhow::Result<String> {
    std::fs::create_dir_all(work)?;
    run(
        Command::new(peers.bin("helm"))
            .args(args)
            .env("KUBECONFIG", &c.kubeconfig)
            .env("HELM_CACHE_HOME", work.join(".helm/cache"))
            .env("HELM_CONFIG_HOME", work.join(".helm/config"))
            .env("HELM_DATA_HOME", work.join(".helm/data")),
        &format!("helm {}", args.join(" ")),
    )
}

/// cert-manager's and prometheus-operator's CRDs, as a cluster that runs them has them.
pub fn apply_operator_crds(peers: &Peers, c: &Cluster) -> anyhow::Result<()> {
    for crd in peers.operator_crds() {
        c.kubectl_ok(&["apply", "--server-side", "-f", &crd.display().to_string()])?;
    }
    Ok(())
}

/// ARC's four CRDs.
pub const ARC_CRDS: [&str; 4] = [
    "autoscalingrunnersets.actions.github.com",
    "autoscalinglisteners.actions.github.com",
    "ephemeralrunnersets.actions.github.com",
    "ephemeralrunners.actions.github.com",
];

/// ARC's controller chart (`gha-runner-scale-set-controller`, release `arc`) rendered and
/// applied in `arc-systems` (created), as `helm install --create-namespace` leaves it; waits
/// until ARC's CRDs are established.
pub async fn apply_controller_chart(peers: &Peers, c: &Cluster, work: &Path) -> anyhow::Result<()> {
    let chart = peers.arc_controller_chart().display().to_string();
    let rendered = helm(peers, c, work, &["template", "arc", &chart, "--namespace", CONTROLLER_NS, "--include-crds"])?;
    let file = work.join("arc-controller.yaml");
    std::fs::write(&file, rendered)?;
    let _ = c.kubectl_ok(&["create", "namespace", CONTROLLER_NS]);
    c.kubectl_ok(&["apply", "--server-side", "-n", CONTROLLER_NS, "-f", &file.display().to_string()])?;
    c.wait_crds(&ARC_CRDS).await
}

/// ARC's controller installed ([`apply_controller_chart`]) and its pod running (through the
/// kubelet stand-in).
pub async fn install_controller(peers: &Peers, c: &Cluster, work: &Path) -> anyhow::Result<()> {
    apply_controller_chart(peers, c, work).await?;
    c.wait_for(Duration::from_secs(90), "ARC's controller pod running", |c| {
        c.kubectl_ok(&[
            "-n",
            CONTROLLER_NS,
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/part-of=gha-rs-controller",
            "-o",
            "jsonpath={.items[*].status.phase}",
        ])
        .is_ok_and(|p| p.split_whitespace().any(|p| p == "Running"))
    })
    .await
}

/// The agent side of arcfed in this cluster (`deploy/arc/agent/overlays/<region>`, then the
/// settings the lab differs in): the agent certificate that cert-manager would mint, issued
/// by the federation CA (`certs`), and the coordinators' lab addresses.
pub fn install_agent_side(c: &Cluster, region: &str, coordinators: &[String], certs: &Certs) -> anyhow::Result<()> {
    let overlay = repo_root().join("deploy/arc/agent/overlays").join(region);
    if !overlay.is_dir() {
        bail!("no agent overlay for {region} in deploy/arc/agent/overlays");
    }
    c.kubectl_ok(&["apply", "-k", &overlay.display().to_string()])?;
    let tls = certs.agent(region)?;
    let s = |p: &PathBuf| p.display().to_string();
    // What cert-manager's Certificate arcfed-agent produces (no cert-manager runs here).
    let secret = c.kubectl_ok(&[
        "-n",
        CONTROLLER_NS,
        "create",
        "secret",
        "generic",
        "arcfed-agent-tls",
        &format!("--from-file=tls.crt={}", s(&tls.cert)),
        &format!("--from-file=tls.key={}", s(&tls.key)),
        &format!("--from-file=ca.crt={}", s(&tls.ca)),
        "--dry-run=client",
        "-o",
        "json",
    ])?;
    c.kubectl_stdin(&["apply", "-f", "-"], &secret)?;
    let patch = json!({"data": {"ARCFED_COORDINATOR": coordinators.join(","), "ARCFED_PROFILE": "lan"}});
    c.kubectl_ok(&[
        "-n",
        CONTROLLER_NS,
        "patch",
        "configmap",
        "arcfed-agent",
        "--type=merge",
        "-p",
        &patch.to_string(),
    ])?;
    Ok(())
}

/// The lab's own settings for a scale set: its GitHub, credentials and size.
#[derive(Clone, Debug)]
pub struct ScaleSetSettings {
    pub config_url: String,
    pub pat: String,
    pub max_runners: u32,
}

/// A scale set from ARC's chart (release `release` in `arc-runners`) with `values` files, then
/// the lab's own settings.
pub fn install_scale_set(
    peers: &Peers,
    c: &Cluster,
    work: &Path,
    release: &str,
    values: &[PathBuf],
    settings: &ScaleSetSettings,
) -> anyhow::Result<()> {
    let _ = c.kubectl_ok(&["create", "namespace", RUNNERS_NS]);
    let secret = c.kubectl_ok(&[
        "-n",
        RUNNERS_NS,
        "create",
        "secret",
        "generic",
        "arc-github",
        &format!("--from-literal=github_token={}", settings.pat),
        "--dry-run=client",
        "-o",
        "json",
    ])?;
    c.kubectl_stdin(&["apply", "-f", "-"], &secret)?;
    let lab: Value = json!({
        "githubConfigUrl": settings.config_url,
        "githubConfigSecret": "arc-github",
        "runnerScaleSetName": SCALE_SET,
        "minRunners": 0,
        "maxRunners": settings.max_runners,
    });
    std::fs::create_dir_all(work)?;
    let lab_file = work.join(format!("{release}-lab-values.yaml"));
    std::fs::write(&lab_file, lab.to_string())?;
    let chart = peers.arc_scale_set_chart().display().to_string();
    let mut args: Vec<String> = vec![
        "template".into(),
        release.into(),
        chart,
        "--namespace".into(),
        RUNNERS_NS.into(),
        // Lets the chart look up ARC's controller (service account) as `helm install` does.
        "--dry-run=server".into(),
    ];
    for v in values.iter().chain([&lab_file]) {
        args.push("-f".into());
        args.push(v.display().to_string());
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let rendered = helm(peers, c, work, &argv).context("render ARC's scale-set chart")?;
    let file = work.join(format!("{release}.yaml"));
    std::fs::write(&file, rendered)?;
    c.kubectl_ok(&["apply", "-n", RUNNERS_NS, "-f", &file.display().to_string()])?;
    Ok(())
}
