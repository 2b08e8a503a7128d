//! Settings: defaults, the three layers, and every way a value is refused.

use std::collections::HashMap;
use std::io::Write;

use warden::config::{Duration, LogFormat, Settings, SettingsError, Sources};

fn load_env(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
    let env: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Settings::load(&Sources { file: None, env: Some(env) })
}

fn refused(vars: &[(&str, &str)]) -> SettingsError {
    load_env(vars).expect_err("these settings must be refused")
}

fn override_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

#[test]
fn defaults_load_and_match_the_documented_values() {
    let s = load_env(&[]).unwrap();
    assert_eq!(s.server.listen.to_string(), "127.0.0.1:8080");
    assert!(s.database.url.is_empty(), "default is the embedded cluster");
    assert_eq!(s.database.data_dir, std::path::PathBuf::from(".warden/pgdata"));
    assert_eq!(s.database.pool_size, 16);
    assert_eq!(s.database.partitions_ahead_days, 7);
    assert!(s.database.migrate_on_start);
    assert_eq!(s.telemetry.format, LogFormat::Pretty);
    assert_eq!(s.server.request_timeout, Duration::from_secs(30));
}

#[test]
fn a_shutdown_timeout_of_zero_is_refused() {
    let e = refused(&[("WARDEN__SERVER__SHUTDOWN_TIMEOUT", "0s")]);
    assert_eq!(e.key.as_deref(), Some("server.shutdown_timeout"), "{e}");
}

#[test]
fn a_heartbeat_weight_of_zero_is_refused() {
    // Agents without metrics would have no score at all, and keep a stale one.
    let e = refused(&[
        ("WARDEN__HEALTH__WEIGHTS__HEARTBEAT_CONSISTENCY", "0"),
        ("WARDEN__HEALTH__WEIGHTS__PERFORMANCE", "0.55"),
    ]);
    assert_eq!(e.key.as_deref(), Some("health.weights.heartbeat_consistency"), "{e}");
    assert!(e.allowed.contains("above 0"), "{e}");
}

#[test]
fn environment_overrides_every_kind_of_value() {
    let s = load_env(&[
        ("WARDEN__SERVER__LISTEN", "0.0.0.0:9999"),
        ("WARDEN__SERVER__REQUEST_TIMEOUT", "1m30s"),
        ("WARDEN__DATABASE__POOL_SIZE", "5"),
        ("WARDEN__DATABASE__MIGRATE_ON_START", "false"),
        ("WARDEN__TELEMETRY__FORMAT", "json"),
    ])
    .unwrap();
    assert_eq!(s.server.listen.port(), 9999);
    assert_eq!(s.server.request_timeout, Duration::from_secs(90));
    assert_eq!(s.database.pool_size, 5);
    assert!(!s.database.migrate_on_start);
    assert_eq!(s.telemetry.format, LogFormat::Json);
}

#[test]
fn environment_beats_the_file_and_the_file_beats_the_defaults() {
    let file = override_file("[database]\npool_size = 5\nstatement_timeout = \"10s\"\n");
    let env: HashMap<String, String> = [("WARDEN__DATABASE__POOL_SIZE".to_string(), "7".to_string())].into();
    let s = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(env) }).unwrap();
    assert_eq!(s.database.pool_size, 7, "environment wins over the file");
    assert_eq!(s.database.statement_timeout, Duration::from_secs(10), "file wins over defaults");
    assert_eq!(s.database.connect_timeout, Duration::from_secs(5), "untouched keys keep their defaults");
}

#[test]
fn a_word_where_a_number_belongs_names_key_value_and_origin() {
    let e = refused(&[("WARDEN__DATABASE__POOL_SIZE", "banana")]);
    assert_eq!(e.key.as_deref(), Some("database.pool_size"));
    assert_eq!(e.value.as_deref(), Some("banana"));
    assert_eq!(e.origin.as_deref(), Some("WARDEN__DATABASE__POOL_SIZE"));
    let line = e.to_string();
    assert!(!line.contains('\n'), "one line: {line}");
    assert!(line.contains("database.pool_size") && line.contains("banana") && line.contains("whole number"), "{line}");
}

