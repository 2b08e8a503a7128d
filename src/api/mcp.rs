//! `/mcp`: the Model Context Protocol over its "Streamable HTTP" transport,
//! so MCP clients (agent frameworks, assistants) can send heartbeats and
//! read an agent's status as tools, with no adapter in between.
//!
//! Transport choices, each one the spec allows:
//! - Every POST is answered with one plain `application/json` body, never
//!   an SSE stream: no tool runs long enough to need progress messages, and
//!   warden never sends requests or notifications to clients. For the same
//!   reason `GET /mcp`, which would open a server-to-client stream, is 405.
//! - No sessions (`Mcp-Session-Id` is never issued): every POST carries its
//!   own bearer key and stands alone, so any replica can answer it and no
//!   state outlives a request.
//! - Notifications (and responses, which warden never asks for) get 202 and
//!   an empty body. A JSON array is a batch, as in protocol 2025-03-26, of
//!   at most [`MAX_BATCH`] messages, or `ingest.max_batch` when lower: its
//!   calls run one after another under a single rate-limit charge, and
//!   /v1/heartbeats' own batch limit must not be dodged by sending many
//!   calls of one heartbeat each.
//! - HTTP status codes speak for what happens before JSON-RPC: 401 for a
//!   missing or unknown key, 413 past the body limit, 400 for a body that is
//!   not JSON-RPC or an unsupported `MCP-Protocol-Version`, 403 for a
//!   browser page on another origin, 408 for a body that did not arrive in
//!   time, 429 for an address that failed authentication too often.
//!   Their bodies are JSON-RPC errors with `id: null`
//!   ([`refusals_as_json_rpc`]), not the REST error shape, since that is
//!   what an MCP client can parse.
//! - Refusals that waiting overcomes (the key's rate limit, warden starting,
//!   the key not checkable while the database is out of reach) answer each
//!   request of the body with its own JSON-RPC error ([`Deferred`]), HTTP
//!   200 with `Retry-After`: some SDKs end their session on any HTTP error
//!   status, so a client slowed down would otherwise have to connect anew.
//!   A body of notifications only, having no request to answer, still gets
//!   the HTTP status. warden running out of time (`server.request_timeout`)
//!   is answered request by request too, shortly before it: a key check
//!   still waiting as a refusal, a tool call still waiting as a tool error
//!   (saying whether its heartbeat may yet be stored), and the calls of the
//!   batch after it as refusals, not run.
//! - Inside JSON-RPC, protocol mistakes are JSON-RPC errors, and so is a
//!   tool call the key's scopes do not allow ([`FORBIDDEN`]): MCP SDKs treat
//!   an HTTP error status on a request as a broken connection, not as an
//!   answer to that one request. `tools/list` names only the tools the key
//!   may call. A tool that ran and failed (bad arguments, unknown agent,
//!   database down, anything unexpected) answers a result with
//!   `isError: true`, which the model reads and can act on.
//! - The scopes every tool call in a request needs are checked before
//!   anything runs: in a batch with a forbidden call, no tool runs at all.

use axum::body::{Body, HttpBody as _};
use axum::extract::{Extension, Request, State};
use axum::http::header::{ALLOW, AUTHORIZATION, CONTENT_LENGTH, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

use super::deadline::{self, AnswerBy};
use super::error::DEFAULT_RETRY_AFTER;
use super::ingest::{read_limited, submit_error};
use super::{ApiError, AppState};
use crate::auth::{AuthError, Principal, Scope};
use crate::ingest::heartbeat::{self, Heartbeat, Limits, ParseError, WireHeartbeat};
use crate::ingest::writer::RequestWrites;
use crate::model::{AGENT_ID_MAX, AgentId, HeartbeatStatus, Liveness, Mode, Tier};

/// Protocol revisions warden speaks, newest first. Nothing warden uses
/// differs between them.
const PROTOCOL_VERSIONS: [&str; 4] = ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];
/// Offered to a client that asks for a revision warden does not know.
const LATEST_VERSION: &str = PROTOCOL_VERSIONS[0];
/// Sent by clients on every request after `initialize`.
const PROTOCOL_HEADER: &str = "mcp-protocol-version";

const INSTRUCTIONS: &str = "warden watches agents through their heartbeats. Call `heartbeat` with your agent_id \
     at least every next_heartbeat_ms milliseconds (the answer says when the next one is expected); warden marks \
     an agent degraded, then offline, when its heartbeats stop. Call `agent_status` to read an agent's liveness, \
     health score and counters.";

/// JSON-RPC 2.0 error codes.
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
// warden's own codes, from the range JSON-RPC leaves to servers. Not
// -32001, which the TypeScript SDK names a request timeout, nor -32002,
// MCP's unknown resource.
/// Refused before JSON-RPC dispatch; `data.http_status` says how.
const REFUSED: i64 = -32000;
/// A tool call the key's scopes do not allow.
const FORBIDDEN: i64 = -32003;
/// A tool call not run because another call of its batch is forbidden.
const WITHHELD: i64 = -32004;

const AGENT_STATUS_SQL: &str = "SELECT agent_id, name, labels, mode, status, expected_interval_ms, first_seen, \
     last_seen, uptime_seconds, heartbeat_count, restart_count, liveness, liveness_since, score, tier, evaluated_at \
     FROM warden.agent_status WHERE agent_id = $1";

pub fn router() -> Router<AppState> {
    Router::new().route("/mcp", post(post_mcp).fallback(not_post))
}

