//! What the functions a piece of SQL reaches run and read, followed to the end, for the effect
//! check: a function may be STABLE, as reading is, and still read a foreign table, whose
//! server then works in a transaction of its own that is not read-only (a remote view calling
//! `nextval` draws; `plan` rolls back and `verify` reads only in this database), or call,
//! directly or through a view, an operator or a domain's CHECK, what draws. From each function
//! outside the catalog the walk goes to the functions and relations its body names as a word
//! (the source text, unless the language is C or internal, where it is a symbol), to those a
//! SQL-standard body depends on, from a view to what its rule depends on, and from a table to
//! its partitions and inheritance children. It hands back the text of every body and view
//! definition it passes (`Walk::visit`), and of what planning over a table named or passed
//! evaluates (`planned`: its indexes' expressions and predicates, its CHECKs, policies and
//! statistics expressions), for `effects` to read as it reads the spec's SQL. A
//! name built at run time (`EXECUTE`, a C function) is not seen; a word that only looks like a
//! name (a column, a comment) is followed too, which errs on the safe side.

use super::errors::db_error;
use super::mentions::says_execute;
use crate::error::Result;
use std::collections::HashSet;
use tokio_postgres::Client;

/// The source text of the functions $1 that have one to read (not C or internal, where it is
/// a symbol), with the name of each; `{body}` is `prosrc`, or on servers with SQL-standard
/// bodies (14 and later: their `prosrc` is empty) that body, deparsed.
fn bodies(sql_standard: bool) -> String {
    let body = if sql_standard {
        "CASE WHEN p.prosqlbody IS NOT NULL THEN pg_get_function_sqlbody(p.oid) ELSE p.prosrc END"
    } else {
        "p.prosrc"
    };
    format!(
        "SELECT p.oid::regprocedure::text, {body} FROM pg_proc p
           JOIN pg_language l ON l.oid = p.prolang
          WHERE p.oid = ANY($1::oid[]) AND l.lanname NOT IN ('c', 'internal')"
    )
}

/// The definitions of the views among the relations $1.
const VIEWS: &str = "
    SELECT pg_get_viewdef(k.oid) FROM pg_class k WHERE k.oid = ANY($1::oid[]) AND k.relkind = 'v'";

/// The names, lower case, of the functions and relations `STEP` follows that are not one word
/// of ASCII letters, digits and `_` (`"a b"`, `"ça"`): searched for in the bodies as text.
const ODD: &str = r#"
    SELECT DISTINCT lower(n.name) FROM (
        SELECT p.proname::text AS name, p.pronamespace AS nsp FROM pg_proc p
        UNION ALL
        SELECT k.relname::text, k.relnamespace FROM pg_class k
         WHERE k.relkind IN ('f', 'v', 'p', 'r', 'm')) n
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
        SELECT n.kind, n.oid, 'read in ' || w.via FROM unnest($3::text[], $4::text[]) AS w(word, via)
          JOIN named n ON n.name = w.word
        UNION ALL
        SELECT CASE WHEN d.refclassid = 'pg_proc'::regclass THEN 'f' ELSE 'r' END, d.refobjid,
               'read in ' || d.objid::regprocedure::text
          FROM pg_depend d
         WHERE d.classid = 'pg_proc'::regclass AND d.objid = ANY($1::oid[])
           AND d.refclassid IN ('pg_proc'::regclass, 'pg_class'::regclass)
        UNION ALL
        SELECT CASE WHEN d.refclassid = 'pg_proc'::regclass THEN 'f' ELSE 'r' END, d.refobjid,
               'read in ' || w.ev_class::regclass::text
          FROM pg_rewrite w JOIN pg_depend d
            ON d.classid = 'pg_rewrite'::regclass AND d.objid = w.oid
         WHERE w.ev_class = ANY($2::oid[]) AND d.refobjid <> w.ev_class
           AND d.refclassid IN ('pg_proc'::regclass, 'pg_class'::regclass)
        UNION ALL
        SELECT 'r', i.inhrelid, 'under ' || i.inhparent::regclass::text FROM pg_inherits i
         WHERE i.inhparent = ANY($2::oid[]))
    SELECT DISTINCT ON (n.kind, n.oid) n.kind, n.oid,
           CASE WHEN ft.ftrelid IS NOT NULL
                THEN format('the foreign server of %s (server %s, %s)',
                            ft.ftrelid::regclass, s.srvname, n.via) END
      FROM next n
      LEFT JOIN pg_foreign_table ft ON n.kind = 'r' AND ft.ftrelid = n.oid
      LEFT JOIN pg_foreign_server s ON s.oid = ft.ftserver
     ORDER BY n.kind, n.oid, n.via"#;

