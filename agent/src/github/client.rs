//! The client: auth chain, admin calls, session and queue calls (reference §1–§2, §3.4, §5.7).
//!
//! Every request goes through [`Inner::attempt`] (gate check → send → read the body → classify)
//! and, except `POST …/sessions`, through backon's exponential backoff with jitter, honouring
//! `Retry-After` on 429 and 503 up to [`RetryPolicy::retry_after_cap`].

use super::decode::{self, strip_bom};
use super::error::{Error, RequestIds};
use super::jwt;
use super::layout::Layout;
use super::{Credentials, Gate, GitHubSettings, wire};
use backon::{ExponentialBuilder, Retryable};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, USER_AGENT};
use reqwest::{Method, Url};
use ring::signature::RsaKeyPair;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `api-version` of every admin call (query) and queue call (`Accept`).
pub const API_VERSION: &str = "6.0-preview";
/// `Accept` of queue calls.
pub const ACCEPT_QUEUE: &str = "application/json; api-version=6.0-preview";
/// The 409 of `POST …/sessions` is recognised by this in `typeName` (never by message text).
pub const SESSION_CONFLICT_TYPE: &str = "RunnerScaleSetSessionConflictException";
/// The nil UUID.
pub const ZERO_SESSION_ID: &str = "00000000-0000-0000-0000-000000000000";
/// The admin token is refreshed when it expires within this margin (reference §1.6).
const ADMIN_TOKEN_MARGIN_S: i64 = 60;
/// Overall per-request timeout of admin and REST calls (reference §1.8).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Names the holder and fencing token a holder-only request is made for (see [`Gate::owner`]).
pub const OWNER_HEADER: &str = "X-Arcfed-Owner";

/// Connect timeout of holder-only calls (session and queue). The fence gate lets such a call
/// start only while the fence still covers this much more (DESIGN §4), so a request that needs
/// a new connection is written before the fence ends or not at all.
pub const HOLDER_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// A long poll gets no answer for at most ~90 s on github.com (measured 2026); one that lasts
/// longer than this is dropped as failed, so a silent path is seen by the holder-stall rule.
const POLL_TIMEOUT: Duration = Duration::from_secs(100);
/// The largest response body read: GitHub's largest answers (an envelope of 50 job messages,
/// a runner list) are far below it. A larger body is an error, not a reason to run out of memory.
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// Error messages longer than this (e.g. an HTML error page) are cut.
const MAX_MESSAGE: usize = 512;

/// Retries of the HTTP layer: transport errors, 429, 5xx except 501.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (ARC: 4, so 5 attempts).
    pub max_retries: usize,
    /// First backoff; doubles per retry up to `max_delay`. backon's jitter adds up to 100 %.
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// A `Retry-After` longer than this is not obeyed: the wait is capped here. A holder whose
    /// lease lasts seconds must not sleep for an hour because a proxy said so; the caller's own
    /// backoff (and the fence) takes over after the retries are spent.
    pub retry_after_cap: Duration,
}

impl Default for RetryPolicy {
    /// 4 retries, 1 s → 8 s with jitter, `Retry-After` capped at 30 s (go-retryablehttp's
    /// `RetryWaitMax`).
    fn default() -> Self {
        Self {
            max_retries: 4,
            min_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(8),
            retry_after_cap: Duration::from_secs(30),
        }
    }
}

/// The Actions-service connection of §1.5: base URL and admin JWT.
#[derive(Clone)]
struct Admin {
    /// Always ends with `/`.
    service_url: String,
    token: String,
    exp: i64,
}

struct Inner {
    http: reqwest::Client,
    /// For holder-only calls (those with a gate): a short connect timeout, no redirects and
    /// no retries inside reqwest, so no request leaves outside the gate's check.
    holder_http: reqwest::Client,
    layout: Layout,
    credentials: Credentials,
    app_key: Option<RsaKeyPair>,
    scale_set_id: i64,
    user_agent: String,
    retry: RetryPolicy,
    /// The current admin connection. A std mutex: never held across an `.await`.
    admin: Mutex<Option<Admin>>,
    /// Serialises the auth chain so concurrent callers run it once (reference §1.6).
    refresh: tokio::sync::Mutex<()>,
    /// The last `get_scale_set` succeeded (part of `github_ready`, DESIGN §5.1).
    scale_set_ok: AtomicBool,
}

/// The GitHub client of one scale set. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("config_url", &self.inner.layout.config_url)
            .field("api_base", &self.inner.layout.api_base)
            .field("scale_set_id", &self.inner.scale_set_id)
            .finish_non_exhaustive()
    }
}

/// One request, rebuilt for every attempt.
struct Call<'a> {
    what: &'static str,
    method: Method,
    url: String,
    auth: String,
    /// `Content-Type` (admin and REST calls).
    content_type: Option<&'static str>,
    /// `Accept` (queue polls).
    accept: Option<&'static str>,
    capacity: Option<i64>,
    body: Option<String>,
    /// Retry 401/403 too (runner-registration, reference §1.5).
    retry_auth: bool,
    /// Retry transport errors (connect, reset). Not for the long poll: each retry of a dead
    /// path would hide the failure from the holder-stall rule for another connect and backoff.
    retry_transport: bool,
    /// A per-request timeout (the long poll's).
    timeout: Option<Duration>,
    gate: Option<&'a dyn Gate>,
}

