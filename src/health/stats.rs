//! Running per-agent metric statistics, so scoring never rereads history.
//!
//! Each score pass folds the samples that arrived since the previous pass
//! into a few numbers per agent and kind of metric:
//! - gauges (latency, cpu, memory, error rate): a fast (5 min) and a slow
//!   (1 h) exponentially weighted average; the slow one is the baseline;
//! - counters (errors, work items, reported per heartbeat, each the count
//!   since the agent's previous one): the same two averages of the rate
//!   per hour, and a sum decayed with a one-hour time constant, which
//!   approximates the count over the last hour. A batch's rate is its sum
//!   over the time since the previous batch's newest sample, so an agent
//!   that reports less often than passes run (a cron job, sleep mode) is
//!   not read as doing a pass's worth of work in each pass it reports;
//! - a trend: exponentially weighted least squares (30 min time constant)
//!   of value against time, for predictions.
//!
//! Time steps are irregular, so each weight is `1 − exp(−Δt/τ)`.

use chrono::{DateTime, Utc};

pub const FAST_TAU_S: f64 = 300.0;
pub const SLOW_TAU_S: f64 = 3600.0;
pub const HOUR_S: f64 = 3600.0;
pub const TREND_TAU_S: f64 = 1800.0;

text_enum! {
    /// What a metric means to scoring.
    pub enum Kind {
        Latency = "latency",
        Cpu = "cpu",
        Memory = "memory",
        Errors = "errors",
        Work = "work",
        ErrorRate = "error_rate",
    }
}

impl Kind {
    pub fn is_counter(self) -> bool {
        matches!(self, Kind::Errors | Kind::Work)
    }
}

/// Samples of one kind for one agent since the previous pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Batch {
    pub count: u64,
    pub mean: f64,
    pub sum: f64,
    /// Time of the newest sample.
    pub at: DateTime<Utc>,
    /// Time of the oldest sample.
    pub first_at: DateTime<Utc>,
    /// Seconds the batch covers (the span since the previous pass).
    pub span_s: f64,
}

/// Exponentially weighted least squares sums, time in seconds relative to
/// `MetricStat::updated_at`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Regression {
    pub w: f64,
    pub t: f64,
    pub tt: f64,
    pub x: f64,
    pub tx: f64,
}

impl Regression {
    /// Moves the time origin `dt` seconds forward and decays the weights.
    fn advance(&mut self, dt: f64) {
        let d = (-dt / TREND_TAU_S).exp();
        let (w, t, tt, x, tx) = (self.w, self.t, self.tt, self.x, self.tx);
        self.t = d * (t - dt * w);
        self.tt = d * (tt - 2.0 * dt * t + dt * dt * w);
        self.tx = d * (tx - dt * x);
        self.w = d * w;
        self.x = d * x;
    }

    /// Adds a point at the current origin (t = 0).
    fn add(&mut self, value: f64, weight: f64) {
        self.w += weight;
        self.x += weight * value;
    }

    /// Slope per second, when enough well-spread points exist.
    pub fn slope(&self) -> Option<f64> {
        if self.w < 5.0 {
            return None;
        }
        let mean_t = self.t / self.w;
        let var_t = self.tt / self.w - mean_t * mean_t;
        // At least ~5 minutes of spread, or the line is noise.
        if var_t < 300.0 * 300.0 / 4.0 {
            return None;
        }
        let denominator = self.w * self.tt - self.t * self.t;
        (denominator.abs() > f64::EPSILON).then(|| (self.w * self.tx - self.t * self.x) / denominator)
    }

    /// The fitted value at the origin (now).
    pub fn level(&self) -> Option<f64> {
        let slope = self.slope()?;
        Some((self.x - slope * self.t) / self.w)
    }
}

/// One agent's running figures for one kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricStat {
    pub samples: u64,
    pub updated_at: DateTime<Utc>,
    pub fast: f64,
    pub slow: f64,
    pub hour_sum: f64,
    pub trend: Regression,
}

fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_milliseconds().max(0) as f64 / 1000.0
}

fn weight(dt_s: f64, tau_s: f64) -> f64 {
    1.0 - (-dt_s.max(0.0) / tau_s).exp()
}

