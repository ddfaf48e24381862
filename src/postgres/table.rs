//! Resolves and checks what a Postgres spec names, before any write: the table, the key column
//! (its type, a unique index, and NULLs), the `where` clause (prepared, never executed as
//! text), and that `statement` prepares with $1 as an array of the key's type (and, if it uses
//! them, $2 and $3 as the batch's first and last key).

use super::errors::describe;
use crate::error::{Error, Result};
use crate::spec::PostgresSpec;
use sqlparser::ast::{BinaryOperator, Expr};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use tokio_postgres::Client;

/// The target table and key as the database sees them, safe to splice into SQL.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// `schema.table`, always schema-qualified and quoted as needed: spliced into SQL, where
    /// an unqualified name could be shadowed by a WITH query of the same name.
    pub rel: String,
    /// The table as `regclass::text` shows it (schema left out when on the search_path): for
    /// messages and the job's record of what it walks.
    pub shown: String,
    /// The table's schema and name, unquoted (for the catalog).
    pub schema: String,
    pub table: String,
    /// The key column, quoted as needed.
    pub key: String,
    /// The key column's name, unquoted.
    pub key_name: String,
    /// SQL type of the key, e.g. `bigint`, `timestamp with time zone`.
    pub key_type: String,
    /// How keys compare and what their text means, for the job's record of what it walks: the
    /// key's type (the integer types as one, text with varchar), the btree operator family of
    /// the key's unique index and its collation (`text or varchar, pg_catalog.text_ops,
    /// COLLATE pg_catalog."de-x-icu"`; the database's default by its locale). A checkpoint is
    /// a position in this order, written as text.
    pub key_order: String,
    /// `where` as one parenthesized expression (a line comment in it ends at our newline), or
    /// `true`.
    pub filter: String,
    /// How many parameters `statement` takes: 1 (the keys) or 3 (keys, first key, last key).
    pub statement_params: usize,
}

fn fail(field: &str, why: impl std::fmt::Display) -> Error {
    Error::Preflight(format!("{field}: {why}"))
}

/// An error while checking `field` against the database: the field's fault, unless the table
/// could not even be locked for the check (another session holds it): then nothing is wrong
/// with the spec, and the run stops (exit 75) to be tried again later; or unless the
/// connection was lost: then it is the database's error, typed, and the check is run again.
fn check_failed(field: &str, what: &str, e: &tokio_postgres::Error, rel: &str) -> Error {
    if super::errors::classify(e) == crate::error::DbErrorKind::ConnectionLost {
        return super::errors::db_error(&format!("preflight: checking {field}"), e);
    }
    if super::errors::sqlstate(e) == Some("55P03") {
        return Error::Stopped(crate::error::StopReason::Preflight(format!(
            "{field} could not be checked within lock_timeout: a table it uses ({rel}, or \
             another it names) is locked by another session (an ACCESS EXCLUSIVE lock is held or \
             queued): {}",
            describe(e)
        )));
    }
    fail(field, format!("{what}{}", describe(e)))
}