impl<'a> Call<'a> {
    fn new(what: &'static str, method: Method, url: String, auth: String) -> Self {
        Self {
            what,
            method,
            url,
            auth,
            content_type: None,
            accept: None,
            capacity: None,
            body: None,
            retry_auth: false,
            retry_transport: true,
            timeout: None,
            gate: None,
        }
    }
    fn content_type(mut self, ct: &'static str) -> Self {
        self.content_type = Some(ct);
        self
    }
    fn json(mut self, body: &serde_json::Value) -> Self {
        self.body = Some(body.to_string());
        self
    }
    fn gated(mut self, gate: &'a dyn Gate) -> Self {
        self.gate = Some(gate);
        self
    }
}

/// A response, read in full (BOM stripped).
struct Reply {
    what: &'static str,
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
    ids: RequestIds,
}

/// `typeName` and `message` of an exception body (reference §8.1); REST errors carry only
/// `message`; a non-JSON body is its own message.
fn exception(body: &[u8]) -> (String, String) {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Exc {
        #[serde(default)]
        type_name: String,
        #[serde(default)]
        message: String,
        // The broker's structured form: `{"source","errorKind","statusCode","errorMessage"}`.
        #[serde(default)]
        error_kind: String,
        #[serde(default)]
        error_message: String,
    }
    if body.is_empty() {
        return (String::new(), "unknown exception (empty body)".into());
    }
    match serde_json::from_slice::<Exc>(body) {
        Ok(e) if e.type_name.is_empty() && !e.error_kind.is_empty() => {
            (e.error_kind, if e.message.is_empty() { e.error_message } else { e.message })
        }
        Ok(e) => (e.type_name, e.message),
        Err(_) => {
            let mut text = String::from_utf8_lossy(body).into_owned();
            if text.len() > MAX_MESSAGE {
                let mut cut = MAX_MESSAGE;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                text.push('…');
            }
            (String::new(), text)
        }
    }
}

impl Reply {
    fn type_and_message(&self) -> (String, String) {
        exception(&self.body)
    }

    fn type_name_contains(&self, needle: &str) -> bool {
        self.type_and_message().0.contains(needle)
    }

    /// The generic error for an unexpected status.
    fn into_error(self) -> Error {
        let (type_name, message) = self.type_and_message();
        let (what, ids) = (self.what, self.ids);
        match self.status {
            401 => Error::Unauthorized { what, message, ids },
            403 if is_rate_limit_403(&self.headers) => {
                Error::RateLimited { what, status: 403, retry_after: rate_limit_wait(&self.headers), message, ids }
            }
            403 => Error::Forbidden { what, message, ids },
            429 => Error::RateLimited { what, status: 429, retry_after: rate_limit_wait(&self.headers), message, ids },
            status => Error::Status { what, status, type_name, message, retry_after: retry_after(&self.headers), ids },
        }
    }

    fn decode_err(&self, detail: String) -> Error {
        if self.body.is_empty() {
            Error::EmptyBody { what: self.what, ids: self.ids.clone() }
        } else {
            Error::Decode { what: self.what, detail, ids: self.ids.clone() }
        }
    }

    fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body).map_err(|e| self.decode_err(e.to_string()))
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(v, SystemTime::now())
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// GitHub REST answers its rate limits with 403 as well as 429: a secondary limit carries
/// `Retry-After`, a primary one `x-ratelimit-remaining: 0` (docs.github.com, "Rate limits for
/// the REST API"). Such a 403 is a rate limit, retried like a 429; any other 403 is not.
fn is_rate_limit_403(headers: &HeaderMap) -> bool {
    headers.contains_key(reqwest::header::RETRY_AFTER) || header_str(headers, "x-ratelimit-remaining") == Some("0")
}

/// `Retry-After`, else the wait until `x-ratelimit-reset` (unix seconds) when the limit is spent.
fn rate_limit_wait(headers: &HeaderMap) -> Option<Duration> {
    retry_after(headers).or_else(|| {
        if header_str(headers, "x-ratelimit-remaining") != Some("0") {
            return None;
        }
        let reset: i64 = header_str(headers, "x-ratelimit-reset")?.trim().parse().ok()?;
        Some(Duration::from_secs(u64::try_from(reset - unix_now()).unwrap_or(0)))
    })
}

/// `Retry-After`: delay-seconds or an HTTP-date (IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`).
/// A date in the past is a zero delay.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = parse_imf_fixdate(value)?;
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs() as i64;
    Some(Duration::from_secs(u64::try_from(at - now).unwrap_or(0)))
}

