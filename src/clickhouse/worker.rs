//! One ClickHouse worker: claims a chunk from the job's tree, inserts it into its own staging
//! table, and lands it; or, when the chunk runs out of memory, tries it once more with lighter
//! settings and then splits it one rung down. A chunk stays claimed by its worker until it is
//! done or split: a transient error (network, 159, 202, 252, a request that failed once) makes
//! the driver retry the same chunk, never drop it.

use super::chunks::Chunk;
use super::client::exec;
use super::errors::{MEMORY_LIMIT_EXCEEDED, code, memory_hint};
use super::landing::Parts;
use super::store::{DONE, FAILED, PAUSE_ROW, PENDING, Record, SPLIT, STAGED};
use super::tree::Next;
use super::{Ctx, planner, settings};
use crate::engine::{Claim, Outcome, Worker};
use crate::error::{DbErrorKind, Error, Result};
use crate::spec::ChunkLevel;
use std::sync::Arc;
use std::time::Instant;

pub struct ChWorker {
    ctx: Arc<Ctx>,
    name: String,
    held: Option<Chunk>,
    /// The held chunk ran out of memory: its next attempt uses lighter settings.
    light_next: bool,
}

/// Why a chunk is split.
enum Cause {
    /// Its attempt exceeded the memory limit (the server's message, bytes it would have used).
    Failed(String, Option<u64>, bool),
    /// It is not smaller than a chunk that failed even with lighter settings.
    Predicted(String),
}

impl ChWorker {
    pub fn new(ctx: Arc<Ctx>, index: usize) -> ChWorker {
        ChWorker {
            ctx,
            name: format!("w{index}"),
            held: None,
            light_next: false,
        }
    }

    async fn record_of(&self, c: &Chunk) -> Record {
        let id = c.id(&self.ctx.spec);
        let tree = self.ctx.tree.lock().await;
        let mut r = tree
            .as_ref()
            .and_then(|t| t.records.get(&id).cloned())
            .unwrap_or_default();
        r.chunk = id;
        r.level = c.level_name().into();
        r.def = serde_json::to_string(c).expect("a chunk serializes");
        r.spec_hash = self.ctx.spec_hash.clone();
        r.runner = crate::state::runner_id();
        if let Some(n) = c.rows {
            r.source_rows = n;
        }
        r
    }

    /// The settings of a lighter attempt (probed in preflight).
    fn lighter(&self) -> &[(&'static str, String)] {
        self.ctx.lighter.get().map_or(&[], Vec::as_slice)
    }

    /// How a chunk that ran out of memory for good was tried.
    fn even_lighter(&self) -> &'static str {
        if self.lighter().is_empty() {
            "with no lighter settings left to try (the spec pins them, or the server refuses them)"
        } else {
            "even with lighter settings"
        }
    }

    /// Whether the chunk has a rung below it.
    fn splittable(&self, c: &Chunk) -> bool {
        let spec = &self.ctx.spec;
        if let Some(v) = c.values.as_ref().filter(|v| v.single || v.only_nulls()) {
            // A single value still holding the NULLs splits once more: the two apart.
            return v.single && v.nulls;
        }
        if c.values.is_some() || c.level == ChunkLevel::Split {
            return spec.split_column.is_some();
        }
        super::chunks::next_level(spec, c.level).is_some()
    }

