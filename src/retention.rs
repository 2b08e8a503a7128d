//! Retention and rollups: the tables must not grow forever, and the shape
//! of old history must survive its raw rows.
//!
//! One replica at a time (a session advisory lock) runs a cycle every
//! `retention.interval`:
//! 1. roll heartbeats up per agent and minute, minutes up per hour, and
//!    scores up per hour (each from a watermark, so a cycle reads only what
//!    is new), a short stretch per transaction, so that a backlog (days of
//!    retention switched off) is caught up in steps no statement timeout
//!    cuts off; and write each UTC day's liveness per agent to
//!    `liveness_days` once no transition still to come can change it (the
//!    status page reads those days);
//! 2. drop daily partitions of heartbeats, metrics and score history past
//!    their retention, detaching them CONCURRENTLY first so the parent
//!    table is never locked against ingestion; never a partition whose rows
//!    are not rolled up yet, and also a partition left detached by a cycle
//!    that died between detaching and dropping;
//! 3. delete old rows of the unpartitioned tables in small batches.
//!
//! A step that fails (a lock timeout behind a long transaction, say) is
//! reported and the cycle goes on with the next: one stuck table must not
//! let every other grow.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::config::RetentionSettings;
use crate::db::{self, DbError};

/// Advisory lock key of the retention job ("warden:r").
pub const LOCK: i64 = 0x7761_7264_656e_3a72;

/// Rows of a heartbeat may commit a little after their received_at; minutes
/// closer to now than this are rolled up next time.
const SETTLE: Duration = Duration::seconds(30);
/// How long a transaction that recorded a heartbeat through SQL may hold
/// the rollups back before each cycle says so.
const HELD_BACK_WARNING: Duration = Duration::minutes(10);
/// The most of each rollup's backlog one transaction takes on: a minute
/// rollup of ten minutes of a 100,000-agent fleet heartbeating every 10 s
/// reads 6 million rows, well inside the default statement timeout.
const MINUTE_STEP: Duration = Duration::minutes(10);
const HOUR_STEP: Duration = Duration::hours(1);
/// How long one cycle spends catching rollups up before it goes on to
/// dropping and pruning; the next cycle carries on.
const CATCH_UP_BUDGET: std::time::Duration = std::time::Duration::from_secs(120);
/// How long ingestion's refusals are kept, the stretches without the
/// database and each agent's latest refusal at capacity (liveness leaves
/// both out of agents' silence): an agent silent for longer has been
/// offline for days whatever they excuse.
const INGEST_OUTAGE_MEMORY: Duration = Duration::days(7);

/// What one cycle did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    pub minute_rows: u64,
    pub hour_rows: u64,
    pub score_rows: u64,
    /// UTC days whose liveness was written to `liveness_days`.
    pub liveness_days: u64,
    pub dropped_partitions: Vec<String>,
    pub pruned: BTreeMap<&'static str, u64>,
    /// Block ranges of the time-ordered tables' BRIN indexes summarized.
    pub summarized_ranges: i64,
    /// Steps that failed, with their error; the others still ran.
    pub failed: Vec<(&'static str, String)>,
    /// The process whose transaction, open since it recorded a heartbeat
    /// through SQL in the given minute, holds the rollups back (past
    /// [`HELD_BACK_WARNING`]).
    pub held_back_by: Option<(Option<i32>, DateTime<Utc>)>,
}

impl Report {
    fn failure(&mut self, step: &'static str, e: DbError) {
        self.failed.push((step, e.to_string()));
    }
}

/// Runs cycles until `stop`, on whichever replica holds the lock.
pub async fn run(pool: Pool, settings: RetentionSettings, stop: CancellationToken) {
    let mut every = crate::every::Every::new(settings.interval.get(), &stop);
    while every.tick().await {
        match run_once(&pool, &settings).await {
            Ok(Some(report)) => {
                if let Some((pid, minute)) = report.held_back_by {
                    tracing::warn!(
                        pid = pid.map_or_else(|| "none: a prepared transaction".to_string(), |p| p.to_string()),
                        since = %minute,
                        "a transaction that recorded a heartbeat through warden.record_heartbeat has not ended: \
                         heartbeat rollups wait for it (and partitions older than the rollups stay)"
                    );
                }
                for (step, error) in &report.failed {
                    crate::metrics::METRICS.retention_failures.with_label_values(&[step]).inc();
                    tracing::warn!(step, error, "retention step failed; the others ran, it will be retried");
                }
                if !report.dropped_partitions.is_empty() {
                    tracing::info!(dropped = ?report.dropped_partitions, pruned = ?report.pruned, "retention cycle");
                }
            }
            Ok(None) => {}
            Err(e) => {
                crate::metrics::METRICS.retention_failures.with_label_values(&["cycle"]).inc();
                tracing::warn!(error = %e, "retention cycle failed; will retry");
            }
        }
    }
}

