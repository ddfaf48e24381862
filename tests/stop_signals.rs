//! Stopping early at a batch boundary: SIGTERM, `--max-runtime`, `limits.max_runtime`. Each exits
//! 75 with the checkpoint matching the data exactly, says how to resume, and a later run finishes
//! with every row done exactly once.

mod common;
use common::runner::{Running, run_to_end, spawn, wait_runner_sessions_gone};
use common::store::{JobRow, job_row};
use common::{TestDb, checksum, count};
use std::time::Duration;
use tokio_postgres::Client;

/// `src(id, v)` with `rows` rows and an empty, unconstrained `dst(id, v)`: a batch applied twice
/// shows as duplicate ids in `dst`.
async fn copy_tables(c: &Client, rows: i64) {
    c.batch_execute(&format!(
        "CREATE TABLE src (id bigint PRIMARY KEY, v int);
         INSERT INTO src SELECT g, (g * 13) % 997 FROM generate_series(1, {rows}) g;
         CREATE TABLE dst (id bigint, v int);
         ANALYZE src;"
    ))
    .await
    .unwrap();
}

fn copy_spec(name: &str, batch: &str, extra: &str) -> String {
    format!(
        "name: {name}
postgres:
  url: $URL
  table: src
  key: id
  statement: INSERT INTO dst SELECT id, v FROM src WHERE id = ANY($1)
batch: {batch}
{extra}"
    )
}

/// Wait (bounded) until the job has committed at least `n` batches.
async fn wait_batches(c: &Client, job: &str, n: i64, r: &mut Running) {
    r.wait_until(
        &format!("{n} batches"),
        Duration::from_secs(30),
        Duration::from_millis(10),
        async || job_row(c, job).await.is_some_and(|j| j.batches_done >= n),
    )
    .await;
}

/// The state after a stop: `stopped`, not finished, and exactly the checkpointed keys in `dst`.
async fn assert_stopped_consistent(c: &Client, job: &str, total: i64) -> JobRow {
    let j = job_row(c, job).await.expect("job recorded");
    assert_eq!(j.status, "stopped", "{j:?}");
    // At most every key (a stop can land after the last batch, before the walk is closed).
    assert!(j.keys_done <= total, "more keys than rows: {j:?}");
    assert_eq!(
        count(c, "SELECT count(*) FROM dst").await,
        j.keys_done,
        "rows in dst differ from the checkpoint: a batch was half-applied or lost ({j:?})"
    );
    assert_eq!(j.rows_done, j.keys_done, "{j:?}");
    assert_eq!(
        count(c, "SELECT count(*) - count(DISTINCT id) FROM dst").await,
        0,
        "duplicates"
    );
    j
}

