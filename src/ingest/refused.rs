//! Heartbeats refused at capacity, remembered as signs of life.
//!
//! A heartbeat refused because the queue is full passed its key check and
//! validation: its agent was alive when it sent it. (So did one given up
//! unanswered, its deadline passing while the database stalled: those are
//! noted too.) Counting only stored
//! heartbeats, an overloaded warden would take the agents it turns away
//! late and offline, and page and restart them for its own overload. So
//! each refused agent's latest refusal goes to `warden.ingest_refusals`
//! (see V23), and liveness counts silence from it.
//!
//! Refusals are gathered in memory and written by one task, at once and
//! then at most every [`RECORD_EVERY`] while they keep coming: one small
//! statement however many heartbeats are turned away, so that recording
//! them does not feed the overload. What cannot be written is tried again
//! with the next ones (within the same bound).

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

    /// Puts back refusals that could not be written, for the next try.
    fn restore(&self, refused: Vec<(String, Instant)>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for (agent, at) in refused {
            if let Some(latest) = pending.get_mut(&agent) {
                *latest = (*latest).max(at);
            } else if pending.len() < MAX_PENDING {
                pending.insert(agent, at);
            }
        }
    }

    /// Writes refusals as they come until `stop`.
    pub(super) async fn record(self: Arc<Self>, pool: Pool, stop: CancellationToken) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = stop.cancelled() => return,
            }
            let refused = self.take();
            if refused.is_empty() {
                continue;
            }
            let mut refused: Vec<(String, Instant)> = refused.into_iter().collect();
            // Replicas upsert the same rows: the same order keeps them from
            // deadlocking over them.
            refused.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            match write(&pool, &refused).await {
                Ok(()) => failing = false,
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, agents = refused.len(), "could not record heartbeats refused at capacity; retrying");
                    }
                    failing = true;
                    // Tried again after the pause, with any new ones.
                    self.restore(refused);
                    self.wake.notify_one();
                }
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
/// `refused` is in agent_id order.
async fn write(pool: &Pool, refused: &[(String, Instant)]) -> Result<(), DbError> {
    let client = db::client(pool).await?;
    let statement = client
        .prepare_cached(
            "INSERT INTO warden.ingest_refusals AS r (agent_id, refused_at) \
             SELECT v.agent_id, statement_timestamp() - v.age_ms * interval '1 millisecond' \
             FROM unnest($1::text[], $2::float8[]) AS v(agent_id, age_ms) \
             JOIN warden.agent_status s ON s.agent_id = v.agent_id \
             ORDER BY v.agent_id COLLATE \"C\" \
             ON CONFLICT (agent_id) DO UPDATE SET refused_at = greatest(r.refused_at, excluded.refused_at)",
        )
        .await?;
    // Ages from just before the statement starts, so that the database
    // dates each refusal from its own clock.
    let now = Instant::now();
    let ages_ms: Vec<f64> = refused.iter().map(|(_, at)| now.duration_since(*at).as_secs_f64() * 1000.0).collect();
    let agents: Vec<&str> = refused.iter().map(|(agent, _)| agent.as_str()).collect();
    client.execute(&statement, &[&agents, &ages_ms]).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_put_back_keep_each_agents_latest() {
        let refused = Refused::default();
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(1);
        refused.note(["a", "b"], t0);
        let taken: Vec<(String, Instant)> = refused.take().into_iter().collect();
        assert!(refused.take().is_empty(), "taken means gone");
        // While the write failed, "a" was refused again.
        refused.note(["a"], later);
        refused.restore(taken);
        let pending = refused.take();
        assert_eq!(pending.len(), 2);
        assert_eq!((pending["a"], pending["b"]), (later, t0));
    }
}
