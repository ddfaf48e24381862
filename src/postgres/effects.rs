//! What SQL from the spec could do that no rollback and no read-only transaction undoes: the
//! volatile functions its plan calls (`nextval`, a plpgsql function that inserts and so draws a
//! serial, `dblink_exec`, which writes through a connection of its own), found by name in
//! `EXPLAIN (VERBOSE)` (views and SQL functions are expanded there) and looked up in
//! `pg_proc`. `plan` runs no sample over them and `verify` refuses them: those commands promise
//! to write nothing, whatever the spec says.

use super::errors::db_error;
use crate::error::Result;
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

/// Volatile built-ins whose effects end with the transaction or the session: calling them
/// writes nothing anyone else sees.
const HARMLESS: &[&str] = &[
    "random",
    "random_normal",
    "setseed",
    "clock_timestamp",
    "timeofday",
    "gen_random_uuid",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "txid_current",
    "txid_current_if_assigned",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    "currval",
    "lastval",
    "set_config",
    "pg_notify",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
];

/// The volatile functions (as `schema.name`) that `sql` would call, other than the harmless
/// built-ins. Only explains `sql`, never runs it; `params` as `sql` takes them.
pub async fn outside_calls(
    c: &Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<String>> {
    let row = c
        .query_one(
            &format!("EXPLAIN (VERBOSE, COSTS OFF, FORMAT JSON) {sql}"),
            params,
        )
        .await
        .map_err(|e| db_error("explaining the spec's SQL", &e))?;
    let doc = row.try_get::<_, serde_json::Value>(0).ok().or_else(|| {
        row.try_get::<_, String>(0)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
    });
    let mut texts = Vec::new();
    if let Some(doc) = &doc {
        strings(doc, &mut texts);
    }
    let names: Vec<String> = texts.iter().flat_map(|t| called(t)).collect();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let harmless: Vec<String> = HARMLESS.iter().map(|s| s.to_string()).collect();
    let rows = c
        .query(
            "SELECT DISTINCT format('%s.%s', n.nspname, p.proname)
               FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE p.proname = ANY($1::text[]) AND p.provolatile = 'v'
                AND NOT (n.nspname = 'pg_catalog' AND p.proname = ANY($2::text[]))
              ORDER BY 1",
            &[&names, &harmless],
        )
        .await
        .map_err(|e| db_error("looking up the functions the spec's SQL calls", &e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Every string in a JSON document (the expressions of an EXPLAIN plan).
fn strings<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match v {
        serde_json::Value::String(s) => out.push(s),
        serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

/// The names written just before a `(` in an expression (`public.f(x)` gives `f`; a quoted
/// `"F"(x)` gives `F`; unquoted names fold to lower case). Words that are not functions
/// (`ANY (`) find nothing in `pg_proc`; a name inside a string literal at worst flags a call
/// that is not there, which only makes the check stricter.
fn called(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    for (i, _) in expr.match_indices('(') {
        let mut end = i;
        while end > 0 && b[end - 1] == b' ' {
            end -= 1;
        }
        if end > 0 && b[end - 1] == b'"' {
            if let Some(open) = expr[..end - 1].rfind('"') {
                out.push(expr[open + 1..end - 1].replace("\"\"", "\""));
            }
            continue;
        }
        let mut start = end;
        while start > 0
            && (b[start - 1].is_ascii_alphanumeric() || matches!(b[start - 1], b'_' | b'$'))
        {
            start -= 1;
        }
        if start < end && !b[start].is_ascii_digit() {
            out.push(expr[start..end].to_ascii_lowercase());
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::called;

    #[test]
    fn names_before_parentheses() {
        assert_eq!(
            called("(public.side_ins(t.id) AND (nextval('s'::regclass) > 0))"),
            ["nextval", "side_ins"]
        );
        assert_eq!(called("\"My \"\"F\"\"\"(x) + f2 (y)"), ["My \"F\"", "f2"]);
        assert!(called("(t.id = ANY ('{1,2}'::bigint[]))").contains(&"any".to_string()));
        assert!(called("(1 + (2))").is_empty());
    }
}
