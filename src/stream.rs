//! Live events for GET /v1/stream, from PostgreSQL LISTEN/NOTIFY.
//!
//! The evaluator (on whichever replica leads) and the ingest function
//! `pg_notify` in the same transaction as the change they announce, so a
//! notification is never sent for something that did not commit. Every
//! replica keeps one dedicated connection listening on the channels and fans
//! the notifications out to its SSE clients through a broadcast channel;
//! whichever replica a client is connected to, it sees every change.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

/// Channel of evaluator events (status changes, incidents).
pub const EVENTS: &str = "warden_events";
/// Channel of raw heartbeats of agents someone is observing.
pub const HEARTBEATS: &str = "warden_heartbeats";
/// Event names of the `warden_events` channel (the evaluator's); nothing
/// else is passed on.
pub const STATUS_CHANGED: &str = "status_changed";
pub const INCIDENT_OPENED: &str = "incident_opened";
pub const INCIDENT_RESOLVED: &str = "incident_resolved";
const KINDS: [&str; 3] = [STATUS_CHANGED, INCIDENT_OPENED, INCIDENT_RESOLVED];
/// Events buffered per subscriber before a slow one starts missing some,
/// and kept for clients that reconnect (`Last-Event-ID`).
const CAPACITY: usize = 4096;

/// One notification, as SSE clients receive it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    /// SSE event name: status_changed, incident_opened, heartbeat, ...
    pub kind: String,
    /// The agent it concerns, for `?agent=` filtering.
    pub agent_id: Option<String>,
    /// The JSON payload.
    pub data: String,
    /// Its place in this replica's sequence, set when published.
    pub seq: u64,
}

impl StreamEvent {
    /// Reads a notification payload: a JSON object with a `type` (heartbeats
    /// have none) and usually an `agent_id`.
    ///
    /// Any database role may `pg_notify` on these channels; only the event
    /// names warden sends are passed on, so a payload cannot name an event
    /// the clients never expect, nor one SSE cannot carry (a newline in an
    /// event name would end the stream's task).
    pub fn from_notification(channel: &str, payload: &str) -> Option<Self> {
        let mut value: serde_json::Value = serde_json::from_str(payload).ok()?;
        let agent_id = value.get("agent_id").and_then(|a| a.as_str()).map(str::to_string);
        if channel == HEARTBEATS {
            // Ingest's SQL writes the row's columns; clients read every
            // event by its `type` and `timestamp`, as the evaluator's carry.
            let object = value.as_object_mut()?;
            object.insert("type".into(), "heartbeat".into());
            if let Some(at) = object.get("received_at").cloned() {
                object.entry("timestamp").or_insert(at);
            }
            return Some(Self { kind: "heartbeat".into(), agent_id, data: value.to_string(), seq: 0 });
        }
        let kind = value.get("type")?.as_str()?;
        let kind = KINDS.contains(&kind).then(|| kind.to_string())?;
        Some(Self { kind, agent_id, data: payload.to_string(), seq: 0 })
    }
}

/// Fans notifications out to subscribers.
///
/// Every event gets an SSE id, `<hub>-<seq>`: the hub's own name (unique
/// to this process) and the event's number. The last [`CAPACITY`] events
/// are kept, so a client that reconnects to the same process with the id
/// of the last event it saw (`Last-Event-ID`, which browsers send by
/// themselves) gets what it missed; from anywhere else it is told to
/// refetch.
pub struct Hub {
    tx: broadcast::Sender<Arc<StreamEvent>>,
    /// The recent events, oldest first, and the sequence: publishing and
    /// subscribing hold it, so a subscriber's replay and its live events
    /// neither overlap nor leave a gap.
    recent: std::sync::Mutex<Recent>,
    name: String,
    /// Cancelled when warden begins to shut down: streams never end on
    /// their own, and the server's drain waits for every response to end.
    closing: CancellationToken,
}

#[derive(Default)]
struct Recent {
    events: std::collections::VecDeque<Arc<StreamEvent>>,
    /// The last sequence number given (0: none yet).
    last: u64,
}

