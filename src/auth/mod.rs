//! API keys: creation, storage (hashed), verification with a short cache.
//!
//! A key looks like `wdn_<key_id>_<secret>`: `key_id` (12 hex digits) is
//! public and finds the row; the whole key is hashed with SHA-256 and
//! compared in constant time with the stored hash. Keys carry 256 random
//! bits, so a fast hash is enough; nothing reversible is stored.
//!
//! Verified keys are cached for `auth.cache_ttl`, so the hot path (every
//! heartbeat) costs a hash and a map lookup, not a query. Revocation
//! therefore takes effect within that TTL on every replica. When an entry
//! is missing or expired, the requests that need it at that moment share
//! one lookup instead of each taking a connection for its own.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::db::{self, DbError};

text_enum! {
    /// What a key may do. `admin` implies the other two.
    pub enum Scope {
        Ingest = "ingest",
        Read = "read",
        Admin = "admin",
    }
}

const PREFIX: &str = "wdn_";
const KEY_ID_LEN: usize = 12;
const SECRET_LEN: usize = 64;
/// Cached entries beyond which stale ones are swept (bounds memory under a
/// flood of made-up keys).
const CACHE_LIMIT: usize = 10_000;

/// A newly created key. `token` is shown once and stored nowhere.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub id: i64,
    pub key_id: String,
    pub token: String,
}

/// A stored key as listed to operators (never the secret).
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyInfo {
    pub id: i64,
    pub key_id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// The agent patterns the key may report for; `None` for any agent.
    pub agents: Option<Vec<String>>,
}

/// Who made a request.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The key's name, or `None` when authentication is disabled.
    pub key_name: Option<String>,
    /// The key's public id (`wdn_<id>_...`), or `None` when authentication
    /// is disabled: what per-key limits count by (names need not be unique).
    pub key_id: Option<String>,
    pub scopes: Vec<Scope>,
    /// The agents the key may send heartbeats and events for (exact ids,
    /// or prefixes ending in `*`); `None` for any agent.
    pub agents: Option<std::sync::Arc<[String]>>,
}

impl Principal {
    pub fn anonymous() -> Self {
        Self { key_name: None, key_id: None, scopes: Scope::ALL.to_vec(), agents: None }
    }

    /// A key's principal as its stored row gives it.
    pub fn of_key(name: String, key_id: String, scopes: &[String], agents: Option<Vec<String>>) -> Self {
        Self {
            key_name: Some(name),
            key_id: Some(key_id),
            scopes: scopes.iter().filter_map(|s| s.parse().ok()).collect(),
            agents: agents.map(Into::into),
        }
    }

    /// Whether the key may send heartbeats and events for `agent_id`.
    pub fn may_report_for(&self, agent_id: &str) -> bool {
        self.agents.as_deref().is_none_or(|patterns| patterns.iter().any(|p| pattern_matches(p, agent_id)))
    }

    pub fn allows(&self, needed: Scope) -> bool {
        self.scopes.iter().any(|s| *s == needed || *s == Scope::Admin)
    }

    /// A label for audit fields such as `acknowledged_by`.
    pub fn label(&self) -> String {
        self.key_name.clone().unwrap_or_else(|| "anonymous".into())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("an API key is required: send `Authorization: Bearer <key>`")]
    Missing,
    #[error("the API key is not valid")]
    Invalid,
    #[error("this API key lacks the `{0}` scope")]
    Forbidden(Scope),
    /// A console session's cookie on a changing request without the
    /// session's token: another site's page could have sent the cookie.
    #[error("a console session makes changes only with its CSRF token in the X-CSRF-Token header")]
    CsrfToken {
        /// The session's key, whose budget the refusal is charged to.
        key_id: Option<String>,
    },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Whether `agent_id` is `pattern`: the same id, or one starting with the
/// prefix of a pattern ending in `*`.
fn pattern_matches(pattern: &str, agent_id: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => agent_id.starts_with(prefix),
        None => agent_id == pattern,
    }
}

