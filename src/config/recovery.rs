//! `[recovery]`: limits, backoff, and the strategies tried on incidents.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::sections::{check_min, check_range};
use super::{Duration, SettingsError};
use crate::health::incidents::IssueType;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverySettings {
    pub enabled: bool,
    /// Recoveries running or verifying at once, fleet-wide.
    pub max_concurrent: u32,
    /// Manual runs that may be running or verifying at once while
    /// `max_concurrent` is full (they are not held back by it).
    pub max_concurrent_manual: u32,
    /// Attempts per agent within `attempt_window`, or for one incident
    /// however long they took, before giving up.
    pub max_attempts: u32,
    pub attempt_window: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// How long the agent has to be back after an action. Unset:
    /// recover_after_healthy intervals and half as much again, plus one
    /// health check interval. What the issue needs to clear comes on top
    /// (see settings.toml).
    #[serde(default)]
    pub verify_timeout: Option<Duration>,
    /// How often each replica looks for recovery work.
    pub poll_interval: Duration,
    /// How long past an action's timeout its replica's claim lasts; a
    /// replica that dies mid-action gives the job up after this.
    pub lease_margin: Duration,
    /// Bytes of a command's stdout, of its stderr, and of an HTTP action's
    /// response body kept in the log.
    pub output_limit: usize,
    #[serde(default)]
    pub strategies: Vec<Strategy>,
}

/// Tried on incidents of the listed types whose agent has all the labels.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Strategy {
    pub name: String,
    pub issues: Vec<IssueType>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How long the agent has to be back after each action; unset: as
    /// `recovery.verify_timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_timeout: Option<Duration>,
    pub actions: Vec<Action>,
}

/// One way to recover, tried `attempts` times before the next action; the
/// last action repeats until the attempt limit.
#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Action {
    /// Runs a program with arguments, no shell; placeholders are filled in
    /// per argument, so agent-supplied text can never add an argument.
    Command {
        #[serde(default)]
        name: Option<String>,
        argv: Vec<String>,
        #[serde(default = "default_timeout")]
        timeout: Duration,
        #[serde(default = "one")]
        attempts: u32,
    },
    /// Calls an HTTP endpoint (an orchestrator, a supervisor API).
    Http {
        #[serde(default)]
        name: Option<String>,
        #[serde(default = "post")]
        method: String,
        url: String,
        #[serde(default)]
        headers: BTreeMap<String, String>,
        #[serde(default)]
        body: Option<serde_json::Value>,
        /// Accepted status codes; empty accepts any 2xx. Redirects are not
        /// followed: a 3xx is judged like any other status.
        #[serde(default)]
        expect_status: Vec<u16>,
        #[serde(default = "default_timeout")]
        timeout: Duration,
        #[serde(default = "one")]
        attempts: u32,
    },
    /// No automatic action: the incident is only alerted.
    None {
        #[serde(default)]
        name: Option<String>,
    },
}

/// Header values and bodies carry credentials, and a URL may too (a token
/// in its query): a debug print names them without their values.
impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Command { name, argv, timeout, attempts } => f
                .debug_struct("Command")
                .field("name", name)
                // The program is the operator's and holds no placeholder;
                // its arguments may carry a token.
                .field("program", &argv.first())
                .field("arguments", &argv.len().saturating_sub(1))
                .field("timeout", timeout)
                .field("attempts", attempts)
                .finish(),
            Action::Http { name, method, headers, body, expect_status, timeout, attempts, .. } => f
                .debug_struct("Http")
                .field("name", name)
                .field("method", method)
                .field("url", &format_args!("[redacted]"))
                .field("headers", &headers.keys().collect::<Vec<_>>())
                .field("body", &format_args!("{}", if body.is_some() { "[redacted]" } else { "None" }))
                .field("expect_status", expect_status)
                .field("timeout", timeout)
                .field("attempts", attempts)
                .finish(),
            Action::None { name } => f.debug_struct("None").field("name", name).finish(),
        }
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

fn one() -> u32 {
    1
}

fn post() -> String {
    "POST".into()
}

/// Placeholders an action may use.
pub const PLACEHOLDERS: &[&str] = &["agent_id", "agent_name", "issue_type", "incident_id", "label.<name>"];

