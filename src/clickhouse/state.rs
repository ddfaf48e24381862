//! Where a ClickHouse job keeps its state and how one runner holds its target, chosen once when
//! the job is opened (`StateStore::open`):
//! - by default, next to the target: `backfill_chunks` in ClickHouse (`store.rs`) and the lock
//!   table `<target>__backfill_lock` with its heartbeat (`lock.rs`);
//! - with `clickhouse.state_url`, in Postgres (`pgstate.rs`): `clickhouse_chunks` and a session
//!   advisory lock on a connection of its own (no lease: it ends with the runner's session),
//!   which fences the state's writes.
//!
//! Whatever the store, a run also holds the lock table next to the target: the target is what
//! two runners must not share, and two runners of one job whose specs name different stores
//! (a spec edited to add `state_url` while an old pod still runs) meet only there.
//!
//! Both keep the same records; the rest of the backend (tree, landing, base and ledger in
//! ClickHouse) does not know which one it has.

use super::lock::{self, ChLock};
use super::pgstate::{PgLock, PgState};
use super::store::{ChStore, JOB_ROW, Record};
use crate::error::{Error, Result, StopReason};
use crate::postgres::Access;
use crate::spec::{ClickhouseSpec, Spec};
use clickhouse::Client;

/// One per job (never moved around in bulk): the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum StateStore {
    Clickhouse { store: ChStore, client: Client },
    Postgres { state: PgState, client: Client },
}

/// A held target lock (one per run): the lock table next to the target, and with the state in
/// Postgres the state's lock too.
pub struct TargetLock {
    target: ChLock,
    state: Option<PgLock>,
}

impl StateStore {
    /// The job's store: in Postgres when the spec has `state_url` (read-only sessions for
    /// `plan`, `status`, `verify`), else in ClickHouse through `client`.
    pub fn open(spec: &Spec, ch: &ClickhouseSpec, client: &Client, access: Access) -> Result<Self> {
        Ok(match &ch.state_url {
            Some(url) => StateStore::Postgres {
                state: PgState::open(
                    url,
                    &spec.state_schema,
                    &spec.name,
                    access == Access::ReadOnly,
                )?,
                client: client.clone(),
            },
            None => StateStore::Clickhouse {
                store: ChStore::new(client.clone(), &spec.state_schema),
                client: client.clone(),
            },
        })
    }

    /// Where the records are, for messages.
    pub fn table(&self) -> String {
        match self {
            StateStore::Clickhouse { store, .. } => store.table().to_string(),
            StateStore::Postgres { state: p, .. } => format!("{} (Postgres)", p.chunks_table()),
        }
    }

    pub async fn ensure(&self) -> Result<()> {
        match self {
            StateStore::Clickhouse { store, .. } => store.ensure().await,
            StateStore::Postgres { state: p, .. } => p.ensure().await,
        }
    }

    /// Every record of a job (none without the table). Reads only.
    pub async fn records(&self, job: &str) -> Result<Vec<Record>> {
        match self {
            StateStore::Clickhouse { store, .. } => store.records(job).await,
            StateStore::Postgres { state: p, .. } => p.records(job).await,
        }
    }

    /// Whether the job's row `chunk` has status `status`. Reads only.
    pub async fn flag(&self, job: &str, chunk: &str, status: &str) -> Result<bool> {
        match self {
            StateStore::Clickhouse { store, .. } => store.flag(job, chunk, status).await,
            StateStore::Postgres { state: p, .. } => p.flag(job, chunk, status).await,
        }
    }

    /// Write records, all or nothing.
    pub async fn put(&self, job: &str, records: &[&Record]) -> Result<()> {
        match self {
            StateStore::Clickhouse { store, .. } => store.put(job, records).await,
            StateStore::Postgres { state: p, .. } => p.put(job, records).await,
        }
    }

    /// Delete a job's records.
    pub async fn forget(&self, job: &str) -> Result<()> {
        match self {
            StateStore::Clickhouse { store, .. } => store.forget(job).await,
            StateStore::Postgres { state: p, .. } => p.forget(job).await,
        }
    }

