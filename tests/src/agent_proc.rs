//! Real `arcfed-agent` processes for process tests, drills and the sandbox.
//!
//! One [`AgentProc`] is one agent process (one ARC listener pod): spawned with the flags a
//! platform team would give it, its stderr in a log file, its admin port on a free
//! 127.0.0.1 port. Faults are the real ones: SIGKILL, SIGSTOP/SIGCONT, SIGTERM.

use crate::agent_client::TlsFiles;
use crate::harness::{Proc, free_port};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where an agent's GitHub is, and as whom it talks to it.
#[derive(Clone, Debug)]
pub struct GitHubSide {
    pub config_url: String,
    pub pat: String,
    pub scale_set_id: i64,
    /// `--github-resolve HOST:PORT:ADDR` entries (the emulator's github.com layout).
    pub resolve: Vec<String>,
}

/// How to start one agent.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    /// The cluster (region) name; also names the ERS (`<scale set>-<cluster>`).
    pub cluster: String,
    pub github: GitHubSide,
    /// Coordinator endpoints; empty = standalone.
    pub coordinators: Vec<String>,
    pub tls: Option<TlsFiles>,
    pub min_runners: i64,
    pub max_runners: i64,
    pub weight: i64,
    pub lease_ttl: Option<String>,
    pub coordinator_lost_for: Option<String>,
    pub holder_stall: Option<String>,
    pub extra: Vec<String>,
    /// Run in this network namespace, with the admin port on `.1` (`--netns` regions).
    pub netns: Option<(String, std::net::Ipv4Addr)>,
}

impl AgentSpec {
    pub fn new(cluster: &str, github: GitHubSide) -> AgentSpec {
        AgentSpec {
            cluster: cluster.into(),
            github,
            coordinators: vec![],
            tls: None,
            min_runners: 0,
            max_runners: 10,
            weight: 1,
            lease_ttl: None,
            coordinator_lost_for: None,
            holder_stall: None,
            extra: vec![],
            netns: None,
        }
    }

    pub fn federated(mut self, endpoints: Vec<String>, tls: TlsFiles) -> AgentSpec {
        self.coordinators = endpoints;
        self.tls = Some(tls);
        self
    }

    pub fn ers_name(&self) -> String {
        format!("arcfed-set-{}", self.cluster)
    }
}

pub struct AgentProc {
    pub spec: AgentSpec,
    pub admin: SocketAddr,
    pub log: PathBuf,
    pub state_file: PathBuf,
    proc: Proc,
}

impl AgentProc {
    /// Starts an agent whose files (log, simulated ERS) live in `dir`.
    pub fn start(dir: &Path, spec: AgentSpec) -> anyhow::Result<AgentProc> {
        std::fs::create_dir_all(dir)?;
        let ip = spec.netns.as_ref().map_or(std::net::Ipv4Addr::LOCALHOST, |(_, ip)| *ip);
        let admin = SocketAddr::from((ip, free_port()));
        let state_file = dir.join(format!("ers-{}.json", spec.cluster));
        let mut args: Vec<String> = vec![
            "--cluster".into(),
            spec.cluster.clone(),
            "--github-config-url".into(),
            spec.github.config_url.clone(),
            "--github-token".into(),
            spec.github.pat.clone(),
            "--scale-set-id".into(),
            spec.github.scale_set_id.to_string(),
            "--scale-set-name".into(),
            "arcfed-set".into(),
            "--ers-namespace".into(),
            "arc-runners".into(),
            "--ers-name".into(),
            spec.ers_name(),
            "--min-runners".into(),
            spec.min_runners.to_string(),
            "--max-runners".into(),
            spec.max_runners.to_string(),
            "--weight".into(),
            spec.weight.to_string(),
            "--runner-backend".into(),
            "sim".into(),
            "--sim-state-file".into(),
            state_file.display().to_string(),
            "--admin-listen".into(),
            admin.to_string(),
        ];
        for c in &spec.coordinators {
            args.push("--coordinator".into());
            args.push(c.clone());
        }
        if let Some(t) = &spec.tls {
            for (flag, p) in [("--tls-cert", &t.cert), ("--tls-key", &t.key), ("--tls-ca", &t.ca)] {
                args.push(flag.into());
                args.push(p.display().to_string());
            }
        }
        for r in &spec.github.resolve {
            args.push("--github-resolve".into());
            args.push(r.clone());
        }
        for (flag, v) in [
            ("--lease-ttl", &spec.lease_ttl),
            ("--coordinator-lost-for", &spec.coordinator_lost_for),
            ("--holder-stall", &spec.holder_stall),
        ] {
            if let Some(v) = v {
                args.push(flag.into());
                args.push(v.clone());
            }
        }
        args.extend(spec.extra.iter().cloned());
        let log = dir.join(format!("agent-{}.log", spec.cluster));
        let env = vec![
            ("ARCFED_LOG_LEVEL".into(), std::env::var("ARCFED_TEST_LOG").unwrap_or_else(|_| "info".into())),
            ("ARCFED_CONFIG_ERROR_DELAY".into(), "0s".into()),
        ];
        let mut proc = Proc::new("arcfed-agent", args, env, log.clone());
        proc.netns = spec.netns.as_ref().map(|(ns, _)| ns.clone());
        proc.spawn()?;
        Ok(AgentProc { spec, admin, log, state_file, proc })
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// SIGKILL and reap, as a node loss or an OOM kill would.
    pub fn kill(&mut self) {
        self.proc.kill()
    }

    /// SIGTERM, as Kubernetes does on pod deletion; waits up to `within`; the exit code.
    pub fn terminate(&mut self, within: Duration) -> Option<i32> {
        self.proc.terminate(within)
    }

    pub fn freeze(&self) {
        self.proc.freeze()
    }

    pub fn thaw(&self) {
        self.proc.thaw()
    }

    /// Starts the same agent again (a recreated pod: a new process, a new member id).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.restart()
    }

    pub fn running(&mut self) -> bool {
        self.proc.running()
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// The agent's `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        // reqwest is built without a provider; the agent's own main installs ring the same way.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        Ok(http.get(format!("http://{}/metrics", self.admin)).send().await?.text().await?)
    }

    /// One sample of a metric without labels (or the first with), if exported.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = self.metrics().await.ok()?;
        metric_value(&text, name)
    }

    /// Waits until `cond` holds on the agent's metrics, or fails with its log tail.
    pub async fn wait_metric(
        &self,
        what: &str,
        deadline: Duration,
        cond: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let end = Instant::now() + deadline;
        loop {
            if let Ok(t) = self.metrics().await
                && cond(&t)
            {
                return Ok(t);
            }
            if Instant::now() > end {
                let log = self.log_text();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                anyhow::bail!(
                    "agent {}: timed out after {deadline:?} waiting for {what}; log tail:\n{}",
                    self.spec.cluster,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The value of `name` in a Prometheus text exposition (the first sample whose name matches
/// exactly, with or without labels).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        let base = key.split('{').next()?;
        (base == name).then(|| value.parse().ok()).flatten()
    })
}
