//! The web console and the public status page: in a real headless
//! Chromium (`browser`), and over plain HTTP for what must work without
//! JavaScript, the session rules and the security headers (`http`).
//!
//! Screenshots of every page are saved under
//! `target/tmp/console-screenshots/` (test artifacts, not committed).

mod browser;
mod http;
mod pages;

use std::time::Duration;

use serde_json::json;
use warden::auth::Scope;
use warden::health::evaluator::{self, EvalParams};

use crate::helpers::{TestApp, eventually};

/// A warden whose background evaluator stays out of the way (it runs once at
/// start, then hourly), so tests run liveness cycles themselves.
pub async fn app() -> TestApp {
    app_with(|_| {}).await
}

pub async fn app_with(tweak: impl FnOnce(&mut warden::config::Settings)) -> TestApp {
    TestApp::spawn_quiet_with(tweak).await
}

pub async fn cycle(app: &TestApp) -> warden::health::evaluator::CycleReport {
    app.liveness_cycle(None).await
}

/// Liveness of one agent as stored.
pub async fn liveness(app: &TestApp, agent: &str) -> String {
    app.db
        .client()
        .await
        .query_one("SELECT liveness FROM warden.agent_status WHERE agent_id = $1", &[&agent])
        .await
        .unwrap()
        .get(0)
}

/// Keys for the tests: (ingest, read, admin).
pub async fn keys(app: &TestApp) -> (String, String, String) {
    (app.key(&[Scope::Ingest]).await, app.key(&[Scope::Read]).await, app.key(&[Scope::Admin]).await)
}

/// Agents `steady-1`, `steady-2` (hourly, labelled: online however long a
/// test waits for its browser) and `flaky` (2 s interval: offline within
/// seconds of real time), all online and scored.
pub async fn seed_fleet(app: &TestApp, ingest: &str) {
    for (id, name, role) in [("steady-1", "Steady one", "api"), ("steady-2", "Steady two", "worker")] {
        let (status, _) = app
            .heartbeat(
                ingest,
                json!({"agent_id": id, "name": name, "mode": "active", "next_heartbeat_ms": 3_600_000,
                       "labels": {"role": role, "service": "Payments"},
                       "metrics": {"cpu_percent": 35.0, "latency_ms": 120.0}}),
            )
            .await;
        assert_eq!(status, 200);
    }
    let (status, _) = app
        .heartbeat(ingest, json!({"agent_id": "flaky", "next_heartbeat_ms": 2000, "labels": {"service": "Search"}}))
        .await;
    assert_eq!(status, 200);
    // Right after flaky's heartbeat, whenever this runs.
    let seen: chrono::DateTime<chrono::Utc> = app
        .db
        .client()
        .await
        .query_one("SELECT last_seen FROM warden.agent_status WHERE agent_id = 'flaky'", &[])
        .await
        .unwrap()
        .get(0);
    app.liveness_cycle(Some(seen + chrono::Duration::milliseconds(100))).await;
    // A score pass, a few seconds ahead (it reads samples up to two seconds
    // before its clock), so the agents have scores, tiers and breakdowns.
    let mut client = app.db.client().await;
    let params = EvalParams::from_settings(&crate::helpers::default_settings().health);
    let ahead = chrono::Utc::now() + chrono::Duration::seconds(3);
    evaluator::score_pass(&mut client, &params, Some(ahead)).await.unwrap();
    for id in ["steady-1", "steady-2", "flaky"] {
        assert_eq!(liveness(app, id).await, "online", "{id}");
    }
}

/// Cycles until `flaky` (silent since seeding) is offline; it then has an
/// open agent_unresponsive incident and a firing alert, whose id is returned.
pub async fn take_flaky_offline(app: &TestApp) -> i64 {
    eventually(Duration::from_secs(30), "flaky offline", || async {
        cycle(app).await;
        (liveness(app, "flaky").await == "offline").then_some(())
    })
    .await;
    app.db
        .client()
        .await
        .query_one(
            "SELECT a.id FROM warden.alerts a JOIN warden.incidents i ON i.id = a.incident_id \
             WHERE i.agent_id = 'flaky' AND i.issue_type = 'agent_unresponsive' AND a.state = 'firing'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

pub async fn alert_state(app: &TestApp, id: i64) -> String {
    app.db.client().await.query_one("SELECT state FROM warden.alerts WHERE id = $1", &[&id]).await.unwrap().get(0)
}
