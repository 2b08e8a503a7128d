//! Hostile input: the OpenAPI document against the routes served, oversized
//! and deeply nested bodies, slow clients, and floods (rate limits).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warden::auth::Scope;
use warden::config::Duration as SettingsDuration;

use crate::helpers::TestApp;

/// The documented operations: (method, path).
async fn documented(app: &TestApp) -> Vec<(String, String, Value)> {
    let response = app.get("/openapi.json").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let document: Value = response.json().await.unwrap();
    assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
    let mut out = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            out.push((method.to_uppercase(), path.clone(), operation.clone()));
        }
    }
    out
}

/// A documented path with its parameters filled in.
fn concrete(path: &str) -> String {
    path.replace("/agents/{id}", "/agents/worker-1").replace("{id}", "1")
}

async fn send(app: &TestApp, method: &str, path: &str, key: &str, body: Vec<u8>) -> reqwest::Response {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    app.http
        .request(method, app.url(path))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert!(body["error"]["code"].is_string() && body["error"]["message"].is_string(), "{status}: {body}");
    (status, body)
}

#[tokio::test]
async fn every_documented_operation_is_served() {
    let app = TestApp::spawn().await;
    let admin = app.key(&[Scope::Admin]).await;
    app.heartbeat(&admin, json!({"agent_id": "worker-1"})).await;
    let operations = documented(&app).await;
    assert!(operations.len() >= 20, "{operations:?}");
    for (method, path, operation) in operations {
        let url = concrete(&path);
        let response = send(&app, &method, &url, &admin, b"{}".to_vec()).await;
        let status = response.status().as_u16();
        let documented = operation["responses"].get(status.to_string()).is_some();
        let body = if path == "/v1/stream" || path == "/metrics" {
            Value::Null // an endless stream, and Prometheus text
        } else {
            response.json().await.unwrap_or(Value::Null)
        };
        assert!(
            !(status == 404 && body["error"]["message"].as_str().is_some_and(|m| m.starts_with("no such endpoint"))),
            "{method} {path} is documented but not routed"
        );
        assert!(status != 405 || documented, "{method} {path} is documented but not routed for {method}");
        assert!(documented, "{method} {url} answered {status}, which its operation does not document: {body}");
    }
}

#[tokio::test]
async fn undocumented_paths_and_methods_get_json_errors() {
    let app = TestApp::spawn().await;
    let (status, body) = error_of(app.get("/v1/nothing-here").await).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
    let response = app.http.put(app.url("/v1/heartbeats")).send().await.unwrap();
    let (status, body) = error_of(response).await;
    assert_eq!((status, body["error"]["code"].as_str()), (405, Some("method_not_allowed")));
}

#[tokio::test]
async fn oversized_bodies_get_413_on_every_post_endpoint() {
    let app = TestApp::spawn_with(|s| s.ingest.max_body_bytes = 4096).await;
    let admin = app.key(&[Scope::Admin]).await;
    app.heartbeat(&admin, json!({"agent_id": "worker-1"})).await;
    let posts: Vec<_> = documented(&app).await.into_iter().filter(|(m, _, _)| m == "POST").collect();
    assert!(posts.len() >= 6, "{posts:?}");
    // A JSON object just over the limit: declared up front, and streamed in
    // chunks with no Content-Length.
    let big = format!("{{\"agent_id\": \"worker-1\", \"pad\": \"{}\"}}", "x".repeat(4096));
    for (_, path, _) in posts {
        let url = concrete(&path);
        let response = send(&app, "POST", &url, &admin, big.clone().into_bytes()).await;
        if path == "/mcp" {
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            assert_eq!((status, &body["error"]["data"]["reason"]), (413, &json!("payload_too_large")), "{body}");
        } else {
            let (status, body) = error_of(response).await;
            assert_eq!((status, body["error"]["code"].as_str()), (413, Some("payload_too_large")), "{path}");
        }
        let mut stream = TcpStream::connect(app.addr).await.unwrap();
        let head = format!(
            "POST {url} HTTP/1.1\r\nhost: warden\r\nauthorization: Bearer {admin}\r\n\
             content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        for chunk in big.as_bytes().chunks(1000) {
            let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
            if stream.write_all(&framed).await.is_err() {
                break; // refused before the end
            }
        }
        let _ = stream.write_all(b"0\r\n\r\n").await;
        let mut answer = vec![0u8; 12];
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 413", "{path}, chunked");
    }
    assert_eq!(app.get("/healthz").await.status(), 200);
}

