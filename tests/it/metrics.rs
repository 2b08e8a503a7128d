//! GET /metrics: Prometheus text that promtool accepts, with the figures
//! the work produced.

use serde_json::json;
use warden::auth::Scope;

use std::time::Duration;

use crate::helpers::{TestApp, eventually};

pub fn metric(text: &str, name_with_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_with_labels) && l[name_with_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn metrics_count_the_work_and_pass_promtool() {
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Ingest]).await;
    let before = app.get("/metrics").await.text().await.unwrap();
    let accepted_before = metric(&before, "warden_heartbeats_total{path=\"http\"}").unwrap_or(0.0);
    let invalid_before = metric(&before, "warden_heartbeat_rejects_total{reason=\"invalid\"}").unwrap_or(0.0);
    let unauthorized_before = metric(&before, "warden_heartbeat_rejects_total{reason=\"unauthorized\"}").unwrap_or(0.0);
    let lookup = |text: &str, outcome: &str| {
        metric(text, &format!("warden_auth_key_lookups_total{{outcome=\"{outcome}\"}}")).unwrap_or(0.0)
    };
    let (found_before, unknown_before) = (lookup(&before, "found"), lookup(&before, "unknown"));

    for i in 0..3 {
        assert_eq!(app.heartbeat(&key, json!({"agent_id": format!("m{i}")})).await.0, 200);
    }
    assert_eq!(app.heartbeat(&key, json!({"agent_id": "bad id"})).await.0, 422);
    assert_eq!(app.heartbeat("wdn_nope", json!({"agent_id": "x"})).await.0, 401);
    // Well formed, so looked up, and not there.
    let made_up = format!("wdn_{}_{}", "0".repeat(12), "0".repeat(64));
    assert_eq!(app.heartbeat(&made_up, json!({"agent_id": "x"})).await.0, 401);

    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = response.text().await.unwrap();
    // Process counters are shared by the tests of this binary: compare deltas.
    assert!(metric(&text, "warden_heartbeats_total{path=\"http\"}").unwrap() >= accepted_before + 3.0);
    assert!(metric(&text, "warden_heartbeat_rejects_total{reason=\"invalid\"}").unwrap() >= invalid_before + 1.0);
    assert!(
        metric(&text, "warden_heartbeat_rejects_total{reason=\"unauthorized\"}").unwrap() >= unauthorized_before + 1.0
    );
    assert!(metric(&text, "warden_ingest_flush_size_count").unwrap() >= 1.0);
    // The test's key and the made-up one were each looked up (counters
    // are shared by the tests of this binary, hence at least).
    assert!(lookup(&text, "found") >= found_before + 1.0);
    assert!(lookup(&text, "unknown") >= unknown_before + 1.0);
    assert!(metric(&text, "warden_ingest_commit_seconds_count").unwrap() >= 1.0);
    assert!(text.contains("warden_ingest_queue_depth "));
    for kind in ["liveness", "score"] {
        let series = format!("warden_evaluation_failures_total{{kind=\"{kind}\"}}");
        assert!(metric(&text, &series).is_some(), "{series} is there before any failure: {text}");
    }
    for series in [
        "warden_heartbeat_rejects_total{reason=\"unavailable\"}",
        "warden_recovery_attempts_total{outcome=\"failed\"}",
        "warden_alert_deliveries_total{channel=\"log\",outcome=\"failed\"}",
        "warden_task_panics_total{task=\"evaluator\"}",
        "warden_task_panics_total{task=\"dispatcher\"}",
        "warden_task_panics_total{task=\"ingest_writer\"}",
    ] {
        assert!(metric(&text, series).is_some(), "{series} is there before any failure: {text}");
    }
    assert!(metric(&text, "warden_db_pool_max_connections").unwrap() >= 1.0);
    // Their values are whichever pool was scraped last: the registry is
    // the process's, and other tests' apps scrape it too.
    for state in ["idle", "in_use"] {
        assert!(metric(&text, &format!("warden_db_pool_connections{{state=\"{state}\"}}")).is_some(), "{text}");
    }
    assert!(!text.contains("state=\"max\"") && !text.contains("state=\"open\""), "{text}");
    // Fleet figures come from this test's own database, read at most a
    // second before the scrape.
    let agents = |text: &str| {
        metric(text, "warden_agents{liveness=\"unknown\"}").unwrap()
            + metric(text, "warden_agents{liveness=\"online\"}").unwrap()
    };
    let text = eventually(Duration::from_secs(30), "the three agents in the fleet figures", || async {
        let text = app.get("/metrics").await.text().await.unwrap();
        (agents(&text) == 3.0).then_some(text)
    })
    .await;
    assert_eq!(metric(&text, "warden_incidents_open{issue_type=\"fleet_outage\"}"), Some(0.0));
    // Not scored yet: the tiers add up to the fleet all the same.
    let tiers: f64 = ["excellent", "good", "fair", "poor", "critical", "unscored"]
        .iter()
        .map(|t| metric(&text, &format!("warden_agents_by_tier{{tier=\"{t}\"}}")).unwrap_or(0.0))
        .sum();
    assert_eq!(tiers, 3.0, "{text}");

    // promtool is installed by .ci/run; a missing one is a failure, not a skip.
    let mut check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    use std::io::Write;
    check.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn fleet_figures_that_cannot_be_read_are_left_out_not_served_stale() {
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Ingest]).await;
    assert_eq!(app.heartbeat(&key, json!({"agent_id": "stale"})).await.0, 200);
    let text = app.get("/metrics").await.text().await.unwrap();
    assert_eq!(metric(&text, "warden_fleet_figures_up"), Some(1.0));
    assert!(metric(&text, "warden_agents{liveness=\"unknown\"}").is_some());

    app.db.drop_now().await;
    // Figures read within the last second may still be served; after that,
    // none.
    let text = eventually(Duration::from_secs(30), "the fleet figures left out", || async {
        let response = app.get("/metrics").await;
        assert_eq!(response.status(), 200, "the process's own figures are still served");
        let text = response.text().await.unwrap();
        (metric(&text, "warden_fleet_figures_up") == Some(0.0)).then_some(text)
    })
    .await;
    assert!(!text.contains("warden_agents{"), "no stale fleet figures: {text}");
    assert!(text.contains("warden_ingest_queue_depth "));
}