/// One POST: authenticate, read the body, answer each JSON-RPC request in it.
async fn post_mcp(
    State(state): State<AppState>,
    headers: HeaderMap,
    deferred: Option<Extension<Deferred>>,
    answer_by: Option<Extension<AnswerBy>>,
    body: Body,
) -> Result<Response, Refusal> {
    super::check_origin(&headers, &state.settings.alerting.link_base)?;
    let answer_by = answer_by.map(|Extension(AnswerBy(at))| at);
    let principal = match deferred {
        Some(Extension(Deferred(refusal))) => Err(refusal),
        None => in_time(answer_by, authenticate(&state, &headers))
            .await
            .unwrap_or_else(|| Err(ApiError::unavailable("the API key could not be checked in time"))),
    };
    let principal = match principal {
        Ok(principal) => principal,
        Err(refusal) if Deferred::answers(&refusal) => return Ok(refuse_each(&state, refusal, &headers, body).await),
        Err(refusal) => return Err(refusal.into()),
    };
    // This route lives outside /v1 and its DefaultBodyLimit.
    let body = read_limited(body, state.settings.ingest.max_body_bytes).await?;
    let most = MAX_BATCH.min(state.settings.ingest.max_batch);
    let (messages, batch) = match parse_body(&body, most) {
        Ok(parsed) => parsed,
        Err(error) => return Ok((StatusCode::BAD_REQUEST, Json(error)).into_response()),
    };
    // Clients send the header only after initialization, and one that does
    // send it on `initialize` must still get to negotiate.
    if !messages.iter().all(Message::is_initialize) {
        check_protocol_version(&headers)?;
    }
    let forbidden = forbidden_scope(&principal, &messages);
    let writes = RequestWrites::current();
    let mut replies = Vec::with_capacity(messages.len());
    let mut out_of_time = false;
    for message in messages {
        let id = match &message {
            Message::Request { id, .. } if out_of_time => {
                replies.push(reply(id.clone(), Err(RpcError::refused(&not_run()))));
                continue;
            }
            Message::Request { id, .. } => id.clone(),
            _ => Value::Null,
        };
        let mark = writes.as_ref().map_or(0, RequestWrites::submitted);
        match in_time(answer_by, answer(&state, &principal, forbidden, message)).await {
            Some(answered) => replies.extend(answered),
            // Only a tool call waits on anything: it ran and failed, as
            // when the database is down.
            None => {
                out_of_time = true;
                let written = writes.as_ref().is_some_and(|w| w.abandon_since(mark));
                replies.push(reply(id, Ok(failure(deadline::abandoned(written)))));
            }
        }
    }
    let mut response = replies_response(batch, replies);
    if out_of_time {
        response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(DEFAULT_RETRY_AFTER));
    }
    Ok(response)
}

/// `work`'s output, or `None` when it did not finish by `answer_by`: a
/// request that waits on a stalled database gets its own JSON-RPC answer
/// rather than the request timeout's HTTP 503, on which some SDKs end
/// their session.
async fn in_time<F: std::future::Future>(answer_by: Option<tokio::time::Instant>, work: F) -> Option<F::Output> {
    match answer_by {
        Some(at) => tokio::time::timeout_at(at, work).await.ok(),
        None => Some(work.await),
    }
}

/// The calls of a body after one that ran out of time.
fn not_run() -> ApiError {
    ApiError::unavailable("not run: an earlier call of this batch ran out of time (server.request_timeout)")
}

/// The HTTP answer to a body's replies: 202 and no body when nothing was
/// a request, the one reply, or the batch's array.
fn replies_response(batch: bool, mut replies: Vec<Value>) -> Response {
    match (batch, replies.len()) {
        (_, 0) => StatusCode::ACCEPTED.into_response(),
        (false, _) => Json(replies.swap_remove(0)).into_response(),
        (true, _) => Json(replies).into_response(),
    }
}

/// A refusal of a POST to /mcp made before its handler ran, left for the
/// handler to answer once it has read the body ([`refuse_each`]).
#[derive(Debug, Clone)]
pub struct Deferred(ApiError);

impl Deferred {
    /// Leaves `refusal` to /mcp's handler when `request` is a POST there
    /// and the refusal is one that waiting overcomes; `false` when the
    /// caller must answer it itself.
    pub fn defer(request: &mut Request, refusal: ApiError) -> bool {
        let deferred = request.method() == Method::POST && request.uri().path() == "/mcp" && Self::answers(&refusal);
        if deferred {
            request.extensions_mut().insert(Self(refusal));
        }
        deferred
    }

    /// 429 and 503 (the rate limit; warden starting; the database out of
    /// reach, busy or without warden's schema while the key is checked): a
    /// client that waits gets through. The rest keep their HTTP status,
    /// which is how the spec has a server ask for a key (401) or reject a
    /// body it cannot take.
    fn answers(refusal: &ApiError) -> bool {
        matches!(refusal.status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE)
    }
}

/// The most of a body read to answer its requests with a refusal: far more
/// than a few tool calls take, and little enough that a client refused
/// for sending too much costs warden next to nothing (no rate limit
/// applies to it any more).
const REFUSED_BODY_MAX: usize = 64 * 1024;

