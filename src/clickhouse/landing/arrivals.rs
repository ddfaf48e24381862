//! Rows that arrived in a partition of the target above a block number, told right even when a
//! merge has folded an arrival into the partition's older parts.
//!
//! Every insert, move or attach into a MergeTree takes new block numbers, so what arrived after
//! a partition's top was read sits in parts above that top. A merge keeps its sources' block
//! range: one that folds an arrival into older parts makes a part that spans the old top, whose
//! rows are mostly old. Counting that part took the old rows for another writer's (a landing's
//! merge on a current server: the job then refused to start over). Such a merge leaves its
//! sources listed, outdated, for the table's `old_parts_lifetime` (8 minutes by default), far
//! longer than the few milliseconds between a landing and its count: each arrival is then read
//! from its own part, the one whose range is a single block.

use super::Landing;
use crate::clickhouse::client::{literal, rows};
use crate::error::Result;

/// One part of a partition: its block range, rows, merge level and whether it is active.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Part {
    pub min: i64,
    pub max: i64,
    pub rows: u64,
    pub level: u64,
    pub active: bool,
}

/// Rows that arrived above a block, and whether that count is exact.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Arrived {
    pub rows: u64,
    pub exact: bool,
}

impl Arrived {
    /// The rows that are not `own`'s (the job's, of a move or attach it knows of). At least
    /// one when the count is not exact: a merge folded arrivals whose own parts are gone, and
    /// in an aggregating or replacing engine another writer's rows fold into the job's; a
    /// count that said none let a restore drop them.
    pub fn besides(self, own: u64) -> u64 {
        let n = self.rows.saturating_sub(own);
        if self.exact { n } else { n.max(1) }
    }
}

/// Rows that arrived above block `since` and are still in the table, of a partition's parts
/// (active and outdated). Exact while every active part above `since` can be taken apart into
/// the parts it was made of, down to the arrivals' own parts and parts at or below `since`;
/// else every active row above `since`, not exact.
pub(super) fn arrived(parts: &[Part], since: i64) -> Arrived {
    let active: Vec<&Part> = parts.iter().filter(|x| x.active && x.max > since).collect();
    let every: u64 = active.iter().map(|x| x.rows).sum();
    let mut rows = 0;
    for x in &active {
        match made_of(x, parts, since) {
            Some(n) => rows += n,
            None => {
                return Arrived {
                    rows: every,
                    exact: false,
                };
            }
        }
    }
    Arrived {
        // Arrivals merged together fold rows (an aggregating or replacing engine) that their
        // own parts still count.
        rows: rows.max(if active.iter().any(|x| x.min <= since) {
            0
        } else {
            every
        }),
        exact: true,
    }
}

/// Rows of the arrivals above `since` that part `x` holds, from the parts it was made of
/// (outdated, listed for the table's `old_parts_lifetime` after the merge): a merge takes in
/// adjacent parts of lower levels and spans their blocks, so its sources are the largest listed
/// parts inside its range, which must reach both its ends without overlapping. An arrival's own
/// part spans one block (a moved or attached part keeps its level; a mutation rewrites a part
/// under the same range and level, and counts once). `None` when a source is no longer listed.
fn made_of(x: &Part, parts: &[Part], since: i64) -> Option<u64> {
    if x.max <= since {
        return Some(0);
    }
    if x.min == x.max {
        // Its first form: the lowest level of that block (rows before any mutation).
        return parts
            .iter()
            .filter(|y| y.min == x.min && y.max == x.max)
            .min_by_key(|y| (y.level, !y.active))
            .map(|y| y.rows);
    }
    let inside: Vec<&Part> = parts
        .iter()
        .filter(|y| x.min <= y.min && y.max <= x.max && y.level < x.level)
        .collect();
    // The largest of them: not inside another one (one per range).
    let mut sources: Vec<&Part> = inside
        .iter()
        .copied()
        .filter(|y| {
            !inside
                .iter()
                .any(|z| z.min <= y.min && y.max <= z.max && (z.min, z.max) != (y.min, y.max))
        })
        .collect();
    sources.sort_by_key(|y| (y.min, y.max, y.level));
    sources.dedup_by_key(|y| (y.min, y.max));
    let (first, last) = (sources.first()?, sources.last()?);
    let disjoint = sources.windows(2).all(|w| w[0].max < w[1].min);
    if first.min != x.min || last.max != x.max || !disjoint {
        return None;
    }
    // A source between the two ends may be gone while both ends are listed (block numbers
    // skip those of other partitions and of mutations, so a gap says nothing). A merge never
    // makes rows: sources holding fewer rows than the part they made are not all of them.
    // (Their rows of any form: a mutation of a source keeps its range.)
    let most = |y: &Part| {
        parts
            .iter()
            .filter(|z| (z.min, z.max) == (y.min, y.max) && z.level < x.level)
            .map(|z| z.rows)
            .max()
            .unwrap_or(y.rows)
    };
    if sources.iter().map(|y| most(y)).sum::<u64>() < x.rows {
        return None;
    }
    sources.iter().map(|y| made_of(y, parts, since)).sum()
}

