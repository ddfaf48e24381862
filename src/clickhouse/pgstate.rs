//! A ClickHouse job's state in Postgres (`clickhouse.state_url`), for teams that run both:
//! - `<state.schema>.clickhouse_chunks`: the same records as `backfill_chunks` (`store.rs`),
//!   one row per (job, chunk), written by upserts;
//! - `<state.schema>.clickhouse_targets`: which job keeps a target between its runs (until it
//!   is done or reset), so that another job never lands into a target whose chunks are half
//!   done;
//! - the runner's lock: a session advisory lock keyed by the target (`database.table`), held on
//!   a connection of its own for the whole run. A killed runner's session ends with its process,
//!   and its lock with it: no lease, no heartbeat, no TTL. Every state write of the run goes
//!   through that connection (the fence): once it is lost, nothing more is recorded, and a
//!   landing starts only after the lock was seen still held on it.
//!
//! The tables are created by a run (or `pause`, `reset`) only; `plan`, `status` and `verify`
//! read through sessions whose transactions are read-only.

use super::lock::{gone_here, me};
use super::store::{JOB_ROW, Record, now};
use crate::error::{Error, Result, StopReason};
use crate::postgres::errors::{db_error, describe};
use crate::postgres::{advisory, connect};
use chrono::{DateTime, Utc};
use deadpool_postgres::{ClientWrapper, Object, Pool};
use postgres_types::ToSql;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// How long to wait for the session of a runner that died on this host to end (its server
/// notices the closed socket at once; this only covers the moment in between).
const DEAD_SESSION_WAIT: Duration = Duration::from_secs(15);
/// How long any held lock is tried again before it is called held.
const BRIEF_WAIT: Duration = Duration::from_secs(1);

/// The store: a pool for reads (and writes outside a run), and while a run holds the target's
/// lock, that lock's connection for every write.
pub struct PgState {
    pool: Pool,
    url: String,
    schema: String,
    fence: std::sync::Mutex<Option<Arc<ClientWrapper>>>,
}

fn ts(t: u64) -> Option<DateTime<Utc>> {
    (t > 0)
        .then(|| DateTime::from_timestamp(t as i64, 0))
        .flatten()
}

