//! Silences and maintenance windows: matching alerts are still recorded
//! (and show their `suppressed_reason`) but nothing is sent while they
//! last.
//!
//! Silences are ad-hoc, made through the API or `warden silence add` and
//! kept in `warden.silences`; maintenance windows recur weekly and live in
//! the settings. Matching is pure; this module also holds the silences'
//! database access.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Duration, TimeZone, Utc};
use serde::Serialize;
use serde_json::Value;

use super::routing::labels_match;
use crate::config::{MaintenanceWindow, Weekday};
use crate::db::DbError;
use crate::health::incidents::IssueType;
use crate::model::AgentId;

/// A silence as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Silence {
    pub id: i64,
    pub agent_id: Option<String>,
    pub issue_type: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub comment: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub removed_at: Option<DateTime<Utc>>,
}

impl Silence {
    /// In force at `now`.
    pub fn active_at(&self, now: DateTime<Utc>) -> bool {
        self.removed_at.is_none() && self.starts_at <= now && now < self.ends_at
    }

    /// Whether it covers an alert about `agent` (None: the fleet) and
    /// `issue`, given the agent's labels. Every matcher given must match.
    pub fn matches(&self, agent: Option<&str>, issue: &str, labels: Option<&Value>) -> bool {
        if let Some(a) = &self.agent_id
            && agent != Some(a.as_str())
        {
            return false;
        }
        if let Some(i) = &self.issue_type
            && i != issue
        {
            return false;
        }
        labels_match(&self.labels, labels)
    }
}

/// Whether maintenance window `w` is open at `now` and covers the alert.
pub fn maintenance_covers(
    w: &MaintenanceWindow,
    agent: Option<&str>,
    issue: &str,
    labels: Option<&Value>,
    now: DateTime<Utc>,
) -> bool {
    if !w.agents.is_empty() && !agent.is_some_and(|a| w.agents.iter().any(|x| x == a)) {
        return false;
    }
    if !w.issues.is_empty() && !w.issues.iter().any(|i| i.as_str() == issue) {
        return false;
    }
    if !labels_match(&w.labels, labels) {
        return false;
    }
    window_open(w, now)
}

/// Whether a window started on some day up to 8 days back is still open.
pub fn window_open(w: &MaintenanceWindow, now: DateTime<Utc>) -> bool {
    let Some(minute) = w.start_minute() else { return false };
    let length = w.duration.to_chrono();
    let today = now.date_naive();
    (0..=8).any(|back| {
        let day = today - Duration::days(back);
        if !w.days.is_empty() && !w.days.contains(&weekday(day.weekday())) {
            return false;
        }
        let Some(midnight) = day.and_hms_opt(0, 0, 0) else { return false };
        let start = Utc.from_utc_datetime(&midnight) + Duration::minutes(i64::from(minute));
        start <= now && now < start + length
    })
}

fn weekday(d: chrono::Weekday) -> Weekday {
    match d {
        chrono::Weekday::Mon => Weekday::Mon,
        chrono::Weekday::Tue => Weekday::Tue,
        chrono::Weekday::Wed => Weekday::Wed,
        chrono::Weekday::Thu => Weekday::Thu,
        chrono::Weekday::Fri => Weekday::Fri,
        chrono::Weekday::Sat => Weekday::Sat,
        chrono::Weekday::Sun => Weekday::Sun,
    }
}

/// A silence to create, as given by the API or the command line.
#[derive(Debug, Clone, Default)]
pub struct NewSilence {
    pub agent_id: Option<String>,
    pub issue_type: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Default: now.
    pub starts_at: Option<DateTime<Utc>>,
    pub ends_at: Option<DateTime<Utc>>,
    pub comment: String,
    pub created_by: String,
}

/// A refused silence: which field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: &'static str,
    pub message: String,
}