/// Answers every request of the body with `refusal` as its JSON-RPC error
/// (HTTP 200, `Retry-After` kept); messages that are not JSON-RPC get their
/// usual -32600. Nothing runs. A body that cannot be answered so keeps the
/// refusal's HTTP status: one with no request in it (a notification must
/// not look accepted), over [`REFUSED_BODY_MAX`] (or the smaller limits of
/// `[ingest]`), not JSON-RPC, or under a
/// protocol revision warden does not speak. The refusal wins over what
/// else is wrong with the request.
async fn refuse_each(state: &AppState, refusal: ApiError, headers: &HeaderMap, body: Body) -> Response {
    let ingest = &state.settings.ingest;
    let Ok(body) = read_limited(body, REFUSED_BODY_MAX.min(ingest.max_body_bytes)).await else {
        return Refusal(refusal).into_response();
    };
    let Ok((messages, batch)) = parse_body(&body, MAX_BATCH.min(ingest.max_batch)) else {
        return Refusal(refusal).into_response();
    };
    let negotiating = messages.iter().all(Message::is_initialize);
    if !messages.iter().any(|m| matches!(m, Message::Request { .. }))
        || (!negotiating && check_protocol_version(headers).is_err())
    {
        return Refusal(refusal).into_response();
    }
    let replies: Vec<Value> = messages
        .into_iter()
        .filter_map(|message| match message {
            Message::Request { id, .. } => Some(reply(id, Err(RpcError::refused(&refusal)))),
            Message::Invalid { id, reason } => Some(reply(id, Err(RpcError::new(INVALID_REQUEST, reason)))),
            Message::Silent => None,
        })
        .collect();
    let mut response = replies_response(batch, replies);
    if let Some(seconds) = refusal.retry_after {
        response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// `data` of a refusal's JSON-RPC error: the HTTP status it stands for,
/// the `code` of warden's REST error shape, its field, the Retry-After.
fn refusal_data(status: StatusCode, reason: &str, field: Option<&str>, retry_after: Option<u64>) -> Value {
    let mut data = json!({ "http_status": status.as_u16(), "reason": reason });
    if let Some(field) = field {
        data["field"] = field.into();
    }
    if let Some(seconds) = retry_after {
        data["retry_after"] = seconds.into();
    }
    data
}

/// warden has nothing to push to clients, so it offers no SSE stream (GET),
/// and keeps no sessions to end (DELETE); the spec's answer for both is
/// 405. Any other method gets the same, with the same Allow.
async fn not_post() -> Response {
    let mut response = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "warden offers no event stream and keeps no session on /mcp; send JSON-RPC messages with POST",
    )
    .into_response();
    response.headers_mut().insert(ALLOW, HeaderValue::from_static("POST"));
    response
}

/// An HTTP-level refusal: an `ApiError` (turned into a JSON-RPC error by
/// [`refusals_as_json_rpc`]), plus `WWW-Authenticate` on 401, where MCP
/// clients look for how to log in.
struct Refusal(ApiError);

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let unauthorized = self.0.status == StatusCode::UNAUTHORIZED;
        let mut response = self.0.into_response();
        if unauthorized {
            response.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Far more than any `ApiError` body; a larger body passes untouched.
const REFUSAL_MAX_BYTES: u64 = 16 * 1024;

/// Rewrites the REST error body of any refusal on /mcp (from the handler,
/// the rate limit, the request timeout, the router's 405) into a JSON-RPC
/// error with `id: null`, keeping the status and headers. MCP clients
/// parse only JSON-RPC, and a refusal made before dispatch answers no
/// request in particular. Layered outside every middleware that can refuse.
pub async fn refusals_as_json_rpc(request: Request, next: Next) -> Response {
    if request.uri().path() != "/mcp" {
        return next.run(request).await;
    }
    let response = next.run(request).await;
    if response.status().is_success() || response.body().size_hint().upper().is_none_or(|n| n > REFUSAL_MAX_BYTES) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, REFUSAL_MAX_BYTES as usize).await else {
        return Response::from_parts(parts, Body::empty());
    };
    match refusal_as_json_rpc(parts.status, &parts.headers, &bytes) {
        Some(refusal) => {
            parts.headers.remove(CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(refusal.to_string()))
        }
        None => Response::from_parts(parts, Body::from(bytes)),
    }
}

/// The JSON-RPC form of a REST error body (`{"error": {"code": "...",
/// ...}}`); `None` for any other body, such as a JSON-RPC error already.
fn refusal_as_json_rpc(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Option<Value> {
    let rest: Value = serde_json::from_slice(body).ok()?;
    let error = rest.get("error")?;
    let (reason, message) = (error.get("code")?.as_str()?, error.get("message")?.as_str()?);
    let field = error.get("field").and_then(Value::as_str);
    let retry_after = headers.get(RETRY_AFTER).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let data = refusal_data(status, reason, field, retry_after);
    Some(json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": { "code": REFUSED, "message": message, "data": data },
    }))
}

/// Connecting and listing tools need a valid key of either scope an agent
/// or a dashboard would hold; each tool then needs its own.
///
/// A key that cannot be checked because the database is out of reach
/// counts as a refused heartbeat (the call may well be one; which tool it
/// is, is not known yet), as on POST /v1/heartbeats.
async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let header = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let result = match state.auth.authenticate(header, Scope::Ingest).await {
        Err(AuthError::Forbidden(_)) => state.auth.authenticate(header, Scope::Read).await,
        other => other,
    };
    if let Err(AuthError::Db(e)) = &result
        && e.is_unavailable()
    {
        state.ingestor.refused_unreachable(std::time::Instant::now());
    }
    Ok(result?)
}

/// The spec asks for 400 when a client names a revision the server does
/// not speak. 2024-11-05 clients never send one.
fn check_protocol_version(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers.get(PROTOCOL_HEADER) {
        None => Ok(()),
        Some(v) if v.to_str().is_ok_and(|v| PROTOCOL_VERSIONS.contains(&v)) => Ok(()),
        Some(_) => Err(ApiError::malformed(format!(
            "unsupported MCP-Protocol-Version; warden speaks {}",
            PROTOCOL_VERSIONS.join(", ")
        ))),
    }
}

/// One JSON-RPC message, sorted by what it asks of warden.
#[derive(Debug)]
enum Message {
    Request {
        id: Value,
        method: String,
        params: Option<Value>,
    },
    /// A notification, or a response: nothing to answer.
    Silent,
    /// Not a JSON-RPC message; answered with -32600 (under its id, if usable).
    Invalid {
        id: Value,
        reason: &'static str,
    },
}

impl Message {
    fn classify(value: Value) -> Self {
        let Value::Object(mut object) = value else {
            return Self::Invalid { id: Value::Null, reason: "a JSON-RPC message must be an object" };
        };
        let id = object.remove("id");
        let usable_id = id.clone().filter(|id| id.is_string() || id.is_number());
        let reply_id = usable_id.clone().unwrap_or(Value::Null);
        if object.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Self::Invalid { id: reply_id, reason: "`jsonrpc` must be \"2.0\"" };
        }
        match (object.remove("method"), id, usable_id) {
            (Some(Value::String(_)), None, _) => Self::Silent,
            (Some(Value::String(method)), Some(_), Some(id)) => {
                Self::Request { id, method, params: object.remove("params") }
            }
            (Some(Value::String(_)), Some(_), None) => {
                Self::Invalid { id: Value::Null, reason: "`id` must be a string or a number" }
            }
            (Some(_), _, _) => Self::Invalid { id: reply_id, reason: "`method` must be a string" },
            (None, Some(_), _) if object.contains_key("result") || object.contains_key("error") => Self::Silent,
            (None, _, _) => Self::Invalid { id: reply_id, reason: "`method` is required" },
        }
    }

    fn is_initialize(&self) -> bool {
        matches!(self, Self::Request { method, .. } if method == "initialize")
    }

    /// The tool a `tools/call` request names, if it names a known one.
    fn tool(&self) -> Option<Tool> {
        match self {
            Self::Request { method, params: Some(params), .. } if method == "tools/call" => {
                params.get("name").and_then(Value::as_str).and_then(Tool::parse)
            }
            _ => None,
        }
    }
}

/// Most messages in one JSON-RPC batch (fewer when `ingest.max_batch` is).
pub const MAX_BATCH: usize = 100;

