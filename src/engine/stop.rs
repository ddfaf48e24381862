//! Stopping at a batch boundary: deadlines, the end of the run window, SIGTERM/SIGINT, and a job
//! aborted because one of its workers failed. A second signal cancels the statements in flight
//! (`exit_now`) and exits; the server rolls the open batch back, and the checkpoint is still
//! the last commit.

use crate::error::{EXIT_STOPPED, StopReason};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Why to stop, shared by everyone who should see it, with a wake-up for sleepers.
#[derive(Default)]
struct Flag {
    reason: Mutex<Option<StopReason>>,
    wake: Notify,
}

impl Flag {
    fn set(&self, reason: StopReason) {
        let mut r = self.reason.lock().expect("stop lock");
        if r.is_none() {
            *r = Some(reason);
        }
        drop(r);
        self.wake.notify_waiters();
    }

    fn get(&self) -> Option<StopReason> {
        self.reason.lock().expect("stop lock").clone()
    }
}

/// Shared stop state: a signal seen by the process, this job's abort flag, and its deadlines.
#[derive(Clone)]
pub struct Stop {
    signal: Arc<Flag>,
    /// Set when the job must end now (a worker failed); `None` outside a job.
    abort: Option<Arc<Flag>>,
    deadline: Option<(Instant, Duration)>,
    /// The end of the spec's run window, and how to say it.
    window_end: Option<(Instant, String)>,
}

impl Stop {
    /// A stop that only a deadline can trigger (for tests and `plan`).
    pub fn never() -> Stop {
        Stop {
            signal: Arc::new(Flag::default()),
            abort: None,
            deadline: None,
            window_end: None,
        }
    }

    /// Listen for SIGTERM and SIGINT. The first asks for a stop at the next batch boundary;
    /// the second exits the process right away (exit 75). Once per process: `run` installs it
    /// as it starts, inside the runtime (a signal before that ends the process with the
    /// default action, 143), and later calls get the same listener.
    pub fn install() -> Stop {
        static INSTALLED: std::sync::OnceLock<Stop> = std::sync::OnceLock::new();
        INSTALLED.get_or_init(Stop::listen).clone()
    }

    fn listen() -> Stop {
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
                    // The statements in flight end now, and their transactions and locks with
                    // them (bounded: a server that does not answer is not waited for).
                    super::exit_now::cancel_all(Duration::from_secs(3)).await;
                    // As every other last line: JSON under --log-format json, with the code.
                    crate::progress::print_stopped(
                        &format!("{name} again: exiting now; the open batch is rolled back"),
                        EXIT_STOPPED,
                    );
                    std::process::exit(EXIT_STOPPED);
                }
                tracing::warn!(
                    "{name} received: stopping after the current batch (send it again to exit now)"
                );
                shared.set(StopReason::Signal(name));
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

    /// The same, also stopping at `at` (the end of the run window), described by `why`.
    pub fn with_window_end(&self, at: Instant, why: String) -> Stop {
        let mut s = self.clone();
        s.window_end = Some((at, why));
        s
    }

    /// The same, with an abort flag of its own: `abort` on any clone stops all of them.
    pub fn for_job(&self) -> Stop {
        let mut s = self.clone();
        s.abort = Some(Arc::new(Flag::default()));
        s
    }

    /// Stop every worker of this job at its next boundary (one of them failed).
    pub fn abort(&self, reason: StopReason) {
        if let Some(a) = &self.abort {
            a.set(reason);
        }
    }

    /// When this stop triggers by itself: the earlier of the deadline and the window's end.
    pub fn ends_at(&self) -> Option<Instant> {
        let deadline = self.deadline.map(|(at, _)| at);
        let window = self.window_end.as_ref().map(|(at, _)| *at);
        match (deadline, window) {
            (Some(d), Some(w)) => Some(d.min(w)),
            (d, w) => d.or(w),
        }
    }