/// IMF-fixdate → unix seconds (RFC 9110 §5.6.7); the obsolete forms are not accepted.
fn parse_imf_fixdate(s: &str) -> Option<i64> {
    let rest = s.split_once(", ")?.1;
    let parts: Vec<&str> = rest.split(' ').collect();
    let [day, month, year, time, "GMT"] = parts.as_slice() else { return None };
    let day: i64 = day.parse().ok()?;
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        .iter()
        .position(|m| m == month)? as i64
        + 1;
    let year: i64 = year.parse().ok()?;
    let hms: Vec<i64> = time.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let [h, m, sec] = hms.as_slice() else { return None };
    if !(1..=31).contains(&day) || *h > 23 || *m > 59 || *sec > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

/// Go's `url.Values.Encode`: sorted by key, form-encoded (space → `+`).
fn go_query(pairs: &[(&str, &str)]) -> String {
    let mut v = pairs.to_vec();
    v.sort_by(|a, b| a.0.cmp(b.0));
    let mut ser = reqwest::Url::parse("http://x/").expect("static URL");
    ser.query_pairs_mut().extend_pairs(v);
    ser.query().unwrap_or_default().to_string()
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// `… already has an active session for owner <owner>.` → the owner.
fn conflict_owner(message: &str) -> Option<String> {
    let (_, owner) = message.rsplit_once("for owner ")?;
    let owner = owner.trim().strip_suffix('.').unwrap_or(owner.trim()).trim();
    (!owner.is_empty()).then(|| owner.to_string())
}

impl Client {
    /// Validates the settings and builds the HTTP client (no request is sent). Reads
    /// `GITHUB_ACTIONS_FORCE_GHES`, `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` from the environment.
    pub fn new(s: GitHubSettings) -> Result<Client, Error> {
        Self::with_retry(s, RetryPolicy::default())
    }

    /// [`Client::new`] with another retry policy (tests use short delays).
    pub fn with_retry(s: GitHubSettings, retry: RetryPolicy) -> Result<Client, Error> {
        // main() installs ring; a second install is refused harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let layout = Layout::parse(&s.configure_url, std::env::var_os("GITHUB_ACTIONS_FORCE_GHES").is_some())?;
        let app_key = match &s.credentials {
            Credentials::Pat(p) if p.trim().is_empty() => {
                return Err(Error::Config("github_token: empty".into()));
            }
            Credentials::Pat(_) => None,
            Credentials::App { app_id, private_key_pem, .. } => {
                if app_id.trim().is_empty() {
                    return Err(Error::Config("github_app_id: empty".into()));
                }
                Some(jwt::parse_app_key(private_key_pem)?)
            }
        };
        // A long poll is idle for up to ~50 s, so only TCP keepalive probes can tell a dead
        // path (a cut link, a silent middlebox) from GitHub holding the poll: probes after 3 s
        // idle, every 1 s, 3 unanswered; unacknowledged writes give up after 10 s
        // (TCP_USER_TIMEOUT). Known gap: in the --netns drill a blackholed GitHub link still
        // failed the poll only after ~60 s (tests/src/netns.rs), so holder-stall drills use
        // GitHub 5xx answers.
        let root_certs = match s.root_ca_pem.as_deref().filter(|p| !p.trim().is_empty()) {
            Some(pem) => {
                let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                    .map_err(|e| Error::Config(format!("server_root_ca: not a PEM certificate bundle ({e})")))?;
                if certs.is_empty() {
                    return Err(Error::Config("server_root_ca: no certificate in the PEM".into()));
                }
                certs
            }
            None => Vec::new(),
        };
        let mut by_host: std::collections::BTreeMap<String, Vec<std::net::SocketAddr>> = Default::default();
        for r in &s.resolve {
            by_host.entry(r.host.to_ascii_lowercase()).or_default().push(std::net::SocketAddr::new(r.addr, r.port));
        }
        let build = |holder: bool| {
            // Holder calls give up on a silent path sooner: unacknowledged data or keepalive
            // probes for 5 s end the connection, so a cut mid long poll is seen in seconds.
            let user_timeout = Duration::from_secs(if holder { 5 } else { 10 });
            let mut b = reqwest::Client::builder()
                .tcp_keepalive(Duration::from_secs(if holder { 2 } else { 3 }))
                .tcp_keepalive_interval(Duration::from_secs(1))
                .tcp_keepalive_retries(3)
                .tcp_user_timeout(user_timeout);
            b = if holder {
                // The long poll is bounded by POLL_TIMEOUT per call; the others by the driver.
                b.connect_timeout(HOLDER_CONNECT_TIMEOUT)
                    .redirect(reqwest::redirect::Policy::none())
                    .retry(reqwest::retry::never())
            } else {
                b.timeout(REQUEST_TIMEOUT)
                    .connect_timeout(CONNECT_TIMEOUT)
                    .redirect(reqwest::redirect::Policy::limited(10))
            };
            if !root_certs.is_empty() {
                b = b.tls_certs_merge(root_certs.clone());
            }
            for (host, addrs) in &by_host {
                b = b.resolve_to_addrs(host, addrs);
            }
            b.build().map_err(|e| Error::Config(format!("GitHub HTTP client: {e}")))
        };
        let http = build(false)?;
        let holder_http = build(true)?;
        let user_agent = serde_json::json!({
            "system": "arcfed-agent",
            "version": env!("CARGO_PKG_VERSION"),
            "scale_set_id": s.scale_set_id,
            "subsystem": "ghalistener",
            "kind": "arcfed",
        })
        .to_string();
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                holder_http,
                layout,
                credentials: s.credentials,
                app_key,
                scale_set_id: s.scale_set_id,
                user_agent,
                retry,
                admin: Mutex::new(None),
                refresh: tokio::sync::Mutex::new(()),
                scale_set_ok: AtomicBool::new(false),
            }),
        })
    }

    /// The parsed `githubConfigUrl`.
    pub fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    /// The JSON `User-Agent` sent on every request.
    pub fn user_agent(&self) -> &str {
        &self.inner.user_agent
    }

    pub fn scale_set_id(&self) -> i64 {
        self.inner.scale_set_id
    }

    /// The Actions-service base URL from the last auth chain, if any.
    pub fn service_url(&self) -> Option<String> {
        self.inner.admin_now().map(|a| a.service_url)
    }

    /// Runs the auth chain (§1.2→§1.5) if there is no admin token or it expires within 60 s.
    /// Concurrent callers wait for one run.
    pub async fn refresh_admin_token(&self) -> Result<(), Error> {
        self.inner.admin().await.map(|_| ())
    }

    /// Admin token present and not within 60 s of its `exp`, and the last `get_scale_set`
    /// succeeded (DESIGN §5.1).
    pub fn github_ready(&self) -> bool {
        self.inner.fresh_admin(unix_now()).is_some() && self.inner.scale_set_ok.load(Ordering::Relaxed)
    }

    /// `GET …/runnerscalesets/{id}`. 404 `RunnerScaleSetNotFoundException` → `ScaleSetNotFound`.
    pub async fn get_scale_set(&self) -> Result<wire::RunnerScaleSet, Error> {
        let r = self.get_scale_set_inner().await;
        self.inner.scale_set_ok.store(r.is_ok(), Ordering::Relaxed);
        r
    }

    async fn get_scale_set_inner(&self) -> Result<wire::RunnerScaleSet, Error> {
        let reply = self.inner.admin_call("get scale set", Method::GET, "", None, None, true).await?;
        match reply.status {
            200 => reply.json(),
            _ => Err(self.inner.scale_set_error(reply)),
        }
    }

    /// `POST …/sessions` with `{"ownerName"}`. **Never retried** here: an ambiguous outcome
    /// may have opened a session (DESIGN §5.3). 409 with `RunnerScaleSetSessionConflictException`
    /// → `Conflict`.
    pub async fn create_session(&self, gate: &dyn Gate, owner: &str) -> Result<wire::Session, Error> {
        let body = serde_json::json!({ "ownerName": owner });
        let reply =
            self.inner.admin_call("create session", Method::POST, "sessions", Some(&body), Some(gate), false).await?;
        match reply.status {
            200 => decode::session(&reply.body, self.inner.scale_set_id).map_err(|d| reply.decode_err(d)),
            409 if reply.type_name_contains(SESSION_CONFLICT_TYPE) => {
                let (_, message) = reply.type_and_message();
                let owner = conflict_owner(&message);
                let foreign = owner.as_deref().is_some_and(|o| !o.starts_with("arcfed/"));
                Err(Error::Conflict { owner, foreign, message, ids: reply.ids })
            }
            _ => Err(self.inner.scale_set_error(reply)),
        }
    }

    /// `DELETE …/sessions/{id}`. 204, 404 and 400 `RunnerScaleSetSessionExpiredException` all
    /// mean the session is gone (DESIGN §5.2).
    pub async fn delete_session(&self, gate: &dyn Gate, session_id: &str) -> Result<(), Error> {
        let path = session_path(session_id)?;
        let reply = self.inner.admin_call("delete session", Method::DELETE, &path, None, Some(gate), true).await?;
        match reply.status {
            204 | 200 | 404 => Ok(()),
            400 if reply.type_name_contains("RunnerScaleSetSessionExpiredException") => Ok(()),
            _ => Err(reply.into_error()),
        }
    }

    /// `PATCH …/sessions/{id}`: replaces `*session` with the response (new queue token, maybe a
    /// new queue URL). 404 → `SessionGone`.
    pub async fn refresh_session(&self, gate: &dyn Gate, session: &mut wire::Session) -> Result<(), Error> {
        let path = session_path(&session.session_id)?;
        let reply = self.inner.admin_call("refresh session", Method::PATCH, &path, None, Some(gate), true).await?;
        match reply.status {
            200 => {
                *session = decode::session(&reply.body, self.inner.scale_set_id).map_err(|d| reply.decode_err(d))?;
                tracing::debug!(session = %session.session_id, queue = %session.message_queue_url, "session refreshed");
                Ok(())
            }
            404 => {
                let (_, message) = reply.type_and_message();
                Err(Error::SessionGone { session_id: session.session_id.clone(), message, ids: reply.ids })
            }
            _ => Err(reply.into_error()),
        }
    }

    /// The long poll: `GET <messageQueueUrl>` (its query kept, `lastMessageId` set when > 0).
    /// 202 → `None`. A 401 refreshes the session (replacing `*session`) and retries once.
    pub async fn get_message(
        &self,
        gate: &dyn Gate,
        session: &mut wire::Session,
        last_message_id: i64,
        max_capacity: i64,
    ) -> Result<Option<wire::MessageEnvelope>, Error> {
        match self.poll_once(gate, session, last_message_id, max_capacity).await {
            Err(Error::Unauthorized { .. }) => {
                self.refresh_session(gate, session).await?;
                self.poll_once(gate, session, last_message_id, max_capacity).await
            }
            r => r,
        }
    }

    async fn poll_once(
        &self,
        gate: &dyn Gate,
        session: &wire::Session,
        last_message_id: i64,
        max_capacity: i64,
    ) -> Result<Option<wire::MessageEnvelope>, Error> {
        let mut url = parse_queue_url(&session.message_queue_url)?;
        if last_message_id > 0 {
            let kept: Vec<(String, String)> =
                url.query_pairs().filter(|(k, _)| k != "lastMessageId").map(|(k, v)| (k.into(), v.into())).collect();
            url.query_pairs_mut().clear().extend_pairs(kept).append_pair("lastMessageId", &last_message_id.to_string());
        }
        let mut call =
            Call::new("get message", Method::GET, url.into(), format!("Bearer {}", session.message_queue_access_token))
                .gated(gate);
        call.accept = Some(ACCEPT_QUEUE);
        call.capacity = Some(max_capacity.clamp(0, i64::from(i32::MAX)));
        call.retry_transport = false;
        call.timeout = Some(POLL_TIMEOUT);
        let reply = self.inner.send(&call, true).await?;
        match reply.status {
            200 => decode::envelope(&reply.body).map(Some).map_err(|d| reply.decode_err(d)),
            202 => Ok(None),
            _ => Err(queue_error(reply, &session.session_id)),
        }
    }

    /// `DELETE <queue URL path>/{messageId}` (query kept). 204 and 404 are done; a 401
    /// refreshes the session and retries once.
    pub async fn delete_message(
        &self,
        gate: &dyn Gate,
        session: &mut wire::Session,
        message_id: i64,
    ) -> Result<(), Error> {
        match self.delete_message_once(gate, session, message_id).await {
            Err(Error::Unauthorized { .. }) => {
                self.refresh_session(gate, session).await?;
                self.delete_message_once(gate, session, message_id).await
            }
            r => r,
        }
    }

    async fn delete_message_once(
        &self,
        gate: &dyn Gate,
        session: &wire::Session,
        message_id: i64,
    ) -> Result<(), Error> {
        let mut url = parse_queue_url(&session.message_queue_url)?;
        url.path_segments_mut()
            .map_err(|_| Error::Decode {
                what: "delete message",
                detail: "messageQueueUrl cannot have a path".into(),
                ids: RequestIds::default(),
            })?
            .pop_if_empty()
            .push(&message_id.to_string());
        let call = Call::new(
            "delete message",
            Method::DELETE,
            url.into(),
            format!("Bearer {}", session.message_queue_access_token),
        )
        .content_type("application/json")
        .gated(gate);
        let reply = self.inner.send(&call, true).await?;
        match reply.status {
            // A queue that no longer knows the session did not ack the message: open another
            // session (the message is offered again there).
            400 if is_session_invalid(&reply) => Err(queue_error(reply, &session.session_id)),
            204 | 200 | 404 => Ok(()),
            _ => Err(reply.into_error()),
        }
    }

    /// `POST …/acquirejobs` with the **queue** token; returns the ids actually acquired. A 401
    /// refreshes the session and retries once.
    pub async fn acquire_jobs(
        &self,
        gate: &dyn Gate,
        session: &mut wire::Session,
        request_ids: &[i64],
    ) -> Result<Vec<i64>, Error> {
        match self.acquire_once(gate, session, request_ids).await {
            Err(Error::Unauthorized { .. }) => {
                self.refresh_session(gate, session).await?;
                self.acquire_once(gate, session, request_ids).await
            }
            r => r,
        }
    }

    async fn acquire_once(&self, gate: &dyn Gate, session: &wire::Session, ids: &[i64]) -> Result<Vec<i64>, Error> {
        let admin = self.inner.admin().await?;
        let url = self.inner.scale_set_url(&admin, "acquirejobs");
        let call =
            Call::new("acquire jobs", Method::POST, url, format!("Bearer {}", session.message_queue_access_token))
                .content_type("application/json")
                .json(&serde_json::json!(ids))
                .gated(gate);
        let reply = self.inner.send(&call, true).await?;
        match reply.status {
            200 => Ok(reply.json::<wire::ListOf<i64>>()?.value),
            400 if is_session_invalid(&reply) => Err(queue_error(reply, &session.session_id)),
            _ => Err(self.inner.scale_set_error(reply)),
        }
    }

    /// Legacy `GET …/acquirablejobs`: 204 → `Some([])`, 200 → the listed jobs, 404 without
    /// `RunnerScaleSetNotFoundException` → `None` (the service does not have the endpoint).
    pub async fn acquirable_jobs(&self, gate: &dyn Gate) -> Result<Option<Vec<serde_json::Value>>, Error> {
        let reply =
            self.inner.admin_call("acquirable jobs", Method::GET, "acquirablejobs", None, Some(gate), true).await?;
        match reply.status {
            204 => Ok(Some(Vec::new())),
            200 if reply.body.is_empty() => Ok(Some(Vec::new())),
            200 => Ok(Some(reply.json::<wire::ListOf<serde_json::Value>>()?.value)),
            404 if !reply.type_name_contains("RunnerScaleSetNotFoundException") => Ok(None),
            _ => Err(self.inner.scale_set_error(reply)),
        }
    }

    /// `POST …/generatejitconfig` `{"name","workFolder":""}` (ARC's controller; the sim backend).
    pub async fn generate_jit_config(&self, runner_name: &str) -> Result<wire::JitConfig, Error> {
        let body = serde_json::json!({ "name": runner_name, "workFolder": "" });
        let reply = self
            .inner
            .admin_call("generate jit config", Method::POST, "generatejitconfig", Some(&body), None, true)
            .await?;
        match reply.status {
            200 => reply.json(),
            _ => Err(self.inner.scale_set_error(reply)),
        }
    }

    /// `GET …/distributedtask/pools/0/agents/{id}`: `true` while GitHub lists the runner, `false`
    /// on 404 (`AgentNotFoundException`: removed, or an ephemeral runner deregistered after its job).
    pub async fn runner_registered(&self, runner_id: i64) -> Result<bool, Error> {
        let admin = self.inner.admin().await?;
        let url = self.inner.admin_url(&admin, &format!("_apis/distributedtask/pools/0/agents/{runner_id}"));
        let call = Call::new("get runner", Method::GET, url, format!("Bearer {}", admin.token));
        let reply = self.inner.send(&call, true).await?;
        match reply.status {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(reply.into_error()),
        }
    }

    /// `DELETE …/distributedtask/pools/0/agents/{id}`: 204 (also for an unknown runner);
    /// 400 `JobStillRunningException` → `JobStillRunning`.
    pub async fn remove_runner(&self, runner_id: i64) -> Result<(), Error> {
        let admin = self.inner.admin().await?;
        let url = self.inner.admin_url(&admin, &format!("_apis/distributedtask/pools/0/agents/{runner_id}"));
        let call = Call::new("remove runner", Method::DELETE, url, format!("Bearer {}", admin.token))
            .content_type("application/json");
        let reply = self.inner.send(&call, true).await?;
        match reply.status {
            204 | 200 => Ok(()),
            400 if reply.type_name_contains("JobStillRunningException") => {
                let (_, message) = reply.type_and_message();
                Err(Error::JobStillRunning { runner_id, message, ids: reply.ids })
            }
            _ => Err(reply.into_error()),
        }
    }
}

