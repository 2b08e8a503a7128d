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
//! - HTTP status codes speak for what happens before JSON-RPC: 401/403 for
//!   the key (checked exactly as on /v1, scopes included), 413 past the body
//!   limit, 400 for a body that is not JSON-RPC or an unsupported
//!   `MCP-Protocol-Version`, 403 for a browser page on another origin.
//!   Inside JSON-RPC, protocol mistakes are JSON-RPC errors; a tool that ran
//!   and failed (bad arguments, unknown agent, database down) answers a
//!   result with `isError: true`, which the model reads and can act on.
//! - The scopes every tool call in a request needs are checked before
//!   anything runs, so a refused batch has done nothing.

use axum::body::Body;
use axum::extract::State;
use axum::http::header::{ALLOW, AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

use super::error::DEFAULT_RETRY_AFTER;
use super::ingest::{read_limited, submit_error};
use super::{ApiError, AppState};
use crate::auth::{AuthError, Principal, Scope};
use crate::ingest::heartbeat::{self, Heartbeat, Limits, ParseError, WireHeartbeat};
use crate::model::{AGENT_ID_MAX, AgentId, HeartbeatStatus, Mode};

/// Protocol revisions warden speaks, newest first. Nothing warden uses
/// differs between them.
const PROTOCOL_VERSIONS: [&str; 3] = ["2025-06-18", "2025-03-26", "2024-11-05"];
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
const INTERNAL_ERROR: i64 = -32603;

const AGENT_STATUS_SQL: &str = "SELECT agent_id, name, labels, mode, status, expected_interval_ms, first_seen, \
     last_seen, uptime_seconds, heartbeat_count, restart_count, liveness, liveness_since, score, tier, evaluated_at \
     FROM warden.agent_status WHERE agent_id = $1";

pub fn router() -> Router<AppState> {
    Router::new().route("/mcp", post(post_mcp).get(get_mcp))
}

/// One POST: authenticate, read the body, answer each JSON-RPC request in it.
async fn post_mcp(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, Refusal> {
    super::check_origin(&headers)?;
    let principal = authenticate(&state, &headers).await?;
    check_protocol_version(&headers)?;
    // This route lives outside /v1 and its DefaultBodyLimit.
    let body = read_limited(body, state.settings.ingest.max_body_bytes).await?;
    let most = MAX_BATCH.min(state.settings.ingest.max_batch);
    let (messages, batch) = match parse_body(&body, most) {
        Ok(parsed) => parsed,
        Err(error) => return Ok((StatusCode::BAD_REQUEST, Json(error)).into_response()),
    };
    authorize(&principal, &messages)?;
    let mut replies = Vec::with_capacity(messages.len());
    for message in messages {
        if let Some(reply) = answer(&state, message).await {
            replies.push(reply);
        }
    }
    Ok(match (batch, replies.len()) {
        (_, 0) => StatusCode::ACCEPTED.into_response(),
        (false, _) => Json(replies.swap_remove(0)).into_response(),
        (true, _) => Json(replies).into_response(),
    })
}

/// warden has nothing to push to clients, so it offers no SSE stream; the
/// spec's answer for that is 405.
async fn get_mcp() -> Response {
    let mut response = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "warden offers no event stream on /mcp; send JSON-RPC messages with POST",
    )
    .into_response();
    response.headers_mut().insert(ALLOW, HeaderValue::from_static("POST"));
    response
}

/// An HTTP-level refusal: the usual `ApiError` body, plus
/// `WWW-Authenticate` on 401, where MCP clients look for how to log in.
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

/// Connecting and listing tools need a valid key of either scope an agent
/// or a dashboard would hold; each tool then needs its own (`authorize`).
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
/// not speak. Clients send none before `initialize`, and 2024-11-05 clients
/// never do.
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
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        reply(Value::Null, Err(RpcError::new(PARSE_ERROR, format!("the body is not valid JSON ({e})"))))
    })?;
    match value {
        Value::Array(items) if items.is_empty() => {
            Err(reply(Value::Null, Err(RpcError::new(INVALID_REQUEST, "a batch must hold at least one message"))))
        }
        Value::Array(items) if items.len() > most => Err(reply(
            Value::Null,
            Err(RpcError::new(
                INVALID_REQUEST,
                format!("a batch holds {} messages; at most {most} are allowed", items.len()),
            )),
        )),
        Value::Array(items) => Ok((items.into_iter().map(Message::classify).collect(), true)),
        single => match Message::classify(single) {
            Message::Invalid { id, reason } => Err(reply(id, Err(RpcError::new(INVALID_REQUEST, reason)))),
            message => Ok((vec![message], false)),
        },
    }
}

/// 403 unless the key holds the scope of every tool the request calls.
fn authorize(principal: &Principal, messages: &[Message]) -> Result<(), ApiError> {
    for scope in messages.iter().filter_map(Message::tool).map(Tool::scope) {
        if !principal.allows(scope) {
            return Err(AuthError::Forbidden(scope).into());
        }
    }
    Ok(())
}

/// A JSON-RPC error: the request was not carried out.
#[derive(Debug)]
struct RpcError {
    code: i64,
    message: String,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, message)
    }

    /// The details are logged where the error arose, never sent.
    fn internal() -> Self {
        Self::new(INTERNAL_ERROR, "internal error; the details are in warden's log")
    }
}