    /// Who keeps `job` out of the target right now, if anyone. Reads only.
    pub async fn held_by_other(
        &self,
        database: &str,
        target: &str,
        job: &str,
    ) -> Result<Option<String>> {
        match self {
            StateStore::Clickhouse { client, store } => {
                let done = async |j: &str| store.flag(j, JOB_ROW, "done").await;
                lock::held_by_other(client, database, target, job, done).await
            }
            StateStore::Postgres { state: p, client } => {
                if let Some(who) = p
                    .held_by_other(&lock::target_name(database, target), job)
                    .await?
                {
                    return Ok(Some(who));
                }
                let done = async |j: &str| p.flag(j, JOB_ROW, "done").await;
                lock::held_by_other(client, database, target, job, done).await
            }
        }
    }

    /// Whether another process runs `job` now, as far as the store can tell without a lock of
    /// its own (the Postgres lock shows in `pg_locks`; ClickHouse's lock table is not read
    /// here). Reads only.
    pub async fn running_elsewhere(&self, database: &str, target: &str, job: &str) -> Result<bool> {
        match self {
            StateStore::Clickhouse { .. } => Ok(false),
            StateStore::Postgres { state: p, .. } => {
                p.running(&lock::target_name(database, target), job).await
            }
        }
    }

    /// Take the target's lock for `job`, or say who holds it (`Err(Stopped(LockHeld))`).
    /// `run`: a run's lock (the job keeps the target, its writes are fenced by the lock), else
    /// a reset's.
    pub async fn acquire(
        &self,
        database: &str,
        target: &str,
        job: &str,
        run: bool,
    ) -> Result<TargetLock> {
        match self {
            StateStore::Clickhouse { client, store } => {
                let done = async |j: &str| store.flag(j, JOB_ROW, "done").await;
                Ok(TargetLock {
                    target: lock::acquire(client, database, target, job, done).await?,
                    state: None,
                })
            }
            StateStore::Postgres { state: p, client } => {
                // The state's lock first (it names the session of a runner on the same
                // store), then the target's, taken before the state records the job as the
                // target's keeper.
                let done = async |j: &str| p.flag(j, JOB_ROW, "done").await;
                let (state, target) = p
                    .acquire(&lock::target_name(database, target), job, run, async || {
                        lock::acquire(client, database, target, job, done).await
                    })
                    .await?;
                Ok(TargetLock {
                    target,
                    state: Some(state),
                })
            }
        }
    }

    /// A lock was let go: writes are no longer fenced by it.
    pub fn released(&self) {
        if let StateStore::Postgres { state: p, .. } = self {
            p.unfence();
        }
    }
}

impl TargetLock {
    /// `Err(Stopped)` once this runner lost the target (another runner took it over, or the
    /// connection that held the state's lock is gone): it must not land or record anything
    /// more.
    pub async fn check(&self) -> Result<()> {
        if let Some(l) = &self.state {
            l.check().await?;
        }
        match self.target.verify().await? {
            true => Ok(()),
            false => Err(Error::Stopped(StopReason::LockHeld(
                "another runner, which took over the target's lock".into(),
            ))),
        }
    }

    /// Whether the lock is gone (or cannot be read to tell): then not even the job's final
    /// status may be written.
    pub async fn fence_gone(&self) -> bool {
        self.check().await.is_err()
    }

    /// The run ends; the job keeps the target for its next run.
    pub async fn release(&self) -> Result<()> {
        let target = self.target.release().await;
        match &self.state {
            Some(l) => target.and(l.release().await),
            None => target,
        }
    }

    /// The job is done: said in the target's lock table, for any job (see `ChLock::mark_done`).
    pub async fn mark_done(&self) -> Result<()> {
        self.target.mark_done().await
    }

    /// The job is done or reset: the target is free for any job.
    pub async fn free(&self) -> Result<()> {
        let target = self.target.drop_table().await;
        match &self.state {
            Some(l) => target.and(l.free().await),
            None => target,
        }
    }
}
