//! What the functions a piece of SQL reaches read, followed to the end, for the effect check:
//! a function may be STABLE, as reading is, and read a foreign table, whose server then works
//! in a transaction of its own that is not read-only (a remote view calling `nextval` draws;
//! `plan` rolls back and `verify` reads only in this database). From each function outside the
//! catalog the walk goes to the functions and relations its body names as a word (the source
//! text, unless the language is C or internal, where it is a symbol), to those a SQL-standard
//! body depends on (`pg_depend`: its source text is empty), from a view to what its rule
//! depends on, and from a table to its partitions and inheritance children. A name built at
//! run time (`EXECUTE`, a C function) is not seen; a word that only looks like a name (a
//! column, a comment) is followed too, which errs on the safe side.

use super::errors::db_error;
use crate::error::Result;
use std::collections::HashSet;
use tokio_postgres::Client;

/// The source text of the functions $1 that have one to read (not C or internal, where it is
/// a symbol; not SQL-standard, where it is empty), with the name of each.
const BODIES: &str = "
    SELECT p.oid::regprocedure::text, p.prosrc FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
     WHERE p.oid = ANY($1::oid[]) AND l.lanname NOT IN ('c', 'internal') AND p.prosrc <> ''";

/// The names, lower case, of the functions and relations `STEP` follows that are not one word
/// of ASCII letters, digits and `_` (`"a b"`, `"ça"`): searched for in the bodies as text.
const ODD: &str = r#"
    SELECT DISTINCT lower(n.name) FROM (
        SELECT p.proname::text AS name, p.pronamespace AS nsp FROM pg_proc p
        UNION ALL
        SELECT k.relname::text, k.relnamespace FROM pg_class k
         WHERE k.relkind IN ('f', 'v', 'p') OR k.relhassubclass) n
      JOIN pg_namespace s ON s.oid = n.nsp
     WHERE s.nspname NOT IN ('pg_catalog', 'information_schema') AND s.nspname !~ '^pg_toast'
       AND n.name !~ '^[A-Za-z0-9_]+$'"#;

/// One step of the walk from the functions $1 and the relations $2, whose bodies hold the
/// words $3 (lower case; $4: the function each is in): the functions and relations (views,
/// foreign tables, tables with partitions or children) outside the catalog they name or depend
/// on, as (kind: `f` function or `r` relation, oid, and for a foreign table the server it
/// reaches, named for the operator with the function or view it was found in).
const STEP: &str = r#"
    WITH ours AS (
        SELECT oid FROM pg_namespace
         WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname !~ '^pg_toast'),
    named(kind, oid, name) AS (
        SELECT 'f', p.oid, lower(p.proname) FROM pg_proc p
         WHERE p.pronamespace IN (SELECT oid FROM ours)
        UNION ALL
        SELECT 'r', k.oid, lower(k.relname) FROM pg_class k
         WHERE k.relnamespace IN (SELECT oid FROM ours)
           AND (k.relkind IN ('f', 'v', 'p') OR k.relhassubclass)),
    next(kind, oid, via) AS (
        SELECT n.kind, n.oid, w.via FROM unnest($3::text[], $4::text[]) AS w(word, via)
          JOIN named n ON n.name = w.word
        UNION ALL
        SELECT CASE WHEN d.refclassid = 'pg_proc'::regclass THEN 'f' ELSE 'r' END, d.refobjid,
               d.objid::regprocedure::text
          FROM pg_depend d
         WHERE d.classid = 'pg_proc'::regclass AND d.objid = ANY($1::oid[])
           AND d.refclassid IN ('pg_proc'::regclass, 'pg_class'::regclass)
        UNION ALL
        SELECT CASE WHEN d.refclassid = 'pg_proc'::regclass THEN 'f' ELSE 'r' END, d.refobjid,
               w.ev_class::regclass::text
          FROM pg_rewrite w JOIN pg_depend d
            ON d.classid = 'pg_rewrite'::regclass AND d.objid = w.oid
         WHERE w.ev_class = ANY($2::oid[]) AND d.refobjid <> w.ev_class
           AND d.refclassid IN ('pg_proc'::regclass, 'pg_class'::regclass)
        UNION ALL
        SELECT 'r', i.inhrelid, i.inhparent::regclass::text FROM pg_inherits i
         WHERE i.inhparent = ANY($2::oid[]))
    SELECT DISTINCT ON (n.kind, n.oid) n.kind, n.oid,
           CASE WHEN ft.ftrelid IS NOT NULL
                THEN format('the foreign server of %s (server %s, read in %s)',
                            ft.ftrelid::regclass, s.srvname, n.via) END
      FROM next n
      LEFT JOIN pg_foreign_table ft ON n.kind = 'r' AND ft.ftrelid = n.oid
      LEFT JOIN pg_foreign_server s ON s.oid = ft.ftserver
     ORDER BY n.kind, n.oid, n.via"#;

/// How many steps the walk takes at most: a chain of functions and views longer than this is
/// not followed to its end.
const STEPS: usize = 32;

/// The foreign servers that the functions `start` (oids) read, directly or through what they
/// call and read, as `the foreign server of T (server S, read in F)`.
pub async fn foreign_servers(c: &Client, start: Vec<u32>) -> Result<Vec<String>> {
    let failed = |e: tokio_postgres::Error| {
        db_error("reading what the functions the spec's SQL calls read", &e)
    };
    if start.is_empty() {
        return Ok(Vec::new());
    }
    let mut seen: HashSet<(String, u32)> = start.iter().map(|&o| ("f".into(), o)).collect();
    let (mut fns, mut rels) = (start, Vec::<u32>::new());
    let mut found = Vec::new();
    let odd: Vec<String> = c
        .query(ODD, &[])
        .await
        .map_err(failed)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for _ in 0..STEPS {
        if fns.is_empty() && rels.is_empty() {
            break;
        }
        let (mut words, mut vias) = (Vec::new(), Vec::new());
        for r in c.query(BODIES, &[&fns]).await.map_err(failed)? {
            let (name, body): (String, String) = (r.get(0), r.get(1));
            let lower = body.to_lowercase();
            let mut in_body: Vec<String> = body
                .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                .filter(|w| !w.is_empty())
                .map(str::to_ascii_lowercase)
                .chain(odd.iter().filter(|n| lower.contains(n.as_str())).cloned())
                .collect();
            in_body.sort_unstable();
            in_body.dedup();
            vias.extend(std::iter::repeat_n(name, in_body.len()));
            words.extend(in_body);
        }
        let rows = c
            .query(STEP, &[&fns, &rels, &words, &vias])
            .await
            .map_err(failed)?;
        (fns, rels) = (Vec::new(), Vec::new());
        for r in rows {
            let (kind, oid, foreign): (String, u32, Option<String>) =
                (r.get(0), r.get(1), r.get(2));
            found.extend(foreign);
            if seen.insert((kind.clone(), oid)) {
                if kind == "f" {
                    fns.push(oid)
                } else {
                    rels.push(oid)
                }
            }
        }
    }
    found.sort();
    found.dedup();
    Ok(found)
}
