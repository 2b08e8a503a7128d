//! Scenarios on the injected clock: paging, escalation, acknowledgement,
//! resolution, faults, grouping, suppression, recovery awareness,
//! dependencies, channel health and concurrent dispatchers.

use chrono::{Duration, Utc};
use serde_json::json;
use warden::alerting::escalator;
use warden::alerting::silences::{self, NewSilence};
use warden::alerting::store;

use super::receivers::{HttpReceiver, Reply, SmtpServer};
use super::{Rig, channels_toml, dispatcher, dispatcher_through, settings, signature_valid};
use crate::helpers::eventually;

fn secs(s: i64) -> Duration {
    Duration::seconds(s)
}

fn std_secs(s: u64) -> std::time::Duration {
    std::time::Duration::from_secs(s)
}

const TIMINGS: &str = r#"
[health]
extended_offline_after = "1h"

[alerting]
group_wait = "4s"
group_interval = "1m"
repeat_interval = "1h"
hold_during_recovery = "1m"
retry_base = "1s"
retry_max = "4s"
channel_failure_threshold = 10
link_base = "https://warden.test"
"#;

/// Offline agents and fleet outages go to Slack and email at once.
const BOTH_POLICY: &str = r#"
[[alerting.policies]]
name = "both"
levels = [{ after = "0s", channels = ["ops_slack", "oncall_email"] }]

[[alerting.routes]]
issues = ["agent_unresponsive", "fleet_outage"]
policy = "both"
"#;

/// Offline agents and fleet outages go to Slack.
const SLACK_POLICY: &str = r#"
[[alerting.policies]]
name = "slack"
levels = [{ after = "0s", channels = ["ops_slack"] }]

[[alerting.routes]]
issues = ["agent_unresponsive", "fleet_outage"]
policy = "slack"
"#;

/// Offline agents go to email alone.
const MAIL_POLICY: &str = r#"
[[alerting.policies]]
name = "mail"
levels = [{ after = "0s", channels = ["oncall_email"] }]

[[alerting.routes]]
issues = ["agent_unresponsive"]
policy = "mail"
"#;

const PAGE_POLICY: &str = r#"
[[alerting.policies]]
name = "page"
levels = [
  { after = "0s", channels = ["ops_slack"] },
  { after = "5m", channels = ["oncall_email"] },
  { after = "15m", channels = ["oncall_email", "ops_slack"] },
]

[[alerting.routes]]
name = "pages"
issues = ["agent_unresponsive"]
policy = "page"
"#;

/// The texts of the messages the Slack receiver took, in order.
fn slack_texts(slack: &HttpReceiver) -> Vec<String> {
    slack.accepted().iter().map(|r| r.json()["text"].as_str().unwrap_or_default().to_string()).collect()
}

/// Records a failed first recovery attempt for the incident, as the
/// recovery engine would.
async fn failed_attempt(rig: &Rig, incident: i64, agent: &str) {
    rig.c
        .execute(
            "INSERT INTO warden.recovery_actions (incident_id, agent_id, strategy, action, attempt, state, \
               started_at, finished_at, outcome) \
             VALUES ($1, $2, 'restart_worker', 'command', 1, 'failed', $3, $3, 'exit status 1')",
            &[&incident, &agent, &rig.now],
        )
        .await
        .unwrap();
}

