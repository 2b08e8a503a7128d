//! Load generator for `warden simulate` and `warden bench ingest`: real
//! HTTP/1.1 over loopback, one keep-alive connection per worker, measuring
//! throughput and latency of POST /v1/heartbeats.
//!
//! Closed loop by default (each connection sends its next request as soon
//! as the last is answered: the throughput ceiling). With a rate, requests
//! are scheduled at fixed intervals and latency is measured from the
//! scheduled time, so a stall is charged to every request it delayed
//! (no coordinated omission).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Timelike as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// warden's address, e.g. 127.0.0.1:8080.
    pub addr: SocketAddr,
    /// Bearer key with the ingest scope (empty when auth is off).
    pub key: String,
    /// Distinct agent ids to spread heartbeats over.
    pub agents: usize,
    /// Heartbeats per request: 1 sends single heartbeats, more sends batches.
    pub batch: usize,
    /// Metrics per heartbeat.
    pub metrics: usize,
    /// Concurrent connections.
    pub connections: usize,
    /// Total heartbeats per second to aim for; `None` sends as fast as answered.
    pub rate: Option<f64>,
    /// How long to measure.
    pub duration: Duration,
    /// Prefix of agent ids, to keep runs apart in one database.
    pub agent_prefix: String,
    /// Requests at least this slow are also reported by the second they
    /// were scheduled in (sent, or with a rate due: a request held up
    /// behind a slow one counts from when it was due), to line stalls up
    /// with the server's and the database's logs.
    pub slow: Option<Duration>,
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub requests: u64,
    pub heartbeats_ok: u64,
    pub heartbeats_failed: u64,
    pub errors: std::collections::BTreeMap<String, u64>,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// With `LoadSpec::slow`: per wall-clock second, the requests
    /// scheduled in it that were at least that slow, in time order.
    pub slow_seconds: Vec<SlowSecond>,
}

/// Requests scheduled within one second that took at least `LoadSpec::slow`.
#[derive(Debug, Clone, PartialEq)]
pub struct SlowSecond {
    pub second: chrono::DateTime<chrono::Utc>,
    pub requests: u64,
    pub max: Duration,
}

impl LoadReport {
    pub fn heartbeats_per_second(&self) -> f64 {
        self.heartbeats_ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn requests_per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A few aligned lines for a terminal.
    pub fn summary(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "heartbeats/s {:>10.0}   requests/s {:>9.0}   ok {}   failed {}",
            self.heartbeats_per_second(),
            self.requests_per_second(),
            self.heartbeats_ok,
            self.heartbeats_failed
        );
        let _ = writeln!(
            out,
            "latency ms   p50 {:.2}   p90 {:.2}   p99 {:.2}   max {:.2}",
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.max)
        );
        if !self.errors.is_empty() {
            let errors: Vec<String> = self.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let _ = writeln!(out, "errors       {}", errors.join(", "));
        }
        // A run that is slow throughout would bury the summary.
        const LISTED: usize = 50;
        for s in self.slow_seconds.iter().take(LISTED) {
            let _ = writeln!(
                out,
                "slow         {}   {} request{}   max {:.2} ms",
                s.second.format("%H:%M:%SZ"),
                s.requests,
                if s.requests == 1 { "" } else { "s" },
                ms(s.max)
            );
        }
        if let Some(rest) = self.slow_seconds.len().checked_sub(LISTED).filter(|n| *n > 0) {
            let _ = writeln!(out, "slow         and {rest} more seconds");
        }
        out
    }
}

#[derive(Default)]
struct WorkerStats {
    latencies_us: Vec<u32>,
    /// (scheduled, latency) of the requests at least `LoadSpec::slow`.
    slow: Vec<(Instant, Duration)>,
    requests: u64,
    ok: u64,
    failed: u64,
    errors: std::collections::BTreeMap<String, u64>,
}

/// Runs the load and reports. Fails only if no connection can be made.
pub async fn run(spec: LoadSpec) -> Result<LoadReport, String> {
    let spec = Arc::new(spec);
    // One probe connection first, so a wrong address is one clear error.
    tokio::net::TcpStream::connect(spec.addr).await.map_err(|e| format!("cannot connect to {}: {e}", spec.addr))?;
    let start = Instant::now();
    let start_wall = chrono::Utc::now();
    let deadline = start + spec.duration;
    let workers: Vec<_> =
        (0..spec.connections.max(1)).map(|w| tokio::spawn(worker(spec.clone(), w, start, deadline))).collect();
    let mut all = WorkerStats::default();
    for w in workers {
        let stats = w.await.map_err(|e| e.to_string())?;
        all.latencies_us.extend(stats.latencies_us);
        all.slow.extend(stats.slow);
        all.requests += stats.requests;
        all.ok += stats.ok;
        all.failed += stats.failed;
        for (k, v) in stats.errors {
            *all.errors.entry(k).or_default() += v;
        }
    }
    let elapsed = start.elapsed();
    all.latencies_us.sort_unstable();
    let pick = |q: f64| -> Duration {
        if all.latencies_us.is_empty() {
            return Duration::ZERO;
        }
        let i = ((all.latencies_us.len() as f64 - 1.0) * q).round() as usize;
        Duration::from_micros(all.latencies_us[i] as u64)
    };
    Ok(LoadReport {
        requests: all.requests,
        heartbeats_ok: all.ok,
        heartbeats_failed: all.failed,
        errors: all.errors,
        elapsed,
        p50: pick(0.50),
        p90: pick(0.90),
        p99: pick(0.99),
        max: pick(1.0),
        slow_seconds: by_second(all.slow, start, start_wall),
    })
}

