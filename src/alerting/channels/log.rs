//! The log channel: writes the message to warden's own log. It always
//! exists, needs nothing, and is where alerts go when no other channel is
//! configured.

use super::{SendError, Sent};
use crate::alerting::message::Message;

#[derive(Debug)]
pub struct Log {
    name: String,
}

impl Log {
    pub fn new(name: String) -> Self {
        Self { name }
    }

    pub fn send(&self, message: &Message) -> Result<Sent, SendError> {
        // The first ids and a count: a fleet-wide group is thousands.
        let alerts: Vec<i64> = message.alerts.iter().take(super::super::message::ACK_IDS).map(|a| a.id).collect();
        tracing::warn!(
            target: "warden::alerts",
            channel = %self.name,
            kind = %message.kind,
            severity = message.severity(),
            count = message.alerts.len(),
            ?alerts,
            "{}",
            message.text()
        );
        Ok(Sent::default())
    }
}
