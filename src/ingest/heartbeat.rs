//! Heartbeats as they arrive (wire form) and as warden keeps them
//! (validated form), and the parsing that turns one into the other with
//! errors that name the field.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::model::{AgentId, HeartbeatStatus, Mode};

/// Bounds on what one heartbeat may carry.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_batch: usize,
    pub max_metrics: usize,
    pub max_labels: usize,
    pub max_clock_skew: chrono::Duration,
}

pub const NAME_MAX: usize = 256;
pub const LABEL_KEY_MAX: usize = 63;
pub const LABEL_VALUE_MAX: usize = 256;
pub const METRIC_NAME_MAX: usize = 128;
pub const UNIT_MAX: usize = 32;
/// The largest magnitude of a metric value. Averages and variances square
/// the samples: PostgreSQL's avg(float8) overflows once two samples differ
/// by more than about 1.3e154, and one such sample failed every score pass
/// for the whole fleet. No real metric comes near this bound, and squares
/// and sums of any number of samples within it stay finite (migration V24
/// holds `warden.record_heartbeat` to the same bound).
pub const METRIC_VALUE_MAX: f64 = 1e100;
pub const NEXT_HEARTBEAT_MIN_MS: i64 = 100;
pub const NEXT_HEARTBEAT_MAX_MS: i64 = 7 * 24 * 3600 * 1000;

/// A heartbeat that passed validation; nothing downstream re-checks it.
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    pub agent_id: AgentId,
    pub name: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub mode: Option<Mode>,
    pub status: HeartbeatStatus,
    pub uptime_seconds: Option<i64>,
    pub next_heartbeat_ms: Option<i32>,
    pub sent_at: Option<DateTime<Utc>>,
    /// In name order, one per name.
    pub metrics: Vec<Metric>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: String,
    pub value: f64,
    pub unit: Option<String>,
}

/// A value that cannot be accepted, with the path of the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }

    fn within(mut self, prefix: &str) -> Self {
        if !prefix.is_empty() {
            self.field = format!("{prefix}.{}", self.field);
        }
        self
    }
}

/// Why a request body could not be read as heartbeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Not JSON, or not a JSON object (HTTP 400).
    Malformed(String),
    /// JSON, but a value is unacceptable (HTTP 422).
    Invalid(FieldError),
}

/// One heartbeat as sent. Every field is optional here so that a missing
/// required field gets our message rather than serde's.
#[derive(Debug, Default, Deserialize)]
pub struct WireHeartbeat {
    pub agent_id: Option<String>,
    pub name: Option<String>,
    pub mode: Option<Mode>,
    pub status: Option<HeartbeatStatus>,
    #[serde(default, deserialize_with = "whole_number")]
    pub uptime_seconds: Option<i64>,
    #[serde(default, deserialize_with = "whole_number")]
    pub next_heartbeat_ms: Option<i64>,
    pub sent_at: Option<String>,
    pub metrics: Option<BTreeMap<String, WireMetric>>,
    pub labels: Option<BTreeMap<String, String>>,
    /// Present only on a batch envelope: `{"heartbeats": [...]}`.
    pub heartbeats: Option<Vec<WireHeartbeat>>,
}

/// An integer field, which also takes a number without a fraction
/// (`30000.0`): JSON does not tell the two apart, and some encoders (those
/// with only floating-point numbers) write whole numbers that way.
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    use serde::de::{Error, Unexpected};
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Option<i64>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a whole number")
        }
        fn visit_none<E>(self) -> Result<Option<i64>, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Option<i64>, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<i64>, D::Error> {
            d.deserialize_any(self)
        }
        fn visit_i64<E>(self, v: i64) -> Result<Option<i64>, E> {
            Ok(Some(v))
        }
        fn visit_u64<E: Error>(self, v: u64) -> Result<Option<i64>, E> {
            i64::try_from(v)
                .map(Some)
                .map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &"a whole number below 2^63"))
        }
        fn visit_f64<E: Error>(self, v: f64) -> Result<Option<i64>, E> {
            // 2^63 is exactly representable; every float below it with no
            // fraction converts without loss of meaning.
            const LIMIT: f64 = 9_223_372_036_854_775_808.0;
            if v.fract() == 0.0 && (-LIMIT..LIMIT).contains(&v) {
                Ok(Some(v as i64))
            } else {
                Err(E::invalid_type(Unexpected::Float(v), &self))
            }
        }
    }
    d.deserialize_option(Visitor)
}

