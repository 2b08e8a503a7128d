//! Extractors that admit a request only with a key of the needed scope:
//! `Authorized<IngestScope>`, `Authorized<ReadScope>`, `Authorized<AdminScope>`.

use std::marker::PhantomData;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::{ApiError, AppState};
use crate::auth::{AuthError, Principal, Scope};

pub trait RequiredScope: Send + Sync {
    const SCOPE: Scope;
}

pub struct IngestScope;
pub struct ReadScope;
pub struct AdminScope;

impl RequiredScope for IngestScope {
    const SCOPE: Scope = Scope::Ingest;
}
impl RequiredScope for ReadScope {
    const SCOPE: Scope = Scope::Read;
}
impl RequiredScope for AdminScope {
    const SCOPE: Scope = Scope::Admin;
}

/// The caller, proven to hold scope `S`.
pub struct Authorized<S: RequiredScope> {
    pub principal: Principal,
    _scope: PhantomData<S>,
}

impl<S: RequiredScope> FromRequestParts<AppState> for Authorized<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        let principal = state.auth.authenticate(header, S::SCOPE).await.map_err(ApiError::from)?;
        Ok(Self { principal, _scope: PhantomData })
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing | AuthError::Invalid => ApiError::unauthorized(e.to_string()),
            AuthError::Forbidden(_) => ApiError::forbidden(e.to_string()),
            AuthError::Db(db) => db.into(),
        }
    }
}
