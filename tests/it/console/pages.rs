//! The console in a real headless Chromium: sign in, watch the fleet
//! change live, acknowledge (or be refused), the public status page.

use std::time::Duration;

use serde_json::{Value, json};

use super::browser::Browser;
use super::{alert_state, app, app_with, keys, seed_fleet, take_flaky_offline};
use crate::helpers::TestApp;

const PATIENCE: Duration = Duration::from_secs(30);

async fn sign_in(b: &Browser, app: &TestApp, key: &str) {
    b.goto(&app.url("/")).await;
    b.wait_until("the login page", PATIENCE, "location.pathname === '/login' && document.getElementById('key')").await;
    b.type_into("#key", key).await;
    b.click("form[action='/login'] button[type='submit']").await;
    b.wait_until(
        "the fleet page after signing in",
        PATIENCE,
        "location.pathname === '/' && document.querySelector('h1') && document.querySelector('h1').textContent === 'Fleet'",
    )
    .await;
}

/// The seeded fleet (`seed_fleet`), and a browser signed in to it with a
/// read key, which is returned with it.
async fn signed_in_to_a_seeded_fleet(app: &TestApp) -> (Browser, String) {
    let (ingest, read, _) = keys(app).await;
    seed_fleet(app, &ingest).await;
    let b = Browser::start().await;
    sign_in(&b, app, &read).await;
    (b, read)
}

async fn wait_live(b: &Browser) {
    b.wait_until("the stream to connect", PATIENCE, "document.getElementById('live').dataset.state === 'live'").await;
}

#[tokio::test]
async fn browser_shows_the_fleet_after_signing_in_with_a_read_key() {
    let app = app().await;
    let (b, read) = signed_in_to_a_seeded_fleet(&app).await;

    let ids = b
        .eval("return [...document.querySelectorAll('tr[data-agent]')].map(r => r.dataset.agent).sort()", json!([]))
        .await;
    assert_eq!(ids, json!(["flaky", "steady-1", "steady-2"]));
    assert_eq!(b.text("[data-total='online']").await, "3");
    assert_eq!(b.text("[data-total='offline']").await, "0");
    assert!(b.text("tr[data-agent='steady-1']").await.contains("Steady one"));
    assert_eq!(b.text(".who .scope").await, "read-only");
    // The key stays on the server: not in the URL, and the session cookie is
    // out of the page's reach (HttpOnly).
    let href = b.eval("return location.href", json!([])).await;
    assert!(!href.as_str().unwrap().contains(&read));
    assert_eq!(b.eval("return document.cookie", json!([])).await, json!(""));
    wait_live(&b).await;
    b.screenshot("fleet").await;

    // Sorting: the column header is a link, so it works from the keyboard.
    b.click("th a[href*='sort=score']").await;
    b.wait_until(
        "sorted by score",
        PATIENCE,
        "location.search.includes('sort=score') && document.querySelector('th[aria-sort]')",
    )
    .await;
    // The quick filter narrows the rows as one types.
    b.type_into("#q", "steady").await;
    b.wait_until("the filter to hide flaky", PATIENCE, "document.querySelector(\"tr[data-agent='flaky']\").hidden")
        .await;
    // It looks where the server's search (Enter) does: ids, names and
    // key=value labels, not the liveness or tier shown in the row.
    let clear_quick_filter = || {
        b.eval("var q = document.getElementById('q'); q.value = ''; q.dispatchEvent(new Event('input'));", json!([]))
    };
    clear_quick_filter().await;
    b.type_into("#q", "service=search").await;
    b.wait_until(
        "a label to find flaky alone",
        PATIENCE,
        "!document.querySelector(\"tr[data-agent='flaky']\").hidden \
         && document.querySelector(\"tr[data-agent='steady-1']\").hidden",
    )
    .await;
    clear_quick_filter().await;
    b.type_into("#q", "online").await;
    b.wait_until(
        "a liveness word to match no agent",
        PATIENCE,
        "[...document.querySelectorAll('tr[data-agent]')].every(r => r.hidden)",
    )
    .await;

    // Keyboard: the first Tab reaches the skip link, with a visible outline.
    b.goto(&app.url("/")).await;
    b.wait_until("the fleet page", PATIENCE, "document.querySelector('tr[data-agent]')").await;
    b.press_tab().await;
    let focused = b
        .eval("var e = document.activeElement; return [e.className, getComputedStyle(e).outlineStyle];", json!([]))
        .await;
    assert_eq!(focused[0], "skip", "{focused}");
    assert_ne!(focused[1], "none", "focus is visible: {focused}");

    // A phone: no sideways scrolling of the page itself.
    b.set_size(390, 844).await;
    b.goto(&app.url("/")).await;
    b.wait_until("the fleet page", PATIENCE, "document.querySelector('tr[data-agent]')").await;
    let fits = b.eval("return document.documentElement.scrollWidth <= window.innerWidth + 1", json!([])).await;
    assert_eq!(fits, json!(true), "the page fits a phone's width");
    b.screenshot("fleet-phone").await;
    b.close().await;
}

