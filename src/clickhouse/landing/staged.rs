//! What each staging table held when its landing began (18.16, which lands by attaching
//! copies): the names of its active parts per partition, kept in `<prefix>_landings` beside the
//! target. A replay compares the staged parts with their copies in the target; that comparison
//! holds only while the staging table's parts are the ones that were attached. Its merges stop
//! before the names are noted, so a replay that finds the same names knows the parts are those
//! the landing attached (or was about to), even when they are themselves merge products of the
//! insert. Without the note, a chunk whose staging table merged before its landing and whose
//! attach never reached the server was refused for good as soon as anything else (another
//! writer, another chunk) had a part above the chunk's mark.

use super::Landing;
use crate::clickhouse::client::{exec, exec_repeatable, fetch_text, literal, rows};
use crate::error::{DbErrorKind, Error, Result};
use std::collections::HashMap;
use std::time::Duration;

/// How long to wait for a staging table's running merges to end once new ones are stopped.
const MERGES_WAIT: Duration = Duration::from_secs(600);

/// Partition id -> the names of a staging table's active parts in it, sorted.
pub(super) type Names = HashMap<String, Vec<String>>;

/// What the notes say of one partition of a staging table.
#[derive(Debug, Default, Clone)]
pub(super) struct Noted {
    /// Its parts' names when its landing began, sorted.
    pub parts: Vec<String>,
    /// Whether its attach went in, as noted (see `note_outcome`).
    pub outcome: Outcome,
}

/// Whether a staging table's attach of a partition went in, as the notes say.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Nothing noted: no attach of it has gone in, unless the ledger still has it under way.
    #[default]
    Unknown,
    /// Its attach went in (noted by the landing itself, or settled by another chunk's).
    Landed,
    /// Settled by another chunk's landing: it had not gone in.
    NotLanded,
    /// Another chunk's landing could not tell (merges ran): the replay compares again.
    Unsure,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Unknown => "",
            Outcome::Landed => "landed",
            Outcome::NotLanded => "not landed",
            Outcome::Unsure => "unsure",
        }
    }

    fn parse(s: &str) -> Outcome {
        match s {
            "landed" => Outcome::Landed,
            "not landed" => Outcome::NotLanded,
            "unsure" => Outcome::Unsure,
            _ => Outcome::Unknown,
        }
    }
}

impl Landing {
    pub(super) fn landings(&self) -> String {
        self.q(&format!("{}_landings", self.prefix))
    }

    /// The names of `table`'s active parts, by partition.
    async fn part_names(&self, table: &str) -> Result<Names> {
        let bare = table.replace('`', "");
        let (db, name) = bare.split_once('.').unwrap_or(("", &bare));
        let sql = format!(
            "SELECT partition_id, name FROM system.parts
              WHERE database = {} AND table = {} AND active",
            literal(db),
            literal(name)
        );
        let mut names = Names::new();
        for r in rows(&self.client, &sql, "reading a table's parts").await? {
            if let (Some(p), Some(n)) = (r.first(), r.get(1)) {
                names.entry(p.clone()).or_default().push(n.clone());
            }
        }
        names.values_mut().for_each(|v| v.sort());
        Ok(names)
    }

