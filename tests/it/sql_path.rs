//! `warden.record_heartbeat` has the same effect as POST /v1/heartbeats.

use serde_json::{Value, json};
use tokio_postgres::error::SqlState;
use warden::auth::Scope;

use crate::helpers::TestApp;

/// Everything an agent's heartbeats left in the tables, minus its id, the
/// wall-clock times and the evaluator's columns (the background evaluator
/// may score one agent a moment before the other), in a comparable form.
async fn footprint(app: &TestApp, agent: &str) -> Value {
    let db = app.db.client().await;
    let status = db
        .query_one(
            "SELECT to_jsonb(s) - 'agent_id' - 'first_seen' - 'last_seen' - 'liveness_since' - 'last_restart_at' \
             - 'ia_count' - 'ia_mean_ms' - 'ia_var_ms2' - 'beats_decayed' \
             - 'liveness' - 'score' - 'tier' - 'components' - 'evaluated_at' - 'score_trend' - 'history_at' \
             FROM warden.agent_status s WHERE agent_id = $1",
            &[&agent],
        )
        .await
        .unwrap()
        .get::<_, Value>(0);
    let beats = db
        .query_one(
            "SELECT coalesce(jsonb_agg(to_jsonb(h) - 'agent_id' - 'received_at' ORDER BY received_at, uptime_seconds DESC), '[]') \
             FROM warden.agent_heartbeats h WHERE agent_id = $1",
            &[&agent],
        )
        .await
        .unwrap()
        .get::<_, Value>(0);
    let metrics = db
        .query_one(
            "SELECT coalesce(jsonb_agg(jsonb_build_array(name, value, unit) ORDER BY recorded_at, name), '[]') \
             FROM warden.performance_metrics WHERE agent_id = $1",
            &[&agent],
        )
        .await
        .unwrap()
        .get::<_, Value>(0);
    let events = db
        .query_one(
            "SELECT coalesce(jsonb_agg(jsonb_build_array(event_type, severity, message, details, source) ORDER BY id), '[]') \
             FROM warden.system_events WHERE agent_id = $1 AND event_type IN ('agent_registered', 'agent_restarted')",
            &[&agent],
        )
        .await
        .unwrap()
        .get::<_, Value>(0);
    json!({"status": status, "heartbeats": beats, "metrics": metrics, "events": events})
}

#[tokio::test]
async fn both_paths_leave_identical_rows_and_answers() {
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Ingest]).await;
    let db = app.db.client().await;

    let http_answers = vec![
        app.heartbeat(
            &key,
            json!({"agent_id": "via-http", "name": "N", "mode": "emergency", "status": "degraded",
                   "uptime_seconds": 100, "metrics": {"cpu": 1.5, "lat": {"value": 2, "unit": "ms"}},
                   "labels": {"role": "w"}}),
        )
        .await
        .1,
        app.heartbeat(&key, json!({"agent_id": "via-http", "uptime_seconds": 5, "next_heartbeat_ms": 1200})).await.1,
    ];

    let sql = "SELECT to_jsonb(r) FROM warden.record_heartbeat($1, $2, $3, $4, $5, $6, $7, $8) r";
    let first = db
        .query_one(
            sql,
            &[
                &"via-sql",
                &Some("emergency"),
                &Some("degraded"),
                &Some(100_i64),
                &None::<i32>,
                &Some(json!({"cpu": 1.5, "lat": {"value": 2, "unit": "ms"}})),
                &Some("N"),
                &Some(json!({"role": "w"})),
            ],
        )
        .await
        .unwrap()
        .get::<_, Value>(0);
    let second = db
        .query_one(
            sql,
            &[
                &"via-sql",
                &None::<&str>,
                &Some("healthy"),
                &Some(5_i64),
                &Some(1200_i32),
                &None::<Value>,
                &None::<&str>,
                &None::<Value>,
            ],
        )
        .await
        .unwrap()
        .get::<_, Value>(0);

    assert_eq!(vec![first, second], http_answers, "the same answers");
    let http = footprint(&app, "via-http").await;
    let sql = footprint(&app, "via-sql").await;
    assert_eq!(http, sql, "the same rows");
    assert_eq!(http["status"]["restart_count"], 1, "and the footprint is not trivially empty");
    assert_eq!(http["metrics"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_batch_of_one_agents_heartbeats_numbers_itself_when_the_caller_does_not() {
    // The writer passes each heartbeat's number among its agent's;
    // ingest_heartbeats called from SQL without them must work them out
    // and leave the same rows.
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Ingest]).await;
    let batch = |b: &str, c: &str| {
        json!({"heartbeats": [
            {"agent_id": b, "uptime_seconds": 10},
            {"agent_id": c, "uptime_seconds": 1},
            {"agent_id": b, "uptime_seconds": 20},
            {"agent_id": b, "uptime_seconds": 5},
            {"agent_id": b, "uptime_seconds": 4, "name": "last"}
        ]})
    };
    let (status, body) = app.heartbeat(&key, batch("http-b", "http-c")).await;
    assert_eq!(status, 200, "{body}");

    let db = app.db.client().await;
    let rows = db
        .query(
            "SELECT idx, is_new, restart_detected FROM warden.ingest_heartbeats( \
               ARRAY['sql-b', 'sql-c', 'sql-b', 'sql-b', 'sql-b'], ARRAY[NULL, NULL, NULL, NULL, 'last'], \
               ARRAY[NULL, NULL, NULL, NULL, NULL]::jsonb[], ARRAY[NULL, NULL, NULL, NULL, NULL]::text[], \
               ARRAY['healthy', 'healthy', 'healthy', 'healthy', 'healthy'], ARRAY[10, 1, 20, 5, 4]::bigint[], \
               ARRAY[NULL, NULL, NULL, NULL, NULL]::int[], ARRAY[NULL, NULL, NULL, NULL, NULL]::timestamptz[], \
               '{}', '{}', '{}', '{}') ORDER BY idx",
            &[],
        )
        .await
        .unwrap();
    let sql_flags: Vec<(bool, bool)> = rows.iter().map(|r| (r.get(1), r.get(2))).collect();
    let http_flags: Vec<(bool, bool)> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["is_new"].as_bool().unwrap(), r["restart_detected"].as_bool().unwrap()))
        .collect();
    assert_eq!(sql_flags, http_flags);
    assert_eq!(sql_flags, vec![(true, false), (true, false), (false, false), (false, true), (false, true)]);
    assert_eq!(footprint(&app, "sql-b").await, footprint(&app, "http-b").await);
    assert_eq!(footprint(&app, "sql-c").await, footprint(&app, "http-c").await);

    // A count of numbers that does not match the batch is refused (their
    // values are the caller's to get right, as the writer does).
    let e = db
        .query(
            "SELECT * FROM warden.ingest_heartbeats(ARRAY['x', 'y'], ARRAY[NULL, NULL], ARRAY[NULL, NULL]::jsonb[], \
               ARRAY[NULL, NULL]::text[], ARRAY['healthy', 'healthy'], ARRAY[1, 2]::bigint[], ARRAY[NULL, NULL]::int[], \
               ARRAY[NULL, NULL]::timestamptz[], '{}', '{}', '{}', '{}', p_occurrence => ARRAY[1])",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::INVALID_PARAMETER_VALUE), "{e:?}");
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status WHERE agent_id IN ('x', 'y')").await, 0);
}

