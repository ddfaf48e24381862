//! The production image in real containers (Docker daemon and image from scripts/image.sh),
//! against the machine's Postgres and ClickHouse over `--network host`, locked down as the
//! deploy examples run it: the shipped Postgres examples run as a directory (`run /jobs`) to
//! exit 0; `docker stop` in the middle of a run exits 75 at the next batch boundary and a second
//! container finishes with every row inserted exactly once; the shipped ClickHouse example runs
//! too. Also what the image is: non-root, the binary as entrypoint, no shell, no secrets, small.
//! Every test has databases of its own. Docker missing is a failure, not a skip.

mod common;
use common::ch::ChDb;
use common::docker::{ContainerName, docker, docker_out, image, run_args, text};
use common::runner::wait_until;
use common::{TestDb, count};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `docker run` to the end; returns (exit code, stdout + stderr).
fn docker_run(args: &[String]) -> (i32, String) {
    let out = docker().args(args).output().expect("docker run");
    (out.status.code().unwrap_or(-1), text(&out))
}

#[test]
fn image_is_non_root_small_shell_less_and_holds_no_secrets() {
    let img = image();
    let inspect = docker_out(&["image", "inspect", &img.name]);
    assert!(inspect.status.success(), "{}", text(&inspect));
    let info: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let config = &info[0]["Config"];
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/backfill"]),
        "{config}"
    );
    assert_eq!(config["StopSignal"], "SIGTERM", "{config}");
    // No URL or credential in the image's environment or in any layer's command.
    let env = config["Env"].to_string();
    let history = docker_out(&[
        "history",
        "--no-trunc",
        "--format",
        "{{.CreatedBy}}",
        &img.name,
    ]);
    assert!(history.status.success(), "{}", text(&history));
    for (what, body) in [("env", env), ("history", text(&history))] {
        for secret in [
            "DATABASE_URL=",
            "CLICKHOUSE_URL=",
            "postgres://",
            "PASSWORD",
        ] {
            assert!(!body.contains(secret), "{what} holds {secret:?}: {body}");
        }
    }
    // Small: the binary on a distroless-sized base.
    let size = info[0]["Size"].as_u64().unwrap();
    assert!(size < 80_000_000, "image is {size} bytes");

    // No shell to exec into, and the default command checks the baked-in Postgres examples.
    let name = ContainerName::new("shell");
    let (code, all) = docker_run(&[
        "run".into(),
        "--rm".into(),
        "--name".into(),
        name.0.clone(),
        "--entrypoint".into(),
        "/bin/sh".into(),
        img.name.clone(),
        "-c".into(),
        "true".into(),
    ]);
    assert_ne!(code, 0, "the image has a shell: {all}");
    let name = ContainerName::new("validate");
    let (code, all) = docker_run(&[
        "run".into(),
        "--rm".into(),
        "--name".into(),
        name.0.clone(),
        img.name.clone(),
    ]);
    assert_eq!(code, 0, "{all}");
    for job in ["flowsheet-dj-name", "ci-pending-builds"] {
        assert!(
            all.contains(job),
            "default command output lacks {job}: {all}"
        );
    }
    assert!(
        !all.contains("test-case-runs-recent-100"),
        "/jobs must hold only the Postgres examples: {all}"
    );
}

/// Load scripts/demo-data.sql (`rows` flowsheet rows) into a test database, as demo-db.sh does.
fn load_demo_data(db: &TestDb, rows: u32) {
    let out = Command::new("psql")
        .args(["-X", "-q", "-w", "-v", "ON_ERROR_STOP=1", "-v"])
        .arg(format!("rows={rows}"))
        .args(["-d", &db.url, "-f"])
        .arg(root().join("scripts/demo-data.sql"))
        .stdin(Stdio::null())
        .output()
        .expect("run psql");
    assert!(out.status.success(), "demo-data.sql: {}", text(&out));
}

