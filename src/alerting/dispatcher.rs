//! The dispatcher: every replica runs one. It claims due deliveries with
//! `FOR UPDATE SKIP LOCKED` and a lease, sends them outside any
//! transaction, and records the outcome.
//!
//! - No duplicate sends across replicas: a claimed delivery carries
//!   `claimed_by` and `claimed_until`; other dispatchers skip it until the
//!   lease runs out (a replica killed mid-send loses its claim that way, and
//!   the delivery is retried: at least once, with the same Idempotency-Key).
//! - Order: a delivery waits while an older one to the same channel about
//!   any of its alerts is still pending, so "resolved" never overtakes
//!   "firing".
//! - Failures retry with exponential backoff and jitter ([`retry_delay`]),
//!   honouring a 429's Retry-After, until `max_delivery_age` after the
//!   first attempt; then the delivery is dead-lettered with a
//!   `system_events` row.
//! - Every attempt is recorded (`alert_delivery_attempts`: status code,
//!   latency, outcome) and folded into the channel's health
//!   (`alert_channels`), which the escalator turns into channel alerts.
//!   The record of a send is one transaction, tried again through a
//!   database blip until the claim is about to run out: a message that
//!   went out is not sent again because its outcome could not be written
//!   at the first try, and one failed record stops neither the sends still
//!   in flight nor the records of the others.
//!
//! It never blocks evaluation: it has its own task and connections, and
//! holds no lock while sending.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::Pool;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::channels::{Channels, SendError, Sent};
use super::escalation::Kind;
use super::message::{self, DeliveryRow, Message};
use crate::config::AlertingSettings;
use crate::db::{self, DbError};
use crate::telemetry::Throttle;

/// Longest Retry-After honoured.
const MAX_RETRY_AFTER: Duration = Duration::hours(1);

/// The longest note about refused recipients kept with a delivery.
const REFUSED_NOTE_MAX: usize = 1000;

/// Sends one dispatcher has in flight at most, in `dispatch_batch`es.
const IN_FLIGHT_BATCHES: i64 = 4;

/// The dispatcher's settings.
#[derive(Debug, Clone)]
pub struct DispatchParams {
    pub batch: i64,
    /// How long a claim lasts before another dispatcher may retry it.
    pub lease: Duration,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub max_age: Duration,
    pub link_base: String,
    pub interval: std::time::Duration,
}

impl DispatchParams {
    pub fn from_settings(s: &AlertingSettings) -> Self {
        let timeout = s.delivery_timeout.to_chrono();
        Self {
            batch: i64::from(s.dispatch_batch),
            // Long enough for a send and its bookkeeping, short enough that
            // a dead replica's claims come back soon.
            lease: timeout * 3 + Duration::seconds(30),
            retry_base: s.retry_base.to_chrono(),
            retry_max: s.retry_max.to_chrono(),
            max_age: s.max_delivery_age.to_chrono(),
            link_base: s.link_base.trim().to_string(),
            interval: s.dispatch_interval.get(),
        }
    }
}

/// Delay before retry number `attempts + 1`: `base * 2^(attempts-1)`
/// capped at `max`, of which the upper half is scaled by `jitter` (0..1),
/// so retries of many failed deliveries spread out. A receiver's
/// Retry-After wins (capped at an hour).
pub fn retry_delay(
    attempts: u32,
    base: Duration,
    max: Duration,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    if let Some(wait) = retry_after {
        return wait.clamp(Duration::seconds(1), MAX_RETRY_AFTER);
    }
    let exponent = attempts.saturating_sub(1).min(30);
    let full = base.checked_mul(1 << exponent).unwrap_or(max).min(max);
    let half = full / 2;
    let jitter = jitter.clamp(0.0, 1.0);
    half + Duration::milliseconds((half.num_milliseconds() as f64 * jitter) as i64)
}

/// A random fraction in [0, 1), for spreading retries and checks out.
pub(crate) fn jitter() -> f64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// What one dispatch pass did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PassReport {
    pub claimed: usize,
    pub sent: usize,
    pub failed: usize,
    pub dead: usize,
    /// Escalations and repeats dropped because none of their alerts was
    /// still firing, first messages settled because all their alerts
    /// resolved after they reached some recipients, and resolutions to a
    /// channel that never saw them.
    pub cancelled: usize,
    /// Sends whose outcome could not be recorded before the claim ran out
    /// (the database away all that time): they go again after the lease.
    pub unrecorded: usize,
}