impl MetricStat {
    /// The first batch of a kind.
    pub fn start(kind: Kind, batch: &Batch) -> Self {
        let value = if kind.is_counter() {
            // The first sample counts work from before the agent was heard
            // (since it started): the rate is the rest over the time the
            // batch covers, not over the whole pass, most of which may
            // predate the agent. One sample alone has no rate; the pass's
            // stands in until the next batch replaces it (see `apply`).
            let covered = seconds_between(batch.first_at, batch.at);
            if batch.count >= 2 && covered >= 1.0 {
                (batch.sum - batch.mean) / covered * HOUR_S
            } else {
                batch.sum / batch.span_s.max(1.0) * HOUR_S
            }
        } else {
            batch.mean
        };
        let mut trend = Regression::default();
        trend.add(value, 1.0);
        Self {
            samples: batch.count,
            updated_at: batch.at,
            fast: value,
            slow: value,
            hour_sum: if kind.is_counter() { batch.sum } else { 0.0 },
            trend,
        }
    }

    /// Folds a batch in.
    pub fn apply(&mut self, kind: Kind, batch: &Batch) {
        let dt = seconds_between(self.updated_at, batch.at);
        // A counter's samples count the work since the previous sample,
        // the newest one folded in before.
        let value = if kind.is_counter() { batch.sum / dt.max(1.0) * HOUR_S } else { batch.mean };
        if kind.is_counter() && self.samples == 1 {
            // Started from a lone sample, whose rate was a stand-in.
            self.fast = value;
            self.slow = value;
            self.trend = Regression::default();
        }
        // A batch spanning a whole pass should move the averages by that
        // span even if its newest sample is close to the last one.
        let step = dt.max(batch.span_s.min(FAST_TAU_S));
        self.fast += weight(step, FAST_TAU_S) * (value - self.fast);
        self.slow += weight(step, SLOW_TAU_S) * (value - self.slow);
        if kind.is_counter() {
            self.hour_sum = self.hour_sum * (-dt / HOUR_S).exp() + batch.sum;
        }
        self.trend.advance(dt);
        self.trend.add(value, 1.0);
        self.samples += batch.count;
        self.updated_at = batch.at;
    }

    /// The decayed one-hour count of a counter as of `now`.
    pub fn hour_sum_at(&self, now: DateTime<Utc>) -> f64 {
        let dt = (now - self.updated_at).num_milliseconds().max(0) as f64 / 1000.0;
        self.hour_sum * (-dt / HOUR_S).exp()
    }

