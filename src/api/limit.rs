//! Rate limits of `/v1`, `/mcp` and the console's sign-in (settings
//! `[limits]`): a token bucket per
//! API key, and a stricter one per client address for requests that fail
//! authentication, so a flood from one key, or a stream of made-up keys, is
//! answered 429 with Retry-After instead of reaching the database.
//!
//! The buckets live in memory, per replica. A bucket that has refilled to
//! its burst says nothing a fresh one would not, so idle ones are dropped
//! (swept every few seconds, and whenever a table is full); each table holds
//! at most `limits.max_tracked` entries.
//!
//! How a request is charged:
//! 1. An address whose failure bucket is empty gets 429 at once, unless its
//!    key is one this replica verified recently (so a client behind the same
//!    proxy as a key guesser keeps working), without checking the key: a
//!    guesser learns nothing and costs no query.
//! 2. A request that names a well-formed key takes a token from that key's
//!    bucket (with authentication off: from its address's, at the key rate).
//!    A POST to /mcp refused here reaches its handler all the same, which
//!    answers each JSON-RPC request in it with the refusal
//!    ([`Deferred`]), and checks no key.
//! 3. If the answer is 401 (no key, an unknown or revoked one), the token goes
//!    back to the key and the address's failure bucket is charged instead, so
//!    made-up secrets for a real key id cannot drain that key's bucket.
//!    A console sign-in (POST /login) that fails is charged the same way;
//!    the typed key is in the form, so the sign-in handler makes step 1's
//!    check itself (see [`SignInAddress`]) and answers with its own page.
//! 4. A request carrying a console session cookie instead of a key is
//!    charged once the session is known: an API call or a console page to
//!    its key's bucket ([`charge_session`]), an unknown or expired cookie
//!    (the sign-in page's included) to the address's failures
//!    ([`console_address`]). Step 1 lets
//!    a session this replica found valid recently through, as it does a key.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::mcp::Deferred;
use super::{ApiError, AppState};
use crate::config::LimitSettings;

/// How often idle buckets are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Tokens arrive at `rate` per second up to `burst`; a request takes one.
#[derive(Debug, Clone, Copy)]
struct Rule {
    rate: f64,
    burst: f64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rule: Rule, now: Instant) -> Self {
        Self { tokens: rule.burst, at: now }
    }

    fn tokens_at(&self, rule: Rule, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * rule.rate).min(rule.burst)
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, rule: Rule, now: Instant) -> Result<(), Duration> {
        self.tokens = self.tokens_at(rule, now);
        self.at = self.at.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rule.rate))
        }
    }

    fn give_back(&mut self, rule: Rule) {
        self.tokens = (self.tokens + 1.0).min(rule.burst);
    }
}

/// Buckets by identity, bounded.
struct Table<K> {
    rule: Rule,
    buckets: HashMap<K, Bucket>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new(rule: Rule) -> Self {
        Self { rule, buckets: HashMap::new() }
    }

    /// Drops the buckets that have refilled completely.
    fn sweep(&mut self, now: Instant) {
        let rule = self.rule;
        self.buckets.retain(|_, b| b.tokens_at(rule, now) < rule.burst);
    }

    /// The bucket of `who`, made if there is room (after a sweep if need be).
    fn bucket(&mut self, who: &K, now: Instant, max: usize) -> Option<&mut Bucket> {
        if !self.buckets.contains_key(who) {
            if self.buckets.len() >= max {
                self.sweep(now);
            }
            if self.buckets.len() >= max {
                return None;
            }
            self.buckets.insert(who.clone(), Bucket::full(self.rule, now));
        }
        self.buckets.get_mut(who)
    }

    fn exhausted(&self, who: &K, now: Instant) -> bool {
        self.buckets.get(who).is_some_and(|b| b.tokens_at(self.rule, now) < 1.0)
    }
}

/// Who a request is charged to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Client {
    /// A well-formed API key, by its public key id.
    Key(String),
    /// A client address (authentication disabled).
    Address(IpAddr),
}

