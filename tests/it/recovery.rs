//! Recovery with real processes: a real agent process heartbeats, the test
//! kills it, and a configured strategy restarts it (or fails to, in the
//! variants), all through a running warden whose evaluator and recovery
//! engine work in real time with short intervals.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use warden::config::{Action, Duration as D, Settings, Strategy};
use warden::health::incidents::IssueType;

use crate::helpers::{TestApp, eventually};
use crate::procs::{Process, example_agent, free_port};

const WAIT: Duration = Duration::from_secs(60);

/// Settings for fast real-time recovery: beats every 300 ms against a
/// declared 1 s interval (offline after 3.2 s of silence).
fn fast(s: &mut Settings, strategies: Vec<Strategy>) {
    s.health.check_interval = D::from_millis(200);
    s.health.score_interval = D::from_secs(3600);
    s.recovery.poll_interval = D::from_millis(100);
    s.recovery.backoff_base = D::from_millis(200);
    s.recovery.backoff_cap = D::from_secs(1);
    // A restarted agent is a new process that must start, heartbeat and be
    // seen on time again: generous on a loaded machine.
    s.recovery.verify_timeout = Some(D::from_secs(20));
    s.recovery.max_attempts = 3;
    s.recovery.attempt_window = D::from_secs(600);
    s.recovery.lease_margin = D::from_secs(1);
    s.recovery.strategies = strategies;
}

fn strategy(actions: Vec<Action>) -> Strategy {
    Strategy {
        name: "restart".into(),
        issues: vec![IssueType::AgentUnresponsive],
        labels: Default::default(),
        verify_timeout: None,
        actions,
    }
}

fn command(argv: Vec<String>, timeout: D) -> Action {
    Action::Command { name: None, argv, timeout, attempts: 1 }
}

/// A command that starts the agent again in the background, as
/// `systemctl restart` would, and records its pid. The agent id comes in as
/// an argument of its own ("$2"), never inside the script.
fn restart_command(url: &str, pidfile: &Path) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        "\"$0\" --url \"$1\" --agent-id \"$2\" --interval-ms 1000 --every-ms 300 \
         </dev/null >/dev/null 2>&1 & echo $! > \"$3\""
            .into(),
        example_agent().display().to_string(),
        url.into(),
        "{agent_id}".into(),
        pidfile.display().to_string(),
    ]
}

/// A warden with recovery strategies built from its own URL. Keys are off:
/// these tests are about recovery, and restarted agents need none.
async fn spawn_recovering(build: impl FnOnce(&str) -> Vec<Strategy>) -> TestApp {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let strategies = build(&url);
    TestApp::spawn_with(move |s| {
        fast(s, strategies);
        s.auth.enabled = false;
        s.server.listen = format!("127.0.0.1:{port}").parse().unwrap();
    })
    .await
}

/// The example agent beating every 300 ms against a declared 1 s interval.
fn start_agent(app: &TestApp, agent_id: &str) -> Process {
    Process::agent(&[&app.url("")], agent_id, 1000, 300)
}

/// Kills the agent a restart command started, when the test ends.
struct Pidfile(PathBuf);