    /// When the trend line reaches `threshold`, if it rises and gets there
    /// within `horizon_s` seconds of `now`.
    pub fn predicted_crossing(&self, threshold: f64, now: DateTime<Utc>, horizon_s: f64) -> Option<DateTime<Utc>> {
        let slope = self.trend.slope()?;
        let level = self.trend.level()?;
        if slope <= 0.0 || level >= threshold {
            return None;
        }
        let since_update = (now - self.updated_at).num_milliseconds().max(0) as f64 / 1000.0;
        let at_s = (threshold - level) / slope - since_update;
        (at_s >= 0.0 && at_s <= horizon_s).then(|| now + chrono::Duration::milliseconds((at_s * 1000.0) as i64))
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;

    fn t(minutes: i64) -> DateTime<Utc> {
        "2026-01-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap() + Duration::minutes(minutes)
    }

    fn gauge(mean: f64, minute: i64) -> Batch {
        Batch {
            count: 2,
            mean,
            sum: mean * 2.0,
            at: t(minute),
            first_at: t(minute) - Duration::seconds(30),
            span_s: 60.0,
        }
    }

    #[test]
    fn a_steady_gauge_keeps_its_value() {
        let mut s = MetricStat::start(Kind::Cpu, &gauge(40.0, 0));
        for m in 1..30 {
            s.apply(Kind::Cpu, &gauge(40.0, m));
        }
        assert!((s.fast - 40.0).abs() < 1e-9 && (s.slow - 40.0).abs() < 1e-9);
        assert_eq!(s.samples, 60);
    }

    #[test]
    fn the_fast_average_follows_a_step_sooner_than_the_baseline() {
        let mut s = MetricStat::start(Kind::Latency, &gauge(100.0, 0));
        for m in 1..=10 {
            s.apply(Kind::Latency, &gauge(300.0, m));
        }
        assert!(s.fast > 250.0, "fast {}", s.fast);
        assert!(s.slow < 180.0, "slow {}", s.slow);
    }

    #[test]
    fn counters_become_hourly_rates_and_an_hour_count() {
        // 10 errors a minute for an hour, 2 every 12 s: 600 an hour.
        let batch = |m: i64| Batch {
            count: 5,
            mean: 2.0,
            sum: 10.0,
            at: t(m),
            first_at: t(m) - Duration::seconds(48),
            span_s: 60.0,
        };
        let mut s = MetricStat::start(Kind::Errors, &batch(0));
        assert!((s.slow - 600.0).abs() < 1e-9, "the first batch's rate is over the time it covers: {}", s.slow);
        for m in 1..=60 {
            s.apply(Kind::Errors, &batch(m));
        }
        assert!((s.fast - 600.0).abs() < 1.0, "{}", s.fast);
        assert!((s.slow - 600.0).abs() < 1.0, "{}", s.slow);
        // The decayed sum of a steady rate r is about r × τ in the limit;
        // after one hour it is (1 − e^−1) of that, plus the first batch.
        let expected = 10.0 / (1.0 - (-60.0_f64 / 3600.0).exp()) * (1.0 - (-1.0_f64).exp());
        assert!((s.hour_sum - expected).abs() / expected < 0.05, "{} vs {expected}", s.hour_sum);
        assert!(s.hour_sum_at(t(120)) < s.hour_sum * 0.4, "it decays when nothing arrives");
    }

    #[test]
    fn a_counter_heard_late_in_its_first_pass_reads_at_its_own_rate() {
        // 10 work items a second, first heard 8 s before the pass: eight
        // samples over 7 s, in a pass that spans a minute.
        let at = t(1);
        let first = Batch { count: 8, mean: 10.0, sum: 80.0, at, first_at: at - Duration::seconds(7), span_s: 60.0 };
        let s = MetricStat::start(Kind::Work, &first);
        assert!((s.slow - 36_000.0).abs() < 1e-6, "{}", s.slow);
    }

    #[test]
    fn a_counter_reported_less_often_than_passes_run_reads_at_its_own_rate() {
        // 150 work items every 15 minutes (600 an hour), passes every minute:
        // a batch in one pass of fifteen.
        let beat = |m: i64| Batch { count: 1, mean: 150.0, sum: 150.0, at: t(m), first_at: t(m), span_s: 60.0 };
        let mut s = MetricStat::start(Kind::Work, &beat(0));
        for m in (15..=180).step_by(15) {
            s.apply(Kind::Work, &beat(m));
        }
        assert!((s.fast - 600.0).abs() < 1e-6, "{}", s.fast);
        assert!((s.slow - 600.0).abs() < 1e-6, "the lone first sample's stand-in is replaced: {}", s.slow);
    }

    #[test]
    fn a_rising_trend_predicts_its_crossing() {
        // Memory climbs 1 point a minute from 50%.
        let mut s = MetricStat::start(Kind::Memory, &gauge(50.0, 0));
        for m in 1..=30 {
            s.apply(Kind::Memory, &gauge(50.0 + m as f64, m));
        }
        let slope = s.trend.slope().unwrap();
        assert!((slope * 60.0 - 1.0).abs() < 0.01, "{slope}");
        assert!((s.trend.level().unwrap() - 80.0).abs() < 0.1);
        let at = s.predicted_crossing(90.0, t(30), 3600.0).expect("90% in about 10 minutes");
        assert!((at - t(40)).num_seconds().abs() < 30, "{at}");
        assert_eq!(s.predicted_crossing(90.0, t(30), 300.0), None, "beyond a 5-minute horizon");
    }

    #[test]
    fn a_flat_or_falling_trend_predicts_nothing() {
        let mut s = MetricStat::start(Kind::Memory, &gauge(60.0, 0));
        for m in 1..=30 {
            s.apply(Kind::Memory, &gauge(60.0 - m as f64 * 0.5, m));
        }
        assert_eq!(s.predicted_crossing(90.0, t(30), 3600.0), None);
    }

    #[test]
    fn too_few_or_too_close_points_have_no_slope() {
        let mut s = MetricStat::start(Kind::Cpu, &gauge(10.0, 0));
        s.apply(Kind::Cpu, &gauge(20.0, 1));
        assert_eq!(s.trend.slope(), None);
    }
}
