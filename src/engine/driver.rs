//! The driver loop: (stop check -> unit -> progress -> pause)* until the backend is done.
//! It owns sizing, retries with backoff, and stopping; the backend runs one unit at a time.

use super::{Backend, Gate, Sizer, Stop};
use crate::error::{DbErrorKind, Error, Result};
use crate::progress::Progress;
use crate::spec::Batch;
use backon::{BackoffBuilder, ExponentialBuilder};
use std::time::{Duration, Instant};

/// How transient failures of one unit are retried before the job fails.
fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_max_times(8)
        .with_jitter()
        .build()
}

/// Run units from `cursor` until the backend reports done, a stop is requested, or a unit
/// fails for good. Every committed unit already carries its checkpoint.
pub async fn drive<B: Backend>(
    backend: &mut B,
    batch: &Batch,
    mut cursor: Option<String>,
    progress: &mut Progress,
    stop: &Stop,
    gate: Option<&Gate>,
) -> Result<()> {
    let mut sizer = Sizer::new(batch);
    let mut retries: Option<Box<dyn Iterator<Item = Duration>>> = None;
    let mut resync = false;
    loop {
        if let Some(reason) = stop.check() {
            return Err(Error::Stopped(reason));
        }
        if resync {
            match backend.committed_cursor().await {
                Ok(c) => {
                    if c != cursor {
                        tracing::warn!(
                            "the last batch committed before the connection was lost; continuing after it"
                        );
                    }
                    cursor = c;
                    resync = false;
                }
                Err(e) => {
                    let Some(delay) = retries.get_or_insert_with(|| Box::new(backoff())).next()
                    else {
                        return Err(e);
                    };
                    tracing::warn!("cannot reconnect, retrying in {}ms: {e}", delay.as_millis());
                    if let Some(reason) = stop.sleep(delay).await {
                        return Err(Error::Stopped(reason));
                    }
                    continue;
                }
            }
        }
        if let Some(gate) = gate
            && let Some(why) = gate.closed()
        {
            wait_for_gate(gate, &why, progress, stop).await?;
            continue;
        }
        if progress.needs_refresh() {
            // A planner estimate: cheap, and off the path of the batch's transaction.
            match backend.estimate(cursor.as_deref(), false).await {
                Ok(e) => progress.refresh(e),
                Err(e) => tracing::debug!(error = %e, "could not refresh the estimate"),
            }
        }
        let size = sizer.size();
        let started = Instant::now();
        match backend.run_unit(cursor.as_deref(), size).await {
            Ok(out) => {
                retries = None;
                let took = started.elapsed();
                sizer.observe(out.keys + out.retried, took);
                progress.record(&out, took, size);
                if let Some(c) = &out.cursor {
                    cursor = Some(c.clone());
                }
                if out.done {
                    return Ok(());
                }
                let pause = out.backoff.unwrap_or(batch.pause);
                if !pause.is_zero()
                    && let Some(reason) = stop.sleep(pause).await
                {
                    return Err(Error::Stopped(reason));
                }
            }
            Err(e) => {
                let kind = match &e {
                    // Preflight connected once already: a failed reconnect is worth retrying.
                    Error::Connect(_) => Some(DbErrorKind::ConnectionLost),
                    other => other.db_kind(),
                };
                match kind {
                    Some(DbErrorKind::StatementTimeout) if sizer.halve() => {
                        crate::metrics::retry(progress.job(), e.retry_reason());
                        tracing::warn!(
                            size,
                            next = sizer.size(),
                            "batch hit statement_timeout; retrying at half the size: {e}"
                        );
                    }
                    Some(DbErrorKind::Transient | DbErrorKind::ConnectionLost) => {
                        if kind == Some(DbErrorKind::ConnectionLost) {
                            backend.reset_connection();
                            resync = true;
                        }
                        crate::metrics::retry(progress.job(), e.retry_reason());
                        let delay = retries.get_or_insert_with(|| Box::new(backoff())).next();
                        let Some(delay) = delay else {
                            return Err(e);
                        };
                        tracing::warn!("batch failed, retrying in {}ms: {e}", delay.as_millis());
                        if let Some(reason) = stop.sleep(delay).await {
                            return Err(Error::Stopped(reason));
                        }
                    }
                    _ => return Err(e),
                }
            }
        }
    }
}

/// Pause while the throttle gate is closed; the deadline and signals still apply.
async fn wait_for_gate(gate: &Gate, why: &str, progress: &mut Progress, stop: &Stop) -> Result<()> {
    let started = Instant::now();
    tracing::info!(reason = why, "throttled: pausing ({why})");
    let mut stopped = None;
    while gate.closed().is_some() {
        if let Some(reason) = stop.sleep(gate.interval).await {
            stopped = Some(reason);
            break;
        }
    }
    let waited = started.elapsed();
    progress.add_throttled(waited);
    match stopped {
        Some(reason) => Err(Error::Stopped(reason)),
        None => {
            tracing::info!(
                throttled_ms = waited.as_millis() as u64,
                "throttle cleared after {}ms; resuming",
                waited.as_millis()
            );
            Ok(())
        }
    }
}