struct Tables {
    clients: Table<Client>,
    failures: Table<IpAddr>,
    swept: Instant,
}

/// Token buckets per key and per address; cheap to share.
pub struct RateLimiter {
    max_tracked: usize,
    tables: Mutex<Tables>,
}

impl RateLimiter {
    pub fn new(settings: &LimitSettings) -> Self {
        let key = Rule { rate: settings.rate_per_second, burst: f64::from(settings.burst) };
        let failed = Rule { rate: settings.failed_auth_per_second, burst: f64::from(settings.failed_auth_burst) };
        let tables = Tables { clients: Table::new(key), failures: Table::new(failed), swept: Instant::now() };
        Self { max_tracked: settings.max_tracked, tables: Mutex::new(tables) }
    }

    fn tables(&self, now: Instant) -> std::sync::MutexGuard<'_, Tables> {
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(tables.swept) >= SWEEP_EVERY {
            tables.clients.sweep(now);
            tables.failures.sweep(now);
            tables.swept = now;
        }
        tables
    }

    /// Takes a token for a request of `client`, or says how long to wait.
    /// With the table full of active clients a new one is let through
    /// untracked: keys are few and made by operators, so that takes more
    /// keys in use at once than `max_tracked`.
    pub fn admit(&self, client: &Client, now: Instant) -> Result<(), Duration> {
        let mut tables = self.tables(now);
        let rule = tables.clients.rule;
        match tables.clients.bucket(client, now, self.max_tracked) {
            Some(bucket) => bucket.take(rule, now),
            None => Ok(()),
        }
    }

    /// Returns the token of a request that turned out not to be `client`'s.
    pub fn refund(&self, client: &Client, now: Instant) {
        let mut tables = self.tables(now);
        let rule = tables.clients.rule;
        if let Some(bucket) = tables.clients.buckets.get_mut(client) {
            bucket.give_back(rule);
        }
    }

    /// Charges a failed authentication to `address`. With the table full of
    /// addresses failing right now, a new one is refused: made-up keys from
    /// many addresses must not buy unlimited guesses.
    pub fn charge_failure(&self, address: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut tables = self.tables(now);
        let rule = tables.failures.rule;
        match tables.failures.bucket(&address, now, self.max_tracked) {
            Some(bucket) => bucket.take(rule, now),
            None => Err(Duration::from_secs(1)),
        }
    }

    /// Whether `address` has used up its failed authentications for now;
    /// if so, how long until it may try again.
    pub fn failures_exhausted(&self, address: IpAddr, now: Instant) -> Option<Duration> {
        let tables = self.tables(now);
        let rule = tables.failures.rule;
        tables.failures.exhausted(&address, now).then(|| {
            let tokens = tables.failures.buckets.get(&address).map_or(0.0, |b| b.tokens_at(rule, now));
            Duration::from_secs_f64((1.0 - tokens).max(0.0) / rule.rate)
        })
    }

    /// Keys and addresses tracked now: (clients, failing addresses).
    pub fn tracked(&self) -> (usize, usize) {
        let tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        (tables.clients.buckets.len(), tables.failures.buckets.len())
    }
}

/// The client address of a console sign-in, for its handler: it refuses
/// an address whose failures are used up unless the typed key is one this
/// replica verified recently, as step 1 does for a bearer key. Present
/// only while limits and authentication are on.
#[derive(Debug, Clone, Copy)]
pub struct SignInAddress(pub IpAddr);

/// Requests the limits apply to: the API proper, and the console's sign-in
/// (a key typed into a form is checked like a bearer key, so guessing there
/// empties the same failure bucket). Probes, /metrics and /openapi.json
/// stay reachable for orchestrators and scrapers.
fn limited(request: &Request) -> bool {
    let path = request.uri().path();
    path.starts_with("/v1/") || path == "/v1" || path == "/mcp" || (path == "/login" && request.method() == "POST")
}

