//! `lock: skip_locked` under concurrent row locks: rows locked when the walk passes them are
//! recorded, retried, and done exactly once; rows locked for good stop the run with 75 and stay
//! recorded; a statement that leaves rows in `where` does not loop.

mod common;
use common::runner::{Running, spawn};
use common::store::{has_store, job_row};
use common::{TestDb, count};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio_postgres::Client;

async fn skipped_keys(c: &Client, job: &str) -> Vec<String> {
    c.query(
        "SELECT key FROM backfill.skipped_keys WHERE job = $1 ORDER BY key",
        &[&job],
    )
    .await
    .expect("read skipped_keys")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Wait (bounded) until the walk's cursor is past `key` (the rows up to it have been walked).
async fn wait_cursor_past(c: &Client, job: &str, key: i64, r: &mut Running) {
    r.wait_until(
        &format!("the cursor to pass {key}"),
        Duration::from_secs(30),
        Duration::from_millis(10),
        async || {
            job_row(c, job)
                .await
                .and_then(|j| j.cursor)
                .map(|s| s.parse::<i64>().expect("bigint cursor"))
                .is_some_and(|k| k >= key)
        },
    )
    .await;
}

/// Wait (bounded) until the job's walk sleeps in `where` on key 110 (`pg_sleep` there).
async fn wait_walk_at_110(c: &Client, r: &mut Running) {
    r.wait_until(
        "the walk to reach key 110",
        Duration::from_secs(30),
        Duration::from_millis(10),
        async || {
            count(
                c,
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event = 'PgSleep'
                    AND application_name LIKE 'backfill:%'",
            )
            .await
                > 0
        },
    )
    .await;
}

/// The number N in the summary's "N rows retried after being locked".
fn retried_in_summary(out: &str) -> u64 {
    let (head, _) = out
        .split_once(" rows retried after being locked")
        .unwrap_or_else(|| panic!("no retried count in the summary:\n{out}"));
    let n = head.rsplit(' ').next().unwrap_or("");
    n.parse()
        .unwrap_or_else(|_| panic!("retried count {n:?} is not a number:\n{out}"))
}

/// Hold row locks on `ids` in a transaction of its own; dropping the `Client` or calling
/// `commit` releases them.
async fn lock_rows(db: &TestDb, ids: &[i64]) -> Client {
    let c = db.client().await;
    c.batch_execute("BEGIN").await.unwrap();
    let got = c
        .query(
            "SELECT id FROM t WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            &[&ids],
        )
        .await
        .unwrap();
    assert_eq!(got.len(), ids.len(), "could not lock {ids:?}");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_locked_by_other_transactions_are_retried_and_done_exactly_once() {
    const ROWS: i64 = 20_000;
    let db = TestDb::new("skiplocked").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE t (id bigint PRIMARY KEY, done boolean, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT g FROM generate_series(1, {ROWS}) g;
         ANALYZE t;"
    ))
    .await
    .unwrap();
    let spec = db.spec(
        "skiplocked.yaml",
        "name: skip-locked
postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET done = true, n = n + 1 WHERE id = ANY($1)
batch: {size: 200, target: 0, pause: 20ms}
limits: {lock_timeout: 3s}
",
    );

    // Three transactions each lock five rows spread over the table before the run starts, and
    // let go only once the walk has passed the last of them: those 15 rows are certainly skipped.
    // Fifteen segments of the table, one random row in each; holder h takes segments h, h+3, ..
    // so each holder's rows are spread over the table. No row is the last key, so the cursor can
    // always move past each of them.
    let seg = ROWS / 15;
    let mut holders = Vec::new();
    for h in 0..3i64 {
        let ids: Vec<i64> = (0..5i64)
            .map(|s| (h + 3 * s) * seg + rand::random_range(1..=seg))
            .collect();
        let client = lock_rows(&db, &ids).await;
        holders.push((client, ids));
    }
    let guaranteed: BTreeSet<i64> = holders.iter().flat_map(|(_, ids)| ids.clone()).collect();

    // Meanwhile, another session keeps locking a few random rows for short moments.
    let stop = Arc::new(AtomicBool::new(false));
    let bg_locks = Arc::new(AtomicU64::new(0));
    let bg = {
        let (stop, bg_locks) = (stop.clone(), bg_locks.clone());
        let bc = db.client().await;
        tokio::spawn(async move {
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let ids: Vec<i64> = (0..3).map(|_| rand::random_range(1..=ROWS)).collect();
                bc.batch_execute("BEGIN").await.unwrap();
                let got = bc
                    .query(
                        "SELECT id FROM t WHERE id = ANY($1) ORDER BY id FOR UPDATE SKIP LOCKED",
                        &[&ids],
                    )
                    .await
                    .unwrap();
                bg_locks.fetch_add(got.len() as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(rand::random_range(20..150))).await;
                bc.batch_execute("COMMIT").await.unwrap();
                tokio::time::sleep(Duration::from_millis(rand::random_range(0..30))).await;
            }
        })
    };

    let mut r = spawn(db.dir.path(), "run", &[], &spec);
    for (client, ids) in holders {
        let last = *ids.iter().max().unwrap();
        wait_cursor_past(&c, "skip-locked", last, &mut r).await;
        client.batch_execute("COMMIT").await.unwrap();
    }
    let (code, out, err) = r.finish(Duration::from_secs(60)).await;
    stop.store(true, Ordering::Relaxed);
    bg.await.unwrap();
    assert_eq!(code, 0, "run under concurrent locks:\n{out}\n{err}");
    assert!(
        bg_locks.load(Ordering::Relaxed) > 0,
        "background locker never locked a row"
    );

    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE done IS NOT TRUE").await,
        0,
        "rows lost"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n <> 1").await,
        0,
        "rows done twice or never"
    );
    let unlocked = count(
        &c,
        &format!(
            "SELECT count(*) FROM t WHERE id IN ({}) AND n = 1",
            guaranteed
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ),
    )
    .await;
    assert_eq!(
        unlocked as usize,
        guaranteed.len(),
        "held rows not done once"
    );

    let j = job_row(&c, "skip-locked").await.expect("job recorded");
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.keys_done, ROWS, "{j:?}");
    assert_eq!(
        j.rows_done, ROWS,
        "every row is updated once, walked or retried: {j:?}"
    );
    assert!(
        j.rows_retried >= guaranteed.len() as i64,
        "{} rows were locked when the walk passed them, {} retried: {j:?}",
        guaranteed.len(),
        j.rows_retried
    );
    let said = retried_in_summary(&out);
    assert!(said > 0, "{out}");
    assert_eq!(
        said as i64, j.rows_retried,
        "summary and store disagree:\n{out}"
    );
    assert!(
        skipped_keys(&c, "skip-locked").await.is_empty(),
        "keys left waiting for retry"
    );

    drop(c);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_locked_for_the_whole_run_stops_with_75_and_is_done_on_the_next_run() {
    const ROWS: i64 = 2_000;
    const HELD: i64 = 1_234;
    let db = TestDb::new("heldrow").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE t (id bigint PRIMARY KEY, done boolean, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT g FROM generate_series(1, {ROWS}) g;
         ANALYZE t;"
    ))
    .await
    .unwrap();
    let spec = db.spec(
        "heldrow.yaml",
        "name: held-row
postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET done = true, n = n + 1 WHERE id = ANY($1)
batch: {size: 200, target: 0}
limits: {lock_timeout: 200ms}
",
    );

    let holder = lock_rows(&db, &[HELD]).await;
    let r = spawn(db.dir.path(), "first", &[], &spec);
    let (code, out, err) = r.finish(Duration::from_secs(60)).await;
    let all = format!("{out}\n{err}");
    assert_eq!(
        code, 75,
        "a row locked throughout must stop the run:\n{all}"
    );
    assert!(
        all.contains("still locked"),
        "output does not say rows are still locked:\n{all}"
    );
    assert!(all.contains("held-row: stopped"), "{out}");
    assert_eq!(
        skipped_keys(&c, "held-row").await,
        vec![HELD.to_string()],
        "the held key is not kept"
    );
    let j = job_row(&c, "held-row").await.expect("job recorded");
    assert_eq!(j.status, "stopped", "{j:?}");
    assert_eq!(j.keys_done, ROWS, "{j:?}");
    assert_eq!(j.rows_done, ROWS - 1, "{j:?}");
    assert_eq!(
        count(&c, &format!("SELECT n::bigint FROM t WHERE id = {HELD}")).await,
        0
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n = 1").await,
        ROWS - 1
    );

    // The status command shows it waiting.
    let (code, sout, serr) = common::run(&[&"status", &"--json", &spec]);
    assert_eq!(code, 0, "{sout}{serr}");
    let doc: serde_json::Value =
        serde_json::from_str(&sout).unwrap_or_else(|e| panic!("{e}:\n{sout}"));
    assert_eq!(
        doc["jobs"][0]["rows_pending_retry"].as_i64(),
        Some(1),
        "{doc:#}"
    );

    holder.batch_execute("COMMIT").await.unwrap();
    let r = spawn(db.dir.path(), "second", &[], &spec);
    let (code, out, err) = r.finish(Duration::from_secs(60)).await;
    assert_eq!(code, 0, "after the lock is gone:\n{out}\n{err}");
    assert!(out.contains("held-row: done"), "{out}");
    assert_eq!(retried_in_summary(&out), 1, "{out}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n = 1 AND done").await,
        ROWS
    );
    assert!(skipped_keys(&c, "held-row").await.is_empty());
    let j = job_row(&c, "held-row").await.expect("job recorded");
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.keys_done, ROWS, "{j:?}");
    assert_eq!(j.rows_done, ROWS, "{j:?}");
    assert_eq!(j.rows_retried, 1, "{j:?}");

    drop(c);
    db.drop_db().await;
}

