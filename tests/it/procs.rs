//! Real child processes for the tests: warden replicas, the example agent,
//! and the ports they listen on.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The example agent, built by `cargo test` next to the test binaries.
pub fn example_agent() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(|deps| deps.parent()).unwrap().join("examples").join("agent")
}

/// A free loopback port, for a process whose URL must be known before it
/// starts. Taken from 20000-29999, below the kernel's ephemeral range
/// (32768 and up here): a port that port 0 handed out and that was let go
/// could be handed out again, to another test's listener or client,
/// before the process came to bind it. Ports here go out in turn from a
/// random start, so tests running side by side do not pick the same one,
/// and one found taken is skipped.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::collections::hash_map::RandomState::new().build_hasher().finish() as u32 % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}-{}", FIRST + SPAN - 1)
}

/// The warden binary with none of the developer's own `WARDEN*` settings.
pub fn warden() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_warden"));
    for (key, _) in std::env::vars() {
        if key.starts_with("WARDEN") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// A child process killed (SIGKILL) and reaped when dropped, so a failing
/// test leaves nothing running.
pub struct Process {
    child: Child,
    /// The port it serves on, when it is a warden replica.
    pub port: u16,
}

impl Process {
    /// Starts `cmd` with its output discarded.
    pub fn spawn(cmd: &mut Command) -> Self {
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        Self { child, port: 0 }
    }

    /// `warden serve` with a settings file on the given database and port.
    pub fn replica(config: &Path, db_url: &str, port: u16) -> Self {
        Self::replica_with_env(config, db_url, port, &[])
    }

    /// [`Process::replica`] with more environment variables.
    pub fn replica_with_env(config: &Path, db_url: &str, port: u16, env: &[(&str, &str)]) -> Self {
        let mut cmd = warden();
        cmd.arg("--config")
            .arg(config)
            .arg("serve")
            .env("WARDEN__DATABASE__URL", db_url)
            .env("WARDEN__SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("WARDEN__TELEMETRY__LEVEL", "warn")
            .envs(env.iter().copied());
        let mut process = Self::spawn(&mut cmd);
        process.port = port;
        process
    }

    /// Waits, up to `deadline`, until this replica answers /readyz with 200.
    pub async fn ready(&self, deadline: std::time::Duration) {
        warden::alerting::tls::install_crypto_provider();
        let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(5)).build().unwrap();
        let url = format!("http://127.0.0.1:{}/readyz", self.port);
        crate::helpers::eventually(deadline, "a replica to be ready", || async {
            (http.get(&url).send().await.ok()?.status() == 200).then_some(())
        })
        .await;
    }

    /// The example agent, heartbeating every `every_ms` against a declared
    /// `interval_ms`, to every URL in turn when one fails.
    pub fn agent(urls: &[&str], agent_id: &str, interval_ms: u64, every_ms: u64) -> Self {
        let mut cmd = Command::new(example_agent());
        for url in urls {
            cmd.args(["--url", url]);
        }
        cmd.args(["--agent-id", agent_id])
            .args(["--interval-ms", &interval_ms.to_string(), "--every-ms", &every_ms.to_string()])
            .env_remove("WARDEN_KEY");
        Self::spawn(&mut cmd)
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Asks it to stop, as systemd or Kubernetes would (SIGTERM).
    pub fn terminate(&self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Processes whose command line holds every one of the marks.
pub fn processes_with(marks: &[&str]) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline);
            marks.iter().all(|m| cmdline.contains(m)).then_some(pid)
        })
        .collect()
}
