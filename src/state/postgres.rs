//! Checkpoint store in a schema of the target Postgres database (`backfill` by default), so a
//! batch and its checkpoint commit in one transaction.

use super::{JobState, StateStore, Status, runner_id};
use crate::error::Result;
use crate::postgres::errors::db_error;
use deadpool_postgres::Object;

/// The store, bound to one connection and schema.
pub struct PgStateStore {
    client: Object,
    schema: String,
}

impl PgStateStore {
    pub fn new(client: Object, schema: &str) -> Self {
        PgStateStore {
            client,
            schema: schema.to_string(),
        }
    }

    /// Whether the store's tables exist (without creating them).
    pub async fn exists(&self) -> Result<bool> {
        let row = self
            .client
            .query_one(
                "SELECT to_regclass(quote_ident($1) || '.jobs') IS NOT NULL",
                &[&self.schema],
            )
            .await
            .map_err(|e| db_error("reading the checkpoint store", &e))?;
        Ok(row.get(0))
    }
}

fn select_sql(schema: &str) -> String {
    format!(
        "SELECT j.job, j.status, j.cursor, j.keys_done, j.rows_done, j.batches_done, \
                j.rows_retried, \
                (SELECT count(*) FROM {schema}.skipped_keys s WHERE s.job = j.job), \
                j.spec_hash, j.started_at, j.updated_at, j.finished_at, j.last_error, j.runner \
           FROM {schema}.jobs j"
    )
}

fn from_row(r: &tokio_postgres::Row) -> JobState {
    JobState {
        job: r.get(0),
        status: Status::parse(r.get::<_, &str>(1)),
        cursor: r.get(2),
        keys_done: r.get(3),
        rows_done: r.get(4),
        batches_done: r.get(5),
        rows_retried: r.get(6),
        rows_pending_retry: r.get(7),
        spec_hash: r.get(8),
        started_at: r.get(9),
        updated_at: r.get(10),
        finished_at: r.get(11),
        last_error: r.get(12),
        runner: r.get(13),
    }
}

impl StateStore for PgStateStore {
    async fn ensure(&self) -> Result<()> {
        if self.exists().await? {
            return Ok(());
        }
        let s = &self.schema;
        // Serialized by a transaction-level advisory lock: two first runs must not race on DDL.
        let ddl = format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock(hashtext('backfill state ddl'));
             CREATE SCHEMA IF NOT EXISTS {s};
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
             CREATE TABLE IF NOT EXISTS {s}.skipped_keys (
                 job text NOT NULL,
                 key text NOT NULL,
                 PRIMARY KEY (job, key)
             );
             COMMIT;"
        );
        let result = self.client.batch_execute(&ddl).await;
        if result.is_err() {
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
        result.map_err(|e| db_error("creating the checkpoint store", &e))
    }

    async fn load(&self, job: &str) -> Result<Option<JobState>> {
        if !self.exists().await? {
            return Ok(None);
        }
        let sql = format!("{} WHERE j.job = $1", select_sql(&self.schema));
        let row = self
            .client
            .query_opt(&sql, &[&job])
            .await
            .map_err(|e| db_error("reading the checkpoint store", &e))?;
        Ok(row.as_ref().map(from_row))
    }

    async fn start(&self, job: &str, spec_hash: &str, restart: bool) -> Result<JobState> {
        let s = &self.schema;
        let sql = if restart {
            format!(
                "INSERT INTO {s}.jobs AS j (job, status, spec_hash, started_at, updated_at, runner)
                 VALUES ($1, 'running', $2, now(), now(), $3)
                 ON CONFLICT (job) DO UPDATE SET status = 'running', spec_hash = $2,
                     cursor = NULL, keys_done = 0, rows_done = 0, batches_done = 0,
                     rows_retried = 0, started_at = now(), updated_at = now(),
                     finished_at = NULL, last_error = NULL, runner = $3"
            )
        } else {
            format!(
                "INSERT INTO {s}.jobs AS j (job, status, spec_hash, started_at, updated_at, runner)
                 VALUES ($1, 'running', $2, now(), now(), $3)
                 ON CONFLICT (job) DO UPDATE SET status = 'running', spec_hash = $2,
                     updated_at = now(), runner = $3,
                     started_at = COALESCE(j.started_at, now())"
            )
        };
        if restart {
            let clear = format!("DELETE FROM {s}.skipped_keys WHERE job = $1");
            self.client
                .execute(&clear, &[&job])
                .await
                .map_err(|e| db_error("writing the checkpoint store", &e))?;
        }
        self.client
            .execute(&sql, &[&job, &spec_hash, &runner_id()])
            .await
            .map_err(|e| db_error("writing the checkpoint store", &e))?;
        self.load(job).await?.ok_or_else(|| {
            crate::error::Error::Preflight(format!("job {job} vanished from the store"))
        })
    }

