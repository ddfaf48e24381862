//! ClickHouse jobs against the real local servers, each test twice (`ch_test!`): `NAME::v18` on
//! 18.16 (127.0.0.1:8123, scripts/services.sh starts it) and `NAME::current` on a current release
//! (127.0.0.1:8124, scripts/clickhouse-current.sh). The memory-limit ladder on a skewed dataset
//! (lighter settings first, then month -> day -> project), what a chunk that ran out of memory
//! teaches the next ones, kill -9 at random moments with an immediate resume, requests dropped
//! by a proxy, --rerun / reset / a dropped state table, another writer and another job on the
//! same target, two workers, `?` in SQL and in server messages, failures that leave no partial
//! chunk in the target, `plan`, spec errors, and password redaction.
//! Every test has a database of its own (`bf_ch_<hint>_<pid>_<rand>`, tests/common/ch.rs) and
//! asserts what ends up in the target and in `backfill_chunks`, never timings.

mod common;
use common::ch::{ChDb, Record};
use common::days::build_days;
use common::proxy::{Fault, FaultProxy, Rule};
use common::runner::{in_own_pid_namespace, spawn, spawn_cmd};
use common::skew::{BIG_MONTH, HEAVY_DAY, SKEW_K, build_skew};
use common::{path_str, run};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `max_memory_usage` of the skew tests, found with `scripts/ch-calibrate.sh`, which builds this
/// dataset (through `examples/ch_skew_data.rs`) and bisects the limit on the real server for the
/// job's statement on every chunk the ladder runs, with max_threads 1. Every normal month, every
/// ordinary day of a big month and both project halves of the heavy day pass under it; the heavy
/// day and the big months fail with 241. Bands measured: 18.16 [23,655,736, 38,792,704], 26.9
/// [16,152,780, 30,912,962]; this is inside both.
const SKEW_LIMIT: u64 = 27_262_976;

/// The job's statement (scripts/ch-calibrate.sh runs the same one).
const SKEW_STATEMENT: &str = "INSERT INTO {target}
SELECT project_id, test_case_id, countState(), sumState(duration_ms)
  FROM runs WHERE {chunk} GROUP BY project_id, test_case_id
";

/// Settings that leave the engine no lighter settings to try: a chunk that runs out of memory
/// is split at once.
const PINNED: &str = "max_threads: 1, max_bytes_before_external_group_by: 0, \
                      max_block_size: 65536, min_insert_block_size_rows: 1048576, \
                      min_insert_block_size_bytes: 268435456";

/// The spec file `file` of a skew job with `statement` under SKEW_LIMIT and `settings`.
fn skew_spec(db: &ChDb, file: &str, job: &str, settings: &str, statement: &str) -> PathBuf {
    db.spec(
        file,
        &format!(
            "name: {job}
clickhouse:
  url: $URL
  source: runs
  time_column: ran_at
  split_column: project_id
  chunks: [month, day, split]
  target: agg
  settings: {{ max_memory_usage: {SKEW_LIMIT}{} }}
  statement: |
{}",
            if settings.is_empty() {
                String::new()
            } else {
                format!(", {settings}")
            },
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

/// The tables a test database holds besides the job's state and its base and ledger (which a
/// job keeps next to the target to undo its landings on a new start).
fn working_tables(db: &ChDb) -> Vec<String> {
    db.tables()
        .into_iter()
        .filter(|t| !t.ends_with("_base") && !t.ends_with("_ledger"))
        .collect()
}

/// A day of the big month that `skewed_month_splits_by_day_then_by_project` empties.
const EMPTY_DAY: &str = "2026-01-20";

fn skew(db: &ChDb, second_big: bool) {
    build_skew(
        &|sql| {
            db.q(sql);
        },
        SKEW_K,
        second_big,
    );
}

ch_test! {
    #[test]
    fn skewed_month_splits_by_day_then_by_project(srv) {
        let db = ChDb::new_on(&srv, "skew");
        skew(&db, false);
        // A day of the big month with no rows: its day chunk is run all the same (a split once
        // left out the days that were empty, and rows arriving there later were in no chunk).
        db.q(&format!("ALTER TABLE runs DELETE WHERE toDate(ran_at) = '{EMPTY_DAY}'"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while db.num(&format!("SELECT count() FROM runs WHERE toDate(ran_at) = '{EMPTY_DAY}'")) > 0 {
            assert!(Instant::now() < deadline, "the DELETE mutation did not finish");
            std::thread::sleep(Duration::from_millis(100));
        }
        let reference = source_digest(&db);
        let spec = skew_spec(&db, "skew.yaml", "skew", PINNED, SKEW_STATEMENT);

        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(out.contains("skew: done"), "{all}");
        assert!(
            err.contains(&format!("splitting chunk {BIG_MONTH} into 31 day chunk(s)")),
            "{all}"
        );
        assert!(
            err.contains(&format!("splitting chunk {HEAVY_DAY} into 2 split chunk(s)")),
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
                (r.level.as_str(), r.status.as_str(), r.attempts, r.source_rows, r.rows),
                ("month", "done", 1, 2 * SKEW_K, SKEW_K),
                "{r:?}"
            );
            expected.push(m.into());
        }
        let big = &recs[BIG_MONTH];
        assert_eq!(
            (big.level.as_str(), big.status.as_str(), big.attempts, big.code),
            ("month", "split", 1, 241),
            "{big:?}"
        );
        assert!(big.source_rows < 10 * SKEW_K, "a day emptied: {big:?}");
        assert!(
            big.memory_bytes > SKEW_LIMIT,
            "the record keeps what the query would have used: {big:?}"
        );
        assert_eq!(days_of(&db, BIG_MONTH).len(), 30, "one day emptied");
        let days: Vec<String> = (1..=31).map(|d| format!("{BIG_MONTH}-{d:02}")).collect();
        assert_eq!(big.children, days, "the split names its children, the empty day too");
        for d in &days {
            let r = &recs[d];
            expected.push(d.clone());
            if d == EMPTY_DAY {
                assert_eq!(
                    (r.level.as_str(), r.status.as_str(), r.source_rows, r.rows),
                    ("day", "done", 0, 0),
                    "{r:?}"
                );
            } else if d == HEAVY_DAY {
                assert_eq!(
                    (r.level.as_str(), r.status.as_str(), r.attempts, r.source_rows, r.code),
                    ("day", "split", 1, 6 * SKEW_K, 241),
                    "{r:?}"
                );
            } else {
                assert_eq!(
                    (r.level.as_str(), r.status.as_str(), r.attempts),
                    ("day", "done", 1),
                    "{r:?}"
                );
            }
        }
        // The heavy day's 16 projects in two halves of 8, cut at the median value and named by
        // it, each done at the first attempt.
        let mut half_rows = 0;
        for g in ["project_id[..9)", "project_id[9..)"] {
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
            working_tables(&db),
            ["agg", "backfill_chunks", "runs"],
            "no staging table and no lock left"
        );

        // A second run leaves the finished job alone.
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert!(out.contains("0 run, 1 skipped"), "{}", all_output(&out, &err));
        assert_eq!(target_digest(&db), reference);
    }
}

ch_test! {
    /// A day chunk keeps the rows it had when its month was split. A row arriving on that day
    /// before the day itself is split (a run killed in between) once made every later run
    /// refuse the split ("its smaller chunks hold N+1 rows, the chunk N"), for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_whose_source_grew_since_it_was_cut_is_still_split(srv) {
        let db = ChDb::new_on(&srv, "grew");
        skew(&db, false);
        let proxy = FaultProxy::start_http(srv.addr()).await;
        // The heavy day's own chunk: its lower bound is that day (the day before ends there).
        let heavy = [
            format!(">= '{HEAVY_DAY}"),
            format!(">= toDateTime('{HEAVY_DAY}"),
        ];
        let held = proxy.add_rule(Rule::new(Fault::HoldUntilReleased).matching(move |r| {
            let t = r.text();
            t.contains("INSERT INTO") && heavy.iter().any(|h| t.contains(h.as_str()))
        }));
        let via = skew_spec(&db, "grew.yaml", "grew", PINNED, SKEW_STATEMENT);
        let url = db.url.clone();
        edit_spec(&via, &url, &proxy.url_for(&url));
        let mut r = spawn(db.dir.path(), "first", &[], &via);
        r.wait_until(
            "the heavy day's attempt",
            Duration::from_secs(120),
            Duration::from_millis(20),
            async || proxy.rule_fired(held) > 0,
        )
        .await;
        r.kill();
        drop(proxy);
        db.q(&format!("INSERT INTO runs VALUES ('{HEAVY_DAY} 12:00:00', 3, 42, 7)"));
        let reference = source_digest(&db);
        let spec = skew_spec(&db, "grew.yaml", "grew", PINNED, SKEW_STATEMENT);
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(
            err.contains(&format!("splitting chunk {HEAVY_DAY} into 2 split chunk(s)")),
            "{all}"
        );
        assert_eq!(target_digest(&db), reference, "{all}");
    }
}

ch_test! {
    #[test]
    fn a_month_that_runs_out_of_memory_fits_with_lighter_settings(srv) {
        let db = ChDb::new_on(&srv, "light");
        skew(&db, false);
        let reference = source_digest(&db);
        // Only the memory cap is set: the engine may try one thread and a GROUP BY that spills.
        let spec = skew_spec(&db, "light.yaml", "light", "", SKEW_STATEMENT);
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert_eq!(target_digest(&db), reference);
        let recs = by_chunk(db.chunks("light"));
        let big = &recs[BIG_MONTH];
        assert!(
            err.contains(&format!("chunk {BIG_MONTH} ran out of memory; trying it once more with lighter settings")),
            "{all}"
        );
        // Lighter settings made it fit: one month, two attempts, no split, no day chunks.
        assert_eq!(
            (big.status.as_str(), big.attempts, big.light),
            ("done", 2, 1),
            "{big:?}"
        );
        assert_eq!(recs.len(), 6, "months only: {recs:?}");
    }
}

ch_test! {
    #[test]
    fn a_chunk_not_smaller_than_one_that_failed_is_split_without_an_attempt(srv) {
        let db = ChDb::new_on(&srv, "learn");
        skew(&db, true);
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

        let spec = skew_spec(&db, "learn.yaml", "learn", PINNED, SKEW_STATEMENT);
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert_eq!(target_digest(&db), reference);
        let recs = by_chunk(db.chunks("learn"));
        // The first big month (10K rows) ran out of memory at its attempt. The second, as large,
        // is not below it: split without an attempt (a failure predicts its own level only).
        let second = &recs["2026-03"];
        assert_eq!(
            (second.status.as_str(), second.attempts),
            ("split", 0),
            "split without an attempt: {second:?}"
        );
        assert!(
            second.error.contains(&format!("not below the {} rows", 10 * SKEW_K)),
            "{second:?}"
        );
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
        // Smaller chunks after the failure keep the fast path: one query each.
        for m in ["2025-11", "2025-12", "2026-02", "2026-04"] {
            let r = &recs[m];
            assert_eq!((r.status.as_str(), r.attempts), ("done", 1), "{r:?}");
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Kills, dropped requests, starting over
// ------------------------------------------------------------------------------------------------

/// A day-chunked job over `build_days`, with `extra` spec lines.
fn days_spec(db: &ChDb, job: &str, url: &str, extra: &str) -> PathBuf {
    db.spec(
        &format!("{job}.yaml"),
        &format!(
            "name: {job}
clickhouse:
  url: {url}
  source: runs
  time_column: ran_at
  chunks: [day]
  target: agg
  statement: |
{}{extra}",
            indent(SKEW_STATEMENT, 4)
        ),
    )
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
/// query (an insert, a move, a state write) may still finish on the server.
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
    /// The target held rows beyond the chunks recorded done (killed while landing).
    target_ahead: u32,
}

/// After a kill: a chunk recorded done is always in the target; beyond the done chunks the
/// target holds at most the staged one.
async fn after_kill(db: &ChDb, job: &str, stats: &mut KillStats) {
    quiesce(db).await;
    stats.kills += 1;
    let target = db.num("SELECT countMerge(runs) FROM agg");
    let recs = db.chunks(job);
    let of = |status: &str| -> Vec<&str> {
        recs.iter()
            .filter(|r| r.status == status)
            .map(|r| r.chunk.as_str())
            .collect()
    };
    let (done, staged) = (of("done"), of("staged"));
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
    }
    if target > done_rows {
        stats.target_ahead += 1;
    }
}

/// Run `n` of `spec`, killed at a random moment: one time in four 100-250 ms after its start
/// (connect, lock, preflight), else 0-60 ms after `progress` (chunks done, say) grew by 0-2. By
/// progress rather than by the clock, so that a fast server cannot finish the job before the
/// kills are through. `None` once killed; the run's exit and output if it ended first.
async fn run_until_a_random_kill(
    db: &ChDb,
    n: u32,
    spec: &std::path::Path,
    progress: impl Fn() -> usize,
) -> Option<(i32, String, String)> {
    let before = progress();
    let mut r = spawn(db.dir.path(), &format!("run{n}"), &[], spec);
    let early = rand::random::<u32>().is_multiple_of(4);
    let start = Instant::now();
    let at = Duration::from_millis(100 + rand::random::<u64>() % 150);
    let more = (rand::random::<u32>() % 3) as usize;
    let mut deadline = None;
    while !r.exited() {
        let now = Instant::now();
        assert!(
            now < start + Duration::from_secs(120),
            "run {n} made no progress in 120 s"
        );
        let due = if early {
            now >= start + at
        } else {
            progress() >= before + more
        };
        if deadline.is_none() && due {
            deadline = Some(now + Duration::from_millis(rand::random::<u64>() % 60));
        }
        if deadline.is_some_and(|d| now >= d) {
            r.kill();
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Some(r.finish(Duration::from_secs(10)).await)
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill_9_at_random_moments_then_resume_lands_every_chunk_exactly_once(srv) {
        let db = ChDb::new_on(&srv, "kill");
        let days = 60;
        build_days(&db, days, 2000);
        let reference = source_digest(&db);
        let job = "killed";
        let spec = days_spec(&db, job, "$URL", "");
        let mut stats = KillStats::default();
        let mut n = 0;
        // Random moments, from the start (connect, lock, preflight) to well into the chunks; every
        // next run starts right away: the dead runner's lock must not keep it out. A run is
        // killed a random time after its start (one in four), or a random time after 0-2 more
        // chunks are done: by chunks rather than by the clock, so that a fast server cannot
        // finish the job before the eighth kill.
        let done = || db.chunks(job).iter().filter(|c| c.status == "done").count();
        while stats.kills < 8 {
            n += 1;
            if let Some((code, out, err)) = run_until_a_random_kill(&db, n, &spec, done).await {
                panic!(
                    "run {n} exited ({code}) before it could be killed:\n{}",
                    all_output(&out, &err)
                );
            }
            after_kill(&db, job, &mut stats).await;
        }
        // Then inside the window between staging and done.
        for _ in 0..5 {
            if stats.staged > 0 {
                break;
            }
            n += 1;
            let mut r = spawn(db.dir.path(), &format!("run{n}"), &[], &spec);
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                assert!(!r.exited(), "the job finished before a kill in the staged window");
                assert!(Instant::now() < deadline, "no chunk staged within 60 s");
                if db.chunks(job).iter().any(|c| c.status == "staged") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            r.kill();
            after_kill(&db, job, &mut stats).await;
        }
        // Resume to the end, at once.
        n += 1;
        let r = spawn(db.dir.path(), &format!("run{n}"), &[], &spec);
        let (code, out, err) = r.finish(Duration::from_secs(300)).await;
        assert_eq!(code, 0, "the resume after the kills:\n{}", all_output(&out, &err));
        eprintln!("after {} kills: {stats:?}", stats.kills);
        assert!(stats.kills >= 8 && stats.staged >= 1, "{stats:?}");
        assert_eq!(
            target_digest(&db),
            reference,
            "target merged by key differs from the source"
        );
        let recs = db.chunks(job);
        assert_eq!(recs.len() as u64, days, "{recs:?}");
        assert!(recs.iter().all(|r| r.status == "done"), "{recs:?}");
        assert_eq!(db.record(job, "").unwrap().status, "done");
        assert_eq!(working_tables(&db), ["agg", "backfill_chunks", "runs"]);
        db.q("OPTIMIZE TABLE agg FINAL");
        assert_eq!(target_digest(&db), reference);
    }
}

ch_test! {
    /// Kill -9 at random moments while the oversized month is split (month -> 31 days, the
    /// heavy day -> 2 by project), each next run starting at once; then a run to the end. The
    /// target equals the unchunked reference: no split piece lost or landed twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill_9_at_random_moments_of_a_split_month_then_resume_equals_the_reference(srv) {
        let db = ChDb::new_on(&srv, "splitkill");
        skew(&db, false);
        let reference = source_digest(&db);
        let job = "splitkill";
        let spec = skew_spec(&db, "splitkill.yaml", job, PINNED, SKEW_STATEMENT);
        // Progress: chunks recorded done or split.
        let progress = || {
            db.chunks(job)
                .iter()
                .filter(|c| c.status == "done" || c.status == "split")
                .count()
        };
        let (mut kills, mut in_split) = (0, 0);
        let mut n = 0;
        while in_split < 5 && kills < 40 {
            n += 1;
            if let Some((code, out, err)) = run_until_a_random_kill(&db, n, &spec, progress).await {
                assert_eq!(code, 0, "run {n}:\n{}", all_output(&out, &err));
                break;
            }
            quiesce(&db).await;
            kills += 1;
            if db.chunks(job).iter().any(|c| c.status == "split") {
                in_split += 1;
            }
        }
        n += 1;
        let r = spawn(db.dir.path(), &format!("run{n}"), &[], &spec);
        let (code, out, err) = r.finish(Duration::from_secs(300)).await;
        assert_eq!(code, 0, "the resume after {kills} kills:\n{}", all_output(&out, &err));
        eprintln!("{kills} kills, {in_split} of them with the month split");
        assert!(in_split >= 5, "{kills} kills, {in_split} during the split");
        assert_eq!(target_digest(&db), reference, "target merged by key differs from the source");
        assert_eq!(db.record(job, "").unwrap().status, "done");
    }
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_requests_never_end_done_with_a_wrong_target(srv) {
        let db = ChDb::new_on(&srv, "proxy");
        build_days(&db, 20, 1000);
        let reference = source_digest(&db);
        let proxy = FaultProxy::start_http(srv.addr()).await;
        // Requests lost before the server saw them, and requests that ran but whose answer was
        // lost (an insert, a move, a state write that did happen).
        let seed = rand::random::<u64>();
        eprintln!("proxy seed {seed}");
        let before = proxy.add_rule(Rule::new(Fault::DropRequest).random(0.08, seed));
        let after = proxy.add_rule(Rule::new(Fault::DropResponse).random(0.08, seed ^ 0x5eed));
        let spec = days_spec(&db, "faulty", &proxy.url_for(&db.url), "");
        let mut ends = Vec::new();
        for n in 0..12 {
            let (code, out, err) = run(&[&"run", &spec]);
            assert!(
                [0, 1, 75].contains(&code),
                "run {n}: exit {code}\n{}",
                all_output(&out, &err)
            );
            ends.push(code);
            if code == 0 {
                assert_eq!(
                    target_digest(&db),
                    reference,
                    "run {n} ended 0 but the target differs:\n{}",
                    all_output(&out, &err)
                );
                break;
            }
        }
        let fired = proxy.rule_fired(before) + proxy.rule_fired(after);
        eprintln!("runs ended {ends:?}; {fired} requests dropped");
        assert!(fired > 0, "no fault was injected");
        // With the faults gone, one more run makes (or keeps) the target equal.
        proxy.clear_rules();
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert_eq!(target_digest(&db), reference);
    }
}

ch_test! {
    /// A statement that does the same when run twice (`CREATE TABLE IF NOT EXISTS`, `DROP
    /// TABLE IF EXISTS`, `SYSTEM STOP/START MERGES`) whose answer is lost once is sent again:
    /// the run goes on and ends done, where it failed (exit 1 at start, or a chunk retried).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_answer_to_a_statement_safe_to_repeat_is_sent_again(srv) {
        for (n, needle) in [
            "CREATE TABLE IF NOT EXISTS",
            "DROP TABLE IF EXISTS",
            "SYSTEM STOP MERGES",
            "SYSTEM START MERGES",
        ]
        .into_iter()
        .enumerate()
        {
            let db = ChDb::new_on(&srv, &format!("again{n}"));
            build_days(&db, 3, 500);
            let reference = source_digest(&db);
            let proxy = FaultProxy::start_http(srv.addr()).await;
            let lost = proxy.add_rule(
                Rule::new(Fault::DropResponse)
                    .when_contains(needle)
                    .times(1),
            );
            let spec = days_spec(&db, "again", &proxy.url_for(&db.url), "");
            // A run, then a start over (on current servers only a restore stops merges).
            let mut all = String::new();
            for args in [&["run"][..], &["run", "--rerun"]] {
                let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
                    args.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>).collect();
                args.push(&spec);
                let (code, out, err) = run(&args);
                all.push_str(&all_output(&out, &err));
                assert_eq!(code, 0, "{needle}: {all}");
                assert!(!err.contains("retrying"), "{needle}: sent again, not retried: {all}");
                assert_eq!(target_digest(&db), reference, "{needle}: {all}");
            }
            assert_eq!(proxy.rule_fired(lost), 1, "{needle}: {all}");
        }
    }
}

/// 18.16 fails a read of `system.tables` with Code 60, naming some other table, when a table of
/// the database is dropped while it reads (measured: about one read in a thousand while another
/// session creates and drops tables there; a runner's staging tables are such tables). Here every
/// other such read of the job gets that very answer: each is read again, and the job lands every
/// chunk once, at start, during the run (two workers, staging) and at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_read_that_races_a_drop_is_read_again() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "catalog_race");
    build_days(&db, 8, 1000);
    let reference = source_digest(&db);
    let proxy = FaultProxy::start_http(srv.addr()).await;
    let seen = std::sync::atomic::AtomicU64::new(0);
    let body = format!(
        "Code: 60, e.displayText() = DB::Exception: Table {}.agg__gone doesn't exist., \
         e.what() = DB::Exception\n",
        db.name
    );
    let raced = proxy.add_rule(Rule::new(Fault::Answer(404, body)).matching(move |r| {
        r.text().contains("system.tables")
            && seen
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                .is_multiple_of(2)
    }));
    let spec = days_spec(&db, "raced", &proxy.url_for(&db.url), "workers: 2\n");
    let (code, out, err) = run(&[&"run", &spec]);
    let fired = proxy.rule_fired(raced);
    assert_eq!(code, 0, "{fired} reads raced:\n{}", all_output(&out, &err));
    assert!(fired >= 3, "only {fired} reads of system.tables raced");
    assert_eq!(
        target_digest(&db),
        reference,
        "the target differs from the source"
    );
    assert!(
        db.chunks("raced").iter().all(|c| c.status == "done"),
        "{:?}",
        db.chunks("raced")
    );
}

/// 18.16 lands by attaching with the target's merges stopped. When they could not be started
/// again after the last chunk (here: five `SYSTEM START MERGES` in a row answered with a network
/// error), the job ended done with exit 0 and the merges stopped for good; now it starts them
/// before it is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merges_stopped_for_a_landing_run_again_when_the_job_is_done() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "merges");
    build_days(&db, 4, 500);
    let reference = source_digest(&db);
    let proxy = FaultProxy::start_http(srv.addr()).await;
    let failed = proxy.add_rule(
        Rule::new(Fault::Answer(
            500,
            "Code: 210, e.displayText() = DB::NetException: Connection reset by peer, \
             e.what() = DB::NetException\n"
                .into(),
        ))
        .when_contains("START MERGES")
        .times(5),
    );
    let spec = days_spec(&db, "merges", &proxy.url_for(&db.url), "");
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{}", all_output(&out, &err));
    assert_eq!(proxy.rule_fired(failed), 5, "{}", all_output(&out, &err));
    assert_eq!(target_digest(&db), reference);
    // With merges stopped, 18.16 answers OPTIMIZE with Code 236 (ABORTED).
    db.q("INSERT INTO agg SELECT 99, 1, countState(), sumState(toUInt32(1)) FROM numbers(1)");
    let optimized = db.try_q("OPTIMIZE TABLE agg FINAL");
    assert!(
        optimized.is_ok(),
        "the target's merges are stopped: {optimized:?}"
    );
}

ch_test! {
    /// A chunk split at a String value that is not UTF-8: the bound came back altered (U+FFFD),
    /// the predicate on it never split the chunk, and the run split the same chunk forever
    /// (26.9, seen 2.5 minutes without progress). Now it fails, naming the chunk and the column.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_split_at_a_value_that_is_not_utf8_fails_instead_of_looping(srv) {
        let db = ChDb::new_on(&srv, "nonutf");
        db.q("CREATE TABLE src (ran_at DateTime, tag String, n UInt32)
              ENGINE = MergeTree ORDER BY (tag, ran_at)");
        db.q("CREATE TABLE dst (ran_at DateTime, tag String, n UInt32)
              ENGINE = MergeTree ORDER BY (tag, ran_at)");
        db.q("INSERT INTO src SELECT toDateTime('2025-10-01 00:00:00') + number,
                     [unhex('61'), unhex('62'), unhex('C328'), unhex('C428')][number % 4 + 1],
                     number
                FROM numbers(300)");
        let (code, all) = split_to_single_values(&srv, &db, "nonutf", "tag", false).await;
        assert_eq!(code, 1, "{all}");
        assert!(all.contains("not UTF-8") && all.contains("split_column"), "{all}");
    }
}

ch_test! {
    /// A NULL `split_column` value is in no range of values: the halves of a split chunk left
    /// its NULL rows out, and the split stopped the job with exit 1 ("the source changed while
    /// the job ran?"). The lowest half of each split keeps them now. Every chunk of more than
    /// one value runs out of memory here, so splits go down to single values.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_whose_split_value_is_null_go_with_the_lowest_half(srv) {
        let db = ChDb::new_on(&srv, "nullsplit");
        nulls_split_to_single_values(&srv, &db, "nullsplit", false).await;
    }
}

ch_test! {
    /// The lowest value of a split keeps the NULLs down to a single value: a day whose lowest
    /// value and NULLs each fit, but not together, failed as "one value". That chunk is cut
    /// once more, the value and the NULLs apart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_single_value_with_the_nulls_is_cut_into_the_two(srv) {
        let db = ChDb::new_on(&srv, "nullapart");
        nulls_split_to_single_values(&srv, &db, "nullapart", true).await;
        let ids: Vec<String> = db.records("nullapart").into_iter().map(|r| r.chunk).collect();
        assert!(ids.iter().any(|i| i.ends_with("/project IS NULL")), "{ids:?}");
        assert!(ids.iter().any(|i| i.ends_with("/project=1 not NULL")), "{ids:?}");
    }
}

/// `src` with a Nullable `project` (a quarter NULL), split down to single values into `dst`
/// (`apart` as in `split_to_single_values`): exit 0 and every row once, the NULLs included.
async fn nulls_split_to_single_values(
    srv: &common::ch::ChServer,
    db: &ChDb,
    job: &str,
    apart: bool,
) {
    for t in ["src", "dst"] {
        db.q(&format!(
            "CREATE TABLE {t} (ran_at DateTime, project Nullable(UInt32), n UInt32)
              ENGINE = MergeTree ORDER BY (ran_at, n)"
        ));
    }
    db.q(
        "INSERT INTO src SELECT toDateTime('2025-10-01 00:00:00') + number,
                 [1, 2, 3, NULL][number % 4 + 1], number
            FROM numbers(300)",
    );
    let (code, all) = split_to_single_values(srv, db, job, "project", apart).await;
    assert_eq!(code, 0, "{all}");
    let digest = "SELECT count(), sum(n), countIf(isNull(project)), sum(ifNull(project, 0))
                    FROM {t}";
    assert_eq!(
        db.q(&digest.replace("{t}", "dst")),
        db.q(&digest.replace("{t}", "src")),
        "{all}"
    );
}

/// Run job `job` (`src` into `dst` by day, split by `split_column`) through a proxy that answers
/// MEMORY_LIMIT_EXCEEDED to every chunk of more than one value, so that splits go down to single
/// values; returns the exit code and the output, after checking that the proxy did answer so.
/// `apart`: a single value with the NULLs is refused as well, only the value alone or the NULLs
/// alone fit.
async fn split_to_single_values(
    srv: &common::ch::ChServer,
    db: &ChDb,
    job: &str,
    split_column: &str,
    apart: bool,
) -> (i32, String) {
    let proxy = FaultProxy::start_http(srv.addr()).await;
    let (staging, single, nulls) = (
        format!("__backfill_{job}_s_"),
        format!("`{split_column}` = "),
        format!("`{split_column}` IS NULL"),
    );
    let (below, from) = (
        format!("`{split_column}` <"),
        format!("`{split_column}` >="),
    );
    let fits = move |t: &str| match apart {
        false => t.contains(&single),
        true => {
            let one = t.contains(&single);
            let only_nulls = t.contains(&nulls) && !t.contains(&below) && !t.contains(&from);
            one != t.contains(&nulls) && (one || only_nulls)
        }
    };
    let oom = proxy.add_rule(
        Rule::new(Fault::Answer(
            500,
            "Code: 241, e.displayText() = DB::Exception: Memory limit (for query) exceeded: \
             would use 11.87 MiB (attempt to allocate chunk of 3145728 bytes), maximum: \
             9.54 MiB, e.what() = DB::Exception\n"
                .into(),
        ))
        .matching(move |r| {
            let t = r.text();
            t.contains("SELECT * FROM src WHERE") && t.contains(&staging) && !fits(&t)
        }),
    );
    let spec = db.spec(
        &format!("{job}.yaml"),
        &format!(
            "name: {job}
clickhouse:
  url: {}
  source: src
  time_column: ran_at
  split_column: {split_column}
  chunks: [day, split]
  target: dst
  statement: INSERT INTO {{target}} SELECT * FROM src WHERE {{chunk}}
",
            proxy.url_for(&db.url)
        ),
    );
    let r = spawn(db.dir.path(), "run", &[], &spec);
    let (code, out, err) = r.finish(Duration::from_secs(60)).await;
    let all = all_output(&out, &err);
    assert!(proxy.rule_fired(oom) > 0, "{all}");
    (code, all)
}

/// `days_spec` with `range` (e.g. `  to: 2025-10-05\n`) under `clickhouse:`.
fn days_spec_in(db: &ChDb, job: &str, range: &str) -> PathBuf {
    let path = days_spec(db, job, "$URL", "");
    edit_spec(
        &path,
        "  time_column: ran_at\n",
        &format!("  time_column: ran_at\n{range}"),
    );
    path
}

/// Replace `from` with `to` in the spec file at `path`; returns the new text.
fn edit_spec(path: &std::path::Path, from: &str, to: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from:?} is not in {}", path.display());
    let text = text.replace(from, to);
    std::fs::write(path, &text).unwrap();
    text
}

ch_test! {
    /// Job names once mapped to table names many to one (`fill-x` and `fill_x`), and a job's
    /// clean-up matched by prefix (`fill_x`'s staging, `fill_x_s…`, took `fill_x_s2`'s base):
    /// a first run of `fill_x` restored the partitions `fill-x` had landed from `fill-x`'s
    /// ledger, losing its rows; its clean-up dropped other jobs' tables.
    #[test]
    fn jobs_never_share_or_drop_each_others_tables(srv) {
        let db = ChDb::new_on(&srv, "names");
        build_days(&db, 8, 500);
        let reference = source_digest(&db);
        let a = days_spec_in(&db, "fill-x", "  to: 2025-10-05\n");
        let (code, out, err) = run(&[&"run", &a]);
        assert_eq!(code, 0, "fill-x: {}", all_output(&out, &err));
        // What another job's base table and a renamed lock look like, for a job named
        // `fill_x_s2` and one named `lockfix`.
        for decoy in ["agg__backfill_fill_x_s2_base", "agg__backfill_lockfix_base"] {
            db.q(&format!("CREATE TABLE {decoy} AS agg"));
        }
        let b = days_spec_in(&db, "fill_x", "  from: 2025-10-05\n");
        let (code, out, err) = run(&[&"run", &b]);
        assert_eq!(code, 0, "fill_x: {}", all_output(&out, &err));
        assert_eq!(target_digest(&db), reference, "the two jobs together differ from the source");
        for decoy in ["agg__backfill_fill_x_s2_base", "agg__backfill_lockfix_base"] {
            assert!(db.has_table(decoy), "{decoy} was dropped by another job: {:?}", db.tables());
        }
        let bases: Vec<String> =
            db.tables().into_iter().filter(|t| t.ends_with("_base")).collect();
        assert_eq!(bases.len(), 4, "each job keeps its own base table: {bases:?}");

        // `fill.x` once had `fill_x`'s tables too: they are `fill_x`'s (it has a record), and
        // `fill.x` keeps its own (an empty range: done, nothing landed).
        let c = days_spec_in(&db, "fill.x", "  from: 2025-09-01\n  to: 2025-10-01\n");
        let (code, out, err) = run(&[&"run", &c]);
        assert_eq!(code, 0, "fill.x: {}", all_output(&out, &err));
        assert_eq!(target_digest(&db), reference);
        // Tables an earlier version left under a name no job with a record has: whose they are
        // cannot be told, so the job refuses, saying what to rename, and writes nothing.
        for t in ["agg__backfill_fill_y_base", "agg__backfill_fill_y_ledger"] {
            db.q(&format!("CREATE TABLE {t} AS agg"));
        }
        let before = db.tables();
        let d = days_spec_in(&db, "fill-y", "  from: 2025-09-01\n  to: 2025-10-01\n");
        let (code, out, err) = run(&[&"run", &d]);
        let all = all_output(&out, &err);
        assert_eq!(code, 1, "fill-y: {all}");
        assert!(all.contains("RENAME TABLE") && all.contains("agg__backfill_fill_y_base"), "{all}");
        assert_eq!(db.tables(), before, "the refused run wrote tables");
        assert!(db.records("fill-y").is_empty(), "the refused run wrote its state");
    }
}

ch_test! {
    /// Rows with a NULL time are in no chunk: refused before anything is written, unless
    /// `from` and `to` leave them out knowingly.
    #[test]
    fn a_null_time_is_refused_not_left_behind(srv) {
        let db = ChDb::new_on(&srv, "nulltime");
        build_days(&db, 3, 100);
        db.q("CREATE TABLE runs_n (ran_at Nullable(DateTime), project_id UInt32,
                                   test_case_id UInt64, duration_ms UInt32)
              ENGINE = MergeTree ORDER BY (project_id, test_case_id)");
        db.q("INSERT INTO runs_n SELECT * FROM runs");
        db.q("INSERT INTO runs_n VALUES (NULL, 1, 1, 5)");
        let spec = days_spec(&db, "nulls", "$URL", "");
        edit_spec(&spec, "  source: runs\n", "  source: runs_n\n");
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 1, "{all}");
        assert!(all.contains("clickhouse.time_column") && all.contains("1 row(s)"), "{all}");
        assert_eq!(db.num("SELECT count() FROM agg"), 0, "{all}");
        edit_spec(
            &spec,
            "  time_column: ran_at\n",
            "  time_column: ran_at\n  from: 2025-10-01\n  to: 2025-10-04\n",
        );
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert_eq!(target_digest(&db), source_digest(&db));
    }
}