#[test]
fn out_of_range_numbers_say_the_range() {
    for (var, key, value) in [
        ("WARDEN__DATABASE__POOL_SIZE", "database.pool_size", "0"),
        ("WARDEN__DATABASE__POOL_SIZE", "database.pool_size", "1001"),
        ("WARDEN__DATABASE__PARTITIONS_AHEAD_DAYS", "database.partitions_ahead_days", "0"),
        ("WARDEN__DATABASE__PARTITIONS_AHEAD_DAYS", "database.partitions_ahead_days", "400"),
    ] {
        let e = refused(&[(var, value)]);
        assert_eq!(e.key.as_deref(), Some(key));
        assert_eq!(e.value.as_deref(), Some(value));
        assert!(e.allowed.contains("from 1 to"), "{e}");
    }
}

#[test]
fn too_short_durations_are_refused_with_the_minimum() {
    for (var, key) in [
        ("WARDEN__DATABASE__CONNECT_TIMEOUT", "database.connect_timeout"),
        ("WARDEN__DATABASE__ACQUIRE_TIMEOUT", "database.acquire_timeout"),
        ("WARDEN__DATABASE__STATEMENT_TIMEOUT", "database.statement_timeout"),
        ("WARDEN__DATABASE__MAX_LIFETIME", "database.max_lifetime"),
        ("WARDEN__SERVER__REQUEST_TIMEOUT", "server.request_timeout"),
    ] {
        let e = refused(&[(var, "1ms")]);
        assert_eq!(e.key.as_deref(), Some(key), "{e}");
        assert!(e.allowed.contains("at least"), "{e}");
    }
}

#[test]
fn durations_need_a_unit_and_a_sane_shape() {
    let e = refused(&[("WARDEN__SERVER__REQUEST_TIMEOUT", "30")]);
    assert_eq!(e.key.as_deref(), Some("server.request_timeout"));
    assert!(e.allowed.contains("30s"), "{e}");
    let e = refused(&[("WARDEN__SERVER__SHUTDOWN_TIMEOUT", "soon")]);
    assert_eq!(e.key.as_deref(), Some("server.shutdown_timeout"));
    assert!(e.allowed.contains("duration"), "{e}");
}

#[test]
fn a_bad_listen_address_shows_the_expected_form() {
    let e = refused(&[("WARDEN__SERVER__LISTEN", "localhost")]);
    assert_eq!(e.key.as_deref(), Some("server.listen"));
    assert!(e.allowed.contains("address:port"), "{e}");
}

#[test]
fn unknown_enum_values_list_the_allowed_ones() {
    let e = refused(&[("WARDEN__TELEMETRY__FORMAT", "xml")]);
    assert_eq!(e.key.as_deref(), Some("telemetry.format"));
    assert!(e.allowed.contains("pretty") && e.allowed.contains("json"), "{e}");
}

#[test]
fn an_invalid_log_filter_is_refused() {
    let e = refused(&[("WARDEN__TELEMETRY__LEVEL", "warden=[")]);
    assert_eq!(e.key.as_deref(), Some("telemetry.level"));
}

#[test]
fn an_unknown_key_is_named_with_its_valid_siblings() {
    let e = refused(&[("WARDEN__SERVER__LISTEM", "0.0.0.0:1")]);
    assert_eq!(e.key.as_deref(), Some("server.listem"));
    assert!(e.allowed.contains("listen"), "{e}");
    let e = refused(&[("WARDEN__NOSUCHSECTION__X", "1")]);
    assert_eq!(e.key.as_deref(), Some("nosuchsection"));
}

