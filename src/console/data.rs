//! What the console's pages read, as typed rows. Every statement is
//! parameterised; sort orders come from a fixed list, never from the
//! request. Where the read API already answers the question (fleet totals,
//! one agent in detail) its functions are reused.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::db::DbError;
use crate::model::{Liveness, Tier};

/// Rows per page of the agent table.
pub const PAGE_SIZE: i64 = 200;

/// One row of the agent table.
#[derive(Debug, Clone)]
pub struct AgentRow {
    pub agent_id: String,
    pub name: Option<String>,
    pub labels: Vec<(String, String)>,
    pub mode: Option<String>,
    pub liveness: String,
    pub liveness_since: DateTime<Utc>,
    pub score: Option<f64>,
    pub tier: Option<String>,
    pub last_seen: DateTime<Utc>,
    pub expected_interval_ms: i32,
}

/// Labels of a jsonb object as sorted pairs (non-string values as JSON).
pub fn labels_of(value: &Value) -> Vec<(String, String)> {
    let mut labels: Vec<(String, String)> = value
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    labels.sort();
    labels
}

text_enum! {
    /// Columns the agent table sorts by.
    pub enum SortKey {
        Liveness = "liveness",
        Score = "score",
        Agent = "agent",
        LastSeen = "last_seen",
        Tier = "tier",
        Mode = "mode",
    }
}

// The ORDER BY expressions longer than a column's name, each shared by
// its two directions (macros, so that the clauses stay static text).
macro_rules! liveness_rank {
    () => {
        "CASE liveness WHEN 'offline' THEN 0 WHEN 'degraded' THEN 1 WHEN 'unknown' THEN 2 ELSE 3 END"
    };
}
macro_rules! tier_rank {
    () => {
        "CASE tier WHEN 'critical' THEN 0 WHEN 'poor' THEN 1 WHEN 'fair' THEN 2 WHEN 'good' THEN 3 \
         WHEN 'excellent' THEN 4 ELSE 5 END"
    };
}
// By what the column shows (the name, else the id), numbers at the end in
// numeric order: worker 2 before worker 10.
macro_rules! shown_name_stem {
    () => {
        "coalesce(substring(lower(coalesce(name, agent_id)) from '^(.*?)[0-9]+$'), lower(coalesce(name, agent_id)))"
    };
}
macro_rules! shown_name_number {
    () => {
        "substring(coalesce(name, agent_id) from '([0-9]+)$')::numeric"
    };
}

impl SortKey {
    /// The ORDER BY of this key, ascending or descending. Static text only.
    fn order_by(self, descending: bool) -> &'static str {
        use SortKey::*;
        match (self, descending) {
            // Worst first by default: offline, degraded, unknown, online.
            (Liveness, false) => concat!(liveness_rank!(), ", score ASC NULLS FIRST, agent_id"),
            (Liveness, true) => concat!(liveness_rank!(), " DESC, score DESC NULLS LAST, agent_id"),
            (Score, false) => "score ASC NULLS FIRST, agent_id",
            (Score, true) => "score DESC NULLS LAST, agent_id",
            (Agent, false) => concat!(shown_name_stem!(), ", ", shown_name_number!(), " NULLS FIRST, agent_id"),
            (Agent, true) => {
                concat!(shown_name_stem!(), " DESC, ", shown_name_number!(), " DESC NULLS LAST, agent_id DESC")
            }
            (LastSeen, false) => "last_seen ASC, agent_id",
            (LastSeen, true) => "last_seen DESC, agent_id",
            (Tier, false) => concat!(tier_rank!(), ", score ASC NULLS FIRST, agent_id"),
            (Tier, true) => concat!(tier_rank!(), " DESC, score DESC NULLS LAST, agent_id"),
            (Mode, false) => "mode ASC NULLS LAST, agent_id",
            (Mode, true) => "mode DESC NULLS LAST, agent_id",
        }
    }
}

/// The tier filter: one tier, or the agents not scored yet (the tier bar
/// counts those too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierFilter {
    Is(Tier),
    Unscored,
}

impl TierFilter {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Is(t) => t.as_str(),
            Self::Unscored => "unscored",
        }
    }
}

impl std::str::FromStr for TierFilter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "unscored" => Ok(Self::Unscored),
            _ => s.parse().map(Self::Is).map_err(|_| format!("one of {}, or unscored", Tier::allowed())),
        }
    }
}

