//! Escalation: what one alert needs now. Pure — a function of the alert's
//! facts, its policy, the timings and `now` — so tests drive time by hand.
//!
//! Timeline of an alert:
//! 1. Firing, not yet sent. It waits while suppressed (silence, maintenance,
//!    dependency down, covered by a fleet outage, no route) and while an
//!    automated recovery is under way, up to `hold_during_recovery` after it
//!    opened. Then it is [`Decision::Ready`]: it joins its route's group,
//!    and its first message goes out when the group flushes. A recovery that
//!    gave up makes it ready at once, skipping the hold and the group wait.
//! 2. Sent (`paged_at` set to the group's flush time). Level k is due at
//!    `paged_at + levels[k].after`; after the last level, a repeat is due
//!    every `repeat_interval`. Acknowledging stops both. A silence or
//!    maintenance window pauses them while it lasts.
//! 3. Resolved. If it was ever sent, every channel it reached gets a
//!    resolved message. If it never was and a recovery succeeded, the first
//!    level's channels get one "auto-recovered on attempt N" message instead
//!    of the page. Otherwise nothing is sent.

use chrono::{DateTime, Duration, Utc};

use super::routing::Policy;

text_enum! {
    /// Contract kinds of deliveries.
    pub enum Kind {
        Firing = "firing",
        Escalation = "escalation",
        Repeat = "repeat",
        Resolved = "resolved",
    }
}

text_enum! {
    /// Contract states of alerts.
    pub enum AlertState {
        Firing = "firing",
        Acknowledged = "acknowledged",
        Resolved = "resolved",
    }
}

/// The timings of `[alerting]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    pub group_wait: Duration,
    pub group_interval: Duration,
    pub repeat_interval: Duration,
    pub hold_during_recovery: Duration,
}

/// What is known about the alert's incident's automated recovery
/// (`warden.recovery_actions` and `recovery_failed` events).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Recovery {
    /// A recovery action is pending, running or verifying.
    pub under_way: bool,
    /// Attempt number of a recovery action that succeeded.
    pub succeeded_attempt: Option<i32>,
    /// The recovery engine gave up (a `recovery_failed` event).
    pub gave_up: bool,
    /// How many times it gave up on the incident: once, unless an operator
    /// reset the recovery (`warden recovery reset`) and it gave up again.
    /// Each give-up gets its own message.
    pub give_ups: u32,
    /// When it last gave up.
    pub gave_up_at: Option<DateTime<Utc>>,
}

/// Everything [`decide`] looks at.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    pub state: AlertState,
    pub opened_at: DateTime<Utc>,
    /// When the first message went out (the clock of escalation).
    pub paged_at: Option<DateTime<Utc>>,
    /// Policy levels notified so far.
    pub levels_done: u32,
    /// Repeats sent so far.
    pub repeats_done: u32,
    /// When the latest repeat was sent, where known.
    pub last_repeat_at: Option<DateTime<Utc>>,
    /// Why nothing may be sent now, if anything.
    pub suppressed: Option<String>,
    pub recovery: Recovery,
    /// The recovery engine's latest giving up was already acted on.
    pub gave_up_handled: bool,
    /// Channels that got a firing, escalation or repeat message.
    pub notified: Vec<String>,
}

/// Extra content of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Note {
    /// Resolved by automated recovery before anyone was paged.
    AutoRecovered { attempt: i32 },
    /// The recovery engine gave up after the alert was sent.
    RecoveryFailed,
}

/// One message to send about the alert.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub kind: Kind,
    /// Policy level (1-based); 0 for resolutions.
    pub level: u32,
    /// Repeat number; for a recovery-failed update, which give-up it tells.
    pub sequence: u32,
    pub channels: Vec<String>,
    pub note: Option<Note>,
}

/// What an alert needs now.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing now. `next`: when something becomes due without any other
    /// change; `held_until`: the recovery hold's end, while held.
    Wait { next: Option<DateTime<Utc>>, held_until: Option<DateTime<Utc>> },
    /// Ready for its first message; `urgent` skips the group wait.
    Ready { urgent: bool },
    /// Send these; the counters are the alert's new ones, and
    /// `repeated_at` the time a repeat among them stands for.
    Notify {
        notices: Vec<Notice>,
        levels_done: u32,
        repeats_done: u32,
        repeated_at: Option<DateTime<Utc>>,
        next: Option<DateTime<Utc>>,
    },
    /// Resolved: send these (maybe none) and close the alert.
    Close(Vec<Notice>),
}