/// The recovery of `agent`'s `incident` gives up, as the engine does: its
/// job exhausted and a `recovery_failed` event saying `why`.
async fn recovery_gives_up(rig: &Rig, incident: i64, agent: &str, why: &str) {
    rig.c
        .execute(
            "INSERT INTO warden.recovery_jobs (incident_id, agent_id, strategy, state, finished_at) \
             VALUES ($1, $2, 'restart_worker', 'exhausted', now()) \
             ON CONFLICT (incident_id) DO UPDATE SET state = 'exhausted', finished_at = now()",
            &[&incident, &agent],
        )
        .await
        .unwrap();
    rig.c
        .execute(
            "INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details) \
             VALUES ($1, $2, 'recovery_failed', 'critical', $3, jsonb_build_object('incident_id', $4::bigint))",
            &[&rig.now, &agent, &why, &incident],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn offline_pages_slack_then_email_after_the_delay_ack_stops_escalation_and_resolution_follows() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let mut rig = Rig::new(&format!("{TIMINGS}{}{PAGE_POLICY}", channels_toml(&slack, &smtp, None))).await;
    rig.beat("w1", 10_000, None).await;
    rig.run_for(secs(32), secs(2)).await;
    let incident = rig.incident("w1", "agent_unresponsive").await;
    failed_attempt(&rig, incident, "w1").await;
    let (id, state, _, _) = rig.alert("w1:agent_unresponsive").await;
    assert_eq!(state, "firing");

    // group_wait (4s) later, one Slack-shaped POST.
    rig.run_for(secs(6), secs(1)).await;
    let posts = slack.accepted();
    assert_eq!(posts.len(), 1, "one firing message");
    let body = posts[0].json();
    assert_eq!((posts[0].method.as_str(), posts[0].path.as_str()), ("POST", "/services/T000/B000/XXXX"));
    let text = body["text"].as_str().unwrap();
    assert!(text.starts_with("[FIRING CRITICAL] w1 is offline"), "{text}");
    for needle in [
        format!("Alert #{id} · w1 · agent_unresponsive · critical"),
        "restart_worker/command attempt 1 failed: exit status 1".to_string(),
        "degraded→offline".to_string(),
        format!("warden alerts ack {id}"),
        format!("POST https://warden.test/v1/alerts/{id}/ack"),
    ] {
        assert!(text.contains(&needle), "missing {needle:?} in {text}");
    }
    let blocks = body["blocks"].as_array().unwrap();
    assert_eq!(blocks[0]["type"], "header");
    assert!(blocks.iter().any(|b| b["type"] == "section"));
    assert!(posts[0].header("idempotency-key").is_some());
    assert!(smtp.mails().is_empty(), "email is level 2");

    // Level 2 is due 5 minutes after the first message, not a second sooner.
    let (_, _, _, paged_at) = rig.alert("w1:agent_unresponsive").await;
    let paged_at = paged_at.expect("paged");
    rig.run_to(paged_at + secs(299), secs(10)).await;
    assert!(smtp.mails().is_empty(), "not before 5 minutes");
    rig.run_to(paged_at + secs(300), secs(1)).await;
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1, "the escalation email");
    let mail = &mails[0];
    assert!(mail.subject().starts_with("[ESCALATED L2 CRITICAL] w1 is offline"), "{}", mail.subject());
    // The summary was written when the alert opened (a group wait before
    // the first page); the subject says how long ago.
    assert!(mail.subject().contains("(unacknowledged for 5m"), "{}", mail.subject());
    assert_eq!(mail.to, vec!["oncall@test.local".to_string()]);
    assert_eq!(mail.from, "warden@test.local");
    let plain = mail.part("text/plain").expect("a text part");
    assert!(plain.contains("w1") && plain.contains("agent_unresponsive"), "{plain}");
    assert!(plain.contains("Recovery attempts: restart_worker/command attempt 1 failed"), "{plain}");
    let html = mail.part("text/html").expect("an html part");
    assert!(html.contains(&format!("<strong>Alert #{id} · w1")), "{html}");

    // Acknowledged: level 3 (15 minutes) never goes out.
    let acked = store::acknowledge(&rig.c, id, "alice", Some("on it")).await.unwrap();
    assert_eq!(acked["state"], "acknowledged");
    assert_eq!(acked["acknowledged_by"], "alice");
    rig.run_to(paged_at + secs(16 * 60), secs(30)).await;
    assert_eq!(slack.accepted().len(), 1);
    assert_eq!(smtp.mails().len(), 1);
    assert_eq!(rig.count("SELECT count(*) FROM warden.alert_deliveries WHERE level = 3").await, 0);

    // The agent comes back: every channel that was told gets "resolved".
    rig.come_back("w1").await;
    let (_, state, _, _) = rig.alert("w1:agent_unresponsive").await;
    assert_eq!(state, "resolved");
    let posts = slack.accepted();
    assert_eq!(posts.len(), 2);
    assert!(posts[1].json()["text"].as_str().unwrap().starts_with("[RESOLVED] w1 is offline"));
    let mails = smtp.mails();
    assert_eq!(mails.len(), 2);
    assert!(mails[1].subject().starts_with("[RESOLVED]"), "{}", mails[1].subject());
    let kinds: Vec<(String, String)> = rig.deliveries().await.into_iter().map(|d| (d.0, d.1)).collect();
    assert_eq!(
        kinds,
        [
            ("ops_slack", "firing"),
            ("oncall_email", "escalation"),
            ("oncall_email", "resolved"),
            ("ops_slack", "resolved")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .to_vec()
    );
}

/// (state, attempts, next_attempt_at, last_status_code, last_error) of a delivery.
async fn delivery_row(
    c: &tokio_postgres::Client,
    id: i64,
) -> (String, i32, chrono::DateTime<Utc>, Option<i32>, Option<String>) {
    let r = c
        .query_one(
            "SELECT state, attempts, next_attempt_at, last_status_code, last_error \
             FROM warden.alert_deliveries WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
}

#[tokio::test]
async fn receivers_that_fail_for_a_while_still_get_everything_exactly_once() {
    let mut slack = HttpReceiver::start().await;
    let mut smtp = SmtpServer::start().await;
    let policy = r#"
[[alerting.policies]]
name = "page"
levels = [{ after = "0s", channels = ["ops_slack"] }, { after = "1m", channels = ["oncall_email"] }]

[[alerting.routes]]
issues = ["agent_unresponsive"]
policy = "page"
"#;
    let mut rig = Rig::new(&format!("{TIMINGS}{}{policy}", channels_toml(&slack, &smtp, None))).await;
    rig.auto_dispatch = false;
    slack.script(&[Reply::Status(500), Reply::RetryAfter(7)]);
    rig.beat("w1", 10_000, None).await;
    rig.run_for(secs(40), secs(2)).await;
    let (id, _, _, paged_at) = rig.alert("w1:agent_unresponsive").await;
    let f = paged_at.expect("paged");
    let delivery: i64 = rig.count("SELECT id FROM warden.alert_deliveries WHERE kind = 'firing'").await;
    let d = &rig.dispatcher;
    // Process-wide counters, shared with the other tests: compare deltas.
    let counted = |outcome: &str| warden::metrics::METRICS.deliveries.with_label_values(&["ops_slack", outcome]).get();
    let (failed_before, sent_before) = (counted("failed"), counted("sent"));

    // Retries count from when the send ended: the pass's clock plus at
    // most the pass's own duration.
    let timed_pass = |t| async move {
        let clock = std::time::Instant::now();
        let report = d.pass(Some(t)).await.unwrap();
        (report, Duration::from_std(clock.elapsed()).unwrap())
    };

    // 500: retried after base backoff with jitter (0.5-1s for attempt 1).
    let t = rig.now;
    let (report, took) = timed_pass(t).await;
    assert_eq!(report.failed, 1);
    let (state, attempts, next, status, _) = delivery_row(&rig.c, delivery).await;
    assert_eq!((state.as_str(), attempts, status), ("pending", 1, Some(500)));
    assert!(next >= t + Duration::milliseconds(500) && next <= t + secs(1) + took, "{next} vs {t}");
    assert_eq!(d.pass(Some(t + Duration::milliseconds(400))).await.unwrap().claimed, 0, "not due yet");

    // 429 with Retry-After: 7 is honoured to the second.
    let t = next;
    let (_, took) = timed_pass(t).await;
    let (_, attempts, next, status, _) = delivery_row(&rig.c, delivery).await;
    assert_eq!((attempts, status), (2, Some(429)));
    assert!(next >= t + secs(7) && next <= t + secs(7) + took, "{next} vs {t}");

    // Connection refused.
    slack.down().await;
    let t = next;
    let (_, took) = timed_pass(t).await;
    let (_, attempts, next, status, error) = delivery_row(&rig.c, delivery).await;
    assert_eq!((attempts, status), (3, None));
    assert!(error.as_deref().unwrap_or_default().contains("connect"), "{error:?}");
    assert!(!error.unwrap_or_default().contains("XXXX"), "the webhook URL is a secret and never logged");
    assert!(next >= t + secs(2) && next <= t + secs(4) + took);

    // Back up: delivered, once.
    slack.up().await;
    assert_eq!(d.pass(Some(next)).await.unwrap().sent, 1);
    let (state, attempts, _, status, _) = delivery_row(&rig.c, delivery).await;
    assert_eq!((state.as_str(), attempts, status), ("sent", 4, Some(200)));
    assert!(counted("failed") >= failed_before + 3 && counted("sent") > sent_before, "GET /metrics counts them");
    let keys: Vec<String> = slack.requests().iter().map(|r| r.header("idempotency-key").unwrap().to_string()).collect();
    assert_eq!(keys.len(), 3, "500, 429 and 200 reached the receiver; the refused one did not");
    assert!(keys.iter().all(|k| *k == keys[0]), "one idempotency key across retries");
    let statuses: Vec<Option<i32>> = rig
        .c
        .query(
            "SELECT status_code FROM warden.alert_delivery_attempts WHERE delivery_id = $1 ORDER BY id",
            &[&delivery],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(statuses, vec![Some(500), Some(429), None, Some(200)]);

    // SMTP down for a while around the escalation.
    smtp.down().await;
    rig.now = f + secs(60);
    rig.tick().await;
    let mut t = rig.now;
    for _ in 0..3 {
        let report = rig.dispatcher.pass(Some(t)).await.unwrap();
        assert_eq!(report.failed, 1, "{report:?}");
        t = rig
            .c
            .query_one(
                "SELECT next_attempt_at FROM warden.alert_deliveries WHERE channel = 'oncall_email' AND state = 'pending'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
    }
    smtp.up().await;
    assert_eq!(rig.dispatcher.pass(Some(t)).await.unwrap().sent, 1);
    assert_eq!(smtp.mails().len(), 1);

    // Resolution reaches both channels, once each.
    rig.now = t;
    rig.come_back("w1").await;
    for _ in 0..3 {
        rig.dispatcher.pass(Some(rig.now)).await.unwrap();
        rig.now += secs(5);
    }
    assert_eq!(slack.accepted().len(), 2, "firing and resolved");
    assert_eq!(smtp.mails().len(), 2, "escalation and resolved");
    assert!(smtp.mails()[1].subject().starts_with("[RESOLVED]"));
    let sent = rig.count("SELECT count(*) FROM warden.alert_deliveries WHERE state = 'sent'").await;
    assert_eq!(sent, 4);
    let per_alert = rig
        .count(&format!(
            "SELECT count(*) FROM (SELECT channel, kind FROM warden.alert_notifications WHERE alert_id = {id} \
             GROUP BY channel, kind HAVING count(*) > 1) dup"
        ))
        .await;
    assert_eq!(per_alert, 0, "no notification twice");
}

#[tokio::test]
async fn an_address_the_server_refuses_does_not_keep_the_page_from_the_others() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let channels = channels_toml(&slack, &smtp, None)
        .replace(r#"to = ["oncall@test.local"]"#, r#"to = ["oncall@test.local", "refused@test.local"]"#);
    let mut rig = Rig::new(&format!("{TIMINGS}{channels}{MAIL_POLICY}")).await;
    rig.auto_dispatch = false;
    rig.beat("m1", 10_000, None).await;
    rig.run_for(secs(40), secs(2)).await;
    let report = rig.dispatcher.pass(Some(rig.now)).await.unwrap();
    assert_eq!(report.sent, 1, "{report:?}");
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1, "the address that exists got it");
    assert_eq!(mails[0].to, vec!["oncall@test.local"]);
    let (state, error): (String, Option<String>) = {
        let r = rig
            .c
            .query_one("SELECT state, last_error FROM warden.alert_deliveries WHERE channel = 'oncall_email'", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(state, "sent", "refused for good is not retried once someone has it");
    let error = error.unwrap_or_default();
    assert!(error.contains("refused@test.local") && error.contains("550"), "{error}");
    let told =
        rig.count("SELECT count(*) FROM warden.system_events WHERE event_type = 'alert_recipient_refused'").await;
    assert_eq!(told, 1, "the typo is on record");

    // The all-clear follows at once, not after the refused address's retries.
    rig.come_back("m1").await;
    let report = rig.dispatcher.pass(Some(rig.now)).await.unwrap();
    assert_eq!(report.sent, 1, "{report:?}");
    let mails = smtp.mails();
    assert_eq!(mails.len(), 2, "{mails:?}");
    assert!(mails[1].subject().starts_with("[RESOLVED]") && mails[1].to == vec!["oncall@test.local"]);
}

#[tokio::test]
async fn a_channel_whose_every_address_is_refused_keeps_failing() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let channels =
        channels_toml(&slack, &smtp, None).replace(r#"to = ["oncall@test.local"]"#, r#"to = ["refused@test.local"]"#);
    let mut rig = Rig::new(&format!("{TIMINGS}{channels}{MAIL_POLICY}")).await;
    rig.auto_dispatch = false;
    rig.beat("m2", 10_000, None).await;
    rig.run_for(secs(40), secs(2)).await;
    let report = rig.dispatcher.pass(Some(rig.now)).await.unwrap();
    assert_eq!(report.failed, 1, "nobody has it: {report:?}");
    assert!(smtp.mails().is_empty());
}

#[tokio::test]
async fn a_delivery_is_dated_when_the_receiver_took_it() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let mut rig = Rig::new(&format!("{TIMINGS}{SLACK_POLICY}{}", channels_toml(&slack, &smtp, None))).await;
    rig.auto_dispatch = false;
    rig.beat("d1", 10_000, None).await;
    rig.run_for(secs(40), secs(2)).await;
    slack.slow(std::time::Duration::from_millis(1500));
    let t = rig.now;
    assert_eq!(rig.dispatcher.pass(Some(t)).await.unwrap().sent, 1);
    let r = rig
        .c
        .query_one("SELECT sent_at, last_attempt_at FROM warden.alert_deliveries WHERE channel = 'ops_slack'", &[])
        .await
        .unwrap();
    let (sent, started): (chrono::DateTime<Utc>, chrono::DateTime<Utc>) = (r.get(0), r.get(1));
    assert!(started >= t, "{started} vs {t}");
    assert!(sent >= started + Duration::milliseconds(1500), "sent_at {sent} is after the answer, started {started}");
}

#[tokio::test]
async fn a_slow_channel_does_not_hold_up_pages_to_the_others() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let hook = HttpReceiver::start().await;
    let routes = r#"
[[alerting.policies]]
name = "chat"
levels = [{ after = "0s", channels = ["ops_slack"] }]

[[alerting.policies]]
name = "audit"
levels = [{ after = "0s", channels = ["audit_hook"] }]

[[alerting.routes]]
issues = ["agent_unresponsive"]
labels = { to = "audit" }
policy = "audit"

[[alerting.routes]]
issues = ["agent_unresponsive"]
policy = "chat"
"#;
    let timings =
        TIMINGS.replace("[alerting]\n", "[alerting]\ndispatch_interval = \"100ms\"\ndelivery_timeout = \"2m\"\n");
    let toml = format!("{timings}{routes}{}", channels_toml(&slack, &smtp, Some(&hook)));
    let mut rig = Rig::new(&toml).await;
    rig.auto_dispatch = false;
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(
        std::sync::Arc::new(dispatcher(&rig.db, &settings(&toml), "replica-b"))
            .run(stop.clone(), std::time::Duration::from_secs(30)),
    );
    let release = hook.hold();
    rig.beat("a1", 10_000, Some(json!({"to": "audit"}))).await;
    rig.run_for(secs(40), secs(2)).await;
    let long = std::time::Duration::from_secs(30);
    eventually(long, "the audit page to leave", || async { (hook.arrived() > 0).then_some(()) }).await;

    // The audit receiver holds its answer (for less than delivery_timeout);
    // a page to Slack meanwhile goes.
    rig.beat("s1", 10_000, None).await;
    rig.run_for(secs(40), secs(2)).await;
    eventually(long, "the Slack page, while the audit hook holds", || async {
        (!slack.accepted().is_empty()).then_some(())
    })
    .await;
    assert!(hook.accepted().is_empty(), "the audit hook is still answering");

    release.send(true).unwrap();
    eventually(long, "both pages recorded as sent", || async {
        let sent = rig.count("SELECT count(*) FROM warden.alert_deliveries WHERE state = 'sent'").await;
        (sent == 2).then_some(())
    })
    .await;
    stop.cancel();
    running.await.unwrap();
}

#[tokio::test]
async fn twenty_agents_offline_at_once_are_one_message_per_route_and_later_ones_wait_group_interval() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let hook = HttpReceiver::start().await;
    let routes = r#"
[health]
fleet_outage_ratio = 1.0
extended_offline_after = "1h"

[alerting]
group_wait = "10s"
group_interval = "1m"

[[alerting.policies]]
name = "team_a"
levels = [{ after = "0s", channels = ["ops_slack"] }]

[[alerting.policies]]
name = "team_b"
levels = [{ after = "0s", channels = ["audit_hook"] }]

[[alerting.routes]]
issues = ["agent_unresponsive"]
labels = { team = "a" }
policy = "team_a"

[[alerting.routes]]
issues = ["agent_unresponsive"]
labels = { team = "b" }
policy = "team_b"
"#;
    let mut rig = Rig::new(&format!("{routes}{}", channels_toml(&slack, &smtp, Some(&hook)))).await;
    for i in 0..20 {
        let team = if i < 12 { "a" } else { "b" };
        rig.beat(&format!("burst-{i:02}"), 10_000, Some(json!({"team": team}))).await;
    }
    rig.beat("late-a", 10_000, Some(json!({"team": "a"}))).await;
    rig.run_for(secs(20), secs(2)).await;
    rig.beat("late-a", 10_000, None).await;
    rig.run_for(secs(40), secs(2)).await;

    let posts = slack.accepted();
    assert_eq!(posts.len(), 1, "one grouped Slack message for team a");
    let text = posts[0].json()["text"].as_str().unwrap().to_string();
    assert!(text.starts_with("[FIRING CRITICAL] 12 agents offline: burst-00, burst-01"), "{text}");
    assert!(text.contains("… and 2 more alerts"), "ten described, the rest counted: {text}");
    let hooks = hook.accepted();
    assert_eq!(hooks.len(), 1, "one grouped webhook for team b");
    let body = hooks[0].json();
    assert_eq!(body["kind"], "firing");
    assert_eq!(body["alerts"].as_array().unwrap().len(), 8);
    assert_eq!(body["alerts"][0]["agent_id"], "burst-12");
    assert!(signature_valid(&hooks[0]), "HMAC-SHA256 over timestamp.body verifies");
    assert!(hooks[0].header("idempotency-key").is_some());

    // late-a went offline 20s after the burst: it waits for group_interval
    // after the first flush, then goes out alone.
    let first_flush: chrono::DateTime<Utc> = rig
        .c
        .query_one("SELECT min(flush_at) FROM warden.alert_groups WHERE route = 'route1'", &[])
        .await
        .unwrap()
        .get(0);
    rig.run_to(first_flush + secs(59), secs(2)).await;
    assert_eq!(slack.accepted().len(), 1, "not before group_interval");
    rig.run_to(first_flush + secs(61), secs(1)).await;
    let posts = slack.accepted();
    assert_eq!(posts.len(), 2);
    assert!(posts[1].json()["text"].as_str().unwrap().starts_with("[FIRING CRITICAL] late-a is offline"));
}

#[tokio::test]
async fn silences_and_maintenance_windows_suppress_sending_but_alerts_are_recorded() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let start = (Utc::now() - Duration::hours(1)).format("%H:%M");
    let toml = format!(
        "{TIMINGS}{SLACK_POLICY}{}\n[[alerting.maintenance]]\nname = \"patching\"\nstart = \"{start}\"\nduration = \"3h\"\nagents = [\"m1\"]\n",
        channels_toml(&slack, &smtp, None)
    );
    let mut rig = Rig::new(&toml).await;
    let silence = silences::create(
        &rig.c,
        &NewSilence {
            agent_id: Some("s1".into()),
            starts_at: Some(rig.now - Duration::hours(1)),
            ends_at: Some(Utc::now() + Duration::hours(1)),
            comment: "deploying s1".into(),
            created_by: "test".into(),
            ..NewSilence::default()
        },
    )
    .await
    .unwrap();
    for agent in ["s1", "m1", "n1"] {
        rig.beat(agent, 10_000, None).await;
    }
    rig.run_for(secs(45), secs(2)).await;
    let texts = slack_texts(&slack);
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert!(texts[0].contains("n1 is offline"));
    let (_, state, reason, paged) = rig.alert("s1:agent_unresponsive").await;
    assert_eq!((state.as_str(), reason, paged), ("firing", Some(format!("silence:{}", silence.id)), None));
    let (_, _, reason, _) = rig.alert("m1:agent_unresponsive").await;
    assert_eq!(reason.as_deref(), Some("maintenance:patching"));

    // The silence ends: s1's page goes out with the route's next group,
    // group_interval (1m) after the first (m1 stays in maintenance).
    silences::remove(&rig.c, silence.id).await.unwrap().expect("removed");
    rig.run_for(secs(30), secs(2)).await;
    assert_eq!(slack.accepted().len(), 1, "not before group_interval");
    let (_, _, reason, _) = rig.alert("s1:agent_unresponsive").await;
    assert_eq!(reason, None, "no longer suppressed");
    rig.run_for(secs(40), secs(2)).await;
    let texts = slack_texts(&slack);
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert!(texts[1].contains("s1 is offline"));
}

/// A group that falls due while its only alert is held for a recovery
/// sends nothing, and is no flush: when the hold ends the page waits
/// group_wait, not group_interval after a message that never went out.
#[tokio::test]
async fn a_raised_repeat_interval_counts_from_the_latest_repeat() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let mut rig = Rig::new(&format!("{TIMINGS}{SLACK_POLICY}{}", channels_toml(&slack, &smtp, None))).await;
    rig.beat("r1", 10_000, None).await;
    rig.run_for(secs(32), secs(2)).await;
    rig.run_for(secs(6), secs(1)).await;
    let (_, _, _, paged_at) = rig.alert("r1:agent_unresponsive").await;
    let paged_at = paged_at.expect("paged");
    let repeats = |texts: Vec<String>| texts.iter().filter(|t| t.starts_with("[STILL FIRING")).count();
    // Three hourly repeats.
    rig.run_to(paged_at + Duration::hours(3) + secs(30), Duration::minutes(10)).await;
    assert_eq!(repeats(slack_texts(&slack)), 3, "{:?}", slack_texts(&slack));

    // Raised to a day: the next comes a day after the third, not once a
    // day's count from the page has caught up with three (in three days).
    rig.esc.timing.repeat_interval = Duration::hours(24);
    rig.run_to(paged_at + Duration::hours(26), Duration::hours(1)).await;
    assert_eq!(repeats(slack_texts(&slack)), 3, "none within the day");
    rig.run_to(paged_at + Duration::hours(27) + secs(30), Duration::minutes(10)).await;
    let texts = slack_texts(&slack);
    assert_eq!(repeats(texts.clone()), 4, "{texts:?}");
    let sequences: Vec<i32> = rig
        .c
        .query(
            "SELECT DISTINCT sequence FROM warden.alert_notifications n JOIN warden.alerts a ON a.id = n.alert_id \
             WHERE a.dedup_key = 'r1:agent_unresponsive' AND n.kind = 'repeat' ORDER BY sequence",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(sequences, vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn a_group_that_sent_nothing_does_not_delay_the_next_page() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let timings = TIMINGS.replace("group_interval = \"1m\"", "group_interval = \"5m\"");
    let mut rig = Rig::new(&format!("{timings}{SLACK_POLICY}{}", channels_toml(&slack, &smtp, None))).await;
    rig.beat("h1", 10_000, None).await;
    rig.run_for(secs(32), secs(2)).await;
    let incident = rig.incident("h1", "agent_unresponsive").await;
    let (_, state, _, _) = rig.alert("h1:agent_unresponsive").await;
    assert_eq!(state, "firing");
    let opened: chrono::DateTime<Utc> = rig
        .c
        .query_one("SELECT opened_at FROM warden.alerts WHERE dedup_key = 'h1:agent_unresponsive'", &[])
        .await
        .unwrap()
        .get(0);
    // The recovery engine starts within the group's wait.
    rig.c
        .execute(
            "INSERT INTO warden.recovery_actions (incident_id, agent_id, strategy, action, attempt, state, started_at) \
             VALUES ($1, 'h1', 'restart_worker', 'command', 1, 'running', $2)",
            &[&incident, &rig.now],
        )
        .await
        .unwrap();
    rig.run_for(secs(20), secs(2)).await;
    assert!(slack.accepted().is_empty(), "held while recovering");
    // The hold (1m) ends; one group_wait (4s) and a tick or two later the
    // page is out, not 5 minutes after the group that sent nothing.
    rig.run_to(opened + secs(60 + 4 + 4), secs(1)).await;
    let texts = slack_texts(&slack);
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert!(texts[0].contains("h1 is offline"), "{texts:?}");
}

#[tokio::test]
async fn a_group_left_by_an_alert_that_resolved_in_its_wait_goes_and_the_next_alert_waits_its_own() {
    // An alert that resolves within its group's wait leaves the group with
    // nobody to send. Kept, it could be joined hours later by the route's
    // next alert, which then went out at once, its escalation levels
    // counted from the old group's time: every level in the same second.
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let timings = TIMINGS.replace("group_wait = \"4s\"", "group_wait = \"30s\"");
    let mut rig = Rig::new(&format!("{timings}{}{PAGE_POLICY}", channels_toml(&slack, &smtp, None))).await;
    rig.beat("blip", 10_000, None).await;
    rig.run_for(secs(34), secs(2)).await;
    assert_eq!(rig.alert("blip:agent_unresponsive").await.1, "firing");
    assert_eq!(rig.count("SELECT count(*) FROM warden.alert_groups WHERE NOT flushed").await, 1);
    rig.come_back("blip").await;
    assert_eq!(rig.alert("blip:agent_unresponsive").await.1, "resolved");
    // Quiet for an hour: the blip beats on a long interval, nothing fires.
    rig.beat("blip", 7 * 24 * 3_600_000, None).await;
    rig.run_for(secs(3600), secs(60)).await;
    assert!(slack.accepted().is_empty() && smtp.mails().is_empty(), "nothing went out for the blip");
    assert_eq!(rig.count("SELECT count(*) FROM warden.alert_groups WHERE NOT flushed").await, 0, "the group went");

    rig.beat("later", 10_000, None).await;
    rig.run_for(secs(34), secs(2)).await;
    assert_eq!(rig.alert("later:agent_unresponsive").await.1, "firing");
    assert!(slack.accepted().is_empty(), "the new alert waits its group_wait");
    rig.run_for(secs(40), secs(2)).await;
    let texts = slack_texts(&slack);
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert!(texts[0].starts_with("[FIRING CRITICAL] later is offline"), "{texts:?}");
    assert!(smtp.mails().is_empty(), "level 2 is five minutes after the page, not now");
}

#[tokio::test]
async fn a_group_flushed_long_after_its_time_counts_its_levels_from_the_page() {
    // No cycle ran between a group's opening and an hour later (warden was
    // down): its page goes out now, and level 2 five minutes after it, not
    // with it.
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let timings = TIMINGS.replace("group_wait = \"4s\"", "group_wait = \"30s\"");
    let mut rig = Rig::new(&format!("{timings}{}{PAGE_POLICY}", channels_toml(&slack, &smtp, None))).await;
    rig.beat("down", 10_000, None).await;
    rig.run_for(secs(34), secs(2)).await;
    assert_eq!(rig.count("SELECT count(*) FROM warden.alert_groups WHERE NOT flushed").await, 1);
    rig.now += secs(3600);
    rig.tick().await;
    rig.run_for(secs(10), secs(2)).await;
    let texts = slack_texts(&slack);
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert!(texts[0].starts_with("[FIRING CRITICAL] down is offline"), "{texts:?}");
    assert!(smtp.mails().is_empty(), "level 2 is five minutes after the page");
    rig.run_for(secs(300), secs(10)).await;
    assert_eq!(smtp.mails().len(), 1, "and then it goes");
}

#[tokio::test]
async fn a_recovery_under_way_holds_the_page_and_a_success_sends_auto_recovered_instead() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let mut rig = Rig::new(&format!("{TIMINGS}{SLACK_POLICY}{}", channels_toml(&slack, &smtp, None))).await;
    for agent in ["r1", "r2", "r3"] {
        rig.beat(agent, 10_000, None).await;
    }
    // The incidents open at +32s; the recovery engine starts right away.
    rig.run_for(secs(32), secs(2)).await;
    let mut incidents = Vec::new();
    for agent in ["r1", "r2", "r3"] {
        let incident = rig.incident(agent, "agent_unresponsive").await;
        rig.c
            .execute(
                "INSERT INTO warden.recovery_actions (incident_id, agent_id, strategy, action, attempt, state, started_at) \
                 VALUES ($1, $2, 'restart_worker', 'command', 1, 'running', $3)",
                &[&incident, &agent, &rig.now],
            )
            .await
            .unwrap();
        incidents.push(incident);
    }
    // r3's recovery gives up: its page goes out now, hold or not. (r2's job
    // is exhausted too, below, so that only the event's source differs.)
    recovery_gives_up(&rig, incidents[2], "r3", "recovery gave up").await;
    rig.c
        .execute(
            "INSERT INTO warden.recovery_jobs (incident_id, agent_id, strategy, state, finished_at) \
             VALUES ($1, 'r2', 'restart_worker', 'exhausted', now())",
            &[&incidents[1]],
        )
        .await
        .unwrap();
    // The same event posted by an agent (POST /v1/events) about r2's
    // incident is the agent's claim, not warden's: r2 stays held.
    rig.c
        .execute(
            "INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details, source) \
             VALUES ($1, 'r2', 'recovery_failed', 'critical', 'posted', jsonb_build_object('incident_id', $2::bigint), 'agent')",
            &[&rig.now, &incidents[1]],
        )
        .await
        .unwrap();
    rig.run_for(secs(10), secs(2)).await;
    assert_eq!(slack_texts(&slack).len(), 1, "only r3: {:?}", slack_texts(&slack));
    assert!(slack_texts(&slack)[0].contains("r3 is offline"));
    assert!(slack_texts(&slack)[0].contains("restart_worker/command attempt 1 running"));
    let (_, _, _, paged) = rig.alert("r1:agent_unresponsive").await;
    assert!(paged.is_none(), "held while recovering");
    let held: Option<chrono::DateTime<Utc>> = rig
        .c
        .query_one("SELECT held_until FROM warden.alerts WHERE dedup_key = 'r1:agent_unresponsive'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(held.is_some());

    // r1: attempt 1 failed, attempt 2 succeeded, the agent is back.
    rig.c
        .execute(
            "UPDATE warden.recovery_actions SET state = 'failed', outcome = 'exit status 1', finished_at = $2 \
             WHERE incident_id = $1",
            &[&incidents[0], &rig.now],
        )
        .await
        .unwrap();
    rig.c
        .execute(
            "INSERT INTO warden.recovery_actions (incident_id, agent_id, strategy, action, attempt, state, started_at, \
               finished_at, outcome) VALUES ($1, 'r1', 'restart_worker', 'command', 2, 'succeeded', $2, $2, 'healthy again')",
            &[&incidents[0], &rig.now],
        )
        .await
        .unwrap();
    rig.come_back("r1").await;
    let all = slack_texts(&slack);
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all[1].starts_with("[AUTO-RECOVERED] r1 agent_unresponsive: auto-recovered on attempt 2"), "{}", all[1]);
    assert!(!all.iter().any(|t| t.starts_with("[FIRING") && t.contains("r1")), "no page for r1");

    // r2's recovery outlasts the hold (1 minute): the page goes out with
    // what was tried. (r1 keeps heartbeating meanwhile.)
    for _ in 0..7 {
        rig.beat("r1", 10_000, None).await;
        rig.run_for(secs(10), secs(5)).await;
    }
    let all = slack_texts(&slack);
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all[2].starts_with("[FIRING CRITICAL] r2 is offline"), "{}", all[2]);
    assert!(all[2].contains("Recovery attempts: restart_worker/command attempt 1 running"));
}

