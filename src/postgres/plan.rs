//! `plan` for a Postgres job: where it would resume, what is left, and what the first batches
//! would cost, from sample batches that are always rolled back: their time, the WAL they write
//! (what standbys would have to absorb; counted by `EXPLAIN (ANALYZE, WAL)` for this session
//! alone, so other sessions' WAL does not inflate it), and whether the statement converges
//! when applied twice to the same keys (a batch retried after a lost COMMIT reply must not
//! apply it twice). Everything else runs in read-only transactions.

use super::errors::db_error;
use super::job::{PgJob, Prepared};
use super::raw::RawValue;
use crate::engine::plan::{Idempotency, Plan, PlanOptions, SampleReport, UnitPlan, WalForecast};
use crate::engine::{Backend, Sizer};
use crate::error::Result;
use crate::spec::Spec;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

/// A sample batch's measurements.
struct Sampled {
    keys: u64,
    rows: u64,
    elapsed: Duration,
    wal: Option<i64>,
    /// Rows the statement read from the job's table (or its partitions) by sequential scans.
    seq_read: u64,
}

/// A sample batch whose statement read more than this many times its keys (and at least
/// `SEQ_READ_MIN` rows) from the job's table by a sequential scan reads the table, not the batch.
const SEQ_READ_FACTOR: u64 = 2;
const SEQ_READ_MIN: u64 = 10_000;

