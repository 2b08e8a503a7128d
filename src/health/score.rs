//! The weighted health score, 0-100, from five components, each 0-100.
//!
//! Formulas (also in docs/health.md):
//! - heartbeat_consistency = 100 × delivery × (1 − jitter penalty).
//!   delivery = heartbeats received in the last hour ÷ heartbeats expected
//!   (both exponentially weighted, one-hour time constant, so the figure
//!   slides smoothly and silence lowers it), capped at 1; for intervals of
//!   an hour or more, and under one heartbeat owed, 1 until the next is
//!   overdue, then the share of the silence it covers (see the evaluator's
//!   `score_inputs`). jitter penalty =
//!   min(0.5, max(0, cv − 0.1)) where cv is the coefficient of variation of
//!   the inter-arrival times.
//! - performance = 100 × (3 − L/R) / 2, clamped: latency L (five-minute
//!   average) against R, the agent's latency target if it has one, else its
//!   own one-hour baseline. At the reference: 100; at twice it: 50; three
//!   times: 0.
//! - error_rate = 100 × (1 − rate / ceiling), clamped, where rate = errors ÷
//!   work items over the last hour (errors: the errors metric plus
//!   agent-reported error events; work: the work metric, else heartbeats)
//!   and ceiling defaults to 10%.
//! - resource_efficiency = the lower of the cpu and memory scores, each 100
//!   up to the warning level (70%), falling linearly to 40 at the critical
//!   level (90%) and to 0 at 100%.
//! - business_impact = 100 × min(1, throughput ÷ reference): work done per
//!   hour against the agent's throughput target, else its own baseline.
//!
//! A component without data drops out and the weights of the others are
//! renormalised; the breakdown lists it as `"no_data"`.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::{Liveness, Tier};

text_enum! {
    pub enum Component {
        HeartbeatConsistency = "heartbeat_consistency",
        Performance = "performance",
        ErrorRate = "error_rate",
        ResourceEfficiency = "resource_efficiency",
        BusinessImpact = "business_impact",
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    pub heartbeat_consistency: f64,
    pub performance: f64,
    pub error_rate: f64,
    pub resource_efficiency: f64,
    pub business_impact: f64,
}

impl Weights {
    pub fn of(&self, c: Component) -> f64 {
        match c {
            Component::HeartbeatConsistency => self.heartbeat_consistency,
            Component::Performance => self.performance,
            Component::ErrorRate => self.error_rate,
            Component::ResourceEfficiency => self.resource_efficiency,
            Component::BusinessImpact => self.business_impact,
        }
    }
}

/// Lower bounds of each tier; below `poor` is critical.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TierBounds {
    pub excellent: f64,
    pub good: f64,
    pub fair: f64,
    pub poor: f64,
}

impl TierBounds {
    pub fn tier(&self, score: f64) -> Tier {
        if score >= self.excellent {
            Tier::Excellent
        } else if score >= self.good {
            Tier::Good
        } else if score >= self.fair {
            Tier::Fair
        } else if score >= self.poor {
            Tier::Poor
        } else {
            Tier::Critical
        }
    }
}

/// Thresholds the formulas use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub cpu_warning: f64,
    pub cpu_critical: f64,
    pub memory_warning: f64,
    pub memory_critical: f64,
    /// Error rate (errors per work item) at which the component reaches 0.
    pub error_rate_ceiling: f64,
}

/// Everything one agent's score is computed from. `None` means no data.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs {
    /// Heartbeats received vs expected over the last hour (0..), and the
    /// coefficient of variation of inter-arrival times.
    pub delivery: Option<f64>,
    pub arrival_cv: Option<f64>,
    pub liveness: Option<Liveness>,
    /// Latency now (5-minute average) and its reference (target or baseline).
    pub latency: Option<f64>,
    pub latency_reference: Option<f64>,
    /// Errors and work items over the last hour.
    pub errors_per_hour: Option<f64>,
    pub work_per_hour: Option<f64>,
    /// Throughput reference: target or one-hour baseline, per hour.
    pub work_reference_per_hour: Option<f64>,
    pub cpu_percent: Option<f64>,
    pub memory_percent: Option<f64>,
}