#[test]
fn a_mistyped_key_never_shows_its_value() {
    // Redaction goes by the key's name, which a typo defeats: the value of
    // an unknown key is left out altogether.
    let e = refused(&[("WARDEN__ALERTING__SMTP__PASS", "hunter2")]);
    assert_eq!(e.key.as_deref(), Some("alerting.smtp.pass"));
    assert_eq!(e.value, None);
    assert!(!e.to_string().contains("hunter2") && e.to_string().contains("password"), "{e}");
    let file =
        override_file("[alerting.channels.ops]\nkind = \"slack\"\nwebhook = \"https://hooks.example/T0/SECRET\"\n");
    let e = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) }).unwrap_err();
    assert!(e.key.as_deref().is_some_and(|k| k.ends_with("webhook")), "{e}");
    assert!(!e.to_string().contains("SECRET"), "{e}");
}

#[test]
fn a_bad_value_in_an_array_of_tables_is_named_by_its_path_with_value_and_file() {
    let file = override_file(
        "[[recovery.strategies]]\nname = \"r\"\nissues = [\"nope\"]\n\n\
         [[recovery.strategies.actions]]\nkind = \"command\"\nargv = [\"true\"]\n",
    );
    let e = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) }).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("recovery.strategies[0].issues[0]"));
    assert_eq!(e.value.as_deref(), Some("nope"));
    assert_eq!(e.origin.as_deref(), Some(file.path().to_str().unwrap()));
}

#[test]
fn status_groups_are_named_groups() {
    let file = override_file("[console]\nstatus_groups = [\"Payments\", \" \"]\n");
    let e = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) }).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("console.status_groups[1]"), "{e}");
    let file = override_file("[console]\nstatus_groups = [\"Payments\"]\nstatus_ungrouped = \"Other\"\n");
    let s = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) }).unwrap();
    assert!(s.console.status_group_shown("Payments") && s.console.status_group_shown("Other"));
    assert!(!s.console.status_group_shown("Search"));
}

#[test]
fn an_error_about_a_whole_table_does_not_print_the_table() {
    let file = override_file(
        "[[recovery.strategies]]\nname = \"r\"\nissues = [\"agent_unresponsive\"]\n\n\
         [[recovery.strategies.actions]]\nkind = \"http\"\nurl = \"http://ops:pw@orch/restart?api_token=T0K3N\"\n\
         headers = { Authorization = \"Bearer hunter2\" }\nattempts = \"two\"\n",
    );
    let e = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) }).unwrap_err();
    let line = e.to_string();
    assert_eq!(e.key.as_deref(), Some("recovery.strategies[0].actions[0].attempts"), "{line}");
    assert_eq!(e.value.as_deref(), Some("two"), "{line}");
    assert!(!line.contains("hunter2") && !line.contains("T0K3N") && !line.contains("pw@"), "{line}");
}

