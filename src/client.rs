//! A small typed client for agents written in Rust.
//!
//! ```no_run
//! # async fn run() -> Result<(), warden::client::ClientError> {
//! use warden::client::{Client, HeartbeatRequest};
//! let client = Client::new("http://127.0.0.1:8080", Some("wdn_...".into()))?;
//! let ack = client.heartbeat(&HeartbeatRequest::new("worker-1").uptime(42).metric("cpu", 0.4)).await?;
//! println!("next heartbeat in {} ms", ack.next_heartbeat_ms);
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{HeartbeatStatus, Mode, Severity};

/// One heartbeat, as the API takes it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HeartbeatRequest {
    pub agent_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<HeartbeatStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_heartbeat_ms: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl HeartbeatRequest {
    pub fn new(agent_id: impl Into<String>) -> Self {
        Self { agent_id: agent_id.into(), sent_at: Some(Utc::now()), ..Self::default() }
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = Some(mode);
        self
    }

    pub fn status(mut self, status: HeartbeatStatus) -> Self {
        self.status = Some(status);
        self
    }

    pub fn uptime(mut self, seconds: u64) -> Self {
        self.uptime_seconds = Some(seconds);
        self
    }

    pub fn next_in(mut self, interval: Duration) -> Self {
        self.next_heartbeat_ms = Some(u32::try_from(interval.as_millis()).unwrap_or(u32::MAX));
        self
    }

    pub fn metric(mut self, name: impl Into<String>, value: f64) -> Self {
        self.metrics.insert(name.into(), value);
        self
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
}

/// warden's answer to one heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct HeartbeatAck {
    pub received: bool,
    pub is_new: bool,
    pub restart_detected: bool,
    /// When warden expects the next heartbeat.
    pub next_heartbeat_ms: u32,
}

/// An event an agent reports (an error, a warning, a note).
#[derive(Debug, Clone, Serialize)]
pub struct EventRequest {
    pub agent_id: String,
    pub event_type: String,
    pub severity: Severity,
    pub message: String,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// warden or its database is busy or down; retry after the given time.
    #[error("warden is unavailable: {message}")]
    Unavailable { retry_after: Option<Duration>, message: String },
    /// The request was refused; retrying it unchanged will not help.
    #[error("warden refused the request ({status} {code}{}): {message}", field.as_ref().map(|f| format!(", field {f}")).unwrap_or_default())]
    Rejected { status: u16, code: String, message: String, field: Option<String> },
    #[error("could not reach warden: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("invalid warden URL {0:?}")]
    BadUrl(String),
}

impl ClientError {
    /// How long to wait before retrying, when retrying makes sense.
    ///
    /// Heartbeats may be retried: one that did commit before its answer was
    /// lost counts twice at worst. An event retried after a lost answer may
    /// be recorded twice.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Unavailable { retry_after, .. } => Some(retry_after.unwrap_or(Duration::from_secs(5))),
            // A request that could not be built (a key that is no header
            // value) will be the same next time. (An answer that is not
            // warden's, a proxy's page with 200, may not be: retried.)
            Self::Transport(e) if e.is_builder() => None,
            Self::Transport(_) => Some(Duration::from_secs(5)),
            _ => None,
        }
    }
}

/// Statuses worth retrying: warden busy or restarting (503, 429), a proxy
/// in front of it between replicas (502, 504), a request cut off (408), an
/// error of the moment (500).
fn transient(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

/// A Retry-After value at `now`: seconds, as warden sends, or an HTTP date,
/// as a proxy in front of it may (a date past is no wait).
fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some((at.with_timezone(&chrono::Utc) - now).to_std().unwrap_or(Duration::ZERO))
}

