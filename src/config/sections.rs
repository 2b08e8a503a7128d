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
    pub telemetry: TelemetrySettings,
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

pub(super) fn check_min(key: &str, value: Duration, min: Duration) -> Result<(), SettingsError> {
    if value < min {
        return Err(SettingsError::new(key, value, format!("a duration of at least {min}")));
    }
    Ok(())
}
