//! Reports (sql/), dashboards (dashboards/) and `warden report`, against a
//! small history whose figures are worked out by hand.
//!
//! The history is `reports_seed.sql`: rows inserted with explicit times, in
//! minutes from t0, and the reports run over [t0, t0 + 60m). One test drives
//! the evaluator instead, to hold the reports to what warden really writes.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use serde_json::Value as Json;
use tokio_postgres::types::Type;
use warden::config::ReportingSettings;
use warden::health::evaluator::{self, EvalParams};
use warden::report::{self, Bindings, REPORTS, ResultSet, Value};

use crate::helpers::{TestDb, default_settings};
use crate::procs::warden;

const SEED: &str = include_str!("reports_seed.sql");

/// Two whole hours before the current hour: the range and the previous
/// period both lie in the past, on partitions the template has (from
/// yesterday on), and buckets of up to an hour line up with t0.
fn t0() -> DateTime<Utc> {
    let now = Utc::now().timestamp();
    DateTime::from_timestamp(now - now.rem_euclid(3600), 0).unwrap() - Duration::hours(2)
}

fn minutes(t0: DateTime<Utc>, m: i64) -> DateTime<Utc> {
    t0 + Duration::minutes(m)
}

async fn seeded() -> (TestDb, tokio_postgres::Client, DateTime<Utc>) {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let t0 = t0();
    client.execute("SELECT set_config('warden_test.t0', $1, false)", &[&t0.to_rfc3339()]).await.unwrap();
    client.batch_execute(SEED).await.expect("seed the reporting history");
    (db, client, t0)
}

fn settings() -> ReportingSettings {
    ReportingSettings {
        availability_target: 99.5,
        downtime_cost_per_minute: 10.0,
        label_costs: [("role".to_string(), [("db".to_string(), 100.0)].into())].into(),
        trend_bucket: warden::config::Duration::from_secs(1800),
        top_n: 20,
    }
}

/// Bindings over the range [t0, t0 + 60m).
fn range(t0: DateTime<Utc>) -> Bindings {
    Bindings::new(&settings(), t0, minutes(t0, 60))
}

async fn run(client: &tokio_postgres::Client, name: &str, bindings: &Bindings) -> ResultSet {
    let report = report::find(name).unwrap_or_else(|| panic!("no report {name}"));
    report::execute(client, report, bindings).await.unwrap_or_else(|e| panic!("{e}"))
}

/// Cell helpers: the rows as maps, and typed reads that fail loudly.
fn rows(result: &ResultSet) -> Vec<BTreeMap<&str, &Value>> {
    result.rows.iter().map(|r| result.columns.iter().map(String::as_str).zip(r).collect()).collect()
}

fn row<'a>(result: &'a ResultSet, column: &str, key: &str) -> BTreeMap<&'a str, &'a Value> {
    rows(result)
        .into_iter()
        .find(|r| matches!(r.get(column), Some(Value::Text(t)) if t == key))
        .unwrap_or_else(|| panic!("no row with {column} = {key} in {result:?}"))
}

fn float(v: &Value) -> f64 {
    match v {
        Value::Float(f) => *f,
        Value::Int(n) => *n as f64,
        other => panic!("expected a number, got {other:?}"),
    }
}

fn text(v: &Value) -> &str {
    match v {
        Value::Text(t) => t,
        other => panic!("expected text, got {other:?}"),
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(n) => *n,
        other => panic!("expected an integer, got {other:?}"),
    }
}

#[track_caller]
fn close(actual: &Value, expected: f64) {
    let actual = float(actual);
    assert!((actual - expected).abs() < 1e-6, "expected {expected}, got {actual}");
}

/// The header's type names, as PostgreSQL names the types.
fn pg_type_name(documented: &str) -> &str {
    match documented {
        "bigint" => "int8",
        "integer" => "int4",
        "double" | "float8" => "float8",
        other => other,
    }
}

#[tokio::test]
async fn every_report_runs_and_returns_the_columns_its_header_documents() {
    let (_db, client, t0) = seeded().await;
    let bindings = range(t0);
    for r in REPORTS {
        let header = r.header().unwrap();
        let statement = client.prepare(r.sql).await.unwrap_or_else(|e| panic!("{}: {e}", r.name));
        let actual: Vec<(String, String)> =
            statement.columns().iter().map(|c| (c.name().to_string(), c.type_().name().to_string())).collect();
        let documented: Vec<(String, String)> =
            header.columns.iter().map(|(n, t)| (n.clone(), pg_type_name(t).to_string())).collect();
        assert_eq!(actual, documented, "{}: columns and types against its header", r.name);
        let params: Vec<&str> = statement.params().iter().map(Type::name).collect();
        let bound: Vec<&str> = r.params.iter().map(|p| pg_type_name(p.sql_type())).collect();
        assert_eq!(params, bound, "{}: parameter types", r.name);
        let result = report::execute(&client, r, &bindings).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(!result.rows.is_empty(), "{} returned nothing over the seeded history", r.name);
    }
}

#[tokio::test]
async fn availability_comes_from_the_transitions_and_matches_the_hand_computed_figures() {
    let (_db, client, t0) = seeded().await;
    let result = run(&client, "agent_availability", &range(t0)).await;
    // a1: online 0-40, degraded 40-45, offline 45-60 of a 60-minute range.
    let a1 = row(&result, "agent_id", "a1");
    close(a1["availability_pct"], 75.0);
    close(a1["online_pct"], 40.0 / 60.0 * 100.0);
    close(a1["online_seconds"], 2400.0);
    close(a1["degraded_seconds"], 300.0);
    close(a1["offline_seconds"], 900.0);
    assert_eq!(int(a1["outages"]), 1);
    // a2 was online since before the range: its earlier liveness carries in.
    close(row(&result, "agent_id", "a2")["availability_pct"], 100.0);
    // a3 registered at 30 and was unknown until 31: that minute is left out.
    let a3 = row(&result, "agent_id", "a3");
    close(a3["observed_seconds"], 29.0 * 60.0);
    close(a3["unknown_seconds"], 60.0);
    close(a3["availability_pct"], 100.0);
    // a4 was never evaluated: no availability at all rather than 0 or 100.
    assert_eq!(row(&result, "agent_id", "a4")["availability_pct"], &Value::Null);
    assert_eq!(result.rows[0][0], Value::Text("a1".into()), "worst first");

    // The previous hour, for one agent: online 10, offline 5, online 5,
    // and ten minutes before its first evaluation that do not count.
    let mut previous = Bindings::new(&settings(), minutes(t0, -60), t0);
    previous.agent = Some("a1".into());
    let result = run(&client, "agent_availability", &previous).await;
    assert_eq!(result.rows.len(), 1);
    let a1 = row(&result, "agent_id", "a1");
    close(a1["availability_pct"], 75.0);
    close(a1["observed_seconds"], 20.0 * 60.0);

    let breaches = run(&client, "slo_breaches", &range(t0)).await;
    assert_eq!(breaches.rows.len(), 1, "only a1 is below 99.5%: {breaches:?}");
    let a1 = row(&breaches, "agent_id", "a1");
    close(a1["shortfall_pct"], 24.5);
    close(a1["budget_seconds"], 18.0);
    close(a1["over_budget_seconds"], 882.0);
    close(a1["longest_outage_seconds"], 900.0);
    assert_eq!(int(a1["incidents"]), 3);
    let mut lenient = range(t0);
    lenient.target_pct = 75.0;
    assert!(run(&client, "slo_breaches", &lenient).await.rows.is_empty(), "75% meets a 75% target");
}

#[tokio::test]
async fn mttd_and_mttr_match_the_hand_computed_figures() {
    let (_db, client, t0) = seeded().await;
    let result = run(&client, "mttd_mttr", &range(t0)).await;
    // Unresponsive: last heartbeat at 39, opened at 45, resolved at 61.
    let unresponsive = row(&result, "issue_type", "agent_unresponsive");
    close(unresponsive["mttd_seconds"], 360.0);
    close(unresponsive["mttr_seconds"], 960.0);
    assert_eq!(int(unresponsive["auto_resolved"]), 1);
    // Time to detect is about silence: an error rate has none (its last
    // heartbeat carried the bad figure).
    assert_eq!(row(&result, "issue_type", "high_error_rate")["mttd_seconds"], &Value::Null);
    close(row(&result, "issue_type", "heartbeat_late")["mttd_seconds"], 60.0);
    let looping = row(&result, "issue_type", "restart_loop");
    assert_eq!(int(looping["still_open"]), 1);
    assert_eq!(looping["mttr_seconds"], &Value::Null);
    let predicted = row(&result, "issue_type", "resource_exhaustion");
    assert_eq!(int(predicted["predicted"]), 1);
    assert_eq!(predicted["mttd_seconds"], &Value::Null);
    assert_eq!(predicted["mttr_seconds"], &Value::Null, "predictions are not recoveries");
    // All: detect 360, 60 (the silences); recover 960, 780, 300, 900.
    let all = row(&result, "issue_type", "all");
    assert_eq!(result.rows.last().unwrap()[0], Value::Text("all".into()));
    assert_eq!(int(all["incidents"]), 6);
    close(all["mttd_seconds"], 210.0);
    close(all["mttr_seconds"], 735.0);
    close(all["max_mttr_seconds"], 960.0);
}

