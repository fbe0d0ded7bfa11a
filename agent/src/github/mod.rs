//! The GitHub side: ARC's client for the Actions scale-set service, rebuilt in Rust
//! (reference §1–§4, §8; DESIGN §5.2–§5.3, §5.13).
//!
//! ```text
//!  GitHubSettings ─▶ layout.rs   githubConfigUrl → scope, REST API base (§1.1)
//!                   jwt.rs      App JWT (RS256, ring) · admin-token `exp` read unverified (§1.2, §1.6)
//!                   client.rs   Client: auth chain → admin token (mutex-serialised refresh)
//!                                 admin calls   Bearer admin · ?api-version=6.0-preview · JSON
//!                                 queue calls   Bearer queue token · Accept api-version · capacity
//!                                 every attempt: Gate::check() first (holder-only calls) → reqwest
//!                                 retries (backon, jitter, Retry-After) except POST …/sessions
//!                   error.rs    Error: typed, carries ActivityId / X-GitHub-Request-Id
//!                   decode.rs   tolerant decoding into the wire model (`arcfed_core::github`)
//! ```
//!
//! The queue URL belongs to the session object (DESIGN §5.13): polls and acks use exactly the
//! `messageQueueUrl` of the latest create/refresh, which may be on another host and change on
//! every refresh; a 401 on the queue refreshes the session and replaces it in place.

mod client;
mod decode;
mod error;
mod jwt;
mod layout;

pub use arcfed_core::github as wire;
pub use client::{
    ACCEPT_QUEUE, API_VERSION, Client, HOLDER_CONNECT_TIMEOUT, MAX_BODY_BYTES, OWNER_HEADER, RetryPolicy,
    SESSION_CONFLICT_TYPE, ZERO_SESSION_ID, parse_retry_after,
};
pub use decode::job_messages;
/// The decoders of GitHub's session and long-poll answers (the fuzz tests drive them directly).
pub use decode::{envelope as decode_envelope, session as decode_session};
pub use error::{Error, RequestIds};
pub use jwt::{app_jwt, unverified_exp};
pub use layout::{Layout, Scope};

/// How this cluster authenticates to GitHub. Credentials never leave the cluster (DESIGN §6.7).
#[derive(Clone)]
pub enum Credentials {
    /// A personal access token, sent as `Authorization: Bearer <pat>`.
    Pat(String),
    /// A GitHub App: RS256 JWT → installation token → registration token → admin token.
    App { app_id: String, installation_id: i64, private_key_pem: String },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Pat(_) => f.write_str("Pat(<redacted>)"),
            Credentials::App { app_id, installation_id, .. } => {
                write!(f, "App {{ app_id: {app_id}, installation_id: {installation_id}, key: <redacted> }}")
            }
        }
    }
}

/// `--github-resolve HOST:PORT:ADDR`: connect to ADDR for HOST (split-horizon DNS, tests).
///
/// reqwest overrides DNS per host name, not per (host, port): the URL's port is always used,
/// and entries for one host with several ports all apply to every port of that host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolve {
    pub host: String,
    pub port: u16,
    pub addr: std::net::IpAddr,
}

/// Everything the client needs, validated by `config`.
#[derive(Clone, Debug)]
pub struct GitHubSettings {
    /// `githubConfigUrl` exactly as configured (trailing `/` trimmed).
    pub configure_url: String,
    pub credentials: Credentials,
    /// Extra root CA (PEM), from the listener config's `server_root_ca`.
    pub root_ca_pem: Option<String>,
    pub resolve: Vec<Resolve>,
    pub scale_set_id: i64,
}

/// The fence, as the GitHub client sees it: checked immediately before every attempt of a
/// holder-only call (session create/delete/refresh, poll, ack, acquire, acquirable jobs),
/// including each retry, so no request leaves after the lease stopped covering it.
pub trait Gate: Send + Sync {
    fn check(&self) -> Result<(), Fenced>;
    /// The `ownerName` of the holder this request is made for (`arcfed/<cluster>/<member>/t<token>`),
    /// sent as `X-Arcfed-Owner` so GitHub's side (and our emulator's timeline) can tell which
    /// fencing token every holder-only request belongs to. `None`: not a fenced holder's request.
    fn owner(&self) -> Option<String> {
        None
    }
}

/// The gate refused: the holder's fence has ended (or it never held).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fenced;

impl std::fmt::Display for Fenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fenced: the lease no longer covers holder-only requests")
    }
}

impl std::error::Error for Fenced {}

/// A gate that always allows: standalone mode, and best-effort deletes of one's own stale
/// sessions that DESIGN §5 allows any member to make.
#[derive(Debug, Clone, Copy, Default)]
pub struct Open;

impl Gate for Open {
    fn check(&self) -> Result<(), Fenced> {
        Ok(())
    }
}
