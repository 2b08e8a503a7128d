//! Retention: rollups from watermarks, old partitions dropped while
//! ingestion goes on, old rows pruned.

use std::time::Duration;

use chrono::{Duration as Span, Utc};
use serde_json::json;
use warden::auth::Scope;
use warden::retention::Report;

use crate::helpers::{TestApp, TestDb, default_settings};

/// One retention cycle at `now` with the default settings, on a pooled
/// connection as warden runs it.
async fn cycle(db: &TestDb, now: chrono::DateTime<Utc>) -> Report {
    let mut client = db.pooled().await;
    warden::retention::cycle(&mut client, &default_settings().retention, now).await.unwrap()
}

/// Heartbeats of `agent` in its rollups of one `bucket` ('minute', 'hour').
async fn rolled_up(db: &tokio_postgres::Client, agent: &str, bucket: &str) -> i64 {
    db.query_one(
        "SELECT coalesce(sum(heartbeats), 0)::bigint FROM warden.heartbeat_rollups WHERE agent_id = $1 AND bucket = $2",
        &[&agent, &bucket],
    )
    .await
    .unwrap()
    .get(0)
}

/// The steps of a cycle that failed.
fn failed_steps(report: &Report) -> Vec<&'static str> {
    report.failed.iter().map(|f| f.0).collect()
}

