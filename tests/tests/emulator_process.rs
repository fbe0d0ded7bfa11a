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
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn actions-emulator");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let running = Running(child);
    let line = rx.recv_timeout(Duration::from_secs(30)).expect("first stdout line within 30 s");
    (running, line.trim_end().to_string())
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
async fn flags_can_come_from_env_vars() {
    let (_child, line) = spawn(
        &[],
        &[
            ("ARCFED_EMULATOR_LISTEN", "127.0.0.1:0"),
            ("ARCFED_EMULATOR_PAT", "pat-a,pat-b"),
            ("ARCFED_EMULATOR_CURSOR", "per-scale-set"),
            ("ARCFED_EMULATOR_QUEUE_TOKEN_SURVIVES_SESSION_DELETE", "true"),
            ("ARCFED_EMULATOR_MODE", "ghes"),
        ],
    );
    let url = line.strip_prefix("githubConfigUrl=").expect("url line");
    let mut c = ArcClient::new(url, "pat-b").unwrap();
    c.auth().await.expect("second PAT accepted");
    let cfg = c.emulator(reqwest::Method::GET, "config", None).await.unwrap().value();
    assert_eq!(cfg["cursor"], "per-scale-set");
    assert_eq!(cfg["mode"], "ghes");
    assert_eq!(cfg["queueTokenSurvivesSessionDelete"], true);
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
        "ARCFED_EMULATOR_CURSOR",
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
