//! arcfed-sandbox: a local arcfed world started by one command.
//!
//! It mints certificates, starts the actions-emulator (in-process) with one scale set,
//! three `arcfed-coordinator` voters (real processes), and one region per `--regions`
//! entry, each running a real `arcfed-agent` process (the ARC listener drop-in) with the
//! `sim` runner backend, joined to the scale set's group. Then it prints the quorum's status
//! until Ctrl-C, or runs a drill and prints its JSON report.
//!
//! Whichever region holds the lease revokes stale sessions, opens the GitHub session, polls,
//! reports and acks; every region patches its simulated EphemeralRunnerSet, whose runners take
//! the emulator's jobs. Drill reports take their GitHub-side fields from the emulator's
//! timeline.
use anyhow::{Context, bail};
use arcfed_tests::agent_proc::{AgentProc, AgentSpec, GitHubSide};
use arcfed_tests::emulator::{Cursor, Emulator, EmulatorConfig, EmulatorHandle, PathClass, SessionTtlFrom};
use arcfed_tests::harness::{Quorum, QuorumOptions, bin_path};
use clap::{Parser, ValueEnum};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Credentials {
    Shared,
    PerRegion,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Drill {
    /// SIGKILL the holder's agent process; measure until another region holds and polls.
    KillHolder,
    /// SIGKILL the Raft leader; check that no holder changes and every region is served again.
    KillLeader,
    /// `arcfedctl handover` to another region; the holder releases; measure until the target holds.
    Handover,
}

/// arcfed-sandbox: a local quorum, regions and an emulated GitHub, in one command.
#[derive(Parser, Debug)]
#[command(name = "arcfed-sandbox", version, about, long_about)]
struct Args {
    /// Working directory for certificates, data dirs and logs (default: a new temp dir, kept).
    #[arg(long, env = "ARCFED_SANDBOX_DIR")]
    dir: Option<PathBuf>,
    /// Regions (clusters), one agent each.
    #[arg(long, env = "ARCFED_SANDBOX_REGIONS", value_delimiter = ',', default_value = "a,b,c")]
    regions: Vec<String>,
    /// Lease TTL of the quorum.
    #[arg(long, env = "ARCFED_SANDBOX_LEASE_TTL", default_value = "3s")]
    lease_ttl: String,
    /// Run a drill instead of printing status until Ctrl-C.
    #[arg(long, env = "ARCFED_SANDBOX_DRILL", value_enum)]
    drill: Option<Drill>,
    /// Drill repetitions.
    #[arg(long, env = "ARCFED_SANDBOX_RUNS", default_value = "3")]
    runs: usize,
    /// Print the drill report as one JSON object (DESIGN §11 shape).
    #[arg(long, env = "ARCFED_SANDBOX_JSON")]
    json: bool,
    /// Stop after this long instead of waiting for Ctrl-C (0 = run until Ctrl-C).
    #[arg(long, env = "ARCFED_SANDBOX_DURATION", value_parser = humantime::parse_duration, default_value = "0s")]
    duration: Duration,
    /// Run the emulator with the adversarial values of the undocumented knobs (a deleted
    /// session's queue token keeps working, the abandoned-session TTL counts from creation,
    /// the message cursor is per scale set, any credential may delete any session; see
    /// tests/EMULATOR.md). Drills always use them.
    #[arg(long, env = "ARCFED_SANDBOX_ADVERSARIAL")]
    adversarial: bool,
    /// GitHub credentials of the regions: `shared` (one GitHub App / PAT for every cluster,
    /// the usual setup) or `per-region` (each region its own). With `per-region` and
    /// `--cross-credential-delete deny`, a successor cannot revoke its predecessor's session
    /// and waits for GitHub's abandoned-session TTL.
    #[arg(long, env = "ARCFED_SANDBOX_CREDENTIALS", value_enum, default_value = "shared")]
    credentials: Credentials,
    /// Whether GitHub lets one credential delete another credential's session (undocumented):
    /// `allow` (the emulator's adversarial value: a zombie could kill its successor's
    /// session) or `deny` (a successor cannot revoke a predecessor of another credential).
    #[arg(long, env = "ARCFED_SANDBOX_CROSS_CREDENTIAL_DELETE", value_enum, default_value = "allow")]
    cross_credential_delete: arcfed_tests::emulator::CrossCredentialDelete,
    /// The emulator's abandoned-session TTL (GitHub's is about 90 s).
    #[arg(long, env = "ARCFED_SANDBOX_SESSION_TTL", value_parser = humantime::parse_duration, default_value = "90s")]
    session_ttl: Duration,
    /// Jobs enqueued per minute on the emulated scale set (0 = none).
    #[arg(long, env = "ARCFED_SANDBOX_JOBS_PER_MINUTE", default_value = "30")]
    jobs_per_minute: u32,
    /// How often to print the status table.
    #[arg(long, env = "ARCFED_SANDBOX_EVERY", value_parser = humantime::parse_duration, default_value = "5s")]
    every: Duration,
}

fn log(json: bool, msg: impl AsRef<str>) {
    if json {
        eprintln!("{}", msg.as_ref());
    } else {
        println!("{}", msg.as_ref());
    }
}

/// `cargo run -p arcfed-tests --bin arcfed-sandbox` builds only this package; build the
/// coordinator binaries it starts too (a no-op when they are fresh).
fn ensure_binaries() -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let release = exe.components().any(|c| c.as_os_str() == "release");
    if let Ok(cargo) = std::env::var("CARGO") {
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "-q", "-p", "arcfed-coordinator", "-p", "arcfed-agent", "--bins"]);
        if release {
            cmd.arg("--release");
        }
        let st = cmd.status().context("cargo build -p arcfed-coordinator")?;
        if !st.success() {
            bail!("building arcfed-coordinator and arcfed-agent failed");
        }
    }
    for b in ["arcfed-coordinator", "arcfedctl", "arcfed-agent"] {
        if !bin_path(b).exists() {
            bail!("{} not found: run `cargo build --workspace` first (or set ARCFED_BIN_DIR)", bin_path(b).display());
        }
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    if args.regions.len() < 2 {
        bail!("--regions needs at least two regions");
    }
    ensure_binaries()?;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("--dir {}", d.display()))?;
            d.clone()
        }
        None => tempfile::Builder::new().prefix("arcfed-sandbox-").tempdir()?.keep(),
    };
    let json = args.json;

    // Emulated GitHub with one scale set.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mut ecfg = EmulatorConfig::default();
    ecfg.settings.long_poll = Duration::from_secs(10);
    ecfg.settings.session_ttl = args.session_ttl;
    if args.credentials == Credentials::PerRegion {
        ecfg.pats = args.regions.iter().map(|r| format!("pat-{r}")).collect();
    }
    ecfg.settings.cross_credential_delete = args.cross_credential_delete;
    if args.adversarial || args.drill.is_some() {
        ecfg.settings.queue_token_survives_session_delete = true;
        ecfg.settings.session_ttl_from = SessionTtlFrom::Creation;
        ecfg.settings.cursor = Cursor::PerScaleSet;
    }
    let emu = Emulator::start(ecfg, listener).await?;
    let set = emu.create_scale_set("arcfed-sandbox", 1).map_err(|e| anyhow::anyhow!("create scale set: {e:?}"))?;
    let config_url = emu.config_url();

    // The quorum.
    let ttl: &'static str = Box::leak(args.lease_ttl.clone().into_boxed_str());
    let mut q = Quorum::start(&dir, QuorumOptions { lease_ttl: ttl, ..QuorumOptions::default() }).await?;
    q.wait_serving(Duration::from_secs(30))
        .await
        .with_context(|| format!("quorum did not start; logs in {}", dir.display()))?;

    // The regions.
    let shared_pat = emu.pat().to_string();
    let per_region = args.credentials == Credentials::PerRegion;
    let gh = |region: &str| GitHubSide {
        config_url: config_url.clone(),
        pat: if per_region { format!("pat-{region}") } else { shared_pat.clone() },
        scale_set_id: set.id,
        resolve: vec![],
    };
    let mut agents: BTreeMap<String, Region> = BTreeMap::new();
    for r in &args.regions {
        agents.insert(r.clone(), Region::start(&q, &dir, gh(r), r, ttl)?);
    }
    if args.jobs_per_minute > 0 {
        let every = Duration::from_secs_f64(60.0 / f64::from(args.jobs_per_minute));
        let url = format!("{}/_emulator/jobs", emu.base_url());
        let http = reqwest::Client::new();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let body = json!({"scaleSetId": set.id, "count": 1, "durationSeconds": 20});
                let _ = http.post(&url).json(&body).send().await;
            }
        });
    }
    let n = agents.len();
    q.wait_status("every region joined", Duration::from_secs(60), |s| {
        s.members.iter().filter(|m| m.status == "live").count() >= n
    })
    .await
    .with_context(|| format!("regions did not join; agent logs in {}", dir.display()))?;
    let s =
        q.wait_status("a holder", Duration::from_secs(30), |s| s.groups.iter().any(|g| !g.holder.is_empty())).await?;

    log(json, format!("arcfed sandbox is up in {}", dir.display()));
    log(json, format!("  emulated GitHub: githubConfigUrl={config_url} (PAT {}), scale set id {}", emu.pat(), set.id));
    log(json, format!("  quorum: {} (leader {})", q.endpoints().join(","), s.leader));
    log(json, format!("  regions: {}", args.regions.join(", ")));
    let adversarial = args.adversarial || args.drill.is_some();
    log(json, format!("  emulator knobs: {}", if adversarial { "adversarial" } else { "documented defaults" }));
    log(
        json,
        format!(
            "  try: ARCFED_ENDPOINTS={} ARCFED_TLS_CERT={} ARCFED_TLS_KEY={} ARCFED_TLS_CA={} {} status",
            q.endpoints().join(","),
            q.admin.cert.display(),
            q.admin.key.display(),
            q.admin.ca.display(),
            bin_path("arcfedctl").display()
        ),
    );

    match args.drill {
        Some(d) => {
            let report = drill(d, args.runs, &mut q, &mut agents, &emu, set.id).await;
            let report = match report {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("drill failed: {e:#}\nlogs: {}", dir.display());
                    return Err(e);
                }
            };
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
        }
        None => {
            let end = (args.duration > Duration::ZERO).then(|| Instant::now() + args.duration);
            loop {
                if let Ok(s) = q.status().await {
                    println!("\n{}", arcfed_coordinator_table(&s));
                }
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = tokio::time::sleep(args.every) => {}
                }
                if end.is_some_and(|e| Instant::now() >= e) {
                    break;
                }
            }
            println!("stopping; files kept in {}", dir.display());
        }
    }
    drop(agents);
    drop(q);
    emu.shutdown().await;
    Ok(())
}

