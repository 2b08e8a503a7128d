//! Start-up and shutdown of `warden serve`.
//!
//! [`Application::build`] does everything that can fail before serving
//! (open the database, migrate, bind the port), so a misconfigured replica
//! exits at once instead of half-running. [`Application::run`] serves until
//! the shutdown token fires, then stops in order: stop accepting and stop
//! the loops that act (evaluation, recovery, alerting), let in-flight
//! requests finish, stop ingest's writer, close the pool, stop the
//! embedded cluster.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState};
use crate::auth::Authenticator;
use crate::config::Settings;
use crate::db::{self, Database, OpenError, migrate};
use crate::ingest::{Ingestor, WriterSettings};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("could not migrate the database: {0}")]
    Migrate(#[from] migrate::MigrateError),
    #[error("could not connect to the database to migrate it: {0}")]
    Connect(db::DbError),
    #[error("{0}")]
    Schema(migrate::MigrateError),
    #[error("could not listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(
        "the database schema is at version {found} but this warden needs {needed}: waiting for `warden migrate` \
         (or a replica with database.migrate_on_start)"
    )]
    SchemaBehind { found: i32, needed: i32 },
}

impl StartError {
    /// The database is not there, or not migrated, yet: worth waiting for.
    pub fn is_temporary(&self) -> bool {
        match self {
            // Waiting would hide a mistake in database.url behind 503s
            // (MigrateError::is_unavailable says the same of a refusal).
            Self::Connect(e) => e.is_unavailable() && !e.is_refusal(),
            // Another replica migrates: it will be done.
            Self::Migrate(migrate::MigrateError::Busy { .. }) => true,
            // The connection dropped while migrating or checking the schema.
            Self::Migrate(e) | Self::Schema(e) => e.is_unavailable(),
            Self::SchemaBehind { .. } => true,
            _ => false,
        }
    }
}

