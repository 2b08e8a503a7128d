//! The evaluator: one leader at a time runs the liveness cycle every
//! `check_interval` and the score pass every `score_interval`.
//!
//! Each cycle is one transaction: read what may have changed in bulk,
//! decide with the pure functions, write transitions, events, incidents and
//! notifications together. Replicas compete for a session-level advisory
//! lock; the holder leads until its connection dies, when the lock frees and
//! another replica takes it at its next attempt (within one interval).
//!
//! Cost: the liveness cycle only fetches agents that could change (silent
//! past their earliest threshold, or heard from since their last transition),
//! so a steady fleet costs one index-free scan of agent_status with a cheap
//! predicate and nothing else.

use std::collections::{HashMap, HashSet};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::Pool;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::flap::{self, FlapParams};
use super::incidents::{self, IssueType, Key, Wanted};
use super::liveness::{self, Detector, LivenessParams, Outages, Presence, Transition};
use super::phi::{ArrivalStats, PhiParams};
use super::score::{self, Inputs, Thresholds, TierBounds, Weights};
use super::stats::{Batch, Kind, MetricStat, Regression};
use crate::config::HealthSettings;
use crate::db::{self, DbError};
use crate::model::{Liveness, Severity};

/// Advisory lock key of the leader ("warden:e").
pub const LEADER_LOCK: i64 = 0x7761_7264_656e_3a65;
/// Liveness cycles that may fail in a row (for a reason other than a lost
/// connection) before the leader gives up the lock and starts over.
const MAX_FAILED_CYCLES: u32 = 3;
/// Channel of stream notifications.
pub const CHANNEL: &str = "warden_events";

/// Everything the evaluator's decisions depend on, from `[health]`.
#[derive(Debug, Clone)]
pub struct EvalParams {
    pub liveness: LivenessParams,
    pub flap: FlapParams,
    pub check_interval: Duration,
    pub score_interval: Duration,
    pub history_interval: Duration,
    pub extended_offline_after: Duration,
    pub restart_loop_count: i64,
    pub restart_loop_window: Duration,
    pub fleet_ratio: f64,
    pub fleet_min_agents: i64,
    pub fleet_window: Duration,
    pub prediction_horizon: Duration,
    pub weights: Weights,
    pub tiers: TierBounds,
    pub thresholds: Thresholds,
    pub error_rate_threshold: f64,
    pub latency_degradation: f64,
    /// Metric name → kind, first listed name of a kind wins.
    pub metric_names: Vec<(String, Kind)>,
    pub severities: HashMap<IssueType, Severity>,
}

impl EvalParams {
    pub fn from_settings(h: &HealthSettings) -> Self {
        let ms = |d: crate::config::Duration| d.as_millis_u64() as f64;
        let s = &h.severities;
        let severities = [
            (IssueType::AgentUnresponsive, s.agent_unresponsive),
            (IssueType::HeartbeatLate, s.heartbeat_late),
            (IssueType::ExtendedOffline, s.extended_offline),
            (IssueType::RestartLoop, s.restart_loop),
            (IssueType::Flapping, s.flapping),
            (IssueType::HighErrorRate, s.high_error_rate),
            (IssueType::ResourceExhaustion, s.resource_exhaustion),
            (IssueType::PerformanceDegradation, s.performance_degradation),
            (IssueType::FleetOutage, s.fleet_outage),
        ]
        .into();
        let m = &h.metrics;
        let mut metric_names = Vec::new();
        for (names, kind) in [
            (&m.latency, Kind::Latency),
            (&m.cpu, Kind::Cpu),
            (&m.memory, Kind::Memory),
            (&m.errors, Kind::Errors),
            (&m.work, Kind::Work),
        ] {
            metric_names.extend(names.iter().map(|n| (n.clone(), kind)));
        }
        let th = &h.thresholds;
        Self {
            liveness: LivenessParams {
                detector: h.detector,
                degraded_after_missed: h.degraded_after_missed,
                offline_after_missed: h.offline_after_missed,
                recover_after_healthy: h.recover_after_healthy,
                jitter_tolerance: h.jitter_tolerance,
                phi: PhiParams {
                    threshold: h.phi_threshold,
                    min_std_ms: ms(h.phi_min_std),
                    acceptable_pause_ms: ms(h.phi_acceptable_pause),
                    min_samples: h.phi_min_samples,
                },
            },
            flap: FlapParams { slot: h.check_interval.to_chrono(), high: h.flap_high, low: h.flap_low },
            check_interval: h.check_interval.to_chrono(),
            score_interval: h.score_interval.to_chrono(),
            history_interval: h.history_interval.to_chrono(),
            extended_offline_after: h.extended_offline_after.to_chrono(),
            restart_loop_count: i64::from(h.restart_loop_count),
            restart_loop_window: h.restart_loop_window.to_chrono(),
            fleet_ratio: h.fleet_outage_ratio,
            fleet_min_agents: i64::from(h.fleet_outage_min_agents),
            fleet_window: h.fleet_outage_window.to_chrono(),
            prediction_horizon: h.prediction_horizon.to_chrono(),
            weights: Weights {
                heartbeat_consistency: h.weights.heartbeat_consistency,
                performance: h.weights.performance,
                error_rate: h.weights.error_rate,
                resource_efficiency: h.weights.resource_efficiency,
                business_impact: h.weights.business_impact,
            },
            tiers: TierBounds {
                excellent: h.tiers.excellent,
                good: h.tiers.good,
                fair: h.tiers.fair,
                poor: h.tiers.poor,
            },
            thresholds: Thresholds {
                cpu_warning: th.cpu_warning,
                cpu_critical: th.cpu_critical,
                memory_warning: th.memory_warning,
                memory_critical: th.memory_critical,
                error_rate_ceiling: th.error_rate_ceiling,
            },
            error_rate_threshold: th.error_rate,
            latency_degradation: th.latency_degradation,
            metric_names,
            severities,
        }
    }

    fn severity(&self, issue: IssueType) -> Severity {
        self.severities.get(&issue).copied().unwrap_or(Severity::Warning)
    }

    /// A pause in evaluation longer than this starts a fresh grace.
    fn gap_limit(&self) -> Duration {
        (self.check_interval * 3).max(Duration::seconds(30))
    }
}

/// Whether ingest stored or refused any heartbeat stamped after `from`
/// and up to `until`.
async fn heard_between(
    tx: &tokio_postgres::Transaction<'_>,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<bool, DbError> {
    if until <= from {
        return Ok(false);
    }
    Ok(tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM warden.agent_heartbeats WHERE received_at > $1 AND received_at <= $2) \
                 OR EXISTS (SELECT 1 FROM warden.ingest_refusals WHERE refused_at > $1 AND refused_at <= $2)",
            &[&from, &until],
        )
        .await?
        .get(0))
}

/// What one liveness cycle did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CycleReport {
    pub now: Option<DateTime<Utc>>,
    /// Agents fetched as possibly changing.
    pub candidates: usize,
    pub transitions: Vec<(String, Liveness, Liveness)>,
    pub opened: usize,
    pub resolved: usize,
    /// Whether this cycle began a fresh grace after a gap.
    pub resumed: bool,
}

/// What one score pass did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScoreReport {
    pub agents: usize,
    pub scored: usize,
    /// Scored agents whose new score a failed write left for the next pass.
    pub unwritten: usize,
    pub samples: u64,
    pub opened: usize,
    pub resolved: usize,
}

pub(crate) async fn clock(
    tx: &tokio_postgres::Transaction<'_>,
    now: Option<DateTime<Utc>>,
) -> Result<DateTime<Utc>, DbError> {
    match now {
        Some(now) => Ok(now),
        None => Ok(tx.query_one("SELECT now()", &[]).await?.get(0)),
    }
}

pub(crate) async fn notify(tx: &tokio_postgres::Transaction<'_>, notes: &[Value]) -> Result<(), DbError> {
    if notes.is_empty() {
        return Ok(());
    }
    let payloads: Vec<String> = notes.iter().map(Value::to_string).collect();
    tx.execute("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", &[&CHANNEL, &payloads]).await?;
    Ok(())
}

fn seconds(d: Duration) -> f64 {
    d.num_milliseconds() as f64 / 1000.0
}

/// The agent_status columns liveness decides from.
macro_rules! status_columns {
    () => {
        "agent_id, liveness, liveness_since, last_seen, expected_interval_ms, ontime_streak, \
         ia_count, ia_mean_ms, ia_var_ms2"
    };
}
/// What `decide` reads, by position, for both reads of a cycle: the
/// status columns and the agent's last refusal at capacity, from rows `s`
/// joined by `refusals_join!` after they are filtered.
macro_rules! presence_columns {
    () => {
        concat!(status_columns!(), ", r.refused_at")
    };
}
macro_rules! refusals_join {
    () => {
        " LEFT JOIN warden.ingest_refusals r USING (agent_id)"
    };
}

/// The replica that runs a cycle: the name it leads under, and when it
/// began taking heartbeats (the database's clock), where known.
#[derive(Debug, Clone, Copy)]
pub struct Replica<'a> {
    pub name: &'a str,
    pub serving_since: Option<DateTime<Utc>>,
}

impl<'a> From<&'a str> for Replica<'a> {
    fn from(name: &'a str) -> Self {
        Self { name, serving_since: None }
    }
}