impl Drop for Pidfile {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

async fn liveness(app: &TestApp, agent: &str) -> Option<String> {
    app.db
        .client()
        .await
        .query_opt("SELECT liveness FROM warden.agent_status WHERE agent_id = $1", &[&agent])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

async fn wait_liveness(app: &TestApp, agent: &str, want: &str) {
    eventually(WAIT, &format!("{agent} {want}"), || async {
        (liveness(app, agent).await.as_deref() == Some(want)).then_some(())
    })
    .await;
}

/// (action, attempt, state, outcome, detail) of the agent's recovery actions.
async fn actions(app: &TestApp, agent: &str) -> Vec<(String, i32, String, Option<String>, Value)> {
    app.db
        .client()
        .await
        .query(
            "SELECT action, attempt, state, outcome, detail FROM warden.recovery_actions WHERE agent_id = $1 ORDER BY id",
            &[&agent],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

async fn job_state(app: &TestApp, agent: &str) -> Option<String> {
    app.db
        .client()
        .await
        .query_opt("SELECT state FROM warden.recovery_jobs WHERE agent_id = $1 ORDER BY id DESC LIMIT 1", &[&agent])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_is_restarted_verified_and_its_incident_resolved() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("agent.pid");
    let _cleanup = Pidfile(pidfile.clone());
    let app =
        spawn_recovering(|url| vec![strategy(vec![command(restart_command(url, &pidfile), D::from_secs(10))])]).await;

    let mut agent = start_agent(&app, "rec-1");
    wait_liveness(&app, "rec-1", "online").await;
    agent.kill();
    // Offline is brief (the restart follows at once): wait for its record.
    eventually(WAIT, "rec-1 declared offline", || async {
        let n = app
            .count(
                "SELECT count(*) FROM warden.system_events WHERE agent_id = 'rec-1' \
                 AND event_type = 'status_changed' AND details ->> 'new' = 'offline'",
            )
            .await;
        (n > 0).then_some(())
    })
    .await;

    // The strategy restarts it; the agent is verified back and the incident
    // resolves with the recovery credited (the evaluator may resolve it a
    // moment earlier, when the agent is online again; the engine then
    // credits the recovery).
    eventually(WAIT, "the recovery to succeed", || async {
        (job_state(&app, "rec-1").await.as_deref() == Some("succeeded")).then_some(())
    })
    .await;
    let resolution = eventually(WAIT, "the incident resolved by the recovery", || async {
        let row = app
            .db
            .client()
            .await
            .query_opt(
                "SELECT resolution FROM warden.incidents WHERE agent_id = 'rec-1'                  AND issue_type = 'agent_unresponsive' AND state = 'resolved'",
                &[],
            )
            .await
            .unwrap()?;
        row.get::<_, Option<String>>(0)
    })
    .await;
    assert!(resolution.starts_with("auto-recovered by restart/command#1 on attempt 1"), "{resolution}");
    assert_eq!(liveness(&app, "rec-1").await.as_deref(), Some("online"));
    let steps = actions(&app, "rec-1").await;
    assert_eq!(steps.len(), 1, "one attempt: {steps:?}");
    let (action, attempt, state, outcome, detail) = &steps[0];
    assert_eq!((action.as_str(), *attempt, state.as_str()), ("command#1", 1, "succeeded"));
    assert!(outcome.as_deref().unwrap().contains("verified"), "{outcome:?}");
    assert_eq!(detail["exit_code"], 0);
    assert_eq!(job_state(&app, "rec-1").await.as_deref(), Some("succeeded"));
    let events: i64 =
        app.count("SELECT count(*) FROM warden.system_events WHERE event_type = 'recovery_succeeded'").await;
    assert_eq!(events, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_command_backs_off_exhausts_and_escalates_exactly_once() {
    let app = spawn_recovering(|_| {
        vec![strategy(vec![command(
            vec!["/bin/sh".into(), "-c".into(), "echo nope >&2; exit 7".into()],
            D::from_secs(5),
        )])]
    })
    .await;
    let mut agent = start_agent(&app, "rec-2");
    wait_liveness(&app, "rec-2", "online").await;
    agent.kill();
    eventually(WAIT, "the recovery to give up", || async {
        (job_state(&app, "rec-2").await.as_deref() == Some("exhausted")).then_some(())
    })
    .await;
    let steps = actions(&app, "rec-2").await;
    assert_eq!(steps.len(), 3, "max_attempts: {steps:?}");
    for (i, (_, attempt, state, outcome, detail)) in steps.iter().enumerate() {
        assert_eq!((*attempt, state.as_str()), (i as i32 + 1, "failed"));
        assert!(outcome.as_deref().unwrap().contains("exited 7"));
        assert_eq!(detail["exit_code"], 7);
        assert_eq!(detail["stderr"], "nope\n");
    }
    let failed = app
        .db
        .client()
        .await
        .query("SELECT severity, details FROM warden.system_events WHERE event_type = 'recovery_failed'", &[])
        .await
        .unwrap();
    assert_eq!(failed.len(), 1, "escalated exactly once");
    assert_eq!(failed[0].get::<_, String>(0), "critical");
    let details: Value = failed[0].get(1);
    assert_eq!(details["attempts"].as_array().unwrap().len(), 3, "says what was tried: {details}");

    // Blocked: no new attempts while the incident stays open, even if a new
    // incident of the agent opens.
    let jobs_before = app.count("SELECT count(*) FROM warden.recovery_jobs").await;
    let backoffs: Vec<i64> = app
        .db
        .client()
        .await
        .query(
            "SELECT (extract(epoch FROM started_at - lag(finished_at) OVER (ORDER BY id)) * 1000)::bigint              FROM warden.recovery_actions WHERE agent_id = 'rec-2' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .filter_map(|r| r.get::<_, Option<i64>>(0))
        .collect();
    assert_eq!(backoffs.len(), 2);
    assert!(backoffs[0] >= 200 && backoffs[1] >= 400, "doubling backoff from 200 ms: {backoffs:?}");
    assert_eq!(app.count("SELECT count(*) FROM warden.recovery_jobs").await, jobs_before);

    // An operator resets it: attempts start again.
    let reset = warden::recovery::reset(&mut app.db.client().await, "rec-2").await.unwrap();
    assert_eq!(reset, 1);
    eventually(WAIT, "a fresh attempt after the reset", || async {
        (actions(&app, "rec-2").await.len() > 3).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_command_times_out_is_verified_then_the_next_action_is_tried() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("agent.pid");
    let _cleanup = Pidfile(pidfile.clone());
    let app = spawn_recovering(|url| {
        vec![strategy(vec![
            command(vec!["/bin/sleep".into(), "30".into()], D::from_millis(300)),
            command(restart_command(url, &pidfile), D::from_secs(10)),
        ])]
    })
    .await;
    let mut agent = start_agent(&app, "rec-3");
    wait_liveness(&app, "rec-3", "online").await;
    agent.kill();
    eventually(WAIT, "recovered by the second action", || async {
        (job_state(&app, "rec-3").await.as_deref() == Some("succeeded")).then_some(())
    })
    .await;
    let steps = actions(&app, "rec-3").await;
    let states: Vec<(String, String)> = steps.iter().map(|s| (s.0.clone(), s.2.clone())).collect();
    assert_eq!(
        states,
        vec![("command#1".to_string(), "timed_out".to_string()), ("command#2".to_string(), "succeeded".to_string())]
    );
    // A command killed at its timeout may have done its part: its effect
    // is verified before the next attempt, not taken for a failure.
    let outcome = steps[0].3.clone().unwrap_or_default();
    assert!(outcome.contains("did not come back"), "verified first: {outcome}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_never_comes_back_fails_verification_until_exhausted() {
    // It never comes back, so a short verification only makes the test quicker.
    let app = spawn_recovering(|_| {
        let mut s = strategy(vec![command(vec!["/bin/true".into()], D::from_secs(5))]);
        s.verify_timeout = Some(D::from_secs(6));
        vec![s]
    })
    .await;
    let mut agent = start_agent(&app, "rec-4");
    wait_liveness(&app, "rec-4", "online").await;
    agent.kill();
    eventually(Duration::from_secs(120), "the recovery to give up", || async {
        (job_state(&app, "rec-4").await.as_deref() == Some("exhausted")).then_some(())
    })
    .await;
    let steps = actions(&app, "rec-4").await;
    assert_eq!(steps.len(), 3);
    for (_, _, state, outcome, detail) in &steps {
        assert_eq!(state, "failed");
        assert!(outcome.as_deref().unwrap().contains("did not come back"), "{outcome:?}");
        assert_eq!(detail["exit_code"], 0, "the command itself succeeded");
    }
}

/// A stand-in orchestrator: records each call and restarts the agent.
async fn orchestrator(
    pidfile: PathBuf,
    warden_url: String,
) -> (String, tokio::sync::mpsc::UnboundedReceiver<(axum::http::HeaderMap, Value)>) {
    use axum::routing::post;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/restart/{agent}",
        post(
            move |axum::extract::Path(agent): axum::extract::Path<String>,
                  headers: axum::http::HeaderMap,
                  body: axum::Json<Value>| {
                let (tx, pidfile, warden_url) = (tx.clone(), pidfile.clone(), warden_url.clone());
                async move {
                    let mut child = std::process::Command::new(example_agent())
                        .args([
                            "--url",
                            &warden_url,
                            "--agent-id",
                            &agent,
                            "--interval-ms",
                            "1000",
                            "--every-ms",
                            "300",
                        ])
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn()
                        .unwrap();
                    std::fs::write(&pidfile, child.id().to_string()).unwrap();
                    // Reaped when the test's Pidfile guard kills it.
                    std::thread::spawn(move || child.wait());
                    let _ = tx.send((headers, body.0));
                    axum::http::StatusCode::ACCEPTED
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_action_calls_the_orchestrator_with_the_filled_in_template() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("agent.pid");
    let _cleanup = Pidfile(pidfile.clone());
    let port = free_port();
    let warden_url = format!("http://127.0.0.1:{port}");
    let (orchestrator_url, mut calls) = orchestrator(pidfile.clone(), warden_url.clone()).await;
    let http = Action::Http {
        name: Some("orchestrator".into()),
        method: "POST".into(),
        // A credential in the query is sent but never recorded.
        url: format!("{orchestrator_url}/restart/{{agent_id}}?api_token=ORCH-SECRET"),
        headers: [("x-reason".to_string(), "{issue_type}".to_string())].into(),
        body: Some(json!({"agent": "{agent_id}", "incident": "{incident_id}", "force": true})),
        expect_status: vec![202],
        timeout: D::from_secs(10),
        attempts: 1,
    };
    let app = TestApp::spawn_with(move |s| {
        fast(s, vec![strategy(vec![http])]);
        s.auth.enabled = false;
        s.server.listen = format!("127.0.0.1:{port}").parse().unwrap();
    })
    .await;
    let mut agent = start_agent(&app, "rec-5");
    wait_liveness(&app, "rec-5", "online").await;
    agent.kill();
    let (headers, body) = tokio::time::timeout(WAIT, calls.recv()).await.expect("the orchestrator is called").unwrap();
    assert_eq!(headers["x-reason"], "agent_unresponsive");
    assert_eq!(body["agent"], "rec-5");
    assert_eq!(body["force"], true);
    assert!(body["incident"].as_str().unwrap().parse::<i64>().is_ok());
    eventually(WAIT, "recovered through the orchestrator", || async {
        (job_state(&app, "rec-5").await.as_deref() == Some("succeeded")).then_some(())
    })
    .await;
    let steps = actions(&app, "rec-5").await;
    assert_eq!(steps[0].0, "orchestrator");
    assert_eq!(steps[0].4["status"], 202);
    let recorded = format!("{:?} {}", steps[0].3, steps[0].4);
    assert!(!recorded.contains("ORCH-SECRET") && recorded.contains("/restart/rec-5"), "{recorded}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_automatic_restart_while_the_fleet_is_out_but_a_manual_run_or_a_later_failure_goes() {
    // The engine is driven tick by tick here, so "nothing ran" is exact.
    let app = TestApp::spawn_with(|s| {
        fast(s, vec![]);
        s.recovery.enabled = false;
    })
    .await;
    let mut settings = crate::helpers::default_settings().recovery;
    settings.strategies = vec![strategy(vec![command(vec!["/bin/true".into()], D::from_secs(5))])];
    let pool = warden::db::build_pool(app.db.config.clone(), &crate::helpers::default_settings().database).unwrap();
    let engine = warden::recovery::engine::Engine::new(
        pool,
        settings.clone(),
        &crate::helpers::default_settings().health,
        "test".into(),
    );
    let mut db = app.db.client().await;
    db.batch_execute(
        "INSERT INTO warden.agent_status (agent_id, expected_interval_ms, first_seen, last_seen, liveness) \
           VALUES ('paused', 1000, now(), now(), 'offline'); \
         INSERT INTO warden.incidents (agent_id, issue_type, severity, opened_at) \
           VALUES (NULL, 'fleet_outage', 'emergency', now() - interval '1 minute'); \
         INSERT INTO warden.incidents (agent_id, issue_type, severity, opened_at) \
           VALUES ('paused', 'agent_unresponsive', 'critical', now() - interval '2 minutes');",
    )
    .await
    .unwrap();
    for _ in 0..3 {
        let report = engine.tick(None).await.unwrap();
        assert!(report.paused_by_fleet_outage);
        assert_eq!(report.started, 0);
    }
    assert_eq!(job_state(&app, "paused").await.as_deref(), Some("pending"), "the job waits");
    assert!(actions(&app, "paused").await.is_empty(), "nothing ran during the fleet outage");

    let job = warden::recovery::run_now(&mut db, &settings, "paused", Some("restart")).await.unwrap();
    assert!(job > 0);
    let report = engine.tick(None).await.unwrap();
    assert_eq!(report.started, 1, "an operator's manual run is not held back");
    engine.settle().await;
    let steps = actions(&app, "paused").await;
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].2, "verifying");

    // An agent that fails on its own while the outage is still open (the
    // evaluator marks its incident so) is recovered as usual; any other
    // incident opened meanwhile still waits.
    db.batch_execute(
        "INSERT INTO warden.agent_status (agent_id, expected_interval_ms, first_seen, last_seen, liveness) \
           VALUES ('alone', 1000, now(), now(), 'offline'), ('erring', 1000, now(), now(), 'online'), \
                  ('before', 1000, now(), now(), 'offline'); \
         INSERT INTO warden.incidents (agent_id, issue_type, severity, details) \
           SELECT a, 'agent_unresponsive', 'critical', d FROM (VALUES \
             ('alone', jsonb_build_object('outside_fleet_outage', \
                (SELECT id FROM warden.incidents WHERE issue_type = 'fleet_outage'))), \
             ('erring', '{}'::jsonb), \
             ('before', '{\"outside_fleet_outage\": 999999}'::jsonb)) v(a, d);",
    )
    .await
    .unwrap();
    let report = engine.tick(None).await.unwrap();
    assert!(report.paused_by_fleet_outage);
    assert_eq!(report.started, 1, "a failure after the outage opened is not held back");
    engine.settle().await;
    assert_eq!(actions(&app, "alone").await.len(), 1);
    assert!(actions(&app, "erring").await.is_empty(), "not one of the outage's exceptions");
    assert!(actions(&app, "before").await.is_empty(), "an exception of another outage is not this one's");

    // The outage ends: the automatic job runs at the next tick.
    db.execute(
        "UPDATE warden.incidents SET state = 'resolved', resolved_at = now() WHERE issue_type = 'fleet_outage'",
        &[],
    )
    .await
    .unwrap();
    let report = engine.tick(None).await.unwrap();
    assert!(!report.paused_by_fleet_outage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_recovery_takes_its_command_along_and_the_job_goes_on_elsewhere() {
    let db = crate::helpers::TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("agent.pid");
    let _cleanup = Pidfile(pidfile.clone());
    let (port_a, port_b) = (free_port(), free_port());
    let (url_a, url_b) = (format!("http://127.0.0.1:{port_a}"), format!("http://127.0.0.1:{port_b}"));
    // The restart waits for the test's go-ahead (a file; a minute at most),
    // so the replica running it is killed while it runs, however slow.
    let go = dir.path().join("go");
    let script = "i=0; while [ ! -e \"$5\" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
                  \"$0\" --url \"$1\" --url \"$2\" --agent-id \"$3\" --interval-ms 1000 --every-ms 300 \
                  </dev/null >/dev/null 2>&1 & echo $! > \"$4\"";
    let config = dir.path().join("warden.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[auth]
enabled = false
[health]
check_interval = "200ms"
[recovery]
poll_interval = "100ms"
lease_margin = "1s"
verify_timeout = "10s"
backoff_base = "1s"
[[recovery.strategies]]
name = "restart"
issues = ["agent_unresponsive"]
[[recovery.strategies.actions]]
kind = "command"
argv = ["/bin/sh", "-c", {script:?}, {bin:?}, {url_a:?}, {url_b:?}, "{{agent_id}}", {pid:?}, {go:?}]
timeout = "20s"
"#,
            bin = example_agent().display().to_string(),
            pid = pidfile.display().to_string(),
            go = go.display().to_string(),
        ),
    )
    .unwrap();
    let mut replicas = vec![Process::replica(&config, &db.url(), port_a), Process::replica(&config, &db.url(), port_b)];
    for r in &replicas {
        r.ready(WAIT).await;
    }

    let mut agent = Process::agent(&[&url_a, &url_b], "rec-6", 1000, 300);
    let client = db.client().await;
    let liveness = |want: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_opt("SELECT liveness FROM warden.agent_status WHERE agent_id = 'rec-6'", &[])
                .await
                .ok()??;
            (row.get::<_, String>(0) == want).then_some(())
        }
    };
    eventually(WAIT, "rec-6 online", || liveness("online")).await;
    agent.kill();

    // Whichever replica claims the job is killed while its action runs.
    let owner: String = eventually(WAIT, "a replica running the recovery", || async {
        let row = client
            .query_opt("SELECT lease_owner FROM warden.recovery_jobs WHERE state = 'running'", &[])
            .await
            .ok()??;
        row.get::<_, Option<String>>(0)
    })
    .await;
    let owner_port: u16 = owner.rsplit(':').next().unwrap().parse().unwrap();
    let victim = replicas.iter().position(|r| r.port == owner_port).expect("the owner is one of ours");
    replicas[victim].kill();
    // Its command dies with it: left running, it would have no timeout and
    // could overlap the survivor's attempt.
    let go_path = go.display().to_string();
    eventually(WAIT, "the killed replica's command to end with it", || {
        let left = crate::procs::processes_with(&[&go_path]);
        async move { left.is_empty().then_some(()) }
    })
    .await;
    std::fs::write(&go, "").unwrap();

    // The survivor takes the job over once the lease lapses, records the
    // attempt as abandoned, finds it did not bring the agent back, and
    // runs the action again: the job succeeds with the second.
    eventually(Duration::from_secs(120), "the job to succeed", || async {
        let row = client.query_opt("SELECT state FROM warden.recovery_jobs", &[]).await.ok()??;
        (row.get::<_, String>(0) == "succeeded").then_some(())
    })
    .await;
    let runs: Vec<(String, Option<String>)> = client
        .query("SELECT state, outcome FROM warden.recovery_actions WHERE agent_id = 'rec-6' ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(runs.len(), 2, "the killed one, then the survivor's: {runs:?}");
    assert_eq!(runs[0].0, "failed", "{runs:?}");
    let outcome = runs[0].1.as_deref().unwrap();
    assert!(
        outcome.contains("stopped before the action finished") && outcome.contains("did not come back"),
        "{outcome}"
    );
    assert_eq!(runs[1].0, "succeeded", "{runs:?}");
    let succeeded: i64 = client
        .query_one("SELECT count(*) FROM warden.system_events WHERE event_type = 'recovery_succeeded'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(succeeded, 1);
}

#[tokio::test]
async fn recoveries_are_listed_and_a_manual_run_needs_the_admin_scope() {
    let app = TestApp::spawn_with(|s| {
        fast(s, vec![strategy(vec![command(vec!["/bin/true".into()], D::from_secs(5))])]);
    })
    .await;
    let ingest = app.key(&[warden::auth::Scope::Ingest]).await;
    let read = app.key(&[warden::auth::Scope::Read]).await;
    let admin = app.key(&[warden::auth::Scope::Admin]).await;
    app.heartbeat(&ingest, json!({"agent_id": "manual-1"})).await;

    let recover = |key: String, body: Value| {
        let app = &app;
        async move { app.post("/v1/agents/manual-1/recover", &key, &body).await }
    };
    assert_eq!(recover(read.clone(), json!({})).await.status(), 403);
    let unknown = app.post("/v1/agents/nobody/recover", &admin, &json!({})).await;
    assert_eq!(unknown.status(), 404);
    let bad = recover(admin.clone(), json!({"strategy": "nope"})).await;
    assert_eq!(bad.status(), 422);
    let accepted = recover(admin.clone(), json!({"strategy": "restart"})).await;
    assert_eq!(accepted.status(), 202);
    let body: Value = accepted.json().await.unwrap();
    assert!(body["job_id"].as_i64().is_some());

    let listed = eventually(WAIT, "the manual run in the history", || async {
        let response = app.http.get(app.url("/v1/recoveries?agent=manual-1")).bearer_auth(&read).send().await.ok()?;
        let list: Value = response.json().await.ok()?;
        let rows = list["recoveries"].as_array()?.clone();
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(listed[0]["strategy"], "restart");
    assert_eq!(listed[0]["agent_id"], "manual-1");
    assert_eq!(listed[0]["incident_id"], Value::Null, "a manual run has no incident");
    let (status, error) = {
        let r = app.http.get(app.url("/v1/recoveries?incident=x")).bearer_auth(&read).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!((status, error["error"]["field"].as_str()), (422, Some("incident")));
}

#[tokio::test]
async fn an_http_action_reads_its_credential_from_the_environment_and_never_records_it() {
    warden::alerting::tls::install_crypto_provider();
    let db = crate::helpers::TestDb::migrated().await;
    let orchestrator = crate::alerting::receivers::HttpReceiver::start().await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("warden.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[auth]
enabled = false
[health]
check_interval = "200ms"
[recovery]
poll_interval = "100ms"
verify_timeout = "30s"
[[recovery.strategies]]
name = "restart"
issues = ["agent_unresponsive"]
[[recovery.strategies.actions]]
kind = "http"
url = "{}/restart/{{agent_id}}"
headers = {{ authorization = "Bearer {{env.WARDEN_SECRET_ORCHESTRATOR}}", x-api-key = "{{env.WARDEN_SECRET_API_KEY}}" }}
expect_status = [200]
"#,
            orchestrator.url("")
        ),
    )
    .unwrap();
    // A key may begin with "-": in a header that is no option, and it is
    // neither refused nor quoted anywhere.
    let warden = Process::replica_with_env(
        &config,
        &db.url(),
        port,
        &[("WARDEN_SECRET_ORCHESTRATOR", "orch-token-123"), ("WARDEN_SECRET_API_KEY", "-orch-key-456")],
    );
    warden.ready(WAIT).await;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let beat = http
        .post(format!("{base}/v1/heartbeats"))
        .json(&json!({"agent_id": "env-1", "next_heartbeat_ms": 1000}))
        .send()
        .await
        .unwrap();
    assert_eq!(beat.status(), 200);
    // It goes silent: offline, then the orchestrator is called.
    let call =
        eventually(WAIT, "the orchestrator called", || async { orchestrator.requests().into_iter().next() }).await;
    assert_eq!(call.path, "/restart/env-1");
    assert_eq!(call.header("authorization"), Some("Bearer orch-token-123"));
    assert_eq!(call.header("x-api-key"), Some("-orch-key-456"));
    let recorded: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM warden.recovery_actions WHERE detail::text ~ 'orch-(token|key)' \
               OR coalesce(outcome, '') ~ 'orch-(token|key)'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 0);
}

/// A replica on `db` that recovers offline agents with `script` (run by
/// /bin/sh, within `timeout`) and stops within `shutdown_timeout`; auth
/// off and short intervals. Its settings live in `dir`; its port is given
/// back with it.
async fn command_replica(
    db: &crate::helpers::TestDb,
    dir: &Path,
    script: &str,
    timeout: &str,
    shutdown_timeout: &str,
) -> (Process, u16) {
    let config = dir.join("warden.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
shutdown_timeout = "{shutdown_timeout}"
[auth]
enabled = false
[health]
check_interval = "200ms"
[recovery]
poll_interval = "100ms"
[[recovery.strategies]]
name = "scripted"
issues = ["agent_unresponsive"]
[[recovery.strategies.actions]]
kind = "command"
argv = ["/bin/sh", "-c", {script:?}]
timeout = "{timeout}"
"#
        ),
    )
    .unwrap();
    let port = free_port();
    let replica = Process::replica(&config, &db.url(), port);
    replica.ready(WAIT).await;
    (replica, port)
}

/// SIGTERM, then waits for `replica` to exit.
async fn stop(replica: &mut Process) {
    replica.terminate();
    eventually(WAIT, "the replica to exit", || {
        let exited = !replica.running();
        async move { exited.then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_mid_recovery_records_the_action_at_once_and_leaves_no_process() {
    let db = crate::helpers::TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("warden-sigterm-{}", std::process::id());
    let script = format!("sleep 120; : {marker}");
    let (mut replica, _) = command_replica(&db, dir.path(), &script, "3m", "2s").await;
    let client = db.client().await;
    client.execute("SELECT warden.record_heartbeat('stopped', next_heartbeat_ms => 500)", &[]).await.unwrap();
    eventually(WAIT, "the recovery running", || async {
        let n: i64 = client
            .query_one("SELECT count(*) FROM warden.recovery_actions WHERE state = 'running'", &[])
            .await
            .ok()?
            .get(0);
        (n == 1).then_some(())
    })
    .await;

    stop(&mut replica).await;
    let row = client
        .query_one(
            "SELECT a.state, a.detail->>'interrupted', j.state, j.lease_owner IS NULL \
             FROM warden.recovery_actions a JOIN warden.recovery_jobs j ON j.id = a.job_id",
            &[],
        )
        .await
        .unwrap();
    let seen: (String, Option<String>, String, bool) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(seen, ("abandoned".into(), Some("true".into()), "verifying".into(), true));
    let left = crate::procs::processes_with(&[&marker]);
    assert!(left.is_empty(), "no command outlives warden: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_replica_starts_no_recovery_while_requests_drain() {
    let db = crate::helpers::TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut replica, port) = command_replica(&db, dir.path(), ": a quick restart", "10s", "8s").await;
    // A request whose body never finishes keeps the drain going for the
    // whole shutdown_timeout.
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let head = format!(
        "POST /v1/heartbeats HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n\
         content-length: 100\r\n\r\n{{"
    );
    tokio::io::AsyncWriteExt::write_all(&mut slow, head.as_bytes()).await.unwrap();
    let client = db.client().await;
    client.execute("SELECT warden.record_heartbeat('draining', next_heartbeat_ms => 300)", &[]).await.unwrap();
    let stopping = std::time::Instant::now();
    stop(&mut replica).await;
    // The half-sent request held the drain (shutdown_timeout is 8 s), or
    // this test proves nothing.
    assert!(stopping.elapsed() >= Duration::from_secs(4), "the drain ended at once: {:?}", stopping.elapsed());
    drop(slow);
    // The agent fell silent after the replica stopped deciding: had it
    // gone on, it would have opened the incident (offline within about a
    // second) and run the action during the drain.
    let (incidents, actions): (i64, i64) = client
        .query_one(
            "SELECT (SELECT count(*) FROM warden.incidents WHERE agent_id = 'draining'),                     (SELECT count(*) FROM warden.recovery_actions WHERE agent_id = 'draining')",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((incidents, actions), (0, 0), "a stopping replica opened incidents or started recoveries");
}

#[tokio::test]
async fn an_agent_whose_id_steps_along_a_path_gets_no_command_actions() {
    // Every command gets WARDEN_AGENT_ID, and `/srv/agents/{agent_id}`
    // with an agent named ".." would be /srv: the command must not run.
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let argv = vec!["/usr/bin/touch".into(), marker.display().to_string()];
    let strategies = vec![strategy(vec![command(argv, D::from_secs(5))])];
    let mut settings = crate::helpers::default_settings();
    fast(&mut settings, strategies.clone());
    let app = TestApp::spawn_with(move |s| fast(s, strategies)).await;
    let ingest = app.key(&[warden::auth::Scope::Ingest]).await;
    assert_eq!(app.heartbeat(&ingest, json!({"agent_id": ".."})).await.0, 200, "a valid agent id");
    // URLs cannot name it (clients resolve "..", encoded or not), so the
    // run is queued as `warden recovery run` queues it.
    warden::recovery::run_now(&mut app.db.client().await, &settings.recovery, "..", None).await.unwrap();
    let outcome = eventually(WAIT, "the action refused", || async {
        let row = app
            .db
            .client()
            .await
            .query_opt(
                "SELECT state, outcome FROM warden.recovery_actions WHERE agent_id = '..' AND state <> 'running' \
                 ORDER BY id LIMIT 1",
                &[],
            )
            .await
            .ok()??;
        Some((row.get::<_, String>(0), row.get::<_, Option<String>>(1)))
    })
    .await;
    assert_eq!(outcome.0, "failed", "{outcome:?}");
    assert!(outcome.1.as_deref().unwrap_or_default().contains("WARDEN_AGENT_ID"), "{outcome:?}");
    assert!(!marker.exists(), "the command never ran");
}