/// The middleware: see the module documentation for the order of things.
pub async fn enforce(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let settings = &state.settings.limits;
    if !settings.enabled || !limited(&request) {
        return next.run(request).await;
    }
    let limiter = &state.limiter;
    let address = charged_network(client_address(&request, &settings.client_ip_header));
    let heartbeats = request.uri().path() == "/v1/heartbeats";
    // Refused already (warden starting), to be answered without running:
    // nothing to charge, and the key it names has not been checked.
    if request.extensions().get::<Deferred>().is_some() {
        return next.run(request).await;
    }
    let mut request = request;
    if !state.auth.enabled() {
        return match limiter.admit(&Client::Address(address), Instant::now()) {
            Ok(()) => next.run(request).await,
            Err(wait) if Deferred::defer(&mut request, ApiError::too_many_requests(wait)) => next.run(request).await,
            Err(wait) => too_many(wait, heartbeats),
        };
    }
    if request.uri().path() == "/login" {
        request.extensions_mut().insert(SignInAddress(address));
        let response = next.run(request).await;
        if response.status() == StatusCode::UNAUTHORIZED {
            // Used up or not, the handler's page stands; the next attempt
            // is refused there.
            let _ = limiter.charge_failure(address, Instant::now());
        }
        return response;
    }
    let header = crate::auth::bearer_header(request.headers());
    if let Some(wait) = limiter.failures_exhausted(address, Instant::now())
        && !state.auth.recently_verified(header)
        && (header.is_some() || !state.recent_sessions.cookie_seen(&state, request.headers()))
    {
        if heartbeats {
            crate::metrics::METRICS.rejects.with_label_values(&["rate_limited"]).inc();
        }
        return ApiError::too_many_failed_authentications(wait).into_response();
    }
    let client = header.and_then(bearer_key_id).map(|id| Client::Key(id.to_string()));
    if let Some(client) = &client
        && let Err(wait) = limiter.admit(client, Instant::now())
    {
        // Not charged, not checked: /mcp's handler answers each request
        // in the body with this refusal.
        if Deferred::defer(&mut request, ApiError::too_many_requests(wait)) {
            return next.run(request).await;
        }
        return too_many(wait, heartbeats);
    }
    let response = next.run(request).await;
    if response.status() == StatusCode::UNAUTHORIZED {
        let now = Instant::now();
        if let Some(client) = &client {
            limiter.refund(client, now);
        }
        if let Err(wait) = limiter.charge_failure(address, now) {
            // Counted already, as the 401 it was (heartbeats' own layer).
            return ApiError::too_many_failed_authentications(wait).into_response();
        }
    }
    response
}

/// The public key id of a bearer token, if the token is well formed.
fn bearer_key_id(header: &str) -> Option<&str> {
    crate::auth::key_id_of(crate::auth::bearer_token(header)?)
}

fn too_many(wait: Duration, heartbeats: bool) -> Response {
    if heartbeats {
        crate::metrics::METRICS.rejects.with_label_values(&["rate_limited"]).inc();
    }
    ApiError::too_many_requests(wait).into_response()
}

/// The client's address: from `header` when configured and usable, else the
/// connection's peer (unspecified when the router runs without one).
pub fn client_address(request: &Request, header: &str) -> IpAddr {
    address_of(request.extensions(), request.headers(), header)
}

