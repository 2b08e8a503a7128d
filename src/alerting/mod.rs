//! Alerting: from incidents to people.
//!
//! Why it is built this way: a page must go out once, on time, with what
//! warden already tried — and never be lost because Slack or the mail
//! server was down, or because a replica died mid-send. So every step is a
//! row in PostgreSQL and every decision is a pure function of rows and
//! `now`:
//!
//! ```text
//! evaluator ──(same statement as the incident)──▶ warden.alerts  (the outbox)
//! escalator (one replica at a time) ──▶ alert_notifications (ledger, once per alert×channel×kind×level×seq)
//!                                   └─▶ alert_deliveries   (one per message and channel)
//! dispatcher (every replica, FOR UPDATE SKIP LOCKED + lease) ──▶ Slack / email / webhook / Telegram / log
//!            └─▶ alert_delivery_attempts, alert_channels (health) ──▶ channel alerts
//! ```
//!
//! Map:
//! - [`routing`] — routes (severity, issue, labels) to escalation policies. Pure.
//! - [`escalation`] — what an alert needs now: wait, hold, page, escalate,
//!   repeat, resolve, auto-recovered. Pure, `now` as input.
//! - [`grouping`] — storm control: one message per route and group window. Pure.
//! - [`silences`] — silences (database) and maintenance windows (settings).
//! - [`escalator`] — the cycle that applies those decisions in one transaction.
//! - [`dispatcher`] — claims, sends, retries with backoff, dead-letters.
//! - [`message`] — what a message says; [`channels`] — how each channel says it.
//! - [`store`] — listing and acknowledging alerts (API and CLI).
//! - [`tls`] — the process-wide rustls crypto provider.

/// The condition on `warden.system_events e` that automated recovery gave
/// up on the incident its details name, and was not reset since (a reset
/// sets the incident's job going again): read by the escalator, which pages
/// at once, and by the message, which says what was tried.
macro_rules! gave_up_event {
    () => {
        "e.event_type = 'recovery_failed' AND e.source = 'warden' \
         AND EXISTS (SELECT 1 FROM warden.recovery_jobs j \
                     WHERE j.incident_id = (e.details->>'incident_id')::bigint AND j.state = 'exhausted')"
    };
}

pub mod channels;
pub mod cli;
pub mod dispatcher;
pub mod escalation;
pub mod escalator;
pub mod grouping;
pub mod message;
pub mod routing;
pub mod silences;
pub mod store;
pub mod tls;

use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::AlertingSettings;

/// Starts the escalator and this replica's dispatcher on `tasks`; both stop
/// when `stop` is cancelled, the dispatcher giving its sends under way up
/// to `drain`. Does nothing when `alerting.enabled` is false.
pub fn start(
    pool: Pool,
    settings: &AlertingSettings,
    replica: String,
    stop: CancellationToken,
    drain: std::time::Duration,
    tasks: &TaskTracker,
) -> Result<(), String> {
    if !settings.enabled {
        tracing::info!("alerting.enabled = false: alerts are recorded but not sent");
        return Ok(());
    }
    let channels = Arc::new(channels::Channels::from_settings(settings)?);
    let names: Vec<&str> = channels.names().collect();
    // Present from the start, so that an alert on their increase sees the
    // first failure.
    for channel in &names {
        for outcome in ["sent", "failed", "dead"] {
            crate::metrics::METRICS.deliveries.with_label_values(&[channel, outcome]);
        }
    }
    tracing::info!(channels = ?names, "alerting started");
    {
        let (pool, params, stop_) = (pool.clone(), escalator::EscalatorParams::from_settings(settings), stop.clone());
        crate::supervise::spawn(tasks, "escalator", &stop, move || {
            escalator::run(pool.clone(), params.clone(), stop_.clone())
        });
    }
    let dispatcher = Arc::new(dispatcher::Dispatcher::new(
        pool,
        channels,
        dispatcher::DispatchParams::from_settings(settings),
        replica,
    ));
    let stop_ = stop.clone();
    crate::supervise::spawn(tasks, "dispatcher", &stop, move || dispatcher.clone().run(stop_.clone(), drain));
    Ok(())
}
