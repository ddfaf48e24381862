//! Whether the spec's statement takes the batch's row locks itself: a single `UPDATE` or
//! `DELETE` (not inside a `WITH` of another statement) whose target is the job's table. Such a
//! statement locks every row it writes as it writes it, so a `skip_locked` batch need not lock
//! its keys first: it walks them unlocked and runs the statement under a short lock timeout,
//! and only when that times out on a row another transaction holds does it lock its keys
//! `FOR UPDATE SKIP LOCKED` and run the statement again (`batch.rs`). Any other statement (an
//! `INSERT ... SELECT` into another table, a `MERGE`, a `WITH` that writes) reads the walked
//! rows without locking them, so its batches lock first, as before. The name is read here with
//! sqlparser's Postgres dialect; the server says which table it is (`to_regclass`, in the
//! job's own session and search path). A try that goes back to the start runs the statement
//! twice, of which the first is rolled back: a statement that does what no rollback undoes
//! (calls a volatile function such as `nextval` or `dblink_exec`, as written or in its plan: a
//! default it fills in, a CHECK of what it writes; or writes a table whose triggers or
//! cascades do: `effects`, `hidden`, read as `plan` reads them) always locks first. So does a
//! session whose transactions are stronger than READ COMMITTED by default.

use super::effects::{calls_in, explain, written_tables};
use super::hidden::effect;
use super::mentions::says_default;
use super::raw::RawValue;
use super::table::TableInfo;
use sqlparser::ast::{FromTable, Statement, TableFactor};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

/// Whether `statement` is one `UPDATE` or `DELETE` of the job's table that does nothing a
/// rollback leaves behind, as far as the catalog tells, in a session whose transactions are
/// READ COMMITTED by default (the try's REPEATABLE READ would lower a stronger default). Any
/// failure to tell: no.
pub async fn applies(c: &Client, statement: &str, info: &TableInfo) -> bool {
    let Some(name) = written_table(statement) else {
        return false;
    };
    // The job's table itself, a table (not a view that an INSTEAD OF trigger writes), with no
    // rule that rewrites an UPDATE or DELETE of it into something that may not lock its rows.
    let same = c
        .query_one(
            "SELECT coalesce(to_regclass($1) = to_regclass($2), false)
                AND coalesce((SELECT c.relkind IN ('r', 'p') FROM pg_class c
                               WHERE c.oid = to_regclass($2)), false)
                AND NOT EXISTS (SELECT 1 FROM pg_rewrite r
                                 WHERE r.ev_class = to_regclass($2) AND r.ev_type IN ('2', '4'))
                AND current_setting('default_transaction_isolation') = 'read committed'",
            &[&name, &info.rel],
        )
        .await
        .is_ok_and(|r| r.get::<_, bool>(0));
    if !same {
        return false;
    }
    // As `plan` reads a statement before it runs a sample of it: unplanned first (planning
    // may run what it calls), then its plan (defaults it fills in, the CHECKs, policies and
    // domains of what it writes), then what its writes run out of the plan's sight. The plan
    // is the generic one, over NULL keys: a custom plan could fold the whole write away.
    let unplanned = calls_in(c, &serde_json::Value::Null, statement).await;
    if !unplanned.is_ok_and(|v| v.is_empty()) {
        return false;
    }
    if c.batch_execute("SET LOCAL plan_cache_mode = force_generic_plan")
        .await
        .is_err()
    {
        return false;
    }
    let none: Option<RawValue> = None;
    let params: Vec<&(dyn ToSql + Sync)> = (0..info.statement_params)
        .map(|_| &none as &(dyn ToSql + Sync))
        .collect();
    let Ok(Some(doc)) = explain(c, statement, &params, "explaining the statement").await else {
        return false;
    };
    if !calls_in(c, &doc, statement)
        .await
        .is_ok_and(|v| v.is_empty())
    {
        return false;
    }
    let written = written_tables(&doc, statement);
    if written.is_empty() {
        return false;
    }
    for (schema, table, unseen) in written {
        let unseen = unseen || says_default(statement);
        if !matches!(effect(c, schema, table, unseen).await, Ok(None)) {
            return false;
        }
    }
    true
}

/// The table `statement` updates or deletes from, as written (quoted as needed), when the
/// statement is exactly one top-level `UPDATE` or single-table `DELETE`.
pub fn written_table(statement: &str) -> Option<String> {
    let statements = Parser::parse_sql(&PostgreSqlDialect {}, statement).ok()?;
    let [s] = statements.as_slice() else {
        return None;
    };
    let relation = match s {
        Statement::Update(u) if u.table.joins.is_empty() => &u.table.relation,
        Statement::Delete(d) if d.tables.is_empty() => match &d.from {
            FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => match t.as_slice() {
                [only] if only.joins.is_empty() => &only.relation,
                _ => return None,
            },
        },
        _ => return None,
    };
    match relation {
        TableFactor::Table {
            name, args: None, ..
        } => Some(name.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::written_table;

    #[test]
    fn an_update_or_delete_names_its_table() {
        let upd = "UPDATE wxyc_schema.flowsheet f SET dj_name = s.name FROM wxyc_schema.shows s \
                   WHERE f.show_id = s.id AND f.id = ANY($1)";
        assert_eq!(written_table(upd).as_deref(), Some("wxyc_schema.flowsheet"));
        assert_eq!(
            written_table("DELETE FROM \"Odd\".t USING u WHERE t.id = ANY($1)").as_deref(),
            Some("\"Odd\".t")
        );
        assert_eq!(
            written_table("update ONLY t set n = n + 1 where id = any($1)").as_deref(),
            Some("t")
        );
    }

    #[test]
    fn statements_that_read_the_walked_rows_name_none() {
        for s in [
            "INSERT INTO dst SELECT * FROM src WHERE id = ANY($1)",
            "WITH d AS (DELETE FROM t WHERE id = ANY($1) RETURNING *) INSERT INTO a SELECT * FROM d",
            "WITH x AS (INSERT INTO log VALUES (1)) UPDATE t SET n = 1 WHERE id = ANY($1)",
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET n = 1",
            "UPDATE t SET n = 1 WHERE id = ANY($1); UPDATE u SET n = 1",
            "SELECT 1",
            "not sql at all",
        ] {
            assert_eq!(written_table(s), None, "{s}");
        }
    }
}
