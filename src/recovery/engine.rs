//! The recovery engine: every replica runs one, and they share the work
//! through `warden.recovery_jobs`.
//!
//! Each tick (every `recovery.poll_interval`):
//! 1. open a job for each new incident a strategy matches (unique per
//!    incident, so two replicas cannot both open one);
//! 2. cancel jobs whose incident resolved before their next attempt;
//! 3. take over jobs whose lease expired mid-action (the replica running
//!    it died): that attempt is marked abandoned and the job verifies
//!    whether it worked anyway;
//! 4. settle verifying jobs: succeeded once the agent was heard from after
//!    the action and is online, else, past the verification time, failed;
//! 5. claim due jobs with `FOR UPDATE SKIP LOCKED`, up to `max_concurrent`
//!    active fleet-wide and, while a fleet outage is open, only those of
//!    agents that failed on their own meanwhile (manual runs past a full
//!    cap up to `max_concurrent_manual`), and run them.
//!
//! Each state change is its own short transaction that re-checks the job is
//! still where it was, so replicas never step on each other, and an action
//! is never run twice at once: a job's lease outlasts its action's timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::Pool;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::exec::{self, Ended, Outcome};
use super::plan::{self, Context, Position};
use crate::config::{Action, RecoverySettings, Strategy};
use crate::db::{self, DbError};
use crate::health::incidents::IssueType;
use crate::telemetry::Throttle;

/// SQL: automatic attempts that count against `max_attempts` for job `j`,
/// with $2 the time now and $3 `attempt_window` in seconds: the agent's
/// within the window since its last reset, made by automatic jobs (manual
/// runs are outside the limit), or the job's own since that reset,
/// whichever are more. The job's own count makes one incident give up
/// however long its attempts take: with verification longer than a third
/// of the window (a restart loop's is about 12 minutes against the
/// default 30), three attempts never fall within one window, and the
/// agent was restarted for as long as the incident stayed open.
macro_rules! attempts_in_window {
    () => {
        "greatest( \
           (SELECT count(*) FROM warden.recovery_actions a WHERE a.agent_id = j.agent_id \
              AND a.started_at > greatest($2::timestamptz - $3::float8 * interval '1 second', \
                                          coalesce(j.window_start, '-infinity')) \
              AND NOT EXISTS (SELECT 1 FROM warden.recovery_jobs m WHERE m.id = a.job_id AND m.manual)), \
           (SELECT count(*) FROM warden.recovery_actions a WHERE a.job_id = j.id AND NOT j.manual \
              AND a.started_at > coalesce(j.window_start, '-infinity')))"
    };
}

/// Attempts a give-up message lists by name; the rest are counted.
const SUMMARY_ATTEMPTS: usize = 10;

/// What one tick did, for tests and logs.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TickReport {
    pub opened: usize,
    pub cancelled: usize,
    pub taken_over: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub started: usize,
    pub exhausted: usize,
    pub paused_by_fleet_outage: bool,
}

pub struct Engine {
    pool: Pool,
    settings: Arc<RecoverySettings>,
    verify_rules: plan::VerifyRules,
    replica: String,
    http: reqwest::Client,
    /// Actions running on this replica.
    running: TaskTracker,
    /// Fired when warden stops and running actions may not finish.
    interrupt: CancellationToken,
}

impl Engine {
    pub fn new(
        pool: Pool,
        settings: RecoverySettings,
        health: &crate::config::HealthSettings,
        replica: String,
    ) -> Arc<Self> {
        crate::alerting::tls::install_crypto_provider();
        // Redirects are not followed: reqwest would carry the action's own
        // headers (an API key from {env.WARDEN_SECRET_*}) to whatever host a
        // Location names. A 3xx is an answer like any other, judged by
        // expect_status.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("the HTTP client of recovery actions builds");
        Arc::new(Self {
            pool,
            settings: Arc::new(settings),
            verify_rules: plan::VerifyRules {
                recover_after_healthy: health.recover_after_healthy,
                check_interval: health.check_interval.get(),
                score_interval: health.score_interval.get(),
                restart_loop_window: health.restart_loop_window.get(),
            },
            replica,
            http,
            running: TaskTracker::new(),
            interrupt: CancellationToken::new(),
        })
    }

    /// Ticks until `stop`, then lets running actions finish for up to
    /// `drain`; those still running are ended and recorded at once as
    /// interrupted, their jobs verifying whether they took effect (as a
    /// takeover would, without waiting for the lease to run out). Left
    /// running, they would die with the process, hold their job until the
    /// lease ran out, and show as running meanwhile.
    pub async fn run(self: Arc<Self>, stop: CancellationToken, drain: StdDuration) {
        let mut every = crate::every::Every::new(self.settings.poll_interval.get(), &stop);
        while every.tick().await {
            match self.tick(None).await {
                // A fleet outage makes every tick look busy; say only what moved.
                Ok(report)
                    if report
                        != (TickReport {
                            paused_by_fleet_outage: report.paused_by_fleet_outage,
                            ..TickReport::default()
                        }) =>
                {
                    tracing::debug!(?report, "recovery tick");
                }
                Ok(_) => {}
                Err(e) => {
                    // Every tick meets the same while the database is gone.
                    static LOG: Throttle = Throttle::new(std::time::Duration::from_secs(30));
                    if let Some(more) = LOG.allow() {
                        tracing::warn!(error = %e, more, "recovery tick failed; will retry");
                    }
                }
            }
        }
        self.running.close();
        if tokio::time::timeout(drain, self.running.wait()).await.is_err() {
            tracing::warn!(running = self.running.len(), "stopping: ending the recovery actions still running");
            self.interrupt.cancel();
            self.running.wait().await;
        }
    }

    /// Waits for the actions this replica started to finish (tests).
    pub async fn settle(&self) {
        self.running.close();
        self.running.wait().await;
        self.running.reopen();
    }

