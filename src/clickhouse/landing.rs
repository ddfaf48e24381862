//! A chunk lands whole or not at all, and once. ClickHouse inserts are not transactional, so a
//! chunk is inserted into a staging table of its own built `AS` the target; only a chunk
//! whose insert succeeded is recorded `staged` and landed:
//! - on servers with `MOVE PARTITION ... TO TABLE` (20.1+), each partition's parts move from the
//!   staging table into the target: the target's other parts (another writer's included) are
//!   left alone, and a landing that is replayed after a kill moves only what is still staged;
//! - on older servers (18.16), each partition's parts are attached to the target from the
//!   staging table (`ATTACH PARTITION ... FROM`, hard links): nothing of the target is replaced,
//!   so there is nothing a restart could bring back. The chunk's record keeps the target's
//!   highest block number from before (the mark), and merges of the target are stopped from
//!   the attach to the record: a replay skips a partition whose staged parts all have twins
//!   (same rows and sizes: hard links) among the target's parts above the mark. Another writer's
//!   inserts are never mistaken for the chunk's parts.
//!
//! Re-running a finished job, a reset, or a lost state table must not land a chunk twice: the
//! first time the job touches a partition, the target's content of it is kept in a base table
//! (`<target>__backfill_<job>_base`, hard links) and noted in a ledger (`..._ledger`, beside
//! the target, so it outlives the state table). A new start restores every touched partition
//! from the base before landing anything, unless another writer has written into it since
//! (parts with block numbers the job did not make): then it refuses, naming the partition.

use super::client::{Server, exec, fetch_text, ident, literal, number, rows};
use crate::error::{DbErrorKind, Error, Result};
use clickhouse::Client;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long to wait for parts a restore replaced to leave the disk (18.16 removes them once they
/// are older than the table's `old_parts_lifetime`, 480 s by default).
const CLEANUP_WAIT: Duration = Duration::from_secs(600);

/// What the ledger says of one partition the job has touched.
#[derive(Debug, Clone, Default)]
pub struct Touched {
    pub base_rows: u64,
    /// The highest block number in the target's partition after the job's last write to it.
    pub last_block: i64,
    /// Rows other writers put into the partition while the job ran (kept, but a restore would
    /// drop them).
    pub foreign_rows: u64,
}

/// One active part, as a replay compares them.
struct Part {
    rows: u64,
    /// Compressed and uncompressed bytes, as the server prints them.
    sizes: (String, String),
    /// A merge product (spans more than one block number).
    merged: bool,
}

/// What a replay finds of one staged partition in the target (18.16).
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// Attached already, as parts of `own_rows` rows in all.
    Landed {
        own_rows: u64,
    },
    NotLanded,
    /// Merges ran since the landing began: the attached parts may be folded into others.
    Unsure,
}

pub struct Landing {
    client: Client,
    pub server: Server,
    db: String,
    target_name: String,
    prefix: String,
}

impl Landing {
    pub fn new(client: Client, server: Server, database: &str, target: &str, job: &str) -> Landing {
        let (db, t) = match target.split_once('.') {
            Some((d, t)) => (
                d.trim_matches('`').to_string(),
                t.trim_matches('`').to_string(),
            ),
            None => (database.to_string(), target.trim_matches('`').to_string()),
        };
        let safe: String = job
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        Landing {
            client,
            server,
            prefix: format!("{t}__backfill_{safe}"),
            db,
            target_name: t,
        }
    }

    fn q(&self, name: &str) -> String {
        ident(&format!("{}.{name}", self.db))
    }

    pub fn target(&self) -> String {
        self.q(&self.target_name)
    }

    /// Chunk `chunk`'s staging table, for `{target}` in its statement: the chunk's own, not its
    /// worker's. A chunk staged by a run that was killed is landed by whichever worker claims it
    /// next, from the table its record names, while the other workers insert new chunks: with
    /// one table per worker, a new chunk's insert emptied and refilled the staged chunk's table,
    /// and its replay landed the wrong rows under the staged chunk's record.
    pub fn staging(&self, chunk: &str) -> String {
        use sha2::{Digest, Sha256};
        let h = Sha256::digest(chunk.as_bytes());
        self.q(&format!("{}_s_{}", self.prefix, hex::encode(&h[..8])))
    }

    /// The preflight's throwaway table, where the statement is tried with nothing to insert.
    pub fn check_table(&self) -> String {
        self.q(&format!("{}_check", self.prefix))
    }

