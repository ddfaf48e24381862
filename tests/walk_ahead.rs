//! With `batch.walk_ahead`, a worker walks the next batch (locks its keys) on its second
//! connection while the current batch's statement runs. That batch must never outlive the one
//! before it: when a batch fails, the batch walked ahead rolls back with it; while the job is
//! paused no row stays locked; and killing either of a worker's connections at any moment loses
//! and doubles nothing.
//!
//! Every job inserts into a table without a unique constraint: a batch applied twice shows up
//! as duplicate rows, a lost one as a missing row.

mod common;
use common::runner::spawn;
use common::store::copy_done_exactly_once;
use common::{TestDb, backfill, count, run};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

async fn tables(c: &Client, rows: i64) {
    c.batch_execute(&format!(
        "CREATE TABLE src (id bigint PRIMARY KEY, v int);
         INSERT INTO src SELECT g, g % 97 FROM generate_series(1, {rows}) g;
         CREATE TABLE dst (id bigint, v int);
         CREATE TABLE knob (fail_at bigint);
         INSERT INTO knob VALUES (NULL);
         ANALYZE src;"
    ))
    .await
    .unwrap();
}

/// The copy job. Its statement divides by zero on the key `knob.fail_at` names.
fn spec(db: &TestDb, batch: &str) -> std::path::PathBuf {
    db.spec(
        "copy.yaml",
        &format!(
            "name: copy
postgres:
  url: $URL
  table: src
  key: id
  statement: |
    INSERT INTO dst
    SELECT id, v / (CASE WHEN id = (SELECT fail_at FROM knob) THEN 0 ELSE 1 END)
      FROM src WHERE id = ANY($1)
batch: {batch}
"
        ),
    )
}