/// A skipped row whose key another transaction rewrites to an equal value of another spelling
/// (numeric `500.0` -> `500.00`) and that is locked again when the retry pass comes: its record
/// (`500.0`) must stay until the row is done. The retry pass once compared the recorded text
/// with the row's key as text, took the record for resolved, and the run ended `done` with the
/// row never done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_key_rewritten_to_an_equal_spelling_is_still_retried() {
    respelled(
        "numeric",
        "SELECT (g || '.0')::numeric FROM generate_series(1, 1000) g",
        ["500.0", "500.00", "500"],
    )
    .await;
}

/// The same with a case-insensitive (non-deterministic) collation: `k500` rewritten to `K500`.
/// Compared as plain text, the record of a row the pass had locked and done stayed "still
/// locked", and every round did the row again until the run stopped with 75.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_key_rewritten_in_another_case_is_retried_once() {
    respelled(
        "text COLLATE ci",
        "SELECT 'k' || lpad(g::text, 4, '0') FROM generate_series(1, 1000) g",
        ["k0500", "K0500", "k0500"],
    )
    .await;
}

/// A table `t` keyed by `key_type` with 1000 rows from `rows`; `keys`: the row's key as
/// recorded, the equal key it is rewritten to, and how a second transaction names it.
async fn respelled(key_type: &str, rows: &str, keys: [&str; 3]) {
    let [recorded, rewritten, named] = keys;
    let db = TestDb::new("respelled").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
         CREATE TABLE t (id {key_type} PRIMARY KEY, done boolean, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) {rows};
         ANALYZE t;"
    ))
    .await
    .unwrap();
    let spec = db.spec(
        "respelled.yaml",
        "name: respelled
postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET done = true, n = n + 1 WHERE id = ANY($1)
batch: {size: 100, target: 0}
limits: {lock_timeout: 10s}
",
    );
    let first = db.client().await;
    first.batch_execute("BEGIN").await.unwrap();
    first
        .execute(
            &format!("SELECT id FROM t WHERE id = '{recorded}' FOR UPDATE"),
            &[],
        )
        .await
        .unwrap();
    let mut r = spawn(db.dir.path(), "run", &[], &spec);
    r.wait_until(
        "the walk to be over with the key recorded",
        Duration::from_secs(30),
        Duration::from_millis(10),
        async || {
            has_store(&c).await
                && skipped_keys(&c, "respelled").await == [recorded]
                && c.query_one(
                    "SELECT bool_and(status IN ('retrying', 'done')) FROM backfill.ranges
                      WHERE job = 'respelled'",
                    &[],
                )
                .await
                .ok()
                .and_then(|row| row.get::<_, Option<bool>>(0))
                .unwrap_or(false)
        },
    )
    .await;
    // The same value, spelled otherwise; a second transaction queues for the row, and has it
    // once the first commits.
    first
        .execute(
            &format!("UPDATE t SET id = '{rewritten}' WHERE id = '{recorded}'"),
            &[],
        )
        .await
        .unwrap();
    let second = db.client().await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let lock_named = format!("SELECT id FROM t WHERE id = '{named}' FOR UPDATE");
    let holder = tokio::spawn(async move {
        second.batch_execute("BEGIN").await.unwrap();
        second.execute(&lock_named, &[]).await.unwrap();
        let _ = rx.await;
        second.batch_execute("COMMIT").await.unwrap();
    });
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity
          WHERE wait_event_type = 'Lock' AND query LIKE '%id = ''{named}'' FOR UPDATE%'"
    );
    r.wait_until(
        "the second holder to queue",
        Duration::from_secs(10),
        Duration::from_millis(10),
        async || count(&c, &waiting).await == 1,
    )
    .await;
    first.batch_execute("COMMIT").await.unwrap();
    // Retry rounds pass while the second transaction holds the row (they come every 0.1-1.6 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        skipped_keys(&c, "respelled").await,
        [recorded],
        "the record of a row still locked was dropped"
    );
    tx.send(()).unwrap();
    holder.await.unwrap();
    let (code, out, err) = r.finish(Duration::from_secs(120)).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n = 1 AND done").await,
        1000,
        "every row once: {out}"
    );
    assert!(skipped_keys(&c, "respelled").await.is_empty());
    drop(c);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_that_leaves_rows_in_where_does_not_loop() {
    const ROWS: i64 = 3_000;
    let db = TestDb::new("staysinwhere").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE t (id bigint PRIMARY KEY, flag boolean, touched int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT g FROM generate_series(1, {ROWS}) g;
         ANALYZE t;"
    ))
    .await
    .unwrap();
    let spec = db.spec(
        "stays.yaml",
        "name: stays-in-where
postgres:
  url: $URL
  table: t
  key: id
  where: flag IS NULL
  statement: UPDATE t SET touched = touched + 1 WHERE id = ANY($1)
batch: {size: 100, target: 0, pause: 10ms}
limits: {lock_timeout: 1s}
",
    );

    // Some rows are locked when the walk passes them, so the retry pass sees rows that still
    // match `where` after the statement ran on them.
    let held = [700i64, 1_500, 2_300];
    let holder = lock_rows(&db, &held).await;
    let mut r = spawn(db.dir.path(), "run", &[], &spec);
    wait_cursor_past(&c, "stays-in-where", 2_300, &mut r).await;
    holder.batch_execute("COMMIT").await.unwrap();
    let (code, out, err) = r.finish(Duration::from_secs(60)).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("stays-in-where: done"), "{out}");

    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE touched = 1").await,
        ROWS
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE touched <> 1").await,
        0
    );
    let j = job_row(&c, "stays-in-where").await.expect("job recorded");
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.keys_done, ROWS, "{j:?}");
    assert_eq!(j.rows_done, ROWS, "{j:?}");
    assert_eq!(j.rows_retried, held.len() as i64, "{j:?}");
    assert!(skipped_keys(&c, "stays-in-where").await.is_empty());

    // Done means done, even though every row still matches `where`.
    let (code, out, err) = common::run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("0 run, 1 skipped"), "{out}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE touched <> 1").await,
        0
    );

    drop(c);
    db.drop_db().await;
}

