//! The ClickHouse job's state: `backfill_chunks` (ReplacingMergeTree, read with FINAL) in the
//! job's database (or `state.schema`). One row per chunk (its definition, status, rows,
//! attempts, memory, error, staging table and partitions, and, once split, its children); one
//! row per job (`chunk = ''`: status, spec hash, the job's time range); `#pause` (the pause
//! flag) and `#merges` (set while the job has the target's merges stopped). Every value is
//! written as a literal through `query_raw`: server messages may contain `?` or quotes.

use super::client::{exec, exec_repeatable, fetch_text, ident, literal, table_rows};
use crate::error::{Error, Result};
use crate::state::{JobState, Status, runner_id};
use chrono::{DateTime, Utc};
use clickhouse::Client;
use serde::{Deserialize, Deserializer};
use std::sync::atomic::{AtomicU64, Ordering};

/// A chunk's status.
pub const PENDING: &str = "pending";
pub const SPLIT: &str = "split";
pub const STAGED: &str = "staged";
pub const DONE: &str = "done";
pub const FAILED: &str = "failed";

pub const JOB_ROW: &str = "";

/// A text field of the job row's `def` (the JSON it keeps of its first start: `target`,
/// `cut`, `from`, `to`, `home`), if the records hold a job row and it has that field.
pub fn job_def(records: &[Record], field: &str) -> Option<String> {
    let r = records.iter().find(|r| r.chunk == JOB_ROW)?;
    let v = serde_json::from_str::<serde_json::Value>(&r.def).ok()?;
    v[field].as_str().map(str::to_string)
}
pub const PAUSE_ROW: &str = "#pause";
pub const MERGES_ROW: &str = "#merges";
/// Present when the next start must restore the target and land every chunk again (written by
/// earlier versions when a replay could not recognise its parts; still honoured).
pub const START_OVER_ROW: &str = "#start-over";

/// One row of `backfill_chunks`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Record {
    pub chunk: String,
    /// The chunk's definition (JSON); for the job row, the job's time range.
    pub def: String,
    pub level: String,
    pub status: String,
    /// Rows written to the target.
    #[serde(deserialize_with = "num")]
    pub rows: u64,
    /// Rows of the source inside the chunk.
    #[serde(deserialize_with = "num")]
    pub source_rows: u64,
    #[serde(deserialize_with = "num")]
    pub attempts: u64,
    #[serde(deserialize_with = "num")]
    pub memory_bytes: u64,
    /// The server's error code of the last failed attempt (241: out of memory), 0 if none.
    #[serde(deserialize_with = "num")]
    pub code: u64,
    /// 1 once an attempt with lighter settings ran out of memory too.
    #[serde(deserialize_with = "num")]
    pub light: u64,
    pub error: String,
    pub staging: String,
    pub partitions: Vec<String>,
    /// The chunk's own rows in each of `partitions`.
    pub part_rows: Vec<u64>,
    /// For a staged chunk on 18.16: the target's highest block number before it landed.
    #[serde(deserialize_with = "int")]
    pub mark: i64,
    pub children: Vec<String>,
    pub spec_hash: String,
    pub runner: String,
    #[serde(deserialize_with = "num")]
    pub started: u64,
    #[serde(deserialize_with = "num")]
    pub updated: u64,
    #[serde(deserialize_with = "num")]
    pub finished: u64,
}

/// A signed number that JSONEachRow may quote or not.
fn int<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        I(i64),
        S(String),
    }
    match N::deserialize(d)? {
        N::I(v) => Ok(v),
        N::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

/// A number that JSONEachRow may quote (64-bit integers) or not.
fn num<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        U(u64),
        S(String),
    }
    match N::deserialize(d)? {
        N::U(v) => Ok(v),
        N::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

const COLUMNS: &str = "chunk, def, level, status, rows, source_rows, attempts, memory_bytes, \
                       code, light, error, staging, partitions, part_rows, mark, children, \
                       spec_hash, runner, started, updated, finished";

pub struct ChStore {
    client: Client,
    table: String,
    version: AtomicU64,
}

pub fn now() -> u64 {
    Utc::now().timestamp().max(0) as u64
}

fn time(t: u64) -> Option<DateTime<Utc>> {
    (t > 0)
        .then(|| DateTime::from_timestamp(t as i64, 0))
        .flatten()
}

fn array(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| literal(s)).collect();
    format!("[{}]", quoted.join(", "))
}