impl Default for Hub {
    fn default() -> Self {
        // Unique across restarts and replicas (start time and pid) and
        // within the process.
        static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let made = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let name = format!("{:x}.{:x}.{made:x}", started.as_micros(), std::process::id());
        Self { tx: broadcast::channel(CAPACITY).0, recent: Default::default(), name, closing: CancellationToken::new() }
    }
}

/// Where a new subscriber starts.
#[derive(Debug)]
pub enum Resume {
    /// No `Last-Event-ID`: from now on.
    Fresh,
    /// The events after the client's last one, still kept here.
    Replay(Vec<Arc<StreamEvent>>),
    /// An id this hub cannot resume from (another replica's, one from
    /// before a restart, or older than the events kept): refetch.
    Lost,
}

impl Hub {
    /// Subscribes, resuming after `last_event_id` when this hub still has
    /// every event since; also returns the id of the position subscribed
    /// at (the last event published).
    pub fn subscribe_after(
        &self,
        last_event_id: Option<&str>,
    ) -> (broadcast::Receiver<Arc<StreamEvent>>, Resume, String) {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let rx = self.tx.subscribe();
        let at = self.id(recent.last);
        let Some(id) = last_event_id else { return (rx, Resume::Fresh, at) };
        let seq =
            id.strip_prefix(self.name.as_str()).and_then(|s| s.strip_prefix('-')).and_then(|s| s.parse::<u64>().ok());
        // Resumable when no event after `seq` has been dropped yet: the
        // oldest kept is at most one past it.
        let oldest = recent.events.front().map_or(recent.last + 1, |e| e.seq);
        let resume = match seq {
            Some(seq) if seq <= recent.last && seq + 1 >= oldest => {
                Resume::Replay(recent.events.iter().filter(|e| e.seq > seq).cloned().collect())
            }
            _ => Resume::Lost,
        };
        (rx, resume, at)
    }

    /// The SSE id of event `seq`.
    pub fn id(&self, seq: u64) -> String {
        format!("{}-{seq}", self.name)
    }

    /// Ends every stream (clients reconnect, to another replica or to this
    /// one once it is back).
    pub fn close(&self) {
        self.closing.cancel();
    }

    /// Cancelled by [`Hub::close`].
    pub fn closing(&self) -> CancellationToken {
        self.closing.clone()
    }

    pub fn publish(&self, mut event: StreamEvent) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.last += 1;
        event.seq = recent.last;
        let event = Arc::new(event);
        if recent.events.len() == CAPACITY {
            recent.events.pop_front();
        }
        recent.events.push_back(event.clone());
        // No subscribers is fine: nobody is watching.
        let _ = self.tx.send(event);
    }
}

/// Event name telling clients that events may have been missed (they
/// refetch): a subscriber fell behind, or the listener lost its connection
/// and notifications sent meanwhile never reached this replica.
pub const LAGGED: &str = "lagged";

/// Channel a listener's replacement announces itself on, so that the old
/// connection can hand over without losing or repeating a notification.
const HANDOVER: &str = "warden_stream_handover";

/// How long both connections may take to hear the handover marker before
/// the handover is given up (and streams told to refetch): notifications
/// wait in memory, so even a busy stream is read through at once; a
/// connection that never hears it reaches another server (a failover).
const HANDOVER_WAIT: Duration = Duration::from_secs(10);

