//! The public status page, `/status` (with `console.public_status`).
//!
//! What it publishes, and nothing more: per group of agents (the values of
//! the label `console.status_group_label`), whether it is up, degraded or
//! down now, its uptime over `console.status_uptime_days` and per day, and
//! the open problems of the group in plain words. No agent ids, names,
//! labels other than the group label, hosts, messages, incident summaries
//! or counts of agents. Predicted incidents are not shown (nothing has
//! failed yet).
//!
//! Uptime reuses the reporting definitions of migrations/V6__reporting.sql
//! (up = online + degraded, down = offline, unknown excluded): the total is
//! `warden.liveness_time(since, until)` summed over the group's agents,
//! time-weighted; the daily bars clip `warden.liveness_spans` to each
//! UTC day, and read the days retention has written to
//! `warden.liveness_days` (final days, the same figures) instead of
//! computing them again. Both read the liveness transitions in `system_events`, kept for
//! `retention.transitions` (400 days by default): one row per change of
//! state is smaller than any rollup and exact, where the heartbeat rollups
//! only count beats and cannot say when an agent was down.
//!
//! The page needs no key, so it is computed at most once per
//! `console.status_cache` per replica and served from memory in between.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, NaiveDate, Utc};
use maud::{DOCTYPE, Markup, html};

use super::format;
use crate::config::ConsoleSettings;
use crate::db::DbError;

/// A group's state now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GroupState {
    Down,
    Degraded,
    Up,
    NoData,
}

impl GroupState {
    /// From the group's agents by liveness: every known agent offline is
    /// down; any offline or degraded is degraded; all online is up; none
    /// known yet is no data.
    pub fn of(online: i64, degraded: i64, offline: i64) -> Self {
        let known = online + degraded + offline;
        if known == 0 {
            GroupState::NoData
        } else if offline == known {
            GroupState::Down
        } else if offline > 0 || degraded > 0 {
            GroupState::Degraded
        } else {
            GroupState::Up
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            GroupState::Up => "Up",
            GroupState::Degraded => "Degraded",
            GroupState::Down => "Down",
            GroupState::NoData => "No data",
        }
    }

    fn class(self) -> &'static str {
        match self {
            GroupState::Up => "st-up",
            GroupState::Degraded => "st-degraded",
            GroupState::Down => "st-down",
            GroupState::NoData => "st-none",
        }
    }
}

/// Plain words for an open problem of a group, from its issue type. Several
/// issue types share words (offline and offline for long).
pub fn plain_words(issue: &str) -> &'static str {
    match issue {
        "agent_unresponsive" | "extended_offline" => "Some systems are not responding",
        "heartbeat_late" => "Some systems are responding late",
        "restart_loop" => "Some systems are restarting repeatedly",
        "flapping" => "Service is intermittent",
        "high_error_rate" => "Elevated error rates",
        "resource_exhaustion" => "Running close to capacity",
        "performance_degradation" => "Slower than usual",
        "fleet_outage" => "A widespread outage is affecting many services",
        _ => "A problem is being looked into",
    }
}