/// SQL: whether alert `x` is under a silence or maintenance window now, as
/// the escalator keeps its suppressed_reason (false when it is not
/// suppressed at all).
macro_rules! silenced {
    () => {
        "coalesce(x.suppressed_reason LIKE 'silence:%' OR x.suppressed_reason LIKE 'maintenance:%', false)"
    };
}

/// SQL: cancels the pending deliveries `d` that no live claim holds ($1 the
/// time now) and the condition picks, with `last_error` the SQL expression
/// `why`. The condition comes in parts, so that it can hold [`silenced!`].
macro_rules! cancel_unclaimed {
    ($why:literal, $($condition:expr),+) => {
        concat!(
            "UPDATE warden.alert_deliveries d SET state = 'cancelled', claimed_by = NULL, claimed_until = NULL, \
                    last_error = ", $why, " \
             WHERE d.state = 'pending' AND (d.claimed_until IS NULL OR d.claimed_until <= $1) AND (",
            $($condition),+,
            ")"
        )
    };
}

/// Escalations and repeats exist to get a firing alert seen. One whose
/// alerts were all acknowledged or resolved since it was created is not
/// sent: an acknowledgement may commit while the escalator is creating it
/// (the acknowledgement's own cancelling cannot see it yet), and
/// resolutions do not cancel anything. Deliveries being sent right now
/// (claimed, claim not expired) are left to finish.
///
/// A first message that reached some recipients and is being retried for
/// the others is settled once all its alerts have resolved: retried to
/// the end, it would hold the all-clear queued behind it from those who
/// were paged, for as long as `max_delivery_age`. The resolution then goes
/// to the whole channel, so the recipients it never reached hear of the
/// alert once, as over.
///
/// Likewise a resolution whose channel never got a message about any of
/// its alerts: it was queued behind a firing message still being retried,
/// which was then given up (dead) or cancelled, and would close what the
/// channel never saw open. A message given up or settled after it reached
/// some of the channel's recipients (`detail.reached`) was seen: its
/// resolution goes. (An "auto-recovered" note is the first and only
/// message by design.)
async fn cancel_stale(client: &tokio_postgres::Client, now: DateTime<Utc>) -> Result<usize, DbError> {
    let mut cancelled = 0;
    // In this order: a first page cancelled by the second statement leaves
    // its resolution to the third.
    for statement in STALE {
        cancelled += client.execute(statement, &[&now]).await?;
    }
    Ok(cancelled as usize)
}

/// The statements of [`cancel_stale`].
const STALE: [&str; 3] = [
    // Escalations and repeats of alerts no longer firing; first pages that
    // reached some recipients, whose alerts all resolved.
    cancel_unclaimed!(
        "CASE WHEN d.kind = 'firing' \
           THEN 'its alerts resolved before it reached every recipient; the all-clear goes to all' \
           ELSE 'no alert of it was firing any more' END",
        "(d.kind IN ('escalation', 'repeat') \
          AND NOT EXISTS (SELECT 1 FROM warden.alerts x \
                          WHERE x.id = ANY (d.alert_ids) AND x.state = 'firing')) \
         OR (d.kind = 'firing' AND d.detail ? 'reached' \
             AND NOT EXISTS (SELECT 1 FROM warden.alerts x \
                             WHERE x.id = ANY (d.alert_ids) AND x.state <> 'resolved'))"
    ),
    // A first page held under a silence (see `claim`) whose alerts were
    // acknowledged or resolved before it ended: nobody was told, and
    // nobody needs to be now.
    cancel_unclaimed!(
        "'its alerts were acknowledged or resolved under a silence before it was sent'",
        "d.kind = 'firing' AND NOT d.detail ? 'reached' \
         AND NOT EXISTS (SELECT 1 FROM warden.alerts x \
                         WHERE x.id = ANY (d.alert_ids) AND (x.state = 'firing' OR NOT ",
        silenced!(),
        "))"
    ),
    // Resolutions to a channel that never saw their alerts.
    cancel_unclaimed!(
        "'the channel never received a message about these alerts'",
        "d.kind = 'resolved' AND NOT d.detail ? 'auto_recovered_attempt' \
         AND NOT EXISTS (SELECT 1 FROM warden.alert_deliveries o \
                         WHERE o.channel = d.channel AND o.kind <> 'resolved' AND o.alert_ids && d.alert_ids \
                           AND (o.state IN ('sent', 'pending') OR o.detail ? 'reached'))"
    ),
];