impl Action {
    /// The name recovery_actions rows record.
    pub fn label(&self, index: usize) -> String {
        let (explicit, kind) = match self {
            Action::Command { name, .. } => (name, "command"),
            Action::Http { name, .. } => (name, "http"),
            Action::None { name } => (name, "none"),
        };
        explicit.clone().unwrap_or_else(|| format!("{kind}#{}", index + 1))
    }

    pub fn attempts(&self) -> u32 {
        match self {
            Action::Command { attempts, .. } | Action::Http { attempts, .. } => (*attempts).max(1),
            Action::None { .. } => 1,
        }
    }

    pub fn timeout(&self) -> Option<Duration> {
        match self {
            Action::Command { timeout, .. } | Action::Http { timeout, .. } => Some(*timeout),
            Action::None { .. } => None,
        }
    }
}

/// Every `{...}` in a template, checked against the known placeholders.
///
/// Errors give where in the template, never its text: a URL, header or
/// body may hold a credential (`{"key": "..."}` reads as a placeholder).
pub fn placeholders(template: &str) -> Result<Vec<&str>, String> {
    let mut found = Vec::new();
    each_placeholder(template, |name, at| {
        let known = matches!(name, "agent_id" | "agent_name" | "issue_type" | "incident_id")
            || name.strip_prefix("label.").is_some_and(|l| !l.is_empty());
        if !known {
            return Err(format!("unknown placeholder at character {at}; known: {}", PLACEHOLDERS.join(", ")));
        }
        found.push(name);
        Ok(())
    })?;
    Ok(found)
}

/// Calls `check` with the name inside every `{...}` of `template` and
/// where its `{` is (the character's number, from 1).
fn each_placeholder<'t>(
    template: &'t str,
    mut check: impl FnMut(&'t str, usize) -> Result<(), String>,
) -> Result<(), String> {
    let mut offset = 0;
    while let Some(start) = template[offset..].find('{') {
        let open = offset + start;
        let at = template[..open].chars().count() + 1;
        let after = &template[open + 1..];
        let Some(end) = after.find('}') else {
            return Err(format!("the {{ at character {at} is never closed"));
        };
        check(&after[..end], at)?;
        offset = open + 1 + end + 1;
    }
    Ok(())
}

/// Prefix of the environment variables a header may read.
pub const SECRET_ENV_PREFIX: &str = "WARDEN_SECRET_";

/// Like [`placeholders`], and also `{env.WARDEN_SECRET_NAME}`: a credential
/// an orchestrator wants (a bearer token) from the environment rather than
/// the settings file. Only headers take them (an argument would show in the
/// process list, a URL or body in logs and errors), only variables with the
/// prefix (nothing else of warden's environment can be sent out). The
/// variable must be set where recovery runs (checked by
/// [`RecoverySettings::check_secret_env`] when `serve` or `demo` starts, and
/// by `warden config`), not for every command: an on-call engineer
/// acknowledging an alert need not hold the orchestrator's token. The value
/// is read when the request is made.
pub fn header_placeholders(template: &str) -> Result<(), String> {
    each_placeholder(template, |name, at| match name.strip_prefix("env.") {
        Some(var) => {
            let well_formed = var.strip_prefix(SECRET_ENV_PREFIX).is_some_and(|n| {
                !n.is_empty() && n.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            });
            if !well_formed {
                return Err(format!(
                    "the {{env...}} at character {at}: only variables named {SECRET_ENV_PREFIX}<NAME> (capitals, \
                     digits, _) can be read"
                ));
            }
            Ok(())
        }
        None => placeholders(&format!("{{{name}}}")).map(drop).map_err(|_| {
            format!(
                "unknown placeholder at character {at}; known: {}, env.{SECRET_ENV_PREFIX}<NAME>",
                PLACEHOLDERS.join(", ")
            )
        }),
    })
}

fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// The `{env.WARDEN_SECRET_*}` variables a header names that are not set.
fn unset_secret_env(template: &str) -> Option<String> {
    let mut unset = None;
    let _ = each_placeholder(template, |name, _| {
        if let Some(var) = name.strip_prefix("env.")
            && std::env::var_os(var).is_none()
        {
            unset.get_or_insert_with(|| var.to_string());
        }
        Ok(())
    });
    unset
}

