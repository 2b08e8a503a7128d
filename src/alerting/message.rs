//! What a message says, independent of the channel: the alerts it covers
//! with their agent's state, recent transitions and recovery attempts, read
//! from the database when the message is sent (so a retried message says
//! what is true when it finally goes out). Channels render it.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::escalation::Kind;
use super::grouping::{group_headline, issue_phrase};
use crate::db::DbError;

/// Most alerts described in detail in one message; the rest are counted.
pub const DETAILED: usize = 10;
/// Most alerts named in a grouped headline.
pub const NAMED: usize = 5;
/// Alert ids spelled out in an acknowledgement hint.
pub const ACK_IDS: usize = 20;

/// A liveness change of the agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub at: DateTime<Utc>,
    pub from: String,
    pub to: String,
    pub reason: Option<String>,
}

/// One row of `warden.recovery_actions`.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub strategy: String,
    pub action: String,
    pub attempt: i32,
    pub state: String,
    pub outcome: Option<String>,
}

/// One alert as a message describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertView {
    pub id: i64,
    pub incident_id: Option<i64>,
    pub severity: String,
    pub state: String,
    /// Agent id, channel name, or None for the fleet.
    pub subject: Option<String>,
    pub agent_name: Option<String>,
    pub issue: String,
    pub summary: Option<String>,
    pub opened_at: DateTime<Utc>,
    pub acknowledged_by: Option<String>,
    pub resolved_at: Option<DateTime<Utc>>,
    /// Why its incident resolved ("condition cleared", "agent removed").
    pub resolution: Option<String>,
    pub liveness: Option<String>,
    pub score: Option<f64>,
    pub tier: Option<String>,
    /// When the score was computed, and since when the agent has been in
    /// its liveness state: a score from before an agent went offline
    /// describes the agent it was, and says so.
    pub scored_at: Option<DateTime<Utc>>,
    pub liveness_since: Option<DateTime<Utc>>,
    pub last_seen: Option<DateTime<Utc>>,
    pub transitions: Vec<Transition>,
    pub recovery: Vec<Attempt>,
    /// Why automated recovery of its incident gave up (the latest
    /// `recovery_failed` event), if it did.
    pub gave_up: Option<String>,
}

/// A message ready to render: one delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub delivery_id: i64,
    pub idempotency_key: String,
    pub channel: String,
    pub kind: Kind,
    pub level: i32,
    pub route: Option<String>,
    /// `auto_recovered_attempt`, `recovery_failed`, ... from the delivery.
    pub detail: Value,
    pub alerts: Vec<AlertView>,
    /// `alerting.link_base`, for acknowledgement instructions.
    pub link_base: String,
    /// When the delivery was decided: the clock an escalation or a repeat
    /// reads "unacknowledged for ..." against.
    pub created_at: DateTime<Utc>,
}

impl Message {
    pub fn auto_recovered(&self) -> Option<i64> {
        self.detail.get("auto_recovered_attempt").and_then(Value::as_i64)
    }

    /// An update saying recovery gave up, or a first page made after it
    /// had (the escalator marks both).
    pub fn recovery_failed(&self) -> bool {
        self.detail.get("recovery_failed").and_then(Value::as_bool).unwrap_or(false)
    }

    /// The highest severity among the alerts.
    pub fn severity(&self) -> &str {
        const ORDER: [&str; 4] = ["info", "warning", "critical", "emergency"];
        if self.auto_recovered().is_some() {
            return "info";
        }
        self.alerts
            .iter()
            .map(|a| a.severity.as_str())
            .max_by_key(|s| ORDER.iter().position(|o| o == s).unwrap_or(0))
            .unwrap_or("info")
    }

