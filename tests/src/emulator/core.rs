//! The emulated service's state and every decision it makes. Synchronous, no I/O, no clock:
//! each operation takes `now` (milliseconds on the emulator clock) so tests can drive it
//! directly. The only side effect is waking long polls through each scale set's
//! [`tokio::sync::Notify`], which is a plain synchronous call.
//!
//! ```text
//!   job:  Queued ─poll(capacity)─▶ Assigned ─runner takes─▶ Running ─finish─▶ (gone)
//!                 (ghes) ▶ Available ─acquirejobs─▶ Assigned
//!   messages: pending job messages ─poll─▶ envelopes (≤50) in a per-scale-set log,
//!             removed only by DELETE; a poll returns the first one above the cursor
//! ```

use super::config::{AppKey, CrossCredentialDelete, Cursor, MAX_REASSIGNMENTS, Mode, SessionTtlFrom, Settings};
use super::faults::{FaultTarget, Faults};
use super::model::*;
use super::report::{
    AuthKind, CloseReason, Event, Report, ScaleSetReport, SessionReport, TokenRequest, late_requests, max_concurrent,
    overlap_ms, sender_token,
};
use super::token;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use uuid::Uuid;

const RT: &str = "GitHub.Actions.Runtime.WebApi";
const DT: &str = "GitHub.DistributedTask.WebApi";

/// At most this many job messages per envelope (reference §4.1).
pub const MAX_JOBS_PER_MESSAGE: usize = 50;

/// A refusal, in the service's own words: the HTTP layer turns it into a status, the JSON
/// exception body and an `ActivityId` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {type_name}: {message}")]
pub struct ApiError {
    pub status: u16,
    /// Empty for GitHub REST errors, whose body is `{"message", "documentation_url"}`.
    pub type_name: String,
    pub message: String,
}

impl ApiError {
    fn actions(status: u16, ns: &str, name: &str, message: impl Into<String>) -> Self {
        Self { status, type_name: format!("{ns}.{name}, {ns}"), message: message.into() }
    }
    pub fn rest(status: u16, message: &str) -> Self {
        Self { status, type_name: String::new(), message: message.into() }
    }
    pub fn is_rest(&self) -> bool {
        self.type_name.is_empty()
    }
    pub fn unauthorized() -> Self {
        Self::actions(
            401,
            "GitHub.Services.WebApi",
            "VssUnauthorizedException",
            "TF400813: The user '' is not authorized to access this resource.",
        )
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::actions(400, "GitHub.Services.WebApi", "VssServiceException", message)
    }
    fn scale_set_not_found(id: i64) -> Self {
        Self::actions(
            404,
            RT,
            "RunnerScaleSetNotFoundException",
            format!("No runner scale set found with identifier {id}."),
        )
    }
    pub fn session_expired(id: &str) -> Self {
        Self::actions(
            400,
            RT,
            "RunnerScaleSetSessionExpiredException",
            format!("The session identifier {id} is not valid."),
        )
    }
    /// 400 for an admin or queue call without an api-version (`--strict-api-version`).
    pub fn version_not_specified(method: &str) -> Self {
        Self::actions(
            400,
            "GitHub.Services.WebApi",
            "VssVersionNotSpecifiedException",
            format!(
                "No api-version was supplied for the \"{method}\" request. The version must be supplied either as part \
                 of the Accept header (e.g. \"application/json; api-version=1.0\") or as a query parameter (e.g. \
                 '?api-version=1.0')."
            ),
        )
    }
    pub fn session_evicted() -> Self {
        Self::actions(404, RT, "RunnerAdminException", "runner referenced a session ID that doesn't exist in redis")
    }
    fn not_found(what: &str) -> Self {
        Self::rest(404, &format!("Not Found: {what}"))
    }
}

type R<T> = Result<T, ApiError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobState {
    Queued,
    Available,
    Assigned,
    Running { runner_id: i64, finish_at: u64 },
}

#[derive(Debug, Clone)]
struct Job {
    job_id: String,
    runner_request_id: i64,
    workflow_run_id: i64,
    display_name: String,
    duration_ms: u64,
    state: JobState,
    queued_at: u64,
    assigned_at: Option<u64>,
    runner_assigned_at: Option<u64>,
    acquired_by: Option<Uuid>,
    grants: u32,
    /// Times this job was cancelled for want of a runner and offered again.
    reassignments: u32,
}

#[derive(Debug, Clone)]
struct Runner {
    id: i64,
    name: String,
    online: bool,
    job: Option<String>,
    /// Ephemeral runners run one job; after it they no longer count as registered.
    finished: bool,
    /// Takes and finishes jobs by itself (as with `auto_runners`), from when it came online:
    /// the lab's runner processes ask for this.
    auto: bool,
}

/// What the side channel tells a runner process about itself.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunnerState {
    pub id: i64,
    pub online: bool,
    pub job_id: Option<String>,
    pub finished: bool,
}

#[derive(Debug, Clone)]
struct StoredMessage {
    body: String,
    deliveries: u32,
}

#[derive(Debug, Default)]
struct Counters {
    conflicts_409: u64,
    messages_delivered: u64,
    messages_deleted: u64,
    messages_redelivered: u64,
    acquire_repeats: u64,
    jobs_acquired_twice: u64,
    zombie_requests: u64,
    jobs_enqueued: u64,
    jobs_completed: u64,
    jobs_cancelled: u64,
    jobs_reassigned: u64,
    session_refreshes: u64,
    envelopes: u64,
}

#[derive(Debug)]
struct ScaleSet {
    set: RunnerScaleSet,
    /// The organization, for the `ownerName` of job messages.
    org: String,
    deleted: bool,
    active: Option<Uuid>,
    /// Every session ever opened here, in opening order.
    sessions: Vec<Uuid>,
    /// Undeleted envelopes by message id.
    log: BTreeMap<i64, StoredMessage>,
    /// Job messages not yet put in an envelope.
    pending: Vec<JobMessage>,
    next_message_id: i64,
    /// Highest message id delivered to anyone (the `per-scale-set` cursor).
    max_delivered: i64,
    /// `X-ScaleSetMaxCapacity` of the latest poll; acquisition in GHES mode honours it too.
    last_capacity: i64,
    /// Jobs in arrival order (job id → job).
    jobs: BTreeMap<(u64, String), Job>,
    runners: BTreeMap<i64, Runner>,
    notify: Arc<Notify>,
    first_open: Option<u64>,
    no_session_since: Option<u64>,
    no_session_ms: u64,
    c: Counters,
    workload: Option<Workload>,
    /// Requests that named a fencing token in `X-Arcfed-Owner`, by token (for `late_requests`).
    by_token: BTreeMap<u64, Vec<TokenRequest>>,
}

/// Requests kept per token for the late-request check; past it the oldest are dropped (a late
/// request is among the newest of its token).
const MAX_REQUESTS_PER_TOKEN: usize = 50_000;

#[derive(Debug)]
struct SessionState {
    id: Uuid,
    scale_set: i64,
    owner: String,
    credential: String,
    opened: u64,
    closed: Option<(u64, CloseReason)>,
    last_poll: u64,
    polls_in_flight: u32,
    /// First and last holder-only request, as (arrival ms, arrival number).
    first_holder: (u64, u64),
    last_holder: (u64, u64),
    polls: u64,
    zombie_requests: u64,
    refreshes: u64,
    /// dotcom layout: the opaque id in the queue URL the session was last given.
    queue_url: Option<String>,
}

#[derive(Debug, Clone)]
struct TokenInfo {
    credential: String,
    exp_ms: u64,
}

#[derive(Debug, Clone)]
struct QueueToken {
    session: Uuid,
    scale_set: i64,
    exp_ms: u64,
}

/// A Poisson-ish job source for the sandbox.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub scale_set_id: i64,
    /// 0 stops the generator.
    pub jobs_per_minute: f64,
    #[serde(default)]
    pub min_duration_seconds: f64,
    #[serde(default)]
    pub max_duration_seconds: f64,
    #[serde(skip)]
    last_ms: Option<u64>,
    #[serde(skip)]
    carry: f64,
}

impl Workload {
    pub fn new(scale_set_id: i64, jobs_per_minute: f64, min_s: f64, max_s: f64) -> Self {
        Self {
            scale_set_id,
            jobs_per_minute,
            min_duration_seconds: min_s,
            max_duration_seconds: max_s,
            last_ms: None,
            carry: 0.0,
        }
    }
}

/// What a request looks like before it is handled: used to scope faults and to attribute it
/// in the timeline.
#[derive(Debug, Clone, Default)]
pub struct Attribution {
    pub session: Option<Uuid>,
    pub owner: Option<String>,
    pub zombie: bool,
}

