//! The read API (scope `read`): agents, one agent in detail, fleet totals,
//! incidents. Lists use keyset pagination: `next_cursor` is the last key
//! of the page, so pages stay cheap and stable while rows change. (An
//! agent's path also takes DELETE, admin: `super::agents::remove`.)

use std::collections::HashMap;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::auth::{Authorized, ReadScope};
use super::extract::{IdPath, QueryPairs};
use super::{ApiError, AppState};
use crate::console::data::TierFilter;
use crate::db;
use crate::health::incidents::IssueType;
use crate::model::{AgentId, Liveness, Mode, Severity, Tier};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/agents", get(list_agents))
        .route("/agents/{id}", get(get_agent).delete(super::agents::remove))
        .route("/fleet", get(fleet))
        .route("/incidents", get(list_incidents))
}

pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 1000;

/// Query parameters, checked one by one so an error names the parameter.
pub struct Params {
    one: HashMap<String, String>,
    /// Every value of a parameter that may be given more than once.
    many: HashMap<String, Vec<String>>,
}

/// Parameters that may be given more than once (each narrows the list).
const REPEATABLE: &[&str] = &["label"];

impl Params {
    /// The query's parameters, of which the endpoint takes `known`. An
    /// unknown one, or one given twice, is refused naming it: ignored, a
    /// misspelt filter (`?stat=open`) would answer with everything, and of
    /// a repeated one only the last would count.
    pub fn new(raw: Vec<(String, String)>, known: &[&str]) -> Result<Self, ApiError> {
        let mut params = Self { one: HashMap::new(), many: HashMap::new() };
        for (name, value) in raw {
            if name.is_empty() {
                return Err(ApiError::invalid("query", "a query parameter without a name (`=value`)"));
            }
            if !known.contains(&name.as_str()) {
                let takes = if known.is_empty() { "none".to_string() } else { known.join(", ") };
                return Err(ApiError::invalid(&name, format!("unknown query parameter; this endpoint takes {takes}")));
            }
            let repeatable = REPEATABLE.contains(&name.as_str());
            if repeatable {
                params.many.entry(name.clone()).or_default().push(value.clone());
            }
            if params.one.insert(name.clone(), value).is_some() && !repeatable {
                return Err(ApiError::invalid(&name, "given more than once"));
            }
        }
        Ok(params)
    }

    pub fn text(&self, name: &str) -> Option<&str> {
        self.one.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }

    /// The non-empty values of a repeatable parameter, in order.
    pub fn all(&self, name: &str) -> impl Iterator<Item = &str> {
        self.many.get(name).into_iter().flatten().map(String::as_str).filter(|v| !v.is_empty())
    }

    pub fn parsed<T: std::str::FromStr<Err = String>>(&self, name: &str) -> Result<Option<T>, ApiError> {
        self.text(name)
            .map(|v| v.parse::<T>().map_err(|allowed| ApiError::invalid(name, format!("must be {allowed}"))))
            .transpose()
    }

    pub fn limit(&self) -> Result<i64, ApiError> {
        match self.text("limit") {
            None => Ok(DEFAULT_LIMIT),
            Some(v) => v
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| ApiError::invalid("limit", format!("must be a whole number from 1 to {MAX_LIMIT}"))),
        }
    }

    pub fn agent(&self, name: &str) -> Result<Option<AgentId>, ApiError> {
        self.text(name).map(|v| AgentId::parse(v).map_err(|m| ApiError::invalid(name, m))).transpose()
    }
}

/// One page of a list fetched with `limit + 1` rows: the first `limit`,
/// and the key of the last of them as `next_cursor` if more follow (none
/// on the last page, also when it is exactly full).
pub fn page<T>(mut rows: Vec<T>, limit: i64, key: impl Fn(&T) -> String) -> (Vec<T>, Option<String>) {
    let limit = usize::try_from(limit).unwrap_or(0);
    if rows.len() <= limit {
        return (rows, None);
    }
    rows.truncate(limit);
    let next = rows.last().map(key);
    (rows, next)
}