#[tokio::test]
async fn fleet_recovery_and_alert_reports_count_what_was_seeded() {
    let (_db, client, t0) = seeded().await;
    let b = range(t0);
    let fleet = rows(&run(&client, "fleet_summary", &b).await)
        .into_iter()
        .map(|r| {
            let key = match (r["dimension"], r["value"]) {
                (Value::Text(d), Value::Text(v)) => format!("{d}.{v}"),
                other => panic!("{other:?}"),
            };
            (key, (int(r["agents"]), int(r["registered_in_range"])))
        })
        .collect::<BTreeMap<_, _>>();
    assert_eq!(fleet["fleet.all"], (4, 2));
    assert_eq!(fleet["liveness.online"], (3, 1));
    assert_eq!(fleet["liveness.unknown"], (1, 1));
    assert_eq!(fleet["liveness.offline"], (0, 0), "every value is listed, zero or not");
    assert_eq!(fleet["tier.excellent"].0, 1);
    assert_eq!(fleet["tier.unscored"].0, 1);
    assert_eq!(fleet["mode.unset"].0, 1);

    let recovery = run(&client, "recovery_success", &b).await;
    let command = row(&recovery, "action", "command");
    assert_eq!((int(command["attempts"]), int(command["succeeded"]), int(command["failed"])), (2, 1, 1));
    close(command["success_rate_pct"], 50.0);
    close(command["mean_duration_seconds"], 45.0);
    let http = row(&recovery, "action", "http");
    assert_eq!((int(http["timed_out"]), int(http["in_progress"])), (1, 2));
    close(http["success_rate_pct"], 0.0);
    close(http["mean_duration_seconds"], 60.0);
    close(http["p90_duration_seconds"], 60.0);

    let alerts = run(&client, "alert_volume", &b).await;
    let by_key: BTreeMap<String, BTreeMap<&str, &Value>> =
        rows(&alerts).into_iter().map(|r| (format!("{}/{}", text(r["severity"]), text(r["channel"])), r)).collect();
    let slack = &by_key["critical/ops_slack"];
    assert_eq!((int(slack["alerts"]), int(slack["deliveries"]), int(slack["pending"])), (2, 3, 1));
    // escalation_level counts the levels notified: 1 is the first page.
    assert_eq!(int(slack["escalated"]), 1, "only the alert that reached its second level");
    close(slack["mean_ack_seconds"], 360.0);
    assert_eq!(int(by_key["critical/oncall_email"]["dead"]), 1);
    assert_eq!(int(by_key["warning/ops_slack"]["acknowledged"]), 0);
    assert_eq!(by_key["warning/ops_slack"]["mean_ack_seconds"], &Value::Null);
    assert_eq!(by_key.len(), 3);
}

#[tokio::test]
async fn noisy_agents_trends_and_gaps_rank_and_bucket_as_expected() {
    let (_db, client, t0) = seeded().await;
    let mut b = range(t0);

    let flapping = run(&client, "flapping_agents", &b).await;
    assert_eq!(flapping.rows.len(), 2);
    let first = &rows(&flapping)[0];
    assert_eq!(first["agent_id"], &Value::Text("a1".into()));
    assert_eq!((int(first["transitions"]), int(first["to_offline"]), int(first["flapping_incidents"])), (2, 1, 1));
    close(first["flapping_seconds"], 780.0);

    let restarts = run(&client, "restart_loops", &b).await;
    let first = &rows(&restarts)[0];
    assert_eq!(first["agent_id"], &Value::Text("a2".into()));
    assert_eq!((int(first["restarts"]), int(first["restart_loop_incidents"])), (3, 1));
    assert_eq!(first["loop_open_now"], &Value::Bool(true));
    close(first["mean_uptime_before_seconds"], 310.0);

    let gaps = run(&client, "heartbeat_gaps", &b).await;
    let a1 = &rows(&gaps)[0];
    assert_eq!(a1["agent_id"], &Value::Text("a1".into()), "the longest silence first");
    assert_eq!(int(a1["heartbeats"]), 42);
    close(a1["longest_gap_seconds"], 19.0 * 60.0);
    assert_eq!(a1["longest_gap_from"], &Value::Time(minutes(t0, 39)));
    assert_eq!(a1["longest_gap_to"], &Value::Time(minutes(t0, 58)));
    assert_eq!(int(a1["late_gaps"]), 1, "only the 19-minute gap is past 60s + 20%");
    close(a1["trailing_silence_seconds"], 60.0);

    let trend = run(&client, "score_trend", &b).await;
    let a1: Vec<_> = rows(&trend).into_iter().filter(|r| r["agent_id"] == &Value::Text("a1".into())).collect();
    assert_eq!(a1.len(), 2, "two 30-minute buckets");
    assert_eq!(a1[0]["bucket"], &Value::Time(t0));
    close(a1[0]["mean_score"], 85.0);
    close(a1[1]["mean_score"], 50.0);
    close(a1[1]["last_score"], 30.0);
    assert_eq!(a1[1]["last_tier"], &Value::Text("critical".into()));
    close(a1[1]["change"], -50.0);

    b.limit = 1;
    assert_eq!(run(&client, "flapping_agents", &b).await.rows.len(), 1, "reporting.top_n limits the rows");
    b.agent = Some("a3".into());
    let gaps = run(&client, "heartbeat_gaps", &b).await;
    assert_eq!(gaps.rows.len(), 1);
    assert_eq!(rows(&gaps)[0]["agent_id"], &Value::Text("a3".into()));
}

#[tokio::test]
async fn heartbeat_volume_reads_rolled_up_hours_then_the_raw_heartbeats_after_them() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let t0 = t0();
    let hours = |h: i64| t0 + Duration::hours(h);
    // Rolled up to t0 + 1h. Hours before that come from the rollups: one
    // 40 days back, whose raw rows are long gone, and t0's hour, whose raw
    // rows are still kept and must not count twice. Minute rollups are
    // only steps towards the hours.
    client.execute("UPDATE warden.retention_state SET hour_watermark = $1", &[&hours(1)]).await.unwrap();
    client
        .execute(
            "INSERT INTO warden.heartbeat_rollups (agent_id, bucket, bucket_start, heartbeats, restarts, unhealthy) \
             VALUES ('a', 'hour', $1, 120, 2, 10), ('a', 'hour', $2, 60, 1, 0), ('b', 'hour', $2, 30, 0, 30), \
                    ('a', 'minute', $2, 999, 999, 999)",
            &[&(t0 - Duration::days(40)), &t0],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO warden.agent_heartbeats (agent_id, received_at, status, restart_detected) \
             VALUES ('a', $1, 'healthy', false), ('a', $2, 'healthy', false), ('a', $3, 'healthy', true), \
                    ('b', $4, 'degraded', false)",
            &[&minutes(t0, 10), &minutes(t0, 70), &minutes(t0, 80), &minutes(t0, 90)],
        )
        .await
        .unwrap();

    let mut b = Bindings::new(&settings(), t0 - Duration::days(41), hours(2));
    assert_eq!(b.bucket_seconds, 1800.0, "narrower than the rollups' hours, so hours are used");
    let volume = |result: &ResultSet| -> Vec<(String, DateTime<Utc>, [i64; 3], f64)> {
        rows(result)
            .iter()
            .map(|r| {
                let Value::Time(bucket) = r["bucket"] else { panic!("bucket: {:?}", r["bucket"]) };
                let counts = [int(r["heartbeats"]), int(r["restarts"]), int(r["unhealthy"])];
                (text(r["agent_id"]).to_string(), *bucket, counts, float(r["heartbeats_per_minute"]))
            })
            .collect()
    };
    let all = volume(&run(&client, "heartbeat_volume", &b).await);
    let a_long_ago = t0 - Duration::days(40);
    assert_eq!(
        all,
        vec![
            ("a".into(), a_long_ago, [120, 2, 10], 2.0),
            ("a".into(), t0, [60, 1, 0], 1.0),
            ("a".into(), hours(1), [2, 1, 0], 2.0 / 60.0),
            ("b".into(), t0, [30, 0, 30], 0.5),
            ("b".into(), hours(1), [1, 0, 1], 1.0 / 60.0),
        ]
    );

    // Rollups stand only for whole hours of the range; the partial hours at
    // either end are counted from the raw rows, exactly where they are kept.
    b.since = a_long_ago + Duration::minutes(1);
    b.agent = Some("a".into());
    let a = volume(&run(&client, "heartbeat_volume", &b).await);
    assert_eq!(a.iter().map(|r| r.1).collect::<Vec<_>>(), [t0, hours(1)], "the long-ago hour's rows are gone");
    b.since = minutes(t0, 5);
    b.until = minutes(t0, 75);
    let a = volume(&run(&client, "heartbeat_volume", &b).await);
    assert_eq!(a.iter().map(|r| (r.1, r.2)).collect::<Vec<_>>(), [(t0, [1, 0, 0]), (hours(1), [1, 0, 0])]);
    // Per minute of each bucket inside the range: 55 and 15 minutes.
    assert!((a[0].3 - 1.0 / 55.0).abs() < 1e-9 && (a[1].3 - 1.0 / 15.0).abs() < 1e-9, "{a:?}");
    b.since = t0;
    b.until = hours(2);

    // Buckets are whole hours: 90 minutes become two hours, on even hours.
    b.agent = None;
    b.since = a_long_ago;
    b.bucket_seconds = 5400.0;
    let wide = volume(&run(&client, "heartbeat_volume", &b).await);
    assert!(wide.iter().all(|r| r.1.timestamp() % 7200 == 0), "{wide:?}");
    assert_eq!(wide.iter().map(|r| r.2[0]).sum::<i64>(), 120 + 60 + 2 + 30 + 1, "{wide:?}");
    // Per minute of each two-hour bucket that lies inside the range (the
    // range's ends fall inside buckets on odd hours).
    let inside = |start: DateTime<Utc>| {
        let end = (start + Duration::hours(2)).min(b.until).min(Utc::now());
        (end - start.max(b.since)).num_seconds() as f64 / 60.0
    };
    assert!(wide.iter().all(|r| (r.3 - r.2[0] as f64 / inside(r.1)).abs() < 1e-9), "per minute inside: {wide:?}");
    b.bucket_seconds = 3600.0;
    b.agent = Some("a".into());

    // Hours before the first rollup (the retention job's first run) were
    // never rolled up: read raw, like those after the watermark.
    client
        .execute(
            "INSERT INTO warden.agent_heartbeats (agent_id, received_at, status) VALUES ('a', $1, 'healthy')",
            &[&minutes(t0, -30)],
        )
        .await
        .unwrap();
    let before_t0 = |result: &ResultSet| volume(result).into_iter().filter(|r| r.1 == hours(-1)).count();
    assert_eq!(before_t0(&run(&client, "heartbeat_volume", &b).await), 0, "within the rolled-up hours");
    client.execute("DELETE FROM warden.heartbeat_rollups WHERE bucket_start < $1", &[&t0]).await.unwrap();
    assert_eq!(before_t0(&run(&client, "heartbeat_volume", &b).await), 1, "before the first rollup");

    // Before the retention job's first run, everything is read raw.
    client.execute("UPDATE warden.retention_state SET hour_watermark = NULL", &[]).await.unwrap();
    let raw = volume(&run(&client, "heartbeat_volume", &b).await);
    assert_eq!(
        raw.iter().map(|r| (r.1, r.2)).collect::<Vec<_>>(),
        [(hours(-1), [1, 0, 0]), (t0, [1, 0, 0]), (hours(1), [2, 1, 0])]
    );
}

