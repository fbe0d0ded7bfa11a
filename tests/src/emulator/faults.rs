//! Injected faults: rules matched against each request before the service handles it.
//! Pure data and matching; the HTTP layer applies the outcome (sleep, status, empty body).

use serde::{Deserialize, Serialize};

/// What kind of request this is. Faults and the timeline use it; `holder_only` marks the
/// requests only the session holder makes (docs/DESIGN.md §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathClass {
    /// GitHub REST: installation token, registration token, runner-registration.
    Auth,
    RunnerGroups,
    ScaleSets,
    SessionCreate,
    SessionRefresh,
    SessionDelete,
    Poll,
    Ack,
    Acquire,
    Jit,
    Runners,
    Emulator,
    Unknown,
}

impl PathClass {
    pub fn holder_only(self) -> bool {
        matches!(self, Self::SessionCreate | Self::SessionDelete | Self::Poll | Self::Ack | Self::Acquire)
    }
}

/// What a matching rule does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// Answer with this status and an exception body. `typeName`/`message` default per status
    /// (e.g. 404 on a refresh is `RunnerAdminException`, as when GitHub evicts a session).
    Status {
        status: u16,
        #[serde(default, rename = "retryAfter")]
        retry_after: Option<String>,
        #[serde(default, rename = "typeName")]
        type_name: Option<String>,
        #[serde(default)]
        message: Option<String>,
        /// Answer in the broker's structured error form instead of an exception body:
        /// `{"source","errorKind","statusCode","errorMessage"}` (e.g. `RunnerSessionInvalid`,
        /// as github.com's broker answers for a session it dropped, 2026).
        #[serde(default, rename = "errorKind")]
        error_kind: Option<String>,
    },
    /// 200 with `Content-Length: 0`: listeners fail to decode it (`EOF`, issues #4285/#4470).
    EmptyBody,
    /// Delay the request, then handle it normally.
    Latency {
        #[serde(rename = "ms")]
        ms: u64,
    },
    /// Send the status line, headers and half the body, then drop the connection.
    Reset,
    /// Never answer: the request hangs until the client gives up (its timeout, or it closes).
    Hang,
}

impl FaultKind {
    /// The name used in the report's `faults_fired` and in timeline `fault` notes.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Status { .. } => "status",
            Self::EmptyBody => "empty_body",
            Self::Latency { .. } => "latency",
            Self::Reset => "reset",
            Self::Hang => "hang",
        }
    }
}

/// A fault rule as posted to `POST /_emulator/faults`. All scopes are optional; a rule with
/// none matches every non-`/_emulator/` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultSpec {
    #[serde(flatten)]
    pub kind: FaultKind,
    /// Handle the request first (its side effects happen: the session is created, the message
    /// deleted, the job acquired), then answer with the fault. Without it the request is
    /// never handled. With `latency`: handled at once, the answer held back that long
    /// (without it, the request waits that long and is then handled).
    #[serde(default)]
    pub handle_first: bool,
    /// Only requests of this class.
    #[serde(default)]
    pub path_class: Option<PathClass>,
    /// Only requests attributed to this session owner (`ownerName`).
    #[serde(default)]
    pub owner: Option<String>,
    /// Only requests attributed to this session id.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Only requests on this scale set.
    #[serde(default)]
    pub scale_set_id: Option<i64>,
    /// Fire for this many matching requests, then retire.
    #[serde(default)]
    pub count: Option<u64>,
    /// Fire for this long from when it was added, then retire (humantime, e.g. `"20s"`).
    #[serde(default)]
    pub duration: Option<String>,
}

/// An installed rule.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    pub id: u64,
    #[serde(flatten)]
    pub spec: FaultSpec,
    /// Emulator-clock ms after which the rule retires.
    pub until_ms: Option<u64>,
    pub remaining: Option<u64>,
    pub fired: u64,
}

/// What the request looks like to fault scopes.
#[derive(Debug, Clone, Default)]
pub struct FaultTarget<'a> {
    pub class: Option<PathClass>,
    pub owner: Option<&'a str>,
    pub session_id: Option<&'a str>,
    pub scale_set_id: Option<i64>,
}

impl Fault {
    fn live(&self, now_ms: u64) -> bool {
        self.remaining != Some(0) && self.until_ms.is_none_or(|u| now_ms < u)
    }