/// What differs between the GHES and github.com forms, fixed at start.
#[derive(Debug, Clone, Default)]
pub struct GitHubSide {
    /// The only registration-token path accepted (`orgs/<org>/actions/runners/registration-token`,
    /// …), compared case-insensitively; other scopes get 404.
    pub registration_token_path: String,
    pub app: Option<AppKey>,
    /// dotcom layout: the broker's `scheme://host:port`; queue URLs are
    /// `<broker>/scalesets/<opaque>/message`, a new opaque id on every create and refresh.
    pub broker_url: Option<String>,
}

/// The whole emulated service.
pub struct Core {
    pub settings: Settings,
    pub faults: Faults,
    org: String,
    pats: Vec<String>,
    /// Absolute URL of the Actions service, ending in `/`.
    service_url: String,
    started_unix_ms: u64,
    groups: Vec<RunnerGroup>,
    scale_sets: BTreeMap<i64, ScaleSet>,
    sessions: HashMap<Uuid, SessionState>,
    installation_tokens: HashMap<String, TokenInfo>,
    registration_tokens: HashMap<String, TokenInfo>,
    admin_tokens: HashMap<String, TokenInfo>,
    queue_tokens: HashMap<String, QueueToken>,
    runner_index: HashMap<i64, i64>,
    runner_names: HashMap<String, i64>,
    next_scale_set: i64,
    next_runner: i64,
    next_request: i64,
    next_run: i64,
    timeline: VecDeque<Event>,
    max_events: usize,
    seq: u64,
    rng: StdRng,
    github: GitHubSide,
    /// dotcom queue URL id → (session, scale set).
    queue_urls: HashMap<String, (Uuid, i64)>,
    /// Every 409 so far, to alternate between the two texts seen in the wild.
    conflicts_total: u64,
    /// Secondary rate limit: per credential, the times of its counted requests in the last minute.
    rate_windows: HashMap<String, VecDeque<u64>>,
    requests_by_credential: BTreeMap<String, u64>,
    rate_limited_by_credential: BTreeMap<String, u64>,
    faults_fired: BTreeMap<String, u64>,
}