/// `depth` nested arrays.
fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn deeply_nested_json_gets_400_and_warden_stays_up() {
    let app = TestApp::spawn().await;
    let admin = app.key(&[Scope::Admin]).await;
    app.heartbeat(&admin, json!({"agent_id": "worker-1"})).await;
    let deep = nested(10_000);
    let posts: Vec<_> = documented(&app).await.into_iter().filter(|(m, _, _)| m == "POST").collect();
    for (_, path, _) in &posts {
        let response = send(&app, "POST", &concrete(path), &admin, deep.clone().into_bytes()).await;
        assert_eq!(response.status(), 400, "{path}");
        if path == "/mcp" {
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], -32700, "a JSON-RPC parse error: {body}");
        } else {
            error_of(response).await;
        }
    }
    // Deep values where a JSON value is read whole hit serde_json's
    // recursion limit (128) and are refused the same way.
    let cases = [
        ("/v1/events", format!(r#"{{"agent_id":"worker-1","event_type":"x","message":"m","details":{{"a":{deep}}}}}"#)),
        ("/mcp", format!(r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"a":{deep}}}}}"#)),
        ("/v1/silences", format!(r#"{{"agent_id":"worker-1","duration":"1h","comment":{deep}}}"#)),
        ("/v1/heartbeats", format!(r#"{{"agent_id":"worker-1","metrics":{{"cpu":{{"value":{deep}}}}}}}"#)),
    ];
    for (path, body) in cases {
        let response = send(&app, "POST", path, &admin, body.into_bytes()).await;
        let status = response.status().as_u16();
        assert!(status == 400 || status == 422, "{path}: {status}");
    }
    // Unknown heartbeat fields are skipped without recursion, however deep.
    let (status, _) = app
        .heartbeat(
            &admin,
            serde_json::from_str(&format!(r#"{{"agent_id":"worker-1","future":{}}}"#, nested(100))).unwrap(),
        )
        .await;
    assert_eq!(status, 200);
    let raw = format!(r#"{{"agent_id":"worker-1","future":{deep}}}"#);
    let response = send(&app, "POST", "/v1/heartbeats", &admin, raw.into_bytes()).await;
    assert_eq!(response.status(), 200, "an ignored field is not read, so not recursed into");
    // Deep objects too.
    let objects = format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
    for (_, path, _) in &posts {
        let status = send(&app, "POST", &concrete(path), &admin, objects.clone().into_bytes()).await.status();
        assert!(status.is_client_error() || status.is_success(), "{path}: {status}");
    }
    assert_eq!(app.get("/healthz").await.status(), 200, "warden survived");
    assert_eq!(app.heartbeat(&admin, json!({"agent_id": "worker-1"})).await.0, 200);
}

/// Opens a connection and sends a request head announcing `length` bytes.
async fn start_post(app: &TestApp, path: &str, key: &str, length: usize) -> TcpStream {
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: warden\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// Reads until the server closes the connection; what it sent.
async fn read_to_close(stream: &mut TcpStream, within: Duration) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server did not close the connection within {within:?}");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_trickling_body_is_cut_off_with_408_and_holds_no_database_connection() {
    let app = TestApp::spawn_with(|s| s.server.request_timeout = SettingsDuration::from_secs(3)).await;
    let key = app.key(&[Scope::Admin]).await;
    // More slow clients than the pool has connections (4).
    let mut slow = Vec::new();
    for _ in 0..8 {
        let mut stream = start_post(&app, "/v1/heartbeats", &key, 100).await;
        stream.write_all(b"{\"agent_id\":").await.unwrap();
        slow.push(stream);
    }
    let trickle = tokio::spawn(async move {
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            for stream in &mut slow {
                let _ = stream.write_all(b" ").await;
            }
        }
        slow
    });
    // Meanwhile the database is free for everyone else: had the slow
    // requests held the pool's connections, these would have waited for
    // database.acquire_timeout and got 503. (The pause lets the slow
    // requests reach their handlers first; it decides no assertion.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = app.heartbeat(&key, json!({"agent_id": "fast"})).await;
    assert_eq!(status, 200);
    assert_eq!(app.http.get(app.url("/v1/fleet")).bearer_auth(&key).send().await.unwrap().status(), 200);
    let mut slow = trickle.await.unwrap();
    for stream in &mut slow {
        let answer = read_to_close(stream, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("\"request_timeout\""), "{answer}");
        assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    }
    assert_eq!(
        app.count("SELECT count(*) FROM warden.agent_status").await,
        1,
        "nothing of the slow bodies was written"
    );
}

/// A key check stuck on the database is warden's slowness, not the
/// client's: 503 with Retry-After, although the body was never read.
#[tokio::test]
async fn a_request_timed_out_before_warden_read_its_body_is_503_not_408() {
    let app = TestApp::spawn_with(|s| s.server.request_timeout = SettingsDuration::from_secs(2)).await;
    let key = app.key(&[Scope::Ingest]).await;
    let mut holder = app.db.client().await;
    let lock = holder.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE warden.api_keys IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let response = app
        .http
        .post(app.url("/v1/heartbeats"))
        .bearer_auth(&key)
        .json(&json!({"agent_id": "patient"}))
        .send()
        .await
        .unwrap();
    lock.rollback().await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status").await, 0, "nothing was written");
}

#[tokio::test]
async fn slow_or_absent_request_headers_close_the_connection() {
    let app = TestApp::spawn_with(|s| s.server.header_read_timeout = SettingsDuration::from_millis(500)).await;
    // Half a request head, then nothing.
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(b"POST /v1/heartbeats HTTP/1.1\r\nhost: warden\r\n").await.unwrap();
    let started = Instant::now();
    let answer = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(400), "{:?}", started.elapsed());
    // A header trickled byte by byte does not reset the clock.
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let started = Instant::now();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: warden\r\nx-slow: ").await.unwrap();
    while started.elapsed() < Duration::from_secs(5) {
        if stream.write_all(b"a").await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Cut off at 0.5 s; the trickle itself would go on for 5 s.
    assert!(started.elapsed() < Duration::from_secs(4), "the trickled head was cut off: {:?}", started.elapsed());
    // An idle keep-alive connection is closed after the same time.
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: warden\r\n\r\n").await.unwrap();
    let answer = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // And the server still serves.
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn a_flood_from_one_key_gets_429_with_retry_after() {
    let app = TestApp::spawn_with(|s| {
        s.limits.rate_per_second = 0.1;
        s.limits.burst = 5;
    })
    .await;
    let reader = app.key(&[Scope::Read]).await;
    let other = app.key(&[Scope::Ingest]).await;
    for i in 0..5 {
        let response = app.http.get(app.url("/v1/fleet")).bearer_auth(&reader).send().await.unwrap();
        assert_eq!(response.status(), 200, "request {i} is within the burst");
    }
    let response = app.http.get(app.url("/v1/fleet")).bearer_auth(&reader).send().await.unwrap();
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=10).contains(&retry_after), "one token every 10 s: {retry_after}");
    let (status, body) = error_of(response).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("rate_limited")));
    // The same key on /mcp, too (the refusal answers the request there).
    let mcp = app
        .http
        .post(app.url("/mcp"))
        .bearer_auth(&reader)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .unwrap();
    let mcp: serde_json::Value = mcp.json().await.unwrap();
    assert_eq!(mcp["error"]["data"]["http_status"], 429, "{mcp}");
    // Other keys have their own budget; probes are never limited.
    assert_eq!(app.heartbeat(&other, json!({"agent_id": "a"})).await.0, 200);
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(app.get(path).await.status(), 200, "{path}");
    }
    // A forbidden request still counts against its key.
    let response = app.http.post(app.url("/v1/heartbeats")).bearer_auth(&reader).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 429);
}

