//! warden's own metrics, for GET /metrics in the Prometheus text format.
//!
//! Two kinds:
//! - process counters and histograms (ingest, evaluation, recovery,
//!   alert deliveries), kept in one process-wide registry: each replica
//!   reports its own work and Prometheus sums them;
//! - fleet figures read from PostgreSQL at scrape time (agents by liveness
//!   and tier, open incidents): the same on every replica, since they are
//!   the database's truth, not any process's.

use std::sync::LazyLock;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Heartbeats committed, by path (http, mcp).
    pub heartbeats: IntCounterVec,
    /// Heartbeat requests refused, by reason.
    pub rejects: IntCounterVec,
    /// Heartbeats per group-commit flush.
    pub flush_size: Histogram,
    /// Seconds from the start of a flush to its commit.
    pub commit_seconds: Histogram,
    /// Heartbeats waiting for a writer (set when scraped).
    pub queue_depth: IntGauge,
    /// Liveness cycles and score passes, by kind.
    pub cycle_seconds: HistogramVec,
    /// Liveness cycles and score passes that failed (the database there,
    /// a statement refused), by kind.
    pub cycle_failures: IntCounterVec,
    /// Liveness cycles put off until ingest had recorded how long it
    /// refused heartbeats for want of the database.
    pub cycle_waits: IntCounter,
    /// Liveness transitions, by new state.
    pub transitions: IntCounterVec,
    /// Recovery attempts finished, by outcome.
    pub recovery_attempts: IntCounterVec,
    /// Alert deliveries attempted, by channel and outcome.
    pub deliveries: IntCounterVec,
    /// API keys looked up in the database (cache misses), by outcome.
    pub key_lookups: IntCounterVec,
    /// Open pool connections, by state: `idle` and `in_use` (set when
    /// scraped; they sum to the connections open).
    pub pool: IntGaugeVec,
    /// The pool's size limit, apart so that a sum over `pool` is
    /// meaningful.
    pub pool_max: IntGauge,
    /// Long-running tasks that panicked (and were started again), by task
    /// (see `supervise`).
    pub task_panics: IntCounterVec,
    /// Retention steps that failed (the others still ran), by step, and
    /// whole cycles (`step="cycle"`).
    pub retention_failures: IntCounterVec,
}

/// Fleet figures read from the database for one scrape. They live in a
/// registry of their own, made per scrape: when the database cannot be
/// read they are left out (and `warden_fleet_figures_up` is 0) rather
/// than served stale from the last scrape that could.
pub struct Fleet {
    registry: Registry,
    /// Agents by liveness.
    pub agents: IntGaugeVec,
    /// Agents by tier.
    pub agents_by_tier: IntGaugeVec,
    /// Open incidents by issue type.
    pub incidents_open: IntGaugeVec,
    /// How far each retention watermark is behind the database's clock;
    /// absent until retention first set it.
    pub retention_behind: GaugeVec,
    /// Seconds since a retention cycle last finished, on any replica.
    pub retention_last_run: GaugeVec,
}

impl Fleet {
    pub fn new() -> Self {
        let registry = Registry::new();
        Self {
            agents: gauge(&registry, "warden_agents", "Agents by liveness", &["liveness"]),
            agents_by_tier: gauge(&registry, "warden_agents_by_tier", "Agents by health tier", &["tier"]),
            incidents_open: gauge(&registry, "warden_incidents_open", "Open incidents by issue type", &["issue_type"]),
            retention_behind: float_gauge(
                &registry,
                "warden_retention_watermark_age_seconds",
                "How far behind now each retention watermark is (rollups of minutes, hours and scores; liveness days)",
                &["watermark"],
            ),
            retention_last_run: float_gauge(
                &registry,
                "warden_retention_last_run_age_seconds",
                "Seconds since a retention cycle last finished, on any replica",
                &[],
            ),
            registry,
        }
    }