/// A row locked elsewhere is passed over by the walk while, during that same walk, another row's
/// key is moved into the batch: the walk locks the moved row under its new key, which the
/// walk's snapshot does not hold. The walk used to compare counts (snapshot keys up to the
/// batch's last key against keys locked), the moved row made up for the skipped one, and the
/// skipped row was never recorded: the run ended `done`, exit 0, without it. Here `where`
/// sleeps on the row whose key moves (110 -> 65), so the move lands while the walk is at it.
/// The batch holds all 11 keys, so the row moves inside it (a key moved behind a batch that
/// has committed is walked by no keyset walk). The statement, an UPDATE of the table, is tried
/// on keys walked unlocked first: it meets both the locked row and the moved one, and the
/// batch locks its keys first, as above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_locked_elsewhere_is_recorded_when_another_key_moves_into_the_batch() {
    let db = TestDb::new("keymove").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, done boolean NOT NULL DEFAULT false);
         INSERT INTO t (id) SELECT g * 10 FROM generate_series(1, 11) g;
         ANALYZE t;",
    )
    .await
    .unwrap();
    let spec = db.spec(
        "keymove.yaml",
        "name: keymove
postgres:
  url: $URL
  table: t
  key: id
  where: NOT done AND (id <> 110 OR pg_sleep(1.5) IS NOT NULL)
  statement: UPDATE t SET done = true WHERE id = ANY($1)
batch: {size: 11, target: 0}
limits: {lock_timeout: 1s}
",
    );
    let holder = lock_rows(&db, &[50]).await;
    let mut r = spawn(db.dir.path(), "run", &[], &spec);
    wait_walk_at_110(&c, &mut r).await;
    c.batch_execute("UPDATE t SET id = 65 WHERE id = 110")
        .await
        .unwrap();
    wait_cursor_past(&c, "keymove", 100, &mut r).await;
    let recorded = skipped_keys(&c, "keymove").await;
    holder.batch_execute("COMMIT").await.unwrap();
    let (code, out, err) = r.finish(Duration::from_secs(60)).await;
    assert_eq!(recorded, ["50"], "{out}\n{err}");
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE NOT done").await,
        0,
        "{out}\n{err}"
    );
    drop(c);
    db.drop_db().await;
}

