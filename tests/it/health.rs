//! The evaluator against a real database, with the clock driven by the
//! test: heartbeats are ingested at chosen times through the same SQL
//! function the HTTP path uses, and cycles run at chosen `now`s.

use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use warden::health::evaluator::{self, EvalParams};
use warden::health::flap;
use warden::model::Liveness;

use crate::helpers::{TestDb, default_settings};

fn t0() -> DateTime<Utc> {
    // Today, so the heartbeat partitions exist.
    let now = Utc::now();
    now - Duration::minutes(30)
}

fn params() -> EvalParams {
    EvalParams::from_settings(&default_settings().health)
}

/// One heartbeat of `agent` received at `at`, expecting the next within
/// `interval_ms`.
async fn beat(db: &tokio_postgres::Client, agent: &str, at: DateTime<Utc>, interval_ms: i32, uptime: i64) {
    db.execute(
        "SELECT * FROM warden.ingest_heartbeats(ARRAY[$1::text], ARRAY[NULL::text], ARRAY[NULL::jsonb], \
           ARRAY[NULL::text], ARRAY['healthy'], ARRAY[$3::bigint], ARRAY[$2::int], ARRAY[NULL::timestamptz], \
           '{}', '{}', '{}', '{}', $4)",
        &[&agent, &interval_ms, &uptime, &at],
    )
    .await
    .unwrap();
}

async fn beat_with_metrics(db: &tokio_postgres::Client, agent: &str, at: DateTime<Utc>, metrics: &[(&str, f64)]) {
    let names: Vec<&str> = metrics.iter().map(|m| m.0).collect();
    let values: Vec<f64> = metrics.iter().map(|m| m.1).collect();
    let idx: Vec<i32> = vec![1; metrics.len()];
    let units: Vec<Option<&str>> = vec![None; metrics.len()];
    db.execute(
        "SELECT * FROM warden.ingest_heartbeats(ARRAY[$1::text], ARRAY[NULL::text], ARRAY[NULL::jsonb], \
           ARRAY[NULL::text], ARRAY['healthy'], ARRAY[NULL::bigint], ARRAY[10000], ARRAY[NULL::timestamptz], \
           $2, $3, $4, $5, $6)",
        &[&agent, &idx, &names, &values, &units, &at],
    )
    .await
    .unwrap();
}

async fn liveness(db: &tokio_postgres::Client, agent: &str) -> Liveness {
    let s: String =
        db.query_one("SELECT liveness FROM warden.agent_status WHERE agent_id = $1", &[&agent]).await.unwrap().get(0);
    s.parse().unwrap()
}

