//! One job from start to end in this process: run window, worker slots, skip-if-done,
//! preflight, the store, the workers' driver loops, verify, and the status written back.

use super::driver::{Shared, drive};
use super::window::Position;
use super::{Backend, Gate, Stop};
use crate::error::{Error, Result, StopReason};
use crate::progress::{Progress, Totals, fmt_duration};
use crate::spec::Spec;
use crate::state::Status;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

/// The longest a progress refresh may hold the loop that collects the workers' results.
const ESTIMATE_REFRESH: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Run finished jobs again from the start.
    pub rerun: bool,
    /// Start even when preflight finds lock holders or old transactions.
    pub ignore_preflight: bool,
    /// Interval of the progress log line (when stderr is not a terminal).
    pub progress_every: Duration,
    /// Worker threads of this process (`--workers`); default: the spec's `workers`.
    pub workers: Option<u32>,
}

/// What happened to one job in this run.
#[derive(Debug)]
pub enum Ran {
    /// Worked on it (to the end, or until `error`).
    Worked {
        totals: Totals,
        elapsed: Duration,
        workers: u32,
        error: Option<Error>,
    },
    /// Already done; nothing to do. `changed` when its spec differs from the one that finished.
    Skipped { changed: bool },
}

#[derive(Debug)]
pub struct JobReport {
    pub job: String,
    pub ran: Ran,
}

impl JobReport {
    /// One line for the run summary.
    pub fn summary(&self) -> String {
        match &self.ran {
            Ran::Skipped { changed: false } => format!("{}: skipped (already done)", self.job),
            Ran::Skipped { changed: true } => format!(
                "{}: skipped — already done, but its spec changed since; use --rerun to run it again",
                self.job
            ),
            Ran::Worked {
                totals: t,
                elapsed,
                workers,
                error,
            } => {
                let head = match error {
                    None => "done".to_string(),
                    Some(Error::Stopped(r)) => format!("stopped ({r}); run again to resume"),
                    Some(_) => "FAILED".to_string(),
                };
                let throttled = if t.throttled.is_zero() {
                    String::new()
                } else {
                    format!(", throttled {}", fmt_duration(t.throttled))
                };
                let by = if *workers > 1 {
                    format!(" by {workers} workers")
                } else {
                    String::new()
                };
                format!(
                    "{}: {head} — {} keys, {} rows changed, {} batches, {} rows retried after \
                     being locked, in {}{by}{throttled}",
                    self.job,
                    t.keys,
                    t.rows,
                    t.batches,
                    t.retried,
                    fmt_duration(*elapsed)
                )
            }
        }
    }

    /// Whether the job failed (not stopped, not skipped).
    pub fn failed(&self) -> bool {
        matches!(&self.ran, Ran::Worked { error: Some(e), .. } if !matches!(e, Error::Stopped(_)))
    }
}

/// Run one job. Errors before any work (window, slots taken, preflight) come back as `Err`;
/// errors during the work come back inside the report, after the store has recorded them.
/// Either way the status metric says how it ended: an `Err` that is not a stop exports
/// `failed` (a missing table, a connection refused), so a dashboard never shows nothing.
pub async fn run_job<B: Backend>(
    spec: &Spec,
    backend: Arc<B>,
    opts: &RunOptions,
    stop: &Stop,
    gate: Option<Gate>,
) -> Result<JobReport> {
    let report = run(spec, backend, opts, stop, gate).await;
    if let Err(e) = &report {
        crate::metrics::not_started(&spec.name, e);
    }
    report
}

/// How a job's start-up ended: nothing to do, or ready to write its checkpoint.
enum Startup<W> {
    Skipped(JobReport),
    Ready {
        /// A finished job run again (`--rerun`): its checkpoint starts over.
        restart: bool,
        /// `stop`, with the run window's end.
        stop: Stop,
        workers: Vec<W>,
    },
}

