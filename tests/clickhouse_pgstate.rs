//! ClickHouse jobs whose state lives in Postgres (`clickhouse.state_url`), each test on both
//! ClickHouse servers (`ch_test!`): the records in `backfill.clickhouse_chunks` and, once the
//! job is done, nothing of its state in ClickHouse; the runner's lock a session advisory lock
//! besides the target's own lock table (a killed runner's lock goes with its session, and its
//! lock table is taken over at once on its host, so the next run starts at once; a second
//! runner exits 75 naming the holder; another job on the target is refused); losing the lock's
//! connection stops the run before anything more lands (on a private cluster, whose sessions
//! may be terminated);
//! runners of one job whose specs name different state stores still meet at the target's lock;
//! `plan` and `status` create nothing; the state URL's password never shows; spec errors.
//! Every test has a ClickHouse database and a Postgres database of its own, and asserts what
//! ends up in the target and in the records, never timings.

mod common;
use common::ch::{ChDb, ChServer};
use common::cluster::{ClusterOpts, PgCluster};
use common::days::build_days;
use common::proxy::{Fault, FaultProxy, Rule};
use common::runner::{in_own_pid_namespace, spawn, spawn_cmd, wait_runner_sessions_gone};
use common::{TestDb, path_str, run};
use std::path::PathBuf;
use std::time::Duration;
use tokio_postgres::Client;

const STATEMENT: &str = "INSERT INTO {target}
    SELECT project_id, test_case_id, countState(), sumState(duration_ms)
      FROM runs WHERE {chunk} GROUP BY project_id, test_case_id
";

/// A password that must never show in any output.
const SECRET: &str = "Pg-st4te-s3cret";

fn all_output(out: &str, err: &str) -> String {
    format!("--- stdout\n{out}--- stderr\n{err}")
}

/// A day-chunked job over `build_days` with its state at `state_url`.
fn job_spec(db: &ChDb, job: &str, state_url: &str, extra: &str) -> PathBuf {
    spec_file(db, job, job, Some(state_url), extra)
}

/// The job `job` in the file `file.yaml`, its state at `state_url` or else in ClickHouse.
fn spec_file(db: &ChDb, file: &str, job: &str, state_url: Option<&str>, extra: &str) -> PathBuf {
    let statement: String = STATEMENT.lines().map(|l| format!("    {l}\n")).collect();
    let state = state_url
        .map(|u| format!("  state_url: {u}\n"))
        .unwrap_or_default();
    db.spec(
        &format!("{file}.yaml"),
        &format!(
            "name: {job}
clickhouse:
  url: $URL
{state}  source: runs
  time_column: ran_at
  chunks: [day]
  target: agg
  statement: |
{statement}{extra}"
        ),
    )
}

fn target_digest(db: &ChDb) -> String {
    db.q(
        "SELECT count(), sum(c), sum(s), sum(cityHash64(project_id, test_case_id, c, s))
            FROM (SELECT project_id, test_case_id, countMerge(runs) AS c, sumMerge(total) AS s
                    FROM agg GROUP BY project_id, test_case_id)",
    )
}

fn source_digest(db: &ChDb) -> String {
    db.q(
        "SELECT count(), sum(c), sum(s), sum(cityHash64(project_id, test_case_id, c, s))
            FROM (SELECT project_id, test_case_id, count() AS c, sum(duration_ms) AS s
                    FROM runs GROUP BY project_id, test_case_id)",
    )
}

/// Source rows of the given days (`YYYY-MM-DD`).
fn rows_of_days(db: &ChDb, days: &[String]) -> u64 {
    if days.is_empty() {
        return 0;
    }
    let list: Vec<String> = days.iter().map(|d| format!("'{d}'")).collect();
    db.num(&format!(
        "SELECT count() FROM runs WHERE toString(toDate(ran_at)) IN ({})",
        list.join(", ")
    ))
}

/// The ClickHouse tables besides the source, the target, and the base, ledger and home mark the
/// job keeps next to the target.
fn other_tables(db: &ChDb) -> Vec<String> {
    db.tables()
        .into_iter()
        .filter(|t| !t.ends_with("_base") && !t.ends_with("_ledger") && !t.ends_with("_home"))
        .filter(|t| t != "runs" && t != "agg")
        .collect()
}

/// One record in Postgres: (chunk, status, source_rows, rows).
type PgRecord = (String, String, i64, i64);

