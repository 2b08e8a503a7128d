//! The MCP endpoint: JSON-RPC over POST /mcp, version negotiation, the two
//! tools and what they write, protocol errors, keys and scopes.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use warden::auth::Scope;

use crate::helpers::TestApp;

/// POSTs one JSON-RPC body to /mcp; returns the HTTP status and the body
/// (`Value::Null` when it is empty).
async fn rpc(app: &TestApp, key: &str, body: &Value) -> (u16, Value) {
    let response = app.post("/mcp", key, body).await;
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() };
    (status, body)
}

fn request(id: i64, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// Calls a tool and returns its result, which must be a JSON-RPC result.
async fn call(app: &TestApp, key: &str, tool: &str, arguments: Value) -> Value {
    let (status, body) = rpc(app, key, &request(1, "tools/call", json!({"name": tool, "arguments": arguments}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], 1);
    assert!(body.get("error").is_none(), "{body}");
    body["result"].clone()
}

/// The text of a tool result's one text item.
fn text_of(result: &Value) -> &str {
    assert_eq!(result["content"][0]["type"], "text", "{result}");
    result["content"][0]["text"].as_str().unwrap()
}

fn time(value: &Value) -> DateTime<Utc> {
    value.as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn initialize_echoes_a_supported_protocol_version_and_offers_the_newest_otherwise() {
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Ingest]).await;
    for (requested, expected) in [
        ("2025-03-26", "2025-03-26"),
        ("2024-11-05", "2024-11-05"),
        ("2025-06-18", "2025-06-18"),
        ("1999-01-01", "2025-06-18"),
    ] {
        let body = json!({"jsonrpc": "2.0", "id": "init", "method": "initialize", "params": {
            "protocolVersion": requested, "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}
        }});
        let response = app.post("/mcp", &key, &body).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert!(response.headers().get("mcp-session-id").is_none(), "warden keeps no sessions");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["jsonrpc"], "2.0");
        assert_eq!(answer["id"], "init", "string ids are echoed");
        let result = &answer["result"];
        assert_eq!(result["protocolVersion"], expected, "asked for {requested}");
        assert_eq!(result["capabilities"], json!({"tools": {"listChanged": false}}));
        assert_eq!(result["serverInfo"], json!({"name": "warden", "version": env!("CARGO_PKG_VERSION")}));
        assert!(result["instructions"].as_str().unwrap().contains("heartbeat"));
    }
    let (status, answer) = rpc(&app, &key, &request(2, "ping", json!({}))).await;
    assert_eq!((status, &answer["result"]), (200, &json!({})));
}

#[tokio::test]
async fn notifications_are_accepted_with_202_and_an_empty_body() {
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Read]).await;
    let response = app.post("/mcp", &key, &json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await;
    assert_eq!(response.status(), 202);
    assert!(response.bytes().await.unwrap().is_empty());
    // Unknown notifications are ignored too: they are never answered.
    let (status, body) = rpc(&app, &key, &json!({"jsonrpc": "2.0", "method": "notifications/whatever"})).await;
    assert_eq!((status, body), (202, Value::Null));
}

#[tokio::test]
async fn tools_list_describes_both_tools_with_input_schemas() {
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Read]).await;
    let (status, body) = rpc(&app, &key, &request(1, "tools/list", json!({}))).await;
    assert_eq!(status, 200, "{body}");
    let tools = body["result"]["tools"].as_array().unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["heartbeat", "agent_status"]);
    for tool in tools {
        assert!(!tool["description"].as_str().unwrap().is_empty(), "{tool}");
        assert_eq!(tool["inputSchema"]["type"], "object", "{tool}");
        assert_eq!(tool["inputSchema"]["required"], json!(["agent_id"]), "{tool}");
    }
    let properties = tools[0]["inputSchema"]["properties"].as_object().unwrap();
    for field in
        ["agent_id", "name", "mode", "status", "uptime_seconds", "next_heartbeat_ms", "sent_at", "metrics", "labels"]
    {
        assert!(properties.contains_key(field), "heartbeat schema lacks {field}");
    }
    assert_eq!(properties["mode"]["enum"], json!(["emergency", "active", "idle", "sleep"]));
    assert_eq!(tools[1]["annotations"]["readOnlyHint"], true);
}

