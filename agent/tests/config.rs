//! Configuration, metrics and the admin server of `arcfed-agent`, as an operator meets them:
//! ARC's listener config JSON, flags and env, `--help`, `/metrics` text, `/live` and `/ready`.

use arcfed_agent::config::{
    Args, Backend, Config, ConfigError, LogFormat, Profile, TlsWatcher, parse_configure_url, parse_resolve,
};
use arcfed_agent::github::Credentials;
use arcfed_agent::http::{HttpState, Readiness};
use arcfed_agent::metrics::{GhaMetricsSpec, MetricLabels, Metrics, WorkflowRef};
use arcfed_core::github::{JobMessage, Statistics};
use clap::{CommandFactory, Parser};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

fn sample(name: &str) -> Value {
    let text = std::fs::read_to_string(examples().join(name)).expect("read sample");
    serde_json::from_str(&text).expect("sample is JSON")
}

/// A fresh App private key (PEM), so no key is checked in.
fn app_key_pem() -> String {
    rcgen::KeyPair::generate().expect("key").serialize_pem()
}

/// A temp dir holding one listener config file.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture { dir: tempfile::tempdir().expect("tempdir") }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    fn listener(&self, v: &Value) -> PathBuf {
        self.write("config.json", &v.to_string())
    }

    /// Self-signed agent certificate for `cluster` in cert-manager's layout.
    fn agent_tls(&self, cluster: &str) -> [String; 3] {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names =
            vec![rcgen::SanType::URI(format!("spiffe://arcfed/agent/{cluster}").try_into().expect("uri"))];
        let cert = params.self_signed(&key).expect("cert");
        let dir = self.dir.path().join(format!("tls-{cluster}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let w = |n: &str, s: &str| {
            let p = dir.join(n);
            std::fs::write(&p, s).expect("write");
            p.display().to_string()
        };
        [w("tls.crt", &cert.pem()), w("tls.key", &key.serialize_pem()), w("ca.crt", &cert.pem())]
    }
}

fn parse(argv: &[&str]) -> Result<Config, ConfigError> {
    let mut full = vec!["arcfed-agent", "--owner-name", "pod-1"];
    full.extend_from_slice(argv);
    Config::from_args(Args::try_parse_from(full).expect("clap parses"))
}

fn parse_file(v: &Value, extra: &[&str]) -> Result<Config, ConfigError> {
    let fx = Fixture::new();
    let path = fx.listener(v);
    let p = path.display().to_string();
    let mut argv = vec!["--listener-config", p.as_str()];
    argv.extend_from_slice(extra);
    parse(&argv)
}

/// The GitHub settings as flags, for configs without a file.
const FLAGS: &[&str] = &[
    "--github-config-url",
    "https://github.com/org",
    "--github-token",
    "ghp_x",
    "--scale-set-id",
    "5",
    "--ers-namespace",
    "ns",
    "--ers-name",
    "ers-a",
];

#[test]
fn the_sample_listener_config_parses_as_arc_writes_it() {
    let cfg = parse_file(&sample("listener-config.json"), &[]).expect("valid");
    assert_eq!(cfg.github.configure_url, "https://github.com/my-org");
    assert!(matches!(&cfg.github.credentials, Credentials::Pat(t) if t.starts_with("ghp_")));
    assert_eq!(cfg.github.scale_set_id, 1);
    assert_eq!((cfg.ers_namespace.as_str(), cfg.ers_name.as_str()), ("arc-runners", "linux-eu-x7k2p"));
    assert_eq!(cfg.scale_set_name, "linux-eu");
    assert_eq!((cfg.min_runners, cfg.max_runners), (1, 20));
    assert_eq!(cfg.admin_listen, Some("0.0.0.0:8080".parse().expect("addr")));
    assert_eq!(cfg.metrics_path, "/metrics");
    assert_eq!(cfg.log.format, LogFormat::Text);
    assert!(cfg.log.filter.contains("arcfed_agent=debug"), "{}", cfg.log.filter);
    assert_eq!(cfg.metrics_labels.organization, "my-org");
    assert_eq!(cfg.metrics_labels.name, "linux-eu-x7k2p");
    assert_eq!(cfg.metrics_labels.namespace, "arc-runners");
    assert!(cfg.standalone());
    assert_eq!(cfg.cluster, "standalone");
    assert_eq!(cfg.owner_name, "pod-1");
    assert_eq!(cfg.runner_backend, Backend::Kube);
    assert_eq!(cfg.lease_ttl, Duration::from_secs(3));
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
    assert_eq!(cfg.gha_metrics, GhaMetricsSpec::arc_default());
    let text = Metrics::from_config(&cfg).encode();
    let want = r#"gha_max_runners{enterprise="",organization="my-org",repository="",name="linux-eu-x7k2p",namespace="arc-runners"} 20"#;
    assert!(text.contains(want), "{text}");
}