fn parse_queue_url(url: &str) -> Result<Url, Error> {
    Url::parse(url).map_err(|e| Error::Decode {
        what: "messageQueueUrl",
        detail: format!("{url:?} is not a URL ({e})"),
        ids: RequestIds::default(),
    })
}

impl Inner {
    fn admin_now(&self) -> Option<Admin> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn fresh_admin(&self, now: i64) -> Option<Admin> {
        self.admin_now().filter(|a| now + ADMIN_TOKEN_MARGIN_S < a.exp)
    }

    /// A fresh admin connection, running the auth chain when needed (serialised).
    async fn admin(&self) -> Result<Admin, Error> {
        if let Some(a) = self.fresh_admin(unix_now()) {
            return Ok(a);
        }
        let _guard = self.refresh.lock().await;
        if let Some(a) = self.fresh_admin(unix_now()) {
            return Ok(a);
        }
        let a = self.auth_chain().await?;
        *self.admin.lock().unwrap_or_else(|e| e.into_inner()) = Some(a.clone());
        Ok(a)
    }

    /// Forgets the admin token after the service refused it, so the next call re-authenticates.
    fn drop_admin(&self, token: &str) {
        let mut g = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        if g.as_ref().is_some_and(|a| a.token == token) {
            *g = None;
        }
    }

