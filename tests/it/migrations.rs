//! Migrations: an empty database gets the whole contract schema, a second
//! run changes nothing, and partitions are ready for today and ahead.

use std::time::Duration;

use crate::helpers::{TestDb, TestRole};
use warden::db::migrate;

/// Contract columns per table (DESIGN.md); more columns are allowed.
const CONTRACT: &[(&str, &[&str])] = &[
    (
        "agent_status",
        &[
            "agent_id",
            "name",
            "labels",
            "mode",
            "expected_interval_ms",
            "first_seen",
            "last_seen",
            "uptime_seconds",
            "heartbeat_count",
            "liveness",
            "liveness_since",
            "score",
            "tier",
            "components",
            "evaluated_at",
        ],
    ),
    (
        "agent_heartbeats",
        &["agent_id", "received_at", "sent_at", "mode", "status", "uptime_seconds", "next_heartbeat_ms"],
    ),
    ("performance_metrics", &["agent_id", "recorded_at", "name", "value", "unit"]),
    ("system_events", &["id", "occurred_at", "agent_id", "event_type", "severity", "message", "details"]),
    (
        "recovery_actions",
        &[
            "id",
            "incident_id",
            "agent_id",
            "strategy",
            "action",
            "attempt",
            "state",
            "started_at",
            "finished_at",
            "outcome",
            "detail",
        ],
    ),
    ("health_history", &["agent_id", "evaluated_at", "score", "tier", "liveness", "components"]),
    ("incidents", &["id", "agent_id", "issue_type", "severity", "state", "opened_at", "resolved_at"]),
    (
        "alerts",
        &[
            "id",
            "incident_id",
            "dedup_key",
            "severity",
            "state",
            "escalation_level",
            "opened_at",
            "acknowledged_at",
            "acknowledged_by",
            "resolved_at",
        ],
    ),
    (
        "alert_deliveries",
        &["id", "alert_id", "channel", "kind", "state", "attempts", "next_attempt_at", "last_error", "sent_at"],
    ),
];

#[tokio::test]
async fn an_empty_database_gets_every_contract_table_and_column() {
    let db = TestDb::empty().await;
    let mut client = db.client().await;
    assert_eq!(migrate::current_version(&client).await.unwrap(), None);

    let outcome = migrate::run(&mut client).await.unwrap();
    assert!(!outcome.applied.is_empty());
    assert_eq!(outcome.version, migrate::latest_version());

    for (table, columns) in CONTRACT {
        let rows = client
            .query(
                "SELECT column_name::text FROM information_schema.columns WHERE table_schema = 'warden' AND table_name = $1",
                &[table],
            )
            .await
            .unwrap();
        let present: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        assert!(!present.is_empty(), "table warden.{table} is missing");
        for column in *columns {
            assert!(present.iter().any(|c| c == column), "warden.{table}.{column} is missing");
        }
    }
}

/// A DBA's set-up: the schema belongs to warden's role, the database does
/// not, and the role may not create schemas in it. `migrate` (and serve's
/// migrate_on_start) used to fail there on CREATE SCHEMA IF NOT EXISTS,
/// which wants that right even when the schema exists.
#[tokio::test]
async fn a_role_owning_the_schema_but_not_the_database_migrates_an_up_to_date_schema() {
    let role = TestRole::create("LOGIN").await;
    let db = TestDb::migrated().await;
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "ALTER SCHEMA warden OWNER TO {r}; GRANT SELECT ON warden.refinery_schema_history TO {r}",
            r = role.0
        ))
        .await
        .unwrap();
    let mut config = db.config.clone();
    config.user(&role.0);
    let mut client = crate::helpers::connect(&config).await;
    let outcome = migrate::run(&mut client).await.unwrap();
    assert!(outcome.applied.is_empty());
    assert_eq!(outcome.version, migrate::latest_version());
}

#[tokio::test]
async fn migrating_twice_applies_nothing_the_second_time() {
    let db = TestDb::empty().await;
    let mut client = db.client().await;
    migrate::run(&mut client).await.unwrap();
    let again = migrate::run(&mut client).await.unwrap();
    assert!(again.applied.is_empty(), "second run applied {:?}", again.applied);
    assert_eq!(again.version, migrate::latest_version());
}