/// A metric value: a bare number or `{"value": n, "unit": "ms"}`.
#[derive(Debug, Clone, PartialEq)]
pub struct WireMetric {
    pub value: f64,
    pub unit: Option<String>,
}

impl<'de> Deserialize<'de> for WireMetric {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Unknown fields are ignored here too, as everywhere in a
        // heartbeat: an agent may send what a newer warden understands.
        #[derive(Deserialize)]
        struct Detailed {
            value: f64,
            unit: Option<String>,
        }
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = WireMetric;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number or {\"value\": number, \"unit\": string}")
            }
            fn visit_f64<E>(self, v: f64) -> Result<WireMetric, E> {
                Ok(WireMetric { value: v, unit: None })
            }
            fn visit_i64<E>(self, v: i64) -> Result<WireMetric, E> {
                Ok(WireMetric { value: v as f64, unit: None })
            }
            fn visit_u64<E>(self, v: u64) -> Result<WireMetric, E> {
                Ok(WireMetric { value: v as f64, unit: None })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<WireMetric, A::Error> {
                let d = Detailed::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(WireMetric { value: d.value, unit: d.unit })
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Parses a POST /v1/heartbeats body: one heartbeat, or a batch. A batch is
/// all-or-nothing: the first bad heartbeat rejects it, naming its index.
/// Returns the heartbeats and whether the body was a batch.
pub fn parse_body(body: &[u8], limits: &Limits, now: DateTime<Utc>) -> Result<(Vec<Heartbeat>, bool), ParseError> {
    let wire = parse_json::<WireHeartbeat>(body)?;
    match wire.heartbeats {
        Some(list) => {
            if wire.agent_id.is_some() {
                return Err(ParseError::Invalid(FieldError::new(
                    "heartbeats",
                    "send either one heartbeat or {\"heartbeats\": [...]}, not both",
                )));
            }
            if list.is_empty() {
                return Err(ParseError::Invalid(FieldError::new("heartbeats", "must hold at least one heartbeat")));
            }
            if list.len() > limits.max_batch {
                return Err(ParseError::Invalid(FieldError::new(
                    "heartbeats",
                    format!(
                        "holds {} heartbeats; ingest.max_batch allows {} per request",
                        list.len(),
                        limits.max_batch
                    ),
                )));
            }
            let validated = list
                .into_iter()
                .enumerate()
                .map(|(i, w)| validate(w, limits, now).map_err(|e| e.within(&format!("heartbeats[{i}]"))))
                .collect::<Result<Vec<_>, _>>()
                .map_err(ParseError::Invalid)?;
            Ok((validated, true))
        }
        None => validate(wire, limits, now).map(|h| (vec![h], false)).map_err(ParseError::Invalid),
    }
}

/// Deserializes JSON, sorting syntax errors (400) from value errors (422,
/// with the path of the offending field).
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ParseError> {
    // serde would also read a struct from a JSON array; only objects are meant.
    if body.iter().find(|b| !b.is_ascii_whitespace()).is_some_and(|b| *b != b'{') {
        return Err(ParseError::Malformed("the body must be a JSON object".into()));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let names_a_field = !path.is_empty() && names_a_field(e.path());
        let inner = e.into_inner();
        let message = plain_wording(&strip_position(&inner.to_string()));
        // serde names a missing field in its message, against the object
        // that lacks it.
        if let Some(field) = message.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
            let at = if path.is_empty() || path == "." { field.to_string() } else { format!("{path}.{field}") };
            return ParseError::Invalid(FieldError::new(at, "is required"));
        }
        match inner.classify() {
            serde_json::error::Category::Data if names_a_field => ParseError::Invalid(FieldError::new(path, message)),
            serde_json::error::Category::Data => {
                ParseError::Malformed(format!("the body must be a JSON object ({message})"))
            }
            // NaN and Infinity are not JSON, but some encoders (Python's
            // json module) write them anyway; name the field instead of
            // calling the whole body broken.
            serde_json::error::Category::Syntax if names_a_field && non_finite_number(body, &inner) => {
                ParseError::Invalid(FieldError::new(path, "must be a finite number (NaN and Infinity are not allowed)"))
            }
            _ => ParseError::Malformed(format!("the body is not valid JSON ({inner})")),
        }
    })?;
    de.end().map_err(|e| ParseError::Malformed(format!("the body is not valid JSON ({e})")))?;
    Ok(value)
}

