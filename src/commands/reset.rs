//! `backfill reset`: forget one job's checkpoint (refuses without `--yes`).

use crate::error::{Error, Result};
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
            // Never reset under a running job.
            store.lock(&spec.name).await?;
            let existed = store.reset(&spec.name).await;
            store.unlock(&spec.name).await?;
            existed?
        }
    };
    if existed {
        println!(
            "{}: checkpoint deleted; the next run starts from the beginning",
            spec.name
        );
    } else {
        println!("{}: no checkpoint to delete", spec.name);
    }
    Ok(())
}