async fn open_issues(db: &tokio_postgres::Client, agent: Option<&str>) -> Vec<String> {
    db.query(
        "SELECT issue_type FROM warden.incidents WHERE state = 'open' AND agent_id IS NOT DISTINCT FROM $1 \
         ORDER BY issue_type",
        &[&agent],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// A first cycle before `t`: the very first cycle of an installation starts
/// a grace period, which these tests want behind them.
async fn warm_up(db: &mut tokio_postgres::Client, p: &EvalParams, t: DateTime<Utc>) {
    let r = evaluator::liveness_cycle(db, p, "test", Some(t - Duration::seconds(5))).await.unwrap();
    assert!(r.resumed, "the first cycle ever starts a grace");
}

/// Runs liveness cycles every 10 s from `from` to `to` inclusive.
async fn cycles(db: &mut tokio_postgres::Client, p: &EvalParams, from: DateTime<Utc>, to: DateTime<Utc>) {
    let mut at = from;
    while at <= to {
        evaluator::liveness_cycle(db, p, "test", Some(at)).await.unwrap();
        at += Duration::seconds(10);
    }
}

#[tokio::test]
async fn an_agent_that_stops_goes_degraded_then_offline_and_two_beats_bring_it_back() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    warm_up(&mut c, &p, t).await;
    beat(&c, "w1", t, 10_000, 1).await;

    let r = evaluator::liveness_cycle(&mut c, &p, "test", Some(t + Duration::seconds(1))).await.unwrap();
    assert_eq!(r.transitions, vec![("w1".into(), Liveness::Unknown, Liveness::Online)]);

    // 11 s of silence on a 10 s interval is within the 20% tolerance.
    evaluator::liveness_cycle(&mut c, &p, "test", Some(t + Duration::seconds(11))).await.unwrap();
    assert_eq!(liveness(&c, "w1").await, Liveness::Online);
    evaluator::liveness_cycle(&mut c, &p, "test", Some(t + Duration::seconds(12))).await.unwrap();
    assert_eq!(liveness(&c, "w1").await, Liveness::Degraded, "one interval plus tolerance");
    assert_eq!(open_issues(&c, Some("w1")).await, vec!["heartbeat_late"]);

    cycles(&mut c, &p, t + Duration::seconds(22), t + Duration::seconds(31)).await;
    assert_eq!(liveness(&c, "w1").await, Liveness::Degraded);
    evaluator::liveness_cycle(&mut c, &p, "test", Some(t + Duration::seconds(32))).await.unwrap();
    assert_eq!(liveness(&c, "w1").await, Liveness::Offline, "three intervals plus tolerance");
    assert_eq!(open_issues(&c, Some("w1")).await, vec!["agent_unresponsive"], "late is superseded");

    // The transition events carry old, new, reason and figures.
    let event: Value = c
        .query_one(
            "SELECT details FROM warden.system_events WHERE agent_id = 'w1' AND event_type = 'status_changed' \
             ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(event["old"], "degraded");
    assert_eq!(event["new"], "offline");
    assert_eq!(event["reason"], "silent");
    assert_eq!(event["figures"]["silence_ms"], 32_000);
    assert_eq!(event["figures"]["expected_interval_ms"], 10_000);

    // One heartbeat is not a recovery; two on-time ones are.
    let back = t + Duration::seconds(60);
    beat(&c, "w1", back, 10_000, 100).await;
    evaluator::liveness_cycle(&mut c, &p, "test", Some(back + Duration::seconds(1))).await.unwrap();
    assert_eq!(liveness(&c, "w1").await, Liveness::Degraded, "recovering");
    assert_eq!(open_issues(&c, Some("w1")).await, vec!["agent_unresponsive"], "still open while not trusted");
    beat(&c, "w1", back + Duration::seconds(9), 10_000, 109).await;
    evaluator::liveness_cycle(&mut c, &p, "test", Some(back + Duration::seconds(10))).await.unwrap();
    assert_eq!(liveness(&c, "w1").await, Liveness::Online);
    assert!(open_issues(&c, Some("w1")).await.is_empty());

    let resolved: i64 = c
        .query_one("SELECT count(*) FROM warden.incidents WHERE agent_id = 'w1' AND state = 'resolved'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(resolved, 2, "heartbeat_late and agent_unresponsive, each once");
    // Every incident got its alert in the same transaction, resolved with it.
    let alerts: Vec<(String, String)> = c
        .query("SELECT dedup_key, state FROM warden.alerts ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        alerts,
        vec![
            ("w1:heartbeat_late".to_string(), "resolved".to_string()),
            ("w1:agent_unresponsive".to_string(), "resolved".to_string())
        ]
    );
    let snapshots: i64 =
        c.query_one("SELECT count(*) FROM warden.health_history WHERE agent_id = 'w1'", &[]).await.unwrap().get(0);
    assert!(snapshots >= 4, "a snapshot per transition, got {snapshots}");
}

#[tokio::test]
async fn buffered_heartbeats_sent_together_are_one_beat_not_a_recovery() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    warm_up(&mut c, &p, t).await;
    beat(&c, "w1", t, 10_000, 1).await;
    cycles(&mut c, &p, t + Duration::seconds(1), t + Duration::seconds(41)).await;
    assert_eq!(liveness(&c, "w1").await, Liveness::Offline);

    // Back with two heartbeats it could not send, in one request.
    let back = t + Duration::seconds(60);
    c.execute(
        "SELECT * FROM warden.ingest_heartbeats(ARRAY['w1', 'w1'], ARRAY[NULL, NULL]::text[], \
           ARRAY[NULL, NULL]::jsonb[], ARRAY[NULL, NULL]::text[], ARRAY['healthy', 'healthy'], ARRAY[90, 100]::bigint[], \
           ARRAY[10000, 10000], ARRAY[NULL, NULL]::timestamptz[], '{}', '{}', '{}', '{}', $1)",
        &[&back],
    )
    .await
    .unwrap();
    evaluator::liveness_cycle(&mut c, &p, "test", Some(back + Duration::seconds(1))).await.unwrap();
    assert_eq!(liveness(&c, "w1").await, Liveness::Degraded, "recovering: one on-time beat so far");
    assert_eq!(open_issues(&c, Some("w1")).await, vec!["agent_unresponsive"]);
    beat(&c, "w1", back + Duration::seconds(9), 10_000, 109).await;
    evaluator::liveness_cycle(&mut c, &p, "test", Some(back + Duration::seconds(10))).await.unwrap();
    assert_eq!(liveness(&c, "w1").await, Liveness::Online);
}

#[tokio::test]
async fn a_heartbeat_committed_while_a_cycle_decides_keeps_its_agent_from_going_offline() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    warm_up(&mut c, &p, t).await;
    beat(&c, "w1", t, 10_000, 1).await;
    cycles(&mut c, &p, t + Duration::seconds(1), t + Duration::seconds(31)).await;
    assert_eq!(liveness(&c, "w1").await, Liveness::Degraded);

    // A heartbeat is being written (its row locked, not yet committed)
    // when a cycle finds the agent silent for 41 s, long enough to be
    // offline.
    let mut writer = db.client().await;
    let heartbeat = writer.transaction().await.unwrap();
    heartbeat
        .execute(
            "SELECT * FROM warden.ingest_heartbeats(ARRAY['w1'], ARRAY[NULL::text], ARRAY[NULL::jsonb], \
               ARRAY[NULL::text], ARRAY['healthy'], ARRAY[41::bigint], ARRAY[10000], ARRAY[NULL::timestamptz], \
               '{}', '{}', '{}', '{}', $1)",
            &[&(t + Duration::seconds(40))],
        )
        .await
        .unwrap();
    let cycle = {
        let p = p.clone();
        tokio::spawn(async move {
            let r = evaluator::liveness_cycle(&mut c, &p, "test", Some(t + Duration::seconds(41))).await.unwrap();
            (c, r)
        })
    };
    crate::helpers::eventually(std::time::Duration::from_secs(60), "the cycle to wait for the agent's row", || async {
        (db.waiting_on_locks("%").await > 0).then_some(())
    })
    .await;
    heartbeat.commit().await.unwrap();
    let (c, report) = cycle.await.unwrap();
    assert!(report.transitions.is_empty(), "decided on a row that changed: {:?}", report.transitions);
    assert_eq!(liveness(&c, "w1").await, Liveness::Degraded, "late, but heard from");
    let changes: i64 = c
        .query_one("SELECT count(*) FROM warden.system_events WHERE event_type = 'status_changed' AND details->>'new' = 'offline'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(changes, 0);
}

/// A heartbeat of `agent` in `mode` (its interval the mode's), at `at`.
async fn beat_in_mode(db: &tokio_postgres::Client, agent: &str, at: DateTime<Utc>, mode: &str) {
    db.execute(
        "SELECT * FROM warden.ingest_heartbeats(ARRAY[$1::text], ARRAY[NULL::text], ARRAY[NULL::jsonb], \
           ARRAY[$2::text], ARRAY['healthy'], ARRAY[NULL::bigint], ARRAY[NULL::int], ARRAY[NULL::timestamptz], \
           '{}', '{}', '{}', '{}', $3)",
        &[&agent, &mode, &at],
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn an_agent_waking_from_sleep_keeps_its_heartbeat_score() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let wake = t0();
    // Three hours asleep, a heartbeat every 15 minutes (sleep mode's
    // interval) right on time; then active, every 30 s for ten minutes.
    let mut at = wake - Duration::hours(3);
    warm_up(&mut c, &p, at).await;
    while at < wake {
        beat_in_mode(&c, "owl", at, "sleep").await;
        at += Duration::minutes(15);
    }
    while at <= wake + Duration::minutes(10) {
        beat_in_mode(&c, "owl", at, "active").await;
        at += Duration::seconds(30);
    }
    let now = wake + Duration::minutes(10) + Duration::seconds(5);
    evaluator::liveness_cycle(&mut c, &p, "test", Some(now)).await.unwrap();
    assert_eq!(liveness(&c, "owl").await, Liveness::Online);
    evaluator::score_pass(&mut c, &p, Some(now)).await.unwrap();
    let (components, mean, interval): (Value, f64, i32) = c
        .query_one(
            "SELECT components, ia_mean_ms, expected_interval_ms FROM warden.agent_status WHERE agent_id = 'owl'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .unwrap();
    assert_eq!(interval, 30_000);
    assert!((mean - 30_000.0).abs() < 100.0, "the rhythm is learnt at the new interval: {mean}");
    let cv = components["heartbeat_consistency"]["inputs"]["jitter_cv"].as_f64().unwrap();
    assert!(cv < 0.05, "every beat on time before and after the switch: {cv} ({components})");
    let delivery = components["heartbeat_consistency"]["inputs"]["delivery"].as_f64().unwrap();
    assert!(delivery > 0.97, "nothing owed was missed: {delivery} ({components})");
    let hb = components["heartbeat_consistency"]["score"].as_f64().unwrap();
    assert!(hb > 95.0, "{hb}");
}

#[tokio::test]
async fn a_long_outage_opens_extended_offline_after_five_minutes() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    warm_up(&mut c, &p, t).await;
    beat(&c, "gone", t, 10_000, 1).await;
    cycles(&mut c, &p, t + Duration::seconds(1), t + Duration::seconds(41)).await;
    assert_eq!(liveness(&c, "gone").await, Liveness::Offline);
    cycles(&mut c, &p, t + Duration::seconds(51), t + Duration::seconds(331)).await;
    assert_eq!(open_issues(&c, Some("gone")).await, vec!["agent_unresponsive"], "offline 4m59s");
    evaluator::liveness_cycle(&mut c, &p, "test", Some(t + Duration::seconds(341))).await.unwrap();
    assert_eq!(open_issues(&c, Some("gone")).await, vec!["agent_unresponsive", "extended_offline"]);
    let summary: String = c
        .query_one("SELECT summary FROM warden.incidents WHERE issue_type = 'extended_offline'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(summary, "gone has been offline for 5m");
}

#[tokio::test]
async fn a_restart_starts_a_new_on_time_run() {
    // The beats of the process a restart replaced vouch for nothing: a
    // degraded agent restarted is not back on the new process's first beat.
    let db = TestDb::migrated().await;
    let c = db.client().await;
    let t = t0();
    for (s, uptime) in [(0, 100), (10, 110), (20, 120)] {
        beat(&c, "re", t + Duration::seconds(s), 10_000, uptime).await;
    }
    let streak = "SELECT ontime_streak FROM warden.agent_status WHERE agent_id = 're'";
    assert_eq!(c.query_one(streak, &[]).await.unwrap().get::<_, i32>(0), 3);
    beat(&c, "re", t + Duration::seconds(30), 10_000, 2).await;
    assert_eq!(c.query_one(streak, &[]).await.unwrap().get::<_, i32>(0), 1, "restarted: a new run");
    beat(&c, "re", t + Duration::seconds(40), 10_000, 12).await;
    assert_eq!(c.query_one(streak, &[]).await.unwrap().get::<_, i32>(0), 2);
}

#[tokio::test]
async fn a_heartbeat_committed_after_the_cycle_that_took_its_agent_offline_counts() {
    // A flush stamps its heartbeats when it begins; one held up by another
    // agent's row lock commits after a cycle that judged this agent
    // without it. It still says the agent is back.
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    warm_up(&mut c, &p, t).await;
    beat(&c, "r5", t, 5_000, 1).await;
    cycles(&mut c, &p, t + Duration::seconds(1), t + Duration::seconds(21)).await;
    assert_eq!(liveness(&c, "r5").await, Liveness::Offline);
    // Stamped at t + 15 s, before the transition at t + 21 s.
    beat(&c, "r5", t + Duration::seconds(15), 5_000, 16).await;
    evaluator::liveness_cycle(&mut c, &p, "test", Some(t + Duration::seconds(22))).await.unwrap();
    assert_eq!(liveness(&c, "r5").await, Liveness::Degraded, "heartbeating again: recovering");
}

#[tokio::test]
async fn with_more_missed_intervals_allowed_a_beat_is_on_time_until_it_would_be_late() {
    // degraded_after_missed = 2: late past 2.2 intervals. An agent that
    // comes back beating every 1.5 intervals is never late, so its beats
    // are on time and it recovers; counted against 1.2 intervals, they
    // never were, and it stayed degraded for ever.
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    c.execute("UPDATE warden.health_params SET degraded_after_missed = 2", &[]).await.unwrap();
    let mut p = params();
    p.liveness.degraded_after_missed = 2;
    let t = t0();
    warm_up(&mut c, &p, t).await;
    beat(&c, "slow", t, 10_000, 1).await;
    evaluator::liveness_cycle(&mut c, &p, "test", Some(t + Duration::seconds(1))).await.unwrap();
    evaluator::liveness_cycle(&mut c, &p, "test", Some(t + Duration::seconds(23))).await.unwrap();
    assert_eq!(liveness(&c, "slow").await, Liveness::Degraded, "silent 2.3 intervals");
    for (i, at) in [25, 40, 55].into_iter().enumerate() {
        beat(&c, "slow", t + Duration::seconds(at), 10_000, at).await;
        evaluator::liveness_cycle(&mut c, &p, "test", Some(t + Duration::seconds(at + 1))).await.unwrap();
        if i == 0 {
            assert_eq!(liveness(&c, "slow").await, Liveness::Degraded, "one beat is no recovery");
        }
    }
    assert_eq!(liveness(&c, "slow").await, Liveness::Online, "two beats 1.5 intervals apart are on time");
}

#[tokio::test]
async fn a_pause_in_evaluation_while_heartbeats_were_stored_excuses_nobody() {
    // A cycle held up for a minute (a lock, a slow statement) while ingest
    // went on: an agent silent all along is offline at the next cycle,
    // not given a fresh grace, which pauses recurring every minute would
    // otherwise renew for ever.
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    beat(&c, "quiet", t, 10_000, 1).await;
    beat(&c, "busy", t, 10_000, 1).await;
    evaluator::liveness_cycle(&mut c, &p, "test", Some(t + Duration::seconds(1))).await.unwrap();
    for s in [10, 20, 30, 40, 50] {
        beat(&c, "busy", t + Duration::seconds(s), 10_000, 1 + s).await;
    }
    let r = evaluator::liveness_cycle(&mut c, &p, "test", Some(t + Duration::seconds(60))).await.unwrap();
    assert!(!r.resumed, "no fresh grace");
    assert_eq!(liveness(&c, "quiet").await, Liveness::Offline, "silent for 60 s of a 10 s interval");
    assert_eq!(liveness(&c, "busy").await, Liveness::Online);
    let paused = c
        .query_one(
            "SELECT message, details->>'grace' FROM warden.system_events WHERE event_type = 'evaluation_paused'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        paused.get::<_, String>(0),
        "no liveness evaluation for 59s; heartbeats were stored meanwhile, so silences count as ever"
    );
    assert_eq!(paused.get::<_, String>(1), "false");

    // Heartbeats stamped only in the last cycle's spacing are the flood
    // after a stall in which nothing was heard: a grace again.
    beat(&c, "busy", t + Duration::seconds(118), 10_000, 119).await;
    let r = evaluator::liveness_cycle(&mut c, &p, "test", Some(t + Duration::seconds(120))).await.unwrap();
    assert!(r.resumed, "nothing heard during the pause itself");
}

#[tokio::test]
async fn silence_during_wardens_own_downtime_never_counts() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    beat(&c, "a", t, 10_000, 1).await;
    evaluator::liveness_cycle(&mut c, &p, "test", Some(t + Duration::seconds(1))).await.unwrap();
    // warden is down for ten minutes; the agent went quiet meanwhile.
    let back = t + Duration::minutes(10);
    let r = evaluator::liveness_cycle(&mut c, &p, "test", Some(back)).await.unwrap();
    assert!(r.resumed);
    assert!(r.transitions.is_empty(), "no one is paged for warden's own downtime");
    evaluator::liveness_cycle(&mut c, &p, "test", Some(back + Duration::seconds(10))).await.unwrap();
    assert_eq!(liveness(&c, "a").await, Liveness::Online, "a fresh grace of one interval plus tolerance");
    evaluator::liveness_cycle(&mut c, &p, "test", Some(back + Duration::seconds(12))).await.unwrap();
    assert_eq!(liveness(&c, "a").await, Liveness::Degraded, "after the grace, silence counts");
}

#[tokio::test]
async fn heartbeats_refused_in_a_database_outage_are_not_silence() {
    // A 20 s outage: shorter than the evaluator's 30 s gap limit, so the
    // evaluator sees no gap of its own, but ingestion refused heartbeats
    // meanwhile and recorded how long.
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    let at = |s: i64| t + Duration::seconds(s);
    warm_up(&mut c, &p, t).await;
    beat(&c, "steady", t, 5_000, 1).await;
    beat(&c, "dead", t, 5_000, 1).await;
    evaluator::liveness_cycle(&mut c, &p, "test", Some(at(1))).await.unwrap();

    evaluator::record_ingest_outage(&c, std::time::Duration::from_secs(20), evaluator::OutageEnd::At(at(21)))
        .await
        .unwrap();
    beat(&c, "steady", at(22), 5_000, 22).await;
    let r = evaluator::liveness_cycle(&mut c, &p, "test", Some(at(22))).await.unwrap();
    assert!(!r.resumed, "no gap in evaluation");
    assert!(r.transitions.is_empty(), "22 s of silence, 20 of them refused: {r:?}");
    evaluator::liveness_cycle(&mut c, &p, "test", Some(at(27))).await.unwrap();
    assert_eq!(liveness(&c, "steady").await, Liveness::Online);
    assert_eq!(liveness(&c, "dead").await, Liveness::Degraded, "7 s not refused: over one interval plus tolerance");

    // Outages that keep coming do not hide an agent that stopped: only
    // their own time is left out.
    let mut dead = Vec::new();
    for k in 3..=5 {
        evaluator::record_ingest_outage(
            &c,
            std::time::Duration::from_secs(2),
            evaluator::OutageEnd::At(at(k * 10 + 2)),
        )
        .await
        .unwrap();
        beat(&c, "steady", at(k * 10 + 3), 5_000, k * 10 + 3).await;
        evaluator::liveness_cycle(&mut c, &p, "test", Some(at(k * 10 + 3))).await.unwrap();
        dead.push(liveness(&c, "dead").await);
    }
    // Offline takes 3 intervals plus tolerance (16 s) of silence: at 33 s
    // with 22 refused it has 11, at 43 s with 24 refused 19.
    assert_eq!(dead, vec![Liveness::Degraded, Liveness::Offline, Liveness::Offline]);
    assert_eq!(liveness(&c, "steady").await, Liveness::Online);
}

#[tokio::test]
async fn three_restarts_in_ten_minutes_are_a_restart_loop() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    let mut at = t;
    for uptime in [100, 5, 100, 5, 100, 5] {
        beat(&c, "loopy", at, 10_000, uptime).await;
        at += Duration::seconds(5);
    }
    evaluator::liveness_cycle(&mut c, &p, "test", Some(at)).await.unwrap();
    assert!(open_issues(&c, Some("loopy")).await.contains(&"restart_loop".to_string()));
    let summary: String = c
        .query_one("SELECT summary FROM warden.incidents WHERE issue_type = 'restart_loop'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(summary, "loopy restarted 3 times in 10m");
    // Ten quiet minutes later the loop is over (the agent kept beating).
    let mut now = at;
    for i in 1..=62 {
        now = at + Duration::seconds(10 * i);
        beat(&c, "loopy", now - Duration::seconds(1), 10_000, 200 + i).await;
        evaluator::liveness_cycle(&mut c, &p, "test", Some(now)).await.unwrap();
    }
    assert!(!open_issues(&c, Some("loopy")).await.contains(&"restart_loop".to_string()), "at {now}");
}

#[tokio::test]
async fn a_loop_slower_than_the_window_edge_stays_one_incident() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    warm_up(&mut c, &p, t).await;
    // Crashes every 4 minutes for 28 minutes: three restarts fit in the
    // 10-minute window, then two, then three again.
    let mut uptime = 1;
    for i in 0..=(28 * 6) {
        let now = t + Duration::seconds(10 * i);
        uptime = if i > 0 && i % 24 == 0 { 1 } else { uptime + 10 };
        beat(&c, "crashy", now - Duration::seconds(1), 10_000, uptime).await;
        evaluator::liveness_cycle(&mut c, &p, "test", Some(now)).await.unwrap();
    }
    let episodes: Vec<(String, Option<String>)> = c
        .query(
            "SELECT state, resolution FROM warden.incidents WHERE agent_id = 'crashy' AND issue_type = 'restart_loop'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(episodes, [("open".to_string(), None)], "one episode, not one per restart");
}

#[tokio::test]
async fn a_stray_heartbeat_does_not_end_an_extended_outage() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    warm_up(&mut c, &p, t).await;
    beat(&c, "stray", t, 10_000, 1).await;
    cycles(&mut c, &p, t + Duration::seconds(10), t + Duration::seconds(350)).await;
    assert_eq!(open_issues(&c, Some("stray")).await, vec!["agent_unresponsive", "extended_offline"]);

    // One heartbeat (recovering), then silence again (offline).
    beat(&c, "stray", t + Duration::seconds(355), 10_000, 1).await;
    cycles(&mut c, &p, t + Duration::seconds(360), t + Duration::seconds(420)).await;
    assert_eq!(liveness(&c, "stray").await, Liveness::Offline);
    let extended: Vec<String> = c
        .query("SELECT state FROM warden.incidents WHERE agent_id = 'stray' AND issue_type = 'extended_offline'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(extended, ["open"], "the same outage, still open");
}

/// From `t` (a first cycle just before it): `agent`, on a 10 s interval,
/// falls silent for fifteen seconds (degraded), then beats twice quickly
/// (online), ten times over. Returns the time of the last cycle.
async fn flap(c: &mut tokio_postgres::Client, p: &EvalParams, agent: &str, t: DateTime<Utc>) -> DateTime<Utc> {
    warm_up(c, p, t).await;
    beat(c, agent, t, 10_000, 1).await;
    let mut now = t + Duration::seconds(1);
    evaluator::liveness_cycle(c, p, "test", Some(now)).await.unwrap();
    for round in 0..10 {
        now += Duration::seconds(15);
        evaluator::liveness_cycle(c, p, "test", Some(now)).await.unwrap();
        now += Duration::seconds(5);
        beat(c, agent, now - Duration::seconds(2), 10_000, 10 + round).await;
        beat(c, agent, now - Duration::seconds(1), 10_000, 11 + round).await;
        evaluator::liveness_cycle(c, p, "test", Some(now)).await.unwrap();
    }
    now
}

#[tokio::test]
async fn an_agent_that_keeps_changing_state_is_flapping() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    flap(&mut c, &p, "flappy", t).await;
    assert!(open_issues(&c, Some("flappy")).await.contains(&"flapping".to_string()));
}

#[tokio::test]
async fn an_agent_registered_again_after_removal_does_not_inherit_its_flapping() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    let mut now = flap(&mut c, &p, "reborn", t).await;
    assert!(open_issues(&c, Some("reborn")).await.contains(&"flapping".to_string()));
    let mut pooled = db.pooled().await;
    warden::health::removal::remove(&mut pooled, "reborn", "test", Some(now)).await.unwrap();
    // Registered again at once, then one late beat: two transitions of
    // its own, not the old life's twenty.
    now += Duration::seconds(1);
    beat(&c, "reborn", now, 10_000, 1).await;
    now += Duration::seconds(1);
    evaluator::liveness_cycle(&mut c, &p, "test", Some(now)).await.unwrap();
    now += Duration::seconds(15);
    evaluator::liveness_cycle(&mut c, &p, "test", Some(now)).await.unwrap();
    assert!(!open_issues(&c, Some("reborn")).await.contains(&"flapping".to_string()));
}

#[tokio::test]
async fn a_30s_agent_that_keeps_missing_every_other_beat_is_flapping() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    warm_up(&mut c, &p, t).await;
    // Beats 60 s then 30 s apart, again and again: degraded 36 s into each
    // long gap, online again at the second on-time beat.
    let mut beats = vec![t];
    while *beats.last().unwrap() < t + Duration::minutes(20) {
        let gap = if beats.len() % 2 == 1 { 60 } else { 30 };
        beats.push(*beats.last().unwrap() + Duration::seconds(gap));
    }
    let mut next_beat = beats.iter().peekable();
    let mut now = t;
    while now <= t + Duration::minutes(20) {
        while let Some(at) = next_beat.next_if(|at| **at <= now) {
            beat(&c, "wobbly", *at, 30_000, (*at - t).num_seconds() + 1).await;
        }
        evaluator::liveness_cycle(&mut c, &p, "test", Some(now)).await.unwrap();
        now += Duration::seconds(10);
    }
    let changes: i64 = c
        .query_one("SELECT count(*) FROM warden.system_events WHERE event_type = 'status_changed'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(changes >= 20, "it did flap: {changes} transitions");
    assert!(open_issues(&c, Some("wobbly")).await.contains(&"flapping".to_string()));
}

/// Ten agents beating every 10 s from `t`, of which the first six go quiet
/// together while the other four keep beating, for 40 s of cycles. Returns
/// the agents and the time reached.
async fn six_of_ten_go_quiet(
    c: &mut tokio_postgres::Client,
    p: &EvalParams,
    prefix: &str,
    t: DateTime<Utc>,
) -> (Vec<String>, DateTime<Utc>) {
    let agents: Vec<String> = (0..10).map(|i| format!("{prefix}-{i}")).collect();
    for a in &agents {
        beat(c, a, t, 10_000, 1).await;
    }
    evaluator::liveness_cycle(c, p, "test", Some(t + Duration::seconds(1))).await.unwrap();
    let mut now = t + Duration::seconds(1);
    for _ in 0..4 {
        now += Duration::seconds(10);
        for a in &agents[6..] {
            beat(c, a, now - Duration::seconds(1), 10_000, 5).await;
        }
        evaluator::liveness_cycle(c, p, "test", Some(now)).await.unwrap();
    }
    (agents, now)
}

#[tokio::test]
async fn a_fleet_outage_is_one_incident_instead_of_many() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    let (agents, mut now) = six_of_ten_go_quiet(&mut c, &p, "fleet", t).await;
    assert_eq!(liveness(&c, "fleet-0").await, Liveness::Offline);
    assert_eq!(open_issues(&c, None).await, vec!["fleet_outage"]);
    let summary: String = c
        .query_one("SELECT summary FROM warden.incidents WHERE issue_type = 'fleet_outage'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        summary,
        "fleet outage: 6 of 10 agents went offline within 120s \
         (fleet-0, fleet-1, fleet-2, fleet-3, fleet-4 and 1 more)",
        "the page names who"
    );
    let per_agent: i64 = c
        .query_one("SELECT count(*) FROM warden.incidents WHERE state = 'open' AND agent_id IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(per_agent, 0, "the fleet incident stands in for the agents");
    let late_ever: i64 =
        c.query_one("SELECT count(*) FROM warden.incidents WHERE agent_id IS NOT NULL", &[]).await.unwrap().get(0);
    assert_eq!(late_ever, 0, "no agent was called late on the fleet's way down");

    // They come back: the outage resolves.
    for round in 0..2 {
        now += Duration::seconds(10);
        for a in &agents {
            beat(&c, a, now - Duration::seconds(2 - round), 10_000, 10 + round).await;
        }
        evaluator::liveness_cycle(&mut c, &p, "test", Some(now)).await.unwrap();
    }
    assert_eq!(liveness(&c, "fleet-0").await, Liveness::Online);
    assert!(open_issues(&c, None).await.is_empty());
}

#[tokio::test]
async fn an_agent_failing_after_a_fleet_outage_opened_gets_its_own_incident() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    // An agent on a minute's interval goes silent with the six: still
    // online when the outage opens, it goes late only later.
    beat(&c, "later-slow", t, 60_000, 1).await;
    let (agents, mut now) = six_of_ten_go_quiet(&mut c, &p, "later", t).await;
    assert_eq!(open_issues(&c, None).await, vec!["fleet_outage"]);
    assert_eq!(liveness(&c, "later-slow").await, Liveness::Online);
    // The six stay offline but for later-0, one of whose heartbeats gets
    // through (a lossy partition); of the four still beating, later-6 beats
    // once more, then stops too.
    for step in 0..6 {
        now += Duration::seconds(10);
        for a in &agents[if step == 0 { 6 } else { 7 }..] {
            beat(&c, a, now - Duration::seconds(1), 10_000, 50 + step).await;
        }
        if step == 0 {
            beat(&c, "later-0", now - Duration::seconds(1), 10_000, 50).await;
        }
        evaluator::liveness_cycle(&mut c, &p, "test", Some(now)).await.unwrap();
    }
    assert_eq!(liveness(&c, "later-0").await, Liveness::Offline);
    assert_eq!(liveness(&c, "later-6").await, Liveness::Offline);
    assert_eq!(open_issues(&c, None).await, vec!["fleet_outage"], "the outage goes on");
    assert_eq!(open_issues(&c, Some("later-6")).await, vec!["agent_unresponsive"], "it failed on its own");
    let marked: Option<i64> = c
        .query_one(
            "SELECT (details ->> 'outside_fleet_outage')::bigint FROM warden.incidents WHERE agent_id = 'later-6' AND state = 'open'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(marked.is_some(), "the incident says why it opened during the outage");
    assert!(open_issues(&c, Some("later-0")).await.is_empty(), "a heartbeat getting through is no failure of its own");
    assert!(open_issues(&c, Some("later-1")).await.is_empty(), "the outage still stands in for the six");
    assert_eq!(liveness(&c, "later-slow").await, Liveness::Degraded);
    assert!(open_issues(&c, Some("later-slow")).await.is_empty(), "silent since before the outage: one of it");
}

#[tokio::test]
async fn an_agent_phi_found_offline_needs_a_new_run_of_on_time_beats_to_be_online() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let mut p = params();
    p.liveness.detector = warden::health::liveness::Detector::Phi;
    p.liveness.phi.min_std_ms = 100.0;
    let t = t0();
    warm_up(&mut c, &p, t).await;
    // A metronome: thirteen beats 10 s apart.
    let mut at = t;
    for n in 0..13 {
        beat(&c, "metronome", at, 10_000, n).await;
        evaluator::liveness_cycle(&mut c, &p, "test", Some(at + Duration::milliseconds(10))).await.unwrap();
        at += Duration::seconds(10);
    }
    let last = at - Duration::seconds(10);
    // 11.1 s of silence is far outside its rhythm, but short of where the
    // fixed rule finds it late (12 s): degraded by phi, not yet offline.
    evaluator::liveness_cycle(&mut c, &p, "test", Some(last + Duration::milliseconds(11_100))).await.unwrap();
    assert_eq!(liveness(&c, "metronome").await, Liveness::Degraded);
    // Past that, phi's verdict stands: offline, where the fixed rule would
    // wait for 32 s.
    evaluator::liveness_cycle(&mut c, &p, "test", Some(last + Duration::milliseconds(12_100))).await.unwrap();
    assert_eq!(liveness(&c, "metronome").await, Liveness::Offline);
    // One beat is not a recovery.
    beat(&c, "metronome", last + Duration::milliseconds(12_600), 10_000, 13).await;
    evaluator::liveness_cycle(&mut c, &p, "test", Some(last + Duration::milliseconds(12_700))).await.unwrap();
    assert_eq!(liveness(&c, "metronome").await, Liveness::Degraded, "recovering, not back");
    beat(&c, "metronome", last + Duration::milliseconds(22_600), 10_000, 14).await;
    evaluator::liveness_cycle(&mut c, &p, "test", Some(last + Duration::milliseconds(22_700))).await.unwrap();
    assert_eq!(liveness(&c, "metronome").await, Liveness::Online, "two on time in a row");
}

