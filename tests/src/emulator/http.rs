//! The thin HTTP layer: parse a request, attribute it, apply faults, call [`Core`], hold long
//! polls, record the timeline. Routing is by path segments in one `match`, so every endpoint
//! of the emulated service is listed in [`classify`].

use super::config::SettingsPatch;
use super::core::{ApiError, Attribution, Core, Workload};
use super::faults::{FaultKind, FaultSpec, FaultTarget, PathClass};
use super::report::{AuthKind, Event};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The first path segments of the Actions service (GHES layout); the registration exchange
/// returns `<base>/_services/actions/` as its `url`.
pub const SERVICE_PREFIX: [&str; 2] = ["_services", "actions"];

/// The Actions service's path on the broker (dotcom layout), as github.com's
/// `https://broker.actions.githubusercontent.com/rest/`.
pub const BROKER_SERVICE_PREFIX: &str = "rest";

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// GHES layout: one host serves REST under `/api/v3` and the Actions service.
    Both,
    /// dotcom layout, `api.github.localhost`: REST at the root.
    Api,
    /// dotcom layout, `broker.github.localhost`: the Actions service and the message queue.
    Broker,
}

/// Shared by every connection. A std `Mutex` because no lock is held across an `.await`.
pub struct Shared {
    pub core: Mutex<Core>,
    pub started: Instant,
    /// Counts requests as they arrive: orders the ones that share a millisecond.
    pub arrivals: AtomicU64,
}

impl Shared {
    pub fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The request's arrival time and its place among requests that arrived before it.
    fn arrive(&self) -> (u64, u64) {
        let n = self.arrivals.fetch_add(1, Ordering::Relaxed) + 1;
        (self.now(), n)
    }

    /// A panic while holding the lock leaves the state usable enough for a test service.
    pub fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A listener's router state: the shared service and which listener this is.
#[derive(Clone)]
pub struct Ctx {
    pub sh: Arc<Shared>,
    pub side: Side,
}

/// One endpoint, with the ids from its path.
#[derive(Debug, Clone, PartialEq)]
enum Route {
    InstallationToken(String),
    /// The path after the API base, e.g. `orgs/acme/actions/runners/registration-token`.
    RegistrationToken(String),
    RunnerRegistration,
    RunnerGroups,
    ScaleSets,
    ScaleSet(i64),
    Sessions(i64),
    Session(i64, String),
    Messages(i64),
    Message(i64, i64),
    /// dotcom queue URL `/scalesets/{opaque}/message`, before the opaque id is resolved.
    QueueMessages(String),
    QueueMessage(String, i64),
    Acquire(i64),
    Acquirable(i64),
    Jit(i64),
    Agents,
    Agent(i64),
    Emulator(Vec<String>),
    NotFound,
}

fn classify_rest(segs: &[&str]) -> Option<Route> {
    use Route::*;
    Some(match segs {
        ["app", "installations", i, "access_tokens"] => InstallationToken((*i).into()),
        ["orgs", _, "actions", "runners", "registration-token"]
        | ["enterprises", _, "actions", "runners", "registration-token"]
        | ["repos", _, _, "actions", "runners", "registration-token"] => RegistrationToken(segs.join("/")),
        ["actions", "runner-registration"] => RunnerRegistration,
        _ => return None,
    })
}

fn classify_service(segs: &[&str]) -> Route {
    use Route::*;
    let id = |s: &str| s.parse::<i64>().ok();
    match segs {
        ["_apis", "runtime", "runnergroups"] => RunnerGroups,
        ["_apis", "runtime", "runnerscalesets"] => ScaleSets,
        ["_apis", "runtime", "runnerscalesets", s, tail @ ..] => {
            let Some(s) = id(s) else { return NotFound };
            match tail {
                [] => ScaleSet(s),
                ["sessions"] => Sessions(s),
                ["sessions", sid] => Session(s, (*sid).into()),
                ["messages"] => Messages(s),
                ["messages", m] => id(m).map_or(NotFound, |m| Message(s, m)),
                ["acquirejobs"] => Acquire(s),
                ["acquirablejobs"] => Acquirable(s),
                ["generatejitconfig"] => Jit(s),
                _ => NotFound,
            }
        }
        ["_apis", "distributedtask", "pools", "0", "agents"] => Agents,
        ["_apis", "distributedtask", "pools", "0", "agents", r] => id(r).map_or(NotFound, Agent),
        _ => NotFound,
    }
}

fn classify(segs: &[&str], side: Side) -> Route {
    use Route::*;
    if let ["_emulator", rest @ ..] = segs {
        return Emulator(rest.iter().map(|s| s.to_string()).collect());
    }
    match (side, segs) {
        (Side::Both, ["api", "v3", rest @ ..]) | (Side::Api, rest) => classify_rest(rest).unwrap_or(NotFound),
        (Side::Both, [a, b, rest @ ..]) if [*a, *b] == SERVICE_PREFIX => classify_service(rest),
        // The broker's queue lives only at the URLs sessions hand out: a client that builds
        // the GHES queue path itself gets 404.
        (Side::Broker, [p, rest @ ..]) if *p == BROKER_SERVICE_PREFIX => match classify_service(rest) {
            Messages(_) | Message(..) => NotFound,
            r => r,
        },
        (Side::Broker, ["scalesets", q, "message"]) => QueueMessages((*q).into()),
        (Side::Broker, ["scalesets", q, "message", m]) => m.parse().map_or(NotFound, |m| QueueMessage((*q).into(), m)),
        _ => NotFound,
    }
}

impl Route {
    fn class(&self, m: &Method) -> PathClass {
        use Route::*;
        match self {
            InstallationToken(_) | RegistrationToken(_) | RunnerRegistration => PathClass::Auth,
            RunnerGroups => PathClass::RunnerGroups,
            ScaleSets | ScaleSet(_) => PathClass::ScaleSets,
            Sessions(_) => PathClass::SessionCreate,
            Session(..) if m == Method::DELETE => PathClass::SessionDelete,
            Session(..) => PathClass::SessionRefresh,
            Messages(_) | QueueMessages(_) => PathClass::Poll,
            Message(..) | QueueMessage(..) => PathClass::Ack,
            Acquire(_) | Acquirable(_) => PathClass::Acquire,
            Jit(_) => PathClass::Jit,
            Agents | Agent(_) => PathClass::Runners,
            Emulator(_) => PathClass::Emulator,
            NotFound => PathClass::Unknown,
        }
    }

