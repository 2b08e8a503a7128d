//! The command line: `warden [--config PATH] VERB`.
//!
//! Exit status: 0 on success, 2 for bad usage or settings, 1 for anything
//! else. Errors go to stderr: one line first, detail after.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::app::{Application, StartError};
use crate::auth::{self, Scope};
use crate::config::{Settings, SettingsError, Sources, override_file};
use crate::db::{self, Database, migrate};
use crate::telemetry;

#[derive(Debug, Parser)]
#[command(name = "warden", version, about = "Agent health service: heartbeats, liveness, scores, recovery and alerts")]
pub struct Cli {
    /// Settings file overriding the built-in defaults (also WARDEN_CONFIG).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: HTTP API, evaluator and background work.
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print the effective settings, secrets redacted.
    Config,
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Load generator: simulated agents heartbeating a running warden.
    Simulate(SimulateArgs),
    /// Benchmarks against warden processes this command starts.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Alerts: list them, acknowledge them.
    #[command(subcommand)]
    Alerts(crate::alerting::cli::AlertsCommand),
    /// Silences: add, list, remove.
    #[command(subcommand)]
    Silence(crate::alerting::cli::SilenceCommand),
    /// Run a reporting query from sql/ (`warden report --list` names them).
    Report(crate::report::ReportArgs),
    /// warden with a simulated fleet and a live view, to see the whole loop.
    Demo {
        /// Simulated agents, 6 to 10000 (five of them play the roles).
        #[arg(long, default_value_t = 50)]
        agents: usize,
    },
    /// Send heartbeats for an agent (a cron job, a daemon) until killed.
    Agent(crate::agent::AgentArgs),
    /// Recovery: history, run one now, reset an agent that gave up, cancel.
    #[command(subcommand)]
    Recovery(RecoveryCommand),
    /// Agents: remove one that is gone for good.
    #[command(subcommand)]
    Agents(AgentsCommand),
}

