//! The last rows of the table are locked by another transaction when the walk reaches them:
//! nothing can be locked, yet they must be recorded and retried, not walked past and lost.

mod common;
use common::runner::wait_until;
use common::{TestDb, backfill, count};
use std::process::Stdio;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_tail_rows_are_recorded_and_retried() {
    let db = TestDb::new("skiptail").await;
    let c = db.client().await;
    common::make_int_table(&c, 10).await;
    let spec = db.spec(
        "tail.yaml",
        "postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1)
batch: {size: 4, target: 0}
limits: {lock_timeout: 2s}
",
    );
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; SELECT * FROM t WHERE id IN (9, 10) FOR UPDATE")
        .await
        .unwrap();
    let child = backfill()
        .arg("run")
        .arg(&spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the walk is over and both tail rows wait for their retry.
    wait_until(
        "the tail rows to be recorded as skipped",
        Duration::from_secs(30),
        Duration::from_millis(20),
        async || {
            c.query_opt("SELECT count(*) FROM backfill.skipped_keys", &[])
                .await
                .ok()
                .flatten()
                .map_or(0, |r| r.get::<_, i64>(0))
                == 2
        },
    )
    .await;
    holder.batch_execute("COMMIT").await.unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2 rows retried"), "{stdout}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n = 1").await,
        10,
        "every row exactly once"
    );
    db.drop_db().await;
}