ch_test! {
    /// A time column with a zone of its own is cut into days in that zone, as `toDate` cuts
    /// them: 18.16 read the chunks' bounds in the server's zone (UTC), and Tokyo's first nine
    /// hours of 2025 were in no chunk. Times never set (epoch 0, 1969-12-31 19:00 in New York)
    /// have the least Date: 18.16 prints it 0000-00-00, which once stopped every run, and the
    /// first chunk's lower bound (1970-01-01 00:00 in New York) left them out.
    #[test]
    fn a_zoned_time_column_is_cut_in_its_own_zone(srv) {
        let db = ChDb::new_on(&srv, "zoned");
        for (table, zone, rows) in [
            (
                "tokyo",
                "Asia/Tokyo",
                "SELECT toDateTime('2025-01-01 00:00:00', 'Asia/Tokyo') + number * 600,
                        number % 5, number FROM numbers(8000)",
            ),
            (
                "ny",
                "America/New_York",
                "SELECT toDateTime(0), number % 2, number FROM numbers(3) UNION ALL
                 SELECT toDateTime('1970-01-10 12:00:00', 'America/New_York') + number,
                        number % 2, 100 + number FROM numbers(10)",
            ),
        ] {
            db.q(&format!(
                "CREATE TABLE {table} (ran_at DateTime('{zone}'), project_id UInt32, v UInt64)
                 ENGINE = MergeTree PARTITION BY toYYYYMM(ran_at) ORDER BY (project_id, ran_at)"
            ));
            db.q(&format!("INSERT INTO {table} {rows}"));
            for t in [format!("{table}_days"), format!("{table}_ref")] {
                db.q(&format!(
                    "CREATE TABLE {t} (day Date, project_id UInt32, n UInt64, s UInt64)
                     ENGINE = MergeTree PARTITION BY toYYYYMM(day) ORDER BY (project_id, day)"
                ));
            }
            let select = format!(
                "SELECT toDate(ran_at) AS day, project_id, count(), sum(v) FROM {table}"
            );
            db.q(&format!("INSERT INTO {table}_ref {select} GROUP BY day, project_id"));
            let spec = db.spec(
                &format!("{table}.yaml"),
                &format!(
                    "name: {table}
clickhouse:
  url: $URL
  source: {table}
  time_column: ran_at
  target: {table}_days
  statement: |
    INSERT INTO {{target}} {select} WHERE {{chunk}} GROUP BY day, project_id
"
                ),
            );
            let (code, out, err) = run(&[&"run", &spec]);
            assert_eq!(code, 0, "{table}: {}", all_output(&out, &err));
            let digest = |t: &str| {
                db.q(&format!(
                    "SELECT day, project_id, sum(n), sum(s) FROM {t}
                      GROUP BY day, project_id ORDER BY day, project_id"
                ))
            };
            assert_eq!(digest(&format!("{table}_days")), digest(&format!("{table}_ref")), "{table}");
        }
    }
}

/// Current servers: a chunk's bounds must not move with the spec's `session_timezone` (the
/// range and the days are cut without it, in the server's zone), and a job from 1970-01-01 on
/// a Date32 column leaves the days before it out (the open first chunk is for DateTime's
/// saturated times only): both once lost or doubled rows.
#[test]
fn current_servers_cut_chunks_by_the_day_itself() {
    let srv = common::ch::ChServer::current();
    let db = ChDb::new_on(&srv, "sesstz");
    db.q("CREATE TABLE src (ran_at DateTime, d Date32, v UInt64)
          ENGINE = MergeTree PARTITION BY toYYYYMM(ran_at) ORDER BY ran_at");
    db.q(
        "INSERT INTO src SELECT toDateTime('2025-01-01 00:00:00') + number * 60,
                                 toDate32('1969-12-22') + intDiv(number, 144), number
            FROM numbers(2880)",
    );
    for t in ["by_time", "by_time_ref", "by_date", "by_date_ref"] {
        db.q(&format!(
            "CREATE TABLE {t} (day Date32, n UInt64, s UInt64) ENGINE = MergeTree ORDER BY day"
        ));
    }
    db.q(
        "INSERT INTO by_time_ref SELECT toDate(ran_at) AS day, count(), sum(v) FROM src
           GROUP BY day",
    );
    db.q(
        "INSERT INTO by_date_ref SELECT d AS day, count(), sum(v) FROM src
           WHERE d >= toDate32('1970-01-01') AND d < toDate32('1970-02-01') GROUP BY day",
    );
    let job = |name: &str, column: &str, target: &str, extra: &str| {
        db.spec(
            &format!("{name}.yaml"),
            &format!(
                "name: {name}
clickhouse:
  url: $URL
  source: src
  time_column: {column}
  target: {target}
{extra}  statement: |
    INSERT INTO {{target}} SELECT {day} AS day, count(), sum(v) FROM src WHERE {{chunk}} GROUP BY day
",
                day = if column == "d" { "d" } else { "toDate(ran_at)" },
            ),
        )
    };
    let digest = |t: &str| {
        db.q(&format!(
            "SELECT day, sum(n), sum(s) FROM {t} GROUP BY day ORDER BY day"
        ))
    };
    let by_time = job(
        "bytime",
        "ran_at",
        "by_time",
        "  settings: { session_timezone: 'Asia/Tokyo' }\n",
    );
    let (code, out, err) = run(&[&"run", &by_time]);
    assert_eq!(code, 0, "{}", all_output(&out, &err));
    assert_eq!(digest("by_time"), digest("by_time_ref"));
    let by_date = job(
        "bydate",
        "d",
        "by_date",
        "  from: 1970-01-01\n  to: 1970-02-01\n",
    );
    let (code, out, err) = run(&[&"run", &by_date]);
    assert_eq!(code, 0, "{}", all_output(&out, &err));
    assert_eq!(
        digest("by_date"),
        digest("by_date_ref"),
        "no day before 1970"
    );
    // A zone whose clocks spring forward at midnight (2025-09-07 starts at 01:00 in Santiago),
    // the greatest DateTime (a "never" sentinel), and DateTime64 past 2106: a bound written
    // as a local midnight or a DateTime lost rows of each.
    for (name, column, rows) in [
        (
            "santiago",
            "DateTime('America/Santiago')",
            "SELECT toDateTime('2025-09-05 00:00:00', 'America/Santiago') + number * 60, number
               FROM numbers(2880)",
        ),
        (
            "never",
            "DateTime",
            "SELECT toDateTime('2025-01-01 00:00:00') + number * 60, number FROM numbers(100)
             UNION ALL SELECT toDateTime(4294967295), 7",
        ),
        (
            "far",
            "DateTime64(3, 'UTC')",
            "SELECT toDateTime64('2120-01-01 00:00:00', 3, 'UTC') + number * 600, number
               FROM numbers(500)",
        ),
    ] {
        db.q(&format!(
            "CREATE TABLE {name} (ran_at {column}, v UInt64) ENGINE = MergeTree ORDER BY ran_at"
        ));
        db.q(&format!("INSERT INTO {name} {rows}"));
        for t in [format!("{name}_days"), format!("{name}_ref")] {
            db.q(&format!(
                "CREATE TABLE {t} (day Date32, n UInt64, s UInt64) ENGINE = MergeTree ORDER BY day"
            ));
        }
        db.q(&format!(
            "INSERT INTO {name}_ref SELECT toDate32(ran_at) AS day, count(), sum(v) FROM {name}
              GROUP BY day"
        ));
        let spec = db.spec(
            &format!("{name}.yaml"),
            &format!(
                "name: {name}
clickhouse:
  url: $URL
  source: {name}
  time_column: ran_at
  split_column: v
  chunks: [split]
  target: {name}_days
  statement: |
    INSERT INTO {{target}} SELECT toDate32(ran_at) AS day, count(), sum(v) FROM {name} WHERE {{chunk}} GROUP BY day
"
            ),
        );
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 0, "{name}: {}", all_output(&out, &err));
        assert_eq!(
            digest(&format!("{name}_days")),
            digest(&format!("{name}_ref")),
            "{name}"
        );
    }
}

