//! The agent's Prometheus registry (prometheus-client): ARC's `gha_*` listener metrics under
//! their exact names and labels, so existing dashboards keep working, and `arcfed_agent_*`.
//!
//! ```text
//!  gha_assigned_jobs … gha_idle_runners   scale-set-wide: set by the holder only, cleared otherwise
//!  gha_min/max/desired_runners            per member: every agent sets its own
//!  gha_started/completed_jobs_total       jobs of this scale set, counted by the holder (it reads the queue)
//!  gha_job_*_duration_seconds             ARC's buckets, whole seconds
//!  arcfed_agent_*                         holder, token, sessions, 409s, fences, coordinator link, GitHub
//! ```
//! DESIGN §7: the scale-set-wide gauges come from the holder only, so `sum()` across clusters
//! does not triple-count. A standby calls [`Metrics::clear_scale_set_gauges`], which removes the
//! series instead of exporting zeros that would look like an idle scale set.
//!
//! ARC lets the listener config's `metrics` key pick which gha_* metrics exist, with which labels
//! and buckets; [`GhaMetricsSpec`] carries that choice (default: everything with ARC's labels).

use arcfed_core::github::{JobMessage, Statistics};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// ARC's default histogram buckets (seconds) for the job startup/execution histograms.
pub const ARC_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 12.0, 15.0, 18.0, 20.0, 25.0, 30.0, 40.0,
    50.0, 60.0, 70.0, 80.0, 90.0, 100.0, 110.0, 120.0, 150.0, 180.0, 210.0, 240.0, 300.0, 360.0, 420.0, 480.0, 540.0,
    600.0, 900.0, 1200.0, 1800.0, 2400.0, 3000.0, 3600.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
    pub commit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InfoLabels {
    pub cluster: String,
    pub scale_set: String,
}

/// Static label values of the scale-set gauges (and `enterprise` of the job metrics).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetricLabels {
    /// From configure_url (reference §1.1); empty unless the scope is an enterprise.
    pub enterprise: String,
    pub organization: String,
    pub repository: String,
    /// The EphemeralRunnerSet's name and namespace, as ARC's exporter uses.
    pub name: String,
    pub namespace: String,
}

/// A label ARC's exporter knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GhaLabel {
    Enterprise,
    Organization,
    Repository,
    Name,
    Namespace,
    JobName,
    EventName,
    JobResult,
    JobWorkflowRef,
    JobWorkflowName,
    JobWorkflowTarget,
}

impl GhaLabel {
    pub const ALL: [GhaLabel; 11] = [
        GhaLabel::Enterprise,
        GhaLabel::Organization,
        GhaLabel::Repository,
        GhaLabel::Name,
        GhaLabel::Namespace,
        GhaLabel::JobName,
        GhaLabel::EventName,
        GhaLabel::JobResult,
        GhaLabel::JobWorkflowRef,
        GhaLabel::JobWorkflowName,
        GhaLabel::JobWorkflowTarget,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GhaLabel::Enterprise => "enterprise",
            GhaLabel::Organization => "organization",
            GhaLabel::Repository => "repository",
            GhaLabel::Name => "name",
            GhaLabel::Namespace => "namespace",
            GhaLabel::JobName => "job_name",
            GhaLabel::EventName => "event_name",
            GhaLabel::JobResult => "job_result",
            GhaLabel::JobWorkflowRef => "job_workflow_ref",
            GhaLabel::JobWorkflowName => "job_workflow_name",
            GhaLabel::JobWorkflowTarget => "job_workflow_target",
        }
    }

    fn parse(s: &str) -> Option<GhaLabel> {
        GhaLabel::ALL.into_iter().find(|l| l.as_str() == s)
    }
}

impl fmt::Display for GhaLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

use GhaLabel as L;