    /// One pass over the work; `now` from the database when `None`.
    pub async fn tick(self: &Arc<Self>, now: Option<DateTime<Utc>>) -> Result<TickReport, DbError> {
        let mut client = db::client(&self.pool).await?;
        // Before the database's clock is read: leases dated from it on this
        // replica's clock then end here first.
        let read_at = tokio::time::Instant::now();
        let now = match now {
            Some(n) => n,
            None => client.query_one("SELECT now()", &[]).await?.get(0),
        };
        let mut report = TickReport {
            opened: self.open_jobs(&client, now).await?,
            cancelled: cancel_resolved(&client, now).await? as usize,
            ..TickReport::default()
        };
        report.taken_over = self.take_over_expired(&mut client, now).await?;
        let (succeeded, failed, exhausted) = self.settle_verifying(&mut client, now).await?;
        report.succeeded = succeeded;
        report.failed = failed;
        report.exhausted += exhausted;
        let claimed = self.claim_and_start(&mut client, (now, read_at)).await?;
        report.paused_by_fleet_outage = claimed.outage.is_some();
        report.started = claimed.started;
        report.exhausted += claimed.exhausted;
        Ok(report)
    }

    fn strategy(&self, name: &str) -> Option<&Strategy> {
        self.settings.strategies.iter().find(|s| s.name == name)
    }

    /// Opens a job for each new incident that a strategy matches, unless the
    /// agent's automatic recovery is blocked (an exhausted job whose
    /// incident is still open).
    async fn open_jobs(&self, client: &tokio_postgres::Client, now: DateTime<Utc>) -> Result<usize, DbError> {
        if self.settings.strategies.is_empty() {
            return Ok(0);
        }
        let rows = client
            .query(
                "SELECT i.id, i.agent_id, i.issue_type, s.labels FROM warden.incidents i \
                 JOIN warden.agent_status s ON s.agent_id = i.agent_id \
                 WHERE i.state = 'open' AND NOT i.predicted \
                   AND NOT EXISTS (SELECT 1 FROM warden.recovery_jobs j WHERE j.incident_id = i.id) \
                   AND NOT EXISTS (SELECT 1 FROM warden.recovery_jobs j JOIN warden.incidents x ON x.id = j.incident_id \
                                   WHERE j.agent_id = i.agent_id AND j.state = 'exhausted' AND x.state = 'open')",
                &[],
            )
            .await?;
        let mut opened = 0;
        for row in rows {
            let Ok(issue) = row.get::<_, String>(2).parse::<IssueType>() else { continue };
            let labels: BTreeMap<String, String> = serde_json::from_value(row.get::<_, Value>(3)).unwrap_or_default();
            let Some(strategy) = plan::select(&self.settings.strategies, issue, &labels) else { continue };
            let id: i64 = row.get(0);
            let agent: String = row.get(1);
            opened += client
                .execute(
                    // Attempts before the agent's last reset stay forgiven,
                    // and a backoff the agent is waiting out holds for the
                    // new incident too.
                    "INSERT INTO warden.recovery_jobs \
                       (incident_id, agent_id, strategy, next_run_at, created_at, updated_at, window_start) \
                     VALUES ($1, $2, $3, \
                             greatest($4, (SELECT max(next_run_at) FROM warden.recovery_jobs \
                                           WHERE agent_id = $2 AND state = 'pending' AND NOT manual)), \
                             $4, $4, (SELECT max(window_start) FROM warden.recovery_jobs WHERE agent_id = $2)) \
                     ON CONFLICT (incident_id) DO NOTHING",
                    &[&id, &agent, &strategy.name, &now],
                )
                .await? as usize;
        }
        Ok(opened)
    }