pub async fn plan(job: &PgJob, spec: &Spec, opts: PlanOptions) -> Result<Plan> {
    let (database, target) = job.describe();
    let mut plan = Plan {
        job: spec.name.clone(),
        database,
        target,
        batch_size: spec.batch.size,
        ..Plan::default()
    };
    let state = job.load().await?;
    plan.status = state
        .as_ref()
        .map_or("pending".into(), |s| s.status.as_str().to_string());
    if let Some(s) = &state {
        plan.resume = s.resume.clone().unwrap_or_default();
        plan.keys_done = s.keys_done;
        plan.batches_done = s.batches_done;
        if s.status == crate::state::Status::Done {
            plan.skip = Some(if spec.hash_is(&s.spec_hash) {
                "done: run would skip this job (use --rerun to run it again)".into()
            } else {
                "done, but its spec changed since: run would skip it unless --rerun".into()
            });
            return Ok(plan);
        }
    } else {
        plan.resume = "the start (no checkpoint yet)".into();
    }
    plan.blockers = job.blockers().await?;
    job.preflight().await?;
    let ctx = job.ctx();
    let c = ctx
        .pool
        .get()
        .await
        .map_err(|e| crate::error::Error::Connect(format!("cannot connect: {e}")))?;
    let p = ctx.prepared()?;
    // `where` runs in every sample batch and in the exact count: not at all if it could write
    // where no rollback or read-only transaction reaches.
    // A key of a domain type runs the domain's CHECKs on every key value the exact count and
    // the sample batches bind, and a type's own comparison (its btree class) runs in every
    // keyset step. Checked in a read-only transaction: the check's settings
    // (`effects`) end with it.
    // The table itself first: planning anything over it evaluates its indexes' expressions
    // and predicates, CHECKs and policies (`reads::planned`).
    let (table_calls, where_calls, key_calls) = {
        c.batch_execute("BEGIN READ ONLY")
            .await
            .map_err(|e| db_error("checking the spec's SQL", &e))?;
        let checked = async {
            let table = format!("SELECT 1 FROM {}", p.info.rel);
            let table_calls =
                super::effects::calls_in(&c, &serde_json::Value::Null, &table).await?;
            let where_calls = if p.info.filter == "true" || !table_calls.is_empty() {
                Vec::new()
            } else {
                let sql = format!("SELECT 1 FROM {} WHERE {}", p.info.rel, p.info.filter);
                super::effects::outside_calls(&c, &sql, &[]).await?
            };
            let key = format!("SELECT CAST(NULL::text AS {})", p.info.key_type);
            let key_calls = super::effects::outside_calls(&c, &key, &[]).await?;
            Ok::<_, crate::error::Error>((table_calls, where_calls, key_calls))
        }
        .await;
        let _ = c.batch_execute("ROLLBACK").await;
        checked?
    };
    let estimated = if opts.exact {
        "; rows are estimated, not counted"
    } else {
        ""
    };
    if !table_calls.is_empty() {
        plan.notes.push(format!(
            "planning a query over {} runs {} (in its indexes' expressions or predicates, its \
             CHECKs or its policies), which can draw from a sequence or write where no rollback \
             reaches: plan plans nothing over it (no sample batches; rows estimated from its \
             size)",
            p.info.rel,
            table_calls.join(", "),
        ));
    }
    if !where_calls.is_empty() {
        plan.notes.push(format!(
            "where calls {}, which can draw from a sequence or write where no rollback reaches: \
             plan runs nothing that evaluates it (no sample batches{estimated})",
            where_calls.join(", "),
        ));
    }
    if !key_calls.is_empty() {
        plan.notes.push(format!(
            "the key's type {} runs {} on the values it checks or compares, which can draw \
             from a sequence or write where no rollback reaches: plan binds no key value (no \
             sample batches{estimated})",
            p.info.key_type,
            key_calls.join(", "),
        ));
    }
    let where_calls = [table_calls, where_calls, key_calls].concat();
    let est = job.pending(opts.exact && where_calls.is_empty()).await?;
    plan.pending_rows = est.rows;
    plan.pending_exact = est.exact;
    plan.pending_retry = est.pending_retry;
    let pending = est.rows + est.pending_retry;
    plan.batches = pending.div_ceil(spec.batch.size.max(1));
    let ranges = ctx.store.ranges_of(&c, &ctx.job).await?;
    plan.units = ranges
        .iter()
        .map(|r| {
            let u = r.unit();
            UnitPlan {
                unit: u.unit,
                rows: Some(r.keys_done.max(0) as u64),
                status: u.status,
                note: match &r.cursor {
                    Some(c) if r.status != super::store::DONE && r.cursor != r.lo => {
                        format!("at key {c}")
                    }
                    _ => String::new(),
                },
            }
        })
        .collect();
    if opts.samples == 0 || pending == 0 || !where_calls.is_empty() {
        return Ok(plan);
    }
    let start = ranges
        .iter()
        .find(|r| r.status != super::store::DONE)
        .map(|r| (r.cursor.clone(), r.hi.clone()));
    let (cursor, hi) = start.unwrap_or((None, None));
    let (sampled, idem) = match samples(&c, &p, spec, cursor, hi, opts.samples).await? {
        Sample::Ran(sampled, idem) => (sampled, idem),
        Sample::Skipped(why) => {
            plan.notes.push(format!(
                "sample: not run: {why}; a rolled-back sample would draw values from it that \
                 no rollback gives back (`plan` writes nothing), so time and WAL are not \
                 forecast and idempotency is not checked"
            ));
            return Ok(plan);
        }
    };
    let keys: u64 = sampled.iter().map(|s| s.keys).sum();
    let rows: u64 = sampled.iter().map(|s| s.rows).sum();
    let took: Duration = sampled.iter().map(|s| s.elapsed).sum();
    if keys == 0 {
        plan.notes.push("sample: no rows to sample".into());
        return Ok(plan);
    }
    let rate = keys as f64 / took.as_secs_f64().max(1e-6);
    plan.sample = Some(SampleReport {
        batches: sampled.len() as u32,
        keys,
        rows,
        seconds: took.as_secs_f64(),
        rows_per_second: rate,
    });
    if let Some(note) = whole_table_note(&sampled, &p) {
        plan.notes.push(note);
    }
    let mut sizer = Sizer::new(&spec.batch);
    for s in &sampled {
        sizer.observe(s.keys, s.elapsed);
    }
    // Let the sizer settle on the sampled rate, as it would after a few batches of the run.
    let per_key = took.as_secs_f64() / keys as f64;
    for _ in 0..20 {
        let n = sizer.size();
        sizer.observe(n, Duration::from_secs_f64(per_key * n as f64));
    }
    let settled = sizer.size();
    let batches = pending.div_ceil(settled.max(1));
    let workers = f64::from(spec.workers.max(1));
    let eta = per_key * pending as f64 / workers
        + spec.batch.pause.as_secs_f64() * batches as f64 / workers;
    plan.estimate_seconds = Some(eta);
    plan.settled_batch_size = Some(settled);
    let wal: Vec<i64> = sampled.iter().filter_map(|s| s.wal).collect();
    if wal.len() == sampled.len() {
        let bytes: i64 = wal.iter().sum();
        let per_row = bytes.max(0) as f64 / keys as f64;
        plan.wal = Some(WalForecast {
            bytes_per_row: per_row,
            total_bytes: (per_row * pending as f64) as u64,
            bytes_per_second: per_row * rate * workers,
        });
    }
    plan.idempotency = idem;
    Ok(plan)
}