/// What planning a query over the relations $1, or the tables outside the catalog named by
/// one of the words $2 (lower case), evaluates of theirs before anything runs, and of their
/// partitions and inheritance children: the planner folds constant calls in each index's
/// expressions and predicate, each CHECK constraint (constraint exclusion), the partition key,
/// each column's default (an INSERT's plan holds it folded to its value), each row security
/// policy and each extended statistics expression (14 and later:
/// `expressions`) as it first reads them, so an IMMUTABLE-declared function there with
/// constant arguments runs while a plan is only being made (an `EXPLAIN`). Folding runs
/// IMMUTABLE functions only: what else these texts call runs with the rows, if at all.
fn planned(expressions: bool) -> String {
    let stats = if expressions {
        "UNION ALL
         SELECT array_to_string(pg_get_statisticsobjdef_expressions(s.oid), ' ')
           FROM pg_statistic_ext s
          WHERE s.stxrelid IN (SELECT relid FROM rels) AND s.stxexprs IS NOT NULL"
    } else {
        ""
    };
    format!(
        r#"
    WITH RECURSIVE rels(relid) AS (
        SELECT unnest($1::oid[])
        UNION
        SELECT k.oid FROM pg_class k JOIN pg_namespace n ON n.oid = k.relnamespace
         WHERE k.relkind IN ('r', 'p', 'm', 'f') AND lower(k.relname) = ANY($2::text[])
           AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast'
        UNION
        SELECT i.inhrelid FROM rels r JOIN pg_inherits i ON i.inhparent = r.relid)
    SELECT pg_get_expr(e.expr, i.indrelid)
      FROM pg_index i, LATERAL (VALUES (i.indexprs), (i.indpred)) AS e(expr)
     WHERE i.indrelid IN (SELECT relid FROM rels) AND e.expr IS NOT NULL
    UNION ALL
    SELECT pg_get_constraintdef(k.oid) FROM pg_constraint k
     WHERE k.contype = 'c' AND k.conrelid IN (SELECT relid FROM rels)
    UNION ALL
    SELECT pg_get_expr(d.adbin, d.adrelid)
      FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
     WHERE d.adrelid IN (SELECT relid FROM rels) AND a.attgenerated = ''
    UNION ALL
    SELECT pg_get_partkeydef(t.partrelid) FROM pg_partitioned_table t
     WHERE t.partrelid IN (SELECT relid FROM rels)
    UNION ALL
    SELECT pg_get_expr(e.expr, p.polrelid)
      FROM pg_policy p, LATERAL (VALUES (p.polqual), (p.polwithcheck)) AS e(expr)
     WHERE p.polrelid IN (SELECT relid FROM rels) AND e.expr IS NOT NULL
    {stats}"#
    )
}

/// A walk through what functions read and call, remembering what it has passed: each
/// function and relation is stepped from once, however many visits reach it.
pub struct Walk<'a> {
    c: &'a Client,
    seen: HashSet<(String, u32)>,
    /// `ODD`, once read.
    odd: Option<Vec<String>>,
    /// The query for bodies (`bodies`), once the server's version is known.
    bodies: Option<String>,
    /// The query for what planning evaluates (`planned`), likewise.
    planned: Option<String>,
}

/// What a visit found: the foreign servers read (`the foreign server of T (server S, read in
/// F)`), and the text of the bodies and view definitions passed, to be read for what they call.
#[derive(Default)]
pub struct Visited {
    pub foreign: Vec<String>,
    pub texts: Vec<String>,
    /// What planning over the tables named or passed evaluates (`planned`): only the
    /// IMMUTABLE calls in it run while a plan is made (`effects` reads it so).
    pub planned: Vec<String>,
    /// The functions passed whose body runs SQL built at run time (`EXECUTE`), which no
    /// reading of the text can follow.
    pub dynamic: Vec<String>,
}

impl<'a> Walk<'a> {
    pub fn new(c: &'a Client) -> Self {
        Walk {
            c,
            seen: HashSet::new(),
            odd: None,
            bodies: None,
            planned: None,
        }
    }

    /// Follow the functions `start` (oids) to the end of what they read and call.
    pub async fn visit(&mut self, start: &[u32]) -> Result<Visited> {
        let fns: Vec<u32> = start
            .iter()
            .copied()
            .filter(|&o| self.seen.insert(("f".into(), o)))
            .collect();
        let mut out = Visited::default();
        if !fns.is_empty() {
            self.walk(fns, Vec::new(), &mut out).await?;
        }
        Ok(out)
    }