/// ARC before 0.8 writes camelCase keys with zero values for unset ones (what ARC v0.27.6's
/// controller wrote in the lab); the agent reads them as the later keys.
#[test]
fn arc_before_0_8_camel_case_config_is_read() {
    let v = serde_json::json!({
        "configureUrl": "https://github.com/my-org", "appID": 0, "appInstallationID": 0, "appPrivateKey": "",
        "token": "ghp_legacy", "ephemeralRunnerSetNamespace": "arc-runners", "ephemeralRunnerSetName": "lab-runners-x7k2p",
        "maxRunners": 10, "minRunners": 0, "runnerScaleSetId": 7, "runnerScaleSetName": "lab-runners",
        "serverRootCA": "", "logLevel": "debug", "logFormat": "text", "metricsAddr": "0", "metricsEndpoint": ""
    });
    let cfg = parse_file(&v, &[]).expect("valid");
    assert_eq!(cfg.github.configure_url, "https://github.com/my-org");
    assert!(matches!(&cfg.github.credentials, Credentials::Pat(t) if t == "ghp_legacy"));
    assert_eq!(cfg.github.scale_set_id, 7);
    assert_eq!((cfg.ers_namespace.as_str(), cfg.ers_name.as_str()), ("arc-runners", "lab-runners-x7k2p"));
    assert_eq!((cfg.min_runners, cfg.max_runners), (0, 10));
    assert_eq!(cfg.admin_listen, None, "metricsAddr \"0\" is ARC's chart turning metrics off");
    // A file with today's keys is not rewritten, even with a stray legacy key in it.
    let mut today = sample("listener-config.json");
    today["token"] = "ghp_other".into();
    let cfg = parse_file(&today, &[]).expect("valid");
    assert!(matches!(&cfg.github.credentials, Credentials::Pat(t) if t.starts_with("ghp_") && t != "ghp_other"));
}

#[test]
fn the_app_sample_parses_once_it_holds_a_real_key() {
    let mut v = sample("listener-config-app.json");
    let placeholder = parse_file(&v, &[]).expect_err("placeholder key refused");
    assert!(placeholder.to_string().contains("github_app_private_key"), "{placeholder}");

    v["github_app_private_key"] = json!(app_key_pem());
    let cfg = parse_file(&v, &[]).expect("valid");
    match &cfg.github.credentials {
        Credentials::App { app_id, installation_id, .. } => {
            assert_eq!((app_id.as_str(), *installation_id), ("123456", 7_890_123));
        }
        other => panic!("expected App credentials, got {other:?}"),
    }
    // ARC's `json` keeps ARC's log keys (severity, ts, logger, message).
    assert_eq!(cfg.log.format, LogFormat::Arc);
    assert_eq!(cfg.metrics_labels.repository, "my-repo");
    assert_eq!(cfg.max_runners, 2_147_483_647);
    assert_eq!(cfg.gha_metrics.gauges.len(), 2);
    assert_eq!(cfg.gha_metrics.histograms["gha_job_startup_duration_seconds"].buckets, vec![1.0, 10.0, 60.0, 300.0]);
}