#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// Remove an agent gone for good (decommissioned, renamed): it leaves
    /// the fleet, its open incidents and their alerts resolve, its queued
    /// recoveries are cancelled. Its history stays for reports until
    /// retention drops it; a heartbeat from it registers it again.
    Remove {
        agent: String,
        /// Who removes it, recorded in its agent_removed event (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Base URL of the warden to load.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// API key with the ingest scope.
    #[arg(long, env = "WARDEN_KEY", hide_env_values = true, default_value = "")]
    pub key: String,
    /// Distinct simulated agents, at least --batch. Each connection sends
    /// for agents of its own, a batch worth at least: with fewer agents
    /// than connections × batch, fewer connections are used.
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// Heartbeats per second in total; omit to send as fast as answered.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Heartbeats per request (1 = single heartbeats).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Metrics per heartbeat.
    #[arg(long, default_value_t = 0)]
    pub metrics: usize,
    /// Concurrent connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// How long to run.
    #[arg(long, default_value = "20s")]
    pub duration: crate::config::Duration,
    /// Also list, by the second they were scheduled in (UTC; with --rate
    /// the second they were due), the requests that took at least this
    /// long, e.g. `100ms`: to line stalls up with logs.
    #[arg(long)]
    pub slow: Option<crate::config::Duration>,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Ingest throughput and latency, group commit against one transaction
    /// per heartbeat, each in its own `warden serve` on the configured database.
    Ingest {
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 0)]
        metrics: usize,
        #[arg(long, default_value = "15s")]
        duration: crate::config::Duration,
        /// Load before measuring, to warm caches and connections.
        #[arg(long, default_value = "3s")]
        warmup: crate::config::Duration,
        /// Measure group commit only.
        #[arg(long)]
        skip_naive: bool,
    },
    /// One evaluation cycle over a seeded fleet (agents named bench-eval-*,
    /// removed afterwards), steady and with 10% of agents changing, against
    /// a per-agent-query baseline. Use a scratch database.
    Evaluate {
        /// Fleet sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
        agents: Vec<i64>,
        /// Skip the (slow) per-agent baseline.
        #[arg(long)]
        skip_baseline: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RecoveryCommand {
    /// Recovery actions, newest first.
    List {
        #[arg(long)]
        agent: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Recover an agent now, outside backoff and the attempt limit.
    Run {
        agent: String,
        /// Strategy to use; default: the first whose labels the agent has.
        #[arg(long)]
        strategy: Option<String>,
    },
    /// Let warden try again for an agent whose recovery gave up.
    Reset { agent: String },
    /// Stop an agent's automatic recovery: its waiting and verifying jobs
    /// end, its open incidents page without waiting for it.
    Cancel {
        agent: String,
        /// Who cancels (recorded); default: $USER.
        #[arg(long)]
        by: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it once; only its hash is stored.
    Create {
        /// Who or what the key is for, e.g. "fleet-eu" or "grafana".
        #[arg(long)]
        name: String,
        /// Scopes: ingest (send heartbeats and events), read, admin (all).
        /// Repeat or separate with commas.
        #[arg(long = "scope", value_delimiter = ',', default_value = "ingest")]
        scopes: Vec<Scope>,
        /// Agents the key may send heartbeats and events for: an agent id,
        /// or its start followed by `*` ("web-*"). Repeat or separate with
        /// commas; without it, any agent. Reads are not limited by it.
        #[arg(long = "agent", value_delimiter = ',', value_parser = auth::parse_agent_pattern)]
        agents: Vec<String>,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key by its number or key id.
    Revoke {
        /// The number (from `keys list`) or the key id.
        key: String,
    },
}

/// A failed command, sorted by exit status.
#[derive(Debug)]
pub enum Failure {
    /// Bad settings: exit 2.
    Settings(SettingsError),
    /// Bad usage of a verb: exit 2, the message as it is.
    Usage(String),
    /// Anything else: exit 1. `detail` follows the one-line message.
    Other { message: String, detail: Option<String> },
}

impl Failure {
    pub fn other(error: impl std::fmt::Display) -> Self {
        let text = error.to_string();
        let mut parts = text.splitn(2, '\n');
        let message = parts.next().unwrap_or_default().to_string();
        let detail = parts.next().map(str::to_string).filter(|d| !d.trim().is_empty());
        Self::Other { message, detail }
    }

    /// Bad usage of a verb (exit 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Self::Usage(message.into())
    }

    fn exit_code(&self) -> u8 {
        match self {
            Self::Settings(_) | Self::Usage(_) => 2,
            Self::Other { .. } => 1,
        }
    }

    fn report(&self) {
        match self {
            Self::Settings(e) => eprintln!("warden: {e}"),
            Self::Usage(message) => eprintln!("warden: {message}"),
            Self::Other { message, detail } => {
                eprintln!("warden: {message}");
                if let Some(detail) = detail {
                    eprintln!("{detail}");
                }
            }
        }
    }
}

impl From<SettingsError> for Failure {
    fn from(e: SettingsError) -> Self {
        Self::Settings(e)
    }
}

impl From<StartError> for Failure {
    fn from(e: StartError) -> Self {
        match e {
            StartError::Open(db::OpenError::Settings(s)) => Self::Settings(s),
            other => Self::other(other),
        }
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Rust ignores SIGPIPE, so printing to a closed pipe (`warden report
    // ... | head`) panics. The verbs that print and end die of it quietly
    // instead, as Unix tools do; those that run on (serve, agent, the load
    // generators) keep ignoring it, as a socket's peer closing is theirs
    // to handle.
    #[cfg(unix)]
    if matches!(
        cli.command,
        Command::Migrate
            | Command::Config
            | Command::Keys(_)
            | Command::Alerts(_)
            | Command::Silence(_)
            | Command::Report(_)
            | Command::Recovery(_)
            | Command::Agents(_)
    ) {
        // SAFETY: at start, before any thread: nothing else handles signals yet.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warden: could not start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            failure.report();
            ExitCode::from(failure.exit_code())
        }
    }
}

/// The logging settings of `warden agent`, which uses no others: on an
/// agent's host a bad setting meant for a server (in a shared environment,
/// a `WARDEN__` variable or `WARDEN_CONFIG`) is reported and passed over,
/// unless it is a logging one or the file is named by `--config`. The
/// logging variables are then read alone.
fn agent_telemetry(sources: &Sources, named_file: bool) -> Result<crate::config::TelemetrySettings, Failure> {
    let e = match Settings::load(sources) {
        Ok(settings) => return Ok(settings.telemetry),
        Err(e) => e,
    };
    if named_file || e.key.as_deref().is_some_and(|k| k == "telemetry" || k.starts_with("telemetry.")) {
        return Err(e.into());
    }
    eprintln!("warden: {}; `agent` does not use it and goes on", sources.locate(e));
    let prefix = format!("{}__TELEMETRY__", crate::config::ENV_PREFIX);
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with(&prefix))
        .collect();
    let logging = Sources { file: None, env: Some(env) };
    Settings::load(&logging).map(|s| s.telemetry).map_err(|e| Failure::Settings(logging.locate(e)))
}

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    let sources = Sources { file: override_file(cli.config.as_deref()), env: None };
    command(cli, &sources).await.map_err(|failure| match failure {
        Failure::Settings(e) => Failure::Settings(sources.locate(e)),
        other => other,
    })
}

async fn command(cli: Cli, sources: &Sources) -> Result<(), Failure> {
    // The load generator uses none of the server's settings, so a bad one
    // (a WARDEN__ variable meant for the server) must not stop it.
    let command = match cli.command {
        Command::Simulate(args) => return simulate(args).await,
        Command::Agent(args) => {
            telemetry::init(&agent_telemetry(sources, cli.config.is_some())?);
            let clients = crate::agent::check(&args).map_err(Failure::usage)?;
            return crate::agent::run(args, clients).await.map_err(Failure::other);
        }
        command => command,
    };
    let settings = Settings::load(sources)?;
    match command {
        Command::Config => {
            // A pre-flight check: what `serve` would refuse at start, this
            // refuses too, as far as it can be told without connecting.
            crate::db::check_settings(&settings.database)?;
            settings.recovery.check_secret_env()?;
            // The URL is redacted whole (its password may sit anywhere in
            // it); where it points is not a secret, and is what one checks.
            if !settings.database.url.is_empty() {
                let target = crate::db::parse_url(settings.database.url.expose())?;
                let user = target.get_user().map(|u| format!("user {} at ", u.escape_debug())).unwrap_or_default();
                println!("# database.url: {user}{}", crate::db::target_of(&target));
            }
            print!("{}", settings.to_redacted_toml());
            Ok(())
        }
        Command::Migrate => {
            telemetry::init(&settings.telemetry);
            migrate_command(&settings).await
        }
        Command::Serve => {
            settings.recovery.check_secret_env()?;
            telemetry::init(&settings.telemetry);
            serve(settings).await
        }
        Command::Keys(command) => with_database(&settings, |client| Box::pin(keys(client, command))).await,
        Command::Demo { agents } => {
            // No check_secret_env: the demo replaces the strategies with its own.
            if !(6..=10_000).contains(&agents) {
                return Err(Failure::usage("--agents must be from 6 to 10000"));
            }
            let mut quiet = settings.telemetry.clone();
            quiet.level = "warn,tokio_postgres=error".into();
            telemetry::init(&quiet);
            let shutdown = CancellationToken::new();
            tokio::spawn(forward_signals(shutdown.clone()));
            crate::demo::run(settings, crate::demo::DemoOptions { agents }, shutdown).await.map_err(Failure::other)
        }
        Command::Agent(_) | Command::Simulate(_) => unreachable!("run before the settings are loaded"),
        Command::Alerts(c) => with_database(&settings, |db| Box::pin(crate::alerting::cli::alerts(db, c))).await,
        Command::Silence(c) => with_database(&settings, |db| Box::pin(crate::alerting::cli::silence(db, c))).await,
        Command::Agents(AgentsCommand::Remove { agent, by }) => {
            let agent = crate::model::AgentId::parse(agent).map_err(|m| Failure::usage(format!("agent: {m}")))?;
            let by = by.unwrap_or_else(crate::alerting::cli::user);
            if !crate::model::is_actor_name(&by) {
                return Err(Failure::usage("--by: must be 1-128 characters, without control characters"));
            }
            with_database(&settings, |client| {
                Box::pin(async move {
                    let removed = crate::health::removal::remove(client, agent.as_str(), by.trim(), None)
                        .await
                        .map_err(Failure::other)?;
                    use crate::console::format::counted;
                    println!(
                        "{} removed: {} resolved, {} cancelled",
                        removed.agent_id,
                        counted(removed.incidents_resolved as i64, "open incident", "open incidents"),
                        counted(removed.recoveries_cancelled as i64, "queued recovery", "queued recoveries")
                    );
                    Ok(())
                })
            })
            .await
        }
        Command::Recovery(c) => {
            let recovery_settings = settings.recovery.clone();
            with_database(&settings, |db| Box::pin(recovery_command(db, recovery_settings, c))).await
        }
        Command::Report(args) => {
            use crate::report::Invocation;
            match Invocation::parse(args, &settings.reporting, chrono::Utc::now())? {
                Invocation::List => {
                    print!("{}", crate::report::list());
                    Ok(())
                }
                Invocation::Run(job) => with_database(&settings, |client| Box::pin(job.run(client))).await,
            }
        }
        Command::Bench(BenchCommand::Ingest { agents, connections, batch, metrics, duration, warmup, skip_naive }) => {
            if duration.get().is_zero() {
                return Err(Failure::usage("--duration must be longer than 0s"));
            }
            let bench = crate::bench::IngestBench {
                agents,
                connections,
                batch,
                metrics,
                duration: duration.get(),
                warmup: warmup.get(),
                skip_naive,
                config_file: sources.file.clone(),
            };
            with_database(&settings, |client| Box::pin(bench_ingest(client, bench))).await
        }
        Command::Bench(BenchCommand::Evaluate { agents, skip_baseline }) => {
            let params = crate::health::evaluator::EvalParams::from_settings(&settings.health);
            with_database(&settings, |client| {
                Box::pin(async move {
                    if agents.iter().any(|n| *n < 1) {
                        return Err(Failure::usage("--agents: fleet sizes must be at least 1"));
                    }
                    let rows = crate::bench::evaluate::run(client, &params, &agents, !skip_baseline)
                        .await
                        .map_err(Failure::other)?;
                    print!("{}", crate::bench::evaluate::render(&rows));
                    Ok(())
                })
            })
            .await
        }
    }
}

async fn simulate(args: SimulateArgs) -> Result<(), Failure> {
    let addr = resolve(&args.url).await?;
    if args.batch == 0 || args.connections == 0 || args.agents == 0 {
        return Err(Failure::usage("--batch, --connections and --agents must be at least 1"));
    }
    // A rate of zero would send one request and report its speed as the rate.
    if let Some(rate) = args.rate.filter(|r| !(r.is_finite() && *r > 0.0)) {
        return Err(Failure::usage(format!("--rate must be a positive number of heartbeats per second (got {rate})")));
    }
    if args.agents < args.batch {
        return Err(Failure::usage(format!(
            "--agents ({}) must be at least --batch ({}): a batch never names an agent twice",
            args.agents, args.batch
        )));
    }
    // Each connection owns a batch worth of agents at least (no agent in
    // two requests at once), so a small fleet gets fewer connections
    // rather than more agents than asked.
    let connections = args.connections.min(args.agents / args.batch);
    let spec = crate::loadgen::LoadSpec {
        addr,
        key: args.key,
        agents: args.agents,
        batch: args.batch,
        metrics: args.metrics,
        connections,
        rate: args.rate,
        duration: args.duration.get(),
        agent_prefix: "sim".into(),
        slow: args.slow.map(|d| d.get()),
    };
    eprintln!(
        "simulating {} agents over {} connections for {} (batch {}, {} metrics each)",
        crate::loadgen::simulated_agents(&spec),
        spec.connections,
        args.duration,
        spec.batch,
        spec.metrics
    );
    let report = crate::loadgen::run(spec).await.map_err(Failure::other)?;
    print!("{}", report.summary());
    // A run warden refused throughout (a missing or wrong key, a warden
    // that is down) measured nothing: say so in the exit status too.
    if report.heartbeats_ok == 0 {
        let errors: Vec<String> = report.errors.iter().map(|(e, n)| format!("{e} x{n}")).collect();
        return Err(Failure::other(format!("no heartbeat was taken ({})", errors.join(", "))));
    }
    Ok(())
}

/// host:port from `http://host:port[/...]` or `host:port`.
async fn resolve(url: &str) -> Result<std::net::SocketAddr, Failure> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    if rest.starts_with("https://") {
        return Err(Failure::usage("--url: the load generator speaks plain HTTP; point it at warden directly"));
    }
    let hostport = rest.split('/').next().unwrap_or(rest);
    let hostport = if hostport.contains(':') { hostport.to_string() } else { format!("{hostport}:80") };
    tokio::net::lookup_host(&hostport)
        .await
        .ok()
        .and_then(|mut a| a.next())
        // The name may be right and the resolver down: not a usage error.
        .ok_or_else(|| Failure::other(format!("--url: cannot resolve {hostport}")))
}