    async fn auth_chain(&self) -> Result<Admin, Error> {
        let credential = match &self.credentials {
            Credentials::Pat(pat) => pat.clone(),
            Credentials::App { app_id, installation_id, .. } => {
                let key =
                    self.app_key.as_ref().ok_or_else(|| Error::Config("github_app_private_key: missing".into()))?;
                let jwt = jwt::app_jwt(key, app_id, unix_now())?;
                let call = Call::new(
                    "installation token",
                    Method::POST,
                    self.layout.installation_token_url(*installation_id),
                    format!("Bearer {jwt}"),
                )
                .content_type("application/vnd.github+json");
                let reply = self.send(&call, true).await?;
                if reply.status != 201 {
                    return Err(reply.into_error());
                }
                token_field(&reply, "token")?
            }
        };
        let call = Call::new(
            "registration token",
            Method::POST,
            self.layout.registration_token_url(),
            format!("Bearer {credential}"),
        )
        .content_type("application/vnd.github.v3+json");
        let reply = self.send(&call, true).await?;
        if reply.status != 201 {
            return Err(reply.into_error());
        }
        let registration = token_field(&reply, "token")?;
        let mut call = Call::new(
            "runner registration",
            Method::POST,
            self.layout.runner_registration_url(),
            format!("RemoteAuth {registration}"),
        )
        .content_type("application/json")
        .json(&serde_json::json!({ "url": self.layout.config_url, "runner_event": "register" }));
        call.retry_auth = true;
        let reply = self.send(&call, true).await?;
        if !(200..300).contains(&reply.status) {
            return Err(reply.into_error());
        }
        let url = token_field(&reply, "url")?;
        let token = token_field(&reply, "token")?;
        Url::parse(&url).map_err(|e| reply.decode_err(format!("runner-registration url {url:?}: {e}")))?;
        let exp = jwt::unverified_exp(&token)
            .ok_or_else(|| reply.decode_err("the admin token is not a JWT with an exp claim".into()))?;
        let service_url = if url.ends_with('/') { url } else { format!("{url}/") };
        tracing::debug!(service_url = %service_url, exp, "admin token refreshed");
        Ok(Admin { service_url, token, exp })
    }

