//! A Postgres job as a whole: what its workers share (pool, resolved table, SQL, store), worker
//! slots, the store's lifecycle, estimates and the `verify:` check.

use super::advisory;
use super::blockers;
use super::connect;
use super::errors::db_error;
use super::ranges;
use super::sql::BatchSql;
use super::store::Store;
use super::table::{self, TableInfo};
use super::worker::PgWorker;
use crate::engine::{Backend, Estimate};
use crate::error::{Error, Result, StopReason};
use crate::spec::{Limits, PostgresSpec};
use crate::state::{JobState, Status};
use deadpool_postgres::{ClientWrapper, Object, Pool};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use tokio_postgres::Client;

/// What a batch needs, resolved once per job by `preflight`.
pub struct Prepared {
    pub info: TableInfo,
    pub sql: BatchSql,
    pub statement: String,
    /// Whether planning over the job's table, read unplanned (`effects::calls_in` of
    /// `SELECT 1 FROM` it), evaluates nothing that writes past the transaction (an
    /// IMMUTABLE-declared function with constant arguments in an index's expression or
    /// predicate, a CHECK, a policy): only then is anything planned over it for an estimate.
    pub table_plannable: bool,
    /// Whether `where`, read the same way, calls nothing that writes past the transaction:
    /// only then is it planned for an estimate (planning may run a STABLE function it calls
    /// with constant arguments).
    pub where_plannable: bool,
    /// Whether the statement is one `UPDATE` or `DELETE` of the job's table, which locks the
    /// rows it writes itself (`own_locks`): a `skip_locked` batch then walks its keys unlocked.
    pub own_locks: bool,
}

/// What a job's workers share.
pub struct Ctx {
    pub pool: Pool,
    pub url: String,
    pub job: String,
    pub spec: PostgresSpec,
    pub limits: Limits,
    pub store: Store,
    /// The spec's `workers`, or this process's worker threads if more (how many ranges to cut).
    pub workers: u32,
    /// Workers lock the next batch's keys on a second connection while the current batch runs,
    /// when the spec asks (`batch.walk_ahead`: it doubles the rows locked at a time and how
    /// long they stay locked, and so the application's lock waits; validated against
    /// `batch.pause` and the idle-in-transaction limit).
    pub ahead: bool,
    ready: OnceLock<Arc<Prepared>>,
    /// Ranges this process gave up on for this run (rows still locked by others).
    pub blocked: Mutex<HashSet<i32>>,
    /// Backend pids of this process's workers.
    pids: Mutex<Vec<i32>>,
    /// The session each worker slot of this process was last taken on: (pid, backend start).
    sessions: Mutex<HashMap<u32, (i32, String)>>,
    /// The workers' sessions' cancel requests a second signal sends (`engine::exit_now`).
    cancels: Mutex<Vec<u64>>,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        for id in self.cancels.lock().expect("cancels lock").drain(..) {
            crate::engine::exit_now::forget(id);
        }
    }
}

/// SQL that finds the sessions holding an advisory lock keyed by $1 (text) in this database.
const HOLDERS: &str = "
    SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.client_addr::text, 'local'),
           extract(epoch FROM now() - a.backend_start)::bigint
      FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
     WHERE l.locktype = 'advisory' AND l.granted
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND l.classid = ((hashtextextended($1, 0) >> 32) & 4294967295)::bigint::oid
       AND l.objid = (hashtextextended($1, 0) & 4294967295)::bigint::oid
       AND l.objsubid = 1";

impl Ctx {
    pub fn prepared(&self) -> Result<Arc<Prepared>> {
        self.ready
            .get()
            .cloned()
            .ok_or_else(|| Error::Preflight("internal: preflight has not run".into()))
    }

