//! Stopping at a batch boundary: deadlines and SIGTERM/SIGINT. A second signal exits at once;
//! the server then rolls the open batch back, and the checkpoint is still the last commit.

use crate::error::{EXIT_STOPPED, StopReason};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Shared stop state: a signal seen by the process, plus this job's deadline.
#[derive(Clone)]
pub struct Stop {
    signal: Arc<(Mutex<Option<&'static str>>, Notify)>,
    deadline: Option<(Instant, Duration)>,
}

impl Stop {
    /// A stop that only a deadline can trigger (for tests and `plan`).
    pub fn never() -> Stop {
        Stop {
            signal: Arc::new((Mutex::new(None), Notify::new())),
            deadline: None,
        }
    }

    /// Listen for SIGTERM and SIGINT. The first asks for a stop at the next batch boundary;
    /// the second exits the process right away (exit 75).
    pub fn install() -> Stop {
        use tokio::signal::unix::{SignalKind, signal};
        let stop = Stop::never();
        // Registered before returning, so a signal that arrives early is not the default kill.
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::warn!("cannot listen for signals; SIGTERM will kill the run mid-batch");
            return stop;
        };
        let shared = stop.signal.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            loop {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                seen += 1;
                if seen > 1 {
                    eprintln!("{name} again: exiting now; the open batch is rolled back");
                    std::process::exit(EXIT_STOPPED);
                }
                tracing::warn!(
                    "{name} received: stopping after the current batch (send it again to exit now)"
                );
                *shared.0.lock().expect("stop lock") = Some(name);
                shared.1.notify_waiters();
            }
        });
        stop
    }

    /// The same signals, with a deadline `limit` from now (the earlier deadline wins).
    pub fn with_deadline(&self, limit: Option<Duration>) -> Stop {
        let mut s = self.clone();
        if let Some(limit) = limit {
            let at = Instant::now() + limit;
            if s.deadline.is_none_or(|(d, _)| at < d) {
                s.deadline = Some((at, limit));
            }
        }
        s
    }

    /// Why to stop now, if at all.
    pub fn check(&self) -> Option<StopReason> {
        if let Some(name) = *self.signal.0.lock().expect("stop lock") {
            return Some(StopReason::Signal(name));
        }
        match self.deadline {
            Some((at, limit)) if Instant::now() >= at => Some(StopReason::Deadline(limit)),
            _ => None,
        }
    }

    /// Sleep for `d`, waking early on a signal or the deadline. Returns why it woke early.
    pub async fn sleep(&self, d: Duration) -> Option<StopReason> {
        let until = match self.deadline {
            Some((at, _)) => (Instant::now() + d).min(at),
            None => Instant::now() + d,
        };
        let notified = self.signal.1.notified();
        tokio::select! {
            _ = tokio::time::sleep_until(until.into()) => {}
            _ = notified => {}
        }
        self.check()
    }
}