/// When to send next, and to which of several wardens, for an agent that
/// keeps sending. A warden that failed rests for at least what it asked
/// (Retry-After) and at least the current backoff, with random jitter so
/// that a fleet does not come back in step; the others are tried
/// meanwhile. The backoff doubles (up to a minute, or half the agent's
/// interval: see [`Failover::within`]) each time every warden is resting,
/// and starts again after a success.
#[derive(Debug, Clone)]
pub struct Failover {
    rest_until: Vec<std::time::Instant>,
    current: usize,
    backoff: Duration,
    max_backoff: Duration,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The longest a warden's Retry-After is honoured.
pub const MAX_REST: Duration = Duration::from_secs(300);

impl Failover {
    /// A schedule over `wardens` (at least one).
    pub fn new(wardens: usize) -> Self {
        let now = std::time::Instant::now();
        Self { rest_until: vec![now; wardens.max(1)], current: 0, backoff: FIRST_BACKOFF, max_backoff: MAX_BACKOFF }
    }

    /// For an agent heartbeating every `interval`: the backoff stops at
    /// half of it. warden excuses the silence of an outage only until the
    /// database is back; an agent then waiting out a minute's backoff
    /// would be read as late, or offline, for the outage it sat out.
    pub fn within(mut self, interval: Duration) -> Self {
        self.set_interval(interval);
        self
    }

    /// As [`Failover::within`], for an interval learnt later (warden's
    /// `next_heartbeat_ms`).
    pub fn set_interval(&mut self, interval: Duration) {
        self.max_backoff = (interval / 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
        self.backoff = self.backoff.min(self.max_backoff);
    }

    /// Starts at `warden` rather than the first (one known to answer).
    pub fn starting_at(mut self, warden: usize) -> Self {
        self.current = warden.min(self.rest_until.len() - 1);
        self
    }

    /// The warden to send to: the current one unless it is resting, else
    /// the one whose rest ends first, with how long to wait for it.
    pub fn next(&mut self, now: std::time::Instant) -> (usize, Duration) {
        if self.rest_until[self.current] > now
            && let Some((i, _)) = self.rest_until.iter().enumerate().min_by_key(|(_, until)| **until)
        {
            self.current = i;
        }
        (self.current, self.rest_until[self.current].saturating_duration_since(now))
    }

    /// The last send succeeded.
    pub fn succeeded(&mut self) {
        self.backoff = FIRST_BACKOFF;
    }

    /// The last send failed and may be retried after `hint` (at most
    /// [`MAX_REST`]: a proxy asking for a day would have the agent reported
    /// offline for it).
    pub fn failed(&mut self, hint: Duration, now: std::time::Instant) {
        let jitter = 1.0 + crate::alerting::dispatcher::jitter() / 2.0;
        self.rest_until[self.current] = now + hint.min(MAX_REST).max(self.backoff).mul_f64(jitter);
        self.current = (self.current + 1) % self.rest_until.len();
        if self.rest_until.iter().all(|until| *until > now) {
            self.backoff = (self.backoff * 2).min(self.max_backoff);
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
    field: Option<String>,
}

/// A connection to one warden.
#[derive(Clone)]
pub struct Client {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
}

/// Without the key.
impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).field("keyed", &self.key.is_some()).finish()
    }
}

impl Client {
    pub fn new(base_url: &str, key: Option<String>) -> Result<Self, ClientError> {
        let base = base_url.trim_end_matches('/').to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(ClientError::BadUrl(base_url.to_string()));
        }
        crate::alerting::tls::install_crypto_provider();
        // Longer than warden's own request timeout (30 s by default), so
        // that a slow warden's answer (503) arrives rather than being cut
        // off here with the outcome unknown.
        // A host that drops connections silently is given up after the
        // connect timeout, not the whole 40 s, so that the next is tried.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(40))
            .build()?;
        Ok(Self { base, key, http })
    }

    pub async fn heartbeat(&self, heartbeat: &HeartbeatRequest) -> Result<HeartbeatAck, ClientError> {
        self.post("/v1/heartbeats", heartbeat).await
    }

    /// Sends an event and returns its id.
    pub async fn event(&self, event: &EventRequest) -> Result<i64, ClientError> {
        #[derive(Deserialize)]
        struct Created {
            id: i64,
        }
        Ok(self.post::<_, Created>("/v1/events", event).await?.id)
    }

