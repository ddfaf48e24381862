//! ClickHouse backend: a time range cut into month chunks; a chunk that fails with
//! MEMORY_LIMIT_EXCEEDED is tried once more with lighter settings, then split into its days, a
//! day into halves of its `split_column` values, down to one value. Chunks at least as large as
//! one that failed start lighter, or a rung lower. The workers of a process claim chunks from
//! the job's tree (`tree.rs`); every chunk lands atomically and once (`landing.rs`); one job
//! writes a target at a time; the state lives in `backfill_chunks` next to the target
//! (`store.rs`, `lock.rs`) or, with `state_url`, in Postgres (`pgstate.rs`), chosen in `state.rs`.

pub mod chunks;
pub mod client;
pub mod errors;
mod landing;
mod lock;
mod ownership;
mod pgstate;
mod plan;
mod planner;
mod queries;
mod settings;
pub mod state;
pub mod store;
mod tree;
mod worker;

pub use worker::ChWorker;

use crate::engine::plan::{Plan, PlanOptions};
use crate::engine::{Backend, Estimate, Gate};
use crate::error::{Error, Result};
use crate::postgres::Access;
use crate::spec::{ChunkLevel, ClickhouseSpec, Spec, Throttle};
use crate::state::{JobState, Status, UnitState};
use chrono::NaiveDate;
use chunks::Kinds;
use client::{Db, Server, exec};
use landing::Landing;
use state::{StateStore, TargetLock};
use std::sync::{Arc, OnceLock};
use store::Record;
use tokio::sync::Mutex;
use tree::Tree;

/// What a job's workers share.
pub struct Ctx {
    pub job: String,
    pub spec: ClickhouseSpec,
    pub spec_hash: String,
    pub db: Db,
    /// `db`'s client with the spec's settings: for the chunk inserts.
    pub chunk_client: clickhouse::Client,
    /// The job's records and the target's lock: in ClickHouse, or in Postgres (`state_url`).
    pub store: StateStore,
    pub landing: Landing,
    kinds: OnceLock<Kinds>,
    pub tree: Mutex<Option<Tree>>,
    /// One landing at a time: a replace landing copies the target's partition first.
    pub land_lock: Mutex<()>,
    /// The target's lock, held while this process's workers run.
    lock: Mutex<Option<Arc<TargetLock>>>,
    /// The ids of this runner's chunk inserts, and the kill a second signal sends for them.
    pub queries: queries::Queries,
    kill_on_exit: std::sync::Mutex<Option<u64>>,
    /// The server's memory cap for a query (the spec's `max_memory_usage`, else the server's).
    pub memory_cap: OnceLock<u64>,
    /// What every chunk attempt adds under the cap, and a lighter attempt (probed in preflight).
    pub capped: OnceLock<settings::Settings>,
    pub lighter: OnceLock<settings::Settings>,
    /// The job's worker limit, as workers joined: more than one hands the largest chunks out
    /// first.
    workers: std::sync::atomic::AtomicU32,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        if let Some(id) = self.kill_on_exit.lock().ok().and_then(|mut k| k.take()) {
            crate::engine::exit_now::forget(id);
        }
    }
}

impl Ctx {
    /// Take the target's lock (`run`: for a run, else for a reset), then end what runners that
    /// lost it left running on the server: their chunk inserts would go on beside this one's.
    async fn take_target(&self, run: bool) -> Result<TargetLock> {
        let l = self
            .store
            .acquire(&self.spec.database, &self.spec.target, &self.job, run)
            .await?;
        // Hygiene, not a fence (a leftover writes only its own staging table): a user who may
        // not read the server's queries or kill them still runs, as before.
        if let Err(e) = self.queries.kill_leftovers(&self.db.client).await {
            tracing::warn!(
                "could not look for queries an earlier runner of this job left running: {e}"
            );
        }
        let mut k = self.kill_on_exit.lock().expect("kill_on_exit");
        if k.is_none() {
            *k = Some(self.queries.kill_on_exit(&self.db.client));
        }
        Ok(l)
    }

    pub fn kinds(&self) -> Kinds {
        self.kinds.get().cloned().unwrap_or_default()
    }

