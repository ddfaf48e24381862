//! Unit tests of the driver loop over a fake backend: units of keys held in memory, claims
//! with epochs like the real stores, and faults injected on chosen batches. The real
//! databases' behaviour is tested against real servers in tests/; this pins the loop itself.

use super::driver::{Shared, drive};
use super::{Claim, Outcome, Stop, Worker};
use crate::error::{DbErrorKind, Error, Result, StopReason};
use crate::progress::Progress;
use crate::spec::Batch;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A fault to inject on the Nth batch (counted over all workers).
#[derive(Debug, Clone, Copy)]
enum Fault {
    Transient,
    /// A deadlock with another session's transaction.
    Deadlock,
    ConnectionLost,
    /// The claim was taken over: the batch writes nothing.
    Lost,
    Fatal,
    StatementTimeout,
    /// The unit's last rows stay locked: the worker must give it up.
    StillLocked,
}

#[derive(Default)]
struct Unit {
    keys: u64,
    cursor: u64,
    done: bool,
    owner: Option<usize>,
    epoch: u64,
    given_up: bool,
}

#[derive(Default)]
struct World {
    units: Vec<Unit>,
    /// How many times each (unit, key) was applied.
    applied: HashMap<(usize, u64), u32>,
    batches: u64,
    faults: HashMap<u64, Fault>,
    paused: bool,
    sizes: Vec<u64>,
}

type Shared_ = Arc<Mutex<World>>;

struct FakeWorker {
    id: usize,
    name: String,
    world: Shared_,
    held: Option<(usize, u64)>,
}

impl Worker for FakeWorker {
    fn name(&self) -> &str {
        &self.name
    }

    async fn claim(&mut self) -> Result<Claim> {
        if let Some((u, _)) = self.held {
            return Ok(Claim::Got(format!("unit {u}")));
        }
        let mut w = self.world.lock().unwrap();
        if w.units.iter().all(|u| u.done) {
            return Ok(Claim::Nothing {
                all_done: true,
                held: 0,
                blocked: 0,
            });
        }
        let (mut held, mut blocked) = (0, 0);
        for (i, u) in w.units.iter_mut().enumerate() {
            if u.done {
                continue;
            }
            if u.given_up {
                blocked += 1;
                continue;
            }
            if u.owner.is_some() {
                held += 1;
                continue;
            }
            u.owner = Some(self.id);
            u.epoch += 1;
            self.held = Some((i, u.epoch));
            return Ok(Claim::Got(format!("unit {i}")));
        }
        Ok(Claim::Nothing {
            all_done: false,
            held,
            blocked,
        })
    }

    async fn step(&mut self, size: u64) -> Result<Outcome> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let Some((u, epoch)) = self.held else {
            return Err(Error::Lost("nothing held".into()));
        };
        let mut w = self.world.lock().unwrap();
        w.batches += 1;
        w.sizes.push(size);
        let n = w.batches;
        match w.faults.remove(&n) {
            Some(Fault::Transient) => {
                return Err(Error::Db {
                    message: "lock timeout".into(),
                    kind: DbErrorKind::LockTimeout,
                });
            }
            Some(Fault::Deadlock) => {
                return Err(Error::Db {
                    message: "deadlock detected".into(),
                    kind: DbErrorKind::Deadlock,
                });
            }
            Some(Fault::ConnectionLost) => {
                return Err(Error::Db {
                    message: "connection closed".into(),
                    kind: DbErrorKind::ConnectionLost,
                });
            }
            Some(Fault::Lost) => {
                // Someone else claimed it (and released it again).
                w.units[u].epoch += 1;
                w.units[u].owner = None;
            }
            Some(Fault::Fatal) => return Err(Error::fatal("syntax error")),
            Some(Fault::StatementTimeout) => {
                return Err(Error::Db {
                    message: "statement timeout".into(),
                    kind: DbErrorKind::StatementTimeout,
                });
            }
            Some(Fault::StillLocked) => {
                return Err(Error::Stopped(StopReason::RowsStillLocked(3)));
            }
            None => {}
        }
        let unit = &mut w.units[u];
        if unit.epoch != epoch {
            self.held = None;
            return Err(Error::Lost(format!("unit {u} lost")));
        }
        let from = unit.cursor;
        let to = (from + size).min(unit.keys);
        unit.cursor = to;
        let done = to == unit.keys;
        if done {
            unit.done = true;
            unit.owner = None;
            self.held = None;
        }
        for k in from..to {
            *w.applied.entry((u, k)).or_default() += 1;
        }
        Ok(Outcome {
            keys: to - from,
            rows: to - from,
            unit_done: done,
            ..Outcome::default()
        })
    }

    async fn release(&mut self) -> Result<()> {
        if let Some((u, _)) = self.held.take() {
            self.world.lock().unwrap().units[u].owner = None;
        }
        Ok(())
    }

    async fn give_up(&mut self) -> Result<()> {
        if let Some((u, _)) = self.held {
            self.world.lock().unwrap().units[u].given_up = true;
        }
        self.release().await
    }

    async fn paused(&mut self) -> Result<bool> {
        Ok(self.world.lock().unwrap().paused)
    }

    fn reset_connection(&mut self) {
        if let Some((u, _)) = self.held.take() {
            self.world.lock().unwrap().units[u].owner = None;
        }
    }
}

