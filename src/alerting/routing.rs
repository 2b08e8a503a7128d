//! Routing: which escalation policy an alert follows. Pure: a function of
//! the settings and the alert's severity, issue type and agent labels.
//!
//! Routes are tried in order and the first whose every condition matches
//! wins. With no routes configured, every alert follows the policy named
//! `default` if there is one, else an implicit policy that notifies every
//! channel at once — so out of the box (no channels configured) alerts go
//! to the log channel.

use std::collections::BTreeMap;

use chrono::Duration;
use serde_json::Value;

use crate::config::AlertingSettings;
use crate::model::Severity;

/// Route name used when no routes are configured.
pub const IMPLICIT_ROUTE: &str = "default";
/// Policy name of the implicit policy (every channel at once).
pub const IMPLICIT_POLICY: &str = "all_channels";
/// Route and policy name of channel-health alerts.
pub const CHANNEL_ROUTE: &str = "channel_health";

/// One escalation level: channels notified `after` the first notification.
#[derive(Debug, Clone, PartialEq)]
pub struct Level {
    pub after: Duration,
    pub channels: Vec<String>,
}

/// An escalation policy, resolved from the settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: String,
    pub levels: Vec<Level>,
}

impl Policy {
    /// Every channel of every level, each once, in level order.
    pub fn all_channels(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for level in &self.levels {
            for c in &level.channels {
                if !out.contains(c) {
                    out.push(c.clone());
                }
            }
        }
        out
    }

    /// The policy of a channel-health alert: every other channel, once.
    pub fn for_failing_channel(failing: &str, channels: &[String]) -> Self {
        Self {
            name: CHANNEL_ROUTE.to_string(),
            levels: vec![Level {
                after: Duration::zero(),
                channels: channels.iter().filter(|c| c.as_str() != failing).cloned().collect(),
            }],
        }
    }
}

/// What an alert is matched on.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub severity: Severity,
    /// Issue type as stored (`agent_unresponsive`, ...).
    pub issue: &'a str,
    /// The agent's labels (a JSON object), if it has an agent.
    pub labels: Option<&'a Value>,
}

#[derive(Debug, Clone)]
struct Route {
    name: String,
    severities: Vec<Severity>,
    issues: Vec<String>,
    labels: BTreeMap<String, String>,
    policy: String,
}

/// The routing table, built once from the settings.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<Route>,
    policies: BTreeMap<String, Policy>,
    channels: Vec<String>,
}

impl Router {
    pub fn from_settings(settings: &AlertingSettings) -> Self {
        let channels: Vec<String> = settings.effective_channels().into_keys().collect();
        let mut policies: BTreeMap<String, Policy> = settings
            .policies
            .iter()
            .map(|p| {
                let levels = p
                    .levels
                    .iter()
                    .map(|l| Level { after: l.after.to_chrono(), channels: l.channels.clone() })
                    .collect();
                (p.name.clone(), Policy { name: p.name.clone(), levels })
            })
            .collect();
        let mut routes: Vec<Route> = settings
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| Route {
                name: r.name.clone().unwrap_or_else(|| format!("route{}", i + 1)),
                severities: r.severities.clone(),
                issues: r.issues.iter().map(|t| t.as_str().to_string()).collect(),
                labels: r.labels.clone(),
                policy: r.policy.clone(),
            })
            .collect();
        if routes.is_empty() {
            let policy = if policies.contains_key("default") {
                "default".to_string()
            } else {
                // Configured channels if any, else the log channel.
                let configured: Vec<String> = settings.channels.keys().cloned().collect();
                let targets =
                    if configured.is_empty() { vec![crate::config::LOG_CHANNEL.to_string()] } else { configured };
                policies.insert(
                    IMPLICIT_POLICY.to_string(),
                    Policy {
                        name: IMPLICIT_POLICY.to_string(),
                        levels: vec![Level { after: Duration::zero(), channels: targets }],
                    },
                );
                IMPLICIT_POLICY.to_string()
            };
            routes.push(Route {
                name: IMPLICIT_ROUTE.to_string(),
                severities: Vec::new(),
                issues: Vec::new(),
                labels: BTreeMap::new(),
                policy,
            });
        }
        Self { routes, policies, channels }
    }

    /// The first route matching `subject`: its name and policy.
    pub fn route(&self, subject: Subject<'_>) -> Option<(&str, &Policy)> {
        let route = self.routes.iter().find(|r| matches(r, subject))?;
        Some((route.name.as_str(), self.policies.get(&route.policy)?))
    }

    /// A policy by name (an alert keeps the policy it was first sent by).
    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.get(name)
    }

    /// Every channel in effect, `log` included.
    pub fn channels(&self) -> &[String] {
        &self.channels
    }
}

