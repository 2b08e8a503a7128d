//! The read API and the live stream, over real HTTP.

use std::time::Duration;

use serde_json::{Value, json};
use warden::auth::Scope;

use crate::helpers::{TestApp, eventually};

/// A warden whose background evaluator stays out of the way, so tests run
/// cycles themselves.
async fn app() -> TestApp {
    TestApp::spawn_quiet_with(|_| {}).await
}

async fn get_json(app: &TestApp, key: &str, path: &str) -> (u16, Value) {
    let response = app.http.get(app.url(path)).bearer_auth(key).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn agents_are_listed_filtered_and_paged() {
    let app = app().await;
    let ingest = app.key(&[Scope::Ingest]).await;
    let read = app.key(&[Scope::Read]).await;
    for i in 0..5 {
        let role = if i % 2 == 0 { "worker" } else { "api" };
        app.heartbeat(&ingest, json!({"agent_id": format!("a{i}"), "labels": {"role": role}})).await;
    }
    app.liveness_cycle(None).await;

    let (status, page) = get_json(&app, &read, "/v1/agents?limit=2").await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = page["agents"].as_array().unwrap().iter().map(|a| a["agent_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a0", "a1"]);
    assert_eq!(page["next_cursor"], "a1");
    let (_, next) = get_json(&app, &read, "/v1/agents?limit=2&cursor=a1").await;
    assert_eq!(next["agents"][0]["agent_id"], "a2");

    let (_, workers) = get_json(&app, &read, "/v1/agents?label=role:worker").await;
    assert_eq!(workers["agents"].as_array().unwrap().len(), 3);
    assert_eq!(workers["next_cursor"], Value::Null);
    // A value may hold either separator; the key ends at the first.
    app.heartbeat(&ingest, json!({"agent_id": "a9", "labels": {"zone": "eu:west=2"}})).await;
    for query in ["label=zone=eu:west%3D2", "label=zone:eu:west%3D2"] {
        let (_, zoned) = get_json(&app, &read, &format!("/v1/agents?{query}")).await;
        let ids: Vec<&str> =
            zoned["agents"].as_array().unwrap().iter().map(|a| a["agent_id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["a9"], "{query}");
    }
    let (_, online) = get_json(&app, &read, "/v1/agents?liveness=online").await;
    assert_eq!(online["agents"].as_array().unwrap().len(), 5);
    assert_eq!(online["agents"][0]["liveness"], "online");
    let (_, offline) = get_json(&app, &read, "/v1/agents?liveness=offline").await;
    assert!(offline["agents"].as_array().unwrap().is_empty());

    for (query, field) in [
        ("liveness=sleepy", "liveness"),
        ("tier=superb", "tier"),
        ("limit=0", "limit"),
        ("limit=5000", "limit"),
        ("label=novalue", "label"),
        ("cursor=bad%20id", "cursor"),
        // Ignored, a misspelt filter would list everyone; of a repeated
        // one, only the last value would count.
        ("livenes=online", "livenes"),
        ("limit=2&limit=3", "limit"),
        ("label=role:worker&label=role:api", "label"),
        ("=x", "query"),
    ] {
        let (status, error) = get_json(&app, &read, &format!("/v1/agents?{query}")).await;
        assert_eq!((status, error["error"]["field"].as_str()), (422, Some(field)), "{query}: {error}");
    }
    // Several labels: agents that have them all.
    app.heartbeat(&ingest, json!({"agent_id": "a8", "labels": {"role": "worker", "zone": "eu"}})).await;
    let (_, both) = get_json(&app, &read, "/v1/agents?label=role:worker&label=zone:eu").await;
    let ids: Vec<&str> = both["agents"].as_array().unwrap().iter().map(|a| a["agent_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a8"]);
    // A last page exactly full says it is the last.
    let (_, all) = get_json(&app, &read, "/v1/agents?limit=7").await;
    assert_eq!(all["agents"].as_array().unwrap().len(), 7);
    assert_eq!(all["next_cursor"], Value::Null, "seven agents, a page of seven");
    let (_, six) = get_json(&app, &read, "/v1/agents?limit=6").await;
    assert_eq!(six["next_cursor"], "a8");
    // Not scored yet: listed as GET /v1/fleet counts them.
    let (_, fleet) = get_json(&app, &read, "/v1/fleet").await;
    let (status, unscored) = get_json(&app, &read, "/v1/agents?tier=unscored").await;
    assert_eq!(status, 200);
    assert_eq!(
        Some(unscored["agents"].as_array().unwrap().len() as u64),
        fleet["tier"]["unscored"].as_u64(),
        "{fleet}"
    );
    // A path id that is not UTF-8 gets the JSON error, naming it.
    let response = app.http.get(app.url("/v1/agents/a%FF")).bearer_auth(&read).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 422);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["field"], "id", "{error}");
}

#[tokio::test]
async fn reading_needs_the_read_scope() {
    let app = app().await;
    let ingest = app.key(&[Scope::Ingest]).await;
    assert_eq!(get_json(&app, &ingest, "/v1/agents").await.0, 403);
    assert_eq!(app.get("/v1/fleet").await.status(), 401);
    let admin = app.key(&[Scope::Admin]).await;
    assert_eq!(get_json(&app, &admin, "/v1/fleet").await.0, 200);
    // Answers describe the fleet now; no cache keeps them.
    let fleet = app.http.get(app.url("/v1/fleet")).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(fleet.headers()["cache-control"], "no-store");
}

#[tokio::test]
async fn one_agent_carries_its_breakdown_transitions_and_incidents() {
    let app = app().await;
    let ingest = app.key(&[Scope::Ingest]).await;
    let read = app.key(&[Scope::Read]).await;
    app.heartbeat(&ingest, json!({"agent_id": "solo", "next_heartbeat_ms": 100, "name": "Solo"})).await;
    app.liveness_cycle(None).await;
    // 100 ms interval: silent for a moment, it goes offline.
    eventually(Duration::from_secs(20), "solo offline", || async {
        app.liveness_cycle(None).await;
        let (_, agent) = get_json(&app, &read, "/v1/agents/solo").await;
        (agent["liveness"] == "offline").then_some(())
    })
    .await;
    let (status, agent) = get_json(&app, &read, "/v1/agents/solo").await;
    assert_eq!(status, 200);
    assert_eq!(agent["name"], "Solo");
    let transitions = agent["recent_transitions"].as_array().unwrap();
    assert!(transitions.iter().any(|t| t["new"] == "offline" && t["figures"]["expected_interval_ms"] == 100));
    let incidents = agent["recent_incidents"].as_array().unwrap();
    assert!(incidents.iter().any(|i| i["issue_type"] == "agent_unresponsive" && i["state"] == "open"));
    assert!(agent["recent_events"].as_array().unwrap().iter().any(|e| e["event_type"] == "agent_registered"));

    assert_eq!(get_json(&app, &read, "/v1/agents/nobody").await.0, 404);
    let (status, error) = get_json(&app, &read, "/v1/agents/bad%20id").await;
    assert_eq!((status, error["error"]["field"].as_str()), (422, Some("id")));
}

#[tokio::test]
async fn an_agent_s_own_status_changed_event_is_an_event_not_a_transition() {
    let app = app().await;
    let ingest = app.key(&[Scope::Ingest]).await;
    let read = app.key(&[Scope::Read]).await;
    app.heartbeat(&ingest, json!({"agent_id": "teller"})).await;
    app.liveness_cycle(None).await;
    let posted = json!({"agent_id": "teller", "event_type": "status_changed", "message": "I went offline",
                        "details": {"old": "online", "new": "offline"}});
    assert_eq!(app.post("/v1/events", &ingest, &posted).await.status(), 201);
    let (_, agent) = get_json(&app, &read, "/v1/agents/teller").await;
    let transitions: Vec<&Value> = agent["recent_transitions"].as_array().unwrap().iter().collect();
    assert!(transitions.iter().all(|t| t["new"] != "offline"), "{transitions:?}");
    assert!(transitions.iter().any(|t| t["new"] == "online"), "warden's own: {transitions:?}");
    let events = agent["recent_events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["event_type"] == "status_changed" && e["source"] == "agent"),
        "the agent's event is listed as its own: {events:?}"
    );
}

#[tokio::test]
async fn fleet_totals_count_every_liveness_and_tier() {
    let app = app().await;
    let ingest = app.key(&[Scope::Ingest]).await;
    let read = app.key(&[Scope::Read]).await;
    for (id, mode) in [("f1", "active"), ("f2", "active"), ("f3", "idle")] {
        app.heartbeat(&ingest, json!({"agent_id": id, "mode": mode})).await;
    }
    app.liveness_cycle(None).await;
    let (status, fleet) = get_json(&app, &read, "/v1/fleet").await;
    assert_eq!(status, 200);
    assert_eq!(fleet["total"], 3);
    assert_eq!(fleet["liveness"], json!({"unknown": 0, "online": 3, "degraded": 0, "offline": 0}));
    assert_eq!(fleet["mode"], json!({"emergency": 0, "active": 2, "idle": 1, "sleep": 0, "unset": 0}));
    assert_eq!(fleet["tier"]["critical"], 0, "every tier is listed");
    assert_eq!(fleet["tier"]["unscored"], 3, "agents not scored yet");
    assert_eq!(fleet["open_incidents"], 0);
}

#[tokio::test]
async fn incidents_are_listed_newest_first_with_filters() {
    let app = app().await;
    let ingest = app.key(&[Scope::Ingest]).await;
    let read = app.key(&[Scope::Read]).await;
    for id in ["i1", "i2"] {
        app.heartbeat(&ingest, json!({"agent_id": id, "next_heartbeat_ms": 100})).await;
    }
    app.liveness_cycle(None).await;
    eventually(Duration::from_secs(20), "two open incidents", || async {
        app.liveness_cycle(None).await;
        let (_, list) = get_json(&app, &read, "/v1/incidents?state=open&issue_type=agent_unresponsive").await;
        (list["incidents"].as_array().unwrap().len() == 2).then_some(())
    })
    .await;
    let (_, list) = get_json(&app, &read, "/v1/incidents?agent=i2").await;
    let incidents = list["incidents"].as_array().unwrap();
    assert!(!incidents.is_empty() && incidents.iter().all(|i| i["agent_id"] == "i2"));
    let ids: Vec<i64> = incidents.iter().map(|i| i["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    let (_, page) = get_json(&app, &read, "/v1/incidents?limit=1").await;
    assert!(page["next_cursor"].is_string());
    for (query, field) in [
        ("state=closed", "state"),
        ("issue_type=boredom", "issue_type"),
        ("since=yesterday", "since"),
        ("status=open", "status"),
    ] {
        let (status, error) = get_json(&app, &read, &format!("/v1/incidents?{query}")).await;
        assert_eq!((status, error["error"]["field"].as_str()), (422, Some(field)), "{query}");
    }
}

/// Opens `path` (a /v1/stream URL) with `key` and reads up to its `ready`
/// event; the stream and what is buffered past it.
async fn ready_stream(app: &TestApp, key: &str, path: &str) -> (reqwest::Response, String) {
    let mut stream =
        app.http.get(app.url(path)).bearer_auth(key).timeout(Duration::from_secs(300)).send().await.unwrap();
    assert_eq!(stream.status(), 200, "{path}");
    // Unbuffered behind nginx, which would otherwise hold the events back.
    assert_eq!(stream.headers().get("x-accel-buffering").map(|v| v.as_bytes()), Some(&b"no"[..]), "{path}");
    let mut buffer = String::new();
    next_event(&mut stream, &mut buffer, |name, _| name == "ready").await;
    (stream, buffer)
}

/// The backend of this replica's stream listener, once it listens.
async fn listener_pid(db: &tokio_postgres::Client) -> Option<i32> {
    let listener = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %'";
    db.query_opt(listener, &[]).await.unwrap().map(|r| r.get(0))
}

/// Reads SSE events from a streaming response until `want` matches one;
/// keep-alive comments are not events and are skipped.
async fn next_event(
    response: &mut reqwest::Response,
    buffer: &mut String,
    want: impl Fn(&str, &Value) -> bool,
) -> Value {
    loop {
        let (name, _, value) = next_block(response, buffer).await;
        if want(&name, &value) {
            return value;
        }
    }
}

/// The next event of a stream: its name, id and data.
async fn next_block(response: &mut reqwest::Response, buffer: &mut String) -> (String, Option<String>, Value) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            if block.lines().all(|l| l.starts_with(':') || l.is_empty()) {
                continue;
            }
            let mut name = "message".to_string();
            let mut id = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            return (name, id, serde_json::from_str(&data).unwrap_or(Value::Null));
        }
        let chunk = tokio::time::timeout_at(deadline, response.chunk()).await.expect("event within 30s").unwrap();
        buffer.push_str(&String::from_utf8_lossy(&chunk.expect("stream stays open")));
    }
}