/// The agent table's filters, sort and page, as the query string gave them.
#[derive(Debug, Clone)]
pub struct FleetFilter {
    pub liveness: Option<Liveness>,
    pub tier: Option<TierFilter>,
    /// Text searched in ids, names and labels.
    pub q: String,
    pub sort: SortKey,
    pub descending: bool,
    /// 1-based.
    pub page: i64,
    /// The parameters whose values were not understood, each with what it
    /// takes: the page says it left them out rather than filter silently
    /// by less than was asked.
    pub ignored: Vec<Ignored>,
}

/// A query parameter the agent table left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    pub name: &'static str,
    /// As given, cut to a length a notice can show.
    pub value: String,
    pub expected: String,
}

impl FleetFilter {
    /// Reads the query string leniently: a value it does not know is left
    /// out and listed in `ignored` (a page is not an API; a stale bookmark
    /// should still open).
    pub fn from_query(query: &HashMap<String, String>) -> Self {
        let get = |k: &str| query.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let mut ignored = Vec::new();
        // The parameter's value if `parse` understands it; else noted in
        // `ignored` with what the parameter takes.
        fn take<T>(
            ignored: &mut Vec<Ignored>,
            name: &'static str,
            given: Option<&str>,
            parse: impl FnOnce(&str) -> Option<T>,
            expected: impl FnOnce() -> String,
        ) -> Option<T> {
            let given = given?;
            let value = parse(given);
            if value.is_none() {
                ignored.push(Ignored { name, value: given.chars().take(40).collect(), expected: expected() });
            }
            value
        }
        let liveness = take(
            &mut ignored,
            "liveness",
            get("liveness"),
            |v| v.parse().ok(),
            || format!("one of {}", Liveness::allowed()),
        );
        let tier = take(
            &mut ignored,
            "tier",
            get("tier"),
            |v| v.parse().ok(),
            || format!("one of {} or unscored", Tier::allowed().replace(" or ", ", ")),
        );
        let sort =
            take(&mut ignored, "sort", get("sort"), |v| v.parse().ok(), || format!("one of {}", SortKey::allowed()));
        let descending = take(
            &mut ignored,
            "dir",
            get("dir"),
            |v| match v {
                "asc" => Some(false),
                "desc" => Some(true),
                _ => None,
            },
            || "asc or desc".into(),
        );
        let page = take(
            &mut ignored,
            "page",
            get("page"),
            |v| v.parse().ok().filter(|p| (1..=100_000).contains(p)),
            || "a page number from 1 to 100000".into(),
        );
        Self {
            liveness,
            tier,
            // Nothing searchable holds U+0000, and PostgreSQL refuses it in text.
            q: get("q").map(|q| q.trim().chars().filter(|c| *c != '\0').take(200).collect()).unwrap_or_default(),
            sort: sort.unwrap_or(SortKey::Liveness),
            descending: descending.unwrap_or(false),
            page: page.unwrap_or(1),
            ignored,
        }
    }
}

/// A page of the agent table and how many agents match in all.
pub async fn agents(client: &tokio_postgres::Client, f: &FleetFilter) -> Result<(Vec<AgentRow>, i64), DbError> {
    let pattern = (!f.q.is_empty()).then(|| super::format::like_pattern(&f.q));
    // Labels as the table shows them (`role=api`), as the quick filter
    // matches them, not as JSON text (`"role": "api"`).
    let filter = "($1::text IS NULL OR liveness = $1) \
                  AND ($2::text IS NULL OR tier = $2 OR ($2 = 'unscored' AND tier IS NULL)) \
                  AND ($3::text IS NULL OR agent_id ILIKE $3 OR name ILIKE $3 \
                       OR EXISTS (SELECT 1 FROM jsonb_each_text(labels) l WHERE l.key || '=' || l.value ILIKE $3))";
    let liveness = f.liveness.map(Liveness::as_str);
    let tier = f.tier.map(TierFilter::as_str);
    let total: i64 = client
        .query_one(&format!("SELECT count(*) FROM warden.agent_status WHERE {filter}"), &[&liveness, &tier, &pattern])
        .await?
        .get(0);
    let sql = format!(
        "SELECT agent_id, name, labels, mode, liveness, liveness_since, score, tier, last_seen, expected_interval_ms \
         FROM warden.agent_status WHERE {filter} ORDER BY {} LIMIT $4 OFFSET $5",
        f.sort.order_by(f.descending)
    );
    let offset = (f.page - 1) * PAGE_SIZE;
    let rows = client.query(&sql, &[&liveness, &tier, &pattern, &PAGE_SIZE, &offset]).await?;
    let agents = rows
        .iter()
        .map(|r| AgentRow {
            agent_id: r.get(0),
            name: r.get(1),
            labels: labels_of(&r.get::<_, Value>(2)),
            mode: r.get(3),
            liveness: r.get(4),
            liveness_since: r.get(5),
            score: r.get(6),
            tier: r.get(7),
            last_seen: r.get(8),
            expected_interval_ms: r.get(9),
        })
        .collect();
    Ok((agents, total))
}

