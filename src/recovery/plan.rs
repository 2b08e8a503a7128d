//! The recovery engine's decisions, as plain functions: which strategy,
//! which action next, how long to back off, how long to verify, and what an
//! argument becomes once its placeholders are filled in.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::{Action, Strategy};
use crate::health::incidents::IssueType;

/// Exponential backoff before attempt `n + 1`, after `n` attempts (n ≥ 1):
/// base × 2^(n−1), capped.
pub fn backoff(attempts: u32, base: Duration, cap: Duration) -> Duration {
    let exponent = attempts.saturating_sub(1).min(30);
    base.saturating_mul(1u32 << exponent).min(cap)
}

/// What the default verification time is made of (from `[health]`).
#[derive(Debug, Clone, Copy)]
pub struct VerifyRules {
    pub recover_after_healthy: u32,
    pub check_interval: Duration,
    pub score_interval: Duration,
    pub restart_loop_window: Duration,
}

/// How long an action has to prove itself: the time for the agent to be
/// back, plus what its issue needs to clear as the evaluator's window
/// moves on. An agent gone quiet must send `recover_after_healthy` on-time
/// heartbeats to be online again: that many of its intervals plus half (it
/// may take a while to start), plus one evaluator check (which notices);
/// the strategy's own `verify_timeout`, else `recovery.verify_timeout`,
/// replaces that part. To clear: the restart-loop window; 21 of the agent's
/// evaluations for flapping; an hour for error rates (hourly sums with a
/// one-hour decay take about 42 minutes to halve); ten minutes or two
/// score passes for gauges (five-minute averages). A setting never cuts
/// that second part short: an issue's incident cannot resolve before it,
/// so a shorter verification could only fail, and restart the agent again.
pub fn verify_timeout(
    strategy: Option<Duration>,
    setting: Option<Duration>,
    rules: &VerifyRules,
    expected_interval_ms: i64,
    issue: Option<IssueType>,
) -> Duration {
    let interval = Duration::from_millis(expected_interval_ms.max(1) as u64);
    let back = strategy.or(setting).unwrap_or_else(|| {
        crate::health::liveness::time_to_recover(expected_interval_ms, rules.recover_after_healthy)
            .saturating_add(rules.check_interval)
    });
    let clears = match issue {
        None => Duration::ZERO,
        Some(issue) if issue.is_silence() => Duration::ZERO,
        Some(IssueType::RestartLoop) => rules.restart_loop_window,
        Some(IssueType::Flapping) => rules.check_interval.max(interval) * (crate::health::flap::SLOTS as u32 + 1),
        Some(IssueType::HighErrorRate) => Duration::from_secs(3600),
        Some(_) => Duration::from_secs(600).max(rules.score_interval * 2),
    };
    back.saturating_add(clears)
}

/// The first strategy for this issue whose labels the agent all has.
pub fn select<'a>(
    strategies: &'a [Strategy],
    issue: IssueType,
    labels: &BTreeMap<String, String>,
) -> Option<&'a Strategy> {
    strategies.iter().find(|s| s.issues.contains(&issue) && s.labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Where in a strategy's action list the next attempt runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub action_index: usize,
    /// Attempts already made with that action.
    pub action_attempts: u32,
}

/// The action for the next attempt: the current one until it has had its
/// attempts, then the next; the last one repeats.
pub fn next_position(strategy: &Strategy, pos: Position) -> Position {
    let last = strategy.actions.len().saturating_sub(1);
    let index = pos.action_index.min(last);
    let allowed = strategy.actions.get(index).map(Action::attempts).unwrap_or(1);
    if pos.action_attempts >= allowed && index < last {
        Position { action_index: index + 1, action_attempts: 0 }
    } else {
        Position { action_index: index, action_attempts: pos.action_attempts }
    }
}

/// What placeholders stand for, for one recovery.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub agent_id: String,
    pub agent_name: Option<String>,
    pub issue_type: Option<String>,
    pub incident_id: Option<i64>,
    pub labels: BTreeMap<String, String>,
}

impl Context {
    fn value(&self, name: &str) -> Result<String, String> {
        match name {
            "agent_id" => Ok(self.agent_id.clone()),
            "agent_name" => Ok(self.agent_name.clone().unwrap_or_else(|| self.agent_id.clone())),
            // A manual run has no incident: its issue type reads "manual"
            // and its incident id is empty, so one template serves both.
            "issue_type" => Ok(self.issue_type.clone().unwrap_or_else(|| "manual".into())),
            "incident_id" => Ok(self.incident_id.map(|i| i.to_string()).unwrap_or_default()),
            other => match (other.strip_prefix("label."), other.strip_prefix("env.")) {
                (Some(label), _) => {
                    self.labels.get(label).cloned().ok_or_else(|| format!("the agent has no label {label:?}"))
                }
                // Headers only (settings refuse it elsewhere), and only the
                // variables set aside for it.
                (_, Some(var)) if var.starts_with(crate::config::SECRET_ENV_PREFIX) => {
                    std::env::var(var).map_err(|_| format!("the environment variable {var} is not set"))
                }
                // Settings refuse it at load; the name could be a secret.
                _ => Err("unknown placeholder".to_string()),
            },
        }
    }
}

