//! Postgres backend: keyset batches under `FOR UPDATE SKIP LOCKED`, one transaction per batch
//! with its checkpoint, and a retry pass for rows that were skipped because they were locked.

mod blockers;
pub mod connect;
pub mod errors;
mod raw;
mod retry_pass;
mod sql;
pub mod table;
pub mod throttle;
pub mod tls;

use crate::engine::{Backend, Estimate, Outcome, Sample, Timings};
use crate::error::{Error, Result};
use crate::spec::{Limits, LockMode, PostgresSpec};
use deadpool_postgres::{Object, Pool};
use errors::db_error;
use raw::RawValue;
use retry_pass::RetryPass;
use sql::BatchSql;
use std::sync::Arc;
use std::time::{Duration, Instant};
use table::TableInfo;
use tokio_postgres::types::ToSql;

/// What a batch needs, resolved once per job by `preflight`.
struct Prepared {
    info: TableInfo,
    sql: BatchSql,
    job: String,
    statement: String,
}

/// One Postgres job's working state.
pub struct PgBackend {
    pool: Pool,
    spec: PostgresSpec,
    limits: Limits,
    job: String,
    state_schema: String,
    /// Connection the batches run on; replaced after it is lost.
    conn: Option<Object>,
    /// Set by `preflight`; shared so a batch borrows it while the connection is borrowed too.
    ready: Option<Arc<Prepared>>,
    /// The keyset walk reached the end of the table.
    walk_done: bool,
    retry: RetryPass,
}

impl PgBackend {
    pub fn new(
        pool: Pool,
        spec: PostgresSpec,
        limits: Limits,
        job: &str,
        state_schema: &str,
    ) -> Self {
        PgBackend {
            pool,
            spec,
            limits,
            job: job.to_string(),
            state_schema: state_schema.to_string(),
            conn: None,
            ready: None,
            walk_done: false,
            retry: RetryPass::default(),
        }
    }

    /// A throttle probe on this job's database (its own connection).
    pub fn throttle_probe(&self, spec: crate::spec::Throttle) -> throttle::PgProbe {
        throttle::PgProbe::new(self.pool.clone(), &self.spec.url, &self.job, spec)
    }

    async fn conn(&mut self) -> Result<&Object> {
        if self.conn.is_none() {
            self.conn = Some(connect::get(&self.pool, &self.spec.url).await?);
        }
        Ok(self.conn.as_ref().expect("connection was just set"))
    }

    fn ready(&self) -> Result<Arc<Prepared>> {
        self.ready
            .clone()
            .ok_or_else(|| Error::Preflight("internal: preflight has not run".into()))
    }

    /// One keyset batch: select and lock the next keys, run the statement, advance the
    /// checkpoint, commit. Any failure rolls the whole batch back.
    async fn walk(&mut self, cursor: Option<&str>, size: u64) -> Result<Outcome> {
        let p = self.ready()?;
        let (sql, job, statement) = (&p.sql, &p.job, &p.statement);
        let skip_locked = self.spec.lock == LockMode::SkipLocked;
        let client = self.conn().await?;
        client
            .batch_execute(&sql.begin)
            .await
            .map_err(|e| db_error("starting the batch transaction", &e))?;
        let result = async {
            let t0 = Instant::now();
            let size = size as i64;
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&size];
            if skip_locked {
                params.push(job);
            }
            if let Some(c) = &cursor {
                params.push(c);
            }
            let text = if cursor.is_some() {
                &sql.after
            } else {
                &sql.first
            };
            let select = client
                .prepare_cached(text)
                .await
                .map_err(|e| db_error("preparing the batch query", &e))?;
            let row = client
                .query_one(&select, &params)
                .await
                .map_err(|e| db_error("selecting the batch's keys", &e))?;
            let keys: Option<RawValue> = row.get(0);
            let last: Option<String> = row.get(1);
            let walked = row.get::<_, i64>(2) as u64;
            let skipped = row.get::<_, i64>(3) as u64;
            let t1 = Instant::now();
            let rows = match &keys {
                Some(k) => {
                    let stmt = client
                        .prepare_cached(statement)
                        .await
                        .map_err(|e| db_error("preparing statement", &e))?;
                    client
                        .execute(&stmt, &[k])
                        .await
                        .map_err(|e| db_error("running statement", &e))?
                }
                None => 0,
            };
            let t2 = Instant::now();
            if walked > 0 {
                let advance = client
                    .prepare_cached(&sql.advance)
                    .await
                    .map_err(|e| db_error("preparing the checkpoint", &e))?;
                client
                    .execute(
                        &advance,
                        &[job, &last, &(walked as i64), &(rows as i64), &0i64, &1i64],
                    )
                    .await
                    .map_err(|e| db_error("writing the checkpoint", &e))?;
            }
            client
                .batch_execute("COMMIT")
                .await
                .map_err(|e| db_error("committing the batch", &e))?;
            Ok(Outcome {
                keys: walked,
                rows,
                skipped,
                cursor: last,
                done: walked == 0,
                timings: Timings {
                    select: t1 - t0,
                    statement: t2 - t1,
                    commit: t2.elapsed(),
                },
                ..Outcome::default()
            })
        }
        .await;
        if result.is_err() {
            let _ = client.batch_execute("ROLLBACK").await;
        }
        result
    }
}

