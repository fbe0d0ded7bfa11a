//! Flags, env and ARC's listener config JSON, validated once into a typed [`Config`].
//!
//! ```text
//!  argv + ARCFED_* env ──clap──▶ Args ─┐
//!                                      ├─ merge (a flag beats a file key) ─▶ validate ─▶ Config
//!  LISTENER_CONFIG_PATH JSON ──────────┘                                    │
//!                                                                           └─▶ ConfigError naming the key/flag
//! ```
//! The JSON is the file ARC's controller writes for its listener (reference §5.1), so the agent
//! drops into ARC's `listenerTemplate` unchanged. Every key is read and checked with ARC's rules;
//! the checks ARC does not have (cluster, coordinator TLS, `--github-resolve`, weight) are ours.
//! Nothing is re-validated later, and every error names the JSON key and/or the flag.

use crate::github::{Credentials, GitHubSettings, Resolve};
use crate::metrics::{GhaMetricsSpec, MetricLabels};
use arcfed_proto::tls::{Identity, Role, TlsError, TlsPaths};
use clap::{Parser, ValueEnum};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// ARC's listener reads its config from this env var (set by the controller to
/// `/etc/gha-listener/config.json`).
pub const LISTENER_CONFIG_ENV: &str = "LISTENER_CONFIG_PATH";
/// The arcfed spelling of the same setting, used when `LISTENER_CONFIG_PATH` is not set.
pub const ARCFED_LISTENER_CONFIG_ENV: &str = "ARCFED_LISTENER_CONFIG";
/// Overrides [`fail_slowly`]'s delay (humantime, e.g. `1s`); for tests and impatient humans.
pub const FAIL_DELAY_ENV: &str = "ARCFED_CONFIG_ERROR_DELAY";
/// How long a bad configuration sleeps before exiting (ARC recreates a dead listener pod at once).
pub const DEFAULT_FAIL_DELAY: Duration = Duration::from_secs(30);
/// ARC's `maxRunners` when the AutoscalingRunnerSet leaves it unset.
pub const UNBOUNDED_MAX_RUNNERS: i64 = 2_147_483_647;
/// The admin address when neither `--admin-listen` nor a listener config says otherwise: ARC's
/// controller default (`--listener-metrics-addr=:8080`), the port its listener pod declares.
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:8080";

/// Timing preset for the lease (DESIGN §4); must match the coordinators' `--profile`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    /// Lease TTL 3s: regions on one LAN or a low-latency backbone.
    Lan,
    /// Lease TTL 10s: regions across a WAN (≈150 ms RTT).
    Wan,
}

impl Profile {
    pub fn lease_ttl(self) -> Duration {
        match self {
            Profile::Lan => Duration::from_secs(3),
            Profile::Wan => Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Patch this cluster's EphemeralRunnerSet through the Kubernetes API (in-cluster or KUBECONFIG).
    Kube,
    /// ARC's ERS controller as a model, driving the emulator's simulated runners (tests, sandbox).
    Sim,
}

pub use arcfed_proto::ops::LogFormat;

/// Where assignments land.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    Kube,
    Sim { state_file: PathBuf },
}

/// The log settings after merging flags and the listener config's `log_level`/`log_format`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive string, already checked to parse.
    pub filter: String,
}

/// arcfed-agent: a drop-in for ARC's listener container that holds the GitHub session of a
/// federated scale set only while the arcfed coordinator quorum says so.
///
/// Configuration comes from ARC's listener config JSON (`--listener-config`, by default the file
/// named by $LISTENER_CONFIG_PATH, which ARC's controller sets) and from flags; every flag also
/// reads an `ARCFED_<FLAG>` env var. A flag (or its env var) beats the same key in the file; when
/// any GitHub credential flag is given, the credentials come from the flags alone. Without a
/// file, the GitHub flags are required.
///
/// Without --coordinator the agent runs standalone: a single-cluster ARC listener that records
/// its session on its EphemeralRunnerSet and never crash-loops on a 409.
///
/// A bad configuration prints an error naming the JSON key or the flag, then sleeps 30s before
/// exiting non-zero, because ARC recreates a dead listener pod at once with no backoff
/// (ARCFED_CONFIG_ERROR_DELAY changes the 30s). Durations take humantime values (`3s`, `500ms`).
#[derive(Parser, Clone, Debug)]
#[command(name = "arcfed-agent", version = arcfed_proto::ops::version_line(), about, long_about)]
pub struct Args {
    /// ARC's listener config JSON (reference §5.1: configure_url, github_token or github_app_*,
    /// ephemeral_runner_set_*, runner_scale_set_*, min/max_runners, server_root_ca, log_*,
    /// metrics_*). Read from $LISTENER_CONFIG_PATH (ARC's contract) or, when that is unset,
    /// $ARCFED_LISTENER_CONFIG. Unknown keys are ignored with a warning; vault keys are refused.
    #[arg(long, env = "LISTENER_CONFIG_PATH", value_name = "FILE")]
    pub listener_config: Option<PathBuf>,
    /// Same as --listener-config, read only when it and $LISTENER_CONFIG_PATH are absent.
    #[arg(long = "listener-config-fallback", env = "ARCFED_LISTENER_CONFIG", value_name = "FILE", hide = true)]
    pub listener_config_fallback: Option<PathBuf>,