    /// Jobs whose lease ran out while an action was running: the replica
    /// died. The attempt is abandoned (its effect unknown) and the job waits
    /// to see whether it worked anyway.
    async fn take_over_expired(&self, client: &mut db::Client, now: DateTime<Utc>) -> Result<usize, DbError> {
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "SELECT j.id, j.current_action_id, j.lease_owner, s.expected_interval_ms, j.strategy, i.issue_type \
                 FROM warden.recovery_jobs j JOIN warden.agent_status s ON s.agent_id = j.agent_id \
                 LEFT JOIN warden.incidents i ON i.id = j.incident_id \
                 WHERE j.state = 'running' AND j.lease_until < $1 FOR UPDATE OF j SKIP LOCKED",
                &[&now],
            )
            .await?;
        for row in &rows {
            let job: i64 = row.get(0);
            let action: Option<i64> = row.get(1);
            let owner: Option<String> = row.get(2);
            let issue = row.get::<_, Option<String>>(5).and_then(|t| t.parse().ok());
            let verify = self.verify_for(row.get(4), issue, row.get::<_, i32>(3));
            tx.execute(
                "UPDATE warden.recovery_actions SET state = 'abandoned', finished_at = $2, \
                   outcome = $3 WHERE id = $1 AND state = 'running'",
                &[
                    &action,
                    &now,
                    &format!(
                        "replica {} stopped before the action finished; its effect is unknown",
                        owner.unwrap_or_default()
                    ),
                ],
            )
            .await?;
            tx.execute(
                "UPDATE warden.recovery_jobs SET state = 'verifying', verify_until = $2, lease_owner = NULL, \
                   lease_until = NULL, updated_at = $3 WHERE id = $1",
                &[&job, &(now + verify), &now],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(rows.len())
    }

    /// Verification time of an action of `strategy` on an incident of
    /// `issue` (None: a manual run).
    fn verify_for(&self, strategy: &str, issue: Option<IssueType>, expected_interval_ms: i32) -> Duration {
        let d = plan::verify_timeout(
            self.strategy(strategy).and_then(|s| s.verify_timeout).map(|d| d.get()),
            self.settings.verify_timeout.map(|d| d.get()),
            &self.verify_rules,
            i64::from(expected_interval_ms),
            issue,
        );
        Duration::from_std(d).unwrap_or(Duration::seconds(90))
    }

    /// Verifying jobs: the agent is back (heard from after the action
    /// started, online) → succeeded; verification time over → failed.
    async fn settle_verifying(
        &self,
        client: &mut db::Client,
        now: DateTime<Utc>,
    ) -> Result<(usize, usize, usize), DbError> {
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "SELECT j.id, j.current_action_id, j.verify_until, a.started_at, s.last_seen, s.liveness, \
                        j.incident_id, a.attempt, j.strategy, a.action, j.agent_id, i.issue_type, i.resolved_at, \
                        a.finished_at, j.manual, s.expected_interval_ms, \
                        (SELECT o.id FROM warden.incidents o WHERE o.issue_type = 'fleet_outage' \
                           AND o.state = 'open' \
                           AND (i.details -> 'outside_fleet_outage') IS DISTINCT FROM to_jsonb(o.id) \
                         ORDER BY o.id LIMIT 1), \
                        (SELECT max(o.resolved_at) FROM warden.incidents o WHERE o.issue_type = 'fleet_outage' \
                           AND o.state = 'resolved' AND o.resolved_at > coalesce(a.finished_at, a.started_at) \
                           AND (i.details -> 'outside_fleet_outage') IS DISTINCT FROM to_jsonb(o.id)) \
                 FROM warden.recovery_jobs j \
                 JOIN warden.recovery_actions a ON a.id = j.current_action_id \
                 JOIN warden.agent_status s ON s.agent_id = j.agent_id \
                 LEFT JOIN warden.incidents i ON i.id = j.incident_id \
                 WHERE j.state = 'verifying' FOR UPDATE OF j SKIP LOCKED",
                &[],
            )
            .await?;
        let (mut succeeded, mut failed, mut exhausted) = (0, 0, 0);
        for row in &rows {
            let job: i64 = row.get(0);
            let action: i64 = row.get(1);
            let verify_until: Option<DateTime<Utc>> = row.get(2);
            let started: Option<DateTime<Utc>> = row.get(3);
            let last_seen: DateTime<Utc> = row.get(4);
            let liveness: String = row.get(5);
            let incident: Option<i64> = row.get(6);
            let attempts: i32 = row.get(7);
            let strategy: String = row.get(8);
            let action_name: String = row.get(9);
            let agent: String = row.get(10);
            let issue: Option<IssueType> = row.get::<_, Option<String>>(11).and_then(|t| t.parse().ok());
            let resolved_at: Option<DateTime<Utc>> = row.get(12);
            // Heard from after the action ended, not merely after it began:
            // a heartbeat sent while a restart was under way can come from
            // the process being replaced. (One whose replica died ended
            // when another took it over.)
            let ended: Option<DateTime<Utc>> = row.get::<_, Option<DateTime<Utc>>>(13).or(started);
            // The agent must be heard from after the action and online. For
            // silence that is the fix; any other issue (a restart loop,
            // errors, resources) is fixed only when the evaluator also finds
            // its condition cleared and resolves the incident, since an
            // agent can be online throughout.
            let silence = issue.is_none_or(IssueType::is_silence);
            let heard = ended.is_some_and(|e| last_seen > e);
            let back = (liveness == "online" && heard).then_some(last_seen);
            // Any issue's verification fails once the agent has had its time
            // to be back and has not been heard from since the action ended:
            // an agent that crashed on its way up would otherwise wait out
            // the issue's clearing time (an hour for error rates) before the
            // next attempt, and hold back a recovery of its going quiet
            // meanwhile. One that was heard from keeps the whole time, even
            // if a late beat makes it degraded for a moment.
            let unheard_by = ended.filter(|_| !heard).map(|e| e + self.verify_for(&strategy, None, row.get(15)));
            // The time to be back was fixed from the interval the agent had
            // when the job was claimed; a restarted process may announce a
            // longer one (an agent in emergency mode, 5 s, comes back at
            // 30 s) and could never be online within it: the longer of the
            // two counts.
            let verify_until =
                verify_until.map(|v| ended.map_or(v, |e| v.max(e + self.verify_for(&strategy, issue, row.get(15)))));
            // A fleet outage (the network, the database's host) keeps the
            // agent from being heard whatever the action did: its
            // verification waits for the outage to end, then has its whole
            // time again, rather than failing and using up an attempt of
            // the agent's for what was nobody's fault. (Not for an agent
            // that failed on its own during the outage.)
            let outage_open = row.get::<_, Option<i64>>(16).is_some();
            let outage_ended: Option<DateTime<Utc>> = row.get(17);
            let after_outage = |issue| outage_ended.map(|r| r + self.verify_for(&strategy, issue, row.get(15)));
            let verify_until = verify_until.map(|v| after_outage(issue).map_or(v, |a| v.max(a)));
            // The time to be heard again, not the issue's clearing time.
            let unheard_by = unheard_by.map(|u| after_outage(None).map_or(u, |a| u.max(a)));
            let fixed_at =
                if silence { back } else { back.and(resolved_at.filter(|r| started.is_some_and(|s| *r >= s))) };
            if let Some(fixed_at) = fixed_at {
                let took = started.map(|s| (fixed_at - s).num_milliseconds() as f64 / 1000.0).unwrap_or(0.0);
                // An operator's run is no automatic recovery, and has
                // no attempt number of the incident's to quote.
                let credit = if row.get::<_, bool>(14) {
                    format!("recovered by a manual run of {strategy}/{action_name}")
                } else {
                    format!("auto-recovered by {strategy}/{action_name} on attempt {attempts}")
                };
                tx.execute(
                    "UPDATE warden.recovery_actions SET state = 'succeeded', \
                       outcome = coalesce(outcome || '; ', '') || $2 WHERE id = $1",
                    &[
                        &action,
                        &if silence {
                            format!("verified: the agent was back {took:.1}s after the action started")
                        } else {
                            format!("verified: the condition cleared {took:.1}s after the action started")
                        },
                    ],
                )
                .await?;
                finish(&tx, job, "succeeded", &credit, now).await?;
                // Resolve the incident with the credit, or credit an
                // evaluator resolution that beat us to it.
                tx.execute(
                    "WITH r AS ( \
                       UPDATE warden.incidents SET state = 'resolved', resolved_at = greatest($2, opened_at), resolution = $3 \
                       WHERE id = $1 AND state = 'open' RETURNING id, agent_id, issue_type, opened_at) \
                     INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details) \
                     SELECT $2, agent_id, 'incident_resolved', 'info', issue_type || ' resolved: ' || $3, \
                            jsonb_build_object('incident_id', id, 'issue_type', issue_type, \
                                               'duration_seconds', extract(epoch FROM $2 - opened_at)) FROM r",
                    &[&incident, &now, &credit],
                )
                .await?;
                tx.execute(
                    "UPDATE warden.incidents SET resolution = $2 WHERE id = $1 AND resolution = 'condition cleared'",
                    &[&incident, &credit],
                )
                .await?;
                tx.execute(
                    "UPDATE warden.alerts SET state = 'resolved', resolved_at = greatest($2, opened_at) \
                     WHERE incident_id = $1 AND state <> 'resolved'",
                    &[&incident, &now],
                )
                .await?;
                event(
                    &tx,
                    now,
                    &agent,
                    "recovery_succeeded",
                    "info",
                    &credit,
                    json!({"incident_id": incident, "job_id": job, "attempt": attempts}),
                )
                .await?;
                crate::metrics::METRICS.recovery_attempts.with_label_values(&["succeeded"]).inc();
                succeeded += 1;
            } else if let Some(deadline) =
                verify_until.map(|v| unheard_by.map_or(v, |u| u.min(v))).filter(|d| now >= *d && !outage_open)
            {
                // Counted from the action's end, as verification is.
                let waited = ended.map(|e| (deadline - e).num_seconds().max(0)).unwrap_or(0);
                tx.execute(
                    "UPDATE warden.recovery_actions \
                     SET state = CASE WHEN state = 'timed_out' THEN state ELSE 'failed' END, \
                       outcome = coalesce(outcome || '; ', '') || $2 WHERE id = $1",
                    &[
                        &action,
                        &if silence || !heard {
                            format!("the agent did not come back within {waited}s of the action's end")
                        } else {
                            format!(
                                "the agent was not back with the condition cleared within {waited}s of the action's end"
                            )
                        },
                    ],
                )
                .await?;
                crate::metrics::METRICS.recovery_attempts.with_label_values(&["failed"]).inc();
                if self.after_failed_attempt(&tx, job, now).await? {
                    exhausted += 1;
                }
                failed += 1;
            }
        }
        tx.commit().await?;
        Ok((succeeded, failed, exhausted))
    }

