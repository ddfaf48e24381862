//! The Postgres job's tables, in a schema of the target database (`backfill` by default), so
//! every batch commits together with its checkpoint:
//! - `jobs`: one row per job (status, spec hash, pause flag, times, last error, runner);
//! - `ranges`: the job's key ranges `(lo, hi]`, each with its cursor, counters, status, and the
//!   claim that fences its writes (`epoch`, from the sequence `epochs`, new at every claim);
//! - `skipped_keys`: keys passed over by SKIP LOCKED, waiting for their range's retry pass.
//!
//! Older stores (one cursor per job, no ranges) are upgraded in place: such a job continues as
//! one range at its old cursor.

use super::errors::db_error;
use crate::error::{Error, Result, StopReason};
use crate::state::{JobState, Status, UnitState};
use tokio_postgres::Client;

/// The schemas of this database that hold a checkpoint store this session may read: a `jobs`
/// table with what a job's record needs, of the types the store gives them (an application's
/// own `jobs` table with other types would fail the query that reads them all). Stores of
/// earlier versions count too: without `ranges` (one cursor per job) or without `walks` (read
/// through `to_jsonb`, absent as NULL), as a store is until this version first opens it.
pub const STORES: &str = "
    SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relname = 'jobs' AND c.relkind IN ('r', 'p')
       AND has_schema_privilege(n.oid, 'USAGE') AND has_table_privilege(c.oid, 'SELECT')
       AND (SELECT count(*) FROM pg_attribute a
             WHERE a.attrelid = c.oid AND NOT a.attisdropped
               AND ((a.attname IN ('job', 'status', 'spec_hash')
                     AND a.atttypid = 'text'::regtype)
                    OR (a.attname = 'updated_at' AND a.atttypid = 'timestamptz'::regtype))) = 4
       AND NOT EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = c.oid AND NOT a.attisdropped
                          AND a.attname = 'walks' AND a.atttypid <> 'text'::regtype)
     ORDER BY 1";

/// A schema's name as an SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The SQL of the store, for one schema.
#[derive(Debug, Clone)]
pub struct Store {
    pub schema: String,
}

/// One range row as the store keeps it.
#[derive(Debug, Clone)]
pub struct RangeRow {
    pub range_no: i32,
    pub lo: Option<String>,
    pub hi: Option<String>,
    pub cursor: Option<String>,
    pub status: String,
    pub keys_done: i64,
    pub rows_done: i64,
    pub batches_done: i64,
    pub rows_retried: i64,
    pub pending_retry: i64,
    pub owner: Option<String>,
}

/// A range's status.
pub const RETRYING: &str = "retrying";
pub const DONE: &str = "done";

impl Store {
    pub fn new(schema: &str) -> Store {
        Store {
            schema: schema.to_string(),
        }
    }

    pub fn jobs(&self) -> String {
        format!("{}.jobs", self.schema)
    }

    pub fn ranges(&self) -> String {
        format!("{}.ranges", self.schema)
    }

    pub fn skipped(&self) -> String {
        format!("{}.skipped_keys", self.schema)
    }

    /// Advisory-lock key of a job's worker slot, range, or the job itself.
    pub fn lock_key(&self, job: &str, what: &str) -> String {
        format!("backfill:{}:{job}:{what}", self.schema)
    }

    /// Whether the store's tables exist with every column the read paths use (without creating
    /// them): what `status`, `plan`, `reset` and `load` need.
    pub async fn exists(&self, c: &Client) -> Result<bool> {
        self.has_column(c, "throttled").await
    }

    /// The tables exist and `jobs` has `column`.
    async fn has_column(&self, c: &Client, column: &str) -> Result<bool> {
        let row = c
            .query_one(
                "SELECT to_regclass(quote_ident($1) || '.jobs') IS NOT NULL
                    AND to_regclass(quote_ident($1) || '.ranges') IS NOT NULL
                    AND EXISTS (SELECT 1 FROM information_schema.columns
                                 WHERE table_schema = $1 AND table_name = 'jobs'
                                   AND column_name = $2)",
                &[&self.schema, &column],
            )
            .await
            .map_err(|e| db_error("reading the checkpoint store", &e))?;
        Ok(row.get(0))
    }

