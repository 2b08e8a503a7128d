//! The console's HTML, as maud templates: checked at compile time and
//! escaped by default (nothing here uses `PreEscaped` on data). Pages are
//! complete without JavaScript; `console.js` only swaps the regions marked
//! `data-live` when the stream says something changed.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use super::data::{AgentRow, AlertRow, DeliveryRow, FleetFilter, IncidentRow, PAGE_SIZE, SortKey, TierFilter};
use super::format::{self, Bar};
use super::session::ConsoleUser;
use crate::alerting::silences::Silence;
use crate::model::{Liveness, Tier};
use crate::recovery::ActionRow;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Which section of the console a page belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Fleet,
    Incidents,
    Alerts,
    None,
}

/// What every page's frame needs.
pub struct Chrome<'a> {
    pub title: &'a str,
    pub nav: Nav,
    pub user: Option<&'a ConsoleUser>,
    /// The stream the page listens to for live updates.
    pub stream: Option<String>,
    /// Seconds between background refreshes, on top of the stream.
    pub refresh: Option<u32>,
}

fn current(chrome: &Chrome<'_>, nav: Nav) -> Option<&'static str> {
    (chrome.nav == nav).then_some("page")
}

/// The frame: head, top bar with navigation and session, main, footer.
pub fn page(chrome: &Chrome<'_>, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { (chrome.title) " · warden" }
                link rel="icon" type="image/svg+xml" href=(super::asset_url("favicon.svg"));
                link rel="stylesheet" href=(super::asset_url("console.css"));
                script src=(super::asset_url("console.js")) defer {}
            }
            body data-stream=[chrome.stream.as_deref()] data-refresh=[chrome.refresh] {
                a.skip href="#main" { "Skip to content" }
                header.topbar {
                    div.topbar-inner {
                        a.brand href="/" aria-label="warden: fleet" {
                            (logo())
                            span { "warden" }
                        }
                        @if let Some(user) = chrome.user {
                            nav.mainnav aria-label="Console" {
                                ul {
                                    li { a href="/" aria-current=[current(chrome, Nav::Fleet)] { "Fleet" } }
                                    li { a href="/incidents" aria-current=[current(chrome, Nav::Incidents)] { "Incidents" } }
                                    li { a href="/alerts" aria-current=[current(chrome, Nav::Alerts)] { "Alerts" } }
                                }
                            }
                            div.session {
                                span #live .live role="status" data-state="connecting" hidden {
                                    span.dot aria-hidden="true" {}
                                    span.live-text { "Connecting…" }
                                }
                                span.who title="The API key this session was opened with" {
                                    span.who-name { (user.name()) }
                                    @if user.is_admin() {
                                        span.scope.scope-admin { "admin" }
                                    } @else {
                                        span.scope { "read-only" }
                                    }
                                }
                                form.logout method="post" action="/logout" {
                                    input type="hidden" name="csrf" value=(user.csrf);
                                    button.link-button type="submit" { "Log out" }
                                }
                            }
                        }
                    }
                }
                main #main tabindex="-1" {
                    @if chrome.stream.is_some() {
                        noscript {
                            p.note { "Live updates need JavaScript; reload the page to see changes." }
                        }
                    }
                    (content)
                }
                footer.footer {
                    span { "warden " (VERSION) }
                }
            }
        }
    }
}

fn logo() -> Markup {
    html! {
        svg.logo viewBox="0 0 32 32" width="24" height="24" aria-hidden="true" focusable="false" {
            path d="M16 2 4 7v8c0 7.5 5.1 13.4 12 15 6.9-1.6 12-7.5 12-15V7z" fill="currentColor" {}
            path.logo-pulse d="M8 17h4l2-5 3 9 2-4h5" fill="none" stroke-width="2.2" stroke-linecap="round" stroke-linejoin="round" {}
        }
    }
}

/// A point in time: relative words, the exact UTC time on hover, and a
/// machine-readable `datetime` that the script keeps relative.
pub fn when(now: DateTime<Utc>, t: DateTime<Utc>) -> Markup {
    html! {
        time datetime=(t.to_rfc3339()) title=(format::utc(t)) data-rel { (format::ago(now, t)) }
    }
}

fn when_opt(now: DateTime<Utc>, t: Option<DateTime<Utc>>) -> Markup {
    match t {
        Some(t) => when(now, t),
        None => html! { span.muted { "—" } },
    }
}

fn liveness_glyph(liveness: &str) -> &'static str {
    match liveness {
        "online" => "●",
        "degraded" => "▲",
        "offline" => "■",
        _ => "○",
    }
}

/// Liveness as a badge: colour, a shape that does not rely on colour, and the word.
pub fn liveness_badge(liveness: &str) -> Markup {
    html! {
        span class=(format!("badge lv-{liveness}")) data-liveness=(liveness) {
            span.glyph aria-hidden="true" { (liveness_glyph(liveness)) }
            (liveness)
        }
    }
}

pub fn tier_badge(tier: Option<&str>) -> Markup {
    match tier {
        Some(t) => html! { span class=(format!("badge tier-{t}")) { (t) } },
        None => html! { span.badge.tier-none { "unscored" } },
    }
}

pub fn severity_badge(severity: &str) -> Markup {
    html! { span class=(format!("badge sev-{severity}")) { (severity) } }
}

fn alert_state_badge(state: &str) -> Markup {
    html! { span class=(format!("badge al-{state}")) { (state) } }
}

fn agent_link(agent: &str) -> Markup {
    html! { a.mono href={ "/agents/" (format::url_encode(agent)) } { (agent) } }
}

fn labels(labels: &[(String, String)]) -> Markup {
    html! {
        @if labels.is_empty() {
            span.muted { "—" }
        } @else {
            ul.chips {
                @for (k, v) in labels {
                    li.chip { span.chip-key { (k) } "=" (v) }
                }
            }
        }
    }
}

/// A flash message after an action, from a fixed list (nothing reflected).
pub fn notice(kind: &str, text: &str) -> Markup {
    html! {
        div class=(format!("notice notice-{kind}")) role=(if kind == "error" { "alert" } else { "status" }) {
            (text)
        }
    }
}

fn pct_of(n: i64, total: i64) -> f64 {
    if total > 0 { n as f64 * 100.0 / total as f64 } else { 0.0 }
}

// ---------------------------------------------------------------- fleet

pub struct FleetView<'a> {
    pub now: DateTime<Utc>,
    pub totals: &'a Value,
    pub agents: &'a [AgentRow],
    pub matching: i64,
    pub filter: &'a FleetFilter,
    pub incidents: &'a [IncidentRow],
}