/// Whether running the statement would do what no rollback undoes: call a volatile function
/// (`nextval` for a serial or identity column it inserts into, a function of its own that
/// inserts, `dblink_exec`, a foreign table's server; see `effects`), or run out of its plan's
/// sight what could (a trigger of a table it or its cascade writes, a cascade's rule, a default
/// a MERGE, an ON CONFLICT DO UPDATE or a SET DEFAULT fills in; see `hidden`). The statement
/// is only explained, not executed (what `effects` cannot see is listed there), and only
/// after `samples` has read it unplanned. Returns why.
async fn draws(
    c: &Client,
    p: &Prepared,
    params: &[&(dyn ToSql + Sync)],
    hidden: &mut Hidden,
) -> Result<Option<String>> {
    let explained = super::effects::explain(c, &p.statement, params, "explaining the statement");
    let Some(doc) = explained.await? else {
        return Ok(None);
    };
    let calls = super::effects::calls_in(c, &doc, &p.statement).await?;
    if !calls.is_empty() {
        return Ok(Some(format!(
            "the statement calls {}, which can draw from a sequence or write where no \
             rollback reaches",
            calls.join(", ")
        )));
    }
    for (schema, table, unseen) in super::effects::written_tables(&doc, &p.statement) {
        let key = (schema.to_string(), table.to_string(), unseen);
        let why = match hidden.get(&key) {
            Some(why) => why.clone(),
            None => {
                let why = super::hidden::effect(c, schema, table, unseen).await?;
                hidden.insert(key, why.clone());
                why
            }
        };
        if why.is_some() {
            return Ok(why);
        }
    }
    Ok(None)
}

/// What `hidden::effect` found for a written table (schema, table, unseen defaults), kept
/// across the sample batches: the same tables' triggers are not read again for each batch.
type Hidden = std::collections::HashMap<(String, String, bool), Option<String>>;

/// Rows this transaction has inserted, updated or deleted so far, in every user table.
async fn rows_written(c: &Client) -> Result<i64> {
    Ok(c.query_one(
        "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint
               FROM pg_stat_xact_user_tables",
        &[],
    )
    .await
    .map_err(|e| db_error("counting the rows a sample batch wrote", &e))?
    .get(0))
}

/// The WAL the statement itself wrote, from `EXPLAIN (ANALYZE, WAL, FORMAT JSON)` of its
/// execution: counted by this session alone, so WAL that other sessions write meanwhile (a
/// production server's traffic) is not the job's. The top node counts its whole tree; a
/// writable CTE that nothing reads runs after the tree and counts on its own. WAL written by
/// triggers is not in the plan, nor the checkpoint and commit records of a batch.
fn statement_wal(doc: &serde_json::Value) -> Option<i64> {
    fn cte_scans<'a>(node: &'a serde_json::Value, names: &mut Vec<&'a str>) {
        if let Some(n) = node["CTE Name"].as_str() {
            names.push(n);
        }
        for child in node["Plans"].as_array().into_iter().flatten() {
            cte_scans(child, names);
        }
    }
    let top = &doc[0]["Plan"];
    let mut wal = top["WAL Bytes"].as_i64()?;
    let mut read = Vec::new();
    cte_scans(top, &mut read);
    for child in top["Plans"].as_array().into_iter().flatten() {
        let unread_cte = child["Parent Relationship"] == "InitPlan"
            && child["Subplan Name"]
                .as_str()
                .and_then(|n| n.strip_prefix("CTE "))
                .is_some_and(|n| !read.contains(&n));
        if unread_cte {
            wal += child["WAL Bytes"].as_i64().unwrap_or(0);
        }
    }
    Some(wal)
}

