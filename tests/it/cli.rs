//! The binary as an operator meets it: exit codes, one-line errors, output.

use crate::procs::{processes_with, warden};

#[test]
fn a_bad_setting_exits_2_with_one_line_naming_the_key() {
    let out = warden().arg("config").env("WARDEN__DATABASE__POOL_SIZE", "banana").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("database.pool_size") && stderr.contains("banana"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn config_refuses_database_settings_serve_would_refuse() {
    // `warden config` is the pre-flight check the operations guide gives.
    let cases: [&[(&str, &str)]; 3] = [
        &[("WARDEN__DATABASE__URL", "postgres://warden:hunter2@db:notaport/warden")],
        &[("WARDEN__DATABASE__URL", "postgres://db/warden?sslmode=disable"), ("WARDEN__DATABASE__TLS_VERIFY", "full")],
        &[
            ("WARDEN__DATABASE__URL", "postgres://db/warden"),
            ("WARDEN__DATABASE__TLS_VERIFY", "full"),
            ("WARDEN__DATABASE__TLS_CA_FILE", "/nonexistent/ca.pem"),
        ],
    ];
    for env in cases {
        let out = warden().arg("config").envs(env.iter().copied()).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{env:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("database."), "{env:?}: {stderr}");
        assert!(stderr.contains("(from WARDEN__DATABASE__"), "where the value came from: {stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn a_bad_setting_stops_serve_before_it_starts() {
    let out = warden().arg("serve").env("WARDEN__SERVER__LISTEN", "nope").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.listen"));
}

#[test]
fn config_prints_effective_settings_with_secrets_redacted() {
    let out = warden()
        .arg("config")
        .env("WARDEN__DATABASE__URL", "postgres://warden:hunter2@db/warden")
        .env("WARDEN__DATABASE__POOL_SIZE", "9")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("pool_size = 9"), "{stdout}");
    assert!(!stdout.contains("hunter2"), "{stdout}");
    // Where the redacted URL points, for checking it, without the password.
    assert!(stdout.starts_with("# database.url: user warden at db:5432/warden\n"), "{stdout}");
    // A password with an unescaped @ ends up partly in the parsed host:
    // the host is hidden then.
    let out =
        warden().arg("config").env("WARDEN__DATABASE__URL", "postgres://warden:hunt@r2@db/warden").output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success() && !stdout.contains("r2") && stdout.contains("host hidden"), "{stdout}");
    let parsed: toml::Table = toml::from_str(&stdout).expect("output is TOML");
    assert!(parsed.contains_key("server"));
}

#[test]
fn the_config_flag_reads_an_override_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.toml");
    std::fs::write(&path, "[server]\nlisten = \"0.0.0.0:7777\"\n").unwrap();
    let out = warden().arg("--config").arg(&path).arg("config").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("0.0.0.0:7777"));

    let out = warden().env("WARDEN_CONFIG", &path).arg("config").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("0.0.0.0:7777"), "WARDEN_CONFIG works too");

    // An empty stand-in (not a regular file) is the defaults.
    let out = warden().args(["--config", "/dev/null", "config"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("listen = \"127.0.0.1:8080\""), "{out:?}");
    let fifo = dir.path().join("pipe");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    for (path, says) in [
        (dir.path().join("missing.toml"), "does not exist"),
        (dir.path().to_path_buf(), "a directory, not a settings file"),
        (fifo, "not a regular file or a device"),
        (std::path::PathBuf::from("/dev/zero"), "a device that gave more than"),
    ] {
        let out = warden().arg("--config").arg(&path).arg("config").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(says) && stderr.contains(&*path.to_string_lossy()), "{stderr}");
    }
}