#[tokio::test]
async fn dependants_of_an_offline_agent_are_suppressed_by_dependency_and_a_fleet_outage_covers_the_rest() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let mut rig = Rig::new(&format!(
        "{}{SLACK_POLICY}{}",
        TIMINGS.replace("group_wait = \"4s\"", "group_wait = \"30s\""),
        channels_toml(&slack, &smtp, None)
    ))
    .await;
    rig.beat("db1", 10_000, Some(json!({"role": "db"}))).await;
    rig.beat("app1", 10_000, Some(json!({"depends_on": "db1"}))).await;
    rig.beat("app2", 10_000, Some(json!({"depends_on": "app1, cache9"}))).await;
    for i in 0..7 {
        rig.beat(&format!("fleet-{i}"), 10_000, None).await;
    }
    // The fleet keeps beating for 30 more seconds, then stops too. (Had it
    // fallen silent with the three, their incidents would have waited to
    // see whether the fleet outage stood in for them.)
    for _ in 0..3 {
        rig.run_for(secs(10), secs(2)).await;
        for i in 0..7 {
            rig.beat(&format!("fleet-{i}"), 10_000, None).await;
        }
    }
    rig.run_for(secs(4), secs(2)).await;
    let (_, _, reason, _) = rig.alert("app1:agent_unresponsive").await;
    assert_eq!(reason.as_deref(), Some("dependency:db1"));
    let (_, _, reason, _) = rig.alert("app2:agent_unresponsive").await;
    assert_eq!(reason.as_deref(), Some("dependency:app1"), "the nearest offline dependency, through the chain");

    // Now 7 more of 10 go offline: a fleet outage, which stands in for the
    // per-agent alerts opened shortly before it (db1's included).
    rig.run_for(secs(60), secs(2)).await;
    let fleet = rig.count("SELECT count(*) FROM warden.incidents WHERE issue_type = 'fleet_outage'").await;
    assert_eq!(fleet, 1);
    let (_, _, reason, paged) = rig.alert("db1:agent_unresponsive").await;
    assert!(reason.unwrap_or_default().starts_with("fleet_outage:"), "covered by the outage");
    assert!(paged.is_none());
    let texts = slack_texts(&slack);
    assert_eq!(texts.len(), 1, "only the fleet outage is sent: {texts:?}");
    assert!(texts[0].starts_with("[FIRING EMERGENCY] fleet outage"), "{}", texts[0]);
}