async fn bench_ingest(client: &mut db::Client, bench: crate::bench::IngestBench) -> Result<(), Failure> {
    let key = auth::create_key(client, "bench", &[Scope::Ingest]).await.map_err(Failure::other)?;
    eprintln!(
        "benchmarking ingest: {} connections, batch {}, {} metrics, {}s per phase",
        bench.connections,
        bench.batch,
        bench.metrics,
        bench.duration.as_secs()
    );
    let result = crate::bench::ingest(&bench, &key.token).await;
    let _ = auth::revoke_key(client, &key.key_id).await;
    let phases = result.map_err(Failure::other)?;
    print!("{}", crate::bench::render(&phases));
    Ok(())
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Opens the database (the embedded cluster too), brings an older schema
/// up to date when `database.migrate_on_start` allows, runs `work`, and
/// closes everything again. A schema that is current is left alone, so
/// these verbs also work on a read-only replica.
async fn with_database<F>(settings: &Settings, work: F) -> Result<(), Failure>
where
    F: for<'c> FnOnce(&'c mut db::Client) -> BoxFuture<'c, Result<(), Failure>>,
{
    let database = Database::open(&settings.database).await.map_err(|e| Failure::from(StartError::from(e)))?;
    let result = async {
        let mut client = db::client(&database.pool).await.map_err(|e| {
            let at = if e.is_unavailable() { format!(" (database.url: {})", database.target()) } else { String::new() };
            Failure::other(format!("{e}{at}"))
        })?;
        let found = migrate::current_version(&client).await.map_err(Failure::other)?;
        if found.is_none() && settings.database.url.is_empty() && settings.database.migrate_on_start {
            // The private cluster lives under the directory warden runs in:
            // a verb run elsewhere than `warden serve` gets one of its own,
            // and a key made there is unknown to the service.
            eprintln!(
                "warden: the private cluster at {} holds no warden schema yet; creating it. `warden serve` uses the \
                 cluster under the directory it runs in (database.data_dir): run this command there to share it",
                database.target()
            );
        }
        let latest = migrate::latest_version();
        if found.is_none_or(|v| v < latest) {
            if !settings.database.migrate_on_start {
                return Err(Failure::other(format!(
                    "the database schema is at version {}, this warden needs {latest}: run `warden migrate` \
                     (database.migrate_on_start is off)",
                    found.unwrap_or(0)
                )));
            }
            migrate::run(&mut client).await.map_err(Failure::other)?;
        } else {
            migrate::check_divergence(&client).await.map_err(Failure::other)?;
        }
        work(&mut client).await
    }
    .await;
    database.close().await;
    result
}

