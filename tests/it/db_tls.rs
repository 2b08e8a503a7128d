//! TLS to PostgreSQL, against a private cluster this test starts with a
//! certificate of its own CA and a pg_hba.conf that refuses TCP without
//! TLS (never the shared cluster).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use warden::app::Application;
use warden::config::{Secret, Settings, TlsVerify};
use warden::db::embedded::EmbeddedCluster;

use crate::helpers::{default_settings, eventually};

/// Each test's cluster listens on a loopback address of its own, so that it
/// can take PostgreSQL's port without meeting the machine's cluster (on
/// 127.0.0.1) or another test's.
struct TlsCluster {
    cluster: Option<EmbeddedCluster>,
    dir: tempfile::TempDir,
    host: &'static str,
}

impl TlsCluster {
    async fn start(host: &'static str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = dir.path().join("pgdata");
        let cluster = EmbeddedCluster::start(&data, None).await.unwrap();
        let certs = dir.path();
        make_ca(certs, "ca");
        make_ca(certs, "other-ca");
        openssl(
            certs,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=warden test server",
            ],
        );
        std::fs::write(
            certs.join("server.ext"),
            format!(
                "subjectAltName=IP:{host}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
                 extendedKeyUsage=serverAuth\n"
            ),
        )
        .unwrap();
        openssl(
            certs,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        );
        // The server reads its key and certificate as the data directory's
        // owner, and refuses a key others can read.
        let owner = std::fs::metadata(&data).unwrap();
        for file in ["server.crt", "server.key"] {
            let to = data.join(file);
            std::fs::copy(certs.join(file), &to).unwrap();
            std::os::unix::fs::chown(&to, Some(owner.uid()), Some(owner.gid())).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(&format!(
            "\nlisten_addresses = '{host}'\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
        ));
        std::fs::write(&conf, text).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostnossl all all 0.0.0.0/0 reject\nhostssl all all 127.0.0.0/8 trust\n",
        )
        .unwrap();
        cluster.restart().await.unwrap();
        Self { cluster: Some(cluster), dir, host }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Settings reaching the cluster over TCP, its address called `name`.
    fn settings(&self, name: &str) -> Settings {
        let mut settings = default_settings();
        settings.database.url =
            Secret::new(format!("host={name} hostaddr={} port=5432 user=postgres dbname=warden", self.host));
        settings.database.pool_size = 4;
        settings.database.connect_timeout = warden::config::Duration::from_secs(10);
        settings.server.listen = "127.0.0.1:0".parse().unwrap();
        settings
    }

    /// A superuser session over the cluster's Unix socket.
    async fn admin(&self) -> tokio_postgres::Client {
        crate::helpers::connect(&self.cluster.as_ref().unwrap().connect_config()).await
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        if let Some(cluster) = self.cluster.take() {
            // Stopped on a runtime of its own: the test's may be gone.
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(cluster.stop())
            })
            .join()
            .unwrap();
        }
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn make_ca(dir: &Path, name: &str) {
    let (key, crt, subject) = (format!("{name}.key"), format!("{name}.crt"), format!("/CN=warden test {name}"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "2",
            "-subj",
            &subject,
        ],
    );
}

/// Whether the pool's connections are encrypted, from the server's view.
async fn pool_uses_tls(pool: &deadpool_postgres::Pool) -> Result<bool, String> {
    let client = warden::db::client(pool).await.map_err(|e| e.to_string())?;
    let row = client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_warden_uses_tls_when_the_server_offers_it_on_every_connection() {
    let pg = TlsCluster::start("127.0.0.57").await;
    // sslmode unset means prefer; this server refuses TCP without TLS.
    let app = Application::build(pg.settings(pg.host)).await.expect("warden starts against a TLS-only server");
    let base = format!("http://{}", app.local_addr());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run(shutdown.clone()));
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(60), "readiness", || async {
        let r = http.get(format!("{base}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    // The pool's sessions and the event stream's LISTEN session alike.
    let admin = pg.admin().await;
    eventually(Duration::from_secs(60), "the stream listener, over TLS", || async {
        let row = admin
            .query_one(
                "SELECT count(*) FILTER (WHERE s.ssl AND a.query LIKE 'LISTEN%'), count(*) FILTER (WHERE NOT s.ssl) \
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'warden'",
                &[],
            )
            .await
            .unwrap();
        let (listening, plain): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(plain, 0, "a warden session without TLS");
        (listening == 1).then_some(())
    })
    .await;
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn full_verification_trusts_the_configured_ca_and_the_host_name_only() {
    let pg = TlsCluster::start("127.0.0.58").await;
    let open = |host: &str, ca: &str| {
        let mut settings = pg.settings(host);
        settings.database.tls_verify = TlsVerify::Full;
        settings.database.tls_ca_file = pg.file(ca);
        async move { warden::db::Database::open(&settings.database).await.unwrap() }
    };

    let good = open(pg.host, "ca.crt").await;
    assert_eq!(pool_uses_tls(&good.pool).await, Ok(true));

    let impostor = open(pg.host, "other-ca.crt").await;
    let error = pool_uses_tls(&impostor.pool).await.expect_err("a certificate of another CA is refused");
    assert!(error.contains("does not trust the database's TLS certificate"), "{error}");
    // A mistake in the settings, not a database yet to come: serve stops
    // at once saying so, as for a refused login, rather than answer 503
    // for ever.
    let mut settings = pg.settings(pg.host);
    settings.database.tls_verify = TlsVerify::Full;
    settings.database.tls_ca_file = pg.file("other-ca.crt");
    let Err(error) = tokio::time::timeout(Duration::from_secs(60), Application::build(settings)).await.unwrap() else {
        panic!("serve started with a certificate it does not trust")
    };
    assert!(!error.is_temporary() && error.to_string().contains("TLS certificate"), "{error}");

    // The right CA, but the certificate names another host than the one asked for.
    let misnamed = open("db.example", "ca.crt").await;
    let error = pool_uses_tls(&misnamed.pool).await.expect_err("a certificate for another name is refused");
    assert!(error.contains("does not trust the database's TLS certificate"), "{error}");
}

#[tokio::test]
async fn tls_settings_that_contradict_each_other_are_refused_naming_the_setting() {
    let ca = tempfile::NamedTempFile::new().unwrap();
    let mut settings = default_settings();

    settings.database.url = Secret::new("host=127.0.0.1 sslmode=disable user=postgres");
    settings.database.tls_verify = TlsVerify::Full;
    let Err(error) = warden::db::Database::open(&settings.database).await else { panic!("sslmode=disable with full") };
    assert!(error.to_string().contains("database.tls_verify"), "{error}");

    settings.database.url = Secret::new("host=127.0.0.1 user=postgres");
    settings.database.tls_ca_file = ca.path().to_path_buf();
    let Err(error) = warden::db::Database::open(&settings.database).await else { panic!("an empty CA file") };
    assert!(error.to_string().contains("database.tls_ca_file"), "{error}");

    settings.database.tls_ca_file = PathBuf::from("/nonexistent/ca.pem");
    let Err(error) = warden::db::Database::open(&settings.database).await else { panic!("a missing CA file") };
    assert!(error.to_string().contains("database.tls_ca_file"), "{error}");

    settings.database.url = Secret::new("postgres://u:hunter2@db.example/warden?sslmode=verify-full");
    let Err(error) = warden::db::Database::open(&settings.database).await else { panic!("sslmode=verify-full") };
    let text = error.to_string();
    assert!(text.contains("database.tls_verify") && !text.contains("hunter2"), "{text}");
}
