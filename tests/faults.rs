//! The first promise under ordinary faults, on a private Postgres cluster of the test's own
//! (restarted, its sessions terminated, `idle_session_timeout` set; the machine's Postgres is
//! never touched): every row is done exactly once, no run exits 1 for a connection it could
//! open again, and a second runner never doubles the first one's work.
//!
//! The job inserts into a table without a unique constraint: a batch applied twice, or a range
//! walked by two runners, shows up as duplicate rows.

mod common;
use common::TestDb;
use common::cluster::{ClusterOpts, PgCluster};
use common::runner::{Running, spawn};
use common::store::job_row;
use std::time::Duration;
use tokio_postgres::Client;

const ROWS: i64 = 12_000;

async fn tables(c: &Client) {
    c.batch_execute(&format!(
        "CREATE TABLE src (id bigint PRIMARY KEY, v int);
         INSERT INTO src SELECT g, g % 97 FROM generate_series(1, {ROWS}) g;
         CREATE TABLE dst (id bigint, v int);
         ANALYZE src;"
    ))
    .await
    .unwrap();
}

fn spec(db: &TestDb, url: &str, batch: &str) -> std::path::PathBuf {
    db.spec(
        "copy.yaml",
        &format!(
            "name: copy
postgres:
  url: '{url}'
  table: src
  key: id
  statement: INSERT INTO dst SELECT id, v FROM src WHERE id = ANY($1)
batch: {batch}
"
        ),
    )
}

/// A fresh connection for every check: the cluster restarts and kills sessions under us.
async fn count(db: &TestDb, sql: &str) -> i64 {
    let c = common::connect(&db.url).await;
    common::count(&c, sql).await
}

async fn copied(db: &TestDb) -> i64 {
    count(db, "SELECT count(*) FROM dst").await
}

/// Every source row exactly once in `dst`, and the job done with every key counted once.
async fn exactly_once(db: &TestDb) {
    assert_eq!(copied(db).await, ROWS, "rows lost or doubled");
    assert_eq!(
        count(db, "SELECT count(DISTINCT id) FROM dst").await,
        ROWS,
        "rows doubled"
    );
    let c = common::connect(&db.url).await;
    let j = job_row(&c, "copy").await.expect("job recorded");
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.keys_done, ROWS, "{j:?}");
}

/// Wait until at least `n` rows were copied (the runner must still be running).
async fn wait_copied(db: &TestDb, r: &mut Running, n: i64) {
    let url = db.url.clone();
    r.wait_until(
        &format!("{n} rows copied"),
        Duration::from_secs(60),
        Duration::from_millis(20),
        async || {
            let c = common::connect(&url).await;
            common::count(&c, "SELECT count(*) FROM dst").await >= n
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restarts_mid_run_and_every_row_is_done_once() {
    let pg = PgCluster::start_default().await;
    let db = pg.create_db("f_restart").await;
    tables(&db.client().await).await;
    let spec = spec(&db, &db.url, "{size: 200, target: 0, pause: 20ms}");
    let mut r = spawn(db.dir.path(), "run", &[], &spec);
    for round in 1..=3 {
        wait_copied(&db, &mut r, 2500 * round).await;
        pg.restart().await;
    }
    let (code, out, err) = r.finish(Duration::from_secs(120)).await;
    assert_eq!(
        code, 0,
        "a run that could reconnect must not fail:\n{out}\n{err}"
    );
    assert!(err.contains("retrying"), "{err}");
    exactly_once(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_terminated_again_and_again_and_a_second_runner_never_doubles() {
    let pg = PgCluster::start_default().await;
    let db = pg.create_db("f_term").await;
    tables(&db.client().await).await;
    let spec = spec(&db, &db.url, "{size: 100, target: 0, pause: 10ms}");
    let mut runners = vec![spawn(db.dir.path(), "first", &[], &spec)];
    'rounds: for round in 1..=4 {
        // Progress by whoever holds the job now: after a termination the slot may go to the
        // runner started last, and the one that lost it stops (75) without writing more.
        let want = 1500 * round;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if count(&db, "SELECT count(*) FROM dst").await >= want {
                break;
            }
            if runners.iter_mut().all(|r| r.exited()) {
                break 'rounds;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: {want} rows not copied within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Every session of the job, the worker's (holding its slot and range) included...
        let killed = pg.terminate("backfill:copy").await;
        assert!(
            killed > 0,
            "round {round}: no session of the job to terminate"
        );
        // ...and right away another runner, while the holder's locks are gone.
        runners.push(spawn(db.dir.path(), &format!("second{round}"), &[], &spec));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut codes = Vec::new();
    for r in runners {
        codes.push(r.finish(Duration::from_secs(120)).await);
    }
    for (code, out, err) in &codes {
        assert!(
            *code == 0 || *code == 75,
            "exit {code}: only done (0) or refused/stopped (75) are acceptable\n{out}\n{err}"
        );
    }
    // Whoever was left holding the job finished it, or one more run does.
    let c = common::connect(&db.url).await;
    if job_row(&c, "copy").await.is_none_or(|j| j.status != "done") {
        let out = common::runner::run_to_end(&spec, "final run");
        assert!(out.contains("copy: done"), "{out}");
    }
    exactly_once(&db).await;
    let refused = codes.iter().filter(|(c, _, _)| *c == 75).count();
    assert!(
        refused >= 1,
        "with workers: 1 only one runner may work at a time, yet none was refused: {codes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_session_timeout_closes_every_idle_connection_and_the_run_finishes() {
    let pg = PgCluster::start(ClusterOpts::new()).await;
    let db = pg.create_db("f_idle").await;
    tables(&db.client().await).await;
    // The job's own role gets the timeout, so the test's connections are left alone.
    pg.admin()
        .await
        .batch_execute(&format!(
            "CREATE ROLE bf_app LOGIN; ALTER ROLE bf_app SET idle_session_timeout = '300ms';
             GRANT ALL ON DATABASE {d} TO bf_app;",
            d = db.name
        ))
        .await
        .unwrap();
    db.client()
        .await
        .batch_execute(&format!(
            "GRANT ALL ON SCHEMA public TO bf_app; GRANT ALL ON src, dst TO bf_app;
             GRANT CREATE ON DATABASE {} TO bf_app;",
            db.name
        ))
        .await
        .unwrap();
    let url = db.url.replacen("postgres@", "bf_app@", 1);
    // Every pause between batches is longer than the timeout: every worker session dies idle,
    // and so do the pooled ones the job keeps for its bookkeeping.
    let spec = spec(&db, &url, "{size: 2000, target: 0, pause: 600ms}");
    let r = spawn(db.dir.path(), "run", &[], &spec);
    let (code, out, err) = r.finish(Duration::from_secs(120)).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("copy: done"), "{out}");
    exactly_once(&db).await;
    let c = common::connect(&db.url).await;
    assert_eq!(
        job_row(&c, "copy").await.map(|j| j.status),
        Some("done".into()),
        "the job's status must be recorded even though its connections died"
    );
}
