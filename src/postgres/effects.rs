//! What SQL from the spec could do that no rollback and no read-only transaction undoes: the
//! volatile functions its plan calls (`nextval`, a plpgsql function that inserts and so draws a
//! serial, `dblink_exec`, which writes through a connection of its own), found by name in
//! `EXPLAIN (VERBOSE)` (views and SQL functions are expanded there) and looked up in
//! `pg_proc`. `plan` runs no sample over them and `verify` refuses them: those commands promise
//! to write nothing, whatever the spec says. Not seen by this check: functions reached through
//! an operator, a cast, a domain's CHECK, a user-defined aggregate, a table's CHECK constraint,
//! or parts of a plan EXPLAIN does not print (MERGE and ON CONFLICT actions, LIMIT; for MERGE
//! the written table's defaults are checked instead: `effectful_default`);
//! and planning itself may run STABLE functions (a function that writes while declared STABLE
//! breaks Postgres's own rules too).

use super::errors::db_error;
use crate::error::Result;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

/// Built-ins with effects past the transaction, or on other sessions: a sequence drawn or
/// set, a large object or a file written, a session-level lock kept, another backend ended,
/// WAL or a replication slot written, statistics reset. Other volatile built-ins only read
/// (`pg_lock_status` behind `pg_locks`, `pg_stat_get_activity`) or end with the transaction
/// (`random`, `set_config`); every volatile function outside `pg_catalog` counts.
const EFFECTFUL: &[&str] = &[
    "nextval",
    "setval",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_logical_emit_message",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_copy_physical_replication_slot",
    "pg_copy_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_replication_slot_advance",
    "pg_replication_origin_create",
    "pg_replication_origin_drop",
    "pg_replication_origin_advance",
    "pg_replication_origin_session_setup",
    "pg_logical_slot_get_changes",
    "pg_logical_slot_get_binary_changes",
    "pg_promote",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "lo_import",
    "lo_export",
    "lo_unlink",
    "pg_stat_reset",
    "pg_stat_reset_shared",
    "pg_stat_reset_single_table_counters",
    "pg_stat_reset_single_function_counters",
    "pg_stat_reset_slru",
    "pg_stat_reset_replication_slot",
    "pg_stat_reset_subscription_stats",
    "pg_import_system_collations",
    "pg_log_backend_memory_contexts",
];

/// The JSON document of an EXPLAIN's one row: type json, or text on some servers and
/// poolers; none if it is neither.
pub fn explain_json(row: &Row) -> Option<serde_json::Value> {
    row.try_get::<_, serde_json::Value>(0).ok().or_else(|| {
        row.try_get::<_, String>(0)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
    })
}

/// `EXPLAIN (VERBOSE, COSTS OFF, FORMAT JSON)` of `sql`, which is planned, not run; `params`
/// as `sql` takes them, `doing` for the error.
pub async fn explain(
    c: &Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    doing: &str,
) -> Result<Option<serde_json::Value>> {
    let row = c
        .query_one(
            &format!("EXPLAIN (VERBOSE, COSTS OFF, FORMAT JSON) {sql}"),
            params,
        )
        .await
        .map_err(|e| db_error(doing, &e))?;
    Ok(explain_json(&row))
}