async fn recovery_command(
    client: &mut db::Client,
    settings: crate::config::RecoverySettings,
    command: RecoveryCommand,
) -> Result<(), Failure> {
    let agent_arg = |a: &str| crate::model::AgentId::parse(a).map_err(|m| Failure::usage(format!("agent: {m}")));
    match command {
        RecoveryCommand::List { agent, limit } => {
            let agent = agent.as_deref().map(agent_arg).transpose()?;
            if !(1..=10_000).contains(&limit) {
                return Err(Failure::usage("--limit must be from 1 to 10000"));
            }
            let rows = crate::recovery::history(client, agent.as_ref().map(|a| a.as_str()), None, None, limit)
                .await
                .map_err(Failure::other)?;
            let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_else(|| "-".into())
            };
            let mut table = vec![
                ["id", "agent", "incident", "strategy", "action", "attempt", "state", "started", "outcome"]
                    .map(String::from),
            ];
            for r in rows {
                table.push([
                    r.id.to_string(),
                    r.agent_id,
                    r.incident_id.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
                    r.strategy,
                    r.action,
                    r.attempt.to_string(),
                    r.state,
                    when(r.started_at),
                    r.outcome.unwrap_or_default(),
                ]);
            }
            print!("{}", crate::text_table::render(&table));
            Ok(())
        }
        RecoveryCommand::Run { agent, strategy } => {
            let agent = agent_arg(&agent)?;
            // The engine does not run then: a queued job would wait, unseen,
            // until recovery is switched on again, and restart the agent then.
            if !settings.enabled {
                return Err(Failure::other("recovery is disabled (recovery.enabled = false); nothing was queued"));
            }
            let job = crate::recovery::run_now(client, &settings, agent.as_str(), strategy.as_deref()).await.map_err(
                |e| match e {
                    crate::recovery::ManualError::UnknownStrategy(_)
                    | crate::recovery::ManualError::NoStrategy(_)
                    | crate::recovery::ManualError::AlertOnly(_) => Failure::usage(e.to_string()),
                    e => Failure::other(e),
                },
            )?;
            println!("recovery of {agent} queued as job {job}; `warden recovery list --agent {agent}` follows it");
            Ok(())
        }
        RecoveryCommand::Reset { agent } => {
            let agent = agent_arg(&agent)?;
            let n = crate::recovery::reset(client, agent.as_str()).await.map_err(Failure::other)?;
            if n == 0 {
                println!("{agent} had no recovery that gave up on an open incident; nothing to reset");
            } else {
                let jobs = crate::console::format::counted(n as i64, "recovery job", "recovery jobs");
                println!("{agent}: {jobs} will start again");
            }
            Ok(())
        }
        RecoveryCommand::Cancel { agent, by } => {
            let agent = agent_arg(&agent)?;
            let by = by.unwrap_or_else(crate::alerting::cli::user);
            if !crate::model::is_actor_name(&by) {
                return Err(Failure::usage("--by must be 1-128 characters, without control characters"));
            }
            let done = crate::recovery::cancel(client, agent.as_str(), &by).await.map_err(Failure::other)?;
            if done.jobs == 0 {
                println!("{agent} had no recovery waiting, running or verifying; nothing to cancel");
            } else {
                let jobs = crate::console::format::counted(done.jobs as i64, "recovery job", "recovery jobs");
                println!("{agent}: {jobs} cancelled; its open incidents page without waiting for a recovery");
            }
            Ok(())
        }
    }
}

