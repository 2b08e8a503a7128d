//! The clock of warden's periodic background loops, and of their retries.

use std::time::Duration;

use backon::BackoffBuilder as _;

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

/// Waits between tries of something that fails while a peer (the
/// database) is away: from `first`, doubling up to `cap`, each stretched by
/// up to as much again at random, so that replicas that lost the database
/// together do not all come back at the same instant. Never runs out.
pub fn retry_waits(first: Duration, cap: Duration) -> impl Iterator<Item = Duration> + Send {
    let waits = backon::ExponentialBuilder::new()
        .with_min_delay(first)
        .with_max_delay(cap)
        .without_max_times()
        .with_jitter()
        .build();
    // Without a limit of tries or of total time the backoff never ends; the
    // chain only keeps that true should the crate change its mind.
    waits.chain(std::iter::repeat(cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_waits_double_up_to_the_cap_with_at_most_as_much_again() {
        let (first, cap) = (Duration::from_millis(250), Duration::from_secs(4));
        let waits: Vec<Duration> = retry_waits(first, cap).take(12).collect();
        let bases = [250, 500, 1000, 2000, 4000, 4000, 4000, 4000, 4000, 4000, 4000, 4000].map(Duration::from_millis);
        for (wait, base) in waits.iter().zip(bases) {
            assert!(*wait >= base && *wait <= base * 2, "{waits:?}");
        }
        assert!(waits.windows(2).any(|w| w[0] != w[1]), "jittered: {waits:?}");
    }

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
