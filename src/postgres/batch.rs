//! One keyset batch as a task that owns its connection: lock the range's next keys, then, when
//! told to go on, run the statement, advance the range's checkpoint and commit, all in one
//! transaction. The checkpoint is fenced twice: by the claim's epoch and by the cursor the batch
//! walked from, so a batch walked ahead (while the batch before it was still running, on the
//! worker's other connection) commits only on top of that batch, never after its rollback.

use super::answer::{answer_limit, answered};
use super::errors::db_error;
use super::job::{Ctx, Prepared};
use super::raw::RawValue;
use super::store::{DONE, RETRYING};
use crate::engine::Timings;
use crate::error::{DbErrorKind, Error, Result};
use crate::spec::LockMode;
use deadpool_postgres::{ClientWrapper, Transaction};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::IsolationLevel;
use tokio_postgres::types::ToSql;

/// Which range, from where, how many keys.
#[derive(Debug, Clone)]
pub struct Args {
    pub range_no: i32,
    pub epoch: i64,
    /// The range's checkpoint this batch walks from (and must still find when it commits).
    pub from: Option<String>,
    pub hi: Option<String>,
    pub size: i64,
}

/// What the walk found, known before the statement runs.
#[derive(Debug, Clone)]
pub struct Walked {
    /// The batch took as many keys as it asked for: the range may go on after `last`.
    pub full: bool,
    pub last: Option<String>,
}

/// A committed batch.
#[derive(Debug, Clone, Default)]
pub struct Done {
    pub walked: u64,
    pub rows: u64,
    pub skipped: u64,
    /// The cursor after this batch (`None`: unchanged).
    pub last: Option<String>,
    /// The range's new status when its walk is over (`done`, or `retrying` for skipped rows).
    pub next: Option<&'static str>,
    /// The job's pause flag, read with the checkpoint.
    pub paused: bool,
    pub timings: Timings,
}

/// How a batch ended. `Lost`: the fence refused the checkpoint and the batch rolled back.
/// `Abandoned`: it was rolled back before its statement ran.
pub enum End {
    Committed(Done),
    Lost,
    Abandoned,
}

/// A batch running on a connection it owns until it ends.
pub struct Running {
    pub args: Args,
    /// The batch runs on the worker's main connection (the one holding its advisory locks).
    pub main: bool,
    walked: Option<oneshot::Receiver<Walked>>,
    go: Option<oneshot::Sender<()>>,
    task: JoinHandle<(ClientWrapper, Result<End>)>,
}

impl Running {
    /// Start the batch: it begins, walks, and then waits to be told to go on.
    pub fn start(
        ctx: Arc<Ctx>,
        p: Arc<Prepared>,
        conn: ClientWrapper,
        main: bool,
        args: Args,
    ) -> Running {
        let (walked_tx, walked_rx) = oneshot::channel();
        let (go_tx, go_rx) = oneshot::channel();
        let a = args.clone();
        let task = tokio::spawn(async move {
            let mut conn = conn;
            let r = run(&ctx, &p, &mut conn, &a, walked_tx, go_rx).await;
            (conn, r)
        });
        Running {
            args,
            main,
            walked: Some(walked_rx),
            go: Some(go_tx),
            task,
        }
    }

    /// What the walk found; `None` if the batch ended without one (its error comes from
    /// `finish`).
    pub async fn walked(&mut self) -> Option<Walked> {
        match self.walked.take() {
            Some(rx) => rx.await.ok(),
            None => None,
        }
    }

    /// Let the batch run its statement and commit; its connection comes back unless the task
    /// died with it.
    pub async fn finish(mut self) -> (Option<ClientWrapper>, Result<End>) {
        if let Some(go) = self.go.take() {
            let _ = go.send(());
        }
        join(self.task).await
    }

    /// Roll the batch back (its locks go with it) and get the connection back.
    pub async fn abandon(mut self) -> Option<ClientWrapper> {
        self.go = None;
        join(self.task).await.0
    }
}

async fn join(
    task: JoinHandle<(ClientWrapper, Result<End>)>,
) -> (Option<ClientWrapper>, Result<End>) {
    match task.await {
        Ok((c, r)) => (Some(c), r),
        Err(e) => (
            None,
            Err(Error::Lost(format!(
                "internal: a batch task ended abnormally: {e}"
            ))),
        ),
    }
}