/// 18.16's calendar ends with 2105: it reads a date written past it as 0
/// (`toDateTime('2106-01-01 00:00:00')` is 0), and its `toDate` puts the times of a DateTime's
/// last day, 2106-02-07 (the greatest DateTime, a "never" sentinel, among them), on day 0.
/// Those rows were in no chunk, and a chunk with a bound past 2105 read nothing at all: both
/// jobs ended done with exit 0. Now bounds past 2105 count days from its last day, and the
/// first chunk takes the rows of day 0, as `toDate` labels them.
#[test]
fn v18_times_past_the_calendar_are_in_exactly_one_chunk() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "calendarend");
    db.q("CREATE TABLE src (ran_at DateTime, v UInt64) ENGINE = MergeTree ORDER BY ran_at");
    db.q("INSERT INTO src SELECT toDateTime(number * 3600), number FROM numbers(100)");
    // From 2105-12-28 00:00 UTC every 10 hours to 2106-02-07 04:00, then the greatest DateTime.
    db.q(
        "INSERT INTO src SELECT toDateTime(4291401600 + number * 36000), 1000 + number
           FROM numbers(100)",
    );
    db.q("INSERT INTO src SELECT toDateTime(4294967295), 7");
    for t in ["first", "last", "reference"] {
        db.q(&format!(
            "CREATE TABLE {t} (day Date, n UInt64, s UInt64) ENGINE = MergeTree ORDER BY day"
        ));
    }
    db.q(
        "INSERT INTO reference SELECT toDate(ran_at) AS day, count(), sum(v) FROM src GROUP BY day",
    );
    for (name, range) in [
        (
            "first",
            "  chunks: [day]\n  from: 1970-01-01\n  to: 1970-01-06\n",
        ),
        (
            "last",
            "  chunks: [month]\n  from: 2105-12-27\n  to: 2106-02-08\n",
        ),
    ] {
        let spec = db.spec(
            &format!("{name}.yaml"),
            &format!(
                "name: {name}
clickhouse:
  url: $URL
  source: src
  time_column: ran_at
{range}  target: {name}
  statement: |
    INSERT INTO {{target}} SELECT toDate(ran_at) AS day, count(), sum(v) FROM src WHERE {{chunk}} GROUP BY day
"
            ),
        );
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 0, "{name}: {}", all_output(&out, &err));
    }
    let digest = |t: &str| {
        db.q(&format!(
            "SELECT day, sum(n), sum(s) FROM {t} GROUP BY day ORDER BY day"
        ))
    };
    let both = "(SELECT * FROM first UNION ALL SELECT * FROM last)";
    assert_eq!(
        digest(both),
        digest("reference"),
        "every row in exactly one chunk"
    );
    assert_eq!(
        db.num("SELECT sum(n) FROM last"),
        99,
        "2105-12-28 to 2106-02-06"
    );
    // A Date holds days to 2149, which 18.16 prints as 1970-01-01: the range read from the
    // source came out empty, and the job ended done with nothing landed.
    db.q("CREATE TABLE far (d Date, v UInt64) ENGINE = MergeTree ORDER BY d");
    db.q(
        "INSERT INTO far SELECT toDate('2105-12-31') + 30 + intDiv(number, 10), number
           FROM numbers(1500)",
    );
    for t in ["far_days", "far_reference"] {
        db.q(&format!(
            "CREATE TABLE {t} (day Date, n UInt64, s UInt64) ENGINE = MergeTree ORDER BY day"
        ));
    }
    db.q("INSERT INTO far_reference SELECT d AS day, count(), sum(v) FROM far GROUP BY day");
    let spec = db.spec(
        "far.yaml",
        "name: far
clickhouse:
  url: $URL
  source: far
  time_column: d
  target: far_days
  statement: |
    INSERT INTO {target} SELECT d AS day, count(), sum(v) FROM far WHERE {chunk} GROUP BY day
",
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{}", all_output(&out, &err));
    let by_number = |t: &str| {
        db.q(&format!(
            "SELECT toUInt16(day) AS k, sum(n), sum(s) FROM {t} GROUP BY k ORDER BY k"
        ))
    };
    assert_eq!(by_number("far_days"), by_number("far_reference"));
}

ch_test! {
    /// A job's range is fixed at its first run. A `to` moved later on a job not yet done was
    /// ignored ("resuming at the checkpoint with the new spec"), and the job ended done without
    /// the added days: refused now, naming the field.
    #[test]
    fn a_range_edited_after_the_first_run_is_refused(srv) {
        let db = ChDb::new_on(&srv, "edited");
        build_days(&db, 4, 100);
        let spec = days_spec(&db, "edited", "$URL", "");
        // The first run fails on its second day: the job stays unfinished.
        edit_spec(&spec, "  time_column: ran_at\n", "  time_column: ran_at\n  from: 2025-10-01\n  to: 2025-10-03\n");
        edit_spec(&spec, "FROM runs WHERE {chunk}", "FROM runs WHERE {chunk} AND throwIf(toDate(ran_at) = '2025-10-02') = 0");
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 1, "{}", all_output(&out, &err));
        edit_spec(&spec, " AND throwIf(toDate(ran_at) = '2025-10-02') = 0", "");
        edit_spec(&spec, "  to: 2025-10-03\n", "  to: 2025-10-05\n");
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 2, "{all}");
        assert!(err.contains("clickhouse.to") && err.contains("2025-10-01..2025-10-03"), "{all}");
    }
}

ch_test! {
    /// A job's chunks are cut at its first run (`chunks`, `split_column`), and a chunk's id is
    /// its place in that cut. `chunks` edited on a job not yet done gave the done chunks other
    /// ids: they were not found done, landed again, and the job ended done with those days in
    /// the target twice. Refused now, naming the fields; the cut it started with finishes it.
    #[test]
    fn a_cut_edited_after_the_first_run_is_refused(srv) {
        let db = ChDb::new_on(&srv, "recut");
        build_days(&db, 4, 100);
        let reference = source_digest(&db);
        let spec = days_spec(&db, "recut", "$URL", "");
        // The first run fails on its second day: the job stays unfinished, one day landed.
        edit_spec(&spec, "FROM runs WHERE {chunk}", "FROM runs WHERE {chunk} AND throwIf(toDate(ran_at) = '2025-10-02') = 0");
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 1, "{}", all_output(&out, &err));
        edit_spec(&spec, " AND throwIf(toDate(ran_at) = '2025-10-02') = 0", "");
        edit_spec(&spec, "  chunks: [day]\n", "  chunks: [month, day]\n");
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 2, "{all}");
        assert!(err.contains("clickhouse.chunks") && err.contains("[day]"), "{all}");
        edit_spec(&spec, "  chunks: [month, day]\n", "  chunks: [day]\n");
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert_eq!(target_digest(&db), reference, "{all}");
    }
}

ch_test! {
    /// A job's clean-up cut short after its done record (here a lost answer to the query that
    /// finds its staging tables; a kill in between does the same): the job said done, exit 0,
    /// but its lock table stayed, and every other job on the target stopped with 75 for good
    /// ("it keeps the target until it is done"), a rerun of the done job only skipping it. A
    /// target kept by a job recorded done, with no runner left, is free now.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_done_job_whose_clean_up_was_cut_short_frees_the_target(srv) {
        let db = ChDb::new_on(&srv, "cutshort");
        build_days(&db, 4, 200);
        let reference = source_digest(&db);
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let lost = proxy.lose_staging_listing();
        let first = days_spec(&db, "first", &proxy.url_for(&db.url), "");
        edit_spec(&first, "  time_column: ran_at\n", "  time_column: ran_at\n  from: 2025-10-01\n  to: 2025-10-03\n");
        let (code, out, err) = run(&[&"run", &first]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert_eq!(proxy.rule_fired(lost), 4, "{all}");
        assert!(db.tables().iter().any(|t| t == "agg__backfill_lock"), "{all}");
        let second = days_spec_in(&db, "second", "  from: 2025-10-03\n  to: 2025-10-05\n");
        let (code, out, err) = run(&[&"run", &second]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(err.contains("is done but still kept the target"), "{all}");
        assert_eq!(target_digest(&db), reference, "{all}");
    }
}

ch_test! {
    /// A read whose answer is lost (the connection cut before it came) is sent again: one such
    /// loss, at the first request or at a landing's read of the target's parts, failed the run
    /// with exit 1 ("cannot connect ... is ClickHouse running?").
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_whose_answer_is_lost_is_sent_again(srv) {
        let db = ChDb::new_on(&srv, "lostread");
        build_days(&db, 3, 200);
        let reference = source_digest(&db);
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let first = proxy.add_rule(
            Rule::new(Fault::DropResponse)
                .matching(|r| r.text().contains("SELECT version()"))
                .nth(1),
        );
        let parts = proxy.add_rule(
            Rule::new(Fault::DropResponse)
                .matching(|r| r.text().contains("FROM system.parts"))
                .nth(2),
        );
        let spec = days_spec(&db, "lostread", &proxy.url_for(&db.url), "");
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!((proxy.rule_fired(first), proxy.rule_fired(parts)), (1, 1), "{all}");
        assert_eq!(code, 0, "{all}");
        assert_eq!(target_digest(&db), reference, "{all}");
    }
}

ch_test! {
    /// A write of the job's state at start-up whose answer is lost (the job's row, the row
    /// that notes the target's merges stopped): the write may have been made, and writing it
    /// again is writing it once. The run failed with exit 1 ("writing the job's state:
    /// network error"); it is sent again now.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_state_write_whose_answer_is_lost_is_sent_again(srv) {
        let db = ChDb::new_on(&srv, "lostwrite");
        build_days(&db, 3, 200);
        let reference = source_digest(&db);
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let lost = proxy.add_rule(
            Rule::new(Fault::DropResponse)
                .matching(|r| {
                    let t = r.text();
                    t.contains("INSERT INTO") && t.contains("backfill_chunks")
                })
                .nth(1),
        );
        let spec = days_spec(&db, "lostwrite", &proxy.url_for(&db.url), "");
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(proxy.rule_fired(lost), 1, "{all}");
        assert_eq!(code, 0, "{all}");
        assert_eq!(target_digest(&db), reference, "{all}");
    }
}

ch_test! {
    /// A `to` in the future: the chunks of days to come ran empty, were recorded done, and the
    /// rows those days brought were never filled (exit 0, the job done). Refused now by `plan`
    /// and `run` alike at a job's first start, before anything is written (not by `validate`:
    /// a spec may be written ahead of its window).
    #[test]
    fn a_range_ending_after_tomorrow_is_refused(srv) {
        let db = ChDb::new_on(&srv, "future");
        build_days(&db, 2, 100);
        let spec = days_spec_in(&db, "future", "  from: 2025-10-01\n  to: 2099-01-01\n");
        let (code, out, err) = run(&[&"validate", &spec]);
        assert_eq!(code, 0, "a spec written ahead of its window: {}", all_output(&out, &err));
        for cmd in ["plan", "run"] {
            let (code, out, err) = run(&[&cmd, &spec]);
            let all = all_output(&out, &err);
            assert_eq!(code, 2, "{cmd}: {all}");
            assert!(err.contains("clickhouse.to: 2099-01-01 is after tomorrow"), "{cmd}: {all}");
        }
        assert_eq!(db.num("SELECT count() FROM agg"), 0);
        let left: Vec<String> = db.tables().into_iter().filter(|t| t.contains("__backfill")).collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

/// `DateTime64` (current servers) holds times a Date cannot: the chunks' dates would wrap them
/// around and no chunk would read them. Refused, naming the field.
#[test]
fn a_time_outside_what_a_date_holds_is_refused() {
    let srv = common::ch::ChServer::current();
    let db = ChDb::new_on(&srv, "widetime");
    build_days(&db, 3, 100);
    db.q(
        "CREATE TABLE runs_w (ran_at DateTime64(3), project_id UInt32, test_case_id UInt64,
                               duration_ms UInt32)
          ENGINE = MergeTree ORDER BY (project_id, test_case_id)",
    );
    db.q("INSERT INTO runs_w SELECT * FROM runs");
    db.q("INSERT INTO runs_w VALUES ('1965-06-01 00:00:00', 1, 1, 5), ('2200-03-01 00:00:00', 1, 2, 5)");
    let spec = days_spec(&db, "wide", "$URL", "");
    edit_spec(&spec, "  source: runs\n", "  source: runs_w\n");
    let (code, out, err) = run(&[&"run", &spec]);
    let all = all_output(&out, &err);
    assert_eq!(code, 1, "{all}");
    assert!(
        all.contains("clickhouse.time_column") && all.contains("2 row(s)"),
        "{all}"
    );
    assert_eq!(db.num("SELECT count() FROM agg"), 0, "{all}");
}

/// What `merge_right_after_a_landing` does while the read after a landing is held.
struct Window {
    /// Which landing statement (1-based): the fifth is the second day's first partition, where
    /// the first day's parts are; the first lands in an empty partition.
    nth: u32,
    /// Another writer's insert first (SQL, `{p}` the partition's id).
    insert: Option<&'static str>,
    /// Kill the runner -9 first (the move made, not noted).
    kill: bool,
}

/// Another writer's row, into a project of partition `{p}` no source row has.
const OTHER_PROJECT: &str = "INSERT INTO agg SELECT toUInt32(400 + {p}), 1, countState(),
                                    sumState(toUInt32(1)) FROM numbers(1)";

/// Run the `build_days` job `job` (3 days) through a proxy that holds the read of the target's
/// parts after landing `w.nth`, and meanwhile merge that partition (what the server's background
/// merges may do then; refused on 18.16, whose landings stop merges), as `w` says. Returns the
/// run's exit code and output.
async fn merge_right_after_a_landing(
    srv: &common::ch::ChServer,
    db: &ChDb,
    job: &str,
    w: Window,
) -> (i32, String) {
    let proxy = FaultProxy::start_http(srv.addr()).await;
    let landed = std::sync::Arc::new(std::sync::Mutex::new((0u32, String::new())));
    let seen = landed.clone();
    let held = proxy.add_rule(
        Rule::new(Fault::HoldUntilReleased)
            .matching(move |r| {
                let t = r.text();
                let mut s = seen.lock().unwrap();
                if lands(&t) {
                    s.0 += 1;
                    if s.0 == w.nth {
                        let id = t.split("PARTITION ID '").nth(1).unwrap_or("");
                        s.1 = id.split('\'').next().unwrap_or("").to_string();
                    }
                    return false;
                }
                s.0 == w.nth && t.contains("FROM system.parts")
            })
            .times(1),
    );
    let spec = days_spec(db, job, &proxy.url_for(&db.url), "");
    let mut r = spawn(db.dir.path(), job, &[], &spec);
    r.wait_until(
        "the read after a landing",
        Duration::from_secs(120),
        Duration::from_millis(20),
        async || proxy.rule_fired(held) > 0,
    )
    .await;
    let p = landed.lock().unwrap().1.clone();
    assert!(!p.is_empty(), "the landing's partition");
    if w.kill {
        r.kill();
    }
    if let Some(sql) = w.insert {
        db.q(&sql.replace("{p}", &p));
    }
    let merged = db.try_q(&format!("OPTIMIZE TABLE agg PARTITION ID '{p}' FINAL"));
    if w.kill {
        return (-9, format!("partition {p}, merged: {merged:?}"));
    }
    proxy.release_held();
    let (code, out, err) = r.finish(Duration::from_secs(120)).await;
    (
        code,
        format!(
            "partition {p}, merged: {merged:?}\n{}",
            all_output(&out, &err)
        ),
    )
}

ch_test! {
    /// A merge that folded a chunk's just-moved parts into the partition's older ones, between
    /// the move and the read after it, made the job count the older rows as another writer's
    /// (CI, current server: `--rerun` and `reset` then refused to start over, exit 1). Each
    /// arrival is now read from its own part, outdated by the merge but still listed: nothing
    /// is counted then, and another writer's row that the merge folded in as well still is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_merge_right_after_a_landing_is_not_taken_for_another_writer(srv) {
        let db = ChDb::new_on(&srv, "mergewin");
        build_days(&db, 3, 1000);
        let reference = source_digest(&db);
        let (code, all) = merge_right_after_a_landing(&srv, &db, "mergewin", Window {
            nth: 5,
            insert: None,
            kill: false,
        })
        .await;
        assert_eq!(code, 0, "{all}");
        assert!(!all.contains("by another writer"), "{all}");
        assert_eq!(target_digest(&db), reference, "{all}");
        let spec = days_spec(&db, "mergewin", &db.url, "");
        let (code, out, err) = run(&[&"run", &"--rerun", &spec]);
        assert_eq!(code, 0, "{all}\n{}", all_output(&out, &err));
        assert_eq!(target_digest(&db), reference);

        let db = ChDb::new_on(&srv, "mergewin2");
        build_days(&db, 3, 1000);
        let (code, all) = merge_right_after_a_landing(&srv, &db, "mergewin", Window {
            nth: 5,
            insert: Some(OTHER_PROJECT),
            kill: false,
        })
        .await;
        assert_eq!(code, 0, "{all}");
        assert!(all.contains("1 row(s) were written into partition"), "{all}");
        let spec = days_spec(&db, "mergewin", &db.url, "");
        let (code, out, err) = run(&[&"run", &"--rerun", &spec]);
        let again = all_output(&out, &err);
        assert_eq!(code, 1, "{all}\n{again}");
        assert!(again.contains("holds 1 row(s) another writer put there"), "{again}");
    }
}

ch_test! {
    /// A runner killed after a move went in, before its note: a merge that folds the moved
    /// parts into older ones before the replay made the replay count the older rows as
    /// another writer's (warned, and `--rerun` refused). On 18.16, merges stay stopped until
    /// the replay (the merge is refused) and the outcome is the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_merge_between_a_killed_landing_and_its_replay_is_not_taken_for_another_writer(
        srv
    ) {
        let db = ChDb::new_on(&srv, "mergekill");
        build_days(&db, 3, 1000);
        let reference = source_digest(&db);
        let (_, how) = merge_right_after_a_landing(&srv, &db, "mergekill", Window {
            nth: 5,
            insert: None,
            kill: true,
        })
        .await;
        let spec = days_spec(&db, "mergekill", &db.url, "");
        let (code, out, err) = run(&[&"run", &spec]);
        let all = format!("{how}\n{}", all_output(&out, &err));
        assert_eq!(code, 0, "{all}");
        assert!(!all.contains("by another writer"), "{all}");
        assert_eq!(target_digest(&db), reference, "{all}");
        let (code, out, err) = run(&[&"run", &"--rerun", &spec]);
        assert_eq!(code, 0, "{all}\n{}", all_output(&out, &err));
        assert_eq!(target_digest(&db), reference);
    }
}

ch_test! {
    /// After an adversarial pass (current server): a runner killed after a move into an empty
    /// partition, before its note; another writer's row with a key the chunk has; a merge of
    /// the two parts (the row folds into the chunk's: the merged part has the chunk's row
    /// count). The replay counted no other writer's rows, and `--rerun` restored the partition,
    /// dropping that row, exit 0. Each arrival is now read from its own part (and once those
    /// have left the list, the count is not exact and counts one: `arrivals.rs`'s tests), so
    /// `--rerun` refuses.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_writers_row_folded_into_a_killed_landings_part_is_not_taken_for_the_jobs(
        srv
    ) {
        let db = ChDb::new_on(&srv, "mergefold");
        build_days(&db, 3, 1000);
        // A key the first day's chunk lands in each partition: project p (or p + 4), case 1..
        const SAME_KEY: &str = "INSERT INTO agg SELECT project_id, test_case_id, countState(),
                                       sumState(toUInt32(1000000))
                                  FROM (SELECT project_id, test_case_id FROM runs
                                         WHERE toDate(ran_at) = '2025-10-01'
                                           AND toString(project_id % 4) = '{p}'
                                         ORDER BY project_id, test_case_id LIMIT 1)
                                 GROUP BY project_id, test_case_id";
        let (_, how) = merge_right_after_a_landing(&srv, &db, "mergefold", Window {
            nth: 1,
            insert: Some(SAME_KEY),
            kill: true,
        })
        .await;
        let spec = days_spec(&db, "mergefold", &db.url, "");
        let (code, out, err) = run(&[&"run", &spec]);
        let all = format!("{how}\n{}", all_output(&out, &err));
        assert_eq!(code, 0, "{all}");
        let theirs = "SELECT count() FROM (SELECT sumMerge(total) AS s FROM agg
                        GROUP BY project_id, test_case_id) WHERE s >= 1000000";
        assert_eq!(db.num(theirs), 1, "{all}");
        let (code, out, err) = run(&[&"run", &"--rerun", &spec]);
        let again = all_output(&out, &err);
        assert_eq!(code, 1, "{all}\n{again}");
        assert!(again.contains("another writer put there"), "{again}");
        assert_eq!(db.num(theirs), 1, "the other writer's row is kept\n{again}");
    }
}