fn world(units: &[u64]) -> Shared_ {
    Arc::new(Mutex::new(World {
        units: units
            .iter()
            .map(|&k| Unit {
                keys: k,
                ..Unit::default()
            })
            .collect(),
        ..World::default()
    }))
}

fn shared(stop: Stop) -> Arc<Shared> {
    Arc::new(Shared {
        job: "fake".into(),
        batch: Batch {
            size: 10,
            target: Duration::ZERO,
            min: 1,
            max: 100,
            pause: Duration::ZERO,
            walk_ahead: false,
        },
        stop: stop.for_job(),
        gate: None,
        progress: Mutex::new(Progress::new(
            "fake",
            Default::default(),
            Duration::from_secs(60),
        )),
        still_locked: AtomicU64::new(0),
        units: tokio::sync::watch::Sender::new(0),
    })
}

/// Run `n` workers to the end; the results of each.
async fn run(w: &Shared_, sh: &Arc<Shared>, n: usize) -> Vec<Result<()>> {
    let mut tasks = Vec::new();
    for id in 0..n {
        let mut wk = FakeWorker {
            id,
            name: format!("w{id}"),
            world: w.clone(),
            held: None,
        };
        let sh = sh.clone();
        tasks.push(tokio::spawn(async move {
            let r = drive(&mut wk, &sh).await;
            if let Err(e) = &r
                && !matches!(e, Error::Stopped(_))
            {
                sh.stop.abort(StopReason::Aborted);
            }
            r
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn exactly_once(w: &Shared_) {
    let w = w.lock().unwrap();
    let total: u64 = w.units.iter().map(|u| u.keys).sum();
    assert_eq!(w.applied.len() as u64, total, "some keys never applied");
    assert!(
        w.applied.values().all(|&n| n == 1),
        "some keys applied twice"
    );
}

#[tokio::test]
async fn workers_share_units_and_apply_every_key_once() {
    let w = world(&[95, 40, 0, 7, 120, 33]);
    let sh = shared(Stop::never());
    let results = run(&w, &sh, 3).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    exactly_once(&w);
    let totals = sh.progress.lock().unwrap().totals;
    assert_eq!(totals.keys, 295);
}

#[tokio::test]
async fn transient_faults_are_retried_and_lost_claims_reclaimed() {
    let w = world(&[50, 50]);
    {
        let mut g = w.lock().unwrap();
        g.faults.insert(2, Fault::Transient);
        g.faults.insert(4, Fault::ConnectionLost);
        g.faults.insert(6, Fault::Lost);
        g.faults.insert(7, Fault::Transient);
    }
    let sh = shared(Stop::never());
    let results = run(&w, &sh, 2).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    exactly_once(&w);
}

/// A lock another session holds, or its transactions deadlocking with the batch, through every
/// retry stops the job with its progress saved (exit 75), not as a failure; every key done
/// before is kept, none done twice.
#[tokio::test(start_paused = true)]
async fn contention_through_every_retry_stops_the_job_to_run_again() {
    for fault in [Fault::Transient, Fault::Deadlock] {
        let w = world(&[100]);
        {
            let mut g = w.lock().unwrap();
            for n in 3..40 {
                g.faults.insert(n, fault);
            }
        }
        let sh = shared(Stop::never());
        let results = run(&w, &sh, 1).await;
        let stopped = match fault {
            Fault::Deadlock => matches!(results[0], Err(Error::Stopped(StopReason::Conflict(_)))),
            _ => matches!(results[0], Err(Error::Stopped(StopReason::LockWait(_)))),
        };
        assert!(stopped, "{fault:?}: {results:?}");
        assert_eq!(results[0].as_ref().unwrap_err().exit_code(), 75);
        let g = w.lock().unwrap();
        assert_eq!(g.applied.len(), 20, "the two batches before the lock");
        assert!(g.applied.values().all(|&n| n == 1));
    }
}

#[tokio::test]
async fn a_statement_timeout_halves_the_batch() {
    let w = world(&[100]);
    w.lock().unwrap().faults.insert(2, Fault::StatementTimeout);
    let sh = shared(Stop::never());
    let results = run(&w, &sh, 1).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    exactly_once(&w);
    let sizes = w.lock().unwrap().sizes.clone();
    assert_eq!(&sizes[..3], &[10, 10, 5], "{sizes:?}");
}

#[tokio::test]
async fn a_fatal_error_stops_the_other_workers() {
    let w = world(&[1000, 1000, 1000]);
    w.lock().unwrap().faults.insert(5, Fault::Fatal);
    let sh = shared(Stop::never());
    let results = run(&w, &sh, 3).await;
    let fatal = results
        .iter()
        .filter(|r| matches!(r, Err(Error::Db { .. })))
        .count();
    let aborted = results
        .iter()
        .filter(|r| matches!(r, Err(Error::Stopped(StopReason::Aborted))))
        .count();
    assert_eq!((fatal, aborted), (1, 2), "{results:?}");
    let applied = w.lock().unwrap().applied.len();
    assert!(applied < 3000, "the others went on to the end");
    assert!(w.lock().unwrap().applied.values().all(|&n| n == 1));
}

#[tokio::test]
async fn units_with_locked_rows_are_left_for_the_next_run() {
    let w = world(&[30, 30, 30]);
    w.lock().unwrap().faults.insert(2, Fault::StillLocked);
    let sh = shared(Stop::never());
    let results = run(&w, &sh, 2).await;
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Err(Error::Stopped(StopReason::RowsStillLocked(3))))),
        "{results:?}"
    );
    let g = w.lock().unwrap();
    let done = g.units.iter().filter(|u| u.done).count();
    assert_eq!(done, 2, "the other units are finished");
    assert!(g.applied.values().all(|&n| n == 1));
}

#[tokio::test]
async fn a_paused_job_waits_and_a_deadline_still_stops_it() {
    let w = world(&[1000]);
    w.lock().unwrap().paused = true;
    let stop = Stop::never().with_deadline(Some(Duration::from_millis(300)));
    let sh = shared(stop);
    let results = run(&w, &sh, 1).await;
    assert!(
        matches!(results[0], Err(Error::Stopped(StopReason::Deadline(_)))),
        "{results:?}"
    );
    assert_eq!(w.lock().unwrap().batches, 0, "a batch ran while paused");
}

#[tokio::test]
async fn unpausing_lets_the_workers_finish() {
    let w = world(&[40, 40]);
    w.lock().unwrap().paused = true;
    let sh = shared(Stop::never());
    let w2 = w.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(w2.lock().unwrap().batches, 0, "a batch ran while paused");
        w2.lock().unwrap().paused = false;
    });
    let results = run(&w, &sh, 2).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    exactly_once(&w);
}

