//! `githubConfigUrl` → scope and GitHub REST API base (reference §1.1).
//!
//! Hosted GitHub (`github.com`, `www.github.com`, `*.ghe.com`, `github.localhost`) serves REST on
//! `api.<host>` with no path prefix; any other host is GHES, served at `<host>/api/v3`. The env var
//! `GITHUB_ACTIONS_FORCE_GHES` (any value) forces the GHES form. Host matching is
//! case-insensitive, as in the scaleset client.

use super::error::Error;
use reqwest::Url;

/// What the config URL points at, which picks the registration-token path (reference §1.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Enterprise(String),
    Organization(String),
    Repository { owner: String, repo: String },
}

/// A parsed `githubConfigUrl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The URL exactly as configured, trailing `/` trimmed: sent in the runner-registration body.
    pub config_url: String,
    pub scope: Scope,
    /// `scheme://api.<host[:port]>` or `scheme://<host[:port]>/api/v3`, no trailing `/`.
    pub api_base: String,
    /// Whether the hosted (github.com) layout was chosen.
    pub hosted: bool,
}

impl Layout {
    /// Parses `url`; `force_ghes` is whether `GITHUB_ACTIONS_FORCE_GHES` is set. Errors name the URL.
    pub fn parse(url: &str, force_ghes: bool) -> Result<Layout, Error> {
        let trimmed = url.trim().trim_end_matches('/');
        let bad = |why: &str| Error::Config(format!("configure_url {url:?}: {why}"));
        if trimmed.is_empty() {
            return Err(bad("empty"));
        }
        let parsed = Url::parse(trimmed).map_err(|e| bad(&format!("not a URL ({e})")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(bad("the scheme must be http or https"));
        }
        let host = parsed.host_str().filter(|h| !h.is_empty()).ok_or_else(|| bad("no host"))?.to_ascii_lowercase();
        let segments: Vec<&str> = parsed.path().split('/').filter(|s| !s.is_empty()).collect();
        let scope = match segments.as_slice() {
            [org] => Scope::Organization((*org).to_string()),
            [kind, ent] if kind.eq_ignore_ascii_case("enterprises") => Scope::Enterprise((*ent).to_string()),
            [owner, repo] => Scope::Repository { owner: (*owner).to_string(), repo: (*repo).to_string() },
            _ => return Err(bad("invalid config URL, should point to an enterprise, org, or repository")),
        };
        let port = parsed.port().map(|p| format!(":{p}")).unwrap_or_default();
        let hosted = !force_ghes && is_hosted(&host);
        let api_base = if hosted {
            let h = host.strip_prefix("www.").filter(|h| *h == "github.com").unwrap_or(&host);
            format!("{}://api.{h}{port}", parsed.scheme())
        } else {
            format!("{}://{host}{port}/api/v3", parsed.scheme())
        };
        Ok(Layout { config_url: trimmed.to_string(), scope, api_base, hosted })
    }

    /// `POST {api}{path}` for the registration token (reference §1.4).
    pub fn registration_token_url(&self) -> String {
        let path = match &self.scope {
            Scope::Organization(org) => format!("/orgs/{org}"),
            Scope::Enterprise(ent) => format!("/enterprises/{ent}"),
            Scope::Repository { owner, repo } => format!("/repos/{owner}/{repo}"),
        };
        format!("{}{path}/actions/runners/registration-token", self.api_base)
    }

    pub fn installation_token_url(&self, installation_id: i64) -> String {
        format!("{}/app/installations/{installation_id}/access_tokens", self.api_base)
    }

    pub fn runner_registration_url(&self) -> String {
        format!("{}/actions/runner-registration", self.api_base)
    }
}

fn is_hosted(host: &str) -> bool {
    matches!(host, "github.com" | "www.github.com" | "github.localhost") || host.ends_with(".ghe.com")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(url: &str) -> Layout {
        Layout::parse(url, false).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    fn hosted_hosts_use_the_api_subdomain_without_api_v3() {
        assert_eq!(p("https://github.com/acme").api_base, "https://api.github.com");
        assert_eq!(p("https://www.github.com/acme").api_base, "https://api.github.com");
        assert_eq!(p("https://GitHub.com/acme/").api_base, "https://api.github.com");
        assert_eq!(p("https://tenant.ghe.com/acme").api_base, "https://api.tenant.ghe.com");
        assert_eq!(p("http://github.localhost:8080/acme").api_base, "http://api.github.localhost:8080");
        assert!(p("https://github.com/acme").hosted);
    }

    #[test]
    fn other_hosts_are_ghes_with_api_v3() {
        let l = p("https://ghes.example.com/acme");
        assert_eq!(l.api_base, "https://ghes.example.com/api/v3");
        assert!(!l.hosted);
        assert_eq!(p("http://127.0.0.1:41234/acme").api_base, "http://127.0.0.1:41234/api/v3");
        // Look-alikes are not hosted.
        assert_eq!(p("https://notgithub.com/acme").api_base, "https://notgithub.com/api/v3");
        assert_eq!(p("https://ghe.com/acme").api_base, "https://ghe.com/api/v3");
    }

    #[test]
    fn force_ghes_overrides_hosted_detection() {
        let l = Layout::parse("https://github.com/acme", true).unwrap();
        assert_eq!(l.api_base, "https://github.com/api/v3");
        assert!(!l.hosted);
    }

    #[test]
    fn scopes_pick_the_registration_token_path() {
        let org = p("https://github.com/acme");
        assert_eq!(org.scope, Scope::Organization("acme".into()));
        assert_eq!(org.registration_token_url(), "https://api.github.com/orgs/acme/actions/runners/registration-token");
        let ent = p("https://ghes.example/Enterprises/big");
        assert_eq!(ent.scope, Scope::Enterprise("big".into()));
        assert_eq!(
            ent.registration_token_url(),
            "https://ghes.example/api/v3/enterprises/big/actions/runners/registration-token"
        );
        let repo = p("https://github.com/acme/app/");
        assert_eq!(repo.scope, Scope::Repository { owner: "acme".into(), repo: "app".into() });
        assert_eq!(
            repo.registration_token_url(),
            "https://api.github.com/repos/acme/app/actions/runners/registration-token"
        );
        assert_eq!(repo.config_url, "https://github.com/acme/app");
        assert_eq!(org.runner_registration_url(), "https://api.github.com/actions/runner-registration");
        assert_eq!(org.installation_token_url(7), "https://api.github.com/app/installations/7/access_tokens");
    }

    #[test]
    fn bad_urls_are_refused_naming_the_url() {
        for bad in [
            "",
            "github.com/acme",
            "ftp://github.com/acme",
            "https://github.com",
            "https://github.com/",
            "https://github.com/a/b/c",
            "https:///acme",
            "not a url",
        ] {
            let e = Layout::parse(bad, false).expect_err(bad).to_string();
            assert!(e.contains("configure_url") && e.contains(&format!("{bad:?}")), "{bad:?} → {e}");
        }
        let e = Layout::parse("https://github.com/a/b/c", false).unwrap_err().to_string();
        assert!(e.contains("should point to an enterprise, org, or repository"), "{e}");
    }
}
