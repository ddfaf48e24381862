//! Several workers on one Postgres job: separate processes sharing a `workers: 2` job (a third
//! one is refused with 75), a worker process killed with SIGKILL again and again, rows locked by
//! other sessions across range boundaries, `run --workers 3` seen through `status --json`, and a
//! second runner refused under `workers: 1`.
//!
//! Every job inserts into a table without a unique constraint: a batch applied twice, or a range
//! walked by two workers, shows up as duplicate rows; a lost one as a missing row.

mod common;
use common::runner::{Running, spawn};
use common::store::{copy_done_exactly_once, job_row};
use common::{TestDb, count};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_postgres::Client;

async fn tables(c: &Client, rows: i64) {
    c.batch_execute(&format!(
        "CREATE TABLE src (id bigint PRIMARY KEY, v int);
         INSERT INTO src SELECT g, g % 97 FROM generate_series(1, {rows}) g;
         CREATE TABLE dst (id bigint, v int);
         ANALYZE src;"
    ))
    .await
    .unwrap();
}

/// The copy job: `workers` and `batch` as given, and any extra top-level YAML.
fn spec(db: &TestDb, workers: u32, batch: &str, extra: &str) -> PathBuf {
    db.spec(
        "copy.yaml",
        &format!(
            "name: copy
postgres:
  url: $URL
  table: src
  key: id
  statement: INSERT INTO dst SELECT id, v FROM src WHERE id = ANY($1)
workers: {workers}
batch: {batch}
{extra}"
        ),
    )
}

/// Owners (`host:pid/wN`) of the job's ranges right now.
async fn owners(c: &Client) -> Vec<String> {
    match c
        .query(
            "SELECT owner FROM backfill.ranges WHERE job = 'copy' AND owner IS NOT NULL",
            &[],
        )
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        // The store does not exist yet.
        Err(_) => Vec::new(),
    }
}

/// Whether process `pid` holds (or held) a range: an owner `host:<pid>/wN`.
fn owned_by(owners: &[String], pid: u32) -> bool {
    let tag = format!(":{pid}/");
    owners.iter().any(|o| o.contains(&tag))
}

/// The N of `copy: done — N keys, ...` (or `stopped`, ...) in a runner's summary.
fn keys_in_summary(out: &str) -> u64 {
    let line = out
        .lines()
        .find(|l| l.starts_with("copy: ") && l.contains(" keys, "))
        .unwrap_or_else(|| panic!("no summary line:\n{out}"));
    let head = line.split(" keys, ").next().unwrap();
    head.rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no key count in {line:?}"))
}