fn total_of(totals: &Value, group: &str, key: &str) -> i64 {
    totals[group][key].as_i64().unwrap_or(0)
}

pub fn fleet(v: &FleetView<'_>) -> Markup {
    let total = v.totals["total"].as_i64().unwrap_or(0);
    let open = v.totals["open_incidents"].as_i64().unwrap_or(0);
    let average = v.totals["average_score"].as_f64();
    html! {
        div.page-head {
            h1 { "Fleet" }
            p #fleet-sub .sub data-live { (format::count(total)) " agents" }
        }
        section #totals .totals data-live aria-labelledby="totals-title" {
            h2 #totals-title .sr-only { "Totals" }
            div.cards {
                @for l in Liveness::ALL.iter().rev() {
                    @let n = total_of(v.totals, "liveness", l.as_str());
                    a class=(format!("card card-{l}")) href={ "/" (format::query(&[("liveness", l.as_str())])) } {
                        span.card-label { span.glyph aria-hidden="true" { (liveness_glyph(l.as_str())) } (format::words(l.as_str())) }
                        span.card-value data-total=(l.as_str()) { (format::count(n)) }
                    }
                }
                a.card.card-incidents href="/incidents" {
                    span.card-label { "Open incidents" }
                    span.card-value data-total="open_incidents" { (format::count(open)) }
                }
                div.card {
                    span.card-label { "Average score" }
                    span.card-value data-total="average_score" { (format::score(average)) }
                }
            }
            (tier_bar(v.totals, total))
        }
        section #fleet-incidents .panel data-live aria-labelledby="fleet-incidents-title" {
            div.panel-head {
                h2 #fleet-incidents-title { "Open incidents" }
                a href="/incidents" { "All incidents" }
            }
            @if v.incidents.is_empty() {
                p.empty { "No open incidents." }
            } @else {
                ul.incident-list {
                    @for i in v.incidents {
                        li data-incident=(i.id) {
                            (severity_badge(&i.severity))
                            " "
                            strong { (format::words(&i.issue_type)) }
                            @if let Some(agent) = &i.agent_id { " on " (agent_link(agent)) } @else { " across the fleet" }
                            @if i.predicted { " " span.badge.predicted { "predicted" } }
                            " · since " (when(v.now, i.opened_at))
                            @if let Some(summary) = &i.summary { p.summary { (summary) } }
                        }
                    }
                }
            }
        }
        section.panel aria-labelledby="agents-title" {
            div.panel-head { h2 #agents-title { "Agents" } }
            @for i in &v.filter.ignored {
                div.notice.notice-warn role="status" {
                    "Left out " code { (i.name) "=" (i.value) } ": " (i.name) " takes " (i.expected) "."
                }
            }
            (filters(v.filter))
            div #agents-table data-live {
                (agent_table(v))
            }
        }
    }
}

fn tier_bar(totals: &Value, total: i64) -> Markup {
    let mut segments: Vec<(&str, i64)> =
        Tier::ALL.iter().map(|t| (t.as_str(), total_of(totals, "tier", t.as_str()))).collect();
    segments.push(("unscored", totals["tier"]["unscored"].as_i64().unwrap_or(0)));
    // Each drawn segment with its offset and width, in percent.
    let mut drawn: Vec<(&str, i64, f64, f64)> = Vec::new();
    let mut x = 0.0;
    for (tier, n) in &segments {
        if *n > 0 {
            let w = pct_of(*n, total);
            drawn.push((tier, *n, x, w));
            x += w;
        }
    }
    html! {
        div.tiers {
            h3.tiers-title { "Health tiers" }
            svg.tierbar viewBox="0 0 100 6" preserveAspectRatio="none" role="img" aria-label="Agents by health tier" {
                @if total == 0 {
                    rect.seg-none x="0" y="0" width="100" height="6" {}
                }
                @for (tier, n, x, w) in &drawn {
                    rect class=(format!("seg-{tier}")) x=(format::coord(*x)) y="0" width=(format::coord(*w)) height="6" {
                        title { (tier) ": " (n) }
                    }
                }
            }
            ul.legend {
                @for (tier, n) in &segments {
                    li {
                        span class=(format!("swatch seg-{tier}")) aria-hidden="true" {}
                        (format::words(tier)) " "
                        strong data-tier=(tier) { (format::count(*n)) }
                    }
                }
            }
        }
    }
}

fn filters(f: &FleetFilter) -> Markup {
    html! {
        form.filters method="get" action="/" role="search" aria-label="Filter agents" {
            div.field.field-grow {
                label for="q" { "Search" }
                input #q type="search" name="q" value=(f.q) placeholder="id, name or label" autocomplete="off" data-quick-filter;
            }
            div.field {
                label for="f-liveness" { "Liveness" }
                select #f-liveness name="liveness" {
                    option value="" { "Any" }
                    @for l in Liveness::ALL {
                        option value=(l.as_str()) selected[f.liveness == Some(*l)] { (format::words(l.as_str())) }
                    }
                }
            }
            div.field {
                label for="f-tier" { "Tier" }
                select #f-tier name="tier" {
                    option value="" { "Any" }
                    @for t in Tier::ALL {
                        option value=(t.as_str()) selected[f.tier == Some(TierFilter::Is(*t))] { (format::words(t.as_str())) }
                    }
                    option value="unscored" selected[f.tier == Some(TierFilter::Unscored)] { "Unscored" }
                }
            }
            @if f.sort != SortKey::Liveness || f.descending {
                input type="hidden" name="sort" value=(f.sort.as_str());
                input type="hidden" name="dir" value=(if f.descending { "desc" } else { "asc" });
            }
            div.field.field-buttons {
                button.primary type="submit" { "Apply" }
                a.button href="/" { "Reset" }
            }
        }
    }
}

fn filter_query<'a>(f: &'a FleetFilter, sort: &'a str, dir: &'a str, page: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("liveness", f.liveness.map(Liveness::as_str).unwrap_or("")),
        ("tier", f.tier.map(TierFilter::as_str).unwrap_or("")),
        ("q", f.q.as_str()),
        ("sort", sort),
        ("dir", dir),
        ("page", page),
    ]
}

fn sort_header(f: &FleetFilter, key: SortKey, label: &str, class: &str) -> Markup {
    let active = f.sort == key;
    let next_desc = active && !f.descending;
    let href = format::query(&filter_query(f, key.as_str(), if next_desc { "desc" } else { "" }, ""));
    let aria = active.then_some(if f.descending { "descending" } else { "ascending" });
    html! {
        th scope="col" class=(class) aria-sort=[aria] {
            a href={ "/" (href) } {
                (label)
                span.sort-arrow aria-hidden="true" { @if active { @if f.descending { "↓" } @else { "↑" } } }
            }
        }
    }
}