/// The messages of a body and whether it was a batch; or, when the body is
/// not JSON-RPC at all or a batch holds more than `most` messages, the
/// error response to send with HTTP 400.
fn parse_body(body: &[u8], most: usize) -> Result<(Vec<Message>, bool), Value> {
    let Unambiguous(value) = read_json(body).map_err(|e| reply(Value::Null, Err(e)))?;
    match value {
        Value::Array(items) if items.is_empty() => {
            Err(reply(Value::Null, Err(RpcError::new(INVALID_REQUEST, "a batch must hold at least one message"))))
        }
        Value::Array(items) if items.len() > most => Err(reply(
            Value::Null,
            Err(RpcError::new(
                INVALID_REQUEST,
                format!("a batch holds {} messages, over the limit of {most}", items.len()),
            )),
        )),
        Value::Array(items) => Ok((items.into_iter().map(Message::classify).collect(), true)),
        single => match Message::classify(single) {
            Message::Invalid { id, reason } => Err(reply(id, Err(RpcError::new(INVALID_REQUEST, reason)))),
            message => Ok((vec![message], false)),
        },
    }
}

/// The body as JSON, or a parse error that names where in it reading
/// stopped when that is inside a value: a number too large for a double
/// (`1e999`) or a NaN in a tool's arguments is then located as POST
/// /v1/heartbeats locates it, though the request cannot be answered by id.
fn read_json(body: &[u8]) -> Result<Unambiguous, RpcError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let refuse = |e: serde_json::Error, path: Option<String>| {
        let mut error = RpcError::new(PARSE_ERROR, format!("the body is not valid JSON ({e})"));
        if let Some(path) = path.filter(|p| !p.is_empty() && p != ".") {
            error.message = format!("the body is not valid JSON at {path} ({e})");
            error.data = Some(json!({ "field": path }));
        }
        error
    };
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = crate::ingest::heartbeat::names_a_field(e.path()).then(|| e.path().to_string());
        refuse(e.into_inner(), path)
    })?;
    de.end().map_err(|e| refuse(e, None))?;
    Ok(value)
}

/// JSON as serde_json reads it, except that an object naming a key twice
/// is an error: serde_json would keep the last, so that a heartbeat naming
/// `agent_id` twice recorded one of them where POST /v1/heartbeats refuses
/// the body.
struct Unambiguous(Value);

impl<'de> serde::Deserialize<'de> for Unambiguous {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UnambiguousVisitor).map(Unambiguous)
    }
}

struct UnambiguousVisitor;

impl<'de> serde::de::Visitor<'de> for UnambiguousVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Unambiguous(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Unambiguous(value) = map.next_value()?;
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("the key {key:?} appears twice in one object")));
            }
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// The scope of the first tool call in the request that the key may not
/// make, if any: then no tool of the request runs.
fn forbidden_scope(principal: &Principal, messages: &[Message]) -> Option<Scope> {
    messages.iter().filter_map(Message::tool).map(Tool::scope).find(|scope| !principal.allows(*scope))
}

/// A JSON-RPC error: the request was not carried out.
#[derive(Debug)]
struct RpcError {
    code: i64,
    message: String,
    data: Option<Value>,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), data: None }
    }

    /// A refusal made before the request ran, with what HTTP would have
    /// said in `data`.
    fn refused(refusal: &ApiError) -> Self {
        let data = refusal_data(refusal.status, refusal.code, refusal.field.as_deref(), refusal.retry_after);
        Self { code: REFUSED, message: refusal.message.clone(), data: Some(data) }
    }

    fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, message)
    }

    fn forbidden(tool: Tool) -> Self {
        let scope = tool.scope();
        Self {
            code: FORBIDDEN,
            message: format!("this API key lacks the `{scope}` scope, which the `{}` tool needs", tool.name()),
            data: Some(json!({ "required_scope": scope.as_str() })),
        }
    }

    /// The other tool calls of a batch with a forbidden one: a batch runs
    /// all its tool calls or none, so a refused batch has done nothing.
    fn withheld(scope: Scope) -> Self {
        Self::new(
            WITHHELD,
            format!(
                "not run: another call in this batch needs the `{scope}` scope, which this API key lacks, \
                 and a batch runs all its tool calls or none"
            ),
        )
    }
}

fn reply(id: Value, outcome: Result<Value, RpcError>) -> Value {
    match outcome {
        Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
        Err(RpcError { code, message, data: None }) => {
            json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } })
        }
        Err(RpcError { code, message, data: Some(data) }) => {
            json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message, "data": data } })
        }
    }
}

/// `forbidden` is the scope that keeps the request's tools from running,
/// from [`forbidden_scope`].
async fn answer(state: &AppState, principal: &Principal, forbidden: Option<Scope>, message: Message) -> Option<Value> {
    let tool = message.tool();
    match message {
        Message::Request { id, method, params } => {
            let outcome = match (tool, forbidden) {
                (Some(tool), Some(_)) if !principal.allows(tool.scope()) => Err(RpcError::forbidden(tool)),
                (Some(_), Some(scope)) => Err(RpcError::withheld(scope)),
                _ => dispatch(state, principal, &method, params).await,
            };
            Some(reply(id, outcome))
        }
        Message::Invalid { id, reason } => Some(reply(id, Err(RpcError::new(INVALID_REQUEST, reason)))),
        Message::Silent => None,
    }
}

async fn dispatch(
    state: &AppState,
    principal: &Principal,
    method: &str,
    params: Option<Value>,
) -> Result<Value, RpcError> {
    match method {
        "initialize" => Ok(initialize(&params_object(params)?)),
        "ping" => params_object(params).map(|_| json!({})),
        "tools/list" => params_object(params).map(|_| list_tools(principal)),
        "tools/call" => call_tool(state, principal, params_object(params)?).await,
        _ => Err(RpcError::new(METHOD_NOT_FOUND, format!("method `{method}` is not supported"))),
    }
}

fn params_object(params: Option<Value>) -> Result<Map<String, Value>, RpcError> {
    match params {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(params)) => Ok(params),
        Some(_) => Err(RpcError::invalid_params("`params` must be an object")),
    }
}

/// Echoes the client's revision when warden speaks it, else offers the
/// newest; the client then decides whether it can go on.
fn initialize(params: &Map<String, Value>) -> Value {
    let requested = params.get("protocolVersion").and_then(Value::as_str);
    let version = PROTOCOL_VERSIONS.into_iter().find(|v| Some(*v) == requested).unwrap_or(LATEST_VERSION);
    json!({
        "protocolVersion": version,
        "capabilities": { "tools": { "listChanged": false } },
        "serverInfo": { "name": "warden", "version": env!("CARGO_PKG_VERSION") },
        "instructions": INSTRUCTIONS,
    })
}

/// Only the tools the key may call: a client offers its model every tool
/// listed, and a call the key cannot make would only be refused.
fn list_tools(principal: &Principal) -> Value {
    let tools: Vec<Value> =
        Tool::ALL.into_iter().filter(|tool| principal.allows(tool.scope())).map(Tool::describe).collect();
    json!({ "tools": tools })
}