/// Whether an error path names a field: not the whole body, and no segment
/// that could not be named (where a key was expected but none was read).
/// (A path of one empty key prints as nothing; the caller checks that.)
pub(crate) fn names_a_field(path: &serde_path_to_error::Path) -> bool {
    path.iter().next().is_some() && !path.iter().any(|s| matches!(s, serde_path_to_error::Segment::Unknown))
}

/// True when a syntax error sits on a NaN/Infinity literal or an
/// out-of-range number.
fn non_finite_number(body: &[u8], e: &serde_json::Error) -> bool {
    if e.to_string().starts_with("number out of range") {
        return true;
    }
    let line_start: usize = body.split(|b| *b == b'\n').take(e.line().saturating_sub(1)).map(|l| l.len() + 1).sum();
    let at = (line_start + e.column()).saturating_sub(1);
    let near = &body[at.saturating_sub(1).min(body.len())..body.len().min(at + 9)];
    [&b"NaN"[..], b"Infinity"].iter().any(|lit| near.windows(lit.len()).any(|w| w == *lit))
}

/// serde names what it expected in Rust's terms ("struct WireHeartbeat",
/// "i64", "a sequence"); a client knows JSON's.
fn plain_wording(message: &str) -> String {
    let mut out = message
        .replace("expected struct WireHeartbeat", "expected a heartbeat object")
        .replace("a sequence", "an array")
        .replace("invalid type: sequence", "invalid type: array")
        .replace("invalid type: map", "invalid type: object")
        .replace("expected a map", "expected an object");
    if let Some(i) = out.find("expected struct ") {
        let end = out[i + 16..].find(|c: char| !c.is_alphanumeric() && c != '_').map_or(out.len(), |e| i + 16 + e);
        out.replace_range(i..end, "expected an object");
    }
    for (rust, json) in [
        ("expected i64", "expected an integer"),
        ("expected i32", "expected an integer"),
        ("expected u64", "expected a whole number from 0"),
        ("expected u32", "expected a whole number from 0"),
        ("expected f64", "expected a number"),
    ] {
        if let Some(rest) = out.strip_suffix(rust) {
            out = format!("{rest}{json}");
        }
    }
    out
}