const GAUGE_LABELS: &[GhaLabel] = &[L::Enterprise, L::Organization, L::Repository, L::Name, L::Namespace];
const STARTED_LABELS: &[GhaLabel] = &[L::Enterprise, L::Organization, L::Repository, L::JobName, L::EventName];
const COMPLETED_LABELS: &[GhaLabel] =
    &[L::Enterprise, L::Organization, L::Repository, L::JobName, L::EventName, L::JobResult];
const WORKFLOW_LABELS: &[GhaLabel] = &[L::JobWorkflowRef, L::JobWorkflowName, L::JobWorkflowTarget];

/// ARC's gauges (reference §5.6).
pub const GHA_GAUGES: &[&str] = &[
    "gha_assigned_jobs",
    "gha_running_jobs",
    "gha_registered_runners",
    "gha_busy_runners",
    "gha_idle_runners",
    "gha_min_runners",
    "gha_max_runners",
    "gha_desired_runners",
];
/// ARC's counters, under their exposition names.
pub const GHA_COUNTERS: &[&str] = &["gha_started_jobs_total", "gha_completed_jobs_total"];
/// ARC's histograms.
pub const GHA_HISTOGRAMS: &[&str] = &["gha_job_startup_duration_seconds", "gha_job_execution_duration_seconds"];

/// Labels a metric may carry, and the ones it carries by default.
fn label_rules(name: &str) -> (Vec<GhaLabel>, Vec<GhaLabel>) {
    let job = |base: &[GhaLabel]| {
        let mut allowed = base.to_vec();
        allowed.extend_from_slice(WORKFLOW_LABELS);
        (allowed, base.to_vec())
    };
    match name {
        "gha_started_jobs_total" | "gha_job_startup_duration_seconds" => job(STARTED_LABELS),
        "gha_completed_jobs_total" | "gha_job_execution_duration_seconds" => job(COMPLETED_LABELS),
        _ => (GAUGE_LABELS.to_vec(), GAUGE_LABELS.to_vec()),
    }
}

/// One histogram's labels and buckets.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSpec {
    pub labels: Vec<GhaLabel>,
    pub buckets: Vec<f64>,
}

/// Which gha_* metrics to export, keyed by exposition name, with their labels (and buckets).
#[derive(Clone, Debug, PartialEq)]
pub struct GhaMetricsSpec {
    pub gauges: BTreeMap<String, Vec<GhaLabel>>,
    pub counters: BTreeMap<String, Vec<GhaLabel>>,
    pub histograms: BTreeMap<String, HistogramSpec>,
}

impl Default for GhaMetricsSpec {
    fn default() -> Self {
        Self::arc_default()
    }
}

impl GhaMetricsSpec {
    /// Every gha_* metric with ARC's default labels and buckets (no `metrics` key in the file).
    pub fn arc_default() -> GhaMetricsSpec {
        let labels = |n: &str| label_rules(n).1;
        GhaMetricsSpec {
            gauges: GHA_GAUGES.iter().map(|n| (n.to_string(), labels(n))).collect(),
            counters: GHA_COUNTERS.iter().map(|n| (n.to_string(), labels(n))).collect(),
            histograms: GHA_HISTOGRAMS
                .iter()
                .map(|n| (n.to_string(), HistogramSpec { labels: labels(n), buckets: ARC_BUCKETS.to_vec() }))
                .collect(),
        }
    }

