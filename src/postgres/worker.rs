//! One Postgres worker: a connection of its own (never returned to the pool: its session holds
//! the worker's advisory locks), a worker slot, and at most one claimed range. Every batch
//! commits together with the range's checkpoint, fenced by the claim's epoch: a worker whose
//! claim was taken over (after its connection was lost) writes nothing and claims again.

use super::advisory;
use super::errors::db_error;
use super::job::Ctx;
use super::raw::RawValue;
use super::retry_pass::RetryPass;
use super::store::{DONE, RETRYING};
use crate::engine::{Claim, Outcome, Timings, Worker};
use crate::error::{Error, Result};
use crate::spec::LockMode;
use deadpool_postgres::ClientWrapper;
use std::sync::Arc;
use std::time::Instant;
use tokio_postgres::types::ToSql;

/// The range a worker holds.
struct Held {
    range_no: i32,
    epoch: i64,
    cursor: Option<String>,
    hi: Option<String>,
    /// The keyset walk of the range is over: its skipped rows are being retried.
    retrying: bool,
    retry: RetryPass,
}

pub struct PgWorker {
    name: String,
    /// `host:pid/wN`, recorded as the range's owner.
    owner: String,
    ctx: Arc<Ctx>,
    slot: u32,
    /// How many slots the job has (this worker may take any free one after reconnecting).
    cap: u32,
    conn: Option<ClientWrapper>,
    held: Option<Held>,
    paused: bool,
}

impl PgWorker {
    /// A worker in slot `slot` on `conn`, whose session already holds the slot's lock.
    pub fn new(ctx: Arc<Ctx>, index: u32, slot: u32, cap: u32, conn: ClientWrapper) -> PgWorker {
        PgWorker {
            name: format!("w{index}"),
            owner: format!("{}/w{index}", crate::state::runner_id()),
            ctx,
            slot,
            cap,
            conn: Some(conn),
            held: None,
            paused: false,
        }
    }

