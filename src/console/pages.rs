//! Handlers of the console's pages and forms.
//!
//! Every page needs a session ([`ConsoleUser`]; without one it redirects
//! to the login page). Every form is a POST that carries the session's
//! CSRF token, is refused when the browser says it came from another site
//! (`Sec-Fetch-Site`), and answers with a redirect (303) so a reload never
//! repeats it. Actions that change something also need the admin scope,
//! checked here whatever the page showed.

use std::collections::{BTreeMap, HashMap};

use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, Query, State};
use axum::http::header::SET_COOKIE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::Utc;
use maud::Markup;
use serde::Deserialize;

use super::data::{self, FleetFilter};
use super::format;
use super::session::{self, ConsoleUser};
use super::templates::{self, Chrome, Nav, SilenceDraft};
use crate::alerting::escalation::AlertState;
use crate::alerting::silences::{self, NewSilence};
use crate::alerting::store::{self, AckError};
use crate::api::{ApiError, AppState};
use crate::auth::{AuthError, Scope};
use crate::db;
use crate::model::AgentId;

type PageResult = Result<Response, Response>;

/// Incidents resolved within this many days are listed.
const RESOLVED_DAYS: i32 = 7;

fn html(status: StatusCode, markup: Markup) -> Response {
    (status, Html(markup.into_string())).into_response()
}

/// A whole page with the console's frame.
fn framed(status: StatusCode, chrome: &Chrome<'_>, content: Markup) -> Response {
    html(status, templates::page(chrome, content))
}

/// An explanation page: what went wrong and where to go.
pub fn problem(status: StatusCode, user: Option<&ConsoleUser>, title: &str, text: &str) -> Response {
    let chrome = Chrome { title, nav: Nav::None, user, stream: None, refresh: None };
    let back = if user.is_some() { Some(("/", "Back to the fleet")) } else { Some(("/login", "Sign in")) };
    framed(status, &chrome, templates::message(title, text, back))
}

/// A database failure as a page (logged once by the conversion to ApiError).
fn failure(user: &ConsoleUser, e: impl Into<ApiError>) -> Response {
    let e: ApiError = e.into();
    let text = if e.status == StatusCode::SERVICE_UNAVAILABLE {
        "The database is unavailable right now. Try again in a few seconds."
    } else {
        "Something went wrong on warden's side; the details are in its log."
    };
    let mut response = problem(e.status, Some(user), "Something went wrong", text);
    if let Some(seconds) = e.retry_after {
        response.headers_mut().insert(axum::http::header::RETRY_AFTER, seconds.into());
    }
    response
}

async fn client(state: &AppState, user: &ConsoleUser) -> Result<db::Client, Response> {
    db::client(&state.pool).await.map_err(|e| failure(user, e))
}

/// Whether the browser says the request came from another site.
fn cross_site(headers: &HeaderMap) -> bool {
    matches!(headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()), Some("cross-site" | "same-site"))
}

/// The checks every console form passes before it does anything. (The
/// refusal is a whole response, as axum handlers return; its size is fine.)
#[allow(clippy::result_large_err)]
fn check_form(user: &ConsoleUser, headers: &HeaderMap, csrf: &str) -> Result<(), Response> {
    if cross_site(headers) || !user.csrf_ok(csrf) {
        return Err(problem(
            StatusCode::FORBIDDEN,
            Some(user),
            "This form has expired",
            "The form did not carry this session's security token (it may come from an older session or from \
             another site). Reload the page and try again.",
        ));
    }
    Ok(())
}

#[allow(clippy::result_large_err)]
fn needs_admin(user: &ConsoleUser, what: &str) -> Result<(), Response> {
    if user.is_admin() {
        return Ok(());
    }
    Err(problem(
        StatusCode::FORBIDDEN,
        Some(user),
        "Not allowed with this key",
        &format!(
            "{what} needs a key with the admin scope; this session's key can only read. Sign in with an admin key."
        ),
    ))
}

fn bad_form(user: Option<&ConsoleUser>, e: FormRejection) -> Response {
    problem(form_status(&e), user, "The form could not be read", &e.body_text())
}