fn reply(id: Value, outcome: Result<Value, RpcError>) -> Value {
    match outcome {
        Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
        Err(e) => json!({ "jsonrpc": "2.0", "id": id, "error": { "code": e.code, "message": e.message } }),
    }
}

async fn answer(state: &AppState, message: Message) -> Option<Value> {
    match message {
        Message::Request { id, method, params } => Some(reply(id, dispatch(state, &method, params).await)),
        Message::Invalid { id, reason } => Some(reply(id, Err(RpcError::new(INVALID_REQUEST, reason)))),
        Message::Silent => None,
    }
}

async fn dispatch(state: &AppState, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    match method {
        "initialize" => Ok(initialize(&params_object(params)?)),
        "ping" => params_object(params).map(|_| json!({})),
        "tools/list" => params_object(params).map(|_| json!({ "tools": Tool::ALL.map(Tool::describe) })),
        "tools/call" => call_tool(state, params_object(params)?).await,
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
                        { "type": "number" },
                        {
                            "type": "object",
                            "properties": {
                                "value": { "type": "number" },
                                "unit": { "type": "string", "minLength": 1, "maxLength": heartbeat::UNIT_MAX },
                            },
                            "required": ["value"],
                            "additionalProperties": false,
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

/// `tools/call`: a well-formed call of a known tool runs; anything else is
/// -32602.
async fn call_tool(state: &AppState, mut params: Map<String, Value>) -> Result<Value, RpcError> {
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
    match tool {
        Tool::Heartbeat => heartbeat_tool(state, arguments).await,
        Tool::AgentStatus => agent_status_tool(state, arguments).await,
    }
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

/// A failure while a tool ran. Temporary ones (503: queue full, database
/// down) are results that tell the model to retry; anything else is an
/// internal error, already logged by the conversion into `ApiError`.
fn failure(e: ApiError) -> Result<Value, RpcError> {
    if e.status == StatusCode::SERVICE_UNAVAILABLE {
        let after = e.retry_after.unwrap_or(DEFAULT_RETRY_AFTER);
        Ok(tool_error(format!("{}; retry in {after} s", e.message)))
    } else {
        Err(RpcError::internal())
    }
}

/// The same heartbeat as POST /v1/heartbeats takes, through the same
/// validation and the same group commit.
async fn heartbeat_tool(state: &AppState, arguments: Map<String, Value>) -> Result<Value, RpcError> {
    let heartbeat = match parse_heartbeat(arguments, &state.limits) {
        Ok(heartbeat) => heartbeat,
        Err(refusal) => return Ok(refusal),
    };
    let agent = heartbeat.agent_id.clone();
    let ack = match state.ingestor.submit(vec![heartbeat]).await {
        Ok(acks) => acks.into_iter().next().ok_or_else(RpcError::internal)?,
        Err(e) => return failure(submit_error(e)),
    };
    crate::metrics::METRICS.heartbeats.with_label_values(&["mcp"]).inc();
    let now = Utc::now();
    let interval = ack.next_heartbeat_ms;
    Ok(tool_result(json!({
        "status": "alive",
        "agent": agent,
        "timestamp": rfc3339(now),
        "next_expected": rfc3339(now + chrono::Duration::milliseconds(interval.into())),
        "heartbeat_interval": interval,
        "recorded": true,
        "is_new": ack.is_new,
        "restart_detected": ack.restart_detected,
    })))
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

async fn agent_status_tool(state: &AppState, arguments: Map<String, Value>) -> Result<Value, RpcError> {
    let agent_id = match arguments.get("agent_id") {
        Some(Value::String(text)) => match AgentId::parse(text.as_str()) {
            Ok(id) => id,
            Err(message) => return Ok(argument_error("agent_id", &message)),
        },
        None | Some(Value::Null) => return Ok(argument_error("agent_id", "is required")),
        Some(_) => return Ok(argument_error("agent_id", "must be a string")),
    };
    match read_agent_status(state, &agent_id).await {
        Ok(Some(status)) => Ok(tool_result(status)),
        Ok(None) => Ok(tool_error(format!("unknown agent `{agent_id}`: warden has had no heartbeat from it"))),
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
    fn the_protocol_version_is_echoed_when_known_else_the_newest_is_offered() {
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
        assert!(crate::api::check_origin(&headers(None)).is_ok());
        assert!(crate::api::check_origin(&headers(Some("https://warden.example:8080"))).is_ok());
        let with_host = |host: &'static str, origin: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(HOST, HeaderValue::from_static(host));
            h.insert(ORIGIN, HeaderValue::from_static(origin));
            crate::api::check_origin(&h).is_ok()
        };
        assert!(with_host("warden.example:443", "https://warden.example"), "default port spelled out");
        assert!(with_host("warden.example", "https://Warden.example:443"));
        assert!(with_host("[::1]:8080", "http://[::1]:8080"));
        assert!(!with_host("[::1]:8080", "http://[::1]:8081"));
        assert!(!with_host("warden.example:80", "https://warden.example"), "another port");
        for foreign in ["https://evil.example", "https://warden.example", "null"] {
            assert_eq!(
                crate::api::check_origin(&headers(Some(foreign))).unwrap_err().status,
                StatusCode::FORBIDDEN,
                "{foreign}"
            );
        }
    }
}
