//! The driver loop, one per worker: claim a unit -> (stop, pause and throttle checks -> batch ->
//! progress)* -> claim the next, until no unit is left. It owns sizing, retries with backoff and
//! stopping; the backend's worker runs one fenced batch at a time.

use super::{Claim, Gate, Sizer, Stop, Worker};
use crate::error::{DbErrorKind, Error, Result, StopReason};
use crate::progress::Progress;
use crate::spec::Batch;
use backon::{BackoffBuilder, ExponentialBuilder};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often an idle worker looks for a unit again (others hold the rest).
const IDLE_POLL: Duration = Duration::from_secs(2);
/// How often a paused worker asks whether the job is still paused.
const PAUSE_POLL: Duration = Duration::from_secs(1);

/// How transient failures are retried before the job fails.
fn backoff() -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_max_times(8)
        .with_jitter()
        .build()
}

/// What the workers of one job in this process share.
pub struct Shared {
    pub job: String,
    pub batch: Batch,
    pub stop: Stop,
    pub gate: Option<Gate>,
    pub progress: Mutex<Progress>,
    /// Rows still locked in units this process gave up on for this run.
    pub still_locked: AtomicU64,
    /// Bumped whenever a worker of this process lets go of a unit (finished, parked, released)
    /// or ends: idle workers look for work again at once instead of at their next poll (the
    /// last unit of a job must not leave the others asleep for up to `IDLE_POLL`).
    pub units: watch::Sender<u64>,
}

