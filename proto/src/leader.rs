//! Follow the leader: a follower answers `UNAVAILABLE` and names the leader's advertised
//! address in the `x-arcfed-leader` metadata (DESIGN §2). Servers write it and clients read it
//! through this module only.

/// The metadata key carrying the leader's advertised `HOST:PORT`.
pub const LEADER_HEADER: &str = "x-arcfed-leader";
/// The metadata key carrying the leader's node id (display only).
pub const LEADER_ID_HEADER: &str = "x-arcfed-leader-id";

/// Request metadata: how long (milliseconds) the client lets a coordinator that knows no live
/// leader wait for one before it answers. Right after a leader dies its followers still name
/// it; a follower asked with this header waits until it hears from a new leader (or becomes
/// it) and then redirects (or serves), instead of naming the dead one. Without the header a
/// coordinator answers at once.
pub const AWAIT_LEADER_HEADER: &str = "x-arcfed-await-leader-ms";

/// Asks the coordinator to wait up to `wait` for a live leader (see [`AWAIT_LEADER_HEADER`]).
pub fn set_await_leader<T>(req: &mut tonic::Request<T>, wait: std::time::Duration) {
    if let Ok(v) = wait.as_millis().to_string().parse() {
        req.metadata_mut().insert(AWAIT_LEADER_HEADER, v);
    }
}

/// How long the client lets the coordinator wait for a live leader (zero without the header,
/// or if it is not a number of milliseconds).
pub fn await_leader(meta: &tonic::metadata::MetadataMap) -> std::time::Duration {
    let ms = meta.get(AWAIT_LEADER_HEADER).and_then(|v| v.to_str().ok()).and_then(|s| s.trim().parse::<u64>().ok());
    std::time::Duration::from_millis(ms.unwrap_or(0))
}

/// The leader a refusal names, if it is an `UNAVAILABLE` redirect that names one.
pub fn leader_hint(status: &tonic::Status) -> Option<String> {
    if status.code() != tonic::Code::Unavailable {
        return None;
    }
    status
        .metadata()
        .get(LEADER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Marks `status` as a redirect to `addr` (and the leader's node id, for display).
pub fn set_leader_hint(status: &mut tonic::Status, addr: &str, id: Option<u64>) {
    if let Ok(v) = addr.parse() {
        status.metadata_mut().insert(LEADER_HEADER, v);
    }
    if let Some(id) = id
        && let Ok(v) = id.to_string().parse()
    {
        status.metadata_mut().insert(LEADER_ID_HEADER, v);
    }
}

/// The metadata key on every "not the serving leader" refusal (value: the refusing node's
/// id), also when it knows no leader to name: clients tell an election in progress from a
/// coordinator they cannot reach, and wait for the former.
pub const NOT_LEADER_HEADER: &str = "x-arcfed-not-leader";

/// Marks `status` as a refusal by node `node`, which does not serve as leader now.
pub fn mark_not_leader(status: &mut tonic::Status, node: u64) {
    if let Ok(v) = node.to_string().parse() {
        status.metadata_mut().insert(NOT_LEADER_HEADER, v);
    }
}

/// Is `status` a coordinator's "not the serving leader" refusal (with or without a leader
/// to follow)?
pub fn is_not_leader(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        && (status.metadata().contains_key(NOT_LEADER_HEADER) || leader_hint(status).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unavailable_with_a_named_leader_is_a_redirect() {
        let mut st = tonic::Status::unavailable("not the leader");
        assert_eq!(leader_hint(&st), None);
        set_leader_hint(&mut st, "10.0.0.2:7000", Some(2));
        assert_eq!(leader_hint(&st).as_deref(), Some("10.0.0.2:7000"));
        let mut other = tonic::Status::failed_precondition("held");
        set_leader_hint(&mut other, "10.0.0.2:7000", None);
        assert_eq!(leader_hint(&other), None);
    }

    #[test]
    fn a_refusal_without_a_leader_to_name_is_still_a_not_leader_answer_and_a_transport_error_is_not() {
        let mut st = tonic::Status::unavailable("node 1 is not the serving leader and knows no leader yet");
        assert!(!is_not_leader(&st), "unmarked: could be a transport error");
        mark_not_leader(&mut st, 1);
        assert!(is_not_leader(&st));
        let mut redirect = tonic::Status::unavailable("redirect");
        set_leader_hint(&mut redirect, "10.0.0.2:7000", Some(2));
        assert!(is_not_leader(&redirect));
        assert!(!is_not_leader(&tonic::Status::unavailable("tcp connect error")));
        let mut other = tonic::Status::failed_precondition("held");
        mark_not_leader(&mut other, 1);
        assert!(!is_not_leader(&other));
    }

    #[test]
    fn the_await_leader_budget_round_trips_and_defaults_to_zero() {
        let mut req = tonic::Request::new(());
        assert_eq!(await_leader(req.metadata()), std::time::Duration::ZERO);
        set_await_leader(&mut req, std::time::Duration::from_millis(900));
        assert_eq!(await_leader(req.metadata()), std::time::Duration::from_millis(900));
        req.metadata_mut().insert(AWAIT_LEADER_HEADER, "soon".parse().unwrap());
        assert_eq!(await_leader(req.metadata()), std::time::Duration::ZERO);
    }
}