    fn base(&self) -> String {
        self.q(&format!("{}_base", self.prefix))
    }

    fn ledger(&self) -> String {
        self.q(&format!("{}_ledger", self.prefix))
    }

    /// Whether landing moves parts (current servers) or replaces partitions (18.16).
    pub fn moves(&self) -> bool {
        self.server.move_partition
    }

    /// The target's engine, checked to be one staging can copy.
    pub async fn check_target(&self) -> Result<()> {
        let sql = format!(
            "SELECT engine FROM system.tables WHERE database = {} AND name = {}",
            literal(&self.db),
            literal(&self.target_name)
        );
        let engine = rows(&self.client, &sql, "reading the target table").await?;
        match engine.first().and_then(|r| r.first()).map(String::as_str) {
            None => Err(Error::Preflight(format!(
                "clickhouse.target: table {} does not exist",
                self.target()
            ))),
            Some(e) if e.starts_with("Replicated") => Err(Error::Preflight(format!(
                "clickhouse.target: {} is {e}; a staging table made AS it would share its \
                 ZooKeeper path, so replicated targets are not supported yet",
                self.target()
            ))),
            Some(e) if !e.ends_with("MergeTree") => Err(Error::Preflight(format!(
                "clickhouse.target: {} is {e}; chunks land by moving partitions, which needs a \
                 MergeTree-family engine",
                self.target()
            ))),
            Some(_) => Ok(()),
        }
    }

    /// A fresh, empty table with the target's structure, engine and partitioning. On servers
    /// that land by attaching (18.16), its merges are stopped before anything goes in: its
    /// parts stay as inserted until the chunk is landed, so a replay can tell the attached
    /// copies among the target's parts (see `found`). Only a server restart starts them again.
    pub async fn fresh(&self, table: &str) -> Result<()> {
        self.drop(table).await?;
        let sql = format!("CREATE TABLE {table} AS {}", self.target());
        exec(&self.client, &sql, "creating the staging table").await?;
        if !self.moves() {
            let sql = format!("SYSTEM STOP MERGES {table}");
            exec(&self.client, &sql, "stopping merges on the staging table").await?;
        }
        Ok(())
    }

    pub async fn drop(&self, table: &str) -> Result<()> {
        exec(
            &self.client,
            &format!("DROP TABLE IF EXISTS {table}"),
            "dropping the staging table",
        )
        .await
    }

    /// Drop every staging table of the job (a reset).
    pub async fn drop_staging_tables(&self) -> Result<()> {
        let sql = format!(
            "SELECT name FROM system.tables WHERE database = {} AND startsWith(name, {})",
            literal(&self.db),
            literal(&format!("{}_s", self.prefix))
        );
        for r in rows(&self.client, &sql, "finding the job's staging tables").await? {
            if let Some(n) = r.first() {
                self.drop(&self.q(n)).await?;
            }
        }
        Ok(())
    }

    pub async fn exists(&self, table: &str) -> Result<bool> {
        let bare = table.replace('`', "");
        let (db, name) = bare.split_once('.').unwrap_or(("", &bare));
        let sql = format!(
            "SELECT count() FROM system.tables WHERE database = {} AND name = {}",
            literal(db),
            literal(name)
        );
        Ok(number(&self.client, &sql, "looking for a table").await? > 0)
    }

    /// Active parts of `table` by partition id: (rows, highest block number).
    pub async fn parts(&self, table: &str) -> Result<HashMap<String, (u64, i64)>> {
        let bare = table.replace('`', "");
        let (db, name) = bare.split_once('.').unwrap_or(("", &bare));
        let sql = format!(
            "SELECT partition_id, sum(rows), max(max_block_number) FROM system.parts
              WHERE database = {} AND table = {} AND active GROUP BY partition_id",
            literal(db),
            literal(name)
        );
        Ok(rows(&self.client, &sql, "reading a table's parts")
            .await?
            .into_iter()
            .filter_map(|r| {
                Some((
                    r.first()?.clone(),
                    (r.get(1)?.parse().ok()?, r.get(2)?.parse().ok()?),
                ))
            })
            .collect())
    }

