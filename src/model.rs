//! Domain vocabulary shared by every part of warden: identifiers and the
//! enumerations stored in PostgreSQL (each matches a CHECK constraint).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

text_enum! {
    /// How often an agent intends to report; picks its default interval.
    pub enum Mode {
        Emergency = "emergency",
        Active = "active",
        Idle = "idle",
        Sleep = "sleep",
    }
}

text_enum! {
    /// What the agent says about itself in a heartbeat.
    pub enum HeartbeatStatus {
        Healthy = "healthy",
        Degraded = "degraded",
        Error = "error",
    }
}

text_enum! {
    /// What warden concluded about an agent's presence.
    pub enum Liveness {
        Unknown = "unknown",
        Online = "online",
        Degraded = "degraded",
        Offline = "offline",
    }
}

text_enum! {
    /// Band of the 0-100 health score.
    pub enum Tier {
        Excellent = "excellent",
        Good = "good",
        Fair = "fair",
        Poor = "poor",
        Critical = "critical",
    }
}

text_enum! {
    /// Severity of events, incidents and alerts, in rising order.
    pub enum Severity {
        Info = "info",
        Warning = "warning",
        Critical = "critical",
        Emergency = "emergency",
    }
}

/// Longest agent id accepted.
pub const AGENT_ID_MAX: usize = 128;

/// An agent's identifier: 1-128 characters of `A-Za-z0-9._:-`.
///
/// The character set keeps ids safe in URLs, log lines, label selectors and
/// command arguments without quoting.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct AgentId(String);

impl AgentId {
    pub fn parse(text: impl Into<String>) -> Result<Self, String> {
        let text = text.into();
        if text.is_empty() || text.len() > AGENT_ID_MAX {
            return Err(format!("must be 1 to {AGENT_ID_MAX} characters long (got {})", text.len()));
        }
        if let Some(bad) = text.chars().find(|c| !is_id_char(*c)) {
            return Err(format!("may only contain A-Z a-z 0-9 . _ : - (found {bad:?})"));
        }
        Ok(Self(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// Whether `name` can stand for who did something (acknowledged an alert,
/// made a silence, removed an agent): shown on one line in messages and
/// the console, and storable by PostgreSQL (no U+0000).
pub fn is_actor_name(name: &str) -> bool {
    !name.trim().is_empty() && name.chars().count() <= 128 && !name.chars().any(char::is_control)
}

/// The characters allowed in agent ids.
pub fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl AsRef<str> for AgentId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for AgentId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::parse(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_accept_the_documented_alphabet() {
        for ok in ["a", "worker-1", "eu.west:db_7", &"x".repeat(128)] {
            assert!(AgentId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn agent_ids_refuse_empty_long_and_foreign_characters() {
        assert!(AgentId::parse("").unwrap_err().contains("1 to 128"));
        assert!(AgentId::parse("x".repeat(129)).is_err());
        for bad in ["a b", "a/b", "ä", "a;rm -rf", "a\n", "{agent}"] {
            assert!(AgentId::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn enums_round_trip_and_list_allowed_values() {
        for mode in Mode::ALL {
            assert_eq!(mode.as_str().parse::<Mode>().unwrap(), *mode);
        }
        assert_eq!("asleep".parse::<Mode>().unwrap_err(), "one of emergency, active, idle or sleep");
        assert!(Severity::Info < Severity::Emergency, "severities order by rising urgency");
    }
}
