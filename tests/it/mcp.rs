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
        ("2025-11-25", "2025-11-25"),
        ("1999-01-01", "2025-11-25"),
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
    let key = app.key(&[Scope::Ingest, Scope::Read]).await;
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

/// Checks `value` against the parts of JSON Schema warden's output schemas
/// use (type, const, enum, properties, required, additionalProperties,
/// minimum, maximum, format date-time); every property of an object must
/// be declared, so the schema documents the whole answer.
fn conforms(value: &Value, schema: &Value, at: &str) -> Result<(), String> {
    let kinds: Vec<&str> = match &schema["type"] {
        Value::String(kind) => vec![kind.as_str()],
        Value::Array(kinds) => kinds.iter().map(|k| k.as_str().unwrap()).collect(),
        _ => vec![],
    };
    let kind = match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let integer_as_number = kind == "integer" && kinds.contains(&"number");
    if !(kinds.is_empty() || kinds.contains(&kind) || integer_as_number) {
        return Err(format!("{at}: {value} is not of type {kinds:?}"));
    }
    if let Some(constant) = schema.get("const").filter(|c| *c != value) {
        return Err(format!("{at}: {value} is not {constant}"));
    }
    if let Some(Value::Array(allowed)) = schema.get("enum")
        && !allowed.contains(value)
    {
        return Err(format!("{at}: {value} is not one of {allowed:?}"));
    }
    if let (Some(n), Some(min)) = (value.as_f64(), schema.get("minimum").and_then(Value::as_f64))
        && n < min
    {
        return Err(format!("{at}: {n} < {min}"));
    }
    if let (Some(n), Some(max)) = (value.as_f64(), schema.get("maximum").and_then(Value::as_f64))
        && n > max
    {
        return Err(format!("{at}: {n} > {max}"));
    }
    if schema["format"] == "date-time"
        && let Value::String(text) = value
    {
        chrono::DateTime::parse_from_rfc3339(text).map_err(|e| format!("{at}: {text}: {e}"))?;
    }
    if let Value::Object(object) = value {
        for required in schema["required"].as_array().into_iter().flatten() {
            let name = required.as_str().unwrap();
            if !object.contains_key(name) {
                return Err(format!("{at}: {name} is required"));
            }
        }
        for (name, item) in object {
            let declared = match (&schema["properties"][name], &schema["additionalProperties"]) {
                (Value::Object(declared), _) => Value::Object(declared.clone()),
                (_, Value::Object(rest)) => Value::Object(rest.clone()),
                _ => return Err(format!("{at}: {name} is not declared")),
            };
            conforms(item, &declared, &format!("{at}.{name}"))?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn tool_results_conform_to_the_output_schemas_tools_list_declares() {
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Ingest, Scope::Read]).await;
    let (_, list) = rpc(&app, &key, &request(1, "tools/list", json!({}))).await;
    let schema = |tool: &str| {
        let tools = list["result"]["tools"].as_array().unwrap();
        tools.iter().find(|t| t["name"] == tool).unwrap()["outputSchema"].clone()
    };
    let (heartbeat, status) = (schema("heartbeat"), schema("agent_status"));
    assert_eq!((&heartbeat["type"], &status["type"]), (&json!("object"), &json!("object")));

    let beat = call(&app, &key, "heartbeat", json!({"agent_id": "shaped", "mode": "idle"})).await;
    assert_eq!(beat["isError"], false, "{beat}");
    conforms(&beat["structuredContent"], &heartbeat, "heartbeat").unwrap();
    // Before the first evaluation: no score, tier or evaluation time.
    let fresh = call(&app, &key, "agent_status", json!({"agent_id": "shaped"})).await;
    assert_eq!(fresh["structuredContent"]["score"], Value::Null, "{fresh}");
    conforms(&fresh["structuredContent"], &status, "agent_status").unwrap();
    // Scored, without uptime, name or mode: the other half of each type.
    let heartbeat_only = call(&app, &key, "heartbeat", json!({"agent_id": "bare", "uptime_seconds": 5})).await;
    conforms(&heartbeat_only["structuredContent"], &heartbeat, "heartbeat").unwrap();
    app.db
        .client()
        .await
        .execute(
            "UPDATE warden.agent_status SET score = 87.5, tier = 'good', evaluated_at = now(), name = 'Shaped', \
                    labels = '{\"team\": \"a\"}' WHERE agent_id = 'shaped'",
            &[],
        )
        .await
        .unwrap();
    for agent in ["shaped", "bare"] {
        let result = call(&app, &key, "agent_status", json!({"agent_id": agent})).await;
        conforms(&result["structuredContent"], &status, agent).unwrap();
    }
    // The checker itself: an undeclared field, a wrong type, a value
    // outside an enum are caught.
    let mut wrong = fresh["structuredContent"].clone();
    wrong["liveness"] = json!("asleep");
    assert!(conforms(&wrong, &status, "x").is_err());
    wrong["liveness"] = json!("online");
    wrong["extra"] = json!(1);
    assert!(conforms(&wrong, &status, "x").is_err());
    let mut wrong = beat["structuredContent"].clone();
    wrong["heartbeat_interval"] = json!("30000");
    assert!(conforms(&wrong, &heartbeat, "x").is_err());
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
        (json!({"agent_id": "a", "metrics": {"cpu": -1e200}}), "metrics.cpu"),
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
    assert!(answer["error"]["message"].as_str().unwrap().contains("over the limit of 100"), "{answer}");
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status WHERE agent_id LIKE 'many-%'").await, 0);
    let (status, answer) = rpc(&app, &key, &Value::Array((0..100).map(heartbeat).collect())).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status WHERE agent_id LIKE 'many-%'").await, 100);
}

#[tokio::test]
async fn keys_and_scopes_are_checked_like_the_rest_of_the_api() {
    let app = TestApp::spawn().await;
    let ping = request(1, "ping", json!({}));

    // An unknown or missing key is refused for the whole connection, with
    // the HTTP status MCP clients start their authorization flow on.
    let anonymous = app.http.post(app.url("/mcp")).json(&ping).send().await.unwrap();
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    let error = refusal(anonymous, 401).await;
    assert_eq!(error["error"]["data"]["reason"], "unauthorized");
    let (_, made_up) = warden::auth::generate();
    assert_eq!(rpc(&app, &made_up, &ping).await.0, 401);
    assert_eq!(rpc(&app, "wdn_garbage", &ping).await.0, 401);

    // Either scope may connect and list the tools it may call; each tool
    // needs its own scope.
    let ingest = app.key(&[Scope::Ingest]).await;
    let read = app.key(&[Scope::Read]).await;
    for (key, tool) in [(&ingest, "heartbeat"), (&read, "agent_status")] {
        assert_eq!(rpc(&app, key, &ping).await.0, 200);
        let (status, list) = rpc(&app, key, &request(2, "tools/list", json!({}))).await;
        assert_eq!(status, 200);
        let names: Vec<&Value> = list["result"]["tools"].as_array().unwrap().iter().map(|t| &t["name"]).collect();
        assert_eq!(names, [tool], "{list}");
    }
    // A forbidden call is a JSON-RPC error for that request, inside a 200:
    // SDKs take an HTTP error status for a broken connection.
    let status_call = request(3, "tools/call", json!({"name": "agent_status", "arguments": {"agent_id": "a"}}));
    let heartbeat_call = request(4, "tools/call", json!({"name": "heartbeat", "arguments": {"agent_id": "a"}}));
    for (key, body, scope) in [(&ingest, &status_call, "read"), (&read, &heartbeat_call, "ingest")] {
        let (status, answer) = rpc(&app, key, body).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["id"], body["id"]);
        assert!(answer.get("result").is_none(), "{answer}");
        let error = &answer["error"];
        assert!((-32099..=-32000).contains(&error["code"].as_i64().unwrap()), "a server error code: {answer}");
        assert!(error["message"].as_str().unwrap().contains(&format!("`{scope}`")), "{answer}");
        assert_eq!(error["data"], json!({"required_scope": scope}));
    }
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status").await, 0, "the heartbeat was not recorded");

    // A batch with a forbidden call runs no tool: each forbidden call gets
    // its refusal, each other call an error saying it did not run; other
    // requests are answered.
    let other_heartbeat = request(5, "tools/call", json!({"name": "heartbeat", "arguments": {"agent_id": "b"}}));
    let (status, answer) =
        rpc(&app, &ingest, &json!([heartbeat_call, status_call, request(6, "ping", json!({})), other_heartbeat])).await;
    assert_eq!(status, 200, "{answer}");
    let replies = answer.as_array().unwrap();
    let ids: Vec<&Value> = replies.iter().map(|r| &r["id"]).collect();
    assert_eq!(ids, [&json!(4), &json!(3), &json!(6), &json!(5)]);
    assert_eq!(replies[1]["error"]["data"], json!({"required_scope": "read"}));
    for withheld in [&replies[0], &replies[3]] {
        let code = withheld["error"]["code"].as_i64().unwrap();
        assert!((-32099..=-32000).contains(&code), "{withheld}");
        assert_ne!(withheld["error"]["code"], replies[1]["error"]["code"], "not itself forbidden");
        assert!(withheld["error"]["message"].as_str().unwrap().starts_with("not run"), "{withheld}");
    }
    assert_eq!(replies[2]["result"], json!({}));
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status").await, 0, "nothing ran");

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

/// The JSON-RPC error a refusal made before dispatch carries: `id` null,
/// a numeric code, and the HTTP status again in `data`.
async fn refusal(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["jsonrpc"], "2.0", "{body}");
    assert!(body.as_object().unwrap().contains_key("id") && body["id"].is_null(), "{body}");
    assert!(body["error"]["code"].is_i64(), "{body}");
    assert!(!body["error"]["message"].as_str().unwrap().is_empty(), "{body}");
    assert_eq!(body["error"]["data"]["http_status"], status, "{body}");
    assert!(body.get("result").is_none());
    body
}