/// Checks an agent pattern as `keys create --agent` takes it: an agent id,
/// or the start of one followed by `*`.
pub fn parse_agent_pattern(text: &str) -> Result<String, String> {
    let text = text.trim();
    let prefix = text.strip_suffix('*').unwrap_or(text);
    if prefix.is_empty() {
        return Err(if text.is_empty() {
            "an agent pattern may not be empty".into()
        } else {
            "`*` alone would allow every agent: leave --agent out for that".into()
        });
    }
    if prefix.len() > crate::model::AGENT_ID_MAX {
        return Err(format!("`{text}` is longer than an agent id may be ({} characters)", crate::model::AGENT_ID_MAX));
    }
    if let Some(bad) = prefix.chars().find(|c| !crate::model::is_id_char(*c)) {
        return Err(format!(
            "`{text}`: an agent pattern is an agent id (A-Z a-z 0-9 . _ : -), or its start followed by `*` \
             (found {bad:?})"
        ));
    }
    Ok(text.to_string())
}

/// Generates a key: its public id and the full token.
pub fn generate() -> (String, String) {
    let mut bytes = [0u8; KEY_ID_LEN / 2 + SECRET_LEN / 2];
    getrandom::fill(&mut bytes).expect("the operating system provides randomness");
    let hexed = hex(&bytes);
    let (key_id, secret) = hexed.split_at(KEY_ID_LEN);
    (key_id.to_string(), format!("{PREFIX}{key_id}_{secret}"))
}

/// SHA-256 of the whole token.
pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The request's `Authorization` value if it uses the Bearer scheme, the
/// only one warden reads. Another (a proxy's `Basic` credentials, sent by
/// the browser with every request) is no credential of warden's: the
/// request is judged by its console session, if any, as if none were sent.
pub fn bearer_header(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let scheme = value.split_whitespace().next()?;
    scheme.eq_ignore_ascii_case("bearer").then_some(value)
}

/// The credentials of an `Authorization: Bearer <key>` header value. The
/// scheme's name is case-insensitive (RFC 9110, section 11.1), so
/// `BEARER` is as good as `Bearer`.
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The public id inside a well-formed token.
pub fn key_id_of(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(PREFIX)?;
    let (key_id, secret) = rest.split_once('_')?;
    let well_formed = key_id.len() == KEY_ID_LEN
        && secret.len() == SECRET_LEN
        && key_id.bytes().chain(secret.bytes()).all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    well_formed.then_some(key_id)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes.iter().flat_map(|b| [DIGITS[(b >> 4) as usize] as char, DIGITS[(b & 15) as usize] as char]).collect()
}

/// Stores a new key that may report for any agent and returns it, token
/// included.
pub async fn create_key(client: &tokio_postgres::Client, name: &str, scopes: &[Scope]) -> Result<NewKey, DbError> {
    create_key_for(client, name, scopes, None).await
}

/// Stores a new key and returns it, token included. With `agents`, the key
/// may send heartbeats and events only for agents those patterns (checked
/// by [`parse_agent_pattern`]) match.
#[tracing::instrument(skip(client))]
pub async fn create_key_for(
    client: &tokio_postgres::Client,
    name: &str,
    scopes: &[Scope],
    agents: Option<&[String]>,
) -> Result<NewKey, DbError> {
    let (key_id, token) = generate();
    let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
    let row = client
        .query_one(
            "INSERT INTO warden.api_keys (key_id, secret_hash, name, scopes, agents) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
            &[&key_id, &hash(&token).as_slice(), &name, &scopes, &agents],
        )
        .await?;
    Ok(NewKey { id: row.get(0), key_id, token })
}

