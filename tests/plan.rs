//! `plan` is a dry run: it writes nothing (not even the checkpoint store), counts what is left,
//! and says where a run would resume.

mod common;
use common::store::has_store;
use common::{TestDb, checksum, count, make_table, run};
use tokio_postgres::Client;

/// The value after `label` on the line of stdout that contains it.
fn line_with<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .find(|l| l.contains(label))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{out}"))
}

/// What the job below could touch: the table, the table it inserts into, schemas. (Not the
/// sequence behind `log.id`: `nextval` is not transactional, so rolled-back samples advance it.)
async fn snapshot(c: &Client) -> String {
    format!(
        "t={} log={} schemas={}",
        checksum(c, "t").await,
        checksum(c, "log").await,
        count(c, "SELECT count(*) FROM pg_namespace").await
    )
}

#[tokio::test]
async fn plan_writes_nothing_and_counts_pending_rows() {
    let db = TestDb::new("plan_nowrite").await;
    let c = db.client().await;
    // 2345 rows, of which the `where` leaves 1955 (every 6th row is already done).
    c.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0, done bool NOT NULL DEFAULT false);
         INSERT INTO t (id, done) SELECT i, i % 6 = 0 FROM generate_series(1, 2345) i;
         CREATE TABLE log (id serial PRIMARY KEY, t_id bigint NOT NULL);
         ANALYZE t;",
    )
    .await
    .unwrap();
    let pending = count(&c, "SELECT count(*) FROM t WHERE NOT done").await;
    assert_eq!(pending, 1955);
    // The statement writes two tables and a sequence: all of it must be rolled back.
    let spec = db.spec(
        "job.yaml",
        "postgres:
  url: $URL
  table: t
  key: id
  where: NOT done
  statement: |
    WITH u AS (UPDATE t SET n = n + 1, done = true WHERE id = ANY($1) RETURNING id)
    INSERT INTO log (t_id) SELECT id FROM u
batch: {size: 100, target: 0}
",
    );
    let before = snapshot(&c).await;

    // Default: planner estimate and 3 sample batches (rolled back).
    let (code, out, err) = run(&[&"plan", &spec]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(line_with(&out, "resume at:").contains("the start"), "{out}");
    assert!(
        line_with(&out, "pending rows:").contains("~"),
        "an estimate is marked: {out}"
    );
    assert!(line_with(&out, "batches:").contains("of 100"), "{out}");
    let sample = line_with(&out, "sample:");
    assert!(
        sample.contains("3 batch(es), 300 keys") && sample.contains("rolled back"),
        "{out}"
    );
    assert_eq!(snapshot(&c).await, before, "plan changed the database");
    assert!(!has_store(&c).await, "plan created the checkpoint store");

    // --exact counts, and the batch count follows from it.
    let (code, out, err) = run(&[&"plan", &"--exact", &spec]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        line_with(&out, "pending rows:").contains(&format!("{pending} (counted)")),
        "{out}"
    );
    let batches = (pending + 99) / 100;
    assert!(
        line_with(&out, "batches:").contains(&format!("batches:      {batches} of 100")),
        "want {batches} batches in:\n{out}"
    );
    assert_eq!(
        snapshot(&c).await,
        before,
        "plan --exact changed the database"
    );
    assert!(!has_store(&c).await);

    // --samples 0 skips the sample batches.
    let (code, out, _) = run(&[&"plan", &"--exact", &"--samples", &"0", &spec]);
    assert_eq!(code, 0);
    assert!(!out.contains("sample:"), "{out}");
    assert_eq!(snapshot(&c).await, before);

    // After a real run, nothing is pending and plan still writes nothing.
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM log").await, pending);
    let after_run = snapshot(&c).await;
    let store_before = checksum(&c, "backfill.jobs").await;
    let (code, out, err) = run(&[&"plan", &"--exact", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    // A finished job: plan says run would skip it, and estimates nothing.
    assert!(
        line_with(&out, "status:").contains("run would skip this job"),
        "{out}"
    );
    assert!(!out.contains("pending rows:"), "{out}");
    assert!(
        line_with(&out, "resume at:").contains("status done"),
        "{out}"
    );
    assert_eq!(snapshot(&c).await, after_run);
    assert_eq!(
        checksum(&c, "backfill.jobs").await,
        store_before,
        "plan changed the checkpoint"
    );
    drop(c);
    db.drop_db().await;
}

#[tokio::test]
async fn plan_says_where_a_failed_run_resumes() {
    let db = TestDb::new("plan_resume").await;
    let c = db.client().await;
    // The statement divides by zero at id 6001 while ctl.fail is set: the run fails there with
    // its checkpoint after 6000; clearing ctl.fail lets the same spec go on.
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT i FROM generate_series(1, 10000) i;
         CREATE TABLE ctl (fail bool NOT NULL);
         INSERT INTO ctl VALUES (true);
         ANALYZE t;",
    )
    .await
    .unwrap();
    let spec = db.spec(
        "job.yaml",
        "postgres:
  url: $URL
  table: t
  key: id
  statement: >-
    UPDATE t SET n = n + 1 / (CASE WHEN id = 6001 AND (SELECT fail FROM ctl) THEN 0 ELSE 1 END)
     WHERE id = ANY($1)
batch: {size: 500, target: 0}
",
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("division by zero"), "{err}");
    let cursor: Option<String> = c
        .query_one(
            &format!(
                "SELECT cursor FROM {} WHERE job = 'job'",
                common::store::JOB_VIEW
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(cursor.as_deref(), Some("6000"));
    c.batch_execute("UPDATE ctl SET fail = false")
        .await
        .unwrap();

    let before = checksum(&c, "t").await;
    let store_before = checksum(&c, "backfill.jobs").await;
    for args in [vec!["plan"], vec!["plan", "--exact"]] {
        let mut argv: Vec<&dyn AsRef<std::ffi::OsStr>> = args
            .iter()
            .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
            .collect();
        argv.push(&spec);
        let (code, out, err) = run(&argv);
        assert_eq!(code, 0, "{args:?}\nstdout:\n{out}\nstderr:\n{err}");
        let resume = line_with(&out, "resume at:");
        assert!(resume.contains("after key 6000"), "{args:?}: {out}");
        assert!(resume.contains("status failed"), "{args:?}: {out}");
        assert!(
            resume.contains("6000 keys and 12 batches done"),
            "{args:?}: {out}"
        );
        assert_eq!(checksum(&c, "t").await, before, "{args:?} changed rows");
        assert_eq!(
            checksum(&c, "backfill.jobs").await,
            store_before,
            "{args:?} changed the checkpoint"
        );
    }
    let (_, out, _) = run(&[&"plan", &"--exact", &spec]);
    assert!(
        line_with(&out, "pending rows:").contains("4000 (counted)"),
        "{out}"
    );
    assert!(
        line_with(&out, "batches:").contains("batches:      8 of 500"),
        "{out}"
    );

    // The run resumes where plan said, and every row ends up updated once.
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n = 1").await,
        10_000
    );
    drop(c);
    db.drop_db().await;
}

#[tokio::test]
async fn plan_after_a_run_stopped_by_max_runtime() {
    let db = TestDb::new("plan_stopped").await;
    let c = db.client().await;
    make_table(&c, 3000).await;
    // 300 batches with a 100ms pause each: far longer than the 2s allowed.
    let spec = db.spec(
        "job.yaml",
        "postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1)
batch: {size: 10, target: 0, pause: 100ms}
",
    );
    // Each run stops at its deadline and the next resumes; a few runs (bounded) make sure some
    // batches were committed even on a slow machine.
    let mut cursor = None;
    let mut row = None;
    for _ in 0..5 {
        let (code, out, err) = run(&[&"run", &"--max-runtime", &"2s", &spec]);
        assert_eq!(code, 75, "stdout:\n{out}\nstderr:\n{err}");
        assert!(out.contains("max runtime"), "{out}");
        let r = c
            .query_one(
                &format!(
                    "SELECT status, cursor, keys_done FROM {} WHERE job = 'job'",
                    common::store::JOB_VIEW
                ),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(r.get::<_, &str>(0), "stopped");
        cursor = r.get::<_, Option<String>>(1);
        row = Some(r);
        if cursor.is_some() {
            break;
        }
    }
    let (Some(cursor), Some(row)) = (cursor, row) else {
        panic!("five runs of 2s committed no batch");
    };
    let done: i64 = row.get(2);
    let cursor_id: i64 = cursor.parse().expect("numeric cursor");
    assert_eq!(done, cursor_id, "keys_done matches the cursor");
    assert_eq!(
        count(
            &c,
            &format!("SELECT count(*) FROM t WHERE id <= {cursor_id} AND n = 1")
        )
        .await,
        done
    );
    assert_eq!(
        count(
            &c,
            &format!("SELECT count(*) FROM t WHERE id > {cursor_id} AND n <> 0")
        )
        .await,
        0
    );

    let before = checksum(&c, "t").await;
    let (code, out, err) = run(&[&"plan", &"--exact", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        line_with(&out, "resume at:").contains(&format!("after key {cursor} (status stopped")),
        "{out}"
    );
    let left = 3000 - cursor_id;
    assert!(
        line_with(&out, "pending rows:").contains(&format!("{left} (counted)")),
        "{out}"
    );
    assert!(
        line_with(&out, "batches:").contains(&format!("batches:      {} of 10", (left + 9) / 10)),
        "{out}"
    );
    assert_eq!(checksum(&c, "t").await, before);
    drop(c);
    db.drop_db().await;
}
