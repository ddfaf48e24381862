//! ClickHouse backend: a time range cut into month chunks; a chunk that fails with
//! MEMORY_LIMIT_EXCEEDED is split into its days, a day into halves of its `split_column` values,
//! down to one value. Chunks much larger than one that failed start a rung lower. Every chunk
//! lands atomically through a staging table (`atomic.rs`) and is recorded in `backfill_state`.

mod atomic;
mod chunks;
pub mod client;
pub mod errors;
mod job;
mod planner;
pub mod store;

pub use job::{ChJob, ChWorker};

use crate::engine::{Estimate, Outcome};
use crate::error::{DbErrorKind, Error, Result};
use crate::spec::{ChunkLevel, ClickhouseSpec, Spec};
use atomic::Staging;
use chrono::NaiveDate;
use chunks::{Chunk, TimeKind};
use std::collections::{HashMap, VecDeque};
use store::{ChStateStore, Record};

/// A chunk's status in the state table.
const DONE: &str = "done";
const SPLIT: &str = "split";
const STAGED: &str = "staged";
const FAILED: &str = "failed";

pub struct ChBackend {
    spec: ClickhouseSpec,
    job: String,
    spec_hash: String,
    client: clickhouse::Client,
    /// `client` with the spec's settings: for the chunk inserts.
    chunk_client: clickhouse::Client,
    state: ChStateStore,
    staging: Staging,
    range: Option<(NaiveDate, NaiveDate)>,
    /// What `time_column` holds (read at `check`): how chunk boundaries are written.
    time: TimeKind,
    month_rows: Option<HashMap<String, u64>>,
    /// Chunks still to do, in order; built from the plan and the state table.
    queue: Option<VecDeque<Chunk>>,
    records: HashMap<String, Record>,
    /// Per level (`month`, `day`, `split`): rows of the smallest chunk of that level that ran out
    /// of memory. Chunks of the same level at least that large start a rung lower. Levels are
    /// not compared with each other: memory follows distinct keys more than rows, and a day of
    /// an oversized month says little about an ordinary month.
    fail_rows: HashMap<String, u64>,
}

/// The backend and checkpoint store of a ClickHouse job.
pub async fn open(spec: &Spec, ch: &ClickhouseSpec) -> Result<(ChBackend, ChStateStore)> {
    let base = client::connect(ch);
    let version = client::version(&base, ch).await?;
    tracing::debug!(job = %spec.name, version, "connected to ClickHouse");
    let backend = ChBackend {
        spec: ch.clone(),
        job: spec.name.clone(),
        spec_hash: spec.hash.clone(),
        chunk_client: client::with_settings(&base, ch),
        state: ChStateStore::new(base.clone(), &spec.state_schema),
        staging: Staging::new(base.clone(), &ch.database, &ch.target, &spec.name),
        client: base.clone(),
        range: None,
        time: TimeKind::default(),
        month_rows: None,
        queue: None,
        records: HashMap::new(),
        fail_rows: HashMap::new(),
    };
    Ok((backend, ChStateStore::new(base, &spec.state_schema)))
}

/// Why a chunk is split.
enum Cause {
    /// Its attempt exceeded the memory limit (the server's message, bytes it would have used).
    Failed(String, Option<u64>),
    /// It is not smaller than a chunk that failed: split without an attempt.
    Predicted(String),
    /// An earlier run split it; its record stands.
    Resumed,
}

/// One line of `plan` for a top-level chunk.
pub struct PlanLine {
    pub label: String,
    pub rows: Option<u64>,
    pub status: String,
    pub note: String,
    /// Source rows still to do (rows less those of its finished smaller chunks).
    pub rows_left: u64,
}

impl ChBackend {
    async fn month_rows(&mut self) -> Result<&HashMap<String, u64>> {
        if self.month_rows.is_none() {
            let rows = match self.range {
                Some((f, t)) => {
                    planner::month_rows(&self.client, &self.spec, self.time, f, t).await?
                }
                None => HashMap::new(),
            };
            self.month_rows = Some(rows);
        }
        Ok(self.month_rows.as_ref().expect("set above"))
    }

