//! Alerts and silences: GET /v1/alerts, GET /v1/alerts/{id},
//! POST /v1/alerts/{id}/ack, and POST/GET/DELETE /v1/silences. Reading
//! needs the read scope; acknowledging and silencing need admin.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{AdminScope, Authorized, ReadScope};
use super::extract::{IdPath, QueryPairs};
use super::ingest::{parse_error, read_limited};
use super::read::Params;
use super::{ApiError, AppState};
use crate::alerting::escalation::AlertState;
use crate::alerting::silences::{self, NewSilence};
use crate::alerting::store::{self, AckError, ListFilter};
use crate::db;
use crate::ingest::heartbeat::parse_json;
use crate::model::Severity;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/alerts", get(list_alerts))
        .route("/alerts/{id}", get(get_alert))
        .route("/alerts/{id}/ack", post(ack_alert))
        .route("/silences", get(list_silences).post(create_silence))
        .route("/silences/{id}", delete(remove_silence))
}

fn id_param(raw: &str, what: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::not_found(format!("no {what} {raw:?}: ids are positive whole numbers")))
}

async fn list_alerts(
    State(state): State<AppState>,
    _auth: Authorized<ReadScope>,
    QueryPairs(raw): QueryPairs,
) -> Result<Json<Value>, ApiError> {
    let params = Params::new(raw, &["state", "severity", "cursor", "limit"])?;
    let filter = ListFilter {
        state: params.parsed::<AlertState>("state")?,
        severity: params.parsed::<Severity>("severity")?,
        before: params
            .text("cursor")
            .map(|v| v.parse().map_err(|_| ApiError::invalid("cursor", "must be the next_cursor of a previous page")))
            .transpose()?,
        limit: params.limit()?,
    };
    let client = db::client(&state.pool).await?;
    let rows = store::list(&client, &ListFilter { limit: filter.limit + 1, ..filter }).await?;
    let (rows, next) = super::read::page(rows, filter.limit, |r| r.0.to_string());
    let alerts: Vec<Value> = rows.into_iter().map(|r| r.1).collect();
    Ok(Json(json!({ "alerts": alerts, "next_cursor": next })))
}

async fn get_alert(
    State(state): State<AppState>,
    _auth: Authorized<ReadScope>,
    IdPath(id): IdPath,
) -> Result<Json<Value>, ApiError> {
    let id = id_param(&id, "alert")?;
    let client = db::client(&state.pool).await?;
    store::get(&client, id).await?.map(Json).ok_or_else(|| ApiError::not_found(format!("no alert {id}")))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AckBody {
    by: Option<String>,
    comment: Option<String>,
}

/// Body optional: `{"by": "name", "comment": "..."}`; `by` defaults to the
/// key's name.
async fn ack_alert(
    State(state): State<AppState>,
    auth: Authorized<AdminScope>,
    IdPath(id): IdPath,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let id = id_param(&id, "alert")?;
    let body = read_limited(body, state.settings.ingest.max_body_bytes).await?;
    let ack: AckBody = if body.iter().all(u8::is_ascii_whitespace) {
        AckBody::default()
    } else {
        parse_json(&body).map_err(parse_error)?
    };
    let by = match ack.by.as_deref().map(str::trim) {
        Some(b) if !b.is_empty() => b.to_string(),
        _ => auth.principal.key_name.clone().unwrap_or_else(|| "anonymous".into()),
    };
    let client = db::client(&state.pool).await?;
    match store::acknowledge(&client, id, &by, ack.comment.as_deref()).await {
        Ok(alert) => Ok(Json(alert)),
        Err(AckError::NotFound(_)) => Err(ApiError::not_found(format!("no alert {id}"))),
        Err(e @ AckError::Resolved(_)) => Err(ApiError::conflict(e.to_string())),
        Err(AckError::Invalid { field, message }) => Err(ApiError::invalid(field, message)),
        Err(AckError::Db(e)) => Err(e.into()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SilenceBody {
    agent_id: Option<String>,
    issue_type: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    starts_at: Option<DateTime<Utc>>,
    ends_at: Option<DateTime<Utc>>,
    /// Instead of ends_at: how long from starts_at (or now), like "2h".
    duration: Option<String>,
    comment: String,
    created_by: Option<String>,
}

async fn create_silence(
    State(state): State<AppState>,
    auth: Authorized<AdminScope>,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_limited(body, state.settings.ingest.max_body_bytes).await?;
    let b: SilenceBody = parse_json(&body).map_err(parse_error)?;
    let client = db::client(&state.pool).await?;
    // The database's clock, which the escalator judges silences by: on
    // this replica's, a clock ahead would start the silence late.
    let now = silences::now(&client).await?;
    let ends_at = match (b.ends_at, &b.duration) {
        (Some(_), Some(_)) => return Err(ApiError::invalid("duration", "give ends_at or duration, not both")),
        (Some(end), None) => Some(end),
        (None, Some(d)) => {
            let d = crate::config::Duration::parse(d).map_err(|allowed| ApiError::invalid("duration", allowed))?;
            let end = b.starts_at.unwrap_or(now).checked_add_signed(d.to_chrono());
            Some(end.ok_or_else(|| ApiError::invalid("duration", "a silence may last at most a year"))?)
        }
        (None, None) => None,
    };
    let silence = NewSilence {
        agent_id: b.agent_id,
        issue_type: b.issue_type,
        labels: b.labels,
        // The now the duration was counted from.
        starts_at: Some(b.starts_at.unwrap_or(now)),
        ends_at,
        comment: b.comment,
        created_by: b
            .created_by
            .filter(|c| !c.trim().is_empty())
            .or_else(|| auth.principal.key_name.clone())
            .unwrap_or_else(|| "anonymous".into()),
    };
    silence.validate(now).map_err(|e| ApiError::invalid(e.field, e.message))?;
    let created = silences::create(&client, &silence).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn list_silences(
    State(state): State<AppState>,
    _auth: Authorized<ReadScope>,
    QueryPairs(raw): QueryPairs,
) -> Result<Json<Value>, ApiError> {
    let params = Params::new(raw, &["all"])?;
    let all = match params.text("all") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::invalid("all", "must be true or false")),
    };
    let client = db::client(&state.pool).await?;
    let list = silences::list(&client, all).await?;
    Ok(Json(json!({ "silences": list })))
}

async fn remove_silence(
    State(state): State<AppState>,
    _auth: Authorized<AdminScope>,
    IdPath(id): IdPath,
) -> Result<Json<Value>, ApiError> {
    let id = id_param(&id, "silence")?;
    let client = db::client(&state.pool).await?;
    match silences::remove(&client, id).await? {
        Some(s) => Ok(Json(json!(s))),
        None => Err(ApiError::not_found(format!("no silence {id} in force"))),
    }
}