/// Agent a's scores: rolled up for three hours 40 days back (4 samples of
/// mean 70, 1 of 20, and an hour without a score: no samples) and for t0's
/// hour (2 samples, mean 85), whose snapshots are still kept as well
/// (10 at t0 + 10m; then 40, 60 and a NULL score in the next hour), with
/// the score watermark at `watermark`. Returns the first rolled-up hour,
/// 6-hour aligned so that buckets of two or three hours start on it.
async fn seed_scores(client: &tokio_postgres::Client, t0: DateTime<Utc>, watermark: DateTime<Utc>) -> DateTime<Utc> {
    let back = (t0 - Duration::days(40)).timestamp();
    let long_ago = DateTime::from_timestamp(back - back.rem_euclid(21600), 0).unwrap();
    let hour = |h: i64| long_ago + Duration::hours(h);
    client.execute("UPDATE warden.retention_state SET score_watermark = $1", &[&watermark]).await.unwrap();
    client
        .execute(
            "INSERT INTO warden.score_rollups (agent_id, hour_start, samples, score_min, score_avg, score_max) \
             VALUES ('a', $1, 4, 50, 70, 90), ('a', $2, 1, 20, 20, 20), ('a', $3, 0, NULL, NULL, NULL), \
                    ('a', $4, 2, 80, 85, 90)",
            &[&long_ago, &hour(1), &hour(2), &t0],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO warden.health_history (agent_id, evaluated_at, score, tier, liveness) \
             VALUES ('a', $1, 10, 'critical', 'online'), ('a', $2, 40, 'poor', 'online'), \
                    ('a', $3, 60, 'fair', 'online'), ('a', $4, NULL, NULL, 'unknown')",
            &[&minutes(t0, 10), &minutes(t0, 70), &minutes(t0, 80), &minutes(t0, 90)],
        )
        .await
        .unwrap();
    long_ago
}

#[tokio::test]
async fn score_history_reads_rolled_up_hours_then_the_snapshots_after_them() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let t0 = t0();
    let hours = |at: DateTime<Utc>, h: i64| at + Duration::hours(h);
    // Rolled up to t0 + 1h: t0's hour is read from the rollups, never also
    // from its snapshots.
    let long_ago = seed_scores(&client, t0, hours(t0, 1)).await;

    let mut b = Bindings::new(&settings(), long_ago, hours(t0, 2));
    let history = |result: &ResultSet| -> Vec<(DateTime<Utc>, i64, [f64; 3])> {
        rows(result)
            .iter()
            .map(|r| {
                let Value::Time(bucket) = r["bucket"] else { panic!("bucket: {:?}", r["bucket"]) };
                let scores = [float(r["min_score"]), float(r["mean_score"]), float(r["max_score"])];
                (*bucket, int(r["samples"]), scores)
            })
            .collect()
    };
    assert_eq!(
        history(&run(&client, "score_history", &b).await),
        vec![
            (long_ago, 4, [50.0, 70.0, 90.0]),
            (hours(long_ago, 1), 1, [20.0, 20.0, 20.0]),
            (t0, 2, [80.0, 85.0, 90.0]),
            (hours(t0, 1), 2, [40.0, 50.0, 60.0]),
        ]
    );

    // A partial hour is read from the snapshots, where they are kept.
    b.since = minutes(t0, 5);
    assert_eq!(
        history(&run(&client, "score_history", &b).await),
        vec![(t0, 1, [10.0, 10.0, 10.0]), (hours(t0, 1), 2, [40.0, 50.0, 60.0])]
    );

    // A two-hour bucket weighs each hour's mean by its samples.
    b.since = long_ago;
    b.bucket_seconds = 7200.0;
    b.until = hours(long_ago, 3);
    assert_eq!(history(&run(&client, "score_history", &b).await), vec![(long_ago, 5, [20.0, 60.0, 90.0])]);
}

#[tokio::test]
async fn a_late_heartbeat_that_became_an_outage_is_not_an_incident_recovery_missed() {
    let (_db, client, t0) = seeded().await;
    // a2 went late, then offline: the late incident is superseded, and
    // recovery acts on the outage it became, not on it.
    client
        .execute(
            "INSERT INTO warden.incidents (agent_id, issue_type, severity, state, opened_at, resolved_at, resolution) \
             VALUES ('a2', 'heartbeat_late', 'warning', 'resolved', $1, $2, $3)",
            &[&minutes(t0, 30), &minutes(t0, 31), &warden::health::evaluator::SUPERSEDED_BY_OFFLINE],
        )
        .await
        .unwrap();
    let result = run(&client, "executive_summary", &range(t0)).await;
    // As in the seed alone: one of five real incidents.
    close(row(&result, "metric", "auto_resolved_pct")["current"], 20.0);
}

#[tokio::test]
async fn the_executive_summary_compares_with_the_previous_period_and_prices_downtime() {
    let (_db, client, t0) = seeded().await;
    let result = run(&client, "executive_summary", &range(t0)).await;
    let metric = |name: &str| row(&result, "metric", name);
    // Up over observed: now (45 + 60 + 29) / (60 + 60 + 29); before (15 + 59) / (20 + 59).
    let availability = metric("fleet_availability_pct");
    close(availability["current"], 134.0 / 149.0 * 100.0);
    close(availability["previous"], 74.0 / 79.0 * 100.0);
    assert_eq!(availability["trend"], &Value::Text("worse".into()));
    assert_eq!(availability["note"], &Value::Text("below the target".into()));
    // a1 carries role=db, priced at 100 a minute instead of 10.
    close(metric("downtime_cost")["current"], 15.0 * 100.0);
    close(metric("downtime_cost")["previous"], 5.0 * 100.0);
    close(metric("offline_minutes")["current"], 15.0);
    // One of five real incidents had a recovery action that succeeded.
    close(metric("auto_resolved_pct")["current"], 20.0);
    close(metric("auto_resolved_pct")["previous"], 100.0);
    close(metric("mttd_seconds")["current"], 210.0);
    close(metric("mttd_seconds")["previous"], 120.0);
    close(metric("mttr_seconds")["current"], 735.0);
    close(metric("incidents")["current"], 6.0);
    close(metric("incidents_critical")["current"], 2.0);
    close(metric("incidents_critical")["change"], 1.0);
    close(metric("agents_below_target")["current"], 1.0);
    assert_eq!(metric("availability_target_pct")["trend"], &Value::Null);

    let mut flat = range(t0);
    flat.label_costs = serde_json::json!({});
    let result = run(&client, "executive_summary", &flat).await;
    close(row(&result, "metric", "downtime_cost")["current"], 150.0);

    // A range reaching into the future (month to date) is compared with as
    // much time before it as it has had so far, not with its whole length:
    // an incident a day before is outside both.
    client
        .execute(
            "INSERT INTO warden.incidents (agent_id, issue_type, severity, state, opened_at, resolved_at) \
             VALUES ('a2', 'restart_loop', 'critical', 'resolved', $1::timestamptz, $1::timestamptz + interval '1 minute')",
            &[&(t0 - Duration::days(1))],
        )
        .await
        .unwrap();
    let previous_incidents = |until: DateTime<Utc>| {
        let client = &client;
        async move {
            let b = Bindings::new(&settings(), minutes(t0, 30), until);
            float(row(&run(client, "executive_summary", &b).await, "metric", "incidents")["previous"])
        }
    };
    let so_far = previous_incidents(Utc::now()).await;
    assert_eq!(previous_incidents(Utc::now() + Duration::days(10)).await, so_far);
}