    /// Top-level chunks with their source rows where known.
    async fn top(&mut self) -> Result<Vec<Chunk>> {
        let Some((from, to)) = self.range else {
            return Ok(Vec::new());
        };
        let mut top = chunks::top(&self.spec, from, to);
        let rows = match self.spec.chunks.first() {
            Some(ChunkLevel::Month) => self.month_rows().await?.clone(),
            Some(ChunkLevel::Day) => {
                let all = Chunk {
                    level: ChunkLevel::Month,
                    from,
                    to,
                    label: String::new(),
                    group: None,
                    rows: None,
                };
                planner::day_rows(&self.client, &self.spec, self.time, &all).await?
            }
            _ => HashMap::new(),
        };
        if !rows.is_empty() {
            for c in &mut top {
                c.rows = Some(rows.get(&c.label).copied().unwrap_or(0));
            }
        }
        Ok(top)
    }

    async fn load_records(&mut self) -> Result<()> {
        self.records = self
            .state
            .records(&self.job)
            .await?
            .into_iter()
            .map(|r| (r.chunk.clone(), r))
            .collect();
        // What earlier runs learned: per level, the smallest chunk that ran out of memory.
        self.fail_rows.clear();
        for r in self.records.values() {
            if r.status == SPLIT && r.error.contains("Code: 241") && r.source_rows > 0 {
                let e = self
                    .fail_rows
                    .entry(r.level.clone())
                    .or_insert(r.source_rows);
                *e = (*e).min(r.source_rows);
            }
        }
        Ok(())
    }

    /// Whether a chunk has a rung below it.
    fn splittable(&self, c: &Chunk) -> bool {
        match c.group {
            Some(g) => g.count > 1,
            None => match c.level {
                ChunkLevel::Split => self.spec.split_column.is_some(),
                level => chunks::next_level(&self.spec, level).is_some(),
            },
        }
    }

    /// The chunks one rung below `c`, with their source rows.
    async fn children(&self, c: &Chunk) -> Result<Vec<Chunk>> {
        let below = match c.group {
            Some(_) => ChunkLevel::Split,
            None if c.level == ChunkLevel::Split => ChunkLevel::Split,
            None => match chunks::next_level(&self.spec, c.level) {
                Some(l) => l,
                None => return Ok(Vec::new()),
            },
        };
        let mut kids = match below {
            ChunkLevel::Month => Vec::new(),
            ChunkLevel::Day => {
                let rows = planner::day_rows(&self.client, &self.spec, self.time, c).await?;
                let mut days = chunks::days(c.from, c.to);
                for d in &mut days {
                    d.rows = Some(rows.get(&d.label).copied().unwrap_or(0));
                }
                days
            }
            ChunkLevel::Split => {
                let distinct = match c.group {
                    Some(g) => g.count,
                    None => planner::distinct(&self.client, &self.spec, self.time, c).await?,
                };
                let mut groups = chunks::groups(c, distinct);
                for g in &mut groups {
                    g.rows = Some(planner::rows(&self.client, &self.spec, self.time, g).await?);
                }
                groups
            }
        };
        kids.retain(|k| k.from < k.to);
        Ok(kids)
    }

    async fn record(&mut self, c: &Chunk, status: &str, f: impl FnOnce(&mut Record)) -> Result<()> {
        let id = c.id(&self.spec);
        let mut r = self.records.get(&id).cloned().unwrap_or_default();
        r.chunk = id.clone();
        r.level = format!(
            "{:?}",
            if c.group.is_some() {
                ChunkLevel::Split
            } else {
                c.level
            }
        )
        .to_lowercase();
        r.status = status.into();
        r.spec_hash = self.spec_hash.clone();
        r.source_rows = c.rows.unwrap_or(r.source_rows);
        f(&mut r);
        self.state.put(&self.job, &r).await?;
        self.records.insert(id, r);
        Ok(())
    }

