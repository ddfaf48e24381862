//! A ClickHouse runner's chunk inserts do not outlive it on the server, on both servers
//! (`ch_test!`). ClickHouse goes on running an `INSERT ... SELECT` whose client is gone, so a
//! runner killed with SIGKILL left its inserts running beside the runner that took over (up to
//! 25 of them, 270 MiB each): the next runner of the job kills them once it holds the target,
//! and a second SIGTERM kills the runner's own before it exits.
//!
//! A runner frozen past its heartbeat and woken after a takeover leaves the chunk to the runner
//! that took over: its staging tables are its own.
//!
//! The statement sleeps per row (`sleepEachRow`, one row per block), so a chunk insert runs for
//! a minute unless something ends it. Asserts which queries run on the server and what the
//! target holds, never timings.

mod common;
use common::ch::{ChDb, ChServer};
use common::run;
use common::runner::{in_own_pid_namespace, spawn, spawn_cmd};
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
        // The killed runner's staging table went too, at the start, not at the job's end.
        assert!(
            err.contains("dropped 1 staging table(s)"),
            "{}",
            all_output(&out, &err)
        );
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

ch_test! {
    /// A runner frozen past its heartbeat (a paused VM; here SIGSTOP, in a pid namespace of its
    /// own so that the next runner judges it by its heartbeat alone) has its chunk insert
    /// killed by the runner that takes the target over. Woken, its failed insert's clean-up
    /// and retry dropped and re-created the chunk's staging table, which the other runner was
    /// inserting into: that one found no parts, recorded the month done with 0 rows and exited
    /// 0. Each runner's staging tables are now its own, and a runner that lost the target
    /// stops before another insert.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frozen_runner_woken_after_a_takeover_leaves_the_chunk_alone(srv) {
        let db = ChDb::new_on(&srv, "frozen");
        build(&db, 0.5);
        let spec = spec(&db, &srv, "frozen");
        let mut cmd = common::backfill();
        cmd.arg("run").arg(&spec);
        let mut a = spawn_cmd(db.dir.path(), "a", in_own_pid_namespace(&cmd));
        a.wait_until(
            "runner A's chunk insert to run",
            Duration::from_secs(60),
            Duration::from_millis(20),
            async || engine_queries(&db) == 1,
        )
        .await;
        // Freeze A's whole namespace (unshare and the runner): no heartbeat from here on.
        let parent = a.child.id().to_string();
        let signal = |sig: &str| {
            let st = std::process::Command::new("pkill")
                .args([sig, "-P", &parent])
                .status()
                .unwrap();
            assert!(st.success(), "pkill {sig}");
        };
        signal("-STOP");
        // B's insert is quicker (6 s); it starts once A's heartbeat is older than the TTL.
        db.q("INSERT INTO ctl VALUES (2, 0.05)");
        tokio::time::sleep(Duration::from_secs(33)).await;
        let mut b = spawn(db.dir.path(), "b", &[], &spec);
        let b_err = b.stderr_path().to_path_buf();
        b.wait_until(
            "runner B to take over and kill A's insert",
            Duration::from_secs(60),
            Duration::from_millis(20),
            async || {
                std::fs::read_to_string(&b_err)
                    .unwrap_or_default()
                    .contains("still running on the server")
            },
        )
        .await;
        b.wait_until(
            "runner B's own insert to run",
            Duration::from_secs(60),
            Duration::from_millis(20),
            async || engine_queries(&db) == 1,
        )
        .await;
        signal("-CONT");
        let (code_b, out_b, err_b) = b.finish(Duration::from_secs(120)).await;
        let (code_a, out_a, err_a) = a.finish(Duration::from_secs(120)).await;
        let all = format!(
            "a:\n{}\nb:\n{}",
            all_output(&out_a, &err_a),
            all_output(&out_b, &err_b)
        );
        assert_eq!(code_b, 0, "{all}");
        assert_eq!(code_a, 75, "{all}");
        assert_eq!(db.num("SELECT count() FROM out"), 120, "{all}");
        assert_eq!(db.num("SELECT uniqExact(k) FROM out"), 120, "{all}");
        let month = db.record("frozen", "2025-11").expect("the month's record");
        assert_eq!((month.status.as_str(), month.rows), ("done", 120), "{all}");
    }
}
