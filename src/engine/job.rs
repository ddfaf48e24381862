//! One job from start to end: one-runner lock, skip-if-done, preflight, checkpoint store, the
//! driver loop, and the final status written back to the store.

use super::{Backend, Gate, Stop, drive};
use crate::error::{Error, Result, StopReason};
use crate::progress::{Progress, Totals, fmt_duration};
use crate::spec::Spec;
use crate::state::{StateStore, Status};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Run finished jobs again from the start.
    pub rerun: bool,
    /// Start even when preflight finds lock holders or old transactions.
    pub ignore_preflight: bool,
    /// Interval of the progress log line (when stderr is not a terminal).
    pub progress_every: Duration,
}

/// What happened to one job in this run.
#[derive(Debug)]
pub enum Ran {
    /// Worked on it (to the end, or until `error`).
    Worked {
        totals: Totals,
        elapsed: Duration,
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
                format!(
                    "{}: {head} — {} keys, {} rows changed, {} batches, {} rows retried after \
                     being locked, in {}{throttled}",
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
}

/// Run one job. Errors before any work (lock held, preflight) come back as `Err`; errors during
/// the work come back inside the report, after the store has recorded them.
pub async fn run_with<B: Backend, S: StateStore>(
    spec: &Spec,
    backend: &mut B,
    store: &S,
    opts: &RunOptions,
    stop: &Stop,
    gate: Option<&Gate>,
) -> Result<JobReport> {
    let job = spec.name.as_str();
    store.lock(job).await?;
    let result = run_locked(spec, backend, store, opts, stop, gate).await;
    if let Err(e) = store.unlock(job).await {
        tracing::debug!(
            job,
            "runner lock not released explicitly (it goes with the connection): {e}"
        );
    }
    result
}

async fn run_locked<B: Backend, S: StateStore>(
    spec: &Spec,
    backend: &mut B,
    store: &S,
    opts: &RunOptions,
    stop: &Stop,
    gate: Option<&Gate>,
) -> Result<JobReport> {
    let job = spec.name.as_str();
    let existing = store.load(job).await?;
    let mut restart = false;
    if let Some(s) = &existing {
        let changed = s.spec_hash != spec.hash;
        if s.status == Status::Done {
            if !opts.rerun {
                if changed {
                    tracing::warn!(
                        job,
                        "finished job's spec changed since it ran; left alone (use --rerun)"
                    );
                }
                crate::metrics::status(job, "skipped");
                return Ok(JobReport {
                    job: job.into(),
                    ran: Ran::Skipped { changed },
                });
            }
            restart = true;
        } else if changed {
            tracing::warn!(
                job,
                cursor = s.cursor.as_deref().unwrap_or("start"),
                "spec changed since the last checkpoint; resuming at the checkpoint with the new spec"
            );
        }
    }
    // Blockers first: the schema checks take the table's ACCESS SHARE lock, which would queue
    // behind the very lock holder this is meant to report.
    let blockers = backend.blockers().await?;
    if !blockers.is_empty() {
        let list = blockers.join("\n  ");
        if !opts.ignore_preflight {
            return Err(Error::Stopped(StopReason::Preflight(format!(
                "\n  {list}\nwait for them or end them (pg_terminate_backend), or pass --ignore-preflight"
            ))));
        }
        tracing::warn!("starting despite --ignore-preflight:\n  {list}");
    }
    backend.preflight().await?;
    store.ensure().await?;
    let state = store.start(job, &spec.hash, restart).await?;
    crate::metrics::status(job, "running");
    let estimate = backend.estimate(state.cursor.as_deref(), false).await?;
    tracing::info!(
        job,
        cursor = state.cursor.as_deref().unwrap_or("start"),
        remaining = estimate.rows + estimate.pending_retry,
        "starting at {} (~{} rows to go by the planner's estimate)",
        state
            .cursor
            .as_deref()
            .map_or("the start".into(), |c| format!("key {c}")),
        estimate.rows + estimate.pending_retry
    );
    let mut progress = Progress::new(job, estimate, opts.progress_every);
    let stop = stop.with_deadline(spec.limits.max_runtime);
    let result = drive(
        backend,
        &spec.batch,
        state.cursor,
        &mut progress,
        &stop,
        gate,
    )
    .await;
    progress.finish();
    let (status, message) = match &result {
        Ok(()) => (Status::Done, None),
        Err(Error::Stopped(r)) => (Status::Stopped, Some(r.to_string())),
        Err(e) => (Status::Failed, Some(e.to_string())),
    };
    crate::metrics::status(job, status.as_str());
    if let Err(e) = store.finish(job, status, message.as_deref()).await {
        // The work's checkpoints are committed; only the final status could not be written.
        tracing::error!(
            job,
            "could not record the job's status ({}): {e}",
            status.as_str()
        );
        if result.is_ok() {
            return Err(e);
        }
    }
    Ok(JobReport {
        job: job.into(),
        ran: Ran::Worked {
            totals: progress.totals,
            elapsed: progress.elapsed(),
            error: result.err(),
        },
    })
}
