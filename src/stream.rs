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
/// Events buffered per subscriber before a slow one starts missing some.
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
        let value: serde_json::Value = serde_json::from_str(payload).ok()?;
        let kind = if channel == HEARTBEATS {
            "heartbeat".to_string()
        } else {
            let kind = value.get("type")?.as_str()?;
            KINDS.contains(&kind).then(|| kind.to_string())?
        };
        let agent_id = value.get("agent_id").and_then(|a| a.as_str()).map(str::to_string);
        Some(Self { kind, agent_id, data: payload.to_string() })
    }
}

/// Fans notifications out to subscribers.
pub struct Hub {
    tx: broadcast::Sender<Arc<StreamEvent>>,
    /// Cancelled when warden begins to shut down: streams never end on
    /// their own, and the server's drain waits for every response to end.
    closing: CancellationToken,
}

impl Default for Hub {
    fn default() -> Self {
        Self { tx: broadcast::channel(CAPACITY).0, closing: CancellationToken::new() }
    }
}

impl Hub {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StreamEvent>> {
        self.tx.subscribe()
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

    pub fn publish(&self, event: StreamEvent) {
        // No subscribers is fine: nobody is watching.
        let _ = self.tx.send(Arc::new(event));
    }
}

/// Event name telling clients that events may have been missed (they
/// refetch): a subscriber fell behind, or the listener lost its connection
/// and notifications sent meanwhile never reached this replica.
pub const LAGGED: &str = "lagged";

/// Listens until `stop`, reconnecting with backoff when the connection drops.
pub async fn listen(
    config: tokio_postgres::Config,
    tls: crate::db::tls::Connector,
    hub: Arc<Hub>,
    stop: CancellationToken,
) {
    let fresh_waits = || crate::every::retry_waits(Duration::from_millis(250), Duration::from_secs(5));
    let mut waits = fresh_waits();
    let mut listened_before = false;
    loop {
        let mut listening = false;
        let result = listen_once(&config, &tls, &hub, &stop, || {
            listening = true;
            if listened_before {
                hub.publish(StreamEvent {
                    kind: LAGGED.into(),
                    agent_id: None,
                    data: r#"{"missed":null,"reason":"reconnected"}"#.into(),
                });
            }
        })
        .await;
        if stop.is_cancelled() {
            return;
        }
        if listening {
            // A drop after a working connection starts the backoff afresh.
            listened_before = true;
            waits = fresh_waits();
        }
        match result {
            Ok(()) => tracing::warn!("stream listener's connection ended; reconnecting"),
            Err(e) => tracing::warn!(error = %e, "stream listener lost its connection; reconnecting"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(waits.next().unwrap_or_default()) => {}
        }
    }
}

/// One connection's life; `on_listening` runs once its LISTEN took effect.
async fn listen_once(
    config: &tokio_postgres::Config,
    tls: &crate::db::tls::Connector,
    hub: &Hub,
    stop: &CancellationToken,
    on_listening: impl FnOnce(),
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(tls.clone()).await?;
    // The connection must be polled for the LISTEN below to complete and for
    // notifications to arrive; messages flow through this stream.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let pump = tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(m) => {
                    if tx.send(Ok(m)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    });
    client.batch_execute(&format!("LISTEN {EVENTS}; LISTEN {HEARTBEATS}")).await?;
    tracing::debug!("stream listener connected");
    on_listening();
    let result = loop {
        tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            message = rx.recv() => match message {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if let Some(event) = StreamEvent::from_notification(n.channel(), n.payload()) {
                        hub.publish(event);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break Err(e),
                // The connection closed without an error.
                None => break Ok(()),
            },
        }
    };
    pump.abort();
    result
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
        let h = StreamEvent::from_notification(HEARTBEATS, r#"{"agent_id":"b","uptime_seconds":3}"#).unwrap();
        assert_eq!(h.kind, "heartbeat");
        assert_eq!(StreamEvent::from_notification(EVENTS, "not json"), None);
        assert_eq!(StreamEvent::from_notification(EVENTS, r#"{"no_type":1}"#), None);
        for forged in [r#"{"type":"a\nb"}"#, r#"{"type":"alert_sent"}"#, r#"{"type":7}"#] {
            assert_eq!(StreamEvent::from_notification(EVENTS, forged), None, "{forged}");
        }
    }
}
