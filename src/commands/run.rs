//! `backfill run`: jobs in order; stops at the first job that fails or stops early.

use crate::engine::{Gate, Ran, RunOptions, Stop, run_with};
use crate::error::Result;
use crate::redact::outln;
use crate::spec::{Source, Spec};
use std::time::Duration;

pub async fn run(specs: &[Spec], max_runtime: Option<Duration>, opts: &RunOptions) -> Result<()> {
    let stop = Stop::install().with_deadline(max_runtime);
    let (mut ran, mut skipped) = (0, 0);
    for spec in specs {
        let report = match &spec.source {
            Source::Postgres(pg) => run_postgres(spec, pg, opts, &stop).await,
            Source::Clickhouse(ch) => run_clickhouse(spec, ch, opts, &stop).await,
        };
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                outln!("{}: not started ({})", spec.name, spec.file.display());
                outln!("{ran} run, {skipped} skipped");
                return Err(e);
            }
        };
        outln!("{}", report.summary());
        match report.ran {
            Ran::Skipped { .. } => skipped += 1,
            Ran::Worked { error, .. } => {
                ran += 1;
                if let Some(e) = error {
                    outln!("{ran} run, {skipped} skipped");
                    return Err(e);
                }
            }
        }
    }
    outln!("{ran} run, {skipped} skipped");
    Ok(())
}

async fn run_postgres(
    spec: &Spec,
    pg: &crate::spec::PostgresSpec,
    opts: &RunOptions,
    stop: &Stop,
) -> Result<crate::engine::JobReport> {
    let (mut backend, store) = crate::postgres::open(spec, pg).await?;
    let gate = match &spec.throttle {
        Some(t) => Some(Gate::start(backend.throttle_probe(t.clone()), t.interval).await?),
        None => None,
    };
    run_with(spec, &mut backend, &store, opts, stop, gate.as_ref()).await
}

async fn run_clickhouse(
    spec: &Spec,
    ch: &crate::spec::ClickhouseSpec,
    opts: &RunOptions,
    stop: &Stop,
) -> Result<crate::engine::JobReport> {
    let (mut backend, store) = crate::clickhouse::open(spec, ch).await?;
    run_with(spec, &mut backend, &store, opts, stop, None).await
}