pub async fn list_keys(client: &tokio_postgres::Client) -> Result<Vec<KeyInfo>, DbError> {
    let rows = client
        .query(
            "SELECT id, key_id, name, scopes, created_at, last_used_at, revoked_at, agents \
             FROM warden.api_keys ORDER BY id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| KeyInfo {
            id: r.get(0),
            key_id: r.get(1),
            name: r.get(2),
            scopes: r.get(3),
            created_at: r.get(4),
            last_used_at: r.get(5),
            revoked_at: r.get(6),
            agents: r.get(7),
        })
        .collect())
}

/// Revokes a key by numeric id or key id. Returns false if none matched
/// (or it was already revoked).
pub async fn revoke_key(client: &tokio_postgres::Client, which: &str) -> Result<bool, DbError> {
    let id: Option<i64> = which.parse().ok();
    let n = client
        .execute(
            "UPDATE warden.api_keys SET revoked_at = now() \
             WHERE (id = $1 OR key_id = $2) AND revoked_at IS NULL",
            &[&id, &which],
        )
        .await?;
    Ok(n > 0)
}

/// A verified key as the cache keeps it.
struct StoredKey {
    hash: [u8; 32],
    principal: Principal,
}

#[derive(Clone)]
struct Cached {
    /// `None` records that no usable key has this id (unknown or revoked).
    key: Option<std::sync::Arc<StoredKey>>,
    fetched: Instant,
}

/// One key id's lookup in progress. It holds when and why the last lookup
/// failed, so that requests queued behind a failed one fail at once
/// instead of each waiting out its own (in an outage: a connect timeout
/// apiece), while a lookup is still tried again every `RETRY_LOOKUP_AFTER`
/// for as long as requests keep coming.
type Gate = std::sync::Arc<tokio::sync::Mutex<Option<(Instant, Failure)>>>;

/// A failed lookup, as repeated to the requests queued behind it: of the
/// same kind, so that an unreachable database is answered with 503 (and
/// counted as refused heartbeats), a busy or unmigrated one with 503, a
/// failing statement with 500.
struct Failure {
    /// The failure as repeated: of the lookup's kind, saying `why`.
    error: DbError,
    why: String,
}

impl Failure {
    fn of(e: &AuthError) -> Self {
        let why = format!("looking up the key failed: {e}");
        let error = match e {
            AuthError::Db(db) => db.again_saying(why.clone()),
            _ => DbError::Repeated(why.clone()),
        };
        Self { error, why }
    }

    fn repeat(&self) -> AuthError {
        AuthError::Db(self.error.again_saying(self.why.clone()))
    }
}

const RETRY_LOOKUP_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Verifies bearer tokens against `warden.api_keys`.
pub struct Authenticator {
    enabled: bool,
    ttl: std::time::Duration,
    pool: Pool,
    cache: Mutex<HashMap<String, Cached>>,
    /// Lookups in progress, by key id; an entry lives while someone waits.
    inflight: Mutex<HashMap<String, Gate>>,
    lookups: AtomicU64,
}

impl Authenticator {
    pub fn new(pool: Pool, enabled: bool, ttl: std::time::Duration) -> Self {
        Self {
            enabled,
            ttl,
            pool,
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            lookups: AtomicU64::new(0),
        }
    }

    /// Keys looked up in the database so far.
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether `header` carries a key this replica has verified, from the
    /// cache alone (never the database; scopes aside), however long ago:
    /// the rate limiter keeps serving such keys from an address that is
    /// failing to authenticate, and lets them through to the real check.
    /// Within the TTL only, a key in constant use would be refused once
    /// its entry aged out, since the lookup that renews it sits behind the
    /// refusal: clients sharing an address with a guesser (a NAT, a proxy)
    /// were locked out after `auth.cache_ttl`.
    pub fn recently_verified(&self, header: Option<&str>) -> bool {
        let Some(token) = header.and_then(bearer_token) else {
            return false;
        };
        let Some(entry) = key_id_of(token).and_then(|key_id| self.cached_within(key_id, std::time::Duration::MAX))
        else {
            return false;
        };
        entry.key.is_some_and(|stored| bool::from(hash(token).ct_eq(&stored.hash)))
    }

