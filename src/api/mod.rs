//! HTTP: the axum router, shared state, and the middleware every request
//! passes through. Handlers live in one module per resource.

mod agents;
mod alerts;
pub mod auth;
mod deadline;
pub mod error;
mod extract;
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
use axum::http::HeaderValue;
use axum::http::header::CONNECTION;
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
    /// Open event streams per API key id (`server.max_streams_per_key`).
    pub streams_per_key: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    /// False while the database, unreachable at start, is waited for.
    pub started: Arc<std::sync::atomic::AtomicBool>,
    /// The fleet figures of `/metrics`, read at most once a second.
    pub fleet: crate::metrics::FleetCache,
    /// What `/readyz` found, checked at most once a second.
    pub ready: crate::metrics::SharedRead<probes::Readiness>,
    /// Console sessions found valid lately (see the type).
    pub recent_sessions: crate::console::session::RecentSessions,
}

impl AppState {
    pub fn new(
        pool: Pool,
        settings: Arc<Settings>,
        auth: Arc<Authenticator>,
        ingestor: Arc<Ingestor>,
        hub: Arc<crate::stream::Hub>,
        started: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        let limits = Limits {
            max_batch: settings.ingest.max_batch,
            max_metrics: settings.ingest.max_metrics,
            max_labels: settings.ingest.max_labels,
            max_clock_skew: settings.ingest.max_clock_skew.to_chrono(),
        };
        let limiter = limit::RateLimiter::new(&settings.limits);
        let recent_sessions = crate::console::session::RecentSessions::new(settings.auth.cache_ttl.get());
        let streams = Arc::new(tokio::sync::Semaphore::new(settings.server.max_streams));
        let streams_per_key = Arc::default();
        Self {
            inner: Arc::new(Shared {
                pool,
                settings,
                auth,
                ingestor,
                limits,
                hub,
                limiter,
                streams,
                streams_per_key,
                started,
                fleet: Default::default(),
                ready: Default::default(),
                recent_sessions,
            }),
        }
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
        .layer(DefaultBodyLimit::max(state.settings.ingest.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), same_origin_writes))
        .layer(middleware::map_response(not_stored));
    Router::new()
        .merge(probes::router())
        .merge(mcp::router())
        .merge(openapi::router(&state.settings))
        .merge(crate::console::router(&state))
        .nest("/v1", v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), limit::enforce))
        .layer(middleware::from_fn_with_state(state.clone(), known_hosts_without_auth))
        .layer(middleware::from_fn_with_state(state.clone(), until_started))
        // Outside every refusal, so that each one that leaves a body unread
        // closes its connection (see `request_timeout`).
        .layer(middleware::from_fn_with_state(state.clone(), request_timeout))
        // Outermost, to reach the refusals of the rate limit and the timeout.
        .layer(middleware::from_fn(mcp::refusals_as_json_rpc))
        .layer(middleware::map_response(no_sniffing))
        .with_state(state)
}

/// API answers describe the fleet as it is, often to a browser signed in
/// to the console: no cache may keep them (the event stream sets its own).
async fn not_stored(mut response: Response) -> Response {
    response
        .headers_mut()
        .entry(axum::http::header::CACHE_CONTROL)
        .or_insert(axum::http::HeaderValue::from_static("no-store"));
    response
}

/// Every answer is what its Content-Type says: a browser must not guess
/// HTML or script into an API answer that echoes agent-supplied text.
async fn no_sniffing(mut response: Response) -> Response {
    response.headers_mut().insert(
        axum::http::HeaderName::from_static("x-content-type-options"),
        axum::http::HeaderValue::from_static("nosniff"),
    );
    response
}

/// While warden waits for a database that was unreachable at start (and
/// so is neither migrated nor checked), every request but liveness and the
/// process's own metrics is answered 503 with Retry-After (a POST to /mcp
/// by its handler, request by request: [`mcp::Deferred`]).
async fn until_started(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    if state.started.load(std::sync::atomic::Ordering::Acquire)
        || matches!(request.uri().path(), "/healthz" | "/metrics")
    {
        return next.run(request).await;
    }
    let refusal = ApiError::unavailable("warden is starting: waiting for the database");
    if mcp::Deferred::defer(&mut request, refusal.clone()) {
        return next.run(request).await;
    }
    axum::response::IntoResponse::into_response(refusal)
}