    /// The connection, reconnecting (and taking the worker's locks again) after it was lost.
    async fn conn(&mut self) -> Result<&mut ClientWrapper> {
        if self.conn.is_none() {
            let c = self.ctx.connect_worker().await?;
            match self.ctx.take_slot(&c, self.slot, self.cap).await? {
                Ok(slot) => self.slot = slot,
                Err(who) => {
                    return Err(Error::Stopped(crate::error::StopReason::LockHeld(format!(
                        "{who} (this worker's slot was taken while its connection was down)"
                    ))));
                }
            }
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// The claim on range `n` is gone: give its lock back too (best effort) and say so.
    async fn lose(&mut self, n: i32) -> Error {
        self.held = None;
        self.unlock_range(n).await;
        self.lost(n)
    }

    fn lost(&self, n: i32) -> Error {
        Error::Lost(format!(
            "worker {} lost range {n} to another worker (its connection was down long enough \
             for the range to be claimed again); its last batch was rolled back",
            self.name
        ))
    }

    /// Set the claimed range's status (and cursor), fenced. Err(Lost) if the claim is gone.
    async fn mark(&mut self, status: &str) -> Result<()> {
        let ctx = self.ctx.clone();
        let p = ctx.prepared()?;
        let held = self.held.as_ref().expect("a range is held");
        let (n, epoch) = (held.range_no, held.epoch);
        let c = self.conn().await?;
        let st = c
            .prepare_cached(&p.sql.advance)
            .await
            .map_err(|e| db_error("preparing the checkpoint", &e))?;
        let row = c
            .query_opt(
                &st,
                &[
                    &ctx.job,
                    &n,
                    &epoch,
                    &None::<String>,
                    &0i64,
                    &0i64,
                    &0i64,
                    &0i64,
                    &Some(status),
                ],
            )
            .await
            .map_err(|e| db_error("writing the range's status", &e))?;
        match row {
            Some(r) => {
                self.paused = r.get::<_, Option<bool>>(0).unwrap_or(false);
                Ok(())
            }
            None => Err(self.lose(n).await),
        }
    }

    /// Finish the held range: done, its lock given back.
    async fn finish_range(&mut self) -> Result<Outcome> {
        self.mark(DONE).await?;
        let held = self.held.take().expect("a range is held");
        self.unlock_range(held.range_no).await;
        Ok(Outcome {
            unit_done: true,
            cursor: Some(format!("range {} done", held.range_no)),
            ..Outcome::default()
        })
    }

    async fn unlock_range(&mut self, n: i32) {
        let key = self
            .ctx
            .store
            .lock_key(&self.ctx.job, &format!("range:{n}"));
        if let Some(c) = self.conn.as_ref()
            && let Err(e) = advisory::unlock(c, &key, false, "unlocking a range").await
        {
            tracing::debug!("unlocking range {n}: {e}");
        }
    }

    /// One keyset batch of the held range: lock the next keys, run the statement, advance the
    /// range's checkpoint (fenced), commit. Any failure rolls the whole batch back.
    async fn walk(&mut self, size: u64) -> Result<Outcome> {
        let ctx = self.ctx.clone();
        let p = ctx.prepared()?;
        let skip_locked = ctx.spec.lock == LockMode::SkipLocked;
        let held = self.held.as_ref().expect("a range is held");
        let (n, epoch, cursor, hi) = (
            held.range_no,
            held.epoch,
            held.cursor.clone(),
            held.hi.clone(),
        );
        let c = self.conn().await?;
        let tx = c
            .transaction()
            .await
            .map_err(|e| db_error("starting the batch transaction", &e))?;
        let t0 = Instant::now();
        let size = size.min(i64::MAX as u64) as i64;
        let walk = tx
            .prepare_cached(&p.sql.walk)
            .await
            .map_err(|e| db_error("preparing the batch query", &e))?;
        let params: Vec<&(dyn ToSql + Sync)> = if skip_locked {
            vec![&size, &ctx.job, &n, &cursor, &hi]
        } else {
            vec![&size, &cursor, &hi]
        };
        // The timeouts and the batch query go out together (one round trip).
        let (set, row) = tokio::join!(
            tx.batch_execute(&p.sql.begin_locals),
            tx.query_one(&walk, &params)
        );
        set.map_err(|e| db_error("starting the batch transaction", &e))?;
        let row = row.map_err(|e| db_error("selecting the batch's keys", &e))?;
        let keys: Option<RawValue> = row.get(0);
        let last: Option<String> = row.get(1);
        let walked = row.get::<_, i64>(2) as u64;
        let skipped = row.get::<_, i64>(3) as u64;
        let (first_key, last_key): (Option<RawValue>, Option<RawValue>) = (row.get(4), row.get(5));
        let t1 = Instant::now();
        let rows = match &keys {
            Some(k) => {
                let st = tx
                    .prepare_cached(&ctx.spec.statement)
                    .await
                    .map_err(|e| db_error("preparing statement", &e))?;
                let params: Vec<&(dyn ToSql + Sync)> = if p.info.statement_params == 3 {
                    vec![k, &first_key, &last_key]
                } else {
                    vec![k]
                };
                tx.execute(&st, &params)
                    .await
                    .map_err(|e| db_error("running statement", &e))?
            }
            None => 0,
        };
        let t2 = Instant::now();
        // A short batch scanned to the end of the range: its walk is over. The range is done
        // in the same transaction, or waits for its retry pass if rows were skipped.
        let next: Option<&str> = if (walked as i64) < size {
            let waiting: i64 = if skip_locked {
                tx.query_one(&p.sql.skipped_count, &[&ctx.job, &n])
                    .await
                    .map_err(|e| db_error("counting skipped rows", &e))?
                    .get(0)
            } else {
                0
            };
            Some(if waiting == 0 { DONE } else { RETRYING })
        } else {
            None
        };
        let advance = tx
            .prepare_cached(&p.sql.advance)
            .await
            .map_err(|e| db_error("preparing the checkpoint", &e))?;
        let fenced = tx
            .query_opt(
                &advance,
                &[
                    &ctx.job,
                    &n,
                    &epoch,
                    &last,
                    &(walked as i64),
                    &(rows as i64),
                    &0i64,
                    &i64::from(walked > 0),
                    &next,
                ],
            )
            .await
            .map_err(|e| db_error("writing the checkpoint", &e))?;
        let Some(fenced) = fenced else {
            drop(tx);
            return Err(self.lose(n).await);
        };
        tx.commit()
            .await
            .map_err(|e| db_error("committing the batch", &e))?;
        self.paused = fenced.get::<_, Option<bool>>(0).unwrap_or(false);
        if let Some(h) = self.held.as_mut()
            && last.is_some()
        {
            h.cursor = last.clone();
        }
        // The range's walk is over. Done, or parked for its retry pass: its skipped rows are
        // retried once the walks of the other ranges are over (rows locked by the application
        // are usually free again by then), so no worker waits on locks while a range is left
        // to walk. Either way this worker claims the next range.
        let unit_done = next.is_some();
        if next == Some(RETRYING) {
            let ctx = self.ctx.clone();
            if let Some(c) = self.conn.as_ref()
                && let Err(e) = c.execute(&p.sql.release, &[&ctx.job, &n, &epoch]).await
            {
                // The claim ends with the advisory lock below anyway.
                tracing::debug!("parking range {n}: {e}");
            }
        }
        if unit_done {
            self.held = None;
            self.unlock_range(n).await;
        }
        Ok(Outcome {
            keys: walked,
            rows,
            skipped,
            cursor: last,
            unit_done,
            timings: Timings {
                select: t1 - t0,
                statement: t2 - t1,
                commit: t2.elapsed(),
            },
            ..Outcome::default()
        })
    }

    /// One page of the held range's retry pass.
    async fn retry(&mut self, size: u64) -> Result<Outcome> {
        let ctx = self.ctx.clone();
        let p = ctx.prepared()?;
        let mut held = self.held.take().expect("a range is held");
        let (n, epoch) = (held.range_no, held.epoch);
        let result = match self.conn().await {
            Ok(c) => {
                held.retry
                    .step(c, &p, &ctx.job, n, epoch, size, ctx.limits.lock_timeout)
                    .await
            }
            Err(e) => Err(e),
        };
        self.held = Some(held);
        match result {
            Ok(Some((out, paused))) => {
                // A committed page read the pause flag with its checkpoint, as a walk batch
                // does: a pause reaches a worker in its retry pass too.
                if let Some(p) = paused {
                    self.paused = p;
                }
                Ok(out)
            }
            // Every skipped row of the range is resolved.
            Ok(None) => self.finish_range().await,
            Err(Error::Lost(_)) => Err(self.lose(n).await),
            Err(e) => Err(e),
        }
    }
}

impl Worker for PgWorker {
    fn name(&self) -> &str {
        &self.name
    }

    async fn claim(&mut self) -> Result<Claim> {
        if let Some(h) = &self.held {
            return Ok(Claim::Got(format!("range {}", h.range_no)));
        }
        let ctx = self.ctx.clone();
        let p = ctx.prepared()?;
        let owner = self.owner.clone();
        let c = self.conn().await?;
        let candidates: Vec<i32> = c
            .query(&p.sql.candidates, &[&ctx.job])
            .await
            .map_err(|e| db_error("looking for a range to claim", &e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if candidates.is_empty() {
            return Ok(Claim::Nothing {
                all_done: true,
                held: 0,
                blocked: 0,
            });
        }
        let blocked_set = ctx.blocked.lock().expect("blocked lock").clone();
        let (mut held, mut blocked) = (0, 0);
        for n in candidates {
            if blocked_set.contains(&n) {
                blocked += 1;
                continue;
            }
            let key = ctx.store.lock_key(&ctx.job, &format!("range:{n}"));
            if !advisory::try_lock(c, &key, false, "claiming a range").await? {
                held += 1;
                continue;
            }
            let taken = c
                .query_opt(&p.sql.take, &[&ctx.job, &n, &owner])
                .await
                .map_err(|e| db_error("claiming a range", &e))?;
            let Some(r) = taken else {
                // Finished by someone else in the meantime.
                let _ = advisory::unlock(c, &key, false, "unlocking a range").await;
                continue;
            };
            let status: String = r.get(1);
            self.paused = c
                .query_one(&p.sql.paused, &[&ctx.job])
                .await
                .map_err(|e| db_error("reading the pause flag", &e))?
                .get(0);
            self.held = Some(Held {
                range_no: n,
                epoch: r.get(0),
                cursor: r.get(2),
                hi: r.get(3),
                retrying: status == RETRYING,
                retry: RetryPass::default(),
            });
            return Ok(Claim::Got(format!("range {n}")));
        }
        Ok(Claim::Nothing {
            all_done: false,
            held,
            blocked,
        })
    }

    async fn step(&mut self, size: u64) -> Result<Outcome> {
        match &self.held {
            None => Err(Error::Lost(format!("worker {} holds no range", self.name))),
            Some(h) if h.retrying => self.retry(size).await,
            Some(_) => self.walk(size).await,
        }
    }

    async fn release(&mut self) -> Result<()> {
        let Some(h) = self.held.take() else {
            return Ok(());
        };
        let ctx = self.ctx.clone();
        let p = ctx.prepared()?;
        if let Some(c) = self.conn.as_ref() {
            c.execute(&p.sql.release, &[&ctx.job, &h.range_no, &h.epoch])
                .await
                .map_err(|e| db_error("releasing the range", &e))?;
        }
        self.unlock_range(h.range_no).await;
        Ok(())
    }

    async fn give_up(&mut self) -> Result<()> {
        if let Some(h) = &self.held {
            self.ctx
                .blocked
                .lock()
                .expect("blocked lock")
                .insert(h.range_no);
        }
        self.release().await
    }

    async fn paused(&mut self) -> Result<bool> {
        if self.paused {
            let ctx = self.ctx.clone();
            let p = ctx.prepared()?;
            let c = self.conn().await?;
            self.paused = c
                .query_one(&p.sql.paused, &[&ctx.job])
                .await
                .map_err(|e| db_error("reading the pause flag", &e))?
                .get(0);
        }
        Ok(self.paused)
    }

    fn reset_connection(&mut self) {
        self.conn = None;
        self.held = None;
    }

    async fn close(&mut self) {
        if let Some(c) = self.conn.take() {
            // The slot, the job's shared lock and any range lock, all at once.
            if let Err(e) = c.execute("SELECT pg_advisory_unlock_all()", &[]).await {
                tracing::debug!("releasing the worker's locks: {e}");
            }
        }
        self.held = None;
    }
}