    /// This cluster's name in the federation. It must equal the name in the agent certificate's
    /// URI SAN (spiffe://arcfed/agent/<cluster>); required with --coordinator. Standalone default:
    /// `standalone`. Letters, digits, `.`, `_`, `-`.
    #[arg(long, env = "ARCFED_CLUSTER", value_name = "NAME")]
    pub cluster: Option<String>,
    /// A coordinator voter's gRPC address. Repeat the flag (or comma-separate the env var) for
    /// each voter; the agent follows the leader. Without it the agent runs standalone.
    #[arg(long = "coordinator", env = "ARCFED_COORDINATOR", value_name = "HOST:PORT", value_delimiter = ',')]
    pub coordinators: Vec<String>,
    #[command(flatten)]
    pub tls: arcfed_proto::ops::TlsArgs,

    /// Where assignments land: `kube` patches this cluster's EphemeralRunnerSet (needs nothing
    /// beyond ARC's listener Role); `sim` drives the emulator's simulated runners (tests).
    #[arg(long, env = "ARCFED_RUNNER_BACKEND", value_enum, default_value = "kube")]
    pub runner_backend: BackendKind,
    /// State file of the `sim` backend (required with --runner-backend sim, refused otherwise).
    #[arg(long, env = "ARCFED_SIM_STATE_FILE", value_name = "FILE")]
    pub sim_state_file: Option<PathBuf>,

    /// Plain-HTTP address of /live, /ready and /metrics. Default: the listener config's
    /// metrics_addr (`:8080` means 0.0.0.0:8080; empty turns the server off, as in ARC), or
    /// 0.0.0.0:8080 (ARC's default listener metrics port) without a config file. `off` disables it.
    #[arg(long, env = "ARCFED_ADMIN_LISTEN", value_name = "HOST:PORT")]
    pub admin_listen: Option<String>,
    /// Path of the metrics endpoint. Default: the listener config's metrics_endpoint, else /metrics.
    #[arg(long, env = "ARCFED_METRICS_PATH", value_name = "PATH")]
    pub metrics_path: Option<String>,

    /// This cluster's share of waiting jobs relative to the other members (0 = only busy and
    /// minimum runners, never a share of the waiting jobs).
    #[arg(long, env = "ARCFED_WEIGHT", default_value_t = 1, allow_negative_numbers = true)]
    pub weight: i64,
    /// Session-holder preference: when a holder is needed, the live member with the lowest
    /// priority is granted first (ties: lowest load, then cluster name). No automatic fail-back.
    #[arg(long, env = "ARCFED_PRIORITY", default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i64,
    /// Lease timing preset; must match the coordinators' --profile. Sets --lease-ttl's default.
    #[arg(long, env = "ARCFED_PROFILE", value_enum, default_value = "lan")]
    pub profile: Profile,
    /// Member lease TTL (default from --profile: lan 3s, wan 10s). The agent sends a keepalive
    /// every TTL/4 and stops holder-only requests at TTL×(1−margin) after an acked keepalive.
    #[arg(long, env = "ARCFED_LEASE_TTL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub lease_ttl: Option<Duration>,
    /// After the quorum has been unreachable this long, contend for the GitHub session directly
    /// (fail-static fallback, DESIGN §5.11).
    #[arg(long, env = "ARCFED_COORDINATOR_LOST_FOR", value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "60s")]
    pub coordinator_lost_for: Duration,
    /// A holder with no successful session create or poll for this long, for a local reason
    /// (transport, TLS, 401/403, 5xx), releases the session so another member serves.
    #[arg(long, env = "ARCFED_HOLDER_STALL", value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "15s")]
    pub holder_stall: Duration,
    /// Obey failover drills relayed by the coordinator (`arcfedctl drill`): crash = exit at once without
    /// releasing anything, freeze = stop the agent loop for a while. Without it a drill is logged and
    /// refused. Never in production.
    #[arg(long, env = "ARCFED_ALLOW_DRILLS")]
    pub allow_drills: bool,
    /// Connect to ADDR for GitHub host HOST on PORT, like curl's --resolve (split-horizon DNS,
    /// tests). Repeat the flag or comma-separate the env var.
    #[arg(long, env = "ARCFED_GITHUB_RESOLVE", value_name = "HOST:PORT:ADDR", value_delimiter = ',')]
    pub github_resolve: Vec<String>,
    /// Identity of this process in session owner names (arcfed/<cluster>/<owner>/t<token>) and
    /// logs. Default: the hostname, i.e. the pod name, as ARC's listener uses.
    #[arg(long, env = "ARCFED_OWNER_NAME", value_name = "NAME")]
    pub owner_name: Option<String>,
    #[command(flatten)]
    pub log: arcfed_proto::ops::LogArgs,