impl NewSilence {
    /// Checks the silence as it would be stored at `now`.
    pub fn validate(&self, now: DateTime<Utc>) -> Result<(), Invalid> {
        let bad = |field, message: &str| Err(Invalid { field, message: message.to_string() });
        if let Some(a) = &self.agent_id
            && let Err(m) = AgentId::parse(a.as_str())
        {
            return Err(Invalid { field: "agent_id", message: format!("agent_id {m}") });
        }
        if let Some(i) = &self.issue_type
            && let Err(allowed) = i.parse::<IssueType>()
        {
            return Err(Invalid { field: "issue_type", message: format!("issue_type must be {allowed}") });
        }
        if self.labels.len() > 32 {
            return bad("labels", "labels must be at most 32 pairs");
        }
        // The rules of heartbeat labels, the only ones a silence can match.
        for (key, value) in &self.labels {
            crate::ingest::heartbeat::check_label(key, value)
                .map_err(|message| Invalid { field: "labels", message })?;
        }
        if self.agent_id.is_none() && self.issue_type.is_none() && self.labels.is_empty() {
            return bad("agent_id", "a silence needs at least one matcher: agent_id, issue_type or labels");
        }
        let start = self.starts_at.unwrap_or(now);
        let Some(end) = self.ends_at else { return bad("ends_at", "ends_at (or a duration) is required") };
        if end <= start || end <= now {
            return bad("ends_at", "ends_at must be after starts_at and in the future");
        }
        if end - start > Duration::days(366) {
            return bad("ends_at", "a silence may last at most a year");
        }
        let comment = self.comment.trim();
        if comment.is_empty() || comment.chars().count() > 1024 {
            return bad("comment", "comment must be 1-1024 characters: say why");
        }
        // PostgreSQL cannot store it in text.
        if comment.contains('\0') {
            return bad("comment", "comment must not contain U+0000");
        }
        if !crate::model::is_actor_name(&self.created_by) {
            return bad("created_by", "created_by must be 1-128 characters, without control characters");
        }
        Ok(())
    }
}

const COLUMNS: &str =
    "id, agent_id, issue_type, labels, starts_at, ends_at, comment, created_by, created_at, removed_at";

fn from_row(r: &tokio_postgres::Row) -> Silence {
    let labels: Value = r.get(3);
    let labels = labels
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    Silence {
        id: r.get(0),
        agent_id: r.get(1),
        issue_type: r.get(2),
        labels,
        starts_at: r.get(4),
        ends_at: r.get(5),
        comment: r.get(6),
        created_by: r.get(7),
        created_at: r.get(8),
        removed_at: r.get(9),
    }
}

/// The database's time now: silences are made on the clock the escalator
/// judges them by.
pub async fn now(client: &tokio_postgres::Client) -> Result<DateTime<Utc>, DbError> {
    Ok(client.query_one("SELECT now()", &[]).await?.get(0))
}

/// Stores a silence (validate it first).
pub async fn create(client: &tokio_postgres::Client, s: &NewSilence) -> Result<Silence, DbError> {
    let labels = serde_json::to_value(&s.labels).unwrap_or_else(|_| Value::Object(Default::default()));
    let row = client
        .query_one(
            &format!(
                "INSERT INTO warden.silences (agent_id, issue_type, labels, starts_at, ends_at, comment, created_by) \
                 VALUES ($1, $2, $3, coalesce($4, now()), $5, $6, $7) RETURNING {COLUMNS}"
            ),
            &[&s.agent_id, &s.issue_type, &labels, &s.starts_at, &s.ends_at, &s.comment.trim(), &s.created_by.trim()],
        )
        .await?;
    Ok(from_row(&row))
}

/// Silences not yet over (or all, newest first).
pub async fn list(client: &tokio_postgres::Client, include_ended: bool) -> Result<Vec<Silence>, DbError> {
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM warden.silences \
                 WHERE $1 OR (removed_at IS NULL AND ends_at > now()) ORDER BY id DESC LIMIT 1000"
            ),
            &[&include_ended],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect())
}

/// Silences in force at `now`, for the escalator.
pub async fn active(client: &tokio_postgres::Transaction<'_>, now: DateTime<Utc>) -> Result<Vec<Silence>, DbError> {
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM warden.silences \
                 WHERE removed_at IS NULL AND starts_at <= $1 AND ends_at > $1 ORDER BY id"
            ),
            &[&now],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect())
}

