//! Replaying an interrupted landing on 18.16 (attach copies): which staged partitions are in
//! the target already, told from the target's parts above the chunk's mark, and a refusal when
//! merges have made that impossible to tell.

use super::staged::Outcome;
use super::{Landing, Parts};
use crate::clickhouse::client::{literal, rows};
use crate::error::{Error, Result};
use std::collections::HashMap;

/// One active part, as a replay compares them.
pub(super) struct Part {
    name: String,
    rows: u64,
    /// Compressed and uncompressed bytes, as the server prints them.
    sizes: (String, String),
    /// Its highest block number.
    block: i64,
    /// Not as it was added: a merge product (spans more than one block number) or a
    /// mutation's rewrite (`ALTER ... DELETE/UPDATE`: its data version is the mutation's, not
    /// its first block), whose rows can differ from those of the part it replaced.
    merged: bool,
}

/// A staged chunk's landing, replayed.
#[derive(Clone, Copy)]
pub(in crate::clickhouse) struct Replay<'a> {
    pub staging: &'a str,
    pub partitions: &'a [String],
    pub mark: i64,
}

/// What a replay finds of one staged partition in the target (18.16).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Found {
    /// Attached already; `foreign_rows`: rows of the target's other parts above the block the
    /// job last noted for the partition (another writer's); `top`: the partition's highest
    /// block in the read that counted them (what the note after the replay may cover).
    Landed {
        foreign_rows: u64,
        top: Option<i64>,
    },
    NotLanded,
    /// Merges ran since the landing began (the attached parts may be folded into others), or
    /// only some of the staged parts have twins.
    Unsure,
}

/// Whether a part spanning blocks `min..=max` at data version `version` is not as it was added:
/// merged (more than one block) or rewritten by a mutation (its data version is the mutation's
/// block number; a part as added has its first block's). Read from `system.parts` columns,
/// never from the part's name, whose shape differs between partitioning syntaxes.
fn reshaped(min: i64, max: i64, version: i64) -> bool {
    min != max || version != min
}