pub struct Application {
    settings: Arc<Settings>,
    database: Database,
    listener: TcpListener,
    local_addr: SocketAddr,
    /// When the database was migrated and checked at start (its clock); if
    /// not, it was unreachable and `run` waits for it.
    prepared: Option<DateTime<Utc>>,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        crate::alerting::tls::install_crypto_provider();
        let settings = Arc::new(settings);
        let database = Database::open(&settings.database).await?;
        // A database that is not there yet (starting beside warden, failing
        // over) is waited for while serving 503s; anything else (a refused
        // login, a schema from another build, a failed migration) needs an
        // operator, so the process exits saying what.
        let prepared = match prepare(&database, &settings).await {
            Ok(at) => Some(at),
            Err(e) if e.is_temporary() => {
                tracing::warn!(error = %e, database = %database.target(), "the database is not ready; serving 503 until it is");
                None
            }
            Err(e) => {
                database.close().await;
                return Err(e);
            }
        };
        if !settings.auth.enabled {
            tracing::warn!(
                "auth.enabled = false: every API call is accepted without a key; never do this in production"
            );
        }
        let console = &settings.console;
        if settings.auth.enabled
            && console.enabled
            && !console.secure_cookie
            && !settings.server.listen.ip().is_loopback()
        {
            tracing::warn!(
                listen = %settings.server.listen,
                "console.secure_cookie = false while listening beyond this machine: console session cookies may \
                 travel over plain HTTP; serve the console behind HTTPS and set console.secure_cookie = true"
            );
        }
        if console.enabled && console.public_status && console.status_groups.is_empty() {
            tracing::warn!(
                label = %console.status_group_label,
                "console.public_status = true with no console.status_groups: every value agents give their \
                 status label becomes a group on the public page, and whoever holds an ingest key can put text there; \
                 list the groups to publish in console.status_groups"
            );
        }
        let recovery = &settings.recovery;
        // Writing the outcome waits for a pooled connection, and a new one
        // may take connect_timeout on top of the wait for a free one.
        let db = &settings.database;
        let needed = crate::recovery::exec::AFTER_TIMEOUT + db.acquire_timeout.get() + db.connect_timeout.get();
        if recovery.enabled && recovery.lease_margin.get() < needed {
            tracing::warn!(
                lease_margin = ?recovery.lease_margin.get(),
                needed = ?needed,
                "recovery.lease_margin is shorter than a timed-out command may take to be killed and its outcome \
                 recorded ({:?} plus database.acquire_timeout and database.connect_timeout): such attempts may be \
                 recorded as abandoned",
                crate::recovery::exec::AFTER_TIMEOUT
            );
        }
        let health = &settings.health;
        // A score pass follows a liveness cycle, so it cannot come more often.
        if health.score_interval.get() < health.check_interval.get() {
            tracing::warn!(
                score_interval = ?health.score_interval.get(),
                check_interval = ?health.check_interval.get(),
                "health.score_interval is shorter than health.check_interval: scores are computed right after a \
                 liveness cycle, so only every check_interval"
            );
        }
        // Bound once the database is prepared: a socket listening while a
        // migration waits would take connections nobody answers (agents
        // hang rather than try elsewhere, a TCP check passes). An embedded
        // cluster started for a warden that cannot listen is stopped.
        let addr = settings.server.listen;
        let bound = TcpListener::bind(addr).await.and_then(|listener| Ok((listener.local_addr()?, listener)));
        let (local_addr, listener) = match bound {
            Ok(bound) => bound,
            Err(source) => {
                database.close().await;
                return Err(StartError::Bind { addr, source });
            }
        };
        Ok(Self { settings, database, listener, local_addr, prepared })
    }

    /// The connection pool `run` serves with, open until `run` returns.
    pub fn pool(&self) -> deadpool_postgres::Pool {
        self.database.pool.clone()
    }

    /// The bound address; with `listen = "127.0.0.1:0"` the port chosen.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` is cancelled, then drains and cleans up.
    pub async fn run(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let Self { settings, database, listener, local_addr, prepared } = self;
        let background = CancellationToken::new();
        // The loops that decide and act (evaluation, recovery, alerting,
        // retention) stop as soon as shutdown begins: a stopping replica
        // must not open incidents, restart agents or send pages while
        // in-flight requests drain. Ingest's writer, the stream listener
        // and an embedded cluster serve those requests, so they stop with
        // `background`, after the drain.
        let loops = background.child_token();
        let tasks = TaskTracker::new();
        let started = Arc::new(AtomicBool::new(prepared.is_some()));
        let ingestor = Ingestor::start(database.pool.clone(), &writer_settings(&settings), background.clone(), &tasks);
        let auth =
            Arc::new(Authenticator::new(database.pool.clone(), settings.auth.enabled, settings.auth.cache_ttl.get()));
        let hub = Arc::new(crate::stream::Hub::default());
        {
            let (pg_config, tls, hub, stop) =
                (database.pg_config.clone(), database.tls.clone(), hub.clone(), background.clone());
            let max_lifetime = db::max_lifetime(&settings.database);
            crate::supervise::spawn(&tasks, "stream", &background, move || {
                crate::stream::listen(pg_config.clone(), tls.clone(), hub.clone(), max_lifetime, stop.clone())
            });
        }
        if let Some(cluster) = database.embedded() {
            let stop = background.clone();
            crate::supervise::spawn(&tasks, "embedded_cluster", &background, move || {
                keep_embedded_running(cluster.clone(), stop.clone())
            });
        }
        let outage_watch = ingestor.outage_watch();
        let state =
            AppState::new(database.pool.clone(), settings.clone(), auth, ingestor, hub.clone(), started.clone());
        let app = api::router(state);
        let database = Arc::new(database);
        // Set when the database answered with something only an operator
        // can fix while warden waited for it: the process stops with it.
        let fatal = Arc::new(std::sync::OnceLock::<String>::new());
        {
            let (settings, database, tasks_in, stop) =
                (settings.clone(), database.clone(), tasks.clone(), loops.clone());
            let (shutdown, fatal) = (shutdown.clone(), fatal.clone());
            tasks.spawn(async move {
                let serving_since = match prepared {
                    Some(at) => at,
                    None => match wait_until_prepared(&database, &settings, &stop).await {
                        Ok(Some(at)) => at,
                        Ok(None) => return,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start; stopping");
                            let _ = fatal.set(e.to_string());
                            shutdown.cancel();
                            return;
                        }
                    },
                };
                let serving = Serving { local_addr, since: serving_since, ingest: outage_watch };
                start_background(&settings, &database, serving, &stop, &tasks_in);
                started.store(true, Ordering::Release);
            });
        }
        tracing::info!(addr = %local_addr, "warden is serving");

        let grace = settings.server.shutdown_timeout.get();
        let drained = {
            let (shutdown, hub, loops) = (shutdown.clone(), hub.clone(), loops.clone());
            async move {
                shutdown.cancelled().await;
                tracing::info!("shutting down: no new connections, draining in-flight requests");
                loops.cancel();
                hub.close();
            }
        };
        // hyper's own loop rather than axum::serve: it needs a header read
        // timeout and the peer address (api::serve).
        let server = api::serve(listener, app, settings.server.header_read_timeout.get(), drained);
        let served = tokio::select! {
            result = server => result,
            // Keep-alive or streaming clients may never leave on their own.
            _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!("in-flight requests did not finish within the shutdown timeout");
                Ok(())
            }
        };

        background.cancel();
        tasks.close();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            tracing::warn!("background tasks did not stop within the shutdown timeout");
        }
        // A task that outlived the grace period may still hold it; the
        // embedded cluster is stopped all the same (the task's queries fail).
        database.close().await;
        tracing::info!("warden stopped");
        match fatal.get() {
            Some(e) => Err(std::io::Error::other(e.clone())),
            None => served,
        }
    }
}