#[tokio::test]
async fn the_heartbeat_tool_records_a_heartbeat_like_the_http_api() {
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Ingest]).await;
    let result = call(
        &app,
        &key,
        "heartbeat",
        json!({"agent_id": "mcp-1", "name": "Via MCP", "mode": "active", "uptime_seconds": 300,
               "next_heartbeat_ms": 15000, "metrics": {"cpu": 12.5, "latency": {"value": 8, "unit": "ms"}},
               "labels": {"via": "mcp"}}),
    )
    .await;
    assert_eq!(result["isError"], false, "{result}");
    let answer = &result["structuredContent"];
    assert_eq!(answer["status"], "alive");
    assert_eq!(answer["agent"], "mcp-1");
    assert_eq!(answer["heartbeat_interval"], 15000);
    assert_eq!(answer["recorded"], true);
    assert_eq!(answer["is_new"], true);
    assert_eq!(answer["restart_detected"], false);
    let (at, next) = (time(&answer["timestamp"]), time(&answer["next_expected"]));
    assert_eq!((next - at).num_milliseconds(), 15000);
    assert!((Utc::now() - at).num_seconds().abs() < 60, "the timestamp is now");
    let text: Value = serde_json::from_str(text_of(&result)).unwrap();
    assert_eq!(&text, answer, "the text content is the same object as JSON");

    assert_eq!(app.count("SELECT heartbeat_count FROM warden.agent_status WHERE agent_id = 'mcp-1'").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_heartbeats WHERE agent_id = 'mcp-1'").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM warden.performance_metrics WHERE agent_id = 'mcp-1'").await, 2);
    assert_eq!(
        app.count(
            "SELECT count(*) FROM warden.agent_status WHERE agent_id = 'mcp-1' AND labels = '{\"via\": \"mcp\"}'"
        )
        .await,
        1
    );

    // A second heartbeat with less uptime is a restart of a known agent; the
    // interval now comes from the agent's mode.
    let again = call(&app, &key, "heartbeat", json!({"agent_id": "mcp-1", "uptime_seconds": 2})).await;
    let answer = &again["structuredContent"];
    assert_eq!((answer["is_new"].as_bool(), answer["restart_detected"].as_bool()), (Some(false), Some(true)));
    assert_eq!(answer["heartbeat_interval"], 30000, "the default interval of mode active");
    assert_eq!(app.count("SELECT heartbeat_count FROM warden.agent_status WHERE agent_id = 'mcp-1'").await, 2);
    assert_eq!(app.count("SELECT restart_count FROM warden.agent_status WHERE agent_id = 'mcp-1'").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_heartbeats WHERE agent_id = 'mcp-1'").await, 2);
}

#[tokio::test]
async fn bad_heartbeat_arguments_are_tool_errors_naming_the_field_and_write_nothing() {
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Ingest]).await;
    let future = (Utc::now() + chrono::Duration::minutes(10)).to_rfc3339();
    let cases = [
        (json!({"agent_id": "bad id"}), "agent_id"),
        (json!({}), "agent_id"),
        (json!({"agent_id": "a", "mode": "asleep"}), "mode"),
        (json!({"agent_id": "a", "uptime_seconds": -5}), "uptime_seconds"),
        (json!({"agent_id": "a", "next_heartbeat_ms": 0}), "next_heartbeat_ms"),
        (json!({"agent_id": "a", "sent_at": future}), "sent_at"),
        (json!({"agent_id": "a", "metrics": {"cpu": "high"}}), "metrics.cpu"),
        (json!({"agent_id": "a", "labels": {"k": 1}}), "labels.k"),
        (json!({"heartbeats": [{"agent_id": "a"}]}), "heartbeats"),
    ];
    for (arguments, field) in cases {
        let result = call(&app, &key, "heartbeat", arguments.clone()).await;
        assert_eq!(result["isError"], true, "{arguments}: {result}");
        let text = text_of(&result);
        assert!(text.contains(&format!("`{field}`")), "{arguments}: {text:?} should name {field}");
        assert!(result.get("structuredContent").is_none());
    }
    for table in ["agent_status", "agent_heartbeats", "performance_metrics"] {
        assert_eq!(app.count(&format!("SELECT count(*) FROM warden.{table}")).await, 0, "{table} must stay empty");
    }
}

#[tokio::test]
async fn agent_status_reports_the_agents_row_and_refuses_unknown_agents() {
    let app = TestApp::spawn_quiet_with(|_| {}).await;
    let key = app.key(&[Scope::Ingest, Scope::Read]).await;
    for uptime in [10, 20, 30] {
        let (status, _) =
            app.heartbeat(&key, json!({"agent_id": "seen", "uptime_seconds": uptime, "labels": {"team": "a"}})).await;
        assert_eq!(status, 200);
    }
    let result = call(&app, &key, "agent_status", json!({"agent_id": "seen"})).await;
    assert_eq!(result["isError"], false, "{result}");
    let status = &result["structuredContent"];
    assert_eq!(status["agent_id"], "seen");
    assert_eq!(status["heartbeat_count"], 3);
    assert_eq!(status["restart_count"], 0);
    assert_eq!(status["uptime_seconds"], 30);
    assert_eq!(status["liveness"], "unknown", "nothing has evaluated it yet");
    assert_eq!(status["expected_interval_ms"], 30000);
    assert_eq!(status["labels"], json!({"team": "a"}));
    assert_eq!(status["status"], "healthy");
    assert!(time(&status["first_seen"]) <= time(&status["last_seen"]));
    let text: Value = serde_json::from_str(text_of(&result)).unwrap();
    assert_eq!(&text, status);

    let unknown = call(&app, &key, "agent_status", json!({"agent_id": "never-seen"})).await;
    assert_eq!(unknown["isError"], true);
    assert!(text_of(&unknown).contains("unknown agent"), "{unknown}");

    for arguments in [json!({"agent_id": "bad id"}), json!({}), json!({"agent_id": 5})] {
        let refused = call(&app, &key, "agent_status", arguments.clone()).await;
        assert_eq!(refused["isError"], true, "{arguments}");
        assert!(text_of(&refused).contains("`agent_id`"), "{arguments}: {refused}");
    }
}

