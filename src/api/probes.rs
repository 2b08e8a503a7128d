//! Probes for orchestrators: `/healthz` (the process is alive) and
//! `/readyz` (it can do its job: database reachable, schema current).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::{ApiError, AppState};
use crate::db::{self, migrate};

pub fn router() -> Router<AppState> {
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz))
}

/// Liveness: answers as long as the process serves HTTP. It never touches
/// the database, so an outage does not get healthy replicas restarted.
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: 200 only when the database answers and its schema is at least
/// the version this binary needs; 503 with Retry-After otherwise.
async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let check = async {
        let client = db::client(&state.pool).await?;
        migrate::current_version(&client).await
    };
    let limit = state.settings.database.connect_timeout.get();
    let version = match tokio::time::timeout(limit, check).await {
        Ok(Ok(version)) => version.unwrap_or(0),
        Ok(Err(e)) if e.is_unavailable() => return Err(ApiError::unavailable("the database is unreachable")),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => return Err(ApiError::unavailable("the database did not answer in time")),
    };
    let needed = migrate::latest_version();
    if version < needed {
        return Err(ApiError::unavailable(format!(
            "the database schema is at version {version} but this warden needs {needed}; run `warden migrate`"
        )));
    }
    Ok(Json(json!({ "status": "ready", "schema_version": version })))
}
