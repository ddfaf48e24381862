//! Replaying an interrupted landing on 18.16 (attach copies): which staged partitions are in
//! the target already, told from the target's parts above the chunk's mark, and what to do when
//! merges have made that impossible to tell.

use super::{Landing, Parts, Touched};
use crate::clickhouse::client::{literal, rows};
use crate::error::{Error, Result};
use std::collections::HashMap;

/// One active part, as a replay compares them.
pub(super) struct Part {
    rows: u64,
    /// Compressed and uncompressed bytes, as the server prints them.
    sizes: (String, String),
    /// A merge product (spans more than one block number).
    merged: bool,
}

/// A staged chunk's landing, replayed.
#[derive(Clone, Copy)]
pub(in crate::clickhouse) struct Replay<'a> {
    pub staging: &'a str,
    pub partitions: &'a [String],
    pub mark: i64,
    /// The server has not restarted since the chunk was staged (its merges stayed stopped).
    pub steady: bool,
}

/// What a replay finds of one staged partition in the target (18.16).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Found {
    /// Attached already, as parts of `own_rows` rows in all.
    Landed {
        own_rows: u64,
    },
    NotLanded,
    /// Merges ran since the landing began: the attached parts may be folded into others.
    Unsure,
}

impl Landing {
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
    /// hard links) among the target's parts above the mark. That is conclusive both ways while
    /// the staging table holds what the attach copied and the target's parts above the mark
    /// are as they were added: none of those is a merge product, and either the staging table's
    /// merges stayed stopped since its insert (`steady`: no server restart since) or none of its
    /// parts is a merge product either. Then the parts above the mark that are not twins are
    /// another writer's: kept, and counted as theirs by the caller.
    pub(super) async fn found(
        &self,
        staging: &str,
        p: &str,
        mark: i64,
        steady: bool,
    ) -> Result<Found> {
        let ours = self.parts_of(staging, p, "").await?;
        let theirs = self
            .parts_of(&self.target(), p, &format!("AND max_block_number > {mark}"))
            .await?;
        let unmerged =
            !theirs.iter().any(|x| x.merged) && (steady || !ours.iter().any(|x| x.merged));
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

    /// Before replaying an attach (18.16): when a partition of the chunk has parts above the
    /// mark that `found` cannot account for, merges ran since the landing began (a server
    /// restart starts them again) and the chunk's attached parts may be folded into others.
    /// Attaching again could double the chunk, skipping could lose it. If nothing but this
    /// chunk's attaches can have taken block numbers since the mark (the table's numbers above
    /// it are exactly as many as the staged parts of the partitions that have parts above it),
    /// every such partition is noted as the job's own, so the next start's restore takes them
    /// back, and the job starts over. Otherwise another writer has written since: starting over
    /// would drop its rows, so the job stops and says so.
    pub(super) async fn replay_or_start_over(
        &self,
        replay: &Replay<'_>,
        staged: &Parts,
        ledger: &HashMap<String, Touched>,
    ) -> Result<()> {
        let Replay {
            staging,
            partitions,
            mark,
            steady,
        } = *replay;
        let target = self.parts(&self.target()).await?;
        let above = |p: &str| target.get(p).map(|x| x.1).filter(|top| *top > mark);
        let mut unsure = None;
        for p in partitions.iter().filter(|p| staged.contains_key(*p)) {
            if above(p).is_some() && self.found(staging, p, mark, steady).await? == Found::Unsure {
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
}