/// Listens until `stop`, reconnecting with backoff when the connection
/// drops, and replacing it when it has served `max_lifetime` (as pooled
/// connections are replaced: one left open to a server a failover moved
/// away from would hear nothing ever again).
///
/// A replacement is handed over without a gap: the new connection listens
/// first, then the old one notifies [`HANDOVER`] with a marker. Notifications
/// reach every listener in commit order, so the old connection passes on
/// everything up to the marker and the new one everything after it. Only
/// when that fails (either connection lost meanwhile) are streams told
/// they may have missed something.
pub async fn listen(
    config: tokio_postgres::Config,
    tls: crate::db::tls::Connector,
    hub: Arc<Hub>,
    max_lifetime: Option<Duration>,
    stop: CancellationToken,
) {
    let fresh_waits = || crate::every::retry_waits(Duration::from_millis(250), Duration::from_secs(5));
    let mut waits = fresh_waits();
    // Whatever committed while nothing listened reached no stream: after a
    // drop, and also at the first LISTEN, since streams are served as soon
    // as the database is, maybe before this.
    let lagged = || {
        hub.publish(StreamEvent {
            kind: LAGGED.into(),
            agent_id: None,
            data: r#"{"missed":null,"reason":"reconnected"}"#.into(),
            seq: 0,
        })
    };
    let mut current: Option<Listener> = None;
    loop {
        let listener = match current.take() {
            Some(listener) => listener,
            None => match Listener::connect(&config, &tls).await {
                Ok(listener) => {
                    tracing::debug!("stream listener connected");
                    lagged();
                    // A drop after a working connection starts the backoff afresh.
                    waits = fresh_waits();
                    listener
                }
                Err(e) => {
                    tracing::warn!(error = %e, "stream listener could not connect; trying again");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(waits.next().unwrap_or_default()) => {}
                    }
                    continue;
                }
            },
        };
        let retire = async {
            match max_lifetime {
                Some(after) => tokio::time::sleep(after).await,
                None => std::future::pending().await,
            }
        };
        let mut listener = listener;
        let ended = tokio::select! {
            _ = stop.cancelled() => return,
            _ = retire => None,
            ended = listener.serve(&hub) => Some(ended),
        };
        match ended {
            // Its time is up, and it still works: hand over to a new one.
            None => match tokio::select! {
                _ = stop.cancelled() => return,
                next = Listener::connect(&config, &tls) => next,
            } {
                Ok(next) => match tokio::select! {
                    _ = stop.cancelled() => return,
                    handed = listener.hand_over(next, &hub) => handed,
                } {
                    Ok(next) => {
                        tracing::debug!("stream listener's connection reached database.max_lifetime; replaced");
                        current = Some(next);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "stream listener's replacement failed; reconnecting");
                    }
                },
                // Go on with the old one a while: the replacement is tried
                // again when its lifetime comes round again.
                Err(e) => {
                    tracing::warn!(error = %e, "stream listener could not open its replacement; keeping the old one");
                    current = Some(listener);
                }
            },
            Some(ended) => {
                match ended {
                    Err(e) => tracing::warn!(error = %e, "stream listener lost its connection; reconnecting"),
                    Ok(()) => tracing::warn!("stream listener's connection ended; reconnecting"),
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(waits.next().unwrap_or_default()) => {}
                }
            }
        }
    }
}

/// One listening connection: its client (for statements) and the messages
/// its connection delivers.
struct Listener {
    client: tokio_postgres::Client,
    messages: tokio::sync::mpsc::UnboundedReceiver<Result<AsyncMessage, tokio_postgres::Error>>,
    pump: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

impl Listener {
    async fn connect(
        config: &tokio_postgres::Config,
        tls: &crate::db::tls::Connector,
    ) -> Result<Self, tokio_postgres::Error> {
        let (client, mut connection) = config.connect(tls.clone()).await?;
        // The connection must be polled for the LISTEN below to complete and
        // for notifications to arrive; messages flow through this stream.
        let (tx, messages) = tokio::sync::mpsc::unbounded_channel();
        let mut polled = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        let pump = tokio::spawn(async move {
            while let Some(message) = polled.next().await {
                let failed = message.is_err();
                if tx.send(message).is_err() || failed {
                    return;
                }
            }
        });
        let listener = Self { client, messages, pump };
        listener.client.batch_execute(&format!("LISTEN {EVENTS}; LISTEN {HEARTBEATS}; LISTEN {HANDOVER}")).await?;
        Ok(listener)
    }

    /// Publishes what it hears until the connection ends, or (with
    /// `until`) up to the handover marker `until`, which it returns at.
    /// `publish` false: drops what comes before the marker instead.
    async fn serve_until(
        &mut self,
        hub: &Hub,
        until: Option<&str>,
        publish: bool,
    ) -> Result<bool, tokio_postgres::Error> {
        loop {
            match self.messages.recv().await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if n.channel() == HANDOVER {
                        if until == Some(n.payload()) {
                            return Ok(true);
                        }
                    } else if publish && let Some(event) = StreamEvent::from_notification(n.channel(), n.payload()) {
                        hub.publish(event);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                // The connection closed without an error.
                None => return Ok(false),
            }
        }
    }

