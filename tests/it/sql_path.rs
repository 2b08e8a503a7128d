//! `warden.record_heartbeat` has the same effect as POST /v1/heartbeats.

use serde_json::{Value, json};
use tokio_postgres::error::SqlState;
use warden::auth::Scope;

use crate::helpers::TestApp;

/// Everything an agent's heartbeats left in the tables, minus its id, the
/// wall-clock times, the inter-arrival statistics that follow from them
/// and the evaluator's columns (the background evaluator may score one
/// agent a moment before the other), in a comparable form.
async fn footprint(app: &TestApp, agent: &str) -> Value {
    let db = app.db.client().await;
    let status = db
        .query_one(
            "SELECT to_jsonb(s) - 'agent_id' - 'first_seen' - 'last_seen' - 'liveness_since' - 'last_restart_at' \
             - 'ia_count' - 'ia_mean_ms' - 'ia_var_ms2' - 'beats_decayed' - 'beats_expected' \
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

/// Between an agent's two heartbeats on each path: beats under 10 ms apart
/// count as one on-time beat (a buffer sent at once), so without it the
/// on-time run would depend on how quickly each path answered.
const SPACING: std::time::Duration = std::time::Duration::from_millis(20);

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
        {
            tokio::time::sleep(SPACING).await;
            app.heartbeat(&key, json!({"agent_id": "via-http", "uptime_seconds": 5, "next_heartbeat_ms": 1200})).await.1
        },
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
    tokio::time::sleep(SPACING).await;
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

/// When each of an agent's heartbeats and metrics was stamped, counted in
/// microseconds from its first heartbeat in the batch (the one before it,
/// if any, has uptime 1): the order of rows in one batch.
async fn stamps(app: &TestApp, agent: &str) -> Value {
    let db = app.db.client().await;
    db.query_one(
        "WITH first AS (SELECT min(received_at) AS t FROM warden.agent_heartbeats \
                        WHERE agent_id = $1 AND uptime_seconds <> 1) \
         SELECT jsonb_build_object( \
           'heartbeats', (SELECT jsonb_agg(jsonb_build_array(extract(epoch FROM h.received_at - f.t) * 1e6, \
                                                            h.uptime_seconds) ORDER BY h.received_at) \
                          FROM warden.agent_heartbeats h WHERE h.agent_id = $1 AND h.received_at >= f.t), \
           'metrics', (SELECT jsonb_agg(jsonb_build_array(extract(epoch FROM m.recorded_at - f.t) * 1e6, m.name) \
                                        ORDER BY m.recorded_at, m.name) \
                       FROM warden.performance_metrics m WHERE m.agent_id = $1)) \
         FROM first f",
        &[&agent],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn a_large_interleaved_batch_leaves_the_rows_the_function_writes_for_sql() {
    // The writer sorts a batch and numbers each agent's heartbeats itself;
    // SQL callers leave both to the function. Same rows, same stamps, same
    // answers, for a batch of several heartbeats per agent in shuffled
    // order, with restarts, metrics and new agents.
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Ingest]).await;
    let db = app.db.client().await;
    const AGENTS: usize = 100;
    const ROUNDS: usize = 3;

    // Every other agent is known before the batch.
    for i in (0..AGENTS).step_by(2) {
        let (status, body) = app.heartbeat(&key, json!({"agent_id": format!("http-{i}"), "uptime_seconds": 1})).await;
        assert_eq!(status, 200, "{body}");
        db.execute("SELECT warden.record_heartbeat($1, uptime_seconds => 1)", &[&format!("sql-{i}")]).await.unwrap();
    }
    // A heartbeat under 10 ms after the one before does not lengthen the
    // on-time run, and the last agents registered are that close to the
    // HTTP batch on a fast machine but not to the SQL one sent after it:
    // a second's distance for all makes both sides count the same.
    db.execute(
        "UPDATE warden.agent_status SET first_seen = first_seen - interval '1 second', \
           last_seen = last_seen - interval '1 second'",
        &[],
    )
    .await
    .unwrap();

    // Round r holds every agent's r-th heartbeat, agents in a different
    // order each round; every third agent restarts in its last one.
    struct Beat {
        agent: usize,
        uptime: i64,
        mode: &'static str,
        name: Option<String>,
        metrics: Option<Value>,
    }
    let mut beats = Vec::new();
    for round in 0..ROUNDS {
        for j in 0..AGENTS {
            let agent = if round % 2 == 0 { j } else { AGENTS - 1 - j };
            beats.push(Beat {
                agent,
                uptime: if round == 2 && agent % 3 == 0 { 5 } else { 10 * (round as i64 + 1) },
                mode: ["active", "idle", "sleep"][round],
                name: (round == 0).then(|| format!("agent {agent}")),
                metrics: (round != 1)
                    .then(|| json!({"cpu": agent as f64 + 0.5, "mem": {"value": round, "unit": "MB"}})),
            });
        }
    }
    let labels = |b: &Beat| json!({"n": b.agent.to_string()});

    let body: Vec<Value> = beats
        .iter()
        .map(|b| {
            let mut h = json!({"agent_id": format!("http-{}", b.agent), "uptime_seconds": b.uptime,
                               "mode": b.mode, "labels": labels(b), "name": b.name});
            if let Some(m) = &b.metrics {
                h["metrics"] = m.clone();
            }
            h
        })
        .collect();
    let (status, http_answer) = app.heartbeat(&key, json!({"heartbeats": body})).await;
    assert_eq!(status, 200, "{http_answer}");

    let (mut m_idx, mut m_name, mut m_value, mut m_unit) = (vec![], vec![], vec![], vec![]);
    for (k, b) in beats.iter().enumerate() {
        // In name order, as the HTTP path and record_heartbeat put them.
        for (name, value) in b.metrics.as_ref().and_then(Value::as_object).into_iter().flatten() {
            m_idx.push(k as i32 + 1);
            m_name.push(name.clone());
            m_value.push(value.as_f64().or_else(|| value["value"].as_f64()).unwrap());
            m_unit.push(value["unit"].as_str().map(str::to_owned));
        }
    }
    let agent_ids: Vec<String> = beats.iter().map(|b| format!("sql-{}", b.agent)).collect();
    let names: Vec<Option<String>> = beats.iter().map(|b| b.name.clone()).collect();
    let label_values: Vec<Value> = beats.iter().map(labels).collect();
    let modes: Vec<&str> = beats.iter().map(|b| b.mode).collect();
    let statuses = vec!["healthy"; beats.len()];
    let uptimes: Vec<i64> = beats.iter().map(|b| b.uptime).collect();
    let rows = db
        .query(
            "SELECT is_new, restart_detected, next_heartbeat_ms FROM warden.ingest_heartbeats( \
               $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ORDER BY idx",
            &[
                &agent_ids,
                &names,
                &label_values,
                &modes,
                &statuses,
                &uptimes,
                &vec![None::<i32>; beats.len()],
                &vec![None::<chrono::DateTime<chrono::Utc>>; beats.len()],
                &m_idx,
                &m_name,
                &m_value,
                &m_unit,
            ],
        )
        .await
        .unwrap();
    let sql_answer: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({"is_new": r.get::<_, bool>(0), "restart_detected": r.get::<_, bool>(1),
                   "next_heartbeat_ms": r.get::<_, i32>(2)})
        })
        .collect();
    let http_answer: Vec<Value> = http_answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            json!({"is_new": r["is_new"], "restart_detected": r["restart_detected"],
                   "next_heartbeat_ms": r["next_heartbeat_ms"]})
        })
        .collect();
    assert_eq!(sql_answer, http_answer, "the same answers");
    assert_eq!(http_answer.iter().filter(|a| a["restart_detected"] == true).count(), 34);
    assert_eq!(http_answer.iter().filter(|a| a["is_new"] == true).count(), AGENTS / 2);

    for i in 0..AGENTS {
        let (http, sql) = (format!("http-{i}"), format!("sql-{i}"));
        assert_eq!(footprint(&app, &http).await, footprint(&app, &sql).await, "agent {i}");
        let stamps_http = stamps(&app, &http).await;
        assert_eq!(stamps_http, stamps(&app, &sql).await, "agent {i}");
        let rows = stamps_http["heartbeats"].as_array().unwrap();
        let offsets: Vec<f64> = rows.iter().map(|b| b[0].as_f64().unwrap()).collect();
        assert_eq!(offsets, [0.0, 1.0, 2.0], "agent {i}: one round a microsecond: {stamps_http}");
        assert_eq!(stamps_http["metrics"].as_array().unwrap().len(), 4, "agent {i}: {stamps_http}");
    }
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
        ("SELECT warden.record_heartbeat('a', metrics => '{\"cpu\": 1.5e100}')", "metrics"),
        ("SELECT warden.record_heartbeat('a', metrics => '{\"cpu\": {\"value\": -1e200}}')", "metrics"),
        ("SELECT warden.record_heartbeat('a', labels => '{\"k\": 1}')", "labels"),
        // What POST /v1/heartbeats refuses with 422, refused the same way.
        ("SELECT warden.record_heartbeat('a', name => E'ctl\\x01name')", "name"),
        ("SELECT warden.record_heartbeat('a', name => repeat('n', 257))", "name"),
        ("SELECT warden.record_heartbeat('a', labels => '{\"bad key\": \"v\"}')", "labels"),
        ("SELECT warden.record_heartbeat('a', labels => jsonb_build_object('k', repeat('v', 257)))", "labels"),
        ("SELECT warden.record_heartbeat('a', labels => jsonb_build_object('k', E'a\\tb'))", "labels"),
        (
            "SELECT warden.record_heartbeat('a', labels => \
               (SELECT jsonb_object_agg('k' || n, 'v') FROM generate_series(1, 33) n))",
            "labels",
        ),
        (
            "SELECT warden.record_heartbeat('a', metrics => \
               (SELECT jsonb_object_agg('m' || n, 1) FROM generate_series(1, 65) n))",
            "metrics",
        ),
        ("SELECT warden.record_heartbeat('a', metrics => '{\"cpu\": 1e400}')", "metrics"),
        ("SELECT warden.record_heartbeat('a', metrics => '{\"cpu\": {\"value\": 1, \"unit\": 5}}')", "metrics"),
        ("SELECT warden.record_heartbeat('a', metrics => '{\"cpu\": {\"value\": 1, \"unit\": \"\"}}')", "metrics"),
        (
            "SELECT warden.record_heartbeat('a', metrics => jsonb_build_object('cpu', \
               jsonb_build_object('value', 1, 'unit', repeat('u', 33))))",
            "metrics",
        ),
        ("SELECT warden.record_heartbeat('a', sent_at => 'infinity')", "sent_at"),
        ("SELECT warden.record_heartbeat('a', sent_at => now() + interval '1 hour')", "sent_at"),
    ];
    for (sql, column) in cases {
        let err = db.execute(sql, &[]).await.expect_err(sql);
        let db_err = err.as_db_error().expect("a database error");
        assert_eq!(db_err.code(), &SqlState::INVALID_PARAMETER_VALUE, "{sql}");
        assert_eq!(db_err.column(), Some(column), "{sql}: {}", db_err.message());
    }
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status").await, 0);

    // A value below the smallest double is 0, as HTTP parses it; a unit
    // within the rules is kept.
    db.execute(
        "SELECT warden.record_heartbeat('tiny', metrics => '{\"x\": {\"value\": 1e-400, \"unit\": \"ms\"}}')",
        &[],
    )
    .await
    .unwrap();
    let (value, unit): (f64, Option<String>) = db
        .query_one("SELECT value, unit FROM warden.performance_metrics WHERE agent_id = 'tiny'", &[])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((value, unit.as_deref()), (0.0, Some("ms")));
}

