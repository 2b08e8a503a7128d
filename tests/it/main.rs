//! Integration tests: one binary, one module per capability.

mod helpers;

mod cli;
mod config;
mod embedded;
mod migrations;
mod probes;