/// Ends a silence now. `None` if there is no such silence still in force.
pub async fn remove(client: &tokio_postgres::Client, id: i64) -> Result<Option<Silence>, DbError> {
    let row = client
        .query_opt(
            &format!(
                "UPDATE warden.silences SET removed_at = now() \
                 WHERE id = $1 AND removed_at IS NULL AND ends_at > now() RETURNING {COLUMNS}"
            ),
            &[&id],
        )
        .await?;
    Ok(row.as_ref().map(from_row))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn silence() -> Silence {
        Silence {
            id: 1,
            agent_id: None,
            issue_type: Some("agent_unresponsive".into()),
            labels: [("env".to_string(), "staging".to_string())].into(),
            starts_at: DateTime::from_timestamp(1_000, 0).unwrap(),
            ends_at: DateTime::from_timestamp(2_000, 0).unwrap(),
            comment: "c".into(),
            created_by: "me".into(),
            created_at: DateTime::from_timestamp(1_000, 0).unwrap(),
            removed_at: None,
        }
    }

    #[test]
    fn every_matcher_must_match() {
        let s = silence();
        let staging = json!({"env": "staging"});
        let prod = json!({"env": "prod"});
        assert!(s.matches(Some("a"), "agent_unresponsive", Some(&staging)));
        assert!(!s.matches(Some("a"), "agent_unresponsive", Some(&prod)));
        assert!(!s.matches(Some("a"), "heartbeat_late", Some(&staging)));
        assert!(!s.matches(None, "agent_unresponsive", None), "the fleet has no labels");
        let by_agent = Silence { agent_id: Some("a".into()), issue_type: None, labels: BTreeMap::new(), ..silence() };
        assert!(by_agent.matches(Some("a"), "flapping", None));
        assert!(!by_agent.matches(Some("b"), "flapping", None));
    }

    #[test]
    fn a_silence_is_active_between_start_and_end_unless_removed() {
        let s = silence();
        assert!(!s.active_at(DateTime::from_timestamp(999, 0).unwrap()));
        assert!(s.active_at(DateTime::from_timestamp(1_000, 0).unwrap()));
        assert!(!s.active_at(DateTime::from_timestamp(2_000, 0).unwrap()));
        let removed = Silence { removed_at: Some(DateTime::from_timestamp(1_500, 0).unwrap()), ..silence() };
        assert!(!removed.active_at(DateTime::from_timestamp(1_200, 0).unwrap()));
    }

    #[test]
    fn maintenance_windows_recur_on_their_days_and_may_cross_midnight() {
        let w = MaintenanceWindow {
            name: "sunday".into(),
            days: vec![Weekday::Sun],
            start: "23:00".into(),
            duration: crate::config::Duration::from_secs(2 * 3600),
            agents: vec![],
            labels: BTreeMap::new(),
            issues: vec![],
        };
        // 2024-06-02 is a Sunday.
        let at = |d: u32, h: u32, m: u32| Utc.with_ymd_and_hms(2024, 6, d, h, m, 0).unwrap();
        assert!(!window_open(&w, at(2, 22, 59)));
        assert!(window_open(&w, at(2, 23, 0)));
        assert!(window_open(&w, at(3, 0, 59)), "past midnight into Monday");
        assert!(!window_open(&w, at(3, 1, 0)));
        assert!(!window_open(&w, at(9, 22, 0)));
        assert!(window_open(&w, at(9, 23, 30)), "next Sunday");
        let scoped = MaintenanceWindow { agents: vec!["db1".into()], ..w };
        assert!(maintenance_covers(&scoped, Some("db1"), "agent_unresponsive", None, at(2, 23, 30)));
        assert!(!maintenance_covers(&scoped, Some("db2"), "agent_unresponsive", None, at(2, 23, 30)));
    }

    #[test]
    fn new_silences_need_a_matcher_an_end_and_a_comment() {
        let now = DateTime::from_timestamp(10_000, 0).unwrap();
        let ok = NewSilence {
            agent_id: Some("w1".into()),
            ends_at: Some(now + Duration::hours(2)),
            comment: "deploy".into(),
            created_by: "ops".into(),
            ..NewSilence::default()
        };
        assert_eq!(ok.validate(now), Ok(()));
        let field = |s: NewSilence| s.validate(now).unwrap_err().field;
        assert_eq!(field(NewSilence { agent_id: None, ..ok.clone() }), "agent_id");
        assert_eq!(field(NewSilence { agent_id: Some("a b".into()), ..ok.clone() }), "agent_id");
        assert_eq!(field(NewSilence { issue_type: Some("down".into()), ..ok.clone() }), "issue_type");
        assert_eq!(field(NewSilence { ends_at: Some(now - Duration::hours(1)), ..ok.clone() }), "ends_at");
        assert_eq!(field(NewSilence { comment: " ".into(), ..ok.clone() }), "comment");
    }
}
