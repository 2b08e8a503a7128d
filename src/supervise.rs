//! warden's long-running tasks (evaluation, recovery, alerting, ingest's
//! writers, retention), each started again should it panic.
//!
//! A task that panics ends on its own while the process goes on serving:
//! a dispatcher gone would answer /healthz and send no page, a writer gone
//! would leave every heartbeat waiting. Each task is a loop that keeps no
//! state the database does not hold (leases and claims run out and are
//! taken again), so starting it afresh is safe. Every panic is logged and
//! counted in `warden_task_panics_total{task}`; the restarts are spaced
//! out, so that one that panics on every pass does not spin. Stopped
//! before its restart, a task runs once more to do its shutdown work.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The wait before the first restart, doubling up to [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_secs(1);
const MAX_WAIT: Duration = Duration::from_secs(60);
/// A task that ran this long before panicking is restarted after
/// [`FIRST_WAIT`] again: its panics are rare, not a loop.
const SETTLED: Duration = Duration::from_secs(300);

/// Starts `make()`'s task on `tasks`, named `name` in logs and metrics,
/// and starts it again with a fresh `make()` each time it panics, unless
/// `stop` has fired by then. Ends when the task returns.
pub fn spawn<F, Fut>(tasks: &TaskTracker, name: &'static str, stop: &CancellationToken, make: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    // Present from the start, so that an alert on its increase sees the
    // first panic.
    crate::metrics::METRICS.task_panics.with_label_values(&[name]);
    tasks.spawn(supervise(tasks.clone(), name, stop.clone(), FIRST_WAIT, make));
}

/// Returns how many times the task was restarted.
async fn supervise<F, Fut>(
    tasks: TaskTracker,
    name: &'static str,
    stop: CancellationToken,
    first: Duration,
    mut make: F,
) -> u32
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut restarts = 0;
    let mut waits = crate::every::retry_waits(first, MAX_WAIT.max(first));
    loop {
        let started = Instant::now();
        let ended = tasks.spawn(make()).await;
        let Err(e) = ended else { return restarts };
        // Not a panic: the runtime is shutting down and dropped the task.
        if !e.is_panic() {
            return restarts;
        }
        crate::metrics::METRICS.task_panics.with_label_values(&[name]).inc();
        if started.elapsed() >= SETTLED {
            waits = crate::every::retry_waits(first, MAX_WAIT.max(first));
        }
        let wait = waits.next().unwrap_or(MAX_WAIT);
        if stop.is_cancelled() {
            tracing::error!(task = name, error = %e, "a background task panicked while stopping");
            closing(&tasks, name, &mut make).await;
            return restarts;
        }
        tracing::error!(task = name, error = %e, restart_in = ?wait, "a background task panicked; starting it again");
        tokio::select! {
            _ = stop.cancelled() => {
                closing(&tasks, name, &mut make).await;
                return restarts;
            }
            _ = tokio::time::sleep(wait) => {}
        }
        restarts += 1;
    }
}

/// A last instance for a task that panicked and is stopped before it ran
/// again: it finds the stop at once and does only its shutdown work
/// (recovery lets its running actions finish or records them interrupted;
/// the ingest writer writes what is still queued), which the one that
/// panicked never did.
async fn closing<F, Fut>(tasks: &TaskTracker, name: &'static str, make: &mut F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    if let Err(e) = tasks.spawn(make()).await
        && e.is_panic()
    {
        crate::metrics::METRICS.task_panics.with_label_values(&[name]).inc();
        tracing::error!(task = name, error = %e, "a background task panicked again while stopping");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn panics(task: &str) -> u64 {
        crate::metrics::METRICS.task_panics.with_label_values(&[task]).get()
    }

    /// A task that panics its first `times` runs, then returns; counts
    /// its runs.
    fn panicking(
        times: u32,
        runs: &Arc<AtomicU32>,
    ) -> impl FnMut() -> futures_util::future::BoxFuture<'static, ()> + Send + 'static {
        let runs = runs.clone();
        move || {
            let run = runs.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::task::yield_now().await;
                if run < times {
                    panic!("run {run} fails");
                }
            })
        }
    }

    #[tokio::test]
    async fn a_task_that_panics_is_started_again_until_it_returns() {
        let runs = Arc::new(AtomicU32::new(0));
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let restarts =
            supervise(tracker.clone(), "test_restarts", stop, Duration::from_millis(1), panicking(2, &runs)).await;
        assert_eq!(restarts, 2);
        assert_eq!(runs.load(Ordering::SeqCst), 3, "two panics, then the run that returned");
        assert_eq!(panics("test_restarts"), 2);
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn a_task_that_returns_runs_once() {
        let runs = Arc::new(AtomicU32::new(0));
        let restarts =
            supervise(TaskTracker::new(), "test_once", CancellationToken::new(), FIRST_WAIT, panicking(0, &runs)).await;
        assert_eq!((restarts, runs.load(Ordering::SeqCst)), (0, 1));
        assert_eq!(panics("test_once"), 0);
    }

    #[tokio::test]
    async fn once_stopped_a_task_that_panicked_runs_only_to_stop() {
        let runs = Arc::new(AtomicU32::new(0));
        let stop = CancellationToken::new();
        stop.cancel();
        let restarts = supervise(TaskTracker::new(), "test_stopped", stop, FIRST_WAIT, panicking(1, &runs)).await;
        // Its shutdown work, which the one that panicked never did.
        assert_eq!((restarts, runs.load(Ordering::SeqCst)), (0, 2), "the panic counted, one closing run");
        assert_eq!(panics("test_stopped"), 1);

        let runs = Arc::new(AtomicU32::new(0));
        let stop = CancellationToken::new();
        stop.cancel();
        supervise(TaskTracker::new(), "test_stopped_twice", stop, FIRST_WAIT, panicking(5, &runs)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2, "no more than one closing run");
        assert_eq!(panics("test_stopped_twice"), 2);
    }

    #[tokio::test]
    async fn a_stop_during_the_wait_ends_it() {
        let runs = Arc::new(AtomicU32::new(0));
        let stop = CancellationToken::new();
        // An hour's wait after the first panic: only the stop ends it.
        let supervisor = tokio::spawn(supervise(
            TaskTracker::new(),
            "test_stop_waiting",
            stop.clone(),
            Duration::from_secs(3600),
            panicking(1, &runs),
        ));
        while panics("test_stop_waiting") == 0 {
            tokio::task::yield_now().await;
        }
        stop.cancel();
        assert_eq!(supervisor.await.unwrap(), 0);
        assert_eq!(runs.load(Ordering::SeqCst), 2, "the panic, then a closing run");
    }
}
