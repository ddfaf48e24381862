//! Throttling off the hot path: a background task asks a probe every `interval` whether to
//! pause and publishes the answer; the batch loop only reads that answer (a cheap gate).

use crate::error::{DbErrorKind, Result};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a check may take before the gate closes while it goes on.
const PATIENCE: Duration = Duration::from_secs(2);

/// Decides whether the job should pause now. `Ok(Some(reason))` = pause.
#[allow(async_fn_in_trait)]
pub trait Probe: Send + 'static {
    fn check(&mut self) -> impl std::future::Future<Output = Result<Option<String>>> + Send;
}

/// The latest answer of the probe; cloned into the batch loop.
#[derive(Clone)]
pub struct Gate {
    reason: Arc<Mutex<Option<String>>>,
    pub interval: Duration,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl Gate {
    /// Start refreshing from `probe`. The first answer is awaited, so the first batch already
    /// respects it, and a probe that fails then (a broken `throttle.query`) fails the start;
    /// one that cannot answer yet (a lock wait or a statement timeout, a lost connection)
    /// starts the gate closed, as it would close it later.
    /// Later failures count as "pause" (with the error as the reason): when lag cannot be
    /// measured, it is not safe to assume there is none. A check that takes longer than
    /// `PATIENCE` (or the interval, if longer) closes the gate until it answers.
    pub async fn start<P: Probe>(mut probe: P, interval: Duration) -> Result<Gate> {
        let patience = interval.max(PATIENCE);
        let first = match probe.check().await {
            Ok(v) => v,
            Err(e) if e.db_kind().is_some_and(cannot_answer) => answer(Err(e)),
            Err(e) => return Err(e),
        };
        let reason = Arc::new(Mutex::new(first));
        let shared = reason.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let check = probe.check();
                tokio::pin!(check);
                let r = tokio::select! {
                    r = &mut check => r,
                    _ = tokio::time::sleep(patience) => {
                        // A probe that does not answer (stuck behind a lock, a server that
                        // stopped answering) is no reason to go on: closed until it does.
                        *shared.lock().expect("gate lock") = Some(format!(
                            "the throttle check has not answered in {}",
                            crate::progress::fmt_duration(patience)
                        ));
                        check.await
                    }
                };
                *shared.lock().expect("gate lock") = answer(r);
            }
        });
        Ok(Gate {
            reason,
            interval,
            task: Arc::new(task),
        })
    }

    /// Why to pause now, if at all (no I/O).
    pub fn closed(&self) -> Option<String> {
        self.reason.lock().expect("gate lock").clone()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if Arc::strong_count(&self.task) == 1 {
            self.task.abort();
        }
    }
}

/// The check ran into the database's state (a lock, a timeout, a lost connection), not into a
/// mistake in the spec.
fn cannot_answer(k: DbErrorKind) -> bool {
    k.retryable() || k == DbErrorKind::StatementTimeout
}

fn answer(r: Result<Option<String>>) -> Option<String> {
    match r {
        Ok(v) => v,
        Err(e) => Some(format!("throttle check failed: {e}")),
    }
}