fn rfc3339(unix_ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Core {
    pub fn new(settings: Settings, org: String, pats: Vec<String>, service_url: String, max_events: usize) -> Self {
        let started_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(ms).unwrap_or_default();
        Self {
            settings,
            faults: Faults::default(),
            org,
            pats,
            service_url,
            started_unix_ms,
            groups: vec![RunnerGroup { id: 1, name: "Default".into(), size: 0, is_default_group: true }],
            scale_sets: BTreeMap::new(),
            sessions: HashMap::new(),
            installation_tokens: HashMap::new(),
            registration_tokens: HashMap::new(),
            admin_tokens: HashMap::new(),
            queue_tokens: HashMap::new(),
            runner_index: HashMap::new(),
            runner_names: HashMap::new(),
            next_scale_set: 1,
            next_runner: 1,
            next_request: 1000,
            next_run: 7_000_000_000,
            timeline: VecDeque::new(),
            max_events,
            seq: 0,
            rng: StdRng::from_os_rng(),
            github: GitHubSide::default(),
            queue_urls: HashMap::new(),
            conflicts_total: 0,
            rate_windows: HashMap::new(),
            requests_by_credential: BTreeMap::new(),
            rate_limited_by_credential: BTreeMap::new(),
            faults_fired: BTreeMap::new(),
        }
    }

    /// Sets the registration scope, the App and the layout's broker (see [`GitHubSide`]).
    pub fn set_github(&mut self, g: GitHubSide) {
        self.github = g;
    }

    pub fn org(&self) -> &str {
        &self.org
    }

    pub fn service_url(&self) -> &str {
        &self.service_url
    }

    fn unix_ms(&self, now: u64) -> u64 {
        self.started_unix_ms + now
    }

    fn time(&self, now: u64) -> String {
        rfc3339(self.unix_ms(now))
    }

    // ---------------------------------------------------------------- GitHub REST auth chain

    /// `POST /app/installations/{id}/access_tokens` with a JWT of the configured App (401
    /// otherwise, in GitHub's words).
    pub fn installation_token(&mut self, bearer: &str, installation: &str, now: u64) -> R<(String, String)> {
        self.app_issuer(bearer, now).map_err(|e| ApiError::rest(401, &e.to_string()))?;
        let exp = now + 3_600_000;
        // JWT-shaped and ~520 characters, as GitHub issues them since 2026 (clients must not
        // assume the short opaque `ghs_…` form).
        let t =
            token::installation_jwt(installation, (self.unix_ms(now) / 1000) as i64, (self.unix_ms(exp) / 1000) as i64);
        self.installation_tokens
            .insert(t.clone(), TokenInfo { credential: format!("installation:{installation}"), exp_ms: exp });
        Ok((t, self.time(exp)))
    }

    /// The App an App JWT belongs to, verified as GitHub verifies it.
    pub fn app_issuer(&self, jwt: &str, now: u64) -> Result<String, token::AppJwtError> {
        let app = self.github.app.as_ref().ok_or(token::AppJwtError::UnknownIssuer)?;
        let now_s = (self.unix_ms(now) / 1000) as i64;
        token::verify_app_jwt(jwt, &app.id, &app.public_key, now_s)
    }

    /// The credential behind a PAT or installation token.
    pub fn github_credential(&self, bearer: &str, now: u64) -> Option<(String, AuthKind)> {
        if let Some(i) = self.pats.iter().position(|p| p == bearer) {
            return Some((format!("pat#{}", i + 1), AuthKind::Pat));
        }
        self.installation_tokens
            .get(bearer)
            .filter(|t| now < t.exp_ms)
            .map(|t| (t.credential.clone(), AuthKind::Installation))
    }

    /// `POST …/actions/runners/registration-token`: 401 for an unknown credential, 404 when
    /// `path` (`orgs/<org>/…`, `repos/<o>/<r>/…`, `enterprises/<e>/…`) is not the configured scope.
    pub fn registration_token(&mut self, bearer: &str, path: &str, now: u64) -> R<(String, String)> {
        let (credential, _) =
            self.github_credential(bearer, now).ok_or_else(|| ApiError::rest(401, "Bad credentials"))?;
        if !self.github.registration_token_path.is_empty()
            && !path.eq_ignore_ascii_case(&self.github.registration_token_path)
        {
            return Err(ApiError::rest(404, "Not Found"));
        }
        let exp = now + 3_600_000;
        let t = token::opaque("AREG");
        self.registration_tokens.insert(t.clone(), TokenInfo { credential, exp_ms: exp });
        Ok((t, self.time(exp)))
    }

    /// `POST /actions/runner-registration`: the Actions service URL and an admin JWT whose
    /// `exp` is `admin_token_ttl` away.
    pub fn runner_registration(&mut self, remote_auth: &str, now: u64) -> R<(String, String)> {
        let info = self
            .registration_tokens
            .get(remote_auth)
            .filter(|t| now < t.exp_ms)
            .cloned()
            .ok_or_else(|| ApiError::rest(401, "Bad credentials"))?;
        let exp = now + ms(self.settings.admin_token_ttl);
        let iat = (self.unix_ms(now) / 1000) as i64;
        let exp_s = (self.unix_ms(exp) / 1000) as i64;
        let t = token::mint_jwt(&info.credential, iat, exp_s);
        self.admin_tokens.insert(t.clone(), TokenInfo { credential: info.credential, exp_ms: exp });
        Ok((self.service_url.clone(), t))
    }

    /// The credential a registration token was minted for (expired or not).
    pub fn registration_credential(&self, token: &str) -> Option<String> {
        self.registration_tokens.get(token).map(|t| t.credential.clone())
    }

    /// The credential an admin token was minted for (expired or not).
    pub fn admin_credential(&self, token: &str) -> Option<String> {
        self.admin_tokens.get(token).map(|t| t.credential.clone())
    }

    /// The credential that opened the session a queue token belongs to.
    pub fn queue_credential(&self, token: &str) -> Option<String> {
        let q = self.queue_tokens.get(token)?;
        self.sessions.get(&q.session).map(|s| s.credential.clone())
    }

    /// Secondary rate limit: counts a request of `credential` and answers `Some(retry after
    /// seconds)` when it is over `rate_limit_per_minute` in the last minute. Refused requests
    /// do not count.
    pub fn rate_limit(&mut self, credential: &str, now: u64) -> Option<u64> {
        let limit = self.settings.rate_limit_per_minute as usize;
        if limit == 0 {
            return None;
        }
        let w = self.rate_windows.entry(credential.to_string()).or_default();
        while w.front().is_some_and(|&t| t + 60_000 <= now) {
            w.pop_front();
        }
        if w.len() >= limit {
            *self.rate_limited_by_credential.entry(credential.to_string()).or_default() += 1;
            let oldest = w.front().copied().unwrap_or(now);
            return Some((oldest + 60_000).saturating_sub(now).div_ceil(1000).max(1));
        }
        w.push_back(now);
        None
    }

    /// Counts a request for the report's `requests_by_credential` and the fired faults.
    pub fn count_request(&mut self, credential: Option<&str>, faults: &[&str]) {
        if let Some(c) = credential {
            *self.requests_by_credential.entry(c.to_string()).or_default() += 1;
        }
        for f in faults {
            *self.faults_fired.entry((*f).to_string()).or_default() += 1;
        }
    }

    /// dotcom layout: the scale set a queue URL id leads to, or 404 when the id is unknown or
    /// was replaced by a refresh (unless `queue_url_survives_refresh`).
    pub fn queue_url_scale_set(&self, opaque: &str) -> R<i64> {
        let &(session, set) = self.queue_urls.get(opaque).ok_or_else(|| ApiError::rest(404, "Not Found"))?;
        let current = self.sessions.get(&session).and_then(|s| s.queue_url.as_deref()) == Some(opaque);
        if current || self.settings.queue_url_survives_refresh {
            Ok(set)
        } else {
            Err(ApiError::rest(404, "Not Found"))
        }
    }

    /// The credential an admin token was minted for; 401 when unknown or past `exp`.
    pub fn check_admin(&self, bearer: &str, now: u64) -> R<String> {
        self.admin_tokens
            .get(bearer)
            .filter(|t| now < t.exp_ms)
            .map(|t| t.credential.clone())
            .ok_or_else(ApiError::unauthorized)
    }

    /// Whether the emulator minted this admin token (expired or not).
    /// Every credential this emulator accepts or has handed out and still knows: PATs and
    /// admin, registration and queue tokens. None of them may ever reach the coordinators
    /// (DESIGN §6.7); drills search the voters' files for them.
    pub fn secrets(&self) -> Vec<String> {
        self.pats
            .iter()
            .chain(self.admin_tokens.keys())
            .chain(self.registration_tokens.keys())
            .chain(self.queue_tokens.keys())
            .cloned()
            .collect()
    }

    pub fn is_admin_token(&self, bearer: &str) -> bool {
        self.admin_tokens.contains_key(bearer)
    }

    pub fn is_queue_token(&self, bearer: &str) -> bool {
        self.queue_tokens.contains_key(bearer)
    }

    /// Expires every admin and queue token now (a fault: "token expiry").
    pub fn expire_tokens(&mut self, now: u64) {
        for t in self.admin_tokens.values_mut() {
            t.exp_ms = t.exp_ms.min(now);
        }
        for t in self.queue_tokens.values_mut() {
            t.exp_ms = t.exp_ms.min(now);
        }
    }

    // ---------------------------------------------------------------- runner groups, scale sets

    /// Groups by name, case-insensitively as GitHub matches them (ARC's chart values say
    /// `runnerGroup: default` for the group GitHub calls "Default").
    pub fn runner_groups(&self, name: Option<&str>) -> ListOf<RunnerGroup> {
        ListOf::new(
            self.groups
                .iter()
                .filter(|g| name.is_none_or(|n| n.is_empty() || g.name.eq_ignore_ascii_case(n)))
                .cloned()
                .collect(),
        )
    }

    /// Adds a runner group (emulator side channel), returning its id.
    pub fn add_runner_group(&mut self, name: &str) -> i64 {
        if let Some(g) = self.groups.iter().find(|g| g.name == name) {
            return g.id;
        }
        let id = self.groups.iter().map(|g| g.id).max().unwrap_or(0) + 1;
        self.groups.push(RunnerGroup { id, name: name.into(), size: 0, is_default_group: false });
        id
    }

    fn live_set(&self, id: i64) -> R<&ScaleSet> {
        self.scale_sets.get(&id).filter(|s| !s.deleted).ok_or_else(|| ApiError::scale_set_not_found(id))
    }

    fn live_set_mut(&mut self, id: i64) -> R<&mut ScaleSet> {
        self.scale_sets.get_mut(&id).filter(|s| !s.deleted).ok_or_else(|| ApiError::scale_set_not_found(id))
    }

    fn with_stats(&self, s: &ScaleSet) -> RunnerScaleSet {
        let mut set = s.set.clone();
        set.statistics = Some(stats(s));
        set
    }

    pub fn list_scale_sets(&self, group: Option<i64>, name: Option<&str>) -> ListOf<RunnerScaleSet> {
        ListOf::new(
            self.scale_sets
                .values()
                .filter(|s| !s.deleted)
                .filter(|s| group.is_none_or(|g| s.set.runner_group_id == g))
                .filter(|s| name.is_none_or(|n| s.set.name == n))
                .map(|s| self.with_stats(s))
                .collect(),
        )
    }

    pub fn get_scale_set(&self, id: i64) -> R<RunnerScaleSet> {
        Ok(self.with_stats(self.live_set(id)?))
    }

    pub fn create_scale_set(&mut self, input: ScaleSetInput, now: u64) -> R<RunnerScaleSet> {
        let name = input
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::bad_request("The runner scale set name must not be empty."))?;
        let gid = input.runner_group_id.filter(|g| *g > 0).unwrap_or(1);
        let group = self
            .groups
            .iter()
            .find(|g| g.id == gid)
            .cloned()
            .ok_or_else(|| ApiError::bad_request(format!("Runner group {gid} does not exist.")))?;
        if self.scale_sets.values().any(|s| !s.deleted && s.set.runner_group_id == gid && s.set.name == name) {
            return Err(ApiError::actions(
                400,
                RT,
                "RunnerScaleSetExistsException",
                format!("A runner scale set with name {name} already exists in runner group {}.", group.name),
            ));
        }
        let id = self.next_scale_set;
        self.next_scale_set += 1;
        let mut labels = input.labels.unwrap_or_default();
        for l in &mut labels {
            if l.kind.is_empty() {
                l.kind = "System".into();
            }
        }
        if labels.is_empty() {
            labels.push(Label { kind: "System".into(), name: name.clone() });
        }
        let set = RunnerScaleSet {
            id,
            name,
            runner_group_id: gid,
            runner_group_name: group.name,
            labels,
            runner_setting: input.runner_setting.unwrap_or_else(|| serde_json::json!({})),
            created_on: self.time(now),
            runner_jit_config_url: format!("{}_apis/runtime/runnerscalesets/{id}/generatejitconfig", self.service_url),
            statistics: None,
        };
        self.scale_sets.insert(
            id,
            ScaleSet {
                set,
                org: self.org.clone(),
                deleted: false,
                active: None,
                sessions: Vec::new(),
                log: BTreeMap::new(),
                pending: Vec::new(),
                next_message_id: 1,
                max_delivered: 0,
                last_capacity: i64::from(i32::MAX),
                jobs: BTreeMap::new(),
                runners: BTreeMap::new(),
                notify: Arc::new(Notify::new()),
                first_open: None,
                no_session_since: None,
                no_session_ms: 0,
                c: Counters::default(),
                workload: None,
                by_token: BTreeMap::new(),
            },
        );
        self.get_scale_set(id)
    }

    /// PATCH: only the fields present change (ARC sends just the group or just the name).
    pub fn update_scale_set(&mut self, id: i64, input: ScaleSetInput) -> R<RunnerScaleSet> {
        let group = match input.runner_group_id.filter(|g| *g > 0) {
            Some(gid) => Some(
                self.groups
                    .iter()
                    .find(|g| g.id == gid)
                    .cloned()
                    .ok_or_else(|| ApiError::bad_request(format!("Runner group {gid} does not exist.")))?,
            ),
            None => None,
        };
        let s = self.live_set_mut(id)?;
        if let Some(g) = group {
            s.set.runner_group_id = g.id;
            s.set.runner_group_name = g.name;
        }
        if let Some(n) = input.name.filter(|n| !n.is_empty()) {
            s.set.name = n;
        }
        if let Some(l) = input.labels.filter(|l| !l.is_empty()) {
            s.set.labels = l;
        }
        if let Some(r) = input.runner_setting {
            s.set.runner_setting = r;
        }
        self.get_scale_set(id)
    }

    /// DELETE (also the dormant-set GC side channel): its open session closes, and later
    /// calls get 404 `RunnerScaleSetNotFoundException`.
    pub fn delete_scale_set(&mut self, id: i64, now: u64) -> R<()> {
        self.live_set(id)?;
        if let Some(sid) = self.scale_sets.get(&id).and_then(|s| s.active) {
            self.close_session(sid, now, CloseReason::ScaleSetDeleted);
        }
        if let Some(s) = self.scale_sets.get_mut(&id) {
            s.deleted = true;
            s.notify.notify_waiters();
        }
        Ok(())
    }

    // ---------------------------------------------------------------- sessions

    fn session_deadline(&self, s: &SessionState) -> Option<u64> {
        let ttl = ms(self.settings.session_ttl);
        match self.settings.session_ttl_from {
            SessionTtlFrom::Creation => Some(s.opened + ttl),
            SessionTtlFrom::LastPoll if s.polls_in_flight > 0 => None,
            SessionTtlFrom::LastPoll => Some(s.last_poll + ttl),
        }
    }

    /// Closes abandoned sessions whose TTL ran out, at the instant it ran out.
    pub fn expire_due(&mut self, now: u64) {
        let due: Vec<(Uuid, u64)> = self
            .scale_sets
            .values()
            .filter_map(|s| s.active)
            .filter_map(|id| {
                let s = self.sessions.get(&id)?;
                let d = self.session_deadline(s)?;
                (now >= d).then_some((id, d))
            })
            .collect();
        for (id, at) in due {
            self.close_session(id, at, CloseReason::Expired);
        }
    }

    fn expire_set(&mut self, set: i64, now: u64) {
        let Some(id) = self.scale_sets.get(&set).and_then(|s| s.active) else { return };
        let Some(d) = self.sessions.get(&id).and_then(|s| self.session_deadline(s)) else { return };
        if now >= d {
            self.close_session(id, d, CloseReason::Expired);
        }
    }

    fn close_session(&mut self, id: Uuid, at: u64, how: CloseReason) {
        let Some(s) = self.sessions.get_mut(&id) else { return };
        if s.closed.is_some() {
            return;
        }
        s.closed = Some((at, how));
        let set_id = s.scale_set;
        if let Some(set) = self.scale_sets.get_mut(&set_id)
            && set.active == Some(id)
        {
            set.active = None;
            set.no_session_since = Some(at);
            set.notify.notify_waiters();
        }
    }

    fn session_body(&mut self, id: Uuid, now: u64) -> R<Session> {
        let s = self.sessions.get(&id).ok_or_else(|| ApiError::session_expired(&id.to_string()))?;
        let (set_id, owner) = (s.scale_set, s.owner.clone());
        let t = token::mint_jwt(
            &format!("session:{id}"),
            (self.unix_ms(now) / 1000) as i64,
            (self.unix_ms(now + ms(self.settings.queue_token_ttl)) / 1000) as i64,
        );
        self.queue_tokens.insert(
            t.clone(),
            QueueToken { session: id, scale_set: set_id, exp_ms: now + ms(self.settings.queue_token_ttl) },
        );
        let message_queue_url = match self.github.broker_url.clone() {
            Some(broker) => {
                // github.com's broker form: no scale-set or session id, a new URL every time.
                let opaque = Uuid::new_v4().simple().to_string();
                self.queue_urls.insert(opaque.clone(), (id, set_id));
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.queue_url = Some(opaque.clone());
                }
                format!("{broker}/scalesets/{opaque}/message")
            }
            None => format!(
                "{}_apis/runtime/runnerscalesets/{set_id}/messages?sessionId={id}&api-version=6.0-preview",
                self.service_url
            ),
        };
        Ok(Session {
            session_id: id.to_string(),
            owner_name: owner,
            runner_scale_set: self.get_scale_set(set_id)?,
            message_queue_url,
            message_queue_access_token: t,
            statistics: stats(self.live_set(set_id)?),
        })
    }

    /// `POST …/sessions`: exactly one open session per scale set, whoever asks.
    pub fn create_session(&mut self, set_id: i64, owner: &str, credential: &str, now: u64) -> R<Session> {
        self.expire_set(set_id, now);
        let set = self.live_set_mut(set_id)?;
        if let Some(active) = set.active {
            set.c.conflicts_409 += 1;
            let name = set.set.name.clone();
            let holder = self.sessions.get(&active).map(|s| s.owner.clone()).unwrap_or_default();
            // Both texts are seen in the wild; alternate so that clients match neither.
            self.conflicts_total += 1;
            let message = if !self.conflicts_total.is_multiple_of(2) {
                format!("The runner scale set {name} already has an active session for owner {holder}.")
            } else {
                format!("The actions runner scaleset {name} already has an active session.")
            };
            return Err(ApiError::actions(409, RT, "RunnerScaleSetSessionConflictException", message));
        }
        let id = Uuid::new_v4();
        set.active = Some(id);
        set.sessions.push(id);
        set.first_open.get_or_insert(now);
        if let Some(since) = set.no_session_since.take() {
            set.no_session_ms += now.saturating_sub(since);
        }
        self.sessions.insert(
            id,
            SessionState {
                id,
                scale_set: set_id,
                owner: owner.to_string(),
                credential: credential.to_string(),
                opened: now,
                closed: None,
                last_poll: now,
                polls_in_flight: 0,
                // The opening request's arrival number comes with its record.
                first_holder: (now, u64::MAX),
                last_holder: (now, 0),
                polls: 0,
                zombie_requests: 0,
                refreshes: 0,
                queue_url: None,
            },
        );
        self.session_body(id, now)
    }

    fn open_session_in(&mut self, set_id: i64, session: &str, now: u64) -> R<Uuid> {
        self.expire_set(set_id, now);
        self.live_set(set_id)?;
        Uuid::parse_str(session)
            .ok()
            .filter(|id| self.sessions.get(id).is_some_and(|s| s.scale_set == set_id && s.closed.is_none()))
            .ok_or_else(|| ApiError::session_expired(session))
    }

    /// `PATCH …/sessions/{id}`: a new queue token; 404 `RunnerAdminException` once the
    /// session is gone (what GitHub answers after evicting one).
    pub fn refresh_session(&mut self, set_id: i64, session: &str, now: u64) -> R<Session> {
        let id = self
            .open_session_in(set_id, session, now)
            .map_err(|e| if e.status == 404 { e } else { ApiError::session_evicted() })?;
        if let Some(s) = self.sessions.get_mut(&id) {
            s.refreshes += 1;
            let set = s.scale_set;
            if let Some(set) = self.scale_sets.get_mut(&set) {
                set.c.session_refreshes += 1;
            }
        }
        self.session_body(id, now)
    }

    /// `DELETE …/sessions/{id}`: 204, or 400 `RunnerScaleSetSessionExpiredException` when
    /// unknown or already closed, or 403 under `cross-credential-delete deny`.
    pub fn delete_session(&mut self, set_id: i64, session: &str, credential: &str, now: u64) -> R<()> {
        let id = self.open_session_in(set_id, session, now)?;
        if self.settings.cross_credential_delete == CrossCredentialDelete::Deny
            && self.sessions.get(&id).is_some_and(|s| s.credential != credential)
        {
            return Err(ApiError::actions(
                403,
                "GitHub.Services.Security",
                "AccessDeniedException",
                format!("Access denied: session {id} was created with another credential."),
            ));
        }
        self.close_session(id, now, CloseReason::Deleted);
        Ok(())
    }

    /// Loses a session server-side, as GitHub's broker sometimes does: polls get 401, the
    /// refresh 404 `RunnerAdminException`.
    pub fn evict_session(&mut self, session: &str, now: u64) -> R<()> {
        let id = Uuid::parse_str(session).map_err(|_| ApiError::session_expired(session))?;
        match self.sessions.get(&id) {
            Some(s) if s.closed.is_none() => {
                self.close_session(id, now, CloseReason::Evicted);
                Ok(())
            }
            _ => Err(ApiError::session_expired(session)),
        }
    }

    /// Who a request belongs to, from the session id in its path, its queue token or the
    /// `ownerName` it sends.
    pub fn attribute(&self, session_in_path: Option<&str>, bearer: Option<&str>, owner: Option<&str>) -> Attribution {
        let from_session = |id: Uuid| {
            self.sessions.get(&id).map(|s| Attribution {
                session: Some(id),
                owner: Some(s.owner.clone()),
                zombie: false,
            })
        };
        if let Some(a) = session_in_path.and_then(|s| Uuid::parse_str(s).ok()).and_then(from_session) {
            return a;
        }
        if let Some(q) = bearer.and_then(|b| self.queue_tokens.get(b))
            && let Some(mut a) = from_session(q.session)
        {
            a.zombie = self.sessions.get(&q.session).is_some_and(|s| s.closed.is_some());
            return a;
        }
        Attribution { session: None, owner: owner.map(str::to_string), zombie: false }
    }

    /// A queue-token request's session, or 401: unknown or expired token, another scale
    /// set's token, or a closed session's token (unless deleted sessions' tokens survive).
    fn check_queue(&self, set_id: i64, bearer: &str, now: u64) -> R<Uuid> {
        let q = self.queue_tokens.get(bearer).ok_or_else(ApiError::unauthorized)?;
        if now >= q.exp_ms || q.scale_set != set_id {
            return Err(ApiError::unauthorized());
        }
        let s = self.sessions.get(&q.session).ok_or_else(ApiError::unauthorized)?;
        match s.closed {
            None => Ok(s.id),
            Some((_, CloseReason::Deleted)) if self.settings.queue_token_survives_session_delete => Ok(s.id),
            Some(_) => Err(ApiError::unauthorized()),
        }
    }

    // ---------------------------------------------------------------- message queue

    /// The scale set's wake-up bell for long polls.
    pub fn notify_of(&self, set_id: i64) -> Option<Arc<Notify>> {
        self.scale_sets.get(&set_id).map(|s| s.notify.clone())
    }

    /// Marks a long poll started or ended (a poll in flight keeps a `last-poll` session alive).
    pub fn poll_in_flight(&mut self, session: Uuid, started: bool, now: u64) {
        if let Some(s) = self.sessions.get_mut(&session) {
            if started {
                s.polls_in_flight += 1;
                s.polls += 1;
            } else {
                s.polls_in_flight = s.polls_in_flight.saturating_sub(1);
            }
            s.last_poll = now;
        }
    }

    /// One attempt of a long poll: `Ok(None)` means nothing to deliver yet.
    pub fn poll(
        &mut self,
        set_id: i64,
        bearer: &str,
        last_message_id: i64,
        capacity: Option<i64>,
        now: u64,
    ) -> R<(Uuid, Option<MessageEnvelope>)> {
        self.expire_set(set_id, now);
        self.live_set(set_id)?;
        let session = self.check_queue(set_id, bearer, now)?;
        if let Some(s) = self.sessions.get_mut(&session) {
            s.last_poll = now;
        }
        let mode = self.settings.mode;
        let cursor_mode = self.settings.cursor;
        let odd_every = self.settings.odd_messages_every;
        let clock = Clock { base_unix_ms: self.started_unix_ms, now, mode };
        let set = self.live_set_mut(set_id)?;
        if let Some(c) = capacity {
            set.last_capacity = c.max(0);
        }
        let cap = capacity.map_or(set.last_capacity, |c| c.max(0));
        advance_queue(set, mode, cap, now, clock);
        package(set, odd_every);
        let cursor = match cursor_mode {
            Cursor::PerSession => last_message_id,
            Cursor::PerScaleSet => last_message_id.max(set.max_delivered),
        };
        let Some((&id, m)) = set.log.range_mut(cursor + 1..).next() else {
            return Ok((session, None));
        };
        m.deliveries += 1;
        set.c.messages_delivered += 1;
        if m.deliveries > 1 {
            set.c.messages_redelivered += 1;
        }
        let body = m.body.clone();
        set.max_delivered = set.max_delivered.max(id);
        Ok((
            session,
            Some(MessageEnvelope {
                message_id: id,
                message_type: "RunnerScaleSetJobMessages".into(),
                body,
                statistics: stats(set),
            }),
        ))
    }

    /// `DELETE <queue>/{messageId}`: 204 whether or not the message was still there.
    pub fn ack(&mut self, set_id: i64, bearer: &str, message_id: i64, now: u64) -> R<()> {
        self.expire_set(set_id, now);
        self.live_set(set_id)?;
        self.check_queue(set_id, bearer, now)?;
        let set = self.live_set_mut(set_id)?;
        if set.log.remove(&message_id).is_some() {
            set.c.messages_deleted += 1;
        }
        Ok(())
    }

    /// `acquirejobs` (queue token): grants `Available` jobs while the set's assigned jobs stay
    /// within its last advertised capacity. Re-asking for a job this session already holds
    /// is granted again (an idempotent retry); another session's job is refused.
    pub fn acquire(&mut self, set_id: i64, bearer: &str, ids: &[i64], now: u64) -> R<ListOf<i64>> {
        self.expire_set(set_id, now);
        self.live_set(set_id)?;
        let session = self.check_queue(set_id, bearer, now)?;
        let set = self.live_set_mut(set_id)?;
        let mut granted = Vec::new();
        let mut assigned = assigned_count(set);
        for &rid in ids {
            let cap = set.last_capacity;
            let Some(job) = set.jobs.values_mut().find(|j| j.runner_request_id == rid) else {
                continue;
            };
            if job.acquired_by.is_some() {
                set.c.acquire_repeats += 1;
                if job.acquired_by == Some(session) {
                    job.grants += 1;
                    if job.grants == 2 {
                        set.c.jobs_acquired_twice += 1;
                    }
                    granted.push(rid);
                }
                continue;
            }
            if job.state == JobState::Available && assigned < cap {
                job.state = JobState::Assigned;
                job.assigned_at = Some(now);
                job.acquired_by = Some(session);
                job.grants = 1;
                assigned += 1;
                granted.push(rid);
            }
        }
        if !granted.is_empty() {
            set.notify.notify_waiters();
        }
        Ok(ListOf::new(granted))
    }

    /// Legacy `acquirablejobs` (≤0.10): `None` means 204.
    pub fn acquirable(&self, set_id: i64) -> R<Option<serde_json::Value>> {
        let set = self.live_set(set_id)?;
        let jobs: Vec<_> = set
            .jobs
            .values()
            .filter(|j| j.state == JobState::Available)
            .map(|j| {
                serde_json::json!({
                    "acquireJobUrl": format!("{}_apis/runtime/runnerscalesets/{set_id}/acquirejobs", self.service_url),
                    "messageType": "JobAvailable",
                    "runnerRequestId": j.runner_request_id,
                    "repositoryName": "emulated-repo",
                    "ownerName": self.org,
                    "jobWorkflowRef": format!("{}/emulated-repo/.github/workflows/ci.yml@refs/heads/main", self.org),
                    "eventName": "push",
                    "requestLabels": [set.set.name],
                })
            })
            .collect();
        Ok((!jobs.is_empty()).then(|| serde_json::json!({"count": jobs.len(), "value": jobs})))
    }

    // ---------------------------------------------------------------- runners

    pub fn generate_jit(&mut self, set_id: i64, name: &str) -> R<JitConfig> {
        if name.is_empty() {
            return Err(ApiError::bad_request("The runner name must not be empty."));
        }
        self.live_set(set_id)?;
        if self.runner_names.contains_key(name) {
            return Err(ApiError::actions(
                409,
                DT,
                "AgentExistsException",
                format!("An agent with the name {name} already exists in the pool."),
            ));
        }
        let id = self.next_runner;
        self.next_runner += 1;
        let online = self.settings.auto_runners;
        let set = self.live_set_mut(set_id)?;
        set.runners.insert(id, Runner { id, name: name.into(), online, job: None, finished: false, auto: online });
        self.runner_index.insert(id, set_id);
        self.runner_names.insert(name.into(), id);
        let runner = RunnerReference { id, name: name.into(), runner_scale_set_id: set_id };
        let cfg = serde_json::json!({"runnerId": id, "runnerName": name, "scaleSetId": set_id});
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode(cfg.to_string());
        Ok(JitConfig { runner, encoded_jit_config: encoded })
    }

    /// A registered runner. An ephemeral runner whose one job ended is deregistered, as GitHub
    /// does: ARC's controller asks for it after the runner pod exits 0 and restarts the pod
    /// while it is still found.
    fn runner_ref(&self, id: i64) -> Option<RunnerReference> {
        let set = *self.runner_index.get(&id)?;
        let r = self.scale_sets.get(&set)?.runners.get(&id).filter(|r| !r.finished)?;
        Some(RunnerReference { id, name: r.name.clone(), runner_scale_set_id: set })
    }

    pub fn runner_by_id(&self, id: i64) -> R<RunnerReference> {
        self.runner_ref(id).ok_or_else(|| {
            ApiError::actions(
                404,
                DT,
                "AgentNotFoundException",
                format!("No agent found in pool 0 with identifier {id}."),
            )
        })
    }

    pub fn runners_by_name(&self, name: &str) -> ListOf<RunnerReference> {
        ListOf::new(self.runner_names.get(name).and_then(|id| self.runner_ref(*id)).into_iter().collect())
    }

    /// 204 also for unknown runners; 400 `JobStillRunningException` while it runs a job.
    pub fn remove_runner(&mut self, id: i64) -> R<()> {
        let Some(&set_id) = self.runner_index.get(&id) else { return Ok(()) };
        let Some(set) = self.scale_sets.get_mut(&set_id) else { return Ok(()) };
        if set.runners.get(&id).is_some_and(|r| r.job.is_some()) {
            return Err(ApiError::actions(
                400,
                DT,
                "JobStillRunningException",
                format!("The agent {id} is still running a job and cannot be removed."),
            ));
        }
        if let Some(r) = set.runners.remove(&id) {
            self.runner_names.remove(&r.name);
        }
        self.runner_index.remove(&id);
        set.notify.notify_waiters();
        Ok(())
    }

    fn find_runner(&mut self, name: &str) -> R<(i64, i64)> {
        let id = *self.runner_names.get(name).ok_or_else(|| ApiError::not_found(&format!("runner {name}")))?;
        let set = *self.runner_index.get(&id).ok_or_else(|| ApiError::not_found("runner's scale set"))?;
        Ok((set, id))
    }

    /// Side channel: the JIT runner connected; with `auto` it then takes and finishes jobs by
    /// itself (each lasts its job's duration), as every runner does with `auto_runners`.
    pub fn runner_online(&mut self, name: &str, auto: bool) -> R<()> {
        let (set, id) = self.find_runner(name)?;
        if let Some(r) = self.scale_sets.get_mut(&set).and_then(|s| s.runners.get_mut(&id)) {
            r.online = true;
            r.auto |= auto;
        }
        Ok(())
    }

    /// When the first job queued after `after_ms` reached a runner (ms on the emulator clock),
    /// among jobs still known (queued, assigned or running): the lab's "jobs run again". A
    /// caller polling more often than the shortest job lasts sees every such start.
    pub fn first_start_after(&self, set_id: i64, after_ms: u64) -> Option<u64> {
        self.live_set(set_id)
            .ok()?
            .jobs
            .values()
            .filter(|j| j.queued_at > after_ms)
            .filter_map(|j| j.runner_assigned_at)
            .min()
    }

    /// Side channel: a runner's state (a runner process waits for `finished` to exit).
    pub fn runner_state(&mut self, name: &str) -> R<RunnerState> {
        let (set, id) = self.find_runner(name)?;
        let r = self
            .scale_sets
            .get(&set)
            .and_then(|s| s.runners.get(&id))
            .ok_or_else(|| ApiError::not_found(&format!("runner {name}")))?;
        Ok(RunnerState { id, online: r.online, job_id: r.job.clone(), finished: r.finished })
    }

    /// Side channel: the runner takes `job_id` (or the oldest waiting assigned job).
    pub fn runner_start(&mut self, name: &str, job_id: Option<&str>, now: u64) -> R<String> {
        let (set_id, id) = self.find_runner(name)?;
        let clock = Clock { base_unix_ms: self.started_unix_ms, now, mode: self.settings.mode };
        let set = self.live_set_mut(set_id)?;
        start_job(set, id, job_id, now, clock)
    }

    /// Side channel: the runner's job ended with `result` (`succeeded`, `failed`, `canceled`).
    pub fn runner_finish(&mut self, name: &str, result: &str, now: u64) -> R<String> {
        let (set_id, id) = self.find_runner(name)?;
        let clock = Clock { base_unix_ms: self.started_unix_ms, now, mode: self.settings.mode };
        let set = self.live_set_mut(set_id)?;
        let job_id = set
            .runners
            .get(&id)
            .and_then(|r| r.job.clone())
            .ok_or_else(|| ApiError::bad_request(format!("runner {name} is not running a job")))?;
        finish_job(set, &job_id, result, clock);
        Ok(job_id)
    }

    // ---------------------------------------------------------------- jobs and time

    /// Queues `count` jobs on a scale set; they are assigned on later polls.
    pub fn enqueue_jobs(&mut self, set_id: i64, count: u32, duration: Duration, now: u64) -> R<Vec<String>> {
        self.live_set(set_id)?;
        let mut ids = Vec::new();
        for _ in 0..count {
            let job_id = Uuid::new_v4().to_string();
            let (rid, run) = (self.next_request, self.next_run);
            self.next_request += 1;
            self.next_run += 1;
            let set = self.live_set_mut(set_id)?;
            set.jobs.insert(
                (now, job_id.clone()),
                Job {
                    job_id: job_id.clone(),
                    runner_request_id: rid,
                    workflow_run_id: run,
                    display_name: format!("job-{rid}"),
                    duration_ms: ms(duration),
                    state: JobState::Queued,
                    queued_at: now,
                    assigned_at: None,
                    runner_assigned_at: None,
                    acquired_by: None,
                    grants: 0,
                    reassignments: 0,
                },
            );
            set.c.jobs_enqueued += 1;
            ids.push(job_id);
        }
        if let Ok(set) = self.live_set(set_id) {
            set.notify.notify_waiters();
        }
        Ok(ids)
    }

    pub fn set_workload(&mut self, w: Workload) -> R<()> {
        let set = self.live_set_mut(w.scale_set_id)?;
        set.workload = (w.jobs_per_minute > 0.0).then_some(w);
        Ok(())
    }

    /// Advances time: expires sessions, runs the workload generators and (with
    /// `auto_runners`) lets idle runners take assigned jobs and finish due ones.
    pub fn tick(&mut self, now: u64) {
        self.expire_due(now);
        let auto = self.settings.auto_runners;
        let assign_timeout = ms(self.settings.assign_timeout);
        let clock = Clock { base_unix_ms: self.started_unix_ms, now, mode: self.settings.mode };
        let mut new_jobs = Vec::new();
        for (id, set) in self.scale_sets.iter_mut().filter(|(_, s)| !s.deleted) {
            if let Some(w) = set.workload.as_mut() {
                let last = w.last_ms.replace(now).unwrap_or(now);
                w.carry += w.jobs_per_minute * (now - last) as f64 / 60_000.0;
                while w.carry >= 1.0 {
                    w.carry -= 1.0;
                    let (lo, hi) = (w.min_duration_seconds.max(0.0), w.max_duration_seconds.max(0.0));
                    let secs = if hi > lo { self.rng.random_range(lo..hi) } else { lo };
                    new_jobs.push((*id, Duration::from_secs_f64(secs)));
                }
            }
            if assign_timeout > 0 {
                cancel_unstarted(set, assign_timeout, clock);
            }
            let automatic = |set: &ScaleSet, rid: i64| auto || set.runners.get(&rid).is_some_and(|r| r.auto);
            let due: Vec<String> = set
                .jobs
                .values()
                .filter_map(|j| match j.state {
                    JobState::Running { finish_at, runner_id } if finish_at <= now && automatic(set, runner_id) => {
                        Some(j.job_id.clone())
                    }
                    _ => None,
                })
                .collect();
            for job in due {
                finish_job(set, &job, "succeeded", clock);
            }
            // Idle runners take waiting jobs, oldest first, until one side runs out.
            while let Some(rid) = set
                .runners
                .values()
                .find(|r| (auto || r.auto) && r.online && !r.finished && r.job.is_none())
                .map(|r| r.id)
            {
                if start_job(set, rid, None, now, clock).is_err() {
                    break;
                }
            }
        }
        for (id, d) in new_jobs {
            let _ = self.enqueue_jobs(id, 1, d, now);
        }
    }

    // ---------------------------------------------------------------- timeline and report

    /// Records a finished request and credits it to its session for the report.
    pub fn record(&mut self, mut e: Event, a: &Attribution) {
        if let Some(id) = a.session
            && let Some(s) = self.sessions.get_mut(&id)
        {
            // Holder activity: any holder-only request while the session is open, and any
            // that succeeds after it closed (a zombie). A refused request on a closed session
            // (a late DELETE answered 400 by a member that found it stale) serves nothing.
            if e.class.holder_only() && (s.closed.is_none() || e.status < 400) {
                s.first_holder = s.first_holder.min((e.at_ms, e.arrival));
                s.last_holder = s.last_holder.max((e.at_ms, e.arrival));
            }
            if a.zombie {
                s.zombie_requests += 1;
                if let Some(set) = self.scale_sets.get_mut(&s.scale_set) {
                    set.c.zombie_requests += 1;
                }
            }
        }
        if let (Some(t), Some(set_id)) = (e.sender.as_deref().and_then(sender_token), e.scale_set_id)
            && let Some(set) = self.scale_sets.get_mut(&set_id)
        {
            let reqs = set.by_token.entry(t).or_default();
            if reqs.len() >= MAX_REQUESTS_PER_TOKEN {
                reqs.remove(0);
            }
            reqs.push((e.at_ms, e.arrival, format!("{} {}", e.method, e.path)));
        }
        self.seq += 1;
        e.seq = self.seq;
        self.timeline.push_back(e);
        while self.timeline.len() > self.max_events {
            self.timeline.pop_front();
        }
    }

    pub fn timeline(&self, since: u64, limit: usize) -> Vec<Event> {
        self.timeline.iter().filter(|e| e.seq > since).take(limit).cloned().collect()
    }

    pub fn fire_faults(&mut self, t: &FaultTarget<'_>, now: u64) -> Vec<super::faults::FaultSpec> {
        self.faults.fire(t, now)
    }

    pub fn report(&mut self, now: u64) -> Report {
        self.expire_due(now);
        let scale_sets = self
            .scale_sets
            .values()
            .map(|set| {
                let sessions: Vec<SessionReport> = set
                    .sessions
                    .iter()
                    .filter_map(|id| self.sessions.get(id))
                    .map(|s| SessionReport {
                        session_id: s.id.to_string(),
                        owner: s.owner.clone(),
                        credential: s.credential.clone(),
                        opened_at: s.opened,
                        closed_at: s.closed.map(|c| c.0),
                        close_reason: s.closed.map_or(CloseReason::Open, |c| c.1),
                        first_holder_request_at: s.first_holder.0,
                        last_holder_request_at: s.last_holder.0,
                        first_holder_arrival: s.first_holder.1,
                        last_holder_arrival: s.last_holder.1,
                        polls: s.polls,
                        zombie_requests: s.zombie_requests,
                        refreshes: s.refreshes,
                    })
                    .collect();
                let c = &set.c;
                let (late_requests, late_request_examples) = late_requests(&set.by_token, 10);
                ScaleSetReport {
                    id: set.set.id,
                    name: set.set.name.clone(),
                    runner_group_id: set.set.runner_group_id,
                    deleted: set.deleted,
                    max_concurrent_sessions: max_concurrent(&sessions),
                    conflicts_409: c.conflicts_409,
                    no_session_ms: set.no_session_ms + set.no_session_since.map_or(0, |s| now.saturating_sub(s)),
                    messages_delivered: c.messages_delivered,
                    messages_deleted: c.messages_deleted,
                    messages_redelivered: c.messages_redelivered,
                    acquire_repeats: c.acquire_repeats,
                    jobs_acquired_twice: c.jobs_acquired_twice,
                    zombie_requests: c.zombie_requests,
                    late_requests,
                    late_request_examples,
                    sessions_overlap_ms: overlap_ms(&sessions),
                    jobs_enqueued: c.jobs_enqueued,
                    jobs_completed: c.jobs_completed,
                    jobs_cancelled: c.jobs_cancelled,
                    jobs_reassigned: c.jobs_reassigned,
                    jobs_unfinished: set.jobs.len() as u64,
                    jobs_available_unacquired: set.jobs.values().filter(|j| j.state == JobState::Available).count()
                        as u64,
                    unfinished_jobs: set
                        .jobs
                        .values()
                        .take(20)
                        .map(|j| {
                            let since = match j.state {
                                JobState::Queued | JobState::Available => j.queued_at,
                                JobState::Assigned => j.assigned_at.unwrap_or(j.queued_at),
                                JobState::Running { .. } => j.runner_assigned_at.unwrap_or(j.queued_at),
                            };
                            format!(
                                "{}: {:?} since {since} ms (queued at {} ms, reassigned {} times, acquired by {:?})",
                                j.job_id, j.state, j.queued_at, j.reassignments, j.acquired_by
                            )
                        })
                        .collect(),
                    session_refreshes: c.session_refreshes,
                    statistics: stats(set),
                    sessions,
                }
            })
            .collect();
        Report {
            started_unix_ms: self.started_unix_ms,
            now_ms: now,
            requests: self.seq,
            requests_by_credential: self.requests_by_credential.clone(),
            rate_limited_by_credential: self.rate_limited_by_credential.clone(),
            rate_limited_requests: self.rate_limited_by_credential.values().sum(),
            faults_fired: self.faults_fired.clone(),
            scale_sets,
        }
    }

    /// Current statistics of a scale set.
    pub fn statistics(&self, set_id: i64) -> R<Statistics> {
        Ok(stats(self.live_set(set_id)?))
    }
}

