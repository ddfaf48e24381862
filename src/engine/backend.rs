//! The contract between the generic engine and a database backend. A job is cut into units
//! (key ranges for Postgres, time chunks for ClickHouse) that workers claim, walk in fenced
//! batches and release; the backend knows its database, the engine owns everything else.

use super::plan::{Plan, PlanOptions};
use super::throttle::Gate;
use crate::error::Result;
use crate::spec::Throttle;
use crate::state::{JobState, Status, UnitState};
use std::time::Duration;

/// What one batch did. The batch's checkpoint was committed with it, fenced by the claim.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Keys walked past (locked and processed, or recorded as skipped); source rows for chunks.
    pub keys: u64,
    /// Rows the statement reported as affected.
    pub rows: u64,
    /// Previously skipped rows processed by this batch.
    pub retried: u64,
    /// Rows skipped because another transaction held their lock (recorded for retry).
    pub skipped: u64,
    /// Where the unit stands after this batch (for logs).
    pub cursor: Option<String>,
    /// The claimed unit is finished: the worker claims the next one.
    pub unit_done: bool,
    /// The backend asks for a pause before the next batch (e.g. rows still locked).
    pub backoff: Option<Duration>,
    /// The batch size the driver should not exceed from now on (a unit that learned its limit).
    pub size_hint: Option<u64>,
    /// Where the batch's time went, for debug logs and benchmarks.
    pub timings: Timings,
}

/// Time spent in each phase of a batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub select: Duration,
    pub statement: Duration,
    pub commit: Duration,
}

/// Work still ahead.
#[derive(Debug, Clone, Copy, Default)]
pub struct Estimate {
    /// Rows left (planner estimate unless `exact`).
    pub rows: u64,
    pub exact: bool,
    /// Rows skipped earlier and waiting for their retry.
    pub pending_retry: u64,
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This worker now owns the unit with this label.
    Got(String),
    /// Nothing to claim right now. `all_done`: every unit of the job is finished.
    /// `held`: units other live workers hold (they may still finish or die and free them).
    /// `blocked`: units this process gave up on for this run (rows still locked).
    Nothing {
        all_done: bool,
        held: u64,
        blocked: u64,
    },
}

/// One worker of a job: a connection of its own and at most one claimed unit at a time.
#[allow(async_fn_in_trait)]
pub trait Worker: Send + 'static {
    /// A short name for logs and metrics (`w0`, `w1`, ...).
    fn name(&self) -> &str;
    /// Claim a unit if this worker holds none (idempotent while it holds one).
    fn claim(&mut self) -> impl std::future::Future<Output = Result<Claim>> + Send;
    /// One batch of at most `size` keys in the claimed unit, committed with its fenced
    /// checkpoint. `Error::Lost` when the claim was taken over: nothing was written.
    fn step(&mut self, size: u64) -> impl std::future::Future<Output = Result<Outcome>> + Send;
    /// Give the claimed unit back (it stays unfinished and claimable).
    fn release(&mut self) -> impl std::future::Future<Output = Result<()>> + Send;
    /// Stop working on the claimed unit for this run: its rows are still locked by others
    /// (the unit is released, kept unfinished, and not claimed again by this process).
    fn give_up(&mut self) -> impl std::future::Future<Output = Result<()>> + Send;
    /// Whether the job is paused (`backfill pause`).
    fn paused(&mut self) -> impl std::future::Future<Output = Result<bool>> + Send;
    /// The next `step` will not follow at once (a pause, the throttle, a wait between
    /// batches): let go of anything prepared ahead of it, such as rows locked for it.
    fn settle(&mut self) -> impl std::future::Future<Output = ()> + Send {
        async {}
    }
    /// Forget the connection after it was lost, and with it the claim: the next `claim`
    /// reconnects and claims again (the same unit, if nobody took it over).
    fn reset_connection(&mut self);
    /// The worker is done for this run: let go of what its session holds now, not when the
    /// server gets round to ending the closed session (a command started right after this
    /// process exits must not find the job taken).
    fn close(&mut self) -> impl std::future::Future<Output = ()> + Send {
        async {}
    }
}

/// One sample batch run by `plan` inside a transaction that is rolled back.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub keys: u64,
    pub rows: u64,
    pub elapsed: Duration,
}

/// The job as a whole in one database: checks, the store, and workers.
/// How `Backend::start` begins a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// From its checkpoint, or as new if the store has none.
    Resume,
    /// As `Resume`, with `--rerun`: a job the store has none of starts even where it looks
    /// like another name for a job the store has (`PgJob`'s twin check).
    Knowingly,
    /// All progress forgotten first: a `--rerun` of a finished job.
    Over,
}

#[allow(async_fn_in_trait)]
pub trait Backend: Send + Sync + 'static {
    type Worker: Worker;
    /// The job's record, if any. Never writes (used by `plan` and `status` too).
    async fn load(&self) -> Result<Option<JobState>>;
    /// Sessions that would wedge the job or that the job would pile onto, one line each.
    async fn blockers(&self) -> Result<Vec<String>>;
    /// Check that everything the spec names exists and prepares, before any write.
    async fn preflight(&self) -> Result<()>;
    /// Become one of at most `cap` workers of the job (`None`: all slots are taken; the
    /// string names who holds them). Writes nothing.
    async fn join(&self, index: u32, cap: u32) -> Result<Result<Self::Worker, String>>;
    /// Create the store and the job's units if missing, mark the job running, as `how` says.
    async fn start(&self, spec_hash: &str, how: Start) -> Result<JobState>;
    /// Cheap estimate of the work left.
    async fn estimate(&self) -> Result<Estimate>;
    /// Whether every unit of the job is finished.
    async fn all_done(&self) -> Result<bool>;
    /// Run the spec's `verify:` query (read-only): `None` without one, else its number.
    async fn verify(&self) -> Result<Option<i64>>;
    /// Record how this process's run ended (`error` is redacted by the caller).
    async fn finish(&self, status: Status, error: Option<&str>) -> Result<()>;
    /// The throttle gate for `throttle:` (its probe runs on a connection of its own).
    async fn throttle(&self, spec: &Throttle) -> Result<Option<Gate>>;

    /// What the database is and what the job walks, for headers (password hidden).
    fn describe(&self) -> (String, String);
    /// A dry run: writes nothing.
    async fn plan(&self, opts: PlanOptions) -> Result<Plan>;
    /// The job's units as the store has them (read-only).
    async fn units(&self) -> Result<Vec<UnitState>>;
    /// `backfill pause` / `unpause`.
    async fn set_paused(&self, spec_hash: &str, paused: bool) -> Result<()>;
    /// Record why the job waits for its `throttle:` conditions (`None`: it does not), so
    /// `status` in another process can say so. Only backends with a throttle keep it.
    async fn note_throttled(&self, _why: Option<&str>) -> Result<()> {
        Ok(())
    }
    /// Forget the job's checkpoint and clean up what it keeps (refused while it runs).
    /// `discard_foreign`: let the next start's restore drop rows other writers put where the
    /// job landed (it refuses otherwise); only backends that restore keep such rows.
    /// Returns what it did, in words, or `None` if there was nothing.
    async fn reset(&self, discard_foreign: bool) -> Result<Option<String>>;
}