    /// Create or upgrade the tables (idempotent; serialized by a transaction-level lock).
    pub async fn ensure(&self, c: &Client) -> Result<()> {
        // The newest column: a store without it is upgraded in place (the read paths above
        // need only what `exists` checks, so an older store stays visible to them).
        if self.has_column(c, "walks").await? {
            return Ok(());
        }
        let s = &self.schema;
        let ddl = format!(
            "BEGIN;
             -- Runners starting together wait here for the first one's DDL, a short
             -- transaction: longer than the session's lock_timeout, which is for other
             -- sessions' locks.
             SET LOCAL lock_timeout = '60s';
             SELECT pg_advisory_xact_lock(hashtext('backfill state ddl'));
             CREATE SCHEMA IF NOT EXISTS {s};
             CREATE SEQUENCE IF NOT EXISTS {s}.epochs;
             CREATE TABLE IF NOT EXISTS {s}.jobs (
                 job          text PRIMARY KEY,
                 status       text NOT NULL,
                 cursor       text,
                 keys_done    bigint NOT NULL DEFAULT 0,
                 rows_done    bigint NOT NULL DEFAULT 0,
                 batches_done bigint NOT NULL DEFAULT 0,
                 rows_retried bigint NOT NULL DEFAULT 0,
                 spec_hash    text NOT NULL,
                 started_at   timestamptz,
                 updated_at   timestamptz,
                 finished_at  timestamptz,
                 last_error   text,
                 runner       text
             );
             ALTER TABLE {s}.jobs ADD COLUMN IF NOT EXISTS paused boolean NOT NULL DEFAULT false;
             ALTER TABLE {s}.jobs ADD COLUMN IF NOT EXISTS throttled text;
             ALTER TABLE {s}.jobs ADD COLUMN IF NOT EXISTS walks text;
             CREATE TABLE IF NOT EXISTS {s}.ranges (
                 job          text NOT NULL,
                 range_no     int NOT NULL,
                 lo           text,
                 hi           text,
                 cursor       text,
                 status       text NOT NULL DEFAULT 'pending',
                 epoch        bigint NOT NULL DEFAULT 0,
                 owner        text,
                 heartbeat    timestamptz,
                 keys_done    bigint NOT NULL DEFAULT 0,
                 rows_done    bigint NOT NULL DEFAULT 0,
                 batches_done bigint NOT NULL DEFAULT 0,
                 rows_retried bigint NOT NULL DEFAULT 0,
                 PRIMARY KEY (job, range_no)
             );
             CREATE TABLE IF NOT EXISTS {s}.skipped_keys (
                 job text NOT NULL,
                 key text NOT NULL,
                 PRIMARY KEY (job, key)
             );
             ALTER TABLE {s}.skipped_keys ADD COLUMN IF NOT EXISTS range_no int NOT NULL DEFAULT 0;
             COMMIT;"
        );
        let result = c.batch_execute(&ddl).await;
        if result.is_err() {
            let _ = c.batch_execute("ROLLBACK").await;
        }
        result.map_err(|e| db_error("creating the checkpoint store", &e))
    }

