//! The operator's controls against the real servers, each driven from another process than the
//! runner: `pause`/`unpause` of a running job (one worker, two worker threads, two processes, a
//! worker in its retry pass, a job paused before it starts, a ClickHouse job between chunks;
//! SIGTERM, `--max-runtime` and the window's end still stop it), `verify:` after the last batch
//! and `backfill verify` alone (Postgres and both ClickHouse servers), run windows (started
//! outside: exit 75 touching nothing, a finished job still skipped with 0; a window that closes
//! mid-run: exit 75 at a batch boundary and a later run finishes), and `status --watch` against
//! a job running in another process. Assertions are about rows, counters, exit codes and what
//! the commands say, never about how long anything took.
//!
//! The slow Postgres jobs sleep in every batch while `ctl.slow` is true, so a test can hold a
//! job in the middle of its work for as long as it needs and then let it finish quickly.

mod common;
use common::ch::ChDb;
use common::prom;
use common::runner::{Running, spawn, wait_until};
use common::store::{JobRow, has_store, job_record, job_row};
use common::{TestDb, backfill, checksum, count, run};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio_postgres::Client;

/// How long a paused job must stay still for the tests to call it held.
const HELD: Duration = Duration::from_secs(3);
/// Upper bound for anything a test waits for (a loaded 2-core machine is slow).
const LIMIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);

/// `t(id, n)` with `rows` rows and `ctl(slow)`, true: see `slow_spec`.
async fn slow_table(c: &Client, rows: i64) {
    c.batch_execute(&format!(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT i FROM generate_series(1, {rows}) i;
         CREATE TABLE ctl (slow bool NOT NULL);
         INSERT INTO ctl VALUES (true);
         ANALYZE t;"
    ))
    .await
    .unwrap();
}

/// A job adding 1 to `t.n` in batches of 10 (so a row changed twice shows as n = 2); each batch
/// sleeps 50ms while `ctl.slow` is true. `extra` is appended (more top-level fields).
fn slow_spec(name: &str, extra: &str) -> String {
    format!(
        "name: {name}
postgres:
  url: $URL
  table: t
  key: id
  statement: |
    WITH s AS MATERIALIZED (
      SELECT pg_sleep(CASE WHEN (SELECT slow FROM ctl) THEN 0.05 ELSE 0 END))
    UPDATE t SET n = n + 1 FROM s WHERE t.id = ANY($1)
batch: {{size: 10, target: 0}}
{extra}"
    )
}

/// `backfill <cmd> <spec>` to its end: (exit code, stdout, stderr).
fn control(cmd: &str, spec: &Path) -> (i32, String, String) {
    run(&[&cmd, &spec])
}

/// `backfill pause|unpause`, which must succeed and say what it did.
fn set_paused(spec: &Path, paused: bool) {
    let cmd = if paused { "pause" } else { "unpause" };
    let (code, out, err) = control(cmd, spec);
    assert_eq!(code, 0, "{cmd}:\n{out}\n{err}");
    let said = if paused { "paused;" } else { "unpaused;" };
    assert!(out.contains(said), "{cmd} says what it did:\n{out}");
}

/// The job's counters, the data and whether the two agree: every committed batch added 1 to
/// each of its rows, so the sum of `n` is the keys the checkpoint counts.
async fn snapshot(c: &Client, job: &str) -> (JobRow, i64, String) {
    let j = job_row(c, job).await.expect("the job has a record");
    let sum = count(c, "SELECT coalesce(sum(n), 0)::bigint FROM t").await;
    assert_eq!(
        sum, j.keys_done,
        "the data and the checkpoint disagree: a batch was half-applied or lost ({j:?})"
    );
    assert_eq!(
        count(c, "SELECT count(*) FROM t WHERE n > 1").await,
        0,
        "a row was changed twice"
    );
    (j, sum, checksum(c, "t").await)
}

/// The paused job commits nothing for `HELD`: its counters and the table stay as they are, and
/// its runner is still there, waiting.
async fn assert_held(c: &Client, job: &str, runners: &mut [&mut Running]) {
    let before = snapshot(c, job).await;
    tokio::time::sleep(HELD).await;
    let after = snapshot(c, job).await;
    assert_eq!(
        after, before,
        "a batch was committed while the job was paused"
    );
    for r in runners.iter_mut() {
        assert!(
            !r.exited(),
            "a paused runner exited instead of waiting:\n{}",
            r.stderr()
        );
    }
}

/// Wait (bounded) until the runner's log says that `worker` is paused.
async fn wait_paused_logged(r: &mut Running, worker: &str) {
    let stderr = r.stderr_path().to_path_buf();
    r.wait_until(
        &format!("worker {worker} to log that it is paused"),
        LIMIT,
        POLL,
        async || {
            std::fs::read_to_string(&stderr).is_ok_and(|log| {
                log.lines().any(|l| {
                    l.contains("paused (backfill pause)") && l.contains(&format!("\"{worker}\""))
                })
            })
        },
    )
    .await;
}

