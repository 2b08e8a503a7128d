//! The one error type every handler returns, and its JSON shape:
//! `{"error": {"code": "...", "message": "...", "field": "..."}}`.
//!
//! Internal details never reach the client: database and unexpected errors
//! become a generic 500 (or 503 when the database is unreachable) and are
//! logged once, here.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::db::DbError;
use crate::telemetry::Throttle;

/// Seconds a client should wait before retrying after a 503 or 429.
pub const DEFAULT_RETRY_AFTER: u64 = 5;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    pub retry_after: Option<u64>,
    /// A 503 because the database could not be reached at all (not busy,
    /// not unmigrated): the time counts as an ingest outage.
    pub db_unreachable: bool,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), field: None, retry_after: None, db_unreachable: false }
    }

    /// 400: the body is not JSON, or not the expected shape.
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_request", message)
    }

    /// 422: well-formed but a value is not acceptable.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_value", message).with_field(field)
    }

    /// 401: no credentials or unknown credentials.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403: known credentials without the needed scope.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    }

    /// 429, Retry-After being `wait` rounded up to whole seconds.
    pub fn too_many_requests(wait: std::time::Duration) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many requests; slow down")
            .with_retry_after(wait.as_secs_f64().ceil() as u64)
    }

    /// 429 for an address that has failed authentication too often: the
    /// likely cause is a wrong key, which waiting alone does not fix.
    pub fn too_many_failed_authentications(wait: std::time::Duration) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests from this address failed authentication; check the API key \
             (Authorization: Bearer KEY) before retrying",
        )
        .with_retry_after(wait.as_secs_f64().ceil() as u64)
    }

    /// 503 with Retry-After: try again later, nothing was done.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).with_retry_after(DEFAULT_RETRY_AFTER)
    }

    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; the details are in warden's log")
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds.max(1));
        self
    }

    /// Prefixes the field with a batch position: `heartbeats[3].agent_id`.
    pub fn at_index(mut self, list: &str, index: usize) -> Self {
        self.field = Some(match self.field.take() {
            Some(f) => format!("{list}[{index}].{f}"),
            None => format!("{list}[{index}]"),
        });
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

/// One line per kind of database failure every few seconds at most: each
/// request meets the same one while it lasts.
static UNAVAILABLE_LOG: Throttle = Throttle::new(std::time::Duration::from_secs(10));
static BUSY_LOG: Throttle = Throttle::new(std::time::Duration::from_secs(10));
static SCHEMA_LOG: Throttle = Throttle::new(std::time::Duration::from_secs(10));
static ERROR_LOG: Throttle = Throttle::new(std::time::Duration::from_secs(10));

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        if e.is_unavailable() {
            if let Some(more) = UNAVAILABLE_LOG.allow() {
                tracing::warn!(error = %e, more, "database unavailable; answering 503");
            }
            Self { db_unreachable: true, ..Self::unavailable("the database is unavailable; retry later") }
        } else if e.is_transient() {
            if let Some(more) = BUSY_LOG.allow() {
                tracing::warn!(error = %e, more, "the database cannot do this now; answering 503");
            }
            Self::unavailable("the database cannot do this now (busy, or out of space or memory); retry later")
        } else if e.is_schema_missing() {
            if let Some(more) = SCHEMA_LOG.allow() {
                tracing::error!(
                    error = %e,
                    more,
                    "warden's schema is missing from the database (replaced or restored?); answering 503 until \
                     `warden migrate` (or a restart with database.migrate_on_start) brings it back"
                );
            }
            Self::unavailable("the database lacks warden's schema; retry later")
        } else {
            if let Some(more) = ERROR_LOG.allow() {
                tracing::error!(error = %e, more, "database error");
            }
            Self::internal()
        }
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        DbError::from(e).into()
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        DbError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body { error: Inner { code: self.code, message: &self.message, field: self.field.as_deref() } };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        // RFC 9110: a 401 names the scheme that would be accepted.
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unreachable_database_counts_as_an_ingest_outage() {
        let answer = |e: DbError| ApiError::from(e);
        let unreachable = answer(DbError::Unavailable("connection refused".into()));
        assert_eq!((unreachable.status, unreachable.db_unreachable), (StatusCode::SERVICE_UNAVAILABLE, true));
        let refused = answer(DbError::LoginRefused("password authentication failed".into()));
        assert_eq!((refused.status, refused.db_unreachable), (StatusCode::SERVICE_UNAVAILABLE, true));
        for reachable in [DbError::Busy("statement timeout".into()), DbError::SchemaMissing("no api_keys".into())] {
            let answer = answer(reachable);
            assert_eq!((answer.status, answer.db_unreachable), (StatusCode::SERVICE_UNAVAILABLE, false), "{answer}");
            assert!(answer.retry_after.is_some());
        }
        let failed = answer(DbError::Repeated("syntax error".into()));
        assert_eq!((failed.status, failed.db_unreachable), (StatusCode::INTERNAL_SERVER_ERROR, false));
    }
}