    /// The job's record with its totals over all ranges; `None` without a store or record.
    /// `live` = workers holding a slot now. Reads only.
    pub async fn load(&self, c: &Client, job: &str, live: i64) -> Result<Option<JobState>> {
        if !self.exists(c).await? {
            return Ok(None);
        }
        let sql = format!(
            "SELECT j.status, j.spec_hash, j.started_at, j.updated_at, j.finished_at,
                    j.last_error, j.runner, j.paused, j.cursor,
                    coalesce(sum(r.keys_done), j.keys_done)::bigint,
                    coalesce(sum(r.rows_done), j.rows_done)::bigint,
                    coalesce(sum(r.batches_done), j.batches_done)::bigint,
                    coalesce(sum(r.rows_retried), j.rows_retried)::bigint,
                    count(r.range_no), count(r.range_no) FILTER (WHERE r.status = 'done'),
                    (SELECT count(*) FROM {sk} s WHERE s.job = j.job),
                    (SELECT x.cursor FROM {rg} x
                      WHERE x.job = j.job AND x.cursor IS DISTINCT FROM x.lo
                      ORDER BY x.range_no DESC LIMIT 1),
                    bool_and(CASE WHEN r.range_no < f.n THEN r.status = 'done'
                                  WHEN r.range_no > f.n THEN r.cursor IS NOT DISTINCT FROM r.lo
                                  ELSE true END),
                    j.throttled
               FROM {jobs} j LEFT JOIN {rg} r ON r.job = j.job
                    LEFT JOIN LATERAL (SELECT coalesce(max(y.range_no), -1) AS n FROM {rg} y
                                        WHERE y.job = j.job AND y.cursor IS DISTINCT FROM y.lo) f
                           ON true
              WHERE j.job = $1
              GROUP BY j.job, f.n",
            jobs = self.jobs(),
            rg = self.ranges(),
            sk = self.skipped()
        );
        let Some(r) = c
            .query_opt(&sql, &[&job])
            .await
            .map_err(|e| db_error("reading the checkpoint store", &e))?
        else {
            return Ok(None);
        };
        let stored = Status::parse(r.get::<_, &str>(0));
        let (total, done): (i64, i64) = (r.get(13), r.get(14));
        let status = match stored {
            Status::Done => Status::Done,
            _ if live > 0 => Status::Running,
            // A runner that was killed leaves `running` behind: say what is true.
            Status::Running => Status::Stopped,
            s => s,
        };
        // A single worker walks the ranges in order: then one cursor says where it stands.
        let cursor: Option<String> = if total == 0 { r.get(8) } else { r.get(16) };
        let ordered = r.get::<_, Option<bool>>(17).unwrap_or(true);
        let resume = match &cursor {
            _ if total > 0 && done == total => {
                format!("nothing left ({done} of {total} ranges done)")
            }
            None => "at the start".into(),
            Some(c) if ordered => format!("after key {c}"),
            Some(_) => format!("{done} of {total} ranges done, the others part-way"),
        };
        let resume = Some(resume);
        Ok(Some(JobState {
            job: job.to_string(),
            status,
            paused: r.get(7),
            resume,
            cursor,
            keys_done: r.get(9),
            rows_done: r.get(10),
            batches_done: r.get(11),
            rows_retried: r.get(12),
            rows_pending_retry: r.get(15),
            units_total: total,
            units_done: done,
            workers_active: live,
            spec_hash: r.get(1),
            started_at: r.get(2),
            updated_at: r.get(3),
            finished_at: r.get(4),
            last_error: r.get(5),
            runner: r.get(6),
            // Only while a worker is alive: a killed runner leaves its last reason behind.
            throttled: if live > 0 { r.get(18) } else { None },
        }))
    }

    /// Every range of the job, in order (empty without a store).
    pub async fn ranges_of(&self, c: &Client, job: &str) -> Result<Vec<RangeRow>> {
        if !self.exists(c).await? {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT r.range_no, r.lo, r.hi, r.cursor, r.status, r.keys_done, r.rows_done,
                    r.batches_done, r.rows_retried,
                    (SELECT count(*) FROM {sk} s WHERE s.job = r.job AND s.range_no = r.range_no),
                    r.owner
               FROM {rg} r WHERE r.job = $1 ORDER BY r.range_no",
            rg = self.ranges(),
            sk = self.skipped()
        );
        let rows = c
            .query(&sql, &[&job])
            .await
            .map_err(|e| db_error("reading the job's ranges", &e))?;
        Ok(rows
            .iter()
            .map(|r| RangeRow {
                range_no: r.get(0),
                lo: r.get(1),
                hi: r.get(2),
                cursor: r.get(3),
                status: r.get(4),
                keys_done: r.get(5),
                rows_done: r.get(6),
                batches_done: r.get(7),
                rows_retried: r.get(8),
                pending_retry: r.get(9),
                owner: r.get(10),
            })
            .collect())
    }

    /// Set or clear the pause flag (creating the job's record if it has none yet, so a job
    /// paused before its first run waits too).
    pub async fn set_paused(&self, c: &Client, job: &str, hash: &str, paused: bool) -> Result<()> {
        self.ensure(c).await?;
        let sql = format!(
            "INSERT INTO {} AS j (job, status, spec_hash, paused, updated_at)
             VALUES ($1, 'stopped', $2, $3, now())
             ON CONFLICT (job) DO UPDATE SET paused = $3, updated_at = now()",
            self.jobs()
        );
        c.execute(&sql, &[&job, &hash, &paused])
            .await
            .map_err(|e| db_error("writing the pause flag", &e))?;
        Ok(())
    }

