//! Where the lab finds its real peers: the binaries and plain files that `tests/peers/build.sh`
//! builds or downloads from their Go modules at pinned versions (nothing of them is in this
//! repository but the go.mod/go.sum files naming them).

use std::path::{Path, PathBuf};

/// Every binary the lab runs, as `tests/peers/build.sh` names it.
pub const BINARIES: [&str; 7] =
    ["etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "arc-manager", "arc-listener", "helm"];

/// Source trees of modules whose files (charts, CRDs) the lab reads, linked by the build script.
pub const SOURCES: [&str; 3] = ["arc-src", "cert-manager-src", "prometheus-operator-src"];

/// The ARC release the peers are built from (see tests/peers/README.md for why this one).
pub const ARC_VERSION: &str = "v0.27.6";

/// The lab's peers, all present.
#[derive(Clone, Debug)]
pub struct Peers {
    pub dir: PathBuf,
}

impl Peers {
    /// `$ARCFED_PEERS_DIR`, else `$XDG_CACHE_HOME/arcfed/peers`, else `~/.cache/arcfed/peers`:
    /// the same rule as `tests/peers/build.sh`.
    pub fn default_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("ARCFED_PEERS_DIR") {
            return PathBuf::from(d);
        }
        let cache = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
        cache.join("arcfed").join("peers")
    }

    /// The peers in [`Peers::default_dir`], or a message naming what is missing and how to get it.
    pub fn locate() -> Result<Peers, String> {
        Peers::at(&Peers::default_dir())
    }

    pub fn at(dir: &Path) -> Result<Peers, String> {
        let missing: Vec<&str> = BINARIES
            .iter()
            .copied()
            .filter(|b| !dir.join(b).is_file())
            .chain(SOURCES.iter().copied().filter(|s| !dir.join(s).is_dir()))
            .collect();
        if missing.is_empty() {
            return Ok(Peers { dir: dir.to_path_buf() });
        }
        let go = if which("go") { "" } else { " (Go >= 1.26 is not installed here: install it first)" };
        Err(format!(
            "the lab's peers are missing in {}: {}; build them with tests/peers/build.sh{go}",
            dir.display(),
            missing.join(", ")
        ))
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// ARC's module source at [`ARC_VERSION`] (its charts and CRDs).
    pub fn arc_src(&self) -> PathBuf {
        self.dir.join("arc-src")
    }

    /// ARC's CRDs, as its controller chart ships them.
    pub fn arc_crds(&self) -> PathBuf {
        self.arc_src().join("charts/gha-runner-scale-set-controller/crds")
    }

    /// ARC's scale-set chart.
    pub fn arc_scale_set_chart(&self) -> PathBuf {
        self.arc_src().join("charts/gha-runner-scale-set")
    }

    /// ARC's controller chart.
    pub fn arc_controller_chart(&self) -> PathBuf {
        self.arc_src().join("charts/gha-runner-scale-set-controller")
    }

    /// The third-party CRDs deploy/ uses (cert-manager, prometheus-operator), as files.
    pub fn operator_crds(&self) -> Vec<PathBuf> {
        let cm = self.dir.join("cert-manager-src/deploy/crds");
        let po = self.dir.join("prometheus-operator-src/example/prometheus-operator-crd");
        ["issuers", "clusterissuers", "certificates", "certificaterequests"]
            .iter()
            .map(|k| cm.join(format!("cert-manager.io_{k}.yaml")))
            .chain(
                ["servicemonitors", "podmonitors", "prometheusrules"]
                    .iter()
                    .map(|k| po.join(format!("monitoring.coreos.com_{k}.yaml"))),
            )
            .collect()
    }
}

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file())).unwrap_or(false)
}

/// What a lab test does without its peers: in CI (`CI` set) that is a failure; elsewhere the test
/// prints why it is skipped and returns `None`.
pub fn peers_or_skip(test: &str) -> Option<Peers> {
    match Peers::locate() {
        Ok(p) => Some(p),
        Err(why) if std::env::var_os("CI").is_some() => panic!("{test}: CI never skips the lab: {why}"),
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            None
        }
    }
}
