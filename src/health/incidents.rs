//! Incidents: one open episode per agent and issue type (the fleet's has no
//! agent). The evaluator states which incidents should be open; this module
//! works out what to open and resolve, and writes both with their
//! system_events rows and stream notifications in the caller's
//! transaction.
//!
//! Each opened incident also gets its alert (dedup key
//! `<agent or "fleet">:<issue type>`) in the same statement, and a resolved
//! incident resolves its alert: the alerts table is the transactional
//! outbox that alerting works from, so an incident can never exist without
//! its alert or the other way round.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::db::DbError;
use crate::model::Severity;

text_enum! {
    /// The issue types of the contract.
    pub enum IssueType {
        AgentUnresponsive = "agent_unresponsive",
        HeartbeatLate = "heartbeat_late",
        ExtendedOffline = "extended_offline",
        RestartLoop = "restart_loop",
        Flapping = "flapping",
        HighErrorRate = "high_error_rate",
        ResourceExhaustion = "resource_exhaustion",
        PerformanceDegradation = "performance_degradation",
        FleetOutage = "fleet_outage",
    }
}

impl IssueType {
    /// Issues of an agent gone quiet, fixed once it is heard from again.
    pub fn is_silence(self) -> bool {
        matches!(self, Self::AgentUnresponsive | Self::HeartbeatLate | Self::ExtendedOffline)
    }
}

/// Identity of an episode: agent (None for the fleet) and issue type.
pub type Key = (Option<String>, IssueType);

/// An incident that should be open.
#[derive(Debug, Clone, PartialEq)]
pub struct Wanted {
    pub severity: Severity,
    pub summary: String,
    pub details: Value,
    pub predicted: bool,
}

/// An incident that is open now.
#[derive(Debug, Clone, PartialEq)]
pub struct Open {
    pub id: i64,
    pub agent_id: Option<String>,
    pub issue: IssueType,
    pub predicted: bool,
    pub details: Value,
    pub opened_at: DateTime<Utc>,
}

impl Open {
    pub fn key(&self) -> Key {
        (self.agent_id.clone(), self.issue)
    }
}

/// What a reconciliation decided.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub open: Vec<(Key, Wanted)>,
    /// Ids to resolve, with the reason recorded.
    pub resolve: Vec<(i64, String)>,
}

/// Compares wanted and open incidents of the `managed` issue types. Open
/// incidents of other types are left alone; `keep` lists keys that must not
/// be opened or resolved this time (suppressed, or not re-evaluated).
pub fn reconcile(managed: &[IssueType], wanted: HashMap<Key, Wanted>, open: &[Open], hold_open: &HashSet<Key>) -> Plan {
    let mut plan = Plan::default();
    let open_keys: HashSet<Key> = open.iter().filter(|o| managed.contains(&o.issue)).map(Open::key).collect();
    for o in open.iter().filter(|o| managed.contains(&o.issue)) {
        let key = o.key();
        match wanted.get(&key) {
            // A real problem replaces its own prediction.
            Some(w) if o.predicted && !w.predicted => plan.resolve.push((o.id, "the predicted problem arrived".into())),
            Some(_) => {}
            None if hold_open.contains(&key) => {}
            None => plan.resolve.push((o.id, "condition cleared".into())),
        }
    }
    let resolving: HashSet<i64> = plan.resolve.iter().map(|(id, _)| *id).collect();
    let mut opens: Vec<(Key, Wanted)> = wanted
        .into_iter()
        .filter(|(key, _)| {
            !open_keys.contains(key) || open.iter().any(|o| o.key() == *key && resolving.contains(&o.id) && o.predicted)
        })
        .collect();
    opens.sort_by(|a, b| a.0.cmp(&b.0));
    plan.open = opens;
    plan
}

