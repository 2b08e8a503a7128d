//! warden keeps watch over a fleet of agents.
//!
//! Map of the crate:
//! - [`config`] — typed settings from `settings.toml`, an override file and
//!   `WARDEN__*` environment variables, validated once at start-up.
//! - [`db`] — the PostgreSQL pool, the embedded cluster used when no URL is
//!   set, migrations and partition upkeep.
//! - [`model`] — domain vocabulary: agent ids, modes, severities, tiers.
//! - [`auth`] — API keys with scopes, hashed at rest, cached when verified.
//! - [`ingest`] — heartbeat and event validation and the group-commit writers.
//! - [`alerting`] — routing, escalation, grouping, silences and delivery of alerts.
//! - [`api`] — the axum router: probes and the `/v1` API.
//! - [`console`] — the web console at `/` and the public status page at `/status`.
//! - [`app`] — start-up and orderly shutdown of `warden serve`.
//! - [`every`] — the clock of the periodic background loops (evaluator,
//!   recovery, escalator, dispatcher, retention, partition upkeep, the
//!   embedded cluster's watch).
//! - [`cli`] — the command line verbs.
//! - [`telemetry`] — logging.

#[macro_use]
mod text_enum;

pub mod agent;
pub mod alerting;
pub mod api;
pub mod app;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod console;
pub mod db;
pub mod demo;
pub mod every;
pub mod health;
pub mod http;
pub mod ingest;
pub mod loadgen;
pub mod metrics;
pub mod model;
pub mod recovery;
pub mod report;
pub mod retention;
pub mod stream;
pub mod supervise;
pub mod telemetry;
pub mod text_table;