/// Label selectors `key:value` (or `key=value`), each given as `label`;
/// an agent must have them all.
fn label_filter(params: &Params) -> Result<Option<Value>, ApiError> {
    let mut object = Map::new();
    for raw in params.all("label") {
        // At whichever separator comes first: label keys hold neither,
        // values may hold both (`zone=eu:west`).
        let Some(at) = raw.find([':', '=']) else {
            return Err(ApiError::invalid("label", "must be key:value"));
        };
        let (key, value) = (&raw[..at], &raw[at + 1..]);
        if key.is_empty() {
            return Err(ApiError::invalid("label", "must be key:value with a non-empty key"));
        }
        // jsonb cannot hold U+0000, and no label holds it.
        if raw.contains('\0') {
            return Err(ApiError::invalid("label", "must not contain U+0000"));
        }
        if object.insert(key.to_string(), Value::String(value.to_string())).is_some() {
            return Err(ApiError::invalid("label", format!("label {key} is given twice")));
        }
    }
    Ok((!object.is_empty()).then_some(Value::Object(object)))
}

/// Columns every agent view carries, as one JSON object per row.
const AGENT_JSON: &str = "jsonb_build_object(\
    'agent_id', agent_id, 'name', name, 'labels', labels, 'mode', mode, 'status', status, \
    'liveness', liveness, 'liveness_since', liveness_since, 'score', score, 'tier', tier, \
    'score_trend', score_trend, 'last_seen', last_seen, 'first_seen', first_seen, \
    'expected_interval_ms', expected_interval_ms, 'heartbeat_count', heartbeat_count, \
    'restart_count', restart_count, 'uptime_seconds', uptime_seconds, 'evaluated_at', evaluated_at)";

async fn list_agents(
    State(state): State<AppState>,
    _auth: Authorized<ReadScope>,
    QueryPairs(raw): QueryPairs,
) -> Result<Json<Value>, ApiError> {
    let params = Params::new(raw, &["liveness", "tier", "label", "cursor", "limit"])?;
    let liveness: Option<Liveness> = params.parsed("liveness")?;
    // "unscored": agents not scored yet, as GET /v1/fleet counts them.
    let tier: Option<TierFilter> = params.parsed("tier")?;
    let label = label_filter(&params)?;
    let cursor = params.agent("cursor")?;
    let limit = params.limit()?;
    let client = db::client(&state.pool).await?;
    let sql = format!(
        "SELECT agent_id, {AGENT_JSON} FROM warden.agent_status \
         WHERE ($1::text IS NULL OR liveness = $1) \
           AND ($2::text IS NULL OR tier = $2 OR ($2 = 'unscored' AND tier IS NULL)) \
           AND ($3::jsonb IS NULL OR labels @> $3) AND ($4::text IS NULL OR agent_id > $4) \
         ORDER BY agent_id LIMIT $5"
    );
    let rows = client
        .query(
            &sql,
            &[
                &liveness.map(Liveness::as_str),
                &tier.map(TierFilter::as_str),
                &label,
                &cursor.as_ref().map(AgentId::as_str),
                &(limit + 1),
            ],
        )
        .await?;
    let (rows, next) = page(rows, limit, |r| r.get::<_, String>(0));
    let agents: Vec<Value> = rows.iter().map(|r| r.get(1)).collect();
    Ok(Json(json!({ "agents": agents, "next_cursor": next })))
}

async fn get_agent(
    State(state): State<AppState>,
    _auth: Authorized<ReadScope>,
    IdPath(id): IdPath,
) -> Result<Json<Value>, ApiError> {
    let id = AgentId::parse(id).map_err(|m| ApiError::invalid("id", m))?;
    let client = db::client(&state.pool).await?;
    agent_detail(&client, &id).await?.map(Json).ok_or_else(|| ApiError::not_found(format!("no agent {id}")))
}

