//! A chunk lands whole or not at all, and once. ClickHouse inserts are not transactional, so a
//! chunk is inserted into a staging table of its own built `AS` the target; only a chunk
//! whose insert succeeded is recorded `staged` and landed:
//! - on servers with `MOVE PARTITION ... TO TABLE` (20.1+), each partition's parts move from the
//!   staging table into the target: the target's other parts (another writer's included) are
//!   left alone, and a landing that is replayed after a kill moves only what is still staged;
//! - on older servers (18.16), each partition's parts are attached to the target from the
//!   staging table (`ATTACH PARTITION ... FROM`, hard links): nothing of the target is replaced,
//!   so there is nothing a restart could bring back. The chunk's record keeps the target's
//!   highest block number from before (the mark), and merges of the target and of the staging
//!   table (whose part names are noted first) are stopped from before the attach to the
//!   record: a replay skips a partition whose staged parts all have twins
//!   (same rows, sizes and rows' digest: hard links) among the target's parts above the mark.
//!   Another writer's inserts are not mistaken for the chunk's parts, unless one is a copy of
//!   a staged part row for row (which no SQL on 18.16 can tell from the attached part).
//!
//! Re-running a finished job, a reset, or a lost state table must not land a chunk twice: the
//! first time the job touches a partition, the target's content of it is kept in a base table
//! (`<target>__backfill_<job>_base`, hard links) and noted in a ledger (`..._ledger`, beside
//! the target, so it outlives the state table). A new start restores every touched partition
//! from the base before landing anything, unless another writer has written into it since
//! (parts with block numbers the job did not make): then it refuses, naming the partition.

use super::client::{
    Server, exec, exec_repeatable, fetch_text, ident, literal, number, rows, table_rows,
};
use crate::error::{DbErrorKind, Error, Result};
use clickhouse::Client;
use replay::{Found, Replay};
use std::collections::HashMap;
use std::time::Duration;

mod arrivals;
mod home;
pub use home::new_token;
mod ledger;
pub use ledger::Touched;
mod names;
pub use names::{sanitized, starts_then};
mod replay;
mod restore;
mod staged;

/// How long to wait for parts a restore replaced to leave the disk (18.16 removes them once they
/// are older than the table's `old_parts_lifetime`, 480 s by default).
const CLEANUP_WAIT: Duration = Duration::from_secs(600);

/// How long a landing on 18.16 waits for the target's running merges to end before stopping
/// merges cancels them (`stop_merges`).
const MERGE_WAIT: Duration = Duration::from_secs(600);

/// This host's tag in check table names (a hash of its name and pid namespace).
fn host_tag() -> String {
    use sha2::{Digest, Sha256};
    // The pid namespace too: containers of one host can share its name, each with a pid 1.
    let here = format!("{}:{}", crate::state::hostname(), crate::state::here());
    hex::encode(&Sha256::digest(here.as_bytes())[..4])
}

/// Partition id -> (rows, highest block number) of a table's active parts, summed.
pub type Parts = HashMap<String, (u64, i64)>;

/// The target's active parts, one by one: partition id -> [(rows, highest block number)].
type TargetParts = HashMap<String, Vec<(u64, i64)>>;

pub struct Landing {
    client: Client,
    pub server: Server,
    db: String,
    target_name: String,
    prefix: String,
    /// The prefix job names with other characters than letters, digits and `_` had before
    /// names were made unique (see `legacy_tables`).
    legacy: Option<String>,
    /// The base table and the ledger exist (created by this process; never dropped by it).
    kept: std::sync::atomic::AtomicBool,
    /// Whether the ledger has the columns of a move under way (see `ledger`).
    moving_columns: ledger::Columns,
    /// This process's part of its staging tables' names (8 hex digits).
    runner: String,
}

