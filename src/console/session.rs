//! Console sessions: one login with an API key, kept server-side.
//!
//! - The cookie carries a random 256-bit token; `warden.console_sessions`
//!   stores only its SHA-256 and the id of the API key it was opened with
//!   (never the key). Scopes are read from the key at every use, so
//!   revoking the key ends the session on every replica at once.
//! - The cookie is `HttpOnly; SameSite=Strict; Path=/` (plus `Secure` and
//!   the `__Host-` prefix with `console.secure_cookie`).
//! - Forms carry a CSRF token derived from the session token
//!   (HMAC-SHA256(token, purpose)), compared in constant time on POST; it
//!   needs no storage and dies with the session. The login form, made before
//!   there is a session, uses a double-submit cookie instead.
//! - The JSON API accepts a session cookie in place of a bearer key (see
//!   [`api_principal`]): for GET and HEAD as is, for other methods only with
//!   the CSRF token in an `X-CSRF-Token` header.
//!
//! Tokens and keys are never logged.

use axum::extract::FromRequestParts;
use axum::http::header::{COOKIE, SET_COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::response::{IntoResponse, Redirect, Response};
use hmac::{KeyInit, Mac};
use subtle::ConstantTimeEq;

use crate::api::AppState;
use crate::auth::{AuthError, Principal, Scope};
use crate::db::{self, DbError};

/// Cookie holding the session token.
const SESSION_COOKIE: &str = "warden_session";
/// Cookie of the login form's double-submit CSRF token.
const LOGIN_COOKIE: &str = "warden_login";
/// Header by which scripts send the CSRF token with a cookie-authenticated
/// API call that changes something.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a login form stays valid.
const LOGIN_FORM_SECONDS: u64 = 3600;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// 32 random bytes as 64 lowercase hex digits.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system provides randomness");
    hex(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A session or login token as the cookie carries it.
fn well_formed(token: &str) -> bool {
    token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The CSRF token of forms (and the `X-CSRF-Token` header) for a session.
pub fn csrf_for(session_token: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(session_token.as_bytes()).expect("HMAC accepts any key length");
    mac.update(b"warden console csrf v1");
    hex(&mac.finalize().into_bytes())
}

/// Constant-time equality of two secrets given as text.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// Cookie names and attributes, from `[console]`.
#[derive(Debug, Clone)]
pub struct CookiePolicy {
    secure: bool,
    session_seconds: u64,
}

impl CookiePolicy {
    pub fn new(secure: bool, session_seconds: u64) -> Self {
        Self { secure, session_seconds }
    }

    pub fn session_name(&self) -> String {
        self.name(SESSION_COOKIE)
    }

    pub fn login_name(&self) -> String {
        self.name(LOGIN_COOKIE)
    }

    fn name(&self, base: &str) -> String {
        if self.secure { format!("__Host-{base}") } else { base.to_string() }
    }

    fn attributes(&self, max_age: u64) -> String {
        let secure = if self.secure { "; Secure" } else { "" };
        format!("Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}")
    }

    pub fn set_session(&self, token: &str) -> HeaderValue {
        let value = format!("{}={token}; {}", self.session_name(), self.attributes(self.session_seconds));
        HeaderValue::from_str(&value).expect("hex tokens are valid header text")
    }

    pub fn clear_session(&self) -> HeaderValue {
        HeaderValue::from_str(&format!("{}=; {}", self.session_name(), self.attributes(0))).expect("valid header")
    }

    pub fn set_login(&self, token: &str) -> HeaderValue {
        let value = format!("{}={token}; {}", self.login_name(), self.attributes(LOGIN_FORM_SECONDS));
        HeaderValue::from_str(&value).expect("hex tokens are valid header text")
    }

    pub fn clear_login(&self) -> HeaderValue {
        HeaderValue::from_str(&format!("{}=; {}", self.login_name(), self.attributes(0))).expect("valid header")
    }

    /// The login form's token from its cookie, if well formed.
    pub fn login_token<'a>(&self, headers: &'a HeaderMap) -> Option<&'a str> {
        cookie(headers, &self.login_name()).filter(|t| well_formed(t))
    }

    /// The session token from its cookie, if well formed.
    pub fn session_token<'a>(&self, headers: &'a HeaderMap) -> Option<&'a str> {
        cookie(headers, &self.session_name()).filter(|t| well_formed(t))
    }
}

/// A signed-in console user.
#[derive(Debug, Clone)]
pub struct ConsoleUser {
    pub principal: Principal,
    /// The CSRF token forms of this session carry.
    pub csrf: String,
    token_hash: [u8; 32],
}

impl ConsoleUser {
    /// What the header shows: the key's name.
    pub fn name(&self) -> String {
        self.principal.label()
    }

    pub fn is_admin(&self) -> bool {
        self.principal.allows(Scope::Admin)
    }

    /// Whether a submitted form's token is this session's.
    pub fn csrf_ok(&self, submitted: &str) -> bool {
        same_secret(&self.csrf, submitted)
    }
}

