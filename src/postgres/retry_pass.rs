//! The retry pass of one range: rows passed over by `SKIP LOCKED` were recorded in
//! `skipped_keys`; once the range's keyset walk is over they are locked again and processed, in
//! rounds with growing pauses, the last rounds waiting for the lock (up to `lock_timeout`).
//! Rows still locked after every round stay recorded and the range stays unfinished (the run
//! ends with exit 75), so nothing is ever silently lost. Every page commits with the range's
//! checkpoint, fenced by the claim like a walk batch.

use super::answer::answered;
use super::errors::db_error;
use super::job::Prepared;
use super::raw::RawValue;
use crate::engine::{Outcome, Timings};
use crate::error::{DbErrorKind, Error, Result, StopReason};
use crate::spec::Limits;
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
    /// `claim`: the range and the claim's epoch; `answer`: how long a round trip may wait.
    #[allow(clippy::too_many_arguments)]
    pub async fn step(
        &mut self,
        c: &mut ClientWrapper,
        p: &Prepared,
        job: &str,
        claim: (i32, i64),
        size: u64,
        limits: &Limits,
        answer: Option<Duration>,
    ) -> Result<Option<(Outcome, Option<bool>)>> {
        let range_no = claim.0;
        let limit = size.min(i64::MAX as u64) as i64;
        let what = "reading skipped rows";
        let pending: Vec<String> = answered(answer, what, async {
            c.query(&p.sql.pending, &[&job, &range_no, &self.after, &limit])
                .await
                .map_err(|e| db_error(what, &e))
        })
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
        if pending.is_empty() {
            return self.end_round(limits.lock_timeout);
        }
        let wait = self.round >= ROUNDS - WAITING_ROUNDS;
        let page = Page {
            p,
            job,
            claim,
            pending: &pending,
            wait,
            answer,
        };
        let result = page.process(c).await;
        self.after = pending.last().cloned();
        match result {
            Ok((out, still, paused)) => {
                self.still_locked += still;
                Ok(Some((out, Some(paused))))
            }
            // Waiting for a lock timed out: these keys are still locked; the next page goes on.
            Err(e) if wait && e.db_kind() == Some(DbErrorKind::LockTimeout) => {
                tracing::debug!(job, error = %e, "skipped rows still locked");
                self.still_locked += pending.len() as u64;
                Ok(Some((Outcome::default(), None)))
            }
            Err(e) => Err(e),
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

/// One page of a range's retry pass.
struct Page<'a> {
    p: &'a Prepared,
    job: &'a str,
    /// The range and the claim's epoch.
    claim: (i32, i64),
    pending: &'a [String],
    /// Wait for locks (the last rounds) rather than skip locked rows.
    wait: bool,
    /// How long one round trip may wait for its answer.
    answer: Option<Duration>,
}

impl Page<'_> {
    /// One round trip of the page, bounded by `answer`.
    async fn ask<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    ) -> Result<T> {
        answered(self.answer, what, async {
            fut.await.map_err(|e| db_error(what, &e))
        })
        .await
    }

    /// Lock what can be locked of the pending keys, run the statement on it, forget every key
    /// that needs no more work, advance the checkpoint (fenced), commit. Returns the outcome,
    /// how many keys are still locked by others, and the job's pause flag as the checkpoint
    /// read it. A lock wait that timed out fails with `DbErrorKind::LockTimeout`.
    async fn process(&self, c: &mut ClientWrapper) -> Result<(Outcome, u64, bool)> {
        let Page {
            p,
            job,
            claim: (range_no, epoch),
            pending,
            wait,
            ..
        } = *self;
        let what = "starting the retry transaction";
        let tx = self.ask(what, c.transaction()).await?;
        self.ask(what, tx.batch_execute(&p.sql.begin_locals))
            .await?;
        let t0 = Instant::now();
        let relock = if wait {
            &p.sql.relock_wait
        } else {
            &p.sql.relock_skip
        };
        let row = self
            .ask("locking skipped rows", tx.query_one(relock, &[&pending]))
            .await?;
        let keys: Option<RawValue> = row.get(0);
        let locked: Vec<String> = row.get::<_, Option<Vec<String>>>(1).unwrap_or_default();
        let (first, last): (Option<RawValue>, Option<RawValue>) = (row.get(2), row.get(3));
        let still: Vec<String> = self
            .ask(
                "checking skipped rows",
                tx.query_one(&p.sql.still_needed, &[&pending, &locked]),
            )
            .await?
            .get(0);
        let t1 = Instant::now();
        let rows = match &keys {
            Some(k) => {
                let st = self
                    .ask("preparing statement", tx.prepare_cached(&p.statement))
                    .await?;
                let params: Vec<&(dyn ToSql + Sync)> = if p.info.statement_params == 3 {
                    vec![k, &first, &last]
                } else {
                    vec![k]
                };
                self.ask(
                    "running statement on skipped rows",
                    tx.execute(&st, &params),
                )
                .await?
            }
            None => 0,
        };
        let t2 = Instant::now();
        let still_set: std::collections::HashSet<&str> = still.iter().map(String::as_str).collect();
        let resolved: Vec<&String> = pending
            .iter()
            .filter(|k| !still_set.contains(k.as_str()))
            .collect();
        self.ask(
            "forgetting retried rows",
            tx.execute(&p.sql.forget, &[&job, &resolved]),
        )
        .await?;
        let retried = locked.len() as i64;
        let fenced = self
            .ask(
                "writing the checkpoint",
                tx.query_opt(
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
                ),
            )
            .await?;
        let Some(fenced) = fenced else {
            drop(tx);
            return Err(Error::Lost(format!(
                "range {range_no} was claimed by another worker"
            )));
        };
        let paused = fenced.get::<_, Option<bool>>(0).unwrap_or(false);
        self.ask("committing retried rows", tx.commit()).await?;
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
}
