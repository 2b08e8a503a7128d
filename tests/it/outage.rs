//! PostgreSQL restarted, then stopped for 35 seconds, under load, on a
//! private cluster this test starts (never the shared one): warden answers
//! 503 with Retry-After while it is down, never acknowledges a heartbeat it
//! did not store, and resumes by itself when the database returns.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use warden::app::Application;
use warden::auth::Scope;
use warden::config::Secret;
use warden::db::embedded::EmbeddedCluster;

use crate::helpers::{TestApp, TestRole, default_settings, eventually};
use crate::relay::Relay;

fn url_of(cluster: &EmbeddedCluster) -> String {
    format!("host={} port=5432 user=postgres dbname=warden", cluster.data_dir().display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_survive_a_restart_and_an_outage_with_503s_and_no_false_acks() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.path().join("pgdata");
    let cluster = EmbeddedCluster::start(&data, None).await.unwrap();

    let mut settings = default_settings();
    settings.database.url = Secret::new(url_of(&cluster));
    settings.database.pool_size = 4;
    settings.database.acquire_timeout = warden::config::Duration::from_secs(1);
    settings.database.connect_timeout = warden::config::Duration::from_secs(1);
    settings.server.listen = "127.0.0.1:0".parse().unwrap();
    settings.health.check_interval = warden::config::Duration::from_secs(1);
    let app = Application::build(settings).await.unwrap();
    let base = format!("http://{}", app.local_addr());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run(shutdown.clone()));

    let key = {
        let client = crate::helpers::connect(&cluster.connect_config()).await;
        warden::auth::create_key(&client, "load", &[Scope::Ingest]).await.unwrap().token
    };

    // Load: 4 senders, each numbering its heartbeats through uptime_seconds.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let acked = Arc::new(Mutex::new(HashSet::<(String, i64)>::new()));
    let ok = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let unexpected = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop_load = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for sender in 0..4 {
        let (http, base, key) = (http.clone(), base.clone(), key.clone());
        let (acked, ok, refused, unexpected, stop) =
            (acked.clone(), ok.clone(), refused.clone(), unexpected.clone(), stop_load.clone());
        senders.push(tokio::spawn(async move {
            let agent = format!("load-{sender}");
            let mut seq = 0_i64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                // A 5 s interval: the 30 s outage is far longer, so only
                // the grace after an evaluation gap keeps them online.
                let body = json!({"agent_id": agent, "uptime_seconds": seq, "next_heartbeat_ms": 5000});
                match http.post(format!("{base}/v1/heartbeats")).bearer_auth(&key).json(&body).send().await {
                    Ok(r) if r.status() == 200 => {
                        acked.lock().await.insert((agent.clone(), seq));
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) if r.status() == 503 => {
                        assert!(r.headers().contains_key("retry-after"), "503 without Retry-After");
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok(r) => {
                        unexpected.lock().await.push(format!("{} {}", r.status(), r.text().await.unwrap_or_default()))
                    }
                    Err(e) => unexpected.lock().await.push(e.to_string()),
                }
            }
        }));
    }

    eventually(Duration::from_secs(30), "heartbeats to be acknowledged", || async {
        (ok.load(Ordering::Relaxed) >= 50).then_some(())
    })
    .await;

    // A restart cuts every pooled connection at once.
    cluster.restart().await.unwrap();
    let ok_before = ok.load(Ordering::Relaxed);
    eventually(Duration::from_secs(30), "heartbeats to be acknowledged after a restart", || async {
        (ok.load(Ordering::Relaxed) >= ok_before + 50).then_some(())
    })
    .await;

    // An outage of 35 seconds: longer than the evaluator's 30 s gap limit,
    // so the grace after a gap is what keeps the 5 s agents from being
    // marked late.
    let outage = Duration::from_secs(35);
    let refused_before = refused.load(Ordering::Relaxed);
    let stopped_at = tokio::time::Instant::now();
    cluster.stop().await;
    eventually(Duration::from_secs(30), "503s while the database is down", || async {
        (refused.load(Ordering::Relaxed) >= refused_before + 20).then_some(())
    })
    .await;
    eventually(Duration::from_secs(30), "readiness to fail without a database", || {
        let http = http.clone();
        let base = base.clone();
        async move { (http.get(format!("{base}/readyz")).send().await.ok()?.status() == 503).then_some(()) }
    })
    .await;
    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200, "but alive");
    tokio::time::sleep_until(stopped_at + outage).await;
    let ok_during = ok.load(Ordering::Relaxed);

    let cluster = EmbeddedCluster::start(&data, None).await.unwrap();
    let back = tokio::time::Instant::now();
    eventually(Duration::from_secs(30), "heartbeats to be acknowledged again", || async {
        (ok.load(Ordering::Relaxed) > ok_during).then_some(())
    })
    .await;
    let first_ack = back.elapsed();
    eventually(Duration::from_secs(30), "readiness to return", || {
        let http = http.clone();
        let base = base.clone();
        async move { (http.get(format!("{base}/readyz")).send().await.ok()?.status() == 200).then_some(()) }
    })
    .await;
    // Reported, not asserted: how long recovery takes depends on the machine.
    eprintln!(
        "database back: first acknowledged heartbeat after {} ms, ready after {} ms",
        first_ack.as_millis(),
        back.elapsed().as_millis()
    );
    let ok_back = ok.load(Ordering::Relaxed);
    eventually(Duration::from_secs(30), "ingestion to go on", || async {
        (ok.load(Ordering::Relaxed) >= ok_back + 50).then_some(())
    })
    .await;

    stop_load.store(true, Ordering::Relaxed);
    for s in senders {
        s.await.unwrap();
    }
    assert!(unexpected.lock().await.is_empty(), "only 200 and 503: {:?}", unexpected.lock().await);
    // Stopped before the checks: its evaluator would otherwise find the
    // agents, silent since the load ended, late while they run.
    shutdown.cancel();
    server.await.unwrap().unwrap();

    let client = crate::helpers::connect(&cluster.connect_config()).await;
    let stored: HashSet<(String, i64)> = client
        .query("SELECT agent_id, uptime_seconds FROM warden.agent_heartbeats", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let acked = acked.lock().await;
    let missing: Vec<_> = acked.difference(&stored).collect();
    assert!(missing.is_empty(), "{} acknowledged heartbeats are not stored: {missing:?}", missing.len());
    assert!(acked.len() >= 150, "{} acknowledged", acked.len());

    // Silence caused by the outage is not held against the agents.
    let offline = crate::helpers::connect(&cluster.connect_config())
        .await
        .query_one(
            "SELECT count(*) FROM warden.system_events WHERE event_type = 'status_changed' \
             AND details->>'new' IN ('degraded', 'offline')",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(offline, 0, "no agent may be marked late because warden's database was down");

    drop(client);
    cluster.stop().await;
}

/// `key=value` from a libpq-style connection string.
fn setting<'a>(url: &'a str, key: &str) -> &'a str {
    url.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')).expect(key)
}

