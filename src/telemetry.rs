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