/// Each call is received when it is made, not when its transaction began:
/// an agent calling from inside a long transaction is heard from at the
/// call, and a later call in the same transaction is a later heartbeat
/// (one restart is detected once).
#[tokio::test]
async fn a_heartbeat_from_sql_is_received_when_the_call_is_made() {
    let app = TestApp::spawn().await;
    let mut client = app.db.client().await;
    let tx = client.transaction().await.unwrap();
    let began: chrono::DateTime<chrono::Utc> = tx.query_one("SELECT now()", &[]).await.unwrap().get(0);
    let restarts: Vec<bool> = {
        let mut restarts = Vec::new();
        for uptime in [100_i64, 5, 6] {
            let row = tx
                .query_one(
                    "SELECT restart_detected FROM warden.record_heartbeat('in-tx', uptime_seconds => $1)",
                    &[&uptime],
                )
                .await
                .unwrap();
            restarts.push(row.get(0));
        }
        restarts
    };
    tx.commit().await.unwrap();
    assert_eq!(restarts, [false, true, false], "the restart is the second call's alone");
    let client = app.db.client().await;
    let stamps: Vec<chrono::DateTime<chrono::Utc>> = client
        .query("SELECT received_at FROM warden.agent_heartbeats WHERE agent_id = 'in-tx' ORDER BY received_at", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stamps.len(), 3);
    assert!(stamps[0] > began, "received at the call ({}), after the transaction began ({began})", stamps[0]);
    assert!(stamps[0] < stamps[1] && stamps[1] < stamps[2], "{stamps:?}");
    let last_seen: chrono::DateTime<chrono::Utc> = client
        .query_one("SELECT last_seen FROM warden.agent_status WHERE agent_id = 'in-tx'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(last_seen, stamps[2]);
    let events = app.count("SELECT count(*) FROM warden.system_events WHERE event_type = 'agent_restarted'").await;
    assert_eq!(events, 1);
}

/// The limits of [ingest] hold for SQL heartbeats too: warden publishes
/// them where the function reads them.
#[tokio::test]
async fn sql_heartbeats_follow_the_ingest_limits_warden_runs_with() {
    let app = TestApp::spawn_with(|s| s.ingest.max_metrics = 2).await;
    let db = app.db.client().await;
    let three = "SELECT warden.record_heartbeat('lim', metrics => '{\"a\": 1, \"b\": 2, \"c\": 3}')";
    let err = db.execute(three, &[]).await.expect_err("three metrics, two allowed");
    assert!(err.as_db_error().unwrap().message().contains("ingest.max_metrics allows 2"), "{err}");
    db.execute("SELECT warden.record_heartbeat('lim', metrics => '{\"a\": 1, \"b\": 2}')", &[]).await.unwrap();
}

/// The health figures ingest keeps its on-time run by are the ones the
/// evaluator judges with.
#[tokio::test]
async fn ingest_counts_on_time_by_the_thresholds_warden_runs_with() {
    let app = TestApp::spawn_with(|s| {
        s.health.degraded_after_missed = 2;
        s.health.offline_after_missed = 4;
        s.health.jitter_tolerance = 0.3;
    })
    .await;
    let row = app
        .db
        .client()
        .await
        .query_one(
            "SELECT degraded_after_missed, offline_after_missed, jitter_tolerance FROM warden.health_params",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i32>(0), row.get::<_, i32>(1), row.get::<_, f64>(2)), (2, 4, 0.3));
}