/// Fills in a URL, header or body string. The result is one value
/// whatever the agent's text contains: no splitting, no shell.
pub fn fill(template: &str, ctx: &Context) -> Result<String, String> {
    fill_checked(template, ctx, |_| Ok(()))
}

/// Fills in one argument of a command, as [`fill`] does, and refuses a
/// value that would begin the argument with "-", so an agent named "--all"
/// cannot turn into an option of the command. And it refuses a filled-in
/// argument where text from a value makes, or borders, a path step that
/// goes nowhere or up: a "." or ".." segment, or (in an argument with a
/// "/") an empty one. An agent named "..", labelled `dir=../..`, `dir=/`
/// or `dir=./`, or two labels that meet as `x/.` and `./y`, must not turn
/// `/srv/agents/{label.dir}` into the directory above, or all of it.
/// Segments end at "/", and at "=" and ":" too, where an option's or a
/// remote's path begins (`--dir={label.d}`, `host:{label.p}`). Text of the
/// template alone is the operator's and is not checked. Only arguments:
/// in a URL, header or body such text is inert (URLs have their own
/// check), and a header may hold a secret that happens to start with "-".
pub fn fill_arg(template: &str, ctx: &Context) -> Result<String, String> {
    let (filled, spans) = fill_spans(template, ctx, true, |_| Ok(()))?;
    let pathlike = filled.contains('/');
    let mut start = 0;
    for segment in filled.split(['/', '=', ':']) {
        let end = start + segment.len();
        // A value touches the segment if it overlaps it or the separator
        // on either side (an empty value, where it was put).
        let touched = spans.iter().any(|&(a, b)| a <= end && b >= start);
        let empty = segment.is_empty() && pathlike;
        if touched && (empty || segment == "." || segment == "..") {
            return Err(
                "refused: a filled-in value makes a \".\", \"..\" or empty step of a path in a command argument".into(),
            );
        }
        start = end + 1;
    }
    Ok(filled)
}

/// Whether a command may be run for `agent_id` at all: it reaches every
/// command as `WARDEN_AGENT_ID`, whether its argv names it or not, and a
/// script passing that on must not be handed an option ("-x") or a path
/// step ("." or ".."). Such ids are valid agent ids; their agents get no
/// command actions, only HTTP ones (where the URL check covers them).
pub fn check_command_agent(agent_id: &str) -> Result<(), String> {
    if agent_id.starts_with('-') || agent_id == "." || agent_id == ".." {
        return Err(format!(
            "refused: the agent id {agent_id:?} cannot be handed to a command (WARDEN_AGENT_ID): it would read as \
             an option or a path step"
        ));
    }
    Ok(())
}

/// [`fill`], with `check` refusing filled-in values the caller cannot take.
pub fn fill_checked(
    template: &str,
    ctx: &Context,
    check: impl Fn(&str) -> Result<(), String>,
) -> Result<String, String> {
    fill_with(template, ctx, false, check)
}

fn fill_with(
    template: &str,
    ctx: &Context,
    argument: bool,
    check: impl Fn(&str) -> Result<(), String>,
) -> Result<String, String> {
    fill_spans(template, ctx, argument, check).map(|(filled, _)| filled)
}

/// The template filled in, with the byte ranges the values took in it.
/// Errors name the placeholder, never the value: `{env.WARDEN_SECRET_*}`
/// values are credentials, and an error is recorded as the outcome.
fn fill_spans(
    template: &str,
    ctx: &Context,
    argument: bool,
    check: impl Fn(&str) -> Result<(), String>,
) -> Result<(String, Vec<(usize, usize)>), String> {
    let mut out = String::with_capacity(template.len());
    let mut spans = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let end = after.find('}').ok_or_else(|| "a { is never closed".to_string())?;
        let name = &after[..end];
        let value = ctx.value(name)?;
        if argument && out.is_empty() && value.starts_with('-') {
            return Err(format!("refused: {{{name}}} would begin an argument with '-' and could be read as an option"));
        }
        if value.contains('\0') {
            return Err(format!("refused: {{{name}}} contains a NUL byte"));
        }
        check(&value)?;
        spans.push((out.len(), out.len() + value.len()));
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok((out, spans))
}