/// One replica's dispatcher.
pub struct Dispatcher {
    pool: Pool,
    channels: Arc<Channels>,
    /// The names of `channels`: deliveries to others are left to a replica
    /// that has them (a rolling deploy that adds or removes a channel).
    configured: Vec<String>,
    params: DispatchParams,
    replica: String,
}

/// Deliveries claimed in one look, with their messages.
struct Claimed {
    now: DateTime<Utc>,
    /// Started at `now`: sends are dated on it.
    pass_clock: Instant,
    lease_ends: tokio::time::Instant,
    cancelled: usize,
    jobs: Vec<(DeliveryRow, Option<Message>)>,
}

/// One send in flight, counted against its channel until dropped (also
/// when the send's task panics).
struct InFlight {
    counts: Arc<std::sync::Mutex<HashMap<String, i64>>>,
    channel: String,
}

impl InFlight {
    fn take(counts: &Arc<std::sync::Mutex<HashMap<String, i64>>>, channel: &str) -> Self {
        *counts.lock().unwrap_or_else(|e| e.into_inner()).entry(channel.to_string()).or_default() += 1;
        Self { counts: counts.clone(), channel: channel.to_string() }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.channel) {
            *n -= 1;
            if *n <= 0 {
                counts.remove(&self.channel);
            }
        }
    }
}

fn log_panic(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        tracing::error!(error = %e, "an alert send failed unexpectedly; its delivery goes again once its claim runs out");
    }
}

struct Outcome {
    row: DeliveryRow,
    started: DateTime<Utc>,
    /// When the send ended: what `sent_at` and the retry schedule count from.
    finished: DateTime<Utc>,
    latency_ms: i32,
    result: Result<Sent, SendError>,
}

impl Dispatcher {
    pub fn new(pool: Pool, channels: Arc<Channels>, params: DispatchParams, replica: String) -> Self {
        let configured = channels.names().map(str::to_string).collect();
        Self { pool, channels, configured, params, replica }
    }

    /// Looks for due deliveries every `dispatch_interval` until `stop`.
    ///
    /// Each send records its own outcome as soon as it ends, so a slow
    /// receiver holds up nothing but its own sends: a page to Slack queued
    /// while an SMTP server takes its time goes out at the next look. A
    /// channel has at most `dispatch_batch` sends in flight (its further
    /// deliveries wait for the next look with room), and the dispatcher
    /// [`IN_FLIGHT_BATCHES`] times that in all.
    ///
    /// On `stop`, sends under way get up to `drain` to finish and be
    /// recorded; any still going then are dropped, and their deliveries
    /// are sent again once their claim runs out (at least once, with the
    /// same Idempotency-Key).
    pub async fn run(self: Arc<Self>, stop: CancellationToken, drain: std::time::Duration) {
        let this = self;
        let batch = this.params.batch.max(1);
        let in_flight: Arc<std::sync::Mutex<HashMap<String, i64>>> = Default::default();
        let mut sends = tokio::task::JoinSet::new();
        let mut every = crate::every::Every::new(this.params.interval, &stop);
        while every.tick().await {
            // A look that fills what it asked for means more may be due:
            // look again at once, while there is room.
            loop {
                while let Some(joined) = sends.try_join_next() {
                    log_panic(joined);
                }
                let room = batch * IN_FLIGHT_BATCHES - sends.len() as i64;
                if room <= 0 {
                    break;
                }
                let busy: Vec<String> = {
                    let counts = in_flight.lock().unwrap_or_else(|e| e.into_inner());
                    counts.iter().filter(|(_, n)| **n >= batch).map(|(c, _)| c.clone()).collect()
                };
                let limit = batch.min(room);
                let claimed = match this.claim_due(None, limit, &busy).await {
                    Ok(claimed) => claimed,
                    Err(e) => {
                        // Every round meets the same while the database is gone.
                        static LOG: Throttle = Throttle::new(std::time::Duration::from_secs(30));
                        if let Some(more) = LOG.allow() {
                            tracing::warn!(error = %e, more, "alert dispatch failed; will retry");
                        }
                        break;
                    }
                };
                let full = claimed.jobs.len() as i64 >= limit;
                let (now, pass_clock, lease_ends) = (claimed.now, claimed.pass_clock, claimed.lease_ends);
                for (row, message) in claimed.jobs {
                    let slot = InFlight::take(&in_flight, &row.channel);
                    let dispatcher = this.clone();
                    sends.spawn(async move {
                        let outcome = dispatcher.send_one(row, message, now, pass_clock, lease_ends).await;
                        let _ = dispatcher.settle(&outcome, lease_ends).await;
                        drop(slot);
                    });
                }
                if !full || stop.is_cancelled() {
                    break;
                }
            }
        }
        let finished = tokio::time::timeout(drain, async {
            while let Some(joined) = sends.join_next().await {
                log_panic(joined);
            }
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                sends = sends.len(),
                "alert sends still under way at shutdown were dropped; they go again once their claim runs out"
            );
            sends.shutdown().await;
        }
    }

