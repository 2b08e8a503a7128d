//! PostgreSQL access: the connection pool, the embedded cluster used when no
//! URL is configured, schema migrations and partition upkeep.

pub mod embedded;
pub mod migrate;
pub mod tls;

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;

use crate::config::{DatabaseSettings, SettingsError};
use embedded::{EmbeddedCluster, EmbeddedError};

/// A pooled connection.
pub type Client = deadpool_postgres::Object;

/// Everything that can go wrong talking to PostgreSQL, sorted by what the
/// caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database cannot be reached or is shutting down: retry later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The server is there but refuses warden's login (a rotated password,
    /// a role that may no longer log in, a changed `pg_hba.conf`, CONNECT
    /// revoked). Unavailable while serving, since it may be fixed without
    /// touching warden; at start-up, a mistake to report rather than wait
    /// out.
    #[error("the database refuses warden's login: {0}")]
    LoginRefused(String),
    /// The server's TLS certificate failed verification (signed by another
    /// CA, for another name, expired): treated as a refused login, an
    /// outage while serving and a mistake to report at start-up.
    #[error("warden does not trust the database's TLS certificate: {0}")]
    Untrusted(String),
    /// A statement failed for a reason retrying will not fix.
    #[error("database error: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
    /// The database answered something warden's own schema rules out.
    #[error("inconsistent answer from the database: {0}")]
    Inconsistent(String),
    /// The database is there but could not do it now (a deadlock, a lock
    /// or a statement that took too long): retry later.
    #[error("database busy: {0}")]
    Busy(String),
    /// warden's tables or schema are not there (the database was replaced
    /// or restored under a running warden), seen moments ago by another
    /// request and repeated.
    #[error("{0}")]
    SchemaMissing(String),
    /// A failure other than unavailability, seen moments ago by another
    /// request doing the same work and repeated rather than retried.
    #[error("{0}")]
    Repeated(String),
}

/// tokio-postgres prints a server error as just "db error"; the server's
/// message, detail and hint are what an operator needs.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} ({})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; {detail}"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

impl DbError {
    /// This failure again, for a request that waited on the one that saw
    /// it: of the same kind, so that it gets the same answer (503 with
    /// Retry-After for an unreachable, busy or unmigrated database, 500
    /// for anything else).
    pub fn again(&self) -> DbError {
        match self {
            Self::Unavailable(m) => Self::Unavailable(m.clone()),
            e => e.again_saying(e.to_string()),
        }
    }

    /// A failure of this one's kind (see [`DbError::again`]) that says `why`.
    pub fn again_saying(&self, why: String) -> DbError {
        match self {
            e if e.is_unavailable() => Self::Unavailable(why),
            e if e.is_transient() => Self::Busy(why),
            e if e.is_schema_missing() => Self::SchemaMissing(why),
            _ => Self::Repeated(why),
        }
    }

    /// The server turns warden away (its login, or warden its
    /// certificate): an outage while serving, a mistake to report at
    /// start-up rather than wait out.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::LoginRefused(_) | Self::Untrusted(_))
    }

    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Unavailable(_) | Self::LoginRefused(_) | Self::Untrusted(_) => true,
            Self::Query(e) => is_connectivity_error(e),
            Self::Busy(_) | Self::Inconsistent(_) | Self::SchemaMissing(_) | Self::Repeated(_) => false,
        }
    }

    /// A statement met no table, or no schema, of warden's: the database
    /// lost its migrations (replaced or restored under a running warden),
    /// which `warden migrate` fixes, not a retry of the same request alone.
    /// Only these two: a missing column or function (42703, 42883, the
    /// latter also "operator does not exist") is as likely a mistake in a
    /// statement, which must stay a 500 rather than be retried forever.
    pub fn is_schema_missing(&self) -> bool {
        match self {
            Self::SchemaMissing(_) => true,
            Self::Query(e) => matches!(e.code(), Some(&SqlState::UNDEFINED_TABLE | &SqlState::INVALID_SCHEMA_NAME)),
            _ => false,
        }
    }

    /// A failure the same statement may not meet if tried again later.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Busy(_) => true,
            Self::Query(e) => is_transient_error(e),
            Self::Unavailable(_)
            | Self::LoginRefused(_)
            | Self::Untrusted(_)
            | Self::Inconsistent(_)
            | Self::SchemaMissing(_)
            | Self::Repeated(_) => false,
        }
    }
}