fn agent_table(v: &FleetView<'_>) -> Markup {
    let f = v.filter;
    let first = (f.page - 1) * PAGE_SIZE + 1;
    let last = first + v.agents.len() as i64 - 1;
    // Past the end (a stale link, the fleet shrank): back to the last page
    // with agents, not to the empty one before this.
    let last_page = ((v.matching + PAGE_SIZE - 1) / PAGE_SIZE).max(1);
    let prev = (f.page - 1).min(last_page).to_string();
    let next = (f.page + 1).to_string();
    let dir = if f.descending { "desc" } else { "" };
    let sort = if f.sort == SortKey::Liveness { "" } else { f.sort.as_str() };
    html! {
        p.count aria-live="polite" {
            @if v.agents.is_empty() {
                @if v.matching == 0 { "No agents match." } @else { "No agents on this page; " (format::count(v.matching)) " on earlier pages." }
            } @else {
                "Showing " (format::count(first)) "–" (format::count(last)) " of " (format::count(v.matching))
                span #quick-count .muted {}
            }
        }
        @if !v.agents.is_empty() {
            div.table-wrap {
                table.agents.data {
                    caption.sr-only { "Agents, sortable by column" }
                    thead {
                        tr {
                            (sort_header(f, SortKey::Agent, "Agent", ""))
                            (sort_header(f, SortKey::Liveness, "Liveness", ""))
                            (sort_header(f, SortKey::Score, "Score", "num"))
                            (sort_header(f, SortKey::Tier, "Tier", "hide-xs"))
                            (sort_header(f, SortKey::LastSeen, "Last seen", ""))
                            (sort_header(f, SortKey::Mode, "Mode", "hide-sm"))
                            th scope="col" class="hide-sm" { "Labels" }
                        }
                    }
                    tbody {
                        @for a in v.agents {
                            // What the search field looks in, as the server's search does.
                            @let searched = std::iter::once(a.agent_id.clone())
                                .chain(a.name.clone())
                                .chain(a.labels.iter().map(|(k, v)| format!("{k}={v}")))
                                .collect::<Vec<_>>()
                                .join("\n");
                            tr data-agent=(a.agent_id) data-liveness=(a.liveness) data-search=(searched) {
                                td.agent-cell {
                                    a.agent-name href={ "/agents/" (format::url_encode(&a.agent_id)) } {
                                        (a.name.as_deref().unwrap_or(&a.agent_id))
                                    }
                                    @if a.name.is_some() { span.agent-id.mono { (a.agent_id) } }
                                }
                                td data-field="liveness" {
                                    (liveness_badge(&a.liveness))
                                    span.since { " for " (format::span((v.now - a.liveness_since).num_seconds())) }
                                }
                                td.num data-field="score" { (format::score(a.score)) }
                                td.hide-xs data-field="tier" { (tier_badge(a.tier.as_deref())) }
                                td data-field="last_seen" {
                                    (when(v.now, a.last_seen))
                                    span.muted.interval { " · every " (format::interval(i64::from(a.expected_interval_ms))) }
                                }
                                td.hide-sm data-field="mode" { (a.mode.as_deref().unwrap_or("—")) }
                                td.hide-sm data-field="labels" { (labels(&a.labels)) }
                            }
                        }
                    }
                }
            }
        }
        @if f.page > 1 || last < v.matching {
            nav.pager aria-label="Pages" {
                @if f.page > 1 {
                    a.button href={ "/" (format::query(&filter_query(f, sort, dir, &prev))) } rel="prev" { "← Previous" }
                }
                @if last < v.matching {
                    a.button href={ "/" (format::query(&filter_query(f, sort, dir, &next))) } rel="next" { "Next →" }
                }
            }
        }
    }
}

// ---------------------------------------------------------------- agent

pub struct AgentView<'a> {
    pub now: DateTime<Utc>,
    pub user: &'a ConsoleUser,
    pub agent: &'a Value,
    pub minutes: &'a [f64],
    pub recoveries: &'a [ActionRow],
    pub alerts: &'a [AlertRow],
    pub back: &'a str,
}

fn s<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn t(v: &Value, key: &str) -> Option<DateTime<Utc>> {
    s(v, key).and_then(|x| DateTime::parse_from_rfc3339(x).ok()).map(|x| x.with_timezone(&Utc))
}

/// What each component's formula is, in one line (docs/health.md).
fn formula(component: &str) -> &'static str {
    match component {
        "heartbeat_consistency" => {
            "100 × delivery × (1 − jitter penalty), penalty = min(0.5, max(0, cv − 0.1)); 0 while offline"
        }
        "performance" => "100 × (3 − latency ÷ reference) ÷ 2",
        "error_rate" => "100 × (1 − errors per work item ÷ ceiling)",
        "resource_efficiency" => "the lower of the cpu and memory scores: 100 up to warning, 40 at critical, 0 at 100%",
        "business_impact" => "100 × min(1, work per hour ÷ reference)",
        _ => "",
    }
}

const COMPONENTS: [&str; 5] =
    ["heartbeat_consistency", "performance", "error_rate", "resource_efficiency", "business_impact"];

fn band(score: f64) -> &'static str {
    match score {
        s if s >= 80.0 => "excellent",
        s if s >= 70.0 => "good",
        s if s >= 60.0 => "fair",
        s if s >= 40.0 => "poor",
        _ => "critical",
    }
}

