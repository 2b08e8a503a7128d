//! Property-based tests of heartbeat parsing and validation.
//!
//! - Any bytes, and any JSON: `parse_body` never panics, and every refusal
//!   is `Malformed` with a message or `Invalid` naming a field.
//! - Heartbeats made field by field from valid and invalid values: the
//!   outcome matches an independent model of the documented rules
//!   (docs/ingest.md), refusals name the field the model blames, and every
//!   accepted heartbeat satisfies the rules and carries what was sent.
//! - Batches are all or nothing, and name the index of the bad heartbeat.

use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Map, Value, json};

use super::*;

const MAX_BATCH: usize = 4;
const MAX_METRICS: usize = 3;
const MAX_LABELS: usize = 3;

fn limits() -> Limits {
    Limits {
        max_batch: MAX_BATCH,
        max_metrics: MAX_METRICS,
        max_labels: MAX_LABELS,
        max_clock_skew: chrono::Duration::minutes(5),
    }
}

fn now() -> DateTime<Utc> {
    "2026-06-01T12:00:00Z".parse().unwrap()
}

/// The invariant of every outcome.
fn check_outcome(outcome: &Result<(Vec<Heartbeat>, bool), ParseError>) -> Result<(), TestCaseError> {
    match outcome {
        Ok((heartbeats, batch)) => {
            prop_assert!(!heartbeats.is_empty());
            prop_assert!(*batch || heartbeats.len() == 1);
            prop_assert!(heartbeats.len() <= MAX_BATCH);
            for h in heartbeats {
                satisfies_rules(h)?;
            }
        }
        Err(ParseError::Malformed(message)) => prop_assert!(!message.is_empty()),
        Err(ParseError::Invalid(e)) => {
            prop_assert!(!e.message.is_empty());
            prop_assert!(!e.field.is_empty(), "an invalid value names its field");
        }
    }
    Ok(())
}

/// The documented rules, checked on an accepted heartbeat.
fn satisfies_rules(h: &Heartbeat) -> Result<(), TestCaseError> {
    let id = h.agent_id.as_str();
    prop_assert!((1..=128).contains(&id.len()));
    prop_assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || ".-_:".contains(c)));
    if let Some(name) = &h.name {
        prop_assert!(name.chars().count() <= NAME_MAX && !name.chars().any(char::is_control));
    }
    prop_assert!(h.uptime_seconds.is_none_or(|u| u >= 0));
    prop_assert!(h.next_heartbeat_ms.is_none_or(|n| (100..=604_800_000).contains(&n)));
    prop_assert!(h.sent_at.is_none_or(|at| at <= now() + chrono::Duration::minutes(5)));
    if let Some(labels) = &h.labels {
        prop_assert!(labels.len() <= MAX_LABELS);
        for (k, v) in labels {
            prop_assert!((1..=63).contains(&k.len()));
            prop_assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c)));
            prop_assert!(v.chars().count() <= 256 && !v.chars().any(char::is_control));
        }
    }
    prop_assert!(h.metrics.len() <= MAX_METRICS);
    prop_assert!(h.metrics.windows(2).all(|w| w[0].name < w[1].name), "metrics in name order, one per name");
    for m in &h.metrics {
        prop_assert!((1..=128).contains(&m.name.len()));
        prop_assert!(m.name.chars().all(|c| c.is_ascii_alphanumeric() || "._:/-".contains(c)));
        prop_assert!(m.value.is_finite() && m.value.abs() <= METRIC_VALUE_MAX);
        if let Some(unit) = &m.unit {
            prop_assert!((1..=32).contains(&unit.chars().count()) && !unit.chars().any(char::is_control));
        }
    }
    Ok(())
}

// ---- arbitrary input --------------------------------------------------

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("JSON numbers are finite", |f| f.is_finite()).prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        select(vec!["agent_id", "heartbeats", "metrics", "labels", "a", "", "2026-01-01T00:00:00Z"])
            .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..8)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

/// Object keys: the heartbeat's own fields often, anything else sometimes.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(vec![
            "agent_id", "name", "mode", "status", "uptime_seconds", "next_heartbeat_ms", "sent_at", "metrics",
            "labels", "heartbeats", "value", "unit",
        ])
        .prop_map(String::from),
        1 => any::<String>(),
    ]
}

