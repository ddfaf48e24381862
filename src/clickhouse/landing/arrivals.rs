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
use std::collections::HashMap;

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
/// (active and outdated, those whose range ends above `since`). Exact while every active part above `since` that a merge
/// made still has the arrivals it took in listed at its ends; else every active row above
/// `since`, not exact.
pub(super) fn arrived(parts: &[Part], since: i64) -> Arrived {
    let active: Vec<&Part> = parts.iter().filter(|x| x.active && x.max > since).collect();
    let every: u64 = active.iter().map(|x| x.rows).sum();
    // Each arrival took one block number (a moved or attached part keeps its level, a
    // mutation its range): its first form is the lowest-level part of that single block. Only
    // arrivals still in the table count: an outdated part no active part covers was dropped
    // or replaced (a partition dropped before the job, a restore), its rows gone.
    let present = |b: i64| active.iter().any(|a| a.min <= b && b <= a.max);
    let mut first: HashMap<i64, Part> = HashMap::new();
    for x in parts
        .iter()
        .filter(|x| x.min == x.max && x.min > since && present(x.min))
    {
        let e = first.entry(x.min).or_insert(*x);
        if (x.level, !x.active) < (e.level, !e.active) {
            *e = *x;
        }
    }
    let listed = |b: i64| first.contains_key(&b);
    let known = active
        .iter()
        .all(|x| x.min == x.max || (listed(x.max) && (x.min <= since || listed(x.min))));
    if !known {
        return Arrived {
            rows: every,
            exact: false,
        };
    }
    let firsts: u64 = first.values().map(|x| x.rows).sum();
    let spans = active.iter().any(|x| x.min <= since);
    Arrived {
        // Spanning the old top, a merged part's rows are mostly old ones.
        rows: if spans { firsts } else { firsts.max(every) },
        exact: true,
    }
}

impl Landing {
    /// Rows that arrived in partition `p` of the target above block `since` (`arrived`). Not
    /// exact, every row of the active parts above it, and `besides` counts at least one as
    /// another writer's: too many is a refusal to start over that an operator can lift, too
    /// few is another writer's rows dropped by a restore.
    pub(super) async fn arrived_since(&self, p: &str, since: i64) -> Result<Arrived> {
        let sql = format!(
            "SELECT min_block_number, max_block_number, rows, level, active FROM system.parts
              WHERE database = {} AND table = {} AND partition_id = {}
                AND max_block_number > {since}",
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
        Ok(arrived(&parts, since))
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
            part(12, 12, 300, 1, false),
            part(12, 12, 298, 1, false),
        ];
        let a = arrived(&parts, 10);
        assert!(a.exact && (298..=300).contains(&a.rows), "{a:?}");
    }
}