#[test]
fn each_validation_error_names_its_key() {
    let base = sample("listener-config.json");
    let key = app_key_pem();
    let cases: Vec<(&str, Value, &str)> = vec![
        ("configure_url", json!(""), "configure_url"),
        ("configure_url", json!("https://github.com/a/b/c"), "configure_url"),
        ("configure_url", json!("not a url"), "configure_url"),
        ("ephemeral_runner_set_namespace", json!(""), "ephemeral_runner_set_namespace"),
        ("ephemeral_runner_set_name", Value::Null, "ephemeral_runner_set_name"),
        ("runner_scale_set_id", json!(0), "runner_scale_set_id"),
        ("max_runners", json!(0), "max_runners"),
        ("max_runners", json!("ten"), "max_runners"),
        ("min_runners", json!(-1), "min_runners"),
        ("github_app_id", json!("42"), "github_token"),
        ("github_token", json!(""), "github_token"),
        ("log_level", json!("verbose"), "log_level"),
        ("log_format", json!("xml"), "log_format"),
        ("metrics_addr", json!("everywhere"), "metrics_addr"),
        ("metrics_endpoint", json!("metrics"), "metrics_endpoint"),
        ("server_root_ca", json!("not pem"), "server_root_ca"),
        ("metrics", json!({"histograms": {"gha_job_startup_duration_seconds": {"buckets": [5, 1]}}}), "metrics"),
    ];
    for (k, value, want) in cases {
        let mut v = base.clone();
        v[k] = value.clone();
        let err = parse_file(&v, &[]).expect_err(&format!("{k}={value} must fail"));
        assert!(err.to_string().contains(want), "{k}={value}: {err} should name {want}");
    }

    // Incomplete App credentials name the missing part.
    let mut app = base.clone();
    app.as_object_mut().expect("object").remove("github_token");
    app["github_app_id"] = json!("42");
    app["github_app_private_key"] = json!(key);
    let err = parse_file(&app, &[]).expect_err("no installation id");
    assert!(err.to_string().contains("github_app_installation_id"), "{err}");
    app["github_app_installation_id"] = json!(9);
    app["github_app_private_key"] = json!("garbage");
    let err = parse_file(&app, &[]).expect_err("bad key");
    assert!(err.to_string().contains("github_app_private_key"), "{err}");
}

#[test]
fn vault_keys_are_refused_with_a_clear_error() {
    let mut v = sample("listener-config.json");
    v["vault_type"] = json!("azure_key_vault");
    v["vault_lookup_key"] = json!("gh-secret");
    let err = parse_file(&v, &[]).expect_err("vault refused").to_string();
    assert!(err.contains("vault_type azure_key_vault is not supported by arcfed-agent"), "{err}");

    let mut v = sample("listener-config.json");
    v["azure_key_vault"] = json!({"tenant_id": "t", "client_id": "c", "url": "u", "certificate_path": "/p"});
    let err = parse_file(&v, &[]).expect_err("vault refused").to_string();
    assert!(err.contains("not supported by arcfed-agent"), "{err}");
}

#[test]
fn unknown_keys_are_ignored_with_a_warning() {
    let mut v = sample("listener-config.json");
    v["future_knob"] = json!(true);
    let cfg = parse_file(&v, &[]).expect("valid");
    assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
    assert!(cfg.warnings[0].contains("future_knob"));
}

#[test]
fn flags_override_file_keys() {
    let mut app = sample("listener-config-app.json");
    app["github_app_private_key"] = json!(app_key_pem());
    let cfg = parse_file(
        &app,
        &[
            "--max-runners",
            "7",
            "--ers-name",
            "other-ers",
            "--github-token",
            "ghp_flag",
            "--admin-listen",
            "off",
            "--log-level",
            "warn",
            "--log-format",
            "text",
            "--metrics-path",
            "/m",
        ],
    )
    .expect("valid");
    assert_eq!(cfg.max_runners, 7);
    assert_eq!(cfg.ers_name, "other-ers");
    assert_eq!(cfg.metrics_labels.name, "other-ers");
    // A credential flag replaces the file's credentials as a whole (no PAT+App mix).
    assert!(matches!(&cfg.github.credentials, Credentials::Pat(t) if t == "ghp_flag"));
    assert_eq!(cfg.admin_listen, None);
    assert_eq!(cfg.log.filter, "warn");
    assert_eq!(cfg.log.format, LogFormat::Text);
    assert_eq!(cfg.metrics_path, "/m");
}

