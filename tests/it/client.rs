//! The typed client and the example agent against a real warden.

use std::time::Duration;

use warden::auth::Scope;
use warden::client::{Client, ClientError, HeartbeatRequest};
use warden::model::Mode;

use crate::alerting::receivers::{HttpReceiver, Reply};
use crate::helpers::{TestApp, eventually};
use crate::procs::{Process, example_agent, warden};

#[tokio::test]
async fn the_client_sends_heartbeats_and_reads_the_answer() {
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Ingest]).await;
    let client = Client::new(&app.url(""), Some(key)).unwrap();
    let heartbeat =
        HeartbeatRequest::new("rust-agent").mode(Mode::Idle).uptime(10).metric("cpu", 0.25).label("lang", "rust");
    let ack = client.heartbeat(&heartbeat).await.unwrap();
    assert!(ack.received && ack.is_new && !ack.restart_detected);
    assert_eq!(ack.next_heartbeat_ms, 30_000);
    let again = client.heartbeat(&HeartbeatRequest::new("rust-agent").uptime(1)).await.unwrap();
    assert!(again.restart_detected);
}

#[tokio::test]
async fn refusals_carry_the_field_and_outages_a_retry_hint() {
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Ingest]).await;
    let client = Client::new(&app.url(""), Some(key)).unwrap();
    match client.heartbeat(&HeartbeatRequest::new("bad id")).await {
        Err(ClientError::Rejected { status: 422, field, .. }) => assert_eq!(field.as_deref(), Some("agent_id")),
        other => panic!("expected a 422, got {other:?}"),
    }
    let anonymous = Client::new(&app.url(""), None).unwrap();
    assert!(matches!(
        anonymous.heartbeat(&HeartbeatRequest::new("a")).await,
        Err(ClientError::Rejected { status: 401, .. })
    ));

    app.db.drop_now().await;
    let err = client.heartbeat(&HeartbeatRequest::new("a")).await.unwrap_err();
    assert!(matches!(err, ClientError::Unavailable { .. }), "{err:?}");
    assert!(err.retry_after().is_some());
}

#[tokio::test]
async fn the_example_agent_heartbeats_on_its_interval() {
    let app = TestApp::spawn().await;
    let key = app.key(&[Scope::Ingest]).await;
    let status = tokio::process::Command::new(example_agent())
        .args(["--url", &app.url(""), "--agent-id", "example-1", "--interval-ms", "100", "--count", "3"])
        .env("WARDEN_KEY", &key)
        .stdout(std::process::Stdio::null())
        .status();
    let status = tokio::time::timeout(Duration::from_secs(60), status).await.expect("the agent finishes").unwrap();
    assert!(status.success());
    let count = eventually(Duration::from_secs(5), "three heartbeats", || async {
        let n = app
            .count("SELECT coalesce(max(heartbeat_count), 0) FROM warden.agent_status WHERE agent_id = 'example-1'")
            .await;
        (n == 3).then_some(n)
    })
    .await;
    assert_eq!(count, 3);
    assert_eq!(
        app.count("SELECT expected_interval_ms::bigint FROM warden.agent_status WHERE agent_id = 'example-1'").await,
        100
    );
    assert!(app.count("SELECT count(*) FROM warden.performance_metrics WHERE agent_id = 'example-1'").await >= 3);
}

#[tokio::test]
async fn warden_agent_rides_out_a_proxy_error_and_waits_as_long_as_asked() {
    let receiver = HttpReceiver::start().await;
    receiver.script(&[Reply::Status(502), Reply::RetryAfter(2), Reply::Status(500)]);
    let mut agent = Process::spawn(warden().args([
        "agent",
        "--url",
        &receiver.url(""),
        "--agent-id",
        "proxied",
        "--interval",
        "1h",
    ]));
    let requests = eventually(Duration::from_secs(60), "four heartbeats", || async {
        let requests = receiver.requests();
        (requests.len() >= 4).then_some(requests)
    })
    .await;
    let answered: Vec<u16> = requests.iter().map(|r| r.answered).collect();
    assert_eq!(answered[..4], [502, 429, 500, 200]);
    assert!(requests[2].at - requests[1].at >= Duration::from_secs(2), "Retry-After: 2 was honoured");
    assert!(requests[1].at - requests[0].at >= Duration::from_millis(500), "backoff, not a hot loop");
    assert!(agent.running(), "errors of the moment do not stop the agent");
}

#[tokio::test]
async fn warden_agent_goes_on_at_the_url_that_takes_heartbeats_and_stops_when_every_url_refuses() {
    // One URL behind a proxy that answers 404 for good, one warden that
    // takes heartbeats: the refusal is that URL's, not the agent's.
    let (wrong, right) = (HttpReceiver::start().await, HttpReceiver::start().await);
    wrong.refuse_containing("agent_id", 404);
    let mut agent = Process::spawn(warden().args([
        "agent",
        "--url",
        &wrong.url(""),
        "--url",
        &right.url(""),
        "--agent-id",
        "two-urls",
        "--interval",
        "200ms",
    ]));
    eventually(Duration::from_secs(60), "heartbeats taken at the other URL", || async {
        (right.accepted().len() >= 3).then_some(())
    })
    .await;
    assert!(agent.running(), "one URL's refusal does not stop the agent");
    assert_eq!(wrong.requests().len(), 1, "the refusing URL rests");

    // Every URL refuses: the agent stops, saying what each said.
    let other = HttpReceiver::start().await;
    other.refuse_containing("agent_id", 401);
    let urls = [wrong.url(""), other.url("")];
    let run = |detach: bool| {
        let urls = urls.clone();
        tokio::task::spawn_blocking(move || {
            let mut cmd = warden();
            cmd.args(["agent", "--url", &urls[0], "--url", &urls[1], "--agent-id", "all-refused"]);
            if detach {
                cmd.arg("--detach");
            }
            cmd.env_remove("WARDEN_KEY").output().unwrap()
        })
    };
    for detach in [false, true] {
        let out = tokio::time::timeout(Duration::from_secs(60), run(detach)).await.expect("it stops").unwrap();
        assert_eq!(out.status.code(), Some(1), "detach {detach}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&urls[0]) && stderr.contains("404"), "detach {detach}: {stderr}");
        assert!(stderr.contains(&urls[1]) && stderr.contains("--key or WARDEN_KEY"), "detach {detach}: {stderr}");
    }

    // Detaching tries the next URL after a refusal, and goes on there.
    let (wrong_url, right_url) = (wrong.url(""), right.url(""));
    let out = tokio::task::spawn_blocking(move || {
        warden()
            .args(["agent", "--url", &wrong_url, "--url", &right_url, "--agent-id", "detached-two", "--detach"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("the background process's id");
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(right.accepted().iter().any(|r| r.json()["agent_id"] == "detached-two"));
}
