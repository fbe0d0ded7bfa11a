//! Configuration: what is fixed at start ([`EmulatorConfig`]) and what the drills change at
//! runtime ([`Settings`], patched through `PUT /_emulator/config`).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// How jobs reach a scale set (reference §2.12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// github.com: the service assigns directly (`JobAssigned`, `runnerRequestId` 0, GUID `jobId`).
    Dotcom,
    /// GHES: `JobAvailable`, then the listener must `acquirejobs` with its queue token.
    Ghes,
}

/// Where the emulated GitHub serves its APIs (reference §1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// GitHub Enterprise Server: one host, REST under `/api/v3`, the Actions service under
    /// `/_services/actions/`, queue URLs that carry the scale set and session ids.
    Ghes,
    /// github.com: the config URL is `http://github.localhost:<api port>/<org>`, REST is served
    /// at the root as `api.github.localhost` serves it, and the Actions service (`/rest/`) and
    /// the message queue live on a second listener, `broker.github.localhost:<broker port>`.
    Dotcom,
}

/// What a credential over its secondary rate limit gets (GitHub sends both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum RateLimitStatus {
    #[serde(rename = "403")]
    #[value(name = "403")]
    Forbidden,
    #[serde(rename = "429")]
    #[value(name = "429")]
    TooMany,
}

impl RateLimitStatus {
    pub fn code(self) -> u16 {
        match self {
            Self::Forbidden => 403,
            Self::TooMany => 429,
        }
    }
}

/// What the abandoned-session TTL counts from (undocumented by GitHub, reference §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SessionTtlFrom {
    /// A session expires `session_ttl` after it was opened, polled or not (adversarial: a
    /// healthy listener loses its session and sees 401 then 404 on refresh).
    Creation,
    /// A session expires `session_ttl` after its last poll; a poll in flight keeps it alive.
    LastPoll,
}

/// How `lastMessageId` behaves across sessions (undocumented, reference §2.11 and §10.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Cursor {
    /// The cursor is the request's `lastMessageId`: a new session polling from 0 gets every
    /// undeleted message again (observed behaviour).
    PerSession,
    /// The service remembers the highest id it delivered on the scale set and never goes
    /// back: messages a predecessor polled but did not delete are lost to its successor
    /// (adversarial).
    PerScaleSet,
}

/// Whether a session may be deleted with another credential's admin token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CrossCredentialDelete {
    /// Any valid admin token may delete any session (adversarial: another cluster can kill
    /// the holder's session).
    Allow,
    /// Only an admin token minted for the credential (PAT or App installation) that opened
    /// the session may delete it; others get 403 `AccessDeniedException`.
    Deny,
}

/// Everything the drills may change while the emulator runs. Durations are milliseconds
/// inside, humantime strings on the wire (`"300ms"`, `"90s"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    pub mode: Mode,
    #[serde(with = "humantime_serde_ms")]
    pub long_poll: Duration,
    #[serde(with = "humantime_serde_ms")]
    pub session_ttl: Duration,
    #[serde(with = "humantime_serde_ms")]
    pub queue_token_ttl: Duration,
    #[serde(with = "humantime_serde_ms")]
    pub admin_token_ttl: Duration,
    pub queue_token_survives_session_delete: bool,
    pub session_ttl_from: SessionTtlFrom,
    pub cursor: Cursor,
    pub cross_credential_delete: CrossCredentialDelete,
    /// Registered runners come online, take assigned jobs and finish them after the job's
    /// duration without anyone calling `/_emulator/runners/...`.
    pub auto_runners: bool,
    /// dotcom layout: whether a queue URL keeps working after a refresh gave a new one
    /// (false: the old URL gets 404, adversarial).
    pub queue_url_survives_refresh: bool,
    /// Admin and queue calls without an api-version (query, or the `Accept` header on queue
    /// calls) get 400 `VssVersionNotSpecifiedException`.
    pub strict_api_version: bool,
    /// An assigned job that no runner starts within this is cancelled (`JobCompleted`,
    /// `result: canceled`) and offered again, at most [`MAX_REASSIGNMENTS`] times. 0 = never.
    #[serde(with = "humantime_serde_ms")]
    pub assign_timeout: Duration,
    /// Every Nth envelope is preceded by one whose `body` is `""`, and carries a job message
    /// of an unknown `messageType` (github.com does both now and then). 0 = never.
    pub odd_messages_every: u32,
    /// Secondary rate limit: REST and admin requests per credential per sliding minute. 0 = off.
    pub rate_limit_per_minute: u32,
    pub rate_limit_status: RateLimitStatus,
    /// `acquirablejobs` exists (204/200); false: 404, as a service without it would answer.
    pub acquirable_jobs: bool,
}

/// How often a cancelled job is offered again (actions/scaleset's README: up to three times).
pub const MAX_REASSIGNMENTS: u32 = 3;

impl Default for Settings {
    fn default() -> Self {
        Self {
            mode: Mode::Dotcom,
            long_poll: Duration::from_secs(50),
            session_ttl: Duration::from_secs(90),
            queue_token_ttl: Duration::from_secs(50 * 60),
            admin_token_ttl: Duration::from_secs(10 * 60),
            queue_token_survives_session_delete: false,
            session_ttl_from: SessionTtlFrom::LastPoll,
            cursor: Cursor::PerSession,
            cross_credential_delete: CrossCredentialDelete::Allow,
            auto_runners: true,
            queue_url_survives_refresh: false,
            strict_api_version: false,
            assign_timeout: Duration::ZERO,
            odd_messages_every: 0,
            rate_limit_per_minute: 0,
            rate_limit_status: RateLimitStatus::Forbidden,
            acquirable_jobs: true,
        }
    }
}

