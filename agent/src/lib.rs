//! arcfed-agent: the drop-in for ARC's listener container.
//!
//! ```text
//!  config              flags/env + ARC's listener config JSON → Config
//!  github/             ARC's GitHub client (auth chain, sessions, queue, acquire), fence-gated
//!  coordinator_client  opens the mTLS stream; protobuf ⇄ agent types
//!  driver              the one select loop: executes arcfed_agent_core's link and holder
//!                      machines (the decisions live there, pure), FenceGate, fallback/adopt
//!  kube, sim, runners  where assignments land: kube (ERS merge patch) or sim (ARC's ERS
//!                      controller model driving the emulator's runners)
//!  metrics, http       gha_* (ARC's names) and arcfed_agent_*; /live /ready /metrics
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