/// Deadlocks, serialization failures, locks not granted, statements
/// cancelled (statement_timeout above all) and a server out of disk or
/// memory: the server is there, and the same work may succeed later.
pub fn is_transient_error(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(
            &SqlState::T_R_DEADLOCK_DETECTED
                | &SqlState::T_R_SERIALIZATION_FAILURE
                | &SqlState::LOCK_NOT_AVAILABLE
                | &SqlState::QUERY_CANCELED
                | &SqlState::DISK_FULL
                | &SqlState::OUT_OF_MEMORY
        )
    )
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::PoolError as P;
        match e {
            P::Backend(e) if is_login_refused(&e) => Self::LoginRefused(describe(&e)),
            P::Backend(e) if is_certificate_refused(&e) => Self::Untrusted(describe(&e)),
            P::Backend(e) if !is_connectivity_error(&e) => Self::Query(e),
            P::Backend(e) => Self::Unavailable(describe(&e)),
            // Create: no connection could be opened (a server that accepts
            // but never answers); Wait: the pool was busy.
            P::Timeout(deadpool_postgres::TimeoutType::Create) => {
                Self::Unavailable("no connection could be opened within database.connect_timeout".into())
            }
            P::Timeout(_) => Self::Unavailable("no database connection became free in time".into()),
            other => Self::Unavailable(other.to_string()),
        }
    }
}

/// A connection attempt the server turned away for who is asking: a wrong
/// password, no `pg_hba.conf` entry, a role without LOGIN, or CONNECT
/// revoked on the database (the only place 42501 can meet a new connection).
pub fn is_login_refused(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(
            &SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                | &SqlState::INVALID_PASSWORD
                | &SqlState::INSUFFICIENT_PRIVILEGE
        )
    )
}

