//! Group commit: many concurrent requests, few transactions.
//!
//! Requests put their validated heartbeats on a queue and wait. The
//! writer takes whatever is queued the moment it is free (no linger delay:
//! the time a commit takes is the batching window), applies it with one
//! call of `warden.ingest_heartbeats` — one statement, one transaction —
//! and only then answers every request in it. Nothing is acknowledged
//! before it is committed.
//!
//! Extra writers (`ingest.writers` above 1) only help when the queue is
//! deep (`HELPER_MIN_QUEUED`). Every transaction has a fixed cost in
//! PostgreSQL (about as much as twenty heartbeats), so splitting the few
//! dozen single heartbeats that wait while one transaction runs into two
//! smaller transactions costs more than running them side by side gains;
//! splitting thousands of batched heartbeats costs next to nothing, and
//! lets PostgreSQL write one transaction while warden parses the next.
//!
//! Bounds and failure:
//! - The queue is measured in heartbeats. When `ingest.queue_capacity` is
//!   reached, new requests are refused at once (503) instead of piling up,
//!   and their agents' refusals are recorded as signs of life
//!   (`refused`).
//! - When PostgreSQL is unreachable, the requests in the failed flush and
//!   everything still queued get 503, and new requests are refused at once
//!   until a probe finds the database again. Requests refused earlier,
//!   because their key could not be checked, count too
//!   (`Ingestor::refused_unreachable`). When the database answers again,
//!   how long heartbeats were refused is recorded, and liveness leaves that
//!   stretch out of agents' silence.
//! - A flush that fails for another reason (a row the database refuses) is
//!   retried request by request, so one bad request cannot fail others.
//!
//! Ordering: a request's heartbeats stay together and in order. Requests
//! in flight at the same time may be committed in either order (an agent
//! that waits for each answer before sending again is applied in its own
//! order); the row lock taken by `ingest_heartbeats` keeps concurrent
//! writers correct, and it locks known agents in agent_id order, so they
//! do not deadlock over them (one while registering the same new agents
//! at once is possible, and retried).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::sync::{Mutex, Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::heartbeat::Heartbeat;
use super::refused::Refused;
use crate::db::{self, DbError};

const INGEST_SQL: &str = "SELECT idx, is_new, restart_detected, next_heartbeat_ms \
     FROM warden.ingest_heartbeats($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, p_occurrence => $13)";

/// Heartbeats accepted and not yet answered (queued or being written)
/// from which the extra writers take a share of the queue.
const HELPER_MIN_QUEUED: usize = 500;
/// How often an unavailable writer checks whether the database is back.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// Deadlocks and serialization failures are retried this many times.
const TRANSIENT_RETRIES: usize = 3;
/// How often, and how far apart, recording an ingest outage is tried.
const RECORD_ATTEMPTS: u32 = 10;
const RECORD_RETRY: Duration = Duration::from_secs(1);

/// What a committed heartbeat is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Ack {
    pub is_new: bool,
    pub restart_detected: bool,
    pub next_heartbeat_ms: i32,
}

/// Why heartbeats were not written. Nothing of the request was committed,
/// unless `Interrupted`.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the ingest queue is full")]
    QueueFull,
    #[error("the database is unavailable")]
    Unavailable,
    #[error("warden is shutting down")]
    ShuttingDown,
    /// The writer failed unexpectedly (it panicked) with the request's
    /// heartbeats in its write: they may have been stored.
    #[error("the write was cut short")]
    Interrupted,
    #[error(transparent)]
    Db(DbError),
}

#[derive(Debug, Clone)]
pub struct WriterSettings {
    pub writers: usize,
    pub queue_capacity: usize,
    pub max_flush: usize,
    /// False: every heartbeat is its own transaction (the naive baseline,
    /// kept for benchmarks).
    pub group_commit: bool,
    /// `database.max_lifetime`: a writer keeps its connection between
    /// flushes, outside the pool, so it retires it itself.
    pub max_lifetime: Option<std::time::Duration>,
}

struct Job {
    heartbeats: Vec<Heartbeat>,
    reply: oneshot::Sender<Result<Vec<Ack>, SubmitError>>,
    /// Queued, taken into a transaction, or given up by the request's
    /// deadline (see [`RequestWrites`]); `None` outside a request.
    state: Option<Arc<AtomicU8>>,
    /// Released when the job is answered, freeing queue capacity.
    _permit: OwnedSemaphorePermit,
}