    /// `Err(Stopped)` once the lock was taken over by another runner or its connection is
    /// gone: stop writing.
    pub async fn check_lock(&self) -> Result<()> {
        let held = self.lock.lock().await.clone();
        match held {
            Some(l) => l.check().await,
            None => Ok(()),
        }
    }

    async fn put(&self, records: &[&Record]) -> Result<()> {
        self.store.put(&self.job, records).await?;
        if let Some(t) = self.tree.lock().await.as_mut() {
            for r in records {
                t.update((*r).clone());
            }
        }
        Ok(())
    }

    /// What this run knows of a chunk, without writing it (a write whose answer was lost).
    async fn remember(&self, record: &Record) {
        if let Some(t) = self.tree.lock().await.as_mut() {
            t.update(record.clone());
        }
    }

    /// Note that the target's merges are stopped (or started again), so that `status` can say
    /// so and a later run or `reset` starts them if this one dies in between.
    pub async fn merges_stopped(&self, stopped: bool) -> Result<()> {
        let r = Record {
            chunk: store::MERGES_ROW.into(),
            status: if stopped {
                "stopped".into()
            } else {
                String::new()
            },
            runner: crate::state::runner_id(),
            ..Record::default()
        };
        self.put_again(&[&r]).await
    }

    /// `store.put`, sent again after a lost answer or a transient failure: the write may have
    /// been made, and making it again is making it once (each record is the job's latest word
    /// on its row, the later version winning with the same content). Used where no driver
    /// retry stands behind the write (start-up, the end of a run).
    pub async fn put_again(&self, records: &[&Record]) -> Result<()> {
        resent("writing the job's state", 200, || {
            self.store.put(&self.job, records)
        })
        .await
    }
}

/// `f` again after a lost answer or a transient failure, a few times with a growing pause from
/// `min_ms`: only for work whose second run changes nothing (a state write, a restore that
/// notes each write as under way before it makes it).
async fn resent<T, Fut>(what: &str, min_ms: u64, f: impl FnMut() -> Fut) -> Result<T>
where
    Fut: std::future::Future<Output = Result<T>>,
{
    use backon::{ExponentialBuilder, Retryable};
    f.retry(
        ExponentialBuilder::default()
            .with_min_delay(std::time::Duration::from_millis(min_ms))
            .with_max_times(5)
            .with_jitter(),
    )
    .when(|e: &Error| {
        e.db_kind()
            .is_some_and(crate::error::DbErrorKind::retryable)
    })
    .notify(|e, d| tracing::warn!("{what} failed, retrying in {d:?}: {e}"))
    .await
}

pub struct ChJob {
    ctx: Arc<Ctx>,
}

impl ChJob {
    /// Connect (and learn what the server supports).
    /// `access`: whether the job's state (in Postgres, with `state_url`) may be written.
    pub async fn open(spec: &Spec, ch: &ClickhouseSpec, access: Access) -> Result<ChJob> {
        let base = client::connect(ch);
        let version = client::version(&base, ch).await?;
        tracing::debug!(job = %spec.name, version, "connected to ClickHouse");
        let server = Server::of(&version);
        let chunk_client = ch
            .settings
            .iter()
            .fold(base.clone(), |c, (k, v)| c.with_setting(k, v));
        let store = StateStore::open(spec, ch, &base, access)?;
        // One token names this runner's staging tables and query ids alike.
        let runner = lock::token(4);
        let landing = Landing::new(
            base.clone(),
            server.clone(),
            &ch.database,
            &ch.target,
            &spec.name,
            &runner,
        );
        if access == Access::ReadWrite
            && let Some(legacy) = landing.legacy_tables().await?
        {
            // They are the job's whose name is the old one itself (`fill_x` for `fill-x`),
            // if it has a record; else nobody can tell.
            let records = store.records(&landing::sanitized(&spec.name)).await?;
            if !records.iter().any(|r| r.chunk == store::JOB_ROW) {
                return Err(landing.legacy_refusal(&legacy, &spec.name));
            }
        }
        Ok(ChJob {
            ctx: Arc::new(Ctx {
                job: spec.name.clone(),
                spec: ch.clone(),
                spec_hash: spec.hash.clone(),
                store,
                landing,
                db: Db {
                    client: base,
                    server,
                },
                chunk_client,
                kinds: OnceLock::new(),
                tree: Mutex::new(None),
                land_lock: Mutex::new(()),
                lock: Mutex::new(None),
                queries: queries::Queries::new(
                    &lock::target_name(&ch.database, &ch.target),
                    &spec.name,
                    &runner,
                ),
                kill_on_exit: std::sync::Mutex::new(None),
                memory_cap: OnceLock::new(),
                capped: OnceLock::new(),
                lighter: OnceLock::new(),
                workers: Default::default(),
            }),
        })
    }

