//! Typed errors of the GitHub client. Every error that came from a response carries the
//! response's `ActivityId` (Actions service) and `X-GitHub-Request-Id` (REST API), so a log line
//! can be matched with GitHub support's records.

use std::time::Duration;

/// Diagnostic ids of one response (reference §1.7).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestIds {
    pub activity_id: Option<String>,
    pub request_id: Option<String>,
}

impl std::fmt::Display for RequestIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ActivityId {:?}, X-GitHub-Request-Id {:?}",
            self.activity_id.as_deref().unwrap_or(""),
            self.request_id.as_deref().unwrap_or("")
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The gate refused before the attempt; nothing was sent.
    #[error("fenced: the lease no longer covers holder-only requests; nothing was sent")]
    Fenced,
    /// 409 `RunnerScaleSetSessionConflictException` on `POST …/sessions`: the scale set already
    /// has a session. `owner` is parsed from the message when it names one; `foreign` is true
    /// when that owner is not arcfed's (`arcfed/…`), i.e. a stock listener holds the session.
    #[error("session conflict (409): {message} (owner {owner:?}, foreign {foreign}; {ids})")]
    Conflict { owner: Option<String>, foreign: bool, message: String, ids: RequestIds },
    /// 404 `RunnerScaleSetNotFoundException`: a federation-wide alert (DESIGN §5.10).
    #[error("scale set {scale_set_id} not found (404): {message} ({ids})")]
    ScaleSetNotFound { scale_set_id: i64, message: String, ids: RequestIds },
    /// The session refresh answered 404: GitHub no longer knows the session; open a new one.
    #[error("session {session_id} is gone (refresh 404): {message} ({ids})")]
    SessionGone { session_id: String, message: String, ids: RequestIds },
    #[error("{what}: unauthorized (401): {message} ({ids})")]
    Unauthorized { what: &'static str, message: String, ids: RequestIds },
    #[error("{what}: forbidden (403): {message} ({ids})")]
    Forbidden { what: &'static str, message: String, ids: RequestIds },
    /// 429, or a 403 that GitHub marks as a rate limit (`Retry-After` or
    /// `x-ratelimit-remaining: 0`). `retry_after` is the wait the response asked for.
    #[error("{what}: rate limited ({status}), Retry-After {retry_after:?}: {message} ({ids})")]
    RateLimited { what: &'static str, status: u16, retry_after: Option<Duration>, message: String, ids: RequestIds },
    /// Any other unexpected status. `type_name` is the exception's .NET type (may be empty).
    #[error("{what}: unexpected status {status}: {type_name}: {message} ({ids})")]
    Status {
        what: &'static str,
        status: u16,
        type_name: String,
        message: String,
        /// `Retry-After` of a 503, honoured by the retry layer.
        retry_after: Option<Duration>,
        ids: RequestIds,
    },
    /// Connect, TLS, timeout or a body cut short.
    #[error("{what}: transport: {source}")]
    Transport {
        what: &'static str,
        #[source]
        source: reqwest::Error,
    },
    /// A 200 whose body was empty (ARC #4285/#4470): a glitch; the caller polls again.
    #[error("{what}: empty 200 body ({ids})")]
    EmptyBody { what: &'static str, ids: RequestIds },
    /// A success whose body does not decode (or lacks a required field).
    #[error("{what}: cannot decode body: {detail} ({ids})")]
    Decode { what: &'static str, detail: String, ids: RequestIds },
    /// 400 `JobStillRunningException` on runner removal: retry later.
    #[error("runner {runner_id} still runs a job: {message} ({ids})")]
    JobStillRunning { runner_id: i64, message: String, ids: RequestIds },
    /// A response body larger than the client reads (a broken proxy, a hostile endpoint):
    /// dropped unread past the limit, so memory stays bounded.
    #[error("{what}: response body over {limit} bytes; not read ({ids})")]
    TooLarge { what: &'static str, limit: usize, ids: RequestIds },
    /// Bad settings (URL, key, CA); the message names the setting.
    #[error("{0}")]
    Config(String),
}

impl Error {
    /// Whether the failure is this member's own (DESIGN §5.9): transport and TLS, 401/403, 5xx,
    /// 429 (per credential), a refresh 404 (the holder machine decides when repeats make a loop),
    /// bad local config. A 409, a missing scale set, other 4xx, decode glitches and `Fenced` are
    /// not local: another member would fare no better.
    pub fn is_local(&self) -> bool {
        match self {
            Error::Transport { .. }
            | Error::Unauthorized { .. }
            | Error::Forbidden { .. }
            | Error::RateLimited { .. }
            | Error::SessionGone { .. }
            | Error::Config(_) => true,
            Error::Status { status, .. } => *status >= 500,
            Error::Fenced
            | Error::Conflict { .. }
            | Error::ScaleSetNotFound { .. }
            | Error::EmptyBody { .. }
            | Error::Decode { .. }
            | Error::TooLarge { .. }
            | Error::JobStillRunning { .. } => false,
        }
    }

    fn ids(&self) -> Option<&RequestIds> {
        match self {
            Error::Conflict { ids, .. }
            | Error::ScaleSetNotFound { ids, .. }
            | Error::SessionGone { ids, .. }
            | Error::Unauthorized { ids, .. }
            | Error::Forbidden { ids, .. }
            | Error::RateLimited { ids, .. }
            | Error::Status { ids, .. }
            | Error::EmptyBody { ids, .. }
            | Error::Decode { ids, .. }
            | Error::TooLarge { ids, .. }
            | Error::JobStillRunning { ids, .. } => Some(ids),
            Error::Fenced | Error::Transport { .. } | Error::Config(_) => None,
        }
    }

    /// The response's `ActivityId` header, when there was a response carrying one.
    pub fn activity_id(&self) -> Option<&str> {
        self.ids().and_then(|i| i.activity_id.as_deref())
    }

    /// The response's `X-GitHub-Request-Id` header, when there was a response carrying one.
    pub fn request_id(&self) -> Option<&str> {
        self.ids().and_then(|i| i.request_id.as_deref())
    }

    /// The HTTP status behind the error, when there was a response.
    pub fn status(&self) -> Option<u16> {
        Some(match self {
            Error::Conflict { .. } => 409,
            Error::ScaleSetNotFound { .. } | Error::SessionGone { .. } => 404,
            Error::Unauthorized { .. } => 401,
            Error::Forbidden { .. } => 403,
            Error::RateLimited { status, .. } => *status,
            Error::Status { status, .. } => *status,
            Error::EmptyBody { .. } | Error::Decode { .. } | Error::TooLarge { .. } => 200,
            Error::JobStillRunning { .. } => 400,
            Error::Fenced | Error::Transport { .. } | Error::Config(_) => return None,
        })
    }

    /// What the retry layer retries (reference §1.8): transport errors except a refused
    /// certificate, 429, and 5xx except 501.
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            Error::Transport { source, .. } => !is_certificate_error(source),
            Error::RateLimited { .. } => true,
            Error::Status { status, .. } => *status >= 500 && *status != 501,
            _ => false,
        }
    }

    /// `Retry-After` to honour (rate limits and 503 only).
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after, .. } => *retry_after,
            Error::Status { status: 503, retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A TLS certificate the verifier refused: retrying cannot help (go-retryablehttp does not).
fn is_certificate_error(e: &reqwest::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(rustls::Error::InvalidCertificate(_)) = err.downcast_ref::<rustls::Error>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(rustls::Error::InvalidCertificate(_)) = inner.downcast_ref::<rustls::Error>()
        {
            return true;
        }
        cur = err.source();
    }
    false
}