    /// A connection of the worker's own, taken out of the pool so that it is closed, never
    /// reused, when the worker ends: its session holds the worker's advisory locks.
    /// A second signal cancels what it is running (its batch's locks go at once).
    pub async fn connect_worker(&self) -> Result<ClientWrapper> {
        let c = Object::take(connect::get(&self.pool, &self.url).await?);
        match connect::cancel_on_exit(&c, &self.url) {
            Ok(id) => self.cancels.lock().expect("cancels lock").push(id),
            Err(e) => tracing::debug!("a second signal will not cancel this session: {e}"),
        }
        Ok(c)
    }

    async fn conn(&self) -> Result<Object> {
        connect::get(&self.pool, &self.url).await
    }

    /// Take a worker slot on `c` (trying `first` first, then the others below `cap`), after
    /// the job's shared lock. `Err(who)` names the holders when every slot is taken.
    pub async fn take_slot(
        &self,
        c: &Client,
        first: u32,
        cap: u32,
    ) -> Result<std::result::Result<u32, String>> {
        self.end_earlier_session(c, first).await;
        let job_key = self.store.lock_key(&self.job, "job");
        let shared = advisory::try_lock(c, &job_key, true, "joining the job").await?;
        if !shared {
            return Ok(Err(format!(
                "a `backfill reset` of job {} (it holds the job's lock)",
                self.job
            )));
        }
        let cap = cap.max(1);
        for k in 0..cap {
            let slot = (first + k) % cap;
            let key = self.store.lock_key(&self.job, &format!("slot:{slot}"));
            if advisory::try_lock(c, &key, false, "taking a worker slot").await? {
                let me = c
                    .query_one(
                        "SELECT pid, backend_start::text FROM pg_stat_activity
                          WHERE pid = pg_backend_pid()",
                        &[],
                    )
                    .await
                    .map_err(|e| db_error("taking a worker slot", &e))?;
                let pid: i32 = me.get(0);
                self.pids.lock().expect("pids lock").push(pid);
                self.sessions
                    .lock()
                    .expect("sessions lock")
                    .insert(slot, (pid, me.get(1)));
                return Ok(Ok(slot));
            }
        }
        let _ = advisory::unlock(c, &job_key, true, "leaving the job").await;
        let mut who = Vec::new();
        for slot in 0..cap {
            let key = self.store.lock_key(&self.job, &format!("slot:{slot}"));
            for r in c
                .query(HOLDERS, &[&key])
                .await
                .map_err(|e| db_error("finding the job's workers", &e))?
            {
                who.push(format!(
                    "backend pid {} ({}, from {}, connected {}s ago)",
                    r.get::<_, i32>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                    r.get::<_, i64>(3)
                ));
            }
        }
        Ok(Err(format!(
            "{cap} worker(s), the job's `workers` limit: {}",
            if who.is_empty() {
                "other runners".to_string()
            } else {
                who.join("; ")
            }
        )))
    }

    /// A worker reconnecting after its connection was taken for lost: its earlier session may
    /// still be open on the server (a network that dropped the connection silently leaves it
    /// there until the server's own keepalive gives up, hours by default), holding the
    /// worker's slot and range locks, so that neither this worker nor another runner could
    /// take them. That session is this process's own, given up on: it is ended (matched by
    /// pid and start time, so never another session that got the pid since). Best effort: a
    /// role that may not end it leaves it to the server.
    async fn end_earlier_session(&self, c: &Client, slot: u32) {
        let earlier = self.sessions.lock().expect("sessions lock").remove(&slot);
        let Some((pid, started)) = earlier else {
            return;
        };
        let end = "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
                    WHERE pid = $1 AND backend_start::text = $2 AND pid <> pg_backend_pid()";
        match c.query(end, &[&pid, &started]).await {
            Ok(rows) if !rows.is_empty() => tracing::warn!(
                "ended this worker's earlier session (backend pid {pid}), still open on the \
                 server after its connection was given up as lost"
            ),
            Ok(_) => {}
            Err(e) => tracing::debug!("ending the earlier session {pid}: {e}"),
        }
    }

