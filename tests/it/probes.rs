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