/// The database steps before serving: migrations (or the divergence check),
/// the settings the SQL ingest path reads, and what is worth a log line.
///
/// Returns the database's clock once done: heartbeats this process takes
/// are stored after it, which tells a restart from a failover (see
/// `evaluator::Replica`).
async fn prepare(database: &Database, settings: &Settings) -> Result<DateTime<Utc>, StartError> {
    if settings.database.migrate_on_start {
        let mut client = db::client(&database.pool).await.map_err(StartError::Connect)?;
        // Another replica's migration is waited out while serving 503s,
        // not with the port closed (a closed port for the length of a long
        // migration fails a liveness probe).
        let outcome = migrate::run_unless_busy(&mut client, settings.database.connect_timeout.get()).await?;
        if !outcome.applied.is_empty() {
            tracing::info!(applied = ?outcome.applied, version = outcome.version, "database migrated");
        }
    }
    let client = db::client(&database.pool).await.map_err(StartError::Connect)?;
    if !settings.database.migrate_on_start {
        // Another replica or `warden migrate` brings the schema up to date
        // (serve waits for it, answering 503); one migrated by a different
        // build is refused, as `warden migrate` would.
        migrate::check_divergence(&client).await.map_err(StartError::Schema)?;
        let found = migrate::current_version(&client).await.map_err(StartError::Connect)?.unwrap_or(0);
        let needed = migrate::latest_version();
        if found < needed {
            return Err(StartError::SchemaBehind { found, needed });
        }
    }
    sync_mode_intervals(&client, settings).await.map_err(StartError::Connect)?;
    warn_without_autovacuum(&client).await;
    report_tls(&client, &database.pg_config).await;
    let now = client.query_one("SELECT now()", &[]).await.map_err(|e| StartError::Connect(e.into()))?;
    Ok(now.get(0))
}

/// Retries [`prepare`] while the database is not ready: its clock once it
/// is done, `None` when stopped first, the error when the database answers
/// with something only an operator can fix.
async fn wait_until_prepared(
    database: &Database,
    settings: &Settings,
    stop: &CancellationToken,
) -> Result<Option<DateTime<Utc>>, StartError> {
    let mut waits = crate::every::retry_waits(Duration::from_millis(250), Duration::from_secs(5));
    let mut wait = waits.next().unwrap_or_default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            _ = tokio::time::sleep(wait) => {}
        }
        match prepare(database, settings).await {
            Ok(at) => {
                tracing::info!("the database answers; starting evaluation, recovery and alerting");
                return Ok(Some(at));
            }
            Err(e) if e.is_temporary() => {
                wait = waits.next().unwrap_or_default();
                tracing::warn!(error = %e, database = %database.target(), retry_in = ?wait, "the database is still not ready");
            }
            Err(e) => return Err(e),
        }
    }
}

/// What the background loops know of the replica serving.
struct Serving {
    local_addr: SocketAddr,
    /// When it began taking heartbeats (the database's clock).
    since: DateTime<Utc>,
    ingest: crate::ingest::writer::OutageWatch,
}