    /// One pass at `now` (the database's clock when `None`): claim due
    /// deliveries, send them concurrently, record the outcomes, and return
    /// once all are recorded.
    pub async fn pass(&self, now: Option<DateTime<Utc>>) -> Result<PassReport, DbError> {
        let claimed = self.claim_due(now, self.params.batch, &[]).await?;
        let mut report =
            PassReport { claimed: claimed.jobs.len(), cancelled: claimed.cancelled, ..PassReport::default() };
        let mut tasks = tokio::task::JoinSet::new();
        for (row, message) in claimed.jobs {
            let send = self.send_one(row, message, claimed.now, claimed.pass_clock, claimed.lease_ends);
            tasks.spawn(send);
        }
        while let Some(joined) = tasks.join_next().await {
            let Ok(outcome) = joined else { continue };
            match self.settle(&outcome, claimed.lease_ends).await {
                Ok(Recorded::Sent) => report.sent += 1,
                Ok(Recorded::Failed) => report.failed += 1,
                Ok(Recorded::Dead) => report.dead += 1,
                Err(_) => report.unrecorded += 1,
            }
        }
        Ok(report)
    }

    /// Cancels what went stale, then claims up to `limit` due deliveries
    /// (none to the `busy` channels) and reads their messages.
    async fn claim_due(&self, now: Option<DateTime<Utc>>, limit: i64, busy: &[String]) -> Result<Claimed, DbError> {
        // The claim's lease runs from the database's `now`, read below; this
        // replica's clock starts before it, so its idea of the lease ends
        // first.
        // (After the wait for a connection, which is no part of it.)
        let mut client = db::client(&self.pool).await?;
        let lease_ends = tokio::time::Instant::now() + self.params.lease.to_std().unwrap_or_default();
        let now: DateTime<Utc> = match now {
            Some(n) => n,
            None => client.query_one("SELECT now()", &[]).await?.get(0),
        };
        let pass_clock = Instant::now();
        let cancelled = cancel_stale(&client, now).await? + self.cancel_unsendable(&client, now).await?;
        let rows = self.claim(&client, now, limit, busy).await?;
        let mut claimed = Claimed { now, pass_clock, lease_ends, cancelled, jobs: Vec::new() };
        if rows.is_empty() {
            return Ok(claimed);
        }
        // One snapshot for all of a message's queries: read one by one, an
        // evaluator commit between them could show "Now: degraded" beside
        // a transition to offline.
        let snapshot = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let mut messages = message::load(&snapshot, &rows, &self.params.link_base).await?;
        snapshot.commit().await?;
        claimed.jobs = rows
            .into_iter()
            .map(|row| {
                let message = messages.remove(&row.id);
                (row, message)
            })
            .collect();
        Ok(claimed)
    }

    /// Cancels the deliveries to a channel this replica does not have that
    /// have been due for `max_delivery_age`: no replica that has it took
    /// them, so it was removed from the settings. Sooner, another replica
    /// still running the old settings (a rolling deploy) may yet send them.
    async fn cancel_unsendable(&self, client: &tokio_postgres::Client, now: DateTime<Utc>) -> Result<usize, DbError> {
        let rows = client
            .query(
                concat!(
                    cancel_unclaimed!(
                        "'no replica has this channel in its settings; given up after alerting.max_delivery_age'",
                        "NOT (d.channel = ANY ($2)) AND d.next_attempt_at <= $1 - $3 * interval '1 millisecond'"
                    ),
                    " RETURNING d.id, d.channel"
                ),
                &[&now, &self.configured, &(self.params.max_age.num_milliseconds() as f64)],
            )
            .await?;
        for r in &rows {
            tracing::warn!(delivery = r.get::<_, i64>(0), channel = %r.get::<_, String>(1),
                "alert delivery cancelled: its channel is in no replica's settings");
        }
        Ok(rows.len())
    }

