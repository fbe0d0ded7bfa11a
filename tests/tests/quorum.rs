//! Process-level tests of the coordinator quorum (issue 2, "what it must show" a–l).
//!
//! Real `arcfed-coordinator` binaries on 127.0.0.1 with certificates from `arcfedctl certs`,
//! faults from SIGKILL and the TCP fault proxy. Every wait is a condition with a deadline;
//! nothing asserts a duration except the orderings the design promises (a grant never
//! precedes the previous holder's fence end), measured on this process's clock.
//! These tests run one at a time (nextest group `process`).

use arcfed_proto as pb;
use arcfed_tests::agent_client::{AgentOptions, TestAgent, is_accepted, rejection};
use arcfed_tests::fault_proxy::{FaultProxy, Mode};
use arcfed_tests::harness::{Quorum, QuorumOptions, arcfedctl, free_port};
use std::future::Future;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3);

async fn with_quorum<F, Fut>(opts: QuorumOptions, body: F)
where
    F: FnOnce(Quorum) -> Fut,
    Fut: Future<Output = (Quorum, anyhow::Result<()>)>,
{
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let q = Quorum::start(dir.path(), opts).await.expect("start quorum");
    if let Err(e) = q.wait_serving(WAIT).await {
        panic!("quorum did not come up: {e:#}\n{}", q.dump_logs());
    }
    let (q, r) = body(q).await;
    if let Err(e) = r {
        panic!("{e:#}\n{}", q.dump_logs());
    }
}

fn agent(q: &Quorum, cluster: &str) -> TestAgent {
    TestAgent::start(AgentOptions::new(q.endpoints(), q.certs.agent(cluster).expect("agent cert"), cluster))
}

fn group_of(s: &pb::StatusResponse) -> Option<&pb::GroupStatus> {
    s.groups.first()
}

fn holder_of(s: &pb::StatusResponse) -> Option<(String, u64)> {
    group_of(s).filter(|g| !g.holder.is_empty()).map(|g| (g.holder.clone(), g.token))
}

/// Waits for a holder; returns (holder agent index, token).
async fn wait_holder(q: &Quorum, agents: &[&TestAgent]) -> anyhow::Result<(usize, u64)> {
    let s = q.wait_status("a holder", WAIT, |s| holder_of(s).is_some()).await?;
    let (h, t) = holder_of(&s).expect("holder");
    let i =
        agents.iter().position(|a| a.opts.member_id == h).ok_or_else(|| anyhow::anyhow!("holder {h} is not ours"))?;
    agents[i].wait_for("an ack listing the grant", WAIT, |r| r.held_token() == Some(t)).await?;
    Ok((i, t))
}

/// Agent `a` joins first and holds; then `b` joins. Returns (a, a's token, b).
async fn holder_and_standby(q: &Quorum) -> anyhow::Result<(TestAgent, u64, TestAgent)> {
    let a = agent(q, "a");
    a.joined(WAIT).await?;
    let (_, t1) = wait_holder(q, &[&a]).await?;
    let b = agent(q, "b");
    b.joined(WAIT).await?;
    Ok((a, t1, b))
}

fn admin_args(q: &Quorum) -> Vec<String> {
    vec![
        "--endpoints".into(),
        q.endpoints().join(","),
        "--tls-cert".into(),
        q.admin.cert.display().to_string(),
        "--tls-key".into(),
        q.admin.key.display().to_string(),
        "--tls-ca".into(),
        q.admin.ca.display().to_string(),
    ]
}