fn address_of(extensions: &axum::http::Extensions, headers: &HeaderMap, header: &str) -> IpAddr {
    let peer = extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let forwarded = (!header.is_empty()).then(|| forwarded_address(headers, header)).flatten();
    forwarded.or(peer).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// The address a console request is charged to for failed sign-ins and
/// unknown session cookies, or `None` while limits or authentication are
/// off. A session cookie costs a query to look up, so a stream of made-up
/// ones is charged like made-up keys, and refused once the address's
/// failures are used up.
pub fn console_address(state: &AppState, parts: &axum::http::request::Parts) -> Option<IpAddr> {
    let settings = &state.settings.limits;
    (settings.enabled && state.auth.enabled())
        .then(|| charged_network(address_of(&parts.extensions, &parts.headers, &settings.client_ip_header)))
}

/// Takes a token from the bucket of the key behind a console session, for
/// an API call made with the session's cookie: the same budget as calls
/// made with the key itself.
pub fn charge_session(state: &AppState, key_id: &str) -> Result<(), ApiError> {
    if !state.settings.limits.enabled {
        return Ok(());
    }
    state.limiter.admit(&Client::Key(key_id.to_string()), Instant::now()).map_err(ApiError::too_many_requests)
}

/// What an address is charged as: an IPv4 address itself, an IPv6 address
/// by its /64 (one host usually holds a whole /64, and would otherwise get
/// a fresh bucket, and burst, from every address in it).
pub fn charged_network(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

/// The last address of a comma-separated list: the one the nearest proxy
/// added, which the client cannot forge.
fn forwarded_address(headers: &HeaderMap, name: &str) -> Option<IpAddr> {
    let value = headers.get_all(name).iter().next_back()?.to_str().ok()?;
    let last = value.rsplit(',').next()?.trim();
    last.parse::<IpAddr>().ok().or_else(|| last.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(rate: f64, burst: u32, max_tracked: usize) -> LimitSettings {
        LimitSettings {
            enabled: true,
            rate_per_second: rate,
            burst,
            failed_auth_per_second: rate / 10.0,
            failed_auth_burst: burst / 10,
            client_ip_header: String::new(),
            max_tracked,
        }
    }

    fn key(n: usize) -> Client {
        Client::Key(format!("{n:012x}"))
    }

    #[test]
    fn a_key_gets_its_burst_then_its_rate() {
        let limiter = RateLimiter::new(&settings(10.0, 20, 100));
        let t0 = Instant::now();
        for i in 0..20 {
            assert!(limiter.admit(&key(1), t0).is_ok(), "request {i} is within the burst");
        }
        let wait = limiter.admit(&key(1), t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "one token comes after 1/rate: {wait:?}");
        assert!(limiter.admit(&key(2), t0).is_ok(), "other keys have buckets of their own");
        let later = t0 + Duration::from_millis(350);
        for _ in 0..3 {
            assert!(limiter.admit(&key(1), later).is_ok());
        }
        assert!(limiter.admit(&key(1), later).is_err(), "3.5 tokens came back in 350 ms, not 4");
    }

    #[test]
    fn a_refunded_token_is_usable_again() {
        let limiter = RateLimiter::new(&settings(1.0, 1, 100));
        let t0 = Instant::now();
        limiter.admit(&key(1), t0).unwrap();
        assert!(limiter.admit(&key(1), t0).is_err());
        limiter.refund(&key(1), t0);
        assert!(limiter.admit(&key(1), t0).is_ok());
    }

    #[test]
    fn failures_are_charged_per_address_and_exhaust_it() {
        let limiter = RateLimiter::new(&settings(100.0, 50, 100));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(limiter.failures_exhausted(a, t0).is_none());
            limiter.charge_failure(a, t0).unwrap();
        }
        let wait = limiter.failures_exhausted(a, t0).expect("five failures use up a burst of five");
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        assert!(limiter.charge_failure(a, t0).is_err());
        assert!(limiter.failures_exhausted(b, t0).is_none(), "another address is not affected");
        assert!(limiter.failures_exhausted(a, t0 + Duration::from_millis(150)).is_none());
    }

    #[test]
    fn idle_keys_and_addresses_are_forgotten() {
        let limiter = RateLimiter::new(&settings(10.0, 20, 1000));
        let t0 = Instant::now();
        for n in 0..500 {
            limiter.admit(&key(n), t0).unwrap();
        }
        limiter.charge_failure("10.0.0.1".parse().unwrap(), t0).unwrap();
        assert_eq!(limiter.tracked(), (500, 1));
        // Refilled after 0.1 s (one token at 10/s); swept at the next call
        // after SWEEP_EVERY.
        let later = t0 + SWEEP_EVERY;
        limiter.admit(&key(0), later).unwrap();
        assert_eq!(limiter.tracked(), (1, 0), "only the key just used is left");
    }

    #[test]
    fn tables_stay_bounded_under_a_flood_of_identities() {
        let limiter = RateLimiter::new(&settings(10.0, 20, 100));
        let t0 = Instant::now();
        for n in 0..1000 {
            // Keys beyond the bound are let through untracked.
            assert!(limiter.admit(&key(n), t0).is_ok());
        }
        assert_eq!(limiter.tracked().0, 100);
        for n in 0..1000u32 {
            let address = IpAddr::from(n.to_be_bytes());
            let charged = limiter.charge_failure(address, t0);
            // Addresses beyond the bound are refused.
            assert_eq!(charged.is_ok(), n < 100, "address {n}");
        }
        assert_eq!(limiter.tracked().1, 100);
        // Once the tracked ones are idle they make room for new ones.
        let later = t0 + Duration::from_secs(3);
        assert!(limiter.charge_failure(IpAddr::from([192, 0, 2, 1]), later).is_ok());
        assert!(limiter.tracked().1 <= 100);
    }

    #[test]
    fn only_the_api_and_signing_in_are_limited() {
        let request = |method: &str, path: &str| {
            Request::builder().method(method).uri(path).body(axum::body::Body::empty()).unwrap()
        };
        for (method, path) in [("POST", "/v1/heartbeats"), ("GET", "/v1/agents/a"), ("POST", "/mcp"), ("GET", "/v1")] {
            assert!(limited(&request(method, path)), "{path}");
        }
        assert!(limited(&request("POST", "/login")));
        for path in ["/healthz", "/readyz", "/metrics", "/openapi.json", "/", "/status", "/mcpx", "/v10/x", "/login"] {
            assert!(!limited(&request("GET", path)), "{path}");
        }
    }

    #[test]
    fn the_client_address_comes_from_the_configured_header_else_the_peer() {
        let mut request = Request::new(axum::body::Body::empty());
        request.extensions_mut().insert(ConnectInfo::<SocketAddr>("192.0.2.7:4000".parse().unwrap()));
        assert_eq!(client_address(&request, ""), "192.0.2.7".parse::<IpAddr>().unwrap());
        request.headers_mut().insert("x-forwarded-for", "203.0.113.9, 198.51.100.4".parse().unwrap());
        assert_eq!(client_address(&request, ""), "192.0.2.7".parse::<IpAddr>().unwrap(), "not trusted by default");
        assert_eq!(client_address(&request, "x-forwarded-for"), "198.51.100.4".parse::<IpAddr>().unwrap());
        request.headers_mut().insert("x-real-ip", "garbage".parse().unwrap());
        assert_eq!(client_address(&request, "x-real-ip"), "192.0.2.7".parse::<IpAddr>().unwrap());
        assert_eq!(client_address(&Request::new(axum::body::Body::empty()), ""), IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }

    #[test]
    fn ipv6_clients_are_charged_per_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(charged_network(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(charged_network(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")), ip("2001:db8:1:2::"));
        assert_ne!(charged_network(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(charged_network(ip("::ffff:192.0.2.7")), ip("192.0.2.7"), "IPv4-mapped");
        assert_eq!(charged_network(ip("192.0.2.7")), ip("192.0.2.7"));
    }

    #[test]
    fn bearer_tokens_yield_their_key_id_only_when_well_formed() {
        let (id, token) = crate::auth::generate();
        assert_eq!(bearer_key_id(&format!("Bearer {token}")), Some(id.as_str()));
        assert_eq!(bearer_key_id(&format!("bearer  {token} ")), Some(id.as_str()));
        assert_eq!(bearer_key_id(&token), None);
        assert_eq!(bearer_key_id("Bearer wdn_nothex"), None);
    }
}
