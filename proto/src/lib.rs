//! Generated protobuf and gRPC code for arcfed's three services.
//!
//! ```text
//!  agent  ──AgentService.Connect (bidi stream)──▶  coordinator leader
//!  arcfedctl ──AdminService (unary)──────────────▶  coordinator leader
//!  voter ──RaftService (unary, serde-JSON payloads)─▶ voter
//! ```
//! The `.proto` files live in `proto/arcfed/v1/`. Conversions to domain types live in the
//! coordinator's `grpc::convert` module, not here.
#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("arcfed.v1");
}
pub use v1::*;
