//! Heartbeats refused at capacity, remembered as signs of life.
//!
//! A heartbeat refused because the queue is full passed its key check and
//! validation: its agent was alive when it sent it. Counting only stored
//! heartbeats, an overloaded warden would take the agents it turns away
//! late and offline, and page and restart them for its own overload. So
//! each refused agent's latest refusal goes to `warden.ingest_refusals`
//! (see V23), and liveness counts silence from it.
//!
//! Refusals are gathered in memory and written by one task, at once and
//! then at most every [`RECORD_EVERY`] while they keep coming: one small
//! statement however many heartbeats are turned away, so that recording
//! them does not feed the overload. What cannot be written (the database
//! gone too) is dropped: outages have their own record
//! (`warden.ingest_outages`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::db::{self, DbError};

/// The least time between two writes of refusals.
const RECORD_EVERY: Duration = Duration::from_millis(250);
/// Distinct agents remembered between two writes. Ingest keys may name any
/// agent, so the map is bounded; past it, further agents' refusals go
/// unrecorded (and those agents are judged by what was stored).
const MAX_PENDING: usize = 100_000;

/// Refusals at capacity waiting to be written: agent → latest refusal.
#[derive(Default)]
pub(super) struct Refused {
    pending: Mutex<HashMap<String, Instant>>,
    wake: Notify,
}

impl Refused {
    /// Notes that `agents`' heartbeats were refused at `at`.
    pub(super) fn note<'a>(&self, agents: impl IntoIterator<Item = &'a str>, at: Instant) {
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for agent in agents {
                if let Some(latest) = pending.get_mut(agent) {
                    *latest = (*latest).max(at);
                } else if pending.len() < MAX_PENDING {
                    pending.insert(agent.to_owned(), at);
                }
            }
        }
        self.wake.notify_one();
    }

    fn take(&self) -> HashMap<String, Instant> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Writes refusals as they come until `stop`.
    pub(super) async fn record(self: Arc<Self>, pool: Pool, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = stop.cancelled() => return,
            }
            let refused = self.take();
            if refused.is_empty() {
                continue;
            }
            let count = refused.len();
            if let Err(e) = write(&pool, refused).await {
                tracing::warn!(error = %e, agents = count, "could not record heartbeats refused at capacity");
            }
            tokio::select! {
                _ = tokio::time::sleep(RECORD_EVERY) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// One upsert of every refused agent that warden knows (a new agent's
/// first heartbeat registers it; refused, there is nothing to hold back).
async fn write(pool: &Pool, refused: HashMap<String, Instant>) -> Result<(), DbError> {
    let client = db::client(pool).await?;
    let mut refused: Vec<(String, Instant)> = refused.into_iter().collect();
    // Replicas upsert the same rows: the same order keeps them from
    // deadlocking over them.
    refused.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let now = Instant::now();
    let ages_ms: Vec<f64> = refused.iter().map(|(_, at)| now.duration_since(*at).as_secs_f64() * 1000.0).collect();
    let agents: Vec<String> = refused.into_iter().map(|(agent, _)| agent).collect();
    client
        .execute(
            "INSERT INTO warden.ingest_refusals AS r (agent_id, refused_at) \
             SELECT v.agent_id, statement_timestamp() - v.age_ms * interval '1 millisecond' \
             FROM unnest($1::text[], $2::float8[]) AS v(agent_id, age_ms) \
             JOIN warden.agent_status s ON s.agent_id = v.agent_id \
             ORDER BY v.agent_id \
             ON CONFLICT (agent_id) DO UPDATE SET refused_at = greatest(r.refused_at, excluded.refused_at)",
            &[&agents, &ages_ms],
        )
        .await?;
    Ok(())
}