/// One incident.
#[derive(Debug, Clone)]
pub struct IncidentRow {
    pub id: i64,
    pub agent_id: Option<String>,
    pub issue_type: String,
    pub severity: String,
    pub state: String,
    pub opened_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub predicted: bool,
    pub summary: Option<String>,
    pub resolution: Option<String>,
}

const INCIDENT_COLUMNS: &str =
    "id, agent_id, issue_type, severity, state, opened_at, resolved_at, predicted, summary, resolution";

fn incident_from(r: &tokio_postgres::Row) -> IncidentRow {
    IncidentRow {
        id: r.get(0),
        agent_id: r.get(1),
        issue_type: r.get(2),
        severity: r.get(3),
        state: r.get(4),
        opened_at: r.get(5),
        resolved_at: r.get(6),
        predicted: r.get(7),
        summary: r.get(8),
        resolution: r.get(9),
    }
}

/// Open incidents, most severe and newest first; `agent` narrows to one.
pub async fn open_incidents(
    client: &tokio_postgres::Client,
    agent: Option<&str>,
    limit: i64,
) -> Result<Vec<IncidentRow>, DbError> {
    let sql = format!(
        "SELECT {INCIDENT_COLUMNS} FROM warden.incidents WHERE state = 'open' AND ($1::text IS NULL OR agent_id = $1) \
         ORDER BY CASE severity WHEN 'emergency' THEN 0 WHEN 'critical' THEN 1 WHEN 'warning' THEN 2 ELSE 3 END, id DESC \
         LIMIT $2"
    );
    Ok(client.query(&sql, &[&agent, &limit]).await?.iter().map(incident_from).collect())
}

/// Incidents resolved within `days`, newest first.
pub async fn resolved_incidents(
    client: &tokio_postgres::Client,
    agent: Option<&str>,
    days: i32,
    limit: i64,
) -> Result<Vec<IncidentRow>, DbError> {
    let sql = format!(
        "SELECT {INCIDENT_COLUMNS} FROM warden.incidents \
         WHERE state = 'resolved' AND resolved_at > now() - $2::int * interval '1 day' \
           AND ($1::text IS NULL OR agent_id = $1) \
         ORDER BY resolved_at DESC, id DESC LIMIT $3"
    );
    Ok(client.query(&sql, &[&agent, &days, &limit]).await?.iter().map(incident_from).collect())
}

/// How many incidents are open, and how many resolved within `days`: the
/// page lists only the first of each, and must not pass their number off
/// as the total.
pub async fn incident_totals(client: &tokio_postgres::Client, days: i32) -> Result<(i64, i64), DbError> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM warden.incidents WHERE state = 'open'), \
                    (SELECT count(*) FROM warden.incidents \
                     WHERE state = 'resolved' AND resolved_at > now() - $1::int * interval '1 day')",
            &[&days],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Recovery actions of the given incidents, oldest first, by incident.
pub async fn recoveries_for(
    client: &tokio_postgres::Client,
    incidents: &[i64],
) -> Result<BTreeMap<i64, Vec<crate::recovery::ActionRow>>, DbError> {
    let mut by_incident: BTreeMap<i64, Vec<crate::recovery::ActionRow>> = BTreeMap::new();
    if incidents.is_empty() {
        return Ok(by_incident);
    }
    let rows = client
        .query(
            &format!(
                "SELECT {} FROM warden.recovery_actions WHERE incident_id = ANY($1) ORDER BY id",
                crate::recovery::ActionRow::COLUMNS
            ),
            &[&incidents],
        )
        .await?;
    for r in rows {
        let row = crate::recovery::ActionRow::from_row(&r);
        if let Some(incident) = row.incident_id {
            by_incident.entry(incident).or_default().push(row);
        }
    }
    Ok(by_incident)
}