/// `status` and `status --json` say the job is paused.
fn assert_status_paused(spec: &Path, job: &str) {
    let (code, out, err) = control("status", spec);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains(&format!("{job}  [paused]")), "{out}");
    assert!(out.contains("PAUSED (backfill unpause)"), "{out}");
    let (code, out, err) = run(&[&"status", &"--json", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("status --json is JSON");
    let entry = &doc["jobs"][0];
    assert_eq!(entry["job"], job, "{doc}");
    assert_eq!(entry["status"], "paused", "{doc}");
    assert_eq!(entry["paused"], true, "{doc}");
}

/// Every row was changed exactly once and the job is done with every key counted once.
async fn assert_each_row_once(c: &Client, job: &str, rows: i64) {
    assert_eq!(
        count(c, "SELECT count(*) FROM t WHERE n = 1").await,
        rows,
        "rows changed twice or not at all"
    );
    let j = job_row(c, job).await.expect("job recorded");
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!((j.keys_done, j.rows_done), (rows, rows), "{j:?}");
}

/// Wait (bounded) until the job has committed at least `n` batches.
async fn wait_batches(c: &Client, job: &str, n: i64, r: &mut Running) {
    r.wait_until(&format!("{n} batches"), LIMIT, POLL, async || {
        job_row(c, job).await.is_some_and(|j| j.batches_done >= n)
    })
    .await;
}

/// `backfill_paused{backfill_job="<job>"}` scraped from the runner's /metrics.
fn paused_metric(port: u16, job: &str) -> Option<f64> {
    prom::value(&prom::scrape(port)?, "backfill_paused", job)
}

async fn go_fast(c: &Client) {
    c.batch_execute("UPDATE ctl SET slow = false")
        .await
        .unwrap();
}

// ------------------------------------------------------------------------------------------------
// pause and unpause
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_a_running_job_and_unpause_lets_it_finish() {
    const ROWS: i64 = 3000;
    let db = TestDb::new("pause_run").await;
    let c = db.client().await;
    slow_table(&c, ROWS).await;
    let spec = db.spec("job.yaml", &slow_spec("pause-run", ""));

    let port = prom::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut r = spawn(db.dir.path(), "run", &["--metrics-addr", &addr], &spec);
    wait_batches(&c, "pause-run", 3, &mut r).await;
    assert_eq!(paused_metric(port, "pause-run"), Some(0.0));
    set_paused(&spec, true);
    wait_paused_logged(&mut r, "w0").await;
    assert_held(&c, "pause-run", &mut [&mut r]).await;
    assert_status_paused(&spec, "pause-run");
    assert_eq!(
        paused_metric(port, "pause-run"),
        Some(1.0),
        "the runner exports that it is paused"
    );
    let held = job_row(&c, "pause-run").await.unwrap();
    assert!(
        held.keys_done < ROWS,
        "the job ended before the pause: {held:?}"
    );

    set_paused(&spec, false);
    go_fast(&c).await;
    let (code, out, err) = r.finish(LIMIT).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("unpaused after"),
        "the runner says it goes on:\n{err}"
    );
    assert!(out.contains("pause-run: done"), "{out}");
    assert_each_row_once(&c, "pause-run", ROWS).await;
    let (code, out, _) = control("status", &spec);
    assert_eq!(code, 0);
    assert!(out.contains("pause-run  [done]"), "{out}");
    drop(c);
    db.drop_db().await;
}

