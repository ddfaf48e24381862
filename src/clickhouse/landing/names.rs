//! The names of a job's tables beside its target, `<target>__backfill_<job>_…`, and the exact
//! patterns that find them. Two jobs never share a table, and a job's clean-up never takes
//! another's: the job part is the name itself when it is only ASCII letters, digits and `_`,
//! else those characters (others as `_`) plus a hash of the exact name (`fill-x` and `fill.x`
//! once both became `fill_x`); and a lookup matches a whole name of one of the job's own forms
//! (`<prefix>_s_<16 hex>_<8 hex>`, `<prefix>_check_<8 hex>_<pid>`), never a bare prefix (`fill`'s
//! staging tables once matched `fill_s2`'s base table).

use super::super::client::literal;

/// The part of every table name of job `job` beside target `target` (table name, unquoted).
pub fn prefix(target: &str, job: &str) -> String {
    let safe = sanitized(job);
    if safe == job {
        return format!("{target}__backfill_{safe}");
    }
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(job.as_bytes());
    format!("{target}__backfill_{safe}_{}", hex::encode(&h[..4]))
}

/// The prefix this job had before names were made unique (differs only for names with other
/// characters than ASCII letters, digits and `_`).
pub fn legacy_prefix(target: &str, job: &str) -> Option<String> {
    let safe = sanitized(job);
    (safe != job).then(|| format!("{target}__backfill_{safe}"))
}

/// The job name an earlier version's table names came from: other characters as `_`.
pub fn sanitized(job: &str) -> String {
    job.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// A SQL condition on `name` (of `system.tables`): `start` followed by exactly what the regular
/// expression `rest` matches.
pub fn starts_then(start: &str, rest: &str) -> String {
    format!(
        "(startsWith(name, {s}) AND match(substring(name, {n}), {r}))",
        s = literal(start),
        n = start.len() + 1,
        r = literal(&format!("^{rest}$"))
    )
}

/// Staging tables: `<prefix>_s_<16 hex>_<8 hex>` (the chunk's, then the runner's; earlier
/// versions' without the runner's).
pub fn staging_tables(prefix: &str) -> String {
    starts_then(&format!("{prefix}_s_"), "[0-9a-f]{16}(_[0-9a-f]{8})?")
}

/// Preflight check tables: `<prefix>_check_<8 hex>_<pid>`.
pub fn check_tables(prefix: &str) -> String {
    starts_then(&format!("{prefix}_check_"), "[0-9a-f]{8}_[0-9]+")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_once_collided_do_not() {
        let a = prefix("agg", "fill-x");
        let b = prefix("agg", "fill.x");
        let c = prefix("agg", "fill_x");
        assert!(a != b && b != c && a != c, "{a} {b} {c}");
        assert_eq!(c, "agg__backfill_fill_x");
        assert_eq!(
            legacy_prefix("agg", "fill-x").as_deref(),
            Some("agg__backfill_fill_x")
        );
        assert_eq!(legacy_prefix("agg", "fill_x"), None);
    }
}
