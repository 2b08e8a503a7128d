//! Flap detection, after Nagios: the weighted percentage of state changes
//! over the last 21 evaluations (20 gaps between them), recent changes
//! weighing more (0.8 for the oldest gap up to 1.2 for the newest). An
//! agent starts flapping when the percentage reaches the high threshold
//! and stops when it falls under the low one, so the flag itself does not
//! flap.

use chrono::{DateTime, Duration, Utc};

/// Gaps between the 21 evaluations considered.
pub const SLOTS: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlapParams {
    /// Shortest time one evaluation covers (the check interval); an agent
    /// whose interval is longer is evaluated per interval.
    pub slot: Duration,
    /// Start flapping at or above this percentage.
    pub high: f64,
    /// Stop flapping below this percentage.
    pub low: f64,
}

/// Weighted percent state change (0-100) from the times of liveness
/// transitions. Transitions older than 20 slots are ignored; several in
/// one slot count once, as one evaluation can change state only once.
pub fn percent_state_change(transitions: &[DateTime<Utc>], now: DateTime<Utc>, slot: Duration) -> f64 {
    let slot_ms = slot.num_milliseconds().max(1);
    let mut changed = [false; SLOTS];
    for at in transitions {
        let age = (now - *at).num_milliseconds();
        if age < 0 {
            continue;
        }
        let back = (age / slot_ms) as usize; // 0: the newest gap
        if back < SLOTS {
            changed[SLOTS - 1 - back] = true;
        }
    }
    let weighted: f64 =
        changed.iter().enumerate().filter(|(_, c)| **c).map(|(i, _)| 0.8 + 0.4 * i as f64 / (SLOTS - 1) as f64).sum();
    (weighted / SLOTS as f64 * 100.0 * 100.0).round() / 100.0
}

/// Whether the agent is flapping now, given whether it was before.
pub fn is_flapping(percent: f64, was_flapping: bool, params: &FlapParams) -> bool {
    if was_flapping { percent >= params.low } else { percent >= params.high }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-01-01T01:00:00Z".parse().unwrap()
    }

    const SLOT: Duration = Duration::seconds(10);

    fn ago(seconds: &[i64]) -> Vec<DateTime<Utc>> {
        seconds.iter().map(|s| now() - Duration::seconds(*s)).collect()
    }

    #[test]
    fn a_steady_agent_has_zero_percent() {
        assert_eq!(percent_state_change(&[], now(), SLOT), 0.0);
        assert_eq!(percent_state_change(&ago(&[500, 1000]), now(), SLOT), 0.0, "too old");
    }

    #[test]
    fn a_change_every_evaluation_is_100_percent() {
        let every: Vec<i64> = (0..20).map(|i| i * 10 + 5).collect();
        assert_eq!(percent_state_change(&ago(&every), now(), SLOT), 100.0);
    }

    #[test]
    fn recent_changes_weigh_more_than_old_ones() {
        let newest = percent_state_change(&ago(&[5]), now(), SLOT);
        let oldest = percent_state_change(&ago(&[195]), now(), SLOT);
        assert_eq!(newest, 6.0, "1.2 / 20");
        assert_eq!(oldest, 4.0, "0.8 / 20");
    }

    #[test]
    fn two_changes_in_one_evaluation_count_once() {
        assert_eq!(percent_state_change(&ago(&[1, 2, 3]), now(), SLOT), 6.0);
    }

    #[test]
    fn hysteresis_between_high_and_low() {
        let p = FlapParams { slot: SLOT, high: 50.0, low: 25.0 };
        assert!(!is_flapping(40.0, false, &p));
        assert!(is_flapping(50.0, false, &p));
        assert!(is_flapping(30.0, true, &p), "stays flapping above low");
        assert!(!is_flapping(24.9, true, &p));
    }
}
