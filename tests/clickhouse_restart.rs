//! ClickHouse 18.16 server restarts (issue 10, item 3): on 18.16, parts that REPLACE or DROP
//! PARTITION removed are loaded again at start-up while they are still on disk. The engine lands
//! with `ATTACH PARTITION ... FROM` there (it only adds parts), and a restore from the base
//! (`run --rerun`, reset, a lost state table) waits until the parts it replaced are off disk.
//! Each test starts a private 18.16 server of its own (tests/common/chserver.rs, on free ports,
//! stopped with SIGTERM and removed when dropped) and restarts it:
//! - a finished job, `run --rerun` to done, then a restart: the target equals the unchunked
//!   reference (nothing came back);
//! - a restart while the job runs (the runner retries its requests), then a runner killed with
//!   SIGKILL, a restart, and another run: the target equals the reference after each restart.
//!
//! The target is made with `old_parts_lifetime = 5, cleanup_delay_period = 1` in its SETTINGS:
//! with the default 480 s a restore waits 8 minutes for the replaced parts to leave the disk.
//! Asserts what the target holds, never timings.

mod common;
use common::ch::ChDb;
use common::chserver::PrivateCh;
use common::days::{build_runs, create_agg};
use common::run;
use common::runner::spawn;
use std::path::{Path, PathBuf};
use std::time::Duration;

const STATEMENT: &str = "INSERT INTO {target}
SELECT project_id, test_case_id, countState(), sumState(duration_ms)
  FROM runs WHERE {chunk} GROUP BY project_id, test_case_id
";

/// `runs` over `days` days from 2025-10-01 with `per_day` rows each; the aggregate target `agg`,
/// partitioned by `project_id % 4` (every chunk lands in four partitions), and `reference`, the
/// same table filled by one unchunked INSERT ... SELECT.
fn build(db: &ChDb, days: u64, per_day: u64) {
    build_runs(db, days, per_day);
    for t in ["agg", "reference"] {
        create_agg(db, t, 5);
    }
    db.q("INSERT INTO reference
          SELECT project_id, test_case_id, countState(), sumState(duration_ms)
            FROM runs GROUP BY project_id, test_case_id");
}

/// Groups, total count, total sum and a hash over every group of `table` merged by key.
fn digest(db: &ChDb, table: &str) -> String {
    db.q(&format!(
        "SELECT count(), sum(c), sum(s), sum(cityHash64(project_id, test_case_id, c, s))
           FROM (SELECT project_id, test_case_id, countMerge(runs) AS c, sumMerge(total) AS s
                   FROM {table} GROUP BY project_id, test_case_id)"
    ))
}

/// A day-chunked job on `agg`.
fn spec(db: &ChDb, job: &str) -> PathBuf {
    let body: String = STATEMENT.lines().map(|l| format!("    {l}\n")).collect();
    db.spec(
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
{body}"
        ),
    )
}

fn all_output(out: &str, err: &str) -> String {
    format!("--- stdout\n{out}--- stderr\n{err}")
}

/// After a run that crossed a restart (`what`, ended with `code`): print what it warned of; if
/// it failed (out of retries while the server was down), it must not claim done, and a new run
/// of `spec` finishes the job.
fn settle_after_restart(what: &str, code: i32, out: &str, err: &str, spec: &Path) {
    eprintln!("{what}: exit {code}");
    for l in err
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
    {
        eprintln!("  {l}");
    }
    if code != 0 {
        assert!(
            !out.contains("done —"),
            "a failed run says done: {}",
            all_output(out, err)
        );
        run_to_done("the run after the restart", spec);
    }
}

/// Run `spec` to done. If the restart came between a chunk's attach and its record and the
/// restarted server merged what the attach brought, the engine cannot tell whether the chunk
/// is in and stops for the operator (exit 1, naming `reset --yes --discard-foreign-rows`:
/// only the operator knows whether another writer wrote into the target). No other writer
/// does here: do as the message says, and the job must then finish.
fn run_to_done(what: &str, spec: &Path) {
    let (code, out, err) = run(&[&"run", &spec]);
    if code == 1 && err.contains("reset --yes --discard-foreign-rows") {
        assert!(
            !out.contains("done —"),
            "{what}: {}",
            all_output(&out, &err)
        );
        eprintln!("{what}: stopped for the operator (merges ran during a landing); resetting");
        let (code, out, err) = run(&[&"reset", &"--yes", &"--discard-foreign-rows", &spec]);
        assert_eq!(code, 0, "{what}: reset: {}", all_output(&out, &err));
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(
            code,
            0,
            "{what}, after the reset: {}",
            all_output(&out, &err)
        );
        return;
    }
    assert_eq!(code, 0, "{what}: {}", all_output(&out, &err));
}

