//! HTTP: the axum router, shared state, and the middleware every request
//! passes through. Handlers live in one module per resource.

mod alerts;
pub mod auth;
mod deadline;
pub mod error;
mod ingest;
pub mod limit;
mod mcp;
pub mod openapi;
mod probes;
pub mod read;
mod recovery;
mod serve;
mod stream;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use deadpool_postgres::Pool;

use crate::auth::Authenticator;
use crate::config::Settings;
use crate::ingest::{Ingestor, Limits};
pub use error::ApiError;
pub use serve::serve;

/// What handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

pub struct Shared {
    /// The connection pool every handler draws from.
    pub pool: Pool,
    /// Settings as loaded at start-up; immutable for the process lifetime.
    pub settings: Arc<Settings>,
    /// Verifies API keys.
    pub auth: Arc<Authenticator>,
    /// Queues heartbeats for the group-commit writers.
    pub ingestor: Arc<Ingestor>,
    /// Bounds on one heartbeat, derived once from the settings.
    pub limits: Limits,
    /// Live events for /v1/stream.
    pub hub: Arc<crate::stream::Hub>,
    /// Request rate limits per key and per failing address.
    pub limiter: limit::RateLimiter,
    /// One permit per open event stream (`server.max_streams`).
    pub streams: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    pub fn new(
        pool: Pool,
        settings: Arc<Settings>,
        auth: Arc<Authenticator>,
        ingestor: Arc<Ingestor>,
        hub: Arc<crate::stream::Hub>,
    ) -> Self {
        let limits = Limits {
            max_batch: settings.ingest.max_batch,
            max_metrics: settings.ingest.max_metrics,
            max_labels: settings.ingest.max_labels,
            max_clock_skew: settings.ingest.max_clock_skew.to_chrono(),
        };
        let limiter = limit::RateLimiter::new(&settings.limits);
        let streams = Arc::new(tokio::sync::Semaphore::new(settings.server.max_streams));
        Self { inner: Arc::new(Shared { pool, settings, auth, ingestor, limits, hub, limiter, streams }) }
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.inner
    }
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .merge(ingest::router())
        .merge(read::router())
        .merge(recovery::router())
        .merge(alerts::router())
        .merge(stream::router())
        // Handlers read bodies with `ingest::read_limited`, which enforces
        // the same limit; this one covers any extractor that buffers.
        .layer(DefaultBodyLimit::max(state.settings.ingest.max_body_bytes));
    Router::new()
        .merge(probes::router())
        .merge(mcp::router())
        .merge(openapi::router(&state.settings))
        .merge(crate::console::router(&state))
        .nest("/v1", v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), limit::enforce))
        .layer(middleware::from_fn_with_state(state.clone(), request_timeout))
        .with_state(state)
}

/// Answers 503 when a handler outlives `server.request_timeout`, so a stuck
/// database call cannot hold a client (or a connection slot) forever, and
/// 408 when the request body was still arriving (see `deadline`). The
/// limit covers producing the response head; streamed bodies are not cut.
async fn request_timeout(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limit = state.settings.server.request_timeout.get();
    let (request, body) = deadline::track(request);
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => deadline::expired(&body),
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; see GET /openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(axum::http::StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this path")
}