/// One cycle if this replica gets the lock; `None` if another holds it.
pub async fn run_once(pool: &Pool, settings: &RetentionSettings) -> Result<Option<Report>, DbError> {
    let Ok(mut held) = db::SessionLock::try_take(db::client(pool).await?, LOCK).await? else {
        return Ok(None);
    };
    let report = async {
        let now: DateTime<Utc> = held.query_one("SELECT now()", &[]).await?.get(0);
        cycle(&mut held, settings, now).await
    }
    .await;
    held.release(report.is_ok()).await;
    report.map(Some)
}

/// One retention cycle at `now`. Fails only when the database cannot be
/// reached at all; a step that fails is listed in [`Report::failed`].
pub async fn cycle(
    client: &mut db::Client,
    settings: &RetentionSettings,
    now: DateTime<Utc>,
) -> Result<Report, DbError> {
    let mut report = Report::default();
    if let Err(e) = rollups(client, now, &mut report).await {
        report.failure("rollups", e);
    }
    if let Err(e) = liveness_days(client, settings, now, &mut report).await {
        report.failure("liveness_days", e);
    }
    // Rows go only once they are rolled up: raw heartbeats up to the
    // minute watermark, scores up to the score watermark (metrics have no
    // rollup), minute rollups up to the hour watermark.
    let marks = match client
        .query_one("SELECT minute_watermark, hour_watermark, score_watermark FROM warden.retention_state", &[])
        .await
    {
        Ok(row) => Some((
            row.get::<_, Option<DateTime<Utc>>>(0),
            row.get::<_, Option<DateTime<Utc>>>(1),
            row.get::<_, Option<DateTime<Utc>>>(2),
        )),
        Err(e) => {
            report.failure("watermarks", e.into());
            None
        }
    };
    if let Some((minutes, _, scores)) = marks {
        for (parent, keep, rolled_up_to) in [
            ("agent_heartbeats", settings.heartbeats, Some(minutes)),
            ("performance_metrics", settings.metrics, None),
            ("health_history", settings.health_history, Some(scores)),
        ] {
            let cutoff = now - keep.to_chrono();
            let cutoff = match rolled_up_to {
                Some(Some(mark)) => cutoff.min(mark),
                Some(None) => continue,
                None => cutoff,
            };
            let expired = match expired_partitions(client, parent, cutoff).await {
                Ok(expired) => expired,
                Err(e) => {
                    report.failure(parent, e);
                    continue;
                }
            };
            for (child, attached) in expired {
                match drop_partition(client, parent, &child, attached).await {
                    Ok(()) => report.dropped_partitions.push(child),
                    Err(e) => {
                        report.failure(parent, e);
                        break;
                    }
                }
            }
        }
    }
    let batch = i64::from(settings.batch);
    let hours_rolled = marks.and_then(|(_, hours, _)| hours);
    // Each prune with its cutoff; None: not now.
    let prunes: [(&'static str, &str, Option<DateTime<Utc>>); 8] = [
        (
            "events",
            // Oldest first, through system_events_prunable_idx (V21): the
            // planner takes it for the ordered read, where without the
            // order it walked past every transition kept for 400 days.
            // The ids as an array, so the delete finds them by primary
            // key: `id IN (subquery)` of a full batch was planned as a hash
            // join over the whole table. Give-ups of incidents still open
            // stay: escalation counts them to number each one's page.
            "DELETE FROM warden.system_events WHERE id = ANY (ARRAY(SELECT id FROM warden.system_events e \
               WHERE occurred_at < $1 AND NOT (event_type IN ('status_changed', 'evaluation_paused', 'agent_restarted') \
                                               AND source = 'warden') \
                 AND NOT (event_type = 'recovery_failed' AND source = 'warden' \
                          AND EXISTS (SELECT 1 FROM warden.incidents i \
                                      WHERE i.id = (e.details->>'incident_id')::bigint AND i.state = 'open')) \
               ORDER BY occurred_at LIMIT $2))",
            Some(now - settings.events.to_chrono()),
        ),
        (
            // With them, the stretches nobody evaluated (availability reads
            // both) and warden's restart detections (restart_loops beside
            // the restart_loop incidents, kept as long).
            "transitions",
            "DELETE FROM warden.system_events WHERE id = ANY (ARRAY(SELECT id FROM warden.system_events \
               WHERE occurred_at < $1 AND event_type IN ('status_changed', 'evaluation_paused', 'agent_restarted') \
                 AND source = 'warden' LIMIT $2))",
            Some(now - settings.transitions.to_chrono()),
        ),
        (
            // The days of the transitions gone above.
            "liveness_days",
            "DELETE FROM warden.liveness_days WHERE (day, agent_id) IN (SELECT day, agent_id \
               FROM warden.liveness_days WHERE day < ($1 AT TIME ZONE 'UTC')::date LIMIT $2)",
            Some(now - settings.transitions.to_chrono()),
        ),
        // Rollups go oldest first (their time indexes give the order for
        // nothing): a prune cut short leaves at most the oldest expired
        // hour partly deleted, not hours scattered through the range
        // reports then read as whole.
        (
            "minute_rollups",
            "DELETE FROM warden.heartbeat_rollups WHERE ctid IN (SELECT ctid FROM warden.heartbeat_rollups \
               WHERE bucket = 'minute' AND bucket_start < $1 ORDER BY bucket_start LIMIT $2)",
            hours_rolled.map(|mark| (now - settings.minute_rollups.to_chrono()).min(mark)),
        ),
        (
            "hour_rollups",
            "DELETE FROM warden.heartbeat_rollups WHERE ctid IN (SELECT ctid FROM warden.heartbeat_rollups \
               WHERE bucket = 'hour' AND bucket_start < $1 ORDER BY bucket_start LIMIT $2)",
            Some(now - settings.hour_rollups.to_chrono()),
        ),
        (
            "score_rollups",
            "DELETE FROM warden.score_rollups WHERE ctid IN (SELECT ctid FROM warden.score_rollups \
               WHERE hour_start < $1 ORDER BY hour_start LIMIT $2)",
            Some(now - settings.hour_rollups.to_chrono()),
        ),
        (
            "ingest_outages",
            "DELETE FROM warden.ingest_outages WHERE ctid IN (SELECT ctid FROM warden.ingest_outages \
               WHERE ended_at < $1 LIMIT $2)",
            Some(now - INGEST_OUTAGE_MEMORY),
        ),
        (
            "ingest_refusals",
            // Checked again outside: a refusal recorded meanwhile stays.
            "DELETE FROM warden.ingest_refusals WHERE agent_id = ANY (ARRAY(SELECT agent_id \
               FROM warden.ingest_refusals WHERE refused_at < $1 LIMIT $2)) AND refused_at < $1",
            Some(now - INGEST_OUTAGE_MEMORY),
        ),
    ];
    for (name, sql, cutoff) in prunes {
        let Some(cutoff) = cutoff else { continue };
        let mut total = 0;
        let done = loop {
            match client.execute(sql, &[&cutoff, &batch]).await {
                Ok(n) => {
                    total += n;
                    if n < batch as u64 {
                        break Ok(());
                    }
                }
                Err(e) => break Err(e),
            }
        };
        if total > 0 {
            report.pruned.insert(name, total);
        }
        if let Err(e) = done {
            report.failure(name, e.into());
        }
    }
    match prune_incidents(client, now - settings.incidents.to_chrono(), batch).await {
        Ok(0) => {}
        Ok(pruned) => {
            report.pruned.insert("incidents", pruned);
        }
        Err(e) => report.failure("incidents", e),
    }
    match summarize_brin(client, now).await {
        Ok(ranges) => report.summarized_ranges = ranges,
        Err(e) => report.failure("summarize", e),
    }
    client.execute("UPDATE warden.retention_state SET last_run_at = $1", &[&now]).await?;
    Ok(report)
}

/// Summarizes the block ranges filled since the last call in the BRIN
/// indexes on heartbeats', metrics' and scores' time. An unsummarized range
/// matches every search, so until autovacuum summarizes it (never, where
/// autovacuum is off; late, on a busy table) a time-bounded read of the
/// day's partition (the dashboards' last hour) scans all of it.
///
/// Only today's and yesterday's partitions (UTC) take new rows, and only
/// indexes warden's role owns can be summarized. One index at a time,
/// each waiting at most half a second for its lock: summarizing holds a
/// lock that autovacuum's conflicts with, and a wait past
/// `deadlock_timeout` would cancel autovacuum's run; an index skipped now
/// is summarized next cycle.
async fn summarize_brin(client: &mut db::Client, now: DateTime<Utc>) -> Result<i64, DbError> {
    let indexes: Vec<String> = client
        .query(
            "SELECT c.oid::regclass::text FROM pg_class c \
             JOIN pg_am am ON am.oid = c.relam \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_index i ON i.indexrelid = c.oid \
             JOIN pg_class t ON t.oid = i.indrelid \
             WHERE n.nspname = 'warden' AND c.relkind = 'i' AND am.amname = 'brin' \
               AND pg_has_role(c.relowner, 'USAGE') \
               AND right(t.relname, 10) IN ('_p' || to_char($1 AT TIME ZONE 'UTC', 'YYYYMMDD'), \
                                           '_p' || to_char(($1 AT TIME ZONE 'UTC') - interval '1 day', 'YYYYMMDD'))",
            &[&now],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut summarized = 0;
    for index in indexes {
        let tx = client.transaction().await?;
        tx.batch_execute("SET LOCAL lock_timeout = '500ms'").await?;
        match tx.query_one("SELECT brin_summarize_new_values($1::text::regclass)", &[&index]).await {
            Ok(row) => summarized += i64::from(row.get::<_, i32>(0)),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => continue,
            Err(e) => return Err(e.into()),
        }
        tx.commit().await?;
    }
    Ok(summarized)
}

/// Deletes incidents resolved before `cutoff`, a batch at a time, with
/// everything that hangs off them (alerts and their deliveries, recovery
/// jobs and actions), children first; also channel alerts and manual
/// recoveries that ended before the cutoff.
async fn prune_incidents(client: &mut db::Client, cutoff: DateTime<Utc>, batch: i64) -> Result<u64, DbError> {
    let mut total = 0;
    loop {
        let tx = client.transaction().await?;
        let ids: Vec<i64> = tx
            .query(
                "SELECT id FROM warden.incidents WHERE state = 'resolved' AND resolved_at < $1 ORDER BY id LIMIT $2",
                &[&cutoff, &batch],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let alerts: Vec<i64> = tx
            .query(
                "SELECT id FROM warden.alerts WHERE incident_id = ANY ($1)                  UNION SELECT id FROM (SELECT id FROM warden.alerts WHERE incident_id IS NULL AND state = 'resolved'                                        AND resolved_at < $2 LIMIT $3) channel",
                &[&ids, &cutoff, &batch],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let jobs: Vec<i64> = tx
            .query(
                "SELECT id FROM warden.recovery_jobs WHERE incident_id = ANY ($1)                  UNION SELECT id FROM (SELECT id FROM warden.recovery_jobs WHERE incident_id IS NULL                                        AND finished_at < $2 LIMIT $3) manual",
                &[&ids, &cutoff, &batch],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if ids.is_empty() && alerts.is_empty() && jobs.is_empty() {
            tx.commit().await?;
            return Ok(total);
        }
        tx.batch_execute("SET LOCAL lock_timeout = '10s'").await?;
        // A grouped message covers several alerts; it goes only with the
        // last of them. One that still covers others loses the pruned ones
        // (and any gone before) from its list, and its first alert becomes
        // the first left, so what it told the others' channels stays
        // known; then whatever still points at a pruned alert goes.
        let steps: [(&str, &(dyn tokio_postgres::types::ToSql + Sync)); 10] = [
            (
                "UPDATE warden.alert_deliveries d SET alert_ids = k.ids, alert_id = k.ids[1] \
                 FROM (SELECT d2.id, array_agg(x.id ORDER BY x.n) AS ids \
                       FROM warden.alert_deliveries d2, unnest(d2.alert_ids) WITH ORDINALITY AS x(id, n) \
                       WHERE d2.alert_ids && $1 AND x.id <> ALL ($1) \
                         AND EXISTS (SELECT 1 FROM warden.alerts a WHERE a.id = x.id) \
                       GROUP BY d2.id) k \
                 WHERE d.id = k.id",
                &alerts,
            ),
            (
                "DELETE FROM warden.alert_delivery_attempts WHERE delivery_id IN \
                   (SELECT id FROM warden.alert_deliveries WHERE alert_id = ANY ($1))",
                &alerts,
            ),
            (
                "DELETE FROM warden.alert_notifications WHERE alert_id = ANY ($1) OR delivery_id IN \
                   (SELECT id FROM warden.alert_deliveries WHERE alert_id = ANY ($1))",
                &alerts,
            ),
            ("DELETE FROM warden.alert_deliveries WHERE alert_id = ANY ($1)", &alerts),
            (
                "WITH gone AS (DELETE FROM warden.alerts WHERE id = ANY ($1) RETURNING group_id)                  DELETE FROM warden.alert_groups g USING gone WHERE g.id = gone.group_id                    AND NOT EXISTS (SELECT 1 FROM warden.alerts a WHERE a.group_id = g.id AND a.id <> ALL ($1))",
                &alerts,
            ),
            ("UPDATE warden.recovery_jobs SET current_action_id = NULL WHERE id = ANY ($1)", &jobs),
            ("DELETE FROM warden.recovery_actions WHERE job_id = ANY ($1)", &jobs),
            ("DELETE FROM warden.recovery_actions WHERE incident_id = ANY ($1)", &ids),
            ("DELETE FROM warden.recovery_jobs WHERE id = ANY ($1)", &jobs),
            ("DELETE FROM warden.incidents WHERE id = ANY ($1)", &ids),
        ];
        for (sql, param) in steps {
            tx.execute(sql, &[param]).await?;
        }
        tx.commit().await?;
        total += ids.len() as u64;
        if (ids.len() as i64) < batch && (alerts.len() as i64) < batch && (jobs.len() as i64) < batch {
            return Ok(total);
        }
    }
}

/// Folds heartbeats into minute rollups, minutes into hours, and scores into
/// hours, each from its watermark to the last complete bucket, a step at a
/// time, for at most [`CATCH_UP_BUDGET`].
async fn rollups(client: &mut db::Client, now: DateTime<Utc>, report: &mut Report) -> Result<(), DbError> {
    let started = std::time::Instant::now();
    while rollup_step(client, now, report).await? {
        if started.elapsed() > CATCH_UP_BUDGET {
            tracing::info!("rollups are catching up on a backlog; the next cycle goes on");
            break;
        }
    }
    Ok(())
}

/// One transaction: each rollup moves its watermark on by at most its
/// step. Returns whether any of them is still behind.
async fn rollup_step(client: &mut db::Client, now: DateTime<Utc>, report: &mut Report) -> Result<bool, DbError> {
    let tx = client.transaction().await?;
    let state = tx
        .query_one(
            "SELECT minute_watermark, hour_watermark, score_watermark FROM warden.retention_state FOR UPDATE",
            &[],
        )
        .await?;
    // Heartbeats of a write still open may be stamped before the settling
    // lag (see db::oldest_open_write): minutes close before it began.
    let mut settled = match db::oldest_open_write(&tx).await? {
        Some(open) => (now - SETTLE).min(open),
        None => now - SETTLE,
    };
    // Heartbeats recorded through SQL by a transaction still open, of any
    // age: counted once it commits, or never.
    if let Some((minute, pid)) = db::oldest_uncommitted_sql_heartbeat(&tx).await? {
        settled = settled.min(minute);
        if now - minute > HELD_BACK_WARNING {
            report.held_back_by = Some((pid, minute));
        }
    }
    // The first cycle on a database starts at its oldest row: partitions
    // are dropped only up to the watermarks, so a start later than that
    // (a database whose retention was off, history written before) would
    // drop raw rows never rolled up. A fresh installation has none, and
    // starts an hour back. The start is kept at once: in the first
    // half-minute of an hour the previous hour is not complete yet, so
    // nothing moves a watermark, and a start taken again at a later cycle
    // would skip the hours in between.
    let watermarks: [Option<DateTime<Utc>>; 3] = [state.get(0), state.get(1), state.get(2)];
    let mut starts = watermarks;
    if watermarks.contains(&None) {
        let fresh = now - Duration::hours(1);
        let beats = oldest_row(&tx, "agent_heartbeats", "received_at").await?.map_or(fresh, |t| t.min(fresh));
        let scores = oldest_row(&tx, "health_history", "evaluated_at").await?.map_or(fresh, |t| t.min(fresh));
        let [minutes, hours, score] = &mut starts;
        minutes.get_or_insert(truncate(beats, 3600));
        hours.get_or_insert(truncate(beats, 3600));
        score.get_or_insert(truncate(scores, 3600));
        tx.execute(
            "UPDATE warden.retention_state SET minute_watermark = $1, hour_watermark = $2, score_watermark = $3",
            &[&starts[0], &starts[1], &starts[2]],
        )
        .await?;
    }
    let [minute_from, hour_from, score_from] = starts.map(|w| w.unwrap_or(now));
    let minute_target = truncate(settled, 60);
    let minute_upto = minute_target.min(minute_from + MINUTE_STEP);
    // Hours close only once their minutes are rolled up.
    let hour_target = truncate(minute_upto.max(minute_from), 3600);
    let hour_upto = hour_target.min(hour_from + HOUR_STEP);
    // A score pass stamps its snapshots with its start and writes them in
    // short transactions after it (ingest must not wait on its row locks):
    // an hour closes only once a pass has started after it, when the
    // writes of the one before are over.
    let last_score: Option<DateTime<Utc>> =
        tx.query_one("SELECT last_score_at FROM warden.evaluator_state", &[]).await?.get(0);
    let score_target = truncate(last_score.map_or(minute_target, |at| minute_target.min(at)), 3600);
    let score_upto = score_target.min(score_from + HOUR_STEP);

    if minute_upto > minute_from {
        report.minute_rows += tx
            .execute(
                "INSERT INTO warden.heartbeat_rollups AS r (agent_id, bucket, bucket_start, heartbeats, restarts, unhealthy) \
                 SELECT agent_id, 'minute', date_trunc('minute', received_at, 'UTC'), count(*), \
                        count(*) FILTER (WHERE restart_detected), count(*) FILTER (WHERE status <> 'healthy') \
                 FROM warden.agent_heartbeats WHERE received_at >= $1 AND received_at < $2 \
                 GROUP BY 1, 3 \
                 ON CONFLICT (agent_id, bucket, bucket_start) DO UPDATE SET \
                   heartbeats = r.heartbeats + EXCLUDED.heartbeats, restarts = r.restarts + EXCLUDED.restarts, \
                   unhealthy = r.unhealthy + EXCLUDED.unhealthy",
                &[&minute_from, &minute_upto],
            )
            .await?;
        tx.execute("UPDATE warden.retention_state SET minute_watermark = $1", &[&minute_upto]).await?;
    }
    if hour_upto > hour_from {
        report.hour_rows += tx
            .execute(
                "INSERT INTO warden.heartbeat_rollups AS r (agent_id, bucket, bucket_start, heartbeats, restarts, unhealthy) \
                 SELECT agent_id, 'hour', date_trunc('hour', bucket_start, 'UTC'), sum(heartbeats), sum(restarts), sum(unhealthy) \
                 FROM warden.heartbeat_rollups WHERE bucket = 'minute' AND bucket_start >= $1 AND bucket_start < $2 \
                 GROUP BY 1, 3 \
                 ON CONFLICT (agent_id, bucket, bucket_start) DO UPDATE SET \
                   heartbeats = r.heartbeats + EXCLUDED.heartbeats, restarts = r.restarts + EXCLUDED.restarts, \
                   unhealthy = r.unhealthy + EXCLUDED.unhealthy",
                &[&hour_from, &hour_upto],
            )
            .await?;
        tx.execute("UPDATE warden.retention_state SET hour_watermark = $1", &[&hour_upto]).await?;
    }
    if score_upto > score_from {
        report.score_rows += tx
            .execute(
                "INSERT INTO warden.score_rollups AS r (agent_id, hour_start, samples, score_min, score_avg, score_max) \
                 SELECT agent_id, date_trunc('hour', evaluated_at, 'UTC'), count(score), min(score), avg(score), max(score) \
                 FROM warden.health_history WHERE evaluated_at >= $1 AND evaluated_at < $2 \
                 GROUP BY 1, 2 \
                 ON CONFLICT (agent_id, hour_start) DO UPDATE SET \
                   score_min = least(r.score_min, EXCLUDED.score_min), \
                   score_max = greatest(r.score_max, EXCLUDED.score_max), \
                   score_avg = (r.score_avg * r.samples + EXCLUDED.score_avg * EXCLUDED.samples) \
                               / nullif(r.samples + EXCLUDED.samples, 0), \
                   samples = r.samples + EXCLUDED.samples",
                &[&score_from, &score_upto],
            )
            .await?;
        tx.execute("UPDATE warden.retention_state SET score_watermark = $1", &[&score_upto]).await?;
    }
    tx.commit().await?;
    Ok(minute_upto < minute_target || hour_upto < hour_target || score_upto < score_target)
}

/// Writes each closed UTC day's liveness per agent to `liveness_days`,
/// one day per transaction, within the catch-up budget.
async fn liveness_days(
    client: &mut db::Client,
    settings: &RetentionSettings,
    now: DateTime<Utc>,
    report: &mut Report,
) -> Result<(), DbError> {
    let started = std::time::Instant::now();
    while liveness_day_step(client, settings, now, report).await? {
        if started.elapsed() > CATCH_UP_BUDGET {
            tracing::info!("liveness days are catching up on a backlog; the next cycle goes on");
            break;
        }
    }
    Ok(())
}

/// Writes the day at the watermark if it is final, and moves the
/// watermark past it. Returns whether another day is final and unwritten.
async fn liveness_day_step(
    client: &mut db::Client,
    settings: &RetentionSettings,
    now: DateTime<Utc>,
    report: &mut Report,
) -> Result<bool, DbError> {
    let tx = client.transaction().await?;
    // Final: the day ended before the last liveness cycle by more than
    // any agent's outage can be recorded late (liveness_spans' own reach,
    // a day at least), and an hour. A stretch without evaluation is
    // recorded once it ends, from the last cycle before it: after that
    // cycle in any case.
    let row = tx
        .query_one(
            "SELECT r.liveness_day_watermark, \
                    e.last_cycle_at - interval '1 hour' - greatest(interval '1 day', \
                      coalesce((SELECT max(s.expected_interval_ms) FROM warden.agent_status s), 0) \
                        * coalesce((SELECT hp.offline_after_missed + hp.jitter_tolerance + 1 \
                                    FROM warden.health_params hp), 5) * interval '1 millisecond'), \
                    (SELECT min(s.first_seen) FROM warden.agent_status s) \
             FROM warden.retention_state r, warden.evaluator_state e \
             FOR UPDATE OF r",
            &[],
        )
        .await?;
    let (watermark, settled, first_seen): (Option<NaiveDate>, Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
        (row.get(0), row.get(1), row.get(2));
    let (Some(settled), Some(first_seen)) = (settled, first_seen) else { return Ok(false) };
    // Days before the watermark are written; days before `final_until`
    // can be. A first cycle starts with the oldest agent's first day, or
    // where the transitions kept begin.
    let final_until = settled.date_naive();
    let day = watermark.unwrap_or_else(|| first_seen.max(now - settings.transitions.to_chrono()).date_naive());
    if day >= final_until {
        return Ok(false);
    }
    let next = day.succ_opt().unwrap_or(day);
    // liveness_spans' estimates run to millions of rows for thousands: JIT
    // then compiles the statement for longer than it runs (2.1 s against
    // 0.86 s for a day of 2,000 agents with heavy churn).
    tx.batch_execute("SET LOCAL jit = off").await?;
    let (from, until) =
        (day.and_time(chrono::NaiveTime::MIN).and_utc(), next.and_time(chrono::NaiveTime::MIN).and_utc());
    report.liveness_days += 1;
    tx.execute(
        "INSERT INTO warden.liveness_days AS d \
           (day, agent_id, first_seen, online_seconds, degraded_seconds, offline_seconds) \
         SELECT l.day, l.agent_id, s.first_seen, l.online_seconds, l.degraded_seconds, l.offline_seconds \
         FROM warden.liveness_by_day($2, $3) l \
         JOIN warden.agent_status s ON s.agent_id = l.agent_id \
         WHERE l.day = $1 \
         ON CONFLICT (day, agent_id) DO UPDATE SET first_seen = EXCLUDED.first_seen, \
           online_seconds = EXCLUDED.online_seconds, degraded_seconds = EXCLUDED.degraded_seconds, \
           offline_seconds = EXCLUDED.offline_seconds",
        &[&day, &from, &until],
    )
    .await?;
    tx.execute("UPDATE warden.retention_state SET liveness_day_watermark = $1", &[&next]).await?;
    tx.commit().await?;
    Ok(next < final_until)
}

fn truncate(at: DateTime<Utc>, seconds: i64) -> DateTime<Utc> {
    let ts = at.timestamp();
    DateTime::from_timestamp(ts - ts.rem_euclid(seconds), 0).unwrap_or(at)
}

/// The time of the oldest row of `parent` (`column` is what it is
/// partitioned on), from its oldest partition with any: one partition is
/// read, not the whole history.
async fn oldest_row(
    tx: &tokio_postgres::Transaction<'_>,
    parent: &str,
    column: &str,
) -> Result<Option<DateTime<Utc>>, DbError> {
    let children = tx
        .query(
            "SELECT c.relname::text FROM pg_inherits i \
             JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent \
             JOIN pg_namespace n ON n.oid = p.relnamespace \
             WHERE n.nspname = 'warden' AND p.relname = $1",
            &[&parent],
        )
        .await?;
    let mut days: Vec<(NaiveDate, String)> = children
        .iter()
        .filter_map(|r| {
            let child: String = r.get(0);
            partition_day(parent, &child).map(|day| (day, child))
        })
        .collect();
    days.sort();
    for (_, child) in days {
        // Names of warden's own partitions (checked above), quoted all the same.
        let sql = format!("SELECT min({column}) FROM warden.\"{}\"", child.replace('"', "\"\""));
        if let Some(oldest) = tx.query_one(&sql, &[]).await?.get::<_, Option<DateTime<Utc>>>(0) {
            return Ok(Some(oldest));
        }
    }
    Ok(None)
}

/// The day a partition named `<parent>_pYYYYMMDD` holds.
pub fn partition_day(parent: &str, child: &str) -> Option<NaiveDate> {
    let digits = child.strip_prefix(parent)?.strip_prefix("_p")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    NaiveDate::parse_from_str(digits, "%Y%m%d").ok()
}

/// The comment a partition carries from just before it is detached for
/// dropping.
const DETACHING: &str = "warden retention: detached for dropping";

/// Partitions of `parent` whose whole day lies before `cutoff`, oldest
/// first, each with whether it is still attached; also tables a cycle
/// detached (they carry [`DETACHING`]) and died before it could drop.
async fn expired_partitions(
    client: &tokio_postgres::Client,
    parent: &str,
    cutoff: DateTime<Utc>,
) -> Result<Vec<(String, Attached)>, DbError> {
    let rows = client
        .query(
            "SELECT c.relname::text, c.relispartition, \
                    coalesce((SELECT i.inhdetachpending FROM pg_inherits i WHERE i.inhrelid = c.oid), false) \
             FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'warden' AND c.relkind = 'r' AND left(c.relname, length($1) + 2) = $1 || '_p' \
               AND ((NOT c.relispartition AND obj_description(c.oid, 'pg_class') = $2) \
                    OR EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent \
                               WHERE i.inhrelid = c.oid AND p.relname = $1 AND p.relnamespace = n.oid))",
            &[&parent, &DETACHING],
        )
        .await?;
    let mut expired: Vec<(String, Attached)> = rows
        .iter()
        .map(|r| {
            let attached = match (r.get::<_, bool>(1), r.get::<_, bool>(2)) {
                (false, _) => Attached::No,
                (true, false) => Attached::Yes,
                (true, true) => Attached::DetachPending,
            };
            (r.get::<_, String>(0), attached)
        })
        .filter(|(child, _)| {
            partition_day(parent, child)
                .and_then(|day| day.succ_opt())
                .and_then(|end| end.and_hms_opt(0, 0, 0))
                .is_some_and(|end| end.and_utc() <= cutoff)
        })
        .collect();
    expired.sort();
    Ok(expired)
}

/// Where an expired partition stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Attached {
    Yes,
    /// A `DETACH ... CONCURRENTLY` was interrupted in its second phase
    /// (a lock timeout while old snapshots lasted): only `FINALIZE` ends it.
    DetachPending,
    /// Detached by a cycle that died before its DROP.
    No,
}

/// Detaches a partition without locking the parent against writers, then
/// drops it. A detach interrupted earlier is finished first; a table
/// detached earlier is only dropped.
async fn drop_partition(
    client: &tokio_postgres::Client,
    parent: &str,
    child: &str,
    attached: Attached,
) -> Result<(), DbError> {
    // Both names are warden's own (checked against the partition pattern),
    // never input; identifiers cannot be bound as parameters.
    debug_assert!(partition_day(parent, child).is_some());
    client.batch_execute("SET lock_timeout = '10s'").await?;
    let result = detach_and_drop(client, parent, child, attached).await;
    // The session goes back to the pool: whatever happened, it must not
    // keep a lock timeout that ingestion or the evaluator would then hit.
    let reset = client.batch_execute("RESET lock_timeout").await;
    result?;
    reset?;
    Ok(())
}

async fn detach_and_drop(
    client: &tokio_postgres::Client,
    parent: &str,
    child: &str,
    attached: Attached,
) -> Result<(), DbError> {
    let finalize = format!("ALTER TABLE warden.{parent} DETACH PARTITION warden.{child} FINALIZE");
    if attached != Attached::No {
        // Marked first, so that a later cycle knows a table left detached
        // (this one dying before its DROP) as its own, and never drops a
        // table of the same name an operator restored to look at.
        client.batch_execute(&format!("COMMENT ON TABLE warden.{child} IS '{DETACHING}'")).await?;
    }
    match attached {
        Attached::Yes => {
            let detach = client
                .batch_execute(&format!("ALTER TABLE warden.{parent} DETACH PARTITION warden.{child} CONCURRENTLY"))
                .await;
            if let Err(e) = detach {
                // Left pending by another session since the catalogue was
                // read, told by its code: the message is translated on a
                // server whose lc_messages is not English. (The same code
                // comes when another partition's detach is pending: then
                // FINALIZE fails too, and the first error says why.)
                let raced = e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE)
                    && client.batch_execute(&finalize).await.is_ok();
                if !raced {
                    unmark_if_untouched(client, child).await;
                    return Err(e.into());
                }
            }
        }
        Attached::DetachPending => client.batch_execute(&finalize).await?,
        Attached::No => {}
    }
    client.batch_execute(&format!("DROP TABLE warden.{child}")).await?;
    Ok(())
}

/// After a detach failed: if nothing of it happened (its first phase timed
/// out on a lock, the partition still attached and not pending), the mark
/// goes, so that a table an operator detaches by hand meanwhile, to keep
/// it, is not taken for one a cycle left behind. Best effort: the error
/// that brought it here is the one reported.
async fn unmark_if_untouched(client: &tokio_postgres::Client, child: &str) {
    let untouched = client
        .query_opt(
            "SELECT 1 FROM pg_inherits WHERE inhrelid = ('warden.' || $1)::regclass AND NOT inhdetachpending",
            &[&child],
        )
        .await;
    if matches!(untouched, Ok(Some(_))) {
        let _ = client.batch_execute(&format!("COMMENT ON TABLE warden.{child} IS NULL")).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_give_their_day() {
        assert_eq!(
            partition_day("agent_heartbeats", "agent_heartbeats_p20261123"),
            NaiveDate::from_ymd_opt(2026, 11, 23)
        );
        assert_eq!(partition_day("agent_heartbeats", "agent_heartbeats_p2026112"), None);
        assert_eq!(partition_day("agent_heartbeats", "performance_metrics_p20261123"), None);
        assert_eq!(partition_day("agent_heartbeats", "agent_heartbeats_pabcdefgh"), None);
    }

    #[test]
    fn buckets_truncate_to_their_start() {
        let at: DateTime<Utc> = "2026-11-23T12:34:56Z".parse().unwrap();
        assert_eq!(truncate(at, 60).to_rfc3339(), "2026-11-23T12:34:00+00:00");
        assert_eq!(truncate(at, 3600).to_rfc3339(), "2026-11-23T12:00:00+00:00");
    }
}