    /// Sends one claimed delivery. Its times are on the claim's clock (the
    /// database's, or a test's) advanced by the time taken: a slow send's
    /// sent_at is when the receiver took it, not when it was claimed.
    fn send_one(
        &self,
        row: DeliveryRow,
        message: Option<Message>,
        now: DateTime<Utc>,
        pass_clock: Instant,
        lease_ends: tokio::time::Instant,
    ) -> impl std::future::Future<Output = Outcome> + Send + 'static {
        let channels = self.channels.clone();
        let on_pass_clock = move || now + Duration::from_std(pass_clock.elapsed()).unwrap_or_default();
        async move {
            let reached: Vec<String> = row.detail["reached"]
                .as_array()
                .map(|r| r.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            let started = on_pass_clock();
            let clock = Instant::now();
            let mut result = match (channels.get(&row.channel), message) {
                (Some(channel), Some(message)) => send_bounded(channel, &message, &reached, lease_ends).await,
                (None, _) => Err(SendError::new(format!("channel {} is no longer configured", row.channel))),
                (_, None) => Err(SendError::new("the delivery's alerts could not be read")),
            };
            // Receivers' words are quoted in the record, and may hold NULs.
            match &mut result {
                Ok(sent) => sent.refused.iter_mut().for_each(|r| *r = db::storable(r).into_owned()),
                Err(e) => e.error = db::storable(&e.error).into_owned(),
            }
            let latency_ms = i32::try_from(clock.elapsed().as_millis()).unwrap_or(i32::MAX);
            Outcome { row, started, finished: on_pass_clock(), latency_ms, result }
        }
    }

    /// Records an outcome, tried again through a database blip until the
    /// claim is about to run out.
    async fn settle(&self, outcome: &Outcome, lease_ends: tokio::time::Instant) -> Result<Recorded, DbError> {
        let margin = self.pool.timeouts().wait.unwrap_or_default();
        let what = format!("the outcome of alert delivery {} to {}", outcome.row.id, outcome.row.channel);
        db::retry_until(lease_ends, margin, &what, || self.record(outcome)).await
    }