async fn keys(client: &mut db::Client, command: KeysCommand) -> Result<(), Failure> {
    match command {
        KeysCommand::Create { name, scopes, agents } => {
            let name = name.trim();
            if name.is_empty() || name.chars().count() > 128 {
                return Err(Failure::usage("--name must be 1-128 characters"));
            }
            let mut scopes = scopes;
            scopes.sort();
            scopes.dedup();
            let mut agents = agents;
            agents.sort();
            agents.dedup();
            // The agents a key is held to bound what it reports; a key that
            // cannot report would carry a limit that limits nothing.
            if !agents.is_empty() && !scopes.iter().any(|s| matches!(s, Scope::Ingest | Scope::Admin)) {
                return Err(Failure::usage(
                    "--agent holds a key to the agents it may report for: it needs --scope ingest (or admin)",
                ));
            }
            let limited = (!agents.is_empty()).then_some(agents.as_slice());
            let key = auth::create_key_for(client, name, &scopes, limited).await.map_err(Failure::other)?;
            let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
            let reports = scopes.iter().any(|s| *s == "ingest" || *s == "admin");
            let reports_for = match (reports, agents.is_empty()) {
                (false, _) => String::new(),
                (true, true) => ", reporting for any agent".to_string(),
                (true, false) => format!(", reporting for {}", agents.join(",")),
            };
            eprintln!(
                "created key {} ({name}) with scopes {}{reports_for}; it is shown only this once:",
                key.id,
                scopes.join(",")
            );
            println!("{}", key.token);
            Ok(())
        }
        KeysCommand::List => {
            let keys = auth::list_keys(client).await.map_err(Failure::other)?;
            let mut rows =
                vec![["id", "key_id", "name", "scopes", "agents", "created", "last used", "revoked"].map(String::from)];
            let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map(|t| t.format("%Y-%m-%d %H:%M").to_string()).unwrap_or_else(|| "-".into())
            };
            for k in keys {
                rows.push([
                    k.id.to_string(),
                    k.key_id,
                    k.name,
                    k.scopes.join(","),
                    k.agents.map_or_else(|| "any".into(), |a| a.join(",")),
                    when(Some(k.created_at)),
                    when(k.last_used_at),
                    when(k.revoked_at),
                ]);
            }
            print!("{}", crate::text_table::render(&rows));
            Ok(())
        }
        KeysCommand::Revoke { key } => {
            if auth::revoke_key(client, &key).await.map_err(Failure::other)? {
                println!("revoked {key}; replicas stop accepting it within auth.cache_ttl");
                Ok(())
            } else {
                Err(Failure::other(format!("no active key {key}")))
            }
        }
    }
}

async fn serve(settings: Settings) -> Result<(), Failure> {
    let app = Application::build(settings).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(forward_signals(shutdown.clone()));
    app.run(shutdown).await.map_err(Failure::other)
}

async fn migrate_command(settings: &Settings) -> Result<(), Failure> {
    let database = Database::open(&settings.database).await.map_err(|e| Failure::from(StartError::from(e)))?;
    let result = async {
        let mut client = db::client(&database.pool).await.map_err(|e| {
            let at = if e.is_unavailable() { format!(" (database.url: {})", database.target()) } else { String::new() };
            Failure::other(format!("{e}{at}"))
        })?;
        migrate::run(&mut client).await.map_err(Failure::other)
    }
    .await;
    database.close().await;
    let outcome = result?;
    if outcome.applied.is_empty() {
        println!("schema already at version {}; nothing to apply", outcome.version);
    } else {
        for name in &outcome.applied {
            println!("applied {name}");
        }
        println!("schema now at version {}", outcome.version);
    }
    Ok(())
}

/// Cancels `token` on SIGINT or SIGTERM.
async fn forward_signals(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("received SIGINT"),
        _ = term => tracing::info!("received SIGTERM"),
    }
    token.cancel();
}