/// A warden whose database connections go through a relay; the test's
/// own connections (`app.db`) go straight to PostgreSQL.
///
/// The relay speaks TCP; the tests' database is on 127.0.0.1 unless no
/// server answered there and they started an embedded one on a Unix
/// socket, which these tests then cannot put a relay in front of.
async fn app_behind_relay() -> Option<(Relay, TestApp)> {
    app_behind_relay_with(|_| {}).await
}

async fn app_behind_relay_with(
    tweak: impl FnOnce(&mut warden::config::Settings) + Send + 'static,
) -> Option<(Relay, TestApp)> {
    let relay = Relay::start().await;
    let (port, target) = (relay.port, relay.target.clone());
    let unix = Arc::new(AtomicBool::new(false));
    let on_socket = unix.clone();
    let app = TestApp::spawn_with(move |s| {
        let url = s.database.url.expose().to_string();
        let (host, real_port) = (setting(&url, "host"), setting(&url, "port"));
        if host.starts_with('/') {
            on_socket.store(true, Ordering::SeqCst);
            return;
        }
        target.set(format!("{host}:{real_port}")).unwrap();
        let through = url.replace(&format!("port={real_port}"), &format!("port={port}"));
        s.database.url = Secret::new(through.replace(&format!("host={host}"), "host=127.0.0.1"));
        tweak(s);
    })
    .await;
    if unix.load(Ordering::SeqCst) {
        eprintln!("skipped: the tests' database listens on a Unix socket only");
        return None;
    }
    Some((relay, app))
}