/// The loops that need a migrated database: evaluation, recovery,
/// retention, partition upkeep and alerting.
fn start_background(
    settings: &Settings,
    database: &Database,
    serving: Serving,
    stop: &CancellationToken,
    tasks: &TaskTracker,
) {
    let local_addr = serving.local_addr;
    let ping = Some(settings.telemetry.self_heartbeat_url.expose().to_string()).filter(|u| !u.is_empty());
    {
        let (pool, params, replica, stop_) = (
            database.pool.clone(),
            crate::health::evaluator::EvalParams::from_settings(&settings.health),
            replica_name(local_addr),
            stop.clone(),
        );
        let leadership = crate::health::evaluator::Leadership {
            serving_since: Some(serving.since),
            ping,
            max_lifetime: db::max_lifetime(&settings.database),
            ingest: Some(serving.ingest),
        };
        crate::supervise::spawn(tasks, "evaluator", stop, move || {
            crate::health::evaluator::run_with(
                pool.clone(),
                params.clone(),
                replica.clone(),
                leadership.clone(),
                stop_.clone(),
            )
        });
    }
    if settings.recovery.enabled {
        let engine = crate::recovery::engine::Engine::new(
            database.pool.clone(),
            settings.recovery.clone(),
            &settings.health,
            replica_name(local_addr),
        );
        // Half the grace for actions to finish; the rest to record them.
        let (stop_, drain) = (stop.clone(), settings.server.shutdown_timeout.get() / 2);
        crate::supervise::spawn(tasks, "recovery", stop, move || engine.clone().run(stop_.clone(), drain));
    }
    if settings.retention.enabled {
        let (pool, retention, stop_) = (database.pool.clone(), settings.retention.clone(), stop.clone());
        crate::supervise::spawn(tasks, "retention", stop, move || {
            crate::retention::run(pool.clone(), retention.clone(), stop_.clone())
        });
    }
    {
        let (pool, ahead_days, stop_) = (database.pool.clone(), settings.database.partitions_ahead_days, stop.clone());
        crate::supervise::spawn(tasks, "partitions", stop, move || {
            partition_upkeep(pool.clone(), ahead_days, stop_.clone())
        });
    }

    // Half the grace for alert sends under way to finish and be recorded.
    if let Err(e) = crate::alerting::start(
        database.pool.clone(),
        &settings.alerting,
        replica_name(local_addr),
        stop.clone(),
        settings.server.shutdown_timeout.get() / 2,
        tasks,
    ) {
        tracing::error!(error = %e, "alerting could not start; alerts are recorded but not sent");
    }
}

fn writer_settings(settings: &Settings) -> WriterSettings {
    WriterSettings {
        writers: settings.ingest.writers,
        queue_capacity: settings.ingest.queue_capacity,
        max_flush: settings.ingest.max_flush,
        group_commit: settings.ingest.group_commit,
        max_lifetime: db::max_lifetime(&settings.database),
    }
}

/// Publishes [health.modes], the health figures ingest keeps and the
/// ingest limits to the database, where the SQL ingest path (shared by
/// HTTP and `warden.record_heartbeat`) reads them.
async fn sync_mode_intervals(client: &tokio_postgres::Client, settings: &Settings) -> Result<(), db::DbError> {
    let health = &settings.health;
    let mut modes: Vec<&str> = vec!["default"];
    let mut millis: Vec<i32> = vec![clamp_ms(health.default_interval)];
    for mode in crate::model::Mode::ALL {
        modes.push(mode.as_str());
        millis.push(clamp_ms(health.modes.get(*mode)));
    }
    client
        .execute(
            "INSERT INTO warden.mode_intervals (mode, interval_ms) SELECT * FROM unnest($1::text[], $2::int[]) \
             ON CONFLICT (mode) DO UPDATE SET interval_ms = EXCLUDED.interval_ms \
             WHERE warden.mode_intervals.interval_ms IS DISTINCT FROM EXCLUDED.interval_ms",
            &[&modes, &millis],
        )
        .await?;
    // With the limits warden.record_heartbeat holds SQL heartbeats to, as
    // POST /v1/heartbeats holds its own.
    let ingest = &settings.ingest;
    let skew_ms = i64::try_from(ingest.max_clock_skew.get().as_millis()).unwrap_or(i64::MAX);
    client
        .execute(
            "UPDATE warden.health_params SET jitter_tolerance = $1, offline_after_missed = $2, \
               max_metrics = $3, max_labels = $4, max_clock_skew_ms = $5, degraded_after_missed = $6, \
               detector = $7, phi_min_samples = $8 \
             WHERE (jitter_tolerance, offline_after_missed, max_metrics, max_labels, max_clock_skew_ms, \
                    degraded_after_missed, detector, phi_min_samples) \
                   IS DISTINCT FROM ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &health.jitter_tolerance,
                &(health.offline_after_missed as i32),
                &(ingest.max_metrics as i32),
                &(ingest.max_labels as i32),
                &skew_ms,
                &(health.degraded_after_missed as i32),
                &health.detector.as_str(),
                &(health.phi_min_samples as i32),
            ],
        )
        .await?;
    // Statistics for these tiny tables keep the ingest plan on index
    // lookups (see migrations/V9__ingest_locks_and_plans.sql). Without ownership
    // PostgreSQL skips them with a warning, not an error.
    client.batch_execute("ANALYZE warden.health_params, warden.mode_intervals").await?;
    Ok(())
}