/// One liveness cycle at `now` (the database's clock when `None`).
#[tracing::instrument(skip_all)]
pub async fn liveness_cycle<'r>(
    client: &mut tokio_postgres::Client,
    params: &EvalParams,
    replica: impl Into<Replica<'r>>,
    now: Option<DateTime<Utc>>,
) -> Result<CycleReport, DbError> {
    let replica: Replica<'_> = replica.into();
    let tx = client.transaction().await?;
    let now = clock(&tx, now).await?;
    let mut report = CycleReport { now: Some(now), ..CycleReport::default() };

    let state =
        tx.query_one("SELECT last_cycle_at, resumed_at, leader FROM warden.evaluator_state FOR UPDATE", &[]).await?;
    let last_cycle: Option<DateTime<Utc>> = state.get(0);
    let mut resumed: Option<DateTime<Utc>> = state.get(1);
    // A leader that began taking heartbeats after the last cycle is a
    // restart: between the old process's stop and its own start nobody
    // heard the agents, and one whose beat fell in that stretch reads as
    // late (after a 20 s restart, as offline). A process's own cycles all
    // come after its start, whatever its name: a container restarted keeps
    // its host name, pid (1) and port, and so the name. A replica that was
    // serving before the last cycle was ingesting throughout: a failover,
    // and no gap. (Another replica running meanwhile would have taken the
    // lead within a cycle's spacing.) Where the start is not known, a new
    // leader pausing longer than a cycle's spacing with nothing stored or
    // refused meanwhile is taken for one. Otherwise only a longer pause is
    // a gap.
    let new_leader = state.get::<_, Option<String>>(2).as_deref() != Some(replica.name);
    let restarted = match (last_cycle, replica.serving_since) {
        // At the database's precision: a cycle at the very instant the
        // process began is its own.
        (Some(at), Some(serving_since)) => chrono::SubsecRound::trunc_subsecs(serving_since, 6) > at,
        (Some(at), None) if new_leader && now - at > params.check_interval => !heard_between(&tx, at, now).await?,
        _ => false,
    };
    let paused = last_cycle.filter(|at| now - *at > params.gap_limit());
    // A pause in evaluation alone (a cycle held up by a lock or a slow
    // statement, a leader whose connection hung) is no reason to excuse
    // anyone: ingest went on storing what the agents sent, so their
    // silences are what they were. Only when nothing was heard during
    // the pause (neither stored nor refused, up to a cycle before now:
    // what came in since is the flood that follows a stall) did the
    // agents go unheard. Excused then every time, pauses recurring every
    // minute would keep a dead agent from ever going offline.
    let unheard = match paused {
        Some(at) if !restarted => !heard_between(&tx, at, now - params.check_interval).await?,
        _ => true,
    };
    if let Some(paused_at) = if restarted { last_cycle } else { paused } {
        let words = if restarted || unheard {
            "every agent gets a fresh grace"
        } else {
            "heartbeats were stored meanwhile, so silences count as ever"
        };
        tracing::info!(?last_cycle, "evaluation resumed after a gap; {words}");
        // Nobody judged the fleet meanwhile: availability counts the
        // stretch as unknown rather than as whatever each agent was.
        tx.execute(
            "INSERT INTO warden.system_events (occurred_at, event_type, severity, message, details) \
             VALUES ($1, 'evaluation_paused', 'warning', $2, \
                     jsonb_build_object('from', $3::timestamptz, 'grace', $4::bool))",
            &[
                &now,
                &format!("no liveness evaluation for {:.0}s; {words}", seconds(now - paused_at)),
                &paused_at,
                &(restarted || unheard),
            ],
        )
        .await?;
    }
    if restarted || last_cycle.is_none() || (paused.is_some() && unheard) {
        resumed = Some(now);
        report.resumed = true;
    }
    let outages = ingest_outages(&tx, now).await?;

    // Agents that could change now; everything else provably cannot. A
    // refusal at capacity only shortens silence, so candidates found
    // without refusals are a superset: the filter runs over agent_status
    // alone and only its survivors are joined to their refusals (hashed,
    // as there are few), and `decide` lets a refusal hold them back.
    let lp = &params.liveness;
    let phi = lp.detector == Detector::Phi;
    let rows = tx
        .query(
            concat!(
                "WITH a AS ( \
                   SELECT ",
                status_columns!(),
                ", extract(epoch FROM $1::timestamptz - greatest(last_seen, $2::timestamptz)) * 1000 AS silence_ms, \
                      CASE WHEN $6::bool AND ia_count >= $7::int \
                                AND ia_mean_ms BETWEEN expected_interval_ms / $9::float8 AND expected_interval_ms * $9::float8 \
                           THEN ia_mean_ms + $8::float8 ELSE 'Infinity'::float8 END AS phi_floor \
                 FROM warden.agent_status) \
                 SELECT ",
                presence_columns!(),
                " FROM a AS s",
                refusals_join!(),
                " WHERE liveness = 'unknown' \
                OR (liveness = 'online' AND silence_ms >= least(expected_interval_ms * ($3::float8 + $5::float8), phi_floor)) \
                OR (liveness = 'degraded' AND (last_seen > liveness_since \
                    OR silence_ms >= least(expected_interval_ms * ($4::float8 + $5::float8), phi_floor))) \
                OR (liveness = 'offline' AND last_seen > liveness_since)"
            ),
            &[
                &now,
                &resumed,
                &f64::from(lp.degraded_after_missed),
                &f64::from(lp.offline_after_missed),
                &lp.jitter_tolerance,
                &phi,
                &(lp.phi.min_samples as i32),
                &lp.phi.acceptable_pause_ms,
                &crate::health::liveness::RHYTHM_FACTOR,
            ],
        )
        .await?;
    report.candidates = rows.len();

    let decide = |row: &tokio_postgres::Row| -> Option<(String, Transition)> {
        let liveness = row.get::<_, String>(1).parse::<Liveness>().ok()?;
        let mut presence = Presence {
            liveness,
            liveness_since: row.get(2),
            last_seen: row.get(3),
            expected_interval_ms: i64::from(row.get::<_, i32>(4)),
            ontime_streak: row.get(5),
            arrivals: ArrivalStats {
                count: row.get::<_, i32>(6).max(0) as u32,
                mean_ms: row.get(7),
                variance_ms2: row.get(8),
            },
            refused_ms: 0,
            refused_at: row.get(9),
        };
        presence.refused_ms = outages.within(liveness::silence_start(presence.last_heard(), resumed), now);
        liveness::decide(&presence, now, resumed, lp).map(|t| (row.get(0), t))
    };
    // The read above takes no lock. The agents it finds changing are
    // locked (in agent_id order, as ingest locks them) and decided again
    // from their rows as locked: a heartbeat committed in between has its
    // say, where a transition written from the first read could take an
    // agent offline just after it was heard from, and keep it there until
    // its next heartbeat.
    let changing: Vec<String> = rows.iter().filter_map(&decide).map(|(id, _)| id).collect();
    let mut transitions: Vec<(String, Transition)> = Vec::new();
    if !changing.is_empty() {
        let locked = tx
            .query(
                concat!(
                    "SELECT ",
                    presence_columns!(),
                    " FROM warden.agent_status s",
                    refusals_join!(),
                    " WHERE agent_id = ANY ($1) ORDER BY agent_id FOR NO KEY UPDATE OF s"
                ),
                &[&changing],
            )
            .await?;
        transitions = locked.iter().filter_map(&decide).collect();
    }

    let mut notes = Vec::new();
    if !transitions.is_empty() {
        write_transitions(&tx, &transitions, now, &mut notes).await?;
    }
    report.transitions = transitions.iter().map(|(id, t)| (id.clone(), t.from, t.to)).collect();

    let plan = liveness_incidents(&tx, params, now).await?;
    report.resolved += plan.resolve.len();
    let opened = incidents::apply(&tx, plan, now).await?;
    report.opened += opened.iter().filter(|n| n["type"] == "incident_opened").count();
    notes.extend(opened);

    notify(&tx, &notes).await?;
    tx.execute(
        "UPDATE warden.evaluator_state SET last_cycle_at = $1, resumed_at = $2, leader = $3",
        &[&now, &resumed, &replica.name],
    )
    .await?;
    tx.commit().await?;
    Ok(report)
}

/// When a stretch of ingest refusals ended.
#[derive(Debug, Clone, Copy)]
pub enum OutageEnd {
    At(DateTime<Utc>),
    /// This long before the database's clock now.
    Ago(StdDuration),
}

/// Records that ingestion refused heartbeats for `refused_for` up to
/// `ended` because the database was out of reach; liveness leaves that
/// stretch out of agents' silence.
pub async fn record_ingest_outage(
    client: &tokio_postgres::Client,
    refused_for: StdDuration,
    ended: OutageEnd,
) -> Result<(), DbError> {
    let (at, ago) = match ended {
        OutageEnd::At(at) => (Some(at), 0.0),
        OutageEnd::Ago(ago) => (None, ago.as_secs_f64()),
    };
    client
        .execute(
            "INSERT INTO warden.ingest_outages (started_at, ended_at) \
             SELECT e - $1::float8 * interval '1 second', e \
             FROM coalesce($2::timestamptz, now() - $3::float8 * interval '1 second') AS e",
            &[&refused_for.as_secs_f64(), &at, &ago],
        )
        .await?;
    Ok(())
}

/// The recorded ingest outages up to `now` (the retention job forgets
/// old ones).
async fn ingest_outages(tx: &tokio_postgres::Transaction<'_>, now: DateTime<Utc>) -> Result<Outages, DbError> {
    let rows =
        tx.query("SELECT started_at, ended_at FROM warden.ingest_outages WHERE started_at < $1", &[&now]).await?;
    Ok(Outages::new(rows.iter().map(|r| (r.get(0), r.get(1))).collect()))
}

/// Writes transitions of agents the caller has locked.
async fn write_transitions(
    tx: &tokio_postgres::Transaction<'_>,
    transitions: &[(String, Transition)],
    now: DateTime<Utc>,
    notes: &mut Vec<Value>,
) -> Result<(), DbError> {
    let ids: Vec<&str> = transitions.iter().map(|(id, _)| id.as_str()).collect();
    let states: Vec<&str> = transitions.iter().map(|(_, t)| t.to.as_str()).collect();
    let severities: Vec<&str> = transitions
        .iter()
        .map(|(_, t)| match t.to {
            Liveness::Offline => Severity::Warning.as_str(),
            _ => Severity::Info.as_str(),
        })
        .collect();
    let messages: Vec<String> = transitions.iter().map(|(id, t)| format!("{id}: {}", t.describe())).collect();
    let details: Vec<Value> = transitions
        .iter()
        .map(|(_, t)| json!({"old": t.from, "new": t.to, "reason": t.reason, "figures": t.figures}))
        .collect();
    // The state change, its event, and a score snapshot, in one statement.
    // Going offline ends the on-time run: the phi detector can find an
    // agent offline sooner than its heartbeats stop counting as on time,
    // and its next beat must start a new run, not bring it straight back.
    tx.execute(
        "WITH u AS ( \
           UPDATE warden.agent_status s SET liveness = v.state, liveness_since = $6, history_at = $6, \
                  ontime_streak = CASE WHEN v.state = 'offline' THEN 0 ELSE s.ontime_streak END \
           FROM unnest($1::text[], $2::text[]) AS v(agent_id, state) \
           WHERE s.agent_id = v.agent_id \
           RETURNING s.agent_id, s.score, s.tier, s.liveness, s.components), \
         h AS ( \
           INSERT INTO warden.health_history (agent_id, evaluated_at, score, tier, liveness, components) \
           SELECT agent_id, $6, score, tier, liveness, components FROM u) \
         INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details) \
         SELECT $6, e.agent_id, 'status_changed', e.severity, e.message, e.details \
         FROM unnest($1::text[], $3::text[], $4::text[], $5::jsonb[]) AS e(agent_id, severity, message, details)",
        &[&ids, &states, &severities, &messages, &details, &now],
    )
    .await?;
    for (id, t) in transitions {
        notes.push(json!({
            "type": crate::stream::STATUS_CHANGED,
            "agent_id": id,
            "old": t.from,
            "new": t.to,
            "reason": t.reason,
            "timestamp": now,
        }));
    }
    Ok(())
}