#[tokio::test]
async fn failed_authentication_is_limited_per_address_without_hurting_known_keys() {
    let app = TestApp::spawn_with(|s| {
        s.limits.failed_auth_per_second = 0.01;
        s.limits.failed_auth_burst = 3;
        s.auth.cache_ttl = warden::config::Duration::from_secs(1);
    })
    .await;
    let known = app.key(&[Scope::Read]).await;
    let unknown_yet = app.key(&[Scope::Read]).await;
    let fleet = |key: String| {
        let request = app.http.get(app.url("/v1/fleet"));
        async move { if key.is_empty() { request } else { request.bearer_auth(key) }.send().await.unwrap().status() }
    };
    assert_eq!(fleet(known.clone()).await, 200, "verified, and so remembered");
    let (made_up_id, made_up) = warden::auth::generate();
    assert!(!made_up_id.is_empty());
    assert_eq!(fleet(made_up.clone()).await, 401);
    assert_eq!(fleet(String::new()).await, 401);
    assert_eq!(fleet("Bearer nonsense".into()).await, 401);
    // The address has used up its failures: guesses get 429 without being
    // checked, so a right guess looks the same as a wrong one.
    let response = app.http.get(app.url("/v1/fleet")).bearer_auth(&made_up).send().await.unwrap();
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(response.status(), 429);
    let body: serde_json::Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("failed authentication") && message.contains("API key"), "{message}");
    assert_eq!(fleet(unknown_yet.clone()).await, 429, "a key not verified recently is not checked either");
    assert_eq!(fleet(known.clone()).await, 200, "a recently verified key still works from this address");
    // Past the cache's TTL too: the lookup that renews it is let through.
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    assert_eq!(fleet(known).await, 200, "a key in use keeps working past auth.cache_ttl");
    assert_eq!(fleet(unknown_yet).await, 429);
}