/// agent_status is updated with every heartbeat; without autovacuum its
/// dead rows and stale statistics pile up and every statement on it slows
/// down. warden does not vacuum for the operator, but says so.
async fn warn_without_autovacuum(client: &tokio_postgres::Client) {
    if let Ok(row) = client.query_one("SELECT current_setting('autovacuum')", &[]).await
        && row.get::<_, String>(0) == "off"
    {
        tracing::warn!(
            "PostgreSQL runs with autovacuum = off: warden's tables (agent_status above all, updated by every \
             heartbeat) will bloat and slow down; turn it on or vacuum them on a schedule (docs/operations.md)"
        );
    }
}

/// Says whether the connection to PostgreSQL is encrypted, and warns when
/// it crosses a network in the clear.
async fn report_tls(client: &tokio_postgres::Client, pg_config: &tokio_postgres::Config) {
    let Ok(row) = client.query_one("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await
    else {
        return;
    };
    let (encrypted, version): (bool, Option<String>) = (row.get(0), row.get(1));
    let remote = pg_config.get_hosts().iter().any(|host| match host {
        tokio_postgres::config::Host::Tcp(name) => {
            name != "localhost" && !name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        tokio_postgres::config::Host::Unix(_) => false,
    });
    if encrypted {
        tracing::info!(tls = version.as_deref().unwrap_or("yes"), "connected to PostgreSQL over TLS");
    } else if remote {
        tracing::warn!(
            "the connection to PostgreSQL is not encrypted: add sslmode=require to database.url (and set \
             database.tls_verify = \"full\" on a network you do not control)"
        );
    }
}

/// How this process names itself as evaluator leader: host, pid and port.
fn replica_name(addr: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "warden".into());
    format!("{host}:{}:{}", std::process::id(), addr.port())
}

fn clamp_ms(d: crate::config::Duration) -> i32 {
    i32::try_from(d.as_millis_u64()).unwrap_or(i32::MAX)
}

/// Checks every few seconds that the embedded cluster runs, and starts it
/// again if it does not; meanwhile requests are answered 503, and the pool
/// reconnects by itself once it is back.
async fn keep_embedded_running(cluster: db::embedded::EmbeddedCluster, stop: CancellationToken) {
    let mut every = crate::every::Every::new(std::time::Duration::from_secs(5), &stop);
    while every.tick().await {
        match cluster.revive().await {
            Ok(true) => tracing::warn!("the embedded PostgreSQL was not running; started it again"),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "the embedded PostgreSQL is not running and could not be started"),
        }
    }
}

/// Keeps daily partitions created ahead of time; runs at start and hourly.
async fn partition_upkeep(pool: deadpool_postgres::Pool, ahead_days: u32, stop: CancellationToken) {
    let mut every = crate::every::Every::new(std::time::Duration::from_secs(3600), &stop);
    while every.tick().await {
        let result = async {
            let client = db::client(&pool).await?;
            db::ensure_partitions(&client, ahead_days).await
        }
        .await;
        match result {
            Ok(0) => {}
            Ok(created) => tracing::info!(created, "created partitions ahead"),
            Err(e) => tracing::warn!(error = %e, "partition upkeep failed; will retry in an hour"),
        }
    }
}
