//! Checkpoint store: one record per job (status, cursor, counters, times, spec hash, last error).
//! The trait is what the driver loop and the commands use; backends that can commit a checkpoint
//! in the same transaction as their unit of work do so through their store's own API.

pub mod clickhouse;
pub mod postgres;

use crate::error::Result;
use chrono::{DateTime, Utc};
use serde::Serialize;

/// Lifecycle of a job in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// A runner is (or was, until it was killed) working on it.
    Running,
    /// Stopped early (deadline, signal, rows still locked); resumes on the next run.
    Stopped,
    /// Failed with `last_error`; resumes from the checkpoint on the next run.
    Failed,
    /// Every row done.
    Done,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Stopped => "stopped",
            Status::Failed => "failed",
            Status::Done => "done",
        }
    }

    pub fn parse(s: &str) -> Status {
        match s {
            "done" => Status::Done,
            "failed" => Status::Failed,
            "stopped" => Status::Stopped,
            _ => Status::Running,
        }
    }
}

/// A job's record in the store.
#[derive(Debug, Clone, Serialize)]
pub struct JobState {
    pub job: String,
    pub status: Status,
    /// Last key committed (text form); `None` before the first batch.
    pub cursor: Option<String>,
    /// Keys walked past the cursor (including skipped ones).
    pub keys_done: i64,
    /// Rows the statement reported as affected.
    pub rows_done: i64,
    pub batches_done: i64,
    /// Rows skipped under SKIP LOCKED and later retried.
    pub rows_retried: i64,
    /// Skipped rows still waiting for their retry.
    pub rows_pending_retry: i64,
    pub spec_hash: String,
    pub started_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// `host:pid` of the runner that last started it.
    pub runner: Option<String>,
}

/// What the driver loop needs from a checkpoint store.
#[allow(async_fn_in_trait)]
pub trait StateStore {
    /// Create the store's tables if they are missing (first run).
    async fn ensure(&self) -> Result<()>;
    /// The job's record, if any. Never creates anything (used by `plan` and `status`).
    async fn load(&self, job: &str) -> Result<Option<JobState>>;
    /// Mark the job running under this process. `restart` forgets the cursor and counters
    /// (a `--rerun` of a finished job).
    async fn start(&self, job: &str, spec_hash: &str, restart: bool) -> Result<JobState>;
    /// Record how the run ended; `error` is kept as `last_error` (redacted by the caller).
    async fn finish(&self, job: &str, status: Status, error: Option<&str>) -> Result<()>;
    /// Forget the job's checkpoint entirely. Returns whether there was one.
    async fn reset(&self, job: &str) -> Result<bool>;
    /// Become the job's only runner for as long as this store lives, or fail with
    /// `Error::Stopped(LockHeld)` naming the runner that holds it.
    async fn lock(&self, job: &str) -> Result<()>;
    /// Give the runner lock back (also released when the process dies).
    async fn unlock(&self, job: &str) -> Result<()>;
}

/// `host:pid` of this process, recorded as the runner.
pub fn runner_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}