/// During a rolling upgrade, or after rolling the binary back, the
/// database is ahead of this build: it starts on it as it is, unless a
/// migration it knows was applied differently.
#[tokio::test]
async fn a_database_a_newer_build_migrated_is_left_as_it_is() {
    let db = TestDb::empty().await;
    let mut client = db.client().await;
    migrate::run(&mut client).await.unwrap();
    let next = migrate::latest_version() + 1;
    client
        .execute(
            "INSERT INTO warden.refinery_schema_history (version, name, applied_on, checksum) \
             VALUES ($1, 'from_a_newer_build', now()::text, '1')",
            &[&next],
        )
        .await
        .unwrap();
    let again = migrate::run(&mut client).await.expect("an older build runs on a newer schema");
    assert_eq!((again.applied.len(), again.version), (0, next));

    client.execute("UPDATE warden.refinery_schema_history SET checksum = '0' WHERE version = 1", &[]).await.unwrap();
    let refused = migrate::run(&mut client).await.unwrap_err();
    assert!(refused.to_string().contains("V1__"), "{refused}");
}

#[tokio::test]
async fn serve_without_migrate_on_start_waits_for_the_schema_then_starts() {
    // An empty schema used to stop serve with "relation does not exist";
    // another replica or `warden migrate` may well be on its way.
    let db = TestDb::empty().await;
    let mut settings = crate::helpers::default_settings();
    settings.database.url = warden::config::Secret::new(db.url());
    settings.database.migrate_on_start = false;
    settings.database.pool_size = 4;
    settings.server.listen = "127.0.0.1:0".parse().unwrap();
    settings.health.check_interval = warden::config::Duration::from_secs(1);
    let app = warden::app::Application::build(settings).await.expect("serves while the schema is behind");
    let base = format!("http://{}", app.local_addr());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(app.run(shutdown.clone()));
    let http = reqwest::Client::new();
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.headers().contains_key("retry-after"));
    let tables: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM pg_tables WHERE schemaname = 'warden'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "serve applied nothing itself");

    migrate::run(&mut db.client().await).await.unwrap();
    crate::helpers::eventually(Duration::from_secs(120), "ready once the schema is current", || async {
        let response = http.get(format!("{base}/readyz")).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn concurrent_migrations_take_turns() {
    let db = TestDb::empty().await;
    let runs = (0..3).map(|_| {
        let config = db.config.clone();
        tokio::spawn(async move {
            let mut client = crate::helpers::connect(&config).await;
            migrate::run(&mut client).await.map(|o| o.applied.len())
        })
    });
    let mut applied = Vec::new();
    for run in runs {
        applied.push(run.await.unwrap().expect("no run fails"));
    }
    applied.sort();
    assert_eq!(applied.iter().filter(|n| **n > 0).count(), 1, "exactly one run applies: {applied:?}");
}

#[tokio::test]
async fn a_replica_waits_out_another_migration_longer_than_its_statement_timeout() {
    let db = TestDb::empty().await;
    let holder = db.client().await;
    // The migration lock, held by "another replica" (same key as warden's).
    holder.execute("SELECT pg_advisory_lock(x'77617264656e3a6d'::bigint)", &[]).await.unwrap();
    let mut config = db.config.clone();
    config.options("-c statement_timeout=300ms");
    let waiting = tokio::spawn(async move {
        let mut client = crate::helpers::connect(&config).await;
        let applied = migrate::run(&mut client).await;
        let timeout: String = client.query_one("SHOW statement_timeout", &[]).await.unwrap().get(0);
        (applied.map(|a| a.version), timeout)
    });
    // Let it wait well past its timeout before the lock is released.
    crate::helpers::eventually(Duration::from_secs(30), "the migration waiting a second", || {
        let holder = &holder;
        async move {
            let waited: Option<f64> = holder
                .query_one(
                    "SELECT max(extract(epoch FROM now() - query_start))::float8 FROM pg_stat_activity \
                     WHERE wait_event_type = 'Lock' AND wait_event = 'advisory' AND datname = current_database()",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            waited.filter(|w| *w > 1.0)
        }
    })
    .await;
    holder.execute("SELECT pg_advisory_unlock_all()", &[]).await.unwrap();
    let (applied, timeout) = waiting.await.unwrap();
    assert_eq!(applied.unwrap(), migrate::latest_version());
    assert_eq!(timeout, "300ms", "the session's own timeout is back afterwards");
}

/// The migration lock, held by "another replica" (same key as warden's).
async fn hold_migration_lock(db: &TestDb) -> (tokio_postgres::Client, i32) {
    let holder = db.client().await;
    holder.execute("SELECT pg_advisory_lock(x'77617264656e3a6d'::bigint)", &[]).await.unwrap();
    let pid: i32 = holder.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    (holder, pid)
}

#[tokio::test]
async fn a_bounded_wait_for_the_migration_lock_names_its_holder_and_leaves_the_session_as_it_was() {
    let db = TestDb::empty().await;
    let (holder, pid) = hold_migration_lock(&db).await;
    let mut client = db.client().await;
    let busy = migrate::run_unless_busy(&mut client, Duration::from_millis(200)).await.unwrap_err();
    assert!(matches!(busy, migrate::MigrateError::Busy { .. }), "{busy:?}");
    assert!(busy.to_string().contains(&format!("pid {pid}")), "{busy}");
    for (setting, default) in [("lock_timeout", "0"), ("statement_timeout", "0")] {
        let now: String = client.query_one(&format!("SHOW {setting}"), &[]).await.unwrap().get(0);
        assert_eq!(now, default, "{setting} is the session's own again");
    }
    holder.execute("SELECT pg_advisory_unlock_all()", &[]).await.unwrap();
    let applied = migrate::run_unless_busy(&mut client, Duration::from_millis(200)).await.unwrap();
    assert_eq!(applied.version, migrate::latest_version());
}

#[tokio::test]
async fn serve_answers_503_while_another_replica_migrates_then_starts() {
    // serve used to wait for the lock before listening: for the length of
    // another replica's migration its port was closed and /healthz, a
    // liveness probe, unanswered.
    let db = TestDb::empty().await;
    let (holder, _) = hold_migration_lock(&db).await;
    let mut settings = crate::helpers::default_settings();
    settings.database.url = warden::config::Secret::new(db.url());
    settings.database.connect_timeout = warden::config::Duration::from_millis(300);
    settings.database.pool_size = 4;
    settings.server.listen = "127.0.0.1:0".parse().unwrap();
    settings.health.check_interval = warden::config::Duration::from_secs(1);
    let app = tokio::time::timeout(Duration::from_secs(60), warden::app::Application::build(settings))
        .await
        .expect("build does not wait for the lock")
        .expect("serves while another replica migrates");
    let base = format!("http://{}", app.local_addr());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(app.run(shutdown.clone()));
    let http = reqwest::Client::new();
    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200);
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.headers().contains_key("retry-after"));
    let beat = http.post(format!("{base}/v1/heartbeats")).json(&serde_json::json!({"agent_id": "a"})).send().await;
    assert_eq!(beat.unwrap().status(), 503);

    holder.execute("SELECT pg_advisory_unlock_all()", &[]).await.unwrap();
    crate::helpers::eventually(Duration::from_secs(120), "ready once the lock is free", || async {
        let response = http.get(format!("{base}/readyz")).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    let version: i32 = db
        .client()
        .await
        .query_one("SELECT max(version) FROM warden.refinery_schema_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, migrate::latest_version(), "it migrated once the lock was free");
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn warden_migrate_says_whom_it_waits_for() {
    use tokio::io::AsyncBufReadExt as _;
    let db = TestDb::empty().await;
    let (holder, pid) = hold_migration_lock(&db).await;
    let mut cmd = tokio::process::Command::from(crate::procs::warden());
    cmd.arg("migrate")
        .env("WARDEN__DATABASE__URL", db.url())
        .env("WARDEN__TELEMETRY__FORMAT", "json")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let said = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let line = lines.next_line().await.unwrap().expect("migrate ended before saying whom it waits for");
            if line.contains("another session is migrating the database") {
                break line;
            }
        }
    })
    .await
    .expect("the waiting line");
    assert!(said.contains(&format!("pid {pid}")), "{said}");
    assert!(child.try_wait().unwrap().is_none(), "still waiting");
    holder.execute("SELECT pg_advisory_unlock_all()", &[]).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(120), async {
        while lines.next_line().await.ok().flatten().is_some() {}
        child.wait().await.unwrap()
    })
    .await
    .expect("migrate ends once the lock is free");
    assert!(status.success());
}

#[tokio::test]
async fn a_new_partition_does_not_wait_for_a_long_reader_nor_make_ingestion_wait() {
    let db = TestDb::migrated().await;
    let mut reader = db.client().await;
    let report = reader.transaction().await.unwrap();
    report.query_one("SELECT count(*) FROM warden.agent_heartbeats", &[]).await.unwrap();
    // With the reader still open: upkeep creates next month's partitions
    // and a heartbeat goes in, each well inside a short statement timeout.
    let mut config = db.config.clone();
    config.options("-c statement_timeout=5s");
    let upkeep = crate::helpers::connect(&config).await;
    let created: i32 = upkeep
        .query_one(
            "SELECT warden.ensure_partitions((now() AT TIME ZONE 'UTC')::date + 30, (now() AT TIME ZONE 'UTC')::date + 30)",
            &[],
        )
        .await
        .expect("attaching waits for no reader")
        .get(0);
    assert_eq!(created, 3);
    upkeep
        .execute(
            "SELECT * FROM warden.ingest_heartbeats(ARRAY['beside'], ARRAY[NULL::text], ARRAY[NULL::jsonb], \
               ARRAY[NULL::text], ARRAY['healthy'], ARRAY[NULL::bigint], ARRAY[NULL::int], ARRAY[NULL::timestamptz], \
               '{}', '{}', '{}', '{}')",
            &[],
        )
        .await
        .unwrap();
    report.commit().await.unwrap();
    // The new partition is a partition like the others: rows of its day
    // land there, constraints and indexes included.
    let row = upkeep
        .query_one(
            "WITH ins AS (INSERT INTO warden.agent_heartbeats (agent_id, received_at, status) \
               VALUES ('future', now() + interval '30 days', 'healthy') RETURNING tableoid::regclass::text) \
             SELECT (SELECT * FROM ins), \
                    (SELECT count(*) FROM pg_indexes WHERE schemaname = 'warden' \
                       AND tablename = 'agent_heartbeats_p' || to_char((now() AT TIME ZONE 'UTC')::date + 30, 'YYYYMMDD'))",
            &[],
        )
        .await
        .unwrap();
    let (table, indexes): (String, i64) = (row.get(0), row.get(1));
    assert!(table.starts_with("warden.agent_heartbeats_p"), "{table}");
    assert_eq!(indexes, 2);
    let refused = upkeep
        .execute(
            "INSERT INTO warden.agent_heartbeats (agent_id, received_at, status) \
             VALUES ('future', now() + interval '30 days', 'bogus')",
            &[],
        )
        .await;
    assert!(refused.is_err(), "the status check came along");
}

#[tokio::test]
async fn partitions_exist_for_today_and_the_week_ahead() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    for table in ["agent_heartbeats", "performance_metrics", "health_history"] {
        for offset in 0..=7 {
            let exists: bool = client
                .query_one(
                    "SELECT to_regclass(format('warden.%s_p%s', $1::text, \
                     to_char((now() AT TIME ZONE 'UTC')::date + $2::int, 'YYYYMMDD'))) IS NOT NULL",
                    &[&table, &offset],
                )
                .await
                .unwrap()
                .get(0);
            assert!(exists, "{table} has no partition for today + {offset}");
        }
    }
    // A row stamped now lands in a partition, not in an error.
    client
        .execute(
            "INSERT INTO warden.agent_heartbeats (agent_id, received_at, status) VALUES ('a', now(), 'healthy')",
            &[],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn partition_upkeep_is_idempotent_and_extends_the_horizon() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let created = warden::db::ensure_partitions(&client, 7).await.unwrap();
    assert_eq!(created, 0, "everything up to a week ahead already exists");
    let created = warden::db::ensure_partitions(&client, 9).await.unwrap();
    assert_eq!(created, 3 * 2, "two more days for each of three tables");
}

#[tokio::test]
async fn check_constraints_refuse_values_outside_the_enumerations() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let bad = [
        "INSERT INTO warden.agent_status (agent_id, expected_interval_ms, first_seen, last_seen, liveness) \
         VALUES ('a', 1000, now(), now(), 'asleep')",
        "INSERT INTO warden.agent_status (agent_id, expected_interval_ms, first_seen, last_seen) \
         VALUES ('bad id with spaces', 1000, now(), now())",
        "INSERT INTO warden.incidents (agent_id, issue_type, severity) VALUES ('a', 'bored', 'warning')",
        "INSERT INTO warden.incidents (agent_id, issue_type, severity) VALUES ('a', 'flapping', 'meh')",
        "INSERT INTO warden.performance_metrics (agent_id, recorded_at, name, value) VALUES ('a', now(), 'cpu', 'NaN')",
    ];
    for sql in bad {
        let err = client.execute(sql, &[]).await.expect_err(sql);
        assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION), "{sql}: {err}");
    }
}