    async fn post<B: Serialize, T: serde::de::DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        let mut request = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await?;
        let status = response.status();
        if status.is_success() {
            return Ok(response.json().await?);
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
        let detail = response.json::<ErrorBody>().await.ok().map(|b| b.error);
        let (code, message, field) = match detail {
            Some(d) => (d.code, d.message, d.field),
            None => (status.as_str().to_string(), status.canonical_reason().unwrap_or("error").to_string(), None),
        };
        if transient(status.as_u16()) {
            return Err(ClientError::Unavailable { retry_after, message });
        }
        Err(ClientError::Rejected { status: status.as_u16(), code, message, field })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_resting_warden_waits_at_least_what_it_asked_and_the_backoff_grows() {
        let mut f = Failover::new(1);
        let t = Instant::now();
        assert_eq!(f.next(t), (0, Duration::ZERO));
        f.failed(Duration::from_secs(10), t);
        let (i, wait) = f.next(t);
        assert_eq!(i, 0);
        assert!(wait >= Duration::from_secs(10) && wait <= Duration::from_secs(15), "{wait:?}");
        // A Retry-After of days (or garbage) is cut to five minutes.
        f.failed(Duration::from_secs(u64::MAX / 4), t);
        assert!(f.next(t).1 <= MAX_REST.mul_f64(1.5));
        // No hint: the backoff, doubling with each failure, jittered up.
        let mut f = Failover::new(1);
        let mut waits = Vec::new();
        for _ in 0..4 {
            f.failed(Duration::ZERO, t);
            waits.push(f.next(t).1);
        }
        for (n, wait) in waits.iter().enumerate() {
            let floor = FIRST_BACKOFF * 2u32.pow(n as u32);
            assert!(*wait >= floor && *wait <= floor.mul_f64(1.5), "failure {n}: {wait:?}");
        }
        f.succeeded();
        f.failed(Duration::ZERO, t);
        assert!(f.next(t).1 <= FIRST_BACKOFF.mul_f64(1.5), "a success starts the backoff again");
    }

    #[test]
    fn the_backoff_stops_at_half_the_agents_interval() {
        let t = Instant::now();
        let mut f = Failover::new(1).within(Duration::from_secs(10));
        for _ in 0..10 {
            f.failed(Duration::ZERO, t);
        }
        let wait = f.next(t).1;
        assert!(wait >= Duration::from_secs(5) && wait <= Duration::from_millis(7500), "{wait:?}");
        // A day's interval: a minute at most, as without one.
        let mut f = Failover::new(1).within(Duration::from_secs(86_400));
        for _ in 0..10 {
            f.failed(Duration::ZERO, t);
        }
        assert!(f.next(t).1 <= MAX_BACKOFF.mul_f64(1.5));
        // What warden asks for is honoured whatever the interval.
        let mut f = Failover::new(1).within(Duration::from_secs(2));
        f.failed(Duration::from_secs(5), t);
        assert!(f.next(t).1 >= Duration::from_secs(5));
    }

    #[test]
    fn retry_after_is_read_in_seconds_or_as_an_http_date() {
        let now = chrono::DateTime::parse_from_rfc3339("1994-11-06T08:49:00Z").unwrap().to_utc();
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now), Some(Duration::from_secs(37)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:48:00 GMT", now), Some(Duration::ZERO), "past");
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn the_key_is_not_in_a_clients_debug() {
        let client = Client::new("http://127.0.0.1:1", Some("wdn_secret".into())).unwrap();
        let shown = format!("{client:?}");
        assert!(!shown.contains("wdn_secret") && shown.contains("keyed: true"), "{shown}");
    }

    #[test]
    fn another_warden_is_tried_at_once_and_the_backoff_grows_only_when_all_rest() {
        let mut f = Failover::new(2);
        let t = Instant::now();
        f.failed(Duration::from_secs(5), t);
        assert_eq!(f.next(t), (1, Duration::ZERO), "the other one, straight away");
        f.failed(Duration::from_secs(1), t);
        let (i, wait) = f.next(t);
        assert_eq!(i, 1, "the one whose rest ends first");
        assert!(wait >= Duration::from_secs(1) && wait <= Duration::from_millis(1500), "{wait:?}");
        assert_eq!(f.backoff, FIRST_BACKOFF * 2, "both resting: backoff doubled once");
        // Once its rest is over the first is ready again.
        assert_eq!(f.next(t + Duration::from_secs(8)), (1, Duration::ZERO));
    }
}