/// The job's records in `backfill.clickhouse_chunks` (empty while the table does not exist).
async fn pg_records(c: &Client, job: &str) -> Vec<PgRecord> {
    let exists: bool = c
        .query_one(
            "SELECT to_regclass('backfill.clickhouse_chunks') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if !exists {
        return Vec::new();
    }
    c.query(
        "SELECT chunk, status, source_rows, rows FROM backfill.clickhouse_chunks
          WHERE job = $1 ORDER BY chunk",
        &[&job],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

/// The chunk records (without the job row and the flags) with status `status`.
async fn pg_chunks(c: &Client, job: &str, status: &str) -> Vec<String> {
    pg_records(c, job)
        .await
        .into_iter()
        .filter(|r| !r.0.is_empty() && !r.0.starts_with('#') && r.1 == status)
        .map(|r| r.0)
        .collect()
}

async fn schema_exists(c: &Client) -> bool {
    c.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'backfill')",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// `url` with `user:SECRET@` in place of its user (trust auth on the shared server ignores it).
fn with_password(url: &str) -> String {
    url.replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{SECRET}@"),
        1,
    )
}

fn assert_no_secret(what: &str, out: &str, err: &str) {
    assert!(
        !out.contains(SECRET) && !err.contains(SECRET),
        "{what} showed the state_url's password:\n{}",
        all_output(out, err)
    );
}

ch_test! {
    /// A job's clean-up cut short after its done record (a lost answer; a kill does the same)
    /// left it keeping the target in `clickhouse_targets`, and every other job on the target
    /// stopped with 75 for good. A keeper recorded done, with no runner left, frees it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_done_job_whose_clean_up_was_cut_short_frees_the_target(srv) {
        let db = ChDb::new_on(&srv, "pgcutshort");
        let pg = TestDb::new("chcutshort").await;
        build_days(&db, 4, 200);
        let reference = source_digest(&db);
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let lost = proxy.lose_staging_listing();
        let range = |from: &str, to: &str| format!("  from: {from}\n  to: {to}\n");
        let first = job_spec(&db, "first", &pg.url, "");
        let text = std::fs::read_to_string(&first).unwrap()
            .replace(&format!("  url: {}\n", db.url), &format!("  url: {}\n", proxy.url_for(&db.url)))
            .replace("  time_column: ran_at\n", &format!("  time_column: ran_at\n{}", range("2025-10-01", "2025-10-03")));
        std::fs::write(&first, text).unwrap();
        let (code, out, err) = run(&[&"run", &first]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert_eq!(proxy.rule_fired(lost), 4, "{all}");
        let kept: i64 = pg.client().await
            .query_one("SELECT count(*) FROM backfill.clickhouse_targets", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(kept, 1, "the first job still keeps the target: {all}");
        let second = job_spec(&db, "second", &pg.url, "");
        let text = std::fs::read_to_string(&second).unwrap()
            .replace("  time_column: ran_at\n", &format!("  time_column: ran_at\n{}", range("2025-10-03", "2025-10-05")));
        std::fs::write(&second, text).unwrap();
        let (code, out, err) = run(&[&"run", &second]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(err.contains("is done but still kept the target"), "{all}");
        assert_eq!(target_digest(&db), reference, "{all}");
        pg.drop_db().await;
    }
}

ch_test! {
    /// The same across stores: a job kept in ClickHouse, done with its clean-up cut short,
    /// left its lock table, and another job, kept in Postgres, asked its own store whether the
    /// first was done, did not find it, and stopped with 75 ("keeps the target until it is done
    /// or reset") for good. The done job now says so in the lock table first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_done_job_of_another_store_whose_clean_up_was_cut_short_frees_the_target(srv) {
        let db = ChDb::new_on(&srv, "cutshortstores");
        let pg = TestDb::new("chcutstores").await;
        build_days(&db, 4, 200);
        let reference = source_digest(&db);
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let lost = proxy.lose_staging_listing();
        let range = |from: &str, to: &str| format!("  from: {from}\n  to: {to}\n");
        let first = spec_file(&db, "first", "first", None, "");
        let text = std::fs::read_to_string(&first).unwrap()
            .replace(&format!("  url: {}\n", db.url), &format!("  url: {}\n", proxy.url_for(&db.url)))
            .replace("  time_column: ran_at\n", &format!("  time_column: ran_at\n{}", range("2025-10-01", "2025-10-03")));
        std::fs::write(&first, text).unwrap();
        let (code, out, err) = run(&[&"run", &first]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert_eq!(proxy.rule_fired(lost), 4, "{all}");
        assert!(
            db.tables().iter().any(|t| t.ends_with("__backfill_lock")),
            "the first job's lock table is left: {all}"
        );
        let second = job_spec(&db, "second", &pg.url, "");
        let text = std::fs::read_to_string(&second).unwrap()
            .replace("  time_column: ran_at\n", &format!("  time_column: ran_at\n{}", range("2025-10-03", "2025-10-05")));
        std::fs::write(&second, text).unwrap();
        let (code, out, err) = run(&[&"run", &second]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(err.contains("is done but still kept the target"), "{all}");
        assert_eq!(target_digest(&db), reference, "{all}");
        pg.drop_db().await;
    }
}

ch_test! {
    /// A done row in the lock table frees the target for other jobs at once, but a runner of
    /// the same job took it as a released lock and went in while the done runner was still
    /// cleaning up: dropping the job's staging tables and landings ledger, which the new runner
    /// makes again under the same names. A `--rerun` then ran the whole job beside that
    /// clean-up (exit 0). It now waits for the clean-up: exit 75 while the done runner, alive
    /// on this host, is at it; the run after it starts over cleanly.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rerun_of_the_same_job_waits_for_its_clean_up(srv) {
        let db = ChDb::new_on(&srv, "rerunclean");
        build_days(&db, 3, 200);
        let reference = source_digest(&db);
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let held = proxy.hold_staging_listing();
        let spec = spec_file(&db, "rerun", "rerun", None, "");
        let proxied = spec_file(&db, "rerun_proxied", "rerun", None, "");
        let text = std::fs::read_to_string(&proxied).unwrap().replace(
            &format!("  url: {}\n", db.url),
            &format!("  url: {}\n", proxy.url_for(&db.url)),
        );
        std::fs::write(&proxied, text).unwrap();
        let mut first = spawn(db.dir.path(), "first", &[], &proxied);
        first
            .wait_until(
                "the first run's clean-up to be held",
                Duration::from_secs(120),
                Duration::from_millis(20),
                async || proxy.rule_fired(held) >= 1,
            )
            .await;
        let (code, out, err) = run(&[&"run", &"--rerun", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 75, "{all}");
        assert!(err.contains("cleaning up after the job"), "{all}");
        proxy.release_held();
        let (code, out, err) = first.finish(Duration::from_secs(120)).await;
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert_eq!(target_digest(&db), reference);
        let (code, out, err) = run(&[&"run", &"--rerun", &spec]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert_eq!(target_digest(&db), reference, "{}", all_output(&out, &err));
        assert!(
            !db.tables()
                .iter()
                .any(|t| t.ends_with("__backfill_lock") || t.contains("__backfill_rerun_s_")),
            "the rerun cleaned up after itself: {:?}",
            db.tables()
        );
    }
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_to_done_with_its_state_in_postgres_and_none_in_clickhouse(srv) {
        let db = ChDb::new_on(&srv, "pgstate");
        let pg = TestDb::new("chstate").await;
        let c = pg.client().await;
        build_days(&db, 12, 1000);
        let reference = source_digest(&db);
        let url = with_password(&pg.url);
        assert!(url.contains(SECRET), "{url}");
        let spec = job_spec(&db, "pgs", &url, "");

        // Before the first run: validate, plan and status read, create and write nothing.
        for cmd in ["validate", "plan", "status"] {
            let (code, out, err) = run(&[&cmd, &spec]);
            assert_eq!(code, 0, "{cmd}: {}", all_output(&out, &err));
            assert_no_secret(cmd, &out, &err);
        }
        assert!(!schema_exists(&c).await, "plan/status created the state schema");
        assert_eq!(other_tables(&db), Vec::<String>::new(), "plan/status created tables");

        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert!(out.contains("pgs: done"), "{}", all_output(&out, &err));
        assert_no_secret("run", &out, &err);
        assert_eq!(target_digest(&db), reference);

        // The records are in Postgres, every chunk done once with its rows.
        let recs = pg_records(&c, "pgs").await;
        let job_row = recs.iter().find(|r| r.0.is_empty()).expect("job row");
        assert_eq!(job_row.1, "done", "{recs:?}");
        let done = pg_chunks(&c, "pgs", "done").await;
        assert_eq!(done.len(), 12, "{recs:?}");
        let source: i64 = recs.iter().filter(|r| !r.0.is_empty()).map(|r| r.2).sum();
        assert_eq!(source, 12_000, "{recs:?}");
        // Nothing of the job's state in ClickHouse: no backfill_chunks, no lock table.
        assert_eq!(other_tables(&db), Vec::<String>::new());
        // Done: the target is free (its keeper row is gone).
        let kept: i64 = c
            .query_one("SELECT count(*) FROM backfill.clickhouse_targets", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(kept, 0);

        // status and plan read the chunks from Postgres.
        let (code, out, err) = run(&[&"status", &"--json", &spec]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert_no_secret("status", &out, &err);
        let v: serde_json::Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("status --json: {e}: {out}"));
        let text = v.to_string();
        assert!(text.contains("\"done\""), "{text}");
        assert!(text.contains("2025-10-12"), "status shows the chunks: {text}");
        let (code, out, err) = run(&[&"plan", &spec]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert!(out.contains("done"), "{out}");
        // And a second run skips the done job.
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert!(out.contains("skipped"), "{out}");
        assert_eq!(target_digest(&db), reference);

        // A state URL that cannot connect: the error names it, without its password.
        let bad = job_spec(
            &db,
            "nodb",
            &with_password(&pg.url.replace(&pg.name, "no_such_db_here")),
            "",
        );
        for cmd in ["status", "run"] {
            let (code, out, err) = run(&[&cmd, &bad]);
            assert_ne!(code, 0, "{cmd}: {}", all_output(&out, &err));
            assert!(err.contains("no_such_db_here"), "{cmd}: {}", all_output(&out, &err));
            assert_no_secret(cmd, &out, &err);
        }
        drop(c);
        pg.drop_db().await;
    }
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill_9_then_an_immediate_run_resumes_and_lands_every_chunk_once(srv) {
        let db = ChDb::new_on(&srv, "pgkill");
        let pg = TestDb::new("chstate_kill").await;
        let c = pg.client().await;
        build_days(&db, 40, 2000);
        let reference = source_digest(&db);
        let spec = job_spec(&db, "killed", &pg.url, "");
        let mut done_before = 0;
        let mut kills = 0;
        for n in 0..4 {
            let mut r = spawn(db.dir.path(), &format!("run{n}"), &[], &spec);
            // Killed once more chunks are done than before, at a random moment after that.
            let want = done_before + 1;
            r.wait_until(
                "a chunk to be done",
                Duration::from_secs(120),
                Duration::from_millis(5),
                async || pg_chunks(&c, "killed", "done").await.len() >= want,
            )
            .await;
            tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 300)).await;
            if r.exited() {
                break;
            }
            r.kill();
            kills += 1;
            // A statement the runner sent just before it died still commits on the server:
            // read the records only once its sessions are gone.
            wait_runner_sessions_gone(&c).await;
            let done = pg_chunks(&c, "killed", "done").await;
            let staged = pg_chunks(&c, "killed", "staged").await;
            done_before = done.len();
            // What is recorded done is in the target; beyond it, at most the staged chunk.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let target = db.num("SELECT countMerge(runs) FROM agg");
            let (d, s) = (rows_of_days(&db, &done), rows_of_days(&db, &staged));
            assert!(staged.len() <= 1, "{staged:?}");
            assert!(
                target >= d && target <= d + s,
                "kill {n}: target {target} rows, done {d}, staged {s}"
            );
        }
        assert!(kills >= 2, "only {kills} runner(s) killed before the job was done");
        // The dead runner's lock went with its session: the next run starts right away and
        // finishes (a lock still held would make it exit 75).
        let r = spawn(db.dir.path(), "last", &[], &spec);
        let (code, out, err) = r.finish(Duration::from_secs(300)).await;
        assert_eq!(code, 0, "the run right after the kill:\n{}", all_output(&out, &err));
        assert_eq!(target_digest(&db), reference, "every chunk landed once");
        assert_eq!(pg_chunks(&c, "killed", "done").await.len(), 40);
        assert_eq!(other_tables(&db), Vec::<String>::new());
        db.q("OPTIMIZE TABLE agg FINAL");
        assert_eq!(target_digest(&db), reference);
        drop(c);
        pg.drop_db().await;
    }
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_runner_exits_75_naming_the_holder_and_another_job_is_refused(srv) {
        let db = ChDb::new_on(&srv, "pgtwo");
        let pg = TestDb::new("chstate_two").await;
        let c = pg.client().await;
        build_days(&db, 30, 2000);
        let reference = source_digest(&db);
        let first = job_spec(&db, "first", &pg.url, "");
        let mut r = spawn(db.dir.path(), "first", &[], &first);
        let pid = r.child.id();
        r.wait_until(
            "the first runner to land a chunk",
            Duration::from_secs(120),
            Duration::from_millis(10),
            async || !pg_chunks(&c, "first", "done").await.is_empty(),
        )
        .await;
        // The same job again: exit 75, naming the runner that holds it.
        let (code, out, err) = run(&[&"run", &first]);
        assert_eq!(code, 75, "{}", all_output(&out, &err));
        assert!(
            err.contains(&format!(":{pid}:")) && err.contains("backend pid"),
            "the holder (runner pid {pid}) is named: {}",
            all_output(&out, &err)
        );
        // Another job on the same target: refused while the first keeps it.
        let second = job_spec(&db, "second", &pg.url, "");
        let (code, out, err) = run(&[&"run", &second]);
        assert_eq!(code, 75, "{}", all_output(&out, &err));
        assert!(
            err.contains("job \"first\"") && err.contains("same target"),
            "{}",
            all_output(&out, &err)
        );
        assert!(pg_records(&c, "second").await.is_empty(), "the refused job wrote state");
        // `status` from another process sees the live runner through its lock.
        let (code, out, err) = run(&[&"status", &"--json", &first]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        if !r.exited() {
            assert!(out.contains("\"running\""), "{}", all_output(&out, &err));
        }
        let (code, out, err) = r.finish(Duration::from_secs(300)).await;
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert_eq!(target_digest(&db), reference);
        // Between runs of an unfinished job the target stays its own; once done it is free.
        let (code, out, err) = run(&[&"plan", &second]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        drop(c);
        pg.drop_db().await;
    }
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn losing_the_lock_connection_stops_the_run_before_anything_more_lands(srv) {
        let db = ChDb::new_on(&srv, "pglost");
        let cluster = PgCluster::start(ClusterOpts::new().password_role("bfstate", SECRET)).await;
        let pg = cluster.create_db("chstate_lost").await;
        let admin = cluster.admin().await;
        admin
            .batch_execute(&format!("ALTER DATABASE {} OWNER TO bfstate", pg.name))
            .await
            .unwrap();
        let state_url = format!(
            "postgres://bfstate:{SECRET}@{}/{}",
            cluster.host_port(),
            pg.name
        );
        let c = pg.client().await;
        build_days(&db, 40, 2000);
        let reference = source_digest(&db);
        let spec = job_spec(&db, "lost", &state_url, "");
        let mut r = spawn(db.dir.path(), "lost", &[], &spec);
        r.wait_until(
            "a chunk to be done",
            Duration::from_secs(120),
            Duration::from_millis(5),
            async || pg_chunks(&c, "lost", "done").await.len() >= 2,
        )
        .await;
        // End the session that holds the target's lock (and only it).
        let ended: i64 = c
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_locks
                  WHERE locktype = 'advisory' AND granted
                    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(ended, 1, "one session holds the target's lock");
        let (code, out, err) = r.finish(Duration::from_secs(120)).await;
        assert_eq!(code, 75, "{}", all_output(&out, &err));
        assert!(err.contains("lost its lock"), "{}", all_output(&out, &err));
        assert_no_secret("run", &out, &err);
        // Nothing landed beyond what is recorded: the done chunks, and at most the staged one.
        let done = pg_chunks(&c, "lost", "done").await;
        let staged = pg_chunks(&c, "lost", "staged").await;
        assert!(done.len() < 40, "the run went on to the end: {done:?}");
        let target = db.num("SELECT countMerge(runs) FROM agg");
        let (d, s) = (rows_of_days(&db, &done), rows_of_days(&db, &staged));
        assert!(staged.len() <= 1, "{staged:?}");
        assert!(
            target >= d && target <= d + s,
            "target {target} rows, done {d}, staged {s}: {}",
            all_output(&out, &err)
        );
        // The next run takes the lock again and finishes, every chunk once.
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert_no_secret("run", &out, &err);
        assert_eq!(target_digest(&db), reference);
        drop(c);
        drop(admin);
        cluster.stop().await;
    }
}

ch_test! {
    #[test]
    fn rerun_reset_and_a_dropped_state_table_land_every_chunk_once(srv) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let db = ChDb::new_on(&srv, "pgagain");
        let pg = rt.block_on(TestDb::new("chstate_again"));
        let c = rt.block_on(pg.client());
        build_days(&db, 10, 1000);
        let reference = source_digest(&db);
        let spec = job_spec(&db, "again", &pg.url, "workers: 2\n");
        let done = |what: &str| {
            let (code, out, err) = run(&[&"run", &"--rerun", &spec]);
            assert_eq!(code, 0, "{what}: {}", all_output(&out, &err));
            assert!(out.contains("by 2 workers"), "{what}: {}", all_output(&out, &err));
            assert_eq!(target_digest(&db), reference, "{what} lands every chunk once");
        };
        done("first run");
        done("--rerun");
        let (code, out, err) = run(&[&"reset", &"--yes", &spec]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert!(out.contains("restores"), "{out}");
        assert!(rt.block_on(pg_records(&c, "again")).is_empty(), "reset forgot the records");
        done("run after reset");
        rt.block_on(c.batch_execute("DROP TABLE backfill.clickhouse_chunks")).unwrap();
        done("run after the state table was dropped");
        assert_eq!(rt.block_on(pg_chunks(&c, "again", "done")).len(), 10);
        assert_eq!(other_tables(&db), Vec::<String>::new());
        drop(c);
        rt.block_on(pg.drop_db());
    }
}

fn spec_error(state_url: &str, text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.yaml");
    std::fs::write(
        &path,
        format!(
            "clickhouse:
  url: http://127.0.0.1:8123/db
  state_url: {state_url}
  source: runs
  time_column: ran_at
  target: agg
  statement: INSERT INTO {{target}} SELECT * FROM runs WHERE {{chunk}}
"
        ),
    )
    .unwrap();
    let (code, out, err) = run(&[&"validate", &path]);
    let all = all_output(&out, &err);
    assert_eq!(code, 2, "{state_url}: {all}");
    assert!(
        err.contains(&format!("{}:3:", path_str(&path))),
        "{state_url}: names the line: {all}"
    );
    assert!(err.contains("field `clickhouse.state_url`"), "{all}");
    assert!(err.contains(text), "want {text:?}: {all}");
    assert_no_secret("validate", &out, &err);
}

#[test]
fn spec_errors_in_state_url_name_the_field_and_hide_the_password() {
    spec_error(
        &format!("postgres:/u:{SECRET}@127.0.0.1:5432/state"),
        "postgres://",
    );
    spec_error(
        &format!("postgres://u:{SECRET}@127.0.0.1:5432"),
        "no database name",
    );
    spec_error(
        &format!("http://u:{SECRET}@127.0.0.1:5432/state"),
        "not a postgres:// URL",
    );
    spec_error(
        &format!("postgres://u:{SECRET}/x@127.0.0.1:5432/state"),
        "percent-encode",
    );
}

ch_test! {
    /// A job's state belongs to the target it landed in. The same spec run against another
    /// database with one shared `state_url` (staging and prod) found the job done and skipped
    /// it (exit 0, an empty target), or resumed another database's checkpoint and called the
    /// job done with most chunks never landed; and `target` edited mid-job split the rows
    /// across two tables. Both are refused (exit 2) before anything is written or skipped, and
    /// the spec that names the job's own target still finishes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_jobs_state_is_refused_for_another_target(srv) {
        let a = ChDb::new_on(&srv, "own_target_a");
        let b = ChDb::new_on(&srv, "own_target_b");
        let pg = TestDb::new("chowntarget").await;
        build_days(&a, 6, 200);
        build_days(&b, 6, 200);
        let spec_a = job_spec(&a, "shared", &pg.url, "");
        let (code, out, err) = run(&[&"run", &spec_a]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert_eq!(target_digest(&a), source_digest(&a));
        // The same spec against database b, the state shared.
        let spec_b = job_spec(&b, "shared", &pg.url, "");
        let empty = target_digest(&b);
        // (`status` says so for the job it cannot read, exit 1.)
        for (cmd, want) in [("run", 2), ("status", 1), ("reset", 2)] {
            let (code, out, err) = if cmd == "reset" {
                run(&[&cmd, &"--yes", &spec_b])
            } else {
                run(&[&cmd, &spec_b])
            };
            assert_eq!(code, want, "{cmd}: {}", all_output(&out, &err));
            assert!(
                err.contains("clickhouse.target") && err.contains("landed its chunks in"),
                "{cmd}: {}",
                all_output(&out, &err)
            );
        }
        assert_eq!(target_digest(&b), empty, "nothing landed in b");
        let (code, out, err) = run(&[&"status", &spec_a]);
        assert!(code == 0 && out.contains("[done]"), "a's job kept: {}", all_output(&out, &err));
        // Under a name of its own, b's job runs to the end.
        let own = job_spec(&b, "shared_b", &pg.url, "");
        let (code, out, err) = run(&[&"run", &own]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert_eq!(target_digest(&b), source_digest(&b));
        // `target` edited after the job landed: refused; the spec it ran with still works.
        let edited = std::fs::read_to_string(&spec_a)
            .unwrap()
            .replace("target: agg", "target: agg2");
        let spec_edited = a.dir.path().join("edited.yaml");
        std::fs::write(&spec_edited, edited).unwrap();
        let (code, out, err) = run(&[&"run", &spec_edited]);
        assert_eq!(code, 2, "{}", all_output(&out, &err));
        assert!(err.contains("agg2"), "{}", all_output(&out, &err));
        let (code, out, err) = run(&[&"run", &spec_a]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert!(out.contains("skipped (already done)"), "{}", all_output(&out, &err));
        pg.drop_db().await;
    }
}

ch_test! {
    /// The lock is the target's, whatever store keeps the state: a spec edited to add (or
    /// change) `state_url` while a runner of the old spec still runs must not start a second
    /// runner on the same target. Two did, each finding its own store free, and the job ended
    /// done with months missing from the target.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runners_with_different_state_stores_share_the_targets_lock(srv) {
        let db = ChDb::new_on(&srv, "pgmoved");
        let x = TestDb::new("chstate_movx").await;
        let y = TestDb::new("chstate_movy").await;
        let cy = y.client().await;
        build_days(&db, 30, 2000);
        let reference = source_digest(&db);
        let stores: [(&str, Option<&str>, Option<&str>); 3] = [
            ("in ClickHouse, then in Postgres", None, Some(&y.url)),
            ("in Postgres, then in ClickHouse", Some(&x.url), None),
            ("in two Postgres databases", Some(&x.url), Some(&y.url)),
        ];
        for (n, (what, first, second)) in stores.into_iter().enumerate() {
            db.q("TRUNCATE TABLE agg");
            let job = format!("moved{n}");
            let old = spec_file(&db, &format!("{job}_old"), &job, first, "");
            let new = spec_file(&db, &format!("{job}_new"), &job, second, "");
            let mut r = spawn(db.dir.path(), &job, &[], &old);
            r.wait_until(
                "the first runner to land a chunk",
                Duration::from_secs(120),
                Duration::from_millis(10),
                async || db.num("SELECT count() FROM agg") > 0,
            )
            .await;
            let (code, out, err) = run(&[&"run", &new]);
            let (done, dout, derr) = r.finish(Duration::from_secs(300)).await;
            assert_eq!(code, 75, "{what}: the second runner: {}", all_output(&out, &err));
            assert!(
                err.contains("runner"),
                "{what}: names the holder: {}",
                all_output(&out, &err)
            );
            assert_eq!(done, 0, "{what}: the first runner: {}", all_output(&dout, &derr));
            assert_eq!(target_digest(&db), reference, "{what}: every chunk once");
            if second.is_some_and(|u| u == y.url) {
                assert!(
                    pg_records(&cy, &job).await.is_empty(),
                    "{what}: the refused runner wrote state"
                );
            }
        }
        // Done: the target's lock is gone with the job, whatever the store.
        let locks: Vec<String> = db
            .tables()
            .into_iter()
            .filter(|t| t.contains("__backfill_lock"))
            .collect();
        assert_eq!(locks, Vec::<String>::new());
        drop(cy);
        x.drop_db().await;
        y.drop_db().await;
    }
}

/// Staging and prod: two servers whose database and table have the same names, the state in
/// one shared `state_url`. The records say `database.table`, not which server: prod's run found
/// the job done on staging and skipped it (exit 0, prod's target empty). Refused now (exit 2)
/// before anything is written or skipped: the job's record names the home mark staging noted
/// beside its target, and prod holds none. A reset from prod forgets staging's records (with a
/// warning): staging's next run restores its target and lands every chunk once more, never on
/// top of what it had landed. Under a name of its own, prod's job runs to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_state_is_refused_on_another_server_with_the_same_names() {
    let staging = ChDb::new_on(&ChServer::v18(), "twin_server");
    let prod = staging.same_name_on(&ChServer::current());
    let pg = TestDb::new("chtwinserver").await;
    build_days(&staging, 6, 200);
    build_days(&prod, 6, 200);
    let on_staging = job_spec(&staging, "shared", &pg.url, "");
    let (code, out, err) = run(&[&"run", &on_staging]);
    assert_eq!(code, 0, "{}", all_output(&out, &err));
    assert_eq!(target_digest(&staging), source_digest(&staging));
    let on_prod = job_spec(&prod, "shared", &pg.url, "");
    let empty = target_digest(&prod);
    for (cmd, want) in [("run", 2), ("status", 1)] {
        let (code, out, err) = run(&[&cmd, &on_prod]);
        assert_eq!(code, want, "{cmd}: {}", all_output(&out, &err));
        assert!(
            err.contains("clickhouse.url") && err.contains("holds no mark"),
            "{cmd}: {}",
            all_output(&out, &err)
        );
    }
    assert_eq!(target_digest(&prod), empty, "nothing landed on prod");
    let c = pg.client().await;
    assert_eq!(
        pg_chunks(&c, "shared", "done").await.len(),
        6,
        "staging's job kept"
    );
    let (code, out, err) = run(&[&"reset", &"--yes", &on_prod]);
    assert_eq!(code, 0, "{}", all_output(&out, &err));
    assert!(err.contains("forgetting them all the same"), "{err}");
    assert_eq!(
        target_digest(&prod),
        empty,
        "the reset changed nothing on prod"
    );
    let (code, out, err) = run(&[&"run", &on_staging]);
    assert_eq!(code, 0, "{}", all_output(&out, &err));
    assert_eq!(
        target_digest(&staging),
        source_digest(&staging),
        "staging's job started over without landing twice"
    );
    let (code, out, err) = run(&[&"run", &job_spec(&prod, "shared_prod", &pg.url, "")]);
    assert_eq!(code, 0, "{}", all_output(&out, &err));
    assert_eq!(target_digest(&prod), source_digest(&prod));
    drop(c);
    pg.drop_db().await;
}

/// The same, where prod's run started before staging's: it read no records (nothing to
/// refuse), and while its preflight was held (here: at a proxy) staging ran the job to the
/// end. Prod then took the lock (the same key: the same names) and staging's records for its
/// own: "done" with its target empty, and staging refused from then on, its mark replaced by
/// prod's. The check is made again once the lock is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_read_no_records_before_the_other_server_ran_is_refused_under_the_lock() {
    let staging = ChDb::new_on(&ChServer::v18(), "twin_late");
    let current = ChServer::current();
    let prod = staging.same_name_on(&current);
    let pg = TestDb::new("chtwinlate").await;
    build_days(&staging, 6, 200);
    build_days(&prod, 6, 200);
    let empty = target_digest(&prod);
    let proxy = FaultProxy::start_http(current.addr()).await;
    let held = proxy.add_rule(
        Rule::new(Fault::HoldUntilReleased)
            .matching(|r| {
                let t = r.text();
                t.contains("CREATE TABLE") && t.contains("_check_")
            })
            .nth(1),
    );
    let on_prod = job_spec(&prod, "shared", &pg.url, "");
    let text = std::fs::read_to_string(&on_prod).unwrap().replace(
        &format!("  url: {}\n", prod.url),
        &format!("  url: {}\n", proxy.url_for(&prod.url)),
    );
    std::fs::write(&on_prod, text).unwrap();
    let mut late = spawn(prod.dir.path(), "prod", &[], &on_prod);
    late.wait_until(
        "prod's preflight to be held",
        Duration::from_secs(60),
        Duration::from_millis(20),
        async || proxy.rule_fired(held) >= 1,
    )
    .await;
    let on_staging = job_spec(&staging, "shared", &pg.url, "");
    let (code, out, err) = run(&[&"run", &on_staging]);
    assert_eq!(code, 0, "{}", all_output(&out, &err));
    assert_eq!(target_digest(&staging), source_digest(&staging));
    proxy.release_held();
    let (code, out, err) = late.finish(Duration::from_secs(120)).await;
    assert_eq!(code, 2, "{}", all_output(&out, &err));
    assert!(err.contains("holds no mark"), "{}", all_output(&out, &err));
    assert_eq!(
        target_digest(&prod),
        empty,
        "nothing landed or skipped on prod"
    );
    let (code, out, err) = run(&[&"run", &on_staging]);
    assert_eq!(code, 0, "{}", all_output(&out, &err));
    assert!(
        out.contains("skipped"),
        "staging's job is still its own: {out}"
    );
    pg.drop_db().await;
}

/// The same, where prod had run part of the job itself before (here: with its state in
/// ClickHouse, while its source held one day): its ledger notes every partition of the target,
/// as any landed chunk would. Checking that a ledger exists, or that it notes the partitions
/// the records name, let prod's run through: "skipped (already done)", with one day of six in
/// prod's target. The home mark tells the runs apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_state_is_refused_on_a_server_that_ran_part_of_the_job_itself() {
    let staging = ChDb::new_on(&ChServer::v18(), "twin_part");
    let prod = staging.same_name_on(&ChServer::current());
    let pg = TestDb::new("chtwinpart").await;
    build_days(&staging, 6, 200);
    build_days(&prod, 1, 200);
    let (code, out, err) = run(&[&"run", &spec_file(&prod, "own", "shared", None, "")]);
    assert_eq!(code, 0, "{}", all_output(&out, &err));
    let one_day = target_digest(&prod);
    assert_eq!(one_day, source_digest(&prod));
    prod.q("DROP TABLE runs");
    common::days::build_runs(&prod, 6, 200);
    assert_eq!(source_digest(&prod), source_digest(&staging));
    let (code, out, err) = run(&[&"run", &job_spec(&staging, "shared", &pg.url, "")]);
    assert_eq!(code, 0, "{}", all_output(&out, &err));
    let on_prod = job_spec(&prod, "shared", &pg.url, "");
    let (code, out, err) = run(&[&"run", &on_prod]);
    assert_eq!(code, 2, "{}", all_output(&out, &err));
    assert!(err.contains("holds no mark"), "{}", all_output(&out, &err));
    assert_eq!(
        target_digest(&prod),
        one_day,
        "nothing landed or skipped on prod"
    );
    pg.drop_db().await;
}

ch_test! {
    /// A runner killed in another container (here: a pid namespace of its own) leaves the
    /// target's lock table with a fresh heartbeat. The next run exited 75 until that heartbeat
    /// was 30 s old, each try using up one of a Kubernetes Job's retries; it now waits,
    /// watching the heartbeat, takes over once the TTL has passed, and finishes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_next_run_after_a_kill_in_another_container_waits_and_takes_over(srv) {
        let db = ChDb::new_on(&srv, "pgotherns");
        let pg = TestDb::new("chstate_otherns").await;
        let c = pg.client().await;
        build_days(&db, 30, 2000);
        let reference = source_digest(&db);
        let spec = job_spec(&db, "otherns", &pg.url, "");
        let mut cmd = common::backfill();
        cmd.arg("run").arg(&spec);
        let mut a = spawn_cmd(db.dir.path(), "a", in_own_pid_namespace(&cmd));
        a.wait_until(
            "a chunk to be done",
            Duration::from_secs(120),
            Duration::from_millis(10),
            async || !pg_chunks(&c, "otherns", "done").await.is_empty(),
        )
        .await;
        a.kill();
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert_eq!(target_digest(&db), reference);
        drop(c);
        pg.drop_db().await;
    }
}
