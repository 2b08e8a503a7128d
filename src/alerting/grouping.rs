//! Storm control: alerts of one route that become ready close together go
//! out as one message per channel.
//!
//! A route has at most one pending group. The first ready alert opens it,
//! flushing `group_wait` later — or, if the route's previous group flushed
//! less than `group_interval` ago, no sooner than `group_interval` after
//! that flush. Alerts that become ready before the flush join it. So a burst
//! of 20 agents going offline is one message, and a trickle after it is at
//! most one message per `group_interval`. Pure functions; the escalator
//! keeps the groups in `warden.alert_groups`.

use chrono::{DateTime, Utc};

use super::escalation::Timing;

/// When a new group of a route opened at `now` flushes.
pub fn flush_time(now: DateTime<Utc>, last_flush: Option<DateTime<Utc>>, timing: &Timing) -> DateTime<Utc> {
    let wait = now + timing.group_wait;
    match last_flush {
        Some(last) => wait.max(last + timing.group_interval),
        None => wait,
    }
}

/// How an issue type reads after "N agents": "14 agents offline".
pub fn issue_phrase(issue: &str) -> &str {
    match issue {
        "agent_unresponsive" => "offline",
        "heartbeat_late" => "late with heartbeats",
        "extended_offline" => "offline for a long time",
        "restart_loop" => "in a restart loop",
        "flapping" => "flapping",
        "high_error_rate" => "with a high error rate",
        "resource_exhaustion" => "running out of resources",
        "performance_degradation" => "with degraded performance",
        "fleet_outage" => "in a fleet outage",
        "channel_failing" => "failing",
        other => other,
    }
}

/// The headline of a message about several alerts: "14 agents offline:
/// a, b, c and 11 more" when they share an issue, else a count per issue.
pub fn group_headline(items: &[(Option<&str>, &str)], listed: usize) -> String {
    let n = items.len();
    let first_issue = items.first().map(|i| i.1).unwrap_or_default();
    let names: Vec<&str> = items.iter().map(|i| i.0.unwrap_or("fleet")).collect();
    let shown = names.iter().take(listed).copied().collect::<Vec<_>>().join(", ");
    let more = if n > listed { format!(" and {} more", n - listed) } else { String::new() };
    if items.iter().all(|i| i.1 == first_issue) {
        let noun = if first_issue == "channel_failing" { "channels" } else { "agents" };
        format!("{n} {noun} {}: {shown}{more}", issue_phrase(first_issue))
    } else {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for (_, issue) in items {
            match counts.iter_mut().find(|c| c.0 == *issue) {
                Some(c) => c.1 += 1,
                None => counts.push((issue, 1)),
            }
        }
        let parts: Vec<String> = counts.iter().map(|(i, c)| format!("{c} {i}")).collect();
        format!("{n} alerts ({}): {shown}{more}", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;

    fn timing() -> Timing {
        Timing {
            group_wait: Duration::seconds(30),
            group_interval: Duration::minutes(5),
            repeat_interval: Duration::hours(4),
            hold_during_recovery: Duration::minutes(2),
        }
    }

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    #[test]
    fn a_first_group_waits_group_wait_and_later_ones_respect_group_interval() {
        assert_eq!(flush_time(t(0), None, &timing()), t(30));
        assert_eq!(flush_time(t(40), Some(t(30)), &timing()), t(330), "at most every group_interval");
        assert_eq!(flush_time(t(1000), Some(t(30)), &timing()), t(1030), "a quiet route waits group_wait only");
    }

    #[test]
    fn headlines_count_and_name_the_alerts() {
        let items: Vec<(Option<&str>, &str)> =
            (0..14).map(|i| (Some(["a", "b", "c", "d"][i % 4]), "agent_unresponsive")).collect();
        assert_eq!(group_headline(&items, 3), "14 agents offline: a, b, c and 11 more");
        let mixed = [(Some("a"), "agent_unresponsive"), (Some("b"), "heartbeat_late"), (None, "agent_unresponsive")];
        assert_eq!(group_headline(&mixed, 5), "3 alerts (2 agent_unresponsive, 1 heartbeat_late): a, b, fleet");
    }
}