/// One region: a real `arcfed-agent` process (one ARC listener pod). Dropping it SIGKILLs it.
struct Region {
    agent: AgentProc,
}

impl Region {
    fn start(q: &Quorum, dir: &std::path::Path, gh: GitHubSide, region: &str, ttl: &str) -> anyhow::Result<Region> {
        let mut spec = AgentSpec::new(region, gh).federated(q.endpoints(), q.certs.agent(region)?);
        spec.lease_ttl = Some(ttl.to_string());
        Ok(Region { agent: AgentProc::start(&dir.join(format!("region-{region}")), spec)? })
    }
}

/// A compact status table (arcfedctl's full table is `arcfedctl status`).
fn arcfed_coordinator_table(s: &arcfed_proto::StatusResponse) -> String {
    let mut o = format!("leader {}  term {}  applied {}\n", s.leader, s.term, s.applied_index);
    for g in &s.groups {
        let holder = if g.holder.is_empty() {
            "(none)".into()
        } else {
            format!("{} ({})", g.holder_cluster, &g.holder[..8.min(g.holder.len())])
        };
        o.push_str(&format!("  {}  holder {holder}  token {}  lease {}ms\n", g.key, g.token, g.lease_remaining_ms));
        for m in s.members.iter().filter(|m| m.group == g.key) {
            let n = g.assignments.iter().find(|a| a.member == m.id).map(|a| a.runners).unwrap_or(0);
            o.push_str(&format!("    {:<8} {:<8} epoch {:<6} runners {n}\n", m.cluster, m.status, m.epoch));
        }
    }
    o
}