impl RecoverySettings {
    /// Every `{env.WARDEN_SECRET_*}` a header names is set, when recovery
    /// is on: what `serve` needs before it may run an action.
    pub fn check_secret_env(&self) -> Result<(), SettingsError> {
        if !self.enabled {
            return Ok(());
        }
        for (i, strategy) in self.strategies.iter().enumerate() {
            for (j, action) in strategy.actions.iter().enumerate() {
                let Action::Http { headers, .. } = action else { continue };
                for (name, value) in headers {
                    if let Some(var) = unset_secret_env(value) {
                        return Err(SettingsError::new(
                            &format!("recovery.strategies[{i}].actions[{j}].headers.{name}"),
                            value,
                            format!("{{env.{var}}}: the environment variable {var} is not set"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        check_range("recovery.max_concurrent", self.max_concurrent, 1, 10_000)?;
        check_range("recovery.max_concurrent_manual", self.max_concurrent_manual, 1, 10_000)?;
        check_range("recovery.max_attempts", self.max_attempts, 1, 1000)?;
        check_min("recovery.attempt_window", self.attempt_window, Duration::from_secs(1))?;
        check_min("recovery.backoff_base", self.backoff_base, Duration::from_millis(10))?;
        check_min("recovery.backoff_cap", self.backoff_cap, self.backoff_base)?;
        check_min("recovery.poll_interval", self.poll_interval, Duration::from_millis(10))?;
        check_min("recovery.lease_margin", self.lease_margin, Duration::from_millis(100))?;
        check_range("recovery.output_limit", self.output_limit, 64, 1 << 20)?;
        if let Some(v) = self.verify_timeout {
            check_min("recovery.verify_timeout", v, Duration::from_millis(100))?;
        }
        let mut seen = std::collections::HashSet::new();
        for (i, s) in self.strategies.iter().enumerate() {
            let key = |field: &str| format!("recovery.strategies[{i}].{field}");
            if !is_name(&s.name) {
                return Err(SettingsError::new(&key("name"), &s.name, "1-64 of lowercase letters, digits and _"));
            }
            if !seen.insert(s.name.clone()) {
                return Err(SettingsError::new(&key("name"), &s.name, "a name no other strategy has"));
            }
            if s.issues.is_empty() {
                return Err(SettingsError::new(&key("issues"), "[]", "at least one issue type"));
            }
            if s.actions.is_empty() {
                return Err(SettingsError::new(&key("actions"), "[]", "at least one [[recovery.strategies.actions]]"));
            }
            if let Some(v) = s.verify_timeout {
                check_min(&key("verify_timeout"), v, Duration::from_millis(100))?;
            }
            for (j, action) in s.actions.iter().enumerate() {
                validate_action(action, &format!("recovery.strategies[{i}].actions[{j}]"))?;
            }
        }
        Ok(())
    }
}

fn validate_action(action: &Action, key: &str) -> Result<(), SettingsError> {
    let field = |f: &str| format!("{key}.{f}");
    let (Action::Command { name, .. } | Action::Http { name, .. } | Action::None { name }) = action;
    // Recorded with every attempt and listed in messages on one line.
    if let Some(name) = name
        && (name.trim().is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control))
    {
        return Err(SettingsError::new(&field("name"), name, "1-64 characters on one line"));
    }
    if let Some(timeout) = action.timeout() {
        check_min(&field("timeout"), timeout, Duration::from_millis(100))?;
    }
    match action {
        Action::Command { argv, attempts, .. } => {
            check_range(&field("attempts"), *attempts, 1, 100)?;
            let Some(program) = argv.first() else {
                return Err(SettingsError::new(&field("argv"), "[]", "a program and its arguments"));
            };
            // The program itself is the operator's, never the agent's.
            if program.contains('{') {
                return Err(SettingsError::new(&field("argv"), program, "a program path without placeholders"));
            }
            for (i, arg) in argv.iter().enumerate() {
                placeholders(arg).map_err(|e| SettingsError::unquoted(&field(&format!("argv[{i}]")), e))?;
            }
        }
        Action::Http { method, url, headers, body, expect_status, attempts, .. } => {
            check_range(&field("attempts"), *attempts, 1, 100)?;
            if reqwest::Method::from_bytes(method.as_bytes()).is_err() || method.is_empty() {
                return Err(SettingsError::new(&field("method"), method, "an HTTP method like POST or PUT"));
            }
            placeholders(url).map_err(|e| SettingsError::new(&field("url"), url, e))?;
            // Agent text (its name, a label) must never choose where the
            // request, with its credential headers, is sent.
            if before_path(url).contains('{') {
                return Err(SettingsError::new(
                    &field("url"),
                    url,
                    "placeholders only in the path and query, none in the scheme, host or port",
                ));
            }
            let sample = url.replace(['{', '}'], "");
            if reqwest::Url::parse(&sample).map(|u| !matches!(u.scheme(), "http" | "https")).unwrap_or(true) {
                return Err(SettingsError::new(&field("url"), url, "an http:// or https:// URL"));
            }
            for (name, value) in headers {
                header_placeholders(value)
                    .map_err(|e| SettingsError::new(&field(&format!("headers.{name}")), value, e))?;
            }
            if let Some(body) = body {
                check_body(body).map_err(|e| SettingsError::new(&field("body"), body, e))?;
            }
            if let Some(bad) = expect_status.iter().find(|s| !(100..=599).contains(*s)) {
                return Err(SettingsError::new(&field("expect_status"), bad, "HTTP status codes (100-599)"));
            }
        }
        Action::None { .. } => {}
    }
    Ok(())
}

/// The scheme and authority of a URL template: up to the first '/', '?'
/// or '#' after "://", or all of it without "://". URL parsers take more
/// forms ("http:host", a backslash for a slash, tabs dropped) but never
/// find the authority past this point, so a placeholder after it is in the
/// path, query or fragment.
fn before_path(url: &str) -> &str {
    let Some(start) = url.find("://").map(|i| i + 3) else { return url };
    let end = url[start..].find(['/', '?', '#']).map_or(url.len(), |i| start + i);
    &url[..end]
}

fn check_body(value: &serde_json::Value) -> Result<(), String> {
    match value {
        serde_json::Value::String(s) => placeholders(s).map(|_| ()),
        serde_json::Value::Array(items) => items.iter().try_for_each(check_body),
        serde_json::Value::Object(map) => map.values().try_for_each(check_body),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_found_and_checked() {
        assert_eq!(placeholders("agent@{agent_id}.service").unwrap(), vec!["agent_id"]);
        assert_eq!(placeholders("{label.role}-{issue_type}").unwrap(), vec!["label.role", "issue_type"]);
        assert!(placeholders("{password}").unwrap_err().contains("unknown placeholder"));
        assert!(placeholders("{label.}").is_err());
        assert!(placeholders("{agent_id").is_err());
        assert!(placeholders("plain").unwrap().is_empty());
    }

    #[test]
    fn the_part_before_a_urls_path_is_found_however_it_is_written() {
        assert_eq!(before_path("http://orch:8000/restart/{agent_id}"), "http://orch:8000");
        assert_eq!(before_path("https://orch?agent={agent_id}"), "https://orch");
        assert_eq!(before_path("http://{label.host}"), "http://{label.host}");
        assert_eq!(before_path("http:/{label.host}/restart"), "http:/{label.host}/restart");
        assert_eq!(before_path("http://orch\\{label.host}/x"), "http://orch\\{label.host}");
    }

    #[test]
    fn a_debug_print_of_an_action_keeps_its_credentials_out() {
        let http = Action::Http {
            name: Some("orchestrator".into()),
            method: "POST".into(),
            url: "https://orch/restart?token=url-secret".into(),
            headers: BTreeMap::from([("Authorization".into(), "Bearer header-secret".into())]),
            body: Some(serde_json::json!({"key": "body-secret"})),
            expect_status: vec![202],
            timeout: Duration::from_secs(5),
            attempts: 2,
        };
        let command = Action::Command {
            name: None,
            argv: vec!["restart".into(), "--token=argv-secret".into()],
            timeout: Duration::from_secs(5),
            attempts: 1,
        };
        let printed = format!("{http:?} {command:?}");
        for secret in ["url-secret", "header-secret", "body-secret", "argv-secret"] {
            assert!(!printed.contains(secret), "{secret} printed: {printed}");
        }
        assert!(printed.contains("orchestrator") && printed.contains("Authorization"), "{printed}");
        assert!(printed.contains("\"restart\"") && printed.contains("arguments: 1"), "{printed}");
    }
}