#[tokio::test]
async fn an_idle_worker_looks_again_when_another_lets_go_of_a_unit() {
    // One unit for two workers: the second finds it held and idles. When the first finishes
    // it, the second must look again at once and find the job done, not sleep out its poll:
    // the deadline (well within the poll, far beyond the work) would stop a sleeping worker.
    let w = world(&[60]);
    let stop = Stop::never().with_deadline(Some(Duration::from_millis(1500)));
    let sh = shared(stop);
    let results = run(&w, &sh, 2).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    exactly_once(&w);
}

/// A throttle probe that says "pause" while its flag is set.
struct FlagProbe(Arc<std::sync::atomic::AtomicBool>);

impl super::Probe for FlagProbe {
    async fn check(&mut self) -> Result<Option<String>> {
        let on = self.0.load(std::sync::atomic::Ordering::SeqCst);
        Ok(on.then(|| "test throttle".to_string()))
    }
}

#[tokio::test]
async fn throttled_time_is_counted_while_the_gate_is_closed() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let w = world(&[40]);
    let closed = Arc::new(AtomicBool::new(true));
    let gate = super::Gate::start(FlagProbe(closed.clone()), Duration::from_millis(20))
        .await
        .unwrap();
    let mut sh = shared(Stop::never());
    Arc::get_mut(&mut sh).unwrap().gate = Some(gate);
    let runner = tokio::spawn({
        let (w, sh) = (w.clone(), sh.clone());
        async move { run(&w, &sh, 1).await }
    });
    // While the gate stays closed the time shows up, not only once it opens.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let throttled = sh.progress.lock().unwrap().totals.throttled;
        if !throttled.is_zero() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no throttled time recorded while the gate was closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(w.lock().unwrap().batches, 0, "a batch ran while throttled");
    closed.store(false, Ordering::SeqCst);
    let results = runner.await.unwrap();
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    exactly_once(&w);
}