impl ChStore {
    pub fn new(client: Client, database: &str) -> ChStore {
        ChStore {
            client,
            table: format!("{}.backfill_chunks", ident(database)),
            version: AtomicU64::new(0),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// A version above every earlier one written by this process (ReplacingMergeTree keeps
    /// the row with the highest version).
    fn next_version(&self) -> u64 {
        let wall = Utc::now().timestamp_nanos_opt().unwrap_or(0).max(0) as u64;
        let prev = self.version.fetch_max(wall, Ordering::SeqCst).max(wall);
        self.version.fetch_add(1, Ordering::SeqCst).max(prev) + 1
    }

    pub async fn exists(&self) -> Result<bool> {
        let (db, name) = self.table.split_once('.').expect("qualified");
        let sql = format!(
            "SELECT name FROM system.tables WHERE database = {} AND name = {}",
            literal(db.trim_matches('`')),
            literal(name.trim_matches('`'))
        );
        Ok(!table_rows(&self.client, &sql, "reading the job's state")
            .await?
            .is_empty())
    }

    pub async fn ensure(&self) -> Result<()> {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} (
                job String, chunk String, def String, level String, status String,
                rows UInt64, source_rows UInt64, attempts UInt32, memory_bytes UInt64,
                code UInt32, light UInt8, error String, staging String, partitions Array(String),
                part_rows Array(UInt64), mark Int64, children Array(String), spec_hash String,
                runner String,
                started DateTime, updated DateTime, finished DateTime, version UInt64
             ) ENGINE = ReplacingMergeTree(version) ORDER BY (job, chunk)",
            self.table
        );
        exec_repeatable(&self.client, &sql, "creating the job's state table").await
    }

