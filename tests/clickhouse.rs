//! ClickHouse jobs against the real local servers, each test twice (`ch_test!`): `NAME::v18` on
//! 18.16 (127.0.0.1:8123, scripts/services.sh starts it) and `NAME::current` on a current release
//! (127.0.0.1:8124, scripts/clickhouse-current.sh). The memory-limit ladder month -> day ->
//! project on a skewed dataset, what a chunk that ran out of memory teaches the next ones, kill -9
//! at random moments, failures that leave no partial chunk in the target, transient errors
//! retried at the same size, errors that fail the job and the resume after the fix, `plan`, spec
//! errors, and password redaction.
//! Every test has a database of its own (`bf_ch_<hint>_<pid>_<rand>`, tests/common/ch.rs) and
//! asserts what ends up in the target and in `backfill_state`, never timings.

mod common;
use common::ch::{ChDb, Record};
use common::runner::spawn;
use common::skew::{BIG_MONTH, HEAVY_DAY, SKEW_K, build_skew};
use common::{path_str, run};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

// ------------------------------------------------------------------------------------------------
// The skewed dataset
// ------------------------------------------------------------------------------------------------

/// `max_memory_usage` of the skew tests, found with `scripts/ch-calibrate.sh`: it builds this
/// dataset (through `examples/ch_skew_data.rs`, which includes the same builder, so the data is exactly this) and
/// bisects the limit on the real server for the job's statement on every chunk the ladder runs,
/// with the engine's chunk predicates. On ClickHouse 18.16.1 (max_threads 1, so the peak does
/// not depend on thread scheduling) every normal month, every ordinary day of a big month and
/// both project halves of the heavy day pass from 23,655,736 bytes up; the heavy day and the big
/// months fail with 241 up to 38,792,704 (peaks without a limit: halves 23.6 MB, normal months
/// 23.5 MB, days 13-15 MB; heavy day 38.8 MB, big months 58.2 MB). The band is
/// [23,655,736, 38,792,704]; this is its middle. The peaks are a step apart because ClickHouse
/// grows a GROUP BY hash table 4x at a time: the halves' 98,304 keys fit in 2^18 cells, the
/// heavy day's 196,608 need 2^20.
const SKEW_LIMIT: u64 = 31_211_520;

/// The job's statement (scripts/ch-calibrate.sh runs the same one).
const SKEW_STATEMENT: &str = "INSERT INTO {target}
SELECT project_id, test_case_id, countState(), sumState(duration_ms)
  FROM runs WHERE {chunk} GROUP BY project_id, test_case_id
";

/// The spec file `file` of a skew job with `statement`, under SKEW_LIMIT.
fn skew_spec(db: &ChDb, file: &str, job: &str, statement: &str) -> PathBuf {
    db.spec(
        file,
        &format!(
            "name: {job}
clickhouse:
  url: $URL
  source: runs
  time_column: ran_at
  split_column: project_id
  target: agg
  settings: {{ max_memory_usage: {SKEW_LIMIT}, max_threads: 1 }}
  statement: |
{}",
            indent(statement, 4)
        ),
    )
}

fn indent(text: &str, by: usize) -> String {
    text.lines()
        .map(|l| format!("{}{l}\n", " ".repeat(by)))
        .collect()
}

/// Groups, total count, total sum and a hash over every group of the aggregate target `agg`
/// merged by key: `groups\tcount\tsum\thash`.
fn target_digest(db: &ChDb) -> String {
    db.q(
        "SELECT count(), sum(c), sum(s), sum(cityHash64(project_id, test_case_id, c, s))
            FROM (SELECT project_id, test_case_id, countMerge(runs) AS c, sumMerge(total) AS s
                    FROM agg GROUP BY project_id, test_case_id)",
    )
}

/// The same digest computed straight from the source, without any memory limit.
fn source_digest(db: &ChDb) -> String {
    db.q(
        "SELECT count(), sum(c), sum(s), sum(cityHash64(project_id, test_case_id, c, s))
            FROM (SELECT project_id, test_case_id, count() AS c, sum(duration_ms) AS s
                    FROM runs GROUP BY project_id, test_case_id)",
    )
}

fn by_chunk(records: Vec<Record>) -> BTreeMap<String, Record> {
    records.into_iter().map(|r| (r.chunk.clone(), r)).collect()
}

/// Days of a month that have rows in `runs`, as `YYYY-MM-DD`.
fn days_of(db: &ChDb, month: &str) -> Vec<String> {
    db.q(&format!(
        "SELECT DISTINCT toString(toDate(ran_at)) AS d FROM runs
          WHERE toStartOfMonth(ran_at) = toDate('{month}-01') ORDER BY d"
    ))
    .lines()
    .map(str::to_string)
    .collect()
}

fn all_output(out: &str, err: &str) -> String {
    format!("--- stdout\n{out}--- stderr\n{err}")
}

