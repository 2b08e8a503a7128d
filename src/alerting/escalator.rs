//! The escalator: one replica at a time, every `evaluate_interval`, turns
//! active alerts into deliveries.
//!
//! A cycle is one transaction that first takes a transaction-scoped
//! advisory lock (replicas that do not get it skip the cycle), then locks
//! the active alerts it reads (`FOR NO KEY UPDATE SKIP LOCKED`, so an alert
//! being resolved or acknowledged at that instant is simply left for the
//! next cycle). For each alert it gathers the facts — route and policy,
//! suppression (silence, maintenance window, dependency down, fleet
//! outage), automated recovery, channels notified so far — and asks
//! [`escalation::decide`]. Ready alerts join their route's group
//! ([`grouping`]); groups due to flush send their first messages. Every
//! notification is first inserted into the `alert_notifications` ledger,
//! whose primary key (alert, channel, kind, level, sequence) makes it
//! happen once; only the rows actually inserted become deliveries, one
//! per message and channel.
//!
//! The cycle also watches channel health: a channel with
//! `channel_failure_threshold` failed sends in a row gets its own alert,
//! sent through every other channel, and resolved by its next success.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::Pool;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::escalation::{self, AlertState, Decision, Facts, Kind, Note, Notice, Recovery, Timing};
use super::grouping;
use super::routing::{CHANNEL_ROUTE, Policy, Router, Subject};
use super::silences::{self, maintenance_covers};
use crate::config::{AlertingSettings, MaintenanceWindow};
use crate::db::{self, DbError};
use crate::model::Severity;
use crate::telemetry::Throttle;

/// Advisory lock key of the escalator ("warden:a").
pub const ESCALATOR_LOCK: i64 = 0x7761_7264_656e_3a61;

/// How long past its flush time a group waits for a member locked at
/// that instant.
const LOCKED_MEMBER_WAIT: Duration = Duration::seconds(10);

/// Issue types a fleet outage stands in for.
pub const FLEET_COVERED: &[&str] = &["agent_unresponsive", "heartbeat_late", "extended_offline"];

/// Everything a cycle's decisions depend on, from `[alerting]`.
#[derive(Debug, Clone)]
pub struct EscalatorParams {
    pub timing: Timing,
    pub router: Router,
    pub maintenance: Vec<MaintenanceWindow>,
    pub fleet_outage_lookback: Duration,
    pub depends_on_label: String,
    pub channel_failure_threshold: i32,
    pub interval: std::time::Duration,
}

impl EscalatorParams {
    pub fn from_settings(s: &AlertingSettings) -> Self {
        Self {
            timing: Timing {
                group_wait: s.group_wait.to_chrono(),
                group_interval: s.group_interval.to_chrono(),
                repeat_interval: s.repeat_interval.to_chrono(),
                hold_during_recovery: s.hold_during_recovery.to_chrono(),
            },
            router: Router::from_settings(s),
            maintenance: s.maintenance.clone(),
            fleet_outage_lookback: s.fleet_outage_lookback.to_chrono(),
            depends_on_label: s.depends_on_label.trim().to_string(),
            channel_failure_threshold: i32::try_from(s.channel_failure_threshold).unwrap_or(i32::MAX),
            interval: s.evaluate_interval.get(),
        }
    }
}

/// What one cycle did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CycleReport {
    /// Another replica held the escalator lock.
    pub skipped: bool,
    pub alerts: usize,
    /// Notifications (alert × channel) created.
    pub notifications: usize,
    /// Deliveries (messages) created.
    pub deliveries: usize,
    pub groups_flushed: usize,
    pub closed: usize,
    pub held: usize,
    pub suppressed: usize,
    pub channel_alerts_opened: usize,
    pub channel_alerts_resolved: usize,
}

/// An active alert as read, and what the cycle makes of it.
#[derive(Debug, Clone)]
struct Row {
    id: i64,
    incident_id: Option<i64>,
    severity: Severity,
    state: AlertState,
    opened_at: DateTime<Utc>,
    paged_at: Option<DateTime<Utc>>,
    levels_done: u32,
    repeats: u32,
    last_repeat_at: Option<DateTime<Utc>>,
    route: Option<String>,
    policy: Option<String>,
    group_id: Option<i64>,
    recovery_failed_at: Option<DateTime<Utc>>,
    source: String,
    subject: Option<String>,
    issue: String,
    labels: Option<Value>,
    suppressed_reason: Option<String>,
    held_until: Option<DateTime<Utc>>,
    next_escalation_at: Option<DateTime<Utc>>,
    /// Sent, and resolved only because its problem changed form (late
    /// became offline): its all-clear waits for the agent to be back, and
    /// is dated then.
    all_clear_held: bool,
    /// Held, and the agent still offline or degraded or with another
    /// late, offline or extended-offline alert active.
    problem_goes_on: bool,
    /// The fleet outage during which its incident opened for an agent
    /// that failed on its own (the evaluator's `details.outside_fleet_outage`).
    outside_fleet_outage: Option<i64>,
}

/// The escalator-owned columns of one alert after the cycle.
#[derive(Debug, Clone, PartialEq)]
struct Update {
    severity: Severity,
    route: Option<String>,
    policy: Option<String>,
    group_id: Option<i64>,
    paged_at: Option<DateTime<Utc>>,
    levels_done: u32,
    repeats: u32,
    last_repeat_at: Option<DateTime<Utc>>,
    suppressed_reason: Option<String>,
    held_until: Option<DateTime<Utc>>,
    next_escalation_at: Option<DateTime<Utc>>,
    recovery_failed_at: Option<DateTime<Utc>>,
    closed: bool,
}

