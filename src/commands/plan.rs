//! `backfill plan`: a dry run. Pending rows, batch count, where it would resume, and an ETA from
//! sample batches run in a transaction that is rolled back. Writes nothing, creates nothing.

use crate::engine::{Backend, Sizer};
use crate::error::Result;
use crate::progress::fmt_duration;
use crate::redact::outln;
use crate::spec::{Source, Spec};
use crate::state::{JobState, StateStore};
use std::time::Duration;

pub async fn plan(specs: &[Spec], exact: bool, samples: u32) -> Result<()> {
    for spec in specs {
        match &spec.source {
            Source::Postgres(pg) => {
                let (mut backend, store) = crate::postgres::open(spec, pg).await?;
                outln!(
                    "{}  ({}, table {} by {})",
                    spec.name,
                    pg.redacted_url(),
                    pg.table,
                    pg.key
                );
                plan_with(spec, &mut backend, &store, exact, samples).await?;
            }
            Source::Clickhouse(ch) => {
                let (mut backend, store) = crate::clickhouse::open(spec, ch).await?;
                outln!(
                    "{}  ({}, {} -> {} by {})",
                    spec.name,
                    ch.redacted_url(),
                    ch.source,
                    ch.target,
                    ch.time_column
                );
                plan_clickhouse(spec, &mut backend, &store).await?;
            }
        }
    }
    Ok(())
}

async fn plan_with<B: Backend, S: StateStore>(
    spec: &Spec,
    backend: &mut B,
    store: &S,
    exact: bool,
    samples: u32,
) -> Result<()> {
    let state = store.load(&spec.name).await?;
    for b in backend.blockers().await? {
        outln!("  WARNING:      run would refuse to start: {b}");
    }
    backend.preflight().await?;
    let cursor = state.as_ref().and_then(|s| s.cursor.clone());
    outln!("  resume at:    {}", resume_point(state.as_ref()));
    let est = backend.estimate(cursor.as_deref(), exact).await?;
    let pending = est.rows + est.pending_retry;
    outln!(
        "  pending rows: {}{} ({}){}",
        if est.exact { "" } else { "~" },
        est.rows,
        if est.exact {
            "counted"
        } else {
            "planner estimate; --exact counts"
        },
        if est.pending_retry > 0 {
            format!(
                " + {} skipped earlier, waiting for retry",
                est.pending_retry
            )
        } else {
            String::new()
        }
    );
    let size = spec.batch.size;
    outln!("  batches:      {} of {size}", pending.div_ceil(size));
    if samples == 0 || pending == 0 {
        return Ok(());
    }
    let sampled = backend.sample(cursor.as_deref(), size, samples).await?;
    let keys: u64 = sampled.iter().map(|s| s.keys).sum();
    let took: Duration = sampled.iter().map(|s| s.elapsed).sum();
    if keys == 0 {
        outln!("  sample:       no rows to sample");
        return Ok(());
    }
    let rate = keys as f64 / took.as_secs_f64().max(1e-6);
    outln!(
        "  sample:       {} batch(es), {keys} keys in {:.0}ms (rolled back): ~{:.0} rows/s",
        sampled.len(),
        took.as_secs_f64() * 1000.0,
        rate
    );
    let mut sizer = Sizer::new(&spec.batch);
    for s in &sampled {
        sizer.observe(s.keys, s.elapsed);
    }
    // Let the sizer settle on the sampled rate, as it would after a few batches of the run.
    let per_key = took.as_secs_f64() / keys as f64;
    for _ in 0..20 {
        let n = sizer.size();
        sizer.observe(n, Duration::from_secs_f64(per_key * n as f64));
    }
    let settled = sizer.size();
    let batches = pending.div_ceil(settled);
    let eta = Duration::from_secs_f64(per_key * pending as f64) + spec.batch.pause * batches as u32;
    if spec.batch.target.is_zero() {
        outln!("  estimate:     ~{} (fixed size {size})", fmt_duration(eta));
    } else {
        outln!(
            "  estimate:     ~{}; with target {}ms the size should settle near {settled} (~{batches} batches)",
            fmt_duration(eta),
            spec.batch.target.as_millis()
        );
    }
    Ok(())
}

fn resume_point(state: Option<&JobState>) -> String {
    match state {
        None => "the start (no checkpoint yet)".into(),
        Some(s) => format!(
            "{} (status {}, {} keys and {} batches done)",
            s.cursor
                .as_deref()
                .map_or("the start".into(), |c| format!("after key {c}")),
            s.status.as_str(),
            s.keys_done,
            s.batches_done
        ),
    }
}

async fn plan_clickhouse(
    spec: &Spec,
    backend: &mut crate::clickhouse::ChBackend,
    store: &crate::state::clickhouse::ChStateStore,
) -> Result<()> {
    let state = store.load(&spec.name).await?;
    backend.check().await?;
    outln!("  resume at:    {}", resume_point(state.as_ref()));
    let lines = backend.plan().await?;
    let pending: Vec<_> = lines.iter().filter(|l| l.status != "done").collect();
    let rows: u64 = pending.iter().map(|l| l.rows_left).sum();
    outln!(
        "  chunks:       {} top-level, {} to do ({rows} source rows)",
        lines.len(),
        pending.len()
    );
    for l in &lines {
        let rows = l.rows.map_or("?".to_string(), |r| r.to_string());
        outln!(
            "    {:<10} {:>12} rows  {:<8} {}",
            l.label,
            rows,
            l.status,
            l.note
        );
    }
    Ok(())
}