#[tokio::test]
async fn protocol_mistakes_get_json_rpc_errors() {
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Ingest, Scope::Read]).await;
    let cases = [
        (request(1, "resources/list", json!({})), -32601),
        (request(2, "tools/call", json!({"name": "no_such_tool", "arguments": {}})), -32602),
        (request(3, "tools/call", json!({"arguments": {"agent_id": "a"}})), -32602),
        (request(4, "tools/call", json!({"name": "heartbeat", "arguments": "agent_id=a"})), -32602),
        (request(5, "tools/list", json!([1, 2])), -32602),
    ];
    for (body, code) in cases {
        let (status, answer) = rpc(&app, &key, &body).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
        assert_eq!(answer["id"], body["id"]);
        assert!(!answer["error"]["message"].as_str().unwrap().is_empty());
        assert!(answer.get("result").is_none());
    }
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status").await, 0, "nothing ran");

    let response = app.post_raw("/mcp", &key, r#"{"jsonrpc": "2.0", "id": 1, "method": "#).await;
    assert_eq!(response.status(), 400);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"]["code"], -32700);
    assert_eq!(answer["id"], Value::Null);
    assert!(answer.as_object().unwrap().contains_key("id"), "id is present, as null");

    for (raw, id) in [(r#"{"jsonrpc": "1.0", "id": 9, "method": "ping"}"#, json!(9)), ("42", Value::Null)] {
        let response = app.post_raw("/mcp", &key, raw).await;
        assert_eq!(response.status(), 400, "{raw}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!((&answer["error"]["code"], &answer["id"]), (&json!(-32600), &id), "{raw}");
    }
}

#[tokio::test]
async fn a_batch_is_answered_with_an_array_of_the_responses_in_order() {
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Ingest]).await;
    let batch = json!([
        request(1, "ping", json!({})),
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        request(2, "tools/call", json!({"name": "heartbeat", "arguments": {"agent_id": "batched"}})),
        request(3, "no/such/method", json!({})),
        {"jsonrpc": "2.0", "id": 4},
        "not a message",
    ]);
    let (status, answer) = rpc(&app, &key, &batch).await;
    assert_eq!(status, 200, "{answer}");
    let replies = answer.as_array().unwrap();
    let ids: Vec<&Value> = replies.iter().map(|r| &r["id"]).collect();
    assert_eq!(ids, [&json!(1), &json!(2), &json!(3), &json!(4), &Value::Null], "no reply to the notification");
    assert_eq!(replies[0]["result"], json!({}));
    assert_eq!(replies[1]["result"]["structuredContent"]["agent"], "batched");
    assert_eq!(replies[2]["error"]["code"], -32601);
    assert_eq!(replies[3]["error"]["code"], -32600);
    assert_eq!(replies[4]["error"]["code"], -32600);
    assert_eq!(app.count("SELECT heartbeat_count FROM warden.agent_status WHERE agent_id = 'batched'").await, 1);

    let only_notifications = json!([
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}},
    ]);
    assert_eq!(rpc(&app, &key, &only_notifications).await, (202, Value::Null));

    let (status, answer) = rpc(&app, &key, &json!([])).await;
    assert_eq!((status, &answer["error"]["code"]), (400, &json!(-32600)));

    // Past the batch limit nothing runs.
    let heartbeat =
        |i: i64| request(i, "tools/call", json!({"name": "heartbeat", "arguments": {"agent_id": format!("many-{i}")}}));
    let (status, answer) = rpc(&app, &key, &Value::Array((0..101).map(heartbeat).collect())).await;
    assert_eq!((status, &answer["error"]["code"]), (400, &json!(-32600)), "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("at most 100"), "{answer}");
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status WHERE agent_id LIKE 'many-%'").await, 0);
    let (status, answer) = rpc(&app, &key, &Value::Array((0..100).map(heartbeat).collect())).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status WHERE agent_id LIKE 'many-%'").await, 100);
}

