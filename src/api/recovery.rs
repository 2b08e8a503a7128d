//! Recovery over HTTP: the action history (read) and a manual run (admin).

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::auth::{AdminScope, Authorized, ReadScope};
use super::extract::{IdPath, QueryPairs};
use super::read::Params;
use super::{ApiError, AppState};
use crate::db;
use crate::model::AgentId;
use crate::recovery::{self, ManualError};

pub fn router() -> Router<AppState> {
    Router::new().route("/recoveries", get(list)).route("/agents/{id}/recover", post(run))
}

async fn list(
    State(state): State<AppState>,
    _auth: Authorized<ReadScope>,
    QueryPairs(raw): QueryPairs,
) -> Result<Json<Value>, ApiError> {
    let params = Params::new(raw, &["agent", "incident", "cursor", "limit"])?;
    let agent = params.agent("agent")?;
    let number = |name: &str| -> Result<Option<i64>, ApiError> {
        params
            .text(name)
            .map(|v| v.parse::<i64>().map_err(|_| ApiError::invalid(name, "must be a whole number")))
            .transpose()
    };
    let incident = number("incident")?;
    let cursor = number("cursor")?;
    let limit = params.limit()?;
    let client = db::client(&state.pool).await?;
    let rows = recovery::history(&client, agent.as_ref().map(AgentId::as_str), incident, cursor, limit + 1).await?;
    let (rows, next) = super::read::page(rows, limit, |r| r.id.to_string());
    Ok(Json(json!({ "recoveries": rows, "next_cursor": next })))
}

/// Unknown fields are refused: a misspelt `strategy` would otherwise run
/// the default strategy, which cannot be taken back.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RunRequest {
    strategy: Option<String>,
}

/// Queues a recovery of the agent now; 202 with the job id.
async fn run(
    State(state): State<AppState>,
    _auth: Authorized<AdminScope>,
    IdPath(id): IdPath,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let agent = AgentId::parse(id).map_err(|m| ApiError::invalid("id", m))?;
    let body = super::ingest::read_limited(body, state.settings.ingest.max_body_bytes).await?;
    let request: RunRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RunRequest::default()
    } else {
        crate::ingest::heartbeat::parse_json(&body).map_err(super::ingest::parse_error)?
    };
    if !state.settings.recovery.enabled {
        return Err(ApiError::conflict("recovery is disabled (recovery.enabled = false)"));
    }
    let mut client = db::client(&state.pool).await?;
    let job = recovery::run_now(&mut client, &state.settings.recovery, agent.as_str(), request.strategy.as_deref())
        .await
        .map_err(|e| match e {
            ManualError::UnknownAgent(_) => ApiError::not_found(e.to_string()),
            ManualError::UnknownStrategy(_) => ApiError::invalid("strategy", e.to_string()),
            ManualError::NoStrategy(_) | ManualError::AlertOnly(_) => ApiError::invalid("strategy", e.to_string()),
            ManualError::NoStrategies => ApiError::conflict(e.to_string()),
            ManualError::Busy(_) | ManualError::ActionRunning { .. } => ApiError::conflict(e.to_string()),
            ManualError::Db(db) => db.into(),
        })?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "job_id": job, "agent_id": agent }))))
}
