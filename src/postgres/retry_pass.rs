//! The retry pass of one range: rows passed over by `SKIP LOCKED` were recorded in
//! `skipped_keys`; once the range's keyset walk is over they are locked again and processed, in
//! rounds with growing pauses, the last rounds waiting for the lock (up to `lock_timeout`).
//! Rows still locked after every round stay recorded and the range stays unfinished (the run
//! ends with exit 75), so nothing is ever silently lost. Every page commits with the range's
//! checkpoint, fenced by the claim like a walk batch.

use super::errors::{db_error, sqlstate};
use super::job::Prepared;
use super::raw::RawValue;
use crate::engine::{Outcome, Timings};
use crate::error::{Error, Result, StopReason};
use deadpool_postgres::ClientWrapper;
use std::time::{Duration, Instant};
use tokio_postgres::types::ToSql;

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

/// Pause between rounds: doubles from 100ms, capped at `cap`.
fn round_backoff(round: u32, cap: Duration) -> Duration {
    let d = Duration::from_millis(100u64.saturating_mul(1 << round.min(10)));
    d.min(cap.max(Duration::from_millis(100)))
}

impl RetryPass {
    /// One page of the range's skipped keys, in its own transaction with the checkpoint.
    /// `Ok(None)`: every skipped key of the range is resolved. With the outcome comes the
    /// job's pause flag as the page's checkpoint read it (`None`: nothing was committed).
    #[allow(clippy::too_many_arguments)]
    pub async fn step(
        &mut self,
        c: &mut ClientWrapper,
        p: &Prepared,
        job: &str,
        range_no: i32,
        epoch: i64,
        size: u64,
        lock_timeout: Duration,
    ) -> Result<Option<(Outcome, Option<bool>)>> {
        let limit = size.min(i64::MAX as u64) as i64;
        let pending: Vec<String> = c
            .query(&p.sql.pending, &[&job, &range_no, &self.after, &limit])
            .await
            .map_err(|e| db_error("reading skipped rows", &e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if pending.is_empty() {
            return self.end_round(lock_timeout);
        }
        let wait = self.round >= ROUNDS - WAITING_ROUNDS;
        let result = process(c, p, job, range_no, epoch, &pending, wait).await;
        self.after = pending.last().cloned();
        match result {
            Ok((out, still, paused)) => {
                self.still_locked += still;
                Ok(Some((out, Some(paused))))
            }
            // Waiting for a lock timed out: these keys are still locked; the next page goes on.
            Err((e, true)) if wait => {
                tracing::debug!(job, error = %e, "skipped rows still locked");
                self.still_locked += pending.len() as u64;
                Ok(Some((Outcome::default(), None)))
            }
            Err((e, _)) => Err(e),
        }
    }

    fn end_round(&mut self, lock_timeout: Duration) -> Result<Option<(Outcome, Option<bool>)>> {
        if self.after.is_none() || self.still_locked == 0 {
            // A round that started empty, or that left nothing behind: the range is done.
            if self.after.is_none() {
                return Ok(None);
            }
            self.after = None;
            return Ok(Some((Outcome::default(), None)));
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
        Ok(Some((
            Outcome {
                backoff: Some(round_backoff(self.round, lock_timeout)),
                ..Outcome::default()
            },
            None,
        )))
    }
}

/// Lock what can be locked of `pending`, run the statement on it, forget every key that needs
/// no more work, advance the checkpoint (fenced), commit. Returns the outcome, how many keys
/// are still locked by others, and the job's pause flag as the checkpoint read it. The error's
/// flag says whether it was a lock timeout.
async fn process(
    c: &mut ClientWrapper,
    p: &Prepared,
    job: &str,
    range_no: i32,
    epoch: i64,
    pending: &[String],
    wait: bool,
) -> std::result::Result<(Outcome, u64, bool), (Error, bool)> {
    let fail = |what: &str, e: tokio_postgres::Error| {
        let lock = sqlstate(&e) == Some("55P03");
        (db_error(what, &e), lock)
    };
    let tx = c
        .transaction()
        .await
        .map_err(|e| fail("starting the retry transaction", e))?;
    tx.batch_execute(&p.sql.begin_locals)
        .await
        .map_err(|e| fail("starting the retry transaction", e))?;
    let t0 = Instant::now();
    let relock = if wait {
        &p.sql.relock_wait
    } else {
        &p.sql.relock_skip
    };
    let row = tx
        .query_one(relock, &[&pending])
        .await
        .map_err(|e| fail("locking skipped rows", e))?;
    let keys: Option<RawValue> = row.get(0);
    let locked: Vec<String> = row.get::<_, Option<Vec<String>>>(1).unwrap_or_default();
    let (first, last): (Option<RawValue>, Option<RawValue>) = (row.get(2), row.get(3));
    let still: Vec<String> = tx
        .query_one(&p.sql.still_needed, &[&pending, &locked])
        .await
        .map_err(|e| fail("checking skipped rows", e))?
        .get(0);
    let t1 = Instant::now();
    let rows = match &keys {
        Some(k) => {
            let st = tx
                .prepare_cached(&p.statement)
                .await
                .map_err(|e| fail("preparing statement", e))?;
            let params: Vec<&(dyn ToSql + Sync)> = if p.info.statement_params == 3 {
                vec![k, &first, &last]
            } else {
                vec![k]
            };
            tx.execute(&st, &params)
                .await
                .map_err(|e| fail("running statement on skipped rows", e))?
        }
        None => 0,
    };
    let t2 = Instant::now();
    let still_set: std::collections::HashSet<&str> = still.iter().map(String::as_str).collect();
    let resolved: Vec<&String> = pending
        .iter()
        .filter(|k| !still_set.contains(k.as_str()))
        .collect();
    tx.execute(&p.sql.forget, &[&job, &resolved])
        .await
        .map_err(|e| fail("forgetting retried rows", e))?;
    let retried = locked.len() as i64;
    let fenced = tx
        .query_opt(
            &p.sql.advance,
            &[
                &job,
                &range_no,
                &epoch,
                &None::<String>,
                &0i64,
                &(rows as i64),
                &retried,
                &1i64,
                &None::<&str>,
            ],
        )
        .await
        .map_err(|e| fail("writing the checkpoint", e))?;
    let Some(fenced) = fenced else {
        drop(tx);
        return Err((
            Error::Lost(format!("range {range_no} was claimed by another worker")),
            false,
        ));
    };
    let paused = fenced.get::<_, Option<bool>>(0).unwrap_or(false);
    tx.commit()
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
        paused,
    ))
}