/// A TLS handshake warden ended because the server's certificate failed
/// verification. rustls's error arrives inside an I/O error, whose
/// `source()` skips it, hence the look at each I/O error's own inner one.
pub fn is_certificate_refused(e: &tokio_postgres::Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let wrapped = c.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref());
        let candidates = [Some(c), wrapped.map(|w| w as &(dyn std::error::Error + 'static))];
        if candidates
            .into_iter()
            .flatten()
            .any(|c| matches!(c.downcast_ref(), Some(rustls::Error::InvalidCertificate(_))))
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// True for errors that say "the server is not there right now" rather
/// than "this statement is wrong": closed sockets, refused connections,
/// administrator shutdowns and servers still starting up.
pub fn is_connectivity_error(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        return [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::CONNECTION_EXCEPTION,
            SqlState::CONNECTION_FAILURE,
            SqlState::CONNECTION_DOES_NOT_EXIST,
            SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::INVALID_CATALOG_NAME,
            SqlState::READ_ONLY_SQL_TRANSACTION,
        ]
        .contains(code);
    }
    // No SQLSTATE: an I/O failure, a refused connection or a connect timeout
    // are about reachability; conversion errors are bugs and must not hide
    // behind a 503.
    let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    let text = e.to_string();
    io || text.starts_with("error connecting") || text.starts_with("timeout")
}

/// Errors while opening the database at start-up.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    #[error("could not create the connection pool: {0}")]
    Pool(String),
}

/// The pool plus, when warden runs its own cluster, the handle that stops it.
pub struct Database {
    pub pool: Pool,
    /// Connection settings, for the few connections that live outside the
    /// pool (the stream listener).
    pub pg_config: tokio_postgres::Config,
    /// TLS for those connections, as the pool's.
    pub tls: tls::Connector,
    embedded: Option<EmbeddedCluster>,
}

impl Database {
    /// Where the database is, for messages: `host:port/dbname` (or the
    /// socket directory), never the user's password.
    pub fn target(&self) -> String {
        target_of(&self.pg_config)
    }

    /// Opens the configured database, starting the embedded cluster when no
    /// URL is set. Connections are opened lazily, so this succeeds even if
    /// an external server is down (`serve` then waits for it).
    pub async fn open(settings: &DatabaseSettings) -> Result<Self, OpenError> {
        let (mut pg_config, embedded) = if settings.url.is_empty() {
            check_data_dir(settings)?;
            let bin_dir = Some(settings.pg_bin_dir.as_path()).filter(|p| !p.as_os_str().is_empty());
            let cluster = EmbeddedCluster::start(&settings.data_dir, bin_dir).await?;
            (cluster.connect_config(), Some(cluster))
        } else {
            (parse_url(settings.url.expose())?, None)
        };
        let made = tls::connector(settings, &mut pg_config)
            .map_err(OpenError::from)
            .and_then(|tls| Ok((pool_with(pg_config.clone(), tls.clone(), settings)?, tls)));
        let (pool, tls) = match made {
            Ok(made) => made,
            Err(e) => {
                // A cluster started for a warden that cannot use it would be
                // left running, and adopted by every later start.
                if let Some(cluster) = &embedded {
                    cluster.stop().await;
                }
                return Err(e);
            }
        };
        let pg_config = session_config(pg_config, settings);
        Ok(Self { pool, pg_config, tls, embedded })
    }

    /// The embedded cluster, for a task that keeps it running.
    pub fn embedded(&self) -> Option<EmbeddedCluster> {
        self.embedded.clone()
    }

    /// Closes the pool and stops the embedded cluster if this process started it.
    pub async fn close(&self) {
        self.pool.close();
        if let Some(cluster) = &self.embedded {
            cluster.stop().await;
        }
    }
}

/// Checks what of `[database]` can be checked without connecting: the URL
/// parses, and TLS can be set up as configured (the CA file read). For
/// `warden config`, which otherwise only loads the settings.
pub fn check_settings(settings: &DatabaseSettings) -> Result<(), SettingsError> {
    if settings.url.is_empty() {
        return check_data_dir(settings);
    }
    let mut pg_config = parse_url(settings.url.expose())?;
    tls::connector(settings, &mut pg_config).map(drop)
}

/// The embedded cluster's data directory must leave room for its socket.
fn check_data_dir(settings: &DatabaseSettings) -> Result<(), SettingsError> {
    embedded::socket_fits(&settings.data_dir)
        .map_err(|allowed| SettingsError::new("database.data_dir", settings.data_dir.display(), allowed))
}

/// Where a connection configuration points, `host:port/dbname`, with no
/// user or password: safe to print. A host holding "@" is left out: the
/// URL's password then held an unescaped "@", and the parser took the
/// rest of the password for the host. Text is escaped onto one line.
pub fn target_of(c: &tokio_postgres::Config) -> String {
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) if h.contains('@') => "[host hidden: an unescaped @]".into(),
        Some(tokio_postgres::config::Host::Tcp(h)) => h.escape_debug().to_string(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string().escape_debug().to_string(),
        None => "localhost".into(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", c.get_dbname().unwrap_or("postgres").escape_debug())
}

/// Parses `database.url` without ever echoing it (it may hold a password).
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, SettingsError> {
    tokio_postgres::Config::from_str(url).map_err(|e| {
        // libpq's certificate options are settings of their own here.
        let hint = if url.contains("verify-full") || url.contains("verify-ca") || url.contains("sslrootcert") {
            "; for sslmode=verify-full or sslrootcert set database.tls_verify = \"full\" and database.tls_ca_file instead"
        } else {
            ""
        };
        SettingsError::new(
            "database.url",
            "",
            format!("a PostgreSQL URL like postgres://user@host:5432/db or a key=value string ({e}){hint}"),
        )
    })
}

/// TCP keepalives on warden's sessions, from both ends: first probe after
/// 30 s idle, then every 10 s, gone after 3 unanswered (about a minute);
/// and data sent must be acknowledged within a minute.
const SERVER_KEEPALIVE_IDLE_S: u32 = 30;
const SERVER_KEEPALIVE_INTERVAL_S: u32 = 10;
const SERVER_KEEPALIVE_COUNT: u32 = 3;
const SERVER_USER_TIMEOUT_MS: u32 = 60_000;

/// `pg_config` with the session settings every warden connection needs.
pub fn session_config(mut pg_config: tokio_postgres::Config, settings: &DatabaseSettings) -> tokio_postgres::Config {
    // JIT pays off for long analytical queries; warden's are short and
    // frequent, and compiling them costs more than running them.
    //
    // Both ends probe idle connections: a session whose host vanished
    // (power off, network gone, a failover that moved the address) ends
    // within about a minute instead of the operating system's default of
    // over two hours. On the server that frees its session locks (the
    // evaluator's leadership above all); here a query on a dead connection
    // fails instead of hanging, and the pool replaces the connection.
    //
    // Options and an application name given in `database.url` are kept
    // (a hosted PostgreSQL may need `options=endpoint=...`); warden's own
    // settings come after the URL's, so for the same setting they win.
    let given = pg_config.get_options().map(options_before_warden_s).unwrap_or_default();
    if pg_config.get_application_name().is_none() {
        pg_config.application_name("warden");
    }
    pg_config
        .connect_timeout(settings.connect_timeout.get())
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(SERVER_KEEPALIVE_IDLE_S.into()))
        .keepalives_interval(Duration::from_secs(SERVER_KEEPALIVE_INTERVAL_S.into()))
        .keepalives_retries(SERVER_KEEPALIVE_COUNT)
        .tcp_user_timeout(Duration::from_millis(SERVER_USER_TIMEOUT_MS.into()))
        .options(format!(
            "{}-c statement_timeout={} -c timezone=UTC -c jit=off -c tcp_keepalives_idle={SERVER_KEEPALIVE_IDLE_S} \
             -c tcp_keepalives_interval={SERVER_KEEPALIVE_INTERVAL_S} -c tcp_keepalives_count={SERVER_KEEPALIVE_COUNT} \
             -c tcp_user_timeout={SERVER_USER_TIMEOUT_MS}",
            given,
            settings.statement_timeout.as_millis_u64()
        ));
    pg_config
}

/// The URL's own `options`, ready to have warden's appended after a space.
///
/// PostgreSQL splits options into words at unescaped whitespace, a
/// backslash escaping the next character (`pg_split_opts`); a backslash
/// that ends the options escapes nothing and is dropped. Followed by
/// warden's options, it would escape the space between them instead and
/// run the URL's last word into warden's first, so it is dropped here, as
/// the server would have. A backslash standing alone as the last word
/// makes an empty word, which the server refuses; it is kept, and the
/// connection is refused as it would have been without warden's options.
fn options_before_warden_s(given: &str) -> String {
    let c_space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r');
    if given.chars().all(c_space) {
        return String::new();
    }
    let (mut word_len, mut escaped) = (0usize, false);
    for c in given.chars() {
        if c_space(c) && !escaped {
            word_len = 0;
        } else if c == '\\' && !escaped {
            escaped = true;
        } else {
            escaped = false;
            word_len += 1;
        }
    }
    let given = if escaped && word_len > 0 { &given[..given.len() - 1] } else { given };
    format!("{given} ")
}

/// A pool over `pg_config` with the session settings and TLS every
/// connection needs.
pub fn build_pool(mut pg_config: tokio_postgres::Config, settings: &DatabaseSettings) -> Result<Pool, OpenError> {
    let tls = tls::connector(settings, &mut pg_config)?;
    pool_with(pg_config, tls, settings)
}

fn pool_with(
    pg_config: tokio_postgres::Config,
    tls: tls::Connector,
    settings: &DatabaseSettings,
) -> Result<Pool, OpenError> {
    let pg_config = session_config(pg_config, settings);
    let manager = Manager::from_config(pg_config, tls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    let mut builder = Pool::builder(manager)
        .max_size(settings.pool_size as usize)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(settings.acquire_timeout.get()))
        .create_timeout(Some(settings.connect_timeout.get()))
        .recycle_timeout(Some(settings.connect_timeout.get()));
    if let Some(max) = max_lifetime(settings) {
        // A hook that fails makes the pool drop the connection and take
        // another, or open a new one.
        builder = builder.pre_recycle(deadpool_postgres::Hook::sync_fn(move |_, metrics| {
            if past_lifetime(metrics, max) {
                Err(deadpool_postgres::HookError::message("older than database.max_lifetime"))
            } else {
                Ok(())
            }
        }));
    }
    builder.build().map_err(|e| OpenError::Pool(e.to_string()))
}

/// `database.max_lifetime`, `None` when connections are kept for good.
pub fn max_lifetime(settings: &DatabaseSettings) -> Option<Duration> {
    Some(settings.max_lifetime.get()).filter(|d| !d.is_zero())
}

/// Whether a pooled connection has outlived `max_lifetime` (see
/// [`max_lifetime`]); connections held outside the pool for long, as the
/// ingest writers' are, check it themselves.
pub fn outlived(client: &Client, max_lifetime: Option<Duration>) -> bool {
    max_lifetime.is_some_and(|max| past_lifetime(deadpool_postgres::Object::metrics(client), max))
}

/// The one age test, for the pool's hook and for connections held outside it.
fn past_lifetime(metrics: &deadpool_postgres::Metrics, max: Duration) -> bool {
    metrics.created.elapsed() >= max
}

/// Closes a connection for good instead of returning it to the pool: one
/// that failed as if the server were gone may still be open (to a server
/// turned read-only by a failover, say), and the pool would hand it out
/// again.
pub fn discard(client: Client) {
    drop(deadpool_postgres::Object::take(client));
}

/// A pooled connection holding a session-level advisory lock (evaluation
/// leadership, the retention job). Dropped without [`SessionLock::release`]
/// (the task holding it panicked, or was cancelled), the connection is
/// closed rather than returned to the pool: PostgreSQL then releases the
/// lock, where a pooled session would hold it, and keep every replica
/// from the job it guards, for as long as the connection lived.
pub struct SessionLock {
    client: Option<Client>,
    key: i64,
}

impl SessionLock {
    /// Takes the lock `key` on `client` if it is free: the lock, or the
    /// connection back when another session holds it.
    pub async fn try_take(client: Client, key: i64) -> Result<Result<Self, Client>, DbError> {
        let got: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).await?.get(0);
        Ok(if got { Ok(Self { client: Some(client), key }) } else { Err(client) })
    }

    /// Releases the lock; the connection goes back to the pool only when
    /// the unlock went through and `healthy` says it may.
    pub async fn release(mut self, healthy: bool) {
        let Some(client) = self.client.take() else { return };
        let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&self.key]).await;
        if !healthy || unlocked.is_err() {
            discard(client);
        }
    }
}