#[tokio::test]
async fn under_phi_an_agent_slower_than_it_announces_is_on_time_within_its_rhythm() {
    // It announces 10 s and beats every 15 s: phi judges it by that rhythm
    // and finds it fine. After one late verdict its 15 s beats must count
    // as on time again, or it stays degraded for good.
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    c.execute("UPDATE warden.health_params SET detector = 'phi'", &[]).await.unwrap();
    let mut p = params();
    p.liveness.detector = warden::health::liveness::Detector::Phi;
    let t = t0();
    warm_up(&mut c, &p, t).await;
    let mut at = t;
    for n in 0..13 {
        beat(&c, "slow", at, 10_000, 15 * n).await;
        evaluator::liveness_cycle(&mut c, &p, "test", Some(at + Duration::milliseconds(10))).await.unwrap();
        at += Duration::seconds(15);
    }
    let last = at - Duration::seconds(15);
    assert_eq!(liveness(&c, "slow").await, Liveness::Online);
    // 17.3 s: outside its steady rhythm, so late by phi (short of offline).
    evaluator::liveness_cycle(&mut c, &p, "test", Some(last + Duration::milliseconds(17_300))).await.unwrap();
    assert_eq!(liveness(&c, "slow").await, Liveness::Degraded);
    beat(&c, "slow", last + Duration::milliseconds(17_500), 10_000, 300).await;
    evaluator::liveness_cycle(&mut c, &p, "test", Some(last + Duration::milliseconds(17_510))).await.unwrap();
    beat(&c, "slow", last + Duration::milliseconds(32_500), 10_000, 315).await;
    evaluator::liveness_cycle(&mut c, &p, "test", Some(last + Duration::milliseconds(32_510))).await.unwrap();
    assert_eq!(liveness(&c, "slow").await, Liveness::Online, "its own rhythm is on time");
}

