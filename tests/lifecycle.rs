//! A job's life across runs: skipped once done, a changed spec reported and left alone until
//! `--rerun`, directories in file-name order, `status --json`, `reset`, and one runner at a time.

mod common;
use common::runner::{Running, spawn, wait_runner_sessions_gone};
use common::store::{has_store, job_record, job_row};
use common::{TestDb, checksum, count, make_table, run};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_postgres::Client;

fn spec_text(statement: &str, batch: &str) -> String {
    format!(
        "postgres:
  url: $URL
  table: t
  key: id
  statement: {statement}
batch: {batch}
"
    )
}

/// keys_done of job `job` while its status is `running` (0 before the store exists).
async fn running_keys(c: &Client) -> i64 {
    job_row(c, "job")
        .await
        .filter(|j| j.status == "running")
        .map_or(0, |j| j.keys_done)
}

/// Start `run spec` of a slow job in the background, logging to files in the test's dir, and
/// wait (bounded) until its job shows as running with a few batches committed.
async fn start_slow(db: &TestDb, spec: &Path, c: &Client) -> Running {
    let mut runner = spawn(db.dir.path(), "runner", &[], spec);
    runner
        .wait_until(
            "the job to show as running",
            Duration::from_secs(30),
            Duration::from_millis(50),
            async || running_keys(c).await >= 30,
        )
        .await;
    runner
}

