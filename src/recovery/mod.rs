//! Automated recovery: when an incident opens, warden tries to fix it
//! before it wakes anyone, and records every step in
//! `warden.recovery_actions`.
//!
//! - [`plan`]: pure decisions (strategy, next action, backoff, verification
//!   time, placeholder filling).
//! - [`exec`]: running a command or an HTTP call, bounded and logged.
//! - [`engine`]: jobs in PostgreSQL, shared by every replica.
//! - this module: manual control (run now, reset, list).

pub mod engine;
pub mod exec;
pub mod plan;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::config::RecoverySettings;
use crate::db::DbError;

/// Why a manual request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManualError {
    #[error("no agent {0}")]
    UnknownAgent(String),
    #[error("no strategy named {0}")]
    UnknownStrategy(String),
    #[error("no configured strategy applies to {0}; name one")]
    NoStrategy(String),
    #[error("no recovery strategies are configured ([[recovery.strategies]] in the settings)")]
    NoStrategies,
    #[error("strategy {0} takes no action (its first action is kind = \"none\", alert only); name one that does")]
    AlertOnly(String),
    #[error("a recovery of {0} is already running or queued")]
    Busy(String),
    #[error(
        "an action of {agent}'s recovery is running on replica {replica} (its lease ends at {until} UTC); \
         cancel once it has ended"
    )]
    ActionRunning { agent: String, replica: String, until: String },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for ManualError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e.into())
    }
}

/// Advisory lock (transaction-scoped) that claims of recovery jobs and
/// manual runs take turns on, across replicas.
pub const CLAIM_LOCK: i64 = 0x7761_7264_656e_3a6a;

/// Waits for [`CLAIM_LOCK`] and holds it to the end of `tx`.
pub(crate) async fn take_claim_turn(tx: &tokio_postgres::Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CLAIM_LOCK]).await.map(drop)
}

/// Queues a manual recovery of `agent` (now, outside backoff and the
/// attempt limit). Returns the job id.
pub async fn run_now(
    client: &mut tokio_postgres::Client,
    settings: &RecoverySettings,
    agent: &str,
    strategy: Option<&str>,
) -> Result<i64, ManualError> {
    let row = client
        .query_opt("SELECT labels FROM warden.agent_status WHERE agent_id = $1", &[&agent])
        .await?
        .ok_or_else(|| ManualError::UnknownAgent(agent.to_string()))?;
    let chosen = match strategy {
        Some(name) => settings
            .strategies
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| ManualError::UnknownStrategy(name.to_string()))?,
        None if settings.strategies.is_empty() => return Err(ManualError::NoStrategies),
        None => {
            let labels = serde_json::from_value(row.get::<_, Value>(0)).unwrap_or_default();
            settings
                .strategies
                .iter()
                .find(|s| s.labels.iter().all(|(k, v)| labels_get(&labels, k) == Some(v)))
                .ok_or_else(|| ManualError::NoStrategy(agent.to_string()))?
        }
    };
    // Queued, it would be cancelled at once, "alert only": the operator
    // asked for a recovery and would be told one was queued.
    if matches!(chosen.actions.first(), None | Some(crate::config::Action::None { .. })) {
        return Err(ManualError::AlertOnly(chosen.name.clone()));
    }
    let tx = client.transaction().await?;
    take_claim_turn(&tx).await?;
    // Removing the agent takes the same lock: it may have been removed
    // while this waited for it.
    ensure_known(&tx, agent).await?;
    // A second request while one is running, verifying or still queued
    // would restart the agent again right after.
    let busy: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM warden.recovery_jobs WHERE agent_id = $1 \
               AND (state IN ('running', 'verifying') OR (state = 'pending' AND manual)))",
            &[&agent],
        )
        .await?
        .get(0);
    if busy {
        return Err(ManualError::Busy(agent.to_string()));
    }
    let id: i64 = tx
        .query_one(
            "INSERT INTO warden.recovery_jobs (agent_id, strategy, manual) VALUES ($1, $2, true) RETURNING id",
            &[&agent, &chosen.name],
        )
        .await?
        .get(0);
    tx.commit().await?;
    Ok(id)
}

