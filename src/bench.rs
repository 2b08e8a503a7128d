//! `warden bench ingest`: the ingest benchmark with its baseline in one run.
//!
//! It starts `warden serve` as a child process twice on the configured
//! database — once with group commit, once with one transaction per
//! heartbeat — drives each with the same load over loopback, and prints
//! both with their ratio. Run it from a `--release` build on a scratch
//! database: it leaves its agents (`bench-gc-*`, `bench-naive-*`) behind.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::loadgen::{self, LoadReport, LoadSpec};

#[derive(Debug, Clone)]
pub struct IngestBench {
    pub agents: usize,
    pub connections: usize,
    pub batch: usize,
    pub metrics: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Skip the one-transaction-per-heartbeat phase.
    pub skip_naive: bool,
    /// Passed on to the child processes.
    pub config_file: Option<PathBuf>,
}

pub struct Phase {
    pub name: &'static str,
    pub report: LoadReport,
    /// Resident memory of the warden process at the end of the phase.
    pub rss_kib: Option<u64>,
}

/// Runs the phases; `key` must carry the ingest scope.
pub async fn ingest(bench: &IngestBench, key: &str) -> Result<Vec<Phase>, String> {
    let mut phases = Vec::new();
    let mut modes = vec![("group commit", true, "bench-gc")];
    if !bench.skip_naive {
        modes.push(("one tx per heartbeat", false, "bench-naive"));
    }
    for (name, group_commit, prefix) in modes {
        let (mut child, addr) = spawn_warden(bench.config_file.as_deref(), group_commit).await?;
        let spec = LoadSpec {
            addr,
            key: key.to_string(),
            agents: bench.agents,
            batch: bench.batch,
            metrics: bench.metrics,
            connections: bench.connections,
            rate: None,
            duration: bench.warmup,
            agent_prefix: prefix.to_string(),
        };
        let result = async {
            if !bench.warmup.is_zero() {
                loadgen::run(spec.clone()).await?;
            }
            let report = loadgen::run(LoadSpec { duration: bench.duration, ..spec }).await?;
            let rss_kib = child.id().and_then(rss_kib);
            Ok::<_, String>(Phase { name, report, rss_kib })
        }
        .await;
        stop(&mut child).await;
        phases.push(result?);
    }
    Ok(phases)
}

async fn spawn_warden(config: Option<&std::path::Path>, group_commit: bool) -> Result<(Child, SocketAddr), String> {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        probe.local_addr().map_err(|e| e.to_string())?.port()
    };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut command = Command::new(exe);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    command
        .arg("serve")
        .env("WARDEN__SERVER__LISTEN", addr.to_string())
        .env("WARDEN__INGEST__GROUP_COMMIT", group_commit.to_string())
        .env("WARDEN__TELEMETRY__LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| format!("cannot start warden serve: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("warden serve exited during start-up ({status})"));
        }
        if ready(addr).await {
            return Ok((child, addr));
        }
        if Instant::now() > deadline {
            return Err("warden serve did not become ready within 60s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn ready(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else { return false };
    let request = "GET /readyz HTTP/1.1\r\nhost: warden\r\nconnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.is_ok() && head.ends_with(b"200")
}

async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(30), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// Resident set size of a process, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The phases as an aligned table, with the ratio when both ran.
pub fn render(phases: &[Phase]) -> String {
    let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1000.0);
    let mut rows = vec![
        ["mode", "heartbeats/s", "requests/s", "p50 ms", "p99 ms", "max ms", "failed", "rss MiB"].map(String::from),
    ];
    for p in phases {
        let r = &p.report;
        rows.push([
            p.name.to_string(),
            format!("{:.0}", r.heartbeats_per_second()),
            format!("{:.0}", r.requests_per_second()),
            ms(r.p50),
            ms(r.p99),
            ms(r.max),
            r.heartbeats_failed.to_string(),
            p.rss_kib.map(|k| format!("{:.1}", k as f64 / 1024.0)).unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut out = crate::text_table::render(&rows);
    if let [gc, naive] = phases {
        let ratio = gc.report.heartbeats_per_second() / naive.report.heartbeats_per_second().max(1e-9);
        out.push_str(&format!("group commit / one tx per heartbeat: {ratio:.1}x\n"));
    }
    for p in phases {
        if !p.report.errors.is_empty() {
            out.push_str(&format!("{} errors: {:?}\n", p.name, p.report.errors));
        }
    }
    out
}
