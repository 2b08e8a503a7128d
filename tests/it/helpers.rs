//! Test harness: a fresh PostgreSQL database per test, cloned from one
//! migrated template, and a warden served on a random loopback port.
//!
//! The server comes from `WARDEN_TEST_DATABASE_URL` (default: the machine's
//! PostgreSQL at 127.0.0.1:5432). If nothing answers there, the tests start
//! an embedded cluster under `target/` and use that instead.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;
use warden::app::Application;
use warden::auth::Scope;
use warden::config::{Secret, Settings};
use warden::db::embedded::EmbeddedCluster;
use warden::db::migrate;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Advisory lock key that serialises template creation across test processes.
const TEMPLATE_LOCK: i64 = 0x7761_7264_656e_7470;
/// Test databases left behind by crashed runs are dropped after this long.
const STALE_AFTER_SECS: u64 = 6 * 3600;

/// Connection settings for the maintenance database of the test server.
async fn admin_config() -> &'static tokio_postgres::Config {
    static ADMIN: OnceCell<tokio_postgres::Config> = OnceCell::const_new();
    ADMIN
        .get_or_init(|| async {
            let url = std::env::var("WARDEN_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_string());
            let mut config =
                tokio_postgres::Config::from_str(&url).expect("WARDEN_TEST_DATABASE_URL is not a valid URL");
            config.connect_timeout(Duration::from_secs(5));
            if config.connect(NoTls).await.is_err() {
                eprintln!("no PostgreSQL at {url}; using an embedded cluster for the tests");
                config = embedded_admin_config().await;
            }
            // The tests' own SQL (date_trunc, now() + interval '30 days')
            // reads days and hours in UTC, as warden's sessions do, whatever
            // the server's time zone.
            config.options("-c timezone=UTC");
            config
        })
        .await
}

/// Starts (or reuses) an embedded cluster under target/ for the whole run.
/// It is left running for later runs to reuse.
async fn embedded_admin_config() -> tokio_postgres::Config {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("warden-test-pgdata");
    let lock_path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("warden-test-pgdata.lock");
    let lock = std::fs::File::create(&lock_path).expect("create lock file");
    // Several test processes may get here at once; only one may initdb.
    use std::os::fd::AsRawFd;
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    let cluster = EmbeddedCluster::start(&dir, None).await.expect("start embedded cluster for tests");
    let mut config = cluster.connect_config();
    config.dbname("postgres");
    std::mem::forget(cluster); // keep it running; never stopped by the tests
    drop(lock);
    config
}

pub async fn admin_client() -> tokio_postgres::Client {
    connect(admin_config().await).await
}

pub async fn connect(config: &tokio_postgres::Config) -> tokio_postgres::Client {
    let (client, connection) = config.connect(NoTls).await.expect("connect to test PostgreSQL");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Name of today's template: changes when a migration changes, and daily,
/// so its partitions always cover today.
fn template_name() -> String {
    format!("warden_tpl_{:016x}_{}", migrate::fingerprint(), today())
}

fn today() -> String {
    chrono::Utc::now().format("%Y%m%d").to_string()
}

async fn ensure_template() -> &'static str {
    static TEMPLATE: OnceCell<String> = OnceCell::const_new();
    TEMPLATE
        .get_or_init(|| async {
            let name = template_name();
            let admin = admin_client().await;
            admin.execute("SELECT pg_advisory_lock($1)", &[&TEMPLATE_LOCK]).await.unwrap();
            let ready = admin
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1 AND datistemplate", &[&name])
                .await
                .unwrap()
                .is_some();
            if !ready {
                drop_stale_databases(&admin).await;
                admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.unwrap();
                admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
                let mut config = admin_config().await.clone();
                config.dbname(&name);
                let mut client = connect(&config).await;
                migrate::run(&mut client).await.expect("migrate the template database");
                drop(client);
                admin.batch_execute(&format!("ALTER DATABASE {name} IS_TEMPLATE true")).await.unwrap();
            }
            admin.execute("SELECT pg_advisory_unlock($1)", &[&TEMPLATE_LOCK]).await.unwrap();
            name
        })
        .await
}

