//! What the agent's admin HTTP port (`--admin-listen`, served by the shared
//! `arcfed_proto::ops::serve_admin`; plain HTTP, keep it cluster-internal) answers on
//! `/live`, `/ready` and the metrics path.
//!
//! ```text
//!  driver ──set_ready / beat / set_dead──▶ HttpState ◀── GET /live /ready /metrics
//! ```
//! The rules for *when* the agent is ready live in the driver (standalone: session open or
//! standing by; federated: coordinator connected); this module only reports what it was told.

use crate::metrics::Metrics;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// What `/ready` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Not ready yet (or no longer), with the reason shown in the body.
    NotReady(String),
    /// Ready, with a short description (`holder t7`, `standby`, `coordinator connected`).
    Ready(String),
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        matches!(self, Readiness::Ready(_))
    }
}

/// Shared between the driver and the HTTP handlers.
#[derive(Debug)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    /// A watch so the driver (or a test) can also await readiness changes.
    ready: watch::Sender<Readiness>,
    /// Why the process stopped being live, once a supervised loop has died.
    dead: Mutex<Option<String>>,
    /// BOOTTIME ms of the driver's last [`HttpState::beat`]; 0 = the driver does not beat.
    last_beat_ms: std::sync::atomic::AtomicU64,
    /// `/live` fails when beats stop for this long: a wedged driver loop is not alive.
    beat_timeout: Duration,
}

impl HttpState {
    /// `beat_timeout` applies once the driver beats.
    pub fn new(metrics: Arc<Metrics>, beat_timeout: Duration) -> HttpState {
        HttpState {
            metrics,
            ready: watch::Sender::new(Readiness::NotReady("starting".into())),
            dead: Mutex::new(None),
            last_beat_ms: std::sync::atomic::AtomicU64::new(0),
            beat_timeout,
        }
    }

    pub fn set_ready(&self, r: Readiness) {
        self.ready.send_if_modified(|cur| {
            let changed = *cur != r;
            *cur = r;
            changed
        });
    }

    pub fn readiness(&self) -> Readiness {
        self.ready.borrow().clone()
    }

    /// A receiver that sees every readiness change.
    pub fn subscribe_ready(&self) -> watch::Receiver<Readiness> {
        self.ready.subscribe()
    }

    /// The driver loop calls this on every turn (at least every `beat_timeout / 2`).
    pub fn beat(&self) {
        let now = arcfed_proto::clock::boottime_ms().max(1);
        self.last_beat_ms.store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// A supervised loop died: `/live` answers 503 from now on, so the kubelet restarts the pod.
    pub fn set_dead(&self, reason: impl Into<String>) {
        let mut d = self.dead.lock().unwrap_or_else(|p| p.into_inner());
        d.get_or_insert(reason.into());
    }

    /// `Ok` while live, else the reason.
    pub fn liveness(&self) -> Result<(), String> {
        if let Some(why) = self.dead.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(why);
        }
        let last = self.last_beat_ms.load(std::sync::atomic::Ordering::Relaxed);
        if last != 0 {
            let age = arcfed_proto::clock::boottime_ms().saturating_sub(last);
            if age > self.beat_timeout.as_millis() as u64 {
                return Err(format!("driver loop silent for {age}ms"));
            }
        }
        Ok(())
    }
}

/// What the shared admin server (`arcfed_proto::ops::serve_admin`) answers for the agent.
impl arcfed_proto::ops::Probe for HttpState {
    fn live(&self) -> Result<String, String> {
        self.liveness().map(|()| "ok\n".to_string())
    }

    fn ready(&self) -> Result<String, String> {
        match self.readiness() {
            Readiness::Ready(what) => Ok(format!("ok ({what})\n")),
            Readiness::NotReady(why) => Err(why),
        }
    }

    fn metrics(&self) -> Result<String, String> {
        Ok(self.metrics.encode())
    }
}
