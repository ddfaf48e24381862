//! The contract between the driver loop and a database backend: plan and run one unit of work.

use crate::error::Result;
use std::time::Duration;

/// What one unit of work did. The unit's checkpoint was committed with it.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Keys walked past (locked and processed, or recorded as skipped).
    pub keys: u64,
    /// Rows the statement reported as affected.
    pub rows: u64,
    /// Previously skipped rows processed by this unit.
    pub retried: u64,
    /// Rows skipped because another transaction held their lock (recorded for retry).
    pub skipped: u64,
    /// The cursor after this unit, when it moved.
    pub cursor: Option<String>,
    /// Nothing is left to do.
    pub done: bool,
    /// The backend asks for a pause before the next unit (e.g. rows still locked).
    pub backoff: Option<Duration>,
    /// Where the unit's time went, for debug logs and benchmarks.
    pub timings: Timings,
}

/// Time spent in each phase of a unit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub select: Duration,
    pub statement: Duration,
    pub commit: Duration,
}

/// Work still ahead of the cursor.
#[derive(Debug, Clone, Copy, Default)]
pub struct Estimate {
    /// Rows left after the cursor (planner estimate unless `exact`).
    pub rows: u64,
    pub exact: bool,
    /// Rows skipped earlier and waiting for their retry.
    pub pending_retry: u64,
}

/// One sample batch run by `plan` inside a transaction that is rolled back.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub keys: u64,
    pub rows: u64,
    pub elapsed: Duration,
}

/// A database backend: knows how to check, estimate and run one unit in its database.
/// The driver loop owns sizing, retries, stopping, progress and the job's status.
#[allow(async_fn_in_trait)]
pub trait Backend {
    /// Check that everything the spec names exists and prepares, before any write.
    async fn preflight(&mut self) -> Result<()>;
    /// Sessions that would wedge the job or that the job would pile onto (lock holders, old
    /// transactions), one line each. `run` refuses to start while there are any.
    async fn blockers(&mut self) -> Result<Vec<String>>;
    /// Cheap estimate of the work after `cursor`; `exact` counts instead.
    async fn estimate(&mut self, cursor: Option<&str>, exact: bool) -> Result<Estimate>;
    /// Run one unit of up to `size` keys after `cursor` and commit it with its checkpoint.
    async fn run_unit(&mut self, cursor: Option<&str>, size: u64) -> Result<Outcome>;
    /// Run `count` units after `cursor` and roll them all back: nothing is written.
    async fn sample(&mut self, cursor: Option<&str>, size: u64, count: u32) -> Result<Vec<Sample>>;
    /// Drop the working connection after it was lost; the next unit opens a new one.
    fn reset_connection(&mut self);
    /// The cursor as last committed. Called after a lost connection: a unit whose COMMIT was
    /// sent but not acknowledged may have landed, and must not be run again.
    async fn committed_cursor(&mut self) -> Result<Option<String>>;
}
