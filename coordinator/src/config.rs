//! Command-line flags of `arcfed-coordinator`, validated once into a typed [`Config`].
//!
//! Every flag has an `ARCFED_<FLAG>` env var. A bad value fails at start with the flag's
//! name in the message; nothing is re-validated later.

use crate::core::LeaseConfig;
use crate::tls::TlsPaths;
use clap::{Args, Parser, ValueEnum};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    /// TTL 3s, grace 500ms, heartbeat 100ms, elections 500ms-1s (RTT ≈ 5 ms).
    Lan,
    /// TTL 10s, grace 2s, heartbeat 300ms, elections 1.5s-3s (sized for 150 ms RTT).
    Wan,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// TLS files in cert-manager's layout (`tls.crt`, `tls.key`, `ca.crt`).
#[derive(Args, Clone, Debug)]
pub struct TlsArgs {
    /// PEM certificate chain of this process; its URI SAN spiffe://arcfed/<role>/<name> is its identity.
    #[arg(long, env = "ARCFED_TLS_CERT", value_name = "FILE")]
    pub tls_cert: PathBuf,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "ARCFED_TLS_KEY", value_name = "FILE")]
    pub tls_key: PathBuf,
    /// PEM CA bundle that signs every arcfed certificate; peers from any other CA are refused.
    #[arg(long, env = "ARCFED_TLS_CA", value_name = "FILE")]
    pub tls_ca: PathBuf,
}

impl TlsArgs {
    pub fn paths(&self) -> TlsPaths {
        TlsPaths { cert: self.tls_cert.clone(), key: self.tls_key.clone(), ca: self.tls_ca.clone() }
    }
}

/// Logging flags shared by the binaries.
#[derive(Args, Clone, Debug)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = "ARCFED_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter in tracing's EnvFilter syntax, e.g. `info` or `arcfed_coordinator=debug,info`.
    /// The default also logs refused TLS handshakes (unknown CA, missing client certificate).
    #[arg(long, env = "ARCFED_LOG_LEVEL", default_value = "info,tonic::transport::server::io_stream=debug")]
    pub log_level: String,
}

impl LogArgs {
    pub fn init(&self) {
        let filter = tracing_subscriber::EnvFilter::try_new(&self.log_level)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        use std::io::IsTerminal;
        let b = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal());
        match self.log_format {
            LogFormat::Json => b.json().init(),
            LogFormat::Text => b.init(),
        }
    }
}