/// Backends of this database (not the whole server) working for job `job`.
async fn job_backends(c: &Client) -> Vec<i32> {
    c.query(
        "SELECT pid FROM pg_stat_activity
          WHERE application_name = 'backfill:job' AND datname = current_database()",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Whether backend `pid` holds an advisory lock in this database.
async fn holds_advisory_lock_here(c: &Client, pid: i32) -> bool {
    count(
        c,
        &format!(
            "SELECT count(*) FROM pg_locks
              WHERE locktype = 'advisory' AND granted AND pid = {pid}
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
    )
    .await
        > 0
}

/// The pid in "... already being run by backend pid N ...".
fn holder_pid(err: &str) -> i32 {
    err.split("backend pid ")
        .nth(1)
        .and_then(|rest| rest.split(|ch: char| !ch.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no holder pid in:\n{err}"))
}

fn status_json(path: &dyn AsRef<std::ffi::OsStr>) -> serde_json::Value {
    let (code, out, err) = run(&[&"status", &"--json", path]);
    assert_eq!(code, 0, "status --json\nstdout:\n{out}\nstderr:\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{out}"))
}

#[tokio::test]
async fn finished_job_is_skipped_changed_spec_left_alone_until_rerun() {
    let db = TestDb::new("lc_skip").await;
    let c = db.client().await;
    make_table(&c, 1000).await;
    let batch = "{size: 100, target: 0}";
    let spec = db.spec(
        "job.yaml",
        &spec_text("UPDATE t SET n = n + 1 WHERE id = ANY($1)", batch),
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("1 run, 0 skipped"), "{out}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, 1000);
    let table = checksum(&c, "t").await;
    let record = job_record(&c, "job").await;

    // Done: skipped, nothing touched, not even the checkpoint.
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("0 run, 1 skipped"), "{out}");
    assert!(out.contains("job: skipped (already done)"), "{out}");
    assert!(!out.contains("spec changed"), "{out}");
    assert_eq!(checksum(&c, "t").await, table);
    assert_eq!(job_record(&c, "job").await, record);

    // Batch settings are how, not what: changing them is not a changed spec.
    db.spec(
        "job.yaml",
        &spec_text(
            "UPDATE t SET n = n + 1 WHERE id = ANY($1)",
            "{size: 7, target: 0}",
        ),
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("0 run, 1 skipped") && !out.contains("spec changed"),
        "{out}\n{err}"
    );

    // A changed statement is reported, and the finished job is left alone.
    db.spec(
        "job.yaml",
        &spec_text("UPDATE t SET n = n + 10 WHERE id = ANY($1)", batch),
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("spec changed"),
        "want the change reported on stdout:\n{out}"
    );
    assert!(out.contains("--rerun"), "want the way out named:\n{out}");
    assert!(out.contains("0 run, 1 skipped"), "{out}");
    assert_eq!(
        checksum(&c, "t").await,
        table,
        "a finished job with a changed spec ran"
    );
    assert_eq!(job_record(&c, "job").await, record);
    let doc = status_json(&spec);
    assert_eq!(
        doc["jobs"][0]["spec_changed"],
        serde_json::json!(true),
        "{doc}"
    );
    let (code, out, _) = run(&[&"status", &spec]);
    assert_eq!(code, 0);
    assert!(out.contains("spec changed"), "{out}");

    // --rerun runs it again from the start, with fresh counters.
    let (code, out, err) = run(&[&"run", &"--rerun", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("1 run, 0 skipped"), "{out}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 11").await, 1000);
    let row = c
        .query_one(
            &format!("SELECT status, cursor, keys_done, rows_done, batches_done FROM {} WHERE job = 'job'", common::store::JOB_VIEW),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "done");
    assert_eq!(row.get::<_, Option<&str>>(1), Some("1000"));
    assert_eq!(row.get::<_, i64>(2), 1000);
    assert_eq!(row.get::<_, i64>(3), 1000);
    assert_eq!(row.get::<_, i64>(4), 10);

    // The new spec is now the finished one: skipped without a warning.
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("0 run, 1 skipped") && !out.contains("spec changed"),
        "{out}"
    );
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 11").await, 1000);
    drop(c);
    db.drop_db().await;
}

#[tokio::test]
async fn directory_runs_in_file_name_order_and_status_json() {
    let db = TestDb::new("lc_dir").await;
    let c = db.client().await;
    // a fills `filled` from `src`; b marks what a filled; c handles only what b marked.
    c.batch_execute(
        "CREATE TABLE src (id int PRIMARY KEY);
         INSERT INTO src SELECT generate_series(1, 450);
         CREATE TABLE filled (id int PRIMARY KEY, b_done bool NOT NULL DEFAULT false,
                              c_done bool NOT NULL DEFAULT false);",
    )
    .await
    .unwrap();
    let dir = db.dir.path().join("jobs");
    std::fs::create_dir(&dir).unwrap();
    let write = |file: &str, table: &str, extra: &str, statement: &str| {
        let yaml = format!(
            "postgres:
  url: {}
  table: {table}
  key: id
{extra}  statement: {statement}
batch: {{size: 100, target: 0}}
",
            db.url
        );
        std::fs::write(dir.join(file), yaml).unwrap();
    };
    // Written out of order, and with a name (0010) that sorts wrongly as a number of digits.
    write(
        "0002_b.yaml",
        "filled",
        "",
        "UPDATE filled SET b_done = true WHERE id = ANY($1)",
    );
    write(
        "0010_c.yaml",
        "filled",
        "  where: b_done\n",
        "UPDATE filled SET c_done = true WHERE id = ANY($1)",
    );
    write(
        "0001_a.yaml",
        "src",
        "",
        "INSERT INTO filled (id) SELECT id FROM src WHERE id = ANY($1)",
    );
    std::fs::write(dir.join("README.txt"), "not a spec").unwrap();

    // Never run: every job pending, in file-name order.
    let doc = status_json(&dir);
    let jobs = doc["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no jobs array: {doc}"));
    let names: Vec<&str> = jobs.iter().map(|j| j["job"].as_str().unwrap()).collect();
    assert_eq!(names, ["0001_a", "0002_b", "0010_c"], "{doc}");
    for j in jobs {
        assert_eq!(j["status"], "pending", "{j}");
        assert!(j["cursor"].is_null(), "{j}");
        assert!(j["spec"].as_str().unwrap().ends_with(".yaml"), "{j}");
        assert!(j["database"].as_str().unwrap().ends_with(&db.name), "{j}");
    }

    let (code, out, err) = run(&[&"run", &dir]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let pos = |job: &str| {
        out.find(&format!("{job}: done"))
            .unwrap_or_else(|| panic!("no summary line for {job}:\n{out}"))
    };
    assert!(
        pos("0001_a") < pos("0002_b") && pos("0002_b") < pos("0010_c"),
        "order:\n{out}"
    );
    assert!(out.contains("3 run, 0 skipped"), "{out}");
    assert_eq!(count(&c, "SELECT count(*) FROM filled").await, 450);
    assert_eq!(
        count(&c, "SELECT count(*) FROM filled WHERE b_done AND c_done").await,
        450,
        "b or c ran too early"
    );

    let doc = status_json(&dir);
    let jobs = doc["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 3, "{doc}");
    for j in jobs {
        assert_eq!(j["status"], "done", "{j}");
        assert_eq!(j["cursor"], "450", "{j}");
        assert_eq!(j["keys_done"], 450, "{j}");
        assert_eq!(j["rows_done"], 450, "{j}");
        assert_eq!(j["batches_done"], 5, "{j}");
        assert_eq!(j["rows_pending_retry"], 0, "{j}");
        assert_eq!(j["spec_changed"], false, "{j}");
        assert!(j["finished_at"].is_string(), "{j}");
    }
    // The document names every key once per object (a duplicate would be read differently
    // by different JSON parsers).
    let (_, raw, _) = run(&[&"status", &"--json", &dir]);
    let units: usize = jobs
        .iter()
        .map(|j| j["units"].as_array().map_or(0, |u| u.len()))
        .sum();
    assert_eq!(
        raw.matches("\"job\":").count(),
        3,
        "\"job\" repeated in:\n{raw}"
    );
    assert_eq!(
        raw.matches("\"status\":").count(),
        3 + units,
        "\"status\" repeated in:\n{raw}"
    );

    // All done: the whole directory is skipped.
    let (code, out, err) = run(&[&"run", &dir]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("0 run, 3 skipped"), "{out}");
    assert_eq!(count(&c, "SELECT count(*) FROM filled").await, 450);
    drop(c);
    db.drop_db().await;
}

#[tokio::test]
async fn reset_asks_for_yes_and_then_forgets_the_checkpoint() {
    let db = TestDb::new("lc_reset").await;
    let c = db.client().await;
    make_table(&c, 500).await;
    let spec = db.spec(
        "job.yaml",
        &spec_text(
            "UPDATE t SET n = n + 1 WHERE id = ANY($1)",
            "{size: 100, target: 0}",
        ),
    );
    // Nothing to forget yet, and nothing created by looking.
    let (code, out, err) = run(&[&"reset", &"--yes", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("no checkpoint to delete"), "{out}");
    assert!(!has_store(&c).await, "reset created the checkpoint store");

    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    let record = job_record(&c, "job").await;
    assert!(record.is_some());

    let (code, out, err) = run(&[&"reset", &spec]);
    assert_eq!(code, 2, "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(
        job_record(&c, "job").await,
        record,
        "reset without --yes changed the checkpoint"
    );
    // The ClickHouse-only flag is refused for a Postgres job, and changes nothing.
    let (code, out, err) = run(&[&"reset", &"--yes", &"--discard-foreign-rows", &spec]);
    assert_eq!(code, 2, "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("ClickHouse jobs"), "{err}");
    assert_eq!(job_record(&c, "job").await, record);
    let (code, out, _) = run(&[&"run", &spec]);
    assert_eq!(code, 0);
    assert!(out.contains("0 run, 1 skipped"), "{out}");

    let (code, out, err) = run(&[&"reset", &"--yes", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("checkpoint deleted"), "{out}");
    assert_eq!(job_record(&c, "job").await, None);
    assert_eq!(status_json(&spec)["jobs"][0]["status"], "pending");

    // The next run starts from the beginning: every row gets its second update.
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("1 run, 0 skipped"), "{out}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 2").await, 500);
    assert_eq!(
        count(
            &c,
            &format!(
                "SELECT keys_done FROM {} WHERE job = 'job'",
                common::store::JOB_VIEW
            )
        )
        .await,
        500
    );
    drop(c);
    db.drop_db().await;
}

#[tokio::test]
async fn back_to_back_commands_are_not_refused_by_a_runner_that_has_exited() {
    // Scripts run `backfill run` and `backfill reset` one after the other. Once a command has
    // exited it holds nothing: the next one must never be told the job "is already being run".
    let db = TestDb::new("lc_b2b").await;
    let c = db.client().await;
    make_table(&c, 100).await;
    let spec = db.spec(
        "job.yaml",
        &spec_text(
            "UPDATE t SET n = n + 1 WHERE id = ANY($1)",
            "{size: 100, target: 0}",
        ),
    );
    const ROUNDS: i64 = 40;
    for round in 1..=ROUNDS {
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(
            code, 0,
            "round {round}: run\nstdout:\n{out}\nstderr:\n{err}"
        );
        assert!(out.contains("1 run, 0 skipped"), "round {round}: {out}");
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(
            code, 0,
            "round {round}: second run\nstdout:\n{out}\nstderr:\n{err}"
        );
        assert!(out.contains("0 run, 1 skipped"), "round {round}: {out}");
        let (code, out, err) = run(&[&"reset", &"--yes", &spec]);
        assert_eq!(
            code, 0,
            "round {round}: reset\nstdout:\n{out}\nstderr:\n{err}"
        );
    }
    assert_eq!(
        count(&c, &format!("SELECT count(*) FROM t WHERE n = {ROUNDS}")).await,
        100
    );
    drop(c);
    db.drop_db().await;
}

#[tokio::test]
async fn second_runner_is_refused_while_the_first_holds_the_job() {
    let db = TestDb::new("lc_lock").await;
    let c = db.client().await;
    make_table(&c, 2000).await;
    // 200 batches with a 100ms pause: the first runner is busy for 20s unless stopped.
    let spec = db.spec(
        "job.yaml",
        &spec_text(
            "UPDATE t SET n = n + 1 WHERE id = ANY($1)",
            "{size: 10, target: 0, pause: 100ms}",
        ),
    );
    let first = start_slow(&db, &spec, &c).await;
    let pids = job_backends(&c).await;
    assert!(
        !pids.is_empty(),
        "no backend of this database with application_name backfill:job"
    );

    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 75, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("job: not started"), "{out}");
    let pid = holder_pid(&err);
    assert!(
        pids.contains(&pid),
        "pid {pid} is not one of this database's backfill:job backends {pids:?}"
    );
    assert!(
        holds_advisory_lock_here(&c, pid).await,
        "pid {pid} holds no advisory lock in the job's database"
    );
    assert!(
        err.contains("backfill:job"),
        "want the holder's application_name in:\n{err}"
    );

    // reset is refused as well while the job runs.
    let (code, out, err) = run(&[&"reset", &"--yes", &spec]);
    assert_eq!(
        code, 75,
        "reset under a running job\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(
        job_record(&c, "job").await.is_some(),
        "reset deleted a running job's checkpoint"
    );

    // Stop the first runner (SIGTERM to the process we started): it ends at a batch boundary.
    let (code, first_out, first_err) = first.stop(Duration::from_secs(30)).await;
    assert_eq!(
        code, 75,
        "first runner after SIGTERM\nstdout:\n{first_out}\nstderr:\n{first_err}"
    );
    assert!(first_out.contains("SIGTERM"), "{first_out}");
    let row = c
        .query_one(
            &format!(
                "SELECT status, cursor, keys_done FROM {} WHERE job = 'job'",
                common::store::JOB_VIEW
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "stopped");
    let cursor: i64 = row
        .get::<_, Option<&str>>(1)
        .expect("cursor")
        .parse()
        .unwrap();
    assert_eq!(row.get::<_, i64>(2), cursor);
    assert!(
        cursor < 2000,
        "SIGTERM should have stopped it early (cursor {cursor})"
    );
    assert_eq!(
        count(
            &c,
            &format!("SELECT count(*) FROM t WHERE id <= {cursor} AND n = 1")
        )
        .await,
        cursor
    );
    assert_eq!(
        count(
            &c,
            &format!("SELECT count(*) FROM t WHERE id > {cursor} AND n <> 0")
        )
        .await,
        0
    );

    // Nobody holds the job now: the next run resumes and finishes.
    db.spec(
        "job.yaml",
        &spec_text(
            "UPDATE t SET n = n + 1 WHERE id = ANY($1)",
            "{size: 100, target: 0}",
        ),
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains(&format!("starting after key {cursor}")),
        "{err}"
    );
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, 2000);
    assert_eq!(
        count(
            &c,
            &format!(
                "SELECT keys_done FROM {} WHERE job = 'job'",
                common::store::JOB_VIEW
            )
        )
        .await,
        2000
    );
    drop(c);
    db.drop_db().await;
}

#[tokio::test]
async fn lock_holder_named_is_in_the_jobs_own_database() {
    // Jobs with the same name run in other databases of the same server: their runners hold
    // the "same" advisory lock, each in its own database. A refused runner must name the
    // holder in its own database, not one of theirs.
    let spec_yaml = spec_text(
        "UPDATE t SET n = n + 1 WHERE id = ANY($1)",
        "{size: 10, target: 0, pause: 100ms}",
    );
    let mut others = Vec::new();
    for i in 0..3 {
        let other = TestDb::new(&format!("lc_holder_o{i}")).await;
        let oc = other.client().await;
        make_table(&oc, 2000).await;
        let spec = other.spec("job.yaml", &spec_yaml);
        let runner = start_slow(&other, &spec, &oc).await;
        others.push((other, oc, runner));
    }
    let db = TestDb::new("lc_holder").await;
    let c = db.client().await;
    make_table(&c, 2000).await;
    let spec = db.spec("job.yaml", &spec_yaml);
    let mine = start_slow(&db, &spec, &c).await;
    let pids = job_backends(&c).await;

    for attempt in 0..3 {
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(
            code, 75,
            "attempt {attempt}\nstdout:\n{out}\nstderr:\n{err}"
        );
        let pid = holder_pid(&err);
        assert!(
            pids.contains(&pid) && holds_advisory_lock_here(&c, pid).await,
            "attempt {attempt}: named pid {pid}, but the job's runner in this database is one of \
             {pids:?}:\n{err}"
        );
    }

    let (code, _, err) = mine.stop(Duration::from_secs(30)).await;
    assert_eq!(code, 75, "{err}");
    for (other, oc, runner) in others {
        let (code, _, err) = runner.stop(Duration::from_secs(30)).await;
        assert_eq!(code, 75, "{err}");
        drop(oc);
        other.drop_db().await;
    }
    drop(c);
    db.drop_db().await;
}

/// stdout is a pipe whose reader has gone (`| head`, a log shipper that died): the output is
/// lost, nothing else. `println!` panicked there (exit 101, a backtrace), and `run dir/` died
/// after the first job's summary, the second job never started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_loses_the_output_and_nothing_else() {
    let db = TestDb::new("lc_pipe").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE a (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
         CREATE TABLE b (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO a (id) SELECT generate_series(1, 300);
         INSERT INTO b (id) SELECT generate_series(1, 300);",
    )
    .await
    .unwrap();
    let dir = db.dir.path().join("jobs");
    std::fs::create_dir(&dir).unwrap();
    for t in ["a", "b"] {
        let yaml = format!(
            "postgres:\n  url: {}\n  table: {t}\n  key: id\n  \
             statement: UPDATE {t} SET v = v + 1 WHERE id = ANY($1)\n\
             batch: {{size: 100, target: 0}}\n",
            db.url
        );
        std::fs::write(dir.join(format!("{t}.yaml")), yaml).unwrap();
    }
    let closed = |args: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut child = common::backfill()
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before anything is written.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = closed(&[&"run", &dir]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("panic"), "{err}");
    for t in ["a", "b"] {
        let n = count(&c, &format!("SELECT count(*) FROM {t} WHERE v = 1")).await;
        assert_eq!(n, 300, "table {t}: {err}");
    }
    let (code, err) = closed(&[&"status", &dir]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("panic"), "{err}");
    // `status --watch | head -1`: once nobody reads, watching ends (it redrew for ever).
    let mut watch = common::backfill()
        .args(["status", "--watch", "--interval", "200ms"])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    drop(watch.stdout.take());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = watch.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = watch.kill();
            panic!("status --watch went on with nobody reading its output");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    drop(c);
    db.drop_db().await;
}

/// A runner whose ranges are all done and that is still in its final `verify:` (no worker of
/// it left, so it shows as stopped) must not mark the job done over a `--rerun` that started it
/// over meanwhile. The stale `done` hid a rerun that stopped early (exit 75, "run again to
/// resume"): the next run skipped the job, and the rows the rerun had not reached were never
/// done again. And a `--rerun` that came while the verify ran did nothing (its `done` exit 0).
/// Now the rerun starts over, the stale runner's `done` is refused (exit 75), and the next run
/// finishes the rerun: every row twice, none once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_verify_does_not_mark_a_rerun_done() {
    // Each batch takes 0.1 s, so a rerun with --max-runtime 1s stops part-way.
    let (db, c, spec, stale) = stale_runner_in_verify("stale_done", "0.1").await;
    // The operator reruns the job; the rerun stops part-way.
    let (code, out, err) = run(&[&"run", &"--rerun", &"--max-runtime", &"1s", &spec]);
    assert_eq!(code, 75, "rerun:\n{out}\n{err}");
    let twice = count(&c, "SELECT count(*) FROM t WHERE n = 2").await;
    assert!(
        twice > 0 && twice < 2000,
        "the rerun stopped part-way: {twice}"
    );
    // The stale verify answers 0: its `done` is refused.
    c.batch_execute("SELECT pg_advisory_unlock(42)")
        .await
        .unwrap();
    let (code, out, err) = stale.finish(Duration::from_secs(60)).await;
    assert_eq!(code, 75, "stale run:\n{out}\n{err}");
    assert!(err.contains("started over"), "{err}");
    assert_ne!(job_row(&c, "job").await.unwrap().status, "done");
    // The next run resumes the rerun to the end.
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "resume:\n{out}\n{err}");
    assert!(!out.contains("skipped (already done)"), "{out}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n = 2").await,
        2000,
        "every row done again by the rerun, exactly once"
    );
    drop(c);
    db.drop_db().await;
}

/// The stale runner's `done` (above) and a `--rerun`'s start meeting head-on: the rerun's start
/// transaction has reset the job and made its new ranges, and is still open, when the stale
/// runner's verify answers. Waiting on the job's row alone, the stale `done` went through once
/// the start committed (READ COMMITTED re-checks the row but read the ranges with the snapshot
/// from before the start), and the rerun, killed later, was skipped as done by the next run.
/// The start is held open here by a trigger on the store's ranges that waits for a lock the
/// test holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_done_waits_for_a_rerun_starting_meanwhile() {
    let (db, c, spec, mut stale) = stale_runner_in_verify("stale_start", "0.2").await;
    // A rerun's start that stays open once it has made its ranges (lock 43, the test's).
    c.batch_execute(
        "SELECT pg_advisory_lock(43);
         CREATE FUNCTION backfill.hold() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN PERFORM pg_advisory_xact_lock(43); RETURN NULL; END $$;
         CREATE TRIGGER hold AFTER INSERT ON backfill.ranges
           FOR EACH STATEMENT EXECUTE FUNCTION backfill.hold();",
    )
    .await
    .unwrap();
    let mut rerun = spawn(db.dir.path(), "rerun", &["--rerun"], &spec);
    rerun
        .wait_until(
            "the rerun's start held open",
            Duration::from_secs(60),
            Duration::from_millis(50),
            async || waiting_for(&c, 43).await,
        )
        .await;
    // The stale verify answers 0; its `done` waits for the start (on the job's start lock,
    // or, before, on the job's row).
    c.batch_execute("SELECT pg_advisory_unlock(42)")
        .await
        .unwrap();
    stale
        .wait_until(
            "the stale runner's done waiting",
            Duration::from_secs(60),
            Duration::from_millis(20),
            async || {
                !waiting_for(&c, 42).await
                    && count(
                        &c,
                        "SELECT count(*) FROM pg_locks
                          WHERE NOT granted AND NOT (locktype = 'advisory' AND objid IN (42, 43))",
                    )
                    .await
                        > 0
            },
        )
        .await;
    c.batch_execute("SELECT pg_advisory_unlock(43)")
        .await
        .unwrap();
    let (code, out, err) = stale.finish(Duration::from_secs(60)).await;
    assert_eq!(code, 75, "stale run:\n{out}\n{err}");
    assert!(err.contains("started over"), "{err}");
    // The rerun dies part-way; the next run resumes it to the end.
    rerun.kill();
    wait_runner_sessions_gone(&c).await;
    c.batch_execute("DROP TRIGGER hold ON backfill.ranges; DROP FUNCTION backfill.hold()")
        .await
        .unwrap();
    assert_ne!(job_row(&c, "job").await.unwrap().status, "done");
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "resume:\n{out}\n{err}");
    assert!(!out.contains("skipped (already done)"), "{out}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n = 2").await,
        2000,
        "every row done again by the rerun, exactly once"
    );
    drop(c);
    db.drop_db().await;
}