    /// A short tag saying what kind of message this is.
    pub fn tag(&self) -> String {
        if self.auto_recovered().is_some() {
            return "AUTO-RECOVERED".into();
        }
        if self.recovery_failed() {
            return format!("RECOVERY FAILED {}", self.severity().to_uppercase());
        }
        match self.kind {
            Kind::Firing => format!("FIRING {}", self.severity().to_uppercase()),
            Kind::Escalation => format!("ESCALATED L{} {}", self.level, self.severity().to_uppercase()),
            Kind::Repeat => format!("STILL FIRING {}", self.severity().to_uppercase()),
            Kind::Resolved => "RESOLVED".into(),
        }
    }

    /// One line: `[FIRING CRITICAL] w1 is offline: ...` or a group headline.
    pub fn headline(&self) -> String {
        let body = match self.alerts.as_slice() {
            [] => "alert".to_string(),
            [a] => {
                let who = a.subject.as_deref().unwrap_or("fleet");
                if let Some(n) = self.auto_recovered() {
                    format!("{who} {}: auto-recovered on attempt {n}", a.issue)
                } else {
                    match &a.summary {
                        Some(s) if !s.is_empty() => s.clone(),
                        _ => format!("{who} {}", issue_phrase(&a.issue)),
                    }
                }
            }
            many => {
                let items: Vec<(Option<&str>, &str)> =
                    many.iter().map(|a| (a.subject.as_deref(), a.issue.as_str())).collect();
                group_headline(&items, NAMED)
            }
        };
        shown(format!("[{}] {body}{}", self.tag(), self.open_for()))
    }

    /// How long the oldest firing alert has gone on, for the messages that
    /// come after the first: the summary was written when it opened ("no
    /// heartbeat for 32s") and would otherwise read as if just now.
    fn open_for(&self) -> String {
        if self.auto_recovered().is_some() {
            return String::new();
        }
        let oldest = self.alerts.iter().filter(|a| a.state == "firing").map(|a| a.opened_at).min();
        let Some(opened) = oldest else { return String::new() };
        let open = crate::console::format::span((self.created_at - opened).num_seconds());
        match self.kind {
            Kind::Escalation => format!(" (unacknowledged for {open})"),
            Kind::Repeat => format!(" (firing for {open})"),
            Kind::Firing | Kind::Resolved => String::new(),
        }
    }

    /// How to acknowledge, for messages that still ask for action. A
    /// group of a whole fleet names its first [`ACK_IDS`] alerts and
    /// counts the rest, so one message never becomes thousands of ids.
    pub fn ack_hint(&self) -> Option<String> {
        if matches!(self.kind, Kind::Resolved) {
            return None;
        }
        let open: Vec<i64> = self.alerts.iter().filter(|a| a.state == "firing").map(|a| a.id).collect();
        let first = *open.first()?;
        let shown = open.iter().take(ACK_IDS).map(i64::to_string).collect::<Vec<_>>().join(" ");
        let more = match open.len().saturating_sub(ACK_IDS) {
            0 => String::new(),
            n => format!(" (and {n} more: `warden alerts list --state firing --limit {}`)", open.len().min(1000)),
        };
        let base = self.link_base.trim_end_matches('/');
        // The API acknowledges one alert per call: a grouped message must
        // not suggest that its first alert's URL stops them all.
        let post = if open.len() == 1 {
            format!("POST {base}/v1/alerts/{first}/ack")
        } else {
            format!("POST {base}/v1/alerts/ID/ack for each")
        };
        Some(format!(
            "Acknowledge to stop escalation: `warden alerts ack {shown}`{more} or {post} with {{\"by\": \"your name\"}}"
        ))
    }