/// arcfed-coordinator: one openraft voter of the arcfed quorum.
///
/// It elects one GitHub session holder per federated scale set, with a lease and a fencing
/// token, and serves three gRPC services over mTLS on --listen: peer (Raft, coordinators
/// only), agent (agents only) and admin (admins only). Only the leader serves agents and
/// admins; followers answer UNAVAILABLE and name the leader in the `x-arcfed-leader`
/// metadata. Durations take humantime values (`3s`, `500ms`).
#[derive(Parser, Clone, Debug)]
#[command(name = "arcfed-coordinator", version, about, long_about)]
pub struct Cli {
    /// This voter's Raft node id (a positive integer, unique in the quorum).
    #[arg(long, env = "ARCFED_NODE_ID")]
    pub node_id: u64,
    /// gRPC address (peer, agent and admin services, mTLS).
    #[arg(long, env = "ARCFED_LISTEN", value_name = "HOST:PORT")]
    pub listen: SocketAddr,
    /// HTTP address for /live, /ready and /metrics (plain HTTP; keep it cluster-internal).
    #[arg(long, env = "ARCFED_ADMIN_LISTEN", value_name = "HOST:PORT")]
    pub admin_listen: SocketAddr,
    /// Directory of the Raft log, vote and snapshots (redb, fsync per commit).
    #[arg(long, env = "ARCFED_DATA_DIR", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Every voter of the initial quorum, this one included, as ID=HOST:PORT. Repeat the flag
    /// or comma-separate (env). It is also how this node reaches each peer, so a peer may be
    /// listed behind a proxy. The lowest id bootstraps an empty quorum.
    #[arg(long = "peer", env = "ARCFED_PEER", value_name = "ID=HOST:PORT", value_delimiter = ',', required = true)]
    pub peers: Vec<String>,
    /// Address agents and arcfedctl are redirected to when this node leads (default: --listen).
    #[arg(long, env = "ARCFED_ADVERTISE", value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Timing preset; the flags below override single values of it.
    #[arg(long, env = "ARCFED_PROFILE", value_enum, default_value = "lan")]
    pub profile: Profile,
    /// Member lease TTL (lan 3s, wan 10s). Agents send a keepalive every TTL/4.
    #[arg(long, env = "ARCFED_LEASE_TTL", value_parser = humantime::parse_duration)]
    pub lease_ttl: Option<Duration>,
    /// Least time a closed stream keeps its lease before the fast path may expire it (lan 500ms, wan 2s).
    #[arg(long, env = "ARCFED_RECONNECT_GRACE", value_parser = humantime::parse_duration)]
    pub reconnect_grace: Option<Duration>,
    /// Raft heartbeat interval (lan 100ms, wan 300ms).
    #[arg(long, env = "ARCFED_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Raft election timeout, lower bound (lan 500ms, wan 1.5s).
    #[arg(long, env = "ARCFED_ELECTION_TIMEOUT_MIN", value_parser = humantime::parse_duration)]
    pub election_timeout_min: Option<Duration>,
    /// Raft election timeout, upper bound (lan 1s, wan 3s).
    #[arg(long, env = "ARCFED_ELECTION_TIMEOUT_MAX", value_parser = humantime::parse_duration)]
    pub election_timeout_max: Option<Duration>,
    /// Expected peer round-trip time, used only to check the timing rule (lan 5ms, wan 150ms).
    #[arg(long, env = "ARCFED_RTT", value_parser = humantime::parse_duration)]
    pub rtt: Option<Duration>,
    /// Fence margin as a fraction of the TTL (agents stop holder-only requests at TTL×(1−margin)).
    #[arg(long, env = "ARCFED_FENCE_MARGIN", default_value = "0.333")]
    pub fence_margin: f64,
    /// Bound ρ on the relative clock-rate error between any two processes (0.01 = 1%). One
    /// number used by the lessor's fast path and Silent rule (TTL×(1−margin)×(1+2ρ)) and by
    /// the startup timing-rule check.
    #[arg(long, env = "ARCFED_MAX_CLOCK_DRIFT", default_value = "0.01")]
    pub max_clock_drift: f64,
    /// Default handover deadline for `arcfedctl handover` and drains.
    #[arg(long, env = "ARCFED_HANDOVER_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub handover_timeout: Duration,
    /// Build a Raft snapshot (and purge the log before it) every this many entries.
    #[arg(long, env = "ARCFED_SNAPSHOT_EVERY", default_value = "5000")]
    pub snapshot_every: u64,
    #[command(flatten)]
    pub log: LogArgs,
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_id: u64,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub advertise: String,
    pub data_dir: PathBuf,
    pub peers: BTreeMap<u64, String>,
    pub tls: TlsPaths,
    pub lease: LeaseConfig,
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    pub handover_timeout: Duration,
    pub snapshot_every: u64,
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

impl Cli {
    pub fn validate(&self) -> Result<Config, String> {
        if self.node_id == 0 {
            return Err("--node-id must be a positive integer".into());
        }
        let mut peers = BTreeMap::new();
        for p in &self.peers {
            let (id, addr) = p.split_once('=').ok_or_else(|| format!("--peer {p:?}: expected ID=HOST:PORT"))?;
            let id: u64 = id.trim().parse().map_err(|_| format!("--peer {p:?}: {id:?} is not a node id"))?;
            let addr = addr.trim();
            if id == 0 {
                return Err(format!("--peer {p:?}: node ids start at 1"));
            }
            if addr.rsplit_once(':').and_then(|(_, port)| port.parse::<u16>().ok()).is_none() {
                return Err(format!("--peer {p:?}: {addr:?} is not HOST:PORT"));
            }
            if peers.insert(id, addr.to_string()).is_some() {
                return Err(format!("--peer: node id {id} is listed twice"));
            }
        }
        if !peers.contains_key(&self.node_id) {
            return Err(format!("--peer must list this node (--node-id {}) too", self.node_id));
        }
        let (ttl, grace, hb, emin, emax, rtt) = match self.profile {
            Profile::Lan => (3000, 500, 100, 500, 1000, 5),
            Profile::Wan => (10_000, 2000, 300, 1500, 3000, 150),
        };
        let ttl = self.lease_ttl.map(ms).unwrap_or(ttl);
        let grace = self.reconnect_grace.map(ms).unwrap_or(grace);
        let hb = self.heartbeat_interval.map(ms).unwrap_or(hb);
        let emin = self.election_timeout_min.map(ms).unwrap_or(emin);
        let emax = self.election_timeout_max.map(ms).unwrap_or(emax);
        let rtt = self.rtt.map(ms).unwrap_or(rtt);
        if ttl < 100 {
            return Err(format!("--lease-ttl {ttl}ms is too short (at least 100ms)"));
        }
        if !(0.05..=0.9).contains(&self.fence_margin) {
            return Err(format!("--fence-margin {} must be within 0.05..=0.9", self.fence_margin));
        }
        // NaN fails the range check too.
        if !(0.0..=0.1).contains(&self.max_clock_drift) {
            return Err(format!(
                "--max-clock-drift {} must be within 0..=0.1 (a relative clock-rate error; 0.01 = 1%)",
                self.max_clock_drift
            ));
        }
        if hb == 0 || hb >= emin {
            return Err(format!(
                "--heartbeat-interval ({hb}ms) must be > 0 and below --election-timeout-min ({emin}ms)"
            ));
        }
        if emin >= emax {
            return Err(format!("--election-timeout-min ({emin}ms) must be below --election-timeout-max ({emax}ms)"));
        }
        let lease = LeaseConfig {
            ttl_ms: ttl,
            margin_permille: (self.fence_margin * 1000.0).round() as u64,
            reconnect_grace_ms: grace,
            rho_permille: (self.max_clock_drift * 1000.0).round() as u64,
        };
        // DESIGN §4 timing rule: a leader change must not pause intake past the fence. The
        // path is timed on the voters' clocks and the fence on the agent's, so the path is
        // stretched by (1 + 2ρ), the same factor the lessor uses.
        let path = emax + 4 * rtt + ttl / 4;
        let need = path.saturating_mul(1000 + 2 * lease.rho_permille) / 1000;
        if need >= lease.fence_ms() {
            return Err(format!(
                "timing rule violated: (--election-timeout-max ({emax}ms) + 4×--rtt ({rtt}ms) + --lease-ttl/4 ({}ms)) \
                 × (1 + 2×--max-clock-drift ({})) = {need}ms must stay below --lease-ttl×(1−--fence-margin) = {}ms; \
                 raise --lease-ttl or lower the election timeouts",
                ttl / 4,
                self.max_clock_drift,
                lease.fence_ms()
            ));
        }
        if self.snapshot_every < 10 {
            return Err("--snapshot-every must be at least 10".into());
        }
        Ok(Config {
            node_id: self.node_id,
            listen: self.listen,
            admin_listen: self.admin_listen,
            advertise: self.advertise.clone().unwrap_or_else(|| self.listen.to_string()),
            data_dir: self.data_dir.clone(),
            peers,
            tls: self.tls.paths(),
            lease,
            heartbeat: Duration::from_millis(hb),
            election_min: Duration::from_millis(emin),
            election_max: Duration::from_millis(emax),
            handover_timeout: self.handover_timeout,
            snapshot_every: self.snapshot_every,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<&'static str> {
        vec![
            "arcfed-coordinator",
            "--node-id",
            "1",
            "--listen",
            "127.0.0.1:7001",
            "--admin-listen",
            "127.0.0.1:8001",
            "--data-dir",
            "/tmp/x",
            "--peer",
            "1=127.0.0.1:7001",
            "--peer",
            "2=127.0.0.1:7002",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
            "--tls-ca",
            "a",
        ]
    }

    #[test]
    fn profiles_satisfy_the_timing_rule() {
        for p in ["lan", "wan"] {
            let mut args = base();
            args.extend(["--profile", p]);
            let cfg = Cli::try_parse_from(args).expect("parse").validate().expect("valid");
            assert!(cfg.election_max.as_millis() as u64 + cfg.lease.ttl_ms / 4 < cfg.lease.fence_ms());
        }
    }

    #[test]
    fn max_clock_drift_is_the_one_rho_of_the_lessor_and_the_timing_rule() {
        let cfg = Cli::try_parse_from(base()).expect("parse").validate().expect("valid");
        assert_eq!(cfg.lease.rho_permille, 10, "default 0.01");
        let mut args = base();
        args.extend(["--max-clock-drift", "0.05"]);
        let cfg = Cli::try_parse_from(args).expect("parse").validate().expect("valid");
        assert_eq!(cfg.lease.rho_permille, 50);
        // The fast path and the Silent rule both use fence_bound_ms, which grows with ρ.
        assert_eq!(cfg.lease.fence_bound_ms(), 2001 * 1100 / 1000);
        // A configuration that fits the timing rule at ρ = 0 but not with the drift stretch:
        // (emax 1200 + 4×5 + 750) = 1970ms < 2001ms, but × 1.2 = 2364ms ≥ 2001ms.
        let tight = ["--election-timeout-max", "1200ms"];
        let mut args = base();
        args.extend(tight);
        args.extend(["--max-clock-drift", "0"]);
        Cli::try_parse_from(args).expect("parse").validate().expect("fits without drift");
        let mut args = base();
        args.extend(tight);
        args.extend(["--max-clock-drift", "0.1"]);
        let err = Cli::try_parse_from(args).expect("parse").validate().expect_err("drift breaks it");
        assert!(err.contains("timing rule") && err.contains("--max-clock-drift"), "{err}");
    }

    #[test]
    fn bad_values_name_the_flag() {
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (vec!["--lease-ttl", "1s"], "timing rule"),
            (vec!["--peer", "x=1"], "--peer"),
            (vec!["--fence-margin", "2"], "--fence-margin"),
            (vec!["--election-timeout-min", "2s"], "--election-timeout-min"),
            (vec!["--max-clock-drift", "0.5"], "--max-clock-drift"),
            (vec!["--max-clock-drift=-0.01"], "--max-clock-drift"),
            (vec!["--max-clock-drift", "NaN"], "--max-clock-drift"),
        ];
        for (extra, want) in cases {
            let mut args = base();
            args.extend(extra.iter().copied());
            let err = Cli::try_parse_from(args).expect("parse").validate().expect_err("must fail");
            assert!(err.contains(want), "{err} should mention {want}");
        }
        let mut args = base();
        args[2] = "9";
        assert!(Cli::try_parse_from(args).expect("parse").validate().expect_err("fail").contains("--peer must list"));
    }
}
