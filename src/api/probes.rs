//! Probes for orchestrators: `/healthz` (the process is alive) and
//! `/readyz` (it can do its job: database reachable, schema current).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::{ApiError, AppState};
use crate::db::{self, migrate};

pub fn router() -> Router<AppState> {
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).route("/metrics", get(metrics))
}

/// Prometheus text exposition: this process's counters plus fleet figures
/// read from the database (at most once a second, whatever the rate of
/// scrapes). If the database is down the process's own figures are still
/// served (they say what is going wrong), the fleet's are left out and
/// `warden_fleet_figures_up` is 0.
async fn metrics(State(state): State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let m = &crate::metrics::METRICS;
    m.queue_depth.set(state.ingestor.queued() as i64);
    let status = state.pool.status();
    m.pool.with_label_values(&["idle"]).set(status.available as i64);
    m.pool.with_label_values(&["in_use"]).set(status.size.saturating_sub(status.available) as i64);
    m.pool_max.set(status.max_size as i64);
    // A scrape waits for another's read no longer than a read may take.
    let wait = state.settings.database.connect_timeout.get();
    let fleet = state
        .fleet
        .get_or_read(std::time::Instant::now(), wait, || read_fleet(&state))
        .await
        .unwrap_or_else(|| crate::metrics::Fleet::new().render(false));
    let mut text = m.render();
    text.push_str(&fleet);
    ([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

/// The fleet figures rendered, or only `warden_fleet_figures_up 0` when
/// they cannot be read.
async fn read_fleet(state: &AppState) -> String {
    let fleet = crate::metrics::Fleet::new();
    // A database that hangs must not take the process's own figures with
    // it: they are what says what is going wrong.
    let limit = state.settings.database.connect_timeout.get();
    let read = match tokio::time::timeout(limit, fleet_figures(state, &fleet)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "fleet figures unavailable for /metrics");
            false
        }
        Err(_) => {
            tracing::debug!("fleet figures took longer than database.connect_timeout; left out of /metrics");
            false
        }
    };
    fleet.render(read)
}

async fn fleet_figures(state: &AppState, m: &crate::metrics::Fleet) -> Result<(), db::DbError> {
    use crate::health::incidents::IssueType;
    use crate::model::{Liveness, Tier};
    let mut client = db::client(&state.pool).await?;
    // The server gives up when the caller does, so the connection goes
    // back to the pool free rather than still waiting on a lock.
    let client = client.transaction().await?;
    let limit = format!("{}ms", state.settings.database.connect_timeout.as_millis_u64());
    client.execute("SELECT set_config('statement_timeout', $1, true)", &[&limit]).await?;
    let liveness = client.query("SELECT liveness, count(*) FROM warden.agent_status GROUP BY liveness", &[]).await?;
    for l in Liveness::ALL {
        let n = liveness.iter().find(|r| r.get::<_, String>(0) == l.as_str()).map(|r| r.get::<_, i64>(1)).unwrap_or(0);
        m.agents.with_label_values(&[l.as_str()]).set(n);
    }
    // Agents not scored yet are `unscored`, as in /v1/fleet: the tiers
    // add up to the fleet.
    let tiers =
        client.query("SELECT coalesce(tier, 'unscored'), count(*) FROM warden.agent_status GROUP BY 1", &[]).await?;
    for t in Tier::ALL.iter().map(|t| t.as_str()).chain(["unscored"]) {
        let n = tiers.iter().find(|r| r.get::<_, String>(0) == t).map(|r| r.get::<_, i64>(1)).unwrap_or(0);
        m.agents_by_tier.with_label_values(&[t]).set(n);
    }
    let open = client
        .query("SELECT issue_type, count(*) FROM warden.incidents WHERE state = 'open' GROUP BY issue_type", &[])
        .await?;
    for i in IssueType::ALL {
        let n = open.iter().find(|r| r.get::<_, String>(0) == i.as_str()).map(|r| r.get::<_, i64>(1)).unwrap_or(0);
        m.incidents_open.with_label_values(&[i.as_str()]).set(n);
    }
    // A retention step that keeps failing leaves its watermark behind,
    // and partitions are dropped only up to the watermarks: disk grows.
    let retention = client
        .query_one(
            "SELECT date_part('epoch', now() - minute_watermark), date_part('epoch', now() - hour_watermark), \
                    date_part('epoch', now() - score_watermark), \
                    date_part('epoch', now() - (liveness_day_watermark::timestamp AT TIME ZONE 'UTC')), \
                    date_part('epoch', now() - last_run_at) \
             FROM warden.retention_state",
            &[],
        )
        .await?;
    for (i, watermark) in ["minute", "hour", "score", "liveness_day"].into_iter().enumerate() {
        if let Some(age) = retention.get::<_, Option<f64>>(i) {
            m.retention_behind.with_label_values(&[watermark]).set(age);
        }
    }
    if let Some(age) = retention.get::<_, Option<f64>>(4) {
        m.retention_last_run.with_label_values(&[] as &[&str]).set(age);
    }
    Ok(())
}

/// Liveness: answers as long as the process serves HTTP. It never touches
/// the database, so an outage does not get healthy replicas restarted.
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// What one readiness check of the database found.
#[derive(Clone)]
pub enum Readiness {
    /// Schema version, and seconds since the last liveness cycle.
    Reached(i32, Option<f64>),
    Unavailable(&'static str),
    Failed,
}

/// Readiness: 200 only when the database answers and its schema is at least
/// the version this binary needs; 503 with Retry-After otherwise.
async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    // Unauthenticated: one check of the database serves every probe of
    // the same second, however many there are.
    let limit = state.settings.database.connect_timeout.get();
    let check = || async {
        let probe = async {
            let client = db::client(&state.pool).await?;
            let version = migrate::current_version(&client).await?;
            // Seconds since any replica last finished a liveness cycle.
            let stalled: Option<f64> = match version {
                Some(v) if v >= 3 => client
                    .query_one(
                        "SELECT extract(epoch FROM now() - last_cycle_at)::float8 FROM warden.evaluator_state",
                        &[],
                    )
                    .await?
                    .get(0),
                _ => None,
            };
            Ok::<_, db::DbError>((version, stalled))
        };
        match tokio::time::timeout(limit, probe).await {
            Ok(Ok((version, since))) => Readiness::Reached(version.unwrap_or(0), since),
            Ok(Err(db::DbError::LoginRefused(_))) => Readiness::Unavailable("the database refuses warden's login"),
            Ok(Err(db::DbError::Untrusted(_))) => {
                Readiness::Unavailable("warden does not trust the database's TLS certificate")
            }
            Ok(Err(e)) if e.is_unavailable() => Readiness::Unavailable("the database is unreachable"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readiness check failed");
                Readiness::Failed
            }
            Err(_) => Readiness::Unavailable("the database did not answer in time"),
        }
    };
    let found = state.ready.get_or_read(std::time::Instant::now(), limit, check).await;
    let (version, since_cycle) = match found {
        Some(Readiness::Reached(version, since)) => (version, since),
        Some(Readiness::Unavailable(why)) => return Err(ApiError::unavailable(why)),
        // Not ready either way: 503 with Retry-After, as the probe promises,
        // whatever the cause (the log has it).
        Some(Readiness::Failed) => return Err(ApiError::unavailable("the readiness check failed; see warden's log")),
        None => return Err(ApiError::unavailable("the database did not answer in time")),
    };
    let needed = migrate::latest_version();
    // Evaluation is warden's core job: three missed cycles make every
    // replica unready, which an orchestrator and the dashboards notice.
    let stall = state.settings.health.check_interval.get().as_secs_f64() * 3.0;
    if let Some(since) = since_cycle.filter(|s| *s > stall) {
        return Err(ApiError::unavailable(format!(
            "evaluation has stalled: the last liveness cycle finished {since:.0}s ago (more than three check intervals)"
        )));
    }
    if version < needed {
        return Err(ApiError::unavailable(format!(
            "the database schema is at version {version} but this warden needs {needed}; run `warden migrate`"
        )));
    }
    Ok(Json(json!({ "status": "ready", "schema_version": version, "seconds_since_evaluation": since_cycle })))
}
