//! `backfill run`: jobs in order; stops at the first job that fails or stops early, and says
//! which jobs it did not get to.

use super::{OnJob, with_backend};
use crate::engine::{Backend, JobReport, Ran, RunOptions, Stop, run_job};
use crate::error::{Error, Result};
use crate::postgres::Access;
use crate::spec::Spec;
use std::sync::Arc;
use std::time::Duration;

struct RunJob<'a> {
    opts: &'a RunOptions,
    stop: &'a Stop,
}

impl OnJob for RunJob<'_> {
    type Out = JobReport;

    async fn call<B: Backend>(self, spec: &Spec, backend: B) -> Result<JobReport> {
        let gate = match &spec.throttle {
            Some(t) => self.stop.or_stopped(backend.throttle(t)).await?,
            None => None,
        };
        run_job(spec, Arc::new(backend), self.opts, self.stop, gate).await
    }

    fn stop(&self) -> Option<Stop> {
        Some(self.stop.clone())
    }
}

pub async fn run(specs: &[Spec], max_runtime: Option<Duration>, opts: &RunOptions) -> Result<()> {
    // `--max-runtime 0` is no limit, as `limits.max_runtime: 0` is.
    let stop = Stop::install().with_deadline(max_runtime.filter(|d| !d.is_zero()));
    let (mut ran, mut skipped) = (0, 0);
    let tally = |ran: usize, skipped: usize, last: &str| {
        let mut line = format!("{ran} run, {skipped} skipped");
        if !last.is_empty() {
            line.push_str(&format!(", 1 {last}"));
        }
        line
    };
    for (i, spec) in specs.iter().enumerate() {
        // Between two jobs is a boundary too: a SIGTERM while the specs loaded, or a deadline
        // passed during the job before, starts no further job.
        if let Some(reason) = stop.check() {
            crate::outln!("{}: not started ({})", spec.name, spec.file.display());
            crate::outln!("{}", tally(ran, skipped, "stopped"));
            not_tried(&specs[i + 1..]);
            return Err(Error::Stopped(reason));
        }
        let threads = opts.workers.unwrap_or(spec.workers).max(spec.workers);
        let report = with_backend(
            spec,
            Access::ReadWrite,
            threads,
            RunJob { opts, stop: &stop },
        )
        .await;
        let untried = || not_tried(&specs[i + 1..]);
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                // Also for what failed before run_job (opening the backend, the throttle's
                // first check): the status metric says failed, not nothing.
                crate::metrics::not_started(&spec.name, &e);
                crate::outln!("{}: not started ({})", spec.name, spec.file.display());
                let last = if matches!(e, Error::Stopped(_)) {
                    "stopped"
                } else {
                    "failed"
                };
                crate::outln!("{}", tally(ran, skipped, last));
                untried();
                return Err(e);
            }
        };
        crate::outln!("{}", report.summary());
        match report.ran {
            Ran::Skipped { .. } => skipped += 1,
            Ran::Worked { error, .. } => {
                if let Some(e) = error {
                    let last = if matches!(e, Error::Stopped(_)) {
                        "stopped"
                    } else {
                        "failed"
                    };
                    crate::outln!("{}", tally(ran, skipped, last));
                    untried();
                    return Err(e);
                }
                ran += 1;
            }
        }
    }
    crate::outln!("{}", tally(ran, skipped, ""));
    Ok(())
}

/// Name the specs a run that ended early did not get to.
fn not_tried(rest: &[Spec]) {
    if !rest.is_empty() {
        let files: Vec<String> = rest.iter().map(|s| s.file.display().to_string()).collect();
        crate::outln!("not tried: {}", files.join(", "));
    }
}
