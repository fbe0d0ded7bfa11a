//! The GitHub side: ARC's client for the Actions scale-set service, rebuilt in Rust.
//!
//! (Skeleton: the interface the holder and the config agree on; the client is being written.)

pub use arcfed_core::github as wire;

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
