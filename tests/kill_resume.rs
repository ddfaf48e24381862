//! kill -9 at random moments, again and again, then resume: every row is done exactly once and
//! after every kill the checkpoint agrees with the data (no batch lost, none applied twice).

mod common;
use common::runner::{run_to_end, spawn, wait_runner_sessions_gone};
use common::store::job_row;
use common::{TestDb, checksum, count};
use std::path::Path;
use std::time::Duration;
use tokio_postgres::Client;

const ROWS: i64 = 20_000;
const KILLS: usize = 6;

/// Kill the runner `KILLS` times at random moments, each time after some progress (the first
/// time possibly before any), checking after each kill that what is committed in the target
/// matches the checkpoint exactly (`committed_rows` counts what the job's batches committed).
/// Each run's output goes to files in `dir`.
async fn kill_repeatedly(c: &Client, dir: &Path, spec: &Path, job: &str, committed_rows: &str) {
    let mut last_batches = 0i64;
    let mut killed_mid_run = 0;
    for round in 0..KILLS {
        let mut r = spawn(dir, &format!("round{round}"), &[], spec);
        if round == 0 {
            // Anywhere in start-up or the first batches, even before the store exists.
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..400))).await;
        } else {
            // Wait for at least one new committed batch, then a random moment more, so kills land
            // inside batches, between them, and in the pause.
            r.wait_until(
                &format!("round {round}: a batch committed after batch {last_batches}"),
                Duration::from_secs(30),
                Duration::from_millis(10),
                async || job_row(c, job).await.map_or(0, |j| j.batches_done) > last_batches,
            )
            .await;
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..250))).await;
        }
        let exited_on_its_own = r.exited();
        assert!(
            !exited_on_its_own,
            "round {round}: runner finished before it could be killed"
        );
        let status = r.kill();
        assert_eq!(
            status.code(),
            None,
            "round {round}: runner was not killed by the signal"
        );
        killed_mid_run += 1;

        wait_runner_sessions_gone(c).await;
        if let Some(j) = job_row(c, job).await {
            let data = count(c, committed_rows).await;
            assert_eq!(
                data, j.keys_done,
                "round {round}: target holds {data} processed rows but the checkpoint says {} keys \
                 ({j:?}): a batch was committed without its checkpoint or the reverse",
                j.keys_done
            );
            assert_eq!(j.rows_done, j.keys_done, "round {round}: {j:?}");
            assert!(
                j.keys_done < ROWS,
                "round {round}: job already finished: {j:?}"
            );
            assert_ne!(j.status, "done", "round {round}: {j:?}");
            assert!(
                j.batches_done >= last_batches,
                "round {round}: checkpoint went back: {j:?}"
            );
            last_batches = j.batches_done;
        }
    }
    assert_eq!(killed_mid_run, KILLS);
    assert!(
        last_batches > 0,
        "no batch was ever committed across {KILLS} runs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_job_survives_repeated_kill_9_exactly_once() {
    let db = TestDb::new("kill_insert").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE src (id bigint PRIMARY KEY, v int);
         INSERT INTO src SELECT g, (g * 7) % 1000 FROM generate_series(1, {ROWS}) g;
         CREATE TABLE dst (id bigint, v int);
         ANALYZE src;"
    ))
    .await
    .unwrap();
    // The sleep keeps each batch's transaction open a while, so many kills land inside one.
    let spec = db.spec(
        "kill_insert.yaml",
        "name: kill-insert
postgres:
  url: $URL
  table: src
  key: id
  statement: INSERT INTO dst SELECT s.id, s.v FROM src s, pg_sleep(0.02) WHERE s.id = ANY($1)
batch: {size: 100, target: 0, pause: 10ms}
",
    );
    kill_repeatedly(
        &c,
        db.dir.path(),
        &spec,
        "kill-insert",
        "SELECT count(*) FROM dst",
    )
    .await;

    let before = job_row(&c, "kill-insert")
        .await
        .expect("job recorded after the kills");
    assert!(
        before.keys_done < ROWS,
        "nothing left for the resume to do: {before:?}"
    );
    let out = run_to_end(&spec, "final run");
    assert!(out.contains("kill-insert: done"), "{out}");

    assert_eq!(
        count(&c, "SELECT count(*) FROM dst").await,
        ROWS,
        "rows lost or doubled"
    );
    assert_eq!(
        count(&c, "SELECT count(DISTINCT id) FROM dst").await,
        ROWS,
        "a batch was applied twice"
    );
    assert_eq!(
        checksum(&c, "dst").await,
        checksum(&c, "src").await,
        "dst is not a copy of src"
    );
    let j = job_row(&c, "kill-insert").await.unwrap();
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.keys_done, ROWS, "{j:?}");
    assert_eq!(j.rows_done, ROWS, "{j:?}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM backfill.skipped_keys").await,
        0,
        "no other transaction locked rows, so nothing should wait for a retry"
    );
    // Done means done: another run skips it and changes nothing.
    let out = run_to_end(&spec, "final run");
    assert!(out.contains("0 run, 1 skipped"), "{out}");
    assert_eq!(count(&c, "SELECT count(*) FROM dst").await, ROWS);

    drop(c);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_job_without_row_locks_survives_repeated_kill_9_exactly_once() {
    let db = TestDb::new("kill_update").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT g * 3 FROM generate_series(1, {ROWS}) g;
         ANALYZE t;"
    ))
    .await
    .unwrap();
    let spec = db.spec(
        "kill_update.yaml",
        "name: kill-update
postgres:
  url: $URL
  table: t
  key: id
  lock: none
  statement: UPDATE t SET n = n + 1 FROM pg_sleep(0.02) s WHERE t.id = ANY($1)
batch: {size: 100, target: 0, pause: 10ms}
",
    );
    kill_repeatedly(
        &c,
        db.dir.path(),
        &spec,
        "kill-update",
        "SELECT count(*) FROM t WHERE n > 0",
    )
    .await;
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n > 1").await,
        0,
        "a row was updated twice across the kills"
    );

    let before = job_row(&c, "kill-update")
        .await
        .expect("job recorded after the kills");
    assert!(
        before.keys_done < ROWS,
        "nothing left for the resume to do: {before:?}"
    );
    let out = run_to_end(&spec, "final run");
    assert!(out.contains("kill-update: done"), "{out}");

    assert_eq!(count(&c, "SELECT count(*) FROM t").await, ROWS);
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n = 0").await,
        0,
        "rows never updated"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n > 1").await,
        0,
        "rows updated twice"
    );
    assert_eq!(count(&c, "SELECT sum(n)::bigint FROM t").await, ROWS);
    let j = job_row(&c, "kill-update").await.unwrap();
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.keys_done, ROWS, "{j:?}");
    assert_eq!(j.rows_done, ROWS, "{j:?}");

    drop(c);
    db.drop_db().await;
}
