//! The liveness state machine: unknown → online → degraded → offline and
//! back, as a pure function of an agent's presence figures and `now`.
//!
//! Rules (defaults in brackets):
//! - Silence is measured from the last heartbeat, or from the moment warden
//!   resumed evaluating after a gap in its own operation, whichever is
//!   later: warden's downtime never counts against agents. Nor do the
//!   stretches in which ingestion refused heartbeats because the database
//!   was out of reach (`Outages`), which are left out of the silence, nor
//!   heartbeats refused because warden was at capacity: silence counts
//!   from the last of them (`Presence::refused_at`).
//! - Missed intervals = (silence − tolerance × interval) / interval, the
//!   tolerance [0.2] absorbing network and scheduling jitter.
//! - Fixed detector: degraded at `degraded_after_missed` [1] missed
//!   intervals, offline at `offline_after_missed` [3].
//! - Phi detector (once an agent has `phi_min_samples` arrivals): offline
//!   at phi ≥ threshold [8], degraded at phi ≥ threshold / 2.
//! - Back to online only after `recover_after_healthy` [2] on-time
//!   heartbeats in a row; an offline agent that beats again but has not
//!   earned that is degraded ("recovering"). No flapping on one lucky beat.
//! - An unknown agent (registered, never evaluated) is online as soon as
//!   it is evaluated while fresh.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::phi::{self, ArrivalStats, PhiParams};
use crate::model::Liveness;

text_enum! {
    /// Which failure detector decides lateness.
    pub enum Detector {
        Fixed = "fixed",
        Phi = "phi",
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LivenessParams {
    pub detector: Detector,
    pub degraded_after_missed: u32,
    pub offline_after_missed: u32,
    pub recover_after_healthy: u32,
    /// Fraction of an interval a heartbeat may be late and still on time.
    pub jitter_tolerance: f64,
    pub phi: PhiParams,
}

/// What the evaluator knows of one agent's presence.
#[derive(Debug, Clone, PartialEq)]
pub struct Presence {
    pub liveness: Liveness,
    pub liveness_since: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub expected_interval_ms: i64,
    /// On-time heartbeats in a row, ending with the last one.
    pub ontime_streak: i32,
    pub arrivals: ArrivalStats,
    /// Milliseconds of the silence during which warden refused heartbeats
    /// (`Outages::within`); they do not count.
    pub refused_ms: i64,
    /// The agent's latest heartbeat refused at capacity
    /// (`warden.ingest_refusals`), if any.
    pub refused_at: Option<DateTime<Utc>>,
}

impl Presence {
    /// When the agent was last known alive: its last stored heartbeat, or
    /// a later one warden refused at capacity. A refusal holds the silence
    /// back and nothing more: coming back online takes stored heartbeats.
    pub fn last_heard(&self) -> DateTime<Utc> {
        self.refused_at.map_or(self.last_seen, |refused| refused.max(self.last_seen))
    }
}

/// When ingestion refused heartbeats because the database was out of
/// reach: sorted, overlaps merged (several writers or replicas may record
/// one outage).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outages(Vec<(DateTime<Utc>, DateTime<Utc>)>);

impl Outages {
    pub fn new(mut windows: Vec<(DateTime<Utc>, DateTime<Utc>)>) -> Self {
        windows.retain(|(from, to)| from < to);
        windows.sort();
        let mut merged: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::with_capacity(windows.len());
        for (from, to) in windows {
            match merged.last_mut() {
                Some(last) if from <= last.1 => last.1 = last.1.max(to),
                _ => merged.push((from, to)),
            }
        }
        Self(merged)
    }

    /// Milliseconds of outage between `from` and `to`.
    pub fn within(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
        self.0.iter().map(|&(a, b)| (b.min(to) - a.max(from)).num_milliseconds().max(0)).sum()
    }
}

/// Where an agent's silence starts: its last heartbeat, or warden's
/// resumption after a gap when that is later.
pub fn silence_start(last_seen: DateTime<Utc>, resumed_at: Option<DateTime<Utc>>) -> DateTime<Utc> {
    match resumed_at {
        Some(r) if r > last_seen => r,
        _ => last_seen,
    }
}

/// Why a transition happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// First evaluation after registration.
    FirstHeartbeat,
    /// Silent past the degraded threshold.
    Late,
    /// Silent past the offline threshold.
    Silent,
    /// Heartbeats again, not yet enough in a row to be trusted.
    Recovering,
    /// Enough on-time heartbeats in a row.
    Recovered,
}

/// The figures a decision rested on, recorded with every transition.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Figures {
    pub silence_ms: i64,
    pub expected_interval_ms: i64,
    pub missed_intervals: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phi: Option<f64>,
    pub ontime_streak: i32,
    pub detector: Detector,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Transition {
    pub from: Liveness,
    pub to: Liveness,
    pub reason: Reason,
    pub figures: Figures,
}

impl Transition {
    /// One line for humans, e.g. "online → degraded: silent 45.0s, expected every 30.0s: 1.3
    /// intervals missed past the jitter tolerance" (the figure the thresholds are set in).
    pub fn describe(&self) -> String {
        let f = &self.figures;
        let secs = |ms: i64| ms as f64 / 1000.0;
        let why = match self.reason {
            Reason::FirstHeartbeat => "first heartbeat".to_string(),
            Reason::Late | Reason::Silent => match f.phi {
                Some(phi) => format!("silent {:.1}s, suspicion phi {:.1}", secs(f.silence_ms), phi),
                None => format!(
                    "silent {:.1}s, expected every {:.1}s: {:.1} intervals missed past the jitter tolerance",
                    secs(f.silence_ms),
                    secs(f.expected_interval_ms),
                    f.missed_intervals
                ),
            },
            Reason::Recovering => format!("heartbeating again ({} on time in a row)", f.ontime_streak),
            Reason::Recovered => format!("{} on-time heartbeats in a row", f.ontime_streak),
        };
        format!("{} → {}: {why}", self.from, self.to)
    }
}

/// Whether the rhythm phi learned still fits the interval the agent now
/// announces (within a factor of [`RHYTHM_FACTOR`]). An agent switching
/// from 30s to sleep (15m) keeps its learned 30s for many beats; judged by
/// it, every sleep would look like death, and the reverse switch would hide
/// a real one for a quarter of an hour. Until the two agree again the
/// fixed rule, which follows the announced interval, decides.
pub fn rhythm_matches(mean_ms: f64, expected_interval_ms: i64) -> bool {
    let expected = expected_interval_ms.max(1) as f64;
    mean_ms >= expected / RHYTHM_FACTOR && mean_ms <= expected * RHYTHM_FACTOR
}

/// How long an agent heard from again after a silence takes to be online:
/// `recover_after_healthy` on-time heartbeats, so that many of its
/// intervals, plus half again (it may take a while to start).
pub fn time_to_recover(expected_interval_ms: i64, recover_after_healthy: u32) -> std::time::Duration {
    std::time::Duration::from_millis(expected_interval_ms.max(1) as u64)
        .mul_f64(f64::from(recover_after_healthy.max(1)) * 1.5)
}

/// See [`rhythm_matches`]; the evaluator's SQL pre-filter uses it too.
/// Ingest's on-time bound under phi (`warden.ingest_heartbeats`, V35)
/// uses the same factor.
pub const RHYTHM_FACTOR: f64 = 2.0;

/// How alarming the current silence is, before hysteresis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Suspicion {
    Fine,
    Late,
    Silent,
}