    /// The read-only part of preflight (for `plan`): the source's columns and the target.
    pub(crate) async fn preflight_readonly(&self) -> Result<()> {
        let kinds = planner::check_source(
            &self.ctx.db.client,
            &self.ctx.spec,
            self.ctx.landing.moves(),
        )
        .await?;
        let _ = self.ctx.kinds.set(kinds);
        self.ctx
            .landing
            .check_target(self.ctx.spec.land_without_views)
            .await
    }

    /// `database.target`, as the job's record keeps it.
    fn target_name(&self) -> String {
        format!("{}.{}", self.ctx.spec.database, self.ctx.spec.target)
    }

    /// How the job cuts its chunks (`chunks` and `split_column`), as its record keeps it: a
    /// chunk's id is its place in that cut.
    fn cut(&self) -> String {
        let spec = &self.ctx.spec;
        let levels: Vec<String> = spec
            .chunks
            .iter()
            .map(|l| format!("{l:?}").to_lowercase())
            .collect();
        match &spec.split_column {
            Some(col) => format!("[{}] split by {col}", levels.join(", ")),
            None => format!("[{}]", levels.join(", ")),
        }
    }

    /// A job resumed (not started over) with the cut it started with: under another, the
    /// chunks it has done get other ids, are not found done, and land again (twice), while
    /// the job ends done. Refused before anything is written. (A record from before the cut
    /// was kept says nothing.)
    fn same_cut(&self, records: &[Record]) -> Result<()> {
        let kept = store::job_def(records, "cut");
        match kept {
            Some(kept) if kept != self.cut() => Err(Error::Spec(format!(
                "clickhouse.chunks / clickhouse.split_column: job {} cuts its chunks as {kept}, \
                 and its state says which of those are done; the spec now says {}, under which \
                 the done chunks are others and would land again (twice). Finish the job with \
                 the cut it started with, or `backfill reset` it (or `run --rerun`, once done) \
                 to start over with the new one",
                self.ctx.job,
                self.cut()
            ))),
            _ => Ok(()),
        }
    }

    /// The job's time range: fixed in its record at its first start, else from the spec or
    /// the source.
    pub(crate) async fn range(&self, records: &[Record]) -> Result<Option<(NaiveDate, NaiveDate)>> {
        let Some((f, t)) = fixed(records) else {
            self.not_to_come().await?;
            return planner::range(&self.ctx.db.client, &self.ctx.spec).await;
        };
        // The range is fixed at the job's first start: its chunks (months clipped to it)
        // and their records are cut from it. A `from`/`to` edited since would be ignored,
        // and the job called done without the rows it added: refused instead.
        let spec = &self.ctx.spec;
        for (field, given, kept) in [("from", spec.from, f), ("to", spec.to, t)] {
            if let Some(given) = given
                && given != kept
            {
                return Err(Error::Spec(format!(
                    "clickhouse.{field}: the job's range was fixed at its first run as \
                     {f}..{t} (to exclusive), and its chunks are cut from it; the spec now \
                     says {field}: {given}. Finish the job with its range and give the new \
                     dates a job of their own (another `name`), or `backfill reset` it to \
                     start over on the new range"
                )));
            }
        }
        Ok(Some((f, t)))
    }

    /// A first start (no range fixed yet) refuses a `to` past tomorrow (`planner::to_come`);
    /// a job whose range was fixed by an earlier version goes on with it.
    /// A source that already holds rows of days to come (schedules, expiry dates) may name
    /// them: then its `to` is taken as written.
    async fn not_to_come(&self) -> Result<()> {
        let spec = &self.ctx.spec;
        let today = chrono::Utc::now().date_naive();
        let Some(why) = spec.to.and_then(|t| planner::to_come(t, today)) else {
            return Ok(());
        };
        let tomorrow = today + chrono::Days::new(1);
        if planner::rows_from(&self.ctx.db.client, spec, tomorrow).await? > 0 {
            return Ok(());
        }
        Err(Error::Spec(format!("clickhouse.to: {why}")))
    }