/// A busy fleet's events do not make every open tab fetch its page back to
/// back: fetches start at least two seconds apart.
#[tokio::test]
async fn browser_a_stream_of_events_refetches_the_page_at_most_every_two_seconds() {
    let app = app().await;
    let (b, _) = signed_in_to_a_seeded_fleet(&app).await;
    wait_live(&b).await;
    b.eval(
        "window.__fetches = []; const f = window.fetch; \
         window.fetch = function () { window.__fetches.push(performance.now()); return f.apply(this, arguments); }",
        json!([]),
    )
    .await;
    // Events for five seconds, ten a second, as a busy fleet sends them.
    let db = app.db.client().await;
    let started = tokio::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(5) {
        db.execute(
            "SELECT pg_notify('warden_events', json_build_object('type', 'incident_opened', 'id', 0)::text)",
            &[],
        )
        .await
        .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    b.wait_until("two refetches", PATIENCE, "window.__fetches.length >= 2").await;
    let starts: Vec<f64> = serde_json::from_value(b.eval("return window.__fetches", json!([])).await).unwrap();
    for pair in starts.windows(2) {
        assert!(pair[1] - pair[0] >= 1_900.0, "fetches {:.0} ms apart: {starts:?}", pair[1] - pair[0]);
    }
}

#[tokio::test]
async fn browser_an_agent_going_offline_updates_its_row_totals_and_incidents_live() {
    let app = app().await;
    let (b, _) = signed_in_to_a_seeded_fleet(&app).await;
    wait_live(&b).await;
    b.eval("window.__samePage = 'yes'", json!([])).await;
    assert_eq!(
        b.eval("return document.querySelector(\"tr[data-agent='flaky']\").dataset.liveness", json!([])).await,
        "online"
    );

    take_flaky_offline(&app).await;
    let committed = tokio::time::Instant::now();
    b.wait_until(
        "flaky's row, the totals and the incident list to update",
        PATIENCE,
        "document.querySelector(\"tr[data-agent='flaky']\").dataset.liveness === 'offline' \
         && document.querySelector(\"tr[data-agent='flaky'] [data-field='liveness']\").innerText.includes('offline') \
         && document.querySelector(\"[data-total='offline']\").textContent === '1' \
         && document.querySelector(\"[data-total='online']\").textContent === '2' \
         && document.querySelector(\"[data-total='open_incidents']\").textContent === '1' \
         && document.getElementById('fleet-incidents').innerText.includes('flaky')",
    )
    .await;
    let latency = committed.elapsed();
    eprintln!("the fleet page showed the change {latency:?} after the transition committed");
    assert_eq!(b.eval("return window.__samePage", json!([])).await, "yes", "updated in place, not reloaded");
    b.screenshot("fleet-offline").await;

    // The incidents page lists it with its recovery attempts and alerts.
    b.goto(&app.url("/incidents")).await;
    b.wait_until("the incidents page", PATIENCE, "document.querySelector('#incidents-open article.incident')").await;
    let card = b.text("#incidents-open article.incident").await;
    assert!(card.contains("Agent unresponsive") && card.contains("flaky"), "{card}");
    assert!(card.contains("Recovery attempts") && card.contains("Alerts and deliveries"), "{card}");
    b.screenshot_page("incidents", 1280).await;

    // The agent page: score breakdown, sparkline, transitions.
    b.goto(&app.url("/agents/flaky")).await;
    b.wait_until("the agent page", PATIENCE, "document.querySelector('#agent-head h1')").await;
    assert!(b.text("#agent-head [data-field='liveness']").await.contains("offline"));
    assert!(
        b.eval("return !!document.querySelector('#agent-heartbeats svg[role=img]')", json!([])).await == json!(true)
    );
    assert!(b.text("#agent-transitions").await.contains("offline"));
    assert!(b.text("#agent-components").await.contains("Heartbeat consistency"));
    b.screenshot_page("agent", 1280).await;
    b.goto(&app.url("/agents/steady-1")).await;
    b.wait_until("the agent page", PATIENCE, "document.querySelector('#agent-components tr[data-component]')").await;
    assert!(b.text("#agent-components").await.contains("Cpu percent"));
    b.screenshot_page("agent-steady", 1280).await;
    b.set_size(390, 844).await;
    b.screenshot_page("agent-phone", 390).await;
    b.close().await;
}

/// The counts under a page's title follow the page live, as its panels do.
#[tokio::test]
async fn browser_the_incidents_page_counts_follow_a_new_incident_live() {
    let app = app().await;
    let (b, _) = signed_in_to_a_seeded_fleet(&app).await;
    b.goto(&app.url("/incidents")).await;
    wait_live(&b).await;
    assert!(b.text("#incidents-sub").await.starts_with("0 open"), "{}", b.text("#incidents-sub").await);
    take_flaky_offline(&app).await;
    b.wait_until(
        "the count under the title and the open list to show flaky's incident",
        PATIENCE,
        "document.getElementById('incidents-sub').innerText.startsWith('1 open') \
         && document.querySelector(\"[data-count='open']\").textContent === '1'",
    )
    .await;
    b.close().await;
}

async fn alerts_page(b: &Browser, app: &TestApp, alert: i64) {
    b.goto(&app.url("/alerts")).await;
    b.wait_until("the alert's row", PATIENCE, &format!("document.querySelector(\"tr[data-alert='{alert}']\")")).await;
}

#[tokio::test]
async fn browser_an_admin_key_acknowledges_an_alert_and_manages_silences() {
    let app = app().await;
    let (ingest, _, admin) = keys(&app).await;
    seed_fleet(&app, &ingest).await;
    let alert = take_flaky_offline(&app).await;
    let b = Browser::start().await;
    sign_in(&b, &app, &admin).await;
    assert_eq!(b.text(".who .scope").await, "admin");
    alerts_page(&b, &app, alert).await;
    b.screenshot_page("alerts", 1280).await;

    b.type_into(&format!("#ack-comment-{alert}"), "looking into it").await;
    b.click(&format!("#ack-{alert}")).await;
    b.wait_until(
        "the acknowledgement",
        PATIENCE,
        &format!(
            "document.querySelector('.notice-ok') && document.querySelector('.notice-ok').innerText.includes('acknowledged') \
             && document.querySelector(\"#alerts-acknowledged tr[data-alert='{alert}']\")"
        ),
    )
    .await;
    assert_eq!(alert_state(&app, alert).await, "acknowledged");
    let row = app
        .db
        .client()
        .await
        .query_one("SELECT acknowledged_by, ack_comment FROM warden.alerts WHERE id = $1", &[&alert])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, Option<String>>(1)),
        ("test".into(), Some("looking into it".into()))
    );
    assert!(b.text(&format!("#alerts-acknowledged tr[data-alert='{alert}']")).await.contains("looking into it"));

    // A silence, created and expired from the page.
    b.type_into("#s-agent", "steady-1").await;
    b.type_into("#s-comment", "planned maintenance").await;
    b.click("#new-silence button[type='submit']").await;
    b.wait_until("the silence", PATIENCE, "document.querySelector('#silences tr[data-silence]')").await;
    assert!(b.text(".notice-ok").await.contains("created"));
    assert_eq!(
        app.count("SELECT count(*) FROM warden.silences WHERE removed_at IS NULL AND agent_id = 'steady-1'").await,
        1
    );
    b.screenshot_page("alerts-acknowledged", 1280).await;
    b.click("#silences button[id^='expire-']").await;
    b.wait_until(
        "the silence to expire",
        PATIENCE,
        "document.querySelector('.notice-ok') && document.querySelector('.notice-ok').innerText.includes('expired')",
    )
    .await;
    assert_eq!(app.count("SELECT count(*) FROM warden.silences WHERE removed_at IS NOT NULL").await, 1);
    b.close().await;
}