/// A recovery action's fields depend on its kind, so serde reads the table
/// whole; a mistake in it still names the field.
#[test]
fn a_recovery_action_names_its_bad_or_unknown_field() {
    let load = |action: &str| {
        let file = override_file(&format!(
            "[[recovery.strategies]]\nname = \"r\"\nissues = [\"agent_unresponsive\"]\n\n\
             [[recovery.strategies.actions]]\nkind = \"command\"\nargv = [\"true\"]\n{action}\n"
        ));
        Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) })
    };
    let e = load("timeout = 30").unwrap_err();
    assert_eq!(e.key.as_deref(), Some("recovery.strategies[0].actions[0].timeout"), "{e}");
    assert_eq!(e.value.as_deref(), Some("30"), "{e}");
    assert!(e.allowed.contains("30s"), "{e}");
    // A mistyped key used to be ignored, leaving the default in force.
    let e = load("timout = \"5s\"").unwrap_err();
    assert_eq!(e.key.as_deref(), Some("recovery.strategies[0].actions[0].timout"), "{e}");
    assert!(e.allowed.contains("timeout"), "{e}");
    load("timeout = \"5s\"").expect("a well-formed action loads");
    load("name = \"restart the unit\"").expect("a name with spaces loads");
    let e = load(&format!("name = \"{}\"", "x".repeat(65))).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("recovery.strategies[0].actions[0].name"), "{e}");
    assert!(e.allowed.contains("1-64 characters"), "{e}");
    let e = load("name = \"two\\nlines\"").unwrap_err();
    assert_eq!(e.key.as_deref(), Some("recovery.strategies[0].actions[0].name"), "{e}");
    // A value that also sits in a nested field names no field rather than
    // the wrong one.
    let file = override_file(
        "[[recovery.strategies]]\nname = \"r\"\nissues = [\"agent_unresponsive\"]\n\n\
         [[recovery.strategies.actions]]\nkind = \"http\"\nurl = \"http://orch/restart\"\ntimeout = 5\n\
         body = { retries = 5 }\n",
    );
    let e = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) }).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("recovery.strategies[0].actions[0]"), "{e}");
    let file = override_file(
        "[[recovery.strategies]]\nname = \"r\"\nissues = [\"agent_unresponsive\"]\n\n\
         [[recovery.strategies.actions]]\nkind = \"http\"\nurl = \"http://orch/restart\"\ntimeout = 5\n\
         body = { retries = \"5\" }\n",
    );
    let e = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) }).unwrap_err();
    assert_eq!(
        e.key.as_deref(),
        Some("recovery.strategies[0].actions[0].timeout"),
        "a string 5 is not an integer 5: {e}"
    );
}

#[test]
fn a_header_given_as_a_string_never_prints_its_credential() {
    let file = override_file(
        "[[recovery.strategies]]\nname = \"r\"\nissues = [\"agent_unresponsive\"]\n\n\
         [[recovery.strategies.actions]]\nkind = \"http\"\nurl = \"http://orch/restart\"\n\
         headers = \"Authorization: Bearer hunter2\"\n",
    );
    let e = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) }).unwrap_err();
    assert!(e.key.as_deref().is_some_and(|k| k.starts_with("recovery.strategies[0].actions[0]")), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

#[test]
fn a_malformed_template_never_prints_the_credential_beside_it() {
    // The value is redacted for these fields; the reason used to quote the
    // template (an unclosed brace) or the "placeholder" (a JSON body or
    // header read as one).
    let cases = [
        "url = \"https://orch/restart?token=hunter2&agent={agent_id\"",
        "url = \"https://orch/restart?token={hunter2}\"",
        "url = \"https://orch/restart\"\nheaders = { X-Api-Key = \"{\\\"key\\\": \\\"hunter2\\\"}\" }",
        "url = \"https://orch/restart\"\nheaders = { Authorization = \"Bearer {env.hunter2}\" }",
        "url = \"https://orch/restart\"\nbody = { auth = \"{hunter2\" }",
    ];
    for case in cases {
        let file = override_file(&format!(
            "[[recovery.strategies]]\nname = \"r\"\nissues = [\"agent_unresponsive\"]\n\n\
             [[recovery.strategies.actions]]\nkind = \"http\"\n{case}\n"
        ));
        let e = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) })
            .expect_err(case);
        let shown = e.to_string();
        assert!(!shown.contains("hunter2"), "{case}: {shown}");
        assert!(shown.contains("at character"), "says where instead: {shown}");
    }
    // A command's arguments are no secret field, yet one may carry a token.
    let file = override_file(
        "[[recovery.strategies]]\nname = \"r\"\nissues = [\"agent_unresponsive\"]\n\n\
         [[recovery.strategies.actions]]\nkind = \"command\"\n\
         argv = [\"/usr/bin/restart\", \"{agent_id}\", \"--token={hunter2\"]\n",
    );
    let e = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) })
        .expect_err("an unclosed placeholder");
    let shown = e.to_string();
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("argv[2]") && shown.contains("at character 9"), "says which and where: {shown}");
}

