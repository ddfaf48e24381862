//! Every connection of a run killed by the server mid-run (pg_terminate_backend), the worker's
//! own included (it holds the worker's slot and range locks): the worker reconnects, takes its
//! slot and its range again, resumes from the committed checkpoint, and every row is done
//! exactly once.

mod common;
use common::{TestDb, backfill, count};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_batch_connection_is_replaced_without_double_apply() {
    let db = TestDb::new("reconnect").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE src (id bigint PRIMARY KEY, v int);
         INSERT INTO src SELECT i, i % 7 FROM generate_series(1, 12000) i;
         CREATE TABLE dst (id bigint, v int);",
    )
    .await
    .unwrap();
    let spec = db.spec(
        "copy.yaml",
        "name: copy
postgres:
  url: $URL
  table: src
  key: id
  statement: INSERT INTO dst SELECT id, v FROM src WHERE id = ANY($1)
batch: {size: 200, target: 0, pause: 30ms}
",
    );
    let mut child = backfill().arg("run").arg(&spec).spawn().unwrap();
    // Every session of the run: the worker's (with its advisory locks) and the pooled ones.
    let batch_backend = "SELECT pid FROM pg_stat_activity
         WHERE application_name = 'backfill:copy' AND datname = current_database()";
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while kills < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if child.try_wait().unwrap().is_some() {
            break;
        }
        let done = count(&c, "SELECT count(*) FROM dst").await;
        if done < 2000 * (kills + 1) {
            continue;
        }
        let killed = c
            .query(
                &format!("SELECT pg_terminate_backend(pid) FROM ({batch_backend}) b"),
                &[],
            )
            .await
            .unwrap();
        if !killed.is_empty() {
            kills += 1;
        }
    }
    let status = child.wait().unwrap();
    assert_eq!(
        kills, 3,
        "the run ended before its connection could be killed 3 times"
    );
    assert_eq!(status.code(), Some(0));
    assert_eq!(count(&c, "SELECT count(*) FROM dst").await, 12000);
    assert_eq!(count(&c, "SELECT count(DISTINCT id) FROM dst").await, 12000);
    assert_eq!(
        count(
            &c,
            &format!(
                "SELECT keys_done FROM {} WHERE job = 'copy' AND status = 'done'",
                common::store::JOB_VIEW
            )
        )
        .await,
        12000
    );
    db.drop_db().await;
}