    /// GitHub URL of the scale set's scope: https://<host>/<org>, /<org>/<repo> or
    /// /enterprises/<name> (listener config key configure_url).
    #[arg(long, env = "ARCFED_GITHUB_CONFIG_URL", value_name = "URL")]
    pub github_config_url: Option<String>,
    /// Personal access token (key github_token). Prefer the env var: flags show in `ps`.
    #[arg(long, env = "ARCFED_GITHUB_TOKEN", value_name = "PAT", hide_env_values = true)]
    pub github_token: Option<String>,
    /// GitHub App ID or Client ID (key github_app_id); needs the two flags below too.
    #[arg(long, env = "ARCFED_GITHUB_APP_ID", value_name = "ID")]
    pub github_app_id: Option<String>,
    /// GitHub App installation id (key github_app_installation_id).
    #[arg(long, env = "ARCFED_GITHUB_APP_INSTALLATION_ID", value_name = "ID")]
    pub github_app_installation_id: Option<i64>,
    /// PEM file of the GitHub App's private key (key github_app_private_key holds the PEM itself).
    #[arg(long, env = "ARCFED_GITHUB_APP_PRIVATE_KEY_FILE", value_name = "FILE")]
    pub github_app_private_key_file: Option<PathBuf>,
    /// PEM file of an extra root CA for GitHub Enterprise Server (key server_root_ca holds the PEM).
    #[arg(long, env = "ARCFED_GITHUB_ROOT_CA_FILE", value_name = "FILE")]
    pub github_root_ca_file: Option<PathBuf>,
    /// Runner scale set id, as ARC stores it in the runner-scale-set-id annotation (key
    /// runner_scale_set_id). Agents never create scale sets.
    #[arg(long, env = "ARCFED_SCALE_SET_ID", value_name = "ID")]
    pub scale_set_id: Option<i64>,
    /// AutoscalingRunnerSet object name (key runner_scale_set_name); used in logs.
    #[arg(long, env = "ARCFED_SCALE_SET_NAME", value_name = "NAME")]
    pub scale_set_name: Option<String>,
    /// Namespace of this cluster's EphemeralRunnerSet (key ephemeral_runner_set_namespace).
    #[arg(long, env = "ARCFED_ERS_NAMESPACE", value_name = "NAMESPACE")]
    pub ers_namespace: Option<String>,
    /// Name of this cluster's EphemeralRunnerSet (key ephemeral_runner_set_name).
    #[arg(long, env = "ARCFED_ERS_NAME", value_name = "NAME")]
    pub ers_name: Option<String>,
    /// Minimum idle runners in this cluster (key min_runners; default 0).
    #[arg(long, env = "ARCFED_MIN_RUNNERS", value_name = "N", allow_negative_numbers = true)]
    pub min_runners: Option<i64>,
    /// Maximum runners in this cluster (key max_runners; default 2147483647, as ARC).
    #[arg(long, env = "ARCFED_MAX_RUNNERS", value_name = "N")]
    pub max_runners: Option<i64>,
}

/// Validated configuration: everything the driver needs, checked once.
#[derive(Clone, Debug)]
pub struct Config {
    pub github: GitHubSettings,
    pub scale_set_name: String,
    pub ers_namespace: String,
    pub ers_name: String,
    pub min_runners: i64,
    pub max_runners: i64,
    pub cluster: String,
    pub owner_name: String,
    /// Coordinator voters; empty = standalone.
    pub coordinators: Vec<String>,
    /// Present exactly when `coordinators` is not empty.
    pub tls: Option<TlsPaths>,
    pub weight: i64,
    pub priority: i64,
    pub lease_ttl: Duration,
    pub profile: Profile,
    pub runner_backend: Backend,
    /// None = no admin server (the listener config's metrics_addr was empty, or `off`).
    pub admin_listen: Option<SocketAddr>,
    pub metrics_path: String,
    pub allow_drills: bool,
    pub coordinator_lost_for: Duration,
    pub holder_stall: Duration,
    pub log: LogSettings,
    /// Values of ARC's scale-set labels: enterprise/organization/repository from configure_url,
    /// name/namespace = the EphemeralRunnerSet.
    pub metrics_labels: MetricLabels,
    /// Which gha_* metrics to export, with which labels and buckets (the file's `metrics` key).
    pub gha_metrics: GhaMetricsSpec,
    /// The listener config file that was read, if any.
    pub listener_config: Option<PathBuf>,
    /// Things ignored on the way (unknown JSON keys, unknown metric names), to log once logging
    /// is set up.
    pub warnings: Vec<String>,
}

impl Config {
    /// True when no coordinator is configured (DESIGN §5.12).
    pub fn standalone(&self) -> bool {
        self.coordinators.is_empty()
    }

    /// Merges flags and the listener config file, and validates the result.
    pub fn from_args(args: Args) -> Result<Config, ConfigError> {
        build(args)
    }
}

/// A bad configuration. Each message names the JSON key and/or the flag it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
    #[error("{flag} {}: cannot read: {source}", path.display())]
    Read { flag: &'static str, path: PathBuf, source: std::io::Error },
    #[error("--listener-config {}: {problem}", path.display())]
    Json { path: PathBuf, problem: String },
    #[error("{0}")]
    Tls(#[from] TlsError),
}

impl ConfigError {
    fn invalid(key: impl fmt::Display, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { key: key.to_string(), problem: problem.into() }
    }
}

/// A setting's names: its listener-config key (if it has one) and its flag.
#[derive(Clone, Copy)]
struct Key {
    json: Option<&'static str>,
    flag: &'static str,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.json {
            Some(j) => write!(f, "{j} (--{})", self.flag),
            None => write!(f, "--{}", self.flag),
        }
    }
}

const fn key(json: &'static str, flag: &'static str) -> Key {
    Key { json: Some(json), flag }
}
const fn flag(flag: &'static str) -> Key {
    Key { json: None, flag }
}

const K_URL: Key = key("configure_url", "github-config-url");
const K_TOKEN: Key = key("github_token", "github-token");
const K_APP_ID: Key = key("github_app_id", "github-app-id");
const K_APP_INST: Key = key("github_app_installation_id", "github-app-installation-id");
const K_APP_KEY: Key = key("github_app_private_key", "github-app-private-key-file");
const K_ROOT_CA: Key = key("server_root_ca", "github-root-ca-file");
const K_SS_ID: Key = key("runner_scale_set_id", "scale-set-id");
const K_ERS_NS: Key = key("ephemeral_runner_set_namespace", "ers-namespace");
const K_ERS_NAME: Key = key("ephemeral_runner_set_name", "ers-name");
const K_MIN: Key = key("min_runners", "min-runners");
const K_MAX: Key = key("max_runners", "max-runners");
const K_LOG_LEVEL: Key = key("log_level", "log-level");
const K_LOG_FORMAT: Key = key("log_format", "log-format");
const K_ADMIN: Key = key("metrics_addr", "admin-listen");
const K_METRICS_PATH: Key = key("metrics_endpoint", "metrics-path");

