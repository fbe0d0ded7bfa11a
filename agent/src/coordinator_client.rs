//! The coordinator client: one mTLS gRPC stream per agent process (DESIGN §2).
//!
//! This file only opens streams and converts between protobuf and the agent core's events;
//! when to connect, keep alive, follow the leader or give up is decided by
//! `arcfed_agent_core::link`. TLS material is read from disk on every attach, so a certificate
//! that cert-manager rotated is used from the next connection on.

use arcfed_proto as pb;
use arcfed_proto::agent_service_client::AgentServiceClient;
use arcfed_proto::tls::TlsPaths;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::Endpoint;

/// An open stream: messages to send, and what the coordinator answers.
pub struct Stream {
    pub tx: mpsc::Sender<pb::AgentMessage>,
    pub rx: tonic::Streaming<pb::CoordinatorMessage>,
    /// Expiry (Unix seconds) of the certificate this stream presented: the files are read at
    /// every attach, so a renewed certificate is used from the next one on.
    pub cert_not_after: i64,
}

/// Why an attach failed, and the leader a follower named, if any.
#[derive(Debug)]
pub struct AttachError {
    pub message: String,
    pub redirect: Option<String>,
    /// Nothing answered at the address (no TCP or TLS connection): a dead process, not a
    /// coordinator that said no.
    pub unreachable: bool,
}

impl From<tonic::Status> for AttachError {
    fn from(st: tonic::Status) -> Self {
        AttachError {
            redirect: arcfed_proto::leader::leader_hint(&st),
            message: format!("{:?}: {}", st.code(), st.message()),
            unreachable: false,
        }
    }
}

/// What an attach keeps of its timeout for the answer of a coordinator that waited for a
/// leader to reach it.
const AWAIT_MARGIN: Duration = Duration::from_millis(300);

/// Opens a stream to `addr` (HOST:PORT) and sends `join` as its first message.
pub async fn attach(
    tls: &TlsPaths,
    addr: &str,
    join: pb::AgentMessage,
    timeout: Duration,
) -> Result<Stream, AttachError> {
    let fail = |message: String| AttachError { message, redirect: None, unreachable: false };
    let material = tls.load().map_err(|e| fail(e.to_string()))?;
    let cert_not_after = material.not_after_unix();
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| fail(format!("coordinator address {addr:?}: {e}")))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .tls_config(material.client_config(host))
        .map_err(|e| fail(format!("TLS settings for {addr}: {e}")))?;
    let started = tokio::time::Instant::now();
    let open = async {
        let channel = endpoint.connect().await.map_err(|e| AttachError {
            message: format!("connect to {addr}: {e}"),
            redirect: None,
            unreachable: true,
        })?;
        let (tx, out_rx) = mpsc::channel::<pb::AgentMessage>(256);
        tx.send(join).await.map_err(|_| fail("stream closed before the Join".into()))?;
        let mut client = AgentServiceClient::new(channel);
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(out_rx));
        // A coordinator that knows no live leader may hold the answer until one is elected,
        // within what is left of the attach timeout (less a margin for the answer's way back).
        let left = timeout.saturating_sub(started.elapsed());
        arcfed_proto::leader::set_await_leader(&mut req, left.saturating_sub((left / 3).max(AWAIT_MARGIN)));
        let rx = client.attach(req).await?.into_inner();
        Ok(Stream { tx, rx, cert_not_after })
    };
    // Bounded: a frozen coordinator accepts TCP but never completes the handshake.
    match tokio::time::timeout(timeout, open).await {
        Ok(r) => r,
        Err(_) => Err(fail(format!("attach to {addr} timed out after {timeout:?}"))),
    }
}

/// What the agent tells the coordinator about itself in every Join.
#[derive(Clone, Debug)]
pub struct JoinInfo {
    pub member_id: String,
    pub configure_url: String,
    pub scale_set_id: i64,
    pub ers_namespace: String,
    pub ers_name: String,
    pub weight: i64,
    pub min_runners: i64,
    pub max_runners: i64,
    pub priority: i64,
}

/// `resume_epoch`: the lease epoch this process holds (0: none); a leader that holds that
/// lease live re-attaches to it without a log write. `keepalive_seq` (0: none): the
/// keepalive this Join stands for, which such a leader acks in its Joined.
pub fn join(j: &JoinInfo, github_ready: bool, resume_epoch: u64, keepalive_seq: u64) -> pb::AgentMessage {
    msg(pb::agent_message::Msg::Join(pb::Join {
        member_id: j.member_id.clone(),
        group: Some(pb::GroupRef { configure_url: j.configure_url.clone(), scale_set_id: j.scale_set_id }),
        ers_namespace: j.ers_namespace.clone(),
        ers_name: j.ers_name.clone(),
        weight: j.weight,
        min_runners: j.min_runners,
        max_runners: j.max_runners,
        priority: j.priority,
        github_ready,
        policy: 0,
        resume_epoch,
        keepalive_seq,
    }))
}

pub fn msg(m: pb::agent_message::Msg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(m) }
}

/// GitHub's statistics → protobuf (the only place this conversion is written).
pub fn stats(s: &arcfed_core::github::Statistics) -> pb::Statistics {
    pb::Statistics {
        total_available_jobs: s.total_available_jobs,
        total_acquired_jobs: s.total_acquired_jobs,
        total_assigned_jobs: s.total_assigned_jobs,
        total_running_jobs: s.total_running_jobs,
        total_registered_runners: s.total_registered_runners,
        total_busy_runners: s.total_busy_runners,
        total_idle_runners: s.total_idle_runners,
    }
}

/// A job message → the JobStarted/JobCompleted event the coordinator routes (others: None).
pub fn job_event(j: &arcfed_core::github::JobMessage) -> Option<pb::JobEvent> {
    let kind = match j.message_type.as_str() {
        "JobStarted" => pb::JobEventKind::Started,
        "JobCompleted" => pb::JobEventKind::Completed,
        _ => return None,
    };
    Some(pb::JobEvent {
        kind: kind as i32,
        // A job event must name its runner (the coordinator routes by name prefix and refuses
        // an empty one): a nameless event is dropped here rather than poison the Progress.
        runner_name: j.runner_name.clone().filter(|n| !n.is_empty())?,
        runner_id: j.runner_id.unwrap_or(0),
        job_id: j.job_id.clone(),
        runner_request_id: j.runner_request_id,
        repository_name: j.repository_name.clone(),
        owner_name: j.owner_name.clone(),
        job_workflow_ref: j.job_workflow_ref.clone(),
        job_display_name: j.job_display_name.clone(),
        workflow_run_id: j.workflow_run_id,
        result: j.result.clone().unwrap_or_default(),
    })
}
