//! arcfed-coordinator: one session holder per federated scale set, elected by an openraft
//! quorum, with leases and fencing tokens.
//!
//! ```text
//!  core/     pure: State + apply, split, lessor (no clock, no I/O, no tokio)
//!  raft/     openraft glue: redb log store + state machine, gRPC peer network
//!  server/   the driver: agent streams, lessor loop, admin service, admin HTTP
//!  tls       mTLS material and identities (spiffe://arcfed/<role>/<name>)
//!  certs     CA and leaf certificates for `arcfedctl certs`
//!  config    clap flags → validated Config
//! ```
pub mod certs;
pub mod config;
pub mod ctl;
pub mod drill;
pub mod raft;
pub mod server;

/// The pure core lives in its own crate (`coordinator/core`), so it cannot reach I/O.
pub use arcfed_core as core;
/// Identities, mTLS material and the BOOTTIME clock are shared with the agent and arcfedctl.
pub use arcfed_proto::{clock, tls};