proptest! {
    #[test]
    fn any_bytes_are_answered_without_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        check_outcome(&parse_body(&body, &limits(), now()))?;
    }

    #[test]
    fn any_json_is_answered_without_panic(value in any_json()) {
        let body = serde_json::to_vec(&value).unwrap();
        let outcome = parse_body(&body, &limits(), now());
        check_outcome(&outcome)?;
        if !value.is_object() {
            prop_assert!(matches!(outcome, Err(ParseError::Malformed(_))), "{value}: {outcome:?}");
        }
    }

    #[test]
    fn broken_json_is_malformed_or_names_a_field(
        value in any_json(),
        cut in any::<prop::sample::Index>(),
        junk in select(vec!["", "NaN", "-Infinity", "1e999", "{", "]", ",", "\"", "\\u00", "\u{0}"]),
    ) {
        let text = serde_json::to_string(&value).unwrap();
        let at = cut.index(text.len() + 1);
        let at = (0..=at).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        let body = format!("{}{junk}{}", &text[..at], &text[at..]);
        check_outcome(&parse_body(body.as_bytes(), &limits(), now()))?;
    }
}

// ---- heartbeats field by field, with a model of the rules --------------

/// One field as generated, and what the rules make of it.
#[derive(Debug, Clone)]
enum Case {
    Absent,
    /// Accepted; the value as sent.
    Valid(Value),
    /// Has the right JSON type but breaks a rule (a 422 from validation).
    BreaksRule(Value),
    /// Not even of the right type (a 422 from reading the body).
    WrongType(Value),
}

use Case::*;

fn id_char() -> impl Strategy<Value = char> {
    select("ABCXYZabcxyz0189._:-".chars().collect::<Vec<_>>())
}

fn string_of(chars: impl Strategy<Value = char>, len: std::ops::Range<usize>) -> impl Strategy<Value = String> {
    prop::collection::vec(chars, len).prop_map(String::from_iter)
}

fn printable() -> impl Strategy<Value = char> {
    any::<char>().prop_map(|c| if c.is_control() { '\u{b7}' } else { c })
}

fn control() -> impl Strategy<Value = char> {
    select(vec!['\u{0}', '\n', '\t', '\u{1b}', '\u{7f}', '\u{85}', '\u{9f}'])
}

/// A JSON value of a type no heartbeat field of `not` type takes.
fn wrong_type(not: &'static str) -> impl Strategy<Value = Value> {
    let all: Vec<(&str, Value)> = vec![
        ("bool", json!(true)),
        ("number", json!(1.5)),
        ("string", json!("x")),
        ("array", json!([1])),
        ("object", json!({"k": 1})),
    ];
    select(all.into_iter().filter(|(t, _)| *t != not).map(|(_, v)| v).collect::<Vec<_>>())
}

fn agent_id() -> impl Strategy<Value = Case> {
    prop_oneof![
        6 => string_of(id_char(), 1..129).prop_map(|s| Valid(json!(s))),
        1 => Just(Absent),
        1 => Just(BreaksRule(Value::Null)),
        1 => Just(BreaksRule(json!(""))),
        1 => string_of(id_char(), 129..200).prop_map(|s| BreaksRule(json!(s))),
        1 => (string_of(id_char(), 0..10), select(vec![' ', '/', 'é', '\u{0}', '#'])).prop_map(|(s, c)| BreaksRule(json!(format!("{s}{c}")))),
        1 => wrong_type("string").prop_map(WrongType),
    ]
}

fn name() -> impl Strategy<Value = Case> {
    prop_oneof![
        4 => string_of(printable(), 0..40).prop_map(|s| Valid(json!(s))),
        1 => Just(Absent),
        1 => Just(Valid(Value::Null)),
        1 => string_of(printable(), 257..300).prop_map(|s| BreaksRule(json!(s))),
        1 => (string_of(printable(), 0..10), control()).prop_map(|(s, c)| BreaksRule(json!(format!("{s}{c}")))),
        1 => wrong_type("string").prop_map(WrongType),
    ]
}

fn one_of_words(valid: &'static [&'static str]) -> impl Strategy<Value = Case> {
    prop_oneof![
        4 => select(valid.to_vec()).prop_map(|s| Valid(json!(s))),
        1 => Just(Absent),
        1 => Just(Valid(Value::Null)),
        // An unknown word fails while the body is read, like a wrong type.
        1 => select(vec!["", "Active", "asleep", "fine"]).prop_map(|s| WrongType(json!(s))),
        1 => wrong_type("string").prop_map(WrongType),
    ]
}