/// Everything before the job's first write: its state, the run window, worker slots,
/// blockers and preflight.
async fn startup<B: Backend>(
    spec: &Spec,
    backend: &B,
    opts: &RunOptions,
    stop: &Stop,
) -> Result<Startup<B::Worker>> {
    let job = spec.name.as_str();
    // The first contact is not retried: an unreachable server or a refused login is reported
    // at once. After it, start-up goes on after a lost connection, like the end of a run:
    // nothing is written until `start`, which is one transaction and can be run again. That
    // holds from the first read on: a session ended while the state is read (the server
    // reached, then lost) is the database's failure, not a wrong address.
    let existing = match backend.load().await {
        Err(e @ Error::Db { .. })
            if e.db_kind() == Some(crate::error::DbErrorKind::ConnectionLost) =>
        {
            tracing::warn!(job, "reading the job's state failed, retrying: {e}");
            reconnecting("reading the job's state", || backend.load()).await?
        }
        other => other?,
    };
    let mut restart = false;
    if let Some(s) = &existing {
        let changed = !spec.hash_is(&s.spec_hash);
        if s.status == Status::Done {
            if !opts.rerun {
                if changed {
                    tracing::warn!(
                        job,
                        "finished job's spec changed since it ran; left alone (use --rerun)"
                    );
                }
                crate::metrics::status(job, "skipped");
                return Ok(Startup::Skipped(JobReport {
                    job: job.into(),
                    ran: Ran::Skipped { changed },
                }));
            }
            restart = true;
        } else if opts.rerun
            && matches!(s.status, Status::Running | Status::Stopped)
            && s.units_total > 0
            && s.units_done == s.units_total
        {
            // Every unit done, the status not yet `done`: a runner is concluding (its final
            // verify, with no worker left to show as live), or stopped or died doing so. The
            // walk is finished: --rerun starts it over, and that runner's `done` is then
            // refused (`finish`), not written over this run.
            restart = true;
        } else if changed {
            tracing::warn!(
                job,
                "spec changed since the last checkpoint; resuming at the checkpoint with the new spec"
            );
        }
    }
    // The window before anything is written: started outside it, nothing is touched. (A
    // finished job is skipped above whatever the window: there is nothing left to wait for.)
    let stop = match &spec.window {
        None => stop.clone(),
        Some(w) => match w.position(jiff::Timestamp::now()) {
            Position::Outside { opens } => {
                return Err(Error::Stopped(StopReason::Window(format!(
                    "outside the run window {} (opens next at {})",
                    w.text(),
                    opens.strftime("%Y-%m-%d %H:%M %Z")
                ))));
            }
            Position::Inside { ends } => {
                let left =
                    ends.timestamp().as_millisecond() - jiff::Timestamp::now().as_millisecond();
                let left =
                    Duration::from_millis(left.max(0) as u64).min(Duration::from_secs(366 * 86400));
                stop.with_window_end(
                    Instant::now() + left,
                    format!("the run window {} closed", w.text()),
                )
            }
        },
    };
    // Slots before anything is written: a runner beyond `workers` exits 75 touching nothing.
    let threads = opts.workers.unwrap_or(spec.workers).max(1);
    let cap = spec.workers.max(threads);
    let mut workers = Vec::new();
    let mut held_by = String::new();
    for i in 0..threads {
        match reconnecting("joining the job", || backend.join(i, cap)).await? {
            Ok(w) => workers.push(w),
            Err(who) => {
                held_by = who;
                break;
            }
        }
    }
    if workers.is_empty() {
        return Err(Error::Stopped(StopReason::LockHeld(held_by)));
    }
    if workers.len() < threads as usize {
        tracing::warn!(
            job,
            "only {} of {threads} worker(s) could join: {held_by}",
            workers.len()
        );
    }
    // Blockers first: the schema checks take the table's ACCESS SHARE lock, which would queue
    // behind the very lock holder this is meant to report.
    let blockers = reconnecting("looking for blocking sessions", || backend.blockers()).await?;
    if !blockers.is_empty() {
        let list = blockers.join("\n  ");
        if !opts.ignore_preflight {
            return Err(Error::Stopped(StopReason::Preflight(format!(
                "\n  {list}\nwait for them or end them (pg_terminate_backend), or pass --ignore-preflight"
            ))));
        }
        tracing::warn!("starting despite --ignore-preflight:\n  {list}");
    }
    reconnecting("checking the spec against the database", || {
        backend.preflight()
    })
    .await?;
    Ok(Startup::Ready {
        restart,
        stop,
        workers,
    })
}

