//! A ClickHouse job as the engine sees it: the store's lifecycle and its lease, the `verify:`
//! check, and the worker that runs the chunk queue.

use super::store::ChStateStore;
use super::{ChBackend, client};
use crate::engine::plan::{Plan, PlanOptions, UnitPlan};
use crate::engine::{Backend, Claim, Estimate, Outcome, Worker};
use crate::error::{Error, Result, StopReason};
use crate::spec::{ClickhouseSpec, Spec};
use crate::state::{JobState, Status, UnitState};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::Mutex;

pub struct ChJob {
    job: String,
    spec: ClickhouseSpec,
    inner: Arc<Mutex<ChBackend>>,
    store: Arc<ChStateStore>,
    client: clickhouse::Client,
    done: Arc<AtomicBool>,
}

impl ChJob {
    pub async fn open(spec: &Spec, ch: &ClickhouseSpec) -> Result<ChJob> {
        let (backend, store) = super::open(spec, ch).await?;
        Ok(ChJob {
            job: spec.name.clone(),
            spec: ch.clone(),
            inner: Arc::new(Mutex::new(backend)),
            store: Arc::new(store),
            client: client::connect(ch),
            done: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn store(&self) -> &ChStateStore {
        &self.store
    }

    pub fn backend(&self) -> &Arc<Mutex<ChBackend>> {
        &self.inner
    }
}

pub struct ChWorker {
    inner: Arc<Mutex<ChBackend>>,
    done: Arc<AtomicBool>,
    claimed: bool,
}

impl Worker for ChWorker {
    fn name(&self) -> &str {
        "w0"
    }

    async fn claim(&mut self) -> Result<Claim> {
        if self.done.load(Ordering::SeqCst) {
            return Ok(Claim::Nothing {
                all_done: true,
                held: 0,
                blocked: 0,
            });
        }
        self.claimed = true;
        Ok(Claim::Got("the chunk queue".into()))
    }

    async fn step(&mut self, _size: u64) -> Result<Outcome> {
        let out = self.inner.lock().await.run_unit().await;
        if let Ok(o) = &out
            && o.unit_done
        {
            self.done.store(true, Ordering::SeqCst);
            self.claimed = false;
        }
        out
    }

    async fn release(&mut self) -> Result<()> {
        self.claimed = false;
        Ok(())
    }

    async fn give_up(&mut self) -> Result<()> {
        self.claimed = false;
        Ok(())
    }

    async fn paused(&mut self) -> Result<bool> {
        Ok(false)
    }

    fn reset_connection(&mut self) {
        if let Ok(mut b) = self.inner.try_lock() {
            b.forget_queue();
        }
    }
}

impl Backend for ChJob {
    type Worker = ChWorker;

    async fn load(&self) -> Result<Option<JobState>> {
        self.store.load(&self.job).await
    }

    async fn blockers(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    async fn preflight(&self) -> Result<()> {
        self.inner.lock().await.preflight().await
    }

    async fn join(&self, index: u32, _cap: u32) -> Result<std::result::Result<ChWorker, String>> {
        if index > 0 {
            return Ok(Err(
                "a ClickHouse job runs one worker per process".to_string()
            ));
        }
        match self.store.lock(&self.job).await {
            Ok(()) => Ok(Ok(ChWorker {
                inner: self.inner.clone(),
                done: self.done.clone(),
                claimed: false,
            })),
            Err(Error::Stopped(StopReason::LockHeld(who))) => Ok(Err(who)),
            Err(e) => Err(e),
        }
    }

    async fn start(&self, spec_hash: &str, restart: bool) -> Result<JobState> {
        self.store.ensure().await?;
        self.store.start(&self.job, spec_hash, restart).await
    }

    async fn estimate(&self) -> Result<Estimate> {
        self.inner.lock().await.estimate().await
    }

    async fn all_done(&self) -> Result<bool> {
        Ok(self.done.load(Ordering::SeqCst))
    }

    async fn verify(&self) -> Result<Option<i64>> {
        let Some(sql) = &self.spec.verify else {
            return Ok(None);
        };
        super::verify(&self.client, sql).await.map(Some)
    }

    async fn finish(&self, status: Status, error: Option<&str>) -> Result<()> {
        let r = self.store.finish(&self.job, status, error).await;
        if let Err(e) = self.store.unlock(&self.job).await {
            tracing::debug!("releasing the lease: {e}");
        }
        r
    }

    async fn throttle(&self, _spec: &crate::spec::Throttle) -> Result<Option<crate::engine::Gate>> {
        Ok(None)
    }

    fn describe(&self) -> (String, String) {
        (
            self.spec.redacted_url(),
            format!(
                "{} -> {} by {}",
                self.spec.source, self.spec.target, self.spec.time_column
            ),
        )
    }

    async fn plan(&self, _opts: PlanOptions) -> Result<Plan> {
        let (database, target) = self.describe();
        let state = self.store.load(&self.job).await?;
        let mut plan = Plan {
            job: self.job.clone(),
            database,
            target,
            status: state
                .as_ref()
                .map_or("pending".into(), |s| s.status.as_str().to_string()),
            resume: state
                .as_ref()
                .and_then(|s| s.resume.clone())
                .unwrap_or_else(|| "the start (no checkpoint yet)".into()),
            pending_exact: true,
            keys_done: state.as_ref().map_or(0, |s| s.keys_done),
            batches_done: state.as_ref().map_or(0, |s| s.batches_done),
            ..Plan::default()
        };
        if state.as_ref().is_some_and(|s| s.status == Status::Done) {
            plan.skip = Some("done: run would skip this job (use --rerun to run it again)".into());
            return Ok(plan);
        }
        let mut b = self.inner.lock().await;
        b.check().await?;
        let lines = b.plan().await?;
        plan.pending_rows = lines
            .iter()
            .filter(|l| l.status != "done")
            .map(|l| l.rows_left)
            .sum();
        plan.batches = lines.iter().filter(|l| l.status != "done").count() as u64;
        plan.units = lines
            .into_iter()
            .map(|l| UnitPlan {
                unit: l.label,
                rows: l.rows,
                status: l.status,
                note: l.note,
            })
            .collect();
        Ok(plan)
    }

    async fn units(&self) -> Result<Vec<UnitState>> {
        Ok(self
            .store
            .records(&self.job)
            .await?
            .into_iter()
            .filter(|r| !r.chunk.is_empty() && !r.chunk.starts_with('#'))
            .map(|r| UnitState {
                unit: r.chunk,
                status: r.status,
                keys_done: r.source_rows as i64,
                rows_done: r.rows as i64,
                attempts: i64::from(r.attempts),
                note: r.error,
                ..UnitState::default()
            })
            .collect())
    }

    async fn set_paused(&self, _spec_hash: &str, _paused: bool) -> Result<()> {
        Err(Error::Usage(
            "pause is not supported for ClickHouse jobs yet".into(),
        ))
    }

    async fn reset(&self) -> Result<Option<String>> {
        self.store.lock(&self.job).await?;
        let existed = self.store.reset(&self.job).await;
        self.store.unlock(&self.job).await?;
        Ok(existed?.then(|| "checkpoint deleted; the next run starts from the beginning".into()))
    }
}
