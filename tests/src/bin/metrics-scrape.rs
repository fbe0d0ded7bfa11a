//! `metrics-scrape`: the metric names the real binaries export, scraped from a running sandbox
//! (used by `.ci/deploy-check` to check the alerts' and the dashboard's PromQL).
//!
//! It starts, on 127.0.0.1, the in-process actions-emulator, three `arcfed-coordinator` voters
//! and two `arcfed-agent` processes (`sim` backend) of one scale set; waits until one agent
//! holds and its session polls; enqueues a few short jobs so that the job counters and
//! histograms get samples (waiting for them up to `--job-wait`); then GETs `/metrics` from every
//! voter and every agent and prints the union of the metric families (`# TYPE` lines) with the
//! series names PromQL sees for them (`counter` → `<name>_total`, `histogram` →
//! `<name>_bucket|_sum|_count`, …) plus every sample name actually present.
//!
//! Binaries come from `$ARCFED_BIN_DIR`, else from this executable's directory.
//! `cargo run -p arcfed-tests --bin metrics-scrape -- --format lines`

use anyhow::Context;
use arcfed_tests::agent_proc::{AgentProc, AgentSpec, GitHubSide};
use arcfed_tests::emulator::{Cursor, Emulator, EmulatorConfig, SessionTtlFrom};
use arcfed_tests::harness::{Quorum, QuorumOptions};
use clap::{Parser, ValueEnum};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    /// One JSON object: families (type, exporters), series, endpoints.
    Json,
    /// The series names PromQL sees, one per line.
    Lines,
}

#[derive(Parser, Debug)]
#[command(name = "metrics-scrape", version, about)]
struct Args {
    #[arg(long, value_enum, default_value = "json")]
    format: Format,
    /// Keep logs and data here instead of a temporary directory.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Jobs to enqueue (each runs for 1 s) so that job counters and histograms get samples.
    #[arg(long, default_value = "3")]
    jobs: u32,
    /// How long to wait for the sandbox to serve and an agent to hold and poll.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// How long to wait for the job metrics to get samples (then scrape anyway and say so).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    job_wait: Duration,
}

/// Series that only exist once a job was started and completed.
const JOB_SERIES: &[&str] = &[
    "gha_started_jobs_total",
    "gha_completed_jobs_total",
    "gha_job_startup_duration_seconds_bucket",
    "gha_job_execution_duration_seconds_bucket",
];

#[derive(Serialize, Default)]
struct Family {
    #[serde(rename = "type")]
    typ: String,
    exporters: BTreeSet<String>,
}

#[derive(Serialize, Default)]
struct Scrape {
    /// Metric family → its type and which binaries export it.
    families: BTreeMap<String, Family>,
    /// Every name a PromQL selector can use: derived from the families' types and every
    /// sample name present.
    series: BTreeSet<String>,
    /// `<binary> <url>` of every scraped endpoint.
    endpoints: Vec<String>,
    /// Job series that had no sample when the scrape ran (empty when the jobs completed).
    missing_job_series: Vec<String>,
}

/// Names PromQL sees for a family of `typ` (OpenMetrics / Prometheus text exposition).
fn series_of(name: &str, typ: &str) -> Vec<String> {
    let s = |suffix: &str| format!("{name}{suffix}");
    match typ {
        "counter" if name.ends_with("_total") => vec![name.to_string()],
        "counter" => vec![s("_total")],
        "histogram" => vec![s("_bucket"), s("_sum"), s("_count")],
        "gaugehistogram" => vec![s("_bucket"), s("_gsum"), s("_gcount")],
        "summary" => vec![name.to_string(), s("_sum"), s("_count")],
        "info" => vec![s("_info")],
        _ => vec![name.to_string()],
    }
}

/// Adds one exposition's families and sample names to `out`.
fn parse_exposition(text: &str, exporter: &str, out: &mut Scrape) {
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(typ)) = (it.next(), it.next()) {
                let f = out.families.entry(name.to_string()).or_default();
                f.typ = typ.to_string();
                f.exporters.insert(exporter.to_string());
                out.series.extend(series_of(name, typ));
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            if !name.is_empty() {
                out.series.insert(name.to_string());
            }
        }
    }
}

/// Sample names (not families) present in an exposition.
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_string))
        .collect()
}