    /// Reads the listener config's `metrics` object:
    /// `{"counters":{name:{"labels":[…]}},"gauges":{…},"histograms":{name:{"labels":[…],"buckets":[…]}}}`.
    /// Only the listed metrics are exported (as ARC does). Unknown metric names and labels that do
    /// not apply are ignored and returned as warnings; a wrong shape is an error.
    pub fn from_listener_json(v: &Value) -> Result<(GhaMetricsSpec, Vec<String>), String> {
        let obj = v.as_object().ok_or("expected an object with counters, gauges and histograms")?;
        let mut warnings = Vec::new();
        let mut spec =
            GhaMetricsSpec { gauges: BTreeMap::new(), counters: BTreeMap::new(), histograms: BTreeMap::new() };
        for (section, entries) in obj {
            let known: &[&str] = match section.as_str() {
                "gauges" => GHA_GAUGES,
                "counters" => GHA_COUNTERS,
                "histograms" => GHA_HISTOGRAMS,
                other => {
                    warnings.push(format!("metrics: unknown section {other:?} ignored"));
                    continue;
                }
            };
            let entries = match entries {
                Value::Null => continue,
                Value::Object(m) => m,
                _ => return Err(format!("metrics.{section}: expected an object of metric names")),
            };
            for (name, body) in entries {
                if !known.contains(&name.as_str()) {
                    warnings.push(format!("metrics.{section}: unknown metric {name:?} ignored"));
                    continue;
                }
                let at = format!("metrics.{section}.{name}");
                let labels = parse_labels(&at, name, body.get("labels"), &mut warnings)?;
                match section.as_str() {
                    "gauges" => {
                        spec.gauges.insert(name.clone(), labels);
                    }
                    "counters" => {
                        spec.counters.insert(name.clone(), labels);
                    }
                    _ => {
                        let buckets = match body.get("buckets") {
                            None | Some(Value::Null) => ARC_BUCKETS.to_vec(),
                            Some(b) => parse_buckets(&at, b)?,
                        };
                        spec.histograms.insert(name.clone(), HistogramSpec { labels, buckets });
                    }
                }
            }
        }
        Ok((spec, warnings))
    }
}

fn parse_labels(at: &str, name: &str, v: Option<&Value>, warnings: &mut Vec<String>) -> Result<Vec<GhaLabel>, String> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(Vec::new()) };
    let arr = v.as_array().ok_or_else(|| format!("{at}.labels: expected a list of label names"))?;
    let (allowed, _) = label_rules(name);
    let mut out = Vec::new();
    for l in arr {
        let s = l.as_str().ok_or_else(|| format!("{at}.labels: {l} is not a string"))?;
        match GhaLabel::parse(s) {
            Some(label) if allowed.contains(&label) => {
                if !out.contains(&label) {
                    out.push(label);
                }
            }
            _ => warnings.push(format!("{at}: label {s:?} does not apply and is ignored")),
        }
    }
    Ok(out)
}

fn parse_buckets(at: &str, v: &Value) -> Result<Vec<f64>, String> {
    let arr = v.as_array().ok_or_else(|| format!("{at}.buckets: expected a list of numbers"))?;
    let b: Vec<f64> = arr
        .iter()
        .map(|x| x.as_f64().ok_or_else(|| format!("{at}.buckets: {x} is not a number")))
        .collect::<Result<_, _>>()?;
    if b.is_empty() {
        return Ok(ARC_BUCKETS.to_vec());
    }
    if b.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("{at}.buckets: must be strictly increasing"));
    }
    Ok(b)
}

/// Label pairs in the configured order.
type Labels = Vec<(String, String)>;

/// Builds histograms with one metric's buckets.
#[derive(Clone, Debug)]
struct Buckets(std::sync::Arc<[f64]>);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// A gha_* metric as configured: its labels and its family (absent = not exported).
#[derive(Debug)]
struct Gha<M, C = fn() -> M> {
    labels: Vec<GhaLabel>,
    family: Family<Labels, M, C>,
}