/// The front door of the writers.
pub struct Ingestor {
    sender: mpsc::UnboundedSender<Job>,
    queue: Arc<Queue>,
    refusals: Arc<Refusals>,
    refused: Arc<Refused>,
    pool: Pool,
    group_commit: bool,
    stop: CancellationToken,
}

/// Whether heartbeats are taken, and since when they have been refused
/// for want of the database if they are not, or were refused before
/// reaching the writers. `available` is read without the lock on every
/// request; it changes only under the lock, with the stretch, so that no
/// stretch ends between a writer losing the database and its refusing.
///
/// A stretch is ended, and recorded, only by a probe that finds the
/// database: a writer's while writers refuse, else the watcher's (one at
/// a time) that the first refusal before the writers started.
struct Refusals {
    available: AtomicBool,
    state: std::sync::Mutex<Stretch>,
    /// Stretches ended and not yet recorded (or given up on).
    recording: AtomicUsize,
}

#[derive(Default)]
struct Stretch {
    since: Option<Instant>,
    watched: bool,
}

impl Stretch {
    /// The earliest report of refusing wins.
    fn refused_from(&mut self, at: Instant) {
        self.since = Some(self.since.map_or(at, |since| since.min(at)));
    }
}

/// A stretch of refusals that ended and is being recorded: it counts in
/// [`Refusals::unrecorded`] until dropped.
struct Ended {
    since: Instant,
    refusals: Arc<Refusals>,
}

impl Drop for Ended {
    fn drop(&mut self) {
        self.refusals.recording.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Refusals {
    fn new() -> Self {
        Self { available: AtomicBool::new(true), state: Default::default(), recording: AtomicUsize::new(0) }
    }

    /// Whether heartbeats were refused for want of the database in a
    /// stretch that is not recorded yet: still going on, or ended and
    /// being written. Liveness judged meanwhile would count the stretch
    /// as the agents' silence.
    fn unrecorded(&self) -> bool {
        let stretch = self.stretch();
        !self.available() || stretch.since.is_some() || self.recording.load(Ordering::Acquire) > 0
    }

    /// Ends the stretch (under its lock, so that it never reads as
    /// recorded in between), handing it to the caller to record.
    fn end(self: &Arc<Self>, stretch: &mut Stretch) -> Option<Ended> {
        let since = stretch.since.take()?;
        self.recording.fetch_add(1, Ordering::AcqRel);
        Some(Ended { since, refusals: self.clone() })
    }

    fn available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }

    fn stretch(&self) -> std::sync::MutexGuard<'_, Stretch> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A writer lost the database at `at`: everything is refused until a
    /// writer's probe finds it. True when it was available until now.
    fn writer_lost(&self, at: Instant) -> bool {
        let mut stretch = self.stretch();
        stretch.refused_from(at);
        self.available.swap(false, Ordering::Relaxed)
    }

    /// A writer's probe found the database: when refusing began, unless
    /// another writer's probe got there first.
    fn writer_found(self: &Arc<Self>) -> Option<Ended> {
        let mut stretch = self.stretch();
        if self.available.swap(true, Ordering::Relaxed) {
            return None;
        }
        self.end(&mut stretch)
    }

    /// A heartbeat was refused at `at` before reaching the writers. True
    /// when the caller is to start the watcher: nobody watches yet, and the
    /// writers, taking heartbeats, probe for nothing.
    fn refused_before_writers(&self, at: Instant) -> bool {
        let mut stretch = self.stretch();
        stretch.refused_from(at);
        if stretch.watched || !self.available() {
            return false;
        }
        stretch.watched = true;
        true
    }

    /// Whether the watcher is still needed; when not, it is gone.
    fn keep_watching(&self) -> bool {
        let mut stretch = self.stretch();
        stretch.watched = stretch.since.is_some() && self.available();
        stretch.watched
    }

    /// The watcher's probe found the database: when refusing began. The
    /// watcher stops either way; if a writer lost the database meanwhile,
    /// the stretch is that writer's to end.
    fn watcher_found(self: &Arc<Self>) -> Option<Ended> {
        let mut stretch = self.stretch();
        stretch.watched = false;
        if !self.available() {
            return None;
        }
        self.end(&mut stretch)
    }
}

/// What the writers share: the jobs, and how many heartbeats they hold.
struct Queue {
    jobs: Mutex<mpsc::UnboundedReceiver<Job>>,
    /// One permit per queued heartbeat, taken on submit.
    permits: Arc<Semaphore>,
    capacity: usize,
    /// Wakes the extra writers when the queue has grown deep.
    deep: Notify,
}

impl Queue {
    /// Heartbeats accepted and not yet answered.
    fn queued(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }
}

impl Ingestor {
    /// Starts the writer tasks on `tasks`; they drain the queue and stop
    /// when `stop` is cancelled.
    pub fn start(pool: Pool, settings: &WriterSettings, stop: CancellationToken, tasks: &TaskTracker) -> Arc<Self> {
        let refusals = Arc::new(Refusals::new());
        let refused = Arc::new(Refused::default());
        let (sender, jobs) = mpsc::unbounded_channel();
        let queue = Arc::new(Queue {
            jobs: Mutex::new(jobs),
            permits: Arc::new(Semaphore::new(settings.queue_capacity)),
            capacity: settings.queue_capacity,
            deep: Notify::new(),
        });
        let writer = {
            let (pool, queue, refusals, stop) = (pool.clone(), queue.clone(), refusals.clone(), stop.clone());
            let (max_flush, max_lifetime) = (settings.max_flush.max(1), settings.max_lifetime);
            move || Writer {
                pool: pool.clone(),
                client: None,
                queue: queue.clone(),
                max_flush,
                max_lifetime,
                refusals: refusals.clone(),
                stop: stop.clone(),
            }
        };
        // A writer that panicked dropped the requests of its flush: they
        // are answered 503 saying their heartbeats may be stored (the
        // panic may have come after the commit). The one started in its
        // place takes the queue on.
        let first = writer.clone();
        crate::supervise::spawn(tasks, "ingest_writer", &stop, move || first().run());
        for _ in 1..settings.writers.max(1) {
            let helper = writer.clone();
            crate::supervise::spawn(tasks, "ingest_helper", &stop, move || helper().help());
        }
        let (recorder, recorder_pool, recorder_stop) = (refused.clone(), pool.clone(), stop.clone());
        crate::supervise::spawn(tasks, "ingest_refusals", &stop, move || {
            recorder.clone().record(recorder_pool.clone(), recorder_stop.clone())
        });
        Arc::new(Self { sender, queue, refusals, refused, pool, group_commit: settings.group_commit, stop })
    }