/// Opens a session for the key `key_id` (already verified), or an
/// anonymous one when authentication is off (`key_id` None), ending the
/// session the browser presented, if any (`replacing`): a sign-in replaces
/// the one before it rather than leaving it valid beside it. Returns the
/// token for the cookie, or `None` if the key vanished meanwhile.
pub async fn create(
    client: &tokio_postgres::Client,
    key_id: Option<&str>,
    ttl_seconds: u64,
    replacing: Option<&str>,
) -> Result<Option<String>, DbError> {
    let token = new_token();
    let hash = crate::auth::hash(&token);
    let ttl = ttl_seconds as f64;
    if let Some(old) = replacing {
        delete(client, &crate::auth::hash(old)).await?;
    }
    // Expired sessions are swept on every login; there are few.
    client.execute("DELETE FROM warden.console_sessions WHERE expires_at < now()", &[]).await?;
    let inserted = match key_id {
        Some(key_id) => {
            client
                .execute(
                    "INSERT INTO warden.console_sessions (token_hash, api_key_id, expires_at) \
                     SELECT $1, id, now() + $3::float8 * interval '1 second' \
                     FROM warden.api_keys WHERE key_id = $2 AND revoked_at IS NULL",
                    &[&hash.as_slice(), &key_id, &ttl],
                )
                .await?
        }
        None => {
            client
                .execute(
                    "INSERT INTO warden.console_sessions (token_hash, api_key_id, expires_at) \
                     VALUES ($1, NULL, now() + $2::float8 * interval '1 second')",
                    &[&hash.as_slice(), &ttl],
                )
                .await?
        }
    };
    Ok((inserted == 1).then_some(token))
}

/// Ends the session whose token hashes to `token_hash`.
async fn delete(client: &tokio_postgres::Client, token_hash: &[u8; 32]) -> Result<(), DbError> {
    client.execute("DELETE FROM warden.console_sessions WHERE token_hash = $1", &[&token_hash.as_slice()]).await?;
    Ok(())
}

/// Session tokens (by hash) this replica found valid within
/// `auth.cache_ttl`. It decides nothing about access, which every request
/// looks up; it only keeps a known session working from an address whose
/// failed authentications are used up (a proxy or NAT shared with someone
/// trying made-up keys or cookies), as the key cache does for bearer keys.
pub struct RecentSessions {
    ttl: std::time::Duration,
    seen: std::sync::Mutex<std::collections::HashMap<[u8; 32], std::time::Instant>>,
}

/// Sessions remembered at most; past it, expired ones are swept, and if
/// none had, all are forgotten (they are only an exemption).
const RECENT_SESSIONS_LIMIT: usize = 10_000;

impl RecentSessions {
    pub fn new(ttl: std::time::Duration) -> Self {
        Self { ttl, seen: Default::default() }
    }

    fn remember(&self, token_hash: [u8; 32]) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= RECENT_SESSIONS_LIMIT {
            let ttl = self.ttl;
            seen.retain(|_, at| at.elapsed() < ttl);
            if seen.len() >= RECENT_SESSIONS_LIMIT {
                seen.clear();
            }
        }
        seen.insert(token_hash, std::time::Instant::now());
    }

    fn recently_seen(&self, token_hash: &[u8; 32]) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(token_hash).is_some_and(|at| at.elapsed() < self.ttl)
    }

    /// Whether the request's session cookie names a session this replica
    /// found valid within the TTL.
    pub fn cookie_seen(&self, state: &AppState, headers: &HeaderMap) -> bool {
        let policy = super::cookie_policy(&state.settings.console);
        policy.session_token(headers).is_some_and(|token| self.recently_seen(&crate::auth::hash(token)))
    }
}