impl std::ops::Deref for SessionLock {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("held until released")
    }
}

impl std::ops::DerefMut for SessionLock {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("held until released")
    }
}

impl Drop for SessionLock {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            discard(client);
        }
    }
}

/// Runs `attempt` until it succeeds, trying again (with [`retry_waits`]
/// between tries) as long as a new try could still be done `margin` before
/// `deadline`; the last error otherwise. The first try is made unless the
/// deadline has passed. For writes that must outlive a
/// short outage, such as the outcome of an alert already sent or of a
/// recovery action already run, each try taking its own connection.
///
/// [`retry_waits`]: crate::every::retry_waits
pub async fn retry_until<T, F, Fut>(
    deadline: tokio::time::Instant,
    margin: Duration,
    what: &str,
    mut attempt: F,
) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    let mut waits = crate::every::retry_waits(Duration::from_millis(250), Duration::from_secs(4));
    if tokio::time::Instant::now() >= deadline {
        // Another outcome's retries used up the time: a try now would land
        // after someone else may have taken the work over.
        tracing::warn!("could not record {what}: no time left before its lease ends");
        return Err(DbError::Unavailable(format!("no time left to record {what}")));
    }
    let mut tries = 0u32;
    loop {
        tries += 1;
        let e = match attempt().await {
            Ok(done) => return Ok(done),
            // A statement the server refuses for the data it carries (a
            // data exception or an integrity violation, SQLSTATE classes
            // 22 and 23) is refused again on every try. Anything else (a
            // full disk, memory) may pass.
            Err(DbError::Query(e)) if e.code().is_some_and(|c| matches!(&c.code()[..2], "22" | "23")) => {
                let e = DbError::Query(e);
                tracing::error!(error = %e, tries, "could not record {what}; trying again would not help");
                return Err(e);
            }
            Err(e) => e,
        };
        let wait = waits.next().unwrap_or(Duration::from_secs(4));
        if tokio::time::Instant::now() + wait + margin >= deadline {
            tracing::warn!(error = %e, tries, "could not record {what}; giving up");
            return Err(e);
        }
        tracing::warn!(error = %e, retry_in = ?wait, "could not record {what}; will retry");
        tokio::time::sleep(wait).await;
    }
}