/// Label values of one observation; a label without a value here is exported empty.
struct Values<'a>(&'a [(GhaLabel, &'a str)]);

impl Values<'_> {
    fn pick(&self, labels: &[GhaLabel]) -> Labels {
        labels
            .iter()
            .map(|l| {
                let v = self.0.iter().find(|(k, _)| k == l).map(|(_, v)| *v).unwrap_or("");
                (l.as_str().to_string(), v.to_string())
            })
            .collect()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabel {
    pub call: String,
}

/// Every metric of the agent, registered once. The `arcfed_agent_*` fields are public so the
/// driver updates them directly (`m.session_creates.inc()`); the gha_* ones go through methods
/// that apply ARC's labels.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    labels: MetricLabels,
    assigned_jobs: Option<Gha<Gauge>>,
    running_jobs: Option<Gha<Gauge>>,
    registered_runners: Option<Gha<Gauge>>,
    busy_runners: Option<Gha<Gauge>>,
    idle_runners: Option<Gha<Gauge>>,
    min_runners: Option<Gha<Gauge>>,
    max_runners: Option<Gha<Gauge>>,
    desired_runners: Option<Gha<Gauge>>,
    started_jobs: Option<Gha<Counter>>,
    completed_jobs: Option<Gha<Counter>>,
    startup_duration: Option<Gha<Histogram, Buckets>>,
    execution_duration: Option<Gha<Histogram, Buckets>>,

    /// 1 while this agent holds the GitHub session (inside its fence).
    pub is_holder: Gauge,
    /// The fencing token held (0 when not holder).
    pub token: Gauge,
    pub session_creates: Counter,
    pub session_deletes: Counter,
    /// Stale sessions of this cluster's previous listener deleted while not holding.
    pub stale_sweeps: Counter,
    pub conflicts_409: Counter,
    /// 1 while a 409 names a session owner that is not arcfed (a stock listener runs somewhere).
    pub foreign_session: Gauge,
    /// A 409 right after a revocation that reported success.
    pub revocation_ineffective: Counter,
    /// Holder-only work stopped because the fence ran out.
    pub self_fence: Counter,
    pub stale_token_rejections: Counter,
    /// 1 while contending for the session without the quorum (DESIGN §5.11).
    pub fallback: Gauge,
    pub coordinator_connected: Gauge,
    /// `arcfed_agent_coordinator_endpoint_info{endpoint}`: 1 for the address the stream to the
    /// coordinator runs to (a configured one, or the leader's advertised address after a
    /// redirect); no series while detached.
    pub coordinator_endpoint: Family<EndpointLabels, Gauge>,
    /// `arcfed_tls_cert_not_after_seconds`: expiry of the client certificate last presented.
    pub tls_not_after: Gauge,
    /// `arcfed_agent_info{cluster,scale_set}`: set once by [`Metrics::set_info`].
    pub info: Family<InfoLabels, Gauge>,
    /// Replicas the coordinator assigned to this cluster (last push).
    pub assigned_replicas: Gauge,
    /// Seconds between a message's arrival at the holder and its ack.
    pub message_lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub last_message_id: Gauge,
    pub github_errors: Family<KindLabel, Counter>,
    /// 1 while the admin token is fresh and the scale set GET succeeded (grant eligibility).
    pub github_ready: Gauge,
    pub acquire_repeats: Counter,
    /// Times this agent became the holder.
    pub takeovers: Counter,
    /// Messages, fields or job types GitHub sent that the agent does not know, ignored.
    pub ignored_messages: Family<KindLabel, Counter>,
    pub github_request_duration: Family<CallLabel, Histogram>,
}

fn gha_gauge(reg: &mut Registry, spec: &GhaMetricsSpec, name: &str, help: &str) -> Option<Gha<Gauge>> {
    let labels = spec.gauges.get(name)?.clone();
    let family = Family::<Labels, Gauge>::default();
    reg.register(name, help, family.clone());
    Some(Gha { labels, family })
}

fn gha_counter(reg: &mut Registry, spec: &GhaMetricsSpec, name: &str, help: &str) -> Option<Gha<Counter>> {
    let labels = spec.counters.get(name)?.clone();
    let family = Family::<Labels, Counter>::default();
    // prometheus-client appends `_total` to counters.
    reg.register(name.strip_suffix("_total").unwrap_or(name), help, family.clone());
    Some(Gha { labels, family })
}

fn gha_histogram(reg: &mut Registry, spec: &GhaMetricsSpec, name: &str, help: &str) -> Option<Gha<Histogram, Buckets>> {
    let h = spec.histograms.get(name)?;
    let family = Family::<Labels, Histogram, Buckets>::new_with_constructor(Buckets(h.buckets.clone().into()));
    reg.register(name, help, family.clone());
    Some(Gha { labels: h.labels.clone(), family })
}

impl Metrics {
    /// Builds and registers every metric once. `labels` are the static scale-set label values.
    pub fn new(labels: MetricLabels, spec: &GhaMetricsSpec) -> Metrics {
        let mut reg = Registry::default();
        let r = &mut reg;
        let assigned_jobs = gha_gauge(r, spec, "gha_assigned_jobs", "Number of jobs assigned to this scale set");
        let running_jobs = gha_gauge(r, spec, "gha_running_jobs", "Number of jobs running (or about to run)");
        let registered_runners =
            gha_gauge(r, spec, "gha_registered_runners", "Number of runners registered by the scale set");
        let busy_runners = gha_gauge(r, spec, "gha_busy_runners", "Number of registered runners running a job");
        let idle_runners = gha_gauge(r, spec, "gha_idle_runners", "Number of registered runners not running a job");
        let min_runners = gha_gauge(r, spec, "gha_min_runners", "Minimum number of runners");
        let max_runners = gha_gauge(r, spec, "gha_max_runners", "Maximum number of runners");
        let desired_runners =
            gha_gauge(r, spec, "gha_desired_runners", "Number of runners desired by the scale set (this cluster)");
        let started_jobs = gha_counter(r, spec, "gha_started_jobs_total", "Total number of jobs started");
        let completed_jobs = gha_counter(r, spec, "gha_completed_jobs_total", "Total number of jobs completed");
        let startup_duration = gha_histogram(
            r,
            spec,
            "gha_job_startup_duration_seconds",
            "Time from a job's assignment to the scale set to its runner assignment, in seconds",
        );
        let execution_duration =
            gha_histogram(r, spec, "gha_job_execution_duration_seconds", "Time a job took on its runner, in seconds");

        let m = Metrics {
            registry: Registry::default(),
            labels,
            assigned_jobs,
            running_jobs,
            registered_runners,
            busy_runners,
            idle_runners,
            min_runners,
            max_runners,
            desired_runners,
            started_jobs,
            completed_jobs,
            startup_duration,
            execution_duration,
            is_holder: Gauge::default(),
            token: Gauge::default(),
            session_creates: Counter::default(),
            session_deletes: Counter::default(),
            stale_sweeps: Counter::default(),
            conflicts_409: Counter::default(),
            foreign_session: Gauge::default(),
            revocation_ineffective: Counter::default(),
            self_fence: Counter::default(),
            stale_token_rejections: Counter::default(),
            fallback: Gauge::default(),
            coordinator_connected: Gauge::default(),
            coordinator_endpoint: Family::default(),
            tls_not_after: Gauge::default(),
            info: Family::default(),
            assigned_replicas: Gauge::default(),
            message_lag_seconds: Gauge::default(),
            last_message_id: Gauge::default(),
            github_errors: Family::default(),
            github_ready: Gauge::default(),
            acquire_repeats: Counter::default(),
            takeovers: Counter::default(),
            ignored_messages: Family::default(),
            github_request_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 16))
            }),
        };
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: arcfed_proto::ops::VERSION.into(),
                commit: arcfed_proto::ops::COMMIT.into(),
            })
            .set(1);
        reg.register("arcfed_build_info", "1, labelled with this binary's version and commit", build);
        reg.register(
            "arcfed_agent_info",
            "1, labelled with this agent's cluster (empty when standalone) and scale set (ARC's name for it)",
            m.info.clone(),
        );
        reg.register(
            "arcfed_tls_cert_not_after_seconds",
            "Expiry (Unix seconds) of the client certificate presented at the last attach to the coordinator (files are re-read at every attach)",
            m.tls_not_after.clone(),
        );
        let a = reg.sub_registry_with_prefix("arcfed_agent");
        a.register("is_holder", "1 while this agent holds the GitHub session", m.is_holder.clone());
        a.register("token", "Fencing token held by this agent (0 = none)", m.token.clone());
        a.register("session_creates", "Message sessions created", m.session_creates.clone());
        a.register("session_deletes", "Message sessions deleted (own and stale)", m.session_deletes.clone());
        a.register(
            "stale_sweeps",
            "Stale sessions left by this cluster's previous listener, deleted by this member with its own credentials",
            m.stale_sweeps.clone(),
        );
        a.register("conflicts_409", "409 Conflict answers to session creation", m.conflicts_409.clone());
        a.register(
            "foreign_session",
            "1 while a 409 names a non-arcfed session owner (a stock ARC listener is running)",
            m.foreign_session.clone(),
        );
        a.register(
            "revocation_ineffective",
            "409s right after a revocation that reported success",
            m.revocation_ineffective.clone(),
        );
        a.register("self_fence", "Holder-only work stopped because the fence ran out", m.self_fence.clone());
        a.register(
            "stale_token_rejections",
            "Coordinator answers rejecting this agent's token as stale",
            m.stale_token_rejections.clone(),
        );
        a.register("fallback", "1 while contending for the session without the quorum", m.fallback.clone());
        a.register(
            "coordinator_connected",
            "1 while the stream to the coordinator leader is up",
            m.coordinator_connected.clone(),
        );
        a.register(
            "coordinator_endpoint_info",
            "1 for the address the coordinator stream runs to (after a redirect: the leader's advertised address)",
            m.coordinator_endpoint.clone(),
        );
        a.register(
            "assigned_replicas",
            "Runners the coordinator assigned to this cluster",
            m.assigned_replicas.clone(),
        );
        a.register(
            "message_lag_seconds",
            "Seconds from receiving the last message to acking it",
            m.message_lag_seconds.clone(),
        );
        a.register("last_message_id", "Id of the last message acked by this holder", m.last_message_id.clone());
        a.register("github_errors", "GitHub call failures by kind", m.github_errors.clone());
        a.register(
            "github_ready",
            "1 while the admin token is fresh and the scale set is reachable",
            m.github_ready.clone(),
        );
        a.register("acquire_repeats", "Acquire requests repeated after a takeover", m.acquire_repeats.clone());
        a.register("takeovers", "Times this agent became the session holder", m.takeovers.clone());
        a.register("ignored_messages", "Unknown message or job types ignored, by type", m.ignored_messages.clone());
        a.register(
            "github_request_duration_seconds",
            "Duration of GitHub calls by call",
            m.github_request_duration.clone(),
        );
        Metrics { registry: reg, ..m }
    }

    /// The metrics of a validated configuration, with this member's static gha_min/max_runners
    /// already recorded (ARC records them once at start).
    pub fn from_config(cfg: &crate::config::Config) -> Metrics {
        let m = Metrics::new(cfg.metrics_labels.clone(), &cfg.gha_metrics);
        m.set_runner_limits(cfg.min_runners, cfg.max_runners);
        m
    }

    /// The registry's OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut body = String::new();
        // Writing into a String cannot fail; an error here would be a bug in a metric's encoder.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &self.registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        body
    }

    fn scale_set_values(&self) -> [(GhaLabel, &str); 5] {
        let l = &self.labels;
        [
            (L::Enterprise, l.enterprise.as_str()),
            (L::Organization, l.organization.as_str()),
            (L::Repository, l.repository.as_str()),
            (L::Name, l.name.as_str()),
            (L::Namespace, l.namespace.as_str()),
        ]
    }

    fn set_gauge(&self, g: &Option<Gha<Gauge>>, v: i64) {
        if let Some(g) = g {
            let vals = self.scale_set_values();
            g.family.get_or_create(&Values(&vals).pick(&g.labels)).set(v);
        }
    }

    /// Holder or not; the token while holder. Clears the scale-set-wide gauges when not holder.
    pub fn set_holder(&self, token: Option<u64>) {
        self.is_holder.set(i64::from(token.is_some()));
        self.token.set(token.map(|t| i64::try_from(t).unwrap_or(i64::MAX)).unwrap_or(0));
        if token.is_none() {
            self.clear_scale_set_gauges();
        }
    }

    /// Scale-set-wide gauges from a session or message's statistics. Holder only (DESIGN §7).
    pub fn record_statistics(&self, s: &Statistics) {
        self.set_gauge(&self.assigned_jobs, s.total_assigned_jobs);
        self.set_gauge(&self.running_jobs, s.total_running_jobs);
        self.set_gauge(&self.registered_runners, s.total_registered_runners);
        self.set_gauge(&self.busy_runners, s.total_busy_runners);
        self.set_gauge(&self.idle_runners, s.total_idle_runners);
    }

    /// The stream to the coordinator runs to `endpoint` (`None`: detached).
    pub fn set_coordinator_endpoint(&self, endpoint: Option<&str>) {
        self.coordinator_endpoint.clear();
        if let Some(e) = endpoint {
            self.coordinator_endpoint.get_or_create(&EndpointLabels { endpoint: e.into() }).set(1);
        }
    }

    /// Sets `arcfed_agent_info` (once, at start).
    pub fn set_info(&self, cluster: &str, scale_set: &str) {
        self.info.clear();
        self.info.get_or_create(&InfoLabels { cluster: cluster.into(), scale_set: scale_set.into() }).set(1);
    }

    /// Removes the scale-set-wide series, so only the holder exports them.
    pub fn clear_scale_set_gauges(&self) {
        for g in
            [&self.assigned_jobs, &self.running_jobs, &self.registered_runners, &self.busy_runners, &self.idle_runners]
                .into_iter()
                .flatten()
        {
            g.family.clear();
        }
    }

    /// This cluster's min and max runners (every member, once at start).
    pub fn set_runner_limits(&self, min: i64, max: i64) {
        self.set_gauge(&self.min_runners, min);
        self.set_gauge(&self.max_runners, max);
    }

    /// The replicas this member last patched into its EphemeralRunnerSet (every member).
    pub fn set_desired_runners(&self, n: i64) {
        self.set_gauge(&self.desired_runners, n);
    }

    /// A `JobStarted` message: `gha_started_jobs_total` and the startup histogram
    /// (runnerAssignTime − scaleSetAssignTime, whole seconds; skipped when a time is unset).
    pub fn job_started(&self, j: &JobMessage) {
        let wf = WorkflowRef::parse(&j.job_workflow_ref);
        let vals = self.job_values(j, &wf, None);
        if let Some(c) = &self.started_jobs {
            c.family.get_or_create(&Values(&vals).pick(&c.labels)).inc();
        }
        if let (Some(h), Some(d)) = (
            &self.startup_duration,
            seconds_between(j.scale_set_assign_time.as_deref(), j.runner_assign_time.as_deref()),
        ) {
            h.family.get_or_create(&Values(&vals).pick(&h.labels)).observe(d);
        }
    }

    /// A `JobCompleted` message: `gha_completed_jobs_total` and the execution histogram
    /// (finishTime − runnerAssignTime). Skipped entirely when runnerAssignTime is unset (a job
    /// cancelled before it reached a runner), as ARC does since #4472.
    pub fn job_completed(&self, j: &JobMessage) {
        if parse_time(j.runner_assign_time.as_deref()).is_none() {
            return;
        }
        let wf = WorkflowRef::parse(&j.job_workflow_ref);
        let vals = self.job_values(j, &wf, j.result.as_deref());
        if let Some(c) = &self.completed_jobs {
            c.family.get_or_create(&Values(&vals).pick(&c.labels)).inc();
        }
        if let (Some(h), Some(d)) =
            (&self.execution_duration, seconds_between(j.runner_assign_time.as_deref(), j.finish_time.as_deref()))
        {
            h.family.get_or_create(&Values(&vals).pick(&h.labels)).observe(d);
        }
    }

    fn job_values<'a>(
        &'a self,
        j: &'a JobMessage,
        wf: &'a WorkflowRef,
        result: Option<&'a str>,
    ) -> Vec<(GhaLabel, &'a str)> {
        vec![
            (L::Enterprise, self.labels.enterprise.as_str()),
            (L::Organization, j.owner_name.as_str()),
            (L::Repository, j.repository_name.as_str()),
            (L::JobName, j.job_display_name.as_str()),
            (L::EventName, j.event_name.as_str()),
            (L::JobResult, result.unwrap_or("")),
            (L::JobWorkflowRef, j.job_workflow_ref.as_str()),
            (L::JobWorkflowName, wf.name.as_str()),
            (L::JobWorkflowTarget, wf.target.as_str()),
        ]
    }

    /// A failed GitHub call, by kind (`transport`, `401`, `409`, `5xx`, …).
    pub fn github_error(&self, kind: &str) {
        self.github_errors.get_or_create(&KindLabel { kind: kind.to_string() }).inc();
    }

    /// How long one GitHub call took.
    pub fn observe_github_request(&self, call: &str, took: Duration) {
        self.github_request_duration.get_or_create(&CallLabel { call: call.to_string() }).observe(took.as_secs_f64());
    }

    /// Something GitHub sent that the agent ignores (unknown message type, unknown job type).
    pub fn ignored_message(&self, kind: &str) {
        self.ignored_messages.get_or_create(&KindLabel { kind: kind.to_string() }).inc();
    }
}