#[tokio::test]
async fn shipped_postgres_examples_run_as_a_directory_in_the_image() {
    image();
    let db = TestDb::new("ctr_examples").await;
    load_demo_data(&db, 20_000);
    let c = db.client().await;

    // `docker run IMAGE run /jobs`: every baked-in spec, in file-name order.
    let name = ContainerName::new("examples");
    let mut args = run_args(&name.0, &[("DATABASE_URL", &db.url)], None);
    args.extend(["run".into(), "/jobs".into()]);
    let (code, all) = docker_run(&args);
    assert_eq!(code, 0, "{all}");
    assert!(all.contains("flowsheet-dj-name"), "{all}");
    assert!(all.contains("ci-pending-builds"), "{all}");
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM wxyc_schema.flowsheet f
               JOIN wxyc_schema.shows s ON s.id = f.show_id
               LEFT JOIN wxyc_schema.auth_user u ON u.id = s.primary_dj_id
              WHERE f.entry_type = 'track'
                AND f.dj_name IS DISTINCT FROM COALESCE(u.dj_name, s.legacy_dj_name, u.name)"
        )
        .await,
        0,
        "flowsheet rows with a wrong dj_name"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM ci.ci_pending_builds").await,
        count(
            &c,
            "SELECT count(*) FROM ci.ci_builds WHERE status = 'pending'"
        )
        .await
    );
    assert!(count(&c, "SELECT count(*) FROM ci.ci_pending_builds").await > 0);

    // Again: both finished, both skipped, exit 0.
    let (code, all) = docker_run(&args);
    assert_eq!(code, 0, "{all}");
    assert!(all.contains("0 run, 2 skipped"), "{all}");
    drop(c);
    db.drop_db().await;
}

const ROWS: i64 = 20_000;
const BATCH: i64 = 100;

/// An INSERT job without a unique constraint in the target: a batch applied twice would show
/// up as duplicate ids. Fixed-size batches with a pause, so a run takes several seconds.
fn insert_spec(db: &TestDb) -> PathBuf {
    db.spec(
        "ctr-stop.yaml",
        &format!(
            "name: ctr-stop
postgres:
  url: ${{DATABASE_URL}}
  table: src
  key: id
  lock: none
  statement: INSERT INTO dst (id) SELECT id FROM src WHERE id = ANY($1)
batch:
  size: {BATCH}
  target: 0
  pause: 100ms
"
        ),
    )
}

#[tokio::test]
async fn docker_stop_mid_run_exits_75_at_a_batch_boundary_and_a_second_container_finishes_every_row_once()
 {
    image();
    let db = TestDb::new("ctr_stop").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE src (id bigint PRIMARY KEY);
         INSERT INTO src SELECT generate_series(1, {ROWS});
         ANALYZE src;
         CREATE TABLE dst (id bigint NOT NULL);"
    ))
    .await
    .unwrap();
    let spec = insert_spec(&db);
    let name = ContainerName::new("stop");
    let mut args = run_args(&name.0, &[("DATABASE_URL", &db.url)], Some(&spec));
    args.extend(["run".into(), "/jobs/ctr-stop.yaml".into()]);

    let log = db.dir.path().join("first.log");
    let mut first = docker()
        .args(&args)
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::from(
            std::fs::File::options().append(true).open(&log).unwrap(),
        ))
        .spawn()
        .expect("docker run");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // Some batches committed, the container still running.
    wait_until(
        "five batches committed by the first container",
        Duration::from_secs(120),
        Duration::from_millis(50),
        async || {
            assert!(
                first.try_wait().unwrap().is_none(),
                "the container exited early:\n{}",
                read_log()
            );
            count(&c, "SELECT count(*) FROM dst").await >= 5 * BATCH
        },
    )
    .await;
    let before_stop = count(&c, "SELECT count(*) FROM dst").await;
    // SIGTERM to PID 1 (the engine); SIGKILL only if it is still running 60 s later.
    let stop = docker_out(&["stop", "--time", "60", &name.0]);
    assert!(stop.status.success(), "{}", text(&stop));
    let status = first.wait().unwrap();
    let first_log = read_log();
    assert_eq!(
        status.code(),
        Some(75),
        "docker stop must end the run with 75 (progress saved), not a kill:\n{first_log}"
    );

    let after_stop = count(&c, "SELECT count(*) FROM dst").await;
    assert!(
        after_stop < ROWS,
        "the first run finished anyway:\n{first_log}"
    );
    // The open batch commits whole, then the engine stops: at most the batch in flight when the
    // signal came, plus one that started between our count and the signal.
    assert!(
        after_stop - before_stop <= 2 * BATCH,
        "{before_stop} rows before docker stop, {after_stop} after: more than one batch\n{first_log}"
    );
    assert_eq!(after_stop % BATCH, 0, "a partial batch was committed");
    assert_eq!(
        count(&c, "SELECT count(DISTINCT id) FROM dst").await,
        after_stop
    );

    // A second container resumes and finishes: every row exactly once.
    let (code, all) = docker_run(&args);
    assert_eq!(code, 0, "{all}");
    assert_eq!(count(&c, "SELECT count(*) FROM dst").await, ROWS, "{all}");
    assert_eq!(count(&c, "SELECT count(DISTINCT id) FROM dst").await, ROWS);
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM src LEFT JOIN dst USING (id) WHERE dst.id IS NULL"
        )
        .await,
        0
    );
    drop(c);
    db.drop_db().await;
}