#[tokio::test]
async fn a_short_restart_does_not_take_quick_agents_offline() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    evaluator::liveness_cycle(&mut c, &p, "warden-1", Some(t - Duration::seconds(20))).await.unwrap();
    for round in 0..3 {
        let at = t - Duration::seconds(10) + Duration::seconds(5 * round);
        beat(&c, "quick", at, 5_000, 10 + round).await;
        evaluator::liveness_cycle(&mut c, &p, "warden-1", Some(at + Duration::milliseconds(500))).await.unwrap();
    }
    assert_eq!(liveness(&c, "quick").await, Liveness::Online);
    // warden-1 stops; warden-2 (the same replica restarted) starts 22 s
    // later, before the agent has got through again: 23 s of silence is
    // more than three of its intervals, but warden heard nothing meanwhile.
    let back = t + Duration::milliseconds(500) + Duration::seconds(22);
    let report = evaluator::liveness_cycle(&mut c, &p, "warden-2", Some(back)).await.unwrap();
    assert!(report.resumed, "a fresh grace");
    assert_ne!(liveness(&c, "quick").await, Liveness::Offline);
    assert!(open_issues(&c, Some("quick")).await.is_empty());
    let paused = c
        .query_one("SELECT count(*) FROM warden.system_events WHERE event_type = 'evaluation_paused'", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(paused, 1, "availability counts the restart as unknown");

    // The same replica pausing as long (a slow cycle) is no restart: the
    // agent that fell silent meanwhile is offline.
    beat(&c, "quick", back, 5_000, 40).await;
    let later = back + Duration::seconds(23);
    let report = evaluator::liveness_cycle(&mut c, &p, "warden-2", Some(later)).await.unwrap();
    assert!(!report.resumed);
    assert_eq!(liveness(&c, "quick").await, Liveness::Offline);

    // Nor is a failover to a replica that was ingesting all along: another
    // agent was stored during the pause, so the agents were heard.
    for n in 0..2 {
        beat(&c, "quick", later + Duration::seconds(5 * n), 5_000, 50 + n).await;
    }
    evaluator::liveness_cycle(&mut c, &p, "warden-2", Some(later + Duration::seconds(6))).await.unwrap();
    assert_eq!(liveness(&c, "quick").await, Liveness::Online);
    let heard = later + Duration::seconds(20);
    beat(&c, "other", heard, 5_000, 1).await;
    let failover = later + Duration::seconds(30);
    let report = evaluator::liveness_cycle(&mut c, &p, "warden-3", Some(failover)).await.unwrap();
    assert!(!report.resumed, "heartbeats were stored meanwhile");
    assert_eq!(liveness(&c, "quick").await, Liveness::Offline, "silent 25 s: offline, as it was");
}