#[tokio::test]
async fn transport_rules_get_405_400_403_and_413() {
    let app = TestApp::spawn_with(|s| s.ingest.max_body_bytes = 2048).await;
    let key = app.key(&[Scope::Ingest]).await;

    let get = app.http.get(app.url("/mcp")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(get.headers()["allow"], "POST");
    refusal(get, 405).await;
    // warden keeps no sessions for a client to end.
    for method in [reqwest::Method::DELETE, reqwest::Method::PUT] {
        let refused = app.http.request(method.clone(), app.url("/mcp")).bearer_auth(&key).send().await.unwrap();
        assert_eq!(refused.headers()["allow"], "POST", "{method}: only POST works");
        refusal(refused, 405).await;
    }

    let ping = request(1, "ping", json!({}));
    let with_header = |version: &'static str, body: &Value| {
        app.http.post(app.url("/mcp")).bearer_auth(&key).header("mcp-protocol-version", version).json(body).send()
    };
    assert_eq!(with_header("2025-03-26", &ping).await.unwrap().status(), 200);
    let body = refusal(with_header("1999-01-01", &ping).await.unwrap(), 400).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("2025-11-25"), "{body}");

    let foreign = app.http.post(app.url("/mcp")).bearer_auth(&key).header("origin", "https://elsewhere.example");
    refusal(foreign.json(&ping).send().await.unwrap(), 403).await;
    let own = app.http.post(app.url("/mcp")).bearer_auth(&key).header("origin", format!("http://{}", app.addr));
    assert_eq!(own.json(&ping).send().await.unwrap().status(), 200);

    let big = request(
        2,
        "tools/call",
        json!({"name": "heartbeat", "arguments": {"agent_id": "a", "name": "n".repeat(4000)}}),
    );
    let body = refusal(app.post("/mcp", &key, &big).await, 413).await;
    assert_eq!(body["error"]["data"]["reason"], "payload_too_large");
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status").await, 0);

    // JSON-RPC errors of the protocol itself keep their own codes.
    let response = app.post_raw("/mcp", &key, "{").await;
    assert_eq!(response.status(), 400);
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["code"], -32700);
    // A number no double holds is one too, located as the REST path locates it.
    let huge = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call",
                   "params":{"name":"heartbeat","arguments":{"agent_id":"a","metrics":{"cpu":1e999}}}}"#;
    let response = app.post_raw("/mcp", &key, huge).await;
    assert_eq!(response.status(), 400);
    let error = &response.json::<Value>().await.unwrap()["error"];
    assert_eq!(
        (error["code"].as_i64(), error["data"]["field"].as_str()),
        (Some(-32700), Some("params.arguments.metrics.cpu"))
    );
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status").await, 0);
}