    /// Record why the job's workers wait for the throttle (`None`: they do not).
    pub async fn set_throttled(&self, c: &Client, job: &str, why: Option<&str>) -> Result<()> {
        let sql = format!("UPDATE {} SET throttled = $2 WHERE job = $1", self.jobs());
        c.execute(&sql, &[&job, &why])
            .await
            .map_err(|e| db_error("recording the throttle", &e))?;
        Ok(())
    }

    /// Record how a run of the job ended.
    pub async fn finish(
        &self,
        c: &Client,
        job: &str,
        status: Status,
        error: Option<&str>,
    ) -> Result<()> {
        // A job another runner concluded done stays done: this runner's own end (stopped by a
        // signal while it had nothing left to claim, or failed) is its process's exit code,
        // not the job's state. (`--rerun` and `reset` start a done job over first.)
        // `done` is written only while every range of the job is still done, in the same
        // statement: a runner that checked its ranges and then ran a slow verify must not mark
        // done a job that another runner started over meanwhile (its ranges reset, or the job
        // forgotten), or the ranges that run had not reached yet would never be walked.
        let sql = format!(
            "UPDATE {jobs} SET status = $2, last_error = $3, updated_at = now(), throttled = NULL,
                 finished_at = CASE WHEN $2 = 'done' THEN now() END
               WHERE job = $1 AND (status <> 'done' OR $2 = 'done')
                 AND ($2 <> 'done'
                      OR NOT EXISTS (SELECT 1 FROM {ranges} r WHERE r.job = $1 AND r.status <> 'done'))",
            jobs = self.jobs(),
            ranges = self.ranges(),
        );
        // Behind the job's start lock, which a --rerun's start holds through its transaction:
        // the UPDATE's snapshot is taken after such a start committed, so its NOT EXISTS sees
        // the ranges that start made. (Waiting on the jobs row alone, READ COMMITTED re-checks
        // that row but reads the ranges with the snapshot from before.)
        let key = self.lock_key(job, "start");
        let what = "writing the checkpoint store";
        c.batch_execute("BEGIN; SET LOCAL lock_timeout = '60s'")
            .await
            .map_err(|e| db_error(what, &e))?;
        let written = async {
            c.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                &[&key],
            )
            .await?;
            let n = c.execute(&sql, &[&job, &status.as_str(), &error]).await?;
            c.batch_execute("COMMIT").await?;
            Ok::<u64, tokio_postgres::Error>(n)
        }
        .await;
        let n = match written {
            Ok(n) => n,
            Err(e) => {
                let _ = c.batch_execute("ROLLBACK").await;
                return Err(db_error(what, &e));
            }
        };
        if n == 0 && status == Status::Done {
            return Err(Error::Stopped(StopReason::LockHeld(
                "another runner (the job was started over, by a --rerun or a reset, while this \
                 one checked that it was done)"
                    .into(),
            )));
        }
        Ok(())
    }

    /// Forget a job entirely. Returns whether there was anything.
    pub async fn forget(&self, c: &Client, job: &str) -> Result<bool> {
        if !self.exists(c).await? {
            return Ok(false);
        }
        let sql = format!(
            "WITH k AS (DELETE FROM {sk} WHERE job = $1),
                  r AS (DELETE FROM {rg} WHERE job = $1)
             DELETE FROM {jobs} WHERE job = $1",
            sk = self.skipped(),
            rg = self.ranges(),
            jobs = self.jobs()
        );
        let n = c
            .execute(&sql, &[&job])
            .await
            .map_err(|e| db_error("resetting the checkpoint", &e))?;
        Ok(n > 0)
    }
}

impl RangeRow {
    /// How `status` shows a range.
    pub fn unit(&self) -> UnitState {
        let bound = |b: &Option<String>| b.clone().unwrap_or_else(|| "…".into());
        UnitState {
            unit: format!(
                "range {} ({}, {}]",
                self.range_no,
                bound(&self.lo),
                bound(&self.hi)
            ),
            status: self.status.clone(),
            owner: self.owner.clone(),
            cursor: self.cursor.clone(),
            keys_done: self.keys_done,
            rows_done: self.rows_done,
            batches_done: self.batches_done,
            attempts: 0,
            pending_retry: self.pending_retry,
            note: String::new(),
        }
    }
}