#[test]
fn a_secret_that_is_set_but_invalid_shows_redacted_not_empty() {
    let e = refused(&[("WARDEN__TELEMETRY__SELF_HEARTBEAT_URL", "ftp://user:pw@host/x")]);
    assert_eq!(e.key.as_deref(), Some("telemetry.self_heartbeat_url"));
    assert_eq!(e.value.as_deref(), Some("[redacted]"), "{e}");
    assert!(!e.to_string().contains("pw@"), "{e}");
}

#[test]
fn a_negative_or_oversized_whole_number_says_so() {
    for (value, says) in [("-1", "0 or more"), ("99999999999", "too large"), ("ten", "whole number")] {
        let e = refused(&[("WARDEN__DATABASE__POOL_SIZE", value)]);
        assert_eq!(e.key.as_deref(), Some("database.pool_size"), "{e}");
        assert!(e.allowed.contains(says) && !e.allowed.contains("bit"), "{value}: {e}");
    }
    let file = override_file("[database]\npool_size = -1\n");
    let e = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) }).unwrap_err();
    assert!(e.allowed.contains("0 or more"), "{e}");
}

#[test]
fn a_fraction_in_the_file_is_refused_where_a_whole_number_is_wanted() {
    for (text, key) in [
        ("[database]\npool_size = 20.5\n", "database.pool_size"),
        ("[alerting.smtp]\nport = 25.7\n", "alerting.smtp.port"),
        ("[ingest]\nmax_batch = 0.4\n", "ingest.max_batch"),
    ] {
        let file = override_file(text);
        let e =
            Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) }).unwrap_err();
        assert_eq!(e.key.as_deref(), Some(key), "{e}");
        assert!(e.allowed.contains("whole number"), "{e}");
        assert_eq!(e.origin.as_deref(), Some(file.path().to_str().unwrap()), "{e}");
    }
    // A whole number written as a float, and a float where one is wanted, are fine.
    let file = override_file("[database]\npool_size = 20.0\n[health]\njitter_tolerance = 0.25\n");
    let s = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) }).unwrap();
    assert_eq!(s.database.pool_size, 20);
}

#[test]
fn smtp_credentials_name_the_missing_half_and_never_claim_a_secret_was_set() {
    let e = refused(&[("WARDEN__ALERTING__SMTP__TLS", "starttls"), ("WARDEN__ALERTING__SMTP__USERNAME", "bob")]);
    assert_eq!(e.key.as_deref(), Some("alerting.smtp.password"), "{e}");
    assert_eq!(e.value.as_deref(), Some(""), "{e}");
    let e = refused(&[("WARDEN__ALERTING__SMTP__TLS", "starttls"), ("WARDEN__ALERTING__SMTP__PASSWORD", "hunter2")]);
    assert_eq!(e.key.as_deref(), Some("alerting.smtp.username"), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

#[test]
fn a_refused_value_is_shown_as_written() {
    let e = refused(&[("WARDEN__HEALTH__CHECK_INTERVAL", "120m")]);
    assert_eq!(e.value.as_deref(), Some("120m"), "{e}");
    let file = override_file("[health]\ncheck_interval = \"1000y\"\n");
    let e = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) }).unwrap_err();
    assert_eq!((e.key.as_deref(), e.value.as_deref()), (Some("health.check_interval"), Some("1000y")), "{e}");
}

#[test]
fn a_value_out_of_range_names_where_it_came_from() {
    let e = refused(&[("WARDEN__HEALTH__CHECK_INTERVAL", "0s")]);
    assert_eq!(e.origin.as_deref(), Some("WARDEN__HEALTH__CHECK_INTERVAL"), "{e}");
    let file = override_file("[database]\npool_size = 0\n");
    let e = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) }).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("database.pool_size"));
    assert_eq!(e.origin.as_deref(), Some(file.path().to_str().unwrap()), "{e}");
}

#[test]
fn the_embedded_cluster_needs_a_data_dir() {
    let e = refused(&[("WARDEN__DATABASE__DATA_DIR", "")]);
    assert_eq!(e.key.as_deref(), Some("database.data_dir"));
    load_env(&[("WARDEN__DATABASE__DATA_DIR", ""), ("WARDEN__DATABASE__URL", "postgres://db/x")])
        .expect("a URL makes the data directory irrelevant");
}

