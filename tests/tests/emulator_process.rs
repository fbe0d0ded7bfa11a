//! The real `actions-emulator` binary: its stdout contract (`githubConfigUrl=` first), the
//! auth chain against the printed URL, flags and their env vars, and `--help`.

use arcfed_tests::emulator::client::ArcClient;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_actions-emulator");

/// Kills the child however the test ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary and reads its first stdout line on a thread (with a deadline).
fn spawn(args: &[&str], envs: &[(&str, &str)]) -> (Running, String) {
    let (running, mut lines) = spawn_lines(args, envs, 1);
    (running, lines.remove(0))
}

/// Starts the binary and reads its first `n` stdout lines (with a deadline).
fn spawn_lines(args: &[&str], envs: &[(&str, &str)], n: usize) -> (Running, Vec<String>) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn actions-emulator");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rd = BufReader::new(stdout);
        for _ in 0..n {
            let mut line = String::new();
            let _ = rd.read_line(&mut line);
            let _ = tx.send(line);
        }
    });
    let running = Running(child);
    let lines = (0..n)
        .map(|_| rx.recv_timeout(Duration::from_secs(30)).expect("stdout lines within 30 s").trim_end().to_string())
        .collect();
    (running, lines)
}

#[tokio::test]
async fn binary_prints_a_config_url_that_an_agent_can_use() {
    let (_child, line) = spawn(&["--listen", "127.0.0.1:0", "--org", "acme", "--long-poll", "300ms"], &[]);
    let url = line.strip_prefix("githubConfigUrl=").unwrap_or_else(|| panic!("first line was {line:?}"));
    assert!(url.starts_with("http://127.0.0.1:") && url.ends_with("/acme"), "{url}");
    assert!(!url.contains(":0/"), "the real port is printed: {url}");

    let mut c = ArcClient::new(url, "emulator-pat").unwrap();
    c.auth().await.expect("auth chain against the printed URL");
    let set = c.create_scale_set("proc", 1).await.unwrap();
    let s = c.open_session(set.id, "listener").await.unwrap();
    let r = c.poll(&s.message_queue_url, &s.message_queue_access_token, 0, Some(1)).await.unwrap();
    assert_eq!(r.status, 202, "--long-poll 300ms took effect");
    let bad = ArcClient::new(url, "not-the-pat").unwrap();
    assert_eq!(bad.registration_token().await.unwrap().status, 401);
}

#[tokio::test]
async fn dotcom_layout_prints_the_broker_and_the_names_to_resolve() {
    let (_child, lines) =
        spawn_lines(&["--layout", "dotcom", "--long-poll", "300ms", "--queue-url-survives-refresh", "false"], &[], 3);
    let url = lines[0].strip_prefix("githubConfigUrl=").unwrap_or_else(|| panic!("first line was {:?}", lines[0]));
    assert!(url.starts_with("http://github.localhost:") && url.ends_with("/arcfed"), "{url}");
    let broker = lines[1].strip_prefix("brokerUrl=").expect("second line is brokerUrl=");
    assert!(broker.starts_with("http://broker.github.localhost:"), "{broker}");
    let resolve: Vec<(String, std::net::SocketAddr)> = lines[2]
        .strip_prefix("resolve=")
        .expect("third line is resolve=")
        .split(',')
        .map(|e| {
            // HOST:PORT:ADDR, as curl's --resolve and the agent's --github-resolve take it.
            let mut p = e.splitn(3, ':');
            let (host, port, addr) = (p.next().unwrap(), p.next().unwrap(), p.next().unwrap());
            (host.to_string(), format!("{addr}:{port}").parse().unwrap())
        })
        .collect();
    let hosts: Vec<&str> = resolve.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(hosts, ["github.localhost", "api.github.localhost", "broker.github.localhost"]);

    let mut c = ArcClient::with_resolve(url, "emulator-pat", &resolve).unwrap();
    c.auth().await.expect("auth chain through the resolve overrides");
    assert!(c.service_url.starts_with(broker), "{}", c.service_url);
    let set = c.create_scale_set("proc", 1).await.unwrap();
    let s = c.open_session(set.id, "listener").await.unwrap();
    assert!(s.message_queue_url.starts_with(broker));
    let r = c.poll(&s.message_queue_url, &s.message_queue_access_token, 0, Some(1)).await.unwrap();
    assert_eq!(r.status, 202);
}

#[test]
fn an_unreadable_app_key_fails_with_the_flag_name() {
    let out = Command::new(BIN).args(["--app-id", "1", "--app-key", "/nonexistent.pem"]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--app-key"));
}

#[tokio::test]
async fn flags_can_come_from_env_vars() {
    let (_child, line) = spawn(
        &[],
        &[
            ("ARCFED_EMULATOR_LISTEN", "127.0.0.1:0"),
            ("ARCFED_EMULATOR_PAT", "pat-a,pat-b"),
            ("ARCFED_EMULATOR_CURSOR", "per-scale-set"),
            ("ARCFED_EMULATOR_QUEUE_TOKEN_SURVIVES_SESSION_DELETE", "true"),
            ("ARCFED_EMULATOR_MODE", "ghes"),
            ("ARCFED_EMULATOR_RATE_LIMIT_STATUS", "429"),
            ("ARCFED_EMULATOR_ASSIGN_TIMEOUT", "2m"),
        ],
    );
    let url = line.strip_prefix("githubConfigUrl=").expect("url line");
    let mut c = ArcClient::new(url, "pat-b").unwrap();
    c.auth().await.expect("second PAT accepted");
    let cfg = c.emulator(reqwest::Method::GET, "config", None).await.unwrap().value();
    assert_eq!(cfg["cursor"], "per-scale-set");
    assert_eq!(cfg["mode"], "ghes");
    assert_eq!(cfg["queueTokenSurvivesSessionDelete"], true);
    assert_eq!(cfg["rateLimitStatus"], "429");
    assert_eq!(cfg["assignTimeout"], "2m");
}

#[test]
fn help_documents_every_flag() {
    let out = Command::new(BIN).arg("--help").output().expect("run --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--tls-cert",
        "--tls-key",
        "--org",
        "--pat",
        "--mode",
        "--long-poll",
        "--session-ttl",
        "--queue-token-ttl",
        "--admin-token-ttl",
        "--queue-token-survives-session-delete",
        "--session-ttl-from",
        "--cursor",
        "--cross-credential-delete",
        "--layout",
        "--broker-listen",
        "--repo",
        "--enterprise",
        "--app-id",
        "--app-key",
        "--queue-url-survives-refresh",
        "--strict-api-version",
        "--assign-timeout",
        "--odd-messages-every",
        "--rate-limit-per-minute",
        "--rate-limit-status",
        "--no-acquirable-jobs",
        "ARCFED_EMULATOR_CURSOR",
        "ARCFED_EMULATOR_LAYOUT",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn bad_flag_values_fail_with_the_flag_name() {
    let out = Command::new(BIN).args(["--session-ttl", "soon"]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--session-ttl"));
}
