//! Structured logging through `tracing`, to stderr so that commands whose
//! output is data (`warden config`, `warden report`) keep stdout clean.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetrySettings};

/// Installs the global subscriber. `RUST_LOG`, when set, beats the setting.
/// Safe to call more than once (later calls are no-ops), which tests need.
pub fn init(settings: &TelemetrySettings) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(&settings.level));
    // A closed log pipe must not take the service down: without this, a
    // failed write makes the subscriber eprintln!, which panics the task
    // that logged (the signal handler, say).
    // Colours only for a person at a terminal: escape codes in a log file
    // or journal are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .log_internal_errors(false);
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Compact => builder.compact().try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// At most one log line a period for a condition that repeats with every
/// request (a database gone, a disk full): a line per request would bury
/// the log under thousands a second. Each line logged says how many were
/// left out since the one before.
pub struct Throttle {
    period: std::time::Duration,
    /// Milliseconds since [`epoch`] before which nothing more is logged.
    next_ms: std::sync::atomic::AtomicU64,
    skipped: std::sync::atomic::AtomicU64,
}

impl Throttle {
    pub const fn new(period: std::time::Duration) -> Self {
        Self { period, next_ms: std::sync::atomic::AtomicU64::new(0), skipped: std::sync::atomic::AtomicU64::new(0) }
    }

    /// `Some(lines left out since the last one)` when this occurrence is
    /// to be logged.
    pub fn allow(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = epoch().elapsed().as_millis() as u64;
        let next = self.next_ms.load(Relaxed);
        if now >= next
            && self.next_ms.compare_exchange(next, now + self.period.as_millis() as u64, Relaxed, Relaxed).is_ok()
        {
            return Some(self.skipped.swap(0, Relaxed));
        }
        self.skipped.fetch_add(1, Relaxed);
        None
    }
}

fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_through_a_period_and_counts_the_rest() {
        let throttle = Throttle::new(std::time::Duration::from_secs(3600));
        assert_eq!(throttle.allow(), Some(0));
        assert_eq!((throttle.allow(), throttle.allow()), (None, None));
        let open = Throttle::new(std::time::Duration::ZERO);
        assert_eq!((open.allow(), open.allow()), (Some(0), Some(0)));
        // Once a period has passed, the next line says how many it left out.
        throttle.next_ms.store(0, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(throttle.allow(), Some(2));
    }
}