    /// Sessions of other processes holding the job's shared lock (live workers).
    async fn live_workers(&self, c: &Client, exclude_mine: bool) -> Result<i64> {
        let key = self.store.lock_key(&self.job, "job");
        let mine: Vec<i32> = if exclude_mine {
            self.pids.lock().expect("pids lock").clone()
        } else {
            Vec::new()
        };
        let n: i64 = c
            .query_one(
                &format!("SELECT count(*) FROM ({HOLDERS}) h WHERE h.pid <> ALL($2)"),
                &[&key, &mine],
            )
            .await
            .map_err(|e| db_error("counting the job's workers", &e))?
            .get(0);
        Ok(n)
    }
}

/// The job in its database.
pub struct PgJob {
    pub(super) ctx: Arc<Ctx>,
    verify: Option<String>,
    spec: crate::spec::Spec,
}

impl PgJob {
    pub fn new(
        pool: Pool,
        spec: &crate::spec::Spec,
        pg: &PostgresSpec,
        verify: Option<String>,
        threads: u32,
    ) -> PgJob {
        PgJob {
            ctx: Arc::new(Ctx {
                pool,
                url: pg.url.clone(),
                job: spec.name.clone(),
                spec: pg.clone(),
                limits: spec.limits.clone(),
                store: Store::new(&spec.state_schema),
                workers: spec.workers.max(threads),
                ahead: spec.batch.walk_ahead,
                ready: OnceLock::new(),
                blocked: Mutex::new(HashSet::new()),
                pids: Mutex::new(Vec::new()),
                sessions: Mutex::new(HashMap::new()),
                cancels: Mutex::new(Vec::new()),
            }),
            verify,
            spec: spec.clone(),
        }
    }