/// One agent as `GET /v1/agents/{id}` shows it (state, breakdown,
/// recommendations, recent transitions, events and incidents), or `None`.
/// Shared with the web console.
pub async fn agent_detail(client: &tokio_postgres::Client, id: &AgentId) -> Result<Option<Value>, ApiError> {
    let sql = format!(
        "SELECT {AGENT_JSON} || jsonb_build_object('components', components, 'ontime_streak', ontime_streak, \
           'last_restart_at', last_restart_at, 'uptime_before_restart', uptime_before_restart, \
           'last_sent_at', last_sent_at, \
           'inter_arrival', jsonb_build_object('samples', ia_count, 'mean_ms', ia_mean_ms, \
                                               'stddev_ms', sqrt(greatest(ia_var_ms2, 0)))) \
         FROM warden.agent_status WHERE agent_id = $1"
    );
    let Some(row) = client.query_opt(&sql, &[&id.as_str()]).await? else {
        return Ok(None);
    };
    let mut agent: Value = row.get(0);
    let recommendations: Vec<Value> = agent["components"]
        .as_object()
        .map(|c| {
            c.iter()
                .filter_map(|(name, v)| {
                    v.get("recommendation").and_then(Value::as_str).map(|r| json!({"component": name, "advice": r}))
                })
                .collect()
        })
        .unwrap_or_default();
    let transitions = client
        .query(
            "SELECT jsonb_build_object('at', occurred_at, 'old', details->'old', 'new', details->'new', \
                    'reason', details->'reason', 'figures', details->'figures', 'message', message) \
             FROM warden.system_events WHERE agent_id = $1 AND event_type = 'status_changed' AND source = 'warden' \
             ORDER BY occurred_at DESC, id DESC LIMIT 20",
            &[&id.as_str()],
        )
        .await?;
    let events = client
        .query(
            "SELECT jsonb_build_object('id', id, 'at', occurred_at, 'event_type', event_type, 'severity', severity, \
                    'message', message, 'details', details, 'source', source) \
             FROM warden.system_events \
             WHERE agent_id = $1 AND NOT (event_type = 'status_changed' AND source = 'warden') \
             ORDER BY occurred_at DESC, id DESC LIMIT 20",
            &[&id.as_str()],
        )
        .await?;
    let incidents = client
        .query(
            &format!("SELECT {INCIDENT_JSON} FROM warden.incidents WHERE agent_id = $1 ORDER BY id DESC LIMIT 20"),
            &[&id.as_str()],
        )
        .await?;
    let object = agent.as_object_mut().expect("jsonb_build_object is an object");
    object.insert("recommendations".into(), Value::Array(recommendations));
    object.insert("recent_transitions".into(), rows_to_array(&transitions));
    object.insert("recent_events".into(), rows_to_array(&events));
    object.insert("recent_incidents".into(), rows_to_array(&incidents));
    Ok(Some(agent))
}

fn rows_to_array(rows: &[tokio_postgres::Row]) -> Value {
    Value::Array(rows.iter().map(|r| r.get::<_, Value>(0)).collect())
}

async fn fleet(State(state): State<AppState>, _auth: Authorized<ReadScope>) -> Result<Json<Value>, ApiError> {
    let client = db::client(&state.pool).await?;
    fleet_totals(&client).await.map(Json)
}