    /// The top chunks of `range` with their source rows.
    pub(crate) async fn top(
        &self,
        range: Option<(NaiveDate, NaiveDate)>,
    ) -> Result<Vec<chunks::Chunk>> {
        let Some((from, to)) = range else {
            return Ok(Vec::new());
        };
        let spec = &self.ctx.spec;
        let mut top = chunks::top(spec, from, to);
        let kinds = self.ctx.kinds();
        let rows = match spec.chunks.first() {
            Some(ChunkLevel::Month) => {
                planner::month_rows(&self.ctx.db.client, spec, &kinds.time, from, to).await?
            }
            Some(ChunkLevel::Day) => {
                let all = chunks::Chunk {
                    level: ChunkLevel::Month,
                    from,
                    to,
                    label: String::new(),
                    values: None,
                    rows: None,
                };
                planner::day_rows(&self.ctx.db.client, spec, &kinds, &all).await?
            }
            _ => Default::default(),
        };
        for c in &mut top {
            c.rows = if rows.is_empty() && spec.chunks.first() == Some(&ChunkLevel::Split) {
                Some(planner::chunk_rows(&self.ctx.db.client, spec, &kinds, c).await?)
            } else {
                Some(rows.get(&c.label).copied().unwrap_or(0))
            };
        }
        Ok(top)
    }

    /// Start (the lock taken): restore what an earlier run landed if the job starts over, fix
    /// the job's range, and build its chunk tree.
    async fn begin(&self, spec_hash: &str, restart: bool) -> Result<JobState> {
        let ctx = &self.ctx;
        ctx.store.ensure().await?;
        let mut records = ctx.store.records(&ctx.job).await?;
        // Again, now that the lock is held: `load` read the records before it, and a runner on
        // another server with the same names (the lock's key) may have started the job or
        // finished it since. Taken for this server's, its done chunks were skipped here.
        self.same_target(&records).await?;
        let has_job = records.iter().any(|r| r.chunk == store::JOB_ROW);
        let start_over = records
            .iter()
            .any(|r| r.chunk == store::START_OVER_ROW && r.status == "start-over");
        let restart = restart || start_over;
        if restart || !has_job {
            // A --rerun, a reset, or a lost state table: whatever the job landed before must
            // not be landed on top of again. Its records go first, as `reset` does: killed
            // while restoring, the job is then one with no state, whose next run restores
            // again (restoring twice is restoring once), never one still recorded done
            // whose rows the restore already took out of the target.
            if restart {
                ctx.store.forget(&ctx.job).await?;
                records.clear();
            }
            // Merges pause while the restore counts rows by part (`restore`).
            ctx.merges_stopped(true).await?;
            // Restoring twice is restoring once (each write is noted as under way before it
            // is made): a lost answer or a dropped connection is retried, not the run failed.
            let restored = resent("restoring the target", 500, || ctx.landing.restore()).await?;
            ctx.merges_stopped(false).await?;
            if restored > 0 {
                tracing::warn!(
                    "restored {restored} partition(s) of the target to what they held before \
                     this job first landed in them; every chunk lands again"
                );
            }
        }
        self.same_cut(&records)?;
        let range = self.range(&records).await?;
        let mut def = match range {
            Some((f, t)) => serde_json::json!({"from": f.to_string(), "to": t.to_string()}),
            None => serde_json::json!({}),
        };
        def["target"] = serde_json::Value::String(self.target_name());
        def["cut"] = serde_json::Value::String(self.cut());
        if let Some(home) = self.home(&records).await? {
            def["home"] = serde_json::Value::String(home);
        }
        let def = def.to_string();
        let started = records
            .iter()
            .find(|r| r.chunk == store::JOB_ROW)
            .map_or(store::now(), |r| r.started.max(1));
        let row = store::job_row(spec_hash, "running", &def, started);
        ctx.put_again(&[&row]).await?;
        let records = ctx.store.records(&ctx.job).await?;
        let named: std::collections::HashSet<String> =
            records.iter().map(|r| r.staging.clone()).collect();
        // Hygiene, not a fence: a failure leaves the tables to the job's end, as before.
        match ctx.landing.drop_strays(&named).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                "dropped {n} staging table(s) that runners which lost the target left"
            ),
            Err(e) => tracing::warn!("could not drop the staging tables lost runners left: {e}"),
        }
        let top = self.top(range).await?;
        let order = match ctx.workers.load(std::sync::atomic::Ordering::Relaxed) {
            0 | 1 => tree::Order::Time,
            _ => tree::Order::LargestFirst,
        };
        let tree = Tree::new(&ctx.spec, top, records.clone(), order);
        if let Some(id) = tree.unreachable_staged(&ctx.spec).first() {
            // Its rows may be partly in the target already: landing the new chunks over the
            // same time could put them there twice.
            return Err(Error::Preflight(format!(
                "chunk {id} was being landed when the job last stopped, and the spec's chunks \
                 (`chunks`, `split_column`, `from`/`to`) changed since, so this run would never \
                 finish landing it and could land its rows again under the new chunks: run once \
                 more with the spec it was staged under, or `backfill reset` the job (the next \
                 run then restores the target's partitions and lands every chunk again)"
            )));
        }
        *ctx.tree.lock().await = Some(tree);
        store::job_state(&ctx.job, &records, true)
            .ok_or_else(|| Error::fatal(format!("job {} vanished from its store", ctx.job)))
    }

    /// Whether a runner holds the target's lock for this job right now (this process, or,
    /// with the state in Postgres, any).
    async fn live(&self) -> Result<bool> {
        let ctx = &self.ctx;
        if ctx.lock.lock().await.is_some() {
            return Ok(true);
        }
        ctx.store
            .running_elsewhere(&ctx.spec.database, &ctx.spec.target, &ctx.job)
            .await
    }
}