/// 413 for a form over the console's limit and 415 for a body that is not
/// a form, as the rejection says; 400 for one that does not parse (axum
/// would say 422, which the console's pages have never answered).
fn form_status(e: &FormRejection) -> StatusCode {
    match e.status() {
        s @ (StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE) => s,
        _ => StatusCode::BAD_REQUEST,
    }
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

// ---------------------------------------------------------------- pages

pub async fn fleet(
    State(state): State<AppState>,
    user: ConsoleUser,
    Query(query): Query<HashMap<String, String>>,
) -> PageResult {
    let filter = FleetFilter::from_query(&query);
    let client = client(&state, &user).await?;
    let totals = crate::api::read::fleet_totals(&client).await.map_err(|e| failure(&user, e))?;
    let (agents, matching) = data::agents(&client, &filter).await.map_err(|e| failure(&user, e))?;
    let incidents = data::open_incidents(&client, None, 10).await.map_err(|e| failure(&user, e))?;
    let view = templates::FleetView {
        now: Utc::now(),
        totals: &totals,
        agents: &agents,
        matching,
        filter: &filter,
        incidents: &incidents,
    };
    let chrome = Chrome {
        title: "Fleet",
        nav: Nav::Fleet,
        user: Some(&user),
        stream: Some("/v1/stream".into()),
        refresh: Some(60),
    };
    Ok(framed(StatusCode::OK, &chrome, templates::fleet(&view)))
}

pub async fn agent(State(state): State<AppState>, user: ConsoleUser, Path(id): Path<String>) -> PageResult {
    let Ok(id) = AgentId::parse(id) else {
        return Err(problem(StatusCode::NOT_FOUND, Some(&user), "No such agent", "That is not a valid agent id."));
    };
    let client = client(&state, &user).await?;
    let Some(agent) = crate::api::read::agent_detail(&client, &id).await.map_err(|e| failure(&user, e))? else {
        return Err(problem(
            StatusCode::NOT_FOUND,
            Some(&user),
            "No such agent",
            &format!("warden has never heard from an agent called {id}."),
        ));
    };
    let minutes = data::heartbeat_minutes(&client, id.as_str()).await.map_err(|e| failure(&user, e))?;
    let recoveries = data::recoveries_of_agent(&client, id.as_str()).await.map_err(|e| failure(&user, e))?;
    let alerts = data::alerts_of_agent(&client, id.as_str()).await.map_err(|e| failure(&user, e))?;
    let view = templates::AgentView {
        now: Utc::now(),
        user: &user,
        agent: &agent,
        minutes: &minutes,
        recoveries: &recoveries,
        alerts: &alerts,
        back: "/",
    };
    let title = format!("Agent {id}");
    let chrome = Chrome {
        title: &title,
        nav: Nav::Fleet,
        user: Some(&user),
        stream: Some(format!("/v1/stream{}", format::query(&[("agent", id.as_str())]))),
        refresh: Some(30),
    };
    Ok(framed(StatusCode::OK, &chrome, templates::agent(&view)))
}

pub async fn incidents(State(state): State<AppState>, user: ConsoleUser) -> PageResult {
    let client = client(&state, &user).await?;
    let open = data::open_incidents(&client, None, 200).await.map_err(|e| failure(&user, e))?;
    let resolved = data::resolved_incidents(&client, None, RESOLVED_DAYS, 100).await.map_err(|e| failure(&user, e))?;
    let (open_total, resolved_total) =
        data::incident_totals(&client, RESOLVED_DAYS).await.map_err(|e| failure(&user, e))?;
    let ids: Vec<i64> = open.iter().chain(&resolved).map(|i| i.id).collect();
    let recoveries = data::recoveries_for(&client, &ids).await.map_err(|e| failure(&user, e))?;
    let alerts = data::alerts_for_incidents(&client, &ids).await.map_err(|e| failure(&user, e))?;
    let view = templates::IncidentsView {
        now: Utc::now(),
        open: &open,
        resolved: &resolved,
        recoveries: &recoveries,
        alerts: &alerts,
        days: RESOLVED_DAYS,
        open_total,
        resolved_total,
    };
    let chrome = Chrome {
        title: "Incidents",
        nav: Nav::Incidents,
        user: Some(&user),
        stream: Some("/v1/stream".into()),
        refresh: Some(60),
    };
    Ok(framed(StatusCode::OK, &chrome, templates::incidents(&view)))
}

/// The flash message of a finished action, from fixed words and numbers.
fn flash(query: &HashMap<String, String>) -> Option<(&'static str, String)> {
    let number = |k: &str| query.get(k).and_then(|v| v.parse::<i64>().ok());
    match query.get("done").map(String::as_str) {
        Some("acked") => number("alert").map(|id| ("ok", format!("Alert #{id} acknowledged: escalation has stopped."))),
        Some("silenced") => number("silence").map(|id| ("ok", format!("Silence #{id} created."))),
        Some("expired") => number("silence").map(|id| ("ok", format!("Silence #{id} expired."))),
        _ => None,
    }
}

async fn render_alerts(
    state: &AppState,
    user: &ConsoleUser,
    status: StatusCode,
    draft: &SilenceDraft,
    flash: Option<(&'static str, String)>,
) -> PageResult {
    let client = client(state, user).await?;
    let firing = data::alerts_in(&client, AlertState::Firing, 500).await.map_err(|e| failure(user, e))?;
    let acknowledged = data::alerts_in(&client, AlertState::Acknowledged, 500).await.map_err(|e| failure(user, e))?;
    let resolved = data::alerts_in(&client, AlertState::Resolved, 20).await.map_err(|e| failure(user, e))?;
    let (firing_total, acknowledged_total) = data::alert_totals(&client).await.map_err(|e| failure(user, e))?;
    let silences = silences::list(&client, false).await.map_err(|e| failure(user, e))?;
    let view = templates::AlertsView {
        now: Utc::now(),
        user,
        firing: &firing,
        acknowledged: &acknowledged,
        resolved: &resolved,
        firing_total,
        acknowledged_total,
        silences: &silences,
        draft,
        flash,
    };
    let chrome = Chrome {
        title: "Alerts",
        nav: Nav::Alerts,
        user: Some(user),
        stream: Some("/v1/stream".into()),
        refresh: Some(60),
    };
    Ok(framed(status, &chrome, templates::alerts(&view)))
}

pub async fn alerts(
    State(state): State<AppState>,
    user: ConsoleUser,
    Query(query): Query<HashMap<String, String>>,
) -> PageResult {
    render_alerts(&state, &user, StatusCode::OK, &SilenceDraft::default(), flash(&query)).await
}

// ---------------------------------------------------------------- forms

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CsrfForm {
    csrf: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AckForm {
    csrf: String,
    comment: String,
    back: String,
}

pub async fn ack(
    State(state): State<AppState>,
    user: ConsoleUser,
    Path(id): Path<String>,
    headers: HeaderMap,
    form: Result<Form<AckForm>, FormRejection>,
) -> PageResult {
    let Form(form) = form.map_err(|e| bad_form(Some(&user), e))?;
    check_form(&user, &headers, &form.csrf)?;
    needs_admin(&user, "Acknowledging an alert")?;
    let Some(id) = id.parse::<i64>().ok().filter(|id| *id > 0) else {
        return Err(problem(StatusCode::NOT_FOUND, Some(&user), "No such alert", "Alert ids are positive numbers."));
    };
    // Too long is refused with the reason, as the API refuses it: cut
    // short, the stored comment would not be what was written.
    let comment = Some(form.comment.trim()).filter(|c| !c.is_empty());
    let by = user.principal.label();
    let client = client(&state, &user).await?;
    match store::acknowledge(&client, id, &by, comment).await {
        Ok(_) => {
            tracing::info!(alert = id, by = %by, "alert acknowledged in the console");
            let back = format::local_path(&form.back).unwrap_or("/alerts");
            if back == "/alerts" {
                Ok(see_other(&format!("/alerts?done=acked&alert={id}")))
            } else {
                Ok(see_other(back))
            }
        }
        Err(AckError::NotFound(_)) => {
            Err(problem(StatusCode::NOT_FOUND, Some(&user), "No such alert", &format!("There is no alert #{id}.")))
        }
        Err(AckError::Resolved(_)) => Err(problem(
            StatusCode::CONFLICT,
            Some(&user),
            "Already resolved",
            &format!("Alert #{id} resolved before it was acknowledged; there is nothing left to stop."),
        )),
        Err(AckError::Invalid { message, .. }) => {
            Err(problem(StatusCode::UNPROCESSABLE_ENTITY, Some(&user), "Not acknowledged", &format!("The {message}.")))
        }
        Err(AckError::Db(e)) => Err(failure(&user, e)),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SilenceForm {
    csrf: String,
    agent_id: String,
    issue_type: String,
    label: String,
    duration: String,
    comment: String,
}

/// A silence from the form, or what is wrong with it.
fn silence_from(form: &SilenceForm, by: String, now: chrono::DateTime<Utc>) -> Result<NewSilence, String> {
    let mut labels = BTreeMap::new();
    let label = form.label.trim();
    if !label.is_empty() {
        let Some((k, v)) = label.split_once('=').or_else(|| label.split_once(':')) else {
            return Err("The label must be written key=value.".into());
        };
        labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    let duration = crate::config::Duration::parse(&form.duration).map_err(|allowed| format!("Duration: {allowed}."))?;
    let text = |s: &str| Some(s.trim().to_string()).filter(|s| !s.is_empty());
    let silence = NewSilence {
        agent_id: text(&form.agent_id),
        issue_type: text(&form.issue_type),
        labels,
        starts_at: Some(now),
        ends_at: Some(now + duration.to_chrono()),
        comment: form.comment.clone(),
        created_by: by,
    };
    silence.validate(now).map_err(|e| {
        // The API's messages name its fields; the form's labels differ.
        let no_matcher = silence.agent_id.is_none() && silence.issue_type.is_none() && silence.labels.is_empty();
        match e.field {
            "agent_id" if no_matcher => "Give an agent id, an issue or a label: a silence must match something.".into(),
            "comment" if e.message.contains("1-1024") => {
                "Why: say why these alerts are silenced (up to 1,024 characters).".into()
            }
            _ => {
                let m = format::capitalized(&e.message);
                if m.ends_with('.') { m } else { format!("{m}.") }
            }
        }
    })?;
    Ok(silence)
}

pub async fn create_silence(
    State(state): State<AppState>,
    user: ConsoleUser,
    headers: HeaderMap,
    form: Result<Form<SilenceForm>, FormRejection>,
) -> PageResult {
    let Form(form) = form.map_err(|e| bad_form(Some(&user), e))?;
    check_form(&user, &headers, &form.csrf)?;
    needs_admin(&user, "Creating a silence")?;
    let silence = match silence_from(&form, user.principal.label(), Utc::now()) {
        Ok(s) => s,
        Err(error) => {
            let draft = SilenceDraft {
                agent_id: form.agent_id.clone(),
                issue_type: form.issue_type.clone(),
                label: form.label.clone(),
                duration: form.duration.clone(),
                comment: form.comment.clone(),
                error: Some(error),
            };
            return render_alerts(&state, &user, StatusCode::UNPROCESSABLE_ENTITY, &draft, None).await;
        }
    };
    let client = client(&state, &user).await?;
    let created = silences::create(&client, &silence).await.map_err(|e| failure(&user, e))?;
    tracing::info!(silence = created.id, by = %created.created_by, "silence created in the console");
    Ok(see_other(&format!("/alerts?done=silenced&silence={}", created.id)))
}

pub async fn expire_silence(
    State(state): State<AppState>,
    user: ConsoleUser,
    Path(id): Path<String>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> PageResult {
    let Form(form) = form.map_err(|e| bad_form(Some(&user), e))?;
    check_form(&user, &headers, &form.csrf)?;
    needs_admin(&user, "Expiring a silence")?;
    let id = id.parse::<i64>().ok().filter(|id| *id > 0);
    let client = client(&state, &user).await?;
    let removed = match id {
        Some(id) => silences::remove(&client, id).await.map_err(|e| failure(&user, e))?,
        None => None,
    };
    match removed {
        Some(s) => {
            tracing::info!(silence = s.id, by = %user.principal.label(), "silence expired in the console");
            Ok(see_other(&format!("/alerts?done=expired&silence={}", s.id)))
        }
        None => Err(problem(
            StatusCode::NOT_FOUND,
            Some(&user),
            "No such silence",
            "That silence is not in force (it may have ended or been expired already).",
        )),
    }
}

// ---------------------------------------------------------------- login

/// Where to go after signing in: a local path, never the login page itself.
fn next_of(raw: Option<&str>) -> String {
    match raw.and_then(format::local_path) {
        Some(p) if !p.starts_with("/login") && !p.starts_with("/logout") => p.to_string(),
        _ => "/".to_string(),
    }
}

fn login_form(state: &AppState, status: StatusCode, next: &str, error: Option<&str>) -> Response {
    login_form_saying(state, status, next, error, None)
}

fn login_form_saying(
    state: &AppState,
    status: StatusCode,
    next: &str,
    error: Option<&str>,
    info: Option<&str>,
) -> Response {
    let policy = super::cookie_policy(&state.settings.console);
    let token = session::new_token();
    let view = templates::LoginView { login_csrf: &token, next, error, info, auth_enabled: state.auth.enabled() };
    let chrome = Chrome { title: "Sign in", nav: Nav::None, user: None, stream: None, refresh: None };
    let mut response = framed(status, &chrome, templates::login(&view));
    response.headers_mut().append(SET_COOKIE, policy.set_login(&token));
    response
}

pub async fn login_page(
    State(state): State<AppState>,
    mut parts: axum::http::request::Parts,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let next = next_of(query.get("next").map(String::as_str));
    // A signed-in visitor goes straight on. The cookie is checked as on any
    // console page, limits included: an address sending made-up cookies
    // spends its failures here too, and once out of them gets the form
    // without a query.
    if <ConsoleUser as axum::extract::FromRequestParts<AppState>>::from_request_parts(&mut parts, &state).await.is_ok()
    {
        return see_other(&next);
    }
    let info = query.contains_key("signed_out").then_some("You have signed out.");
    login_form_saying(&state, StatusCode::OK, &next, None, info)
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub struct LoginForm {
    key: String,
    login_csrf: String,
    next: String,
}

// The key must not end up in logs through a stray `{:?}`.
impl std::fmt::Debug for LoginForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginForm").field("key", &"[redacted]").field("next", &self.next).finish()
    }
}

pub async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    address: Option<axum::Extension<crate::api::limit::SignInAddress>>,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let form = match form {
        Ok(Form(form)) => form,
        Err(e) => {
            let status = form_status(&e);
            let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "The sign-in form was too large to read; try again."
            } else {
                "The sign-in form could not be read; try again."
            };
            return login_form(&state, status, "/", Some(message));
        }
    };
    let next = next_of(Some(&form.next));
    let policy = super::cookie_policy(&state.settings.console);
    let form_ok = policy.login_token(&headers).is_some_and(|t| session::same_secret(t, &form.login_csrf));
    // Origin too: without HTTPS browsers send no Sec-Fetch-Site, and a page
    // on a sibling domain can plant the login cookie it then submits.
    if cross_site(&headers)
        || crate::api::check_origin(&headers, &state.settings.alerting.link_base).is_err()
        || !form_ok
    {
        return login_form(
            &state,
            StatusCode::FORBIDDEN,
            &next,
            Some("The sign-in form expired or did not come from this page; try again."),
        );
    }
    let key = form.key.trim();
    let (key_id, name) = if state.auth.enabled() {
        if key.is_empty() {
            return login_form(&state, StatusCode::UNAUTHORIZED, &next, Some("Enter an API key."));
        }
        let bearer = format!("Bearer {key}");
        if let Some(axum::Extension(crate::api::limit::SignInAddress(from))) = address
            && let Some(wait) = state.limiter.failures_exhausted(from, std::time::Instant::now())
            && !state.auth.recently_verified(Some(&bearer))
        {
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            let message = format!("Too many failed sign-ins from this address; try again in {seconds} s.");
            let mut page = login_form(&state, StatusCode::TOO_MANY_REQUESTS, &next, Some(&message));
            page.headers_mut().insert(axum::http::header::RETRY_AFTER, seconds.into());
            return page;
        }
        match state.auth.authenticate(Some(&bearer), Scope::Read).await {
            Ok(principal) => (crate::auth::key_id_of(key), principal.label()),
            Err(AuthError::Missing | AuthError::Invalid) => {
                return login_form(
                    &state,
                    StatusCode::UNAUTHORIZED,
                    &next,
                    Some("That key is not valid, or it has been revoked."),
                );
            }
            Err(AuthError::Forbidden(_) | AuthError::CsrfToken { .. }) => {
                return login_form(
                    &state,
                    StatusCode::FORBIDDEN,
                    &next,
                    Some("That key cannot read: the console needs a key with the read or admin scope."),
                );
            }
            Err(AuthError::Db(e)) => return ApiError::from(e).into_response(),
        }
    } else {
        (None, "anonymous".to_string())
    };
    let ttl = state.settings.console.session_ttl.get().as_secs();
    let created = async {
        let client = db::client(&state.pool).await?;
        session::create(&client, key_id, ttl, policy.session_token(&headers)).await
    }
    .await;
    match created {
        Ok(Some(token)) => {
            tracing::info!(key = %name, "console sign-in");
            let mut response = see_other(&next);
            response.headers_mut().append(SET_COOKIE, policy.set_session(&token));
            response.headers_mut().append(SET_COOKIE, policy.clear_login());
            response
        }
        Ok(None) => login_form(&state, StatusCode::UNAUTHORIZED, &next, Some("That key has just been revoked.")),
        Err(e) => ApiError::from(e).into_response(),
    }
}

pub async fn logout(
    State(state): State<AppState>,
    user: ConsoleUser,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> PageResult {
    let Form(form) = form.map_err(|e| bad_form(Some(&user), e))?;
    check_form(&user, &headers, &form.csrf)?;
    session::logout(&state, &user).await.map_err(|e| failure(&user, e))?;
    let policy = super::cookie_policy(&state.settings.console);
    let mut response = see_other("/login?signed_out=1");
    response.headers_mut().append(SET_COOKIE, policy.clear_session());
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(duration: &str, agent: &str, label: &str, comment: &str) -> SilenceForm {
        SilenceForm {
            duration: duration.into(),
            agent_id: agent.into(),
            label: label.into(),
            comment: comment.into(),
            ..Default::default()
        }
    }

    #[test]
    fn silence_forms_become_silences_or_say_what_is_wrong() {
        let now = Utc::now();
        let s = silence_from(&form("2h", "a1", "role=worker", "deploy"), "ops".into(), now).unwrap();
        assert_eq!(s.agent_id.as_deref(), Some("a1"));
        assert_eq!(s.labels.get("role").map(String::as_str), Some("worker"));
        assert_eq!(s.ends_at, Some(now + chrono::Duration::hours(2)));
        // In the form's words, not the API's field names.
        let none = silence_from(&form("2h", "", "", "x"), "ops".into(), now).unwrap_err();
        assert_eq!(none, "Give an agent id, an issue or a label: a silence must match something.");
        let why = silence_from(&form("2h", "a1", "", " "), "ops".into(), now).unwrap_err();
        assert!(why.starts_with("Why: "), "{why}");
        assert!(silence_from(&form("soon", "a1", "", "x"), "ops".into(), now).unwrap_err().starts_with("Duration"));
        assert!(silence_from(&form("2h", "", "novalue", "x"), "ops".into(), now).unwrap_err().contains("key=value"));
    }

    #[test]
    fn after_login_only_local_pages() {
        assert_eq!(next_of(Some("/agents/a1")), "/agents/a1");
        assert_eq!(next_of(Some("//evil.example")), "/");
        assert_eq!(next_of(Some("/login?next=/x")), "/");
        assert_eq!(next_of(None), "/");
    }
}