/// Fleet totals as `GET /v1/fleet` shows them. Shared with the web console.
pub async fn fleet_totals(client: &tokio_postgres::Client) -> Result<Value, ApiError> {
    // One scan: a row per liveness, per tier, per mode, and the grand total.
    let rows = client
        .query(
            "SELECT GROUPING(liveness), GROUPING(tier), GROUPING(mode), liveness, tier, mode, count(*), avg(score) \
             FROM warden.agent_status GROUP BY GROUPING SETS ((liveness), (tier), (mode), ())",
            &[],
        )
        .await?;
    // Every liveness, tier and mode appears, zero when no agent has it, so
    // dashboards and scripts need not guess at missing keys.
    let zeros = |keys: Vec<String>| -> Map<String, Value> { keys.into_iter().map(|k| (k, json!(0))).collect() };
    let mut liveness = zeros(Liveness::ALL.iter().map(ToString::to_string).collect());
    let mut tiers = zeros(Tier::ALL.iter().map(ToString::to_string).chain(["unscored".into()]).collect());
    let mut modes = zeros(Mode::ALL.iter().map(ToString::to_string).chain(["unset".into()]).collect());
    let (mut total, mut average) = (0_i64, None::<f64>);
    for r in &rows {
        let grouped = (r.get::<_, i32>(0), r.get::<_, i32>(1), r.get::<_, i32>(2));
        let n: i64 = r.get(6);
        match grouped {
            (0, 1, 1) => {
                liveness.insert(r.get::<_, String>(3), json!(n));
            }
            (1, 0, 1) => {
                let tier: Option<String> = r.get(4);
                tiers.insert(tier.unwrap_or_else(|| "unscored".into()), json!(n));
            }
            (1, 1, 0) => {
                let mode: Option<String> = r.get(5);
                modes.insert(mode.unwrap_or_else(|| "unset".into()), json!(n));
            }
            _ => {
                total = n;
                average = r.get(7);
            }
        }
    }
    let open: i64 = client.query_one("SELECT count(*) FROM warden.incidents WHERE state = 'open'", &[]).await?.get(0);
    Ok(json!({
        "total": total,
        "liveness": liveness,
        "tier": tiers,
        "mode": modes,
        "average_score": average.map(|a| (a * 100.0).round() / 100.0),
        "open_incidents": open,
    }))
}

pub const INCIDENT_JSON: &str = "jsonb_build_object('id', id, 'agent_id', agent_id, 'issue_type', issue_type, \
    'severity', severity, 'state', state, 'opened_at', opened_at, 'resolved_at', resolved_at, \
    'predicted', predicted, 'summary', summary, 'resolution', resolution, 'details', details)";

async fn list_incidents(
    State(state): State<AppState>,
    _auth: Authorized<ReadScope>,
    QueryPairs(raw): QueryPairs,
) -> Result<Json<Value>, ApiError> {
    let params = Params::new(raw, &["state", "agent", "issue_type", "severity", "since", "cursor", "limit"])?;
    let state_filter = match params.text("state") {
        None => None,
        Some(s @ ("open" | "resolved")) => Some(s.to_string()),
        Some(_) => return Err(ApiError::invalid("state", "must be open or resolved")),
    };
    let agent = params.agent("agent")?;
    let issue: Option<IssueType> = params.parsed("issue_type")?;
    let severity: Option<Severity> = params.parsed("severity")?;
    let since: Option<DateTime<Utc>> = params
        .text("since")
        .map(|v| {
            v.parse().map_err(|_| {
                ApiError::invalid("since", "must be an RFC 3339 timestamp (a + in its offset is sent as %2B)")
            })
        })
        .transpose()?;
    let cursor: Option<i64> = params
        .text("cursor")
        .map(|v| v.parse().map_err(|_| ApiError::invalid("cursor", "must be the next_cursor of a previous page")))
        .transpose()?;
    let limit = params.limit()?;
    let client = db::client(&state.pool).await?;
    let sql = format!(
        "SELECT id, {INCIDENT_JSON} FROM warden.incidents \
         WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR agent_id = $2) \
           AND ($3::text IS NULL OR issue_type = $3) AND ($4::text IS NULL OR severity = $4) \
           AND ($5::timestamptz IS NULL OR opened_at >= $5) AND ($6::bigint IS NULL OR id < $6) \
         ORDER BY id DESC LIMIT $7"
    );
    let rows = client
        .query(
            &sql,
            &[
                &state_filter,
                &agent.as_ref().map(AgentId::as_str),
                &issue.map(IssueType::as_str),
                &severity.map(Severity::as_str),
                &since,
                &cursor,
                &(limit + 1),
            ],
        )
        .await?;
    let (rows, next) = page(rows, limit, |r| r.get::<_, i64>(0).to_string());
    let incidents: Vec<Value> = rows.iter().map(|r| r.get(1)).collect();
    Ok(Json(json!({ "incidents": incidents, "next_cursor": next })))
}