/// Decides whether the agent changes liveness at `now`. `resumed_at` is
/// when warden last resumed evaluating after a gap, if it did.
pub fn decide(
    agent: &Presence,
    now: DateTime<Utc>,
    resumed_at: Option<DateTime<Utc>>,
    params: &LivenessParams,
) -> Option<Transition> {
    let seen = silence_start(agent.last_heard(), resumed_at);
    let silence_ms = ((now - seen).num_milliseconds() - agent.refused_ms).max(0);
    let interval = agent.expected_interval_ms.max(1) as f64;
    let missed = ((silence_ms as f64 - params.jitter_tolerance * interval) / interval).max(0.0);
    let use_phi = params.detector == Detector::Phi
        && agent.arrivals.count >= params.phi.min_samples
        && rhythm_matches(agent.arrivals.mean_ms, agent.expected_interval_ms);
    let phi_value = use_phi.then(|| phi::phi(&agent.arrivals, silence_ms as f64, &params.phi));
    // Phi may find a metronome-steady agent silent a few seconds past its
    // interval; offline (an incident, a recovery) waits until the fixed
    // rule would at least find it late: one retransmit or stall is not
    // an outage.
    let suspicion = match phi_value {
        Some(p) if p >= params.phi.threshold && missed >= f64::from(params.degraded_after_missed) => Suspicion::Silent,
        Some(p) if p >= params.phi.threshold / 2.0 => Suspicion::Late,
        Some(_) => Suspicion::Fine,
        None if missed >= f64::from(params.offline_after_missed) => Suspicion::Silent,
        None if missed >= f64::from(params.degraded_after_missed) => Suspicion::Late,
        None => Suspicion::Fine,
    };
    let trusted = agent.ontime_streak >= params.recover_after_healthy as i32;
    // A heartbeat arrived after the last transition: the agent is speaking.
    let beat_since = agent.last_seen > agent.liveness_since;

    use Liveness::*;
    let (to, reason) = match (agent.liveness, suspicion) {
        (Unknown, Suspicion::Fine) => (Online, Reason::FirstHeartbeat),
        (Unknown, Suspicion::Late) => (Degraded, Reason::Late),
        (Unknown, Suspicion::Silent) => (Offline, Reason::Silent),
        (Online, Suspicion::Late) => (Degraded, Reason::Late),
        (Online | Degraded, Suspicion::Silent) => (Offline, Reason::Silent),
        (Degraded, Suspicion::Fine) if trusted && beat_since => (Online, Reason::Recovered),
        (Offline, Suspicion::Fine) if beat_since && trusted => (Online, Reason::Recovered),
        (Offline, Suspicion::Fine) if beat_since => (Degraded, Reason::Recovering),
        _ => return None,
    };
    Some(Transition {
        from: agent.liveness,
        to,
        reason,
        figures: Figures {
            silence_ms,
            expected_interval_ms: agent.expected_interval_ms,
            missed_intervals: (missed * 100.0).round() / 100.0,
            phi: phi_value.map(|p| (p * 100.0).round() / 100.0),
            ontime_streak: agent.ontime_streak,
            detector: if use_phi { Detector::Phi } else { Detector::Fixed },
        },
    })
}