async fn get(http: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    let r = http.get(url).send().await.with_context(|| format!("GET {url}"))?;
    anyhow::ensure!(r.status().is_success(), "GET {url}: {}", r.status());
    Ok(r.text().await?)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let tmp = tempfile::Builder::new().prefix("metrics-scrape-").tempdir()?;
    let root = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let mut cfg = EmulatorConfig::default();
    cfg.settings.long_poll = Duration::from_secs(2);
    cfg.settings.queue_token_survives_session_delete = true;
    cfg.settings.session_ttl_from = SessionTtlFrom::Creation;
    cfg.settings.cursor = Cursor::PerScaleSet;
    let emu = Emulator::start(cfg, tokio::net::TcpListener::bind("127.0.0.1:0").await?).await?;
    let set = emu.create_scale_set("scrape", 1).map_err(|e| anyhow::anyhow!("{e:?}"))?.id;
    let q = Quorum::start(root.as_path(), QuorumOptions::default()).await?;
    q.wait_serving(args.timeout).await.map_err(|e| anyhow::anyhow!("{e}; voter logs:\n{}", q.dump_logs()))?;
    let gh =
        GitHubSide { config_url: emu.config_url(), pat: emu.pat().to_string(), scale_set_id: set, resolve: vec![] };
    let mut agents = Vec::new();
    for c in ["a", "b"] {
        let spec = AgentSpec::new(c, gh.clone()).federated(q.endpoints(), q.certs.agent(c)?);
        agents.push(AgentProc::start(&root.as_path().join(c), spec)?);
    }
    let s = q
        .wait_status("two live agents and a holder", args.timeout, |s| {
            s.members.iter().filter(|m| m.status == "live").count() == 2
                && s.groups.first().is_some_and(|g| !g.holder.is_empty())
        })
        .await?;
    let token = s.groups.first().context("group")?.token;
    let suffix = format!("/t{token}");
    let end = Instant::now() + args.timeout;
    loop {
        let rep = emu.report();
        if rep.scale_set(set).is_some_and(|x| x.sessions.iter().any(|s| s.owner.ends_with(&suffix) && s.polls > 0)) {
            break;
        }
        anyhow::ensure!(Instant::now() < end, "the holder (token {token}) never polled GitHub");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if args.jobs > 0 {
        emu.enqueue_jobs(set, args.jobs, Duration::from_secs(1)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }

    // Wait until the job series have samples on some agent (or the budget is spent).
    let mut missing: BTreeSet<String> =
        if args.jobs > 0 { JOB_SERIES.iter().map(|s| s.to_string()).collect() } else { BTreeSet::new() };
    let end = Instant::now() + args.job_wait;
    while !missing.is_empty() && Instant::now() < end {
        for a in &agents {
            if let Ok(t) = a.metrics().await {
                let names = sample_names(&t);
                missing.retain(|m| !names.contains(m));
            }
        }
        if !missing.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    if !missing.is_empty() {
        eprintln!("metrics-scrape: no sample within {:?} for {missing:?}; scraping anyway", args.job_wait);
    }

    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let mut out = Scrape { missing_job_series: missing.into_iter().collect(), ..Scrape::default() };
    for v in &q.voters {
        let url = format!("http://{}/metrics", v.http);
        let text = get(&http, &url).await?;
        parse_exposition(&text, "arcfed-coordinator", &mut out);
        out.endpoints.push(format!("arcfed-coordinator {url}"));
    }
    for a in &agents {
        let url = format!("http://{}/metrics", a.admin);
        let text = get(&http, &url).await?;
        parse_exposition(&text, "arcfed-agent", &mut out);
        out.endpoints.push(format!("arcfed-agent {url}"));
    }
    anyhow::ensure!(
        out.families.values().any(|f| f.exporters.contains("arcfed-coordinator"))
            && out.families.values().any(|f| f.exporters.contains("arcfed-agent")),
        "a binary exported no metric family: {:?}",
        out.endpoints
    );
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&out)?),
        Format::Lines => {
            for s in &out.series {
                println!("{s}");
            }
        }
    }
    drop(agents);
    drop(q);
    emu.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_become_the_names_promql_sees() {
        let text = "# HELP arcfed_keepalives Keepalives.\n# TYPE arcfed_keepalives counter\n\
                    arcfed_keepalives_total 3\n# TYPE arcfed_grant_latency_seconds histogram\n\
                    arcfed_grant_latency_seconds_bucket{le=\"0.1\"} 1\n# TYPE arcfed_members gauge\n\
                    arcfed_members{status=\"live\"} 2\n# EOF\n";
        let mut s = Scrape::default();
        parse_exposition(text, "arcfed-coordinator", &mut s);
        assert_eq!(s.families["arcfed_keepalives"].typ, "counter");
        for n in [
            "arcfed_keepalives_total",
            "arcfed_grant_latency_seconds_bucket",
            "arcfed_grant_latency_seconds_sum",
            "arcfed_grant_latency_seconds_count",
            "arcfed_members",
        ] {
            assert!(s.series.contains(n), "{n} in {:?}", s.series);
        }
        assert!(!s.series.contains("arcfed_keepalives"), "a counter's family name is not a series");
        assert!(!s.series.contains("EOF"));
    }
}
