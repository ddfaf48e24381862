//! `backfill validate`: parse and check specs, no database. Unset `${VAR}`s are reported, not
//! fatal: CI lints specs without production secrets.

use crate::error::{Error, Result};
use crate::redact::outln;
use crate::spec::{Env, expand_paths, load_file};
use std::path::PathBuf;

pub fn validate(paths: &[PathBuf]) -> Result<()> {
    let lookup = |name: &str| std::env::var(name).ok();
    let env = Env {
        lookup: &lookup,
        allow_unset: true,
    };
    let mut failed = Vec::new();
    let mut loaded = Vec::new();
    for path in expand_paths(paths)? {
        match load_file(&path, &env) {
            Ok(spec) => {
                let note = if spec.unresolved.is_empty() {
                    String::new()
                } else {
                    format!(" (not set here: {})", spec.unresolved.join(", "))
                };
                outln!("ok  {} (job {}){note}", path.display(), spec.name);
                loaded.push(spec);
            }
            Err(e) => {
                crate::progress::print_error(&e.to_string(), None);
                failed.push(path.display().to_string());
            }
        }
    }
    for (file, why) in crate::spec::duplicate_names(&loaded) {
        crate::progress::print_error(&why, None);
        failed.push(file.display().to_string());
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Spec(format!(
            "{} invalid spec(s): {}",
            failed.len(),
            failed.join(", ")
        )))
    }
}