/// The resolution of a heartbeat_late incident whose agent went offline;
/// reports leave incidents resolved as `superseded: ...` out of the time
/// to recover.
pub const SUPERSEDED_BY_OFFLINE: &str = "superseded: the agent went offline (agent_unresponsive)";

/// An open metric incident (error rate, resources, latency) resolves once
/// its figure falls below this share of the threshold that opened it.
const CLEAR_AT: f64 = 0.9;

/// How many of its agents a fleet outage's summary names.
const FLEET_OUTAGE_NAMED: i64 = 5;

/// Decides which liveness-driven incidents should be open: per-agent
/// unresponsive, late, extended offline, restart loops and flapping, and
/// the fleet outage that stands in for the per-agent ones.
async fn liveness_incidents(
    tx: &tokio_postgres::Transaction<'_>,
    params: &EvalParams,
    now: DateTime<Utc>,
) -> Result<incidents::Plan, DbError> {
    use IssueType::*;
    let managed = [AgentUnresponsive, HeartbeatLate, ExtendedOffline, RestartLoop, Flapping, FleetOutage];
    let open = incidents::load_open(tx, &managed).await?;
    let mut wanted: HashMap<Key, Wanted> = HashMap::new();
    let mut hold: HashSet<Key> = HashSet::new();

    // Fleet outage: many agents that were up at the start of the window
    // went offline within it. Agents offline for longer (decommissioned,
    // long dead) count in neither share.
    let counts = tx
        .query_one(
            "SELECT count(*) FILTER (WHERE liveness = 'offline' AND liveness_since > $1::timestamptz - $2::float8 * interval '1 second'), \
                    count(*) FILTER (WHERE liveness = 'offline' AND liveness_since <= $1::timestamptz - $2::float8 * interval '1 second'), \
                    count(*) FILTER (WHERE liveness <> 'unknown') \
             FROM warden.agent_status",
            &[&now, &pg_interval(params.fleet_window)],
        )
        .await?;
    let (recent_offline, old_offline, known): (i64, i64, i64) = (counts.get(0), counts.get(1), counts.get(2));
    let base = known - old_offline;
    let fleet_open = open.iter().find(|o| o.issue == FleetOutage);
    let fleet_key: Key = (None, FleetOutage);
    // While a fleet outage is open it stands in for the agents that went
    // down with the fleet. One that was still online after it opened and
    // then went down failed on its own and gets its own incident (see
    // `on_their_own` below): otherwise a handful of agents that stay
    // offline (or a key that registers agents and lets them lapse) would
    // keep every later failure in the fleet from being noticed.
    let outage: Option<DateTime<Utc>> = match fleet_open {
        None => {
            let ratio = if base > 0 { recent_offline as f64 / base as f64 } else { 0.0 };
            if base >= params.fleet_min_agents && ratio > params.fleet_ratio {
                // Which agents, so that the page says whether they are the
                // fleet that matters (the first few; the count says the rest).
                let named: Vec<String> = tx
                    .query(
                        "SELECT agent_id FROM warden.agent_status \
                         WHERE liveness = 'offline' AND liveness_since > $1::timestamptz - $2::float8 * interval '1 second' \
                         ORDER BY liveness_since, agent_id LIMIT $3",
                        &[&now, &pg_interval(params.fleet_window), &FLEET_OUTAGE_NAMED],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let more = recent_offline - named.len() as i64;
                let among = if more > 0 { format!("{} and {more} more", named.join(", ")) } else { named.join(", ") };
                wanted.insert(
                    fleet_key.clone(),
                    Wanted {
                        severity: params.severity(FleetOutage),
                        summary: format!(
                            "fleet outage: {recent_offline} of {base} agents went offline within {}s ({among})",
                            params.fleet_window.num_seconds()
                        ),
                        details: json!({"offline": recent_offline, "of": base, "ratio": ratio,
                                        "baseline_offline": old_offline, "known": known, "agents": named}),
                        predicted: false,
                    },
                );
                Some(now)
            } else {
                None
            }
        }
        Some(o) => {
            // Over once fewer than half the threshold share is still down.
            let baseline = o.details["baseline_offline"].as_i64().unwrap_or(0);
            let of = o.details["of"].as_i64().unwrap_or(base).max(1);
            let still = (recent_offline + old_offline - baseline).max(0) as f64 / of as f64;
            if still >= params.fleet_ratio / 2.0 {
                hold.insert(fleet_key.clone());
                Some(o.opened_at)
            } else {
                None
            }
        }
    };

    // Per-agent liveness incidents; while the fleet is out they are not
    // opened for the agents that went down with it (the fleet incident
    // stands in for them), though the ones already open stay open.
    let troubled = tx
        .query(
            "SELECT s.agent_id, s.liveness, s.liveness_since, s.last_seen, s.expected_interval_ms, \
                    s.liveness = 'degraded' AND (SELECT e.details->>'old' FROM warden.system_events e \
                                                 WHERE e.agent_id = s.agent_id AND e.event_type = 'status_changed' \
                                                   AND e.source = 'warden' AND e.occurred_at >= s.liveness_since \
                                                 ORDER BY e.occurred_at DESC, e.id DESC LIMIT 1) = 'offline', \
                    greatest(s.last_seen, r.refused_at) \
             FROM warden.agent_status s LEFT JOIN warden.ingest_refusals r USING (agent_id) \
             WHERE s.liveness IN ('offline', 'degraded')",
            &[],
        )
        .await?;
    // A fleet on its way out goes late before it goes offline: while more
    // than the outage share of it has gone degraded or offline within the
    // window (not counting those coming back from offline), new per-agent
    // incidents wait to see whether a fleet outage stands in for them. A
    // real one among them opens once the window has passed.
    let fell_quiet = troubled
        .iter()
        .filter(|row| row.get::<_, DateTime<Utc>>(2) > now - params.fleet_window)
        .filter(|row| !row.get::<_, Option<bool>>(5).unwrap_or(false))
        .count();
    // In trouble now, but heard from after the outage opened and online
    // since it did: failing on their own. Both, for an agent of the outage
    // may get the odd heartbeat through a lossy partition without ever
    // being back online, and one on a long interval (idle, sleep) may
    // still read as online when the outage opens although it went silent
    // with the rest. The incidents opened for them say so, and the
    // escalator and the recovery engine read that rather than decide again.
    let on_their_own: HashSet<String> = match (outage, fleet_open) {
        (Some(opened), Some(_)) => {
            let agents: Vec<String> =
                troubled.iter().filter(|r| r.get::<_, DateTime<Utc>>(6) > opened).map(|r| r.get(0)).collect();
            tx.query(
                "SELECT DISTINCT agent_id FROM warden.system_events \
                 WHERE event_type = 'status_changed' AND source = 'warden' AND agent_id = ANY ($1) \
                   AND occurred_at > $2 AND details ->> 'old' = 'online'",
                &[&agents, &opened],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
        }
        _ => HashSet::new(),
    };
    let fleet_id = fleet_open.map(|o| o.id);
    let going_quiet = outage.is_none()
        && base >= params.fleet_min_agents
        && base > 0
        && fell_quiet as f64 / base as f64 > params.fleet_ratio;
    // Extended outages still under way although their agent's liveness
    // changed since (a stray heartbeat: offline → recovering → offline).
    let mut outage_goes_on: Vec<Key> = Vec::new();
    // Late incidents that end because their agent went offline: the
    // problem did not go away, it became agent_unresponsive, and reports
    // must not count it as recovered.
    let mut superseded: HashSet<i64> = HashSet::new();
    for row in &troubled {
        let agent: String = row.get(0);
        let liveness: String = row.get(1);
        let since: DateTime<Utc> = row.get(2);
        let last_seen: DateTime<Utc> = row.get(3);
        // Silence counts from the last sign of life, a refused heartbeat
        // included, as liveness counted it.
        let last_heard: DateTime<Utc> = row.get(6);
        let interval_s = f64::from(row.get::<_, i32>(4)) / 1000.0;
        let silent_s = seconds(now - last_heard);
        // Only those that went quiet with the fleet wait for it: one in
        // trouble since before the window is a problem of its own.
        let quiet_with_fleet = going_quiet && since > now - params.fleet_window;
        let mut want = |issue: IssueType, summary: String| {
            let key = (Some(agent.clone()), issue);
            if quiet_with_fleet || (outage.is_some() && !on_their_own.contains(&agent)) {
                hold.insert(key);
            } else {
                let mut details = json!({"last_seen": last_seen, "last_heard": last_heard, "silent_seconds": silent_s,
                                         "expected_interval_seconds": interval_s, "since": since});
                if let Some(id) = fleet_id.filter(|_| outage.is_some()) {
                    details["outside_fleet_outage"] = json!(id);
                }
                wanted.insert(key, Wanted { severity: params.severity(issue), summary, details, predicted: false });
            }
        };
        let open_now = |issue: IssueType| open.iter().any(|o| o.issue == issue && o.agent_id.as_ref() == Some(&agent));
        // Degraded on its way back from offline, not on its way down, for
        // as long as coming back takes; one that stays degraded past that
        // is late after all.
        let coming_back = crate::health::liveness::time_to_recover(
            row.get::<_, i32>(4).into(),
            params.liveness.recover_after_healthy,
        );
        let recovering = row.get::<_, Option<bool>>(5).unwrap_or(false)
            && now - since < Duration::from_std(coming_back).unwrap_or(Duration::weeks(52)) + params.check_interval;
        if liveness == "degraded" && (open_now(AgentUnresponsive) || recovering) {
            // Heartbeating again after an outage but not yet trusted: the
            // outage episode is not over, and "late" would be noise (also
            // when a fleet outage stood in for the agent's own incident).
            hold.insert((Some(agent.clone()), AgentUnresponsive));
            hold.insert((Some(agent.clone()), ExtendedOffline));
            continue;
        }
        if liveness == "offline" {
            if let Some(late) = open.iter().find(|o| o.issue == HeartbeatLate && o.agent_id.as_ref() == Some(&agent)) {
                superseded.insert(late.id);
            }
            want(
                AgentUnresponsive,
                format!("{agent} is offline: no heartbeat for {silent_s:.0}s (expected every {interval_s:.0}s)"),
            );
            if now - since >= params.extended_offline_after {
                want(
                    ExtendedOffline,
                    format!(
                        "{agent} has been offline for {}",
                        crate::console::format::span((now - since).num_seconds())
                    ),
                );
            } else if open_now(ExtendedOffline) {
                outage_goes_on.push((Some(agent.clone()), ExtendedOffline));
            }
        } else {
            want(
                HeartbeatLate,
                format!("{agent} is late: no heartbeat for {silent_s:.0}s (expected every {interval_s:.0}s)"),
            );
        }
    }

    hold.extend(outage_goes_on);

    // Restart loops, from the restarts ingestion detected in the window.
    // Agents may post events of any type (source 'agent'); only warden's
    // own count, or an agent could open incidents about itself or others.
    // An open loop stays open while the window holds at least one restart
    // fewer than the threshold (hysteresis), so that a loop slower than the
    // window's edge does not resolve and reopen with every restart.
    let low = (params.restart_loop_count - 1).max(1);
    let looping_now: HashSet<String> =
        open.iter().filter(|o| o.issue == RestartLoop).filter_map(|o| o.agent_id.clone()).collect();
    let loops = tx
        .query(
            // Registered agents' restarts since they registered: a removed
            // agent's restarts open nothing, and one that registers again
            // starts afresh.
            "SELECT e.agent_id, count(*) FROM warden.system_events e \
             JOIN warden.agent_status s ON s.agent_id = e.agent_id AND e.occurred_at >= s.first_seen \
             WHERE e.event_type = 'agent_restarted' AND e.source = 'warden' \
               AND e.occurred_at > $1::timestamptz - $2::float8 * interval '1 second' AND e.occurred_at <= $1 \
             GROUP BY e.agent_id HAVING count(*) >= $3",
            &[&now, &pg_interval(params.restart_loop_window), &low],
        )
        .await?;
    for row in &loops {
        let agent: String = row.get(0);
        let count: i64 = row.get(1);
        if count < params.restart_loop_count {
            if looping_now.contains(&agent) {
                hold.insert((Some(agent), RestartLoop));
            }
            continue;
        }
        wanted.insert(
            (Some(agent.clone()), RestartLoop),
            Wanted {
                severity: params.severity(RestartLoop),
                summary: format!(
                    "{agent} restarted {count} times in {}",
                    crate::console::format::span(params.restart_loop_window.num_seconds())
                ),
                details: json!({"restarts": count, "window_seconds": params.restart_loop_window.num_seconds()}),
                predicted: false,
            },
        );
    }

    // Flapping, from the transitions of the agent's last 21 evaluations.
    // An evaluation of an agent is one of its intervals when that is longer
    // than the check interval: a 30 s agent needs a few intervals to go
    // degraded and back, and counted in 10 s slots it could never reach
    // the threshold however badly it flapped.
    // Only agents whose last transition is within their window can be
    // flapping; their transitions come from the per-agent index. An agent
    // removed and registered again counts its new life's only.
    let slot_ms = params.flap.slot.num_milliseconds() as f64;
    let flips = tx
        .query(
            "SELECT s.agent_id, t.times, s.expected_interval_ms \
             FROM warden.agent_status s \
             CROSS JOIN LATERAL ( \
               SELECT array_agg(e.occurred_at) AS times FROM warden.system_events e \
               WHERE e.agent_id = s.agent_id AND e.event_type = 'status_changed' AND e.source = 'warden' \
                 AND e.occurred_at <= $1 AND e.occurred_at >= s.first_seen \
                 AND e.occurred_at > $1::timestamptz - $2::float8 * greatest($3::float8, s.expected_interval_ms) \
                                                      * interval '1 millisecond') t \
             WHERE s.liveness_since > $1::timestamptz - $2::float8 * greatest($3::float8, s.expected_interval_ms) \
                                                      * interval '1 millisecond' \
               AND t.times IS NOT NULL",
            &[&now, &(flap::SLOTS as f64), &slot_ms],
        )
        .await?;
    let flapping_now: HashSet<String> =
        open.iter().filter(|o| o.issue == Flapping).filter_map(|o| o.agent_id.clone()).collect();
    for row in &flips {
        let agent: String = row.get(0);
        let times: Vec<DateTime<Utc>> = row.get(1);
        let slot = params.flap.slot.max(Duration::milliseconds(row.get::<_, i32>(2).into()));
        let percent = flap::percent_state_change(&times, now, slot);
        if flap::is_flapping(percent, flapping_now.contains(&agent), &params.flap) {
            wanted.insert(
                (Some(agent.clone()), Flapping),
                Wanted {
                    severity: params.severity(Flapping),
                    summary: format!("{agent} is flapping: {percent:.0}% state change over the last 21 evaluations"),
                    details: json!({"percent_state_change": percent, "transitions": times.len()}),
                    predicted: false,
                },
            );
        }
    }

    let mut plan = incidents::reconcile(&managed, wanted, &open, &hold);
    for (id, reason) in &mut plan.resolve {
        if superseded.contains(id) {
            *reason = SUPERSEDED_BY_OFFLINE.into();
        }
    }
    Ok(plan)
}

/// A chrono duration as seconds, for `$n::float8 * interval '1 second'`.
pub fn pg_interval(d: Duration) -> f64 {
    d.num_milliseconds() as f64 / 1000.0
}

/// Whether a score history snapshot taken at `last` is due again at `now`.
/// Passes run on the check interval's ticks once `score_interval` has gone
/// by, so their clocks are that far apart give or take the time the
/// liveness cycle before each took: a pass 59.99 s after one of the default
/// minute would otherwise wait for the next, leaving two minutes between
/// snapshots. Up to a check interval (at most half the history interval)
/// early is close enough.
fn snapshot_due(last: DateTime<Utc>, now: DateTime<Utc>, params: &EvalParams) -> bool {
    let slack = params.check_interval.min(params.history_interval / 2);
    now - last >= params.history_interval - slack
}

/// One score pass at `now`: fold new metric samples into the running
/// statistics, score every agent, and open or resolve metric incidents.
#[tracing::instrument(skip_all)]
pub async fn score_pass(
    client: &mut tokio_postgres::Client,
    params: &EvalParams,
    now: Option<DateTime<Utc>>,
) -> Result<ScoreReport, DbError> {
    let tx = client.transaction().await?;
    let now = clock(&tx, now).await?;
    let mut report = ScoreReport::default();

    let state = tx.query_one("SELECT metrics_watermark FROM warden.evaluator_state FOR UPDATE", &[]).await?;
    // Samples are read with a short lag so rows of a flush still committing
    // at `now` are not skipped, and never up to the start of a write still
    // open: its samples, stamped with that start, would land behind the
    // watermark and never be read (an ingest call waiting on row locks).
    let mut upto = now - Duration::seconds(2);
    if let Some(open) = db::oldest_open_write(&tx).await? {
        upto = upto.min(open - Duration::microseconds(1));
    }
    let from: DateTime<Utc> = state.get::<_, Option<DateTime<Utc>>>(0).unwrap_or(upto - params.score_interval);
    let span_s = seconds(upto - from).max(1.0);

    let names: Vec<&str> = params.metric_names.iter().map(|(n, _)| n.as_str()).collect();
    // Samples beyond the bound ingest holds metrics to (written before it
    // did) are left out: one would overflow avg() and fail the whole pass.
    let samples = if upto > from {
        tx.query(
            // Registered agents only: a removed agent's last samples would
            // otherwise bring back the statistics its removal deleted.
            "SELECT m.* FROM ( \
               SELECT agent_id, name, count(*)::bigint, avg(value), sum(value), max(recorded_at), min(recorded_at) \
               FROM warden.performance_metrics \
               WHERE recorded_at > $1 AND recorded_at <= $2 AND name = ANY ($3) AND abs(value) <= $4 \
               GROUP BY agent_id, name) m \
             WHERE EXISTS (SELECT 1 FROM warden.agent_status s WHERE s.agent_id = m.agent_id)",
            &[&from, &upto, &names, &crate::ingest::heartbeat::METRIC_VALUE_MAX],
        )
        .await?
    } else {
        Vec::new()
    };

    // The first configured name of a kind that an agent reports wins.
    let rank: HashMap<&str, (Kind, usize)> =
        params.metric_names.iter().enumerate().map(|(i, (n, k))| (n.as_str(), (*k, i))).collect();
    let mut batches: HashMap<(String, Kind), (usize, Batch)> = HashMap::new();
    for row in &samples {
        let name: String = row.get(1);
        let Some(&(kind, order)) = rank.get(name.as_str()) else { continue };
        let batch = Batch {
            count: row.get::<_, i64>(2) as u64,
            mean: row.get(3),
            sum: row.get(4),
            at: row.get(5),
            first_at: row.get(6),
            span_s,
        };
        report.samples += batch.count;
        let key = (row.get::<_, String>(0), kind);
        match batches.get(&key) {
            Some((existing, _)) if *existing <= order => {}
            _ => {
                batches.insert(key, (order, batch));
            }
        }
    }

    let mut stats: HashMap<(String, Kind), MetricStat> = HashMap::new();
    for row in tx
        .query(
            "SELECT agent_id, kind, samples, updated_at, fast, slow, hour_sum, reg_w, reg_t, reg_tt, reg_x, reg_tx \
             FROM warden.agent_metric_stats",
            &[],
        )
        .await?
    {
        let Ok(kind) = row.get::<_, String>(1).parse::<Kind>() else { continue };
        stats.insert(
            (row.get(0), kind),
            MetricStat {
                samples: row.get::<_, i64>(2) as u64,
                updated_at: row.get(3),
                fast: row.get(4),
                slow: row.get(5),
                hour_sum: row.get(6),
                trend: Regression { w: row.get(7), t: row.get(8), tt: row.get(9), x: row.get(10), tx: row.get(11) },
            },
        );
    }

    // Fold the new batches in; the error rate is derived per pass from the
    // errors and work counted in it.
    let mut touched: HashSet<(String, Kind)> = HashSet::new();
    let mut error_batches: Vec<(String, Batch)> = Vec::new();
    for ((agent, kind), (_, batch)) in &batches {
        if *kind == Kind::Errors {
            let work = batches.get(&(agent.clone(), Kind::Work)).map(|(_, b)| b.sum).unwrap_or(0.0);
            if work > 0.0 {
                let rate = batch.sum / work;
                error_batches.push((agent.clone(), Batch { count: 1, mean: rate, sum: rate, ..*batch }));
            }
        }
    }
    let all_batches = batches
        .iter()
        .map(|((a, k), (_, b))| (a.clone(), *k, *b))
        .chain(error_batches.into_iter().map(|(a, b)| (a, Kind::ErrorRate, b)));
    for (agent, kind, batch) in all_batches {
        let key = (agent, kind);
        match stats.get_mut(&key) {
            Some(s) => s.apply(kind, &batch),
            None => {
                stats.insert(key.clone(), MetricStat::start(kind, &batch));
            }
        }
        touched.insert(key);
    }
    write_stats(&tx, &stats, &touched).await?;

    // Agent error events of the last hour.
    let error_events: HashMap<String, i64> = tx
        .query(
            "SELECT agent_id, count(*) FROM warden.system_events \
             WHERE source = 'agent' AND occurred_at > $1::timestamptz - interval '1 hour' AND occurred_at <= $1 \
               AND (severity IN ('critical', 'emergency') OR event_type LIKE '%error%' OR event_type LIKE '%fail%') \
             GROUP BY agent_id",
            &[&now],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    // Scores an hour ago, for the trend.
    let hour_ago = now - Duration::hours(1);
    let past: HashMap<String, f64> = tx
        .query(
            "SELECT DISTINCT ON (agent_id) agent_id, score FROM warden.health_history \
             WHERE evaluated_at <= $1::timestamptz AND evaluated_at > $1::timestamptz - $2::float8 * interval '1 second' AND score IS NOT NULL \
             ORDER BY agent_id, evaluated_at DESC",
            &[&hour_ago, &pg_interval(params.history_interval * 3)],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    let agents = tx
        .query(
            "SELECT agent_id, liveness, labels, first_seen, last_seen, expected_interval_ms, beats_decayed, \
                    ia_count, ia_mean_ms, ia_var_ms2, score, tier, history_at, beats_expected \
             FROM warden.agent_status",
            &[],
        )
        .await?;
    report.agents = agents.len();

    let open = incidents::load_open(
        &tx,
        &[IssueType::HighErrorRate, IssueType::ResourceExhaustion, IssueType::PerformanceDegradation],
    )
    .await?;
    let mut wanted: HashMap<Key, Wanted> = HashMap::new();
    let mut updates = ScoreUpdates::default();
    for row in &agents {
        let agent: String = row.get(0);
        let liveness: Option<Liveness> = row.get::<_, String>(1).parse().ok();
        let labels: Value = row.get(2);
        let first_seen: DateTime<Utc> = row.get(3);
        let last_seen: DateTime<Utc> = row.get(4);
        let interval_s = f64::from(row.get::<_, i32>(5)) / 1000.0;
        let beats: f64 = row.get(6);
        let ia_count: i32 = row.get(7);
        let ia_mean: f64 = row.get(8);
        let ia_var: f64 = row.get(9);
        let old_score: Option<f64> = row.get(10);
        let old_tier: Option<String> = row.get(11);
        let history_at: Option<DateTime<Utc>> = row.get(12);

        let stat = |kind: Kind| stats.get(&(agent.clone(), kind));
        // A gauge (cpu, memory, latency) keeps its last value until new
        // samples come; one the agent stopped sending while it kept
        // heartbeating (renamed, dropped) is no data, not a reading frozen
        // for ever. An agent that went silent altogether keeps its last
        // readings (what it died of stays on record). Counters fade by
        // themselves (their hourly sums decay).
        let fresh_for = (Duration::milliseconds(row.get::<_, i32>(5).into()) * 3).max(params.score_interval * 3);
        let gauge_fresh_after = last_seen - fresh_for;
        let gauge = |kind: Kind| stat(kind).filter(|s| s.updated_at >= gauge_fresh_after);
        let inputs = score_inputs(ScoreFacts {
            now,
            liveness,
            labels: &labels,
            first_seen,
            last_seen,
            interval_s,
            beats_decayed: beats,
            beats_expected: row.get(13),
            tolerance: params.liveness.jitter_tolerance,
            arrival_cv: (ia_count >= 3 && ia_mean > 0.0).then(|| ia_var.max(0.0).sqrt() / ia_mean),
            latency: gauge(Kind::Latency),
            cpu: gauge(Kind::Cpu),
            memory: gauge(Kind::Memory),
            errors: stat(Kind::Errors),
            work: stat(Kind::Work),
            error_events: error_events.get(&agent).copied().unwrap_or(0),
        });
        let open_now = |issue: IssueType| {
            open.iter()
                .find(|o| o.issue == issue && !o.predicted && o.agent_id.as_deref() == Some(agent.as_str()))
                .map(|o| &o.details)
        };
        metric_issues(&agent, &inputs, &stats, params, (now, now - fresh_for), open_now, &mut wanted);
        let Some(score) = score::compute(&inputs, &params.weights, &params.tiers, &params.thresholds) else {
            continue;
        };
        report.scored += 1;
        let tier_changed = old_tier.as_deref() != Some(score.tier.as_str());
        let score_changed = old_score.is_none_or(|s| (s - score.score).abs() >= 0.01);
        let snapshot = tier_changed || history_at.is_none_or(|at| snapshot_due(at, now, params));
        if !(score_changed || tier_changed || snapshot) {
            continue;
        }
        let trend = past.get(&agent).map(|p| ((score.score - p) * 100.0).round() / 100.0);
        updates.push(agent, score, trend, snapshot);
    }

    let plan = incidents::reconcile(
        &[IssueType::HighErrorRate, IssueType::ResourceExhaustion, IssueType::PerformanceDegradation],
        wanted,
        &open,
        &HashSet::new(),
    );
    report.resolved = plan.resolve.len();
    let notes = incidents::apply(&tx, plan, now).await?;
    report.opened = notes.iter().filter(|n| n["type"] == "incident_opened").count();
    notify(&tx, &notes).await?;

    tx.execute(
        "UPDATE warden.evaluator_state SET metrics_watermark = $1, last_score_at = $2",
        &[&upto.max(from), &now],
    )
    .await?;
    tx.commit().await?;
    // Ingest updates these same rows for every heartbeat and waits for any
    // lock held on them: written in the pass's transaction, the scores of a
    // fleet kept every scored agent's row locked from their write to the
    // end of the pass (the soak's slowest heartbeats, at 10,000 agents).
    // Short transactions of their own hold a hundred rows each for a few
    // milliseconds. A write that fails leaves its agents to the next pass,
    // which recomputes every score from the running statistics and finds
    // their snapshots still due; the others are written regardless.
    report.unwritten = updates.write(client, now).await?;
    Ok(report)
}

struct ScoreFacts<'a> {
    now: DateTime<Utc>,
    liveness: Option<Liveness>,
    labels: &'a Value,
    first_seen: DateTime<Utc>,
    last_seen: DateTime<Utc>,
    interval_s: f64,
    beats_decayed: f64,
    /// Heartbeats owed, decayed like `beats_decayed`, as at `last_seen`.
    beats_expected: f64,
    /// `health.jitter_tolerance`.
    tolerance: f64,
    arrival_cv: Option<f64>,
    latency: Option<&'a MetricStat>,
    cpu: Option<&'a MetricStat>,
    memory: Option<&'a MetricStat>,
    errors: Option<&'a MetricStat>,
    work: Option<&'a MetricStat>,
    error_events: i64,
}

/// A positive number from an agent label, e.g. `latency_target_ms`.
fn label_number(labels: &Value, key: &str) -> Option<f64> {
    labels.get(key)?.as_str()?.trim().parse::<f64>().ok().filter(|v| v.is_finite() && *v > 0.0)
}

/// The least share of an hour's counter sums taken as filled: a counter
/// seconds old would otherwise read as a huge hourly rate.
const MIN_FILLED: f64 = 0.05;

/// The score inputs of one agent (formulas in `score`).
fn score_inputs(f: ScoreFacts<'_>) -> Inputs {
    use crate::health::stats::HOUR_S;
    // Heartbeats received vs expected, both decayed with a one-hour time
    // constant: an agent that beats every interval converges to 1. What
    // was owed up to the last heartbeat is kept by ingest under each
    // interval in force at the time (a mode switch changes what is owed
    // from then on, not in hindsight); the silence since is owed at the
    // current interval.
    let age_s = seconds(f.now - f.first_seen).max(0.0);
    let since_s = seconds(f.now - f.last_seen).max(0.0);
    let fade = (-since_s / HOUR_S).exp();
    let expected =
        f.beats_expected * fade + if f.interval_s > 0.0 { (HOUR_S / f.interval_s) * (1.0 - fade) } else { 0.0 };
    let received = f.beats_decayed * fade;
    // For an interval of an hour or more, or under one heartbeat owed (an
    // agent just registered), the hour's ratio says nothing: a daily job on
    // schedule would read as missing most of its beat mid-day, and one of
    // 66 minutes would swing with where in its interval it is. What does is
    // whether the next heartbeat is overdue: 1 until the interval and its
    // tolerance have passed, then the share of the silence one covers.
    let due_s = f.interval_s * (1.0 + f.tolerance);
    let delivery = if expected >= 1.0 && f.interval_s < HOUR_S {
        (received / expected).min(1.0)
    } else if due_s > 0.0 && since_s > due_s {
        due_s / since_s
    } else {
        1.0
    };

    let latency_reference =
        label_number(f.labels, "latency_target_ms").or_else(|| f.latency.filter(|s| s.samples >= 5).map(|s| s.slow));
    // Counters' hourly sums decay with the same one-hour constant, so an
    // agent reporting for `age` has only filled (1 − e^(−age/1h)) of one:
    // scaled up as `expected` is, a new agent's steady rate reads as that
    // rate, not a fraction of it (business impact 5 instead of 100 after a
    // few minutes). Agents older than a few hours are unaffected.
    let share = 1.0 - (-age_s / HOUR_S).exp();
    let filled = share.max(MIN_FILLED);
    let work_per_hour = f.work.map(|s| s.hour_sum_at(f.now) / filled);
    let errors_metric = f.errors.map(|s| s.hour_sum_at(f.now) / filled);
    // Error events are counted over the last hour, of which a new agent
    // has lived only `age`.
    let events_per_hour = f.error_events as f64 * HOUR_S / age_s.clamp(HOUR_S * 0.05, HOUR_S);
    let errors_per_hour = match (errors_metric, f.error_events) {
        (None, 0) => None,
        (m, _) => Some(m.unwrap_or(0.0) + events_per_hour),
    };
    // Without a work metric, heartbeats are the unit of work errors are
    // counted against (scaled like the counters).
    let work_for_errors = work_per_hour.or_else(|| errors_per_hour.map(|_| received / filled));
    // Until the floor of `filled` stops mattering (3 minutes), a new
    // agent's rate reads low (13 % of it at 18 s): no throughput verdict,
    // rather than "below target" about an agent doing its work.
    let work_reference = label_number(f.labels, "throughput_target_per_hour")
        .or_else(|| f.work.filter(|s| s.samples >= 5).map(|s| s.slow))
        .filter(|_| share >= MIN_FILLED);
    Inputs {
        delivery: Some(delivery),
        arrival_cv: f.arrival_cv,
        liveness: f.liveness,
        latency: f.latency.map(|s| s.fast),
        latency_reference,
        errors_per_hour,
        work_per_hour: work_for_errors,
        // Business impact compares the work metric itself, never heartbeats.
        work_reference_per_hour: work_reference.filter(|_| work_per_hour.is_some()),
        cpu_percent: f.cpu.map(|s| s.fast),
        memory_percent: f.memory.map(|s| s.fast),
    }
}

/// Metric-driven incidents of one agent: actual and predicted. Predictions
/// come only from series updated since `trend_fresh_after`: the trend of
/// an agent that stopped reporting (died, or dropped the metric) says
/// nothing of where it is heading, and extrapolated from its last update
/// it would open a prediction for an agent already gone.
fn metric_issues<'o>(
    agent: &str,
    inputs: &Inputs,
    stats: &HashMap<(String, Kind), MetricStat>,
    params: &EvalParams,
    (now, trend_fresh_after): (DateTime<Utc>, DateTime<Utc>),
    open_now: impl Fn(IssueType) -> Option<&'o Value>,
    wanted: &mut HashMap<Key, Wanted>,
) {
    let trend = |kind: Kind| stats.get(&(agent.to_string(), kind)).filter(|s| s.updated_at >= trend_fresh_after);
    let th = &params.thresholds;
    // A figure that sits at its threshold (an error rate of exactly 5 %,
    // both its decayed sums falling alike) reads a hair either side from
    // one pass to the next; an open incident stays open until the figure
    // is clearly below, or it would open and resolve every few seconds.
    // (One resource_exhaustion incident serves cpu and memory: only the
    // resource it is about keeps it open.)
    let bar = |issue: IssueType, resource: Option<&str>, threshold: f64| {
        let held = open_now(issue).is_some_and(|d| resource.is_none_or(|r| d["resource"] == r));
        if held { threshold * CLEAR_AT } else { threshold }
    };
    let key = |issue| (Some(agent.to_string()), issue);
    let horizon_s = seconds(params.prediction_horizon);
    let mut add = |issue: IssueType, severity: Severity, summary: String, details: Value, predicted: bool| {
        let k = key(issue);
        // A real problem outranks a prediction of the same type.
        if predicted && wanted.get(&k).is_some_and(|w| !w.predicted) {
            return;
        }
        wanted.insert(k, Wanted { severity, summary, details, predicted });
    };

    for (kind, value, critical, name) in [
        (Kind::Cpu, inputs.cpu_percent, th.cpu_critical, "cpu"),
        (Kind::Memory, inputs.memory_percent, th.memory_critical, "memory"),
    ] {
        let Some(value) = value else { continue };
        if value >= bar(IssueType::ResourceExhaustion, Some(name), critical) {
            add(
                IssueType::ResourceExhaustion,
                params.severity(IssueType::ResourceExhaustion),
                format!("{agent} {name} at {value:.0}% (critical at {critical:.0}%)"),
                json!({"resource": name, "percent": value, "critical": critical}),
                false,
            );
        } else if let Some(at) = trend(kind).and_then(|s| s.predicted_crossing(critical, now, horizon_s)) {
            add(
                IssueType::ResourceExhaustion,
                Severity::Warning,
                format!("{agent} {name} is rising and will reach {critical:.0}% around {}", at.format("%H:%M UTC")),
                json!({"resource": name, "percent": value, "critical": critical, "expected_at": at}),
                true,
            );
        }
    }

    if let (Some(errors), Some(work)) = (inputs.errors_per_hour, inputs.work_per_hour) {
        // Errors and work are decayed sums scaled a little differently, so
        // one error per unit of work can come out at 100.2 %; and errors
        // beyond the work done (several per heartbeat) are still "all of it".
        let rate = if work > 0.0 { (errors / work).min(1.0) } else { 1.0 };
        if errors >= 1.0 && rate >= bar(IssueType::HighErrorRate, None, params.error_rate_threshold) {
            add(
                IssueType::HighErrorRate,
                params.severity(IssueType::HighErrorRate),
                format!("{agent} error rate {:.1}% over the last hour", rate * 100.0),
                json!({"errors_per_hour": errors, "work_per_hour": work, "rate": rate}),
                false,
            );
        } else if let Some(at) =
            trend(Kind::ErrorRate).and_then(|s| s.predicted_crossing(params.error_rate_threshold, now, horizon_s))
        {
            add(
                IssueType::HighErrorRate,
                Severity::Warning,
                format!(
                    "{agent} error rate is rising and will reach {:.1}% around {}",
                    params.error_rate_threshold * 100.0,
                    at.format("%H:%M UTC")
                ),
                json!({"rate": rate, "threshold": params.error_rate_threshold, "expected_at": at}),
                true,
            );
        }
    }

    if let (Some(latency), Some(reference)) = (inputs.latency, inputs.latency_reference)
        && reference > 0.0
        && latency / reference >= bar(IssueType::PerformanceDegradation, None, params.latency_degradation)
    {
        add(
            IssueType::PerformanceDegradation,
            params.severity(IssueType::PerformanceDegradation),
            format!("{agent} latency {latency:.0} is {:.1}× its reference {reference:.0}", latency / reference),
            json!({"latency": latency, "reference": reference, "ratio": latency / reference}),
            false,
        );
    }
}

async fn write_stats(
    tx: &tokio_postgres::Transaction<'_>,
    stats: &HashMap<(String, Kind), MetricStat>,
    touched: &HashSet<(String, Kind)>,
) -> Result<(), DbError> {
    if touched.is_empty() {
        return Ok(());
    }
    let n = touched.len();
    let (mut agents, mut kinds, mut samples, mut updated) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut fast, mut slow, mut hour) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut w, mut t, mut tt, mut x, mut tx_) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for key in touched {
        let s = &stats[key];
        agents.push(key.0.as_str());
        kinds.push(key.1.as_str());
        samples.push(s.samples as i64);
        updated.push(s.updated_at);
        fast.push(s.fast);
        slow.push(s.slow);
        hour.push(s.hour_sum);
        w.push(s.trend.w);
        t.push(s.trend.t);
        tt.push(s.trend.tt);
        x.push(s.trend.x);
        tx_.push(s.trend.tx);
    }
    tx.execute(
        "INSERT INTO warden.agent_metric_stats \
           (agent_id, kind, samples, updated_at, fast, slow, hour_sum, reg_w, reg_t, reg_tt, reg_x, reg_tx) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::timestamptz[], $5::float8[], $6::float8[], \
                              $7::float8[], $8::float8[], $9::float8[], $10::float8[], $11::float8[], $12::float8[]) \
         ON CONFLICT (agent_id, kind) DO UPDATE SET \
           samples = EXCLUDED.samples, updated_at = EXCLUDED.updated_at, fast = EXCLUDED.fast, slow = EXCLUDED.slow, \
           hour_sum = EXCLUDED.hour_sum, reg_w = EXCLUDED.reg_w, reg_t = EXCLUDED.reg_t, reg_tt = EXCLUDED.reg_tt, \
           reg_x = EXCLUDED.reg_x, reg_tx = EXCLUDED.reg_tx",
        &[&agents, &kinds, &samples, &updated, &fast, &slow, &hour, &w, &t, &tt, &x, &tx_],
    )
    .await?;
    Ok(())
}