async fn run<B: Backend>(
    spec: &Spec,
    backend: Arc<B>,
    opts: &RunOptions,
    stop: &Stop,
    gate: Option<Gate>,
) -> Result<JobReport> {
    let job = spec.name.as_str();
    let stop = stop.with_deadline(spec.limits.max_runtime);
    // Nothing is written before `start`: a stop during start-up (a connect that hangs, a
    // preflight waiting on a lock) ends it at once, as stopped.
    let (restart, stop, workers) = match stop
        .or_stopped(startup(spec, backend.as_ref(), opts, &stop))
        .await?
    {
        Startup::Skipped(report) => return Ok(report),
        Startup::Ready {
            restart,
            stop,
            workers,
        } => (restart, stop, workers),
    };
    let state = reconnecting("writing the checkpoint", || {
        backend.start(
            &spec.hash,
            match (restart, opts.rerun) {
                (true, _) => crate::engine::Start::Over,
                (false, true) => crate::engine::Start::Knowingly,
                (false, false) => crate::engine::Start::Resume,
            },
        )
    })
    .await?;
    crate::metrics::status(job, "running");
    crate::metrics::deadline(job, stop.ends_at());
    // Exported from the start (0), so a dashboard or an alert sees the series before a pause.
    crate::metrics::paused(job, false);
    let estimate = reconnecting("estimating the work", || backend.estimate()).await?;
    let remaining = estimate.rows + estimate.pending_retry;
    tracing::info!(
        job,
        remaining,
        workers = workers.len(),
        "starting {} (~{remaining} rows to go by the estimate) with {} worker(s)",
        state.resume.as_deref().unwrap_or("at the start"),
        workers.len()
    );
    let shared = Arc::new(Shared {
        job: job.to_string(),
        batch: spec.batch.clone(),
        stop: stop.for_job(),
        gate,
        progress: std::sync::Mutex::new(Progress::new(job, estimate, opts.progress_every)),
        still_locked: AtomicU64::new(0),
        units: tokio::sync::watch::Sender::new(0),
    });
    let count = workers.len() as u32;
    // While the workers run, the throttle's reason goes to the store whenever it changes, so
    // `status` in another process says why the job waits.
    let watch = async {
        let Some(gate) = shared.gate.as_ref() else {
            return std::future::pending::<()>().await;
        };
        let mut told: Option<String> = None;
        loop {
            let now = gate.closed();
            if now != told {
                match backend.note_throttled(now.as_deref()).await {
                    Ok(()) => told = now,
                    Err(e) => tracing::debug!(job, "recording the throttle: {e}"),
                }
            }
            tokio::time::sleep(gate.interval).await;
        }
    };
    let result = tokio::select! {
        r = run_workers(backend.as_ref(), workers, &shared) => r,
        () = watch => unreachable!("the throttle watch never ends"),
    };
    shared.progress.lock().expect("progress lock").finish();
    let result = match result {
        Ok(()) => {
            reconnecting("checking that the job is done", || {
                conclude(spec, backend.as_ref())
            })
            .await
        }
        Err(e) => Err(e),
    };
    let (status, message) = match &result {
        Ok(()) => (Status::Done, None),
        Err(Error::Stopped(r)) => (Status::Stopped, Some(r.to_string())),
        // A lock held elsewhere past lock_timeout outside the batches (the final verify, the
        // store): stopped, to be run again, as a batch's exhausted lock retries are.
        Err(
            e @ Error::Db {
                kind: crate::error::DbErrorKind::LockTimeout,
                ..
            },
        ) => (Status::Stopped, Some(e.to_string())),
        Err(e) => (Status::Failed, Some(e.to_string())),
    };
    crate::metrics::status(job, status.as_str());
    let message = message.map(|m| crate::redact::redact(&m).into_owned());
    let recorded = reconnecting("recording the job's status", || {
        backend.finish(status, message.as_deref())
    })
    .await;
    let result = match recorded {
        Ok(()) => result,
        // `done` refused: another runner started the job over (a --rerun, a reset) while this
        // one concluded; that run owns the job now.
        Err(e @ Error::Stopped(_)) if result.is_ok() => Err(e),
        Err(e) => {
            // The work's checkpoints are committed; only the final status could not be
            // written.
            tracing::error!(
                job,
                "could not record the job's status ({}): {e}",
                status.as_str()
            );
            result
        }
    };
    let progress = shared.progress.lock().expect("progress lock");
    Ok(JobReport {
        job: job.into(),
        ran: Ran::Worked {
            totals: progress.totals,
            elapsed: progress.elapsed(),
            workers: count,
            error: result.err(),
        },
    })
}

