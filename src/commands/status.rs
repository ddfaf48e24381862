//! `backfill status`: what the checkpoint store says about each job, as text or JSON.

use crate::error::Result;
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
}

pub async fn status(specs: &[Spec], json: bool) -> Result<()> {
    let mut states = Vec::new();
    for spec in specs {
        let state = match &spec.source {
            Source::Postgres(pg) => {
                let (_, store) = crate::postgres::open(spec, pg).await?;
                store.load(&spec.name).await?
            }
            Source::Clickhouse(ch) => {
                let (_, store) = crate::clickhouse::open(spec, ch).await?;
                store.load(&spec.name).await?
            }
        };
        states.push(state);
    }
    let entries: Vec<Entry> = specs
        .iter()
        .zip(&states)
        .map(|(spec, state)| Entry {
            job: &spec.name,
            spec: spec.file.display().to_string(),
            database: spec.source.redacted_url(),
            status: state.as_ref().map_or("pending", |s| s.status.as_str()),
            spec_changed: state.as_ref().is_some_and(|s| s.spec_hash != spec.hash),
            state: state.as_ref(),
        })
        .collect();
    if json {
        let doc = serde_json::json!({ "jobs": entries });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).expect("serializable")
        );
        return Ok(());
    }
    for e in &entries {
        println!("{}  [{}]  {}", e.job, e.status, e.database);
        let Some(s) = e.state else {
            println!("    no checkpoint yet");
            continue;
        };
        println!(
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
        println!(
            "    started {}  updated {}  finished {}  runner {}",
            t(&s.started_at),
            t(&s.updated_at),
            t(&s.finished_at),
            s.runner.as_deref().unwrap_or("-")
        );
        if e.spec_changed {
            println!("    spec changed since the checkpoint was written");
        }
        if let Some(err) = &s.last_error {
            println!("    last error: {err}");
        }
    }
    Ok(())
}