/// Rows of `src` another session cannot lock right now.
async fn locked_rows(c: &Client) -> i64 {
    count(
        c,
        "SELECT (SELECT count(*) FROM src)
              - (SELECT count(*) FROM (SELECT id FROM src FOR UPDATE SKIP LOCKED) s)",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_batch_takes_the_batch_walked_ahead_down_with_it() {
    let db = TestDb::new("ahead_fail").await;
    let c = db.client().await;
    tables(&c, 10_000).await;
    c.execute("UPDATE knob SET fail_at = 4321", &[])
        .await
        .unwrap();
    // One range (one worker), fixed batches of 500: batches 1-8 end at 4000, batch 9
    // (4001-4500) fails, and batch 10 (4501-5000) was locked ahead while batch 9 ran.
    let spec = spec(&db, "{size: 500, target: 0, walk_ahead: true}");
    let (code, _out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 1, "a statement that fails is not retried:\n{err}");
    assert!(err.contains("division by zero"), "{err}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM dst WHERE id > 4000").await,
        0,
        "a batch after the failed one was applied"
    );
    assert_eq!(
        count(&c, "SELECT count(DISTINCT id) FROM dst WHERE id <= 4000").await,
        4000
    );
    assert_eq!(count(&c, "SELECT count(*) FROM dst").await, 4000);
    let cursor: Option<String> = c
        .query_one("SELECT cursor FROM backfill.ranges WHERE job = 'copy'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(cursor.as_deref(), Some("4000"));
    assert_eq!(locked_rows(&c).await, 0);

    // Fixed, the job resumes at its checkpoint.
    c.execute("UPDATE knob SET fail_at = NULL", &[])
        .await
        .unwrap();
    let (code, _out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{err}");
    copy_done_exactly_once(&c, 10_000).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_job_holds_no_row_locks_and_goes_on_after_unpause() {
    let db = TestDb::new("ahead_pause").await;
    let c = db.client().await;
    let rows = 300_000;
    tables(&c, rows).await;
    let spec = spec(&db, "{size: 2000, target: 0, walk_ahead: true}");
    let mut r = spawn(db.dir.path(), "run", &[], &spec);
    r.wait_until(
        "the first batches",
        Duration::from_secs(60),
        Duration::from_millis(20),
        async || count(&c, "SELECT count(*) FROM dst").await >= 10_000,
    )
    .await;
    let (code, _o, err) = run(&[&"pause", &spec]);
    assert_eq!(code, 0, "{err}");
    // The workers stop after their open batch; the batch they had walked ahead rolls back.
    r.wait_until(
        "the paused run to hold no row locks",
        Duration::from_secs(30),
        Duration::from_millis(50),
        async || {
            let before = count(&c, "SELECT count(*) FROM dst").await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let after = count(&c, "SELECT count(*) FROM dst").await;
            before == after && locked_rows(&c).await == 0
        },
    )
    .await;
    let done = count(&c, "SELECT count(*) FROM dst").await;
    assert!(done < rows, "the job finished before the pause took hold");
    // It stays that way: no batch runs, no lock is taken.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(count(&c, "SELECT count(*) FROM dst").await, done);
    assert_eq!(locked_rows(&c).await, 0);

    let (code, _o, err) = run(&[&"unpause", &spec]);
    assert_eq!(code, 0, "{err}");
    let (code, _out, err) = r.finish(Duration::from_secs(120)).await;
    assert_eq!(code, 0, "{err}");
    copy_done_exactly_once(&c, rows).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn either_connection_of_a_worker_killed_again_and_again_loses_and_doubles_nothing() {
    let db = TestDb::new("ahead_kill").await;
    let c = db.client().await;
    // Ten kills, one per 8000 rows: 240k rows leave room for them however fast the run goes
    // (with 120k a run of 3 s on CI ended after nine).
    let rows = 240_000;
    tables(&c, rows).await;
    let spec = spec(&db, "{size: 400, target: 0, walk_ahead: true}");
    let mut child = backfill().arg("run").arg(&spec).spawn().unwrap();
    // One of the run's sessions at a time, picked by a rotating index: the worker's own (its
    // locks), the one it walks ahead on, or a pooled one.
    let sessions = "SELECT pid FROM pg_stat_activity
         WHERE application_name = 'backfill:copy' AND datname = current_database()
         ORDER BY pid";
    let (mut kills, mut pick) = (0i64, 0usize);
    let mut seen_two = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    while kills < 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(97)).await;
        if child.try_wait().unwrap().is_some() {
            break;
        }
        let done = count(&c, "SELECT count(*) FROM dst").await;
        if done < 8_000 * (kills + 1) {
            continue;
        }
        let pids: Vec<i32> = c
            .query(sessions, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        if pids.is_empty() {
            continue;
        }
        seen_two |= pids.len() >= 2;
        pick += 1;
        let pid = pids[pick % pids.len()];
        c.execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap();
        kills += 1;
    }
    let status = child.wait().unwrap();
    assert_eq!(kills, 10, "the run ended before 10 kills");
    assert!(seen_two, "the worker never had a second connection");
    assert_eq!(status.code(), Some(0));
    copy_done_exactly_once(&c, rows).await;
    db.drop_db().await;
}

/// A statement that locks a row of the next batch (here the foreign-key check of
/// `next_id = id + 1` takes a KEY SHARE lock on the first row past its batch) waits for the
/// batch walked ahead, which waits for it; Postgres cannot see that deadlock, since one side
/// waits on the client. Only lock_timeout ends it: then the worker stops walking ahead for the
/// run and goes on. Before, every batch paid a lock_timeout and the job crawled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_that_waits_for_the_batch_ahead_turns_walking_ahead_off() {
    let db = TestDb::new("ahead_fk").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, next_id int REFERENCES t (id));
         INSERT INTO t (id) SELECT generate_series(1, 3001);",
    )
    .await
    .unwrap();
    let spec = db.spec(
        "fk.yaml",
        "name: fk
postgres:
  url: $URL
  table: t
  key: id
  where: id <= 3000
  statement: UPDATE t SET next_id = id + 1 WHERE id = ANY($1)
batch: {size: 100, target: 0, walk_ahead: true}
limits:
  lock_timeout: 1s
  max_runtime: 90s
",
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("walking ahead is off"), "{err}");
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM t WHERE id <= 3000 AND next_id = id + 1"
        )
        .await,
        3000
    );
    db.drop_db().await;
}