/// Recovery actions of one agent, newest first (the recovery module's own
/// history query).
pub async fn recoveries_of_agent(
    client: &tokio_postgres::Client,
    agent: &str,
) -> Result<Vec<crate::recovery::ActionRow>, DbError> {
    crate::recovery::history(client, Some(agent), None, None, 20).await
}

/// An alert, as the console lists it.
#[derive(Debug, Clone)]
pub struct AlertRow {
    pub id: i64,
    pub incident_id: Option<i64>,
    pub state: String,
    pub severity: String,
    pub issue_type: Option<String>,
    pub summary: Option<String>,
    pub agent_id: Option<String>,
    pub channel: Option<String>,
    pub opened_at: Option<DateTime<Utc>>,
    pub acknowledged_at: Option<DateTime<Utc>>,
    pub acknowledged_by: Option<String>,
    pub ack_comment: Option<String>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub escalation_level: i64,
    pub suppressed_reason: Option<String>,
    pub deliveries: Vec<DeliveryRow>,
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

fn time(v: &Value, key: &str) -> Option<DateTime<Utc>> {
    v.get(key).and_then(Value::as_str).and_then(|t| DateTime::parse_from_rfc3339(t).ok()).map(|t| t.with_timezone(&Utc))
}

impl AlertRow {
    /// From the JSON the alerting store answers with.
    pub fn from_json(v: &Value) -> Self {
        Self {
            id: v["id"].as_i64().unwrap_or_default(),
            incident_id: v["incident_id"].as_i64(),
            state: text(v, "state").unwrap_or_default(),
            severity: text(v, "severity").unwrap_or_default(),
            issue_type: text(v, "issue_type"),
            summary: text(v, "summary"),
            agent_id: text(v, "agent_id"),
            channel: text(v, "channel"),
            opened_at: time(v, "opened_at"),
            acknowledged_at: time(v, "acknowledged_at"),
            acknowledged_by: text(v, "acknowledged_by"),
            ack_comment: text(v, "ack_comment"),
            resolved_at: time(v, "resolved_at"),
            escalation_level: v["escalation_level"].as_i64().unwrap_or_default(),
            suppressed_reason: text(v, "suppressed_reason"),
            deliveries: Vec::new(),
        }
    }
}

/// Alerts in `state`, newest first, through the alerting store.
pub async fn alerts_in(
    client: &tokio_postgres::Client,
    state: crate::alerting::escalation::AlertState,
    limit: i64,
) -> Result<Vec<AlertRow>, DbError> {
    let filter = crate::alerting::store::ListFilter { state: Some(state), severity: None, before: None, limit };
    let rows = crate::alerting::store::list(client, &filter).await?;
    let mut alerts: Vec<AlertRow> = rows.iter().map(|(_, v)| AlertRow::from_json(v)).collect();
    attach_deliveries(client, &mut alerts).await?;
    Ok(alerts)
}

/// How many alerts are firing, and how many acknowledged (see
/// [`incident_totals`]).
pub async fn alert_totals(client: &tokio_postgres::Client) -> Result<(i64, i64), DbError> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'firing'), count(*) FILTER (WHERE state = 'acknowledged') \
             FROM warden.alerts WHERE state <> 'resolved'",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// One message of an alert to one channel.