#[tokio::test]
async fn the_previous_period_is_as_long_in_a_session_time_zone_with_summer_time() {
    // Run with psql, the queries see the operator's time zone. The 30 days
    // before 2025-03-31 00:00 UTC cross the change to summer time in
    // Berlin: counted in that zone's calendar days, they began an hour
    // late and missed an incident in their first hour.
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client.batch_execute("SET TimeZone = 'Europe/Berlin'").await.unwrap();
    let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
    client
        .execute(
            "INSERT INTO warden.incidents (agent_id, issue_type, severity, state, opened_at, resolved_at) \
             VALUES ('a1', 'restart_loop', 'critical', 'resolved', $1::timestamptz, $1::timestamptz + interval '1 minute')",
            &[&at("2025-03-01T00:30:00Z")],
        )
        .await
        .unwrap();
    let bindings = Bindings::new(&settings(), at("2025-03-31T00:00:00Z"), at("2025-04-30T00:00:00Z"));
    let result = run(&client, "executive_summary", &bindings).await;
    close(row(&result, "metric", "incidents")["previous"], 1.0);
}

/// One heartbeat of `agent` received at `at`, through the ingest function.
async fn beat(client: &tokio_postgres::Client, agent: &str, at: DateTime<Utc>) {
    client
        .execute(
            "SELECT * FROM warden.ingest_heartbeats(ARRAY[$1::text], ARRAY[NULL::text], ARRAY[NULL::jsonb], \
               ARRAY[NULL::text], ARRAY['healthy'], ARRAY[1::bigint], ARRAY[10000], ARRAY[NULL::timestamptz], \
               '{}', '{}', '{}', '{}', $2)",
            &[&agent, &at],
        )
        .await
        .unwrap();
}

/// A database whose evaluator has run its first cycle (which starts a
/// grace) five seconds before `t`, half an hour ago, and `agent`'s first
/// heartbeat at `t`: the clock is the tests' to drive from there.
async fn evaluated_with_a_beat(agent: &str) -> (TestDb, tokio_postgres::Client, EvalParams, DateTime<Utc>) {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = EvalParams::from_settings(&default_settings().health);
    let t = Utc::now() - Duration::minutes(30);
    evaluator::liveness_cycle(&mut c, &p, "test", Some(t - Duration::seconds(5))).await.unwrap();
    beat(&c, agent, t).await;
    (db, c, p, t)
}

/// The evaluator's own transitions and incidents, not hand-made rows: the
/// reports must read what warden really writes.
#[tokio::test]
async fn reports_read_what_the_evaluator_writes() {
    let (_db, mut c, p, t) = evaluated_with_a_beat("w1").await;
    let at = |s: i64| t + Duration::seconds(s);
    // online at 1, degraded at 12, offline at 32; back: degraded at 61, online at 70.
    for s in [1, 12, 22, 32] {
        evaluator::liveness_cycle(&mut c, &p, "test", Some(at(s))).await.unwrap();
    }
    beat(&c, "w1", at(60)).await;
    evaluator::liveness_cycle(&mut c, &p, "test", Some(at(61))).await.unwrap();
    beat(&c, "w1", at(69)).await;
    let last = evaluator::liveness_cycle(&mut c, &p, "test", Some(at(70))).await.unwrap();
    assert_eq!(last.transitions.len(), 1, "back online at 70: {last:?}");

    let b = Bindings::new(&settings(), t + Duration::seconds(1), t + Duration::seconds(101));
    let availability = run(&c, "agent_availability", &b).await;
    let w1 = row(&availability, "agent_id", "w1");
    // The outage began when the heartbeat due at 10 did not come (the
    // offline transition at 32 says: silent 32 s, expecting one every
    // 10 s), not when warden gave up on it: online 9 + 31, offline 51
    // (10-61, the late stretch included), degraded 9 on the way back, of
    // 100 seconds.
    close(w1["online_seconds"], 40.0);
    close(w1["degraded_seconds"], 9.0);
    close(w1["offline_seconds"], 51.0);
    close(w1["availability_pct"], 49.0);
    // The whole-history view draws the same lines.
    let spans = |sql: &'static str| {
        let c = &c;
        async move {
            c.query(sql, &[&(t + Duration::seconds(1)), &(t + Duration::seconds(101))])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, DateTime<Utc>>(1), r.get::<_, DateTime<Utc>>(2)))
                .collect::<Vec<_>>()
        }
    };
    let clipped_view = spans(
        "SELECT liveness, greatest(valid_from, $1), least(coalesce(valid_to, $2), $2) FROM warden.liveness_intervals \
         WHERE agent_id = 'w1' AND valid_from < $2 AND (valid_to IS NULL OR valid_to > $1) ORDER BY 2",
    )
    .await;
    let from_spans =
        spans("SELECT liveness, valid_from, valid_to FROM warden.liveness_spans($1, $2, 'w1') ORDER BY 2").await;
    assert_eq!(clipped_view, from_spans);
    assert_eq!(
        from_spans.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
        ["online", "offline", "degraded", "online"]
    );

    let timings = run(&c, "mttd_mttr", &b).await;
    let unresponsive = row(&timings, "issue_type", "agent_unresponsive");
    close(unresponsive["mttd_seconds"], 32.0);
    close(unresponsive["mttr_seconds"], 38.0);
    // The late incident did not end in recovery: it became the outage.
    let resolution: String = c
        .query_one("SELECT resolution FROM warden.incidents WHERE issue_type = 'heartbeat_late'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(resolution.starts_with("superseded:"), "{resolution}");
    let late = row(&timings, "issue_type", "heartbeat_late");
    assert_eq!(int(late["resolved"]), 1);
    assert_eq!(late["mttr_seconds"], &Value::Null, "not a recovery");
    close(row(&timings, "issue_type", "all")["mttr_seconds"], 38.0);
}

/// An agent that reports once a day is declared offline days after its
/// outage began; a range ending before that still counts the outage.
#[tokio::test]
async fn the_outage_of_a_daily_agent_counts_in_a_range_that_ends_before_it_was_declared() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    let base = Utc::now() - Duration::days(10);
    let day = |d: i64| base + Duration::days(d);
    c.execute(
        "INSERT INTO warden.agent_status (agent_id, expected_interval_ms, first_seen, last_seen, liveness, liveness_since) \
         VALUES ('daily', 86400000, $1, $1, 'offline', $2)",
        &[&base, &(day(3) + Duration::minutes(288))],
    )
    .await
    .unwrap();
    // Online from its first heartbeat; declared offline after 3.2 silent
    // days: the heartbeat due at day 1 was the first missed.
    c.execute(
        "INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details) VALUES \
           ($1::timestamptz + interval '1 minute', 'daily', 'status_changed', 'info', 'up', \
            '{\"old\": \"unknown\", \"new\": \"online\"}'), \
           ($2, 'daily', 'status_changed', 'critical', 'down', \
            jsonb_build_object('old', 'online', 'new', 'offline', \
              'figures', jsonb_build_object('silence_ms', 276480000, 'expected_interval_ms', 86400000)))",
        &[&base, &(day(3) + Duration::minutes(288))],
    )
    .await
    .unwrap();
    let b = Bindings::new(&settings(), day(1), day(2));
    let availability = run(&c, "agent_availability", &b).await;
    let daily = row(&availability, "agent_id", "daily");
    close(daily["offline_seconds"], 86400.0);
    close(daily["availability_pct"], 0.0);
}