    /// Claims due deliveries, oldest first per channel and alert. An
    /// escalation or repeat none of whose alerts fires any more is left to
    /// cancel_stale, even if they stopped firing since it ran: the escalator
    /// may have left the channel out of the resolution, counting on that.
    /// A message other than a resolution with alerts firing under a silence
    /// or maintenance window and none firing outside one (the escalator
    /// keeps suppressed_reason current) is held, not claimed: queued before
    /// the silence began, or retrying since, it goes when the silence ends
    /// if its alerts still fire. One of a group resolving or acknowledged
    /// meanwhile does not send the page about the others mid-silence.
    async fn claim(
        &self,
        client: &tokio_postgres::Client,
        now: DateTime<Utc>,
        limit: i64,
        busy: &[String],
    ) -> Result<Vec<DeliveryRow>, DbError> {
        let lease_ms = self.params.lease.num_milliseconds() as f64;
        let rows = client
            .query(
                concat!(
                    "WITH c AS ( \
                   SELECT d.id FROM warden.alert_deliveries d \
                   WHERE d.state = 'pending' AND d.next_attempt_at <= $1 \
                     AND (d.claimed_until IS NULL OR d.claimed_until <= $1) \
                     AND NOT (d.channel = ANY ($5)) AND d.channel = ANY ($6) \
                     AND (d.kind NOT IN ('escalation', 'repeat') OR EXISTS ( \
                       SELECT 1 FROM warden.alerts x WHERE x.id = ANY (d.alert_ids) AND x.state = 'firing')) \
                     AND (d.kind = 'resolved' \
                       OR EXISTS (SELECT 1 FROM warden.alerts x WHERE x.id = ANY (d.alert_ids) \
                                    AND x.state = 'firing' AND NOT ",
                    silenced!(),
                    ") \
                       OR NOT EXISTS (SELECT 1 FROM warden.alerts x WHERE x.id = ANY (d.alert_ids) \
                                        AND x.state = 'firing' AND ",
                    silenced!(),
                    ")) \
                     AND NOT EXISTS ( \
                       SELECT 1 FROM warden.alert_deliveries p \
                       WHERE p.state = 'pending' AND p.channel = d.channel AND p.id < d.id \
                         AND p.alert_ids && d.alert_ids) \
                   ORDER BY d.next_attempt_at, d.id \
                   LIMIT $2 \
                   FOR UPDATE OF d SKIP LOCKED) \
                 UPDATE warden.alert_deliveries d \
                 SET claimed_by = $3, claimed_until = $1 + $4 * interval '1 millisecond', attempts = d.attempts + 1 \
                 FROM c WHERE d.id = c.id \
                 RETURNING d.id, d.alert_ids, d.channel, d.kind, d.level, d.attempts, d.created_at, \
                           d.idempotency_key, d.detail, d.route"
                ),
                &[&now, &limit, &self.replica, &lease_ms, &busy, &self.configured],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(DeliveryRow {
                    id: r.get(0),
                    alert_ids: r.get(1),
                    channel: r.get(2),
                    kind: r.get::<_, String>(3).parse::<Kind>().ok()?,
                    level: r.get(4),
                    attempts: r.get(5),
                    created_at: r.get(6),
                    idempotency_key: r.get(7),
                    detail: r.get(8),
                    route: r.get(9),
                })
            })
            .collect())
    }

    /// Records one send's outcome in one transaction. Tried again after a
    /// failure that may have come after the commit (a lost answer), so it
    /// writes the attempt, and counts it in the channel's health, only if
    /// this claim's attempt is not logged yet: the attempt's unique key
    /// (V19) makes a retry wait for a try still open on the server, then
    /// skip what it committed.
    async fn record(&self, o: &Outcome) -> Result<Recorded, DbError> {
        let now = o.finished;
        let mut client = db::client(&self.pool).await?;
        let tx = client.transaction().await?;
        let row = &o.row;
        // Sent with some addresses refused for good: sent, and the refusal
        // kept as the error, so that the typo in `to` is found.
        // (Bounded: an SMTP server's refusals can run long, and the event's
        // message holds 4096 characters; its details keep them all.)
        let refused = match &o.result {
            Ok(sent) if !sent.refused.is_empty() => Some(crate::console::format::at_most(
                &format!("sent; refused: {}", sent.refused.join("; ")),
                REFUSED_NOTE_MAX,
            )),
            _ => None,
        };
        let (status, error, retry_after) = match &o.result {
            Ok(sent) => (sent.status, refused.as_deref(), None),
            Err(e) => (e.status, Some(e.error.as_str()), e.retry_after),
        };
        let status = status.map(i32::from);
        // Recipients reached so far (a failure's partial progress), kept for
        // the retry.
        let reached = serde_json::Value::from(match &o.result {
            Err(e) => e.reached.clone(),
            Ok(_) => Vec::new(),
        });
        // The age counts from the first attempt: a message held by a
        // silence or maintenance window for longer than max_delivery_age
        // goes when it ends with its full share of retries, not one.
        let first_attempt: Option<DateTime<Utc>> = if row.attempts <= 1 {
            Some(o.started)
        } else {
            tx.query_one(
                "SELECT min(started_at) FROM warden.alert_delivery_attempts WHERE delivery_id = $1",
                &[&row.id],
            )
            .await?
            .get(0)
        };
        let deadline = first_attempt.unwrap_or(row.created_at).max(row.created_at) + self.params.max_age;
        let recorded = match &o.result {
            Ok(_) => Recorded::Sent,
            Err(_) if now >= deadline => Recorded::Dead,
            Err(_) => Recorded::Failed,
        };
        let next_attempt = match recorded {
            Recorded::Failed => {
                let ra = retry_after.and_then(|d| Duration::from_std(d).ok());
                let delay = retry_delay(
                    row.attempts.max(1) as u32,
                    self.params.retry_base,
                    self.params.retry_max,
                    ra,
                    jitter(),
                );
                // One last try at the deadline rather than none after it,
                // unless the receiver asked to wait longer: a try inside its
                // Retry-After would only be refused again.
                let last = (now + delay).min(deadline.max(now + Duration::milliseconds(1)));
                ra.map_or(last, |ra| last.max(now + ra))
            }
            _ => now,
        };
        let outcome = match recorded {
            Recorded::Sent => "sent",
            Recorded::Failed => "failed",
            Recorded::Dead => "dead",
        };
        // Every write is guarded by the claim: if the lease ran out and
        // another dispatcher took the delivery, this one's outcome only
        // goes into the attempt log. A claim is this replica's name and
        // the attempt number it set (sends of one replica overlap, so the
        // name alone could match a later claim of the same delivery).
        let updated = tx
            .execute(
                "UPDATE warden.alert_deliveries SET \
                   state = CASE $2 WHEN 'sent' THEN 'sent' WHEN 'dead' THEN 'dead' ELSE 'pending' END, \
                   sent_at = CASE WHEN $2 = 'sent' THEN $3::timestamptz END, \
                   next_attempt_at = $4, last_error = $5, last_attempt_at = $6, \
                   last_status_code = $7, last_latency_ms = $8, claimed_by = NULL, claimed_until = NULL, \
                   detail = CASE WHEN $10::jsonb = '[]' THEN detail ELSE detail || jsonb_build_object('reached', $10::jsonb) END \
                 WHERE id = $1 AND state = 'pending' AND claimed_by = $9 AND attempts = $11",
                &[
                    &row.id,
                    &outcome,
                    &now,
                    &next_attempt,
                    &error,
                    &o.started,
                    &status,
                    &o.latency_ms,
                    &self.replica,
                    &reached,
                    &row.attempts,
                ],
            )
            .await?;
        // A receiver slowing warden down (429, as Slack does in an alert
        // storm, a burst of sends at once) is working: its refusals are
        // neither a failure streak, which would page about the channel,
        // nor a success. Deliveries wait out its Retry-After.
        let rate_limited = status == Some(429);
        let logged = tx
            .execute(
                "WITH a AS ( \
                   INSERT INTO warden.alert_delivery_attempts \
                     (delivery_id, channel, attempt, started_at, latency_ms, status_code, outcome, error, replica) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                   ON CONFLICT (delivery_id, attempt, replica) DO NOTHING \
                   RETURNING 1) \
                 INSERT INTO warden.alert_channels AS c (channel, kind, consecutive_failures, sent, failed, \
                     last_attempt_at, last_success_at, last_failure_at, last_status_code, last_latency_ms, last_error) \
                 SELECT $2, $10, CASE WHEN $7 = 'sent' OR $11 THEN 0 ELSE 1 END, ($7 = 'sent')::int, \
                        ($7 <> 'sent')::int, \
                        $4, CASE WHEN $7 = 'sent' THEN $4 END, CASE WHEN $7 <> 'sent' THEN $4 END, $6, $5, \
                        CASE WHEN $7 <> 'sent' THEN $8 END \
                 FROM a \
                 ON CONFLICT (channel) DO UPDATE SET \
                   kind = EXCLUDED.kind, \
                   consecutive_failures = CASE WHEN $7 = 'sent' THEN 0 WHEN $11 THEN c.consecutive_failures \
                                               ELSE c.consecutive_failures + 1 END, \
                   sent = c.sent + EXCLUDED.sent, failed = c.failed + EXCLUDED.failed, \
                   last_attempt_at = EXCLUDED.last_attempt_at, \
                   last_success_at = coalesce(EXCLUDED.last_success_at, c.last_success_at), \
                   last_failure_at = coalesce(EXCLUDED.last_failure_at, c.last_failure_at), \
                   last_status_code = EXCLUDED.last_status_code, last_latency_ms = EXCLUDED.last_latency_ms, \
                   last_error = EXCLUDED.last_error",
                &[
                    &row.id,
                    &row.channel,
                    &row.attempts,
                    &o.started,
                    &o.latency_ms,
                    &status,
                    &outcome,
                    &error,
                    &self.replica,
                    &self.channels.get(&row.channel).map(|c| c.kind().as_str()).unwrap_or("unknown"),
                    &rate_limited,
                ],
            )
            .await?;
        let given_up = matches!(recorded, Recorded::Dead) && updated == 1;
        // What an operator must hear of: a delivery given up, or one sent
        // with some recipients refused for good (never both).
        let event = if given_up {
            Some((
                "alert_delivery_dead",
                "critical",
                format!(
                    "alert delivery {} to {} given up after {}: {}",
                    row.id,
                    row.channel,
                    crate::console::format::counted(row.attempts.into(), "attempt", "attempts"),
                    error.unwrap_or_default()
                ),
                json!({"delivery_id": row.id, "alert_ids": row.alert_ids, "channel": row.channel,
                       "kind": row.kind, "attempts": row.attempts, "last_error": error}),
            ))
        } else {
            refused.as_ref().filter(|_| updated == 1).map(|note| {
                (
                    "alert_recipient_refused",
                    "warning",
                    format!("alert delivery {} to {}: {note}", row.id, row.channel),
                    json!({"delivery_id": row.id, "alert_ids": row.alert_ids, "channel": row.channel,
                           "refused": o.result.as_ref().map(|s| s.refused.clone()).unwrap_or_default()}),
                )
            })
        };
        if let Some((event_type, severity, message, details)) = event {
            tx.execute(
                "INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details) \
                 VALUES ($1, NULL, $2, $3, $4, $5)",
                &[&now, &event_type, &severity, &message, &details],
            )
            .await?;
        }
        tx.commit().await?;
        if logged == 0 {
            // An earlier try committed this before its answer was lost.
            return Ok(recorded);
        }
        crate::metrics::METRICS.deliveries.with_label_values(&[row.channel.as_str(), outcome]).inc();
        if let Some(note) = &refused {
            tracing::warn!(delivery = row.id, channel = %row.channel, refused = %note,
                "alert delivered, but the server refused some recipients for good; check the channel's addresses");
        }
        if given_up {
            tracing::warn!(delivery = row.id, channel = %row.channel, attempts = row.attempts,
                error = error.unwrap_or_default(), "alert delivery given up after alerting.max_delivery_age");
        } else if matches!(recorded, Recorded::Failed) {
            tracing::info!(delivery = row.id, channel = %row.channel, attempt = row.attempts,
                error = error.unwrap_or_default(), retry_at = %next_attempt, "alert delivery failed; will retry");
        }
        Ok(recorded)
    }
}

