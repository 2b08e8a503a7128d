//! POST /v1/heartbeats and POST /v1/events.
//!
//! The key is checked before the body is read. When it cannot be checked
//! because the database is away, the 503 goes out only after the body has
//! been read and dropped (up to `ingest.max_body_bytes`, never buffered):
//! answering earlier makes the server close the connection on a client
//! still sending a large batch, which then sees a failed send instead of
//! the 503 and its Retry-After, and loses its connection. A key that is
//! wrong is refused at once: reading bodies for it would let anyone make
//! warden read megabytes without a key.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Serialize;
use serde_json::json;

use super::auth::{Authorized, IngestScope};
use super::{ApiError, AppState};
use crate::auth::Principal;
use crate::ingest::{self, Ack, ParseError, SubmitError};
use crate::model::AgentId;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/heartbeats", post(post_heartbeats).layer(axum::middleware::from_fn(count_rejects)))
        .route("/events", post(post_events))
}

/// Counts refused heartbeat requests by reason, whichever layer refused
/// them (authentication, body limit, validation, back-pressure).
async fn count_rejects(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let response = next.run(request).await;
    let reason = match response.status().as_u16() {
        200 => return response,
        400 => "malformed",
        401 => "unauthorized",
        403 => "forbidden",
        413 => "too_large",
        422 => "invalid",
        429 => "rate_limited",
        503 => "unavailable",
        _ => "error",
    };
    crate::metrics::METRICS.rejects.with_label_values(&[reason]).inc();
    response
}

#[derive(Serialize)]
struct SingleAnswer {
    received: bool,
    #[serde(flatten)]
    ack: Ack,
}

#[derive(Serialize)]
struct BatchResult<'a> {
    agent_id: &'a str,
    #[serde(flatten)]
    ack: Ack,
}

/// Answers only after the heartbeats are committed.
async fn post_heartbeats(
    State(state): State<AppState>,
    auth: Result<Authorized<IngestScope>, ApiError>,
    body: Body,
) -> Result<Response, ApiError> {
    // A key that cannot be checked because the database is out of reach
    // is an outage for liveness; a busy or unmigrated one is not.
    if auth.as_ref().is_err_and(|e| e.db_unreachable) {
        state.ingestor.refused_unreachable(std::time::Instant::now());
    }
    let (principal, body) = admit(auth, body, state.settings.ingest.max_body_bytes).await?;
    let (heartbeats, batch) =
        ingest::heartbeat::parse_body(&body, &state.limits, chrono::Utc::now()).map_err(parse_error)?;
    check_agents(&principal, heartbeats.iter().map(|h| &h.agent_id), batch.then_some("heartbeats"))?;
    let ids: Vec<_> = if batch { heartbeats.iter().map(|h| h.agent_id.clone()).collect() } else { Vec::new() };
    let acks = state.ingestor.submit(heartbeats).await.map_err(submit_error)?;
    crate::metrics::METRICS.heartbeats.with_label_values(&["http"]).inc_by(acks.len() as u64);
    if !batch {
        return Ok(Json(SingleAnswer { received: true, ack: acks[0] }).into_response());
    }
    let results: Vec<BatchResult> =
        ids.iter().zip(acks).map(|(id, ack)| BatchResult { agent_id: id.as_str(), ack }).collect();
    Ok(Json(json!({ "received": results.len(), "results": results })).into_response())
}

async fn post_events(
    State(state): State<AppState>,
    auth: Result<Authorized<IngestScope>, ApiError>,
    body: Body,
) -> Result<Response, ApiError> {
    let (principal, body) = admit(auth, body, state.settings.ingest.max_body_bytes).await?;
    let (events, batch) = ingest::events::parse_body(&body, &state.limits, chrono::Utc::now()).map_err(parse_error)?;
    check_agents(&principal, events.iter().map(|e| &e.agent_id), batch.then_some("events"))?;
    let mut client = crate::db::client(&state.pool).await?;
    let ids = ingest::events::insert(&mut client, &events, batch)
        .await?
        .map_err(|e| ApiError::invalid(e.field, e.message))?;
    let body =
        if batch { json!({ "received": ids.len(), "ids": ids }) } else { json!({ "received": true, "id": ids[0] }) };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// 403 naming the first agent the key may not report for, so that a batch
/// is written whole or not at all. `batch` names the list of a batch.
pub fn check_agents<'a>(
    principal: &Principal,
    agents: impl IntoIterator<Item = &'a AgentId>,
    batch: Option<&str>,
) -> Result<(), ApiError> {
    let Some((i, agent)) = agents.into_iter().enumerate().find(|(_, a)| !principal.may_report_for(a.as_str())) else {
        return Ok(());
    };
    let field = batch.map_or_else(|| "agent_id".to_string(), |list| format!("{list}[{i}].agent_id"));
    Err(ApiError::forbidden(format!("this API key may not report for agent `{agent}`")).with_field(field))
}

/// The caller and the body of a request whose key check gave `auth` (see
/// the module comment for when a refusal waits for the body).
async fn admit(
    auth: Result<Authorized<IngestScope>, ApiError>,
    body: Body,
    limit: usize,
) -> Result<(Principal, Bytes), ApiError> {
    match auth {
        Ok(authorized) => Ok((authorized.principal, read_limited(body, limit).await?)),
        Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => {
            let mut body = Limited::new(body, limit);
            while let Some(Ok(_)) = body.frame().await {}
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// The body, or 413 past `limit`, or 400 if it could not be read. Every
/// handler with a body reads it so, as a stream, after its extractors
/// (the key check among them) have run; the limit holds whatever the
/// router's `DefaultBodyLimit`.
pub async fn read_limited(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::payload_too_large(limit)),
        Err(e) => Err(ApiError::malformed(format!("the request body could not be read: {e}"))),
    }
}

pub fn parse_error(e: ParseError) -> ApiError {
    match e {
        ParseError::Malformed(message) => ApiError::malformed(message),
        ParseError::Invalid(e) => ApiError::invalid(e.field, e.message),
    }
}

pub fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::QueueFull => {
            ApiError::unavailable("warden is at its ingest capacity; retry shortly").with_retry_after(1)
        }
        SubmitError::Unavailable => ApiError::unavailable("the database is unavailable; nothing was recorded"),
        SubmitError::ShuttingDown => ApiError::unavailable("warden is shutting down; nothing was recorded"),
        SubmitError::Interrupted => ApiError::unavailable(
            "the write was cut short by an internal error: it may still be stored, so a retry may record it twice",
        ),
        SubmitError::Db(e) => e.into(),
    }
}