/// Refuse a `verify:` query that calls a table function reaching past the server (with this
/// server's list of them): before it runs, and when `run` starts.
pub async fn check_verify(client: &clickhouse::Client, sql: &str) -> Result<()> {
    let functions = client
        .query("SELECT name FROM system.table_functions")
        .with_setting("readonly", "2")
        .fetch_all::<String>()
        .await
        .map_err(|e| errors::ch_error("reading the server's table functions", &e))?;
    match crate::spec::ch_verify_refusal(sql, &functions) {
        Some(why) => Err(Error::Preflight(format!("clickhouse.verify {why}"))),
        None => Ok(()),
    }
}

/// Run a `verify:` query read-only (`readonly=2`: settings may change, nothing may be
/// written): one integer, 0 = the job is done. The SQL is sent as written (no `?` binding).
/// It runs only if it is one SELECT that calls no table function reaching past the server
/// (`spec::ch_verify_refusal`, with this server's table functions).
pub async fn verify(client: &clickhouse::Client, sql: &str) -> Result<i64> {
    check_verify(client, sql).await?;
    let text = client
        .query_raw(sql)
        .with_setting("readonly", "2")
        .fetch_bytes("TabSeparated")
        .map_err(|e| errors::ch_error("clickhouse.verify", &e))?
        .collect()
        .await
        .map_err(|e| errors::ch_error("clickhouse.verify", &e))?;
    let text = String::from_utf8_lossy(&text);
    let mut lines = text.lines();
    match (lines.next().map(str::trim), lines.next()) {
        (Some(v), None) if !v.contains('\t') => v.parse::<i64>().map_err(|_| {
            Error::Preflight(format!(
                "clickhouse.verify must return one integer (0 = the job is done), got {v:?}"
            ))
        }),
        _ => Err(Error::Preflight(
            "clickhouse.verify must return one row with one integer (0 = the job is done)".into(),
        )),
    }
}

impl Backend for ChJob {
    type Worker = ChWorker;

    async fn load(&self) -> Result<Option<JobState>> {
        let records = self.ctx.store.records(&self.ctx.job).await?;
        self.same_target(&records).await?;
        Ok(store::job_state(
            &self.ctx.job,
            &records,
            self.live().await?,
        ))
    }