    /// The ledger of touched partitions (empty if the job never landed anything).
    pub async fn touched(&self) -> Result<HashMap<String, Touched>> {
        if !self.exists(&self.ledger()).await? {
            return Ok(HashMap::new());
        }
        let sql = format!(
            "SELECT partition, argMax(base_rows, version), argMax(last_block, version),
                    argMax(foreign_rows, version)
               FROM {} GROUP BY partition",
            self.ledger()
        );
        Ok(rows(&self.client, &sql, "reading the job's ledger")
            .await?
            .into_iter()
            .filter_map(|r| {
                Some((
                    r.first()?.clone(),
                    Touched {
                        base_rows: r.get(1)?.parse().ok()?,
                        last_block: r.get(2)?.parse().ok()?,
                        foreign_rows: r.get(3)?.parse().ok()?,
                    },
                ))
            })
            .collect())
    }

    async fn note(&self, partition: &str, t: &Touched) -> Result<()> {
        let version = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0).max(0);
        let sql = format!(
            "INSERT INTO {} (partition, base_rows, last_block, foreign_rows, version)
             VALUES ({}, {}, {}, {}, {version})",
            self.ledger(),
            literal(partition),
            t.base_rows,
            t.last_block,
            t.foreign_rows
        );
        exec(&self.client, &sql, "writing the job's ledger").await
    }

    /// Before the job first writes into `partitions`: keep the target's content of each in the
    /// base table, and note it in the ledger.
    pub async fn keep_base(&self, partitions: &[String]) -> Result<()> {
        for sql in [
            format!(
                "CREATE TABLE IF NOT EXISTS {} AS {}",
                self.base(),
                self.target()
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (partition String, base_rows UInt64,
                     last_block Int64, foreign_rows UInt64, version UInt64)
                 ENGINE = ReplacingMergeTree(version) ORDER BY partition",
                self.ledger()
            ),
        ] {
            exec(&self.client, &sql, "creating the job's base table").await?;
        }
        let known = self.touched().await?;
        let target = self.parts(&self.target()).await?;
        let base = self.parts(&self.base()).await?;
        for p in partitions.iter().filter(|p| !known.contains_key(*p)) {
            let (rows, block) = target.get(p).copied().unwrap_or((0, 0));
            // Kept already by a run killed before it noted it: never copy it twice.
            if rows > 0 && !base.contains_key(p) {
                let sql = format!(
                    "ALTER TABLE {} REPLACE PARTITION ID {} FROM {}",
                    self.base(),
                    literal(p),
                    self.target()
                );
                exec(&self.client, &sql, "keeping the target's partition").await?;
            }
            self.note(
                p,
                &Touched {
                    base_rows: rows,
                    last_block: block,
                    foreign_rows: 0,
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Rows other writers put into `p` since the job last wrote to it (by block numbers).
    async fn foreign(&self, p: &str, since: i64) -> Result<u64> {
        let sql = format!(
            "SELECT sum(rows) FROM system.parts
              WHERE database = {} AND table = {} AND active AND partition_id = {}
                AND max_block_number > {since}",
            literal(&self.db),
            literal(&self.target_name),
            literal(p)
        );
        number(&self.client, &sql, "looking for other writers").await
    }

    /// The highest block number any part of the target has had (active or not): parts added
    /// later have higher ones. Recorded with a staged chunk, it tells a replay whether the
    /// chunk's parts were attached already.
    pub async fn mark(&self) -> Result<i64> {
        let sql = format!(
            "SELECT max(max_block_number) FROM system.parts WHERE database = {} AND table = {}",
            literal(&self.db),
            literal(&self.target_name)
        );
        let text = fetch_text(&self.client, &sql, "reading the target's parts").await?;
        Ok(text.trim().parse().unwrap_or(0))
    }

    /// Active parts of partition `p` of `table` (`extra`: a further condition).
    async fn parts_of(&self, table: &str, p: &str, extra: &str) -> Result<Vec<Part>> {
        let bare = table.replace('`', "");
        let (db, name) = bare.split_once('.').unwrap_or(("", &bare));
        let sql = format!(
            "SELECT rows, data_compressed_bytes, data_uncompressed_bytes, min_block_number,
                    max_block_number
               FROM system.parts
              WHERE database = {} AND table = {} AND active AND partition_id = {} {extra}",
            literal(db),
            literal(name),
            literal(p)
        );
        Ok(rows(&self.client, &sql, "reading parts")
            .await?
            .into_iter()
            .filter_map(|r| {
                Some(Part {
                    rows: r.first()?.parse().ok()?,
                    sizes: (r.get(1)?.clone(), r.get(2)?.clone()),
                    merged: r.get(3)? != r.get(4)?,
                })
            })
            .collect())
    }

    /// What the target holds of the staging table's partition `p`, for a replay on 18.16
    /// (attach copies, and gives each attached part a block number of its own above `mark`).
    /// The staged parts are in when every one has a twin (same rows and sizes: an attach makes
    /// hard links) among the target's parts above the mark. While neither table has merged
    /// since (the caller stops merges on both before the attach; only a server restart starts
    /// them again), that is conclusive both ways, and the parts above the mark that are not
    /// twins are another writer's: kept, and counted as theirs by the caller.
    async fn found(&self, staging: &str, p: &str, mark: i64) -> Result<Found> {
        let ours = self.parts_of(staging, p, "").await?;
        let theirs = self
            .parts_of(&self.target(), p, &format!("AND max_block_number > {mark}"))
            .await?;
        let unmerged = !ours.iter().chain(&theirs).any(|x| x.merged);
        let mut left = theirs;
        let (mut twins, mut own_rows) = (0, 0);
        for part in &ours {
            if let Some(i) = left
                .iter()
                .position(|t| t.rows == part.rows && t.sizes == part.sizes)
            {
                left.swap_remove(i);
                twins += 1;
                own_rows += part.rows;
            }
        }
        Ok(if !ours.is_empty() && twins == ours.len() {
            Found::Landed { own_rows }
        } else if unmerged || left.len() + twins == 0 {
            Found::NotLanded
        } else {
            Found::Unsure
        })
    }

    /// Land what `staging` holds for `partitions` in the target. Safe to run again after a kill
    /// at any point: on current servers a replay moves only what is still staged; on 18.16
    /// (attach, which copies) a partition whose parts already went in since `mark` is skipped.
    pub async fn land(
        &self,
        staging: &str,
        partitions: &[String],
        mark: i64,
        replay: bool,
    ) -> Result<()> {
        let mut ledger = self.touched().await?;
        let staged = self.parts(staging).await?;
        if replay && !self.moves() {
            self.replay_or_start_over(staging, partitions, mark, &staged, &ledger)
                .await?;
        }
        for p in partitions {
            let mut t = ledger.remove(p).unwrap_or_default();
            let found = if self.moves() {
                Found::NotLanded
            } else {
                self.found(staging, p, mark).await?
            };
            // Rows written since the job last wrote to `p` are another writer's, but for the
            // chunk's own attached parts.
            let (already, own) = match found {
                Found::Landed { own_rows } => (true, own_rows),
                _ => (false, 0),
            };
            let others = self.foreign(p, t.last_block).await?.saturating_sub(own);
            if others > 0 {
                self.warn_foreign(p, others);
                t.foreign_rows += others;
            }
            if staged.contains_key(p) && !already {
                let sql = if self.moves() {
                    format!(
                        "ALTER TABLE {staging} MOVE PARTITION ID {} TO TABLE {}",
                        literal(p),
                        self.target()
                    )
                } else {
                    format!(
                        "ALTER TABLE {} ATTACH PARTITION ID {} FROM {staging}",
                        self.target(),
                        literal(p)
                    )
                };
                exec(&self.client, &sql, "moving the chunk into the target").await?;
            }
            t.last_block = self
                .parts(&self.target())
                .await?
                .get(p)
                .map_or(t.last_block, |x| x.1);
            self.note(p, &t).await?;
        }
        Ok(())
    }

    /// Before replaying an attach (18.16): when a partition of the chunk has parts above the
    /// mark that `found` cannot account for, merges ran since the landing began (a server
    /// restart starts them again) and the chunk's attached parts may be folded into others.
    /// Attaching again could double the chunk, skipping could lose it. If nothing but this
    /// chunk's attaches can have taken block numbers since the mark (the table's numbers above
    /// it are exactly as many as the staged parts of the partitions that have parts above it),
    /// every such partition is noted as the job's own, so the next start's restore takes them
    /// back, and the job starts over. Otherwise another writer has written since: starting over
    /// would drop its rows, so the job stops and says so.
    async fn replay_or_start_over(
        &self,
        staging: &str,
        partitions: &[String],
        mark: i64,
        staged: &HashMap<String, (u64, i64)>,
        ledger: &HashMap<String, Touched>,
    ) -> Result<()> {
        let target = self.parts(&self.target()).await?;
        let above = |p: &str| target.get(p).map(|x| x.1).filter(|top| *top > mark);
        let mut unsure = None;
        for p in partitions.iter().filter(|p| staged.contains_key(*p)) {
            if above(p).is_some() && self.found(staging, p, mark).await? == Found::Unsure {
                unsure = Some(p.clone());
                break;
            }
        }
        let Some(unsure) = unsure else {
            return Ok(());
        };
        let mut ours = 0;
        for p in partitions.iter().filter(|p| above(p).is_some()) {
            let staged = self.parts_of(staging, p, "").await?;
            if staged.iter().any(|x| x.merged) {
                // Merged since it was staged: how many parts went in is unknown.
                ours = i64::MIN;
                break;
            }
            ours += staged.len() as i64;
        }
        let taken = self.mark().await? - mark;
        if ours >= 0 && taken != ours {
            return Err(Error::fatal(format!(
                "partition {unsure} of {} was merged since this chunk's landing began (a server \
                 restart starts merges again), and {taken} block number(s) were taken above the \
                 chunk's mark {mark} where its own landing accounts for {ours}: another writer \
                 has written into the target since. Whether the chunk is in the partition \
                 cannot be told: landing it again could double it, and starting the job over \
                 would drop the other writer's rows. Copy the rows other writers put into the \
                 target since elsewhere if they are needed, then `backfill reset --yes \
                 --discard-foreign-rows` the job: its next run restores what it landed, \
                 dropping those rows too, and lands every chunk again",
                self.target()
            )));
        }
        for p in partitions {
            if let Some(top) = above(p) {
                let mut t = ledger.get(p).cloned().unwrap_or_default();
                t.last_block = t.last_block.max(top);
                self.note(p, &t).await?;
            }
        }
        Err(Error::Stopped(crate::error::StopReason::StartOver(
            format!(
                "partition {unsure} of {} was merged since this chunk's landing began, and its \
                 staged parts are no longer recognisable there (no other writer has written \
                 since)",
                self.target()
            ),
        )))
    }

    fn warn_foreign(&self, p: &str, rows: u64) {
        tracing::warn!(
            "{rows} row(s) were written into partition {p} of {} by another writer while the \
             job ran; they are kept, but starting the job over would refuse to restore this \
             partition",
            self.target()
        );
    }

    /// Wait until no part that a replace or drop removed from partition `p` of the target is
    /// left on disk (18.16 would load it again at a restart: rows doubled). Parts that merges
    /// made obsolete are covered by the merged part and are never loaded again.
    async fn wait_replaced_gone(&self, p: &str) -> Result<()> {
        if self.moves() {
            return Ok(());
        }
        let sql = format!(
            "SELECT count() FROM system.parts o
              WHERE o.database = {db} AND o.table = {t} AND o.partition_id = {p} AND NOT o.active
                AND (SELECT count() FROM system.parts a
                      WHERE a.database = {db} AND a.table = {t} AND a.partition_id = {p}
                        AND a.active AND a.min_block_number <= o.min_block_number
                        AND a.max_block_number >= o.max_block_number) = 0",
            db = literal(&self.db),
            t = literal(&self.target_name),
            p = literal(p)
        );
        let started = Instant::now();
        let mut told = false;
        loop {
            // Correlated subqueries are not supported everywhere: fall back to listing.
            let left = match number(&self.client, &sql, "waiting for replaced parts").await {
                Ok(n) => n,
                Err(_) => self.uncovered_outdated(p).await?,
            };
            if left == 0 {
                return Ok(());
            }
            if !told {
                told = true;
                tracing::info!(
                    "waiting until the {left} part(s) replaced in partition {p} of {} are off \
                     disk (a restart before that would load them again): up to the table's \
                     old_parts_lifetime, 8 minutes by default",
                    self.target()
                );
            }
            if started.elapsed() > CLEANUP_WAIT {
                return Err(Error::Db {
                    message: format!(
                        "{left} replaced part(s) of partition {p} of {} are still on disk after \
                         {}s; the chunk is landed but not yet recorded done",
                        self.target(),
                        CLEANUP_WAIT.as_secs()
                    ),
                    kind: DbErrorKind::Transient,
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Outdated parts of `p` no active part covers (computed here, not by the server).
    async fn uncovered_outdated(&self, p: &str) -> Result<u64> {
        let sql = format!(
            "SELECT active, min_block_number, max_block_number FROM system.parts
              WHERE database = {} AND table = {} AND partition_id = {}",
            literal(&self.db),
            literal(&self.target_name),
            literal(p)
        );
        let parts: Vec<(bool, i64, i64)> = rows(&self.client, &sql, "reading parts")
            .await?
            .into_iter()
            .filter_map(|r| {
                Some((
                    r.first()? == "1",
                    r.get(1)?.parse().ok()?,
                    r.get(2)?.parse().ok()?,
                ))
            })
            .collect();
        Ok(parts
            .iter()
            .filter(|(active, lo, hi)| {
                !active && !parts.iter().any(|(a, l, h)| *a && l <= lo && h >= hi)
            })
            .count() as u64)
    }

    /// Put every partition the job has touched back to what it held before the job (a new
    /// start after a --rerun, a reset, or a lost state table). Refuses if another writer wrote
    /// into one since: restoring would drop its rows.
    pub async fn restore(&self) -> Result<usize> {
        let ledger = self.touched().await?;
        if ledger.is_empty() {
            return Ok(0);
        }
        for (p, t) in &ledger {
            let others = t.foreign_rows + self.foreign(p, t.last_block).await?;
            if others > 0 {
                return Err(Error::Preflight(format!(
                    "partition {p} of {} holds {others} row(s) another writer put there while \
                     this job had landed chunks in it; starting the job over would restore the \
                     partition to what it held before the job and drop them. Copy them \
                     elsewhere if they are needed, then `backfill reset --yes \
                     --discard-foreign-rows` the job and run again (dropping the base and \
                     ledger tables instead would land every chunk again on top of the first \
                     landing)",
                    self.target(),
                )));
            }
        }
        let base = self.parts(&self.base()).await?;
        if !self.moves() {
            self.pause_merges().await?;
        }
        for p in ledger.keys() {
            let sql = if base.contains_key(p) {
                format!(
                    "ALTER TABLE {} REPLACE PARTITION ID {} FROM {}",
                    self.target(),
                    literal(p),
                    self.base()
                )
            } else {
                format!(
                    "ALTER TABLE {} DROP PARTITION ID {}",
                    self.target(),
                    literal(p)
                )
            };
            exec(
                &self.client,
                &sql,
                "restoring a partition the job had landed in",
            )
            .await?;
        }
        if !self.moves() {
            self.resume_merges().await?;
        }
        for p in ledger.keys() {
            self.wait_replaced_gone(p).await?;
            let mut t = ledger[p].clone();
            t.last_block = self
                .parts(&self.target())
                .await?
                .get(p)
                .map_or(t.last_block, |x| x.1);
            self.note(p, &t).await?;
        }
        Ok(ledger.len())
    }

    /// Take every row other writers put into the partitions the job touched as the job's own,
    /// so that the next restore drops them with the job's rows (`reset --discard-foreign-rows`,
    /// the operator's decision). Returns how many rows that is.
    pub async fn adopt_foreign(&self) -> Result<u64> {
        let target = self.parts(&self.target()).await?;
        let mut adopted = 0;
        for (p, t) in self.touched().await? {
            let others = t.foreign_rows + self.foreign(&p, t.last_block).await?;
            if others == 0 {
                continue;
            }
            let top = target.get(&p).map_or(t.last_block, |x| x.1);
            let t = Touched {
                last_block: t.last_block.max(top),
                foreign_rows: 0,
                ..t
            };
            self.note(&p, &t).await?;
            adopted += others;
        }
        Ok(adopted)
    }

    /// Stop new merges on the target (running ones cannot involve parts attached after this).
    pub async fn stop_merges(&self) -> Result<()> {
        let sql = format!("SYSTEM STOP MERGES {}", self.target());
        exec(&self.client, &sql, "stopping merges on the target").await
    }

    /// Stop merges on the target and wait until none is running (bounded: 10 minutes).
    pub async fn pause_merges(&self) -> Result<()> {
        let sql = format!("SYSTEM STOP MERGES {}", self.target());
        exec(&self.client, &sql, "stopping merges on the target").await?;
        let running = format!(
            "SELECT count() FROM system.merges WHERE database = {} AND table = {}",
            literal(&self.db),
            literal(&self.target_name)
        );
        for _ in 0..6000 {
            if fetch_text(&self.client, &running, "waiting for the target's merges")
                .await?
                .trim()
                == "0"
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.resume_merges().await?;
        Err(Error::Db {
            message: "a merge on the target is still running after 10 minutes".into(),
            kind: DbErrorKind::Transient,
        })
    }

    pub async fn resume_merges(&self) -> Result<()> {
        let sql = format!("SYSTEM START MERGES {}", self.target());
        exec(&self.client, &sql, "restarting merges on the target").await
    }
}