/// Current servers (after an adversarial pass): as above, but the move goes into a partition
/// that holds the first day's rows, and the merge folds them in too. Then the merge's sources
/// leave the list (its `old_parts_lifetime` over, cleaned up), another writer's row with
/// another of the chunk's keys arrives, and a second merge folds it into the first one. Only
/// the second merge's sources are listed: the first merge, which holds the first folded row,
/// cannot be taken apart. The count took the top block's own part (one row) for all that
/// arrived, less the move's own rows: none, and `--rerun` (or `reset`, then `run`) dropped
/// the other writer's rows, exit 0. Every merged part is taken apart now, and one that cannot
/// be makes the count not exact: the rerun refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_a_merge_of_a_merge_whose_sources_are_gone_keeps_another_writers_rows() {
    let srv = common::ch::ChServer::current();
    let db = ChDb::new_on(&srv, "mergemerge");
    build_days(&db, 3, 1000);
    const SAME_KEY: &str = "INSERT INTO agg SELECT project_id, test_case_id, countState(),
                                   sumState(toUInt32(1000000))
                              FROM (SELECT project_id, test_case_id FROM runs
                                     WHERE toDate(ran_at) = '2025-10-01'
                                       AND toString(project_id % 4) = '{p}'
                                     ORDER BY project_id, test_case_id LIMIT 1)
                             GROUP BY project_id, test_case_id";
    let (_, how) = merge_right_after_a_landing(
        &srv,
        &db,
        "mergemerge",
        Window {
            nth: 5,
            insert: Some(SAME_KEY),
            kill: true,
        },
    )
    .await;
    let p = how
        .strip_prefix("partition ")
        .and_then(|s| s.split(',').next())
        .expect("the partition")
        .to_string();
    let parts = |active: u8| {
        db.num(&format!(
            "SELECT count() FROM system.parts WHERE database = currentDatabase()
                AND table = 'agg' AND partition_id = '{p}' AND active = {active}"
        ))
    };
    // The first merge's sources leave the list.
    db.q("ALTER TABLE agg MODIFY SETTING old_parts_lifetime = 0");
    let mut waited = 0;
    while parts(0) > 0 {
        db.q("SYSTEM START CLEANUP agg");
        assert!(
            waited < 600,
            "the first merge's sources are still listed\n{how}"
        );
        std::thread::sleep(Duration::from_millis(100));
        waited += 1;
    }
    db.q("ALTER TABLE agg MODIFY SETTING old_parts_lifetime = 480");
    // Another key the chunk has: it folds too, and the partition keeps the chunk's count.
    db.q(&SAME_KEY
        .replace("{p}", &p)
        .replace("LIMIT 1", "LIMIT 1 OFFSET 1"));
    db.q(&format!("OPTIMIZE TABLE agg PARTITION ID '{p}' FINAL"));
    assert_eq!(parts(1), 1, "{how}");
    assert_eq!(parts(0), 2, "the second merge's sources are listed\n{how}");
    let spec = days_spec(&db, "mergemerge", &db.url, "");
    let (code, out, err) = run(&[&"run", &spec]);
    let all = format!("{how}\n{}", all_output(&out, &err));
    assert_eq!(code, 0, "{all}");
    let theirs = "SELECT count() FROM (SELECT sumMerge(total) AS s FROM agg
                                        GROUP BY project_id, test_case_id)
                   WHERE s >= 1000000";
    assert_eq!(db.num(theirs), 2, "{all}");
    for how in [&["run", "--rerun"][..], &["reset", "--yes"][..]] {
        let args: Vec<&dyn AsRef<std::ffi::OsStr>> = how
            .iter()
            .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
            .chain([&spec as &dyn AsRef<std::ffi::OsStr>])
            .collect();
        let (code, out, err) = run(&args);
        let again = all_output(&out, &err);
        if how[0] == "reset" {
            assert_eq!(code, 0, "{again}");
            let (code, out, err) = run(&[&"run", &spec]);
            let again = all_output(&out, &err);
            assert_eq!(code, 1, "{all}\n{again}");
            assert!(again.contains("another writer put there"), "{again}");
        } else {
            assert_eq!(code, 1, "{all}\n{again}");
            assert!(again.contains("another writer put there"), "{again}");
        }
        assert_eq!(
            db.num(theirs),
            2,
            "the other writer's rows are kept\n{again}"
        );
    }
}

