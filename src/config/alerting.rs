//! `[alerting]`: channels, escalation policies, routes, maintenance windows
//! and the timings of grouping, escalation and delivery.
//!
//! The shape is the DESIGN contract. Channel, policy and maintenance window
//! names are lowercase letters, digits and `_` so that they work as keys in
//! environment variables (`WARDEN__ALERTING__CHANNELS__OPS_SLACK__WEBHOOK_URL`)
//! and in the `alert_deliveries.channel` column. Secrets (webhook URLs, HMAC
//! keys, bot tokens, SMTP credentials) are [`Secret`]s: they never print and
//! are meant to come from the environment.
//!
//! Validation here checks everything that can be checked without the
//! network: unknown channels in policies, unknown policies in routes, bad
//! names, missing secrets of enabled channels, unparseable addresses.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::sections::{check_max, check_min, check_range};
use super::{Duration, Secret, SettingsError};
use crate::health::incidents::IssueType;
use crate::model::Severity;

/// Name of the channel that always exists: it writes alerts to warden's log.
pub const LOG_CHANNEL: &str = "log";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertingSettings {
    /// Run the escalator and the dispatcher (alerts are recorded either way).
    pub enabled: bool,
    /// How long the first alert of a route waits for others to go out with it.
    pub group_wait: Duration,
    /// Least time between two messages of one route's group.
    pub group_interval: Duration,
    /// A firing, unacknowledged alert is notified again this often.
    pub repeat_interval: Duration,
    /// Longest a page waits while an automated recovery is under way.
    pub hold_during_recovery: Duration,
    /// A delivery still failing this long after it was queued is dead-lettered.
    pub max_delivery_age: Duration,
    /// How often the escalator looks at active alerts.
    pub evaluate_interval: Duration,
    /// How often the dispatcher looks for due deliveries.
    pub dispatch_interval: Duration,
    /// Most messages one dispatcher claims (and sends concurrently) at once.
    pub dispatch_batch: u32,
    /// Time allowed for one HTTP request or SMTP step; a whole send is cut
    /// off at 3 × this + 20s, inside its claim.
    pub delivery_timeout: Duration,
    /// First retry delay; doubles per failed attempt, with jitter.
    pub retry_base: Duration,
    /// Largest retry delay (a receiver's Retry-After is honoured up to 1h).
    pub retry_max: Duration,
    /// Failed attempts in a row after which a channel raises its own alert.
    pub channel_failure_threshold: u32,
    /// Per-agent liveness alerts opened up to this long before a fleet
    /// outage are covered by it, as are those opened during it.
    pub fleet_outage_lookback: Duration,
    /// Agent label naming the agents it depends on (comma-separated ids).
    pub depends_on_label: String,
    /// Base address of this warden's API as on-call people reach it, used
    /// in acknowledgement instructions; empty leaves the host out.
    pub link_base: String,
    pub smtp: SmtpSettings,
    /// Channels by name.
    #[serde(default)]
    pub channels: BTreeMap<String, ChannelSettings>,
    /// Escalation policies.
    #[serde(default)]
    pub policies: Vec<PolicySettings>,
    /// Routes from alerts to policies; the first match wins.
    #[serde(default)]
    pub routes: Vec<RouteSettings>,
    /// Recurring maintenance windows.
    #[serde(default)]
    pub maintenance: Vec<MaintenanceWindow>,
}

