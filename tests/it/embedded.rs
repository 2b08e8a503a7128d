//! The embedded cluster: first start initialises, later starts reuse, and
//! `warden serve` stops what it started. Each test has its own data
//! directory; none touches the machine's shared PostgreSQL.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use warden::db::embedded::{EmbeddedCluster, EmbeddedError};

/// A temporary directory the `postgres` user can enter (when tests run as
/// root, the cluster runs as that user).
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[tokio::test]
async fn first_start_initialises_and_later_starts_reuse_the_data() {
    let dir = scratch();
    let data = dir.path().join("pgdata");

    let cluster = EmbeddedCluster::start(&data, None).await.expect("first start");
    assert!(data.join("PG_VERSION").is_file());
    let client = crate::helpers::connect(&cluster.connect_config()).await;
    client.batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)").await.unwrap();
    drop(client);
    cluster.stop().await;
    assert!(!data.join("postmaster.pid").exists(), "stopped cluster leaves no pid file");

    let cluster = EmbeddedCluster::start(&data, None).await.expect("second start reuses the directory");
    let client = crate::helpers::connect(&cluster.connect_config()).await;
    let v: i32 = client.query_one("SELECT v FROM kept", &[]).await.unwrap().get(0);
    assert_eq!(v, 42, "data survives a restart");
    drop(client);
    cluster.stop().await;
}

#[tokio::test]
async fn a_running_cluster_is_adopted_and_left_running() {
    let dir = scratch();
    let data = dir.path().join("pgdata");
    let owner = EmbeddedCluster::start(&data, None).await.unwrap();
    let guest = EmbeddedCluster::start(&data, None).await.expect("adopts the running server");
    guest.stop().await;
    let client = crate::helpers::connect(&owner.connect_config()).await;
    client.query_one("SELECT 1", &[]).await.expect("the owner's server still runs");
    drop(client);
    owner.stop().await;
}

/// A warden that cannot listen starts no cluster: one started for it
/// would be left running, and every later start would adopt it as someone
/// else's and never stop it.
#[tokio::test]
async fn serve_that_cannot_listen_leaves_no_cluster_running() {
    let dir = scratch();
    let data = dir.path().join("pgdata");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut settings = crate::helpers::default_settings();
    settings.database.url = warden::config::Secret::new(String::new());
    settings.database.data_dir = data.clone();
    settings.server.listen = taken.local_addr().unwrap();
    let error = match warden::app::Application::build(settings).await {
        Ok(_) => panic!("listened on a port already taken"),
        Err(e) => e,
    };
    assert!(error.to_string().contains("could not listen"), "{error}");
    assert!(!data.join("postmaster.pid").exists(), "no cluster left running");
}

#[tokio::test]
async fn a_foreign_non_empty_directory_is_refused() {
    let dir = scratch();
    let data = dir.path().join("pgdata");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("notes.txt"), "mine").unwrap();
    let err = EmbeddedCluster::start(&data, None).await.unwrap_err();
    assert!(matches!(err, EmbeddedError::DataDir { .. }), "{err}");
    assert!(err.to_string().contains("not a PostgreSQL data directory"), "{err}");
    assert!(data.join("notes.txt").exists(), "nothing of the user's is touched");
}

#[tokio::test]
async fn a_data_directory_too_deep_for_its_socket_is_refused_before_anything_is_made() {
    let dir = scratch();
    let data = dir.path().join("d".repeat(120)).join("pgdata");
    let err = EmbeddedCluster::start(&data, None).await.unwrap_err();
    assert!(matches!(err, EmbeddedError::DataDir { .. }), "{err}");
    assert!(err.to_string().contains("a shorter path"), "{err}");
    assert!(!data.exists(), "no directory left behind");
    // A bad setting, found without starting anything: exit 2 naming it,
    // from `config` (the pre-flight check) and from any verb.
    for verb in [&["config"][..], &["keys", "list"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_warden"))
            .args(verb)
            .env_remove("WARDEN_CONFIG")
            .env("WARDEN__DATABASE__URL", "")
            .env("WARDEN__DATABASE__DATA_DIR", &data)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{verb:?}: {stderr}");
        assert!(stderr.contains("database.data_dir") && stderr.contains("WARDEN__DATABASE__DATA_DIR"), "{stderr}");
    }
    assert!(!data.exists(), "no directory left behind");
}

#[tokio::test]
async fn missing_server_binaries_say_how_to_install_them() {
    let dir = scratch();
    let err = EmbeddedCluster::start(&dir.path().join("pgdata"), Some(dir.path())).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("apt-get install postgresql") && text.contains("database.url"), "{text}");
    assert!(!text.contains('\n'), "one line: {text}");
}