    /// The details of each alert as plain-text lines (the first
    /// [`DETAILED`] alerts; the rest are counted).
    pub fn detail_lines(&self, alert: &AlertView) -> Vec<String> {
        let mut lines = Vec::new();
        let who = alert.subject.as_deref().unwrap_or("fleet");
        let name = alert.agent_name.as_deref().filter(|n| *n != who).map(|n| format!(" ({n})")).unwrap_or_default();
        lines.push(format!("Alert #{} · {who}{name} · {} · {}", alert.id, alert.issue, alert.severity));
        if let Some(s) = &alert.summary {
            lines.push(s.clone());
        }
        lines.push(format!("Since: {}", alert.opened_at.format("%Y-%m-%d %H:%M:%S UTC")));
        if let Some(at) = alert.resolved_at {
            // An incident can end without the agent recovering (it was
            // removed, or the problem became another): say how.
            let how = alert.resolution.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
            lines.push(format!("Resolved: {}{how}", at.format("%Y-%m-%d %H:%M:%S UTC")));
        }
        if let Some(by) = &alert.acknowledged_by {
            lines.push(format!("Acknowledged by {by}"));
        }
        if alert.liveness.is_some() || alert.score.is_some() {
            let score = match (alert.score, &alert.tier) {
                (Some(s), Some(t)) => format!("score {s:.0} ({t})"),
                (Some(s), None) => format!("score {s:.0}"),
                _ => "score n/a".to_string(),
            };
            let score = match (alert.score, alert.scored_at, alert.liveness_since, alert.liveness.as_deref()) {
                (Some(_), Some(scored), Some(since), Some(state)) if scored < since => {
                    format!("{score} as of {}, before it became {state}", scored.format("%H:%M:%S UTC"))
                }
                _ => score,
            };
            let seen = alert.last_seen.map(|t| format!(", last seen {}", t.format("%H:%M:%S UTC"))).unwrap_or_default();
            lines.push(format!("Now: {}, {score}{seen}", alert.liveness.as_deref().unwrap_or("unknown")));
        }
        if !alert.transitions.is_empty() {
            let t: Vec<String> = alert
                .transitions
                .iter()
                .map(|t| {
                    let why = t.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
                    format!("{} {}→{}{why}", t.at.format("%H:%M:%S"), t.from, t.to)
                })
                .collect();
            lines.push(format!("Recent transitions: {}", t.join("; ")));
        }
        if alert.recovery.is_empty() {
            if alert.incident_id.is_some() && alert.gave_up.is_none() {
                lines.push("Recovery attempts: none".to_string());
            }
        } else {
            let r: Vec<String> = alert
                .recovery
                .iter()
                .map(|a| {
                    let outcome = a.outcome.as_deref().map(|o| format!(": {o}")).unwrap_or_default();
                    format!("{}/{} attempt {} {}{outcome}", a.strategy, a.action, a.attempt, a.state)
                })
                .collect();
            lines.push(format!("Recovery attempts: {}", r.join("; ")));
        }
        if let Some(why) = &alert.gave_up {
            // The engine's own summary: "recovery of w1 gave up after ...".
            lines.push(crate::console::format::capitalized(why));
        }
        lines.into_iter().map(shown).collect()
    }

    /// The whole message as plain text: headline, details, how to ack
    /// (each line [`shown`] already).
    pub fn text(&self) -> String {
        let mut out = vec![self.headline()];
        if let Some(n) = self.auto_recovered() {
            out.push(format!("Automated recovery fixed it on attempt {n}; nobody needs to act."));
        }
        if self.recovery_failed() {
            out.push("Automated recovery gave up; a person needs to look.".into());
        }
        for alert in self.alerts.iter().take(DETAILED) {
            out.push(String::new());
            out.extend(self.detail_lines(alert));
        }
        if self.alerts.len() > DETAILED {
            out.push(String::new());
            out.push(format!("… and {} more alerts", self.alerts.len() - DETAILED));
        }
        if let Some(hint) = self.ack_hint() {
            out.push(String::new());
            out.push(hint);
        }
        out.join("\n")
    }

