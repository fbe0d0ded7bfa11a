//! openraft glue: type config, the redb-backed log store and state machine, the gRPC peer
//! network, and the handle the server reads the applied state through.
//!
//! ```text
//!   openraft ──append/vote──▶ store::LogStore  (redb, fsync per commit, blocking thread)
//!            ──apply────────▶ store::StateMachine ──▶ Shared{state, applied watch, effects}
//!            ──RPC──────────▶ network::PeerNetwork ──gRPC/mTLS──▶ peer's RaftService
//! ```
use crate::core::{Applied, Effect, Request, State};
use std::io::Cursor;
use std::sync::{Arc, RwLock};
use tokio::sync::{broadcast, watch};

pub mod election;
pub mod network;
pub mod store;

openraft::declare_raft_types!(
    /// arcfed's openraft types: log entries carry a [`Request`], apply answers [`Applied`].
    pub TypeConfig:
        D = Request,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;

/// What the state machine shares with the server (agent streams, admin, lessor).
///
/// A std `RwLock`, not tokio's: it is held only for short, non-async reads and for `apply`,
/// never across an `.await`.
pub struct Shared {
    pub state: RwLock<State>,
    /// Index of the last applied entry; stream tasks wake on it to push grants/assignments.
    pub applied: watch::Sender<u64>,
    /// Effects of applied entries (job routing, sessions to delete). Only the leader
    /// delivers them; a lagging receiver resyncs from `state`.
    pub effects: broadcast::Sender<(u64, Effect)>,
    /// The last leader that announced it serves, and its term: an applied `Advertise` entry
    /// of the leader that proposed it (a leader proposes it after `ensure_linearizable`,
    /// right before it serves). A follower sends waiting agents on to a new leader only then
    /// ([`crate::server::Ctx::await_leader`]). None until one is applied in this process.
    pub announced: watch::Sender<Option<(NodeId, u64)>>,
}

impl Shared {
    pub fn new() -> Arc<Shared> {
        let (applied, _) = watch::channel(0);
        let (effects, _) = broadcast::channel(4096);
        let (announced, _) = watch::channel(None);
        Arc::new(Shared { state: RwLock::new(State::default()), applied, effects, announced })
    }

    /// A consistent copy of the applied state.
    pub fn snapshot(&self) -> State {
        match self.state.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Runs `f` on the applied state under the read lock.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        match self.state.read() {
            Ok(s) => f(&s),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }
}
