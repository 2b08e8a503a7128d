//! Fuzzes `warden::ingest::heartbeat::parse_body`, the parser of every
//! POST /v1/heartbeats body: whatever the bytes, it must not panic, a
//! refusal must say why (and name the field when a value is at fault), and
//! an acceptance must satisfy the documented rules (docs/ingest.md).
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden::ingest::heartbeat::{Limits, ParseError, parse_body};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_batch: 8,
        max_metrics: 8,
        max_labels: 8,
        max_clock_skew: chrono::Duration::minutes(5),
    };
    let now = chrono::DateTime::from_timestamp(1_780_000_000, 0).unwrap();
    match parse_body(data, &limits, now) {
        Ok((heartbeats, batch)) => {
            assert!(!heartbeats.is_empty() && heartbeats.len() <= limits.max_batch);
            assert!(batch || heartbeats.len() == 1);
            for h in &heartbeats {
                let id = h.agent_id.as_str();
                assert!((1..=128).contains(&id.len()));
                assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || ".-_:".contains(c)));
                assert!(h.name.as_ref().is_none_or(|n| n.chars().count() <= 256 && !n.chars().any(char::is_control)));
                assert!(h.uptime_seconds.is_none_or(|u| u >= 0));
                assert!(h.next_heartbeat_ms.is_none_or(|n| (100..=604_800_000).contains(&n)));
                assert!(h.sent_at.is_none_or(|at| at <= now + limits.max_clock_skew));
                assert!(h.labels.as_ref().is_none_or(|l| l.len() <= limits.max_labels));
                assert!(h.metrics.len() <= limits.max_metrics);
                assert!(h.metrics.iter().all(|m| m.value.is_finite() && !m.name.is_empty()));
            }
        }
        Err(ParseError::Malformed(message)) => assert!(!message.is_empty()),
        Err(ParseError::Invalid(e)) => assert!(!e.field.is_empty() && !e.message.is_empty()),
    }
});