/// Exactly once: `dst` is a copy of `src` and the job is done with every key counted once.
async fn assert_exactly_once(c: &Client, job: &str, total: i64) {
    assert_eq!(
        count(c, "SELECT count(*) FROM dst").await,
        total,
        "rows lost or doubled"
    );
    assert_eq!(
        count(c, "SELECT count(DISTINCT id) FROM dst").await,
        total,
        "duplicates"
    );
    assert_eq!(checksum(c, "dst").await, checksum(c, "src").await);
    let j = job_row(c, job).await.expect("job recorded");
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.keys_done, total, "{j:?}");
    assert_eq!(j.rows_done, total, "{j:?}");
    assert_eq!(j.last_error, None, "{j:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_at_a_batch_boundary_and_resumes() {
    const ROWS: i64 = 20_000;
    let db = TestDb::new("sigterm").await;
    let c = db.client().await;
    copy_tables(&c, ROWS).await;
    let spec = db.spec(
        "sigterm.yaml",
        &copy_spec("sigterm-job", "{size: 100, target: 0, pause: 20ms}", ""),
    );

    let mut r = spawn(db.dir.path(), "first", &[], &spec);
    wait_batches(&c, "sigterm-job", 3, &mut r).await;
    let (code, out, err) = r.stop(Duration::from_secs(30)).await;
    let all = format!("{out}\n{err}");
    assert_eq!(code, 75, "exit code after SIGTERM:\n{all}");
    assert!(
        all.contains("SIGTERM"),
        "output does not say why it stopped:\n{all}"
    );
    assert!(
        all.contains("stop"),
        "output does not say it stopped:\n{all}"
    );
    assert!(
        all.contains("run again"),
        "output does not say how to resume:\n{all}"
    );
    assert!(
        out.contains("sigterm-job: stopped"),
        "summary on stdout:\n{out}"
    );
    let j = assert_stopped_consistent(&c, "sigterm-job", ROWS).await;
    assert!(j.batches_done >= 3, "{j:?}");
    assert!(
        j.last_error
            .as_deref()
            .is_some_and(|e| e.contains("SIGTERM")),
        "store does not say why it stopped: {j:?}"
    );

    let out = run_to_end(&spec, "resume");
    assert!(out.contains("sigterm-job: done"), "{out}");
    assert_exactly_once(&c, "sigterm-job", ROWS).await;

    drop(c);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_exits_at_once_and_rolls_the_open_batch_back() {
    const ROWS: i64 = 3_000;
    let db = TestDb::new("sigterm2").await;
    let c = db.client().await;
    copy_tables(&c, ROWS).await;
    // Each batch's statement runs for a while, so the second signal arrives mid-batch.
    let spec = db.spec(
        "sigterm2.yaml",
        "name: sigterm-twice
postgres:
  url: $URL
  table: src
  key: id
  statement: INSERT INTO dst SELECT s.id, s.v FROM src s, pg_sleep(0.3) WHERE s.id = ANY($1)
batch: {size: 100, target: 0}
",
    );
    let mut r = spawn(db.dir.path(), "first", &[], &spec);
    wait_batches(&c, "sigterm-twice", 1, &mut r).await;
    r.sigterm();
    tokio::time::sleep(Duration::from_millis(50)).await;
    if !r.exited() {
        r.sigterm();
    }
    let (code, out, err) = r.finish(Duration::from_secs(30)).await;
    assert_eq!(code, 75, "exit code after two SIGTERMs:\n{out}\n{err}");

    // Wait for the server to notice the client is gone and roll back whatever was open.
    wait_runner_sessions_gone(&c).await;
    let j = job_row(&c, "sigterm-twice").await.expect("job recorded");
    assert!(j.keys_done < ROWS, "{j:?}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM dst").await,
        j.keys_done,
        "{j:?}"
    );
    // The process died before it could record how it ended: status says what is true, that
    // nobody is running it, not `running`.
    let (code, out, _) = common::run(&[&"status", &spec]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("sigterm-twice  [stopped]"), "{out}");

    let out = run_to_end(&spec, "resume");
    assert!(out.contains("sigterm-twice: done"), "{out}");
    assert_exactly_once(&c, "sigterm-twice", ROWS).await;

    drop(c);
    db.drop_db().await;
}