fn secs(t: Option<DateTime<Utc>>) -> u64 {
    t.map_or(0, |t| t.timestamp().max(0) as u64)
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn uint(v: i64) -> u64 {
    v.max(0) as u64
}

/// The lock's stop: this runner no longer holds the target (its lock connection is gone).
fn lock_lost(why: impl std::fmt::Display) -> Error {
    Error::Stopped(StopReason::LockLost(format!(
        "the target's lock in Postgres; {why}"
    )))
}

/// How long a store session waits for a lock (a migration's on the store's tables, say)
/// before its statement fails and the run stops, rather than hang for as long as it is held.
const STORE_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

const COLUMNS: &str = "chunk, def, level, status, rows, source_rows, attempts, memory_bytes, \
                       code, light, error, staging, partitions, part_rows, mark, children, \
                       spec_hash, runner, started, updated, finished";

impl PgState {
    /// A store in `schema` of the database at `url`; `read_only` sessions (plan, status,
    /// verify) cannot write, whatever happens. Connects lazily.
    pub fn open(url: &str, schema: &str, job: &str, read_only: bool) -> Result<PgState> {
        Ok(PgState {
            pool: connect::pool(url, job, read_only, 4, STORE_LOCK_TIMEOUT)?,
            url: url.to_string(),
            schema: schema.to_string(),
            fence: std::sync::Mutex::new(None),
        })
    }

    pub fn chunks_table(&self) -> String {
        format!("{}.clickhouse_chunks", self.schema)
    }

    fn targets_table(&self) -> String {
        format!("{}.clickhouse_targets", self.schema)
    }

    async fn conn(&self) -> Result<Object> {
        connect::get(&self.pool, &self.url).await
    }

    /// A connection of its own, out of the pool: closed (never reused) when dropped.
    async fn own_conn(&self) -> Result<ClientWrapper> {
        Ok(Object::take(self.conn().await?))
    }

    fn fence(&self) -> Option<Arc<ClientWrapper>> {
        self.fence.lock().expect("fence lock").clone()
    }

    fn set_fence(&self, c: Option<Arc<ClientWrapper>>) {
        *self.fence.lock().expect("fence lock") = c;
    }

    async fn exists_on(&self, c: &Client) -> Result<bool> {
        let row = c
            .query_one(
                "SELECT to_regclass(quote_ident($1) || '.clickhouse_chunks') IS NOT NULL
                    AND to_regclass(quote_ident($1) || '.clickhouse_targets') IS NOT NULL",
                &[&self.schema],
            )
            .await
            .map_err(|e| db_error("reading the job's state", &e))?;
        Ok(row.get(0))
    }

    async fn ensure_on(&self, c: &Client) -> Result<()> {
        if self.exists_on(c).await? {
            return Ok(());
        }
        let s = &self.schema;
        let ddl = format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock(hashtext('backfill state ddl'));
             CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.clickhouse_chunks (
                 job          text NOT NULL,
                 chunk        text NOT NULL,
                 def          text NOT NULL DEFAULT '',
                 level        text NOT NULL DEFAULT '',
                 status       text NOT NULL DEFAULT '',
                 rows         bigint NOT NULL DEFAULT 0,
                 source_rows  bigint NOT NULL DEFAULT 0,
                 attempts     bigint NOT NULL DEFAULT 0,
                 memory_bytes bigint NOT NULL DEFAULT 0,
                 code         bigint NOT NULL DEFAULT 0,
                 light        bigint NOT NULL DEFAULT 0,
                 error        text NOT NULL DEFAULT '',
                 staging      text NOT NULL DEFAULT '',
                 partitions   text[] NOT NULL DEFAULT '{{}}',
                 part_rows    bigint[] NOT NULL DEFAULT '{{}}',
                 mark         bigint NOT NULL DEFAULT 0,
                 children     text[] NOT NULL DEFAULT '{{}}',
                 spec_hash    text NOT NULL DEFAULT '',
                 runner       text NOT NULL DEFAULT '',
                 started      timestamptz,
                 updated      timestamptz,
                 finished     timestamptz,
                 PRIMARY KEY (job, chunk)
             );
             CREATE TABLE IF NOT EXISTS {s}.clickhouse_targets (
                 target text PRIMARY KEY,
                 job    text NOT NULL,
                 runner text NOT NULL,
                 since  timestamptz NOT NULL DEFAULT now()
             );
             COMMIT;"
        );
        let result = c.batch_execute(&ddl).await;
        if result.is_err() {
            let _ = c.batch_execute("ROLLBACK").await;
        }
        result.map_err(|e| db_error("creating the job's state tables", &e))
    }

    /// Create the tables (a run, `pause`, `reset`; never plan, status or verify).
    pub async fn ensure(&self) -> Result<()> {
        let c = self.conn().await?;
        self.ensure_on(&c).await
    }

    /// Every record of a job (none without the tables). Reads only.
    pub async fn records(&self, job: &str) -> Result<Vec<Record>> {
        let c = self.conn().await?;
        if !self.exists_on(&c).await? {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE job = $1 ORDER BY chunk",
            self.chunks_table()
        );
        let rows = c
            .query(&sql, &[&job])
            .await
            .map_err(|e| db_error("reading the job's state", &e))?;
        Ok(rows
            .iter()
            .map(|r| Record {
                chunk: r.get(0),
                def: r.get(1),
                level: r.get(2),
                status: r.get(3),
                rows: uint(r.get(4)),
                source_rows: uint(r.get(5)),
                attempts: uint(r.get(6)),
                memory_bytes: uint(r.get(7)),
                code: uint(r.get(8)),
                light: uint(r.get(9)),
                error: r.get(10),
                staging: r.get(11),
                partitions: r.get(12),
                part_rows: r.get::<_, Vec<i64>>(13).into_iter().map(uint).collect(),
                mark: r.get(14),
                children: r.get(15),
                spec_hash: r.get(16),
                runner: r.get(17),
                started: secs(r.get(18)),
                updated: secs(r.get(19)),
                finished: secs(r.get(20)),
            })
            .collect())
    }

    /// Whether the job's row `chunk` has status `status` (the pause flag). Reads only.
    pub async fn flag(&self, job: &str, chunk: &str, status: &str) -> Result<bool> {
        let c = self.conn().await?;
        if !self.exists_on(&c).await? {
            return Ok(false);
        }
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE job = $1 AND chunk = $2 AND status = $3)",
            self.chunks_table()
        );
        let row = c
            .query_one(&sql, &[&job, &chunk, &status])
            .await
            .map_err(|e| db_error("reading the job's state", &e))?;
        Ok(row.get(0))
    }

    /// Run one statement: through the lock's connection while a run holds it (a lost
    /// connection stops the run: it no longer owns the target), else through the pool.
    async fn write(&self, what: &str, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<()> {
        if let Some(c) = self.fence() {
            if c.is_closed() {
                return Err(lock_lost("its connection was closed"));
            }
            return match c.execute(sql, params).await {
                Ok(_) => Ok(()),
                Err(e) if c.is_closed() || e.is_closed() => Err(lock_lost(format!(
                    "its connection failed: {}",
                    describe(&e)
                ))),
                Err(e) => Err(db_error(what, &e)),
            };
        }
        let c = self.conn().await?;
        c.execute(sql, params)
            .await
            .map(|_| ())
            .map_err(|e| db_error(what, &e))
    }

    /// Write records (upserts) in one statement: all or nothing.
    pub async fn put(&self, job: &str, records: &[&Record]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        struct Row {
            ints: [i64; 8],
            part_rows: Vec<i64>,
            times: [Option<DateTime<Utc>>; 3],
        }
        let rows: Vec<Row> = records
            .iter()
            .map(|r| Row {
                ints: [
                    int(r.rows),
                    int(r.source_rows),
                    int(r.attempts),
                    int(r.memory_bytes),
                    int(r.code),
                    int(r.light.min(1)),
                    r.mark,
                    0,
                ],
                part_rows: r.part_rows.iter().map(|&v| int(v)).collect(),
                times: [ts(r.started), ts(r.updated.max(now())), ts(r.finished)],
            })
            .collect();
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        let mut values = Vec::new();
        for (r, row) in records.iter().zip(&rows) {
            let first = params.len() + 1;
            params.push(&job);
            params.push(&r.chunk);
            params.push(&r.def);
            params.push(&r.level);
            params.push(&r.status);
            for v in &row.ints[..6] {
                params.push(v);
            }
            params.push(&r.error);
            params.push(&r.staging);
            params.push(&r.partitions);
            params.push(&row.part_rows);
            params.push(&row.ints[6]);
            params.push(&r.children);
            params.push(&r.spec_hash);
            params.push(&r.runner);
            for t in &row.times {
                params.push(t);
            }
            let marks: Vec<String> = (first..params.len() + 1).map(|i| format!("${i}")).collect();
            values.push(format!("({})", marks.join(", ")));
        }
        let set: Vec<String> = COLUMNS
            .split(", ")
            .skip(1)
            .map(|c| format!("{c} = EXCLUDED.{c}"))
            .collect();
        let sql = format!(
            "INSERT INTO {} (job, {COLUMNS}) VALUES {}
             ON CONFLICT (job, chunk) DO UPDATE SET {}",
            self.chunks_table(),
            values.join(", "),
            set.join(", ")
        );
        self.write("writing the job's state", &sql, &params).await
    }

    /// Delete a job's records.
    pub async fn forget(&self, job: &str) -> Result<()> {
        let c = self.conn().await?;
        if !self.exists_on(&c).await? {
            return Ok(());
        }
        let sql = format!("DELETE FROM {} WHERE job = $1", self.chunks_table());
        self.write("forgetting the job's state", &sql, &[&job])
            .await
    }

    /// Who keeps `job` out of `target` right now, if anyone: another job that keeps it, or a
    /// live runner holding its lock. Reads only.
    pub async fn held_by_other(&self, target: &str, job: &str) -> Result<Option<String>> {
        let c = self.conn().await?;
        let started = Instant::now();
        loop {
            let owner = self.owner(&c, target).await?;
            if let Some((j, runner)) = &owner
                && j != job
                && !self.done_and_idle(&c, target, j).await?
            {
                return Ok(Some(other_job(j, runner)));
            }
            let holders = holders(&c, &lock_key(target)).await?;
            if holders.is_empty() {
                return Ok(None);
            }
            // A runner that died on this host: its session ends in a moment.
            let dead = owner.as_ref().is_some_and(|(_, r)| gone_here(r));
            if !dead || started.elapsed() >= DEAD_SESSION_WAIT {
                return Ok(Some(describe_holder(owner.as_ref(), &holders)));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether job `j`, which keeps `target`, is done and no runner holds the target's lock:
    /// its clean-up was cut short (a lost answer, a kill after its record), and the target is
    /// free for any job. Reads only.
    async fn done_and_idle(&self, c: &Client, target: &str, j: &str) -> Result<bool> {
        Ok(
            holders(c, &lock_key(target)).await?.is_empty()
                && self.flag(j, JOB_ROW, "done").await?,
        )
    }

    /// Whether a runner of `job` holds the target's lock right now (for `status`). Reads only.
    pub async fn running(&self, target: &str, job: &str) -> Result<bool> {
        let c = self.conn().await?;
        let ours = self.owner(&c, target).await?.is_some_and(|(j, _)| j == job);
        Ok(ours && !holders(&c, &lock_key(target)).await?.is_empty())
    }

    async fn owner(&self, c: &Client, target: &str) -> Result<Option<(String, String)>> {
        if !self.exists_on(c).await? {
            return Ok(None);
        }
        let sql = format!(
            "SELECT job, runner FROM {} WHERE target = $1",
            self.targets_table()
        );
        Ok(c.query_opt(&sql, &[&target])
            .await
            .map_err(|e| db_error("reading the target's owner", &e))?
            .map(|r| (r.get(0), r.get(1))))
    }

    /// Take the target's lock for `job` on a connection of its own, or say who holds it
    /// (`Err(Stopped(LockHeld))`). `own` records the job as the target's keeper (a run; a
    /// reset only frees it). `then` runs once the lock is held and no other job keeps the
    /// target, before the keeper is recorded: what it refuses leaves no keeper behind.
    pub async fn acquire<T>(
        &self,
        target: &str,
        job: &str,
        own: bool,
        then: impl AsyncFnOnce() -> Result<T>,
    ) -> Result<(PgLock, T)> {
        let c = Arc::new(self.own_conn().await?);
        let key = lock_key(target);
        let started = Instant::now();
        loop {
            if advisory::try_lock(&c, &key, false, "taking the target's lock").await? {
                break;
            }
            let owner = self.owner(&c, target).await?;
            // A runner that died on this host: its session ends in a moment.
            let dead = owner.as_ref().is_some_and(|(_, r)| gone_here(r));
            let wait = if dead { DEAD_SESSION_WAIT } else { BRIEF_WAIT };
            if started.elapsed() >= wait {
                let holders = holders(&c, &key).await?;
                return Err(Error::Stopped(StopReason::LockHeld(describe_holder(
                    owner.as_ref(),
                    &holders,
                ))));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let lock = PgLock {
            client: c.clone(),
            key,
            target: target.to_string(),
            job: job.to_string(),
            targets: self.targets_table(),
        };
        let kept = async {
            self.ensure_on(&c).await?;
            if let Some((j, runner)) = self.owner(&c, target).await?
                && j != job
            {
                // This session holds the target's lock: no runner of `j` is left.
                if !self.flag(&j, JOB_ROW, "done").await? {
                    return Err(Error::Stopped(StopReason::LockHeld(other_job(&j, &runner))));
                }
                tracing::warn!(
                    "job {j:?} is done but still kept the target (its clean-up was cut short): \
                     it is free for job {job:?}"
                );
                if !own {
                    let sql = format!(
                        "DELETE FROM {} WHERE target = $1 AND job = $2",
                        self.targets_table()
                    );
                    c.execute(&sql, &[&target, &j])
                        .await
                        .map_err(|e| db_error("freeing the target", &e))?;
                }
            }
            let then = then().await?;
            if own {
                let sql = format!(
                    "INSERT INTO {} (target, job, runner) VALUES ($1, $2, $3)
                     ON CONFLICT (target) DO UPDATE SET job = EXCLUDED.job,
                        runner = EXCLUDED.runner, since = now()",
                    self.targets_table()
                );
                c.execute(&sql, &[&target, &job, &me()])
                    .await
                    .map_err(|e| db_error("keeping the target", &e))?;
            }
            Ok(then)
        }
        .await;
        let then = match kept {
            Ok(then) => then,
            Err(e) => {
                let _ = lock.unlock().await;
                return Err(e);
            }
        };
        if own {
            self.set_fence(Some(c));
        }
        Ok((lock, then))
    }

    /// The run let go of its lock: writes go through the pool again.
    pub fn unfence(&self) {
        self.set_fence(None);
    }
}

/// The advisory-lock key of a target (`database.table`).
fn lock_key(target: &str) -> String {
    format!("backfill:clickhouse:{target}")
}

fn other_job(job: &str, runner: &str) -> String {
    format!(
        "job {job:?} (runner {runner}): it writes the same target, and one job at a time may; \
         it keeps the target until it is done or `backfill reset`"
    )
}

fn describe_holder(owner: Option<&(String, String)>, holders: &[String]) -> String {
    let sessions = if holders.is_empty() {
        "a session that has just ended".to_string()
    } else {
        holders.join(", ")
    };
    match owner {
        Some((job, runner)) => format!(
            "runner {runner} of job {job:?}, holding the target's lock in Postgres ({sessions})"
        ),
        None => format!("the target's lock in Postgres is held by {sessions}"),
    }
}

/// The sessions holding the advisory lock `key` in this database.
async fn holders(c: &Client, key: &str) -> Result<Vec<String>> {
    const HOLDERS: &str = "
        SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.client_addr::text, 'local'),
               extract(epoch FROM now() - a.backend_start)::bigint
          FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND l.classid = ((hashtextextended($1, 0) >> 32) & 4294967295)::bigint::oid
           AND l.objid = (hashtextextended($1, 0) & 4294967295)::bigint::oid
           AND l.objsubid = 1";
    Ok(c.query(HOLDERS, &[&key])
        .await
        .map_err(|e| db_error("finding the target's lock holder", &e))?
        .iter()
        .map(|r| {
            format!(
                "backend pid {} ({}, from {}, connected {}s ago)",
                r.get::<_, i32>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, i64>(3)
            )
        })
        .collect())
}

/// A held target lock: a session advisory lock on a connection of its own.
pub struct PgLock {
    client: Arc<ClientWrapper>,
    key: String,
    target: String,
    job: String,
    targets: String,
}

impl PgLock {
    /// Whether this runner still holds the lock; else why not: its connection is gone (a
    /// restart, a terminated session, a network cut) or the lock is not held on it any more.
    /// Asks the server, so that a landing never starts on a lock that is already gone.
    pub async fn check(&self) -> Result<()> {
        if self.client.is_closed() {
            return Err(lock_lost("its connection was closed"));
        }
        let params: [&(dyn ToSql + Sync); 1] = [&self.key];
        let held = self.client.query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_locks
                             WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()
                               AND classid = ((hashtextextended($1, 0) >> 32) & 4294967295)::bigint::oid
                               AND objid = (hashtextextended($1, 0) & 4294967295)::bigint::oid
                               AND objsubid = 1)",
            &params,
        );
        match tokio::time::timeout(Duration::from_secs(30), held).await {
            Ok(Ok(r)) if r.get::<_, bool>(0) => Ok(()),
            Ok(Ok(_)) => Err(lock_lost("the lock is no longer held on it")),
            Ok(Err(e)) => Err(lock_lost(format!(
                "its connection failed: {}",
                describe(&e)
            ))),
            Err(_) => Err(lock_lost("it did not answer within 30s")),
        }
    }

    async fn unlock(&self) -> Result<()> {
        // Released here, not only by closing the session: the server ends a closed session a
        // moment after the client has gone, and a run started right after would find it held.
        advisory::unlock(
            &self.client,
            &self.key,
            false,
            "releasing the target's lock",
        )
        .await
    }

    /// The run ends; the job keeps the target (for its next run only).
    pub async fn release(&self) -> Result<()> {
        self.unlock().await
    }

    /// The job is done (or reset): the target is free for any job.
    pub async fn free(&self) -> Result<()> {
        let sql = format!(
            "DELETE FROM {} WHERE target = $1 AND job = $2",
            self.targets
        );
        self.client
            .execute(&sql, &[&self.target, &self.job])
            .await
            .map_err(|e| db_error("freeing the target", &e))?;
        self.unlock().await
    }
}