/// One day's bar: the day and its uptime percent (None: nothing observed).
#[derive(Debug, Clone)]
pub struct Day {
    pub date: NaiveDate,
    pub pct: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub state: GroupState,
    pub uptime: Option<f64>,
    pub days: Vec<Day>,
    /// Open problems: plain words and since when.
    pub problems: Vec<(&'static str, DateTime<Utc>)>,
}

/// Everything the page shows, computed at `generated_at`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub generated_at: DateTime<Utc>,
    pub groups: Vec<Group>,
    /// Problems not tied to one group (a fleet outage).
    pub general: Vec<(&'static str, DateTime<Utc>)>,
}

impl Snapshot {
    pub fn overall(&self) -> GroupState {
        let worst = self.groups.iter().map(|g| g.state).filter(|s| *s != GroupState::NoData).min();
        match (worst, self.general.is_empty()) {
            (_, false) => GroupState::Down,
            (Some(s), true) => s,
            (None, true) => GroupState::NoData,
        }
    }
}

/// The per-replica cache of the page. `/status` needs no key, so however
/// many requests arrive when the copy is stale, one computes it while the
/// others get the stale copy, or wait for that one when there is none
/// (single flight); a failure is repeated to requests for a moment instead
/// of retried by each.
#[derive(Default)]
pub struct Cache {
    slot: Mutex<Option<(Instant, Arc<Snapshot>)>>,
    failed: Mutex<Option<(Instant, DbError)>>,
    refresh: tokio::sync::Mutex<()>,
    computed: std::sync::atomic::AtomicU64,
}

/// How long a failed refresh is repeated to later requests.
const FAILURE_HOLD: std::time::Duration = std::time::Duration::from_secs(2);
/// Longest one computation of the page may take.
const COMPUTE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Cache {
    /// How many times this cache computed the page (or tried to).
    pub fn computations(&self) -> u64 {
        self.computed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The cached snapshot if made after `since` or within `ttl`.
    fn cached(&self, ttl: std::time::Duration, since: Option<Instant>) -> Option<Arc<Snapshot>> {
        let slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref()
            .filter(|(at, _)| at.elapsed() < ttl || since.is_some_and(|s| *at >= s))
            .map(|(_, snapshot)| snapshot.clone())
    }

    /// A failure seen in the last moment, or since `since`.
    fn recent_failure(&self, since: Instant) -> Option<DbError> {
        let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.as_ref().filter(|(at, _)| at.elapsed() < FAILURE_HOLD || *at >= since).map(|(_, e)| e.again())
    }

    /// The cached snapshot if younger than `ttl`, else a fresh one. While
    /// one request refreshes it, the others get the stale copy (or, when
    /// there is none yet, wait for that request's result).
    pub async fn get(
        &self,
        pool: &deadpool_postgres::Pool,
        settings: &ConsoleSettings,
    ) -> Result<Arc<Snapshot>, DbError> {
        let ttl = settings.status_cache.get();
        if let Some(snapshot) = self.cached(ttl, None) {
            return Ok(snapshot);
        }
        let arrived = Instant::now();
        let _refreshing = match self.refresh.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                if let Some(stale) = self.cached(std::time::Duration::MAX, None) {
                    return Ok(stale);
                }
                self.refresh.lock().await
            }
        };
        // A refresh that ended after this request arrived answers it too.
        if let Some(snapshot) = self.cached(ttl, Some(arrived)) {
            return Ok(snapshot);
        }
        // While the database fails, the last page there was (its "Updated"
        // time says how old) rather than none: a public status page going
        // blank is the worst moment for it.
        let stale_or = |e: DbError| self.cached(std::time::Duration::MAX, None).ok_or(e);
        if let Some(e) = self.recent_failure(arrived) {
            return stale_or(e);
        }
        self.computed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Bounded well inside the request timeout, so that a slow database
        // ends as a recorded failure rather than as cancelled requests,
        // each of which would leave the next waiter to start over. A
        // connection whose query was cut short is closed, not pooled: the
        // query would go on, and the next borrower would wait behind it.
        let deadline = tokio::time::Instant::now() + COMPUTE_LIMIT;
        let too_long = || DbError::Unavailable("the status page took too long to compute".into());
        let result = match tokio::time::timeout_at(deadline, crate::db::client(pool)).await {
            Ok(Ok(mut client)) => match tokio::time::timeout_at(deadline, compute(&mut client, settings)).await {
                Ok(result) => result,
                Err(_) => {
                    crate::db::discard(client);
                    Err(too_long())
                }
            },
            Ok(Err(e)) => Err(e),
            Err(_) => Err(too_long()),
        };
        match result {
            Ok(snapshot) => {
                let snapshot = Arc::new(snapshot);
                *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), snapshot.clone()));
                Ok(snapshot)
            }
            Err(e) => {
                *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), e.again()));
                stale_or(e)
            }
        }
    }
}

/// The group of an agent, in SQL: the label's value, else the catch-all
/// group (NULL when that is empty: the agent is not shown).
const GROUP_OF: &str = "coalesce(nullif(s.labels ->> $1, ''), nullif($2::text, ''))";

