//! One struct per settings section. Field docs are short; `settings.toml`
//! carries the operator-facing explanation of each key.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Duration, Secret, SettingsError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub auth: AuthSettings,
    pub ingest: IngestSettings,
    pub health: HealthSettings,
    pub recovery: super::RecoverySettings,
    pub retention: super::RetentionSettings,
    pub alerting: super::AlertingSettings,
    pub telemetry: TelemetrySettings,
    pub reporting: ReportingSettings,
    pub console: super::ConsoleSettings,
    pub limits: super::LimitSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Require an API key on every call but the probes, /metrics,
    /// /openapi.json and the public status page.
    pub enabled: bool,
    /// How long a verified key is trusted before it is checked again.
    pub cache_ttl: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSettings {
    /// Most heartbeats (or events) in one request.
    pub max_batch: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// How far in the future `sent_at` may be.
    pub max_clock_skew: Duration,
    /// Most metrics in one heartbeat.
    pub max_metrics: usize,
    /// Most labels on one heartbeat.
    pub max_labels: usize,
    /// Heartbeats waiting to be written, beyond which requests get 503.
    pub queue_capacity: usize,
    /// Most heartbeats written in one transaction.
    pub max_flush: usize,
    /// Writer tasks, each with its own transaction in flight.
    pub writers: usize,
    /// Coalesce concurrent requests into shared transactions.
    pub group_commit: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    /// How often liveness is evaluated.
    pub check_interval: Duration,
    /// How often scores and metric-based issues are computed.
    pub score_interval: Duration,
    /// Time between two health_history snapshots of an agent (the first
    /// score pass up to one check interval short of it takes one).
    pub history_interval: Duration,
    /// Expected interval of an agent that names neither an interval nor a mode.
    pub default_interval: Duration,
    pub degraded_after_missed: u32,
    pub offline_after_missed: u32,
    pub recover_after_healthy: u32,
    /// Fraction of an interval a heartbeat may be late and still be on time.
    pub jitter_tolerance: f64,
    pub detector: crate::health::liveness::Detector,
    pub phi_threshold: f64,
    pub phi_min_std: Duration,
    pub phi_acceptable_pause: Duration,
    pub phi_min_samples: u32,
    pub extended_offline_after: Duration,
    pub restart_loop_count: u32,
    pub restart_loop_window: Duration,
    pub flap_high: f64,
    pub flap_low: f64,
    pub fleet_outage_ratio: f64,
    pub fleet_outage_min_agents: u32,
    pub fleet_outage_window: Duration,
    pub prediction_horizon: Duration,
    /// Expected interval per mode.
    pub modes: ModeIntervals,
    pub weights: WeightSettings,
    pub tiers: TierSettings,
    pub thresholds: ThresholdSettings,
    pub metrics: MetricNames,
    pub severities: SeveritySettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightSettings {
    pub heartbeat_consistency: f64,
    pub performance: f64,
    pub error_rate: f64,
    pub resource_efficiency: f64,
    pub business_impact: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSettings {
    pub excellent: f64,
    pub good: f64,
    pub fair: f64,
    pub poor: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdSettings {
    pub cpu_warning: f64,
    pub cpu_critical: f64,
    pub memory_warning: f64,
    pub memory_critical: f64,
    pub error_rate: f64,
    pub error_rate_ceiling: f64,
    pub latency_degradation: f64,
}

/// Metric names (first present wins) that feed each score input.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricNames {
    pub latency: Vec<String>,
    pub cpu: Vec<String>,
    pub memory: Vec<String>,
    pub errors: Vec<String>,
    pub work: Vec<String>,
}

/// Severity of the incidents each issue type opens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeveritySettings {
    pub agent_unresponsive: crate::model::Severity,
    pub heartbeat_late: crate::model::Severity,
    pub extended_offline: crate::model::Severity,
    pub restart_loop: crate::model::Severity,
    pub flapping: crate::model::Severity,
    pub high_error_rate: crate::model::Severity,
    pub resource_exhaustion: crate::model::Severity,
    pub performance_degradation: crate::model::Severity,
    pub fleet_outage: crate::model::Severity,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModeIntervals {
    pub emergency: Duration,
    pub active: Duration,
    pub idle: Duration,
    pub sleep: Duration,
}

impl ModeIntervals {
    pub fn get(&self, mode: crate::model::Mode) -> Duration {
        use crate::model::Mode;
        match mode {
            Mode::Emergency => self.emergency,
            Mode::Active => self.active,
            Mode::Idle => self.idle,
            Mode::Sleep => self.sleep,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address and port the HTTP API listens on.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// Longest time one request may take before it is answered 503.
    pub request_timeout: Duration,
    /// Time a client has to send a request's headers (and longest idle
    /// keep-alive); then the connection is closed.
    pub header_read_timeout: Duration,
    /// How long shutdown waits for in-flight requests and background work.
    pub shutdown_timeout: Duration,
    /// Most event streams (GET /v1/stream, the console's live pages) open
    /// at once on this replica.
    pub max_streams: usize,
    /// Most of them open with one API key (a console session counts as its
    /// key), so that one client cannot take every stream. Above
    /// `max_streams` it changes nothing.
    pub max_streams_per_key: usize,
    /// With authentication off, the host names (Host header) requests may
    /// use besides `localhost` and IP addresses.
    pub allowed_hosts: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://` URL or key=value string; empty starts the embedded cluster.
    pub url: Secret,
    /// Data directory of the embedded cluster.
    pub data_dir: PathBuf,
    /// Directory of initdb and pg_ctl for the embedded cluster; empty searches.
    pub pg_bin_dir: PathBuf,
    /// Largest number of connections this process opens.
    pub pool_size: u32,
    /// Time allowed to open one connection; also how long `serve` waits at
    /// start for another replica's migration before serving 503s.
    pub connect_timeout: Duration,
    /// Time a caller waits for a free connection before giving up (503).
    pub acquire_timeout: Duration,
    /// Server-side limit for any one statement.
    pub statement_timeout: Duration,
    /// Age past which a connection is closed rather than used again; zero:
    /// never.
    pub max_lifetime: Duration,
    /// Whether `serve` applies pending migrations on start (and the database
    /// verbs before they run against an older schema).
    pub migrate_on_start: bool,
    /// Days of daily partitions kept ready ahead of today.
    pub partitions_ahead_days: u32,
    /// What is checked of the server's TLS certificate.
    pub tls_verify: TlsVerify,
    /// PEM file of the certificate authorities `tls_verify = "full"` trusts;
    /// empty: the system's.
    pub tls_ca_file: PathBuf,
}

text_enum! {
    /// What warden checks of PostgreSQL's certificate when a connection
    /// uses TLS (whether it does follows the URL's `sslmode`).
    pub enum TlsVerify {
        /// Nothing: encrypted, but not proof against an impostor (libpq's
        /// `prefer` and `require`).
        None = "none",
        /// The chain and the host name (libpq's `verify-full`); TLS required.
        Full = "full",
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Log line format.
    pub format: LogFormat,
    /// Log filter, `tracing` directive syntax (`info`, `warden=debug,info`).
    pub level: String,
    /// Pinged after every successful evaluation cycle (a dead man's switch
    /// for an outside monitor); empty: off.
    pub self_heartbeat_url: Secret,
}

text_enum! {
    /// How log lines look.
    pub enum LogFormat {
        Pretty = "pretty",
        Compact = "compact",
        Json = "json",
    }
}

fn socket_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.trim()
        .parse()
        .map_err(|_| serde::de::Error::custom("an address:port like 127.0.0.1:8080, 0.0.0.0:8080 or [::]:8080"))
}

impl Settings {
    /// Checks that go beyond a value's type: ranges and relations.
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        let db = &self.database;
        check_range("database.pool_size", db.pool_size, 1, 1000)?;
        check_range("database.partitions_ahead_days", db.partitions_ahead_days, 1, 366)?;
        check_min("database.connect_timeout", db.connect_timeout, Duration::from_millis(100))?;
        check_min("database.acquire_timeout", db.acquire_timeout, Duration::from_millis(10))?;
        check_min("database.statement_timeout", db.statement_timeout, Duration::from_millis(100))?;
        if !db.max_lifetime.get().is_zero() {
            check_min("database.max_lifetime", db.max_lifetime, Duration::from_secs(1))?;
        }
        if !db.tls_ca_file.as_os_str().is_empty() && db.tls_verify != TlsVerify::Full {
            return Err(SettingsError::new(
                "database.tls_ca_file",
                db.tls_ca_file.display(),
                "empty unless database.tls_verify = \"full\" (the file is what full verification trusts)",
            ));
        }
        if db.url.is_empty() && db.tls_verify == TlsVerify::Full {
            return Err(SettingsError::new(
                "database.tls_verify",
                "full",
                "\"none\" when database.url is empty: the embedded cluster is reached over its Unix socket, without TLS",
            ));
        }
        if db.url.is_empty() && db.data_dir.as_os_str().is_empty() {
            return Err(SettingsError::new(
                "database.data_dir",
                "",
                "a directory path (needed when database.url is empty)",
            ));
        }
        check_min("server.request_timeout", self.server.request_timeout, Duration::from_millis(100))?;
        // At 0 every recovery action and alert send under way would be cut
        // off at once (sends then go again after their claim: duplicates).
        check_min("server.shutdown_timeout", self.server.shutdown_timeout, Duration::from_secs(1))?;
        check_min("server.header_read_timeout", self.server.header_read_timeout, Duration::from_millis(100))?;
        check_range("server.max_streams", self.server.max_streams, 1, 100_000)?;
        check_range("server.max_streams_per_key", self.server.max_streams_per_key, 1, 100_000)?;
        for (i, host) in self.server.allowed_hosts.iter().enumerate() {
            let name = host.trim();
            if name.is_empty() || name.contains([':', '/', '[', ']', ' ', '@']) {
                return Err(SettingsError::new(
                    &format!("server.allowed_hosts[{i}]"),
                    host,
                    "a host name without scheme or port, like warden.lan",
                ));
            }
        }
        check_max("auth.cache_ttl", self.auth.cache_ttl, Duration::from_secs(3600))?;
        let ingest = &self.ingest;
        check_range("ingest.max_batch", ingest.max_batch, 1, 100_000)?;
        check_range("ingest.max_body_bytes", ingest.max_body_bytes, 1024, 256 * 1024 * 1024)?;
        check_range("ingest.max_metrics", ingest.max_metrics, 0, 10_000)?;
        check_range("ingest.max_labels", ingest.max_labels, 0, 1000)?;
        check_range("ingest.queue_capacity", ingest.queue_capacity, 1, 10_000_000)?;
        check_range("ingest.max_flush", ingest.max_flush, 1, 100_000)?;
        check_range("ingest.writers", ingest.writers, 1, 64)?;
        check_max("ingest.max_clock_skew", ingest.max_clock_skew, Duration::from_secs(86_400))?;
        // Each writer keeps a connection, the evaluator keeps one (also
        // while it waits to lead); requests and the other background jobs
        // need at least one more, or readiness and reads fail with the
        // pool exhausted.
        if (db.pool_size as usize) < ingest.writers + 2 {
            return Err(SettingsError::new(
                "database.pool_size",
                db.pool_size,
                format!(
                    "at least ingest.writers + 2 ({}): each writer and the evaluator keep a connection, and requests need the rest",
                    ingest.writers + 2
                ),
            ));
        }
        if ingest.queue_capacity < ingest.max_batch {
            return Err(SettingsError::new(
                "ingest.queue_capacity",
                ingest.queue_capacity,
                format!("at least ingest.max_batch ({}), or a full batch could never be queued", ingest.max_batch),
            ));
        }
        let h = &self.health;
        check_min("health.check_interval", h.check_interval, Duration::from_millis(100))?;
        check_max("health.check_interval", h.check_interval, Duration::from_secs(3600))?;
        check_min("health.restart_loop_window", h.restart_loop_window, Duration::from_secs(1))?;
        check_min("health.fleet_outage_window", h.fleet_outage_window, Duration::from_secs(1))?;
        check_range("health.fleet_outage_min_agents", h.fleet_outage_min_agents, 1, 1_000_000)?;
        check_min("health.score_interval", h.score_interval, Duration::from_millis(100))?;
        check_min("health.history_interval", h.history_interval, Duration::from_millis(100))?;
        check_range("health.degraded_after_missed", h.degraded_after_missed, 1, 1000)?;
        check_range("health.offline_after_missed", h.offline_after_missed, 1, 1000)?;
        if h.offline_after_missed <= h.degraded_after_missed {
            return Err(SettingsError::new(
                "health.offline_after_missed",
                h.offline_after_missed,
                format!("more than health.degraded_after_missed ({})", h.degraded_after_missed),
            ));
        }
        check_range("health.recover_after_healthy", h.recover_after_healthy, 1, 1000)?;
        check_float("health.jitter_tolerance", h.jitter_tolerance, 0.0, 10.0)?;
        check_float("health.phi_threshold", h.phi_threshold, 0.5, 100.0)?;
        check_range("health.phi_min_samples", h.phi_min_samples, 2, 10_000)?;
        check_range("health.restart_loop_count", h.restart_loop_count, 2, 1000)?;
        check_float("health.flap_high", h.flap_high, 0.0, 100.0)?;
        check_float("health.flap_low", h.flap_low, 0.0, h.flap_high)?;
        check_float("health.fleet_outage_ratio", h.fleet_outage_ratio, 0.01, 1.0)?;
        let w = &h.weights;
        for (key, value) in [
            ("health.weights.heartbeat_consistency", w.heartbeat_consistency),
            ("health.weights.performance", w.performance),
            ("health.weights.error_rate", w.error_rate),
            ("health.weights.resource_efficiency", w.resource_efficiency),
            ("health.weights.business_impact", w.business_impact),
        ] {
            check_float(key, value, 0.0, 1.0)?;
        }
        // Every agent has heartbeats; the other components may have no
        // data. With this weight at 0 such an agent would have no score at
        // all, and keep its last one, frozen, for ever.
        if w.heartbeat_consistency <= 0.0 {
            return Err(SettingsError::new(
                "health.weights.heartbeat_consistency",
                w.heartbeat_consistency,
                "a weight above 0: the component every agent has",
            ));
        }
        let sum = w.heartbeat_consistency + w.performance + w.error_rate + w.resource_efficiency + w.business_impact;
        if (sum - 1.0).abs() > 1e-6 {
            return Err(SettingsError::new(
                "health.weights",
                format!("sum {sum}"),
                "five weights that sum to 1 (e.g. 0.30, 0.25, 0.20, 0.15, 0.10)",
            ));
        }
        let t = &h.tiers;
        check_float("health.tiers.excellent", t.excellent, 0.0, 100.0)?;
        check_float("health.tiers.good", t.good, 0.0, t.excellent)?;
        check_float("health.tiers.fair", t.fair, 0.0, t.good)?;
        check_float("health.tiers.poor", t.poor, 0.0, t.fair)?;
        let th = &h.thresholds;
        check_float("health.thresholds.cpu_warning", th.cpu_warning, 0.0, 100.0)?;
        check_float("health.thresholds.cpu_critical", th.cpu_critical, th.cpu_warning, 100.0)?;
        check_float("health.thresholds.memory_warning", th.memory_warning, 0.0, 100.0)?;
        check_float("health.thresholds.memory_critical", th.memory_critical, th.memory_warning, 100.0)?;
        check_float("health.thresholds.error_rate", th.error_rate, 0.0, 1.0)?;
        check_float("health.thresholds.error_rate_ceiling", th.error_rate_ceiling, 0.0001, 1.0)?;
        check_float("health.thresholds.latency_degradation", th.latency_degradation, 1.0, 1000.0)?;
        let interval_min = Duration::from_millis(100);
        let interval_max = Duration::from_secs(7 * 86_400);
        check_min("health.default_interval", self.health.default_interval, interval_min)?;
        check_max("health.default_interval", self.health.default_interval, interval_max)?;
        for mode in crate::model::Mode::ALL {
            let key = format!("health.modes.{mode}");
            check_min(&key, self.health.modes.get(*mode), interval_min)?;
            check_max(&key, self.health.modes.get(*mode), interval_max)?;
        }
        let ping = self.telemetry.self_heartbeat_url.expose();
        if !ping.is_empty() && !ping.starts_with("http://") && !ping.starts_with("https://") {
            return Err(SettingsError::new("telemetry.self_heartbeat_url", "", "an http:// or https:// URL, or empty"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.telemetry.level).map_err(|e| {
            SettingsError::new(
                "telemetry.level",
                &self.telemetry.level,
                format!("a log filter like info, debug or warden=debug,info ({e})"),
            )
        })?;
        self.recovery.validate()?;
        self.retention.validate()?;
        self.alerting.validate()?;
        self.reporting.validate()?;
        self.console.validate()?;
        self.limits.validate()?;
        Ok(())
    }
}

pub(super) fn check_range<T>(key: &str, value: T, min: T, max: T) -> Result<(), SettingsError>
where
    T: PartialOrd + std::fmt::Display + Copy,
{
    if value < min || value > max {
        return Err(SettingsError::new(key, value, format!("a whole number from {min} to {max}")));
    }
    Ok(())
}

pub(super) fn check_float(key: &str, value: f64, min: f64, max: f64) -> Result<(), SettingsError> {
    if !value.is_finite() || value < min || value > max {
        return Err(SettingsError::new(key, value, format!("a number from {min} to {max}")));
    }
    Ok(())
}

pub(super) fn check_max(key: &str, value: Duration, max: Duration) -> Result<(), SettingsError> {
    if value > max {
        return Err(SettingsError::new(key, value, format!("a duration of at most {max}")));
    }
    Ok(())
}

pub(super) fn check_min(key: &str, value: Duration, min: Duration) -> Result<(), SettingsError> {
    if value < min {
        return Err(SettingsError::new(key, value, format!("a duration of at least {min}")));
    }
    Ok(())
}

/// Figures `warden report` binds into the queries in `sql/` that need more
/// than a time range.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportingSettings {
    /// Availability each agent should reach, in percent.
    pub availability_target: f64,
    /// Cost of one agent-minute offline, for the downtime cost estimate.
    pub downtime_cost_per_minute: f64,
    /// Cost per offline minute by label name and value, overriding
    /// `downtime_cost_per_minute` for agents carrying the label.
    #[serde(default)]
    pub label_costs: std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>>,
    /// Bucket width of `score_trend`, `score_history` and `heartbeat_volume`.
    pub trend_bucket: Duration,
    /// Rows in the "noisiest agents" reports.
    pub top_n: u32,
}

/// Costs above this are surely a typo (a misplaced decimal point).
const MAX_COST_PER_MINUTE: f64 = 1e9;

impl ReportingSettings {
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        check_float("reporting.availability_target", self.availability_target, 0.0, 100.0)?;
        check_float("reporting.downtime_cost_per_minute", self.downtime_cost_per_minute, 0.0, MAX_COST_PER_MINUTE)?;
        for (label, values) in &self.label_costs {
            for (value, cost) in values {
                check_float(&format!("reporting.label_costs.{label}.{value}"), *cost, 0.0, MAX_COST_PER_MINUTE)?;
            }
        }
        check_min("reporting.trend_bucket", self.trend_bucket, Duration::from_secs(1))?;
        check_max("reporting.trend_bucket", self.trend_bucket, Duration::from_secs(366 * 86_400))?;
        check_range("reporting.top_n", self.top_n, 1, 100_000)?;
        Ok(())
    }
}
