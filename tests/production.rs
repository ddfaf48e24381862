//! Behaviour under production conditions: throttling, preflight refusals, adaptive batch size,
//! and surviving a statement timeout by halving the batch.

mod common;
use common::runner::{spawn, wait_until};
use common::store::job_row;
use common::{TestDb, backfill, count, run};
use std::time::Duration;

/// keys_done of the job (0 before the store or its record exists).
async fn keys_done(c: &tokio_postgres::Client) -> i64 {
    job_row(c, "throttled").await.map_or(0, |j| j.keys_done)
}

/// The throttled job: `t` of `rows` rows, each batch adds 1 to `n`; `throttle.query` reads
/// `control.paused` every 100ms. Returns the spec.
async fn throttled_job(
    db: &TestDb,
    c: &tokio_postgres::Client,
    rows: i64,
    batch: &str,
) -> std::path::PathBuf {
    c.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT generate_series(1, {rows});
         CREATE TABLE control (paused bool NOT NULL);
         INSERT INTO control VALUES (false);"
    ))
    .await
    .unwrap();
    db.spec(
        "throttled.yaml",
        &format!(
            "postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1)
batch: {batch}
throttle:
  query: SELECT paused FROM control
  interval: 100ms
"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_throttle_query_pauses_and_resumes() {
    let db = TestDb::new("throttle").await;
    let c = db.client().await;
    let spec = throttled_job(&db, &c, 6000, "{size: 100, target: 0, pause: 30ms}").await;
    let child = spawn(db.dir.path(), "run", &[], &spec);
    wait_until(
        "the first batches",
        Duration::from_secs(30),
        Duration::from_millis(50),
        async || keys_done(&c).await >= 300,
    )
    .await;
    c.batch_execute("UPDATE control SET paused = true")
        .await
        .unwrap();
    // The gate refreshes every 100ms; after that, at most the batch in flight commits.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let paused_at = keys_done(&c).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        keys_done(&c).await,
        paused_at,
        "batches ran while the throttle query said pause"
    );
    assert!(
        paused_at < 6000,
        "the job finished before it could be paused"
    );
    // Another process sees why the job waits, in text and JSON.
    let (code, out, err) = run(&[&"status", &spec]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("throttled: throttle.query returned true"),
        "status says why the job waits: {out}"
    );
    let (_, json, _) = run(&[&"status", &"--json", &spec]);
    let json: serde_json::Value = serde_json::from_str(&json).expect("status --json");
    assert_eq!(
        json["jobs"][0]["throttled"], "throttle.query returned true",
        "{json}"
    );
    c.batch_execute("UPDATE control SET paused = false")
        .await
        .unwrap();
    let (code, stdout, stderr) = child.finish(Duration::from_secs(120)).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("throttled "),
        "report says time throttled: {stdout}"
    );
    assert!(stderr.contains("throttle.query returned true"), "{stderr}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, 6000);
    let (_, out, _) = run(&[&"status", &spec]);
    assert!(
        !out.contains("throttled:"),
        "a finished job is not throttled: {out}"
    );
    db.drop_db().await;
}

/// A throttle check stuck behind a lock (a migration holding its table) is no answer: the job
/// waits until the check answers again. Before, the probe waited on the lock with no timeout,
/// the gate kept its last answer ("go on"), and the job ran through the very moment the
/// throttle was there for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_check_stuck_behind_a_lock_holds_the_job() {
    let db = TestDb::new("throttle_stuck").await;
    let c = db.client().await;
    let spec = throttled_job(&db, &c, 6000, "{size: 100, target: 0, pause: 30ms}").await;
    let child = spawn(db.dir.path(), "run", &[], &spec);
    wait_until(
        "the first batches",
        Duration::from_secs(30),
        Duration::from_millis(50),
        async || keys_done(&c).await >= 300,
    )
    .await;
    // The "migration": the throttle's table locked for a while.
    let mut m = db.client().await;
    let tx = m.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE control IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    // The probe's lock_timeout (1s) or the gate's patience (2s) closes the gate; then at most
    // the batch in flight commits.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let held_at = keys_done(&c).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        keys_done(&c).await,
        held_at,
        "batches ran while the throttle check could not answer"
    );
    assert!(held_at < 6000, "the job finished before the lock was taken");
    tx.rollback().await.unwrap();
    let (code, stdout, stderr) = child.finish(Duration::from_secs(120)).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stderr.contains("throttle"), "{stderr}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, 6000);
    drop(m);
    db.drop_db().await;
}

