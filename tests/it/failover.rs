//! Three warden processes on one database under load; the evaluator leader
//! is killed with SIGKILL while an agent fails. Another replica must lead,
//! the agent's transitions must all be recorded once, its alert sent once,
//! and its recovery run once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{TestDb, eventually};
use crate::procs::{Process, example_agent, free_port};

const WAIT: Duration = Duration::from_secs(90);

/// Webhook deliveries received: (idempotency key, body).
type Received = Arc<Mutex<Vec<(String, Value)>>>;

async fn webhook_receiver() -> (String, Received) {
    let received: Received = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::Json<Value>| {
            let sink = sink.clone();
            async move {
                let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                sink.lock().unwrap().push((key, body.0));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_transition_and_sends_nothing_twice() {
    warden::alerting::tls::install_crypto_provider();
    let db = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs.log");
    let ports = [free_port(), free_port(), free_port()];
    let urls: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let (hook, received) = webhook_receiver().await;
    // The restart logs each run, then starts the agent against every replica.
    let script = "echo run >> \"$1\"; \"$0\" --url \"$2\" --url \"$3\" --url \"$4\" --agent-id \"$5\" \
                  --interval-ms 1000 --every-ms 300 </dev/null >/dev/null 2>&1 & echo $! > \"$1.pid\"";
    let config = dir.path().join("warden.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[auth]
enabled = false
[health]
check_interval = "500ms"
[alerting]
group_wait = "1s"
group_interval = "1s"
hold_during_recovery = "0s"
[alerting.channels.hook]
kind = "webhook"
url = {hook:?}
secret = "s3cret"
[recovery]
poll_interval = "200ms"
lease_margin = "2s"
verify_timeout = "30s"
[[recovery.strategies]]
name = "restart"
issues = ["agent_unresponsive"]
[[recovery.strategies.actions]]
kind = "command"
argv = ["/bin/sh", "-c", {script:?}, {bin:?}, {runs:?}, {u0:?}, {u1:?}, {u2:?}, "{{agent_id}}"]
timeout = "10s"
"#,
            bin = example_agent().display().to_string(),
            runs = runs.display().to_string(),
            u0 = urls[0],
            u1 = urls[1],
            u2 = urls[2],
        ),
    )
    .unwrap();
    let mut replicas: Vec<Process> = ports.iter().map(|p| Process::replica(&config, &db.url(), *p)).collect();
    for r in &replicas {
        r.ready(WAIT).await;
    }
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();

    // Load: twenty steady agents spread over the replicas, skipping dead ones.
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (http, urls, stop) = (http.clone(), urls.clone(), stop.clone());
        tokio::spawn(async move {
            let mut round = 0usize;
            while !stop.is_cancelled() {
                for agent in 0..20 {
                    let body = serde_json::json!({"agent_id": format!("steady-{agent}"), "next_heartbeat_ms": 1000});
                    for attempt in 0..urls.len() {
                        let url = &urls[(round + agent + attempt) % urls.len()];
                        if http
                            .post(format!("{url}/v1/heartbeats"))
                            .json(&body)
                            .send()
                            .await
                            .is_ok_and(|r| r.status() == 200)
                        {
                            break;
                        }
                    }
                }
                round += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let mut victim = Process::agent(&[&urls[0], &urls[1], &urls[2]], "victim", 1000, 300);
    let client = db.client().await;
    eventually(WAIT, "every agent online", || async {
        let n: i64 = client
            .query_one("SELECT count(*) FROM warden.agent_status WHERE liveness = 'online'", &[])
            .await
            .ok()?
            .get(0);
        (n == 21).then_some(())
    })
    .await;

    // The agent dies, and so does the evaluator leader.
    let leader: String = client
        .query_one("SELECT leader FROM warden.evaluator_state", &[])
        .await
        .unwrap()
        .get::<_, Option<String>>(0)
        .unwrap();
    let leader_port: u16 = leader.rsplit(':').next().unwrap().parse().unwrap();
    let index = ports.iter().position(|p| *p == leader_port).expect("the leader is one of ours");
    victim.kill();
    replicas[index].kill();
    let killed_at = std::time::Instant::now();

    let new_leader = eventually(WAIT, "another replica to lead", || async {
        let row = client.query_one("SELECT leader FROM warden.evaluator_state", &[]).await.ok()?;
        let now: Option<String> = row.get(0);
        now.filter(|l| *l != leader)
    })
    .await;
    eprintln!("{new_leader} took over {:.2}s after the leader was killed", killed_at.elapsed().as_secs_f64());

    // The agent's failure is noticed, paged and recovered by the survivors.
    eventually(WAIT, "the victim recovered", || async {
        let row =
            client.query_opt("SELECT state FROM warden.recovery_jobs WHERE agent_id = 'victim'", &[]).await.ok()??;
        (row.get::<_, String>(0) == "succeeded").then_some(())
    })
    .await;
    // The replicas keep evaluating after the load stops, and the steady
    // agents (and the victim, killed below) then go quiet: what follows is
    // judged up to this moment.
    let stopped_at: chrono::DateTime<chrono::Utc> = client.query_one("SELECT now()", &[]).await.unwrap().get(0);
    stop.cancel();
    load.await.unwrap();
    if let Some(pid) =
        std::fs::read_to_string(format!("{}.pid", runs.display())).ok().and_then(|p| p.trim().parse::<i32>().ok())
    {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }

    // Every transition of the victim, once, in order.
    let transitions: Vec<(String, String)> = client
        .query(
            "SELECT details->>'old', details->>'new' FROM warden.system_events \
             WHERE agent_id = 'victim' AND event_type = 'status_changed' AND occurred_at < $1 \
             ORDER BY occurred_at, id",
            &[&stopped_at],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for pair in transitions.windows(2) {
        assert_eq!(pair[0].1, pair[1].0, "transitions chain without gaps or repeats: {transitions:?}");
    }
    assert_eq!(transitions.iter().filter(|t| t.1 == "offline").count(), 1, "{transitions:?}");
    assert_eq!(transitions.last().unwrap().1, "online");
    // The steady agents never went offline through the failover.
    let steady_offline: i64 = client
        .query_one(
            "SELECT count(*) FROM warden.system_events WHERE agent_id LIKE 'steady-%' \
             AND event_type = 'status_changed' AND details->>'new' = 'offline' AND occurred_at < $1",
            &[&stopped_at],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(steady_offline, 0);

    // The recovery ran once.
    let ran = std::fs::read_to_string(&runs).unwrap_or_default().lines().count();
    let actions: i64 = client
        .query_one("SELECT count(*) FROM warden.recovery_actions WHERE agent_id = 'victim'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((ran, actions), (1, 1), "one restart, one recorded action");

    // Each delivery reached the receiver under one idempotency key; the
    // victim's incident paged once.
    // (Read until the two agree: a delivery can be in flight between the
    // receiver and its row, and quiet agents keep making new ones.)
    eventually(WAIT, "one key per sent delivery", || async {
        let keys: Vec<String> = received.lock().unwrap().iter().map(|(key, _)| key.clone()).collect();
        assert!(keys.iter().all(|k| !k.is_empty()), "every delivery carries an idempotency key");
        let distinct = keys.iter().collect::<std::collections::HashSet<_>>().len() as i64;
        let delivered: i64 = client
            .query_one("SELECT count(*) FROM warden.alert_deliveries WHERE channel = 'hook' AND state = 'sent'", &[])
            .await
            .ok()?
            .get(0);
        (distinct == delivered).then_some(())
    })
    .await;
    let paged: i64 = client
        .query_one(
            "SELECT count(*) FROM warden.alert_notifications n JOIN warden.alerts a ON a.id = n.alert_id \
             WHERE a.dedup_key = 'victim:agent_unresponsive' AND n.kind = 'firing'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(paged <= 1, "the victim's page was notified at most once per channel: {paged}");
}

/// A leader whose host vanishes (no FIN, no RST) keeps its session lock
/// until PostgreSQL gives the session up; warden's sessions ask the server
/// to probe them, so that takes about a minute, not the operating
/// system's default of over two hours.
#[tokio::test]
async fn the_server_gives_up_warden_sessions_within_about_a_minute_of_silence() {
    let db = TestDb::migrated().await;
    let client = db.pooled().await;
    let row = client
        .query_one(
            "SELECT inet_client_addr() IS NOT NULL, \
                    (SELECT array_agg(setting || ' ' || source ORDER BY name) FROM pg_settings \
                     WHERE name IN ('tcp_keepalives_idle', 'tcp_keepalives_interval', 'tcp_keepalives_count', \
                                    'tcp_user_timeout'))",
            &[],
        )
        .await
        .unwrap();
    let (tcp, settings): (bool, Vec<String>) = (row.get(0), row.get(1));
    if tcp {
        assert_eq!(settings, ["3 client", "30 client", "10 client", "60000 client"]);
    } else {
        // Over a Unix socket the values read 0, but the request is made.
        assert!(settings.iter().all(|s| s.ends_with(" client")), "{settings:?}");
    }
}