/// Run `f`, again after a lost connection (a restart, a terminated session) with backoff: the
/// work is committed, and a connection that can be opened again must not fail the run.
async fn reconnecting<T, F, Fut>(what: &str, f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    use backon::{ExponentialBuilder, Retryable};
    f.retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(8)
            .with_jitter(),
    )
    .when(|e: &Error| e.db_kind() == Some(crate::error::DbErrorKind::ConnectionLost))
    .notify(|e, d| tracing::warn!("{what} failed, retrying in {}ms: {e}", d.as_millis()))
    .await
}

/// Every unit is finished: the job is done if its `verify:` query agrees.
async fn conclude<B: Backend>(spec: &Spec, backend: &B) -> Result<()> {
    if !backend.all_done().await? {
        // Workers only end without an error when no unit is left; another process may have
        // reopened work (a --rerun) in between.
        return Err(Error::Stopped(StopReason::LockHeld(
            "another runner (the job was restarted while this one finished)".into(),
        )));
    }
    match backend.verify().await? {
        None | Some(0) => Ok(()),
        Some(n) => Err(Error::Verify(format!(
            "{}: verify returned {n}, not 0: the job is not done although every unit ran; \
             fix the cause, then run again (the check runs again)",
            spec.name
        ))),
    }
}

/// Run the workers to the end; the first failure stops the others at their next boundary.
async fn run_workers<B: Backend>(
    backend: &B,
    workers: Vec<B::Worker>,
    shared: &Arc<Shared>,
) -> Result<()> {
    let mut set = tokio::task::JoinSet::new();
    for mut w in workers {
        let sh = shared.clone();
        set.spawn(async move {
            let r = drive(&mut w, &sh).await;
            if let Err(e) = &r
                && !matches!(e, Error::Stopped(_))
            {
                sh.stop.abort(StopReason::Aborted);
            }
            drop(w);
            r
        });
    }
    crate::metrics::workers(&shared.job, set.len());
    let mut failure: Option<Error> = None;
    let mut stopped: Option<StopReason> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            joined = set.join_next() => {
                let Some(joined) = joined else { break };
                crate::metrics::workers(&shared.job, set.len());
                match joined {
                    Ok(Ok(())) => {}
                    Ok(Err(Error::Stopped(r))) => {
                        if stopped.is_none() || stopped == Some(StopReason::Aborted) {
                            stopped = Some(r);
                        }
                    }
                    Ok(Err(e)) => {
                        failure.get_or_insert(e);
                    }
                    Err(panic) => {
                        failure.get_or_insert(Error::fatal(format!("a worker panicked: {panic}")));
                        shared.stop.abort(StopReason::Aborted);
                    }
                }
            }
            _ = tick.tick() => {
                let due = shared.progress.lock().expect("progress lock").needs_refresh();
                if due {
                    // Bounded: the workers' results and the stop wait on this loop.
                    match tokio::time::timeout(ESTIMATE_REFRESH, backend.estimate()).await {
                        Ok(Ok(e)) => shared.progress.lock().expect("progress lock").refresh(e),
                        Ok(Err(e)) => tracing::debug!(error = %e, "could not refresh the estimate"),
                        Err(_) => tracing::debug!("the estimate took too long; kept the last one"),
                    }
                }
            }
        }
    }
    match (failure, stopped) {
        (Some(e), _) => Err(e),
        (None, Some(r)) => Err(Error::Stopped(r)),
        (None, None) => Ok(()),
    }
}