/// Removes old templates and test databases that crashed runs left behind.
async fn drop_stale_databases(admin: &tokio_postgres::Client) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let rows = admin.query("SELECT datname FROM pg_database WHERE datname LIKE 'warden\\_t%'", &[]).await.unwrap();
    for row in rows {
        let name: String = row.get(0);
        let stale = if let Some(rest) = name.strip_prefix("warden_tpl_") {
            // Another run may still clone from yesterday's template, or from
            // one of other migrations (another checkout): older ones go.
            let yesterday = (chrono::Utc::now() - chrono::Duration::days(1)).date_naive();
            let day = rest.rsplit('_').next().and_then(|d| chrono::NaiveDate::parse_from_str(d, "%Y%m%d").ok());
            day.is_none_or(|day| day < yesterday)
        } else if let Some(rest) = name.strip_prefix("warden_test_") {
            rest.split('_')
                .next()
                .and_then(|t| t.parse::<u64>().ok())
                .is_some_and(|t| now.saturating_sub(t) > STALE_AFTER_SECS)
        } else {
            false
        };
        if stale {
            let _ = admin.batch_execute(&format!("ALTER DATABASE {name} IS_TEMPLATE false")).await;
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
        }
    }
}

/// A database of the test's own, dropped when this value is dropped.
pub struct TestDb {
    pub name: String,
    pub config: tokio_postgres::Config,
}

impl TestDb {
    /// A fresh database cloned from the migrated template.
    pub async fn migrated() -> Self {
        let template = ensure_template().await;
        let db = Self::create(Some(template)).await;
        // A run that crosses midnight UTC still clones the template built
        // the day before, whose partitions end a day short of a week ahead.
        if !template.ends_with(&today()) {
            warden::db::ensure_partitions(&db.client().await, 7).await.expect("partitions for a new day");
        }
        db
    }

    /// A fresh, empty database (no warden schema).
    pub async fn empty() -> Self {
        Self::create(None).await
    }

    async fn create(template: Option<&str>) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let name = format!("warden_test_{now}_{}_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let admin = admin_client().await;
        let sql = match template {
            Some(t) => format!("CREATE DATABASE {name} TEMPLATE {t}"),
            None => format!("CREATE DATABASE {name}"),
        };
        admin.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        let mut config = admin_config().await.clone();
        config.dbname(&name);
        Self { name, config }
    }

    /// A connection string warden can be configured with.
    pub fn url(&self) -> String {
        let c = &self.config;
        let host = match &c.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        };
        let port = c.get_ports().first().copied().unwrap_or(5432);
        let user = c.get_user().unwrap_or("postgres");
        format!("host={host} port={port} user={user} dbname={}", self.name)
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.config).await
    }

    /// A connection from a pool as warden builds it (session settings
    /// included), for functions that take warden's pooled client.
    pub async fn pooled(&self) -> warden::db::Client {
        let pool = warden::db::build_pool(self.config.clone(), &default_settings().database).unwrap();
        warden::db::client(&pool).await.unwrap()
    }

    /// How many ingest writes on this database wait for a lock right now.
    pub async fn ingest_writes_waiting_on_locks(&self) -> i64 {
        self.waiting_on_locks("%ingest_heartbeats%").await
    }

    /// How many statements on this database matching `query_like` (a LIKE
    /// pattern) wait for a lock right now.
    pub async fn waiting_on_locks(&self, query_like: &str) -> i64 {
        self.client()
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE $1",
                &[&query_like],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Drops the database now, with any connections still open to it.
    pub async fn drop_now(&self) {
        let admin = admin_client().await;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).await.unwrap();
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which must not block on
        // itself; a short-lived thread with its own runtime does the work.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let admin = admin_client().await;
                let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
            });
        })
        .join();
    }
}

/// Settings as shipped, untouched by the developer's environment.
pub fn default_settings() -> Settings {
    Settings::defaults()
}

/// A running warden on its own database and a random loopback port.
pub struct TestApp {
    pub addr: std::net::SocketAddr,
    pub db: TestDb,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Starts warden with settings adjusted by `tweak`.
    pub async fn spawn_with(tweak: impl FnOnce(&mut Settings)) -> Self {
        let db = TestDb::migrated().await;
        let mut settings = default_settings();
        settings.database.url = Secret::new(db.url());
        settings.database.pool_size = 4;
        settings.server.listen = "127.0.0.1:0".parse().unwrap();
        settings.server.shutdown_timeout = warden::config::Duration::from_secs(5);
        tweak(&mut settings);
        let app = Application::build(settings).await.expect("warden starts");
        let addr = app.local_addr();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(app.run(shutdown.clone()));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        Self { addr, db, http, shutdown, server: Some(server) }
    }