impl Landing {
    /// Active parts of partition `p` of `table` (`extra`: a further condition).
    async fn parts_of(&self, table: &str, p: &str, extra: &str) -> Result<Vec<Part>> {
        let bare = table.replace('`', "");
        let (db, name) = bare.split_once('.').unwrap_or(("", &bare));
        let sql = format!(
            "SELECT rows, data_compressed_bytes, data_uncompressed_bytes, min_block_number,
                    max_block_number, name, data_version
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
                let block = r.get(4)?.parse().ok()?;
                let (min, version) = (r.get(3)?.parse().ok()?, r.get(6)?.parse().ok()?);
                Some(Part {
                    merged: reshaped(min, block, version),
                    name: r.get(5)?.clone(),
                    rows: r.first()?.parse().ok()?,
                    sizes: (r.get(1)?.clone(), r.get(2)?.clone()),
                    block,
                })
            })
            .collect())
    }

    /// A digest of the rows of each of `parts` of `table` (part name -> digest): the sum of a
    /// hash of every row's columns, so equal only for parts of the same rows.
    async fn digests(&self, table: &str, parts: &[&str]) -> Result<HashMap<String, String>> {
        if parts.is_empty() {
            return Ok(HashMap::new());
        }
        let names: Vec<String> = parts.iter().map(|n| literal(n)).collect();
        let sql = format!(
            "SELECT _part, toString(sum(cityHash64(toString(tuple(*))))) FROM {table}
              WHERE _part IN ({}) GROUP BY _part",
            names.join(", ")
        );
        Ok(rows(&self.client, &sql, "reading the content of parts")
            .await?
            .into_iter()
            .filter_map(|r| Some((r.first()?.clone(), r.get(1)?.clone())))
            .collect())
    }

    /// What the target holds of the staging table's partition `p`, for a replay on 18.16
    /// (attach copies, and gives each attached part a block number of its own above `mark`).
    /// The staged parts are in when every one has a twin (same rows, sizes and content: an
    /// attach makes hard links) among the target's parts above the mark; sizes alone are not
    /// enough, since another writer's small part of fixed-width rows can match a staged one
    /// byte for byte in size (and then the staged part would be taken for landed and lost).
    /// That is conclusive both ways while
    /// no part on either side is a merge product: the staging table holds what the attach
    /// copied, and the target's parts above the mark are as they were added. Then the target's
    /// parts above `since` (the block the job last noted for `p`) that are not twins are another
    /// writer's: kept, and counted as theirs. `noted`: the names of the staging table's parts
    /// of `p` as noted before its landing began (its merges stopped): while they are the same,
    /// the staged parts are those the landing attached even if they are merge products.
    pub(super) async fn found(
        &self,
        staging: &str,
        p: &str,
        mark: i64,
        since: i64,
        noted: Option<&Vec<String>>,
    ) -> Result<Found> {
        let ours = self.parts_of(staging, p, "").await?;
        let low = mark.min(since);
        let mut theirs = self
            .parts_of(&self.target(), p, &format!("AND max_block_number > {low}"))
            .await?;
        let mut names: Vec<&str> = ours.iter().map(|x| x.name.as_str()).collect();
        names.sort_unstable();
        let as_noted = noted.is_some_and(|n| n.iter().map(String::as_str).eq(names));
        let settled = !theirs.iter().any(|x| x.merged && x.block > mark)
            && (as_noted || !ours.iter().any(|x| x.merged));
        let like = |a: &Part, b: &Part| b.block > mark && a.rows == b.rows && a.sizes == b.sizes;
        // Parts that match in size are read to compare their rows (only those: a replay is
        // rare, but a target's parts can be large).
        let alike: Vec<&str> = theirs
            .iter()
            .filter(|t| ours.iter().any(|o| like(o, t)))
            .map(|t| t.name.as_str())
            .collect();
        let (mine, seen) = if alike.is_empty() {
            Default::default()
        } else {
            let mine: Vec<&str> = ours
                .iter()
                .filter(|o| theirs.iter().any(|t| like(o, t)))
                .map(|o| o.name.as_str())
                .collect();
            (
                self.digests(staging, &mine).await?,
                self.digests(&self.target(), &alike).await?,
            )
        };
        let same = |a: &Part, b: &Part| {
            like(a, b)
                && mine
                    .get(&a.name)
                    .is_some_and(|d| seen.get(&b.name) == Some(d))
        };
        let mut twins = 0;
        let mut twins_top = None;
        for part in &ours {
            if let Some(i) = theirs.iter().position(|t| same(part, t)) {
                let twin = theirs.swap_remove(i);
                twins_top = twins_top.max(Some(twin.block));
                twins += 1;
            }
        }
        let above_mark = theirs.iter().any(|x| x.block > mark);
        // The twins are above `low`, so this is the partition's top.
        let top = theirs.iter().map(|x| x.block).max().max(twins_top);
        Ok(if !ours.is_empty() && twins == ours.len() {
            let foreign_rows = theirs
                .iter()
                .filter(|x| x.block > since)
                .map(|x| x.rows)
                .sum();
            Found::Landed { foreign_rows, top }
        } else if twins == 0 && (settled || !above_mark) {
            Found::NotLanded
        } else {
            Found::Unsure
        })
    }

    /// Before replaying an attach (18.16): a partition of the chunk whose state `found` cannot
    /// tell (merges ran since the landing began: a server restart, or someone starting them)
    /// stops the job. Landing it again could double the chunk, skipping it could lose it, and
    /// starting the job over would drop any rows another writer put into the target since,
    /// which block numbers can no longer tell apart. The operator decides: `reset` with
    /// `--discard-foreign-rows` starts over (the restore takes back what the job landed).
    /// Otherwise returns what it found of each staged partition, for the landing to act on.
    pub(super) async fn check_replay(
        &self,
        replay: &Replay<'_>,
        staged: &Parts,
        ledger: &HashMap<String, super::Touched>,
    ) -> Result<HashMap<String, Found>> {
        let Replay {
            staging,
            partitions,
            mark,
        } = *replay;
        let mut seen = HashMap::new();
        let noted = self.staged_notes(staging).await?;
        for p in partitions.iter().filter(|p| staged.contains_key(*p)) {
            let since = ledger.get(p).map_or(0, |t| t.last_block);
            let note = noted.get(p);
            let names = note.map(|n| &n.parts);
            // While the ledger has this chunk's attach of `p` under way, the target's parts
            // above the mark tell whether it went in. Once another note replaced that one, the
            // landing notes say (`note_outcome`): the target's parts above the mark can no
            // longer tell, another chunk's may be alike row for row.
            let under_way = ledger.get(p).is_some_and(|t| t.moving_from == staging);
            let found = match note.map(|n| n.outcome).filter(|_| !under_way) {
                Some(Outcome::Landed) => {
                    let (arrived, top) = self.arrived_and_top(p, since).await?;
                    Found::Landed {
                        foreign_rows: arrived.besides(0),
                        top,
                    }
                }
                Some(Outcome::NotLanded | Outcome::Unknown) => Found::NotLanded,
                // Under way, settled unsure, or staged by an earlier version (no notes).
                Some(Outcome::Unsure) | None => self.found(staging, p, mark, since, names).await?,
            };
            if found != Found::Unsure {
                seen.insert(p.clone(), found);
                continue;
            }
            return Err(Error::fatal(format!(
                "partition {p} of {} has changed since this chunk's landing began beyond what \
                 tells whether its staged parts ({staging}) are in it: merges ran (a server \
                 restart starts them again) or only some of them are there. Landing it again \
                 could double the chunk, and starting the job over would drop any rows other \
                 writers put into the target since. If no other writer has written into the \
                 target since the job began (or once their rows are copied elsewhere), \
                 `backfill reset --yes --discard-foreign-rows` the job: its next run restores \
                 what the job landed and lands every chunk again",
                self.target()
            )));
        }
        Ok(seen)
    }
}

#[cfg(test)]
mod tests {
    use super::reshaped;

    #[test]
    fn a_part_is_reshaped_by_a_merge_or_a_mutation() {
        // 202511_4_4_0 (or 20251101_20251130_4_4_0 in the old syntax), as added.
        assert!(!reshaped(4, 4, 4));
        // 202511_4_4_0_12: part 4 rewritten by mutation 12.
        assert!(reshaped(4, 4, 12));
        // 202511_3_9_2: a merge.
        assert!(reshaped(3, 9, 3));
    }
}