/// While no replica evaluated liveness (warden was down), nobody knows what
/// agents were: the stretch is unknown, not whatever they were before.
#[tokio::test]
async fn a_stretch_without_evaluation_is_unknown_not_up() {
    let (_db, mut c, p, t) = evaluated_with_a_beat("w2").await;
    let at = |s: i64| t + Duration::seconds(s);
    evaluator::liveness_cycle(&mut c, &p, "test", Some(at(1))).await.unwrap();
    // warden is down from 1 to 301; the agent died meanwhile. Back, the
    // evaluator grants a fresh grace, then finds it late and offline.
    for s in [301, 311, 321, 331, 341] {
        let r = evaluator::liveness_cycle(&mut c, &p, "test", Some(at(s))).await.unwrap();
        assert_eq!(r.resumed, s == 301);
    }
    let paused: i64 = c
        .query_one("SELECT count(*) FROM warden.system_events WHERE event_type = 'evaluation_paused'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(paused, 1);

    let b = Bindings::new(&settings(), t, t + Duration::seconds(400));
    let availability = run(&c, "agent_availability", &b).await;
    let w2 = row(&availability, "agent_id", "w2");
    // Unknown 0-1 (not evaluated yet) and 1-301 (nobody evaluating);
    // online 301-311; offline from 311, when the first heartbeat due after
    // the grace was missed.
    close(w2["unknown_seconds"], 301.0);
    close(w2["online_seconds"], 10.0);
    close(w2["offline_seconds"], 89.0);
    close(w2["availability_pct"], 100.0 * 10.0 / 99.0);

    // The agent-detail dashboard's timeline says the same.
    let context = GrafanaContext {
        from: t,
        to: t + Duration::seconds(400),
        interval: "1m",
        interval_secs: 60,
        variables: vec![("agent", "w2")],
    };
    let sql = format!(
        "SELECT extract(epoch FROM q.time - $1::timestamptz)::float8, q.liveness FROM ({}) q",
        context.expand(&agent_detail_panel("state-timeline", "Liveness").sql)
    );
    let timeline: Vec<(f64, String)> =
        c.query(&sql, &[&t]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    let states: Vec<&str> = timeline.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(states, ["unknown", "unknown", "online", "offline"], "{timeline:?}");
    for ((at, _), want) in timeline.iter().zip([0.0, 1.0, 301.0, 311.0]) {
        assert!((at - want).abs() < 1e-3, "{timeline:?}");
    }
}

/// An agent removed and registered again is a new agent: until its first
/// evaluation it is unknown, not in the state its earlier life ended in,
/// and that life's outages are not its own.
#[tokio::test]
async fn an_agent_registered_again_after_removal_starts_unknown_not_offline() {
    let (db, mut c, p, t) = evaluated_with_a_beat("again").await;
    // On PostgreSQL's microseconds, to compare the times read back.
    let at = |s: i64| chrono::SubsecRound::trunc_subsecs(t + Duration::seconds(s), 6);
    // Online at 1, offline at 32, removed at 40.
    for s in [1, 12, 22, 32] {
        evaluator::liveness_cycle(&mut c, &p, "test", Some(at(s))).await.unwrap();
    }
    let mut pooled = db.pooled().await;
    warden::health::removal::remove(&mut pooled, "again", "test", Some(at(40))).await.unwrap();
    // Registered again at 100 and beating every 8 s; evaluated from 105.
    for s in [100, 108, 116] {
        beat(&c, "again", at(s)).await;
        evaluator::liveness_cycle(&mut c, &p, "test", Some(at(s + 5))).await.unwrap();
    }

    let b = Bindings::new(&settings(), at(0), at(121));
    let availability = run(&c, "agent_availability", &b).await;
    let again = row(&availability, "agent_id", "again");
    // Its life began at 100: unknown until the evaluation at 105, online
    // since.
    close(again["unknown_seconds"], 5.0);
    close(again["online_seconds"], 16.0);
    close(again["offline_seconds"], 0.0);
    close(again["availability_pct"], 100.0);
    assert_eq!(int(again["outages"]), 0, "the outage of its earlier life");

    let spans: Vec<(String, DateTime<Utc>, Option<DateTime<Utc>>)> = c
        .query(
            "SELECT liveness, valid_from, valid_to FROM warden.liveness_spans($1, $2, 'again') ORDER BY 2",
            &[&at(0), &at(121)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(spans, [("unknown".into(), at(100), Some(at(105))), ("online".into(), at(105), Some(at(121)))]);
    // The whole-history view draws its life the same way.
    let whole: Vec<(String, DateTime<Utc>, Option<DateTime<Utc>>)> = c
        .query(
            "SELECT liveness, valid_from, valid_to FROM warden.liveness_intervals WHERE agent_id = 'again' ORDER BY 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(whole, [("unknown".into(), at(100), Some(at(105))), ("online".into(), at(105), None)]);

    // The agent-detail dashboard counts its heartbeats, and their gaps, from
    // its new life on: three, 8 s apart, not the earlier life's beat at 0
    // and a gap of 100 s across the removal.
    let context = GrafanaContext {
        from: at(0),
        to: at(121),
        interval: "1m",
        interval_secs: 60,
        variables: vec![("agent", "again")],
    };
    let count = format!(
        "SELECT q.heartbeats::float8 FROM ({}) q",
        context.expand(&agent_detail_panel("stat", "Heartbeats").sql)
    );
    assert_eq!(c.query_one(&count, &[]).await.unwrap().get::<_, f64>(0), 3.0);
    let gaps = format!(
        "SELECT max(q.\"longest gap\")::float8 FROM ({}) q",
        context.expand(&agent_detail_panel("timeseries", "Heartbeat gaps").sql)
    );
    assert_eq!(c.query_one(&gaps, &[]).await.unwrap().get::<_, f64>(0), 8.0);
}

// ------------------------------------------------------------------ dashboards

/// What Grafana substitutes for one query: the time range, the interval
/// and the dashboard's template variables.
struct GrafanaContext {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    /// `$__interval` as Grafana writes it, and in seconds.
    interval: &'static str,
    interval_secs: u64,
    variables: Vec<(&'static str, &'static str)>,
}

impl GrafanaContext {
    /// Grafana first replaces template variables (`$__interval`,
    /// `$__interval_ms`, `$agent`, `${agent}`), then the PostgreSQL data
    /// source expands its macros `$__name(args)` exactly as
    /// pkg/tsdb/grafana-postgresql-datasource/macros.go does (arguments end
    /// at the first `)`).
    fn expand(&self, sql: &str) -> String {
        let mut text = sql
            .replace("$__interval_ms", &(self.interval_secs * 1000).to_string())
            .replace("$__interval", self.interval);
        for (name, value) in &self.variables {
            text = text.replace(&format!("${{{name}}}"), value).replace(&format!("${name}"), value);
        }
        let mut out = String::new();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("$__") {
            out.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            let name_len = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            let (name, tail) = after.split_at(name_len);
            let inner = tail.strip_prefix('(').unwrap_or_else(|| panic!("${name} is neither a variable nor a macro"));
            let close = inner.find(')').unwrap_or_else(|| panic!("${name}( is never closed"));
            let args: Vec<&str> = inner[..close].split(',').map(str::trim).collect();
            out.push_str(&self.expand_macro(name, &args));
            rest = &inner[close + 1..];
        }
        out.push_str(rest);
        out
    }

    fn expand_macro(&self, name: &str, args: &[&str]) -> String {
        let time = |t: DateTime<Utc>| format!("'{}'", t.to_rfc3339_opts(SecondsFormat::AutoSi, true));
        let group = || {
            assert_eq!(args.get(1).copied(), Some(self.interval), "{name} should group by $__interval");
            format!("floor(extract(epoch from {})/{})*{}", args[0], self.interval_secs, self.interval_secs)
        };
        match name {
            "__timeFilter" => format!("{} BETWEEN {} AND {}", args[0], time(self.from), time(self.to)),
            "__timeFrom" => time(self.from),
            "__timeTo" => time(self.to),
            "__timeGroup" => group(),
            "__timeGroupAlias" => format!("{} AS \"time\"", group()),
            other => panic!("macro ${other} is not one warden's dashboards use"),
        }
    }
}

/// One query of a dashboard and what its result must look like.
struct Query {
    place: String,
    kind: String,
    sql: String,
}

/// Every query of a dashboard: panel targets (rows included), annotation
/// queries and query variables.
fn queries(dashboard: &Json) -> Vec<Query> {
    fn panels(list: &Json, out: &mut Vec<Query>) {
        for panel in list.as_array().into_iter().flatten() {
            panels(&panel["panels"], out);
            let kind = panel["type"].as_str().unwrap_or_default();
            for target in panel["targets"].as_array().into_iter().flatten() {
                assert_eq!(target["rawQuery"], true, "{}: targets are raw SQL", panel["title"]);
                assert_eq!(target["datasource"]["uid"], "${DS_WARDEN}", "{}", panel["title"]);
                out.push(Query {
                    place: format!("panel {} / {}", panel["title"], target["refId"]),
                    kind: kind.to_string(),
                    sql: target["rawSql"].as_str().expect("rawSql").to_string(),
                });
            }
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for annotation in dashboard["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(sql) = annotation["target"]["rawSql"].as_str() {
            out.push(Query {
                place: format!("annotation {}", annotation["name"]),
                kind: "annotation".into(),
                sql: sql.into(),
            });
        }
    }
    for variable in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if variable["type"] == "query" {
            let sql = variable["query"].as_str().or(variable["query"]["rawSql"].as_str()).expect("variable query");
            out.push(Query {
                place: format!("variable {}", variable["name"]),
                kind: "variable".into(),
                sql: sql.into(),
            });
        }
    }
    out
}

fn is_numeric(ty: &Type) -> bool {
    [Type::INT2, Type::INT4, Type::INT8, Type::FLOAT4, Type::FLOAT8, Type::NUMERIC].contains(ty)
}

/// The query of the agent-detail dashboard's panel of type `kind` titled
/// `title` (a stat and a time series are both called "Score").
fn agent_detail_panel(kind: &str, title: &str) -> Query {
    dashboard_panel("agent-detail.json", kind, title)
}

fn dashboard_panel(file: &str, kind: &str, title: &str) -> Query {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards").join(file);
    let dashboard: Json = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    queries(&dashboard)
        .into_iter()
        .find(|q| q.kind == kind && q.place.starts_with(&format!("panel \"{title}\"")))
        .unwrap_or_else(|| panic!("no {kind} panel {title:?} in {file}"))
}

/// Runs one expanded query and checks the shape its panel type needs.
async fn check_query(client: &tokio_postgres::Client, query: &Query, sql: &str) {
    let place = &query.place;
    let statement = client.prepare(sql).await.unwrap_or_else(|e| panic!("{place}: {e}\n{sql}"));
    let columns: Vec<(&str, &Type)> = statement.columns().iter().map(|c| (c.name(), c.type_())).collect();
    let rows: Vec<Vec<Option<String>>> = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{place}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(String::from)).collect())
            }
            _ => None,
        })
        .collect();
    assert!(!rows.is_empty(), "{place} shows nothing over the seeded history\n{sql}");
    let time_column = columns.iter().position(|(name, _)| *name == "time");
    match query.kind.as_str() {
        "stat" => {
            assert!(columns.iter().all(|(_, ty)| is_numeric(ty)), "{place}: a stat shows numbers, got {columns:?}");
            assert!(rows[0].iter().any(Option::is_some), "{place}: the stat has no value");
        }
        "timeseries" | "heatmap" | "state-timeline" => {
            let at = time_column.unwrap_or_else(|| panic!("{place}: no time column in {columns:?}"));
            let ty = columns[at].1;
            assert!(is_numeric(ty) || *ty == Type::TIMESTAMPTZ, "{place}: time is {ty}");
            let values = columns.iter().enumerate().filter(|(i, _)| *i != at);
            if query.kind == "state-timeline" {
                assert!(values.count() >= 1, "{place}: a state timeline needs a value column");
            } else {
                assert!(values.filter(|(_, (_, ty))| is_numeric(ty)).count() >= 1, "{place}: no numeric series");
            }
            let times: Vec<&str> = rows.iter().map(|r| r[at].as_deref().expect("time is never NULL")).collect();
            let sorted = if is_numeric(ty) {
                times.windows(2).all(|w| w[0].parse::<f64>().unwrap() <= w[1].parse::<f64>().unwrap())
            } else {
                times.windows(2).all(|w| w[0] <= w[1])
            };
            assert!(sorted, "{place}: Grafana needs rows sorted by time: {times:?}");
        }
        "annotation" => {
            assert!(time_column.is_some(), "{place}: an annotation needs time");
            assert!(columns.iter().any(|(name, _)| *name == "text"), "{place}: an annotation needs text");
        }
        "variable" => assert!(rows.iter().any(|r| r[0].as_deref() == Some("a1")), "{place} does not offer a1"),
        _ => {}
    }
}