impl Row {
    fn current(&self) -> Update {
        Update {
            severity: self.severity,
            route: self.route.clone(),
            policy: self.policy.clone(),
            group_id: self.group_id,
            paged_at: self.paged_at,
            levels_done: self.levels_done,
            repeats: self.repeats,
            last_repeat_at: self.last_repeat_at,
            suppressed_reason: self.suppressed_reason.clone(),
            held_until: self.held_until,
            next_escalation_at: self.next_escalation_at,
            recovery_failed_at: self.recovery_failed_at,
            closed: false,
        }
    }
}

/// A notification to create: one alert, one notice (several channels).
struct Pending {
    alert_id: i64,
    notice: Notice,
    route: String,
    /// Notifications with equal batch keys and channel share one message.
    batch: String,
}

/// Runs cycles every `evaluate_interval` until `stop`.
pub async fn run(pool: Pool, params: EscalatorParams, stop: CancellationToken) {
    let mut every = crate::every::Every::new(params.interval, &stop);
    while every.tick().await {
        let result = async {
            let mut client = db::client(&pool).await?;
            cycle(&mut client, &params, None).await
        }
        .await;
        match result {
            Ok(r) if r.deliveries + r.closed + r.channel_alerts_opened + r.channel_alerts_resolved > 0 => {
                tracing::info!(
                    deliveries = r.deliveries,
                    notifications = r.notifications,
                    closed = r.closed,
                    held = r.held,
                    suppressed = r.suppressed,
                    "escalation cycle"
                );
            }
            Ok(_) => {}
            Err(e) => {
                // Every cycle meets the same while the database is gone.
                static LOG: Throttle = Throttle::new(std::time::Duration::from_secs(30));
                if let Some(more) = LOG.allow() {
                    tracing::warn!(error = %e, more, "escalation cycle failed; will retry");
                }
            }
        }
    }
}