impl Landing {
    /// `runner`: this runner's token (`lock::token`), in its staging tables' names.
    pub fn new(
        client: Client,
        server: Server,
        database: &str,
        target: &str,
        job: &str,
        runner: &str,
    ) -> Landing {
        let (db, t) = match target.split_once('.') {
            Some((d, t)) => (
                d.trim_matches('`').to_string(),
                t.trim_matches('`').to_string(),
            ),
            None => (database.to_string(), target.trim_matches('`').to_string()),
        };
        Landing {
            client,
            server,
            prefix: names::prefix(&t, job),
            legacy: names::legacy_prefix(&t, job),
            db,
            target_name: t,
            kept: Default::default(),
            moving_columns: Default::default(),
            runner: runner.to_string(),
        }
    }

    /// The prefix of tables an earlier version named this job's, when they exist and no table
    /// under this version's name does. Earlier versions gave names that differ only in other
    /// characters than letters, digits and `_` the same tables, so whose they are is not known:
    /// adopting them could take another job's (a later reset or rerun would restore its
    /// partitions), and ignoring them could leave this job's base behind (a reset would then
    /// land every chunk again on top). The caller refuses and says how to settle it.
    pub async fn legacy_tables(&self) -> Result<Option<String>> {
        let Some(legacy) = self.legacy.clone() else {
            return Ok(None);
        };
        if self.exists(&self.ledger()).await? || self.exists(&self.base()).await? {
            return Ok(None);
        }
        let old = |t: &str| self.q(&format!("{legacy}_{t}"));
        if self.exists(&old("ledger")).await? || self.exists(&old("base")).await? {
            return Ok(Some(legacy));
        }
        Ok(None)
    }

    /// How to settle `legacy_tables`: what to rename, or whose they may be.
    pub fn legacy_refusal(&self, legacy: &str, job: &str) -> Error {
        let t = |p: &str, s: &str| self.q(&format!("{p}_{s}"));
        Error::Preflight(format!(
            "clickhouse.target: {} and {} were left by an earlier backfill version, which gave \
             jobs whose names differ only in other characters than letters, digits and _ the \
             same tables; this version keeps job {job:?}'s as {}_*. If they are this job's, \
             rename them (RENAME TABLE {} TO {}, {} TO {}, and any {legacy}_s_* staging table \
             likewise) and run again; if they are another job's, leave them to it",
            t(legacy, "base"),
            t(legacy, "ledger"),
            self.prefix,
            t(legacy, "base"),
            t(&self.prefix, "base"),
            t(legacy, "ledger"),
            t(&self.prefix, "ledger"),
        ))
    }

    fn q(&self, name: &str) -> String {
        ident(&format!("{}.{name}", self.db))
    }

    pub fn target(&self) -> String {
        self.q(&self.target_name)
    }

    /// Chunk `chunk`'s staging table, for `{target}` in its statement: the chunk's own, not its
    /// worker's, and this runner's. A chunk staged by a run that was killed is landed by
    /// whichever worker claims it next, from the table its record names, while the other
    /// workers insert new chunks: with one table per worker, a new chunk's insert emptied and
    /// refilled the staged chunk's table, and its replay landed the wrong rows under the staged
    /// chunk's record. With one table per chunk shared by runners, a runner that had lost the
    /// target (frozen past its heartbeat, then woken) dropped and re-created the table the
    /// runner that took over was inserting the same chunk into: that one then found no parts,
    /// and recorded the chunk done with 0 rows.
    pub fn staging(&self, chunk: &str) -> String {
        use sha2::{Digest, Sha256};
        let h = Sha256::digest(chunk.as_bytes());
        self.q(&format!(
            "{}_s_{}_{}",
            self.prefix,
            hex::encode(&h[..8]),
            self.runner
        ))
    }

    /// The preflight's throwaway table, where the statement is tried with nothing to insert:
    /// this process's own, `<prefix>_check_<host hash>_<pid>` (two runners starting at the same
    /// moment both run their preflight before one of them takes the target's lock; with one
    /// shared name the second failed on the first's table with exit 1 instead of being refused
    /// with 75).
    pub fn check_table(&self) -> String {
        self.q(&format!(
            "{}_check_{}_{}",
            self.prefix,
            host_tag(),
            std::process::id()
        ))
    }