/// Locks the agent_status rows of `agents` in agent_id order, as ingestion
/// does (migration V9): transactions that lock many rows in one order wait
/// for each other instead of deadlocking.
async fn lock_agents<S: tokio_postgres::types::ToSql + Sync>(
    tx: &tokio_postgres::Transaction<'_>,
    agents: &[S],
) -> Result<(), DbError> {
    tx.execute(
        "SELECT 1 FROM warden.agent_status WHERE agent_id = ANY ($1) ORDER BY agent_id FOR NO KEY UPDATE",
        &[&agents],
    )
    .await?;
    Ok(())
}

/// Agents whose scores one transaction writes (see `score_pass`). Ingest
/// waits for these rows while the transaction runs: at 500 a write held
/// them 20-40 ms, and heartbeats of a soak stalled behind several in a
/// row; at 100 it holds them about 5-8 ms, for one commit more per
/// hundred agents.
pub const SCORE_WRITE_CHUNK: usize = 100;

/// Score rows to write, in bulk.
#[derive(Default)]
struct ScoreUpdates {
    agents: Vec<String>,
    scores: Vec<f64>,
    tiers: Vec<&'static str>,
    /// As JSON text: a whole fleet's breakdowns wait here for the writes,
    /// and a serde_json::Value tree of one takes several times its text.
    components: Vec<String>,
    trends: Vec<Option<f64>>,
    snapshot: Vec<bool>,
}

