//! How warden's connections to PostgreSQL are set up.

#[tokio::test]
async fn options_given_in_the_database_url_reach_the_session() {
    // A hosted PostgreSQL may need options in the URL (an endpoint id);
    // warden's own session settings used to replace them.
    let db = crate::helpers::TestDb::migrated().await;
    let url = format!("{} options='-c work_mem=7777kB' application_name=ops-warden", db.url());
    let config: tokio_postgres::Config = url.parse().unwrap();
    let pool = warden::db::build_pool(config, &crate::helpers::default_settings().database).unwrap();
    let client = warden::db::client(&pool).await.unwrap();
    let row = client
        .query_one(
            "SELECT current_setting('work_mem'), current_setting('application_name'), \
                    current_setting('statement_timeout'), current_setting('TimeZone')",
            &[],
        )
        .await
        .unwrap();
    let got: (String, String, String, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(got.0, "7777kB", "the URL's option");
    assert_eq!(got.1, "ops-warden", "the URL's application name");
    assert_ne!(got.2, "0", "warden's statement timeout still applies");
    assert_eq!(got.3, "UTC");
}

#[tokio::test]
async fn an_unpaired_backslash_ending_the_urls_options_leaves_wardens_intact() {
    // The server drops a backslash that ends the options; followed by
    // warden's, it would escape the space before them and garble the
    // URL's last option and warden's first.
    let db = crate::helpers::TestDb::migrated().await;
    let url = format!("{} options='-c work_mem=7777kB\\\\'", db.url());
    let config: tokio_postgres::Config = url.parse().unwrap();
    assert_eq!(config.get_options(), Some("-c work_mem=7777kB\\"), "the URL as parsed");
    let pool = warden::db::build_pool(config, &crate::helpers::default_settings().database).unwrap();
    let client = warden::db::client(&pool).await.unwrap();
    let row = client
        .query_one("SELECT current_setting('work_mem'), current_setting('statement_timeout')", &[])
        .await
        .unwrap();
    let got: (String, String) = (row.get(0), row.get(1));
    assert_eq!(got.0, "7777kB", "the URL's option");
    assert_ne!(got.1, "0", "warden's statement timeout still applies");
}

async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0)
}

async fn still_connected(db: &crate::helpers::TestDb, pid: i32) -> bool {
    let admin = db.client().await;
    admin.query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid]).await.unwrap().is_some()
}

#[tokio::test]
async fn a_pooled_connection_past_max_lifetime_is_closed_and_replaced() {
    let db = crate::helpers::TestDb::migrated().await;
    let mut settings = crate::helpers::default_settings().database;
    settings.pool_size = 1;
    settings.max_lifetime = warden::config::Duration::from_secs(1);
    let pool = warden::db::build_pool(db.url().parse().unwrap(), &settings).unwrap();
    let first = backend_pid(&warden::db::client(&pool).await.unwrap()).await;
    let replaced = crate::helpers::eventually(
        std::time::Duration::from_secs(60),
        "a new connection once the first is a second old",
        || async {
            let pid = backend_pid(&warden::db::client(&pool).await.unwrap()).await;
            (pid != first).then_some(pid)
        },
    )
    .await;
    assert_ne!(replaced, first);
    crate::helpers::eventually(std::time::Duration::from_secs(60), "the old connection closed", || async {
        (!still_connected(&db, first).await).then_some(())
    })
    .await;

    // Off: the same connection however old.
    settings.max_lifetime = warden::config::Duration::from_secs(0);
    let pool = warden::db::build_pool(db.url().parse().unwrap(), &settings).unwrap();
    let kept = backend_pid(&warden::db::client(&pool).await.unwrap()).await;
    let later = db.client().await.query_one("SELECT pg_sleep(1.1)::text", &[]).await.map(|_| ());
    later.unwrap();
    assert_eq!(backend_pid(&warden::db::client(&pool).await.unwrap()).await, kept);
}

#[tokio::test]
async fn an_ingest_writer_retires_its_connection_past_max_lifetime() {
    // The writer keeps its connection between flushes, outside the pool.
    use warden::auth::Scope;
    let app = crate::helpers::TestApp::spawn_with(|s| {
        s.database.max_lifetime = warden::config::Duration::from_secs(1);
    })
    .await;
    let key = app.key(&[Scope::Ingest]).await;
    let beat = serde_json::json!({"agent_id": "long-lived"});
    assert_eq!(app.heartbeat(&key, beat.clone()).await.0, 200);
    let admin = app.db.client().await;
    let writer = || async {
        admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
                 AND query LIKE '%ingest_heartbeats%' AND pid <> pg_backend_pid() \
                 ORDER BY state_change DESC LIMIT 1",
                &[],
            )
            .await
            .unwrap()
            .map(|r| r.get::<_, i32>(0))
    };
    let first = writer().await.expect("the writer's backend");
    crate::helpers::eventually(std::time::Duration::from_secs(60), "a new writer connection", || async {
        assert_eq!(app.heartbeat(&key, beat.clone()).await.0, 200, "heartbeats go on meanwhile");
        (writer().await != Some(first) && !still_connected(&app.db, first).await).then_some(())
    })
    .await;
}

async fn lock_is_free(client: &tokio_postgres::Client, key: i64) -> bool {
    let got: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).await.unwrap().get(0);
    if got {
        client.execute("SELECT pg_advisory_unlock($1)", &[&key]).await.unwrap();
    }
    got
}

/// Evaluation leadership and the retention job are session locks on a
/// pooled connection. A task that panics (or is cancelled) while holding
/// one must not hand its connection back to the pool with the lock still
/// held: no replica could take the job up again while it lived.
#[tokio::test]
async fn a_session_lock_dropped_without_release_closes_its_connection_and_frees_the_lock() {
    use warden::db::SessionLock;
    const KEY: i64 = 0x7465_7374;
    let db = crate::helpers::TestDb::empty().await;
    let pool = warden::db::build_pool(db.config.clone(), &crate::helpers::default_settings().database).unwrap();
    let other = db.client().await;

    let Ok(held) = SessionLock::try_take(pool.get().await.unwrap(), KEY).await.unwrap() else {
        panic!("free at first")
    };
    assert!(!lock_is_free(&other, KEY).await);
    assert!(SessionLock::try_take(pool.get().await.unwrap(), KEY).await.unwrap().is_err(), "held by the first");
    let leader = tokio::spawn(async move {
        let _held = held;
        panic!("a bug while leading");
    });
    assert!(leader.await.unwrap_err().is_panic());
    crate::helpers::eventually(std::time::Duration::from_secs(30), "the lock freed by its session's end", || async {
        lock_is_free(&other, KEY).await.then_some(())
    })
    .await;
    assert_eq!(pool.status().size, 1, "only the connection of the refused try is pooled: {:?}", pool.status());

    // Released, the lock is free at once and the connection pooled again.
    let Ok(held) = SessionLock::try_take(pool.get().await.unwrap(), KEY).await.unwrap() else { panic!("free again") };
    held.release(true).await;
    assert!(lock_is_free(&other, KEY).await);
    assert_eq!(pool.status().size, 1);
    // Released after a failure, the connection is closed all the same.
    let Ok(held) = SessionLock::try_take(pool.get().await.unwrap(), KEY).await.unwrap() else { panic!("free again") };
    held.release(false).await;
    assert!(lock_is_free(&other, KEY).await);
    assert_eq!(pool.status().size, 0);
}
