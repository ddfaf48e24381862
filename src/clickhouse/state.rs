//! Where a ClickHouse job keeps its state and how one runner holds its target, chosen once when
//! the job is opened (`StateStore::open`):
//! - by default, next to the target: `backfill_chunks` in ClickHouse (`store.rs`) and the lock
//!   table `<target>__backfill_lock` with its heartbeat (`lock.rs`);
//! - with `clickhouse.state_url`, in Postgres (`pgstate.rs`): `clickhouse_chunks` and a session
//!   advisory lock on a connection of its own (no lease: it ends with the runner's session).
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
    Postgres(PgState),
}

/// A held target lock (one per run).
#[allow(clippy::large_enum_variant)]
pub enum TargetLock {
    Clickhouse(ChLock),
    Postgres(PgLock),
}

impl StateStore {
    /// The job's store: in Postgres when the spec has `state_url` (read-only sessions for
    /// `plan`, `status`, `verify`), else in ClickHouse through `client`.
    pub fn open(spec: &Spec, ch: &ClickhouseSpec, client: &Client, access: Access) -> Result<Self> {
        Ok(match &ch.state_url {
            Some(url) => StateStore::Postgres(PgState::open(
                url,
                &spec.state_schema,
                &spec.name,
                access == Access::ReadOnly,
            )?),
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
            StateStore::Postgres(p) => format!("{} (Postgres)", p.chunks_table()),
        }
    }

    pub async fn ensure(&self) -> Result<()> {
        match self {
            StateStore::Clickhouse { store, .. } => store.ensure().await,
            StateStore::Postgres(p) => p.ensure().await,
        }
    }

    /// Every record of a job (none without the table). Reads only.
    pub async fn records(&self, job: &str) -> Result<Vec<Record>> {
        match self {
            StateStore::Clickhouse { store, .. } => store.records(job).await,
            StateStore::Postgres(p) => p.records(job).await,
        }
    }

    /// Whether the job's row `chunk` has status `status`. Reads only.
    pub async fn flag(&self, job: &str, chunk: &str, status: &str) -> Result<bool> {
        match self {
            StateStore::Clickhouse { store, .. } => store.flag(job, chunk, status).await,
            StateStore::Postgres(p) => p.flag(job, chunk, status).await,
        }
    }

    /// Write records, all or nothing.
    pub async fn put(&self, job: &str, records: &[&Record]) -> Result<()> {
        match self {
            StateStore::Clickhouse { store, .. } => store.put(job, records).await,
            StateStore::Postgres(p) => p.put(job, records).await,
        }
    }

    /// Delete a job's records.
    pub async fn forget(&self, job: &str) -> Result<()> {
        match self {
            StateStore::Clickhouse { store, .. } => store.forget(job).await,
            StateStore::Postgres(p) => p.forget(job).await,
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
            StateStore::Postgres(p) => {
                p.held_by_other(&lock::target_name(database, target), job)
                    .await
            }
        }
    }

    /// Whether another process runs `job` now, as far as the store can tell without a lock of
    /// its own (the Postgres lock shows in `pg_locks`; ClickHouse's lock table is not read
    /// here). Reads only.
    pub async fn running_elsewhere(&self, database: &str, target: &str, job: &str) -> Result<bool> {
        match self {
            StateStore::Clickhouse { .. } => Ok(false),
            StateStore::Postgres(p) => p.running(&lock::target_name(database, target), job).await,
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
                lock::acquire(client, database, target, job, done)
                    .await
                    .map(TargetLock::Clickhouse)
            }
            StateStore::Postgres(p) => p
                .acquire(&lock::target_name(database, target), job, run)
                .await
                .map(TargetLock::Postgres),
        }
    }

    /// A lock was let go: writes are no longer fenced by it.
    pub fn released(&self) {
        if let StateStore::Postgres(p) = self {
            p.unfence();
        }
    }
}

impl TargetLock {
    /// `Err(Stopped)` once this runner lost the target (another runner took it over, or the
    /// connection that held it is gone): it must not land or record anything more.
    pub async fn check(&self) -> Result<()> {
        match self {
            TargetLock::Clickhouse(l) => match l.verify().await? {
                true => Ok(()),
                false => Err(Error::Stopped(StopReason::LockHeld(
                    "another runner took over the target's lock".into(),
                ))),
            },
            TargetLock::Postgres(l) => l.check().await,
        }
    }

    /// Whether the lock is gone (or cannot be read to tell): then not even the job's final
    /// status may be written.
    pub async fn fence_gone(&self) -> bool {
        match self {
            TargetLock::Clickhouse(l) => !matches!(l.verify().await, Ok(true)),
            TargetLock::Postgres(l) => l.check().await.is_err(),
        }
    }

    /// The run ends; the job keeps the target for its next run.
    pub async fn release(&self) -> Result<()> {
        match self {
            TargetLock::Clickhouse(l) => l.release().await,
            TargetLock::Postgres(l) => l.release().await,
        }
    }

    /// The job is done or reset: the target is free for any job.
    pub async fn free(&self) -> Result<()> {
        match self {
            TargetLock::Clickhouse(l) => l.drop_table().await,
            TargetLock::Postgres(l) => l.free().await,
        }
    }
}