    pub fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }

    /// Rows of the table in `(lo, hi]` by the planner (`filter`: only those matching `where`).
    async fn planned_rows(
        &self,
        c: &Client,
        lo: Option<&str>,
        hi: Option<&str>,
        filter: bool,
    ) -> Result<f64> {
        let p = self.ctx.prepared()?;
        let (rel, key, ty) = (&p.info.rel, &p.info.key, &p.info.key_type);
        // A `where` that could write is not planned: the estimate is then of the key range.
        let f = if filter && p.where_plannable {
            p.info.filter.as_str()
        } else {
            "true"
        };
        let sql = format!(
            "EXPLAIN (FORMAT JSON) SELECT 1 FROM {rel}
              WHERE {key} IS NOT NULL AND ($1::text IS NULL OR {key} > CAST($1::text AS {ty}))
                AND ($2::text IS NULL OR {key} <= CAST($2::text AS {ty})) AND {f}"
        );
        let plan: serde_json::Value = c
            .query_one(&sql, &[&lo, &hi])
            .await
            .map_err(|e| db_error("estimating pending rows", &e))?
            .get(0);
        Ok(plan[0]["Plan"]["Plan Rows"].as_f64().unwrap_or(0.0))
    }

    /// A job new to the store whose spec another job of the store already has (the same
    /// statement, `where`, lock mode and key over the same table, in the same order), under
    /// another name: a spec file renamed, or its `name:` changed. The name keys the checkpoint,
    /// so the new one would start over from the first key and do every row again (an INSERT
    /// job doubles its rows), next to the other if that one is still at work. Refused, naming
    /// the other; `--rerun` runs the new name knowingly. The same holds across the stores of
    /// the database: a spec whose `state.schema` changed finds its job, under any name, in the
    /// schema it had.
    async fn refuse_a_twin(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        walks: &str,
        earlier: &[String],
    ) -> Result<()> {
        // Two new names for one spec starting at once (each behind its own start lock) see
        // nothing of each other's uncommitted record: they queue here, on what they walk,
        // until the first has committed its record (the lock ends with the transaction). The
        // key leaves the store out: two stores' starts queue alike.
        let lock = format!("backfill:walks:{walks}");
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            &[&lock],
        )
        .await
        .map_err(|e| db_error("writing the checkpoint store", &e))?;
        let own = &self.ctx.store.schema;
        let mut stores: Vec<String> = tx
            .query(super::store::STORES, &[])
            .await
            .map_err(|e| db_error("finding the checkpoint stores of the database", &e))?
            .iter()
            .map(|r| r.get(0))
            .filter(|s: &String| s != own)
            .collect();
        stores.insert(0, own.clone());
        let each: Vec<String> = stores
            .iter()
            .enumerate()
            .map(|(i, s)| {
                // A record from before `walks` was kept (or a store from before it was a
                // column) is this spec's when the hash of the spec as written matches: that
                // hash covered the table and key as written.
                format!(
                    "SELECT {i} AS store, job, status, updated_at
                       FROM (SELECT j.*, to_jsonb(j) ->> 'walks' AS walked FROM {}.jobs j) j
                      WHERE (split_part(spec_hash, '.', 1) = ($2::text[])[1]
                             OR spec_hash = ($2::text[])[2])
                        AND (walked = $3 OR walked = ANY($4)
                             OR (walked IS NULL AND spec_hash = ($2::text[])[2])){}",
                    super::store::ident(s),
                    if s == own { " AND job <> $1" } else { "" }
                )
            })
            .collect();
        let sql = format!(
            "{} ORDER BY updated_at DESC NULLS LAST LIMIT 1",
            each.join(" UNION ALL ")
        );
        // What the spec does as hashed now (its SQL canonical, without how the table is
        // spelled) and the spec as earlier versions hashed it (as written): a twin started by
        // either is found.
        let hashes = [
            self.spec.twin_hash().to_string(),
            self.spec.hash_as_written.clone(),
        ];
        let twin = tx
            .query_opt(&sql, &[&self.ctx.job, &hashes.as_slice(), &walks, &earlier])
            .await
            .map_err(|e| db_error("reading the checkpoint store", &e))?;
        let Some(twin) = twin else {
            return Ok(());
        };
        let (store, other, status): (i32, String, String) = (twin.get(0), twin.get(1), twin.get(2));
        let store = &stores[store as usize];
        let file = self.spec.file.display();
        let job = &self.ctx.job;
        if store != own {
            return Err(Error::Spec(format!(
                "{file}: state.schema: job {job} is new to the store {own}, but job {other} \
                 ({status}) in the store {store} of this database has this same spec \
                 (statement, where and key over {walks}): the spec's `state.schema` changed, \
                 or two specs keep one job in two stores. Each store keeps its own checkpoint, \
                 so {job} would start over from the first key and do every row again. Give \
                 this spec `state: {{ schema: {store} }}` and `name: {other}` to go on with \
                 that job (a done one is skipped), or run {job} knowingly with `run --rerun`"
            )));
        }
        Err(Error::Spec(format!(
            "{file}: name: job {job} is new to this database, but job {other} ({status}) has \
             this same spec (statement, where and key over {walks}) under its own name: a spec \
             file renamed, or its `name:` changed. The name keys the checkpoint, so {job} would \
             start over from the first key and do every row again. Give this spec `name: \
             {other}` to go on with that job (a done one is skipped), or run {job} knowingly \
             with `run --rerun`"
        )))
    }

    /// Rows left in the job: counted (`exact`), or estimated from the planner's view of the key
    /// ranges left, scaled by the share of rows that matched `where` in what was walked so far
    /// (the planner's statistics of `where` go stale while a backfill changes the rows); or,
    /// when planning over the table would run what writes (`Prepared::table_plannable`), from
    /// its size in the catalog.
    pub async fn pending(&self, exact: bool) -> Result<Estimate> {
        let p = self.ctx.prepared()?;
        let c = self.ctx.conn().await?;
        let ranges = self.ctx.store.ranges_of(&c, &self.ctx.job).await?;
        let pending_retry: u64 = ranges.iter().map(|r| r.pending_retry.max(0) as u64).sum();
        let mut left: Vec<(Option<String>, Option<String>)> = ranges
            .iter()
            .filter(|r| r.status != super::store::DONE)
            .map(|r| (r.cursor.clone(), r.hi.clone()))
            .collect();
        if ranges.is_empty() {
            left.push((None, None));
        }
        if !p.table_plannable {
            // Nothing is planned or counted over the table: its size from the catalog (its
            // partitions' and children's), shared out by the ranges left.
            let all: f64 = c
                .query_one(
                    "WITH RECURSIVE tree(relid) AS (
                         SELECT $1::text::regclass::oid
                         UNION SELECT i.inhrelid FROM tree t JOIN pg_inherits i ON i.inhparent = t.relid)
                     SELECT coalesce(sum(greatest(k.reltuples, 0)), 0)::float8
                       FROM pg_class k JOIN tree t ON t.relid = k.oid",
                    &[&p.info.rel],
                )
                .await
                .map_err(|e| db_error("reading the table's size", &e))?
                .get(0);
            let share = if ranges.is_empty() {
                1.0
            } else {
                left.len() as f64 / ranges.len() as f64
            };
            return Ok(Estimate {
                rows: (all * share).round() as u64,
                exact: false,
                pending_retry,
            });
        }
        if exact {
            let (rel, key, ty, f) = (&p.info.rel, &p.info.key, &p.info.key_type, &p.info.filter);
            let sql = format!(
                "SELECT count(*) FROM {rel}
                  WHERE {key} IS NOT NULL AND ($1::text IS NULL OR {key} > CAST($1::text AS {ty}))
                    AND ($2::text IS NULL OR {key} <= CAST($2::text AS {ty})) AND {f}"
            );
            let mut rows = 0u64;
            for (lo, hi) in &left {
                rows += c
                    .query_one(&sql, &[lo, hi])
                    .await
                    .map_err(|e| db_error("counting pending rows", &e))?
                    .get::<_, i64>(0) as u64;
            }
            return Ok(Estimate {
                rows,
                exact: true,
                pending_retry,
            });
        }
        let (mut remaining_all, mut remaining_filtered) = (0.0, 0.0);
        for (lo, hi) in &left {
            remaining_all += self
                .planned_rows(&c, lo.as_deref(), hi.as_deref(), false)
                .await?;
            remaining_filtered += self
                .planned_rows(&c, lo.as_deref(), hi.as_deref(), true)
                .await?;
        }
        let mut walked_all = 0.0;
        let mut walked_keys = 0.0;
        for r in &ranges {
            let upto = if r.status == super::store::DONE {
                r.hi.as_deref()
            } else {
                r.cursor.as_deref()
            };
            if r.status != super::store::DONE && r.cursor == r.lo {
                continue;
            }
            walked_all += self.planned_rows(&c, r.lo.as_deref(), upto, false).await?;
            walked_keys += r.keys_done as f64;
        }
        let rows = if walked_all >= 1000.0 && walked_keys > 0.0 {
            remaining_all * (walked_keys / walked_all).min(1.0)
        } else {
            remaining_filtered
        };
        Ok(Estimate {
            rows: rows.round() as u64,
            exact: false,
            pending_retry,
        })
    }
}