    /// A heartbeat was refused at `at`, before it reached the writers,
    /// because the database could not be reached (its key could not be
    /// checked, or in the naive mode). Nothing reaches the writers to fail,
    /// so they may never notice; a watcher probes for the database's return
    /// instead and records how long heartbeats were refused, as the writers
    /// do for their own refusals.
    pub fn refused_unreachable(&self, at: Instant) {
        if !self.refusals.refused_before_writers(at) {
            return;
        }
        let (pool, refusals, stop) = (self.pool.clone(), self.refusals.clone(), self.stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                    _ = stop.cancelled() => return,
                }
                if !refusals.keep_watching() {
                    return;
                }
                if probe(&pool).await {
                    if let Some(ended) = refusals.watcher_found() {
                        record_outage(pool, ended).await;
                    }
                    return;
                }
            }
        });
    }

    /// Lets the evaluator wait for refusals to be recorded.
    pub fn outage_watch(&self) -> OutageWatch {
        OutageWatch(self.refusals.clone())
    }

    /// Writes `heartbeats` (in order, atomically) and returns one ack each,
    /// after the transaction that holds them has committed.
    pub async fn submit(&self, heartbeats: Vec<Heartbeat>) -> Result<Vec<Ack>, SubmitError> {
        if !self.refusals.available() {
            // Refused for want of the database: as much a sign of life as
            // a refusal at capacity. The stretch refused is excused as a
            // whole, but an agent whose one beat fell in a blip of a second
            // would otherwise next be heard an interval later, and read as
            // late for the database's outage.
            self.refused.note(heartbeats.iter().map(|h| h.agent_id.as_str()), Instant::now());
            return Err(SubmitError::Unavailable);
        }
        if !self.group_commit {
            return self.submit_naive(&heartbeats).await;
        }
        let n = heartbeats.len().min(self.queue.capacity) as u32;
        let Ok(permit) = self.queue.permits.clone().try_acquire_many_owned(n) else {
            self.refused.note(heartbeats.iter().map(|h| h.agent_id.as_str()), Instant::now());
            return Err(SubmitError::QueueFull);
        };
        let (reply, answer) = oneshot::channel();
        let state = REQUEST_WRITES.try_with(RequestWrites::track).ok();
        let taken = state.clone();
        // A request given up before its answer (its deadline passed, its
        // client left) came from an agent alive when it sent it: a sign of
        // life, as a refusal at capacity is, or a database that stalls
        // would read as every agent falling silent at once.
        let unanswered = Unanswered {
            refused: &self.refused,
            agents: heartbeats.iter().map(|h| h.agent_id.as_str().to_owned()).collect(),
            at: Instant::now(),
        };
        self.sender.send(Job { heartbeats, reply, state, _permit: permit }).map_err(|_| SubmitError::ShuttingDown)?;
        if self.queue.queued() >= HELPER_MIN_QUEUED {
            self.queue.deep.notify_one();
        }
        let answered = answer.await;
        // Refused because the database could not do it now (it went away,
        // a lock held past the statement timeout, a full disk): as much a
        // sign of life. Otherwise answered, stored or refused for what it
        // said.
        let database_refused = match &answered {
            Ok(Err(SubmitError::Db(e))) => e.is_transient(),
            Ok(Err(SubmitError::Unavailable)) => true,
            _ => false,
        };
        if !database_refused {
            unanswered.disarm();
        }
        // No answer at all: the writers stopped, or the one writing it
        // panicked, maybe after its commit.
        answered.map_err(|_| match taken {
            Some(state) if state.load(Ordering::Acquire) == WRITING => SubmitError::Interrupted,
            _ => SubmitError::ShuttingDown,
        })?
    }

    /// One transaction per request, straight from it, without coalescing
    /// requests: one per heartbeat as agents send them one at a time. A
    /// batch stays all or nothing (a transaction per heartbeat of it would
    /// keep the first ones of a batch answered 503).
    async fn submit_naive(&self, heartbeats: &[Heartbeat]) -> Result<Vec<Ack>, SubmitError> {
        let _ = REQUEST_WRITES.try_with(|w| w.track().store(WRITING, Ordering::SeqCst));
        let started = Instant::now();
        let result = async { write(&db::client(&self.pool).await?, heartbeats).await }.await;
        result.map_err(|e| {
            if e.is_unavailable() {
                self.refused_unreachable(started);
            }
            if e.is_unavailable() || e.is_transient() {
                self.refused.note(heartbeats.iter().map(|h| h.agent_id.as_str()), Instant::now());
            }
            classify(e)
        })
    }

    /// Heartbeats accepted and not yet answered (queued or being written).
    pub fn queued(&self) -> usize {
        self.queue.queued()
    }
}