/// Two workers of one job, as two threads of one runner or as two runner processes, paused by
/// a third process: both finish their open batch and wait; unpause lets both go on.
async fn two_workers_paused_from_another_process(processes: bool) {
    const ROWS: i64 = 4000;
    let hint = if processes {
        "pause_procs"
    } else {
        "pause_threads"
    };
    let job = hint.replace('_', "-");
    let db = TestDb::new(hint).await;
    let c = db.client().await;
    slow_table(&c, ROWS).await;
    let spec = db.spec("job.yaml", &slow_spec(&job, "workers: 2\n"));

    let mut runners = if processes {
        vec![
            spawn(db.dir.path(), "a", &["--workers", "1"], &spec),
            spawn(db.dir.path(), "b", &["--workers", "1"], &spec),
        ]
    } else {
        vec![spawn(db.dir.path(), "run", &[], &spec)]
    };
    // Both workers are walking a range of their own.
    wait_until("two workers at work", LIMIT, POLL, async || {
        has_store(&c).await
            && count(
                &c,
                &format!(
                    "SELECT count(DISTINCT owner) FROM backfill.ranges
                      WHERE job = '{job}' AND keys_done > 0 AND owner IS NOT NULL"
                ),
            )
            .await
                >= 2
    })
    .await;
    set_paused(&spec, true);
    if processes {
        for r in runners.iter_mut() {
            wait_paused_logged(r, "w0").await;
        }
    } else {
        wait_paused_logged(&mut runners[0], "w0").await;
        wait_paused_logged(&mut runners[0], "w1").await;
    }
    {
        let mut refs: Vec<&mut Running> = runners.iter_mut().collect();
        assert_held(&c, &job, &mut refs).await;
    }
    assert_status_paused(&spec, &job);

    set_paused(&spec, false);
    go_fast(&c).await;
    for r in runners {
        let (code, out, err) = r.finish(LIMIT).await;
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(err.contains("unpaused after"), "{err}");
    }
    assert_each_row_once(&c, &job, ROWS).await;
    drop(c);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_reaches_two_worker_threads() {
    two_workers_paused_from_another_process(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_reaches_two_runner_processes() {
    two_workers_paused_from_another_process(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_paused_before_it_starts_waits_and_signals_and_deadlines_still_stop_it() {
    const ROWS: i64 = 500;
    let db = TestDb::new("pause_start").await;
    let c = db.client().await;
    slow_table(&c, ROWS).await;
    go_fast(&c).await;
    let spec = db.spec("job.yaml", &slow_spec("pause-start", ""));
    let untouched = checksum(&c, "t").await;

    // Paused before its first run: status shows it.
    set_paused(&spec, true);
    assert_status_paused(&spec, "pause-start");

    // Started, it waits instead of exiting 0; SIGTERM stops it with 75, nothing changed.
    let mut r = spawn(db.dir.path(), "first", &[], &spec);
    wait_paused_logged(&mut r, "w0").await;
    tokio::time::sleep(HELD).await;
    assert!(!r.exited(), "a paused job exited:\n{}", r.stderr());
    assert_eq!(
        checksum(&c, "t").await,
        untouched,
        "a paused job changed rows"
    );
    let (code, out, err) = r.stop(LIMIT).await;
    assert_eq!(code, 75, "SIGTERM of a paused job:\n{out}\n{err}");
    assert!(format!("{out}{err}").contains("SIGTERM"), "{out}\n{err}");
    let j = job_row(&c, "pause-start").await.unwrap();
    assert_eq!((j.status.as_str(), j.batches_done), ("stopped", 0), "{j:?}");
    assert_eq!(checksum(&c, "t").await, untouched);

    // --max-runtime stops it too, with 75.
    let r = spawn(db.dir.path(), "deadline", &["--max-runtime", "2s"], &spec);
    let (code, out, err) = r.finish(LIMIT).await;
    assert_eq!(code, 75, "--max-runtime of a paused job:\n{out}\n{err}");
    assert!(out.contains("max runtime"), "{out}\n{err}");
    assert!(err.contains("paused (backfill pause)"), "{err}");
    assert_eq!(checksum(&c, "t").await, untouched);
    assert_status_paused(&spec, "pause-start");

    // Unpaused, the next run does the job, every row once. `--max-runtime 0` is no limit, as
    // `limits.max_runtime: 0` is (it stopped every run at once).
    set_paused(&spec, false);
    let (code, out, err) = run(&[&"run", &"--max-runtime", &"0", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_each_row_once(&c, "pause-start", ROWS).await;
    drop(c);
    db.drop_db().await;
}

/// A worker retrying the rows it skipped because they were locked (its range's retry pass)
/// notices the pause too: it must not go on committing retry pages, nor process the rows once
/// their lock is gone, until it is unpaused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_reaches_a_worker_in_its_retry_pass() {
    const ROWS: i64 = 200;
    let db = TestDb::new("pause_retry").await;
    let c = db.client().await;
    slow_table(&c, ROWS).await;
    go_fast(&c).await;
    // lock_timeout bounds the waiting rounds of the retry pass: long, so the pass is still
    // going when the test releases the rows.
    let spec = db.spec(
        "job.yaml",
        &slow_spec(
            "pause-retry",
            "limits: {lock_timeout: 30s, statement_timeout: 60s}\n",
        ),
    );
    // Another session holds two rows: the walk skips them, and the retry pass waits for them.
    let mut holder = db.client().await;
    let tx = holder.transaction().await.unwrap();
    tx.batch_execute("SELECT * FROM t WHERE id IN (17, 123) FOR UPDATE")
        .await
        .unwrap();

    let mut r = spawn(db.dir.path(), "run", &[], &spec);
    r.wait_until("the range's retry pass", LIMIT, POLL, async || {
        has_store(&c).await
            && count(
                &c,
                "SELECT count(*) FROM backfill.ranges WHERE job = 'pause-retry' AND status = 'retrying'",
            )
            .await
                == 1
    })
    .await;
    set_paused(&spec, true);
    wait_paused_logged(&mut r, "w0").await;
    // The rows are free now; the paused worker must leave them alone.
    tx.commit().await.unwrap();
    let before = job_row(&c, "pause-retry").await.unwrap();
    tokio::time::sleep(HELD).await;
    let after = job_row(&c, "pause-retry").await.unwrap();
    assert_eq!(after, before, "retry pages were committed while paused");
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM t WHERE id IN (17, 123) AND n <> 0"
        )
        .await,
        0,
        "skipped rows were processed while the job was paused"
    );
    assert!(!r.exited(), "{}", r.stderr());

    set_paused(&spec, false);
    let (code, out, err) = r.finish(LIMIT).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_each_row_once(&c, "pause-retry", ROWS).await;
    drop(holder);
    drop(c);
    db.drop_db().await;
}

// ------------------------------------------------------------------------------------------------
// verify
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn verify_keeps_a_job_that_is_not_really_done_failed_until_the_data_is_fixed() {
    const ROWS: i64 = 1000;
    let db = TestDb::new("verify_pg").await;
    let c = db.client().await;
    // Row 500 is excluded by `where`: the statement never reaches it, and verify counts it.
    c.batch_execute(&format!(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0,
                         skip bool NOT NULL DEFAULT false);
         INSERT INTO t (id, skip) SELECT i, i = 500 FROM generate_series(1, {ROWS}) i;
         ANALYZE t;"
    ))
    .await
    .unwrap();
    let spec = db.spec(
        "verify.yaml",
        "name: verify-pg
postgres:
  url: $URL
  table: t
  key: id
  where: NOT skip
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1)
  verify: SELECT count(*) FROM t WHERE n = 0
batch: {size: 100, target: 0}
",
    );
    let plain = db.spec(
        "plain.yaml",
        "name: plain
postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET n = n WHERE id = ANY($1)
",
    );

    // `backfill verify` alone, before any run: every row is still 0; it writes nothing.
    let before = checksum(&c, "t").await;
    let (code, out, err) = control("verify", &spec);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("verify-pg: verify returned 1000: NOT done"),
        "{out}"
    );
    assert!(
        err.contains("verify-pg (1000)"),
        "the error names job and number: {err}"
    );
    assert_eq!(checksum(&c, "t").await, before);
    assert!(!has_store(&c).await, "verify created the checkpoint store");
    // A spec without `verify:` is a usage error.
    let (code, out, err) = control("verify", &plain);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("no `verify:` query"), "{err}");

    // The run does every batch, then verify finds the row it could not fix: exit 1 with the
    // number, status failed, the checkpoint kept.
    let (code, out, err) = control("run", &spec);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("verify returned 1, not 0"), "{err}");
    assert!(out.contains("verify-pg: FAILED"), "{out}");
    let j = job_row(&c, "verify-pg").await.unwrap();
    assert_eq!(j.status, "failed", "{j:?}");
    assert_eq!((j.keys_done, j.rows_done), (ROWS - 1, ROWS - 1), "{j:?}");
    assert!(
        j.last_error
            .as_deref()
            .is_some_and(|e| e.contains("verify returned 1")),
        "{j:?}"
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM backfill.ranges WHERE job = 'verify-pg' AND status <> 'done'"
        )
        .await,
        0,
        "every range stays done"
    );
    let (_, out, _) = control("status", &spec);
    assert!(out.contains("verify-pg  [failed]"), "{out}");
    assert!(out.contains("verify returned 1"), "{out}");

    // verify alone says the same, and writes nothing (not even to the store).
    let record = job_record(&c, "verify-pg").await;
    let data = checksum(&c, "t").await;
    let (code, out, err) = control("verify", &spec);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("verify-pg: verify returned 1: NOT done"),
        "{out}"
    );
    assert_eq!(
        job_record(&c, "verify-pg").await,
        record,
        "verify wrote to the store"
    );
    assert_eq!(checksum(&c, "t").await, data);

    // A second run without a fix fails the same way and changes no row.
    let (code, out, err) = control("run", &spec);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("verify returned 1, not 0"), "{err}");
    assert_eq!(checksum(&c, "t").await, data);

    // Fixed by hand: verify passes alone, and the next run is done without walking again.
    c.batch_execute("UPDATE t SET n = 1 WHERE skip")
        .await
        .unwrap();
    let (code, out, err) = control("verify", &spec);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("verify-pg: verify returned 0: done"), "{out}");
    let (code, out, err) = control("run", &spec);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("verify-pg: done"), "{out}");
    let j = job_row(&c, "verify-pg").await.unwrap();
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.last_error, None, "{j:?}");
    assert_eq!(j.keys_done, ROWS - 1, "no key walked twice: {j:?}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n = 1").await,
        ROWS,
        "every row changed exactly once"
    );
    drop(c);
    db.drop_db().await;
}

