//! `backfill`: resumable batched backfills. The library's front door: the CLI binary parses
//! arguments and calls `commands::execute`; everything else is reachable for tests and embedding.

pub mod cli;
pub mod clickhouse;
pub mod commands;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod postgres;
pub mod progress;
pub mod redact;
pub mod spec;
pub mod state;

pub use error::{Error, Result};