#[test]
fn flags_alone_supply_every_setting() {
    let cfg = parse(FLAGS).expect("valid");
    assert_eq!(cfg.github.scale_set_id, 5);
    assert_eq!(cfg.max_runners, 2_147_483_647);
    assert_eq!(cfg.min_runners, 0);
    assert_eq!(cfg.admin_listen, Some("0.0.0.0:8080".parse().expect("addr")));
    assert_eq!(cfg.log.filter, "info");
    assert_eq!(cfg.coordinator_lost_for, Duration::from_secs(60));
    assert_eq!(cfg.holder_stall, Duration::from_secs(15));
    assert_eq!((cfg.weight, cfg.priority), (1, 0));
    assert!(!cfg.allow_drills);

    let mut no_url = FLAGS.to_vec();
    no_url.drain(0..2);
    let err = parse(&no_url).expect_err("url required").to_string();
    assert!(err.contains("--github-config-url") && err.contains("configure_url"), "{err}");
}

#[test]
fn a_missing_listener_config_file_names_the_flag_and_path() {
    let err = parse(&["--listener-config", "/nonexistent/config.json"]).expect_err("missing").to_string();
    assert!(err.contains("--listener-config") && err.contains("/nonexistent/config.json"), "{err}");
    let fx = Fixture::new();
    let p = fx.write("bad.json", "[1, 2]");
    let err = parse(&["--listener-config", &p.display().to_string()]).expect_err("not an object").to_string();
    assert!(err.contains("--listener-config") && err.contains("not a JSON object"), "{err}");
}

#[test]
fn federation_needs_a_cluster_matching_its_certificate() {
    let fx = Fixture::new();
    let [cert, key, ca] = fx.agent_tls("eu-1");
    let with = |extra: &[&str]| {
        let mut argv = FLAGS.to_vec();
        argv.extend_from_slice(extra);
        parse(&argv)
    };
    let tls = ["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca];

    let err = with(&["--coordinator", "c1:7001"]).expect_err("cluster required").to_string();
    assert!(err.contains("--cluster"), "{err}");
    let err = with(&["--coordinator", "c1:7001", "--cluster", "eu-1"]).expect_err("tls required").to_string();
    assert!(err.contains("--tls-cert") && err.contains("--tls-key") && err.contains("--tls-ca"), "{err}");
    let err = with(&["--coordinator", "c1", "--cluster", "eu-1"]).expect_err("port").to_string();
    assert!(err.contains("--coordinator"), "{err}");
    let err = with(&["--cluster", "eu/1"]).expect_err("name").to_string();
    assert!(err.contains("--cluster"), "{err}");

    let mut argv = vec!["--coordinator", "c1:7001,c2:7001", "--cluster", "us-2"];
    argv.extend_from_slice(&tls);
    let err = with(&argv).expect_err("identity mismatch").to_string();
    assert!(err.contains("--cluster") && err.contains("spiffe://arcfed/agent/eu-1"), "{err}");

    let mut argv =
        vec!["--coordinator", "c1:7001", "--coordinator", "c2:7001", "--cluster", "eu-1", "--profile", "wan"];
    argv.extend_from_slice(&tls);
    let cfg = with(&argv).expect("valid");
    assert_eq!(cfg.coordinators, vec!["c1:7001".to_string(), "c2:7001".to_string()]);
    assert_eq!(cfg.tls.as_ref().map(|t| t.cert.display().to_string()), Some(cert.clone()));
    assert_eq!(cfg.profile, Profile::Wan);
    assert_eq!(cfg.lease_ttl, Duration::from_secs(10));
    argv.extend(["--lease-ttl", "4s"]);
    assert_eq!(with(&argv).expect("valid").lease_ttl, Duration::from_secs(4));

    let missing = ["--tls-cert", "/nonexistent/tls.crt", "--tls-key", &key, "--tls-ca", &ca];
    let mut argv = vec!["--coordinator", "c1:7001", "--cluster", "eu-1"];
    argv.extend_from_slice(&missing);
    let err = with(&argv).expect_err("missing cert").to_string();
    assert!(err.contains("--tls-cert") && err.contains("/nonexistent/tls.crt"), "{err}");
}

#[test]
fn ours_checks_name_their_flags() {
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--weight", "-1"], "--weight"),
        (vec!["--runner-backend", "sim"], "--sim-state-file"),
        (vec!["--sim-state-file", "/tmp/s"], "--sim-state-file"),
        (vec!["--github-resolve", "github.com:443"], "--github-resolve"),
        (vec!["--lease-ttl", "10ms"], "--lease-ttl"),
        (vec!["--log-level", "info,=[bad"], "--log-level"),
        (vec!["--admin-listen", "localhost"], "--admin-listen"),
    ];
    for (extra, want) in cases {
        let mut argv = FLAGS.to_vec();
        argv.extend_from_slice(&extra);
        let err = parse(&argv).expect_err(&format!("{extra:?} must fail")).to_string();
        assert!(err.contains(want), "{extra:?}: {err} should name {want}");
    }
    let mut argv = FLAGS.to_vec();
    argv.extend(["--runner-backend", "sim", "--sim-state-file", "/tmp/s", "--priority", "-3", "--allow-drills"]);
    let cfg = parse(&argv).expect("valid");
    assert_eq!(cfg.runner_backend, Backend::Sim { state_file: "/tmp/s".into() });
    assert_eq!(cfg.priority, -3);
    assert!(cfg.allow_drills);
}