/// A replica that knows when it began taking heartbeats tells a restart
/// from a failover by that alone: heartbeats the old process stored after
/// its last cycle (while it drained, or before it was killed) do not hide
/// the restart, and a quiet fleet does not turn a failover into one.
#[tokio::test]
async fn a_restart_is_told_from_a_failover_by_when_the_new_leader_began_serving() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    let replica = |name, serving_since| evaluator::Replica { name, serving_since: Some(serving_since) };
    let one = replica("warden-1", t - Duration::minutes(5));
    evaluator::liveness_cycle(&mut c, &p, one, Some(t - Duration::seconds(20))).await.unwrap();
    for round in 0..3 {
        let at = t - Duration::seconds(10) + Duration::seconds(5 * round);
        beat(&c, "quick", at, 5_000, 10 + round).await;
        evaluator::liveness_cycle(&mut c, &p, one, Some(at + Duration::milliseconds(500))).await.unwrap();
    }
    // warden-1 stores one more beat after its last cycle, then stops;
    // warden-2 starts 20 s later.
    beat(&c, "quick", t + Duration::seconds(4), 5_000, 13).await;
    let back = t + Duration::seconds(25);
    let two = replica("warden-2", back);
    let report = evaluator::liveness_cycle(&mut c, &p, two, Some(back + Duration::milliseconds(300))).await.unwrap();
    assert!(report.resumed, "a restart, though a heartbeat was stored after the last cycle");
    assert_eq!(liveness(&c, "quick").await, Liveness::Online, "21 s of silence, but nobody was listening");
    assert!(open_issues(&c, Some("quick")).await.is_empty());

    // A restart quicker than a check interval is one too.
    beat(&c, "quick", back + Duration::seconds(1), 5_000, 1).await;
    evaluator::liveness_cycle(&mut c, &p, two, Some(back + Duration::seconds(2))).await.unwrap();
    let quick_back = back + Duration::seconds(3);
    let three = replica("warden-3", quick_back);
    let report = evaluator::liveness_cycle(&mut c, &p, three, Some(quick_back)).await.unwrap();
    assert!(report.resumed, "a one-second restart");

    // A failover to a replica serving since before the last cycle is no
    // gap, even with nothing stored meanwhile: the agent was silent.
    beat(&c, "quick", quick_back + Duration::seconds(1), 5_000, 2).await;
    evaluator::liveness_cycle(&mut c, &p, three, Some(quick_back + Duration::seconds(2))).await.unwrap();
    let four = replica("warden-4", t);
    let failover = quick_back + Duration::seconds(30);
    let report = evaluator::liveness_cycle(&mut c, &p, four, Some(failover)).await.unwrap();
    assert!(!report.resumed, "warden-4 was taking heartbeats all along");
    assert_eq!(liveness(&c, "quick").await, Liveness::Offline);

    // A container restarted keeps its host name, pid (1) and port, and so
    // its name; it began serving after the last cycle all the same.
    beat(&c, "quick", failover + Duration::seconds(1), 5_000, 3).await;
    evaluator::liveness_cycle(&mut c, &p, four, Some(failover + Duration::seconds(2))).await.unwrap();
    let before = liveness(&c, "quick").await;
    assert_ne!(before, Liveness::Offline, "heard from again");
    let restart = failover + Duration::seconds(22);
    let four_again = replica("warden-4", restart);
    let report =
        evaluator::liveness_cycle(&mut c, &p, four_again, Some(restart + Duration::milliseconds(300))).await.unwrap();
    assert!(report.resumed, "the same name, started anew");
    assert_eq!(liveness(&c, "quick").await, before, "silent 21 s while nobody was listening: no worse");
    let paused = c
        .query_one("SELECT count(*) FROM warden.system_events WHERE event_type = 'evaluation_paused'", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(paused, 3, "the three restarts, not the failover");
}

