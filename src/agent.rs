//! `warden agent`: a small heartbeat sender for anything that can run a
//! command — a cron job's wrapper, a shell service, the demo's fleet.

use std::time::Instant;

use crate::client::{Client, ClientError, Failover, HeartbeatRequest};
use crate::model::Mode;

#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// warden's URL; repeat to give several replicas, tried in turn.
    #[arg(long = "url", default_value = "http://127.0.0.1:8080")]
    pub urls: Vec<String>,
    #[arg(long)]
    pub agent_id: String,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub mode: Option<Mode>,
    /// How often to send.
    #[arg(long, default_value = "30s")]
    pub interval: crate::config::Duration,
    /// A label, name=value; repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// API key with the ingest scope.
    #[arg(long, env = "WARDEN_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Start in the background and return at once.
    #[arg(long)]
    pub detach: bool,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| "expected name=value".into())
}

/// Sends heartbeats until killed. Backs off (and moves to the next URL) when
/// warden cannot take them.
pub async fn run(args: AgentArgs) -> Result<(), String> {
    crate::model::AgentId::parse(args.agent_id.clone()).map_err(|e| format!("--agent-id: {e}"))?;
    // Built before detaching, so a bad --url is reported by the command
    // that was given it, not by a child whose output goes nowhere.
    let clients: Vec<Client> = args
        .urls
        .iter()
        .map(|u| Client::new(u, args.key.clone()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--url: {e}"))?;
    if args.detach {
        return detach();
    }
    let started = Instant::now();
    let mut schedule = Failover::new(clients.len());
    // The host's clock, unless warden found it too far ahead.
    let mut send_clock = true;
    loop {
        let (current, wait) = schedule.next(Instant::now());
        tokio::time::sleep(wait).await;
        let mut heartbeat =
            HeartbeatRequest::new(&args.agent_id).uptime(started.elapsed().as_secs()).next_in(args.interval.get());
        if !send_clock {
            heartbeat.sent_at = None;
        }
        if let Some(mode) = args.mode {
            heartbeat = heartbeat.mode(mode);
        }
        if let Some(name) = &args.name {
            heartbeat = heartbeat.name(name);
        }
        for (k, v) in &args.labels {
            heartbeat = heartbeat.label(k, v);
        }
        match clients[current].heartbeat(&heartbeat).await {
            Ok(_) => {
                schedule.succeeded();
                tokio::time::sleep(args.interval.get()).await;
            }
            Err(ClientError::Rejected { status: 422, field: Some(field), message, .. })
                if field == "sent_at" && send_clock =>
            {
                tracing::warn!(%message, "this host's clock is ahead of warden's; sending heartbeats without sent_at");
                send_clock = false;
            }
            Err(e) => match e.retry_after() {
                Some(hint) => {
                    tracing::warn!(url = %args.urls[current], error = %e, "heartbeat not taken; retrying");
                    schedule.failed(hint, Instant::now());
                }
                None => return Err(e.to_string()),
            },
        }
    }
}

/// Starts this same command line without `--detach`, in its own session
/// with no terminal, and returns.
fn detach() -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--detach").collect();
    let mut command = std::process::Command::new(exe);
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
    }
    command.spawn().map_err(|e| format!("cannot start the agent: {e}"))?;
    Ok(())
}