pub fn agent(v: &AgentView<'_>) -> Markup {
    let a = v.agent;
    let id = s(a, "agent_id").unwrap_or("");
    let name = s(a, "name");
    let liveness = s(a, "liveness").unwrap_or("unknown");
    let score = a["score"].as_f64();
    let interval_ms = a["expected_interval_ms"].as_i64().unwrap_or(0);
    let labels_list = super::data::labels_of(&a["labels"]);
    html! {
        nav.crumbs aria-label="Breadcrumb" {
            a href=(v.back) { "Fleet" } span aria-hidden="true" { " / " } span aria-current="page" { (id) }
        }
        section #agent-head .agent-head data-live {
            div.agent-title {
                h1 { (name.unwrap_or(id)) }
                @if name.is_some() { p.mono.muted { (id) } }
                p.badges {
                    span data-field="liveness" { (liveness_badge(liveness)) }
                    @if let Some(since) = t(a, "liveness_since") { span.muted { " since " (when(v.now, since)) } }
                    " "
                    (tier_badge(s(a, "tier")))
                }
            }
            div.score-big aria-label="Health score" {
                span.score-num data-field="score" { (format::score(score)) }
                span.score-of { "/ 100" }
                @if let Some(trend) = a["score_trend"].as_f64() {
                    @if trend.abs() >= 0.5 {
                        span class=(if trend > 0.0 { "trend up" } else { "trend down" }) {
                            (if trend > 0.0 { "▲ " } else { "▼ " }) (format::figure((trend.abs() * 10.0).round() / 10.0)) " in the last hour"
                        }
                    }
                }
            }
        }
        section #agent-facts .panel data-live aria-label="Facts" {
            dl.facts {
                div { dt { "Last seen" } dd { (when_opt(v.now, t(a, "last_seen"))) } }
                div { dt { "Mode" } dd { (s(a, "mode").unwrap_or("—")) } }
                div { dt { "Expected every" } dd { (format::interval(interval_ms)) } }
                div { dt { "Reported status" } dd { (s(a, "status").unwrap_or("—")) } }
                div { dt { "Uptime" } dd { (a["uptime_seconds"].as_i64().map(format::span).unwrap_or_else(|| "—".into())) } }
                div { dt { "Heartbeats" } dd { (format::count(a["heartbeat_count"].as_i64().unwrap_or(0))) } }
                div { dt { "Restarts" } dd { (format::count(a["restart_count"].as_i64().unwrap_or(0))) } }
                div { dt { "First seen" } dd { (when_opt(v.now, t(a, "first_seen"))) } }
                div.facts-wide { dt { "Labels" } dd { (labels(&labels_list)) } }
            }
        }
        section #agent-components .panel data-live aria-labelledby="components-title" {
            h2 #components-title { "Score breakdown" }
            @let scored = a["components"].is_object();
            @if !scored {
                p.note { "Not scored yet: the next score pass after the agent's first heartbeats fills this in." }
            }
            div.table-wrap {
                    table.data.components {
                        caption.sr-only { "Score components, their weights and the figures their formulas used" }
                        thead { tr {
                            th scope="col" { "Component" }
                            th scope="col" class="num" { "Score" }
                            th scope="col" class="hide-sm" { span.sr-only { "Bar" } }
                            th scope="col" class="num" { "Weight" }
                            th scope="col" { "Formula and inputs" }
                        } }
                        tbody {
                            @for c in COMPONENTS {
                                @let comp = &a["components"][c];
                                @let value = comp["score"].as_f64();
                                tr data-component=(c) {
                                    th scope="row" { (format::words(c)) }
                                    td.num { (format::score(value)) }
                                    td.hide-sm { (component_bar(value)) }
                                    td.num {
                                        @match comp["weight"].as_f64() {
                                            Some(w) if w > 0.0 => { (format::figure((w * 1000.0).round() / 10.0)) "%" }
                                            _ if !scored => { span.muted { "—" } }
                                            _ => { span.muted title="No data: left out, the other weights scaled up" { "left out" } }
                                        }
                                    }
                                    td {
                                        span.formula { (formula(c)) }
                                        @if let Some(inputs) = comp["inputs"].as_object() {
                                            @if !inputs.is_empty() {
                                                ul.inputs {
                                                    @for (k, x) in inputs {
                                                        li { span.muted { (format::words(k)) } " " strong { (x.as_f64().map(format::figure).unwrap_or_else(|| x.to_string())) } }
                                                    }
                                                }
                                            }
                                        }
                                        @if let Some(advice) = comp["recommendation"].as_str() {
                                            p.advice { "Advice: " (advice) }
                                        }
                                        @if value.is_none() && scored { p.muted { "No data: left out of the score." } }
                                    }
                                }
                            }
                        }
                    }
                }
            p.note { "Score = weighted mean of the components with data; a component without data is left out and the others' weights are scaled up." }
        }
        section #agent-heartbeats .panel data-live aria-labelledby="hb-title" {
            h2 #hb-title { "Heartbeats, last hour" }
            (sparkline(v.minutes, interval_ms))
            @let ia = &a["inter_arrival"];
            @if ia["samples"].as_i64().unwrap_or(0) > 1 {
                p.muted {
                    "Mean gap " (format::interval(ia["mean_ms"].as_f64().unwrap_or(0.0).round() as i64))
                    ", standard deviation " (format::interval(ia["stddev_ms"].as_f64().unwrap_or(0.0).round() as i64))
                    " (" (ia["samples"].as_i64().unwrap_or(0)) " samples, recent ones weigh more)."
                }
            }
        }
        section #agent-incidents .panel data-live aria-labelledby="ai-title" {
            h2 #ai-title { "Incidents" }
            (incident_table(v.now, a["recent_incidents"].as_array().map(Vec::as_slice).unwrap_or(&[])))
        }
        section #agent-transitions .panel data-live aria-labelledby="at-title" {
            h2 #at-title { "Liveness transitions" }
            (transition_table(v.now, a["recent_transitions"].as_array().map(Vec::as_slice).unwrap_or(&[])))
        }
        section #agent-recovery .panel data-live aria-labelledby="ar-title" {
            h2 #ar-title { "Recovery actions" }
            (recovery_table(v.now, v.recoveries))
        }
        section #agent-alerts .panel data-live aria-labelledby="aa-title" {
            h2 #aa-title { "Alerts" }
            (alert_table(v.now, v.user, v.alerts, &format!("/agents/{}", format::url_encode(id)), AlertColumns::Agent))
        }
        section #agent-events .panel data-live aria-labelledby="ae-title" {
            h2 #ae-title { "Events" }
            (event_table(v.now, a["recent_events"].as_array().map(Vec::as_slice).unwrap_or(&[])))
        }
    }
}

fn component_bar(value: Option<f64>) -> Markup {
    html! {
        svg.meter viewBox="0 0 100 8" preserveAspectRatio="none" aria-hidden="true" focusable="false" {
            rect.meter-track x="0" y="0" width="100" height="8" rx="2" {}
            @if let Some(v) = value {
                rect class=(format!("seg-{}", band(v))) x="0" y="0" width=(format::coord(v.clamp(0.0, 100.0))) height="8" rx="2" {}
            }
        }
    }
}

