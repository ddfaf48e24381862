//! Whether a trigger that a write fires could do what no rollback undoes, for `hidden`: its
//! function's body is read, as `plan` reads the statement. A PL/pgSQL function that only
//! computes (an `updated_at` stamp, a check that raises) lets the sample run; one whose body
//! writes (`INSERT`, `UPDATE`, `DELETE`, `MERGE`, `EXECUTE` and kin: the tables written may
//! draw from their sequences or fire triggers of their own), calls a function `calls_in`
//! counts (in any schema: the function may set a search path of its own), reads a foreign
//! table (`reads`), or whose `WHEN` does, counts; so does a function in any other language,
//! whose body is not read, but for a few known to only compute the row (`HARMLESS_TRIGGERS`:
//! `tsvector_update_trigger`, `suppress_redundant_updates_trigger`, contrib's `moddatetime`).

use super::cascade::WRITTEN;
use super::effects::calls_in_body;
use super::errors::db_error;
use super::mentions::says_write;
use crate::error::Result;
use std::collections::HashSet;
use tokio_postgres::Client;

/// Trigger functions in C or internal known to only compute the row: (library, or
/// `pg_catalog` for the built-ins, and C symbol).
const HARMLESS_TRIGGERS: &[(&str, &str)] = &[
    ("pg_catalog", "tsvector_update_trigger_byid"),
    ("pg_catalog", "tsvector_update_trigger_bycolumn"),
    ("pg_catalog", "suppress_redundant_updates_trigger"),
    ("moddatetime", "moddatetime"),
    ("insert_username", "insert_username"),
];

/// The enabled triggers of the tables a write of `$1.$2` reaches (`WRITTEN`): name (as
/// `trigger on table`), function, its language and body, the trigger's definition, and for a
/// function in C or internal whether `HARMLESS_TRIGGERS` ($3, $4) names it.
fn triggers() -> String {
    format!(
        r#"{WRITTEN}
         SELECT format('%s on %s', t.tgname, t.tgrelid::regclass), t.tgfoid, l.lanname::text,
                p.prosrc, pg_get_triggerdef(t.oid),
                l.lanname IN ('c', 'internal')
                AND (CASE WHEN l.lanname = 'internal' AND n.nspname = 'pg_catalog'
                          THEN 'pg_catalog'
                          ELSE regexp_replace(coalesce(p.probin, ''), '^.*/|\.[^./]*$', '', 'g')
                     END, p.prosrc) IN (SELECT * FROM unnest($3::text[], $4::text[]))
           FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
           JOIN pg_namespace n ON n.oid = p.pronamespace
           JOIN pg_language l ON l.oid = p.prolang
          WHERE t.tgrelid IN (SELECT rel FROM written)
            AND NOT t.tgisinternal AND t.tgenabled <> 'D'
          ORDER BY 1"#
    )
}

/// The first trigger a write of `schema.table` (or its cascade) fires that could do what no
/// rollback undoes, as `a trigger (T on R) that …`.
pub async fn fired(c: &Client, schema: &str, table: &str) -> Result<Option<String>> {
    let (libraries, symbols): (Vec<&str>, Vec<&str>) = HARMLESS_TRIGGERS.iter().copied().unzip();
    let rows = c
        .query(&triggers(), &[&schema, &table, &libraries, &symbols])
        .await
        .map_err(|e| db_error("looking for the triggers a write fires", &e))?;
    // A partition's copy of its parent's trigger has the same function and WHEN: read once.
    let mut read: HashSet<(u32, String)> = HashSet::new();
    for r in rows {
        let (name, function, language, body, definition): (String, u32, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        let known: bool = r.get(5);
        // What the definition says between the table's name and the function: timing, events,
        // WHEN (the table's own name is left out, so that copies compare equal).
        let when = definition
            .find(" FOR EACH ")
            .zip(definition.rfind(" EXECUTE "))
            .map_or(definition.as_str(), |(a, b)| &definition[a..b.max(a)]);
        if known || !read.insert((function, when.to_string())) {
            continue;
        }
        if language != "plpgsql" {
            return Ok(Some(format!(
                "a trigger ({name}) whose function is in {language}, which plan does not read"
            )));
        }
        if says_write(&body) {
            return Ok(Some(format!(
                "a trigger ({name}) whose function writes (INSERT, UPDATE, DELETE, EXECUTE or \
                 the like)"
            )));
        }
        let calls = calls_in_body(c, &format!("{body}\n{when}"), function).await?;
        if !calls.is_empty() {
            return Ok(Some(format!(
                "a trigger ({name}) that calls or reads {}",
                calls.join(", ")
            )));
        }
    }
    Ok(None)
}
