//! Resolves and checks what a Postgres spec names, before any write: the table, the key column
//! (its type and a unique index), the `where` clause, and that `statement` prepares with $1 as
//! an array of the key's type.

use super::errors::describe;
use crate::error::{Error, Result};
use crate::spec::PostgresSpec;
use tokio_postgres::Client;

/// The target table and key as the database sees them, safe to splice into SQL.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// `schema.table`, quoted as needed (from `regclass::text`).
    pub rel: String,
    /// The key column, quoted as needed.
    pub key: String,
    /// SQL type of the key, e.g. `bigint`, `timestamp with time zone`.
    pub key_type: String,
    /// `where`, or `true`.
    pub filter: String,
}

fn fail(field: &str, why: impl std::fmt::Display) -> Error {
    Error::Preflight(format!("{field}: {why}"))
}

/// Resolve the table and key, and check `where` and `statement` against the database.
pub async fn inspect(client: &Client, spec: &PostgresSpec) -> Result<TableInfo> {
    let rel = client
        .query_one(
            "SELECT to_regclass($1)::oid, to_regclass($1)::text",
            &[&spec.table],
        )
        .await
        .map_err(|e| {
            fail(
                "postgres.table",
                format!(
                    "{:?} is not a valid table name: {}",
                    spec.table,
                    describe(&e)
                ),
            )
        })?;
    let (Some(oid), Some(rel_text)) = (
        rel.get::<_, Option<u32>>(0),
        rel.get::<_, Option<String>>(1),
    ) else {
        return Err(fail(
            "postgres.table",
            format!(
                "table {} does not exist in this database (check the schema prefix and search_path)",
                spec.table
            ),
        ));
    };
    let key_name = spec.key.trim_matches('"');
    let col = client
        .query_opt(
            "SELECT quote_ident(a.attname), format_type(a.atttypid, a.atttypmod),
                    EXISTS (SELECT 1 FROM pg_index i
                             WHERE i.indrelid = a.attrelid AND i.indisunique AND i.indisvalid
                               AND i.indnkeyatts = 1 AND i.indkey[0] = a.attnum
                               AND i.indpred IS NULL)
               FROM pg_attribute a
              WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&oid, &key_name],
        )
        .await
        .map_err(|e| fail("postgres.key", describe(&e)))?;
    let Some(col) = col else {
        return Err(fail(
            "postgres.key",
            format!("column {key_name:?} does not exist in table {rel_text}"),
        ));
    };
    let key: String = col.get(0);
    let key_type: String = col.get(1);
    if !col.get::<_, bool>(2) {
        return Err(fail(
            "postgres.key",
            format!(
                "column {key} of {rel_text} has no unique index of its own; a keyset walk needs a \
                 unique, indexed key (add one, or use the primary key)"
            ),
        ));
    }
    let filter = spec.where_.clone().unwrap_or_else(|| "true".into());
    let probe = format!("EXPLAIN SELECT 1 FROM {rel_text} WHERE ({filter})");
    client
        .batch_execute(&probe)
        .await
        .map_err(|e| fail("postgres.where", describe(&e)))?;

    let stmt = client.prepare(&spec.statement).await.map_err(|e| {
        fail(
            "postgres.statement",
            format!("does not prepare: {}", describe(&e)),
        )
    })?;
    let array_type: String = client
        .query_one(
            "SELECT format_type(t.typarray, NULL) FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
              WHERE a.attrelid = $1 AND a.attname = $2",
            &[&oid, &key_name],
        )
        .await
        .map_err(|e| fail("postgres.key", describe(&e)))?
        .get(0);
    match stmt.params() {
        [p] => {
            let got: String = client
                .query_one("SELECT format_type($1, NULL)", &[&p.oid()])
                .await
                .map_err(|e| fail("postgres.statement", describe(&e)))?
                .get(0);
            if got != array_type {
                return Err(fail(
                    "postgres.statement",
                    format!(
                        "$1 is used as {got}, but it is the batch's keys: it must be {array_type} \
                         (e.g. `WHERE {key} = ANY($1)`)"
                    ),
                ));
            }
        }
        ps => {
            return Err(fail(
                "postgres.statement",
                format!(
                    "must take exactly one parameter ($1 = the batch's keys), found {}",
                    ps.len()
                ),
            ));
        }
    }
    Ok(TableInfo {
        rel: rel_text,
        key,
        key_type,
        filter,
    })
}