    /// The chunks one rung below `c`, with their source rows; empty when it holds one
    /// `split_column` value (or the ladder ends).
    async fn children(&self, c: &Chunk) -> Result<Vec<Chunk>> {
        let ctx = &self.ctx;
        let (spec, kinds, client) = (&ctx.spec, &ctx.kinds(), &ctx.db.client);
        let below = if c.values.is_some() || c.level == ChunkLevel::Split {
            Some(ChunkLevel::Split)
        } else {
            super::chunks::next_level(spec, c.level)
        };
        if let Some(apart) = c.apart() {
            let mut kids = apart.to_vec();
            for k in &mut kids {
                k.rows = Some(planner::chunk_rows(client, spec, kinds, k).await?);
            }
            // Apart only when both hold rows (never when the column cannot be NULL): else the
            // chunk is the one value it names, with no rung below it.
            if kids.iter().any(|k| k.rows == Some(0)) {
                return Ok(Vec::new());
            }
            return Ok(kids);
        }
        let mut kids = match below {
            None | Some(ChunkLevel::Month) => Vec::new(),
            Some(ChunkLevel::Day) => {
                // Every day, the empty ones too: together they cover the chunk, and rows that
                // arrive later on a day empty now are still in one of them.
                let rows = planner::day_rows(client, spec, kinds, c).await?;
                super::chunks::days(c.from, c.to)
                    .into_iter()
                    .map(|mut d| {
                        d.rows = Some(rows.get(&d.label).copied().unwrap_or(0));
                        d
                    })
                    .collect()
            }
            Some(ChunkLevel::Split) => match planner::median(client, spec, kinds, c).await? {
                None => Vec::new(),
                Some((mid, low_single, high_single)) => {
                    let mut halves = c.halves(&mid, low_single.as_deref(), high_single).to_vec();
                    for h in &mut halves {
                        h.rows = Some(planner::chunk_rows(client, spec, kinds, h).await?);
                    }
                    halves
                }
            },
        };
        kids.retain(|k| k.from < k.to);
        Ok(kids)
    }

    /// Record the split and its children in one write, and hand the children out next.
    async fn split(&mut self, c: &Chunk, cause: Cause) -> Result<Outcome> {
        let ctx = self.ctx.clone();
        let id = c.id(&ctx.spec);
        let kids = self.children(c).await?;
        let mut parent = self.record_of(c).await;
        let why = match &cause {
            Cause::Failed(w, memory, light) => {
                // The attempt itself was recorded before the split.
                parent.code = u64::from(MEMORY_LIMIT_EXCEEDED);
                parent.memory_bytes = memory.unwrap_or(parent.memory_bytes);
                parent.light = u64::from(*light || parent.light > 0);
                w.clone()
            }
            Cause::Predicted(w) => w.clone(),
        };
        parent.error = why.clone();
        if kids.is_empty() {
            parent.status = FAILED.into();
            ctx.put(&[&parent]).await?;
            if let Some(t) = ctx.tree.lock().await.as_mut() {
                t.fail(&ctx.spec, c);
            }
            self.held = None;
            return Err(Error::fatal(format!(
                "chunk {id} exceeds the memory limit even as the smallest chunk the ladder \
                 allows ({}), {}: {why}",
                match &c.values {
                    Some(v) if v.only_nulls() => format!(
                        "one day or less, only the rows whose {} is NULL",
                        ctx.spec.split_column.as_deref().unwrap_or("split_column")
                    ),
                    Some(v) if v.single => format!(
                        "one day or less, one {} value",
                        ctx.spec.split_column.as_deref().unwrap_or("split_column")
                    ),
                    _ => "its ladder has no rung below it".into(),
                },
                self.even_lighter()
            )));
        }
        // The children must hold every row of the chunk: counted together, now (the count
        // kept with the chunk dates from when it was cut, and the source may have grown).
        let mut kids = kids;
        let (n, each) = planner::cover(&ctx.db.client, &ctx.spec, &ctx.kinds(), c, &kids).await?;
        for (k, rows) in kids.iter_mut().zip(&each) {
            k.rows = Some(*rows);
        }
        let covered: u64 = each.iter().sum();
        if covered != n {
            return Err(Error::fatal(format!(
                "chunk {id}: its {} smaller chunks hold {covered} of its {n} rows, counted \
                 together: not splitting a chunk whose parts would leave rows out",
                kids.len()
            )));
        }
        let level = kids.first().map_or("split", |k| k.level_name());
        crate::metrics::split(&ctx.job, level);
        tracing::info!(
            job = %ctx.job, chunk = %id, children = kids.len(),
            "splitting chunk {id} into {} {level} chunk(s): {why}", kids.len()
        );
        parent.status = SPLIT.into();
        parent.children = kids.iter().map(|k| k.id(&ctx.spec)).collect();
        let mut records = vec![parent];
        for k in &kids {
            let mut r = self.record_of(k).await;
            if r.status.is_empty() {
                r.status = PENDING.into();
            }
            records.push(r);
        }
        let refs: Vec<&Record> = records.iter().collect();
        ctx.put(&refs).await?;
        if let Some(t) = ctx.tree.lock().await.as_mut() {
            t.split(&ctx.spec, c, kids);
        }
        self.held = None;
        self.light_next = false;
        Ok(Outcome {
            unit_done: true,
            cursor: Some(format!("{id} split")),
            ..Outcome::default()
        })
    }