/// `ev` (one event an hour for 20 days from 2025-11-01) and an empty `out`.
fn ch_events(db: &ChDb) {
    db.q("CREATE TABLE ev (ran_at DateTime, k UInt64, v UInt32)
          ENGINE = MergeTree PARTITION BY toYYYYMM(ran_at) ORDER BY ran_at");
    db.q("CREATE TABLE out (d Date, k UInt64, v UInt32) ENGINE = MergeTree ORDER BY (d, k)");
    db.q(
        "INSERT INTO ev SELECT toDateTime('2025-11-01 00:00:00') + number * 3600, number,
                                toUInt32(number * 7)
            FROM numbers(480)",
    );
}

/// Rows and a hash over `out`, and the same over `ev` as the job copies it.
fn ch_digests(db: &ChDb) -> (String, String) {
    (
        db.q("SELECT count(), sum(cityHash64(d, k, v)) FROM out"),
        db.q("SELECT count(), sum(cityHash64(toDate(ran_at), k, v)) FROM ev"),
    )
}

ch_test! {
    #[test]
    fn verify_on_clickhouse_compares_source_and_target(srv) {
        let db = ChDb::new_on(&srv, "verify");
        ch_events(&db);
        // The statement leaves k = 7 out: the counts differ by one after the last chunk.
        let spec = db.spec(
            "verify.yaml",
            "name: ch-verify
clickhouse:
  url: $URL
  source: ev
  time_column: ran_at
  chunks: [day]
  target: out
  statement: |
    INSERT INTO {target} SELECT toDate(ran_at), k, v FROM ev WHERE {chunk} AND k != 7
  verify: SELECT toInt64((SELECT count() FROM ev)) - toInt64((SELECT count() FROM out))
",
        );
        let label = srv.label;

        // Alone, before any run: 480 missing, nothing written (no state table).
        let (code, out, err) = control("verify", &spec);
        assert_eq!(code, 1, "{label}:\n{out}\n{err}");
        assert!(out.contains("ch-verify: verify returned 480: NOT done"), "{label}: {out}");
        assert!(!db.has_table("backfill_chunks"), "{label}: verify created the store");

        let (code, out, err) = control("run", &spec);
        assert_eq!(code, 1, "{label}:\n{out}\n{err}");
        assert!(err.contains("verify returned 1, not 0"), "{label}: {err}");
        let job = db.record("ch-verify", "").expect("job record");
        assert_eq!(job.status, "failed", "{label}: {job:?}");
        assert!(job.error.contains("verify returned 1"), "{label}: {job:?}");
        let chunks = db.chunks("ch-verify");
        assert_eq!(chunks.len(), 20, "{label}: {chunks:?}");
        assert!(chunks.iter().all(|r| r.status == "done"), "{label}: checkpoint kept: {chunks:?}");
        assert_eq!(db.num("SELECT count() FROM out"), 479, "{label}");

        // verify alone: the same number, and nothing written.
        let (records, data) = (db.records("ch-verify"), ch_digests(&db).0);
        let (code, out, err) = control("verify", &spec);
        assert_eq!(code, 1, "{label}:\n{out}\n{err}");
        assert!(out.contains("ch-verify: verify returned 1: NOT done"), "{label}: {out}");
        assert_eq!(db.records("ch-verify"), records, "{label}: verify wrote to the store");
        assert_eq!(ch_digests(&db).0, data, "{label}");

        // The missing row added by hand: verify passes, and the run is done without landing
        // any chunk again.
        db.q("INSERT INTO out SELECT toDate(ran_at), k, v FROM ev WHERE k = 7");
        let (code, out, err) = control("verify", &spec);
        assert_eq!(code, 0, "{label}:\n{out}\n{err}");
        assert!(out.contains("ch-verify: verify returned 0: done"), "{label}: {out}");
        let (code, out, err) = control("run", &spec);
        assert_eq!(code, 0, "{label}:\n{out}\n{err}");
        assert!(out.contains("ch-verify: done"), "{label}: {out}");
        assert_eq!(db.record("ch-verify", "").unwrap().status, "done", "{label}");
        let (target, source) = ch_digests(&db);
        assert_eq!(target, source, "{label}: every source row once in the target");
    }
}

ch_test! {
    /// `readonly=2` still lets `KILL QUERY` cancel another client's query, and table
    /// functions reach past the server (`url` sends a request anywhere): verify refuses both
    /// before anything runs.
    #[test]
    fn verify_on_clickhouse_only_reads_this_server(srv) {
        let db = ChDb::new_on(&srv, "verify_ro");
        ch_events(&db);
        let label = srv.label;
        let spec_with = |file: &str, verify: &str| {
            db.spec(
                file,
                &format!(
                    "name: ch-verify-ro
clickhouse:
  url: $URL
  source: ev
  time_column: ran_at
  chunks: [day]
  target: out
  statement: INSERT INTO {{target}} SELECT toDate(ran_at), k, v FROM ev WHERE {{chunk}}
  verify: {verify}
"
                ),
            )
        };
        let kill = spec_with("kill.yaml", "KILL QUERY WHERE query LIKE '%never-such-query%'");
        for cmd in ["validate", "verify"] {
            let (code, out, err) = control(cmd, &kill);
            assert_eq!(code, 2, "{label} {cmd}:\n{out}\n{err}");
            assert!(
                err.contains(":9:") && err.contains("field `clickhouse.verify`")
                    && err.contains("must be one SELECT"),
                "{label} {cmd}: {err}"
            );
        }
        // A listener that would see the request url() sends.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = spec_with(
            "url.yaml",
            &format!("SELECT count() FROM url('http://127.0.0.1:{port}/x', CSV, 'a String')"),
        );
        let (code, out, err) = control("verify", &url);
        assert_eq!(code, 1, "{label}:\n{out}\n{err}");
        assert!(err.contains("calls the table function url()"), "{label}: {err}");
        // `run` refuses it before any chunk lands, not after the last.
        let (code, out, err) = control("run", &url);
        assert_eq!(code, 1, "{label}:\n{out}\n{err}");
        assert!(err.contains("calls the table function url()"), "{label}: {err}");
        assert_eq!(db.num("SELECT count() FROM out"), 0, "{label}: chunks landed");
        assert!(
            matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{label}: verify sent a request through url()"
        );
        // A column of that name is not a call.
        let column = spec_with(
            "column.yaml",
            "SELECT count() FROM (SELECT 'x' AS url) WHERE url = 'y'",
        );
        let (code, out, err) = control("verify", &column);
        assert_eq!(code, 0, "{label}:\n{out}\n{err}");
        assert!(!db.has_table("backfill_chunks"), "{label}: verify created the store");
    }
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pause_holds_a_clickhouse_job_between_chunks(srv) {
        let db = ChDb::new_on(&srv, "pause");
        ch_events(&db);
        let label = srv.label;
        // 20 day chunks of 24 rows; each row sleeps 20ms: about half a second a chunk.
        let spec = db.spec(
            "pause.yaml",
            "name: ch-pause
clickhouse:
  url: $URL
  source: ev
  time_column: ran_at
  chunks: [day]
  target: out
  statement: |
    INSERT INTO {target}
    SELECT d, k, v FROM (SELECT toDate(ran_at) AS d, k, v FROM ev WHERE {chunk})
     WHERE sleepEachRow(0.02) = 0
",
        );
        let done = |db: &ChDb| {
            db.chunks("ch-pause").iter().filter(|r| r.status == "done").count()
        };
        let mut r = spawn(db.dir.path(), "run", &[], &spec);
        r.wait_until("two chunks done", LIMIT, POLL, async || done(&db) >= 2).await;
        set_paused(&spec, true);
        wait_paused_logged(&mut r, "w0").await;
        let before = (db.chunks("ch-pause"), ch_digests(&db).0);
        tokio::time::sleep(HELD).await;
        assert_eq!(
            (db.chunks("ch-pause"), ch_digests(&db).0),
            before,
            "{label}: a chunk landed while paused"
        );
        assert!(done(&db) < 20, "{label}: the job ended before the pause");
        assert!(!r.exited(), "{label}: {}", r.stderr());
        assert_status_paused(&spec, "ch-pause");

        set_paused(&spec, false);
        let (code, out, err) = r.finish(LIMIT).await;
        assert_eq!(code, 0, "{label}:\n{out}\n{err}");
        assert!(err.contains("unpaused after"), "{label}: {err}");
        assert_eq!(done(&db), 20, "{label}");
        let (target, source) = ch_digests(&db);
        assert_eq!(target, source, "{label}: every source row once in the target");
    }
}

