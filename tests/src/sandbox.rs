//! A local arcfed world: the emulated GitHub, a quorum of real voters and one real agent
//! per region, with a fault proxy on every link a drill may cut. The sandbox binary, the
//! drills and `tests/tests/drills.rs` all start this one world.
//!
//! ```text
//!            emulator (in-process, one scale set, steady workload)
//!              ▲            ▲            ▲        GitHub traffic: direct
//!   region a: agent ─┐ region b: agent ─┐ region c: agent ─┐
//!                    │ links (a FaultProxy per voter, leader first)
//!                    ▼                  ▼                  ▼
//!              voter 1 ◀──peer proxies──▶ voter 2 ◀──▶ voter 3
//!   region i owns voter i (mod the voter count): region-loss and partition-region cut both.
//! ```
//!
//! A [`Sampler`] reads the quorum's status every 200 ms and keeps the unsorted history that
//! the invariant checks read (tokens never decrease, Σ assignments ≤ Σ max).
//!
//! Known gap: an agent follows a follower's redirect to the leader's advertised address,
//! which bypasses its link proxies. The world therefore lists the leader's proxy first when
//! it starts an agent, and drills that cut an agent's link check [`Region::behind_link`]
//! (the agent's own endpoint metric) first (see `drill.rs`).

use crate::agent_client::TlsFiles;
use crate::agent_proc::{AgentProc, AgentSpec, GitHubSide, metric_value};
use crate::emulator::{
    CrossCredentialDelete, Cursor, Emulator, EmulatorConfig, EmulatorHandle, Mode as JobMode, PathClass,
    SessionTtlFrom, Workload,
};
use crate::fault_proxy::{FaultProxy, Mode};
use crate::harness::{Quorum, QuorumOptions};
use crate::netns::{Wan, WanOptions};
use anyhow::{Context, bail};
use arcfed_proto as pb;
use arcfed_proto::admin_service_client::AdminServiceClient;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// How long any one wait of a drill may take before it fails with what it saw.
pub const WAIT: Duration = Duration::from_secs(60);

/// What the world looks like.
#[derive(Clone, Debug)]
pub struct SandboxOptions {
    pub regions: Vec<String>,
    pub lease_ttl: String,
    /// The emulator's adversarial knob values (tests/EMULATOR.md). Drills always set it.
    pub adversarial: bool,
    /// One GitHub credential per region instead of one shared.
    pub per_region_credentials: bool,
    pub cross_credential_delete: CrossCredentialDelete,
    pub session_ttl: Duration,
    pub long_poll: Duration,
    /// Steady workload: jobs per minute (0 = none), each lasting `job_seconds` (uniform).
    pub jobs_per_minute: u32,
    pub job_seconds: (u32, u32),
    /// The agents' `--coordinator-lost-for` (quorum-loss needs it short).
    pub coordinator_lost_for: Option<String>,
    /// The agents' `--holder-stall` (holder-stall needs it short).
    pub holder_stall: Option<String>,
    /// GitHub's job mode: GHES (`JobAvailable`, then the holder acquires) makes
    /// `jobs_acquired_twice` and `acquire_repeats` mean something; dotcom assigns directly.
    pub job_mode: JobMode,
    /// Route each agent's coordinator traffic through its link proxies (needed by
    /// half-close-holder and partition-region); off = agents dial the voters directly.
    pub agent_links: bool,
    /// Route voter-to-voter traffic through fault proxies (partition-region needs them
    /// without `netns`).
    pub peer_proxies: bool,
    /// Real regions: one network namespace per region, joined by a WAN with this delay
    /// (`netns.rs`, root only). Partitions are then link cuts, not proxies.
    pub netns: Option<WanOptions>,
    /// `--profile` of the voters and agents (`lan` or `wan`); None = their default (lan).
    pub profile: Option<String>,
    /// partition-region: keep the partition this long from the fault (None: heal right
    /// after the takeover).
    pub hold: Option<Duration>,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            regions: vec!["a".into(), "b".into(), "c".into()],
            lease_ttl: "3s".into(),
            adversarial: true,
            per_region_credentials: false,
            cross_credential_delete: CrossCredentialDelete::Allow,
            session_ttl: Duration::from_secs(90),
            long_poll: Duration::from_secs(10),
            jobs_per_minute: 30,
            job_seconds: (5, 20),
            coordinator_lost_for: None,
            holder_stall: None,
            job_mode: JobMode::Ghes,
            agent_links: true,
            peer_proxies: true,
            netns: None,
            profile: None,
            hold: None,
        }
    }
}

