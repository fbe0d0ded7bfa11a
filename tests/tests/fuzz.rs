//! Parser fuzzing on stable Rust (issue 22, item 9): the product's parsers of untrusted bytes —
//! GitHub's session and long-poll answers, ARC's listener config, the agent protocol's protobuf
//! and its conversion into the core's types, and stored Raft log entries — each fed plain
//! random bytes and mutations of the seeds in `fuzz/corpus/` (bit flips, inserted and deleted
//! bytes, truncation, splices of two seeds). Each input must give a value or an error, never a
//! panic. `cargo fuzz` needs nightly, which this project's machines do not have (fuzz/README.md).
//! `ARCFED_FUZZ_CASES` sets the cases per target (default 10,000).

use arcfed_agent::config::ListenerFile;
use arcfed_agent::github::{decode_envelope, decode_session, job_messages};
use arcfed_proto as pb;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message;
use std::path::Path;

/// The seeds of one target, in name order.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|f| f.expect("corpus entry").path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).expect("seed")).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

#[derive(Clone, Debug)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize, usize),
    Truncate(usize),
    Splice(usize, usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(p, b)| Edit::Flip(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Insert(p, b)),
        (any::<usize>(), 1usize..16).prop_map(|(p, n)| Edit::Delete(p, n)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), any::<usize>(), any::<usize>()).prop_map(|(s, from, to)| Edit::Splice(s, from, to)),
    ]
}

/// A seed with a few edits applied, or random bytes.
fn input(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..512),
        4 => (0..n, proptest::collection::vec(edit(), 1..6)).prop_map(move |(i, edits)| {
            let mut b = seeds[i].clone();
            for e in edits {
                let at = |p: usize, len: usize| if len == 0 { 0 } else { p % len };
                match e {
                    Edit::Flip(p, bit) if !b.is_empty() => {
                        let p = at(p, b.len());
                        b[p] ^= 1 << bit;
                    }
                    Edit::Insert(p, v) => {
                        let p = at(p, b.len() + 1);
                        b.insert(p, v);
                    }
                    Edit::Delete(p, k) if !b.is_empty() => {
                        let p = at(p, b.len());
                        b.drain(p..(p + k).min(b.len()));
                    }
                    Edit::Truncate(p) => b.truncate(at(p, b.len() + 1)),
                    Edit::Splice(s, from, to) => {
                        let other = &seeds[s % n];
                        let (from, to) = (at(from, other.len() + 1), at(to, other.len() + 1));
                        let (from, to) = (from.min(to), from.max(to));
                        let p = at(from, b.len() + 1);
                        b.splice(p..p, other[from..to].iter().copied());
                    }
                    _ => {}
                }
            }
            b
        }),
    ]
}

fn run(target: &str, seeds: Vec<Vec<u8>>, check: impl Fn(&[u8])) {
    let cases = std::env::var("ARCFED_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let r = runner.run(&input(seeds), |bytes| {
        check(&bytes);
        Ok(())
    });
    if let Err(e) = r {
        panic!("{target}: {e}");
    }
}

#[test]
fn github_session_answers() {
    let seeds = corpus("github-session");
    for s in &seeds {
        decode_session(s, 3).expect("every seed is a valid session");
    }
    run("github-session", seeds, |b| {
        if let Ok(s) = decode_session(b, 3) {
            assert!(!s.session_id.is_empty() && !s.message_queue_access_token.is_empty());
        }
    });
}

#[test]
fn github_long_poll_answers_and_their_job_messages() {
    let seeds = corpus("github-envelope");
    for s in &seeds {
        decode_envelope(s).expect("every seed is a valid envelope");
    }
    run("github-envelope", seeds, |b| {
        if let Ok(e) = decode_envelope(b) {
            let (msgs, skipped) = job_messages(&e.body);
            assert!(msgs.len() + skipped <= e.body.len() + 1, "more messages than bytes");
        }
        let _ = job_messages(&String::from_utf8_lossy(b));
    });
}

#[test]
fn arcs_listener_config() {
    let seeds = corpus("listener-config");
    for s in &seeds {
        ListenerFile::parse(std::str::from_utf8(s).expect("utf-8 seed")).expect("every seed parses");
    }
    run("listener-config", seeds, |b| {
        let _ = ListenerFile::parse(&String::from_utf8_lossy(b));
    });
}

#[test]
fn agent_protocol_protobuf_and_its_conversion() {
    let join = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Join(pb::Join {
            member_id: "0123456789abcdef0123456789abcdef".into(),
            group: Some(pb::GroupRef { configure_url: "https://github.com/octo".into(), scale_set_id: 3 }),
            ers_namespace: "arc-runners".into(),
            ers_name: "gha-rs-abcde".into(),
            weight: 1,
            max_runners: 10,
            github_ready: true,
            ..Default::default()
        })),
    };
    let seeds = vec![join.encode_to_vec()];
    use arcfed_coordinator::server::convert;
    let Some(pb::agent_message::Msg::Join(j)) = pb::AgentMessage::decode(seeds[0].as_slice()).expect("seed").msg else {
        panic!("the seed is a Join")
    };
    convert::join(j, "east").expect("the seed converts");
    run("agent-message", seeds, |b| {
        let Ok(m) = pb::AgentMessage::decode(b) else { return };
        match m.msg {
            Some(pb::agent_message::Msg::Join(j)) => {
                let _ = convert::join(j, "east");
            }
            Some(pb::agent_message::Msg::Progress(p)) => {
                let _ = convert::stats(p.statistics);
                for e in p.events {
                    let _ = convert::job_event(e);
                }
            }
            _ => {}
        }
    });
}

#[test]
fn stored_raft_log_entries() {
    use arcfed_coordinator::raft::store::decode_entry;
    let seeds = corpus("store-entry");
    run("store-entry", seeds, |b| {
        if let Ok(e) = decode_entry(3, b) {
            assert_eq!(e.log_id.index, 3);
        }
    });
}
