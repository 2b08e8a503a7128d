//! Removing an agent that is gone for good (decommissioned, renamed, a
//! load test's): it leaves the fleet, its open incidents resolve (their
//! alerts with them, so whoever was paged hears it is over) and its
//! queued recoveries are cancelled. Its history (heartbeats, metrics,
//! events, scores) stays for reports until retention drops it. A heartbeat
//! from it afterwards registers it again, as new.

use chrono::{DateTime, Utc};

use super::incidents::{self, Plan};
use crate::db::{self, DbError};

/// The resolution of an incident whose agent was removed.
pub const RESOLUTION: &str = "agent removed";

/// What removing an agent did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Removed {
    pub agent_id: String,
    pub incidents_resolved: usize,
    pub recoveries_cancelled: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("no agent {0}")]
    NotFound(String),
    /// A recovery action is running or being verified: removing the agent
    /// under it would leave that attempt without an agent to verify.
    #[error("a recovery of {0} is under way; remove it once that has ended (`warden recovery cancel {0}` ends it)")]
    Recovering(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for RemoveError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e.into())
    }
}

/// Removes `agent`, recording `by` (who asked) in its `agent_removed` event.
pub async fn remove(
    client: &mut db::Client,
    agent: &str,
    by: &str,
    now: Option<DateTime<Utc>>,
) -> Result<Removed, RemoveError> {
    let tx = client.transaction().await?;
    let now = super::evaluator::clock(&tx, now).await?;
    // Locks, in the order every other holder takes them: the evaluator's
    // row (a liveness cycle or score pass that read the agent would
    // otherwise open incidents about it, or bring back its statistics,
    // after this commits), the recovery claim lock (no job starts, and no
    // manual run is queued, between the check below and the commit), the
    // agent's row (a heartbeat of it waits, then registers it anew).
    tx.execute("SELECT 1 FROM warden.evaluator_state FOR UPDATE", &[]).await?;
    crate::recovery::take_claim_turn(&tx).await?;
    if tx.query_opt("SELECT 1 FROM warden.agent_status WHERE agent_id = $1 FOR UPDATE", &[&agent]).await?.is_none() {
        return Err(RemoveError::NotFound(agent.to_string()));
    }
    let busy = tx
        .query_opt(
            "SELECT 1 FROM warden.recovery_jobs WHERE agent_id = $1 AND state IN ('running', 'verifying')",
            &[&agent],
        )
        .await?;
    if busy.is_some() {
        return Err(RemoveError::Recovering(agent.to_string()));
    }
    // Statistics before incidents, the order the score pass writes them.
    tx.execute("DELETE FROM warden.agent_metric_stats WHERE agent_id = $1", &[&agent]).await?;
    let open = tx.query("SELECT id FROM warden.incidents WHERE agent_id = $1 AND state = 'open'", &[&agent]).await?;
    let plan = Plan { open: Vec::new(), resolve: open.iter().map(|r| (r.get(0), RESOLUTION.to_string())).collect() };
    let incidents_resolved = plan.resolve.len();
    let notes = incidents::apply(&tx, plan, now).await?;
    let recoveries_cancelled = tx
        .execute(
            "UPDATE warden.recovery_jobs SET state = 'cancelled', finished_at = $2, updated_at = $2, \
               outcome = 'the agent was removed' \
             WHERE agent_id = $1 AND state = 'pending'",
            &[&agent, &now],
        )
        .await?;
    tx.execute("DELETE FROM warden.agent_status WHERE agent_id = $1", &[&agent]).await?;
    tx.execute(
        "INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details) \
         VALUES ($1, $2, 'agent_removed', 'info', 'agent removed by ' || $3::text, \
                 jsonb_build_object('by', $3::text, 'incidents_resolved', $4::integer))",
        &[&now, &agent, &by, &(incidents_resolved as i32)],
    )
    .await?;
    super::evaluator::notify(&tx, &notes).await?;
    tx.commit().await?;
    Ok(Removed { agent_id: agent.to_string(), incidents_resolved, recoveries_cancelled })
}
