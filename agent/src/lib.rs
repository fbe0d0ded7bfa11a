//! arcfed-agent: the drop-in for ARC's listener container.
//!
//! ```text
//!  config      flags/env + ARC's listener config JSON → Config
//!  github/     ARC's GitHub client (auth chain, sessions, queue, acquire), fence-gated
//!  link        the coordinator stream (Join, keepalive, follow the leader) — driver side
//!  holder      the session loop (DESIGN §5) — driver side of arcfed_agent_core::holder
//!  runners     where assignments land: kube (ERS merge patch) or sim (ARC's ERS controller model)
//!  metrics     gha_* (ARC's names) and arcfed_agent_*
//!  http        /live /ready /metrics
//! ```
pub mod config;
pub mod coordinator_client;
pub mod driver;
pub mod github;
pub mod http;
pub mod kube;
pub mod metrics;
pub mod runners;
pub mod sim;
pub use arcfed_agent_core::scaler;