impl ScoreUpdates {
    fn push(&mut self, agent: String, score: score::Score, trend: Option<f64>, snapshot: bool) {
        self.agents.push(agent);
        self.scores.push(score.score);
        self.tiers.push(score.tier.as_str());
        self.components.push(serde_json::to_string(&score.components).unwrap_or_else(|_| "null".into()));
        self.trends.push(trend);
        self.snapshot.push(snapshot);
    }

    /// Writes the scores, `SCORE_WRITE_CHUNK` agents per transaction, and
    /// returns how many agents failed writes left unwritten. Only losing the
    /// database stops it.
    async fn write(&self, client: &mut tokio_postgres::Client, now: DateTime<Utc>) -> Result<usize, DbError> {
        let mut unwritten = 0;
        for start in (0..self.agents.len()).step_by(SCORE_WRITE_CHUNK) {
            let end = (start + SCORE_WRITE_CHUNK).min(self.agents.len());
            let result = async {
                let tx = client.transaction().await?;
                self.write_range(&tx, start..end, now).await?;
                tx.commit().await?;
                Ok::<_, DbError>(())
            }
            .await;
            match result {
                Ok(()) => {}
                Err(e) if e.is_unavailable() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, agents = end - start, "scores not written; the next pass writes them");
                    unwritten += end - start;
                }
            }
        }
        Ok(unwritten)
    }

    async fn write_range(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        range: std::ops::Range<usize>,
        now: DateTime<Utc>,
    ) -> Result<(), DbError> {
        let agents = &self.agents[range.clone()];
        lock_agents(tx, agents).await?;
        tx.execute(
            "WITH v AS (SELECT * FROM unnest($1::text[], $2::float8[], $3::text[], $4::text[]::jsonb[], $5::float8[], $6::bool[]) \
                        AS v(agent_id, score, tier, components, trend, snapshot)), \
             u AS ( \
               UPDATE warden.agent_status s SET score = v.score, tier = v.tier, components = v.components, \
                      score_trend = v.trend, evaluated_at = $7, \
                      history_at = CASE WHEN v.snapshot THEN $7 ELSE s.history_at END \
               FROM v WHERE s.agent_id = v.agent_id \
               RETURNING s.agent_id, s.liveness) \
             INSERT INTO warden.health_history (agent_id, evaluated_at, score, tier, liveness, components) \
             SELECT v.agent_id, $7, v.score, v.tier, u.liveness, v.components \
             FROM v JOIN u ON u.agent_id = v.agent_id WHERE v.snapshot",
            &[
                &agents,
                &&self.scores[range.clone()],
                &&self.tiers[range.clone()],
                &&self.components[range.clone()],
                &&self.trends[range.clone()],
                &&self.snapshot[range],
                &now,
            ],
        )
        .await?;
        Ok(())
    }
}