#[tokio::test]
async fn the_protocol_version_header_is_checked_on_every_request_but_initialize() {
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Ingest]).await;
    let (app, key) = (&app, &key);
    let post = |version: &'static str, body: Value| async move {
        let response = app
            .http
            .post(app.url("/mcp"))
            .bearer_auth(key)
            .header("mcp-protocol-version", version)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json::<Value>().await.unwrap())
    };
    let (status, list) = post("2025-11-25", request(1, "tools/list", json!({}))).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["result"]["tools"][0]["name"], "heartbeat");

    // A client may send the header it hopes for on initialize too; it
    // learns the revision warden speaks from the answer.
    let initialize = |id: i64| {
        request(
            id,
            "initialize",
            json!({"protocolVersion": "2099-01-01", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}),
        )
    };
    let (status, answer) = post("2099-01-01", initialize(2)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["result"]["protocolVersion"], "2025-11-25");
    let (status, answer) = post("2099-01-01", json!([initialize(3), initialize(4)])).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer[1]["result"]["protocolVersion"], "2025-11-25");

    // Anything else with that header is refused, in a batch with an
    // initialize too.
    let (status, _) = post("2099-01-01", request(5, "ping", json!({}))).await;
    assert_eq!(status, 400);
    let (status, _) = post("2099-01-01", json!([initialize(6), request(7, "ping", json!({}))])).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_outlive_the_request_timeout_are_answered_each_not_with_an_http_503() {
    // Some SDKs end their session on an HTTP error status: a stalled
    // database must not cost an agent its session.
    let app = TestApp::spawn_with(|s| {
        s.server.request_timeout = warden::config::Duration::from_secs(3);
        s.ingest.writers = 1;
    })
    .await;
    let key = app.key(&[Scope::Ingest, Scope::Read]).await;
    let beat = |id: i64, agent: &str| {
        request(id, "tools/call", json!({"name": "heartbeat", "arguments": {"agent_id": agent}}))
    };
    for (id, agent) in [(1, "stalled"), (2, "queued")] {
        let (status, answer) = rpc(&app, &key, &beat(id, agent)).await;
        assert_eq!((status, &answer["result"]["isError"]), (200, &json!(false)), "{answer}");
    }

    // The agent's row is locked: the writer's transaction waits inside
    // PostgreSQL, past the answer's time.
    let mut blocker = app.db.client().await;
    let lock = blocker.transaction().await.unwrap();
    lock.execute("SELECT 1 FROM warden.agent_status WHERE agent_id = 'stalled' FOR UPDATE", &[]).await.unwrap();
    let status_call = request(4, "tools/call", json!({"name": "agent_status", "arguments": {"agent_id": "stalled"}}));
    let notification = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let response = app.post("/mcp", &key, &json!([beat(3, "stalled"), status_call, notification])).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("retry-after"));
    let answer: Value = response.json().await.unwrap();
    let answers = answer.as_array().unwrap();
    assert_eq!(answers.len(), 2, "{answer}");
    assert_eq!((&answers[0]["id"], &answers[0]["result"]["isError"]), (&json!(3), &json!(true)), "{answer}");
    let text = answers[0]["result"]["content"][0]["text"].as_str().unwrap();
    assert!(text.contains("may still be stored"), "{text}");
    assert_eq!((&answers[1]["id"], &answers[1]["error"]["code"]), (&json!(4), &json!(-32000)), "{answer}");
    assert_eq!(answers[1]["error"]["data"]["http_status"], 503);
    assert!(answers[1]["error"]["message"].as_str().unwrap().starts_with("not run"), "{answer}");

    // Another call waits behind it in the writer's queue: abandoned, so
    // never stored.
    let (status, answer) = rpc(&app, &key, &beat(5, "queued")).await;
    assert_eq!((status, &answer["result"]["isError"]), (200, &json!(true)), "{answer}");
    let text = answer["result"]["content"][0]["text"].as_str().unwrap();
    assert!(text.contains("abandoned"), "{text}");

    lock.commit().await.unwrap();
    let (_, after) = rpc(&app, &key, &beat(6, "after")).await;
    assert_eq!(after["result"]["isError"], false, "{after}");
    assert_eq!(
        app.count("SELECT heartbeat_count FROM warden.agent_status WHERE agent_id = 'stalled'").await,
        2,
        "the stalled write committed, as its answer warned"
    );
    assert_eq!(app.count("SELECT heartbeat_count FROM warden.agent_status WHERE agent_id = 'queued'").await, 1);

    // A key that cannot be checked in time: each request refused, to retry.
    let fresh = app.key(&[Scope::Ingest]).await;
    let lock = blocker.transaction().await.unwrap();
    lock.execute("LOCK TABLE warden.api_keys IN ACCESS EXCLUSIVE MODE", &[]).await.unwrap();
    let response = app.post("/mcp", &fresh, &beat(7, "fresh")).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("retry-after"));
    let answer: Value = response.json().await.unwrap();
    assert_eq!((&answer["id"], &answer["error"]["code"]), (&json!(7), &json!(-32000)), "{answer}");
    assert_eq!(answer["error"]["data"]["http_status"], 503);
    assert!(answer["error"]["message"].as_str().unwrap().contains("in time"), "{answer}");
    lock.rollback().await.unwrap();
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status WHERE agent_id = 'fresh'").await, 0);
}