/// The job's table and every partition under it, as (schema, name): the relations a scan node
/// of the statement's plan may name for it.
async fn own_relations(c: &Client, p: &Prepared) -> Result<Vec<(String, String)>> {
    let rows = c
        .query(
            "WITH RECURSIVE tree(oid) AS (
                 SELECT $1::text::regclass::oid
                 UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree t ON i.inhparent = t.oid
             )
             SELECT n.nspname::text, r.relname::text
               FROM tree t JOIN pg_class r ON r.oid = t.oid
               JOIN pg_namespace n ON n.oid = r.relnamespace",
            &[&p.info.rel],
        )
        .await
        .map_err(|e| db_error("listing the table's partitions", &e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Rows that sequential scans of `own` read in an `EXPLAIN (ANALYZE, VERBOSE, FORMAT JSON)`
/// plan node and its children (kept and filtered out, over all loops).
fn seq_scanned(node: &serde_json::Value, own: &[(String, String)]) -> u64 {
    let here = if node["Node Type"] == "Seq Scan"
        && own.iter().any(|(schema, name)| {
            node["Schema"].as_str() == Some(schema) && node["Relation Name"].as_str() == Some(name)
        }) {
        let per_loop = node["Actual Rows"].as_f64().unwrap_or(0.0)
            + node["Rows Removed by Filter"].as_f64().unwrap_or(0.0);
        (per_loop * node["Actual Loops"].as_f64().unwrap_or(1.0)) as u64
    } else {
        0
    };
    here + node["Plans"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| seq_scanned(n, own))
        .sum::<u64>()
}

/// A warning when the sample batches' statement read the job's table sequentially, many times
/// the batch's keys: every batch of the run would read the whole table again.
fn whole_table_note(sampled: &[Sampled], p: &Prepared) -> Option<String> {
    let s = sampled.iter().find(|s| {
        s.keys > 0
            && s.seq_read >= SEQ_READ_MIN
            && s.seq_read > s.keys.saturating_mul(SEQ_READ_FACTOR)
    })?;
    let key = &p.info.key;
    let advice = if p.info.statement_params == 3 {
        format!(
            "it takes $2/$3, yet the plan does not use them: bound the rows with \
             `{key} BETWEEN $2 AND $3` and keep `= ANY($1)` out of the index condition \
             (`coalesce({key} = ANY($1), false)`)"
        )
    } else {
        format!(
            "give it the batch's key range, e.g. `{key} BETWEEN $2 AND $3 AND \
             coalesce({key} = ANY($1), false)` in place of `{key} = ANY($1)`, so that a batch \
             is one index range scan (README: one batch is one transaction)"
        )
    };
    Some(format!(
        "statement: a sample batch of {} keys read {} rows of {} by a sequential scan, and \
         every batch of the run would read as many again: {advice}",
        s.keys, s.seq_read, p.info.shown
    ))
}

/// What the sample batches gave, or why none ran.
enum Sample {
    Ran(Vec<Sampled>, Option<Idempotency>),
    /// The statement would draw from a sequence: the reason, naming it.
    Skipped(String),
}

/// Run up to `count` batches from `cursor` and the idempotency check, inside one transaction
/// that is always rolled back; none (the report of those run dropped) as soon as one batch's
/// statement would draw from a sequence (`draws`).
async fn samples(
    c: &Client,
    p: &Prepared,
    spec: &Spec,
    cursor: Option<String>,
    hi: Option<String>,
    count: u32,
) -> Result<Sample> {
    // The session defaults to read-only; this one transaction may write, and is rolled back.
    c.batch_execute(&format!("BEGIN READ WRITE; {}", p.sql.begin_locals))
        .await
        .map_err(|e| db_error("starting the sample transaction", &e))?;
    let result = async {
        let mut out = Vec::new();
        let mut idem = None;
        let mut cursor = cursor;
        let size = spec.batch.size.min(i64::MAX as u64) as i64;
        let statement = c
            .prepare(&p.statement)
            .await
            .map_err(|e| db_error("preparing statement", &e))?;
        // The sample batches run through EXPLAIN ANALYZE, which executes the statement and
        // counts the WAL it writes (VERBOSE: scan nodes name their relation's schema).
        let explained = c
            .prepare(&format!(
                "EXPLAIN (ANALYZE, VERBOSE, WAL, TIMING OFF, COSTS OFF, FORMAT JSON) {}",
                p.statement
            ))
            .await
            .map_err(|e| db_error("preparing statement", &e))?;
        let own = own_relations(c, p).await?;
        let mut hidden = Hidden::new();
        // The statement as written, before any plan of it: planning may run what it calls.
        let unplanned = super::effects::calls_in(c, &serde_json::Value::Null, &p.statement).await?;
        if !unplanned.is_empty() {
            return Ok(Sample::Skipped(format!(
                "the statement calls {}, which can draw from a sequence or write where no \
                 rollback reaches",
                unplanned.join(", ")
            )));
        }
        for i in 0..count {
            let t0 = Instant::now();
            let row = c
                .query_one(&p.sql.sample, &[&size, &cursor, &hi])
                .await
                .map_err(|e| db_error("selecting a sample batch", &e))?;
            let keys: Option<RawValue> = row.get(0);
            let Some(keys) = keys else { break };
            let walked = row.get::<_, i64>(2) as u64;
            let (first, last): (Option<RawValue>, Option<RawValue>) = (row.get(3), row.get(4));
            let params: Vec<&(dyn ToSql + Sync)> = if p.info.statement_params == 3 {
                vec![&keys, &first, &last]
            } else {
                vec![&keys]
            };
            // Each batch is explained with its own keys: its plan is a custom one, which
            // prunes by them (partitions, conditions on `$1`) what another batch's reaches.
            let checking = Instant::now();
            if let Some(why) = draws(c, p, &params, &mut hidden).await? {
                return Ok(Sample::Skipped(why));
            }
            // The check is not the batch's: its time is not the sample's.
            let t0 = t0 + checking.elapsed();
            let before = rows_written(c).await?;
            let report = c
                .query_one(&explained, &params)
                .await
                .map_err(|e| db_error("running statement on a sample batch", &e))?;
            let rows = (rows_written(c).await? - before).max(0) as u64;
            let doc = super::effects::explain_json(&report);
            let wal = doc.as_ref().and_then(statement_wal);
            let seq_read = doc.as_ref().map_or(0, |d| seq_scanned(&d[0]["Plan"], &own));
            out.push(Sampled {
                keys: walked,
                rows,
                elapsed: t0.elapsed(),
                wal,
                seq_read,
            });
            if i == 0 {
                idem = Some(idempotency(c, p, &statement, &params, &keys).await?);
            }
            cursor = row.get(1);
        }
        Ok(Sample::Ran(out, idem))
    }
    .await;
    // Always rolled back: `plan` writes nothing.
    let rollback = c.batch_execute("ROLLBACK").await;
    let out = result?;
    rollback.map_err(|e| db_error("rolling back the sample batches", &e))?;
    Ok(out)
}

/// A table the sample transaction wrote: name, rows inserted, rows deleted, whether it is the
/// job's own table, its size.
type Written = (String, i64, i64, bool, f64);

/// Apply the statement a second time to the same keys and compare what it left: the sample
/// rows of the table (a hash of their contents), and every other table it wrote to (rows this
/// transaction wrote, or, for large tables, whether the second run added rows).
async fn idempotency(
    c: &Client,
    p: &Prepared,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn ToSql + Sync)],
    keys: &RawValue,
) -> Result<Idempotency> {
    let (rel, key) = (&p.info.rel, &p.info.key);
    let own = format!(
        "SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {rel} t
          WHERE {key} = ANY($1)"
    );
    let hash = async |c: &Client| -> Result<String> {
        Ok(c.query_one(&own, &[keys])
            .await
            .map_err(|e| db_error("hashing the sample rows", &e))?
            .get(0))
    };
    // Tables this transaction wrote, with their insert/delete counts and size.
    let written = "SELECT s.relid::regclass::text, s.n_tup_ins, s.n_tup_del,
                          (s.relid = to_regclass($1)), c.reltuples::float8
                     FROM pg_stat_xact_user_tables s JOIN pg_class c ON c.oid = s.relid
                    WHERE s.n_tup_ins + s.n_tup_upd + s.n_tup_del > 0
                    ORDER BY 1";
    let tables = async |c: &Client| -> Result<Vec<Written>> {
        Ok(c.query(written, &[rel])
            .await
            .map_err(|e| db_error("reading what the statement wrote", &e))?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect())
    };
    // Rows written by this transaction in a small table, hashed: ONLY that table, as its
    // statistics count (a child may be a foreign table, whose server is out of reach). The
    // second application runs in a subtransaction (a savepoint), whose rows carry its own
    // xid: a row is ours when its xmin is not older than our xid (`age` counts from it) and
    // still in progress (rows other sessions committed since are not; their uncommitted rows
    // are invisible).
    let mine = async |c: &Client, t: &str| -> Result<String> {
        let sql = format!(
            "SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM ONLY {t} t
              WHERE age(t.xmin) <= 0
                AND pg_xact_status((pg_current_xact_id()::text::bigint
                                    - age(t.xmin))::text::xid8) = 'in progress'"
        );
        Ok(c.query_one(&sql, &[])
            .await
            .map_err(|e| db_error("hashing the rows the statement wrote", &e))?
            .get(0))
    };
    const SMALL: f64 = 200_000.0;
    let first_tables = tables(c).await?;
    let own_1 = hash(c).await?;
    let mut others_1 = Vec::new();
    for (t, _, _, is_own, size) in &first_tables {
        if !is_own && *size < SMALL {
            others_1.push((t.clone(), mine(c, t).await?));
        }
    }
    // The second application may fail (a unique key without ON CONFLICT): that is the answer,
    // not a failed plan. A savepoint keeps the sample transaction usable for the next batches.
    c.batch_execute("SAVEPOINT backfill_idempotency")
        .await
        .map_err(|e| db_error("checking idempotency", &e))?;
    if let Err(e) = c.execute(statement, params).await {
        let Some(db) = e.as_db_error() else {
            return Err(db_error(
                "running statement a second time on a sample batch",
                &e,
            ));
        };
        let reason = format!(
            "applied a second time to the same keys, it fails ({} (SQLSTATE {})): a batch \
             retried after a lost COMMIT reply would fail the job instead of finding its work \
             done",
            db.message(),
            db.code().code()
        );
        c.batch_execute("ROLLBACK TO SAVEPOINT backfill_idempotency")
            .await
            .map_err(|e| db_error("checking idempotency", &e))?;
        return Ok(Idempotency {
            converges: false,
            reason,
        });
    }
    c.batch_execute("RELEASE SAVEPOINT backfill_idempotency")
        .await
        .map_err(|e| db_error("checking idempotency", &e))?;
    let second_tables = tables(c).await?;
    if hash(c).await? != own_1 {
        return Ok(Idempotency {
            converges: false,
            reason: format!(
                "applied twice to the same keys, it changes the rows of {} again (e.g. \
                 `n = n + 1`): a batch retried after a lost COMMIT reply would apply it twice",
                p.info.shown
            ),
        });
    }
    for (t, h1) in &others_1 {
        if mine(c, t).await? != *h1 {
            return Ok(Idempotency {
                converges: false,
                reason: format!(
                    "applied twice to the same keys, it writes different rows into {t} (e.g. an \
                     INSERT without ON CONFLICT): a batch retried after a lost COMMIT reply \
                     would apply it twice"
                ),
            });
        }
    }
    for (t, ins2, del2, is_own, size) in &second_tables {
        let (ins1, del1) = first_tables
            .iter()
            .find(|f| &f.0 == t)
            .map_or((0, 0), |f| (f.1, f.2));
        let added = (ins2 - ins1) - (del2 - del1);
        if !is_own && *size >= SMALL && added > 0 {
            return Ok(Idempotency {
                converges: false,
                reason: format!(
                    "applied twice to the same keys, it adds {added} more row(s) to {t} (e.g. \
                     an INSERT without ON CONFLICT): a batch retried after a lost COMMIT reply \
                     would apply it twice"
                ),
            });
        }
    }
    Ok(Idempotency {
        converges: true,
        reason: "applied twice to the same sample keys, it leaves the same rows".into(),
    })
}