    /// Insert the chunk into this worker's staging table; on success, land it.
    async fn attempt(&mut self, c: &Chunk) -> Result<Outcome> {
        let ctx = self.ctx.clone();
        let spec = &ctx.spec;
        let id = c.id(spec);
        let staging = ctx.landing.staging(&id);
        let light = self.light_next;
        let sql = spec
            .statement
            .replace("{target}", &staging)
            .replace("{chunk}", &c.predicate(spec, &ctx.kinds()));
        // A runner that lost the target (frozen past its heartbeat, its insert killed by the
        // one that took over) goes no further: not even into a table of its own.
        ctx.check_lock().await?;
        ctx.landing.fresh(&staging).await?;
        // The lighter settings come last: where both set one, theirs wins.
        let capped = ctx.capped.get().map_or(&[][..], Vec::as_slice);
        let mut client = settings::with(&ctx.chunk_client, capped);
        if light {
            client = settings::with(&client, self.lighter());
        }
        let mut rec = self.record_of(c).await;
        rec.attempts += 1;
        let client = ctx.queries.tagged(&client);
        if let Err(e) = exec(&client, &sql, &format!("chunk {id}")).await {
            let _ = ctx.landing.drop(&staging).await;
            let text = e.to_string();
            if e.db_kind() == Some(DbErrorKind::MemoryLimit) {
                let hint = memory_hint(&text);
                if !light && !self.lighter().is_empty() {
                    // Once more with lighter settings before splitting.
                    rec.status = PENDING.into();
                    rec.code = u64::from(MEMORY_LIMIT_EXCEEDED);
                    rec.memory_bytes = hint.unwrap_or(rec.memory_bytes);
                    rec.error = text;
                    ctx.put(&[&rec]).await?;
                    self.light_next = true;
                    tracing::info!(
                        job = %ctx.job, chunk = %id,
                        "chunk {id} ran out of memory; trying it once more with lighter settings"
                    );
                    return Ok(Outcome::default());
                }
                if self.splittable(c) {
                    // Recorded first: if the split itself fails (a count times out), the next
                    // try splits without running this attempt again.
                    rec.status = PENDING.into();
                    rec.code = u64::from(MEMORY_LIMIT_EXCEEDED);
                    rec.light = 1;
                    rec.memory_bytes = hint.unwrap_or(rec.memory_bytes);
                    rec.error = text.clone();
                    ctx.put(&[&rec]).await?;
                    return self.split(c, Cause::Failed(text, hint, light)).await;
                }
                rec.status = FAILED.into();
                rec.code = u64::from(MEMORY_LIMIT_EXCEEDED);
                rec.light = u64::from(light);
                rec.error = text.clone();
                ctx.put(&[&rec]).await?;
                if let Some(t) = ctx.tree.lock().await.as_mut() {
                    t.fail(spec, c);
                }
                self.held = None;
                return Err(Error::fatal(format!(
                    "chunk {id} exceeds the memory limit even as the smallest chunk the ladder \
                     allows: {text}"
                )));
            }
            // Kept in the work: the driver retries it (transient) or the job fails naming it.
            rec.status = PENDING.into();
            rec.code = u64::from(code(&text).unwrap_or(0));
            rec.error = text;
            ctx.put(&[&rec]).await?;
            if e.db_kind() == Some(DbErrorKind::Fatal) {
                if let Some(t) = ctx.tree.lock().await.as_mut() {
                    t.fail(spec, c);
                }
                self.held = None;
            }
            return Err(e);
        }
        self.light_next = false;
        let parts = ctx.landing.staged_parts(&staging).await?;
        let mut partitions: Vec<String> = parts.keys().cloned().collect();
        partitions.sort();
        let own: Vec<u64> = partitions.iter().map(|p| parts[p].0).collect();
        rec.rows = own.iter().sum();
        rec.partitions = partitions;
        rec.part_rows = own;
        rec.staging = staging;
        rec.light = u64::from(light);
        rec.code = 0;
        rec.error.clear();
        self.land(c, rec, Some(parts)).await
    }

