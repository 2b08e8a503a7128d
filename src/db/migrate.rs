//! Schema migrations, embedded in the binary from `migrations/`.

use tokio_postgres::Client;

use super::DbError;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Where refinery records applied versions. It lives in our schema so that
/// one `DROP SCHEMA warden CASCADE` removes every trace of warden.
const HISTORY_TABLE: &str = "warden.refinery_schema_history";

/// Advisory lock key serialising migrations across replicas ("warden:m").
const MIGRATION_LOCK: i64 = 0x7761_7264_656e_3a6d;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("migration failed: {0}")]
    Refinery(#[from] refinery::Error),
    #[error("PostgreSQL {MIN_SERVER_MAJOR} or newer is required; this server is {0}")]
    UnsupportedServer(String),
    #[error(
        "the database was migrated by a different build of warden: its {} differ from this binary's; \
         run the build that migrated it",
        .0.join(", ")
    )]
    Divergent(Vec<String>),
    #[error("another session is migrating the database ({holder}): waited {waited:?} for it")]
    Busy { holder: String, waited: std::time::Duration },
}

impl MigrateError {
    /// The database went away or cannot be reached (a failover during
    /// start-up): worth waiting for, unlike a failed migration or a refused
    /// login. refinery's errors keep the driver's error as their source.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Db(e) => e.is_unavailable() && !e.is_refusal(),
            Self::Refinery(e) => {
                let mut source = std::error::Error::source(e);
                while let Some(cause) = source {
                    if let Some(pg) = cause.downcast_ref::<tokio_postgres::Error>() {
                        return crate::db::is_connectivity_error(pg);
                    }
                    if cause.is::<std::io::Error>() {
                        return true;
                    }
                    source = cause.source();
                }
                false
            }
            Self::UnsupportedServer(_) | Self::Divergent(_) | Self::Busy { .. } => false,
        }
    }
}

/// The oldest PostgreSQL major version warden runs on: retention detaches
/// expired partitions with `DETACH PARTITION ... CONCURRENTLY` (14).
pub const MIN_SERVER_MAJOR: i32 = 14;

/// Refuses a server older than [`MIN_SERVER_MAJOR`], given its
/// `server_version_num` and `server_version` settings.
pub fn check_server_version(version_num: i32, version: &str) -> Result<(), MigrateError> {
    if version_num / 10_000 < MIN_SERVER_MAJOR {
        return Err(MigrateError::UnsupportedServer(version.to_string()));
    }
    Ok(())
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e.into())
    }
}

/// The outcome of a migration run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Names of the migrations this run applied, oldest first.
    pub applied: Vec<String>,
    /// Schema version after the run.
    pub version: i32,
}

/// The newest schema version this binary knows.
pub fn latest_version() -> i32 {
    embedded::migrations::runner().get_migrations().iter().map(|m| m.version()).max().unwrap_or(0)
}