impl Backend for PgJob {
    type Worker = PgWorker;

    async fn load(&self) -> Result<Option<JobState>> {
        let c = self.ctx.conn().await?;
        let live = if self.ctx.store.exists(&c).await? {
            self.ctx.live_workers(&c, false).await?
        } else {
            0
        };
        self.ctx.store.load(&c, &self.ctx.job, live).await
    }

    async fn blockers(&self) -> Result<Vec<String>> {
        let c = self.ctx.conn().await?;
        blockers::find(
            &c,
            &self.ctx.spec.table,
            self.ctx.limits.max_transaction_age,
        )
        .await
    }

    async fn preflight(&self) -> Result<()> {
        if self.ctx.ready.get().is_some() {
            return Ok(());
        }
        let c = self.ctx.conn().await?;
        // Checking the statement takes the table's ACCESS SHARE lock: never queue for it
        // forever. SET LOCAL in a transaction that is rolled back leaves the pooled session
        // as it was.
        let lock_timeout = self.ctx.limits.lock_timeout.as_millis().max(1);
        c.batch_execute(&format!(
            "BEGIN READ ONLY; SET LOCAL lock_timeout = {lock_timeout}"
        ))
        .await
        .map_err(|e| db_error("preflight", &e))?;
        let info = table::inspect(&c, &self.ctx.spec).await;
        let verify = match (&info, &self.verify) {
            (Ok(_), Some(sql)) => super::readonly::refuse_outside_calls(&c, sql).await,
            _ => Ok(()),
        };
        let plannable = async |sql: String| {
            super::effects::calls_in(&c, &serde_json::Value::Null, &sql)
                .await
                .map(|calls| calls.is_empty())
        };
        let table_plannable = match &info {
            Ok(info) => plannable(format!("SELECT 1 FROM {}", info.rel)).await,
            _ => Ok(true),
        };
        let where_plannable = match (&info, &table_plannable) {
            (Ok(info), Ok(true)) if info.filter != "true" => {
                plannable(format!("SELECT 1 FROM {} WHERE {}", info.rel, info.filter)).await
            }
            (_, Ok(false)) => Ok(false),
            _ => Ok(true),
        };
        let own_locks = match &info {
            Ok(info) => super::own_locks::applies(&c, &self.ctx.spec.statement, info).await,
            Err(_) => false,
        };
        tracing::debug!(
            own_locks,
            "the statement {} the rows it writes itself",
            if own_locks { "locks" } else { "may not lock" }
        );
        let _ = c.batch_execute("ROLLBACK").await;
        let info = info?;
        verify?;
        let (table_plannable, where_plannable) = (table_plannable?, where_plannable?);
        let sql = BatchSql::new(&info, self.ctx.spec.lock, &self.ctx.limits, &self.ctx.store);
        let _ = self.ctx.ready.set(Arc::new(Prepared {
            info,
            sql,
            statement: self.ctx.spec.statement.clone(),
            table_plannable,
            where_plannable,
            own_locks,
        }));
        Ok(())
    }