ch_test! {
    #[test]
    fn skewed_month_splits_by_day_then_by_project(srv) {
        let db = ChDb::new_on(&srv, "skew");
        build_skew(
            &|sql| {
                db.q(sql);
            },
            SKEW_K,
            false,
        );
        let reference = source_digest(&db);
        let spec = skew_spec(&db, "skew.yaml", "skew", SKEW_STATEMENT);

        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(out.contains("skew: done"), "{all}");
        assert!(
            err.contains(&format!(
                "splitting chunk {BIG_MONTH} into 31 day chunk(s): chunk {BIG_MONTH}: Code: 241"
            )),
            "{all}"
        );
        assert!(
            err.contains(&format!(
                "splitting chunk {HEAVY_DAY} into 2 split chunk(s): chunk {HEAVY_DAY}: Code: 241"
            )),
            "{all}"
        );
        assert_eq!(
            target_digest(&db),
            reference,
            "target merged by key (groups, count, sum, hash) differs from the source aggregated \
             without a limit"
        );

        let recs = by_chunk(db.chunks("skew"));
        let mut expected = vec![BIG_MONTH.to_string()];
        for m in ["2025-11", "2025-12", "2026-02", "2026-03", "2026-04"] {
            let r = &recs[m];
            assert_eq!(
                (
                    r.level.as_str(),
                    r.status.as_str(),
                    r.attempts,
                    r.source_rows,
                    r.rows
                ),
                ("month", "done", 1, 2 * SKEW_K, SKEW_K),
                "{r:?}"
            );
            expected.push(m.into());
        }
        let big = &recs[BIG_MONTH];
        assert_eq!(
            (big.level.as_str(), big.status.as_str(), big.attempts),
            ("month", "split", 1),
            "{big:?}"
        );
        assert_eq!(big.source_rows, 10 * SKEW_K, "{big:?}");
        assert!(big.error.contains("Code: 241"), "{big:?}");
        assert!(
            big.memory_bytes > SKEW_LIMIT,
            "the record keeps what the query would have used: {big:?}"
        );
        let days = days_of(&db, BIG_MONTH);
        assert_eq!(days.len(), 31);
        for d in &days {
            let r = &recs[d];
            expected.push(d.clone());
            if d == HEAVY_DAY {
                assert_eq!(
                    (
                        r.level.as_str(),
                        r.status.as_str(),
                        r.attempts,
                        r.source_rows
                    ),
                    ("day", "split", 1, 6 * SKEW_K),
                    "{r:?}"
                );
                assert!(r.error.contains("Code: 241"), "{r:?}");
            } else {
                assert_eq!(
                    (r.level.as_str(), r.status.as_str(), r.attempts),
                    ("day", "done", 1),
                    "{r:?}"
                );
            }
        }
        // The heavy day's 16 projects in two halves of 8, each done at the first attempt.
        let mut half_rows = 0;
        for g in ["project_id[0..8)", "project_id[8..16)"] {
            let id = format!("{HEAVY_DAY}/{g}");
            let r = &recs[&id];
            assert_eq!(
                (r.level.as_str(), r.status.as_str(), r.attempts),
                ("split", "done", 1),
                "{r:?}"
            );
            half_rows += r.source_rows;
            expected.push(id);
        }
        assert_eq!(half_rows, 6 * SKEW_K, "the halves cover the heavy day");
        expected.sort();
        let got: Vec<String> = recs.keys().cloned().collect();
        assert_eq!(got, expected, "one record per chunk run, nothing else");
        assert_eq!(db.record("skew", "").unwrap().status, "done");
        assert_eq!(
            db.tables(),
            ["agg", "backfill_state", "runs"],
            "no staging table left"
        );

        // A second run leaves the finished job alone.
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert!(
            out.contains("0 run, 1 skipped"),
            "{}",
            all_output(&out, &err)
        );
        assert_eq!(target_digest(&db), reference);
    }
}

