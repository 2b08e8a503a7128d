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
    pub telemetry: TelemetrySettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Require an API key on every call but the probes.
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
    /// Expected interval of an agent that names neither an interval nor a mode.
    pub default_interval: Duration,
    /// Expected interval per mode.
    pub modes: ModeIntervals,
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
    /// How long shutdown waits for in-flight requests and background work.
    pub shutdown_timeout: Duration,
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
    /// Time allowed to open one connection.
    pub connect_timeout: Duration,
    /// Time a caller waits for a free connection before giving up (503).
    pub acquire_timeout: Duration,
    /// Server-side limit for any one statement.
    pub statement_timeout: Duration,
    /// Whether `serve` applies pending migrations on start.
    pub migrate_on_start: bool,
    /// Days of daily partitions kept ready ahead of today.
    pub partitions_ahead_days: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Log line format.
    pub format: LogFormat,
    /// Log filter, `tracing` directive syntax (`info`, `warden=debug,info`).
    pub level: String,
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
        if db.url.is_empty() && db.data_dir.as_os_str().is_empty() {
            return Err(SettingsError::new(
                "database.data_dir",
                "",
                "a directory path (needed when database.url is empty)",
            ));
        }
        check_min("server.request_timeout", self.server.request_timeout, Duration::from_millis(100))?;
        check_max("auth.cache_ttl", self.auth.cache_ttl, Duration::from_secs(3600))?;
        let ingest = &self.ingest;
        check_range("ingest.max_batch", ingest.max_batch, 1, 100_000)?;
        check_range("ingest.max_body_bytes", ingest.max_body_bytes, 1024, 256 * 1024 * 1024)?;
        check_range("ingest.max_metrics", ingest.max_metrics, 0, 10_000)?;
        check_range("ingest.max_labels", ingest.max_labels, 0, 1000)?;
        check_range("ingest.queue_capacity", ingest.queue_capacity, 1, 10_000_000)?;
        check_range("ingest.max_flush", ingest.max_flush, 1, 100_000)?;
        check_range("ingest.writers", ingest.writers, 1, 64)?;
        if ingest.queue_capacity < ingest.max_batch {
            return Err(SettingsError::new(
                "ingest.queue_capacity",
                ingest.queue_capacity,
                format!("at least ingest.max_batch ({}), or a full batch could never be queued", ingest.max_batch),
            ));
        }
        let interval_min = Duration::from_millis(100);
        let interval_max = Duration::from_secs(7 * 86_400);
        check_min("health.default_interval", self.health.default_interval, interval_min)?;
        check_max("health.default_interval", self.health.default_interval, interval_max)?;
        for mode in crate::model::Mode::ALL {
            let key = format!("health.modes.{mode}");
            check_min(&key, self.health.modes.get(*mode), interval_min)?;
            check_max(&key, self.health.modes.get(*mode), interval_max)?;
        }
        tracing_subscriber::EnvFilter::try_new(&self.telemetry.level).map_err(|e| {
            SettingsError::new(
                "telemetry.level",
                &self.telemetry.level,
                format!("a log filter like info, debug or warden=debug,info ({e})"),
            )
        })?;
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
