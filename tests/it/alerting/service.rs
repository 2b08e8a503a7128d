//! The running service in real time (background escalator and dispatcher,
//! HTTP API), and the `[alerting]` settings.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use warden::auth::Scope;
use warden::config::{ChannelSettings, Secret, Settings, SettingsError, Sources};

use super::receivers::HttpReceiver;
use crate::helpers::{TestApp, eventually};

async fn call(app: &TestApp, method: &str, key: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = app.http.request(method.parse().unwrap(), app.url(path)).bearer_auth(key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_service_pages_slack_and_the_api_lists_acknowledges_and_silences() {
    let slack = HttpReceiver::start().await;
    let url = slack.url("/hook");
    let app = TestApp::spawn_with(move |s| {
        s.health.check_interval = warden::config::Duration::from_millis(100);
        let a = &mut s.alerting;
        a.group_wait = warden::config::Duration::from_secs(0);
        a.group_interval = warden::config::Duration::from_secs(0);
        a.evaluate_interval = warden::config::Duration::from_millis(100);
        a.dispatch_interval = warden::config::Duration::from_millis(100);
        let mut slack = ChannelSettings::log();
        slack.kind = warden::config::ChannelKind::Slack;
        slack.webhook_url = Secret::new(url);
        a.channels.insert("ops_slack".into(), slack);
    })
    .await;
    let ingest = app.key(&[Scope::Ingest]).await;
    let read = app.key(&[Scope::Read]).await;
    let admin = app.key(&[Scope::Admin]).await;
    app.heartbeat(&ingest, json!({"agent_id": "svc-1", "next_heartbeat_ms": 200})).await;

    // Offline after three missed 200 ms intervals; the page reaches Slack.
    let post = eventually(Duration::from_secs(30), "a Slack page about svc-1", || async {
        slack
            .accepted()
            .into_iter()
            .find(|r| r.json()["text"].as_str().is_some_and(|t| t.starts_with("[FIRING CRITICAL] svc-1 is offline")))
    })
    .await;
    assert!(post.json()["blocks"].is_array());

    let (status, list) = call(&app, "GET", &read, "/v1/alerts?state=firing", None).await;
    assert_eq!(status, 200);
    let alert = list["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["dedup_key"] == "svc-1:agent_unresponsive")
        .cloned()
        .expect("listed");
    let id = alert["id"].as_i64().unwrap();
    assert_eq!(alert["agent_id"], "svc-1");
    assert_eq!(alert["issue_type"], "agent_unresponsive");
    let (_, one) = call(&app, "GET", &read, &format!("/v1/alerts/{id}"), None).await;
    assert!(one["deliveries"].as_array().unwrap().iter().any(|d| d["channel"] == "ops_slack" && d["kind"] == "firing"));
    let (status, _) = call(&app, "GET", &read, "/v1/alerts?severity=loud", None).await;
    assert_eq!(status, 422);
    let (status, page) = call(&app, "GET", &read, "/v1/alerts?limit=1", None).await;
    assert_eq!(status, 200);
    assert_eq!(page["alerts"].as_array().unwrap().len(), 1);

    // Acknowledging: admin only; by defaults to the key's name; idempotent.
    let (status, _) = call(&app, "POST", &read, &format!("/v1/alerts/{id}/ack"), None).await;
    assert_eq!(status, 403);
    let (status, acked) =
        call(&app, "POST", &admin, &format!("/v1/alerts/{id}/ack"), Some(json!({"by": "alice", "comment": "mine"})))
            .await;
    assert_eq!(status, 200, "{acked}");
    assert_eq!((acked["state"].as_str(), acked["acknowledged_by"].as_str()), (Some("acknowledged"), Some("alice")));
    assert_eq!(acked["ack_comment"], "mine");
    let (status, again) = call(&app, "POST", &admin, &format!("/v1/alerts/{id}/ack"), None).await;
    assert_eq!((status, again["acknowledged_by"].as_str()), (200, Some("alice")));
    let (status, body) = call(&app, "POST", &admin, "/v1/alerts/987654/ack", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));

    // Silences.
    let (status, created) = call(
        &app,
        "POST",
        &admin,
        "/v1/silences",
        Some(json!({"agent_id": "svc-2", "labels": {"env": "staging"}, "duration": "2h", "comment": "deploy"})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["created_by"], "test", "the key's name");
    let span = |s: &serde_json::Value| {
        let at = |k: &str| chrono::DateTime::parse_from_rfc3339(s[k].as_str().unwrap()).unwrap();
        at("ends_at") - at("starts_at")
    };
    assert_eq!(span(&created), chrono::Duration::hours(2), "a duration is exact: {created}");
    let sid = created["id"].as_i64().unwrap();
    let (_, list) = call(&app, "GET", &read, "/v1/silences", None).await;
    assert_eq!(list["silences"].as_array().unwrap().len(), 1);
    let (status, body) =
        call(&app, "POST", &admin, "/v1/silences", Some(json!({"duration": "1h", "comment": "everything"}))).await;
    assert_eq!((status, body["error"]["field"].as_str()), (422, Some("agent_id")), "{body}");
    let (status, _) = call(&app, "DELETE", &admin, &format!("/v1/silences/{sid}"), None).await;
    assert_eq!(status, 200);
    let (status, _) = call(&app, "DELETE", &admin, &format!("/v1/silences/{sid}"), None).await;
    assert_eq!(status, 404);
    let (_, list) = call(&app, "GET", &read, "/v1/silences", None).await;
    assert!(list["silences"].as_array().unwrap().is_empty());

    // Back online: the alert resolves, Slack hears so, and acking is a conflict.
    for _ in 0..4 {
        app.heartbeat(&ingest, json!({"agent_id": "svc-1", "next_heartbeat_ms": 200})).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let resolved = eventually(Duration::from_secs(30), "the resolved message", || async {
        for _ in 0..1 {
            app.heartbeat(&ingest, json!({"agent_id": "svc-1", "next_heartbeat_ms": 200})).await;
        }
        slack
            .accepted()
            .into_iter()
            // Late and offline close together, in one message: the late
            // alert's all-clear waited for the agent to be back.
            .find(|r| r.json()["text"].as_str().is_some_and(|t| t.starts_with("[RESOLVED]") && t.contains("svc-1")))
    })
    .await;
    assert!(resolved.header("idempotency-key").is_some());
    let (status, body) = call(&app, "POST", &admin, &format!("/v1/alerts/{id}/ack"), None).await;
    assert_eq!(status, 409, "{body}");
    app.stop().await;
}

fn load(file: &str, env: &[(&str, &str)]) -> Result<Settings, SettingsError> {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut f, file.as_bytes()).unwrap();
    let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Settings::load(&Sources { file: Some(f.path().to_path_buf()), env: Some(env) })
}

#[test]
fn the_shipped_alerting_settings_load_and_secrets_come_from_the_environment() {
    let s = crate::helpers::default_settings();
    assert!(s.alerting.enabled);
    assert_eq!(s.alerting.group_wait, warden::config::Duration::from_secs(30));
    assert_eq!(s.alerting.repeat_interval, warden::config::Duration::from_secs(4 * 3600));
    assert!(s.alerting.channels.is_empty(), "the log channel is implicit");

    let file = r#"
[alerting.channels.ops_slack]
kind = "slack"

[alerting.channels.audit_hook]
kind = "webhook"
url = "https://example.com/warden"

[[alerting.policies]]
name = "default"
levels = [{ after = "0s", channels = ["ops_slack", "log"] }, { after = "5m", channels = ["audit_hook"] }]
"#;
    let s = load(
        file,
        &[
            ("WARDEN__ALERTING__CHANNELS__OPS_SLACK__WEBHOOK_URL", "https://hooks.slack.com/services/T/B/SECRET"),
            ("WARDEN__ALERTING__CHANNELS__AUDIT_HOOK__SECRET", "hmac-key-value"),
        ],
    )
    .unwrap();
    assert_eq!(s.alerting.channels["ops_slack"].webhook_url.expose(), "https://hooks.slack.com/services/T/B/SECRET");
    let printed = s.to_redacted_toml();
    assert!(!printed.contains("SECRET") && !printed.contains("hmac-key-value"), "{printed}");
    assert!(!printed.contains("example.com/warden"), "url fields are redacted too");
    assert!(printed.contains("[redacted]"));
}

#[test]
fn alerting_mistakes_are_refused_in_one_line_naming_the_key() {
    // (override file, environment, key named, a phrase of the explanation)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: &[Case] = &[
        (
            "[[alerting.policies]]\nname = \"p\"\nlevels = [{ after = \"0s\", channels = [\"nowhere\"] }]\n",
            &[],
            "alerting.policies[0].levels[0].channels",
            "nowhere",
        ),
        ("[[alerting.routes]]\npolicy = \"missing\"\n", &[], "alerting.routes[0].policy", "missing"),
        ("[alerting.channels.Ops-Slack]\nkind = \"log\"\n", &[], "alerting.channels.Ops-Slack", "lowercase"),
        (
            "[alerting.channels.ops_slack]\nkind = \"slack\"\n",
            &[],
            "alerting.channels.ops_slack.webhook_url",
            "WARDEN__ALERTING__CHANNELS__OPS_SLACK__WEBHOOK_URL",
        ),
        (
            "[alerting.channels.mail]\nkind = \"email\"\nto = [\"oncall@example.com\"]\nwebhook_url = \"https://x\"\n",
            &[],
            "alerting.channels.mail.webhook_url",
            "only for kind slack",
        ),
        (
            "[[alerting.policies]]\nname = \"p\"\nlevels = [{ after = \"5m\", channels = [\"log\"] }, { after = \"1m\", channels = [\"log\"] }]\n",
            &[],
            "alerting.policies[0].levels[1].after",
            "previous level",
        ),
        ("", &[("WARDEN__ALERTING__GROUP_WAIT", "30")], "alerting.group_wait", "unit"),
        (
            "[[alerting.maintenance]]\nname = \"w\"\nstart = \"25:00\"\nduration = \"1h\"\n",
            &[],
            "alerting.maintenance[0].start",
            "02:00",
        ),
    ];
    for (file, env, key, hint) in cases {
        let e = load(file, env).expect_err(key);
        let line = e.to_string();
        assert_eq!(e.key.as_deref(), Some(*key), "{line}");
        assert!(line.contains(hint), "{line} should mention {hint}");
        assert!(!line.contains('\n'));
    }
}
