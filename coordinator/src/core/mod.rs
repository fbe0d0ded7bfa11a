//! The pure core: replicated state, `apply`, the split and the lessor.
//!
//! ```text
//!   Request{ts, Command} ──apply──▶ State ──▶ Applied{Outcome, Effects}
//!   keepalive/tick/now   ──────────▶ LeaseTable ──▶ verdicts, Expire/MarkSilent/Revoke to propose
//! ```
//! Nothing here reads a clock, does I/O, or depends on tokio, tonic or openraft: the driver
//! (`server`) passes `now` in and executes what comes out. That keeps every safety rule
//! testable with plain values (table tests and proptest).
pub mod lease;
pub mod split;
pub mod state;
pub mod types;

#[cfg(test)]
mod state_tests;

pub use lease::{KeepaliveVerdict, LeaseConfig, LeaseTable, TickOutput};
pub use state::{Group, Member, MemberStatus, State};
pub use types::*;
