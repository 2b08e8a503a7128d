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
            slow: None,
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
        // The benchmark measures ingest, not the per-key rate limit.
        .env("WARDEN__LIMITS__ENABLED", "false")
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

/// `warden bench evaluate`: one liveness cycle over a seeded fleet, steady
/// and with a tenth of the agents changing state, against a baseline that
/// asks the database about each agent separately.
pub mod evaluate {
    use std::time::{Duration, Instant};

    use chrono::{DateTime, Utc};

    use crate::db::DbError;
    use crate::health::evaluator::{self, EvalParams};
    use crate::health::liveness::{self, Presence};
    use crate::health::phi::ArrivalStats;
    use crate::model::Liveness;

    const PREFIX: &str = "bench-eval-";

    #[derive(Debug, Clone)]
    pub struct Row {
        pub agents: i64,
        pub scenario: &'static str,
        pub cycle: Duration,
        pub candidates: usize,
        pub transitions: usize,
        pub baseline: Option<Duration>,
    }

    /// Removes every trace of the bench's agents, dependants first.
    async fn clean(client: &tokio_postgres::Client) -> Result<(), DbError> {
        client
            .batch_execute(&format!(
                "DELETE FROM warden.alert_deliveries WHERE alert_id IN \
                   (SELECT id FROM warden.alerts WHERE dedup_key LIKE '{PREFIX}%'); \
                 DELETE FROM warden.alerts WHERE dedup_key LIKE '{PREFIX}%'; \
                 DELETE FROM warden.incidents WHERE agent_id LIKE '{PREFIX}%'; \
                 DELETE FROM warden.system_events WHERE agent_id LIKE '{PREFIX}%'; \
                 DELETE FROM warden.health_history WHERE agent_id LIKE '{PREFIX}%'; \
                 DELETE FROM warden.agent_status WHERE agent_id LIKE '{PREFIX}%'"
            ))
            .await?;
        Ok(())
    }

    /// Seeds `n` online agents heard from within their interval.
    async fn seed(client: &tokio_postgres::Client, n: i64) -> Result<(), DbError> {
        clean(client).await?;
        client
            .execute(
                "INSERT INTO warden.agent_status (agent_id, labels, mode, status, expected_interval_ms, first_seen, \
                   last_seen, heartbeat_count, liveness, liveness_since, ontime_streak, beats_decayed) \
                 SELECT $2 || g, '{}', 'active', 'healthy', 30000, now() - interval '1 hour', \
                        now() - (g % 20) * interval '1 second', 100, 'online', now() - interval '1 hour', 5, 100 \
                 FROM generate_series(1, $1::bigint) g",
                &[&n, &PREFIX],
            )
            .await?;
        client.batch_execute("ANALYZE warden.agent_status").await?;
        Ok(())
    }

    /// Puts every agent back online and fresh, then makes every tenth one
    /// silent for five minutes.
    async fn silence_a_tenth(client: &tokio_postgres::Client) -> Result<(), DbError> {
        client
            .execute(
                "UPDATE warden.agent_status SET liveness = 'online', \
                   last_seen = now() - CASE WHEN substr(agent_id, length($1) + 1)::bigint % 10 = 0 \
                                            THEN interval '5 minutes' \
                                            ELSE (substr(agent_id, length($1) + 1)::bigint % 20) * interval '1 second' END \
                 WHERE agent_id LIKE $1 || '%'",
                &[&PREFIX],
            )
            .await?;
        Ok(())
    }