/// A job over `t` (2000 rows, each batch of 100 sleeping `sleep` seconds) whose first run did
/// every batch and now waits in its `verify:` for advisory lock 42, which the test holds until
/// it lets go with `pg_advisory_unlock(42)`: the database, a client, the spec and that run.
async fn stale_runner_in_verify(name: &str, sleep: &str) -> (TestDb, Client, PathBuf, Running) {
    let db = TestDb::new(name).await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT generate_series(1, 2000);
         ANALYZE t;",
    )
    .await
    .unwrap();
    let spec = db.spec(
        "job.yaml",
        &format!(
            "postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET n = n + 1 FROM pg_sleep({sleep}) s WHERE id = ANY($1)
  verify: SELECT count(*) FROM t, (SELECT pg_advisory_xact_lock_shared(42)) g WHERE n = 0
batch: {{size: 100, target: 0}}
limits: {{lock_timeout: 60s, statement_timeout: 120s}}
"
        ),
    );
    c.batch_execute("SELECT pg_advisory_lock(42)")
        .await
        .unwrap();
    let mut stale = spawn(db.dir.path(), "stale", &[], &spec);
    stale
        .wait_until(
            "the first run's verify waiting",
            Duration::from_secs(60),
            Duration::from_millis(50),
            async || waiting_for(&c, 42).await,
        )
        .await;
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, 2000);
    (db, c, spec, stale)
}

/// Whether a session waits for advisory lock `key` (an int8 key, as `pg_advisory_lock(key)`).
async fn waiting_for(c: &Client, key: i64) -> bool {
    let sql = format!(
        "SELECT count(*) FROM pg_locks
          WHERE locktype = 'advisory' AND NOT granted AND classid = 0 AND objid = {key}
            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    );
    count(c, &sql).await > 0
}