#[derive(Debug, Clone, Copy)]
enum Tool {
    Heartbeat,
    AgentStatus,
}

impl Tool {
    const ALL: [Tool; 2] = [Tool::Heartbeat, Tool::AgentStatus];

    fn name(self) -> &'static str {
        match self {
            Tool::Heartbeat => "heartbeat",
            Tool::AgentStatus => "agent_status",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The scope a key needs to call the tool, as on the HTTP API.
    fn scope(self) -> Scope {
        match self {
            Tool::Heartbeat => Scope::Ingest,
            Tool::AgentStatus => Scope::Read,
        }
    }

    /// The tool's entry in `tools/list`.
    fn describe(self) -> Value {
        match self {
            Tool::Heartbeat => json!({
                "name": self.name(),
                "title": "Send a heartbeat",
                "description": "Reports that an agent is alive, exactly like POST /v1/heartbeats: registers the agent \
                    on its first heartbeat, records status, uptime and metrics, and answers once committed, with \
                    the time the next heartbeat is expected.",
                "inputSchema": heartbeat_schema(),
                "outputSchema": heartbeat_result_schema(),
                "annotations": { "readOnlyHint": false, "destructiveHint": false, "idempotentHint": false,
                                 "openWorldHint": false },
            }),
            Tool::AgentStatus => json!({
                "name": self.name(),
                "title": "Agent status",
                "description": "What warden knows about one agent: liveness (unknown, online, degraded, offline) \
                    and since when, health score and tier, first and last heartbeat, heartbeat and restart counts.",
                "inputSchema": {
                    "type": "object",
                    "properties": { "agent_id": agent_id_schema() },
                    "required": ["agent_id"],
                },
                "outputSchema": agent_status_schema(),
                "annotations": { "readOnlyHint": true, "openWorldHint": false },
            }),
        }
    }
}

fn agent_id_schema() -> Value {
    json!({
        "type": "string",
        "description": "The agent's identifier: letters, digits and . _ : -",
        "minLength": 1,
        "maxLength": AGENT_ID_MAX,
        "pattern": "^[A-Za-z0-9._:-]+$",
    })
}

/// The fields of one heartbeat on POST /v1/heartbeats, with its bounds.
fn heartbeat_schema() -> Value {
    let modes: Vec<&str> = Mode::ALL.iter().map(|m| m.as_str()).collect();
    let statuses: Vec<&str> = HeartbeatStatus::ALL.iter().map(|s| s.as_str()).collect();
    json!({
        "type": "object",
        "properties": {
            "agent_id": agent_id_schema(),
            "name": { "type": "string", "maxLength": heartbeat::NAME_MAX, "description": "Display name" },
            "mode": {
                "type": "string",
                "enum": modes,
                "description": "How often the agent reports; picks its default interval when next_heartbeat_ms \
                    is not given",
            },
            "status": {
                "type": "string",
                "enum": statuses,
                "description": "The agent's own view of its health; healthy when omitted",
            },
            "uptime_seconds": {
                "type": "integer", "minimum": 0,
                "description": "Seconds since the agent started; a drop is recorded as a restart",
            },
            "next_heartbeat_ms": {
                "type": "integer",
                "minimum": heartbeat::NEXT_HEARTBEAT_MIN_MS,
                "maximum": heartbeat::NEXT_HEARTBEAT_MAX_MS,
                "description": "Milliseconds until the agent's next heartbeat",
            },
            "sent_at": { "type": "string", "format": "date-time", "description": "When the agent sent it (RFC 3339)" },
            "metrics": {
                "type": "object",
                "description": "Named numbers: a bare number or {\"value\": n, \"unit\": \"ms\"}",
                "propertyNames": { "pattern": "^[A-Za-z0-9._:/-]+$", "maxLength": heartbeat::METRIC_NAME_MAX },
                "additionalProperties": {
                    "oneOf": [
                        { "type": "number", "minimum": -heartbeat::METRIC_VALUE_MAX, "maximum": heartbeat::METRIC_VALUE_MAX },
                        {
                            "type": "object",
                            "properties": {
                                "value": {
                                    "type": "number",
                                    "minimum": -heartbeat::METRIC_VALUE_MAX,
                                    "maximum": heartbeat::METRIC_VALUE_MAX,
                                },
                                "unit": { "type": "string", "minLength": 1, "maxLength": heartbeat::UNIT_MAX },
                            },
                            "required": ["value"],
                        },
                    ],
                },
            },
            "labels": {
                "type": "object",
                "description": "Name-value pairs that describe the agent; replace the stored labels when given",
                "propertyNames": { "pattern": "^[A-Za-z0-9._/-]+$", "maxLength": heartbeat::LABEL_KEY_MAX },
                "additionalProperties": { "type": "string", "maxLength": heartbeat::LABEL_VALUE_MAX },
            },
        },
        "required": ["agent_id"],
    })
}

/// What the `heartbeat` tool answers (`structuredContent`), as
/// [`heartbeat_tool`] writes it.
fn heartbeat_result_schema() -> Value {
    let time = |description: &str| json!({ "type": "string", "format": "date-time", "description": description });
    json!({
        "type": "object",
        "properties": {
            "status": { "type": "string", "const": "alive" },
            "agent": { "type": "string", "description": "The agent_id the heartbeat was recorded for" },
            "timestamp": time("When warden recorded it"),
            "next_expected": time("When the next heartbeat is due"),
            "heartbeat_interval": {
                "type": "integer",
                "description": "Milliseconds warden now expects between this agent's heartbeats",
            },
            "recorded": { "type": "boolean", "description": "Committed to the database: always true" },
            "is_new": { "type": "boolean", "description": "This heartbeat registered the agent" },
            "restart_detected": { "type": "boolean", "description": "The uptime went down: the agent restarted" },
        },
        "required": ["status", "agent", "timestamp", "next_expected", "heartbeat_interval", "recorded", "is_new",
                     "restart_detected"],
    })
}

/// What the `agent_status` tool answers, as [`read_agent_status`] writes
/// it: the agent's row of `warden.agent_status`.
fn agent_status_schema() -> Value {
    let names = |all: &[&'static str]| Value::from(all.to_vec());
    let or_null = |mut schema: Value| {
        if let Some(Value::Array(values)) = schema.get_mut("enum") {
            values.push(Value::Null);
        }
        let kind = schema["type"].clone();
        schema["type"] = json!([kind, "null"]);
        schema
    };
    let time = json!({ "type": "string", "format": "date-time" });
    let modes: Vec<&str> = Mode::ALL.iter().map(|m| m.as_str()).collect();
    let statuses: Vec<&str> = HeartbeatStatus::ALL.iter().map(|s| s.as_str()).collect();
    let liveness: Vec<&str> = Liveness::ALL.iter().map(|l| l.as_str()).collect();
    let tiers: Vec<&str> = Tier::ALL.iter().map(|t| t.as_str()).collect();
    json!({
        "type": "object",
        "properties": {
            "agent_id": { "type": "string" },
            "name": { "type": ["string", "null"] },
            "labels": { "type": "object", "additionalProperties": { "type": "string" } },
            "mode": or_null(json!({ "type": "string", "enum": names(&modes) })),
            "status": or_null(json!({ "type": "string", "enum": names(&statuses),
                                      "description": "What the agent last said of itself" })),
            "expected_interval_ms": { "type": "integer" },
            "first_seen": time,
            "last_seen": time,
            "uptime_seconds": { "type": ["integer", "null"] },
            "heartbeat_count": { "type": "integer" },
            "restart_count": { "type": "integer" },
            "liveness": { "type": "string", "enum": names(&liveness) },
            "liveness_since": time,
            "score": { "type": ["number", "null"], "minimum": 0, "maximum": 100,
                       "description": "Weighted health score; null until first scored" },
            "tier": or_null(json!({ "type": "string", "enum": names(&tiers) })),
            "evaluated_at": or_null(time.clone()),
        },
        "required": ["agent_id", "name", "labels", "mode", "status", "expected_interval_ms", "first_seen",
                     "last_seen", "uptime_seconds", "heartbeat_count", "restart_count", "liveness",
                     "liveness_since", "score", "tier", "evaluated_at"],
    })
}

/// `tools/call`: a well-formed call of a known tool runs; anything else is
/// -32602.
async fn call_tool(state: &AppState, principal: &Principal, mut params: Map<String, Value>) -> Result<Value, RpcError> {
    let tool = match params.get("name") {
        Some(Value::String(name)) => Tool::parse(name)
            .ok_or_else(|| RpcError::invalid_params(format!("unknown tool `{name}`; tools/list names the tools")))?,
        Some(_) => return Err(RpcError::invalid_params("`name` must be a string")),
        None => return Err(RpcError::invalid_params("`name` is required")),
    };
    let arguments = match params.remove("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(arguments)) => arguments,
        Some(_) => return Err(RpcError::invalid_params("`arguments` must be an object")),
    };
    Ok(match tool {
        Tool::Heartbeat => heartbeat_tool(state, principal, arguments).await,
        Tool::AgentStatus => agent_status_tool(state, arguments).await,
    })
}

/// A successful tool result: the object both as structured content and, for
/// clients older than structured content, as JSON text.
fn tool_result(object: Value) -> Value {
    json!({
        "content": [{ "type": "text", "text": object.to_string() }],
        "structuredContent": object,
        "isError": false,
    })
}

/// A tool that ran and failed, told to the model in words.
fn tool_error(text: impl Into<String>) -> Value {
    json!({ "content": [{ "type": "text", "text": text.into() }], "isError": true })
}

fn argument_error(field: &str, message: &str) -> Value {
    tool_error(format!("invalid argument `{field}`: {message}"))
}

/// A failure while a tool ran, as a tool error: MCP puts errors of a tool's
/// execution in its result, where the model sees them. Temporary ones (503:
/// queue full, database down) tell the model to retry; anything else was
/// logged by the conversion into `ApiError`, and its details stay there.
fn failure(e: ApiError) -> Value {
    if e.status == StatusCode::SERVICE_UNAVAILABLE {
        let after = e.retry_after.unwrap_or(DEFAULT_RETRY_AFTER);
        tool_error(format!("{}; retry in {after} s", e.message))
    } else {
        internal_tool_error()
    }
}

fn internal_tool_error() -> Value {
    tool_error("internal error; see warden's log")
}

/// The same heartbeat as POST /v1/heartbeats takes, through the same
/// validation and the same group commit.
async fn heartbeat_tool(state: &AppState, principal: &Principal, arguments: Map<String, Value>) -> Value {
    let heartbeat = match parse_heartbeat(arguments, &state.limits) {
        Ok(heartbeat) => heartbeat,
        Err(refusal) => return refusal,
    };
    let agent = heartbeat.agent_id.clone();
    if !principal.may_report_for(agent.as_str()) {
        return tool_error(format!("refused: this API key may not report for agent `{agent}`; nothing was recorded"));
    }
    let ack = match state.ingestor.submit(vec![heartbeat]).await.map(|acks| acks.into_iter().next()) {
        Ok(Some(ack)) => ack,
        Ok(None) => {
            tracing::error!(agent_id = %agent, "the ingestor acknowledged no heartbeat for an MCP call");
            return internal_tool_error();
        }
        Err(e) => return failure(submit_error(e)),
    };
    crate::metrics::METRICS.heartbeats.with_label_values(&["mcp"]).inc();
    let now = Utc::now();
    let interval = ack.next_heartbeat_ms;
    tool_result(json!({
        "status": "alive",
        "agent": agent,
        "timestamp": rfc3339(now),
        "next_expected": rfc3339(now + chrono::Duration::milliseconds(interval.into())),
        "heartbeat_interval": interval,
        "recorded": true,
        "is_new": ack.is_new,
        "restart_detected": ack.restart_detected,
    }))
}

/// Reads the arguments with the parser of a POST /v1/heartbeats body, so the
/// tool accepts and refuses exactly what the HTTP API does and names fields
/// the same way. A refusal is the tool error to answer.
fn parse_heartbeat(arguments: Map<String, Value>, limits: &Limits) -> Result<Heartbeat, Value> {
    let bytes = serde_json::to_vec(&Value::Object(arguments)).map_err(|e| tool_error(e.to_string()))?;
    let wire = heartbeat::parse_json::<WireHeartbeat>(&bytes).map_err(|e| match e {
        ParseError::Malformed(message) => tool_error(message),
        ParseError::Invalid(e) => argument_error(&e.field, &e.message),
    })?;
    heartbeat::validate(wire, limits, Utc::now()).map_err(|e| argument_error(&e.field, &e.message))
}

async fn agent_status_tool(state: &AppState, arguments: Map<String, Value>) -> Value {
    let agent_id = match arguments.get("agent_id") {
        Some(Value::String(text)) => match AgentId::parse(text.as_str()) {
            Ok(id) => id,
            Err(message) => return argument_error("agent_id", &message),
        },
        None | Some(Value::Null) => return argument_error("agent_id", "is required"),
        Some(_) => return argument_error("agent_id", "must be a string"),
    };
    match read_agent_status(state, &agent_id).await {
        Ok(Some(status)) => tool_result(status),
        Ok(None) => tool_error(format!("unknown agent `{agent_id}`: warden has had no heartbeat from it")),
        Err(e) => failure(e),
    }
}

/// The agent's row of `warden.agent_status`, or `None` if warden never
/// heard from it.
async fn read_agent_status(state: &AppState, agent_id: &AgentId) -> Result<Option<Value>, ApiError> {
    let client = crate::db::client(&state.pool).await?;
    let statement = client.prepare_cached(AGENT_STATUS_SQL).await?;
    let Some(row) = client.query_opt(&statement, &[&agent_id.as_str()]).await? else {
        return Ok(None);
    };
    let time = |i: usize| rfc3339(row.get(i));
    let maybe_time = |i: usize| row.get::<_, Option<DateTime<Utc>>>(i).map(rfc3339);
    Ok(Some(json!({
        "agent_id": row.get::<_, String>(0),
        "name": row.get::<_, Option<String>>(1),
        "labels": row.get::<_, Value>(2),
        "mode": row.get::<_, Option<String>>(3),
        "status": row.get::<_, Option<String>>(4),
        "expected_interval_ms": row.get::<_, i32>(5),
        "first_seen": time(6),
        "last_seen": time(7),
        "uptime_seconds": row.get::<_, Option<i64>>(8),
        "heartbeat_count": row.get::<_, i64>(9),
        "restart_count": row.get::<_, i64>(10),
        "liveness": row.get::<_, String>(11),
        "liveness_since": time(12),
        "score": row.get::<_, Option<f64>>(13),
        "tier": row.get::<_, Option<String>>(14),
        "evaluated_at": maybe_time(15),
    })))
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(text: &str) -> Message {
        Message::classify(serde_json::from_str(text).unwrap())
    }

    #[test]
    fn a_key_named_twice_is_a_parse_error_not_the_last_one() {
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call",
                        "params":{"name":"heartbeat","arguments":{"agent_id":"m1","agent_id":"m2"}}}"#;
        let refused = parse_body(body, 10).unwrap_err();
        assert_eq!(refused["error"]["code"], PARSE_ERROR);
        assert!(refused["error"]["message"].as_str().unwrap().contains("\"agent_id\" appears twice"), "{refused}");
        // A value JSON allows but a double cannot hold is located.
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call",
                        "params":{"name":"heartbeat","arguments":{"agent_id":"m1","metrics":{"cpu":1e999}}}}"#;
        let refused = parse_body(body, 10).unwrap_err();
        assert_eq!(refused["error"]["code"], PARSE_ERROR);
        assert_eq!(refused["error"]["data"]["field"], "params.arguments.metrics.cpu", "{refused}");
        assert!(refused["error"]["message"].as_str().unwrap().contains("number out of range"), "{refused}");
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call",
                        "params":{"name":"heartbeat","arguments":{"agent_id":"m1","uptime_seconds":NaN}}}"#;
        let refused = parse_body(body, 10).unwrap_err();
        assert_eq!(refused["error"]["data"]["field"], "params.arguments.uptime_seconds", "{refused}");
        // Broken JSON outside any value names no field; trailing text is refused.
        for body in [&b"{"[..], b"{} x", b"NaN"] {
            let refused = parse_body(body, 10).unwrap_err();
            assert_eq!(refused["error"]["code"], PARSE_ERROR);
            assert!(refused["error"].get("data").is_none(), "{refused}");
        }
        // Nested values and batches read as before.
        let (messages, batch) =
            parse_body(br#"[{"jsonrpc":"2.0","id":1,"method":"ping","params":{"a":[1,2.5,"x",null,true]}}]"#, 10)
                .unwrap();
        assert!(batch && matches!(&messages[0], Message::Request { params: Some(p), .. } if p["a"][1] == 2.5));
    }

