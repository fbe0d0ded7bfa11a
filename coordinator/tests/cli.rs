//! Bad input gets a clear error naming it and a non-zero exit (issue 2, g), and every
//! binary explains its flags. These run the real binaries (`CARGO_BIN_EXE_*`).
use std::path::Path;
use std::process::{Command, Output};

fn coordinator(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_arcfed-coordinator")).args(args).output().expect("run arcfed-coordinator")
}

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_arcfedctl")).args(args).output().expect("run arcfedctl")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Mints a CA and a coordinator certificate with arcfedctl; returns the cert dir.
fn certs(dir: &Path) -> std::path::PathBuf {
    let ca = dir.join("ca");
    let out = dir.join("coord");
    assert!(ctl(&["certs", "init", "--out", ca.to_str().unwrap()]).status.success());
    let o = ctl(&[
        "certs",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--role",
        "coordinator",
        "--name",
        "1",
        "--ip",
        "127.0.0.1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

fn base_args(dir: &Path, tls: &Path, data: &Path) -> Vec<String> {
    let _ = dir;
    vec![
        "--node-id".into(),
        "1".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--admin-listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--peer".into(),
        "1=127.0.0.1:1".into(),
        "--tls-cert".into(),
        tls.join("tls.crt").display().to_string(),
        "--tls-key".into(),
        tls.join("tls.key").display().to_string(),
        "--tls-ca".into(),
        tls.join("ca.crt").display().to_string(),
    ]
}

#[test]
fn a_malformed_flag_is_named_and_exits_non_zero() {
    let o = coordinator(&["--node-id", "1", "--lease-ttl", "banana"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--lease-ttl"), "{}", stderr(&o));
}

#[test]
fn a_timing_rule_violation_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path());
    let mut args = base_args(dir.path(), &tls, &dir.path().join("data"));
    args.extend(["--lease-ttl".into(), "1s".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = coordinator(&refs);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("timing rule"), "{}", stderr(&o));
}

#[test]
fn an_unwritable_data_dir_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path());
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let data = file.join("data");
    let args = base_args(dir.path(), &tls, &data);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = coordinator(&refs);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains(&data.display().to_string()) || e.contains(&file.display().to_string()), "{e}");
    assert!(e.to_lowercase().contains("data dir"), "{e}");
}

#[test]
fn missing_tls_files_are_named_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path());
    let mut args = base_args(dir.path(), &tls, &dir.path().join("data"));
    let at = args.iter().position(|a| a == "--tls-key").unwrap();
    args.drain(at..at + 2);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = coordinator(&refs);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--tls-key required"), "{}", stderr(&o));
    assert!(!dir.path().join("data").join("arcfed.redb").exists());
}

#[test]
fn a_corrupt_certificate_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path());
    std::fs::write(tls.join("tls.crt"), b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n").unwrap();
    let args = base_args(dir.path(), &tls, &dir.path().join("data"));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = coordinator(&refs);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--tls-cert"), "{}", stderr(&o));
    // State stays intact: nothing was created in the data dir.
    assert!(!dir.path().join("data").join("arcfed.redb").exists());
}

#[test]
fn help_explains_every_flag_and_its_env_var() {
    let o = coordinator(&["--help"]);
    assert!(o.status.success());
    let h = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--node-id",
        "--listen",
        "--admin-listen",
        "--data-dir",
        "--peer",
        "--tls-cert",
        "--tls-key",
        "--tls-ca",
        "--profile",
        "--lease-ttl",
        "--reconnect-grace",
        "--heartbeat-interval",
        "--election-timeout-min",
        "--election-timeout-max",
        "--advertise",
        "--commit-latency",
        "--agent-retry-max",
        "--group-gc-after",
        "--stale-session-ttl",
    ] {
        assert!(h.contains(flag), "--help lacks {flag}");
    }
    assert!(h.contains("ARCFED_LEASE_TTL") && h.contains("ARCFED_PEER"), "{h}");
    let o = ctl(&["--help"]);
    assert!(o.status.success());
    let h = String::from_utf8_lossy(&o.stdout);
    for cmd in ["status", "handover", "drain", "voters", "certs"] {
        assert!(h.contains(cmd), "arcfedctl --help lacks {cmd}");
    }
}

#[test]
fn arcfedctl_needs_endpoints_and_names_them() {
    let o = ctl(&["status"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--endpoints"), "{}", stderr(&o));
}

#[test]
fn certs_issue_refuses_a_bad_role_or_missing_ca() {
    let dir = tempfile::tempdir().unwrap();
    let o = ctl(&[
        "certs",
        "issue",
        "--ca",
        dir.path().join("nope").to_str().unwrap(),
        "--role",
        "agent",
        "--name",
        "a",
        "--out",
        dir.path().join("o").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nope"), "{}", stderr(&o));
    let ca = dir.path().join("ca");
    assert!(ctl(&["certs", "init", "--out", ca.to_str().unwrap()]).status.success());
    let o = ctl(&[
        "certs",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--role",
        "king",
        "--name",
        "a",
        "--out",
        dir.path().join("o").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--role"), "{}", stderr(&o));
}