/// Runs the evaluator until `stop`: competes for leadership, and while
/// leading runs liveness cycles and score passes on their intervals.
pub async fn run(pool: Pool, params: EvalParams, replica: String, stop: CancellationToken) {
    run_with(pool, params, replica, Leadership::default(), stop).await
}

/// How a serving replica leads, beyond what [`run`] needs.
#[derive(Debug, Clone, Default)]
pub struct Leadership {
    /// When the replica began taking heartbeats (see [`Replica`]).
    pub serving_since: Option<DateTime<Utc>>,
    /// Requested after every successful liveness cycle.
    pub ping: Option<String>,
    /// `database.max_lifetime`: the leader's connection, which holds the
    /// leader lock outside the pool, is given up at that age (lock and
    /// all) and leadership competed for again on a new one, so that after
    /// a failover that left old connections open evaluation does not go on
    /// against the old server.
    pub max_lifetime: Option<StdDuration>,
    /// The replica's ingest: a liveness cycle waits while it has refused
    /// heartbeats for want of the database and not yet recorded the
    /// stretch (see [`Leader::waits_for_ingest`]).
    pub ingest: Option<crate::ingest::writer::OutageWatch>,
}

/// Like [`run`], as a serving replica leads.
pub async fn run_with(
    pool: Pool,
    params: EvalParams,
    replica: String,
    leadership: Leadership,
    stop: CancellationToken,
) {
    let pinger = leadership.ping.map(Pinger::new);
    let leader = Leader {
        params: &params,
        replica: Replica { name: &replica, serving_since: leadership.serving_since },
        stop: &stop,
        check: params.check_interval.to_std().unwrap_or(StdDuration::from_secs(10)),
        score_every: params.score_interval.to_std().unwrap_or(StdDuration::from_secs(60)),
        pinger: pinger.as_ref(),
        max_lifetime: leadership.max_lifetime,
        ingest: leadership.ingest,
    };
    let mut renewing = false;
    // Kept across leaderships, so that renewing the connection brings no
    // extra score pass.
    let mut last_score = tokio::time::Instant::now() - leader.score_every;
    loop {
        if stop.is_cancelled() {
            return;
        }
        match leader.lead(&pool, renewing, &mut last_score).await {
            Ok(Ended::Stopped) => return,
            // Competed for again at once: another replica may take over.
            Ok(Ended::Aged) => {
                renewing = true;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "evaluator gave up leading; will try to lead again");
                renewing = false;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(leader.check) => {}
        }
    }
}