/// Resolve the table and key, and check `where` and `statement` against the database.
pub async fn inspect(client: &Client, spec: &PostgresSpec) -> Result<TableInfo> {
    let rel = client
        .query_opt(
            "SELECT c.oid, c.oid::regclass::text, n.nspname::text, c.relname::text,
                    quote_ident(n.nspname) || '.' || quote_ident(c.relname)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = to_regclass($1)",
            &[&spec.table],
        )
        .await;
    let rel = match rel {
        Ok(Some(r)) => r,
        Ok(None) => {
            return Err(fail(
                "postgres.table",
                format!(
                    "table {} does not exist in this database (check the schema prefix and search_path)",
                    spec.table
                ),
            ));
        }
        Err(e)
            if e.as_db_error().is_some()
                && super::errors::classify(&e) != crate::error::DbErrorKind::ConnectionLost =>
        {
            return Err(fail(
                "postgres.table",
                format!(
                    "{:?} is not a valid table name: {}",
                    spec.table,
                    describe(&e)
                ),
            ));
        }
        Err(e) => {
            return Err(super::errors::db_error(
                "preflight: resolving the table",
                &e,
            ));
        }
    };
    let oid: u32 = rel.get(0);
    let rel_text: String = rel.get(1);
    let key_name = spec.key.trim_matches('"').to_string();
    let col = client
        .query_opt(
            "SELECT quote_ident(a.attname), format_type(a.atttypid, a.atttypmod), a.attnotnull,
                    EXISTS (SELECT 1 FROM pg_index i JOIN pg_opclass oc ON oc.oid = i.indclass[0]
                             WHERE i.indrelid = a.attrelid AND i.indisunique AND i.indisvalid
                               AND i.indnkeyatts = 1 AND i.indkey[0] = a.attnum
                               AND i.indpred IS NULL AND i.indcollation[0] = a.attcollation
                               AND oc.opcdefault
                               -- the default of the column's own type (citext's, not text's),
                               -- or of the type it is read as when it has none (varchar)
                               AND (oc.opcintype = b.oid
                                    OR NOT EXISTS (SELECT 1 FROM pg_opclass d
                                                    WHERE d.opcmethod = oc.opcmethod
                                                      AND d.opcdefault AND d.opcintype = b.oid))),
                    format_type(t.typarray, NULL),
                    (SELECT string_agg(format('%s (%s%s)', i.indexrelid::regclass,
                                              coalesce('COLLATE ' || quote_ident(co.collname),
                                                       'no collation'),
                                              ', operator class ' || oc.opcname),
                                       ', ')
                       FROM pg_index i JOIN pg_opclass oc ON oc.oid = i.indclass[0]
                       LEFT JOIN pg_collation co ON co.oid = i.indcollation[0]
                      WHERE i.indrelid = a.attrelid AND i.indisunique AND i.indisvalid
                        AND i.indnkeyatts = 1 AND i.indkey[0] = a.attnum
                        AND i.indpred IS NULL),
                    (SELECT quote_ident(collname) FROM pg_collation WHERE oid = a.attcollation),
                    -- How keys compare and what a cursor's text means: the key's type (the
                    -- integer types as one, and text with varchar, whose values a change of
                    -- column type among them keeps: any other change, timestamp to timestamptz
                    -- or a numeric scale, may change the values and must match exactly), the
                    -- btree operator family of the key's unique index, and the collation by
                    -- schema and name (the database's default by the locale it stands for,
                    -- whatever the version calls that column).
                    CASE WHEN a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype)
                         THEN 'smallint, integer or bigint'
                         WHEN a.atttypid IN ('text'::regtype, 'varchar'::regtype)
                         THEN 'text or varchar'
                         ELSE format_type(a.atttypid, a.atttypmod) END
                    || ', ' || coalesce((SELECT format('%I.%I', fn.nspname, f.opfname)
                                FROM pg_index i JOIN pg_opclass oc ON oc.oid = i.indclass[0]
                                JOIN pg_opfamily f ON f.oid = oc.opcfamily
                                JOIN pg_namespace fn ON fn.oid = f.opfnamespace
                               WHERE i.indrelid = a.attrelid AND i.indisunique AND i.indisvalid
                                 AND i.indnkeyatts = 1 AND i.indkey[0] = a.attnum
                                 AND i.indpred IS NULL AND i.indcollation[0] = a.attcollation
                                 AND oc.opcdefault
                               ORDER BY i.indexrelid LIMIT 1),
                             format_type(a.atttypid, NULL)) || CASE
                        WHEN a.attcollation = 0 THEN ''
                        WHEN a.attcollation = 100 THEN (
                            SELECT ', COLLATE default (' || concat_ws(', ', d.datcollate,
                                       to_jsonb(d) ->> 'daticulocale', to_jsonb(d) ->> 'datlocale')
                                   || ')'
                              FROM pg_database d WHERE d.datname = current_database())
                        ELSE (SELECT format(', COLLATE %I.%I', n.nspname, co.collname)
                                FROM pg_collation co JOIN pg_namespace n ON n.oid = co.collnamespace
                               WHERE co.oid = a.attcollation) END
               FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
               JOIN pg_type b ON b.oid = CASE t.typtype WHEN 'd' THEN t.typbasetype ELSE t.oid END
              WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&oid, &key_name],
        )
        .await
        .map_err(|e| check_failed("postgres.key", "", &e, &rel_text))?;
    let Some(col) = col else {
        return Err(fail(
            "postgres.key",
            format!("column {key_name:?} does not exist in table {rel_text}"),
        ));
    };
    let key: String = col.get(0);
    let key_type: String = col.get(1);
    let not_null: bool = col.get(2);
    let array_type: String = col.get(4);
    let key_order: String = col.get(7);
    if let (false, Some(others)) = (col.get::<_, bool>(3), col.get::<_, Option<String>>(5)) {
        // Unique by another ordering than the column's: the walk compares keys as the column
        // does (`ORDER BY key`, `key > cursor`), which such an index cannot serve (a sort of
        // the whole range per batch), and under a nondeterministic collation two keys it holds
        // apart can be equal there, and a batch that ends on one passes over the other.
        let own = col
            .get::<_, Option<String>>(6)
            .map_or("no collation".to_string(), |c| format!("COLLATE {c}"));
        return Err(fail(
            "postgres.key",
            format!(
                "column {key} of {rel_text} is unique only by an index that orders it otherwise \
                 than the column ({own}, the type's default operator class): {others}. The walk \
                 orders keys as the column does, which that index cannot serve, and keys it holds \
                 apart can compare equal there (rows passed over). Add a unique index on {key} \
                 with the column's collation and operator class (CREATE UNIQUE INDEX ON \
                 {rel_text} ({key}))"
            ),
        ));
    }
    if !col.get::<_, bool>(3) {
        return Err(fail(
            "postgres.key",
            format!(
                "column {key} of {rel_text} has no unique index of its own; a keyset walk needs a \
                 unique, indexed key (add one, or use the primary key)"
            ),
        ));
    }
    // A unique index of a table holds in that table only: the tables inheriting from it (old-
    // style inheritance; not the partitions of a partitioned table, whose unique indexes hold
    // across them) can repeat its keys, and a walk that reads them through the parent would
    // pass over a repeated key cut by a batch boundary.
    let child: Option<String> = client
        .query_opt(
            "SELECT i.inhrelid::regclass::text FROM pg_inherits i JOIN pg_class c ON c.oid = $1
              WHERE i.inhparent = $1 AND c.relkind = 'r' LIMIT 1",
            &[&oid],
        )
        .await
        .map_err(|e| check_failed("postgres.table", "", &e, &rel_text))?
        .map(|r| r.get(0));
    if let Some(child) = child {
        return Err(fail(
            "postgres.table",
            format!(
                "table {rel_text} has tables inheriting from it ({child} among them); its unique \
                 index on {key} holds in {rel_text} alone, so its children can repeat keys and a \
                 keyset walk through the parent could pass over rows. Run one job per table \
                 (the statement on `ONLY` each), or partition the table declaratively"
            ),
        ));
    }
    if !not_null
        && !spec
            .where_
            .as_deref()
            .is_some_and(|w| excludes_null(w, &key_name))
    {
        return Err(fail(
            "postgres.key",
            format!(
                "column {key} of {rel_text} can be NULL, and rows with a NULL key cannot be \
                 walked by key: they would be left behind. Make it NOT NULL, or leave those rows \
                 out knowingly with `where: {key} IS NOT NULL AND ...`"
            ),
        ));
    }
    // One expression (checked by a parser at validate), wrapped so nothing in it reaches what
    // follows.
    let filter = spec.where_sql();
    // Prepared, never executed: one statement, and nothing runs.
    client
        .prepare(&format!("SELECT 1 FROM {rel_text} WHERE {filter}"))
        .await
        .map_err(|e| check_failed("postgres.where", "", &e, &rel_text))?;

    let stmt = client
        .prepare(&spec.statement)
        .await
        .map_err(|e| check_failed("postgres.statement", "does not prepare: ", &e, &rel_text))?;
    let type_name = async |oid: u32| -> Result<String> {
        Ok(client
            .query_one("SELECT format_type($1, NULL)", &[&oid])
            .await
            .map_err(|e| check_failed("postgres.statement", "", &e, &rel_text))?
            .get(0))
    };
    let params = stmt.params();
    if params.len() != 1 && params.len() != 3 {
        return Err(fail(
            "postgres.statement",
            format!(
                "must take $1 (the batch's keys) and optionally $2 and $3 (the batch's first and \
                 last key), found {} parameters",
                params.len()
            ),
        ));
    }
    let got = type_name(params[0].oid()).await?;
    if got != array_type {
        return Err(fail(
            "postgres.statement",
            format!(
                "$1 is used as {got}, but it is the batch's keys: it must be {array_type} \
                 (e.g. `WHERE {key} = ANY($1::{array_type})`)"
            ),
        ));
    }
    let base_type: String = client
        .query_one(
            "SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = $1 AND attname = $2",
            &[&oid, &key_name],
        )
        .await
        .map_err(|e| check_failed("postgres.key", "", &e, &rel_text))?
        .get(0);
    for (i, p) in params.iter().enumerate().skip(1) {
        let got = type_name(p.oid()).await?;
        if got != base_type {
            return Err(fail(
                "postgres.statement",
                format!(
                    "${} is used as {got}, but it is the batch's {} key: it must be {base_type} \
                     (e.g. `AND {key} BETWEEN $2 AND $3`)",
                    i + 1,
                    if i == 1 { "first" } else { "last" }
                ),
            ));
        }
    }
    let (schema, table): (String, String) = (rel.get(2), rel.get(3));
    let target = super::key_writes::Target {
        schema: &schema,
        table: &table,
        key: &key_name,
    };
    if super::key_writes::sets_key(&spec.statement, &target) {
        return Err(fail(
            "postgres.statement",
            format!(
                "sets the key column {key} of {rel_text}: the walk takes a row's key as where the \
                 row stays, so a row moved ahead of the cursor is walked and changed again \
                 (forever, if each batch moves it ahead again), and one moved behind is never \
                 seen again. A backfill changes rows, not their keys: write another column, or \
                 copy the rows into a new table keyed as you need"
            ),
        ));
    }
    Ok(TableInfo {
        rel: rel.get(4),
        shown: rel_text,
        schema,
        table,
        key,
        key_name,
        key_type,
        key_order,
        filter,
        statement_params: params.len(),
    })
}

