//! One Postgres worker: a connection of its own (never returned to the pool: its session holds
//! the worker's advisory locks), a second one for walking ahead (`batch.walk_ahead`), a worker
//! slot, and at most one claimed range. Every batch
//! commits together with the range's checkpoint, fenced by the claim's epoch: a worker whose
//! claim was taken over (after its connection was lost) writes nothing and claims again.

use super::advisory;
use super::answer::{answer_limit, answered, lost};
use super::batch;
use super::errors::db_error;
use super::job::Ctx;
use super::retry_pass::RetryPass;
use super::store::{DONE, RETRYING};
use crate::engine::{Claim, Outcome, Worker};
use crate::error::{Error, Result};
use deadpool_postgres::ClientWrapper;
use std::sync::Arc;
use std::time::Duration;

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
    /// The second connection, for walking one batch ahead (no locks of the worker's own).
    spare: Option<ClientWrapper>,
    /// The next batch, walked (its keys locked) while the current one ran.
    ahead: Option<batch::Running>,
    /// Walking ahead is off for this run: a statement waited for the batch walked ahead.
    ahead_off: bool,
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
            spare: None,
            ahead: None,
            ahead_off: false,
            held: None,
            paused: false,
        }
    }

    /// The connection, reconnecting (and taking the worker's locks again) after it was lost.
    async fn conn(&mut self) -> Result<&mut ClientWrapper> {
        if self.conn.is_none() {
            let c = self.ctx.connect_worker().await?;
            // Ending the worker's earlier session waits up to 5 s for it to go.
            let limit = self.limit().map(|l| l + Duration::from_secs(5));
            let slot = answered(limit, "taking a worker slot", async {
                self.ctx.take_slot(&c, self.slot, self.cap).await
            })
            .await?;
            match slot {
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

    /// How long one round trip on the worker's connections may wait for its answer.
    fn limit(&self) -> Option<Duration> {
        answer_limit(&self.ctx.limits)
    }

    /// After a best-effort round trip failed: a connection taken for lost is dropped (the
    /// next use connects again and ends its session on the server).
    fn forget_if_lost(&mut self, e: &Error) {
        if lost(e) {
            self.conn = None;
        }
    }

    /// Roll back the batch walked ahead, if any (its locks go with it), and bring its
    /// connection home. Everything that uses the main connection outside a batch settles first.
    async fn settle_ahead(&mut self) {
        if let Some(a) = self.ahead.take() {
            let main = a.main;
            let c = a.abandon().await;
            self.put_back(main, c);
        }
    }

    /// The claim on range `n` is gone: give its lock back too (best effort) and say so.
    async fn lose(&mut self, n: i32) -> Error {
        self.settle_ahead().await;
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
        self.settle_ahead().await;
        let ctx = self.ctx.clone();
        let p = ctx.prepared()?;
        let held = self.held.as_ref().expect("a range is held");
        let (n, epoch) = (held.range_no, held.epoch);
        let limit = self.limit();
        let c = self.conn().await?;
        let row = answered(limit, "writing the range's status", async {
            let st = c
                .prepare_cached(&p.sql.advance)
                .await
                .map_err(|e| db_error("preparing the checkpoint", &e))?;
            c.query_opt(
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
            .map_err(|e| db_error("writing the range's status", &e))
        })
        .await?;
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
        let limit = self.limit();
        if let Some(c) = self.conn.as_ref()
            && let Err(e) = answered(limit, "unlocking a range", async {
                advisory::unlock(c, &key, false, "unlocking a range").await
            })
            .await
        {
            tracing::debug!("unlocking range {n}: {e}");
            self.forget_if_lost(&e);
        }
    }

    /// One keyset batch of the held range: lock the next keys, run the statement, advance the
    /// range's checkpoint (fenced), commit. Any failure rolls the whole batch back. With
    /// `batch.walk_ahead`, the next batch's keys are locked on the worker's other connection
    /// while the statement runs, so the walk costs no time of its own; that batch commits only
    /// on top of this one (its checkpoint is fenced by the cursor it walked from).
    async fn walk(&mut self, size: u64) -> Result<Outcome> {
        let ctx = self.ctx.clone();
        let p = ctx.prepared()?;
        let held = self.held.as_ref().expect("a range is held");
        let args = batch::Args {
            range_no: held.range_no,
            epoch: held.epoch,
            from: held.cursor.clone(),
            hi: held.hi.clone(),
            size: size.min(i64::MAX as u64) as i64,
        };
        let n = args.range_no;
        let mut cur = match self.ahead.take() {
            // Walked ahead at the size asked for then: taken unless the size has come down
            // since (the batches were slower than the target; a bigger one would overshoot).
            Some(a)
                if a.args.range_no == n
                    && a.args.epoch == args.epoch
                    && a.args.from == args.from
                    && a.args.size <= args.size =>
            {
                a
            }
            other => {
                if let Some(a) = other {
                    self.put_back(a.main, a.abandon().await);
                }
                self.conn().await?;
                let c = self.conn.take().expect("connected above");
                batch::Running::start(ctx.clone(), p.clone(), c, true, args.clone())
            }
        };
        if let Some(w) = cur.walked().await
            && w.full
            && ctx.ahead
            && !self.ahead_off
            && !self.paused
        {
            self.start_ahead(&cur, w.last, &args).await;
        }
        let main = cur.main;
        let (c, end) = cur.finish().await;
        self.put_back(main, c);
        let done = match end {
            Ok(batch::End::Committed(d)) => d,
            Ok(batch::End::Lost | batch::End::Abandoned) => {
                self.settle_ahead().await;
                return Err(self.lose(n).await);
            }
            Err(e) => {
                // A statement that locks rows past its batch (a foreign key to the next row, a
                // trigger) waits for the batch walked ahead, which waits for it: nothing but
                // lock_timeout ends that. Go on without walking ahead.
                if self.ahead.is_some()
                    && e.db_kind() == Some(crate::error::DbErrorKind::LockTimeout)
                {
                    self.ahead_off = true;
                    tracing::warn!(
                        worker = %self.name,
                        "the statement hit lock_timeout while the next batch was locked ahead \
                         (it may lock rows past its batch); walking ahead is off for the rest of \
                         this run"
                    );
                }
                self.settle_ahead().await;
                return Err(e);
            }
        };
        self.paused = done.paused;
        if self.paused {
            // No rows stay locked while the job is paused.
            self.settle_ahead().await;
        }
        if let Some(h) = self.held.as_mut()
            && done.last.is_some()
        {
            h.cursor = done.last.clone();
        }
        // The range's walk is over. Done, or parked for its retry pass: its skipped rows are
        // retried once the walks of the other ranges are over (rows locked by the application
        // are usually free again by then), so no worker waits on locks while a range is left
        // to walk. Either way this worker claims the next range.
        let unit_done = done.next.is_some();
        if unit_done {
            // A short batch walks nothing ahead; make sure.
            self.settle_ahead().await;
        }
        if done.next == Some(RETRYING) {
            let epoch = args.epoch;
            let limit = self.limit();
            if let Some(c) = self.conn.as_ref()
                && let Err(e) = answered(limit, "parking the range", async {
                    c.execute(&p.sql.release, &[&ctx.job, &n, &epoch])
                        .await
                        .map_err(|e| db_error("parking the range", &e))
                })
                .await
            {
                // The claim ends with the advisory lock below anyway.
                tracing::debug!("parking range {n}: {e}");
                self.forget_if_lost(&e);
            }
        }
        if unit_done {
            self.held = None;
            self.unlock_range(n).await;
        }
        Ok(Outcome {
            keys: done.walked,
            rows: done.rows,
            skipped: done.skipped,
            cursor: done.last,
            unit_done,
            timings: done.timings,
            ..Outcome::default()
        })
    }

    /// Start walking the batch after `cur` (from `last`) on the connection `cur` does not use.
    /// Without a free connection the worker simply does not walk ahead.
    async fn start_ahead(
        &mut self,
        cur: &batch::Running,
        last: Option<String>,
        args: &batch::Args,
    ) {
        let c = if cur.main {
            match self.spare.take() {
                Some(c) if !c.is_closed() => Some(c),
                _ => match self.ctx.connect_worker().await {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::debug!("no second connection to walk ahead on: {e}");
                        None
                    }
                },
            }
        } else {
            self.conn.take()
        };
        let Some(c) = c else { return };
        let next = batch::Args {
            from: last,
            ..args.clone()
        };
        self.ahead = Some(batch::Running::start(
            self.ctx.clone(),
            self.ctx.prepared().expect("prepared before any batch"),
            c,
            !cur.main,
            next,
        ));
    }

    /// A connection a batch gives back goes home (unless it died with the batch).
    fn put_back(&mut self, main: bool, c: Option<ClientWrapper>) {
        let c = c.filter(|c| !c.is_closed());
        if main {
            self.conn = c;
        } else {
            self.spare = c;
        }
    }

    /// One page of the held range's retry pass.
    async fn retry(&mut self, size: u64) -> Result<Outcome> {
        self.settle_ahead().await;
        let ctx = self.ctx.clone();
        let p = ctx.prepared()?;
        let mut held = self.held.take().expect("a range is held");
        let (n, epoch) = (held.range_no, held.epoch);
        let limit = self.limit();
        let result = match self.conn().await {
            Ok(c) => {
                held.retry
                    .step(c, &p, &ctx.job, (n, epoch), size, &ctx.limits, limit)
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
        self.settle_ahead().await;
        if let Some(h) = &self.held {
            return Ok(Claim::Got(format!("range {}", h.range_no)));
        }
        let ctx = self.ctx.clone();
        let p = ctx.prepared()?;
        let owner = self.owner.clone();
        let limit = self.limit();
        let c = self.conn().await?;
        let what = "looking for a range to claim";
        let candidates: Vec<i32> = answered(limit, what, async {
            c.query(&p.sql.candidates, &[&ctx.job])
                .await
                .map_err(|e| db_error(what, &e))
        })
        .await?
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
            let what = "claiming a range";
            let taken = answered(limit, what, async {
                if !advisory::try_lock(c, &key, false, what).await? {
                    return Ok(None);
                }
                let taken = c
                    .query_opt(&p.sql.take, &[&ctx.job, &n, &owner])
                    .await
                    .map_err(|e| db_error(what, &e))?;
                if taken.is_none() {
                    // Finished by someone else in the meantime.
                    advisory::unlock(c, &key, false, "unlocking a range").await?;
                    return Ok(Some(None));
                }
                let paused: bool = c
                    .query_one(&p.sql.paused, &[&ctx.job])
                    .await
                    .map_err(|e| db_error("reading the pause flag", &e))?
                    .get(0);
                Ok(Some(taken.map(|r| (r, paused))))
            })
            .await?;
            let Some(taken) = taken else {
                held += 1;
                continue;
            };
            let Some((r, paused)) = taken else {
                continue;
            };
            self.paused = paused;
            let status: String = r.get(1);
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
        self.settle_ahead().await;
        let Some(h) = self.held.take() else {
            return Ok(());
        };
        let ctx = self.ctx.clone();
        let p = ctx.prepared()?;
        let limit = self.limit();
        if let Some(c) = self.conn.as_ref() {
            let what = "releasing the range";
            answered(limit, what, async {
                c.execute(&p.sql.release, &[&ctx.job, &h.range_no, &h.epoch])
                    .await
                    .map_err(|e| db_error(what, &e))
            })
            .await?;
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
            self.settle_ahead().await;
            let ctx = self.ctx.clone();
            let p = ctx.prepared()?;
            let limit = self.limit();
            let c = self.conn().await?;
            let what = "reading the pause flag";
            self.paused = answered(limit, what, async {
                c.query_one(&p.sql.paused, &[&ctx.job])
                    .await
                    .map_err(|e| db_error(what, &e))
            })
            .await?
            .get(0);
        }
        Ok(self.paused)
    }

    async fn settle(&mut self) {
        self.settle_ahead().await;
    }

    fn reset_connection(&mut self) {
        // A batch walked ahead rolls back when its task sees it will never be told to go on.
        self.ahead = None;
        self.spare = None;
        self.conn = None;
        self.held = None;
    }

    async fn close(&mut self) {
        self.settle_ahead().await;
        self.spare = None;
        let limit = self.limit();
        if let Some(c) = self.conn.take() {
            // The slot, the job's shared lock and any range lock, all at once (a connection
            // that does not answer is dropped: its session's locks go when the server ends it).
            let what = "releasing the worker's locks";
            if let Err(e) = answered(limit, what, async {
                c.execute("SELECT pg_advisory_unlock_all()", &[])
                    .await
                    .map_err(|e| db_error(what, &e))
            })
            .await
            {
                tracing::debug!("{e}");
            }
        }
        self.held = None;
    }
}
