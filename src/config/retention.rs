//! `[retention]`: how long each kind of row is kept.

use serde::{Deserialize, Serialize};

use super::sections::{check_min, check_range};
use super::{Duration, SettingsError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    pub enabled: bool,
    /// How often the (leader-only) job runs.
    pub interval: Duration,
    pub heartbeats: Duration,
    pub metrics: Duration,
    pub health_history: Duration,
    pub minute_rollups: Duration,
    pub hour_rollups: Duration,
    /// system_events other than those `transitions` keeps.
    pub events: Duration,
    /// Liveness transitions, evaluation_paused and warden's agent_restarted
    /// events (availability and restart history).
    pub transitions: Duration,
    /// Resolved incidents with their recovery jobs, actions, alerts and deliveries.
    pub incidents: Duration,
    /// Rows deleted per statement, so pruning never holds long locks.
    pub batch: u32,
}

impl RetentionSettings {
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        check_min("retention.interval", self.interval, Duration::from_secs(1))?;
        // Partitions are by day: keeping less than a day would drop today's.
        for (key, value) in [
            ("retention.heartbeats", self.heartbeats),
            ("retention.metrics", self.metrics),
            ("retention.health_history", self.health_history),
            ("retention.minute_rollups", self.minute_rollups),
            ("retention.hour_rollups", self.hour_rollups),
            ("retention.events", self.events),
            ("retention.transitions", self.transitions),
            ("retention.incidents", self.incidents),
        ] {
            check_min(key, value, Duration::from_secs(86_400))?;
        }
        check_range("retention.batch", self.batch, 100, 1_000_000)
    }
}
