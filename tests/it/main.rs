//! Integration tests: one binary, one module per capability.

mod helpers;

mod cli;
mod client;
mod config;
mod embedded;
mod health;
mod ingest;
mod mcp;
mod migrations;
mod outage;
mod probes;
mod read_api;
mod sql_path;