/// One cycle at `now` (the database's clock when `None`).
#[tracing::instrument(skip_all)]
pub async fn cycle(
    client: &mut tokio_postgres::Client,
    p: &EscalatorParams,
    now: Option<DateTime<Utc>>,
) -> Result<CycleReport, DbError> {
    let tx = client.transaction().await?;
    let mut report = CycleReport::default();
    let locked: bool = tx.query_one("SELECT pg_try_advisory_xact_lock($1)", &[&ESCALATOR_LOCK]).await?.get(0);
    if !locked {
        report.skipped = true;
        return Ok(report);
    }
    let now: DateTime<Utc> = match now {
        Some(n) => n,
        None => tx.query_one("SELECT now()", &[]).await?.get(0),
    };

    // Incident alerts carry their agent, issue and summary from here on.
    tx.execute(
        "UPDATE warden.alerts a SET subject = i.agent_id, issue = i.issue_type, summary = i.summary \
         FROM warden.incidents i WHERE a.incident_id = i.id AND a.issue IS NULL AND NOT a.closed",
        &[],
    )
    .await?;
    channel_health(&tx, p, now, &mut report).await?;
    // Groups due with no alert in them any more (their alerts resolved or
    // were acknowledged before the group went out) go, whether or not any
    // alert is active now: one left behind would be joined by the route's
    // next alert and flushed at once, hours overdue, its levels counted
    // from then. An alert another cycle still names keeps its group.
    tx.execute(
        "DELETE FROM warden.alert_groups g WHERE NOT g.flushed AND g.flush_at <= $1 \
           AND NOT EXISTS (SELECT 1 FROM warden.alerts a WHERE a.group_id = g.id)",
        &[&now],
    )
    .await?;

    let rows = load_alerts(&tx).await?;
    report.alerts = rows.len();
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(report);
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let recovery = recovery_facts(&tx, &rows).await?;
    let notified = notified_channels(&tx, &ids, now).await?;
    let silences = silences::active(&tx, now).await?;
    let fleet: Option<(i64, DateTime<Utc>)> = tx
        .query_opt(
            "SELECT id, opened_at FROM warden.incidents WHERE issue_type = 'fleet_outage' AND state = 'open' \
             ORDER BY opened_at LIMIT 1",
            &[],
        )
        .await?
        .map(|r| (r.get(0), r.get(1)));
    let unpaged_agents: Vec<String> = rows
        .iter()
        .filter(|r| r.paged_at.is_none() && r.source == "incident")
        .filter_map(|r| r.subject.clone())
        .collect();
    let down_deps = dependencies_down(&tx, &unpaged_agents, &p.depends_on_label).await?;

    let mut updates: BTreeMap<i64, Update> = BTreeMap::new();
    let mut pending: Vec<Pending> = Vec::new();
    let mut ready: Vec<(usize, Policy, String)> = Vec::new();
    let mut facts_of: HashMap<i64, Facts> = HashMap::new();

    for (index, row) in rows.iter().enumerate() {
        if row.problem_goes_on {
            // "Resolved" now would tell people a problem is over that has
            // only turned into another; it goes out once the agent is back,
            // in the same cycle as the resolution of what it became.
            continue;
        }
        let mut update = row.current();
        let gave_up = row.incident_id.and_then(|i| recovery.get(&i)).is_some_and(|r| r.gave_up);
        // Acted on when recovery_failed_at is no earlier than the latest
        // give-up: one after `warden recovery reset` pages again.
        let gave_up_at = row.incident_id.and_then(|i| recovery.get(&i)).and_then(|r| r.gave_up_at);
        let (route, policy) = match resolve_policy(p, row, gave_up) {
            Some((route, policy)) => (Some(route), Some(policy)),
            None => (None, None),
        };
        let suppressed = suppression(p, row, route.is_some(), &silences, fleet, &down_deps, now)
            .filter(|_| row.state != AlertState::Resolved || row.paged_at.is_none());
        let facts = Facts {
            state: row.state,
            opened_at: row.opened_at,
            paged_at: row.paged_at,
            levels_done: row.levels_done,
            repeats_done: row.repeats,
            last_repeat_at: row.last_repeat_at,
            suppressed: suppressed.clone(),
            recovery: row.incident_id.and_then(|i| recovery.get(&i).copied()).unwrap_or_default(),
            gave_up_handled: row.recovery_failed_at.is_some_and(|at| gave_up_at.is_none_or(|g| at >= g)),
            notified: notified.get(&row.id).cloned().unwrap_or_default(),
        };
        update.suppressed_reason =
            if row.state == AlertState::Resolved { row.suppressed_reason.clone() } else { suppressed };
        let empty = Policy { name: String::new(), levels: Vec::new() };
        let decision = escalation::decide(&facts, policy.as_ref().unwrap_or(&empty), &p.timing, now);
        update.held_until = None;
        match decision {
            Decision::Wait { next, held_until } => {
                update.next_escalation_at = next;
                update.held_until = held_until;
                if held_until.is_some() {
                    report.held += 1;
                }
                if update.suppressed_reason.is_some() {
                    report.suppressed += 1;
                }
            }
            Decision::Ready { urgent } => {
                let (Some(route), Some(policy)) = (route, policy) else { continue };
                if facts.recovery.gave_up && !facts.gave_up_handled {
                    update.recovery_failed_at = Some(handled_at(now, gave_up_at));
                    update.severity = update.severity.max(Severity::Critical);
                }
                // A failing channel's alert does not wait for company.
                if urgent || row.source == "channel" {
                    // Straight out, in a message of its own.
                    update.paged_at = Some(now);
                    update.group_id = None;
                    update.route = Some(route.clone());
                    update.policy = Some(policy.name.clone());
                    let facts = Facts { paged_at: Some(now), ..facts.clone() };
                    let first = pending.len();
                    page(&facts, &policy, p, row.id, &route, now, &mut update, &mut pending, true);
                    // Paged after recovery gave up: the page says so (and
                    // stands for the update an earlier page would get).
                    if facts.recovery.gave_up {
                        for n in &mut pending[first..] {
                            n.notice.note.get_or_insert(Note::RecoveryFailed);
                        }
                    }
                } else {
                    ready.push((index, policy, route));
                }
            }
            Decision::Notify { notices, levels_done, repeats_done, repeated_at, next } => {
                let route = row.route.clone().or(route).unwrap_or_default();
                update.levels_done = levels_done;
                update.last_repeat_at = repeated_at.or(update.last_repeat_at);
                update.repeats = repeats_done;
                update.next_escalation_at = next;
                for notice in notices {
                    if notice.note == Some(Note::RecoveryFailed) {
                        update.recovery_failed_at = Some(handled_at(now, gave_up_at));
                        update.severity = update.severity.max(Severity::Critical);
                    }
                    let batch = batch_key(row, &route, &notice);
                    pending.push(Pending { alert_id: row.id, notice, route: route.clone(), batch });
                }
            }
            Decision::Close(notices) => {
                let route = row.route.clone().or(route).unwrap_or_default();
                update.closed = true;
                update.group_id = None;
                update.next_escalation_at = None;
                report.closed += 1;
                for notice in notices {
                    let batch = batch_key(row, &route, &notice);
                    pending.push(Pending { alert_id: row.id, notice, route: route.clone(), batch });
                }
            }
        }
        facts_of.insert(row.id, facts);
        updates.insert(row.id, update);
    }

    // Groups: ready alerts join their route's pending group; due groups
    // flush, sending the first message of every member still ready.
    let mut groups: HashMap<String, (i64, DateTime<Utc>)> = HashMap::new();
    for r in tx.query("SELECT id, route, flush_at FROM warden.alert_groups WHERE NOT flushed FOR UPDATE", &[]).await? {
        groups.insert(r.get(1), (r.get(0), r.get(2)));
    }
    let last_flush: HashMap<String, DateTime<Utc>> = tx
        .query("SELECT route, max(flush_at) FROM warden.alert_groups WHERE flushed GROUP BY route", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut members: HashMap<i64, Vec<(usize, Policy, String)>> = HashMap::new();
    for (index, policy, route) in ready {
        let row = &rows[index];
        let group = match groups.get(&route) {
            Some((id, _)) => *id,
            None => {
                let flush = grouping::flush_time(now, last_flush.get(&route).copied(), &p.timing);
                let id: i64 = tx
                    .query_one(
                        "INSERT INTO warden.alert_groups (route, opened_at, flush_at) VALUES ($1, $2, $3) RETURNING id",
                        &[&route, &now, &flush],
                    )
                    .await?
                    .get(0);
                groups.insert(route.clone(), (id, flush));
                id
            }
        };
        if let Some(u) = updates.get_mut(&row.id) {
            u.group_id = Some(group);
            u.route = Some(route.clone());
            u.policy = Some(policy.name.clone());
        }
        members.entry(group).or_default().push((index, policy, route));
    }
    // A due group with a member this cycle could not lock (being
    // acknowledged or resolved at that instant) waits a little for it:
    // flushed now, the group would leave that member to the route's next
    // group, group_interval later.
    let due_groups: Vec<i64> =
        groups.values().filter(|(_, at)| *at <= now && *at > now - LOCKED_MEMBER_WAIT).map(|(id, _)| *id).collect();
    let held_back: HashSet<i64> = if due_groups.is_empty() {
        HashSet::new()
    } else {
        tx.query(
            "SELECT DISTINCT group_id FROM warden.alerts \
             WHERE group_id = ANY ($1) AND NOT closed AND NOT (id = ANY ($2))",
            &[&due_groups, &ids],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    // Due groups that no alert went out with (all were held, resolved or
    // acknowledged meanwhile): no flush, so the route's next group waits
    // group_wait alone, not group_interval after a message never sent.
    let mut empty = Vec::new();
    for (route, (group, flush_at)) in &groups {
        if *flush_at > now || held_back.contains(group) {
            continue;
        }
        let due = members.remove(group).unwrap_or_default();
        if due.is_empty() {
            empty.push(*group);
            continue;
        }
        // Paged at the group's time, so escalations keep their schedule
        // whatever the cycle's jitter; a group flushed long after it (no
        // cycle ran meanwhile: warden was down) pages now, and its
        // escalations count from now.
        let slack = Duration::from_std(p.interval).unwrap_or_default() + LOCKED_MEMBER_WAIT;
        let paged_at = (*flush_at).max(now - slack);
        for (index, policy, _) in due {
            let row = &rows[index];
            let (Some(update), Some(facts)) = (updates.get_mut(&row.id), facts_of.get(&row.id)) else { continue };
            update.paged_at = Some(paged_at);
            update.group_id = None;
            let facts = Facts { paged_at: Some(paged_at), ..facts.clone() };
            page(&facts, &policy, p, row.id, route, now, update, &mut pending, false);
        }
        tx.execute("UPDATE warden.alert_groups SET flushed = true WHERE id = $1", &[group]).await?;
        report.groups_flushed += 1;
    }
    // Alerts left in a group they can no longer go out with (flushed, or
    // no longer ready) wait for the next one.
    let pending_groups: HashSet<i64> =
        groups.values().filter(|(id, at)| *at > now || held_back.contains(id)).map(|(id, _)| *id).collect();
    let waiting: HashSet<i64> = members.values().flatten().map(|(i, _, _)| rows[*i].id).collect();
    for (id, update) in updates.iter_mut() {
        if let Some(g) = update.group_id
            && (!pending_groups.contains(&g) || !waiting.contains(id))
        {
            update.group_id = None;
        }
    }

    // Nothing more for a channel removed from the settings (alerts reach
    // it only through `notified`): a resolution or update queued for it
    // would wait out max_delivery_age unsent.
    let configured = p.router.channels();
    for n in &mut pending {
        n.notice.channels.retain(|c| configured.contains(c));
    }
    let (notifications, deliveries) = write_notifications(&tx, &pending, now).await?;
    report.notifications = notifications;
    report.deliveries = deliveries;
    write_updates(&tx, &rows, &updates).await?;
    // The all-clears held back until the agent was back say when that was,
    // not when the problem changed form.
    let released: Vec<i64> = rows
        .iter()
        .filter(|r| r.all_clear_held && updates.get(&r.id).is_some_and(|u| u.closed))
        .map(|r| r.id)
        .collect();
    if !released.is_empty() {
        tx.execute(
            "UPDATE warden.alerts SET resolved_at = greatest($2, opened_at) WHERE id = ANY ($1)",
            &[&released, &now],
        )
        .await?;
    }
    if !empty.is_empty() {
        // After the updates, which took this cycle's alerts out of them;
        // a group an alert of another cycle still names (one locked now)
        // is closed as flushed instead, as before.
        tx.execute(
            "DELETE FROM warden.alert_groups g WHERE g.id = ANY ($1) \
               AND NOT EXISTS (SELECT 1 FROM warden.alerts a WHERE a.group_id = g.id)",
            &[&empty],
        )
        .await?;
        tx.execute("UPDATE warden.alert_groups SET flushed = true WHERE id = ANY ($1)", &[&empty]).await?;
    }
    tx.commit().await?;
    Ok(report)
}

/// Emits the first messages of an alert that is paged now.
#[allow(clippy::too_many_arguments)]
fn page(
    facts: &Facts,
    policy: &Policy,
    p: &EscalatorParams,
    alert_id: i64,
    route: &str,
    now: DateTime<Utc>,
    update: &mut Update,
    pending: &mut Vec<Pending>,
    urgent: bool,
) {
    if let Decision::Notify { notices, levels_done, repeats_done, repeated_at, next } =
        escalation::decide(facts, policy, &p.timing, now)
    {
        update.levels_done = levels_done;
        update.last_repeat_at = repeated_at.or(update.last_repeat_at);
        update.repeats = repeats_done;
        update.next_escalation_at = next;
        for notice in notices {
            let batch = if urgent {
                format!("alert:{alert_id}:{}:{}", notice.kind, notice.level)
            } else {
                format!(
                    "group:{route}:{}:{}:{}:{}",
                    facts.paged_at.map(|t| t.timestamp_micros()).unwrap_or_default(),
                    notice.kind,
                    notice.level,
                    notice.sequence
                )
            };
            pending.push(Pending { alert_id, notice, route: route.to_string(), batch });
        }
    } else {
        update.next_escalation_at =
            facts.paged_at.map(|t| t + policy.levels.first().map(|l| l.after).unwrap_or_default());
    }
}

/// Notifications with equal keys (and channel) go out as one message:
/// alerts paged together escalate and repeat together; resolutions of one
/// route in one cycle go together; notes and channel alerts go alone.
fn batch_key(row: &Row, route: &str, n: &Notice) -> String {
    if n.note.is_some() || row.source == "channel" {
        return format!("alert:{}:{}:{}:{}", row.id, n.kind, n.level, n.sequence);
    }
    match n.kind {
        Kind::Resolved => format!("resolved:{route}"),
        _ => format!(
            "group:{route}:{}:{}:{}:{}",
            row.paged_at.map(|t| t.timestamp_micros()).unwrap_or_default(),
            n.kind,
            n.level,
            n.sequence
        ),
    }
}

/// The route and policy of an alert: kept once it has been paged, else
/// chosen now. An alert whose recovery gave up is routed as critical (the
/// severity it is raised to when paged), so the page reaches whoever
/// critical alerts reach even when no route takes its own severity.
fn resolve_policy(p: &EscalatorParams, row: &Row, recovery_gave_up: bool) -> Option<(String, Policy)> {
    if row.source == "channel" {
        let failing = row.subject.as_deref().unwrap_or_default();
        return Some((CHANNEL_ROUTE.to_string(), Policy::for_failing_channel(failing, p.router.channels())));
    }
    if let (Some(route), Some(name)) = (&row.route, &row.policy)
        && row.paged_at.is_some()
        && let Some(policy) = p.router.policy(name)
    {
        return Some((route.clone(), policy.clone()));
    }
    let severity = if recovery_gave_up { row.severity.max(Severity::Critical) } else { row.severity };
    let subject = Subject { severity, issue: &row.issue, labels: row.labels.as_ref() };
    p.router.route(subject).map(|(route, policy)| (route.to_string(), policy.clone()))
}

/// Why nothing may be sent about `row` now, if anything. Dependencies and
/// fleet outages hold back only alerts not sent yet ("new" alerts);
/// silences and maintenance windows pause everything while they last.
fn suppression(
    p: &EscalatorParams,
    row: &Row,
    routed: bool,
    silences: &[silences::Silence],
    fleet: Option<(i64, DateTime<Utc>)>,
    down_deps: &HashMap<String, String>,
    now: DateTime<Utc>,
) -> Option<String> {
    let agent = row.subject.as_deref().filter(|_| row.source == "incident");
    if row.source == "incident" && row.paged_at.is_none() {
        // The outage covers the agents that went down with it, not one the
        // evaluator found failing on its own while it was open.
        if let (Some((fleet_id, fleet_opened)), Some(_)) = (fleet, agent)
            && FLEET_COVERED.contains(&row.issue.as_str())
            && row.opened_at >= fleet_opened - p.fleet_outage_lookback
            && row.outside_fleet_outage != Some(fleet_id)
        {
            return Some(format!("fleet_outage:{fleet_id}"));
        }
        if let Some(dep) = agent.and_then(|a| down_deps.get(a)) {
            return Some(format!("dependency:{dep}"));
        }
    }
    if row.source == "incident" {
        if let Some(s) = silences.iter().find(|s| s.matches(agent, &row.issue, row.labels.as_ref())) {
            return Some(format!("silence:{}", s.id));
        }
        if let Some(w) =
            p.maintenance.iter().find(|w| maintenance_covers(w, agent, &row.issue, row.labels.as_ref(), now))
        {
            return Some(format!("maintenance:{}", w.name));
        }
    }
    (!routed).then(|| "no_route".to_string())
}

async fn load_alerts(tx: &tokio_postgres::Transaction<'_>) -> Result<Vec<Row>, DbError> {
    let rows = tx
        .query(
            "SELECT a.id, a.incident_id, a.severity, a.state, a.opened_at, a.paged_at, a.escalation_level, a.repeats, \
                    a.route, a.policy, a.group_id, a.recovery_failed_at, a.source, a.subject, \
                    coalesce(a.issue, 'unknown'), s.labels, a.suppressed_reason, a.held_until, a.next_escalation_at, \
                    h.held, CASE WHEN jsonb_typeof(i.details -> 'outside_fleet_outage') = 'number' \
                                 THEN (i.details ->> 'outside_fleet_outage')::bigint END, \
                    h.held AND (s.liveness IN ('offline', 'degraded') \
                                OR EXISTS (SELECT 1 FROM warden.alerts b \
                                           WHERE NOT b.closed AND b.state <> 'resolved' AND b.source = 'incident' \
                                             AND b.subject = a.subject AND b.id <> a.id AND b.issue = ANY ($1))), \
                    a.last_repeat_at \
             FROM warden.alerts a \
             LEFT JOIN warden.agent_status s ON a.source = 'incident' AND s.agent_id = a.subject \
             LEFT JOIN warden.incidents i ON i.id = a.incident_id \
             CROSS JOIN LATERAL (SELECT coalesce(a.state = 'resolved' AND a.paged_at IS NOT NULL \
                                                 AND i.resolution LIKE 'superseded:%', false) AS held) h \
             WHERE NOT a.closed \
             ORDER BY a.id \
             FOR NO KEY UPDATE OF a SKIP LOCKED",
            &[&FLEET_COVERED],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            Some(Row {
                id: r.get(0),
                incident_id: r.get(1),
                severity: r.get::<_, String>(2).parse().ok()?,
                state: r.get::<_, String>(3).parse().ok()?,
                opened_at: r.get(4),
                paged_at: r.get(5),
                levels_done: r.get::<_, i32>(6).max(0) as u32,
                repeats: r.get::<_, i32>(7).max(0) as u32,
                route: r.get(8),
                policy: r.get(9),
                group_id: r.get(10),
                recovery_failed_at: r.get(11),
                source: r.get(12),
                subject: r.get(13),
                issue: r.get(14),
                labels: r.get(15),
                suppressed_reason: r.get(16),
                held_until: r.get(17),
                next_escalation_at: r.get(18),
                all_clear_held: r.get::<_, Option<bool>>(19).unwrap_or(false),
                outside_fleet_outage: r.get(20),
                problem_goes_on: r.get::<_, Option<bool>>(21).unwrap_or(false),
                last_repeat_at: r.get(22),
            })
        })
        .collect())
}

/// When an alert's giving up counts as acted on: now, or the give-up's own
/// time if that is later (another replica's clock, or an event stamped
/// after this cycle's transaction began), so that the same give-up is not
/// taken for a new one next cycle.
fn handled_at(now: DateTime<Utc>, gave_up_at: Option<DateTime<Utc>>) -> DateTime<Utc> {
    gave_up_at.map_or(now, |g| g.max(now))
}

/// Recovery facts per incident: under way, succeeded (which attempt),
/// given up (`recovery_failed` events naming the incident: how many, the
/// latest when).
async fn recovery_facts(tx: &tokio_postgres::Transaction<'_>, rows: &[Row]) -> Result<HashMap<i64, Recovery>, DbError> {
    let incidents: Vec<i64> = rows.iter().filter_map(|r| r.incident_id).collect();
    let mut out: HashMap<i64, Recovery> = HashMap::new();
    if incidents.is_empty() {
        return Ok(out);
    }
    for r in tx
        .query(
            "SELECT incident_id, bool_or(state IN ('pending', 'running', 'verifying')), \
                    max(attempt) FILTER (WHERE state = 'succeeded') \
             FROM warden.recovery_actions WHERE incident_id = ANY($1) GROUP BY incident_id",
            &[&incidents],
        )
        .await?
    {
        let e = out.entry(r.get(0)).or_default();
        e.under_way = r.get(1);
        e.succeeded_attempt = r.get(2);
    }
    // A job waiting its turn (another recovery of the agent is under way)
    // or its next attempt is under way too, though it has no action yet.
    for r in tx
        .query(
            "SELECT DISTINCT incident_id FROM warden.recovery_jobs \
             WHERE incident_id = ANY($1) AND state IN ('pending', 'running', 'verifying')",
            &[&incidents],
        )
        .await?
    {
        out.entry(r.get(0)).or_default().under_way = true;
    }
    let texts: Vec<String> = incidents.iter().map(i64::to_string).collect();
    let oldest = rows.iter().map(|r| r.opened_at).min().unwrap_or_else(Utc::now) - Duration::hours(1);
    for r in tx
        .query(
            concat!(
                "SELECT (e.details->>'incident_id')::bigint, count(*)::integer, max(e.occurred_at) \
                 FROM warden.system_events e \
                 WHERE e.occurred_at >= $2 AND e.details->>'incident_id' = ANY($1) AND ",
                gave_up_event!(),
                " GROUP BY 1"
            ),
            &[&texts, &oldest],
        )
        .await?
    {
        let e = out.entry(r.get(0)).or_default();
        e.gave_up = true;
        e.give_ups = r.get::<_, i32>(1).max(1) as u32;
        e.gave_up_at = r.get(2);
    }
    Ok(out)
}

/// Channels each alert got a firing, escalation or repeat message on, or
/// will: a pending firing message (a resolution waits for it), or one
/// being sent now. Any message that reached some of the channel's
/// recipients (`detail.reached`) counts, whatever became of it. Not a
/// channel whose messages were all cancelled or given up before reaching
/// anyone, nor one whose only message is an escalation or repeat still
/// waiting (the dispatcher drops those once their alert stops firing):
/// there a resolution would close what nobody saw open.
async fn notified_channels(
    tx: &tokio_postgres::Transaction<'_>,
    ids: &[i64],
    now: DateTime<Utc>,
) -> Result<HashMap<i64, Vec<String>>, DbError> {
    let rows = tx
        .query(
            "SELECT n.alert_id, array_agg(DISTINCT n.channel ORDER BY n.channel) \
             FROM warden.alert_notifications n \
             LEFT JOIN warden.alert_deliveries d ON d.id = n.delivery_id \
             WHERE n.alert_id = ANY($1) AND n.kind <> 'resolved' \
               AND (d.state IS NULL OR d.state = 'sent' OR d.detail ? 'reached' \
                    OR (d.state = 'pending' AND (n.kind = 'firing' OR d.claimed_until > $2))) \
             GROUP BY n.alert_id",
            &[&ids, &now],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// For each of `agents` with a dependency (direct or transitive, through
/// the `depends_on` label) that is offline now: the nearest such one.
/// Agents that depend on each other (a path leads from the dependency back
/// to the agent) do not suppress each other: neither can be told to be
/// the cause, and suppressing both would page nobody. Whether one reaches
/// the other is a set of nodes (`back`, UNION), not the paths `dep` walks:
/// a path that must pass a shared node twice is a cycle all the same.
async fn dependencies_down(
    tx: &tokio_postgres::Transaction<'_>,
    agents: &[String],
    label: &str,
) -> Result<HashMap<String, String>, DbError> {
    if agents.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = tx
        .query(
            "WITH RECURSIVE dep(agent_id, dep_id, depth, path) AS ( \
               SELECT s.agent_id, btrim(d)::text COLLATE \"C\", 1, ARRAY[s.agent_id::text] \
               FROM warden.agent_status s \
               CROSS JOIN LATERAL unnest(string_to_array(s.labels ->> $2, ',')) AS d \
               WHERE s.agent_id = ANY($1) AND btrim(d) <> '' \
               UNION ALL \
               SELECT dep.agent_id, btrim(d)::text COLLATE \"C\", dep.depth + 1, dep.path || dep.dep_id::text \
               FROM dep \
               JOIN warden.agent_status s ON s.agent_id = dep.dep_id \
               CROSS JOIN LATERAL unnest(string_to_array(s.labels ->> $2, ',')) AS d \
               WHERE dep.depth < 16 AND btrim(d) <> '' AND NOT (dep.dep_id::text = ANY(dep.path))), \
             down AS ( \
               SELECT dep.agent_id, dep.dep_id, dep.depth \
               FROM dep JOIN warden.agent_status s ON s.agent_id = dep.dep_id \
               WHERE s.liveness = 'offline' AND dep.dep_id <> dep.agent_id), \
             back(src, node) AS ( \
               SELECT d.dep_id, btrim(x)::text COLLATE \"C\" \
               FROM (SELECT DISTINCT dep_id FROM down) d \
               JOIN warden.agent_status s ON s.agent_id = d.dep_id \
               CROSS JOIN LATERAL unnest(string_to_array(s.labels ->> $2, ',')) AS x \
               WHERE btrim(x) <> '' \
               UNION \
               SELECT back.src, btrim(x)::text COLLATE \"C\" \
               FROM back \
               JOIN warden.agent_status s ON s.agent_id = back.node \
               CROSS JOIN LATERAL unnest(string_to_array(s.labels ->> $2, ',')) AS x \
               WHERE btrim(x) <> '') \
             SELECT DISTINCT ON (dep.agent_id) dep.agent_id, dep.dep_id \
             FROM down dep \
             WHERE NOT EXISTS (SELECT 1 FROM back WHERE back.src = dep.dep_id AND back.node = dep.agent_id) \
             ORDER BY dep.agent_id, dep.depth, dep.dep_id",
            &[&agents, &label],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Opens an alert for every channel failing `channel_failure_threshold`
/// times in a row, and resolves it at the channel's next success.
async fn channel_health(
    tx: &tokio_postgres::Transaction<'_>,
    p: &EscalatorParams,
    now: DateTime<Utc>,
    report: &mut CycleReport,
) -> Result<(), DbError> {
    let configured: Vec<&str> = p.router.channels().iter().map(String::as_str).collect();
    let opened = tx
        .query(
            "INSERT INTO warden.alerts (incident_id, dedup_key, severity, opened_at, source, subject, issue, summary) \
             SELECT NULL, 'channel:' || c.channel, 'critical', $1, 'channel', c.channel, 'channel_failing', \
                    format('alert channel %s is failing: %s sends in a row failed (last: %s)', \
                           c.channel, c.consecutive_failures, coalesce(c.last_error, 'unknown error')) \
             FROM warden.alert_channels c \
             WHERE c.consecutive_failures >= $2 AND c.channel = ANY($3) \
             ON CONFLICT (dedup_key) WHERE state <> 'resolved' DO NOTHING \
             RETURNING subject",
            &[&now, &p.channel_failure_threshold, &configured],
        )
        .await?;
    for r in &opened {
        let channel: String = r.get(0);
        tracing::warn!(channel = %channel, "alert channel keeps failing; alerting through the other channels");
    }
    report.channel_alerts_opened = opened.len();
    // A channel removed from the settings fails no more: its alert
    // resolves, and its failure streak starts again, so that a replica
    // still running the old settings (a rolling deploy) opens it again
    // only after failing `channel_failure_threshold` times more, and so
    // does the channel if it is configured again.
    let resolved: i64 = tx
        .query_one(
            "WITH r AS ( \
               UPDATE warden.alerts a SET state = 'resolved', resolved_at = greatest($1, a.opened_at) \
               FROM warden.alert_channels c \
               WHERE a.source = 'channel' AND a.state <> 'resolved' AND c.channel = a.subject \
                 AND (c.consecutive_failures = 0 OR NOT (c.channel = ANY($2))) \
               RETURNING a.subject), \
             restart AS ( \
               UPDATE warden.alert_channels SET consecutive_failures = 0 \
               WHERE consecutive_failures > 0 AND NOT (channel = ANY($2))) \
             SELECT count(*) FROM r",
            &[&now, &configured],
        )
        .await?
        .get(0);
    report.channel_alerts_resolved = resolved as usize;
    Ok(())
}

/// Inserts the ledger rows (those already there are skipped) and one
/// delivery per message for the rows actually inserted.
async fn write_notifications(
    tx: &tokio_postgres::Transaction<'_>,
    pending: &[Pending],
    now: DateTime<Utc>,
) -> Result<(usize, usize), DbError> {
    let mut alert_ids = Vec::new();
    let mut channels = Vec::new();
    let mut kinds = Vec::new();
    let mut levels = Vec::new();
    let mut sequences = Vec::new();
    // (alert, channel, kind, level, sequence) → (batch, route, note).
    type Key = (i64, String, String, i32, i32);
    let mut meta: HashMap<Key, (&str, &str, Option<Note>)> = HashMap::new();
    for n in pending {
        for channel in &n.notice.channels {
            let key = (
                n.alert_id,
                channel.clone(),
                n.notice.kind.as_str().to_string(),
                n.notice.level as i32,
                n.notice.sequence as i32,
            );
            if meta.insert(key, (n.batch.as_str(), n.route.as_str(), n.notice.note)).is_some() {
                continue;
            }
            alert_ids.push(n.alert_id);
            channels.push(channel.as_str());
            kinds.push(n.notice.kind.as_str());
            levels.push(n.notice.level as i32);
            sequences.push(n.notice.sequence as i32);
        }
    }
    if alert_ids.is_empty() {
        return Ok((0, 0));
    }
    let inserted = tx
        .query(
            "INSERT INTO warden.alert_notifications (alert_id, channel, kind, level, sequence) \
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::int[], $5::int[]) \
             ON CONFLICT DO NOTHING \
             RETURNING alert_id, channel, kind, level, sequence",
            &[&alert_ids, &channels, &kinds, &levels, &sequences],
        )
        .await?;
    // Messages: (batch, channel) → the alerts it covers.
    type MessageKey = (String, String, String, i32, i32);
    let mut messages: BTreeMap<MessageKey, (Vec<i64>, String, Option<Note>)> = BTreeMap::new();
    for r in &inserted {
        let key =
            (r.get::<_, i64>(0), r.get::<_, String>(1), r.get::<_, String>(2), r.get::<_, i32>(3), r.get::<_, i32>(4));
        let Some((batch, route, note)) = meta.get(&key) else { continue };
        let entry = messages
            .entry((batch.to_string(), key.1.clone(), key.2.clone(), key.3, key.4))
            .or_insert_with(|| (Vec::new(), route.to_string(), *note));
        entry.0.push(key.0);
    }
    let mut deliveries = 0;
    for ((_, channel, kind, level, sequence), (mut ids, route, note)) in messages {
        ids.sort_unstable();
        let detail = match note {
            Some(Note::AutoRecovered { attempt }) => json!({"auto_recovered_attempt": attempt}),
            Some(Note::RecoveryFailed) => json!({"recovery_failed": true}),
            None => json!({}),
        };
        let row = tx
            .query_one(
                "INSERT INTO warden.alert_deliveries \
                   (alert_id, channel, kind, level, sequence, alert_ids, route, detail, created_at, next_attempt_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) RETURNING id",
                &[&ids[0], &channel, &kind, &level, &sequence, &ids, &route, &detail, &now],
            )
            .await?;
        let delivery: i64 = row.get(0);
        tx.execute(
            "UPDATE warden.alert_notifications SET delivery_id = $1 \
             WHERE alert_id = ANY($2) AND channel = $3 AND kind = $4 AND level = $5 AND sequence = $6",
            &[&delivery, &ids, &channel, &kind, &level, &sequence],
        )
        .await?;
        deliveries += 1;
    }
    Ok((inserted.len(), deliveries))
}

/// Writes the escalator-owned columns of alerts that changed.
async fn write_updates(
    tx: &tokio_postgres::Transaction<'_>,
    rows: &[Row],
    updates: &BTreeMap<i64, Update>,
) -> Result<(), DbError> {
    let before: HashMap<i64, Update> = rows.iter().map(|r| (r.id, r.current())).collect();
    let changed: Vec<(&i64, &Update)> = updates.iter().filter(|(id, u)| before.get(id) != Some(u)).collect();
    if changed.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = changed.iter().map(|(id, _)| **id).collect();
    let severity: Vec<&str> = changed.iter().map(|(_, u)| u.severity.as_str()).collect();
    let route: Vec<Option<&str>> = changed.iter().map(|(_, u)| u.route.as_deref()).collect();
    let policy: Vec<Option<&str>> = changed.iter().map(|(_, u)| u.policy.as_deref()).collect();
    let group: Vec<Option<i64>> = changed.iter().map(|(_, u)| u.group_id).collect();
    let paged: Vec<Option<DateTime<Utc>>> = changed.iter().map(|(_, u)| u.paged_at).collect();
    let levels: Vec<i32> = changed.iter().map(|(_, u)| u.levels_done as i32).collect();
    let repeats: Vec<i32> = changed.iter().map(|(_, u)| u.repeats as i32).collect();
    let last_repeat: Vec<Option<DateTime<Utc>>> = changed.iter().map(|(_, u)| u.last_repeat_at).collect();
    let suppressed: Vec<Option<&str>> = changed.iter().map(|(_, u)| u.suppressed_reason.as_deref()).collect();
    let held: Vec<Option<DateTime<Utc>>> = changed.iter().map(|(_, u)| u.held_until).collect();
    let next: Vec<Option<DateTime<Utc>>> = changed.iter().map(|(_, u)| u.next_escalation_at).collect();
    let failed: Vec<Option<DateTime<Utc>>> = changed.iter().map(|(_, u)| u.recovery_failed_at).collect();
    let closed: Vec<bool> = changed.iter().map(|(_, u)| u.closed).collect();
    tx.execute(
        "UPDATE warden.alerts a SET severity = v.severity, route = v.route, policy = v.policy, group_id = v.group_id, \
                paged_at = v.paged_at, escalation_level = v.levels, repeats = v.repeats, \
                suppressed_reason = v.suppressed, held_until = v.held, next_escalation_at = v.next, \
                recovery_failed_at = v.failed, closed = v.closed, last_repeat_at = v.last_repeat \
         FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::timestamptz[], $7::int[], \
                     $8::int[], $9::text[], $10::timestamptz[], $11::timestamptz[], $12::timestamptz[], $13::bool[], \
                     $14::timestamptz[]) \
              AS v(id, severity, route, policy, group_id, paged_at, levels, repeats, suppressed, held, next, failed, closed, \
                   last_repeat) \
         WHERE a.id = v.id",
        &[
            &ids,
            &severity,
            &route,
            &policy,
            &group,
            &paged,
            &levels,
            &repeats,
            &suppressed,
            &held,
            &next,
            &failed,
            &closed,
            &last_repeat,
        ],
    )
    .await?;
    Ok(())
}