/// The same at start-up: a first check that cannot answer (its lock_timeout) starts the job
/// held, not failed; it runs once the check answers. A broken query still fails the start
/// (next test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_check_that_cannot_answer_at_start_holds_the_job_until_it_can() {
    let db = TestDb::new("throttle_start").await;
    let c = db.client().await;
    let spec = throttled_job(&db, &c, 2000, "{size: 100, target: 0}").await;
    let mut m = db.client().await;
    let tx = m.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE control IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let child = spawn(db.dir.path(), "run", &[], &spec);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n > 0").await,
        0,
        "batches ran while the throttle check could not answer"
    );
    tx.rollback().await.unwrap();
    let (code, stdout, stderr) = child.finish(Duration::from_secs(120)).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, 2000);
    drop(m);
    db.drop_db().await;
}

/// A throttle query that cannot answer as one boolean fails the job before any write. The
/// probe only looks: a query that writes fails too (its session is read-only), and has written
/// nothing itself.
#[tokio::test]
async fn broken_throttle_query_fails_before_any_write() {
    let db = TestDb::new("throttlebad").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0); INSERT INTO t (id) VALUES (1);
         CREATE TABLE probes (at timestamptz)",
    )
    .await
    .unwrap();
    for (file, query, says) in [
        ("bad.yaml", "SELECT 'yes'", "throttle.query"),
        (
            "writes.yaml",
            "WITH w AS (INSERT INTO probes VALUES (now()) RETURNING 1) SELECT count(*) > 1 FROM w",
            "read-only",
        ),
    ] {
        let spec = db.spec(
            file,
            &format!(
                "postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1)
throttle:
  query: {query}
"
            ),
        );
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 1, "{file}: {out}{err}");
        assert!(
            err.contains("throttle.query") && err.contains(says),
            "{file}: {err}"
        );
        assert_eq!(count(&c, "SELECT count(*) FROM probes").await, 0);
        assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, 0);
    }
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_exclusive_holder_blocks_start_and_is_named() {
    let db = TestDb::new("preflight").await;
    let c = db.client().await;
    common::make_int_table(&c, 100).await;
    let spec = db.spec(
        "job.yaml",
        "postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1)
",
    );
    let holder = db.client().await;
    let pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    holder
        .batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 75, "{out}{err}");
    assert!(
        err.contains(&format!("pid {pid} holds an AccessExclusiveLock")),
        "{err}"
    );
    assert!(
        err.contains("LOCK TABLE t IN ACCESS EXCLUSIVE MODE"),
        "query shown: {err}"
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'backfill'"
        )
        .await,
        0,
        "nothing written"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, 100);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_transaction_blocks_start_unless_ignored() {
    let db = TestDb::new("oldxact").await;
    let c = db.client().await;
    common::make_int_table(&c, 100).await;
    let spec = db.spec(
        "job.yaml",
        "postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1)
limits: {max_transaction_age: 1s}
",
    );
    let old = db.client().await;
    let pid: i32 = old
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    old.batch_execute("BEGIN; SELECT txid_current()")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 75, "{out}{err}");
    assert!(
        err.contains(&format!("pid {pid} has had a transaction open")),
        "{err}"
    );
    let (code, out, err) = run(&[&"run", &"--ignore-preflight", &spec]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, 100);
    old.batch_execute("COMMIT").await.unwrap();
    db.drop_db().await;
}