/// Whether `where` leaves out rows whose `key` is NULL: one of its top-level AND terms is
/// `key IS NOT NULL`.
pub fn excludes_null(where_: &str, key: &str) -> bool {
    let Ok(mut parser) = Parser::new(&PostgreSqlDialect {}).try_with_sql(where_) else {
        return false;
    };
    let Ok(expr) = parser.parse_expr() else {
        return false;
    };
    fn terms(e: &Expr, out: &mut Vec<Expr>) {
        match e {
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And,
                right,
            } => {
                terms(left, out);
                terms(right, out);
            }
            Expr::Nested(inner) => terms(inner, out),
            other => out.push(other.clone()),
        }
    }
    let mut all = Vec::new();
    terms(&expr, &mut all);
    all.iter().any(|t| match t {
        Expr::IsNotNull(inner) => match inner.as_ref() {
            Expr::Identifier(id) => same_column(&id.value, id.quote_style.is_some(), key),
            Expr::CompoundIdentifier(parts) => parts
                .last()
                .is_some_and(|id| same_column(&id.value, id.quote_style.is_some(), key)),
            _ => false,
        },
        _ => false,
    })
}

/// An identifier as written names `column` (unquoted identifiers fold to lower case).
fn same_column(written: &str, quoted: bool, column: &str) -> bool {
    if quoted {
        written == column
    } else {
        written.to_lowercase() == column
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_top_level_not_null_term() {
        assert!(excludes_null("id IS NOT NULL", "id"));
        assert!(excludes_null("a = 1 AND (t.ID IS NOT NULL AND b)", "id"));
        assert!(excludes_null("\"Key\" IS NOT NULL", "Key"));
        assert!(!excludes_null("\"Key\" IS NOT NULL", "key"));
        assert!(!excludes_null("id IS NOT NULL OR a = 1", "id"));
        assert!(!excludes_null("other IS NOT NULL", "id"));
        assert!(!excludes_null("NOT (id IS NULL) OR", "id"));
    }
}
