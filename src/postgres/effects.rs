//! What SQL from the spec could do that no rollback and no read-only transaction undoes: the
//! volatile functions it would call (`nextval`, a plpgsql function that inserts and so draws a
//! serial, `dblink_exec`, which writes through a connection of its own). `plan` runs no sample
//! over them and `verify` refuses them: those commands promise to write nothing, whatever the
//! spec says. The names, operators and `::` types are read (`mentions`) from
//! `EXPLAIN (VERBOSE)` (views and SQL functions expanded there) and from the SQL as written
//! (MERGE and ON CONFLICT actions, LIMIT), then looked up in the catalog with what they reach:
//! an operator's function, an aggregate's steps, a cast's function. What those reach is read
//! the same way, to the end: the CHECKs of the domains named and of the tables written (and
//! their domain columns), those tables' row security policies, index expressions and
//! predicates and generated columns, the support functions of operator families made in the
//! database (sorts, joins and indexes run them unnamed), and the bodies and views of every
//! function reached, of any volatility (`reads`). What a write runs out of the plan's
//! sight (triggers, a cascade's rules, defaults) is `hidden`'s. A cast a plan does not print
//! counts through such a function: an implicit one whatever it casts from, an assignment one
//! when it casts to a written column's type. The SQL is read unplanned first
//! (`outside_calls`): planning alone may run a STABLE function it calls with constant
//! arguments. A foreign table in the plan (or a partition of a written table that
//! is one, or one that a function reached reads, even a STABLE one) counts as its server: what
//! runs there is out of sight, and not under this transaction. Not seen: what a function runs
//! from text built at run time (`EXECUTE`) or in C, but for the built-ins' own effects.

use super::errors::db_error;
use super::mentions::Mentions;
use super::reads::Walk;
use crate::error::Result;
use std::collections::HashSet;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

/// The volatile built-ins known to have no effect past the transaction or on other sessions:
/// they read (the clock, sizes, `pg_lock_status` behind `pg_locks`, files and the WAL's
/// position), draw random numbers, sleep, or take locks, settings and notifications that end
/// with the transaction or with the engine's own session (`setseed`, `set_config`;
/// `pg_notify` is sent at commit, and dropped by a rollback). Every other
/// volatile function counts: in `pg_catalog` (a sequence drawn, a backend ended, a BRIN or GIN
/// index rewritten even in a read-only transaction, a slot or the WAL written, and
/// `query_to_xml` or `ts_stat`, which run SQL given as text, invisible to EXPLAIN) and outside
/// it alike. A list of the harmless ones, not of the harmful: a built-in it does not name (one
/// a later Postgres adds) counts, where a list of effects let every one it missed through.
const HARMLESS: &[&str] = &[
    "amvalidate",
    "bernoulli",
    "clock_timestamp",
    "current_query",
    "currtid2",
    "currval",
    "gen_random_uuid",
    "lastval",
    "lo_close",
    "lo_get",
    "lo_lseek",
    "lo_lseek64",
    "lo_open",
    "lo_tell",
    "lo_tell64",
    "loread",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_blocking_pids",
    "pg_collation_actual_version",
    "pg_control_checkpoint",
    "pg_control_init",
    "pg_control_recovery",
    "pg_control_system",
    "pg_current_logfile",
    "pg_current_wal_flush_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_lsn",
    "pg_database_collation_actual_version",
    "pg_database_size",
    "pg_export_snapshot",
    "pg_get_backend_memory_contexts",
    "pg_get_multixact_members",
    "pg_get_shmem_allocations",
    "pg_get_wal_replay_pause_state",
    "pg_get_wal_resource_managers",
    "pg_hba_file_rules",
    "pg_ident_file_mappings",
    "pg_indexes_size",
    "pg_is_in_recovery",
    "pg_is_wal_replay_paused",
    "pg_isolation_test_session_is_blocked",
    "pg_jit_available",
    "pg_last_committed_xact",
    "pg_last_wal_receive_lsn",
    "pg_last_wal_replay_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_lock_status",
    "pg_notify",
    "pg_ls_archive_statusdir",
    "pg_ls_dir",
    "pg_ls_logdir",
    "pg_ls_logicalmapdir",
    "pg_ls_logicalsnapdir",
    "pg_ls_replslotdir",
    "pg_ls_tmpdir",
    "pg_ls_waldir",
    "pg_notification_queue_usage",
    "pg_partition_ancestors",
    "pg_partition_tree",
    "pg_prepared_xact",
    "pg_read_binary_file",
    "pg_read_file",
    "pg_read_file_old",
    "pg_relation_size",
    "pg_replication_origin_progress",
    "pg_replication_origin_session_is_setup",
    "pg_replication_origin_session_progress",
    "pg_safe_snapshot_blocking_pids",
    "pg_sequence_last_value",
    "pg_show_all_file_settings",
    "pg_show_replication_origin_status",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "pg_stat_clear_snapshot",
    "pg_stat_file",
    "pg_stat_get_recovery_prefetch",
    "pg_stat_get_xact_blocks_fetched",
    "pg_stat_get_xact_blocks_hit",
    "pg_stat_get_xact_function_calls",
    "pg_stat_get_xact_function_self_time",
    "pg_stat_get_xact_function_total_time",
    "pg_stat_get_xact_numscans",
    "pg_stat_get_xact_tuples_deleted",
    "pg_stat_get_xact_tuples_fetched",
    "pg_stat_get_xact_tuples_hot_updated",
    "pg_stat_get_xact_tuples_inserted",
    "pg_stat_get_xact_tuples_returned",
    "pg_stat_get_xact_tuples_updated",
    "pg_stat_have_stats",
    "pg_table_size",
    "pg_tablespace_size",
    "pg_total_relation_size",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "pg_xact_commit_timestamp",
    "pg_xact_commit_timestamp_origin",
    "pg_xact_status",
    "random",
    "random_normal",
    "set_config",
    "setseed",
    "system",
    "timeofday",
    "txid_status",
    // Postgres 18's; a name the server lacks matches nothing.
    "uuidv4",
    "uuidv7",
];