fn uptime() -> impl Strategy<Value = Case> {
    prop_oneof![
        4 => (0..=i64::MAX).prop_map(|n| Valid(json!(n))),
        1 => (0..1_000_000_i64).prop_map(|n| Valid(json!(n as f64))),
        1 => Just(Absent),
        1 => (i64::MIN..0).prop_map(|n| BreaksRule(json!(n))),
        1 => (1..100_000_i64).prop_map(|n| WrongType(json!(n as f64 + 0.5))),
        1 => Just(WrongType(json!(u64::MAX))),
        1 => wrong_type("number").prop_map(WrongType),
    ]
}

fn next_heartbeat() -> impl Strategy<Value = Case> {
    prop_oneof![
        4 => (100..=604_800_000_i64).prop_map(|n| Valid(json!(n))),
        1 => Just(Absent),
        1 => Just(Valid(Value::Null)),
        1 => prop_oneof![i64::MIN..100, 604_800_001..=i64::MAX].prop_map(|n| BreaksRule(json!(n))),
        1 => wrong_type("number").prop_map(WrongType),
    ]
}

fn sent_at() -> impl Strategy<Value = Case> {
    let now = now().timestamp();
    prop_oneof![
        4 => (-62_000_000_000_i64..now + 300).prop_map(|t| {
            Valid(json!(DateTime::from_timestamp(t, 0).unwrap().to_rfc3339()))
        }),
        1 => Just(Absent),
        1 => (now + 301..253_000_000_000_i64).prop_map(|t| {
            BreaksRule(json!(DateTime::from_timestamp(t, 0).unwrap().to_rfc3339()))
        }),
        1 => select(vec!["yesterday", "", "2026-13-01T00:00:00Z", "2026-01-01"]).prop_map(|s| BreaksRule(json!(s))),
        1 => wrong_type("string").prop_map(WrongType),
    ]
}

fn metric_name() -> impl Strategy<Value = String> {
    string_of(select("abcxyzAZ09._:/-".chars().collect::<Vec<_>>()), 1..129)
}

/// A metrics object: each entry valid, or one breaking a rule or a type.
fn metrics() -> impl Strategy<Value = Case> {
    let value = prop_oneof![
        3 => any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|v| (json!(v), if v.abs() <= METRIC_VALUE_MAX { 0 } else { 1 })),
        1 => (-1e100..=1e100f64).prop_map(|v| (json!(v), 0)),
        1 => (any::<i32>(), string_of(printable(), 1..33)).prop_map(|(v, u)| (json!({"value": v, "unit": u}), 0)),
        1 => any::<i32>().prop_map(|v| (json!({"value": v}), 0)),
        1 => Just((json!({"value": 1, "unit": ""}), 1)),
        1 => (string_of(printable(), 0..5), control()).prop_map(|(u, c)| (json!({"value": 1, "unit": format!("{u}{c}")}), 1)),
        1 => Just((json!({"value": 1, "extra": 2}), 0)),
        1 => Just((json!("high"), 2)),
    ];
    let entry = prop_oneof![
        6 => (metric_name(), value),
        1 => (string_of(printable(), 0..10).prop_filter("not a metric name", |n| {
            n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || "._:/-".contains(c))
        }), Just(json!(1))).prop_map(|(n, v)| (n, (v, 1))),
    ];
    prop_oneof![
        6 => prop::collection::vec(entry, 0..=MAX_METRICS + 1).prop_map(|entries| {
            let mut object = Map::new();
            let mut worst = 0;
            for (name, (value, badness)) in entries {
                if !object.contains_key(&name) {
                    worst = worst.max(badness);
                    object.insert(name, value);
                }
            }
            let value = Value::Object(object.clone());
            match worst {
                2 => WrongType(value),
                _ if worst == 1 || object.len() > MAX_METRICS => BreaksRule(value),
                _ => Valid(value),
            }
        }),
        1 => Just(Absent),
        1 => Just(Valid(Value::Null)),
        1 => wrong_type("object").prop_map(WrongType),
    ]
}