ch_test! {
    #[test]
    fn rerun_reset_and_a_dropped_state_table_land_every_chunk_once(srv) {
        let db = ChDb::new_on(&srv, "again");
        build_days(&db, 10, 1000);
        // The target held rows of its own before the job: they stay.
        db.q("INSERT INTO agg SELECT 99, number, countState(), sumState(toUInt32(1))
                FROM numbers(10) GROUP BY number");
        let own = "SELECT count(), sum(c) FROM (SELECT test_case_id, countMerge(runs) AS c
                     FROM agg WHERE project_id = 99 GROUP BY test_case_id)";
        let theirs = db.q(own);
        let only_job = |db: &ChDb| {
            db.q("SELECT count(), sum(c), sum(s), sum(cityHash64(project_id, test_case_id, c, s))
                    FROM (SELECT project_id, test_case_id, countMerge(runs) AS c,
                                 sumMerge(total) AS s
                            FROM agg WHERE project_id <> 99 GROUP BY project_id, test_case_id)")
        };
        let reference = source_digest(&db);
        let spec = days_spec(&db, "again", "$URL", "");
        let done = |what: &str| {
            let (code, out, err) = run(&[&"run", &"--rerun", &spec]);
            assert_eq!(code, 0, "{what}: {}", all_output(&out, &err));
        };
        done("first run");
        assert_eq!(only_job(&db), reference, "first run");
        done("--rerun");
        assert_eq!(only_job(&db), reference, "--rerun lands every chunk once");
        let (code, out, err) = run(&[&"reset", &"--yes", &spec]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert!(out.contains("restores"), "{out}");
        done("run after reset");
        assert_eq!(only_job(&db), reference, "reset then run lands every chunk once");
        db.q("DROP TABLE backfill_chunks");
        done("run after the state table was dropped");
        assert_eq!(only_job(&db), reference, "a lost state table lands every chunk once");
        assert_eq!(db.q(own), theirs, "the target's own rows were kept throughout");
    }
}

ch_test! {
    /// `run --rerun` of a finished job, killed while it restores the target (one partition
    /// back to what it held before the job, the next one not yet): the next run must not take
    /// the job for done. It did, because the restore came before the job's records were
    /// forgotten: "skipped (already done)", exit 0, and the restored partition's rows gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rerun_killed_while_it_restores_loses_no_row(srv) {
        let db = ChDb::new_on(&srv, "rerunkill");
        build_days(&db, 6, 1000);
        let reference = source_digest(&db);
        let spec = days_spec(&db, "rerunkill", "$URL", "");
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert_eq!(target_digest(&db), reference);
        // The target (agg) has four partitions: the restore's second one is held, after the
        // first is dropped.
        let what = "the restore's second partition";
        kill_when_held(&srv, &db, "rerunkill", &["--rerun"], "", 2, what, |t| {
            t.contains("DROP PARTITION") || t.contains("REPLACE PARTITION")
        })
        .await;
        assert_ne!(target_digest(&db), reference, "the first partition was restored");
        let spec = days_spec(&db, "rerunkill", "$URL", "");
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(!out.contains("0 run, 1 skipped"), "taken for done: {all}");
        assert_eq!(target_digest(&db), reference, "every row once: {all}");
    }
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_writer_keeps_its_rows_and_another_job_is_refused(srv) {
        let db = ChDb::new_on(&srv, "writers");
        build_days(&db, 30, 2000);
        let reference = source_digest(&db);
        let spec = days_spec(&db, "first", "$URL", "");
        let mut r = spawn(db.dir.path(), "first", &[], &spec);
        // Another job on the same target is refused while the first holds it.
        r.wait_until(
            "the first job to land a chunk",
            Duration::from_secs(60),
            Duration::from_millis(10),
            async || db.chunks("first").iter().any(|c| c.status == "done"),
        )
        .await;
        let second = days_spec(&db, "second", "$URL", "");
        let (code, out, err) = run(&[&"run", &second]);
        assert_eq!(code, 75, "{}", all_output(&out, &err));
        assert!(err.contains("job \"first\"") && err.contains("same target"), "{err}");
        // Another writer inserts into the target while the job lands chunks: its rows stay.
        let mut written = 0u64;
        while !r.exited() && written < 100 {
            db.q(&format!(
                "INSERT INTO agg SELECT 77, {written}, countState(), sumState(toUInt32(5))
                   FROM numbers(1)"
            ));
            written += 1;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        let (code, out, err) = r.finish(Duration::from_secs(300)).await;
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert!(written > 5, "the job ended before the writer got going");
        assert_eq!(
            db.num("SELECT count() FROM (SELECT test_case_id FROM agg WHERE project_id = 77
                                          GROUP BY test_case_id)"),
            written,
            "rows of the other writer were lost"
        );
        let job_rows = db.q("SELECT count(), sum(c), sum(s), sum(cityHash64(project_id, test_case_id, c, s))
                    FROM (SELECT project_id, test_case_id, countMerge(runs) AS c,
                                 sumMerge(total) AS s
                            FROM agg WHERE project_id <> 77 GROUP BY project_id, test_case_id)");
        assert_eq!(job_rows, reference);
        // Done: the target is free for the second job.
        let (code, out, err) = run(&[&"plan", &second]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
    }
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_workers_land_every_chunk_once(srv) {
        let db = ChDb::new_on(&srv, "workers");
        build_days(&db, 40, 2000);
        let reference = source_digest(&db);
        let spec = days_spec(&db, "pair", "$URL", "workers: 2\n");
        let mut cmd = common::backfill();
        let out = cmd
            .env("BACKFILL_LOG", "debug")
            .arg("run")
            .arg(&spec)
            .output()
            .unwrap();
        let (o, e) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert_eq!(out.status.code(), Some(0), "{}", all_output(&o, &e));
        assert!(o.contains("by 2 workers"), "{o}");
        for w in ["w0", "w1"] {
            assert!(
                e.lines().any(|l| l.contains("claimed") && l.contains(&format!("worker=\"{w}\""))),
                "worker {w} never claimed a chunk:\n{e}"
            );
        }
        assert_eq!(target_digest(&db), reference);
        assert_eq!(db.chunks("pair").len(), 40);
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
        // Days of 40,000 events: current servers write whole 8,192-row blocks before an error,
        // so the failing row must come after the first blocks.
        build_events(&db, 40_000);
        db.q("INSERT INTO out SELECT toDate('2020-01-01'), number, 7 FROM numbers(10)");
        let before = out_digest(&db);
        let settings: [(&str, &str); 5] = [
            ("max_block_size", "100"),
            ("max_insert_block_size", "100"),
            ("min_insert_block_size_rows", "100"),
            ("min_insert_block_size_bytes", "0"),
            ("max_threads", "1"),
        ];
        let statement = events_statement("throwIf(k = 39000)");
        // The injection does write part of the chunk when the insert goes straight to a table.
        db.q("CREATE TABLE probe AS out");
        let day1 = "`ran_at` >= '2025-11-01 00:00:00' AND `ran_at` < '2025-11-02 00:00:00'";
        let direct = db.try_q_with(
            &statement.replace("{target}", "probe").replace("{chunk}", day1),
            &settings,
        );
        assert!(direct.as_ref().is_err_and(|e| e.contains("Code: 395")), "{direct:?}");
        let partial = db.num("SELECT count() FROM probe");
        assert!(
            (100..=39000).contains(&partial),
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
        assert!(
            !working_tables(&db).iter().any(|t| t.contains("__backfill_") && t.contains("_s")),
            "the staging table is dropped: {:?}",
            db.tables()
        );
        let rec = db.record("partial", "2025-11-01").expect("the chunk's record");
        assert_ne!(rec.status, "done", "{rec:?}");
        assert_eq!((rec.attempts, rec.code), (1, 395), "{rec:?}");
        let job = db.record("partial", "").unwrap();
        assert_eq!(job.status, "failed", "{job:?}");
        assert!(job.error.contains("Code: 395"), "{job:?}");
        assert_eq!(db.chunks("partial").len(), 1, "later chunks were not started");
    }
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transient_error_is_retried_at_the_same_size(srv) {
        let db = ChDb::new_on(&srv, "transient");
        // Four events in one month; the statement sleeps 0.7 s per row while the flag in `ctl`
        // says so, and max_execution_time is 2 s: Code 159 TIMEOUT_EXCEEDED until the flag is
        // cleared.
        db.q("CREATE TABLE ev (ran_at DateTime, k UInt64, v UInt32)
          ENGINE = MergeTree PARTITION BY toYYYYMM(ran_at) ORDER BY ran_at");
        db.q("INSERT INTO ev SELECT toDateTime('2025-11-01 00:00:00') + number * 40000, number,
                               toUInt32(number) FROM numbers(4)");
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
                    .is_some_and(|c| c.attempts >= 1 && c.code == 159)
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
            (month.chunk.as_str(), month.level.as_str(), month.status.as_str()),
            ("2025-11", "month", "done"),
            "{month:?}"
        );
        assert!(month.attempts >= 2, "{month:?}");
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

        // One day fails mid-run (a non-memory server error, with a `?` in its message): the job
        // fails at that chunk, and the message is recorded as the server wrote it.
        let spec = events_spec(
            &db,
            "errors",
            "[day]",
            "{}",
            &events_statement(
                "toUInt32(if(toDate(ran_at) = toDate('2025-11-02'), 'what? no', '0'))",
            ),
        );
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 1, "{all}");
        assert!(err.contains("chunk 2025-11-02: Code: 6"), "{all}");
        assert!(err.contains("what? no"), "{all}");
        let recs = by_chunk(db.chunks("errors"));
        assert_eq!(
            recs.keys().collect::<Vec<_>>(),
            ["2025-11-01", "2025-11-02"],
            "{recs:?}"
        );
        assert_eq!(
            (recs["2025-11-01"].status.as_str(), recs["2025-11-01"].attempts),
            ("done", 1)
        );
        let failed = &recs["2025-11-02"];
        assert_ne!(failed.status, "done", "{failed:?}");
        assert_eq!((failed.attempts, failed.code), (1, 6), "{failed:?}");
        assert!(failed.error.contains("what? no"), "{failed:?}");
        let job = db.record("errors", "").unwrap();
        assert_eq!(job.status, "failed");
        assert!(job.error.contains("Code: 6"), "{job:?}");
        assert_eq!(
            out_digest(&db),
            ev_digest(&db, "toDate(ran_at) = '2025-11-01'"),
            "the target holds the done chunk only"
        );

        // Fixed (and with a `?` in a literal of its own): resumes at the failed chunk; the done
        // one is not run again.
        let spec = events_spec(
            &db,
            "errors",
            "[day]",
            "{}",
            &events_statement("(length('why?') - 4)"),
        );
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(err.contains("spec changed since the last checkpoint"), "{all}");
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

ch_test! {
    #[test]
    fn a_chunk_that_cannot_fit_is_named_by_its_value(srv) {
        let db = ChDb::new_on(&srv, "nofit");
        // One day, two projects: project 1 holds 300,000 distinct keys, project 2 ten.
        db.q("CREATE TABLE ev (ran_at DateTime, project_id UInt32, k UInt64)
              ENGINE = MergeTree PARTITION BY toYYYYMM(ran_at) ORDER BY (project_id, ran_at)");
        db.q("INSERT INTO ev SELECT toDateTime('2025-11-01 01:00:00'), 1, number FROM numbers(300000)");
        db.q("INSERT INTO ev SELECT toDateTime('2025-11-01 02:00:00'), 2, number FROM numbers(10)");
        db.q("CREATE TABLE out (project_id UInt32, ks AggregateFunction(groupUniqArray, UInt64))
              ENGINE = AggregatingMergeTree ORDER BY project_id");
        let spec = db.spec(
            "nofit.yaml",
            "name: nofit
clickhouse:
  url: $URL
  source: ev
  time_column: ran_at
  split_column: project_id
  target: out
  settings: { max_memory_usage: 4000000 }
  statement: |
    INSERT INTO {target}
    SELECT project_id, groupUniqArrayState(k) FROM ev WHERE {chunk} GROUP BY project_id
",
        );
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 1, "{all}");
        assert!(
            err.contains("chunk 2025-11-01/project_id=1 exceeds the memory limit even as the smallest chunk"),
            "the chunk is named by its value: {all}"
        );
        let recs = by_chunk(db.chunks("nofit"));
        let one = &recs["2025-11-01/project_id=1"];
        assert_eq!((one.status.as_str(), one.code), ("failed", 241), "{recs:?}");
        assert_eq!(recs["2025-11-01"].children.len(), 2, "{recs:?}");
    }
}

ch_test! {
    #[test]
    fn a_group_by_larger_than_half_the_cap_spills_and_lands_at_its_first_attempt(srv) {
        let db = ChDb::new_on(&srv, "spill");
        // One day, eight million distinct keys: the GROUP BY needs ~290 MiB in memory on both
        // servers, over the 300 MB cap, and fits when it spills to disk at half of it (the
        // engine spills under caps of 256 MiB and more).
        db.q("CREATE TABLE ev (ran_at DateTime, k UInt64)
              ENGINE = MergeTree PARTITION BY toYYYYMM(ran_at) ORDER BY ran_at");
        db.q("INSERT INTO ev SELECT toDateTime('2025-11-01 00:00:00') + (number % 86400),
                     intHash64(number) FROM numbers(8000000)");
        db.q("CREATE TABLE out (k UInt64, c AggregateFunction(count))
              ENGINE = AggregatingMergeTree ORDER BY k");
        let statement = "INSERT INTO {target} SELECT k, countState() FROM ev WHERE {chunk} GROUP BY k";
        let alone = db.try_q_with(
            &statement.replace("{target}", "out").replace("{chunk}", "1"),
            &[("max_memory_usage", "300000000"), ("max_threads", "1")],
        );
        assert!(
            alone.as_ref().is_err_and(|e| e.contains("Code: 241")),
            "the month alone should exceed the cap: {alone:?}"
        );
        // Every lighter setting but the spill is pinned by the spec, and the ladder is one month:
        // without the spill the month fails (or lands only at a second, lighter attempt).
        let spec = db.spec(
            "spill.yaml",
            &format!(
                "name: spill
clickhouse:
  url: $URL
  source: ev
  time_column: ran_at
  chunks: [month]
  target: out
  settings: {{ max_memory_usage: 300000000, max_threads: 1, max_block_size: 8192,
              min_insert_block_size_rows: 8192, min_insert_block_size_bytes: 10000000 }}
  statement: {statement}
"
            ),
        );
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(!err.contains("ran out of memory"), "{all}");
        let recs = by_chunk(db.chunks("spill"));
        let month = &recs["2025-11"];
        assert_eq!(
            (month.status.as_str(), month.attempts, month.light, month.code),
            ("done", 1, 0, 0),
            "{month:?}"
        );
        assert_eq!(
            db.q("SELECT count(), sum(c) FROM (SELECT k, countMerge(c) AS c FROM out GROUP BY k)"),
            db.q("SELECT uniqExact(k), count() FROM ev"),
        );
    }
}

ch_test! {
    #[test]
    fn settings_and_columns_the_server_refuses_name_their_field(srv) {
        let db = ChDb::new_on(&srv, "fields");
        build_events(&db, 10);
        let spec = events_spec(&db, "badset", "[day]", "{ no_such_setting_here: 1 }", &events_statement("0"));
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 1, "{}", all_output(&out, &err));
        assert!(err.contains("clickhouse.settings"), "{err}");
        let spec = db.spec(
            "badtime.yaml",
            "name: badtime
clickhouse:
  url: $URL
  source: ev
  time_column: k
  target: out
  statement: INSERT INTO {target} SELECT toDate(ran_at), k, v FROM ev WHERE {chunk}
",
        );
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 1, "{}", all_output(&out, &err));
        assert!(
            err.contains("clickhouse.time_column") && err.contains("Date or DateTime"),
            "{err}"
        );
        assert_eq!(db.num("SELECT count() FROM out"), 0);
        // https:// against the plain HTTP port: a hint, not a bare TLS error.
        let spec = db.spec(
            "tls.yaml",
            &format!(
                "name: tls
clickhouse:
  url: {}
  source: ev
  time_column: ran_at
  target: out
  statement: INSERT INTO {{target}} SELECT toDate(ran_at), k, v FROM ev WHERE {{chunk}}
",
                db.url.replace("http://", "https://")
            ),
        );
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 1, "{}", all_output(&out, &err));
        assert!(err.contains("http://"), "a hint to check the scheme: {err}");
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
        skew(&db, true);
        let reference = source_digest(&db);
        let empty = target_digest(&db);
        let fixed = skew_spec(&db, "fixed.yaml", "plan", PINNED, SKEW_STATEMENT);
        let big = 10 * SKEW_K;
        let normal = 2 * SKEW_K;
        let total = 4 * normal + 2 * big;

        let (code, out, err) = run(&[&"plan", &fixed]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(out.contains(&format!("pending rows: {total} (counted)")), "{all}");
        assert!(out.contains("units:        6 (0 done)"), "{all}");
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
            "plan created nothing (no state table, no staging table, no lock)"
        );
        assert_eq!(target_digest(&db), empty);

        // A run that splits 2026-01, then fails on 2026-02 (a non-memory error).
        let failing = skew_spec(
            &db,
            "failing.yaml",
            "plan",
            PINNED,
            &SKEW_STATEMENT.replace(
                "sumState(duration_ms)",
                "sumState(toUInt32(duration_ms + throwIf(toYYYYMM(ran_at) = 202602)))",
            ),
        );
        let (code, out, err) = run(&[&"run", &failing]);
        assert_eq!(code, 1, "{}", all_output(&out, &err));
        assert!(err.contains("chunk 2026-02: Code: 395"), "{}", all_output(&out, &err));

        let records = db.records("plan");
        let tables = db.tables();
        let target = target_digest(&db);
        let (code, out, err) = run(&[&"plan", &fixed]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(plan_line(&out, "2025-11").contains("done"), "{all}");
        let split = plan_line(&out, "2026-01");
        assert!(split.contains("split") && split.contains("split earlier"), "{split}");
        assert!(plan_line(&out, "2026-02").contains("pending"), "{all}");
        // 2026-03 is not below 2026-01, a month that ran out of memory.
        let learned = plan_line(&out, "2026-03");
        assert!(
            learned.contains(&format!("{big} rows >= {big} rows"))
                && learned.contains("starts a rung lower"),
            "{learned}"
        );
        assert!(plan_line(&out, "2026-04").contains("one query"), "{all}");
        assert_eq!(db.records("plan"), records, "plan wrote to the job's state");
        assert_eq!(db.tables(), tables);
        assert_eq!(target_digest(&db), target);

        let (code, out, err) = run(&[&"run", &fixed]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert_eq!(target_digest(&db), reference);

        // Finished: run would skip it.
        let (code, out, err) = run(&[&"plan", &fixed]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(out.contains("run would skip this job"), "{all}");
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

/// `{target}` names the chunk's staging table: read in the statement (an anti-join against
/// what the target holds), it read that empty table, and every row the target had was
/// inserted again (exit 0). Refused: the statement reads the target by its name.
#[test]
fn spec_error_statement_reading_its_target_through_the_placeholder() {
    spec_error(
        &GOOD_CH.replace(
            " WHERE {chunk}",
            " WHERE {chunk} AND project_id NOT IN (SELECT project_id FROM {target})",
        ),
        Some(8),
        "clickhouse.statement",
        "uses {target} more than once",
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
fn spec_error_a_backtick_inside_a_table_name() {
    spec_error(
        &GOOD_CH.replace("  target: agg", "  target: \"a`gg\""),
        Some(7),
        "clickhouse.target",
        "backtick",
    );
    spec_error(
        &GOOD_CH.replace("  source: runs", "  source: \"db.r\\\\uns\""),
        Some(3),
        "clickhouse.source",
        "backslash",
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

#[test]
fn spec_error_statement_that_does_not_insert_into_the_target() {
    spec_error(
        &GOOD_CH.replace(
            "INSERT INTO {target} SELECT * FROM runs WHERE {chunk}",
            "SELECT * FROM runs WHERE {chunk} -- {target}",
        ),
        Some(8),
        "clickhouse.statement",
        "INSERT INTO {target}",
    );
}

/// A landing request: a partition attached (18.16) or moved (current servers) into the target.
/// `SYSTEM STOP MERGES` on the target `agg` (not on a staging table).
fn stops_target_merges(sql: &str) -> bool {
    sql.contains("STOP MERGES") && sql.trim_end().ends_with(".`agg`")
}

fn lands(sql: &str) -> bool {
    sql.contains("ATTACH PARTITION") || sql.contains("MOVE PARTITION")
}

/// `run` the spec until it ends (75: stopped to start over, as an operator would run it again),
/// at most three times; the last run must exit 0. Returns all their output.
fn run_until_ended(spec: &std::path::Path) -> String {
    let mut all = String::new();
    for _ in 0..3 {
        let (code, out, err) = run(&[&"run", &spec]);
        all += &all_output(&out, &err);
        if code != 75 {
            assert_eq!(code, 0, "{all}");
            return all;
        }
    }
    panic!("still stopping with 75 after three runs: {all}");
}

/// Run `job` (the `build_days` job, `extra` appended to its spec; `args` after `run`) through a
/// proxy that holds the `nth` request whose SQL `pick` accepts, and kill -9 the runner there
/// (`what`: the moment, for a timeout's message). The proxy is returned so that the held
/// request is never forwarded while the test goes on; the spec returned names it (it replaces
/// the job's spec file: write it again to run without the proxy).
#[allow(clippy::too_many_arguments)]
async fn kill_when_held(
    srv: &common::ch::ChServer,
    db: &ChDb,
    job: &str,
    args: &[&str],
    extra: &str,
    nth: u64,
    what: &str,
    pick: impl Fn(&str) -> bool + Send + Sync + 'static,
) -> (FaultProxy, PathBuf) {
    let proxy = FaultProxy::start_http(srv.addr()).await;
    let held = proxy.add_rule(
        Rule::new(Fault::HoldUntilReleased)
            .matching(move |r| pick(&r.text()))
            .nth(nth),
    );
    let spec = days_spec(db, job, &proxy.url_for(&db.url), extra);
    let mut r = spawn(db.dir.path(), &format!("{job}-killed"), args, &spec);
    r.wait_until(
        what,
        Duration::from_secs(120),
        Duration::from_millis(20),
        async || proxy.rule_fired(held) > 0,
    )
    .await;
    r.kill();
    (proxy, spec)
}

/// `kill_when_held` at the `nth` landing request (a move or attach) that `pick` also accepts:
/// a chunk is left staged, perhaps partly in the target.
async fn kill_while_landing(
    srv: &common::ch::ChServer,
    db: &ChDb,
    job: &str,
    extra: &str,
    nth: u64,
    pick: impl Fn(&str) -> bool + Send + Sync + 'static,
) -> (FaultProxy, PathBuf) {
    let what = "a landing to be held";
    kill_when_held(srv, db, job, &[], extra, nth, what, move |t| {
        lands(t) && pick(t)
    })
    .await
}

/// 18.16 lands with the target's merges stopped, and `SYSTEM STOP MERGES` cancels a merge under
/// way: a job landing every few seconds cancelled a big target's long merges every time. A
/// landing now waits for the running merge to end first. Here a merge of 16M rows the target
/// held before the job runs when the job's first landing comes: it ends merged (the old code
/// cancelled it, "Cancelled merging parts").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_a_landing_waits_for_a_running_merge_instead_of_cancelling_it() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "mergewait");
    build_days(&db, 1, 1000);
    for i in 0..4 {
        db.q(&format!(
            "INSERT INTO agg SELECT 400, number * 4 + {i}, countState(), sumState(toUInt32(1))
               FROM numbers(4000000) GROUP BY number"
        ));
    }
    let merging = {
        let (srv, name) = (srv.clone(), db.name.clone());
        std::thread::spawn(move || {
            srv.try_query(Some(&name), "OPTIMIZE TABLE agg PARTITION ID '0' FINAL")
        })
    };
    let running = "SELECT count() FROM system.merges WHERE database = currentDatabase()";
    let started = std::time::Instant::now();
    while db.num(running) == 0 && !merging.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the merge never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let spec = days_spec(&db, "mergewait", "$URL", "");
    let (code, out, err) = run(&[&"run", &spec]);
    let all = all_output(&out, &err);
    assert_eq!(code, 0, "{all}");
    let merged = merging.join().expect("the merge's thread");
    assert!(merged.is_ok(), "{merged:?}\n{all}");
    assert_eq!(
        db.num(
            "SELECT count() FROM system.parts WHERE database = currentDatabase()
                  AND table = 'agg' AND active AND partition_id = '0' AND rows >= 16000000"
        ),
        1,
        "the target's own merge ended merged\n{all}"
    );
}

ch_test! {
    /// A restore (here `--rerun`) stops the target's merges on both servers, and stopped them
    /// first, cancelling a merge under way (a big target's merge, cancelled at every start
    /// over). It now waits for the running merge to end, as a landing on 18.16 does. The
    /// restore's first look at the target's merges is held until the target's own merge of
    /// 16M rows has started.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restore_waits_for_a_running_merge_instead_of_cancelling_it(srv) {
        let db = ChDb::new_on(&srv, "restorewait");
        build_days(&db, 2, 1000);
        for i in 0..4 {
            db.q(&format!(
                "INSERT INTO agg SELECT 400, number * 4 + {i}, countState(),
                        sumState(toUInt32(1))
                   FROM numbers(4000000) GROUP BY number"
            ));
        }
        let reference = source_digest(&db);
        let spec = days_spec(&db, "restorewait", "$URL", "");
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let held = proxy.add_rule(
            Rule::new(Fault::HoldUntilReleased)
                .matching(|r| r.text().contains("FROM system.merges"))
                .nth(1),
        );
        let via = days_spec(&db, "restorewait", &proxy.url_for(&db.url), "");
        let mut r = spawn(db.dir.path(), "rerun", &["--rerun"], &via);
        r.wait_until(
            "the restore's look at the target's merges",
            Duration::from_secs(60),
            Duration::from_millis(20),
            async || proxy.rule_fired(held) > 0,
        )
        .await;
        let merging = {
            let (srv, name) = (srv.clone(), db.name.clone());
            std::thread::spawn(move || {
                srv.try_query(Some(&name), "OPTIMIZE TABLE agg PARTITION ID '0' FINAL")
            })
        };
        let running = "SELECT count() FROM system.merges WHERE database = currentDatabase()";
        let started = std::time::Instant::now();
        while db.num(running) == 0 {
            assert!(
                !merging.is_finished() && started.elapsed() < Duration::from_secs(60),
                "the merge never started: {:?}",
                merging.is_finished().then(|| merging.join())
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        proxy.release_held();
        let (code, out, err) = r.finish(Duration::from_secs(600)).await;
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(all.contains("waiting until the merge running on"), "{all}");
        let merged = merging.join().expect("the merge's thread");
        assert!(merged.is_ok(), "the target's own merge was cancelled: {merged:?}\n{all}");
        assert_eq!(
            db.num(
                "SELECT count() FROM (SELECT project_id FROM agg WHERE project_id = 400
                                       GROUP BY project_id, test_case_id)"
            ),
            16000000,
            "{all}"
        );
        assert_eq!(own_digest(&db), reference, "{all}");
    }
}

/// 18.16 lands by attaching, and a replay after a kill recognises the attached parts by their
/// sizes, which only holds while no merge has folded them. So the next run keeps the target's
/// merges stopped until the interrupted chunk has landed again, and that landing completes
/// without starting the job over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_a_landing_killed_after_its_attach_is_replayed_with_merges_still_stopped() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "replaystop");
    build_days(&db, 6, 1000);
    let reference = source_digest(&db);
    // The first run stops for good after the fifth day's first partition went in: held at
    // that day's second ATTACH, and killed there (each day lands in the target's 4
    // partitions, so each holds 4-5 small parts that merges would fold at once).
    let (_first, _) = kill_while_landing(&srv, &db, "replaystop", "", 18, |t| {
        t.contains("ATTACH PARTITION")
    })
    .await;
    let recs = db.records("replaystop");
    assert!(
        recs.iter().any(|r| r.status == "staged"),
        "a chunk is staged: {recs:?}"
    );
    assert!(
        recs.iter()
            .any(|r| r.chunk == "#merges" && r.status == "stopped"),
        "merges are recorded stopped: {recs:?}"
    );
    // The next run, held at the replay's own STOP MERGES: nothing may merge before it.
    let second = FaultProxy::start_http(srv.addr()).await;
    let replay = second.add_rule(
        Rule::new(Fault::HoldUntilReleased)
            .matching(|r| stops_target_merges(&r.text()))
            .nth(1),
    );
    let spec = days_spec(&db, "replaystop", &second.url_for(&db.url), "");
    let mut r = spawn(db.dir.path(), "second", &[], &spec);
    r.wait_until(
        "the replay to be held",
        Duration::from_secs(60),
        Duration::from_millis(20),
        async || second.rule_fired(replay) > 0,
    )
    .await;
    let parts = "SELECT count(), countIf(min_block_number < max_block_number)
                   FROM system.parts WHERE database = currentDatabase() AND table = 'agg' AND active";
    let before = db.q(parts);
    // What a background merge would do, at once: refused while merges are stopped.
    let optimized = db.try_q("OPTIMIZE TABLE agg FINAL");
    assert_eq!(
        db.q(parts),
        before,
        "the target's parts were merged before the replay (OPTIMIZE: {optimized:?})"
    );
    second.release_held();
    let (code, out, err) = r.finish(Duration::from_secs(120)).await;
    let all = all_output(&out, &err);
    assert_eq!(code, 0, "{all}");
    assert!(
        err.contains(
            "merges stay stopped until the chunk an earlier run was landing is landed again"
        ),
        "{all}"
    );
    assert!(
        !err.contains("no longer recognisable"),
        "no start-over: {all}"
    );
    assert_eq!(target_digest(&db), reference);
}

/// The digest of `agg` without the rows `foreign_rows` put there (project ids from 100).
fn own_digest(db: &ChDb) -> String {
    db.q(
        "SELECT count(), sum(c), sum(s), sum(cityHash64(project_id, test_case_id, c, s))
            FROM (SELECT project_id, test_case_id, countMerge(runs) AS c, sumMerge(total) AS s
                    FROM agg WHERE project_id < 100 GROUP BY project_id, test_case_id)",
    )
}

/// Another writer's rows in `agg`: one per partition (`project_id % 4`), ids 100-103.
const FOREIGN_ROWS: &str = "INSERT INTO agg
    SELECT toUInt32(100 + number), 7, countState(), sumState(toUInt32(5))
      FROM numbers(4) GROUP BY number";

/// How many of another writer's rows `agg` holds.
const FOREIGN_COUNT: &str = "SELECT count() FROM agg WHERE project_id >= 100";

ch_test! {
    /// A runner killed in the middle of a chunk's landing leaves it staged, partly in the
    /// target. Another writer then inserts into the target before the next run replays the
    /// landing: its parts sit above the chunk's mark beside (or instead of) the attached ones.
    /// The replay must tell them apart and keep them: starting the job over would restore the
    /// partitions to what they held before the job, and drop the other writer's rows with them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_another_writer_inserts_between_a_killed_landing_and_its_replay_are_kept(srv) {
        let db = ChDb::new_on(&srv, "foreignreplay");
        build_days(&db, 6, 1000);
        let reference = source_digest(&db);
        // Killed at the fifth day's second landing request: its first partition went in.
        let (_first, _) = kill_while_landing(&srv, &db, "foreignreplay", "", 18, |_| true).await;
        assert!(
            db.records("foreignreplay").iter().any(|r| r.status == "staged"),
            "a chunk is staged"
        );
        db.q(FOREIGN_ROWS);
        let spec = days_spec(&db, "foreignreplay", &db.url, "");
        // Run until the job ends (75: stopped to start over), as an operator would.
        let all = run_until_ended(&spec);
        assert_eq!(db.record("foreignreplay", "").map(|r| r.status), Some("done".into()), "{all}");
        assert_eq!(
            db.num("SELECT count() FROM agg WHERE project_id >= 100"),
            4,
            "the other writer's rows are still in the target: {all}"
        );
        assert_eq!(own_digest(&db), reference, "{all}");
        assert!(!all.contains("no longer recognisable"), "no start-over: {all}");
    }
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_two_workers_a_staged_chunk_is_replayed_from_its_own_table_while_others_insert(srv) {
        let db = ChDb::new_on(&srv, "stagedw2");
        build_days(&db, 6, 1000);
        let reference = source_digest(&db);
        // The first run is killed holding a landing from the second worker's staging table
        // (`_s1` when staging tables belonged to workers; any chunk's own table now).
        let (_first, _) = kill_while_landing(&srv, &db, "stagedw2", "workers: 2\n", 1, |t| {
            t.contains("_s1`") || t.contains("_s_")
        })
        .await;
        assert!(
            db.records("stagedw2").iter().any(|r| r.status == "staged"),
            "a chunk is staged"
        );
        // The next run replays it while its other worker inserts a new chunk: the replay is
        // held until that insert has been sent.
        let second = FaultProxy::start_http(srv.addr()).await;
        let replay = second.add_rule(
            Rule::new(Fault::HoldUntilReleased)
                .matching(|r| {
                    let t = r.text();
                    stops_target_merges(&t) || lands(&t)
                })
                .nth(1),
        );
        let insert = second.add_rule(
            Rule::new(Fault::Hold(Duration::ZERO))
                .matching(|r| r.text().contains("INSERT INTO") && r.text().contains("__backfill_stagedw2_s")),
        );
        let spec = days_spec(&db, "stagedw2", &second.url_for(&db.url), "workers: 2\n");
        let r = spawn(db.dir.path(), "second", &[], &spec);
        common::runner::wait_until(
            "the replay to be held and another chunk's insert to be sent",
            Duration::from_secs(60),
            Duration::from_millis(20),
            async || second.rule_fired(replay) > 0 && second.rule_fired(insert) > 0,
        )
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        second.release_held();
        let (code, out, err) = r.finish(Duration::from_secs(120)).await;
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert_eq!(target_digest(&db), reference, "every chunk landed once: {all}");
    }
}

/// 18.16: the state write noting that the target's merges run again after a chunk landed loses
/// its answer. The chunk is recorded done; its retry once found it done but left it among the
/// chunks in flight, and the run waited for it for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_a_lost_answer_after_a_chunk_landed_does_not_hold_the_run() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "mergesnote");
    build_days(&db, 3, 1000);
    let reference = source_digest(&db);
    let proxy = FaultProxy::start_http(srv.addr()).await;
    // The first such note is written at the start, the second after the first chunk landed.
    let lost = proxy.add_rule(
        Rule::new(Fault::DropResponse)
            .matching(|r| r.text().contains("'#merges', '', '', ''"))
            .nth(2),
    );
    let spec = days_spec(&db, "mergesnote", &proxy.url_for(&db.url), "");
    let r = spawn(db.dir.path(), "run", &[], &spec);
    let (code, out, err) = r.finish(Duration::from_secs(120)).await;
    let all = all_output(&out, &err);
    assert_eq!(proxy.rule_fired(lost), 1, "{all}");
    assert_eq!(code, 0, "{all}");
    assert_eq!(target_digest(&db), reference, "{all}");
}

/// A pause does not hold back the landing of a chunk an earlier run left staged: on 18.16 the
/// target's merges stay stopped until it has landed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_a_paused_job_lands_its_staged_chunk_first_and_starts_merges_again() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "stagedpause");
    build_days(&db, 6, 1000);
    let (_first, _) = kill_while_landing(&srv, &db, "stagedpause", "", 18, |_| true).await;
    let spec = days_spec(&db, "stagedpause", &db.url, "");
    let (code, out, err) = run(&[&"pause", &spec]);
    assert_eq!(code, 0, "{}", all_output(&out, &err));
    let mut r = spawn(db.dir.path(), "second", &[], &spec);
    r.wait_until(
        "the staged chunk to be done and the job paused",
        Duration::from_secs(60),
        Duration::from_millis(50),
        async || {
            let recs = db.records("stagedpause");
            !recs.iter().any(|r| r.status == "staged")
                && !recs
                    .iter()
                    .any(|r| r.chunk == "#merges" && r.status == "stopped")
        },
    )
    .await;
    assert!(!r.exited(), "the paused run waits");
    // Merges run again while the job is paused.
    let parts = "SELECT count() FROM system.parts
                  WHERE database = currentDatabase() AND table = 'agg' AND active";
    let before: u64 = db.q(parts).trim().parse().unwrap();
    let optimized = db.try_q("OPTIMIZE TABLE agg FINAL");
    let after: u64 = db.q(parts).trim().parse().unwrap();
    assert!(
        after < before,
        "merges run: {before} -> {after} ({optimized:?})"
    );
    r.kill();
}

/// A runner killed in the middle of a landing on 18.16 (the fifth day's second partition held),
/// then what a server restart does before the next run: merges start again and fold the target's parts (the attached ones among them), here at once
/// by `OPTIMIZE ... FINAL`; `foreign`, if given, is another writer's insert before that. Then
/// the next run. Returns its exit code and output.
async fn replay_after_merges(db: &ChDb, job: &str, foreign: Option<&str>) -> (i32, String) {
    let srv = common::ch::ChServer::v18();
    let (_first, _) = kill_while_landing(&srv, db, job, "", 18, |_| true).await;
    db.q("SYSTEM START MERGES agg");
    if let Some(sql) = foreign {
        db.q(sql);
    }
    db.q("OPTIMIZE TABLE agg FINAL");
    let spec = days_spec(db, job, &db.url, "");
    let (code, out, err) = run(&[&"run", &spec]);
    (code, all_output(&out, &err))
}

/// After merges have folded the attached parts, the target's parts cannot tell whether the
/// chunk is in. The replay once refused there, the chunk staged, and the operator had to
/// start over. The landing notes now say it for every partition whose attach is no longer
/// under way (the one attached before the kill went in, those after it did not), and the
/// held partition, never sent, has no part above the mark: the replay lands the rest once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_a_replay_after_merges_lands_the_rest_once_by_its_notes() {
    let db = ChDb::new_on(&common::ch::ChServer::v18(), "mergedalone");
    build_days(&db, 6, 1000);
    let reference = source_digest(&db);
    let (code, all) = replay_after_merges(&db, "mergedalone", None).await;
    assert_eq!(code, 0, "{all}");
    assert!(!all.contains("another writer"), "{all}");
    assert_eq!(target_digest(&db), reference, "{all}");
}

/// The same with another writer's rows in every partition: the replay refuses and keeps them; a
/// plain `reset` does not make the next run drop them either (its restore refuses, naming the
/// way out); only `--discard-foreign-rows`, the operator's decision, does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_a_replay_after_merges_and_another_writers_inserts_refuses_rather_than_drop_them() {
    let db = ChDb::new_on(&common::ch::ChServer::v18(), "mergedforeign");
    build_days(&db, 6, 1000);
    let (code, all) = replay_after_merges(&db, "mergedforeign", Some(FOREIGN_ROWS)).await;
    assert_eq!(code, 1, "{all}");
    assert!(all.contains("could double the chunk"), "{all}");
    assert_eq!(
        db.num(FOREIGN_COUNT),
        4,
        "the other writer's rows are kept: {all}"
    );
    let spec = days_spec(&db, "mergedforeign", &db.url, "");
    let (code, out, err) = run(&[&"reset", &spec, &"--yes"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("--discard-foreign-rows"), "{out}{err}");
    assert_eq!(db.num(FOREIGN_COUNT), 4);
    let (code, out, err) = run(&[&"reset", &spec, &"--yes", &"--discard-foreign-rows"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("dropping the"), "{out}{err}");
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(target_digest(&db), source_digest(&db), "{out}{err}");
}

/// One row of another writer in a partition the killed landing had not attached yet, the
/// target then merged: block numbers above the chunk's mark happen to be as many as the
/// chunk's own attaches would have made. The replay still refuses rather than start over (an
/// earlier version did, and its restore dropped the row; found by review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_a_replay_after_merges_keeps_one_foreign_row_in_an_unattached_partition() {
    let db = ChDb::new_on(&common::ch::ChServer::v18(), "mergedone");
    build_days(&db, 6, 1000);
    let one = "INSERT INTO agg SELECT toUInt32(101), 7, countState(), sumState(toUInt32(5))
                 FROM numbers(1)";
    let (code, all) = replay_after_merges(&db, "mergedone", Some(one)).await;
    assert_eq!(code, 1, "{all}");
    assert_eq!(db.num(FOREIGN_COUNT), 1, "{all}");
}

/// 18.16: a chunk's staging table merges its own parts before the landing begins (a chunk
/// inserted in several blocks), the runner is killed before the second partition's attach
/// reaches the server, and another writer inserts into every partition. The replay finds no
/// twin of the merged staged parts above the chunk's mark but another writer's part: it once
/// could not tell an attach that never ran from one whose parts had merged since, and refused
/// for good. The staging table's parts as its landing began are noted (and its merges stopped):
/// the replay lands the rest once and keeps the other writer's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_a_staging_table_that_merged_before_its_landing_is_replayed_beside_another_writer() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "stagedmerged");
    build_days(&db, 6, 1000);
    let reference = source_digest(&db);
    // Two halves of the groups (by a hash of the test case: its parity decides the project's,
    // and so the partition), not squashed into one block: every staged partition gets two
    // parts.
    let half = |parity: u32| {
        format!(
            "SELECT project_id, test_case_id, countState(), sumState(duration_ms)
               FROM runs WHERE {{chunk}} AND cityHash64(test_case_id) % 2 = {parity}
              GROUP BY project_id, test_case_id"
        )
    };
    let statement = format!(
        "INSERT INTO {{target}}\n{}\nUNION ALL\n{}\n",
        half(0),
        half(1)
    );
    let spec_of = |url: &str| {
        db.spec(
            "stagedmerged.yaml",
            &format!(
                "name: stagedmerged
clickhouse:
  url: {url}
  source: runs
  time_column: ran_at
  chunks: [day]
  target: agg
  settings: {{min_insert_block_size_rows: 0, min_insert_block_size_bytes: 0}}
  statement: |
{}",
                indent(&statement, 4)
            ),
        )
    };
    let proxy = FaultProxy::start_http(srv.addr()).await;
    // The fifth chunk's mark, read between its insert and its landing.
    let staged = proxy.add_rule(
        Rule::new(Fault::HoldUntilReleased)
            .matching(|r| r.text().contains("SELECT max(max_block_number)"))
            .nth(5),
    );
    // That chunk's second attach: the first run is killed holding it (never sent).
    let second = proxy.add_rule(
        Rule::new(Fault::HoldUntilReleased)
            .matching(|r| lands(&r.text()))
            .nth(18),
    );
    let spec = spec_of(&proxy.url_for(&db.url));
    let mut r = spawn(db.dir.path(), "killed", &[], &spec);
    r.wait_until(
        "the fifth chunk to be staged",
        Duration::from_secs(120),
        Duration::from_millis(20),
        async || proxy.rule_fired(staged) > 0,
    )
    .await;
    let staging = db.q("SELECT name FROM system.tables
          WHERE database = currentDatabase() AND name LIKE 'agg__backfill_stagedmerged_s_%'");
    let staging = staging.trim();
    assert!(
        !staging.is_empty() && !staging.contains('\n'),
        "{staging:?}"
    );
    // What the staging table's own merges do within seconds of its insert, here at once.
    for p in 0..4 {
        db.q(&format!(
            "OPTIMIZE TABLE {staging} PARTITION ID '{p}' FINAL"
        ));
    }
    assert_eq!(
        db.num(&format!(
            "SELECT countIf(min_block_number < max_block_number) FROM system.parts
              WHERE database = currentDatabase() AND table = '{staging}' AND active"
        )),
        4,
        "each staged partition is one merged part"
    );
    proxy.release_held();
    r.wait_until(
        "the fifth chunk's second attach to be held",
        Duration::from_secs(60),
        Duration::from_millis(20),
        async || proxy.rule_fired(second) > 0,
    )
    .await;
    r.kill();
    db.q(FOREIGN_ROWS);
    let spec = spec_of(&db.url);
    let (code, out, err) = run(&[&"run", &spec]);
    let all = all_output(&out, &err);
    assert_eq!(code, 0, "{all}");
    assert_eq!(
        db.num(FOREIGN_COUNT),
        4,
        "the other writer's rows are kept: {all}"
    );
    assert_eq!(own_digest(&db), reference, "every chunk landed once: {all}");
}

/// The one staging table of the job `job` in `db` (its name), asserting there is exactly one.
fn the_staging_table(db: &ChDb, job: &str) -> String {
    let name = db.q(&format!(
        "SELECT name FROM system.tables
          WHERE database = currentDatabase() AND name LIKE 'agg__backfill_{job}_s_%'"
    ));
    let name = name.trim().to_string();
    assert!(!name.is_empty() && !name.contains('\n'), "{name:?}");
    name
}

ch_test! {
    /// The answer to the write that records a chunk staged is lost (the write went through).
    /// The run's retry took the chunk for not staged and inserted it again, emptying the
    /// staging table the store names; killed during that insert, the next run replayed the
    /// empty table and recorded the chunk done with nothing landed. The retry now replays the
    /// staged table, and never inserts into it again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_answer_to_the_staged_write_never_empties_the_staged_table(srv) {
        let db = ChDb::new_on(&srv, "loststaged");
        build_days(&db, 1, 1000);
        let reference = source_digest(&db);
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let lost = proxy.add_rule(
            Rule::new(Fault::DropResponse)
                .matching(|r| r.text().contains("INSERT INTO") && r.text().contains("'staged'"))
                .nth(1),
        );
        // The chunk's statement into its staging table after the first time: the chunk again.
        let again = proxy.add_rule(
            Rule::new(Fault::HoldUntilReleased)
                .matching(|r| {
                    r.text().contains("__backfill_loststaged_s_")
                        && r.text().contains("countState()")
                })
                .nth(2),
        );
        let spec = days_spec(&db, "loststaged", &proxy.url_for(&db.url), "");
        let mut r = spawn(db.dir.path(), "first", &[], &spec);
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while !r.exited() && proxy.rule_fired(again) == 0 {
            assert!(std::time::Instant::now() < deadline, "{}", r.stderr());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let inserted_again = proxy.rule_fired(again) > 0;
        let first = if inserted_again {
            // Killed with the second insert held (never sent): the table stays emptied.
            r.kill();
            String::new()
        } else {
            let (code, out, err) = r.finish(Duration::from_secs(60)).await;
            assert_eq!(code, 0, "{out}{err}");
            err
        };
        assert_eq!(proxy.rule_fired(lost), 1, "{first}");
        let spec = days_spec(&db, "loststaged", &db.url, "");
        let (code, out, err) = run(&[&"run", &spec]);
        let all = format!("{first}{}", all_output(&out, &err));
        assert_eq!(code, 0, "{all}");
        assert_eq!(target_digest(&db), reference, "inserted again: {inserted_again}; {all}");
        assert!(!inserted_again, "the staged table was emptied and filled again: {all}");
    }
}

/// A staged chunk whose staging table lost a partition (dropped by hand) after the run that
/// staged it was killed: the replay landed what was left and recorded the chunk done, its
/// dropped rows never landed. It now refuses, the chunk still staged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_a_staged_table_changed_by_hand_is_not_landed() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "stagedhand");
    build_days(&db, 2, 1000);
    // Killed holding the second chunk's first attach: it is staged, nothing of it landed.
    let (_first, _) = kill_while_landing(&srv, &db, "stagedhand", "", 5, |_| true).await;
    let staging = the_staging_table(&db, "stagedhand");
    db.q(&format!("ALTER TABLE {staging} DROP PARTITION ID '2'"));
    let spec = days_spec(&db, "stagedhand", &db.url, "");
    let (code, out, err) = run(&[&"run", &spec]);
    let all = all_output(&out, &err);
    assert_eq!(code, 1, "{all}");
    assert!(all.contains("no longer holds what it staged"), "{all}");
    assert!(all.contains("partition 2: 0 of"), "{all}");
    assert!(
        db.records("stagedhand")
            .iter()
            .any(|r| r.status == "staged"),
        "{all}"
    );
}

/// 18.16: a runner killed after its chunk's first partition was attached; merges run again (a
/// server restart, or a `reset` killed after starting them) and the application's `ALTER ...
/// DELETE` rewrites the attached part. A mutated part keeps its block number, so the replay took
/// the partition for settled, found no twin of the staged part, and attached it again: every
/// row of the chunk in that partition twice, exit 0. A mutation's rewrite is no twin and no
/// proof of absence: the replay refuses, as after merges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_a_replay_after_a_mutation_of_an_attached_part_refuses_rather_than_attach_twice() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "mutatedreplay");
    build_days(&db, 2, 1000);
    // The first chunk's first partition (0) is attached; the runner is killed before its notes
    // say so (the ledger has the attach under way: the replay compares parts).
    let what = "the first attach's outcome note";
    let (_first, _) = kill_when_held(&srv, &db, "mutatedreplay", &[], "", 1, what, |t| {
        t.contains("_landings") && t.contains("'landed'")
    })
    .await;
    let rows_of_0 = db.num("SELECT count() FROM agg WHERE project_id % 4 = 0");
    assert!(rows_of_0 > 0, "partition 0 was attached");
    db.q("SYSTEM START MERGES agg");
    db.q("ALTER TABLE agg DELETE WHERE project_id % 4 = 0 AND test_case_id % 7 = 0");
    let mut waited = 0;
    while db.num(
        "SELECT count() FROM system.mutations
          WHERE database = currentDatabase() AND table = 'agg' AND is_done = 0",
    ) > 0
    {
        assert!(waited < 600, "the mutation did not finish");
        std::thread::sleep(Duration::from_millis(100));
        waited += 1;
    }
    let left = db.num("SELECT count() FROM agg WHERE project_id % 4 = 0");
    let spec = days_spec(&db, "mutatedreplay", &db.url, "");
    let (code, out, err) = run(&[&"run", &spec]);
    let all = all_output(&out, &err);
    assert_eq!(code, 1, "{all}");
    assert!(all.contains("could double the chunk"), "{all}");
    assert_eq!(
        db.num("SELECT count() FROM agg WHERE project_id % 4 = 0"),
        left,
        "nothing attached again: {all}"
    );
}

/// The same on a target in the old MergeTree syntax (`AggregatingMergeTree(d, key, 8192)`),
/// which 18.16 still serves: its parts are named `<min date>_<max date>_<min>_<max>_<level>`,
/// and the replay read a mutation's version from the name as if it were
/// `<partition>_<min>_<max>_<level>`, so it missed the rewrite and attached the chunk again:
/// every row of it twice, exit 0. The rewrite is read from `system.parts.data_version` now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_a_replay_after_a_mutation_of_an_old_syntax_target_refuses_rather_than_attach_twice() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "oldsyntax");
    common::days::build_runs(&db, 2, 1000);
    // The date column is materialized, so the statement's four columns fill the rest.
    db.q("CREATE TABLE agg (project_id UInt32, test_case_id UInt64,
                            runs AggregateFunction(count), total AggregateFunction(sum, UInt32),
                            d Date MATERIALIZED toDate('2025-10-01'))
           ENGINE = AggregatingMergeTree(d, (project_id, test_case_id), 8192)");
    let what = "the first attach's outcome note";
    let (_first, _) = kill_when_held(&srv, &db, "oldsyntax", &[], "", 1, what, |t| {
        t.contains("_landings") && t.contains("'landed'")
    })
    .await;
    assert!(
        db.num("SELECT count() FROM agg") > 0,
        "the first day was attached"
    );
    db.q("SYSTEM START MERGES agg");
    db.q("ALTER TABLE agg DELETE WHERE test_case_id % 7 = 0");
    let mut waited = 0;
    while db.num(
        "SELECT count() FROM system.mutations
          WHERE database = currentDatabase() AND table = 'agg' AND is_done = 0",
    ) > 0
    {
        assert!(waited < 600, "the mutation did not finish");
        // Measured: on an old-syntax table 18.16 takes the mutation up only after merges are
        // started a second time after the killed landing (one start waited over a minute).
        if waited % 20 == 10 {
            db.q("SYSTEM START MERGES agg");
        }
        std::thread::sleep(Duration::from_millis(100));
        waited += 1;
    }
    let left = db.num("SELECT count() FROM agg");
    let spec = days_spec(&db, "oldsyntax", &db.url, "");
    let (code, out, err) = run(&[&"run", &spec]);
    let all = all_output(&out, &err);
    assert_eq!(
        db.num("SELECT count() FROM agg"),
        left,
        "nothing attached again: {all}"
    );
    assert_eq!(code, 1, "{all}");
    assert!(all.contains("could double the chunk"), "{all}");
}

ch_test! {
    /// `run --rerun` restores every partition the job touched from its base. Another writer
    /// inserts a row into a partition while the restore works on it (here: while its note
    /// before the replace is written). The restore checked for other writers' rows once, up
    /// front, and the replace then dropped the row without a word. Each partition is now
    /// checked again right before its replace: the restore refuses and the row is kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_written_while_a_restore_works_on_its_partition_is_not_dropped(srv) {
        let db = ChDb::new_on(&srv, "restorerace");
        build_days(&db, 2, 500);
        // Rows from before the job in every partition: restoring partition 3 replaces it.
        db.q(FOREIGN_ROWS);
        let spec = days_spec(&db, "restorerace", &db.url, "");
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 0, "{out}{err}");
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let held = proxy.add_rule(
            Rule::new(Fault::HoldUntilReleased)
                .matching(|r| {
                    let t = r.text();
                    t.contains("_ledger") && t.contains("('3',") && t.contains("_base")
                })
                .nth(1),
        );
        let spec = days_spec(&db, "restorerace", &proxy.url_for(&db.url), "");
        let mut r = spawn(db.dir.path(), "rerun", &["--rerun"], &spec);
        r.wait_until(
            "partition 3's restore to be under way",
            Duration::from_secs(60),
            Duration::from_millis(20),
            async || proxy.rule_fired(held) > 0,
        )
        .await;
        db.q("INSERT INTO agg SELECT toUInt32(107), 7, countState(), sumState(toUInt32(5))
                FROM numbers(1)");
        proxy.release_held();
        let (code, out, err) = r.finish(Duration::from_secs(120)).await;
        let all = all_output(&out, &err);
        assert_eq!(
            db.num("SELECT count() FROM agg WHERE project_id = 107"),
            1,
            "the other writer's row is kept: {all}"
        );
        assert_eq!(code, 1, "{all}");
        assert!(all.contains("another writer"), "{all}");
    }
}

/// The staging table of day chunk `day` of job `job` (as the engine names it).
fn staging_of(job: &str, day: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(day.as_bytes());
    format!("agg__backfill_{job}_s_{}", hex::encode(&h[..8]))
}

/// 18.16, two workers. Partition 0 of `agg` holds one project with one nightly run (test 1, 0
/// ms), so each day's staged part of it is the same single row, byte for byte. The first day
/// loses a request that `lost` picks (held until the second day waits for the landing, then
/// dropped before it reaches the server); the second day lands, its own identical part
/// included, while the first waits for its retry. Returns the run's exit code and output and
/// how many nightly runs (of 2) landed, against the source's digest.
async fn twin_chunks(job: &str, lost: fn(&str, &str) -> bool) -> (i32, String, u64, bool) {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, job);
    db.q(
        "CREATE TABLE runs (ran_at DateTime, project_id UInt32, test_case_id UInt64,
                             duration_ms UInt32)
          ENGINE = MergeTree PARTITION BY toYYYYMM(ran_at)
          ORDER BY (project_id, test_case_id, ran_at)",
    );
    db.q("INSERT INTO runs
          SELECT toDateTime('2025-10-01 00:00:00') + intDiv(number, 400) * 86400
                   + intHash32(number) % 86400,
                 toUInt32(arrayElement([1, 2, 3, 5, 6, 7], intHash32(number) % 6 + 1)),
                 intHash32(number + 3) % 3000, toUInt32(number % 1000)
            FROM numbers(800)");
    db.q(
        "INSERT INTO runs SELECT toDateTime('2025-10-01 02:00:00') + number * 86400, 4, 1, 0
            FROM numbers(2)",
    );
    common::days::create_agg(&db, "agg", 1);
    let reference = source_digest(&db);
    let (first, second) = (staging_of(job, "2025-10-01"), staging_of(job, "2025-10-02"));
    let proxy = FaultProxy::start_http(srv.addr()).await;
    // The second day waits, staged, before its landing; the first day's request is held
    // meanwhile (the landing's lock held), then lost.
    let waits = proxy.add_rule(
        Rule::new(Fault::HoldUntilReleased)
            .matching(move |r| {
                let t = r.text();
                t.contains("FROM system.parts") && t.contains(&second) && t.contains("sum(rows)")
            })
            .nth(1),
    );
    let dropped = proxy.add_rule(
        Rule::new(Fault::HoldThenDrop)
            .matching(move |r| lost(&r.text(), &first))
            .nth(1),
    );
    let spec = days_spec(&db, job, &proxy.url_for(&db.url), "workers: 2\n");
    let mut r = spawn(db.dir.path(), "run", &[], &spec);
    r.wait_until(
        "both days to be held",
        Duration::from_secs(60),
        Duration::from_millis(20),
        async || proxy.rule_fired(waits) > 0 && proxy.rule_fired(dropped) > 0,
    )
    .await;
    proxy.release_held();
    let (code, out, err) = r.finish(Duration::from_secs(120)).await;
    let nightly = db.num("SELECT countMerge(runs) FROM agg WHERE project_id = 4");
    (
        code,
        all_output(&out, &err),
        nightly,
        target_digest(&db) == reference,
    )
}

/// The first day's attach of partition 0 is lost. The replay took the second day's identical
/// part for its own attached one and never attached: one nightly run lost, exit 0. The second
/// day's landing now settles the first day's attach still under way before replacing its note
/// (it had not gone in), and notes that for the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_a_replay_does_not_take_another_chunks_identical_part_for_its_own() {
    let (code, all, nightly, same) = twin_chunks("twinchunks", |t, first| {
        t.contains("ATTACH PARTITION ID '0' FROM") && t.contains(first)
    })
    .await;
    assert_eq!(code, 0, "{all}");
    assert_eq!(nightly, 2, "both nightly runs landed: {all}");
    assert!(same, "{all}");
}

/// 18.16: a landing fails right after its attach of partition 0 (the note that it went in
/// never written); its replay finds the attach went in, notes the ledger for partition 0 (no
/// attach under way any more), and fails at partition 1. The next replay read partition 0's
/// notes alone, found nothing noted, took it for not landed and attached it again: a partition
/// doubled, exit 0. The replay that finds an attach gone in now notes so first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_a_replay_that_finds_an_attach_gone_in_notes_it_for_the_next() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "replaynote");
    build_days(&db, 1, 1000);
    let reference = source_digest(&db);
    let proxy = FaultProxy::start_http(srv.addr()).await;
    // Answered by the proxy, never sent: the note is not written, the attach not made.
    let fail = || {
        Fault::Answer(
            500,
            "Code: 209, e.displayText() = DB::NetException: Timeout: connect timed out\n".into(),
        )
    };
    let note = proxy.add_rule(
        Rule::new(fail())
            .matching(|r| {
                let t = r.text();
                t.contains("_landings") && t.contains("'landed'") && t.contains("', '0', [")
            })
            .nth(1),
    );
    let attach = proxy.add_rule(
        Rule::new(fail())
            .matching(|r| r.text().contains("ATTACH PARTITION ID '1' FROM"))
            .nth(1),
    );
    let spec = days_spec(&db, "replaynote", &proxy.url_for(&db.url), "");
    let (code, out, err) = run(&[&"run", &spec]);
    let all = all_output(&out, &err);
    assert_eq!(
        (proxy.rule_fired(note), proxy.rule_fired(attach)),
        (1, 1),
        "{all}"
    );
    assert_eq!(code, 0, "{all}");
    assert_eq!(target_digest(&db), reference, "{all}");
}

/// 18.16: a replay after a kill finds the attaches of partitions 0 and 1 gone in, counting
/// another writer's rows in each from one read, and then noted each partition's top from a
/// later read of the target. A row another writer put into partition 1 between the two reads
/// was below the noted top and never counted: `--rerun` restored the partition over it, exit
/// 0, the row gone. Each note's top now comes from the read that counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_a_row_written_while_a_replay_checks_the_target_is_another_writers() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "replayrow");
    build_days(&db, 2, 1000);
    let reference = source_digest(&db);
    // The second day's attach of partition 1 held, the runner killed, then the attach let go.
    let (first, _) = kill_while_landing(&srv, &db, "replayrow", "", 6, |_| true).await;
    first.release_held();
    // Held: the request after the replay's check of partition 1 (its last read there, of the
    // target's parts' contents).
    let proxy = FaultProxy::start_http(srv.addr()).await;
    let checked = std::sync::atomic::AtomicBool::new(false);
    let held = proxy.add_rule(
        Rule::new(Fault::HoldUntilReleased)
            .matching(move |r| {
                let t = r.text();
                if t.contains("_part IN (") && t.contains(".`agg`") {
                    checked.store(true, std::sync::atomic::Ordering::SeqCst);
                    return false;
                }
                checked.load(std::sync::atomic::Ordering::SeqCst)
            })
            .nth(1),
    );
    let via = days_spec(&db, "replayrow", &proxy.url_for(&db.url), "");
    let mut r = spawn(db.dir.path(), "replay", &[], &via);
    r.wait_until(
        "the request after the replay's check of partition 1",
        Duration::from_secs(120),
        Duration::from_millis(20),
        async || proxy.rule_fired(held) > 0,
    )
    .await;
    db.q(&OTHER_PROJECT.replace("{p}", "1"));
    proxy.release_held();
    let (code, out, err) = r.finish(Duration::from_secs(120)).await;
    let all = all_output(&out, &err);
    assert_eq!(code, 0, "{all}");
    assert_eq!(own_digest(&db), reference, "{all}");
    let theirs = "SELECT count() FROM agg WHERE project_id = 401";
    assert_eq!(db.num(theirs), 1, "{all}");
    let spec = days_spec(&db, "replayrow", "$URL", "");
    let (code, out, err) = run(&[&"run", &"--rerun", &spec]);
    let again = all_output(&out, &err);
    assert_eq!(code, 1, "{all}\n{again}");
    assert!(again.contains("another writer put there"), "{again}");
    assert_eq!(db.num(theirs), 1, "the other writer's row is kept\n{again}");
}

/// The first day's write recording it staged is lost before it reaches the server (nothing of
/// it attached, no attach under way in the ledger): its retry replays it from the table it
/// remembers staged, and took the second day's identical part for its own. Nothing noted and
/// no attach under way means it did not go in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_a_chunk_remembered_staged_does_not_take_another_chunks_identical_part() {
    let (code, all, nightly, same) = twin_chunks("twinstaged", |t, first| {
        t.contains("INSERT INTO") && t.contains("'staged'") && t.contains(first)
    })
    .await;
    assert_eq!(code, 0, "{all}");
    assert_eq!(nightly, 2, "both nightly runs landed: {all}");
    assert!(same, "{all}");
}

/// 18.16: a runner killed right after the second day's attach of partition 1 went in (its
/// note after it never written), then `reset`, which starts merges again, and a merge of
/// partition 1 folds the first day's part with the second's. The reset had left the attach as
/// rows of the job's own above the old noted block, so the merged part (the first day's rows
/// included) counted as another writer's, and the next run refused, naming rows nobody else
/// wrote. The reset now settles the attach as its note after it would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_a_reset_after_an_unnoted_attach_and_a_merge_starts_over_without_a_false_refusal() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "resetmerge");
    build_days(&db, 2, 1000);
    let reference = source_digest(&db);
    let (proxy, _) = kill_while_landing(&srv, &db, "resetmerge", "", 6, |_| true).await;
    // The held attach goes to the server after all (the runner is gone): it goes in.
    let parts = "SELECT count() FROM system.parts
                  WHERE database = currentDatabase() AND table = 'agg' AND active
                    AND partition_id = '1'";
    proxy.release_held();
    let mut waited = 0;
    while db.num(parts) < 2 {
        assert!(waited < 100, "the held attach did not go in");
        std::thread::sleep(Duration::from_millis(100));
        waited += 1;
    }
    let spec = days_spec(&db, "resetmerge", &db.url, "");
    let (code, out, err) = run(&[&"reset", &spec, &"--yes"]);
    assert_eq!(code, 0, "{out}{err}");
    db.q("OPTIMIZE TABLE agg PARTITION ID '1' FINAL");
    assert_eq!(db.num(parts), 1, "partition 1 merged");
    let (code, out, err) = run(&[&"run", &spec]);
    let all = all_output(&out, &err);
    assert_eq!(code, 0, "{all}");
    assert!(!all.contains("another writer"), "{all}");
    assert_eq!(target_digest(&db), reference, "{all}");
}

/// On current servers a chunk lands by MOVE PARTITION, one partition at a time. When the answer
/// to a move is lost (the server moved the parts; the connection dropped before its reply), the
/// chunk is landed again: its moved parts are no longer staged, so nothing moves twice, but they
/// were counted as rows another writer had put into the partition, and the run after a `reset`
/// refused to restore the target, naming rows nobody else wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_a_lost_answer_to_a_move_is_not_taken_for_another_writer() {
    let srv = common::ch::ChServer::current();
    let db = ChDb::new_on(&srv, "lostmove");
    build_days(&db, 6, 1000);
    let reference = source_digest(&db);
    let proxy = FaultProxy::start_http(srv.addr()).await;
    let lost = proxy.add_rule(
        Rule::new(Fault::DropResponse)
            .matching(|r| lands(&r.text()))
            .nth(3),
    );
    let spec = days_spec(&db, "lostmove", &proxy.url_for(&db.url), "");
    let mut all = run_until_ended(&spec);
    assert_eq!(proxy.rule_fired(lost), 1, "{all}");
    assert_eq!(target_digest(&db), reference, "{all}");
    assert!(!all.contains("another writer"), "{all}");
    // Reset, then run again: the run restores the partitions (nobody else wrote into them)
    // and lands every chunk once more.
    let (code, out, err) = run(&[&"reset", &"--yes", &spec]);
    all += &all_output(&out, &err);
    assert_eq!(code, 0, "{all}");
    assert!(out.contains("restores"), "{all}");
    let (code, out, err) = run(&[&"run", &spec]);
    all += &all_output(&out, &err);
    assert_eq!(code, 0, "{all}");
    assert!(all.contains("restored"), "{all}");
    assert_eq!(target_digest(&db), reference, "{all}");
}