/// What a replica needs to compete for leadership and evaluate.
struct Leader<'a> {
    params: &'a EvalParams,
    replica: Replica<'a>,
    stop: &'a CancellationToken,
    check: StdDuration,
    score_every: StdDuration,
    pinger: Option<&'a Pinger>,
    max_lifetime: Option<StdDuration>,
    ingest: Option<crate::ingest::writer::OutageWatch>,
}

/// Why a replica stopped leading without an error.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Stopped,
    /// Its connection reached `database.max_lifetime`.
    Aged,
}

impl Leader<'_> {
    /// Tries to become leader; while leader, evaluates. `renewing`: it led
    /// until its connection aged, which is not news worth a log line.
    async fn lead(
        &self,
        pool: &Pool,
        mut renewing: bool,
        last_score: &mut tokio::time::Instant,
    ) -> Result<Ended, DbError> {
        // The lock belongs to this connection's session: it is held for as
        // long as the connection lives and released by PostgreSQL if it dies.
        let mut client = db::client(pool).await?;
        let mut held = loop {
            match db::SessionLock::try_take(client, LEADER_LOCK).await? {
                Ok(held) => break held,
                Err(back) => client = back,
            }
            // Another replica took over meanwhile: leading again is news.
            renewing = false;
            tokio::select! {
                _ = self.stop.cancelled() => return Ok(Ended::Stopped),
                _ = tokio::time::sleep(self.check) => {}
            }
            // A replica standing by keeps its connection between tries,
            // and retires it at the age the pool would.
            if db::outlived(&client, self.max_lifetime) {
                db::discard(client);
                client = db::client(pool).await?;
            }
        };
        if renewing {
            tracing::debug!(replica = self.replica.name, "this replica leads evaluation on a new connection");
        } else {
            tracing::info!(replica = self.replica.name, "this replica now leads evaluation");
        }
        let result = self.evaluate(&mut held, last_score).await;
        // After a failure the connection is closed, not pooled: it may be
        // the cause. An aged one is closed too, as the pool would.
        held.release(matches!(result, Ok(Ended::Stopped))).await;
        result
    }

    /// Whether this tick waits for ingest to record a stretch in which it
    /// refused heartbeats for want of the database. The evaluator may find
    /// the database back before ingest's probe does, or before the record
    /// commits; judged then, every agent whose silence spans the outage
    /// would read as late, or offline, for it. (The grace after a pause
    /// does not cover it: heartbeats stored before the outage count as
    /// heard during the pause.) The wait lasts at most two check intervals:
    /// an ingest that cannot record must not stop evaluation for good, and
    /// at three `/readyz` finds evaluation stalled (on every replica) and
    /// the next cycle would count as a pause.
    fn waits_for_ingest(&self, waiting: &mut Option<(std::time::Instant, bool)>) -> bool {
        if !self.ingest.as_ref().is_some_and(|watch| watch.unrecorded()) {
            *waiting = None;
            return false;
        }
        let (since, gave_up) = waiting.get_or_insert_with(|| {
            tracing::info!("liveness waits for ingest to record how long it refused heartbeats");
            (std::time::Instant::now(), false)
        });
        if *gave_up {
            return false;
        }
        let limit = self.check * 2;
        if since.elapsed() >= limit {
            tracing::warn!(
                waited_ms = since.elapsed().as_millis() as u64,
                "ingest has not recorded its refusals; evaluating without waiting longer"
            );
            *gave_up = true;
            return false;
        }
        crate::metrics::METRICS.cycle_waits.inc();
        true
    }

    /// Metrics, logs and the self-heartbeat after a successful liveness cycle.
    fn after_liveness(&self, report: &CycleReport, elapsed: StdDuration) {
        if let Some(pinger) = self.pinger {
            pinger.ping();
        }
        let metrics = &crate::metrics::METRICS;
        metrics.cycle_seconds.with_label_values(&["liveness"]).observe(elapsed.as_secs_f64());
        for (_, _, to) in &report.transitions {
            metrics.transitions.with_label_values(&[to.as_str()]).inc();
        }
        if !report.transitions.is_empty() || report.opened + report.resolved > 0 {
            tracing::info!(
                transitions = report.transitions.len(),
                opened = report.opened,
                resolved = report.resolved,
                ms = elapsed.as_millis() as u64,
                "liveness cycle"
            );
        }
        if elapsed > self.check {
            tracing::warn!(ms = elapsed.as_millis() as u64, "a liveness cycle took longer than health.check_interval");
        }
    }

    async fn evaluate(
        &self,
        held: &mut db::SessionLock,
        last_score: &mut tokio::time::Instant,
    ) -> Result<Ended, DbError> {
        let (params, check) = (self.params, self.check);
        let mut every = crate::every::Every::new(check, self.stop);
        let mut failures = 0;
        let mut waiting = None;
        while every.tick().await {
            // Between cycles, so that a cycle is never cut short.
            if db::outlived(held, self.max_lifetime) {
                return Ok(Ended::Aged);
            }
            if self.waits_for_ingest(&mut waiting) {
                continue;
            }
            let client: &mut tokio_postgres::Client = held;
            let started = std::time::Instant::now();
            match liveness_cycle(client, params, self.replica, None).await {
                Ok(report) => {
                    failures = 0;
                    self.after_liveness(&report, started.elapsed());
                }
                Err(e) if e.is_unavailable() => return Err(e),
                // A statement that fails again and again (a broken
                // migration, a bad row) must not pin leadership here:
                // after a few in a row, give the lock up so another
                // replica, or a fresh connection, tries.
                Err(e) => {
                    crate::metrics::METRICS.cycle_failures.with_label_values(&["liveness"]).inc();
                    if failures + 1 >= MAX_FAILED_CYCLES {
                        return Err(e);
                    }
                    failures += 1;
                    tracing::error!(error = %e, "liveness cycle failed; trying again next interval");
                }
            }
            if last_score.elapsed() >= self.score_every {
                *last_score = tokio::time::Instant::now();
                let started = std::time::Instant::now();
                match score_pass(client, params, None).await {
                    Ok(report) => {
                        crate::metrics::METRICS
                            .cycle_seconds
                            .with_label_values(&["score"])
                            .observe(started.elapsed().as_secs_f64());
                        tracing::debug!(?report, "score pass");
                    }
                    Err(e) if e.is_unavailable() => return Err(e),
                    Err(e) => {
                        crate::metrics::METRICS.cycle_failures.with_label_values(&["score"]).inc();
                        tracing::error!(error = %e, "score pass failed; trying again next interval");
                    }
                }
            }
        }
        Ok(Ended::Stopped)
    }
}

