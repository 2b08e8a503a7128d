//! Alerting end to end against real peers: a loopback HTTP receiver in
//! place of Slack, webhooks and Telegram, and an SMTP server in the test
//! process. The clock is injected: the evaluator, the escalator and the
//! dispatcher all run at chosen `now`s, so escalation delays of minutes
//! take no time at all (only the sends themselves are real).

pub mod receivers;
mod scenarios;
mod service;

use std::io::Write;

use chrono::{DateTime, Duration, SubsecRound, Utc};
use serde_json::Value;
use warden::alerting::channels::Channels;
use warden::alerting::dispatcher::{DispatchParams, Dispatcher, PassReport};
use warden::alerting::escalator::{self, EscalatorParams};
use warden::config::{Settings, Sources};
use warden::health::evaluator::{self, EvalParams};

use crate::helpers::TestDb;
use receivers::{HttpReceiver, SmtpServer};

/// Settings: the defaults with `extra` TOML on top (as an override file).
pub fn settings(extra: &str) -> Settings {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(extra.as_bytes()).unwrap();
    Settings::load(&Sources { file: Some(file.path().to_path_buf()), env: Some(Default::default()) })
        .unwrap_or_else(|e| panic!("test settings are valid: {e}"))
}

/// A database, real receivers, and the three actors on an injected clock.
pub struct Rig {
    pub db: TestDb,
    pub c: tokio_postgres::Client,
    pub eval: EvalParams,
    pub esc: EscalatorParams,
    pub dispatcher: Dispatcher,
    pub now: DateTime<Utc>,
    /// Run a dispatch pass at every step of [`Rig::run_to`].
    pub auto_dispatch: bool,
}

impl Rig {
    /// `toml` is added to the defaults; `t0` is half an hour ago (today's
    /// partitions exist) and the evaluator has had its first-cycle grace.
    pub async fn new(toml: &str) -> Self {
        let settings = settings(toml);
        let db = TestDb::migrated().await;
        let mut c = db.client().await;
        let eval = EvalParams::from_settings(&settings.health);
        let esc = EscalatorParams::from_settings(&settings.alerting);
        let dispatcher = dispatcher(&db, &settings, "replica-a");
        let now = (Utc::now() - Duration::minutes(30)).trunc_subsecs(0);
        evaluator::liveness_cycle(&mut c, &eval, "test", Some(now - Duration::seconds(5))).await.unwrap();
        Self { db, c, eval, esc, dispatcher, now, auto_dispatch: true }
    }

    /// One heartbeat of `agent` at the current time, every `interval_ms`.
    pub async fn beat(&self, agent: &str, interval_ms: i32, labels: Option<Value>) {
        self.beat_at(agent, self.now, interval_ms, labels).await;
    }

    pub async fn beat_at(&self, agent: &str, at: DateTime<Utc>, interval_ms: i32, labels: Option<Value>) {
        self.c
            .execute(
                "SELECT * FROM warden.ingest_heartbeats(ARRAY[$1::text], ARRAY[NULL::text], ARRAY[$4::jsonb], \
                   ARRAY[NULL::text], ARRAY['healthy'], ARRAY[NULL::bigint], ARRAY[$2::int], ARRAY[NULL::timestamptz], \
                   '{}', '{}', '{}', '{}', $3)",
                &[&agent, &interval_ms, &at, &labels],
            )
            .await
            .unwrap();
    }

    /// `agent` heartbeats again, twice on time, and is back online.
    pub async fn come_back(&mut self, agent: &str) {
        self.beat(agent, 10_000, None).await;
        self.run_for(Duration::seconds(1), Duration::seconds(1)).await;
        self.now += Duration::seconds(8);
        self.beat(agent, 10_000, None).await;
        self.run_for(Duration::seconds(3), Duration::seconds(1)).await;
    }

    /// One tick at the current time: evaluate, escalate, maybe dispatch.
    pub async fn tick(&mut self) -> Option<PassReport> {
        evaluator::liveness_cycle(&mut self.c, &self.eval, "test", Some(self.now)).await.unwrap();
        escalator::cycle(&mut self.c, &self.esc, Some(self.now)).await.unwrap();
        if self.auto_dispatch { Some(self.dispatcher.pass(Some(self.now)).await.unwrap()) } else { None }
    }

    /// Ticks every `step` until the clock reaches `until` (inclusive).
    pub async fn run_to(&mut self, until: DateTime<Utc>, step: Duration) {
        while self.now + step <= until {
            self.now += step;
            self.tick().await;
        }
        if self.now < until {
            self.now = until;
            self.tick().await;
        }
    }

    /// Advances by `by` in ticks of `step`.
    pub async fn run_for(&mut self, by: Duration, step: Duration) {
        let until = self.now + by;
        self.run_to(until, step).await;
    }