/// [`ManualError::UnknownAgent`] unless `agent` is registered.
async fn ensure_known(client: &impl tokio_postgres::GenericClient, agent: &str) -> Result<(), ManualError> {
    match client.query_opt("SELECT 1 FROM warden.agent_status WHERE agent_id = $1", &[&agent]).await? {
        Some(_) => Ok(()),
        None => Err(ManualError::UnknownAgent(agent.to_string())),
    }
}

fn labels_get<'a>(labels: &'a std::collections::BTreeMap<String, String>, key: &str) -> Option<&'a String> {
    labels.get(key)
}

/// Lifts the block on an agent whose recovery gave up: its exhausted jobs
/// (of incidents still open) start afresh, with a fresh attempt window.
/// Returns how many jobs were reset.
///
/// When it resets any, the agent's other unfinished automatic jobs get the
/// fresh window too: their budget counts the agent's attempts since their
/// window began, so one still waiting out its backoff would otherwise
/// count the attempts just forgiven and give up, paging again, as soon as
/// it came due.
///
/// A claim, or a verification or an action's end, under way may be giving
/// up another of the agent's jobs on the attempts about to be forgiven; a
/// reset whose snapshot came before that commits would leave the job
/// given up (and paged) just after the operator reset the agent. So the
/// reset takes its turn on the claim lock, then the agent's unfinished and
/// given-up job rows (in id order; the engine's other paths skip locked
/// rows or lock one), and only then reads them, in a statement of its own.
pub async fn reset(client: &mut tokio_postgres::Client, agent: &str) -> Result<u64, ManualError> {
    let tx = client.transaction().await?;
    take_claim_turn(&tx).await?;
    ensure_known(&tx, agent).await?;
    tx.execute(
        "SELECT 1 FROM warden.recovery_jobs \
         WHERE agent_id = $1 AND state IN ('exhausted', 'pending', 'running', 'verifying') ORDER BY id FOR UPDATE",
        &[&agent],
    )
    .await?;
    let reset: i64 = tx
        .query_one(
            "WITH reset AS ( \
               UPDATE warden.recovery_jobs j SET state = 'pending', next_run_at = now(), window_start = now(), \
                 action_index = 0, action_attempts = 0, attempts = 0, finished_at = NULL, outcome = NULL, \
                 updated_at = now() \
               FROM warden.incidents i \
               WHERE j.agent_id = $1 AND j.state = 'exhausted' AND i.id = j.incident_id AND i.state = 'open' \
               RETURNING 1 \
             ), \
             forgiven AS ( \
               UPDATE warden.recovery_jobs SET window_start = now(), updated_at = now() \
               WHERE agent_id = $1 AND state IN ('pending', 'running', 'verifying') AND NOT manual \
                 AND EXISTS (SELECT 1 FROM reset) \
             ) \
             SELECT count(*) FROM reset",
            &[&agent],
        )
        .await?
        .get(0);
    tx.commit().await?;
    Ok(reset as u64)
}

/// What [`cancel`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Cancelled {
    /// Jobs cancelled: waiting, being verified, or left running by a
    /// replica that is gone.
    pub jobs: u64,
    /// Actions whose verification was cut short or whose replica was gone:
    /// `abandoned`, their effect unknown.
    pub actions: u64,
}