pub async fn compute(client: &mut tokio_postgres::Client, settings: &ConsoleSettings) -> Result<Snapshot, DbError> {
    let label = settings.status_group_label.trim();
    let ungrouped = settings.status_ungrouped.trim();
    let days = i32::try_from(settings.status_uptime_days).unwrap_or(90);
    // One snapshot for the page's statements; without JIT, which the
    // spans' row estimates (millions for thousands) set off for longer
    // than the statement runs.
    let tx = client.build_transaction().read_only(true).start().await?;
    tx.batch_execute("SET LOCAL jit = off").await?;
    let now: DateTime<Utc> = tx.query_one("SELECT now()", &[]).await?.get(0);

    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    let rows = tx
        .query(
            &format!(
                "SELECT {GROUP_OF} AS grp, count(*) FILTER (WHERE s.liveness = 'online'), \
                        count(*) FILTER (WHERE s.liveness = 'degraded'), count(*) FILTER (WHERE s.liveness = 'offline') \
                 FROM warden.agent_status s WHERE {GROUP_OF} IS NOT NULL GROUP BY 1"
            ),
            &[&label, &ungrouped],
        )
        .await?;
    for r in rows {
        let name: String = r.get(0);
        // Agents choose their labels: with a list of groups, a value not on
        // it publishes nothing. (The later queries fill in only the groups
        // made here.)
        if !settings.status_group_shown(&name) {
            continue;
        }
        let state = GroupState::of(r.get(1), r.get(2), r.get(3));
        groups.insert(name.clone(), Group { name, state, uptime: None, days: Vec::new(), problems: Vec::new() });
    }

    // Daily bars and the range's uptime: closed days from liveness_days
    // (retention writes each once it is final), the days after its
    // watermark from liveness_by_day, the function retention writes them
    // with. The range's figure is summed from the same days, so that it
    // covers exactly what the bars show.
    // The days are those of `now` as read above: the bars below are laid
    // out from it, and a statement's own now() could fall on the next day.
    // An agent removed and registered again has a new first_seen: its
    // earlier life's days are not its own.
    let rows = tx
        .query(
            &format!(
                "WITH r AS (SELECT date_trunc('day', $4::timestamptz, 'UTC') - ($3::int - 1) * interval '1 day' AS lo), \
                 w AS (SELECT greatest(r.lo, least(date_trunc('day', $4::timestamptz, 'UTC'), \
                                                   coalesce(rs.liveness_day_watermark::timestamp AT TIME ZONE 'UTC', r.lo))) \
                              AS live_from \
                       FROM r LEFT JOIN warden.retention_state rs ON true), \
                 rolled AS ( \
                   SELECT {GROUP_OF} AS grp, d.day, d.online_seconds + d.degraded_seconds AS up, \
                          d.online_seconds + d.degraded_seconds + d.offline_seconds AS observed \
                   FROM warden.liveness_days d \
                   JOIN warden.agent_status s ON s.agent_id = d.agent_id AND s.first_seen = d.first_seen \
                   WHERE d.day >= ((SELECT lo FROM r) AT TIME ZONE 'UTC')::date \
                     AND d.day < ((SELECT live_from FROM w) AT TIME ZONE 'UTC')::date), \
                 live AS ( \
                   SELECT {GROUP_OF} AS grp, l.day, l.online_seconds + l.degraded_seconds AS up, \
                          l.online_seconds + l.degraded_seconds + l.offline_seconds AS observed \
                   FROM warden.liveness_by_day((SELECT live_from FROM w), $4::timestamptz) l \
                   JOIN warden.agent_status s ON s.agent_id = l.agent_id) \
                 SELECT grp, day, sum(up), sum(observed) \
                 FROM (SELECT * FROM rolled UNION ALL SELECT * FROM live) x \
                 WHERE grp IS NOT NULL GROUP BY grp, day"
            ),
            &[&label, &ungrouped, &days, &now],
        )
        .await?;
    let mut per_day: BTreeMap<(String, NaiveDate), f64> = BTreeMap::new();
    let mut whole: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for r in rows {
        let (grp, day): (String, NaiveDate) = (r.get(0), r.get(1));
        let (up, observed): (f64, f64) = (r.get(2), r.get(3));
        let sums = whole.entry(grp.clone()).or_default();
        sums.0 += up;
        sums.1 += observed;
        if observed > 0.0 {
            per_day.insert((grp, day), percent(up, observed));
        }
    }
    for (name, (up, observed)) in whole {
        if let Some(g) = groups.get_mut(&name)
            && observed > 0.0
        {
            g.uptime = Some(percent(up, observed));
        }
    }
    let today = now.date_naive();
    let dates: Vec<NaiveDate> =
        (0..days).rev().filter_map(|back| today.checked_sub_days(chrono::Days::new(back as u64))).collect();
    for g in groups.values_mut() {
        g.days = dates.iter().map(|d| Day { date: *d, pct: per_day.get(&(g.name.clone(), *d)).copied() }).collect();
    }

    // Open problems, by group and in plain words; never predictions.
    let rows = tx
        .query(
            &format!(
                "SELECT {GROUP_OF} AS grp, i.issue_type, i.agent_id IS NULL AS fleet, min(i.opened_at) \
                 FROM warden.incidents i LEFT JOIN warden.agent_status s ON s.agent_id = i.agent_id \
                 WHERE i.state = 'open' AND NOT i.predicted \
                 GROUP BY 1, 2, 3"
            ),
            &[&label, &ungrouped],
        )
        .await?;
    let mut general: Vec<(&'static str, DateTime<Utc>)> = Vec::new();
    for r in rows {
        let grp: Option<String> = r.get(0);
        let issue: String = r.get(1);
        let fleet: bool = r.get(2);
        let since: DateTime<Utc> = r.get(3);
        let words = plain_words(&issue);
        let list = if fleet {
            &mut general
        } else {
            match grp.and_then(|g| groups.get_mut(&g)) {
                Some(g) => &mut g.problems,
                None => continue,
            }
        };
        match list.iter_mut().find(|(w, _)| *w == words) {
            Some(existing) => existing.1 = existing.1.min(since),
            None => list.push((words, since)),
        }
    }
    for g in groups.values_mut() {
        g.problems.sort_by_key(|p| p.1);
    }
    general.sort_by_key(|p| p.1);
    tx.commit().await?;
    Ok(Snapshot { generated_at: now, groups: groups.into_values().collect(), general })
}

/// `part` as a percentage of `whole`. Dividing first keeps a whole that
/// was all up at exactly 100: `100.0 * x / x` can round to
/// 99.99999999999999, which the uptime format (rounding down) shows as
/// 99.99 %.
fn percent(part: f64, whole: f64) -> f64 {
    100.0 * (part / whole)
}

/// Colour class of a day's bar.
pub fn day_class(pct: Option<f64>) -> &'static str {
    match pct {
        None => "d-none",
        Some(p) if p >= 99.9 => "d-up",
        Some(p) if p >= 95.0 => "d-degraded",
        Some(_) => "d-down",
    }
}

