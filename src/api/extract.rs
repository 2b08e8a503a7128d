//! Extractors whose refusals are [`ApiError`]s: axum's own answer a path
//! or query string they cannot decode (`/v1/agents/a%FF`) in plain text,
//! outside the JSON error contract.

use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;

use super::ApiError;

/// The one `{id}` of a path, as text.
pub struct IdPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(Self(id)),
            Err(e) => Err(ApiError::invalid("id", format!("cannot be read: {}", e.body_text()))),
        }
    }
}

/// The query string's parameters, in order, repeats kept (see
/// [`super::read::Params`]).
pub struct QueryPairs(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryPairs {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<Vec<(String, String)>>::from_request_parts(parts, state).await {
            Ok(Query(pairs)) => Ok(Self(pairs)),
            Err(e) => Err(ApiError::invalid("query", format!("the query string cannot be read: {}", e.body_text()))),
        }
    }
}