#[tokio::test]
async fn a_short_outage_is_refused_with_503_and_ingestion_resumes_by_itself() {
    // The database's connections drop and new ones are refused, then it
    // is back: no restart of PostgreSQL, so this runs in a second.
    let Some((relay, app)) = app_behind_relay().await else { return };
    let key = app.key(&[Scope::Ingest]).await;
    let beat = json!({"agent_id": "through-relay", "next_heartbeat_ms": 5000});
    assert_eq!(app.heartbeat(&key, beat.clone()).await.0, 200);
    let acked = AtomicU64::new(1);
    let db = app.db.client().await;
    let now = || async { db.query_one("SELECT now()", &[]).await.unwrap().get::<_, chrono::DateTime<chrono::Utc>>(0) };
    let before = now().await;

    relay.cut();
    let retry_after = eventually(Duration::from_secs(60), "a 503 while the database is out of reach", || async {
        let response = app.post("/v1/heartbeats", &key, &beat).await;
        if response.status() == 200 {
            acked.fetch_add(1, Ordering::SeqCst); // sent before the cut took hold
        }
        (response.status() == 503).then(|| response.headers().get("retry-after").cloned())
    })
    .await;
    assert!(retry_after.is_some(), "503 with Retry-After");

    relay.restore();
    eventually(Duration::from_secs(60), "heartbeats accepted again", || async {
        (app.heartbeat(&key, beat.clone()).await.0 == 200).then_some(())
    })
    .await;
    let acked = acked.load(Ordering::SeqCst) + 1;
    let stored = app.count("SELECT count(*) FROM warden.agent_heartbeats WHERE agent_id = 'through-relay'").await;
    assert!(stored as u64 >= acked, "every acknowledged heartbeat is stored: {stored} rows, {acked} acks");
    // Recorded for liveness, off the writer's path: poll for it.
    let window = eventually(Duration::from_secs(60), "the outage recorded", || async {
        let row = db.query_opt("SELECT started_at, ended_at FROM warden.ingest_outages", &[]).await.unwrap()?;
        Some((row.get::<_, chrono::DateTime<chrono::Utc>>(0), row.get::<_, chrono::DateTime<chrono::Utc>>(1)))
    })
    .await;
    let after = now().await;
    assert!(before <= window.0 && window.0 <= window.1 && window.1 <= after, "{window:?} within {before}..{after}");
    // The refused beat itself is a sign of life: an agent whose one beat
    // fell in the outage is not late an interval later for it.
    let refused = eventually(Duration::from_secs(60), "the refused agent noted", || async {
        let row = db
            .query_opt("SELECT refused_at FROM warden.ingest_refusals WHERE agent_id = 'through-relay'", &[])
            .await
            .unwrap()?;
        Some(row.get::<_, chrono::DateTime<chrono::Utc>>(0))
    })
    .await;
    assert!(before <= refused && refused <= after, "refused at {refused}, within {before}..{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_writers_and_batches_an_outage_loses_no_acknowledged_heartbeat() {
    // Sixteen batches of 100 at a time keep the queue deep enough for the
    // extra writer to take shares of it, so both writers have flushes in
    // flight when the database goes. (Which of them finds it gone first is
    // up to timing; the next test stages the extra writer alone finding it.)
    let Some((relay, app)) = app_behind_relay_with(|s| s.ingest.writers = 2).await else { return };
    let key = app.key(&[Scope::Ingest]).await;
    const SENDERS: usize = 16;
    const BATCH: usize = 100;
    let acked: Vec<Vec<AtomicU64>> = (0..SENDERS).map(|_| (0..BATCH).map(|_| AtomicU64::new(0)).collect()).collect();
    let (total_ok, refused) = (AtomicU64::new(0), AtomicU64::new(0));
    let phase = AtomicU64::new(0); // 0 before the cut, 1 cut, 2 restored, 3 stop
    let ok_after_restore = AtomicU64::new(0);

    let sender = |n: usize| {
        let (app, key, acked, total_ok, refused, phase, ok_after_restore) =
            (&app, &key, &acked, &total_ok, &refused, &phase, &ok_after_restore);
        async move {
            let mut uptime = 0;
            while phase.load(Ordering::SeqCst) < 3 {
                uptime += 1;
                let beats: Vec<_> = (0..BATCH)
                    .map(|i| json!({"agent_id": format!("deep-{n}-{i}"), "uptime_seconds": uptime}))
                    .collect();
                let status = app.post("/v1/heartbeats", key, &json!({"heartbeats": beats})).await.status();
                match status.as_u16() {
                    200 => {
                        acked[n].iter().for_each(|a| {
                            a.fetch_add(1, Ordering::SeqCst);
                        });
                        total_ok.fetch_add(BATCH as u64, Ordering::SeqCst);
                        if phase.load(Ordering::SeqCst) == 2 {
                            ok_after_restore.fetch_add(BATCH as u64, Ordering::SeqCst);
                        }
                    }
                    503 => {
                        refused.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => panic!("unexpected status {other}"),
                }
            }
        }
    };
    let driver = async {
        eventually(Duration::from_secs(60), "load running", || async {
            (total_ok.load(Ordering::SeqCst) >= 5_000).then_some(())
        })
        .await;
        phase.store(1, Ordering::SeqCst);
        relay.cut();
        eventually(Duration::from_secs(60), "refusals while the database is out of reach", || async {
            (refused.load(Ordering::SeqCst) >= SENDERS as u64).then_some(())
        })
        .await;
        relay.restore();
        phase.store(2, Ordering::SeqCst);
        eventually(Duration::from_secs(60), "ingestion resumed by itself", || async {
            (ok_after_restore.load(Ordering::SeqCst) >= 2_000).then_some(())
        })
        .await;
        phase.store(3, Ordering::SeqCst);
    };
    futures_util::future::join(driver, futures_util::future::join_all((0..SENDERS).map(sender))).await;

    let db = app.db.client().await;
    let rows =
        db.query("SELECT agent_id, count(*)::bigint FROM warden.agent_heartbeats GROUP BY 1", &[]).await.unwrap();
    let stored: std::collections::HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for (n, agents) in acked.iter().enumerate() {
        for (i, acks) in agents.iter().enumerate() {
            let agent = format!("deep-{n}-{i}");
            let (acks, rows) = (acks.load(Ordering::SeqCst) as i64, stored.get(&agent).copied().unwrap_or(0));
            assert!(rows >= acks, "{agent}: {acks} acknowledged, {rows} stored");
        }
    }
    eventually(Duration::from_secs(60), "the outage recorded", || async {
        (app.count("SELECT count(*) FROM warden.ingest_outages").await >= 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extra_writer_that_finds_the_database_gone_looks_for_its_return_itself() {
    // The first writer can be idle on an empty queue when only the extra
    // writer's flush finds the database gone; while it is gone every new
    // heartbeat is refused before it is queued, so the first writer is
    // never woken to look. Row locks held here stage that: each writer
    // waits on a row of its own, the first is let go, then the extra
    // writer's connection is terminated.
    let app = TestApp::spawn_with(|s| s.ingest.writers = 2).await;
    let key = app.key(&[Scope::Ingest]).await;
    for agent in ["held-for-first", "held-for-extra"] {
        assert_eq!(app.heartbeat(&key, json!({"agent_id": agent})).await.0, 200);
    }
    let (mut for_first, mut for_extra) = (app.db.client().await, app.db.client().await);
    let first_row = for_first.transaction().await.unwrap();
    first_row
        .execute("SELECT 1 FROM warden.agent_status WHERE agent_id = 'held-for-first' FOR UPDATE", &[])
        .await
        .unwrap();
    let extra_row = for_extra.transaction().await.unwrap();
    extra_row
        .execute("SELECT 1 FROM warden.agent_status WHERE agent_id = 'held-for-extra' FOR UPDATE", &[])
        .await
        .unwrap();
    let watcher = app.db.client().await;
    let writers_waiting = || async {
        let rows = watcher
            .query(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
                   AND wait_event_type = 'Lock' AND query LIKE '%ingest_heartbeats%'",
                &[],
            )
            .await
            .unwrap();
        rows.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>()
    };
    let send = |body: serde_json::Value| {
        let (http, url, key) = (app.http.clone(), app.url("/v1/heartbeats"), key.clone());
        tokio::spawn(async move { http.post(url).bearer_auth(key).json(&body).send().await.unwrap().status() })
    };

    let small = send(json!({"heartbeats": [{"agent_id": "held-for-first"}]}));
    let first_writer = eventually(Duration::from_secs(30), "the first writer waiting on its row", || async {
        let pids = writers_waiting().await;
        (pids.len() == 1).then(|| pids[0])
    })
    .await;
    // Deep enough for the extra writer to take it while the first is busy.
    let deep: Vec<_> = std::iter::once(json!({"agent_id": "held-for-extra"}))
        .chain((0..599).map(|i| json!({"agent_id": format!("deep-{i}")})))
        .collect();
    let deep = send(json!({"heartbeats": deep}));
    let extra_writer = eventually(Duration::from_secs(30), "the extra writer waiting on its row", || async {
        writers_waiting().await.into_iter().find(|pid| *pid != first_writer)
    })
    .await;

    first_row.rollback().await.unwrap();
    assert_eq!(small.await.unwrap(), 200, "the first writer's flush commits; it then waits for work");
    watcher.execute("SELECT pg_terminate_backend($1)", &[&extra_writer]).await.unwrap();
    assert_eq!(deep.await.unwrap(), 503, "the extra writer finds the database gone");
    extra_row.rollback().await.unwrap();

    eventually(Duration::from_secs(30), "heartbeats accepted again", || async {
        (app.heartbeat(&key, json!({"agent_id": "after"})).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_heartbeats WHERE agent_id LIKE 'deep-%'").await, 0);
}

#[tokio::test]
async fn heartbeats_refused_at_the_key_check_are_recorded_when_the_database_returns() {
    // A key warden has not verified yet cannot be checked while the
    // database is out of reach, so the heartbeat is refused before any
    // writer sees it: no flush fails, and none succeeds afterwards either,
    // since nothing is sent once the database is back.
    let Some((relay, app)) = app_behind_relay().await else { return };
    let key = app.key(&[Scope::Ingest]).await;
    let db = app.db.client().await;
    let now = || async { db.query_one("SELECT now()", &[]).await.unwrap().get::<_, chrono::DateTime<chrono::Utc>>(0) };
    let before = now().await;

    relay.cut();
    let beat = json!({"agent_id": "refused-at-the-door"});
    eventually(Duration::from_secs(60), "a 503 from the key check", || async {
        let response = app.post("/v1/heartbeats", &key, &beat).await;
        assert_ne!(response.status(), 200, "the key was never verified, so it cannot pass");
        (response.status() == 503).then_some(())
    })
    .await;
    // Over MCP, the key's check fails the same way, and the answer goes to
    // the request (HTTP 200) so that MCP clients keep their session.
    let call = json!({"jsonrpc": "2.0", "id": "beat-1", "method": "tools/call",
                      "params": {"name": "heartbeat", "arguments": {"agent_id": "refused-at-the-door"}}});
    let answer = app.post("/mcp", &key, &call).await;
    assert_eq!(answer.status(), 200);
    assert!(answer.headers().contains_key("retry-after"));
    let answer: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(answer["id"], "beat-1", "{answer}");
    assert_eq!((&answer["error"]["code"], &answer["error"]["data"]["http_status"]), (&json!(-32000), &json!(503)));
    assert_eq!(app.count("SELECT count(*) FROM warden.ingest_outages").await, 0, "recorded only once it is over");

    relay.restore();
    let restored = now().await;
    let window = eventually(Duration::from_secs(60), "the refusals recorded", || async {
        let row = db.query_opt("SELECT started_at, ended_at FROM warden.ingest_outages", &[]).await.unwrap()?;
        Some((row.get::<_, chrono::DateTime<chrono::Utc>>(0), row.get::<_, chrono::DateTime<chrono::Utc>>(1)))
    })
    .await;
    let after = now().await;
    assert!(before <= window.0 && window.0 <= restored, "began with the refusals: {window:?}, {before}..{restored}");
    assert!(
        restored <= window.1 && window.1 <= after,
        "ended when the database answered: {window:?}, {restored}..{after}"
    );
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_heartbeats").await, 0, "nothing was written meanwhile");
}

#[tokio::test]
async fn liveness_waits_for_an_outage_to_be_recorded_before_judging_the_agents() {
    // The evaluator may find the database back before ingest has recorded
    // how long it refused heartbeats (its probe comes later, or its record
    // is slow to commit). A lock on the table holds the record back here.
    let Some((relay, app)) =
        app_behind_relay_with(|s| s.health.check_interval = warden::config::Duration::from_secs(5)).await
    else {
        return;
    };
    let key = app.key(&[Scope::Ingest]).await;
    let quiet = json!({"agent_id": "quiet", "next_heartbeat_ms": 5000});
    assert_eq!(app.heartbeat(&key, quiet.clone()).await.0, 200);
    let db = app.db.client().await;
    let liveness = || async {
        db.query_one("SELECT liveness FROM warden.agent_status WHERE agent_id = 'quiet'", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    eventually(Duration::from_secs(60), "the agent online", || async { (liveness().await == "online").then_some(()) })
        .await;

    let mut holder = app.db.client().await;
    let hold = holder.transaction().await.unwrap();
    hold.execute("LOCK TABLE warden.ingest_outages IN SHARE MODE", &[]).await.unwrap();
    assert_eq!(app.heartbeat(&key, quiet.clone()).await.0, 200);
    relay.cut();
    let door = json!({"agent_id": "door"});
    eventually(Duration::from_secs(60), "a 503 while the database is out of reach", || async {
        (app.post("/v1/heartbeats", &key, &door).await.status() == 503).then_some(())
    })
    .await;
    // Late, were the outage not left out of its silence.
    eventually(Duration::from_secs(60), "the agent silent past its interval", || async {
        let silent: bool = db
            .query_one(
                "SELECT now() - last_seen > interval '8 seconds' FROM warden.agent_status WHERE agent_id = 'quiet'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        silent.then_some(())
    })
    .await;
    let waits_before = waits(&app).await;
    relay.restore();
    let restored: chrono::DateTime<chrono::Utc> = db.query_one("SELECT now()", &[]).await.unwrap().get(0);
    let last_cycle = || async {
        db.query_one("SELECT last_cycle_at FROM warden.evaluator_state", &[])
            .await
            .unwrap()
            .get::<_, Option<chrono::DateTime<chrono::Utc>>>(0)
    };
    eventually(Duration::from_secs(60), "the record waiting on the lock", || async {
        (app.db.waiting_on_locks("INSERT INTO warden.ingest_outages%").await > 0).then_some(())
    })
    .await;
    // The wait lasts two check intervals (10 s) at most: looked at as soon
    // as it shows.
    eventually(Duration::from_secs(60), "the evaluator back, judging or waiting", || async {
        (last_cycle().await.is_some_and(|at| at > restored) || waits(&app).await > waits_before).then_some(())
    })
    .await;
    assert!(last_cycle().await.is_none_or(|at| at <= restored), "no liveness cycle before the outage is recorded");
    assert_eq!(liveness().await, "online");

    // The agent speaks again before the wait ends, and goes on, so that
    // what follows does not hang on how soon this machine gets there.
    assert_eq!(app.heartbeat(&key, quiet.clone()).await.0, 200);
    let speaking = {
        let (http, url, key) = (app.http.clone(), app.url("/v1/heartbeats"), key.clone());
        tokio::spawn(async move {
            loop {
                let _ = http.post(&url).bearer_auth(&key).json(&quiet).send().await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    hold.rollback().await.unwrap();
    eventually(Duration::from_secs(60), "a liveness cycle after the outage is recorded", || async {
        let ended: Option<chrono::DateTime<chrono::Utc>> =
            db.query_one("SELECT max(ended_at) FROM warden.ingest_outages", &[]).await.unwrap().get(0);
        (ended.is_some() && last_cycle().await > ended).then_some(())
    })
    .await;
    let late = app
        .count(
            "SELECT count(*) FROM warden.system_events WHERE event_type = 'status_changed' \
               AND agent_id = 'quiet' AND details->>'new' IN ('degraded', 'offline')",
        )
        .await;
    speaking.abort();
    assert_eq!(late, 0, "the agent is not late for warden's outage");
}

/// Liveness cycles put off so far, by every warden in this process.
async fn waits(app: &TestApp) -> f64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    crate::metrics::metric(&text, "warden_evaluation_waits_total").unwrap_or(0.0)
}

/// One HTTP/1.1 response from `stream`: status, head (lower case) and
/// body (Content-Length framed, as warden's JSON answers are).
async fn read_response(stream: &mut tokio::net::TcpStream) -> (u16, String, String) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await.expect("the answer arrives");
        assert!(n > 0, "connection closed before an answer: {:?}", String::from_utf8_lossy(&buffer));
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_lowercase();
    let status: u16 = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .expect("a Content-Length");
    while buffer.len() < head_end + length {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed mid-answer");
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buffer[head_end..head_end + length]).into_owned();
    (status, head, body)
}

#[tokio::test]
async fn a_large_batch_refused_in_an_outage_gets_its_503_on_a_connection_that_stays_open() {
    // A key warden has not verified yet cannot be checked while the
    // database is out of reach. Refusing before the body is read makes
    // the server close the connection on a client still sending: the
    // client sees a failed send, not the 503 and its Retry-After.
    let Some((relay, app)) = app_behind_relay().await else { return };
    let key = app.key(&[Scope::Ingest]).await;
    relay.cut();
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let post = |key: &str, body: &[u8]| {
        let mut request = format!(
            "POST /v1/heartbeats HTTP/1.1\r\nHost: warden\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        request
    };

    let large = vec![b' '; 800 * 1024];
    stream.write_all(&post(&key, &large)).await.expect("the whole batch is taken");
    let (status, head, body) = read_response(&mut stream).await;
    assert_eq!(status, 503, "{body}");
    assert!(head.contains("retry-after:"), "{head}");

    stream.write_all(&post(&key, br#"{"agent_id": "same-connection"}"#)).await.unwrap();
    let (status, _, body) = read_response(&mut stream).await;
    assert_eq!(status, 503, "still out of reach, and still answered: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_without_its_database_and_migrates_when_it_answers() {
    // A database starting beside warden, or failing over while it starts:
    // warden serves 503s instead of exiting, then migrates and starts its
    // work by itself.
    let db = crate::helpers::TestDb::empty().await;
    let Some((relay, through)) = Relay::to(&db).await else { return };
    relay.cut();
    let mut settings = default_settings();
    let user = through.get_user().unwrap_or("postgres");
    settings.database.url = Secret::new(format!("host=127.0.0.1 port={} user={user} dbname={}", relay.port, db.name));
    settings.database.pool_size = 4;
    settings.database.connect_timeout = warden::config::Duration::from_secs(1);
    settings.database.acquire_timeout = warden::config::Duration::from_secs(1);
    settings.server.listen = "127.0.0.1:0".parse().unwrap();
    settings.health.check_interval = warden::config::Duration::from_secs(1);
    let app = Application::build(settings).await.expect("starts without its database");
    let base = format!("http://{}", app.local_addr());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run(shutdown.clone()));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();

    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200, "alive");
    for path in ["/readyz", "/v1/agents"] {
        let response = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 503, "{path}");
        assert!(response.headers().contains_key("retry-after"), "{path}");
    }
    let beat = http.post(format!("{base}/v1/heartbeats")).json(&json!({"agent_id": "early"})).send().await.unwrap();
    assert_eq!(beat.status(), 503);
    // An MCP client gets the refusal as the answer to its request, with no
    // HTTP error status to end its session on.
    let call = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                      "params": {"name": "heartbeat", "arguments": {"agent_id": "early"}}});
    let answer = http.post(format!("{base}/mcp")).json(&call).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert!(answer.headers().contains_key("retry-after"));
    let answer: serde_json::Value = answer.json().await.unwrap();
    assert_eq!((&answer["id"], &answer["error"]["data"]["http_status"]), (&json!(9), &json!(503)), "{answer}");

    relay.restore();
    eventually(Duration::from_secs(120), "migrated, evaluating and ready", || async {
        let response = http.get(format!("{base}/readyz")).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    let key = warden::auth::create_key(&db.client().await, "late", &[Scope::Ingest]).await.unwrap().token;
    let beat =
        http.post(format!("{base}/v1/heartbeats")).bearer_auth(&key).json(&json!({"agent_id": "late"})).send().await;
    assert_eq!(beat.unwrap().status(), 200);
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// Without group commit (the benchmark's baseline) a batch is still all or
/// nothing: it used to be written a transaction per heartbeat, leaving the
/// first ones of a batch stored and the batch answered 503.
#[tokio::test]
async fn without_group_commit_a_batch_refused_midway_writes_nothing() {
    let app = TestApp::spawn_with(|s| s.ingest.group_commit = false).await;
    let key = app.key(&[Scope::Ingest]).await;
    let db = app.db.client().await;
    db.batch_execute(
        "CREATE FUNCTION public.disk_full() RETURNS trigger LANGUAGE plpgsql AS \
           $$BEGIN RAISE EXCEPTION 'could not extend file' USING ERRCODE = 'disk_full'; END$$; \
         CREATE TRIGGER disk_full BEFORE INSERT ON warden.agent_heartbeats \
           FOR EACH ROW WHEN (NEW.agent_id = 'last') EXECUTE FUNCTION public.disk_full();",
    )
    .await
    .unwrap();
    let batch = json!({"heartbeats": [{"agent_id": "first"}, {"agent_id": "second"}, {"agent_id": "last"}]});
    let response = app.post("/v1/heartbeats", &key, &batch).await;
    assert_eq!(response.status(), 503);
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status").await, 0, "nothing of the batch stored");
    let single = app.heartbeat(&key, json!({"agent_id": "first"})).await;
    assert_eq!(single.0, 200, "{}", single.1);
}

/// A database out of disk (or memory) refuses writes for now, not for what
/// they are: 503 with Retry-After, and the agents noted as alive, rather
/// than 500s and a fleet read as silent. The disk is "full" for the
/// heartbeat table alone, as a trigger raising its SQLSTATE makes it.
#[tokio::test]
async fn a_full_disk_is_refused_with_503_and_the_agents_noted_as_alive() {
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Ingest]).await;
    let beat = json!({"agent_id": "on-full-disk", "next_heartbeat_ms": 5000});
    assert_eq!(app.heartbeat(&key, beat.clone()).await.0, 200);
    let db = app.db.client().await;
    db.batch_execute(
        "CREATE FUNCTION public.disk_full() RETURNS trigger LANGUAGE plpgsql AS \
           $$BEGIN RAISE EXCEPTION 'could not extend file' USING ERRCODE = 'disk_full'; END$$; \
         CREATE TRIGGER disk_full BEFORE INSERT ON warden.agent_heartbeats \
           FOR EACH ROW EXECUTE FUNCTION public.disk_full();",
    )
    .await
    .unwrap();
    let response = app.post("/v1/heartbeats", &key, &beat).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_some(), "503 with Retry-After");
    // The drop locks the heartbeat table, and may deadlock with warden's
    // own loops reading it: tried again until it goes through.
    eventually(Duration::from_secs(60), "the trigger dropped", || async {
        db.batch_execute("DROP TRIGGER IF EXISTS disk_full ON warden.agent_heartbeats").await.ok()
    })
    .await;
    eventually(Duration::from_secs(60), "the refused agent noted", || async {
        db.query_opt("SELECT 1 FROM warden.ingest_refusals WHERE agent_id = 'on-full-disk'", &[]).await.unwrap()
    })
    .await;
    assert_eq!(app.heartbeat(&key, beat).await.0, 200, "taken again once there is room");
    assert_eq!(app.count("SELECT heartbeat_count FROM warden.agent_status").await, 2, "the refused one wrote nothing");
}

#[tokio::test]
async fn a_login_refused_while_serving_is_503_until_it_is_allowed_again() {
    // A role of this test's own, so that refusing its login touches no
    // other test's connections: a rotated password or a changed pg_hba.conf
    // look the same to warden (SQLSTATE class 28).
    let role = TestRole::create("LOGIN SUPERUSER").await;
    let admin = crate::helpers::admin_client().await;
    let app = TestApp::spawn_with(|s| {
        let url = role.in_url(s.database.url.expose());
        s.database.url = Secret::new(url);
    })
    .await;
    let key = app.key(&[Scope::Ingest]).await;
    let beat = json!({"agent_id": "login-refused", "next_heartbeat_ms": 5000});
    assert_eq!(app.heartbeat(&key, beat.clone()).await.0, 200);
    assert_eq!(app.get("/readyz").await.status(), 200);

    admin.batch_execute(&format!("ALTER ROLE {} NOLOGIN", role.0)).await.unwrap();
    eventually(Duration::from_secs(60), "warden's connections closed", || async {
        let left: i64 = admin
            .query_one("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1", &[&role.0])
            .await
            .unwrap()
            .get(0);
        (left == 0).then_some(())
    })
    .await;
    // Every request now needs a new connection, which the server refuses.
    for _ in 0..5 {
        let response = app.post("/v1/heartbeats", &key, &beat).await;
        assert_eq!(response.status(), 503, "a refused login is 503, not 500");
        assert!(response.headers().get("retry-after").is_some(), "503 with Retry-After");
    }
    let body: serde_json::Value = eventually(Duration::from_secs(30), "readyz 503", || async {
        let response = app.get("/readyz").await;
        if response.status() == 503 { response.json().await.ok() } else { None }
    })
    .await;
    assert!(body["error"]["message"].as_str().unwrap().contains("login"), "{body}");

    admin.batch_execute(&format!("ALTER ROLE {} LOGIN", role.0)).await.unwrap();
    eventually(Duration::from_secs(60), "heartbeats accepted again", || async {
        (app.heartbeat(&key, beat.clone()).await.0 == 200).then_some(())
    })
    .await;
    eventually(Duration::from_secs(30), "readyz 200 again", || async {
        (app.get("/readyz").await.status() == 200).then_some(())
    })
    .await;
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn a_login_refused_at_start_up_stops_serve_saying_so() {
    // Unlike a server that is not there yet, a refused login is a mistake
    // in database.url (or the server's rules) that waiting will not fix.
    let role = TestRole::create("NOLOGIN").await;
    let db = crate::helpers::TestDb::migrated().await;
    let mut settings = default_settings();
    settings.database.url = Secret::new(role.in_url(&db.url()));
    settings.server.listen = "127.0.0.1:0".parse().unwrap();
    let error = match Application::build(settings).await {
        Ok(_) => panic!("serve started with a login the server refuses"),
        Err(e) => e,
    };
    assert!(!error.is_temporary(), "not waited for: {error}");
    assert!(error.to_string().contains("refuses warden's login"), "{error}");
    assert!(error.to_string().contains(&role.0), "names the role: {error}");
}

#[tokio::test]
async fn a_database_emptied_under_warden_is_503_until_migrated_again() {
    // A restore or a failover onto a database without warden's schema:
    // nothing warden can do by itself, but nothing a client did wrong
    // either, so 503 (retry later) rather than 500.
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Ingest]).await;
    let beat = json!({"agent_id": "schema-gone", "next_heartbeat_ms": 5000});
    assert_eq!(app.heartbeat(&key, beat.clone()).await.0, 200);
    let db = app.db.client().await;
    // warden's own loops hold locks on the schema's tables: a drop that
    // deadlocks with one of them is tried again.
    eventually(Duration::from_secs(60), "the schema dropped", || async {
        db.batch_execute("DROP SCHEMA warden CASCADE").await.ok()
    })
    .await;

    for _ in 0..5 {
        let response = app.post("/v1/heartbeats", &key, &beat).await;
        assert_eq!(response.status(), 503, "an unmigrated database is 503, not 500");
        assert!(response.headers().get("retry-after").is_some(), "503 with Retry-After");
    }
    let response = app.get("/readyz").await;
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("warden migrate"), "{body}");

    let mut client = app.db.pooled().await;
    warden::db::migrate::run(&mut client).await.unwrap();
    let key = app.key(&[Scope::Ingest]).await; // the old keys went with the schema
    eventually(Duration::from_secs(60), "heartbeats accepted once migrated", || async {
        (app.heartbeat(&key, beat.clone()).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_heartbeats WHERE agent_id = 'schema-gone'").await, 1);
}
