//! Checkpoint store in ClickHouse: `backfill_state` (ReplacingMergeTree, read with FINAL), one
//! row per chunk (status, rows, attempts, memory, error, staging partitions), one row per job
//! (chunk = ''), and a lease row (chunk = '#lease') renewed by a heartbeat: ClickHouse has no
//! locks, so one runner per job is a lease that expires when its runner stops renewing it.

use crate::clickhouse::client::literal;
use crate::clickhouse::errors::ch_error;
use crate::error::{Error, Result, StopReason};
use crate::state::{JobState, Status, runner_id};
use chrono::{DateTime, Utc};
use clickhouse::{Client, Row};
use serde::Deserialize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const LEASE: &str = "#lease";
/// A lease not renewed for this long belongs to a dead runner.
const LEASE_TTL: Duration = Duration::from_secs(30);
const HEARTBEAT: Duration = Duration::from_secs(5);

/// One row of `backfill_state` (column order = `COLUMNS`).
#[derive(Debug, Clone, Default, Row, Deserialize)]
pub struct Record {
    pub chunk: String,
    pub level: String,
    pub status: String,
    /// Rows written to the target.
    pub rows: u64,
    /// Rows of the source inside the chunk.
    pub source_rows: u64,
    pub attempts: u32,
    pub memory_bytes: u64,
    pub error: String,
    pub staging: String,
    pub partitions: Vec<String>,
    pub spec_hash: String,
    pub runner: String,
    pub started: u32,
    pub updated: u32,
    pub finished: u32,
}

const COLUMNS: &str = "chunk, level, status, rows, source_rows, attempts, memory_bytes, error, \
                       staging, partitions, spec_hash, runner, started, updated, finished";

pub struct ChStateStore {
    client: Client,
    table: String,
    version: AtomicU64,
    heartbeat: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn now() -> u32 {
    Utc::now().timestamp() as u32
}

fn time(t: u32) -> Option<DateTime<Utc>> {
    (t > 0)
        .then(|| DateTime::from_timestamp(i64::from(t), 0))
        .flatten()
}

impl ChStateStore {
    pub fn new(client: Client, database: &str) -> ChStateStore {
        ChStateStore {
            client,
            table: format!(
                "{}.backfill_state",
                crate::clickhouse::client::ident(database)
            ),
            version: AtomicU64::new(0),
            heartbeat: Mutex::new(None),
        }
    }

    /// A version above every earlier one written by this process (ReplacingMergeTree keeps the
    /// row with the highest version).
    fn next_version(&self) -> u64 {
        let wall = Utc::now().timestamp_nanos_opt().unwrap_or(0) as u64;
        let prev = self.version.fetch_max(wall, Ordering::SeqCst).max(wall);
        self.version.fetch_add(1, Ordering::SeqCst).max(prev) + 1
    }

    pub async fn exists(&self) -> Result<bool> {
        let (db, name) = self.table.split_once('.').expect("qualified");
        let n: u64 = self
            .client
            .query("SELECT count() FROM system.tables WHERE database = ? AND name = ?")
            .bind(db.trim_matches('`'))
            .bind(name.trim_matches('`'))
            .fetch_one()
            .await
            .map_err(|e| ch_error("reading the checkpoint store", &e))?;
        Ok(n > 0)
    }

    /// Every record of a job (chunks, job row, lease), latest version of each.
    pub async fn records(&self, job: &str) -> Result<Vec<Record>> {
        if !self.exists().await? {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {COLUMNS} FROM {} FINAL WHERE job = ? ORDER BY chunk",
            self.table
        );
        self.client
            .query(&sql)
            .bind(job)
            .fetch_all()
            .await
            .map_err(|e| ch_error("reading the checkpoint store", &e))
    }

    /// The latest record of one chunk.
    pub async fn record(&self, job: &str, chunk: &str) -> Result<Option<Record>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM {} FINAL WHERE job = ? AND chunk = ?",
            self.table
        );
        let mut rows: Vec<Record> = self
            .client
            .query(&sql)
            .bind(job)
            .bind(chunk)
            .fetch_all()
            .await
            .map_err(|e| ch_error("reading the checkpoint store", &e))?;
        Ok(rows.pop())
    }

    /// Write a record (a new version of its row).
    pub async fn put(&self, job: &str, r: &Record) -> Result<()> {
        let parts: Vec<String> = r.partitions.iter().map(|p| literal(p)).collect();
        let sql = format!(
            "INSERT INTO {} (job, {COLUMNS}, version) VALUES ({}, {}, {}, {}, {}, {}, {}, {}, {}, \
             {}, [{}], {}, {}, {}, {}, {}, {})",
            self.table,
            literal(job),
            literal(&r.chunk),
            literal(&r.level),
            literal(&r.status),
            r.rows,
            r.source_rows,
            r.attempts,
            r.memory_bytes,
            literal(&r.error),
            literal(&r.staging),
            parts.join(", "),
            literal(&r.spec_hash),
            literal(&r.runner),
            r.started,
            r.updated.max(now()),
            r.finished,
            self.next_version()
        );
        self.client
            .query(&sql)
            .execute()
            .await
            .map_err(|e| ch_error("writing the checkpoint store", &e))
    }

    async fn job_row(&self, job: &str) -> Result<Option<Record>> {
        if !self.exists().await? {
            return Ok(None);
        }
        self.record(job, "").await
    }

    async fn write_lease(&self, job: &str, runner: &str) -> Result<()> {
        let lease = Record {
            chunk: LEASE.into(),
            runner: runner.into(),
            updated: now(),
            ..Record::default()
        };
        self.put(job, &lease).await
    }

    /// Delete a job's rows and wait for the mutation (18.16 has no mutations_sync).
    async fn delete(&self, job: &str) -> Result<()> {
        let sql = format!(
            "ALTER TABLE {} DELETE WHERE job = {}",
            self.table,
            literal(job)
        );
        self.client
            .query(&sql)
            .execute()
            .await
            .map_err(|e| ch_error("resetting the checkpoint", &e))?;
        let (db, name) = self.table.split_once('.').expect("qualified");
        for _ in 0..600 {
            let pending: u64 = self
                .client
                .query("SELECT count() FROM system.mutations WHERE database = ? AND table = ? AND is_done = 0")
                .bind(db.trim_matches('`'))
                .bind(name.trim_matches('`'))
                .fetch_one()
                .await
                .map_err(|e| ch_error("waiting for the reset", &e))?;
            if pending == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(Error::Preflight(
            "the reset's DELETE mutation did not finish in 60s".into(),
        ))
    }
}

