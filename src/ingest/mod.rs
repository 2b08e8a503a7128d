//! Intake of what agents report: heartbeats (validated, then written by the
//! group-commit writers) and events.

pub mod events;
pub mod heartbeat;
mod refused;
pub mod writer;

pub use heartbeat::{FieldError, Heartbeat, Limits, ParseError};
pub use writer::{Ack, Ingestor, SubmitError, WriterSettings};
