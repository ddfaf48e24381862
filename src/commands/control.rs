//! `backfill verify`, `pause` and `unpause`: the operator's controls over a job that may be
//! running in other processes.

use super::{OnJob, with_backend};
use crate::engine::Backend;
use crate::error::{Error, Result};
use crate::outln;
use crate::postgres::Access;
use crate::spec::Spec;

struct Verify;

impl OnJob for Verify {
    type Out = Option<i64>;

    async fn call<B: Backend>(self, _spec: &Spec, backend: B) -> Result<Option<i64>> {
        backend.verify().await
    }
}

/// Run each spec's `verify:` query alone (read-only).
pub async fn verify(specs: &[Spec]) -> Result<()> {
    let mut failed = Vec::new();
    for spec in specs {
        match with_backend(spec, Access::ReadOnly, 1, Verify).await? {
            None => {
                return Err(Error::Usage(format!(
                    "{}: the spec has no `verify:` query",
                    spec.file.display()
                )));
            }
            Some(0) => outln!("{}: verify returned 0: done", spec.name),
            Some(n) => {
                outln!("{}: verify returned {n}: NOT done", spec.name);
                failed.push(format!("{} ({n})", spec.name));
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Verify(format!(
            "verify did not return 0 for: {}",
            failed.join(", ")
        )))
    }
}

struct Pause(bool);

impl OnJob for Pause {
    type Out = ();

    async fn call<B: Backend>(self, spec: &Spec, backend: B) -> Result<()> {
        backend.set_paused(&spec.hash, self.0).await
    }
}

/// Set or clear the pause flag of each job.
pub async fn pause(specs: &[Spec], paused: bool) -> Result<()> {
    for spec in specs {
        with_backend(spec, Access::ReadWrite, 1, Pause(paused)).await?;
        if paused {
            outln!(
                "{}: paused; running workers stop after their open batch and wait (backfill unpause to go on)",
                spec.name
            );
        } else {
            outln!("{}: unpaused; workers go on", spec.name);
        }
    }
    Ok(())
}