    /// Checks an `Authorization` header value for a key with `needed`.
    pub async fn authenticate(&self, header: Option<&str>, needed: Scope) -> Result<Principal, AuthError> {
        if !self.enabled {
            return Ok(Principal::anonymous());
        }
        let header = header.ok_or(AuthError::Missing)?;
        let token = bearer_token(header).ok_or(AuthError::Missing)?;
        let key_id = key_id_of(token).ok_or(AuthError::Invalid)?;
        let entry = match self.cached(key_id) {
            Some(entry) => entry,
            None => self.fetch_shared(key_id).await?,
        };
        let Some(stored) = entry.key else {
            return Err(AuthError::Invalid);
        };
        if !bool::from(hash(token).ct_eq(&stored.hash)) {
            return Err(AuthError::Invalid);
        }
        if !stored.principal.allows(needed) {
            return Err(AuthError::Forbidden(needed));
        }
        Ok(stored.principal.clone())
    }

    fn cached(&self, key_id: &str) -> Option<Cached> {
        self.cached_within(key_id, self.ttl)
    }

    /// The cached entry if fetched less than `age` ago.
    fn cached_within(&self, key_id: &str, age: std::time::Duration) -> Option<Cached> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(key_id).filter(|c| c.fetched.elapsed() < age).cloned()
    }

    /// The key's entry, looked up by one of the requests that need it.
    async fn fetch_shared(&self, key_id: &str) -> Result<Cached, AuthError> {
        let gate: Gate = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            inflight.entry(key_id.to_string()).or_default().clone()
        };
        let mut failed = gate.lock().await;
        let recent_failure = failed.as_ref().filter(|(at, _)| at.elapsed() < RETRY_LOOKUP_AFTER);
        let result = match (self.cached(key_id), recent_failure) {
            (Some(entry), _) => Ok(entry),
            (None, Some((_, failure))) => Err(failure.repeat()),
            (None, None) => {
                let result = self.fetch(key_id).await;
                *failed = result.as_ref().err().map(|e| (Instant::now(), Failure::of(e)));
                result
            }
        };
        drop(failed);
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        // The map's reference and ours: nobody else is waiting.
        if std::sync::Arc::strong_count(&gate) <= 2 {
            inflight.remove(key_id);
        }
        result
    }

    async fn fetch(&self, key_id: &str) -> Result<Cached, AuthError> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let result = self.fetch_uncounted(key_id).await;
        // Many `unknown`: made-up keys, or a client with a revoked one.
        let outcome = match &result {
            Ok(Cached { key: Some(_), .. }) => "found",
            Ok(Cached { key: None, .. }) => "unknown",
            Err(_) => "failed",
        };
        crate::metrics::METRICS.key_lookups.with_label_values(&[outcome]).inc();
        result
    }

    async fn fetch_uncounted(&self, key_id: &str) -> Result<Cached, AuthError> {
        let client = db::client(&self.pool).await?;
        // Touching last_used_at here records use at most once per TTL.
        let row = client
            .query_opt(
                "UPDATE warden.api_keys SET last_used_at = now() \
                 WHERE key_id = $1 AND revoked_at IS NULL \
                 RETURNING secret_hash, name, scopes, agents",
                &[&key_id],
            )
            .await
            .map_err(DbError::from)?;
        let key = row.map(|r| {
            let stored: Vec<u8> = r.get(0);
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&stored);
            let scopes: Vec<String> = r.get(2);
            let principal = Principal::of_key(r.get(1), key_id.to_string(), &scopes, r.get(3));
            std::sync::Arc::new(StoredKey { hash, principal })
        });
        let entry = Cached { key, fetched: Instant::now() };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_LIMIT {
            let ttl = self.ttl;
            cache.retain(|_, c| c.fetched.elapsed() < ttl);
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
        }
        cache.insert(key_id.to_string(), entry.clone());
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_lookup_is_repeated_as_the_same_kind_of_failure() {
        let unreachable = Failure::of(&AuthError::Db(DbError::Unavailable("connection refused".into()))).repeat();
        assert!(matches!(&unreachable, AuthError::Db(e) if e.is_unavailable()), "503, counted as refused time");
        let failing = Failure::of(&AuthError::Db(DbError::Inconsistent("no such column".into()))).repeat();
        assert!(matches!(&failing, AuthError::Db(e) if !e.is_unavailable()), "500, the database was there");
        assert!(failing.to_string().contains("no such column"), "{failing}");
        let busy = Failure::of(&AuthError::Db(DbError::Busy("statement timeout".into()))).repeat();
        assert!(matches!(&busy, AuthError::Db(e) if e.is_transient() && !e.is_unavailable()), "503, not refused");
        let bare = Failure::of(&AuthError::Db(DbError::SchemaMissing("no api_keys".into()))).repeat();
        assert!(matches!(&bare, AuthError::Db(e) if e.is_schema_missing()), "503 saying to migrate");
    }

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let (id1, t1) = generate();
        let (_, t2) = generate();
        assert_ne!(t1, t2);
        assert_eq!(key_id_of(&t1), Some(id1.as_str()));
        assert_eq!(t1.len(), PREFIX.len() + KEY_ID_LEN + 1 + SECRET_LEN);
    }

    #[test]
    fn malformed_tokens_have_no_key_id() {
        let (_, token) = generate();
        for bad in [
            "",
            "wdn_",
            &token[..token.len() - 1],
            &token.replace("wdn_", "xyz_"),
            &token.to_uppercase(),
            &format!("{token}0"),
        ] {
            assert_eq!(key_id_of(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_bearer_scheme_is_named_in_any_case() {
        for header in ["Bearer k", "bearer k", "BEARER k", "bEaReR  k ", " Bearer k"] {
            assert_eq!(bearer_token(header), Some("k"), "{header:?}");
        }
        for header in ["Bearer", "Bearer ", "Basic k", "Bearerk", "Token k", ""] {
            assert_eq!(bearer_token(header), None, "{header:?}");
        }
    }

    #[test]
    fn admin_implies_every_scope_and_others_only_themselves() {
        let admin = Principal { scopes: vec![Scope::Admin], ..Principal::anonymous() };
        assert!(Scope::ALL.iter().all(|s| admin.allows(*s)));
        let ingest = Principal { scopes: vec![Scope::Ingest], ..Principal::anonymous() };
        assert!(ingest.allows(Scope::Ingest));
        assert!(!ingest.allows(Scope::Read) && !ingest.allows(Scope::Admin));
    }

    #[test]
    fn agent_patterns_match_exact_ids_and_prefixes() {
        let key = |patterns: &[&str]| Principal {
            agents: Some(patterns.iter().map(|p| p.to_string()).collect()),
            ..Principal::anonymous()
        };
        let web = key(&["web-*", "db-1"]);
        assert!(web.may_report_for("web-1") && web.may_report_for("web-") && web.may_report_for("db-1"));
        assert!(!web.may_report_for("db-10") && !web.may_report_for("web") && !web.may_report_for("xweb-1"));
        assert!(Principal::anonymous().may_report_for("anything"));
        assert!(!key(&["a"]).may_report_for("A"), "agent ids are case-sensitive");
    }

    #[test]
    fn agent_patterns_are_ids_or_prefixes_and_never_everything() {
        assert_eq!(parse_agent_pattern(" web-* ").as_deref(), Ok("web-*"));
        assert_eq!(parse_agent_pattern("host:db.1").as_deref(), Ok("host:db.1"));
        for (bad, says) in [
            ("*", "every agent"),
            ("", "empty"),
            ("w*b", "found '*'"),
            ("web-**", "found '*'"),
            ("a b", "found ' '"),
            (&"x".repeat(129), "longer"),
        ] {
            let e = parse_agent_pattern(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