#[derive(Debug, Clone)]
pub struct DeliveryRow {
    pub id: i64,
    pub channel: String,
    pub kind: String,
    pub state: String,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

const ALERT_SQL: &str = "SELECT a.id, a.incident_id, a.state, a.severity, coalesce(a.issue, i.issue_type), \
       coalesce(a.summary, i.summary), CASE WHEN a.source = 'incident' THEN coalesce(a.subject, i.agent_id) END, \
       CASE WHEN a.source = 'channel' THEN a.subject END, a.opened_at, a.acknowledged_at, a.acknowledged_by, \
       a.ack_comment, a.resolved_at, a.escalation_level, a.suppressed_reason \
     FROM warden.alerts a LEFT JOIN warden.incidents i ON i.id = a.incident_id";

fn alert_from(r: &tokio_postgres::Row) -> AlertRow {
    AlertRow {
        id: r.get(0),
        incident_id: r.get(1),
        state: r.get(2),
        severity: r.get(3),
        issue_type: r.get(4),
        summary: r.get(5),
        agent_id: r.get(6),
        channel: r.get(7),
        opened_at: r.get(8),
        acknowledged_at: r.get(9),
        acknowledged_by: r.get(10),
        ack_comment: r.get(11),
        resolved_at: r.get(12),
        escalation_level: i64::from(r.get::<_, i32>(13)),
        suppressed_reason: r.get(14),
        deliveries: Vec::new(),
    }
}

/// Alerts of the given incidents with their deliveries, by incident.
pub async fn alerts_for_incidents(
    client: &tokio_postgres::Client,
    incidents: &[i64],
) -> Result<BTreeMap<i64, Vec<AlertRow>>, DbError> {
    let mut by_incident: BTreeMap<i64, Vec<AlertRow>> = BTreeMap::new();
    if incidents.is_empty() {
        return Ok(by_incident);
    }
    let rows = client.query(&format!("{ALERT_SQL} WHERE a.incident_id = ANY($1) ORDER BY a.id"), &[&incidents]).await?;
    let mut alerts: Vec<AlertRow> = rows.iter().map(alert_from).collect();
    attach_deliveries(client, &mut alerts).await?;
    for alert in alerts {
        if let Some(incident) = alert.incident_id {
            by_incident.entry(incident).or_default().push(alert);
        }
    }
    Ok(by_incident)
}

/// Recent alerts about one agent, newest first, with their deliveries.
/// Found through the agent's incidents (incidents_agent_idx, then
/// alerts_incident_idx): matching the alert's subject or its incident's
/// agent in one expression walked every alert ever kept.
pub async fn alerts_of_agent(client: &tokio_postgres::Client, agent: &str) -> Result<Vec<AlertRow>, DbError> {
    let rows = client
        .query(
            &format!(
                "{ALERT_SQL} WHERE a.source = 'incident' \
                   AND a.incident_id IN (SELECT id FROM warden.incidents WHERE agent_id = $1) \
                 ORDER BY a.id DESC LIMIT 20"
            ),
            &[&agent],
        )
        .await?;
    let mut alerts: Vec<AlertRow> = rows.iter().map(alert_from).collect();
    attach_deliveries(client, &mut alerts).await?;
    Ok(alerts)
}

/// Fills in each alert's deliveries: every message that covered it.
async fn attach_deliveries(client: &tokio_postgres::Client, alerts: &mut [AlertRow]) -> Result<(), DbError> {
    if alerts.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = alerts.iter().map(|a| a.id).collect();
    let rows = client
        .query(
            "SELECT d.id, d.alert_id, d.alert_ids, d.channel, d.kind, d.state, d.attempts, d.created_at, d.sent_at, \
                    d.last_error \
             FROM warden.alert_deliveries d WHERE d.alert_id = ANY($1) OR d.alert_ids && $1 ORDER BY d.id",
            &[&ids],
        )
        .await?;
    for r in rows {
        let first: i64 = r.get(1);
        let covered: Vec<i64> = r.get(2);
        let delivery = DeliveryRow {
            id: r.get(0),
            channel: r.get(3),
            kind: r.get(4),
            state: r.get(5),
            attempts: r.get(6),
            created_at: r.get(7),
            sent_at: r.get(8),
            last_error: r.get(9),
        };
        for alert in alerts.iter_mut() {
            if alert.id == first || covered.contains(&alert.id) {
                alert.deliveries.push(delivery.clone());
            }
        }
    }
    Ok(())
}

/// Heartbeats per minute over the last hour, oldest minute first (60
/// values; the last is the minute now running).
pub async fn heartbeat_minutes(client: &tokio_postgres::Client, agent: &str) -> Result<Vec<f64>, DbError> {
    let rows = client
        .query(
            "SELECT (59 - floor(extract(epoch FROM (now() - received_at)) / 60))::int AS minute, count(*) \
             FROM warden.agent_heartbeats \
             WHERE agent_id = $1 AND received_at > now() - interval '1 hour' AND received_at <= now() \
             GROUP BY 1",
            &[&agent],
        )
        .await?;
    let mut minutes = vec![0.0; 60];
    for r in rows {
        let minute: i32 = r.get(0);
        let n: i64 = r.get(1);
        if let Some(slot) = usize::try_from(minute).ok().and_then(|m| minutes.get_mut(m)) {
            *slot += n as f64;
        }
    }
    Ok(minutes)
}
