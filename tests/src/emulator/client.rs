//! A client that sends requests shaped exactly as ARC's (reference §1.7, §2): Go-sorted,
//! form-encoded queries with `api-version=6.0-preview`, the JSON User-Agent of the scaleset
//! library, `Content-Type: application/json` on admin calls, `X-ScaleSetMaxCapacity` and the
//! `Accept` api-version on queue calls. The conformance suite, the process test and the
//! benchmark drive the emulator through it; it returns raw responses so callers can check
//! status codes and bodies themselves.

use super::model::{RunnerScaleSet, Session};
use reqwest::Method;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{what}: unexpected status {status}: {body}")]
    Status { what: &'static str, status: u16, body: String },
    #[error("{what}: cannot decode body: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Usage(&'static str),
}

type Result<T> = std::result::Result<T, ClientError>;

/// A response, read in full.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body).map_err(|source| ClientError::Decode { what: "response", source })
    }

    /// The body as JSON, or `null`.
    pub fn value(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn expect(self, what: &'static str, status: u16) -> Result<Self> {
        if self.status == status {
            Ok(self)
        } else {
            Err(ClientError::Status { what, status: self.status, body: String::from_utf8_lossy(&self.body).into() })
        }
    }
}

/// Go's `url.Values.Encode`: sorted by key, form-encoded (space → `+`).
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    fn enc(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                b' ' => "+".into(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
    let mut v: Vec<_> = pairs.to_vec();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v.iter().map(|(k, val)| format!("{}={}", enc(k), enc(val))).collect::<Vec<_>>().join("&")
}

/// The scaleset library's JSON User-Agent (reference §1.7).
pub fn arc_user_agent(scale_set_id: i64) -> String {
    serde_json::json!({
        "system": "actions-runner-controller", "version": "0.14.2", "commit_sha": "emulated",
        "scale_set_id": scale_set_id, "subsystem": "ghalistener", "build_version": "v0.4.0",
        "build_commit_sha": "emulated", "kind": "scaleset"
    })
    .to_string()
}

/// An ARC-shaped client for one credential (a PAT).
#[derive(Clone)]
pub struct ArcClient {
    http: reqwest::Client,
    pub config_url: String,
    pub pat: String,
    pub user_agent: String,
    /// Filled by [`ArcClient::auth`].
    pub service_url: String,
    pub admin_token: String,
}

impl ArcClient {
    /// Installs the ring provider if none is installed (reqwest is built without one).
    pub fn new(config_url: &str, pat: &str) -> Result<Self> {
        Self::with_http(config_url, pat, Self::builder().build()?)
    }

    /// A reqwest builder with the settings ARC's client uses (5-minute timeout).
    pub fn builder() -> reqwest::ClientBuilder {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder().timeout(std::time::Duration::from_secs(300))
    }

    pub fn with_http(config_url: &str, pat: &str, http: reqwest::Client) -> Result<Self> {
        Ok(Self {
            http,
            config_url: config_url.trim_end_matches('/').to_string(),
            pat: pat.to_string(),
            user_agent: arc_user_agent(0),
            service_url: String::new(),
            admin_token: String::new(),
        })
    }

    /// A client for the dotcom layout: `resolve` maps `github.localhost`, `api.…` and
    /// `broker.…` to where the emulator listens ([`super::EmulatorHandle::resolve_overrides`]),
    /// as curl's `--resolve` or the agent's `--github-resolve` do.
    pub fn with_resolve(config_url: &str, pat: &str, resolve: &[(String, std::net::SocketAddr)]) -> Result<Self> {
        let mut b = Self::builder();
        for (host, addr) in resolve {
            b = b.resolve(host, *addr);
        }
        Self::with_http(config_url, pat, b.build()?)
    }

    /// The REST API base (reference §1.1): `scheme://api.<host>` for github.com,
    /// `github.localhost` and `*.ghe.com`, otherwise `scheme://host/api/v3` (GHES).
    pub fn api_base(&self) -> String {
        let after_scheme = self.config_url.find("://").map_or(0, |i| i + 3);
        let host_end = self.config_url[after_scheme..].find('/').map_or(self.config_url.len(), |i| i + after_scheme);
        let authority = &self.config_url[after_scheme..host_end];
        let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h).to_ascii_lowercase();
        let scheme = &self.config_url[..after_scheme];
        if host == "github.com" || host == "github.localhost" || host.ends_with(".ghe.com") {
            format!("{scheme}api.{authority}")
        } else if host == "www.github.com" {
            format!("{scheme}api.github.com")
        } else {
            format!("{}/api/v3", &self.config_url[..host_end])
        }
    }

    /// The config URL's path: `org`, `org/repo` or `enterprises/e`.
    fn scope(&self) -> &str {
        let after_scheme = self.config_url.find("://").map_or(0, |i| i + 3);
        self.config_url[after_scheme..].split_once('/').map_or("", |(_, p)| p)
    }

    /// The registration-token path for the config URL's scope (reference §1.4).
    pub fn registration_token_path(&self) -> String {
        let scope = self.scope();
        match scope.split('/').collect::<Vec<_>>().as_slice() {
            [e, name] if e.eq_ignore_ascii_case("enterprises") => {
                format!("enterprises/{name}/actions/runners/registration-token")
            }
            [org, repo] => format!("repos/{org}/{repo}/actions/runners/registration-token"),
            _ => format!("orgs/{scope}/actions/runners/registration-token"),
        }
    }

    /// `POST /app/installations/{id}/access_tokens` with an App JWT; on 201 the installation
    /// token becomes this client's credential (used by [`ArcClient::auth`]).
    pub async fn app_installation_token(&mut self, app_jwt: &str, installation: u64) -> Result<Resp> {
        let url = format!("{}/app/installations/{installation}/access_tokens", self.api_base());
        let r =
            self.send(Method::POST, &url, &format!("Bearer {app_jwt}"), None, "application/vnd.github+json").await?;
        if r.status == 201
            && let Some(t) = r.value()["token"].as_str()
        {
            self.pat = t.to_string();
        }
        Ok(r)
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        auth: &str,
        body: Option<&serde_json::Value>,
        ct: &str,
    ) -> Result<Resp> {
        let mut rb = self
            .http
            .request(method, url)
            .header("Authorization", auth)
            .header("User-Agent", &self.user_agent)
            .header("Content-Type", ct);
        rb = match body {
            Some(b) => rb.body(b.to_string()),
            None => rb,
        };
        let r = rb.send().await?;
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.bytes().await?.to_vec();
        Ok(Resp { status, headers, body })
    }

    /// `POST /{orgs/O|repos/O/R|enterprises/E}/actions/runners/registration-token` with the
    /// PAT (or installation token).
    pub async fn registration_token(&self) -> Result<Resp> {
        let url = format!("{}/{}", self.api_base(), self.registration_token_path());
        self.send(Method::POST, &url, &format!("Bearer {}", self.pat), None, "application/vnd.github.v3+json").await
    }

    /// `POST /actions/runner-registration` with `RemoteAuth <registration token>`.
    pub async fn runner_registration(&self, reg_token: &str) -> Result<Resp> {
        let url = format!("{}/actions/runner-registration", self.api_base());
        let body = serde_json::json!({"url": self.config_url, "runner_event": "register"});
        self.send(Method::POST, &url, &format!("RemoteAuth {reg_token}"), Some(&body), "application/json").await
    }

    /// The whole chain (§1.4–§1.5): stores the service URL and the admin token.
    pub async fn auth(&mut self) -> Result<()> {
        let reg = self.registration_token().await?.expect("registration-token", 201)?;
        let token = reg.value()["token"].as_str().unwrap_or_default().to_string();
        let r = self.runner_registration(&token).await?.expect("runner-registration", 200)?;
        let v = r.value();
        self.service_url = v["url"].as_str().unwrap_or_default().to_string();
        self.admin_token = v["token"].as_str().unwrap_or_default().to_string();
        if self.service_url.is_empty() || self.admin_token.is_empty() {
            return Err(ClientError::Usage("runner-registration returned no url or token"));
        }
        Ok(())
    }

    /// An admin call: `{service}{path}?{query + api-version, sorted}`, `Bearer <admin>`.
    pub async fn admin(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Result<Resp> {
        self.admin_with(&self.admin_token, method, path, query, body).await
    }

    /// Like [`ArcClient::admin`] with an explicit bearer token.
    pub async fn admin_with(
        &self,
        token: &str,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Result<Resp> {
        if self.service_url.is_empty() {
            return Err(ClientError::Usage("call auth() first"));
        }
        let mut q: Vec<(&str, &str)> = query.to_vec();
        q.push(("api-version", "6.0-preview"));
        let url = format!("{}{}?{}", self.service_url, path.trim_start_matches('/'), form_encode(&q));
        self.send(method, &url, &format!("Bearer {token}"), body, "application/json").await
    }

    /// Creates a scale set with ARC 0.14's body (labels, `RunnerSetting`, zero `createdOn`).
    pub async fn create_scale_set(&self, name: &str, group: i64) -> Result<RunnerScaleSet> {
        let body = serde_json::json!({
            "name": name, "runnerGroupId": group,
            "labels": [{"type": "System", "name": name}],
            "RunnerSetting": {"disableUpdate": true},
            "createdOn": "0001-01-01T00:00:00Z",
        });
        let r = self.admin(Method::POST, "_apis/runtime/runnerscalesets", &[], Some(&body)).await?;
        r.expect("create scale set", 200)?.json()
    }

    /// `POST …/sessions` with scaleset's body (zero `sessionId` included).
    pub async fn create_session(&self, set: i64, owner: &str) -> Result<Resp> {
        let body = serde_json::json!({"ownerName": owner, "sessionId": "00000000-0000-0000-0000-000000000000"});
        self.admin(Method::POST, &format!("_apis/runtime/runnerscalesets/{set}/sessions"), &[], Some(&body)).await
    }

    /// Opens a session or fails with its status.
    pub async fn open_session(&self, set: i64, owner: &str) -> Result<Session> {
        self.create_session(set, owner).await?.expect("create session", 200)?.json()
    }

    /// A long poll on the queue URL (its own query kept, `lastMessageId` added when > 0).
    pub async fn poll(
        &self,
        queue_url: &str,
        token: &str,
        last_message_id: i64,
        capacity: Option<i64>,
    ) -> Result<Resp> {
        let url = if last_message_id > 0 {
            let sep = if queue_url.contains('?') { '&' } else { '?' };
            format!("{queue_url}{sep}lastMessageId={last_message_id}")
        } else {
            queue_url.to_string()
        };
        let mut rb = self
            .http
            .get(url)
            .header("Authorization", format!("Bearer {token}"))
            .header("Accept", "application/json; api-version=6.0-preview")
            .header("User-Agent", &self.user_agent);
        if let Some(c) = capacity {
            rb = rb.header("X-ScaleSetMaxCapacity", c.to_string());
        }
        let r = rb.send().await?;
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.bytes().await?.to_vec();
        Ok(Resp { status, headers, body })
    }

    /// `DELETE` with `/{id}` inserted in the queue URL's path, its query kept (§2.11).
    pub async fn ack(&self, queue_url: &str, token: &str, message_id: i64) -> Result<Resp> {
        let (path, query) = queue_url.split_once('?').unwrap_or((queue_url, ""));
        let mut url = format!("{}/{message_id}", path.trim_end_matches('/'));
        if !query.is_empty() {
            url = format!("{url}?{query}");
        }
        self.send(Method::DELETE, &url, &format!("Bearer {token}"), None, "application/json").await
    }

    /// `acquirejobs` with the given bearer (the queue token, normally).
    pub async fn acquire(&self, set: i64, token: &str, ids: &[i64]) -> Result<Resp> {
        let body = serde_json::json!(ids);
        self.admin_with(
            token,
            Method::POST,
            &format!("_apis/runtime/runnerscalesets/{set}/acquirejobs"),
            &[],
            Some(&body),
        )
        .await
    }

    /// A `/_emulator/` side-channel call.
    pub async fn emulator(&self, method: Method, path: &str, body: Option<&serde_json::Value>) -> Result<Resp> {
        let after_scheme = self.config_url.find("://").map_or(0, |i| i + 3);
        let host_end = self.config_url[after_scheme..].find('/').map_or(self.config_url.len(), |i| i + after_scheme);
        let base = &self.config_url[..host_end];
        let url = format!("{base}/_emulator/{}", path.trim_start_matches('/'));
        self.send(method, &url, "", body, "application/json").await
    }
}
