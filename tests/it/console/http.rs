//! The console over plain HTTP: the data is in the HTML (no JavaScript
//! needed), sessions and CSRF rules, the API's session fallback, security
//! headers, and the status page's switch.

use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use serde_json::json;
use warden::console::format::url_encode;

use super::{alert_state, app, app_with, keys, seed_fleet, take_flaky_offline};
use crate::helpers::TestApp;

const FORM: &str = "application/x-www-form-urlencoded";

fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// The value of hidden input `name` in a page.
fn hidden(html: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker).unwrap_or_else(|| panic!("no {name} in the page")) + marker.len();
    html[start..].split('"').next().unwrap().to_string()
}

/// The value a response sets for cookie `name`.
fn set_cookie(response: &reqwest::Response, name: &str) -> Option<(String, String)> {
    response.headers().get_all(SET_COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
        let value = v.strip_prefix(&format!("{name}="))?;
        Some((value.split(';').next().unwrap().to_string(), v.to_string()))
    })
}

/// A signed-in browser, by hand: its session cookie and CSRF token.
struct Session {
    token: String,
    csrf: String,
}

impl Session {
    fn cookie(&self) -> String {
        format!("warden_session={}", self.token)
    }
}

async fn sign_in(app: &TestApp, key: &str) -> Session {
    sign_in_over(app, key, None).await
}

/// Signs in, the browser presenting `before`'s session cookie if given.
async fn sign_in_over(app: &TestApp, key: &str, before: Option<&Session>) -> Session {
    let http = client();
    let page = http.get(app.url("/login")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let (login, _) = set_cookie(&page, "warden_login").expect("the login form sets its cookie");
    let html = page.text().await.unwrap();
    let body = format!("key={}&login_csrf={}&next=%2F", url_encode(key), url_encode(&hidden(&html, "login_csrf")));
    let response = http
        .post(app.url("/login"))
        .header(COOKIE, format!("warden_login={login}"))
        .header(COOKIE, before.map(Session::cookie).unwrap_or_default())
        .header(CONTENT_TYPE, FORM)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[LOCATION], "/");
    let (token, attributes) = set_cookie(&response, "warden_session").expect("a session cookie");
    assert!(attributes.contains("HttpOnly") && attributes.contains("SameSite=Strict"), "{attributes}");
    assert!(attributes.contains("Path=/") && attributes.contains("Max-Age=43200"), "{attributes}");
    let fleet = http.get(app.url("/")).header(COOKIE, format!("warden_session={token}")).send().await.unwrap();
    assert_eq!(fleet.status(), 200);
    let csrf = hidden(&fleet.text().await.unwrap(), "csrf");
    Session { token, csrf }
}

async fn get(app: &TestApp, session: &Session, path: &str) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let response = client().get(app.url(path)).header(COOKIE, session.cookie()).send().await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    (status, headers, response.text().await.unwrap())
}