/// Answers 503 when a handler outlives `server.request_timeout`, so a stuck
/// database call cannot hold a client (or a connection slot) forever, and
/// 408 when the request body was still arriving (see `deadline`). The
/// limit covers producing the response head; streamed bodies are not cut.
///
/// An answer given before the request body was read to its end (a refused
/// key, a rate limit, a body over the limit) says `Connection: close`:
/// hyper drops such a connection once the answer is written unless the
/// rest of the body happened to be buffered already, and a client that was
/// not told would send its next request into a closed socket.
async fn request_timeout(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limit = state.settings.server.request_timeout.get();
    let answer_by = deadline::AnswerBy::within(limit);
    let (mut request, body) = deadline::track(request);
    request.extensions_mut().insert(answer_by);
    let writes = crate::ingest::writer::RequestWrites::default();
    let outcome = tokio::time::timeout(limit, writes.observe(next.run(request))).await;
    match outcome {
        Ok(mut response) => {
            if !body.complete() {
                response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
        Err(_) => deadline::expired(&body, writes.abandon()),
    }
}

/// Refuses a browser page from another origin: with authentication
/// disabled, a page on any site could otherwise make a visitor's browser
/// send heartbeats to a warden on their network. Clients that are not
/// browsers send no `Origin` at all.
///
/// This origin is the `Host` the request came with, or, behind a reverse
/// proxy that rewrites `Host` (nginx does by default) or drops its port,
/// the proxy's `X-Forwarded-Host` or `public` (`alerting.link_base`, the
/// address people reach warden at). A page elsewhere cannot send
/// `X-Forwarded-Host`: a browser adds no such header to a form, and a
/// script's request with one needs a CORS preflight warden never grants.
pub(crate) fn check_origin(headers: &axum::http::HeaderMap, public: &str) -> Result<(), ApiError> {
    let Some(origin) = headers.get(axum::http::header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().ok().and_then(|o| o.split_once("://"));
    let header = |name| headers.get(name).and_then(|h: &axum::http::HeaderValue| h.to_str().ok());
    let forwarded = header(axum::http::HeaderName::from_static("x-forwarded-host"))
        .and_then(|h| h.split(',').next())
        .map(str::trim);
    let same = origin.is_some_and(|(scheme, origin_authority)| {
        let default_port = match scheme.to_ascii_lowercase().as_str() {
            "https" => Some(443),
            "http" => Some(80),
            _ => None,
        };
        let (origin_host, origin_port) = host_and_port(origin_authority);
        let is_this = |authority: &str| {
            let (host, port) = host_and_port(authority);
            origin_host.eq_ignore_ascii_case(host) && origin_port.or(default_port) == port.or(default_port)
        };
        let public = public
            .trim()
            .split_once("://")
            .filter(|(s, _)| s.eq_ignore_ascii_case(scheme))
            .map(|(_, rest)| rest.split('/').next().unwrap_or(rest));
        [header(axum::http::header::HOST), forwarded, public].into_iter().flatten().any(is_this)
    });
    if same { Ok(()) } else { Err(ApiError::forbidden("requests from a web page on another origin are not accepted")) }
}

/// With authentication disabled, refuses requests addressed to a host name
/// warden was not told about. A page on any site can point a name of its
/// own at an address on its visitor's network (DNS rebinding): its requests
/// are then same-origin to the browser, Origin and Host agree, and with no
/// key needed nothing else would stop it reading everything, silencing
/// alerts or starting recoveries. An IP address or `localhost` cannot be
/// rebound. The probes and the public status page ask for no key anyway
/// (with its stylesheets) and are left alone, so schedulers and scrapers may
/// use any name.
async fn known_hosts_without_auth(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let keyless = matches!(path, "/healthz" | "/readyz" | "/metrics" | "/status" | "/status/theme.css")
        || path.starts_with("/assets/");
    if state.auth.enabled() || keyless {
        return next.run(request).await;
    }
    let host = request.headers().get(axum::http::header::HOST).map(|h| h.to_str().unwrap_or("?"));
    match host {
        Some(host) if !host_allowed(host, &state.settings.server.allowed_hosts) => {
            let shown: String = host_and_port(host).0.chars().take(100).collect();
            let message = format!(
                "requests addressed to host {shown:?} are not accepted while auth.enabled = false; \
                 add it to server.allowed_hosts, or use an IP address"
            );
            axum::response::IntoResponse::into_response(ApiError::forbidden(message))
        }
        _ => next.run(request).await,
    }
}

/// Whether a Host header names an IP address, `localhost` (or a name
/// under it) or one of `allowed`.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = host_and_port(host).0;
    let name = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name.parse::<std::net::IpAddr>().is_ok()
        || name == "localhost"
        || name.ends_with(".localhost")
        || allowed.iter().any(|a| a.trim().trim_end_matches('.').eq_ignore_ascii_case(&name))
}

/// "host:port", "[v6]:port" or either without a port.
fn host_and_port(authority: &str) -> (&str, Option<u16>) {
    let split = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => Some(i),
        _ => None,
    };
    match split.and_then(|i| authority[i + 1..].parse::<u16>().ok().map(|port| (i, port))) {
        Some((i, port)) => (&authority[..i], Some(port)),
        None => (authority, None),
    }
}

/// The same for every write under /v1 while authentication is disabled: a
/// browser's cross-site POST needs no preflight when its body is
/// `text/plain`, and nothing else would stop a page on any site from
/// silencing alerts or starting a recovery on a warden the visitor can
/// reach. With authentication on, a write needs a bearer key (which a
/// browser never attaches by itself) or a console session's CSRF header
/// (which another origin cannot send), and a reverse proxy that rewrites
/// `Host` must not break the console's own writes.
async fn same_origin_writes(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let safe = matches!(*request.method(), axum::http::Method::GET | axum::http::Method::HEAD);
    if !safe
        && !state.auth.enabled()
        && let Err(e) = check_origin(request.headers(), &state.settings.alerting.link_base)
    {
        return axum::response::IntoResponse::into_response(e);
    }
    next.run(request).await
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; see GET /openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(axum::http::StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this path")
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn only_addresses_localhost_and_the_allowed_names_pass_without_auth() {
        let allowed = vec!["warden.lan".to_string()];
        for host in [
            "127.0.0.1:8080",
            "10.1.2.3",
            "[::1]:8080",
            "[fe80::1]",
            "localhost:8080",
            "LOCALHOST",
            "app.localhost",
            "localhost.",
            "warden.lan:8080",
            "WARDEN.LAN",
            "warden.lan.",
        ] {
            assert!(host_allowed(host, &allowed), "{host}");
        }
        for host in
            ["evil.example:8080", "127.0.0.1.nip.io", "warden.lan.evil.example", "localhost.evil.example", "", "?"]
        {
            assert!(!host_allowed(host, &allowed), "{host}");
        }
    }
}