/// The minutes (indices) of an hour's per-minute counts that were silent:
/// none received where a heartbeat was due, from the first minute heard.
/// With an interval over 30 s, one empty minute is no miss: an agent
/// beating every 61 s against a declared 60 s (well within its jitter)
/// leaves one empty minute an hour; two in a row are.
fn silent_minutes(minutes: &[f64], expected_per_minute: f64) -> Vec<usize> {
    if expected_per_minute < 1.0 {
        return Vec::new();
    }
    let first = minutes.iter().position(|m| *m > 0.0).unwrap_or(minutes.len());
    let empty = |i: usize| minutes.get(i).is_some_and(|m| *m == 0.0);
    (first..minutes.len())
        .filter(|&i| empty(i))
        .filter(|&i| expected_per_minute >= 2.0 || (i > first && empty(i - 1)) || empty(i + 1))
        .collect()
}

/// Heartbeats per minute as bars, the expected rate as a dashed line, and
/// silent minutes (see [`silent_minutes`]) marked red.
pub fn sparkline(minutes: &[f64], interval_ms: i64) -> Markup {
    const W: f64 = 600.0;
    const H: f64 = 60.0;
    let expected = if interval_ms > 0 { 60_000.0 / interval_ms as f64 } else { 0.0 };
    let max = format::scale_max(minutes, expected * 1.25);
    let bars: Vec<Bar> = format::bars(minutes, W, H, max);
    let received: f64 = minutes.iter().sum();
    let silent = silent_minutes(minutes, expected);
    let slot = if minutes.is_empty() { W } else { W / minutes.len() as f64 };
    let label = format!(
        "Heartbeats per minute over the last hour: {} received{}{}.",
        format::count(received as i64),
        if expected > 0.0 {
            format!(", about {} expected per minute", format::figure((expected * 10.0).round() / 10.0))
        } else {
            String::new()
        },
        if silent.is_empty() {
            String::new()
        } else {
            format!(", {}", format::counted(silent.len() as i64, "silent minute", "silent minutes"))
        },
    );
    html! {
        figure.sparkline {
            svg viewBox={ "0 0 " (W) " " (H + 4.0) } preserveAspectRatio="none" role="img" aria-label=(label) focusable="false" {
                line.spark-base x1="0" y1=(H) x2=(W) y2=(H) {}
                @for b in &bars {
                    rect.spark-bar x=(format::coord(b.x)) y=(format::coord(b.y)) width=(format::coord(b.w)) height=(format::coord(b.h)) {}
                }
                @for i in &silent {
                    rect.spark-gap x=(format::coord(*i as f64 * slot + slot * 0.1)) y=(H) width=(format::coord(slot * 0.8)) height="4" {}
                }
                @if expected > 0.0 && expected <= max {
                    @let y = format::level_y(expected, max, H);
                    line.spark-expected x1="0" y1=(format::coord(y)) x2=(W) y2=(format::coord(y)) {}
                }
            }
            figcaption {
                span { "60 min ago" }
                span.legend-inline {
                    span.swatch.spark-bar-swatch aria-hidden="true" {} "received"
                    @if expected > 0.0 { span.swatch.spark-expected-swatch aria-hidden="true" {} "expected" }
                    @if !silent.is_empty() { span.swatch.spark-gap-swatch aria-hidden="true" {} "silent minute" }
                }
                span { "now" }
            }
            p.sr-only { (label) }
        }
    }
}

fn incident_table(now: DateTime<Utc>, incidents: &[Value]) -> Markup {
    html! {
        @if incidents.is_empty() {
            p.empty { "No incidents." }
        } @else {
            div.table-wrap { table.data {
                caption.sr-only { "Recent incidents of this agent" }
                thead { tr { th scope="col" { "Issue" } th scope="col" { "Severity" } th scope="col" { "State" } th scope="col" { "Opened" } th scope="col" class="hide-sm" { "Summary" } } }
                tbody {
                    @for i in incidents {
                        tr {
                            td { (format::words(s(i, "issue_type").unwrap_or(""))) @if i["predicted"] == true { " " span.badge.predicted { "predicted" } } }
                            td { (severity_badge(s(i, "severity").unwrap_or("info"))) }
                            td {
                                @let state = s(i, "state").unwrap_or("");
                                span class=(format!("badge inc-{state}")) { (state) }
                                @if let Some(r) = t(i, "resolved_at") { span.muted { " " (when(now, r)) } }
                            }
                            td { (when_opt(now, t(i, "opened_at"))) }
                            td.hide-sm { (s(i, "summary").unwrap_or("")) @if let Some(r) = s(i, "resolution") { br; span.muted { "Resolved: " (r) } } }
                        }
                    }
                }
            } }
        }
    }
}