// ------------------------------------------------------------------------------------------------
// run windows
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn started_outside_its_window_a_job_exits_75_touching_nothing() {
    let db = TestDb::new("window_out").await;
    let c = db.client().await;
    slow_table(&c, 100).await;
    go_fast(&c).await;
    let before = checksum(&c, "t").await;
    // Windows that open two hours from now, in UTC and in a zone with daylight saving time.
    let mut last = None;
    for zone in ["UTC", "America/New_York"] {
        let now = jiff::Zoned::now().in_tz(zone).unwrap();
        let start = now
            .checked_add(jiff::SignedDuration::from_hours(2))
            .unwrap()
            .round(
                jiff::ZonedRound::new()
                    .smallest(jiff::Unit::Minute)
                    .mode(jiff::RoundMode::Trunc),
            )
            .unwrap();
        let end = start
            .checked_add(jiff::SignedDuration::from_hours(1))
            .unwrap();
        let window = format!(
            "{}-{} {zone}",
            start.strftime("%H:%M"),
            end.strftime("%H:%M")
        );
        let spec = db.spec(
            "job.yaml",
            &slow_spec("window-out", &format!("window: {window}\n")),
        );
        let (code, out, err) = control("run", &spec);
        let all = format!("{out}\n{err}");
        assert_eq!(code, 75, "{window}: {all}");
        assert!(
            all.contains(&format!("outside the run window {window}")),
            "{all}"
        );
        let opens = format!("opens next at {}", start.strftime("%Y-%m-%d %H:%M %Z"));
        assert!(
            all.contains(&opens),
            "says when it opens next ({opens}): {all}"
        );
        assert!(out.contains("window-out: not started"), "{out}");
        // plan says so too.
        let (code, out, err) = control("plan", &spec);
        assert_eq!(code, 0, "{out}\n{err}");
        let said = format!(
            "window:       {window} (closed now: run would exit 75 writing nothing; it {opens})"
        );
        assert!(out.contains(&said), "want {said:?} in:\n{out}");
        assert!(!has_store(&c).await, "{window}: the store was created");
        assert_eq!(checksum(&c, "t").await, before, "{window}: rows changed");
        last = Some(window);
    }

    // A finished job is skipped (exit 0) outside its window too: there is nothing to wait for,
    // and a nightly CronJob that drifts out of the window must not report it as unfinished.
    let spec = db.spec("job.yaml", &slow_spec("window-out", ""));
    let (code, out, err) = control("run", &spec);
    assert_eq!(code, 0, "{out}\n{err}");
    let window = last.unwrap();
    let spec = db.spec(
        "job.yaml",
        &slow_spec("window-out", &format!("window: {window}\n")),
    );
    let (code, out, err) = control("run", &spec);
    assert_eq!(code, 0, "a finished job outside its window:\n{out}\n{err}");
    assert!(out.contains("window-out: skipped (already done)"), "{out}");
    drop(c);
    db.drop_db().await;
}

