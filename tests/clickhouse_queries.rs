//! A ClickHouse runner's chunk inserts do not outlive it on the server, on both servers
//! (`ch_test!`). ClickHouse goes on running an `INSERT ... SELECT` whose client is gone, so a
//! runner killed with SIGKILL left its inserts running beside the runner that took over (up to
//! 25 of them, 270 MiB each): the next runner of the job kills them once it holds the target,
//! and a second SIGTERM kills the runner's own before it exits.
//!
//! The statement sleeps per row (`sleepEachRow`, one row per block), so a chunk insert runs for
//! a minute unless something ends it. Asserts which queries run on the server and what the
//! target holds, never timings.

mod common;
use common::ch::{ChDb, ChServer};
use common::run;
use common::runner::spawn;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn all_output(out: &str, err: &str) -> String {
    format!("--- stdout\n{out}--- stderr\n{err}")
}

/// 120 events in one month, and `out` to fill. The statement sleeps `ctl`'s last value per
/// row, read once when the insert starts.
fn build(db: &ChDb, sleep: f64) {
    db.q("CREATE TABLE ev (ran_at DateTime, k UInt64, v UInt32)
          ENGINE = MergeTree PARTITION BY toYYYYMM(ran_at) ORDER BY ran_at");
    db.q(
        "INSERT INTO ev SELECT toDateTime('2025-11-01 00:00:00') + number * 20000, number,
                           toUInt32(number) FROM numbers(120)",
    );
    db.q("CREATE TABLE out (d Date, k UInt64, v UInt32) ENGINE = MergeTree ORDER BY (d, k)");
    db.q("CREATE TABLE ctl (at UInt64, s Float64) ENGINE = MergeTree ORDER BY at");
    db.q(&format!("INSERT INTO ctl VALUES (1, {sleep})"));
}

/// One month chunk. 18.16 reads a block per row under `max_block_size: 1`, each sleeping less
/// than its 3 s cap; 26.x reads the small part as one block, so its cap per block is lifted.
fn spec(db: &ChDb, srv: &ChServer, job: &str) -> PathBuf {
    let lifted = if srv.label == "18.16" {
        ""
    } else {
        ", function_sleep_max_microseconds_per_block: 0"
    };
    db.spec(
        &format!("{job}.yaml"),
        &format!(
            "name: {job}
clickhouse:
  url: $URL
  source: ev
  time_column: ran_at
  chunks: [month]
  target: out
  settings: {{ max_block_size: 1{lifted} }}
  statement: |
    INSERT INTO {{target}}
    SELECT toDate(ran_at), k, toUInt32(v + sleepEachRow((SELECT argMax(s, at) FROM ctl)))
      FROM ev WHERE {{chunk}}
"
        ),
    )
}

/// The chunk inserts running on the server into this database's staging tables (by their
/// text: the sleeping statement into a staging table of this database, not the preflight's
/// try of it into its check table, nor this query itself).
fn engine_queries(db: &ChDb) -> u64 {
    db.num(&format!(
        "SELECT count() FROM system.processes
          WHERE position(query, 'sleepEachRow') > 0 AND position(query, '{}') > 0
            AND position(query, '__backfill_') > 0 AND position(query, '_check_') = 0
            AND position(query, 'system.processes') = 0",
        db.name
    ))
}

/// Wait until `engine_queries` is `want`, at most `limit`; whether it got there.
fn wait_for_queries(db: &ChDb, want: u64, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if engine_queries(db) == want {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_runners_insert_is_killed_by_the_next_runner(srv) {
        let db = ChDb::new_on(&srv, "leftover");
        build(&db, 0.5);
        let spec = spec(&db, &srv, "leftover");
        let mut r = spawn(db.dir.path(), "leftover", &[], &spec);
        r.wait_until(
            "the chunk insert to run",
            Duration::from_secs(60),
            Duration::from_millis(20),
            async || engine_queries(&db) == 1,
        )
        .await;
        r.kill();
        // The server goes on with it: nothing tells it the client is gone.
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(engine_queries(&db), 1, "the killed runner's insert still runs");
        // The next run does the month quickly, and ends the one left running first.
        db.q("INSERT INTO ctl VALUES (2, 0)");
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert!(err.contains("still running on the server"), "{}", all_output(&out, &err));
        assert_eq!(engine_queries(&db), 0, "the killed runner's insert was left running");
        assert_eq!(db.num("SELECT count() FROM out"), 120);
        assert_eq!(db.num("SELECT uniqExact(k) FROM out"), 120);
    }
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_sigterm_kills_the_runners_own_insert(srv) {
        let db = ChDb::new_on(&srv, "ownkill");
        build(&db, 0.5);
        let spec = spec(&db, &srv, "ownkill");
        let mut r = spawn(db.dir.path(), "ownkill", &[], &spec);
        r.wait_until(
            "the chunk insert to run",
            Duration::from_secs(60),
            Duration::from_millis(20),
            async || engine_queries(&db) == 1,
        )
        .await;
        r.sigterm();
        std::thread::sleep(Duration::from_millis(300));
        let (code, out, err) = r.stop(Duration::from_secs(30)).await;
        assert_eq!(code, 75, "{}", all_output(&out, &err));
        assert!(
            wait_for_queries(&db, 0, Duration::from_secs(10)),
            "the runner's insert outlived it: {} running\n{}",
            engine_queries(&db),
            all_output(&out, &err)
        );
        // Nothing landed, and the next run does the month once.
        assert_eq!(db.num("SELECT count() FROM out"), 0);
        db.q("INSERT INTO ctl VALUES (2, 0)");
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 0, "{}", all_output(&out, &err));
        assert_eq!(db.num("SELECT count() FROM out"), 120);
        assert_eq!(db.num("SELECT uniqExact(k) FROM out"), 120);
    }
}