/// The second signal's "the open batch is rolled back" must be true once the process is gone:
/// Postgres does not notice a closed socket while a statement runs, so a batch in a long
/// statement kept running on the server, its rows locked, until the statement ended (here 30
/// s) or hit statement_timeout. The exit now cancels the statements in flight first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_leaves_no_statement_running_and_no_row_locked() {
    let db = TestDb::new("sigterm2locks").await;
    let c = db.client().await;
    copy_tables(&c, 1_000).await;
    let spec = db.spec(
        "slow.yaml",
        "name: slow-statement
postgres:
  url: $URL
  table: src
  key: id
  statement: |
    WITH s AS (SELECT pg_sleep(30))
    UPDATE src SET v = v + 1 FROM s WHERE src.id = ANY($1)
batch: {size: 100, target: 0}
limits: {statement_timeout: 120s}
",
    );
    let mut r = spawn(db.dir.path(), "first", &[], &spec);
    // The first batch's statement is running (asleep) on the server.
    r.wait_until(
        "the first batch's statement to run",
        Duration::from_secs(60),
        Duration::from_millis(50),
        async || {
            count(
                &c,
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND state = 'active'
                    AND query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid()",
            )
            .await
                > 0
        },
    )
    .await;
    r.sigterm();
    tokio::time::sleep(Duration::from_millis(200)).await;
    r.sigterm();
    let (code, out, err) = r.finish(Duration::from_secs(20)).await;
    assert_eq!(code, 75, "{out}\n{err}");
    // Right after the exit (well before the statement's own 30 s), nothing of the run is
    // running and every row can be locked at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let running = count(
        &c,
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND query LIKE '%pg_sleep(30)%'
            AND state = 'active' AND pid <> pg_backend_pid()",
    )
    .await;
    assert_eq!(running, 0, "the batch still runs on the server\n{err}");
    c.batch_execute(
        "SET lock_timeout = '2s'; UPDATE src SET v = v WHERE id <= 100; RESET lock_timeout",
    )
    .await
    .expect("the batch's rows are free");
    drop(c);
    db.drop_db().await;
}