#[tokio::test]
async fn a_fleet_falling_silent_and_back_opens_nothing_but_a_lone_late_agent_is_late() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    warm_up(&mut c, &p, t).await;
    let agents: Vec<String> = (0..10).map(|i| format!("blip-{i}")).collect();
    for a in &agents {
        beat(&c, a, t, 10_000, 1).await;
    }
    evaluator::liveness_cycle(&mut c, &p, "test", Some(t + Duration::seconds(1))).await.unwrap();

    // Six fall silent long enough to be late, not offline; then all beat.
    let mut now = t + Duration::seconds(15);
    for a in &agents[6..] {
        beat(&c, a, now - Duration::seconds(5), 10_000, 2).await;
    }
    evaluator::liveness_cycle(&mut c, &p, "test", Some(now)).await.unwrap();
    assert_eq!(liveness(&c, "blip-0").await, Liveness::Degraded);
    assert!(open_issues(&c, Some("blip-0")).await.is_empty(), "a fleet going quiet is not six late agents");
    for step in 0..3 {
        now += Duration::seconds(10);
        for a in &agents {
            beat(&c, a, now - Duration::seconds(1), 10_000, 3 + step).await;
        }
        evaluator::liveness_cycle(&mut c, &p, "test", Some(now)).await.unwrap();
    }
    assert_eq!(liveness(&c, "blip-0").await, Liveness::Online);
    let ever: i64 = c.query_one("SELECT count(*) FROM warden.incidents", &[]).await.unwrap().get(0);
    assert_eq!(ever, 0, "the blip left no incident behind");

    // One agent alone falling behind is late at once.
    now += Duration::seconds(15);
    for a in &agents[1..] {
        beat(&c, a, now - Duration::seconds(1), 10_000, 10).await;
    }
    evaluator::liveness_cycle(&mut c, &p, "test", Some(now)).await.unwrap();
    assert_eq!(liveness(&c, "blip-0").await, Liveness::Degraded);
    assert_eq!(open_issues(&c, Some("blip-0")).await, vec!["heartbeat_late"]);
}

/// While a fleet goes quiet, only the agents that went quiet with it wait
/// to see whether a fleet outage stands in for them: one that has been
/// offline for minutes is a problem of its own, and churn elsewhere must
/// not hold its incidents back.
#[tokio::test]
async fn a_fleet_going_quiet_holds_back_only_the_agents_that_went_quiet_with_it() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    warm_up(&mut c, &p, t).await;
    let agents: Vec<String> = (0..10).map(|i| format!("quiet-{i}")).collect();
    for a in agents.iter().chain([&"gone".to_string()]) {
        beat(&c, a, t, 10_000, 1).await;
    }
    evaluator::liveness_cycle(&mut c, &p, "test", Some(t + Duration::seconds(1))).await.unwrap();
    // "gone" went offline long before: five minutes ago at the next cycle.
    let now = t + Duration::seconds(15);
    c.execute(
        "UPDATE warden.agent_status SET liveness = 'offline', liveness_since = $1 WHERE agent_id = 'gone'",
        &[&(now - Duration::seconds(305))],
    )
    .await
    .unwrap();
    // Six fall silent together, long enough to be late.
    for a in &agents[6..] {
        beat(&c, a, now - Duration::seconds(5), 10_000, 2).await;
    }
    evaluator::liveness_cycle(&mut c, &p, "test", Some(now)).await.unwrap();
    assert!(open_issues(&c, Some("quiet-0")).await.is_empty(), "those that went quiet together wait");
    assert!(
        open_issues(&c, Some("gone")).await.contains(&"extended_offline".to_string()),
        "{:?}",
        open_issues(&c, Some("gone")).await
    );
}

#[tokio::test]
async fn agents_coming_back_from_a_fleet_outage_are_not_late() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    let (agents, mut now) = six_of_ten_go_quiet(&mut c, &p, "back", t).await;
    assert_eq!(open_issues(&c, None).await, vec!["fleet_outage"]);

    // The partition heals: one heartbeat each so far (recovering), and the
    // fleet incident resolves.
    now += Duration::seconds(10);
    for a in &agents {
        beat(&c, a, now - Duration::seconds(1), 10_000, 10).await;
    }
    evaluator::liveness_cycle(&mut c, &p, "test", Some(now)).await.unwrap();
    assert_eq!(liveness(&c, "back-0").await, Liveness::Degraded);
    assert!(open_issues(&c, None).await.is_empty(), "the outage is over");
    // (Those that went late on the way down, before the fleet incident
    // could tell, are older and resolved by now.)
    let open_per_agent: i64 = c
        .query_one("SELECT count(*) FROM warden.incidents WHERE agent_id IS NOT NULL AND state = 'open'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(open_per_agent, 0, "no agent coming back is 'late'");

    // back-0 keeps beating, but every 20 s against its 10 s: it never gets
    // back on time, and once coming back has taken too long it is late.
    // The others are back for good.
    for step in 0..12 {
        now += Duration::seconds(10);
        for a in &agents[1..] {
            beat(&c, a, now - Duration::seconds(1), 10_000, 20 + step).await;
        }
        if step % 2 == 1 {
            beat(&c, "back-0", now - Duration::seconds(1), 10_000, 20 + step).await;
        }
        evaluator::liveness_cycle(&mut c, &p, "test", Some(now)).await.unwrap();
    }
    assert_eq!(liveness(&c, "back-0").await, Liveness::Degraded);
    assert_eq!(open_issues(&c, Some("back-0")).await, vec!["heartbeat_late"]);
    assert_eq!(open_issues(&c, Some("back-1")).await, Vec::<String>::new());
}

#[tokio::test]
async fn scores_follow_the_metrics_and_metric_issues_open() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    let mut now = t;
    // Ten minutes of beats every 10 s: cpu 95% (critical), memory 50%;
    // score passes every minute.
    let mut report = Default::default();
    for _ in 0..10 {
        for _ in 0..6 {
            beat_with_metrics(&c, "hot", now, &[("cpu_percent", 95.0), ("memory_percent", 50.0)]).await;
            now += Duration::seconds(10);
        }
        evaluator::liveness_cycle(&mut c, &p, "test", Some(now)).await.unwrap();
        // The pass reads samples up to two seconds before its clock.
        report = evaluator::score_pass(&mut c, &p, Some(now + Duration::seconds(1))).await.unwrap();
    }
    assert_eq!(report.scored, 1);
    assert_eq!(report.samples, 12, "each pass folds in the minute since the last");

    let row = c
        .query_one("SELECT score, tier, components FROM warden.agent_status WHERE agent_id = 'hot'", &[])
        .await
        .unwrap();
    let score: f64 = row.get(0);
    let components: Value = row.get(2);
    // cpu 95 → 40 − 40 × 5/10 = 20; memory 50 → 100; resources = 20.
    assert_eq!(components["resource_efficiency"]["score"], 20.0);
    assert_eq!(components["performance"]["score"], Value::Null, "no latency metric: no data");
    assert_eq!(components["performance"]["weight"], 0.0);
    // heartbeat consistency: ten minutes of every expected beat.
    let hb = components["heartbeat_consistency"]["score"].as_f64().unwrap();
    assert!(hb > 95.0, "{hb}");
    // Two components: .30 and .15 renormalised to 2/3 and 1/3.
    let expected = (hb * 0.30 + 20.0 * 0.15) / 0.45;
    assert!((score - expected).abs() < 0.02, "{score} vs {expected}");
    // (≈100 × .30 + 20 × .15) / .45 ≈ 73: good.
    assert_eq!(row.get::<_, String>(1), "good");
    assert!(components["resource_efficiency"]["recommendation"].is_string());

    assert_eq!(open_issues(&c, Some("hot")).await, vec!["resource_exhaustion"]);
    let history: i64 = c
        .query_one("SELECT count(*) FROM warden.health_history WHERE agent_id = 'hot' AND score IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(history >= 1);

    // It cools down: the incident resolves at a later pass.
    for _ in 0..10 {
        for _ in 0..6 {
            beat_with_metrics(&c, "hot", now, &[("cpu_percent", 20.0), ("memory_percent", 50.0)]).await;
            now += Duration::seconds(10);
        }
        evaluator::liveness_cycle(&mut c, &p, "test", Some(now)).await.unwrap();
        evaluator::score_pass(&mut c, &p, Some(now + Duration::seconds(1))).await.unwrap();
    }
    assert!(open_issues(&c, Some("hot")).await.is_empty());
}

async fn work_baseline(c: &tokio_postgres::Client, agent: &str) -> f64 {
    c.query_one("SELECT slow FROM warden.agent_metric_stats WHERE agent_id = $1 AND kind = 'work'", &[&agent])
        .await
        .unwrap()
        .get(0)
}