    fn scale_set(&self) -> Option<i64> {
        use Route::*;
        match self {
            ScaleSet(s)
            | Sessions(s)
            | Session(s, _)
            | Messages(s)
            | Message(s, _)
            | Acquire(s)
            | Acquirable(s)
            | Jit(s) => Some(*s),
            _ => None,
        }
    }

    fn is_rest(&self) -> bool {
        matches!(self, Route::InstallationToken(_) | Route::RegistrationToken(_) | Route::RunnerRegistration)
    }

    fn is_service(&self) -> bool {
        !self.is_rest() && !matches!(self, Route::Emulator(_))
    }

    /// Calls made with the queue token.
    fn is_queue(&self) -> bool {
        use Route::*;
        matches!(self, Messages(_) | Message(..) | QueueMessages(_) | QueueMessage(..) | Acquire(_))
    }
}

/// A request, parsed once.
struct Req {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    bearer: Option<String>,
    remote_auth: Option<String>,
    capacity: Option<i64>,
    user_agent: Option<String>,
    /// `X-Arcfed-Owner`, bounded (a value over 256 bytes is cut).
    sender: Option<String>,
    accept: Option<String>,
    /// The request came in on a dotcom queue URL (which carries no api-version).
    queue_url_form: bool,
    body: axum::body::Bytes,
}

impl Req {
    fn q(&self, key: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn json<T: for<'de> Deserialize<'de> + Default>(&self) -> Result<T, ApiError> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(T::default());
        }
        serde_json::from_slice(&self.body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

fn header_str(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space), as Go encodes queries.
pub fn form_decode(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (pct_decode(&k.replace('+', " ")), pct_decode(&v.replace('+', " ")))
        })
        .collect()
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(hex) = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok())
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What goes back on the wire.
struct Reply {
    status: u16,
    body: Option<serde_json::Value>,
    /// 200 with `Content-Length: 0` (fault).
    empty: bool,
    retry_after: Option<String>,
    /// A session this request opened (create session), for attribution.
    opened: Option<Uuid>,
    rate_limited: bool,
}

impl Reply {
    fn json(status: u16, v: impl serde::Serialize) -> Self {
        Self {
            status,
            body: Some(serde_json::to_value(v).unwrap_or(serde_json::Value::Null)),
            empty: false,
            retry_after: None,
            opened: None,
            rate_limited: false,
        }
    }
    fn status(status: u16) -> Self {
        Self { status, body: None, empty: false, retry_after: None, opened: None, rate_limited: false }
    }
    fn err(e: ApiError) -> Self {
        if e.is_rest() {
            Self::json(
                e.status,
                serde_json::json!({"message": e.message, "documentation_url": "https://docs.github.com/rest"}),
            )
        } else {
            Self::json(e.status, serde_json::json!({"typeName": e.type_name, "message": e.message}))
        }
    }
    fn from<T: serde::Serialize>(status: u16, r: Result<T, ApiError>) -> Self {
        match r {
            Ok(v) => Self::json(status, v),
            Err(e) => Self::err(e),
        }
    }
    fn unit(status: u16, r: Result<(), ApiError>) -> Self {
        match r {
            Ok(()) => Self::status(status),
            Err(e) => Self::err(e),
        }
    }