async fn post_form(app: &TestApp, session: &Session, path: &str, body: &str) -> reqwest::Response {
    client()
        .post(app.url(path))
        .header(COOKIE, session.cookie())
        .header(CONTENT_TYPE, FORM)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn http_a_new_sign_in_ends_the_session_the_browser_presented() {
    let app = app().await;
    let (_, read, admin) = keys(&app).await;
    let first = sign_in(&app, &admin).await;
    let other = sign_in(&app, &read).await;
    let second = sign_in_over(&app, &read, Some(&first)).await;
    assert_ne!(first.token, second.token);
    let (status, headers, _) = get(&app, &first, "/").await;
    assert_eq!(status, StatusCode::SEE_OTHER, "the admin session ended");
    assert!(headers[LOCATION].to_str().unwrap().starts_with("/login"));
    assert_eq!(get(&app, &second, "/").await.0, 200);
    assert_eq!(get(&app, &other, "/").await.0, 200, "other browsers keep theirs");
}

#[tokio::test]
async fn http_pages_carry_their_data_without_javascript() {
    let app = app().await;
    let (ingest, _, admin) = keys(&app).await;
    seed_fleet(&app, &ingest).await;
    let alert = take_flaky_offline(&app).await;
    let session = sign_in(&app, &admin).await;

    let (status, headers, fleet) = get(&app, &session, "/").await;
    assert_eq!(status, 200);
    assert!(headers[CONTENT_TYPE].to_str().unwrap().starts_with("text/html"));
    for needle in [
        "data-agent=\"flaky\" data-liveness=\"offline\"",
        "data-agent=\"steady-1\" data-liveness=\"online\"",
        "Steady one",
        "<span class=\"chip-key\">role</span>=api",
        "data-total=\"offline\">1</span>",
        "data-total=\"online\">2</span>",
        "data-total=\"open_incidents\">1</span>",
        "data-stream=\"/v1/stream\"",
    ] {
        assert!(fleet.contains(needle), "the fleet page lacks {needle}");
    }
    // Security headers, and no inline script anywhere.
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(fleet.matches("<script").count(), 1);
    assert!(fleet.contains("<script src=\"/assets/console.js?v="));

    // Filters and sorting are plain links and forms.
    let (_, _, offline) = get(&app, &session, "/?liveness=offline&sort=score&dir=desc").await;
    assert!(offline.contains("data-agent=\"flaky\"") && !offline.contains("data-agent=\"steady-1\""));
    let (_, _, search) = get(&app, &session, "/?q=worker").await;
    assert!(search.contains("data-agent=\"steady-2\"") && !search.contains("data-agent=\"steady-1\""));
    // A page past the end leads back to the last one with agents.
    let (_, _, beyond) = get(&app, &session, "/?page=5").await;
    assert!(beyond.contains("No agents on this page") && beyond.contains("rel=\"prev\""), "{beyond}");
    assert!(!beyond.contains("page=4"), "not to the empty page before it: {beyond}");
    // Labels are searched as the table shows them, not as JSON.
    let (_, _, search) = get(&app, &session, "/?q=+service%3DSearch").await;
    assert!(search.contains("data-agent=\"flaky\"") && !search.contains("data-agent=\"steady-1\""));
    let (_, _, search) = get(&app, &session, "/?q=service%22%3A+%22Search").await;
    assert!(!search.contains("data-agent=\"flaky\""), "JSON syntax matches nothing");

    let (status, _, agent) = get(&app, &session, "/agents/flaky").await;
    assert_eq!(status, 200);
    for needle in ["Score breakdown", "Heartbeats, last hour", "<svg", "Liveness transitions", "Agent unresponsive"] {
        assert!(agent.contains(needle), "the agent page lacks {needle}");
    }
    let alerts_of =
        |page: &str| page.split("id=\"agent-alerts\"").nth(1).unwrap_or_default().matches("data-alert=").count();
    assert!(alerts_of(&agent) >= 1, "the agent's alert is listed");
    let (status, _, steady) = get(&app, &session, "/agents/steady-1").await;
    assert_eq!(status, 200);
    assert!(steady.contains("data-component=\"heartbeat_consistency\""));
    assert!(steady.contains("Cpu percent"), "the formula's inputs are shown");
    assert_eq!(alerts_of(&steady), 0, "not another agent's");
    assert_eq!(get(&app, &session, "/agents/nobody").await.0, 404);

    let (_, _, incidents) = get(&app, &session, "/incidents").await;
    assert!(incidents.contains("Agent unresponsive") && incidents.contains("href=\"/agents/flaky\""));
    // A message already sent about it, on a channel of its own.
    app.db
        .client()
        .await
        .execute(
            "INSERT INTO warden.alert_deliveries (alert_id, alert_ids, channel, kind, level, state, attempts, sent_at) \
             VALUES ($1, ARRAY[$1::bigint], 'pager_check', 'firing', 0, 'sent', 1, now())",
            &[&alert],
        )
        .await
        .unwrap();
    let (_, _, alerts) = get(&app, &session, "/alerts").await;
    assert!(alerts.contains(&format!("action=\"/alerts/{alert}/ack\"")));
    assert!(alerts.contains(&format!("id=\"ack-{alert}\"")));
    let row = alerts.split(&format!("id=\"ack-{alert}\"")).next().unwrap();
    let row = &row[row.rfind("<tr").unwrap()..];
    assert!(row.contains("pager_check") && row.contains("dl-sent"), "its deliveries are listed: {row}");

    for page in [&fleet, &agent, &incidents, &alerts] {
        assert!(!page.contains(&admin) && !page.contains(&session.token), "no secret in a page");
    }

    // Assets are embedded, versioned and cacheable.
    let js = fleet.split("<script src=\"").nth(1).unwrap().split('"').next().unwrap().replace("&amp;", "&");
    let response = client().get(app.url(&js)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()[CONTENT_TYPE].to_str().unwrap().starts_with("text/javascript"));
    assert!(response.headers()["cache-control"].to_str().unwrap().contains("immutable"));
    assert!(response.text().await.unwrap().contains("EventSource"));
}

/// API calls made with a session cookie spend the bucket of the session's
/// key, like calls made with the key itself.
#[tokio::test]
async fn calls_with_a_session_cookie_are_charged_to_its_key() {
    let app = app_with(|s| {
        s.limits.rate_per_second = 0.001;
        s.limits.burst = 4;
    })
    .await;
    let (_, read, _) = keys(&app).await;
    // Signing in opens the fleet page: the first token.
    let session = sign_in(&app, &read).await;
    let by_cookie = || client().get(app.url("/v1/fleet")).header(COOKIE, session.cookie());
    let by_key = || client().get(app.url("/v1/fleet")).bearer_auth(&read);
    assert_eq!(by_cookie().send().await.unwrap().status(), 200);
    // A write without the session's CSRF token is refused, and paid for.
    let tokenless = client().post(app.url("/v1/silences")).header(COOKIE, session.cookie()).json(&json!({}));
    assert_eq!(tokenless.send().await.unwrap().status(), 403);
    assert_eq!(by_key().send().await.unwrap().status(), 200, "the fourth token");
    let refused = by_key().send().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(by_cookie().send().await.unwrap().status(), 429, "the cookie shares the key's empty bucket");
}

/// nginx's default proxy_pass sends `Host: 127.0.0.1:8080` while the browser
/// says where it was: the sign-in form's origin is then the proxy's
/// X-Forwarded-Host (or alerting.link_base), and still no other site.
#[tokio::test]
async fn signing_in_through_a_proxy_that_rewrites_host_works_and_other_origins_still_do_not() {
    let app = app().await;
    let (_, read, _) = keys(&app).await;
    let attempt = |origin: &'static str, forwarded: Option<&'static str>| {
        let (app, read) = (&app, read.clone());
        async move {
            let http = client();
            let page = http.get(app.url("/login")).send().await.unwrap();
            let (login, _) = set_cookie(&page, "warden_login").unwrap();
            let html = page.text().await.unwrap();
            let body =
                format!("key={}&login_csrf={}&next=%2F", url_encode(&read), url_encode(&hidden(&html, "login_csrf")));
            let mut post = http
                .post(app.url("/login"))
                .header(COOKIE, format!("warden_login={login}"))
                .header(CONTENT_TYPE, FORM)
                .header(reqwest::header::ORIGIN, origin);
            if let Some(forwarded) = forwarded {
                post = post.header("x-forwarded-host", forwarded);
            }
            post.body(body).send().await.unwrap().status()
        }
    };
    assert_eq!(attempt("https://warden.example:8443", Some("warden.example:8443")).await, StatusCode::SEE_OTHER);
    assert_eq!(attempt("https://evil.example", Some("warden.example:8443")).await, StatusCode::FORBIDDEN);
    assert_eq!(attempt("https://warden.example:8443", None).await, StatusCode::FORBIDDEN, "nothing names it");
}

/// Behind a proxy asking for Basic credentials the browser sends them with
/// every request; they are no credential of warden's, and the session
/// still counts.
#[tokio::test]
async fn a_proxys_basic_credentials_beside_a_session_leave_the_session_in_charge() {
    let app = app().await;
    let (_, read, _) = keys(&app).await;
    let session = sign_in(&app, &read).await;
    let basic = "Basic dXNlcjpwYXNzd29yZA==";
    let with_basic = |path: &str| {
        client().get(app.url(path)).header(COOKIE, session.cookie()).header(reqwest::header::AUTHORIZATION, basic)
    };
    assert_eq!(with_basic("/v1/fleet").send().await.unwrap().status(), 200);
    let stream = with_basic("/v1/stream").send().await.unwrap();
    assert_eq!(stream.status(), 200, "the console's live stream");
    drop(stream);
    // Without a session, Basic credentials are no key either.
    let bare = client().get(app.url("/v1/fleet")).header(reqwest::header::AUTHORIZATION, basic);
    assert_eq!(bare.send().await.unwrap().status(), 401);
}

/// Console pages read as much as the API calls behind them, and spend the
/// same allowance.
#[tokio::test]
async fn console_pages_are_charged_to_the_sessions_key() {
    let app = app_with(|s| {
        s.limits.rate_per_second = 0.001;
        s.limits.burst = 3;
    })
    .await;
    let (_, read, _) = keys(&app).await;
    let session = sign_in(&app, &read).await;
    assert_eq!(get(&app, &session, "/alerts").await.0, 200);
    assert_eq!(get(&app, &session, "/").await.0, 200, "the third token");
    let (status, headers, _) = get(&app, &session, "/alerts").await;
    assert_eq!(status, 429);
    assert!(headers.contains_key("retry-after"));
    assert!(headers.get(SET_COOKIE).is_none(), "the session is kept");
}

/// The sign-in page looks up a cookie it is shown, so made-up ones spend
/// the address's failures there too.
#[tokio::test]
async fn made_up_session_cookies_at_the_sign_in_page_use_up_the_address_failures() {
    let app = app_with(|s| {
        s.limits.failed_auth_per_second = 0.001;
        s.limits.failed_auth_burst = 3;
    })
    .await;
    for _ in 0..3 {
        let made_up = format!("warden_session={}", warden::console::session::new_token());
        let page = client().get(app.url("/login")).header(COOKIE, made_up).send().await.unwrap();
        assert_eq!(page.status(), 200, "the form");
    }
    let (_, made_up_key) = warden::auth::generate();
    let refused = client().get(app.url("/v1/fleet")).bearer_auth(made_up_key).send().await.unwrap();
    assert_eq!(refused.status(), 429, "the address has no failures left");
    let made_up = format!("warden_session={}", warden::console::session::new_token());
    let page = client().get(app.url("/login")).header(COOKIE, made_up).send().await.unwrap();
    assert_eq!(page.status(), 200, "still the form, without a lookup");
}

/// Without HTTPS browsers send no Sec-Fetch-Site; the Origin header still
/// tells a sign-in posted from another site's page.
#[tokio::test]
async fn a_sign_in_posted_from_another_origin_is_refused() {
    let app = app().await;
    let (_, read, _) = keys(&app).await;
    let http = client();
    let page = http.get(app.url("/login")).send().await.unwrap();
    let (login, _) = set_cookie(&page, "warden_login").unwrap();
    let html = page.text().await.unwrap();
    let body = format!("key={}&login_csrf={}&next=%2F", url_encode(&read), url_encode(&hidden(&html, "login_csrf")));
    let post = |origin: &str| {
        http.post(app.url("/login"))
            .header(COOKIE, format!("warden_login={login}"))
            .header(CONTENT_TYPE, FORM)
            .header("origin", origin.to_string())
            .body(body.clone())
    };
    let refused = post("http://evil.example").send().await.unwrap();
    assert_eq!(refused.status(), 403);
    assert!(set_cookie(&refused, "warden_session").is_none());
    let own = app.url("");
    let accepted = post(own.trim_end_matches('/')).send().await.unwrap();
    assert_eq!(accepted.status(), StatusCode::SEE_OTHER, "the page's own origin signs in");
    assert!(set_cookie(&accepted, "warden_session").is_some());
}

/// Made-up session cookies on console pages cost a lookup each, so they
/// are charged to the address like made-up keys: once its failures are
/// used up, the API refuses that address's unknown keys at once.
#[tokio::test]
async fn made_up_session_cookies_use_up_the_address_failures() {
    let app = app_with(|s| {
        s.limits.failed_auth_per_second = 0.001;
        s.limits.failed_auth_burst = 3;
    })
    .await;
    for _ in 0..3 {
        let made_up = format!("warden_session={}", warden::console::session::new_token());
        let page = client().get(app.url("/")).header(COOKIE, made_up).send().await.unwrap();
        assert_eq!(page.status(), StatusCode::SEE_OTHER, "to the login page");
    }
    let (_, made_up_key) = warden::auth::generate();
    let refused = client().get(app.url("/v1/fleet")).bearer_auth(made_up_key).send().await.unwrap();
    assert_eq!(refused.status(), 429, "the address has no failures left");
    let made_up = format!("warden_session={}", warden::console::session::new_token());
    let page = client().get(app.url("/")).header(COOKIE, made_up).send().await.unwrap();
    assert_eq!(page.status(), 429, "not looked up, and the cookie is left alone");
    assert!(page.headers().contains_key("retry-after"));
    assert!(page.headers().get(SET_COOKIE).is_none());
}

/// Someone at the same address (a shared proxy) using up its failures
/// does not lock out a session this replica has just seen, in the console
/// or in the API.
#[tokio::test]
async fn a_known_session_keeps_working_from_an_address_out_of_failures() {
    let app = app_with(|s| {
        s.limits.failed_auth_per_second = 0.001;
        s.limits.failed_auth_burst = 3;
    })
    .await;
    let (_, read, _) = keys(&app).await;
    let session = sign_in(&app, &read).await;
    let page = || client().get(app.url("/")).header(COOKIE, session.cookie());
    assert_eq!(page().send().await.unwrap().status(), 200);
    for _ in 0..3 {
        let (_, made_up_key) = warden::auth::generate();
        let refused = client().get(app.url("/v1/fleet")).bearer_auth(made_up_key).send().await.unwrap();
        assert_eq!(refused.status(), 401);
    }
    let (_, made_up_key) = warden::auth::generate();
    let refused = client().get(app.url("/v1/fleet")).bearer_auth(made_up_key).send().await.unwrap();
    assert_eq!(refused.status(), 429, "the address is out of failures");
    let still = page().send().await.unwrap();
    assert_eq!(still.status(), 200);
    assert!(still.headers().get(SET_COOKIE).is_none(), "the session is kept");
    let api = client().get(app.url("/v1/fleet")).header(COOKIE, session.cookie()).send().await.unwrap();
    assert_eq!(api.status(), 200);
}

/// A session acts with its key's limits, the agents it may report for
/// among them.
#[tokio::test]
async fn a_session_of_a_key_limited_to_some_agents_reports_for_those_only() {
    let app = app().await;
    let patterns = ["a*".to_string()];
    let scopes = [warden::auth::Scope::Read, warden::auth::Scope::Ingest];
    let key =
        warden::auth::create_key_for(&app.db.client().await, "a-team", &scopes, Some(&patterns)).await.unwrap().token;
    let session = sign_in(&app, &key).await;
    let beat = |agent: &str| {
        client()
            .post(app.url("/v1/heartbeats"))
            .header(COOKIE, session.cookie())
            .header("x-csrf-token", &session.csrf)
            .json(&json!({"agent_id": agent}))
    };
    assert_eq!(beat("a9").send().await.unwrap().status(), 200);
    let refused = beat("b1").send().await.unwrap();
    assert_eq!(refused.status(), 403);
    let error: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["field"], "agent_id");
    assert_eq!(app.count("SELECT count(*) FROM warden.agent_status WHERE agent_id IN ('a9', 'b1')").await, 1);
}