#[tokio::test]
async fn keys_and_scopes_are_checked_like_the_rest_of_the_api() {
    let app = TestApp::spawn().await;
    let ping = request(1, "ping", json!({}));

    let anonymous = app.http.post(app.url("/mcp")).json(&ping).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    let error: Value = anonymous.json().await.unwrap();
    assert_eq!(error["error"]["code"], "unauthorized");
    let (_, made_up) = warden::auth::generate();
    assert_eq!(rpc(&app, &made_up, &ping).await.0, 401);
    assert_eq!(rpc(&app, "wdn_garbage", &ping).await.0, 401);

    // Either scope may connect and list; each tool needs its own.
    let ingest = app.key(&[Scope::Ingest]).await;
    let read = app.key(&[Scope::Read]).await;
    for key in [&ingest, &read] {
        assert_eq!(rpc(&app, key, &ping).await.0, 200);
        assert_eq!(rpc(&app, key, &request(2, "tools/list", json!({}))).await.0, 200);
    }
    let status_call = request(3, "tools/call", json!({"name": "agent_status", "arguments": {"agent_id": "a"}}));
    let response = app.post("/mcp", &ingest, &status_call).await;
    assert_eq!(response.status(), 403);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "forbidden");
    assert!(error["error"]["message"].as_str().unwrap().contains("read"), "{error}");

    let heartbeat_call = request(4, "tools/call", json!({"name": "heartbeat", "arguments": {"agent_id": "a"}}));
    let (status, error) = rpc(&app, &read, &heartbeat_call).await;
    assert_eq!(status, 403);
    assert!(error["error"]["message"].as_str().unwrap().contains("ingest"), "{error}");
    // A batch with one forbidden call does nothing at all.
    let (status, _) = rpc(&app, &ingest, &json!([heartbeat_call, status_call])).await;
    assert_eq!(status, 403);
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status").await, 0);

    let admin = app.key(&[Scope::Admin]).await;
    assert_eq!(call(&app, &admin, "heartbeat", json!({"agent_id": "a"})).await["isError"], false);
    assert_eq!(call(&app, &admin, "agent_status", json!({"agent_id": "a"})).await["isError"], false);
}

#[tokio::test]
async fn with_auth_disabled_no_key_is_needed() {
    let app = TestApp::spawn_with(|s| s.auth.enabled = false).await;
    let body = request(1, "tools/call", json!({"name": "heartbeat", "arguments": {"agent_id": "open"}}));
    let response = app.http.post(app.url("/mcp")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["result"]["structuredContent"]["status"], "alive");
}

#[tokio::test]
async fn transport_rules_get_405_400_403_and_413() {
    let app = TestApp::spawn_with(|s| s.ingest.max_body_bytes = 2048).await;
    let key = app.key(&[Scope::Ingest]).await;

    let get = app.http.get(app.url("/mcp")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(get.status(), 405, "no SSE stream is offered");
    assert_eq!(get.headers()["allow"], "POST");

    let ping = request(1, "ping", json!({}));
    let with_header = |version: &'static str| {
        app.http.post(app.url("/mcp")).bearer_auth(&key).header("mcp-protocol-version", version).json(&ping).send()
    };
    assert_eq!(with_header("2025-03-26").await.unwrap().status(), 200);
    assert_eq!(with_header("1999-01-01").await.unwrap().status(), 400);

    let foreign = app.http.post(app.url("/mcp")).bearer_auth(&key).header("origin", "https://elsewhere.example");
    assert_eq!(foreign.json(&ping).send().await.unwrap().status(), 403);
    let own = app.http.post(app.url("/mcp")).bearer_auth(&key).header("origin", format!("http://{}", app.addr));
    assert_eq!(own.json(&ping).send().await.unwrap().status(), 200);

    let big = request(
        2,
        "tools/call",
        json!({"name": "heartbeat", "arguments": {"agent_id": "a", "name": "n".repeat(4000)}}),
    );
    let response = app.post("/mcp", &key, &big).await;
    assert_eq!(response.status(), 413);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "payload_too_large");
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status").await, 0);
}

#[tokio::test]
async fn a_batch_is_held_to_ingest_max_batch_when_that_is_lower() {
    let app = TestApp::spawn_with(|s| s.ingest.max_batch = 3).await;
    let key = app.key(&[Scope::Ingest]).await;
    let pings = |n: i64| Value::Array((0..n).map(|i| request(i, "ping", json!({}))).collect());
    let (status, answer) = rpc(&app, &key, &pings(4)).await;
    assert_eq!((status, &answer["error"]["code"]), (400, &json!(-32600)), "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("at most 3"), "{answer}");
    assert_eq!(rpc(&app, &key, &pings(3)).await.0, 200);
}