#[tokio::test]
async fn made_up_secrets_for_a_real_key_id_do_not_spend_its_budget() {
    let app = TestApp::spawn_with(|s| {
        s.limits.rate_per_second = 0.01;
        s.limits.burst = 2;
    })
    .await;
    let key = app.key(&[Scope::Read]).await;
    let forged = format!("{}{}", &key[..key.len() - 4], if key.ends_with("0000") { "1111" } else { "0000" });
    for _ in 0..10 {
        let response = app.http.get(app.url("/v1/fleet")).bearer_auth(&forged).send().await.unwrap();
        assert_eq!(response.status(), 401);
    }
    for _ in 0..2 {
        assert_eq!(app.http.get(app.url("/v1/fleet")).bearer_auth(&key).send().await.unwrap().status(), 200);
    }
    assert_eq!(app.http.get(app.url("/v1/fleet")).bearer_auth(&key).send().await.unwrap().status(), 429);
}

#[tokio::test]
async fn with_authentication_off_each_address_gets_the_key_budget() {
    let app = TestApp::spawn_with(|s| {
        s.auth.enabled = false;
        s.limits.rate_per_second = 0.01;
        s.limits.burst = 3;
    })
    .await;
    for _ in 0..3 {
        assert_eq!(app.http.get(app.url("/v1/fleet")).send().await.unwrap().status(), 200);
    }
    assert_eq!(app.http.get(app.url("/v1/fleet")).send().await.unwrap().status(), 429);
}

#[tokio::test]
async fn limits_can_be_turned_off() {
    let app = TestApp::spawn_with(|s| {
        s.limits.enabled = false;
        s.limits.burst = 1;
        s.limits.failed_auth_burst = 1;
    })
    .await;
    let key = app.key(&[Scope::Read]).await;
    for _ in 0..5 {
        assert_eq!(app.http.get(app.url("/v1/fleet")).bearer_auth(&key).send().await.unwrap().status(), 200);
        assert_eq!(app.http.get(app.url("/v1/fleet")).send().await.unwrap().status(), 401);
    }
}