#[tokio::test]
async fn an_agent_failing_on_its_own_during_a_fleet_outage_is_paged() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let mut rig = Rig::new(&format!("{TIMINGS}{SLACK_POLICY}{}", channels_toml(&slack, &smtp, None))).await;
    for i in 0..6 {
        rig.beat(&format!("gone-{i}"), 10_000, None).await;
    }
    rig.beat("loner", 10_000, None).await;
    // Six of seven fall silent together: a fleet outage. The loner beats on
    // for a minute after it opened, then stops as well.
    for _ in 0..9 {
        rig.run_for(secs(10), secs(2)).await;
        rig.beat("loner", 10_000, None).await;
    }
    let fleet =
        rig.count("SELECT count(*) FROM warden.incidents WHERE issue_type = 'fleet_outage' AND state = 'open'").await;
    assert_eq!(fleet, 1);
    let opened_before = rig
        .count(
            "SELECT count(*) FROM warden.incidents i, warden.agent_status s \
             WHERE i.issue_type = 'fleet_outage' AND s.agent_id = 'loner' AND s.last_seen > i.opened_at",
        )
        .await;
    assert_eq!(opened_before, 1, "the loner was heard from after the outage opened");
    rig.run_for(secs(60), secs(2)).await;

    let (_, _, reason, paged) = rig.alert("loner:agent_unresponsive").await;
    assert_eq!(reason, None, "not covered by the outage");
    assert!(paged.is_some());
    let texts = slack_texts(&slack);
    assert!(texts.iter().any(|t| t.contains("loner")), "{texts:?}");
    assert!(!texts.iter().any(|t| t.contains("gone-0 is offline")), "the six are the outage's: {texts:?}");
    assert!(texts.iter().any(|t| t.contains("fleet outage") && t.contains("gone-0")), "{texts:?}");
}

#[tokio::test]
async fn a_group_waits_for_a_member_locked_as_it_falls_due() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let mut rig = Rig::new(&format!("{TIMINGS}{SLACK_POLICY}{}", channels_toml(&slack, &smtp, None))).await;
    rig.beat("g1", 10_000, None).await;
    rig.beat("g2", 10_000, None).await;
    rig.run_for(secs(32), secs(2)).await;
    let grouped = rig.count("SELECT count(*) FROM warden.alerts WHERE group_id IS NOT NULL").await;
    assert_eq!(grouped, 2, "both wait in the route's group");

    // g2's alert is locked (an acknowledgement committing, say) when the
    // group falls due.
    let mut other = rig.db.client().await;
    let lock = other.transaction().await.unwrap();
    lock.execute("SELECT 1 FROM warden.alerts WHERE dedup_key = 'g2:agent_unresponsive' FOR UPDATE", &[])
        .await
        .unwrap();
    rig.run_for(secs(4), secs(2)).await;
    assert!(slack_texts(&slack).is_empty(), "the group waits for its member");
    lock.rollback().await.unwrap();
    rig.run_for(secs(2), secs(2)).await;
    let texts = slack_texts(&slack);
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert!(texts[0].contains("g1") && texts[0].contains("g2"), "one message for both: {}", texts[0]);
}

#[tokio::test]
async fn a_late_agent_that_goes_offline_gets_no_all_clear_until_it_is_back() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let policy = SLACK_POLICY.replace("\"fleet_outage\"]", "\"heartbeat_late\"]");
    let mut rig = Rig::new(&format!("{TIMINGS}{}{policy}", channels_toml(&slack, &smtp, None))).await;
    rig.beat("w1", 10_000, None).await;
    rig.run_for(secs(26), secs(2)).await;
    let texts = slack_texts(&slack);
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert!(texts[0].starts_with("[FIRING WARNING] w1 is late"), "{texts:?}");

    // Offline: the late incident is over, its problem is not. The offline
    // page follows (a minute after the last, the route's group_interval),
    // and nothing in between says the agent is fine.
    rig.run_for(secs(90), secs(2)).await;
    let (_, state, _, _) = rig.alert("w1:heartbeat_late").await;
    assert_eq!(state, "resolved");
    let texts = slack_texts(&slack);
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert!(texts[1].starts_with("[FIRING CRITICAL] w1 is offline"), "{texts:?}");

    // Back: both close, and only now, the late one dated then.
    let (_, _, _, offline_paged) = rig.alert("w1:agent_unresponsive").await;
    rig.come_back("w1").await;
    let late_resolved: chrono::DateTime<Utc> = rig
        .c
        .query_one("SELECT resolved_at FROM warden.alerts WHERE dedup_key = 'w1:heartbeat_late'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(late_resolved > offline_paged.unwrap(), "{late_resolved}");
    let resolved: Vec<String> = slack_texts(&slack).into_iter().skip(2).collect();
    assert!(resolved.iter().all(|t| t.starts_with("[RESOLVED]")), "{resolved:?}");
    let all = resolved.join("\n");
    assert!(all.contains("w1 is late") && all.contains("w1 is offline"), "{all}");
    assert_eq!(rig.count("SELECT count(*) FROM warden.alerts WHERE NOT closed").await, 0);
}