/// Every key of ARC's listener config (reference §5.1).
const KNOWN_KEYS: &[&str] = &[
    "configure_url",
    "vault_type",
    "vault_lookup_key",
    "azure_key_vault",
    "github_app_id",
    "github_app_installation_id",
    "github_app_private_key",
    "github_token",
    "ephemeral_runner_set_namespace",
    "ephemeral_runner_set_name",
    "max_runners",
    "min_runners",
    "runner_scale_set_id",
    "runner_scale_set_name",
    "server_root_ca",
    "log_level",
    "log_format",
    "metrics_addr",
    "metrics_endpoint",
    "metrics",
];

/// ARC's listener config JSON, key by key. Absent, `null` and (for strings) empty values are
/// all `None`, as Go's zero values are to ARC.
#[derive(Clone, Debug, Default)]
pub struct ListenerFile {
    pub configure_url: Option<String>,
    pub vault_type: Option<String>,
    pub vault_lookup_key: Option<String>,
    pub azure_key_vault: Option<Value>,
    pub github_app_id: Option<String>,
    pub github_app_installation_id: Option<i64>,
    pub github_app_private_key: Option<String>,
    pub github_token: Option<String>,
    pub ephemeral_runner_set_namespace: Option<String>,
    pub ephemeral_runner_set_name: Option<String>,
    pub max_runners: Option<i64>,
    pub min_runners: Option<i64>,
    pub runner_scale_set_id: Option<i64>,
    pub runner_scale_set_name: Option<String>,
    pub server_root_ca: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    /// `Some("")` is kept: an explicit empty metrics_addr turns ARC's metrics server off.
    pub metrics_addr: Option<String>,
    pub metrics_endpoint: Option<String>,
    pub metrics: Option<Value>,
    /// Keys ARC's listener does not know; ignored.
    pub unknown_keys: Vec<String>,
}

/// ARC before 0.8 (its `githubrunnerscalesetlistener`) wrote the same settings in camelCase,
/// with zero values for unset ones; each maps to the key of later releases.
const LEGACY_KEYS: &[(&str, &str)] = &[
    ("configureUrl", "configure_url"),
    ("appID", "github_app_id"),
    ("appInstallationID", "github_app_installation_id"),
    ("appPrivateKey", "github_app_private_key"),
    ("token", "github_token"),
    ("ephemeralRunnerSetNamespace", "ephemeral_runner_set_namespace"),
    ("ephemeralRunnerSetName", "ephemeral_runner_set_name"),
    ("maxRunners", "max_runners"),
    ("minRunners", "min_runners"),
    ("runnerScaleSetId", "runner_scale_set_id"),
    ("runnerScaleSetName", "runner_scale_set_name"),
    ("serverRootCA", "server_root_ca"),
    ("logLevel", "log_level"),
    ("logFormat", "log_format"),
    ("metricsAddr", "metrics_addr"),
    ("metricsEndpoint", "metrics_endpoint"),
];

/// Rewrites ARC < 0.8's keys to today's when the file has no today's key at all: an App id
/// or installation id of 0 means unset there, and a metrics address "0" means off.
fn from_legacy(map: &mut Map<String, Value>) {
    if LEGACY_KEYS.iter().any(|(_, new)| map.contains_key(*new)) || !map.contains_key("configureUrl") {
        return;
    }
    for (old, new) in LEGACY_KEYS {
        if let Some(v) = map.remove(*old) {
            let unset = match (*old, &v) {
                ("appID" | "appInstallationID", Value::Number(n)) => n.as_i64() == Some(0),
                ("metricsAddr", Value::String(a)) => a == "0",
                _ => false,
            };
            map.insert((*new).to_string(), if unset { Value::String(String::new()) } else { v });
        }
    }
    if map.get("github_app_installation_id").is_some_and(|v| v.as_str() == Some("")) {
        map.remove("github_app_installation_id");
    }
}