ch_test! {
    #[test]
    fn a_chunk_not_smaller_than_one_that_failed_is_split_without_an_attempt(srv) {
        let db = ChDb::new_on(&srv, "learn");
        build_skew(
            &|sql| {
                db.q(sql);
            },
            SKEW_K,
            true,
        );
        let reference = source_digest(&db);
        // The second big month really would fail under the limit: splitting it is not a waste.
        db.q("CREATE TABLE probe AS agg");
        let month = "`ran_at` >= '2026-03-01 00:00:00' AND `ran_at` < '2026-04-01 00:00:00'";
        let alone = db.try_q_with(
            &SKEW_STATEMENT
                .replace("{target}", "probe")
                .replace("{chunk}", month),
            &[
                ("max_memory_usage", &SKEW_LIMIT.to_string()),
                ("max_threads", "1"),
            ],
        );
        assert!(
            alone.as_ref().is_err_and(|e| e.contains("Code: 241")),
            "2026-03 alone should exceed the limit: {alone:?}"
        );
        db.q("DROP TABLE probe");

        let spec = skew_spec(&db, "learn.yaml", "learn", SKEW_STATEMENT);
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert_eq!(target_digest(&db), reference);
        let recs = by_chunk(db.chunks("learn"));
        // The first big month (10K rows) ran out of memory at its attempt: the smallest month that
        // did. The second big month, as large, is not below it (a failure predicts chunks of its own
        // level only: the heavy day says nothing about months).
        let second = &recs["2026-03"];
        assert_eq!(
            (second.status.as_str(), second.attempts),
            ("split", 0),
            "split without an attempt: {second:?}"
        );
        assert!(
            second
                .error
                .contains(&format!("not below the {} rows", 10 * SKEW_K)),
            "{second:?}"
        );
        assert!(!second.error.contains("Code: 241"), "{second:?}");
        assert!(
            err.contains("splitting chunk 2026-03 into 31 day chunk(s)"),
            "{all}"
        );
        for d in days_of(&db, "2026-03") {
            let r = &recs[&d];
            assert_eq!((r.status.as_str(), r.attempts), ("done", 1), "{r:?}");
        }
        assert_eq!(
            (recs[BIG_MONTH].status.as_str(), recs[BIG_MONTH].attempts),
            ("split", 1)
        );
        assert_eq!(
            (recs[HEAVY_DAY].status.as_str(), recs[HEAVY_DAY].attempts),
            ("split", 1)
        );
        // Smaller chunks after the failure keep the fast path: one query each.
        for m in ["2025-11", "2025-12", "2026-02", "2026-04"] {
            let r = &recs[m];
            assert_eq!((r.status.as_str(), r.attempts), ("done", 1), "{r:?}");
        }
    }
}

// ------------------------------------------------------------------------------------------------
// kill -9
// ------------------------------------------------------------------------------------------------

/// `runs` and `agg` as in the skew tests, over `days` days from 2025-10-01 with `per_day` rows
/// each (3,000 test cases in 8 projects), and the target partitioned by `project_id % 4`: every
/// chunk lands in four partitions, one REPLACE PARTITION each.
fn build_days(db: &ChDb, days: u64, per_day: u64) {
    db.q(
        "CREATE TABLE runs (ran_at DateTime, project_id UInt32, test_case_id UInt64,
                             duration_ms UInt32)
          ENGINE = MergeTree PARTITION BY toYYYYMM(ran_at)
          ORDER BY (project_id, test_case_id, ran_at)",
    );
    db.q("CREATE TABLE agg (project_id UInt32, test_case_id UInt64,
                            runs AggregateFunction(count), total AggregateFunction(sum, UInt32))
          ENGINE = AggregatingMergeTree PARTITION BY project_id % 4
          ORDER BY (project_id, test_case_id)");
    db.q(&format!(
        "INSERT INTO runs
         SELECT toDateTime('2025-10-01 00:00:00') + intDiv(number, {per_day}) * 86400
                  + intHash32(number) % 86400,
                toUInt32(tc % 8 + 1), intHash32(number + 3) % 3000 AS tc,
                toUInt32(number % 1000)
           FROM numbers({})",
        days * per_day
    ));
}

/// Source rows of the given days (`YYYY-MM-DD`).
fn rows_of_days(db: &ChDb, days: &[&str]) -> u64 {
    if days.is_empty() {
        return 0;
    }
    let list: Vec<String> = days.iter().map(|d| format!("'{d}'")).collect();
    db.num(&format!(
        "SELECT count() FROM runs WHERE toString(toDate(ran_at)) IN ({})",
        list.join(", ")
    ))
}