    /// Publishes what it hears until the connection ends.
    async fn serve(&mut self, hub: &Hub) -> Result<(), tokio_postgres::Error> {
        self.serve_until(hub, None, true).await.map(drop)
    }

    /// Hands over to `next`, which is already listening: this one passes on
    /// everything committed before the marker, `next` what follows.
    async fn hand_over(mut self, mut next: Listener, hub: &Hub) -> Result<Listener, String> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| e.to_string())?;
        let marker: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        // Sent once `next` listens, from this connection (a session hears
        // its own notifications), so that `next` is the one whose last
        // statement is LISTEN, as pg_stat_activity shows the listener.
        self.client.execute("SELECT pg_notify($1, $2)", &[&HANDOVER, &marker]).await.map_err(|e| e.to_string())?;
        // Both read at once, within one deadline.
        let both = async {
            tokio::join!(self.serve_until(hub, Some(&marker), true), next.serve_until(hub, Some(&marker), false))
        };
        match tokio::time::timeout(HANDOVER_WAIT, both).await {
            Ok((Ok(true), Ok(true))) => Ok(next),
            // Something between the two may be lost: the fresh connection
            // that follows tells the streams to refetch.
            _ => Err("the handover marker did not reach both connections".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_become_named_events() {
        let e = StreamEvent::from_notification(EVENTS, r#"{"type":"status_changed","agent_id":"a","old":"online"}"#)
            .unwrap();
        assert_eq!(e.kind, "status_changed");
        assert_eq!(e.agent_id.as_deref(), Some("a"));
        let h = StreamEvent::from_notification(
            HEARTBEATS,
            r#"{"agent_id" : "b", "received_at" : "2026-12-06T22:00:00.5+00:00", "uptime_seconds" : 3}"#,
        )
        .unwrap();
        assert_eq!(h.kind, "heartbeat");
        let data: serde_json::Value = serde_json::from_str(&h.data).unwrap();
        assert_eq!(data["type"], "heartbeat", "named like every other event");
        assert_eq!(data["timestamp"], data["received_at"]);
        assert_eq!(data["uptime_seconds"], 3);
        assert_eq!(StreamEvent::from_notification(EVENTS, "not json"), None);
        assert_eq!(StreamEvent::from_notification(EVENTS, r#"{"no_type":1}"#), None);
        for forged in [r#"{"type":"a\nb"}"#, r#"{"type":"alert_sent"}"#, r#"{"type":7}"#] {
            assert_eq!(StreamEvent::from_notification(EVENTS, forged), None, "{forged}");
        }
    }

    #[test]
    fn a_subscriber_resumes_only_while_every_event_since_is_kept() {
        let hub = Hub::default();
        let event = |n: u64| StreamEvent { kind: "status_changed".into(), agent_id: None, data: n.to_string(), seq: 0 };
        let (_, fresh, at) = hub.subscribe_after(None);
        assert!(matches!(fresh, Resume::Fresh));
        assert!(matches!(hub.subscribe_after(Some(&at)).1, Resume::Replay(r) if r.is_empty()), "nothing yet");
        let total = CAPACITY as u64 + 10;
        for n in 1..=total {
            hub.publish(event(n));
        }
        let replay = |after: u64| match hub.subscribe_after(Some(&hub.id(after))).1 {
            Resume::Replay(events) => Some(events.iter().map(|e| e.seq).collect::<Vec<_>>()),
            _ => None,
        };
        assert_eq!(replay(10), Some((11..=total).collect()), "the oldest kept is the next one");
        assert_eq!(replay(9), None, "event 10 is gone");
        assert_eq!(replay(total - 2), Some(vec![total - 1, total]));
        assert_eq!(replay(total), Some(vec![]));
        assert_eq!(replay(total + 1), None, "not yet given");
        assert!(matches!(hub.subscribe_after(Some(&Hub::default().id(total))).1, Resume::Lost), "another hub's");
        assert!(matches!(hub.subscribe_after(Some("12")).1, Resume::Lost));
    }
}
