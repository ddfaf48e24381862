//! The subcommands: each loads its specs (any bad spec stops everything with exit 2 before a
//! database is touched) and then does its one thing. The one place that chooses a backend by
//! the spec's database is `with_backend`; commands only see the `Backend` trait.

mod control;
mod plan;
mod reset;
mod run;
mod status;
mod validate;

use crate::cli::Command;
use crate::engine::Backend;
use crate::error::Result;
use crate::postgres::Access;
use crate::spec::{Env, Source, Spec, expand_paths, load_file};
use std::path::PathBuf;

pub async fn execute(command: Command) -> Result<()> {
    match command {
        Command::Run {
            specs,
            max_runtime,
            rerun,
            ignore_preflight,
            metrics_addr,
            pushgateway,
            push_interval,
            progress_interval,
            workers,
        } => {
            let opts = crate::engine::RunOptions {
                rerun,
                ignore_preflight,
                progress_every: progress_interval,
                workers,
            };
            let specs = load_all(&specs)?;
            let exporter =
                crate::metrics::install(metrics_addr, pushgateway.as_deref(), push_interval)?;
            let result = run::run(&specs, max_runtime, &opts).await;
            exporter.finish().await;
            result
        }
        Command::Plan {
            specs,
            exact,
            samples,
            json,
        } => plan::plan(&load_all(&specs)?, exact, samples, json).await,
        Command::Status {
            specs,
            json,
            watch,
            interval,
        } => status::status(&load_all(&specs)?, json, watch, interval).await,
        Command::Verify { specs } => control::verify(&load_all(&specs)?).await,
        Command::Pause { specs } => control::pause(&load_all(&specs)?, true).await,
        Command::Unpause { specs } => control::pause(&load_all(&specs)?, false).await,
        Command::Validate { specs } => validate::validate(&specs),
        Command::Reset {
            spec,
            yes,
            discard_foreign_rows,
        } => reset::reset(&spec, yes, discard_foreign_rows).await,
    }
}

/// Something a command does with one job's backend, whatever its database.
#[allow(async_fn_in_trait)]
pub(crate) trait OnJob {
    type Out;
    async fn call<B: Backend>(self, spec: &Spec, backend: B) -> Result<Self::Out>;
    /// What ends opening the backend early (`run`'s signals and deadlines); none by default.
    fn stop(&self) -> Option<crate::engine::Stop> {
        None
    }
}

/// Open the spec's backend (read-only sessions unless `access` allows writing) and hand it to
/// `cmd`. `workers` sizes the connection pool.
pub(crate) async fn with_backend<C: OnJob>(
    spec: &Spec,
    access: Access,
    workers: u32,
    cmd: C,
) -> Result<C::Out> {
    match &spec.source {
        Source::Postgres(pg) => {
            let backend = crate::postgres::open(spec, pg, access, workers)?;
            cmd.call(spec, backend).await
        }
        Source::Clickhouse(ch) => {
            let open = crate::clickhouse::ChJob::open(spec, ch, access);
            let backend = match cmd.stop() {
                Some(stop) => stop.or_stopped(open).await?,
                None => open.await?,
            };
            cmd.call(spec, backend).await
        }
    }
}

/// Every spec named on the command line, validated, with `${VAR}`s from the environment.
fn load_all(paths: &[PathBuf]) -> Result<Vec<Spec>> {
    let env = Env::process();
    let specs = expand_paths(paths)?
        .iter()
        .map(|p| load_file(p, &env))
        .collect::<Result<Vec<_>>>()?;
    if let Some((_, why)) = crate::spec::duplicate_names(&specs).into_iter().next() {
        return Err(crate::Error::Spec(why));
    }
    Ok(specs)
}