/// The page's theme from the settings (colours are validated hex).
pub fn theme_css(settings: &ConsoleSettings) -> String {
    format!(
        ":root{{--accent:{};--up:{};--degraded:{};--down:{};}}\n",
        settings.status_accent, settings.status_up, settings.status_degraded, settings.status_down
    )
}

fn since_words(t: DateTime<Utc>) -> String {
    t.format("%H:%M UTC, %e %b").to_string().replace("  ", " ")
}

pub fn page(settings: &ConsoleSettings, snapshot: &Snapshot) -> Markup {
    let overall = snapshot.overall();
    let headline = match overall {
        GroupState::Up => "All systems operational",
        GroupState::Degraded => "Some systems are degraded",
        GroupState::Down => "Some systems are down",
        GroupState::NoData => "No status to report yet",
    };
    let days = settings.status_uptime_days;
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                meta http-equiv="refresh" content="60";
                title { (settings.status_title) }
                link rel="icon" type="image/svg+xml" href=(super::asset_url("favicon.svg"));
                link rel="stylesheet" href=(super::asset_url("status.css"));
                link rel="stylesheet" href="/status/theme.css";
            }
            body.status-page {
                header.status-head {
                    @if !settings.status_logo.is_empty() {
                        img.status-logo src=(settings.status_logo) alt="" height="40";
                    }
                    h1 { (settings.status_title) }
                }
                main {
                    section class=(format!("overall {}", overall.class())) role="status" {
                        span.overall-dot aria-hidden="true" {}
                        p { (headline) }
                    }
                    @if !snapshot.general.is_empty() || snapshot.groups.iter().any(|g| !g.problems.is_empty()) {
                        section.problems aria-labelledby="problems-title" {
                            h2 #problems-title { "Current problems" }
                            ul {
                                @for (words, since) in &snapshot.general {
                                    li { strong { (words) } span.since { " since " (since_words(*since)) } }
                                }
                                @for g in &snapshot.groups {
                                    @for (words, since) in &g.problems {
                                        li { strong { bdi { (g.name) } } ": " (words) span.since { " since " (since_words(*since)) } }
                                    }
                                }
                            }
                        }
                    }
                    section.groups aria-labelledby="groups-title" {
                        h2 #groups-title { "Services" }
                        @if snapshot.groups.is_empty() {
                            p.empty { "No services are listed." }
                        }
                        @for g in &snapshot.groups {
                            article.group data-group=(g.name) data-state=(g.state.word()) {
                                div.group-head {
                                    h3 { bdi { (g.name) } }
                                    span class=(format!("state {}", g.state.class())) {
                                        span.state-dot aria-hidden="true" {}
                                        (g.state.word())
                                    }
                                }
                                svg.days viewBox={ "0 0 " (days * 4) " 24" } preserveAspectRatio="none" role="img"
                                    aria-label={ "Uptime per day over the last " (days) " days" } {
                                    @for (i, d) in g.days.iter().enumerate() {
                                        rect class=(day_class(d.pct)) x=(i * 4) y="0" width="3" height="24" {
                                            title {
                                                (d.date.format("%Y-%m-%d").to_string()) ": "
                                                @match d.pct { Some(p) => { (format::uptime(p)) " up" } None => { "no data" } }
                                            }
                                        }
                                    }
                                }
                                // The bars' figures for touch screens and screen
                                // readers, which get no tooltips: the days that
                                // were not whole.
                                @let short: Vec<_> = g.days.iter().filter(|d| d.pct.is_some_and(|p| p < 100.0)).collect();
                                @if !short.is_empty() {
                                    details.days-short {
                                        summary { (short.len()) @if short.len() == 1 { " day" } @else { " days" } " below 100%" }
                                        ul {
                                            @for d in &short {
                                                li { (d.date.format("%Y-%m-%d").to_string()) ": " (format::uptime(d.pct.unwrap_or(0.0))) " up" }
                                            }
                                        }
                                    }
                                }
                                div.group-foot {
                                    span { (days) " days ago" }
                                    span.uptime data-uptime=(g.uptime.map(format::uptime).unwrap_or_default()) {
                                        @match g.uptime {
                                            Some(u) => { strong { (format::uptime(u)) } " uptime" }
                                            None => { "no data yet" }
                                        }
                                    }
                                    span { "today" }
                                }
                            }
                        }
                    }
                }
                footer.status-foot {
                    p { "Updated " (snapshot.generated_at.format("%Y-%m-%d %H:%M:%S UTC").to_string()) ". This page refreshes every minute." }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_state_follows_its_agents() {
        assert_eq!(GroupState::of(3, 0, 0), GroupState::Up);
        assert_eq!(GroupState::of(2, 1, 0), GroupState::Degraded);
        assert_eq!(GroupState::of(2, 0, 1), GroupState::Degraded);
        assert_eq!(GroupState::of(0, 0, 2), GroupState::Down);
        assert_eq!(GroupState::of(0, 0, 0), GroupState::NoData);
    }

    #[test]
    fn the_overall_state_is_the_worst_group_or_a_fleet_problem() {
        let group = |state| Group { name: "g".into(), state, uptime: None, days: vec![], problems: vec![] };
        let mut s = Snapshot { generated_at: Utc::now(), groups: vec![group(GroupState::Up)], general: vec![] };
        assert_eq!(s.overall(), GroupState::Up);
        s.groups.push(group(GroupState::NoData));
        assert_eq!(s.overall(), GroupState::Up, "no data does not count");
        s.groups.push(group(GroupState::Degraded));
        assert_eq!(s.overall(), GroupState::Degraded);
        s.general.push((plain_words("fleet_outage"), Utc::now()));
        assert_eq!(s.overall(), GroupState::Down);
        assert_eq!(
            Snapshot { generated_at: Utc::now(), groups: vec![], general: vec![] }.overall(),
            GroupState::NoData
        );
    }

    #[test]
    fn a_whole_that_was_all_up_is_exactly_100_percent() {
        // 100 * x / x is 99.99999999999999 for this x, shown as 99.99 %.
        let x = 83.791226;
        assert_eq!(crate::console::format::uptime(percent(x, x)), "100%");
        for i in 1..10_000 {
            let x = f64::from(i) * 0.013_7 + 0.000_001;
            assert_eq!(percent(x, x), 100.0, "{x}");
        }
        assert_eq!(crate::console::format::uptime(percent(x - 0.001, x)), "99.99%");
    }

    #[test]
    fn days_are_coloured_by_uptime() {
        assert_eq!(day_class(None), "d-none");
        assert_eq!(day_class(Some(100.0)), "d-up");
        assert_eq!(day_class(Some(99.5)), "d-degraded");
        assert_eq!(day_class(Some(50.0)), "d-down");
        assert_eq!(plain_words("agent_unresponsive"), plain_words("extended_offline"));
    }
}
