//! /healthz, /readyz and the JSON error shape of unknown paths.

use std::time::Duration;

use crate::helpers::{TestApp, eventually};

#[tokio::test]
async fn healthz_answers_ok() {
    let app = TestApp::spawn().await;
    let response = app.get("/healthz").await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ok");
}

#[tokio::test]
async fn readyz_reports_the_schema_version_when_ready() {
    let app = TestApp::spawn().await;
    let response = app.get("/readyz").await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["schema_version"], warden::db::migrate::latest_version());
}

#[tokio::test]
async fn readyz_is_503_with_retry_after_when_the_database_is_gone() {
    let app = TestApp::spawn().await;
    assert_eq!(app.get("/readyz").await.status(), 200);
    app.db.drop_now().await;

    let response = eventually(Duration::from_secs(30), "readyz to fail", || async {
        let r = app.get("/readyz").await;
        (r.status() == 503).then_some(r)
    })
    .await;
    assert!(response.headers().contains_key("retry-after"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable");
    assert_eq!(app.get("/healthz").await.status(), 200, "the process itself is still alive");
}

#[tokio::test]
async fn readyz_is_503_when_the_schema_is_behind() {
    let app = TestApp::spawn().await;
    let client = app.db.client().await;
    client.execute("DELETE FROM warden.refinery_schema_history", &[]).await.unwrap();
    let response = app.get("/readyz").await;
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("warden migrate"), "{body}");
}

#[tokio::test]
async fn unknown_paths_get_a_json_404() {
    let app = TestApp::spawn().await;
    let response = app.get("/no/such/thing").await;
    assert_eq!(response.status(), 404);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
}

#[tokio::test]
async fn shutdown_is_orderly() {
    let app = TestApp::spawn().await;
    assert_eq!(app.get("/healthz").await.status(), 200);
    let addr = app.addr;
    tokio::time::timeout(Duration::from_secs(20), app.stop()).await.expect("stops within the grace period");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the port is closed after shutdown");
}

#[tokio::test]
async fn readyz_is_503_when_evaluation_has_stalled() {
    let app = TestApp::spawn_with(|s| s.health.check_interval = warden::config::Duration::from_secs(600)).await;
    let db = app.db.client().await;
    // Let the first cycle (at start-up) happen, then pretend it was an hour ago.
    eventually(Duration::from_secs(30), "the first evaluation cycle", || async {
        let leader: Option<String> =
            db.query_one("SELECT leader FROM warden.evaluator_state", &[]).await.unwrap().get(0);
        leader.map(|_| ())
    })
    .await;
    assert_eq!(app.get("/readyz").await.status(), 200);
    db.execute("UPDATE warden.evaluator_state SET last_cycle_at = now() - interval '1 hour'", &[]).await.unwrap();
    // One check serves the probes of the same second: poll.
    let response = eventually(Duration::from_secs(30), "/readyz to see the stall", || async {
        let response = app.get("/readyz").await;
        (response.status() == 503).then_some(response)
    })
    .await;
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("evaluation has stalled"), "{body}");
}

#[tokio::test]
async fn every_evaluation_cycle_pings_the_self_heartbeat_url() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let receiver = axum::Router::new().route(
        "/ping/{token}",
        axum::routing::get(move |axum::extract::Path(token): axum::extract::Path<String>| {
            let counter = counter.clone();
            async move {
                assert_eq!(token, "s3cret");
                counter.fetch_add(1, Ordering::SeqCst);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ping/s3cret", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await.unwrap() });
    let app = TestApp::spawn_with(move |s| {
        s.health.check_interval = warden::config::Duration::from_millis(100);
        s.telemetry.self_heartbeat_url = warden::config::Secret::new(url);
    })
    .await;
    eventually(Duration::from_secs(30), "three pings", || async { (hits.load(Ordering::SeqCst) >= 3).then_some(()) })
        .await;
    drop(app);
}