fn runner(dir: &Path, tag: &str, spec: &Path) -> Running {
    spawn(dir, tag, &["--workers", "1"], spec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_a_two_worker_job_and_a_third_is_refused() {
    const ROWS: i64 = 24_000;
    let db = TestDb::new("w_share").await;
    let c = db.client().await;
    tables(&c, ROWS).await;
    let spec = spec(&db, 2, "{size: 200, target: 0, pause: 30ms}", "");

    let mut a = runner(db.dir.path(), "a", &spec);
    let apid = a.child.id();
    a.wait_until(
        "the first process to claim a range",
        Duration::from_secs(60),
        Duration::from_millis(10),
        async || owned_by(&owners(&c).await, apid),
    )
    .await;
    let mut b = runner(db.dir.path(), "b", &spec);
    let bpid = b.child.id();
    b.wait_until(
        "the second process to claim a range",
        Duration::from_secs(60),
        Duration::from_millis(10),
        async || owned_by(&owners(&c).await, bpid),
    )
    .await;

    // Both slots are taken: a third process is refused and writes nothing.
    let before = job_row(&c, "copy").await.expect("job recorded");
    let third = runner(db.dir.path(), "c", &spec);
    let (code, out, err) = third.finish(Duration::from_secs(60)).await;
    assert_eq!(
        code, 75,
        "a third worker of a `workers: 2` job:\n{out}\n{err}"
    );
    let all = format!("{out}\n{err}");
    assert!(
        all.contains("2 worker(s), the job's `workers` limit"),
        "the refusal must say why:\n{all}"
    );
    assert!(all.contains("copy: not started"), "{all}");
    let after = job_row(&c, "copy").await.expect("job recorded");
    assert_eq!(
        after.status, "running",
        "the refused process changed the job: {after:?}"
    );
    assert!(after.keys_done >= before.keys_done);

    let (acode, aout, aerr) = a.finish(Duration::from_secs(120)).await;
    let (bcode, bout, berr) = b.finish(Duration::from_secs(120)).await;
    assert_eq!(acode, 0, "first:\n{aout}\n{aerr}");
    assert_eq!(bcode, 0, "second:\n{bout}\n{berr}");
    assert!(aout.contains("copy: done"), "{aout}");
    assert!(bout.contains("copy: done"), "{bout}");
    // Each process did part of the work, and the parts add up to the whole.
    let (ka, kb) = (keys_in_summary(&aout), keys_in_summary(&bout));
    assert!(ka > 0 && kb > 0, "both must work: {ka} and {kb} keys");
    assert_eq!(ka + kb, ROWS as u64, "{aout}\n{bout}");
    copy_done_exactly_once(&c, ROWS).await;

    drop(c);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_worker_processes_killed_again_and_again_nothing_lost_or_doubled() {
    const ROWS: i64 = 80_000;
    const KILLS: usize = 5;
    let db = TestDb::new("w_kill").await;
    let c = db.client().await;
    tables(&c, ROWS).await;
    // 400 batches with a pause each: several seconds of work even for two workers.
    let spec = spec(&db, 2, "{size: 200, target: 0, pause: 40ms}", "");

    let mut steady = runner(db.dir.path(), "steady", &spec);
    let spid = steady.child.id();
    steady
        .wait_until(
            "the steady process to claim a range",
            Duration::from_secs(60),
            Duration::from_millis(10),
            async || owned_by(&owners(&c).await, spid),
        )
        .await;
    let mut kills = 0;
    let mut starts = 0;
    let mut victim: Option<Running> = None;
    while kills < KILLS {
        assert!(
            starts < 60,
            "the victim could not join again: {kills} kills"
        );
        let mut v = match victim.take() {
            Some(v) => v,
            None => {
                starts += 1;
                runner(db.dir.path(), &format!("victim{starts}"), &spec)
            }
        };
        // Let it work a random while: claim, mid-batch, between batches.
        tokio::time::sleep(Duration::from_millis(rand::random_range(150..900))).await;
        if v.exited() {
            // Refused (75) while the killed process's sessions were still ending, or the job
            // is already over.
            let (code, out, err) = v.finish(Duration::from_secs(10)).await;
            assert!(code == 75 || code == 0, "victim exit {code}:\n{out}\n{err}");
            assert!(
                !steady.exited(),
                "the job ended after {kills} kills; make it longer:\n{}",
                steady.stderr()
            );
            continue;
        }
        assert!(
            !steady.exited(),
            "the job ended after {kills} kills; make it longer:\n{}",
            steady.stderr()
        );
        v.kill();
        kills += 1;
    }
    // One last victim, left to finish the job with the steady process (refused while the
    // killed one's sessions are still ending: then it tries again).
    let mut last = None;
    while last.is_none() && !steady.exited() {
        let mut v = runner(db.dir.path(), "last", &spec);
        tokio::time::sleep(Duration::from_millis(300)).await;
        if !v.exited() {
            last = Some(v);
            break;
        }
        let (code, out, err) = v.finish(Duration::from_secs(10)).await;
        assert!(code == 75 || code == 0, "last: exit {code}:\n{out}\n{err}");
    }
    let (code, out, err) = steady.finish(Duration::from_secs(180)).await;
    assert_eq!(code, 0, "steady:\n{out}\n{err}");
    assert!(out.contains("copy: done"), "{out}");
    if let Some(v) = last {
        let (code, out, err) = v.finish(Duration::from_secs(180)).await;
        assert_eq!(code, 0, "last:\n{out}\n{err}");
    }
    copy_done_exactly_once(&c, ROWS).await;
    // The killed workers' ranges were taken over: a range claimed again has a newer epoch than
    // the number of ranges (epochs come from one sequence, one per claim).
    let claims = count(&c, "SELECT max(epoch) FROM backfill.ranges").await;
    let ranges = count(&c, "SELECT count(*) FROM backfill.ranges").await;
    assert!(claims > ranges, "{claims} claims for {ranges} ranges");

    drop(c);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_locked_across_range_boundaries_are_skipped_then_retried_once() {
    const ROWS: i64 = 20_000;
    let db = TestDb::new("w_bounds").await;
    let c = db.client().await;
    tables(&c, ROWS).await;
    let spec = spec(
        &db,
        2,
        "{size: 150, target: 0, pause: 10ms}",
        "limits: {lock_timeout: 5s}\n",
    );
    // Paused from the start: the run cuts the ranges and its workers claim, then wait.
    let (code, out, err) = common::run(&[&"pause", &spec]);
    assert_eq!(code, 0, "{out}{err}");
    let mut r = spawn(db.dir.path(), "run", &[], &spec);
    r.wait_until(
        "both workers to claim a range",
        Duration::from_secs(60),
        Duration::from_millis(10),
        async || owners(&c).await.len() == 2,
    )
    .await;
    assert_eq!(
        count(&c, "SELECT count(*) FROM dst").await,
        0,
        "worked while paused"
    );
    let bounds: Vec<i64> = c
        .query(
            "SELECT hi::bigint FROM backfill.ranges WHERE job = 'copy' AND hi IS NOT NULL
              ORDER BY range_no",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(bounds.len() >= 3, "too few ranges: {bounds:?}");
    // The last two keys of a range and the first two of the next, at three boundaries.
    let picked = [
        bounds[0],
        bounds[bounds.len() / 2],
        bounds[bounds.len() - 1],
    ];
    let held: Vec<i64> = picked
        .iter()
        .flat_map(|b| [b - 1, *b, b + 1, b + 2])
        .collect();
    let holder = db.client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    let got = holder
        .query(
            "SELECT id FROM src WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            &[&held],
        )
        .await
        .unwrap();
    assert_eq!(got.len(), held.len());

    let (code, out, err) = common::run(&[&"unpause", &spec]);
    assert_eq!(code, 0, "{out}{err}");
    // The walks pass the held rows: each is recorded for its range's retry pass.
    let want: BTreeSet<String> = held.iter().map(|k| k.to_string()).collect();
    r.wait_until(
        "every held row to be recorded as skipped",
        Duration::from_secs(60),
        Duration::from_millis(10),
        async || {
            let got: BTreeSet<String> = c
                .query(
                    "SELECT key FROM backfill.skipped_keys WHERE job = 'copy'",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            want.is_subset(&got)
        },
    )
    .await;
    assert_eq!(
        count(
            &c,
            &format!(
                "SELECT count(*) FROM dst WHERE id IN ({})",
                held.iter()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        )
        .await,
        0,
        "a held row was copied while locked"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder.batch_execute("COMMIT").await.unwrap();

    let (code, out, err) = r.finish(Duration::from_secs(120)).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("copy: done"), "{out}");
    copy_done_exactly_once(&c, ROWS).await;
    let j = job_row(&c, "copy").await.unwrap();
    assert_eq!(j.rows_retried, held.len() as i64, "{j:?}");

    drop((c, holder));
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_worker_threads_in_one_process_show_in_status_json() {
    const ROWS: i64 = 30_000;
    let db = TestDb::new("w_status").await;
    let c = db.client().await;
    tables(&c, ROWS).await;
    // The spec says one worker; the command line asks for three threads.
    let spec = spec(&db, 1, "{size: 200, target: 0, pause: 40ms}", "");
    let mut r = spawn(db.dir.path(), "run", &["--workers", "3"], &spec);
    let mut seen: Option<serde_json::Value> = None;
    let spec_path = spec.clone();
    r.wait_until(
        "status --json to show three workers and three owned ranges",
        Duration::from_secs(60),
        Duration::from_millis(50),
        async || {
            let (code, out, _) = common::run(&[&"status", &"--json", &spec_path]);
            if code != 0 {
                return false;
            }
            let Ok(doc) = serde_json::from_str::<serde_json::Value>(&out) else {
                return false;
            };
            let job = &doc["jobs"][0];
            let owned = job["units"].as_array().map_or(0, |u| {
                u.iter()
                    .filter(|u| u["owner"].is_string() && u["status"] != "done")
                    .count()
            });
            let ok = job["status"] == "running"
                && job["workers_active"].as_i64() == Some(3)
                && owned == 3;
            if ok {
                seen = Some(doc);
            }
            ok
        },
    )
    .await;
    let doc = seen.unwrap();
    let job = &doc["jobs"][0];
    let units = job["units"].as_array().unwrap();
    assert!(units.len() >= 3, "one range per worker at least: {doc:#}");
    assert_eq!(
        job["units_total"].as_i64(),
        Some(units.len() as i64),
        "{doc:#}"
    );
    for u in units {
        assert!(u["unit"].as_str().unwrap().starts_with("range "), "{doc:#}");
    }
    // Three distinct workers of this process own them.
    let pid = r.child.id();
    let owners: BTreeSet<&str> = units
        .iter()
        .filter(|u| u["status"] != "done")
        .filter_map(|u| u["owner"].as_str())
        .collect();
    assert_eq!(owners.len(), 3, "{doc:#}");
    assert!(
        owners.iter().all(|o| o.contains(&format!(":{pid}/w"))),
        "{doc:#}"
    );
    let (code, out, err) = r.finish(Duration::from_secs(120)).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("by 3 workers"), "{out}");
    copy_done_exactly_once(&c, ROWS).await;

    // Afterwards: done, no worker left.
    let (code, out, err) = common::run(&[&"status", &"--json", &spec]);
    assert_eq!(code, 0, "{out}{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["jobs"][0]["status"], "done", "{doc:#}");
    assert_eq!(
        doc["jobs"][0]["workers_active"].as_i64(),
        Some(0),
        "{doc:#}"
    );

    drop(c);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_worker_a_second_runner_is_refused() {
    const ROWS: i64 = 20_000;
    let db = TestDb::new("w_one").await;
    let c = db.client().await;
    tables(&c, ROWS).await;
    let spec = spec(&db, 1, "{size: 200, target: 0, pause: 30ms}", "");
    let mut first = spawn(db.dir.path(), "first", &[], &spec);
    let fpid = first.child.id();
    first
        .wait_until(
            "the first runner to claim",
            Duration::from_secs(60),
            Duration::from_millis(10),
            async || owned_by(&owners(&c).await, fpid),
        )
        .await;
    // With or without --workers: the spec's limit is one worker.
    for args in [&[][..], &["--workers", "1"][..]] {
        let second = spawn(db.dir.path(), "second", args, &spec);
        let (code, out, err) = second.finish(Duration::from_secs(60)).await;
        assert_eq!(code, 75, "second runner {args:?}:\n{out}\n{err}");
        assert!(
            format!("{out}{err}").contains("1 worker(s), the job's `workers` limit"),
            "{out}\n{err}"
        );
    }
    assert!(!first.exited(), "the first runner must still be working");
    let (code, out, err) = first.finish(Duration::from_secs(120)).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(keys_in_summary(&out), ROWS as u64, "{out}");
    copy_done_exactly_once(&c, ROWS).await;
    // Only the first runner ever held the job's range.
    let held_by: Vec<String> = c
        .query("SELECT owner FROM backfill.ranges WHERE job = 'copy'", &[])
        .await
        .unwrap()
        .iter()
        .filter_map(|r| r.get::<_, Option<String>>(0))
        .collect();
    assert!(
        held_by.iter().all(|o| o.contains(&format!(":{fpid}/"))),
        "{held_by:?}"
    );

    drop(c);
    db.drop_db().await;
}

/// One of two runner processes finishes the job (every range done, exit 0) while the other,
/// which joined for the last range, idles with nothing to claim; that one is then stopped
/// (SIGTERM, 75). The job's record said `stopped` from then on, whoever wrote last winning:
/// `status` showed a finished job as stopped and a directory `run` did not skip it. A job
/// concluded done stays done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_stopped_after_another_finished_the_job_leaves_it_done() {
    let db = TestDb::new("stopafterdone").await;
    let c = db.client().await;
    tables(&c, 8000).await;
    let spec = spec(&db, 2, "{size: 100, target: 0, pause: 20ms}", "");
    let mut a = runner(db.dir.path(), "a", &spec);
    a.wait_until(
        "all but the last range done",
        Duration::from_secs(60),
        Duration::from_millis(10),
        async || {
            let store = "SELECT count(*) FROM pg_tables
                          WHERE schemaname = 'backfill' AND tablename = 'ranges'";
            count(&c, store).await > 0
                && count(&c, "SELECT count(*) FROM backfill.ranges").await > 1
                && count(
                    &c,
                    "SELECT count(*) FILTER (WHERE status = 'done') - count(*) + 1
                       FROM backfill.ranges WHERE job = 'copy'",
                )
                .await
                    >= 0
        },
    )
    .await;
    let b = runner(db.dir.path(), "b", &spec);
    let (code, out, err) = a.finish(Duration::from_secs(60)).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = b.stop(Duration::from_secs(30)).await;
    // 75: it had joined the job (one that found it done would have left with 0).
    assert_eq!(code, 75, "{out}\n{err}");
    let j = job_row(&c, "copy").await.expect("the job's record");
    assert_eq!(j.status, "done", "{j:?}");
    copy_done_exactly_once(&c, 8000).await;
    drop(c);
    db.drop_db().await;
}

/// The copy of `src`'s 150,000 rows with 4 workers: cut into at least 8 ranges, every row
/// once.
async fn four_workers_share_ranges(db: TestDb, c: tokio_postgres::Client) {
    let spec = spec(&db, 4, "{size: 5000, target: 0}", "");
    let (code, out, err) = common::run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    let ranges = count(
        &c,
        "SELECT count(*) FROM backfill.ranges WHERE job = 'copy'",
    )
    .await;
    assert!(ranges >= 8, "{ranges} range(s)");
    copy_done_exactly_once(&c, 150000).await;
    drop(c);
    db.drop_db().await;
}

/// A partitioned table has neither pages of its own nor statistics (autovacuum never analyzes
/// a partitioned parent): it was cut into a single range, and three of four workers sat idle.
/// Its size is now its partitions'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_is_cut_into_ranges_for_its_workers() {
    let db = TestDb::new("partranges").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE src (id bigint PRIMARY KEY, v int) PARTITION BY RANGE (id);
         CREATE TABLE src_a PARTITION OF src FOR VALUES FROM (MINVALUE) TO (50001);
         CREATE TABLE src_b PARTITION OF src FOR VALUES FROM (50001) TO (100001);
         CREATE TABLE src_c PARTITION OF src FOR VALUES FROM (100001) TO (MAXVALUE);
         INSERT INTO src SELECT g, g % 97 FROM generate_series(1, 150000) g;
         ANALYZE src_a; ANALYZE src_b; ANALYZE src_c;
         CREATE TABLE dst (id bigint, v int);",
    )
    .await
    .unwrap();
    four_workers_share_ranges(db, c).await;
}

/// A plain table nobody has analyzed yet (just loaded): no histogram, so the ranges come from
/// a block sample sized by the table's pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanalyzed_table_is_cut_into_ranges_for_its_workers() {
    let db = TestDb::new("rawranges").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE src (id bigint PRIMARY KEY, v int) WITH (autovacuum_enabled = false);
         INSERT INTO src SELECT g, g % 97 FROM generate_series(1, 150000) g;
         CREATE TABLE dst (id bigint, v int);",
    )
    .await
    .unwrap();
    four_workers_share_ranges(db, c).await;
}