    /// Drop the check tables runners killed in their preflight left: those of this host whose
    /// process is gone, and any an hour old (another host's; a preflight takes a second).
    pub async fn drop_stale_checks(&self) -> Result<()> {
        let start = format!("{}_check_", self.prefix);
        let sql = format!(
            "SELECT name, (now() - metadata_modification_time) > 3600 FROM system.tables
              WHERE database = {} AND {}",
            literal(&self.db),
            names::check_tables(&self.prefix)
        );
        let own = format!("{}_{}", host_tag(), std::process::id());
        for r in table_rows(&self.client, &sql, "finding check tables").await? {
            let (Some(name), Some(old)) = (r.first(), r.get(1)) else {
                continue;
            };
            let Some((host, pid)) = name[start.len()..].split_once('_') else {
                continue;
            };
            let gone = host == host_tag()
                && name[start.len()..] != own
                && !std::path::Path::new(&format!("/proc/{pid}")).exists();
            if gone || old == "1" {
                self.drop(&self.q(name)).await?;
            }
        }
        Ok(())
    }

    pub(super) fn base(&self) -> String {
        self.q(&format!("{}_base", self.prefix))
    }

    /// Whether landing moves parts (current servers) or replaces partitions (18.16).
    pub fn moves(&self) -> bool {
        self.server.move_partition
    }

    /// The target's engine, checked to be one staging can copy, and the materialized views
    /// that read from it (`land_without_views`: warned of, not refused).
    pub async fn check_target(&self, land_without_views: bool) -> Result<()> {
        self.check_engine().await?;
        let views = self.views().await?;
        if views.is_empty() {
            return Ok(());
        }
        let listed = views.join(", ");
        if land_without_views {
            tracing::warn!(
                "materialized view(s) {listed} read from the target {}; chunks land by \
                 attaching partitions, which fires none of them, so they do not see the \
                 backfilled rows (clickhouse.land_without_views)",
                self.target()
            );
            return Ok(());
        }
        Err(Error::Preflight(format!(
            "clickhouse.target: materialized view(s) {listed} read from {}; chunks land by \
             attaching partitions, which fires none of them, so they would never see the \
             backfilled rows. Backfill what they feed with a job of its own, then set \
             `land_without_views: true` under `clickhouse` to land without them",
            self.target()
        )))
    }

    /// The materialized views that read from the target (`database.name`), as the server
    /// lists them.
    async fn views(&self) -> Result<Vec<String>> {
        let sql = format!(
            "SELECT concat(d, '.', t) FROM system.tables
              ARRAY JOIN dependencies_database AS d, dependencies_table AS t
             WHERE database = {} AND name = {} ORDER BY d, t",
            literal(&self.db),
            literal(&self.target_name)
        );
        Ok(
            table_rows(&self.client, &sql, "reading the views on the target")
                .await?
                .into_iter()
                .filter_map(|r| r.into_iter().next())
                .collect(),
        )
    }

