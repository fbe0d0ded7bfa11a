//! Clocks. Lease arithmetic uses `CLOCK_BOOTTIME`, which keeps counting during suspend;
//! Rust's `Instant` (CLOCK_MONOTONIC) stops, which would stretch a lease across a suspend.

/// Milliseconds of `CLOCK_BOOTTIME` (Linux). Only differences are meaningful.
pub fn boottime_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    (t.tv_sec as u64).saturating_mul(1000).saturating_add(t.tv_nsec as u64 / 1_000_000)
}

/// Wall-clock milliseconds since the Unix epoch: for display and the leader's log
/// timestamps only, never for safety.
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
