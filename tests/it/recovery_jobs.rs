//! The recovery engine's rules, driven tick by tick against a real
//! database with real (instant) commands: one recovery per agent at a time,
//! what verifies an action, alert-only strategies, manual runs and resets.

use std::sync::Arc;

use warden::config::{Action, Duration as D, RecoverySettings, Strategy};
use warden::health::incidents::IssueType;
use warden::recovery::ManualError;
use warden::recovery::engine::Engine;

use crate::helpers::{TestDb, default_settings};

fn command(argv: &[&str]) -> Action {
    Action::Command {
        name: None,
        argv: argv.iter().map(|a| a.to_string()).collect(),
        timeout: D::from_secs(5),
        attempts: 1,
    }
}

fn strategy(issues: &[IssueType], actions: Vec<Action>) -> Strategy {
    Strategy { name: "fix".into(), issues: issues.to_vec(), labels: Default::default(), verify_timeout: None, actions }
}

struct Rig {
    db: TestDb,
    engine: Arc<Engine>,
    settings: RecoverySettings,
}

/// Failed attempts are retried at once (1 ms backoff), so that ticks in
/// real time go through a whole strategy.
async fn rig(strategies: Vec<Strategy>, max_attempts: u32) -> Rig {
    rig_with(strategies, max_attempts, default_settings().recovery.max_concurrent).await
}

async fn rig_with(strategies: Vec<Strategy>, max_attempts: u32, max_concurrent: u32) -> Rig {
    let mut settings = default_settings().recovery;
    settings.strategies = strategies;
    settings.max_attempts = max_attempts;
    settings.max_concurrent = max_concurrent;
    settings.backoff_base = D::from_millis(1);
    settings.backoff_cap = D::from_millis(1);
    rig_of(settings).await
}

async fn rig_of(settings: RecoverySettings) -> Rig {
    let db = TestDb::migrated().await;
    let pool = warden::db::build_pool(db.config.clone(), &default_settings().database).unwrap();
    let engine = Engine::new(pool, settings.clone(), &default_settings().health, "test".into());
    Rig { db, engine, settings }
}

impl Rig {
    async fn agent(&self, id: &str) {
        self.db
            .client()
            .await
            .execute(
                "INSERT INTO warden.agent_status (agent_id, expected_interval_ms, first_seen, last_seen, liveness) \
                 VALUES ($1, 1000, now() - interval '1 minute', now() - interval '1 minute', 'offline')",
                &[&id],
            )
            .await
            .unwrap();
    }

