//! Postgres backend: a job's key space cut into ranges that workers claim, each walked in
//! keyset batches under `FOR UPDATE SKIP LOCKED`, one transaction per batch with its range's
//! fenced checkpoint, and a retry pass per range for rows that were skipped because they were
//! locked. The job's tables live in the target database (`store.rs`).

pub mod advisory;
mod answer;
mod batch;
mod blockers;
mod cascade;
pub mod connect;
mod effects;
pub mod errors;
mod hidden;
mod job;
mod key_writes;
mod mentions;
mod own_locks;
mod plan;
mod ranges;
mod raw;
mod readonly;
mod reads;
mod retry_pass;
mod sql;
mod store;
pub mod table;
pub mod throttle;
pub mod tls;
mod triggers;
mod worker;

pub use job::PgJob;
pub use worker::PgWorker;

use crate::error::Result;
use crate::spec::{PostgresSpec, Spec};

/// Whether a command may write (`run`, `reset`, `pause`) or only read (`plan`, `status`,
/// `verify`: their sessions default to read-only transactions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    ReadOnly,
}

/// The job in its database. Connects lazily; `workers` (this process's worker threads) sizes
/// the pool, and, when it is above the spec's `workers`, how many ranges a new job is cut into
/// (`run --workers 3` on a `workers: 1` spec must not leave two threads without a range).
pub fn open(spec: &Spec, pg: &PostgresSpec, access: Access, workers: u32) -> Result<PgJob> {
    let pool = connect::pool(
        &pg.url,
        &spec.name,
        access == Access::ReadOnly,
        workers as usize + 4,
        spec.limits.lock_timeout,
    )?;
    Ok(PgJob::new(pool, spec, pg, pg.verify.clone(), workers))
}

impl PgJob {
    /// A throttle probe on this job's database (its own connection).
    pub fn throttle_probe(&self, spec: crate::spec::Throttle) -> throttle::PgProbe {
        let ctx = self.ctx();
        throttle::PgProbe::new(ctx.pool.clone(), &ctx.url, &ctx.job, spec)
    }
}
