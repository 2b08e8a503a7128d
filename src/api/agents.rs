//! DELETE /v1/agents/{id} (admin): an agent gone for good leaves the fleet.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::auth::{AdminScope, Authorized};
use super::extract::IdPath;
use super::{ApiError, AppState};
use crate::db;
use crate::health::removal::{self, RemoveError};
use crate::model::AgentId;

pub async fn remove(
    State(state): State<AppState>,
    auth: Authorized<AdminScope>,
    IdPath(id): IdPath,
) -> Result<Json<Value>, ApiError> {
    let id = AgentId::parse(id).map_err(|m| ApiError::invalid("id", m))?;
    let by = auth.principal.key_name.clone().unwrap_or_else(|| "anonymous".into());
    let mut client = db::client(&state.pool).await?;
    match removal::remove(&mut client, id.as_str(), &by, None).await {
        Ok(removed) => Ok(Json(json!(removed))),
        Err(e @ RemoveError::NotFound(_)) => Err(ApiError::not_found(e.to_string())),
        Err(e @ RemoveError::Recovering(_)) => Err(ApiError::conflict(e.to_string())),
        Err(RemoveError::Db(e)) => Err(e.into()),
    }
}
