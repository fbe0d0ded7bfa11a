//! The Raft peer network: openraft RPCs as serde-JSON payloads over gRPC with mTLS.
//!
//! Carrying JSON instead of mirroring every openraft type in protobuf keeps the proto small
//! and survives openraft upgrades; peers are always the same build.

use super::election::Timing;
use super::{NodeId, Raft, TypeConfig};
use arcfed_proto as pb;
use arcfed_proto::RaftPayload;
use arcfed_proto::raft_service_client::RaftServiceClient;
use arcfed_proto::raft_service_server::RaftService;
use arcfed_proto::tls_reload::TlsSource;
use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

/// When this node last heard from each peer: any reply to its own RPCs, or an AppendEntries
/// (a heartbeat) from a leader. `arcfedctl status` shows it (a stopped voter is not a
/// follower), and a follower uses it to tell a live leader from a dead one it still names
/// ([`crate::server::Ctx::await_leader`]). A std Mutex: each critical section is one map
/// access.
#[derive(Debug, Default)]
pub struct PeerContacts {
    seen: std::sync::Mutex<BTreeMap<NodeId, Instant>>,
    /// Woken on every AppendEntries from a leader: agents waiting for a live leader re-check.
    pub leader_heard: tokio::sync::Notify,
    /// The leader this node follows, its term, and when this node first heard it in that
    /// term ([`Self::following_since`]).
    following: std::sync::Mutex<Option<(NodeId, u64, Instant)>>,
    /// Election hints for [`super::election::drive`]: a vote this node asked for was refused
    /// by a voter with a longer log (so this node should not stand again soon) ...
    greater_log: std::sync::atomic::AtomicBool,
    /// ... and the highest term of a candidate this node refused because its own log is longer
    /// (so this node, the better candidate, should stand above that term now).
    shorter_candidate: std::sync::Mutex<Option<(u64, Instant)>>,
}

impl PeerContacts {
    fn record(&self, peer: NodeId) {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).insert(peer, Instant::now());
    }

    /// A leader's AppendEntries of `term` arrived (and was handled).
    fn record_leader(&self, leader: NodeId, term: u64) {
        self.record(leader);
        {
            let mut f = self.following.lock().unwrap_or_else(|p| p.into_inner());
            if !f.is_some_and(|(l, t, _)| l == leader && t == term) {
                *f = Some((leader, term, Instant::now()));
            }
        }
        self.leader_heard.notify_waiters();
    }

    /// When this node first heard `leader` as the leader of `term` (None: not yet).
    pub fn following_since(&self, leader: NodeId, term: u64) -> Option<Instant> {
        let f = self.following.lock().unwrap_or_else(|p| p.into_inner());
        f.and_then(|(l, t, at)| (l == leader && t == term).then_some(at))
    }

    /// Has `peer` been heard from (a reply, or its AppendEntries as leader) after `t`?
    pub fn heard_since(&self, peer: NodeId, t: Instant) -> bool {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).get(&peer).is_some_and(|&at| at > t)
    }

    /// A vote of this node was refused by a voter holding a longer log.
    fn note_greater_log(&self) {
        self.greater_log.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Takes the note of [`Self::note_greater_log`].
    pub fn take_greater_log(&self) -> bool {
        self.greater_log.swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// This node refused a candidate of `term` because the candidate's log is shorter.
    fn note_shorter_candidate(&self, term: u64) {
        let mut c = self.shorter_candidate.lock().unwrap_or_else(|p| p.into_inner());
        if c.is_none_or(|(t, _)| t <= term) {
            *c = Some((term, Instant::now()));
        }
    }

    /// The highest term of a candidate refused for a shorter log, and when.
    pub fn shorter_candidate(&self) -> Option<(u64, Instant)> {
        *self.shorter_candidate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When `peer` was last heard from (see [`PeerContacts::heard_since`]).
    pub fn last_heard(&self, peer: NodeId) -> Option<Instant> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).get(&peer).copied()
    }

    /// How long ago `peer` last answered an RPC of this node; None if it never did.
    pub fn age(&self, peer: NodeId) -> Option<Duration> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).get(&peer).map(Instant::elapsed)
    }
}