    /// After a failed attempt: schedule the next with backoff, or give up.
    /// Returns whether the job is exhausted.
    async fn after_failed_attempt(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        job: i64,
        now: DateTime<Utc>,
    ) -> Result<bool, DbError> {
        let row = tx
            .query_one(
                concat!(
                    "SELECT j.attempts, j.agent_id, j.manual, ",
                    attempts_in_window!(),
                    ", i.resolution FROM warden.recovery_jobs j \
                     LEFT JOIN warden.incidents i ON i.id = j.incident_id AND i.state = 'resolved' \
                     WHERE j.id = $1"
                ),
                &[&job, &now, &self.settings.attempt_window.get().as_secs_f64()],
            )
            .await?;
        let attempts: i32 = row.get(0);
        let agent: String = row.get(1);
        let manual: bool = row.get(2);
        let in_window: i64 = row.get(3);
        let wait =
            plan::backoff(attempts.max(1) as u32, self.settings.backoff_base.get(), self.settings.backoff_cap.get());
        let next = now + Duration::from_std(wait).unwrap_or(Duration::seconds(10));
        // The incident resolved while the attempt ran or was verified (the
        // condition cleared by itself, or the agent was removed): nothing
        // is left to recover, and nobody to page about giving up. The
        // agent's other jobs still wait out the backoff.
        if let Some(resolution) = row.get::<_, Option<String>>(4).filter(|_| !manual) {
            finish(tx, job, "cancelled", &format!("incident resolved meanwhile ({resolution})"), now).await?;
            hold_back_others(tx, &agent, job, next, now).await?;
            return Ok(false);
        }
        if manual || in_window >= i64::from(self.settings.max_attempts) {
            self.give_up(tx, job, now, manual).await?;
            return Ok(true);
        }
        // A hair after the others it holds back: claims take the earliest
        // due first, so that two incidents' strategies take turns rather
        // than the older one running to its end and using up the budget.
        tx.execute(
            "UPDATE warden.recovery_jobs SET state = 'pending', next_run_at = $2, lease_owner = NULL, lease_until = NULL, \
               verify_until = NULL, updated_at = $3 WHERE id = $1",
            &[&job, &(next + Duration::milliseconds(1)), &now],
        )
        .await?;
        hold_back_others(tx, &agent, job, next, now).await?;
        Ok(false)
    }