#[tokio::test]
async fn refusals_answer_each_request_when_waiting_helps_and_keep_their_status_otherwise() {
    let app = TestApp::spawn_with(|s| {
        // A token every 100 s: none comes back while the test runs.
        s.limits.rate_per_second = 0.01;
        s.limits.burst = 2;
        s.server.request_timeout = warden::config::Duration::from_secs(1);
    })
    .await;
    let ping = request(1, "ping", json!({}));

    let anonymous = app.http.post(app.url("/mcp")).json(&ping).send().await.unwrap();
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    let body = refusal(anonymous, 401).await;
    assert_eq!(body["error"]["data"]["reason"], "unauthorized");

    // The key's rate limit: each request of the body gets the refusal as
    // its own error, with HTTP 200, since some SDKs end the session on an
    // HTTP error; nothing runs.
    let key = app.key(&[Scope::Ingest]).await;
    for _ in 0..2 {
        assert_eq!(rpc(&app, &key, &ping).await.0, 200);
    }
    let beat = |id: i64| request(id, "tools/call", json!({"name": "heartbeat", "arguments": {"agent_id": "fast"}}));
    let limited = app.post("/mcp", &key, &beat(3)).await;
    assert_eq!(limited.status(), 200);
    let retry_after: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    let body: Value = limited.json().await.unwrap();
    assert_eq!((&body["id"], &body["error"]["code"]), (&json!(3), &json!(-32000)), "{body}");
    let data = &body["error"]["data"];
    assert_eq!(
        (&data["http_status"], &data["reason"], &data["retry_after"]),
        (&json!(429), &json!("rate_limited"), &json!(retry_after))
    );
    let notification = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let (status, answer) = rpc(&app, &key, &json!([beat(4), notification, ping, 7])).await;
    assert_eq!(status, 200);
    let ids: Vec<_> =
        answer.as_array().unwrap().iter().map(|a| (a["id"].clone(), a["error"]["code"].clone())).collect();
    assert_eq!(ids, [(json!(4), json!(-32000)), (json!(1), json!(-32000)), (json!(null), json!(-32600))], "{answer}");
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_heartbeats").await, 0, "no call ran");
    // Notifications alone have no request to answer: the HTTP status stays.
    let limited = app.post("/mcp", &key, &notification).await;
    let retry_after: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    let body = refusal(limited, 429).await;
    assert_eq!(body["error"]["data"]["retry_after"], retry_after);
    // So does a body not worth reading for a refused client (over 64 KiB),
    // or not JSON-RPC: the refusal, not the body's fault, is answered.
    let large = request(8, "tools/call", json!({"name": "heartbeat", "arguments": {"agent_id": "x".repeat(70_000)}}));
    assert_eq!(refusal(app.post("/mcp", &key, &large).await, 429).await["error"]["data"]["reason"], "rate_limited");
    let garbage = app.post_raw("/mcp", &key, "{not json").await;
    assert_eq!(refusal(garbage, 429).await["error"]["data"]["reason"], "rate_limited");

    // A body that stops arriving: 408 from the request timeout.
    let other = app.key(&[Scope::Read]).await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /mcp HTTP/1.1\r\nhost: warden\r\nauthorization: Bearer {other}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"jsonrpc\":"
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the connection is closed after the timeout");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let body: Value = serde_json::from_str(&answer[answer.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!((&body["jsonrpc"], &body["error"]["data"]["http_status"]), (&json!("2.0"), &json!(408)), "{body}");
}

