//! GET /v1/stream: server-sent events of status changes and incidents, as
//! they commit, from every replica (see `crate::stream`).
//!
//! `?agent=ID` narrows the stream to one agent; with `&heartbeats=true` that
//! agent's raw heartbeats are added as they arrive (observation mode, for
//! debugging one agent). Observation is registered in
//! `warden.observed_agents` for a minute at a time and refreshed while the
//! client listens, so the ingest path only announces heartbeats somebody
//! is watching.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::FromRequestParts;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::auth::{Authorized, ReadScope};
use super::extract::QueryPairs;
use super::read::Params;
use super::{ApiError, AppState};
use crate::model::AgentId;
use crate::stream::{Hub, Resume, StreamEvent};

/// Seconds a client over its key's stream limit is asked to wait.
const PER_KEY_RETRY_AFTER: u64 = 15;

/// One of a key's open streams, counted in `AppState::streams_per_key`
/// while it lives.
struct KeyStream {
    counts: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    key_id: String,
}

impl KeyStream {
    fn open(state: &AppState, key_id: String) -> Result<Self, ApiError> {
        let limit = state.settings.server.max_streams_per_key;
        let counts = state.streams_per_key.clone();
        {
            let mut open = counts.lock().unwrap_or_else(|e| e.into_inner());
            let n = open.entry(key_id.clone()).or_default();
            if *n >= limit {
                return Err(ApiError::new(
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!(
                        "{limit} event streams are open with this key on this replica, its limit \
                         (server.max_streams_per_key); close one or retry later"
                    ),
                )
                .with_retry_after(PER_KEY_RETRY_AFTER));
            }
            *n += 1;
        }
        Ok(Self { counts, key_id })
    }
}

impl Drop for KeyStream {
    fn drop(&mut self) {
        let mut open = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key_id) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key_id);
            }
        }
    }
}

/// How long one registration of an observed agent lasts; refreshed at half.
const OBSERVE_FOR: Duration = Duration::from_secs(60);

pub fn router() -> Router<AppState> {
    Router::new().route("/stream", get(stream))
}

async fn stream(
    State(state): State<AppState>,
    auth: Authorized<ReadScope>,
    headers: HeaderMap,
    QueryPairs(raw): QueryPairs,
) -> Result<impl IntoResponse, ApiError> {
    let params = Params::new(raw, &["agent", "heartbeats"])?;
    let agent = params.agent("agent")?;
    let heartbeats = match params.text("heartbeats") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::invalid("heartbeats", "must be true or false")),
    };
    if heartbeats && agent.is_none() {
        return Err(ApiError::invalid("heartbeats", "observing heartbeats needs agent=ID"));
    }
    // Each stream holds a task, a broadcast receiver and, when observing,
    // a row refreshed in the database: a bounded number per replica.
    let permit = state.streams.clone().try_acquire_owned().map_err(|_| {
        ApiError::unavailable(format!(
            "{} event streams are open on this replica, its limit (server.max_streams); retry shortly",
            state.settings.server.max_streams
        ))
    })?;
    let per_key = match auth.principal.key_id {
        Some(key_id) => Some(KeyStream::open(&state, key_id)?),
        None => None,
    };
    let guard = match (&agent, heartbeats) {
        (Some(agent), true) => Some(observe(&state, agent.clone()).await?),
        _ => None,
    };
    let guard = (guard, permit, per_key);
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let hub = state.hub.clone();
    let (rx, resume, at) = hub.subscribe_after(last_event_id);
    let filter = Filter { agent: agent.clone().map(AgentId::into_string), heartbeats };
    let resumed = matches!(resume, Resume::Replay(_));
    let mut ready = Event::default()
        .event("ready")
        .data(serde_json::json!({ "agent": agent, "heartbeats": heartbeats, "resumed": resumed }).to_string());
    // A replay's own events carry the ids; `ready` before them must not,
    // or a client cut off right after it would skip them on its return.
    if !resumed {
        ready = ready.id(at);
    }
    let mut pending = std::collections::VecDeque::from([ready]);
    let mut replay = std::collections::VecDeque::new();
    match resume {
        Resume::Fresh => {}
        // Shared, and made SSE events one at a time as they are sent: a
        // crowd reconnecting at once holds no copies.
        Resume::Replay(missed) => replay.extend(missed.into_iter().filter(|e| filter.admits(e))),
        Resume::Lost => pending.push_back(
            Event::default().event(crate::stream::LAGGED).data(r#"{"missed":null,"reason":"not_resumable"}"#),
        ),
    }
    // The credential is checked again as long as the stream lasts: a key
    // revoked ends its streams within about twice auth.cache_ttl (the key
    // cache's age plus the period). A console session is looked up in the
    // database at every check, uncached, so its streams are checked every
    // RECHECK_MIN: a logout or a revoked key ends them within seconds, as
    // it ends the session's pages at once.
    let every = if crate::auth::bearer_header(&headers).is_some() {
        state.settings.auth.cache_ttl.get().max(RECHECK_MIN)
    } else {
        RECHECK_MIN
    };
    let recheck = Recheck { state: state.clone(), headers, every };
    // Clients that reconnect together (after a restart) are not checked in
    // step: the first check falls anywhere in the second half of a period.
    let first = recheck.every.mul_f64(0.5 + 0.5 * crate::alerting::dispatcher::jitter());
    let open = Open {
        rx,
        filter,
        _guard: guard,
        pending,
        replay,
        skipped: None,
        position_at: tokio::time::Instant::now(),
        recheck,
        next_check: tokio::time::Instant::now() + first,
        closing: hub.closing(),
        hub,
    };
    let events = futures_util::stream::unfold(open, |mut open| async move {
        let event = open.next().await?;
        Some((Ok::<_, Infallible>(event), open))
    });
    // nginx buffers proxied responses unless told not to: the events
    // would sit in its buffer, and the console never go live.
    Ok((
        [(HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no"))],
        Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))),
    ))
}