#[tokio::test]
async fn a_client_back_with_its_last_event_id_gets_what_it_missed() {
    let app = app().await;
    let read = app.key(&[Scope::Read]).await;
    let open = |last: Option<&str>| {
        let mut request = app.http.get(app.url("/v1/stream")).bearer_auth(&read).timeout(Duration::from_secs(300));
        if let Some(id) = last {
            request = request.header("Last-Event-ID", id);
        }
        request.send()
    };
    let db = app.db.client().await;
    let notify = |agent: &'static str| {
        let db = &db;
        async move {
            let payload = json!({"type": "status_changed", "agent_id": agent, "old": "online", "new": "offline"});
            db.execute("SELECT pg_notify('warden_events', $1)", &[&payload.to_string()]).await.unwrap();
        }
    };
    let mut stream = open(None).await.unwrap();
    let mut buffer = String::new();
    let (name, ready_id, ready) = next_block(&mut stream, &mut buffer).await;
    assert_eq!((name.as_str(), &ready["resumed"]), ("ready", &json!(false)));
    assert!(ready_id.is_some(), "ready marks the position");
    // Notifications reach streams once the replica's listener listens; it
    // says so with a `lagged` of its own, and poking until an event comes
    // through covers the moment before.
    let id = loop {
        notify("a").await;
        let (name, id, event) = next_block(&mut stream, &mut buffer).await;
        if name == "status_changed" && event["agent_id"] == "a" {
            break id.expect("live events carry ids");
        }
    };
    drop(stream);

    // Missed while away.
    notify("b").await;
    notify("c").await;
    // The listener hands them over on its own time: the replay holds them
    // once a fresh stream sees them live.
    let mut witness = open(None).await.unwrap();
    let mut witness_buffer = String::new();
    next_event(&mut witness, &mut witness_buffer, |name, _| name == "ready").await;
    notify("d").await;
    next_event(&mut witness, &mut witness_buffer, |name, v| name == "status_changed" && v["agent_id"] == "d").await;

    let mut again = open(Some(&id)).await.unwrap();
    let mut buffer = String::new();
    let (name, ready_id, ready) = next_block(&mut again, &mut buffer).await;
    assert_eq!((name.as_str(), &ready["resumed"]), ("ready", &json!(true)));
    assert_eq!(ready_id, None, "a client cut off now must come back for the replay");
    let mut replayed = Vec::new();
    let seq = |id: &str| id.rsplit_once('-').and_then(|(_, n)| n.parse::<u64>().ok()).expect("<hub>-<seq>");
    let mut last = seq(&id);
    for _ in 0..3 {
        let (name, id, event) = next_block(&mut again, &mut buffer).await;
        replayed.push((name, event["agent_id"].as_str().unwrap_or_default().to_string()));
        let n = seq(&id.expect("replayed events carry their ids"));
        assert!(n > last, "ids rise: {n} after {last}");
        last = n;
    }
    let agents: Vec<&str> = replayed.iter().map(|(_, agent)| agent.as_str()).collect();
    assert_eq!(agents, ["b", "c", "d"], "{replayed:?}");

    // An id this replica cannot resume from (another's, or one from before
    // a restart): the client is told to refetch.
    for foreign in ["0123abc-7", "garbage", &format!("{id}0000")] {
        let mut elsewhere = open(Some(foreign)).await.unwrap();
        let mut buffer = String::new();
        let (name, _, ready) = next_block(&mut elsewhere, &mut buffer).await;
        assert_eq!((name.as_str(), &ready["resumed"]), ("ready", &json!(false)), "{foreign}");
        let (name, _, lagged) = next_block(&mut elsewhere, &mut buffer).await;
        assert_eq!((name.as_str(), &lagged["reason"]), ("lagged", &json!("not_resumable")), "{foreign}");
    }
}