impl ListenerFile {
    /// Parses the JSON text of a listener config (ARC's current keys, or ARC < 0.8's camelCase
    /// ones). A value of the wrong type is an error naming its key.
    pub fn parse(text: &str) -> Result<ListenerFile, String> {
        let mut map: Map<String, Value> = match serde_json::from_str(text) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err("not a JSON object".into()),
            Err(e) => return Err(format!("not valid JSON: {e}")),
        };
        from_legacy(&mut map);
        let mut unknown_keys: Vec<String> = map.keys().filter(|k| !KNOWN_KEYS.contains(&k.as_str())).cloned().collect();
        unknown_keys.sort();
        let str_of = |m: &mut Map<String, Value>, k: &str| -> Result<Option<String>, String> {
            Ok(take::<String>(m, k)?.filter(|s| !s.is_empty()))
        };
        Ok(ListenerFile {
            configure_url: str_of(&mut map, "configure_url")?,
            vault_type: str_of(&mut map, "vault_type")?,
            vault_lookup_key: str_of(&mut map, "vault_lookup_key")?,
            azure_key_vault: map.remove("azure_key_vault").filter(|v| !v.is_null()),
            github_app_id: take_string_or_number(&mut map, "github_app_id")?,
            github_app_installation_id: take_int_or_digits(&mut map, "github_app_installation_id")?,
            github_app_private_key: str_of(&mut map, "github_app_private_key")?,
            github_token: str_of(&mut map, "github_token")?,
            ephemeral_runner_set_namespace: str_of(&mut map, "ephemeral_runner_set_namespace")?,
            ephemeral_runner_set_name: str_of(&mut map, "ephemeral_runner_set_name")?,
            max_runners: take::<i64>(&mut map, "max_runners")?,
            min_runners: take::<i64>(&mut map, "min_runners")?,
            runner_scale_set_id: take::<i64>(&mut map, "runner_scale_set_id")?,
            runner_scale_set_name: str_of(&mut map, "runner_scale_set_name")?,
            server_root_ca: str_of(&mut map, "server_root_ca")?,
            log_level: str_of(&mut map, "log_level")?,
            log_format: str_of(&mut map, "log_format")?,
            metrics_addr: take::<String>(&mut map, "metrics_addr")?,
            metrics_endpoint: str_of(&mut map, "metrics_endpoint")?,
            metrics: map.remove("metrics").filter(|v| !v.is_null()),
            unknown_keys,
        })
    }
}

fn take<T: DeserializeOwned>(m: &mut Map<String, Value>, k: &str) -> Result<Option<T>, String> {
    match m.remove(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v).map(Some).map_err(|e| format!("{k}: {e}")),
    }
}

/// `github_app_id` is a string in ARC's secret (App ID or Client ID); a bare number is accepted too.
fn take_string_or_number(m: &mut Map<String, Value>, k: &str) -> Result<Option<String>, String> {
    match m.remove(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s).filter(|s| !s.is_empty())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(v) => Err(format!("{k}: expected a string, found {v}")),
    }
}

/// `github_app_installation_id` is an int64; a string of digits is accepted too.
fn take_int_or_digits(m: &mut Map<String, Value>, k: &str) -> Result<Option<i64>, String> {
    match m.remove(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| format!("{k}: {n} is not an int64")),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => s.trim().parse().map(Some).map_err(|_| format!("{k}: {s:?} is not an int64")),
        Some(v) => Err(format!("{k}: expected an integer, found {v}")),
    }
}

/// Parses `HOST:PORT:ADDR` (ADDR may be a bracketed or bare IPv6 address).
pub fn parse_resolve(s: &str) -> Result<Resolve, String> {
    let bad = |why: &str| format!("{s:?}: {why}; expected HOST:PORT:ADDR");
    let (host, rest) = s.split_once(':').ok_or_else(|| bad("missing PORT"))?;
    let (port, addr) = rest.split_once(':').ok_or_else(|| bad("missing ADDR"))?;
    if host.is_empty() {
        return Err(bad("empty HOST"));
    }
    let port: u16 = port.parse().map_err(|_| bad("PORT is not a port number"))?;
    let addr = addr.strip_prefix('[').and_then(|a| a.strip_suffix(']')).unwrap_or(addr);
    let addr: IpAddr = addr.parse().map_err(|_| bad("ADDR is not an IP address"))?;
    Ok(Resolve { host: host.to_ascii_lowercase(), port, addr })
}

/// Parses an address in Go's style too: `:8080` means every IPv4 interface.
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    let full = if s.starts_with(':') { format!("0.0.0.0{s}") } else { s.to_string() };
    full.parse().map_err(|_| format!("{s:?} is not HOST:PORT (an IP address and a port, or :PORT)"))
}

/// `HOST:PORT` with a non-empty host and a numeric port.
fn check_host_port(s: &str) -> Result<(), String> {
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!("{s:?} is not HOST:PORT")),
    }
}

/// The scope a `configure_url` points at (reference §1.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub enterprise: String,
    pub organization: String,
    pub repository: String,
}

/// Parses `configure_url` as ARC does: 1 path segment = org, `enterprises/<e>` = enterprise,
/// 2 other segments = repository; anything else is refused.
pub fn parse_configure_url(url: &str) -> Result<Scope, String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!("{url:?}: scheme must be https (or http)"));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(format!("{url:?}: no host"));
    }
    let segs: Vec<&str> = u.path().trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let s = |v: &str| v.to_string();
    match segs.as_slice() {
        [org] => Ok(Scope { enterprise: String::new(), organization: s(org), repository: String::new() }),
        [first, ent] if first.eq_ignore_ascii_case("enterprises") => {
            Ok(Scope { enterprise: s(ent), organization: String::new(), repository: String::new() })
        }
        [org, repo] => Ok(Scope { enterprise: String::new(), organization: s(org), repository: s(repo) }),
        _ => Err(format!("{url:?}: invalid config URL, should point to an enterprise, org, or repository")),
    }
}

/// The hostname, as Go's `os.Hostname()` reads it on Linux; a random UUID if there is none
/// (ARC's fallback).
pub fn default_owner_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

fn read_file(flag: &'static str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { flag, path: path.to_path_buf(), source })
}

fn check_private_key(k: Key, pem: &str) -> Result<(), ConfigError> {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map(drop)
        .map_err(|e| ConfigError::invalid(k, format!("not a PEM private key: {e}")))
}

fn check_root_ca(k: Key, pem: &str) -> Result<(), ConfigError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    match certs {
        Ok(c) if !c.is_empty() => Ok(()),
        Ok(_) => Err(ConfigError::invalid(k, "no PEM certificate found")),
        Err(e) => Err(ConfigError::invalid(k, format!("not PEM certificates: {e}"))),
    }
}

