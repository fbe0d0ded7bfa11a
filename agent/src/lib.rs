//! arcfed-agent: the drop-in for ARC's listener container.
//!
//! This crate so far holds the pure scaler core; the GitHub and Kubernetes adapters, the
//! coordinator client and the driver loop come with the agent issue (DESIGN §2, §5.6).
//!
//! ```text
//!  Assignment{runners, dirty, force_zero} ──▶ scaler::Scaler ──▶ Patch{replicas, patchID}
//!                                                               (merge-patched onto the ERS)
//! ```
pub mod scaler;
