//! Removing an agent that is gone for good: DELETE /v1/agents/{id} and
//! `warden agents remove`.

use serde_json::{Value, json};
use warden::auth::Scope;

use warden::health::evaluator::{self, EvalParams};

use crate::helpers::TestApp;
use crate::procs::warden;

async fn open(app: &TestApp, agent: &str) -> i64 {
    app.count(&format!("SELECT count(*) FROM warden.incidents WHERE agent_id = '{agent}' AND state = 'open'")).await
}

#[tokio::test]
async fn a_removed_agent_leaves_the_fleet_with_its_incidents_resolved_and_its_history_kept() {
    let app = TestApp::spawn_quiet_with(|_| {}).await;
    let ingest = app.key(&[Scope::Ingest]).await;
    let read = app.key(&[Scope::Read]).await;
    let admin = app.key(&[Scope::Admin]).await;
    let score_pass = || async {
        let mut client = app.db.client().await;
        let params = EvalParams::from_settings(&crate::helpers::default_settings().health);
        let ahead = chrono::Utc::now() + chrono::Duration::seconds(3);
        evaluator::score_pass(&mut client, &params, Some(ahead)).await.unwrap();
    };
    for agent in ["gone", "stays"] {
        let (status, _) =
            app.heartbeat(&ingest, json!({"agent_id": agent, "next_heartbeat_ms": 1000, "metrics": {"cpu": 5}})).await;
        assert_eq!(status, 200);
    }
    let stats = || app.count("SELECT count(*) FROM warden.agent_metric_stats WHERE agent_id = 'gone'");
    // A pass reads samples up to the start of any write still open in the
    // database (the service's own cycles among them), so under load the
    // first may leave them to the next.
    crate::helpers::eventually(std::time::Duration::from_secs(60), "the samples read", || async {
        score_pass().await;
        (stats().await >= 1).then_some(())
    })
    .await;
    // "gone" restarts three times (a restart loop), with samples the next
    // score pass would read.
    for uptime in [100, 1, 100, 1, 100, 1] {
        let body =
            json!({"agent_id": "gone", "next_heartbeat_ms": 1000, "uptime_seconds": uptime, "metrics": {"cpu": 7}});
        assert_eq!(app.heartbeat(&ingest, body).await.0, 200);
    }
    // Both silent long enough to be offline, with incidents and alerts.
    let seen: chrono::DateTime<chrono::Utc> =
        app.db.client().await.query_one("SELECT max(last_seen) FROM warden.agent_status", &[]).await.unwrap().get(0);
    for ms in [100, 2_000, 4_000, 6_000, 8_000] {
        app.liveness_cycle(Some(seen + chrono::Duration::milliseconds(ms))).await;
    }
    assert!(open(&app, "gone").await >= 2 && open(&app, "stays").await >= 1);
    let looping = "SELECT count(*) FROM warden.incidents WHERE agent_id = 'gone' AND issue_type = 'restart_loop'";
    assert_eq!(app.count(looping).await, 1);
    let delete =
        |key: &str, agent: &str| app.http.delete(app.url(&format!("/v1/agents/{agent}"))).bearer_auth(key).send();

    assert_eq!(delete(&read, "gone").await.unwrap().status(), 403, "admin only");
    assert_eq!(delete(&ingest, "gone").await.unwrap().status(), 403);
    assert_eq!(delete(&admin, "nobody").await.unwrap().status(), 404);
    assert_eq!(delete(&admin, "bad%20id").await.unwrap().status(), 422);

    // Not while a recovery of it is being verified.
    let db = app.db.client().await;
    db.execute(
        "INSERT INTO warden.recovery_jobs (agent_id, strategy, state, manual) VALUES ('gone', 'fix', 'verifying', true)",
        &[],
    )
    .await
    .unwrap();
    let busy = delete(&admin, "gone").await.unwrap();
    assert_eq!(busy.status(), 409);
    let body: Value = busy.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("recovery"), "{body}");
    db.execute("UPDATE warden.recovery_jobs SET state = 'succeeded', finished_at = now() WHERE agent_id = 'gone'", &[])
        .await
        .unwrap();
    // Queued for later, so that the service's own engine leaves it alone.
    db.execute(
        "INSERT INTO warden.recovery_jobs (agent_id, strategy, manual, next_run_at) \
         VALUES ('gone', 'fix', true, now() + interval '1 hour')",
        &[],
    )
    .await
    .unwrap();

    let removed = delete(&admin, "gone").await.unwrap();
    assert_eq!(removed.status(), 200);
    let body: Value = removed.json().await.unwrap();
    let resolved = open(&app, "stays").await; // the other agent's, untouched
    assert_eq!(body["agent_id"], "gone");
    assert_eq!(body["recoveries_cancelled"], 1);
    assert!(body["incidents_resolved"].as_i64().unwrap() >= 1, "{body}");
    assert_eq!(open(&app, "gone").await, 0);
    assert!(resolved >= 1);
    let unresolved_alerts = app
        .count(
            "SELECT count(*) FROM warden.alerts a JOIN warden.incidents i ON i.id = a.incident_id \
             WHERE i.agent_id = 'gone' AND a.state <> 'resolved'",
        )
        .await;
    assert_eq!(unresolved_alerts, 0, "its alerts resolve with its incidents");
    assert_eq!(
        app.count(
            "SELECT count(*) FROM warden.incidents WHERE agent_id = 'gone' AND state = 'resolved' \
             AND resolution = 'agent removed'"
        )
        .await,
        body["incidents_resolved"].as_i64().unwrap()
    );
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status WHERE agent_id = 'gone'").await, 0);
    assert_eq!(stats().await, 0);
    // The evaluator's next cycle and pass open nothing about it again (its
    // restarts are still in the window) and keep no statistics of it (its
    // last samples are still unread).
    app.liveness_cycle(Some(seen + chrono::Duration::milliseconds(10_000))).await;
    score_pass().await;
    assert_eq!(open(&app, "gone").await, 0);
    assert_eq!(app.count(looping).await, 1, "the loop is not opened again");
    assert_eq!(stats().await, 0);
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status WHERE agent_id = 'stays'").await, 1);
    let event: Value = db
        .query_one(
            "SELECT details FROM warden.system_events WHERE agent_id = 'gone' AND event_type = 'agent_removed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(event["by"], "test");
    // History stays for reports.
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_heartbeats WHERE agent_id = 'gone'").await, 7);
    assert_eq!(app.count("SELECT count(*) FROM warden.performance_metrics WHERE agent_id = 'gone'").await, 7);
    assert_eq!(app.get("/v1/agents/gone").await.status(), 401, "reads need a key");
    let get = app.http.get(app.url("/v1/agents/gone")).bearer_auth(&read).send().await.unwrap();
    assert_eq!(get.status(), 404);
    assert_eq!(delete(&admin, "gone").await.unwrap().status(), 404, "removed once");

    // Heard from again, it is a new agent.
    let (_, again) = app.heartbeat(&ingest, json!({"agent_id": "gone"})).await;
    assert_eq!(again["is_new"], true);

    // The same from the command line; the remover is a name.
    let nameless = warden()
        .args(["agents", "remove", "stays", "--by", " "])
        .env("WARDEN__DATABASE__URL", app.db.url())
        .output()
        .unwrap();
    assert_eq!(nameless.status.code(), Some(2), "{nameless:?}");
    assert!(String::from_utf8_lossy(&nameless.stderr).contains("--by"), "{nameless:?}");
    let out = warden()
        .args(["agents", "remove", "stays", "--by", "ops"])
        .env("WARDEN__DATABASE__URL", app.db.url())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("stays removed"), "{out:?}");
    assert_eq!(open(&app, "stays").await, 0);
    let by: Value = db
        .query_one(
            "SELECT details FROM warden.system_events WHERE agent_id = 'stays' AND event_type = 'agent_removed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(by["by"], "ops");
    let again =
        warden().args(["agents", "remove", "stays"]).env("WARDEN__DATABASE__URL", app.db.url()).output().unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("no agent stays"), "{again:?}");
}
