//! `backfill reset`: forget one job's checkpoint (refuses without `--yes`).

use crate::error::{Error, Result};
use crate::redact::outln;
use crate::spec::{Env, Source, load_file};
use crate::state::StateStore;
use std::path::Path;

pub async fn reset(path: &Path, yes: bool) -> Result<()> {
    let spec = load_file(path, &Env::process())?;
    if !yes {
        return Err(Error::Usage(format!(
            "reset deletes the checkpoint of job {:?}: its next run starts from the beginning. \
             Re-run with --yes to confirm.",
            spec.name
        )));
    }
    let existed = match &spec.source {
        Source::Postgres(pg) => {
            let (_, store) = crate::postgres::open(&spec, pg).await?;
            forget(&store, &spec.name).await?
        }
        Source::Clickhouse(ch) => {
            let (_, store) = crate::clickhouse::open(&spec, ch).await?;
            forget(&store, &spec.name).await?
        }
    };
    if existed {
        outln!(
            "{}: checkpoint deleted; the next run starts from the beginning",
            spec.name
        );
    } else {
        outln!("{}: no checkpoint to delete", spec.name);
    }
    Ok(())
}

/// Delete the checkpoint under the job's runner lock: never under a running job.
async fn forget<S: StateStore>(store: &S, job: &str) -> Result<bool> {
    store.lock(job).await?;
    let existed = store.reset(job).await;
    store.unlock(job).await?;
    existed
}
