//! `backfill reset`: forget one job's checkpoint (refuses without `--yes`, and while it runs).

use super::{OnJob, with_backend};
use crate::engine::Backend;
use crate::error::{Error, Result};
use crate::outln;
use crate::postgres::Access;
use crate::spec::{Env, Spec, load_file};
use std::path::Path;

struct Reset {
    discard_foreign: bool,
}

impl OnJob for Reset {
    type Out = Option<String>;

    async fn call<B: Backend>(self, _spec: &Spec, backend: B) -> Result<Option<String>> {
        backend.reset(self.discard_foreign).await
    }
}

pub async fn reset(path: &Path, yes: bool, discard_foreign: bool) -> Result<()> {
    let spec = load_file(path, &Env::process())?;
    if !yes {
        return Err(Error::Usage(format!(
            "reset deletes the checkpoint of job {:?}: its next run starts from the beginning. \
             Re-run with --yes to confirm.",
            spec.name
        )));
    }
    match with_backend(&spec, Access::ReadWrite, 1, Reset { discard_foreign }).await? {
        Some(what) => outln!("{}: {what}", spec.name),
        None => outln!("{}: no checkpoint to delete", spec.name),
    }
    Ok(())
}