#[tokio::test]
async fn an_agent_id_cannot_be_renamed_to_one_ingest_would_refuse() {
    let app = TestApp::spawn().await;
    let db = app.db.client().await;
    db.execute("SELECT warden.record_heartbeat('renamed')", &[]).await.unwrap();
    let e = db
        .execute("UPDATE warden.agent_status SET agent_id = 'no spaces' WHERE agent_id = 'renamed'", &[])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::CHECK_VIOLATION), "{e:?}");
    db.execute("UPDATE warden.agent_status SET agent_id = 'renamed-ok' WHERE agent_id = 'renamed'", &[])
        .await
        .expect("a valid new id is accepted");
}

#[tokio::test]
async fn the_contract_signature_works_positionally() {
    let app = TestApp::spawn().await;
    let db = app.db.client().await;
    let row = db
        .query_one(
            "SELECT received, is_new, restart_detected, next_heartbeat_ms \
             FROM warden.record_heartbeat('pg-agent', 'idle', 'healthy', 42::bigint, NULL::int, '{\"jobs\": 3}'::jsonb)",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1) && !row.get::<_, bool>(2));
    assert_eq!(row.get::<_, i32>(3), 30_000);
    assert_eq!(app.count("SELECT count(*) FROM warden.performance_metrics WHERE agent_id = 'pg-agent'").await, 1);
}

#[tokio::test]
async fn an_agent_silent_for_months_can_report_again() {
    // The hourly decay of the received-beats figure is exp(-gap / 1 h);
    // past about a month that underflows double precision, which must not
    // fail the heartbeat.
    let app = TestApp::spawn().await;
    let db = app.db.client().await;
    db.execute("SELECT warden.record_heartbeat('hermit')", &[]).await.unwrap();
    db.execute("UPDATE warden.agent_status SET last_seen = now() - interval '90 days' WHERE agent_id = 'hermit'", &[])
        .await
        .unwrap();
    let row = db.query_one("SELECT received FROM warden.record_heartbeat('hermit')", &[]).await.unwrap();
    assert!(row.get::<_, bool>(0));
    let decayed: f64 = db
        .query_one("SELECT beats_decayed FROM warden.agent_status WHERE agent_id = 'hermit'", &[])
        .await
        .unwrap()
        .get(0);
    assert!((decayed - 1.0).abs() < 1e-9, "the old beats decayed away: {decayed}");
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_heartbeats WHERE agent_id = 'hermit'").await, 2);
}

#[tokio::test]
async fn bad_sql_heartbeats_raise_invalid_parameter_value_naming_the_parameter() {
    let app = TestApp::spawn().await;
    let db = app.db.client().await;
    let cases = [
        ("SELECT warden.record_heartbeat('bad id')", "agent_id"),
        ("SELECT warden.record_heartbeat('a', 'asleep')", "mode"),
        ("SELECT warden.record_heartbeat('a', 'idle', 'fine')", "status"),
        ("SELECT warden.record_heartbeat('a', 'idle', 'healthy', -1)", "uptime_seconds"),
        ("SELECT warden.record_heartbeat('a', 'idle', 'healthy', 1, 5)", "next_heartbeat_ms"),
        ("SELECT warden.record_heartbeat('a', metrics => '{\"cpu\": \"x\"}')", "metrics"),
        ("SELECT warden.record_heartbeat('a', metrics => '[1]')", "metrics"),
        ("SELECT warden.record_heartbeat('a', labels => '{\"k\": 1}')", "labels"),
    ];
    for (sql, column) in cases {
        let err = db.execute(sql, &[]).await.expect_err(sql);
        let db_err = err.as_db_error().expect("a database error");
        assert_eq!(db_err.code(), &SqlState::INVALID_PARAMETER_VALUE, "{sql}");
        assert_eq!(db_err.column(), Some(column), "{sql}: {}", db_err.message());
    }
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status").await, 0);
}
