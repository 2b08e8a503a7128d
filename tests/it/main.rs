//! Integration tests: one binary, one module per capability.

mod helpers;

mod cli;
mod client;
mod config;
mod embedded;
mod ingest;
mod migrations;
mod outage;
mod probes;
mod sql_path;
