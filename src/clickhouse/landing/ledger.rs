//! The job's ledger (`<prefix>_ledger`, a ReplacingMergeTree beside the target): for each
//! partition the job has touched, what the target held before, the highest block the job's
//! last write left there, the rows other writers put there, and, from just before the job
//! writes into it (a chunk's move or attach, a restore from the base) until that write is
//! noted, how many rows the write carries and from which table. Without that last part a write
//! whose answer was lost left the job's own rows above the noted block, where they counted as
//! another writer's and the next restore refused.

use super::Landing;
use crate::clickhouse::client::{exec, literal, rows};
use crate::error::Result;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

/// What the ledger says of one partition the job has touched.
#[derive(Debug, Clone, Default)]
pub struct Touched {
    pub base_rows: u64,
    /// The highest block number in the target's partition after the job's last write to it.
    pub last_block: i64,
    /// Rows other writers put into the partition while the job ran (kept, but a restore would
    /// drop them).
    pub foreign_rows: u64,
    /// Rows of a write into the partition under way (a chunk's move or attach, a restore's
    /// replace from the base), noted before it and cleared with the note after it.
    pub moving_rows: u64,
    /// What that write comes from: a staging table, or the base table. Empty with rows
    /// above `last_block` that are the job's own in ledgers an earlier version's reset
    /// settled. `KEEPING` while the target's partition is being copied into the base, before
    /// the job first writes into it.
    pub moving_from: String,
}

/// `moving_from` while the partition is being copied into the base (`keep_base`): the job has
/// not written into it yet, and the base may not hold it yet.
pub const KEEPING: &str = "keeping";

/// The columns of a write under way, which ledgers of earlier versions lack, with their types.
const MOVING_COLUMNS: [(&str, &str); 2] = [
    ("moving_rows", "UInt64 DEFAULT 0"),
    ("moving_from", "String DEFAULT ''"),
];

/// Whether the ledger has the columns of a move under way (ledgers made by earlier versions
/// lack them): false until seen, then true for the process (columns are only ever added).
#[derive(Debug, Default)]
pub(super) struct Columns(AtomicBool);

impl Landing {
    pub(super) fn ledger(&self) -> String {
        self.q(&format!("{}_ledger", self.prefix))
    }

    /// The ledger's name, for messages.
    pub fn ledger_name(&self) -> String {
        self.ledger().replace('`', "")
    }