/// Slow requests grouped by the wall-clock second they were scheduled in.
fn by_second(
    mut slow: Vec<(Instant, Duration)>,
    start: Instant,
    start_wall: chrono::DateTime<chrono::Utc>,
) -> Vec<SlowSecond> {
    slow.sort_unstable_by_key(|(scheduled, _)| *scheduled);
    let mut seconds: Vec<SlowSecond> = Vec::new();
    for (scheduled, latency) in slow {
        let wall = start_wall + chrono::TimeDelta::from_std(scheduled.duration_since(start)).unwrap_or_default();
        let second = wall.with_nanosecond(0).unwrap_or(wall);
        match seconds.last_mut() {
            Some(last) if last.second == second => {
                last.requests += 1;
                last.max = last.max.max(latency);
            }
            _ => seconds.push(SlowSecond { second, requests: 1, max: latency }),
        }
    }
    seconds
}

async fn worker(spec: Arc<LoadSpec>, index: usize, start: Instant, deadline: Instant) -> WorkerStats {
    let mut stats = WorkerStats::default();
    let mut sender = None;
    let own = owned_agents(&spec, index);
    // In proportion to the agents it owns (7 or 8 of 450 over 64), so that
    // every agent beats as often.
    let share = own.len() as f64 / simulated_agents(&spec).max(1) as f64;
    let per_worker_rate = spec.rate.map(|r| r * share);
    let interval = per_worker_rate.map(|r| Duration::from_secs_f64(spec.batch as f64 / r.max(1e-9)));
    let mut next_send = start + interval.map(|i| i.mul_f64(index as f64 / spec.connections as f64)).unwrap_or_default();
    let mut seq: u64 = 0;
    let auth = format!("Bearer {}", spec.key);
    loop {
        let scheduled = match interval {
            Some(interval) => {
                let at = next_send;
                if at >= deadline {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                next_send += interval;
                at
            }
            None => {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                now
            }
        };
        if sender.is_none() {
            match connect(spec.addr).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    *stats.errors.entry(format!("connect: {e}")).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let body = build_body(&spec, own.clone(), &mut seq);
        let request = Request::post("/v1/heartbeats")
            .header(hyper::header::HOST, "warden")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::AUTHORIZATION, &auth)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request");
        let s = sender.as_mut().expect("connected above");
        let result = async {
            s.ready().await?;
            let response = s.send_request(request).await?;
            let status = response.status();
            response.into_body().collect().await?;
            Ok::<StatusCode, hyper::Error>(status)
        }
        .await;
        let latency = scheduled.elapsed();
        if spec.slow.is_some_and(|slow| latency >= slow) {
            stats.slow.push((scheduled, latency));
        }
        stats.requests += 1;
        stats.latencies_us.push(latency.as_micros().min(u32::MAX as u128) as u32);
        match result {
            Ok(StatusCode::OK) => stats.ok += spec.batch as u64,
            Ok(status) => {
                stats.failed += spec.batch as u64;
                *stats.errors.entry(status.as_u16().to_string()).or_default() += 1;
            }
            Err(e) => {
                stats.failed += spec.batch as u64;
                *stats.errors.entry(format!("http: {e}")).or_default() += 1;
                sender = None;
            }
        }
    }
    stats
}

async fn connect(addr: SocketAddr) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// The agents connection `worker` heartbeats for. Each connection owns its
/// own, at least one batch worth, so no agent is ever in two requests at
/// once and a batch never repeats an agent. The `agents` asked for are
/// shared out whole (450 over 64 connections: 7 or 8 each); with fewer
/// than a batch per connection, each gets one batch worth, and there are
/// more agents than asked ([`simulated_agents`]).
fn owned_agents(spec: &LoadSpec, worker: usize) -> std::ops::Range<usize> {
    let connections = spec.connections.max(1);
    let (base, extra) = (spec.agents / connections, spec.agents % connections);
    if base >= spec.batch.max(1) {
        let first = worker * base + worker.min(extra);
        first..first + base + usize::from(worker < extra)
    } else {
        let each = spec.batch.max(1);
        worker * each..(worker + 1) * each
    }
}

/// How many distinct agents a run heartbeats for.
pub fn simulated_agents(spec: &LoadSpec) -> usize {
    (0..spec.connections.max(1)).map(|w| owned_agents(spec, w).len()).sum()
}

/// A request body: one heartbeat or a batch, for agents of `own` in turn,
/// with monotonically rising uptime per agent so that no restart is
/// detected.
fn build_body(spec: &LoadSpec, own: std::ops::Range<usize>, seq: &mut u64) -> String {
    let mut out = String::with_capacity(64 + spec.batch * (96 + spec.metrics * 24));
    let count = own.len().max(1);
    let one = |out: &mut String, seq: u64| {
        let agent = own.start + (seq as usize % count);
        let uptime = seq / count as u64;
        let _ =
            write!(out, r#"{{"agent_id":"{}-{agent}","mode":"active","uptime_seconds":{uptime}"#, spec.agent_prefix);
        if spec.metrics > 0 {
            out.push_str(r#","metrics":{"#);
            for m in 0..spec.metrics {
                if m > 0 {
                    out.push(',');
                }
                let _ = write!(out, r#""m{m}":{}.5"#, seq % 100);
            }
            out.push('}');
        }
        out.push('}');
    };
    if spec.batch <= 1 {
        one(&mut out, *seq);
        *seq += 1;
    } else {
        out.push_str(r#"{"heartbeats":["#);
        for i in 0..spec.batch {
            if i > 0 {
                out.push(',');
            }
            one(&mut out, *seq);
            *seq += 1;
        }
        out.push_str("]}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(batch: usize, metrics: usize) -> LoadSpec {
        LoadSpec {
            addr: "127.0.0.1:1".parse().unwrap(),
            key: String::new(),
            agents: 4,
            batch,
            metrics,
            connections: 2,
            rate: None,
            duration: Duration::from_secs(1),
            agent_prefix: "sim".into(),
            slow: None,
        }
    }

    #[test]
    fn slow_requests_are_grouped_by_the_wall_clock_second_they_were_scheduled_in() {
        let start = Instant::now();
        let start_wall = "2026-12-01T12:00:00.500Z".parse::<chrono::DateTime<chrono::Utc>>().unwrap();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let slow = vec![
            (at(700), Duration::from_millis(150)),
            (at(100), Duration::from_millis(120)),
            (at(600), Duration::from_millis(300)),
            (at(2600), Duration::from_millis(101)),
        ];
        let second = |s: &str| s.parse::<chrono::DateTime<chrono::Utc>>().unwrap();
        assert_eq!(
            by_second(slow, start, start_wall),
            vec![
                SlowSecond { second: second("2026-12-01T12:00:00Z"), requests: 1, max: Duration::from_millis(120) },
                SlowSecond { second: second("2026-12-01T12:00:01Z"), requests: 2, max: Duration::from_millis(300) },
                SlowSecond { second: second("2026-12-01T12:00:03Z"), requests: 1, max: Duration::from_millis(101) },
            ]
        );
        let report = LoadReport {
            slow_seconds: by_second(vec![(at(0), Duration::from_millis(250))], start, start_wall),
            ..Default::default()
        };
        assert!(
            report.summary().contains("slow         12:00:00Z   1 request   max 250.00 ms"),
            "{}",
            report.summary()
        );

        let many: Vec<_> = (0..60).map(|s| (at(s * 1000), Duration::from_millis(200))).collect();
        let report = LoadReport { slow_seconds: by_second(many, start, start_wall), ..Default::default() };
        let summary = report.summary();
        assert_eq!(summary.lines().filter(|l| l.starts_with("slow") && l.contains("   max ")).count(), 50, "{summary}");
        assert!(summary.ends_with("slow         and 10 more seconds\n"), "{summary}");
    }

    #[test]
    fn bodies_are_valid_heartbeats() {
        let mut seq = 0;
        let single: serde_json::Value = serde_json::from_str(&build_body(&spec(1, 2), 2..4, &mut seq)).unwrap();
        assert_eq!(single["agent_id"], "sim-2");
        assert_eq!(single["metrics"].as_object().unwrap().len(), 2);
        let batch: serde_json::Value = serde_json::from_str(&build_body(&spec(3, 0), 0..2, &mut seq)).unwrap();
        assert_eq!(batch["heartbeats"].as_array().unwrap().len(), 3);
        assert_eq!(seq, 4);
    }

    #[test]
    fn connections_share_out_exactly_the_agents_asked_for() {
        let mut s = spec(1, 0);
        (s.agents, s.connections) = (450, 64);
        let owned: Vec<_> = (0..64).map(|w| owned_agents(&s, w)).collect();
        assert_eq!(owned.first(), Some(&(0..8)));
        assert_eq!(owned.last(), Some(&(443..450)));
        assert!(owned.windows(2).all(|w| w[0].end == w[1].start), "no agent twice, none left out");
        assert_eq!(simulated_agents(&s), 450);
        // Batches of 10 over 64 connections need 640.
        (s.batch, s.agents) = (10, 100);
        assert_eq!(simulated_agents(&s), 640);
    }
}