impl Landing {
    /// Rows that arrived in partition `p` of the target above block `since` (`arrived`). Not
    /// exact, every row of the active parts above it, and `besides` counts at least one as
    /// another writer's: too many is a refusal to start over that an operator can lift, too
    /// few is another writer's rows dropped by a restore.
    pub(super) async fn arrived_since(&self, p: &str, since: i64) -> Result<Arrived> {
        Ok(self.arrived_and_top(p, since).await?.0)
    }

    /// `arrived_since`, and the partition's highest block in the same read (`None`: no part).
    /// A note of that top after that count accounts for every row up to it, once: read
    /// before the count, a row arriving in between counted as another writer's twice; read
    /// after it, not at all (a later restore dropped it).
    pub(super) async fn arrived_and_top(
        &self,
        p: &str,
        since: i64,
    ) -> Result<(Arrived, Option<i64>)> {
        let sql = format!(
            "SELECT min_block_number, max_block_number, rows, level, active FROM system.parts
              WHERE database = {} AND table = {} AND partition_id = {}",
            literal(&self.db),
            literal(&self.target_name),
            literal(p)
        );
        let parts: Vec<Part> = rows(&self.client, &sql, "reading the target's parts")
            .await?
            .into_iter()
            .filter_map(|r| {
                Some(Part {
                    min: r.first()?.parse().ok()?,
                    max: r.get(1)?.parse().ok()?,
                    rows: r.get(2)?.parse().ok()?,
                    level: r.get(3)?.parse().ok()?,
                    active: r.get(4)? == "1",
                })
            })
            .collect();
        let top = parts.iter().filter(|x| x.active).map(|x| x.max).max();
        Ok((arrived(&parts, since), top))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(min: i64, max: i64, rows: u64, level: u64, active: bool) -> Part {
        Part {
            min,
            max,
            rows,
            level,
            active,
        }
    }

    fn exact(rows: u64) -> Arrived {
        Arrived { rows, exact: true }
    }

    #[test]
    fn arrivals_no_merge_touched_are_counted_whole() {
        // Old parts end at 10; a moved part (level 1, kept from staging) and an insert.
        let parts = [part(12, 12, 300, 1, true), part(15, 15, 7, 0, true)];
        assert_eq!(arrived(&parts, 10), exact(307));
        assert_eq!(arrived(&parts, 10).besides(300), 7);
        // Merged together, rows folded (an aggregating engine): counted from their own parts.
        let merged = [
            part(12, 15, 301, 2, true),
            part(12, 12, 300, 1, false),
            part(15, 15, 7, 0, false),
        ];
        assert_eq!(arrived(&merged, 10), exact(307));
    }

    #[test]
    fn arrivals_merged_together_whose_own_parts_are_gone_count_another_writers_row() {
        // Another writer's 7 rows folded into the job's 300 (same keys): 300 rows left.
        let merged = [part(12, 15, 300, 2, true)];
        let a = arrived(&merged, 10);
        assert_eq!(
            a,
            Arrived {
                rows: 300,
                exact: false
            }
        );
        assert_eq!(a.besides(300), 1);
    }

    #[test]
    fn an_arrival_folded_into_older_parts_is_read_from_its_own_part() {
        // The moved part [12,12] merged with the old [1,10]: the merged part spans 10.
        let parts = [
            part(1, 12, 520, 3, true),
            part(12, 12, 300, 1, false),
            part(1, 10, 400, 2, false),
        ];
        assert_eq!(arrived(&parts, 10), exact(300));
        assert_eq!(arrived(&parts, 10).besides(300), 0);
        // And another writer's insert folded in as well.
        let parts = [
            part(1, 15, 525, 3, true),
            part(1, 10, 400, 2, false),
            part(12, 12, 300, 1, false),
            part(15, 15, 7, 0, false),
        ];
        assert_eq!(arrived(&parts, 10).besides(300), 7);
    }

    #[test]
    fn an_arrival_whose_own_part_is_gone_is_not_exact() {
        let parts = [part(1, 15, 525, 3, true), part(12, 12, 300, 1, false)];
        assert_eq!(
            arrived(&parts, 10),
            Arrived {
                rows: 525,
                exact: false
            }
        );
    }

    #[test]
    fn a_merge_of_a_merge_whose_sources_are_gone_is_not_exact() {
        // After an adversarial pass: the moved part [12] and another writer's [14] merged with
        // the old [1,10] into [1,14], whose sources then left the list; another insert [16]
        // merged with it into [1,16], their parts listed. The top block's own part is there,
        // but the first merge cannot be taken apart.
        let parts = [
            part(1, 16, 520, 4, true),
            part(1, 14, 519, 3, false),
            part(16, 16, 1, 0, false),
        ];
        let a = arrived(&parts, 10);
        assert!(!a.exact, "{a:?}");
        assert!(a.besides(300) >= 1);
        // With the first merge's sources still listed: exact.
        let all = [
            parts[0],
            parts[1],
            parts[2],
            part(1, 10, 400, 2, false),
            part(12, 12, 300, 1, false),
            part(14, 14, 50, 0, false),
        ];
        assert_eq!(arrived(&all, 10), exact(351));
        assert_eq!(arrived(&all, 10).besides(300), 51);
    }

    #[test]
    fn a_merge_missing_a_source_between_its_ends_is_not_exact() {
        // The old [1,10], the move [12] and another writer's [14] merged into [1,14]; [14]
        // has left the list before the others (both ends still listed, the gap between them
        // could be another partition's blocks). Its 50 rows show in the merged part's count.
        let parts = [
            part(1, 14, 750, 3, true),
            part(1, 10, 400, 2, false),
            part(12, 12, 300, 1, false),
        ];
        let a = arrived(&parts, 10);
        assert!(!a.exact, "{a:?}");
        assert!(a.besides(300) >= 1);
        // Listed, it is counted exactly.
        let all = [parts[0], parts[1], parts[2], part(14, 14, 50, 0, false)];
        assert_eq!(arrived(&all, 10).besides(300), 50);
        // A gap of another partition's blocks, every source listed: exact.
        let gap = [
            part(1, 14, 700, 3, true),
            part(1, 10, 400, 2, false),
            part(14, 14, 300, 1, false),
        ];
        assert_eq!(arrived(&gap, 10), exact(300));
    }

    #[test]
    fn parts_dropped_or_replaced_are_not_arrivals() {
        // A partition dropped before the job (outdated, nothing covers them), then the move.
        let parts = [
            part(3, 3, 50, 0, false),
            part(4, 4, 60, 0, false),
            part(12, 12, 300, 1, true),
        ];
        assert_eq!(arrived(&parts, 0), exact(300));
        assert_eq!(arrived(&parts, 0).besides(300), 0);
        // Nothing left at all: nothing arrived.
        assert_eq!(arrived(&parts[..2], 0), exact(0));
    }

    #[test]
    fn a_mutated_arrival_is_counted_once() {
        // A mutation rewrote the arrival in place (same range, same level).
        let parts = [
            part(1, 12, 520, 3, true),
            part(1, 10, 400, 2, false),
            part(12, 12, 300, 1, false),
            part(12, 12, 298, 1, false),
        ];
        let a = arrived(&parts, 10);
        assert!(a.exact && (298..=300).contains(&a.rows), "{a:?}");
    }
}