/// serde_json appends " at line L column C", which names no field and means
/// nothing to a client that sent one line.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// Checks one wire heartbeat against the rules in DESIGN.md and the limits.
pub fn validate(w: WireHeartbeat, limits: &Limits, now: DateTime<Utc>) -> Result<Heartbeat, FieldError> {
    if w.heartbeats.is_some() {
        return Err(FieldError::new("heartbeats", "batches cannot be nested"));
    }
    let agent_id = w.agent_id.ok_or_else(|| FieldError::new("agent_id", "is required"))?;
    let agent_id = AgentId::parse(agent_id).map_err(|m| FieldError::new("agent_id", m))?;

    let name = match w.name {
        Some(n) if n.chars().count() > NAME_MAX => {
            return Err(FieldError::new("name", format!("must be at most {NAME_MAX} characters")));
        }
        Some(n) if n.chars().any(char::is_control) => {
            return Err(FieldError::new("name", "must not contain control characters"));
        }
        other => other,
    };

    if let Some(uptime) = w.uptime_seconds.filter(|u| *u < 0) {
        return Err(FieldError::new("uptime_seconds", format!("must not be negative (got {uptime})")));
    }

    let next_heartbeat_ms = match w.next_heartbeat_ms {
        None => None,
        Some(ms) if (NEXT_HEARTBEAT_MIN_MS..=NEXT_HEARTBEAT_MAX_MS).contains(&ms) => Some(ms as i32),
        Some(ms) => {
            return Err(FieldError::new(
                "next_heartbeat_ms",
                format!("must be from {NEXT_HEARTBEAT_MIN_MS} to {NEXT_HEARTBEAT_MAX_MS} (7 days); got {ms}"),
            ));
        }
    };

    let sent_at = match w.sent_at {
        None => None,
        Some(text) => {
            let at = DateTime::parse_from_rfc3339(&text)
                .map_err(|e| FieldError::new("sent_at", format!("must be an RFC 3339 timestamp ({e})")))?
                .with_timezone(&Utc);
            if at > now + limits.max_clock_skew {
                return Err(FieldError::new(
                    "sent_at",
                    format!(
                        "is {}s in the future; at most {}s of clock skew is allowed",
                        (at - now).num_seconds(),
                        limits.max_clock_skew.num_seconds()
                    ),
                ));
            }
            Some(at)
        }
    };

    let labels = match w.labels {
        None => None,
        Some(labels) => {
            if labels.len() > limits.max_labels {
                return Err(FieldError::new(
                    "labels",
                    format!("holds {} labels; ingest.max_labels allows {}", labels.len(), limits.max_labels),
                ));
            }
            for (key, value) in &labels {
                check_label(key, value).map_err(|m| FieldError::new(format!("labels.{key}"), m))?;
            }
            Some(labels)
        }
    };

    let mut metrics = Vec::new();
    if let Some(wire_metrics) = w.metrics {
        if wire_metrics.len() > limits.max_metrics {
            return Err(FieldError::new(
                "metrics",
                format!("holds {} metrics; ingest.max_metrics allows {}", wire_metrics.len(), limits.max_metrics),
            ));
        }
        metrics.reserve(wire_metrics.len());
        for (name, m) in wire_metrics {
            let field = format!("metrics.{name}");
            if name.is_empty() || name.len() > METRIC_NAME_MAX || !name.chars().all(is_metric_name_char) {
                return Err(FieldError::new(
                    field,
                    format!("metric names are 1-{METRIC_NAME_MAX} characters of A-Z a-z 0-9 . _ : / -"),
                ));
            }
            if !m.value.is_finite() {
                return Err(FieldError::new(field, "must be a finite number"));
            }
            if m.value.abs() > METRIC_VALUE_MAX {
                return Err(FieldError::new(field, "must be from -1e100 to 1e100"));
            }
            let bad_unit = |u: &String| u.is_empty() || u.chars().count() > UNIT_MAX || u.chars().any(char::is_control);
            if m.unit.as_ref().is_some_and(bad_unit) {
                return Err(FieldError::new(
                    format!("{field}.unit"),
                    format!("units are 1-{UNIT_MAX} characters, none of them control characters"),
                ));
            }
            metrics.push(Metric { name, value: m.value, unit: m.unit });
        }
    }

    Ok(Heartbeat {
        agent_id,
        name,
        labels,
        mode: w.mode,
        status: w.status.unwrap_or(HeartbeatStatus::Healthy),
        uptime_seconds: w.uptime_seconds,
        next_heartbeat_ms,
        sent_at,
        metrics,
    })
}

/// The rule of one label, for heartbeats and for the silences that match
/// them: what is wrong with it, if anything.
pub fn check_label(key: &str, value: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > LABEL_KEY_MAX || !key.chars().all(is_label_key_char) {
        return Err(format!("label names are 1-{LABEL_KEY_MAX} characters of A-Z a-z 0-9 . _ / -"));
    }
    if value.chars().count() > LABEL_VALUE_MAX || value.chars().any(char::is_control) {
        return Err(format!("label values are at most {LABEL_VALUE_MAX} characters, without control characters"));
    }
    Ok(())
}

fn is_label_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-')
}