    /// `{service}{path}?api-version=6.0-preview` (Go's JoinPath: duplicate slashes collapse).
    fn admin_url(&self, admin: &Admin, path: &str) -> String {
        format!("{}{}?{}", admin.service_url, path.trim_start_matches('/'), go_query(&[("api-version", API_VERSION)]))
    }

    fn scale_set_url(&self, admin: &Admin, tail: &str) -> String {
        let path = format!("_apis/runtime/runnerscalesets/{}/{}", self.scale_set_id, tail);
        self.admin_url(admin, path.trim_end_matches('/'))
    }

    /// An admin call on `…/runnerscalesets/{id}/{tail}` (`tail` empty: the scale set itself).
    async fn admin_call(
        &self,
        what: &'static str,
        method: Method,
        tail: &str,
        body: Option<&serde_json::Value>,
        gate: Option<&dyn Gate>,
        retry: bool,
    ) -> Result<Reply, Error> {
        let admin = self.admin().await?;
        let url = self.scale_set_url(&admin, tail);
        let mut call = Call::new(what, method, url, format!("Bearer {}", admin.token)).content_type("application/json");
        call.body = body.map(|b| b.to_string());
        call.gate = gate;
        let reply = self.send(&call, retry).await;
        if let Err(Error::Unauthorized { .. }) | Ok(Reply { status: 401, .. }) = &reply {
            self.drop_admin(&admin.token);
        }
        reply
    }