/// Slow enough to take well over 3 s: 100 batches, each followed by a 50 ms pause.
const SLOW_ROWS: i64 = 2_000;
const SLOW_BATCH: &str = "{size: 20, target: 0, pause: 50ms}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_runtime_flag_stops_with_75_and_a_plain_run_finishes() {
    let db = TestDb::new("maxrt_flag").await;
    let c = db.client().await;
    copy_tables(&c, SLOW_ROWS).await;
    let spec = db.spec("maxrt.yaml", &copy_spec("maxrt-flag", SLOW_BATCH, ""));

    let r = spawn(db.dir.path(), "first", &["--max-runtime", "1s"], &spec);
    let (code, out, err) = r.finish(Duration::from_secs(30)).await;
    let all = format!("{out}\n{err}");
    assert_eq!(code, 75, "exit code at the deadline:\n{all}");
    assert!(
        all.contains("max runtime"),
        "output does not say why it stopped:\n{all}"
    );
    assert!(
        all.contains("run again"),
        "output does not say how to resume:\n{all}"
    );
    assert_stopped_consistent(&c, "maxrt-flag", SLOW_ROWS).await;

    let out = run_to_end(&spec, "resume");
    assert!(out.contains("maxrt-flag: done"), "{out}");
    assert_exactly_once(&c, "maxrt-flag", SLOW_ROWS).await;

    drop(c);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_runtime_in_spec_stops_each_run_and_runs_resume_to_the_end() {
    let db = TestDb::new("maxrt_spec").await;
    let c = db.client().await;
    copy_tables(&c, SLOW_ROWS).await;
    let spec = db.spec(
        "maxrt_spec.yaml",
        &copy_spec("maxrt-spec", SLOW_BATCH, "limits: {max_runtime: 1s}\n"),
    );

    let r = spawn(db.dir.path(), "first", &[], &spec);
    let (code, out, err) = r.finish(Duration::from_secs(30)).await;
    let all = format!("{out}\n{err}");
    assert_eq!(code, 75, "exit code at the spec's deadline:\n{all}");
    assert!(
        all.contains("max runtime"),
        "output does not say why it stopped:\n{all}"
    );
    assert!(
        all.contains("run again"),
        "output does not say how to resume:\n{all}"
    );
    let mut last = assert_stopped_consistent(&c, "maxrt-spec", SLOW_ROWS).await;
    assert!(last.keys_done < SLOW_ROWS, "not stopped early: {last:?}");

    // Each later run also stops after about a second; together they finish the job.
    let mut runs = 1;
    loop {
        runs += 1;
        assert!(
            runs <= 40,
            "job not done after 40 runs of 1s each: {last:?}"
        );
        let r = spawn(db.dir.path(), &format!("run{runs}"), &[], &spec);
        let (code, out, err) = r.finish(Duration::from_secs(30)).await;
        match code {
            0 => {
                assert!(out.contains("maxrt-spec: done"), "{out}");
                break;
            }
            75 => {
                let j = assert_stopped_consistent(&c, "maxrt-spec", SLOW_ROWS).await;
                assert!(
                    j.keys_done >= last.keys_done,
                    "checkpoint went back: {last:?} -> {j:?}"
                );
                last = j;
            }
            other => panic!("run {runs} exited {other}:\n{out}\n{err}"),
        }
    }
    assert!(
        runs >= 3,
        "the 1s limit did not stop a later run: finished on run {runs}"
    );
    assert_exactly_once(&c, "maxrt-spec", SLOW_ROWS).await;

    drop(c);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_after_a_stopped_run() {
    let db = TestDb::new("status_json").await;
    let c = db.client().await;
    copy_tables(&c, SLOW_ROWS).await;
    let spec = db.spec(
        "status_json.yaml",
        &copy_spec("status-json", SLOW_BATCH, ""),
    );

    // Before any run: no record yet.
    let (code, out, err) = common::run(&[&"status", &"--json", &spec]);
    assert_eq!(code, 0, "{out}{err}");
    let doc: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}:\n{out}"));
    assert_eq!(doc["jobs"][0]["status"], "pending", "{doc:#}");

    let mut r = spawn(db.dir.path(), "first", &["--max-runtime", "20s"], &spec);
    wait_batches(&c, "status-json", 2, &mut r).await;
    let (code, out, err) = r.stop(Duration::from_secs(30)).await;
    assert_eq!(code, 75, "{out}\n{err}");
    let j = assert_stopped_consistent(&c, "status-json", SLOW_ROWS).await;

    let (code, out, err) = common::run(&[&"status", &"--json", &spec]);
    assert_eq!(code, 0, "{out}{err}");
    let doc: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}:\n{out}"));
    let jobs = doc["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no jobs array:\n{doc:#}"));
    assert_eq!(jobs.len(), 1, "{doc:#}");
    let e = &jobs[0];
    assert_eq!(e["job"], "status-json", "{doc:#}");
    assert_eq!(e["status"], "stopped", "{doc:#}");
    let cursor = e["cursor"]
        .as_str()
        .unwrap_or_else(|| panic!("no cursor:\n{doc:#}"));
    assert_eq!(Some(cursor), j.cursor.as_deref(), "{doc:#}");
    let cursor: i64 = cursor
        .parse()
        .unwrap_or_else(|_| panic!("cursor is not a key: {cursor}"));
    assert_eq!(
        cursor, j.keys_done,
        "cursor of a gap-free 1..N key after {j:?}"
    );
    assert_eq!(e["keys_done"].as_i64(), Some(j.keys_done), "{doc:#}");
    assert_eq!(e["batches_done"].as_i64(), Some(j.batches_done), "{doc:#}");
    assert!(e["database"].is_string(), "{doc:#}");
    // Every key of one job's object appears once (duplicate JSON keys are ambiguous to parsers).
    let text_keys: Vec<&str> = out
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix('"')?
                .split_once("\":")
                .map(|(k, _)| k)
        })
        .collect();
    let mut dedup = text_keys.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(
        dedup.len(),
        text_keys.len(),
        "duplicate keys in status --json:\n{out}"
    );

    drop(c);
    db.drop_db().await;
}

/// Whether process `pid` has a handler for SIGTERM (bit 15 of `SigCgt` in /proc/<pid>/status).
fn catches_sigterm(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << 14) != 0)
}