#[tokio::test]
async fn a_narrowed_stream_is_told_its_position_past_what_it_left_out() {
    // A stream for one agent may see nothing of it while the replica's
    // other events push its last id out of what the replica keeps; an id
    // alone moves it on, so that it can still resume.
    let app = app().await;
    let read = app.key(&[Scope::Read]).await;
    let open = |last: Option<String>| {
        let mut request =
            app.http.get(app.url("/v1/stream?agent=quiet")).bearer_auth(&read).timeout(Duration::from_secs(300));
        if let Some(id) = last {
            request = request.header("Last-Event-ID", id);
        }
        request.send()
    };
    let db = app.db.client().await;
    let mut stream = open(None).await.unwrap();
    let mut buffer = String::new();
    let (name, ready_id, _) = next_block(&mut stream, &mut buffer).await;
    assert_eq!(name, "ready");
    let ready_seq = ready_id.as_deref().and_then(|id| id.rsplit_once('-')).map(|(_, n)| n.parse::<u64>().unwrap());
    let payload = json!({"type": "status_changed", "agent_id": "noisy", "old": "online", "new": "offline"}).to_string();
    // Until the listener listens, notifications reach no stream: keep
    // sending until the position comes.
    let position = loop {
        db.execute("SELECT pg_notify('warden_events', $1)", &[&payload]).await.unwrap();
        let (name, id, data) = next_block(&mut stream, &mut buffer).await;
        // (The listener's own `lagged`, if it comes now, is for everyone.)
        if name == "lagged" {
            continue;
        }
        assert_eq!((name.as_str(), data), ("message", Value::Null), "an id alone, no event");
        break id.expect("the position");
    };
    let seq: u64 = position.rsplit_once('-').unwrap().1.parse().unwrap();
    assert!(Some(seq) > ready_seq, "{position} is past ready's {ready_id:?}");
    drop(stream);
    let mut again = open(Some(position)).await.unwrap();
    let mut buffer = String::new();
    let (name, _, ready) = next_block(&mut again, &mut buffer).await;
    assert_eq!((name.as_str(), &ready["resumed"]), ("ready", &json!(true)));
}