fn assigned_count(set: &ScaleSet) -> i64 {
    set.jobs.values().filter(|j| matches!(j.state, JobState::Assigned | JobState::Running { .. })).count() as i64
}

/// The seven counters, derived from the jobs and runners every time so they cannot drift.
fn stats(set: &ScaleSet) -> Statistics {
    let mut s = Statistics::default();
    for j in set.jobs.values() {
        match j.state {
            JobState::Queued => {}
            JobState::Available => s.total_available_jobs += 1,
            JobState::Assigned => s.total_assigned_jobs += 1,
            JobState::Running { .. } => {
                s.total_assigned_jobs += 1;
                s.total_running_jobs += 1;
            }
        }
        if j.acquired_by.is_some() && j.state != JobState::Available {
            s.total_acquired_jobs += 1;
        }
    }
    for r in set.runners.values().filter(|r| !r.finished) {
        s.total_registered_runners += 1;
        if r.job.is_some() {
            s.total_busy_runners += 1;
        }
    }
    s.total_idle_runners = s.total_registered_runners - s.total_busy_runners;
    s
}

/// Turns emulator-clock times into the wire's RFC 3339 timestamps, in the job mode's form:
/// github.com omits unset times, GHES sends Go's zero time.
#[derive(Debug, Clone, Copy)]
struct Clock {
    base_unix_ms: u64,
    now: u64,
    mode: Mode,
}