fn classify(e: DbError) -> SubmitError {
    if e.is_unavailable() { SubmitError::Unavailable } else { SubmitError::Db(e) }
}

struct Writer {
    pool: Pool,
    client: Option<db::Client>,
    queue: Arc<Queue>,
    max_flush: usize,
    max_lifetime: Option<std::time::Duration>,
    refusals: Arc<Refusals>,
    stop: CancellationToken,
}

impl Writer {
    /// The writer that is always there: it takes whatever is queued, and
    /// it alone probes the database while it is unavailable.
    async fn run(mut self) {
        loop {
            if !self.refusals.available() {
                self.wait_for_database().await;
                if self.stop.is_cancelled() {
                    break;
                }
            }
            let jobs = {
                let mut rx = tokio::select! {
                    biased;
                    rx = self.queue.jobs.lock() => rx,
                    _ = self.stop.cancelled() => break,
                };
                let first = tokio::select! {
                    biased;
                    job = rx.recv() => match job {
                        Some(job) => job,
                        None => return,
                    },
                    _ = self.stop.cancelled() => break,
                };
                self.gather(&mut rx, first)
            };
            self.flush(jobs).await;
        }
        // Shutting down: the HTTP server has drained, so anything left was
        // submitted just before; write it rather than drop it. Closing
        // first makes later submissions fail at once (ShuttingDown)
        // instead of waiting for a writer that is gone.
        self.queue.jobs.lock().await.close();
        while let Some(jobs) = self.take().await {
            self.flush(jobs).await;
        }
    }