    /// The target's engine, checked to be one staging can copy.
    async fn check_engine(&self) -> Result<()> {
        let sql = format!(
            "SELECT engine FROM system.tables WHERE database = {} AND name = {}",
            literal(&self.db),
            literal(&self.target_name)
        );
        let engine = table_rows(&self.client, &sql, "reading the target table").await?;
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
            Some(_) if self.moves() => Ok(()),
            Some(_) => self.check_part_column().await,
        }
    }

    /// On servers that land by attaching (18.16), a replay compares parts by their rows through
    /// the virtual column `_part`, which a real column of that name hides: refused up front,
    /// rather than a replay after a kill that cannot tell whether its chunk went in.
    async fn check_part_column(&self) -> Result<()> {
        let sql = format!(
            "SELECT count() FROM system.columns WHERE database = {} AND table = {}
                AND name = '_part'",
            literal(&self.db),
            literal(&self.target_name)
        );
        if number(&self.client, &sql, "reading the target's columns").await? == 0 {
            return Ok(());
        }
        Err(Error::Preflight(format!(
            "clickhouse.target: {} has a column named `_part`, which hides the virtual column \
             `_part` that a landing replayed after a kill needs on ClickHouse before 20.1 \
             (server {}) to tell whether a chunk's parts went in; rename the column",
            self.target(),
            self.server.version
        )))
    }

    /// A fresh, empty table with the target's structure, engine and partitioning. (Its merges
    /// run: stopped, a chunk written in many blocks fails with TOO_MANY_PARTS at every try.)
    pub async fn fresh(&self, table: &str) -> Result<()> {
        self.drop(table).await?;
        // Just dropped: IF NOT EXISTS only makes the statement safe to send again.
        let sql = format!("CREATE TABLE IF NOT EXISTS {table} AS {}", self.target());
        exec_repeatable(&self.client, &sql, "creating the staging table").await
    }

    pub async fn drop(&self, table: &str) -> Result<()> {
        exec_repeatable(
            &self.client,
            &format!("DROP TABLE IF EXISTS {table}"),
            "dropping the staging table",
        )
        .await
    }

    /// Drop every staging table of the job, and the notes of their parts; `checks`: also the
    /// check tables of preflights (a reset, which refuses while a runner of the job is alive:
    /// never at the end of a run, when another runner may be in its preflight, about to be
    /// refused, and using its own).
    pub async fn drop_staging_tables(&self, checks: bool) -> Result<()> {
        let check = if checks {
            format!(" OR {}", names::check_tables(&self.prefix))
        } else {
            String::new()
        };
        let sql = format!(
            "SELECT name FROM system.tables WHERE database = {db} AND ({s}{check})",
            db = literal(&self.db),
            s = names::staging_tables(&self.prefix),
        );
        for r in table_rows(&self.client, &sql, "finding the job's staging tables").await? {
            if let Some(n) = r.first() {
                self.drop(&self.q(n)).await?;
            }
        }
        // What the staging tables held when their landings began: of no use without them.
        self.drop(&self.landings()).await
    }

    pub async fn exists(&self, table: &str) -> Result<bool> {
        let bare = table.replace('`', "");
        let (db, name) = bare.split_once('.').unwrap_or(("", &bare));
        let sql = format!(
            "SELECT name FROM system.tables WHERE database = {} AND name = {}",
            literal(db),
            literal(name)
        );
        Ok(!table_rows(&self.client, &sql, "looking for a table")
            .await?
            .is_empty())
    }

    /// Drop the staging tables that runners which lost the target left (killed, or taken over
    /// from): with tables of its own per runner, the next runner no longer re-creates them,
    /// and each could hold a chunk's rows until the job's end. Called with the target's lock
    /// held. Kept: this runner's, those `named` by a record (a staged chunk lands from its
    /// table), and those a landing under way noted in the ledger (what it carried is told by
    /// its table).
    pub async fn drop_strays(&self, named: &std::collections::HashSet<String>) -> Result<usize> {
        let sql = format!(
            "SELECT name FROM system.tables WHERE database = {} AND {}",
            literal(&self.db),
            names::staging_tables(&self.prefix),
        );
        let found = table_rows(&self.client, &sql, "finding the job's staging tables").await?;
        if found.is_empty() {
            return Ok(0);
        }
        let noted: std::collections::HashSet<String> = self
            .touched()
            .await?
            .into_values()
            .map(|t| t.moving_from)
            .collect();
        let mine = format!("_{}", self.runner);
        let mut dropped = 0;
        for n in found.iter().filter_map(|r| r.first()) {
            let table = self.q(n);
            if n.ends_with(&mine) || named.contains(&table) || noted.contains(&table) {
                continue;
            }
            self.drop(&table).await?;
            dropped += 1;
        }
        Ok(dropped)
    }

    /// `parts` of a chunk's staging table after its insert: the table must still be there (a
    /// table gone has no parts, which read as a chunk of no rows).
    pub async fn staged_parts(&self, staging: &str) -> Result<Parts> {
        let parts = self.parts(staging).await?;
        if parts.is_empty() && !self.exists(staging).await? {
            return Err(Error::Db {
                message: format!(
                    "the staging table {staging} is gone after its insert (dropped by another \
                     runner or a reset): the chunk runs again"
                ),
                kind: DbErrorKind::Transient,
            });
        }
        Ok(parts)
    }

    /// Active parts of `table` by partition id: (rows, highest block number).
    pub async fn parts(&self, table: &str) -> Result<Parts> {
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

    /// Before the job first writes into `partitions`: keep the target's content of each in the
    /// base table, and note it in the ledger. Returns the ledger.
    pub async fn keep_base(&self, partitions: &[String]) -> Result<HashMap<String, Touched>> {
        let kept = std::sync::atomic::Ordering::Relaxed;
        for sql in [
            format!(
                "CREATE TABLE IF NOT EXISTS {} AS {}",
                self.base(),
                self.target()
            ),
            self.create_ledger(),
        ]
        .iter()
        .filter(|_| !self.kept.load(kept))
        {
            exec_repeatable(&self.client, sql, "creating the job's base table").await?;
        }
        self.kept.store(true, kept);
        let mut known = self.touched().await?;
        let new: Vec<&String> = partitions
            .iter()
            .filter(|p| !known.contains_key(*p))
            .collect();
        // Copies into the base a killed run had noted but perhaps not made.
        let unfinished: Vec<String> = known
            .iter()
            .filter(|(_, t)| t.moving_from == ledger::KEEPING)
            .map(|(p, _)| p.clone())
            .collect();
        if new.is_empty() && unfinished.is_empty() {
            return Ok(known);
        }
        let target = self.parts(&self.target()).await?;
        let base = self.parts(&self.base()).await?;
        for p in new {
            let (rows, block) = target.get(p).copied().unwrap_or((0, 0));
            let mut t = Touched {
                base_rows: rows,
                last_block: block,
                ..Touched::default()
            };
            if rows > 0 {
                // Noted before the copy, with the partition's top: rows another writer puts
                // there from now on stay above it and count as theirs, whether or not this
                // run is killed before the copy is noted as made.
                t.moving_from = ledger::KEEPING.to_string();
                self.note(p, &t).await?;
                self.keep(p, &base).await?;
                t.moving_from.clear();
            }
            self.note(p, &t).await?;
            known.insert(p.clone(), t);
        }
        for p in unfinished {
            let Some(t) = known.get_mut(&p) else { continue };
            self.keep(&p, &base).await?;
            t.moving_from.clear();
            self.note(&p, t).await?;
        }
        Ok(known)
    }

    /// Copy the target's partition `p` into the base table, unless it is there already (kept
    /// by a run killed before it noted the copy as made: never copied twice).
    async fn keep(&self, p: &str, base: &Parts) -> Result<()> {
        if base.contains_key(p) {
            return Ok(());
        }
        let sql = format!(
            "ALTER TABLE {} REPLACE PARTITION ID {} FROM {}",
            self.base(),
            literal(p),
            self.target()
        );
        exec(&self.client, &sql, "keeping the target's partition").await
    }

    /// The target's active parts, one by one.
    async fn target_parts(&self) -> Result<TargetParts> {
        let sql = format!(
            "SELECT partition_id, rows, max_block_number FROM system.parts
              WHERE database = {} AND table = {} AND active",
            literal(&self.db),
            literal(&self.target_name)
        );
        let mut parts = TargetParts::new();
        for r in rows(&self.client, &sql, "reading the target's parts").await? {
            if let (Some(p), Some(Ok(n)), Some(Ok(b))) = (
                r.first(),
                r.get(1).map(|x| x.parse()),
                r.get(2).map(|x| x.parse()),
            ) {
                parts.entry(p.clone()).or_default().push((n, b));
            }
        }
        Ok(parts)
    }

    /// Rows other writers put into `p` since the job last noted it (by block numbers, less
    /// the job's own of a move that went through unnoted).
    async fn since_noted(&self, p: &str, t: &Touched) -> Result<u64> {
        let since = self.arrived_since(p, t.last_block).await?;
        Ok(since.besides(self.unnoted_own(p, t).await?))
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

    /// Land what `staging` holds for `partitions` in the target. Safe to run again after a kill
    /// at any point: on current servers a replay moves only what is still staged; on 18.16
    /// (attach, which copies) a partition whose parts already went in since `mark` is skipped.
    /// `fresh`: the staging table's parts and the ledger as the caller just read them (a first
    /// landing); a replay (`None`) reads them.
    pub async fn land(
        &self,
        chunk: &str,
        staging: &str,
        partitions: &[String],
        mark: i64,
        fresh: Option<(Parts, HashMap<String, Touched>)>,
        fence: Option<&super::state::TargetLock>,
    ) -> Result<()> {
        // A replay of an attach (18.16) must tell which partitions went in already: what it
        // found of each staged partition (read once, before anything is landed).
        let mut replay: Option<HashMap<String, Found>> = None;
        let (staged, mut ledger) = match fresh {
            Some(known) => known,
            None => {
                if !self.moves() {
                    // Its first landing stopped them; a server restart since started them.
                    self.pause_merges_of(staging).await?;
                }
                let known = (self.parts(staging).await?, self.touched().await?);
                if !self.moves() {
                    let r = Replay {
                        staging,
                        partitions,
                        mark,
                    };
                    replay = Some(self.check_replay(&r, &known.0, &known.1).await?);
                }
                known
            }
        };
        // What `note_staged` noted of this staging table (18.16), read once for the landing.
        let notes = if self.moves() {
            HashMap::new()
        } else {
            self.staged_notes(staging).await?
        };
        for p in partitions {
            let mut t = ledger.remove(p).unwrap_or_default();
            // Another chunk's attach into `p` still under way (its answer lost): settled and
            // noted for its replay before this landing's notes replace its own.
            if !self.moves() {
                self.settle_other(p, &t, staging).await?;
            }
            // A partition without staged parts has nothing of the chunk to land.
            let found = replay
                .as_mut()
                .and_then(|r| r.remove(p))
                .unwrap_or(Found::NotLanded);
            // Rows written since the job last wrote to `p` are another writer's, but for the
            // chunk's own attached parts. `top`: the partition's highest block in the read that
            // counted them, which every note of `p` below covers (`arrived_and_top`).
            let (already, others, mut top) = match found {
                // Less the rows of another chunk's write under way in `p` (its answer lost
                // too, its own replay to come), which are the job's.
                Found::Landed { foreign_rows, top } if t.moving_from != staging => (
                    true,
                    foreign_rows.saturating_sub(self.unnoted_own(p, &t).await?),
                    top,
                ),
                Found::Landed { foreign_rows, top } => (true, foreign_rows, top),
                Found::NotLanded => {
                    let (since, top) = self.arrived_and_top(p, t.last_block).await?;
                    (false, since.besides(self.unnoted_own(p, &t).await?), top)
                }
                Found::Unsure => {
                    return Err(Error::fatal(format!(
                        "partition {p} of {} changed while chunk {chunk} was replayed (merges \
                         ran?): not landing it again blind",
                        self.target()
                    )));
                }
            };
            // Found gone in by this replay (its `Landed` note lost with the run that attached
            // it): noted before the ledger's note below clears the attach under way, after
            // which the notes alone say whether it went in. Unnoted, a replay after a kill past
            // that point took it for not landed and attached it again: a partition doubled.
            if already && !self.moves() {
                self.note_outcome(staging, p, staged::Outcome::Landed, &notes)
                    .await?;
            }
            if others > 0 {
                self.warn_foreign(p, others);
                t.foreign_rows += others;
            }
            // Every write of a runner that may have been paused past its lock's TTL is
            // checked against the lock first (another runner may be landing this chunk).
            if let Some(l) = fence {
                l.check().await?;
            }
            if let Some(&(rows, _)) = staged.get(p).filter(|_| !already) {
                // Noted before the move or attach: if its answer is lost, the rows it landed
                // are still told from another writer's (`unnoted_own`). Everything up to the
                // partition's top is accounted for by now (the job's, or counted as another
                // writer's just above), so the note replaces any earlier write under way.
                t.last_block = t.last_block.max(top.unwrap_or(t.last_block));
                t.moving_rows = rows;
                t.moving_from = staging.to_string();
                self.note_moving(p, &t).await?;
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
                // Before the ledger's note after it: a replay that finds that note replaced
                // reads this one (18.16).
                if !self.moves() {
                    self.note_outcome(staging, p, staged::Outcome::Landed, &notes)
                        .await?;
                }
                // The partition's top after the move is noted as the job's own: rows another
                // writer put there between the read before the move and the read after it are
                // told by count (what arrived above the old top, less the chunk's rows; a
                // merge may have folded the chunk's parts into older ones meanwhile).
                let (arrived, after) = self.arrived_and_top(p, t.last_block).await?;
                let arrived = arrived.besides(rows);
                if arrived > 0 {
                    self.warn_foreign(p, arrived);
                    t.foreign_rows += arrived;
                }
                top = after;
            }
            t.last_block = t.last_block.max(top.unwrap_or(t.last_block));
            t.moving_rows = 0;
            t.moving_from.clear();
            if let Some(l) = fence {
                l.check().await?;
            }
            self.note(p, &t).await?;
        }
        Ok(())
    }

    fn warn_foreign(&self, p: &str, rows: u64) {
        tracing::warn!(
            "{rows} row(s) were written into partition {p} of {} by another writer while the \
             job ran; they are kept, but starting the job over would refuse to restore this \
             partition",
            self.target()
        );
    }

    /// Stop merges on the target for a landing (18.16). `SYSTEM STOP MERGES` cancels the merges
    /// under way (measured on 18.16 and 26.9), so it waits first, up to `MERGE_WAIT`, until
    /// none is running: a job that lands every few seconds cancelled a big target's long
    /// merges at every landing, and they never finished (parts pile up). A merge starting in
    /// between is cancelled, and done again once merges start.
    pub async fn stop_merges(&self) -> Result<()> {
        let started = std::time::Instant::now();
        let mut told = false;
        loop {
            let (running, longest) = self.running_merges().await?;
            if running == 0 {
                break;
            }
            if started.elapsed() > MERGE_WAIT {
                tracing::warn!(
                    "a merge on {} is still running after {}s: stopping merges for the landing \
                     cancels it (it runs again once the chunk is landed)",
                    self.target(),
                    MERGE_WAIT.as_secs()
                );
                break;
            }
            if !told {
                told = true;
                tracing::info!(
                    "waiting until the merge running on {} for {longest:.1}s ends: stopping \
                     merges for the landing would cancel it",
                    self.target(),
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let sql = format!("SYSTEM STOP MERGES {}", self.target());
        exec_repeatable(&self.client, &sql, "stopping merges on the target").await
    }

    /// Stop merges on the target and wait until none is running (bounded: 10 minutes). A
    /// merge running when it is called is waited for first (`stop_merges`), not cancelled.
    pub async fn pause_merges(&self) -> Result<()> {
        self.stop_merges().await?;
        for _ in 0..6000 {
            if self.running_merges().await?.0 == 0 {
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

    /// How many merges run on the target now, and for how long the longest has (seconds).
    async fn running_merges(&self) -> Result<(u64, f64)> {
        let sql = format!(
            "SELECT count(), max(elapsed) FROM system.merges WHERE database = {} AND table = {}",
            literal(&self.db),
            literal(&self.target_name)
        );
        let text = fetch_text(&self.client, &sql, "waiting for the target's merges").await?;
        let mut fields = text.split_whitespace();
        let running = fields
            .next()
            .and_then(|x| x.parse().ok())
            .ok_or_else(|| Error::fatal(format!("reading the target's merges: {text:?}")))?;
        let longest = fields.next().and_then(|x| x.parse().ok()).unwrap_or(0.0);
        Ok((running, longest))
    }

    /// `SYSTEM START MERGES` on the target, again after a transient failure.
    pub async fn resume_merges(&self) -> Result<()> {
        use backon::{ExponentialBuilder, Retryable};
        let sql = format!("SYSTEM START MERGES {}", self.target());
        (|| exec_repeatable(&self.client, &sql, "restarting merges on the target"))
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_times(4)
                    .with_jitter(),
            )
            .when(|e: &Error| e.db_kind().is_some_and(DbErrorKind::retryable))
            .await
    }
}