    /// Land a chunk whose rows are in `rec.staging` (`fresh`: just inserted, with the staging
    /// table's parts; else staged by an earlier run), then record it done.
    async fn land(&mut self, c: &Chunk, mut rec: Record, fresh: Option<Parts>) -> Result<Outcome> {
        let ctx = self.ctx.clone();
        let id = c.id(&ctx.spec);
        ctx.check_lock().await?;
        let _one = ctx.land_lock.lock().await;
        let staging = rec.staging.clone();
        if fresh.is_none() {
            self.check_staged(&id, &rec).await?;
        }
        let attach = !ctx.landing.moves();
        let landed = async {
            if attach {
                // From the attach to its record, no merge may fold the attached parts into
                // others: a replay recognizes them by their sizes.
                ctx.merges_stopped(true).await?;
                ctx.landing.stop_merges().await?;
            }
            let known = match fresh {
                Some(staged) => {
                    let ledger = ctx.landing.keep_base(&rec.partitions).await?;
                    // Only a replay of an attach needs them (moving cannot land twice): the
                    // target's top, and the staging table's parts, whose merges stop here.
                    if attach {
                        rec.mark = ctx.landing.mark().await?;
                        ctx.landing.note_staged(&staging).await?;
                    }
                    rec.status = STAGED.into();
                    if let Err(e) = ctx.put(&[&rec]).await {
                        // The write may have gone through, its answer lost: the store may say
                        // staged. The staging table is whole either way, so this run's retry
                        // replays it (recording it staged again first) and never inserts into
                        // it again: that empties a table the store may name, and a kill then
                        // left a staged chunk with nothing to land.
                        ctx.remember(&rec).await;
                        return Err(e);
                    }
                    Some((staged, ledger))
                }
                None => {
                    // Staged for sure before anything of it lands (the write that said so may
                    // have lost its answer in this run).
                    ctx.put(&[&rec]).await?;
                    None
                }
            };
            let held = ctx.lock.lock().await.clone();
            ctx.landing
                .land(
                    &id,
                    &staging,
                    &rec.partitions,
                    rec.mark,
                    known,
                    held.as_deref(),
                )
                .await?;
            // Done once recorded so: a failed write leaves the chunk staged, here as in the
            // store (merges then stay stopped for its replay).
            let mut done = rec.clone();
            done.status = DONE.into();
            done.error.clear();
            ctx.put(&[&done]).await?;
            rec = done;
            Ok(())
        }
        .await;
        // Merges start again once the chunk is done, or when nothing of it can be in the
        // target. A landing that failed with the chunk staged may have attached it: its replay
        // (this run's retry or the next run's) recognises the attached parts only while no
        // merge has folded them, so merges stay stopped until then (and `status` says so).
        // Nor while another chunk is staged (another worker's, here or in another process,
        // whose landing failed and waits for its retry, or is under way).
        let replay_pending = landed.is_err() && rec.status == STAGED;
        if attach && replay_pending {
            tracing::warn!("the target's merges stay stopped until chunk {id} is landed again");
        } else if attach {
            match self.other_staged(&id).await {
                Ok(Some(other)) => tracing::info!(
                    "the target's merges stay stopped until chunk {other} is landed as well"
                ),
                Ok(None) => match ctx.landing.resume_merges().await {
                    Ok(()) => ctx.merges_stopped(false).await?,
                    Err(e) => tracing::warn!("could not restart merges on the target: {e}"),
                },
                Err(e) => tracing::warn!("merges stay stopped: {e}"),
            }
        }
        landed?;
        let _ = ctx.landing.drop(&staging).await;
        drop(_one);
        if let Some(t) = ctx.tree.lock().await.as_mut() {
            t.finish(&ctx.spec, c, false);
        }
        self.held = None;
        Ok(Outcome {
            keys: rec.source_rows,
            rows: rec.rows,
            unit_done: true,
            cursor: Some(id),
            ..Outcome::default()
        })
    }

