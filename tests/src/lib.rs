//! arcfed-tests: the test kit shared by integration tests, drills and the sandbox.
//!
//! ```text
//!  emulator/      actions-emulator: GitHub's runner scale-set service (lib + bin)
//!  fault_proxy    TCP proxy: pass, delay, drop, blackhole, close one side only
//!  harness        real arcfed-coordinator processes on 127.0.0.1, certs from arcfedctl
//!  agent_client   a raw protocol client for negative tests: Join, keepalive, report, go silent
//!  agent_proc     real arcfed-agent processes (sim runner backend) with SIGKILL/STOP/TERM
//!  sandbox        the whole world: emulator, voters, one agent per region, link proxies, sampler
//!  drill          DESIGN §10 faults over a sandbox, the typed §11 report, the randomized run
//!  lab            arcfed-lab: real kube-apiservers and real ARC built from their Go modules
//! ```
//!
//! How tests find binaries: [`harness::bin_path`] looks next to the running test executable
//! (`target/<profile>/`), or in `$ARCFED_BIN_DIR` when set. `cargo nextest run --workspace`
//! builds every workspace binary before any test runs, because each crate that owns a binary
//! has an integration test of its own.
pub mod agent_client;
pub mod agent_proc;
pub mod drill;
pub mod emulator;
pub mod fault_proxy;
pub mod harness;
pub mod lab;
pub mod netns;
pub mod sandbox;
