//! Integration tests: one binary, one module per capability.

mod helpers;

mod alerting;
mod cli;
mod client;
mod config;
mod console;
mod database;
mod db_tls;
mod embedded;
mod failover;
mod health;
mod hostile;
mod ingest;
mod mcp;
mod metrics;
mod migrations;
mod outage;
mod probes;
mod procs;
mod read_api;
mod recovery;
mod recovery_jobs;
mod relay;
mod removal;
mod reports;
mod retention;
mod sql_path;