/// Ends the automatic recovery of `agent`: its jobs waiting for their next
/// attempt, or verifying one, are cancelled, and so are those whose action
/// was left running by a replica that is gone (its lease ran out). The
/// incidents stay open and get no new job: their alerts are no longer
/// held for a recovery, and page. A later incident gets a recovery of its
/// own.
///
/// An action running on a live replica cannot be stopped from here (it may
/// be anywhere); the request is refused, saying when its lease ends.
/// `by` is recorded in the outcome and in a `recovery_cancelled` event.
pub async fn cancel(client: &mut tokio_postgres::Client, agent: &str, by: &str) -> Result<Cancelled, ManualError> {
    let tx = client.transaction().await?;
    take_claim_turn(&tx).await?;
    ensure_known(&tx, agent).await?;
    // Jobs before their actions: the order the engine locks them in.
    let jobs = tx
        .query(
            "SELECT id, state, current_action_id, lease_owner, lease_until, lease_until > now() \
             FROM warden.recovery_jobs WHERE agent_id = $1 AND state IN ('pending', 'running', 'verifying') \
             ORDER BY id FOR UPDATE",
            &[&agent],
        )
        .await?;
    if let Some(live) =
        jobs.iter().find(|j| j.get::<_, String>(1) == "running" && j.get::<_, Option<bool>>(5) == Some(true))
    {
        let until: Option<DateTime<Utc>> = live.get(4);
        return Err(ManualError::ActionRunning {
            agent: agent.to_string(),
            replica: live.get::<_, Option<String>>(3).unwrap_or_default(),
            until: until.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_default(),
        });
    }
    let ids: Vec<i64> = jobs.iter().map(|j| j.get(0)).collect();
    let actions: Vec<i64> = jobs.iter().filter_map(|j| j.get::<_, Option<i64>>(2)).collect();
    let abandoned = tx
        .execute(
            "UPDATE warden.recovery_actions SET \
               state = CASE WHEN state IN ('running', 'verifying') THEN 'abandoned' ELSE state END, \
               finished_at = coalesce(finished_at, now()), \
               outcome = coalesce(outcome || '; ', '') || CASE state \
                 WHEN 'running' THEN 'cancelled by ' || $2 || ' after its replica stopped; its effect is unknown' \
                 ELSE 'verification cancelled by ' || $2 END \
             WHERE id = ANY($1) AND state IN ('running', 'verifying', 'timed_out') \
               AND id IN (SELECT current_action_id FROM warden.recovery_jobs \
                          WHERE id = ANY($3) AND state IN ('running', 'verifying'))",
            &[&actions, &by, &ids],
        )
        .await?;
    let cancelled = tx
        .execute(
            "UPDATE warden.recovery_jobs SET state = 'cancelled', finished_at = now(), updated_at = now(), \
               outcome = 'cancelled by ' || $2, lease_owner = NULL, lease_until = NULL, verify_until = NULL \
             WHERE id = ANY($1)",
            &[&ids, &by],
        )
        .await?;
    if cancelled > 0 {
        tx.execute(
            "INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details) \
             VALUES (now(), $1, 'recovery_cancelled', 'info', 'recovery cancelled by ' || $2::text, \
                     jsonb_build_object('by', $2::text, 'job_ids', $3::bigint[]))",
            &[&agent, &by, &ids],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Cancelled { jobs: cancelled, actions: abandoned })
}

/// One row of the recovery history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActionRow {
    pub id: i64,
    pub incident_id: Option<i64>,
    pub agent_id: String,
    pub strategy: String,
    pub action: String,
    pub attempt: i32,
    pub state: String,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: Option<String>,
    pub detail: Value,
}

impl ActionRow {
    /// The columns of warden.recovery_actions that [`ActionRow::from_row`]
    /// reads, in its order.
    pub const COLUMNS: &'static str =
        "id, incident_id, agent_id, strategy, action, attempt, state, started_at, finished_at, outcome, detail";

    pub fn from_row(r: &tokio_postgres::Row) -> Self {
        Self {
            id: r.get(0),
            incident_id: r.get(1),
            agent_id: r.get(2),
            strategy: r.get(3),
            action: r.get(4),
            attempt: r.get(5),
            state: r.get(6),
            started_at: r.get(7),
            finished_at: r.get(8),
            outcome: r.get(9),
            detail: r.get(10),
        }
    }
}

/// Recovery actions, newest first, optionally for one agent or incident,
/// before an id (keyset pagination).
pub async fn history(
    client: &tokio_postgres::Client,
    agent: Option<&str>,
    incident: Option<i64>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<ActionRow>, DbError> {
    let rows = client
        .query(
            &format!(
                "SELECT {} FROM warden.recovery_actions \
                 WHERE ($1::text IS NULL OR agent_id = $1) AND ($2::bigint IS NULL OR incident_id = $2) \
                   AND ($3::bigint IS NULL OR id < $3) \
                 ORDER BY id DESC LIMIT $4",
                ActionRow::COLUMNS
            ),
            &[&agent, &incident, &before, &limit],
        )
        .await?;
    Ok(rows.iter().map(ActionRow::from_row).collect())
}