/// Batch sizes from the debug log lines `batch done ... size=N ... keys=K`.
fn sizes(stderr: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter(|l| l.contains("batch done"))
        .filter_map(|l| {
            let keys = l
                .split("keys=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()?;
            let size = l
                .split("size=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()?;
            (keys > 0).then_some(size)
        })
        .collect()
}

#[tokio::test]
async fn adaptive_size_grows_when_cheap_and_shrinks_when_costly() {
    let db = TestDb::new("adaptive").await;
    let c = db.client().await;
    // Rows up to 6000 cost nothing; rows above cost 2ms each.
    common::make_int_table(&c, 8500).await;
    let spec = db.spec(
        "adaptive.yaml",
        "postgres:
  url: $URL
  table: t
  key: id
  statement: |
    UPDATE t SET n = n + 1
      FROM (SELECT pg_sleep(0.002 * count(*)) FROM unnest($1::int[]) k WHERE k > 6000) cost
     WHERE id = ANY($1)
batch: {size: 200, target: 100ms, min: 10, max: 1000}
",
    );
    let out = backfill()
        .arg("run")
        .arg(&spec)
        .env("BACKFILL_LOG", "debug")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let s = sizes(&stderr);
    assert!(s.len() > 5, "batch sizes: {s:?}");
    assert_eq!(
        *s.iter().max().unwrap(),
        1000,
        "cheap rows grow the size to max: {s:?}"
    );
    let last = *s.last().unwrap();
    assert!(
        last <= 100,
        "costly rows shrink the size toward ~50 (100ms / 2ms): {s:?}"
    );
    for w in s.windows(2) {
        assert!(
            w[1] * 2 >= w[0] && w[1] * 2 <= w[0] * 3,
            "steps bounded to x0.5..x1.5: {s:?}"
        );
    }
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, 8500);
    db.drop_db().await;
}

#[tokio::test]
async fn statement_timeout_halves_the_batch() {
    let db = TestDb::new("halving").await;
    let c = db.client().await;
    common::make_int_table(&c, 1200).await;
    // 1ms per key: a batch of 800 takes 0.8s, over the 300ms statement_timeout; 200 fits.
    let spec = db.spec(
        "halving.yaml",
        "postgres:
  url: $URL
  table: t
  key: id
  statement: |
    UPDATE t SET n = n + 1
      FROM (SELECT pg_sleep(0.001 * cardinality($1::int[]))) cost
     WHERE id = ANY($1)
batch: {size: 800, target: 0, min: 50}
limits: {statement_timeout: 300ms}
",
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("statement_timeout; retrying at half the size"),
        "{err}"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n = 1").await,
        1200,
        "each row once"
    );
    db.drop_db().await;
}

/// A statement too slow even for `batch.min` keys: halved down to it, the run fails (1) with
/// what to change, not Postgres's bare "canceling statement due to statement timeout".
#[tokio::test]
async fn statement_timeout_at_the_smallest_batch_says_what_to_change() {
    let db = TestDb::new("halvedout").await;
    let c = db.client().await;
    common::make_int_table(&c, 500).await;
    let spec = db.spec(
        "slow.yaml",
        "postgres:
  url: $URL
  table: t
  key: id
  statement: |
    UPDATE t SET n = n + 1 FROM (SELECT pg_sleep(1)) cost WHERE id = ANY($1)
batch: {size: 200, target: 0, min: 50}
limits: {statement_timeout: 200ms}
",
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("even at the smallest batch size (50 keys, batch.min)")
            && err.contains("raise limits.statement_timeout"),
        "{err}"
    );
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n > 0").await, 0);
    db.drop_db().await;
}

/// Once a run has updated `n` rows of `t` (`n = 1`), take an ACCESS EXCLUSIVE lock on `table`
/// in a transaction of a session of its own, as a migration would: the session is returned
/// holding it (`ROLLBACK` lets go).
async fn lock_once_under_way(
    db: &TestDb,
    c: &tokio_postgres::Client,
    n: i64,
    table: &str,
) -> tokio_postgres::Client {
    wait_until(
        "the first batches",
        Duration::from_secs(30),
        Duration::from_millis(20),
        async || count(c, "SELECT count(*) FROM t WHERE n = 1").await >= n,
    )
    .await;
    let m = db.client().await;
    m.batch_execute(&format!(
        "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
    ))
    .await
    .unwrap();
    m
}

/// A migration that takes ACCESS EXCLUSIVE on the table mid-run and keeps it: the batches hit
/// lock_timeout and the run stops with 75 while the lock is still held. The progress refresh
/// (an EXPLAIN of the table, every 30 s) once ran on a session with no lock_timeout, queued
/// behind the lock, and held the loop that collects the workers' results: the run hung, its
/// worker slot taken, and SIGTERM did not stop it, for as long as the migration held its lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_taken_mid_run_and_kept_stops_the_run_while_it_is_held() {
    let db = TestDb::new("midlock").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT generate_series(1, 100000); ANALYZE t;",
    )
    .await
    .unwrap();
    // Slow batches: the run is still going when the refresh comes, 30 s in.
    let spec = db.spec(
        "job.yaml",
        "name: midlock
postgres:
  url: $URL
  table: t
  key: id
  where: n = 0
  statement: UPDATE t SET n = n + 1 FROM (SELECT pg_sleep(0.05)) s WHERE id = ANY($1)
batch: {size: 100, target: 0}
limits: {lock_timeout: 1s}
",
    );
    let child = spawn(db.dir.path(), "run", &[], &spec);
    let m = lock_once_under_way(&db, &c, 300, "t").await;
    let locked = std::time::Instant::now();
    let (code, out, err) = child.finish(Duration::from_secs(120)).await;
    eprintln!(
        "the run stopped {:?} after the lock was taken",
        locked.elapsed()
    );
    assert_eq!(
        code, 75,
        "a run behind a lock it cannot get stops:\n{out}\n{err}"
    );
    m.batch_execute("ROLLBACK").await.unwrap();
    let left = count(&c, "SELECT count(*) FROM t WHERE n = 0").await;
    assert!(left > 0, "the run was meant to stop before its end");
    // Resumed without the sleep (the same job, its statement edited).
    let fast = db.spec(
        "job.yaml",
        "name: midlock
postgres:
  url: $URL
  table: t
  key: id
  where: n = 0
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1)
",
    );
    let (code, out, err) = run(&[&"run", &fast]);
    assert_eq!(code, 0, "resumed once the lock is gone:\n{out}\n{err}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n = 1").await,
        100000
    );
    drop(m);
    db.drop_db().await;
}

