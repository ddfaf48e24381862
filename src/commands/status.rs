//! `backfill status`: what the checkpoint store says about each job, as text or JSON.

use crate::error::Result;
use crate::redact::outln;
use crate::spec::{Source, Spec};
use crate::state::{JobState, StateStore};
use serde::Serialize;

#[derive(Serialize)]
struct Entry<'a> {
    job: &'a str,
    spec: String,
    database: String,
    /// `pending` when the store has no record yet.
    status: &'a str,
    spec_changed: bool,
    #[serde(flatten)]
    state: Option<&'a JobState>,
    /// ClickHouse jobs: one entry per chunk attempted (months, days, split groups).
    #[serde(skip_serializing_if = "Option::is_none")]
    chunks: Option<Vec<Chunk>>,
}

#[derive(Serialize)]
struct Chunk {
    chunk: String,
    level: String,
    status: String,
    rows: u64,
    source_rows: u64,
    attempts: u32,
    memory_bytes: u64,
    error: String,
}

impl From<crate::state::clickhouse::Record> for Chunk {
    fn from(r: crate::state::clickhouse::Record) -> Chunk {
        Chunk {
            chunk: r.chunk,
            level: r.level,
            status: r.status,
            rows: r.rows,
            source_rows: r.source_rows,
            attempts: r.attempts,
            memory_bytes: r.memory_bytes,
            error: r.error,
        }
    }
}

pub async fn status(specs: &[Spec], json: bool) -> Result<()> {
    let mut states = Vec::new();
    let mut chunks = Vec::new();
    for spec in specs {
        let (state, chunk_list) = match &spec.source {
            Source::Postgres(pg) => {
                let (_, store) = crate::postgres::open(spec, pg).await?;
                (store.load(&spec.name).await?, None)
            }
            Source::Clickhouse(ch) => {
                let (_, store) = crate::clickhouse::open(spec, ch).await?;
                let list = store
                    .records(&spec.name)
                    .await?
                    .into_iter()
                    .filter(|r| !r.chunk.is_empty() && !r.chunk.starts_with('#'))
                    .map(Chunk::from)
                    .collect();
                (store.load(&spec.name).await?, Some(list))
            }
        };
        states.push(state);
        chunks.push(chunk_list);
    }
    let entries: Vec<Entry> = specs
        .iter()
        .zip(&states)
        .zip(chunks)
        .map(|((spec, state), chunks)| Entry {
            job: &spec.name,
            spec: spec.file.display().to_string(),
            database: spec.source.redacted_url(),
            status: state.as_ref().map_or("pending", |s| s.status.as_str()),
            spec_changed: state.as_ref().is_some_and(|s| s.spec_hash != spec.hash),
            state: state.as_ref(),
            chunks,
        })
        .collect();
    if json {
        let doc = serde_json::json!({ "jobs": entries });
        outln!(
            "{}",
            serde_json::to_string_pretty(&doc).expect("serializable")
        );
        return Ok(());
    }
    for e in &entries {
        outln!("{}  [{}]  {}", e.job, e.status, e.database);
        let Some(s) = e.state else {
            outln!("    no checkpoint yet");
            continue;
        };
        outln!(
            "    cursor {}  keys {}  rows {}  batches {}  retried {}  waiting for retry {}",
            s.cursor.as_deref().unwrap_or("(start)"),
            s.keys_done,
            s.rows_done,
            s.batches_done,
            s.rows_retried,
            s.rows_pending_retry
        );
        let t = |v: &Option<chrono::DateTime<chrono::Utc>>| {
            v.map_or("-".to_string(), |d| {
                d.format("%Y-%m-%d %H:%M:%S UTC").to_string()
            })
        };
        outln!(
            "    started {}  updated {}  finished {}  runner {}",
            t(&s.started_at),
            t(&s.updated_at),
            t(&s.finished_at),
            s.runner.as_deref().unwrap_or("-")
        );
        if e.spec_changed {
            outln!("    spec changed since the checkpoint was written");
        }
        if let Some(err) = &s.last_error {
            outln!("    last error: {err}");
        }
        if let Some(chunks) = &e.chunks {
            print_chunks(chunks);
        }
    }
    Ok(())
}

/// Counts by status, then every chunk that was split, failed or is staged, with its reason.
fn print_chunks(chunks: &[Chunk]) {
    let mut by_status = std::collections::BTreeMap::<&str, usize>::new();
    for c in chunks {
        *by_status.entry(c.status.as_str()).or_default() += 1;
    }
    let counts: Vec<String> = by_status.iter().map(|(s, n)| format!("{n} {s}")).collect();
    outln!("    chunks: {}", counts.join(", "));
    for c in chunks.iter().filter(|c| c.status != "done") {
        let why: String = c.error.chars().take(160).collect();
        outln!(
            "      {:<28} {:<6} {:<7} attempts {}  {}",
            c.chunk,
            c.level,
            c.status,
            c.attempts,
            why
        );
    }
}