/// The target equals the reference, and the source's row count is in it once.
fn assert_equal(db: &ChDb, what: &str) {
    let parts = || {
        let retried = db
            .try_q(
                "SELECT chunk, status, attempts, substring(error, 1, 200) FROM backfill_chunks
                  FINAL WHERE attempts > 1 OR error != '' ORDER BY chunk",
            )
            .unwrap_or_default();
        let parts = db.q(&format!(
            "SELECT partition_id, name, rows, active FROM system.parts
              WHERE database = '{}' AND table = 'agg' ORDER BY partition_id, name",
            db.name
        ));
        format!("{parts}chunks tried more than once or with an error:\n{retried}")
    };
    assert_eq!(
        db.num("SELECT countMerge(runs) FROM agg"),
        db.num("SELECT countMerge(runs) FROM reference"),
        "{what}: every source row counted once; the target's parts:\n{}",
        parts()
    );
    let reference = digest(db, "reference");
    assert_eq!(
        digest(db, "agg"),
        reference,
        "{what}: target vs reference; the target's parts:\n{}",
        parts()
    );
}

/// A finished job, `--rerun` (restores every partition from the base, then lands again) to
/// done, and a restart right after: the restart brings back none of the parts the restore
/// replaced.
#[test]
fn a_rerun_then_a_restart_leaves_the_target_equal_to_the_reference() {
    let mut ch = PrivateCh::start();
    let db = ChDb::new_on(&ch.server(), "restart_rerun");
    assert_eq!(
        db.server.version(),
        "18.16.1",
        "the private server is 18.16"
    );
    build(&db, 6, 2000);
    let spec = spec(&db, "rerun");
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "first run: {}", all_output(&out, &err));
    assert_equal(&db, "first run");
    let (code, out, err) = run(&[&"run", &"--rerun", &spec]);
    assert_eq!(code, 0, "--rerun: {}", all_output(&out, &err));
    assert_equal(&db, "--rerun");
    ch.restart();
    assert_equal(&db, "--rerun, then a server restart");
    // And once more from a restart: a new --rerun after it lands every chunk once.
    let (code, out, err) = run(&[&"run", &"--rerun", &spec]);
    assert_eq!(
        code,
        0,
        "--rerun after the restart: {}",
        all_output(&out, &err)
    );
    ch.restart();
    assert_equal(&db, "a second --rerun, then a server restart");
}

/// A restart while the job runs (SIGTERM, down for 2 s, started again; the runner retries what
/// failed, or gives up and runs again), then a runner
/// killed with SIGKILL mid-run, a restart, and a new run: after each, the target equals the
/// reference, also after one more restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_across_restarts_and_a_kill_leaves_the_target_equal_to_the_reference() {
    let mut ch = PrivateCh::start();
    let db = ChDb::new_on(&ch.server(), "restart_midrun");
    build(&db, 40, 2000);
    let spec = spec(&db, "midrun");
    let done = |db: &ChDb| {
        db.chunks("midrun")
            .iter()
            .filter(|c| c.status == "done")
            .count()
    };

    // 1. The server restarts under a running job.
    let mut r = spawn(db.dir.path(), "across", &[], &spec);
    r.wait_until(
        "the job to land three chunks",
        Duration::from_secs(120),
        Duration::from_millis(10),
        async || done(&db) >= 3,
    )
    .await;
    assert!(
        !r.exited(),
        "the job ended before the restart: make it longer"
    );
    let before = done(&db);
    assert!(
        ch.stop(),
        "the server did not stop on SIGTERM:\n{}",
        ch.log_tail(30)
    );
    std::thread::sleep(Duration::from_secs(2));
    ch.start_again();
    let (code, out, err) = r.finish(Duration::from_secs(300)).await;
    // Whether the runner's own requests failed depends on where it was: 18.16 finishes the
    // requests of open connections before it exits. Said, not asserted.
    eprintln!(
        "network errors logged: {}",
        err.matches("network error").count()
    );
    settle_after_restart("the run across the restart", code, &out, &err, &spec);
    assert!(before < 40, "the restart came after the job ended");
    // Once seen ending 0 "done" with a chunk counted twice (4 times in ~25 runs under load):
    // the restart came between a chunk's attach and its record, the restarted server merged the
    // attached parts, and the replay no longer recognised them, so it attached again. Now such a
    // replay stops for the operator (`run_to_done` resets as its message says, then runs).
    assert_equal(&db, "a job that crossed a restart");
    ch.restart();
    assert_equal(&db, "a job that crossed a restart, then another restart");

    // 2. The runner is killed mid-run, the server restarts, the job runs again.
    let (code, out, err) = run(&[&"reset", &"--yes", &spec]);
    assert_eq!(code, 0, "reset: {}", all_output(&out, &err));
    let mut r = spawn(db.dir.path(), "killed", &[], &spec);
    r.wait_until(
        "the job to land two chunks",
        Duration::from_secs(120),
        Duration::from_millis(10),
        async || done(&db) >= 2,
    )
    .await;
    assert!(!r.exited(), "the job ended before the kill: make it longer");
    r.kill();
    ch.restart();
    run_to_done("the run after the kill and the restart", &spec);
    assert_equal(&db, "a killed job run again after a restart");
    ch.restart();
    assert_equal(&db, "a killed job run again, then another restart");
}