/// The work baseline (business impact's reference without a label) is the
/// agent's own rate: counted over the time its samples cover, not over the
/// pass that read them.
#[tokio::test]
async fn the_work_baseline_is_the_agents_own_rate_however_it_reports() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    // Ten tasks a second (36,000 an hour), first heard 8 s before a pass.
    evaluator::score_pass(&mut c, &p, Some(t)).await.unwrap();
    let mut now = t + Duration::seconds(52);
    for _ in 0..8 {
        beat_with_metrics(&c, "busy", now, &[("tasks", 10.0)]).await;
        now += Duration::seconds(1);
    }
    evaluator::score_pass(&mut c, &p, Some(t + Duration::seconds(62))).await.unwrap();
    let first = work_baseline(&c, "busy").await;
    assert!((first - 36_000.0).abs() < 36.0, "not the 8 s of work spread over the pass's minute: {first}");

    // 150 tasks every 15 minutes (600 an hour), passes every 5 minutes.
    let start = t + Duration::minutes(2);
    for pass in 1..=36 {
        let at = start + Duration::minutes(5 * pass);
        if pass % 3 == 1 {
            beat_with_metrics(&c, "cron", at - Duration::minutes(1), &[("tasks", 150.0)]).await;
        }
        evaluator::score_pass(&mut c, &p, Some(at)).await.unwrap();
    }
    let cron = work_baseline(&c, "cron").await;
    assert!((cron - 600.0).abs() < 1.0, "not a pass's worth of work in each pass it reports: {cron}");
    let business: Value = c
        .query_one("SELECT components -> 'business_impact' FROM warden.agent_status WHERE agent_id = 'cron'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(business["score"].as_f64().unwrap() > 80.0, "{business}");
}

#[tokio::test]
async fn a_gauge_the_agent_stopped_sending_is_no_data_rather_than_frozen() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let mut now = t0();
    for _ in 0..5 {
        for _ in 0..6 {
            beat_with_metrics(&c, "renamed", now, &[("cpu_percent", 95.0)]).await;
            now += Duration::seconds(10);
        }
        evaluator::liveness_cycle(&mut c, &p, "test", Some(now)).await.unwrap();
        evaluator::score_pass(&mut c, &p, Some(now + Duration::seconds(1))).await.unwrap();
    }
    assert_eq!(open_issues(&c, Some("renamed")).await, vec!["resource_exhaustion"]);

    // It keeps heartbeating, but no longer reports cpu_percent.
    for _ in 0..5 {
        for _ in 0..6 {
            beat(&c, "renamed", now, 10_000, 1000).await;
            now += Duration::seconds(10);
        }
        evaluator::liveness_cycle(&mut c, &p, "test", Some(now)).await.unwrap();
        evaluator::score_pass(&mut c, &p, Some(now + Duration::seconds(1))).await.unwrap();
    }
    assert!(open_issues(&c, Some("renamed")).await.is_empty());
    let components: Value =
        c.query_one("SELECT components FROM warden.agent_status WHERE agent_id = 'renamed'", &[]).await.unwrap().get(0);
    assert_eq!(components["resource_efficiency"]["score"], Value::Null, "{components}");
}

#[tokio::test]
async fn a_fleet_larger_than_one_write_is_scored_whole_and_a_failed_write_is_made_good() {
    // Scores are written SCORE_WRITE_CHUNK agents per transaction, after
    // the pass's own.
    let chunk = evaluator::SCORE_WRITE_CHUNK;
    assert!(chunk < 1234 && 1234 % chunk != 0, "the fleet spans several writes and a partial one");
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let now = t0();
    c.execute(
        "SELECT count(*) FROM warden.ingest_heartbeats( \
           (SELECT array_agg(format('fleet-%s', g)) FROM generate_series(1, 1234) g), \
           array_fill(NULL::text, ARRAY[1234]), array_fill(NULL::jsonb, ARRAY[1234]), array_fill(NULL::text, ARRAY[1234]), \
           array_fill('healthy'::text, ARRAY[1234]), array_fill(NULL::bigint, ARRAY[1234]), array_fill(10000, ARRAY[1234]), \
           array_fill(NULL::timestamptz, ARRAY[1234]), \
           (SELECT array_agg(g) FROM generate_series(1, 1234) g), array_fill('cpu_percent'::text, ARRAY[1234]), \
           array_fill(30.0::float8, ARRAY[1234]), array_fill(NULL::text, ARRAY[1234]), $1)",
        &[&now],
    )
    .await
    .unwrap();
    // One agent's row held elsewhere: its write gives up (lock_timeout),
    // the other writes go on.
    let mut other = db.client().await;
    let holder = other.transaction().await.unwrap();
    holder.execute("SELECT 1 FROM warden.agent_status WHERE agent_id = 'fleet-7' FOR UPDATE", &[]).await.unwrap();
    c.batch_execute("SET lock_timeout = '200ms'").await.unwrap();
    let report = evaluator::score_pass(&mut c, &p, Some(now + Duration::seconds(3))).await.unwrap();
    assert_eq!(report.scored, 1234);
    // The write that holds fleet-7 (a whole one, or the last, partial one).
    assert!([chunk, 1234 % chunk].contains(&report.unwritten), "{} unwritten", report.unwritten);
    let written = 1234 - report.unwritten as i64;
    assert_eq!(scored_and_snapshots(&c).await, (written, written));
    holder.rollback().await.unwrap();

    // The next pass, before any snapshot is due again, writes the rest.
    let report = evaluator::score_pass(&mut c, &p, Some(now + Duration::seconds(13))).await.unwrap();
    assert_eq!(report.unwritten, 0);
    assert_eq!(scored_and_snapshots(&c).await, (1234, 1234), "one snapshot per agent");
}