#[tokio::test]
async fn a_batch_is_held_to_ingest_max_batch_when_that_is_lower() {
    let app = TestApp::spawn_with(|s| s.ingest.max_batch = 3).await;
    let key = app.key(&[Scope::Ingest]).await;
    let pings = |n: i64| Value::Array((0..n).map(|i| request(i, "ping", json!({}))).collect());
    let (status, answer) = rpc(&app, &key, &pings(4)).await;
    assert_eq!((status, &answer["error"]["code"]), (400, &json!(-32600)), "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("over the limit of 3"), "{answer}");
    assert_eq!(rpc(&app, &key, &pings(3)).await.0, 200);
}

#[tokio::test]
async fn the_heartbeat_tool_reports_only_for_the_agents_of_a_limited_key() {
    let app = TestApp::spawn().await;
    let patterns = ["worker-*".to_string()];
    let key = warden::auth::create_key_for(&app.db.client().await, "workers", &[Scope::Ingest], Some(&patterns))
        .await
        .unwrap()
        .token;
    let result = call(&app, &key, "heartbeat", json!({"agent_id": "worker-7"})).await;
    assert_eq!(result["isError"], false, "{result}");
    let result = call(&app, &key, "heartbeat", json!({"agent_id": "planner"})).await;
    assert_eq!(result["isError"], true);
    assert!(text_of(&result).contains("may not report for agent `planner`"), "{result}");
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status WHERE agent_id = 'planner'").await, 0);
}
