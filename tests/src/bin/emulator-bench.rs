//! `emulator-bench`: holds N concurrent long polls (one session per scale set, as N listeners
//! would) while sending other admin/side-channel requests at a fixed rate, then prints one
//! JSON object (requests, errors, latency percentiles, achieved rate, RSS).
//!
//! Starts the emulator in-process unless `--url` points at a running one. Needs about
//! 2 × scale-sets file descriptors in-process (client and server ends): raise `ulimit -n`
//! to 4096 or more for the default 1,000.

use anyhow::{Context, bail};
use arcfed_tests::emulator::client::ArcClient;
use arcfed_tests::emulator::model::{MessageEnvelope, Session};
use arcfed_tests::emulator::{Emulator, EmulatorConfig, Settings};
use clap::Parser;
use reqwest::Method;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

#[derive(Debug, Parser)]
#[command(name = "emulator-bench")]
struct Args {
    /// githubConfigUrl of a running emulator; by default one is started in-process.
    #[arg(long, env = "ARCFED_BENCH_URL")]
    url: Option<String>,
    /// PAT for --url.
    #[arg(long, default_value = "emulator-pat")]
    pat: String,
    /// Scale sets, each with a session holding one long poll.
    #[arg(long, default_value_t = 1000)]
    scale_sets: usize,
    /// Other requests per second (admin GETs, JIT configs, job enqueues, ...).
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Measurement window (after setup).
    #[arg(long, default_value = "20s", value_parser = duration)]
    duration: Duration,
    /// Long-poll window of the in-process emulator.
    #[arg(long, default_value = "50s", value_parser = duration)]
    long_poll: Duration,
    /// Write the JSON result here instead of stdout.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct Stats {
    other_ok: AtomicU64,
    other_err: AtomicU64,
    polls_200: AtomicU64,
    polls_202: AtomicU64,
    polls_err: AtomicU64,
    acks: AtomicU64,
    in_flight: AtomicI64,
}