impl Clock {
    fn at(self, t: Option<u64>) -> Option<String> {
        match (t, self.mode) {
            (Some(t), _) => Some(rfc3339(self.base_unix_ms + t)),
            (None, Mode::Dotcom) => None,
            (None, Mode::Ghes) => Some(ZERO_TIME.to_string()),
        }
    }
}

fn job_message(set: &ScaleSet, j: &Job, kind: &str, clock: Clock) -> JobMessage {
    let at = |t: Option<u64>| clock.at(t);
    let org = set.org.clone();
    JobMessage {
        message_type: kind.into(),
        runner_request_id: if kind == "JobAvailable" || j.acquired_by.is_some() { j.runner_request_id } else { 0 },
        repository_name: "emulated-repo".into(),
        owner_name: org,
        job_id: j.job_id.clone(),
        job_workflow_ref: format!("{}/emulated-repo/.github/workflows/ci.yml@refs/heads/main", set.org),
        job_display_name: j.display_name.clone(),
        workflow_run_id: j.workflow_run_id,
        event_name: "workflow_dispatch".into(),
        request_labels: vec![set.set.name.clone()],
        // The captured github.com JobAssigned has no queueTime.
        queue_time: if clock.mode == Mode::Dotcom && kind == "JobAssigned" { None } else { at(Some(j.queued_at)) },
        scale_set_assign_time: at(j.assigned_at),
        runner_assign_time: at(j.runner_assigned_at),
        finish_time: at(None),
        acquire_job_url: None,
        runner_id: None,
        runner_name: None,
        result: None,
    }
}