fn is_metric_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-')
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { max_batch: 3, max_metrics: 2, max_labels: 2, max_clock_skew: chrono::Duration::minutes(5) }
    }

    fn now() -> DateTime<Utc> {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    fn parse(body: &str) -> Result<(Vec<Heartbeat>, bool), ParseError> {
        parse_body(body.as_bytes(), &limits(), now())
    }

    fn invalid(body: &str) -> FieldError {
        match parse(body) {
            Err(ParseError::Invalid(e)) => e,
            other => panic!("{body}: expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn a_minimal_heartbeat_defaults_to_healthy() {
        let (hbs, batch) = parse(r#"{"agent_id": "a"}"#).unwrap();
        assert!(!batch);
        assert_eq!(hbs[0].status, HeartbeatStatus::Healthy);
        assert_eq!(hbs[0].agent_id.as_str(), "a");
    }

    #[test]
    fn every_field_is_read() {
        let (hbs, _) = parse(
            r#"{"agent_id":"w-1","name":"Worker","mode":"idle","status":"degraded","uptime_seconds":12,
                "next_heartbeat_ms":1500,"sent_at":"2025-12-31T23:59:59+01:00",
                "metrics":{"cpu":0.5,"latency":{"value":12,"unit":"ms"}},"labels":{"role":"worker"}}"#,
        )
        .unwrap();
        let h = &hbs[0];
        assert_eq!(h.name.as_deref(), Some("Worker"));
        assert_eq!(h.mode, Some(Mode::Idle));
        assert_eq!(h.status, HeartbeatStatus::Degraded);
        assert_eq!(h.uptime_seconds, Some(12));
        assert_eq!(h.next_heartbeat_ms, Some(1500));
        assert_eq!(h.sent_at.unwrap().to_rfc3339(), "2025-12-31T22:59:59+00:00");
        assert_eq!(h.metrics[0], Metric { name: "cpu".into(), value: 0.5, unit: None });
        assert_eq!(h.metrics[1], Metric { name: "latency".into(), value: 12.0, unit: Some("ms".into()) });
        assert_eq!(h.labels.as_ref().unwrap()["role"], "worker");
    }

    #[test]
    fn a_batch_names_the_index_of_the_bad_heartbeat() {
        let e = invalid(r#"{"heartbeats":[{"agent_id":"a"},{"agent_id":"b c"}]}"#);
        assert_eq!(e.field, "heartbeats[1].agent_id");
        let e = invalid(r#"{"heartbeats":[{"agent_id":"a"},{"agent_id":"b","uptime_seconds":"x"}]}"#);
        assert_eq!(e.field, "heartbeats[1].uptime_seconds");
    }

    #[test]
    fn batches_are_bounded_and_not_empty() {
        assert_eq!(invalid(r#"{"heartbeats":[]}"#).field, "heartbeats");
        let four = r#"{"heartbeats":[{"agent_id":"a"},{"agent_id":"a"},{"agent_id":"a"},{"agent_id":"a"}]}"#;
        assert_eq!(invalid(four).message, "holds 4 heartbeats; ingest.max_batch allows 3 per request");
        assert_eq!(invalid(r#"{"agent_id":"a","heartbeats":[{"agent_id":"b"}]}"#).field, "heartbeats");
        assert_eq!(invalid(r#"{"heartbeats":[{"agent_id":"a","heartbeats":[]}]}"#).field, "heartbeats[0].heartbeats");
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (r#"{}"#, "agent_id"),
            (r#"{"agent_id":""}"#, "agent_id"),
            (r#"{"agent_id":"a/b"}"#, "agent_id"),
            (r#"{"agent_id":"a","mode":"asleep"}"#, "mode"),
            (r#"{"agent_id":"a","status":"fine"}"#, "status"),
            (r#"{"agent_id":"a","uptime_seconds":-1}"#, "uptime_seconds"),
            (r#"{"agent_id":"a","uptime_seconds":1.5}"#, "uptime_seconds"),
            (r#"{"agent_id":"a","uptime_seconds":9223372036854775808}"#, "uptime_seconds"),
            (r#"{"agent_id":"a","next_heartbeat_ms":"1000"}"#, "next_heartbeat_ms"),
            (r#"{"agent_id":"a","next_heartbeat_ms":99}"#, "next_heartbeat_ms"),
            (r#"{"agent_id":"a","next_heartbeat_ms":604800001}"#, "next_heartbeat_ms"),
            (r#"{"agent_id":"a","sent_at":"yesterday"}"#, "sent_at"),
            (r#"{"agent_id":"a","sent_at":"2026-01-01T00:05:01Z"}"#, "sent_at"),
            (r#"{"agent_id":"a","metrics":{"cpu":"high"}}"#, "metrics.cpu"),
            (r#"{"agent_id":"a","metrics":{"cpu":1e999}}"#, "metrics.cpu"),
            (r#"{"agent_id":"a","metrics":{"cpu":NaN}}"#, "metrics.cpu"),
            ("{\"agent_id\":\"a\",\n\"metrics\":{\"cpu\":-Infinity}}", "metrics.cpu"),
            (r#"{"agent_id":"a","metrics":{"cpu":{"value":Infinity}}}"#, "metrics.cpu"),
            (r#"{"agent_id":"a","metrics":{"cpu":1.0000001e100}}"#, "metrics.cpu"),
            (r#"{"agent_id":"a","metrics":{"cpu":{"value":-1e308}}}"#, "metrics.cpu"),
            (r#"{"agent_id":"a","metrics":{"bad name":1}}"#, "metrics.bad name"),
            (r#"{"agent_id":"a","metrics":{"a":1,"b":2,"c":3}}"#, "metrics"),
            (r#"{"agent_id":"a","metrics":{"l":{"value":1,"unit":""}}}"#, "metrics.l.unit"),
            (r#"{"agent_id":"a","labels":{"role":5}}"#, "labels.role"),
            (r#"{"agent_id":"a","labels":{"bad key":"x"}}"#, "labels.bad key"),
            (r#"{"agent_id":"a","labels":{"a":"1","b":"2","c":"3"}}"#, "labels"),
            (r#"{"agent_id":"a","name":"x\u0000y"}"#, "name"),
        ];
        for (body, field) in cases {
            let e = invalid(body);
            assert!(e.field.starts_with(field), "{body}: field {} should be {field}", e.field);
            assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn messages_speak_of_json_types_not_rust_ones() {
        for body in [
            r#"{"heartbeats":[1]}"#,
            r#"{"heartbeats":{"agent_id":"a"}}"#,
            r#"{"agent_id":["a"]}"#,
            r#"{"agent_id":"a","uptime_seconds":"5"}"#,
            r#"{"agent_id":"a","uptime_seconds":1.5}"#,
            r#"{"agent_id":"a","next_heartbeat_ms":-5}"#,
            r#"{"agent_id":"a","labels":[]}"#,
            r#"{"agent_id":"a","metrics":{"cpu":[1]}}"#,
        ] {
            let e = invalid(body);
            for rust in ["struct", "Wire", "i64", "u64", "i32", "u32", "f64", "sequence", "map"] {
                assert!(!e.message.contains(rust), "{body}: {:?} says {rust}", e.message);
            }
        }
        assert!(invalid(r#"{"heartbeats":[1]}"#).message.contains("expected a heartbeat object"));
    }

    #[test]
    fn metric_values_up_to_the_bound_and_unknown_metric_fields_are_taken() {
        let values = |body: &str| -> Vec<(f64, Option<String>)> {
            parse(body).unwrap().0[0].metrics.iter().map(|m| (m.value, m.unit.clone())).collect()
        };
        assert_eq!(
            values(r#"{"agent_id":"a","metrics":{"big":1e100,"small":-1e100}}"#),
            [(1e100, None), (-1e100, None)]
        );
        let detailed = r#"{"agent_id":"a","metrics":{"x":{"value":2,"unit":"ms","kind":"gauge"}}}"#;
        assert_eq!(values(detailed), [(2.0, Some("ms".to_string()))]);
    }

    #[test]
    fn whole_numbers_written_as_floats_are_integers() {
        let (hbs, _) = parse(r#"{"agent_id":"a","uptime_seconds":3600.0,"next_heartbeat_ms":1.5e4}"#).unwrap();
        assert_eq!(hbs[0].uptime_seconds, Some(3600));
        assert_eq!(hbs[0].next_heartbeat_ms, Some(15000));
        let (hbs, _) = parse(r#"{"agent_id":"a","uptime_seconds":null,"next_heartbeat_ms":null}"#).unwrap();
        assert_eq!((hbs[0].uptime_seconds, hbs[0].next_heartbeat_ms), (None, None));
        assert_eq!(invalid(r#"{"agent_id":"a","uptime_seconds":9.3e18}"#).field, "uptime_seconds");
    }

    #[test]
    fn a_syntax_error_outside_any_field_is_malformed() {
        for body in ["{NaN}", "{\"agent_id\":\"a\"} NaN", "{1e999}", "{\"metrics\":{NaN:1}}"] {
            assert!(matches!(parse(body), Err(ParseError::Malformed(_))), "{body}: {:?}", parse(body));
        }
    }

    #[test]
    fn sent_at_within_the_allowed_skew_passes() {
        assert!(parse(r#"{"agent_id":"a","sent_at":"2026-01-01T00:04:59Z"}"#).is_ok());
        assert!(parse(r#"{"agent_id":"a","sent_at":"2020-01-01T00:00:00Z"}"#).is_ok(), "old is fine");
    }

    #[test]
    fn broken_json_is_malformed_not_invalid() {
        for body in ["", "{", "nope", r#"{"agent_id":"a"} trailing"#, "[1,2]", "42"] {
            assert!(matches!(parse(body), Err(ParseError::Malformed(_))), "{body:?}");
        }
    }

    #[test]
    fn unknown_fields_are_ignored_for_forward_compatibility() {
        assert!(parse(r#"{"agent_id":"a","future_field":{"x":1}}"#).is_ok());
    }
}