    /// The per-agent-query evaluator warden does not use: list the ids, then
    /// one query per agent (and one update per change).
    async fn baseline(client: &tokio_postgres::Client, params: &EvalParams) -> Result<Duration, DbError> {
        let started = Instant::now();
        let now: DateTime<Utc> = client.query_one("SELECT now()", &[]).await?.get(0);
        let ids = client.query("SELECT agent_id FROM warden.agent_status", &[]).await?;
        let one = client
            .prepare(
                "SELECT liveness, liveness_since, last_seen, expected_interval_ms, ontime_streak, ia_count, \
                        ia_mean_ms, ia_var_ms2 FROM warden.agent_status WHERE agent_id = $1",
            )
            .await?;
        let update = client
            .prepare(
                "UPDATE warden.agent_status SET liveness = $2, liveness_since = $3, \
                        ontime_streak = CASE WHEN $2 = 'offline' THEN 0 ELSE ontime_streak END \
                 WHERE agent_id = $1",
            )
            .await?;
        for id in &ids {
            let agent: String = id.get(0);
            let r = client.query_one(&one, &[&agent]).await?;
            let Ok(liveness) = r.get::<_, String>(0).parse::<Liveness>() else { continue };
            let presence = Presence {
                liveness,
                liveness_since: r.get(1),
                last_seen: r.get(2),
                expected_interval_ms: i64::from(r.get::<_, i32>(3)),
                ontime_streak: r.get(4),
                arrivals: ArrivalStats { count: r.get::<_, i32>(5) as u32, mean_ms: r.get(6), variance_ms2: r.get(7) },
                refused_ms: 0,
                refused_at: None,
            };
            if let Some(t) = liveness::decide(&presence, now, None, &params.liveness) {
                client.execute(&update, &[&agent, &t.to.as_str(), &now]).await?;
            }
        }
        Ok(started.elapsed())
    }

    /// Runs the scenarios for each fleet size.
    pub async fn run(
        client: &mut tokio_postgres::Client,
        params: &EvalParams,
        sizes: &[i64],
        with_baseline: bool,
    ) -> Result<Vec<Row>, DbError> {
        let mut rows = Vec::new();
        for &n in sizes {
            seed(client, n).await?;
            // The first cycle of a quiet database starts a grace; run it, then
            // pretend it was long ago, as in a warden that has been running.
            evaluator::liveness_cycle(client, params, "bench", None).await?;
            client.execute("UPDATE warden.evaluator_state SET resumed_at = now() - interval '1 hour'", &[]).await?;
            let mut best: Option<(Duration, evaluator::CycleReport)> = None;
            for _ in 0..5 {
                let started = Instant::now();
                let report = evaluator::liveness_cycle(client, params, "bench", None).await?;
                let took = started.elapsed();
                if best.as_ref().is_none_or(|(d, _)| took < *d) {
                    best = Some((took, report));
                }
            }
            let (cycle, report) = best.expect("five cycles ran");
            let baseline_steady = if with_baseline { Some(baseline(client, params).await?) } else { None };
            rows.push(Row {
                agents: n,
                scenario: "steady",
                cycle,
                candidates: report.candidates,
                transitions: report.transitions.len(),
                baseline: baseline_steady,
            });

            // The baseline took time: everyone is fresh again, then a tenth is not.
            silence_a_tenth(client).await?;
            let started = Instant::now();
            let report = evaluator::liveness_cycle(client, params, "bench", None).await?;
            let cycle = started.elapsed();
            let baseline_changing = if with_baseline {
                // Same starting point for the baseline.
                silence_a_tenth(client).await?;
                Some(baseline(client, params).await?)
            } else {
                None
            };
            rows.push(Row {
                agents: n,
                scenario: "10% change",
                cycle,
                candidates: report.candidates,
                transitions: report.transitions.len(),
                baseline: baseline_changing,
            });
        }
        clean(client).await?;
        Ok(rows)
    }

    pub fn render(rows: &[Row]) -> String {
        let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
        let mut table = vec![
            ["agents", "scenario", "cycle ms", "candidates", "transitions", "per-agent ms", "speed-up"]
                .map(String::from),
        ];
        for r in rows {
            table.push([
                r.agents.to_string(),
                r.scenario.to_string(),
                ms(r.cycle),
                r.candidates.to_string(),
                r.transitions.to_string(),
                r.baseline.map(ms).unwrap_or_else(|| "-".into()),
                r.baseline
                    .map(|b| format!("{:.0}x", b.as_secs_f64() / r.cycle.as_secs_f64().max(1e-9)))
                    .unwrap_or_else(|| "-".into()),
            ]);
        }
        crate::text_table::render(&table)
    }
}