/// ARC's logger levels; `debug` is narrowed to arcfed's own crates so HTTP/kube internals stay quiet.
fn filter_from_arc_level(level: &str) -> Result<String, ConfigError> {
    match level {
        "debug" => Ok("info,arcfed_agent=debug,arcfed_agent_core=debug".into()),
        "info" | "warn" | "error" => Ok(level.to_string()),
        other => Err(ConfigError::invalid(
            K_LOG_LEVEL,
            format!("{other:?}: the listener config accepts debug, info, warn or error"),
        )),
    }
}

fn build(a: Args) -> Result<Config, ConfigError> {
    let mut warnings = Vec::new();
    let listener_config = a.listener_config.clone().or(a.listener_config_fallback.clone());
    let file = match &listener_config {
        Some(path) => {
            let text = read_file("--listener-config", path)?;
            ListenerFile::parse(&text).map_err(|problem| ConfigError::Json { path: path.clone(), problem })?
        }
        None => ListenerFile::default(),
    };
    for k in &file.unknown_keys {
        warnings.push(format!("listener config: unknown key {k:?} ignored"));
    }

    // Vault: ARC fetches the credentials from Azure Key Vault; we refuse rather than guess.
    if let Some(v) = &file.vault_type {
        return Err(ConfigError::invalid(
            "vault_type",
            format!(
                "vault_type {v} is not supported by arcfed-agent; put github_token or github_app_* in the \
                 listener config (or use --github-token / --github-app-*)"
            ),
        ));
    }
    if file.vault_lookup_key.is_some() || file.azure_key_vault.is_some() {
        return Err(ConfigError::invalid(
            "vault_lookup_key/azure_key_vault",
            "vault_type azure_key_vault is not supported by arcfed-agent; put github_token or github_app_* in \
             the listener config (or use --github-token / --github-app-*)",
        ));
    }

    // GitHub settings: a flag beats its key.
    let configure_url = a.github_config_url.clone().or(file.configure_url.clone()).unwrap_or_default();
    let configure_url = configure_url.trim().trim_end_matches('/').to_string();
    if configure_url.is_empty() {
        return Err(ConfigError::invalid(K_URL, "must not be empty (GitHubConfigUrl is not provided)"));
    }
    let scope = parse_configure_url(&configure_url).map_err(|p| ConfigError::invalid(K_URL, p))?;

    let ers_namespace = a.ers_namespace.clone().or(file.ephemeral_runner_set_namespace.clone()).unwrap_or_default();
    if ers_namespace.is_empty() {
        return Err(ConfigError::invalid(K_ERS_NS, "must not be empty"));
    }
    let ers_name = a.ers_name.clone().or(file.ephemeral_runner_set_name.clone()).unwrap_or_default();
    if ers_name.is_empty() {
        return Err(ConfigError::invalid(K_ERS_NAME, "must not be empty"));
    }
    let scale_set_id = a.scale_set_id.or(file.runner_scale_set_id).unwrap_or(0);
    if scale_set_id == 0 {
        return Err(ConfigError::invalid(K_SS_ID, "must be set and not 0"));
    }
    let scale_set_name = a.scale_set_name.clone().or(file.runner_scale_set_name.clone()).unwrap_or_default();
    let min_runners = a.min_runners.or(file.min_runners).unwrap_or(0);
    let max_runners = a.max_runners.or(file.max_runners).unwrap_or(UNBOUNDED_MAX_RUNNERS);
    if min_runners < 0 {
        return Err(ConfigError::invalid(K_MIN, format!("{min_runners} must be ≥ 0")));
    }
    if max_runners < min_runners {
        return Err(ConfigError::invalid(
            K_MAX,
            format!("max_runners {max_runners} must be ≥ min_runners {min_runners}"),
        ));
    }

    let credentials = credentials(&a, &file)?;
    let root_ca_pem = match &a.github_root_ca_file {
        Some(p) => Some(read_file("--github-root-ca-file", p)?),
        None => file.server_root_ca.clone(),
    };
    if let Some(pem) = &root_ca_pem {
        check_root_ca(K_ROOT_CA, pem)?;
    }
    let mut resolve = Vec::new();
    for r in &a.github_resolve {
        resolve.push(parse_resolve(r).map_err(|p| ConfigError::invalid(flag("github-resolve"), p))?);
    }

    // Federation.
    let coordinators: Vec<String> =
        a.coordinators.iter().map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect();
    for c in &coordinators {
        check_host_port(c).map_err(|p| ConfigError::invalid(flag("coordinator"), p))?;
    }
    let cluster = match (&a.cluster, coordinators.is_empty()) {
        (Some(c), _) => c.clone(),
        (None, true) => "standalone".to_string(),
        (None, false) => {
            return Err(ConfigError::invalid(flag("cluster"), "required with --coordinator"));
        }
    };
    arcfed_proto::tls::validate_name(&cluster).map_err(|e| ConfigError::invalid(flag("cluster"), e.to_string()))?;
    let tls = if coordinators.is_empty() {
        None
    } else {
        let paths = a.tls.require("with --coordinator").map_err(|e| ConfigError::invalid(flag("coordinator"), e))?;
        let material = paths.load()?;
        let want = Identity { role: Role::Agent, name: cluster.clone() };
        if material.identity() != &want {
            return Err(ConfigError::invalid(
                flag("cluster"),
                format!(
                    "{cluster:?} does not match the --tls-cert identity {}; the coordinator takes the cluster \
                     from the certificate (expected {})",
                    material.identity(),
                    want.uri()
                ),
            ));
        }
        Some(paths)
    };
    if a.weight < 0 {
        return Err(ConfigError::invalid(flag("weight"), format!("{} must be ≥ 0", a.weight)));
    }
    let lease_ttl = a.lease_ttl.unwrap_or(a.profile.lease_ttl());
    if lease_ttl < Duration::from_millis(100) {
        return Err(ConfigError::invalid(flag("lease-ttl"), format!("{lease_ttl:?} is too short (at least 100ms)")));
    }
    if a.coordinator_lost_for.is_zero() {
        return Err(ConfigError::invalid(flag("coordinator-lost-for"), "must be > 0"));
    }
    if a.holder_stall.is_zero() {
        return Err(ConfigError::invalid(flag("holder-stall"), "must be > 0"));
    }
    let runner_backend = match (a.runner_backend, &a.sim_state_file) {
        (BackendKind::Kube, None) => Backend::Kube,
        (BackendKind::Kube, Some(_)) => {
            return Err(ConfigError::invalid(flag("sim-state-file"), "is only used with --runner-backend sim"));
        }
        (BackendKind::Sim, Some(f)) => Backend::Sim { state_file: f.clone() },
        (BackendKind::Sim, None) => {
            return Err(ConfigError::invalid(flag("sim-state-file"), "is required with --runner-backend sim"));
        }
    };
    let owner_name = a.owner_name.clone().unwrap_or_else(default_owner_name);
    if owner_name.trim().is_empty() {
        return Err(ConfigError::invalid(flag("owner-name"), "must not be empty"));
    }

    // Admin server and logs.
    let admin_listen = match (&a.admin_listen, &file.metrics_addr, &listener_config) {
        (Some(s), _, _) if s.is_empty() || s == "off" => None,
        (Some(s), _, _) => Some(parse_listen_addr(s).map_err(|p| ConfigError::invalid(K_ADMIN, p))?),
        (None, Some(s), _) if s.is_empty() || s == "0" => None,
        (None, Some(s), _) => Some(parse_listen_addr(s).map_err(|p| ConfigError::invalid(K_ADMIN, p))?),
        // A listener config without metrics_addr: ARC runs no metrics server.
        (None, None, Some(_)) => None,
        (None, None, None) => {
            Some(parse_listen_addr(DEFAULT_ADMIN_LISTEN).map_err(|p| ConfigError::invalid(K_ADMIN, p))?)
        }
    };
    let metrics_path =
        a.metrics_path.clone().or(file.metrics_endpoint.clone()).unwrap_or_else(|| "/metrics".to_string());
    if !metrics_path.starts_with('/') || metrics_path == "/live" || metrics_path == "/ready" {
        return Err(ConfigError::invalid(
            K_METRICS_PATH,
            format!("{metrics_path:?} must start with / and differ from /live and /ready"),
        ));
    }
    let format = match (a.log.log_format, file.log_format.as_deref()) {
        (Some(f), _) => f,
        (None, None | Some("text")) => LogFormat::Text,
        // ARC's listener logs JSON with its own keys; a drop-in keeps them.
        (None, Some("json")) => LogFormat::Arc,
        (None, Some(other)) => {
            return Err(ConfigError::invalid(K_LOG_FORMAT, format!("{other:?}: expected text or json")));
        }
    };
    let filter = match (a.log.log_level.clone().or_else(arcfed_proto::ops::rust_log), file.log_level.as_deref()) {
        (Some(f), _) => f,
        (None, Some(level)) => filter_from_arc_level(level)?,
        (None, None) => "info".to_string(),
    };
    tracing_subscriber::EnvFilter::try_new(&filter)
        .map_err(|e| ConfigError::invalid(K_LOG_LEVEL, format!("{filter:?}: {e}")))?;

    let gha_metrics = match &file.metrics {
        None => GhaMetricsSpec::arc_default(),
        Some(v) => {
            let (spec, w) = GhaMetricsSpec::from_listener_json(v).map_err(|p| ConfigError::invalid("metrics", p))?;
            warnings.extend(w);
            spec
        }
    };

    Ok(Config {
        github: GitHubSettings { configure_url, credentials, root_ca_pem, resolve, scale_set_id },
        scale_set_name,
        metrics_labels: MetricLabels {
            enterprise: scope.enterprise,
            organization: scope.organization,
            repository: scope.repository,
            name: ers_name.clone(),
            namespace: ers_namespace.clone(),
        },
        ers_namespace,
        ers_name,
        min_runners,
        max_runners,
        cluster,
        owner_name,
        coordinators,
        tls,
        weight: a.weight,
        priority: a.priority,
        lease_ttl,
        profile: a.profile,
        runner_backend,
        admin_listen,
        metrics_path,
        allow_drills: a.allow_drills,
        coordinator_lost_for: a.coordinator_lost_for,
        holder_stall: a.holder_stall,
        log: LogSettings { format, filter },
        gha_metrics,
        listener_config,
        warnings,
    })
}