/// Run each statement of a .sql file (`;`-separated, `--` comments) in a ClickHouse database.
fn ch_script(db: &ChDb, file: &Path) {
    let sql = std::fs::read_to_string(file).unwrap();
    let body: String = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    for statement in body.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        db.q(statement);
    }
}

#[test]
fn shipped_clickhouse_example_runs_in_the_image() {
    image();
    let db = ChDb::new("ctr_example");
    ch_script(&db, &root().join("jobs/clickhouse/tables.sql"));
    // Runs from 2025-10-15 for 240 days: the job's range is [2025-11-01, 2026-06-01), so the
    // first and last weeks lie outside it and must not be aggregated.
    db.q("INSERT INTO test_case_runs
          SELECT toDateTime('2025-10-15 00:00:00') + number * 864 AS ran_at,
                 toUInt32(number % 7 + 1), number % 50,
                 if(number % 10 = 0, 'failed', 'passed'), toUInt32(number % 1000)
            FROM numbers(24000)");
    let in_range = db.num(
        "SELECT count() FROM test_case_runs
          WHERE ran_at >= toDateTime('2025-11-01 00:00:00')
            AND ran_at < toDateTime('2026-06-01 00:00:00')",
    );
    assert!(in_range > 0 && in_range < 24_000, "{in_range}");

    let name = ContainerName::new("ch");
    let url = db.url.clone();
    let mut args = run_args(&name.0, &[("CLICKHOUSE_URL", &url)], None);
    args.extend(["run".into(), "/jobs/clickhouse".into()]);
    let (code, all) = docker_run(&args);
    assert_eq!(code, 0, "{all}");
    assert!(all.contains("test-case-runs-recent-100"), "{all}");

    let expected = db.q(
        "SELECT project_id, test_case_id, count(), sum(toUInt64(status = 'failed')),
                sum(toUInt64(duration_ms)), max(ran_at)
           FROM test_case_runs
          WHERE ran_at >= toDateTime('2025-11-01 00:00:00')
            AND ran_at < toDateTime('2026-06-01 00:00:00')
          GROUP BY project_id, test_case_id ORDER BY project_id, test_case_id FORMAT TSV",
    );
    let got = db.q(
        "SELECT project_id, test_case_id, countMerge(runs), sumMerge(failures),
                sumMerge(total_ms), maxMerge(last_run)
           FROM test_case_runs_recent_100
          GROUP BY project_id, test_case_id ORDER BY project_id, test_case_id FORMAT TSV",
    );
    assert_eq!(got.lines().count(), 7 * 50, "{got}");
    assert_eq!(got, expected);

    // Run again: the job is done, nothing lands twice.
    let (code, all) = docker_run(&args);
    assert_eq!(code, 0, "{all}");
    assert_eq!(
        db.q(
            "SELECT project_id, test_case_id, countMerge(runs), sumMerge(failures),
                     sumMerge(total_ms), maxMerge(last_run)
                FROM test_case_runs_recent_100
               GROUP BY project_id, test_case_id ORDER BY project_id, test_case_id FORMAT TSV"
        ),
        expected
    );
}
