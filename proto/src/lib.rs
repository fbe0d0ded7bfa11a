//! arcfed-proto: the contract between arcfed's processes.
//!
//! ```text
//!  agent  ──AgentService.Attach (bidi stream)──▶  coordinator leader
//!  arcfedctl ──AdminService (unary)─────────────▶  coordinator leader
//!  voter ──RaftService (unary, serde-JSON payloads)─▶ voter
//!
//!  v1      generated protobuf + gRPC code (proto/arcfed/v1/*.proto, build.rs with protox)
//!  tls     mTLS material and SPIFFE identities (coordinator, agent, arcfedctl)
//!  leader  the `x-arcfed-leader` hint a follower returns, read in one place
//!  clock   CLOCK_BOOTTIME milliseconds, the clock both ends measure fences on
//!  codec   the gRPC codec of every service: prost with small per-stream buffers
//!  ops     (feature `ops`) TLS/log flag groups and the /live /ready /metrics server
//! ```
//! Conversions between protobuf and domain types live in the coordinator's `server::convert`
//! and the agent's `coordinator_client` module, not here.

#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("arcfed.v1");
}
pub use v1::*;

pub mod clock;
pub mod codec;
pub mod leader;
#[cfg(feature = "ops")]
pub mod ops;
pub mod tls;
#[cfg(feature = "ops")]
pub mod tls_reload;