#[tokio::test]
async fn a_resolution_queued_behind_a_page_that_is_then_given_up_is_not_sent() {
    let mut slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let timings = TIMINGS.replace("channel_failure_threshold = 10", "channel_failure_threshold = 1000")
        + "max_delivery_age = \"90s\"\n";
    let mut rig = Rig::new(&format!("{timings}{}{BOTH_POLICY}", channels_toml(&slack, &smtp, None))).await;
    let t0 = rig.now;
    slack.down().await;
    rig.beat("w1", 10_000, None).await;
    rig.run_for(secs(40), secs(2)).await;
    assert_eq!(smtp.mails().len(), 1, "the page by email; Slack's is being retried");
    // Back while Slack's page is still being retried: the resolution to
    // Slack waits behind it.
    rig.come_back("w1").await;
    assert_eq!(smtp.mails().len(), 2, "email has its all-clear");
    // Slack's page is given up; then Slack is back.
    rig.run_to(t0 + secs(130), secs(5)).await;
    assert_eq!(
        rig.count("SELECT count(*) FROM warden.alert_deliveries WHERE channel = 'ops_slack' AND kind = 'firing' AND state = 'dead'").await,
        1
    );
    slack.up().await;
    rig.run_for(secs(8), secs(2)).await;
    // (w1, silent again since, may be paged anew meanwhile.)
    let resolved: Vec<String> = slack_texts(&slack).into_iter().filter(|t| t.starts_with("[RESOLVED]")).collect();
    assert!(resolved.is_empty(), "Slack never had the page, so no all-clear either: {resolved:?}");
    assert_eq!(
        rig.count("SELECT count(*) FROM warden.alert_deliveries WHERE channel = 'ops_slack' AND kind = 'resolved' AND state = 'cancelled'").await,
        1
    );
}

#[tokio::test]
async fn an_escalation_still_waiting_when_the_alert_resolves_gets_no_all_clear() {
    let slack = HttpReceiver::start().await;
    let mut smtp = SmtpServer::start().await;
    let mut rig = Rig::new(&format!("{TIMINGS}{}{PAGE_POLICY}", channels_toml(&slack, &smtp, None))).await;
    rig.beat("w1", 10_000, None).await;
    rig.run_for(secs(40), secs(2)).await;
    let (_, _, _, paged_at) = rig.alert("w1:agent_unresponsive").await;
    // Level 2 (email, 5 minutes on) falls due while the mail server is down.
    smtp.down().await;
    rig.run_to(paged_at.unwrap() + secs(302), secs(30)).await;
    assert_eq!(
        rig.count("SELECT count(*) FROM warden.alert_deliveries WHERE kind = 'escalation' AND state = 'pending'").await,
        1
    );

    rig.come_back("w1").await;
    smtp.up().await;
    rig.run_for(secs(30), secs(2)).await;
    assert!(smtp.mails().is_empty(), "email never had the alert, so no all-clear either");
    let kinds: Vec<(String, String, String)> = rig.deliveries().await.into_iter().map(|d| (d.0, d.1, d.3)).collect();
    assert_eq!(
        kinds,
        [
            ("ops_slack", "firing", "sent"),
            ("oncall_email", "escalation", "cancelled"),
            ("ops_slack", "resolved", "sent")
        ]
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .to_vec()
    );
}

#[tokio::test]
async fn agents_that_depend_on_each_other_are_both_paged() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let mut rig = Rig::new(&format!("{TIMINGS}{SLACK_POLICY}{}", channels_toml(&slack, &smtp, None))).await;
    rig.beat("m1", 10_000, Some(json!({"depends_on": "m2"}))).await;
    rig.beat("m2", 10_000, Some(json!({"depends_on": "m1"}))).await;
    rig.beat("leaf", 10_000, Some(json!({"depends_on": "m1"}))).await;
    rig.run_for(secs(40), secs(2)).await;
    for agent in ["m1", "m2"] {
        let (_, _, reason, paged) = rig.alert(&format!("{agent}:agent_unresponsive")).await;
        assert_eq!(reason, None, "{agent}: neither of two mutual dependencies is the other's cause");
        assert!(paged.is_some(), "{agent} paged");
    }
    let (_, _, reason, paged) = rig.alert("leaf:agent_unresponsive").await;
    assert_eq!(reason.as_deref(), Some("dependency:m1"), "an agent outside the cycle is still covered");
    assert!(paged.is_none());
    let all = slack_texts(&slack).join("\n");
    assert!(all.contains("m1") && all.contains("m2") && !all.contains("leaf"), "{all}");
}

#[tokio::test]
async fn agents_on_a_cycle_through_a_shared_dependency_are_all_paged() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let mut rig = Rig::new(&format!("{TIMINGS}{SLACK_POLICY}{}", channels_toml(&slack, &smtp, None))).await;
    // c1 and c2 reach each other only by passing the hub twice: a cycle
    // all the same, so neither is the other's cause.
    rig.beat("c1", 10_000, Some(json!({"depends_on": "hub"}))).await;
    rig.beat("c2", 10_000, Some(json!({"depends_on": "hub"}))).await;
    rig.beat("hub", 10_000, Some(json!({"depends_on": "c1,c2"}))).await;
    rig.run_for(secs(40), secs(2)).await;
    for agent in ["c1", "c2", "hub"] {
        let (_, _, reason, paged) = rig.alert(&format!("{agent}:agent_unresponsive")).await;
        assert_eq!(reason, None, "{agent}");
        assert!(paged.is_some(), "{agent} paged");
    }
}

#[tokio::test]
async fn a_resolution_goes_only_where_the_page_arrived() {
    let mut slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let timings = TIMINGS.replace("channel_failure_threshold = 10", "channel_failure_threshold = 1000")
        + "max_delivery_age = \"1m\"\n";
    let mut rig = Rig::new(&format!("{timings}{}{BOTH_POLICY}", channels_toml(&slack, &smtp, None))).await;
    slack.down().await;
    rig.beat("w1", 10_000, None).await;
    rig.run_for(secs(40), secs(2)).await;
    assert_eq!(smtp.mails().len(), 1, "the page by email");
    // Slack stays down until its copy of the page is given up.
    rig.run_for(secs(70), secs(5)).await;
    assert_eq!(
        rig.count("SELECT count(*) FROM warden.alert_deliveries WHERE channel = 'ops_slack' AND state = 'dead'").await,
        1
    );
    slack.up().await;

    rig.come_back("w1").await;
    rig.run_for(secs(10), secs(2)).await;
    let (_, state, _, _) = rig.alert("w1:agent_unresponsive").await;
    assert_eq!(state, "resolved");
    let mails = smtp.mails();
    assert_eq!(mails.len(), 2);
    assert!(mails[1].subject().starts_with("[RESOLVED]"), "{}", mails[1].subject());
    assert!(slack.requests().is_empty(), "Slack never had the page, so no all-clear either");
    assert_eq!(rig.count("SELECT count(*) FROM warden.alert_deliveries WHERE kind = 'resolved'").await, 1);
}

#[tokio::test]
async fn a_channel_that_keeps_failing_raises_its_own_alert_through_the_others() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let mut rig = Rig::new(&format!(
        "{}{BOTH_POLICY}{}",
        TIMINGS
            .replace("channel_failure_threshold = 10", "channel_failure_threshold = 2")
            .replace("retry_max = \"4s\"", "retry_max = \"1s\""),
        channels_toml(&slack, &smtp, None)
    ))
    .await;
    slack.script(&[Reply::Status(500), Reply::Status(503), Reply::Status(500)]);
    rig.beat("w1", 10_000, None).await;
    rig.run_for(secs(50), secs(1)).await;
    let mails = smtp.mails();
    // w1 goes to Slack and email; the failing Slack channel's own alert
    // goes to email (and the log), and so does its resolution.
    let subjects: Vec<&str> = mails.iter().map(|m| m.subject()).collect();
    assert!(
        subjects.iter().any(|s| s.starts_with("[FIRING CRITICAL] alert channel ops_slack is failing")),
        "{subjects:?}"
    );
    let (_, state, _, _) = rig.alert("channel:ops_slack").await;
    assert_eq!(state, "resolved", "slack recovered");
    assert!(subjects.iter().any(|s| s.starts_with("[RESOLVED] alert channel ops_slack")), "{subjects:?}");
    assert_eq!(slack.accepted().len(), 1, "w1's page finally reached Slack, once");
    let to_slack = rig
        .count(
            "SELECT count(*) FROM warden.alert_deliveries d JOIN warden.alerts a ON a.id = d.alert_id \
                WHERE a.source = 'channel' AND d.channel = 'ops_slack'",
        )
        .await;
    assert_eq!(to_slack, 0, "a failing channel's alert never goes to itself");
}

/// A failing channel removed from the settings: its alert resolves, and its
/// queued messages are left to a replica that still has it (a rolling
/// deploy), then cancelled once `max_delivery_age` passed with none taking
/// them. Nothing is tried, or counted against it, where it is not
/// configured.
#[tokio::test]
async fn a_channel_removed_from_the_settings_stops_failing_and_its_queue_is_dropped() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let timings = TIMINGS
        .replace("channel_failure_threshold = 10", "channel_failure_threshold = 2")
        .replace("retry_max = \"4s\"", "retry_max = \"1s\"")
        + "max_delivery_age = \"2m\"\n";
    let mut rig = Rig::new(&format!("{timings}{BOTH_POLICY}{}", channels_toml(&slack, &smtp, None))).await;
    slack.script(&[Reply::Status(500); 50]);
    rig.beat("w1", 10_000, None).await;
    rig.run_for(secs(50), secs(1)).await;
    let (_, state, _, _) = rig.alert("channel:ops_slack").await;
    assert_eq!(state, "firing");
    let pending_to_slack =
        "SELECT count(*) FROM warden.alert_deliveries WHERE channel = 'ops_slack' AND state = 'pending'";
    assert_eq!(rig.count(pending_to_slack).await, 1, "w1's page, still retried");

    // Restarted without Slack.
    let without = settings(&format!(
        r#"{timings}
[alerting.smtp]
host = "127.0.0.1"
port = {}
tls = "none"
from = "warden@test.local"

[alerting.channels.oncall_email]
kind = "email"
to = ["oncall@test.local"]
{MAIL_POLICY}"#,
        smtp.addr.port()
    ));
    rig.esc = escalator::EscalatorParams::from_settings(&without.alerting);
    rig.dispatcher = dispatcher(&rig.db, &without, "replica-a");
    let tried = slack.requests().len();
    // Another channel removed earlier, a failure short of the threshold.
    rig.c
        .execute(
            "INSERT INTO warden.alert_channels (channel, kind, consecutive_failures) VALUES ('old_hook', 'webhook', 1)",
            &[],
        )
        .await
        .unwrap();
    rig.run_for(secs(10), secs(1)).await;
    let (_, state, _, _) = rig.alert("channel:ops_slack").await;
    assert_eq!(state, "resolved", "a removed channel fails no more");
    let subjects: Vec<String> = smtp.mails().iter().map(|m| m.subject().to_string()).collect();
    assert!(subjects.iter().any(|s| s.starts_with("[RESOLVED] alert channel ops_slack")), "{subjects:?}");
    let streak = "SELECT consecutive_failures::bigint FROM warden.alert_channels WHERE channel = 'ops_slack'";
    assert_eq!(rig.count(streak).await, 0);
    let streaks = "SELECT sum(consecutive_failures)::bigint FROM warden.alert_channels";
    assert_eq!(rig.count(streaks).await, 0, "and every other removed channel's");
    assert_eq!(rig.count(pending_to_slack).await, 1, "left for a replica that has the channel");
    assert_eq!(slack.requests().len(), tried, "not tried where it is not configured");
    // w1 is back: its all-clear goes to email, and nothing more is queued
    // for the channel that is gone.
    rig.come_back("w1").await;
    let (_, state, _, _) = rig.alert("w1:agent_unresponsive").await;
    assert_eq!(state, "resolved");
    let subjects: Vec<String> = smtp.mails().iter().map(|m| m.subject().to_string()).collect();
    assert!(subjects.iter().any(|s| s.starts_with("[RESOLVED] w1 is offline")), "{subjects:?}");
    let to_slack = "SELECT count(*) FROM warden.alert_deliveries WHERE channel = 'ops_slack'";
    assert_eq!(rig.count(to_slack).await, 1, "w1's page alone");

    rig.run_for(secs(120), secs(5)).await;
    assert_eq!(rig.count(pending_to_slack).await, 0);
    let cancelled = "SELECT count(*) FROM warden.alert_deliveries WHERE channel = 'ops_slack' AND state = 'cancelled' \
                     AND last_error LIKE 'no replica has this channel%'";
    assert_eq!(rig.count(cancelled).await, 1);
    assert_eq!(slack.requests().len(), tried);
    assert_eq!(rig.count(streak).await, 0, "nor counted against it");
    let (_, state, _, _) = rig.alert("channel:ops_slack").await;
    assert_eq!(state, "resolved");
}