#[tokio::test]
async fn only_one_incident_per_agent_and_issue_can_be_open() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let open = "INSERT INTO warden.incidents (agent_id, issue_type, severity) VALUES ('a', 'flapping', 'warning')";
    client.execute(open, &[]).await.unwrap();
    let err = client.execute(open, &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION));
    client.execute("UPDATE warden.incidents SET state = 'resolved', resolved_at = now()", &[]).await.unwrap();
    client.execute(open, &[]).await.expect("a new episode may open once the last is resolved");
}

/// A score breakdown of the size the evaluator writes (about 500 bytes).
const COMPONENTS: &str = r#"{"error_rate": {"score": null, "inputs": {}, "weight": 0.0},
    "performance": {"score": null, "inputs": {}, "weight": 0.0},
    "business_impact": {"score": null, "inputs": {}, "weight": 0.0},
    "resource_efficiency": {"score": null, "inputs": {}, "weight": 0.0},
    "heartbeat_consistency": {"score": 60.42, "inputs": {"delivery": 1.0, "jitter_cv": 0.5}, "weight": 1.0}}"#;

/// Every migration, for tests that stop at an earlier version first.
mod all_migrations {
    refinery::embed_migrations!("migrations");
}

/// A database migrated up to `version` only, for a test of the one after.
async fn migrated_up_to(version: i32) -> (TestDb, tokio_postgres::Client) {
    let db = TestDb::empty().await;
    let mut client = db.client().await;
    client.batch_execute("CREATE SCHEMA warden").await.unwrap();
    all_migrations::migrations::runner()
        .set_target(refinery::Target::Version(version))
        .set_grouped(true)
        .set_migration_table_name("warden.refinery_schema_history")
        .run_async(&mut client)
        .await
        .unwrap();
    (db, client)
}