    async fn finish(&self, job: &str, status: Status, error: Option<&str>) -> Result<()> {
        let sql = format!(
            "UPDATE {}.jobs SET status = $2, last_error = $3, updated_at = now(),
                 finished_at = CASE WHEN $2 = 'done' THEN now() END
               WHERE job = $1",
            self.schema
        );
        self.client
            .execute(&sql, &[&job, &status.as_str(), &error])
            .await
            .map_err(|e| db_error("writing the checkpoint store", &e))?;
        Ok(())
    }

    async fn reset(&self, job: &str) -> Result<bool> {
        if !self.exists().await? {
            return Ok(false);
        }
        let s = &self.schema;
        let sql = format!(
            "WITH k AS (DELETE FROM {s}.skipped_keys WHERE job = $1)
             DELETE FROM {s}.jobs WHERE job = $1"
        );
        let n = self
            .client
            .execute(&sql, &[&job])
            .await
            .map_err(|e| db_error("resetting the checkpoint", &e))?;
        Ok(n > 0)
    }

    async fn lock(&self, job: &str) -> Result<()> {
        // A session-level advisory lock keyed by the job: released by `unlock`, or when this
        // connection closes, so a killed runner never leaves it behind. A runner that has just
        // exited may still hold it for a moment while the server notices: retry briefly.
        let key = lock_key(&self.schema, job);
        for attempt in 0..LOCK_ATTEMPTS {
            let got: bool = self
                .client
                .query_one(
                    "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                    &[&key],
                )
                .await
                .map_err(|e| db_error("taking the job's runner lock", &e))?
                .get(0);
            if got {
                return Ok(());
            }
            if attempt + 1 < LOCK_ATTEMPTS {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        let holder = self
            .client
            .query_opt(
                "SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.client_addr::text, 'local'),
                        extract(epoch FROM now() - a.backend_start)::bigint
                   FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                  WHERE l.locktype = 'advisory' AND l.granted
                    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND l.classid = ((hashtextextended($1, 0) >> 32) & 4294967295)::bigint::oid
                    AND l.objid = (hashtextextended($1, 0) & 4294967295)::bigint::oid
                    AND l.objsubid = 1
                  LIMIT 1",
                &[&key],
            )
            .await
            .map_err(|e| db_error("finding the job's runner", &e))?;
        let who = match holder {
            Some(r) => format!(
                "backend pid {} ({}, from {}, connected {}s ago)",
                r.get::<_, i32>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, i64>(3)
            ),
            None => "another runner".to_string(),
        };
        Err(crate::error::Error::Stopped(
            crate::error::StopReason::LockHeld(who),
        ))
    }

    async fn unlock(&self, job: &str) -> Result<()> {
        self.client
            .execute(
                "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
                &[&lock_key(&self.schema, job)],
            )
            .await
            .map_err(|e| db_error("releasing the job's runner lock", &e))?;
        Ok(())
    }
}

/// How many times `lock` tries (100ms apart) before reporting the holder.
const LOCK_ATTEMPTS: u32 = 10;

fn lock_key(schema: &str, job: &str) -> String {
    format!("backfill:{schema}:{job}")
}

/// SQL that advances a job's checkpoint inside a batch's transaction.
/// Params: $1 job, $2 cursor (text, NULL keeps the current one), $3 keys walked,
/// $4 rows affected, $5 rows retried, $6 batches (0 or 1).
pub fn advance_sql(schema: &str) -> String {
    format!(
        "UPDATE {schema}.jobs SET cursor = COALESCE($2, cursor),
                keys_done = keys_done + $3, rows_done = rows_done + $4,
                rows_retried = rows_retried + $5, batches_done = batches_done + $6,
                updated_at = now()
          WHERE job = $1"
    )
}