    fn into_response(self, service: bool) -> Response {
        let mut resp = if self.empty {
            (StatusCode::OK, Body::empty()).into_response()
        } else {
            let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            match self.body {
                Some(v) => (status, axum::Json(v)).into_response(),
                None => status.into_response(),
            }
        };
        let h = resp.headers_mut();
        let id = Uuid::new_v4().to_string();
        if let Ok(v) = HeaderValue::from_str(&id) {
            h.insert(if service { "activityid" } else { "x-github-request-id" }, v);
        }
        if let Some(r) = self.retry_after.and_then(|r| HeaderValue::from_str(&r).ok()) {
            h.insert(header::RETRY_AFTER, r);
        }
        resp
    }
}

/// The fallback handler: every request comes through here.
pub async fn handle(State(ctx): State<Ctx>, req: Request) -> Response {
    let sh = &ctx.sh;
    let (at_ms, arrival) = sh.arrive();
    let clock = Instant::now();
    let (parts, body) = req.into_parts();
    let peer = parts.extensions.get::<std::net::SocketAddr>().copied();
    let body = axum::body::to_bytes(body, 4 << 20).await.unwrap_or_default();
    let auth = header_str(&parts.headers, "authorization").unwrap_or_default();
    let (scheme, cred) = auth.split_once(' ').unwrap_or((auth.as_str(), ""));
    let mut query = form_decode(parts.uri.query().unwrap_or(""));
    query.sort();
    let mut r = Req {
        method: parts.method.clone(),
        path: parts.uri.path().to_string(),
        query,
        // GitHub's REST API also takes a PAT as Basic auth's password (`user:pat`), which
        // ARC's clients before 0.8 send; it stands for the same credential as `Bearer <pat>`.
        bearer: if scheme.eq_ignore_ascii_case("bearer") {
            Some(cred.trim().to_string())
        } else if scheme.eq_ignore_ascii_case("basic") {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(cred.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|up| up.split_once(':').map(|(_, p)| p.to_string()))
        } else {
            None
        },
        remote_auth: scheme.eq_ignore_ascii_case("remoteauth").then(|| cred.trim().to_string()),
        capacity: header_str(&parts.headers, "x-scalesetmaxcapacity").and_then(|v| v.trim().parse().ok()),
        user_agent: header_str(&parts.headers, "user-agent"),
        sender: header_str(&parts.headers, "x-arcfed-owner").map(|v| v.chars().take(256).collect()),
        accept: header_str(&parts.headers, "accept"),
        queue_url_form: false,
        body,
    };
    let decoded: Vec<String> = r.path.split('/').filter(|s| !s.is_empty()).map(pct_decode).collect();
    let segs: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let mut route = classify(&segs, ctx.side);
    let class = route.class(&r.method);
    let service = route.is_service();

    if let Route::Emulator(rest) = &route {
        return emulator(sh, &r, rest).await.into_response(false);
    }

    // A dotcom queue URL leads to its scale set only while it is current.
    let mut dead_queue_url = None;
    if let Route::QueueMessages(q) | Route::QueueMessage(q, _) = &route {
        r.queue_url_form = true;
        match sh.lock().queue_url_scale_set(q) {
            Ok(set) => {
                route = match route {
                    Route::QueueMessage(_, m) => Route::Message(set, m),
                    _ => Route::Messages(set),
                }
            }
            Err(e) => dead_queue_url = Some(Reply::err(e)),
        }
    }

    let body_owner = (class == PathClass::SessionCreate)
        .then(|| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
        .flatten()
        .and_then(|v| v.get("ownerName").and_then(|o| o.as_str()).map(str::to_string));
    let session_in_path = match &route {
        Route::Session(_, s) => Some(s.as_str()),
        _ => None,
    };
    let (mut attr, auth_kind, credential, faults) = {
        let mut c = sh.lock();
        let attr = c.attribute(session_in_path, r.bearer.as_deref(), body_owner.as_deref());
        let auth_kind = auth_kind(&c, &r, &route, at_ms);
        let credential = credential_of(&c, &r, &route, at_ms);
        let sid = attr.session.map(|s| s.to_string());
        let target = FaultTarget {
            class: Some(class),
            owner: attr.owner.as_deref(),
            session_id: sid.as_deref(),
            scale_set_id: route.scale_set(),
        };
        let f = if dead_queue_url.is_some() { Vec::new() } else { c.fire_faults(&target, at_ms) };
        (attr, auth_kind, credential, f)
    };

    let mut fault_note = Vec::new();
    let mut fault_names = Vec::new();
    let mut terminal = None;
    for f in faults {
        fault_names.push(f.kind.name());
        match f.kind {
            FaultKind::Latency { ms } if !f.handle_first => {
                fault_note.push(format!("latency {ms}ms"));
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            _ => terminal = Some(f),
        }
    }
    let mut reset = false;
    let mut hang = false;
    // When a handled-first request was served (before a delayed or faulty answer).
    let mut served_stamp = None;
    let reply = match (dead_queue_url, terminal) {
        (Some(reply), _) => reply,
        (None, None) => gated_serve(sh, &r, &route, credential.as_deref(), at_ms).await,
        (None, Some(f)) => {
            let served = if f.handle_first {
                let reply = gated_serve(sh, &r, &route, credential.as_deref(), at_ms).await;
                served_stamp = Some(sh.arrive());
                Some(reply)
            } else {
                None
            };
            let first = if f.handle_first { "handled, then " } else { "" };
            match f.kind {
                FaultKind::Status { status, retry_after, type_name, message, error_kind: Some(kind) } => {
                    fault_note.push(format!("{first}status {status} ({kind})"));
                    let body = serde_json::json!({
                        "source": "broker",
                        "errorKind": kind,
                        "statusCode": status,
                        "errorMessage": message.or(type_name).unwrap_or_else(|| format!("Injected fault: {kind}.")),
                    });
                    let mut reply = Reply::json(status, body);
                    reply.retry_after = retry_after;
                    reply
                }
                FaultKind::Status { status, retry_after, type_name, message, error_kind: None } => {
                    fault_note.push(format!("{first}status {status}"));
                    fault_reply(class, status, retry_after, type_name, message)
                }
                FaultKind::EmptyBody => {
                    fault_note.push(format!("{first}empty_body"));
                    Reply { empty: true, ..Reply::status(200) }
                }
                FaultKind::Reset => {
                    fault_note.push(format!("{first}reset"));
                    reset = true;
                    served.unwrap_or_else(|| fault_reply(class, 500, None, None, None))
                }
                // Served (a session opened, a message deleted), and the answer held back: what
                // a client whose request landed but whose answer was slow or lost sees.
                FaultKind::Latency { ms } => {
                    fault_note.push(format!("handled, then latency {ms}ms"));
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    served.unwrap_or_else(|| Reply::status(500))
                }
                FaultKind::Hang => {
                    fault_note.push(format!("{first}hang"));
                    hang = true;
                    Reply::status(0)
                }
            }
        }
    };
    // A create counts from when the service opened the session, not from when the request
    // arrived: two contenders' requests can arrive in one order and be served in the other
    // (a DELETE of the old session served before a POST that arrived just earlier), and only
    // the serving order says whose session was open when.
    let (at_ms, arrival) = if let Some(id) = reply.opened {
        attr = Attribution { session: Some(id), owner: body_owner.clone(), zombie: false };
        served_stamp.unwrap_or_else(|| sh.arrive())
    } else {
        (at_ms, arrival)
    };
    let status = if reply.empty { 200 } else { reply.status };
    // The message a 200 poll delivered, or the one an ack names.
    let message_id = match (&route, class) {
        (Route::Message(_, m), PathClass::Ack) | (Route::QueueMessage(_, m), PathClass::Ack) => Some(*m),
        (_, PathClass::Poll) if status == 200 => {
            reply.body.as_ref().and_then(|b| b.get("messageId")).and_then(serde_json::Value::as_i64)
        }
        _ => None,
    };
    let event = Event {
        seq: 0,
        at_ms,
        arrival,
        duration_ms: u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX),
        method: r.method.to_string(),
        path: r.path.clone(),
        query: r.query.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&"),
        class,
        auth: auth_kind,
        capacity: r.capacity,
        user_agent: r.user_agent.clone(),
        status,
        scale_set_id: route.scale_set(),
        session_id: attr.session.map(|s| s.to_string()),
        owner: attr.owner.clone(),
        zombie: attr.zombie,
        sender: r.sender.clone(),
        message_id,
        fault: (!fault_note.is_empty()).then(|| fault_note.join(", ")),
        credential: credential.clone(),
        rate_limited: reply.rate_limited,
        peer: peer.map(|p| p.to_string()),
    };
    {
        let mut c = sh.lock();
        c.count_request(credential.as_deref(), &fault_names);
        c.record(event, &attr);
    }
    if hang {
        // Until the client gives up and hyper drops this future, or the emulator stops.
        return std::future::pending().await;
    }
    let resp = reply.into_response(service);
    if reset { reset_mid_body(resp).await } else { resp }
}

/// The response's status and headers with its full `Content-Length`, half its body, then a
/// dropped connection (the body stream fails, so hyper aborts the connection).
async fn reset_mid_body(resp: Response) -> Response {
    let (mut parts, body) = resp.into_parts();
    let mut bytes = axum::body::to_bytes(body, 4 << 20).await.unwrap_or_default().to_vec();
    if bytes.len() < 2 {
        bytes = br#"{"message":"this body is never sent in full"}"#.to_vec();
    }
    if parts.status == StatusCode::NO_CONTENT || parts.status == StatusCode::ACCEPTED {
        parts.status = StatusCode::OK;
    }
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let half = axum::body::Bytes::from(bytes[..bytes.len() / 2].to_vec());
    let stream = futures::stream::unfold(0u8, move |step| {
        let half = half.clone();
        async move {
            match step {
                0 => Some((Ok::<_, std::io::Error>(half), 1)),
                1 => {
                    // Let the first half reach the client before the connection drops.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Some((Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "injected reset")), 2))
                }
                _ => None,
            }
        }
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

/// The credential behind a request, whatever token carried it.
fn credential_of(c: &Core, r: &Req, route: &Route, now: u64) -> Option<String> {
    if let Some(ra) = r.remote_auth.as_deref() {
        return c.registration_credential(ra);
    }
    let b = r.bearer.as_deref()?;
    if let Some((cred, _)) = c.github_credential(b, now) {
        return Some(cred);
    }
    if let Some(cred) = c.admin_credential(b).or_else(|| c.queue_credential(b)) {
        return Some(cred);
    }
    match route {
        Route::InstallationToken(_) => c.app_issuer(b, now).ok().map(|iss| format!("app:{iss}")),
        _ => None,
    }
}

fn has_api_version(r: &Req) -> bool {
    r.q("api-version").is_some_and(|v| !v.is_empty())
        || r.accept.as_deref().is_some_and(|a| a.to_ascii_lowercase().contains("api-version="))
}

/// GitHub's checks before it handles a request: a `User-Agent` on REST calls, the
/// api-version under `strict_api_version`, and the secondary rate limit.
async fn gated_serve(sh: &Arc<Shared>, r: &Req, route: &Route, credential: Option<&str>, now: u64) -> Reply {
    if route.is_rest() && r.user_agent.as_deref().is_none_or(|u| u.trim().is_empty()) {
        return Reply::err(ApiError::rest(
            403,
            "Request forbidden by administrative rules. Please make sure your request has a User-Agent header \
             (https://docs.github.com/en/rest/overview/resources-in-the-rest-api#user-agent-required). \
             Check https://developer.github.com for other possible causes.",
        ));
    }
    let (strict, limited) = {
        let mut c = sh.lock();
        let limited = match credential {
            Some(cred) if route.is_rest() || (route.is_service() && !route.is_queue()) => c.rate_limit(cred, now),
            _ => None,
        };
        (c.settings.strict_api_version, limited.map(|s| (s, c.settings.rate_limit_status.code())))
    };
    let versioned =
        route.is_service() && *route != Route::NotFound && !(r.queue_url_form && r.method == Method::DELETE);
    if strict && versioned && !has_api_version(r) {
        return Reply::err(ApiError::version_not_specified(r.method.as_str()));
    }
    if let Some((retry, status)) = limited {
        let mut reply = if route.is_rest() {
            Reply::err(ApiError::rest(
                status,
                "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
            ))
        } else {
            fault_reply(PathClass::Unknown, 429, None, None, None)
        };
        reply.status = status;
        reply.retry_after = Some(retry.to_string());
        reply.rate_limited = true;
        return reply;
    }
    serve(sh, r, route, now).await
}

fn auth_kind(c: &Core, r: &Req, route: &Route, now: u64) -> AuthKind {
    if r.remote_auth.is_some() {
        return AuthKind::RemoteAuth;
    }
    let Some(b) = r.bearer.as_deref() else { return AuthKind::None };
    if let Some((_, k)) = c.github_credential(b, now) {
        return k;
    }
    if c.is_queue_token(b) {
        return AuthKind::Queue;
    }
    if c.is_admin_token(b) {
        return AuthKind::Admin;
    }
    if matches!(route, Route::InstallationToken(_)) && super::token::looks_like_jwt(b) {
        return AuthKind::AppJwt;
    }
    AuthKind::Invalid
}

fn fault_reply(
    class: PathClass,
    status: u16,
    retry_after: Option<String>,
    type_name: Option<String>,
    message: Option<String>,
) -> Reply {
    let (t, m) = match (status, class) {
        (404, PathClass::SessionRefresh) => {
            let e = ApiError::session_evicted();
            (e.type_name, e.message)
        }
        (401, _) => {
            let e = ApiError::unauthorized();
            (e.type_name, e.message)
        }
        (429, _) => (
            "GitHub.Services.WebApi.VssServiceResponseException, GitHub.Services.WebApi".into(),
            "Request was blocked due to exceeding usage of resource 'Count' in namespace 'AnonymousId'.".into(),
        ),
        (s, _) => (
            "GitHub.Services.WebApi.VssServiceResponseException, GitHub.Services.WebApi".into(),
            format!("Injected fault: status {s}."),
        ),
    };
    let mut reply =
        Reply::json(status, serde_json::json!({"typeName": type_name.unwrap_or(t), "message": message.unwrap_or(m)}));
    reply.retry_after = retry_after;
    reply
}

/// The Actions service and GitHub REST endpoints.
async fn serve(sh: &Arc<Shared>, r: &Req, route: &Route, now: u64) -> Reply {
    use Route::*;
    let m = &r.method;
    let bearer = r.bearer.as_deref().unwrap_or("");
    // Everything under the service except the queue-token endpoints wants the admin token.
    let needs_admin = route.is_service() && !matches!(route, Messages(_) | Message(..) | Acquire(_) | NotFound);
    if let (Messages(id), &Method::GET) = (route, m) {
        let last = r.q("lastMessageId").and_then(|v| v.parse().ok()).unwrap_or(0);
        return long_poll(sh, *id, bearer, last, r.capacity).await;
    }
    let mut c = sh.lock();
    // Sessions open and close in the order the service serves them (under this lock), which
    // is not always the order their requests arrived: a POST that arrived a moment before a
    // DELETE of the open session may be served after it. Stamp both at serving time, or the
    // report would count an overlap GitHub never had.
    let served = sh.now();
    let credential = if needs_admin {
        match c.check_admin(bearer, now) {
            Ok(cred) => cred,
            Err(e) => return Reply::err(e),
        }
    } else {
        String::new()
    };
    match (route, m.clone()) {
        (InstallationToken(i), Method::POST) => match c.installation_token(bearer, i, now) {
            Ok((token, exp)) => Reply::json(201, serde_json::json!({"token": token, "expires_at": exp})),
            Err(e) => Reply::err(e),
        },
        (RegistrationToken(path), Method::POST) => match c.registration_token(bearer, path, now) {
            Ok((token, exp)) => Reply::json(201, serde_json::json!({"token": token, "expires_at": exp})),
            Err(e) => Reply::err(e),
        },
        (RunnerRegistration, Method::POST) => {
            // ARC sends {"url": <githubConfigUrl>, "runner_event": "register"} (reference §1.5).
            #[derive(Deserialize, Default)]
            struct Body {
                #[serde(default)]
                url: String,
                #[serde(default)]
                runner_event: String,
            }
            match r.json::<Body>() {
                Ok(b) if !b.url.trim().is_empty() && b.runner_event == "register" => {}
                _ => {
                    return Reply::err(ApiError::rest(
                        400,
                        "Invalid request: the body must carry \"url\" and \"runner_event\": \"register\".",
                    ));
                }
            }
            match c.runner_registration(r.remote_auth.as_deref().unwrap_or(""), now) {
                Ok((url, token)) => Reply::json(
                    200,
                    serde_json::json!({"url": url, "token": token, "token_schema": "OAuthAccessToken"}),
                ),
                Err(e) => Reply::err(e),
            }
        }
        (RunnerGroups, Method::GET) => Reply::json(200, c.runner_groups(r.q("groupName"))),
        (ScaleSets, Method::GET) => {
            let group = r.q("runnerGroupId").and_then(|g| g.parse().ok());
            Reply::json(200, c.list_scale_sets(group, r.q("name")))
        }
        (ScaleSets, Method::POST) => match r.json() {
            Ok(input) => Reply::from(200, c.create_scale_set(input, now)),
            Err(e) => Reply::err(e),
        },
        (ScaleSet(id), Method::GET) => Reply::from(200, c.get_scale_set(*id)),
        (ScaleSet(id), Method::PATCH) => match r.json() {
            Ok(input) => Reply::from(200, c.update_scale_set(*id, input)),
            Err(e) => Reply::err(e),
        },
        (ScaleSet(id), Method::DELETE) => Reply::unit(204, c.delete_scale_set(*id, now)),
        (Sessions(id), Method::POST) => {
            #[derive(Deserialize, Default)]
            #[serde(rename_all = "camelCase")]
            struct Body {
                #[serde(default)]
                owner_name: String,
            }
            let owner = match r.json::<Body>() {
                Ok(b) => b.owner_name,
                Err(e) => return Reply::err(e),
            };
            match c.create_session(*id, &owner, &credential, served) {
                Ok(s) => {
                    let opened = Uuid::parse_str(&s.session_id).ok();
                    let mut reply = Reply::json(200, s);
                    reply.opened = opened;
                    reply
                }
                Err(e) => Reply::err(e),
            }
        }
        (Session(id, sid), Method::PATCH) => Reply::from(200, c.refresh_session(*id, sid, now)),
        (Session(id, sid), Method::DELETE) => Reply::unit(204, c.delete_session(*id, sid, &credential, served)),
        (Message(id, mid), Method::DELETE) => Reply::unit(204, c.ack(*id, bearer, *mid, now)),
        (Acquire(id), Method::POST) => {
            let ids: Vec<i64> = match serde_json::from_slice(&r.body) {
                Ok(v) => v,
                Err(e) => {
                    // Auth comes first: the admin token is refused before the body is read.
                    if let Err(a) = c.acquire(*id, bearer, &[], now) {
                        return Reply::err(a);
                    }
                    return Reply::err(ApiError::bad_request(format!("invalid JSON body: {e}")));
                }
            };
            Reply::from(200, c.acquire(*id, bearer, &ids, now))
        }
        (Acquirable(_), Method::GET) if !c.settings.acquirable_jobs => Reply::err(ApiError::rest(404, "Not Found")),
        (Acquirable(id), Method::GET) => match c.acquirable(*id) {
            Ok(Some(v)) => Reply::json(200, v),
            Ok(None) => Reply::status(204),
            Err(e) => Reply::err(e),
        },
        (Jit(id), Method::POST) => {
            #[derive(Deserialize, Default)]
            #[serde(rename_all = "camelCase")]
            struct Body {
                #[serde(default)]
                name: String,
            }
            match r.json::<Body>() {
                Ok(b) => Reply::from(200, c.generate_jit(*id, &b.name)),
                Err(e) => Reply::err(e),
            }
        }
        (Agents, Method::GET) => Reply::json(200, c.runners_by_name(r.q("agentName").unwrap_or(""))),
        (Agent(rid), Method::GET) => Reply::from(200, c.runner_by_id(*rid)),
        (Agent(rid), Method::DELETE) => Reply::unit(204, c.remove_runner(*rid)),
        (NotFound, _) => Reply::err(ApiError::rest(404, "Not Found")),
        _ => Reply::err(ApiError::rest(405, "Method Not Allowed")),
    }
}

/// Decrements the session's in-flight poll count however the poll ends (including the
/// client going away and hyper dropping the future).
struct InFlight {
    sh: Arc<Shared>,
    session: Uuid,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.sh.now();
        self.sh.lock().poll_in_flight(self.session, false, now);
    }
}

/// Holds a poll until a message is ready or the window ends (202).
async fn long_poll(sh: &Arc<Shared>, set: i64, bearer: &str, last: i64, capacity: Option<i64>) -> Reply {
    let (window, notify) = {
        let c = sh.lock();
        (c.settings.long_poll, c.notify_of(set))
    };
    let deadline = tokio::time::Instant::now() + window;
    let mut guard: Option<InFlight> = None;
    loop {
        let notified = notify.as_ref().map(|n| n.notified());
        let mut notified = std::pin::pin!(notified);
        if let Some(n) = notified.as_mut().as_pin_mut() {
            n.enable();
        }
        let res = {
            let now = sh.now();
            sh.lock().poll(set, bearer, last, capacity, now)
        };
        match res {
            Err(e) => return Reply::err(e),
            Ok((_, Some(env))) => return Reply::json(200, env),
            Ok((session, None)) => {
                if guard.is_none() {
                    let now = sh.now();
                    sh.lock().poll_in_flight(session, true, now);
                    guard = Some(InFlight { sh: sh.clone(), session });
                }
                if tokio::time::Instant::now() >= deadline {
                    return Reply::status(202);
                }
                match notified.as_mut().as_pin_mut() {
                    Some(n) => {
                        tokio::select! {
                            _ = n => {}
                            _ = tokio::time::sleep_until(deadline) => {}
                        }
                    }
                    None => tokio::time::sleep_until(deadline).await,
                }
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobsBody {
    scale_set_id: i64,
    #[serde(default = "one")]
    count: u32,
    #[serde(default)]
    duration_seconds: f64,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RunnerBody {
    #[serde(default)]
    job_id: Option<String>,
    #[serde(default)]
    result: Option<String>,
    /// `online` only: take and finish jobs automatically from now on.
    #[serde(default)]
    auto: bool,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ScaleSetBody {
    #[serde(default)]
    name: String,
    #[serde(default)]
    runner_group_id: Option<i64>,
}

#[derive(Deserialize, Default)]
struct NameBody {
    #[serde(default)]
    name: String,
}

fn parse<T: for<'de> Deserialize<'de>>(r: &Req) -> Result<T, ApiError> {
    let body: &[u8] = if r.body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &r.body };
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// The test side channel under `/_emulator/`. Not recorded in the timeline.
async fn emulator(sh: &Arc<Shared>, r: &Req, rest: &[String]) -> Reply {
    let now = sh.now();
    let segs: Vec<&str> = rest.iter().map(String::as_str).collect();
    let mut c = sh.lock();
    let m = r.method.clone();
    match (m, segs.as_slice()) {
        (Method::GET, ["health"]) => Reply::json(200, serde_json::json!({"ok": true})),
        (Method::GET, ["config"]) => Reply::json(200, &c.settings),
        (Method::PUT | Method::PATCH | Method::POST, ["config"]) => match parse::<SettingsPatch>(r) {
            Ok(p) => {
                c.settings.apply(p);
                c.tick(now);
                Reply::json(200, &c.settings)
            }
            Err(e) => Reply::err(e),
        },
        (Method::POST, ["jobs"]) => match parse::<JobsBody>(r) {
            Ok(b) if b.duration_seconds.is_finite() && b.duration_seconds >= 0.0 => {
                let d = Duration::from_secs_f64(b.duration_seconds);
                match c.enqueue_jobs(b.scale_set_id, b.count, d, now) {
                    Ok(ids) => Reply::json(200, serde_json::json!({"jobIds": ids})),
                    Err(e) => Reply::err(e),
                }
            }
            Ok(_) => Reply::err(ApiError::bad_request("durationSeconds must be a non-negative number")),
            Err(e) => Reply::err(e),
        },
        (Method::POST, ["workload"]) => match parse::<Workload>(r) {
            Ok(w) => Reply::unit(204, c.set_workload(w)),
            Err(e) => Reply::err(e),
        },
        (Method::GET, ["faults"]) => Reply::json(200, c.faults.list()),
        (Method::POST, ["faults"]) => match parse::<FaultSpec>(r) {
            Ok(spec) => match c.faults.add(spec, now) {
                Ok(f) => Reply::json(200, f),
                Err(e) => Reply::err(ApiError::bad_request(e)),
            },
            Err(e) => Reply::err(e),
        },
        (Method::DELETE, ["faults"]) => {
            c.faults.clear();
            Reply::status(204)
        }
        (Method::DELETE, ["faults", id]) => match id.parse() {
            Ok(id) if c.faults.remove(id) => Reply::status(204),
            _ => Reply::err(ApiError::rest(404, "no such fault")),
        },
        (Method::POST, ["expire-tokens"]) => {
            c.expire_tokens(now);
            Reply::status(204)
        }
        (Method::GET, ["report"]) => Reply::json(200, c.report(now)),
        (Method::GET, ["timeline"]) => {
            let since = r.q("since").and_then(|v| v.parse().ok()).unwrap_or(0);
            let limit = r.q("limit").and_then(|v| v.parse().ok()).unwrap_or(usize::MAX);
            Reply::json(200, c.timeline(since, limit))
        }
        (Method::GET, ["runners", name]) => Reply::from(200, c.runner_state(name)),
        (Method::POST, ["runners", name, action]) => {
            let b = parse::<RunnerBody>(r).unwrap_or_default();
            match *action {
                "online" => Reply::unit(204, c.runner_online(name, b.auto)),
                "start" => Reply::from(
                    200,
                    c.runner_start(name, b.job_id.as_deref(), now).map(|j| serde_json::json!({"jobId": j})),
                ),
                "finish" => Reply::from(
                    200,
                    c.runner_finish(name, b.result.as_deref().unwrap_or("succeeded"), now)
                        .map(|j| serde_json::json!({"jobId": j})),
                ),
                _ => Reply::err(ApiError::rest(404, "unknown runner action")),
            }
        }
        (Method::POST, ["sessions", id, "evict"]) => Reply::unit(204, c.evict_session(id, now)),
        (Method::POST, ["scalesets"]) => match parse::<ScaleSetBody>(r) {
            Ok(b) => {
                let input = super::model::ScaleSetInput {
                    name: Some(b.name),
                    runner_group_id: b.runner_group_id,
                    ..Default::default()
                };
                Reply::from(200, c.create_scale_set(input, now))
            }
            Err(e) => Reply::err(e),
        },
        (Method::DELETE, ["scalesets", id]) => match id.parse() {
            Ok(id) => Reply::unit(204, c.delete_scale_set(id, now)),
            Err(_) => Reply::err(ApiError::rest(404, "bad scale set id")),
        },
        (Method::GET, ["scalesets", id, "statistics"]) => match id.parse() {
            Ok(id) => Reply::from(200, c.statistics(id)),
            Err(_) => Reply::err(ApiError::rest(404, "bad scale set id")),
        },
        (Method::POST, ["runnergroups"]) => match parse::<NameBody>(r) {
            Ok(b) if !b.name.is_empty() => Reply::json(200, serde_json::json!({"id": c.add_runner_group(&b.name)})),
            Ok(_) => Reply::err(ApiError::bad_request("name must not be empty")),
            Err(e) => Reply::err(e),
        },
        _ => Reply::err(ApiError::rest(404, "unknown /_emulator/ endpoint")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_encoded_query_decodes() {
        let q = form_decode("api-version=6.0-preview&name=my+set%21&runnerGroupId=1");
        assert_eq!(q[1], ("name".into(), "my set!".into()));
    }

    #[test]
    fn routes_cover_the_reference_table() {
        let r = |p: &str| classify(&p.split('/').filter(|s| !s.is_empty()).collect::<Vec<_>>(), Side::Both);
        assert_eq!(r("/_services/actions/_apis/runtime/runnergroups/"), Route::RunnerGroups);
        assert_eq!(r("/_services/actions/_apis/runtime/runnerscalesets/3/messages/9"), Route::Message(3, 9));
        assert_eq!(r("/_services/actions/_apis/distributedtask/pools/0/agents/5"), Route::Agent(5));
        assert_eq!(
            r("/api/v3/repos/o/r/actions/runners/registration-token"),
            Route::RegistrationToken("repos/o/r/actions/runners/registration-token".into())
        );
        assert_eq!(r("/_services/actions/_apis/runtime/runnerscalesets/x"), Route::NotFound);
    }

    #[test]
    fn dotcom_routes_split_between_api_and_broker() {
        let r = |p: &str, side| classify(&p.split('/').filter(|s| !s.is_empty()).collect::<Vec<_>>(), side);
        assert_eq!(r("/actions/runner-registration", Side::Api), Route::RunnerRegistration);
        assert_eq!(r("/api/v3/actions/runner-registration", Side::Api), Route::NotFound);
        assert_eq!(r("/actions/runner-registration", Side::Broker), Route::NotFound);
        assert_eq!(r("/rest/_apis/runtime/runnerscalesets/3/sessions", Side::Broker), Route::Sessions(3));
        assert_eq!(r("/_services/actions/_apis/runtime/runnergroups", Side::Broker), Route::NotFound);
        assert_eq!(r("/scalesets/abc/message/7", Side::Broker), Route::QueueMessage("abc".into(), 7));
        assert_eq!(r("/rest/_apis/runtime/runnergroups", Side::Api), Route::NotFound);
        assert_eq!(r("/rest/_apis/runtime/runnerscalesets/3/messages", Side::Broker), Route::NotFound);
    }
}