#[tokio::test]
async fn moving_components_to_the_end_of_the_row_keeps_every_breakdown() {
    let (_db, mut client) = migrated_up_to(13).await;
    for agent in ["scored", "unscored"] {
        client.execute("SELECT warden.record_heartbeat($1, uptime_seconds => 1)", &[&agent]).await.unwrap();
    }
    client
        .execute(
            "UPDATE warden.agent_status SET components = $1::text::jsonb WHERE agent_id = 'scored'",
            &[&COMPONENTS],
        )
        .await
        .unwrap();

    let outcome = migrate::run(&mut client).await.unwrap();
    assert!(outcome.applied.iter().any(|m| m.contains("components_last")), "{:?}", outcome.applied);

    let rows = client
        .query(
            "SELECT agent_id, components = $1::text::jsonb, components IS NULL \
             FROM warden.agent_status ORDER BY agent_id",
            &[&COMPONENTS],
        )
        .await
        .unwrap();
    let got: Vec<(String, Option<bool>, bool)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(got, [("scored".into(), Some(true), false), ("unscored".into(), None, true)]);
    let last: String = client
        .query_one(
            "SELECT attname::text FROM pg_attribute \
             WHERE attrelid = 'warden.agent_status'::regclass AND attnum > 0 AND NOT attisdropped \
             ORDER BY attnum DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(last, "components");
}

#[tokio::test]
async fn agents_from_before_v22_are_owed_what_their_interval_gave_and_keep_their_breakdown() {
    let (_db, mut client) = migrated_up_to(21).await;
    client.execute("SELECT warden.record_heartbeat('old', 'active', uptime_seconds => 1)", &[]).await.unwrap();
    client
        .execute(
            "UPDATE warden.agent_status SET components = $1::text::jsonb, first_seen = last_seen - interval '2 hours'",
            &[&COMPONENTS],
        )
        .await
        .unwrap();

    let outcome = migrate::run(&mut client).await.unwrap();
    assert!(outcome.applied.iter().any(|m| m.contains("ingest_rescale")), "{:?}", outcome.applied);
    let row = client
        .query_one("SELECT beats_expected, components = $1::text::jsonb FROM warden.agent_status", &[&COMPONENTS])
        .await
        .unwrap();
    let owed: f64 = row.get(0);
    // Two hours at 30 s: 120 an hour, decayed with a one-hour constant.
    let want = 120.0 * (1.0 - (-2.0_f64).exp());
    assert!((owed - want).abs() < 1e-6, "{owed} vs {want}");
    assert!(row.get::<_, bool>(1), "the breakdown survives the move");
    let last: String = client
        .query_one(
            "SELECT attname::text FROM pg_attribute \
             WHERE attrelid = 'warden.agent_status'::regclass AND attnum > 0 AND NOT attisdropped \
             ORDER BY attnum DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(last, "components", "the score breakdown stays behind what every heartbeat writes");
}

/// A heartbeat to a scored agent logs the columns it changes, not the
/// score breakdown it leaves alone (PostgreSQL logs an in-page update from
/// the first to the last byte that differ).
#[tokio::test]
async fn a_heartbeat_does_not_log_the_score_breakdown_again() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client.batch_execute("CREATE EXTENSION pg_walinspect").await.expect("pg_walinspect (PostgreSQL 15+ contrib)");
    client.execute("SELECT warden.record_heartbeat('scored', uptime_seconds => 1)", &[]).await.unwrap();
    client.execute("UPDATE warden.agent_status SET components = $1::text::jsonb", &[&COMPONENTS]).await.unwrap();
    let breakdown: i32 =
        client.query_one("SELECT pg_column_size(components) FROM warden.agent_status", &[]).await.unwrap().get(0);
    assert!(breakdown > 400, "breakdown of {breakdown} bytes");

    // A checkpoint between two statements makes the next write of the page
    // log the whole page instead; a few tries find a plain record. (The WAL
    // is the cluster's: every test database, cloned from one template, has
    // the same file node, so the record is picked by this database's OID.)
    for uptime in 2..6_i64 {
        let start: String = client.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap().get(0);
        client.execute("SELECT warden.record_heartbeat('scored', uptime_seconds => $1)", &[&uptime]).await.unwrap();
        let record = client
            .query_one(
                "SELECT record_length, fpi_length \
                 FROM pg_get_wal_records_info($1::text::pg_lsn, pg_current_wal_flush_lsn()) \
                 WHERE resource_manager = 'Heap' AND record_type IN ('UPDATE', 'HOT_UPDATE') \
                   AND block_ref LIKE '%/' || (SELECT oid FROM pg_database WHERE datname = current_database()) \
                                      || '/' || pg_relation_filenode('warden.agent_status') || ' %'",
                &[&start],
            )
            .await
            .unwrap();
        let (length, fpi): (i32, i32) = (record.get(0), record.get(1));
        if fpi == 0 {
            assert!(length < breakdown / 2, "a heartbeat logged {length} bytes for agent_status");
            return;
        }
    }
    panic!("every heartbeat's update logged a full page");
}

#[tokio::test]
async fn a_migration_cut_off_from_its_server_is_worth_waiting_for_and_a_failing_one_is_not() {
    // refinery wraps the driver's error in its own: start-up waits out a
    // failover only if the cause inside is still read as connectivity.
    use refinery::error::WrapMigrationError;
    let db = TestDb::empty().await;
    let doomed = db.client().await;
    let pid: i32 = doomed.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    db.client().await.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.unwrap();
    let cut = crate::helpers::eventually(Duration::from_secs(30), "the connection gone", || async {
        doomed.simple_query("SELECT 1").await.err()
    })
    .await;
    let cut = migrate::MigrateError::Refinery(Err::<(), _>(cut).migration_err("applying V1", None).unwrap_err());
    assert!(cut.is_unavailable(), "{cut}");

    let failed = db.client().await.simple_query("SELEC 1").await.unwrap_err();
    let failed = migrate::MigrateError::Refinery(Err::<(), _>(failed).migration_err("applying V1", None).unwrap_err());
    assert!(!failed.is_unavailable(), "{failed}");
    let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
    let reset = migrate::MigrateError::Refinery(Err::<(), _>(reset).migration_err("applying V1", None).unwrap_err());
    assert!(reset.is_unavailable(), "{reset}");
}