#[tokio::test]
async fn heartbeats_and_scores_roll_up_per_minute_and_hour() {
    // A bare database: a running evaluator would add its own score
    // snapshots to the hour this test asserts on.
    let test_db = TestDb::migrated().await;
    let db = test_db.client().await;
    // Ten seconds into the hour: the first cycle cannot close the previous
    // hour yet (rows settle for 30 s), and the next comes two hours later.
    let top = Utc::now().timestamp();
    let now = chrono::DateTime::from_timestamp(top - top % 3600 + 10, 0).unwrap();
    // Three heartbeats in the minute that starts 40 minutes before, one of
    // them a restart.
    let forty = (now - Span::minutes(40)).timestamp();
    let minute = chrono::DateTime::from_timestamp(forty - forty % 60, 0).unwrap();
    for (i, uptime) in [100_i64, 200, 5].iter().enumerate() {
        db.execute(
            "SELECT * FROM warden.ingest_heartbeats(ARRAY['r1'], ARRAY[NULL::text], ARRAY[NULL::jsonb], ARRAY[NULL::text], \
               ARRAY['healthy'], ARRAY[$1::bigint], ARRAY[NULL::int], ARRAY[NULL::timestamptz], '{}', '{}', '{}', '{}', $2)",
            &[uptime, &(minute + Span::seconds(10 * i as i64))],
        )
        .await
        .unwrap();
    }
    db.execute(
        "INSERT INTO warden.health_history (agent_id, evaluated_at, score, tier, liveness) \
         VALUES ('r1', $1, 60, 'fair', 'online'), ('r1', $1 + interval '1 minute', 90, 'excellent', 'online')",
        &[&minute],
    )
    .await
    .unwrap();

    let report = cycle(&test_db, now).await;
    assert!(report.minute_rows >= 1, "{report:?}");
    let row = db
        .query_one(
            "SELECT heartbeats, restarts FROM warden.heartbeat_rollups WHERE agent_id = 'r1' AND bucket = 'minute' \
             AND bucket_start = $1",
            &[&minute],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (3, 1));

    // A second cycle adds nothing twice.
    cycle(&test_db, now).await;
    let total: i64 = db
        .query_one("SELECT sum(heartbeats)::bigint FROM warden.heartbeat_rollups WHERE bucket = 'minute'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 3, "watermarks keep cycles from counting twice");

    // Two hours later the hour is complete: heartbeats and scores per hour.
    let later = now + Span::hours(2);
    cycle(&test_db, later).await;
    let hour = chrono::DateTime::from_timestamp(minute.timestamp() - minute.timestamp() % 3600, 0).unwrap();
    let hourly: i64 = db
        .query_one(
            "SELECT heartbeats FROM warden.heartbeat_rollups WHERE agent_id = 'r1' AND bucket = 'hour' AND bucket_start = $1",
            &[&hour],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(hourly, 3);
    let scores = db
        .query_one(
            "SELECT score_min, score_avg, score_max FROM warden.score_rollups WHERE agent_id = 'r1' AND hour_start = $1",
            &[&hour],
        )
        .await
        .unwrap();
    assert_eq!((scores.get::<_, f64>(0), scores.get::<_, f64>(1), scores.get::<_, f64>(2)), (60.0, 75.0, 90.0));
}

#[tokio::test]
async fn a_heartbeat_of_a_write_still_open_is_rolled_up_once_it_commits() {
    // Stamped with its transaction's start, it may commit after the
    // settling lag (waiting on row locks): its minute must stay open.
    let test_db = TestDb::migrated().await;
    let db = test_db.client().await;
    let mut slow = test_db.client().await;
    let tx = slow.transaction().await.unwrap();
    let started: chrono::DateTime<Utc> = tx.query_one("SELECT now()", &[]).await.unwrap().get(0);
    tx.execute(
        "SELECT * FROM warden.ingest_heartbeats(ARRAY['late-writer'], ARRAY[NULL::text], ARRAY[NULL::jsonb], \
           ARRAY[NULL::text], ARRAY['healthy'], ARRAY[NULL::bigint], ARRAY[NULL::int], ARRAY[NULL::timestamptz], \
           '{}', '{}', '{}', '{}')",
        &[],
    )
    .await
    .unwrap();

    cycle(&test_db, started + Span::minutes(3)).await;
    tx.commit().await.unwrap();
    cycle(&test_db, started + Span::minutes(4)).await;
    assert_eq!(rolled_up(&db, "late-writer", "minute").await, 1);
}

#[tokio::test]
async fn a_heartbeat_recorded_through_sql_in_a_long_transaction_is_rolled_up_once_it_commits() {
    // An agent writing through SQL may keep its transaction open for any
    // time (or as a role whose sessions warden cannot see): its heartbeat,
    // stamped at the call, must not have its minute closed meanwhile.
    let test_db = TestDb::migrated().await;
    let db = test_db.client().await;
    let mut agent = test_db.client().await;
    let tx = agent.transaction().await.unwrap();
    let row = tx.query_one("SELECT clock_timestamp(), pg_backend_pid()", &[]).await.unwrap();
    let (called, pid): (chrono::DateTime<Utc>, i32) = (row.get(0), row.get(1));
    tx.execute("SELECT warden.record_heartbeat('sql-agent')", &[]).await.unwrap();

    // Retention with a 1 s statement timeout sees open writes begun in the
    // last 2 s only: wait until this one is older.
    crate::helpers::eventually(Duration::from_secs(60), "the agent's transaction to age", || async {
        let age: f64 = db
            .query_one("SELECT date_part('epoch', now() - xact_start) FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .await
            .unwrap()
            .get(0);
        (age > 2.5).then_some(())
    })
    .await;
    let mut retention = test_db.pooled().await;
    retention.batch_execute("SET statement_timeout = '1s'").await.unwrap();
    let report = warden::retention::cycle(&mut retention, &default_settings().retention, called + Span::minutes(15))
        .await
        .unwrap();
    assert_eq!(report.held_back_by.map(|(p, _)| p), Some(Some(pid)), "the cycle names who holds the rollups back");
    tx.commit().await.unwrap();
    cycle(&test_db, called + Span::minutes(16)).await;
    assert_eq!(rolled_up(&db, "sql-agent", "minute").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_partitions_are_dropped_while_ingestion_goes_on() {
    let app = TestApp::spawn_with(|s| s.retention.enabled = false).await;
    let key = app.key(&[Scope::Ingest]).await;
    let db = app.db.client().await;
    let today = Utc::now().date_naive();
    // Partitions ten and nine days old, with a row in the older one.
    db.execute("SELECT warden.ensure_partitions($1, $2)", &[&(today - Span::days(10)), &(today - Span::days(9))])
        .await
        .unwrap();
    db.execute(
        "INSERT INTO warden.agent_heartbeats (agent_id, received_at, status) VALUES ('old', $1, 'healthy')",
        &[&(Utc::now() - Span::days(10))],
    )
    .await
    .unwrap();
    let old = format!("agent_heartbeats_p{}", (today - Span::days(10)).format("%Y%m%d"));

    // Heartbeats keep flowing over HTTP the whole time.
    let app = std::sync::Arc::new(app);
    let flowing = {
        let (app, key) = (app.clone(), key.clone());
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..60 {
                statuses.push(app.heartbeat(&key, json!({"agent_id": "live", "uptime_seconds": i})).await.0);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            statuses
        })
    };
    let report = cycle(&app.db, Utc::now()).await;
    assert!(report.dropped_partitions.contains(&old), "{:?}", report.dropped_partitions);
    let statuses = flowing.await.unwrap();
    assert!(statuses.iter().all(|s| *s == 200), "ingestion never failed: {statuses:?}");
    let gone: bool = db.query_one("SELECT to_regclass('warden.' || $1) IS NULL", &[&old]).await.unwrap().get(0);
    assert!(gone);
    let today_partition = format!("agent_heartbeats_p{}", today.format("%Y%m%d"));
    let kept: bool =
        db.query_one("SELECT to_regclass('warden.' || $1) IS NOT NULL", &[&today_partition]).await.unwrap().get(0);
    assert!(kept, "today's partition stays");
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_heartbeats WHERE agent_id = 'live'").await, 60);
}

#[tokio::test]
async fn old_events_are_pruned_but_transitions_are_kept_longer() {
    // Its evaluator quiet: it would resolve the open incident of the agent
    // heartbeating below.
    let app = TestApp::spawn_quiet_with(|s| s.retention.enabled = false).await;
    let db = app.db.client().await;
    db.batch_execute(
        "INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message) VALUES \
           (now() - interval '101 days', 'a', 'agent_restarted', 'info', 'old restart'), \
           (now() - interval '100 days', 'a', 'status_changed', 'info', 'old transition'), \
           (now() - interval '500 days', 'a', 'status_changed', 'info', 'ancient transition'), \
           (now() - interval '1 day', 'a', 'agent_restarted', 'info', 'recent'); \
         INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, source) VALUES \
           (now() - interval '100 days', 'a', 'agent_restarted', 'info', 'old restart the agent posted', 'agent'), \
           (now() - interval '100 days', 'a', 'job_failed', 'warning', 'old error', 'agent'); \
         INSERT INTO warden.system_events (occurred_at, event_type, severity, message) VALUES \
           (now() - interval '99 days', 'evaluation_paused', 'warning', 'old pause'); \
         INSERT INTO warden.incidents (id, agent_id, issue_type, severity, state, opened_at, resolved_at) \
           OVERRIDING SYSTEM VALUE VALUES \
           (7, 'a', 'agent_unresponsive', 'critical', 'open', now() - interval '200 days', NULL), \
           (8, 'a', 'agent_unresponsive', 'critical', 'resolved', now() - interval '200 days', now() - interval '1 day'); \
         INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details) VALUES \
           (now() - interval '98 days', 'a', 'recovery_failed', 'critical', 'old give-up, open', '{\"incident_id\": 7}'), \
           (now() - interval '98 days', 'a', 'recovery_failed', 'critical', 'old give-up, resolved', '{\"incident_id\": 8}'); \
         INSERT INTO warden.ingest_outages (started_at, ended_at) VALUES \
           (now() - interval '8 days 1 minute', now() - interval '8 days'), \
           (now() - interval '6 days 1 minute', now() - interval '6 days'); \
         SELECT warden.record_heartbeat('a'), warden.record_heartbeat('b'); \
         INSERT INTO warden.ingest_refusals (agent_id, refused_at) VALUES \
           ('a', now() - interval '8 days'), ('b', now() - interval '6 days')",
    )
    .await
    .unwrap();
    let mut settings = default_settings().retention;
    settings.batch = 100;
    let mut client = app.db.pooled().await;
    let report = warden::retention::cycle(&mut client, &settings, Utc::now()).await.unwrap();
    assert_eq!(report.pruned.get("events"), Some(&3));
    assert_eq!(report.pruned.get("transitions"), Some(&1));
    let left: Vec<String> = db
        .query(
            "SELECT message FROM warden.system_events WHERE occurred_at < now() - interval '1 hour' ORDER BY occurred_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        left,
        vec!["old restart", "old transition", "old pause", "old give-up, open", "recent"],
        "pauses and restarts warden detected are kept as long as transitions, give-ups while their incident is open"
    );
    assert_eq!(report.pruned.get("ingest_outages"), Some(&1), "outages are kept a week");
    assert_eq!(app.count("SELECT count(*) FROM warden.ingest_outages").await, 1);
    assert_eq!(report.pruned.get("ingest_refusals"), Some(&1), "and so are refusals at capacity");
    assert_eq!(app.count("SELECT count(*) FROM warden.ingest_refusals WHERE agent_id = 'b'").await, 1);
}

#[tokio::test]
async fn resolved_incidents_past_retention_go_with_their_alerts_and_recoveries() {
    let app = TestApp::spawn_with(|s| {
        s.retention.enabled = false;
        s.alerting.enabled = false;
        s.recovery.enabled = false;
    })
    .await;
    let db = app.db.client().await;
    db.batch_execute(
        "INSERT INTO warden.incidents (id, agent_id, issue_type, severity, state, opened_at, resolved_at) OVERRIDING SYSTEM VALUE \
           VALUES (1, 'a', 'agent_unresponsive', 'critical', 'resolved', now() - interval '500 days', now() - interval '499 days'), \
                  (2, 'a', 'agent_unresponsive', 'critical', 'resolved', now() - interval '2 days', now() - interval '1 day'), \
                  (3, 'b', 'flapping', 'warning', 'open', now() - interval '600 days', NULL); \
         INSERT INTO warden.alerts (incident_id, dedup_key, severity, state, opened_at, resolved_at) \
           VALUES (1, 'a:agent_unresponsive', 'critical', 'resolved', now() - interval '500 days', now() - interval '499 days'); \
         INSERT INTO warden.alert_deliveries (alert_id, channel, kind, state, sent_at) \
           SELECT id, 'log', 'firing', 'sent', now() - interval '500 days' FROM warden.alerts; \
         INSERT INTO warden.recovery_jobs (incident_id, agent_id, strategy, state, finished_at) \
           VALUES (1, 'a', 'restart', 'succeeded', now() - interval '499 days'); \
         INSERT INTO warden.recovery_actions (incident_id, agent_id, strategy, action, attempt, state, job_id) \
           SELECT 1, 'a', 'restart', 'command#1', 1, 'succeeded', id FROM warden.recovery_jobs; \
         UPDATE warden.recovery_jobs SET current_action_id = (SELECT max(id) FROM warden.recovery_actions);",
    )
    .await
    .unwrap();
    let report = cycle(&app.db, Utc::now()).await;
    assert_eq!(report.pruned.get("incidents"), Some(&1));
    let left: Vec<i64> =
        db.query("SELECT id FROM warden.incidents ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(left, vec![2, 3], "recent and still-open incidents stay");
    for table in ["alerts", "alert_deliveries", "recovery_jobs", "recovery_actions"] {
        assert_eq!(app.count(&format!("SELECT count(*) FROM warden.{table}")).await, 0, "{table}");
    }
}

/// Heartbeats at noon of each of the last `days` days (agent `b`), with
/// every watermark at the start of the oldest of them.
async fn backlog(db: &tokio_postgres::Client, days: i64) -> chrono::NaiveDate {
    let today = Utc::now().date_naive();
    let oldest = today - Span::days(days);
    db.execute("SELECT warden.ensure_partitions($1, $2)", &[&(oldest - Span::days(1)), &today]).await.unwrap();
    for d in 0..days {
        let noon = (oldest + Span::days(d)).and_hms_opt(12, 0, 0).unwrap().and_utc();
        db.execute(
            "INSERT INTO warden.agent_heartbeats (agent_id, received_at, status) VALUES ('b', $1, 'healthy')",
            &[&noon],
        )
        .await
        .unwrap();
    }
    let start = oldest.and_hms_opt(0, 0, 0).unwrap().and_utc();
    db.execute(
        "UPDATE warden.retention_state SET minute_watermark = $1, hour_watermark = $1, score_watermark = $1",
        &[&start],
    )
    .await
    .unwrap();
    oldest
}

#[tokio::test]
async fn a_backlog_of_days_is_rolled_up_in_steps_before_its_partitions_go() {
    let test_db = TestDb::migrated().await;
    let db = test_db.client().await;
    let oldest = backlog(&db, 9).await;
    let now = Utc::now();
    // Minute rollups kept long enough to count them all below.
    let mut settings = default_settings().retention;
    settings.minute_rollups = warden::config::Duration::from_secs(30 * 86_400);
    let report = warden::retention::cycle(&mut test_db.pooled().await, &settings, now).await.unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(rolled_up(&db, "b", "minute").await, 9, "every day of the backlog, once");
    assert_eq!(rolled_up(&db, "b", "hour").await, 9);
    let minute_mark: chrono::DateTime<Utc> =
        db.query_one("SELECT minute_watermark FROM warden.retention_state", &[]).await.unwrap().get(0);
    assert!(now - minute_mark < Span::minutes(2), "caught up to {minute_mark}");
    // Seven days kept: the partitions of the days before went, after
    // their rows were rolled up.
    for d in [oldest - Span::days(1), oldest, oldest + Span::days(1)] {
        let name = format!("agent_heartbeats_p{}", d.format("%Y%m%d"));
        assert!(report.dropped_partitions.contains(&name), "{name} in {:?}", report.dropped_partitions);
    }
}

/// A database whose retention never ran (switched off since it was set
/// up, or history written before): the first cycle rolls up from the
/// oldest row, and drops no partition whose rows it has not rolled up.
#[tokio::test]
async fn the_first_cycle_rolls_up_from_the_oldest_row_before_any_partition_goes() {
    let test_db = TestDb::migrated().await;
    let db = test_db.client().await;
    let oldest = backlog(&db, 9).await;
    db.batch_execute(
        "UPDATE warden.retention_state SET minute_watermark = NULL, hour_watermark = NULL, score_watermark = NULL",
    )
    .await
    .unwrap();
    let noon = oldest.and_hms_opt(12, 0, 0).unwrap().and_utc();
    db.execute(
        "INSERT INTO warden.health_history (agent_id, evaluated_at, score, tier, liveness) \
         VALUES ('b', $1, 90, 'excellent', 'online')",
        &[&noon],
    )
    .await
    .unwrap();
    // The score pass that closes the hours after it.
    db.execute("UPDATE warden.evaluator_state SET last_score_at = now()", &[]).await.unwrap();
    let mut settings = default_settings().retention;
    settings.minute_rollups = warden::config::Duration::from_secs(30 * 86_400);
    let report = warden::retention::cycle(&mut test_db.pooled().await, &settings, Utc::now()).await.unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let rolled: (i64, i64) = db
        .query_one(
            "SELECT (SELECT coalesce(sum(heartbeats), 0)::bigint FROM warden.heartbeat_rollups \
                     WHERE agent_id = 'b' AND bucket = 'hour'), \
                    (SELECT count(*) FROM warden.score_rollups WHERE agent_id = 'b' AND hour_start = $1)",
            &[&noon],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(rolled, (9, 1), "every heartbeat and the old score, rolled up");
    let name = format!("agent_heartbeats_p{}", oldest.format("%Y%m%d"));
    assert!(report.dropped_partitions.contains(&name), "{name} went once rolled up: {:?}", report.dropped_partitions);
}

#[tokio::test]
async fn a_failing_rollup_keeps_its_raw_rows_and_stops_nothing_else() {
    let test_db = TestDb::migrated().await;
    let db = test_db.client().await;
    let oldest = backlog(&db, 9).await;
    // The first day's minute can no longer be added to: every rollup step
    // fails until it is fixed.
    let noon = oldest.and_hms_opt(12, 0, 0).unwrap().and_utc();
    db.execute(
        "INSERT INTO warden.heartbeat_rollups (agent_id, bucket, bucket_start, heartbeats, restarts, unhealthy) \
         VALUES ('b', 'minute', $1, 9223372036854775807, 0, 0)",
        &[&noon],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message) \
         VALUES (now() - interval '100 days', 'b', 'job_failed', 'info', 'old')",
        &[],
    )
    .await
    .unwrap();
    // On a session of its own, to look at it afterwards.
    let mut client = test_db.pooled().await;
    let report = warden::retention::cycle(&mut client, &default_settings().retention, Utc::now()).await.unwrap();
    assert_eq!(failed_steps(&report), ["rollups"], "{:?}", report.failed);
    assert_eq!(report.pruned.get("events"), Some(&1), "pruning went on");
    // Past their seven days, but not rolled up: they stay. (The day
    // before, empty and behind the watermark, may go.)
    for d in [oldest, oldest + Span::days(1)] {
        let name = format!("agent_heartbeats_p{}", d.format("%Y%m%d"));
        assert!(!report.dropped_partitions.contains(&name), "{name} in {:?}", report.dropped_partitions);
    }
    let raw: i64 = db.query_one("SELECT count(*) FROM warden.agent_heartbeats", &[]).await.unwrap().get(0);
    assert_eq!(raw, 9);
    // Whatever failed did not leave the pooled session with a lock timeout.
    let timeout: String = client.query_one("SHOW lock_timeout", &[]).await.unwrap().get(0);
    assert_eq!(timeout, "0");
}

#[tokio::test]
async fn a_partition_left_detached_by_a_dead_cycle_is_dropped_later() {
    let test_db = TestDb::migrated().await;
    let db = test_db.client().await;
    let today = Utc::now().date_naive();
    let day = today - Span::days(20);
    db.execute("SELECT warden.ensure_partitions($1, $1)", &[&day]).await.unwrap();
    let name = format!("agent_heartbeats_p{}", day.format("%Y%m%d"));
    // As a cycle leaves it: marked, detached, not dropped.
    db.batch_execute(&format!(
        "COMMENT ON TABLE warden.{name} IS 'warden retention: detached for dropping'; \
         ALTER TABLE warden.agent_heartbeats DETACH PARTITION warden.{name}"
    ))
    .await
    .unwrap();
    // And a table of an old day an operator restored to look at.
    let restored = format!("agent_heartbeats_p{}", (day - Span::days(1)).format("%Y%m%d"));
    db.batch_execute(&format!("CREATE TABLE warden.{restored} (LIKE warden.agent_heartbeats)")).await.unwrap();
    let report = cycle(&test_db, Utc::now()).await;
    assert!(report.dropped_partitions.contains(&name), "{:?}", report.dropped_partitions);
    let exists = |table: String| {
        let db = &db;
        async move {
            db.query_one("SELECT to_regclass('warden.' || $1) IS NOT NULL", &[&table]).await.unwrap().get::<_, bool>(0)
        }
    };
    assert!(!exists(name).await);
    assert!(exists(restored).await, "not ours: left alone");
}

#[tokio::test]
async fn partitions_made_from_a_session_in_another_zone_still_span_utc_days() {
    let test_db = TestDb::migrated().await;
    let db = test_db.client().await;
    let day = Utc::now().date_naive() + Span::days(40);
    db.batch_execute("SET TimeZone = 'Asia/Kolkata'; SET DateStyle = 'SQL, DMY'").await.unwrap();
    db.execute("SELECT warden.ensure_partitions($1, $1)", &[&day]).await.unwrap();
    db.batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO'").await.unwrap();
    let name = format!("agent_heartbeats_p{}", day.format("%Y%m%d"));
    let bounds: String = db
        .query_one("SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = $1", &[&name])
        .await
        .unwrap()
        .get(0);
    let (from, to) = (day.format("%Y-%m-%d"), day.succ_opt().unwrap().format("%Y-%m-%d"));
    assert_eq!(bounds, format!("FOR VALUES FROM ('{from} 00:00:00+00') TO ('{to} 00:00:00+00')"));
}

#[tokio::test]
async fn a_detach_that_never_began_leaves_no_mark() {
    let test_db = TestDb::migrated().await;
    let db = test_db.client().await;
    let day = Utc::now().date_naive() - Span::days(20);
    db.execute("SELECT warden.ensure_partitions($1, $1)", &[&day]).await.unwrap();
    let name = format!("agent_heartbeats_p{}", day.format("%Y%m%d"));
    // A lock on the parent alone (the mark on the partition goes through),
    // which the detach's first phase waits for past its lock timeout.
    let holder = test_db.client().await;
    holder
        .batch_execute("BEGIN; LOCK TABLE ONLY warden.agent_heartbeats IN SHARE UPDATE EXCLUSIVE MODE")
        .await
        .unwrap();
    let report = cycle(&test_db, Utc::now()).await;
    assert!(failed_steps(&report).contains(&"agent_heartbeats"), "{:?}", failed_steps(&report));
    holder.batch_execute("ROLLBACK").await.unwrap();
    let comment: Option<String> =
        db.query_one("SELECT obj_description(('warden.' || $1)::regclass, 'pg_class')", &[&name]).await.unwrap().get(0);
    assert_eq!(comment, None, "still attached, so not marked as being dropped");
    let report = cycle(&test_db, Utc::now()).await;
    assert!(report.dropped_partitions.contains(&name), "{:?}", report.dropped_partitions);
}

#[tokio::test]
async fn a_detach_left_pending_is_finished_and_the_days_after_it_go_too() {
    let test_db = TestDb::migrated().await;
    let db = test_db.client().await;
    let today = Utc::now().date_naive();
    let (first, second) = (today - Span::days(21), today - Span::days(20));
    db.execute("SELECT warden.ensure_partitions($1, $2)", &[&first, &second]).await.unwrap();
    let name = format!("agent_heartbeats_p{}", first.format("%Y%m%d"));
    let next = format!("agent_heartbeats_p{}", second.format("%Y%m%d"));
    // A detach whose second phase was cut short by a timeout while a
    // reader held the table: attached, pending, and refusing a new detach.
    let reader = test_db.client().await;
    reader
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM warden.agent_heartbeats")
        .await
        .unwrap();
    // The first phase takes no time; the second waits for the reader for
    // as long as it stays.
    db.batch_execute("SET statement_timeout = '2s'").await.unwrap();
    let cut = db
        .batch_execute(&format!("ALTER TABLE warden.agent_heartbeats DETACH PARTITION warden.{name} CONCURRENTLY"))
        .await
        .unwrap_err();
    assert_eq!(cut.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{cut}");
    db.batch_execute("RESET statement_timeout").await.unwrap();
    reader.batch_execute("COMMIT").await.unwrap();
    let pending: bool = db
        .query_one("SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = ('warden.' || $1)::regclass", &[&name])
        .await
        .unwrap()
        .get(0);
    assert!(pending);

    let report = cycle(&test_db, Utc::now()).await;
    assert!(report.failed.is_empty(), "{:?}", failed_steps(&report));
    assert!(report.dropped_partitions.contains(&name), "{:?}", report.dropped_partitions);
    assert!(report.dropped_partitions.contains(&next), "{:?}", report.dropped_partitions);
}

#[tokio::test]
async fn pruning_an_old_alert_keeps_the_grouped_message_of_one_still_firing() {
    let test_db = TestDb::migrated().await;
    let db = test_db.client().await;
    db.batch_execute(
        "INSERT INTO warden.incidents (id, agent_id, issue_type, severity, state, opened_at, resolved_at) OVERRIDING SYSTEM VALUE \
           VALUES (1, 'a', 'agent_unresponsive', 'critical', 'resolved', now() - interval '500 days', now() - interval '499 days'), \
                  (2, 'b', 'agent_unresponsive', 'critical', 'open', now() - interval '500 days', NULL); \
         INSERT INTO warden.alerts (id, incident_id, dedup_key, severity, state, opened_at, resolved_at) OVERRIDING SYSTEM VALUE \
           VALUES (10, 1, 'a:agent_unresponsive', 'critical', 'resolved', now() - interval '500 days', now() - interval '499 days'), \
                  (11, 2, 'b:agent_unresponsive', 'critical', 'firing', now() - interval '500 days', NULL); \
         INSERT INTO warden.alert_deliveries (id, alert_id, alert_ids, channel, kind, level, state, sent_at) OVERRIDING SYSTEM VALUE \
           VALUES (100, 10, '{10,9,11}', 'ops', 'firing', 1, 'sent', now() - interval '500 days'), \
                  (101, 10, '{10}', 'ops', 'resolved', 0, 'sent', now() - interval '499 days'); \
         INSERT INTO warden.alert_notifications (alert_id, channel, kind, level, sequence, delivery_id) \
           VALUES (10, 'ops', 'firing', 1, 0, 100), (11, 'ops', 'firing', 1, 0, 100), (10, 'ops', 'resolved', 0, 0, 101);",
    )
    .await
    .unwrap();
    let report = cycle(&test_db, Utc::now()).await;
    assert_eq!(report.pruned.get("incidents"), Some(&1), "{report:?}");
    let left: Vec<(i64, i64, Vec<i64>)> = db
        .query("SELECT id, alert_id, alert_ids FROM warden.alert_deliveries ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(left, vec![(100, 11, vec![11])], "the message that also covered b stays, as b's");
    let ledger: Vec<(i64, i64)> = db
        .query("SELECT alert_id, delivery_id FROM warden.alert_notifications ORDER BY alert_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(ledger, vec![(11, 100)], "b's ledger is whole");
}

#[tokio::test]
async fn scores_of_a_pass_still_writing_are_not_left_behind_the_watermark() {
    // A score pass stamps its snapshots with its start and writes them in
    // short transactions afterwards; the hour it started in closes only
    // once a later pass has begun.
    let test_db = TestDb::migrated().await;
    let db = test_db.client().await;
    let top = Utc::now().timestamp();
    let hour = chrono::DateTime::from_timestamp(top - top % 3600 - 3 * 3600, 0).unwrap();
    let pass = hour + Span::minutes(59);
    db.execute(
        "UPDATE warden.retention_state SET minute_watermark = $1, hour_watermark = $1, score_watermark = $1",
        &[&hour],
    )
    .await
    .unwrap();
    db.execute("UPDATE warden.evaluator_state SET last_score_at = $1", &[&pass]).await.unwrap();
    let now = hour + Span::hours(2);
    cycle(&test_db, now).await;
    // The pass's snapshot commits only now.
    db.execute(
        "INSERT INTO warden.health_history (agent_id, evaluated_at, score, tier, liveness) \
         VALUES ('late', $1, 42, 'poor', 'online')",
        &[&pass],
    )
    .await
    .unwrap();
    db.execute("UPDATE warden.evaluator_state SET last_score_at = $1", &[&(pass + Span::minutes(1))]).await.unwrap();
    cycle(&test_db, now).await;
    let samples: i64 = db
        .query_one(
            "SELECT coalesce(sum(samples), 0)::bigint FROM warden.score_rollups WHERE agent_id = 'late' AND hour_start = $1",
            &[&hour],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(samples, 1);
}

#[tokio::test]
async fn minute_rollups_past_their_days_wait_to_be_rolled_into_hours() {
    let test_db = TestDb::migrated().await;
    let db = test_db.client().await;
    // Hours rolled up to 40 days back, and stuck there: the next hour can
    // no longer be added to.
    db.batch_execute(
        "UPDATE warden.retention_state SET minute_watermark = date_trunc('hour', now() - interval '40 days'), \
           hour_watermark = date_trunc('hour', now() - interval '40 days'), \
           score_watermark = date_trunc('hour', now() - interval '40 days'); \
         INSERT INTO warden.heartbeat_rollups (agent_id, bucket, bucket_start, heartbeats, restarts, unhealthy) VALUES \
           ('a', 'minute', date_trunc('minute', now() - interval '45 days'), 1, 0, 0), \
           ('a', 'minute', date_trunc('hour', now() - interval '40 days') + interval '5 minutes', 1, 0, 0), \
           ('a', 'hour', date_trunc('hour', now() - interval '40 days'), 9223372036854775807, 0, 0);",
    )
    .await
    .unwrap();
    let report = cycle(&test_db, Utc::now()).await;
    assert_eq!(failed_steps(&report), ["rollups"], "{:?}", report.failed);
    assert_eq!(report.pruned.get("minute_rollups"), Some(&1), "only the one already in an hour");
    let left: i64 = db
        .query_one("SELECT count(*) FROM warden.heartbeat_rollups WHERE bucket = 'minute'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 1);
}

#[tokio::test]
async fn minute_rollups_go_a_day_after_their_hour_is_rolled_up() {
    let test_db = TestDb::migrated().await;
    let db = test_db.client().await;
    db.batch_execute(
        "UPDATE warden.retention_state SET minute_watermark = date_trunc('hour', now()), \
           hour_watermark = date_trunc('hour', now()), score_watermark = date_trunc('hour', now()); \
         INSERT INTO warden.heartbeat_rollups (agent_id, bucket, bucket_start, heartbeats, restarts, unhealthy) VALUES \
           ('a', 'minute', date_trunc('minute', now() - interval '2 days'), 1, 0, 0), \
           ('a', 'minute', date_trunc('minute', now() - interval '3 hours'), 1, 0, 0), \
           ('a', 'hour', date_trunc('hour', now() - interval '2 days'), 1, 0, 0);",
    )
    .await
    .unwrap();
    let report = cycle(&test_db, Utc::now()).await;
    assert_eq!(report.pruned.get("minute_rollups"), Some(&1), "{report:?}");
    let kept: Vec<(String, i64)> = db
        .query("SELECT bucket, count(*) FROM warden.heartbeat_rollups GROUP BY 1 ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(kept, [("hour".to_string(), 1), ("minute".to_string(), 1)], "the hour stays, as does today's minute");
}

/// The status page's bars and uptime, as (group, uptime, [(date, pct)]).
type Bars = Vec<(String, Option<f64>, Vec<(chrono::NaiveDate, Option<f64>)>)>;

async fn status_bars(client: &mut tokio_postgres::Client) -> Bars {
    let mut settings = default_settings().console;
    settings.status_group_label = "team".into();
    let snapshot = warden::console::status::compute(client, &settings).await.unwrap();
    snapshot
        .groups
        .into_iter()
        .map(|g| (g.name, g.uptime, g.days.into_iter().map(|d| (d.date, d.pct)).collect()))
        .collect()
}

/// The bars with the written days, then computed from the transitions
/// alone (the watermark put aside): the same, but for the moment between
/// the two computations.
async fn written_days_agree_with_the_transitions(client: &mut tokio_postgres::Client) {
    let written = status_bars(client).await;
    let mark: Option<chrono::NaiveDate> =
        client.query_one("SELECT liveness_day_watermark FROM warden.retention_state", &[]).await.unwrap().get(0);
    client.execute("UPDATE warden.retention_state SET liveness_day_watermark = NULL", &[]).await.unwrap();
    let computed = status_bars(client).await;
    client.execute("UPDATE warden.retention_state SET liveness_day_watermark = $1", &[&mark]).await.unwrap();
    let close = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() < 1e-6,
        (a, b) => a == b,
    };
    assert_eq!(written.len(), computed.len());
    for ((group, uptime, days), (group_b, uptime_b, days_b)) in written.iter().zip(&computed) {
        assert_eq!(group, group_b);
        assert!(close(*uptime, *uptime_b), "{group}: {uptime:?} against {uptime_b:?}");
        assert_eq!(days.len(), days_b.len());
        for ((date, pct), (date_b, pct_b)) in days.iter().zip(days_b) {
            assert!(date == date_b && close(*pct, *pct_b), "{group} on {date}: {pct:?} against {pct_b:?}");
        }
    }
}

#[tokio::test]
async fn closed_days_are_written_once_final_and_the_status_page_reads_them_unchanged() {
    let test_db = TestDb::migrated().await;
    let mut db = test_db.client().await;
    // Six days of history in two groups, times in hours from today's UTC
    // midnight: outages within a day and across midnight, a stretch with
    // no evaluation, and all three agents online throughout today.
    db.batch_execute(
        "CREATE FUNCTION pg_temp.t(hours float8) RETURNS timestamptz LANGUAGE sql STABLE \
           AS $$ SELECT date_trunc('day', now(), 'UTC') + hours * interval '1 hour' $$; \
         INSERT INTO warden.agent_status (agent_id, labels, expected_interval_ms, first_seen, last_seen, liveness) VALUES \
           ('a', '{\"team\": \"x\"}', 30000, pg_temp.t(-141), now(), 'online'), \
           ('b', '{\"team\": \"x\"}', 30000, pg_temp.t(-120), now(), 'online'), \
           ('c', '{\"team\": \"y\"}', 30000, pg_temp.t(-140), now(), 'online'); \
         INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details) \
         SELECT pg_temp.t(h), agent, 'status_changed', 'info', 'moved', jsonb_build_object('old', old, 'new', new) \
         FROM (VALUES (-140.9, 'a', 'unknown', 'online'), (-91.0, 'a', 'online', 'offline'), \
                      (-89.0, 'a', 'offline', 'online'), (-47.0, 'a', 'online', 'degraded'), \
                      (-46.0, 'a', 'degraded', 'online'), (-119.5, 'b', 'unknown', 'online'), \
                      (-30.0, 'b', 'online', 'offline'), (-20.0, 'b', 'offline', 'online'), \
                      (-139.0, 'c', 'unknown', 'online'), (-73.0, 'c', 'online', 'offline'), \
                      (-71.0, 'c', 'offline', 'online')) AS v(h, agent, old, new); \
         INSERT INTO warden.system_events (occurred_at, event_type, severity, message, details) \
         VALUES (pg_temp.t(-59), 'evaluation_paused', 'warning', 'no evaluation', \
                 jsonb_build_object('from', pg_temp.t(-61))); \
         UPDATE warden.evaluator_state SET last_cycle_at = now();",
    )
    .await
    .unwrap();
    let before = status_bars(&mut db).await;
    let report = cycle(&test_db, Utc::now()).await;
    assert!(failed_steps(&report).is_empty(), "{report:?}");
    // Final: a day that ended more than a day and an hour before the last
    // cycle (these agents' outages are recorded within two minutes).
    let now: chrono::DateTime<Utc> = db.query_one("SELECT now()", &[]).await.unwrap().get(0);
    let final_until = (now - Span::hours(25)).date_naive();
    let (mark, days, agents): (Option<chrono::NaiveDate>, i64, i64) = {
        let r = db
            .query_one(
                "SELECT (SELECT liveness_day_watermark FROM warden.retention_state), count(DISTINCT day), \
                   count(DISTINCT agent_id) FROM warden.liveness_days",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!(mark, Some(final_until), "every final day, and no more");
    assert_eq!(report.liveness_days as i64, days);
    assert_eq!(days, (final_until - (now.date_naive() - chrono::Days::new(6))).num_days());
    assert_eq!(agents, 3);
    let c_on_its_outage_day: f64 = db
        .query_one(
            "SELECT offline_seconds FROM warden.liveness_days \
             WHERE agent_id = 'c' AND day = (date_trunc('day', now(), 'UTC') - interval '4 days')::date",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(c_on_its_outage_day, 3600.0, "its outage from 23:00 to 01:00, the day's half");
    let after = status_bars(&mut db).await;
    assert_eq!(before.len(), after.len());
    written_days_agree_with_the_transitions(&mut db).await;
    // A second cycle writes nothing more.
    assert_eq!(cycle(&test_db, Utc::now()).await.liveness_days, 0);

    // a removed and registered again: its earlier life's days are not its
    // own. Registered yesterday evening, whatever the time now: its new
    // life starts after the days written (a day is written final a day and
    // an hour after it ends, so a new life never starts in one; `now() - 30
    // hours` did before 06:00 UTC).
    db.execute(
        "UPDATE warden.agent_status SET first_seen = date_trunc('day', now(), 'UTC') - interval '6 hours' \
         WHERE agent_id = 'a'",
        &[],
    )
    .await
    .unwrap();
    written_days_agree_with_the_transitions(&mut db).await;

    // An agent heartbeating once a day could still have an outage of the
    // last few days recorded: those days are written later.
    db.batch_execute(
        "UPDATE warden.retention_state SET liveness_day_watermark = NULL; DELETE FROM warden.liveness_days; \
         INSERT INTO warden.agent_status (agent_id, labels, expected_interval_ms, first_seen, last_seen, liveness) \
           VALUES ('daily', '{\"team\": \"y\"}', 86400000, now() - interval '6 days', now(), 'online');",
    )
    .await
    .unwrap();
    cycle(&test_db, Utc::now()).await;
    let mark: chrono::NaiveDate =
        db.query_one("SELECT liveness_day_watermark FROM warden.retention_state", &[]).await.unwrap().get(0);
    // 3 missed + 0.2 jitter + 1 intervals of a day, and an hour.
    assert_eq!(mark, (now - Span::hours(1) - Span::minutes(4 * 24 * 60 + 288)).date_naive());
    written_days_agree_with_the_transitions(&mut db).await;

    // Gone with the transitions they were written from.
    let mut settings = default_settings().retention;
    settings.transitions = warden::config::Duration::from_secs(3 * 86400);
    let report = warden::retention::cycle(&mut test_db.pooled().await, &settings, Utc::now()).await.unwrap();
    assert!(report.pruned.get("liveness_days").is_some_and(|n| *n > 0), "{report:?}");
    let older: i64 = db
        .query_one(
            "SELECT count(*) FROM warden.liveness_days WHERE day < (now() AT TIME ZONE 'UTC' - interval '3 days')::date",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(older, 0);
}

/// A cycle summarizes the BRIN ranges filled since the last one (where
/// autovacuum is off, as here, nothing else would): a time-bounded read of
/// today's scores then reads the last hour's blocks, not the whole day's.
#[tokio::test]
async fn a_cycle_summarizes_the_time_indexes_so_recent_reads_stay_narrow() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    c.execute(
        "INSERT INTO warden.health_history (agent_id, evaluated_at, score, liveness) \
         SELECT 'a' || a, t, 50, 'online' \
         FROM (SELECT date_trunc('day', now()) + (now() - date_trunc('day', now())) * (i / 20000.0) AS t \
               FROM generate_series(1, 20000) i) times, generate_series(1, 10) a \
         ORDER BY t",
        &[],
    )
    .await
    .unwrap();
    let report = cycle(&db, Utc::now()).await;
    assert_eq!(failed_steps(&report), Vec::<&str>::new());
    assert!(report.summarized_ranges > 0, "{report:?}");
    let again: i64 = c
        .query_one(
            "SELECT coalesce(sum(brin_summarize_new_values(c.oid)), 0)::bigint FROM pg_class c \
             JOIN pg_am am ON am.oid = c.relam JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'warden' AND c.relkind = 'i' AND am.amname = 'brin'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(again, 0, "nothing left to summarize");
}