/// The decision for one alert at `now`.
pub fn decide(f: &Facts, policy: &Policy, timing: &Timing, now: DateTime<Utc>) -> Decision {
    match f.state {
        // Resolved while held for a recovery still verifying (the evaluator
        // saw the condition clear first): the recovery engine credits the
        // action within a tick, and the channels then hear "auto-recovered"
        // rather than nothing.
        AlertState::Resolved
            if f.paged_at.is_none()
                && f.recovery.under_way
                && f.recovery.succeeded_attempt.is_none()
                && now < f.opened_at + timing.hold_during_recovery =>
        {
            Decision::Wait { next: Some(f.opened_at + timing.hold_during_recovery), held_until: None }
        }
        AlertState::Resolved => Decision::Close(resolution(f, policy)),
        AlertState::Acknowledged => Decision::Wait { next: None, held_until: None },
        AlertState::Firing => match f.paged_at {
            None => before_first_message(f, timing, now),
            Some(paged_at) => escalate(f, policy, timing, paged_at, now),
        },
    }
}

fn resolution(f: &Facts, policy: &Policy) -> Vec<Notice> {
    if f.paged_at.is_some() && !f.notified.is_empty() {
        return vec![Notice { kind: Kind::Resolved, level: 0, sequence: 0, channels: f.notified.clone(), note: None }];
    }
    match (f.recovery.succeeded_attempt, &f.suppressed, policy.levels.first()) {
        (Some(attempt), None, Some(first)) if f.paged_at.is_none() => vec![Notice {
            kind: Kind::Resolved,
            level: 0,
            sequence: 0,
            channels: first.channels.clone(),
            note: Some(Note::AutoRecovered { attempt }),
        }],
        _ => Vec::new(),
    }
}

fn before_first_message(f: &Facts, timing: &Timing, now: DateTime<Utc>) -> Decision {
    if f.suppressed.is_some() {
        return Decision::Wait { next: None, held_until: None };
    }
    if f.recovery.gave_up {
        return Decision::Ready { urgent: true };
    }
    let hold_end = f.opened_at + timing.hold_during_recovery;
    let recovering = f.recovery.under_way || f.recovery.succeeded_attempt.is_some();
    if recovering && now < hold_end {
        return Decision::Wait { next: Some(hold_end), held_until: Some(hold_end) };
    }
    Decision::Ready { urgent: false }
}