    /// Follow what `sql` (the spec's, as written) names before it is planned: the functions
    /// and views it names as words, to the end (planning may already run a STABLE function it
    /// calls with constant arguments, or one in a view it names), and what planning over the
    /// tables it names evaluates (`planned`). Which tables and foreign tables it reads is left
    /// to its plan (`effects::foreign_in`).
    pub async fn visit_text(&mut self, sql: &str) -> Result<Visited> {
        self.load().await?;
        let odd = self.odd.clone().unwrap_or_default();
        let (words, vias): (Vec<String>, Vec<Option<String>>) =
            words_of(&odd, sql).into_iter().map(|w| (w, None)).unzip();
        let none: &[u32] = &[];
        let rows = self
            .c
            .query(STEP, &[&none, &none, &words, &vias])
            .await
            .map_err(failed)?;
        let mut fns = Vec::new();
        let mut rels = Vec::new();
        let mut out = Visited::default();
        self.planned_over(&[], &words, &mut out).await?;
        for r in rows {
            let (kind, oid): (String, u32) = (r.get(0), r.get(1));
            if kind == "r" {
                rels.push(oid);
            } else if self.seen.insert((kind, oid)) {
                fns.push(oid);
            }
        }
        let views: Vec<u32> = self
            .c
            .query(
                "SELECT oid FROM pg_class WHERE oid = ANY($1::oid[]) AND relkind = 'v'",
                &[&rels],
            )
            .await
            .map_err(failed)?
            .iter()
            .map(|r| r.get(0))
            .filter(|&o| self.seen.insert(("r".into(), o)))
            .collect();
        self.walk(fns, views, &mut out).await?;
        Ok(out)
    }

    /// `ODD` and the query for bodies, read once.
    async fn load(&mut self) -> Result<()> {
        if self.odd.is_some() {
            return Ok(());
        }
        let odd = self.c.query(ODD, &[]).await.map_err(failed)?;
        self.odd = Some(odd.iter().map(|r| r.get(0)).collect());
        let version: i32 = self
            .c
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(failed)?
            .get(0);
        self.bodies = Some(bodies(version >= 140000));
        self.planned = Some(planned(version >= 140000));
        Ok(())
    }

    /// What planning evaluates (`planned`) of the relations `rels` and of the tables named by
    /// `words`, as texts to read.
    async fn planned_over(&self, rels: &[u32], words: &[String], out: &mut Visited) -> Result<()> {
        let sql = self.planned.as_deref().unwrap_or_default();
        for r in self.c.query(sql, &[&rels, &words]).await.map_err(failed)? {
            out.planned.push(r.get(0));
        }
        Ok(())
    }

    /// Step from the functions `fns` and the relations `rels` until nothing new is reached.
    async fn walk(
        &mut self,
        mut fns: Vec<u32>,
        mut rels: Vec<u32>,
        out: &mut Visited,
    ) -> Result<()> {
        self.load().await?;
        let odd = self.odd.clone().unwrap_or_default();
        let bodies = self.bodies.clone().unwrap_or_default();
        while !(fns.is_empty() && rels.is_empty()) {
            // Each word once, with the first body it is in.
            let mut words: Vec<(String, String)> = Vec::new();
            for r in self.c.query(&bodies, &[&fns]).await.map_err(failed)? {
                let (name, body): (String, Option<String>) = (r.get(0), r.get(1));
                let Some(body) = body else { continue };
                if says_execute(&body) {
                    out.dynamic.push(name.clone());
                }
                words.extend(words_of(&odd, &body).into_iter().map(|w| (w, name.clone())));
                out.texts.push(body);
            }
            words.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            words.dedup_by(|a, b| a.0 == b.0);
            let (words, vias): (Vec<String>, Vec<String>) = words.into_iter().unzip();
            for r in self.c.query(VIEWS, &[&rels]).await.map_err(failed)? {
                out.texts.push(r.get(0));
            }
            self.planned_over(&rels, &words, out).await?;
            let rows = self
                .c
                .query(STEP, &[&fns, &rels, &words, &vias])
                .await
                .map_err(failed)?;
            (fns, rels) = (Vec::new(), Vec::new());
            for r in rows {
                let (kind, oid, foreign): (String, u32, Option<String>) =
                    (r.get(0), r.get(1), r.get(2));
                out.foreign.extend(foreign);
                if self.seen.insert((kind.clone(), oid)) {
                    if kind == "f" {
                        fns.push(oid)
                    } else {
                        rels.push(oid)
                    }
                }
            }
        }
        Ok(())
    }
}

/// The words of `text` as names match them, lower case (ASCII only, as Postgres's lower()
/// under the names' collation, "C"), and the `odd` names it holds as text.
fn words_of(odd: &[String], text: &str) -> Vec<String> {
    let lower = text.to_ascii_lowercase();
    lower
        .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .chain(odd.iter().filter(|n| lower.contains(n.as_str())).cloned())
        .collect()
}

/// A catalog query of the walk failed.
fn failed(e: tokio_postgres::Error) -> crate::error::Error {
    db_error("reading what the functions the spec's SQL calls read", &e)
}
