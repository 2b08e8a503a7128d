//! An example agent: heartbeats with a few metrics on the interval warden
//! asks for, and backs off when warden answers 503.
//!
//!     WARDEN_KEY=wdn_... cargo run --example agent -- --agent-id demo-1
//!
//! Options: --url (default http://127.0.0.1:8080; repeat it to give several
//! warden replicas, tried in turn when one cannot be reached), --agent-id, --mode
//! (emergency|active|idle|sleep), --interval-ms (the interval it declares),
//! --every-ms (how often it actually sends; default: what warden asks for),
//! --count (stop after N heartbeats; default: run until killed).

use std::time::{Duration, Instant};

use warden::client::{Client, Failover, HeartbeatRequest};
use warden::model::Mode;

struct Options {
    urls: Vec<String>,
    agent_id: String,
    mode: Option<Mode>,
    interval: Option<Duration>,
    every: Option<Duration>,
    count: Option<u64>,
}

fn options() -> Result<Options, String> {
    let mut opts = Options {
        urls: Vec::new(),
        agent_id: format!("example-{}", std::process::id()),
        mode: None,
        interval: None,
        every: None,
        count: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => opts.urls.push(value()?),
            "--agent-id" => opts.agent_id = value()?,
            "--mode" => opts.mode = Some(value()?.parse().map_err(|e| format!("--mode: {e}"))?),
            "--interval-ms" => {
                opts.interval =
                    Some(Duration::from_millis(value()?.parse().map_err(|e| format!("--interval-ms: {e}"))?))
            }
            "--every-ms" => {
                opts.every = Some(Duration::from_millis(value()?.parse().map_err(|e| format!("--every-ms: {e}"))?))
            }
            "--count" => opts.count = Some(value()?.parse().map_err(|e| format!("--count: {e}"))?),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(opts)
}

/// One-minute load average and used memory share, where Linux tells them.
fn metrics() -> Vec<(&'static str, f64)> {
    let mut out = Vec::new();
    if let Some(load) = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
    {
        out.push(("load1", load));
    }
    if let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") {
        let field = |name: &str| {
            meminfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        };
        if let (Some(total), Some(available)) = (field("MemTotal:"), field("MemAvailable:")) {
            out.push(("memory_used_pct", 100.0 * (1.0 - available / total)));
        }
    }
    out
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let opts = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("agent: {e}");
            std::process::exit(2);
        }
    };
    let key = std::env::var("WARDEN_KEY").ok().filter(|k| !k.is_empty());
    let urls = if opts.urls.is_empty() { vec!["http://127.0.0.1:8080".to_string()] } else { opts.urls.clone() };
    let clients: Vec<Client> = match urls.iter().map(|u| Client::new(u, key.clone())).collect() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agent: {e}");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let mut sent = 0u64;
    // Which warden to send to next and when: Retry-After honoured, backoff
    // with jitter once every warden is resting, the others tried meanwhile.
    let mut schedule = Failover::new(clients.len());
    loop {
        let (current, wait) = schedule.next(Instant::now());
        tokio::time::sleep(wait).await;
        let mut heartbeat = HeartbeatRequest::new(&opts.agent_id).uptime(started.elapsed().as_secs());
        if let Some(mode) = opts.mode {
            heartbeat = heartbeat.mode(mode);
        }
        if let Some(interval) = opts.interval {
            heartbeat = heartbeat.next_in(interval);
        }
        for (name, value) in metrics() {
            heartbeat = heartbeat.metric(name, value);
        }
        match clients[current].heartbeat(&heartbeat).await {
            Ok(ack) => {
                sent += 1;
                schedule.succeeded();
                println!("heartbeat {sent} acknowledged; next in {} ms", ack.next_heartbeat_ms);
                if opts.count.is_some_and(|c| sent >= c) {
                    return;
                }
                let every = opts.every.unwrap_or(Duration::from_millis(u64::from(ack.next_heartbeat_ms)));
                schedule.set_interval(every);
                tokio::time::sleep(every).await;
            }
            Err(e) => match e.retry_after() {
                Some(hint) => {
                    eprintln!("agent: {}: {e}; retrying", urls[current]);
                    schedule.failed(hint, Instant::now());
                }
                None => {
                    eprintln!("agent: {e}");
                    std::process::exit(1);
                }
            },
        }
    }
}