#[tokio::test]
async fn values_postgresql_cannot_store_are_refused_not_failed() {
    let app = TestApp::spawn().await;
    let admin = app.key(&[Scope::Admin]).await;
    app.heartbeat(&admin, json!({"agent_id": "worker-1"})).await;
    let cases = [
        ("/v1/events", json!({"agent_id": "worker-1", "event_type": "x", "message": "a\u{0}b"}), "message"),
        (
            "/v1/events",
            json!({"agent_id": "worker-1", "event_type": "x", "message": "m", "details": {"k": ["\u{0}"]}}),
            "details",
        ),
        ("/v1/silences", json!({"agent_id": "worker-1", "duration": "1h", "comment": "a\u{0}"}), "comment"),
        ("/v1/silences", json!({"labels": {"role": "a\u{0}"}, "duration": "1h", "comment": "c"}), "labels"),
        (
            "/v1/silences",
            json!({"agent_id": "worker-1", "duration": "1h", "comment": "c", "created_by": "\u{0}"}),
            "created_by",
        ),
        // An end beyond the calendar used to panic the handler.
        ("/v1/silences", json!({"agent_id": "worker-1", "duration": "1000000y", "comment": "forever"}), "duration"),
        ("/v1/alerts/1/ack", json!({"comment": "\u{0}"}), "comment"),
        // Wrong types and missing fields are named too.
        ("/v1/alerts/1/ack", json!({"by": 5}), "by"),
        ("/v1/silences", json!({"agent_id": "worker-1", "duration": "1h"}), "comment"),
        (
            "/v1/silences",
            json!({"agent_id": "worker-1", "duration": "1h", "comment": "c", "labels": {"a": 1}}),
            "labels.a",
        ),
        ("/v1/agents/worker-1/recover", json!({"strategy": 5}), "strategy"),
        // A misspelt strategy must not run the default one.
        ("/v1/agents/worker-1/recover", json!({"stratgy": "drain"}), "stratgy"),
    ];
    for (path, body, field) in cases {
        let (status, error) = error_of(app.post(path, &admin, &body).await).await;
        assert_eq!((status, error["error"]["field"].as_str()), (422, Some(field)), "{path} {body}: {error}");
    }
    let response = app.http.get(app.url("/v1/agents?label=role:%00")).bearer_auth(&admin).send().await.unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!((status, error["error"]["field"].as_str()), (422, Some("label")));
    // Arrays are not objects, although serde would read a struct from one.
    for (path, body) in [("/v1/alerts/1/ack", json!([null, null])), ("/v1/silences", json!(["a", null, {}]))] {
        let (status, _) = error_of(app.post(path, &admin, &body).await).await;
        assert_eq!(status, 400, "{path}");
    }
}

#[tokio::test]
async fn whole_numbers_written_as_floats_are_accepted() {
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Ingest]).await;
    let (status, body) =
        app.heartbeat(&key, json!({"agent_id": "py-1", "uptime_seconds": 3600.0, "next_heartbeat_ms": 1.5e4})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["next_heartbeat_ms"], 15000);
    let (status, body) = app.heartbeat(&key, json!({"agent_id": "py-1", "uptime_seconds": 1.5})).await;
    assert_eq!((status, body["error"]["field"].as_str()), (422, Some("uptime_seconds")));
}

