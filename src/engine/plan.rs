//! What `plan` reports for one job, in the same shape for every backend (text and `--json`).

use serde::Serialize;

/// How `plan` should look at a job.
#[derive(Debug, Clone, Copy)]
pub struct PlanOptions {
    /// Count pending rows instead of estimating them.
    pub exact: bool,
    /// Sample batches to time (rolled back).
    pub samples: u32,
}

/// A dry run's findings. Every field is optional where a backend cannot say.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Plan {
    pub job: String,
    /// The database (password hidden) and what the job walks.
    pub database: String,
    pub target: String,
    /// `pending`, `running`, `stopped`, `failed`, `done`.
    pub status: String,
    /// Set when `run` would not work on the job, and why (`done`).
    pub skip: Option<String>,
    /// Where a run would resume, and what the store counts as done so far.
    pub resume: String,
    pub keys_done: i64,
    pub batches_done: i64,
    /// Sessions that would make `run` refuse to start.
    pub blockers: Vec<String>,
    /// Rows left to do (`pending_exact`: counted, else estimated).
    pub pending_rows: u64,
    pub pending_exact: bool,
    /// Rows skipped earlier because they were locked, waiting for their retry.
    pub pending_retry: u64,
    /// First batch size and how many batches of it the rows make.
    pub batch_size: u64,
    pub batches: u64,
    /// Rolled-back sample batches.
    pub sample: Option<SampleReport>,
    /// Estimated time for the rest of the job, and the size the sizer would settle on.
    pub estimate_seconds: Option<f64>,
    pub settled_batch_size: Option<u64>,
    /// WAL the job will write (Postgres).
    pub wal: Option<WalForecast>,
    /// Whether `statement` converges when applied twice to the same keys.
    pub idempotency: Option<Idempotency>,
    /// Units (ranges, months) with their rows and state.
    pub units: Vec<UnitPlan>,
    /// Anything else worth a line.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct SampleReport {
    pub batches: u32,
    pub keys: u64,
    pub rows: u64,
    pub seconds: f64,
    pub rows_per_second: f64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct WalForecast {
    /// WAL bytes per row the statement wrote in the sample batches (its own, not the server's).
    pub bytes_per_row: f64,
    /// For all pending rows.
    pub total_bytes: u64,
    /// At the sampled rate (all workers together).
    pub bytes_per_second: f64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Idempotency {
    /// The statement, run twice on the same sample keys, left the same rows.
    pub converges: bool,
    /// Why not (or how it was checked).
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct UnitPlan {
    pub unit: String,
    pub rows: Option<u64>,
    pub status: String,
    pub note: String,
}