/// A burst of sends that the receiver rate-limits (429) is no channel
/// failure: no alert about the channel, and the messages go out once the
/// receiver takes them.
#[tokio::test]
async fn a_rate_limited_channel_is_not_failing() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let toml = format!(
        "{}{BOTH_POLICY}{}",
        TIMINGS.replace("channel_failure_threshold = 10", "channel_failure_threshold = 2"),
        channels_toml(&slack, &smtp, None)
    );
    let mut rig = Rig::new(&toml).await;
    slack.script(&[Reply::RetryAfter(1), Reply::RetryAfter(1), Reply::RetryAfter(1)]);
    for agent in ["q1", "q2", "q3"] {
        rig.beat(agent, 10_000, Some(json!({"team": agent}))).await;
    }
    rig.run_for(secs(60), secs(1)).await;
    let refused = slack.requests().iter().filter(|r| r.answered == 429).count();
    assert_eq!(refused, 3, "the script was used up");
    assert_eq!(
        rig.count("SELECT count(*) FROM warden.alerts WHERE source = 'channel'").await,
        0,
        "no alert about the channel"
    );
    assert_eq!(
        rig.count("SELECT consecutive_failures::bigint FROM warden.alert_channels WHERE channel = 'ops_slack'").await,
        0
    );
    let texts = slack_texts(&slack);
    assert!(texts.iter().any(|t| t.contains("offline")), "the page went out after all: {texts:?}");
}

#[tokio::test]
async fn a_page_held_past_max_delivery_age_gets_its_retries_when_the_silence_ends() {
    // Held by a weekend silence longer than max_delivery_age, the page was
    // past its deadline when the silence ended: one refusal (the 429 that
    // every held page going out at once invites) made it dead, its
    // Retry-After ignored.
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let toml = format!(
        "{}{}",
        TIMINGS.replace("retry_max = \"4s\"", "retry_max = \"4s\"\nmax_delivery_age = \"20s\""),
        channels_toml(&slack, &smtp, None)
    );
    let rig = Rig::new(&toml).await;
    rig.firing_deliveries("w", 1).await;
    let start = Utc::now();
    rig.c
        .execute("UPDATE warden.alert_deliveries SET created_at = $1::timestamptz - interval '2 days'", &[&start])
        .await
        .unwrap();
    slack.script(&[Reply::RetryAfter(30)]);
    let d = dispatcher(&rig.db, &settings(&toml), "replica-a");
    let report = d.pass(Some(start)).await.unwrap();
    assert_eq!((report.claimed, report.sent), (1, 0), "{report:?}");
    assert_eq!(rig.deliveries().await[0].3, "pending", "retried, not given up");
    let next: chrono::DateTime<Utc> =
        rig.c.query_one("SELECT next_attempt_at FROM warden.alert_deliveries", &[]).await.unwrap().get(0);
    assert!(next >= start + secs(30), "its Retry-After is honoured past the deadline: {next}");
    let report = d.pass(Some(next)).await.unwrap();
    assert_eq!(report.sent, 1, "{report:?}");
}

/// Passes until nothing is left to claim; returns how many it sent.
async fn drain(d: &warden::alerting::dispatcher::Dispatcher, now: chrono::DateTime<Utc>) -> usize {
    let mut sent = 0;
    loop {
        let r = d.pass(Some(now)).await.unwrap();
        sent += r.sent;
        if r.claimed == 0 {
            return sent;
        }
    }
}

#[tokio::test]
async fn two_dispatchers_on_one_database_never_send_a_delivery_twice() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    slack.slow(std::time::Duration::from_millis(20));
    let toml = format!("[alerting]\ndispatch_batch = 4\n{}", channels_toml(&slack, &smtp, None));
    let rig = Rig::new(&toml).await;
    rig.firing_deliveries("x", 40).await;
    let s = settings(&toml);
    let a = dispatcher(&rig.db, &s, "replica-a");
    let b = dispatcher(&rig.db, &s, "replica-b");
    let now = Utc::now();
    let (sent_a, sent_b) = tokio::join!(drain(&a, now), drain(&b, now));
    assert_eq!(sent_a + sent_b, 40);
    assert!(sent_a > 0 && sent_b > 0, "both worked: {sent_a} + {sent_b}");
    let keys: std::collections::HashSet<String> =
        slack.accepted().iter().map(|r| r.header("idempotency-key").unwrap().to_string()).collect();
    assert_eq!(slack.accepted().len(), 40, "no delivery sent twice");
    assert_eq!(keys.len(), 40);
    assert_eq!(rig.count("SELECT count(*) FROM warden.alert_delivery_attempts").await, 40);

    // A replica that dies holding a claim: the delivery waits out the lease,
    // then another replica sends it.
    rig.c
        .batch_execute(
            "INSERT INTO warden.alert_deliveries (alert_id, alert_ids, channel, kind, level, attempts, claimed_by, claimed_until) \
             SELECT id, ARRAY[id], 'ops_slack', 'repeat', 1, 1, 'dead-replica', now() + interval '60 seconds' \
             FROM warden.alerts ORDER BY id LIMIT 1",
        )
        .await
        .unwrap();
    assert_eq!(a.pass(Some(Utc::now())).await.unwrap().claimed, 0, "claimed by the dead replica");
    assert_eq!(a.pass(Some(Utc::now() + secs(61))).await.unwrap().sent, 1, "retried after the lease");
    assert_eq!(slack.accepted().len(), 41);
}

/// A message queued before a silence began (or retrying since) waits while
/// its alerts fire under the silence, and goes when the silence ends.
#[tokio::test]
async fn queued_messages_of_silenced_alerts_wait_for_the_silence_to_end() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let toml = channels_toml(&slack, &smtp, None);
    let rig = Rig::new(&toml).await;
    rig.firing_deliveries("q", 3).await;
    rig.c
        .batch_execute(
            "UPDATE warden.alerts SET suppressed_reason = 'silence:7' WHERE subject = 'q1'; \
             UPDATE warden.alerts SET suppressed_reason = 'maintenance:nightly' WHERE subject = 'q2'; \
             UPDATE warden.alerts SET suppressed_reason = 'silence:7', state = 'resolved', resolved_at = now() \
               WHERE subject = 'q3'",
        )
        .await
        .unwrap();
    let d = dispatcher(&rig.db, &settings(&toml), "replica-a");
    let report = d.pass(Some(Utc::now())).await.unwrap();
    // q3 ended under the silence: nobody was told, nor needs to be now.
    assert_eq!((report.claimed, report.cancelled), (0, 1), "{report:?}");
    assert!(slack.accepted().is_empty());

    rig.c
        .batch_execute("UPDATE warden.alerts SET suppressed_reason = NULL WHERE subject IN ('q1', 'q2')")
        .await
        .unwrap();
    let report = d.pass(Some(Utc::now())).await.unwrap();
    assert_eq!((report.claimed, report.sent), (2, 2), "{report:?}");
    let texts = slack_texts(&slack).join("\n");
    assert!(texts.contains("q1") && texts.contains("q2") && !texts.contains("q3"), "{texts}");
}

#[tokio::test]
async fn a_grouped_page_held_by_a_silence_stays_held_when_one_of_its_alerts_resolves() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let toml = channels_toml(&slack, &smtp, None);
    let rig = Rig::new(&toml).await;
    // One page about g1 and g2, both silenced.
    let ids = rig.firing_deliveries("g", 2).await;
    rig.c
        .batch_execute(&format!(
            "UPDATE warden.alert_deliveries SET alert_ids = ARRAY(SELECT alert_id FROM warden.alert_deliveries \
               WHERE id IN ({0}, {1}) ORDER BY id) WHERE id = {0}; \
             DELETE FROM warden.alert_deliveries WHERE id = {1}; \
             UPDATE warden.alerts SET suppressed_reason = 'silence:9' WHERE subject IN ('g1', 'g2')",
            ids[0], ids[1]
        ))
        .await
        .unwrap();
    let d = dispatcher(&rig.db, &settings(&toml), "replica-a");
    assert_eq!(d.pass(Some(Utc::now())).await.unwrap().claimed, 0, "held");
    // g1 resolves under the silence: g2 still fires under it.
    rig.c
        .batch_execute("UPDATE warden.alerts SET state = 'resolved', resolved_at = now() WHERE subject = 'g1'")
        .await
        .unwrap();
    let report = d.pass(Some(Utc::now())).await.unwrap();
    assert_eq!((report.claimed, report.cancelled), (0, 0), "still held: {report:?}");
    assert!(slack.accepted().is_empty());
    // The silence ends with g2 still firing: the page goes.
    rig.c.batch_execute("UPDATE warden.alerts SET suppressed_reason = NULL WHERE subject = 'g2'").await.unwrap();
    let report = d.pass(Some(Utc::now())).await.unwrap();
    assert_eq!((report.claimed, report.sent), (1, 1), "{report:?}");
    assert!(slack_texts(&slack).join("\n").contains("g2"));
}