fn escalate(f: &Facts, policy: &Policy, timing: &Timing, paged_at: DateTime<Utc>, now: DateTime<Utc>) -> Decision {
    if f.suppressed.is_some() {
        return Decision::Wait { next: None, held_until: None };
    }
    let mut notices = Vec::new();
    let mut levels_done = f.levels_done;
    let mut repeats_done = f.repeats_done;
    let mut next = None;
    let mut repeated_at = None;
    let total = policy.levels.len() as u32;
    while levels_done < total {
        let level = &policy.levels[levels_done as usize];
        let due = paged_at + level.after;
        if due > now {
            next = Some(due);
            break;
        }
        notices.push(Notice {
            kind: if levels_done == 0 { Kind::Firing } else { Kind::Escalation },
            level: levels_done + 1,
            sequence: 0,
            channels: level.channels.clone(),
            note: None,
        });
        levels_done += 1;
    }
    if levels_done >= total && total > 0 {
        // Repeats fall on slots `repeat_interval` apart counted from the
        // latest one (the first after the last level), so that a changed
        // interval counts from the latest repeat: counted from the last
        // level, raising it after many repeats put the next one as many
        // new intervals out. When several slots are overdue (warden was
        // down, a silence) one message stands for them all, dated at the
        // last of them: alerts paged together stay on the same slots, and
        // numbered by slot they stay in one message. A repeat of unknown
        // time (sent before warden kept it) is placed where the old count
        // put it.
        let start = paged_at + policy.levels[total as usize - 1].after;
        let every = timing.repeat_interval.max(Duration::seconds(1));
        // Not before the last level, should the policy have moved it later.
        let latest = match repeats_done {
            0 => start,
            n => f.last_repeat_at.unwrap_or(start + every * n as i32).max(start),
        };
        if now >= latest + every {
            let slots = (now - latest).num_milliseconds() / every.num_milliseconds();
            let slot = latest + Duration::milliseconds(slots * every.num_milliseconds());
            let numbered = (slot - start).num_milliseconds() / every.num_milliseconds();
            // Stored as int4.
            let numbered = u32::try_from(numbered.clamp(0, i64::from(i32::MAX))).unwrap_or(0);
            repeats_done = (repeats_done + 1).max(numbered).min(i32::MAX as u32);
            notices.push(Notice {
                kind: Kind::Repeat,
                level: total,
                sequence: repeats_done,
                channels: policy.all_channels(),
                note: None,
            });
            repeated_at = Some(slot);
            next = Some(slot + every);
        } else {
            next = Some(latest + every);
        }
    }
    if f.recovery.gave_up && !f.gave_up_handled {
        // Already sent while a recovery was still being tried: tell the
        // channels reached so far that it gave up.
        let mut channels = f.notified.clone();
        for n in &notices {
            for c in &n.channels {
                if !channels.contains(c) {
                    channels.push(c.clone());
                }
            }
        }
        let fresh_page = notices.iter().any(|n| n.kind == Kind::Firing);
        if !fresh_page && !channels.is_empty() {
            notices.push(Notice {
                kind: Kind::Escalation,
                level: levels_done.max(1),
                // Numbered by give-up: the one after a reset is a message
                // of its own, not a repeat of the first.
                sequence: f.recovery.give_ups.max(1),
                channels,
                note: Some(Note::RecoveryFailed),
            });
        }
    }
    if notices.is_empty() {
        Decision::Wait { next, held_until: None }
    } else {
        Decision::Notify { notices, levels_done, repeats_done, repeated_at, next }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerting::routing::Level;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    fn policy() -> Policy {
        Policy {
            name: "p".into(),
            levels: vec![
                Level { after: Duration::zero(), channels: vec!["slack".into()] },
                Level { after: Duration::minutes(5), channels: vec!["email".into()] },
                Level { after: Duration::minutes(15), channels: vec!["email".into(), "phone".into()] },
            ],
        }
    }

    fn timing() -> Timing {
        Timing {
            group_wait: Duration::seconds(30),
            group_interval: Duration::minutes(5),
            repeat_interval: Duration::hours(4),
            hold_during_recovery: Duration::minutes(2),
        }
    }

    fn facts() -> Facts {
        Facts {
            state: AlertState::Firing,
            opened_at: t(0),
            paged_at: None,
            levels_done: 0,
            repeats_done: 0,
            last_repeat_at: None,
            suppressed: None,
            recovery: Recovery::default(),
            gave_up_handled: false,
            notified: vec![],
        }
    }

    fn kinds(d: &Decision) -> Vec<(Kind, u32, u32, Vec<String>)> {
        match d {
            Decision::Notify { notices, .. } | Decision::Close(notices) => {
                notices.iter().map(|n| (n.kind, n.level, n.sequence, n.channels.clone())).collect()
            }
            _ => vec![],
        }
    }

    #[test]
    fn a_new_alert_is_ready_and_a_suppressed_one_waits() {
        assert_eq!(decide(&facts(), &policy(), &timing(), t(1)), Decision::Ready { urgent: false });
        let f = Facts { suppressed: Some("silence:3".into()), ..facts() };
        assert_eq!(decide(&f, &policy(), &timing(), t(1)), Decision::Wait { next: None, held_until: None });
    }

    #[test]
    fn levels_escalate_on_time_from_the_first_message() {
        let p = policy();
        let mut f = Facts { paged_at: Some(t(30)), ..facts() };
        let d = decide(&f, &p, &timing(), t(30));
        assert_eq!(kinds(&d), vec![(Kind::Firing, 1, 0, vec!["slack".to_string()])]);
        let Decision::Notify { levels_done, next, .. } = d else { panic!() };
        assert_eq!((levels_done, next), (1, Some(t(330))));
        f.levels_done = 1;
        f.notified = vec!["slack".into()];
        assert_eq!(decide(&f, &p, &timing(), t(329)), Decision::Wait { next: Some(t(330)), held_until: None });
        let d = decide(&f, &p, &timing(), t(330));
        assert_eq!(kinds(&d), vec![(Kind::Escalation, 2, 0, vec!["email".to_string()])]);
    }

    #[test]
    fn overdue_levels_all_go_out_together() {
        let f = Facts { paged_at: Some(t(0)), ..facts() };
        let d = decide(&f, &policy(), &timing(), t(3600));
        let k: Vec<(Kind, u32)> = kinds(&d).into_iter().map(|(k, l, _, _)| (k, l)).collect();
        assert_eq!(k, vec![(Kind::Firing, 1), (Kind::Escalation, 2), (Kind::Escalation, 3)]);
    }

    #[test]
    fn acknowledging_stops_escalation_and_repeats() {
        let f = Facts { state: AlertState::Acknowledged, paged_at: Some(t(0)), levels_done: 1, ..facts() };
        assert_eq!(decide(&f, &policy(), &timing(), t(100_000)), Decision::Wait { next: None, held_until: None });
    }

    #[test]
    fn repeats_follow_the_last_level_every_repeat_interval() {
        let p = policy();
        let f = Facts { paged_at: Some(t(0)), levels_done: 3, notified: vec!["slack".into()], ..facts() };
        let last = 15 * 60;
        let four_h = 4 * 3600;
        assert_eq!(
            decide(&f, &p, &timing(), t(last + four_h - 1)),
            Decision::Wait { next: Some(t(last + four_h)), held_until: None }
        );
        let d = decide(&f, &p, &timing(), t(last + four_h));
        assert_eq!(
            kinds(&d),
            vec![(Kind::Repeat, 3, 1, vec!["slack".to_string(), "email".to_string(), "phone".to_string()])]
        );
        // Three intervals overdue: one message, numbered and dated as the
        // third, so that alerts paged together stay together.
        let d = decide(&f, &p, &timing(), t(last + 3 * four_h + 5));
        let Decision::Notify { repeats_done, notices, repeated_at, next, .. } = d else { panic!() };
        assert_eq!((repeats_done, notices.len()), (3, 1));
        assert_eq!((repeated_at, next), (Some(t(last + 3 * four_h)), Some(t(last + 4 * four_h))));
        // One of them silenced over the first slot repeats with the others
        // at the second, under the same number.
        let behind = Facts { repeats_done: 1, last_repeat_at: Some(t(last + four_h)), ..f.clone() };
        let missed = Facts { repeats_done: 0, ..f };
        for f in [behind, missed] {
            let Decision::Notify { notices, repeated_at, .. } = decide(&f, &p, &timing(), t(last + 2 * four_h + 9))
            else {
                panic!()
            };
            assert_eq!((notices[0].sequence, repeated_at), (2, Some(t(last + 2 * four_h))));
        }
    }

    #[test]
    fn a_last_level_moved_later_restarts_the_repeats_from_it() {
        // Repeated twice after a 15-minute last level, then the policy's last
        // level is moved to a day.
        let mut p = policy();
        let four_h = Duration::hours(4);
        let f = Facts {
            paged_at: Some(t(0)),
            levels_done: 3,
            repeats_done: 2,
            last_repeat_at: Some(t(15 * 60) + four_h * 2),
            ..facts()
        };
        p.levels[2].after = Duration::hours(24);
        assert_eq!(
            decide(&f, &p, &timing(), t(12 * 3600)),
            Decision::Wait { next: Some(t(28 * 3600)), held_until: None }
        );
        let Decision::Notify { repeats_done, notices, .. } = decide(&f, &p, &timing(), t(28 * 3600)) else { panic!() };
        assert_eq!((repeats_done, notices[0].sequence), (3, 3), "numbered on from the count, never below it");
    }

    #[test]
    fn a_raised_repeat_interval_counts_from_the_latest_repeat() {
        let p = policy();
        let last = 15 * 60;
        let four_h = 4 * 3600;
        // Ten repeats at 4 h, the latest just now; then raised to a day.
        let latest = t(last + 10 * four_h);
        let f =
            Facts { paged_at: Some(t(0)), levels_done: 3, repeats_done: 10, last_repeat_at: Some(latest), ..facts() };
        let day = Timing { repeat_interval: Duration::hours(24), ..timing() };
        assert_eq!(
            decide(&f, &p, &day, latest + Duration::hours(1)),
            Decision::Wait { next: Some(latest + Duration::hours(24)), held_until: None }
        );
        let Decision::Notify { repeats_done, notices, .. } = decide(&f, &p, &day, latest + Duration::hours(24)) else {
            panic!()
        };
        assert_eq!((repeats_done, notices[0].sequence), (11, 11));
        // Lowered to an hour: due an hour after the latest.
        let hour = Timing { repeat_interval: Duration::hours(1), ..timing() };
        assert!(matches!(decide(&f, &p, &hour, latest + Duration::hours(1)), Decision::Notify { .. }));
        // Repeated before its time was kept: where the count put it.
        let unknown = Facts { last_repeat_at: None, ..f };
        assert_eq!(
            decide(&unknown, &p, &timing(), latest + Duration::hours(1)),
            Decision::Wait { next: Some(latest + Duration::hours(4)), held_until: None }
        );
    }

    #[test]
    fn a_silence_pauses_escalation_while_it_lasts() {
        let f = Facts { paged_at: Some(t(0)), levels_done: 1, suppressed: Some("silence:1".into()), ..facts() };
        assert_eq!(decide(&f, &policy(), &timing(), t(400)), Decision::Wait { next: None, held_until: None });
        let f = Facts { suppressed: None, ..f };
        assert_eq!(kinds(&decide(&f, &policy(), &timing(), t(400)))[0].0, Kind::Escalation);
    }

    #[test]
    fn a_recovery_under_way_holds_the_page_until_the_hold_ends() {
        let f = Facts { recovery: Recovery { under_way: true, ..Recovery::default() }, ..facts() };
        assert_eq!(
            decide(&f, &policy(), &timing(), t(60)),
            Decision::Wait { next: Some(t(120)), held_until: Some(t(120)) }
        );
        assert_eq!(decide(&f, &policy(), &timing(), t(120)), Decision::Ready { urgent: false }, "the hold expired");
        let failed = Facts { recovery: Recovery { under_way: false, gave_up: true, ..Recovery::default() }, ..facts() };
        assert_eq!(decide(&failed, &policy(), &timing(), t(5)), Decision::Ready { urgent: true });
    }

    #[test]
    fn resolved_after_a_succeeded_recovery_sends_auto_recovered_instead_of_the_page() {
        let f = Facts {
            state: AlertState::Resolved,
            recovery: Recovery { succeeded_attempt: Some(2), ..Recovery::default() },
            ..facts()
        };
        let Decision::Close(notices) = decide(&f, &policy(), &timing(), t(60)) else { panic!() };
        assert_eq!(notices.len(), 1);
        assert_eq!(notices[0].note, Some(Note::AutoRecovered { attempt: 2 }));
        assert_eq!(notices[0].channels, vec!["slack".to_string()]);
    }

    #[test]
    fn resolved_while_a_recovery_verifies_waits_for_its_credit_within_the_hold() {
        let verifying = Facts {
            state: AlertState::Resolved,
            recovery: Recovery { under_way: true, ..Recovery::default() },
            ..facts()
        };
        let hold_end = t(0) + timing().hold_during_recovery;
        assert_eq!(
            decide(&verifying, &policy(), &timing(), t(30)),
            Decision::Wait { next: Some(hold_end), held_until: None }
        );
        assert_eq!(decide(&verifying, &policy(), &timing(), hold_end), Decision::Close(vec![]), "not past the hold");
        let credited = Facts {
            recovery: Recovery { under_way: true, succeeded_attempt: Some(1), ..Recovery::default() },
            ..verifying
        };
        let Decision::Close(notices) = decide(&credited, &policy(), &timing(), t(31)) else { panic!() };
        assert_eq!(notices[0].note, Some(Note::AutoRecovered { attempt: 1 }));
    }

    #[test]
    fn resolution_goes_to_every_channel_that_was_notified_and_nowhere_else() {
        let f = Facts {
            state: AlertState::Resolved,
            paged_at: Some(t(0)),
            levels_done: 2,
            notified: vec!["slack".into(), "email".into()],
            ..facts()
        };
        assert_eq!(
            kinds(&decide(&f, &policy(), &timing(), t(900))),
            vec![(Kind::Resolved, 0, 0, vec!["slack".to_string(), "email".to_string()])]
        );
        let never = Facts { state: AlertState::Resolved, suppressed: Some("dependency:db".into()), ..facts() };
        assert_eq!(decide(&never, &policy(), &timing(), t(900)), Decision::Close(vec![]));
    }

    #[test]
    fn a_recovery_giving_up_after_the_page_tells_the_channels_reached() {
        let f = Facts {
            paged_at: Some(t(0)),
            levels_done: 1,
            notified: vec!["slack".into()],
            recovery: Recovery { gave_up: true, ..Recovery::default() },
            ..facts()
        };
        let d = decide(&f, &policy(), &timing(), t(60));
        let Decision::Notify { notices, .. } = d else { panic!("{d:?}") };
        assert_eq!(notices[0].note, Some(Note::RecoveryFailed));
        assert_eq!(notices[0].channels, vec!["slack".to_string()]);
        assert_eq!(notices[0].sequence, 1);
        let told = Facts { gave_up_handled: true, ..f.clone() };
        assert_eq!(decide(&told, &policy(), &timing(), t(61)), Decision::Wait { next: Some(t(300)), held_until: None });
        // Reset by an operator, the recovery gave up again: a message of its
        // own, which the ledger does not take for the first one.
        let again = Facts { recovery: Recovery { gave_up: true, give_ups: 2, ..Recovery::default() }, ..f };
        let Decision::Notify { notices, .. } = decide(&again, &policy(), &timing(), t(900)) else { panic!() };
        let update = notices.iter().find(|n| n.note == Some(Note::RecoveryFailed)).expect("a recovery-failed update");
        assert_eq!(update.sequence, 2);
    }
}
