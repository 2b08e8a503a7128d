//! Extractors that admit a request only with a key of the needed scope:
//! `Authorized<IngestScope>`, `Authorized<ReadScope>`, `Authorized<AdminScope>`.
//!
//! The key comes as `Authorization: Bearer KEY`. A request without that
//! header may instead carry a web console session cookie (EventSource
//! cannot send headers): it then acts with the scopes of the key the
//! session was opened with, for GET and HEAD only unless it also sends the
//! session's CSRF token (see `crate::console::session`). A request that
//! does send `Authorization` is judged by it alone.

use std::marker::PhantomData;

use axum::extract::FromRequestParts;
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
        let header = crate::auth::bearer_header(&parts.headers);
        let session = if header.is_none() && state.auth.enabled() {
            match crate::console::session::api_principal(parts, state, S::SCOPE).await {
                // Refused, but the session is live: its key pays for the
                // lookup, as for any call it makes (429 once spent).
                Err(AuthError::CsrfToken { key_id: Some(key_id) }) => {
                    super::limit::charge_session(state, &key_id)?;
                    return Err(AuthError::CsrfToken { key_id: None }.into());
                }
                other => other.map_err(ApiError::from)?,
            }
        } else {
            None
        };
        if let Some(principal) = session {
            // The rate limit charges bearer keys before this; a session's
            // calls go to its key's bucket here, now that it is known.
            if let Some(key_id) = &principal.key_id {
                super::limit::charge_session(state, key_id)?;
            }
            return Ok(Self { principal, _scope: PhantomData });
        }
        let principal = state.auth.authenticate(header, S::SCOPE).await.map_err(ApiError::from)?;
        Ok(Self { principal, _scope: PhantomData })
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing | AuthError::Invalid => ApiError::unauthorized(e.to_string()),
            AuthError::Forbidden(_) | AuthError::CsrfToken { .. } => ApiError::forbidden(e.to_string()),
            AuthError::Db(db) => db.into(),
        }
    }
}