fn labels() -> impl Strategy<Value = Case> {
    let good_key = || string_of(select("abcxyzAZ09._/-".chars().collect::<Vec<_>>()), 1..64);
    let bad_key = prop_oneof![
        string_of(select("abc".chars().collect::<Vec<_>>()), 64..80),
        Just(String::new()),
        (string_of(select("abc".chars().collect::<Vec<_>>()), 0..5), select(vec![' ', ':', 'é', '\u{0}']))
            .prop_map(|(s, c)| format!("{s}{c}")),
    ];
    let entry = prop_oneof![
        6 => (good_key(), string_of(printable(), 0..30)).prop_map(|(k, v)| (k, json!(v), 0)),
        1 => (bad_key, Just("x")).prop_map(|(k, v)| (k, json!(v), 1)),
        1 => (good_key(), string_of(printable(), 257..300)).prop_map(|(k, v)| (k, json!(v), 1)),
        1 => (good_key(), control()).prop_map(|(k, c)| (k, json!(format!("a{c}")), 1)),
        1 => (good_key(), wrong_type("string")).prop_map(|(k, v)| (k, v, 2)),
    ];
    prop_oneof![
        6 => prop::collection::vec(entry, 0..=MAX_LABELS + 1).prop_map(|entries| {
            let mut object = Map::new();
            let mut worst = 0;
            for (key, value, badness) in entries {
                if !object.contains_key(&key) {
                    worst = worst.max(badness);
                    object.insert(key, value);
                }
            }
            let value = Value::Object(object.clone());
            match worst {
                2 => WrongType(value),
                _ if worst == 1 || object.len() > MAX_LABELS => BreaksRule(value),
                _ => Valid(value),
            }
        }),
        1 => Just(Absent),
        1 => Just(Valid(Value::Null)),
        1 => wrong_type("object").prop_map(WrongType),
    ]
}

/// Fields in the order `validate` checks them.
const FIELDS: [&str; 9] =
    ["agent_id", "name", "uptime_seconds", "next_heartbeat_ms", "sent_at", "labels", "metrics", "mode", "status"];

#[derive(Debug, Clone)]
struct Generated {
    cases: Vec<(&'static str, Case)>,
    extra: Vec<(String, Value)>,
}

impl Generated {
    fn object(&self) -> Value {
        let mut object = Map::new();
        for (key, value) in &self.extra {
            object.insert(key.clone(), value.clone());
        }
        for (field, case) in &self.cases {
            match case {
                Absent => {}
                Valid(v) | BreaksRule(v) | WrongType(v) => {
                    object.insert(field.to_string(), v.clone());
                }
            }
        }
        Value::Object(object)
    }

    /// What the rules say: `Ok` or the fields one of which must be blamed.
    fn verdict(&self) -> Result<(), Vec<&'static str>> {
        let wrong: Vec<_> = self.cases.iter().filter(|(_, c)| matches!(c, WrongType(_))).map(|(f, _)| *f).collect();
        if !wrong.is_empty() {
            return Err(wrong);
        }
        for field in FIELDS {
            let case = &self.cases.iter().find(|(f, _)| *f == field).unwrap().1;
            if matches!(case, BreaksRule(_)) || (field == "agent_id" && matches!(case, Absent)) {
                return Err(vec![field]);
            }
        }
        Ok(())
    }

    fn value(&self, field: &str) -> Option<&Value> {
        match &self.cases.iter().find(|(f, _)| *f == field).unwrap().1 {
            Valid(v) | BreaksRule(v) | WrongType(v) => Some(v).filter(|v| !v.is_null()),
            Absent => None,
        }
    }

    /// An accepted heartbeat carries exactly what was sent.
    fn check_carried(&self, h: &Heartbeat) -> Result<(), TestCaseError> {
        prop_assert_eq!(Some(&json!(h.agent_id.as_str())), self.value("agent_id"));
        prop_assert_eq!(h.name.as_ref().map(|n| json!(n)), self.value("name").cloned());
        prop_assert_eq!(h.mode.map(|m| json!(m.as_str())), self.value("mode").cloned());
        let status = self.value("status").cloned().unwrap_or(json!("healthy"));
        prop_assert_eq!(json!(h.status.as_str()), status);
        let uptime = self.value("uptime_seconds").and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)));
        prop_assert_eq!(h.uptime_seconds, uptime);
        prop_assert_eq!(h.next_heartbeat_ms.map(i64::from), self.value("next_heartbeat_ms").and_then(Value::as_i64));
        let sent = self.value("sent_at").and_then(Value::as_str).map(|s| s.parse::<DateTime<Utc>>().unwrap());
        prop_assert_eq!(h.sent_at, sent);
        let labels =
            self.value("labels").map(|v| serde_json::from_value::<BTreeMap<String, String>>(v.clone()).unwrap());
        prop_assert_eq!(&h.labels, &labels);
        let sent_metrics = self.value("metrics").and_then(Value::as_object).cloned().unwrap_or_default();
        prop_assert_eq!(h.metrics.len(), sent_metrics.len());
        for m in &h.metrics {
            let sent = &sent_metrics[&m.name];
            let value = if sent.is_number() { sent } else { &sent["value"] };
            // Read back the way warden reads it: serde_json's parse of a
            // printed f64 may differ from it in the last place.
            let value: f64 = serde_json::from_str(&value.to_string()).unwrap();
            prop_assert_eq!(m.value, value);
            prop_assert_eq!(m.unit.as_deref(), sent.get("unit").and_then(Value::as_str));
        }
        Ok(())
    }
}