#[test]
fn an_unknown_verb_is_a_usage_error() {
    let out = warden().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    // A rate of nothing would report one request's speed as the rate.
    for rate in ["0", "-5", "NaN"] {
        // A server's setting that is bad does not concern the load generator.
        let out = warden()
            .args(["simulate", &format!("--rate={rate}"), "--duration", "1s"])
            .env("WARDEN__HEALTH__CHECK_INTERVAL", "soon")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "--rate {rate}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--rate must be a positive number"), "{out:?}");
    }
    let out = warden().args(["simulate", "--agents", "5", "--batch", "10", "--duration", "1s"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--agents (5) must be at least --batch (10)"), "{out:?}");
}

#[tokio::test]
async fn the_demo_shows_a_live_fleet_and_stops_cleanly_on_ctrl_c() {
    use std::io::{BufRead, BufReader};
    let db = crate::helpers::TestDb::migrated().await;
    let port = crate::procs::free_port();
    // Its warnings, kept to say why, should it not exit cleanly.
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = warden()
        .args(["demo", "--agents", "8"])
        .env("WARDEN__DATABASE__URL", db.url())
        .env("WARDEN__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::piped())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut saw_online = false;
    while std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(500)) {
            // "agents   8   online   8 ..." once everyone has reported.
            if line.starts_with("agents") && line.contains("online") && !line.contains("online   0") {
                saw_online = true;
                break;
            }
        }
    }
    assert!(saw_online, "the live view shows agents online");
    // On a database of its own it stops no embedded cluster, and says none.
    // Further down the same view: read on until it comes (the reader
    // thread may be some lines behind the demo).
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut footer = None;
    while footer.is_none() && std::time::Instant::now() < until {
        footer = rx.recv_timeout(std::time::Duration::from_millis(500)).ok().filter(|l| l.starts_with("Ctrl-C"));
    }
    assert_eq!(footer.as_deref(), Some("Ctrl-C stops warden and the fleet."));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "Ctrl-C is a clean exit: {status}; its stderr:\n{}",
        std::fs::read_to_string(log.path()).unwrap_or_default()
    );
    // The demo signals its agents as it exits; they take a moment to go.
    let address = format!("127.0.0.1:{port}");
    let leftovers = || processes_with(&[&address]).len();
    crate::helpers::eventually(std::time::Duration::from_secs(20), "no demo agent to outlive the demo", || async {
        (leftovers() == 0).then_some(())
    })
    .await;
    // Its agents are removed, their history kept.
    let client = db.client().await;
    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(count("SELECT count(*) FROM warden.agent_status").await, 0);
    assert!(count("SELECT count(*) FROM warden.agent_heartbeats WHERE agent_id LIKE 'demo-%'").await > 0);
    let removed = count("SELECT count(*) FROM warden.system_events WHERE event_type = 'agent_removed'").await;
    assert!(removed > 0, "{removed} removed");
}

#[test]
fn an_unreachable_database_is_named_without_its_password() {
    let port = crate::procs::free_port();
    let out = warden()
        .args(["keys", "list"])
        .env("WARDEN__DATABASE__URL", format!("postgres://bob:hunter2@127.0.0.1:{port}/fleet"))
        .env("WARDEN__DATABASE__CONNECT_TIMEOUT", "2s")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("(database.url: 127.0.0.1:{port}/fleet)")), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[tokio::test]
