//! `warden demo`: warden and a simulated fleet in one command, with a live
//! view in the terminal, so a newcomer sees the whole loop — heartbeats,
//! transitions, scores, incidents, an automatic restart, alerts — within
//! two minutes.
//!
//! The fleet (default 50 agents): steady ones; one jittery; one whose
//! latency climbs; one whose errors climb; one that crashes and is
//! restarted by a real recovery command (it is a real `warden agent`
//! process); and one that goes quiet for good.
//!
//! The demo's settings (no auth, fast evaluation, its own recovery
//! strategy) apply to the whole database it runs on, and other replicas
//! sharing a database would page about its agents, so it refuses a
//! configured database that already monitors agents of its own. On Ctrl-C
//! it removes its agents, so that `warden serve` on the same database (the
//! embedded cluster is shared) does not start with a fleet of ghosts.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::app::Application;
use crate::client::{Client, HeartbeatRequest};
use crate::config::{Action, Duration as D, Settings, Strategy};
use crate::health::incidents::IssueType;
use crate::model::{HeartbeatStatus, Mode};

/// Every demo agent's id starts so.
const DEMO_PREFIX: &str = "demo-";

/// How often demo agents say they will send.
const INTERVAL: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub agents: usize,
}

/// Settings that make the loop visible in a minute or two.
pub fn demo_settings(mut settings: Settings, exe: PathBuf, url: &str) -> Settings {
    settings.auth.enabled = false;
    settings.health.check_interval = D::from_secs(1);
    settings.health.score_interval = D::from_secs(5);
    settings.health.history_interval = D::from_secs(10);
    settings.health.extended_offline_after = D::from_secs(45);
    settings.alerting.group_wait = D::from_secs(3);
    settings.alerting.group_interval = D::from_secs(10);
    settings.alerting.hold_during_recovery = D::from_secs(20);
    settings.recovery.poll_interval = D::from_millis(500);
    settings.recovery.backoff_base = D::from_secs(2);
    settings.recovery.verify_timeout = Some(D::from_secs(20));
    settings.recovery.strategies = vec![Strategy {
        name: "restart_demo_agent".into(),
        issues: vec![IssueType::AgentUnresponsive],
        labels: [("restartable".to_string(), "yes".to_string())].into(),
        verify_timeout: None,
        actions: vec![Action::Command {
            name: Some("warden agent --detach".into()),
            argv: vec![
                exe.display().to_string(),
                "agent".into(),
                "--url".into(),
                url.into(),
                "--agent-id".into(),
                "{agent_id}".into(),
                "--label".into(),
                "restartable=yes".into(),
                "--interval".into(),
                format!("{}ms", INTERVAL.as_millis()),
                "--detach".into(),
            ],
            timeout: D::from_secs(10),
            attempts: 1,
        }],
    }];
    settings
}

