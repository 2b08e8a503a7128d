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
        let alerts: Vec<i64> = message.alerts.iter().map(|a| a.id).collect();
        tracing::warn!(
            target: "warden::alerts",
            channel = %self.name,
            kind = %message.kind,
            severity = message.severity(),
            ?alerts,
            "{}",
            message.text()
        );
        Ok(Sent { status: None })
    }
}
