//! The clock of warden's periodic background loops.

use std::time::Duration;

use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Ticks every `period` until `stop` fires: the first at once, and a tick
/// missed because the work ran long delays the ones after it rather than
/// firing them in a burst.
///
/// ```
/// # async fn background(stop: tokio_util::sync::CancellationToken) {
/// let mut every = warden::every::Every::new(std::time::Duration::from_secs(10), &stop);
/// while every.tick().await {
///     // one pass
/// }
/// # }
/// ```
pub struct Every {
    ticks: Interval,
    stop: CancellationToken,
}

impl Every {
    pub fn new(period: Duration, stop: &CancellationToken) -> Self {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self { ticks, stop: stop.clone() }
    }

    /// Waits for the next tick: `true` to run a pass, `false` once stopped
    /// (a stop wins over a tick that is due at the same moment).
    pub async fn tick(&mut self) -> bool {
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => false,
            _ = self.ticks.tick() => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ticks_at_once_then_stops_when_told() {
        let stop = CancellationToken::new();
        let mut every = Every::new(Duration::from_secs(3600), &stop);
        assert!(every.tick().await, "the first tick is immediate");
        // The next is an hour away: only the stop can end this wait.
        let stopper = stop.clone();
        tokio::spawn(async move { stopper.cancel() });
        assert!(!every.tick().await);
        assert!(!every.tick().await, "stays stopped");
    }
}