#[test]
fn a_broken_or_missing_override_file_is_named() {
    let file = override_file("[server\nlisten = ");
    let e = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) }).unwrap_err();
    assert_eq!(e.origin.as_deref(), Some(file.path().to_str().unwrap()));
    assert!(e.allowed.contains("TOML"), "{e}");

    let missing = std::path::PathBuf::from("/nonexistent/warden.toml");
    let e = Settings::load(&Sources { file: Some(missing), env: Some(HashMap::new()) }).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/warden.toml"), "{e}");
}

#[test]
fn a_wrong_type_in_the_file_names_the_file() {
    let file = override_file("[database]\nmigrate_on_start = \"perhaps\"\n");
    let e = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) }).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("database.migrate_on_start"));
    assert_eq!(e.origin.as_deref(), Some(file.path().to_str().unwrap()));
}

#[test]
fn printed_settings_redact_secrets_but_show_empty_ones() {
    let s = load_env(&[("WARDEN__DATABASE__URL", "postgres://warden:hunter2@db/warden")]).unwrap();
    let printed = s.to_redacted_toml();
    assert!(!printed.contains("hunter2"), "{printed}");
    assert!(printed.contains("url = \"[redacted]\""), "{printed}");
    assert!(!format!("{s:?}").contains("hunter2"), "Debug must not leak either");
    let printed = load_env(&[]).unwrap().to_redacted_toml();
    assert!(printed.contains("url = \"\""), "an unset secret shows as empty: {printed}");
}

#[test]
fn printed_settings_redact_every_header_of_an_http_recovery_action() {
    let file = override_file(
        "[[recovery.strategies]]\nname = \"r\"\nissues = [\"agent_unresponsive\"]\n\n\
         [[recovery.strategies.actions]]\nkind = \"http\"\nurl = \"http://orchestrator/restart\"\n\
         headers = { Authorization = \"Bearer hunter2\", X-Team = \"ops\" }\n",
    );
    let s = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) }).unwrap();
    let printed = s.to_redacted_toml();
    assert!(!printed.contains("hunter2") && !printed.contains("ops\""), "{printed}");
    assert!(printed.contains("Authorization = \"[redacted]\""), "{printed}");
}

#[test]
fn the_body_of_an_http_recovery_action_is_never_printed() {
    let strategy = "[[recovery.strategies]]\nname = \"r\"\nissues = [\"agent_unresponsive\"]\n\n\
         [[recovery.strategies.actions]]\nkind = \"http\"\nurl = \"http://orchestrator/restart\"\n";
    let file = override_file(&format!("{strategy}body = {{ api_key = \"hunter2\", agent = \"{{agent_id}}\" }}\n"));
    let s = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) }).unwrap();
    let printed = s.to_redacted_toml();
    assert!(!printed.contains("hunter2"), "{printed}");
    assert!(printed.contains("body = \"[redacted]\""), "{printed}");
    // Nor in the error about a bad placeholder in it.
    let file = override_file(&format!("{strategy}body = {{ api_key = \"hunter2\", agent = \"{{nope}}\" }}\n"));
    let e = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) }).unwrap_err();
    assert!(e.key.as_deref().unwrap().ends_with(".body"), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

#[test]
fn a_value_where_a_table_belongs_is_named_in_toml_words() {
    let file = override_file("server = 5\n");
    let e = Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) }).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("server"));
    assert!(e.allowed.contains("expected a table") && !e.allowed.contains("Settings"), "{e}");
}