    /// One number from SQL.
    pub async fn count(&self, sql: &str) -> i64 {
        self.c.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
    }

    /// The alert of `dedup_key`: (id, state, suppressed_reason, paged_at).
    pub async fn alert(&self, dedup_key: &str) -> (i64, String, Option<String>, Option<DateTime<Utc>>) {
        let r = self
            .c
            .query_one(
                "SELECT id, state, suppressed_reason, paged_at FROM warden.alerts WHERE dedup_key = $1 \
                 ORDER BY id DESC LIMIT 1",
                &[&dedup_key],
            )
            .await
            .unwrap_or_else(|e| panic!("alert {dedup_key}: {e}"));
        (r.get(0), r.get(1), r.get(2), r.get(3))
    }

    /// The open incident of `agent`'s `issue`.
    pub async fn incident(&self, agent: &str, issue: &str) -> i64 {
        self.c
            .query_one(
                "SELECT id FROM warden.incidents WHERE agent_id = $1 AND issue_type = $2 ORDER BY id DESC LIMIT 1",
                &[&agent, &issue],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// `n` firing alerts (`{prefix}1` to `{prefix}n` offline), each with a
    /// firing delivery to ops_slack due now; the deliveries' ids.
    pub async fn firing_deliveries(&self, prefix: &str, n: i32) -> Vec<i64> {
        self.c
            .query(
                "WITH a AS ( \
                   INSERT INTO warden.alerts (dedup_key, severity, source, subject, issue, summary) \
                   SELECT $1 || i || ':agent_unresponsive', 'critical', 'incident', $1 || i, 'agent_unresponsive', \
                          $1 || i || ' is offline' \
                   FROM generate_series(1, $2) i RETURNING id) \
                 INSERT INTO warden.alert_deliveries (alert_id, alert_ids, channel, kind, level) \
                 SELECT id, ARRAY[id], 'ops_slack', 'firing', 1 FROM a RETURNING id",
                &[&prefix, &n],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Deliveries as (channel, kind, level, state, number of alerts), oldest first.
    pub async fn deliveries(&self) -> Vec<(String, String, i32, String, usize)> {
        self.c
            .query(
                "SELECT channel, kind, level, state, cardinality(alert_ids) FROM warden.alert_deliveries ORDER BY id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get::<_, i32>(4) as usize))
            .collect()
    }
}

/// A dispatcher of its own (own pool) on the rig's database.
pub fn dispatcher(db: &TestDb, settings: &Settings, replica: &str) -> Dispatcher {
    dispatcher_through(db.config.clone(), settings, replica)
}

/// A dispatcher whose pool connects with `config` (a relay, say).
pub fn dispatcher_through(config: tokio_postgres::Config, settings: &Settings, replica: &str) -> Dispatcher {
    let pool = warden::db::build_pool(config, &settings.database).unwrap();
    let channels = Channels::from_settings(&settings.alerting).unwrap();
    Dispatcher::new(
        pool,
        std::sync::Arc::new(channels),
        DispatchParams::from_settings(&settings.alerting),
        replica.into(),
    )
}

/// The channels every scenario uses, pointing at `slack`, `smtp` and `hook`.
pub fn channels_toml(slack: &HttpReceiver, smtp: &SmtpServer, hook: Option<&HttpReceiver>) -> String {
    let mut toml = format!(
        r#"
[alerting.smtp]
host = "127.0.0.1"
port = {smtp_port}
tls = "none"
from = "warden@test.local"

[alerting.channels.ops_slack]
kind = "slack"
webhook_url = "{slack_url}"

[alerting.channels.oncall_email]
kind = "email"
to = ["oncall@test.local"]
"#,
        smtp_port = smtp.addr.port(),
        slack_url = slack.url("/services/T000/B000/XXXX"),
    );
    if let Some(hook) = hook {
        toml.push_str(&format!(
            r#"
[alerting.channels.audit_hook]
kind = "webhook"
url = "{}"
secret = "{HOOK_SECRET}"
"#,
            hook.url("/warden")
        ));
    }
    toml
}

pub const HOOK_SECRET: &str = "s3cret-hmac-key";

/// Verifies a webhook request's signature the way a receiver would.
pub fn signature_valid(r: &receivers::Request) -> bool {
    use hmac::{KeyInit, Mac};
    let (Some(ts), Some(sig)) = (r.header("x-warden-timestamp"), r.header("x-warden-signature")) else {
        return false;
    };
    let Some(hex) = sig.strip_prefix("sha256=") else { return false };
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(&r.body);
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let fresh = ts.parse::<i64>().is_ok_and(|t| (Utc::now().timestamp() - t).abs() < 300);
    expected == hex && fresh
}