/// A fingerprint of every embedded migration (version and checksum), so a
/// test template database is rebuilt whenever any migration changes.
pub fn fingerprint() -> u64 {
    embedded::migrations::runner().get_migrations().iter().fold(0xcbf2_9ce4_8422_2325_u64, |acc, m| {
        (acc ^ m.checksum() ^ u64::from(m.version() as u32)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Applies pending migrations in one transaction. Replicas starting together
/// take turns on an advisory lock, so exactly one of them does the work.
/// A database a newer build migrated is left as it is (see `run_locked`).
pub async fn run(client: &mut Client) -> Result<Applied, MigrateError> {
    run_within(client, None).await
}

/// As [`run`], but gives up with [`MigrateError::Busy`] once another
/// session has kept the migration lock for `wait`: `serve` answers 503
/// meanwhile rather than leave its port closed for as long as another
/// replica's migration takes.
pub async fn run_unless_busy(client: &mut Client, wait: std::time::Duration) -> Result<Applied, MigrateError> {
    run_within(client, Some(wait)).await
}

async fn run_within(client: &mut Client, wait: Option<std::time::Duration>) -> Result<Applied, MigrateError> {
    // Neither waiting for another replica's migration nor a migration that
    // rewrites a large table may be cut short by the pool's statement
    // timeout: a replica would fail to start while another migrates, and
    // a long upgrade could never finish. (Migrations that take locks on
    // busy tables bound that wait themselves with lock_timeout.)
    client.batch_execute("SET statement_timeout = 0").await?;
    let result = run_unbounded(client, wait).await;
    // Back to the session's own default for whoever uses the connection next.
    let reset = client.batch_execute("RESET statement_timeout").await;
    let applied = result?;
    reset?;
    Ok(applied)
}

async fn run_unbounded(client: &mut Client, wait: Option<std::time::Duration>) -> Result<Applied, MigrateError> {
    lock(client, wait).await?;
    let result = run_locked(client).await;
    // The lock is session-scoped; release it even when the run failed so a
    // pooled connection never keeps it.
    let unlock = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    let applied = result?;
    unlock?;
    Ok(applied)
}

/// Takes the migration lock: at once when it is free; else says who holds
/// it (a wait behind a long migration is otherwise silent) and waits for
/// it, at most `wait` when given.
async fn lock(client: &Client, wait: Option<std::time::Duration>) -> Result<(), MigrateError> {
    let free: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK]).await?.get(0);
    if free {
        return Ok(());
    }
    let holder = match lock_holder(client).await {
        Ok(Some(holder)) => holder,
        // Released in between, or not visible to this role.
        Ok(None) | Err(_) => "a session this role cannot see".to_string(),
    };
    let Some(wait) = wait else {
        tracing::info!(%holder, "another session is migrating the database; waiting for it to finish");
        client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
        return Ok(());
    };
    // Advisory locks honour lock_timeout. Set for the session (there is no
    // transaction to scope it to) and reset whatever the outcome.
    let millis = format!("{}ms", wait.as_millis().max(1));
    client.execute("SELECT set_config('lock_timeout', $1, false)", &[&millis]).await?;
    let taken = client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await;
    client.batch_execute("RESET lock_timeout").await?;
    match taken {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
            Err(MigrateError::Busy { holder, waited: wait })
        }
        Err(e) => Err(e.into()),
    }
}

/// Who holds the migration lock, in words: its backend's pid, application
/// and client address, and how long its current statement has run (what
/// this role may see of another role's session: without
/// pg_read_all_stats, only the pid).
async fn lock_holder(client: &Client) -> Result<Option<String>, tokio_postgres::Error> {
    // A bigint advisory key is kept as classid (high half) and objid (low
    // half), objsubid 1. client_port is -1 for a Unix socket, NULL when
    // hidden from this role.
    let row = client
        .query_opt(
            "SELECT a.pid, coalesce(nullif(a.application_name, ''), 'application hidden or unnamed'), \
                    CASE WHEN a.client_port = -1 THEN 'local socket' \
                         ELSE coalesce(host(a.client_addr), 'an address hidden from this role') END, \
                    coalesce(round(extract(epoch FROM now() - a.query_start))::text || 's', 'a time hidden') \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND l.classid::bigint = ($1::bigint >> 32) AND l.objid::bigint = ($1::bigint & 4294967295)",
            &[&MIGRATION_LOCK],
        )
        .await?;
    Ok(row.map(|r| {
        let (pid, application, address, running): (i32, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        format!("pid {pid}, {application} from {address}, its statement running for {running}")
    }))
}

async fn run_locked(client: &mut Client) -> Result<Applied, MigrateError> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int, current_setting('server_version')", &[])
        .await?;
    check_server_version(row.get(0), row.get(1))?;
    // A newer build migrated the database (a rolling upgrade under way, or
    // this binary rolled back to): the schema only ever grows by adding,
    // so this one runs on it as it is, as long as every migration it knows
    // is the one applied. refinery would refuse the versions it lacks.
    let latest = latest_version();
    if let Some(version) = current_version(client).await?.filter(|v| *v > latest) {
        check_divergence(client).await?;
        tracing::warn!(
            schema = version,
            binary = latest,
            "the database was migrated by a newer warden; leaving its schema as it is"
        );
        return Ok(Applied { applied: Vec::new(), version });
    }
    // Only when missing: CREATE SCHEMA IF NOT EXISTS needs CREATE on the
    // database even when the schema exists, which a role that owns the
    // schema but not the database (provisioned by a DBA) lacks.
    let missing: bool = client.query_one("SELECT to_regnamespace('warden') IS NULL", &[]).await?.get(0);
    if missing {
        client.batch_execute("CREATE SCHEMA IF NOT EXISTS warden").await?;
    }
    let report = embedded::migrations::runner()
        .set_grouped(true)
        .set_abort_divergent(true)
        .set_migration_table_name(HISTORY_TABLE)
        .run_async(client)
        .await?;
    let applied = report.applied_migrations().iter().map(|m| m.to_string()).collect();
    let version = current_version(client).await?.unwrap_or(0);
    Ok(Applied { applied, version })
}

/// Migrations recorded in the database that this binary knows by another
/// name or content: the database was migrated by a build whose migration
/// of the same version differs. `warden migrate` refuses such a database
/// (refinery's divergence check); this reads the same thing without
/// writing, for verbs that leave a current schema alone.
pub async fn divergent(client: &Client) -> Result<Vec<String>, DbError> {
    if !history_exists(client).await? {
        return Ok(Vec::new());
    }
    let rows =
        client.query(&format!("SELECT version, name, checksum FROM {HISTORY_TABLE} ORDER BY version"), &[]).await?;
    let runner = embedded::migrations::runner();
    let known = runner.get_migrations();
    Ok(rows
        .iter()
        .filter_map(|row| {
            let (version, name, checksum): (i32, Option<String>, Option<String>) = (row.get(0), row.get(1), row.get(2));
            let ours = known.iter().find(|m| m.version() == version)?;
            // The checksum covers the version, the name and the SQL.
            let same = checksum.as_deref() == Some(&ours.checksum().to_string());
            (!same).then(|| format!("V{version}__{}", name.unwrap_or_default()))
        })
        .collect())
}

/// Whether any migration was ever recorded (the history table exists).
async fn history_exists(client: &Client) -> Result<bool, DbError> {
    Ok(client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&HISTORY_TABLE]).await?.get(0))
}

/// Refuses a database with [`divergent`] migrations.
pub async fn check_divergence(client: &Client) -> Result<(), MigrateError> {
    let divergent = divergent(client).await?;
    if divergent.is_empty() { Ok(()) } else { Err(MigrateError::Divergent(divergent)) }
}

/// The schema version recorded in the database, `None` before any migration.
pub async fn current_version(client: &Client) -> Result<Option<i32>, DbError> {
    if !history_exists(client).await? {
        return Ok(None);
    }
    let row = client.query_one(&format!("SELECT max(version) FROM {HISTORY_TABLE}"), &[]).await?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_older_than_14_are_refused_by_name() {
        let refused = check_server_version(130_011, "13.11 (Debian 13.11-1)").unwrap_err();
        assert_eq!(refused.to_string(), "PostgreSQL 14 or newer is required; this server is 13.11 (Debian 13.11-1)");
        assert!(check_server_version(140_000, "14.0").is_ok());
        assert!(check_server_version(150_004, "15.4").is_ok());
    }
}