/// Exactly one of a PAT or complete App credentials (ARC's `AppConfig.Validate`). When any
/// credential flag is given, the file's credentials are ignored as a whole, so a flag cannot
/// combine with a file key into a mix of both kinds.
fn credentials(a: &Args, file: &ListenerFile) -> Result<Credentials, ConfigError> {
    let from_flags = a.github_token.is_some()
        || a.github_app_id.is_some()
        || a.github_app_installation_id.is_some()
        || a.github_app_private_key_file.is_some();
    let (token, app_id, inst, key) = if from_flags {
        let key = match &a.github_app_private_key_file {
            Some(p) => Some(read_file("--github-app-private-key-file", p)?),
            None => None,
        };
        (a.github_token.clone(), a.github_app_id.clone(), a.github_app_installation_id, key)
    } else {
        (
            file.github_token.clone(),
            file.github_app_id.clone(),
            file.github_app_installation_id,
            file.github_app_private_key.clone(),
        )
    };
    let token = token.filter(|t| !t.is_empty());
    let app_id = app_id.filter(|t| !t.is_empty());
    let key = key.filter(|t| !t.trim().is_empty());
    let inst = inst.filter(|i| *i != 0);
    let any_app = app_id.is_some() || inst.is_some() || key.is_some();
    match (token, any_app) {
        (Some(_), true) => Err(ConfigError::invalid(
            format!("{K_TOKEN} and {K_APP_ID}/{K_APP_INST}/{K_APP_KEY}"),
            "both a PAT and GitHub App credentials are set; give exactly one",
        )),
        (Some(t), false) => Ok(Credentials::Pat(t)),
        (None, false) => Err(ConfigError::invalid(
            format!("{K_TOKEN} or {K_APP_ID}/{K_APP_INST}/{K_APP_KEY}"),
            "no GitHub credentials: give a PAT or complete GitHub App credentials",
        )),
        (None, true) => {
            let Some(app_id) = app_id else {
                return Err(ConfigError::invalid(K_APP_ID, "missing (GitHub App credentials are incomplete)"));
            };
            let Some(installation_id) = inst else {
                return Err(ConfigError::invalid(K_APP_INST, "missing or 0 (GitHub App credentials are incomplete)"));
            };
            let Some(private_key_pem) = key else {
                return Err(ConfigError::invalid(K_APP_KEY, "missing (GitHub App credentials are incomplete)"));
            };
            check_private_key(K_APP_KEY, &private_key_pem)?;
            Ok(Credentials::App { app_id, installation_id, private_key_pem })
        }
    }
}