/// Volatile functions of contrib extensions, in C, known to have no effect past the
/// transaction: they draw random numbers (uuid-ossp's UUIDs, pgcrypto's random bytes, UUIDs,
/// salts, and the session keys its `pgp_*_encrypt` draw). Named by library and C symbol: a
/// C function can only be created by a superuser, and a function of the same name in
/// another language (a plpgsql `uuid_generate_v4` that inserts) still counts.
const HARMLESS_C: &[(&str, &str)] = &[
    ("uuid-ossp", "uuid_generate_v1"),
    ("uuid-ossp", "uuid_generate_v1mc"),
    ("uuid-ossp", "uuid_generate_v4"),
    ("pgcrypto", "pg_gen_salt"),
    ("pgcrypto", "pg_gen_salt_rounds"),
    ("pgcrypto", "pg_random_bytes"),
    ("pgcrypto", "pg_random_uuid"),
    ("pgcrypto", "pgp_sym_encrypt_text"),
    ("pgcrypto", "pgp_sym_encrypt_bytea"),
    ("pgcrypto", "pgp_pub_encrypt_text"),
    ("pgcrypto", "pgp_pub_encrypt_bytea"),
    // TABLESAMPLE methods: they pick the rows a scan reads.
    ("tsm_system_rows", "tsm_system_rows_handler"),
    ("tsm_system_time", "tsm_system_time_handler"),
];

/// C functions of contrib extensions that run SQL given as text, whatever their volatility
/// (tablefunc's `crosstab` and `connectby` are STABLE): what that SQL does, no plan shows.
/// Named by library and C symbol, as `HARMLESS_C`.
const RUNS_TEXT_C: &[(&str, &str)] = &[
    ("tablefunc", "crosstab"),
    ("tablefunc", "crosstab_hash"),
    ("tablefunc", "connectby_text"),
    ("tablefunc", "connectby_text_serial"),
    ("pgxml", "xpath_table"),
];