    /// These figures, or none when `read` is false, and whether they could
    /// be read, in the text format.
    pub fn render(&self, read: bool) -> String {
        let up = IntGauge::new(
            "warden_fleet_figures_up",
            "1 if this scrape could read the fleet figures (warden_agents and the like) from the database",
        )
        .expect("valid metric");
        up.set(i64::from(read));
        let mut families = prometheus::core::Collector::collect(&up);
        if read {
            families.extend(self.registry.gather());
        }
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out).expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// How long one read serves later callers (fleet figures, readiness).
pub const SHARED_READ_FRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// The outcome of a read that callers without a key may ask for (the
/// fleet figures of `/metrics`, the readiness of `/readyz`): their
/// database reads must not grow with the rate of requests. A caller gets
/// the outcome of a read that finished at most [`SHARED_READ_FRESH`] before it
/// arrived, or after (it was under way when the caller came, and the
/// caller waited for it), and reads only when there is none.
pub struct SharedRead<T>(tokio::sync::Mutex<Option<(std::time::Instant, T)>>);

impl<T> Default for SharedRead<T> {
    fn default() -> Self {
        Self(tokio::sync::Mutex::new(None))
    }
}

/// The fleet figures as last rendered.
pub type FleetCache = SharedRead<String>;

impl<T: Clone> SharedRead<T> {
    /// The outcome for a caller that arrived at `arrived`: shared as above,
    /// else what `read` gives now. `None` when another caller's read has
    /// held it for `wait` (a database that hangs), so that callers never
    /// queue behind reads one after another.
    pub async fn get_or_read<F, Fut>(
        &self,
        arrived: std::time::Instant,
        wait: std::time::Duration,
        read: F,
    ) -> Option<T>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let mut last = tokio::time::timeout(wait, self.0.lock()).await.ok()?;
        if let Some((finished, value)) = last.as_ref()
            && (*finished >= arrived || arrived.duration_since(*finished) < SHARED_READ_FRESH)
        {
            return Some(value.clone());
        }
        let value = read().await;
        *last = Some((std::time::Instant::now(), value.clone()));
        Some(value)
    }
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn float_gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric");
    registry.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let seconds = vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let queue_depth = IntGauge::new("warden_ingest_queue_depth", "Heartbeats waiting for a writer").unwrap();
        registry.register(Box::new(queue_depth.clone())).unwrap();
        let pool_max =
            IntGauge::new("warden_db_pool_max_connections", "Connections the database pool may open").unwrap();
        registry.register(Box::new(pool_max.clone())).unwrap();
        let cycle_seconds = HistogramVec::new(
            HistogramOpts::new("warden_evaluation_cycle_seconds", "Duration of evaluator cycles")
                .buckets(seconds.clone()),
            &["kind"],
        )
        .unwrap();
        registry.register(Box::new(cycle_seconds.clone())).unwrap();
        let cycle_failures = counter(
            &registry,
            "warden_evaluation_failures_total",
            "Evaluator cycles that failed with the database reachable, by kind",
            &["kind"],
        );
        // Present from the start, so that an alert on their increase sees
        // the first failure.
        for kind in ["liveness", "score"] {
            cycle_failures.with_label_values(&[kind]);
        }
        let cycle_waits = IntCounter::new(
            "warden_evaluation_waits_total",
            "Liveness cycles put off until ingest recorded how long it refused heartbeats",
        )
        .unwrap();
        registry.register(Box::new(cycle_waits.clone())).unwrap();
        let rejects = counter(&registry, "warden_heartbeat_rejects_total", "Heartbeat requests refused", &["reason"]);
        for reason in REJECT_REASONS {
            rejects.with_label_values(&[reason]);
        }
        let recovery_attempts = counter(
            &registry,
            "warden_recovery_attempts_total",
            "Recovery attempts finished, by outcome",
            &["outcome"],
        );
        for outcome in ["succeeded", "failed", "timed_out", "abandoned"] {
            recovery_attempts.with_label_values(&[outcome]);
        }
        let retention_failures = counter(
            &registry,
            "warden_retention_failures_total",
            "Retention steps that failed (the others still ran), by step; step=\"cycle\" for whole cycles",
            &["step"],
        );
        retention_failures.with_label_values(&["cycle"]);
        Self {
            heartbeats: counter(&registry, "warden_heartbeats_total", "Heartbeats committed", &["path"]),
            rejects,
            flush_size: histogram(
                &registry,
                "warden_ingest_flush_size",
                "Heartbeats written per group-commit transaction",
                vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0],
            ),
            commit_seconds: histogram(
                &registry,
                "warden_ingest_commit_seconds",
                "Time to write and commit one group-commit transaction",
                seconds,
            ),
            queue_depth,
            cycle_seconds,
            cycle_failures,
            cycle_waits,
            transitions: counter(&registry, "warden_liveness_transitions_total", "Liveness transitions", &["to"]),
            recovery_attempts,
            deliveries: counter(
                &registry,
                "warden_alert_deliveries_total",
                "Alert deliveries attempted, by channel and outcome",
                &["channel", "outcome"],
            ),
            key_lookups: counter(
                &registry,
                "warden_auth_key_lookups_total",
                "API keys looked up in the database (not found in the cache), by outcome",
                &["outcome"],
            ),
            pool: gauge(
                &registry,
                "warden_db_pool_connections",
                "Open database pool connections, by state",
                &["state"],
            ),
            pool_max,
            task_panics: counter(
                &registry,
                "warden_task_panics_total",
                "Background tasks that panicked and were started again, by task",
                &["task"],
            ),
            retention_failures,
            registry,
        }
    }

    /// The registry in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// The `reason`s of `warden_heartbeat_rejects_total` (given by status in