/// With authentication off (local use), a web page on another site must
/// not be able to make a visitor's browser write to warden: a `text/plain`
/// POST needs no preflight, so warden refuses any write whose `Origin` is
/// not its own. Clients that are not browsers send no `Origin`.
#[tokio::test]
async fn writes_from_a_page_on_another_origin_are_refused() {
    let app = TestApp::spawn_with(|s| s.auth.enabled = false).await;
    let body = json!({"agent_id": "from-a-page"}).to_string();
    let post = |origin: Option<String>| {
        let mut request =
            app.http.post(app.url("/v1/heartbeats")).header("content-type", "text/plain").body(body.clone());
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send()
    };
    let foreign = post(Some("https://evil.example".into())).await.unwrap();
    let (status, error) = error_of(foreign).await;
    assert_eq!(status, 403, "{error}");
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status").await, 0, "nothing written");
    let silence = app
        .http
        .post(app.url("/v1/silences"))
        .header("origin", "https://evil.example")
        .body(json!({"matchers": {"issue_type": "agent_unresponsive"}, "duration": "365d", "comment": "x"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(silence.status(), 403);

    let own = format!("http://{}", app.url("").trim_start_matches("http://").trim_end_matches('/'));
    assert_eq!(post(Some(own)).await.unwrap().status(), 200, "the console's own origin");
    assert_eq!(post(None).await.unwrap().status(), 200, "a client that is not a browser");
}

/// With authentication off, a page that points a name of its own at
/// warden (DNS rebinding) sends requests whose Origin and Host agree: the
/// Host itself is checked, against IP addresses, localhost and
/// server.allowed_hosts.
#[tokio::test]
async fn without_auth_requests_for_an_unknown_host_name_are_refused() {
    let app = TestApp::spawn_with(|s| {
        s.auth.enabled = false;
        s.server.allowed_hosts = vec!["warden.lan".into()];
    })
    .await;
    let port = app.addr.port();
    let send = |host: String, method: reqwest::Method, path: &str| {
        app.http
            .request(method, app.url(path))
            .header("host", host.clone())
            .header("origin", format!("http://{host}"))
            .header("content-type", "text/plain")
            .body(json!({"issue_type": "agent_unresponsive", "duration": "2h", "comment": "x"}).to_string())
            .send()
    };
    let rebound = format!("rebind.example:{port}");
    let (status, error) = error_of(send(rebound.clone(), reqwest::Method::POST, "/v1/silences").await.unwrap()).await;
    assert_eq!(status, 403);
    assert_eq!(error["error"]["code"], "forbidden");
    assert!(error["error"]["message"].as_str().unwrap().contains("server.allowed_hosts"), "{error}");
    assert_eq!(app.count("SELECT count(*) FROM warden.silences").await, 0, "nothing written");
    assert_eq!(send(rebound.clone(), reqwest::Method::GET, "/v1/agents").await.unwrap().status(), 403, "reads too");
    assert_eq!(send(rebound.clone(), reqwest::Method::GET, "/").await.unwrap().status(), 403, "the console too");
    assert_eq!(
        send(rebound.clone(), reqwest::Method::GET, "/healthz").await.unwrap().status(),
        200,
        "probes ask no key"
    );

    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("warden.lan:{port}")] {
        assert_eq!(send(host.clone(), reqwest::Method::GET, "/v1/agents").await.unwrap().status(), 200, "{host}");
    }
    let ok = send(format!("warden.lan:{port}"), reqwest::Method::POST, "/v1/silences").await.unwrap();
    assert_eq!(ok.status(), 201, "an allowed name writes");

    // With keys on, a key is what counts, whatever the name.
    let keyed = TestApp::spawn().await;
    let read = keyed.key(&[Scope::Read]).await;
    let response = keyed
        .http
        .get(keyed.url("/v1/agents"))
        .header("host", format!("rebind.example:{}", keyed.addr.port()))
        .bearer_auth(read)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_503_after_a_stalled_write_says_it_may_be_stored_and_a_queued_one_is_never_written() {
    let app = TestApp::spawn_with(|s| {
        s.server.request_timeout = SettingsDuration::from_secs(3);
        s.ingest.writers = 1;
    })
    .await;
    let key = app.key(&[Scope::Ingest]).await;
    assert_eq!(app.heartbeat(&key, json!({"agent_id": "stalled"})).await.0, 200);
    assert_eq!(app.heartbeat(&key, json!({"agent_id": "queued"})).await.0, 200);

    // The database stalls mid-write: the agent's row is locked, so the
    // writer's transaction waits inside PostgreSQL.
    let mut blocker = app.db.client().await;
    let lock = blocker.transaction().await.unwrap();
    lock.execute("SELECT 1 FROM warden.agent_status WHERE agent_id = 'stalled' FOR UPDATE", &[]).await.unwrap();
    let (status, body) = app.heartbeat(&key, json!({"agent_id": "stalled"})).await;
    assert_eq!(status, 503);
    let message = body["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("may still be stored"), "{message}");

    // Meanwhile another request waits behind it in the queue, and times out.
    let (status, body) = app.heartbeat(&key, json!({"agent_id": "queued"})).await;
    assert_eq!(status, 503);
    assert!(!body["error"]["message"].as_str().unwrap_or_default().contains("may"), "{body}");
    let before_release: chrono::DateTime<chrono::Utc> =
        app.db.client().await.query_one("SELECT clock_timestamp()", &[]).await.unwrap().get(0);

    lock.commit().await.unwrap();
    // The stalled write commits after all, as its answer warned; then the
    // queue moves on, and a heartbeat sent now is answered in order.
    let (status, _) = app.heartbeat(&key, json!({"agent_id": "after"})).await;
    assert_eq!(status, 200);
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_heartbeats WHERE agent_id = 'stalled'").await, 2);
    assert_eq!(
        app.count("SELECT count(*) FROM warden.agent_heartbeats WHERE agent_id = 'queued'").await,
        1,
        "answered 503 before any write took it: never written"
    );
    // Its agent was alive, though: liveness counts the refusal as a sign
    // of life, dated when it arrived, or a stalled database would read as
    // agents falling silent.
    let refused_at = crate::helpers::eventually(Duration::from_secs(30), "the refusal recorded", || async {
        let db = app.db.client().await;
        let row = db.query_opt("SELECT refused_at FROM warden.ingest_refusals WHERE agent_id = 'queued'", &[]).await;
        row.unwrap().map(|r| r.get::<_, chrono::DateTime<chrono::Utc>>(0))
    })
    .await;
    assert!(refused_at < before_release, "{refused_at} is when it came, not when the stall ended");
}

#[tokio::test]
async fn an_answer_given_before_the_body_was_read_closes_the_connection_saying_so() {
    // hyper drops a connection whose request body was left unread; a
    // client must learn that from the answer, not from its next request.
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Ingest]).await;
    let padded = |size: usize| format!(r#"{{"agent_id": "kept-alive", "pad": "{}"}}"#, "a".repeat(size));
    for (key, body, status) in [("wk_made_up_key", padded(200_000), "401"), (key.as_str(), padded(2 << 20), "413")] {
        let (mut reader, mut writer) = start_post(&app, "/v1/heartbeats", key, body.len()).await.into_split();
        let sending = tokio::spawn(async move {
            let _ = writer.write_all(body.as_bytes()).await; // refused before the end
            writer
        });
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(30), async {
            while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
                match reader.read(&mut buf).await {
                    Ok(n) if n > 0 => answer.extend_from_slice(&buf[..n]),
                    other => panic!("closed without an answer ({status}): {other:?}"),
                }
            }
        })
        .await;
        assert!(read.is_ok(), "no answer within 30 s ({status})");
        let head = String::from_utf8_lossy(&answer).to_lowercase();
        assert!(head.starts_with(&format!("http/1.1 {status}")), "{head}");
        assert!(head.contains("connection: close"), "{status} before the body was read says so: {head}");
        // The server stops reading: the writer ends with an error or, with
        // the body buffered, on its own.
        let _ = tokio::time::timeout(Duration::from_secs(30), sending).await;
    }

    // A body read to its end keeps the connection for the next request.
    let body = padded(10);
    let mut stream = start_post(&app, "/v1/heartbeats", &key, body.len()).await;
    stream.write_all(body.as_bytes()).await.unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: warden\r\nconnection: close\r\n\r\n").await.unwrap();
    let both = read_to_close(&mut stream, Duration::from_secs(30)).await;
    assert!(both.starts_with("HTTP/1.1 200"), "{both}");
    assert_eq!(both.matches("HTTP/1.1 200").count(), 2, "both answered on one connection: {both}");
    assert!(!both.to_lowercase().split("\r\n\r\n").next().unwrap().contains("connection: close"), "{both}");
}
