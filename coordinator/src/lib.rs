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
pub mod clock;
pub mod config;
pub mod core;
pub mod ctl;
pub mod raft;
pub mod server;
pub mod tls;
