//! Follow the leader: a follower answers `UNAVAILABLE` and names the leader's advertised
//! address in the `x-arcfed-leader` metadata (DESIGN §2). Servers write it and clients read it
//! through this module only.

/// The metadata key carrying the leader's advertised `HOST:PORT`.
pub const LEADER_HEADER: &str = "x-arcfed-leader";
/// The metadata key carrying the leader's node id (display only).
pub const LEADER_ID_HEADER: &str = "x-arcfed-leader-id";

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
}
