//! arcfed-sandbox: a local arcfed world started by one command.
//!
//! It starts the actions-emulator (in-process) with one scale set and a steady workload,
//! three `arcfed-coordinator` voters (real processes), and one region per `--regions` entry,
//! each running a real `arcfed-agent` process (the ARC listener drop-in) with the `sim`
//! runner backend. Then it shows the live view every second until `--duration` or Ctrl-C,
//! runs a DESIGN §10 drill (`--drill`), or a randomized fault run (`--random-faults`), and
//! prints the §11 report. The world itself lives in `arcfed_tests::sandbox`, the drills in
//! `arcfed_tests::drill`; `tests/tests/drills.rs` runs the same code.
use anyhow::{Context, bail};
use arcfed_tests::drill::{DrillReport, Scenario, random_faults, run_drill};
use arcfed_tests::emulator::{CrossCredentialDelete, Mode as JobMode};
use arcfed_tests::harness::bin_path;
use arcfed_tests::sandbox::{Sandbox, SandboxOptions};
use clap::{Parser, ValueEnum};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum GitHubMode {
    Ghes,
    Dotcom,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Credentials {
    Shared,
    PerRegion,
}

/// arcfed-sandbox: a local quorum, regions and an emulated GitHub, in one command.
#[derive(Parser, Debug)]
#[command(name = "arcfed-sandbox", version)]
struct Args {
    /// Working directory for certificates, data dirs and logs (default: a new temp dir, kept).
    #[arg(long, env = "ARCFED_SANDBOX_DIR")]
    dir: Option<PathBuf>,
    /// Regions (clusters), one agent each; region i hosts voter i (mod 3).
    #[arg(long, env = "ARCFED_SANDBOX_REGIONS", value_delimiter = ',', default_value = "a,b,c")]
    regions: Vec<String>,
    /// Lease TTL of the quorum (default: the profile's, 3s on lan, 10s on wan).
    #[arg(long, env = "ARCFED_SANDBOX_LEASE_TTL")]
    lease_ttl: Option<String>,
    /// Run a DESIGN §10 drill instead of the live view.
    #[arg(long, env = "ARCFED_SANDBOX_DRILL", value_enum, conflicts_with = "random_faults")]
    drill: Option<Scenario>,
    /// Run random §10 faults (one at a time, `--runs` of them) under the workload, then check
    /// every DESIGN §6 invariant. The schedule comes from `--seed`.
    #[arg(long, env = "ARCFED_SANDBOX_RANDOM_FAULTS")]
    random_faults: bool,
    /// Seed of the randomized run (default: from the clock; printed either way).
    #[arg(long, env = "ARCFED_SANDBOX_SEED")]
    seed: Option<u64>,
    /// Drill repetitions, or the number of random faults.
    #[arg(long, env = "ARCFED_SANDBOX_RUNS", default_value = "3")]
    runs: usize,
    /// Print the report as one JSON object (DESIGN §11 shape) on stdout; everything else
    /// goes to stderr.
    #[arg(long, env = "ARCFED_SANDBOX_JSON")]
    json: bool,
    /// Stop the live view after this long (0 = run until Ctrl-C).
    #[arg(long, env = "ARCFED_SANDBOX_DURATION", value_parser = humantime::parse_duration, default_value = "0s")]
    duration: Duration,
    /// Run the emulator with the adversarial values of the undocumented knobs (a deleted
    /// session's queue token keeps working, the abandoned-session TTL counts from creation,
    /// the message cursor is per scale set; see tests/EMULATOR.md). Drills always use them.
    #[arg(long, env = "ARCFED_SANDBOX_ADVERSARIAL")]
    adversarial: bool,
    /// GitHub credentials of the regions: `shared` (one GitHub App / PAT for every cluster,
    /// the usual setup) or `per-region` (each region its own). With `per-region` and
    /// `--cross-credential-delete deny`, a successor cannot revoke its predecessor's session
    /// and waits for GitHub's abandoned-session TTL.
    #[arg(long, env = "ARCFED_SANDBOX_CREDENTIALS", value_enum, default_value = "shared")]
    credentials: Credentials,
    /// Whether GitHub lets one credential delete another credential's session (undocumented).
    #[arg(long, env = "ARCFED_SANDBOX_CROSS_CREDENTIAL_DELETE", value_enum, default_value = "allow")]
    cross_credential_delete: CrossCredentialDelete,
    /// The emulator's abandoned-session TTL (GitHub's is about 90 s).
    #[arg(long, env = "ARCFED_SANDBOX_SESSION_TTL", value_parser = humantime::parse_duration, default_value = "90s")]
    session_ttl: Duration,
    /// Jobs enqueued per minute on the emulated scale set (0 = none), 5–20 s each.
    #[arg(long, env = "ARCFED_SANDBOX_JOBS_PER_MINUTE", default_value = "30")]
    jobs_per_minute: u32,
    /// partition-region: keep the region cut off this long from the fault (e.g. 15s, past
    /// `--coordinator-lost-for`, so that it falls back while the quorum's holder serves).
    #[arg(long, env = "ARCFED_SANDBOX_HOLD", value_parser = humantime::parse_duration)]
    hold: Option<Duration>,
    /// How GitHub offers jobs: `ghes` (`JobAvailable`, then the listener acquires) or `dotcom`
    /// (`JobAssigned`: the service assigns, nothing to acquire).
    #[arg(long, env = "ARCFED_SANDBOX_GITHUB_MODE", value_enum, default_value = "ghes")]
    github_mode: GitHubMode,
    /// The agents' `--coordinator-lost-for` (default: 5s for quorum-loss, `--hold` and random runs,
    /// else the agent's own default).
    #[arg(long, env = "ARCFED_SANDBOX_COORDINATOR_LOST_FOR")]
    coordinator_lost_for: Option<String>,
    /// The agents' `--holder-stall` (default: 4s for holder-stall, 5s for random runs, else
    /// the agent's own default).
    #[arg(long, env = "ARCFED_SANDBOX_HOLDER_STALL")]
    holder_stall: Option<String>,
    /// Agents dial the voters directly instead of through their link proxies (then
    /// half-close-holder and partition-region cannot cut them).
    #[arg(long, env = "ARCFED_SANDBOX_DIRECT_LINKS")]
    direct_links: bool,
    /// Voters dial each other directly instead of through fault proxies (then
    /// partition-region cannot cut a voter).
    #[arg(long, env = "ARCFED_SANDBOX_DIRECT_PEERS")]
    direct_peers: bool,
    /// Real regions (root only): each region's voter and agent run in a network namespace of
    /// their own, joined by a WAN with --wan-delay between regions; GitHub is reached over a
    /// separate link per region. partition-region and holder-stall then cut links.
    #[arg(long, env = "ARCFED_SANDBOX_NETNS")]
    netns: bool,
    /// One-way delay between two regions with --netns (half of it between a region and the
    /// sandbox's own connections).
    #[arg(long, env = "ARCFED_SANDBOX_WAN_DELAY", value_parser = humantime::parse_duration, default_value = "40ms")]
    wan_delay: Duration,
    /// Percent of WAN frames to or from a region that are dropped, with --netns.
    #[arg(long, env = "ARCFED_SANDBOX_WAN_LOSS", default_value = "0")]
    wan_loss: f64,
    /// Timing profile of the voters and agents: lan (TTL 3s) or wan (TTL 10s, slower
    /// elections). With wan, --lease-ttl defaults to 10s.
    #[arg(long, env = "ARCFED_SANDBOX_PROFILE", value_parser = ["lan", "wan"], default_value = "lan")]
    profile: String,
}

fn log(json: bool, msg: impl AsRef<str>) {
    if json {
        eprintln!("{}", msg.as_ref());
    } else {
        println!("{}", msg.as_ref());
    }
}

/// `cargo run -p arcfed-tests --bin arcfed-sandbox` builds only this package; build the
/// binaries it starts too (a no-op when they are fresh).
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
    ensure_binaries()?;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => tempfile::Builder::new().prefix("arcfed-sandbox-").tempdir()?.keep(),
    };
    let json = args.json;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    let random = args.random_faults;
    let opts = SandboxOptions {
        regions: args.regions.clone(),
        lease_ttl: args.lease_ttl.clone().unwrap_or_else(|| if args.profile == "wan" { "10s" } else { "3s" }.into()),
        netns: args
            .netns
            .then_some(arcfed_tests::netns::WanOptions { delay: args.wan_delay, loss: args.wan_loss / 100.0 }),
        profile: (args.profile != "lan").then(|| args.profile.clone()),
        adversarial: args.adversarial || args.drill.is_some() || random,
        per_region_credentials: args.credentials == Credentials::PerRegion,
        cross_credential_delete: args.cross_credential_delete,
        session_ttl: args.session_ttl,
        jobs_per_minute: args.jobs_per_minute,
        coordinator_lost_for: args.coordinator_lost_for.clone().or_else(|| {
            (random || args.drill == Some(Scenario::QuorumLoss) || args.hold.is_some()).then(|| "5s".to_string())
        }),
        holder_stall: args.holder_stall.clone().or_else(|| match (random, args.drill) {
            (true, _) => Some("5s".into()),
            (_, Some(Scenario::HolderStall | Scenario::AcquireFault)) => Some("4s".into()),
            _ => None,
        }),
        hold: args.hold,
        job_mode: match args.github_mode {
            GitHubMode::Ghes => JobMode::Ghes,
            GitHubMode::Dotcom => JobMode::Dotcom,
        },
        agent_links: !args.direct_links,
        peer_proxies: !args.direct_peers,
        ..SandboxOptions::default()
    };
    if random {
        log(
            json,
            format!("random faults: seed {seed} ({} faults); replay with --random-faults --seed {seed}", args.runs),
        );
    }
    log(json, format!("starting the sandbox in {}", dir.display()));
    let started = Instant::now();
    // Ctrl-C at any point stops everything: every process is owned by the sandbox and dies
    // with it.
    let mut sb = tokio::select! {
        r = Sandbox::start(&dir, opts) => r?,
        _ = tokio::signal::ctrl_c() => { eprintln!("interrupted; files kept in {}", dir.display()); return Ok(()) }
    };
    let (s, _) = sb.wait_settled().await?;
    log(json, format!("arcfed sandbox is up after {:.1}s in {}", started.elapsed().as_secs_f64(), dir.display()));
    log(
        json,
        format!(
            "  emulated GitHub: githubConfigUrl={} (PAT {}), scale set id {}{}",
            sb.emu.config_url(),
            sb.emu.pat(),
            sb.set,
            if sb.wan.is_none() {
                format!(
                    "; {} is {} (curl --resolve {}:{}:{}), each region reaches it through a proxy of its own",
                    arcfed_tests::sandbox::GITHUB_HOST,
                    sb.github_addr.ip(),
                    arcfed_tests::sandbox::GITHUB_HOST,
                    sb.github_addr.port(),
                    sb.github_addr.ip()
                )
            } else {
                String::new()
            }
        ),
    );
    log(json, format!("  quorum: {} (leader {})", sb.q.endpoints().join(","), s.leader));
    log(json, format!("  regions: {}", args.regions.join(", ")));
    log(json, format!("  emulator knobs: {}", if sb.opts.adversarial { "adversarial" } else { "documented defaults" }));
    log(
        json,
        format!(
            "  try: ARCFED_ENDPOINTS={} ARCFED_TLS_CERT={} ARCFED_TLS_KEY={} ARCFED_TLS_CA={} {} status",
            sb.q.endpoints().join(","),
            sb.q.admin.cert.display(),
            sb.q.admin.key.display(),
            sb.q.admin.ca.display(),
            bin_path("arcfedctl").display()
        ),
    );

    let outcome: anyhow::Result<Option<DrillReport>> = match (args.drill, random) {
        (Some(d), _) => tokio::select! {
            r = run_drill(&mut sb, d, args.runs) => r.map(Some),
            _ = tokio::signal::ctrl_c() => Ok(None),
        },
        (None, true) => tokio::select! {
            r = random_faults(&mut sb, seed, args.runs) => r.map(Some),
            _ = tokio::signal::ctrl_c() => Ok(None),
        },
        (None, false) => {
            live(&sb, args.duration).await;
            Ok(None)
        }
    };
    sb.shutdown().await;
    match outcome {
        Ok(Some(report)) => {
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            if let Some(seed) = report.seed {
                eprintln!("seed {seed}");
            }
            if !report.invariants_hold() {
                bail!("invariants violated: {:?}; files in {}", report.failed_invariants(), dir.display());
            }
        }
        Ok(None) => eprintln!("stopped; files kept in {}", dir.display()),
        Err(e) => {
            eprintln!("drill failed: {e:#}\nfiles kept in {}", dir.display());
            return Err(e);
        }
    }
    Ok(())
}

/// The live view, refreshed each second, until `duration` (0 = forever) or Ctrl-C.
async fn live(sb: &Sandbox, duration: Duration) {
    let end = (duration > Duration::ZERO).then(|| Instant::now() + duration);
    let tty = std::io::stdout().is_terminal();
    loop {
        let view = sb.live_view().await;
        if tty {
            print!("\x1b[2J\x1b[H");
        }
        println!("{view}");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if end.is_some_and(|e| Instant::now() >= e) {
            break;
        }
    }
}