#[tokio::test]
async fn open_streams_end_when_warden_shuts_down() {
    // A stream never ends on its own; the shutdown's drain used to wait
    // for it the whole shutdown_timeout (a console tab open was enough),
    // and an orchestrator's own grace then killed warden mid-drain.
    let app = TestApp::spawn_quiet_with(|s| s.server.shutdown_timeout = warden::config::Duration::from_secs(600)).await;
    let read = app.key(&[Scope::Read]).await;
    let mut stream =
        app.http.get(app.url("/v1/stream")).bearer_auth(&read).timeout(Duration::from_secs(900)).send().await.unwrap();
    let mut buffer = String::new();
    next_event(&mut stream, &mut buffer, |name, _| name == "ready").await;

    let stopping = tokio::spawn(app.stop());
    let ended = tokio::time::timeout(Duration::from_secs(120), async {
        while stream.chunk().await.expect("the stream ends cleanly").is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the stream is still open two minutes into the shutdown");
    tokio::time::timeout(Duration::from_secs(120), stopping)
        .await
        .expect("warden stops once its streams have ended")
        .unwrap();
}

#[tokio::test]
async fn the_stream_delivers_transitions_and_incidents_as_they_commit() {
    let app = app().await;
    let ingest = app.key(&[Scope::Ingest]).await;
    let read = app.key(&[Scope::Read]).await;
    // The client's 30 s limit covers a whole response, which for a stream
    // is the whole test; each event has its own 30 s in next_event.
    let mut stream =
        app.http.get(app.url("/v1/stream")).bearer_auth(&read).timeout(Duration::from_secs(300)).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let mut buffer = String::new();
    next_event(&mut stream, &mut buffer, |name, _| name == "ready").await;
    // The replica's listener connects on its own; a transition committed
    // before it listens reaches no stream (clients resync over REST).
    let db = app.db.client().await;
    eventually(Duration::from_secs(30), "the stream listener", || async {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n > 0).then_some(())
    })
    .await;

    // The clock is driven: the transitions do not depend on how soon after
    // the heartbeat a cycle runs.
    app.heartbeat(&ingest, json!({"agent_id": "live", "next_heartbeat_ms": 1000})).await;
    let seen: chrono::DateTime<chrono::Utc> =
        db.query_one("SELECT last_seen FROM warden.agent_status WHERE agent_id = 'live'", &[]).await.unwrap().get(0);
    app.liveness_cycle(Some(seen + chrono::Duration::milliseconds(100))).await;
    let online = next_event(&mut stream, &mut buffer, |name, v| name == "status_changed" && v["new"] == "online").await;
    assert_eq!(online["agent_id"], "live");
    assert_eq!(online["old"], "unknown");
    assert!(online["timestamp"].is_string());

    // Any database role can notify on the channel: a name SSE cannot carry
    // (a newline) or one warden never sends is dropped, and the stream
    // carries on.
    for forged in [r#"{"type":"a\nb","agent_id":"live"}"#, r#"{"type":"forged","agent_id":"live"}"#] {
        db.execute("SELECT pg_notify('warden_events', $1)", &[&forged]).await.unwrap();
    }

    let opened = {
        let poke = async {
            for k in 1.. {
                app.liveness_cycle(Some(seen + chrono::Duration::seconds(k))).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            event = next_event(&mut stream, &mut buffer, |name, v| {
                let known = ["ready", "status_changed", "incident_opened", "incident_resolved", "lagged"];
                assert!(known.contains(&name), "event {name:?} reached a client");
                name == "incident_opened" && v["issue_type"] == "agent_unresponsive"
            }) => event,
            _ = poke => unreachable!(),
        }
    };
    assert_eq!(opened["agent_id"], "live");
    assert_eq!(opened["severity"], "critical");
}

#[tokio::test]
async fn a_stream_is_told_to_refetch_when_its_replica_lost_the_listener() {
    let app = app().await;
    let read = app.key(&[Scope::Read]).await;
    let (mut stream, mut buffer) = ready_stream(&app, &read, "/v1/stream?agent=someone").await;
    // Notifications sent while the listener reconnects never reach this
    // replica: its clients cannot know what they missed, so they are told.
    let db = app.db.client().await;
    let pid = eventually(Duration::from_secs(30), "the stream listener", || listener_pid(&db)).await;
    db.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.unwrap();
    let lagged = next_event(&mut stream, &mut buffer, |name, _| name == "lagged").await;
    assert_eq!(lagged["reason"], "reconnected", "{lagged}");
    let again = eventually(Duration::from_secs(30), "a new listener", || listener_pid(&db)).await;
    assert_ne!(again, pid);
}

#[tokio::test]
async fn the_stream_listener_is_replaced_after_max_lifetime_and_streams_go_on() {
    let app = TestApp::spawn_with(|s| s.database.max_lifetime = warden::config::Duration::from_secs(2)).await;
    let read = app.key(&[Scope::Read]).await;
    let ingest = app.key(&[Scope::Ingest]).await;
    let db = app.db.client().await;
    let first = eventually(Duration::from_secs(30), "the stream listener", || listener_pid(&db)).await;
    let (mut stream, mut buffer) = ready_stream(&app, &read, "/v1/stream?agent=long-heard&heartbeats=true").await;
    // Heartbeats sent one after another across replacements of the
    // listener each reach the stream once, in order, and the stream is
    // never told it missed something: the old connection hands over to the
    // new one without a gap.
    let mut replaced = 0;
    for uptime in 0..2000 {
        app.heartbeat(&ingest, json!({"agent_id": "long-heard", "uptime_seconds": uptime})).await;
        let (name, _, event) = loop {
            let block = next_block(&mut stream, &mut buffer).await;
            if block.0 == "heartbeat" || block.0 == "lagged" {
                break block;
            }
        };
        assert_eq!(name, "heartbeat", "no gap, nothing to refetch: {event}");
        assert_eq!(event["uptime_seconds"], uptime, "each once, in order: {event}");
        let old = db.query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&first]).await.unwrap();
        if old.is_none() && listener_pid(&db).await.is_some_and(|p| p != first) {
            replaced += 1;
            // A few beats more through the new listener.
            if replaced > 20 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the listener was not replaced");
}

#[tokio::test]
async fn an_agent_stream_can_observe_its_raw_heartbeats() {
    let app = app().await;
    let ingest = app.key(&[Scope::Ingest]).await;
    let read = app.key(&[Scope::Read]).await;
    app.heartbeat(&ingest, json!({"agent_id": "watched"})).await;
    let (mut stream, mut buffer) = ready_stream(&app, &read, "/v1/stream?agent=watched&heartbeats=true").await;
    let beat = {
        let poke = async {
            let mut uptime = 0;
            loop {
                uptime += 1;
                app.heartbeat(&ingest, json!({"agent_id": "other", "uptime_seconds": uptime})).await;
                app.heartbeat(&ingest, json!({"agent_id": "watched", "uptime_seconds": uptime})).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            event = next_event(&mut stream, &mut buffer, |name, _| name == "heartbeat") => event,
            _ = poke => unreachable!(),
        }
    };
    assert_eq!(beat["agent_id"], "watched", "only the observed agent's heartbeats");
    assert!(beat["uptime_seconds"].as_i64().unwrap() >= 1);
    assert_eq!((&beat["type"], &beat["timestamp"]), (&json!("heartbeat"), &beat["received_at"]));

    let (status, error) = get_json(&app, &read, "/v1/stream?heartbeats=true").await;
    assert_eq!((status, error["error"]["field"].as_str()), (422, Some("heartbeats")));
}

#[tokio::test]
async fn event_streams_are_bounded_per_replica() {
    let app = TestApp::spawn_with(|s| s.server.max_streams = 2).await;
    let read = app.key(&[Scope::Read]).await;
    let open = || app.http.get(app.url("/v1/stream")).bearer_auth(&read).timeout(Duration::from_secs(300)).send();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = open().await.unwrap();
        assert_eq!(stream.status(), 200);
        let mut buffer = String::new();
        next_event(&mut stream, &mut buffer, |name, _| name == "ready").await;
        held.push(stream);
    }
    let refused = open().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("server.max_streams"), "{body}");
    // Other requests are not affected.
    assert_eq!(get_json(&app, &read, "/v1/fleet").await.0, 200);
}

#[tokio::test]
async fn a_revoked_key_loses_its_open_stream() {
    let app = TestApp::spawn_with(|s| s.auth.cache_ttl = warden::config::Duration::from_secs(1)).await;
    let read = app.key(&[Scope::Read]).await;
    let other = app.key(&[Scope::Read]).await;
    let open =
        |key: &str| app.http.get(app.url("/v1/stream")).bearer_auth(key).timeout(Duration::from_secs(300)).send();
    let (mut revoked, mut kept) = (open(&read).await.unwrap(), open(&other).await.unwrap());
    let mut buffer = String::new();
    next_event(&mut revoked, &mut buffer, |name, _| name == "ready").await;
    let mut kept_buffer = String::new();
    next_event(&mut kept, &mut kept_buffer, |name, _| name == "ready").await;

    app.db.client().await.execute("UPDATE warden.api_keys SET revoked_at = now() WHERE revoked_at IS NULL AND id = (SELECT min(id) FROM warden.api_keys WHERE revoked_at IS NULL AND scopes = ARRAY['read'])", &[]).await.unwrap();
    // The stream ends (the body completes) within a few checks.
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(_chunk) = revoked.chunk().await.unwrap_or(None) {}
    })
    .await;
    assert!(ended.is_ok(), "the revoked key's stream is still open");
    // The other key's stream is still open: it gets the next keep-alive or event.
    let more = tokio::time::timeout(Duration::from_secs(20), kept.chunk()).await;
    assert!(matches!(more, Ok(Ok(Some(_)))), "the other stream stays open: {more:?}");
}

/// One key cannot take every stream of a replica; other keys still get one,
/// and a stream the client closes is given back.
#[tokio::test]
async fn one_key_holds_at_most_max_streams_per_key_streams() {
    let app = TestApp::spawn_quiet_with(|s| s.server.max_streams_per_key = 2).await;
    let (greedy, other) = (app.key(&[Scope::Read]).await, app.key(&[Scope::Read]).await);
    let open = |key: String| {
        let request = app.http.get(app.url("/v1/stream")).bearer_auth(key).timeout(Duration::from_secs(300));
        async move { request.send().await.unwrap() }
    };
    let first = open(greedy.clone()).await;
    let second = open(greedy.clone()).await;
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 200));
    let refused = open(greedy.clone()).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "15");
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("max_streams_per_key"), "{body}");
    assert_eq!(open(other).await.status(), 200, "another key is unaffected");

    // Closed by the client: noticed at the stream's next write (keep-alive).
    drop(first);
    let _again = eventually(Duration::from_secs(60), "a stream given back", || async {
        let response = open(greedy.clone()).await;
        (response.status() == 200).then_some(response)
    })
    .await;
    drop(second);
}