/// The database goes away while two sends are under way and comes back a
/// little later: both outcomes are recorded then, once each, and nothing
/// is sent again. (A failed record used to end the pass, leaving both
/// deliveries claimed until the lease ran out, then sending them twice.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_of_sends_are_recorded_through_a_database_blip() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let toml = channels_toml(&slack, &smtp, None);
    let rig = Rig::new(&toml).await;
    let Some((relay, through)) = crate::relay::Relay::to(&rig.db).await else { return };
    rig.firing_deliveries("b", 2).await;
    let s = settings(&toml);
    let d = dispatcher_through(through, &s, "replica-a");
    let release = slack.hold();
    let pass = tokio::spawn(async move { (d.pass(Some(Utc::now())).await, d) });
    let wait = std::time::Duration::from_secs(30);
    eventually(wait, "both sends under way", || async { (slack.arrived() == 2).then_some(()) }).await;
    relay.cut();
    release.send(true).unwrap();
    eventually(wait, "both sends answered", || async { (slack.accepted().len() == 2).then_some(()) }).await;
    eventually(wait, "records tried in vain", || async { (relay.refused() >= 2).then_some(()) }).await;
    relay.restore();
    let (report, d) = pass.await.unwrap();
    let report = report.expect("the pass outlives the blip");
    assert_eq!((report.claimed, report.sent, report.unrecorded), (2, 2, 0), "{report:?}");
    let states: Vec<String> = rig.deliveries().await.into_iter().map(|d| d.3).collect();
    assert_eq!(states, ["sent", "sent"]);
    assert_eq!(rig.count("SELECT count(*) FROM warden.alert_delivery_attempts").await, 2, "each attempt once");
    assert_eq!(rig.count("SELECT sent FROM warden.alert_channels WHERE channel = 'ops_slack'").await, 2);
    let later = d.pass(Some(Utc::now() + secs(3600))).await.unwrap();
    assert_eq!(later.claimed, 0, "nothing is left to send again");
    assert_eq!(slack.accepted().len(), 2);
}

/// A record tried again after its first try committed (the answer lost on
/// the way) writes the attempt, and counts it in the channel's health,
/// once: here the first try's attempt row is already there when the pass
/// records.
#[tokio::test]
async fn an_attempt_already_recorded_is_not_recorded_twice() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let rig = Rig::new(&channels_toml(&slack, &smtp, None)).await;
    let delivery = rig.firing_deliveries("r", 1).await[0];
    // The attempt the pass's claim will number 1, from this replica.
    rig.c
        .execute(
            "INSERT INTO warden.alert_delivery_attempts (delivery_id, channel, attempt, started_at, latency_ms, \
               outcome, replica) VALUES ($1, 'ops_slack', 1, now(), 5, 'sent', 'replica-a')",
            &[&delivery],
        )
        .await
        .unwrap();
    let report = rig.dispatcher.pass(Some(Utc::now())).await.unwrap();
    assert_eq!((report.claimed, report.sent), (1, 1), "{report:?}");
    assert_eq!(rig.count("SELECT count(*) FROM warden.alert_delivery_attempts").await, 1);
    assert_eq!(
        rig.count("SELECT count(*) FROM warden.alert_channels WHERE channel = 'ops_slack'").await,
        0,
        "the channel's health counted it when it was first recorded, not again"
    );
    assert_eq!(rig.deliveries().await[0].3, "sent");
}

#[tokio::test]
async fn escalator_cycles_on_two_replicas_create_each_delivery_once() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let mut rig = Rig::new(&format!("{TIMINGS}{}{PAGE_POLICY}", channels_toml(&slack, &smtp, None))).await;
    rig.auto_dispatch = false;
    rig.beat("w1", 10_000, None).await;
    rig.run_for(secs(40), secs(2)).await;
    assert_eq!(rig.count("SELECT count(*) FROM warden.alert_deliveries").await, 1, "the firing message");
    // Level 2 falls due; two replicas run their cycles at the same moment.
    let (_, _, _, paged_at) = rig.alert("w1:agent_unresponsive").await;
    let at = paged_at.unwrap() + secs(300);
    let mut other = rig.db.client().await;
    let (r1, r2) = tokio::join!(
        escalator::cycle(&mut rig.c, &rig.esc, Some(at)),
        escalator::cycle(&mut other, &rig.esc, Some(at))
    );
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    assert_eq!(r1.deliveries + r2.deliveries, 1, "{r1:?} {r2:?}");
    // And again, one after the other: nothing new.
    let r3 = escalator::cycle(&mut other, &rig.esc, Some(at + secs(1))).await.unwrap();
    assert_eq!(r3.deliveries, 0);
    assert_eq!(rig.count("SELECT count(*) FROM warden.alert_deliveries").await, 2);
    assert_eq!(rig.count("SELECT count(*) FROM warden.alert_notifications").await, 2);
}

#[tokio::test]
async fn with_no_channel_configured_alerts_go_to_the_log() {
    let mut rig = Rig::new(TIMINGS).await;
    rig.beat("w1", 10_000, None).await;
    rig.run_for(secs(40), secs(2)).await;
    let sent: Vec<(String, String, String)> =
        rig.deliveries().await.into_iter().map(|d| (d.0, d.1, d.3)).filter(|d| d.1 == "firing").collect();
    assert!(!sent.is_empty());
    assert!(sent.iter().all(|(channel, _, state)| channel == "log" && state == "sent"), "{sent:?}");
}