    /// The JSON document webhooks receive.
    pub fn to_json(&self) -> Value {
        let alerts: Vec<Value> = self
            .alerts
            .iter()
            .map(|a| {
                json!({
                    "id": a.id,
                    "incident_id": a.incident_id,
                    "severity": a.severity,
                    "state": a.state,
                    "agent_id": a.subject,
                    "agent_name": a.agent_name,
                    "issue_type": a.issue,
                    "summary": a.summary,
                    "opened_at": a.opened_at,
                    "acknowledged_by": a.acknowledged_by,
                    "resolved_at": a.resolved_at,
                    "liveness": a.liveness,
                    "score": a.score,
                    "tier": a.tier,
                    "scored_at": a.scored_at,
                    "liveness_since": a.liveness_since,
                    "last_seen": a.last_seen,
                    "transitions": a.transitions.iter().map(|t| json!({
                        "at": t.at, "from": t.from, "to": t.to, "reason": t.reason,
                    })).collect::<Vec<_>>(),
                    "recovery": a.recovery.iter().map(|r| json!({
                        "strategy": r.strategy, "action": r.action, "attempt": r.attempt,
                        "state": r.state, "outcome": r.outcome,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({
            "delivery_id": self.delivery_id,
            "idempotency_key": self.idempotency_key,
            "kind": self.kind,
            "level": self.level,
            "route": self.route,
            "severity": self.severity(),
            "headline": self.headline(),
            "text": self.text(),
            "auto_recovered_attempt": self.auto_recovered(),
            "recovery_failed": self.recovery_failed(),
            "alerts": alerts,
        })
    }
}

/// `line` as a text channel may show it: agents choose their names, labels
/// and (through them) parts of summaries, and a bidirectional embedding,
/// override or isolate (U+202E) or a line separator in one would reorder
/// or break the words warden puts around it ("db-1 is offline" reading as
/// something else). Such characters become U+FFFD; the rest is left as it
/// is, the direction marks (U+200E, U+200F, U+061C) that right-to-left
/// names use included, since they open nothing that could spill over.
/// Structured fields (the webhook's JSON) keep the text unchanged.
pub fn shown(line: String) -> String {
    if line.chars().any(reorders) {
        line.chars().map(|c| if reorders(c) { '\u{FFFD}' } else { c }).collect()
    } else {
        line
    }
}

/// A bidirectional embedding, override or isolate, or a line or paragraph
/// separator: what agent-supplied text must not carry into words warden
/// puts around it ([`shown`], and tables printed to a terminal).
pub fn reorders(c: char) -> bool {
    matches!(c, '\u{2028}' | '\u{2029}')
        || ('\u{202A}'..='\u{202E}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// A claimed delivery, as the dispatcher holds it.
#[derive(Debug, Clone)]
pub struct DeliveryRow {
    pub id: i64,
    pub alert_ids: Vec<i64>,
    pub channel: String,
    pub kind: Kind,
    pub level: i32,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub idempotency_key: String,
    pub detail: Value,
    pub route: Option<String>,
}

/// Builds the messages of `rows` with three queries in all.
pub async fn load(
    client: &tokio_postgres::Transaction<'_>,
    rows: &[DeliveryRow],
    link_base: &str,
) -> Result<HashMap<i64, Message>, DbError> {
    let mut ids: Vec<i64> = rows.iter().flat_map(|r| r.alert_ids.iter().copied()).collect();
    ids.sort_unstable();
    ids.dedup();
    let alert_rows = client
        .query(
            "SELECT a.id, a.incident_id, a.severity, a.state, coalesce(a.subject, i.agent_id), s.name, \
                    coalesce(a.issue, i.issue_type, 'unknown'), coalesce(a.summary, i.summary), a.opened_at, \
                    a.acknowledged_by, a.resolved_at, s.liveness, s.score, s.tier, s.last_seen, i.resolution, \
                    s.evaluated_at, s.liveness_since \
             FROM warden.alerts a \
             LEFT JOIN warden.incidents i ON i.id = a.incident_id \
             LEFT JOIN warden.agent_status s ON a.source = 'incident' AND s.agent_id = coalesce(a.subject, i.agent_id) \
             WHERE a.id = ANY($1)",
            &[&ids],
        )
        .await?;
    let mut views: HashMap<i64, AlertView> = HashMap::new();
    let mut incidents = Vec::new();
    let mut agents = Vec::new();
    for r in &alert_rows {
        let view = AlertView {
            id: r.get(0),
            incident_id: r.get(1),
            severity: r.get(2),
            state: r.get(3),
            subject: r.get(4),
            agent_name: r.get(5),
            issue: r.get(6),
            summary: r.get(7),
            opened_at: r.get(8),
            acknowledged_by: r.get(9),
            resolved_at: r.get(10),
            resolution: r.get(15),
            liveness: r.get(11),
            score: r.get(12),
            tier: r.get(13),
            last_seen: r.get(14),
            scored_at: r.get(16),
            liveness_since: r.get(17),
            transitions: Vec::new(),
            recovery: Vec::new(),
            gave_up: None,
        };
        if let Some(i) = view.incident_id {
            incidents.push(i);
            if let Some(a) = &view.subject {
                agents.push(a.clone());
            }
        }
        views.insert(view.id, view);
    }
    if !incidents.is_empty() {
        let attempts = client
            .query(
                "SELECT incident_id, strategy, action, attempt, state, outcome FROM warden.recovery_actions \
                 WHERE incident_id = ANY($1) ORDER BY incident_id, id",
                &[&incidents],
            )
            .await?;
        let mut by_incident: HashMap<i64, Vec<Attempt>> = HashMap::new();
        for r in &attempts {
            by_incident.entry(r.get(0)).or_default().push(Attempt {
                strategy: r.get(1),
                action: r.get(2),
                attempt: r.get(3),
                state: r.get(4),
                outcome: r.get(5),
            });
        }
        let transitions = client
            .query(
                "SELECT agent_id, occurred_at, details->>'old', details->>'new', details->>'reason' FROM ( \
                   SELECT agent_id, occurred_at, details, \
                          row_number() OVER (PARTITION BY agent_id ORDER BY occurred_at DESC, id DESC) AS n \
                   FROM warden.system_events \
                   WHERE event_type = 'status_changed' AND source = 'warden' AND agent_id = ANY($1) \
                     AND occurred_at > now() - interval '7 days') e \
                 WHERE n <= 5 ORDER BY agent_id, occurred_at",
                &[&agents],
            )
            .await?;
        let mut by_agent: HashMap<String, Vec<Transition>> = HashMap::new();
        for r in &transitions {
            by_agent.entry(r.get(0)).or_default().push(Transition {
                at: r.get(1),
                from: r.get::<_, Option<String>>(2).unwrap_or_default(),
                to: r.get::<_, Option<String>>(3).unwrap_or_default(),
                reason: r.get(4),
            });
        }
        // Through the per-agent index: recovery_failed events name the
        // incident in their details.
        let texts: Vec<String> = incidents.iter().map(i64::to_string).collect();
        let gave_up: HashMap<i64, String> = client
            .query(
                concat!(
                    "SELECT DISTINCT ON (e.details->>'incident_id') (e.details->>'incident_id')::bigint, e.message \
                     FROM warden.system_events e \
                     WHERE e.agent_id = ANY($1) AND e.details->>'incident_id' = ANY($2) AND ",
                    gave_up_event!(),
                    " ORDER BY e.details->>'incident_id', e.occurred_at DESC, e.id DESC"
                ),
                &[&agents, &texts],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for view in views.values_mut() {
            if let Some(i) = view.incident_id {
                view.recovery = by_incident.get(&i).cloned().unwrap_or_default();
                view.gave_up = gave_up.get(&i).cloned();
                if let Some(a) = &view.subject {
                    view.transitions = by_agent.get(a).cloned().unwrap_or_default();
                }
            }
        }
    }
    Ok(rows
        .iter()
        .map(|row| {
            let alerts = row.alert_ids.iter().filter_map(|id| views.get(id).cloned()).collect();
            let message = Message {
                delivery_id: row.id,
                idempotency_key: row.idempotency_key.clone(),
                channel: row.channel.clone(),
                kind: row.kind,
                level: row.level,
                route: row.route.clone(),
                detail: row.detail.clone(),
                alerts,
                link_base: link_base.to_string(),
                created_at: row.created_at,
            };
            (row.id, message)
        })
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn view(id: i64, agent: &str) -> AlertView {
        AlertView {
            id,
            incident_id: Some(id * 10),
            severity: "critical".into(),
            state: "firing".into(),
            subject: Some(agent.into()),
            agent_name: None,
            issue: "agent_unresponsive".into(),
            summary: Some(format!("{agent} is offline: no heartbeat for 32s (expected every 10s)")),
            opened_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            acknowledged_by: None,
            resolved_at: None,
            resolution: None,
            liveness: Some("offline".into()),
            score: Some(41.6),
            tier: Some("poor".into()),
            last_seen: DateTime::from_timestamp(1_699_999_968, 0),
            scored_at: DateTime::from_timestamp(1_700_000_030, 0),
            liveness_since: DateTime::from_timestamp(1_700_000_000, 0),
            transitions: vec![Transition {
                at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
                from: "degraded".into(),
                to: "offline".into(),
                reason: Some("silent".into()),
            }],
            recovery: vec![Attempt {
                strategy: "restart_worker".into(),
                action: "command".into(),
                attempt: 1,
                state: "failed".into(),
                outcome: Some("exit status 1".into()),
            }],
            gave_up: None,
        }
    }

    pub fn message(alerts: Vec<AlertView>) -> Message {
        Message {
            delivery_id: 7,
            idempotency_key: "k-7".into(),
            channel: "ops".into(),
            kind: Kind::Firing,
            level: 1,
            route: Some("default".into()),
            detail: json!({}),
            alerts,
            link_base: "https://warden.example.com".into(),
            created_at: DateTime::from_timestamp(1_700_000_060, 0).unwrap(),
        }
    }

    #[test]
    fn a_single_alert_message_says_who_what_since_score_transitions_recovery_and_how_to_ack() {
        let m = message(vec![view(12, "w1")]);
        let text = m.text();
        assert!(text.starts_with("[FIRING CRITICAL] w1 is offline"), "{text}");
        for needle in [
            "Alert #12 · w1 · agent_unresponsive · critical",
            "Since: 2023-11-14 22:13:20 UTC",
            "score 42 (poor)",
            "degraded→offline (silent)",
            "restart_worker/command attempt 1 failed: exit status 1",
            "warden alerts ack 12",
            "POST https://warden.example.com/v1/alerts/12/ack",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn later_messages_say_how_long_the_alert_has_gone_on() {
        let mut m = message(vec![view(12, "w1")]);
        assert_eq!(m.headline(), "[FIRING CRITICAL] w1 is offline: no heartbeat for 32s (expected every 10s)");
        m.kind = Kind::Escalation;
        m.level = 2;
        m.created_at = DateTime::from_timestamp(1_700_000_000 + 15 * 60, 0).unwrap();
        assert_eq!(
            m.headline(),
            "[ESCALATED L2 CRITICAL] w1 is offline: no heartbeat for 32s (expected every 10s) (unacknowledged for 15m)"
        );
        m.kind = Kind::Repeat;
        m.created_at = DateTime::from_timestamp(1_700_000_000 + 2 * 3600 + 60, 0).unwrap();
        assert!(m.headline().ends_with("(firing for 2h 1m)"), "{}", m.headline());
        m.alerts[0].state = "resolved".into();
        m.kind = Kind::Resolved;
        assert_eq!(m.headline(), "[RESOLVED] w1 is offline: no heartbeat for 32s (expected every 10s)");
    }

    #[test]
    fn a_score_from_before_the_agent_went_offline_says_so() {
        let mut alert = view(12, "w1");
        alert.score = Some(96.4);
        alert.tier = Some("excellent".into());
        alert.scored_at = DateTime::from_timestamp(1_699_999_990, 0);
        let text = message(vec![alert.clone()]).text();
        assert!(
            text.contains("Now: offline, score 96 (excellent) as of 22:13:10 UTC, before it became offline"),
            "{text}"
        );
        alert.scored_at = DateTime::from_timestamp(1_700_000_030, 0);
        let text = message(vec![alert]).text();
        assert!(text.contains("Now: offline, score 96 (excellent), last seen"), "scored since: as it is\n{text}");
    }

    #[test]
    fn a_resolution_that_is_no_recovery_is_said() {
        let mut alert = view(7, "w7");
        alert.state = "resolved".into();
        alert.resolved_at = DateTime::from_timestamp(1_700_000_600, 0);
        alert.resolution = Some("agent removed".into());
        let mut m = message(vec![alert]);
        m.kind = Kind::Resolved;
        let text = m.text();
        assert!(text.contains("Resolved: 2023-11-14 22:23:20 UTC (agent removed)"), "{text}");
    }

    #[test]
    fn a_fleet_sized_group_names_twenty_alerts_to_acknowledge_and_counts_the_rest() {
        let alerts: Vec<AlertView> = (1..=1920).map(|i| view(i, &format!("w{i}"))).collect();
        let hint = message(alerts).ack_hint().unwrap();
        let ids: Vec<String> = (1..=20).map(|i| i.to_string()).collect();
        assert!(hint.contains(&format!("`warden alerts ack {}`", ids.join(" "))), "{hint}");
        assert!(hint.contains("and 1900 more"), "{hint}");
        assert!(hint.contains("/v1/alerts/ID/ack for each"), "one URL acknowledges one alert: {hint}");
        assert!(hint.len() < 300, "{hint}");
    }

    #[test]
    fn a_grouped_message_counts_and_lists_and_resolved_ones_ask_nothing() {
        let alerts: Vec<AlertView> = (1..=14).map(|i| view(i, &format!("w{i}"))).collect();
        let mut m = message(alerts);
        assert_eq!(m.headline(), "[FIRING CRITICAL] 14 agents offline: w1, w2, w3, w4, w5 and 9 more");
        assert!(m.text().contains("… and 4 more alerts"));
        m.kind = Kind::Resolved;
        assert!(m.ack_hint().is_none());
        assert!(m.headline().starts_with("[RESOLVED] 14 agents offline"));
    }

    #[test]
    fn direction_overrides_and_line_separators_do_not_reach_a_text_channel() {
        let mut v = view(3, "w3");
        v.agent_name = Some("evil\u{202E}enilno si\u{2028}x".into());
        let m = message(vec![v]);
        let lines = m.detail_lines(&m.alerts[0]);
        assert_eq!(lines[0], "Alert #3 · w3 (evil\u{FFFD}enilno si\u{FFFD}x) · agent_unresponsive · critical");
        assert!(!m.text().contains('\u{202E}') && !m.text().contains('\u{2028}'));
        assert_eq!(shown("plain · text ✓".into()), "plain · text ✓");
        let kept = "\u{200F}שרת\u{200E} 👩\u{200D}💻".to_string();
        assert_eq!(shown(kept.clone()), kept, "direction marks and emoji joiners stay");
    }

    #[test]
    fn auto_recovered_reads_as_information() {
        let mut m = message(vec![view(3, "w3")]);
        m.kind = Kind::Resolved;
        m.detail = json!({"auto_recovered_attempt": 2});
        assert_eq!(m.severity(), "info");
        assert_eq!(m.headline(), "[AUTO-RECOVERED] w3 agent_unresponsive: auto-recovered on attempt 2");
    }
}
