//! A TCP relay in front of PostgreSQL that a test can cut and restore: a
//! network outage of one warden's database, leaving the server (shared
//! with every other test) untouched.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::helpers::TestDb;

pub struct Relay {
    pub port: u16,
    /// host:port of PostgreSQL, known once warden's settings are.
    pub target: Arc<std::sync::OnceLock<String>>,
    up: Arc<AtomicBool>,
    cuts: tokio::sync::watch::Sender<u64>,
    refused: Arc<AtomicUsize>,
}

impl Relay {
    pub async fn start() -> Self {
        let target = Arc::new(std::sync::OnceLock::<String>::new());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let (cuts, cut_seen) = tokio::sync::watch::channel(0u64);
        let refused = Arc::new(AtomicUsize::new(0));
        let (open, to, turned_away) = (up.clone(), target.clone(), refused.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                // Cuts from here on close this link; one made before
                // shows in `open`.
                let mut cut = cut_seen.clone();
                cut.borrow_and_update();
                if !open.load(Ordering::SeqCst) {
                    turned_away.fetch_add(1, Ordering::SeqCst);
                    continue; // dropped: the connection is refused
                }
                let target = to.get().cloned().expect("target set before warden starts");
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self { port, target, up, cuts, refused }
    }

    /// A relay to `db`, and connection settings that go through it; `None`
    /// (said on stderr) when the tests' database listens on a Unix socket
    /// only, which a TCP relay cannot stand in front of.
    pub async fn to(db: &TestDb) -> Option<(Self, tokio_postgres::Config)> {
        let tokio_postgres::config::Host::Tcp(host) = &db.config.get_hosts()[0] else {
            eprintln!("skipped: the tests' database listens on a Unix socket only");
            return None;
        };
        let relay = Self::start().await;
        let port = db.config.get_ports().first().copied().unwrap_or(5432);
        relay.target.set(format!("{host}:{port}")).unwrap();
        let mut through = tokio_postgres::Config::new();
        through.host("127.0.0.1").port(relay.port).user(db.config.get_user().unwrap_or("postgres")).dbname(&db.name);
        Some((relay, through))
    }

    /// Closes every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Connections turned away while cut, so far.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}
