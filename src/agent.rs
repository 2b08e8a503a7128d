//! `warden agent`: a small heartbeat sender for anything that can run a
//! command — a cron job's wrapper, a shell service, the demo's fleet.

use std::time::Instant;

use crate::client::{Client, ClientError, Failover, HeartbeatRequest, MAX_REST};
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
    /// Send the first heartbeat, then go on in the background and return,
    /// printing the background process's id (`kill` it to stop): with an
    /// error if warden refused that heartbeat for good (a wrong key, a
    /// label it does not take).
    #[arg(long)]
    pub detach: bool,
    /// Send no uptime. For a wrapper started anew by each run of a job (a
    /// cron job running longer than the interval): its own uptime, back to
    /// 0 at every run, would be read as a restart, and runs close together
    /// as a restart loop.
    #[arg(long)]
    pub no_uptime: bool,
    /// Set by --detach for the background process: the first heartbeat is
    /// sent, so the next is due an interval from now.
    #[arg(long, hide = true)]
    pub first_sent: bool,
    /// Set by --detach for the background process: warden found this
    /// host's clock too far ahead, so heartbeats go without sent_at.
    #[arg(long, hide = true)]
    pub without_clock: bool,
    /// Set by --detach for the background process: when the agent started
    /// (Unix milliseconds), so that its uptime goes on from the command's
    /// rather than restarting at 0 (which warden would read as a restart).
    #[arg(long, hide = true)]
    pub started_at_ms: Option<u64>,
    /// Set by --detach for the background process: the URL (by position)
    /// that took the first heartbeat, so that it goes on there rather than
    /// at one that just failed to answer.
    #[arg(long, hide = true, default_value_t = 0)]
    pub first_url: usize,
}

/// The flags --detach hands to the background process in its own way.
const DETACH_FLAGS: [&str; 3] = ["--detach", "--first-sent", "--without-clock"];
/// The same for flags with a value (`--key K` or `--key=K`): the key goes
/// in the environment, the others are set anew.
const HANDED_ON: [&str; 3] = ["--key", "--started-at-ms", "--first-url"];

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| "expected name=value".into())
}