/// A row of a batch whose key moves (110 -> 65, inside the batch) after its keys were walked
/// unlocked and before its statement (an UPDATE of the table, which takes its rows' locks
/// itself) reaches the row. Read committed, the statement read a newer snapshot, found no row
/// 110, and the moved row was in no batch: the run ended `done`, exit 0, with row 65 not done.
/// The statement now writes against the walk's snapshot (repeatable read): the moved row
/// fails it, and the batch starts again with the locking walk, which finds the row under its
/// new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_moved_inside_a_batch_walked_unlocked_is_still_done_once() {
    moved_while_its_batch_runs("keymove_free", 11, 110, 65).await;
}

/// The same with the row moving ahead, past the last key of the range's last batch (50 ->
/// 200): the locking walk that the batch went back to was bounded by the last key of the
/// unlocked walk (110), and the range ended `done`, exit 0, without row 200. It now walks from
/// the batch's cursor to the range's end, as any batch does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_moved_ahead_of_the_last_batch_walked_unlocked_is_still_done_once() {
    moved_while_its_batch_runs("keyahead_free", 50, 50, 200).await;
}

/// Row `from` of 10, 20, ... 110 gets the key `to` while the job's first batch (of `size`
/// keys: 11 fills it, more leaves it short, the range's last) waits in its walk (`where`
/// sleeps on key 110); every row ends done once.
async fn moved_while_its_batch_runs(name: &str, size: i64, from: i64, to: i64) {
    let db = TestDb::new(name).await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, done boolean NOT NULL DEFAULT false,
                         n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT g * 10 FROM generate_series(1, 11) g;
         ANALYZE t;",
    )
    .await
    .unwrap();
    let spec = db.spec(
        &format!("{name}.yaml"),
        &format!(
            "name: {name}
postgres:
  url: $URL
  table: t
  key: id
  where: NOT done AND (id <> 110 OR pg_sleep(1.5) IS NOT NULL)
  statement: UPDATE t SET done = true, n = n + 1 WHERE id = ANY($1)
batch: {{size: {size}, target: 0}}
"
        ),
    );
    let mut r = spawn(db.dir.path(), "run", &[], &spec);
    wait_walk_at_110(&c, &mut r).await;
    c.execute("UPDATE t SET id = $2 WHERE id = $1", &[&from, &to])
        .await
        .unwrap();
    let (code, out, err) = r.finish(Duration::from_secs(60)).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE NOT done OR n <> 1").await,
        0,
        "{out}\n{err}"
    );
    assert_eq!(count(&c, "SELECT count(*) FROM t").await, 11);
    drop(c);
    db.drop_db().await;
}