/// The batch's transaction. Returning before `commit` rolls everything back.
///
/// Under `skip_locked`, a statement that locks the rows it writes (`own_locks`) is tried
/// first on keys walked unlocked, in a REPEATABLE READ transaction: the statement then writes
/// against the snapshot the walk read, and a row of the batch that another transaction
/// holds, or changed since (its key moved, say), fails it (lock timeout, serialization
/// failure) instead of being passed over. Any failure of that try but a lost connection or a
/// statement timeout (a trigger that reads what the snapshot is too old to hold may fail it
/// too) sends the batch back to the start: READ COMMITTED, the locking walk, from the same
/// cursor to the range's end, exactly as any other statement's batch. Not with `walk_ahead`:
/// a batch walked ahead reads its snapshot before the batch before it commits its
/// checkpoint, which it then writes over.
async fn run(
    ctx: &Ctx,
    p: &Prepared,
    conn: &mut ClientWrapper,
    a: &Args,
    walked_tx: oneshot::Sender<Walked>,
    go: oneshot::Receiver<()>,
) -> Result<End> {
    let skip_locked = ctx.spec.lock == LockMode::SkipLocked;
    let tried = skip_locked && p.own_locks && !ctx.ahead;
    let limit = answer_limit(&ctx.limits);
    let mut tx = begin(limit, conn, tried).await?;
    let t0 = Instant::now();
    let (walk_sql, params): (&str, Vec<&(dyn ToSql + Sync)>) = if skip_locked && !tried {
        (
            &p.sql.walk,
            vec![&a.size, &ctx.job, &a.range_no, &a.from, &a.hi],
        )
    } else {
        (&p.sql.walk_free, vec![&a.size, &a.from, &a.hi])
    };
    let mut keys = walk(limit, &tx, p, walk_sql, &params).await?;
    let t1 = Instant::now();
    let _ = walked_tx.send(Walked {
        full: (keys.walked as i64) >= a.size,
        last: keys.top.clone(),
    });
    if go.await.is_err() {
        // The transaction rolls back as it is dropped.
        return Ok(End::Abandoned);
    }
    let t1b = Instant::now();
    let what = "running statement";
    let rows = if keys.keys.is_none() {
        0
    } else if tried {
        let first = answered(limit, what, async {
            let (set, n) = tokio::join!(
                tx.batch_execute(&p.sql.try_begin),
                statement(&tx, ctx, p, &keys)
            );
            set.map_err(|e| db_error(what, &e))?;
            n
        })
        .await;
        match first {
            Ok(n) => {
                exec(limit, &tx, &p.sql.try_keep, what).await?;
                n
            }
            Err(e) if retried_locking(&e) => {
                tracing::debug!("the batch locks its keys first: {e}");
                let undo = "rolling the try back";
                answered(limit, undo, async {
                    tx.rollback().await.map_err(|e| db_error(undo, &e))
                })
                .await?;
                tx = begin(limit, conn, false).await?;
                let params: Vec<&(dyn ToSql + Sync)> =
                    vec![&a.size, &ctx.job, &a.range_no, &a.from, &a.hi];
                keys = walk(limit, &tx, p, &p.sql.walk, &params).await?;
                match keys.keys {
                    Some(_) => answered(limit, what, statement(&tx, ctx, p, &keys)).await?,
                    None => 0,
                }
            }
            Err(e) => return Err(e),
        }
    } else {
        answered(limit, what, statement(&tx, ctx, p, &keys)).await?
    };
    // The walk the statement ran on (the second, if the try went back to the start).
    let (walked, skipped, last) = (keys.walked, keys.skipped, keys.top);
    let full = (walked as i64) >= a.size;
    let t2 = Instant::now();
    // A short batch scanned to the end of the range: its walk is over. The range is done in
    // the same transaction, or waits for its retry pass if rows were skipped: by this run, or
    // by an earlier one under `skip_locked` when this one resumed with `lock: none`.
    let next: Option<&'static str> = if !full {
        let what = "counting skipped rows";
        let waiting: i64 = answered(limit, what, async {
            tx.query_one(&p.sql.skipped_count, &[&ctx.job, &a.range_no])
                .await
                .map_err(|e| db_error(what, &e))
        })
        .await?
        .get(0);
        Some(if waiting == 0 { DONE } else { RETRYING })
    } else {
        None
    };
    let what = "preparing the checkpoint";
    let advance = answered(limit, what, async {
        tx.prepare_cached(&p.sql.advance_walk)
            .await
            .map_err(|e| db_error(what, &e))
    })
    .await?;
    let what = "writing the checkpoint";
    let fenced = answered(limit, what, async {
        tx.query_opt(
            &advance,
            &[
                &ctx.job,
                &a.range_no,
                &a.epoch,
                &last,
                &(walked as i64),
                &(rows as i64),
                &0i64,
                &i64::from(walked > 0),
                &next,
                &a.from,
            ],
        )
        .await
        .map_err(|e| db_error(what, &e))
    })
    .await?;
    let Some(fenced) = fenced else {
        return Ok(End::Lost);
    };
    let what = "committing the batch";
    answered(limit, what, async {
        tx.commit().await.map_err(|e| db_error(what, &e))
    })
    .await?;
    Ok(End::Committed(Done {
        walked,
        rows,
        skipped,
        last,
        next,
        paused: fenced.get::<_, Option<bool>>(0).unwrap_or(false),
        timings: Timings {
            select: t1 - t0,
            statement: t2 - t1b,
            commit: t2.elapsed(),
        },
    }))
}