/// Moves queued jobs forward on a poll: assigns them up to `capacity` (dotcom) or makes them
/// available (GHES), queueing the job messages.
fn advance_queue(set: &mut ScaleSet, mode: Mode, capacity: i64, now: u64, clock: Clock) {
    let mut assigned = assigned_count(set);
    let keys: Vec<(u64, String)> =
        set.jobs.iter().filter(|(_, j)| j.state == JobState::Queued).map(|(k, _)| k.clone()).collect();
    for k in keys {
        let Some(mut j) = set.jobs.get(&k).cloned() else { continue };
        let kind = match mode {
            Mode::Dotcom if assigned < capacity => {
                assigned += 1;
                j.state = JobState::Assigned;
                j.assigned_at = Some(now);
                "JobAssigned"
            }
            Mode::Dotcom => break,
            Mode::Ghes => {
                j.state = JobState::Available;
                "JobAvailable"
            }
        };
        let mut m = job_message(set, &j, kind, clock);
        if kind == "JobAvailable" {
            m.acquire_job_url =
                Some(format!("{}/acquirejobs", set.set.runner_jit_config_url.trim_end_matches("/generatejitconfig")));
        }
        set.jobs.insert(k, j);
        set.pending.push(m);
    }
}

/// The `messageType` of the odd job message: one no client knows, which it must skip.
pub const UNKNOWN_JOB_MESSAGE_TYPE: &str = "JobRunnerLeaseRenewed";

