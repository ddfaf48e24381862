//! What a write runs that its plan does not show, for `plan`'s effect check (`effects` reads
//! what the plan does show): the triggers of the tables it writes, and of every table a
//! foreign key's cascade writes in turn (the server's internal triggers run it, out of the
//! plan; each trigger's function is read by `triggers`); the rules of those cascaded tables
//! (their statements are rewritten like any other); the defaults a foreign key's SET DEFAULT
//! fills in, and those a MERGE's actions or an `ON CONFLICT DO UPDATE` use (EXPLAIN prints
//! none of them). A default is read as SQL text, through `effects::calls_in`, as a CHECK is:
//! `nextval('s'::text)` records no dependency in the catalog that a lookup could follow.

use super::cascade::WRITTEN;
use super::effects::calls_in;
use super::errors::db_error;
use crate::error::Result;
use tokio_postgres::{Client, Row};

/// Whether a write of `schema.table` runs what no rollback undoes out of its plan's sight;
/// `unseen_defaults` when it may fill in defaults its plan does not print (a MERGE, an
/// `ON CONFLICT DO UPDATE SET … = DEFAULT`: `effects::written_tables`). Returns what, for the
/// operator.
pub async fn effect(
    c: &Client,
    schema: &str,
    table: &str,
    unseen_defaults: bool,
) -> Result<Option<String>> {
    if unseen_defaults
        && let Some(column) = drawing_default(c, &merge_defaults(c, schema, table).await?).await?
    {
        return Ok(Some(format!(
            "the statement may fill in the default of column {column} out of its plan's sight \
             (a MERGE's action, or DEFAULT in an ON CONFLICT DO UPDATE), which draws from a \
             sequence or calls a volatile function"
        )));
    }
    let rule: Option<String> = c
        .query_opt(
            &format!(
                "{WRITTEN}
                 SELECT format('a rule (%s on %s)', r.rulename, r.ev_class::regclass)
                   FROM pg_rewrite r
                  WHERE r.ev_class IN (SELECT rel FROM written)
                    AND r.ev_type <> '1' AND r.ev_enabled <> 'D'
                    -- The statement's own table's rules are in its plan already.
                    AND r.ev_class <> (SELECT k.oid FROM pg_class k JOIN pg_namespace n ON n.oid = k.relnamespace
                                    WHERE n.nspname = $1::text AND k.relname = $2::text)
                  ORDER BY 1 LIMIT 1"
            ),
            &[&schema, &table],
        )
        .await
        .map_err(|e| db_error("looking for the rules a write runs", &e))?
        .map(|r| r.get(0));
    let found = match rule {
        Some(what) => Some(what),
        None => super::triggers::fired(c, schema, table).await?,
    };
    let found = match found {
        Some(what) => Some(what),
        None => drawing_default(c, &set_defaults(c, schema, table).await?)
            .await?
            .map(|column| {
                format!("a column whose default a foreign key's SET DEFAULT fills in ({column})")
            }),
    };
    Ok(found.map(|what| {
        format!(
            "a table the statement writes (or a foreign key's cascade from it writes) has \
             {what}, which could draw from a sequence"
        )
    }))
}