/// One region: its agent (one ARC listener pod), the voter it hosts, and its agent's links.
pub struct Region {
    pub name: String,
    /// The voter that lives in this region.
    pub voter: u64,
    pub agent: AgentProc,
    /// voter id → the proxy this region's agent dials to reach it.
    pub links: BTreeMap<u64, FaultProxy>,
    /// Without `--netns`: the region's own path to GitHub (the agent resolves GitHub's host
    /// name to this proxy, on a loopback address of the region's own).
    pub github: Option<FaultProxy>,
    /// voter id → its address, when the agent dials voters directly (`agent_links` off).
    direct: Option<BTreeMap<u64, String>>,
    dir: PathBuf,
    spec: AgentSpec,
}

impl Region {
    /// Starts (or recreates, as a new pod would be) the agent, dialing `leader`'s link first.
    pub async fn respawn(&mut self, leader: Option<u64>) -> anyhow::Result<()> {
        self.agent.kill();
        self.agent = start_agent(&self.dir, spec_for(&self.spec, &self.links, self.direct.as_ref(), leader)).await?;
        Ok(())
    }

    /// Whether the agent's stream to `leader` runs through this region's link proxy (it does
    /// not after it followed a redirect to the leader's advertised address). Read from the
    /// agent's `arcfed_agent_coordinator_endpoint_info{endpoint}`: a proxy's open connections
    /// say nothing, since a channel keeps its idle connection after the stream moved on.
    pub async fn behind_link(&self, leader: u64) -> bool {
        let Some(p) = self.links.get(&leader) else { return false };
        let want = format!("arcfed_agent_coordinator_endpoint_info{{endpoint=\"{}\"}} 1", p.addr());
        self.agent.metrics().await.is_ok_and(|m| m.lines().any(|l| l.trim() == want))
    }

    /// Sets every link of this region's agent to `mode`.
    pub fn cut(&self, mode: Mode) {
        for p in self.links.values() {
            p.set_mode(mode.clone());
        }
    }

    /// Sets this region's path to GitHub to `mode` (loopback sandbox only).
    pub fn cut_github(&self, mode: Mode) -> anyhow::Result<()> {
        let p = self.github.as_ref().context("this sandbox has no GitHub proxy per region (--netns)")?;
        p.set_mode(mode);
        Ok(())
    }
}

/// One reading of the quorum's status (the first group).
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub leader: u64,
    pub holder: String,
    pub holder_cluster: String,
    pub token: u64,
    pub session_id: String,
    /// Σ assignments of the group, and Σ max_runners of its live, non-draining members.
    pub assigned: i64,
    pub max_live: i64,
    /// (cluster, status, assigned runners, busy) per member.
    pub members: Vec<(String, String, i64, i64)>,
    /// The group's last acked message id (the newest accepted Progress).
    pub last_acked: i64,
}

impl Sample {
    fn from(s: &pb::StatusResponse) -> Option<Sample> {
        let g = s.groups.first()?;
        let members = s
            .members
            .iter()
            .filter(|m| m.group == g.key)
            .map(|m| {
                let n = g.assignments.iter().find(|a| a.member == m.id).map(|a| a.runners).unwrap_or(0);
                (m.cluster.clone(), m.status.clone(), n, m.busy)
            })
            .collect();
        Some(Sample {
            at: Instant::now(),
            leader: s.leader,
            holder: g.holder.clone(),
            holder_cluster: g.holder_cluster.clone(),
            token: g.token,
            session_id: g.session_id.clone(),
            last_acked: g.last_acked_message_id,
            assigned: g.assignments.iter().map(|a| a.runners).sum(),
            max_live: s
                .members
                .iter()
                .filter(|m| m.group == g.key && m.status == "live" && !m.draining)
                .map(|m| m.max_runners)
                .sum(),
            members,
        })
    }
}