/// Packs pending job messages into envelopes of at most 50. With `odd_every` N > 0, every Nth
/// envelope is preceded by one with an empty `body` and carries a job message of an unknown type.
fn package(set: &mut ScaleSet, odd_every: u32) {
    while !set.pending.is_empty() {
        let n = set.pending.len().min(MAX_JOBS_PER_MESSAGE);
        let mut body = {
            let batch: Vec<JobMessage> = set.pending.drain(..n).collect();
            serde_json::to_value(&batch).unwrap_or_else(|_| serde_json::json!([]))
        };
        set.c.envelopes += 1;
        if odd_every > 0 && set.c.envelopes.is_multiple_of(u64::from(odd_every)) {
            let id = set.next_message_id;
            set.next_message_id += 1;
            set.log.insert(id, StoredMessage { body: String::new(), deliveries: 0 });
            if let Some(a) = body.as_array_mut() {
                a.push(serde_json::json!({
                    "messageType": UNKNOWN_JOB_MESSAGE_TYPE,
                    "runnerRequestId": 0,
                    "jobId": Uuid::new_v4().to_string(),
                }));
            }
        }
        let id = set.next_message_id;
        set.next_message_id += 1;
        set.log.insert(id, StoredMessage { body: body.to_string(), deliveries: 0 });
    }
}