#[tokio::test]
async fn every_dashboard_query_runs_with_grafana_macros_expanded_and_has_its_panels_shape() {
    let (_db, client, t0) = seeded().await;
    let context = GrafanaContext {
        from: t0,
        to: minutes(t0, 60),
        interval: "5m",
        interval_secs: 300,
        variables: vec![("agent", "a1")],
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    let mut dashboards = 0;
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let dashboard: Json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let names: Vec<&str> =
            dashboard["templating"]["list"].as_array().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
        assert!(names.contains(&"DS_WARDEN"), "{}: the data source variable", path.display());
        for query in queries(&dashboard) {
            if query.sql.contains("$agent") {
                assert!(names.contains(&"agent"), "{}: {} uses $agent", path.display(), query.place);
            }
            let sql = context.expand(&query.sql);
            assert!(!sql.contains('$'), "{}: {} left {sql}", path.display(), query.place);
            check_query(&client, &query, &sql).await;
            checked += 1;
        }
        dashboards += 1;
    }
    assert_eq!(dashboards, 2, "fleet overview and agent detail");
    assert!(checked >= 30, "only {checked} queries found");
}

#[tokio::test]
async fn deliveries_by_channel_averages_the_time_to_ack_per_alert_not_per_message() {
    // Three alerts on one channel: one acknowledged after 600 s that took
    // three messages (it escalated), one after 60 s with one, and one after
    // 120 s that went out in that same message, grouped with it.
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO warden.alerts (id, dedup_key, severity, state, escalation_level, opened_at, acknowledged_at) \
               OVERRIDING SYSTEM VALUE VALUES \
               (1, 'a:x', 'critical', 'acknowledged', 3, now() - interval '20 minutes', now() - interval '10 minutes'), \
               (2, 'b:x', 'critical', 'acknowledged', 1, now() - interval '20 minutes', now() - interval '19 minutes'), \
               (3, 'c:x', 'critical', 'acknowledged', 1, now() - interval '20 minutes', now() - interval '18 minutes'); \
             INSERT INTO warden.alert_deliveries (alert_id, alert_ids, channel, kind, level, state, sent_at) VALUES \
               (1, '{}', 'ops', 'firing', 1, 'sent', now()), (1, '{}', 'ops', 'escalation', 2, 'sent', now()), \
               (1, '{}', 'ops', 'escalation', 3, 'sent', now()), (2, '{2,3}', 'ops', 'firing', 1, 'sent', now());",
        )
        .await
        .unwrap();
    let now: DateTime<Utc> = client.query_one("SELECT now()", &[]).await.unwrap().get(0);
    let context = GrafanaContext {
        from: now - chrono::Duration::hours(1),
        to: now,
        interval: "1m",
        interval_secs: 60,
        variables: vec![],
    };
    let query = dashboard_panel("fleet-overview.json", "table", "Deliveries by channel");
    let sql = format!(
        "SELECT q.messages::bigint, q.\"mean time to ack (s)\"::float8 FROM ({}) q WHERE q.channel = 'ops'",
        context.expand(&query.sql)
    );
    let row = client.query_one(&sql, &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 4);
    close(&Value::Float(row.get(1)), 260.0);
}

#[tokio::test]
async fn availability_stats_round_down_and_incident_tables_list_those_open_in_the_range() {
    let (_db, client, t0) = seeded().await;
    let context = |from: i64, to: i64| GrafanaContext {
        from: minutes(t0, from),
        to: minutes(t0, to),
        interval: "1m",
        interval_secs: 60,
        variables: vec![],
    };
    // [0, 50): a1 up 45 of 50 minutes, a2 50 of 50, a3 19 of 19 (from 31):
    // 114 / 119 = 95.798 %, which two decimals would round up to 95.80.
    let query = dashboard_panel("fleet-overview.json", "stat", "Fleet availability");
    let availability: f64 = client.query_one(&context(0, 50).expand(&query.sql), &[]).await.unwrap().get(0);
    assert!((availability - 95.79).abs() < 1e-9, "{availability}");

    // [50, 60): none was opened in it; a1's outage (45-61), its flapping
    // (42-55) and a2's restart loop (open since 20) were open in it; a3's
    // errors were resolved as it began (at 50).
    let query = dashboard_panel("fleet-overview.json", "table", "Incidents");
    let rows = client.query(&context(50, 60).expand(&query.sql), &[]).await.unwrap();
    let listed: Vec<(String, String)> = rows.iter().map(|r| (r.get("agent"), r.get("issue"))).collect();
    let expected = [("a1", "agent_unresponsive"), ("a1", "flapping"), ("a2", "restart_loop")];
    assert_eq!(listed, expected.map(|(a, i)| (a.to_string(), i.to_string())), "newest first");

    // The agent dashboard's: a1 over [0, 46) was up 45 of 46 minutes,
    // 97.826 %; over [50, 60) its outage and flapping were open.
    let agent = |from, to| GrafanaContext { variables: vec![("agent", "a1")], ..context(from, to) };
    let query = agent_detail_panel("stat", "Availability");
    let availability: f64 = client.query_one(&agent(0, 46).expand(&query.sql), &[]).await.unwrap().get(0);
    assert!((availability - 97.82).abs() < 1e-9, "{availability}");
    // Without downtime, exactly 100 whatever the seconds (100.0 * x / x
    // is a hair under 100 for some x, and would be rounded down to 99.99).
    let whole = GrafanaContext {
        to: t0 + Duration::microseconds(2_727_877_499),
        variables: vec![("agent", "a2")],
        ..agent(0, 0)
    };
    let availability: f64 = client.query_one(&whole.expand(&query.sql), &[]).await.unwrap().get(0);
    assert_eq!(availability, 100.0);
    let query = agent_detail_panel("table", "Incidents");
    let rows = client.query(&agent(50, 60).expand(&query.sql), &[]).await.unwrap();
    let issues: Vec<String> = rows.iter().map(|r| r.get("issue")).collect();
    assert_eq!(issues, ["agent_unresponsive", "flapping"]);
}

#[tokio::test]
async fn the_heartbeat_rate_panel_counts_partial_buckets_per_minute_covered() {
    // Two heartbeats a minute, shown over 30 minutes that start and end in
    // the middle of 5-minute buckets (150 s of the first and of the last):
    // every bucket, the partial ones included, reads two a minute. The
    // range ends in the past, so the query's own now() does not cut it.
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let now: DateTime<Utc> = client.query_one("SELECT now()", &[]).await.unwrap().get(0);
    let to = DateTime::from_timestamp(now.timestamp() - now.timestamp() % 300 - 150, 0).unwrap();
    let from = to - chrono::Duration::minutes(30);
    // Beats 15 s off every half minute: none on a bucket's edge.
    for k in 0..70 {
        client
            .execute(
                "SELECT * FROM warden.ingest_heartbeats(ARRAY['a1'], ARRAY[NULL::text], ARRAY[NULL::jsonb], \
                   ARRAY[NULL::text], ARRAY['healthy'], ARRAY[NULL::bigint], ARRAY[30000], ARRAY[NULL::timestamptz], \
                   '{}', '{}', '{}', '{}', $1)",
                &[&(to - chrono::Duration::seconds(30 * k + 15))],
            )
            .await
            .unwrap();
    }
    let context = GrafanaContext { from, to, interval: "5m", interval_secs: 300, variables: vec![("agent", "a1")] };
    let query = agent_detail_panel("timeseries", "Heartbeat rate");
    let sql =
        format!("SELECT q.time::float8, q.\"heartbeats per minute\"::float8 FROM ({}) q", context.expand(&query.sql));
    let rows = client.query(&sql, &[]).await.unwrap();
    assert_eq!(rows.len(), 7, "five whole buckets and two halves");
    for r in rows {
        let rate: f64 = r.get(1);
        assert!((rate - 2.0).abs() < 1e-9, "{rate} a minute in the bucket at {}", r.get::<_, f64>(0));
    }
    // Zoomed in to 5 s buckets, a 30 s agent is still drawn steady: raw
    // buckets hold two of its intervals, not five seconds, most of which
    // would be empty (and zero) by design.
    let context = GrafanaContext { from, to, interval: "5s", interval_secs: 5, variables: vec![("agent", "a1")] };
    let sql =
        format!("SELECT q.time::float8, q.\"heartbeats per minute\"::float8 FROM ({}) q", context.expand(&query.sql));
    let rows = client.query(&sql, &[]).await.unwrap();
    assert_eq!(rows.len(), 31, "29 whole minutes and two halves");
    for r in rows {
        let rate: f64 = r.get(1);
        assert!((rate - 2.0).abs() < 1e-9, "{rate} a minute in the bucket at {}", r.get::<_, f64>(0));
    }
}