/// PostgreSQL's text and jsonb cannot hold U+0000, and text from outside
/// warden's control (a recovery command's output, a receiver's answer)
/// may: a record carrying it would fail on every try and be lost. Each NUL
/// becomes U+FFFD, as invalid UTF-8 already does when such text is decoded.
pub fn storable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') { text.replace('\0', "\u{FFFD}").into() } else { text.into() }
}

/// [`storable`] for every string (keys too) in a JSON value.
pub fn storable_json(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) if s.contains('\0') => Value::String(storable(&s).into_owned()),
        Value::Array(items) => Value::Array(items.into_iter().map(storable_json).collect()),
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| (storable(&k).into_owned(), storable_json(v))).collect())
        }
        other => other,
    }
}

/// Takes a connection, mapping pool failures to [`DbError`].
pub async fn client(pool: &Pool) -> Result<Client, DbError> {
    Ok(pool.get().await?)
}

/// When the oldest transaction on this database that may still write
/// began, other than the caller's. Ingest stamps heartbeats and metrics
/// with its transaction's start, and that transaction may wait on row locks
/// for seconds before it commits, so rows stamped earlier than any fixed lag
/// can still appear: a reader that moves a watermark over such rows keeps
/// it before this moment.
///
/// Counted: client sessions that have written (a transaction id) or are
/// running a statement, a plain read included, begun within twice the
/// statement timeout (5 minutes when there is none). Ingest through warden is one statement, so
/// none of it can be older; an operator's session left idle in a
/// transaction, or a long migration, holds a watermark back that long at
/// most. Sessions of other roles show their start only to a role with
/// `pg_read_all_stats`: without it, agents writing through
/// `warden.record_heartbeat` as another role get the readers' fixed lag
/// (the rollups see those by [`oldest_uncommitted_sql_heartbeat`] as
/// well; the score pass may leave such a heartbeat's metrics out).
///
/// `pg_stat_activity` is read once per transaction (later reads in the
/// same transaction see the same), so call this right before the read it
/// guards.
pub async fn oldest_open_write(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, DbError> {
    let row = tx
        .query_one(
            "SELECT min(xact_start) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
               AND backend_type = 'client backend' AND (backend_xid IS NOT NULL OR state = 'active') \
               AND xact_start > now() - 2 * coalesce(nullif(current_setting('statement_timeout'), '0')::interval, \
                                                 interval '5 minutes')",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// The advisory lock class `warden.record_heartbeat` holds its minute
/// under ('wrdd'; V36).
pub const SQL_HEARTBEAT_LOCK_CLASS: i64 = 2_003_985_508;

/// The oldest minute a heartbeat recorded through `warden.record_heartbeat`
/// and not yet committed was stamped in, and the process holding it (none
/// for a prepared transaction, which keeps its locks past its session).
/// Stamped when the call is made, such a heartbeat may be committed by a
/// transaction that stays open for any time, as any role; each call holds
/// a shared advisory lock naming its minute until its transaction ends,
/// seen in `pg_locks` whatever the session's age or role.
pub async fn oldest_uncommitted_sql_heartbeat(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<Option<(chrono::DateTime<chrono::Utc>, Option<i32>)>, DbError> {
    let row = tx
        .query_opt(
            "SELECT to_timestamp(l.objid::bigint * 60), l.pid FROM pg_locks l \
             WHERE l.locktype = 'advisory' AND l.classid::bigint = $1 AND l.objsubid = 2 \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             ORDER BY l.objid::bigint LIMIT 1",
            &[&SQL_HEARTBEAT_LOCK_CLASS],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// Creates daily partitions from yesterday to `ahead_days` after today (UTC).
/// Idempotent and safe to run from several replicas at once.
#[tracing::instrument(skip(client))]
pub async fn ensure_partitions(client: &tokio_postgres::Client, ahead_days: u32) -> Result<i32, DbError> {
    let row = client
        .query_one(
            "SELECT warden.ensure_partitions((now() AT TIME ZONE 'UTC')::date - 1, \
             (now() AT TIME ZONE 'UTC')::date + $1::int)",
            &[&(ahead_days as i32)],
        )
        .await?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::options_before_warden_s as prefix;

    #[test]
    fn the_urls_options_come_first_and_end_where_the_server_would_end_them() {
        assert_eq!(prefix(""), "");
        assert_eq!(prefix(" \t "), "");
        assert_eq!(prefix("-c work_mem=8MB"), "-c work_mem=8MB ");
        // Unpaired, ending a word: dropped, as PostgreSQL drops it.
        assert_eq!(prefix("-c search_path=a\\"), "-c search_path=a ");
        // Paired: an escaped backslash, part of the value.
        assert_eq!(prefix("-c search_path=a\\\\"), "-c search_path=a\\\\ ");
        assert_eq!(prefix("-c search_path=a\\\\\\"), "-c search_path=a\\\\ ");
        // An escaped space at the end stays part of the value.
        assert_eq!(prefix("-c application_name=a\\ "), "-c application_name=a\\  ");
        // After an escaped space the word goes on: its final backslash goes.
        assert_eq!(prefix("-c application_name=a\\ \\"), "-c application_name=a\\  ");
        // Alone, a backslash is an empty word the server refuses: kept.
        assert_eq!(prefix("-c a=b \\"), "-c a=b \\ ");
        assert_eq!(prefix("\\"), "\\ ");
        assert_eq!(prefix("  \\"), "  \\ ");
    }
}