ch_test! {
    #[test]
    fn a_clickhouse_job_outside_its_window_writes_nothing(srv) {
        let db = ChDb::new_on(&srv, "window");
        ch_events(&db);
        let label = srv.label;
        let now = jiff::Zoned::now().in_tz("UTC").unwrap();
        let start = now.checked_add(jiff::SignedDuration::from_hours(3)).unwrap();
        let end = start.checked_add(jiff::SignedDuration::from_hours(1)).unwrap();
        let window = format!("{}-{} UTC", start.strftime("%H:%M"), end.strftime("%H:%M"));
        let spec = db.spec(
            "window.yaml",
            &format!(
                "name: ch-window
window: {window}
clickhouse:
  url: $URL
  source: ev
  time_column: ran_at
  chunks: [day]
  target: out
  statement: INSERT INTO {{target}} SELECT toDate(ran_at), k, v FROM ev WHERE {{chunk}}
"
            ),
        );
        let tables = db.tables();
        let (code, out, err) = control("run", &spec);
        assert_eq!(code, 75, "{label}:\n{out}\n{err}");
        assert!(err.contains("outside the run window"), "{label}: {err}");
        assert_eq!(db.tables(), tables, "{label}: a table was created");
        assert_eq!(db.num("SELECT count() FROM out"), 0, "{label}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_that_closes_mid_run_stops_it_and_the_next_run_resumes() {
    window_closes_mid_run(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_that_closes_stops_a_paused_job_too() {
    window_closes_mid_run(true).await;
}

/// A job started inside its window, working (or `paused` part way) when the window closes.
async fn window_closes_mid_run(paused: bool) {
    const ROWS: i64 = 3000;
    let db = TestDb::new(if paused {
        "window_paused"
    } else {
        "window_end"
    })
    .await;
    let c = db.client().await;
    slow_table(&c, ROWS).await;
    // Windows are minute-granular: end at the first minute boundary at least 12s away, in UTC.
    let now = jiff::Timestamp::now();
    let minute = jiff::SignedDuration::from_mins(1);
    let mut end = now
        .round(
            jiff::TimestampRound::new()
                .smallest(jiff::Unit::Minute)
                .mode(jiff::RoundMode::Trunc),
        )
        .unwrap()
        .checked_add(minute)
        .unwrap();
    if end.duration_since(now) < jiff::SignedDuration::from_secs(12) {
        end = end.checked_add(minute).unwrap();
    }
    let start = end
        .checked_sub(jiff::SignedDuration::from_mins(10))
        .unwrap();
    let hm = |t: jiff::Timestamp| t.strftime("%H:%M").to_string();
    let window = format!("{}-{} UTC", hm(start), hm(end));
    // 600 batches that sleep 200ms each while ctl.slow: far longer than the window has left.
    let spec_text = |extra: &str| {
        slow_spec("window-end", extra)
            .replace("0.05", "0.2")
            .replace("size: 10,", "size: 5,")
    };
    let spec = db.spec("job.yaml", &spec_text(&format!("window: {window}\n")));

    let (code, out, err) = control("plan", &spec);
    assert_eq!(code, 0, "{out}\n{err}");
    let said = format!(
        "window:       {window} (open now; run stops at {} and resumes next time)",
        end.strftime("%Y-%m-%d %H:%M UTC")
    );
    assert!(out.contains(&said), "want {said:?} in:\n{out}");

    let mut r = spawn(db.dir.path(), "inside", &[], &spec);
    if paused {
        wait_batches(&c, "window-end", 2, &mut r).await;
        set_paused(&spec, true);
        wait_paused_logged(&mut r, "w0").await;
    }
    let (code, out, err) = r.finish(Duration::from_secs(150)).await;
    let all = format!("{out}\n{err}");
    assert_eq!(code, 75, "{all}");
    assert!(
        jiff::Timestamp::now() >= end,
        "stopped before the window's end ({end}): {all}"
    );
    assert!(
        all.contains(&format!("the run window {window} closed")),
        "{all}"
    );
    assert!(out.contains("window-end: stopped"), "{out}");
    let (j, _, _) = snapshot(&c, "window-end").await;
    assert_eq!(j.status, "stopped", "{j:?}");
    assert!(
        j.keys_done > 0 && j.keys_done < ROWS,
        "the job should have been stopped part way: {j:?}"
    );

    // Without the window (the same job), the next run resumes and finishes: every row once.
    if paused {
        set_paused(&spec, false);
    }
    go_fast(&c).await;
    let spec = db.spec("job.yaml", &spec_text(""));
    let (code, out, err) = control("run", &spec);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_each_row_once(&c, "window-end", ROWS).await;
    drop(c);
    db.drop_db().await;
}

// ------------------------------------------------------------------------------------------------
// status --watch
// ------------------------------------------------------------------------------------------------

/// A `backfill status --watch` we started, writing to a file; killed when dropped.
struct Watch {
    child: std::process::Child,
    out: std::path::PathBuf,
}

impl Watch {
    fn start(dir: &Path, tag: &str, args: &[&str], spec: &Path) -> Watch {
        let out = dir.join(format!("{tag}.out"));
        let child = backfill()
            .args(["status", "--watch", "--interval", "300ms"])
            .args(args)
            .arg(spec)
            .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
            .stderr(Stdio::from(
                std::fs::File::create(dir.join(format!("{tag}.err"))).unwrap(),
            ))
            .spawn()
            .expect("spawn backfill status --watch");
        Watch { child, out }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// The complete text redraws so far, each starting with its header line (a redraw is
    /// complete once the next one has begun).
    fn frames(&self) -> Vec<String> {
        let out = self.output();
        let mut frames: Vec<String> = Vec::new();
        for line in out.lines() {
            if line.starts_with("backfill status — ") {
                frames.push(String::new());
            }
            if let Some(f) = frames.last_mut() {
                f.push_str(line);
                f.push('\n');
            }
        }
        frames.pop();
        frames
    }

    /// The `--json` redraws so far, one document a line (complete lines only).
    fn docs(&self) -> Vec<serde_json::Value> {
        let out = self.output();
        let complete = out.rfind('\n').map_or("", |i| &out[..i]);
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect()
    }

    /// Wait (bounded) until `done` holds for what it has printed so far.
    async fn wait_for(&mut self, what: &str, done: impl Fn(&Watch) -> bool) {
        let deadline = std::time::Instant::now() + LIMIT;
        while !done(self) {
            if let Some(s) = self.child.try_wait().unwrap() {
                panic!(
                    "status --watch exited ({s}) before {what}:\n{}",
                    self.output()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one text redraw says about the job: (status, keys, rate line).
fn frame_facts(frame: &str, job: &str) -> (String, i64, Option<String>) {
    let head = frame
        .lines()
        .find(|l| l.starts_with(&format!("{job}  [")))
        .unwrap_or_else(|| panic!("no line for {job} in:\n{frame}"));
    let status = head[job.len() + 3..].split(']').next().unwrap().to_string();
    let keys = frame
        .split_whitespace()
        .skip_while(|w| *w != "keys")
        .nth(1)
        .map_or(-1, |k| k.parse().unwrap_or(-1));
    let rate = frame
        .lines()
        .find(|l| l.trim_start().starts_with("rate "))
        .map(|l| l.trim().to_string());
    (status, keys, rate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_follows_a_job_running_in_another_process() {
    const ROWS: i64 = 3000;
    let db = TestDb::new("watch").await;
    let c = db.client().await;
    slow_table(&c, ROWS).await;
    let spec = db.spec("job.yaml", &slow_spec("watched", ""));
    let dir = db.dir.path();

    let mut r = spawn(dir, "run", &[], &spec);
    wait_batches(&c, "watched", 2, &mut r).await;
    let mut text = Watch::start(dir, "watch", &[], &spec);
    let mut json = Watch::start(dir, "watch-json", &["--json"], &spec);

    // A few redraws while it runs: the keys move, and a rate and an ETA are shown.
    text.wait_for("four redraws with a rate", |w| {
        w.frames()
            .iter()
            .filter(|f| frame_facts(f, "watched").2.is_some())
            .count()
            >= 4
    })
    .await;
    let frames = text.frames();
    let facts: Vec<_> = frames.iter().map(|f| frame_facts(f, "watched")).collect();
    assert!(facts.iter().all(|(s, _, _)| s == "running"), "{facts:?}");
    let keys: Vec<i64> = facts.iter().map(|f| f.1).collect();
    assert!(
        keys.windows(2).all(|k| k[0] <= k[1]) && keys.first() < keys.last(),
        "keys move forward: {keys:?}"
    );
    let rates: Vec<&String> = facts.iter().filter_map(|f| f.2.as_ref()).collect();
    assert!(
        rates
            .iter()
            .any(|l| !l.starts_with("rate 0 ") && !l.contains("ETA unknown")),
        "a rate and an ETA while it runs: {rates:?}"
    );
    assert!(
        rates.windows(2).any(|w| w[0] != w[1]),
        "rate/remaining/ETA change between redraws: {rates:?}"
    );
    json.wait_for("three JSON redraws", |w| w.docs().len() >= 3)
        .await;
    let docs = json.docs();
    let last = &docs.last().unwrap()["jobs"][0];
    assert_eq!(last["status"], "running", "{last}");
    assert!(
        last["rate_rows_per_second"]
            .as_f64()
            .is_some_and(|r| r > 0.0),
        "{last}"
    );
    assert!(
        last["eta_seconds"].as_f64().is_some_and(|s| s > 0.0),
        "{last}"
    );
    let k0 = docs[0]["jobs"][0]["keys_done"].as_i64().unwrap();
    let k1 = last["keys_done"].as_i64().unwrap();
    assert!(k0 < k1, "keys move in the JSON redraws: {k0} -> {k1}");

    // Paused: the redraws say so, and nothing moves.
    set_paused(&spec, true);
    wait_paused_logged(&mut r, "w0").await;
    let seen = text.frames().len();
    text.wait_for("two redraws of the paused job", |w| {
        w.frames()
            .iter()
            .skip(seen)
            .filter(|f| f.contains("PAUSED (backfill unpause)"))
            .count()
            >= 2
    })
    .await;
    let frames = text.frames();
    let paused: Vec<_> = frames[seen..]
        .iter()
        .filter(|f| f.contains("PAUSED"))
        .map(|f| frame_facts(f, "watched"))
        .collect();
    assert!(paused.iter().all(|(s, _, _)| s == "paused"), "{paused:?}");
    assert!(
        paused.windows(2).all(|w| w[0].1 == w[1].1),
        "keys stay while paused: {paused:?}"
    );
    let last_paused = paused.last().unwrap().2.clone().unwrap();
    assert!(
        last_paused.starts_with("rate 0 ") && last_paused.contains("ETA unknown"),
        "{last_paused}"
    );

    // Unpaused, it finishes, and the redraws end with the job done.
    set_paused(&spec, false);
    go_fast(&c).await;
    let (code, out, err) = r.finish(LIMIT).await;
    assert_eq!(code, 0, "{out}\n{err}");
    text.wait_for("the job done", |w| {
        w.frames()
            .iter()
            .any(|f| frame_facts(f, "watched").0 == "done")
    })
    .await;
    json.wait_for("the job done in JSON", |w| {
        w.docs()
            .last()
            .is_some_and(|d| d["jobs"][0]["status"] == "done")
    })
    .await;
    text.stop();
    json.stop();
    assert_each_row_once(&c, "watched", ROWS).await;
    drop(c);
    db.drop_db().await;
}