#[tokio::test]
async fn the_heartbeats_stat_counts_rolled_up_hours_and_the_raw_rows_after_them() {
    // As heartbeat_volume: rolled up to t0 + 1h, an hour 40 days back
    // whose raw rows are gone, t0's hour rolled up with its raw row still
    // kept (counted once), and raw rows after the watermark.
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let t0 = t0();
    let long_ago = t0 - Duration::days(40);
    client.execute("UPDATE warden.retention_state SET hour_watermark = $1", &[&minutes(t0, 60)]).await.unwrap();
    client
        .execute(
            "INSERT INTO warden.heartbeat_rollups (agent_id, bucket, bucket_start, heartbeats) \
             VALUES ('a1', 'hour', $1, 120), ('a1', 'hour', $2, 60), ('a2', 'hour', $2, 7)",
            &[&long_ago, &t0],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO warden.agent_heartbeats (agent_id, received_at, status) \
             VALUES ('a1', $1, 'healthy'), ('a1', $2, 'healthy'), ('a1', $3, 'healthy'), ('a1', $4, 'healthy')",
            // One exactly at the watermark: the first not rolled up.
            &[&minutes(t0, 10), &minutes(t0, 60), &minutes(t0, 70), &minutes(t0, 80)],
        )
        .await
        .unwrap();
    let query = agent_detail_panel("stat", "Heartbeats");
    let count = |from: DateTime<Utc>, to: DateTime<Utc>| {
        let context =
            GrafanaContext { from, to, interval: "1h", interval_secs: 3600, variables: vec![("agent", "a1")] };
        let sql = format!("SELECT q.heartbeats::bigint FROM ({}) q", context.expand(&query.sql));
        let client = &client;
        async move { client.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(count(long_ago - Duration::days(1), minutes(t0, 120)).await, 120 + 60 + 3);
    assert_eq!(count(minutes(t0, 5), minutes(t0, 75)).await, 3, "partial hours from the raw rows");
    assert_eq!(count(minutes(t0, 0), minutes(t0, 60)).await, 60, "a whole rolled-up hour");
    assert_eq!(count(minutes(t0, 60), minutes(t0, 61)).await, 1, "the watermark's own minute, raw");
}

/// The (time, value) points a time-series panel of the agent-detail
/// dashboard draws for `agent` over [from, to) in buckets of
/// `interval_secs` (`interval` as Grafana writes it).
async fn series(
    client: &tokio_postgres::Client,
    title: &str,
    value: &str,
    agent: &'static str,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    (interval, interval_secs): (&'static str, u64),
) -> Vec<(i64, f64)> {
    let context = GrafanaContext { from, to, interval, interval_secs, variables: vec![("agent", agent)] };
    let sql = format!(
        "SELECT q.time::float8, q.\"{value}\"::float8 FROM ({}) q",
        context.expand(&agent_detail_panel("timeseries", title).sql)
    );
    let rows = client.query(&sql, &[]).await.unwrap_or_else(|e| panic!("{title}: {e}\n{sql}"));
    rows.iter().map(|r| (r.get::<_, f64>(0) as i64, r.get(1))).collect()
}

fn assert_points(actual: &[(i64, f64)], expected: &[(DateTime<Utc>, f64)]) {
    let expected: Vec<(i64, f64)> = expected.iter().map(|(t, v)| (t.timestamp(), *v)).collect();
    let same = actual.len() == expected.len()
        && actual.iter().zip(&expected).all(|(a, e)| a.0 == e.0 && (a.1 - e.1).abs() < 1e-9);
    assert!(same, "points {actual:?}, expected {expected:?}");
}

#[tokio::test]
async fn the_heartbeat_rate_panel_reads_the_rollups_for_hours_before_the_oldest_raw_heartbeat() {
    // Rolled up to t0 + 2h. a1's hours 40 days back have only their
    // rollups left; t0's hour is rolled up too, but its raw heartbeats are
    // still kept, so it is read raw (at full resolution) and never twice.
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let t0 = t0();
    let hours = |at: DateTime<Utc>, h: i64| at + Duration::hours(h);
    let three_hours =
        |at: DateTime<Utc>| DateTime::from_timestamp(at.timestamp() - at.timestamp().rem_euclid(10800), 0).unwrap();
    let long_ago = three_hours(t0 - Duration::days(40));
    // b's oldest raw heartbeat is in the second hour of a three-hour
    // bucket whose first hour only the rollups still hold.
    let b0 = three_hours(t0 - Duration::hours(3));
    client.execute("UPDATE warden.retention_state SET hour_watermark = $1", &[&hours(t0, 2)]).await.unwrap();
    client
        .execute(
            "INSERT INTO warden.heartbeat_rollups (agent_id, bucket, bucket_start, heartbeats) \
             VALUES ('a1', 'hour', $1, 120), ('a1', 'hour', $2, 60), ('a1', 'hour', $3, 999), \
                    ('a2', 'hour', $1, 7), ('a1', 'minute', $1, 5), \
                    ('b', 'hour', $4, 30), ('b', 'hour', $5, 999)",
            &[&long_ago, &hours(long_ago, 1), &t0, &b0, &hours(b0, 1)],
        )
        .await
        .unwrap();
    let beats = [
        ("a1", minutes(t0, 10)),
        ("a1", minutes(t0, 20)),
        ("a1", minutes(t0, 70)),
        ("b", minutes(hours(b0, 1), 30)),
        ("b", minutes(hours(b0, 2), 30)),
    ];
    for (agent, at) in beats {
        client
            .execute(
                "INSERT INTO warden.agent_heartbeats (agent_id, received_at, status) VALUES ($1, $2, 'healthy')",
                &[&agent, &at],
            )
            .await
            .unwrap();
    }
    let rate =
        |agent, range, interval| series(&client, "Heartbeat rate", "heartbeats per minute", agent, range, interval);

    let months = (long_ago, hours(t0, 2));
    assert_points(
        &rate("a1", months, ("1h", 3600)).await,
        &[(long_ago, 2.0), (hours(long_ago, 1), 1.0), (t0, 2.0 / 60.0), (hours(t0, 1), 1.0 / 60.0)],
    );
    // Finer buckets: rolled-up hours stay hours, raw heartbeats get 5
    // minutes, and from the first of them the 5 minutes without one are
    // zeros (an outage is drawn as one, not across).
    let raw = |from: i64, to: i64| -> Vec<(DateTime<Utc>, f64)> {
        (from..to).step_by(5).map(|m| (minutes(t0, m), if [10, 20, 70].contains(&m) { 0.2 } else { 0.0 })).collect()
    };
    let mut expected = vec![(long_ago, 2.0), (hours(long_ago, 1), 1.0)];
    expected.extend(raw(10, 120));
    assert_points(&rate("a1", months, ("5m", 300)).await, &expected);
    // Coarser buckets sum the hours, per minute of the bucket.
    assert_points(&rate("a1", (long_ago, hours(long_ago, 3)), ("3h", 10800)).await, &[(long_ago, 1.0)]);
    // From 10 minutes into an hour: that partial hour has neither a rollup
    // nor raw rows, so the bucket's rate is over the two whole hours after it.
    assert_points(
        &rate("a1", (minutes(long_ago, 10), hours(long_ago, 3)), ("3h", 10800)).await,
        &[(long_ago, 60.0 * 60.0 / 7200.0)],
    );
    // A bucket holding both rolled-up hours and raw heartbeats adds them.
    assert_points(&rate("b", (b0, hours(b0, 3)), ("3h", 10800)).await, &[(b0, 32.0 * 60.0 / 10800.0)]);
    // Within the raw retention nothing changes.
    assert_points(&rate("a1", (t0, hours(t0, 1)), ("5m", 300)).await, &raw(10, 60));
}

#[tokio::test]
async fn the_score_panel_reads_the_rollups_for_hours_before_the_oldest_snapshot() {
    // As the heartbeat rate: rolled up to t0 + 2h; t0's hour also has its
    // snapshots still kept and is read from them. The hour without a score
    // draws nothing.
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let t0 = t0();
    let hours = |at: DateTime<Utc>, h: i64| at + Duration::hours(h);
    let long_ago = seed_scores(&client, t0, hours(t0, 2)).await;
    let score = |range, interval| series(&client, "Score", "score", "a", range, interval);

    let months = (long_ago, hours(t0, 2));
    assert_points(
        &score(months, ("1h", 3600)).await,
        &[(long_ago, 70.0), (hours(long_ago, 1), 20.0), (t0, 10.0), (hours(t0, 1), 50.0)],
    );
    assert_points(
        &score(months, ("5m", 300)).await,
        &[
            (long_ago, 70.0),
            (hours(long_ago, 1), 20.0),
            (minutes(t0, 10), 10.0),
            (minutes(t0, 70), 40.0),
            (minutes(t0, 80), 60.0),
        ],
    );
    // A three-hour bucket weighs each hour's mean by its samples.
    assert_points(&score((long_ago, hours(long_ago, 3)), ("3h", 10800)).await, &[(long_ago, 60.0)]);
}

#[test]
fn grafana_expansion_matches_the_data_source() {
    let context = GrafanaContext {
        from: "2025-01-31T10:00:00Z".parse().unwrap(),
        to: "2025-01-31T11:00:00Z".parse().unwrap(),
        interval: "1m",
        interval_secs: 60,
        variables: vec![("agent", "a1")],
    };
    assert_eq!(
        context.expand("SELECT $__timeGroupAlias(t, $__interval), x FROM y WHERE $__timeFilter(t) AND a = '$agent'"),
        "SELECT floor(extract(epoch from t)/60)*60 AS \"time\", x FROM y \
         WHERE t BETWEEN '2025-01-31T10:00:00Z' AND '2025-01-31T11:00:00Z' AND a = 'a1'"
    );
    assert_eq!(
        context.expand("$__timeFrom() $__timeTo() $__interval_ms ${agent}"),
        "'2025-01-31T10:00:00Z' '2025-01-31T11:00:00Z' 60000 a1"
    );
}

// ------------------------------------------------------------------ the binary

fn stdout_of(out: &std::process::Output) -> String {
    assert!(out.status.success(), "exit {:?}: {}", out.status.code(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn report_list_names_every_report_with_a_line_each() {
    let out = warden().args(["report", "--list"]).output().unwrap();
    let text = stdout_of(&out);
    for r in REPORTS {
        let line =
            text.lines().find(|l| l.starts_with(&format!("{} ", r.name))).unwrap_or_else(|| panic!("{}", r.name));
        assert!(line.contains(r.description()), "{line}");
    }
    assert_eq!(text.lines().count(), REPORTS.len() + 2, "header, rule and one line per report");
}

#[test]
fn an_unknown_report_exits_2_with_one_line_before_connecting() {
    // An address nothing listens on: the name is checked first.
    let out = warden()
        .args(["report", "no_such_report"])
        .env("WARDEN__DATABASE__URL", "host=127.0.0.1 port=1 user=nobody connect_timeout=1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("unknown report \"no_such_report\"") && stderr.contains("--list"), "{stderr}");
    assert!(!stderr.contains("settings"), "a usage error, not a settings one: {stderr}");
    assert!(out.stdout.is_empty());

    let out = warden().args(["report", "fleet_summary", "--since", "yesterday"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--since"));
}

#[tokio::test]
async fn warden_report_prints_json_tables_and_csv_from_the_database() {
    let (db, _client, t0) = seeded().await;
    let since = t0.to_rfc3339();
    let until = minutes(t0, 60).to_rfc3339();
    let report = |args: &[&str]| {
        let out = warden()
            .arg("report")
            .args(args)
            .args(["--since", &since, "--until", &until])
            .env("WARDEN__DATABASE__URL", db.url())
            .env("WARDEN__TELEMETRY__LEVEL", "error")
            .output()
            .unwrap();
        stdout_of(&out)
    };

    let json: Json = serde_json::from_str(&report(&["fleet_summary", "--format", "json"])).expect("valid JSON");
    let rows = json.as_array().expect("an array of objects");
    assert_eq!(rows.len(), 16);
    let find = |d: &str, v: &str| rows.iter().find(|r| r["dimension"] == d && r["value"] == v).unwrap().clone();
    assert_eq!(find("fleet", "all")["agents"], 4, "integers stay integers");
    assert_eq!(find("liveness", "online")["agents"], 3);
    assert_eq!(find("liveness", "online")["share_pct"], 75.0);
    assert_eq!(find("tier", "unscored")["registered_in_range"], 1);

    let table = report(&["fleet_summary", "--format", "table"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 18, "header, rule, 16 rows");
    // Every column starts at the same offset on every line.
    let starts: Vec<usize> = lines[0]
        .match_indices(|c: char| c != ' ')
        .filter_map(|(i, _)| (i == 0 || lines[0].as_bytes()[i - 1] == b' ').then_some(i))
        .collect();
    assert_eq!(starts.len(), 5, "{}", lines[0]);
    for line in &lines[1..] {
        for &at in &starts[1..] {
            assert_eq!(&line[at - 2..at], "  ", "column gap before {at} in {line:?}");
            assert_ne!(line.as_bytes()[at], b' ', "a cell starts at {at} in {line:?}");
        }
    }
    assert!(lines[1].chars().all(|c| c == '-' || c == ' '), "a rule under the header");

    let csv = report(&["agent_availability", "--agent", "a1", "--format", "csv"]);
    let records: Vec<&str> = csv.split_terminator("\r\n").collect();
    assert_eq!(records.len(), 2, "header and a1: {csv:?}");
    assert!(records[0].starts_with("agent_id,name,availability_pct,online_pct,"));
    assert!(records[1].starts_with("a1,db one,75,66.66666666666667,2400,300,900,"), "{}", records[1]);
}

// ------------------------------------------------------------------ settings

fn load_with(vars: &[(&str, &str)]) -> Result<warden::config::Settings, warden::config::SettingsError> {
    let env = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    warden::config::Settings::load(&warden::config::Sources { file: None, env: Some(env) })
}

#[test]
fn reporting_settings_have_defaults_and_refuse_nonsense_in_one_line() {
    let defaults = default_settings().reporting;
    assert_eq!(defaults.availability_target, 99.5);
    assert_eq!(defaults.top_n, 20);
    assert!(defaults.label_costs.is_empty());

    let costs = load_with(&[("WARDEN__REPORTING__LABEL_COSTS__ROLE__DB", "50")]).unwrap().reporting.label_costs;
    assert_eq!(costs["role"]["db"], 50.0, "per-label costs can come from the environment");

    for (var, value, key) in [
        ("WARDEN__REPORTING__AVAILABILITY_TARGET", "120", "reporting.availability_target"),
        ("WARDEN__REPORTING__DOWNTIME_COST_PER_MINUTE", "-1", "reporting.downtime_cost_per_minute"),
        ("WARDEN__REPORTING__TOP_N", "0", "reporting.top_n"),
        ("WARDEN__REPORTING__TREND_BUCKET", "0s", "reporting.trend_bucket"),
        ("WARDEN__REPORTING__LABEL_COSTS__ROLE__DB", "-5", "reporting.label_costs.role.db"),
    ] {
        let message = load_with(&[(var, value)]).expect_err(var).to_string();
        assert!(message.contains(key) && !message.contains('\n'), "{var}={value}: {message}");
    }
}

#[tokio::test]
async fn the_liveness_over_time_panel_counts_each_point_as_the_spans_say() {
    // a1 turns degraded at 40 and offline at 45 of the seeded hour, both
    // on points of a one-minute grid: a span counts from its first instant
    // up to, not including, its end.
    let (_db, client, t0) = seeded().await;
    let context = GrafanaContext {
        from: minutes(t0, -60),
        to: minutes(t0, 60),
        interval: "1m",
        interval_secs: 60,
        variables: vec![],
    };
    let query = dashboard_panel("fleet-overview.json", "timeseries", "Liveness over time");
    let panel = format!(
        "SELECT q.time, q.online::bigint, q.degraded::bigint, q.offline::bigint, q.unknown::bigint FROM ({}) q",
        context.expand(&query.sql)
    );
    // Each point against every span, the direct way.
    let direct = context.expand(
        "SELECT p.at, count(*) FILTER (WHERE s.liveness = 'online'), count(*) FILTER (WHERE s.liveness = 'degraded'), \
                count(*) FILTER (WHERE s.liveness = 'offline'), count(*) FILTER (WHERE s.liveness = 'unknown') \
         FROM generate_series($__timeFrom()::timestamptz, least($__timeTo()::timestamptz, now()) - interval '1 millisecond', \
                              interval '1 minute') AS p(at) \
         LEFT JOIN warden.liveness_spans($__timeFrom(), $__timeTo()) s ON s.valid_from <= p.at AND s.valid_to > p.at \
         GROUP BY p.at ORDER BY p.at",
    );
    type Counts = (DateTime<Utc>, i64, i64, i64, i64);
    let read = |rows: Vec<tokio_postgres::Row>| -> Vec<Counts> {
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect()
    };
    let shown = read(client.query(&panel, &[]).await.unwrap());
    let expected = read(client.query(&direct, &[]).await.unwrap());
    assert_eq!(shown.len(), 120);
    assert_eq!(shown, expected);
    let at = |m: i64| shown.iter().find(|c| c.0 == minutes(t0, m)).copied().unwrap();
    let (before, entered, offline) = (at(39), at(40), at(45));
    assert_eq!(entered.2, before.2 + 1, "a1 counts as degraded from minute 40 itself");
    assert_eq!(offline.3, at(44).3 + 1, "and offline from minute 45");
}
