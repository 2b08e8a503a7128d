//! Heartbeats and events over HTTP: registration, restarts, batches,
//! validation, and what reaches the tables.

use serde_json::{Value, json};
use warden::auth::Scope;
use warden::model::Liveness;

use crate::helpers::TestApp;

async fn app_and_key() -> (TestApp, String) {
    // Some tests check that ingest leaves liveness alone.
    let app = TestApp::spawn_quiet_with(|_| {}).await;
    let key = app.key(&[Scope::Ingest]).await;
    (app, key)
}

#[tokio::test]
async fn the_first_heartbeat_registers_the_agent_with_everything_it_sent() {
    let (app, key) = app_and_key().await;
    let (status, body) = app
        .heartbeat(
            &key,
            json!({
                "agent_id": "worker-1", "name": "Worker One", "mode": "active", "status": "healthy",
                "uptime_seconds": 120, "next_heartbeat_ms": 15000, "sent_at": chrono::Utc::now().to_rfc3339(),
                "metrics": {"cpu": 41.5, "latency": {"value": 12, "unit": "ms"}},
                "labels": {"role": "worker", "region": "eu"}
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"received": true, "is_new": true, "restart_detected": false, "next_heartbeat_ms": 15000}));

    let db = app.db.client().await;
    let row = db
        .query_one(
            "SELECT name, labels, mode, status, expected_interval_ms, uptime_seconds, heartbeat_count, \
                    liveness, first_seen = last_seen, last_sent_at IS NOT NULL \
             FROM warden.agent_status WHERE agent_id = 'worker-1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "Worker One");
    assert_eq!(row.get::<_, Value>(1), json!({"role": "worker", "region": "eu"}));
    assert_eq!(row.get::<_, String>(2), "active");
    assert_eq!(row.get::<_, String>(3), "healthy");
    assert_eq!(row.get::<_, i32>(4), 15000);
    assert_eq!(row.get::<_, i64>(5), 120);
    assert_eq!(row.get::<_, i64>(6), 1);
    assert_eq!(row.get::<_, String>(7), "unknown", "liveness is the evaluator's to decide");
    assert!(row.get::<_, bool>(8) && row.get::<_, bool>(9));

    let metrics = db
        .query(
            "SELECT name, value, unit FROM warden.performance_metrics WHERE agent_id = 'worker-1' ORDER BY name",
            &[],
        )
        .await
        .unwrap();
    let metrics: Vec<(String, f64, Option<String>)> = metrics.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(metrics, vec![("cpu".into(), 41.5, None), ("latency".into(), 12.0, Some("ms".into()))]);

    assert_eq!(app.count("SELECT count(*) FROM warden.agent_heartbeats WHERE agent_id = 'worker-1'").await, 1);
    assert_eq!(
        app.count(
            "SELECT count(*) FROM warden.system_events WHERE agent_id = 'worker-1' AND event_type = 'agent_registered'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn later_heartbeats_update_the_agent_and_keep_what_they_omit() {
    let (app, key) = app_and_key().await;
    app.heartbeat(&key, json!({"agent_id": "a", "name": "A", "labels": {"team": "x"}, "mode": "idle"})).await;
    let (status, body) = app.heartbeat(&key, json!({"agent_id": "a", "status": "degraded"})).await;
    assert_eq!(status, 200);
    assert_eq!(body["is_new"], false);
    let db = app.db.client().await;
    let row = db
        .query_one(
            "SELECT name, labels, mode, status, heartbeat_count FROM warden.agent_status WHERE agent_id = 'a'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "A", "name kept");
    assert_eq!(row.get::<_, Value>(1), json!({"team": "x"}), "labels kept");
    assert_eq!(row.get::<_, String>(2), "idle", "mode kept");
    assert_eq!(row.get::<_, String>(3), "degraded");
    assert_eq!(row.get::<_, i64>(4), 2);
}

#[tokio::test]
async fn next_heartbeat_ms_is_the_agents_own_else_its_modes_else_the_default() {
    let app = TestApp::spawn_with(|s| s.health.modes.idle = warden::config::Duration::from_secs(7)).await;
    let key = app.key(&[Scope::Ingest]).await;
    let cases = [
        (json!({"agent_id": "own", "mode": "sleep", "next_heartbeat_ms": 2500}), 2500),
        (json!({"agent_id": "emergency", "mode": "emergency"}), 5000),
        (json!({"agent_id": "sleepy", "mode": "sleep"}), 900_000),
        (json!({"agent_id": "idle", "mode": "idle"}), 7000),
        (json!({"agent_id": "plain"}), 30_000),
    ];
    for (body, expected) in cases {
        let (status, answer) = app.heartbeat(&key, body.clone()).await;
        assert_eq!(status, 200);
        assert_eq!(answer["next_heartbeat_ms"], expected, "{body}");
    }
    // A mode named earlier still applies when a later heartbeat omits it.
    let (_, answer) = app.heartbeat(&key, json!({"agent_id": "idle"})).await;
    assert_eq!(answer["next_heartbeat_ms"], 7000);
}

#[tokio::test]
async fn uptime_going_down_is_a_restart() {
    let (app, key) = app_and_key().await;
    app.heartbeat(&key, json!({"agent_id": "r", "uptime_seconds": 500})).await;
    let (_, same) = app.heartbeat(&key, json!({"agent_id": "r", "uptime_seconds": 530})).await;
    assert_eq!(same["restart_detected"], false);
    let (_, restarted) = app.heartbeat(&key, json!({"agent_id": "r", "uptime_seconds": 3})).await;
    assert_eq!(restarted["restart_detected"], true);

    let db = app.db.client().await;
    let event = db
        .query_one(
            "SELECT severity, details FROM warden.system_events WHERE agent_id = 'r' AND event_type = 'agent_restarted'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(event.get::<_, Value>(1), json!({"previous_uptime_seconds": 530, "uptime_seconds": 3}));
    assert_eq!(app.count("SELECT restart_count FROM warden.agent_status WHERE agent_id = 'r'").await, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM warden.agent_heartbeats WHERE agent_id = 'r' AND restart_detected").await,
        1
    );
}

/// An RFC 3339 time `secs` seconds from `base`, in whole seconds (the
/// tables keep microseconds).
fn at(base: chrono::DateTime<chrono::Utc>, secs: i64) -> String {
    chrono::DateTime::from_timestamp(base.timestamp() + secs, 0).unwrap().to_rfc3339()
}

#[tokio::test]
async fn a_heartbeat_delivered_after_a_newer_one_is_late_not_a_restart() {
    // A stalled request overtaken by the agent's next heartbeat commits
    // second: its lower uptime is old news, not a restart.
    let (app, key) = app_and_key().await;
    let t0 = chrono::Utc::now() - chrono::Duration::seconds(120);
    let hb = |uptime: i64, sent: i64| json!({"agent_id": "l", "uptime_seconds": uptime, "sent_at": at(t0, sent)});
    app.heartbeat(
        &key,
        json!({"agent_id": "l", "name": "L", "mode": "active", "labels": {"v": "2"},
                               "uptime_seconds": 100, "sent_at": at(t0, 0)}),
    )
    .await;
    let (_, newer) = app.heartbeat(&key, hb(130, 30)).await;
    assert_eq!(newer["restart_detected"], false);
    let db = app.db.client().await;
    let seen_before: chrono::DateTime<chrono::Utc> =
        db.query_one("SELECT last_seen FROM warden.agent_status WHERE agent_id = 'l'", &[]).await.unwrap().get(0);

    let (status, late) = app
        .heartbeat(
            &key,
            json!({"agent_id": "l", "uptime_seconds": 110, "sent_at": at(t0, 10), "status": "error",
                   "mode": "sleep", "name": "stale", "labels": {"v": "1"}}),
        )
        .await;
    assert_eq!(status, 200, "{late}");
    assert_eq!(
        late,
        json!({"received": true, "is_new": false, "restart_detected": false, "next_heartbeat_ms": 30000}),
        "late, and the interval expected stays the active mode's"
    );
    let row = db
        .query_one(
            "SELECT uptime_seconds, status, mode, name, labels, expected_interval_ms, restart_count, \
                    heartbeat_count, last_sent_at = $1::text::timestamptz, last_seen > $2 \
             FROM warden.agent_status WHERE agent_id = 'l'",
            &[&at(t0, 30), &seen_before],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 130, "uptime kept from the newer heartbeat");
    assert_eq!(row.get::<_, String>(1), "healthy", "status kept");
    assert_eq!(row.get::<_, String>(2), "active", "mode kept");
    assert_eq!(row.get::<_, String>(3), "L", "name kept");
    assert_eq!(row.get::<_, Value>(4), json!({"v": "2"}), "labels kept");
    assert_eq!(row.get::<_, i32>(5), 30000);
    assert_eq!(row.get::<_, i64>(6), 0, "no restart counted");
    assert_eq!(row.get::<_, i64>(7), 3, "but the heartbeat is counted");
    assert!(row.get::<_, bool>(8), "last_sent_at kept from the newer heartbeat");
    assert!(row.get::<_, bool>(9), "having arrived, it keeps the agent seen");
    let stored = db
        .query_one(
            "SELECT status, mode, restart_detected FROM warden.agent_heartbeats \
             WHERE agent_id = 'l' AND uptime_seconds = 110",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (stored.get::<_, String>(0), stored.get::<_, String>(1), stored.get::<_, bool>(2)),
        ("error".into(), "sleep".into(), false),
        "stored as sent"
    );

    // The next heartbeat compares with the newest, and a real restart is
    // still one.
    let (_, next) = app.heartbeat(&key, hb(160, 60)).await;
    assert_eq!(next["restart_detected"], false);
    let (_, restarted) = app.heartbeat(&key, hb(2, 62)).await;
    assert_eq!(restarted["restart_detected"], true);
    assert_eq!(
        app.count("SELECT count(*) FROM warden.system_events WHERE agent_id = 'l' AND event_type = 'agent_restarted'")
            .await,
        1
    );
    assert_eq!(app.count("SELECT restart_count FROM warden.agent_status WHERE agent_id = 'l'").await, 1);

    // In one batch too: the second heartbeat was sent before the first.
    let (status, body) = app.heartbeat(&key, json!({"heartbeats": [hb(40, 100), hb(20, 80)]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][1]["restart_detected"], false);
    assert_eq!(app.count("SELECT uptime_seconds FROM warden.agent_status WHERE agent_id = 'l'").await, 40);
}

#[tokio::test]
async fn a_heartbeat_from_before_a_restart_delivered_after_it_is_late() {
    // Requests held up together (a stalled database) commit in any order:
    // one the agent sent before it crashed may come after the restarted
    // agent's first heartbeat.
    let (app, key) = app_and_key().await;
    let t0 = chrono::Utc::now() - chrono::Duration::seconds(120);
    let hb = |uptime: i64, sent: i64| json!({"agent_id": "e", "uptime_seconds": uptime, "sent_at": at(t0, sent)});
    app.heartbeat(&key, hb(500, 0)).await;
    let (_, restarted) = app.heartbeat(&key, hb(3, 40)).await;
    assert_eq!(restarted["restart_detected"], true);
    // Sent by the run before, 17 s before the new run began.
    let (_, stale) = app.heartbeat(&key, hb(520, 20)).await;
    assert_eq!(stale["restart_detected"], false);
    assert_eq!(app.count("SELECT uptime_seconds FROM warden.agent_status WHERE agent_id = 'e'").await, 3);
    let (_, next) = app.heartbeat(&key, hb(33, 70)).await;
    assert_eq!(next["restart_detected"], false, "no second restart");
    assert_eq!(app.count("SELECT restart_count FROM warden.agent_status WHERE agent_id = 'e'").await, 1);
    assert_eq!(app.count("SELECT heartbeat_count FROM warden.agent_status WHERE agent_id = 'e'").await, 4);
}

#[tokio::test]
async fn a_clock_set_back_hides_neither_a_restart_nor_what_the_agent_reports() {
    let (app, key) = app_and_key().await;
    let now = chrono::Utc::now();
    app.heartbeat(&key, json!({"agent_id": "c", "uptime_seconds": 3600, "sent_at": at(now, 0)})).await;
    // Within one run, the clock goes back two minutes: uptime still rises,
    // and what the heartbeat says applies.
    let (_, same_run) = app
        .heartbeat(&key, json!({"agent_id": "c", "uptime_seconds": 3630, "sent_at": at(now, -90), "status": "error"}))
        .await;
    assert_eq!(same_run["restart_detected"], false);
    assert_eq!(app.count("SELECT uptime_seconds FROM warden.agent_status WHERE agent_id = 'c'").await, 3630);
    // Then the agent restarts: its clock reads earlier still, but its run
    // began an hour after the last one's.
    let (_, restarted) =
        app.heartbeat(&key, json!({"agent_id": "c", "uptime_seconds": 5, "sent_at": at(now, -120)})).await;
    assert_eq!(restarted["restart_detected"], true);
    let db = app.db.client().await;
    let row = db
        .query_one("SELECT status, restart_count, uptime_seconds FROM warden.agent_status WHERE agent_id = 'c'", &[])
        .await
        .unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, i64>(1), row.get::<_, i64>(2)), ("healthy".into(), 1, 5));
}

#[tokio::test]
async fn a_batch_applies_one_agents_heartbeats_in_order() {
    let (app, key) = app_and_key().await;
    let (status, body) = app
        .heartbeat(
            &key,
            json!({"heartbeats": [
                {"agent_id": "b", "uptime_seconds": 10},
                {"agent_id": "c", "uptime_seconds": 1},
                {"agent_id": "b", "uptime_seconds": 20},
                {"agent_id": "b", "uptime_seconds": 5},
                {"agent_id": "b"},
                {"agent_id": "b", "uptime_seconds": 4, "name": "last"}
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["received"], 6);
    let results = body["results"].as_array().unwrap();
    let flags: Vec<(&str, bool, bool)> = results
        .iter()
        .map(|r| {
            (r["agent_id"].as_str().unwrap(), r["is_new"].as_bool().unwrap(), r["restart_detected"].as_bool().unwrap())
        })
        .collect();
    assert_eq!(
        flags,
        vec![
            ("b", true, false),
            ("c", true, false),
            ("b", false, false),
            ("b", false, true),
            ("b", false, false),
            ("b", false, true)
        ],
        "restarts at 20→5 and at 5→(none)→4"
    );
    assert_eq!(app.count("SELECT heartbeat_count FROM warden.agent_status WHERE agent_id = 'b'").await, 5);
    assert_eq!(app.count("SELECT restart_count FROM warden.agent_status WHERE agent_id = 'b'").await, 2);
    assert_eq!(app.count("SELECT uptime_seconds FROM warden.agent_status WHERE agent_id = 'b'").await, 4);
}

#[tokio::test]
async fn metrics_stay_with_their_own_heartbeat_in_an_unsorted_batch() {
    // The writer reorders a batch by agent_id on its way to PostgreSQL.
    let (app, key) = app_and_key().await;
    let (status, body) = app
        .heartbeat(
            &key,
            json!({"heartbeats": [
                {"agent_id": "zulu", "metrics": {"queue": 26}},
                {"agent_id": "alpha", "metrics": {"queue": 1, "lag": {"value": 11, "unit": "ms"}}},
                {"agent_id": "mike", "metrics": {"queue": 13}},
                {"agent_id": "alpha", "metrics": {"queue": 2}}
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let rows = app
        .db
        .client()
        .await
        .query(
            "SELECT agent_id, name, value, unit FROM warden.performance_metrics ORDER BY agent_id, recorded_at, name, value",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String, f64, Option<String>)> =
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    let m = |agent: &str, name: &str, value: f64, unit: Option<&str>| {
        (agent.to_string(), name.to_string(), value, unit.map(str::to_string))
    };
    assert_eq!(
        got,
        vec![
            m("alpha", "lag", 11.0, Some("ms")),
            m("alpha", "queue", 1.0, None),
            m("alpha", "queue", 2.0, None),
            m("mike", "queue", 13.0, None),
            m("zulu", "queue", 26.0, None),
        ]
    );
}

/// Every bad request: its status, the field it names, and nothing written.
#[tokio::test]
async fn bad_heartbeats_are_refused_naming_the_field_and_write_nothing() {
    let app = TestApp::spawn_with(|s| s.ingest.max_batch = 3).await;
    let key = app.key(&[Scope::Ingest]).await;
    let future = (chrono::Utc::now() + chrono::Duration::minutes(10)).to_rfc3339();
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({}), 422, "agent_id"),
        (json!({"agent_id": ""}), 422, "agent_id"),
        (json!({"agent_id": "x".repeat(129)}), 422, "agent_id"),
        (json!({"agent_id": "bad id"}), 422, "agent_id"),
        (json!({"agent_id": "a", "mode": "asleep"}), 422, "mode"),
        (json!({"agent_id": "a", "status": "fine"}), 422, "status"),
        (json!({"agent_id": "a", "uptime_seconds": -5}), 422, "uptime_seconds"),
        (json!({"agent_id": "a", "next_heartbeat_ms": 0}), 422, "next_heartbeat_ms"),
        (json!({"agent_id": "a", "sent_at": "not a time"}), 422, "sent_at"),
        (json!({"agent_id": "a", "sent_at": future}), 422, "sent_at"),
        (json!({"agent_id": "a", "metrics": {"cpu": "high"}}), 422, "metrics.cpu"),
        (json!({"agent_id": "a", "metrics": {"cpu": 1e308}}), 422, "metrics.cpu"),
        (json!({"agent_id": "a", "metrics": {"lat": {"value": 1, "unit": "m\u{0}s"}}}), 422, "metrics.lat.unit"),
        (json!({"agent_id": "a", "labels": {"k": 1}}), 422, "labels.k"),
        (json!({"heartbeats": []}), 422, "heartbeats"),
        (
            json!({"heartbeats": [{"agent_id": "a"}, {"agent_id": "a"}, {"agent_id": "a"}, {"agent_id": "a"}]}),
            422,
            "heartbeats",
        ),
        (json!({"heartbeats": [{"agent_id": "ok"}, {"agent_id": "ok2", "mode": "x"}]}), 422, "heartbeats[1].mode"),
    ];
    for (body, status, field) in cases {
        let response = app.post("/v1/heartbeats", &key, &body).await;
        assert_eq!(response.status().as_u16(), status, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["field"], field, "{body}: {error}");
        assert_eq!(error["error"]["code"], "invalid_value");
        assert!(!error["error"]["message"].as_str().unwrap().is_empty());
    }
    // Bodies that are not JSON objects at all.
    for raw in ["{not json", "", "[1,2]", r#"{"agent_id":"a","metrics":{"cpu":NaN}}"#] {
        let response = app.post_raw("/v1/heartbeats", &key, raw.to_string()).await;
        let code = response.status().as_u16();
        let error: Value = response.json().await.unwrap();
        if raw.contains("NaN") {
            assert_eq!((code, error["error"]["field"].as_str()), (422, Some("metrics.cpu")), "{error}");
        } else {
            assert_eq!(code, 400, "{raw:?}: {error}");
            assert_eq!(error["error"]["code"], "malformed_request");
        }
    }
    for table in ["agent_status", "agent_heartbeats", "performance_metrics", "system_events"] {
        assert_eq!(app.count(&format!("SELECT count(*) FROM warden.{table}")).await, 0, "{table} must stay empty");
    }
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let app = TestApp::spawn_with(|s| s.ingest.max_body_bytes = 2048).await;
    let key = app.key(&[Scope::Ingest]).await;
    let big = json!({"agent_id": "a", "name": "n".repeat(4000)});
    let response = app.post("/v1/heartbeats", &key, &big).await;
    assert_eq!(response.status(), 413);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "payload_too_large");
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status").await, 0);
}

#[tokio::test]
async fn writes_need_a_valid_key_with_the_ingest_scope() {
    let app = TestApp::spawn_with(|s| s.auth.cache_ttl = warden::config::Duration::from_millis(0)).await;
    let body = json!({"agent_id": "a"});

    let anonymous = app.http.post(app.url("/v1/heartbeats")).json(&body).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    let error: Value = anonymous.json().await.unwrap();
    assert_eq!(error["error"]["code"], "unauthorized");

    let (_, made_up) = warden::auth::generate();
    assert_eq!(app.heartbeat(&made_up, body.clone()).await.0, 401);
    assert_eq!(app.heartbeat("wdn_garbage", body.clone()).await.0, 401);

    let read_only = app.key(&[Scope::Read]).await;
    let (status, error) = app.heartbeat(&read_only, body.clone()).await;
    assert_eq!(status, 403);
    assert!(error["error"]["message"].as_str().unwrap().contains("ingest"));

    let admin = app.key(&[Scope::Admin]).await;
    assert_eq!(app.heartbeat(&admin, body.clone()).await.0, 200, "admin implies ingest");

    let ingest = app.key(&[Scope::Ingest]).await;
    assert_eq!(app.heartbeat(&ingest, body.clone()).await.0, 200);
    // The scheme's name in any case, as HTTP has it.
    let shouted = app
        .http
        .post(app.url("/v1/heartbeats"))
        .header("authorization", format!("BEARER {ingest}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(shouted.status(), 200);
    let key_id = warden::auth::key_id_of(&ingest).unwrap().to_string();
    assert!(warden::auth::revoke_key(&app.db.client().await, &key_id).await.unwrap());
    assert_eq!(app.heartbeat(&ingest, body.clone()).await.0, 401, "a revoked key stops working");

    // A key that differs from a real one only in its secret is refused.
    let forged = format!("{}{}", &admin[..admin.len() - 1], if admin.ends_with('0') { '1' } else { '0' });
    assert_eq!(app.heartbeat(&forged, body).await.0, 401);
    assert_eq!(app.count("SELECT heartbeat_count FROM warden.agent_status").await, 3);
}

/// A key made by `warden keys create --agent` reports for the agents its
/// patterns match and no other: a batch naming one other agent is refused
/// whole, with the field that named it.
#[tokio::test]
async fn a_key_limited_to_some_agents_reports_for_those_only() {
    let app = TestApp::spawn().await;
    let create = |args: &[&str]| {
        crate::procs::warden()
            .args(["keys", "create", "--name", "web tier"])
            .args(args)
            .env("WARDEN__DATABASE__URL", app.db.url())
            .output()
            .unwrap()
    };
    let out = create(&["--agent", "*"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--agent"), "{}", String::from_utf8_lossy(&out.stderr));
    // A read key reports nothing: an agent limit on it would limit nothing.
    let out = create(&["--scope", "read", "--agent", "web-*"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--scope ingest"), "{out:?}");
    assert_eq!(app.count("SELECT count(*) FROM warden.api_keys").await, 0);
    let out = create(&["--agent", "web-*,db-1", "--agent", "db-1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let stored: Vec<String> =
        app.db.client().await.query_one("SELECT agents FROM warden.api_keys", &[]).await.unwrap().get(0);
    assert_eq!(stored, ["db-1", "web-*"]);
    // Rows written by hand are held to the same form.
    for bad in ["{*}", "{\"\"}", "{w*b}", "{a,NULL}"] {
        let sql = format!("UPDATE warden.api_keys SET agents = '{bad}'");
        let refused = app.db.client().await.batch_execute(&sql).await;
        assert!(refused.is_err(), "{bad} was accepted");
    }
    let list =
        crate::procs::warden().args(["keys", "list"]).env("WARDEN__DATABASE__URL", app.db.url()).output().unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains("db-1,web-*"), "{}", String::from_utf8_lossy(&list.stdout));

    assert_eq!(app.heartbeat(&key, json!({"agent_id": "web-1"})).await.0, 200);
    assert_eq!(app.heartbeat(&key, json!({"agent_id": "db-1"})).await.0, 200);
    let (status, error) = app.heartbeat(&key, json!({"agent_id": "db-10"})).await;
    assert_eq!(status, 403);
    assert_eq!(error["error"]["code"], "forbidden");
    assert_eq!(error["error"]["field"], "agent_id");
    assert!(error["error"]["message"].as_str().unwrap().contains("`db-10`"), "{error}");
    let batch = json!({"heartbeats": [{"agent_id": "web-2"}, {"agent_id": "db-1"}, {"agent_id": "mail-1"}]});
    let (status, error) = app.heartbeat(&key, batch).await;
    assert_eq!(status, 403);
    assert_eq!(error["error"]["field"], "heartbeats[2].agent_id");
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status").await, 2, "web-2 was not written either");
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_heartbeats").await, 2);

    // Events are held to the same agents, even for an agent that exists.
    let unlimited = app.key(&[Scope::Ingest]).await;
    assert_eq!(app.heartbeat(&unlimited, json!({"agent_id": "mail-1"})).await.0, 200);
    let event =
        |agent: &str| json!({"agent_id": agent, "event_type": "task_failed", "severity": "warning", "message": "m"});
    let response = app.post("/v1/events", &key, &json!({"events": [event("web-1"), event("mail-1")]})).await;
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-content-type-options"], "nosniff", "API answers are never sniffed");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["field"], "events[1].agent_id");
    assert_eq!(app.count("SELECT count(*) FROM warden.system_events WHERE source = 'agent'").await, 0);
    assert_eq!(app.post("/v1/events", &key, &event("web-1")).await.status(), 201);
    assert_eq!(app.post("/v1/events", &unlimited, &event("mail-1")).await.status(), 201);
}

#[tokio::test]
async fn with_auth_disabled_heartbeats_need_no_key() {
    let app = TestApp::spawn_with(|s| s.auth.enabled = false).await;
    let response = app.http.post(app.url("/v1/heartbeats")).json(&json!({"agent_id": "a"})).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn events_are_recorded_for_known_agents_only() {
    let (app, key) = app_and_key().await;
    app.heartbeat(&key, json!({"agent_id": "e1"})).await;
    let response = app
        .post(
            "/v1/events",
            &key,
            &json!({"agent_id": "e1", "event_type": "task_failed", "severity": "warning",
                    "message": "task 7 failed", "details": {"task": 7}}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    let id = body["id"].as_i64().unwrap();
    let db = app.db.client().await;
    let row = db
        .query_one(
            "SELECT agent_id, event_type, severity, message, details, source FROM warden.system_events WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(1), "task_failed");
    assert_eq!(row.get::<_, String>(2), "warning");
    assert_eq!(row.get::<_, Value>(4), json!({"task": 7}));
    assert_eq!(row.get::<_, String>(5), "agent");

    let response = app
        .post(
            "/v1/events",
            &key,
            &json!({"events": [
                {"agent_id": "e1", "event_type": "note", "message": "fine"},
                {"agent_id": "ghost", "event_type": "note", "message": "who?"}
            ]}),
        )
        .await;
    assert_eq!(response.status(), 422);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["field"], "events[1].agent_id");
    assert_eq!(
        app.count("SELECT count(*) FROM warden.system_events WHERE source = 'agent'").await,
        1,
        "nothing of the batch"
    );

    let response = app
        .post("/v1/events", &key, &json!({"agent_id": "e1", "event_type": "x", "severity": "dire", "message": "m"}))
        .await;
    assert_eq!(response.status(), 422);
}

#[tokio::test]
async fn concurrent_requests_are_all_committed_and_counted() {
    let (app, key) = app_and_key().await;
    let app = std::sync::Arc::new(app);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let app = app.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({"agent_id": format!("agent-{}", i % 20), "metrics": {"n": i}});
            app.heartbeat(&key, body).await.0
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status").await, 20);
    assert_eq!(app.count("SELECT sum(heartbeat_count)::bigint FROM warden.agent_status").await, 200);
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_heartbeats").await, 200);
    assert_eq!(app.count("SELECT count(*) FROM warden.performance_metrics").await, 200);
}

#[tokio::test]
async fn a_deep_queue_shared_by_two_writers_keeps_each_batch_whole_and_in_order() {
    // Batches deep enough for the second writer to take a share; each
    // request holds ten heartbeats of each of its agents (ten rounds), with
    // uptime rising except for one restart in the middle.
    let app = TestApp::spawn_with(|s| s.ingest.writers = 2).await;
    let key = app.key(&[Scope::Ingest]).await;
    let app = std::sync::Arc::new(app);
    let mut tasks = Vec::new();
    for r in 0..8 {
        let (app, key) = (app.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let heartbeats: Vec<Value> = (0..10)
                .flat_map(|k| {
                    (0..100).map(move |a| {
                        let uptime = if k < 5 { 100 + k } else { k };
                        json!({"agent_id": format!("deep-{r}-{a}"), "uptime_seconds": uptime})
                    })
                })
                .collect();
            let response = app.post("/v1/heartbeats", &key, &json!({ "heartbeats": heartbeats })).await;
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            (status, body)
        }));
    }
    for task in tasks {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 200, "{body}");
        let restarts: Vec<usize> = body["results"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .filter(|(_, r)| r["restart_detected"] == true)
            .map(|(i, _)| i / 100)
            .collect();
        assert_eq!(restarts, vec![5; 100], "each agent restarts at its sixth heartbeat, and only there");
    }
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_heartbeats").await, 8000);
    assert_eq!(
        app.count("SELECT count(*) FROM warden.agent_status WHERE heartbeat_count = 10 AND restart_count = 1 AND uptime_seconds = 9")
            .await,
        800
    );
}

#[tokio::test]
async fn a_full_queue_answers_503_at_once_and_loses_nothing() {
    // (The evaluator, which also locks agents' rows, stays quiet.)
    let app = TestApp::spawn_quiet_with(|s| {
        s.ingest.max_batch = 1;
        s.ingest.queue_capacity = 1;
        s.ingest.writers = 1;
    })
    .await;
    let key = app.key(&[Scope::Ingest]).await;
    app.heartbeat(&key, json!({"agent_id": "held"})).await;

    // Hold the agent's row so the writer blocks on it with one heartbeat queued.
    let mut blocker = app.db.client().await;
    let tx = blocker.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM warden.agent_status WHERE agent_id = 'held' FOR UPDATE", &[]).await.unwrap();

    let app = std::sync::Arc::new(app);
    let first = {
        let (app, key) = (app.clone(), key.clone());
        tokio::spawn(async move { app.heartbeat(&key, json!({"agent_id": "held"})).await })
    };
    crate::helpers::eventually(std::time::Duration::from_secs(20), "the writer to wait on the row lock", || async {
        (app.db.ingest_writes_waiting_on_locks().await > 0).then_some(())
    })
    .await;
    let refused = app.post("/v1/heartbeats", &key, &json!({"agent_id": "other"})).await;
    assert_eq!(refused.status(), 503, "the queue holds one heartbeat and it is taken");
    assert_eq!(refused.headers()["retry-after"], "1");

    tx.rollback().await.unwrap();
    let (status, _) = first.await.unwrap();
    assert_eq!(status, 200, "the queued heartbeat is written once the row is free");
    assert_eq!(app.count("SELECT heartbeat_count FROM warden.agent_status WHERE agent_id = 'held'").await, 2);
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status WHERE agent_id = 'other'").await, 0);
}

#[tokio::test]
async fn agents_turned_away_at_capacity_are_not_taken_offline_for_it() {
    let app = TestApp::spawn_quiet_with(|s| {
        s.ingest.max_batch = 1;
        s.ingest.queue_capacity = 1;
        s.ingest.writers = 1;
    })
    .await;
    let key = app.key(&[Scope::Ingest]).await;
    for agent in ["held", "turned", "silent"] {
        app.heartbeat(&key, json!({"agent_id": agent, "next_heartbeat_ms": 30_000})).await;
    }
    app.liveness_cycle(None).await;
    // Both last stored a heartbeat ten minutes ago (twenty intervals), and
    // warden has been evaluating for longer (no fresh grace since start).
    app.db
        .client()
        .await
        .batch_execute(
            "UPDATE warden.agent_status SET last_seen = last_seen - interval '10 minutes' \
             WHERE agent_id IN ('turned', 'silent'); \
             UPDATE warden.evaluator_state SET resumed_at = resumed_at - interval '1 hour';",
        )
        .await
        .unwrap();

    // The writer waits on a locked row with the queue's one heartbeat.
    let mut blocker = app.db.client().await;
    let tx = blocker.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM warden.agent_status WHERE agent_id = 'held' FOR UPDATE", &[]).await.unwrap();
    let app = std::sync::Arc::new(app);
    let first = {
        let (app, key) = (app.clone(), key.clone());
        tokio::spawn(async move { app.heartbeat(&key, json!({"agent_id": "held"})).await })
    };
    crate::helpers::eventually(std::time::Duration::from_secs(20), "the writer to wait on the row lock", || async {
        (app.db.ingest_writes_waiting_on_locks().await > 0).then_some(())
    })
    .await;
    for agent in ["turned", "stranger"] {
        let refused = app.post("/v1/heartbeats", &key, &json!({"agent_id": agent})).await;
        assert_eq!(refused.status(), 503, "{agent}: the queue is full");
    }
    let refused_at =
        crate::helpers::eventually(std::time::Duration::from_secs(20), "the refusal to be recorded", || async {
            let client = app.db.client().await;
            let row = client
                .query_opt("SELECT refused_at FROM warden.ingest_refusals WHERE agent_id = 'turned'", &[])
                .await
                .unwrap()?;
            Some(row.get::<_, chrono::DateTime<chrono::Utc>>(0))
        })
        .await;
    assert_eq!(
        app.count("SELECT count(*) FROM warden.ingest_refusals").await,
        1,
        "an unknown agent's refusal has no silence to hold back"
    );

    // Judged a second after the refusal: the agent turned away was heard
    // from then; the one that sent nothing has been silent ten minutes.
    let report = app.liveness_cycle(Some(refused_at + chrono::Duration::seconds(1))).await;
    let changed: Vec<(String, Liveness)> = report.transitions.iter().map(|(id, _, to)| (id.clone(), *to)).collect();
    assert_eq!(changed, vec![("silent".to_string(), Liveness::Offline)]);

    tx.rollback().await.unwrap();
    assert_eq!(first.await.unwrap().0, 200);
    // Its silence still counts from the refusal (cycles less than the
    // evaluator's gap limit apart, or it would grant a fresh grace).
    app.liveness_cycle(Some(refused_at + chrono::Duration::seconds(20))).await;
    let report = app.liveness_cycle(Some(refused_at + chrono::Duration::seconds(40))).await;
    assert!(
        report.transitions.iter().any(|(id, _, to)| id == "turned" && *to == Liveness::Degraded),
        "{:?}",
        report.transitions
    );
    // Its incident says the same, and time to detect counts from then.
    let row = app
        .db
        .client()
        .await
        .query_one(
            "SELECT i.summary, (i.details->>'silent_seconds')::float8, t.detect_seconds \
             FROM warden.incidents i JOIN warden.incident_timings t ON t.incident_id = i.id \
             WHERE i.agent_id = 'turned' AND i.issue_type = 'heartbeat_late'",
            &[],
        )
        .await
        .unwrap();
    let (summary, silent, detect): (String, f64, f64) = (row.get(0), row.get(1), row.get(2));
    assert!(summary.contains("no heartbeat for 40s"), "{summary}");
    assert_eq!((silent, detect), (40.0, 40.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_held_up_by_locks_get_503_and_are_not_stored_later() {
    // Locked rows make every write run into the statement timeout: each
    // request is answered 503 with Retry-After (retry later, nothing
    // stored), and no request is written after its answer. Splitting a
    // timed-out group into single writes used to answer 500 and go on
    // storing heartbeats whose clients had already been told otherwise.
    let app = TestApp::spawn_quiet_with(|s| {
        s.database.statement_timeout = warden::config::Duration::from_secs(1);
        s.server.request_timeout = warden::config::Duration::from_secs(5);
        s.ingest.writers = 1;
    })
    .await;
    let key = app.key(&[Scope::Ingest]).await;
    let agents: Vec<String> = (0..20).map(|i| format!("busy-{i}")).collect();
    for agent in &agents {
        assert_eq!(app.heartbeat(&key, json!({"agent_id": agent})).await.0, 200);
    }
    let mut blocker = app.db.client().await;
    let tx = blocker.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM warden.agent_status WHERE agent_id LIKE 'busy-%' FOR UPDATE", &[]).await.unwrap();

    let app = std::sync::Arc::new(app);
    let sends = agents.iter().map(|agent| {
        let (app, key, agent) = (app.clone(), key.clone(), agent.clone());
        tokio::spawn(async move {
            let response = app.post("/v1/heartbeats", &key, &json!({"agent_id": agent})).await;
            let retry_after = response.headers().contains_key("retry-after");
            (response.status().as_u16(), retry_after)
        })
    });
    for answer in futures_util::future::join_all(sends).await {
        assert_eq!(answer.unwrap(), (503, true));
    }
    // Nothing still waits to be written when the rows are let go.
    crate::helpers::eventually(
        std::time::Duration::from_secs(60),
        "the writer to stop waiting on the rows",
        || async { (app.db.ingest_writes_waiting_on_locks().await == 0).then_some(()) },
    )
    .await;
    tx.rollback().await.unwrap();
    // A heartbeat that gets through afterwards shows the writer is free.
    assert_eq!(app.heartbeat(&key, json!({"agent_id": "after"})).await.0, 200);
    assert_eq!(
        app.count("SELECT sum(heartbeat_count)::bigint FROM warden.agent_status WHERE agent_id LIKE 'busy-%'").await,
        20,
        "only the heartbeats answered 200 are stored"
    );
}

#[tokio::test]
async fn a_vanished_database_gets_503_with_retry_after() {
    let (app, key) = app_and_key().await;
    assert_eq!(app.heartbeat(&key, json!({"agent_id": "a"})).await.0, 200);
    app.db.drop_now().await;
    let response = app.post("/v1/heartbeats", &key, &json!({"agent_id": "a"})).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn requests_that_arrive_together_share_one_key_lookup() {
    // An expired or missing cache entry used to send every request in
    // flight to the database at once, each on a pooled connection of its
    // own.
    let db = crate::helpers::TestDb::migrated().await;
    let mut settings = crate::helpers::default_settings();
    settings.database.url = warden::config::Secret::new(db.url());
    let database = warden::db::Database::open(&settings.database).await.unwrap();
    let auth = std::sync::Arc::new(warden::auth::Authenticator::new(
        database.pool.clone(),
        true,
        std::time::Duration::from_secs(60),
    ));
    let token = warden::auth::create_key(&db.client().await, "shared", &[Scope::Ingest]).await.unwrap().token;

    let together = |header: String| {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let (auth, header) = (auth.clone(), header.clone());
            tasks.spawn(async move { auth.authenticate(Some(&header), Scope::Ingest).await.is_ok() });
        }
        tasks.join_all()
    };
    let admitted = together(format!("Bearer {token}")).await;
    assert!(admitted.iter().all(|ok| *ok));
    assert_eq!(auth.lookups(), 1, "one lookup for 32 requests");

    let made_up = format!("Bearer {}", token.replace(&token[token.len() - 4..], "0000"));
    let unknown = format!("Bearer {}", warden::auth::generate().1);
    assert!(together(made_up).await.iter().all(|ok| !ok), "a wrong secret for a known id, from the cache");
    assert_eq!(auth.lookups(), 1);
    assert!(together(unknown).await.iter().all(|ok| !ok));
    assert_eq!(auth.lookups(), 2, "one lookup for 32 requests with an unknown key");
    database.close().await;
}

/// A heartbeat refused because the database could not write it now (its
/// agent's row locked past the statement timeout) came from a live agent:
/// it is noted as a refusal, as one refused at capacity is, so that the
/// agent is not judged silent for warden's trouble.
#[tokio::test]
async fn a_heartbeat_refused_for_a_lock_counts_as_a_sign_of_life() {
    let app = TestApp::spawn_with(|s| s.database.statement_timeout = warden::config::Duration::from_secs(1)).await;
    let key = app.key(&[Scope::Ingest]).await;
    assert_eq!(app.heartbeat(&key, json!({"agent_id": "stuck"})).await.0, 200);
    let mut blocker = app.db.client().await;
    let tx = blocker.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM warden.agent_status WHERE agent_id = 'stuck' FOR UPDATE", &[]).await.unwrap();
    let refused = app.post("/v1/heartbeats", &key, &json!({"agent_id": "stuck"})).await;
    assert_eq!(refused.status(), 503);
    // Recorded once the row is free (the refusal's own write waits on it).
    tx.rollback().await.unwrap();
    crate::helpers::eventually(std::time::Duration::from_secs(20), "the refusal to be recorded", || async {
        let n = app.count("SELECT count(*) FROM warden.ingest_refusals WHERE agent_id = 'stuck'").await;
        (n == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_writer_that_panics_mid_write_answers_may_be_stored_and_is_started_again() {
    // An answer the writer cannot read (here a NULL where the function
    // promises a boolean, as a hand-edited function might give) panics it
    // after the statement committed: the request must not be told that
    // nothing was recorded, and ingestion must come back by itself.
    let (app, key) = app_and_key().await;
    let db = app.db.client().await;
    db.batch_execute(
        "ALTER FUNCTION warden.ingest_heartbeats RENAME TO ingest_heartbeats_real;
         CREATE FUNCTION warden.ingest_heartbeats(
             p_agent_id text[], p_name text[], p_labels jsonb[], p_mode text[], p_status text[],
             p_uptime bigint[], p_next_ms integer[], p_sent_at timestamptz[], p_metric_idx integer[],
             p_metric_name text[], p_metric_value double precision[], p_metric_unit text[],
             p_received_at timestamptz DEFAULT NULL, p_occurrence integer[] DEFAULT NULL)
         RETURNS TABLE (idx integer, is_new boolean, restart_detected boolean, next_heartbeat_ms integer)
         LANGUAGE sql AS $$
             SELECT r.idx, NULL::boolean, r.restart_detected, r.next_heartbeat_ms
             FROM warden.ingest_heartbeats_real(p_agent_id, p_name, p_labels, p_mode, p_status, p_uptime,
                 p_next_ms, p_sent_at, p_metric_idx, p_metric_name, p_metric_value, p_metric_unit,
                 p_received_at, p_occurrence) r
         $$;",
    )
    .await
    .unwrap();
    let panics = || async {
        let text = app.get("/metrics").await.text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("warden_task_panics_total{task=\"ingest_writer\"} "))
            .map(|v| v.parse::<f64>().unwrap())
            .unwrap_or(0.0)
    };
    let before = panics().await;

    let response = app.post("/v1/heartbeats", &key, &json!({"agent_id": "cut-short"})).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("may still be stored"), "{body}");
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_heartbeats WHERE agent_id = 'cut-short'").await, 1);
    // Counted by the supervisor, which may learn of the panic after the
    // request was answered.
    crate::helpers::eventually(std::time::Duration::from_secs(60), "the panic counted", || async {
        (panics().await > before).then_some(())
    })
    .await;

    db.batch_execute(
        "DROP FUNCTION warden.ingest_heartbeats;
         ALTER FUNCTION warden.ingest_heartbeats_real RENAME TO ingest_heartbeats;",
    )
    .await
    .unwrap();
    // The writer started in its place takes heartbeats again.
    let (status, body) = crate::helpers::eventually(std::time::Duration::from_secs(60), "a new writer", || async {
        let (status, body) = app.heartbeat(&key, json!({"agent_id": "after"})).await;
        (status == 200).then_some((status, body))
    })
    .await;
    assert_eq!((status, &body["is_new"]), (200, &json!(true)), "{body}");
}