/// One lazily-connected channel per peer address, shared by every client openraft makes
/// (it makes a new one for each election's vote requests).
#[derive(Clone)]
pub struct PeerNetwork {
    /// `--peer` addresses: how *this* node reaches each voter. They win over the membership's
    /// address, so a voter can be reached through a proxy or another interface.
    pub overrides: Arc<BTreeMap<NodeId, String>>,
    /// Read at every new channel: a renewed certificate replaces the cached channels.
    pub tls: Arc<TlsSource>,
    pub contacts: Arc<PeerContacts>,
    /// Channels by address. A connection survives the RPC that started it: on a WAN the
    /// TCP and TLS handshakes alone take longer than a vote's deadline, so a channel made
    /// per request would never connect; a shared one finishes connecting in the background
    /// and the next request uses it.
    /// Each is kept with the TLS generation it was made with.
    pub channels: Arc<std::sync::Mutex<BTreeMap<String, (u64, Channel)>>>,
    /// Pauses after an unreachable peer: (first, cap). See [`retry_delays`].
    pub retry: (Duration, Duration),
}

pub struct PeerClient {
    target: NodeId,
    client: Result<RaftServiceClient<Channel>, String>,
    contacts: Arc<PeerContacts>,
    retry: (Duration, Duration),
}

/// How long the leader's replication to a peer pauses after each failed RPC in a row:
/// `first`, doubling, at most `cap`. openraft's default is a constant 500 ms, longer than a
/// follower's election timeout: one slow reply (an append past its heartbeat-long deadline
/// on a loaded machine, or a peer still starting) silenced the leader toward that follower
/// for half a second, and the follower stood for election although the leader was alive.
/// The server sets `first` to the heartbeat interval and `cap` to half the minimum election
/// timeout, so a reachable follower hears from the leader within its timeout.
pub fn retry_delays(first: Duration, cap: Duration) -> impl Iterator<Item = Duration> + Send + 'static {
    let cap = cap.max(first);
    std::iter::successors(Some(first), move |d| Some((*d * 2).min(cap)))
}