/// Two first heartbeats of one agent at once: the one that loses the race
/// to register it is applied as a heartbeat of a known agent, its mode's
/// interval kept (it used to reset a sleeping agent to 30 s).
#[tokio::test]
async fn a_first_heartbeat_that_loses_the_registration_race_is_applied_as_a_later_one() {
    let db = crate::helpers::TestDb::migrated().await;
    let mut first = db.client().await;
    let tx = first.transaction().await.unwrap();
    tx.execute("SELECT warden.record_heartbeat('race', 'sleep', 'healthy', 100)", &[]).await.unwrap();
    let second = {
        let client = db.client().await;
        tokio::spawn(async move {
            client
                .query_one(
                    "SELECT is_new, next_heartbeat_ms FROM warden.record_heartbeat('race', uptime_seconds => 101)",
                    &[],
                )
                .await
                .map(|r| (r.get::<_, bool>(0), r.get::<_, i32>(1)))
        })
    };
    let watcher = db.client().await;
    crate::helpers::eventually(std::time::Duration::from_secs(20), "the second to wait for the first", || async {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%uptime_seconds => 101%'",
                &[],
            )
            .await
            .ok()?
            .get(0);
        (waiting == 1).then_some(())
    })
    .await;
    tx.commit().await.unwrap();
    let (is_new, next_ms) = second.await.unwrap().unwrap();
    assert_eq!((is_new, next_ms), (false, 900_000), "a known sleeping agent's heartbeat");
    let row = watcher
        .query_one(
            "SELECT mode, expected_interval_ms, heartbeat_count, uptime_seconds FROM warden.agent_status WHERE agent_id = 'race'",
            &[],
        )
        .await
        .unwrap();
    let seen: (String, i32, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(seen, ("sleep".to_string(), 900_000, 2, 101));
    let beats: i64 = watcher
        .query_one("SELECT count(*) FROM warden.agent_heartbeats WHERE agent_id = 'race'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(beats, 2);
}