    pub(super) fn create_ledger(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} (partition String, base_rows UInt64,
                 last_block Int64, foreign_rows UInt64, version UInt64,
                 moving_rows UInt64 DEFAULT 0, moving_from String DEFAULT '')
             ENGINE = ReplacingMergeTree(version) ORDER BY partition",
            self.ledger()
        )
    }

    /// Which of the moving columns the ledger lacks (reads only).
    async fn missing_moving_columns(&self) -> Result<Vec<&'static str>> {
        if self.moving_columns.0.load(Ordering::Relaxed) {
            return Ok(Vec::new());
        }
        let bare = self.ledger().replace('`', "");
        let (db, name) = bare.split_once('.').unwrap_or(("", &bare));
        let sql = format!(
            "SELECT name FROM system.columns
              WHERE database = {} AND table = {} AND name IN ('moving_rows', 'moving_from')",
            literal(db),
            literal(name)
        );
        let present: Vec<String> = rows(&self.client, &sql, "reading the job's ledger")
            .await?
            .into_iter()
            .filter_map(|r| r.first().cloned())
            .collect();
        let missing: Vec<&'static str> = MOVING_COLUMNS
            .iter()
            .map(|(c, _)| *c)
            .filter(|c| !present.iter().any(|p| p == c))
            .collect();
        self.moving_columns
            .0
            .store(missing.is_empty(), Ordering::Relaxed);
        Ok(missing)
    }

    /// Whether the ledger has the moving columns (reads only).
    async fn has_moving_columns(&self) -> Result<bool> {
        Ok(self.missing_moving_columns().await?.is_empty())
    }

    /// The ledger of touched partitions (empty if the job never landed anything).
    pub async fn touched(&self) -> Result<HashMap<String, Touched>> {
        let kept = self.kept.load(Ordering::Relaxed);
        if !kept && !self.exists(&self.ledger()).await? {
            return Ok(HashMap::new());
        }
        let moving = if self.has_moving_columns().await? {
            "argMax(moving_rows, version), argMax(moving_from, version)"
        } else {
            "toUInt64(0), ''"
        };
        let sql = format!(
            "SELECT partition, argMax(base_rows, version), argMax(last_block, version),
                    argMax(foreign_rows, version), {moving}
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
                        moving_rows: r.get(4)?.parse().ok()?,
                        moving_from: r.get(5)?.clone(),
                    },
                ))
            })
            .collect())
    }

    pub(super) async fn note(&self, partition: &str, t: &Touched) -> Result<()> {
        let version = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0).max(0);
        let (columns, values) = if self.has_moving_columns().await? {
            (
                ", moving_rows, moving_from",
                format!(", {}, {}", t.moving_rows, literal(&t.moving_from)),
            )
        } else {
            ("", String::new())
        };
        let sql = format!(
            "INSERT INTO {} (partition, base_rows, last_block, foreign_rows, version{columns})
             VALUES ({}, {}, {}, {}, {version}{values})",
            self.ledger(),
            literal(partition),
            t.base_rows,
            t.last_block,
            t.foreign_rows
        );
        exec(&self.client, &sql, "writing the job's ledger").await
    }

    /// Note a move about to start (`t.moving_*` set), adding the columns to a ledger an
    /// earlier version made.
    pub(super) async fn note_moving(&self, partition: &str, t: &Touched) -> Result<()> {
        let missing = self.missing_moving_columns().await?;
        if !missing.is_empty() {
            // Only those missing: 18.16 has no `ADD COLUMN IF NOT EXISTS`.
            let add: Vec<String> = MOVING_COLUMNS
                .iter()
                .filter(|(c, _)| missing.contains(c))
                .map(|(c, t)| format!("ADD COLUMN {c} {t}"))
                .collect();
            let sql = format!("ALTER TABLE {} {}", self.ledger(), add.join(", "));
            exec(&self.client, &sql, "adding columns to the job's ledger").await?;
            self.moving_columns.0.store(true, Ordering::Relaxed);
        }
        self.note(partition, t).await
    }

    /// The job's own rows in partition `p` above its noted block: those of a write noted as
    /// under way that went through (its answer lost, or the process killed before the note
    /// after it), or as an earlier version's `settle_moves` left them. 0 when that cannot be
    /// told: the rows then
    /// count as another writer's, and a restore refuses rather than drops them. The write is
    /// told by what it came from:
    /// - a move (current servers): by what its staging table no longer holds of `p`;
    /// - an attach (18.16, which copies): by twins of the staged parts above the noted block;
    /// - a restore from the base table: every part the job had noted is gone (replaced by the
    ///   base's copies, with new block numbers).
    pub(super) async fn unnoted_own(&self, p: &str, t: &Touched) -> Result<u64> {
        if t.moving_rows == 0 {
            return Ok(0);
        }
        if t.moving_from.is_empty() {
            return Ok(t.moving_rows);
        }
        if t.moving_from == self.base() {
            let before = self.target_parts().await?;
            let kept = before
                .get(p)
                .is_some_and(|v| v.iter().any(|x| x.1 <= t.last_block));
            return Ok(if kept { 0 } else { t.moving_rows });
        }
        if !self.exists(&t.moving_from).await? {
            return Ok(0);
        }
        if !self.moves() {
            let noted = self.staged_notes(&t.moving_from).await?;
            let found = self
                .found(
                    &t.moving_from,
                    p,
                    t.last_block,
                    t.last_block,
                    noted.get(p).map(|n| &n.parts),
                )
                .await?;
            return Ok(match found {
                super::replay::Found::Landed { .. } => t.moving_rows,
                _ => 0,
            });
        }
        let still = self.parts(&t.moving_from).await?.get(p).map_or(0, |x| x.0);
        Ok(t.moving_rows.saturating_sub(still))
    }

    /// Before staging tables are dropped (a reset): settle each move or attach under way as
    /// the note after it would have, from what only the staging table can tell (how much of
    /// it went in): the rows above the noted block that are not its own are another writer's,
    /// and the partition's top is noted, all while merges are still stopped. Left as rows of
    /// the job's own above the old block, a merge after the reset (which starts merges again)
    /// folded the parts below that block into one above it, and the next run took all their
    /// rows for another writer's and refused.
    pub async fn settle_moves(&self) -> Result<()> {
        for (p, t) in self.touched().await? {
            // A restore under way is told by the base table, which stays.
            if t.moving_from.is_empty()
                || t.moving_from == self.base()
                || t.moving_from == KEEPING
                || !self.exists(&t.moving_from).await?
            {
                continue;
            }
            let own = self.unnoted_own(&p, &t).await?;
            let (arrived, top) = self.arrived_and_top(&p, t.last_block).await?;
            let others = arrived.besides(own);
            if others > 0 {
                self.warn_foreign(&p, others);
            }
            let settled = Touched {
                foreign_rows: t.foreign_rows + others,
                last_block: top.unwrap_or(t.last_block).max(t.last_block),
                moving_rows: 0,
                moving_from: String::new(),
                ..t
            };
            self.note(&p, &settled).await?;
        }
        Ok(())
    }
}