/// Killed after a chunk's move (current servers) or attach (18.16) went through but before the
/// ledger noted it, then reset: whether it went through is told by its staging table, which
/// the reset drops. The reset notes the landed rows as the job's own first, so the next run
/// restores the target (it used to count them as another writer's and refuse; on 18.16, where
/// the attach was not noted as under way at all, it still did) and lands every chunk once;
/// rows another writer put into the target meanwhile still make it refuse.
async fn landing_killed_before_its_note_then_reset(
    srv: &common::ch::ChServer,
    name: &str,
    foreign: bool,
) {
    let db = ChDb::new_on(srv, name);
    build_days(&db, 6, 1000);
    let reference = source_digest(&db);
    let moved = std::sync::atomic::AtomicBool::new(false);
    let what = "the note after a landing to be held";
    let _proxy = kill_when_held(srv, &db, name, &[], "", 3, what, move |t| {
        if lands(t) {
            moved.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        moved.load(std::sync::atomic::Ordering::SeqCst)
            && t.contains("INSERT INTO")
            && t.contains("_ledger")
    })
    .await;
    if foreign {
        db.q(FOREIGN_ROWS);
    }
    let spec = days_spec(&db, name, &db.url, "");
    let (code, out, err) = run(&[&"reset", &"--yes", &spec]);
    let mut all = all_output(&out, &err);
    assert_eq!(code, 0, "{all}");
    let (code, out, err) = run(&[&"run", &spec]);
    all += &all_output(&out, &err);
    if foreign {
        assert_eq!(code, 1, "{all}");
        assert!(all.contains("another writer"), "{all}");
        assert_eq!(db.num(FOREIGN_COUNT), 4, "{all}");
    } else {
        assert_eq!(code, 0, "{all}");
        assert!(all.contains("restored"), "{all}");
        assert_eq!(target_digest(&db), reference, "{all}");
    }
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_landing_killed_before_its_note_then_reset_lands_once(srv) {
        landing_killed_before_its_note_then_reset(&srv, "landkilled", false).await;
    }
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_landing_killed_before_its_note_keeps_another_writers_rows(srv) {
        landing_killed_before_its_note_then_reset(&srv, "landkilledforeign", true).await;
    }
}

ch_test! {
    /// `run --rerun` of a finished job on a target that held rows before it, killed after the
    /// restore put one partition back from the base table: the base's copies have new block
    /// numbers, above the block the ledger had noted. The next run counted them as another
    /// writer's and refused to start over (exit 1), offering a reset that would drop them.
    /// The restore is noted as under way before each replace now: the next run restores again
    /// and lands every chunk once, the rows from before the job kept once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rerun_killed_after_restoring_rows_from_before_the_job_starts_over(srv) {
        let db = ChDb::new_on(&srv, "rerunbase");
        let reference = done_over_rows_from_before(&db, "rerunbase");
        assert_eq!(own_digest(&db), reference);
        // Every partition of agg held a row before the job: the restore replaces all four.
        let what = "the restore's second partition";
        kill_when_held(&srv, &db, "rerunbase", &["--rerun"], "", 2, what, |t| {
            t.contains("REPLACE PARTITION")
        })
        .await;
        let spec = days_spec(&db, "rerunbase", "$URL", "");
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(all.contains("restored 4 partition"), "{all}");
        assert!(!all.contains("another writer"), "{all}");
        assert_eq!(own_digest(&db), reference, "every row of the job once: {all}");
        assert_eq!(db.num(FOREIGN_COUNT), 4, "the rows from before the job once: {all}");
    }
}

