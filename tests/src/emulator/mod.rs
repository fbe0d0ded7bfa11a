//! actions-emulator: a faithful emulator of GitHub's runner scale-set service (issue 3), built
//! from `docs/protocol.md` §1–§4, §8 and its emulator checklist.
//!
//! ```text
//!   TcpListener ─▶ server (HTTP or HTTPS, one hyper task per connection)
//!                    └▶ http::handle  parse · attribute · faults · long poll · record
//!                         └▶ core::Core  every decision, synchronous, `now` passed in
//!                              ├ scale sets ─ sessions ─ per-set message log ─ jobs ─ runners
//!                              └ timeline + report (report.rs), fault rules (faults.rs)
//!   tick task (50 ms): session expiry, workload generator, automatic runners
//! ```
//!
//! Start it in-process with [`Emulator::start`] (drills, sandbox, tests) or as the
//! `actions-emulator` binary. `tests/EMULATOR.md` documents flags, endpoints, knobs, faults
//! and report fields.

pub mod client;
pub mod config;
pub mod core;
pub mod faults;
pub mod http;
pub mod model;
pub mod report;
mod server;
pub mod token;

pub use self::core::{ApiError, Workload};
pub use config::{
    AppKey, CrossCredentialDelete, Cursor, EmulatorConfig, Layout, MAX_REASSIGNMENTS, Mode, RateLimitStatus,
    SessionTtlFrom, Settings, SettingsPatch, TlsFiles,
};
pub use faults::{Fault, FaultKind, FaultSpec, PathClass};
pub use report::{CloseReason, Event, Report, ScaleSetReport, SessionReport};
pub use server::{DOTCOM_HOST, Emulator, EmulatorHandle, Error};