/// Reads the quorum's status every 200 ms into an append-only history.
pub struct Sampler {
    history: Arc<Mutex<Vec<Sample>>>,
    task: JoinHandle<()>,
}

impl Sampler {
    fn start(admin: TlsFiles, endpoints: Vec<String>) -> Sampler {
        let history = Arc::new(Mutex::new(Vec::new()));
        let h = history.clone();
        let task = tokio::spawn(async move {
            let clients: Vec<Option<AdminServiceClient<tonic::transport::Channel>>> =
                endpoints.iter().map(|e| admin.channel(e).ok().map(AdminServiceClient::new)).collect();
            loop {
                for c in clients.iter().flatten() {
                    let mut c = c.clone();
                    let r = tokio::time::timeout(Duration::from_secs(1), c.status(pb::StatusRequest {})).await;
                    if let Ok(Ok(s)) = r
                        && in_contact(s.get_ref())
                    {
                        if let Some(x) = Sample::from(s.get_ref()) {
                            h.lock().expect("sampler history").push(x);
                        }
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Sampler { history, task }
    }

    /// The history so far, in the order it was read (never sorted).
    pub fn history(&self) -> Vec<Sample> {
        self.history.lock().expect("sampler history").clone()
    }

    pub fn latest(&self) -> Option<Sample> {
        self.history.lock().expect("sampler history").last().cloned()
    }

    /// Fails if the sampling loop has died (its history would silently stop growing).
    pub fn check(&self) -> anyhow::Result<()> {
        if self.task.is_finished() {
            bail!("the status sampler stopped");
        }
        Ok(())
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The running world. Dropping it stops every process it started.
pub struct Sandbox {
    pub opts: SandboxOptions,
    pub dir: PathBuf,
    pub emu: EmulatorHandle,
    /// Where the emulator listens (its advertised URL names [`GITHUB_HOST`] without `--netns`).
    pub github_addr: std::net::SocketAddr,
    pub set: i64,
    pub q: Quorum,
    pub regions: Vec<Region>,
    pub sampler: Sampler,
    /// The namespaces and WAN of `--netns` (dropped last, after every process).
    pub wan: Option<Wan>,
}

impl Sandbox {
    /// Starts everything under `dir` and waits until every region is live and one holds.
    pub async fn start(dir: &Path, opts: SandboxOptions) -> anyhow::Result<Sandbox> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        if opts.regions.len() < 2 {
            bail!("--regions needs at least two regions");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let mut ecfg = EmulatorConfig::default();
        ecfg.settings.long_poll = opts.long_poll;
        ecfg.settings.mode = opts.job_mode;
        ecfg.settings.session_ttl = opts.session_ttl;
        ecfg.settings.cross_credential_delete = opts.cross_credential_delete;
        if opts.per_region_credentials {
            ecfg.pats = opts.regions.iter().map(|r| format!("pat-{r}")).collect();
        }
        if opts.adversarial {
            ecfg.settings.queue_token_survives_session_delete = true;
            ecfg.settings.session_ttl_from = SessionTtlFrom::Creation;
            ecfg.settings.cursor = Cursor::PerScaleSet;
        }
        let wan = match opts.netns {
            Some(w) => {
                if opts.regions.len() < 3 {
                    bail!("--netns needs at least three regions (each hosts one of the three voters)");
                }
                Some(Wan::create(&opts.regions, w)?)
            }
            None => None,
        };
        // With regions in namespaces GitHub listens on its own address, reached by each region
        // over its own link.
        let listener = match &wan {
            Some(w) => {
                let l = tokio::net::TcpListener::bind((w.github_ip, 0)).await?;
                ecfg.advertise_url = Some(format!("http://{}", l.local_addr()?));
                l
            }
            // Without namespaces each region reaches GitHub through a proxy of its own, on its
            // own loopback address and GitHub's port: the agents resolve GitHub's host name to it.
            None => {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                ecfg.advertise_url = Some(format!("http://{GITHUB_HOST}:{}", l.local_addr()?.port()));
                l
            }
        };
        let github_addr = listener.local_addr()?;
        let emu = Emulator::start(ecfg, listener).await?;
        let set = emu.create_scale_set("arcfed-sandbox", 1).map_err(|e| anyhow::anyhow!("create scale set: {e:?}"))?.id;

        let ttl: &'static str = Box::leak(opts.lease_ttl.clone().into_boxed_str());
        let q = Quorum::start(
            dir,
            QuorumOptions {
                lease_ttl: ttl,
                peer_proxies: opts.peer_proxies && wan.is_none(),
                placement: wan
                    .as_ref()
                    .map(|w| w.regions.iter().map(|r| (r.ns.clone(), r.ip)).collect())
                    .unwrap_or_default(),
                cert_ips: wan.as_ref().map(|w| vec![w.root_ip]).unwrap_or_default(),
                extra_args: opts
                    .profile
                    .iter()
                    .flat_map(|p| ["--profile".to_string(), p.clone()])
                    // The voters' timing-rule check then knows the real round trip between
                    // regions, and refuses a profile that cannot fit it.
                    .chain(
                        opts.netns
                            .iter()
                            .flat_map(|w| ["--rtt".to_string(), format!("{}ms", 2 * w.delay.as_millis().max(1))]),
                    )
                    .collect(),
                ..QuorumOptions::default()
            },
        )
        .await?;
        let s = q.wait_serving(WAIT).await.with_context(|| {
            let last: Vec<String> = q
                .voters
                .iter()
                .map(|v| format!("voter {}: {}", v.id, v.log_text().lines().last().unwrap_or("(no log)")))
                .collect();
            format!("quorum did not start; logs in {}\n{}", dir.display(), last.join("\n"))
        })?;
        let mut regions = Vec::new();
        for (i, name) in opts.regions.iter().enumerate() {
            let mut links = BTreeMap::new();
            for v in &q.voters {
                let p = match &wan {
                    Some(w) => FaultProxy::start_on(w.root_ip, v.grpc).await?,
                    None => FaultProxy::start(v.grpc).await?,
                };
                links.insert(v.id, p);
            }
            let pat = if opts.per_region_credentials { format!("pat-{name}") } else { emu.pat().to_string() };
            let github = match &wan {
                Some(_) => None,
                None => {
                    let at = std::net::SocketAddr::from(([127, 0, 0, 11 + i as u8], github_addr.port()));
                    Some(FaultProxy::start_at(at, github_addr).await.with_context(|| {
                        format!("region {name}'s GitHub proxy on {at} (GitHub's port on another loopback address)")
                    })?)
                }
            };
            let resolve =
                github.iter().map(|p| format!("{GITHUB_HOST}:{}:{}", github_addr.port(), p.addr().ip())).collect();
            let gh = GitHubSide { config_url: emu.config_url(), pat, scale_set_id: set, resolve };
            let mut spec = AgentSpec::new(name, gh).federated(vec![], q.certs.agent(name)?);
            spec.lease_ttl = Some(opts.lease_ttl.clone());
            spec.coordinator_lost_for = opts.coordinator_lost_for.clone();
            spec.holder_stall = opts.holder_stall.clone();
            spec.netns = wan.as_ref().and_then(|w| w.region(name)).map(|r| (r.ns.clone(), r.ip));
            if let Some(p) = &opts.profile {
                spec.extra.extend(["--profile".to_string(), p.clone()]);
            }
            let rdir = dir.join(format!("region-{name}"));
            let voter = q.voters[i % q.voters.len()].id;
            let direct = (!opts.agent_links).then(|| q.voters.iter().map(|v| (v.id, v.addr())).collect());
            let agent = start_agent(&rdir, spec_for(&spec, &links, direct.as_ref(), Some(s.leader))).await?;
            regions.push(Region { name: name.clone(), voter, agent, links, github, direct, dir: rdir, spec });
        }
        let sampler = Sampler::start(q.admin.clone(), q.endpoints());
        let sb = Sandbox { opts, dir: dir.to_path_buf(), emu, github_addr, set, q, regions, sampler, wan };
        sb.set_workload(sb.opts.jobs_per_minute).await?;
        sb.wait_settled().await.with_context(|| format!("the sandbox did not settle; logs in {}", dir.display()))?;
        Ok(sb)
    }

    /// Starts (or stops, with 0) the emulator's steady job generator.
    pub async fn set_workload(&self, jobs_per_minute: u32) -> anyhow::Result<()> {
        let (lo, hi) = self.opts.job_seconds;
        let w = Workload::new(self.set, f64::from(jobs_per_minute), f64::from(lo), f64::from(hi));
        let url = format!("http://{}/_emulator/workload", self.github_addr);
        let r = reqwest::Client::new().post(url).json(&w).send().await?;
        if !r.status().is_success() {
            bail!("emulator workload: {}", r.status());
        }
        Ok(())
    }

    pub fn region(&mut self, name: &str) -> anyhow::Result<&mut Region> {
        self.regions.iter_mut().find(|r| r.name == name).with_context(|| format!("no region {name}"))
    }

    pub fn region_index(&self, name: &str) -> Option<usize> {
        self.regions.iter().position(|r| r.name == name)
    }

    /// Status from a voter that serves it *and* has heard from a quorum lately: an isolated
    /// old leader keeps answering Status with a stale view (openraft does not step it down).
    pub async fn status(&self) -> anyhow::Result<pb::StatusResponse> {
        let mut last = String::from("no voter running");
        for v in self.q.voters.iter().filter(|v| v.running()) {
            match self.q.status_at(&v.addr()).await {
                Ok(s) if in_contact(&s) => return Ok(s),
                Ok(s) => last = format!("voter {} has no quorum contact ({} ms)", v.id, s.quorum_contact_age_ms),
                Err(e) => last = e.to_string(),
            }
        }
        bail!("no voter in contact with a quorum served status: {last}")
    }

    /// Waits until [`Sandbox::status`] satisfies `cond`.
    pub async fn wait_status(
        &self,
        what: &str,
        cond: impl Fn(&pb::StatusResponse) -> bool,
    ) -> anyhow::Result<pb::StatusResponse> {
        let end = Instant::now() + WAIT;
        loop {
            let last = match self.status().await {
                Ok(s) if cond(&s) => return Ok(s),
                Ok(s) => format!("{s:?}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() > end {
                bail!("timed out after {WAIT:?} waiting for {what}; last: {last}\n{}", self.agent_logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every region has a live member, one holds, every running voter knows the leader, and the
    /// holder's session polls. Returns (status, holder's session id).
    pub async fn wait_settled(&self) -> anyhow::Result<(pb::StatusResponse, String)> {
        let names: Vec<String> = self.regions.iter().map(|r| r.name.clone()).collect();
        let s = self
            .wait_status("every region live and a holder", |s| {
                names.iter().all(|n| s.members.iter().any(|m| &m.cluster == n && m.status == "live"))
                    && s.groups.first().is_some_and(|g| !g.holder.is_empty())
            })
            .await?;
        for v in self.q.voters.iter().filter(|v| v.running()) {
            let end = Instant::now() + WAIT;
            // The leader answers; a follower that knows it answers UNAVAILABLE naming it.
            while !match self.q.status_at(&v.addr()).await {
                Ok(_) => true,
                Err(st) => arcfed_proto::leader::leader_hint(&st).is_some(),
            } {
                if Instant::now() > end {
                    bail!("voter {} does not know a leader", v.id);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let (token, known) = (s.groups[0].token, s.groups[0].session_id.clone());
        let (sid, _, _) = self.wait_session_or(token, &known, 0).await?;
        Ok((s, sid))
    }

    /// Waits for a session of the holder with `token` (owner ends in `/t<token>`) that polls
    /// after `after` (emulator clock); returns (session id, opened_at, first poll after `after`).
    pub async fn wait_session(&self, token: u64, after: u64) -> anyhow::Result<(String, u64, u64)> {
        self.wait_session_or(token, "", after).await
    }

    /// [`Sandbox::wait_session`], also accepting the session `known` by id: a session opened in
    /// fallback (owner `…/f<n>`) that the quorum adopted under `token`.
    pub async fn wait_session_or(&self, token: u64, known: &str, after: u64) -> anyhow::Result<(String, u64, u64)> {
        let end = Instant::now() + WAIT;
        let suffix = format!("/t{token}");
        loop {
            let rep = self.emu.report();
            let ids: Vec<(String, u64)> = rep
                .scale_set(self.set)
                .map(|x| {
                    x.sessions
                        .iter()
                        .filter(|s| s.owner.ends_with(&suffix) || (!known.is_empty() && s.session_id == known))
                        .map(|s| (s.session_id.clone(), s.opened_at))
                        .collect()
                })
                .unwrap_or_default();
            if !ids.is_empty() {
                let poll = self
                    .emu
                    .timeline()
                    .iter()
                    .filter(|e| e.class == PathClass::Poll && e.at_ms >= after && e.status != 0)
                    .find_map(|e| {
                        let sid = e.session_id.as_deref()?;
                        ids.iter().find(|(id, _)| id == sid).map(|(id, opened)| (id.clone(), *opened, e.at_ms))
                    });
                if let Some(p) = poll {
                    return Ok(p);
                }
            }
            if Instant::now() > end {
                bail!("no polling GitHub session for token {token} within {WAIT:?}\n{}", self.agent_logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of every agent's log, for error messages.
    pub fn agent_logs(&self) -> String {
        self.regions
            .iter()
            .map(|r| {
                let l = r.agent.log_text();
                let tail: Vec<&str> = l.lines().rev().take(12).collect();
                format!("--- agent {}\n{}", r.name, tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The coordinator's replicated stale-token rejection counter (the leader's /metrics).
    pub async fn stale_token_rejections(&self) -> Option<u64> {
        self.leader_counter("arcfed_replicated_stale_token_rejections").await
    }

    /// A counter from the current leader's /metrics.
    pub async fn leader_counter(&self, name: &str) -> Option<u64> {
        let leader = self.status().await.ok()?.leader;
        let http = self.q.voters.iter().find(|v| v.id == leader)?.http;
        let body = reqwest::get(format!("http://{http}/metrics")).await.ok()?.text().await.ok()?;
        let prefix = format!("{name} ");
        body.lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
    }

    /// The live view (one screen): holder, token, session, runners per region, jobs, and the
    /// last failover as GitHub saw it (the predecessor's last request → the successor's first).
    pub async fn live_view(&self) -> String {
        let mut o = String::new();
        match self.sampler.latest() {
            Some(s) => {
                let holder = if s.holder.is_empty() {
                    "(none)".to_string()
                } else {
                    format!("{} ({:.8})", s.holder_cluster, s.holder)
                };
                o.push_str(&format!(
                    "leader voter {}   holder {holder}   token {}   session {:.8}\n",
                    s.leader, s.token, s.session_id
                ));
                o.push_str(&format!("  {:<10} {:<8} {:>8} {:>6}\n", "region", "status", "runners", "busy"));
                for r in &self.regions {
                    let m = s.members.iter().rev().find(|m| m.0 == r.name && m.1 == "live");
                    let m = m.or_else(|| s.members.iter().rev().find(|m| m.0 == r.name));
                    let (st, n, busy) = m.map(|m| (m.1.as_str(), m.2, m.3)).unwrap_or(("absent", 0, 0));
                    let ind = if s.holder_cluster == r.name { " ◀ holder" } else { "" };
                    o.push_str(&format!("  {:<10} {:<8} {:>8} {:>6}{ind}\n", r.name, st, n, busy));
                }
                o.push_str(&format!("  Σ runners {} ≤ Σ max {}\n", s.assigned, s.max_live));
            }
            None => o.push_str("quorum: no status yet\n"),
        }
        let rep = self.emu.report();
        if let Some(ss) = rep.scale_set(self.set) {
            let running = ss.statistics.total_running_jobs.max(0) as u64;
            let queued = ss.jobs_enqueued.saturating_sub(ss.jobs_completed).saturating_sub(running);
            o.push_str(&format!(
                "jobs: queued {queued}  running {running}  done {}   sessions {}  409s {}\n",
                ss.jobs_completed,
                ss.sessions.len(),
                ss.conflicts_409
            ));
            if let [.., a, b] = ss.sessions.as_slice() {
                let gap = b.first_holder_request_at.saturating_sub(a.last_holder_request_at);
                let who = |o: &str| o.split('/').nth(1).unwrap_or("?").to_string();
                o.push_str(&format!(
                    "last failover: {} → {} at {:.1}s, GitHub idle for {gap} ms\n",
                    who(&a.owner),
                    who(&b.owner),
                    b.opened_at as f64 / 1000.0
                ));
            }
        }
        o
    }

    /// Stops every process and the emulator.
    pub async fn shutdown(self) {
        let Sandbox { emu, q, regions, sampler, wan, .. } = self;
        drop(sampler);
        drop(regions);
        drop(q);
        emu.shutdown().await;
        drop(wan);
    }
}

/// Starts an agent and waits until its admin port answers. The admin port is picked free and
/// released before the agent binds it, so another process may take it meanwhile: the agent
/// then exits at once with a configuration error, and it is started again on another port.
async fn start_agent(dir: &Path, spec: AgentSpec) -> anyhow::Result<AgentProc> {
    let mut last = String::new();
    for _ in 0..5 {
        let mut a = AgentProc::start(dir, spec.clone())?;
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end && a.running() {
            if a.metrics().await.is_ok() {
                return Ok(a);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        last = a.log_text().lines().rev().take(3).collect::<Vec<_>>().join(" | ");
    }
    bail!("agent {} did not start: {last}", spec.cluster)
}

/// `spec` dialing the region's links, `leader`'s first (so a fresh agent attaches to the
/// leader through its proxy instead of being redirected past it).
/// GitHub's host name in the loopback sandbox (a GHES host; each region resolves it to its own proxy).
pub const GITHUB_HOST: &str = "ghes.localhost";

fn spec_for(
    spec: &AgentSpec,
    links: &BTreeMap<u64, FaultProxy>,
    direct: Option<&BTreeMap<u64, String>>,
    leader: Option<u64>,
) -> AgentSpec {
    let mut ids: Vec<u64> = links.keys().copied().collect();
    ids.sort_by_key(|id| (Some(*id) != leader, *id));
    let mut spec = spec.clone();
    spec.coordinators = ids
        .iter()
        .map(|id| match direct {
            Some(d) => d[id].clone(),
            None => links[id].addr().to_string(),
        })
        .collect();
    spec
}

/// Whether a served status comes from a leader that has heard from a quorum within 1 s
/// (heartbeats are far more frequent; an isolated leader's age only grows).
fn in_contact(s: &pb::StatusResponse) -> bool {
    (0..=1000).contains(&s.quorum_contact_age_ms)
}

/// Whether `agent` says it holds (`arcfed_agent_is_holder`).
pub async fn is_holder(agent: &AgentProc) -> bool {
    agent.metric("arcfed_agent_is_holder").await == Some(1.0)
}

/// Waits until the agent is a connected standby (it neither holds nor is in fallback).
pub async fn wait_standby(agent: &AgentProc) -> anyhow::Result<()> {
    agent
        .wait_metric("a connected standby", WAIT, |m| {
            metric_value(m, "arcfed_agent_is_holder") == Some(0.0)
                && metric_value(m, "arcfed_agent_coordinator_connected") == Some(1.0)
        })
        .await
        .map(|_| ())
}