/// `warden serve` as a child process with JSON logs on stderr.
struct Served {
    child: Child,
    addr: String,
    initialised: bool,
}

fn serve(data: &Path) -> Served {
    // The tests below speak HTTP without a TestApp, which would install it.
    warden::alerting::tls::install_crypto_provider();
    let mut child = Command::new(env!("CARGO_BIN_EXE_warden"))
        .arg("serve")
        .env_remove("WARDEN_CONFIG")
        .env_remove("RUST_LOG")
        .env("WARDEN__DATABASE__URL", "")
        .env("WARDEN__DATABASE__DATA_DIR", data)
        .env("WARDEN__SERVER__LISTEN", "127.0.0.1:0")
        .env("WARDEN__TELEMETRY__FORMAT", "json")
        .env("WARDEN__TELEMETRY__LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut initialised = false;
    let mut lines = stderr.lines();
    while let Some(Ok(line)) = lines.next() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        let message = event["message"].as_str().unwrap_or_default();
        if message.contains("initialised embedded") {
            initialised = true;
        }
        if message == "warden is serving" {
            let addr = event["addr"].as_str().unwrap().to_string();
            // Keep reading so the child never writes into a closed pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return Served { child, addr, initialised };
        }
    }
    panic!("warden serve exited before serving: {:?}", child.wait());
}

fn terminate(mut served: Served) -> std::process::ExitStatus {
    unsafe { libc::kill(served.child.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = served.child.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "warden did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn serve_without_a_url_runs_its_own_cluster_and_stops_it_on_sigterm() {
    let dir = scratch();
    let data = dir.path().join("pgdata");

    let served = serve(&data);
    assert!(served.initialised, "first start runs initdb");
    let ready = reqwest::get(format!("http://{}/readyz", served.addr)).await.unwrap();
    assert_eq!(ready.status(), 200);
    let status = terminate(served);
    assert!(status.success(), "SIGTERM is a clean exit: {status}");
    assert!(!data.join("postmaster.pid").exists(), "the cluster was stopped");

    let served = serve(&data);
    assert!(!served.initialised, "second start reuses the cluster");
    let ready = reqwest::get(format!("http://{}/readyz", served.addr)).await.unwrap();
    assert_eq!(ready.status(), 200);
    assert!(terminate(served).success());
}

#[tokio::test]
async fn serve_starts_its_own_cluster_again_when_it_dies() {
    let dir = scratch();
    let data = dir.path().join("pgdata");
    let served = serve(&data);
    let ready = |addr: String| async move {
        reqwest::get(format!("http://{addr}/readyz")).await.map(|r| r.status().as_u16()).unwrap_or(0)
    };
    assert_eq!(ready(served.addr.clone()).await, 200);
    let pid: i32 =
        std::fs::read_to_string(data.join("postmaster.pid")).unwrap().lines().next().unwrap().parse().unwrap();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    crate::helpers::eventually(Duration::from_secs(30), "the database gone", || {
        let addr = served.addr.clone();
        async move { (ready(addr).await == 503).then_some(()) }
    })
    .await;
    crate::helpers::eventually(Duration::from_secs(120), "the cluster started again and ready", || {
        let addr = served.addr.clone();
        async move { (ready(addr).await == 200).then_some(()) }
    })
    .await;
    let again: i32 =
        std::fs::read_to_string(data.join("postmaster.pid")).unwrap().lines().next().unwrap().parse().unwrap();
    assert_ne!(again, pid);
    assert!(terminate(served).success());
}

#[tokio::test]
async fn a_verb_that_finds_an_empty_private_cluster_says_which_one_it_set_up() {
    // `warden keys create` run in another directory than `warden serve`
    // gets a cluster of its own, and its key would be unknown to the
    // service: the command says where it is working.
    let dir = scratch();
    let data = dir.path().join("pgdata");
    let keys = |data: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_warden"))
                .args(["keys", "list"])
                .env_remove("WARDEN_CONFIG")
                .env("WARDEN__DATABASE__URL", "")
                .env("WARDEN__DATABASE__DATA_DIR", &data)
                .output()
                .unwrap()
        })
    };
    let first = keys(data.clone()).await.unwrap();
    assert!(first.status.success(), "{first:?}");
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(stderr.contains(&data.display().to_string()) && stderr.contains("database.data_dir"), "{stderr}");
    let again = keys(data.clone()).await.unwrap();
    assert!(again.status.success(), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).is_empty(), "{again:?}");
    // The verb started the cluster and stopped it again.
    assert!(!data.join("postmaster.pid").exists());
}