#[tokio::test]
async fn browser_a_read_key_cannot_acknowledge() {
    let app = app().await;
    let (ingest, read, _) = keys(&app).await;
    seed_fleet(&app, &ingest).await;
    let alert = take_flaky_offline(&app).await;
    let b = Browser::start().await;
    sign_in(&b, &app, &read).await;
    alerts_page(&b, &app, alert).await;
    let disabled =
        b.eval("return document.getElementById(arguments[0]).disabled", json!([format!("ack-{alert}")])).await;
    assert_eq!(disabled, json!(true), "the button says it cannot be used");
    assert!(b.text("#needs-admin").await.contains("admin scope"));
    assert!(b.text("#new-silence").await.contains("needs a key with the admin scope"));
    b.screenshot("alerts-read-only").await;

    // Forcing the form anyway: the server refuses.
    b.eval(
        "document.getElementById(arguments[0]).disabled = false; document.getElementById(arguments[1]).disabled = false;",
        json!([format!("ack-{alert}"), format!("ack-comment-{alert}")]),
    )
    .await;
    b.click(&format!("#ack-{alert}")).await;
    b.wait_until(
        "the refusal",
        PATIENCE,
        "document.querySelector('h1') && document.querySelector('h1').textContent === 'Not allowed with this key'",
    )
    .await;
    assert_eq!(alert_state(&app, alert).await, "firing");
    b.close().await;
}