    /// Record a split and queue the children in front, in order. A chunk that cannot be cut
    /// any smaller (one day with one `split_column` value) fails the job: never skip its rows.
    async fn split(&mut self, c: &Chunk, cause: Cause) -> Result<()> {
        let id = c.id(&self.spec);
        let kids = self.children(c).await?;
        let why = match &cause {
            Cause::Failed(w, _) | Cause::Predicted(w) => w.clone(),
            Cause::Resumed => self
                .records
                .get(&id)
                .map_or(String::new(), |r| r.error.clone()),
        };
        if kids.is_empty() {
            let t = why.clone();
            let attempted = matches!(cause, Cause::Failed(..));
            self.record(c, FAILED, |r| {
                r.attempts += u32::from(attempted);
                r.error = t;
            })
            .await?;
            return Err(Error::Db {
                message: format!(
                    "chunk {id} cannot be split any further (it holds a single {} value) and {why}",
                    self.spec.split_column.as_deref().unwrap_or("split_column")
                ),
                kind: DbErrorKind::Fatal,
            });
        }
        let covered: u64 = kids.iter().filter_map(|k| k.rows).sum();
        if let Some(n) = c.rows
            && kids.iter().all(|k| k.rows.is_some())
            && covered != n
        {
            return Err(Error::Db {
                message: format!(
                    "chunk {id}: its {} smaller chunks hold {covered} rows, the chunk {n}; the \
                     source changed while the job ran? Not splitting",
                    kids.len()
                ),
                kind: DbErrorKind::Fatal,
            });
        }
        let level = kids.first().map_or("split", |k| match (k.group, k.level) {
            (Some(_), _) | (_, ChunkLevel::Split) => "split",
            (_, ChunkLevel::Day) => "day",
            (_, ChunkLevel::Month) => "month",
        });
        crate::metrics::split(&self.job, level);
        tracing::info!(
            job = %self.job, chunk = %c.id(&self.spec), children = kids.len(),
            "splitting chunk {} into {} {level} chunk(s): {why}", c.id(&self.spec), kids.len()
        );
        match cause {
            Cause::Failed(why, memory) => {
                self.record(c, SPLIT, |r| {
                    r.attempts += 1;
                    r.error = why;
                    r.memory_bytes = memory.unwrap_or(r.memory_bytes);
                })
                .await?
            }
            Cause::Predicted(why) => self.record(c, SPLIT, |r| r.error = why).await?,
            Cause::Resumed => {}
        }
        let queue = self.queue.as_mut().expect("queue built");
        for k in kids.into_iter().rev() {
            queue.push_front(k);
        }
        Ok(())
    }

    /// Insert a chunk into staging, then move it into the target. Errors leave nothing in the
    /// target; the staging table is dropped.
    async fn attempt(&mut self, c: &Chunk) -> Result<Outcome> {
        let sql = self
            .spec
            .statement
            .replace("{target}", &self.staging.qualified())
            .replace("{chunk}", &c.predicate(&self.spec, self.time));
        self.staging.create().await?;
        let attempts = self
            .records
            .get(&c.id(&self.spec))
            .map_or(0, |r| r.attempts)
            + 1;
        if let Err(e) = self.chunk_client.query(&sql).execute().await {
            let _ = self.staging.drop().await;
            let err = errors::ch_error(&format!("chunk {}", c.id(&self.spec)), &e);
            let (text, kind) = match &err {
                Error::Db { message, kind } => (message.clone(), *kind),
                other => (other.to_string(), DbErrorKind::Fatal),
            };
            if kind != DbErrorKind::MemoryLimit {
                // Keep the attempt count and the error; the chunk is tried again.
                let t = text.clone();
                self.record(c, "pending", |r| {
                    r.attempts = attempts;
                    r.error = t;
                })
                .await?;
            }
            return Err(err);
        }
        let (rows, partitions) = self.staging.contents().await?;
        // From the copy of the target's parts to the replace, no merge may commit in the target.
        self.staging.pause_target_merges().await?;
        self.staging.add_target_parts(&partitions).await?;
        let staging_name = self.staging.name().to_string();
        self.record(c, STAGED, |r| {
            r.attempts = attempts;
            r.rows = rows;
            r.partitions = partitions;
            r.staging = staging_name;
            r.error.clear();
        })
        .await?;
        self.land(c).await
    }