#[test]
fn github_resolve_reads_curl_syntax() {
    let r = parse_resolve("GitHub.example:443:10.0.0.7").expect("v4");
    assert_eq!((r.host.as_str(), r.port, r.addr.to_string().as_str()), ("github.example", 443, "10.0.0.7"));
    let r = parse_resolve("api.github.com:443:[::1]").expect("bracketed v6");
    assert_eq!(r.addr.to_string(), "::1");
    let r = parse_resolve("api.github.com:443:fd00::2").expect("bare v6");
    assert_eq!(r.addr.to_string(), "fd00::2");
    for bad in ["", "h:443", "h:x:1.2.3.4", ":443:1.2.3.4", "h:443:name"] {
        assert!(parse_resolve(bad).is_err(), "{bad:?} must be refused");
    }
    let mut argv = FLAGS.to_vec();
    argv.extend(["--github-resolve", "a.example:443:10.0.0.1,b.example:8443:10.0.0.2"]);
    assert_eq!(parse(&argv).expect("valid").github.resolve.len(), 2);
}

#[test]
fn configure_url_scopes_follow_arc() {
    let s = parse_configure_url("https://github.com/Enterprises/acme").expect("enterprise");
    assert_eq!((s.enterprise.as_str(), s.organization.as_str()), ("acme", ""));
    let s = parse_configure_url("https://ghes.example/org/repo").expect("repo");
    assert_eq!((s.organization.as_str(), s.repository.as_str()), ("org", "repo"));
    assert!(parse_configure_url("https://github.com").is_err());
    assert!(parse_configure_url("ftp://github.com/org").is_err());
}