text_enum! {
    /// How the SMTP connection is secured.
    pub enum SmtpTls {
        /// Plain text: only for a relay on the same host or network.
        None = "none",
        /// Plain connection upgraded with STARTTLS (port 587).
        Starttls = "starttls",
        /// TLS from the first byte (port 465).
        Tls = "tls",
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    /// Sender address, `name@host` or `Name <name@host>`.
    pub from: String,
    /// Credentials; empty sends without authentication.
    #[serde(default)]
    pub username: Secret,
    #[serde(default)]
    pub password: Secret,
}

text_enum! {
    /// What a channel delivers to.
    pub enum ChannelKind {
        Slack = "slack",
        Email = "email",
        Webhook = "webhook",
        Telegram = "telegram",
        Log = "log",
    }
}

/// One channel. Which fields apply depends on `kind`; the others must be
/// left out.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSettings {
    pub kind: ChannelKind,
    /// slack: the incoming-webhook URL.
    #[serde(default, skip_serializing_if = "Secret::is_empty")]
    pub webhook_url: Secret,
    /// email: recipients.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// webhook: where to POST.
    #[serde(default, skip_serializing_if = "Secret::is_empty")]
    pub url: Secret,
    /// webhook: HMAC-SHA256 key for `X-Warden-Signature`.
    #[serde(default, skip_serializing_if = "Secret::is_empty")]
    pub secret: Secret,
    /// telegram: the bot's token.
    #[serde(default, skip_serializing_if = "Secret::is_empty")]
    pub bot_token: Secret,
    /// telegram: chats to message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chat_ids: Vec<String>,
    /// telegram: Bot API base address (tests point it at a loopback server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_base: Option<String>,
}

/// Bot API address used when a telegram channel names none.
pub const TELEGRAM_API_BASE: &str = "https://api.telegram.org";

impl ChannelSettings {
    /// A log channel (the implicit default).
    pub fn log() -> Self {
        Self {
            kind: ChannelKind::Log,
            webhook_url: Secret::default(),
            to: Vec::new(),
            url: Secret::default(),
            secret: Secret::default(),
            bot_token: Secret::default(),
            chat_ids: Vec::new(),
            api_base: None,
        }
    }

    /// The Bot API base address of a telegram channel.
    pub fn telegram_api_base(&self) -> &str {
        self.api_base.as_deref().unwrap_or(TELEGRAM_API_BASE).trim_end_matches('/')
    }
}

/// An escalation policy: levels notified one after another until the
/// alert is acknowledged or resolved.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    pub name: String,
    pub levels: Vec<LevelSettings>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelSettings {
    /// Delay after the alert's first notification time.
    pub after: Duration,
    pub channels: Vec<String>,
}

/// Sends alerts that match every given condition to a policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// Optional name, shown in alerts; default `route<N>` (1-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Severities matched; empty matches any.
    #[serde(default)]
    pub severities: Vec<Severity>,
    /// Issue types matched; empty matches any.
    #[serde(default)]
    pub issues: Vec<IssueType>,
    /// Agent labels that must all be equal; empty matches any.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub policy: String,
}

text_enum! {
    /// Day of the week (UTC) in maintenance windows.
    pub enum Weekday {
        Mon = "mon",
        Tue = "tue",
        Wed = "wed",
        Thu = "thu",
        Fri = "fri",
        Sat = "sat",
        Sun = "sun",
    }
}

/// A recurring window during which matching alerts are recorded but not
/// notified.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceWindow {
    pub name: String,
    /// Days the window starts on (UTC); empty is every day.
    #[serde(default)]
    pub days: Vec<Weekday>,
    /// Start time of day, `HH:MM` in UTC.
    pub start: String,
    pub duration: Duration,
    /// Agents covered; empty (with empty labels) covers every agent.
    #[serde(default)]
    pub agents: Vec<String>,
    /// Agent labels that must all be equal.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Issue types covered; empty covers all.
    #[serde(default)]
    pub issues: Vec<IssueType>,
}

impl MaintenanceWindow {
    /// Minutes after midnight UTC of `start`, if it is a valid `HH:MM`.
    pub fn start_minute(&self) -> Option<u32> {
        let (h, m) = self.start.trim().split_once(':')?;
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (h < 24 && m < 60).then_some(h * 60 + m)
    }
}

/// Whether `name` is a valid channel, policy or window name.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

const NAME_RULE: &str = "1-64 lowercase letters, digits and _";