/// A trigger that inserts a row unless one exists reads, under the unlocked walk's repeatable
/// read, the snapshot of the walk: a row the application committed since is not there, the
/// INSERT hits it, and the job failed (unique violation, exit 1) where read committed sees the
/// row. A try that fails on anything but a lost connection or a statement timeout now starts
/// the batch again with the locking walk, read committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_that_reads_past_the_walks_snapshot_does_not_fail_the_job() {
    let db = TestDb::new("trigger_seen").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE seen (grp int PRIMARY KEY);
         CREATE TABLE t (id bigint PRIMARY KEY, grp int NOT NULL,
                         done boolean NOT NULL DEFAULT false);
         INSERT INTO t (id, grp) SELECT g * 10, 7 FROM generate_series(1, 11) g;
         ANALYZE t;
         CREATE FUNCTION note_grp() RETURNS trigger LANGUAGE plpgsql AS $f$
         BEGIN
           IF NOT EXISTS (SELECT 1 FROM seen WHERE grp = NEW.grp) THEN
             INSERT INTO seen VALUES (NEW.grp);
           END IF;
           RETURN NEW;
         END $f$;
         CREATE TRIGGER note AFTER UPDATE ON t FOR EACH ROW EXECUTE FUNCTION note_grp();",
    )
    .await
    .unwrap();
    let spec = db.spec(
        "trigger_seen.yaml",
        "name: trigger_seen
postgres:
  url: $URL
  table: t
  key: id
  where: NOT done AND (id <> 110 OR pg_sleep(1.5) IS NOT NULL)
  statement: UPDATE t SET done = true WHERE id = ANY($1)
batch: {size: 50, target: 0}
",
    );
    let mut r = spawn(db.dir.path(), "run", &[], &spec);
    wait_walk_at_110(&c, &mut r).await;
    c.batch_execute("INSERT INTO seen VALUES (7)")
        .await
        .unwrap();
    let (code, out, err) = r.finish(Duration::from_secs(60)).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE NOT done").await, 0);
    drop(c);
    db.drop_db().await;
}