/// Fills in every string inside a JSON body template.
pub fn fill_json(template: &serde_json::Value, ctx: &Context) -> Result<serde_json::Value, String> {
    use serde_json::Value;
    Ok(match template {
        Value::String(s) => Value::String(fill(s, ctx)?),
        Value::Array(items) => Value::Array(items.iter().map(|v| fill_json(v, ctx)).collect::<Result<_, _>>()?),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| Ok((k.clone(), fill_json(v, ctx)?))).collect::<Result<_, String>>()?)
        }
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strategy(actions: Vec<Action>) -> Strategy {
        Strategy {
            name: "s".into(),
            issues: vec![IssueType::AgentUnresponsive],
            labels: BTreeMap::new(),
            verify_timeout: None,
            actions,
        }
    }

    fn command(attempts: u32) -> Action {
        Action::Command {
            name: None,
            argv: vec!["true".into()],
            timeout: crate::config::Duration::from_secs(1),
            attempts,
        }
    }

    #[test]
    fn backoff_doubles_from_the_base_up_to_the_cap() {
        let (base, cap) = (Duration::from_secs(10), Duration::from_secs(300));
        let waits: Vec<u64> = (1..=7).map(|n| backoff(n, base, cap).as_secs()).collect();
        assert_eq!(waits, vec![10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff(1000, base, cap), cap, "no overflow");
    }

    #[test]
    fn verification_waits_for_what_the_issue_needs_plus_one_check() {
        let rules = VerifyRules {
            recover_after_healthy: 2,
            check_interval: Duration::from_secs(10),
            score_interval: Duration::from_secs(60),
            restart_loop_window: Duration::from_secs(600),
        };
        let secs = Duration::from_secs;
        let quiet = Some(IssueType::AgentUnresponsive);
        assert_eq!(verify_timeout(None, None, &rules, 30_000, quiet), secs(100));
        assert_eq!(verify_timeout(None, None, &rules, 30_000, None), secs(100), "a manual run");
        assert_eq!(verify_timeout(None, None, &rules, 5_000, quiet), secs(25), "emergency mode");
        assert_eq!(verify_timeout(None, None, &rules, 30_000, Some(IssueType::RestartLoop)), secs(90 + 600 + 10));
        assert_eq!(verify_timeout(None, None, &rules, 60_000, Some(IssueType::Flapping)), secs(180 + 21 * 60 + 10));
        assert_eq!(verify_timeout(None, None, &rules, 30_000, Some(IssueType::HighErrorRate)), secs(90 + 3600 + 10));
        assert_eq!(verify_timeout(None, None, &rules, 30_000, Some(IssueType::ResourceExhaustion)), secs(700));
        assert_eq!(verify_timeout(None, Some(secs(5)), &rules, 30_000, quiet), secs(5));
        assert_eq!(verify_timeout(Some(secs(60)), Some(secs(5)), &rules, 30_000, quiet), secs(60), "strategy first");
        // A setting stands for the time to be back; the issue's own time to
        // clear comes on top, or verification could never succeed.
        let looping = Some(IssueType::RestartLoop);
        assert_eq!(verify_timeout(None, Some(secs(90)), &rules, 30_000, looping), secs(90 + 600));
        let erring = Some(IssueType::HighErrorRate);
        assert_eq!(verify_timeout(Some(secs(60)), None, &rules, 30_000, erring), secs(60 + 3600));
    }

    #[test]
    fn the_first_matching_strategy_wins_and_labels_must_all_match() {
        let mut workers = strategy(vec![command(1)]);
        workers.name = "workers".into();
        workers.labels.insert("role".into(), "worker".into());
        let mut any = strategy(vec![command(1)]);
        any.name = "any".into();
        let strategies = vec![workers, any];
        let worker_labels: BTreeMap<String, String> = [("role".to_string(), "worker".to_string())].into();
        assert_eq!(select(&strategies, IssueType::AgentUnresponsive, &worker_labels).unwrap().name, "workers");
        assert_eq!(select(&strategies, IssueType::AgentUnresponsive, &BTreeMap::new()).unwrap().name, "any");
        assert!(select(&strategies, IssueType::Flapping, &worker_labels).is_none());
    }

    #[test]
    fn actions_advance_when_they_have_had_their_attempts_and_the_last_repeats() {
        let s = strategy(vec![command(2), command(1)]);
        let p = |i, a| Position { action_index: i, action_attempts: a };
        assert_eq!(next_position(&s, p(0, 0)), p(0, 0));
        assert_eq!(next_position(&s, p(0, 1)), p(0, 1));
        assert_eq!(next_position(&s, p(0, 2)), p(1, 0));
        assert_eq!(next_position(&s, p(1, 1)), p(1, 1), "the last action repeats");
    }

    fn ctx() -> Context {
        Context {
            agent_id: "worker-7".into(),
            agent_name: Some("Worker 7; rm -rf /".into()),
            issue_type: Some("agent_unresponsive".into()),
            incident_id: Some(42),
            labels: [("role".to_string(), "worker".to_string())].into(),
        }
    }

    #[test]
    fn placeholders_fill_one_argument_each_whatever_they_contain() {
        assert_eq!(fill("agent@{agent_id}.service", &ctx()).unwrap(), "agent@worker-7.service");
        assert_eq!(fill("{agent_name}", &ctx()).unwrap(), "Worker 7; rm -rf /", "stays one inert argument");
        assert_eq!(fill("{label.role}/{issue_type}/{incident_id}", &ctx()).unwrap(), "worker/agent_unresponsive/42");
        assert!(fill("{label.zone}", &ctx()).unwrap_err().contains("no label"));
    }

    #[test]
    fn a_manual_run_fills_the_incident_placeholders_too() {
        let manual = Context { issue_type: None, incident_id: None, ..ctx() };
        assert_eq!(fill("{issue_type}/{incident_id}", &manual).unwrap(), "manual/");
    }

    #[test]
    fn a_value_that_would_start_an_option_is_refused_as_an_argument_only() {
        let evil = Context { agent_id: "--all".into(), ..ctx() };
        let err = fill_arg("{agent_id}", &evil).unwrap_err();
        assert!(err.contains("option") && err.contains("{agent_id}") && !err.contains("--all"), "{err}");
        assert_eq!(fill_arg("--agent={agent_id}", &evil).unwrap(), "--agent=--all", "inside an argument it is inert");
        assert_eq!(fill("{agent_id}", &evil).unwrap(), "--all", "a header or body value is no option");
    }

    #[test]
    fn a_value_that_steps_along_a_path_is_refused_in_an_argument() {
        let with = |pairs: &[(&str, &str)]| Context {
            labels: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..ctx()
        };
        for agent_id in [".", ".."] {
            let evil = Context { agent_id: agent_id.into(), ..ctx() };
            let err = fill_arg("/srv/agents/{agent_id}", &evil).unwrap_err();
            assert!(err.contains("step of a path"), "{err}");
            assert!(fill_arg("--dir={agent_id}", &evil).is_err(), "an option's value is a path too");
            assert!(check_command_agent(agent_id).is_err());
        }
        type Labels<'a> = &'a [(&'a str, &'a str)];
        let refused: &[(&str, Labels)] = &[
            ("/srv/{label.d}/run", &[("d", "../..")]),
            ("/srv/{label.d}/run", &[("d", "a/../../etc")]),
            ("/srv/agents/{label.d}", &[("d", "")]),
            ("/srv/agents/{label.d}", &[("d", "/")]),
            ("/srv/agents/{label.d}", &[("d", "./")]),
            ("/data/.{label.d}", &[("d", "./y")]),
            ("/data/{label.a}{label.b}", &[("a", "x/."), ("b", "./y")]),
            ("host:{label.d}", &[("d", "..")]),
            ("{label.d}", &[("d", ".")]),
        ];
        for (template, labels) in refused {
            assert!(fill_arg(template, &with(labels)).is_err(), "{template} with {labels:?}");
        }
        let allowed: &[(&str, Labels, &str)] = &[
            ("/srv/{agent_id}/{label.d}", &[("d", ".cache/x")], "/srv/worker-7/.cache/x"),
            ("/srv/agents/{agent_id}/", &[], "/srv/agents/worker-7/"),
            ("/srv/{label.d}/../shared", &[("d", "a")], "/srv/a/../shared"),
            ("--incident={incident_id}", &[], "--incident=42"),
            ("a..b={label.d}", &[("d", "x..y")], "a..b=x..y"),
        ];
        for (template, labels, filled) in allowed {
            assert_eq!(fill_arg(template, &with(labels)).unwrap(), *filled, "{template}");
        }
        // A manual run's empty incident id, outside a path, stays allowed.
        let manual = Context { incident_id: None, ..ctx() };
        assert_eq!(fill_arg("--incident={incident_id}", &manual).unwrap(), "--incident=");
        assert!(check_command_agent("a..b").is_ok() && check_command_agent("-rf").is_err());
        assert_eq!(fill("{agent_id}", &Context { agent_id: "..".into(), ..ctx() }).unwrap(), "..", "a body is inert");
    }

    #[test]
    fn json_bodies_fill_every_string() {
        let body = serde_json::json!({"agent": "{agent_id}", "tags": ["{label.role}"], "force": true});
        assert_eq!(
            fill_json(&body, &ctx()).unwrap(),
            serde_json::json!({"agent": "worker-7", "tags": ["worker"], "force": true})
        );
    }
}