#[tokio::test]
async fn browser_the_status_page_shows_groups_and_uptime_without_internals() {
    let app = app_with(|s| {
        s.console.public_status = true;
        s.console.status_title = "Acme status".into();
        s.console.status_cache = warden::config::Duration::from_secs(0);
    })
    .await;
    let (ingest, _, _) = keys(&app).await;
    app.heartbeat(&ingest, json!({"agent_id": "secret-host-9", "name": "Hidden box"})).await;
    seed_fleet(&app, &ingest).await;
    take_flaky_offline(&app).await;

    let b = Browser::start().await;
    b.goto(&app.url("/status")).await;
    b.wait_until(
        "the status page",
        PATIENCE,
        "document.querySelector('h1') && document.querySelector('h1').textContent === 'Acme status'",
    )
    .await;
    let groups: Value = b
        .eval(
            "return [...document.querySelectorAll('article.group')].map(g => [g.dataset.group, g.dataset.state, \
             g.querySelector('.uptime').innerText, g.querySelectorAll('svg.days rect').length, \
             g.querySelector('details.days-short summary')?.textContent ?? null])",
            json!([]),
        )
        .await;
    let groups = groups.as_array().unwrap();
    assert_eq!(groups.len(), 2, "{groups:?}");
    assert_eq!((groups[0][0].as_str(), groups[0][1].as_str()), (Some("Payments"), Some("Up")));
    assert_eq!((groups[1][0].as_str(), groups[1][1].as_str()), (Some("Search"), Some("Down")));
    assert_eq!(groups[0][2], "100% uptime", "a steady group: all of its time up");
    assert!(groups[1][2].as_str().unwrap().ends_with("% uptime"), "{groups:?}");
    assert_eq!(groups[0][3], 90, "a bar per day of the 90");
    // The bars' figures in text too, for touch screens and screen readers.
    assert_eq!(groups[0][4], Value::Null, "no day below 100%: {groups:?}");
    assert_eq!(groups[1][4], "1 day below 100%", "{groups:?}");
    let problems = b.text(".problems").await;
    assert!(problems.contains("Search: Some systems are not responding"), "{problems}");
    assert!(b.text(".overall").await.contains("Some systems are down"));
    let html = b.eval("return document.documentElement.outerHTML", json!([])).await;
    let html = html.as_str().unwrap();
    for internal in [
        "flaky",
        "steady-1",
        "Steady one",
        "secret-host-9",
        "Hidden box",
        "agent_unresponsive",
        "=api",
        "worker",
        "wdn_",
    ] {
        assert!(!html.contains(internal), "the public page shows {internal:?}");
    }
    b.screenshot("status").await;
    b.set_size(390, 844).await;
    b.goto(&app.url("/status")).await;
    b.wait_until("the status page", PATIENCE, "document.querySelector('article.group')").await;
    b.screenshot("status-phone").await;
    b.close().await;
}