    /// Before a replay: the chunk's staging table still holds what its record says it staged,
    /// in each partition: on 18.16 (an attach copies) some of it in every partition (its own
    /// merges may have folded rows since they were counted), on current servers that or
    /// nothing (a move took it into the target already), and never more. Anything else (the
    /// table gone or emptied, a partition dropped from it) would land the wrong rows and
    /// record the chunk done.
    async fn check_staged(&self, id: &str, rec: &Record) -> Result<()> {
        let ctx = &self.ctx;
        let staging = &rec.staging;
        if !ctx.landing.exists(staging).await? {
            return Err(Error::fatal(format!(
                "chunk {id} is recorded as staged but its staging table {staging} is gone \
                 (dropped by hand?): it may have landed partly; check the target, then \
                 `backfill reset` the job"
            )));
        }
        if rec.part_rows.len() != rec.partitions.len() {
            return Ok(());
        }
        let now = ctx.landing.parts(staging).await?;
        let moves = ctx.landing.moves();
        let wrong: Vec<String> = rec
            .partitions
            .iter()
            .zip(&rec.part_rows)
            .filter_map(|(p, &want)| {
                let has = now.get(p).map_or(0, |x| x.0);
                // The staging table's own merges can fold rows (its engine is the target's: a
                // Replacing or Summing one), never add any; and on 18.16 nothing leaves it.
                let gone = has == 0 && want > 0 && !moves;
                (has > want || gone).then(|| format!("partition {p}: {has} of {want} row(s)"))
            })
            .chain(
                now.keys()
                    .filter(|p| !rec.partitions.contains(p))
                    .map(|p| format!("partition {p}: not among the chunk's")),
            )
            .collect();
        if wrong.is_empty() {
            return Ok(());
        }
        Err(Error::fatal(format!(
            "chunk {id} is recorded as staged, but its staging table {staging} no longer holds \
             what it staged ({}): changed by hand? Landing it would land the wrong rows; check \
             the target, then `backfill reset` the job",
            wrong.join("; ")
        )))
    }

    /// A chunk of the job other than `id` recorded staged (its landing under way, or waiting to
    /// be replayed), if any.
    async fn other_staged(&self, id: &str) -> Result<Option<String>> {
        // This run's own knowledge first: a chunk remembered staged after the write that said
        // so lost its answer may not be staged in the store.
        let remembered = self.ctx.tree.lock().await.as_ref().and_then(|t| {
            t.records
                .values()
                .find(|r| r.status == STAGED && r.chunk != id)
                .map(|r| r.chunk.clone())
        });
        if remembered.is_some() {
            return Ok(remembered);
        }
        let records = self.ctx.store.records(&self.ctx.job).await?;
        Ok(records
            .into_iter()
            .find(|r| r.status == STAGED && r.chunk != id)
            .map(|r| r.chunk))
    }

