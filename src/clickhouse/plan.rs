//! `plan` for a ClickHouse job: the top chunks with their source rows and state, which would
//! start lighter or a rung lower because of what earlier attempts learned, and whether the job
//! holds the target (or another job does). Reads only.

use super::store::{DONE, SPLIT};
use super::tree::Tree;
use super::{ChJob, store};
use crate::engine::Backend;
use crate::engine::plan::{Plan, PlanOptions, UnitPlan};
use crate::error::Result;

pub async fn plan(job: &ChJob, _opts: PlanOptions) -> Result<Plan> {
    let ctx = &job.ctx;
    let (database, target) = job.describe();
    let records = ctx.store.records(&ctx.job).await?;
    let state = store::job_state(&ctx.job, &records, false);
    let mut plan = Plan {
        job: ctx.job.clone(),
        database,
        target,
        status: state
            .as_ref()
            .map_or("pending".into(), |s| s.status.as_str().to_string()),
        resume: state
            .as_ref()
            .and_then(|s| s.resume.clone())
            .unwrap_or_else(|| "the start (no checkpoint yet)".into()),
        pending_exact: true,
        keys_done: state.as_ref().map_or(0, |s| s.keys_done),
        batches_done: state.as_ref().map_or(0, |s| s.batches_done),
        ..Plan::default()
    };
    if state
        .as_ref()
        .is_some_and(|s| s.status == crate::state::Status::Done)
    {
        plan.skip = Some(
            if state.as_ref().is_some_and(|s| s.spec_hash == ctx.spec_hash) {
                "done: run would skip this job (use --rerun to run it again)".into()
            } else {
                "done, but its spec changed since: run would skip it unless --rerun".into()
            },
        );
        return Ok(plan);
    }
    job.preflight_readonly().await?;
    let touched = ctx.landing.touched().await?;
    if state.is_none() && !touched.is_empty() {
        plan.notes.push(format!(
            "no checkpoint, but the job landed in {} partition(s) of the target before (a \
             reset or a lost state table): run first restores them to what they held before it",
            touched.len()
        ));
    }
    let range = job.range(&records).await?;
    let top = job.top(range).await?;
    let tree = Tree::new(&ctx.spec, top.clone(), records, Default::default());
    let (normal, light) = tree.learned();
    let mut pending = 0u64;
    for c in &top {
        let id = c.id(&ctx.spec);
        let rec = tree.records.get(&id);
        // Rows of its finished pieces (days, value ranges) below it.
        let pieces: u64 = tree
            .records
            .values()
            .filter(|r| r.status == DONE && r.chunk != id)
            .filter(|r| {
                r.chunk.starts_with(&format!("{id}-")) || r.chunk.starts_with(&format!("{id}/"))
            })
            .map(|r| r.source_rows)
            .sum();
        let status = rec.map_or("pending".to_string(), |r| r.status.clone());
        let left = match status.as_str() {
            DONE => 0,
            _ => c.rows.unwrap_or(0).saturating_sub(pieces),
        };
        pending += left;
        let level = c.level_name().to_string();
        let note = match (status.as_str(), c.rows) {
            (DONE, _) => String::new(),
            (SPLIT, _) => {
                format!("split earlier: resumes with its unfinished pieces ({left} rows)")
            }
            (_, Some(n)) if light.get(&level).is_some_and(|l| n >= *l) => format!(
                "{n} rows >= {} rows of a chunk that ran out of memory even with lighter \
                 settings: starts a rung lower",
                light[&level]
            ),
            (_, Some(n)) if normal.get(&level).is_some_and(|l| n >= *l) => format!(
                "{n} rows >= {} rows of a chunk that ran out of memory: starts with lighter \
                 settings",
                normal[&level]
            ),
            _ => "one query".into(),
        };
        plan.units.push(UnitPlan {
            unit: id,
            rows: c.rows,
            status,
            note,
        });
    }
    plan.pending_rows = pending;
    plan.batches = plan.units.iter().filter(|u| u.status != DONE).count() as u64;
    Ok(plan)
}