async fn scored_and_snapshots(c: &tokio_postgres::Client) -> (i64, i64) {
    let row = c
        .query_one(
            "SELECT (SELECT count(*) FROM warden.agent_status WHERE score IS NOT NULL AND history_at IS NOT NULL), \
                    (SELECT count(*) FROM warden.health_history)",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn samples_of_a_write_still_open_are_folded_in_once_it_commits() {
    // An ingest call stamps its samples with its transaction's start, and
    // may wait on row locks (a liveness cycle, a score pass) before it
    // commits. A pass in the meantime must not move past that start.
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let mut slow = db.client().await;
    let p = params();
    let tx = slow.transaction().await.unwrap();
    let started: DateTime<Utc> = tx.query_one("SELECT now()", &[]).await.unwrap().get(0);
    tx.execute(
        "SELECT * FROM warden.ingest_heartbeats(ARRAY['late-writer'], ARRAY[NULL::text], ARRAY[NULL::jsonb], \
           ARRAY[NULL::text], ARRAY['healthy'], ARRAY[NULL::bigint], ARRAY[10000], ARRAY[NULL::timestamptz], \
           ARRAY[1], ARRAY['cpu_percent'], ARRAY[95.0::float8], ARRAY[NULL::text])",
        &[],
    )
    .await
    .unwrap();

    let report = evaluator::score_pass(&mut c, &p, Some(started + Duration::seconds(10))).await.unwrap();
    assert_eq!(report.samples, 0, "not committed yet");
    tx.commit().await.unwrap();
    let report = evaluator::score_pass(&mut c, &p, Some(started + Duration::seconds(70))).await.unwrap();
    assert_eq!(report.samples, 1, "read once committed, though stamped before the first pass's clock");
}

#[tokio::test]
async fn rising_memory_opens_a_predicted_warning_with_the_crossing_time() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = Utc::now() - Duration::minutes(40);
    let mut now = t;
    // Memory climbs from 50% by one point a minute; passes run every minute.
    for minute in 0..30 {
        for s in 0..6 {
            let at = now + Duration::seconds(10 * s);
            beat_with_metrics(&c, "leaky", at, &[("memory_percent", 50.0 + minute as f64 + s as f64 / 6.0)]).await;
        }
        now += Duration::minutes(1);
        evaluator::score_pass(&mut c, &p, Some(now + Duration::seconds(2))).await.unwrap();
    }
    let row = c
        .query_one(
            "SELECT predicted, severity, details FROM warden.incidents \
             WHERE agent_id = 'leaky' AND issue_type = 'resource_exhaustion' AND state = 'open'",
            &[],
        )
        .await
        .expect("a predicted resource_exhaustion incident");
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, String>(1), "warning");
    let details: Value = row.get(2);
    let at: DateTime<Utc> = details["expected_at"].as_str().unwrap().parse().unwrap();
    // At ~80% and +1/min, 90% is about ten minutes out.
    let minutes = (at - now).num_minutes();
    assert!((5..=15).contains(&minutes), "crossing expected in {minutes} min");

    // The agent dies. Its trend says nothing more of where it is heading:
    // the prediction goes once the series is stale (three score passes),
    // not when the extrapolated crossing would have come.
    evaluator::score_pass(&mut c, &p, Some(now + Duration::minutes(4))).await.unwrap();
    let open: i64 = c
        .query_one(
            "SELECT count(*) FROM warden.incidents \
             WHERE agent_id = 'leaky' AND issue_type = 'resource_exhaustion' AND state = 'open'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 0, "no prediction from a series that stopped");
}

#[tokio::test]
async fn exactly_one_replica_leads_and_another_takes_over_when_it_stops() {
    let db = TestDb::migrated().await;
    let mut settings = default_settings();
    settings.health.check_interval = warden::config::Duration::from_millis(200);
    let p = EvalParams::from_settings(&settings.health);
    let pool = warden::db::build_pool(db.config.clone(), &settings.database).unwrap();

    let stop_a = tokio_util::sync::CancellationToken::new();
    let stop_b = tokio_util::sync::CancellationToken::new();
    let a = tokio::spawn(evaluator::run(pool.clone(), p.clone(), "replica-a".into(), stop_a.clone()));
    let c = db.client().await;
    let leader = crate::helpers::eventually(std::time::Duration::from_secs(20), "a leader", || async {
        c.query_one("SELECT leader FROM warden.evaluator_state", &[]).await.unwrap().get::<_, Option<String>>(0)
    })
    .await;
    assert_eq!(leader, "replica-a");
    let b = tokio::spawn(evaluator::run(pool.clone(), p.clone(), "replica-b".into(), stop_b.clone()));
    // While a leads, the leader lock is taken: b (or anyone) can only stand by.
    let free: bool = c.query_one("SELECT pg_try_advisory_lock($1)", &[&evaluator::LEADER_LOCK]).await.unwrap().get(0);
    assert!(!free, "the leader holds the lock");

    stop_a.cancel();
    a.await.unwrap();
    crate::helpers::eventually(std::time::Duration::from_secs(20), "replica-b to take over", || async {
        let leader: Option<String> =
            c.query_one("SELECT leader FROM warden.evaluator_state", &[]).await.unwrap().get(0);
        (leader.as_deref() == Some("replica-b")).then_some(())
    })
    .await;
    stop_b.cancel();
    b.await.unwrap();
}

#[tokio::test]
async fn the_leader_gives_up_its_connection_at_database_max_lifetime_and_leads_on_a_new_one() {
    // The leader lock lives in the leader's session, outside the pool: at
    // database.max_lifetime the leader lets it go with its connection, so
    // that after a failover no replica evaluates on against the old server.
    let db = TestDb::migrated().await;
    let mut settings = default_settings();
    settings.health.check_interval = warden::config::Duration::from_millis(100);
    let p = EvalParams::from_settings(&settings.health);
    let pool = warden::db::build_pool(db.config.clone(), &settings.database).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let leadership =
        evaluator::Leadership { max_lifetime: Some(std::time::Duration::from_secs(1)), ..Default::default() };
    let task = tokio::spawn(evaluator::run_with(pool, p, "ageing".into(), leadership, stop.clone()));
    let c = db.client().await;
    let holder = || async {
        c.query_opt(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND (classid::bigint << 32 | objid::bigint) = $1",
            &[&evaluator::LEADER_LOCK],
        )
        .await
        .unwrap()
        .map(|row| row.get::<_, i32>(0))
    };
    let first = crate::helpers::eventually(std::time::Duration::from_secs(20), "a leader", holder).await;
    let second = crate::helpers::eventually(std::time::Duration::from_secs(30), "a new leader connection", || async {
        holder().await.filter(|pid| *pid != first)
    })
    .await;
    let alive = |pid: i32| {
        let c = &c;
        async move {
            c.query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", &[&pid]).await.unwrap().get::<_, i64>(0)
        }
    };
    crate::helpers::eventually(std::time::Duration::from_secs(20), "the old connection closed", || async {
        (alive(first).await == 0).then_some(())
    })
    .await;
    // Evaluation goes on under the same replica's name.
    let cycle = || async {
        let row = c.query_one("SELECT leader, last_cycle_at FROM warden.evaluator_state", &[]).await.unwrap();
        (row.get::<_, Option<String>>(0), row.get::<_, Option<chrono::DateTime<chrono::Utc>>>(1))
    };
    let (leader, before) = cycle().await;
    assert_eq!(leader.as_deref(), Some("ageing"));
    crate::helpers::eventually(std::time::Duration::from_secs(20), "cycles on the new connection", || async {
        (cycle().await.1 > before).then_some(())
    })
    .await;
    assert_ne!(second, first);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn events_agents_post_with_warden_s_own_types_are_never_its_findings() {
    // What POST /v1/events writes (source 'agent'): a liveness change in
    // every slot flap detection looks at, and three restarts within the
    // restart-loop window, none of them true. Counted as warden's own they
    // would make the agent flapping and in a restart loop.
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let p = params();
    let t = t0();
    warm_up(&mut c, &p, t).await;
    let end = t + p.flap.slot * 25;
    let mut posted = Vec::new();
    for k in 0..flap::SLOTS as i32 {
        let (old, new) = if k % 2 == 0 { ("online", "offline") } else { ("offline", "online") };
        posted.push((end - p.flap.slot * k - p.flap.slot / 2, "status_changed", json!({"old": old, "new": new})));
    }
    for k in 1..=3 {
        posted.push((end - Duration::seconds(20 * k), "agent_restarted", json!({"previous_uptime_seconds": 100})));
    }
    for (at, kind, details) in &posted {
        c.execute(
            "INSERT INTO warden.system_events (occurred_at, agent_id, event_type, severity, message, details, source) \
             VALUES ($1, 'honest', $2, 'critical', 'posted', $3, 'agent')",
            &[at, kind, details],
        )
        .await
        .unwrap();
    }
    let mut at = t;
    while at <= end {
        beat(&c, "honest", at - Duration::seconds(1), 10_000, at.timestamp() - t.timestamp() + 1).await;
        evaluator::liveness_cycle(&mut c, &p, "test", Some(at)).await.unwrap();
        at += Duration::seconds(5);
    }
    assert_eq!(open_issues(&c, Some("honest")).await, Vec::<String>::new());
    assert_eq!(liveness(&c, "honest").await, Liveness::Online);
}

#[tokio::test]
async fn a_metric_sample_too_large_to_average_leaves_the_score_pass_running() {
    // Samples written before ingest bounded metric values: two of them
    // overflowed avg() in PostgreSQL and failed every pass, fleet-wide.
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    // The table refuses them since V24; a database from before held them.
    let refused = c
        .execute(
            "SELECT * FROM warden.ingest_heartbeats(ARRAY['x'], ARRAY[NULL], ARRAY[NULL::jsonb], ARRAY[NULL], \
               ARRAY['healthy'], ARRAY[NULL::bigint], ARRAY[NULL::integer], ARRAY[NULL::timestamptz], \
               ARRAY[1], ARRAY['cpu'], ARRAY[1e200::float8], ARRAY[NULL])",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION), "{refused}");
    c.batch_execute("ALTER TABLE warden.performance_metrics DROP CONSTRAINT performance_metrics_value_bound")
        .await
        .unwrap();
    let p = params();
    let now = t0();
    beat_with_metrics(&c, "huge", now, &[("cpu_percent", 1e300)]).await;
    beat_with_metrics(&c, "huge", now + Duration::seconds(10), &[("cpu_percent", 2.0)]).await;
    beat_with_metrics(&c, "fine", now + Duration::seconds(10), &[("cpu_percent", 20.0)]).await;
    evaluator::liveness_cycle(&mut c, &p, "test", Some(now + Duration::seconds(20))).await.unwrap();
    evaluator::score_pass(&mut c, &p, Some(now + Duration::seconds(21))).await.unwrap();
    let scored: i64 =
        c.query_one("SELECT count(*) FROM warden.agent_status WHERE score IS NOT NULL", &[]).await.unwrap().get(0);
    assert_eq!(scored, 2);
    let sampled: i64 = c
        .query_one("SELECT count(*) FROM warden.agent_metric_stats WHERE agent_id IN ('fine', 'huge')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sampled, 2, "the samples within the bound were read");
}

/// The same through the service: a warden stopped and another started on
/// its database, with a heartbeat stored after the first one's last cycle
/// (as during its drain), grants the fleet a fresh grace.
#[tokio::test]
async fn a_restarted_service_grants_a_fresh_grace() {
    use tokio_util::sync::CancellationToken;
    use warden::app::Application;
    let db = TestDb::migrated().await;
    let c = db.client().await;
    let start = || {
        let mut settings = default_settings();
        settings.database.url = warden::config::Secret::new(db.url());
        settings.database.pool_size = 4;
        settings.server.listen = "127.0.0.1:0".parse().unwrap();
        settings.server.shutdown_timeout = warden::config::Duration::from_secs(5);
        settings.health.check_interval = warden::config::Duration::from_millis(200);
        async move {
            let app = Application::build(settings).await.expect("warden starts");
            let stop = CancellationToken::new();
            (tokio::spawn(app.run(stop.clone())), stop)
        }
    };
    let last_cycle = || async {
        let row = c.query_one("SELECT last_cycle_at, leader FROM warden.evaluator_state", &[]).await.unwrap();
        row.get::<_, Option<DateTime<Utc>>>(0).zip(row.get::<_, Option<String>>(1))
    };
    let (first, stop) = start().await;
    let (_, leader) = crate::helpers::eventually(std::time::Duration::from_secs(30), "a first cycle", last_cycle).await;
    stop.cancel();
    first.await.unwrap().unwrap();
    c.batch_execute("SELECT warden.record_heartbeat('late-stored', 'active')").await.unwrap();

    let (second, stop) = start().await;
    crate::helpers::eventually(std::time::Duration::from_secs(30), "the new replica's first cycle", || async {
        last_cycle().await.filter(|(_, now_leading)| *now_leading != leader)
    })
    .await;
    let paused: i64 = c
        .query_one("SELECT count(*) FROM warden.system_events WHERE event_type = 'evaluation_paused'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(paused, 1, "a restart, though a heartbeat was stored after the last cycle");
    stop.cancel();
    second.await.unwrap().unwrap();
}