fn nofile_soft_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let need = (a.scale_sets as u64) * 2 + 256;
    if let Some(n) = nofile_soft_limit()
        && n < need
    {
        bail!(
            "ulimit -n is {n}; {} scale sets need about {need} descriptors (raise it with `ulimit -n 4096`)",
            a.scale_sets
        );
    }

    let (handle, url, pat) = match &a.url {
        Some(u) => (None, u.clone(), a.pat.clone()),
        None => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let cfg = EmulatorConfig {
                settings: Settings { long_poll: a.long_poll, ..Settings::default() },
                ..EmulatorConfig::default()
            };
            let h = Emulator::start(cfg, listener).await?;
            let (u, p) = (h.config_url(), h.pat().to_string());
            (Some(h), u, p)
        }
    };

    let http = ArcClient::builder().http1_only().pool_max_idle_per_host(usize::MAX).build()?;
    let mut c = ArcClient::with_http(&url, &pat, http)?;
    c.auth().await.context("auth chain")?;
    let c = Arc::new(c);

    // Setup: scale sets and sessions, 50 at a time.
    let setup = Instant::now();
    let run_tag = uuid::Uuid::new_v4().simple().to_string();
    let mut sets: Vec<(i64, Session)> = Vec::with_capacity(a.scale_sets);
    for chunk in (0..a.scale_sets).collect::<Vec<_>>().chunks(50) {
        let futs = chunk.iter().map(|i| {
            let c = c.clone();
            let name = format!("bench-{}-{i}", &run_tag[..8]);
            async move {
                let set = c.create_scale_set(&name, 1).await?;
                let s = c.open_session(set.id, &format!("{name}-listener")).await?;
                anyhow::Ok((set.id, s))
            }
        });
        for r in futures::future::join_all(futs).await {
            sets.push(r?);
        }
    }
    let setup_s = setup.elapsed().as_secs_f64();

    let stats = Arc::new(Stats::default());
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut pollers = tokio::task::JoinSet::new();
    for (_, s) in &sets {
        let (c, s, st, stop, stopping) = (c.clone(), s.clone(), stats.clone(), stop.clone(), stopping.clone());
        pollers.spawn(async move {
            let mut last = 0;
            while !stopping.load(Relaxed) {
                st.in_flight.fetch_add(1, Relaxed);
                let r = tokio::select! {
                    r = c.poll(&s.message_queue_url, &s.message_queue_access_token, last, Some(10)) => r,
                    _ = stop.notified() => { st.in_flight.fetch_sub(1, Relaxed); break; }
                };
                st.in_flight.fetch_sub(1, Relaxed);
                match r {
                    Ok(r) if r.status == 200 => {
                        st.polls_200.fetch_add(1, Relaxed);
                        if let Ok(env) = r.json::<MessageEnvelope>() {
                            last = env.message_id;
                            match c.ack(&s.message_queue_url, &s.message_queue_access_token, env.message_id).await {
                                Ok(r) if r.status == 204 => st.acks.fetch_add(1, Relaxed),
                                _ => st.polls_err.fetch_add(1, Relaxed),
                            };
                        }
                    }
                    Ok(r) if r.status == 202 => {
                        st.polls_202.fetch_add(1, Relaxed);
                    }
                    _ => {
                        st.polls_err.fetch_add(1, Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    // Let every poll reach the server before measuring.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats.in_flight.load(Relaxed) < a.scale_sets as i64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let latencies = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(a.rate.max(1))));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut others = tokio::task::JoinSet::new();
    let (mut sent, mut in_flight_min, mut in_flight_max) = (0u64, i64::MAX, 0i64);
    let set_ids: Arc<Vec<i64>> = Arc::new(sets.iter().map(|(id, _)| *id).collect());
    while start.elapsed() < a.duration {
        ticker.tick().await;
        let n = sent;
        sent += 1;
        if n % 50 == 0 {
            let f = stats.in_flight.load(Relaxed);
            in_flight_min = in_flight_min.min(f);
            in_flight_max = in_flight_max.max(f);
        }
        let (c, st, lat, ids, tag) = (c.clone(), stats.clone(), latencies.clone(), set_ids.clone(), run_tag.clone());
        others.spawn(async move {
            let id = ids[(n as usize * 7919) % ids.len()];
            let t = Instant::now();
            let r = match n % 10 {
                0..=3 => c.admin(Method::GET, &format!("_apis/runtime/runnerscalesets/{id}"), &[], None).await,
                4 | 5 => {
                    c.admin(Method::GET, "_apis/distributedtask/pools/0/agents", &[("agentName", "bench-r")], None)
                        .await
                }
                6 => {
                    let body = json!({"name": format!("bench-{}-r{n}", &tag[..8]), "workFolder": ""});
                    c.admin(
                        Method::POST,
                        &format!("_apis/runtime/runnerscalesets/{id}/generatejitconfig"),
                        &[],
                        Some(&body),
                    )
                    .await
                }
                7 => c.admin(Method::GET, "_apis/runtime/runnergroups/", &[("groupName", "Default")], None).await,
                8 => {
                    c.emulator(Method::POST, "jobs", Some(&json!({"scaleSetId": id, "count": 1, "durationSeconds": 1})))
                        .await
                }
                _ => {
                    c.admin(
                        Method::GET,
                        "_apis/runtime/runnerscalesets",
                        &[("runnerGroupId", "1"), ("name", "bench-x")],
                        None,
                    )
                    .await
                }
            };
            let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
            match r {
                Ok(r) if (200..300).contains(&r.status) => st.other_ok.fetch_add(1, Relaxed),
                _ => st.other_err.fetch_add(1, Relaxed),
            };
            lat.lock().unwrap_or_else(|e| e.into_inner()).push(us);
        });
        while others.try_join_next().is_some() {}
    }
    while others.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    let rss = rss_mb();
    stopping.store(true, Relaxed);
    stop.notify_waiters();
    pollers.abort_all();
    while pollers.join_next().await.is_some() {}

    let mut lat = std::mem::take(&mut *latencies.lock().unwrap_or_else(|e| e.into_inner()));
    lat.sort_unstable();
    let ok = stats.other_ok.load(Relaxed);
    let err = stats.other_err.load(Relaxed);
    let report = handle.as_ref().map(|h| h.report());
    let result = json!({
        "emulator": if handle.is_some() { "in-process" } else { "external" },
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "scale_sets": a.scale_sets,
        "setup_s": (setup_s * 10.0).round() / 10.0,
        "duration_s": (elapsed * 10.0).round() / 10.0,
        "target_rate": a.rate,
        "other_requests": ok + err,
        "other_errors": err,
        "achieved_rate": ((ok + err) as f64 / elapsed).round(),
        "latency_ms": {"p50": percentile(&lat, 0.5), "p99": percentile(&lat, 0.99), "max": percentile(&lat, 1.0)},
        "long_polls": {
            "held_min": if in_flight_min == i64::MAX { 0 } else { in_flight_min },
            "held_max": in_flight_max,
            "answered_200": stats.polls_200.load(Relaxed),
            "answered_202": stats.polls_202.load(Relaxed),
            "errors": stats.polls_err.load(Relaxed),
            "acks": stats.acks.load(Relaxed),
        },
        "emulator_requests_recorded": report.as_ref().map(|r| r.requests),
        "rss_mb": rss.map(|r| r.round()),
    });
    let text = serde_json::to_string_pretty(&result)?;
    match &a.out {
        Some(p) => std::fs::write(p, text + "\n").with_context(|| format!("--out {}", p.display()))?,
        None => println!("{text}"),
    }
    if let Some(h) = handle {
        h.shutdown().await;
    }
    Ok(())
}