/// `api::ingest`), each present from the start.
pub const REJECT_REASONS: [&str; 8] =
    ["malformed", "unauthorized", "forbidden", "too_large", "invalid", "rate_limited", "unavailable", "error"];

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    const WAIT: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn fleet_figures_are_read_at_most_once_a_second() {
        let cache = FleetCache::default();
        let reads = std::sync::atomic::AtomicUsize::new(0);
        let read = |text: &'static str| {
            reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { text.to_string() }
        };
        let first = cache.get_or_read(Instant::now(), WAIT, || read("first")).await;
        assert_eq!(first.as_deref(), Some("first"));
        let again = cache.get_or_read(Instant::now(), WAIT, || read("second")).await;
        assert_eq!(again.as_deref(), Some("first"));
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 1, "the second scrape read nothing");
        let later = Instant::now() + SHARED_READ_FRESH;
        assert_eq!(cache.get_or_read(later, WAIT, || read("third")).await.as_deref(), Some("third"));
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// A scrape that came while a read was under way takes that read's
    /// figures, however long it took; one that cannot get at them within
    /// its wait gets none.
    #[tokio::test]
    async fn scrapes_during_a_read_wait_for_it_within_bounds() {
        let cache = std::sync::Arc::new(FleetCache::default());
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        let first = tokio::spawn({
            let cache = cache.clone();
            async move {
                let read = || async move {
                    held.await.unwrap();
                    "slow".to_string()
                };
                cache.get_or_read(Instant::now(), WAIT, read).await
            }
        });
        while cache.0.try_lock().is_ok() {
            tokio::task::yield_now().await;
        }
        // However long the read has been going on: it finishes after this
        // scrape arrived.
        let arrived = Instant::now();
        let second = tokio::spawn({
            let cache = cache.clone();
            async move { cache.get_or_read(arrived, WAIT, || async { "own read".to_string() }).await }
        });
        let impatient = cache.get_or_read(Instant::now(), Duration::from_millis(1), || async { "x".to_string() });
        assert_eq!(impatient.await, None, "the read under way holds the figures");
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap().as_deref(), Some("slow"));
        assert_eq!(second.await.unwrap().as_deref(), Some("slow"), "served by the read under way");
    }
}