/// The session of `token`, if it exists, has not expired, and its key is
/// still valid.
pub async fn lookup(state: &AppState, token: &str) -> Result<Option<ConsoleUser>, DbError> {
    let token_hash = crate::auth::hash(token);
    let client = db::client(&state.pool).await?;
    let row = client
        .query_opt(
            "SELECT s.api_key_id IS NULL, k.name, k.scopes, k.key_id, k.agents \
             FROM warden.console_sessions s LEFT JOIN warden.api_keys k ON k.id = s.api_key_id \
             WHERE s.token_hash = $1 AND s.expires_at > now() \
               AND (s.api_key_id IS NULL OR k.revoked_at IS NULL)",
            &[&token_hash.as_slice()],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let anonymous: bool = row.get(0);
    let principal = if anonymous {
        // Made while authentication was off; worthless once it is on.
        if state.auth.enabled() {
            return Ok(None);
        }
        Principal::anonymous()
    } else {
        let scopes: Vec<String> = row.get(2);
        Principal::of_key(row.get(1), row.get(3), &scopes, row.get(4))
    };
    state.recent_sessions.remember(token_hash);
    Ok(Some(ConsoleUser { principal, csrf: csrf_for(token), token_hash }))
}

/// Ends `user`'s session.
pub async fn logout(state: &AppState, user: &ConsoleUser) -> Result<(), DbError> {
    let client = db::client(&state.pool).await?;
    delete(&client, &user.token_hash).await
}

/// Where an unauthenticated page request is sent: the login page, with the
/// page to come back to.
fn to_login(parts: &Parts) -> Response {
    let next = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let target = if parts.method == Method::GET && next != "/" {
        format!("/login{}", super::format::query(&[("next", next)]))
    } else {
        "/login".to_string()
    };
    Redirect::to(&target).into_response()
}

impl FromRequestParts<AppState> for ConsoleUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let policy = super::cookie_policy(&state.settings.console);
        let Some(token) = policy.session_token(&parts.headers) else {
            return Err(to_login(parts));
        };
        let unknown = |parts: &Parts| {
            let mut response = to_login(parts);
            response.headers_mut().append(SET_COOKIE, policy.clear_session());
            response
        };
        let address = crate::api::limit::console_address(state, parts);
        let limiter = &state.limiter;
        if let Some(wait) = address.and_then(|a| limiter.failures_exhausted(a, std::time::Instant::now()))
            && !state.recent_sessions.recently_seen(&crate::auth::hash(token))
        {
            // Not looked up: this address has been sending unknown cookies
            // or keys. The cookie stays; it works again once the burst
            // refills.
            return Err(crate::api::ApiError::too_many_requests(wait).into_response());
        }
        match lookup(state, token).await {
            Ok(Some(user)) => {
                // Pages read as much as the API calls behind them (the
                // alerts page up to a thousand alerts), so they spend the
                // key's allowance as cookie calls to /v1 do.
                if let Some(key_id) = &user.principal.key_id {
                    crate::api::limit::charge_session(state, key_id).map_err(IntoResponse::into_response)?;
                }
                Ok(user)
            }
            Ok(None) => {
                if let Some(address) = address {
                    let _ = limiter.charge_failure(address, std::time::Instant::now());
                }
                Err(unknown(parts))
            }
            Err(e) => Err(crate::api::ApiError::from(e).into_response()),
        }
    }
}

/// The console session behind an API request that has no `Authorization`
/// header, as a principal holding `needed`. `Ok(None)`: no usable session
/// (the caller then answers as for a missing key). Changing methods need the
/// session's CSRF token in `X-CSRF-Token`, so a cookie alone can only read;
/// a live session without it is refused as such (403), not as keyless.
pub async fn api_principal(parts: &Parts, state: &AppState, needed: Scope) -> Result<Option<Principal>, AuthError> {
    if !state.settings.console.enabled {
        return Ok(None);
    }
    let policy = super::cookie_policy(&state.settings.console);
    let Some(token) = policy.session_token(&parts.headers) else { return Ok(None) };
    let Some(user) = lookup(state, token).await? else { return Ok(None) };
    let safe = parts.method == Method::GET || parts.method == Method::HEAD;
    if !safe {
        let header = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !same_secret(&csrf_for(token), header) {
            return Err(AuthError::CsrfToken { key_id: user.principal.key_id.clone() });
        }
    }
    if !user.principal.allows(needed) {
        return Err(AuthError::Forbidden(needed));
    }
    Ok(Some(user.principal))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_hex_and_well_formed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(well_formed(&a));
        assert!(!well_formed(&a.to_uppercase()));
        assert!(!well_formed(&a[1..]));
        assert!(!well_formed(""));
    }

    #[test]
    fn csrf_tokens_are_per_session_and_compared_exactly() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(csrf_for(&a), csrf_for(&a));
        assert_ne!(csrf_for(&a), csrf_for(&b));
        assert_ne!(csrf_for(&a), a, "the CSRF token does not reveal the session token");
        assert!(same_secret(&csrf_for(&a), &csrf_for(&a)));
        assert!(!same_secret(&csrf_for(&a), &csrf_for(&b)));
        assert!(!same_secret(&csrf_for(&a), ""));
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, HeaderValue::from_static("theme=dark; warden_session=abc ; x=1"));
        headers.append(COOKIE, HeaderValue::from_static("other=2"));
        assert_eq!(cookie(&headers, "warden_session"), Some("abc"));
        assert_eq!(cookie(&headers, "other"), Some("2"));
        assert_eq!(cookie(&headers, "warden"), None);
    }

    #[test]
    fn cookies_are_http_only_strict_and_secure_when_asked() {
        let plain = CookiePolicy::new(false, 60);
        let set = plain.set_session("t").to_str().unwrap().to_string();
        assert_eq!(set, "warden_session=t; Path=/; Max-Age=60; HttpOnly; SameSite=Strict");
        let secure = CookiePolicy::new(true, 60);
        let set = secure.set_session("t").to_str().unwrap().to_string();
        assert!(set.starts_with("__Host-warden_session=t;") && set.ends_with("; Secure"), "{set}");
        assert!(secure.clear_session().to_str().unwrap().contains("Max-Age=0"));
    }
}