    /// An extra writer: it takes a share only while the queue is deep, and
    /// never waits on an empty queue (that would keep the first writer
    /// from it).
    async fn help(mut self) {
        // Started again after a panic that left ingest refusing: probe,
        // as the helper it replaces would have.
        if !self.refusals.available() {
            self.wait_for_database().await;
        }
        loop {
            tokio::select! {
                _ = self.queue.deep.notified() => {}
                _ = self.stop.cancelled() => return,
            }
            while self.refusals.available() && self.queue.queued() >= HELPER_MIN_QUEUED {
                let Some(jobs) = self.take().await else { break };
                self.flush(jobs).await;
                // The first writer may be idle on an empty queue, which
                // stays empty while requests are refused: whoever finds
                // the database gone looks for its return.
                if !self.refusals.available() {
                    self.wait_for_database().await;
                }
            }
        }
    }

    /// What is queued right now, if anything.
    async fn take(&self) -> Option<Vec<Job>> {
        let mut rx = self.queue.jobs.lock().await;
        let first = rx.try_recv().ok()?;
        Some(self.gather(&mut rx, first))
    }

    /// Everything queued right now, up to `max_flush` heartbeats.
    fn gather(&self, rx: &mut mpsc::UnboundedReceiver<Job>, first: Job) -> Vec<Job> {
        let mut count = first.heartbeats.len();
        let mut jobs = vec![first];
        while count < self.max_flush {
            match rx.try_recv() {
                Ok(job) => {
                    count += job.heartbeats.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        jobs
    }

    /// The writer's own connection, kept from one flush to the next: a
    /// backend that runs the same statement all the time keeps its caches
    /// warm, where taking whichever pooled connection is free spread the
    /// writes over every backend (measured: 15 backends at 5 % CPU each).
    async fn connection(&mut self) -> Result<&db::Client, DbError> {
        if self.client.as_ref().is_some_and(|c| c.is_closed() || db::outlived(c, self.max_lifetime))
            && let Some(old) = self.client.take()
        {
            db::discard(old);
        }
        if self.client.is_none() {
            self.client = Some(db::client(&self.pool).await?);
        }
        Ok(self.client.as_ref().expect("just set"))
    }

    /// Writes `heartbeats` on the writer's connection, dropping the
    /// connection if the database went away under it.
    async fn write(&mut self, heartbeats: &[&Heartbeat]) -> Result<Vec<Ack>, DbError> {
        let result = match self.connection().await {
            Ok(client) => write_with_retry(client, heartbeats).await,
            Err(e) => Err(e),
        };
        if result.as_ref().is_err_and(|e| e.is_unavailable())
            && let Some(broken) = self.client.take()
        {
            db::discard(broken);
        }
        result
    }

    async fn flush(&mut self, jobs: Vec<Job>) {
        let started = Instant::now();
        // Connected first, so that a wait for a connection is not taken
        // for a write under way (see RequestWrites).
        if let Err(e) = self.connection().await {
            self.client = None;
            self.failed(jobs, e, started).await;
            return;
        }
        // A request already answered (its deadline passed, its client
        // left) was told nothing was stored: storing it now would make a
        // retry count twice.
        let jobs: Vec<Job> = jobs.into_iter().filter(Job::take).collect();
        if jobs.is_empty() {
            return;
        }
        let all: Vec<&Heartbeat> = jobs.iter().flat_map(|j| j.heartbeats.iter()).collect();
        match self.write(&all).await {
            Ok(acks) => {
                let metrics = &crate::metrics::METRICS;
                metrics.flush_size.observe(acks.len() as f64);
                metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
                answer_all(jobs, acks)
            }
            Err(e) => self.failed(jobs, e, started).await,
        }
    }

    /// Answers the jobs of a flush that failed, begun at `started`.
    async fn failed(&mut self, jobs: Vec<Job>, e: DbError, started: Instant) {
        match e {
            e if e.is_unavailable() => {
                // Refusing began when the failed flush did, not when it
                // gave up (a connect timeout can take seconds).
                if self.refusals.writer_lost(started) {
                    tracing::warn!(error = %e, "database unavailable; refusing heartbeats until it is back");
                }
                for job in jobs {
                    let _ = job.reply.send(Err(SubmitError::Unavailable));
                }
            }
            e if e.is_transient() => {
                // A lock held, a statement timed out, a full disk: each
                // request alone would meet the same, one after another.
                static LOG: crate::telemetry::Throttle =
                    crate::telemetry::Throttle::new(std::time::Duration::from_secs(10));
                if let Some(more) = LOG.allow() {
                    tracing::warn!(error = %e, requests = jobs.len(), more, "group flush could not be done now; answering 503");
                }
                for job in jobs {
                    let _ = job.reply.send(Err(SubmitError::Db(e.again())));
                }
            }
            e if jobs.len() == 1 => {
                let _ = jobs.into_iter().next().map(|j| j.reply.send(Err(SubmitError::Db(e))));
            }
            e => {
                tracing::warn!(error = %e, requests = jobs.len(), "group flush failed; retrying request by request");
                for job in jobs {
                    self.flush_one(job).await;
                }
            }
        }
    }

    async fn flush_one(&mut self, job: Job) {
        if job.reply.is_closed() {
            return;
        }
        let refs: Vec<&Heartbeat> = job.heartbeats.iter().collect();
        let result = self.write(&refs).await;
        let _ = job.reply.send(result.map_err(classify));
    }

    /// Refuses queued work while probing the database until it answers.
    async fn wait_for_database(&mut self) {
        loop {
            if let Ok(mut rx) = self.queue.jobs.try_lock() {
                while let Ok(job) = rx.try_recv() {
                    let _ = job.reply.send(Err(SubmitError::Unavailable));
                }
            }
            if probe(&self.pool).await {
                if let Some(ended) = self.refusals.writer_found() {
                    tracing::info!("database reachable again; accepting heartbeats");
                    tokio::spawn(record_outage(self.pool.clone(), ended));
                }
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                _ = self.stop.cancelled() => return,
            }
            if self.refusals.available() {
                return; // another writer's probe succeeded
            }
        }
    }
}

async fn probe(pool: &Pool) -> bool {
    match db::client(pool).await {
        Ok(client) => client.simple_query("SELECT 1").await.is_ok(),
        Err(_) => false,
    }
}

/// Records how long heartbeats were refused (see
/// `evaluator::record_ingest_outage`), off the writer's path: it is back
/// to work meanwhile. The evaluator waits for it ([`OutageWatch`]), and
/// it is tried again for a while: without it, agents with intervals
/// shorter than the outage would be marked late for it.
async fn record_outage(pool: Pool, ended: Ended) {
    use crate::health::evaluator::{OutageEnd, record_ingest_outage};
    let found = Instant::now();
    let refused_for = found.saturating_duration_since(ended.since);
    for attempt in 1..=RECORD_ATTEMPTS {
        // Timed from when the database was found, however late it is written.
        let result = match db::client(&pool).await {
            Ok(client) => record_ingest_outage(&client, refused_for, OutageEnd::Ago(found.elapsed())).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => return,
            Err(e) if attempt < RECORD_ATTEMPTS => {
                tracing::debug!(error = %e, attempt, "could not record how long heartbeats were refused; trying again");
                tokio::time::sleep(RECORD_RETRY).await;
            }
            Err(e) => tracing::warn!(
                error = %e,
                refused_ms = refused_for.as_millis() as u64,
                "could not record how long heartbeats were refused; agents silent through it may be marked late"
            ),
        }
    }
}

/// What the evaluator reads of ingest: whether a stretch of refusals for
/// want of the database is still to be recorded.
#[derive(Clone)]
pub struct OutageWatch(Arc<Refusals>);

impl OutageWatch {
    /// True from the first refusal until the stretch is recorded or given
    /// up on.
    pub fn unrecorded(&self) -> bool {
        self.0.unrecorded()
    }
}

impl std::fmt::Debug for OutageWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutageWatch").field("unrecorded", &self.unrecorded()).finish()
    }
}

/// A job's [`Job::state`]: waiting in the queue; taken into a write; given
/// up by its request's deadline before any writer took it.
const QUEUED: u8 = 0;
const WRITING: u8 = 1;
const ABANDONED: u8 = 2;

impl Job {
    /// Whether a writer may write this job, claiming it if so: not when
    /// its request's deadline gave it up first, nor when its client is
    /// gone (nobody would hear the answer, and a retry would count twice).
    fn take(&self) -> bool {
        let taken = self
            .state
            .as_ref()
            .is_none_or(|s| s.compare_exchange(QUEUED, WRITING, Ordering::AcqRel, Ordering::Acquire).is_ok());
        taken && !self.reply.is_closed()
    }
}

/// Notes a request's agents as refused when it is dropped unanswered, or
/// answered with a refusal the database's state caused.
struct Unanswered<'a> {
    refused: &'a Refused,
    agents: Vec<String>,
    at: Instant,
}