#[tokio::test]
async fn telegram_and_webhook_channels_speak_their_protocols() {
    use warden::alerting::channels::Channels;
    use warden::alerting::escalation::Kind;
    use warden::alerting::message::{AlertView, Message};

    let bot = HttpReceiver::start().await;
    let hook = HttpReceiver::start().await;
    // A webhook URL that answers with a redirect to the real receiver:
    // followed, the signed body would go wherever it points.
    let redirector = {
        let to = hook.url("/in");
        let app = axum::Router::new().fallback(move || {
            let to = to.clone();
            async move { (axum::http::StatusCode::TEMPORARY_REDIRECT, [(axum::http::header::LOCATION, to)]) }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/in", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    };
    let s = settings(&format!(
        r#"
[alerting.channels.ops_telegram]
kind = "telegram"
bot_token = "123456:ABC-DEF"
chat_ids = ["-100123", "42"]
api_base = "{}"

[alerting.channels.audit_hook]
kind = "webhook"
url = "{}"
secret = "{}"

[alerting.channels.moved_hook]
kind = "webhook"
url = "{}"
secret = "{}"
"#,
        bot.url(""),
        hook.url("/in"),
        super::HOOK_SECRET,
        redirector,
        super::HOOK_SECRET
    ));
    let channels = Channels::from_settings(&s.alerting).unwrap();
    let message = Message {
        delivery_id: 9,
        idempotency_key: "key-9".into(),
        channel: "ops_telegram".into(),
        kind: Kind::Firing,
        level: 1,
        route: Some("default".into()),
        detail: json!({}),
        alerts: vec![AlertView {
            id: 5,
            incident_id: Some(50),
            severity: "critical".into(),
            state: "firing".into(),
            subject: Some("db_1".into()),
            agent_name: None,
            issue: "agent_unresponsive".into(),
            summary: Some("db_1 is offline".into()),
            opened_at: Utc::now(),
            acknowledged_by: None,
            resolved_at: None,
            resolution: None,
            liveness: Some("offline".into()),
            score: Some(12.0),
            tier: Some("critical".into()),
            last_seen: None,
            scored_at: None,
            liveness_since: None,
            transitions: vec![],
            recovery: vec![],
            gave_up: None,
        }],
        link_base: String::new(),
        created_at: Utc::now(),
    };
    channels.get("ops_telegram").unwrap().send(&message, &[], std_secs(30)).await.unwrap();
    let mut sent = bot.accepted();
    assert_eq!(sent.len(), 2, "one sendMessage per chat");
    // The chats are sent to at once, in no particular order.
    sent.sort_by_key(|r| r.json()["chat_id"].as_str() != Some("-100123"));
    assert_eq!(sent[0].path, "/bot123456:ABC-DEF/sendMessage");
    let body = sent[0].json();
    assert_eq!((body["chat_id"].as_str(), body["parse_mode"].as_str()), (Some("-100123"), Some("Markdown")));
    // Inside the bold entity legacy Markdown takes text as it is; the
    // details after it are escaped.
    let text = body["text"].as_str().unwrap();
    assert!(text.starts_with("*[FIRING CRITICAL] db_1 is offline*\n"), "{body}");
    assert!(text.contains("Alert #5 · db\\_1 · agent\\_unresponsive"), "{body}");
    assert_eq!(sent[1].json()["chat_id"], "42");

    // A refused Telegram send never shows the token.
    bot.script(&[Reply::Status(401)]);
    let e = channels.get("ops_telegram").unwrap().send(&message, &[], std_secs(30)).await.unwrap_err();
    assert_eq!(e.status, Some(401));
    assert!(!e.error.contains("ABC-DEF"), "{}", e.error);

    // A chat that does not answer in time is given up alone: the error
    // says which chats were reached, for the retry to skip them.
    bot.stall_containing(r#""chat_id":"42""#, std_secs(60));
    let started = std::time::Instant::now();
    let e = channels.get("ops_telegram").unwrap().send(&message, &[], std_secs(5)).await.unwrap_err();
    assert!(started.elapsed() < std_secs(50), "the stalled chat was given up");
    assert_eq!(e.reached, ["-100123"], "{}", e.error);
    assert!(e.error.contains("chat 42"), "{}", e.error);

    channels.get("audit_hook").unwrap().send(&message, &[], std_secs(30)).await.unwrap();
    let r = &hook.accepted()[0];
    assert!(signature_valid(r));
    assert_eq!(r.header("idempotency-key"), Some("key-9"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body = r.json();
    assert_eq!(body["alerts"][0]["agent_id"], "db_1");
    assert_eq!(body["headline"], "[FIRING CRITICAL] db_1 is offline");

    // A redirect is an answer like any other, and not a success.
    let e = channels.get("moved_hook").unwrap().send(&message, &[], std_secs(30)).await.unwrap_err();
    assert_eq!(e.status, Some(307), "{}", e.error);
    assert_eq!(hook.requests().len(), 1, "nothing followed the redirect");
}

/// An acknowledgement can commit while the escalator is creating the next
/// level's delivery, which its own cancelling then cannot see; and a
/// resolution cancels nothing. The dispatcher drops escalations none of
/// whose alerts is firing any more instead of sending them.
#[tokio::test]
async fn escalations_whose_alerts_stopped_firing_are_not_sent() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let mut rig = Rig::new(&format!("{TIMINGS}{}{PAGE_POLICY}", channels_toml(&slack, &smtp, None))).await;
    for agent in ["e1", "e2"] {
        rig.beat(agent, 10_000, None).await;
    }
    rig.run_for(secs(40), secs(2)).await;
    assert_eq!(slack.accepted().len(), 1, "level 1, both alerts in one message");
    let (_, _, _, paged_at) = rig.alert("e1:agent_unresponsive").await;

    // Level 2 becomes due and is created (one email about both), but not
    // sent yet.
    rig.auto_dispatch = false;
    rig.run_to(paged_at.unwrap() + secs(300), secs(10)).await;
    let pending = "SELECT count(*) FROM warden.alert_deliveries WHERE kind = 'escalation' AND state = 'pending'";
    assert_eq!(rig.count(pending).await, 1);

    // e1 acknowledged behind the escalation's back: e2 still fires, so the
    // email still goes.
    rig.c
        .execute(
            "UPDATE warden.alerts SET state = 'acknowledged', acknowledged_at = now() \
             WHERE dedup_key = 'e1:agent_unresponsive'",
            &[],
        )
        .await
        .unwrap();
    let report = rig.dispatcher.pass(Some(rig.now)).await.unwrap();
    assert_eq!((report.cancelled, report.sent), (0, 1), "{report:?}");
    assert_eq!(smtp.mails().len(), 1);

    // Later escalations for e2 (level 3) are created, then e2 resolves
    // before they are sent: none goes out.
    rig.run_to(paged_at.unwrap() + secs(15 * 60), secs(30)).await;
    assert_eq!(rig.count(pending).await, 2, "level 3 is pending");
    rig.c
        .execute(
            "UPDATE warden.alerts SET state = 'resolved', resolved_at = now() WHERE dedup_key = 'e2:agent_unresponsive'",
            &[],
        )
        .await
        .unwrap();
    let report = rig.dispatcher.pass(Some(rig.now)).await.unwrap();
    assert_eq!((report.cancelled, report.claimed), (2, 0), "level 3's email and Slack post: {report:?}");
    assert_eq!(rig.count(pending).await, 0);
    assert_eq!(smtp.mails().len(), 1, "no escalation about alerts that stopped firing");
    let texts = slack_texts(&slack);
    assert!(!texts.iter().any(|t| t.contains("ESCALATED")), "{texts:?}");
}

/// A warning that no route takes, whose recovery gave up, is paged as
/// critical on the critical route instead of waiting for a route forever.
#[tokio::test]
async fn a_warning_whose_recovery_gave_up_reaches_the_critical_route() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let config = format!(
        "{TIMINGS}{}\n[health.severities]\nagent_unresponsive = \"warning\"\n{}",
        channels_toml(&slack, &smtp, None),
        r#"
[[alerting.policies]]
name = "pager"
levels = [{ after = "0s", channels = ["ops_slack"] }]

[[alerting.routes]]
severities = ["critical", "emergency"]
policy = "pager"
"#
    );
    let mut rig = Rig::new(&config).await;
    rig.beat("g1", 10_000, None).await;
    rig.run_for(secs(40), secs(2)).await;
    assert!(slack.accepted().is_empty(), "no route takes warnings");
    let (_, _, reason, paged) = rig.alert("g1:agent_unresponsive").await;
    assert_eq!((reason.as_deref(), paged), (Some("no_route"), None));

    let incident = rig.incident("g1", "agent_unresponsive").await;
    recovery_gives_up(&rig, incident, "g1", "recovery gave up").await;
    rig.run_for(secs(10), secs(2)).await;
    let texts = slack_texts(&slack);
    assert_eq!(texts.len(), 1, "{texts:?}");
    // Paged after recovery gave up: the first message says so.
    assert!(texts[0].starts_with("[RECOVERY FAILED CRITICAL] g1 is offline"), "{texts:?}");
    assert!(texts[0].contains("\nRecovery gave up\n"), "{texts:?}");
    assert!(!texts[0].contains("Recovery attempts: none"), "{texts:?}");
    let severity: String = rig
        .c
        .query_one("SELECT severity FROM warden.alerts WHERE dedup_key = 'g1:agent_unresponsive'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(severity, "critical");
}

/// An operator resets a recovery that gave up (`warden recovery reset`),
/// and it gives up again: the channels hear of the second give-up too.
#[tokio::test]
async fn a_recovery_that_gives_up_again_after_a_reset_is_paged_again() {
    let slack = HttpReceiver::start().await;
    let smtp = SmtpServer::start().await;
    let mut rig = Rig::new(&format!("{TIMINGS}{}{SLACK_POLICY}", channels_toml(&slack, &smtp, None))).await;
    rig.beat("rr", 10_000, None).await;
    rig.run_for(secs(32), secs(2)).await;
    let incident = rig.incident("rr", "agent_unresponsive").await;
    failed_attempt(&rig, incident, "rr").await;
    rig.run_for(secs(10), secs(2)).await;
    assert_eq!(slack_texts(&slack).len(), 1, "the page: {:?}", slack_texts(&slack));
    assert!(slack_texts(&slack)[0].starts_with("[FIRING CRITICAL] rr is offline"), "{:?}", slack_texts(&slack));

    // Paged already: the give-up is an update of its own.
    recovery_gives_up(&rig, incident, "rr", "recovery of rr gave up after 1 attempt").await;
    rig.run_for(secs(10), secs(2)).await;
    let sent = slack_texts(&slack);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(sent[1].starts_with("[RECOVERY FAILED CRITICAL] rr is offline"), "{sent:?}");

    assert_eq!(warden::recovery::reset(&mut rig.c, "rr").await.unwrap(), 1);
    rig.run_for(secs(20), secs(2)).await;
    assert_eq!(slack_texts(&slack).len(), 2, "a reset alone says nothing: {:?}", slack_texts(&slack));

    recovery_gives_up(&rig, incident, "rr", "recovery of rr gave up after 2 attempts").await;
    rig.run_for(secs(10), secs(2)).await;
    let sent = slack_texts(&slack);
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert!(sent[2].starts_with("[RECOVERY FAILED CRITICAL] rr is offline"), "{sent:?}");
    assert!(sent[2].contains("Recovery of rr gave up after 2 attempts"), "the latest give-up: {sent:?}");
    let updates = "SELECT string_agg(sequence::text, ',' ORDER BY sequence) FROM warden.alert_notifications \
                   WHERE kind = 'escalation' AND channel = 'ops_slack'";
    let sequences: Option<String> = rig.c.query_one(updates, &[]).await.unwrap().get(0);
    assert_eq!(sequences.as_deref(), Some("1,2"), "one ledger entry per give-up");
    // Told once: later cycles send nothing more about it.
    rig.run_for(secs(30), secs(2)).await;
    assert_eq!(slack_texts(&slack).len(), 3, "{:?}", slack_texts(&slack));
}

/// `timings`, and a Telegram channel of two chats (-100123 and 42) at
/// `bot` that gets every offline agent's page.
fn telegram_only(timings: &str, bot: &HttpReceiver) -> String {
    format!(
        r#"{timings}
[alerting.channels.ops_telegram]
kind = "telegram"
bot_token = "123456:ABC-DEF"
chat_ids = ["-100123", "42"]
api_base = "{}"

[[alerting.policies]]
name = "tg"
levels = [{{ after = "0s", channels = ["ops_telegram"] }}]

[[alerting.routes]]
issues = ["agent_unresponsive"]
policy = "tg"
"#,
        bot.url("")
    )
}

/// A Telegram chat that keeps failing (502, not a refusal for good) is
/// retried alone: the chats that got the message do not get it again with
/// every retry.
#[tokio::test]
async fn a_telegram_chat_that_keeps_failing_does_not_repeat_the_message_to_the_others() {
    let bot = HttpReceiver::start().await;
    bot.refuse_containing(r#""chat_id":"42""#, 502);
    let timings = TIMINGS.replace("[alerting]\n", "[alerting]\nmax_delivery_age = \"2m\"\n");
    let mut rig = Rig::new(&telegram_only(&timings, &bot)).await;
    rig.beat("t1", 10_000, None).await;
    // Offline at +32s, sent after group_wait, then retried every 1-4s.
    rig.run_for(secs(90), secs(2)).await;
    let to = |chat: &str| bot.requests().iter().filter(|r| r.json()["chat_id"] == chat).count();
    assert_eq!(to("-100123"), 1, "the chat that got it is not sent it again");
    assert!(to("42") >= 5, "the refusing chat is retried: {}", to("42"));
    let (state, detail): (String, serde_json::Value) = rig
        .c
        .query_one("SELECT state, detail FROM warden.alert_deliveries WHERE channel = 'ops_telegram'", &[])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((state.as_str(), &detail["reached"]), ("pending", &json!(["-100123"])));

    // Given up at max_delivery_age: the chat that saw the page still gets
    // its all-clear.
    rig.run_for(secs(120), secs(2)).await;
    let state: String = rig
        .c
        .query_one("SELECT state FROM warden.alert_deliveries WHERE channel = 'ops_telegram'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "dead");
    rig.come_back("t1").await;
    rig.run_for(secs(10), secs(2)).await;
    let texts: Vec<String> = bot
        .accepted()
        .iter()
        .filter(|r| r.json()["chat_id"] == "-100123")
        .map(|r| r.json()["text"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert!(texts[1].contains("RESOLVED"), "{}", texts[1]);
}

/// An alert that resolves while its page is still being retried to one
/// chat: the chat that was paged gets the all-clear at once, not after
/// the retries run out (max_delivery_age, an hour here), and the failing
/// chat is sent the all-clear instead of the page.
#[tokio::test]
async fn a_resolution_is_not_held_behind_a_page_retried_to_one_chat() {
    let bot = HttpReceiver::start().await;
    bot.refuse_containing(r#""chat_id":"42""#, 502);
    let mut rig = Rig::new(&telegram_only(TIMINGS, &bot)).await;
    rig.beat("t3", 10_000, None).await;
    rig.run_for(secs(60), secs(2)).await;
    let texts = |chat: &str| -> Vec<String> {
        bot.requests()
            .iter()
            .filter(|r| r.json()["chat_id"] == chat)
            .map(|r| r.json()["text"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(texts("-100123").len(), 1, "paged once");
    assert!(texts("42").len() >= 3, "the failing chat is retried: {:?}", texts("42"));

    rig.come_back("t3").await;
    rig.run_for(secs(4), secs(2)).await;
    let to_paged = texts("-100123");
    assert_eq!(to_paged.len(), 2, "{to_paged:?}");
    assert!(to_paged[1].contains("RESOLVED"), "{}", to_paged[1]);
    let (state, error): (String, Option<String>) = rig
        .c
        .query_one(
            "SELECT state, last_error FROM warden.alert_deliveries WHERE channel = 'ops_telegram' AND kind = 'firing'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(state, "cancelled");
    assert!(error.unwrap_or_default().contains("resolved before it reached every recipient"));
    let pages_42 = || texts("42").iter().filter(|t| !t.contains("RESOLVED")).count();
    let paged_42 = pages_42();
    rig.run_for(secs(20), secs(2)).await;
    assert_eq!(pages_42(), paged_42, "the page is not retried once its alert resolved");
    let to_failing = texts("42");
    assert!(to_failing.last().is_some_and(|t| t.contains("RESOLVED")), "{to_failing:?}");
}

/// A chat the bot was removed from (403) is refused for good: once another
/// chat has the message it is not tried again, and the refusal is on record.
#[tokio::test]
async fn a_telegram_chat_that_refuses_the_bot_for_good_is_not_retried() {
    let bot = HttpReceiver::start().await;
    bot.refuse_containing(r#""chat_id":"42""#, 403);
    let mut rig = Rig::new(&telegram_only(TIMINGS, &bot)).await;
    rig.beat("t2", 10_000, None).await;
    rig.run_for(secs(90), secs(2)).await;
    let to = |chat: &str| bot.requests().iter().filter(|r| r.json()["chat_id"] == chat).count();
    assert_eq!((to("-100123"), to("42")), (1, 1), "each chat once");
    let (state, error): (String, Option<String>) = rig
        .c
        .query_one("SELECT state, last_error FROM warden.alert_deliveries WHERE channel = 'ops_telegram'", &[])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(state, "sent");
    assert!(error.unwrap_or_default().contains("chat 42"));
    let told =
        rig.count("SELECT count(*) FROM warden.system_events WHERE event_type = 'alert_recipient_refused'").await;
    assert_eq!(told, 1);
}