    /// 404 `RunnerScaleSetNotFoundException` → `ScaleSetNotFound`, anything else generic.
    fn scale_set_error(&self, reply: Reply) -> Error {
        if reply.status == 404 && reply.type_name_contains("RunnerScaleSetNotFoundException") {
            let (_, message) = reply.type_and_message();
            return Error::ScaleSetNotFound { scale_set_id: self.scale_set_id, message, ids: reply.ids };
        }
        reply.into_error()
    }

    /// Sends `call`, retrying per the policy when `retry`; each attempt checks the gate first.
    async fn send(&self, call: &Call<'_>, retry: bool) -> Result<Reply, Error> {
        if !retry {
            return self.attempt(call).await;
        }
        let p = &self.retry;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(p.min_delay)
            .with_max_delay(p.max_delay)
            .with_max_times(p.max_retries)
            .with_jitter();
        let cap = p.retry_after_cap;
        (|| self.attempt(call))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e| {
                (e.is_retryable() && (call.retry_transport || !matches!(e, Error::Transport { .. })))
                    || (call.retry_auth && matches!(e, Error::Unauthorized { .. } | Error::Forbidden { .. }))
            })
            .adjust(move |e, dur| dur.map(|d| e.retry_after().map_or(d, |ra| ra.min(cap))))
            .notify(|e, d| tracing::debug!(what = call.what, error = %e, retry_in = ?d, "GitHub request retried"))
            .await
    }

    /// One attempt: gate, send, read the body. Retryable statuses come back as `Err` so backon
    /// sees them; every other status is an `Ok(Reply)` for the caller to interpret.
    async fn attempt(&self, call: &Call<'_>) -> Result<Reply, Error> {
        if let Some(gate) = call.gate {
            gate.check().map_err(|_| Error::Fenced)?;
        }
        let http = if call.gate.is_some() { &self.holder_http } else { &self.http };
        let mut rb = http
            .request(call.method.clone(), &call.url)
            .header(USER_AGENT, &self.user_agent)
            .header(AUTHORIZATION, &call.auth);
        // A value that is not a valid header (it cannot be, config names are checked) is left out.
        if let Some(owner) = call.gate.and_then(|g| g.owner()).and_then(|o| HeaderValue::from_str(&o).ok()) {
            rb = rb.header(OWNER_HEADER, owner);
        }
        if let Some(ct) = call.content_type {
            rb = rb.header(CONTENT_TYPE, ct);
        }
        if let Some(a) = call.accept {
            rb = rb.header(ACCEPT, a);
        }
        if let Some(c) = call.capacity {
            rb = rb.header("X-ScaleSetMaxCapacity", c.to_string());
        }
        if let Some(b) = &call.body {
            rb = rb.body(b.clone());
        }
        if let Some(t) = call.timeout {
            rb = rb.timeout(t);
        }
        let transport = |source| Error::Transport { what: call.what, source };
        let mut resp = rb.send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        let ids = RequestIds { activity_id: header("activityid"), request_id: header("x-github-request-id") };
        let too_large = |ids: RequestIds| Error::TooLarge { what: call.what, limit: MAX_BODY_BYTES, ids };
        if resp.content_length().is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return Err(too_large(ids));
        }
        // Read chunk by chunk, so a body without Content-Length is bounded too.
        let mut body: Vec<u8> = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(too_large(ids));
            }
            body.extend_from_slice(&chunk);
        }
        let reply = Reply { what: call.what, status, body: strip_bom(&body).to_vec(), headers, ids };
        let retryable = status == 429
            || (status == 403 && is_rate_limit_403(&reply.headers))
            || (status >= 500 && status != 501)
            || (call.retry_auth && matches!(status, 401 | 403));
        if retryable { Err(reply.into_error()) } else { Ok(reply) }
    }
}