    /// Every record of a job, latest version of each (none without the table).
    pub async fn records(&self, job: &str) -> Result<Vec<Record>> {
        if !self.exists().await? {
            return Ok(Vec::new());
        }
        let read = COLUMNS
            .replace("started", "toUInt32(started) AS started")
            .replace("updated", "toUInt32(updated) AS updated")
            .replace("finished", "toUInt32(finished) AS finished");
        let sql = format!(
            "SELECT {read} FROM {} FINAL WHERE job = {} ORDER BY chunk",
            self.table,
            literal(job)
        );
        let bytes = self
            .client
            .query_raw(&sql)
            .with_setting("output_format_json_quote_64bit_integers", "0")
            .fetch_bytes("JSONEachRow")
            .map_err(|e| super::errors::ch_error("reading the job's state", &e))?
            .collect()
            .await
            .map_err(|e| super::errors::ch_error("reading the job's state", &e))?;
        let text = String::from_utf8_lossy(&bytes);
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .map_err(|e| Error::fatal(format!("reading the job's state: {e}: {l}")))
            })
            .collect()
    }

    /// Whether the job's row `chunk` has status `status` (the pause flag), reading only it.
    pub async fn flag(&self, job: &str, chunk: &str, status: &str) -> Result<bool> {
        if !self.exists().await? {
            return Ok(false);
        }
        let sql = format!(
            "SELECT count() FROM {} FINAL WHERE job = {} AND chunk = {} AND status = {}",
            self.table,
            literal(job),
            literal(chunk),
            literal(status)
        );
        Ok(fetch_text(&self.client, &sql, "reading the job's state")
            .await?
            .trim()
            != "0")
    }

    /// Write records (new versions of their rows) in one INSERT: one block, all or nothing.
    pub async fn put(&self, job: &str, records: &[&Record]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let values: Vec<String> = records
            .iter()
            .map(|r| {
                format!(
                    "({}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, [{}], {}, {}, {}, {}, {}, {}, {}, {})",
                    literal(job),
                    literal(&r.chunk),
                    literal(&r.def),
                    literal(&r.level),
                    literal(&r.status),
                    r.rows,
                    r.source_rows,
                    r.attempts.min(u64::from(u32::MAX)),
                    r.memory_bytes,
                    r.code.min(u64::from(u32::MAX)),
                    r.light.min(1),
                    literal(&r.error),
                    literal(&r.staging),
                    array(&r.partitions),
                    r.part_rows
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    r.mark,
                    array(&r.children),
                    literal(&r.spec_hash),
                    literal(&r.runner),
                    r.started.min(u64::from(u32::MAX)),
                    r.updated.max(now()).min(u64::from(u32::MAX)),
                    r.finished.min(u64::from(u32::MAX)),
                    self.next_version()
                )
            })
            .collect();
        let sql = format!(
            "INSERT INTO {} (job, {COLUMNS}, version) VALUES {}",
            self.table,
            values.join(", ")
        );
        exec(&self.client, &sql, "writing the job's state").await
    }

    /// Delete a job's rows and wait for the mutation (18.16 has no mutations_sync).
    pub async fn forget(&self, job: &str) -> Result<()> {
        if !self.exists().await? {
            return Ok(());
        }
        let sql = format!(
            "ALTER TABLE {} DELETE WHERE job = {}",
            self.table,
            literal(job)
        );
        exec(&self.client, &sql, "forgetting the job's state").await?;
        let (db, name) = self.table.split_once('.').expect("qualified");
        let pending = format!(
            "SELECT count() FROM system.mutations WHERE database = {} AND table = {} AND is_done = 0",
            literal(db.trim_matches('`')),
            literal(name.trim_matches('`'))
        );
        for _ in 0..600 {
            if fetch_text(&self.client, &pending, "waiting for the reset")
                .await?
                .trim()
                == "0"
            {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Err(Error::fatal(
            "the reset's DELETE mutation did not finish in 60s",
        ))
    }
}

/// The job's state in the engine's terms, from its records.
pub fn job_state(job: &str, records: &[Record], live: bool) -> Option<JobState> {
    let row = records.iter().find(|r| r.chunk == JOB_ROW)?;
    let chunks: Vec<&Record> = records
        .iter()
        .filter(|r| !r.chunk.is_empty() && !r.chunk.starts_with('#'))
        .collect();
    let done: Vec<&&Record> = chunks.iter().filter(|r| r.status == DONE).collect();
    let stored = Status::parse(&row.status);
    let status = match stored {
        Status::Done => Status::Done,
        _ if live => Status::Running,
        Status::Running => Status::Stopped,
        s => s,
    };
    let paused = records
        .iter()
        .any(|r| r.chunk == PAUSE_ROW && r.status == "paused");
    Some(JobState {
        job: job.into(),
        status,
        paused,
        resume: Some(if done.is_empty() && chunks.is_empty() {
            "at the start".into()
        } else {
            format!("{} chunk(s) done", done.len())
        }),
        cursor: done.iter().map(|r| r.chunk.clone()).max(),
        keys_done: done.iter().map(|r| r.source_rows as i64).sum(),
        rows_done: done.iter().map(|r| r.rows as i64).sum(),
        batches_done: done.len() as i64,
        units_total: chunks.len() as i64,
        units_done: done.len() as i64,
        workers_active: i64::from(live),
        spec_hash: row.spec_hash.clone(),
        started_at: time(row.started),
        updated_at: time(row.updated),
        finished_at: time(row.finished),
        last_error: (!row.error.is_empty()).then(|| row.error.clone()),
        throttled: None,
        runner: (!row.runner.is_empty()).then(|| row.runner.clone()),
        ..JobState::default()
    })
}

/// A fresh job row.
pub fn job_row(spec_hash: &str, status: &str, range: &str, started: u64) -> Record {
    Record {
        chunk: JOB_ROW.into(),
        def: range.into(),
        status: status.into(),
        spec_hash: spec_hash.into(),
        runner: runner_id(),
        started,
        updated: now(),
        ..Record::default()
    }
}
