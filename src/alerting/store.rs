//! Reading and acknowledging alerts, for the API and the command line.

use serde_json::Value;

use crate::db::DbError;
use crate::model::Severity;

use super::escalation::AlertState;

/// Every field of an alert view, as one JSON object (`a` alerts, `i` incidents).
const ALERT_JSON: &str = "jsonb_build_object(\
    'id', a.id, 'incident_id', a.incident_id, 'dedup_key', a.dedup_key, 'severity', a.severity, \
    'state', a.state, 'escalation_level', a.escalation_level, 'opened_at', a.opened_at, \
    'acknowledged_at', a.acknowledged_at, 'acknowledged_by', a.acknowledged_by, 'ack_comment', a.ack_comment, \
    'resolved_at', a.resolved_at, 'source', a.source, \
    'agent_id', CASE WHEN a.source = 'incident' THEN coalesce(a.subject, i.agent_id) END, \
    'channel', CASE WHEN a.source = 'channel' THEN a.subject END, \
    'issue_type', coalesce(a.issue, i.issue_type), 'summary', coalesce(a.summary, i.summary), \
    'route', a.route, 'policy', a.policy, 'paged_at', a.paged_at, 'repeats', a.repeats, \
    'suppressed_reason', a.suppressed_reason, 'held_until', a.held_until, \
    'next_escalation_at', a.next_escalation_at, 'recovery_failed_at', a.recovery_failed_at)";

/// Filters of an alert listing; newest first, keyset-paginated by id.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub state: Option<AlertState>,
    pub severity: Option<Severity>,
    /// Only alerts with ids below this (the previous page's last id).
    pub before: Option<i64>,
    pub limit: i64,
}

/// Alerts matching `f`, as JSON objects, newest first.
pub async fn list(client: &tokio_postgres::Client, f: &ListFilter) -> Result<Vec<(i64, Value)>, DbError> {
    let sql = format!(
        "SELECT a.id, {ALERT_JSON} FROM warden.alerts a LEFT JOIN warden.incidents i ON i.id = a.incident_id \
         WHERE ($1::text IS NULL OR a.state = $1) AND ($2::text IS NULL OR a.severity = $2) \
           AND ($3::bigint IS NULL OR a.id < $3) \
         ORDER BY a.id DESC LIMIT $4"
    );
    let rows = client
        .query(&sql, &[&f.state.map(AlertState::as_str), &f.severity.map(Severity::as_str), &f.before, &f.limit])
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// One alert with its deliveries (`deliveries`: every message that
/// covered it, oldest first), or `None`.
pub async fn get(client: &tokio_postgres::Client, id: i64) -> Result<Option<Value>, DbError> {
    let sql = format!(
        "SELECT {ALERT_JSON} FROM warden.alerts a LEFT JOIN warden.incidents i ON i.id = a.incident_id WHERE a.id = $1"
    );
    let Some(row) = client.query_opt(&sql, &[&id]).await? else { return Ok(None) };
    let mut alert: Value = row.get(0);
    let deliveries: Vec<Value> = client
        .query(
            "SELECT jsonb_build_object('id', d.id, 'channel', d.channel, 'kind', d.kind, 'level', d.level, \
                    'sequence', d.sequence, 'state', d.state, 'attempts', d.attempts, 'created_at', d.created_at, \
                    'next_attempt_at', d.next_attempt_at, 'sent_at', d.sent_at, 'last_error', d.last_error, \
                    'last_status_code', d.last_status_code, 'last_latency_ms', d.last_latency_ms, \
                    'alert_count', greatest(cardinality(d.alert_ids), 1), 'idempotency_key', d.idempotency_key, \
                    'detail', d.detail) \
             FROM warden.alert_deliveries d \
             WHERE d.alert_ids @> ARRAY[$1::bigint] OR d.alert_id = $1 ORDER BY d.id",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if let Some(object) = alert.as_object_mut() {
        object.insert("deliveries".into(), Value::Array(deliveries));
    }
    Ok(Some(alert))
}

/// Why an acknowledgement was refused.
#[derive(Debug, thiserror::Error)]
pub enum AckError {
    #[error("no alert {0}")]
    NotFound(i64),
    #[error("alert {0} is already resolved")]
    Resolved(i64),
    #[error("{message}")]
    Invalid { field: &'static str, message: String },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// What an acknowledgement may say, whoever records it (API, console,
/// command line): PostgreSQL cannot store U+0000, and the name is shown on
/// one line in alerts and the console.
fn check_ack_text(by: &str, comment: Option<&str>) -> Result<(), AckError> {
    if !crate::model::is_actor_name(by) {
        let message = "by must be 1-128 characters, without control characters".into();
        return Err(AckError::Invalid { field: "by", message });
    }
    if comment.is_some_and(|c| c.contains('\0') || c.chars().count() > 1024) {
        let message = "comment must be at most 1024 characters, without U+0000".into();
        return Err(AckError::Invalid { field: "comment", message });
    }
    Ok(())
}

impl From<tokio_postgres::Error> for AckError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e.into())
    }
}

/// Acknowledges a firing alert: escalation and repeats stop, and pending
/// escalations or repeats that were only about it are cancelled.
/// Acknowledging an acknowledged alert changes nothing and succeeds.
/// Returns the alert as [`get`] shows it.
pub async fn acknowledge(
    client: &tokio_postgres::Client,
    id: i64,
    by: &str,
    comment: Option<&str>,
) -> Result<Value, AckError> {
    check_ack_text(by, comment)?;
    let acked: i64 = client
        .query_one(
            "WITH u AS ( \
               UPDATE warden.alerts SET state = 'acknowledged', acknowledged_at = now(), acknowledged_by = $2, \
                      ack_comment = $3 \
               WHERE id = $1 AND state = 'firing' \
               RETURNING id, source, subject, issue), \
             c AS ( \
               UPDATE warden.alert_deliveries d SET state = 'cancelled', claimed_by = NULL, claimed_until = NULL, \
                      last_error = 'acknowledged before it was sent' \
               WHERE d.state = 'pending' AND d.kind IN ('escalation', 'repeat') AND d.alert_ids && ARRAY[$1::bigint] \
                 AND d.claimed_by IS NULL \
                 AND EXISTS (SELECT 1 FROM u) \
                 AND NOT EXISTS (SELECT 1 FROM warden.alerts x \
                                 WHERE x.id = ANY (d.alert_ids) AND x.id <> $1 AND x.state = 'firing')), \
             e AS ( \
               INSERT INTO warden.system_events (agent_id, event_type, severity, message, details) \
               SELECT CASE WHEN u.source = 'incident' THEN u.subject END, 'alert_acknowledged', 'info', \
                      format('alert %s (%s) acknowledged by %s', u.id, coalesce(u.issue, 'alert'), $2::text), \
                      jsonb_build_object('alert_id', u.id, 'by', $2::text, 'comment', $3::text) \
               FROM u) \
             SELECT count(*) FROM u",
            &[&id, &by, &comment],
        )
        .await?
        .get(0);
    if acked == 0 {
        let state: Option<String> =
            client.query_opt("SELECT state FROM warden.alerts WHERE id = $1", &[&id]).await?.map(|r| r.get(0));
        match state.as_deref() {
            None => return Err(AckError::NotFound(id)),
            Some("resolved") => return Err(AckError::Resolved(id)),
            Some(_) => {}
        }
    }
    get(client, id).await?.ok_or(AckError::NotFound(id))
}