/// SIGTERM while `run` still loads the specs of a directory is a stop like any other: exit 75,
/// no job started, and the next run does the work. The signal handler was installed only after
/// loading, so such a SIGTERM killed the process with the default action (exit 143, nothing
/// said), and a stop asked for before a job began did not keep it from starting.
#[tokio::test]
async fn sigterm_while_the_specs_load_starts_no_job() {
    let db = TestDb::new("sigload").await;
    let c = db.client().await;
    copy_tables(&c, 500).await;
    let dir = db.dir.path().join("specs");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("a.yaml"),
        copy_spec("sigload", "{size: 50, target: 0}", "").replace("$URL", &db.url),
    )
    .unwrap();
    // Enough specs that loading them takes a while (each is parsed and checked).
    for i in 0..3000 {
        std::fs::write(
            dir.join(format!("b{i:04}.yaml")),
            copy_spec(&format!("filler{i}"), "{size: 50}", "").replace("$URL", &db.url),
        )
        .unwrap();
    }
    let mut r = spawn(db.dir.path(), "loading", &[], &dir);
    let pid = r.child.id();
    r.wait_until(
        "the SIGTERM handler",
        Duration::from_secs(30),
        Duration::from_millis(1),
        async || catches_sigterm(pid),
    )
    .await;
    let (code, out, err) = r.stop(Duration::from_secs(120)).await;
    // The list of specs not tried is long: the first lines say what happened.
    let head: String = format!("{out}\n{err}").chars().take(600).collect();
    assert_eq!(code, 75, "{head}");
    assert!(out.contains("sigload: not started"), "{head}");
    assert_eq!(count(&c, "SELECT count(*) FROM dst").await, 0, "{head}");
    // The next run does the work, every row once.
    let spec = db.dir.path().join("specs").join("a.yaml");
    run_to_end(&spec, "the run after the stop");
    assert_exactly_once(&c, "sigload", 500).await;
    db.drop_db().await;
}

/// SIGTERM while `run` waits for a server that accepted the connection and never answers (a
/// hung proxy, a server stuck in recovery) is a stop like any other: exit 75 at once, not a
/// failure after the connect's timeout (exit 1 pages as a failed job). Nothing was written:
/// connecting, reading the job's state and preflight come before its first write. Postgres and
/// ClickHouse alike.
#[tokio::test]
async fn sigterm_while_connecting_stops_with_75() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    {
        let accepted = accepted.clone();
        std::thread::spawn(move || {
            // Held, never answered, until the test process ends.
            let mut held = Vec::new();
            for s in listener.incoming().flatten() {
                held.push(s);
                accepted.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let specs = [
        (
            "pg.yaml",
            format!(
                "name: hung-pg
postgres:
  url: postgres://postgres@127.0.0.1:{port}/db
  table: t
  key: id
  statement: UPDATE t SET v = 1 WHERE id = ANY($1)
"
            ),
        ),
        (
            "ch.yaml",
            format!(
                "name: hung-ch
clickhouse:
  url: http://127.0.0.1:{port}/db
  source: ev
  time_column: ran_at
  chunks: [day]
  target: out
  statement: INSERT INTO {{target}} SELECT * FROM ev WHERE {{chunk}}
"
            ),
        ),
    ];
    for (file, yaml) in specs {
        let spec = dir.path().join(file);
        std::fs::write(&spec, yaml).unwrap();
        let before = accepted.load(Ordering::SeqCst);
        let mut r = spawn(dir.path(), file, &[], &spec);
        let pid = r.child.id();
        r.wait_until(
            "the connection to the server that never answers",
            Duration::from_secs(30),
            Duration::from_millis(10),
            async || catches_sigterm(pid) && accepted.load(Ordering::SeqCst) > before,
        )
        .await;
        let (code, out, err) = r.stop(Duration::from_secs(60)).await;
        assert_eq!(code, 75, "{file}:\n{out}\n{err}");
        assert!(
            out.contains("not started") && format!("{out}{err}").contains("SIGTERM"),
            "{file}:\n{out}\n{err}"
        );
    }
}
