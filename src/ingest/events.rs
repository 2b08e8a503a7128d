//! Agent-reported events (errors, warnings, notes) into `system_events`.
//! They are low-volume, so they are written directly, not group-committed.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio_postgres::types::Json;

use super::heartbeat::{FieldError, Limits, ParseError, parse_json};
use crate::db::{Client, DbError};
use crate::model::{AgentId, Severity};

pub const EVENT_TYPE_MAX: usize = 64;
pub const MESSAGE_MAX: usize = 4096;
pub const DETAILS_MAX_BYTES: usize = 16 * 1024;

#[derive(Debug, Default, Deserialize)]
pub struct WireEvent {
    pub agent_id: Option<String>,
    pub event_type: Option<String>,
    pub severity: Option<Severity>,
    pub message: Option<String>,
    pub details: Option<serde_json::Map<String, serde_json::Value>>,
    pub occurred_at: Option<String>,
    /// Present only on a batch envelope: `{"events": [...]}`.
    pub events: Option<Vec<WireEvent>>,
}

/// A validated agent event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub agent_id: AgentId,
    pub event_type: String,
    pub severity: Severity,
    pub message: String,
    pub details: serde_json::Map<String, serde_json::Value>,
    pub occurred_at: Option<DateTime<Utc>>,
}