/// Requests the self-heartbeat URL without ever holding up evaluation: one
/// request at a time, in the background, with a short timeout.
struct Pinger {
    url: String,
    http: reqwest::Client,
    busy: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Pinger {
    fn new(url: String) -> Self {
        crate::alerting::tls::install_crypto_provider();
        // No redirects, as for every outbound request: the URL may carry a
        // token, which a redirect would hand to another host.
        let http = reqwest::Client::builder()
            .timeout(StdDuration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self { url, http, busy: Default::default() }
    }

    fn ping(&self) {
        use std::sync::atomic::Ordering;
        if self.busy.swap(true, Ordering::AcqRel) {
            return; // the previous ping is still on its way
        }
        let (http, url, busy) = (self.http.clone(), self.url.clone(), self.busy.clone());
        tokio::spawn(async move {
            match http.get(&url).send().await {
                Ok(r) if r.status().is_success() => {}
                // The URL may hold a token: log the outcome, never the URL.
                Ok(r) => tracing::warn!(status = r.status().as_u16(), "self-heartbeat ping was refused"),
                Err(e) => tracing::warn!(error = %e.without_url(), "self-heartbeat ping failed"),
            }
            busy.store(false, Ordering::Release);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    /// An online agent heard from at `now`, with no metrics or events: the
    /// figures each test sets come on top.
    fn facts(now: DateTime<Utc>, labels: &Value) -> ScoreFacts<'_> {
        ScoreFacts {
            now,
            liveness: Some(Liveness::Online),
            labels,
            first_seen: now,
            last_seen: now,
            interval_s: 10.0,
            beats_decayed: 0.0,
            beats_expected: 0.0,
            tolerance: 0.2,
            arrival_cv: None,
            latency: None,
            cpu: None,
            memory: None,
            errors: None,
            work: None,
            error_events: 0,
        }
    }

    #[test]
    fn a_new_agents_steady_counter_rates_read_as_those_rates() {
        use crate::health::stats::{HOUR_S, Regression};
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let labels = serde_json::json!({});
        // Five minutes old, 30 heartbeats (every 10 s).
        let age_s: f64 = 300.0;
        let inputs = |work: Option<&MetricStat>, errors: Option<&MetricStat>| {
            score_inputs(ScoreFacts {
                first_seen: now - Duration::seconds(age_s as i64),
                beats_decayed: 30.0,
                beats_expected: 360.0 * (1.0 - (-age_s / 3600.0).exp()),
                errors,
                work,
                ..facts(now, &labels)
            })
        };
        // 600 items an hour for 5 minutes, as the decayed sum holds them.
        let work = MetricStat {
            samples: 30,
            updated_at: now,
            fast: 600.0,
            slow: 600.0,
            hour_sum: 600.0 * (1.0 - (-age_s / HOUR_S).exp()),
            trend: Regression::default(),
        };
        let with_work = inputs(Some(&work), None);
        let rate = with_work.work_per_hour.unwrap();
        assert!((rate - 600.0).abs() < 1.0, "{rate}");
        assert_eq!(with_work.work_reference_per_hour, Some(600.0));

        // Without a work metric errors are counted against heartbeats, both
        // scaled alike: 3 errors in 30 heartbeats is 10 %, not 120 %.
        let errors = MetricStat { hour_sum: 3.0, fast: 36.0, slow: 36.0, ..work };
        let with_errors = inputs(None, Some(&errors));
        let rate = with_errors.errors_per_hour.unwrap() / with_errors.work_per_hour.unwrap();
        assert!((rate - 0.1).abs() < 0.005, "{rate}");
    }

    #[test]
    fn an_interval_over_an_hour_is_delivered_until_its_next_heartbeat_is_overdue() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let labels = serde_json::json!({});
        // A daily job, a year old, on schedule until `silent_h` ago.
        let delivery = |silent_h: i64| {
            score_inputs(ScoreFacts {
                first_seen: now - Duration::days(365),
                last_seen: now - Duration::hours(silent_h),
                interval_s: 86_400.0,
                beats_decayed: 1.0,
                beats_expected: 1.0,
                ..facts(now, &labels)
            })
            .delivery
            .unwrap()
        };
        assert_eq!(delivery(0), 1.0, "just beat");
        assert_eq!(delivery(12), 1.0, "mid-day: nothing owed yet");
        assert_eq!(delivery(28), 1.0, "within the tolerance");
        assert!((delivery(48) - 0.6).abs() < 1e-9, "two days silent: 28.8 h of 48 covered, {}", delivery(48));
        assert!(delivery(96) < 0.31, "four days silent");
        // Just over an hour, on schedule, at any point in its interval.
        let at = |since_min: i64| {
            score_inputs(ScoreFacts {
                first_seen: now - Duration::days(30),
                last_seen: now - Duration::minutes(since_min),
                interval_s: 66.0 * 60.0,
                beats_decayed: 1.6,
                beats_expected: 1.6,
                ..facts(now, &labels)
            })
            .delivery
            .unwrap()
        };
        assert_eq!((at(0), at(33), at(79)), (1.0, 1.0, 1.0));
        assert!(at(120) < at(100) && at(100) < 1.0, "falls steadily once overdue");
    }

    #[test]
    fn an_agent_minutes_old_gets_no_throughput_verdict_yet() {
        use crate::health::stats::Regression;
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let labels = serde_json::json!({});
        let work = MetricStat {
            samples: 9,
            updated_at: now,
            fast: 18_000.0,
            slow: 18_000.0,
            hour_sum: 90.0,
            trend: Regression::default(),
        };
        let at_age = |age_s: i64| {
            score_inputs(ScoreFacts {
                first_seen: now - Duration::seconds(age_s),
                interval_s: 2.0,
                beats_decayed: age_s as f64 / 2.0,
                beats_expected: age_s as f64 / 2.0,
                work: Some(&work),
                ..facts(now, &labels)
            })
        };
        assert_eq!(at_age(18).work_reference_per_hour, None, "18 s old: its rate reads low, so no verdict");
        assert_eq!(at_age(200).work_reference_per_hour, Some(18_000.0));
    }

    #[test]
    fn an_open_metric_incident_stays_open_until_its_figure_is_clearly_below() {
        let params = EvalParams::from_settings(&Settings::defaults().health);
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let stats = HashMap::new();
        // 5 % is the threshold; floating point puts a steady 5 % a hair under.
        let at = |rate: f64, cpu: f64, open: bool| {
            let inputs = Inputs {
                errors_per_hour: Some(rate * 1000.0),
                work_per_hour: Some(1000.0),
                cpu_percent: Some(cpu),
                ..Inputs::default()
            };
            let mut wanted = HashMap::new();
            let details = json!({"resource": "cpu"});
            metric_issues("a", &inputs, &stats, &params, (now, now), |_| open.then_some(&details), &mut wanted);
            let mut issues: Vec<IssueType> =
                wanted.into_iter().filter(|(_, w)| !w.predicted).map(|(k, _)| k.1).collect();
            issues.sort_by_key(|i| i.as_str());
            issues
        };
        let both = vec![IssueType::HighErrorRate, IssueType::ResourceExhaustion];
        // CPU is critical at 90 %.
        assert!(at(0.0499999999, 89.9, false).is_empty(), "not yet");
        assert_eq!(at(0.05, 90.0, false), both);
        assert_eq!(at(0.0499999999, 89.9, true), both, "open: a hair under keeps it");
        assert_eq!(at(0.046, 82.0, true), both);
        assert!(at(0.044, 80.0, true).is_empty(), "clearly below clears");
        // The open resource incident is about cpu: memory is not held by it.
        let memory = |percent: f64| {
            let inputs = Inputs { memory_percent: Some(percent), ..Inputs::default() };
            let mut wanted = HashMap::new();
            let details = json!({"resource": "cpu"});
            metric_issues("a", &inputs, &stats, &params, (now, now), |_| Some(&details), &mut wanted);
            wanted.values().any(|w| !w.predicted)
        };
        let critical = params.thresholds.memory_critical;
        assert!(!memory(critical - 1.0), "memory a little under its own threshold opens nothing");
        assert!(memory(critical));
    }

    #[test]
    fn a_history_snapshot_is_due_a_little_early_not_a_pass_late() {
        let params = EvalParams::from_settings(&Settings::defaults().health);
        assert_eq!((params.history_interval, params.check_interval), (Duration::minutes(1), Duration::seconds(10)));
        let last = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        assert!(snapshot_due(last, last + Duration::milliseconds(59_990), &params), "the next pass, a hair early");
        assert!(snapshot_due(last, last + Duration::seconds(60), &params));
        assert!(!snapshot_due(last, last + Duration::seconds(30), &params), "not every pass of a faster schedule");
    }
}
