pub use arcfed_core::github::*;