enum Recorded {
    Sent,
    Failed,
    Dead,
}

/// Sends with a hard bound, whatever the channel's own timeouts do (an SMTP
/// session's are per step): it ends well inside the claim, so no other
/// dispatcher can take the delivery over while it is still being sent.
/// The bound is what is left of the claim when the send starts: the
/// claim's queries and the message's took their share of it already.
async fn send_bounded(
    channel: &super::channels::Channel,
    message: &Message,
    reached: &[String],
    lease_ends: tokio::time::Instant,
) -> Result<Sent, SendError> {
    let limit = lease_ends.saturating_duration_since(tokio::time::Instant::now()).saturating_sub(SEND_MARGIN);
    if limit.is_zero() {
        return Err(SendError::new("the claim ran out before the send could start"));
    }
    // A channel with several recipients bounds each one a second sooner,
    // so that it can still say which of them it reached.
    let each = limit.saturating_sub(std::time::Duration::from_secs(1));
    match tokio::time::timeout(limit, channel.send(message, reached, each)).await {
        Ok(result) => result,
        Err(_) => Err(SendError::new("the send did not finish in time")),
    }
}

/// What a send leaves of its claim for recording its outcome.
const SEND_MARGIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Deliveries by state, for tests and reports.
pub async fn counts(client: &tokio_postgres::Client) -> Result<HashMap<String, i64>, DbError> {
    let rows = client.query("SELECT state, count(*) FROM warden.alert_deliveries GROUP BY state", &[]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_send_gets_only_what_is_left_of_its_claim() {
        let channel = super::super::channels::Channel::Log(super::super::channels::log::Log::new("ops".into()));
        let message = super::super::message::tests::message(vec![super::super::message::tests::view(1, "w1")]);
        let soon = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let e = send_bounded(&channel, &message, &[], soon).await.unwrap_err();
        assert!(e.error.contains("claim ran out"), "{}", e.error);
        let later = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        send_bounded(&channel, &message, &[], later).await.expect("time enough");
    }

    #[test]
    fn retries_double_up_to_the_cap_with_jitter_in_the_upper_half() {
        let (base, max) = (Duration::seconds(5), Duration::minutes(5));
        assert_eq!(retry_delay(1, base, max, None, 0.0), Duration::milliseconds(2500));
        assert_eq!(retry_delay(1, base, max, None, 1.0), Duration::seconds(5));
        assert_eq!(retry_delay(2, base, max, None, 1.0), Duration::seconds(10));
        assert_eq!(retry_delay(4, base, max, None, 1.0), Duration::seconds(40));
        assert_eq!(retry_delay(20, base, max, None, 1.0), max, "capped");
        assert_eq!(retry_delay(60, base, max, None, 0.0), max / 2, "no overflow");
        let d = retry_delay(3, base, max, None, 0.5);
        assert!(d > Duration::seconds(10) && d < Duration::seconds(20), "{d}");
    }

    #[test]
    fn a_receivers_retry_after_wins_within_an_hour() {
        let (base, max) = (Duration::seconds(5), Duration::minutes(5));
        assert_eq!(retry_delay(1, base, max, Some(Duration::seconds(7)), 0.9), Duration::seconds(7));
        assert_eq!(retry_delay(1, base, max, Some(Duration::hours(5)), 0.9), Duration::hours(1));
        assert_eq!(retry_delay(1, base, max, Some(Duration::zero()), 0.9), Duration::seconds(1));
    }

    #[test]
    fn jitter_is_a_fraction() {
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j));
        }
    }
}