    #[test]
    fn messages_are_sorted_into_requests_silent_ones_and_invalid_ones() {
        assert!(matches!(
            classify(r#"{"jsonrpc":"2.0","id":"a","method":"ping"}"#),
            Message::Request { id: Value::String(_), .. }
        ));
        assert!(matches!(classify(r#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#), Message::Request { .. }));
        assert!(matches!(classify(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#), Message::Silent));
        assert!(matches!(classify(r#"{"jsonrpc":"2.0","id":3,"result":{}}"#), Message::Silent));
        let invalid = [
            (r#"[1]"#, Value::Null),
            (r#"{"id":1,"method":"ping"}"#, json!(1)),
            (r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#, json!(1)),
            (r#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#, Value::Null),
            (r#"{"jsonrpc":"2.0","id":{"x":1},"method":"ping"}"#, Value::Null),
            (r#"{"jsonrpc":"2.0","id":2,"method":5}"#, json!(2)),
            (r#"{"jsonrpc":"2.0","id":2}"#, json!(2)),
        ];
        for (text, expected) in invalid {
            match classify(text) {
                Message::Invalid { id, .. } => assert_eq!(id, expected, "{text}"),
                other => panic!("{text}: expected invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn only_known_tool_calls_need_a_scope() {
        let call = |name: &str| {
            classify(&format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{name}"}}}}"#))
        };
        assert!(matches!(call("heartbeat").tool().map(Tool::scope), Some(Scope::Ingest)));
        assert!(matches!(call("agent_status").tool().map(Tool::scope), Some(Scope::Read)));
        assert!(call("nope").tool().is_none());
        assert!(classify(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#).tool().is_none());
    }

    #[test]
    fn tools_are_listed_and_a_batch_refused_by_the_scopes_of_the_key() {
        let key = |scopes: &[Scope]| Principal { scopes: scopes.to_vec(), ..Principal::anonymous() };
        let names = |principal: &Principal| -> Vec<String> {
            let list = list_tools(principal);
            list["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_string()).collect()
        };
        assert_eq!(names(&key(&[Scope::Ingest])), ["heartbeat"]);
        assert_eq!(names(&key(&[Scope::Read])), ["agent_status"]);
        assert_eq!(names(&key(&[Scope::Admin])), ["heartbeat", "agent_status"]);
        assert_eq!(names(&key(&[Scope::Ingest, Scope::Read])), ["heartbeat", "agent_status"]);

        let batch = [
            classify(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"heartbeat"}}"#),
            classify(r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"agent_status"}}"#),
        ];
        assert!(matches!(forbidden_scope(&key(&[Scope::Ingest]), &batch), Some(Scope::Read)));
        assert!(matches!(forbidden_scope(&key(&[Scope::Read]), &batch), Some(Scope::Ingest)));
        assert!(forbidden_scope(&key(&[Scope::Admin]), &batch).is_none());
        assert!(forbidden_scope(&key(&[Scope::Ingest]), &batch[..1]).is_none());

        let refused = reply(json!(2), Err(RpcError::forbidden(Tool::AgentStatus)));
        assert_eq!(refused["error"]["code"], FORBIDDEN);
        assert_eq!(refused["error"]["data"], json!({ "required_scope": "read" }));
        assert!(refused["error"]["message"].as_str().unwrap().contains("`read`"), "{refused}");
        assert!(refused.get("result").is_none());
    }

    #[test]
    fn tool_failures_are_tool_errors_that_keep_the_details_in_the_log() {
        let internal = failure(ApiError::internal());
        assert_eq!(internal["isError"], true);
        assert_eq!(internal["content"][0]["text"], "internal error; see warden's log");
        let conflict = failure(ApiError::conflict("constraint warden_agents_pkey was violated"));
        assert_eq!(conflict, internal, "nothing of the error itself is told");
        let busy = failure(ApiError::unavailable("the database is unavailable; retry later").with_retry_after(7));
        assert_eq!(busy["isError"], true);
        assert_eq!(busy["content"][0]["text"], "the database is unavailable; retry later; retry in 7 s");
        assert_eq!(internal_tool_error(), internal);
    }

    #[test]
    fn rest_refusals_become_json_rpc_errors_and_other_bodies_are_left_alone() {
        let limited = ApiError::too_many_requests(std::time::Duration::from_secs(3)).into_response();
        let (parts, _) = limited.into_parts();
        let body = br#"{"error":{"code":"rate_limited","message":"too many requests; slow down"}}"#;
        let refusal = refusal_as_json_rpc(StatusCode::TOO_MANY_REQUESTS, &parts.headers, body).unwrap();
        assert_eq!(
            refusal,
            json!({"jsonrpc": "2.0", "id": null, "error": {
                "code": REFUSED, "message": "too many requests; slow down",
                "data": {"http_status": 429, "reason": "rate_limited", "retry_after": 3},
            }})
        );
        let with_field = br#"{"error":{"code":"malformed_request","message":"m","field":"f"}}"#;
        let refusal = refusal_as_json_rpc(StatusCode::BAD_REQUEST, &HeaderMap::new(), with_field).unwrap();
        assert_eq!(refusal["error"]["data"], json!({"http_status": 400, "reason": "malformed_request", "field": "f"}));

        let json_rpc = br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"not JSON"}}"#;
        for other in [&json_rpc[..], b"", b"not json", br#"{"error":"text"}"#] {
            assert!(refusal_as_json_rpc(StatusCode::BAD_REQUEST, &HeaderMap::new(), other).is_none());
        }
    }

    #[test]
    fn the_protocol_version_is_echoed_when_known_else_the_newest_is_offered() {
        assert_eq!(LATEST_VERSION, "2025-11-25");
        for version in PROTOCOL_VERSIONS {
            let params = json!({ "protocolVersion": version });
            assert_eq!(initialize(params.as_object().unwrap())["protocolVersion"], version);
        }
        let params = json!({ "protocolVersion": "2099-01-01" });
        assert_eq!(initialize(params.as_object().unwrap())["protocolVersion"], LATEST_VERSION);
        assert_eq!(initialize(&Map::new())["protocolVersion"], LATEST_VERSION);
    }

    #[test]
    fn origins_other_than_the_host_are_refused() {
        use axum::http::header::{HOST, ORIGIN};
        let headers = |origin: Option<&'static str>| {
            let mut h = HeaderMap::new();
            h.insert(HOST, HeaderValue::from_static("warden.example:8080"));
            if let Some(origin) = origin {
                h.insert(ORIGIN, HeaderValue::from_static(origin));
            }
            h
        };
        assert!(crate::api::check_origin(&headers(None), "").is_ok());
        assert!(crate::api::check_origin(&headers(Some("https://warden.example:8080")), "").is_ok());
        let with_host = |host: &'static str, origin: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(HOST, HeaderValue::from_static(host));
            h.insert(ORIGIN, HeaderValue::from_static(origin));
            crate::api::check_origin(&h, "").is_ok()
        };
        assert!(with_host("warden.example:443", "https://warden.example"), "default port spelled out");
        assert!(with_host("warden.example", "https://Warden.example:443"));
        assert!(with_host("[::1]:8080", "http://[::1]:8080"));
        assert!(!with_host("[::1]:8080", "http://[::1]:8081"));
        assert!(!with_host("warden.example:80", "https://warden.example"), "another port");
        for foreign in ["https://evil.example", "https://warden.example", "null"] {
            assert_eq!(
                crate::api::check_origin(&headers(Some(foreign)), "").unwrap_err().status,
                StatusCode::FORBIDDEN,
                "{foreign}"
            );
        }
        // Behind a proxy that rewrites Host (nginx's default) or drops its
        // port: the proxy's X-Forwarded-Host, or the public address.
        let proxied = |forwarded: Option<&'static str>, origin: &'static str, public: &str| {
            let mut h = HeaderMap::new();
            h.insert(HOST, HeaderValue::from_static("127.0.0.1:8080"));
            h.insert(ORIGIN, HeaderValue::from_static(origin));
            if let Some(f) = forwarded {
                h.insert("x-forwarded-host", HeaderValue::from_static(f));
            }
            crate::api::check_origin(&h, public).is_ok()
        };
        assert!(proxied(Some("warden.example"), "https://warden.example", ""));
        assert!(proxied(Some("warden.example:8443, inner:80"), "https://warden.example:8443", ""));
        assert!(!proxied(Some("warden.example"), "https://evil.example", ""));
        assert!(proxied(None, "https://warden.example:8443", "https://warden.example:8443/ops"));
        assert!(!proxied(None, "https://warden.example:8443", "https://warden.example"), "another port");
        assert!(!proxied(None, "http://warden.example", "https://warden.example"), "another scheme");
        assert!(!proxied(None, "https://warden.example", ""));
    }
}