    fn matches(&self, t: &FaultTarget<'_>) -> bool {
        let s = &self.spec;
        if t.class == Some(PathClass::Emulator) {
            return false;
        }
        s.path_class.is_none_or(|c| Some(c) == t.class)
            && s.owner.as_deref().is_none_or(|o| Some(o) == t.owner)
            && s.session_id.as_deref().is_none_or(|o| Some(o) == t.session_id)
            && s.scale_set_id.is_none_or(|o| Some(o) == t.scale_set_id)
    }
}

/// The installed rules, oldest first.
#[derive(Debug, Default)]
pub struct Faults {
    next_id: u64,
    rules: Vec<Fault>,
}

impl Faults {
    pub fn add(&mut self, spec: FaultSpec, now_ms: u64) -> Result<Fault, String> {
        let until_ms = match &spec.duration {
            Some(d) => {
                let d = humantime::parse_duration(d).map_err(|e| format!("duration {d:?}: {e}"))?;
                Some(now_ms + d.as_millis() as u64)
            }
            None => None,
        };
        if let FaultKind::Status { status, .. } = &spec.kind
            && !(100..=599).contains(status)
        {
            return Err(format!("status {status} is not an HTTP status"));
        }
        self.next_id += 1;
        let f = Fault { id: self.next_id, remaining: spec.count, spec, until_ms, fired: 0 };
        self.rules.push(f.clone());
        Ok(f)
    }

    pub fn list(&self) -> Vec<Fault> {
        self.rules.clone()
    }

    pub fn clear(&mut self) {
        self.rules.clear();
    }

    pub fn remove(&mut self, id: u64) -> bool {
        let before = self.rules.len();
        self.rules.retain(|f| f.id != id);
        before != self.rules.len()
    }

    /// The rules that fire for this request, consuming one use of each counted rule. Latency
    /// rules all fire (their delays add up); at most one response-replacing rule fires, the
    /// oldest.
    pub fn fire(&mut self, t: &FaultTarget<'_>, now_ms: u64) -> Vec<FaultSpec> {
        self.rules.retain(|f| f.live(now_ms));
        let mut out = Vec::new();
        let mut replaced = false;
        for f in &mut self.rules {
            if !f.matches(t) {
                continue;
            }
            let replaces = !matches!(f.spec.kind, FaultKind::Latency { .. });
            if replaces && replaced {
                continue;
            }
            replaced |= replaces;
            f.fired += 1;
            if let Some(r) = f.remaining.as_mut() {
                *r -= 1;
            }
            out.push(f.spec.clone());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: FaultKind) -> FaultSpec {
        FaultSpec {
            kind,
            handle_first: false,
            path_class: None,
            owner: None,
            session_id: None,
            scale_set_id: None,
            count: None,
            duration: None,
        }
    }

    #[test]
    fn counted_rule_retires_after_its_count() {
        let mut f = Faults::default();
        let mut s = spec(FaultKind::EmptyBody);
        s.count = Some(2);
        s.path_class = Some(PathClass::Poll);
        f.add(s, 0).unwrap();
        let poll = FaultTarget { class: Some(PathClass::Poll), ..Default::default() };
        let ack = FaultTarget { class: Some(PathClass::Ack), ..Default::default() };
        assert!(f.fire(&ack, 0).is_empty());
        assert_eq!(f.fire(&poll, 0).len(), 1);
        assert_eq!(f.fire(&poll, 0).len(), 1);
        assert!(f.fire(&poll, 0).is_empty());
    }

    #[test]
    fn timed_rule_retires_after_its_duration() {
        let mut f = Faults::default();
        let mut s = spec(FaultKind::Latency { ms: 5 });
        s.duration = Some("1s".into());
        f.add(s, 100).unwrap();
        let any = FaultTarget::default();
        assert_eq!(f.fire(&any, 1099).len(), 1);
        assert!(f.fire(&any, 1100).is_empty());
    }

    #[test]
    fn owner_scope_only_hits_that_owner() {
        let mut f = Faults::default();
        let mut s = spec(FaultKind::EmptyBody);
        s.owner = Some("a".into());
        f.add(s, 0).unwrap();
        let a = FaultTarget { owner: Some("a"), ..Default::default() };
        let b = FaultTarget { owner: Some("b"), ..Default::default() };
        assert!(f.fire(&b, 0).is_empty());
        assert_eq!(f.fire(&a, 0).len(), 1);
    }
}
