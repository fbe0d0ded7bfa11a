//! arcfed-core, the pure core: replicated state, `apply`, the split, the lessor, the fence
//! formula shared with the agent, and GitHub's wire model shared by the agent and the emulator.
//!
//! ```text
//!   Request{ts, Command} ──apply──▶ State ──▶ Applied{Outcome, Effects}
//!   keepalive/tick/now   ──────────▶ LeaseTable ──▶ verdicts, Expire/MarkSilent/Revoke to propose
//! ```
//! Nothing here reads a clock, does I/O, or depends on tokio, tonic or openraft: the driver
//! (`arcfed-coordinator`'s `server`) passes `now` in and executes what comes out. This crate's
//! Cargo.toml cannot reach those crates, and its clippy.toml refuses `Instant::now` and
//! `SystemTime::now`, so purity is a property of the build. That keeps every safety rule
//! testable with plain values (table tests and proptest).
pub mod fence;
pub mod github;
pub mod lease;
pub mod policy;
pub mod report;
pub mod split;
pub mod state;
pub mod types;

#[cfg(test)]
mod state_tests;

pub use lease::{KeepaliveVerdict, LeaseConfig, LeaseTable, TickOutput};
pub use state::{Garbage, Group, Member, MemberStatus, State};
pub use types::*;