async fn the_demo_refuses_a_database_that_monitors_a_fleet_of_its_own() {
    let db = crate::helpers::TestDb::migrated().await;
    db.client()
        .await
        .batch_execute("SELECT warden.record_heartbeat('web-1', 'active', 'healthy', 5, NULL, NULL)")
        .await
        .unwrap();
    let out = warden()
        .args(["demo", "--agents", "6"])
        .env("WARDEN__DATABASE__URL", db.url())
        .env("WARDEN__SERVER__LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("monitors 1 agent(s) of its own (such as web-1)"), "{stderr}");
    let client = db.client().await;
    let agents = client.query_one("SELECT count(*) FROM warden.agent_status", &[]).await.unwrap().get::<_, i64>(0);
    assert_eq!(agents, 1, "nothing written: no demo agent registered");
}

#[test]
fn the_agent_refuses_a_bad_command_line_before_sending_anything() {
    for (args, flag) in [
        (&["--agent-id", "bad id"][..], "--agent-id"),
        (&["--agent-id", "a", "--url", "not-a-url"], "--url"),
        (&["--agent-id", "a", "--interval", "50ms"], "--interval"),
        (&["--agent-id", "a", "--interval", "8d"], "--interval"),
    ] {
        let out = warden().arg("agent").args(args).args(["--key", "k"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(flag), "{args:?}: {out:?}");
    }
    // A bad server setting in the environment is passed over, saying so; a
    // bad logging one is not.
    let run = |var: &str, value: &str| {
        warden()
            .args(["agent", "--agent-id", "a", "--url", "not-a-url", "--key", "k"])
            .env(var, value)
            .output()
            .unwrap()
    };
    let out = run("WARDEN__HEALTH__CHECK_INTERVAL", "soon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr.contains("health.check_interval") && stderr.contains("does not use it"), "{stderr}");
    assert!(stderr.contains("--url"), "its own check still runs: {stderr}");
    let out = run("WARDEN_CONFIG", "/nowhere/warden.toml");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not use it") && stderr.contains("--url"),
        "a server's file passed over too: {stderr}"
    );
    let out = run("WARDEN__TELEMETRY__FORMAT", "fancy");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr.contains("telemetry.format") && !stderr.contains("--url"), "{stderr}");
}

#[test]
fn a_detached_agent_with_a_bad_url_fails_where_it_was_started() {
    // The detached child's output goes nowhere: the command given the URL
    // must say it is wrong, and not start anything.
    let out = warden().args(["agent", "--agent-id", "a1", "--url", "127.0.0.1:8080", "--detach"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "bad usage: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--url"), "{out:?}");
}

/// Kills, when dropped, the processes whose command line holds every mark:
/// a detached agent outlives the command that started it, and must not
/// outlive a failing test.
struct KillOnDrop(Vec<String>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let marks: Vec<&str> = self.0.iter().map(String::as_str).collect();
        for pid in processes_with(&marks) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[tokio::test]
async fn a_detached_agent_reports_a_refused_key_where_it_was_started() {
    let app = crate::helpers::TestApp::spawn().await;
    let key = app.key(&[warden::auth::Scope::Ingest]).await;
    let url = app.url("");
    let detach = |agent_id: &str, key: &str| {
        let (url, agent_id, key) = (url.clone(), agent_id.to_string(), key.to_string());
        tokio::task::spawn_blocking(move || {
            warden()
                .args(["agent", "--url", &url, "--agent-id", &agent_id, "--interval", "2s", "--detach"])
                .env("WARDEN_KEY", key)
                .output()
                .unwrap()
        })
    };

    let _refused_guard = KillOnDrop(vec!["detach-refused".into(), url.clone()]);
    let refused = detach("detach-refused", "wk_not_a_key").await.unwrap();
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("401") && stderr.contains("--key or WARDEN_KEY"), "{refused:?}");
    assert!(processes_with(&["detach-refused", &url]).is_empty(), "nothing left running");
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status").await, 0);

    let _taken_guard = KillOnDrop(vec!["detach-taken".into(), url.clone()]);
    let taken = detach("detach-taken", &key).await.unwrap();
    assert!(taken.status.success(), "{taken:?}");
    // It says which process goes on, so that a wrapper can stop it.
    let printed: i32 = String::from_utf8_lossy(&taken.stdout).trim().parse().expect("the background process's id");
    assert_eq!(processes_with(&["detach-taken", &url]), [printed]);
    // Answered only once the first heartbeat was committed.
    let count = || app.count("SELECT count(*) FROM warden.agent_heartbeats WHERE agent_id = 'detach-taken'");
    assert!(count().await >= 1);
    crate::helpers::eventually(std::time::Duration::from_secs(60), "the background agent to keep sending", || async {
        (count().await >= 2).then_some(())
    })
    .await;
    // Its own first heartbeat came an interval after the command's, not at
    // once (a gap of milliseconds would skew its inter-arrival figures).
    let gap: f64 = app
        .db
        .client()
        .await
        .query_one(
            "SELECT extract(epoch FROM (array_agg(received_at ORDER BY received_at))[2] - min(received_at))::float8 \
             FROM warden.agent_heartbeats WHERE agent_id = 'detach-taken'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(gap >= 1.9, "second heartbeat {gap} s after the first");

    // A key given on the command line reaches the background process in
    // its environment: its command line, which any user can read, has none.
    let _argv_guard = KillOnDrop(vec!["detach-argv".into(), url.clone()]);
    let (u, k) = (url.clone(), key.clone());
    let given = tokio::task::spawn_blocking(move || {
        warden()
            .args(["agent", "--url", &u, "--agent-id", "detach-argv", "--interval", "2s", "--key", &k, "--detach"])
            .env_remove("WARDEN_KEY")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(given.status.success(), "{given:?}");
    let running = processes_with(&["detach-argv", &url]);
    assert_eq!(running.len(), 1, "the background agent runs");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", running[0])).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(!cmdline.contains(&key), "the key is not on its command line");
    // It goes on where the command stopped: the same uptime, the URL that
    // took the first heartbeat.
    assert!(cmdline.contains("--started-at-ms=") && cmdline.contains("--first-url=0"), "{cmdline}");
    let beats = || app.count("SELECT count(*) FROM warden.agent_heartbeats WHERE agent_id = 'detach-argv'");
    crate::helpers::eventually(std::time::Duration::from_secs(60), "it to keep sending with the key", || async {
        (beats().await >= 2).then_some(())
    })
    .await;

    // A wrapper started anew by each run of a job sends no uptime: its
    // own, 0 at every run, would read as restarts.
    let _plain_guard = KillOnDrop(vec!["no-uptime".into(), url.clone()]);
    let (u, k) = (url.clone(), key.clone());
    let plain = tokio::task::spawn_blocking(move || {
        warden()
            .args(["agent", "--url", &u, "--agent-id", "no-uptime", "--interval", "2s", "--no-uptime", "--detach"])
            .env("WARDEN_KEY", k)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(plain.status.success(), "{plain:?}");
    let counts = app
        .count("SELECT count(*) FILTER (WHERE uptime_seconds IS NOT NULL) * 1000 + count(*) FROM warden.agent_heartbeats WHERE agent_id = 'no-uptime'")
        .await;
    assert_eq!(counts, 1, "one heartbeat, without uptime");
}

#[tokio::test]
async fn recovery_run_refuses_when_nothing_would_run_it() {
    let db = crate::helpers::TestDb::migrated().await;
    db.client().await.execute("SELECT warden.record_heartbeat('r1')", &[]).await.unwrap();
    let run = |env: &[(&str, &str)], args: &[&str]| {
        warden()
            .args(["recovery", "run", "r1"])
            .args(args)
            .env("WARDEN__DATABASE__URL", db.url())
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    // The engine does not run with recovery off: a queued job would wait
    // unseen and restart the agent whenever it was switched on again.
    let off = run(&[("WARDEN__RECOVERY__ENABLED", "false")], &[]);
    assert_eq!(off.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&off.stderr).contains("recovery is disabled"), "{off:?}");
    // A strategy that is not there is bad usage.
    let unknown = run(&[], &["--strategy", "nosuch"]);
    assert_eq!(unknown.status.code(), Some(2), "{unknown:?}");
    // With none configured, that is what is said.
    let none = run(&[], &[]);
    assert_eq!(none.status.code(), Some(1), "{none:?}");
    assert!(String::from_utf8_lossy(&none.stderr).contains("no recovery strategies are configured"), "{none:?}");
    let jobs: i64 = db.client().await.query_one("SELECT count(*) FROM warden.recovery_jobs", &[]).await.unwrap().get(0);
    assert_eq!(jobs, 0);
    // Resetting an agent warden does not know is an error, not "nothing to reset".
    let reset = warden().args(["recovery", "reset", "nosuch"]).env("WARDEN__DATABASE__URL", db.url()).output().unwrap();
    assert_eq!(reset.status.code(), Some(1), "{reset:?}");
    assert!(String::from_utf8_lossy(&reset.stderr).contains("no agent nosuch"), "{reset:?}");
}

/// A reader that stops early (`| head`) ends the verb quietly, as it does
/// any Unix tool: no panic, no backtrace.
#[test]
fn a_closed_pipe_ends_a_printing_verb_without_a_panic() {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = warden()
        .args(["report", "--list"])
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before anything is read: the first write meets no reader.
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert!(status.success() || status.signal() == Some(libc::SIGPIPE), "{status:?}: {stderr}");
}

/// With recovery switched off, a job it left waiting can still be ended,
/// and the agent then removed.
#[tokio::test]
async fn recovery_cancel_works_with_recovery_switched_off() {
    let db = crate::helpers::TestDb::migrated().await;
    let c = db.client().await;
    c.execute("SELECT warden.record_heartbeat('r1')", &[]).await.unwrap();
    c.execute(
        "WITH i AS (INSERT INTO warden.incidents (agent_id, issue_type, severity) \
                    VALUES ('r1', 'agent_unresponsive', 'critical') RETURNING id) \
         INSERT INTO warden.recovery_jobs (incident_id, agent_id, strategy, state, verify_until) \
         SELECT id, 'r1', 'fix', 'verifying', now() FROM i",
        &[],
    )
    .await
    .unwrap();
    let run = |args: &[&str]| {
        warden()
            .args(args)
            .env("WARDEN__DATABASE__URL", db.url())
            .env("WARDEN__RECOVERY__ENABLED", "false")
            .output()
            .unwrap()
    };
    let refused = run(&["agents", "remove", "r1"]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("warden recovery cancel r1"), "{refused:?}");
    let cancel = run(&["recovery", "cancel", "r1", "--by", "carol"]);
    assert!(cancel.status.success(), "{cancel:?}");
    assert!(String::from_utf8_lossy(&cancel.stdout).contains("r1: 1 recovery job cancelled"), "{cancel:?}");
    let state: String = c.query_one("SELECT state FROM warden.recovery_jobs", &[]).await.unwrap().get(0);
    assert_eq!(state, "cancelled");
    let removed = run(&["agents", "remove", "r1"]);
    assert!(removed.status.success(), "{removed:?}");
    let again = run(&["recovery", "cancel", "r1"]);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("no agent r1"), "{again:?}");
}

#[tokio::test]
async fn database_verbs_read_a_current_schema_on_a_read_only_database() {
    let db = crate::helpers::TestDb::migrated().await;
    let admin = crate::helpers::admin_client().await;
    admin.batch_execute(&format!("ALTER DATABASE {} SET default_transaction_read_only = on", db.name)).await.unwrap();
    let out = warden().args(["keys", "list"]).env("WARDEN__DATABASE__URL", db.url()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A database migrated by another build whose migration of the same version
/// differs is refused by `warden migrate`; the verbs that leave a current
/// schema alone refuse it too, instead of working on tables they may not
/// understand.
#[tokio::test]
async fn database_verbs_refuse_a_schema_migrated_by_a_different_build() {
    let db = crate::helpers::TestDb::migrated().await;
    let out = warden().args(["keys", "list"]).env("WARDEN__DATABASE__URL", db.url()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let client = db.client().await;
    client.batch_execute("UPDATE warden.refinery_schema_history SET checksum = '1' WHERE version = 3").await.unwrap();
    let out = warden().args(["keys", "list"]).env("WARDEN__DATABASE__URL", db.url()).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("V3__health") && stderr.contains("different build"), "{stderr}");
    let out = warden().arg("migrate").env("WARDEN__DATABASE__URL", db.url()).output().unwrap();
    assert!(!out.status.success(), "migrate refuses it as well");
    // So does a replica that leaves migrations to others.
    let out = warden()
        .arg("serve")
        .env("WARDEN__DATABASE__URL", db.url())
        .env("WARDEN__DATABASE__MIGRATE_ON_START", "false")
        .env("WARDEN__SERVER__LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("V3__health") && stderr.contains("different build"), "{stderr}");
}

#[tokio::test]
async fn database_verbs_migrate_an_empty_database_only_when_allowed() {
    let db = crate::helpers::TestDb::empty().await;
    let out = warden()
        .args(["keys", "list"])
        .env("WARDEN__DATABASE__URL", db.url())
        .env("WARDEN__DATABASE__MIGRATE_ON_START", "false")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("run `warden migrate`"), "{stderr}");
    let client = db.client().await;
    let schema: bool = client.query_one("SELECT to_regnamespace('warden') IS NOT NULL", &[]).await.unwrap().get(0);
    assert!(!schema, "nothing was created");
    let out = warden().args(["keys", "list"]).env("WARDEN__DATABASE__URL", db.url()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_unreachable_database_is_named_with_the_cause() {
    let db_url = "host=127.0.0.1 port=5432 user=postgres dbname=warden_no_such_database";
    let out = warden().args(["keys", "list"]).env("WARDEN__DATABASE__URL", db_url).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("warden_no_such_database\" does not exist"), "{stderr}");
}

/// The log lines `warden serve` writes until it says it is serving.
async fn start_up_log(listen: &str, env: &[(&str, &str)]) -> Vec<String> {
    use std::io::BufRead;
    let db = crate::helpers::TestDb::migrated().await;
    let mut child = warden()
        .arg("serve")
        .env("WARDEN__DATABASE__URL", db.url())
        .env("WARDEN__SERVER__LISTEN", listen)
        .env("WARDEN__TELEMETRY__FORMAT", "json")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    // Serving, or exiting (which ends the output): either ends the read.
    let reader = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for line in stderr.lines().map_while(Result::ok) {
            let serving = line.contains("warden is serving");
            lines.push(line);
            if serving {
                break;
            }
        }
        lines
    });
    let lines = tokio::time::timeout(std::time::Duration::from_secs(120), reader).await;
    // Killing it also ends a read still waiting (its output closes).
    let _ = child.kill();
    let _ = child.wait();
    lines.expect("warden serve said it was serving, or exited, within two minutes").unwrap()
}

#[tokio::test]
async fn serving_beyond_this_machine_without_secure_cookies_is_warned_about() {
    let wide = start_up_log("0.0.0.0:0", &[]).await;
    assert!(wide.last().is_some_and(|l| l.contains("warden is serving")), "{wide:#?}");
    assert!(wide.iter().any(|l| l.contains("console.secure_cookie = false")), "{wide:#?}");
    let local = start_up_log("127.0.0.1:0", &[]).await;
    assert!(local.last().is_some_and(|l| l.contains("warden is serving")), "{local:#?}");
    assert!(!local.iter().any(|l| l.contains("secure_cookie")), "{local:#?}");
}

#[tokio::test]
async fn settings_that_cannot_work_as_written_are_warned_about_at_start() {
    let short = start_up_log(
        "127.0.0.1:0",
        &[("WARDEN__RECOVERY__LEASE_MARGIN", "1s"), ("WARDEN__HEALTH__SCORE_INTERVAL", "5s")],
    )
    .await;
    assert!(short.last().is_some_and(|l| l.contains("warden is serving")), "{short:#?}");
    assert!(short.iter().any(|l| l.contains("recovery.lease_margin is shorter")), "{short:#?}");
    assert!(short.iter().any(|l| l.contains("health.score_interval is shorter")), "{short:#?}");
    let default = start_up_log("127.0.0.1:0", &[]).await;
    assert!(default.last().is_some_and(|l| l.contains("warden is serving")), "{default:#?}");
    assert!(!default.iter().any(|l| l.contains("lease_margin") || l.contains("score_interval")), "{default:#?}");
}

#[tokio::test]
async fn simulate_fails_when_warden_took_no_heartbeat() {
    let app = crate::helpers::TestApp::spawn().await;
    let key = app.key(&[warden::auth::Scope::Ingest]).await;
    let url = app.url("");
    let run = |key: &str| {
        let (url, key) = (url.clone(), key.to_string());
        tokio::task::spawn_blocking(move || {
            warden()
                .args(["simulate", "--url", &url, "--agents", "2", "--rate", "20"])
                .args(["--duration", "1s"])
                .env("WARDEN_KEY", key)
                .output()
                .unwrap()
        })
    };
    let refused = run("").await.unwrap();
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no heartbeat was taken"), "{refused:?}");
    let taken = run(&key).await.unwrap();
    assert!(taken.status.success(), "{taken:?}");
    // Two agents asked for, two simulated: over two of the 64 connections.
    assert!(String::from_utf8_lossy(&taken.stderr).contains("simulating 2 agents over 2 connections"), "{taken:?}");
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status").await, 2);
}

#[tokio::test]
async fn alerts_ack_goes_on_past_an_id_it_cannot_acknowledge() {
    let db = crate::helpers::TestDb::migrated().await;
    let client = db.client().await;
    let mut alerts = Vec::new();
    for agent in ["a1", "a2"] {
        let id: i64 = client
            .query_one(
                "WITH i AS (INSERT INTO warden.incidents (agent_id, issue_type, severity) \
                            VALUES ($1, 'agent_unresponsive', 'critical') RETURNING id) \
                 INSERT INTO warden.alerts (incident_id, dedup_key, severity) \
                 SELECT id, $1 || ':agent_unresponsive', 'critical' FROM i RETURNING id",
                &[&agent],
            )
            .await
            .unwrap()
            .get(0);
        alerts.push(id.to_string());
    }
    let out = warden()
        .args(["alerts", "ack", "999", &alerts[0], &alerts[1], "--by", "ops"])
        .env("WARDEN__DATABASE__URL", db.url())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("999"), "{out:?}");
    let acked: i64 = client
        .query_one("SELECT count(*) FROM warden.alerts WHERE state = 'acknowledged' AND acknowledged_by = 'ops'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(acked, 2, "the alerts after the bad id too");
}

#[tokio::test]
async fn on_call_commands_work_without_the_recovery_secrets_serve_needs() {
    let db = crate::helpers::TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("warden.toml");
    std::fs::write(
        &config,
        "[[recovery.strategies]]\nname = \"orch\"\nissues = [\"agent_unresponsive\"]\n\n\
         [[recovery.strategies.actions]]\nkind = \"http\"\nurl = \"http://orchestrator/restart\"\n\
         headers = { authorization = \"Bearer {env.WARDEN_SECRET_ORCH_UNSET_IN_TESTS}\" }\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        warden().arg("--config").arg(&config).args(args).env("WARDEN__DATABASE__URL", db.url()).output().unwrap()
    };
    for args in [&["alerts", "list"][..], &["silence", "list"], &["recovery", "list"]] {
        let out = run(args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // What would run the action refuses to start without it, naming it.
    for args in [&["config"][..], &["serve"]] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("WARDEN_SECRET_ORCH_UNSET_IN_TESTS"), "{out:?}");
    }
}