impl Unanswered<'_> {
    fn disarm(mut self) {
        self.agents.clear();
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.agents.is_empty() {
            self.refused.note(self.agents.iter().map(String::as_str), self.at);
        }
    }
}

tokio::task_local! {
    static REQUEST_WRITES: RequestWrites;
}

/// The heartbeat jobs of the request being served. When the request
/// outlives `server.request_timeout`, its answer depends on them: a job
/// no writer took yet is given up (the writer will skip it: nothing is
/// stored, ever), while one already in a transaction may still commit
/// after the 503, and the answer must not say "nothing was recorded" then.
/// Writer and deadline decide each job with one compare-and-swap on its
/// state, so exactly one of them wins.
#[derive(Clone, Default)]
pub struct RequestWrites(Arc<std::sync::Mutex<Vec<Arc<AtomicU8>>>>);

impl RequestWrites {
    /// Runs `work` (a request's handling) with its jobs tracked here.
    pub async fn observe<F: std::future::Future>(&self, work: F) -> F::Output {
        REQUEST_WRITES.scope(self.clone(), work).await
    }

    fn track(&self) -> Arc<AtomicU8> {
        let state = Arc::new(AtomicU8::new(QUEUED));
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(state.clone());
        state
    }

    /// The tracker of the request being served, if any.
    pub fn current() -> Option<Self> {
        REQUEST_WRITES.try_with(Self::clone).ok()
    }