    /// No more automatic attempts: records what was tried and escalates
    /// with a critical recovery_failed event (alerting pages on it). A
    /// manual run that failed simply ends.
    async fn give_up(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        job: i64,
        now: DateTime<Utc>,
        manual: bool,
    ) -> Result<(), DbError> {
        // The attempts counted against the budget (attempts_in_window!):
        // this job's, and within the window those of the agent's other
        // automatic jobs, which may have used it all up before this one
        // ran anything.
        let tried: Vec<Value> = tx
            .query(
                "SELECT jsonb_build_object('strategy', a.strategy, 'action', a.action, 'attempt', a.attempt, \
                   'state', a.state, 'outcome', a.outcome, 'started_at', a.started_at, 'finished_at', a.finished_at, \
                   'incident_id', a.incident_id, 'job_id', a.job_id) \
                 FROM warden.recovery_jobs j JOIN warden.recovery_actions a ON a.agent_id = j.agent_id \
                 WHERE j.id = $1 AND ( \
                   (a.job_id = j.id AND a.started_at > coalesce(j.window_start, '-infinity')) \
                   OR (NOT j.manual \
                       AND a.started_at > greatest($2::timestamptz - $3::float8 * interval '1 second', \
                                                   coalesce(j.window_start, '-infinity')) \
                       AND NOT EXISTS (SELECT 1 FROM warden.recovery_jobs m WHERE m.id = a.job_id AND m.manual))) \
                 ORDER BY a.id",
                &[&job, &now, &self.settings.attempt_window.get().as_secs_f64()],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let info = tx
            .query_one("SELECT agent_id, incident_id, strategy FROM warden.recovery_jobs WHERE id = $1", &[&job])
            .await?;
        let agent: String = info.get(0);
        let incident: Option<i64> = info.get(1);
        let strategy: String = info.get(2);
        let summary = if manual {
            format!("manual recovery of {agent} with {strategy} failed")
        } else {
            // The event's message is bounded (4096 characters); the
            // details keep every attempt.
            let mut listed: Vec<String> = tried
                .iter()
                .take(SUMMARY_ATTEMPTS)
                .map(|t| {
                    let other = t["job_id"].as_i64() != Some(job);
                    let whose = match t["incident_id"].as_i64() {
                        Some(i) if other => format!(" (incident {i})"),
                        _ if other => " (another recovery)".to_string(),
                        _ => String::new(),
                    };
                    format!(
                        "{} attempt {} {}{whose}",
                        t["action"].as_str().unwrap_or("?"),
                        t["attempt"],
                        t["state"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            if tried.len() > SUMMARY_ATTEMPTS {
                listed.push(format!("and {} more", tried.len() - SUMMARY_ATTEMPTS));
            }
            // The rows listed, not the budget's count (the larger of the
            // agent's attempts in the window and this job's): the sentence
            // must add up.
            let attempts = crate::console::format::counted(tried.len() as i64, "attempt", "attempts");
            let own = tried.iter().filter(|t| t["job_id"].as_i64() == Some(job)).count();
            if own == 0 {
                // Stopped by the budget alone: say so, or it reads as if
                // nothing had ever been tried.
                let window = crate::console::format::span(self.settings.attempt_window.get().as_secs() as i64);
                format!(
                    "recovery of {agent} gave up without a new attempt: {attempts} in the last {window} already \
                     (recovery.max_attempts = {}): {}",
                    self.settings.max_attempts,
                    listed.join(", ")
                )
            } else {
                format!("recovery of {agent} gave up after {attempts}: {}", listed.join(", "))
            }
        };
        finish(tx, job, "exhausted", &summary, now).await?;
        if !manual {
            event(
                tx,
                now,
                &agent,
                "recovery_failed",
                "critical",
                &summary,
                json!({"incident_id": incident, "job_id": job, "strategy": strategy, "attempts": tried}),
            )
            .await?;
        }
        Ok(())
    }

    /// Claims due jobs and starts their next action.
    async fn claim_and_start(
        self: &Arc<Self>,
        client: &mut db::Client,
        (now, read_at): (DateTime<Utc>, tokio::time::Instant),
    ) -> Result<Claimed, DbError> {
        let tx = client.transaction().await?;
        // Claims (and manual runs queued) take turns across replicas, so
        // the fleet-wide cap and "one recovery per agent at a time" are
        // checked against every other claim's outcome, not a snapshot
        // taken while another replica was claiming.
        super::take_claim_turn(&tx).await?;
        // Read in its turn, not before waiting for it: a fleet outage the
        // evaluator opened meanwhile would otherwise not stop this claim.
        let outage: Option<i64> = tx
            .query_one("SELECT min(id) FROM warden.incidents WHERE state = 'open' AND issue_type = 'fleet_outage'", &[])
            .await?
            .get(0);
        // The tick's clock moved on while the jobs before were settled and
        // this waited for its turn. Leases run from here, and this
        // replica's idea of a lease ends with the one it writes: dated from
        // the tick's start, the lease written ended before this replica's,
        // and another replica could take over a live action. (Which jobs
        // are due is still decided at the tick's `now`.)
        let at = tokio::time::Instant::now();
        let lease_from = now + Duration::from_std(at - read_at).unwrap_or_default();
        let active = tx
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE manual) FROM warden.recovery_jobs \
                 WHERE state IN ('running', 'verifying')",
                &[],
            )
            .await?;
        let (active, active_manual): (i64, i64) = (active.get(0), active.get(1));
        // An operator's run is not held back by the fleet-wide cap: a full
        // cap is what long verifications look like (ten high_error_rate
        // checks take up to an hour each), and the run was asked for now.
        // Manual runs past the cap are bounded on their own.
        let room = i64::from(self.settings.max_concurrent) - active;
        let (limit, automatic) = if room > 0 {
            (room, true)
        } else {
            (i64::from(self.settings.max_concurrent_manual) - active_manual, false)
        };
        if limit <= 0 {
            tx.commit().await?;
            return Ok(Claimed { outage, ..Claimed::default() });
        }
        // While the fleet is out only manual runs start, and the recoveries
        // of incidents the evaluator opened for agents that failed on their
        // own during this outage (details.outside_fleet_outage): one
        // emergency page instead of a restart storm.
        let rows = tx
            .query(
                concat!(
                    "SELECT j.id, j.agent_id, j.strategy, j.action_index, j.action_attempts, j.attempts, \
                       j.incident_id, j.manual, i.issue_type, s.name, s.labels, s.expected_interval_ms, ",
                    attempts_in_window!(),
                    " FROM warden.recovery_jobs j \
                     JOIN warden.agent_status s ON s.agent_id = j.agent_id \
                     LEFT JOIN warden.incidents i ON i.id = j.incident_id \
                     WHERE j.state = 'pending' AND j.next_run_at <= $2 \
                       AND (j.manual OR ($5 AND ($4::bigint IS NULL \
                                                 OR i.details -> 'outside_fleet_outage' = to_jsonb($4::bigint)))) \
                       AND (j.incident_id IS NULL OR i.state = 'open') \
                       AND NOT EXISTS (SELECT 1 FROM warden.recovery_jobs b \
                                       WHERE b.agent_id = j.agent_id AND b.state IN ('running', 'verifying')) \
                       AND NOT EXISTS (SELECT 1 FROM warden.recovery_jobs o \
                                       WHERE o.agent_id = j.agent_id AND o.state = 'pending' \
                                         AND o.next_run_at <= $2 \
                                         AND (o.manual OR ($5 AND ($4::bigint IS NULL \
                                              OR (SELECT x.details -> 'outside_fleet_outage' FROM warden.incidents x \
                                                  WHERE x.id = o.incident_id) = to_jsonb($4::bigint)))) \
                                         AND (o.next_run_at, o.id) < (j.next_run_at, j.id)) \
                     ORDER BY j.next_run_at, j.id LIMIT $1 FOR UPDATE OF j SKIP LOCKED"
                ),
                &[&limit, &now, &self.settings.attempt_window.get().as_secs_f64(), &outage, &automatic],
            )
            .await?;
        let mut starts = Vec::new();
        let mut exhausted = 0;
        // One recovery per agent at a time: of several due jobs of one agent
        // (two incidents, or a manual run beside an automatic one) the
        // query takes only the oldest due; the others wait for it to end,
        // and do not use up the claim's room meanwhile.
        for row in &rows {
            let job: i64 = row.get(0);
            let agent: String = row.get(1);
            let strategy_name: String = row.get(2);
            let manual: bool = row.get(7);
            let in_window: i64 = row.get(12);
            let Some(strategy) = self.strategy(&strategy_name).cloned() else {
                finish(&tx, job, "cancelled", &format!("strategy {strategy_name} is no longer configured"), now)
                    .await?;
                continue;
            };
            let pos = plan::next_position(
                &strategy,
                Position { action_index: row.get::<_, i32>(3) as usize, action_attempts: row.get::<_, i32>(4) as u32 },
            );
            let action = strategy.actions[pos.action_index].clone();
            // job.attempts counts toward backoff and starts again after a
            // reset; the number an attempt is known by (in pages, in the
            // resolution) goes on across resets, so that "attempt 1" is
            // never said twice of one incident.
            let attempt = row.get::<_, i32>(5) + 1;
            let number: i32 = tx
                .query_one("SELECT (count(*) + 1)::integer FROM warden.recovery_actions WHERE job_id = $1", &[&job])
                .await?
                .get(0);
            let alert_only = attempt == 1 && matches!(action, Action::None { .. });
            if !manual && !alert_only && in_window >= i64::from(self.settings.max_attempts) {
                self.give_up(&tx, job, now, false).await?;
                exhausted += 1;
                continue;
            }
            if let Action::None { .. } = action {
                // Nothing to run and nothing to verify: not an attempt. As
                // the first action it means "alert only", which the
                // incident's own alert already does; after failed attempts
                // it means "stop here", which is giving up.
                if alert_only {
                    let outcome = format!("alert only: strategy {} takes no automatic action", strategy.name);
                    finish(&tx, job, "cancelled", &outcome, now).await?;
                } else {
                    self.give_up(&tx, job, now, manual).await?;
                    exhausted += 1;
                }
                continue;
            }
            let ctx = Context {
                agent_id: agent.clone(),
                agent_name: row.get(9),
                issue_type: row.get(8),
                incident_id: row.get(6),
                labels: serde_json::from_value(row.get::<_, Value>(10)).unwrap_or_default(),
            };
            let timeout = action.timeout().map(|t| t.get()).unwrap_or(StdDuration::from_secs(1));
            let margin = Duration::from_std(self.settings.lease_margin.get()).unwrap_or(Duration::seconds(30));
            let lease = lease_from + Duration::from_std(timeout).unwrap_or(Duration::seconds(30)) + margin;
            // Written before it starts: the attempt exists even if we die now.
            let action_id: i64 = tx
                .query_one(
                    "INSERT INTO warden.recovery_actions \
                       (incident_id, agent_id, strategy, action, attempt, state, created_at, started_at, job_id) \
                     VALUES ($1, $2, $3, $4, $5, 'running', $6, $6, $7) RETURNING id",
                    &[&ctx.incident_id, &agent, &strategy.name, &action.label(pos.action_index), &number, &now, &job],
                )
                .await?
                .get(0);
            tx.execute(
                "UPDATE warden.recovery_jobs SET state = 'running', action_index = $2, action_attempts = $3 + 1, \
                   attempts = $4, current_action_id = $5, lease_owner = $6, lease_until = $7, updated_at = $8 \
                 WHERE id = $1",
                &[
                    &job,
                    &(pos.action_index as i32),
                    &(pos.action_attempts as i32),
                    &attempt,
                    &action_id,
                    &self.replica,
                    &lease,
                    &now,
                ],
            )
            .await?;
            let issue = ctx.issue_type.as_deref().and_then(|t| t.parse().ok());
            let verify = self.verify_for(&strategy.name, issue, row.get(11));
            let lease_ends = at + timeout + self.settings.lease_margin.get();
            starts.push(Start { job, action_id, action, ctx, verify, lease_ends });
        }
        tx.commit().await?;
        let started = starts.len();
        for start in starts {
            let engine = self.clone();
            self.running.spawn(engine.execute(start));
        }
        Ok(Claimed { started, exhausted, outage })
    }

    /// Runs the action, then records how it ended. A database blip at that
    /// moment must not lose the outcome: the lease would run out, the
    /// attempt be called abandoned ("replica stopped") although this
    /// replica is alive, and a definite failure would wait out the
    /// verification time instead of the backoff. So the record is tried
    /// again with backoff until the lease is about to end: no try is begun
    /// within the pool's acquire timeout of it, as it could still be
    /// waiting for a connection when another replica takes the job over.
    async fn execute(self: Arc<Self>, start: Start) {
        let outcome = tokio::select! {
            outcome = self.perform(&start.action, &start.ctx) => outcome,
            // Dropping the action ends it: a command's whole process
            // group is killed, a request abandoned.
            () = self.interrupt.cancelled() => Outcome {
                ended: Ended::Interrupted,
                summary: "interrupted: warden stopped while it ran and ended it; its effect is verified".into(),
                detail: json!({"interrupted": true}),
            },
        }
        .storable();
        let margin = self.pool.timeouts().wait.unwrap_or_default();
        let what = format!("the result of recovery action {} (job {})", start.action_id, start.job);
        // Giving up was logged; the lease will expire.
        let _ = db::retry_until(start.lease_ends, margin, &what, || self.record(&start, &outcome)).await;
    }

    /// Records how the action ended, unless the job is no longer ours.
    async fn record(&self, start: &Start, outcome: &Outcome) -> Result<(), DbError> {
        let mut client = db::client(&self.pool).await?;
        let tx = client.transaction().await?;
        let now: DateTime<Utc> = tx.query_one("SELECT now()", &[]).await?.get(0);
        // Only if the job is still ours: a replica that took over owns it now.
        let ours = tx
            .execute(
                "SELECT 1 FROM warden.recovery_jobs WHERE id = $1 AND state = 'running' AND current_action_id = $2 \
                   AND lease_owner = $3 FOR UPDATE",
                &[&start.job, &start.action_id, &self.replica],
            )
            .await?
            == 1;
        if !ours {
            tx.commit().await?;
            return Ok(());
        }
        let state = match outcome.ended {
            Ended::Done => "verifying",
            Ended::Failed => "failed",
            Ended::TimedOut => "timed_out",
            Ended::Interrupted => "abandoned",
        };
        tx.execute(
            "UPDATE warden.recovery_actions SET state = $2, finished_at = $3, outcome = $4, detail = $5 WHERE id = $1",
            &[&start.action_id, &state, &now, &outcome.summary, &outcome.detail],
        )
        .await?;
        // An interrupted action may have done its part already (a
        // request sent, a restart half through): like one whose replica
        // died, it is an attempt whose effect is verified, never simply run
        // again, so that stopping replicas one after another cannot restart
        // an agent once per replica. So may one that timed out: killing
        // `systemctl restart` does not cancel the restart systemd runs,
        // and an orchestrator may act on a request it never answered;
        // restarted again at the backoff, the agent would be killed while
        // it starts.
        if matches!(outcome.ended, Ended::Done | Ended::Interrupted | Ended::TimedOut) {
            tx.execute(
                "UPDATE warden.recovery_jobs SET state = 'verifying', verify_until = $2, lease_owner = NULL, \
                   lease_until = NULL, updated_at = $3 WHERE id = $1",
                &[&start.job, &(now + start.verify), &now],
            )
            .await?;
        } else {
            self.after_failed_attempt(&tx, start.job, now).await?;
        }
        tx.commit().await?;
        // Counted once committed: a try that failed before is not counted.
        if state != "verifying" {
            crate::metrics::METRICS.recovery_attempts.with_label_values(&[state]).inc();
        }
        Ok(())
    }

    async fn perform(&self, action: &Action, ctx: &Context) -> Outcome {
        let limit = self.settings.output_limit;
        match action {
            Action::Command { argv, timeout, .. } => {
                let filled: Result<Vec<String>, String> = plan::check_command_agent(&ctx.agent_id)
                    .and_then(|()| argv.iter().map(|a| plan::fill_arg(a, ctx)).collect());
                match filled {
                    Ok(argv) => {
                        let env = exec::command_env(&ctx.agent_id, ctx.issue_type.as_deref(), ctx.incident_id);
                        exec::run_command(&argv, &env, timeout.get(), limit).await
                    }
                    Err(e) => Outcome::failed(e.clone(), json!({"error": e})),
                }
            }
            Action::Http { method, url, headers, body, expect_status, timeout, .. } => {
                let filled = (|| -> Result<_, String> {
                    let url = fill_url(url, ctx)?;
                    let headers: BTreeMap<String, String> = headers
                        .iter()
                        .map(|(k, v)| Ok((k.clone(), plan::fill(v, ctx)?)))
                        .collect::<Result<_, String>>()?;
                    let body = body.as_ref().map(|b| plan::fill_json(b, ctx)).transpose()?;
                    Ok((url, headers, body))
                })();
                match filled {
                    Ok((url, headers, body)) => {
                        let call = exec::HttpCall {
                            method,
                            url: &url,
                            headers: &headers,
                            body: body.as_ref(),
                            expect_status,
                            timeout: timeout.get(),
                            output_limit: limit,
                        };
                        exec::run_http(&self.http, call).await
                    }
                    Err(e) => Outcome::failed(e.clone(), json!({"error": e})),
                }
            }
            Action::None { .. } => Outcome::failed(
                "alert only: no automatic action is configured for this strategy",
                json!({"kind": "none"}),
            ),
        }
    }
}

/// Fills a URL template, percent-encoding each filled-in value so agent
/// text cannot change the URL's structure. In the path, "." and ".." stay
/// refused whatever their encoding (URL parsers resolve them, and "%2e%2e",
/// as path segments, so an agent named ".." would move a call up the
/// path), and so does an empty value ("/incidents//ack" or "/incidents/"
/// is another resource). The query and fragment take any value.
fn fill_url(template: &str, ctx: &Context) -> Result<String, String> {
    let mut encoded = Context { agent_id: encode(&ctx.agent_id), ..ctx.clone() };
    encoded.agent_name = ctx.agent_name.as_deref().map(encode);
    encoded.issue_type = ctx.issue_type.as_deref().map(encode);
    encoded.labels = ctx.labels.iter().map(|(k, v)| (k.clone(), encode(v))).collect();
    let split = template.find(['?', '#']).unwrap_or(template.len());
    let (path, rest) = template.split_at(split);
    // Encoding keeps dots as they are, so the check sees the agent's text.
    let path = plan::fill_checked(path, &encoded, |value| match value {
        "." | ".." => Err(format!("refused: {value:?} would be read as a URL path segment")),
        "" => Err("refused: an empty value (a manual run's {incident_id}?) in a URL path".into()),
        _ => Ok(()),
    })?;
    Ok(path + &plan::fill(rest, &encoded)?)
}

fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// What one claim did.
#[derive(Default)]
struct Claimed {
    started: usize,
    exhausted: usize,
    /// The fleet outage open when it claimed, which held back automatic
    /// recoveries.
    outage: Option<i64>,
}

struct Start {
    job: i64,
    action_id: i64,
    action: Action,
    ctx: Context,
    /// How long the action has to prove itself once it has run.
    verify: Duration,
    /// When the job's lease runs out, on this replica's clock.
    lease_ends: tokio::time::Instant,
}

/// After a failed attempt on `agent` by `job`: the agent's other pending
/// automatic jobs wait until `next` too. The backoff is the agent's, not
/// the job's: another incident's job (agent_unresponsive beside
/// extended_offline) would otherwise restart the agent right after the
/// attempt failed, the two taking turns about a tick apart. Manual runs
/// were asked for now and keep their time. Rows locked meanwhile are
/// skipped (`recovery cancel` or `reset` has them, and locks the agent's
/// jobs in another order: waiting could deadlock).
async fn hold_back_others(
    tx: &tokio_postgres::Transaction<'_>,
    agent: &str,
    job: i64,
    next: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    tx.execute(
        "UPDATE warden.recovery_jobs SET next_run_at = $3, updated_at = $4 \
         WHERE id IN (SELECT id FROM warden.recovery_jobs \
                      WHERE agent_id = $1 AND id <> $2 AND state = 'pending' AND NOT manual AND next_run_at < $3 \
                      FOR UPDATE SKIP LOCKED)",
        &[&agent, &job, &next, &now],
    )
    .await?;
    Ok(())
}

async fn finish(
    tx: &tokio_postgres::Transaction<'_>,
    job: i64,
    state: &str,
    outcome: &str,
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    tx.execute(
        "UPDATE warden.recovery_jobs SET state = $2, outcome = $3, finished_at = $4, updated_at = $4, \
           lease_owner = NULL, lease_until = NULL WHERE id = $1",
        &[&job, &state, &outcome, &now],
    )
    .await?;
    Ok(())
}

async fn event(
    tx: &tokio_postgres::Transaction<'_>,
    now: DateTime<Utc>,
    agent: &str,
    kind: &str,
    severity: &str,
    message: &str,
    details: Value,
) -> Result<(), DbError> {
    // A message past the column's bound would fail the insert, and with it
    // every tick on this job; the details keep everything.
    let message = crate::console::format::at_most(message, crate::ingest::events::MESSAGE_MAX);
    tx.execute(
        "INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[&now, &agent, &kind, &severity, &message, &details],
    )
    .await?;
    Ok(())
}

/// Jobs waiting for their next attempt whose incident resolved meanwhile.
async fn cancel_resolved(client: &tokio_postgres::Client, now: DateTime<Utc>) -> Result<u64, DbError> {
    Ok(client
        .execute(
            // In id order, skipping rows locked elsewhere (a reset locks an
            // agent's jobs in id order): the next tick takes those.
            "UPDATE warden.recovery_jobs SET state = 'cancelled', finished_at = $1, updated_at = $1, \
               outcome = 'the incident resolved before the next attempt' \
             WHERE id IN (SELECT j.id FROM warden.recovery_jobs j JOIN warden.incidents i ON i.id = j.incident_id \
                          WHERE i.state = 'resolved' AND j.state = 'pending' \
                          ORDER BY j.id FOR UPDATE OF j SKIP LOCKED)",
            &[&now],
        )
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_text_cannot_climb_the_url_path() {
        let ctx = |id: &str| Context { agent_id: id.into(), ..Context::default() };
        let url = "http://orchestrator/v1/agents/{agent_id}/restart";
        for dots in [".", ".."] {
            let err = fill_url(url, &ctx(dots)).unwrap_err();
            assert!(err.contains("path segment"), "{err}");
        }
        assert_eq!(fill_url(url, &ctx("a..b")).unwrap(), "http://orchestrator/v1/agents/a..b/restart");
        assert_eq!(fill_url(url, &ctx("x:y")).unwrap(), "http://orchestrator/v1/agents/x%3Ay/restart");
        let manual = fill_url("http://o/incidents/{incident_id}/ack", &ctx("a")).unwrap_err();
        assert!(manual.contains("empty"), "{manual}");
        assert_eq!(
            fill_url("http://o/restart?incident={incident_id}&a=..", &ctx("a")).unwrap(),
            "http://o/restart?incident=&a=.."
        );
        assert_eq!(fill_url("http://o/r?agent={agent_id}", &ctx("..")).unwrap(), "http://o/r?agent=..", "not a path");
    }
}