/// Wait (bounded) until no query that names this database is running: a killed runner's last
/// query (an insert, a REPLACE PARTITION, a checkpoint write) may still finish on the server.
async fn quiesce(db: &ChDb) {
    let sql = format!(
        "SELECT count() FROM system.processes
          WHERE query LIKE '%{}%' AND query NOT LIKE '%system.processes%'",
        db.name
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while db.num(&sql) > 0 {
        assert!(
            Instant::now() < deadline,
            "queries of the killed runner still running after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Debug, Default)]
struct KillStats {
    kills: u32,
    /// A chunk was recorded `staged` (inserted into staging, not yet recorded done).
    staged: u32,
    /// ... and the target already held all of it (killed between the replace and `done`).
    landed_not_done: u32,
    /// ... and the target held part of it (killed between two partitions' replaces).
    partly_landed: u32,
    /// The target held rows beyond the chunks recorded done.
    target_ahead: u32,
    /// A run started right after a kill found the dead runner's lease and exited 75.
    lease_checked: bool,
}

/// After a kill: how far the target and the checkpoint each got. A chunk recorded done is always
/// in the target; without a staged chunk the target holds exactly the done chunks; with one, at
/// most that chunk's rows more. Then release the dead runner's lease (the first time it is
/// there, check that it keeps a new run out).
async fn after_kill(db: &ChDb, job: &str, pid: u32, stats: &mut KillStats) {
    quiesce(db).await;
    stats.kills += 1;
    let target = db.num("SELECT countMerge(runs) FROM agg");
    let recs = db.chunks(job);
    let done: Vec<&str> = recs
        .iter()
        .filter(|r| r.status == "done")
        .map(|r| r.chunk.as_str())
        .collect();
    let staged: Vec<&str> = recs
        .iter()
        .filter(|r| r.status == "staged")
        .map(|r| r.chunk.as_str())
        .collect();
    let done_rows = rows_of_days(db, &done);
    assert!(staged.len() <= 1, "more than one chunk staged: {recs:?}");
    assert!(
        target >= done_rows,
        "kill {}: the target ({target} rows) lacks chunks recorded done ({done_rows} rows)",
        stats.kills
    );
    let staged_rows = rows_of_days(db, &staged);
    assert!(
        target <= done_rows + staged_rows,
        "kill {}: the target ({target} rows) holds more than the done chunks ({done_rows}) and \
         the staged one ({staged:?}, {staged_rows})",
        stats.kills
    );
    if !staged.is_empty() {
        stats.staged += 1;
        if target == done_rows + staged_rows {
            stats.landed_not_done += 1;
        } else if target > done_rows {
            stats.partly_landed += 1;
        }
    }
    if target > done_rows {
        stats.target_ahead += 1;
    }
    eprintln!(
        "kill {}: {} chunks done, staged {staged:?}, target {target} rows = done {done_rows} + {}",
        stats.kills,
        done.len(),
        target - done_rows
    );
    let lease = db.record(job, "#lease").unwrap_or_default();
    let me = format!(":{pid}");
    if !stats.lease_checked && lease.runner.ends_with(&me) {
        // The dead runner's lease holds the job until it expires (30 s after its last renewal).
        let (code, out, err) = run(&[&"run", &db.dir.path().join(format!("{job}.yaml"))]);
        assert_eq!(code, 75, "{}", all_output(&out, &err));
        assert!(
            err.contains("already being run by runner") && err.contains(&me),
            "{}",
            all_output(&out, &err)
        );
        stats.lease_checked = true;
    }
    db.release_lease(job);
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill_9_at_random_moments_then_resume_lands_every_chunk_exactly_once(srv) {
        let db = ChDb::new_on(&srv, "kill");
        let days = 90;
        build_days(&db, days, 2000);
        let reference = source_digest(&db);
        let job = "killed";
        let spec = db.spec(
            &format!("{job}.yaml"),
            &format!(
                "name: {job}
clickhouse:
  url: $URL
  source: runs
  time_column: ran_at
  chunks: [day]
  target: agg
  statement: |
{}",
                indent(SKEW_STATEMENT, 4)
            ),
        );
        let mut stats = KillStats::default();
        let mut n = 0;
        // A run that is not killed must finish: exit 0.
        let finished = |code: i32, out: &str, err: &str, n: u32| {
            assert_eq!(
                code,
                0,
                "run {n}, resuming after a kill, did not finish:\n{}",
                all_output(out, err)
            );
        };
        // Random moments: from the start (connect, lease, preflight) to well into the chunks.
        while stats.kills < 8 {
            n += 1;
            let mut r = spawn(db.dir.path(), &format!("run{n}"), &[], &spec);
            let pid = r.child.id();
            let at = Duration::from_millis(100 + rand::random::<u64>() % 1100);
            let deadline = Instant::now() + at;
            while Instant::now() < deadline && !r.exited() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if r.exited() {
                let (code, out, err) = r.finish(Duration::from_secs(10)).await;
                finished(code, &out, &err, n);
                panic!(
                    "the job finished after {} kills; it should have taken more: {stats:?}",
                    stats.kills
                );
            }
            r.kill();
            eprintln!("run {n} killed after {at:?}");
            after_kill(&db, job, pid, &mut stats).await;
        }
        // Then inside the window between staging and landing: poll the checkpoint, kill as soon as
        // a chunk is recorded `staged` (it may be done by the time the signal lands: try again).
        for _ in 0..5 {
            if stats.staged > 0 && stats.lease_checked {
                break;
            }
            n += 1;
            let mut r = spawn(db.dir.path(), &format!("run{n}"), &[], &spec);
            let pid = r.child.id();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if r.exited() {
                    let (code, out, err) = r.finish(Duration::from_secs(10)).await;
                    finished(code, &out, &err, n);
                    panic!("the job finished before a kill in the staged window: {stats:?}");
                }
                assert!(Instant::now() < deadline, "no chunk staged within 60 s");
                if db.chunks(job).iter().any(|c| c.status == "staged") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            r.kill();
            eprintln!("run {n} killed with a chunk staged");
            after_kill(&db, job, pid, &mut stats).await;
        }
        // Resume to the end.
        n += 1;
        let r = spawn(db.dir.path(), &format!("run{n}"), &[], &spec);
        let (code, out, err) = r.finish(Duration::from_secs(300)).await;
        finished(code, &out, &err, n);
        eprintln!("kill window after {} kills: {stats:?}", stats.kills);
        assert!(stats.kills >= 5 && stats.staged >= 1 && stats.lease_checked);

        assert_eq!(
            target_digest(&db),
            reference,
            "target merged by key differs from the source"
        );
        let recs = db.chunks(job);
        assert_eq!(recs.len() as u64, days, "{recs:?}");
        assert!(
            recs.iter().all(|r| r.status == "done" && r.attempts >= 1),
            "{recs:?}"
        );
        assert_eq!(db.record(job, "").unwrap().status, "done");
        assert_eq!(db.tables(), ["agg", "backfill_state", "runs"]);
        // Merges of the target were restarted (a kill can leave them stopped): OPTIMIZE merges.
        db.q("OPTIMIZE TABLE agg FINAL");
        assert_eq!(target_digest(&db), reference);
    }
}

// ------------------------------------------------------------------------------------------------
// Failures
// ------------------------------------------------------------------------------------------------

/// `ev` (source: 3 days of `per_day` events from 2025-11-01, k = 0.. in time order within a
/// day) and `out` (a plain MergeTree target: one row per event, so duplicates would show).
fn build_events(db: &ChDb, per_day: u64) {
    db.q("CREATE TABLE ev (ran_at DateTime, k UInt64, v UInt32)
          ENGINE = MergeTree PARTITION BY toYYYYMM(ran_at) ORDER BY ran_at");
    db.q("CREATE TABLE out (d Date, k UInt64, v UInt32) ENGINE = MergeTree ORDER BY (d, k)");
    db.q(&format!(
        "INSERT INTO ev
         SELECT toDateTime('2025-11-01 00:00:00') + intDiv(number, {per_day}) * 86400
                  + number % {per_day},
                number % {per_day}, toUInt32(number)
           FROM numbers({})",
        3 * per_day
    ));
}

/// `INSERT INTO {target} SELECT ... FROM ev WHERE {chunk}`, with `extra` added to v (an
/// expression that is 0, or throws).
fn events_statement(extra: &str) -> String {
    format!(
        "INSERT INTO {{target}}\nSELECT toDate(ran_at), k, toUInt32(v + {extra}) FROM ev WHERE {{chunk}}\n"
    )
}

fn events_spec(db: &ChDb, job: &str, chunks: &str, settings: &str, statement: &str) -> PathBuf {
    db.spec(
        &format!("{job}.yaml"),
        &format!(
            "name: {job}
clickhouse:
  url: $URL
  source: ev
  time_column: ran_at
  chunks: {chunks}
  target: out
  settings: {settings}
  statement: |
{}",
            indent(statement, 4)
        ),
    )
}

/// Rows and a hash over `out`: `count\thash`.
fn out_digest(db: &ChDb) -> String {
    db.q("SELECT count(), sum(cityHash64(d, k, v)) FROM out")
}

/// The same over the source rows that match `cond`.
fn ev_digest(db: &ChDb, cond: &str) -> String {
    db.q(&format!(
        "SELECT count(), sum(cityHash64(toDate(ran_at), k, v)) FROM ev WHERE {cond}"
    ))
}

ch_test! {
    #[test]
    fn a_chunk_that_fails_after_writing_blocks_leaves_nothing_in_the_target(srv) {
        let db = ChDb::new_on(&srv, "partial");
        build_events(&db, 4000);
        // What the target held before the job.
        db.q("INSERT INTO out SELECT toDate('2020-01-01'), number, 7 FROM numbers(10)");
        let before = out_digest(&db);
        // Small blocks, written one by one; the row k = 3900 comes late in its day.
        let settings: [(&str, &str); 5] = [
            ("max_block_size", "100"),
            ("max_insert_block_size", "100"),
            ("min_insert_block_size_rows", "100"),
            ("min_insert_block_size_bytes", "0"),
            ("max_threads", "1"),
        ];
        let statement = events_statement("throwIf(k = 3900)");
        // The injection does write part of the chunk when the insert goes straight to a table:
        // 39 blocks of 100 rows before the throw.
        db.q("CREATE TABLE probe AS out");
        let day1 = "`ran_at` >= '2025-11-01 00:00:00' AND `ran_at` < '2025-11-02 00:00:00'";
        let direct = db.try_q_with(
            &statement
                .replace("{target}", "probe")
                .replace("{chunk}", day1),
            &settings,
        );
        assert!(
            direct.as_ref().is_err_and(|e| e.contains("Code: 395")),
            "{direct:?}"
        );
        let partial = db.num("SELECT count() FROM probe");
        assert!(
            (100..=3900).contains(&partial),
            "the failing insert should have written some blocks: {partial} rows"
        );
        db.q("DROP TABLE probe");

        let settings_yaml = format!(
            "{{ {} }}",
            settings
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let spec = events_spec(&db, "partial", "[day]", &settings_yaml, &statement);
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 1, "{all}");
        assert!(
            err.contains("chunk 2025-11-01: Code: 395") && err.contains("throwIf"),
            "the server's message: {all}"
        );
        assert!(out.contains("partial: FAILED"), "{all}");
        assert_eq!(
            out_digest(&db),
            before,
            "the target holds rows of the failed attempt (the same insert into a plain table left \
             {partial} rows)"
        );
        assert_eq!(
            db.tables(),
            ["backfill_state", "ev", "out"],
            "the staging table is dropped"
        );
        let rec = db
            .record("partial", "2025-11-01")
            .expect("the chunk's record");
        assert_ne!(rec.status, "done", "{rec:?}");
        assert_eq!(rec.attempts, 1, "{rec:?}");
        assert!(rec.error.contains("Code: 395"), "{rec:?}");
        let job = db.record("partial", "").unwrap();
        assert_eq!(job.status, "failed", "{job:?}");
        assert!(job.error.contains("Code: 395"), "{job:?}");
        assert_eq!(
            db.chunks("partial").len(),
            1,
            "later chunks were not started"
        );
    }
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transient_error_is_retried_at_the_same_size(srv) {
        let db = ChDb::new_on(&srv, "transient");
        // Four events in one month; the statement sleeps 0.7 s per row while the flag in `ctl` says
        // so, and max_execution_time is 2 s: Code 159 TIMEOUT_EXCEEDED until the flag is cleared.
        // (On 18.16 the preflight's `{chunk}` = 0 sleeps too, 2.8 s, but produces no block, so the
        // time limit is never checked there.)
        db.q("CREATE TABLE ev (ran_at DateTime, k UInt64, v UInt32)
          ENGINE = MergeTree PARTITION BY toYYYYMM(ran_at) ORDER BY ran_at");
        db.q(
            "INSERT INTO ev SELECT toDateTime('2025-11-01 00:00:00') + number * 40000, number,
                               toUInt32(number) FROM numbers(4)",
        );
        db.q("CREATE TABLE out (d Date, k UInt64, v UInt32) ENGINE = MergeTree ORDER BY (d, k)");
        db.q("CREATE TABLE ctl (at UInt64, s Float64) ENGINE = MergeTree ORDER BY at");
        db.q("INSERT INTO ctl VALUES (1, 0.7)");
        let spec = events_spec(
            &db,
            "transient",
            "[month, day]",
            "{ max_execution_time: 2 }",
            &events_statement("sleepEachRow((SELECT argMax(s, at) FROM ctl))"),
        );
        let mut r = spawn(db.dir.path(), "transient", &[], &spec);
        r.wait_until(
            "the first attempt to time out",
            Duration::from_secs(60),
            Duration::from_millis(20),
            async || {
                db.record("transient", "2025-11")
                    .is_some_and(|c| c.attempts >= 1 && c.error.contains("Code: 159"))
            },
        )
        .await;
        db.q("INSERT INTO ctl VALUES (2, 0)");
        let (code, out, err) = r.finish(Duration::from_secs(120)).await;
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(
            err.contains("retrying in") && err.contains("Code: 159"),
            "the retry is logged: {all}"
        );
        assert!(!err.contains("splitting"), "{all}");
        let recs = db.chunks("transient");
        assert_eq!(recs.len(), 1, "the month was not split: {recs:?}");
        let month = &recs[0];
        assert_eq!(
            (
                month.chunk.as_str(),
                month.level.as_str(),
                month.status.as_str()
            ),
            ("2025-11", "month", "done"),
            "{month:?}"
        );
        assert!(month.attempts >= 2, "{month:?}");
        eprintln!("2025-11 done after {} attempts", month.attempts);
        assert_eq!(out_digest(&db), ev_digest(&db, "1"));
    }
}

ch_test! {
    #[test]
    fn other_errors_fail_the_job_and_a_fixed_spec_resumes_at_the_checkpoint(srv) {
        let db = ChDb::new_on(&srv, "errors");
        build_events(&db, 1000);
        // A missing column: refused by the preflight, before any chunk.
        let spec = events_spec(&db, "errors", "[day]", "{}", &events_statement("vv"));
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 1, "{all}");
        assert!(
            err.contains("clickhouse.statement does not run") && err.contains("Code: 47"),
            "{all}"
        );
        assert!(err.contains("vv"), "names the column: {all}");
        assert_eq!(db.num("SELECT count() FROM out"), 0);
        assert!(db.chunks("errors").is_empty());
        assert!(
            !db.tables().iter().any(|t| t.contains("__backfill_")),
            "{:?}",
            db.tables()
        );

        // One day fails mid-run (a non-memory server error): the job fails at that chunk.
        let spec = events_spec(
            &db,
            "errors",
            "[day]",
            "{}",
            &events_statement("throwIf(toDate(ran_at) = toDate('2025-11-02'))"),
        );
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 1, "{all}");
        assert!(err.contains("chunk 2025-11-02: Code: 395"), "{all}");
        let recs = by_chunk(db.chunks("errors"));
        assert_eq!(
            recs.keys().collect::<Vec<_>>(),
            ["2025-11-01", "2025-11-02"],
            "{recs:?}"
        );
        assert_eq!(
            (
                recs["2025-11-01"].status.as_str(),
                recs["2025-11-01"].attempts
            ),
            ("done", 1)
        );
        let failed = &recs["2025-11-02"];
        assert_ne!(failed.status, "done", "{failed:?}");
        assert_ne!(failed.status, "split", "{failed:?}");
        assert_eq!(failed.attempts, 1, "{failed:?}");
        assert!(failed.error.contains("Code: 395"), "{failed:?}");
        let job = db.record("errors", "").unwrap();
        assert_eq!(job.status, "failed");
        assert!(job.error.contains("Code: 395"), "{job:?}");
        assert_eq!(
            out_digest(&db),
            ev_digest(&db, "toDate(ran_at) = '2025-11-01'"),
            "the target holds the done chunk only"
        );

        // Fixed: resumes at the failed chunk; the done one is not run again.
        let spec = events_spec(&db, "errors", "[day]", "{}", &events_statement("0"));
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(
            err.contains("spec changed since the last checkpoint"),
            "{all}"
        );
        let recs = by_chunk(db.chunks("errors"));
        let attempts: Vec<(&str, &str, u32)> = recs
            .values()
            .map(|r| (r.chunk.as_str(), r.status.as_str(), r.attempts))
            .collect();
        assert_eq!(
            attempts,
            [
                ("2025-11-01", "done", 1),
                ("2025-11-02", "done", 2),
                ("2025-11-03", "done", 1)
            ]
        );
        assert_eq!(out_digest(&db), ev_digest(&db, "1"), "every event once");
    }
}

// ------------------------------------------------------------------------------------------------
// plan
// ------------------------------------------------------------------------------------------------

/// The line of `plan` for a top-level chunk.
fn plan_line<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .find(|l| l.trim_start().starts_with(&format!("{label} ")))
        .unwrap_or_else(|| panic!("no plan line for {label}:\n{out}"))
}

ch_test! {
    #[test]
    fn plan_writes_nothing_and_shows_splits_and_what_was_learned(srv) {
        let db = ChDb::new_on(&srv, "plan");
        build_skew(
            &|sql| {
                db.q(sql);
            },
            SKEW_K,
            true,
        );
        let reference = source_digest(&db);
        let empty = target_digest(&db);
        let fixed = skew_spec(&db, "fixed.yaml", "plan", SKEW_STATEMENT);
        let big = 10 * SKEW_K;
        let normal = 2 * SKEW_K;
        let total = 4 * normal + 2 * big;

        let (code, out, err) = run(&[&"plan", &fixed]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(
            out.contains(&format!("6 top-level, 6 to do ({total} source rows)")),
            "{all}"
        );
        for (m, rows) in [
            ("2025-11", normal),
            ("2025-12", normal),
            ("2026-01", big),
            ("2026-02", normal),
            ("2026-03", big),
            ("2026-04", normal),
        ] {
            let line = plan_line(&out, m);
            assert!(
                line.contains(&format!(" {rows} rows")) && line.contains("pending"),
                "{line}"
            );
        }
        assert_eq!(
            db.tables(),
            ["agg", "runs"],
            "plan created nothing (no backfill_state, no staging table)"
        );
        assert_eq!(target_digest(&db), empty);

        // A run that splits 2026-01, then fails on 2026-02 (a non-memory error).
        let failing = skew_spec(
            &db,
            "failing.yaml",
            "plan",
            &SKEW_STATEMENT.replace(
                "sumState(duration_ms)",
                "sumState(toUInt32(duration_ms + throwIf(toYYYYMM(ran_at) = 202602)))",
            ),
        );
        let (code, out, err) = run(&[&"run", &failing]);
        assert_eq!(code, 1, "{}", all_output(&out, &err));
        assert!(
            err.contains("chunk 2026-02: Code: 395"),
            "{}",
            all_output(&out, &err)
        );

        let records = db.records("plan");
        let tables = db.tables();
        let target = target_digest(&db);
        let (code, out, err) = run(&[&"plan", &fixed]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(plan_line(&out, "2025-11").contains("done"), "{all}");
        let split = plan_line(&out, "2026-01");
        assert!(
            split.contains("split") && split.contains("split earlier"),
            "{split}"
        );
        assert!(plan_line(&out, "2026-02").contains("pending"), "{all}");
        // 2026-03 is not below 2026-01, a month that ran out of memory.
        let learned = plan_line(&out, "2026-03");
        assert!(
            learned.contains(&format!("{big} rows >= {big} rows"))
                && learned.contains("starts a rung lower"),
            "{learned}"
        );
        assert!(plan_line(&out, "2026-04").contains("one query"), "{all}");
        assert_eq!(db.records("plan"), records, "plan wrote to backfill_state");
        assert_eq!(db.tables(), tables);
        assert_eq!(target_digest(&db), target);

        let (code, out, err) = run(&[&"run", &fixed]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert_eq!(target_digest(&db), reference);

        // Finished: nothing left to do, though two months were split.
        let (code, out, err) = run(&[&"plan", &fixed]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(plan_line(&out, "2026-01").contains("split"), "{all}");
        assert!(
            out.contains("6 top-level, 0 to do (0 source rows)"),
            "a finished job has nothing to do: {all}"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// Spec errors (no server needed) and password redaction
// ------------------------------------------------------------------------------------------------

const GOOD_CH: &str = "clickhouse:
  url: http://127.0.0.1:8123/nowhere
  source: runs
  time_column: ran_at
  split_column: project_id
  chunks: [month, day, split]
  target: agg
  statement: INSERT INTO {target} SELECT * FROM runs WHERE {chunk}
";

/// `validate` and `run` both exit 2 and name file, line (when given) and field.
fn spec_error(yaml: &str, line: Option<u32>, field: &str, text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.yaml");
    std::fs::write(&path, yaml).unwrap();
    for cmd in ["validate", "run"] {
        let (code, out, err) = run(&[&cmd, &path]);
        let all = all_output(&out, &err);
        assert_eq!(code, 2, "{cmd}:\n{yaml}\n{all}");
        let place = match line {
            Some(l) => format!("{}:{l}:", path_str(&path)),
            None => path_str(&path),
        };
        assert!(err.contains(&place), "{cmd}: want {place:?}: {all}");
        assert!(err.contains(&format!("field `{field}`")), "{cmd}: {all}");
        assert!(err.contains(text), "{cmd}: want {text:?}: {all}");
    }
}

#[test]
fn good_clickhouse_spec_validates_without_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("good.yaml");
    std::fs::write(&path, GOOD_CH).unwrap();
    let (code, out, err) = run(&[&"validate", &path]);
    assert_eq!(code, 0, "{}", all_output(&out, &err));
}

#[test]
fn spec_error_statement_without_chunk() {
    spec_error(
        &GOOD_CH.replace(" WHERE {chunk}", ""),
        Some(8),
        "clickhouse.statement",
        "{chunk}",
    );
}

#[test]
fn spec_error_chunks_out_of_order() {
    spec_error(
        &GOOD_CH.replace("[month, day, split]", "[day, month]"),
        Some(6),
        "clickhouse.chunks",
        "coarse to fine",
    );
    spec_error(
        &GOOD_CH.replace("[month, day, split]", "[month, month]"),
        Some(6),
        "clickhouse.chunks",
        "coarse to fine",
    );
}

#[test]
fn spec_error_split_without_split_column() {
    spec_error(
        &GOOD_CH.replace("  split_column: project_id\n", ""),
        Some(5),
        "clickhouse.split_column",
        "split_column must name the column",
    );
}

#[test]
fn spec_error_bad_date() {
    spec_error(
        &GOOD_CH.replace("  chunks:", "  from: 2025-13-01\n  chunks:"),
        Some(6),
        "clickhouse.from",
        "is not a date",
    );
    spec_error(
        &GOOD_CH.replace(
            "  chunks:",
            "  from: 2025-11-01\n  to: 2025-11-01\n  chunks:",
        ),
        Some(7),
        "clickhouse.to",
        "is not after",
    );
}

#[test]
fn spec_error_throttle_on_a_clickhouse_job() {
    spec_error(
        &format!("{GOOD_CH}throttle:\n  max_active_backends: 3\n"),
        Some(10),
        "throttle",
        "postgres jobs only",
    );
}

ch_test! {
    #[test]
    fn password_in_the_url_is_never_shown(srv) {
        srv.check_up();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw.yaml");
        std::fs::write(
            &path,
            GOOD_CH.replace(
                "http://127.0.0.1:8123/nowhere",
                &srv.url.replace("http://", "http://default:s3cret@"),
            ),
        )
        .unwrap();
        for cmd in ["run", "plan", "status"] {
            let (code, out, err) = run(&[&cmd, &path]);
            let all = all_output(&out, &err);
            // User default has no password: the server refuses one (Code 193 on 18.16,
            // 194 on 26.x).
            assert_eq!(code, 1, "{cmd}: {all}");
            assert!(err.contains("default:***@"), "{cmd}: {all}");
            assert!(err.contains("password"), "{cmd}: {all}");
            assert!(!all.contains("s3cret"), "{cmd} shows the password: {all}");
        }
        let (code, out, err) = run(&[&"validate", &path]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert!(!out.contains("s3cret") && !err.contains("s3cret"));
    }
}