    /// How many jobs the request has submitted so far: a mark for
    /// [`Self::abandon_since`].
    pub fn submitted(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Gives up every job no writer took; true when some was taken (its
    /// heartbeats may be stored).
    pub fn abandon(&self) -> bool {
        self.abandon_since(0)
    }

    /// [`Self::abandon`] for the jobs submitted after `mark`
    /// ([`Self::submitted`]): one part of a request that timed out while
    /// the parts before it were answered.
    pub fn abandon_since(&self, mark: usize) -> bool {
        let jobs = self.0.lock().unwrap_or_else(|e| e.into_inner());
        jobs.iter().skip(mark).fold(false, |taken, state| {
            let lost = state.compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire);
            taken | matches!(lost, Err(WRITING))
        })
    }
}

fn answer_all(jobs: Vec<Job>, acks: Vec<Ack>) {
    let mut acks = acks.into_iter();
    for job in jobs {
        let mine: Vec<Ack> = acks.by_ref().take(job.heartbeats.len()).collect();
        let _ = job.reply.send(Ok(mine));
    }
}

async fn write_with_retry(client: &db::Client, heartbeats: &[&Heartbeat]) -> Result<Vec<Ack>, DbError> {
    let mut attempt = 0;
    loop {
        match write_refs(client, heartbeats).await {
            Err(DbError::Query(e))
                if attempt < TRANSIENT_RETRIES
                    && matches!(
                        e.code(),
                        Some(&SqlState::T_R_DEADLOCK_DETECTED | &SqlState::T_R_SERIALIZATION_FAILURE)
                    ) =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

async fn write(client: &db::Client, heartbeats: &[Heartbeat]) -> Result<Vec<Ack>, DbError> {
    let refs: Vec<&Heartbeat> = heartbeats.iter().collect();
    write_refs(client, &refs).await
}

/// One call of `warden.ingest_heartbeats` with the heartbeats as arrays.
///
/// The arrays go in sorted by agent_id (stable, so each agent's heartbeats
/// keep their order), with each heartbeat's number among its agent's: the
/// function then neither numbers them nor really sorts them.
async fn write_refs(client: &db::Client, heartbeats: &[&Heartbeat]) -> Result<Vec<Ack>, DbError> {
    let n = heartbeats.len();
    // order[k]: the position in `heartbeats` of the k-th array element.
    let mut order: Vec<usize> = (0..n).collect();
    // str order is byte order, the order of agent_id COLLATE "C".
    order.sort_by(|&a, &b| heartbeats[a].agent_id.as_str().cmp(heartbeats[b].agent_id.as_str()));
    let mut agent_id = Vec::with_capacity(n);
    let mut occurrence = Vec::with_capacity(n);
    let mut name = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    let mut mode = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut uptime = Vec::with_capacity(n);
    let mut next_ms = Vec::with_capacity(n);
    let mut sent_at = Vec::with_capacity(n);
    let mut m_idx = Vec::new();
    let mut m_name = Vec::new();
    let mut m_value = Vec::new();
    let mut m_unit = Vec::new();
    for (k, &i) in order.iter().enumerate() {
        let h = heartbeats[i];
        let nth: i32 = match (agent_id.last(), occurrence.last()) {
            (Some(&previous), Some(&nth)) if previous == h.agent_id.as_str() => nth + 1,
            _ => 1,
        };
        occurrence.push(nth);
        agent_id.push(h.agent_id.as_str());
        name.push(h.name.as_deref());
        labels.push(h.labels.as_ref().map(Json));
        mode.push(h.mode.map(|m| m.as_str()));
        status.push(h.status.as_str());
        uptime.push(h.uptime_seconds);
        next_ms.push(h.next_heartbeat_ms);
        sent_at.push(h.sent_at);
        for m in &h.metrics {
            m_idx.push(k as i32 + 1);
            m_name.push(m.name.as_str());
            m_value.push(m.value);
            m_unit.push(m.unit.as_deref());
        }
    }
    let statement = client.prepare_cached(INGEST_SQL).await?;
    let rows = client
        .query(
            &statement,
            &[
                &agent_id,
                &name,
                &labels,
                &mode,
                &status,
                &uptime,
                &next_ms,
                &sent_at,
                &m_idx,
                &m_name,
                &m_value,
                &m_unit,
                &occurrence,
            ],
        )
        .await?;
    let mut acks: Vec<Option<Ack>> = vec![None; n];
    for row in rows {
        let idx: i32 = row.get(0);
        let position = usize::try_from(idx).ok().and_then(|k| k.checked_sub(1)).and_then(|k| order.get(k));
        if let Some(slot) = position.and_then(|&i| acks.get_mut(i)) {
            *slot = Some(Ack { is_new: row.get(1), restart_detected: row.get(2), next_heartbeat_ms: row.get(3) });
        }
    }
    // A heartbeat without its answer row is never acknowledged.
    acks.into_iter()
        .collect::<Option<Vec<Ack>>>()
        .ok_or_else(|| DbError::Inconsistent(format!("ingest_heartbeats did not answer for all {n} heartbeats")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stretch_of_refusals_begins_at_the_earliest_report_and_ends_once() {
        let refusals = Arc::new(Refusals::new());
        let since = |ended: Option<Ended>| ended.map(|e| e.since);
        let t0 = Instant::now();
        let (earlier, later) = (t0, t0 + Duration::from_millis(5));
        assert_eq!(since(refusals.writer_found()), None, "nothing refused");
        assert!(!refusals.unrecorded());

        assert!(refusals.refused_before_writers(later), "the first refusal starts the watcher");
        assert!(!refusals.refused_before_writers(later), "one watcher at a time");
        assert!(refusals.keep_watching());
        assert!(refusals.writer_lost(earlier), "a flush that began earlier and failed");
        assert!(!refusals.available());
        assert!(!refusals.refused_before_writers(later), "the writers probe now");
        assert_eq!(since(refusals.watcher_found()), None, "the writers' stretch to end, not the watcher's");
        assert!(!refusals.keep_watching());
        let ended = refusals.writer_found();
        assert_eq!(ended.as_ref().map(|e| e.since), Some(earlier), "the earliest report wins");
        assert!(refusals.available());
        assert!(refusals.unrecorded(), "ended, not yet recorded");
        drop(ended);
        assert!(!refusals.unrecorded(), "recorded");
        assert_eq!(since(refusals.writer_found()), None, "ended once");

        assert!(refusals.refused_before_writers(later), "a new stretch, a new watcher");
        assert!(refusals.unrecorded(), "refused before the writers");
        assert!(refusals.keep_watching());
        assert_eq!(since(refusals.watcher_found()), Some(later));
        assert!(!refusals.unrecorded());
        assert!(!refusals.keep_watching(), "nothing left to watch");
        assert!(refusals.refused_before_writers(later), "the watcher is gone, so the next refusal starts one");
    }
}