impl AlertingSettings {
    /// The channels in effect: those configured, plus `log`, which always
    /// exists (a configured channel named `log` replaces it).
    pub fn effective_channels(&self) -> BTreeMap<String, ChannelSettings> {
        let mut channels = self.channels.clone();
        channels.entry(LOG_CHANNEL.to_string()).or_insert_with(ChannelSettings::log);
        channels
    }

    /// Checks beyond types: names, references, secrets, addresses, ranges.
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        check_max("alerting.group_wait", self.group_wait, Duration::from_secs(3600))?;
        check_max("alerting.group_interval", self.group_interval, Duration::from_secs(86_400))?;
        check_min("alerting.repeat_interval", self.repeat_interval, Duration::from_secs(1))?;
        check_max("alerting.hold_during_recovery", self.hold_during_recovery, Duration::from_secs(86_400))?;
        check_min("alerting.max_delivery_age", self.max_delivery_age, Duration::from_secs(1))?;
        check_min("alerting.evaluate_interval", self.evaluate_interval, Duration::from_millis(100))?;
        check_max("alerting.evaluate_interval", self.evaluate_interval, Duration::from_secs(60))?;
        check_min("alerting.dispatch_interval", self.dispatch_interval, Duration::from_millis(50))?;
        check_max("alerting.dispatch_interval", self.dispatch_interval, Duration::from_secs(60))?;
        check_range("alerting.dispatch_batch", self.dispatch_batch, 1, 1000)?;
        check_min("alerting.delivery_timeout", self.delivery_timeout, Duration::from_millis(100))?;
        check_max("alerting.delivery_timeout", self.delivery_timeout, Duration::from_secs(300))?;
        check_min("alerting.retry_base", self.retry_base, Duration::from_millis(10))?;
        check_min("alerting.retry_max", self.retry_max, self.retry_base)?;
        check_range("alerting.channel_failure_threshold", self.channel_failure_threshold, 1, 1000)?;
        let label = self.depends_on_label.trim();
        if label.is_empty() || label.len() > 128 {
            return Err(SettingsError::new("alerting.depends_on_label", label, "a label name of 1-128 characters"));
        }
        let base = self.link_base.trim();
        if !base.is_empty() && !is_http_url(base) {
            return Err(SettingsError::new("alerting.link_base", base, "empty, or an http:// or https:// address"));
        }

        let smtp = &self.smtp;
        let uses_email = self.channels.values().any(|c| c.kind == ChannelKind::Email);
        if uses_email {
            if smtp.host.trim().is_empty() {
                return Err(SettingsError::new(
                    "alerting.smtp.host",
                    &smtp.host,
                    "a host name (an email channel is configured)",
                ));
            }
            if smtp.port == 0 {
                return Err(SettingsError::new("alerting.smtp.port", smtp.port, "a port from 1 to 65535"));
            }
            smtp.from.parse::<lettre::message::Mailbox>().map_err(|_| {
                SettingsError::new(
                    "alerting.smtp.from",
                    &smtp.from,
                    "an address like warden@example.com or Warden <warden@example.com>",
                )
            })?;
        }
        if smtp.username.is_empty() != smtp.password.is_empty() {
            // Name the one that is missing.
            let missing = if smtp.password.is_empty() { "alerting.smtp.password" } else { "alerting.smtp.username" };
            return Err(SettingsError::unset(
                missing,
                "set both alerting.smtp.username and alerting.smtp.password, or neither",
            ));
        }
        if !smtp.username.is_empty() && smtp.tls == SmtpTls::None {
            return Err(SettingsError::new(
                "alerting.smtp.tls",
                smtp.tls,
                "starttls or tls when credentials are set (they must not cross the network in clear)",
            ));
        }

        for (name, channel) in &self.channels {
            self.validate_channel(name, channel)?;
        }
        let channels = self.effective_channels();