/// A lock held elsewhere past lock_timeout outside the batches is a reason to run again later,
/// not a failure: the final verify behind a migration's lock stops the run with 75 and the job
/// recorded `stopped`, and `verify` alone exits 75 (not 1, which means "not done"). Both once
/// exited 1, and the run recorded the job `failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_outside_the_batches_stops_with_75_not_a_failure() {
    let db = TestDb::new("verifylock").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT generate_series(1, 500);
         CREATE TABLE audit (id int);",
    )
    .await
    .unwrap();
    let spec = db.spec(
        "job.yaml",
        "name: verifylock
postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1)
  verify: SELECT (SELECT count(*) FROM t WHERE n = 0) + (SELECT count(*) FROM audit)
batch: {size: 10, target: 0, pause: 50ms}
limits: {lock_timeout: 500ms}
",
    );
    // The migration takes its lock once the walk is under way; the verify at the end meets it.
    let child = spawn(db.dir.path(), "run", &[], &spec);
    let m = lock_once_under_way(&db, &c, 50, "audit").await;
    let (code, out, err) = child.finish(Duration::from_secs(60)).await;
    assert_eq!(code, 75, "{out}\n{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, 500);
    let j = job_row(&c, "verifylock").await.expect("job recorded");
    assert_eq!(j.status, "stopped", "{j:?}");
    let (code, out, err) = run(&[&"verify", &spec]);
    assert_eq!(code, 75, "{out}\n{err}");
    m.batch_execute("ROLLBACK").await.unwrap();
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = run(&[&"verify", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    drop(m);
    db.drop_db().await;
}

/// `plan` on a busy table: a row of the first sample batch held by the application. The
/// sample once waited for it and failed the plan on lock_timeout (exit 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_samples_pass_over_rows_the_application_holds() {
    let db = TestDb::new("planbusy").await;
    let c = db.client().await;
    common::make_int_table(&c, 500).await;
    let spec = db.spec(
        "job.yaml",
        "name: planbusy
postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1)
batch: {size: 100, target: 0}
limits: {lock_timeout: 300ms}
",
    );
    let mut m = db.client().await;
    let tx = m.transaction().await.unwrap();
    tx.batch_execute("SELECT 1 FROM t WHERE id = 3 FOR UPDATE")
        .await
        .unwrap();
    let (code, out, err) = run(&[&"plan", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("rolled back"), "the samples ran: {out}");
    tx.rollback().await.unwrap();
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n > 0").await, 0);
    drop(m);
    db.drop_db().await;
}
