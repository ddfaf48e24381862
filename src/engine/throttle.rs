//! Throttling off the hot path: a background task asks a probe every `interval` whether to
//! pause and publishes the answer; the batch loop only reads that answer (a cheap gate).

use crate::error::Result;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    /// respects it, and a probe that fails then (a broken `throttle.query`) fails the start.
    /// Later failures count as "pause" (with the error as the reason): when lag cannot be
    /// measured, it is not safe to assume there is none.
    pub async fn start<P: Probe>(mut probe: P, interval: Duration) -> Result<Gate> {
        let first = probe.check().await?;
        let reason = Arc::new(Mutex::new(first));
        let shared = reason.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = answer(probe.check().await);
                *shared.lock().expect("gate lock") = now;
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

fn answer(r: Result<Option<String>>) -> Option<String> {
    match r {
        Ok(v) => v,
        Err(e) => Some(format!("throttle check failed: {e}")),
    }
}