    /// Why to stop now, if at all.
    pub fn check(&self) -> Option<StopReason> {
        if let Some(r) = self.signal.get() {
            return Some(r);
        }
        if let Some(r) = self.abort.as_ref().and_then(|a| a.get()) {
            return Some(r);
        }
        if let Some((at, limit)) = self.deadline
            && Instant::now() >= at
        {
            return Some(StopReason::Deadline(limit));
        }
        match &self.window_end {
            Some((at, why)) if Instant::now() >= *at => Some(StopReason::Window(why.clone())),
            _ => None,
        }
    }

    /// Wait until this stop triggers (a signal, an abort, the deadline or the window's end),
    /// and say why.
    pub async fn stopped(&self) -> StopReason {
        loop {
            // Made before the check: a wake-up between the two is not lost.
            let signalled = self.signal.wake.notified();
            let aborted = self.abort.as_ref().map(|a| a.wake.notified());
            if let Some(r) = self.check() {
                return r;
            }
            let until = self.ends_at();
            tokio::select! {
                _ = async {
                    match until {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = signalled => {}
                _ = async {
                    match aborted {
                        Some(n) => n.await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    }

    /// `fut`, unless this stop triggers first: then why, as `Error::Stopped`, and `fut` is
    /// dropped. For what comes before a job writes anything (connecting, reading its state,
    /// preflight, joining): a SIGTERM there ends the run at once with 75, not after a
    /// connect's timeout as a failure.
    pub async fn or_stopped<T>(
        &self,
        fut: impl std::future::Future<Output = crate::error::Result<T>>,
    ) -> crate::error::Result<T> {
        tokio::select! {
            r = fut => r,
            reason = self.stopped() => Err(crate::error::Error::Stopped(reason)),
        }
    }

    /// Sleep for `d`, waking early on a signal, an abort, the deadline or the window's end.
    /// Returns why it woke early.
    pub async fn sleep(&self, d: Duration) -> Option<StopReason> {
        let mut until = Instant::now() + d;
        if let Some((at, _)) = self.deadline {
            until = until.min(at);
        }
        if let Some((at, _)) = &self.window_end {
            until = until.min(*at);
        }
        let signalled = self.signal.wake.notified();
        let aborted = async {
            match &self.abort {
                Some(a) => a.wake.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(until.into()) => {}
            _ = signalled => {}
            _ = aborted => {}
        }
        self.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn abort_reaches_every_clone_of_the_job_only() {
        let process = Stop::never();
        let job = process.for_job();
        let worker = job.clone();
        let other_job = process.for_job();
        let sleeper = tokio::spawn({
            let w = worker.clone();
            async move { w.sleep(Duration::from_secs(30)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        job.abort(StopReason::Signal("test"));
        let woke = tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("sleeper woke")
            .unwrap();
        assert_eq!(woke, Some(StopReason::Signal("test")));
        assert_eq!(worker.check(), Some(StopReason::Signal("test")));
        assert_eq!(other_job.check(), None);
        assert_eq!(process.check(), None);
    }

    #[test]
    fn ends_at_is_the_earlier_of_deadline_and_window_end() {
        assert_eq!(Stop::never().ends_at(), None);
        let soon = Instant::now() + Duration::from_secs(60);
        let window = Stop::never().with_window_end(soon, "closed".into());
        assert_eq!(window.ends_at(), Some(soon));
        let both = window.with_deadline(Some(Duration::from_secs(3600)));
        assert_eq!(both.ends_at(), Some(soon));
        let earlier = both.with_deadline(Some(Duration::from_secs(1)));
        assert!(earlier.ends_at().unwrap() < soon);
    }

    #[tokio::test]
    async fn window_end_stops() {
        let s = Stop::never().with_window_end(
            Instant::now() + Duration::from_millis(30),
            "window closed".into(),
        );
        assert_eq!(s.check(), None);
        let r = s.sleep(Duration::from_secs(10)).await;
        assert_eq!(r, Some(StopReason::Window("window closed".into())));
    }
}
