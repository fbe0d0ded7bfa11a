//! The fence formula (DESIGN §4), the one place both ends compute it.
//!
//! An agent may send holder-only requests for (G, T) only while its stream is up and
//! `now < sent_at(k) + TTL × (1 − margin)`, where k is the latest keepalive whose ack lists
//! (G, T). The coordinator's lessor bounds its fast path and its Silent rule by the same
//! number, stretched by the clock-rate error: `TTL × (1 − margin) × (1 + 2ρ)`. All times are
//! milliseconds of `CLOCK_BOOTTIME` on the machine that measures them; nothing here compares
//! clocks across machines.

/// TTL × (1 − margin): how long after *sending* keepalive k its ack lets the agent act.
pub fn fence_ms(ttl_ms: u64, margin_permille: u64) -> u64 {
    ttl_ms.saturating_mul(1000 - margin_permille.min(1000)) / 1000
}

/// The end of the fence that an ack for a keepalive sent at `sent_at_ms` grants.
pub fn fence_end(sent_at_ms: u64, ttl_ms: u64, margin_permille: u64) -> u64 {
    sent_at_ms.saturating_add(fence_ms(ttl_ms, margin_permille))
}

/// TTL × (1 − margin) × (1 + 2ρ): after this long since keepalive k was received, the agent's
/// fence from k has surely ended, even if its clock runs ρ slower than the leader's.
pub fn fence_bound_ms(ttl_ms: u64, margin_permille: u64, rho_permille: u64) -> u64 {
    fence_ms(ttl_ms, margin_permille).saturating_mul(1000 + 2 * rho_permille.min(1000)) / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lan_defaults_give_a_two_second_fence() {
        assert_eq!(fence_ms(3000, 333), 2001);
        assert_eq!(fence_end(10_000, 3000, 333), 12_001);
        assert_eq!(fence_bound_ms(3000, 333, 10), 2041);
    }

    #[test]
    fn absurd_inputs_saturate_instead_of_overflowing() {
        assert_eq!(fence_ms(u64::MAX, 0), u64::MAX / 1000);
        assert_eq!(fence_ms(3000, 5000), 0);
        assert_eq!(fence_end(u64::MAX, 3000, 333), u64::MAX);
    }
}