/// What is wrong with the command line itself (exit 2), before anything is
/// sent: warden would refuse an interval outside what next_heartbeat_ms
/// allows, and say so in milliseconds under a name never typed.
pub fn check(args: &AgentArgs) -> Result<Vec<Client>, String> {
    crate::model::AgentId::parse(args.agent_id.clone()).map_err(|e| format!("--agent-id: {e}"))?;
    use crate::ingest::heartbeat::{NEXT_HEARTBEAT_MAX_MS, NEXT_HEARTBEAT_MIN_MS};
    let ms = i64::try_from(args.interval.get().as_millis()).unwrap_or(i64::MAX);
    if !(NEXT_HEARTBEAT_MIN_MS..=NEXT_HEARTBEAT_MAX_MS).contains(&ms) {
        return Err(format!("--interval: must be from 100ms to 7d (got {})", args.interval));
    }
    // Built before detaching, so a bad --url is reported by the command
    // that was given it, not by a child whose output goes nowhere.
    args.urls
        .iter()
        .map(|u| Client::new(u, args.key.clone()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--url: {e}"))
}

/// Sends heartbeats until killed, with the clients [`check`] built. Backs
/// off (and moves to the next URL) when warden cannot take them.
pub async fn run(args: AgentArgs, clients: Vec<Client>) -> Result<(), String> {
    let started = started_at(args.started_at_ms);
    if args.detach {
        let first = first_heartbeat(&args, &clients, started).await?;
        return detach(first, args.key.as_deref());
    }
    let mut schedule = Failover::new(clients.len()).starting_at(args.first_url).within(args.interval.get());
    // The host's clock, unless warden found it too far ahead.
    let mut send_clock = !args.without_clock;
    if args.first_sent {
        tokio::time::sleep(args.interval.get()).await;
    }
    let mut refused = Refused::new(&args);
    // Said once when heartbeats are taken, and again after failures, so
    // that one watching the agent sees it working.
    let mut taking = false;
    loop {
        let (current, wait) = schedule.next(Instant::now());
        tokio::time::sleep(wait).await;
        let heartbeat = heartbeat(&args, started, send_clock);
        match clients[current].heartbeat(&heartbeat).await {
            Ok(_) => {
                if !taking {
                    tracing::info!(url = %args.urls[current], interval = %args.interval, "heartbeats taken");
                    taking = true;
                }
                schedule.succeeded();
                refused.taken(current);
                tokio::time::sleep(args.interval.get()).await;
            }
            Err(e) if clock_refused(&e) && send_clock => {
                tracing::warn!(error = %e, "this host's clock is ahead of warden's; sending heartbeats without sent_at");
                send_clock = false;
            }
            Err(e) => match e.retry_after() {
                Some(hint) => {
                    taking = false;
                    tracing::warn!(url = %args.urls[current], error = %e, "heartbeat not taken; retrying");
                    schedule.failed(hint, Instant::now());
                }
                None => {
                    taking = false;
                    refused.refused(current, &e, Instant::now())?;
                    tracing::error!(url = %args.urls[current], error = %e, "heartbeat refused; sending to the other URLs");
                    schedule.failed(MAX_REST, Instant::now());
                }
            },
        }
    }
}

/// The refusals that retrying cannot cure, by URL. One URL's (a replica
/// behind a proxy that answers 404, a URL of another warden that does not
/// know the key) is not the others': the agent goes on with them, trying
/// that URL again when they fail, and stops only once every URL has
/// refused within [`MAX_REST`] (a refusal older than that, such as a
/// proxy's 404 during a deploy hours ago, earns its URL another try first).
struct Refused<'a> {
    args: &'a AgentArgs,
    by_url: Vec<Option<(Instant, String)>>,
}

impl<'a> Refused<'a> {
    fn new(args: &'a AgentArgs) -> Self {
        Self { args, by_url: vec![None; args.urls.len()] }
    }

    fn taken(&mut self, url: usize) {
        self.by_url[url] = None;
    }

    /// Notes the refusal at `now`; `Err` with what each URL said once all
    /// refused recently.
    fn refused(&mut self, url: usize, e: &ClientError, now: Instant) -> Result<(), String> {
        let reason = refusal(e, self.args.key.is_some());
        let reason = match self.args.urls.len() {
            1 => reason,
            _ => format!("{}: {reason}", self.args.urls[url]),
        };
        self.by_url[url] = Some((now, reason));
        for entry in &mut self.by_url {
            if entry.as_ref().is_some_and(|(at, _)| now.duration_since(*at) > MAX_REST) {
                *entry = None;
            }
        }
        if self.by_url.iter().all(Option::is_some) {
            return Err(self.by_url.iter().flatten().map(|(_, reason)| reason.as_str()).collect::<Vec<_>>().join("; "));
        }
        Ok(())
    }

    /// Whether `url` has refused (and not taken a heartbeat since).
    fn has_refused(&self, url: usize) -> bool {
        self.by_url[url].is_some()
    }
}

fn heartbeat(args: &AgentArgs, started: Instant, send_clock: bool) -> HeartbeatRequest {
    let mut heartbeat = HeartbeatRequest::new(&args.agent_id).next_in(args.interval.get());
    if !args.no_uptime {
        heartbeat = heartbeat.uptime(started.elapsed().as_secs());
    }
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
    heartbeat
}

/// A refusal retrying cannot cure, with what to do about a key.
fn refusal(e: &ClientError, keyed: bool) -> String {
    match e {
        ClientError::Rejected { status: 401, .. } if !keyed => {
            format!("{e}; give an API key with the ingest scope in --key or WARDEN_KEY")
        }
        ClientError::Rejected { status: 401, .. } => format!("{e}; the key given (--key or WARDEN_KEY) is not known"),
        ClientError::Rejected { status: 403, .. } => {
            format!("{e}; the key needs the ingest scope, and to be allowed this agent id")
        }
        e => e.to_string(),
    }
}

/// warden found sent_at too far ahead of its own clock.
fn clock_refused(e: &ClientError) -> bool {
    matches!(e, ClientError::Rejected { status: 422, field: Some(field), .. } if field == "sent_at")
}

/// What the first heartbeat of a detaching agent found.
struct First {
    taken: bool,
    send_clock: bool,
    /// The URL that took it, by position.
    url: usize,
    started: Instant,
}

/// When the agent started: now, or the command's start handed to the
/// background process.
fn started_at(unix_ms: Option<u64>) -> Instant {
    let now = Instant::now();
    let Some(ms) = unix_ms else { return now };
    let ago = since_epoch().saturating_sub(std::time::Duration::from_millis(ms));
    now.checked_sub(ago).unwrap_or(now)
}

/// The wall clock, as time since the Unix epoch: how a start is handed to
/// another process, where an `Instant` means nothing.
fn since_epoch() -> std::time::Duration {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
}

/// The first heartbeat of a detaching agent, sent before detaching so that
/// a refusal that retrying cannot cure (a wrong key, a key held to other
/// agents, a label warden does not take) is reported by the command that
/// was given them: the background process's output goes nowhere. Each URL
/// is tried once (again without sent_at if warden finds the clock ahead),
/// each try waiting up to the client's timeout for the answer, until one
/// takes it. An error only when every URL refused; not taken when none
/// took it and some could not be reached or were not ready: the background
/// process keeps trying.
async fn first_heartbeat(args: &AgentArgs, clients: &[Client], started: Instant) -> Result<First, String> {
    let mut send_clock = true;
    let mut refused = Refused::new(args);
    for (i, (client, url)) in clients.iter().zip(&args.urls).enumerate() {
        loop {
            match client.heartbeat(&heartbeat(args, started, send_clock)).await {
                Ok(_) => return Ok(First { taken: true, send_clock, url: i, started }),
                Err(e) if clock_refused(&e) && send_clock => {
                    tracing::warn!(error = %e, "this host's clock is ahead of warden's; sending heartbeats without sent_at");
                    send_clock = false;
                }
                Err(e) if e.retry_after().is_some() => {
                    tracing::warn!(%url, error = %e, "first heartbeat not taken; the agent keeps trying in the background");
                    break;
                }
                Err(e) => {
                    refused.refused(i, &e, Instant::now())?;
                    tracing::warn!(%url, error = %e, "first heartbeat refused; trying the other URLs");
                    break;
                }
            }
        }
    }
    // The background process begins at a URL that did not refuse.
    let url = (0..clients.len()).find(|&i| !refused.has_refused(i)).unwrap_or(0);
    Ok(First { taken: false, send_clock, url, started })
}

/// Starts this same command line without `--detach`, in a process group
/// of its own with no terminal, and returns; the background process is
/// told what the first heartbeat found.
/// The key goes to it in its environment, not its command line, where
/// any user of the host could read it (`ps`) for as long as it runs.
fn detach(first: First, key: Option<&str>) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut given = std::env::args_os().skip(1);
    while let Some(arg) = given.next() {
        let text = arg.to_string_lossy();
        if HANDED_ON.contains(&text.as_ref()) {
            given.next();
        } else if !HANDED_ON.iter().any(|flag| text.strip_prefix(flag).is_some_and(|v| v.starts_with('=')))
            && !DETACH_FLAGS.contains(&text.as_ref())
        {
            args.push(arg);
        }
    }
    let started_ms = since_epoch().saturating_sub(first.started.elapsed()).as_millis();
    args.push(format!("--started-at-ms={started_ms}").into());
    args.push(format!("--first-url={}", first.url).into());
    if first.taken {
        args.push("--first-sent".into());
    }
    if !first.send_clock {
        args.push("--without-clock".into());
    }
    let mut command = std::process::Command::new(exe);
    if let Some(key) = key {
        command.env("WARDEN_KEY", key);
    }
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
    let child = command.spawn().map_err(|e| format!("cannot start the agent: {e}"))?;
    // Nothing else names it: a wrapper keeps this to stop it.
    println!("{}", child.id());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(urls: &[&str]) -> AgentArgs {
        #[derive(clap::Parser)]
        struct Command {
            #[command(flatten)]
            args: AgentArgs,
        }
        let mut line = vec!["warden", "--agent-id", "a"];
        for url in urls {
            line.extend(["--url", url]);
        }
        <Command as clap::Parser>::parse_from(line).args
    }

    #[test]
    fn the_agent_stops_only_once_every_url_refused_within_the_longest_rest() {
        let args = args(&["http://one", "http://two"]);
        let mut refused = Refused::new(&args);
        let no = |status| ClientError::Rejected { status, code: "x".into(), message: "no".into(), field: None };
        let t = Instant::now();
        assert!(refused.refused(0, &no(404), t).is_ok(), "the other URL is left");
        assert!(refused.has_refused(0) && !refused.has_refused(1));
        // Long after: the first refusal is stale, so the first URL gets
        // another try rather than stopping the agent.
        let later = t + MAX_REST + std::time::Duration::from_secs(1);
        assert!(refused.refused(1, &no(401), later).is_ok());
        assert!(!refused.has_refused(0));
        let stop = refused.refused(0, &no(404), later).unwrap_err();
        assert!(stop.contains("http://one: ") && stop.contains("http://two: "), "{stop}");
        // A heartbeat taken clears the URL's refusal.
        let mut refused = Refused::new(&args);
        refused.refused(0, &no(404), t).unwrap();
        refused.taken(0);
        assert!(refused.refused(1, &no(404), t).is_ok());
        // One URL: its refusal is the agent's, without the URL.
        let one = super::tests::args(&["http://one"]);
        let stop = Refused::new(&one).refused(0, &no(403), t).unwrap_err();
        assert!(!stop.contains("http://one") && stop.contains("ingest scope"), "{stop}");
    }

    #[test]
    fn a_background_agent_counts_its_uptime_from_the_commands_start() {
        let thirty_ago = (since_epoch() - std::time::Duration::from_secs(30)).as_millis() as u64;
        let uptime = started_at(Some(thirty_ago)).elapsed().as_secs();
        assert!((30..40).contains(&uptime), "{uptime}");
        assert!(started_at(None).elapsed().as_secs() < 5);
    }
}