/// Whether a failed try of a statement that locks its own rows goes back to the start of its
/// batch with the locking walk: not when the connection is lost or the statement ran out of
/// time (it would only take as long again).
fn retried_locking(e: &Error) -> bool {
    !matches!(
        e.db_kind(),
        None | Some(DbErrorKind::ConnectionLost | DbErrorKind::StatementTimeout)
    )
}

/// A walk's answer: the keys to run the statement with and what the walk counted.
struct Keys {
    keys: Option<RawValue>,
    /// The key the cursor moves to (as text): the last walked, or the range's last key.
    top: Option<String>,
    first: Option<RawValue>,
    last: Option<RawValue>,
    walked: u64,
    skipped: u64,
}

impl Keys {
    fn from_row(row: &tokio_postgres::Row) -> Keys {
        Keys {
            keys: row.get(0),
            top: row.get(1),
            walked: row.get::<_, i64>(2) as u64,
            skipped: row.get::<_, i64>(3) as u64,
            first: row.get(4),
            last: row.get(5),
        }
    }
}

/// The spec's statement over the batch's keys (`$1`, and `$2`/`$3` if it uses them).
async fn statement(tx: &Transaction<'_>, ctx: &Ctx, p: &Prepared, k: &Keys) -> Result<u64> {
    let what = "preparing statement";
    let st = tx
        .prepare_cached(&ctx.spec.statement)
        .await
        .map_err(|e| db_error(what, &e))?;
    let params: Vec<&(dyn ToSql + Sync)> = if p.info.statement_params == 3 {
        vec![&k.keys, &k.first, &k.last]
    } else {
        vec![&k.keys]
    };
    tx.execute(&st, &params)
        .await
        .map_err(|e| db_error("running statement", &e))
}

/// One simple-protocol command of the batch's own (a savepoint, a `SET LOCAL`).
async fn exec(
    limit: Option<std::time::Duration>,
    tx: &Transaction<'_>,
    sql: &str,
    what: &'static str,
) -> Result<()> {
    answered(limit, what, async {
        tx.batch_execute(sql).await.map_err(|e| db_error(what, &e))
    })
    .await
}

/// The batch's transaction: REPEATABLE READ for a statement tried on keys walked unlocked,
/// else the session's default (READ COMMITTED unless the url's options say otherwise).
async fn begin(
    limit: Option<std::time::Duration>,
    conn: &mut ClientWrapper,
    repeatable: bool,
) -> Result<Transaction<'_>> {
    let what = "starting the batch transaction";
    answered(limit, what, async {
        let tx = if repeatable {
            conn.build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .start()
                .await
        } else {
            conn.transaction().await
        };
        tx.map_err(|e| db_error(what, &e))
    })
    .await
}

/// The batch's `SET LOCAL`s and its walk, sent together (one round trip).
async fn walk(
    limit: Option<std::time::Duration>,
    tx: &Transaction<'_>,
    p: &Prepared,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Keys> {
    let what = "preparing the batch query";
    let st = answered(limit, what, async {
        tx.prepare_cached(sql).await.map_err(|e| db_error(what, &e))
    })
    .await?;
    let row = answered(limit, "selecting the batch's keys", async {
        let (set, row) = tokio::join!(
            tx.batch_execute(&p.sql.begin_locals),
            tx.query_one(&st, params)
        );
        set.map_err(|e| db_error("starting the batch transaction", &e))?;
        row.map_err(|e| db_error("selecting the batch's keys", &e))
    })
    .await?;
    Ok(Keys::from_row(&row))
}