fn matches(route: &Route, s: Subject<'_>) -> bool {
    if !route.severities.is_empty() && !route.severities.contains(&s.severity) {
        return false;
    }
    if !route.issues.is_empty() && !route.issues.iter().any(|i| i == s.issue) {
        return false;
    }
    labels_match(&route.labels, s.labels)
}

/// Whether every wanted label is present with the same value.
pub fn labels_match(wanted: &BTreeMap<String, String>, labels: Option<&Value>) -> bool {
    wanted.iter().all(|(k, v)| labels.and_then(|l| l.get(k)).and_then(Value::as_str) == Some(v.as_str()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::{LevelSettings, PolicySettings, RouteSettings};
    use crate::health::incidents::IssueType;

    fn settings() -> AlertingSettings {
        let mut s = crate::config::Settings::defaults().alerting;
        s.channels.insert("pager".into(), crate::config::ChannelSettings::log());
        s.channels.insert("chat".into(), crate::config::ChannelSettings::log());
        s.policies = vec![
            PolicySettings {
                name: "urgent".into(),
                levels: vec![
                    LevelSettings { after: crate::config::Duration::from_secs(0), channels: vec!["chat".into()] },
                    LevelSettings { after: crate::config::Duration::from_secs(300), channels: vec!["pager".into()] },
                ],
            },
            PolicySettings {
                name: "quiet".into(),
                levels: vec![LevelSettings {
                    after: crate::config::Duration::from_secs(0),
                    channels: vec!["log".into()],
                }],
            },
        ];
        s.routes = vec![
            RouteSettings {
                name: None,
                severities: vec![Severity::Critical, Severity::Emergency],
                issues: vec![],
                labels: [("team".to_string(), "infra".to_string())].into(),
                policy: "urgent".into(),
            },
            RouteSettings {
                name: Some("rest".into()),
                severities: vec![],
                issues: vec![IssueType::HeartbeatLate, IssueType::AgentUnresponsive],
                labels: BTreeMap::new(),
                policy: "quiet".into(),
            },
        ];
        s
    }

    #[test]
    fn the_first_route_whose_conditions_all_match_wins() {
        let r = Router::from_settings(&settings());
        let infra = json!({"team": "infra"});
        let other = json!({"team": "web"});
        let s = |severity, issue, labels| Subject { severity, issue, labels };
        let (name, p) = r.route(s(Severity::Critical, "agent_unresponsive", Some(&infra))).unwrap();
        assert_eq!((name, p.name.as_str()), ("route1", "urgent"));
        assert_eq!(p.levels[1].after, Duration::minutes(5));
        let (name, p) = r.route(s(Severity::Critical, "agent_unresponsive", Some(&other))).unwrap();
        assert_eq!((name, p.name.as_str()), ("rest", "quiet"), "labels must match");
        assert!(r.route(s(Severity::Warning, "high_error_rate", Some(&infra))).is_none(), "no route: not sent");
        assert!(r.route(s(Severity::Critical, "flapping", None)).is_none());
    }

    #[test]
    fn without_routes_every_alert_goes_to_every_channel_or_the_log() {
        let mut s = settings();
        s.routes.clear();
        s.policies.clear();
        let r = Router::from_settings(&s);
        let (name, p) = r.route(Subject { severity: Severity::Info, issue: "flapping", labels: None }).unwrap();
        assert_eq!(name, IMPLICIT_ROUTE);
        assert_eq!(p.levels[0].channels, vec!["chat".to_string(), "pager".to_string()]);
        s.channels.clear();
        let r = Router::from_settings(&s);
        let (_, p) = r.route(Subject { severity: Severity::Info, issue: "flapping", labels: None }).unwrap();
        assert_eq!(p.levels[0].channels, vec!["log".to_string()]);
    }

    #[test]
    fn a_failing_channel_alert_goes_everywhere_else() {
        let p = Policy::for_failing_channel("chat", &["chat".into(), "log".into(), "pager".into()]);
        assert_eq!(p.all_channels(), vec!["log".to_string(), "pager".to_string()]);
    }
}