        let mut policies = HashSet::new();
        for (i, policy) in self.policies.iter().enumerate() {
            let key = format!("alerting.policies[{i}].name");
            if !is_valid_name(&policy.name) {
                return Err(SettingsError::new(&key, &policy.name, NAME_RULE));
            }
            if !policies.insert(policy.name.as_str()) {
                return Err(SettingsError::new(&key, &policy.name, "a name no other policy has"));
            }
            if policy.levels.is_empty() {
                return Err(SettingsError::new(
                    &format!("alerting.policies[{i}].levels"),
                    "[]",
                    "at least one level, like { after = \"0s\", channels = [\"log\"] }",
                ));
            }
            let mut previous = Duration::from_secs(0);
            for (l, level) in policy.levels.iter().enumerate() {
                let key = format!("alerting.policies[{i}].levels[{l}]");
                if level.after < previous {
                    return Err(SettingsError::new(
                        &format!("{key}.after"),
                        level.after,
                        format!("at least the previous level's after ({previous}): levels escalate in order"),
                    ));
                }
                previous = level.after;
                if level.channels.is_empty() {
                    return Err(SettingsError::new(&format!("{key}.channels"), "[]", "at least one channel name"));
                }
                for channel in &level.channels {
                    if !channels.contains_key(channel) {
                        let known: Vec<&str> = channels.keys().map(String::as_str).collect();
                        return Err(SettingsError::new(
                            &format!("{key}.channels"),
                            channel,
                            format!("a configured channel: {}", known.join(", ")),
                        ));
                    }
                }
            }
        }

        let mut route_names = HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            if let Some(name) = &route.name {
                if !is_valid_name(name) {
                    return Err(SettingsError::new(&format!("alerting.routes[{i}].name"), name, NAME_RULE));
                }
                if !route_names.insert(name.as_str()) {
                    return Err(SettingsError::new(
                        &format!("alerting.routes[{i}].name"),
                        name,
                        "a name no other route has",
                    ));
                }
            }
            if !policies.contains(route.policy.as_str()) {
                let known: Vec<&str> = self.policies.iter().map(|p| p.name.as_str()).collect();
                let allowed = if known.is_empty() {
                    "the name of a policy defined in [[alerting.policies]] (none is defined)".to_string()
                } else {
                    format!("a defined policy: {}", known.join(", "))
                };
                return Err(SettingsError::new(&format!("alerting.routes[{i}].policy"), &route.policy, allowed));
            }
        }

        let mut windows = HashSet::new();
        for (i, window) in self.maintenance.iter().enumerate() {
            let key = format!("alerting.maintenance[{i}]");
            if !is_valid_name(&window.name) || !windows.insert(window.name.as_str()) {
                return Err(SettingsError::new(&format!("{key}.name"), &window.name, format!("{NAME_RULE}, unique")));
            }
            if window.start_minute().is_none() {
                return Err(SettingsError::new(&format!("{key}.start"), &window.start, "a UTC time of day like 02:00"));
            }
            check_min(&format!("{key}.duration"), window.duration, Duration::from_secs(60))?;
            check_max(&format!("{key}.duration"), window.duration, Duration::from_secs(7 * 86_400))?;
            if let Some(bad) = window.agents.iter().find(|a| crate::model::AgentId::parse(a.as_str()).is_err()) {
                return Err(SettingsError::new(&format!("{key}.agents"), bad, "agent ids of A-Z a-z 0-9 . _ : -"));
            }
        }
        Ok(())
    }

    fn validate_channel(&self, name: &str, c: &ChannelSettings) -> Result<(), SettingsError> {
        let key = |field: &str| format!("alerting.channels.{name}.{field}");
        if !is_valid_name(name) {
            return Err(SettingsError::new(
                &format!("alerting.channels.{name}"),
                name,
                format!("a channel name of {NAME_RULE}"),
            ));
        }
        // Fields of other kinds are refused, so a typo'd kind is caught.
        let fields: [(&str, bool, &[ChannelKind]); 7] = [
            ("webhook_url", !c.webhook_url.is_empty(), &[ChannelKind::Slack]),
            ("to", !c.to.is_empty(), &[ChannelKind::Email]),
            ("url", !c.url.is_empty(), &[ChannelKind::Webhook]),
            ("secret", !c.secret.is_empty(), &[ChannelKind::Webhook]),
            ("bot_token", !c.bot_token.is_empty(), &[ChannelKind::Telegram]),
            ("chat_ids", !c.chat_ids.is_empty(), &[ChannelKind::Telegram]),
            ("api_base", c.api_base.is_some(), &[ChannelKind::Telegram]),
        ];
        for (field, set, kinds) in fields {
            if set && !kinds.contains(&c.kind) {
                return Err(SettingsError::new(
                    &key(field),
                    "",
                    format!("only for kind {}; this channel is kind {}", kinds[0], c.kind),
                ));
            }
        }
        // Secrets usually come from the environment; an enabled service
        // refuses to start without them rather than fail on the first page.
        let required = |field: &str, secret: &Secret| -> Result<(), SettingsError> {
            if self.enabled && secret.is_empty() {
                return Err(SettingsError::unset(
                    &key(field),
                    format!("required for kind {}; set {}", c.kind, super::env_var_for(&key(field))),
                ));
            }
            Ok(())
        };
        match c.kind {
            ChannelKind::Slack => {
                required("webhook_url", &c.webhook_url)?;
                if !c.webhook_url.is_empty() && !is_http_url(c.webhook_url.expose()) {
                    return Err(SettingsError::new(&key("webhook_url"), "", "an https:// Slack incoming-webhook URL"));
                }
            }
            ChannelKind::Email => {
                if c.to.is_empty() {
                    return Err(SettingsError::new(&key("to"), "[]", "at least one recipient address"));
                }
                for address in &c.to {
                    address.parse::<lettre::message::Mailbox>().map_err(|_| {
                        SettingsError::new(&key("to"), address, "email addresses like oncall@example.com")
                    })?;
                }
            }
            ChannelKind::Webhook => {
                required("url", &c.url)?;
                required("secret", &c.secret)?;
                if !c.url.is_empty() && !is_http_url(c.url.expose()) {
                    return Err(SettingsError::new(&key("url"), "", "an http:// or https:// address"));
                }
            }
            ChannelKind::Telegram => {
                required("bot_token", &c.bot_token)?;
                if c.bot_token.expose().contains(['/', '?', '#', ' ']) {
                    return Err(SettingsError::new(&key("bot_token"), "", "a Bot API token like 123456:ABC-DEF"));
                }
                if c.chat_ids.is_empty() {
                    return Err(SettingsError::new(&key("chat_ids"), "[]", "at least one chat id, like \"-100123\""));
                }
                if let Some(base) = &c.api_base
                    && !is_http_url(base)
                {
                    return Err(SettingsError::new(&key("api_base"), base, "an http:// or https:// address"));
                }
            }
            ChannelKind::Log => {}
        }
        Ok(())
    }
}