    /// A warden whose own evaluator stays out of the way: it runs one
    /// liveness cycle and one score pass as it starts, then sleeps for the
    /// hour. Waiting for that pass keeps it from landing in the middle of a
    /// test (making a fresh agent online, or overwriting scores the test's
    /// own clock-driven cycles wrote).
    pub async fn spawn_quiet_with(tweak: impl FnOnce(&mut Settings)) -> Self {
        let app = Self::spawn_with(|s| {
            s.health.check_interval = warden::config::Duration::from_secs(3600);
            tweak(s);
        })
        .await;
        eventually(Duration::from_secs(60), "the service's first score pass", || async {
            let client = app.db.client().await;
            let row = client.query_one("SELECT last_score_at FROM warden.evaluator_state", &[]).await.ok()?;
            row.get::<_, Option<chrono::DateTime<chrono::Utc>>>(0).map(|_| ())
        })
        .await;
        app
    }

    /// One liveness cycle of the default settings, at `now` (the database's
    /// clock when `None`), run by the test instead of the service.
    pub async fn liveness_cycle(
        &self,
        now: Option<chrono::DateTime<chrono::Utc>>,
    ) -> warden::health::evaluator::CycleReport {
        let mut client = self.db.client().await;
        let params = warden::health::evaluator::EvalParams::from_settings(&default_settings().health);
        warden::health::evaluator::liveness_cycle(&mut client, &params, "test", now).await.unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.expect("GET reaches warden")
    }

    /// Creates an API key with `scopes` directly in the database.
    pub async fn key(&self, scopes: &[Scope]) -> String {
        let client = self.db.client().await;
        warden::auth::create_key(&client, "test", scopes).await.expect("create key").token
    }

    /// POSTs JSON with a bearer key.
    pub async fn post(&self, path: &str, key: &str, body: &serde_json::Value) -> reqwest::Response {
        self.http.post(self.url(path)).bearer_auth(key).json(body).send().await.expect("POST reaches warden")
    }

    /// POSTs a raw body with a bearer key.
    pub async fn post_raw(&self, path: &str, key: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST reaches warden")
    }

    /// POSTs a heartbeat (or batch) and returns status and JSON body.
    pub async fn heartbeat(&self, key: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let response = self.post("/v1/heartbeats", key, &body).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// One number from SQL, for assertions.
    pub async fn count(&self, sql: &str) -> i64 {
        self.db.client().await.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
    }

    /// Stops warden the way SIGTERM does and waits for it to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Polls `check` until it returns `Some`, or panics after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > until {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A role of one test's own, named for its process and moment so that two
/// runs of the suite against one server keep out of each other's way.
/// Dropped when the test ends, however it ends (declare it before the
/// `TestApp` whose database holds its objects, so that it outlives it);
/// if it cannot be dropped, it is left unable to log in, being a superuser
/// without a password on a server that trusts local logins.
pub struct TestRole(pub String);

impl TestRole {
    pub async fn create(attributes: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let name = format!(
            "warden_test_role_{}_{}_{}",
            std::process::id(),
            nanos % 1_000_000_000,
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        crate::helpers::admin_client().await.batch_execute(&format!("CREATE ROLE {name} {attributes}")).await.unwrap();
        Self(name)
    }

    /// `url` (key=value form) logging in as this role.
    pub fn in_url(&self, url: &str) -> String {
        let parts: Vec<String> = url
            .split_whitespace()
            .map(|kv| if kv.starts_with("user=") { format!("user={}", self.0) } else { kv.to_string() })
            .collect();
        parts.join(" ")
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        let role = self.0.clone();
        // Drop runs inside the test's runtime, which must not block on
        // itself; a short-lived thread with its own runtime does the work.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let admin = crate::helpers::admin_client().await;
                if admin.batch_execute(&format!("DROP ROLE IF EXISTS {role}")).await.is_err() {
                    let _ = admin.batch_execute(&format!("ALTER ROLE {role} NOLOGIN")).await;
                }
            });
        })
        .join();
    }
}
