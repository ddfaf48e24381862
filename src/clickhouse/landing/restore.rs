//! Starting a job over: every partition the job touched goes back to what it held before the
//! job (from the base table), unless another writer has written into it since; on 18.16, only
//! once the replaced parts are off disk.

use super::ledger::KEEPING;
use super::{CLEANUP_WAIT, Landing, Touched};
use crate::clickhouse::client::{exec, literal, number, rows};
use crate::error::{DbErrorKind, Error, Result};
use std::time::{Duration, Instant};

impl Landing {
    /// Wait until no part that a replace or drop removed from partition `p` of the target is
    /// left on disk (18.16 would load it again at a restart: rows doubled). Parts that merges
    /// made obsolete are covered by the merged part and are never loaded again. `mark`: the
    /// partition's top block before the restore wrote; every part the write removed lies at or
    /// under it, everything the write put there lies above it. An active part reaching down to
    /// it is a removed part loaded again (the server restarted before it left the disk): the
    /// wait ends with a retryable error, and the restore, retried, replaces it again.
    async fn wait_replaced_gone(&self, p: &str, mark: i64) -> Result<()> {
        if self.moves() {
            return Ok(());
        }
        let back = format!(
            "SELECT count() FROM system.parts
              WHERE database = {} AND table = {} AND partition_id = {} AND active
                AND min_block_number <= {mark}",
            literal(&self.db),
            literal(&self.target_name),
            literal(p)
        );
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
            let came_back = number(&self.client, &back, "waiting for replaced parts").await?;
            if came_back > 0 {
                return Err(Error::Db {
                    message: format!(
                        "{came_back} part(s) the restore replaced in partition {p} of {} are \
                         active again (the server restarted before they left the disk); the \
                         partition is restored again",
                        self.target()
                    ),
                    kind: DbErrorKind::Transient,
                });
            }
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

    /// Refuse to restore when another writer has written into a partition the job touched:
    /// restoring would drop its rows.
    async fn check_no_foreign(
        &self,
        ledger: &std::collections::HashMap<String, Touched>,
    ) -> Result<()> {
        for (p, t) in ledger.iter().filter(|(_, t)| t.moving_from != KEEPING) {
            self.check_partition(p, t).await?;
        }
        Ok(())
    }

    /// Refuse if partition `p` holds rows another writer put there since the job last noted it.
    async fn check_partition(&self, p: &str, t: &Touched) -> Result<()> {
        let others = t.foreign_rows + self.since_noted(p, t).await?;
        if others > 0 {
            return Err(self.foreign_refusal(p, others));
        }
        Ok(())
    }

    fn foreign_refusal(&self, p: &str, others: u64) -> Error {
        Error::Preflight(format!(
            "partition {p} of {} holds {others} row(s) another writer put there while this job \
             had landed chunks in it; starting the job over would restore the partition to \
             what it held before the job and drop them. Copy them elsewhere if they are needed, \
             then `backfill reset --yes --discard-foreign-rows` the job and run again \
             (dropping the base and ledger tables instead would land every chunk again on top \
             of the first landing)",
            self.target(),
        ))
    }

    /// Put every partition the job has touched back to what it held before the job (a new
    /// start after a --rerun, a reset, or a lost state table). Refuses if another writer wrote
    /// into one since: restoring would drop its rows.
    pub async fn restore(&self) -> Result<usize> {
        let ledger = self.touched().await?;
        if ledger.is_empty() {
            return Ok(0);
        }
        let base = self.parts(&self.base()).await?;
        // Merges paused first (up to 10 minutes until a running one ends): the check for
        // other writers' rows, and the read of each partition's top that counts what is under
        // it as the job's, come after that wait, never before it; and no merge folds the
        // base's copies with other writers' new parts before the count after each replace.
        self.pause_merges().await?;
        let mut replaced = Vec::new();
        let restored = self.restore_partitions(&ledger, &base, &mut replaced).await;
        // Merges start again when the restore is done or refused; a write that failed leaves
        // them paused for its retry (the job's record says they are stopped), which waits.
        let ended = matches!(restored, Ok(()) | Err(Error::Preflight(_)));
        if ended {
            self.resume_merges().await?;
        }
        // Refused part-way too: what was replaced must be off disk before the run ends (a
        // restart would load it again).
        if ended {
            for (p, mark) in &replaced {
                self.wait_replaced_gone(p, *mark).await?;
            }
        }
        restored?;
        Ok(ledger.len())
    }

    /// `restore`'s writes, merges paused on 18.16. Another writer can write at any moment, so
    /// each partition is checked again right before its own write, with its note under way in
    /// place: a row that arrives while earlier partitions are restored refuses the restore
    /// there, where a single check up front let the replace drop it silently (what is left is
    /// the one request between the last check and the replace).
    async fn restore_partitions(
        &self,
        ledger: &std::collections::HashMap<String, Touched>,
        base: &super::Parts,
        replaced: &mut Vec<(String, i64)>,
    ) -> Result<()> {
        self.check_no_foreign(ledger).await?;
        for (p, t) in ledger {
            // Being copied into the base when a run was killed: the job has not written there,
            // and what the base holds of it may be nothing yet.
            if t.moving_from == KEEPING {
                continue;
            }
            // The partition's top now is the job's (no other writer's rows, checked just
            // before): whatever the replace or drop leaves above it is the base's copies (new
            // block numbers) and other writers' rows that arrive from then on.
            self.check_partition(p, t).await?;
            let now = self.parts(&self.target()).await?;
            let mark = t.last_block.max(now.get(p).map_or(t.last_block, |x| x.1));
            let own = base.get(p).map_or(0, |x| x.0);
            let sql = if own > 0 {
                // Noted before the replace: killed before the note after it, the base's copies
                // would count as another writer's rows and the next start would refuse
                // (`unnoted_own`).
                let restoring = Touched {
                    last_block: mark,
                    moving_rows: own,
                    moving_from: self.base(),
                    ..t.clone()
                };
                self.note_moving(p, &restoring).await?;
                // Rows that arrived while the note was written are above the mark: refused,
                // the note taken back (the replace will not be made).
                let arrived = self.arrived_since(p, mark).await?.besides(0);
                if arrived > 0 {
                    self.note(p, t).await?;
                    return Err(self.foreign_refusal(p, arrived));
                }
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
            replaced.push((p.clone(), mark));
            exec(
                &self.client,
                &sql,
                "restoring a partition the job had landed in",
            )
            .await?;
            // Noted at once (merges are still paused, so the count is exact; the top comes
            // from the read that counted, so every row up to it is counted once): rows another
            // writer puts there from now on, while replaced parts leave the disk say, stay
            // above the noted block and count as theirs.
            let (arrived, top) = self.arrived_and_top(p, mark).await?;
            let arrived = arrived.besides(own);
            let mut t = t.clone();
            if arrived > 0 {
                self.warn_foreign(p, arrived);
                t.foreign_rows += arrived;
            }
            t.last_block = top.unwrap_or(mark).max(mark);
            t.moving_rows = 0;
            t.moving_from.clear();
            self.note(p, &t).await?;
        }
        Ok(())
    }

    /// Take every row other writers put into the partitions the job touched as the job's own,
    /// so that the next restore drops them with the job's rows (`reset --discard-foreign-rows`,
    /// the operator's decision). Returns how many rows that is.
    pub async fn adopt_foreign(&self) -> Result<u64> {
        let target = self.parts(&self.target()).await?;
        let mut adopted = 0;
        for (p, t) in self.touched().await? {
            let others = t.foreign_rows + self.since_noted(&p, &t).await?;
            if others == 0 {
                continue;
            }
            let top = target.get(&p).map_or(t.last_block, |x| x.1);
            // A copy into the base under way stays noted (the next run makes it).
            let keeping = if t.moving_from == KEEPING {
                KEEPING.to_string()
            } else {
                String::new()
            };
            let t = Touched {
                last_block: t.last_block.max(top),
                foreign_rows: 0,
                moving_rows: 0,
                moving_from: keeping,
                ..t
            };
            self.note(&p, &t).await?;
            adopted += others;
        }
        Ok(adopted)
    }
}