/// `build_days` with a row of another writer in every partition of `agg` from before the job
/// (`FOREIGN_ROWS`), and job `name` run to done. Returns the source's digest.
fn done_over_rows_from_before(db: &ChDb, name: &str) -> String {
    build_days(db, 6, 1000);
    db.q(FOREIGN_ROWS);
    let reference = source_digest(db);
    let spec = days_spec(db, name, "$URL", "");
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{}", all_output(&out, &err));
    reference
}

/// The partition id a `... PARTITION ID 'x' ...` statement names.
fn partition_of(sql: &str) -> Option<String> {
    let (_, rest) = sql.split_once("PARTITION ID '")?;
    Some(rest.split_once('\'')?.0.to_string())
}

/// A row of another writer in partition `p` of `agg` (`project_id % 4`), project 200 + p.
fn foreign_row_in(db: &ChDb, p: &str) {
    let project = 200 + p.parse::<u32>().expect("a partition of agg");
    db.q(&format!(
        "INSERT INTO agg SELECT toUInt32({project}), 9, countState(), sumState(toUInt32(5))
           FROM numbers(1)"
    ));
}

/// A request after the first one `first` accepts: held by `kill_when_held`, with the partition
/// that one named (empty if none).
fn after_first(
    first: impl Fn(&str) -> bool + Send + Sync + 'static,
) -> (
    std::sync::Arc<std::sync::Mutex<Option<String>>>,
    impl Fn(&str) -> bool + Send + Sync + 'static,
) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let mine = seen.clone();
    let pick = move |t: &str| {
        let mut p = mine.lock().unwrap();
        if p.is_some() {
            return true;
        }
        if first(t) {
            *p = Some(partition_of(t).unwrap_or_default());
        }
        false
    };
    (seen, pick)
}

ch_test! {
    /// A rerun's restore notes each partition's new top block once the base is back in it:
    /// rows another writer puts there in between are theirs. The note came only after every
    /// partition was restored (on 18.16 after the replaced parts had left the disk, minutes),
    /// and took those rows as the job's own: the next rerun dropped them silently.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_written_while_a_restore_runs_are_another_writers(srv) {
        let db = ChDb::new_on(&srv, "restorewrite");
        let reference = done_over_rows_from_before(&db, "restorewrite");
        // The rerun is held at the request after its first replace from the base, while
        // another writer inserts into that partition, then let go.
        let (restored, pick) = after_first(|t| t.contains("REPLACE PARTITION") && t.contains("_base`"));
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let held = proxy.add_rule(
            Rule::new(Fault::HoldUntilReleased)
                .matching(move |r| pick(&r.text()))
                .nth(1),
        );
        let via = days_spec(&db, "restorewrite", &proxy.url_for(&db.url), "");
        let r = spawn(db.dir.path(), "rerun", &["--rerun"], &via);
        common::runner::wait_until(
            "the request after the first restored partition",
            Duration::from_secs(120),
            Duration::from_millis(20),
            async || proxy.rule_fired(held) > 0,
        )
        .await;
        let p = restored.lock().unwrap().clone().expect("a partition restored");
        foreign_row_in(&db, &p);
        proxy.release_held();
        let (code, out, err) = r.finish(Duration::from_secs(300)).await;
        let mut all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(all.contains("another writer"), "{all}");
        assert_eq!(own_digest(&db), reference, "{all}");
        // Starting over again would drop that row: refused, naming its partition.
        let spec = days_spec(&db, "restorewrite", "$URL", "");
        let (code, out, err) = run(&[&"run", &"--rerun", &spec]);
        all += &all_output(&out, &err);
        assert_eq!(code, 1, "{all}");
        assert!(all.contains(&format!("partition {p} ")), "{all}");
        assert_eq!(db.num("SELECT count() FROM agg WHERE project_id >= 200"), 1, "{all}");
        assert_eq!(db.num(FOREIGN_COUNT), 5, "{all}");
    }
}

ch_test! {
    /// Killed right after the target's partition was copied into the base, before the copy was
    /// noted; another writer then inserts there. The next run found the copy and noted the
    /// partition's top as it was then, the other writer's row under it: a later rerun dropped
    /// that row silently. The partition is noted before the copy now, with its top.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_killed_after_keeping_the_base_counts_later_rows_as_another_writers(srv) {
        let db = ChDb::new_on(&srv, "keptkill");
        build_days(&db, 6, 1000);
        db.q(FOREIGN_ROWS);
        let reference = source_digest(&db);
        let (kept, pick) = after_first(|t| t.contains("_base` REPLACE PARTITION"));
        let what = "the request after the first copy into the base";
        let _proxy = kill_when_held(&srv, &db, "keptkill", &[], "", 1, what, pick).await;
        let p = kept.lock().unwrap().clone().expect("a partition kept");
        foreign_row_in(&db, &p);
        let spec = days_spec(&db, "keptkill", "$URL", "");
        let (code, out, err) = run(&[&"run", &spec]);
        let mut all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert_eq!(own_digest(&db), reference, "{all}");
        let (code, out, err) = run(&[&"run", &"--rerun", &spec]);
        all += &all_output(&out, &err);
        assert_eq!(code, 1, "{all}");
        assert!(all.contains(&format!("partition {p} ")), "{all}");
        assert_eq!(db.num("SELECT count() FROM agg WHERE project_id >= 200"), 1, "{all}");
        assert_eq!(db.num(FOREIGN_COUNT), 5, "{all}");
    }
}

/// 18.16: a restore first waits for the target's running merges to end (up to 10 minutes).
/// Rows another writer put there during that wait were taken for the job's, as the check for
/// them came before the wait, and the restore dropped them without a word. The check comes
/// after the wait now: the restore refuses and the rows stay. (A merge running for a while is
/// stood in for by the proxy answering the wait's polls.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_rows_written_while_a_restore_waits_for_merges_are_kept() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "mergewait");
    build_days(&db, 6, 1000);
    let spec = days_spec(&db, "mergewait", "$URL", "");
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{}", all_output(&out, &err));
    let proxy = FaultProxy::start_http(srv.addr()).await;
    let merging = proxy.add_rule(
        Rule::new(Fault::Answer(200, "1\n".into()))
            .matching(|r| r.text().contains("FROM system.merges")),
    );
    let via = days_spec(&db, "mergewait", &proxy.url_for(&db.url), "");
    let r = spawn(db.dir.path(), "rerun", &["--rerun"], &via);
    common::runner::wait_until(
        "the restore to wait for merges",
        Duration::from_secs(60),
        Duration::from_millis(20),
        async || proxy.rule_fired(merging) > 0,
    )
    .await;
    db.q(FOREIGN_ROWS);
    proxy.clear_rules();
    let (code, out, err) = r.finish(Duration::from_secs(120)).await;
    let all = all_output(&out, &err);
    assert_eq!(code, 1, "{all}");
    assert!(all.contains("another writer"), "{all}");
    assert_eq!(db.num(FOREIGN_COUNT), 4, "{all}");
}

ch_test! {
    /// `reset` killed after it dropped the job's staging tables but before it forgot the job's
    /// records: every later run failed ("recorded as staged but its staging table is gone")
    /// until a second reset. The records go first now: killed in between, the job is one
    /// with no state, which the next run starts over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reset_killed_midway_leaves_a_job_the_next_run_finishes(srv) {
        let db = ChDb::new_on(&srv, "resetkill");
        build_days(&db, 6, 1000);
        let reference = source_digest(&db);
        let (_first, _) = kill_while_landing(&srv, &db, "resetkill", "", 3, |_| true).await;
        let (dropped, pick) = after_first(|t| t.contains("DROP TABLE") && t.contains("_s_"));
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let held = proxy.add_rule(
            Rule::new(Fault::HoldUntilReleased)
                .matching(move |r| pick(&r.text()))
                .nth(1),
        );
        let via = days_spec(&db, "resetkill", &proxy.url_for(&db.url), "");
        let mut cmd = common::backfill();
        cmd.arg("reset").arg("--yes").arg(&via);
        let mut r = common::runner::spawn_cmd(db.dir.path(), "reset", cmd);
        r.wait_until(
            "the request after the reset's first staging drop",
            Duration::from_secs(60),
            Duration::from_millis(20),
            async || proxy.rule_fired(held) > 0,
        )
        .await;
        r.kill();
        assert!(dropped.lock().unwrap().is_some());
        let spec = days_spec(&db, "resetkill", "$URL", "");
        let (code, out, err) = run(&[&"run", &spec]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert_eq!(target_digest(&db), reference, "{all}");
    }
}

ch_test! {
    /// A restore's lost answer (the replace ran, its answer never came) is retried: restoring
    /// twice is restoring once. It failed the rerun with exit 1.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_answer_while_restoring_is_retried(srv) {
        let db = ChDb::new_on(&srv, "restorelost");
        let reference = done_over_rows_from_before(&db, "restorelost");
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let lost = proxy.add_rule(
            Rule::new(Fault::DropResponse)
                .matching(|r| r.text().contains("REPLACE PARTITION") && r.text().contains("_base`"))
                .nth(2),
        );
        let via = days_spec(&db, "restorelost", &proxy.url_for(&db.url), "");
        let (code, out, err) = run(&[&"run", &"--rerun", &via]);
        let all = all_output(&out, &err);
        assert_eq!(proxy.rule_fired(lost), 1, "{all}");
        assert_eq!(code, 0, "{all}");
        assert!(!all.contains("another writer"), "{all}");
        assert_eq!(own_digest(&db), reference, "{all}");
        assert_eq!(db.num(FOREIGN_COUNT), 4, "{all}");
    }
}

ch_test! {
    /// A job landing when the engine was upgraded: its ledger, made by an earlier version,
    /// lacks the columns of a move under way. The new version reads it, adds them where it
    /// moves parts, and finishes the job once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ledger_of_an_earlier_version_is_read_and_extended(srv) {
        let db = ChDb::new_on(&srv, "oldledger");
        build_days(&db, 6, 1000);
        let reference = source_digest(&db);
        let (_first, _) = kill_while_landing(&srv, &db, "oldledger", "", 18, |_| true).await;
        let ledger = db
            .tables()
            .into_iter()
            .find(|t| t.ends_with("_ledger"))
            .expect("a ledger");
        db.q(&format!(
            "ALTER TABLE {ledger} DROP COLUMN moving_rows, DROP COLUMN moving_from"
        ));
        let spec = days_spec(&db, "oldledger", &db.url, "");
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert_eq!(target_digest(&db), reference, "{}", all_output(&out, &err));
    }
}

ch_test! {
    /// Another writer's row that arrives in a partition between the landing's read of the
    /// target before a move (or attach) and its read after: the partition's new top was noted
    /// as the job's own, the row with it, and a `--rerun` restored the partition over it, exit
    /// 0, the row gone. It is counted by rows now (what arrived above the old top, less the
    /// chunk's), and the rerun refuses.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_written_while_a_partition_lands_is_another_writers(srv) {
        let db = ChDb::new_on(&srv, "window");
        build_days(&db, 4, 500);
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let landed = std::sync::atomic::AtomicBool::new(false);
        let held = proxy.add_rule(
            Rule::new(Fault::HoldUntilReleased)
                .matching(move |r| {
                    let t = r.text();
                    if lands(&t) && t.contains("PARTITION ID '0'") {
                        landed.store(true, std::sync::atomic::Ordering::SeqCst);
                        return false;
                    }
                    landed.load(std::sync::atomic::Ordering::SeqCst)
                        && t.contains("SELECT min_block_number, max_block_number, rows, level, active FROM system.parts")
                })
                .nth(1),
        );
        let spec = days_spec(&db, "window", &proxy.url_for(&db.url), "");
        let mut r = spawn(db.dir.path(), "run", &[], &spec);
        r.wait_until(
            "the read after the first landing in partition 0",
            Duration::from_secs(60),
            Duration::from_millis(20),
            async || proxy.rule_fired(held) > 0,
        )
        .await;
        db.q("INSERT INTO agg SELECT toUInt32(100), 7, countState(), sumState(toUInt32(5))
                FROM numbers(1)");
        proxy.release_held();
        let (code, out, err) = r.finish(Duration::from_secs(120)).await;
        let mut all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(all.contains("partition 0") && all.contains("another writer"), "{all}");
        assert_eq!(own_digest(&db), source_digest(&db), "{all}");
        let spec = days_spec(&db, "window", &db.url, "");
        let (code, out, err) = run(&[&"run", &"--rerun", &spec]);
        all += &all_output(&out, &err);
        assert_eq!(code, 1, "{all}");
        assert!(err.contains("partition 0"), "{all}");
        assert_eq!(db.num(FOREIGN_COUNT), 1, "the other writer's row is kept: {all}");
    }
}