    /// Stop `table`'s merges and wait (bounded) until none of its merges runs.
    pub(super) async fn pause_merges_of(&self, table: &str) -> Result<()> {
        exec_repeatable(
            &self.client,
            &format!("SYSTEM STOP MERGES {table}"),
            "stopping merges",
        )
        .await?;
        let bare = table.replace('`', "");
        let (db, name) = bare.split_once('.').unwrap_or(("", &bare));
        let running = format!(
            "SELECT count() FROM system.merges WHERE database = {} AND table = {}",
            literal(db),
            literal(name)
        );
        let started = std::time::Instant::now();
        while fetch_text(&self.client, &running, "waiting for merges")
            .await?
            .trim()
            != "0"
        {
            if started.elapsed() > MERGES_WAIT {
                return Err(Error::Db {
                    message: format!(
                        "a merge of {table} is still running {}s after merges were stopped",
                        MERGES_WAIT.as_secs()
                    ),
                    kind: DbErrorKind::Transient,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Before a chunk's first attach (18.16): stop the staging table's merges and note the
    /// names of its parts. Written in one insert, before anything of the chunk is attached; a
    /// later landing of the same staging table (the chunk inserted again after `run --rerun`)
    /// replaces the note.
    pub async fn note_staged(&self, staging: &str) -> Result<()> {
        if self.moves() {
            return Ok(());
        }
        self.pause_merges_of(staging).await?;
        let names = self.part_names(staging).await?;
        if names.is_empty() {
            return Ok(());
        }
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {} (staging String, partition String,
                 parts Array(String), outcome String, version UInt64)
             ENGINE = ReplacingMergeTree(version) ORDER BY (staging, partition)",
            self.landings()
        );
        exec_repeatable(&self.client, &create, "creating the job's landing notes").await?;
        let notes: Vec<(String, Noted)> = names
            .into_iter()
            .map(|(p, parts)| {
                let outcome = Outcome::Unknown;
                (p, Noted { parts, outcome })
            })
            .collect();
        self.write_notes(staging, &notes).await
    }

    /// One row per partition, in one insert.
    async fn write_notes(&self, staging: &str, rows: &[(String, Noted)]) -> Result<()> {
        let version = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0).max(0);
        let values: Vec<String> = rows
            .iter()
            .map(|(p, n)| {
                let list: Vec<String> = n.parts.iter().map(|x| literal(x)).collect();
                format!(
                    "({}, {}, [{}], {}, {version})",
                    literal(staging),
                    literal(p),
                    list.join(", "),
                    literal(n.outcome.as_str())
                )
            })
            .collect();
        let sql = format!(
            "INSERT INTO {} (staging, partition, parts, outcome, version) VALUES {}",
            self.landings(),
            values.join(", ")
        );
        exec(&self.client, &sql, "noting the staged parts").await
    }

    /// Before a landing writes into partition `p` (18.16): if the ledger `t` still has
    /// another staging table's attach under way there, tell whether it went in and note it.
    pub(super) async fn settle_other(
        &self,
        p: &str,
        t: &super::Touched,
        staging: &str,
    ) -> Result<()> {
        let other = t.moving_from.as_str();
        if other.is_empty()
            || other == staging
            || other == super::ledger::KEEPING
            || other == self.base()
            || !self.exists(other).await?
        {
            return Ok(());
        }
        let notes = self.staged_notes(other).await?;
        let names = notes.get(p).map(|n| &n.parts);
        let found = self
            .found(other, p, t.last_block, t.last_block, names)
            .await?;
        let outcome = match found {
            super::replay::Found::Landed { .. } => Outcome::Landed,
            super::replay::Found::NotLanded => Outcome::NotLanded,
            super::replay::Found::Unsure => Outcome::Unsure,
        };
        self.note_outcome(other, p, outcome, &notes).await
    }

    /// Note whether `staging`'s attach of partition `p` went in (18.16). A landing notes
    /// `Landed` right after each of its attaches, before the ledger's note after it; another
    /// chunk's landing, finding the attach still under way in the ledger, settles it before
    /// its own note replaces that one. So once the ledger no longer has the attach under way,
    /// the notes say whether it went in, and nothing noted means it did not: the target's
    /// parts above the chunk's mark cannot tell when another chunk's are alike row for row
    /// (one nightly row a day, say), and the replay took the other chunk's part for its own.
    /// `noted`: `staging`'s notes as read already (their parts never change once its landing
    /// began; only outcomes are noted since, and this one replaces them).
    pub(super) async fn note_outcome(
        &self,
        staging: &str,
        p: &str,
        outcome: Outcome,
        noted: &HashMap<String, Noted>,
    ) -> Result<()> {
        let Some(n) = noted.get(p) else {
            // Its landing noted nothing (an earlier version staged it): no replay will read it.
            return Ok(());
        };
        let n = Noted {
            parts: n.parts.clone(),
            outcome,
        };
        self.write_notes(staging, &[(p.to_string(), n)]).await
    }

    /// What `note_staged` noted of `staging` (empty when nothing was: a chunk staged by an
    /// earlier version, or one killed before its note, which then attached nothing).
    pub(super) async fn staged_notes(&self, staging: &str) -> Result<HashMap<String, Noted>> {
        if !self.exists(&self.landings()).await? {
            return Ok(HashMap::new());
        }
        let sql = format!(
            "SELECT partition, arrayStringConcat(argMax(parts, version), ' '),
                    argMax(outcome, version)
               FROM {} WHERE staging = {} GROUP BY partition",
            self.landings(),
            literal(staging)
        );
        Ok(rows(&self.client, &sql, "reading the job's landing notes")
            .await?
            .into_iter()
            .filter_map(|r| {
                let mut parts: Vec<String> =
                    r.get(1)?.split_whitespace().map(str::to_string).collect();
                parts.sort();
                let outcome = Outcome::parse(r.get(2)?);
                Some((r.first()?.clone(), Noted { parts, outcome }))
            })
            .collect())
    }
}