    async fn blockers(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    async fn preflight(&self) -> Result<()> {
        let ctx = &self.ctx;
        // Before the target's lock is taken: a refused first start keeps nothing.
        if fixed(&ctx.store.records(&ctx.job).await?).is_none() {
            self.not_to_come().await?;
        }
        let kinds = planner::check_source(&ctx.db.client, &ctx.spec, ctx.landing.moves()).await?;
        let _ = ctx.kinds.set(kinds);
        ctx.landing
            .check_target(ctx.spec.land_without_views)
            .await?;
        // A verify that would be refused at the end is refused before any chunk lands.
        if let Some(sql) = &ctx.spec.verify {
            check_verify(&ctx.db.client, sql).await?;
        }
        // The settings first, on their own: an unknown one is the settings' fault.
        if let Err(e) = client::exec(&ctx.chunk_client, "SELECT 1", "").await {
            return Err(Error::Preflight(format!(
                "clickhouse.settings: the server refuses them: {}",
                e.to_string().trim_start_matches(": ")
            )));
        }
        // The cap as the server reads it with the spec's settings (`10G` is a cap too).
        let cap = client::number(
            &ctx.chunk_client,
            "SELECT toUInt64(value) FROM system.settings WHERE name = 'max_memory_usage'",
            "reading max_memory_usage",
        )
        .await?;
        let _ = ctx.memory_cap.set(cap);
        let capped = settings::capped(&ctx.spec, cap, &ctx.db.server);
        let _ = ctx
            .capped
            .set(settings::probe(&ctx.chunk_client, capped, "spill").await?);
        let lighter = settings::lighter(&ctx.spec, cap);
        let _ = ctx
            .lighter
            .set(settings::probe(&ctx.chunk_client, lighter, "lighter").await?);
        // The statement must run: insert nothing (`{chunk}` = 0) into a throwaway table of its
        // own, never into a staging table (it may hold a staged chunk waiting to land).
        ctx.landing.drop_stale_checks().await?;
        let probe = ctx.landing.check_table();
        let sql = ctx
            .spec
            .statement
            .replace("{target}", &probe)
            .replace("{chunk}", "0");
        ctx.landing.fresh(&probe).await?;
        let checked = exec(&ctx.chunk_client, &sql, "").await;
        ctx.landing.drop(&probe).await?;
        checked.map_err(|e| {
            Error::Preflight(format!(
                "clickhouse.statement does not run: {}",
                e.to_string().trim_start_matches(": ")
            ))
        })?;
        // A runner killed while landing a chunk on 18.16, or restoring the target, leaves the
        // target's merges stopped.
        let records = ctx.store.records(&ctx.job).await?;
        if records
            .iter()
            .any(|r| r.chunk == store::MERGES_ROW && r.status == "stopped")
        {
            if self.live().await? {
                // Another runner of this job is landing now: its merges, its business.
            } else if records.iter().any(|r| r.status == store::STAGED) {
                // The killed landing is replayed first (staged chunks lead the queue), and
                // recognises its attached parts by their sizes only while no merge has folded
                // them: merges start again once it has landed (worker.rs `land`).
                tracing::warn!(
                    "the target's merges stay stopped until the chunk an earlier run was \
                     landing is landed again"
                );
            } else {
                tracing::warn!("restarting the target's merges, stopped by an earlier run");
                ctx.landing.resume_merges().await?;
                ctx.merges_stopped(false).await?;
            }
        }
        Ok(())
    }

    async fn join(&self, index: u32, cap: u32) -> Result<std::result::Result<ChWorker, String>> {
        let ctx = &self.ctx;
        // Who holds the target now. It is taken for real at start, after the preflight: a job
        // its preflight refuses never keeps the target from another job.
        if index == 0
            && let Some(who) = ctx
                .store
                .held_by_other(&ctx.spec.database, &ctx.spec.target, &ctx.job)
                .await?
        {
            return Ok(Err(who));
        }
        if index >= cap {
            return Ok(Err(format!("{cap} worker(s), the job's `workers` limit")));
        }
        ctx.workers
            .fetch_max(cap, std::sync::atomic::Ordering::Relaxed);
        Ok(Ok(ChWorker::new(self.ctx.clone(), index as usize)))
    }

    async fn start(&self, spec_hash: &str, how: crate::engine::Start) -> Result<JobState> {
        let restart = how == crate::engine::Start::Over;
        let ctx = &self.ctx;
        {
            let mut held = ctx.lock.lock().await;
            if held.is_none() {
                *held = Some(Arc::new(ctx.take_target(true).await?));
            }
        }
        let started = self.begin(spec_hash, restart).await;
        if started.is_err()
            && let Some(l) = ctx.lock.lock().await.take()
        {
            if let Err(e) = l.release().await {
                tracing::debug!("releasing the target's lock: {e}");
            }
            ctx.store.released();
        }
        started
    }

    async fn estimate(&self) -> Result<Estimate> {
        let t = self.ctx.tree.lock().await;
        let Some(t) = t.as_ref() else {
            return Ok(Estimate::default());
        };
        let total: u64 = t.top.iter().filter_map(|c| c.rows).sum();
        let done: u64 = t
            .records
            .values()
            .filter(|r| r.status == store::DONE)
            .map(|r| r.source_rows)
            .sum();
        Ok(Estimate {
            rows: total.saturating_sub(done),
            exact: true,
            pending_retry: 0,
        })
    }

    /// Every chunk landed, and the target's merges run: a landing that could not start them
    /// again (stopped for an attach) only warned, and a job that ended done is never started
    /// again, so they would stay stopped for good (parts pile up, then TOO_MANY_PARTS). Not
    /// done (the run fails, the next one starts them) while they cannot be started.
    async fn all_done(&self) -> Result<bool> {
        let ctx = &self.ctx;
        let done = ctx
            .tree
            .lock()
            .await
            .as_ref()
            .is_some_and(|t| t.done(&ctx.spec));
        if !done || ctx.landing.moves() {
            return Ok(done);
        }
        let records = ctx.store.records(&ctx.job).await?;
        if records
            .iter()
            .any(|r| r.chunk == store::MERGES_ROW && r.status == "stopped")
        {
            tracing::info!("restarting the target's merges before the job is done");
            ctx.landing.resume_merges().await?;
            ctx.merges_stopped(false).await?;
        }
        Ok(true)
    }

    async fn verify(&self) -> Result<Option<i64>> {
        match &self.ctx.spec.verify {
            None => Ok(None),
            Some(sql) => verify(&self.ctx.db.client, sql).await.map(Some),
        }
    }

    async fn finish(&self, status: Status, error: Option<&str>) -> Result<()> {
        let ctx = &self.ctx;
        let held = ctx.lock.lock().await.clone();
        if let Some(l) = held
            && l.fence_gone().await
        {
            // Whoever holds the target now owns its state: record nothing.
            tracing::warn!(
                "not recording the job's status ({}): this runner no longer holds the target's \
                 lock",
                status.as_str()
            );
            ctx.lock.lock().await.take();
            ctx.store.released();
            return Ok(());
        }
        let records = ctx.store.records(&ctx.job).await?;
        let mut row = records
            .into_iter()
            .find(|r| r.chunk == store::JOB_ROW)
            .unwrap_or_default();
        row.status = status.as_str().into();
        row.error = error.unwrap_or("").into();
        row.updated = store::now();
        row.finished = if status == Status::Done {
            store::now()
        } else {
            0
        };
        ctx.put_again(&[&row]).await?;
        let held = ctx.lock.lock().await.take();
        if let Some(l) = held {
            let released = if status == Status::Done {
                // The target is free for any job again: first said in its lock table, which
                // a clean-up cut short below leaves behind.
                if let Err(e) = l.mark_done().await {
                    tracing::warn!("could not note in the target's lock that the job is done: {e}");
                }
                match ctx.landing.drop_staging_tables(false).await {
                    Ok(()) => l.free().await,
                    Err(e) => Err(e),
                }
            } else {
                l.release().await
            };
            ctx.store.released();
            released?;
        }
        Ok(())
    }

    async fn throttle(&self, _spec: &Throttle) -> Result<Option<Gate>> {
        Ok(None)
    }

    fn describe(&self) -> (String, String) {
        let s = &self.ctx.spec;
        (
            s.redacted_url(),
            format!("{} -> {} by {}", s.source, s.target, s.time_column),
        )
    }

    async fn plan(&self, opts: PlanOptions) -> Result<Plan> {
        plan::plan(self, opts).await
    }

    async fn units(&self) -> Result<Vec<UnitState>> {
        let records = self.ctx.store.records(&self.ctx.job).await?;
        let mut units: Vec<UnitState> = records
            .iter()
            .filter(|r| !r.chunk.is_empty() && !r.chunk.starts_with('#'))
            .map(|r| UnitState {
                unit: r.chunk.clone(),
                status: r.status.clone(),
                keys_done: r.source_rows as i64,
                rows_done: r.rows as i64,
                attempts: r.attempts as i64,
                note: r.error.clone(),
                ..UnitState::default()
            })
            .collect();
        if let Some(m) = records
            .iter()
            .find(|r| r.chunk == store::MERGES_ROW && r.status == "stopped")
        {
            units.push(UnitState {
                unit: "merges of the target".into(),
                status: "STOPPED".into(),
                note: format!(
                    "stopped by runner {} while it landed a chunk; the next run or `backfill \
                     reset` starts them again",
                    m.runner
                ),
                ..UnitState::default()
            });
        }
        Ok(units)
    }

    async fn set_paused(&self, spec_hash: &str, paused: bool) -> Result<()> {
        let ctx = &self.ctx;
        ctx.store.ensure().await?;
        let records = ctx.store.records(&ctx.job).await?;
        if !records.iter().any(|r| r.chunk == store::JOB_ROW) {
            // Paused before its first run: a job row so that `status` shows it.
            let row = store::job_row(spec_hash, "stopped", "", 0);
            ctx.store.put(&ctx.job, &[&row]).await?;
        }
        let r = Record {
            chunk: store::PAUSE_ROW.into(),
            status: if paused {
                "paused".into()
            } else {
                String::new()
            },
            ..Record::default()
        };
        ctx.store.put(&ctx.job, &[&r]).await
    }

    async fn reset(&self, discard_foreign: bool) -> Result<Option<String>> {
        let ctx = &self.ctx;
        // Never under a running job: its lock first (exit 75 naming a live runner).
        // Another target's job: its records are not this target's to forget (checked before
        // this target's lock is taken, which a refusal would leave behind).
        // Another server's records (a `state_url` shared by servers whose database and table
        // have the same names) are forgotten all the same: nothing of them is in this target,
        // and the server they belong to restores its own and starts the job over when it next
        // runs it. A reset is the way out when this server's tables of the job were dropped.
        let before = ctx.store.records(&ctx.job).await?;
        self.same_target_name(&before)?;
        if let Err(e) = self.same_server(&before).await {
            tracing::warn!("{e}");
            tracing::warn!(
                "forgetting them all the same: the server that ran job {} restores its target \
                 and starts the job over when it next runs it",
                ctx.job
            );
        }
        let l = ctx.take_target(false).await?;
        let records = ctx.store.records(&ctx.job).await?;
        // What a move or attach under way carried is told by its staging table: noted before
        // it goes, and before merges start again (on 18.16 an attach is told by its parts'
        // twins in the target, which merges fold away).
        ctx.landing.settle_moves().await?;
        if records
            .iter()
            .any(|r| r.chunk == store::MERGES_ROW && r.status == "stopped")
        {
            ctx.landing.resume_merges().await?;
        }
        let discarded = if discard_foreign {
            ctx.landing.adopt_foreign().await?
        } else {
            0
        };
        let touched = ctx.landing.touched().await?.len();
        // The records go before the staging tables: killed in between, the job is one with no
        // state (its next run restores and lands every chunk again, and drops the tables left),
        // never one whose staged chunks' tables are gone.
        ctx.store.forget(&ctx.job).await?;
        ctx.landing.drop_staging_tables(true).await?;
        l.free().await?;
        if records.is_empty() && touched == 0 {
            return Ok(None);
        }
        Ok(Some(if touched > 0 {
            let dropped = if discarded > 0 {
                format!(", dropping the {discarded} row(s) other writers put there")
            } else {
                String::new()
            };
            format!(
                "checkpoint deleted; the next run first restores the {touched} partition(s) of \
                 the target this job landed in to what they held before it{dropped}, then lands \
                 every chunk again"
            )
        } else {
            "checkpoint deleted; the next run starts from the beginning".into()
        }))
    }
}

/// The job's range, if fixed at its first start (kept in its record).
fn fixed(records: &[Record]) -> Option<(NaiveDate, NaiveDate)> {
    let day = |k: &str| store::job_def(records, k)?.parse::<NaiveDate>().ok();
    Some((day("from")?, day("to")?))
}