#[test]
fn a_header_reads_only_set_warden_secret_variables() {
    let strategy = "[[recovery.strategies]]\nname = \"r\"\nissues = [\"agent_unresponsive\"]\n\n\
         [[recovery.strategies.actions]]\nkind = \"http\"\nurl = \"http://orchestrator/restart\"\n";
    let load = |header: &str| {
        let file = override_file(&format!("{strategy}headers = {{ authorization = \"{header}\" }}\n"));
        Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) })
    };
    // An unset variable loads (commands that never run recovery work without
    // it), and is refused where recovery would run.
    let settings = load("Bearer {env.WARDEN_SECRET_SURELY_NOT_SET_12345}").unwrap();
    let e = settings.recovery.check_secret_env().unwrap_err();
    assert!(e.key.as_deref().unwrap().ends_with("headers.authorization"), "{e}");
    assert!(e.allowed.contains("is not set"), "{e}");
    let mut off = settings.recovery.clone();
    off.enabled = false;
    assert!(off.check_secret_env().is_ok(), "recovery off: nothing will send it");
    let e = load("Bearer {env.HOME}").unwrap_err();
    assert!(e.allowed.contains("WARDEN_SECRET_"), "{e}");
    // PATH is set everywhere, and still not WARDEN_SECRET_: refused.
    assert!(load("{env.PATH}").is_err());
}

#[test]
fn an_http_action_takes_placeholders_only_in_its_path_and_query() {
    // A label is the agent's own text: in the host it would choose where
    // the request, and its credential headers, go.
    let load = |url: &str| {
        let file = override_file(&format!(
            "[[recovery.strategies]]\nname = \"r\"\nissues = [\"agent_unresponsive\"]\n\n\
             [[recovery.strategies.actions]]\nkind = \"http\"\nurl = \"{url}\"\n\
             headers = {{ x-api-key = \"orch-key\" }}\n"
        ));
        Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(HashMap::new()) })
    };
    for url in [
        "http://{label.host}/restart",
        "http://orch.{label.zone}.example/restart",
        "http://orch:{label.port}/restart",
        "http://{agent_id}@orch/restart",
        "{label.scheme}://orch/restart",
        "http:/{label.host}/restart",
        "http://orch{label.host}?agent=a",
    ] {
        let e = load(url).expect_err(url);
        assert_eq!(e.key.as_deref(), Some("recovery.strategies[0].actions[0].url"), "{url}: {e}");
        assert!(e.allowed.contains("only in the path and query"), "{url}: {e}");
    }
    for url in [
        "http://orch/restart/{agent_id}",
        "http://orch:8000/v1/{label.pool}/restart?incident={incident_id}",
        "https://orch?agent={agent_id}",
    ] {
        load(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    }
}

#[test]
fn settings_that_could_not_work_are_refused_by_name() {
    load_env(&[("WARDEN__SERVER__MAX_STREAMS", "16")]).expect("fewer streams than one key may hold is fine");
    let e = refused(&[("WARDEN__DATABASE__POOL_SIZE", "3"), ("WARDEN__INGEST__WRITERS", "2")]);
    assert_eq!(e.key.as_deref(), Some("database.pool_size"));
    assert!(e.allowed.contains("ingest.writers + 2 (4)"), "{e}");
    assert!(load_env(&[("WARDEN__DATABASE__POOL_SIZE", "4"), ("WARDEN__INGEST__WRITERS", "2")]).is_ok());
    for (var, key, value) in [
        ("WARDEN__INGEST__MAX_CLOCK_SKEW", "ingest.max_clock_skew", "300000y"),
        ("WARDEN__INGEST__MAX_CLOCK_SKEW", "ingest.max_clock_skew", "2d"),
        ("WARDEN__HEALTH__FLEET_OUTAGE_WINDOW", "health.fleet_outage_window", "0s"),
        ("WARDEN__HEALTH__RESTART_LOOP_WINDOW", "health.restart_loop_window", "0s"),
        ("WARDEN__HEALTH__CHECK_INTERVAL", "health.check_interval", "100d"),
        ("WARDEN__HEALTH__FLEET_OUTAGE_MIN_AGENTS", "health.fleet_outage_min_agents", "0"),
        ("WARDEN__SERVER__MAX_STREAMS_PER_KEY", "server.max_streams_per_key", "0"),
    ] {
        let e = refused(&[(var, value)]);
        assert_eq!(e.key.as_deref(), Some(key), "{value}: {e}");
    }
}

