//! The subcommands: each loads its specs (any bad spec stops everything with exit 2 before a
//! database is touched) and then does its one thing.

mod plan;
mod reset;
mod run;
mod status;
mod validate;

use crate::cli::Command;
use crate::error::Result;
use crate::spec::{Env, Spec, expand_paths, load_file};
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
        } => {
            let opts = crate::engine::RunOptions {
                rerun,
                ignore_preflight,
                progress_every: progress_interval,
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
        } => plan::plan(&load_all(&specs)?, exact, samples).await,
        Command::Status { specs, json } => status::status(&load_all(&specs)?, json).await,
        Command::Validate { specs } => validate::validate(&specs),
        Command::Reset { spec, yes } => reset::reset(&spec, yes).await,
    }
}

/// Every spec named on the command line, validated, with `${VAR}`s from the environment.
fn load_all(paths: &[PathBuf]) -> Result<Vec<Spec>> {
    let env = Env::process();
    let specs = expand_paths(paths)?
        .iter()
        .map(|p| load_file(p, &env))
        .collect::<Result<Vec<_>>>()?;
    let mut seen = std::collections::HashSet::new();
    for s in &specs {
        if !seen.insert(&s.name) {
            return Err(crate::Error::Spec(format!(
                "{}: job name {:?} is used by two specs; names key the checkpoint and must be unique",
                s.file.display(),
                s.name
            )));
        }
    }
    Ok(specs)
}