    async fn join(&self, index: u32, cap: u32) -> Result<std::result::Result<PgWorker, String>> {
        let c = self.ctx.connect_worker().await?;
        match self.ctx.take_slot(&c, index, cap).await? {
            Ok(slot) => Ok(Ok(PgWorker::new(self.ctx.clone(), index, slot, cap, c))),
            Err(who) => Ok(Err(who)),
        }
    }

    async fn start(&self, spec_hash: &str, how: crate::engine::Start) -> Result<JobState> {
        let restart = how == crate::engine::Start::Over;
        let p = self.ctx.prepared()?;
        let mut c = self.ctx.conn().await?;
        let store = &self.ctx.store;
        store.ensure(&c).await?;
        let job = self.ctx.job.as_str();
        if restart {
            let others = self.ctx.live_workers(&c, true).await?;
            if others > 0 {
                return Err(Error::Stopped(StopReason::LockHeld(format!(
                    "{others} other worker(s) still working on the finished job; a --rerun \
                     starts only when they are gone"
                ))));
            }
        }
        // Bounds come from the catalog (or a sample): read before the transaction.
        let inner = ranges::bounds(&c, &p.info, ranges::target_count(self.ctx.workers)).await?;
        let tx = c
            .transaction()
            .await
            .map_err(|e| db_error("writing the checkpoint store", &e))?;
        let lock = store.lock_key(job, "start");
        // Runners of one job starting together queue here behind each other's short start
        // transactions: not bounded by the session's lock_timeout (another session's locks).
        tx.batch_execute("SET LOCAL lock_timeout = '60s'")
            .await
            .map_err(|e| db_error("writing the checkpoint store", &e))?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            &[&lock],
        )
        .await
        .map_err(|e| db_error("writing the checkpoint store", &e))?;
        if restart {
            let sql = format!(
                "WITH k AS (DELETE FROM {sk} WHERE job = $1), r AS (DELETE FROM {rg} WHERE job = $1)
                 UPDATE {jobs} SET cursor = NULL, keys_done = 0, rows_done = 0, batches_done = 0,
                        rows_retried = 0, started_at = NULL, finished_at = NULL, last_error = NULL
                  WHERE job = $1",
                sk = store.skipped(),
                rg = store.ranges(),
                jobs = store.jobs()
            );
            tx.execute(&sql, &[&job])
                .await
                .map_err(|e| db_error("restarting the job", &e))?;
        }
        // A checkpoint is a position in one table's key, in the order its type and collation
        // give: it means nothing in another table, by another key, or once the key's type or
        // collation changed (resumed there, rows before it would be skipped and rows after it
        // done twice). A job started before this was recorded keeps going as it is.
        // Recorded schema-qualified, so that a search_path of another run reads the same; a
        // record of an earlier version (the table and key alone, the name as regclass::text
        // printed it or schema-qualified) still matches, and gains the order now.
        let walks = format!("{} by {} ({})", p.info.rel, p.info.key, p.info.key_order);
        let earlier = [
            format!("{} by {}", p.info.rel, p.info.key),
            format!("{} by {}", p.info.shown, p.info.key),
        ];
        if !restart {
            let sql = format!("SELECT walks FROM {} WHERE job = $1", store.jobs());
            let record = tx
                .query_opt(&sql, &[&job])
                .await
                .map_err(|e| db_error("reading the checkpoint store", &e))?;
            if record.is_none() && how != crate::engine::Start::Knowingly {
                self.refuse_a_twin(&tx, &walks, &earlier).await?;
            }
            let before: Option<String> = record.and_then(|r| r.get(0));
            if let Some(before) = before.filter(|b| *b != walks && !earlier.contains(b)) {
                return Err(Error::Spec(format!(
                    "{}: postgres.table / postgres.key: job {job} has a checkpoint in {before}, \
                     but the spec now walks {walks}; a checkpoint cannot carry over to another \
                     table or key, or to a key whose type or collation changed (its keys compare \
                     in another order). Finish the job with the spec it started with (or the \
                     column as it was), or forget its progress with `backfill reset {}` and \
                     start over",
                    self.spec.file.display(),
                    self.spec.file.display()
                )));
            }
        }
        let upsert = format!(
            "INSERT INTO {} AS j (job, status, spec_hash, started_at, updated_at, runner, walks)
             VALUES ($1, 'running', $2, now(), now(), $3, $4)
             ON CONFLICT (job) DO UPDATE SET status = 'running', spec_hash = $2,
                 updated_at = now(), runner = $3, finished_at = NULL,
                 started_at = coalesce(j.started_at, now()), walks = $4
             RETURNING cursor",
            store.jobs()
        );
        let legacy: Option<String> = tx
            .query_one(
                &upsert,
                &[&job, &spec_hash, &crate::state::runner_id(), &walks],
            )
            .await
            .map_err(|e| db_error("writing the checkpoint store", &e))?
            .get(0);
        ranges::create(&tx, store, job, &inner, legacy.as_deref()).await?;
        tx.commit()
            .await
            .map_err(|e| db_error("writing the checkpoint store", &e))?;
        drop(c);
        self.load()
            .await?
            .ok_or_else(|| Error::Preflight(format!("job {job} vanished from the store")))
    }

    async fn estimate(&self) -> Result<Estimate> {
        self.pending(false).await
    }

    async fn all_done(&self) -> Result<bool> {
        let c = self.ctx.conn().await?;
        let sql = format!(
            "SELECT count(*) > 0 AND bool_and(status = 'done') FROM {} WHERE job = $1",
            self.ctx.store.ranges()
        );
        Ok(c.query_one(&sql, &[&self.ctx.job])
            .await
            .map_err(|e| db_error("reading the job's ranges", &e))?
            .get::<_, Option<bool>>(0)
            .unwrap_or(false))
    }

    async fn verify(&self) -> Result<Option<i64>> {
        let Some(sql) = &self.verify else {
            return Ok(None);
        };
        let c = self.ctx.conn().await?;
        super::readonly::verify(&c, sql, &self.ctx.limits)
            .await
            .map(Some)
    }

    async fn finish(&self, status: Status, error: Option<&str>) -> Result<()> {
        let c = self.ctx.conn().await?;
        self.ctx
            .store
            .finish(&c, &self.ctx.job, status, error)
            .await
    }

    async fn throttle(&self, spec: &crate::spec::Throttle) -> Result<Option<crate::engine::Gate>> {
        let probe = self.throttle_probe(spec.clone());
        Ok(Some(
            crate::engine::Gate::start(probe, spec.interval).await?,
        ))
    }

    fn describe(&self) -> (String, String) {
        (
            self.ctx.spec.redacted_url(),
            format!("table {} by {}", self.ctx.spec.table, self.ctx.spec.key),
        )
    }

    async fn plan(
        &self,
        opts: crate::engine::plan::PlanOptions,
    ) -> Result<crate::engine::plan::Plan> {
        super::plan::plan(self, &self.spec, opts).await
    }

    async fn units(&self) -> Result<Vec<crate::state::UnitState>> {
        let c = self.ctx.conn().await?;
        Ok(self
            .ctx
            .store
            .ranges_of(&c, &self.ctx.job)
            .await?
            .iter()
            .map(|r| r.unit())
            .collect())
    }

    async fn set_paused(&self, spec_hash: &str, paused: bool) -> Result<()> {
        let c = self.ctx.conn().await?;
        self.ctx
            .store
            .set_paused(&c, &self.ctx.job, spec_hash, paused)
            .await
    }

    async fn note_throttled(&self, why: Option<&str>) -> Result<()> {
        let c = self.ctx.conn().await?;
        self.ctx.store.set_throttled(&c, &self.ctx.job, why).await
    }

    async fn reset(&self, discard_foreign: bool) -> Result<Option<String>> {
        if discard_foreign {
            return Err(Error::Usage(
                "--discard-foreign-rows is for ClickHouse jobs (rows other writers put into \
                 partitions the job landed in); a Postgres job changes rows in place and keeps \
                 nothing to restore"
                    .into(),
            ));
        }
        // The job's lock, exclusively: refused while any worker holds it shared.
        let c = self.ctx.connect_worker().await?;
        let key = self.ctx.store.lock_key(&self.ctx.job, "job");
        if !advisory::try_lock(&c, &key, false, "taking the job's lock").await? {
            let n = self.ctx.live_workers(&c, false).await?;
            return Err(Error::Stopped(StopReason::LockHeld(format!(
                "{n} live worker(s); stop them first (SIGTERM) and reset again"
            ))));
        }
        let existed = self.ctx.store.forget(&c, &self.ctx.job).await?;
        // Released here, not by closing the session: the server ends a closed session a moment
        // after the client has gone, and a `run` started right after this command exits would
        // still find the lock held.
        advisory::unlock(&c, &key, false, "releasing the job's lock").await?;
        Ok(existed.then(|| "checkpoint deleted; the next run starts from the beginning".into()))
    }
}