impl Shared {
    /// Tell idle workers that a unit was let go of.
    fn let_go(&self) {
        self.units.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Run one worker until the job is done (`Ok`), a stop is requested, or it fails for good.
pub async fn drive<W: Worker>(w: &mut W, sh: &Shared) -> Result<()> {
    let mut sizer = Sizer::new(&sh.batch);
    let mut retries: Option<Box<dyn Iterator<Item = Duration> + Send>> = None;
    let mut claimed = false;
    let mut units = sh.units.subscribe();
    let result = loop {
        if let Some(reason) = sh.stop.check() {
            break Err(Error::Stopped(reason));
        }
        let step = if claimed {
            work(w, sh, &mut sizer).await
        } else {
            // Units let go of from now on wake this worker if it finds nothing.
            units.borrow_and_update();
            find(w, sh).await
        };
        match step {
            Ok(Step::Claimed) => {
                claimed = true;
                retries = None;
            }
            Ok(Step::Batch { unit_done, pause }) => {
                retries = None;
                if unit_done {
                    claimed = false;
                    sh.let_go();
                }
                if !pause.is_zero() {
                    w.settle().await;
                    if let Some(reason) = sh.stop.sleep(pause).await {
                        break Err(Error::Stopped(reason));
                    }
                }
            }
            Ok(Step::Idle) => {
                let woken = tokio::select! {
                    stopped = sh.stop.sleep(IDLE_POLL) => stopped,
                    _ = units.changed() => sh.stop.check(),
                };
                if let Some(reason) = woken {
                    break Err(Error::Stopped(reason));
                }
            }
            Ok(Step::Waited) => {}
            Ok(Step::JobDone) => break Ok(()),
            Ok(Step::End(reason)) => break Err(Error::Stopped(reason)),
            Err(Error::Lost(why)) => {
                tracing::warn!(job = %sh.job, worker = w.name(), "{why}; claiming again");
                crate::metrics::retry(&sh.job, "claim_lost");
                claimed = false;
            }
            Err(Error::Stopped(StopReason::RowsStillLocked(n))) => {
                // This unit's last rows are held by other transactions: leave it for the next
                // run and go on with the others.
                sh.still_locked.fetch_add(n, Ordering::SeqCst);
                if let Err(e) = w.give_up().await {
                    tracing::debug!(job = %sh.job, "giving up the unit: {e}");
                    w.reset_connection();
                }
                claimed = false;
            }
            Err(e) => {
                let kind = e.db_kind();
                match kind {
                    Some(DbErrorKind::StatementTimeout) if claimed && sizer.halve() => {
                        crate::metrics::retry(&sh.job, e.retry_reason());
                        tracing::warn!(
                            job = %sh.job, worker = w.name(), next = sizer.size(),
                            "batch hit statement_timeout; retrying at half the size: {e}"
                        );
                    }
                    // Halved down to batch.min and still too slow: say what to change.
                    Some(DbErrorKind::StatementTimeout) if claimed => {
                        break Err(Error::Db {
                            message: format!(
                                "{e}; the batch hit limits.statement_timeout even at the \
                                 smallest batch size ({} keys, batch.min): raise \
                                 limits.statement_timeout, or make the statement cheaper per \
                                 key (an index for what it joins or filters on)",
                                sizer.size()
                            ),
                            kind: DbErrorKind::StatementTimeout,
                        });
                    }
                    Some(k) if k.retryable() => {
                        if k == DbErrorKind::ConnectionLost {
                            w.reset_connection();
                            claimed = false;
                        }
                        crate::metrics::retry(&sh.job, e.retry_reason());
                        let delay = retries.get_or_insert_with(|| Box::new(backoff())).next();
                        let Some(delay) = delay else {
                            // Waiting on another session's lock, or meeting its transactions
                            // head-on, is no failure of the job: it stops with its progress
                            // saved, to run again later (75).
                            break Err(match k {
                                DbErrorKind::LockTimeout => {
                                    Error::Stopped(StopReason::LockWait(e.to_string()))
                                }
                                DbErrorKind::Deadlock | DbErrorKind::Serialization => {
                                    Error::Stopped(StopReason::Conflict(e.to_string()))
                                }
                                _ => e,
                            });
                        };
                        tracing::warn!(
                            job = %sh.job, worker = w.name(),
                            "batch failed, retrying in {}ms: {e}", delay.as_millis()
                        );
                        w.settle().await;
                        if let Some(reason) = sh.stop.sleep(delay).await {
                            break Err(Error::Stopped(reason));
                        }
                    }
                    _ => break Err(e),
                }
            }
        }
    };
    if claimed && let Err(e) = w.release().await {
        // The claim also ends with the connection; nothing more to do.
        tracing::debug!(job = %sh.job, "releasing the unit: {e}");
    }
    w.close().await;
    sh.let_go();
    result
}

enum Step {
    Claimed,
    Batch {
        unit_done: bool,
        pause: Duration,
    },
    /// Nothing to claim now; others are working.
    Idle,
    /// Waited for the pause or the throttle; check the stop conditions again.
    Waited,
    JobDone,
    /// Nothing left this worker can do in this run.
    End(StopReason),
}

async fn find<W: Worker>(w: &mut W, sh: &Shared) -> Result<Step> {
    match w.claim().await? {
        Claim::Got(label) => {
            tracing::debug!(job = %sh.job, worker = w.name(), "claimed {label}");
            Ok(Step::Claimed)
        }
        Claim::Nothing { all_done: true, .. } => Ok(Step::JobDone),
        Claim::Nothing {
            held: 0,
            blocked: 1..,
            ..
        } => Ok(Step::End(StopReason::RowsStillLocked(
            sh.still_locked.load(Ordering::SeqCst),
        ))),
        Claim::Nothing { .. } => Ok(Step::Idle),
    }
}

async fn work<W: Worker>(w: &mut W, sh: &Shared, sizer: &mut Sizer) -> Result<Step> {
    if w.paused().await? {
        w.settle().await;
        wait_paused(w, sh).await?;
        return Ok(Step::Waited);
    }
    if let Some(gate) = &sh.gate
        && let Some(why) = gate.closed()
    {
        w.settle().await;
        wait_for_gate(gate, &why, sh).await?;
        return Ok(Step::Waited);
    }
    let size = sizer.size();
    let started = Instant::now();
    let out = w.step(size).await?;
    let took = started.elapsed();
    sizer.observe(out.keys + out.retried, took);
    if let Some(cap) = out.size_hint {
        sizer.cap(cap);
    }
    sh.progress
        .lock()
        .expect("progress lock")
        .record(&out, took, size, w.name());
    let pause = out.backoff.unwrap_or(sh.batch.pause);
    Ok(Step::Batch {
        unit_done: out.unit_done,
        pause,
    })
}

/// Wait while the job is paused; stop conditions still apply.
async fn wait_paused<W: Worker>(w: &mut W, sh: &Shared) -> Result<()> {
    tracing::info!(job = %sh.job, worker = w.name(), "paused (backfill pause); waiting for unpause");
    crate::metrics::paused(&sh.job, true);
    let started = Instant::now();
    let result = loop {
        if let Some(reason) = sh.stop.sleep(PAUSE_POLL).await {
            break Err(Error::Stopped(reason));
        }
        match w.paused().await {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    crate::metrics::paused(&sh.job, false);
    if result.is_ok() {
        tracing::info!(
            job = %sh.job, worker = w.name(),
            "unpaused after {}; going on", crate::progress::fmt_duration(started.elapsed())
        );
    }
    result
}

/// Pause while the throttle gate is closed; the deadline and signals still apply. The time is
/// recorded after every interval, not only when the gate opens, so the throttled-seconds metric
/// grows while the job is held (a dashboard shows throttling as it happens).
async fn wait_for_gate(gate: &Gate, why: &str, sh: &Shared) -> Result<()> {
    let started = Instant::now();
    tracing::info!(job = %sh.job, reason = why, "throttled: pausing ({why})");
    let mut counted = started;
    let mut stopped = None;
    while gate.closed().is_some() {
        let woke = sh.stop.sleep(gate.interval).await;
        let now = Instant::now();
        sh.progress
            .lock()
            .expect("progress lock")
            .add_throttled(now - counted);
        counted = now;
        if let Some(reason) = woke {
            stopped = Some(reason);
            break;
        }
    }
    let waited = started.elapsed();
    match stopped {
        Some(reason) => Err(Error::Stopped(reason)),
        None => {
            tracing::info!(
                job = %sh.job, throttled_ms = waited.as_millis() as u64,
                "throttle cleared after {}ms; resuming", waited.as_millis()
            );
            Ok(())
        }
    }
}