/// The volatile functions (as `schema.name`) that `sql` would call: every one outside
/// `pg_catalog`, and the built-ins in `EFFECTFUL`. Only explains `sql` (planning may still run
/// STABLE functions, as Postgres's planner does for any query); `params` as `sql` takes them.
pub async fn outside_calls(
    c: &Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<String>> {
    match explain(c, sql, params, "explaining the spec's SQL").await? {
        Some(doc) => calls_in(c, &doc).await,
        None => Ok(Vec::new()),
    }
}

/// `outside_calls` of a plan already explained (`explain`).
pub async fn calls_in(c: &Client, doc: &serde_json::Value) -> Result<Vec<String>> {
    let mut texts = Vec::new();
    strings(doc, &mut texts);
    let names: Vec<String> = texts.iter().flat_map(|t| called(t)).collect();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let effectful: Vec<String> = EFFECTFUL.iter().map(|s| s.to_string()).collect();
    let rows = c
        .query(
            "SELECT DISTINCT format('%s.%s', n.nspname, p.proname)
               FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE p.proname = ANY($1::text[]) AND p.provolatile = 'v'
                AND (n.nspname <> 'pg_catalog' OR p.proname = ANY($2::text[]))
              ORDER BY 1",
            &[&names, &effectful],
        )
        .await
        .map_err(|e| db_error("looking up the functions the spec's SQL calls", &e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A column of `schema.table` (or of a partition under it) that an insert fills by itself
/// with an effect past the transaction: an identity column, or a default that uses a sequence
/// (`serial`) or calls a volatile function counted by `outside_calls`. EXPLAIN prints the
/// defaults a plain INSERT uses, but not MERGE's actions. Returns `table.column`.
pub async fn effectful_default(c: &Client, schema: &str, table: &str) -> Result<Option<String>> {
    let effectful: Vec<String> = EFFECTFUL.iter().map(|s| s.to_string()).collect();
    let row = c
        .query_opt(
            "WITH r AS (SELECT format('%I.%I', $1::text, $2::text)::regclass AS rel),
                  rels AS (SELECT p.relid FROM r, pg_partition_tree(r.rel) p
                           UNION SELECT r.rel FROM r)
             SELECT format('%s.%s', a.attrelid::regclass, a.attname)
               FROM pg_attribute a JOIN rels ON a.attrelid = rels.relid
              WHERE a.attnum > 0 AND NOT a.attisdropped
                AND (a.attidentity <> ''
                     OR EXISTS (
                        SELECT 1 FROM pg_attrdef d
                          JOIN pg_depend dep ON dep.classid = 'pg_attrdef'::regclass
                                            AND dep.objid = d.oid
                          LEFT JOIN pg_class seq ON dep.refclassid = 'pg_class'::regclass
                                                AND seq.oid = dep.refobjid
                          LEFT JOIN pg_proc f ON dep.refclassid = 'pg_proc'::regclass
                                             AND f.oid = dep.refobjid
                          LEFT JOIN pg_namespace fn ON fn.oid = f.pronamespace
                         WHERE d.adrelid = a.attrelid AND d.adnum = a.attnum
                           AND (seq.relkind = 'S'
                                OR (f.provolatile = 'v'
                                    AND (fn.nspname <> 'pg_catalog'
                                         OR f.proname = ANY($3::text[]))))))
              ORDER BY 1 LIMIT 1",
            &[&schema, &table, &effectful],
        )
        .await
        .map_err(|e| {
            db_error(
                "looking at the defaults of a table the statement writes",
                &e,
            )
        })?;
    Ok(row.map(|r| r.get(0)))
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

/// The names written just before a `(` in an expression, outside its string literals
/// (`public.f(x)` gives `f`; a quoted `"F"(x)` gives `F`, `"a""b"(x)` gives `a"b`; unquoted
/// names fold to lower case). Words that are not functions (`AND (`) find nothing in
/// `pg_proc`.
fn called(expr: &str) -> Vec<String> {
    // String literals out, as EXPLAIN writes them ('...' with '' for a quote).
    let mut code = String::with_capacity(expr.len());
    let mut in_string = false;
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        match (in_string, c) {
            (false, '\'') => in_string = true,
            (true, '\'') if chars.peek() == Some(&'\'') => {
                chars.next();
            }
            (true, '\'') => {
                in_string = false;
                code.push_str("''");
            }
            (true, _) => {}
            (false, c) => code.push(c),
        }
    }
    let b = code.as_bytes();
    let mut out = Vec::new();
    for (i, _) in code.match_indices('(') {
        let mut end = i;
        while end > 0 && b[end - 1] == b' ' {
            end -= 1;
        }
        if end > 0 && b[end - 1] == b'"' {
            // Back to the opening quote, over doubled ones.
            let mut k = end - 1;
            let open = loop {
                match code[..k].rfind('"') {
                    Some(q) if q > 0 && b[q - 1] == b'"' => k = q - 1,
                    Some(q) => break Some(q),
                    None => break None,
                }
            };
            if let Some(open) = open {
                out.push(code[open + 1..end - 1].replace("\"\"", "\""));
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
            out.push(code[start..end].to_ascii_lowercase());
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
            ["and", "nextval", "side_ins"]
        );
        assert_eq!(called("\"My \"\"F\"\"\"(x) + f2 (y)"), ["My \"F\"", "f2"]);
        assert_eq!(called("\"bad\"\"fn\"(1)"), ["bad\"fn"]);
        assert!(called("(t.id = ANY ('{1,2}'::bigint[]))").contains(&"any".to_string()));
        assert!(called("(1 + (2))").is_empty());
        // Text in a literal is not a call.
        assert!(called("(t.note = 'legacy system (v1) it''s f(x)'::text)").is_empty());
    }
}
