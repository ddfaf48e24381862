//! The retry pass: rows passed over by `SKIP LOCKED` were recorded in `skipped_keys`; once the
//! keyset walk is over they are locked again and processed, in rounds with growing pauses, the
//! last rounds waiting for the lock (up to `lock_timeout`). Rows still locked after every round
//! stay recorded and the run stops with exit 75, so nothing is ever silently lost.

use super::errors::{db_error, sqlstate};
use super::raw::RawValue;
use super::round_backoff;
use super::sql::BatchSql;
use crate::engine::{Outcome, Timings};
use crate::error::{Error, Result, StopReason};
use deadpool_postgres::Object;
use std::time::{Duration, Instant};

/// Rounds over the skipped keys before giving up; the last `WAITING_ROUNDS` wait for locks.
const ROUNDS: u32 = 8;
const WAITING_ROUNDS: u32 = 3;

/// Where the retry pass is: which round, how far into it, what it has seen this round.
#[derive(Debug, Default)]
pub struct RetryPass {
    round: u32,
    /// Last skipped key handled in this round (keyset over `skipped_keys`).
    after: Option<String>,
    /// Keys found still locked in this round.
    still_locked: u64,
}

impl RetryPass {
    /// One page of skipped keys, in its own transaction with the checkpoint.
    pub async fn step(
        &mut self,
        client: &Object,
        sql: &BatchSql,
        job: &str,
        statement: &str,
        size: u64,
        lock_timeout: Duration,
    ) -> Result<Outcome> {
        let pending: Vec<String> = client
            .query(&sql.pending, &[&job, &self.after, &(size as i64)])
            .await
            .map_err(|e| db_error("reading skipped rows", &e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if pending.is_empty() {
            return self.end_round(lock_timeout);
        }
        let wait = self.round >= ROUNDS - WAITING_ROUNDS;
        client
            .batch_execute(&sql.begin)
            .await
            .map_err(|e| db_error("starting the retry transaction", &e))?;
        let result = process(client, sql, job, statement, &pending, wait).await;
        if result.is_err() {
            let _ = client.batch_execute("ROLLBACK").await;
        }
        self.after = pending.last().cloned();
        match result {
            Ok((out, still)) => {
                self.still_locked += still;
                Ok(out)
            }
            // Waiting for a lock timed out: these keys are still locked; the next page goes on.
            Err((e, true)) if wait => {
                tracing::debug!(job, error = %e, "skipped rows still locked");
                self.still_locked += pending.len() as u64;
                Ok(Outcome::default())
            }
            Err((e, _)) => Err(e),
        }
    }

    fn end_round(&mut self, lock_timeout: Duration) -> Result<Outcome> {
        if self.after.is_none() || self.still_locked == 0 {
            // A round that started empty, or that left nothing behind: the job is done.
            if self.after.is_none() {
                return Ok(Outcome {
                    done: true,
                    ..Outcome::default()
                });
            }
            self.after = None;
            return Ok(Outcome::default());
        }
        let left = self.still_locked;
        self.round += 1;
        self.after = None;
        self.still_locked = 0;
        if self.round >= ROUNDS {
            return Err(Error::Stopped(StopReason::RowsStillLocked(left)));
        }
        tracing::info!(
            rows = left,
            round = self.round,
            "skipped rows still locked; retrying after a pause"
        );
        Ok(Outcome {
            backoff: Some(round_backoff(self.round, lock_timeout)),
            ..Outcome::default()
        })
    }
}

/// Lock what can be locked of `pending`, run the statement on it, forget every key that needs
/// no more work, advance the checkpoint, commit. Returns the outcome and how many keys are still
/// locked by others. The error's flag says whether it was a lock timeout.
async fn process(
    client: &Object,
    sql: &BatchSql,
    job: &str,
    statement: &str,
    pending: &[String],
    wait: bool,
) -> std::result::Result<(Outcome, u64), (Error, bool)> {
    let fail = |what: &str, e: tokio_postgres::Error| {
        let lock = sqlstate(&e) == Some("55P03");
        (db_error(what, &e), lock)
    };
    let t0 = Instant::now();
    let relock = if wait {
        &sql.relock_wait
    } else {
        &sql.relock_skip
    };
    let row = client
        .query_one(relock, &[&pending])
        .await
        .map_err(|e| fail("locking skipped rows", e))?;
    let keys: Option<RawValue> = row.get(0);
    let locked: Vec<String> = row.get::<_, Option<Vec<String>>>(1).unwrap_or_default();
    let still: Vec<String> = client
        .query_one(&sql.still_needed, &[&pending, &locked])
        .await
        .map_err(|e| fail("checking skipped rows", e))?
        .get(0);
    let t1 = Instant::now();
    let rows = match &keys {
        Some(k) => client
            .execute(statement, &[k])
            .await
            .map_err(|e| fail("running statement on skipped rows", e))?,
        None => 0,
    };
    let t2 = Instant::now();
    let still_set: std::collections::HashSet<&str> = still.iter().map(String::as_str).collect();
    let resolved: Vec<&String> = pending
        .iter()
        .filter(|k| !still_set.contains(k.as_str()))
        .collect();
    client
        .execute(&sql.forget, &[&job, &resolved])
        .await
        .map_err(|e| fail("forgetting retried rows", e))?;
    let retried = locked.len() as i64;
    client
        .execute(
            &sql.advance,
            &[
                &job,
                &None::<String>,
                &0i64,
                &(rows as i64),
                &retried,
                &1i64,
            ],
        )
        .await
        .map_err(|e| fail("writing the checkpoint", e))?;
    client
        .batch_execute("COMMIT")
        .await
        .map_err(|e| fail("committing retried rows", e))?;
    Ok((
        Outcome {
            rows,
            retried: retried as u64,
            timings: Timings {
                select: t1 - t0,
                statement: t2 - t1,
                commit: t2.elapsed(),
            },
            ..Outcome::default()
        },
        still.len() as u64,
    ))
}