#[test]
fn a_malformed_database_url_is_refused_without_echoing_it() {
    let e = warden::db::parse_url("postgres://user:hunter2@host:notaport/db").unwrap_err();
    assert_eq!(e.key.as_deref(), Some("database.url"));
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

#[test]
fn the_shipped_settings_file_is_the_compiled_default() {
    let on_disk = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/settings.toml")).unwrap();
    assert_eq!(on_disk, warden::config::DEFAULTS);
}

#[test]
fn database_tls_settings_are_checked_together() {
    let e = refused(&[
        ("WARDEN__DATABASE__URL", "postgres://db.example/warden"),
        ("WARDEN__DATABASE__TLS_CA_FILE", "/etc/ca.pem"),
    ]);
    assert_eq!(e.key.as_deref(), Some("database.tls_ca_file"));
    assert!(e.allowed.contains("tls_verify"), "{e}");
    let e = refused(&[("WARDEN__DATABASE__TLS_VERIFY", "full")]);
    assert_eq!(e.key.as_deref(), Some("database.tls_verify"), "the embedded cluster has no TLS");
    let e = refused(&[("WARDEN__DATABASE__TLS_VERIFY", "verify-full")]);
    assert!(e.allowed.contains("none") && e.allowed.contains("full"), "{e}");
    let s = load_env(&[
        ("WARDEN__DATABASE__URL", "postgres://db.example/warden"),
        ("WARDEN__DATABASE__TLS_VERIFY", "full"),
        ("WARDEN__DATABASE__TLS_CA_FILE", "/etc/ca.pem"),
    ])
    .unwrap();
    assert_eq!(s.database.tls_verify, warden::config::TlsVerify::Full);
}

#[test]
fn a_list_from_the_environment_is_refused_by_name() {
    // The environment holds one string per key; lists come from a file
    // (docs/configuration.md), and saying so beats taking the string.
    let e = refused(&[("WARDEN__SERVER__ALLOWED_HOSTS", "warden.example.com")]);
    assert_eq!(e.key.as_deref(), Some("server.allowed_hosts"), "{e}");
    assert!(e.to_string().contains("WARDEN__SERVER__ALLOWED_HOSTS"), "names where it came from: {e}");
}

#[test]
fn a_setting_variable_missing_an_underscore_is_refused_not_ignored() {
    // Ignored, it would leave database.url unset: an embedded cluster.
    let e = refused(&[("WARDEN_DATABASE__URL", "postgres://db/warden")]);
    let text = e.to_string();
    assert!(text.contains("WARDEN_DATABASE__URL") && text.contains("WARDEN__DATABASE__URL"), "{text}");
    // warden's own single-underscore variables are not settings.
    for name in ["WARDEN_CONFIG", "WARDEN_KEY", "WARDEN_SECRET_SLACK__HOOK", "WARDEN_AGENT_ID"] {
        assert!(load_env(&[(name, "x")]).is_ok(), "{name}");
    }
}

#[test]
fn an_error_names_the_variable_below_its_key_that_set_it() {
    let e = refused(&[("WARDEN__HELTH__CHECK_INTERVAL", "5s")]);
    assert_eq!(e.origin.as_deref(), Some("WARDEN__HELTH__CHECK_INTERVAL"), "{e}");
    let e = refused(&[("WARDEN__HEALTH__WEIGHTS__PERFORMANCE", "0.5")]);
    assert_eq!(e.key.as_deref(), Some("health.weights"), "{e}");
    assert_eq!(e.origin.as_deref(), Some("WARDEN__HEALTH__WEIGHTS__PERFORMANCE"), "{e}");
    assert!(e.to_string().contains("WARDEN__HEALTH__WEIGHTS__PERFORMANCE"), "{e}");
}