/// The columns of `schema.table`, of its partitions and of the views over them that an insert
/// can fill by itself:
/// (`table.column`, identity, the default's text: the column's own, else its domain's).
async fn merge_defaults(c: &Client, schema: &str, table: &str) -> Result<Vec<Row>> {
    c.query(
        "WITH RECURSIVE tree(relid) AS (
                  SELECT k.oid FROM pg_class k JOIN pg_namespace n ON n.oid = k.relnamespace
                   WHERE n.nspname = $1::text AND k.relname = $2::text
                  UNION
                  SELECT i.inhrelid FROM tree t JOIN pg_inherits i ON i.inhparent = t.relid),
              -- The views over them, whose own defaults an insert through the view uses
              -- (the plan names only the table).
              views(relid) AS (
                  SELECT w.ev_class FROM pg_rewrite w
                    JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = w.oid
                   WHERE d.refobjid IN (SELECT relid FROM tree) AND w.ev_class <> d.refobjid
                  UNION
                  SELECT w.ev_class FROM views v
                    JOIN pg_depend d ON d.refobjid = v.relid AND d.classid = 'pg_rewrite'::regclass
                    JOIN pg_rewrite w ON w.oid = d.objid AND w.ev_class <> v.relid),
              rels AS (SELECT relid FROM tree UNION SELECT relid FROM views)
         SELECT format('%s.%I', a.attrelid::regclass, a.attname), a.attidentity <> '',
                coalesce(pg_get_expr(d.adbin, d.adrelid), ty.typdefault)
           FROM pg_attribute a JOIN rels ON a.attrelid = rels.relid
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
           LEFT JOIN pg_type ty ON ty.oid = a.atttypid AND ty.typtype = 'd'
          WHERE a.attnum > 0 AND NOT a.attisdropped
            AND (a.attidentity <> '' OR d.oid IS NOT NULL OR ty.typdefault IS NOT NULL)
          ORDER BY 1",
        &[&schema, &table],
    )
    .await
    .map_err(|e| {
        db_error(
            "looking at the defaults of a table the statement writes",
            &e,
        )
    })
}

/// The columns a foreign key's SET DEFAULT fills in when a write of `schema.table` (or its
/// cascade) deletes or updates the rows they reference, in the same form as `merge_defaults`.
async fn set_defaults(c: &Client, schema: &str, table: &str) -> Result<Vec<Row>> {
    c.query(
        &format!(
            "{WRITTEN}
             SELECT format('%s.%I, by %s', a.attrelid::regclass, a.attname, k.conname),
                    a.attidentity <> '', coalesce(pg_get_expr(d.adbin, d.adrelid), ty.typdefault)
               FROM pg_constraint k
               JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = ANY(k.conkey)
               LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
               LEFT JOIN pg_type ty ON ty.oid = a.atttypid AND ty.typtype = 'd'
              WHERE k.contype = 'f' AND 'd' IN (k.confdeltype, k.confupdtype)
                AND k.confrelid IN (SELECT rel FROM written)
                AND (a.attidentity <> '' OR d.oid IS NOT NULL OR ty.typdefault IS NOT NULL)
              ORDER BY 1"
        ),
        &[&schema, &table],
    )
    .await
    .map_err(|e| {
        db_error(
            "looking at the defaults a foreign key's SET DEFAULT fills in",
            &e,
        )
    })
}

/// The first of `columns` (as `merge_defaults` gives them) whose default has an effect past
/// the transaction: an identity column (its sequence), or a default that calls a volatile
/// function `calls_in` counts. All the defaults are read in one pass first; only when some
/// default counts is each read alone, to name its column.
async fn drawing_default(c: &Client, columns: &[Row]) -> Result<Option<String>> {
    if let Some(r) = columns.iter().find(|r| r.get::<_, bool>(1)) {
        return Ok(Some(r.get(0)));
    }
    let draws = async |text: &str| -> Result<bool> {
        Ok(!calls_in(c, &serde_json::Value::Null, text)
            .await?
            .is_empty())
    };
    let texts: Vec<(String, String)> = columns
        .iter()
        .filter_map(|r| r.get::<_, Option<String>>(2).map(|t| (r.get(0), t)))
        .collect();
    let all: Vec<&str> = texts.iter().map(|(_, t)| t.as_str()).collect();
    if all.is_empty() || !draws(&all.join(",\n")).await? {
        return Ok(None);
    }
    for (column, text) in &texts {
        if draws(text).await? {
            return Ok(Some(column.clone()));
        }
    }
    // Read together they count, alone none does: count them all, on the safe side.
    let columns: Vec<&str> = texts.iter().map(|(c, _)| c.as_str()).collect();
    Ok(Some(columns.join(", ")))
}
