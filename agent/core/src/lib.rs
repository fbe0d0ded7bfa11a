//! arcfed-agent-core: the agent's decisions, as pure functions of events and time.
//!
//! ```text
//!  coordinator stream events ─┐                     ┌─▶ send Join / Keepalive / Progress …
//!  GitHub call results ───────┼─▶ state machines ───┼─▶ call GitHub (only inside the fence)
//!  now (BOOTTIME ms) ─────────┘   (this crate)      └─▶ patch the ERS
//! ```
//! Nothing here reads a clock, does I/O or depends on tokio: the driver in `arcfed-agent` passes
//! `now` in and executes the actions that come out. The crate's Cargo.toml cannot reach tokio,
//! reqwest or kube, and its clippy.toml refuses `Instant::now`/`SystemTime::now`.
pub mod holder;
pub mod link;
pub mod scaler;
pub mod sim;