ch_test! {
    /// A runner stopped (SIGSTOP, a frozen VM) past its lock's 30 s heartbeat, in the middle of
    /// a landing, while another runner takes the lock over and finishes the job. Resumed, it
    /// went on landing and noting on the strength of a heartbeat flag that had not caught up
    /// (and stays up when the heartbeat's read fails): stale ledger notes made the next
    /// `--rerun` refuse "another writer's rows", its next move failed on a staging table the
    /// new holder had dropped (exit 1) and it overwrote the done job's status with `failed`. Now
    /// each write of a landing reads the lock first: it stops with 75 and writes nothing.
    /// (Runner A is in a pid namespace of its own, so B judges it by its heartbeat alone.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_runner_resumed_after_a_takeover_writes_nothing(srv) {
        let db = ChDb::new_on(&srv, "resumed");
        build_days(&db, 4, 500);
        let reference = source_digest(&db);
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let landed = std::sync::atomic::AtomicBool::new(false);
        let held = proxy.add_rule(
            Rule::new(Fault::HoldUntilReleased)
                .matching(move |r| {
                    let t = r.text();
                    if lands(&t) && t.contains("PARTITION ID '1'") {
                        landed.store(true, std::sync::atomic::Ordering::SeqCst);
                        return false;
                    }
                    landed.load(std::sync::atomic::Ordering::SeqCst)
                        && t.contains("SELECT min_block_number, max_block_number, rows, level, active FROM system.parts")
                })
                .nth(2),
        );
        let spec_a = days_spec(&db, "resumed", &proxy.url_for(&db.url), "");
        let mut cmd = common::backfill();
        cmd.arg("run").arg(&spec_a);
        let mut a = spawn_cmd(db.dir.path(), "a", in_own_pid_namespace(&cmd));
        a.wait_until(
            "runner A to be held after a landing",
            Duration::from_secs(60),
            Duration::from_millis(20),
            async || proxy.rule_fired(held) > 0,
        )
        .await;
        // Stop A's whole namespace (unshare and the runner): no heartbeat from here on.
        let pgid = a.child.id().to_string();
        let signal = |sig: &str| {
            let st = std::process::Command::new("pkill")
                .args([sig, "-P", &pgid])
                .status()
                .unwrap();
            assert!(st.success(), "pkill {sig}");
        };
        signal("-STOP");
        let spec_b = db.spec(
            "resumed-direct.yaml",
            &std::fs::read_to_string(&spec_a)
                .unwrap()
                .replace(&proxy.url_for(&db.url), &db.url),
        );
        // B is refused (75) while A's last heartbeat is younger than the lock's 30 s TTL,
        // then takes the lock over and finishes the job.
        let mut all = String::new();
        let started = Instant::now();
        loop {
            let (code_b, out_b, err_b) = run(&[&"run", &spec_b]);
            all += &format!("b:\n{}", all_output(&out_b, &err_b));
            if code_b == 0 {
                break;
            }
            assert_eq!(code_b, 75, "{all}");
            assert!(started.elapsed() < Duration::from_secs(90), "{all}");
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        assert_eq!(target_digest(&db), reference, "{all}");
        let status = db.record("resumed", "").map(|r| r.status);
        proxy.release_held();
        signal("-CONT");
        let (code_a, out_a, err_a) = a.finish(Duration::from_secs(120)).await;
        all += &format!("\na:\n{}", all_output(&out_a, &err_a));
        assert_eq!(code_a, 75, "{all}");
        assert_eq!(db.record("resumed", "").map(|r| r.status), status, "{all}");
        assert_eq!(target_digest(&db), reference, "{all}");
        let (code, out, err) = run(&[&"run", &"--rerun", &spec_b]);
        all += &all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert_eq!(target_digest(&db), reference, "{all}");
    }
}

/// Another writer's row in a partition the killed landing had attached and noted already: the
/// replay (nothing merged) finishes, counts the row as that writer's, and a later `--rerun`
/// refuses to restore the partition rather than drop it (an earlier version subtracted the
/// chunk's own rows from the count and adopted the row; found by review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_a_foreign_row_in_a_partition_attached_before_the_kill_is_counted_as_foreign() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "notedforeign");
    build_days(&db, 6, 1000);
    let (_first, _) = kill_while_landing(&srv, &db, "notedforeign", "", 18, |_| true).await;
    // Partition 0 (100 % 4) went in before the held request.
    db.q(
        "INSERT INTO agg SELECT toUInt32(100), 7, countState(), sumState(toUInt32(5))
            FROM numbers(1)",
    );
    let spec = days_spec(&db, "notedforeign", &db.url, "");
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("written into partition 0"),
        "warned: {out}{err}"
    );
    assert_eq!(own_digest(&db), source_digest(&db), "{out}{err}");
    let (code, out, err) = run(&[&"run", &"--rerun", &spec]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("partition 0"), "{out}{err}");
    assert_eq!(db.num(FOREIGN_COUNT), 1, "{out}{err}");
}

/// Another writer's part can match a staged part in rows and in both sizes without holding its
/// rows: here, after a kill in the middle of a landing on 18.16, a copy of the last staged
/// partition's part with every `project_id` moved up by 100 (same partition, same widths, the
/// same compressed sizes). Taken for the staged part's twin, it made the replay skip that
/// partition and the chunk's rows in it were lost with exit 0. Twins are compared by content
/// too now: the staged part lands, and the other writer's rows stay beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_another_writers_part_of_a_staged_parts_size_is_not_taken_for_it() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "sizetwin");
    build_days(&db, 6, 1000);
    let reference = source_digest(&db);
    // Held at the fifth day's second partition: its last partition (3) is not attached.
    let (_first, _) = kill_while_landing(&srv, &db, "sizetwin", "", 18, |_| true).await;
    let staged = db
        .records("sizetwin")
        .into_iter()
        .find(|r| r.status == "staged")
        .expect("a chunk is staged");
    let table = staged.staging.rsplit('.').next().unwrap().replace('`', "");
    let part = |t: &str, extra: &str| {
        db.q(&format!(
            "SELECT name, rows, data_compressed_bytes, data_uncompressed_bytes FROM system.parts
              WHERE database = currentDatabase() AND table = '{t}' AND active
                AND partition_id = '3' {extra} ORDER BY max_block_number"
        ))
    };
    let ours = part(&table, "");
    let fields: Vec<&str> = ours.trim().split('\t').collect();
    assert_eq!(fields.len(), 4, "one staged part in partition 3: {ours:?}");
    let top = db.num(
        "SELECT max(max_block_number) FROM system.parts \
                      WHERE database = currentDatabase() AND table = 'agg'",
    );
    db.q(&format!(
        "INSERT INTO agg SELECT project_id + 100, test_case_id, runs, total FROM {table}
          WHERE _part = '{}'",
        fields[0]
    ));
    let theirs = part("agg", &format!("AND max_block_number > {top}"));
    let copy: Vec<&str> = theirs.trim().split('\t').collect();
    assert_eq!(
        copy[1..],
        fields[1..],
        "the other writer's part matches the staged one in rows and sizes: {theirs:?} vs {ours:?}"
    );
    let spec = days_spec(&db, "sizetwin", &db.url, "");
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        own_digest(&db),
        reference,
        "the chunk's rows are all there: {out}{err}"
    );
    assert_eq!(
        db.num(FOREIGN_COUNT),
        fields[1].parse::<u64>().unwrap(),
        "the other writer's rows are kept: {out}{err}"
    );
}

/// A replay on 18.16 tells the chunk's attached parts by their rows, read through the virtual
/// column `_part`; a target with a real column of that name would leave every replay unable to
/// tell. Refused before anything is written.
#[test]
fn v18_a_target_with_a_column_named_part_is_refused_before_any_write() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "partcol");
    build_days(&db, 2, 100);
    db.q("ALTER TABLE agg ADD COLUMN _part String");
    let spec = days_spec(&db, "partcol", &db.url, "");
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("clickhouse.target") && err.contains("column named `_part`"),
        "{out}{err}"
    );
    assert_eq!(db.num("SELECT count() FROM agg"), 0, "{out}{err}");
    assert_eq!(working_tables(&db), ["agg", "runs"], "{out}{err}");
}

ch_test! {
    /// Two runners of a `workers: 2` job starting at the same moment both run their preflight
    /// before either takes the target's lock. Its throwaway table had one name per job: the
    /// second runner's CREATE met the first's table and failed with exit 1 (Code 57). Here
    /// the first is held with its check table created, the second creates its own meanwhile.
    /// Now each runner has its own: one runs the job, the other is refused with 75.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_runners_starting_together_run_once_and_refuse_once(srv) {
        start_together(&srv, "together", false).await;
    }
}

ch_test! {
    /// The same in two containers that share the host's name, each its runner as pid 1: their
    /// check tables were named after host and pid alone, so the second runner's CREATE met the
    /// first's table (exit 1).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_runners_starting_together_as_pid_1_of_two_namespaces(srv) {
        start_together(&srv, "together_ns", true).await;
    }
}

/// Start two runners of one `workers: 2` job so that both run their preflight before either
/// takes the target's lock (each in a pid namespace of its own if `own_ns`): one runs the job,
/// the other is refused with 75.
async fn start_together(srv: &common::ch::ChServer, name: &str, own_ns: bool) {
    let db = ChDb::new_on(srv, name);
    build_days(&db, 4, 500);
    let reference = source_digest(&db);
    let start = |tag: &str, spec: &std::path::Path| {
        let mut cmd = common::backfill();
        cmd.arg("run").arg(spec);
        let cmd = if own_ns {
            in_own_pid_namespace(&cmd)
        } else {
            cmd
        };
        spawn_cmd(db.dir.path(), tag, cmd)
    };
    let check = |t: &str| t.contains("_check") && t.contains("INSERT INTO");
    let first = FaultProxy::start_http(srv.addr()).await;
    let held = first.add_rule(
        Rule::new(Fault::HoldUntilReleased)
            .matching(move |r| check(&r.text()))
            .nth(1),
    );
    let spec_a = days_spec(&db, "together", &first.url_for(&db.url), "workers: 2\n");
    let a = start("a", &spec_a);
    common::runner::wait_until(
        "the first runner's preflight to be held",
        Duration::from_secs(60),
        Duration::from_millis(20),
        async || first.rule_fired(held) > 0,
    )
    .await;
    // The second creates its check table meanwhile, passes its preflight, takes the lock,
    // and is held at its first landing (so that it still holds the lock).
    let second = FaultProxy::start_http(srv.addr()).await;
    let created = second.add_rule(
        Rule::new(Fault::Hold(Duration::ZERO))
            .matching(|r| r.text().contains("_check") && r.text().contains("CREATE TABLE")),
    );
    let landing = second.add_rule(
        Rule::new(Fault::HoldUntilReleased)
            .matching(|r| lands(&r.text()))
            .nth(1),
    );
    let spec_b = days_spec(&db, "together", &second.url_for(&db.url), "workers: 2\n");
    let mut b = start("b", &spec_b);
    b.wait_until(
        "the second runner to create its check table and reach a landing",
        Duration::from_secs(60),
        Duration::from_millis(20),
        async || second.rule_fired(created) > 0 && second.rule_fired(landing) > 0,
    )
    .await;
    first.release_held();
    let (ca, oa, ea) = a.finish(Duration::from_secs(120)).await;
    second.release_held();
    let (cb, ob, eb) = b.finish(Duration::from_secs(120)).await;
    let all = format!("a:\n{}\nb:\n{}", all_output(&oa, &ea), all_output(&ob, &eb));
    let mut codes = [ca, cb];
    codes.sort();
    assert_eq!(codes, [0, 75], "{all}");
    assert_eq!(target_digest(&db), reference, "{all}");
    assert_eq!(
        working_tables(&db),
        ["agg", "backfill_chunks", "runs"],
        "{all}"
    );
}

ch_test! {
    /// Two containers on one host can share its name (`docker run --network host` gives each
    /// the host's) while each numbers its processes from 1. A runner took another's lock for
    /// dead when the pid written in it was not running in its own pid namespace, took it over
    /// and ran the job beside the live runner. Here the first runner is pid 1 of a namespace
    /// of its own, held at its first landing: the second must be refused (75), and every
    /// chunk land once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_runner_in_another_pid_namespace_is_not_taken_for_dead(srv) {
        let db = ChDb::new_on(&srv, "pidns");
        build_days(&db, 4, 500);
        let reference = source_digest(&db);
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let landing = proxy.add_rule(
            Rule::new(Fault::HoldUntilReleased)
                .matching(|r| lands(&r.text()))
                .nth(1),
        );
        let spec_a = days_spec(&db, "pidns", &proxy.url_for(&db.url), "");
        let mut cmd = common::backfill();
        cmd.arg("run").arg(&spec_a);
        let mut a = spawn_cmd(db.dir.path(), "a", in_own_pid_namespace(&cmd));
        a.wait_until(
            "the first runner to reach its first landing",
            Duration::from_secs(60),
            Duration::from_millis(20),
            async || proxy.rule_fired(landing) > 0,
        )
        .await;
        let spec_b = db.spec(
            "pidns-direct.yaml",
            &std::fs::read_to_string(&spec_a)
                .unwrap()
                .replace(&proxy.url_for(&db.url), &db.url),
        );
        let (code, out, err) = run(&[&"run", &spec_b]);
        let b = all_output(&out, &err);
        proxy.release_held();
        let (code_a, out_a, err_a) = a.finish(Duration::from_secs(120)).await;
        let all = format!("a:\n{}\nb:\n{b}", all_output(&out_a, &err_a));
        assert_eq!(code, 75, "the second runner ran beside the first: {all}");
        assert!(b.contains(":1:"), "the refusal names the first runner: {all}");
        assert_eq!(code_a, 0, "{all}");
        assert_eq!(target_digest(&db), reference, "{all}");
    }
}

ch_test! {
    /// A runner killed in its preflight leaves its check table behind (each runner has its
    /// own): the next run drops it, as the runner's process is gone. A check table of another
    /// host, younger than an hour, may be a live runner's and is left alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_check_table_left_by_a_runner_killed_in_its_preflight_is_dropped_by_the_next(srv) {
        let db = ChDb::new_on(&srv, "checkleft");
        build_days(&db, 3, 200);
        let reference = source_digest(&db);
        let what = "the preflight's check to be held";
        let _proxy = kill_when_held(&srv, &db, "checkleft", &[], "", 1, what, |t| {
            t.contains("_check_") && t.contains("INSERT INTO")
        })
        .await;
        let left: Vec<String> = db.tables().into_iter().filter(|t| t.contains("_check_")).collect();
        assert_eq!(left.len(), 1, "the killed runner's check table: {left:?}");
        let elsewhere = "agg__backfill_checkleft_check_00000000_1";
        db.q(&format!("CREATE TABLE {elsewhere} AS agg"));
        let spec = days_spec(&db, "checkleft", &db.url, "");
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(target_digest(&db), reference, "{out}{err}");
        let tables = working_tables(&db);
        assert_eq!(tables, ["agg", elsewhere, "backfill_chunks", "runs"], "{out}{err}");
    }
}

/// After a kill in the middle of a landing on 18.16 the target's merges stay stopped (the
/// replay needs the attached parts as they are). Until then `status` says so, naming the
/// runner; a `reset` starts them again and drops the job's staging tables, and the next run
/// lands every chunk once (issue 10, finding 6: merges stayed stopped with nothing saying so,
/// and a reset neither restarted them nor dropped the staging table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_merges_a_killed_landing_stopped_show_in_status_and_a_reset_starts_them() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "stoppedshow");
    build_days(&db, 6, 1000);
    let reference = source_digest(&db);
    let (_first, _) = kill_while_landing(&srv, &db, "stoppedshow", "", 18, |_| true).await;
    let spec = days_spec(&db, "stoppedshow", &db.url, "");
    let (code, out, err) = run(&[&"status", &spec]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("STOPPED") && out.contains("stopped by runner"),
        "status shows the target's merges stopped: {out}{err}"
    );
    let staging = |db: &ChDb| -> Vec<String> {
        db.tables()
            .into_iter()
            .filter(|t| t.contains("__backfill_stoppedshow_s_"))
            .collect()
    };
    assert_eq!(staging(&db).len(), 1, "the staged chunk's table is kept");
    let parts = "SELECT count() FROM system.parts
                  WHERE database = currentDatabase() AND table = 'agg' AND active";
    let before = db.num(parts);
    let _ = db.try_q("OPTIMIZE TABLE agg FINAL");
    assert_eq!(db.num(parts), before, "merges are stopped before the reset");
    let (code, out, err) = run(&[&"reset", &"--yes", &spec]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        staging(&db).is_empty(),
        "reset drops the staging tables: {out}{err}"
    );
    let _ = db.try_q("OPTIMIZE TABLE agg FINAL");
    assert!(
        db.num(parts) < before,
        "merges run again after the reset: {out}{err}"
    );
    let (code, out, err) = run(&[&"status", &spec]);
    assert!(!out.contains("stopped by runner"), "{code} {out}{err}");
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(target_digest(&db), reference, "{out}{err}");
}

/// A replay that fails once (a dropped request) leaves the target's merges stopped for its
/// retry, which then recognises the attached parts and finishes without starting over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v18_a_replay_that_fails_once_keeps_merges_stopped_for_its_retry() {
    let srv = common::ch::ChServer::v18();
    let db = ChDb::new_on(&srv, "stagedretry");
    build_days(&db, 6, 1000);
    let reference = source_digest(&db);
    let (_first, _) = kill_while_landing(&srv, &db, "stagedretry", "", 18, |_| true).await;
    let second = FaultProxy::start_http(srv.addr()).await;
    let dropped = second.add_rule(
        Rule::new(Fault::DropRequest)
            .when_contains("ATTACH PARTITION")
            .nth(1),
    );
    let retry = second.add_rule(
        Rule::new(Fault::HoldUntilReleased)
            .matching(|r| stops_target_merges(&r.text()))
            .nth(2),
    );
    let spec = days_spec(&db, "stagedretry", &second.url_for(&db.url), "");
    let mut r = spawn(db.dir.path(), "second", &[], &spec);
    r.wait_until(
        "the replay's retry to be held",
        Duration::from_secs(60),
        Duration::from_millis(20),
        async || second.rule_fired(retry) > 0,
    )
    .await;
    assert_eq!(second.rule_fired(dropped), 1);
    let parts = "SELECT count(), countIf(min_block_number < max_block_number)
                   FROM system.parts WHERE database = currentDatabase() AND table = 'agg' AND active";
    let before = db.q(parts);
    let optimized = db.try_q("OPTIMIZE TABLE agg FINAL");
    assert_eq!(
        db.q(parts),
        before,
        "the target's parts were merged before the retry (OPTIMIZE: {optimized:?})"
    );
    second.release_held();
    let (code, out, err) = r.finish(Duration::from_secs(120)).await;
    let all = all_output(&out, &err);
    assert_eq!(code, 0, "{all}");
    assert!(
        !err.contains("no longer recognisable"),
        "no start-over: {all}"
    );
    assert_eq!(target_digest(&db), reference);
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_staged_chunk_the_changed_ladder_cannot_reach_is_refused_not_landed_twice(srv) {
        let db = ChDb::new_on(&srv, "stagedladder");
        build_days(&db, 6, 1000);
        let reference = source_digest(&db);
        // Killed holding the second day's first landing request: that day is staged.
        let (proxy, spec) = kill_while_landing(&srv, &db, "stagedladder", "", 5, |_| true).await;
        assert!(db.records("stagedladder").iter().any(|r| r.status == "staged"));
        // The same job with months for chunks: the staged day is not among them.
        let text = std::fs::read_to_string(&spec).unwrap();
        let months = db.spec(
            "stagedladder-months.yaml",
            &text
                .replace("chunks: [day]", "chunks: [month]")
                .replace(&proxy.url_for(&db.url), &db.url),
        );
        // Refused as a cut changed mid-job (before it, as a staged chunk the new cut cannot
        // reach), before anything lands.
        let (code, out, err) = run(&[&"run", &months]);
        let all = all_output(&out, &err);
        assert_eq!(code, 2, "{all}");
        assert!(
            err.contains("clickhouse.chunks") && err.contains("reset"),
            "{all}"
        );
        // What it says to do works: reset, then run.
        let (code, out, err) = run(&[&"reset", &"--yes", &months]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        let (code, out, err) = run(&[&"run", &months]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert_eq!(target_digest(&db), reference);
    }
}

/// A server that accepts connections and never answers (a TLS handshake sent to a plain-HTTP
/// port can wait like this until the server's 30-minute receive timeout): the run fails within
/// the connect timeout, naming the URL, instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_fails_the_run_instead_of_hanging_it() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = dir.path().join("silent.yaml");
    std::fs::write(
        &spec,
        format!(
            "name: silent
clickhouse:
  url: https://127.0.0.1:{port}/db
  source: ev
  time_column: ran_at
  target: out
  statement: INSERT INTO {{target}} SELECT * FROM ev WHERE {{chunk}}
"
        ),
    )
    .expect("write spec");
    let r = spawn(dir.path(), "silent", &[], &spec);
    let (code, out, err) = r.finish(Duration::from_secs(90)).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("no answer within"), "{out}{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{out}{err}");
}