fn generated() -> impl Strategy<Value = Generated> {
    let extra = prop::collection::vec(
        (
            any::<String>()
                .prop_filter("not a heartbeat field", |k| !FIELDS.contains(&k.as_str()) && k != "heartbeats"),
            any_json(),
        ),
        0..3,
    );
    (
        agent_id(),
        name(),
        uptime(),
        next_heartbeat(),
        sent_at(),
        labels(),
        metrics(),
        one_of_words(&["emergency", "active", "idle", "sleep"]),
        one_of_words(&["healthy", "degraded", "error"]),
        extra,
    )
        .prop_map(|(a, n, u, nh, s, l, m, mode, status, extra)| Generated {
            cases: vec![
                ("agent_id", a),
                ("name", n),
                ("uptime_seconds", u),
                ("next_heartbeat_ms", nh),
                ("sent_at", s),
                ("labels", l),
                ("metrics", m),
                ("mode", mode),
                ("status", status),
            ],
            extra,
        })
}

/// The field an error blames, without its batch prefix and key.
fn blamed(field: &str) -> &str {
    let field = field.split_once("].").map_or(field, |(_, rest)| rest);
    field.split(['.', '[']).next().unwrap_or(field)
}

proptest! {
    // 512 cases unless PROPTEST_CASES asks for more (or fewer).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]

    #[test]
    fn one_heartbeat_is_judged_as_the_rules_say(g in generated()) {
        let body = serde_json::to_vec(&g.object()).unwrap();
        let outcome = parse_body(&body, &limits(), now());
        check_outcome(&outcome)?;
        match (g.verdict(), outcome) {
            (Ok(()), Ok((heartbeats, batch))) => {
                prop_assert!(!batch);
                g.check_carried(&heartbeats[0])?;
            }
            (Err(fields), Err(ParseError::Invalid(e))) => {
                prop_assert!(fields.contains(&blamed(&e.field)), "blamed {} for {:?}", e.field, fields);
            }
            (verdict, outcome) => prop_assert!(false, "model says {verdict:?}, parser says {outcome:?}"),
        }
    }

    #[test]
    fn a_batch_is_all_or_nothing(items in prop::collection::vec(generated(), 0..=MAX_BATCH + 1)) {
        let list: Vec<Value> = items.iter().map(Generated::object).collect();
        let body = serde_json::to_vec(&json!({ "heartbeats": list })).unwrap();
        let outcome = parse_body(&body, &limits(), now());
        check_outcome(&outcome)?;
        // Reading the body fails at the first item of a wrong type; only then
        // are the size and each item's rules checked.
        let wrong = items.iter().position(|g| g.cases.iter().any(|(_, c)| matches!(c, WrongType(_))));
        let first_bad = items.iter().position(|g| g.verdict().is_err());
        match outcome {
            Ok((heartbeats, batch)) => {
                prop_assert!(batch);
                prop_assert!(wrong.is_none() && first_bad.is_none(), "accepted a batch with a bad heartbeat");
                prop_assert!((1..=MAX_BATCH).contains(&items.len()));
                prop_assert_eq!(heartbeats.len(), items.len());
                for (g, h) in items.iter().zip(&heartbeats) {
                    g.check_carried(h)?;
                }
            }
            Err(ParseError::Invalid(e)) => {
                let expected_index = match (wrong, items.len()) {
                    (Some(i), _) => Some(i),
                    (None, 0) => None,
                    (None, n) if n > MAX_BATCH => None,
                    (None, _) => first_bad,
                };
                match expected_index {
                    Some(i) => {
                        let prefix = format!("heartbeats[{i}]");
                        prop_assert!(e.field.starts_with(&prefix), "{} should start with {prefix}", e.field);
                        let fields = items[i].verdict().unwrap_err();
                        prop_assert!(fields.contains(&blamed(&e.field)), "blamed {} for {:?}", e.field, fields);
                    }
                    None => prop_assert_eq!(e.field, "heartbeats"),
                }
            }
            Err(ParseError::Malformed(m)) => prop_assert!(false, "a JSON object is never malformed: {m}"),
        }
    }
}