impl Args {
    /// Parses the process's arguments and env. `--help`/`--version` print and exit 0 at once; a
    /// usage error is printed and then [`fail_slowly`] like any bad configuration.
    pub async fn parse_or_fail_slowly() -> Args {
        match Args::try_parse() {
            Ok(a) => a,
            Err(e)
                if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion) =>
            {
                e.exit()
            }
            Err(e) => {
                let _ = e.print();
                fail_slowly(&"invalid command line").await
            }
        }
    }
}

/// Reads the command line, env and listener config; on any error, [`fail_slowly`].
pub async fn load_or_fail_slowly() -> Config {
    let args = Args::parse_or_fail_slowly().await;
    match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => fail_slowly(&e).await,
    }
}

/// The delay [`fail_slowly`] waits: `$ARCFED_CONFIG_ERROR_DELAY` if it parses, else 30s.
pub fn fail_delay() -> Duration {
    std::env::var(FAIL_DELAY_ENV)
        .ok()
        .and_then(|v| humantime::parse_duration(v.trim()).ok())
        .unwrap_or(DEFAULT_FAIL_DELAY)
}

/// Prints a fatal configuration error, sleeps [`fail_delay`], and exits with status 1.
///
/// ARC's controller recreates a dead listener pod immediately and without backoff, so exiting
/// at once would hammer the API server (and GitHub, for errors found later) in a tight loop.
pub async fn fail_slowly(err: &dyn fmt::Display) -> ! {
    let delay = fail_delay();
    eprintln!("arcfed-agent: configuration error: {err}");
    eprintln!(
        "arcfed-agent: exiting in {} (ARC recreates a failed listener pod with no backoff)",
        humantime::format_duration(delay)
    );
    tokio::time::sleep(delay).await;
    std::process::exit(1)
}

/// Cheap identity of a file's current content: enough to notice cert-manager (or the kubelet's
/// `..data` symlink swap) replacing it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    dev: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    // `metadata` follows symlinks, so a swapped `..data` link shows as a new inode.
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp { modified: m.modified().ok(), len: m.len(), dev: m.dev(), ino: m.ino() })
}

/// Notices when the TLS files change on disk (mtime, size or inode), so the coordinator link
/// can reconnect with the new material. A file that is missing right now counts as unchanged
/// until it reappears: cert-manager's rewrite is not atomic for every volume type.
#[derive(Debug)]
pub struct TlsWatcher {
    paths: TlsPaths,
    last: [Option<FileStamp>; 3],
}

impl TlsWatcher {
    pub fn new(paths: TlsPaths) -> TlsWatcher {
        let last = Self::read(&paths);
        TlsWatcher { paths, last }
    }

    fn read(p: &TlsPaths) -> [Option<FileStamp>; 3] {
        [stamp(&p.cert), stamp(&p.key), stamp(&p.ca)]
    }

    pub fn paths(&self) -> &TlsPaths {
        &self.paths
    }

    /// True when any of the three files differs from the last check (or from creation). A
    /// vanished file does not count as a change.
    pub fn changed(&mut self) -> bool {
        let now = Self::read(&self.paths);
        let mut changed = false;
        for (old, new) in self.last.iter_mut().zip(now) {
            if new.is_some() && *old != new {
                *old = new;
                changed = true;
            }
        }
        changed
    }

    /// Waits until [`TlsWatcher::changed`] reports a change, checking every `every`.
    pub async fn wait_changed(&mut self, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if self.changed() {
                return;
            }
        }
    }
}