/// `job_workflow_name` and `job_workflow_target` from a `jobWorkflowRef` such as
/// `owner/repo/.github/workflows/ci.yml@refs/heads/main` (ARC's `ParseWorkflowRef`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkflowRef {
    /// The workflow file name without `.yml`/`.yaml`.
    pub name: String,
    /// `heads/<branch>`, `tags/<tag>` or `pull/<n>`.
    pub target: String,
}

impl WorkflowRef {
    pub fn parse(r: &str) -> WorkflowRef {
        let (path, git_ref) = r.split_once('@').unwrap_or((r, ""));
        let file = path.rsplit('/').next().unwrap_or("");
        let name = file.strip_suffix(".yml").or_else(|| file.strip_suffix(".yaml")).unwrap_or(file).to_string();
        let git_ref = git_ref.strip_prefix("refs/").unwrap_or(git_ref);
        let target = match git_ref.strip_prefix("pull/") {
            Some(rest) => format!("pull/{}", rest.split('/').next().unwrap_or("")),
            None => git_ref.to_string(),
        };
        WorkflowRef { name, target }
    }
}

/// An RFC 3339 time as GitHub sends it; Go's zero time and anything before 1970 count as unset.
fn parse_time(s: Option<&str>) -> Option<std::time::SystemTime> {
    let t = humantime::parse_rfc3339_weak(s?.trim_end_matches('Z')).ok()?;
    (t > std::time::UNIX_EPOCH).then_some(t)
}

/// Whole seconds from `from` to `to` (ARC subtracts Unix seconds), never negative.
fn seconds_between(from: Option<&str>, to: Option<&str>) -> Option<f64> {
    let secs = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (a, b) = (secs(parse_time(from)?), secs(parse_time(to)?));
    Some(b.saturating_sub(a) as f64)
}