#[tokio::test]
async fn http_pages_need_a_session_and_sessions_are_hashed_revocable_and_end_at_logout() {
    let app = app().await;
    let (_, read, _) = keys(&app).await;
    let http = client();
    let response = http.get(app.url("/agents/a1")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[LOCATION], "/login?next=%2Fagents%2Fa1");

    let session = sign_in(&app, &read).await;
    // Only a hash of the token is stored, with the key's row: not the key.
    let db = app.db.client().await;
    let rows = db.query("SELECT token_hash, api_key_id FROM warden.console_sessions", &[]).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, Vec<u8>>(0), warden::auth::hash(&session.token).to_vec());
    let dump: String =
        db.query_one("SELECT row_to_json(s)::text FROM warden.console_sessions s", &[]).await.unwrap().get(0);
    assert!(!dump.contains(&session.token) && !dump.contains(&read));

    // The API takes the session in place of a bearer key, to read.
    let api = |path: &str| http.get(app.url(path)).header(COOKIE, session.cookie());
    assert_eq!(api("/v1/fleet").send().await.unwrap().status(), 200);
    let stream = api("/v1/stream").send().await.unwrap();
    assert_eq!(
        (stream.status().as_u16(), stream.headers()[CONTENT_TYPE].to_str().unwrap()),
        (200, "text/event-stream")
    );
    drop(stream);
    // A request with a bearer key is judged by the key alone.
    assert_eq!(api("/v1/fleet").bearer_auth("wdn_nope").send().await.unwrap().status(), 401);
    // Changing things with only a cookie: no.
    let silence = json!({"agent_id": "a1", "duration": "1h", "comment": "x"});
    let post = || http.post(app.url("/v1/silences")).header(COOKIE, session.cookie()).json(&silence);
    assert_eq!(post().send().await.unwrap().status(), 403, "no CSRF header");
    assert_eq!(post().header("x-csrf-token", &session.csrf).send().await.unwrap().status(), 403, "read scope");

    // Logging out deletes the session.
    let wrong = post_form(&app, &session, "/logout", "csrf=nope").await;
    assert_eq!(wrong.status(), 403);
    let out = post_form(&app, &session, "/logout", &format!("csrf={}", session.csrf)).await;
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert_eq!(out.headers()[LOCATION], "/login?signed_out=1");
    assert!(set_cookie(&out, "warden_session").unwrap().1.contains("Max-Age=0"));
    let page = client().get(app.url("/login?signed_out=1")).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("You have signed out."), "the sign-in page says so");
    assert_eq!(app.count("SELECT count(*) FROM warden.console_sessions").await, 0);
    assert_eq!(get(&app, &session, "/").await.0, StatusCode::SEE_OTHER);
    assert_eq!(api("/v1/fleet").send().await.unwrap().status(), 401);

    // Revoking the key ends its sessions at once.
    let session = sign_in(&app, &read).await;
    let key_id = warden::auth::key_id_of(&read).unwrap().to_string();
    assert!(warden::auth::revoke_key(&db, &key_id).await.unwrap());
    assert_eq!(get(&app, &session, "/").await.0, StatusCode::SEE_OTHER);
    let after = http.get(app.url("/v1/fleet")).header(COOKIE, session.cookie()).send().await.unwrap();
    assert_eq!(after.status(), 401);
}

