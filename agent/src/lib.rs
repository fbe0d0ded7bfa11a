//! arcfed-agent: the drop-in for ARC's listener container.
pub use arcfed_agent_core::scaler;