    async fn run(&mut self, c: Chunk) -> Result<Outcome> {
        let ctx = self.ctx.clone();
        let rec = self.record_of(&c).await;
        if rec.status == STAGED {
            return self.land(&c, rec, None).await;
        }
        if rec.status == DONE {
            // Done by an earlier attempt of this run whose last step failed (the state write
            // after the landing, say), or by another runner: out of the tree's chunks in flight
            // too, or the job waits on it for ever.
            if let Some(t) = ctx.tree.lock().await.as_mut() {
                t.finish(&ctx.spec, &c, false);
            }
            self.held = None;
            return Ok(Outcome {
                unit_done: true,
                ..Outcome::default()
            });
        }
        // What this chunk's own earlier attempts showed (a run killed in between).
        if rec.code == u64::from(MEMORY_LIMIT_EXCEEDED) {
            if (rec.light > 0 || self.lighter().is_empty()) && self.splittable(&c) {
                let why = rec.error.clone();
                return self.split(&c, Cause::Predicted(why)).await;
            }
            self.light_next = true;
        }
        let (normal, light) = ctx
            .tree
            .lock()
            .await
            .as_ref()
            .map_or_else(Default::default, |t| t.learned());
        let level = c.level_name().to_string();
        if let Some(n) = c.rows {
            if let Some(&limit) = light.get(&level)
                && n >= limit
                && self.splittable(&c)
            {
                let why = format!(
                    "{n} rows, not below the {limit} rows of a chunk that exceeded the memory \
                     limit {}",
                    self.even_lighter()
                );
                return self.split(&c, Cause::Predicted(why)).await;
            }
            if normal.get(&level).is_some_and(|&limit| n >= limit) && !self.lighter().is_empty() {
                self.light_next = true;
            }
        }
        self.attempt(&c).await
    }
}

impl Worker for ChWorker {
    fn name(&self) -> &str {
        &self.name
    }

    async fn claim(&mut self) -> Result<Claim> {
        let ctx = self.ctx.clone();
        if let Some(c) = &self.held {
            return Ok(Claim::Got(c.id(&ctx.spec)));
        }
        ctx.check_lock().await?;
        let mut t = ctx.tree.lock().await;
        let Some(tree) = t.as_mut() else {
            return Err(Error::fatal("internal: the job's chunks were not built"));
        };
        match tree.next(&ctx.spec) {
            Next::Chunk(c) => {
                let id = c.id(&ctx.spec);
                self.held = Some(c);
                self.light_next = false;
                Ok(Claim::Got(id))
            }
            Next::Wait { busy } => Ok(Claim::Nothing {
                all_done: false,
                held: busy as u64,
                blocked: 0,
            }),
            Next::Done => Ok(Claim::Nothing {
                all_done: true,
                held: 0,
                blocked: 0,
            }),
        }
    }

    async fn step(&mut self, _size: u64) -> Result<Outcome> {
        let Some(c) = self.held.clone() else {
            return Err(Error::Lost(format!("worker {} holds no chunk", self.name)));
        };
        let started = Instant::now();
        let mut out = self.run(c).await?;
        out.timings.statement = started.elapsed();
        Ok(out)
    }

    async fn release(&mut self) -> Result<()> {
        if let Some(c) = self.held.take()
            && let Some(t) = self.ctx.tree.lock().await.as_mut()
        {
            t.finish(&self.ctx.spec, &c, true);
        }
        Ok(())
    }

    async fn give_up(&mut self) -> Result<()> {
        self.release().await
    }

    async fn paused(&mut self) -> Result<bool> {
        // A chunk an earlier run left staged lands first, pause or not: on 18.16 the target's
        // merges stay stopped until it has (they could fold its attached parts).
        if let Some(c) = &self.held
            && self.record_of(c).await.status == STAGED
        {
            return Ok(false);
        }
        self.ctx
            .store
            .flag(&self.ctx.job, PAUSE_ROW, "paused")
            .await
    }

    fn reset_connection(&mut self) {}
}
