//! Whether the spec's statement sets the job's key column in the job's table: an `UPDATE` of it
//! (at the top or in a `WITH`), an `ON CONFLICT DO UPDATE` into it, a `MERGE` into it. The walk
//! takes a row's key as where the row stays: a row moved ahead of the cursor is walked and
//! changed again (forever, when the statement keeps moving it ahead), and plan's idempotency
//! check, which reads the batch's keys again, finds the moved rows gone and calls it
//! idempotent. Read with sqlparser's Postgres dialect, after the server has prepared the
//! statement; a statement it cannot parse is not judged here.

use sqlparser::ast::{
    Assignment, AssignmentTarget, MergeAction, MergeUpdateKind, ObjectName, ObjectNamePart,
    OnConflictAction, OnInsert, Query, SetExpr, Statement, TableFactor, TableObject,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

/// The job's table (schema and name, unquoted) and key column (unquoted).
pub struct Target<'a> {
    pub schema: &'a str,
    pub table: &'a str,
    pub key: &'a str,
}

/// Whether `statement` sets `target`'s key column.
pub fn sets_key(statement: &str, target: &Target) -> bool {
    let Ok(statements) = Parser::parse_sql(&PostgreSqlDialect {}, statement) else {
        return false;
    };
    statements.iter().any(|s| in_statement(s, target))
}

fn in_statement(s: &Statement, t: &Target) -> bool {
    match s {
        Statement::Query(q) => in_query(q, t),
        Statement::Update(u) => {
            let here =
                matches!(&u.table.relation, TableFactor::Table { name, .. } if names(name, t));
            here && assigns(&u.assignments, t)
        }
        Statement::Insert(i) => {
            let here = matches!(&i.table, TableObject::TableName(name) if names(name, t));
            let sets = match &i.on {
                Some(OnInsert::OnConflict(c)) => match &c.action {
                    OnConflictAction::DoUpdate(d) => assigns(&d.assignments, t),
                    OnConflictAction::DoNothing => false,
                },
                Some(OnInsert::DuplicateKeyUpdate(a)) => assigns(a, t),
                _ => false,
            };
            (here && sets) || i.source.as_deref().is_some_and(|q| in_query(q, t))
        }
        Statement::Merge(m) => {
            let here = matches!(&m.table, TableFactor::Table { name, .. } if names(name, t));
            here && m.clauses.iter().any(|c| match &c.action {
                MergeAction::Update(u) => match &u.kind {
                    MergeUpdateKind::Set(a) => assigns(a, t),
                    _ => false,
                },
                _ => false,
            })
        }
        _ => false,
    }
}

fn in_query(q: &Query, t: &Target) -> bool {
    q.with
        .as_ref()
        .is_some_and(|w| w.cte_tables.iter().any(|c| in_query(&c.query, t)))
        || in_set(&q.body, t)
}

fn in_set(e: &SetExpr, t: &Target) -> bool {
    match e {
        SetExpr::Query(q) => in_query(q, t),
        SetExpr::SetOperation { left, right, .. } => in_set(left, t) || in_set(right, t),
        SetExpr::Insert(s) | SetExpr::Update(s) | SetExpr::Merge(s) => in_statement(s, t),
        _ => false,
    }
}

/// Whether `name` (as written) is the job's table: its last part is the table's name and a
/// schema, if given, is the table's. An unqualified name is taken as the table (the search
/// path could find another of that name first: then only the safe side).
fn names(name: &ObjectName, t: &Target) -> bool {
    let parts: Vec<&ObjectNamePart> = name.0.iter().collect();
    let ident = |p: &ObjectNamePart, is: &str| match p {
        ObjectNamePart::Identifier(id) => folded(&id.value, id.quote_style.is_some()) == is,
        _ => false,
    };
    match parts.as_slice() {
        [table] => ident(table, t.table),
        [.., schema, table] => ident(schema, t.schema) && ident(table, t.table),
        [] => false,
    }
}

/// Whether one of `assignments` sets the key column (`SET id = ...`, `SET (id, n) = ...`).
fn assigns(assignments: &[Assignment], t: &Target) -> bool {
    let is_key = |name: &ObjectName| {
        name.0.last().is_some_and(|p| match p {
            ObjectNamePart::Identifier(id) => folded(&id.value, id.quote_style.is_some()) == t.key,
            _ => false,
        })
    };
    assignments.iter().any(|a| match &a.target {
        AssignmentTarget::ColumnName(n) => is_key(n),
        AssignmentTarget::Tuple(ns) => ns.iter().any(is_key),
    })
}

/// An identifier as Postgres reads it: unquoted ones fold to lower case.
fn folded(written: &str, quoted: bool) -> String {
    if quoted {
        written.to_string()
    } else {
        written.to_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Target = Target {
        schema: "public",
        table: "t",
        key: "id",
    };

    #[test]
    fn finds_the_key_set_wherever_the_statement_writes_the_table() {
        for sql in [
            "UPDATE t SET id = id + 100000 WHERE id = ANY($1)",
            "UPDATE public.t AS x SET n = 1, ID = x.id * 2 WHERE x.id = ANY($1)",
            "UPDATE t SET (n, id) = (1, id + 1) WHERE id = ANY($1)",
            "WITH m AS (UPDATE t SET id = -id WHERE id = ANY($1) RETURNING id) \
             INSERT INTO log SELECT id FROM m",
            "INSERT INTO t SELECT id, 0 FROM s WHERE id = ANY($1) \
             ON CONFLICT (id) DO UPDATE SET id = excluded.id + 1",
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET id = s.id + 1",
            "INSERT INTO log WITH m AS (UPDATE t SET id = id + 1 WHERE id = ANY($1) RETURNING id) \
             SELECT id FROM m",
        ] {
            assert!(sets_key(sql, &T), "{sql}");
        }
    }

    #[test]
    fn leaves_other_columns_and_tables_alone() {
        for sql in [
            "UPDATE t SET n = id + 1 WHERE id = ANY($1)",
            "UPDATE other SET id = id + 1 WHERE id = ANY($1)",
            "UPDATE other.t SET id = id + 1 WHERE id = ANY($1)",
            "UPDATE t SET \"ID\" = 1 WHERE id = ANY($1)",
            "INSERT INTO t SELECT id + 1000000 FROM t WHERE id = ANY($1)",
            "INSERT INTO log SELECT id FROM t WHERE id = ANY($1) \
             ON CONFLICT (id) DO UPDATE SET id = excluded.id",
            "DELETE FROM t WHERE id = ANY($1)",
            "not sql at all (",
        ] {
            assert!(!sets_key(sql, &T), "{sql}");
        }
    }
}