#[tokio::test]
async fn http_actions_need_the_admin_scope_the_csrf_token_and_the_same_site() {
    let app = app().await;
    let (ingest, read, admin) = keys(&app).await;
    seed_fleet(&app, &ingest).await;
    let alert = take_flaky_offline(&app).await;
    let path = format!("/alerts/{alert}/ack");

    // Signing in needs the form's own cookie, and a valid key.
    let no_cookie = client()
        .post(app.url("/login"))
        .header(CONTENT_TYPE, FORM)
        .body(format!("key={}&login_csrf=abc&next=%2F", url_encode(&admin)))
        .send()
        .await
        .unwrap();
    assert_eq!(no_cookie.status(), 403);
    assert!(set_cookie(&no_cookie, "warden_session").is_none());
    let page = client().get(app.url("/login")).send().await.unwrap();
    let (login, _) = set_cookie(&page, "warden_login").unwrap();
    let token = hidden(&page.text().await.unwrap(), "login_csrf");
    let bad_key = client()
        .post(app.url("/login"))
        .header(COOKIE, format!("warden_login={login}"))
        .header(CONTENT_TYPE, FORM)
        .body(format!("key=wdn_000000000000_{}&login_csrf={token}", "0".repeat(64)))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_key.status(), 401);
    assert!(set_cookie(&bad_key, "warden_session").is_none());

    let admin_session = sign_in(&app, &admin).await;
    let wrong = post_form(&app, &admin_session, &path, "csrf=0000&comment=x").await;
    assert_eq!(wrong.status(), 403);
    let cross = client()
        .post(app.url(&path))
        .header(COOKIE, admin_session.cookie())
        .header(CONTENT_TYPE, FORM)
        .header("sec-fetch-site", "cross-site")
        .body(format!("csrf={}", admin_session.csrf))
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 403);
    let read_session = sign_in(&app, &read).await;
    let refused = post_form(&app, &read_session, &path, &format!("csrf={}", read_session.csrf)).await;
    assert_eq!(refused.status(), 403);
    assert!(refused.text().await.unwrap().contains("Not allowed with this key"));
    assert_eq!(alert_state(&app, alert).await, "firing");

    // What PostgreSQL cannot store is refused with the form's reason, not failed.
    let nul = post_form(&app, &admin_session, &path, &format!("csrf={}&comment=a%00b", admin_session.csrf)).await;
    assert_eq!(nul.status(), 422);
    assert!(nul.text().await.unwrap().contains("U+0000"));
    assert_eq!(alert_state(&app, alert).await, "firing");
    let long = format!("csrf={}&comment={}", admin_session.csrf, "x".repeat(1025));
    let long = post_form(&app, &admin_session, &path, &long).await;
    assert_eq!(long.status(), 422, "refused, not cut short");
    assert!(long.text().await.unwrap().contains("at most 1024 characters"));
    assert_eq!(alert_state(&app, alert).await, "firing");
    let (searched, _, _) = get(&app, &admin_session, "/?q=a%00b").await;
    assert_eq!(searched, 200);

    let done = post_form(&app, &admin_session, &path, &format!("csrf={}&comment=on+it", admin_session.csrf)).await;
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    assert_eq!(done.headers()[LOCATION].to_str().unwrap(), format!("/alerts?done=acked&alert={alert}"));
    assert_eq!(alert_state(&app, alert).await, "acknowledged");

    // Silences from the form: refused with a reason, then made.
    let bad =
        post_form(&app, &admin_session, "/silences", &format!("csrf={}&duration=2h&comment=x", admin_session.csrf))
            .await;
    assert_eq!(bad.status(), 422);
    assert!(bad.text().await.unwrap().contains("a silence must match something"));
    for (fields, reason) in [
        ("agent_id=steady-1&duration=2h&comment=a%00b", "U+0000"),
        ("label=role%3Dapi%00&duration=2h&comment=x", "control characters"),
        ("label=bad+key%3Dx&duration=2h&comment=x", "names are 1-63"),
    ] {
        let refused =
            post_form(&app, &admin_session, "/silences", &format!("csrf={}&{fields}", admin_session.csrf)).await;
        assert_eq!(refused.status(), 422, "{fields}");
        let page = refused.text().await.unwrap();
        assert!(page.contains(reason), "{fields}: {page}");
    }
    assert_eq!(app.count("SELECT count(*) FROM warden.silences").await, 0);
    let made = post_form(
        &app,
        &admin_session,
        "/silences",
        &format!(
            "csrf={}&agent_id=steady-1&issue_type=&label=role%3Dapi&duration=2h&comment=deploy",
            admin_session.csrf
        ),
    )
    .await;
    assert_eq!(made.status(), StatusCode::SEE_OTHER);
    assert_eq!(app.count("SELECT count(*) FROM warden.silences WHERE labels = '{\"role\": \"api\"}'").await, 1);

    // The JSON API with an admin session and its CSRF header.
    let created = client()
        .post(app.url("/v1/silences"))
        .header(COOKIE, admin_session.cookie())
        .header("x-csrf-token", &admin_session.csrf)
        .json(&json!({"agent_id": "steady-2", "duration": "1h", "comment": "from a script in the console"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    // Without its token the session is refused as such, not as keyless.
    for token in [None, Some("0".repeat(64))] {
        let mut request = client()
            .post(app.url("/v1/silences"))
            .header(COOKIE, admin_session.cookie())
            .json(&json!({"agent_id": "steady-3", "duration": "1h", "comment": "no token"}));
        if let Some(token) = &token {
            request = request.header("x-csrf-token", token);
        }
        let refused = request.send().await.unwrap();
        assert_eq!(refused.status(), 403, "{token:?}");
        let body: serde_json::Value = refused.json().await.unwrap();
        assert!(body["error"]["message"].as_str().unwrap().contains("X-CSRF-Token"), "{body}");
    }
    assert_eq!(app.count("SELECT count(*) FROM warden.silences WHERE agent_id = 'steady-3'").await, 0);

    // A silence that starts later reads as scheduled, not in force.
    let later = (chrono::Utc::now() + chrono::Duration::days(3) + chrono::Duration::hours(1)).to_rfc3339();
    let scheduled = client()
        .post(app.url("/v1/silences"))
        .header(COOKIE, admin_session.cookie())
        .header("x-csrf-token", &admin_session.csrf)
        .json(&json!({"agent_id": "steady-2", "starts_at": later, "duration": "1h", "comment": "next week's window"}))
        .send()
        .await
        .unwrap();
    assert_eq!(scheduled.status(), 201);
    let (status, _, page) = get(&app, &admin_session, "/alerts").await;
    assert_eq!(status, 200);
    assert!(page.contains("2 silences in force · 1 scheduled"), "{page}");
    assert!(page.contains(">in 3d</time>"), "{page}");
}

#[tokio::test]
async fn http_the_status_page_is_public_only_when_enabled_and_the_console_can_be_off() {
    let off = app().await;
    assert_eq!(off.get("/status").await.status(), 404);
    let app = app_with(|s| {
        s.console.public_status = true;
        s.console.enabled = false;
        s.console.status_accent = "#123456".into();
        s.console.status_logo = "https://cdn.example.com/logo.svg".into();
    })
    .await;
    let (ingest, _, _) = keys(&app).await;
    seed_fleet(&app, &ingest).await;
    // The console is off: no pages, no login.
    assert_eq!(app.get("/").await.status(), 404);
    assert_eq!(app.get("/login").await.status(), 404);

    let response = app.get("/status").await;
    assert_eq!(response.status(), 200);
    let csp = response.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("img-src 'self' data: https://cdn.example.com;") && !csp.contains("script-src"), "{csp}");
    assert_eq!(response.headers()["x-frame-options"], "DENY");
    let html = response.text().await.unwrap();
    assert!(html.contains("data-group=\"Payments\" data-state=\"Up\""), "{html}");
    assert!(html.contains("data-group=\"Search\" data-state=\"Up\""));
    assert!(html.contains("src=\"https://cdn.example.com/logo.svg\""));
    assert!(!html.contains("<script"));
    for internal in ["flaky", "steady-1", "Steady one"] {
        assert!(!html.contains(internal), "the status page shows {internal}");
    }
    let theme = app.get("/status/theme.css").await.text().await.unwrap();
    assert!(theme.contains("--accent:#123456"), "{theme}");
}

#[tokio::test]
async fn http_the_status_page_shows_only_the_groups_it_lists() {
    let app = app_with(|s| {
        s.console.public_status = true;
        s.console.status_groups = vec!["Payments".into()];
    })
    .await;
    let (ingest, _, _) = keys(&app).await;
    seed_fleet(&app, &ingest).await;
    // An agent names a group of its own choosing.
    let beat = app
        .post(
            "/v1/heartbeats",
            &ingest,
            &json!({"agent_id": "intruder", "labels": {"service": "Reset your password at evil.example"}}),
        )
        .await;
    assert_eq!(beat.status(), 200);
    let html = app.get("/status").await.text().await.unwrap();
    assert!(html.contains("data-group=\"Payments\""), "{html}");
    // A label value set right to left cannot turn the words around it.
    assert!(html.contains("<h3><bdi>Payments</bdi></h3>"), "{html}");
    assert!(!html.contains("data-group=\"Search\""), "not listed: {html}");
    assert!(!html.contains("evil.example"), "{html}");
}

#[tokio::test]
async fn http_with_authentication_off_the_console_opens_without_a_key() {
    let app = app_with(|s| s.auth.enabled = false).await;
    let http = client();
    let page = http.get(app.url("/login")).send().await.unwrap();
    let (login, _) = set_cookie(&page, "warden_login").unwrap();
    let html = page.text().await.unwrap();
    assert!(html.contains("Authentication is off") && !html.contains("name=\"key\""));
    let response = http
        .post(app.url("/login"))
        .header(COOKIE, format!("warden_login={login}"))
        .header(CONTENT_TYPE, FORM)
        .body(format!("login_csrf={}&next=%2Fincidents", hidden(&html, "login_csrf")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[LOCATION], "/incidents");
    let (token, _) = set_cookie(&response, "warden_session").unwrap();
    let session = Session { token, csrf: String::new() };
    let (status, _, html) = get(&app, &session, "/incidents").await;
    assert_eq!(status, 200);
    assert!(html.contains("anonymous") && html.contains("scope-admin"));
}

#[tokio::test]
async fn http_guessing_keys_at_sign_in_empties_the_failure_bucket_like_the_api() {
    let app = app_with(|s| {
        s.limits.failed_auth_burst = 3;
        s.limits.failed_auth_per_second = 0.01;
    })
    .await;
    let (_, read, _) = keys(&app).await;
    let http = client();
    // A colleague behind the same address uses the API: their key is known.
    assert_eq!(http.get(app.url("/v1/fleet")).bearer_auth(&read).send().await.unwrap().status(), 200);
    let page = http.get(app.url("/login")).send().await.unwrap();
    let (login, _) = set_cookie(&page, "warden_login").unwrap();
    let token = hidden(&page.text().await.unwrap(), "login_csrf");
    let sign_in_with = |key: String| {
        http.post(app.url("/login"))
            .header(COOKIE, format!("warden_login={login}"))
            .header(CONTENT_TYPE, FORM)
            .body(format!("key={}&login_csrf={token}&next=%2F", url_encode(&key)))
            .send()
    };
    let mut statuses = Vec::new();
    for i in 0..5 {
        let response = sign_in_with(format!("wdn_{i:012}_{}", "0".repeat(64))).await.unwrap();
        statuses.push(response.status().as_u16());
        if response.status() == 429 {
            assert!(response.headers().contains_key("retry-after"));
            let html = response.text().await.unwrap();
            assert!(html.contains("Too many failed sign-ins"), "the console's own page: {html}");
        }
    }
    assert_eq!(statuses, [401, 401, 401, 429, 429], "the burst, then refused without a lookup");
    // The API shares the address's bucket.
    let bearer = format!("wdn_000000000009_{}", "0".repeat(64));
    let api = http.get(app.url("/v1/fleet")).bearer_auth(bearer).send().await.unwrap();
    assert_eq!(api.status(), 429);
    // A key this replica verified recently still signs in from there.
    assert_eq!(sign_in_with(read.clone()).await.unwrap().status(), StatusCode::SEE_OTHER);
}

/// The status page's uptime and its daily bars come from one pass over the
/// liveness spans; the figure for the range agrees with the reporting
/// function over the same days.
#[tokio::test]
async fn http_the_status_page_uptime_agrees_with_the_reports() {
    let app = app().await;
    let (ingest, _, _) = keys(&app).await;
    seed_fleet(&app, &ingest).await;
    take_flaky_offline(&app).await;
    let mut settings = crate::helpers::default_settings().console;
    settings.status_group_label = "service".into();
    let mut client = app.db.client().await;
    let snapshot = warden::console::status::compute(&mut client, &settings).await.unwrap();
    let search = snapshot.groups.iter().find(|g| g.name == "Search").expect("the Search group");
    let uptime = search.uptime.expect("an uptime");
    assert!(uptime < 100.0, "flaky went offline: {uptime}");
    let since = snapshot.generated_at.date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc() - chrono::Duration::days(89);
    let row = client
        .query_one(
            "SELECT sum(online_seconds + degraded_seconds), sum(observed_seconds) \
             FROM warden.liveness_time($1, $2) WHERE agent_id = 'flaky'",
            &[&since, &snapshot.generated_at],
        )
        .await
        .unwrap();
    let (up, observed): (f64, f64) = (row.get(0), row.get(1));
    let expected = 100.0 * up / observed;
    assert!((uptime - expected).abs() < 0.01, "status page {uptime} against the reports' {expected}");
    let days_with_data: Vec<f64> = search.days.iter().filter_map(|d| d.pct).collect();
    if days_with_data.len() == 1 {
        assert!((days_with_data[0] - uptime).abs() < 0.01, "one day: its bar is the range");
    }
}

/// `/status` needs no key: a crowd of requests finding the copy stale
/// computes it once, not once each.
#[tokio::test]
async fn http_the_status_page_is_computed_once_for_a_crowd() {
    let db = crate::helpers::TestDb::migrated().await;
    let pool = warden::db::build_pool(db.config.clone(), &crate::helpers::default_settings().database).unwrap();
    let mut settings = crate::helpers::default_settings().console;
    settings.status_group_label = "team".into();
    // Every copy is stale at once: still one computation per crowd, the
    // first crowd waiting for it, the next served the stale copy meanwhile.
    settings.status_cache = warden::config::Duration::from_secs(0);
    let cache = warden::console::status::Cache::default();
    for crowd in 1..=2 {
        let pages = futures_util::future::join_all((0..20).map(|_| cache.get(&pool, &settings))).await;
        assert!(pages.iter().all(Result::is_ok));
        assert_eq!(cache.computations(), crowd);
    }

    // A database that cannot be reached: the failure is repeated to the
    // crowd, not retried by each.
    drop(pool);
    let mut dead = db.config.clone();
    dead.port(1);
    let pool = warden::db::build_pool(dead, &crate::helpers::default_settings().database).unwrap();
    let fresh_cache = warden::console::status::Cache::default();
    let failures = futures_util::future::join_all((0..20).map(|_| fresh_cache.get(&pool, &settings))).await;
    assert!(failures.iter().all(Result::is_err));
    assert_eq!(fresh_cache.computations(), 1);
    // A cache that has a page keeps serving it while the database fails
    // (the page's "Updated" time says how old it is).
    let stale = cache.get(&pool, &settings).await;
    assert!(stale.is_ok(), "the last page there was, not an error");
    assert_eq!(cache.computations(), 3, "it did try");
}

/// The pages list the first 200 open incidents and 500 firing alerts; the
/// counts they print are the whole numbers, and a cut list says so.
#[tokio::test]
async fn http_lists_cut_at_their_cap_say_how_many_there_are_in_all() {
    let app = app().await;
    let (_, read, _) = keys(&app).await;
    app.db
        .client()
        .await
        .batch_execute(
            "INSERT INTO warden.incidents (agent_id, issue_type, severity) \
               SELECT 'many-' || n, 'agent_unresponsive', 'critical' FROM generate_series(1, 205) n; \
             INSERT INTO warden.alerts (dedup_key, severity, state, escalation_level, opened_at) \
               SELECT 'many-' || n || ':x', 'critical', 'firing', 1, now() FROM generate_series(1, 503) n;",
        )
        .await
        .unwrap();
    let session = sign_in(&app, &read).await;
    let (_, _, incidents) = get(&app, &session, "/incidents").await;
    assert!(incidents.contains("205 open ·"), "{incidents}");
    assert!(incidents.contains("Showing 200 of 205."), "the list is cut");
    assert!(incidents.matches("href=\"/agents/many-").count() >= 200);
    let (_, _, alerts) = get(&app, &session, "/alerts").await;
    assert!(alerts.contains("503 firing ·"));
    assert!(alerts.contains("Showing 500 of 503."));
    assert!(!alerts.contains("Showing 0 of"), "a list that is whole says nothing");
}

#[tokio::test]
async fn http_a_form_over_the_consoles_limit_is_413_on_a_page() {
    let app = app().await;
    let (_, _, admin) = keys(&app).await;
    let huge = format!("key={}&login_csrf=x&next=%2F", "k".repeat(100 * 1024));
    let response = client().post(app.url("/login")).header(CONTENT_TYPE, FORM).body(huge.clone()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(response.headers()[CONTENT_TYPE].to_str().unwrap().starts_with("text/html"), "a page, not JSON");
    assert!(response.text().await.unwrap().contains("too large"));

    let session = sign_in(&app, &admin).await;
    let response =
        post_form(&app, &session, "/logout", &format!("csrf={}&pad={}", session.csrf, "p".repeat(100 * 1024))).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _, _) = get(&app, &session, "/").await;
    assert_eq!(status, StatusCode::OK, "the session was not ended by the refused form");
}

#[tokio::test]
async fn http_a_logout_ends_the_sessions_open_live_streams_within_seconds() {
    // Key lookups are cached for auth.cache_ttl, and a bearer key's stream
    // is checked at that pace; a session is looked up afresh at every
    // check, so its streams are checked every few seconds whatever the
    // cache's age (here ten minutes).
    let app = app_with(|s| s.auth.cache_ttl = warden::config::Duration::from_secs(600)).await;
    let (_, read, _) = keys(&app).await;
    let session = sign_in(&app, &read).await;
    let other = sign_in(&app, &read).await;
    let open = |s: &Session| {
        client()
            .get(app.url("/v1/stream"))
            .header(COOKIE, s.cookie())
            .timeout(std::time::Duration::from_secs(300))
            .send()
    };
    let (mut ending, mut staying) = (open(&session).await.unwrap(), open(&other).await.unwrap());
    assert_eq!((ending.status(), staying.status()), (StatusCode::OK, StatusCode::OK));
    let first = tokio::time::timeout(std::time::Duration::from_secs(30), ending.chunk()).await;
    assert!(matches!(first, Ok(Ok(Some(_)))), "the stream is open: {first:?}");

    let response = post_form(&app, &session, "/logout", &format!("csrf={}", session.csrf)).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let ended = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(_chunk) = ending.chunk().await.unwrap_or(None) {}
    })
    .await;
    assert!(ended.is_ok(), "the logged-out session's stream is still open after a minute");
    let more = tokio::time::timeout(std::time::Duration::from_secs(20), staying.chunk()).await;
    assert!(matches!(more, Ok(Ok(Some(_)))), "another session's stream stays open: {more:?}");
}