/// Parses a POST /v1/events body: one event or `{"events": [...]}`.
pub fn parse_body(body: &[u8], limits: &Limits, now: DateTime<Utc>) -> Result<(Vec<Event>, bool), ParseError> {
    let wire = parse_json::<WireEvent>(body)?;
    let invalid = |field: &str, message: String| ParseError::Invalid(FieldError { field: field.into(), message });
    match wire.events {
        Some(list) => {
            if wire.agent_id.is_some() {
                return Err(invalid("events", "send either one event or {\"events\": [...]}, not both".into()));
            }
            if list.is_empty() || list.len() > limits.max_batch {
                return Err(invalid("events", format!("must hold 1 to {} events", limits.max_batch)));
            }
            let events = list
                .into_iter()
                .enumerate()
                .map(|(i, w)| {
                    validate(w, limits, now).map_err(|mut e| {
                        e.field = format!("events[{i}].{}", e.field);
                        e
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(ParseError::Invalid)?;
            Ok((events, true))
        }
        None => validate(wire, limits, now).map(|e| (vec![e], false)).map_err(ParseError::Invalid),
    }
}

pub fn validate(w: WireEvent, limits: &Limits, now: DateTime<Utc>) -> Result<Event, FieldError> {
    let err = |field: &str, message: String| FieldError { field: field.into(), message };
    if w.events.is_some() {
        return Err(err("events", "batches cannot be nested".into()));
    }
    let agent_id = AgentId::parse(w.agent_id.ok_or_else(|| err("agent_id", "is required".into()))?)
        .map_err(|m| err("agent_id", m))?;
    let event_type = w.event_type.ok_or_else(|| err("event_type", "is required".into()))?;
    let well_formed = event_type.len() <= EVENT_TYPE_MAX
        && event_type.starts_with(|c: char| c.is_ascii_lowercase())
        && event_type.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
    if !well_formed {
        return Err(err(
            "event_type",
            format!("must be 1-{EVENT_TYPE_MAX} characters of a-z 0-9 _ . starting with a letter (like task_failed)"),
        ));
    }
    let message = w.message.ok_or_else(|| err("message", "is required".into()))?;
    if message.trim().is_empty() || message.chars().count() > MESSAGE_MAX {
        return Err(err("message", format!("must be 1-{MESSAGE_MAX} characters")));
    }
    // PostgreSQL text and jsonb cannot hold U+0000; refuse it here rather
    // than fail the insert.
    if message.contains('\0') {
        return Err(err("message", "must not contain U+0000".into()));
    }
    let details = w.details.unwrap_or_default();
    if details.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)) {
        return Err(err("details", "must not contain U+0000 in any key or string".into()));
    }
    if serde_json::to_vec(&details).map(|v| v.len()).unwrap_or(usize::MAX) > DETAILS_MAX_BYTES {
        return Err(err("details", format!("must be at most {DETAILS_MAX_BYTES} bytes of JSON")));
    }
    let occurred_at = match w.occurred_at {
        None => None,
        Some(text) => {
            let at = DateTime::parse_from_rfc3339(&text)
                .map_err(|e| err("occurred_at", format!("must be an RFC 3339 timestamp ({e})")))?
                .with_timezone(&Utc);
            if at > now + limits.max_clock_skew {
                return Err(err("occurred_at", "is in the future beyond the allowed clock skew".into()));
            }
            Some(at)
        }
    };
    Ok(Event { agent_id, event_type, severity: w.severity.unwrap_or(Severity::Info), message, details, occurred_at })
}

/// Whether a JSON value holds U+0000 in a key or string. Depth is bounded
/// by serde_json's recursion limit (128) on the way in.
fn holds_nul(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

/// Inserts the events in one transaction and returns their ids, or the
/// first event whose agent warden has never seen (nothing is written then).
pub async fn insert(
    client: &mut Client,
    events: &[Event],
    batch: bool,
) -> Result<Result<Vec<i64>, FieldError>, DbError> {
    let agent_ids: Vec<&str> = events.iter().map(|e| e.agent_id.as_str()).collect();
    let tx = client.transaction().await?;
    let known: Vec<String> = tx
        .query("SELECT agent_id FROM warden.agent_status WHERE agent_id = ANY ($1)", &[&agent_ids])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if let Some(i) = agent_ids.iter().position(|id| !known.iter().any(|k| k == id)) {
        let field = if batch { format!("events[{i}].agent_id") } else { "agent_id".into() };
        return Ok(Err(FieldError {
            field,
            message: format!("unknown agent {:?}: an agent registers with its first heartbeat", agent_ids[i]),
        }));
    }
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let severities: Vec<&str> = events.iter().map(|e| e.severity.as_str()).collect();
    let messages: Vec<&str> = events.iter().map(|e| e.message.as_str()).collect();
    let details: Vec<Json<&serde_json::Map<String, serde_json::Value>>> =
        events.iter().map(|e| Json(&e.details)).collect();
    let occurred: Vec<Option<DateTime<Utc>>> = events.iter().map(|e| e.occurred_at).collect();
    let rows = tx
        .query(
            "INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details, source) \
             SELECT coalesce(o, now()), a, t, s, m, d, 'agent' \
             FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[]) \
                  WITH ORDINALITY AS u(o, a, t, s, m, d, n) \
             ORDER BY n \
             RETURNING id",
            &[&occurred, &agent_ids, &types, &severities, &messages, &details],
        )
        .await?;
    tx.commit().await?;
    Ok(Ok(rows.iter().map(|r| r.get(0)).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { max_batch: 2, max_metrics: 2, max_labels: 2, max_clock_skew: chrono::Duration::minutes(5) }
    }

    fn field_of(body: &str) -> String {
        match parse_body(body.as_bytes(), &limits(), Utc::now()) {
            Err(ParseError::Invalid(e)) => e.field,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn a_complete_event_parses() {
        let (events, batch) = parse_body(
            br#"{"agent_id":"a","event_type":"task_failed","severity":"warning","message":"boom","details":{"task":7}}"#,
            &limits(),
            Utc::now(),
        )
        .unwrap();
        assert!(!batch);
        assert_eq!(events[0].severity, Severity::Warning);
        assert_eq!(events[0].details["task"], 7);
    }

    #[test]
    fn bad_events_name_the_field() {
        assert_eq!(field_of(r#"{"event_type":"x","message":"m"}"#), "agent_id");
        assert_eq!(field_of(r#"{"agent_id":"a","message":"m"}"#), "event_type");
        assert_eq!(field_of(r#"{"agent_id":"a","event_type":"Bad Type","message":"m"}"#), "event_type");
        assert_eq!(field_of(r#"{"agent_id":"a","event_type":"x"}"#), "message");
        assert_eq!(field_of(r#"{"agent_id":"a","event_type":"x","message":"m","severity":"dire"}"#), "severity");
        assert_eq!(field_of(r#"{"agent_id":"a","event_type":"x","message":"m","details":[1]}"#), "details");
        assert_eq!(
            field_of(r#"{"events":[{"agent_id":"a","event_type":"x","message":"m"},{"agent_id":"a"}]}"#),
            "events[1].event_type"
        );
        assert_eq!(field_of(r#"{"events":[]}"#), "events");
        assert_eq!(field_of(r#"{"agent_id":"a","event_type":"x","message":"a\u0000b"}"#), "message");
        assert_eq!(
            field_of(r#"{"agent_id":"a","event_type":"x","message":"m","details":{"k":["\u0000"]}}"#),
            "details"
        );
        assert_eq!(field_of(r#"{"agent_id":"a","event_type":"x","message":"m","details":{"\u0000":1}}"#), "details");
    }
}