impl PeerNetwork {
    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.tls.generation();
        if let Some((_, ch)) = channels.get(addr).filter(|(g, _)| *g == generation) {
            return Ok(ch.clone());
        }
        let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr).trim_matches(['[', ']']);
        let ep = Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| format!("bad peer address {addr}: {e}"))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .tls_config(self.tls.current().client_config(host))
            .map_err(|e| format!("TLS config for {addr}: {e}"))?;
        let ch = ep.connect_lazy();
        channels.insert(addr.to_string(), (generation, ch.clone()));
        Ok(ch)
    }

    /// A client for voter `target` on the shared channel: its `--peer` address if given,
    /// else the membership's.
    fn client(&self, target: NodeId, node: &BasicNode) -> Result<RaftServiceClient<Channel>, String> {
        let addr = self.overrides.get(&target).map_or(node.addr.as_str(), String::as_str);
        Ok(RaftServiceClient::new(self.channel(addr)?)
            .max_encoding_message_size(crate::config::MAX_MESSAGE)
            .max_decoding_message_size(crate::config::MAX_MESSAGE))
    }

    /// Asks `target` for a pre-vote ([`super::election`]). A peer that predates the RPC
    /// (UNIMPLEMENTED, during a rolling upgrade) counts as a yes, as before pre-vote existed.
    pub async fn pre_vote(
        &self,
        target: NodeId,
        node: &BasicNode,
        req: pb::PreVoteRequest,
        timeout: Duration,
    ) -> Result<pb::PreVoteReply, String> {
        let mut client = self.client(target, node)?;
        let mut request = Request::new(req);
        request.set_timeout(timeout);
        match tokio::time::timeout(timeout, client.pre_vote(request)).await {
            Ok(Ok(r)) => {
                self.contacts.record(target);
                Ok(r.into_inner())
            }
            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                self.contacts.record(target);
                Ok(pb::PreVoteReply { granted: true, reason: "peer predates pre-vote".into() })
            }
            Ok(Err(s)) => Err(format!("{}: {}", s.code(), s.message())),
            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        let client = self.client(target, node);
        PeerClient { target, client, contacts: self.contacts.clone(), retry: self.retry }
    }
}

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        which: &'static str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&std::io::Error::other(e.clone())))),
        };
        let json = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = Request::new(RaftPayload { json });
        request.set_timeout(option.hard_ttl());
        // grpc-timeout is only a hint to the server; a frozen peer never answers, so the
        // deadline is enforced here too.
        let call = async {
            match which {
                "vote" => client.vote(request).await,
                "append" => client.append(request).await,
                _ => client.snapshot(request).await,
            }
        };
        let reply = match tokio::time::timeout(option.hard_ttl(), call).await {
            Ok(r) => r,
            Err(_) => Err(tonic::Status::deadline_exceeded(format!("no reply within {:?}", option.hard_ttl()))),
        };
        let payload = reply.map_err(|s| match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                RPCError::Unreachable(Unreachable::new(&std::io::Error::other(s.message().to_string())))
            }
            _ => RPCError::Network(NetworkError::new(&std::io::Error::other(format!("{}: {}", s.code(), s.message())))),
        })?;
        // Any answer, even a refusal, shows the peer is up and reachable.
        self.contacts.record(self.target);
        let result: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(&payload.into_inner().json).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    fn backoff(&self) -> Backoff {
        Backoff::new(retry_delays(self.retry.0, self.retry.1))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.call("snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let reply: Result<VoteResponse<NodeId>, _> = self.call("vote", &rpc, &option).await;
        if let Ok(r) = &reply
            && !r.vote_granted
            && r.last_log_id > rpc.last_log_id
        {
            self.contacts.note_greater_log();
        }
        reply
    }
}

/// The server side: feeds peers' RPCs into the local Raft, and answers pre-votes.
pub struct PeerService {
    pub raft: Raft,
    pub contacts: Arc<PeerContacts>,
    /// This node's id, its election timing, and how long it refuses pre-votes as a leader
    /// after its last quorum contact (the lease TTL): [`Timing::pre_vote`].
    pub me: NodeId,
    pub timing: Timing,
    pub hold: Duration,
}

/// The voter that sent `req`, from its verified certificate (`require_role` put the identity
/// into the extensions): only `spiffe://arcfed/coordinator/<id>` may call the peer service.
fn sender<T>(req: &Request<T>) -> Result<NodeId, Status> {
    let id = req.extensions().get::<crate::tls::Identity>().ok_or_else(|| Status::unauthenticated("no identity"))?;
    if id.role != crate::tls::Role::Coordinator {
        return Err(Status::permission_denied(format!("{id} may not call the peer service")));
    }
    id.name.parse().map_err(|_| Status::permission_denied(format!("{id}: a voter's name is its numeric node id")))
}

/// Refuses a Raft message whose claimed sender (`claimed`, from its vote) is not the voter
/// whose certificate sent it: one voter's key must not speak for another (a forged vote or
/// append from node 2 in node 3's name could depose a leader or split the vote).
pub fn check_sender(from: NodeId, claimed: Option<NodeId>, what: &str) -> Result<(), Status> {
    match claimed {
        Some(c) if c != from => Err(Status::permission_denied(format!(
            "spiffe://arcfed/coordinator/{from} sent a {what} in the name of node {c}"
        ))),
        _ => Ok(()),
    }
}