#[tokio::test]
async fn a_database_that_hangs_leaves_the_fleet_figures_out_in_time() {
    let app = TestApp::spawn_quiet_with(|s| {
        s.database.connect_timeout = warden::config::Duration::from_secs(1);
        s.server.request_timeout = warden::config::Duration::from_secs(10);
    })
    .await;
    // A lock held on the table the figures count: their query waits (up to
    // the statement timeout, 30 s) instead of failing.
    let mut blocker = app.db.client().await;
    let tx = blocker.transaction().await.unwrap();
    tx.execute("LOCK TABLE warden.agent_status IN ACCESS EXCLUSIVE MODE", &[]).await.unwrap();
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200, "not the request timeout's 503");
    let text = response.text().await.unwrap();
    assert_eq!(metric(&text, "warden_fleet_figures_up"), Some(0.0));
    assert!(text.contains("warden_db_pool_connections{"), "{text}");
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn a_score_pass_the_database_refuses_is_counted() {
    let app = TestApp::spawn_with(|s| {
        s.health.check_interval = warden::config::Duration::from_millis(200);
        s.health.score_interval = warden::config::Duration::from_millis(200);
    })
    .await;
    let failures = |text: &str| metric(text, "warden_evaluation_failures_total{kind=\"score\"}").unwrap();
    let before = failures(&app.get("/metrics").await.text().await.unwrap());
    // A table the score pass reads, gone: every pass fails, and liveness
    // cycles go on.
    app.db.client().await.batch_execute("ALTER TABLE warden.agent_metric_stats RENAME TO stats_gone").await.unwrap();
    eventually(Duration::from_secs(60), "a failed score pass to be counted", || async {
        let text = app.get("/metrics").await.text().await.unwrap();
        (failures(&text) > before).then_some(())
    })
    .await;
}

#[tokio::test]
async fn retention_progress_and_failing_steps_are_on_metrics() {
    let app = TestApp::spawn_with(|s| {
        s.retention.enabled = true;
        s.retention.interval = warden::config::Duration::from_secs(1);
    })
    .await;
    let failures = |text: &str| metric(text, "warden_retention_failures_total{step=\"ingest_outages\"}").unwrap_or(0.0);
    let before = failures(&app.get("/metrics").await.text().await.unwrap());
    // A cycle ran: the watermarks it set and its time are read back.
    let text = eventually(Duration::from_secs(60), "a retention cycle on /metrics", || async {
        let text = app.get("/metrics").await.text().await.unwrap();
        metric(&text, "warden_retention_last_run_age_seconds").is_some().then_some(text)
    })
    .await;
    let minute = metric(&text, "warden_retention_watermark_age_seconds{watermark=\"minute\"}").unwrap();
    assert!((0.0..7300.0).contains(&minute), "a fresh database's rollups start an hour back: {minute}");
    assert!(metric(&text, "warden_retention_failures_total{step=\"cycle\"}").is_some(), "there at 0: {text}");

    // A table a step prunes, gone: that step fails every cycle, counted.
    app.db.client().await.batch_execute("ALTER TABLE warden.ingest_outages RENAME TO outages_gone").await.unwrap();
    eventually(Duration::from_secs(60), "a failed retention step to be counted", || async {
        let text = app.get("/metrics").await.text().await.unwrap();
        (failures(&text) > before).then_some(())
    })
    .await;
}