/// The control: on this private 18.16 server, a partition replaced right before a restart comes
/// back (the old part is still on disk and loaded again at start-up), so the tests above would
/// see a landing or restore that left replaced parts behind.
#[test]
fn the_private_server_brings_back_a_replaced_partition_after_a_restart() {
    let mut ch = PrivateCh::start();
    let db = ChDb::new_on(&ch.server(), "restart_control");
    for t in ["x", "y"] {
        db.q(&format!(
            "CREATE TABLE {t} (k UInt8, v UInt64) ENGINE = MergeTree PARTITION BY k ORDER BY v"
        ));
    }
    db.q("INSERT INTO x SELECT 1, number FROM numbers(100)");
    db.q("INSERT INTO y SELECT 1, number FROM numbers(10)");
    db.q("ALTER TABLE x REPLACE PARTITION 1 FROM y");
    assert_eq!(db.num("SELECT count() FROM x"), 10, "replaced");
    ch.restart();
    assert_eq!(
        db.num("SELECT count() FROM x"),
        110,
        "18.16 loads the replaced part again after a restart (if this fails, the server no \
         longer shows the issue and the tests above prove less)"
    );
}

/// A restart while `run --rerun` waits for the parts its restore replaced to leave the disk:
/// the server loads them again, active, next to the base's copies. The wait only counted
/// outdated parts, found none, and the run landed every chunk on top of them: the target
/// doubled, exit 0. A part the restore removed (at or under the partition's top before it
/// wrote) seen active again now ends the wait with a retryable error, and the restore,
/// retried (or the next run), replaces it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_a_restore_waits_for_replaced_parts_loads_nothing_twice() {
    let mut ch = PrivateCh::start();
    let db = ChDb::new_on(&ch.server(), "restart_restore");
    build_runs(&db, 4, 1000);
    // Replaced parts stay on disk 30 s: long enough to restart the server while the restore
    // waits for them.
    for t in ["agg", "reference"] {
        create_agg(&db, t, 30);
    }
    db.q("INSERT INTO reference
          SELECT project_id, test_case_id, countState(), sumState(duration_ms)
            FROM runs GROUP BY project_id, test_case_id");
    // Rows from before the job in every partition: the restore replaces each partition with
    // the base's copy of them (a partition with nothing before the job is dropped, and 18.16
    // takes a dropped part off disk at once).
    for t in ["agg", "reference"] {
        db.q(&format!(
            "INSERT INTO {t} SELECT toUInt32(100 + number), 1, countState(), sumState(toUInt32(1))
               FROM numbers(4) GROUP BY number"
        ));
    }
    let spec = spec(&db, "restorewait");
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "first run: {}", all_output(&out, &err));
    assert_equal(&db, "first run");

    // A slow read of the target started before the restore holds the parts it will replace:
    // 18.16 takes a replaced part off disk a second or so after the replace, once no query
    // uses it, so without this the restart would have to land in that second. Here the
    // replaced parts stay until the restart ends the read.
    let reader = hold_parts(&ch, &db);
    let mut r = spawn(db.dir.path(), "rerun", &["--rerun"], &spec);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !r.stderr().contains("waiting until the") {
        assert!(
            !r.exited(),
            "the --rerun ended before its restore waited:\n{}",
            r.stderr()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the restore never waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ch.restart();
    let _ = reader.join();
    let (code, out, err) = r.finish(Duration::from_secs(400)).await;
    // Out of retries while the server was down, the next run restores again.
    settle_after_restart("the --rerun across the restart", code, &out, &err, &spec);
    assert_equal(&db, "a --rerun whose restore crossed a restart");
    ch.restart();
    assert_equal(
        &db,
        "a --rerun whose restore crossed a restart, then another restart",
    );
}

/// Start a read of `agg` that sleeps 20 ms per row (a minute or more: a restart ends it) and
/// wait until the server runs it: every part active now stays on disk while it runs.
fn hold_parts(ch: &PrivateCh, db: &ChDb) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    // 18.16 drops a query's comments from system.processes: the read is found by its id.
    let id = format!("hold_parts_{}", db.name);
    let sql = format!(
        "SELECT count() FROM {}.agg WHERE sleepEachRow(0.02) = 0",
        db.name
    );
    let port = ch.http_port;
    let qid = id.clone();
    let reader = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = write!(
            s,
            "POST /?max_block_size=1&query_id={qid} HTTP/1.0\r\nContent-Length: {}\r\n\r\n{sql}",
            sql.len()
        );
        // Ends when the restart closes the connection.
        let _ = s.read_to_end(&mut Vec::new());
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while db.num(&format!(
        "SELECT count() FROM system.processes WHERE query_id = '{id}'"
    )) == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow read never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    reader
}