/// The cancel/re-assign cycle (actions/scaleset README): an assigned job no runner started
/// within `timeout_ms` gets `JobCompleted` `canceled` (no runner, no assign time) and goes
/// back to the queue, at most [`MAX_REASSIGNMENTS`] times; after that it is dropped.
fn cancel_unstarted(set: &mut ScaleSet, timeout_ms: u64, clock: Clock) {
    let due: Vec<(u64, String)> = set
        .jobs
        .iter()
        .filter(|(_, j)| j.state == JobState::Assigned && j.assigned_at.is_some_and(|a| a + timeout_ms <= clock.now))
        .map(|(k, _)| k.clone())
        .collect();
    if due.is_empty() {
        return;
    }
    for k in due {
        let Some(mut j) = set.jobs.remove(&k) else { continue };
        j.assigned_at = None;
        let mut m = job_message(set, &j, "JobCompleted", clock);
        m.result = Some("canceled".into());
        m.finish_time = clock.at(Some(clock.now));
        set.pending.push(m);
        set.c.jobs_cancelled += 1;
        if j.reassignments < MAX_REASSIGNMENTS {
            j.reassignments += 1;
            j.state = JobState::Queued;
            j.acquired_by = None;
            j.grants = 0;
            set.c.jobs_reassigned += 1;
            set.jobs.insert(k, j);
        }
    }
    set.notify.notify_waiters();
}

fn start_job(set: &mut ScaleSet, runner_id: i64, job_id: Option<&str>, now: u64, clock: Clock) -> R<String> {
    let r = set.runners.get(&runner_id).ok_or_else(|| ApiError::not_found("runner"))?;
    if r.finished || r.job.is_some() {
        return Err(ApiError::bad_request(format!("runner {} is not idle", r.name)));
    }
    let name = r.name.clone();
    let key = set
        .jobs
        .iter()
        .filter(|(_, j)| j.state == JobState::Assigned)
        .find(|(_, j)| job_id.is_none_or(|id| j.job_id == id))
        .map(|(k, _)| k.clone())
        .ok_or_else(|| ApiError::bad_request("no assigned job waiting for a runner"))?;
    let Some(j) = set.jobs.get_mut(&key) else { return Err(ApiError::not_found("job")) };
    j.state = JobState::Running { runner_id, finish_at: now + j.duration_ms };
    j.runner_assigned_at = Some(now);
    let j = j.clone();
    if let Some(r) = set.runners.get_mut(&runner_id) {
        r.online = true;
        r.job = Some(j.job_id.clone());
    }
    let mut m = job_message(set, &j, "JobStarted", clock);
    m.runner_id = Some(runner_id);
    m.runner_name = Some(name);
    set.pending.push(m);
    set.notify.notify_waiters();
    Ok(j.job_id)
}

fn finish_job(set: &mut ScaleSet, job_id: &str, result: &str, clock: Clock) {
    let Some(key) = set.jobs.iter().find(|(_, j)| j.job_id == job_id).map(|(k, _)| k.clone()) else {
        return;
    };
    let Some(j) = set.jobs.remove(&key) else { return };
    let JobState::Running { runner_id, .. } = j.state else {
        set.jobs.insert(key, j);
        return;
    };
    let mut name = None;
    if let Some(r) = set.runners.get_mut(&runner_id) {
        r.job = None;
        r.finished = true;
        name = Some(r.name.clone());
    }
    let mut m = job_message(set, &j, "JobCompleted", clock);
    m.runner_id = Some(runner_id);
    m.runner_name = name;
    m.result = Some(result.into());
    m.finish_time = clock.at(Some(clock.now));
    set.pending.push(m);
    set.c.jobs_completed += 1;
    set.notify.notify_waiters();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core(settings: Settings) -> Core {
        Core::new(settings, "org".into(), vec!["pat".into()], "http://e/_services/actions/".into(), 1000)
    }

    fn set(c: &mut Core) -> i64 {
        c.create_scale_set(ScaleSetInput { name: Some("s".into()), ..Default::default() }, 0).unwrap().id
    }

    fn queue_token(s: &Session) -> String {
        s.message_queue_access_token.clone()
    }

    fn consistent(s: Statistics) -> Statistics {
        assert!(s.total_assigned_jobs >= s.total_running_jobs, "{s:?}");
        assert_eq!(s.total_registered_runners, s.total_busy_runners + s.total_idle_runners, "{s:?}");
        assert_eq!(s.total_busy_runners, s.total_running_jobs, "{s:?}");
        s
    }

    #[test]
    fn statistics_stay_consistent_through_a_job_lifecycle() {
        let mut c = core(Settings::default());
        let id = set(&mut c);
        let s = c.create_session(id, "o", "pat#1", 0).unwrap();
        c.enqueue_jobs(id, 3, Duration::from_millis(500), 0).unwrap();
        let (_, env) = c.poll(id, &queue_token(&s), 0, Some(2), 10).unwrap();
        let env = env.expect("assignments");
        assert_eq!(consistent(env.statistics).total_assigned_jobs, 2, "capacity 2");
        c.generate_jit(id, "r1").unwrap();
        c.tick(20);
        let st = consistent(c.statistics(id).unwrap());
        assert_eq!((st.total_running_jobs, st.total_busy_runners, st.total_idle_runners), (1, 1, 0));
        c.tick(520);
        let st = consistent(c.statistics(id).unwrap());
        assert_eq!((st.total_assigned_jobs, st.total_running_jobs, st.total_registered_runners), (1, 0, 0));
        let (_, env) = c.poll(id, &queue_token(&s), env.message_id, Some(2), 530).unwrap();
        let kinds: Vec<String> = serde_json::from_str::<Vec<JobMessage>>(&env.unwrap().body)
            .unwrap()
            .into_iter()
            .map(|m| m.message_type)
            .collect();
        assert_eq!(kinds, ["JobStarted", "JobCompleted", "JobAssigned"], "the third job fills the freed slot");
    }

    #[test]
    fn an_expired_session_closes_at_its_deadline_not_when_noticed() {
        let mut c = core(Settings {
            session_ttl: Duration::from_secs(1),
            session_ttl_from: SessionTtlFrom::Creation,
            ..Settings::default()
        });
        let id = set(&mut c);
        c.create_session(id, "o", "pat#1", 0).unwrap();
        let r = c.report(5_000);
        let s = &r.scale_set(id).unwrap();
        assert_eq!((s.sessions[0].closed_at, s.sessions[0].close_reason), (Some(1_000), CloseReason::Expired));
        assert_eq!(s.no_session_ms, 4_000);
    }

    #[test]
    fn a_poll_in_flight_keeps_a_last_poll_session_alive() {
        let mut c = core(Settings { session_ttl: Duration::from_secs(1), ..Settings::default() });
        let id = set(&mut c);
        let s = c.create_session(id, "o", "pat#1", 0).unwrap();
        let sid = Uuid::parse_str(&s.session_id).unwrap();
        c.poll_in_flight(sid, true, 100);
        c.tick(10_000);
        assert!(c.create_session(id, "p", "pat#1", 10_000).is_err(), "still held");
        c.poll_in_flight(sid, false, 10_000);
        c.tick(11_000);
        assert!(c.create_session(id, "p", "pat#1", 11_000).is_ok());
    }

    #[test]
    fn workload_generates_jobs_at_its_rate() {
        let mut c = core(Settings { auto_runners: false, ..Settings::default() });
        let id = set(&mut c);
        c.set_workload(Workload::new(id, 60.0, 1.0, 5.0)).unwrap();
        c.tick(0);
        c.tick(10_000);
        assert_eq!(c.report(10_000).scale_set(id).unwrap().jobs_enqueued, 10);
        c.set_workload(Workload::new(id, 0.0, 0.0, 0.0)).unwrap();
        c.tick(20_000);
        assert_eq!(c.report(20_000).scale_set(id).unwrap().jobs_enqueued, 10, "rate 0 stops it");
    }
}