    async fn incident(&self, agent: &str, issue: IssueType) -> i64 {
        self.db
            .client()
            .await
            .query_one(
                "INSERT INTO warden.incidents (agent_id, issue_type, severity) VALUES ($1, $2, 'critical') RETURNING id",
                &[&agent, &issue.as_str()],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// A tick, then the actions it started run to their end.
    async fn tick(&self) -> warden::recovery::engine::TickReport {
        let report = self.engine.tick(None).await.unwrap();
        self.engine.settle().await;
        report
    }

    /// (state, outcome) of the agent's jobs, oldest first.
    async fn jobs(&self, agent: &str) -> Vec<(String, Option<String>)> {
        let db = self.db.client().await;
        let rows = db
            .query("SELECT state, outcome FROM warden.recovery_jobs WHERE agent_id = $1 ORDER BY id", &[&agent])
            .await
            .unwrap();
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    async fn action_states(&self, agent: &str) -> Vec<String> {
        let db = self.db.client().await;
        let rows = db
            .query("SELECT state FROM warden.recovery_actions WHERE agent_id = $1 ORDER BY id", &[&agent])
            .await
            .unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// The evaluator resolves the incident, its condition cleared (just
    /// after any action started now).
    async fn evaluator_clears(&self, incident: i64) {
        self.db
            .client()
            .await
            .execute(
                "UPDATE warden.incidents SET state = 'resolved', resolved_at = now() + interval '2 seconds', \
                   resolution = 'condition cleared' WHERE id = $1",
                &[&incident],
            )
            .await
            .unwrap();
    }

    async fn count(&self, sql: &str) -> i64 {
        self.db.client().await.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// Waits until a tick is waiting for the claim lock, which the test holds.
    async fn claim_waits_for_its_turn(&self) {
        let watcher = self.db.client().await;
        crate::helpers::eventually(std::time::Duration::from_secs(60), "a claim waiting for its turn", || async {
            let waiting: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                       AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                       AND (classid::bigint << 32 | objid::bigint) = $1",
                    &[&warden::recovery::CLAIM_LOCK],
                )
                .await
                .unwrap()
                .get(0);
            (waiting > 0).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn an_agent_gets_one_recovery_at_a_time_whatever_asks_for_more() {
    let rig =
        rig(vec![strategy(&[IssueType::AgentUnresponsive, IssueType::RestartLoop], vec![command(&["/bin/true"])])], 3)
            .await;
    rig.agent("twice").await;
    rig.agent("other").await;
    rig.incident("twice", IssueType::AgentUnresponsive).await;
    rig.incident("twice", IssueType::RestartLoop).await;
    rig.incident("other", IssueType::AgentUnresponsive).await;

    let report = rig.tick().await;
    assert_eq!(report.opened, 3);
    assert_eq!(report.started, 2, "one per agent: {report:?}");
    let states: Vec<String> = rig.jobs("twice").await.into_iter().map(|j| j.0).collect();
    assert_eq!(states, ["verifying", "pending"]);

    // The second job of the agent waits while the first verifies, and so
    // does an operator's request.
    assert_eq!(rig.tick().await.started, 0);
    let mut db = rig.db.client().await;
    let busy = warden::recovery::run_now(&mut db, &rig.settings, "twice", None).await.unwrap_err();
    assert!(matches!(busy, ManualError::Busy(_)), "{busy}");
    assert_eq!(rig.action_states("twice").await, ["verifying"]);
}

/// Two incidents of one agent wait out one backoff: the second job does
/// not restart the agent right after the first one's attempt failed, nor
/// does the job of an incident opened during the backoff.
#[tokio::test]
async fn the_backoff_after_a_failed_attempt_holds_for_all_of_the_agents_incidents() {
    let mut settings = default_settings().recovery;
    settings.strategies = vec![strategy(
        &[IssueType::AgentUnresponsive, IssueType::ExtendedOffline, IssueType::RestartLoop],
        vec![command(&["/bin/false"])],
    )];
    settings.max_attempts = 5;
    settings.backoff_base = D::from_secs(600);
    settings.backoff_cap = D::from_secs(3600);
    let rig = rig_of(settings).await;
    rig.agent("twice").await;
    rig.incident("twice", IssueType::AgentUnresponsive).await;
    rig.incident("twice", IssueType::ExtendedOffline).await;
    let report = rig.tick().await;
    assert_eq!((report.opened, report.started), (2, 1), "{report:?}");
    assert_eq!(rig.action_states("twice").await, ["failed"]);

    let report = rig.tick().await;
    assert_eq!(report.started, 0, "the other incident's job waits out the backoff too: {report:?}");
    rig.incident("twice", IssueType::RestartLoop).await;
    let report = rig.tick().await;
    assert_eq!((report.opened, report.started), (1, 0), "and so does a new incident's: {report:?}");
    assert_eq!(rig.action_states("twice").await, ["failed"]);
    let waiting = "SELECT count(*) FROM warden.recovery_jobs \
                   WHERE state = 'pending' AND next_run_at > now() + interval '9 minutes'";
    assert_eq!(rig.count(waiting).await, 3);

    // An operator's run is not held back by it.
    let mut db = rig.db.client().await;
    warden::recovery::run_now(&mut db, &rig.settings, "twice", None).await.unwrap();
    assert_eq!(rig.tick().await.started, 1);
    assert_eq!(rig.action_states("twice").await, ["failed", "failed"]);

    // Once the backoff is over, the incidents take turns: the job that
    // just failed goes last, and the other strategies get their attempt.
    db.execute(
        "UPDATE warden.recovery_jobs SET next_run_at = next_run_at - interval '1 day' WHERE state = 'pending'",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(rig.tick().await.started, 1);
    let issue = "SELECT i.issue_type FROM warden.recovery_actions a JOIN warden.incidents i ON i.id = a.incident_id \
                 ORDER BY a.id DESC LIMIT 1";
    let next: String = db.query_one(issue, &[]).await.unwrap().get(0);
    assert_eq!(next, "extended_offline", "not agent_unresponsive again");
}

/// The backoff does not wait for a job another transaction holds (an
/// operator's cancel or reset, which lock the agent's jobs in their own
/// order): it skips it.
#[tokio::test]
async fn holding_back_the_agents_other_jobs_skips_one_locked_elsewhere() {
    let mut settings = default_settings().recovery;
    settings.strategies =
        vec![strategy(&[IssueType::AgentUnresponsive, IssueType::ExtendedOffline], vec![command(&["/bin/false"])])];
    settings.backoff_base = D::from_secs(600);
    let rig = rig_of(settings).await;
    rig.agent("held").await;
    let first = rig.incident("held", IssueType::AgentUnresponsive).await;
    let second = rig.incident("held", IssueType::ExtendedOffline).await;
    // The first incident's job due, the second's due in a moment and held
    // by another transaction from before the first one's attempt.
    let mut holder = rig.db.client().await;
    holder
        .execute(
            "INSERT INTO warden.recovery_jobs (incident_id, agent_id, strategy, next_run_at) \
             VALUES ($1, 'held', 'fix', now() - interval '1 second'), ($2, 'held', 'fix', now() + interval '1 second')",
            &[&first, &second],
        )
        .await
        .unwrap();
    let holding = holder.transaction().await.unwrap();
    holding.execute("SELECT 1 FROM warden.recovery_jobs WHERE incident_id = $1 FOR UPDATE", &[&second]).await.unwrap();
    let report = tokio::time::timeout(std::time::Duration::from_secs(60), rig.tick())
        .await
        .expect("the failed attempt is recorded without waiting for the locked job");
    assert_eq!((report.opened, report.started), (0, 1), "{report:?}");
    assert_eq!(rig.action_states("held").await, ["failed"]);
    holding.commit().await.unwrap();
    let soon = "SELECT count(*) FROM warden.recovery_jobs WHERE state = 'pending' \
                AND next_run_at < now() + interval '1 minute'";
    assert_eq!(rig.count(soon).await, 1, "the locked job was left as it was");
}

/// `warden recovery cancel`: an agent's waiting and verifying jobs end and
/// its open incidents get no new one; an action left running by a replica
/// that is gone is abandoned; one running on a live replica is refused.
#[tokio::test]
async fn cancelling_ends_the_agents_recovery_and_its_incidents_get_no_new_one() {
    let rig =
        rig(vec![strategy(&[IssueType::AgentUnresponsive, IssueType::RestartLoop], vec![command(&["/bin/true"])])], 3)
            .await;
    rig.agent("stop").await;
    rig.agent("other").await;
    rig.incident("stop", IssueType::AgentUnresponsive).await;
    rig.incident("stop", IssueType::RestartLoop).await;
    rig.incident("other", IssueType::AgentUnresponsive).await;
    rig.tick().await;
    let states: Vec<String> = rig.jobs("stop").await.into_iter().map(|j| j.0).collect();
    assert_eq!(states, ["verifying", "pending"]);

    let mut db = rig.db.client().await;
    let done = warden::recovery::cancel(&mut db, "stop", "alice").await.unwrap();
    assert_eq!((done.jobs, done.actions), (2, 1));
    let jobs = rig.jobs("stop").await;
    assert!(jobs.iter().all(|j| j.0 == "cancelled" && j.1.as_deref() == Some("cancelled by alice")), "{jobs:?}");
    let action: (String, String) = db
        .query_one("SELECT state, outcome FROM warden.recovery_actions WHERE agent_id = 'stop'", &[])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(action.0, "abandoned");
    assert!(action.1.ends_with("verification cancelled by alice"), "{}", action.1);
    let events = "SELECT count(*) FROM warden.system_events WHERE event_type = 'recovery_cancelled' \
                  AND agent_id = 'stop' AND details->>'by' = 'alice'";
    assert_eq!(rig.count(events).await, 1);
    assert_eq!(rig.jobs("other").await[0].0, "verifying", "another agent's recovery goes on");

    // The incidents are still open, and no recovery of them starts again.
    let report = rig.tick().await;
    assert_eq!((report.opened, report.started), (0, 0), "{report:?}");
    assert_eq!(rig.action_states("stop").await.len(), 1);
    assert_eq!(warden::recovery::cancel(&mut db, "stop", "alice").await.unwrap().jobs, 0, "nothing left");

    // A job whose replica died mid-action (recovery switched off, nobody
    // took it over), and then one whose replica is alive.
    let incident = rig.incident("stop", IssueType::ExtendedOffline).await;
    let job: i64 = db
        .query_one(
            "INSERT INTO warden.recovery_jobs (incident_id, agent_id, strategy, state, lease_owner, lease_until) \
             VALUES ($1, 'stop', 'fix', 'running', 'gone', now() - interval '1 minute') RETURNING id",
            &[&incident],
        )
        .await
        .unwrap()
        .get(0);
    db.execute(
        "WITH a AS (INSERT INTO warden.recovery_actions (incident_id, agent_id, strategy, action, attempt, state, \
                      started_at, job_id) VALUES ($1, 'stop', 'fix', 'command', 1, 'running', now(), $2) RETURNING id) \
         UPDATE warden.recovery_jobs SET current_action_id = (SELECT id FROM a) WHERE id = $2",
        &[&incident, &job],
    )
    .await
    .unwrap();
    db.execute("UPDATE warden.recovery_jobs SET lease_until = now() + interval '1 hour' WHERE id = $1", &[&job])
        .await
        .unwrap();
    let live = warden::recovery::cancel(&mut db, "stop", "alice").await.unwrap_err();
    assert!(matches!(live, ManualError::ActionRunning { .. }), "{live}");
    assert!(live.to_string().contains("replica gone"), "{live}");
    assert_eq!(rig.jobs("stop").await.last().unwrap().0, "running", "nothing changed");
    db.execute("UPDATE warden.recovery_jobs SET lease_until = now() - interval '1 minute' WHERE id = $1", &[&job])
        .await
        .unwrap();
    let done = warden::recovery::cancel(&mut db, "stop", "bob").await.unwrap();
    assert_eq!((done.jobs, done.actions), (1, 1));
    let abandoned: (String, String) = db
        .query_one("SELECT state, outcome FROM warden.recovery_actions WHERE job_id = $1", &[&job])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(abandoned.0, "abandoned");
    assert!(abandoned.1.contains("cancelled by bob after its replica stopped"), "{}", abandoned.1);
    assert!(matches!(
        warden::recovery::cancel(&mut db, "nobody", "bob").await.unwrap_err(),
        ManualError::UnknownAgent(_)
    ));
}

/// A fleet outage opened while a claim waited for its turn stops that
/// claim: the outage is read in the turn, not before it.
#[tokio::test]
async fn a_fleet_outage_opened_while_a_claim_waits_for_its_turn_holds_it_back() {
    let rig = rig(vec![strategy(&[IssueType::AgentUnresponsive], vec![command(&["/bin/true"])])], 3).await;
    rig.agent("late").await;
    rig.incident("late", IssueType::AgentUnresponsive).await;
    let mut other = rig.db.client().await;
    let turn = other.transaction().await.unwrap();
    turn.execute("SELECT pg_advisory_xact_lock($1)", &[&warden::recovery::CLAIM_LOCK]).await.unwrap();
    let engine = rig.engine.clone();
    let tick = tokio::spawn(async move { engine.tick(None).await.unwrap() });
    rig.claim_waits_for_its_turn().await;
    rig.db
        .client()
        .await
        .execute(
            "INSERT INTO warden.incidents (agent_id, issue_type, severity) VALUES (NULL, 'fleet_outage', 'emergency')",
            &[],
        )
        .await
        .unwrap();
    turn.commit().await.unwrap();
    let report = tick.await.unwrap();
    rig.engine.settle().await;
    assert!(report.paused_by_fleet_outage, "{report:?}");
    assert_eq!((report.opened, report.started), (1, 0), "{report:?}");
    assert!(rig.action_states("late").await.is_empty());
}

/// A fleet outage keeps an agent from being heard whatever the action did:
/// the verification waits for it to end and then has its whole time
/// again, instead of failing and using up one of the agent's attempts.
#[tokio::test]
async fn a_verification_waits_out_a_fleet_outage_instead_of_failing() {
    let rig = rig(vec![strategy(&[IssueType::AgentUnresponsive], vec![command(&["/bin/true"])])], 3).await;
    rig.agent("cut").await;
    rig.incident("cut", IssueType::AgentUnresponsive).await;
    rig.tick().await;
    assert_eq!(rig.jobs("cut").await[0].0, "verifying");
    let db = rig.db.client().await;
    let outage: i64 = db
        .query_one(
            "INSERT INTO warden.incidents (agent_id, issue_type, severity, opened_at) \
             VALUES (NULL, 'fleet_outage', 'emergency', now() - interval '50 minutes') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // Its time is up while the fleet is out: it waits.
    let expire = "UPDATE warden.recovery_jobs SET verify_until = now() - interval '1 second'";
    db.execute(expire, &[]).await.unwrap();
    db.execute("UPDATE warden.recovery_actions SET finished_at = now() - interval '1 hour'", &[]).await.unwrap();
    let report = rig.tick().await;
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(rig.jobs("cut").await[0].0, "verifying");

    // The outage is over: the whole verification time again, from its end.
    db.execute("UPDATE warden.incidents SET state = 'resolved', resolved_at = now() WHERE id = $1", &[&outage])
        .await
        .unwrap();
    assert_eq!(rig.tick().await.failed, 0);
    assert_eq!(rig.jobs("cut").await[0].0, "verifying");
    // Long after it, the verification fails as any would.
    db.execute("UPDATE warden.incidents SET resolved_at = now() - interval '30 minutes' WHERE id = $1", &[&outage])
        .await
        .unwrap();
    assert_eq!(rig.tick().await.failed, 1);
    assert_eq!(rig.action_states("cut").await, ["failed"]);
}

#[tokio::test]
async fn an_operators_run_starts_while_the_fleet_cap_is_full() {
    let rig = rig_with(vec![strategy(&[IssueType::AgentUnresponsive], vec![command(&["/bin/true"])])], 3, 1).await;
    for agent in ["busy", "queued", "asked"] {
        rig.agent(agent).await;
    }
    rig.incident("busy", IssueType::AgentUnresponsive).await;
    assert_eq!(rig.tick().await.started, 1);
    rig.incident("queued", IssueType::AgentUnresponsive).await;
    assert_eq!(rig.tick().await.started, 0, "the cap (1) is taken by busy's verification");

    let mut db = rig.db.client().await;
    warden::recovery::run_now(&mut db, &rig.settings, "asked", None).await.unwrap();
    assert_eq!(rig.tick().await.started, 1, "a manual run goes now");
    assert_eq!(rig.action_states("asked").await, ["verifying"]);
    assert!(rig.action_states("queued").await.is_empty(), "automatic ones still wait for room");

    // Past the cap, manual runs are bounded on their own: by default ten
    // at once.
    assert_eq!(rig.settings.max_concurrent_manual, 10);
    for i in 0..10 {
        let agent = format!("more-{i}");
        rig.agent(&agent).await;
        warden::recovery::run_now(&mut db, &rig.settings, &agent, None).await.unwrap();
    }
    assert_eq!(rig.tick().await.started, 9, "with asked's, ten");
    assert_eq!(rig.tick().await.started, 0);
}

#[tokio::test]
async fn manual_runs_past_a_full_cap_are_bounded_by_their_own_setting() {
    let mut rig = rig_with(vec![strategy(&[IssueType::AgentUnresponsive], vec![command(&["/bin/true"])])], 3, 1).await;
    rig.settings.max_concurrent_manual = 2;
    let pool = warden::db::build_pool(rig.db.config.clone(), &default_settings().database).unwrap();
    rig.engine = Engine::new(pool, rig.settings.clone(), &default_settings().health, "test".into());
    rig.agent("busy").await;
    rig.incident("busy", IssueType::AgentUnresponsive).await;
    assert_eq!(rig.tick().await.started, 1, "the cap (1) is taken");
    let mut db = rig.db.client().await;
    for i in 0..3 {
        let agent = format!("asked-{i}");
        rig.agent(&agent).await;
        warden::recovery::run_now(&mut db, &rig.settings, &agent, None).await.unwrap();
    }
    assert_eq!(rig.tick().await.started, 2);
    assert_eq!(rig.tick().await.started, 0, "the third waits for one of them to end");
    assert_eq!(rig.count("SELECT count(*) FROM warden.recovery_jobs WHERE manual AND state = 'pending'").await, 1);
}

#[tokio::test]
async fn an_agent_waiting_for_its_own_recovery_takes_no_room_from_others() {
    let rig = rig_with(
        vec![strategy(&[IssueType::AgentUnresponsive, IssueType::RestartLoop], vec![command(&["/bin/true"])])],
        3,
        2,
    )
    .await;
    rig.agent("twice").await;
    rig.agent("other").await;
    // Due in this order: both of twice's jobs before other's.
    for (seconds_ago, agent, issue) in [
        (3.0, "twice", IssueType::AgentUnresponsive),
        (2.0, "twice", IssueType::RestartLoop),
        (1.0, "other", IssueType::AgentUnresponsive),
    ] {
        let incident = rig.incident(agent, issue).await;
        rig.db
            .client()
            .await
            .execute(
                "INSERT INTO warden.recovery_jobs (incident_id, agent_id, strategy, next_run_at) \
                 VALUES ($1, $2, 'fix', now() - $3::float8 * interval '1 second')",
                &[&incident, &agent, &seconds_ago],
            )
            .await
            .unwrap();
    }
    let report = rig.tick().await;
    assert_eq!(report.started, 2, "twice's second job leaves the second place to other: {report:?}");
    assert_eq!(rig.action_states("other").await, ["verifying"]);
}

#[tokio::test]
async fn a_manual_run_is_queued_once() {
    let rig = rig(vec![strategy(&[IssueType::AgentUnresponsive], vec![command(&["/bin/true"])])], 3).await;
    rig.agent("manual").await;
    let mut db = rig.db.client().await;
    warden::recovery::run_now(&mut db, &rig.settings, "manual", None).await.unwrap();
    let again = warden::recovery::run_now(&mut db, &rig.settings, "manual", None).await.unwrap_err();
    assert!(matches!(again, ManualError::Busy(_)), "a second request while the first is queued: {again}");
    assert_eq!(rig.tick().await.started, 1);
    assert_eq!(rig.action_states("manual").await, ["verifying"]);

    // Back: the credit names the operator's run, not an automatic one.
    db.execute(
        "UPDATE warden.agent_status SET liveness = 'online', last_seen = now() + interval '1 second' \
         WHERE agent_id = 'manual'",
        &[],
    )
    .await
    .unwrap();
    rig.tick().await;
    let jobs = rig.jobs("manual").await;
    assert_eq!(jobs, [("succeeded".to_string(), Some("recovered by a manual run of fix/command#1".to_string()))]);
}

#[tokio::test]
async fn an_alert_only_strategy_makes_no_attempt_and_escalates_nothing() {
    let rig = rig(vec![strategy(&[IssueType::AgentUnresponsive], vec![Action::None { name: None }])], 3).await;
    rig.agent("quiet").await;
    rig.incident("quiet", IssueType::AgentUnresponsive).await;
    for _ in 0..3 {
        rig.tick().await;
    }
    let jobs = rig.jobs("quiet").await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].0, "cancelled");
    assert!(jobs[0].1.as_deref().unwrap().starts_with("alert only"), "{jobs:?}");
    assert!(rig.action_states("quiet").await.is_empty(), "no attempt recorded");
    assert_eq!(rig.count("SELECT count(*) FROM warden.system_events WHERE event_type = 'recovery_failed'").await, 0);
}

#[tokio::test]
async fn an_alert_only_strategy_never_gives_up_for_attempts_made_elsewhere() {
    let quiet = Strategy {
        name: "quiet".into(),
        ..strategy(&[IssueType::AgentUnresponsive], vec![Action::None { name: None }])
    };
    let rig = rig(vec![strategy(&[IssueType::RestartLoop], vec![command(&["/bin/false"])]), quiet], 1).await;
    rig.agent("used").await;
    let looping = rig.incident("used", IssueType::RestartLoop).await;
    rig.tick().await;
    rig.tick().await;
    assert_eq!(rig.jobs("used").await[0].0, "exhausted", "its one attempt is used");
    rig.db
        .client()
        .await
        .execute("UPDATE warden.incidents SET state = 'resolved', resolved_at = now() WHERE id = $1", &[&looping])
        .await
        .unwrap();
    let failed = "SELECT count(*) FROM warden.system_events WHERE event_type = 'recovery_failed'";
    let before = rig.count(failed).await;

    rig.incident("used", IssueType::AgentUnresponsive).await;
    rig.tick().await;
    let jobs = rig.jobs("used").await;
    assert_eq!(jobs[1].0, "cancelled", "{jobs:?}");
    assert_eq!(rig.count(failed).await, before, "no critical 'gave up' page for an alert-only strategy");
}

#[tokio::test]
async fn none_after_failed_actions_gives_up_there() {
    let rig = rig(
        vec![strategy(&[IssueType::AgentUnresponsive], vec![command(&["/bin/false"]), Action::None { name: None }])],
        5,
    )
    .await;
    rig.agent("stop").await;
    rig.incident("stop", IssueType::AgentUnresponsive).await;
    for _ in 0..4 {
        rig.tick().await;
    }
    assert_eq!(rig.action_states("stop").await, ["failed"], "one command, then nothing more");
    assert_eq!(rig.jobs("stop").await[0].0, "exhausted");
    assert_eq!(rig.count("SELECT count(*) FROM warden.system_events WHERE event_type = 'recovery_failed'").await, 1);
}

#[tokio::test]
async fn attempts_slower_than_the_window_still_give_up_after_max_attempts() {
    // Each attempt takes 20 minutes to fail its verification: three never
    // start within one 30 minute window.
    let mut slow = strategy(&[IssueType::AgentUnresponsive], vec![command(&["/bin/true"])]);
    slow.verify_timeout = Some(D::from_secs(20 * 60));
    let rig = rig(vec![slow], 3).await;
    assert_eq!(rig.settings.attempt_window.get(), std::time::Duration::from_secs(30 * 60));
    rig.agent("slow").await;
    rig.incident("slow", IssueType::AgentUnresponsive).await;
    let mut now = chrono::Utc::now();
    for _ in 0..12 {
        rig.engine.tick(Some(now)).await.unwrap();
        rig.engine.settle().await;
        now += chrono::Duration::minutes(11);
    }
    assert_eq!(rig.action_states("slow").await, ["failed", "failed", "failed"]);
    let jobs = rig.jobs("slow").await;
    assert_eq!(jobs[0].0, "exhausted");
    assert!(
        jobs[0].1.as_deref().unwrap_or_default().starts_with("recovery of slow gave up after 3 attempts"),
        "{jobs:?}"
    );
    assert_eq!(rig.count("SELECT count(*) FROM warden.system_events WHERE event_type = 'recovery_failed'").await, 1);
}

#[tokio::test]
async fn a_heartbeat_sent_while_the_restart_ran_proves_nothing() {
    let rig = rig(vec![strategy(&[IssueType::AgentUnresponsive], vec![command(&["/bin/sleep", "0.3"])])], 3).await;
    rig.agent("w").await;
    rig.incident("w", IssueType::AgentUnresponsive).await;
    assert_eq!(rig.tick().await.started, 1);
    assert_eq!(rig.action_states("w").await, ["verifying"]);
    let db = rig.db.client().await;
    // The old process, still running while the restart was under way.
    db.execute(
        "UPDATE warden.agent_status s SET liveness = 'online', \
           last_seen = a.started_at + (a.finished_at - a.started_at) / 2 \
         FROM warden.recovery_actions a WHERE s.agent_id = 'w' AND a.agent_id = 'w'",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(rig.tick().await.succeeded, 0);
    assert_eq!(rig.action_states("w").await, ["verifying"]);
    // The new process.
    db.execute(
        "UPDATE warden.agent_status s SET last_seen = a.finished_at + interval '1 millisecond' \
         FROM warden.recovery_actions a WHERE s.agent_id = 'w' AND a.agent_id = 'w'",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(rig.tick().await.succeeded, 1);
    assert_eq!(rig.action_states("w").await, ["succeeded"]);
}

#[tokio::test]
async fn a_restarted_agent_announcing_a_longer_interval_gets_the_time_it_needs() {
    // Claimed at a 1 s interval, the job's time to be back was seconds; the
    // restarted process announces 60 s and needs two of those to be online.
    let rig = rig(vec![strategy(&[IssueType::AgentUnresponsive], vec![command(&["/bin/true"])])], 3).await;
    rig.agent("slow").await;
    rig.incident("slow", IssueType::AgentUnresponsive).await;
    assert_eq!(rig.tick().await.started, 1);
    assert_eq!(rig.action_states("slow").await, ["verifying"]);
    let db = rig.db.client().await;
    db.batch_execute(
        "UPDATE warden.agent_status s SET liveness = 'degraded', expected_interval_ms = 60000,            last_seen = a.finished_at + interval '1 millisecond'          FROM warden.recovery_actions a WHERE s.agent_id = 'slow' AND a.agent_id = 'slow';          UPDATE warden.recovery_jobs SET verify_until = now() - interval '1 second' WHERE agent_id = 'slow'",
    )
    .await
    .unwrap();
    rig.tick().await;
    assert_eq!(rig.action_states("slow").await, ["verifying"], "its new interval's time, not the old one's");
    db.execute("UPDATE warden.agent_status SET liveness = 'online' WHERE agent_id = 'slow'", &[]).await.unwrap();
    assert_eq!(rig.tick().await.succeeded, 1);
}

#[tokio::test]
async fn a_restart_loop_is_fixed_when_it_clears_and_the_agent_is_back() {
    let rig = rig(vec![strategy(&[IssueType::RestartLoop], vec![command(&["/bin/true"])])], 3).await;
    let db = rig.db.client().await;
    let mut incidents = Vec::new();
    for agent in ["looping", "gone"] {
        rig.agent(agent).await;
        incidents.push(rig.incident(agent, IssueType::RestartLoop).await);
    }
    assert_eq!(rig.tick().await.started, 2);
    // The loop's window has to move on: by default the restart-loop window
    // (10 minutes) and one evaluator check.
    let waits: Vec<f64> = db
        .query(
            "SELECT extract(epoch FROM j.verify_until - a.started_at)::float8 FROM warden.recovery_jobs j \
             JOIN warden.recovery_actions a ON a.id = j.current_action_id ORDER BY j.id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(waits.iter().all(|w| (610.0..620.0).contains(w)), "{waits:?}");

    // "looping" heartbeats and is online: for a restart loop that proves
    // nothing. "gone" has its incident resolved but is not heard from.
    db.execute(
        "UPDATE warden.agent_status SET liveness = 'online', last_seen = now() + interval '1 second' \
         WHERE agent_id = 'looping'",
        &[],
    )
    .await
    .unwrap();
    rig.evaluator_clears(incidents[1]).await;
    assert_eq!(rig.tick().await.succeeded, 0);
    assert_eq!(rig.action_states("looping").await, ["verifying"]);
    assert_eq!(rig.action_states("gone").await, ["verifying"]);
    let open: String =
        db.query_one("SELECT state FROM warden.incidents WHERE id = $1", &[&incidents[0]]).await.unwrap().get(0);
    assert_eq!(open, "open", "recovery does not resolve what the evaluator still sees");

    // The evaluator finds the loop cleared: now it counts.
    rig.evaluator_clears(incidents[0]).await;
    assert_eq!(rig.tick().await.succeeded, 1);
    assert_eq!(rig.action_states("looping").await, ["succeeded"]);
    assert_eq!(rig.action_states("gone").await, ["verifying"], "resolved, but never heard from");
    let resolution: String =
        db.query_one("SELECT resolution FROM warden.incidents WHERE id = $1", &[&incidents[0]]).await.unwrap().get(0);
    assert!(resolution.starts_with("auto-recovered by fix/"), "{resolution}");
}

#[tokio::test]
async fn manual_runs_do_not_use_up_automatic_attempts() {
    let rig = rig(vec![strategy(&[IssueType::AgentUnresponsive], vec![command(&["/bin/false"])])], 1).await;
    rig.agent("tried").await;
    let mut db = rig.db.client().await;
    warden::recovery::run_now(&mut db, &rig.settings, "tried", None).await.unwrap();
    rig.tick().await;
    assert_eq!(rig.action_states("tried").await, ["failed"]);

    rig.incident("tried", IssueType::AgentUnresponsive).await;
    let report = rig.tick().await;
    assert_eq!((report.started, report.exhausted), (1, 0), "the automatic job gets its attempt: {report:?}");
    assert_eq!(rig.action_states("tried").await, ["failed", "failed"]);
    // Its one attempt used up, the job gives up as the attempt fails.
    let outcome = rig.jobs("tried").await.pop().and_then(|j| j.1).unwrap_or_default();
    assert!(outcome.starts_with("recovery of tried gave up after 1 attempt: "), "{outcome}");
}

#[tokio::test]
async fn a_reset_forgives_earlier_attempts_for_later_incidents_too() {
    let rig = rig(vec![strategy(&[IssueType::AgentUnresponsive], vec![command(&["/bin/false"])])], 2).await;
    rig.agent("reset").await;
    let first = rig.incident("reset", IssueType::AgentUnresponsive).await;
    for _ in 0..4 {
        rig.tick().await;
    }
    assert_eq!(rig.jobs("reset").await[0].0, "exhausted");
    assert_eq!(rig.action_states("reset").await.len(), 2);

    let mut db = rig.db.client().await;
    assert_eq!(warden::recovery::reset(&mut db, "reset").await.unwrap(), 1);
    let attempts: i32 = db.query_one("SELECT attempts FROM warden.recovery_jobs", &[]).await.unwrap().get(0);
    assert_eq!(attempts, 0, "backoff starts again from its base");
    db.execute("UPDATE warden.incidents SET state = 'resolved', resolved_at = now() WHERE id = $1", &[&first])
        .await
        .unwrap();
    rig.tick().await;
    assert_eq!(rig.jobs("reset").await[0].0, "cancelled");

    // Within the same attempt window, a new incident still gets its attempts.
    rig.incident("reset", IssueType::AgentUnresponsive).await;
    let report = rig.tick().await;
    assert_eq!((report.started, report.exhausted), (1, 0), "{report:?}");
    assert_eq!(rig.action_states("reset").await.len(), 3);
}

#[tokio::test]
async fn a_reset_forgives_the_attempts_for_the_agents_waiting_jobs_too() {
    let rig =
        rig(vec![strategy(&[IssueType::AgentUnresponsive, IssueType::RestartLoop], vec![command(&["/bin/false"])])], 2)
            .await;
    rig.agent("two").await;
    let first = rig.incident("two", IssueType::AgentUnresponsive).await;
    rig.tick().await;
    // A second incident's job, waiting out a long backoff while the first
    // uses the agent's attempts up.
    let second = rig.incident("two", IssueType::RestartLoop).await;
    let mut db = rig.db.client().await;
    db.execute(
        "INSERT INTO warden.recovery_jobs (incident_id, agent_id, strategy, next_run_at) \
         VALUES ($1, 'two', 'fix', now() + interval '1 hour')",
        &[&second],
    )
    .await
    .unwrap();
    // Nothing has given up yet: a reset changes nothing.
    assert_eq!(warden::recovery::reset(&mut db, "two").await.unwrap(), 0);
    let forgiven = "SELECT count(*) FROM warden.recovery_jobs WHERE window_start IS NOT NULL";
    assert_eq!(rig.count(forgiven).await, 0);
    for _ in 0..3 {
        rig.tick().await;
    }
    assert_eq!(rig.jobs("two").await[0].0, "exhausted");
    assert_eq!(rig.action_states("two").await.len(), 2);

    assert_eq!(warden::recovery::reset(&mut db, "two").await.unwrap(), 1);
    db.execute("UPDATE warden.incidents SET state = 'resolved', resolved_at = now() WHERE id = $1", &[&first])
        .await
        .unwrap();
    db.execute("UPDATE warden.recovery_jobs SET next_run_at = now() WHERE incident_id = $1", &[&second]).await.unwrap();
    let report = rig.tick().await;
    assert_eq!((report.started, report.exhausted), (1, 0), "the waiting job gets its attempt: {report:?}");
    assert_eq!(rig.action_states("two").await.len(), 3);
}

#[tokio::test]
async fn an_http_action_follows_no_redirect_and_a_302_is_a_failure() {
    // Whoever can make the orchestrator answer 302 names another host;
    // the action's API key must not go there.
    let elsewhere = crate::alerting::receivers::HttpReceiver::start().await;
    let location = elsewhere.url("/collect");
    let redirecting =
        axum::Router::new().fallback(move || async move { (axum::http::StatusCode::FOUND, [("location", location)]) });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let orchestrator = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, redirecting).await });
    let http = Action::Http {
        name: None,
        method: "POST".into(),
        url: format!("{orchestrator}/restart/{{agent_id}}"),
        headers: [("x-api-key".to_string(), "orch-key-123".to_string())].into(),
        body: None,
        expect_status: vec![],
        timeout: D::from_secs(5),
        attempts: 1,
    };
    let rig = rig(vec![strategy(&[IssueType::AgentUnresponsive], vec![http])], 3).await;
    rig.agent("moved").await;
    rig.incident("moved", IssueType::AgentUnresponsive).await;
    assert_eq!(rig.tick().await.started, 1);

    assert!(elsewhere.requests().is_empty(), "the redirect was followed: {:?}", elsewhere.requests());
    let row = rig
        .db
        .client()
        .await
        .query_one("SELECT state, outcome, detail FROM warden.recovery_actions WHERE agent_id = 'moved'", &[])
        .await
        .unwrap();
    let (state, outcome, detail): (String, String, serde_json::Value) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(state, "failed");
    assert!(outcome.contains("answered 302"), "{outcome}");
    assert_eq!(detail["status"], 302);
}

#[tokio::test]
async fn a_nul_in_a_commands_output_does_not_keep_its_failure_from_the_record() {
    // PostgreSQL's text and jsonb refuse U+0000; an outcome holding one
    // was retried until the lease ran out and then called abandoned.
    let rig = rig(
        vec![strategy(
            &[IssueType::AgentUnresponsive],
            vec![command(&["/bin/sh", "-c", "printf 'restart failed: \\000 binary'; exit 1"])],
        )],
        3,
    )
    .await;
    rig.agent("nul").await;
    rig.incident("nul", IssueType::AgentUnresponsive).await;
    assert_eq!(rig.tick().await.started, 1);
    let row = rig
        .db
        .client()
        .await
        .query_one("SELECT state, detail FROM warden.recovery_actions WHERE agent_id = 'nul'", &[])
        .await
        .unwrap();
    let (state, detail): (String, serde_json::Value) = (row.get(0), row.get(1));
    assert_eq!(state, "failed");
    assert_eq!(detail["exit_code"], 1);
    assert_eq!(detail["stdout"], "restart failed: \u{FFFD} binary");
    assert_eq!(rig.jobs("nul").await[0].0, "pending", "on to the next attempt after the backoff");
}

#[tokio::test]
async fn an_http_answer_whose_body_breaks_off_is_not_recorded_as_whole() {
    // 200 with a long body announced, five bytes (one a NUL) sent, then
    // nothing until the action's timeout.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let orchestrator = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let _ = socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\nok\0zz").await;
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            });
        }
    });
    let http = Action::Http {
        name: None,
        method: "POST".into(),
        url: format!("{orchestrator}/restart/{{agent_id}}"),
        headers: Default::default(),
        body: None,
        expect_status: vec![],
        timeout: D::from_secs(1),
        attempts: 1,
    };
    let rig = rig(vec![strategy(&[IssueType::AgentUnresponsive], vec![http])], 3).await;
    rig.agent("cut").await;
    rig.incident("cut", IssueType::AgentUnresponsive).await;
    assert_eq!(rig.tick().await.started, 1);
    let row = rig
        .db
        .client()
        .await
        .query_one("SELECT state, outcome, detail FROM warden.recovery_actions WHERE agent_id = 'cut'", &[])
        .await
        .unwrap();
    let (state, outcome, detail): (String, String, serde_json::Value) = (row.get(0), row.get(1), row.get(2));
    // The answer was 200: the agent is verified, as after any restart.
    assert_eq!(state, "verifying", "{outcome}");
    assert!(outcome.contains("answered 200 (its body broke off: timed out)"), "{outcome}");
    assert_eq!(
        (&detail["body"], &detail["body_truncated"], &detail["body_error"]),
        (&serde_json::json!("ok\u{FFFD}zz"), &serde_json::json!(true), &serde_json::json!("timed out"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_is_recorded_through_a_database_blip_not_abandoned() {
    let db = TestDb::migrated().await;
    let Some((relay, through)) = crate::relay::Relay::to(&db).await else { return };
    let mut settings = default_settings().recovery;
    settings.strategies = vec![strategy(
        &[IssueType::AgentUnresponsive],
        vec![command(&["/bin/sh", "-c", "sleep 1; echo restarting; echo refused >&2; exit 3"])],
    )];
    let pool = warden::db::build_pool(through, &default_settings().database).unwrap();
    let engine = Engine::new(pool, settings.clone(), &default_settings().health, "alive".into());
    let rig = Rig { db, engine, settings };
    rig.agent("blip").await;
    rig.incident("blip", IssueType::AgentUnresponsive).await;
    assert_eq!(rig.engine.tick(None).await.unwrap().started, 1);

    // The database is out of reach when the command ends, and back a few
    // seconds later; the replica never stopped.
    relay.cut();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    relay.restore();
    rig.engine.settle().await;

    let row = rig
        .db
        .client()
        .await
        .query_one("SELECT state, outcome, detail FROM warden.recovery_actions WHERE agent_id = 'blip'", &[])
        .await
        .unwrap();
    let (state, outcome, detail): (String, Option<String>, serde_json::Value) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(state, "failed", "the command's own outcome, recorded: {outcome:?}");
    assert!(outcome.as_deref().unwrap().contains("exited 3"), "{outcome:?}");
    assert_eq!((detail["exit_code"].as_i64(), detail["stdout"].as_str()), (Some(3), Some("restarting\n")));
    assert_eq!(detail["stderr"], "refused\n");
    // A definite failure moves on to the next attempt after the backoff.
    let jobs = rig.jobs("blip").await;
    assert_eq!(jobs[0].0, "pending", "{jobs:?}");
}

#[tokio::test]
async fn an_incident_resolved_while_a_claim_waits_for_its_turn_starts_nothing() {
    // Pending jobs of resolved incidents are cancelled early in a tick; an
    // incident can still resolve between that and the claim, which then
    // must not start the job. The test holds the claim lock so that the
    // resolution lands in exactly that gap.
    let rig = rig(vec![strategy(&[IssueType::AgentUnresponsive], vec![command(&["/bin/true"])])], 3).await;
    rig.agent("gap").await;
    let incident = rig.incident("gap", IssueType::AgentUnresponsive).await;
    let mut holder = rig.db.client().await;
    let held = holder.transaction().await.unwrap();
    held.execute("SELECT pg_advisory_xact_lock($1)", &[&warden::recovery::CLAIM_LOCK]).await.unwrap();

    let engine = rig.engine.clone();
    let tick = tokio::spawn(async move { engine.tick(None).await.unwrap() });
    rig.claim_waits_for_its_turn().await;
    assert_eq!(rig.jobs("gap").await, [("pending".to_string(), None)], "opened, not yet claimed");
    rig.evaluator_clears(incident).await;
    held.commit().await.unwrap();

    let report = tick.await.unwrap();
    rig.engine.settle().await;
    assert_eq!((report.opened, report.started), (1, 0), "{report:?}");
    assert!(rig.action_states("gap").await.is_empty(), "no action ran");
    // The next tick cancels it like any job of a resolved incident.
    assert_eq!(rig.tick().await.cancelled, 1);
    assert_eq!(rig.jobs("gap").await[0].0, "cancelled");
}

#[tokio::test]
async fn a_reset_takes_its_turn_after_a_claim_giving_up_another_job() {
    // A claim under way gives up the agent's second job on the attempts the
    // reset is about to forgive; the reset must see that give-up, or the
    // job stays given up (and paged) just after the operator reset.
    reset_during_a_give_up("turns", GiveUp::ByClaim).await;
}

#[tokio::test]
async fn a_reset_sees_a_give_up_committed_while_it_waited_for_the_job() {
    // A verification that fails gives its job up holding the job's row,
    // outside the claim lock; the reset must wait for it and see it.
    reset_during_a_give_up("verified", GiveUp::ByVerification).await;
}

/// Which path of the engine gives a job up while a reset runs.
enum GiveUp {
    /// A claim, in its turn on the claim lock; the job was pending.
    ByClaim,
    /// A verification, holding the job's row alone; the job was verifying.
    ByVerification,
}

/// `agent` has one job given up and another that a transaction the test
/// holds gives up `how`, while `warden recovery reset` runs: once the reset
/// waits for it, it commits, and the reset starts both jobs again.
async fn reset_during_a_give_up(agent: &str, how: GiveUp) {
    let rig =
        rig(vec![strategy(&[IssueType::AgentUnresponsive, IssueType::RestartLoop], vec![command(&["/bin/false"])])], 2)
            .await;
    rig.agent(agent).await;
    let first = rig.incident(agent, IssueType::AgentUnresponsive).await;
    let second = rig.incident(agent, IssueType::RestartLoop).await;
    let before = match how {
        GiveUp::ByClaim => "pending",
        GiveUp::ByVerification => "verifying",
    };
    rig.db
        .client()
        .await
        .execute(
            "INSERT INTO warden.recovery_jobs (incident_id, agent_id, strategy, state, finished_at, next_run_at) \
             VALUES ($1, $3, 'fix', 'exhausted', now(), now()), ($2, $3, 'fix', $4, NULL, now())",
            &[&first, &second, &agent, &before],
        )
        .await
        .unwrap();
    let mut holder = rig.db.client().await;
    let giving_up = holder.transaction().await.unwrap();
    if let GiveUp::ByClaim = how {
        giving_up.execute("SELECT pg_advisory_xact_lock($1)", &[&warden::recovery::CLAIM_LOCK]).await.unwrap();
    }
    giving_up
        .execute(
            "UPDATE warden.recovery_jobs SET state = 'exhausted', finished_at = now() WHERE incident_id = $1",
            &[&second],
        )
        .await
        .unwrap();

    let mut client = rig.db.client().await;
    let resetting = agent.to_string();
    let reset = tokio::spawn(async move { warden::recovery::reset(&mut client, &resetting).await.unwrap() });
    match how {
        GiveUp::ByClaim => rig.claim_waits_for_its_turn().await,
        GiveUp::ByVerification => {
            crate::helpers::eventually(std::time::Duration::from_secs(60), "the reset waiting for the job", || async {
                (rig.db.waiting_on_locks("%recovery_jobs%").await > 0).then_some(())
            })
            .await
        }
    }
    giving_up.commit().await.unwrap();
    assert_eq!(reset.await.unwrap(), 2, "both given-up jobs start again");
    let states: Vec<String> = rig.jobs(agent).await.into_iter().map(|j| j.0).collect();
    assert_eq!(states, ["pending", "pending"]);
}

#[tokio::test]
async fn a_manual_run_without_any_strategy_says_none_is_configured() {
    let rig = rig(Vec::new(), 3).await;
    rig.agent("plain").await;
    let mut db = rig.db.client().await;
    let err = warden::recovery::run_now(&mut db, &rig.settings, "plain", None).await.unwrap_err();
    assert!(matches!(err, ManualError::NoStrategies), "{err}");
    assert!(err.to_string().contains("[[recovery.strategies]]"), "{err}");
    // An agent that is not there is still the first thing said.
    let err = warden::recovery::run_now(&mut db, &rig.settings, "nobody", None).await.unwrap_err();
    assert!(matches!(err, ManualError::UnknownAgent(_)), "{err}");
    // Nor can an agent that is not there be reset.
    let err = warden::recovery::reset(&mut db, "nobody").await.unwrap_err();
    assert!(matches!(err, ManualError::UnknownAgent(_)), "{err}");
}

#[tokio::test]
async fn a_manual_run_of_an_alert_only_strategy_is_refused_not_queued() {
    let quiet = strategy(&[IssueType::AgentUnresponsive], vec![Action::None { name: None }]);
    let rig = rig(vec![quiet], 3).await;
    rig.agent("noop").await;
    let mut db = rig.db.client().await;
    for named in [None, Some("fix")] {
        let err = warden::recovery::run_now(&mut db, &rig.settings, "noop", named).await.unwrap_err();
        assert!(matches!(err, ManualError::AlertOnly(ref s) if s == "fix"), "{err}");
        assert!(err.to_string().contains("takes no action"), "{err}");
    }
    assert!(rig.jobs("noop").await.is_empty(), "nothing was queued");
}

#[tokio::test]
async fn a_job_stopped_by_the_budget_alone_says_what_used_it_up() {
    // One attempt per window: the restart loop's job uses it, so the next
    // incident's job gives up at once. Its page must not read as if
    // nothing had been tried.
    let rig =
        rig(vec![strategy(&[IssueType::RestartLoop, IssueType::AgentUnresponsive], vec![command(&["/bin/false"])])], 1)
            .await;
    rig.agent("spent").await;
    let looping = rig.incident("spent", IssueType::RestartLoop).await;
    rig.tick().await;
    rig.tick().await;
    assert_eq!(rig.jobs("spent").await[0].0, "exhausted");
    rig.db
        .client()
        .await
        .execute("UPDATE warden.incidents SET state = 'resolved', resolved_at = now() WHERE id = $1", &[&looping])
        .await
        .unwrap();
    let offline = rig.incident("spent", IssueType::AgentUnresponsive).await;
    rig.tick().await;
    assert_eq!(rig.action_states("spent").await, ["failed"], "no new attempt");
    let row = rig
        .db
        .client()
        .await
        .query_one(
            "SELECT message, jsonb_array_length(details->'attempts') FROM warden.system_events \
             WHERE event_type = 'recovery_failed' AND (details->>'incident_id')::bigint = $1",
            &[&offline],
        )
        .await
        .unwrap();
    let (message, listed): (String, i32) = (row.get(0), row.get(1));
    assert!(message.contains("without a new attempt"), "{message}");
    assert!(message.contains("recovery.max_attempts = 1"), "{message}");
    assert!(message.contains(&format!("command#1 attempt 1 failed (incident {looping})")), "{message}");
    assert_eq!(listed, 1, "the attempt that used the budget is in the details");
}

#[tokio::test]
async fn an_agent_not_back_fails_verification_without_waiting_out_its_issues_clearing_time() {
    // An error-rate incident's verification lasts an hour past the time to
    // be back; an agent that crashed on its way up must not wait that out.
    let rig = rig(vec![strategy(&[IssueType::HighErrorRate], vec![command(&["/bin/true"])])], 3).await;
    // "erring" is never heard from again; "late" is, but then misses a beat.
    for agent in ["erring", "late"] {
        rig.agent(agent).await;
        rig.incident(agent, IssueType::HighErrorRate).await;
    }
    let now = chrono::Utc::now();
    rig.engine.tick(Some(now)).await.unwrap();
    rig.engine.settle().await;
    assert_eq!(rig.jobs("erring").await[0].0, "verifying");
    assert_eq!(rig.jobs("late").await[0].0, "verifying");
    let db = rig.db.client().await;
    db.execute(
        "UPDATE warden.agent_status SET last_seen = now() + interval '2 seconds', liveness = 'degraded' \
         WHERE agent_id = 'late'",
        &[],
    )
    .await
    .unwrap();
    rig.engine.tick(Some(now + chrono::Duration::seconds(1))).await.unwrap();
    assert_eq!(rig.jobs("erring").await[0].0, "verifying", "it still has its time to be back");
    rig.engine.tick(Some(now + chrono::Duration::minutes(5))).await.unwrap();
    rig.engine.settle().await;
    let first: String = db
        .query_one("SELECT outcome FROM warden.recovery_actions WHERE agent_id = 'erring' ORDER BY id LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rig.action_states("erring").await[0], "failed");
    assert!(first.contains("the agent did not come back within"), "{first}");
    assert_eq!(rig.jobs("late").await[0].0, "verifying", "heard from: it keeps its time for the errors to clear");
}

#[tokio::test]
async fn an_incident_resolved_during_verification_ends_the_job_without_giving_up() {
    let mut fix = strategy(&[IssueType::AgentUnresponsive], vec![command(&["/bin/true"])]);
    fix.verify_timeout = Some(D::from_secs(60));
    let rig = rig(vec![fix], 3).await;
    rig.agent("cleared").await;
    let incident = rig.incident("cleared", IssueType::AgentUnresponsive).await;
    let now = chrono::Utc::now();
    rig.engine.tick(Some(now)).await.unwrap();
    rig.engine.settle().await;
    assert_eq!(rig.jobs("cleared").await[0].0, "verifying");
    rig.db
        .client()
        .await
        .execute(
            "UPDATE warden.incidents SET state = 'resolved', resolved_at = now(), resolution = 'condition cleared' \
             WHERE id = $1",
            &[&incident],
        )
        .await
        .unwrap();
    // The agent never came back after the action: verification fails.
    rig.engine.tick(Some(now + chrono::Duration::minutes(2))).await.unwrap();
    rig.engine.settle().await;
    assert_eq!(rig.action_states("cleared").await, ["failed"]);
    let outcome = rig
        .db
        .client()
        .await
        .query_one("SELECT outcome FROM warden.recovery_actions WHERE agent_id = 'cleared'", &[])
        .await
        .unwrap()
        .get::<_, String>(0);
    assert!(outcome.contains("within 60s of the action's end"), "{outcome}");
    let jobs = rig.jobs("cleared").await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].0, "cancelled", "{jobs:?}");
    assert!(jobs[0].1.as_deref().unwrap().contains("incident resolved meanwhile"), "{jobs:?}");
    assert_eq!(rig.count("SELECT count(*) FROM warden.system_events WHERE event_type = 'recovery_failed'").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_ends_running_actions_and_verifies_them_at_once() {
    let marker = format!("warden-interrupted-{}", std::process::id());
    let slow = Action::Command {
        name: None,
        argv: vec!["/bin/sh".into(), "-c".into(), format!("sleep 60; : {marker}")],
        timeout: D::from_secs(120),
        attempts: 1,
    };
    let mut fix = strategy(&[IssueType::AgentUnresponsive], vec![slow]);
    fix.verify_timeout = Some(D::from_secs(60));
    let rig = rig(vec![fix], 2).await;
    rig.agent("busy").await;
    rig.incident("busy", IssueType::AgentUnresponsive).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(rig.engine.clone().run(stop.clone(), std::time::Duration::from_millis(100)));
    crate::helpers::eventually(std::time::Duration::from_secs(30), "the action running", || async {
        (rig.action_states("busy").await == ["running"]).then_some(())
    })
    .await;
    stop.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(60), running).await.expect("the engine stops").unwrap();

    // Recorded at once, not left `running` under a lease until it expires;
    // whether it took effect is verified, as after a takeover.
    let db = rig.db.client().await;
    let row = db
        .query_one(
            "SELECT a.state, a.outcome, a.detail->>'interrupted', j.state, j.lease_owner, j.verify_until > now() \
             FROM warden.recovery_actions a JOIN warden.recovery_jobs j ON j.id = a.job_id WHERE a.agent_id = 'busy'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "abandoned");
    assert!(row.get::<_, String>(1).starts_with("interrupted"));
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("true"));
    assert_eq!(row.get::<_, String>(3), "verifying");
    assert_eq!(row.get::<_, Option<String>>(4), None, "no lease held");
    assert!(row.get::<_, bool>(5));
    let left = crate::procs::processes_with(&[&marker]);
    assert!(left.is_empty(), "the command's processes were ended: {left:?}");

    // The agent never came back: after the verification time the next
    // engine (after a restart) makes the second attempt.
    let pool = warden::db::build_pool(rig.db.config.clone(), &default_settings().database).unwrap();
    let next = Engine::new(pool, rig.settings.clone(), &default_settings().health, "next".into());
    let later = chrono::Utc::now() + chrono::Duration::minutes(2);
    next.tick(Some(later)).await.unwrap();
    let report = next.tick(Some(later + chrono::Duration::seconds(1))).await.unwrap();
    assert_eq!((report.started, report.exhausted), (1, 0), "{report:?}");
    let attempts: Vec<(i32, String)> = db
        .query("SELECT attempt, state FROM warden.recovery_actions WHERE agent_id = 'busy' ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(attempts, [(1, "failed".to_string()), (2, "running".to_string())], "verified, and failed");
    // End the second run too, so no sleep outlives the test.
    let done = tokio_util::sync::CancellationToken::new();
    done.cancel();
    next.run(done, std::time::Duration::ZERO).await;
}

#[tokio::test]
async fn attempts_after_a_reset_go_on_numbering_while_backoff_starts_again() {
    let rig = rig(vec![strategy(&[IssueType::AgentUnresponsive], vec![command(&["/bin/false"])])], 2).await;
    rig.agent("again").await;
    rig.incident("again", IssueType::AgentUnresponsive).await;
    for _ in 0..4 {
        rig.tick().await;
    }
    assert_eq!(rig.jobs("again").await[0].0, "exhausted");
    let mut db = rig.db.client().await;
    assert_eq!(warden::recovery::reset(&mut db, "again").await.unwrap(), 1);
    rig.tick().await;
    let numbers: Vec<i32> = db
        .query("SELECT attempt FROM warden.recovery_actions WHERE agent_id = 'again' ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(numbers, [1, 2, 3], "never a second \"attempt 1\" of one incident");
    let attempts: i32 = db.query_one("SELECT attempts FROM warden.recovery_jobs", &[]).await.unwrap().get(0);
    assert_eq!(attempts, 1, "the budget and backoff count from the reset");
}

#[tokio::test]
async fn a_lease_runs_from_the_claim_not_from_the_tick_that_waited_for_its_turn() {
    // A replica that waited for another's claim and dated its lease from
    // the tick's start wrote a lease that ended before its own idea of it:
    // another replica could take over an action still running.
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let timeout = D::from_secs(60);
    let waits = Action::Command {
        name: None,
        argv: ["/bin/sh", "-c", "while [ ! -e \"$0\" ]; do sleep 0.05; done"]
            .iter()
            .map(|a| a.to_string())
            .chain([go.display().to_string()])
            .collect(),
        timeout,
        attempts: 1,
    };
    let rig = rig(vec![strategy(&[IssueType::AgentUnresponsive], vec![waits])], 1).await;
    rig.agent("waits").await;
    rig.incident("waits", IssueType::AgentUnresponsive).await;
    let mut holder = rig.db.client().await;
    let turn = holder.transaction().await.unwrap();
    turn.execute("SELECT pg_advisory_xact_lock($1)", &[&warden::recovery::CLAIM_LOCK]).await.unwrap();
    let watcher = rig.db.client().await;
    let t: chrono::DateTime<chrono::Utc> = watcher.query_one("SELECT now()", &[]).await.unwrap().get(0);
    let engine = rig.engine.clone();
    let tick = tokio::spawn(async move { engine.tick(Some(t)).await.unwrap() });
    rig.claim_waits_for_its_turn().await;
    // The other replica's turn lasts a while; the bound below uses the time
    // it measurably lasted, whatever the machine's speed.
    let waiting_since = std::time::Instant::now();
    while waiting_since.elapsed() < std::time::Duration::from_secs(2) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let held = chrono::Duration::from_std(waiting_since.elapsed()).unwrap();
    turn.commit().await.unwrap();
    assert_eq!(tick.await.unwrap().started, 1);
    // Read while the action runs (it waits for `go`).
    let lease: chrono::DateTime<chrono::Utc> = watcher
        .query_one("SELECT lease_until FROM warden.recovery_jobs WHERE agent_id = 'waits' AND state = 'running'", &[])
        .await
        .unwrap()
        .get(0);
    std::fs::write(&go, "").unwrap();
    rig.engine.settle().await;
    let margin = chrono::Duration::from_std(rig.settings.lease_margin.get()).unwrap();
    let floor = t + held + chrono::Duration::from_std(timeout.get()).unwrap() + margin;
    assert!(lease >= floor, "lease until {lease}, at least {floor} (tick at {t}, its turn came {held} later)");
}