fn transition_table(now: DateTime<Utc>, transitions: &[Value]) -> Markup {
    html! {
        @if transitions.is_empty() {
            p.empty { "No transitions yet." }
        } @else {
            div.table-wrap { table.data {
                caption.sr-only { "Recent liveness transitions, newest first" }
                thead { tr { th scope="col" { "When" } th scope="col" { "Change" } th scope="col" { "Reason" } th scope="col" class="hide-sm" { "Figures" } } }
                tbody {
                    @for x in transitions {
                        tr {
                            td { (when_opt(now, t(x, "at"))) }
                            td { (liveness_badge(s(x, "old").unwrap_or("unknown"))) span aria-label="to" { " → " } (liveness_badge(s(x, "new").unwrap_or("unknown"))) }
                            td { (format::words(s(x, "reason").unwrap_or(""))) }
                            td.hide-sm {
                                @if let Some(figures) = x["figures"].as_object() {
                                    ul.inputs {
                                        @for (k, f) in figures {
                                            @if !f.is_null() {
                                                li { span.muted { (format::words(k)) } " " strong { (f.as_f64().map(format::figure).unwrap_or_else(|| f.as_str().map(str::to_string).unwrap_or_else(|| f.to_string()))) } }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            } }
        }
    }
}

fn event_table(now: DateTime<Utc>, events: &[Value]) -> Markup {
    html! {
        @if events.is_empty() {
            p.empty { "No events." }
        } @else {
            div.table-wrap { table.data {
                caption.sr-only { "Recent events, newest first" }
                thead { tr { th scope="col" { "When" } th scope="col" { "Event" } th scope="col" { "Severity" } th scope="col" { "Message" } } }
                tbody {
                    @for e in events {
                        tr {
                            td { (when_opt(now, t(e, "at"))) }
                            td { (format::words(s(e, "event_type").unwrap_or(""))) @if s(e, "source") == Some("agent") { " " span.badge.src-agent { "from agent" } } }
                            td { (severity_badge(s(e, "severity").unwrap_or("info"))) }
                            td.message { (s(e, "message").unwrap_or("")) }
                        }
                    }
                }
            } }
        }
    }
}

fn recovery_table(now: DateTime<Utc>, actions: &[ActionRow]) -> Markup {
    html! {
        @if actions.is_empty() {
            p.empty { "No recovery actions." }
        } @else {
            div.table-wrap { table.data {
                caption.sr-only { "Recovery actions" }
                thead { tr { th scope="col" { "Started" } th scope="col" { "Strategy / action" } th scope="col" class="num" { "Attempt" } th scope="col" { "State" } th scope="col" { "Outcome" } } }
                tbody {
                    @for r in actions {
                        tr {
                            td { (when_opt(now, r.started_at)) }
                            td { (r.strategy) " / " (r.action) }
                            td.num { (r.attempt) }
                            td { span class=(format!("badge rc-{}", r.state)) { (format::words(&r.state)) } }
                            td.message { (r.outcome.as_deref().unwrap_or("—")) }
                        }
                    }
                }
            } }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AlertColumns {
    /// On the agent page: no agent column.
    Agent,
    /// On the alerts page: everything.
    Full,
}

/// The acknowledge form of one alert: enabled for admin sessions; for
/// read-only ones the button is shown disabled with the reason (the server
/// refuses the action either way).
fn ack_form(user: &ConsoleUser, alert: &AlertRow, back: &str) -> Markup {
    let admin = user.is_admin();
    html! {
        form.ack method="post" action={ "/alerts/" (alert.id) "/ack" } {
            input type="hidden" name="csrf" value=(user.csrf);
            input type="hidden" name="back" value=(back);
            label.sr-only for={ "ack-comment-" (alert.id) } { "Comment for alert " (alert.id) }
            input id={ "ack-comment-" (alert.id) } type="text" name="comment" maxlength="1024" placeholder="Comment (optional)" disabled[!admin];
            button.primary id={ "ack-" (alert.id) } type="submit" disabled[!admin] aria-describedby=[(!admin).then_some("needs-admin")] {
                "Acknowledge"
            }
        }
    }
}

fn deliveries_summary(deliveries: &[DeliveryRow]) -> Markup {
    html! {
        @if deliveries.is_empty() {
            span.muted { "not sent" }
        } @else {
            ul.deliveries {
                @for d in deliveries {
                    li title=[d.last_error.as_deref()] {
                        span.mono { (d.channel) } " " (d.kind) " "
                        span class=(format!("badge dl-{}", d.state)) { (d.state) }
                        @if d.attempts > 1 { span.muted { " ×" (d.attempts) } }
                    }
                }
            }
        }
    }
}

fn alert_table(now: DateTime<Utc>, user: &ConsoleUser, alerts: &[AlertRow], back: &str, cols: AlertColumns) -> Markup {
    let any_firing = alerts.iter().any(|a| a.state == "firing");
    html! {
        @if alerts.is_empty() {
            p.empty { "No alerts." }
        } @else {
            div.table-wrap { table.data.alerts {
                caption.sr-only { "Alerts" }
                thead { tr {
                    th scope="col" { "Alert" }
                    th scope="col" class="hide-xs" { "Severity" }
                    th scope="col" { "State" }
                    th scope="col" class="hide-xs" { "Opened" }
                    th scope="col" class="hide-sm" { "Deliveries" }
                    th scope="col" { "Action" }
                } }
                tbody {
                    @for a in alerts {
                        tr data-alert=(a.id) data-state=(a.state) {
                            td {
                                strong { "#" (a.id) " " (format::words(a.issue_type.as_deref().unwrap_or("alert"))) }
                                // On a phone the severity column gives way to the action's.
                                span.show-xs { " " (severity_badge(&a.severity)) }
                                @if cols == AlertColumns::Full {
                                    @if let Some(agent) = &a.agent_id { " on " (agent_link(agent)) }
                                    @if let Some(channel) = &a.channel { " channel " span.mono { (channel) } }
                                }
                                @if let Some(summary) = &a.summary { p.summary { (summary) } }
                                @if let Some(reason) = &a.suppressed_reason { p.muted { "Not sent: " (reason) } }
                            }
                            td.hide-xs { (severity_badge(&a.severity)) }
                            td data-field="state" {
                                (alert_state_badge(&a.state))
                                @if let Some(by) = &a.acknowledged_by {
                                    p.muted { "by " (by) @if let Some(at) = a.acknowledged_at { " " (when(now, at)) } }
                                    @if let Some(c) = &a.ack_comment { p.muted { "“" (c) "”" } }
                                }
                                @if a.escalation_level > 0 && a.state == "firing" { p.muted { "escalation level " (a.escalation_level) } }
                            }
                            td.hide-xs { (when_opt(now, a.opened_at)) }
                            td.hide-sm { (deliveries_summary(&a.deliveries)) }
                            td {
                                @if a.state == "firing" { (ack_form(user, a, back)) } @else { span.muted { "—" } }
                            }
                        }
                    }
                }
            } }
            @if any_firing && !user.is_admin() {
                p #needs-admin .note { "Acknowledging needs a key with the admin scope; this session's key can only read." }
            }
        }
    }
}

// ------------------------------------------------------------ incidents

pub struct IncidentsView<'a> {
    pub now: DateTime<Utc>,
    pub open: &'a [IncidentRow],
    pub resolved: &'a [IncidentRow],
    pub recoveries: &'a BTreeMap<i64, Vec<ActionRow>>,
    pub alerts: &'a BTreeMap<i64, Vec<AlertRow>>,
    pub days: i32,
    /// The whole counts; the lists stop at a cap.
    pub open_total: i64,
    pub resolved_total: i64,
}

/// Under a list cut at its cap: how many it shows, of how many, and where
/// to find them all.
fn shown_of(shown: usize, total: i64, all: &str) -> Markup {
    html! {
        @if (shown as i64) < total {
            p.note { "Showing " (shown) " of " (total) ". All of them: " code { (all) } }
        }
    }
}

pub fn incidents(v: &IncidentsView<'_>) -> Markup {
    html! {
        div.page-head {
            h1 { "Incidents" }
            p #incidents-sub .sub data-live { (v.open_total) " open · " (v.resolved_total) " resolved in the last " (v.days) " days" }
        }
        section #incidents-open .panel data-live aria-labelledby="io-title" {
            h2 #io-title { "Open" span.count-pill data-count="open" { (v.open_total) } }
            @if v.open.is_empty() {
                p.empty { "No open incidents. All quiet." }
            } @else {
                @for i in v.open { (incident_card(v, i, true)) }
                (shown_of(v.open.len(), v.open_total, "GET /v1/incidents?state=open"))
            }
        }
        section #incidents-resolved .panel data-live aria-labelledby="ir-title" {
            h2 #ir-title { "Resolved recently" span.count-pill { (v.resolved_total) } }
            @if v.resolved.is_empty() {
                p.empty { "Nothing resolved in the last " (v.days) " days." }
            } @else {
                @for i in v.resolved { (incident_card(v, i, false)) }
                (shown_of(v.resolved.len(), v.resolved_total, "GET /v1/incidents?state=resolved"))
            }
        }
    }
}

fn incident_card(v: &IncidentsView<'_>, i: &IncidentRow, open: bool) -> Markup {
    let recoveries = v.recoveries.get(&i.id).map(Vec::as_slice).unwrap_or(&[]);
    let alerts = v.alerts.get(&i.id).map(Vec::as_slice).unwrap_or(&[]);
    let deliveries: usize = alerts.iter().map(|a| a.deliveries.len()).sum();
    html! {
        article.incident data-incident=(i.id) data-state=(i.state) aria-labelledby={ "inc-" (i.id) } {
            header.incident-head {
                (severity_badge(&i.severity))
                h3 id={ "inc-" (i.id) } {
                    (format::words(&i.issue_type))
                    @if let Some(agent) = &i.agent_id { " on " (agent_link(agent)) } @else { " across the fleet" }
                }
                @if i.predicted { span.badge.predicted { "predicted" } }
                span.muted.incident-id { "#" (i.id) }
            }
            p.incident-times {
                "Opened " (when(v.now, i.opened_at))
                @match i.resolved_at {
                    Some(r) => { " · resolved " (when(v.now, r)) " after " (format::span((r - i.opened_at).num_seconds())) }
                    None => { " · open for " (format::span((v.now - i.opened_at).num_seconds())) }
                }
            }
            @if let Some(summary) = &i.summary { p.summary { (summary) } }
            @if let Some(resolution) = &i.resolution { p.muted { "Resolution: " (resolution) } }
            details id={ "inc-" (i.id) "-recovery" } open[open && !recoveries.is_empty()] {
                summary { "Recovery attempts (" (recoveries.len()) ")" }
                (recovery_table(v.now, recoveries))
            }
            details id={ "inc-" (i.id) "-alerts" } open[open && deliveries > 0] {
                summary {
                    "Alerts and deliveries (" (format::counted(alerts.len() as i64, "alert", "alerts")) ", "
                    (format::counted(deliveries as i64, "message", "messages")) ")"
                }
                @if alerts.is_empty() {
                    p.empty { "No alert." }
                } @else {
                    div.table-wrap { table.data {
                        caption.sr-only { "Alerts of incident " (i.id) " and their deliveries" }
                        thead { tr { th scope="col" { "Alert" } th scope="col" { "State" } th scope="col" { "Channel" } th scope="col" { "Kind" } th scope="col" { "Delivery" } th scope="col" { "When" } } }
                        tbody {
                            @for a in alerts {
                                @if a.deliveries.is_empty() {
                                    tr { td { "#" (a.id) } td { (alert_state_badge(&a.state)) } td colspan="4" { span.muted { (a.suppressed_reason.as_deref().map(|r| format!("not sent: {r}")).unwrap_or_else(|| "no message yet".into())) } } }
                                }
                                @for d in &a.deliveries {
                                    tr {
                                        td { "#" (a.id) }
                                        td { (alert_state_badge(&a.state)) }
                                        td.mono { (d.channel) }
                                        td { (d.kind) }
                                        td {
                                            span class=(format!("badge dl-{}", d.state)) { (d.state) }
                                            @if d.attempts > 0 { span.muted { " " (d.attempts) " attempt" @if d.attempts != 1 { "s" } } }
                                            @if let Some(e) = &d.last_error { p.muted.message { (e) } }
                                        }
                                        td { (when(v.now, d.sent_at.unwrap_or(d.created_at))) }
                                    }
                                }
                            }
                        }
                    } }
                }
            }
        }
    }
}

// --------------------------------------------------------------- alerts

/// What the silence form shows again after a refused submission.
#[derive(Debug, Clone, Default)]
pub struct SilenceDraft {
    pub agent_id: String,
    pub issue_type: String,
    pub label: String,
    pub duration: String,
    pub comment: String,
    pub error: Option<String>,
}

pub struct AlertsView<'a> {
    pub now: DateTime<Utc>,
    pub user: &'a ConsoleUser,
    pub firing: &'a [AlertRow],
    pub acknowledged: &'a [AlertRow],
    pub resolved: &'a [AlertRow],
    /// The whole counts; the lists stop at a cap.
    pub firing_total: i64,
    pub acknowledged_total: i64,
    pub silences: &'a [Silence],
    pub draft: &'a SilenceDraft,
    pub flash: Option<(&'static str, String)>,
}

pub const DURATIONS: [(&str, &str); 7] = [
    ("30m", "30 minutes"),
    ("1h", "1 hour"),
    ("2h", "2 hours"),
    ("4h", "4 hours"),
    ("8h", "8 hours"),
    ("24h", "1 day"),
    ("7d", "1 week"),
];

pub fn alerts(v: &AlertsView<'_>) -> Markup {
    let in_force = v.silences.iter().filter(|s| s.starts_at <= v.now).count();
    let scheduled = v.silences.len() - in_force;
    html! {
        div.page-head {
            h1 { "Alerts" }
            p #alerts-sub .sub data-live {
                (v.firing_total) " firing · " (v.acknowledged_total) " acknowledged · "
                (format::counted(in_force as i64, "silence", "silences")) " in force"
                @if scheduled > 0 { " · " (scheduled) " scheduled" }
            }
        }
        @if let Some((kind, text)) = &v.flash { (notice(kind, text)) }
        section #alerts-firing .panel data-live aria-labelledby="af-title" {
            h2 #af-title { "Firing" span.count-pill data-count="firing" { (v.firing_total) } }
            (alert_table(v.now, v.user, v.firing, "/alerts", AlertColumns::Full))
            (shown_of(v.firing.len(), v.firing_total, "GET /v1/alerts?state=firing"))
        }
        section #alerts-acknowledged .panel data-live aria-labelledby="ak-title" {
            h2 #ak-title { "Acknowledged" span.count-pill { (v.acknowledged_total) } }
            (alert_table(v.now, v.user, v.acknowledged, "/alerts", AlertColumns::Full))
            (shown_of(v.acknowledged.len(), v.acknowledged_total, "GET /v1/alerts?state=acknowledged"))
        }
        section #alerts-resolved .panel data-live aria-labelledby="ax-title" {
            h2 #ax-title { "Recently resolved" }
            (alert_table(v.now, v.user, v.resolved, "/alerts", AlertColumns::Full))
        }
        section #silences .panel data-live aria-labelledby="si-title" {
            h2 #si-title { "Silences in force or scheduled" span.count-pill { (v.silences.len()) } }
            @if v.silences.is_empty() {
                p.empty { "No silences. Every alert that matches a route is sent." }
            } @else {
                div.table-wrap { table.data {
                    caption.sr-only { "Silences in force or scheduled" }
                    thead { tr { th scope="col" { "Matches" } th scope="col" { "From" } th scope="col" { "Until" } th scope="col" { "Why" } th scope="col" { "Action" } } }
                    tbody {
                        @for si in v.silences {
                            tr data-silence=(si.id) {
                                td {
                                    ul.chips {
                                        @if let Some(a) = &si.agent_id { li.chip { span.chip-key { "agent" } "=" (a) } }
                                        @if let Some(i) = &si.issue_type { li.chip { span.chip-key { "issue" } "=" (i) } }
                                        @for (k, val) in &si.labels { li.chip { span.chip-key { (k) } "=" (val) } }
                                    }
                                }
                                td { (when(v.now, si.starts_at)) }
                                td { time datetime=(si.ends_at.to_rfc3339()) title=(format::utc(si.ends_at)) { (format::utc(si.ends_at)) } }
                                td { (si.comment) br; span.muted { "by " (si.created_by) } }
                                td {
                                    form method="post" action={ "/silences/" (si.id) "/expire" } {
                                        input type="hidden" name="csrf" value=(v.user.csrf);
                                        button.danger type="submit" id={ "expire-" (si.id) } disabled[!v.user.is_admin()] { "Expire now" }
                                    }
                                }
                            }
                        }
                    }
                } }
            }
        }
        section #new-silence .panel aria-labelledby="ns-title" {
            h2 #ns-title { "New silence" }
            @if v.user.is_admin() {
                (silence_form(v))
            } @else {
                p.note { "Creating and expiring silences needs a key with the admin scope." }
            }
        }
    }
}

fn silence_form(v: &AlertsView<'_>) -> Markup {
    let d = v.draft;
    html! {
        form.silence-form method="post" action="/silences" novalidate {
            input type="hidden" name="csrf" value=(v.user.csrf);
            @if let Some(error) = &d.error { (notice("error", error)) }
            p.muted { "Matching alerts are still recorded but not sent while the silence lasts. Give at least one of agent, issue or label." }
            div.form-grid {
                div.field {
                    label for="s-agent" { "Agent id" }
                    input #s-agent name="agent_id" type="text" value=(d.agent_id) maxlength="128" autocomplete="off" spellcheck="false";
                }
                div.field {
                    label for="s-issue" { "Issue" }
                    select #s-issue name="issue_type" {
                        option value="" { "Any issue" }
                        @for issue in crate::health::incidents::IssueType::ALL {
                            option value=(issue.as_str()) selected[d.issue_type == issue.as_str()] { (format::words(issue.as_str())) }
                        }
                    }
                }
                div.field {
                    label for="s-label" { "Label" }
                    input #s-label name="label" type="text" value=(d.label) placeholder="key=value" maxlength="300" autocomplete="off" spellcheck="false";
                }
                div.field {
                    label for="s-duration" { "For" }
                    select #s-duration name="duration" {
                        @for (value, text) in DURATIONS {
                            option value=(value) selected[d.duration == value || (d.duration.is_empty() && value == "2h")] { (text) }
                        }
                    }
                }
                div.field.field-wide {
                    label for="s-comment" { "Why (required)" }
                    input #s-comment name="comment" type="text" value=(d.comment) maxlength="1024" required;
                }
            }
            button.primary type="submit" { "Create silence" }
        }
    }
}

