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
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use warden::app::Application;
use warden::auth::Scope;
use warden::config::Secret;
use warden::db::embedded::EmbeddedCluster;

use crate::helpers::{TestApp, default_settings, eventually};

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

    shutdown.cancel();
    server.await.unwrap().unwrap();
    drop(client);
    cluster.stop().await;
}

/// A TCP relay in front of PostgreSQL that a test can cut and restore: a
/// network outage of one warden's database, leaving the server (shared
/// with every other test) untouched.
struct Relay {
    port: u16,
    /// host:port of PostgreSQL, known once warden's settings are.
    target: Arc<std::sync::OnceLock<String>>,
    up: Arc<AtomicBool>,
    cuts: tokio::sync::watch::Sender<u64>,
}

impl Relay {
    async fn start() -> Self {
        let target = Arc::new(std::sync::OnceLock::<String>::new());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let (cuts, cut_seen) = tokio::sync::watch::channel(0u64);
        let (open, to) = (up.clone(), target.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !open.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is refused
                }
                let mut cut = cut_seen.clone();
                cut.borrow_and_update(); // only cuts from now on
                let target = to.get().cloned().expect("target set before warden starts");
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self { port, target, up, cuts }
    }

    /// Closes every relayed connection and refuses new ones.
    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// `key=value` from a libpq-style connection string.
fn setting<'a>(url: &'a str, key: &str) -> &'a str {
    url.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')).expect(key)
}

#[tokio::test]
async fn a_short_outage_is_refused_with_503_and_its_end_recorded_for_liveness() {
    // Shorter than the evaluator's gap limit, so only ingestion can tell
    // liveness that the agents' silence was not theirs.
    let relay = Relay::start().await;
    let (port, target) = (relay.port, relay.target.clone());
    let app = TestApp::spawn_with(move |s| {
        let url = s.database.url.expose().to_string();
        let (host, real_port) = (setting(&url, "host"), setting(&url, "port"));
        target.set(format!("{host}:{real_port}")).unwrap();
        let through = url.replace(&format!("port={real_port}"), &format!("port={port}"));
        s.database.url = Secret::new(through.replace(&format!("host={host}"), "host=127.0.0.1"));
    })
    .await;
    let key = app.key(&[Scope::Ingest]).await;
    let beat = json!({"agent_id": "through-relay", "next_heartbeat_ms": 5000});
    assert_eq!(app.heartbeat(&key, beat.clone()).await.0, 200);
    let db = app.db.client().await;
    eventually(Duration::from_secs(60), "the evaluator's first cycle", || async {
        let row = db.query_one("SELECT last_cycle_at IS NOT NULL FROM warden.evaluator_state", &[]).await.ok()?;
        row.get::<_, bool>(0).then_some(())
    })
    .await;
    let before: chrono::DateTime<chrono::Utc> = db.query_one("SELECT now()", &[]).await.unwrap().get(0);

    relay.cut();
    let refused = eventually(Duration::from_secs(60), "a 503 while the database is out of reach", || async {
        let response = app.post("/v1/heartbeats", &key, &beat).await;
        (response.status() == 503).then(|| response.headers().get("retry-after").cloned())
    })
    .await;
    assert!(refused.is_some(), "503 with Retry-After");

    relay.restore();
    eventually(Duration::from_secs(60), "heartbeats accepted again", || async {
        (app.heartbeat(&key, beat.clone()).await.0 == 200).then_some(())
    })
    .await;
    let resumed: Option<chrono::DateTime<chrono::Utc>> =
        db.query_one("SELECT resumed_at FROM warden.evaluator_state", &[]).await.unwrap().get(0);
    assert!(resumed.is_some_and(|r| r > before), "ingestion's resumption recorded: {resumed:?} after {before}");
}