/// `sessions/{id}` for a session id of GitHub's shape (a UUID). Anything else (a path such as
/// `../../2` from a broken or hostile peer) is refused before a URL is built from it.
fn session_path(session_id: &str) -> Result<String, Error> {
    if !arcfed_core::github::is_session_id(session_id) {
        return Err(Error::Config(format!("session id {session_id:?} is not a UUID; not sent")));
    }
    Ok(format!("sessions/{session_id}"))
}

/// The queue answered that it does not know the session: 400 `RunnerSessionInvalid` (the
/// broker's structured form), or a 404 that is not `RunnerScaleSetNotFoundException`.
fn is_session_invalid(reply: &Reply) -> bool {
    let (kind, _) = reply.type_and_message();
    match reply.status {
        400 => kind.contains("RunnerSessionInvalid") || kind.contains("SessionNotFound"),
        404 => !kind.contains("RunnerScaleSetNotFoundException"),
        _ => false,
    }
}

/// The error of a queue call (poll, ack, acquire): a session the queue no longer knows is
/// `SessionGone` (open another one), never a reason to stop.
fn queue_error(reply: Reply, session_id: &str) -> Error {
    if is_session_invalid(&reply) {
        let (_, message) = reply.type_and_message();
        return Error::SessionGone { session_id: session_id.to_string(), message, ids: reply.ids };
    }
    reply.into_error()
}

/// A non-empty string field of a token response.
fn token_field(reply: &Reply, field: &str) -> Result<String, Error> {
    let v: serde_json::Value = reply.json()?;
    match v.get(field).and_then(|t| t.as_str()) {
        Some(t) if !t.is_empty() => Ok(t.to_string()),
        _ => Err(reply.decode_err(format!("no {field:?} in the response"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(parse_retry_after("5", now), Some(Duration::from_secs(5)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now), Some(Duration::from_secs(10)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT", UNIX_EPOCH), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Tue, 29 Feb 2028 12:00:00 GMT", UNIX_EPOCH + Duration::from_secs(1_835_438_400 - 3)),
            Some(Duration::from_secs(3))
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn conflict_owner_is_parsed_from_either_message_form() {
        assert_eq!(
            conflict_owner("The runner scale set gha-rs already has an active session for owner arcfed/a/m1/t3.")
                .as_deref(),
            Some("arcfed/a/m1/t3")
        );
        assert_eq!(
            conflict_owner("The runner scale set x already has an active session for owner gha-rs-754b578d-listener.")
                .as_deref(),
            Some("gha-rs-754b578d-listener")
        );
        assert_eq!(conflict_owner("The actions runner scaleset dev already has an active session."), None);
    }

    #[test]
    fn queries_are_sorted_and_form_encoded_like_go() {
        assert_eq!(
            go_query(&[("name", "my set"), ("api-version", "6.0-preview")]),
            "api-version=6.0-preview&name=my+set"
        );
    }

    #[test]
    fn exception_bodies_give_type_and_message() {
        assert_eq!(
            exception(br#"{"typeName":"A.B.RunnerScaleSetNotFoundException, A","message":"gone","$id":"1"}"#),
            ("A.B.RunnerScaleSetNotFoundException, A".to_string(), "gone".to_string())
        );
        assert_eq!(exception(br#"{"message":"Bad credentials"}"#), (String::new(), "Bad credentials".to_string()));
        assert_eq!(exception(b"upstream down"), (String::new(), "upstream down".to_string()));
        assert!(exception(&vec![b'x'; 2000]).1.len() < 600);
    }
}