/// Runs warden and the fleet until Ctrl-C.
pub async fn run(settings: Settings, options: DemoOptions, shutdown: CancellationToken) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let port = {
        let probe = std::net::TcpListener::bind(settings.server.listen).map_err(|e| {
            format!("cannot listen on {} ({e}); set WARDEN__SERVER__LISTEN to a free address", settings.server.listen)
        })?;
        probe.local_addr().map_err(|e| e.to_string())?.port()
    };
    let url = format!("http://127.0.0.1:{port}");
    // An empty database.url: warden runs its own cluster, stopped with it.
    let embedded = settings.database.url.expose().trim().is_empty();
    let mut settings = demo_settings(settings, exe.clone(), &url);
    settings.server.listen.set_port(port);
    let app = Application::build(settings).await.map_err(|e| e.to_string())?;
    let pool = app.pool();
    if !embedded {
        refuse_a_real_fleet(&pool).await?;
    }
    // warden stops after the demo has removed its agents, not on Ctrl-C.
    let stop_warden = CancellationToken::new();
    let warden = tokio::spawn(app.run(stop_warden.clone()));
    let client = Client::new(&url, None).map_err(|e| e.to_string())?;

    let fleet = CancellationToken::new();
    let mut tasks = Vec::new();
    let steady = options.agents.saturating_sub(5).max(1);
    for i in 0..steady {
        tasks.push(tokio::spawn(simulate(
            client.clone(),
            Persona::Steady,
            format!("demo-steady-{i:02}"),
            fleet.clone(),
        )));
    }
    for (persona, id) in [
        (Persona::Jittery, "demo-jittery"),
        (Persona::Slowing, "demo-slowing"),
        (Persona::Erroring, "demo-erroring"),
        (Persona::Vanishing, "demo-vanishing"),
    ] {
        tasks.push(tokio::spawn(simulate(client.clone(), persona, id.to_string(), fleet.clone())));
    }
    // The crasher is a real process, so a real command can restart it.
    let mut crasher = spawn_agent(&exe, &url, "demo-crasher")?;
    let crash_at = tokio::time::Instant::now() + Duration::from_secs(25);
    let mut crashed = false;

    let started = std::time::Instant::now();
    let interactive = std::io::stdout().is_terminal();
    let mut ticks = tokio::time::interval(Duration::from_secs(2));
    println!("warden demo: {url} (Ctrl-C to stop). Agents report every {}s.", INTERVAL.as_secs());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        if !crashed && tokio::time::Instant::now() >= crash_at {
            let _ = crasher.kill().await;
            crashed = true;
        }
        match view(&url, started.elapsed(), embedded).await {
            Ok(text) => {
                let mut out = std::io::stdout().lock();
                if interactive {
                    let _ = write!(out, "\x1b[2J\x1b[H");
                }
                let _ = write!(out, "{text}");
                let _ = out.flush();
            }
            Err(e) => eprintln!("demo: {e}"),
        }
    }
    fleet.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let _ = crasher.kill().await;
    stop_detached_agents().await;
    let left = remove_demo_agents(&pool).await;
    stop_warden.cancel();
    let _ = warden.await;
    left
}

/// A database whose fleet is not the demo's: refused, naming an agent.
async fn refuse_a_real_fleet(pool: &deadpool_postgres::Pool) -> Result<(), String> {
    let client = crate::db::client(pool).await.map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "SELECT count(*), min(agent_id) FROM warden.agent_status WHERE agent_id NOT LIKE $1",
            &[&format!("{DEMO_PREFIX}%")],
        )
        .await
        .map_err(|e| e.to_string())?;
    let (others, example): (i64, Option<String>) = (row.get(0), row.get(1));
    match example {
        Some(example) => Err(format!(
            "the database at database.url monitors {others} agent(s) of its own (such as {example}); the demo \
             changes how warden evaluates, recovers and authenticates on the database it runs on, so run it on \
             an empty database, or with no database.url (a cluster of its own in database.data_dir)"
        )),
        None => Ok(()),
    }
}