// ------------------------------------------------------- login, errors

pub struct LoginView<'a> {
    pub login_csrf: &'a str,
    pub next: &'a str,
    pub error: Option<&'a str>,
    /// Said above the form when nothing went wrong ("You have signed out.").
    pub info: Option<&'a str>,
    pub auth_enabled: bool,
}

pub fn login(v: &LoginView<'_>) -> Markup {
    html! {
        div.login {
            div.login-card {
                div.login-brand { (logo()) span { "warden" } }
                h1 { "Sign in to the console" }
                @if let Some(error) = v.error { (notice("error", error)) }
                @else if let Some(info) = v.info { (notice("ok", info)) }
                form method="post" action="/login" autocomplete="off" {
                    input type="hidden" name="login_csrf" value=(v.login_csrf);
                    input type="hidden" name="next" value=(v.next);
                    @if v.auth_enabled {
                        div.field {
                            label for="key" { "API key" }
                            input #key name="key" type="password" required autofocus autocomplete="off" spellcheck="false" placeholder="wdn_…" aria-describedby="key-help";
                            p #key-help .muted {
                                "A key with the read scope shows everything; the admin scope also acknowledges alerts and manages silences. "
                                "Make one with " code { "warden keys create --name NAME --scope read" } "."
                            }
                        }
                    } @else {
                        p.note { "Authentication is off (auth.enabled = false): anyone who reaches warden can use the console." }
                    }
                    button.primary.wide type="submit" { @if v.auth_enabled { "Sign in" } @else { "Open the console" } }
                }
                p.muted.small { "The key is checked once and stays on the server; this browser keeps only a session cookie." }
            }
        }
    }
}

/// A page that explains what went wrong (forbidden, not found, expired form).
pub fn message(title: &str, text: &str, back: Option<(&str, &str)>) -> Markup {
    html! {
        div.page-head { h1 { (title) } }
        section.panel {
            p { (text) }
            @if let Some((href, label)) = back { p { a.button href=(href) { (label) } } }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_minutes_are_misses_not_the_jitter_of_a_one_a_minute_agent() {
        let mut hour = vec![1.0; 60];
        hour[30] = 0.0;
        assert!(silent_minutes(&hour, 1.0).is_empty(), "beating every 61 s: one empty minute an hour");
        assert_eq!(silent_minutes(&hour, 2.0), [30], "a 30 s agent missed two");
        hour[31] = 0.0;
        assert_eq!(silent_minutes(&hour, 1.0), [30, 31], "two in a row are a miss");
        let mut late = vec![0.0; 60];
        late[50..].iter_mut().for_each(|m| *m = 2.0);
        assert!(silent_minutes(&late, 2.0).is_empty(), "before its first beat nothing was due");
        assert!(silent_minutes(&hour, 0.5).is_empty(), "nothing due every minute");
    }
}