/// One open stream's state.
struct Open<G> {
    rx: tokio::sync::broadcast::Receiver<Arc<StreamEvent>>,
    filter: Filter,
    /// Held for the stream's life: its permits and observation.
    _guard: G,
    /// Sent before anything live: `ready`, then `lagged` or the replay.
    pending: std::collections::VecDeque<Event>,
    replay: std::collections::VecDeque<Arc<StreamEvent>>,
    /// The last event this stream's filter left out since it last sent
    /// one, and when to tell the client its position anyway.
    skipped: Option<u64>,
    position_at: tokio::time::Instant,
    recheck: Recheck,
    next_check: tokio::time::Instant,
    closing: CancellationToken,
    hub: Arc<Hub>,
}

impl<G> Open<G> {
    /// The next event to send; `None` ends the stream.
    async fn next(&mut self) -> Option<Event> {
        if let Some(event) = self.pending.pop_front() {
            return Some(event);
        }
        if let Some(event) = self.replay.pop_front() {
            return Some(sse_event(&self.hub, &event));
        }
        loop {
            let received = tokio::select! {
                // Shutting down: the drain would wait for this stream.
                _ = self.closing.cancelled() => return None,
                received = self.rx.recv() => received,
                _ = tokio::time::sleep_until(self.next_check) => {
                    let allowed = tokio::select! {
                        allowed = self.recheck.still_allowed() => allowed,
                        _ = self.closing.cancelled() => return None,
                    };
                    if !allowed {
                        return None;
                    }
                    self.next_check = tokio::time::Instant::now() + self.recheck.every;
                    continue;
                }
                // A narrowed stream may see nothing for longer than the hub
                // keeps events; an id alone (no event is dispatched) moves
                // the client's Last-Event-ID past what it did not want, so
                // that it can still resume.
                _ = tokio::time::sleep_until(self.position_at), if self.skipped.is_some() => {
                    let seq = self.skipped.take().unwrap_or_default();
                    return Some(Event::default().id(self.hub.id(seq)));
                }
            };
            match received {
                Ok(event) if self.filter.admits(&event) => {
                    self.skipped = None;
                    return Some(sse_event(&self.hub, &event));
                }
                Ok(event) => {
                    if self.skipped.is_none() {
                        self.position_at = tokio::time::Instant::now() + POSITION_EVERY;
                    }
                    self.skipped = Some(event.seq);
                }
                // A client too slow to keep up is told, so it can refetch.
                Err(RecvError::Lagged(missed)) => {
                    return Some(
                        Event::default().event(crate::stream::LAGGED).data(format!("{{\"missed\":{missed}}}")),
                    );
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

fn sse_event(hub: &Hub, event: &StreamEvent) -> Event {
    Event::default().id(hub.id(event.seq)).event(event.kind.as_str()).data(event.data.as_str())
}

/// How long after the first event a stream's filter leaves out it sends
/// its position (an id alone), unless it sent an event meanwhile.
const POSITION_EVERY: Duration = Duration::from_secs(5);

/// Shortest time between two checks of a stream's credential.
const RECHECK_MIN: Duration = Duration::from_secs(5);

/// What a stream needs to check its credential again.
struct Recheck {
    state: AppState,
    headers: HeaderMap,
    every: Duration,
}

impl Recheck {
    /// False once the key or session is refused.
    async fn still_allowed(&self) -> bool {
        let (mut parts, ()) = axum::http::Request::get("/v1/stream").body(()).unwrap_or_default().into_parts();
        parts.headers = self.headers.clone();
        match Authorized::<ReadScope>::from_request_parts(&mut parts, &self.state).await {
            Ok(_) => true,
            Err(e) => undecided(e.status),
        }
    }
}

/// Whether a refused re-check leaves the credential's standing open: a
/// database that cannot answer, or a rate limit spent by the key's other
/// calls, says nothing of the key (the next check asks again); a refusal
/// of the key or session itself does.
fn undecided(status: axum::http::StatusCode) -> bool {
    status.is_server_error() || status == axum::http::StatusCode::TOO_MANY_REQUESTS
}

struct Filter {
    agent: Option<String>,
    heartbeats: bool,
}

impl Filter {
    fn admits(&self, event: &StreamEvent) -> bool {
        // What was missed may concern any agent.
        if event.kind == crate::stream::LAGGED {
            return true;
        }
        if event.kind == "heartbeat" && !self.heartbeats {
            return false;
        }
        match &self.agent {
            Some(agent) => event.agent_id.as_deref() == Some(agent.as_str()),
            None => true,
        }
    }
}

/// Registers `agent` as observed and keeps refreshing it until the returned
/// guard is dropped (the client disconnected).
async fn observe(state: &AppState, agent: AgentId) -> Result<DropGuard, ApiError> {
    refresh(&state.pool, agent.as_str()).await?;
    let token = CancellationToken::new();
    let pool = state.pool.clone();
    let stop = token.clone();
    let agent = Arc::new(agent);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(OBSERVE_FOR / 2) => {}
            }
            if let Err(e) = refresh(&pool, agent.as_str()).await {
                tracing::warn!(error = %e, "could not refresh an observed agent");
            }
        }
    });
    Ok(token.drop_guard())
}

async fn refresh(pool: &deadpool_postgres::Pool, agent: &str) -> Result<(), ApiError> {
    let client = crate::db::client(pool).await?;
    client
        .execute(
            "WITH gone AS (DELETE FROM warden.observed_agents WHERE until < now()) \
             INSERT INTO warden.observed_agents (agent_id, until) VALUES ($1, now() + $2::float8 * interval '1 second') \
             ON CONFLICT (agent_id) DO UPDATE SET until = greatest(warden.observed_agents.until, EXCLUDED.until)",
            &[&agent, &OBSERVE_FOR.as_secs_f64()],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    #[test]
    fn only_a_refused_credential_ends_a_stream() {
        for status in [StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN] {
            assert!(!super::undecided(status), "{status}");
        }
        for status in
            [StatusCode::TOO_MANY_REQUESTS, StatusCode::SERVICE_UNAVAILABLE, StatusCode::INTERNAL_SERVER_ERROR]
        {
            assert!(super::undecided(status), "{status}");
        }
    }
}