#[tokio::test]
async fn http_a_forms_address_asked_for_with_get_goes_back_to_its_page() {
    // A form's error page stays at the address it was posted to; its
    // reload and its live refresh ask for that address with GET.
    let app = app().await;
    let (_, _, admin) = keys(&app).await;
    let session = sign_in(&app, &admin).await;
    for (path, to) in
        [("/silences", "/alerts"), ("/alerts/1/ack", "/alerts"), ("/silences/1/expire", "/alerts"), ("/logout", "/")]
    {
        let response = client().get(app.url(path)).header(COOKIE, session.cookie()).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(response.headers()[LOCATION], to, "{path}");
    }
    let (status, _, _) = get(&app, &session, "/").await;
    assert_eq!(status, StatusCode::OK, "a GET of /logout does not log out");
}

#[tokio::test]
async fn http_sorting_by_agent_follows_the_shown_names_numbers_in_order() {
    let app = app().await;
    let (ingest, read, _) = keys(&app).await;
    for (id, name) in [("w10", None), ("w2", None), ("a-z", Some("Zulu")), ("w1", None), ("b-a", Some("alpha"))] {
        let mut beat = json!({"agent_id": id});
        if let Some(name) = name {
            beat["name"] = json!(name);
        }
        assert_eq!(app.heartbeat(&ingest, beat).await.0, 200);
    }
    let session = sign_in(&app, &read).await;
    let order = |html: &str| -> Vec<String> {
        html.split("data-agent=\"").skip(1).map(|s| s[..s.find('"').unwrap()].to_string()).collect()
    };
    let (_, _, html) = get(&app, &session, "/?sort=agent").await;
    assert_eq!(order(&html), ["b-a", "w1", "w2", "w10", "a-z"], "alpha, w1, w2, w10, Zulu");
    let (_, _, html) = get(&app, &session, "/?sort=agent&dir=desc").await;
    let mut reversed = order(&html);
    reversed.reverse();
    assert_eq!(reversed, ["b-a", "w1", "w2", "w10", "a-z"]);

    // None is scored yet: the tier bar counts them as unscored, and the
    // tier filter can show just those.
    app.db
        .client()
        .await
        .execute("UPDATE warden.agent_status SET score = 90, tier = 'excellent' WHERE agent_id = 'w1'", &[])
        .await
        .unwrap();
    let (_, _, html) = get(&app, &session, "/?tier=unscored&sort=agent").await;
    assert_eq!(order(&html), ["b-a", "w2", "w10", "a-z"]);
    assert!(html.contains(r#"<option value="unscored" selected>"#), "the filter shows what it filters by");
    assert!(!html.contains("notice-warn"), "nothing was left out");

    // A value the page does not know (a stale bookmark) is left out, and
    // the page says so instead of showing more than was asked for.
    let (status, _, html) = get(&app, &session, "/?tier=unscored&liveness=asleep&sort=agent&page=0").await;
    assert_eq!(status, 200);
    assert_eq!(order(&html), ["b-a", "w2", "w10", "a-z"], "the filters it knows still apply");
    assert!(
        html.contains(
            "Left out <code>liveness=asleep</code>: liveness takes one of unknown, online, degraded or offline."
        ),
        "{html}"
    );
    assert!(html.contains("Left out <code>page=0</code>"));
    let (_, _, html) = get(&app, &session, "/?tier=<b>x</b>").await;
    assert!(html.contains("Left out <code>tier=&lt;b&gt;x&lt;/b&gt;</code>: tier takes one of excellent, good, fair, poor, critical or unscored."));
}
