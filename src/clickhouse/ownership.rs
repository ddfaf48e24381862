//! Whose records a ClickHouse job's state holds: the target's (`database.table`, kept in the
//! job's record) and, with the state in Postgres, the server's, told by the job's home mark
//! beside its target (`landing/home.rs`).

use super::state::StateStore;
use super::store::{self, Record};
use super::{ChJob, landing};
use crate::error::{Error, Result};
use std::collections::BTreeSet;

impl ChJob {
    /// A job's records belong to the target it landed in (recorded at its start): read for
    /// a spec that names another (the same spec run against another database, with the state
    /// in one shared `state_url`; `target` edited mid-job), they would call it done, or
    /// resume it, with chunks that never landed there. Refused, before anything is written
    /// or skipped. (A record from before the target was kept says nothing.)
    ///
    /// The same holds for another server whose database and table have the same names (staging
    /// and prod with one shared `state_url`): the records do not name the server, so a job
    /// kept in Postgres notes a token in its home mark beside the target before its record
    /// names it (`landing/home.rs`), and records naming a token this server lacks are another
    /// server's: refused too. The ledger alone could not tell: this server's ledger may hold
    /// what an earlier, cut-short run of its own noted while the job was finished on the other
    /// server. Records from before the mark was kept fall back to it, partition by partition.
    pub(super) async fn same_target(&self, records: &[Record]) -> Result<()> {
        self.same_target_name(records)?;
        self.same_server(records).await
    }

    /// The server half of `same_target`.
    pub(super) async fn same_server(&self, records: &[Record]) -> Result<()> {
        if !matches!(self.ctx.store, StateStore::Postgres { .. }) {
            return Ok(());
        }
        if let Some(kept) = kept_home(records) {
            if self.ctx.landing.homes().await?.contains(&kept) {
                return Ok(());
            }
            return Err(Error::Spec(format!(
                "clickhouse.url: the state of job {} belongs to a run on another server whose \
                 database and table have the same names ({}), sharing this `state_url` \
                 (staging and prod): this server holds no mark {kept} in {}. Give each \
                 server's job a name of its own (`backfill reset` here forgets the other \
                 server's records; its next run there starts the job over). If this is the \
                 server the job ran on and its tables beside the target were dropped, its rows \
                 are in the target with nothing left to tell which: a new run, even after a \
                 reset, would land them again on top",
                self.ctx.job,
                self.target_name(),
                self.ctx.landing.home_name()
            )));
        }
        // A record from before the job kept its home mark: the ledger says what landed here.
        let landed: Vec<&Record> = records
            .iter()
            .filter(|r| !r.chunk.is_empty() && r.status == store::DONE && r.rows > 0)
            .collect();
        if landed.is_empty() {
            return Ok(());
        }
        let ledger = self.ctx.landing.touched().await?;
        // A record from before partitions were kept names none: any ledger at all then.
        let unnoted: BTreeSet<&str> = landed
            .iter()
            .flat_map(|r| {
                let rows = r.part_rows.iter().copied().chain(std::iter::repeat(1));
                r.partitions.iter().zip(rows).filter(|(_, n)| *n > 0)
            })
            .map(|(p, _)| p.as_str())
            .filter(|p| !ledger.contains_key(*p))
            .collect();
        let bare = landed.iter().any(|r| r.partitions.is_empty()) && ledger.is_empty();
        if unnoted.is_empty() && !bare {
            return Ok(());
        }
        if let Some(legacy) = self.ctx.landing.legacy_tables().await? {
            return Err(self.ctx.landing.legacy_refusal(&legacy, &self.ctx.job));
        }
        let which = if unnoted.is_empty() {
            "its chunks".to_string()
        } else {
            format!(
                "partition(s) {}",
                unnoted.iter().copied().collect::<Vec<_>>().join(", ")
            )
        };
        Err(Error::Spec(format!(
            "clickhouse.url: the state of job {} says {} chunk(s) with rows landed in {}, \
             but this server's ledger beside that table ({}) holds no note of {which}: they \
             landed on another server whose database and table have the same names, sharing \
             this `state_url` (staging and prod). Give each server's job a name of its own \
             (`backfill reset` here forgets the other server's records). If this is the server \
             it ran on and the ledger was dropped, its rows are in the target already: a new \
             run, even after a reset, would land them again on top",
            self.ctx.job,
            landed.len(),
            self.target_name(),
            self.ctx.landing.ledger_name()
        )))
    }

    /// The token of the job's home mark (state in Postgres only, see `same_target`): the one
    /// its record keeps (`begin` has checked, under the lock, that this server holds it), else
    /// a new one, noted on this server before the job's record names it.
    pub(super) async fn home(&self, records: &[Record]) -> Result<Option<String>> {
        if !matches!(self.ctx.store, StateStore::Postgres { .. }) {
            return Ok(None);
        }
        if let Some(kept) = kept_home(records) {
            return Ok(Some(kept));
        }
        let token = landing::new_token();
        self.ctx.landing.note_home(&token).await?;
        Ok(Some(token))
    }

    pub(super) fn same_target_name(&self, records: &[Record]) -> Result<()> {
        let kept = store::job_def(records, "target");
        match kept {
            Some(kept) if kept != self.target_name() => Err(Error::Spec(format!(
                "clickhouse.target: job {} has landed its chunks in {kept}, and its state says \
                 which are done there; this spec names {}, where none of them landed. Give \
                 this target a job of its own (another `name`), or run the spec that names \
                 {kept} (to finish it, or `backfill reset` it)",
                self.ctx.job,
                self.target_name()
            ))),
            _ => Ok(()),
        }
    }
}

/// The home-mark token the job's record keeps (none before the mark was kept, or with the
/// state in ClickHouse).
fn kept_home(records: &[Record]) -> Option<String> {
    store::job_def(records, "home")
}