/// A statement whose table's trigger draws from a sequence (what no rollback undoes): a batch
/// tried on keys walked unlocked that went back to the start ran it twice, and drew twice for
/// every row before the one the application held (19 draws for 10 rows). Such a statement's
/// batches lock their keys first, as before the unlocked walk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_that_draws_from_a_sequence_runs_once_per_row() {
    draws_once(
        "draws",
        "CREATE FUNCTION ticket() RETURNS trigger LANGUAGE plpgsql AS $f$
         BEGIN
           NEW.ticket := nextval('tickets');
           RETURN NEW;
         END $f$;
         CREATE TRIGGER ticket BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION ticket();",
        "UPDATE t SET done = true WHERE id = ANY($1)",
    )
    .await;
}

/// The same where only the statement's plan shows the draw: a default it fills in (`SET ticket
/// = DEFAULT`), and a CHECK of the table that calls a function drawing from the sequence. Read
/// as written, neither statement called anything, and each drew 20 times for 10 rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draw_that_only_the_plan_shows_runs_once_per_row() {
    draws_once(
        "draws_default",
        "ALTER TABLE t ALTER COLUMN ticket SET DEFAULT nextval('tickets');",
        "UPDATE t SET done = true, ticket = DEFAULT WHERE id = ANY($1)",
    )
    .await;
    draws_once(
        "draws_check",
        "CREATE FUNCTION drawn(n bigint) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $f$
         BEGIN
           PERFORM nextval('tickets');
           RETURN true;
         END $f$;
         ALTER TABLE t ADD CONSTRAINT drawn CHECK (drawn(id)) NOT VALID;",
        "UPDATE t SET done = true WHERE id = ANY($1)",
    )
    .await;
}

/// Ten rows (10 ... 100), `setup` run over them, and the job of `statement` while the
/// application holds row 100 until the cursor has passed it: every row done, and the sequence
/// `tickets` drawn once per row.
async fn draws_once(name: &str, setup: &str, statement: &str) {
    let db = TestDb::new(name).await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE SEQUENCE tickets;
         CREATE TABLE t (id bigint PRIMARY KEY, done boolean NOT NULL DEFAULT false,
                         ticket bigint);
         INSERT INTO t (id) SELECT g * 10 FROM generate_series(1, 10) g;
         ANALYZE t;",
    )
    .await
    .unwrap();
    c.batch_execute(setup).await.unwrap();
    let spec = db.spec(
        &format!("{name}.yaml"),
        &format!(
            "name: {name}
postgres:
  url: $URL
  table: t
  key: id
  where: NOT done
  statement: {statement}
batch: {{size: 10, target: 0}}
"
        ),
    );
    let holder = lock_rows(&db, &[100]).await;
    let mut r = spawn(db.dir.path(), "run", &[], &spec);
    wait_cursor_past(&c, name, 100, &mut r).await;
    holder.batch_execute("COMMIT").await.unwrap();
    let (mut code, mut out, mut err) = r.finish(Duration::from_secs(60)).await;
    if code == 75 {
        (code, out, err) = common::run(&[&"run", &spec]);
    }
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE NOT done").await, 0);
    assert_eq!(
        count(&c, "SELECT last_value FROM tickets").await,
        10,
        "one draw per row: {out}\n{err}"
    );
    drop(c);
    db.drop_db().await;
}