/// The earliest silence (ms) at which an agent could become late or worse
/// under the fixed rule; the evaluator uses it to skip agents that cannot
/// possibly change. Phi may fire earlier, so with phi the evaluator also
/// considers every agent silent longer than its mean interval.
pub fn fixed_late_after_ms(expected_interval_ms: i64, params: &LivenessParams) -> f64 {
    expected_interval_ms as f64 * (f64::from(params.degraded_after_missed) + params.jitter_tolerance)
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;

    const PARAMS: LivenessParams = LivenessParams {
        detector: Detector::Fixed,
        degraded_after_missed: 1,
        offline_after_missed: 3,
        recover_after_healthy: 2,
        jitter_tolerance: 0.2,
        phi: PhiParams { threshold: 8.0, min_std_ms: 500.0, acceptable_pause_ms: 0.0, min_samples: 5 },
    };

    fn t0() -> DateTime<Utc> {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    fn agent(liveness: Liveness, last_seen_ago_s: i64, streak: i32) -> (Presence, DateTime<Utc>) {
        let now = t0() + Duration::hours(1);
        let presence = Presence {
            liveness,
            liveness_since: t0(),
            last_seen: now - Duration::seconds(last_seen_ago_s),
            expected_interval_ms: 30_000,
            ontime_streak: streak,
            arrivals: ArrivalStats { count: 0, mean_ms: 0.0, variance_ms2: 0.0 },
            refused_ms: 0,
            refused_at: None,
        };
        (presence, now)
    }

    fn next(liveness: Liveness, silent_s: i64, streak: i32) -> Option<Liveness> {
        let (a, now) = agent(liveness, silent_s, streak);
        decide(&a, now, None, &PARAMS).map(|t| t.to)
    }

    #[test]
    fn an_unknown_agent_comes_online_when_fresh() {
        assert_eq!(next(Liveness::Unknown, 1, 1), Some(Liveness::Online));
        assert_eq!(next(Liveness::Unknown, 40, 1), Some(Liveness::Degraded));
        assert_eq!(next(Liveness::Unknown, 200, 1), Some(Liveness::Offline));
    }

    #[test]
    fn online_becomes_degraded_exactly_past_one_interval_plus_tolerance() {
        assert_eq!(next(Liveness::Online, 35, 5), None, "35s < 36s");
        assert_eq!(next(Liveness::Online, 36, 5), Some(Liveness::Degraded), "1.2 × 30s");
    }

    #[test]
    fn offline_comes_after_three_missed_intervals() {
        assert_eq!(next(Liveness::Degraded, 95, 5), None, "95s < 96s");
        assert_eq!(next(Liveness::Degraded, 96, 5), Some(Liveness::Offline));
        assert_eq!(next(Liveness::Online, 100, 5), Some(Liveness::Offline), "a coarse check may skip degraded");
    }

    #[test]
    fn recovery_needs_two_on_time_heartbeats_in_a_row() {
        // Heartbeats since the transition, but only one in a row: no flapping.
        assert_eq!(next(Liveness::Degraded, 1, 1), None);
        assert_eq!(next(Liveness::Degraded, 1, 2), Some(Liveness::Online));
        assert_eq!(next(Liveness::Offline, 1, 1), Some(Liveness::Degraded), "recovering");
        assert_eq!(next(Liveness::Offline, 1, 2), Some(Liveness::Online));
    }

    #[test]
    fn no_recovery_without_a_heartbeat_after_the_transition() {
        let (mut a, now) = agent(Liveness::Degraded, 1, 5);
        a.liveness_since = a.last_seen; // the transition came after the last beat
        assert_eq!(decide(&a, now, None, &PARAMS), None);
    }

    #[test]
    fn warden_downtime_never_counts_against_agents() {
        // Silent 10 minutes, but warden resumed 20s ago: a fresh grace.
        let (a, now) = agent(Liveness::Online, 600, 5);
        assert_eq!(decide(&a, now, Some(now - Duration::seconds(20)), &PARAMS), None);
        let t = decide(&a, now, Some(now - Duration::seconds(40)), &PARAMS).unwrap();
        assert_eq!(t.to, Liveness::Degraded, "after the grace, lateness counts from the resume");
        assert_eq!(t.figures.silence_ms, 40_000);
        // A resume older than the last heartbeat changes nothing.
        let (b, now) = agent(Liveness::Online, 40, 5);
        assert_eq!(decide(&b, now, Some(now - Duration::seconds(3600)), &PARAMS).unwrap().figures.silence_ms, 40_000);
    }

    #[test]
    fn outages_merge_and_count_only_their_part_of_a_silence() {
        let at = |s: i64| t0() + Duration::seconds(s);
        let o = Outages::new(vec![(at(50), at(60)), (at(10), at(20)), (at(15), at(30)), (at(70), at(70))]);
        assert_eq!(o, Outages(vec![(at(10), at(30)), (at(50), at(60))]), "sorted, merged, empty ones dropped");
        assert_eq!(o.within(at(0), at(100)), 30_000);
        assert_eq!(o.within(at(25), at(55)), 10_000, "clipped at both ends");
        assert_eq!(o.within(at(30), at(50)), 0);
        assert_eq!(Outages::default().within(at(0), at(100)), 0);
    }

    #[test]
    fn refused_time_is_not_silence() {
        // 45 s since the last heartbeat on a 30 s interval is late, unless
        // warden refused heartbeats for 20 s of it.
        let (mut a, now) = agent(Liveness::Online, 45, 5);
        assert_eq!(decide(&a, now, None, &PARAMS).map(|t| t.to), Some(Liveness::Degraded));
        a.refused_ms = 20_000;
        assert_eq!(decide(&a, now, None, &PARAMS), None);
        // Time outside the outages still adds up: long silent, refused 20 s.
        let (mut b, now) = agent(Liveness::Online, 600, 5);
        b.refused_ms = 20_000;
        let t = decide(&b, now, None, &PARAMS).unwrap();
        assert_eq!((t.to, t.figures.silence_ms), (Liveness::Offline, 580_000));
    }

    #[test]
    fn a_heartbeat_refused_at_capacity_holds_the_silence_back_and_nothing_more() {
        // Stored 10 minutes ago, refused 10 s ago: heard 10 s ago.
        let (mut a, now) = agent(Liveness::Online, 600, 5);
        a.refused_at = Some(now - Duration::seconds(10));
        assert_eq!(decide(&a, now, None, &PARAMS), None);
        let t = decide(&a, now + Duration::seconds(30), None, &PARAMS).unwrap();
        assert_eq!((t.to, t.figures.silence_ms), (Liveness::Degraded, 40_000), "silence counts from the refusal");
        // A refusal older than the last stored heartbeat changes nothing.
        let (mut b, now) = agent(Liveness::Online, 40, 5);
        b.refused_at = Some(now - Duration::seconds(600));
        assert_eq!(decide(&b, now, None, &PARAMS).unwrap().figures.silence_ms, 40_000);
        // It does not bring an agent back: that takes heartbeats stored
        // since it went degraded or offline (5 minutes ago here).
        for liveness in [Liveness::Degraded, Liveness::Offline] {
            let (mut c, now) = agent(liveness, 600, 5);
            c.liveness_since = now - Duration::seconds(300);
            c.refused_at = Some(now - Duration::seconds(1));
            assert_eq!(decide(&c, now, None, &PARAMS), None, "{liveness} stays {liveness}");
        }
        // With refused time left out as well, both apply: silent 40 s since
        // the refusal, 20 of them without the database.
        let (mut d, now) = agent(Liveness::Online, 600, 5);
        d.refused_at = Some(now - Duration::seconds(40));
        d.refused_ms = 20_000;
        assert_eq!(decide(&d, now, None, &PARAMS), None);
    }
    #[test]
    fn transitions_carry_their_figures_and_a_description() {
        let (a, now) = agent(Liveness::Online, 45, 5);
        let t = decide(&a, now, None, &PARAMS).unwrap();
        assert_eq!(t.reason, Reason::Late);
        assert_eq!(t.figures.missed_intervals, 1.3);
        assert_eq!(
            t.describe(),
            "online → degraded: silent 45.0s, expected every 30.0s: 1.3 intervals missed past the jitter tolerance"
        );
    }

    #[test]
    fn phi_catches_a_steady_agent_before_the_fixed_rule() {
        let params = LivenessParams { detector: Detector::Phi, ..PARAMS };
        let (mut a, now) = agent(Liveness::Online, 34, 5);
        a.arrivals = ArrivalStats { count: 50, mean_ms: 30_000.0, variance_ms2: 200.0 * 200.0 };
        let t = decide(&a, now, None, &params).expect("4s late on a 200ms-steady rhythm is suspicious");
        assert_eq!(t.to, Liveness::Degraded, "not offline before the fixed rule finds it late");
        assert_eq!(t.figures.detector, Detector::Phi);
        assert_eq!(next(Liveness::Online, 34, 5), None, "the fixed rule would still wait");
        // Once the fixed rule would find it late, phi's verdict stands.
        let (mut a, now) = agent(Liveness::Degraded, 37, 5);
        a.arrivals = ArrivalStats { count: 50, mean_ms: 30_000.0, variance_ms2: 200.0 * 200.0 };
        let t = decide(&a, now, None, &params).unwrap();
        assert_eq!((t.to, t.figures.detector), (Liveness::Offline, Detector::Phi));
        assert_eq!(next(Liveness::Degraded, 37, 5), None, "the fixed rule would wait for 96 s");
    }

    #[test]
    fn phi_spares_a_jittery_agent() {
        let params = LivenessParams { detector: Detector::Phi, ..PARAMS };
        let (mut a, now) = agent(Liveness::Online, 50, 5);
        a.arrivals = ArrivalStats { count: 50, mean_ms: 30_000.0, variance_ms2: 15_000.0 * 15_000.0 };
        assert_eq!(decide(&a, now, None, &params), None, "50s is within this agent's usual wobble");
        assert_eq!(next(Liveness::Online, 50, 5), Some(Liveness::Degraded), "the fixed rule would not spare it");
    }

    #[test]
    fn phi_steps_aside_when_the_announced_interval_changes() {
        let params = LivenessParams { detector: Detector::Phi, ..PARAMS };
        // Learned every 30s, now announcing sleep (15m): 40s is nothing.
        let (mut a, now) = agent(Liveness::Online, 40, 5);
        a.expected_interval_ms = 900_000;
        a.arrivals = ArrivalStats { count: 50, mean_ms: 30_000.0, variance_ms2: 200.0 * 200.0 };
        assert_eq!(decide(&a, now, None, &params), None);
        // Learned 15m, now announcing 30s: silent for 100s is offline.
        let (mut b, now) = agent(Liveness::Online, 100, 5);
        b.arrivals = ArrivalStats { count: 50, mean_ms: 900_000.0, variance_ms2: 1000.0 * 1000.0 };
        let t = decide(&b, now, None, &params).expect("the fixed rule on the announced 30s");
        assert_eq!((t.to, t.figures.detector), (Liveness::Offline, Detector::Fixed));
    }

    #[test]
    fn phi_waits_for_enough_samples() {
        let params = LivenessParams { detector: Detector::Phi, ..PARAMS };
        let (mut a, now) = agent(Liveness::Online, 34, 5);
        a.arrivals = ArrivalStats { count: 2, mean_ms: 30_000.0, variance_ms2: 1.0 };
        assert_eq!(decide(&a, now, None, &params), None, "too few samples: fixed rule applies");
    }

    #[test]
    fn the_skip_bound_is_where_the_fixed_rule_first_fires() {
        assert_eq!(fixed_late_after_ms(30_000, &PARAMS), 36_000.0);
    }
}