/// Removes the demo's agents (their history stays, as for any removed
/// agent). One being recovered cannot be removed yet: it is named, with
/// the command that removes it later.
async fn remove_demo_agents(pool: &deadpool_postgres::Pool) -> Result<(), String> {
    let mut client = crate::db::client(pool).await.map_err(|e| format!("cannot remove the demo's agents: {e}"))?;
    let ids: Vec<String> = client
        .query("SELECT agent_id FROM warden.agent_status WHERE agent_id LIKE $1", &[&format!("{DEMO_PREFIX}%")])
        .await
        .map_err(|e| format!("cannot remove the demo's agents: {e}"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut kept = Vec::new();
    for id in ids {
        match crate::health::removal::remove(&mut client, &id, "warden demo", None).await {
            Ok(_) | Err(crate::health::removal::RemoveError::NotFound(_)) => {}
            Err(e) => kept.push(format!("{id} ({e})")),
        }
    }
    if kept.is_empty() {
        return Ok(());
    }
    Err(format!("could not remove {}; remove them with `warden agents remove ID`", kept.join(", ")))
}

fn spawn_agent(exe: &std::path::Path, url: &str, id: &str) -> Result<tokio::process::Child, String> {
    tokio::process::Command::new(exe)
        .args(["agent", "--url", url, "--agent-id", id, "--label", "restartable=yes"])
        .arg("--interval")
        .arg(format!("{}ms", INTERVAL.as_millis()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start a demo agent: {e}"))
}

/// Agents restarted by recovery outlive the demo's own handles; they are
/// found by their command line, and waited for (a few seconds at most) so
/// that no heartbeat of theirs registers an agent the demo then removed.
async fn stop_detached_agents() {
    let mut stopped = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return };
    let me = std::env::current_exe().ok();
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let ours = me.as_ref().is_some_and(|m| args.first().is_some_and(|a| std::path::Path::new(a) == m));
        if ours && args.iter().any(|a| a == "agent") && args.iter().any(|a| a.starts_with(DEMO_PREFIX)) {
            // SAFETY: kill(2) on a process we started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            stopped.push(pid);
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    // Detached agents are not our children (their parent exited), so they
    // are not left as zombies: their /proc entry goes when they exit.
    while stopped.iter().any(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Debug, Clone, Copy)]
enum Persona {
    Steady,
    Jittery,
    Slowing,
    Erroring,
    Vanishing,
}

/// A simulated agent: heartbeats with metrics, shaped by its persona.
async fn simulate(client: Client, persona: Persona, id: String, stop: CancellationToken) {
    let started = tokio::time::Instant::now();
    let mut beat: u64 = 0;
    let seed = id.bytes().fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
    // Spread the fleet over the interval.
    let offset = Duration::from_millis(seed % INTERVAL.as_millis() as u64);
    tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(offset) => {} }
    loop {
        beat += 1;
        let noise = ((seed.wrapping_mul(beat).wrapping_mul(2654435761) >> 16) % 1000) as f64 / 1000.0;
        let minutes = started.elapsed().as_secs_f64() / 60.0;
        let (latency, errors, cpu) = match persona {
            Persona::Slowing => (100.0 * (1.0 + minutes * 1.5), 0.0, 35.0 + noise * 5.0),
            Persona::Erroring => (110.0, (minutes * 4.0).floor(), 40.0 + noise * 5.0),
            _ => (90.0 + noise * 20.0, 0.0, 25.0 + noise * 15.0),
        };
        let heartbeat = HeartbeatRequest::new(&id)
            .mode(Mode::Active)
            .status(if errors > 2.0 { HeartbeatStatus::Degraded } else { HeartbeatStatus::Healthy })
            .uptime(started.elapsed().as_secs())
            .next_in(INTERVAL)
            .metric("latency_ms", latency)
            .metric("cpu_percent", cpu)
            .metric("memory_percent", 45.0 + noise * 10.0)
            .metric("tasks", 10.0)
            .metric("errors", errors)
            .label("persona", format!("{persona:?}").to_lowercase());
        let _ = client.heartbeat(&heartbeat).await;
        if matches!(persona, Persona::Vanishing) && started.elapsed() > Duration::from_secs(20) {
            return; // gone for good
        }
        let wait = match persona {
            // Sometimes early, sometimes most of an interval late.
            Persona::Jittery => INTERVAL.mul_f64(0.4 + noise * 1.0),
            _ => INTERVAL,
        };
        tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(wait) => {} }
    }
}

/// The live view: a compact summary from the read API and the database
/// views, like an operator would look at it.
async fn view(url: &str, elapsed: Duration, embedded: bool) -> Result<String, String> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().map_err(|e| e.to_string())?;
    let get = |path: &str| {
        let http = http.clone();
        let url = format!("{url}{path}");
        async move {
            http.get(url)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json::<serde_json::Value>()
                .await
                .map_err(|e| e.to_string())
        }
    };
    let fleet = get("/v1/fleet").await?;
    let incidents = get("/v1/incidents?limit=8").await?;
    let recoveries = get("/v1/recoveries?limit=5").await?;
    let alerts = get("/v1/alerts?limit=5").await.unwrap_or_default();
    let agents = get("/v1/agents?limit=1000").await?;

    let mut out = String::new();
    let count = |v: &serde_json::Value, k: &str| v.get(k).and_then(|n| n.as_i64()).unwrap_or(0);
    out.push_str(&format!(
        "warden demo — {}s — {url}   (GET /v1/fleet, /v1/agents, /v1/incidents ...)\n\n",
        elapsed.as_secs()
    ));
    let l = &fleet["liveness"];
    out.push_str(&format!(
        "agents {:>3}   online {:>3}   degraded {:>3}   offline {:>3}   unknown {:>3}   average score {}\n",
        fleet["total"],
        count(l, "online"),
        count(l, "degraded"),
        count(l, "offline"),
        count(l, "unknown"),
        fleet["average_score"]
    ));
    let t = &fleet["tier"];
    out.push_str(&format!(
        "tiers  excellent {}  good {}  fair {}  poor {}  critical {}\n\n",
        count(t, "excellent"),
        count(t, "good"),
        count(t, "fair"),
        count(t, "poor"),
        count(t, "critical")
    ));

    let mut rows = vec![["agent", "liveness", "score", "tier", "last seen"].map(String::from)];
    let mut notable: Vec<&serde_json::Value> = agents["agents"]
        .as_array()
        .map(|a| a.iter().filter(|a| !a["agent_id"].as_str().unwrap_or("").starts_with("demo-steady")).collect())
        .unwrap_or_default();
    notable.sort_by_key(|a| a["agent_id"].as_str().unwrap_or("").to_string());
    for a in notable {
        let ago = a["last_seen"]
            .as_str()
            .and_then(|s| s.parse::<chrono::DateTime<Utc>>().ok())
            .map(|t| format!("{}s ago", (Utc::now() - t).num_seconds()))
            .unwrap_or_default();
        rows.push([
            a["agent_id"].as_str().unwrap_or("").into(),
            a["liveness"].as_str().unwrap_or("").into(),
            a["score"].as_f64().map(|s| format!("{s:.0}")).unwrap_or_else(|| "-".into()),
            a["tier"].as_str().unwrap_or("-").into(),
            ago,
        ]);
    }
    out.push_str(&crate::text_table::render(&rows));
    out.push('\n');

    out.push_str("incidents (newest first)\n");
    for i in incidents["incidents"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  #{:<4} {:<9} {:<8} {}{}\n",
            i["id"],
            i["state"].as_str().unwrap_or(""),
            i["severity"].as_str().unwrap_or(""),
            i["summary"].as_str().unwrap_or(""),
            i["resolution"].as_str().map(|r| format!("  → {r}")).unwrap_or_default()
        ));
    }
    out.push_str("\nrecovery actions\n");
    for r in recoveries["recoveries"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {} {} attempt {}: {} {}\n",
            r["agent_id"].as_str().unwrap_or(""),
            r["action"].as_str().unwrap_or(""),
            r["attempt"],
            r["state"].as_str().unwrap_or(""),
            r["outcome"].as_str().unwrap_or("")
        ));
    }
    let alert_list = alerts.get("alerts").and_then(|a| a.as_array()).cloned().unwrap_or_default();
    out.push_str("\nalerts (sent to the log channel; configure Slack or email in [alerting])\n");
    for a in alert_list.iter().take(5) {
        out.push_str(&format!(
            "  #{:<4} {:<12} {:<9} {}\n",
            a["id"],
            a["state"].as_str().unwrap_or(""),
            a["severity"].as_str().unwrap_or(""),
            a["dedup_key"].as_str().unwrap_or("")
        ));
    }
    out.push_str(if embedded {
        "\nCtrl-C stops warden, the fleet and the embedded database.\n"
    } else {
        "\nCtrl-C stops warden and the fleet.\n"
    });
    Ok(out)
}