/// Open incidents of the given types.
pub async fn load_open(tx: &tokio_postgres::Transaction<'_>, types: &[IssueType]) -> Result<Vec<Open>, DbError> {
    let names: Vec<&str> = types.iter().map(|t| t.as_str()).collect();
    let rows = tx
        .query(
            "SELECT id, agent_id, issue_type, predicted, details, opened_at FROM warden.incidents \
             WHERE state = 'open' AND issue_type = ANY ($1)",
            &[&names],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            Some(Open {
                id: r.get(0),
                agent_id: r.get(1),
                issue: r.get::<_, String>(2).parse().ok()?,
                predicted: r.get(3),
                details: r.get(4),
                opened_at: r.get(5),
            })
        })
        .collect())
}

/// Writes a plan: resolutions first (so a prediction can be replaced by the
/// real thing in one cycle), then openings, each with a system_events row.
/// Returns stream notifications to send.
pub async fn apply(
    tx: &tokio_postgres::Transaction<'_>,
    plan: Plan,
    now: DateTime<Utc>,
) -> Result<Vec<Value>, DbError> {
    let mut notes = Vec::new();
    if !plan.resolve.is_empty() {
        let ids: Vec<i64> = plan.resolve.iter().map(|(id, _)| *id).collect();
        let reasons: Vec<&str> = plan.resolve.iter().map(|(_, r)| r.as_str()).collect();
        let rows = tx
            .query(
                "WITH r AS ( \
                   UPDATE warden.incidents i SET state = 'resolved', resolved_at = greatest($3, i.opened_at), \
                          resolution = u.reason \
                   FROM unnest($1::bigint[], $2::text[]) AS u(id, reason) \
                   WHERE i.id = u.id AND i.state = 'open' \
                   RETURNING i.id, i.agent_id, i.issue_type, i.severity, i.summary, i.resolution, i.opened_at), \
                 e AS ( \
                   INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details) \
                   SELECT $3, r.agent_id, 'incident_resolved', 'info', \
                          format('%s resolved: %s', r.issue_type, r.resolution), \
                          jsonb_build_object('incident_id', r.id, 'issue_type', r.issue_type, \
                                             'duration_seconds', extract(epoch FROM $3 - r.opened_at)) \
                   FROM r), \
                 a AS ( \
                   UPDATE warden.alerts al SET state = 'resolved', resolved_at = greatest($3, al.opened_at) \
                   FROM r WHERE al.incident_id = r.id AND al.state <> 'resolved') \
                 SELECT id, agent_id, issue_type, resolution FROM r",
                &[&ids, &reasons, &now],
            )
            .await?;
        for r in rows {
            notes.push(json!({
                "type": crate::stream::INCIDENT_RESOLVED,
                "id": r.get::<_, i64>(0),
                "agent_id": r.get::<_, Option<String>>(1),
                "issue_type": r.get::<_, String>(2),
                "resolution": r.get::<_, Option<String>>(3),
                "timestamp": now,
            }));
        }
    }
    if !plan.open.is_empty() {
        let n = plan.open.len();
        let mut agents = Vec::with_capacity(n);
        let mut issues = Vec::with_capacity(n);
        let mut severities = Vec::with_capacity(n);
        let mut summaries = Vec::with_capacity(n);
        let mut details = Vec::with_capacity(n);
        let mut predicted = Vec::with_capacity(n);
        for ((agent, issue), w) in &plan.open {
            agents.push(agent.as_deref());
            issues.push(issue.as_str());
            severities.push(w.severity.as_str());
            summaries.push(w.summary.as_str());
            details.push(&w.details);
            predicted.push(w.predicted);
        }
        let rows = tx
            .query(
                "WITH o AS ( \
                   INSERT INTO warden.incidents (agent_id, issue_type, severity, summary, details, predicted, opened_at) \
                   SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::bool[]) \
                          CROSS JOIN (SELECT $7::timestamptz) AS t \
                   ON CONFLICT ((coalesce(agent_id, '')), issue_type) WHERE state = 'open' DO NOTHING \
                   RETURNING id, agent_id, issue_type, severity, summary, predicted), \
                 e AS ( \
                   INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details) \
                   SELECT $7, o.agent_id, 'incident_opened', o.severity, o.summary, \
                          jsonb_build_object('incident_id', o.id, 'issue_type', o.issue_type, 'predicted', o.predicted) \
                   FROM o), \
                 a AS ( \
                   INSERT INTO warden.alerts (incident_id, dedup_key, severity, opened_at) \
                   SELECT o.id, coalesce(o.agent_id, 'fleet') || ':' || o.issue_type, o.severity, $7 FROM o \
                   ON CONFLICT (dedup_key) WHERE state <> 'resolved' DO NOTHING) \
                 SELECT id, agent_id, issue_type, severity, summary, predicted FROM o",
                &[&agents, &issues, &severities, &summaries, &details, &predicted, &now],
            )
            .await?;
        for r in rows {
            notes.push(json!({
                "type": crate::stream::INCIDENT_OPENED,
                "id": r.get::<_, i64>(0),
                "agent_id": r.get::<_, Option<String>>(1),
                "issue_type": r.get::<_, String>(2),
                "severity": r.get::<_, String>(3),
                "summary": r.get::<_, Option<String>>(4),
                "predicted": r.get::<_, bool>(5),
                "timestamp": now,
            }));
        }
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(predicted: bool) -> Wanted {
        Wanted { severity: Severity::Warning, summary: "s".into(), details: json!({}), predicted }
    }

    fn open(id: i64, agent: &str, issue: IssueType, predicted: bool) -> Open {
        Open { id, agent_id: Some(agent.into()), issue, predicted, details: json!({}), opened_at: DateTime::UNIX_EPOCH }
    }

    const MANAGED: &[IssueType] = &[IssueType::AgentUnresponsive, IssueType::ResourceExhaustion];

    #[test]
    fn wanted_and_not_open_opens_open_and_not_wanted_resolves() {
        let w: HashMap<Key, Wanted> = [((Some("a".into()), IssueType::AgentUnresponsive), wanted(false))].into();
        let o = vec![open(7, "b", IssueType::AgentUnresponsive, false)];
        let plan = reconcile(MANAGED, w, &o, &HashSet::new());
        assert_eq!(plan.open.len(), 1);
        assert_eq!(plan.open[0].0, (Some("a".into()), IssueType::AgentUnresponsive));
        assert_eq!(plan.resolve, vec![(7, "condition cleared".into())]);
    }

    #[test]
    fn an_open_incident_still_wanted_is_left_alone() {
        let w: HashMap<Key, Wanted> = [((Some("a".into()), IssueType::AgentUnresponsive), wanted(false))].into();
        let o = vec![open(7, "a", IssueType::AgentUnresponsive, false)];
        assert_eq!(reconcile(MANAGED, w, &o, &HashSet::new()), Plan::default());
    }

    #[test]
    fn unmanaged_types_and_held_keys_are_not_touched() {
        let o = vec![open(1, "a", IssueType::Flapping, false), open(2, "b", IssueType::AgentUnresponsive, false)];
        let hold: HashSet<Key> = [(Some("b".into()), IssueType::AgentUnresponsive)].into();
        assert_eq!(reconcile(MANAGED, HashMap::new(), &o, &hold), Plan::default());
    }

    #[test]
    fn a_real_problem_replaces_its_prediction() {
        let w: HashMap<Key, Wanted> = [((Some("a".into()), IssueType::ResourceExhaustion), wanted(false))].into();
        let o = vec![open(3, "a", IssueType::ResourceExhaustion, true)];
        let plan = reconcile(MANAGED, w, &o, &HashSet::new());
        assert_eq!(plan.resolve.len(), 1);
        assert_eq!(plan.open.len(), 1);
        assert!(!plan.open[0].1.predicted);
    }
}
