//! Phi-accrual failure detection (Hayashibara et al., 2004).
//!
//! Instead of a fixed timeout, the detector keeps the mean and variance of
//! an agent's recent inter-arrival times and asks: given that rhythm, how
//! unlikely is a silence this long? `phi = -log10(P(silence this long or
//! longer))`, so phi 1 means a 10% chance the agent is merely slow, phi 8
//! one in a hundred million. A steady agent's small variance makes phi climb
//! steeply just past its usual interval (caught early); a jittery agent's
//! large variance keeps phi low through its usual wobble (not declared
//! dead). A floor on the standard deviation and an acceptable pause keep
//! a perfectly regular agent from being condemned by a few milliseconds.

/// The running statistics the ingest path keeps per agent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ArrivalStats {
    /// Inter-arrival samples seen (outages excluded).
    pub count: u32,
    /// Exponentially weighted mean, milliseconds.
    pub mean_ms: f64,
    /// Exponentially weighted variance, milliseconds squared.
    pub variance_ms2: f64,
}

/// Detector parameters (from `[health]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PhiParams {
    /// Suspicion level at which an agent is offline.
    pub threshold: f64,
    /// Floor of the standard deviation, milliseconds.
    pub min_std_ms: f64,
    /// Extra silence tolerated beyond the mean before suspicion grows.
    pub acceptable_pause_ms: f64,
    /// Samples needed before the detector is trusted over the fixed rule.
    pub min_samples: u32,
}

/// Suspicion level after `silence_ms` without a heartbeat. Finite and ≥ 0;
/// capped at a large value where the tail probability underflows.
pub fn phi(stats: &ArrivalStats, silence_ms: f64, params: &PhiParams) -> f64 {
    let mean = stats.mean_ms + params.acceptable_pause_ms;
    let std = stats.variance_ms2.max(0.0).sqrt().max(params.min_std_ms).max(1e-9);
    let y = (silence_ms - mean) / std;
    // Logistic approximation of the normal CDF's tail (as in Akka's
    // detector): accurate to ~1e-4 and cheap, with no erf needed.
    let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
    let p_later = if silence_ms > mean { e / (1.0 + e) } else { 1.0 - 1.0 / (1.0 + e) };
    if p_later <= 0.0 || !p_later.is_finite() {
        return MAX_PHI;
    }
    (-p_later.log10()).clamp(0.0, MAX_PHI)
}

/// Where the tail probability underflows; any larger phi means the same.
pub const MAX_PHI: f64 = 300.0;

#[cfg(test)]
mod tests {
    use super::*;

    const PARAMS: PhiParams = PhiParams { threshold: 8.0, min_std_ms: 100.0, acceptable_pause_ms: 0.0, min_samples: 5 };

    fn stats(mean_ms: f64, std_ms: f64) -> ArrivalStats {
        ArrivalStats { count: 50, mean_ms, variance_ms2: std_ms * std_ms }
    }

    #[test]
    fn phi_is_about_0_3_at_the_mean() {
        // P(later than the mean) = 1/2, so phi = log10(2).
        let p = phi(&stats(1000.0, 200.0), 1000.0, &PARAMS);
        assert!((p - 0.301).abs() < 0.01, "{p}");
    }

    #[test]
    fn phi_grows_with_silence() {
        let s = stats(1000.0, 200.0);
        let mut last = -1.0;
        for silence in [0.0, 500.0, 1000.0, 1200.0, 1500.0, 2000.0, 3000.0] {
            let p = phi(&s, silence, &PARAMS);
            assert!(p > last, "phi must rise: {p} after {last} at {silence}");
            last = p;
        }
    }

    #[test]
    fn a_steady_agent_is_suspected_sooner_than_a_jittery_one() {
        let steady = stats(1000.0, 50.0);
        let jittery = stats(1000.0, 500.0);
        let silence = 1800.0;
        assert!(phi(&steady, silence, &PARAMS) >= PARAMS.threshold, "steady agent caught early");
        assert!(phi(&jittery, silence, &PARAMS) < 2.0, "jittery agent given slack");
    }

    #[test]
    fn the_std_floor_protects_perfectly_regular_agents() {
        let perfect = stats(1000.0, 0.0);
        // 50 ms late with a 100 ms floor is half a deviation: no alarm.
        assert!(phi(&perfect, 1050.0, &PARAMS) < 1.0);
    }

    #[test]
    fn an_acceptable_pause_shifts_the_curve() {
        let s = stats(1000.0, 100.0);
        let paused = PhiParams { acceptable_pause_ms: 1000.0, ..PARAMS };
        assert!(phi(&s, 1500.0, &PARAMS) > 5.0);
        assert!(phi(&s, 1500.0, &paused) < 0.5);
    }

    #[test]
    fn phi_stays_finite_for_absurd_silences() {
        let p = phi(&stats(1000.0, 10.0), 1e12, &PARAMS);
        assert!(p.is_finite() && p == MAX_PHI);
        let early = phi(&stats(1000.0, 10.0), -5.0, &PARAMS);
        assert!((0.0..0.01).contains(&early), "{early}");
    }
}