fn ctl(q: &Quorum, extra: &[&str]) -> anyhow::Result<String> {
    let mut args = admin_args(q);
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    arcfedctl(&refs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_voters_elect_a_leader_and_exactly_one_member_is_granted() {
    with_quorum(QuorumOptions::default(), |q| async move {
        let r = async {
            let a = agent(&q, "a");
            let b = agent(&q, "b");
            a.joined(WAIT).await?;
            b.joined(WAIT).await?;
            let s = q
                .wait_status("two live members", WAIT, |s| s.members.iter().filter(|m| m.status == "live").count() == 2)
                .await?;
            assert!(s.leader > 0 && s.term > 0);
            assert_eq!(s.voters.len(), 3);
            let (h, t) = wait_holder(&q, &[&a, &b]).await?;
            assert!(t > 0);
            let other = if h == 0 { &b } else { &a };
            let holder = if h == 0 { &a } else { &b };
            assert_eq!(holder.rec().grants.len(), 1, "the holder got one grant");
            assert!(other.rec().grants.is_empty(), "the other member got no grant");
            assert!(other.rec().acks.iter().all(|x| x.held.is_empty()), "the other member's acks list nothing");
            // arcfedctl status: a readable table and the documented JSON.
            let table = ctl(&q, &["status"])?;
            assert!(
                table.contains("VOTERS") && table.contains("GROUPS") && table.contains(&format!("token {t}")),
                "{table}"
            );
            let json: serde_json::Value = serde_json::from_str(&ctl(&q, &["status", "-o", "json"])?)?;
            assert_eq!(json["leader"].as_u64(), Some(s.leader));
            assert_eq!(json["voters"].as_array().map(Vec::len), Some(3));
            assert_eq!(json["groups"][0]["token"].as_u64(), Some(t));
            assert_eq!(json["groups"][0]["holder"].as_str(), Some(holder.opts.member_id.as_str()));
            assert!(json["groups"][0]["lease_remaining_ms"].as_i64().is_some_and(|v| v > 0));
            assert_eq!(json["groups"][0]["assignments"].as_array().map(Vec::len), Some(2));
            assert!(json["members"].as_array().is_some_and(|m| m.iter().all(|m| m["status"] == "live")));
            // --tls-server-name (for port-forwards) replaces the endpoint's host in the check of
            // the voter's certificate: a name no certificate carries fails, one they carry passes.
            let e = ctl(&q, &["--tls-server-name", "nobody.example", "status"]).unwrap_err().to_string();
            assert!(e.contains("connect to"), "{e}");
            assert!(ctl(&q, &["--tls-server-name", "localhost", "status"])?.contains("VOTERS"));
            // status --watch with -o json: one compact JSON object per line, again and again.
            let mut watch = std::process::Command::new(arcfed_tests::harness::bin_path("arcfedctl"))
                .args(admin_args(&q))
                .args(["status", "-o", "json", "--watch", "200ms"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()?;
            let lines: Vec<String> = {
                use std::io::BufRead;
                let out = watch.stdout.take().expect("piped");
                std::io::BufReader::new(out).lines().take(2).collect::<Result<_, _>>()?
            };
            let _ = watch.kill();
            let _ = watch.wait();
            for l in &lines {
                let v: serde_json::Value = serde_json::from_str(l)?;
                assert_eq!(v["groups"][0]["token"].as_u64(), Some(t), "{l}");
            }
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_a_silent_holder_expires_through_the_log_and_the_other_member_is_granted() {
    with_quorum(QuorumOptions::default(), |q| async move {
        let r = async {
            let (a, t1, b) = holder_and_standby(&q).await?;
            assert!(is_accepted(&a.session_opened(t1, "5e5510a0-0000-4000-8000-00000000000a").await?));
            a.set_silent(true);
            b.wait_for("a grant", WAIT, |r| !r.grants.is_empty()).await?;
            let g = b.rec().last_grant().cloned().expect("grant");
            assert!(g.token > t1, "new token {} must exceed {t1}", g.token);
            assert!(
                g.stale_sessions.contains(&"5e5510a0-0000-4000-8000-00000000000a".to_string()),
                "stale set {:?}",
                g.stale_sessions
            );
            let s = q.status().await?;
            let grp = group_of(&s).expect("group");
            assert_eq!(grp.holder, b.opts.member_id);
            assert!(grp.stale_sessions.contains(&"5e5510a0-0000-4000-8000-00000000000a".to_string()));
            let am = s.members.iter().find(|m| m.id == a.opts.member_id).expect("member a");
            assert_eq!(am.status, "expired");
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_killing_the_raft_leader_changes_no_holder() {
    with_quorum(QuorumOptions::default(), |mut q| async move {
        let r = async {
            let a = agent(&q, "a");
            let b = agent(&q, "b");
            let (h, t) = wait_holder(&q, &[&a, &b]).await?;
            let holder = if h == 0 { &a } else { &b };
            let old = q.status().await?.leader;
            let epochs: Vec<u64> = [&a, &b].iter().map(|x| x.rec().epoch().unwrap_or(0)).collect();
            let killed_at = Instant::now();
            q.voter(old).kill();
            let s = q.wait_status("a new serving leader", WAIT, |s| s.leader != old).await?;
            assert_ne!(s.leader, old);
            // Every agent is served again by the new leader.
            for x in [&a, &b] {
                x.wait_for("an ack from the new leader", WAIT, |r| {
                    r.acks.last().is_some_and(|k| k.received_at > killed_at)
                })
                .await?;
            }
            // Both re-attached to their live leases: the same epochs, no Join in the new
            // leader's log (a leader change costs no log write per member).
            for (x, e) in [&a, &b].iter().zip(&epochs) {
                let r = x.rec();
                let after: Vec<u64> = r.joined.iter().filter(|j| j.1 > killed_at).map(|j| j.0).collect();
                assert!(!after.is_empty(), "no Joined from the new leader");
                assert!(after.iter().all(|ep| ep == e), "the lease epoch changed ({e} → {after:?}): a log Join");
            }
            let resumes = raft_gauge(q.voter(s.leader).http, "arcfed_lease_resumes_total").await?;
            assert!(resumes >= 2, "the new leader counts {resumes} resumes");
            // The resuming Join stood for a keepalive: the Joined that answered it was the ack,
            // listing the holder's group and token (one round trip after a leader change).
            {
                let r = holder.rec();
                let resumed_at = r.joined.iter().find(|j| j.1 > killed_at).map(|j| j.1);
                let joined_ack = r.acks.iter().find(|k| k.in_joined && Some(k.received_at) == resumed_at);
                assert!(
                    joined_ack.is_some_and(|k| k.held.iter().any(|x| x.1 == t)),
                    "the resumed Joined carried no ack listing token {t}: {joined_ack:?}"
                );
            }
            holder
                .wait_for("an ack listing the same token", WAIT, |r| {
                    r.acks.last().is_some_and(|k| k.received_at > killed_at && k.held.iter().any(|x| x.1 == t))
                })
                .await?;
            // Over two more TTLs, the holder and token stay put. Both followers may stand for
            // election after the kill, so a second, short leaderless moment is possible: a
            // status nobody serves is skipped, but every status that is served must show the
            // same holder, and the last one must be served.
            let until = Instant::now() + 2 * TTL;
            let mut served = 0;
            while Instant::now() < until {
                if let Ok(s) = q.status().await {
                    served += 1;
                    assert_eq!(
                        holder_of(&s),
                        Some((holder.opts.member_id.clone(), t)),
                        "holder changed after a leader change"
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            anyhow::ensure!(served > 0, "no voter served status in two TTLs after the leader change");
            let s = q.wait_status("a serving leader after the hold", WAIT, |_| true).await?;
            assert_eq!(holder_of(&s), Some((holder.opts.member_id.clone(), t)), "holder changed after a leader change");
            // Reconnecting to the new leader re-sends the same grant; no other token appeared.
            assert!(holder.rec().grants.iter().all(|g| g.token == t), "a new token was granted");
            let other = if h == 0 { &b } else { &a };
            assert!(other.rec().grants.is_empty(), "the other member was granted");
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_state_and_tokens_survive_a_full_sigkill_restart() {
    with_quorum(QuorumOptions::default(), |mut q| async move {
        let r = async {
            let (a, t1, b) = holder_and_standby(&q).await?;
            assert!(is_accepted(&a.session_opened(t1, "5e5510a0-0000-4000-8000-00000000000d").await?));
            q.wait_status("two members", WAIT, |s| s.members.len() == 2).await?;
            for v in q.voters.iter_mut() {
                v.kill();
            }
            for v in q.voters.iter_mut() {
                v.restart()?;
            }
            let s = q
                .wait_status("the holder and session after restart", WAIT, |s| {
                    holder_of(s) == Some((a.opts.member_id.clone(), t1))
                        && group_of(s).is_some_and(|g| g.session_id == "5e5510a0-0000-4000-8000-00000000000d")
                        && s.members.len() == 2
                })
                .await?;
            assert_eq!(group_of(&s).map(|g| g.token), Some(t1));
            a.wait_for("served after restart", WAIT, |r| r.held_token() == Some(t1) && r.joined.len() >= 2).await?;
            // The next token is larger than every earlier one.
            a.set_silent(true);
            b.wait_for("a grant", WAIT, |r| !r.grants.is_empty()).await?;
            let t2 = b.rec().last_grant().map(|g| g.token).unwrap_or(0);
            assert!(t2 > t1, "token {t2} after restart must exceed {t1}");
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_a_follower_redirects_an_agent_to_the_leader() {
    with_quorum(QuorumOptions::default(), |mut q| async move {
        let r = async {
            let s = q.status().await?;
            let leader_addr = s.voters.iter().find(|v| v.role == "leader").map(|v| v.address.clone()).expect("leader");
            let follower = q.voters.iter().find(|v| v.id != s.leader).expect("follower").addr();
            // Raw attach to the follower: UNAVAILABLE naming the leader.
            let tls = q.certs.agent("a")?;
            let mut c = pb::agent_service_client::AgentServiceClient::new(tls.channel(&follower)?);
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            drop(tx);
            let err =
                c.attach(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect_err("follower must refuse");
            assert_eq!(err.code(), tonic::Code::Unavailable);
            let hint = arcfed_proto::leader::leader_hint(&err);
            assert_eq!(hint.as_deref(), Some(leader_addr.as_str()), "{err:?}");
            // The library agent follows it and gets served.
            let a = TestAgent::start(AgentOptions::new(vec![follower.clone()], tls.clone(), "a"));
            a.joined(WAIT).await?;
            assert!(a.rec().errors.iter().any(|e| e.2.as_deref() == Some(leader_addr.as_str())));
            a.stop();
            // After a leader SIGKILL its followers still name it until they elect another. An
            // agent that lets the follower wait (x-arcfed-await-leader-ms) is answered only
            // once a leader is alive: named (a redirect to the new leader, never the dead one)
            // or the follower itself, serving.
            q.voter(s.leader).kill();
            let mut c = pb::agent_service_client::AgentServiceClient::new(tls.channel(&follower)?);
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            arcfed_proto::leader::set_await_leader(&mut req, Duration::from_secs(10));
            let answer = c.attach(req).await;
            drop(tx);
            let now = q.wait_status("a new serving leader", WAIT, |x| x.leader != s.leader).await?;
            let new_addr = now.voters.iter().find(|v| v.id == now.leader).map(|v| v.address.clone()).expect("leader");
            match answer {
                Err(err) => {
                    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
                    let hint = arcfed_proto::leader::leader_hint(&err);
                    assert_ne!(hint.as_deref(), Some(leader_addr.as_str()), "named the dead leader: {err:?}");
                    assert_eq!(hint.as_deref(), Some(new_addr.as_str()), "{err:?}");
                    // Named only once it serves (its Advertise applied at the follower): an
                    // attach that does not wait is served at once, not sent back.
                    let mut c = pb::agent_service_client::AgentServiceClient::new(tls.channel(&new_addr)?);
                    let (_tx, rx) = tokio::sync::mpsc::channel(1);
                    let served = c.attach(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
                    assert!(served.is_ok(), "redirected to a leader that did not serve yet: {:?}", served.err());
                }
                Ok(_) => {
                    let served_by = q.voters.iter().find(|v| v.addr() == follower).map(|v| v.id);
                    assert_eq!(served_by, Some(now.leader), "a follower opened an agent stream");
                }
            }
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_identity_comes_from_the_certificate_and_roles_are_enforced() {
    with_quorum(QuorumOptions::default(), |q| async move {
        let r = async {
            let a = agent(&q, "a");
            a.joined(WAIT).await?;
            let leader = q.status().await?.voters.into_iter().find(|v| v.role == "leader").expect("leader").address;
            // A cluster-b certificate cannot act for cluster a's member.
            let mut opts = AgentOptions::new(vec![leader.clone()], q.certs.agent("b")?, "b");
            opts.member_id = a.opts.member_id.clone();
            let impostor = TestAgent::start(opts);
            impostor
                .wait_for("a refusal", WAIT, |r| r.errors.iter().any(|e| e.0 == tonic::Code::PermissionDenied))
                .await?;
            assert!(impostor.rec().joined.is_empty());
            impostor.stop();
            let s = q.status().await?;
            assert_eq!(s.members.len(), 1);
            assert_eq!(s.members[0].cluster, "a");
            // Oversized input never reaches memory or the log: a 3 MB Join is refused by the
            // message limit, a 3 KB configure URL by validation; the state keeps its one member.
            for len in [3 * 1024 * 1024, 3 * 1024] {
                let mut opts = AgentOptions::new(vec![leader.clone()], q.certs.agent("c")?, "c");
                opts.configure_url = format!("https://github.example/{}", "x".repeat(len));
                let big = TestAgent::start(opts);
                big.wait_for("a refusal", WAIT, |r| !r.errors.is_empty()).await?;
                assert!(big.rec().joined.is_empty(), "a {len}-byte configure URL was admitted");
                big.stop();
            }
            assert_eq!(q.status().await?.members.len(), 1, "the state is intact");
            // An unknown CA is refused at the handshake.
            let other = arcfed_tests::harness::Certs::init(&q.dir.join("foreign"))?;
            let foreign = other.agent("a")?;
            let mut c = pb::agent_service_client::AgentServiceClient::new(foreign.channel(&leader)?);
            let (_tx, rx) = tokio::sync::mpsc::channel(1);
            let err = c.attach(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect_err("unknown CA");
            assert_ne!(err.code(), tonic::Code::Ok);
            // An agent certificate cannot call admin or peer RPCs.
            let agent_tls = q.certs.agent("a")?;
            let mut admin = pb::admin_service_client::AdminServiceClient::new(agent_tls.channel(&leader)?);
            let err = admin.status(pb::StatusRequest {}).await.expect_err("agent calling admin");
            assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
            let mut peer = pb::raft_service_client::RaftServiceClient::new(agent_tls.channel(&leader)?);
            let err = peer.vote(pb::RaftPayload { json: b"{}".to_vec() }).await.expect_err("agent calling raft");
            assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
            // An admin certificate cannot attach as an agent.
            let mut as_agent = pb::agent_service_client::AgentServiceClient::new(q.admin.channel(&leader)?);
            let (_tx2, rx2) = tokio::sync::mpsc::channel(1);
            let err =
                as_agent.attach(tokio_stream::wrappers::ReceiverStream::new(rx2)).await.expect_err("admin as agent");
            assert_eq!(err.code(), tonic::Code::PermissionDenied);
            // Refusals are logged: wrong roles and the impostor's Join.
            let logs = q.dump_logs();
            assert!(logs.contains("refused client: wrong role"), "no wrong-role refusal in the logs");
            assert!(logs.contains("tried to act for a member of cluster a"), "no impostor refusal in the logs");
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_handover_grants_after_release_or_after_deadline_plus_ttl() {
    with_quorum(QuorumOptions::default(), |q| async move {
        let r = async {
            let (a, t1, b) = holder_and_standby(&q).await?;
            let group = group_of(&q.status().await?).expect("group").key.clone();
            // 1. The holder cooperates: Release, then the target is granted.
            let out = ctl(&q, &["handover", &group, "--to", &b.opts.member_id])?;
            assert!(out.contains("handover"), "{out}");
            a.wait_for("a handover request", WAIT, |r| !r.handovers.is_empty()).await?;
            assert_eq!(a.rec().handovers[0].0.to_member, b.opts.member_id);
            let res = a.release(t1, vec![], pb::ReleaseReason::Handover).await?;
            assert!(is_accepted(&res), "{res:?}");
            b.wait_for("the grant", WAIT, |r| !r.grants.is_empty()).await?;
            let t2 = b.rec().last_grant().map(|g| g.token).unwrap_or(0);
            assert!(t2 > t1);
            b.wait_for("an ack listing t2", WAIT, |r| r.held_token() == Some(t2)).await?;
            // 2. The holder ignores it: the grant follows the deadline, then a TTL after the last
            //    ack that listed (group, t2), so after b's own fence ended.
            let asked = Instant::now();
            ctl(&q, &["handover", &group, "--to", &a.opts.member_id, "--deadline", "2s"])?;
            b.wait_for("a handover request", WAIT, |r| !r.handovers.is_empty()).await?;
            a.wait_for("the grant back", WAIT, |r| r.grants.len() >= 2).await?;
            let g = a.rec().last_grant().cloned().expect("grant");
            assert!(g.token > t2);
            assert!(g.received_at >= asked + Duration::from_secs(2), "granted before the handover deadline");
            let fence = b.rec().fence_end(t2).expect("b had a fence");
            assert!(
                g.received_at >= fence,
                "grant at {:?} precedes the ignoring holder's fence end {:?}",
                g.received_at,
                fence
            );
            // After the deadline, b's acks stop listing t2.
            let last_listing =
                b.rec().acks.iter().rev().find(|k| k.held.iter().any(|h| h.1 == t2)).map(|k| k.received_at);
            assert!(
                last_listing.is_some_and(|l| l <= asked + Duration::from_secs(3)),
                "acks kept listing t2 long after the deadline"
            );
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i_an_isolated_leader_stops_acking_and_the_majority_grants_after_the_fence() {
    let opts = QuorumOptions { peer_proxies: true, ..QuorumOptions::default() };
    with_quorum(opts, |q| async move {
        let r = async {
            let s = q.status().await?;
            let leader = s.leader;
            let leader_addr = q.voters.iter().find(|v| v.id == leader).expect("leader").addr();
            // The holder is in the leader's region: it reaches only that voter.
            let mut ao = AgentOptions::new(vec![leader_addr], q.certs.agent("a")?, "a");
            ao.priority = 0;
            let a = TestAgent::start(ao);
            a.joined(WAIT).await?;
            let (_, t1) = wait_holder(&q, &[&a]).await?;
            let mut bo = AgentOptions::new(q.endpoints(), q.certs.agent("b")?, "b");
            bo.priority = 1;
            let b = TestAgent::start(bo);
            b.joined(WAIT).await?;
            q.wait_status("two members", WAIT, |s| s.members.len() == 2).await?;
            let cut = Instant::now();
            q.isolate(leader, Mode::Blackhole);
            // The majority elects another leader, expires a, and grants b.
            b.wait_for("a grant from the majority", Duration::from_secs(60), |r| !r.grants.is_empty()).await?;
            let g = b.rec().last_grant().cloned().expect("grant");
            assert!(g.token > t1);
            let fence = a.rec().fence_end(t1).expect("a had a fence");
            assert!(
                g.received_at > fence,
                "grant {:?} came before the isolated holder's fence end {:?}",
                g.received_at,
                fence
            );
            // The isolated leader stopped acking: its last ack answered a keepalive sent
            // within TTL×margin (+ one keepalive period of slack) of the cut.
            let window = Duration::from_millis(1000) + Duration::from_millis(750);
            let late = a.rec().acks.iter().filter(|k| k.sent_at > cut + window).count();
            assert_eq!(late, 0, "the isolated leader acked keepalives sent well after the cut");
            println!(
                "isolated leader: last ack for a keepalive sent {:?} after the cut; grant {:?} after a's fence end",
                a.rec().acks.last().map(|k| k.sent_at.saturating_duration_since(cut)),
                g.received_at.duration_since(fence)
            );
            q.isolate(leader, Mode::Pass);
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn j_a_keepalive_after_the_deadline_gets_expired_and_rejoin_gives_a_new_epoch() {
    with_quorum(QuorumOptions::default(), |q| async move {
        let r = async {
            let a = agent(&q, "a");
            let e1 = a.joined(WAIT).await?;
            a.set_silent(true);
            q.wait_status("a expired", WAIT, |s| s.members.iter().any(|m| m.status == "expired")).await?;
            let resumed = Instant::now();
            a.set_silent(false);
            a.wait_for("EXPIRED then a new Joined", WAIT, |r| !r.expired.is_empty() && r.joined.len() >= 2).await?;
            let e2 = a.rec().epoch().unwrap_or(0);
            assert!(e2 > e1, "epoch {e2} must exceed {e1}");
            // No renewal past death: every keepalive sent after the deadline and before the
            // agent learnt it was EXPIRED (so before its re-Join) went unacked.
            {
                let rec = a.rec();
                let told = rec.expired.first().map(|e| e.1).expect("an EXPIRED");
                let late: Vec<u64> =
                    rec.sent.iter().filter(|(_, t)| **t >= resumed && **t <= told).map(|(seq, _)| *seq).collect();
                assert!(!late.is_empty(), "no keepalive was sent after the deadline");
                let acked: Vec<u64> = rec.acks.iter().filter(|k| late.contains(&k.seq)).map(|k| k.seq).collect();
                assert!(acked.is_empty(), "keepalives {acked:?} sent after the deadline were acked");
            }
            q.wait_status("a live again", WAIT, |s| s.members.iter().any(|m| m.status == "live" && m.epoch == e2))
                .await?;
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_old_tokens_are_rejected_and_a_late_session_lands_in_the_stale_set() {
    with_quorum(QuorumOptions::default(), |q| async move {
        let r = async {
            let (a, t1, b) = holder_and_standby(&q).await?;
            a.set_silent(true);
            b.wait_for("a grant", WAIT, |r| !r.grants.is_empty()).await?;
            a.set_silent(false);
            a.wait_for("rejoined", WAIT, |r| r.joined.len() >= 2).await?;
            let p = a.progress(t1, Some(1), 3).await?;
            assert!(rejection(&p).is_some_and(|r| r.starts_with("stale_token")), "{p:?}");
            let s = a.session_opened(t1, "5e5510a0-0000-4000-8000-00000000000e").await?;
            assert!(rejection(&s).is_some_and(|r| r.starts_with("stale_token")), "{s:?}");
            let rel = a.release(t1, vec![], pb::ReleaseReason::Shutdown).await?;
            assert!(rejection(&rel).is_some_and(|r| r.starts_with("stale_token")), "{rel:?}");
            let st = q.status().await?;
            let g = group_of(&st).expect("group");
            assert!(
                g.stale_sessions.contains(&"5e5510a0-0000-4000-8000-00000000000e".to_string()),
                "{:?}",
                g.stale_sessions
            );
            assert_eq!(g.holder, b.opts.member_id);
            b.wait_for("told to delete the late session", WAIT, |r| {
                r.delete_sessions
                    .iter()
                    .any(|d| d.session_ids.contains(&"5e5510a0-0000-4000-8000-00000000000e".to_string()))
            })
            .await?;
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l_a_one_sided_close_never_brings_the_grant_before_the_fence_bound() {
    with_quorum(QuorumOptions::default(), |q| async move {
        let r = async {
            let s = q.status().await?;
            let leader_addr = q.voters.iter().find(|v| v.id == s.leader).expect("leader").addr();
            let proxy = FaultProxy::start(leader_addr.parse()?).await?;
            let a = TestAgent::start(AgentOptions::new(vec![proxy.addr().to_string()], q.certs.agent("a")?, "a"));
            a.joined(WAIT).await?;
            let (_, t1) = wait_holder(&q, &[&a]).await?;
            let b = agent(&q, "b");
            b.joined(WAIT).await?;
            q.wait_status("two members", WAIT, |s| s.members.len() == 2).await?;
            let cut = Instant::now();
            proxy.set_mode(Mode::ResetUpstreamBlackholeDownstream);
            b.wait_for("a grant", WAIT, |r| !r.grants.is_empty()).await?;
            let g = b.rec().last_grant().cloned().expect("grant");
            assert!(g.token > t1);
            let last_ka = a.rec().sent.values().copied().filter(|t| *t <= cut).max().expect("a sent keepalives");
            // TTL × (1 − margin) × (1 + 2ρ) with TTL 3 s, margin 0.333, ρ 0.01.
            let bound = Duration::from_millis(3000 * 667 / 1000 * 1020 / 1000);
            assert!(
                g.received_at >= last_ka + bound,
                "grant {:?} after the last keepalive, below the bound {bound:?}",
                g.received_at.duration_since(last_ka)
            );
            assert!(g.received_at >= a.rec().fence_end(t1).expect("fence"));
            let _ = free_port();
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_voters_are_added_and_removed_through_admin_and_sigterm_is_graceful() {
    with_quorum(QuorumOptions::default(), |mut q| async move {
        let r = async {
            let a = agent(&q, "a");
            let (_, t) = wait_holder(&q, &[&a]).await?;
            // The admin HTTP port: /live, /ready and the metrics the issue lists.
            let leader = q.status().await?.leader;
            let http = q.voters.iter().find(|v| v.id == leader).expect("leader").http;
            let get = |path: &'static str| async move {
                let body = reqwest::get(format!("http://{http}{path}")).await?;
                let code = body.status();
                anyhow::Ok((code, body.text().await?))
            };
            assert!(get("/live").await?.0.is_success());
            assert!(get("/ready").await?.0.is_success());
            let (_, metrics) = get("/metrics").await?;
            for name in [
                "arcfed_raft_term",
                "arcfed_raft_leader",
                "arcfed_raft_commit_index",
                "arcfed_raft_applied_index",
                "arcfed_quorum_contact_age_ms",
                "arcfed_members{status=\"live\"} 1",
                "arcfed_holders 1",
                "arcfed_replicated_grants",
                "arcfed_replicated_expirations",
                "arcfed_replicated_stale_token_rejections",
                "arcfed_replicated_handovers",
                "arcfed_grant_latency_seconds_bucket",
            ] {
                assert!(metrics.contains(name), "/metrics lacks {name}:\n{metrics}");
            }
            // Add a fourth voter, then remove it again.
            let addr = q.spawn_extra_voter(4)?.addr();
            let out = ctl(&q, &["voters", "add", "--id", "4", "--address", &addr])?;
            assert!(out.contains("voter"), "{out}");
            q.wait_status("four voters", WAIT, |s| s.voters.len() == 4 && s.voters.iter().all(|v| v.role != "learner"))
                .await?;
            ctl(&q, &["voters", "remove", "--id", "4"])?;
            q.wait_status("three voters", WAIT, |s| s.voters.len() == 3 && s.voters.iter().all(|v| v.id != 4)).await?;
            // SIGTERM: the leader exits cleanly and promptly; a new leader serves; no holder change.
            let code = q.voter(leader).terminate(Duration::from_secs(10));
            assert_eq!(code, Some(0), "SIGTERM exit code");
            // An operator command issued during the election waits for the new leader instead
            // of failing on "not the serving leader" or a redirect to the stopped one.
            let args = admin_args(&q);
            let out = tokio::task::spawn_blocking(move || {
                let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
                a.extend(["status", "-o", "json"]);
                arcfedctl(&a)
            })
            .await??;
            let during: serde_json::Value = serde_json::from_str(out.trim())?;
            let new_leader = during["leader"].as_u64().unwrap_or(0);
            assert!(new_leader != 0 && new_leader != leader, "status during the election: {during}");
            let s = q.wait_status("a new leader", WAIT, |s| s.leader != leader && s.leader != 4).await?;
            assert_eq!(holder_of(&s), Some((a.opts.member_id.clone(), t)));
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o_five_voters_bootstrap_from_flags_and_survive_losing_two() {
    let opts = QuorumOptions { voters: 5, ..QuorumOptions::default() };
    with_quorum(opts, |mut q| async move {
        let r = async {
            let s = q.wait_status("five voters", WAIT, |s| s.voters.len() == 5).await?;
            let a = agent(&q, "a");
            let b = agent(&q, "b");
            let (h, t) = wait_holder(&q, &[&a, &b]).await?;
            let holder = if h == 0 { &a } else { &b };
            // Lose the leader and one follower: three of five still form a quorum.
            let follower = s.voters.iter().find(|v| v.id != s.leader).map(|v| v.id).expect("follower");
            let killed = Instant::now();
            q.voter(s.leader).kill();
            q.voter(follower).kill();
            let s2 = q.wait_status("a new leader", WAIT, |x| x.leader != s.leader && x.leader != follower).await?;
            assert_eq!(holder_of(&s2), Some((holder.opts.member_id.clone(), t)), "no holder change");
            holder
                .wait_for("served by the new leader", WAIT, |r| {
                    r.acks.last().is_some_and(|k| k.received_at > killed && k.held.iter().any(|x| x.1 == t))
                })
                .await?;
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p_drain_moves_the_holder_and_bad_agent_input_is_named() {
    with_quorum(QuorumOptions::default(), |q| async move {
        let r = async {
            let (a, t1, b) = holder_and_standby(&q).await?;
            // Drain the holder: it is asked to hand over, and its assignment drops to zero.
            let out = ctl(&q, &["drain", &a.opts.member_id[..8]])?;
            assert!(out.contains("draining"), "{out}");
            a.wait_for("a handover request", WAIT, |r| r.handovers.iter().any(|h| h.0.token == t1)).await?;
            a.wait_for("a zero assignment with force_zero", WAIT, |r| {
                r.assignments.last().is_some_and(|x| x.0.runners == 0 && x.0.force_zero_patch)
            })
            .await?;
            assert!(is_accepted(&a.release(t1, vec![], pb::ReleaseReason::Handover).await?));
            b.wait_for("the grant", WAIT, |r| !r.grants.is_empty()).await?;
            let s = q.status().await?;
            assert!(s.members.iter().any(|m| m.id == a.opts.member_id && m.draining));
            // Bad protobuf input is refused with the field's name; state stays intact.
            let leader = s.voters.iter().find(|v| v.role == "leader").expect("leader").address.clone();
            let tls = q.certs.agent("c")?;
            for (join, want) in [
                (pb::Join { member_id: "c1".into(), group: None, ..Default::default() }, "join.group"),
                (
                    pb::Join {
                        member_id: "bad id!".into(),
                        group: Some(pb::GroupRef { configure_url: "https://x/o".into(), scale_set_id: 1 }),
                        ..Default::default()
                    },
                    "join.member_id",
                ),
                (
                    pb::Join {
                        member_id: "c2".into(),
                        group: Some(pb::GroupRef { configure_url: a.opts.configure_url.clone(), scale_set_id: 1 }),
                        ers_namespace: "ns".into(),
                        ers_name: "set-c".into(),
                        min_runners: 5,
                        max_runners: 1,
                        ..Default::default()
                    },
                    "join.max_runners",
                ),
                (
                    pb::Join {
                        member_id: "c3".into(),
                        group: Some(pb::GroupRef { configure_url: a.opts.configure_url.clone(), scale_set_id: 1 }),
                        ers_namespace: "ns".into(),
                        ers_name: "no spaces".into(),
                        max_runners: 1,
                        ..Default::default()
                    },
                    "join.ers_name",
                ),
            ] {
                let mut c = pb::agent_service_client::AgentServiceClient::new(tls.channel(&leader)?);
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Join(join)) }).await?;
                let res = c.attach(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
                let err = match res {
                    Err(e) => e,
                    Ok(resp) => resp.into_inner().message().await.expect_err("a refusal on the stream"),
                };
                assert!(err.message().contains(want), "{want}: {err:?}");
                // Refused before the log, as bad input (not as a rejected command).
                assert_eq!(err.code(), tonic::Code::InvalidArgument, "{want}: {err:?}");
                drop(tx);
            }
            let after = q.status().await?;
            assert_eq!(after.members.len(), 2, "refused joins left no member behind");
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

/// Issue 8, item 8: `status` tells a stopped voter from a follower (reachability and last
/// contact as the leader sees them) and shows each member's assignment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_status_shows_a_stopped_voter_as_unreachable_and_assignments_per_member() {
    with_quorum(QuorumOptions::default(), |mut q| async move {
        let r = async {
            let a = agent(&q, "a");
            a.joined(WAIT).await?;
            let s = q
                .wait_status("every voter reachable", WAIT, |s| {
                    s.voters.len() == 3 && s.voters.iter().all(|v| v.reachable && v.last_contact_ms >= 0)
                })
                .await?;
            assert!(s.voters.iter().filter(|v| v.role == "follower").count() == 2, "{:?}", s.voters);
            let follower = s.voters.iter().find(|v| v.id != s.leader).map(|v| v.id).expect("a follower");
            q.voter(follower).kill();
            let s = q
                .wait_status("the stopped voter shown unreachable", WAIT, |s| {
                    s.voters.iter().any(|v| v.id == follower && !v.reachable && v.role == "unreachable")
                })
                .await?;
            let v = s.voters.iter().find(|v| v.id == follower).expect("voter");
            assert!(v.last_contact_ms > 0, "{v:?}");
            // Assignments per member: the member row agrees with the group's assignment.
            let g = group_of(&s).expect("group");
            let m = s.members.iter().find(|m| m.id == a.opts.member_id).expect("member a");
            let want = g.assignments.iter().find(|x| x.member == m.id).map(|x| x.runners).unwrap_or(0);
            assert_eq!(m.assignment, want);
            let table = ctl(&q, &["status"])?;
            assert!(table.contains("unreachable") && table.contains("ASSIGN"), "{table}");
            let json: serde_json::Value = serde_json::from_str(&ctl(&q, &["status", "-o", "json"])?)?;
            let jv = json["voters"].as_array().expect("voters").iter().find(|v| v["id"] == follower).cloned();
            assert_eq!(jv.as_ref().map(|v| v["reachable"].clone()), Some(serde_json::Value::Bool(false)), "{json}");
            assert!(json["members"][0]["assignment"].is_i64(), "{json}");
            q.voter(follower).restart()?;
            q.wait_status("the voter back as a follower", WAIT, |s| {
                s.voters.iter().any(|v| v.id == follower && v.reachable && v.role == "follower")
            })
            .await?;
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

/// `arcfed_raft_applied_index` from a voter's admin port.
async fn applied_index(http: std::net::SocketAddr) -> anyhow::Result<u64> {
    raft_gauge(http, "arcfed_raft_applied_index").await
}

async fn raft_gauge(http: std::net::SocketAddr, name: &str) -> anyhow::Result<u64> {
    let text = reqwest::get(format!("http://{http}/metrics")).await?.text().await?;
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()).and_then(|v| v.trim().parse::<f64>().ok()))
        .map(|v| v as u64)
        .ok_or_else(|| anyhow::anyhow!("no {name} in /metrics"))
}

/// Sizes of the snapshots a voter logged as installed from the leader.
fn installed_snapshot_sizes(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("installed a snapshot from the leader"))
        .filter_map(|l| l.split("bytes=").nth(1))
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_a_lagging_follower_catches_up_through_a_snapshot_sent_in_chunks() {
    // A tiny chunk, a snapshot every 10 entries and no log kept behind it: a follower that
    // missed the entries can only catch up from a snapshot many chunks long.
    const CHUNK: u64 = 512;
    let opts = QuorumOptions {
        extra_args: ["--snapshot-chunk-size", "512", "--snapshot-every", "10", "--snapshot-keep-log", "0"]
            .map(String::from)
            .to_vec(),
        ..QuorumOptions::default()
    };
    with_quorum(opts, |mut q| async move {
        let r = async {
            let s = q.wait_status("three voters", WAIT, |s| s.voters.len() == 3).await?;
            let follower = s.voters.iter().find(|v| v.id != s.leader).map(|v| v.id).expect("a follower");
            let had = applied_index(q.voter(follower).http).await.unwrap_or(0);
            q.voter(follower).kill();
            // Entries the follower misses: a Join per agent, a Grant, more than a snapshot's
            // worth. One agent at a time: concurrent Joins would share entries (group commit).
            let mut agents: Vec<TestAgent> = Vec::new();
            for i in 0..12 {
                let a = agent(&q, &format!("c{i}"));
                a.joined(WAIT).await?;
                agents.push(a);
            }
            let s = q
                .wait_status("every member and a holder", WAIT, |s| s.members.len() == 12 && holder_of(s).is_some())
                .await?;
            let leader_http = q.voters.iter().find(|v| v.id == s.leader).expect("leader").http;
            let target = applied_index(leader_http).await?;
            // Restart the follower only once the leader has purged past what it had: then only
            // a snapshot can bring it up to date (openraft purges after a snapshot, once no
            // replication still reads those entries; without this wait the test was flaky).
            let end = Instant::now() + WAIT;
            while raft_gauge(leader_http, "arcfed_raft_purged_index").await.unwrap_or(0) <= had {
                if Instant::now() > end {
                    anyhow::bail!("the leader never purged its log past index {had}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            q.voter(follower).restart()?;
            let http = q.voter(follower).http;
            let end = Instant::now() + WAIT;
            loop {
                let applied = applied_index(http).await.unwrap_or(0);
                let sizes = installed_snapshot_sizes(&q.voter(follower).log_text());
                if applied >= target && !sizes.is_empty() {
                    // The installed snapshot was larger than a chunk: it arrived in pieces.
                    assert!(sizes.iter().any(|b| *b > CHUNK), "snapshots {sizes:?} all fit one {CHUNK}-byte chunk");
                    break;
                }
                if Instant::now() > end {
                    anyhow::bail!("follower {follower} applied {applied} of {target}; snapshots installed: {sizes:?}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // The caught-up follower carries the quorum: with the old leader gone it and the
            // other voter serve the same state.
            q.voter(s.leader).kill();
            let s2 = q
                .wait_status("a new leader with every member", WAIT, |x| x.leader != s.leader && x.members.len() == 12)
                .await?;
            assert_eq!(holder_of(&s2), holder_of(&s), "no holder change");
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

/// An agent that reaches every voter through its own fault proxy, so the test can cut its
/// streams one-sidedly.
struct ProxiedAgent {
    cluster: String,
    agent: TestAgent,
    proxies: Vec<FaultProxy>,
}

async fn proxied_agent(q: &Quorum, cluster: &str) -> anyhow::Result<ProxiedAgent> {
    let mut proxies = Vec::new();
    for v in &q.voters {
        proxies.push(FaultProxy::start(v.addr().parse()?).await?);
    }
    let endpoints = proxies.iter().map(|p| p.addr().to_string()).collect();
    let agent = TestAgent::start(AgentOptions::new(endpoints, q.certs.agent(cluster)?, cluster));
    Ok(ProxiedAgent { cluster: cluster.to_string(), agent, proxies })
}

/// A small robustness run in the spirit of etcd's: random faults (leader SIGKILL, leader
/// SIGSTOP past the TTL, a partition of the leader, holder silence, a one-sided close of the
/// holder's stream in either direction, holder death) against three regions, recording
/// every grant and ack. Then the history, in the order it was observed, is checked against
/// the invariants: each token reaches one member, tokens only grow, and every new token is
/// received after the previous holder's fence ended (invariant 1, on this process's clock).
/// The seed is printed to replay a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q_random_faults_never_overlap_two_holders_fences() {
    let opts = QuorumOptions { peer_proxies: true, ..QuorumOptions::default() };
    with_quorum(opts, |mut q| async move {
        let r = async {
            let seed: u64 = std::env::var("ARCFED_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
            println!("seed {seed} (replay with ARCFED_SEED={seed})");
            let mut rng = seed | 1;
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let mut live: Vec<ProxiedAgent> = Vec::new();
            for c in ["a", "b", "c"] {
                live.push(proxied_agent(&q, c).await?);
            }
            let mut retired: Vec<ProxiedAgent> = Vec::new();
            wait_holder(&q, &live.iter().map(|x| &x.agent).collect::<Vec<_>>()).await?;
            for step in 0..8 {
                let s = q.wait_status("a holder", WAIT, |s| holder_of(s).is_some()).await?;
                let (h, _) = holder_of(&s).expect("holder");
                let hi = live.iter().position(|x| x.agent.opts.member_id == h);
                let fault = next(6);
                println!("step {step}: fault {fault}, holder {h}");
                match (fault, hi) {
                    (0, _) => {
                        q.voter(s.leader).kill();
                        q.wait_status("a new leader", WAIT, |x| x.leader != s.leader).await?;
                        q.voter(s.leader).restart()?;
                    }
                    (1, _) => {
                        q.voter(s.leader).freeze();
                        let r = q.wait_status("a new leader", WAIT, |x| x.leader != s.leader).await;
                        tokio::time::sleep(Duration::from_millis(500 + next(3000))).await;
                        q.voter(s.leader).thaw();
                        r?;
                    }
                    (2, _) => {
                        // A partition of the leader from its peers (agents still reach it).
                        q.isolate(s.leader, Mode::Blackhole);
                        tokio::time::sleep(Duration::from_millis(500 + next(4000))).await;
                        q.isolate(s.leader, Mode::Pass);
                    }
                    (3, Some(i)) => {
                        live[i].agent.set_silent(true);
                        tokio::time::sleep(Duration::from_millis(3500 + next(1500))).await;
                        live[i].agent.set_silent(false);
                    }
                    (4, Some(i)) => {
                        // A one-sided close: one end sees the stream end, the other sees silence.
                        let mode = if next(2) == 0 {
                            Mode::ResetUpstreamBlackholeDownstream
                        } else {
                            Mode::ResetDownstreamBlackholeUpstream
                        };
                        println!("  one-sided close: {mode:?}");
                        for p in &live[i].proxies {
                            p.set_mode(mode.clone());
                        }
                        tokio::time::sleep(Duration::from_millis(1000 + next(3500))).await;
                        for p in &live[i].proxies {
                            p.set_mode(Mode::Pass);
                        }
                    }
                    (_, Some(i)) => {
                        let dead = live.remove(i);
                        dead.agent.stop();
                        live.push(proxied_agent(&q, &dead.cluster).await?);
                        retired.push(dead);
                    }
                    _ => {}
                }
                q.wait_status("a holder again", WAIT, |s| holder_of(s).is_some()).await?;
                tokio::time::sleep(Duration::from_millis(500 + next(1500))).await;
            }
            // End with one certain takeover, so every run checks at least one handoff.
            let s = q
                .wait_status("a live holder", WAIT, |s| {
                    holder_of(s).is_some_and(|(h, _)| live.iter().any(|x| x.agent.opts.member_id == h))
                })
                .await?;
            let (h, _) = holder_of(&s).expect("holder");
            let i = live.iter().position(|x| x.agent.opts.member_id == h).expect("live holder");
            let dead = live.remove(i);
            dead.agent.stop();
            retired.push(dead);
            q.wait_status("another holder", WAIT, |s| holder_of(s).is_some_and(|(x, _)| x != h)).await?;
            let ours: Vec<&TestAgent> = live.iter().map(|x| &x.agent).collect();
            wait_holder(&q, &ours).await?;
            // Check the history in the order this process observed it. Receipt order is the
            // history, not the property: nothing below sorts by token.
            let all: Vec<&TestAgent> = live.iter().chain(retired.iter()).map(|x| &x.agent).collect();
            let mut history: Vec<(Instant, u64, usize)> = Vec::new();
            for (i, a) in all.iter().enumerate() {
                for g in &a.rec().grants {
                    history.push((g.received_at, g.token, i));
                }
            }
            history.sort_by_key(|h| h.0);
            check_grant_history(&history, |i, t| all[i].rec().fence_end(t))
                .map_err(|e| anyhow::anyhow!("{e} (seed {seed})"))?;
            println!("{} grants checked: {:?}", history.len(), history.iter().map(|g| g.1).collect::<Vec<_>>());
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

/// The checks of test q over grants in receipt order `(received_at, token, member index)`:
/// a token reaches one member only (a resend to the same member after a reconnect is fine),
/// first receipts of tokens strictly grow, and a new token held by another member arrives no
/// earlier than the end of the previous holder's fence (`fence_end(member, token)`).
fn check_grant_history(
    history: &[(Instant, u64, usize)],
    fence_end: impl Fn(usize, u64) -> Option<Instant>,
) -> anyhow::Result<()> {
    let mut owner: std::collections::BTreeMap<u64, usize> = std::collections::BTreeMap::new();
    let mut firsts: Vec<(Instant, u64, usize)> = Vec::new();
    for &(at, t, i) in history {
        match owner.insert(t, i) {
            Some(j) if j != i => anyhow::bail!("token {t} reached two members ({j} and {i})"),
            Some(_) => continue,
            None => firsts.push((at, t, i)),
        }
    }
    anyhow::ensure!(firsts.len() >= 2, "the run produced fewer than two grants: {history:?}");
    for w in firsts.windows(2) {
        let (_, t1, i1) = w[0];
        let (got2, t2, i2) = w[1];
        anyhow::ensure!(t2 > t1, "tokens went back: {t1} was received before {t2}");
        if i1 == i2 {
            continue; // the same member holding again after a rejoin
        }
        if let Some(end) = fence_end(i1, t1) {
            anyhow::ensure!(
                got2 >= end,
                "token {t2} reached its holder {:?} before token {t1}'s fence ended",
                end.duration_since(got2)
            );
        }
    }
    Ok(())
}

/// (t) A slow link between the leader and one follower (every append answered after its
/// heartbeat-long deadline) starts no election: the leader retries that follower within the
/// follower's election timeout, so the follower keeps hearing it. openraft's default pause of
/// 500 ms after an unreachable peer made the follower stand although the leader was alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t_a_slow_link_to_a_follower_starts_no_election() {
    let opts = QuorumOptions { peer_proxies: true, ..QuorumOptions::default() };
    with_quorum(opts, |q| async move {
        let r = async {
            let s = q.wait_status("three voters", WAIT, |s| s.voters.len() == 3).await?;
            let (leader, term) = (s.leader, s.term);
            let slow = s.voters.iter().find(|v| v.id != leader).map(|v| v.id).expect("a follower");
            // 40 ms each way: a round trip of 80 ms or more, past the 50 ms append deadline.
            for pair in [(leader, slow), (slow, leader)] {
                q.proxies[&pair].set_mode(Mode::Delay(Duration::from_millis(40)));
            }
            // Hold it for ten of the follower's election timeouts (300 ms at most) and watch.
            let end = Instant::now() + Duration::from_secs(3);
            let mut looks = 0;
            while Instant::now() < end {
                let s = q.status().await?;
                anyhow::ensure!(
                    (s.leader, s.term) == (leader, term),
                    "a leader change under a slow link: leader {leader} term {term} became leader {} term {}",
                    s.leader,
                    s.term
                );
                looks += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::ensure!(looks >= 10, "status answered only {looks} times in 3 s");
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

/// While `behind` is cut off: a Join the other two commit; then `heal`, wait until `behind`
/// applied it, and watch the leader for a second more: (leader, term) must not change at any
/// point (an absence, so a window sampled every 100 ms).
async fn heal_and_catch_up(
    q: &Quorum,
    behind: u64,
    (leader, term): (u64, u64),
    heal: impl FnOnce(),
) -> anyhow::Result<()> {
    let voter = |id| q.voters.iter().find(|v| v.id == id).expect("voter");
    let (behind_http, leader_http, leader_addr) = (voter(behind).http, voter(leader).http, voter(leader).addr());
    let a = agent(q, "a");
    a.joined(WAIT).await?;
    let target = applied_index(leader_http).await?;
    anyhow::ensure!(applied_index(behind_http).await? < target, "voter {behind} applied the Join while cut off");
    heal();
    let end = Instant::now() + WAIT;
    let mut caught_up: Option<Instant> = None;
    while caught_up.is_none_or(|at| at.elapsed() < Duration::from_secs(1)) {
        let s = q.status_at(&leader_addr).await?;
        anyhow::ensure!(
            (s.leader, s.term) == (leader, term),
            "the healed link changed the leader: leader {leader} term {term} became leader {} term {}",
            s.leader,
            s.term
        );
        if caught_up.is_none() && applied_index(behind_http).await? >= target {
            caught_up = Some(Instant::now());
        }
        anyhow::ensure!(Instant::now() < end, "voter {behind} did not catch up after the heal");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// (u) A voter cut off from both others for many of its election timeouts rejoins without
/// deposing the leader: alone it wins no pre-vote, so it never stands and its term never
/// moves, and when the link heals no higher term reaches the leader. Without pre-vote
/// (`--elections openraft`) the cut-off voter climbs terms while alone and the leader steps
/// down when the link heals, so this test fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn u_a_voter_cut_off_and_healed_does_not_depose_the_leader() {
    let opts = QuorumOptions { peer_proxies: true, ..QuorumOptions::default() };
    with_quorum(opts, |q| async move {
        let r = async {
            let s = q.wait_status("three voters", WAIT, |s| s.voters.len() == 3).await?;
            let (leader, term) = (s.leader, s.term);
            let cut = s.voters.iter().find(|v| v.id != leader).map(|v| v.id).expect("a follower");
            let voter = |id| q.voters.iter().find(|v| v.id == id).expect("voter");
            let cut_http = voter(cut).http;
            q.isolate(cut, Mode::Blackhole);
            // Alone, it comes to stand again and again, and each time no majority grants it.
            let end = Instant::now() + WAIT;
            while raft_gauge(cut_http, "arcfed_prevotes_lost_total").await? < 3 {
                anyhow::ensure!(Instant::now() < end, "the cut-off voter never lost three pre-votes");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::ensure!(
                raft_gauge(cut_http, "arcfed_elections_stood_total").await? == 0,
                "the cut-off voter stood"
            );
            let cut_term = raft_gauge(cut_http, "arcfed_raft_term").await?;
            anyhow::ensure!(cut_term == term, "the cut-off voter's term moved from {term} to {cut_term}");
            heal_and_catch_up(&q, cut, (leader, term), || q.isolate(cut, Mode::Pass)).await
        }
        .await;
        (q, r)
    })
    .await;
}

/// (v) A follower that stops hearing the leader while the leader still hears it (the path
/// leader → follower blackholed, follower → leader open: what a follower sees of a leader
/// too busy to send it heartbeats) does not depose that leader. It comes to stand again and
/// again, asks, and the leader (quorum contact fresh through the other follower) and the
/// other follower (it hears the leader) both refuse; the refusals name why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v_a_follower_that_cannot_hear_a_live_leader_does_not_depose_it() {
    let opts = QuorumOptions { peer_proxies: true, ..QuorumOptions::default() };
    with_quorum(opts, |q| async move {
        let r = async {
            let s = q.wait_status("three voters", WAIT, |s| s.voters.len() == 3).await?;
            let (leader, term) = (s.leader, s.term);
            let deaf = s.voters.iter().find(|v| v.id != leader).map(|v| v.id).expect("a follower");
            let voter = |id| q.voters.iter().find(|v| v.id == id).expect("voter");
            let (deaf_http, leader_addr) = (voter(deaf).http, voter(leader).addr());
            q.proxies[&(leader, deaf)].set_mode(Mode::Blackhole);
            let end = Instant::now() + WAIT;
            while raft_gauge(deaf_http, "arcfed_prevotes_lost_total").await? < 3 {
                anyhow::ensure!(Instant::now() < end, "the deaf follower never lost three pre-votes");
                let s = q.status_at(&leader_addr).await?;
                anyhow::ensure!(
                    (s.leader, s.term) == (leader, term),
                    "leader {} term {} while one way was cut",
                    s.leader,
                    s.term
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::ensure!(
                raft_gauge(deaf_http, "arcfed_elections_stood_total").await? == 0,
                "the deaf follower stood"
            );
            let log = voter(deaf).log_text();
            anyhow::ensure!(
                log.contains("did not grant the pre-vote") && log.contains("leads and heard a quorum"),
                "the deaf follower's log does not name the leader's refusal"
            );
            heal_and_catch_up(&q, deaf, (leader, term), || q.proxies[&(leader, deaf)].set_mode(Mode::Pass)).await
        }
        .await;
        (q, r)
    })
    .await;
}

/// The history check itself can fail: each broken history below is refused.
#[test]
fn q_history_check_refuses_broken_histories() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let fence = |_: usize, t: u64| Some(at(t * 1000 + 2000));
    // Good: token 10 (member 0) then token 20 (member 1) after 10's fence; a resend of 20.
    let good = [(at(0), 10, 0), (at(12_500), 20, 1), (at(13_000), 20, 1)];
    assert!(check_grant_history(&good, fence).is_ok());
    // Tokens received out of order (a sort by token would have hidden it).
    let back = [(at(0), 20, 0), (at(25_000), 10, 1)];
    assert!(check_grant_history(&back, |_, _| None).is_err());
    // One token at two members.
    let twice = [(at(0), 10, 0), (at(100), 10, 1), (at(20_000), 20, 1)];
    assert!(check_grant_history(&twice, |_, _| None).is_err());
    // The next token before the previous holder's fence ended.
    let overlap = [(at(0), 10, 0), (at(11_000), 20, 1)];
    assert!(check_grant_history(&overlap, fence).is_err());
    // Fewer than two grants checks nothing: refused too.
    assert!(check_grant_history(&[(at(0), 10, 0)], fence).is_err());
}

/// issue 24: cert-manager renews a voter's certificate in place; the voter serves the new one
/// to new connections without a restart, and `arcfed_tls_cert_not_after_seconds` follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn w_a_renewed_voter_certificate_is_served_without_a_restart() {
    with_quorum(QuorumOptions::default(), |mut q| async move {
        let r = async {
            let (http, pid) = (q.voter(1).http, q.voter(1).pid());
            let before = raft_gauge(http, "arcfed_tls_cert_not_after_seconds").await?;
            let dir = q.certs.dir.join("coordinator-1");
            let ca = q.certs.dir.join("ca");
            // 2 days instead of 365: the new certificate expires earlier than the old one.
            arcfedctl(&[
                "certs",
                "issue",
                "--ca",
                &ca.display().to_string(),
                "--role",
                "coordinator",
                "--name",
                "1",
                "--out",
                &dir.display().to_string(),
                "--ip",
                "127.0.0.1",
                "--dns",
                "localhost",
                "--days",
                "2",
            ])?;
            let want = arcfed_proto::tls::TlsPaths::in_dir(&dir).load()?.not_after_unix() as u64;
            anyhow::ensure!(want < before, "the renewed certificate expires at {want}, not before {before}");
            let end = Instant::now() + Duration::from_secs(60);
            loop {
                let now = raft_gauge(http, "arcfed_tls_cert_not_after_seconds").await?;
                if now == want {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < end,
                    "still serving notAfter {now} a minute after renewal (want {want})"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            anyhow::ensure!(q.voter(1).pid() == pid, "the voter restarted");
            // The quorum still works across the renewed certificate: an admin call and the
            // peers' channels (which open new connections to voter 1) both pass.
            q.wait_status("a serving leader after renewal", WAIT, |_| true).await?;
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

/// issue 24: `arcfed_leader_contact_age_seconds` lets one Prometheus per cluster tell "my
/// voter follows a live leader" from "no leader": small on every voter of a healthy quorum,
/// growing on a voter left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_every_voter_reports_its_contact_with_a_leader() {
    with_quorum(QuorumOptions::default(), |mut q| async move {
        let r = async {
            let age = |http| async move { raft_gauge(http, "arcfed_leader_contact_age_seconds").await };
            let https: Vec<_> = [1, 2, 3].iter().map(|id| (*id, q.voter(*id).http)).collect();
            for (id, http) in &https {
                let end = Instant::now() + WAIT;
                while age(*http).await? > 2 {
                    anyhow::ensure!(Instant::now() < end, "voter {id} reports no recent contact with a leader");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            // Two voters gone: the survivor's contact ages past the alert's 10 s.
            let leader = q.status().await?.leader;
            let survivor = if leader == 1 { 2 } else { 1 };
            for id in [1, 2, 3].into_iter().filter(|id| *id != survivor) {
                q.voter(id).kill();
            }
            let http = q.voter(survivor).http;
            let end = Instant::now() + WAIT;
            while age(http).await? <= 10 {
                anyhow::ensure!(Instant::now() < end, "the lone voter still reports a leader contact");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

/// issue 22 item 5: a voter's certificate speaks only for its own node id. A voter started
/// with another voter's certificate refuses to start; a peer RPC that claims another sender
/// than the certificate's is refused before Raft sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn y_raft_messages_are_bound_to_the_senders_certificate() {
    with_quorum(QuorumOptions::default(), |q| async move {
        let r = async {
            let two = q.certs.coordinator(2)?;
            let leader = q.status().await?.leader;
            let target = q.voters.iter().find(|v| v.id != 2 && v.id != leader).unwrap_or(&q.voters[0]);
            let ch = two.channel(&target.grpc.to_string())?;
            let mut c = arcfed_proto::raft_service_client::RaftServiceClient::new(ch);
            // A pre-vote and a vote in node 3's name, sent with node 2's key.
            let e = c
                .pre_vote(pb::PreVoteRequest { candidate: 3, term: 99 })
                .await
                .expect_err("a pre-vote in another voter's name");
            anyhow::ensure!(e.code() == tonic::Code::PermissionDenied, "{e:?}");
            let forged = serde_json::json!({
                "vote": {"leader_id": {"term": 99, "node_id": 3}, "committed": false},
                "last_log_id": null
            });
            let e = c
                .vote(pb::RaftPayload { json: serde_json::to_vec(&forged)? })
                .await
                .expect_err("a vote request in another voter's name");
            anyhow::ensure!(e.code() == tonic::Code::PermissionDenied, "{e:?}");
            anyhow::ensure!(e.message().contains("node 3"), "{e:?}");
            // In its own name the same key is heard (the pre-vote is answered, granted or not).
            c.pre_vote(pb::PreVoteRequest { candidate: 2, term: 1 }).await?;
            // A voter started as node 1 with node 2's certificate stops with a clear error.
            let dir = tempfile::tempdir()?;
            let out = std::process::Command::new(arcfed_tests::harness::bin_path("arcfed-coordinator"))
                .args(["--node-id", "1", "--peer", "1=127.0.0.1:1", "--listen", "127.0.0.1:0"])
                .args(["--admin-listen", "127.0.0.1:0", "--data-dir", &dir.path().display().to_string()])
                .args(["--tls-cert", &two.cert.display().to_string(), "--tls-key", &two.key.display().to_string()])
                .args(["--tls-ca", &two.ca.display().to_string()])
                .output()?;
            let err = String::from_utf8_lossy(&out.stderr);
            anyhow::ensure!(!out.status.success(), "a voter started with another voter's certificate");
            anyhow::ensure!(err.contains("--node-id 1") && err.contains("coordinator/2"), "{err}");
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

/// issue 22 item 4: `arcfedctl policy set` installs a replicated policy; a cluster it does not
/// list is refused (PERMISSION_DENIED naming the rule), a listed one joins, and every voter
/// shows the same policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn z_the_policy_refuses_a_cluster_it_does_not_list() {
    with_quorum(QuorumOptions::default(), |q| async move {
        let r = async {
            let dir = tempfile::tempdir()?;
            let file = dir.path().join("policy.json");
            // A typo is named before anything reaches the quorum.
            std::fs::write(&file, r#"{"rules": [{"groups": "*", "cluster": ["a"]}]}"#)?;
            let e = ctl(&q, &["policy", "set", "--file", &file.display().to_string()]).unwrap_err().to_string();
            anyhow::ensure!(e.contains("unknown field"), "{e}");
            std::fs::write(
                &file,
                r#"{"rules": [{"groups": "https://github.example/*", "clusters": ["a"]}], "unmatched": "deny"}"#,
            )?;
            let out = ctl(&q, &["policy", "set", "--file", &file.display().to_string()])?;
            anyhow::ensure!(out.contains("policy set (1 rule"), "{out}");
            let shown: serde_json::Value = serde_json::from_str(&ctl(&q, &["policy", "show"])?)?;
            anyhow::ensure!(shown["rules"][0]["clusters"][0] == "a" && shown["unmatched"] == "deny", "{shown}");
            let b = agent(&q, "b");
            b.wait_for("a refusal", WAIT, |r| {
                r.errors.iter().any(|e| e.0 == tonic::Code::PermissionDenied && e.1.contains("policy rule 0"))
            })
            .await?;
            anyhow::ensure!(b.rec().joined.is_empty(), "cluster b joined against the policy");
            let a = agent(&q, "a");
            a.joined(WAIT).await?;
            let s = q.status().await?;
            anyhow::ensure!(s.members.iter().all(|m| m.cluster == "a"), "{:?}", s.members);
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}

/// issue 22 item 6: one cluster's certificate holds at most --max-streams-per-cluster agent
/// streams on a voter; the next is refused with RESOURCE_EXHAUSTED, other clusters are not
/// affected, and a slot frees when a stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn za_streams_per_cluster_are_bounded() {
    let opts = QuorumOptions { extra_args: vec!["--max-streams-per-cluster".into(), "2".into()], ..Default::default() };
    with_quorum(opts, |q| async move {
        let r = async {
            let a1 = agent(&q, "a");
            let a2 = agent(&q, "a");
            a1.joined(WAIT).await?;
            a2.joined(WAIT).await?;
            let a3 = agent(&q, "a");
            a3.wait_for("a refusal", WAIT, |r| {
                r.errors
                    .iter()
                    .any(|e| e.0 == tonic::Code::ResourceExhausted && e.1.contains("--max-streams-per-cluster"))
            })
            .await?;
            anyhow::ensure!(a3.rec().joined.is_empty(), "a third stream of cluster a was served");
            let b = agent(&q, "b");
            b.joined(WAIT).await?;
            a1.stop();
            let a4 = agent(&q, "a");
            a4.joined(WAIT).await?;
            Ok(())
        }
        .await;
        (q, r)
    })
    .await;
}