impl ChStateStore {
    pub async fn ensure(&self) -> Result<()> {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} (
                job String, chunk String, level String, status String,
                rows UInt64, source_rows UInt64, attempts UInt32, memory_bytes UInt64,
                error String, staging String, partitions Array(String),
                spec_hash String, runner String,
                started DateTime, updated DateTime, finished DateTime,
                version UInt64
             ) ENGINE = ReplacingMergeTree(version) ORDER BY (job, chunk)",
            self.table
        );
        self.client
            .query(&sql)
            .execute()
            .await
            .map_err(|e| ch_error("creating the checkpoint store", &e))
    }

    pub async fn load(&self, job: &str) -> Result<Option<JobState>> {
        let records = self.records(job).await?;
        let Some(row) = records.iter().find(|r| r.chunk.is_empty()) else {
            return Ok(None);
        };
        let done: Vec<&Record> = records
            .iter()
            .filter(|r| !r.chunk.is_empty() && r.chunk != LEASE && r.status == "done")
            .collect();
        Ok(Some(JobState {
            job: job.into(),
            status: Status::parse(&row.status),
            resume: Some(match done.iter().map(|r| r.chunk.clone()).max() {
                Some(c) => format!("after chunk {c}"),
                None => "at the start".into(),
            }),
            units_done: done.len() as i64,
            keys_done: done.iter().map(|r| r.source_rows as i64).sum(),
            rows_done: done.iter().map(|r| r.rows as i64).sum(),
            batches_done: done.len() as i64,
            rows_retried: 0,
            rows_pending_retry: 0,
            spec_hash: row.spec_hash.clone(),
            started_at: time(row.started),
            updated_at: time(row.updated),
            finished_at: time(row.finished),
            last_error: (!row.error.is_empty()).then(|| row.error.clone()),
            runner: (!row.runner.is_empty()).then(|| row.runner.clone()),
            ..JobState::default()
        }))
    }

    pub async fn start(&self, job: &str, spec_hash: &str, restart: bool) -> Result<JobState> {
        if restart {
            self.delete(job).await?;
            self.write_lease(job, &runner_id()).await?;
        }
        let old = self.job_row(job).await?;
        let row = Record {
            status: "running".into(),
            spec_hash: spec_hash.into(),
            runner: runner_id(),
            started: old.as_ref().map_or(now(), |o| o.started),
            updated: now(),
            ..Record::default()
        };
        self.put(job, &row).await?;
        self.load(job)
            .await?
            .ok_or_else(|| Error::Preflight(format!("job {job} vanished from the store")))
    }

    pub async fn finish(&self, job: &str, status: Status, error: Option<&str>) -> Result<()> {
        let mut row = self.job_row(job).await?.unwrap_or_default();
        row.status = status.as_str().into();
        row.error = error.unwrap_or("").into();
        row.updated = now();
        row.finished = if status == Status::Done { now() } else { 0 };
        self.put(job, &row).await
    }

    pub async fn reset(&self, job: &str) -> Result<bool> {
        if self.job_row(job).await?.is_none() {
            return Ok(false);
        }
        self.delete(job).await?;
        Ok(true)
    }

    pub async fn lock(&self, job: &str) -> Result<()> {
        self.ensure().await?;
        let me = runner_id();
        let held = |r: &Option<Record>| {
            r.as_ref()
                .filter(|l| !l.runner.is_empty() && l.runner != me)
                .filter(|l| u64::from(now().saturating_sub(l.updated)) < LEASE_TTL.as_secs())
                .map(|l| {
                    format!(
                        "runner {} (its lease was renewed {}s ago; it expires {}s after the runner stops)",
                        l.runner,
                        now().saturating_sub(l.updated),
                        LEASE_TTL.as_secs()
                    )
                })
        };
        if let Some(who) = held(&self.record(job, LEASE).await?) {
            return Err(Error::Stopped(StopReason::LockHeld(who)));
        }
        self.write_lease(job, &me).await?;
        // No compare-and-set in ClickHouse: write, wait, and read back who won.
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Some(who) = held(&self.record(job, LEASE).await?) {
            return Err(Error::Stopped(StopReason::LockHeld(who)));
        }
        let store = ChStateStore {
            client: self.client.clone(),
            table: self.table.clone(),
            version: AtomicU64::new(0),
            heartbeat: Mutex::new(None),
        };
        let job_name = job.to_string();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                if let Err(e) = store.write_lease(&job_name, &me).await {
                    tracing::warn!("renewing the job's lease: {e}");
                }
            }
        });
        if let Some(old) = self.heartbeat.lock().expect("heartbeat lock").replace(task) {
            old.abort();
        }
        Ok(())
    }

    pub async fn unlock(&self, job: &str) -> Result<()> {
        if let Some(task) = self.heartbeat.lock().expect("heartbeat lock").take() {
            task.abort();
        }
        self.write_lease(job, "").await
    }
}