    /// Replace the target's partitions from staging (again, after a kill), record done.
    async fn land(&mut self, c: &Chunk) -> Result<Outcome> {
        let id = c.id(&self.spec);
        let rec = self.records.get(&id).cloned().unwrap_or_default();
        if !self.staging.exists().await? {
            return Err(Error::Db {
                message: format!(
                    "chunk {id} is recorded as staged but its staging table {} is gone: it may \
                     have landed partly; check the target, then `backfill reset` the job",
                    self.staging.name()
                ),
                kind: DbErrorKind::Fatal,
            });
        }
        self.staging.pause_target_merges().await?;
        self.staging.replace_target(&rec.partitions).await?;
        self.staging.resume_target_merges().await?;
        self.record(c, DONE, |r| r.error.clear()).await?;
        self.staging.drop().await?;
        Ok(Outcome {
            keys: c.rows.unwrap_or(rec.source_rows),
            rows: rec.rows,
            cursor: Some(id),
            ..Outcome::default()
        })
    }

    async fn build_queue(&mut self) -> Result<()> {
        if self.queue.is_none() {
            if self.range.is_none() {
                self.range = planner::range(&self.client, &self.spec).await?;
            }
            self.load_records().await?;
            let top = self.top().await?;
            self.queue = Some(top.into());
        }
        Ok(())
    }

    /// Read-only checks of the source and target (for `plan`, which must not write).
    pub async fn check(&mut self) -> Result<()> {
        self.time = planner::check_source(&self.client, &self.spec).await?;
        self.staging.check_target().await
    }

    /// The learning key of a chunk's level.
    fn level_key(c: &Chunk) -> String {
        let level = if c.group.is_some() {
            ChunkLevel::Split
        } else {
            c.level
        };
        format!("{level:?}").to_lowercase()
    }

    /// The learned limit for chunks of `c`'s level.
    fn limit_for(&self, c: &Chunk) -> Option<u64> {
        self.fail_rows.get(&Self::level_key(c)).copied()
    }

    /// What `plan` shows: each top-level chunk, its rows, its state, and how it would run.
    pub async fn plan(&mut self) -> Result<Vec<PlanLine>> {
        self.build_queue().await?;
        let top: Vec<Chunk> = self.queue.clone().unwrap_or_default().into();
        let job_done = self.records.get("").is_some_and(|r| r.status == DONE);
        Ok(top
            .iter()
            .map(|c| {
                let id = c.id(&self.spec);
                let rec = self.records.get(&id);
                // Pieces of a split chunk: ids under it (`2026-01-15`, `2026-01/project_id[..]`).
                let (pieces, pieces_rows) = self
                    .records
                    .values()
                    .filter(|r| r.status == DONE && r.level != Self::level_key(c))
                    .filter(|r| {
                        r.chunk.starts_with(&format!("{id}-")) || r.chunk.starts_with(&format!("{id}/"))
                    })
                    .fold((0u64, 0u64), |(n, rows), r| (n + 1, rows + r.source_rows));
                let split_done = job_done && rec.is_some_and(|r| r.status == SPLIT);
                let status = match rec {
                    _ if split_done => "done".to_string(),
                    Some(r) => r.status.clone(),
                    None => "pending".to_string(),
                };
                let rows_left = match status.as_str() {
                    "done" => 0,
                    _ => c.rows.unwrap_or(0).saturating_sub(pieces_rows),
                };
                let note = match (rec.map(|r| r.status.as_str()), c.rows, self.limit_for(c)) {
                    (Some(DONE), _, _) => String::new(),
                    (Some(SPLIT), _, _) if split_done => {
                        format!("split; its {pieces} smaller chunks are done")
                    }
                    (Some(SPLIT), _, _) => format!(
                        "split earlier: {pieces} smaller chunks done, resumes with the rest"
                    ),
                    (_, Some(n), Some(limit)) if n >= limit && self.splittable(c) => format!(
                        "{n} rows >= {limit} rows of a chunk that ran out of memory: starts a rung lower"
                    ),
                    _ => "one query".into(),
                };
                PlanLine {
                    label: id,
                    rows: c.rows,
                    status,
                    note,
                    rows_left,
                }
            })
            .collect())
    }
}