/// A table named like one of the walk's WITH queries (`locked`): the table's name was spliced
/// unqualified, so in the later WITH queries it meant the query, not the table. The walk
/// then counted only the rows it had locked, recorded none of those it passed over, and the
/// run ended `done`, exit 0, without rows 50 and 95 (with a `where` naming a column of the
/// table, the run failed instead). The table is always schema-qualified now, and the WITH
/// queries have names of the engine's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_named_like_a_query_of_the_walk_loses_no_row() {
    let db = TestDb::new("ctename").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE locked (k bigint PRIMARY KEY, done boolean NOT NULL DEFAULT false);
         INSERT INTO locked (k) SELECT g FROM generate_series(1, 95) g;
         ANALYZE locked;",
    )
    .await
    .unwrap();
    let spec = db.spec(
        "ctename.yaml",
        "name: ctename
postgres:
  url: $URL
  table: locked
  key: k
  statement: UPDATE locked SET done = true WHERE k = ANY($1)
batch: {size: 100, target: 0}
limits: {lock_timeout: 1s}
",
    );
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; SELECT k FROM locked WHERE k IN (50, 95) FOR UPDATE")
        .await
        .unwrap();
    let mut r = spawn(db.dir.path(), "run", &[], &spec);
    wait_cursor_past(&c, "ctename", 95, &mut r).await;
    let recorded = skipped_keys(&c, "ctename").await;
    holder.batch_execute("COMMIT").await.unwrap();
    let (code, out, err) = r.finish(Duration::from_secs(60)).await;
    assert_eq!(recorded, ["50", "95"], "{out}\n{err}");
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM locked WHERE NOT done").await,
        0,
        "{out}\n{err}"
    );
    drop(c);
    db.drop_db().await;
}

/// Rows skipped under `lock: skip_locked` by a run that was stopped mid-walk stay recorded; a
/// run resumed with `lock: none` must still retry them before calling the job done. The end of
/// a range once counted the recorded rows only under skip_locked, so the resumed run marked
/// the range done and the skipped row was never processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_skipped_before_a_resume_with_lock_none_are_still_retried() {
    const ROWS: i64 = 2_000;
    const HELD: i64 = 500;
    let db = TestDb::new("locknone").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT g FROM generate_series(1, {ROWS}) g;
         ANALYZE t;"
    ))
    .await
    .unwrap();
    let spec = |lock: &str| {
        db.spec(
            "locknone.yaml",
            &format!(
                "name: lock-none
postgres:
  url: $URL
  table: t
  key: id
  where: n = 0
  lock: {lock}
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1)
batch: {{size: 100, target: 0, pause: 200ms}}
"
            ),
        )
    };
    let holder = lock_rows(&db, &[HELD]).await;
    let first = spec("skip_locked");
    let mut r = spawn(db.dir.path(), "first", &[], &first);
    r.wait_until(
        "the held row to be recorded",
        Duration::from_secs(60),
        Duration::from_millis(20),
        async || has_store(&c).await && skipped_keys(&c, "lock-none").await == [HELD.to_string()],
    )
    .await;
    let (code, out, err) = r.stop(Duration::from_secs(60)).await;
    assert_eq!(code, 75, "stopped mid-walk:\n{out}\n{err}");
    assert!(
        count(&c, "SELECT count(*) FROM t WHERE n = 0").await > 1,
        "the first run must stop before its walk is over"
    );
    holder.batch_execute("COMMIT").await.unwrap();

    let second = spec("none");
    let r = spawn(db.dir.path(), "second", &[], &second);
    let (code, out, err) = r.finish(Duration::from_secs(120)).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n = 1").await,
        ROWS,
        "every row once, the skipped one too:\n{out}"
    );
    assert!(skipped_keys(&c, "lock-none").await.is_empty());
    drop(c);
    db.drop_db().await;
}