fn decode<T: DeserializeOwned>(req: Request<RaftPayload>) -> Result<T, Status> {
    serde_json::from_slice(&req.into_inner().json)
        .map_err(|e| Status::invalid_argument(format!("malformed raft payload: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Response<RaftPayload>, Status> {
    serde_json::to_vec(v)
        .map(|json| Response::new(RaftPayload { json }))
        .map_err(|e| Status::internal(format!("encode raft reply: {e}")))
}

#[tonic::async_trait]
impl RaftService for PeerService {
    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let from = sender(&req)?;
        let rpc: VoteRequest<NodeId> = decode(req)?;
        check_sender(from, Some(rpc.vote.leader_id.node_id), "vote request")?;
        let (term, their_log) = (rpc.vote.leader_id.term, rpc.last_log_id);
        let reply = self.raft.vote(rpc).await;
        if let Ok(r) = &reply
            && !r.vote_granted
            && r.last_log_id > their_log
        {
            self.contacts.note_shorter_candidate(term);
        }
        encode(&reply)
    }

    async fn append(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let from = sender(&req)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req)?;
        let (leader, term) = (rpc.vote.leader_id().voted_for(), rpc.vote.leader_id().term);
        check_sender(from, leader, "log append")?;
        let reply = self.raft.append_entries(rpc).await;
        // Anything but HigherVote accepted the sender as this term's leader.
        if let (Some(leader), Ok(r)) = (leader, &reply)
            && !matches!(r, AppendEntriesResponse::HigherVote(_))
        {
            self.contacts.record_leader(leader, term);
        }
        encode(&reply)
    }

    /// Answers from what this node sees now; changes nothing (no term, no vote).
    async fn pre_vote(&self, req: Request<pb::PreVoteRequest>) -> Result<Response<pb::PreVoteReply>, Status> {
        let from = sender(&req)?;
        let req = req.into_inner();
        check_sender(from, Some(req.candidate), "pre-vote request")?;
        let asked = super::election::asked(&self.raft, &self.contacts, self.me, req.candidate);
        let reply = match self.timing.pre_vote(&asked, self.hold) {
            Ok(()) => pb::PreVoteReply { granted: true, reason: String::new() },
            Err(reason) => {
                debug!(candidate = req.candidate, term = req.term, %reason, "pre-vote refused");
                pb::PreVoteReply { granted: false, reason }
            }
        };
        Ok(Response::new(reply))
    }

    /// One chunk of a snapshot (openraft sends a snapshot above `--snapshot-chunk-size` as
    /// several); the last one installs it.
    async fn snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let from = sender(&req)?;
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req)?;
        check_sender(from, rpc.vote.leader_id().voted_for(), "snapshot chunk")?;
        let (offset, len, done) = (rpc.offset, rpc.data.len(), rpc.done);
        let id = rpc.meta.snapshot_id.clone();
        let r = self.raft.install_snapshot(rpc).await;
        match &r {
            Ok(_) if done => info!(snapshot = %id, bytes = offset + len as u64, "installed a snapshot from the leader"),
            Ok(_) => debug!(snapshot = %id, offset, len, "received a snapshot chunk"),
            Err(e) => warn!(snapshot = %id, offset, error = %e, "snapshot chunk refused"),
        }
        encode(&r)
    }
}

#[cfg(test)]
mod tests {
    use super::{check_sender, retry_delays};

    #[test]
    fn a_voter_speaks_only_for_itself() {
        assert!(check_sender(2, Some(2), "vote request").is_ok());
        assert!(check_sender(2, None, "log append").is_ok(), "no claimed sender: nothing to check");
        let e = check_sender(2, Some(3), "vote request").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("coordinator/2") && e.message().contains("node 3"), "{e:?}");
    }
    use std::time::Duration;

    #[test]
    fn retry_delays_double_up_to_the_cap_and_never_end() {
        let ms = Duration::from_millis;
        let d: Vec<Duration> = retry_delays(ms(50), ms(75)).take(4).collect();
        assert_eq!(d, [ms(50), ms(75), ms(75), ms(75)]);
        let d: Vec<Duration> = retry_delays(ms(150), ms(300)).take(3).collect();
        assert_eq!(d, [ms(150), ms(300), ms(300)]);
        // A cap below the first pause (a heartbeat above half the election timeout) keeps the
        // first pause.
        assert!(retry_delays(ms(100), ms(10)).take(1000).all(|x| x == ms(100)));
    }
}