/// A partial [`Settings`]: the body of `PUT /_emulator/config`. Absent fields stay as they are.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SettingsPatch {
    pub mode: Option<Mode>,
    #[serde(default, with = "humantime_serde_ms_opt")]
    pub long_poll: Option<Duration>,
    #[serde(default, with = "humantime_serde_ms_opt")]
    pub session_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde_ms_opt")]
    pub queue_token_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde_ms_opt")]
    pub admin_token_ttl: Option<Duration>,
    pub queue_token_survives_session_delete: Option<bool>,
    pub session_ttl_from: Option<SessionTtlFrom>,
    pub cursor: Option<Cursor>,
    pub cross_credential_delete: Option<CrossCredentialDelete>,
    pub auto_runners: Option<bool>,
    pub queue_url_survives_refresh: Option<bool>,
    pub strict_api_version: Option<bool>,
    #[serde(default, with = "humantime_serde_ms_opt")]
    pub assign_timeout: Option<Duration>,
    pub odd_messages_every: Option<u32>,
    pub rate_limit_per_minute: Option<u32>,
    pub rate_limit_status: Option<RateLimitStatus>,
    pub acquirable_jobs: Option<bool>,
}

impl Settings {
    pub fn apply(&mut self, p: SettingsPatch) {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = p.$f { self.$f = v; } )* };
        }
        set!(
            mode,
            long_poll,
            session_ttl,
            queue_token_ttl,
            admin_token_ttl,
            queue_token_survives_session_delete,
            session_ttl_from,
            cursor,
            cross_credential_delete,
            auto_runners,
            queue_url_survives_refresh,
            strict_api_version,
            assign_timeout,
            odd_messages_every,
            rate_limit_per_minute,
            rate_limit_status,
            acquirable_jobs
        );
    }
}

/// Fixed at start.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Organization in the printed `githubConfigUrl` (`<base>/<org>`).
    pub org: String,
    /// Repository scope: the config URL is `<base>/<org>/<repo>`.
    pub repo: Option<String>,
    /// Enterprise scope (wins over org and repo): the config URL is `<base>/enterprises/<name>`.
    pub enterprise: Option<String>,
    pub layout: Layout,
    /// The one GitHub App whose JWTs the installation-token endpoint accepts. None: every
    /// App JWT gets 401.
    pub app: Option<AppKey>,
    /// PATs accepted as `Bearer <pat>`. Each PAT is its own credential identity, so two
    /// "clusters" with different PATs are told apart by `cross_credential_delete`.
    pub pats: Vec<String>,
    /// PEM certificate chain and key: serve HTTPS instead of HTTP.
    pub tls: Option<TlsFiles>,
    /// Overrides the scheme://host:port the emulator advertises (behind a proxy or NAT);
    /// by default the listener's local address, with 0.0.0.0 shown as 127.0.0.1.
    pub advertise_url: Option<String>,
    /// Oldest timeline events are dropped beyond this many; the report's counters are kept
    /// incrementally and do not depend on the timeline.
    pub max_timeline_events: usize,
    pub settings: Settings,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A GitHub App as the emulator knows it: the `iss` its JWTs carry (App ID or Client ID) and
/// its RSA public key (DER `RSAPublicKey`), read from a PEM file by [`AppKey::from_pem_file`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppKey {
    pub id: String,
    pub public_key: Vec<u8>,
}

impl AppKey {
    /// `id` is what the App's JWTs carry as `iss`; `path` a PEM public key (or the App's
    /// private key, whose public half is used). See [`super::token::rsa_public_key_from_pem`].
    pub fn from_pem_file(id: &str, path: &std::path::Path) -> Result<Self, String> {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let public_key = super::token::rsa_public_key_from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self { id: id.to_string(), public_key })
    }
}

impl EmulatorConfig {
    /// The config URL's path: `enterprises/<e>`, `<org>/<repo>` or `<org>`.
    pub fn scope_path(&self) -> String {
        match (&self.enterprise, &self.repo) {
            (Some(e), _) => format!("enterprises/{e}"),
            (None, Some(r)) => format!("{}/{r}", self.org),
            (None, None) => self.org.clone(),
        }
    }

    /// The registration-token path that matches the scope (reference §1.4), without the API base.
    pub fn registration_token_path(&self) -> String {
        match (&self.enterprise, &self.repo) {
            (Some(e), _) => format!("enterprises/{e}/actions/runners/registration-token"),
            (None, Some(r)) => format!("repos/{}/{r}/actions/runners/registration-token", self.org),
            (None, None) => format!("orgs/{}/actions/runners/registration-token", self.org),
        }
    }
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            org: "arcfed".into(),
            repo: None,
            enterprise: None,
            layout: Layout::Ghes,
            app: None,
            pats: vec!["emulator-pat".into()],
            tls: None,
            advertise_url: None,
            max_timeline_events: 200_000,
            settings: Settings::default(),
        }
    }
}

/// Durations as humantime strings; numbers are read as milliseconds.
mod humantime_serde_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    pub(super) enum Raw {
        Ms(u64),
        Text(String),
    }

    pub(super) fn parse(raw: Raw) -> Result<Duration, String> {
        match raw {
            Raw::Ms(ms) => Ok(Duration::from_millis(ms)),
            Raw::Text(t) => humantime::parse_duration(&t).map_err(|e| format!("{t:?}: {e}")),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        parse(Raw::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

mod humantime_serde_ms_opt {
    use super::humantime_serde_ms::{Raw, parse};
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<Raw>::deserialize(d)? {
            None => Ok(None),
            Some(r) => parse(r).map(Some).map_err(serde::de::Error::custom),
        }
    }
}