fn is_http_url(text: &str) -> bool {
    let rest = text.strip_prefix("https://").or_else(|| text.strip_prefix("http://"));
    rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/') && !r.contains(char::is_whitespace))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_lowercase_letters_digits_and_underscores() {
        for ok in ["ops_slack", "a", "oncall2"] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in ["", "Ops", "ops-slack", "ops.slack", "ops slack", &"x".repeat(65)] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn maintenance_start_parses_hh_mm() {
        let mut w = MaintenanceWindow {
            name: "w".into(),
            days: vec![],
            start: "02:30".into(),
            duration: Duration::from_secs(3600),
            agents: vec![],
            labels: BTreeMap::new(),
            issues: vec![],
        };
        assert_eq!(w.start_minute(), Some(150));
        for bad in ["24:00", "2", "aa:bb", "02:60"] {
            w.start = bad.into();
            assert_eq!(w.start_minute(), None, "{bad}");
        }
    }

    #[test]
    fn urls_must_be_http() {
        assert!(is_http_url("https://hooks.slack.com/services/x"));
        assert!(is_http_url("http://127.0.0.1:9/x"));
        assert!(!is_http_url("ftp://x"));
        assert!(!is_http_url("https://"));
        assert!(!is_http_url("hooks.slack.com"));
    }
}