impl ChBackend {
    pub async fn preflight(&mut self) -> Result<()> {
        self.check().await?;
        // A run killed while landing a chunk leaves the target's merges stopped.
        self.staging.resume_target_merges().await?;
        // The statement must run: insert nothing (`{chunk}` = 0) into a throwaway table of its
        // own. Never the job's staging table: it may hold a staged chunk waiting to land.
        let probe = Staging::new(
            self.client.clone(),
            &self.spec.database,
            &self.spec.target,
            &format!("{}_check", self.job),
        );
        let sql = self
            .spec
            .statement
            .replace("{target}", &probe.qualified())
            .replace("{chunk}", "0");
        probe.create().await?;
        let checked = self.chunk_client.query(&sql).execute().await;
        probe.drop().await?;
        checked.map_err(|e| {
            Error::Preflight(format!(
                "clickhouse.statement does not run: {}",
                errors::ch_error("", &e)
                    .to_string()
                    .trim_start_matches(": ")
            ))
        })?;
        self.range = planner::range(&self.client, &self.spec).await?;
        Ok(())
    }

    pub async fn estimate(&mut self) -> Result<Estimate> {
        if self.range.is_none() {
            self.range = planner::range(&self.client, &self.spec).await?;
        }
        let total: u64 = match self.spec.chunks.first() {
            Some(ChunkLevel::Month) => self.month_rows().await?.values().sum(),
            _ => self.top().await?.iter().filter_map(|c| c.rows).sum(),
        };
        let done: u64 = self
            .state
            .records(&self.job)
            .await?
            .iter()
            .filter(|r| r.status == DONE)
            .map(|r| r.source_rows)
            .sum();
        Ok(Estimate {
            rows: total.saturating_sub(done),
            exact: true,
            pending_retry: 0,
        })
    }

    pub async fn run_unit(&mut self) -> Result<Outcome> {
        self.build_queue().await?;
        loop {
            let Some(c) = self.queue.as_mut().expect("queue built").pop_front() else {
                return Ok(Outcome {
                    unit_done: true,
                    ..Outcome::default()
                });
            };
            let id = c.id(&self.spec);
            match self.records.get(&id).map(|r| r.status.clone()).as_deref() {
                Some(DONE) => continue,
                Some(SPLIT) => {
                    self.split(&c, Cause::Resumed).await?;
                    continue;
                }
                Some(STAGED) => {
                    let landed = self.land(&c).await;
                    if landed.is_err() {
                        let _ = self.staging.resume_target_merges().await;
                    }
                    return landed;
                }
                _ => {}
            }
            if let (Some(n), Some(limit)) = (c.rows, self.limit_for(&c))
                && n >= limit
                && self.splittable(&c)
            {
                let why = format!(
                    "{n} rows, not below the {limit} rows of a chunk that exceeded the memory limit"
                );
                self.split(&c, Cause::Predicted(why)).await?;
                continue;
            }
            let attempt = self.attempt(&c).await;
            if attempt.is_err() {
                // Never leave the target's merges stopped behind a failed attempt.
                if let Err(e) = self.staging.resume_target_merges().await {
                    tracing::warn!("could not restart merges on the target: {e}");
                }
            }
            return match attempt {
                Ok(out) => Ok(out),
                Err(e) if e.db_kind() == Some(DbErrorKind::MemoryLimit) => {
                    let text = e.to_string();
                    if let Some(n) = c.rows.filter(|n| *n > 0) {
                        let e = self.fail_rows.entry(Self::level_key(&c)).or_insert(n);
                        *e = (*e).min(n);
                    }
                    if self.splittable(&c) {
                        let hint = errors::memory_hint(&text);
                        self.split(&c, Cause::Failed(text, hint)).await?;
                        Ok(Outcome::default())
                    } else {
                        let t = text.clone();
                        self.record(&c, FAILED, |r| {
                            r.attempts += 1;
                            r.error = t;
                        })
                        .await?;
                        Err(Error::Db {
                            message: format!(
                                "chunk {id} exceeds the memory limit even as the smallest chunk \
                                 the ladder allows: {text}"
                            ),
                            kind: DbErrorKind::Fatal,
                        })
                    }
                }
                Err(e) => {
                    // Transient: the driver retries this same chunk after a pause.
                    self.queue.as_mut().expect("queue built").push_front(c);
                    Err(e)
                }
            };
        }
    }

    /// Forget the queue after a failure: it is rebuilt from the state table.
    pub fn forget_queue(&mut self) {
        self.queue = None;
    }
}

/// Run a `verify:` query read-only (`readonly=2`: settings may change, nothing may be
/// written): one integer, 0 = the job is done. The SQL is sent as written (no `?` binding).
pub async fn verify(client: &clickhouse::Client, sql: &str) -> Result<i64> {
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