impl Backend for PgBackend {
    async fn preflight(&mut self) -> Result<()> {
        let lock_timeout = self.limits.lock_timeout.as_millis().max(1);
        self.conn().await?;
        let client = self.conn.as_ref().expect("connected above");
        // Checking the statement takes the table's ACCESS SHARE lock: never queue for it forever.
        client
            .batch_execute(&format!("SET lock_timeout = {lock_timeout}"))
            .await
            .map_err(|e| db_error("preflight", &e))?;
        let info = table::inspect(client, &self.spec).await?;
        let sql = BatchSql::new(&info, self.spec.lock, &self.limits, &self.state_schema);
        self.ready = Some(Arc::new(Prepared {
            info,
            sql,
            job: self.job.clone(),
            statement: self.spec.statement.clone(),
        }));
        Ok(())
    }

    async fn estimate(&mut self, cursor: Option<&str>, exact: bool) -> Result<Estimate> {
        let p = self.ready()?;
        let (info, job) = (&p.info, &p.job);
        let schema = self.state_schema.clone();
        let client = self.conn().await?;
        let pred = match cursor {
            Some(_) => format!(
                "{} > CAST($1::text AS {}) AND ({})",
                info.key, info.key_type, info.filter
            ),
            None => format!("({}) AND $1::text IS NULL", info.filter),
        };
        let rows = if exact {
            let sql = format!("SELECT count(*) FROM {} WHERE {pred}", info.rel);
            client
                .query_one(&sql, &[&cursor])
                .await
                .map_err(|e| db_error("counting pending rows", &e))?
                .get::<_, i64>(0) as u64
        } else {
            let sql = format!(
                "EXPLAIN (FORMAT JSON) SELECT 1 FROM {} WHERE {pred}",
                info.rel
            );
            let plan: serde_json::Value = client
                .query_one(&sql, &[&cursor])
                .await
                .map_err(|e| db_error("estimating pending rows", &e))?
                .get(0);
            plan[0]["Plan"]["Plan Rows"].as_f64().unwrap_or(0.0) as u64
        };
        let skipped_table = format!("{schema}.skipped_keys");
        let has_store: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&skipped_table])
            .await
            .map_err(|e| db_error("reading the checkpoint store", &e))?
            .get(0);
        let pending_retry = if has_store {
            let sql = format!("SELECT count(*) FROM {skipped_table} WHERE job = $1");
            client
                .query_one(&sql, &[&job])
                .await
                .map_err(|e| db_error("counting rows waiting for retry", &e))?
                .get::<_, i64>(0) as u64
        } else {
            0
        };
        Ok(Estimate {
            rows,
            exact,
            pending_retry,
        })
    }

    async fn run_unit(&mut self, cursor: Option<&str>, size: u64) -> Result<Outcome> {
        if !self.walk_done {
            let out = self.walk(cursor, size).await?;
            if !out.done {
                return Ok(out);
            }
            self.walk_done = true;
        }
        if self.spec.lock == LockMode::None {
            return Ok(Outcome {
                done: true,
                ..Outcome::default()
            });
        }
        let p = self.ready()?;
        let lock_timeout = self.limits.lock_timeout;
        let mut retry = std::mem::take(&mut self.retry);
        let client = self.conn().await?;
        let out = retry
            .step(client, &p.sql, &p.job, &p.statement, size, lock_timeout)
            .await;
        self.retry = retry;
        out
    }

    async fn sample(&mut self, cursor: Option<&str>, size: u64, count: u32) -> Result<Vec<Sample>> {
        let p = self.ready()?;
        let (sql, statement) = (&p.sql, &p.statement);
        let client = self.conn().await?;
        client
            .batch_execute(&sql.begin)
            .await
            .map_err(|e| db_error("starting the sample transaction", &e))?;
        let result = async {
            let mut samples = Vec::new();
            let mut cursor = cursor.map(str::to_string);
            let size = size as i64;
            for _ in 0..count {
                let t0 = Instant::now();
                let row = match &cursor {
                    Some(c) => client.query_one(&sql.sample_after, &[&size, c]).await,
                    None => client.query_one(&sql.sample_first, &[&size]).await,
                }
                .map_err(|e| db_error("selecting a sample batch", &e))?;
                let keys: Option<RawValue> = row.get(0);
                let Some(keys) = keys else { break };
                cursor = row.get(1);
                let rows = client
                    .execute(statement.as_str(), &[&keys])
                    .await
                    .map_err(|e| db_error("running statement on a sample batch", &e))?;
                samples.push(Sample {
                    keys: row.get::<_, i64>(2) as u64,
                    rows,
                    elapsed: t0.elapsed(),
                });
            }
            Ok(samples)
        }
        .await;
        // Always rolled back: `plan` writes nothing.
        let rollback = client.batch_execute("ROLLBACK").await;
        let samples = result?;
        rollback.map_err(|e| db_error("rolling back the sample batches", &e))?;
        Ok(samples)
    }

    async fn blockers(&mut self) -> Result<Vec<String>> {
        let max_age = self.limits.max_transaction_age;
        let table = self.spec.table.clone();
        let client = self.conn().await?;
        blockers::find(client, &table, max_age).await
    }

    fn reset_connection(&mut self) {
        self.conn = None;
    }

    async fn committed_cursor(&mut self) -> Result<Option<String>> {
        let sql = format!(
            "SELECT cursor FROM {}.jobs WHERE job = $1",
            self.state_schema
        );
        let job = self.job.clone();
        let client = self.conn().await?;
        let row = client
            .query_opt(&sql, &[&job])
            .await
            .map_err(|e| db_error("reading the checkpoint", &e))?;
        Ok(row.and_then(|r| r.get(0)))
    }
}

/// Pause between rounds of the retry pass: doubles from 100ms, capped at `cap`.
fn round_backoff(round: u32, cap: Duration) -> Duration {
    let d = Duration::from_millis(100u64.saturating_mul(1 << round.min(10)));
    d.min(cap.max(Duration::from_millis(100)))
}

/// The backend and checkpoint store for a Postgres job (each on its own connection: the store's
/// session also holds the job's runner lock).
pub async fn open(
    spec: &crate::spec::Spec,
    pg: &PostgresSpec,
) -> Result<(PgBackend, crate::state::postgres::PgStateStore)> {
    let pool = connect::pool(&pg.url, &spec.name)?;
    let store_conn = connect::get(&pool, &pg.url).await?;
    let store = crate::state::postgres::PgStateStore::new(store_conn, &spec.state_schema);
    let backend = PgBackend::new(
        pool,
        pg.clone(),
        spec.limits.clone(),
        &spec.name,
        &spec.state_schema,
    );
    Ok((backend, store))
}