/// One component in the breakdown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComponentScore {
    /// `None`: no data, left out of the score.
    pub score: Option<f64>,
    /// Its weight after renormalisation (0 when left out).
    pub weight: f64,
    /// The figures the formula used.
    pub inputs: BTreeMap<&'static str, f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recommendation: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    pub score: f64,
    pub tier: Tier,
    pub components: BTreeMap<&'static str, ComponentScore>,
}

/// Components below this get a recommendation.
pub const WEAK: f64 = 60.0;

fn clamp100(v: f64) -> f64 {
    if v.is_nan() { 0.0 } else { v.clamp(0.0, 100.0) }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Usage score for a percentage against warning/critical levels.
pub fn usage_score(percent: f64, warning: f64, critical: f64) -> f64 {
    if percent <= warning {
        100.0
    } else if percent <= critical {
        100.0 - 60.0 * (percent - warning) / (critical - warning).max(1e-9)
    } else {
        clamp100(40.0 - 40.0 * (percent - critical) / (100.0 - critical).max(1e-9))
    }
}

/// Computes the score and its breakdown.
pub fn compute(inputs: &Inputs, weights: &Weights, tiers: &TierBounds, t: &Thresholds) -> Option<Score> {
    let mut parts: Vec<(Component, Option<f64>, BTreeMap<&'static str, f64>)> = Vec::with_capacity(5);

    // Heartbeat consistency.
    let mut figures = BTreeMap::new();
    let hb = inputs.delivery.map(|delivery| {
        let delivery = delivery.clamp(0.0, 1.0);
        let cv = inputs.arrival_cv.unwrap_or(0.0).max(0.0);
        let penalty = (cv - 0.1).clamp(0.0, 0.5);
        figures.insert("delivery", round2(delivery));
        figures.insert("jitter_cv", round2(cv));
        let mut score = 100.0 * delivery * (1.0 - penalty);
        if inputs.liveness == Some(Liveness::Offline) {
            score = 0.0;
        }
        clamp100(score)
    });
    parts.push((Component::HeartbeatConsistency, hb, figures));

    // Performance.
    let mut figures = BTreeMap::new();
    let perf = match (inputs.latency, inputs.latency_reference) {
        (Some(latency), Some(reference)) if reference > 0.0 => {
            let ratio = latency / reference;
            figures.insert("latency", round2(latency));
            figures.insert("reference", round2(reference));
            figures.insert("ratio", round2(ratio));
            Some(clamp100(100.0 * (3.0 - ratio) / 2.0))
        }
        _ => None,
    };
    parts.push((Component::Performance, perf, figures));

    // Error rate.
    let mut figures = BTreeMap::new();
    let errors = match (inputs.errors_per_hour, inputs.work_per_hour) {
        (Some(errors), Some(work)) if work > 0.0 => {
            // A share of the work (see the evaluator's high_error_rate).
            let rate = (errors / work).min(1.0);
            figures.insert("errors_per_hour", round2(errors));
            figures.insert("work_per_hour", round2(work));
            figures.insert("rate", (rate * 10_000.0).round() / 10_000.0);
            Some(clamp100(100.0 * (1.0 - rate / t.error_rate_ceiling.max(1e-9))))
        }
        (Some(errors), _) if errors > 0.0 => {
            figures.insert("errors_per_hour", round2(errors));
            Some(0.0)
        }
        _ => None,
    };
    parts.push((Component::ErrorRate, errors, figures));

    // Resource efficiency.
    let mut figures = BTreeMap::new();
    let cpu = inputs.cpu_percent.map(|c| {
        figures.insert("cpu_percent", round2(c));
        usage_score(c, t.cpu_warning, t.cpu_critical)
    });
    let mem = inputs.memory_percent.map(|m| {
        figures.insert("memory_percent", round2(m));
        usage_score(m, t.memory_warning, t.memory_critical)
    });
    let resources = match (cpu, mem) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    parts.push((Component::ResourceEfficiency, resources, figures));

    // Business impact.
    let mut figures = BTreeMap::new();
    let business = match (inputs.work_per_hour, inputs.work_reference_per_hour) {
        (Some(work), Some(reference)) if reference > 0.0 => {
            figures.insert("work_per_hour", round2(work));
            figures.insert("reference_per_hour", round2(reference));
            Some(clamp100(100.0 * (work / reference).min(1.0)))
        }
        _ => None,
    };
    parts.push((Component::BusinessImpact, business, figures));

    let total_weight: f64 = parts.iter().filter(|p| p.1.is_some()).map(|p| weights.of(p.0)).sum();
    if total_weight <= 0.0 {
        return None;
    }
    let mut score = 0.0;
    let mut components = BTreeMap::new();
    for (component, value, inputs) in parts {
        let weight = if value.is_some() { weights.of(component) / total_weight } else { 0.0 };
        if let Some(v) = value {
            score += v * weight;
        }
        components.insert(
            component.as_str(),
            ComponentScore {
                score: value.map(round2),
                weight: (weight * 10_000.0).round() / 10_000.0,
                recommendation: value.filter(|v| *v < WEAK).map(|_| recommendation(component)),
                inputs,
            },
        );
    }
    let score = round2(clamp100(score));
    Some(Score { score, tier: tiers.tier(score), components })
}

/// What an operator might do about a weak component.
pub fn recommendation(c: Component) -> String {
    match c {
        Component::HeartbeatConsistency => {
            "heartbeats arrive late or irregularly: check the agent's host load and network, or raise its interval"
        }
        Component::Performance => {
            "latency is well above its baseline: look for load spikes, slow dependencies or resource contention"
        }
        Component::ErrorRate => "errors per work item are high: inspect the agent's recent error events and logs",
        Component::ResourceEfficiency => {
            "cpu or memory is near its limit: scale the agent up or out, or look for a leak"
        }
        Component::BusinessImpact => "throughput is below target: check the work queue and the agent's upstream",
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEIGHTS: Weights = Weights {
        heartbeat_consistency: 0.30,
        performance: 0.25,
        error_rate: 0.20,
        resource_efficiency: 0.15,
        business_impact: 0.10,
    };
    const TIERS: TierBounds = TierBounds { excellent: 80.0, good: 70.0, fair: 60.0, poor: 40.0 };
    const T: Thresholds = Thresholds {
        cpu_warning: 70.0,
        cpu_critical: 90.0,
        memory_warning: 70.0,
        memory_critical: 90.0,
        error_rate_ceiling: 0.10,
    };

    fn full() -> Inputs {
        Inputs {
            delivery: Some(1.0),
            arrival_cv: Some(0.05),
            liveness: Some(Liveness::Online),
            latency: Some(100.0),
            latency_reference: Some(100.0),
            errors_per_hour: Some(0.0),
            work_per_hour: Some(600.0),
            work_reference_per_hour: Some(600.0),
            cpu_percent: Some(30.0),
            memory_percent: Some(40.0),
        }
    }

    fn score(inputs: &Inputs) -> Score {
        compute(inputs, &WEIGHTS, &TIERS, &T).unwrap()
    }

    #[test]
    fn a_perfect_agent_scores_100_excellent() {
        let s = score(&full());
        assert_eq!(s.score, 100.0);
        assert_eq!(s.tier, Tier::Excellent);
        assert!(s.components.values().all(|c| c.recommendation.is_none()));
    }

    #[test]
    fn hand_computed_mixed_case() {
        // heartbeat: 0.9 delivery, cv 0.3 → penalty 0.2 → 72
        // performance: latency 150 vs 100 → (3 − 1.5)/2 → 75
        // errors: 3 per 600 = 0.5% of a 10% ceiling → 95
        // resources: cpu 80 → 100 − 60×10/20 = 70; memory 50 → 100; min 70
        // business: 300 of 600 → 50
        // total = .30×72 + .25×75 + .20×95 + .15×70 + .10×50 = 21.6 + 18.75 + 19 + 10.5 + 5 = 74.85
        let inputs = Inputs {
            delivery: Some(0.9),
            arrival_cv: Some(0.3),
            latency: Some(150.0),
            errors_per_hour: Some(3.0),
            work_per_hour: Some(600.0),
            work_reference_per_hour: Some(1200.0),
            cpu_percent: Some(80.0),
            memory_percent: Some(50.0),
            ..full()
        };
        let s = score(&inputs);
        let c = |name: &str| s.components[name].score.unwrap();
        assert_eq!(c("heartbeat_consistency"), 72.0);
        assert_eq!(c("performance"), 75.0);
        assert_eq!(c("error_rate"), 95.0);
        assert_eq!(c("resource_efficiency"), 70.0);
        assert_eq!(c("business_impact"), 50.0);
        assert_eq!(s.score, 74.85);
        assert_eq!(s.tier, Tier::Good);
        assert!(s.components["business_impact"].recommendation.is_some(), "50 < 60 is weak");
    }

    #[test]
    fn missing_components_drop_out_and_weights_renormalise() {
        let inputs = Inputs {
            delivery: Some(1.0),
            arrival_cv: Some(0.0),
            liveness: Some(Liveness::Online),
            cpu_percent: Some(80.0),
            ..Inputs::default()
        };
        let s = score(&inputs);
        // heartbeat 100 with weight .30/.45, resources 70 with .15/.45 → 90
        assert_eq!(s.score, 90.0);
        assert_eq!(s.components["performance"].score, None);
        assert_eq!(s.components["performance"].weight, 0.0);
        assert_eq!(s.components["heartbeat_consistency"].weight, 0.6667);
    }

    #[test]
    fn no_data_at_all_is_no_score() {
        assert_eq!(compute(&Inputs::default(), &WEIGHTS, &TIERS, &T), None);
    }

    #[test]
    fn an_offline_agent_has_no_heartbeat_consistency() {
        let s = score(&Inputs { liveness: Some(Liveness::Offline), ..full() });
        assert_eq!(s.components["heartbeat_consistency"].score, Some(0.0));
    }

    #[test]
    fn tiers_follow_their_lower_bounds() {
        for (score, tier) in [
            (100.0, Tier::Excellent),
            (80.0, Tier::Excellent),
            (79.99, Tier::Good),
            (70.0, Tier::Good),
            (69.9, Tier::Fair),
            (60.0, Tier::Fair),
            (59.9, Tier::Poor),
            (40.0, Tier::Poor),
            (39.9, Tier::Critical),
            (0.0, Tier::Critical),
        ] {
            assert_eq!(TIERS.tier(score), tier, "{score}");
        }
    }

    #[test]
    fn usage_scores_bend_at_warning_and_critical() {
        assert_eq!(usage_score(70.0, 70.0, 90.0), 100.0);
        assert_eq!(usage_score(90.0, 70.0, 90.0), 40.0);
        assert_eq!(usage_score(95.0, 70.0, 90.0), 20.0);
        assert_eq!(usage_score(100.0, 70.0, 90.0), 0.0);
        assert_eq!(usage_score(120.0, 70.0, 90.0), 0.0);
    }

    #[test]
    fn performance_halves_at_twice_the_reference() {
        let s = score(&Inputs { latency: Some(200.0), ..full() });
        assert_eq!(s.components["performance"].score, Some(50.0));
        let s = score(&Inputs { latency: Some(50.0), ..full() });
        assert_eq!(s.components["performance"].score, Some(100.0), "faster than the reference is capped");
    }

    #[test]
    fn errors_without_work_are_the_worst_rate() {
        let s = score(&Inputs { errors_per_hour: Some(4.0), work_per_hour: None, ..full() });
        assert_eq!(s.components["error_rate"].score, Some(0.0));
        let s =
            score(&Inputs { errors_per_hour: Some(0.0), work_per_hour: None, work_reference_per_hour: None, ..full() });
        assert_eq!(s.components["error_rate"].score, None, "no errors and no work: no data");
    }

    #[test]
    fn an_error_rate_is_at_most_all_of_the_work() {
        let s = score(&Inputs { errors_per_hour: Some(10.0), work_per_hour: Some(4.0), ..full() });
        assert_eq!(s.components["error_rate"].inputs["rate"], 1.0);
        assert_eq!(s.components["error_rate"].score, Some(0.0));
    }
}
