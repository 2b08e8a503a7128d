//! The web console at `/` and the public status page at `/status`
//! (docs/console.md).
//!
//! Server-rendered HTML from compile-time templates (maud) and one small
//! script; every asset is compiled into the binary. Pages work without
//! JavaScript; with it they subscribe to `GET /v1/stream` and re-render
//! the parts that changed.
//!
//! Map:
//! - [`session`] — login with an API key, sessions in PostgreSQL behind an
//!   HttpOnly SameSite=Strict cookie, CSRF tokens, and the session
//!   fallback of the API's `Authorized` extractor.
//! - [`pages`] — page and form handlers (fleet, agent, incidents, alerts,
//!   acknowledge, silences, login, logout).
//! - [`data`] — the SQL the pages read (parameterised; shared read-API
//!   functions reused).
//! - [`templates`] — the HTML of the console.
//! - [`status`] — the public status page: group-level state, uptime, open
//!   problems in plain words; cached.
//! - [`format`] — pure helpers: times, numbers, URLs, chart geometry.
//! - `assets/` — console.css, console.js, status.css, favicon.svg.
//!
//! Every response of this router carries a Content-Security-Policy that
//! allows only this server's own script and styles (no inline script),
//! `frame-ancestors 'none'` and `X-Frame-Options: DENY`.

pub mod data;
pub mod format;
pub mod pages;
pub mod session;
pub mod status;
pub mod templates;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use sha2::{Digest, Sha256};

use crate::api::{ApiError, AppState};
use crate::config::ConsoleSettings;

/// Policy of the console's pages: own script and styles only, no framing.
const CONSOLE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Largest form body accepted.
const FORM_LIMIT: usize = 64 * 1024;

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: [Asset; 4] = [
    Asset { name: "console.css", content_type: "text/css; charset=utf-8", body: include_str!("assets/console.css") },
    Asset {
        name: "console.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/console.js"),
    },
    Asset { name: "status.css", content_type: "text/css; charset=utf-8", body: include_str!("assets/status.css") },
    Asset { name: "favicon.svg", content_type: "image/svg+xml", body: include_str!("assets/favicon.svg") },
];

/// A short hash of every asset: part of their URLs, so browsers may cache
/// them for good and still see a new build at once.
static ASSET_VERSION: LazyLock<String> = LazyLock::new(|| {
    let mut hasher = Sha256::new();
    for asset in &ASSETS {
        hasher.update(asset.name.as_bytes());
        hasher.update(asset.body.as_bytes());
    }
    hasher.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect()
});

/// The URL of an embedded asset, versioned.
pub fn asset_url(name: &str) -> String {
    format!("/assets/{name}?v={}", *ASSET_VERSION)
}

/// The session cookie's attributes from the settings.
pub fn cookie_policy(settings: &ConsoleSettings) -> session::CookiePolicy {
    session::CookiePolicy::new(settings.secure_cookie, settings.session_ttl.get().as_secs())
}

/// What the console's handlers share beyond [`AppState`].
#[derive(Default)]
struct Shared {
    status: status::Cache,
}

/// The console's routes (none when both the console and the status page
/// are off), merged into the API's router.
pub fn router(state: &AppState) -> Router<AppState> {
    let settings = &state.settings.console;
    if !settings.enabled && !settings.public_status {
        return Router::new();
    }
    let mut router = Router::new().route("/assets/{name}", get(asset));
    if settings.enabled {
        router = router
            .route("/", get(pages::fleet))
            .route("/agents/{id}", get(pages::agent))
            .route("/incidents", get(pages::incidents))
            .route("/alerts", get(pages::alerts))
            // A form's error page stays at the address it was posted to;
            // reloading it, or the page's own live refresh, asks for that
            // address with GET, and is sent where the form came from.
            .route("/alerts/{id}/ack", post(pages::ack).get(to_alerts))
            .route("/silences", post(pages::create_silence).get(to_alerts))
            .route("/silences/{id}/expire", post(pages::expire_silence).get(to_alerts))
            .route("/login", get(pages::login_page).post(pages::login))
            .route("/logout", post(pages::logout).get(to_fleet));
    }
    if settings.public_status {
        router = router.route("/status", get(status_page)).route("/status/theme.css", get(status_theme));
    }
    router
        .layer(Extension(Arc::new(Shared::default())))
        .layer(DefaultBodyLimit::max(FORM_LIMIT))
        .layer(middleware::map_response(security_headers))
}

async fn to_alerts() -> axum::response::Redirect {
    axum::response::Redirect::to("/alerts")
}

async fn to_fleet() -> axum::response::Redirect {
    axum::response::Redirect::to("/")
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.entry(CONTENT_SECURITY_POLICY).or_insert(HeaderValue::from_static(CONSOLE_CSP));
    headers.insert(HeaderName::from_static("x-frame-options"), HeaderValue::from_static("DENY"));
    headers.insert(HeaderName::from_static("x-content-type-options"), HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    headers.insert(HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin"));
    headers.entry(CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    response
}

async fn asset(Path(name): Path<String>, Query(query): Query<HashMap<String, String>>) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return ApiError::not_found(format!("no asset {name}")).into_response();
    };
    // A versioned URL never changes; an unversioned one may after an upgrade.
    let cache = if query.get("v").is_some_and(|v| *v == *ASSET_VERSION) {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    ([(CONTENT_TYPE, asset.content_type), (CACHE_CONTROL, cache)], asset.body).into_response()
}

async fn status_page(State(state): State<AppState>, Extension(shared): Extension<Arc<Shared>>) -> Response {
    let settings = &state.settings.console;
    let img = match settings.status_logo_origin() {
        Some(origin) => format!("'self' data: {origin}"),
        None => "'self' data:".to_string(),
    };
    let csp = format!(
        "default-src 'none'; style-src 'self'; img-src {img}; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    );
    let csp = HeaderValue::from_str(&csp).unwrap_or(HeaderValue::from_static(CONSOLE_CSP));
    match shared.status.get(&state.pool, settings).await {
        Ok(snapshot) => {
            let cache = format!("public, max-age={}", settings.status_cache.get().as_secs());
            let cache = HeaderValue::from_str(&cache).unwrap_or(HeaderValue::from_static("no-cache"));
            let mut response = Html(status::page(settings, &snapshot).into_string()).into_response();
            response.headers_mut().insert(CONTENT_SECURITY_POLICY, csp);
            response.headers_mut().insert(CACHE_CONTROL, cache);
            response
        }
        Err(e) => {
            let error = ApiError::from(e);
            let mut response = (
                error.status,
                Html("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Status unavailable</title>\
                      </head><body><p>The status page is unavailable right now; try again in a minute.</p></body></html>"),
            )
                .into_response();
            if error.status == StatusCode::SERVICE_UNAVAILABLE {
                response.headers_mut().insert(axum::http::header::RETRY_AFTER, HeaderValue::from_static("30"));
            }
            response.headers_mut().insert(CONTENT_SECURITY_POLICY, csp);
            response
        }
    }
}

async fn status_theme(State(state): State<AppState>) -> Response {
    (
        [(CONTENT_TYPE, "text/css; charset=utf-8"), (CACHE_CONTROL, "public, max-age=300")],
        status::theme_css(&state.settings.console),
    )
        .into_response()
}