fn summary(mut v: Vec<f64>) -> serde_json::Value {
    if v.is_empty() {
        return serde_json::Value::Null;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| v[(((v.len() - 1) as f64) * p).round() as usize];
    json!({"p50": at(0.5).round(), "p99": at(0.99).round(), "max": at(1.0).round()})
}

fn holder_of(s: &arcfed_proto::StatusResponse) -> Option<(String, String, u64)> {
    s.groups.first().filter(|g| !g.holder.is_empty()).map(|g| (g.holder.clone(), g.holder_cluster.clone(), g.token))
}

async fn drill(
    d: Drill,
    runs: usize,
    q: &mut Quorum,
    agents: &mut BTreeMap<String, Region>,
    emu: &EmulatorHandle,
    set: i64,
) -> anyhow::Result<serde_json::Value> {
    let mut failover = Vec::new();
    let mut first_poll = Vec::new();
    let wait = Duration::from_secs(60);
    let mut per_run = Vec::new();
    let mut detect = Vec::new();
    let mut tokens = Vec::new();
    let mut regressions = 0u64;
    for run in 0..runs {
        let s = q.wait_status("a holder", wait, |s| holder_of(s).is_some()).await?;
        let (holder, region, token) = holder_of(&s).context("holder")?;
        if tokens.last().is_some_and(|t| token < *t) {
            regressions += 1;
        }
        tokens.push(token);
        // The current holder has its session open before the fault.
        wait_session(emu, set, token, wait).await?;
        let fault = Instant::now();
        let fault_emu = emu.now_ms();
        let mut run_gh: Option<(u64, u64)> = None;
        let (detect_ms, note) = match d {
            Drill::KillHolder => {
                agents.get_mut(&region).context("holder region")?.agent.kill(); // SIGKILL: the session is orphaned
                let s2 = q.wait_status("another holder", wait, |s| holder_of(s).is_some_and(|h| h.0 != holder)).await?;
                let detect_ms = fault.elapsed().as_secs_f64() * 1000.0;
                let (_, new_region, new_token) = holder_of(&s2).context("holder")?;
                if new_token < token {
                    regressions += 1;
                }
                // The successor's session, opened after revoking the orphan by its id.
                let (opened, polled) = wait_session(emu, set, new_token, wait).await?;
                failover.push(opened.saturating_sub(fault_emu) as f64);
                first_poll.push(polled.saturating_sub(fault_emu) as f64);
                run_gh = Some((opened.saturating_sub(fault_emu), polled.saturating_sub(fault_emu)));
                // The killed region comes back (its pod is recreated) as a standby.
                agents.get_mut(&region).context("holder region")?.agent.restart()?;
                (Some(detect_ms), format!("{region} → {new_region}"))
            }
            Drill::KillLeader => {
                q.voter(s.leader).kill();
                let n = agents.len();
                let s2 = q
                    .wait_status("a new leader serving every region", wait, |x| {
                        x.leader != s.leader && x.members.iter().filter(|m| m.status == "live").count() >= n
                    })
                    .await?;
                // Served again: the holder keeps polling its session after the fault.
                wait_poll_after(emu, set, token, fault_emu, wait).await?;
                let served = fault.elapsed().as_secs_f64() * 1000.0;
                if holder_of(&s2).map(|h| h.0) != Some(holder.clone()) {
                    bail!("the holder changed after a leader change (invariant 5)");
                }
                q.voter(s.leader).restart()?;
                q.wait_status("the old leader back", wait, |x| x.voters.len() == 3).await?;
                (None, format!("leader {} → {}; all regions served again after {served:.0} ms", s.leader, s2.leader))
            }
            Drill::Handover => {
                let target = s
                    .members
                    .iter()
                    .find(|m| m.cluster != region && m.status == "live" && !m.standby)
                    .map(|m| (m.cluster.clone(), m.id.clone()))
                    .context("a handover target")?;
                let mut args: Vec<String> = vec![
                    "--endpoints".into(),
                    q.endpoints().join(","),
                    "--tls-cert".into(),
                    q.admin.cert.display().to_string(),
                    "--tls-key".into(),
                    q.admin.key.display().to_string(),
                    "--tls-ca".into(),
                    q.admin.ca.display().to_string(),
                    "handover".into(),
                    s.groups[0].key.clone(),
                    "--to".into(),
                    target.1.clone(),
                ];
                let refs: Vec<&str> = args.iter_mut().map(|s| s.as_str()).collect();
                arcfed_tests::harness::arcfedctl(&refs)?;
                // The holder answers the request: it deletes its session and releases.
                let s2 =
                    q.wait_status("the target holds", wait, |s| holder_of(s).is_some_and(|h| h.0 == target.1)).await?;
                let detect_ms = fault.elapsed().as_secs_f64() * 1000.0;
                let new_token = holder_of(&s2).map(|h| h.2).unwrap_or(0);
                if new_token < token {
                    regressions += 1;
                }
                let (opened, polled) = wait_session(emu, set, new_token, wait).await?;
                failover.push(opened.saturating_sub(fault_emu) as f64);
                first_poll.push(polled.saturating_sub(fault_emu) as f64);
                run_gh = Some((opened.saturating_sub(fault_emu), polled.saturating_sub(fault_emu)));
                (Some(detect_ms), format!("{region} → {}", target.0))
            }
        };
        if let Some(v) = detect_ms {
            detect.push(v);
        }
        per_run.push(json!({"run": run, "detect_ms": detect_ms.map(f64::round),
                   "failover_ms": run_gh.map(|g| g.0), "first_poll_ms": run_gh.map(|g| g.1),
                   "token_before": token, "what": note}));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let scenario = match d {
        Drill::KillHolder => "kill-holder",
        Drill::KillLeader => "kill-leader",
        Drill::Handover => "handover",
    };
    // Let an in-flight message settle before counting undeleted ones.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rep = emu.report();
    let ss = rep.scale_sets.iter().find(|x| x.id == set).context("scale set in the emulator report")?;
    Ok(json!({
        "scenario": scenario,
        "emulator_settings": emu.settings(),
        "runs": per_run,
        "detect_ms": summary(detect),
        "failover_ms": summary(failover),
        "first_poll_ms": summary(first_poll),
        "sessions_overlap_ms": ss.sessions_overlap_ms,
        "zombie_requests": ss.zombie_requests,
        "conflicts_409": ss.conflicts_409,
        "max_concurrent_sessions": ss.max_concurrent_sessions,
        "no_session_ms": ss.no_session_ms,
        "messages_delivered": ss.messages_delivered,
        "messages_deleted": ss.messages_deleted,
        "messages_redelivered": ss.messages_redelivered,
        // Messages delivered but never deleted (an undeleted message is redelivered only
        // with a per-session cursor; drills use the adversarial per-scale-set one).
        "messages_lost": ss.messages_delivered.saturating_sub(ss.messages_redelivered).saturating_sub(ss.messages_deleted),
        "acquire_repeats": ss.acquire_repeats,
        "jobs_acquired_twice": ss.jobs_acquired_twice,
        "stale_token_rejections": stale_token_rejections(q).await,
        "token_regressions": regressions,
        "tokens_before": tokens,
    }))
}

/// The coordinator's replicated stale-token rejection counter, read from the leader's /metrics.
async fn stale_token_rejections(q: &Quorum) -> Option<u64> {
    let leader = q.status().await.ok()?.leader;
    let http = q.voters.iter().find(|v| v.id == leader)?.http;
    let body = reqwest::get(format!("http://{http}/metrics")).await.ok()?.text().await.ok()?;
    body.lines()
        .find(|l| l.starts_with("arcfed_stale_token_rejections_total_replicated "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Waits until the emulator shows a session of the holder with `token` (its owner name
/// ends in `/t<token>`) that has polled; returns (opened_at, first poll) on the emulator clock.
async fn wait_session(emu: &EmulatorHandle, set: i64, token: u64, wait: Duration) -> anyhow::Result<(u64, u64)> {
    let end = Instant::now() + wait;
    let suffix = format!("/t{token}");
    loop {
        let rep = emu.report();
        let sess = rep
            .scale_sets
            .iter()
            .filter(|x| x.id == set)
            .flat_map(|x| x.sessions.iter())
            .find(|s| s.owner.ends_with(&suffix))
            .cloned();
        if let Some(s) = sess {
            let first_poll = emu
                .timeline()
                .iter()
                .filter(|e| e.class == PathClass::Poll && e.session_id.as_deref() == Some(s.session_id.as_str()))
                .map(|e| e.at_ms)
                .min();
            if let Some(p) = first_poll {
                return Ok((s.opened_at, p));
            }
        }
        if Instant::now() > end {
            bail!("no polling GitHub session for token {token} within {wait:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the session of the holder with `token` polls after `after` (emulator clock).
async fn wait_poll_after(emu: &EmulatorHandle, set: i64, token: u64, after: u64, wait: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + wait;
    let suffix = format!("/t{token}");
    loop {
        let rep = emu.report();
        let ids: Vec<String> = rep
            .scale_sets
            .iter()
            .filter(|x| x.id == set)
            .flat_map(|x| x.sessions.iter())
            .filter(|s| s.owner.ends_with(&suffix))
            .map(|s| s.session_id.clone())
            .collect();
        let polled = emu.timeline().iter().any(|e| {
            e.class == PathClass::Poll && e.at_ms > after && e.session_id.as_ref().is_some_and(|s| ids.contains(s))
        });
        if polled {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("the holder (token {token}) did not poll again within {wait:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