/// Runs the named test of this binary in a child process with `env` set: clap reads the real
/// process environment, and tests may not change their own (no `unsafe`).
fn run_child(test: &str, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(std::env::current_exe().expect("exe"));
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"]);
    for (k, _) in std::env::vars() {
        if k.starts_with("ARCFED_") || k == "LISTENER_CONFIG_PATH" {
            cmd.env_remove(k);
        }
    }
    cmd.env("ARCFED_TEST_CHILD", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run child")
}

#[test]
fn env_vars_supply_flags() {
    if std::env::var_os("ARCFED_TEST_CHILD").is_some() {
        let cfg = Config::from_args(Args::try_parse_from(["arcfed-agent"]).expect("clap")).expect("valid");
        assert_eq!(cfg.github.configure_url, "https://github.com/from-env");
        assert_eq!(cfg.ers_name, "ers-env");
        assert_eq!(cfg.max_runners, 3);
        assert_eq!(cfg.github.resolve.len(), 2);
        assert_eq!(cfg.weight, 4);
        assert_eq!(cfg.owner_name, "env-pod");
        assert!(cfg.allow_drills);
        assert_eq!(cfg.coordinator_lost_for, Duration::from_secs(5));
        assert_eq!(cfg.log.format, LogFormat::Json);
        return;
    }
    let out = run_child(
        "env_vars_supply_flags",
        &[
            ("ARCFED_GITHUB_CONFIG_URL", "https://github.com/from-env"),
            ("ARCFED_GITHUB_TOKEN", "ghp_env"),
            ("ARCFED_SCALE_SET_ID", "9"),
            ("ARCFED_ERS_NAMESPACE", "ns"),
            ("ARCFED_ERS_NAME", "ers-env"),
            ("ARCFED_MAX_RUNNERS", "3"),
            ("ARCFED_GITHUB_RESOLVE", "a.example:443:10.0.0.1,b.example:443:10.0.0.2"),
            ("ARCFED_WEIGHT", "4"),
            ("ARCFED_OWNER_NAME", "env-pod"),
            ("ARCFED_ALLOW_DRILLS", "true"),
            ("ARCFED_COORDINATOR_LOST_FOR", "5s"),
            ("ARCFED_LOG_FORMAT", "json"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("1 passed"), "the child did not run the test:\n{stdout}");
}

#[test]
fn listener_config_path_env_is_arcs_contract() {
    if let Some(want) = std::env::var_os("ARCFED_TEST_CHILD_WANT") {
        let cfg = Config::from_args(Args::try_parse_from(["arcfed-agent"]).expect("clap")).expect("valid");
        assert_eq!(cfg.listener_config.as_deref(), Some(Path::new(&want)));
        assert_eq!(cfg.ers_name, "linux-eu-x7k2p");
        return;
    }
    let sample = examples().join("listener-config.json").display().to_string();
    let other = "/nonexistent/other.json";
    // LISTENER_CONFIG_PATH wins over ARCFED_LISTENER_CONFIG; the latter is used alone too.
    for env in [
        vec![("LISTENER_CONFIG_PATH", sample.as_str()), ("ARCFED_LISTENER_CONFIG", other)],
        vec![("ARCFED_LISTENER_CONFIG", sample.as_str())],
    ] {
        let mut env = env.clone();
        env.push(("ARCFED_TEST_CHILD_WANT", sample.as_str()));
        env.push(("ARCFED_OWNER_NAME", "p"));
        let out = run_child("listener_config_path_env_is_arcs_contract", &env);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("1 passed"), "the child did not run the test:\n{stdout}");
    }
}

#[test]
fn help_lists_every_flag_with_its_env_var() {
    let mut cmd = Args::command();
    let help = cmd.render_long_help().to_string();
    let mut count = 0;
    for arg in Args::command().get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if arg.is_hide_set() || long == "help" || long == "version" {
            continue;
        }
        count += 1;
        assert!(help.contains(&format!("--{long}")), "--help lacks --{long}");
        let env = arg.get_env().unwrap_or_else(|| panic!("--{long} has no env var")).to_string_lossy().to_string();
        if long == "listener-config" {
            assert_eq!(env, "LISTENER_CONFIG_PATH");
        } else {
            assert!(env.starts_with("ARCFED_"), "--{long} reads {env}");
        }
        assert!(help.contains(&format!("[env: {env}")), "--help lacks the env var of --{long}");
        assert!(arg.get_long_help().or(arg.get_help()).is_some(), "--{long} has no help text");
    }
    let contract = [
        "listener-config",
        "cluster",
        "coordinator",
        "tls-cert",
        "tls-key",
        "tls-ca",
        "runner-backend",
        "sim-state-file",
        "admin-listen",
        "weight",
        "priority",
        "profile",
        "lease-ttl",
        "coordinator-lost-for",
        "holder-stall",
        "allow-drills",
        "github-resolve",
        "owner-name",
        "log-format",
        "log-level",
        "github-config-url",
        "github-token",
        "github-app-id",
        "github-app-installation-id",
        "github-app-private-key-file",
        "scale-set-id",
        "scale-set-name",
        "ers-namespace",
        "ers-name",
        "min-runners",
        "max-runners",
    ];
    for long in contract {
        assert!(Args::command().get_arguments().any(|a| a.get_long() == Some(long)), "--{long} is missing");
    }
    assert!(count >= contract.len(), "only {count} flags");
    for phrase in ["LISTENER_CONFIG_PATH", "ARCFED_LISTENER_CONFIG", "30s", "no backoff", "standalone"] {
        assert!(help.contains(phrase), "--help should mention {phrase}");
    }
}

fn job(kind: &str) -> JobMessage {
    JobMessage {
        message_type: kind.into(),
        runner_request_id: 11,
        repository_name: "repo".into(),
        owner_name: "org".into(),
        job_id: "j1".into(),
        job_workflow_ref: "org/repo/.github/workflows/ci.yml@refs/pull/12/merge".into(),
        job_display_name: "build".into(),
        workflow_run_id: 3,
        event_name: "pull_request".into(),
        request_labels: vec!["linux".into()],
        queue_time: None,
        scale_set_assign_time: Some("2024-05-01T10:00:00Z".into()),
        runner_assign_time: Some("2024-05-01T10:00:07.5Z".into()),
        finish_time: Some("2024-05-01T10:01:07Z".into()),
        acquire_job_url: None,
        runner_id: Some(1),
        runner_name: Some("ers-a-runner-abcde".into()),
        result: Some("succeeded".into()),
    }
}

fn labels() -> MetricLabels {
    MetricLabels {
        enterprise: String::new(),
        organization: "org".into(),
        repository: String::new(),
        name: "ers-a".into(),
        namespace: "arc".into(),
    }
}

#[test]
fn metrics_text_carries_arcs_names_and_labels() {
    let m = Metrics::new(labels(), &GhaMetricsSpec::arc_default());
    m.set_holder(Some(7));
    m.record_statistics(&Statistics { total_assigned_jobs: 3, total_idle_runners: 2, ..Default::default() });
    m.set_runner_limits(1, 20);
    m.set_desired_runners(4);
    m.job_started(&job("JobStarted"));
    m.job_completed(&job("JobCompleted"));
    m.session_creates.inc();
    m.github_error("409");
    m.observe_github_request("create_session", Duration::from_millis(30));
    let text = m.encode();
    let gauge = r#"{enterprise="",organization="org",repository="",name="ers-a",namespace="arc"}"#;
    for line in [
        format!("gha_assigned_jobs{gauge} 3"),
        format!("gha_idle_runners{gauge} 2"),
        format!("gha_min_runners{gauge} 1"),
        format!("gha_max_runners{gauge} 20"),
        format!("gha_desired_runners{gauge} 4"),
        r#"gha_started_jobs_total{enterprise="",organization="org",repository="repo",job_name="build",event_name="pull_request"} 1"#.into(),
        r#"gha_completed_jobs_total{enterprise="",organization="org",repository="repo",job_name="build",event_name="pull_request",job_result="succeeded"} 1"#.into(),
        r#"gha_job_startup_duration_seconds_bucket{le="7.0",enterprise="",organization="org",repository="repo",job_name="build",event_name="pull_request"} 1"#.into(),
        r#"gha_job_startup_duration_seconds_bucket{le="6.0",enterprise="",organization="org",repository="repo",job_name="build",event_name="pull_request"} 0"#.into(),
        r#"gha_job_execution_duration_seconds_sum{enterprise="",organization="org",repository="repo",job_name="build",event_name="pull_request",job_result="succeeded"} 60.0"#.into(),
        "arcfed_agent_is_holder 1".into(),
        "arcfed_agent_token 7".into(),
        "arcfed_agent_session_creates_total 1".into(),
        r#"arcfed_agent_github_errors_total{kind="409"} 1"#.into(),
        "# TYPE arcfed_agent_conflicts_409 counter".into(),
        "# TYPE arcfed_agent_coordinator_connected gauge".into(),
        r#"arcfed_agent_github_request_duration_seconds_count{call="create_session"} 1"#.into(),
    ] {
        assert!(text.contains(&line), "missing {line}\n{text}");
    }
    assert!(text.contains(r#"le="3600.0""#), "ARC's buckets end at 3600");

    // A standby exports no scale-set-wide series, but keeps its own min/max/desired.
    m.set_holder(None);
    let text = m.encode();
    assert!(text.contains("arcfed_agent_is_holder 0"));
    assert!(!text.contains("gha_assigned_jobs{"), "standby must not export scale-set gauges\n{text}");
    assert!(text.contains(&format!("gha_desired_runners{gauge} 4")));
}

#[test]
fn a_job_completed_without_a_runner_is_not_counted() {
    let m = Metrics::new(labels(), &GhaMetricsSpec::arc_default());
    let mut j = job("JobCompleted");
    j.runner_assign_time = Some("0001-01-01T00:00:00Z".into());
    m.job_completed(&j);
    j.runner_assign_time = None;
    m.job_completed(&j);
    assert!(!m.encode().contains("gha_completed_jobs_total{"));
}

#[test]
fn the_metrics_key_picks_metrics_labels_and_buckets() {
    let v = sample("listener-config-app.json");
    let (spec, warnings) = GhaMetricsSpec::from_listener_json(&v["metrics"]).expect("spec");
    assert!(warnings.is_empty(), "{warnings:?}");
    let m = Metrics::new(labels(), &spec);
    m.set_holder(Some(1));
    m.record_statistics(&Statistics { total_assigned_jobs: 2, total_idle_runners: 5, ..Default::default() });
    m.job_started(&job("JobStarted"));
    let text = m.encode();
    assert!(text.contains(r#"gha_assigned_jobs{name="ers-a",namespace="arc",repository=""} 2"#), "{text}");
    assert!(!text.contains("gha_idle_runners"), "unlisted metric exported\n{text}");
    assert!(
        text.contains(
            r#"gha_started_jobs_total{repository="repo",job_workflow_name="ci",job_workflow_target="pull/12"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains(r#"gha_job_startup_duration_seconds_bucket{le="10.0",repository="repo"} 1"#), "{text}");

    let (_, warnings) = GhaMetricsSpec::from_listener_json(
        &json!({"gauges": {"gha_nope": {}, "gha_busy_runners": {"labels": ["job_name"]}}}),
    )
    .expect("spec");
    assert_eq!(warnings.len(), 2, "{warnings:?}");
}

#[test]
fn workflow_refs_give_arcs_name_and_target() {
    let w = WorkflowRef::parse("o/r/.github/workflows/release.yaml@refs/tags/v1.2");
    assert_eq!((w.name.as_str(), w.target.as_str()), ("release", "tags/v1.2"));
    let w = WorkflowRef::parse("o/r/.github/workflows/ci.yml@refs/heads/main");
    assert_eq!((w.name.as_str(), w.target.as_str()), ("ci", "heads/main"));
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.expect("read");
    let code = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status line");
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

#[tokio::test]
async fn admin_server_answers_live_ready_and_metrics() {
    let metrics = Arc::new(Metrics::new(labels(), &GhaMetricsSpec::arc_default()));
    let state = Arc::new(HttpState::new(metrics.clone(), Duration::from_secs(3600)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(arcfed_proto::ops::serve_admin(listener, state.clone(), "/metrics".into(), async {
        let _ = stop_rx.await;
    }));

    assert_eq!(get(addr, "/live").await.0, 200);
    let (code, body) = get(addr, "/ready").await;
    assert_eq!((code, body.as_str()), (503, "starting\n"));
    state.set_ready(Readiness::Ready("standby".into()));
    assert_eq!(get(addr, "/ready").await, (200, "ok (standby)\n".to_string()));

    metrics.set_holder(Some(3));
    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("arcfed_agent_is_holder 1"), "{body}");
    assert_eq!(get(addr, "/nope").await.0, 404);

    state.beat();
    assert_eq!(get(addr, "/live").await.0, 200);
    state.set_dead("holder loop exited");
    assert_eq!(get(addr, "/live").await, (503, "holder loop exited\n".to_string()));

    stop_tx.send(()).expect("server still running");
    tokio::time::timeout(Duration::from_secs(10), server).await.expect("shuts down").expect("join").expect("serve");
}

#[test]
fn tls_watcher_notices_replaced_files() {
    let fx = Fixture::new();
    let [cert, key, ca] = fx.agent_tls("eu-1");
    let paths = arcfed_proto::tls::TlsPaths { cert: cert.clone().into(), key: key.into(), ca: ca.into() };
    let mut w = TlsWatcher::new(paths);
    assert!(!w.changed(), "nothing changed yet");
    // cert-manager/kubelet replace files (new inode), as a rename does.
    let tmp = fx.write("new.crt", "renewed");
    std::fs::rename(&tmp, &cert).expect("rename");
    assert!(w.changed(), "replacement must be noticed");
    assert!(!w.changed(), "reported once");
    std::fs::remove_file(&cert).expect("rm");
    assert!(!w.changed(), "a vanished file is not a change");
}

#[tokio::test]
async fn a_bad_config_exits_non_zero_after_the_delay() {
    if std::env::var_os("ARCFED_TEST_CHILD").is_some() {
        arcfed_agent::config::fail_slowly(&"configure_url (--github-config-url): must not be empty").await;
    }
    let out = run_child("a_bad_config_exits_non_zero_after_the_delay", &[("ARCFED_CONFIG_ERROR_DELAY", "0s")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("configuration error: configure_url (--github-config-url)"), "{stderr}");
    assert!(stderr.contains("no backoff"), "{stderr}");
}