/// The oids of the relations named in the query parameter `param` (a `text[]` of
/// `"schema"."table"`, as `quoted` writes them), found in the catalog by name: a `::regclass`
/// cast needs USAGE on the schema, which a role that reads through a view over it may lack.
fn named(param: &str) -> String {
    format!(
        r#"SELECT k.oid FROM pg_class k JOIN pg_namespace n ON n.oid = k.relnamespace
            WHERE '"' || replace(n.nspname, '"', '""') || '"."' || replace(k.relname, '"', '""')
                  || '"' = ANY({param}::text[])"#
    )
}

/// `HARMLESS`, as a query parameter.
fn harmless() -> Vec<String> {
    HARMLESS.iter().map(|s| s.to_string()).collect()
}

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

/// The volatile functions (as `schema.name`, with how they are reached) that `sql` would
/// call: every one but the built-ins in `HARMLESS`. Only explains
/// `sql` (planning may still run STABLE functions, as Postgres's planner does for any query);
/// `params` as `sql` takes them.
pub async fn outside_calls(
    c: &Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<String>> {
    // Planning may run what the SQL calls (a STABLE function with constant arguments, while
    // estimating): read it unplanned first, and plan it only if that finds nothing.
    let unplanned = calls_in(c, &serde_json::Value::Null, sql).await?;
    if !unplanned.is_empty() {
        return Ok(unplanned);
    }
    match explain(c, sql, params, "explaining the spec's SQL").await? {
        Some(doc) => calls_in(c, &doc, sql).await,
        None => Ok(Vec::new()),
    }
}

/// `outside_calls` of `sql`, already explained (`doc`, from `explain`). What it names is read
/// from the plan (views and SQL functions expanded) and from `sql` as written (MERGE and ON
/// CONFLICT actions and LIMIT are not printed in a plan): functions and aggregates by name,
/// operators by symbol, casts and domains by the type after `::`. Then the CHECK constraints
/// that a write evaluates without printing them, the written tables' and their domain
/// columns', and those of the domains named, are read the same way, a few levels deep. The
/// foreign tables it reaches, in the plan (`foreign`) or read by a function it reaches
/// (`reads`), are named by their server.
pub async fn calls_in(c: &Client, doc: &serde_json::Value, sql: &str) -> Result<Vec<String>> {
    without_jit(c, read_all(c, doc, sql, None)).await
}

/// `calls_in` of a function's body (a trigger's, with its `WHEN`), the function `function`
/// walked from as well (what its body reads): its names may resolve on a search path of its
/// own (`SET search_path` on the function), so a name counts in every schema, not only where
/// this session's path would find it.
pub async fn calls_in_body(c: &Client, body: &str, function: u32) -> Result<Vec<String>> {
    without_jit(
        c,
        read_all(c, &serde_json::Value::Null, body, Some(function)),
    )
    .await
}

/// `fut`, with JIT off for the check's catalog queries until the end of the transaction they
/// run in, then as it was: their estimates pass `jit_above_cost` on a big catalog, and
/// compiling them takes longer than running them.
async fn without_jit<T>(c: &Client, fut: impl Future<Output = Result<T>>) -> Result<T> {
    let jit: String = c
        .query_one(
            "SELECT current_setting('jit'), set_config('jit', 'off', true)",
            &[],
        )
        .await
        .map_err(|e| db_error("turning JIT off for the effect check", &e))?
        .get(0);
    let out = fut.await?;
    c.execute("SELECT set_config('jit', $1, true)", &[&jit])
        .await
        .map_err(|e| db_error("turning JIT back on after the effect check", &e))?;
    Ok(out)
}

/// What `sql` (or, with `function`, that function's body: every name then counts in every
/// schema) reaches, read to the end.
async fn read_all(
    c: &Client,
    doc: &serde_json::Value,
    sql: &str,
    function: Option<u32>,
) -> Result<Vec<String>> {
    let mut texts = Vec::new();
    strings(doc, &mut texts);
    let mut m = Mentions::default();
    texts.iter().for_each(|t| m.read(t));
    m.read(sql);
    let written: Vec<String> = written_tables(doc, sql)
        .into_iter()
        .map(|(schema, table, _)| format!("{}.{}", quoted(schema), quoted(table)))
        .collect();
    let mut relations = Vec::new();
    for query in doc.as_array().into_iter().flatten() {
        relations_in(&query["Plan"], &mut relations);
    }
    relations.sort();
    relations.dedup();
    let mut found = foreign_in(c, doc, &relations, &written).await?;
    let harmless = harmless();
    let (libraries, symbols): (Vec<&str>, Vec<&str>) = HARMLESS_C.iter().copied().unzip();
    let (runs_text_libraries, runs_text_symbols): (Vec<&str>, Vec<&str>) =
        RUNS_TEXT_C.iter().copied().unzip();
    // Texts read so far: the SQL, then the CHECKs, policies, function bodies and view
    // definitions it reaches, each read in turn for what it reaches, to the end.
    let mut read: HashSet<String> = HashSet::new();
    let mut walk = Walk::new(c);
    // What the SQL names as written: the views, foreign tables and functions, to the end.
    let named = walk.visit_text(sql).await?;
    found.extend(named.foreign);
    found.extend(named.dynamic.iter().map(|f| runs_built_sql(f)));
    let mut carried = named.texts;
    // What planning over the tables named folds (IMMUTABLE calls only).
    let mut folded = named.planned;
    let mut folded_read: HashSet<String> = HashSet::new();
    let mut any_path = function.is_some();
    let mut reached: Vec<u32> = function.into_iter().collect();
    let mut tables: &[String] = &written;
    loop {
        m.tidy();
        let (schemas, names): (Vec<String>, Vec<String>) =
            m.qualified_calls.iter().cloned().unzip();
        let writes = !written.is_empty();
        let rows = c
            .query(
                &lookup(),
                &[
                    &m.calls,
                    &m.operators,
                    &m.types,
                    &harmless,
                    &schemas,
                    &names,
                    &writes,
                    &libraries,
                    &symbols,
                    &any_path,
                    &runs_text_libraries,
                    &runs_text_symbols,
                    &written,
                ],
            )
            .await
            .map_err(|e| db_error("looking up the functions the spec's SQL calls", &e))?;
        for r in &rows {
            match r.get::<_, Option<String>>(0) {
                Some(name) => found.push(name),
                None => reached.push(r.get(1)),
            }
        }
        // The checks a write of these tables, or a cast to these domains, evaluates.
        let mut texts: Vec<String> = c
            .query(&checks(), &[&m.types, &tables])
            .await
            .map_err(|e| db_error("reading the CHECK constraints the spec's SQL meets", &e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        // The IMMUTABLE functions what planning folds calls, and then what they read and call.
        folded.retain(|t| folded_read.insert(t.clone()));
        if !folded.is_empty() {
            reached.extend(immutable_in(c, &folded).await?);
            folded.clear();
        }
        // What the functions reached read, call and say.
        let visited = walk.visit(&reached).await?;
        folded.extend(visited.planned);
        found.extend(visited.foreign);
        found.extend(visited.dynamic.iter().map(|f| runs_built_sql(f)));
        texts.extend(visited.texts);
        texts.append(&mut carried);
        texts.retain(|t| read.insert(t.clone()));
        if texts.is_empty() && folded.is_empty() {
            break;
        }
        // Bodies may resolve names on a path of their own; CHECKs and views are deparsed
        // for this session's, which is then only the safe side.
        m = Mentions::default();
        texts.iter().for_each(|t| m.read_body(t));
        (any_path, reached, tables) = (true, Vec::new(), &[]);
    }
    found.sort();
    found.dedup();
    Ok(found)
}

/// The IMMUTABLE functions outside the catalog that `texts` (what planning folds: see
/// `reads::planned`) call by name or through an operator: folding runs those, and only those,
/// while a plan is made. A name counts in every schema (the safe side).
async fn immutable_in(c: &Client, texts: &[String]) -> Result<Vec<u32>> {
    let mut m = Mentions::default();
    texts.iter().for_each(|t| m.read_body(t));
    m.tidy();
    let (schemas, names): (Vec<String>, Vec<String>) = m.qualified_calls.iter().cloned().unzip();
    let rows = c
        .query(
            "SELECT p.oid FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE p.provolatile = 'i' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                AND (p.proname = ANY($1::text[])
                     OR p.oid IN (SELECT o.oprcode::oid FROM pg_operator o
                                   WHERE o.oprname = ANY($2::text[]))
                     OR (n.nspname, p.proname) IN (SELECT * FROM unnest($3::text[], $4::text[])))",
            &[&m.calls, &m.operators, &schemas, &names],
        )
        .await
        .map_err(|e| db_error("looking up the functions planning folds", &e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// How a function that runs SQL built at run time is named for the operator.
fn runs_built_sql(function: &str) -> String {
    format!("{function}, which runs SQL built at run time (EXECUTE) that no check can read")
}

/// The functions the SQL reaches, in one list: the volatile ones with an effect past the
/// transaction (all but $4, the `HARMLESS` built-ins, and the C functions of $8 (library) and
/// $9 (symbol), `HARMLESS_C`), and the C functions that run SQL given as text ($11, $12:
/// `RUNS_TEXT_C`), by name and how they are reached; and, by oid, every one outside the
/// catalog, of any volatility, for `reads::Walk` to follow to what it reads and calls.
/// A function is reached through the names ($1 bare; $5, $6 schema and name when qualified),
/// operator symbols ($2) and `::` types ($3) of `Mentions`. A bare name or symbol counts unless
/// a schema earlier on the search path has one of the same name and argument types, which the
/// parser would take instead (unless $10: a function's body, which may have a path of its
/// own): pgcrypto's `public.gen_random_uuid()` is not the `gen_random_uuid()` of
/// `pg_catalog`. (Which overload a call takes needs its argument types, which the text does
/// not give: every overload not so hidden counts, so another type's volatile `=` still does.)
/// An operator's estimators run while planning, so they count too. So do the support
/// functions of operator families made in this database (and their operators' functions, and
/// range types' subtype differences), whatever the SQL names: sorting, grouping, joining,
/// scanning an index or writing one runs them with no name or symbol in any text (a `json`
/// key with a btree class of its own, ordered by the engine's walk). Implicit casts, and
/// assignment casts when something is written ($7), leave no trace in a plan's text (an
/// `int` result assigned to an enum column): every implicit one through a function with an
/// effect counts, whatever it casts from, and every such assignment cast to a column type of
/// the tables written ($13, `"schema"."table"`).
fn lookup() -> String {
    format!(
        r#"
    WITH RECURSIVE eff AS (
        SELECT p.oid, format('%s.%s', n.nspname, p.proname) AS name
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE (p.provolatile = 'v' AND (n.nspname <> 'pg_catalog' OR NOT p.proname = ANY($4::text[]))
                AND NOT (p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'c')
                         AND (regexp_replace(p.probin, '^.*/|\.[^./]*$', '', 'g'), p.prosrc)
                             IN (SELECT * FROM unnest($8::text[], $9::text[]))))
            -- STABLE, but they read a table, view or foreign table named as text, which no
            -- plan shows (a view's volatile function, a foreign server).
            OR (p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'c')
                AND (regexp_replace(p.probin, '^.*/|\.[^./]*$', '', 'g'), p.prosrc)
                    IN (SELECT * FROM unnest($11::text[], $12::text[])))
            OR (n.nspname = 'pg_catalog' AND p.proname IN (
                'table_to_xml', 'table_to_xmlschema', 'table_to_xml_and_xmlschema',
                'schema_to_xml', 'schema_to_xmlschema', 'schema_to_xml_and_xmlschema',
                'database_to_xml', 'database_to_xmlschema', 'database_to_xml_and_xmlschema',
                'cursor_to_xml', 'cursor_to_xmlschema'))),
    path AS (
        SELECT n.oid AS nsp, p.ord
          FROM unnest(current_schemas(true)) WITH ORDINALITY AS p(s, ord)
          JOIN pg_namespace n ON n.nspname = p.s),
    called AS (
        SELECT p.oid FROM pg_proc p LEFT JOIN path ON path.nsp = p.pronamespace
         WHERE p.proname = ANY($1::text[])
           AND ($10 OR NOT EXISTS (SELECT 1 FROM pg_proc f JOIN path q ON q.nsp = f.pronamespace
                            WHERE f.proname = p.proname AND f.proargtypes = p.proargtypes
                              AND q.ord < coalesce(path.ord, 2147483647)))
        UNION
        SELECT p.oid FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          JOIN unnest($5::text[], $6::text[]) AS w(s, f) ON w.s = n.nspname AND w.f = p.proname),
    oper AS (
        SELECT o.oid, o.oprcode, o.oprrest, o.oprjoin
          FROM pg_operator o LEFT JOIN path ON path.nsp = o.oprnamespace
         WHERE o.oprname = ANY($2::text[])
           AND ($10 OR NOT EXISTS (SELECT 1 FROM pg_operator x JOIN path q ON q.nsp = x.oprnamespace
                            WHERE x.oprname = o.oprname AND x.oprleft = o.oprleft
                              AND x.oprright = o.oprright
                              AND q.ord < coalesce(path.ord, 2147483647)))),
    -- Every function reached, with how (after its name in a message).
    reached(oid, how) AS (
        SELECT oid, '' FROM called
        UNION
        SELECT s.fn, format(' (in aggregate %s)', a.aggfnoid::regprocedure)
          FROM pg_aggregate a JOIN called c ON c.oid = a.aggfnoid,
               unnest(ARRAY[a.aggtransfn::oid, a.aggfinalfn::oid, a.aggcombinefn::oid,
                            a.aggserialfn::oid, a.aggdeserialfn::oid, a.aggmtransfn::oid,
                            a.aggminvtransfn::oid, a.aggmfinalfn::oid]) AS s(fn)
         WHERE s.fn <> 0
        UNION
        SELECT s.fn, format(' (behind operator %s)', o.oid::regoperator)
          FROM oper o, unnest(ARRAY[o.oprcode::oid, o.oprrest::oid, o.oprjoin::oid]) AS s(fn)
         WHERE s.fn <> 0
        UNION
        -- What sorts, groups, joins, index scans and index writes run with no name or symbol
        -- in any text: the support functions of every operator family (a btree's comparison,
        -- a hash function, a GiST's), the functions of its operators, and a range type's
        -- subtype difference and canonical function. Those of the catalog's own families are
        -- built-ins with no effect; only one made in this database can reach anything.
        SELECT a.amproc, format(' (support function %s of operator family %s)', a.amprocnum,
                                f.opfname)
          FROM pg_amproc a JOIN pg_opfamily f ON f.oid = a.amprocfamily
         WHERE a.amproc NOT IN (SELECT oid FROM pg_proc WHERE pronamespace = 'pg_catalog'::regnamespace)
        UNION
        SELECT o.oprcode, format(' (behind operator %s of operator family %s)', o.oid::regoperator,
                                 f.opfname)
          FROM pg_amop a JOIN pg_operator o ON o.oid = a.amopopr
          JOIN pg_opfamily f ON f.oid = a.amopfamily
         WHERE o.oprcode NOT IN (SELECT oid FROM pg_proc WHERE pronamespace = 'pg_catalog'::regnamespace)
        UNION
        SELECT s.fn, format(' (of range type %s)', g.rngtypid::regtype)
          FROM pg_range g, unnest(ARRAY[g.rngsubdiff::oid, g.rngcanonical::oid]) AS s(fn)
         WHERE s.fn <> 0
           AND s.fn NOT IN (SELECT oid FROM pg_proc WHERE pronamespace = 'pg_catalog'::regnamespace)
        UNION
        SELECT k.castfunc, format(' (behind a cast to %s)', format_type(k.casttarget, NULL))
          FROM pg_cast k JOIN pg_type t ON t.oid = k.casttarget
         WHERE t.typname = ANY($3::text[]) AND k.castfunc <> 0
        UNION
        SELECT k.castfunc, format(' (behind an implicit cast from %s to %s, which no plan prints)',
                                  format_type(k.castsource, NULL), format_type(k.casttarget, NULL))
          FROM pg_cast k
         WHERE k.castfunc <> 0
           AND (k.castcontext = 'i'
                OR (k.castcontext = 'a' AND $7 AND k.casttarget IN (
                        SELECT a.atttypid FROM pg_attribute a
                         WHERE a.attrelid IN ({written}) AND a.attnum > 0))))
    SELECT e.name || r.how, NULL::oid FROM reached r JOIN eff e ON e.oid = r.oid
    UNION
    SELECT NULL, r.oid FROM reached r JOIN pg_proc p ON p.oid = r.oid
      JOIN pg_namespace n ON n.oid = p.pronamespace
     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
    ORDER BY 1"#,
        written = named("$13"),
    )
}

/// The foreign tables among the relations a plan scans ($1), among the partitions of the
/// tables it writes ($2: a row routed into a partition that is a foreign table), or named in
/// the text of a pushed-down scan ($3), as the server they reach. What
/// the foreign server runs is out of sight here: a remote view that calls `nextval`, a remote
/// `bigserial` filled by an insert, or a remote transaction that is not read-only (postgres_fdw
/// opens its own, whatever this one is) writes where neither a rollback nor a read-only
/// transaction reaches.
fn foreign() -> String {
    format!(
        "WITH RECURSIVE routed(relid) AS (
             {written}
             UNION SELECT i.inhrelid FROM routed r JOIN pg_inherits i ON i.inhparent = r.relid
               JOIN pg_class p ON p.oid = i.inhrelid AND p.relispartition),
         rels(relid) AS (SELECT relid FROM routed UNION {scanned})
         SELECT format('the foreign server of %s (server %s)', f.ftrelid::regclass, s.srvname)
           FROM pg_foreign_table f JOIN pg_foreign_server s ON s.oid = f.ftserver
           JOIN pg_class k ON k.oid = f.ftrelid JOIN pg_namespace n ON n.oid = k.relnamespace
          WHERE f.ftrelid IN (SELECT relid FROM rels)
             OR EXISTS (SELECT 1 FROM unnest($3::text[]) x
                         WHERE position(format('%I.%I', n.nspname, k.relname) IN x) > 0)
          ORDER BY 1",
        written = named("$2"),
        scanned = named("$1"),
    )
}

/// The text of the CHECK constraints of the tables written ($2, `"schema"."table"`), of their
/// partitions and children and of every table a foreign key's cascade from them writes, and
/// of the domains among the types named ($1) and those tables' column types, followed
/// through arrays, domains' base types, ranges' subtypes and composite types' attributes;
/// of the row security policies of those tables (a WITH CHECK runs on every row written,
/// and no plan prints it); and of what writing a row of those tables computes out of the
/// plan's sight: their indexes' expressions and predicates, and their generated columns.
fn checks() -> String {
    format!(
        "WITH RECURSIVE rels(relid) AS (
             {written}
             UNION
             SELECT e.dst FROM rels r JOIN ({edges}) e ON e.src = r.relid),
         types(oid) AS (
             SELECT t.oid FROM pg_type t WHERE t.typname = ANY($1::text[])
             UNION
             SELECT a.atttypid FROM pg_attribute a
              WHERE a.attrelid IN (SELECT relid FROM rels) AND a.attnum > 0
                AND NOT a.attisdropped
             UNION
             SELECT x.next FROM types y JOIN pg_type t ON t.oid = y.oid,
                    LATERAL (SELECT t.typelem UNION ALL SELECT t.typbasetype
                             UNION ALL SELECT g.rngsubtype FROM pg_range g
                                        WHERE g.rngtypid = t.oid
                             UNION ALL SELECT a.atttypid FROM pg_attribute a
                                        WHERE a.attrelid = t.typrelid AND a.attnum > 0
                                          AND NOT a.attisdropped) AS x(next)
              WHERE x.next <> 0),
         doms AS (SELECT t.oid FROM types y JOIN pg_type t ON t.oid = y.oid
                   WHERE t.typtype = 'd')
         SELECT pg_get_constraintdef(k.oid) FROM pg_constraint k
          WHERE k.contype = 'c'
            AND (k.contypid IN (SELECT oid FROM doms) OR k.conrelid IN (SELECT relid FROM rels))
         UNION ALL
         SELECT pg_get_expr(e.expr, p.polrelid)
           FROM pg_policy p, LATERAL (VALUES (p.polqual), (p.polwithcheck)) AS e(expr)
          WHERE p.polrelid IN (SELECT relid FROM rels) AND e.expr IS NOT NULL
         UNION ALL
         SELECT pg_get_expr(e.expr, i.indrelid)
           FROM pg_index i, LATERAL (VALUES (i.indexprs), (i.indpred)) AS e(expr)
          WHERE i.indrelid IN (SELECT relid FROM rels) AND e.expr IS NOT NULL
         UNION ALL
         SELECT pg_get_expr(d.adbin, d.adrelid)
           FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
          WHERE d.adrelid IN (SELECT relid FROM rels) AND a.attgenerated <> ''",
        written = named("$2"),
        edges = super::cascade::EDGES,
    )
}

/// Tables a plan writes, from its ModifyTable nodes: (schema, table, whether the write may
/// fill in defaults its plan does not print). EXPLAIN prints a plain INSERT's or UPDATE's
/// defaults in its target list, but neither a MERGE's actions (any of which may insert or say
/// DEFAULT) nor the SET list of `ON CONFLICT DO UPDATE`, which counts when `sql`, the
/// statement as written, says DEFAULT.
pub fn written_tables<'a>(doc: &'a serde_json::Value, sql: &str) -> Vec<(&'a str, &'a str, bool)> {
    fn walk<'a>(
        node: &'a serde_json::Value,
        says_default: bool,
        out: &mut Vec<(&'a str, &'a str, bool)>,
    ) {
        if node["Node Type"] == "ModifyTable"
            && let (Some(s), Some(r)) = (node["Schema"].as_str(), node["Relation Name"].as_str())
        {
            let unseen = node["Operation"] == "Merge"
                || (node["Conflict Resolution"] == "UPDATE" && says_default);
            out.push((s, r, unseen));
        }
        for child in node["Plans"].as_array().into_iter().flatten() {
            walk(child, says_default, out);
        }
    }
    let says_default = super::mentions::says_default(sql);
    let mut out = Vec::new();
    for query in doc.as_array().into_iter().flatten() {
        walk(&query["Plan"], says_default, &mut out);
    }
    out
}

/// The foreign servers a plan reaches (`foreign`), through the foreign tables among
/// `relations` and under `written`, and through the Foreign Scans that print no relation of
/// their own: a join or an aggregate pushed down to the server prints only its `Relations`
/// text, e.g. `Aggregate on (public.f)`, which holds each table as `schema.name` quoted as
/// an identifier: a foreign table counts when that form of its name is in the text (no name is
/// parsed back out of it). A Foreign Scan none of whose tables is found still counts, by that
/// text.
async fn foreign_in(
    c: &Client,
    doc: &serde_json::Value,
    relations: &[String],
    written: &[String],
) -> Result<Vec<String>> {
    let mut pushed = Vec::new();
    for query in doc.as_array().into_iter().flatten() {
        pushed_down(&query["Plan"], &mut pushed);
    }
    let mut found: Vec<String> = c
        .query(&foreign(), &[&relations, &written, &pushed])
        .await
        .map_err(|e| db_error("looking for foreign tables the spec's SQL reaches", &e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if found.is_empty() {
        found.extend(
            pushed
                .iter()
                .map(|t| format!("the foreign server of a scan of {t}")),
        );
    }
    Ok(found)
}

/// The `Relations` text of every Foreign Scan that names no relation of its own.
fn pushed_down(node: &serde_json::Value, out: &mut Vec<String>) {
    if node["Node Type"] == "Foreign Scan" && node["Relation Name"].is_null() {
        out.push(
            node["Relations"]
                .as_str()
                .unwrap_or("a foreign table")
                .to_string(),
        );
    }
    for child in node["Plans"].as_array().into_iter().flatten() {
        pushed_down(child, out);
    }
}

/// Every relation a plan scans or writes, as `schema.table`.
fn relations_in(node: &serde_json::Value, out: &mut Vec<String>) {
    if let (Some(s), Some(r)) = (node["Schema"].as_str(), node["Relation Name"].as_str()) {
        out.push(format!("{}.{}", quoted(s), quoted(r)));
    }
    for child in node["Plans"].as_array().into_iter().flatten() {
        relations_in(child, out);
    }
}

/// `name` as an identifier Postgres reads back unchanged.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
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
