//! Prometheus metrics (scraped during a real run, pushed at exit) and JSON log lines.

mod common;
use common::prom::{free_port, receiver, scrape, slow_receiver, value};
use common::{TestDb, backfill, count};
use std::process::Stdio;
use std::time::{Duration, Instant};

async fn table(db: &TestDb, rows: i64) -> tokio_postgres::Client {
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT generate_series(1, {rows});"
    ))
    .await
    .unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_moves_with_the_run_and_matches_rows_done() {
    let db = TestDb::new("metrics").await;
    let c = table(&db, 3000).await;
    let spec = db.spec(
        "scraped.yaml",
        "postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1)
batch: {size: 100, target: 0, pause: 40ms}
",
    );
    let port = free_port();
    let mut child = backfill()
        .args(["run", "--metrics-addr", &format!("127.0.0.1:{port}")])
        .arg(&spec)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while seen.len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let Some(body) = scrape(port) else { continue };
        let Some(keys) = value(&body, "backfill_keys_total", "scraped") else {
            continue;
        };
        // The counter moves after the commit: the store is never behind it.
        let stored = count(
            &c,
            &format!("SELECT keys_done FROM {}", common::store::JOB_VIEW),
        )
        .await as f64;
        assert!(keys <= stored, "metric {keys} ahead of the store {stored}");
        assert_eq!(value(&body, "backfill_rows_total", "scraped"), Some(keys));
        assert!(
            body.contains("backfill_job_status{backfill_job=\"scraped\",status=\"running\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("backfill_batch_duration_seconds_bucket{backfill_job=\"scraped\""),
            "{body}"
        );
        assert!(
            body.contains("backfill_batch_size{backfill_job=\"scraped\",worker=\"w0\"} 100"),
            "{body}"
        );
        if seen.last().is_none_or(|last| keys > *last) {
            seen.push(keys);
        }
    }
    assert!(
        seen.len() >= 3,
        "counter did not move across scrapes: {seen:?}"
    );
    assert_eq!(child.wait().unwrap().code(), Some(0));
    db.drop_db().await;
}

#[tokio::test]
async fn pushgateway_gets_the_final_numbers_at_exit() {
    let db = TestDb::new("push").await;
    let c = table(&db, 1500).await;
    let spec = db.spec(
        "pushed.yaml",
        "postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1)
batch: {size: 100, target: 0, pause: 20ms}
",
    );
    let (port, got) = receiver();
    let url = format!("http://pusher:s3cret-push@127.0.0.1:{port}/metrics/job/backfill");
    let out = backfill()
        .args(["run", "--pushgateway", &url, "--push-interval", "100ms"])
        .arg(&spec)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        !stderr.contains("s3cret-push"),
        "push password logged: {stderr}"
    );
    let got = got.lock().unwrap().clone();
    assert!(
        got.len() >= 2,
        "periodic pushes and a final one: {}",
        got.len()
    );
    let (line, headers, body) = got.last().unwrap();
    assert!(line.starts_with("PUT /metrics/job/backfill "), "{line}");
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("authorization: basic "),
        "{headers}"
    );
    assert_eq!(
        value(body, "backfill_keys_total", "pushed"),
        Some(1500.0),
        "{body}"
    );
    assert_eq!(value(body, "backfill_rows_total", "pushed"), Some(1500.0));
    assert_eq!(value(body, "backfill_batches_total", "pushed"), Some(15.0));
    assert!(
        body.contains("backfill_job_status{backfill_job=\"pushed\",status=\"done\"} 1"),
        "{body}"
    );
    assert!(value(body, "backfill_last_success_timestamp_seconds", "pushed").is_some());
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, 1500);
    db.drop_db().await;
}

/// A gateway slow to answer: a periodic push is under way when the job ends. The final push
/// must wait for it, never overlap it (the gateway could apply the older numbers last) nor cut
/// it off midway.
#[tokio::test]
async fn a_push_under_way_at_exit_is_finished_before_the_final_one() {
    let db = TestDb::new("pushslow").await;
    table(&db, 1500).await;
    let spec = db.spec(
        "slowpush.yaml",
        "postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1)
batch: {size: 100, target: 0, pause: 20ms}
",
    );
    let (port, got, most_open) = slow_receiver(Duration::from_millis(400));
    let url = format!("http://127.0.0.1:{port}/metrics/job/backfill");
    let out = backfill()
        .args(["run", "--pushgateway", &url, "--push-interval", "10ms"])
        .arg(&spec)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("WARN"), "a push failed: {stderr}");
    assert_eq!(
        most_open.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "two pushes were in flight at once"
    );
    let got = got.lock().unwrap().clone();
    assert!(
        got.len() >= 2,
        "periodic pushes and a final one: {}",
        got.len()
    );
    let (line, _, body) = got.last().unwrap();
    assert!(line.starts_with("PUT /metrics/job/backfill "), "{line}");
    assert_eq!(
        value(body, "backfill_keys_total", "slowpush"),
        Some(1500.0),
        "{body}"
    );
    assert!(
        body.contains("backfill_job_status{backfill_job=\"slowpush\",status=\"done\"} 1"),
        "{body}"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn json_log_lines_parse_and_carry_job_batch_and_rows() {
    let db = TestDb::new("jsonlog").await;
    table(&db, 600).await;
    let spec = db.spec(
        "logged.yaml",
        "postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1)
batch: {size: 100, target: 0, pause: 20ms}
",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_backfill"))
        .args(["--log-format", "json", "run", "--progress-interval", "10ms"])
        .arg(&spec)
        .env("BACKFILL_LOG", "debug")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let batches: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "batch done")
        .collect();
    assert_eq!(
        batches.len(),
        7,
        "one debug event per batch (6 + the empty last one)"
    );
    for (i, b) in batches.iter().take(6).enumerate() {
        assert_eq!(b["job"], "logged");
        assert_eq!(b["level"], "DEBUG");
        assert_eq!(b["batch"], i as u64 + 1);
        assert_eq!(b["rows"], 100);
    }
    let progress: Vec<_> = lines
        .iter()
        .filter(|l| {
            l["level"] == "INFO" && l["message"].as_str().unwrap_or("").starts_with("batch ")
        })
        .collect();
    assert!(!progress.is_empty(), "info progress lines: {stderr}");
    let p = progress.last().unwrap();
    assert_eq!(p["job"], "logged");
    assert!(
        p["batch"].is_u64() && p["total"].is_u64() && p["rows"].is_u64(),
        "{p}"
    );
    let m = p["message"].as_str().unwrap();
    assert!(
        m.contains(" rows, total ") && m.contains("remaining ~") && m.contains("ETA "),
        "{m}"
    );
    db.drop_db().await;
}

/// The final push of a run of `spec` that exits 1: its body.
fn final_push_of_a_failed_run(spec: &std::path::Path) -> String {
    let (port, got) = receiver();
    let url = format!("http://127.0.0.1:{port}/metrics/job/backfill");
    let out = backfill()
        .args(["run", "--pushgateway", &url, "--push-interval", "1h"])
        .arg(spec)
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{all}");
    let got = got.lock().unwrap().clone();
    let (_, _, body) = got.last().unwrap_or_else(|| panic!("no final push: {all}"));
    body.clone()
}

#[tokio::test]
async fn a_job_that_fails_before_it_starts_exports_failed() {
    let db = TestDb::new("failstart").await;
    table(&db, 10).await;
    let missing = db.spec(
        "missing.yaml",
        "postgres:
  url: $URL
  table: no_such_table
  key: id
  statement: UPDATE no_such_table SET n = 1 WHERE id = ANY($1)
",
    );
    // Nothing listens there: the connection is refused.
    let refused = db.spec(
        "refused.yaml",
        &format!(
            "postgres:
  url: postgres://postgres@127.0.0.1:{}/postgres
  table: t
  key: id
  statement: UPDATE t SET n = 1 WHERE id = ANY($1)
",
            free_port()
        ),
    );
    // Fails in the throttle's first check, before the job itself is started.
    let throttle = db.spec(
        "throttle.yaml",
        "postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET n = 1 WHERE id = ANY($1)
throttle:
  query: SELECT 'not a boolean'
",
    );
    for (job, spec) in [
        ("missing", &missing),
        ("refused", &refused),
        ("throttle", &throttle),
    ] {
        let body = final_push_of_a_failed_run(spec);
        let failed = format!("backfill_job_status{{backfill_job=\"{job}\",status=\"failed\"}} 1");
        assert!(body.contains(&failed), "{job}: no {failed} in\n{body}");
        let running = format!("backfill_job_status{{backfill_job=\"{job}\",status=\"running\"}} 0");
        assert!(body.contains(&running), "{job}: {body}");
    }
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_seconds_grow_while_the_throttle_holds_the_job() {
    let db = TestDb::new("throttlemetric").await;
    let c = table(&db, 500).await;
    c.batch_execute("CREATE TABLE control (hold bool NOT NULL); INSERT INTO control VALUES (true)")
        .await
        .unwrap();
    let spec = db.spec(
        "held.yaml",
        "postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1)
batch: {size: 100, target: 0}
throttle:
  query: SELECT hold FROM control
  interval: 100ms
",
    );
    let port = free_port();
    let mut child = backfill()
        .args(["run", "--metrics-addr", &format!("127.0.0.1:{port}")])
        .arg(&spec)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Held from the start: the metric must move before the throttle lets go.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "backfill_throttled_seconds did not grow while throttled: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(body) = scrape(port) else { continue };
        let Some(v) = value(&body, "backfill_throttled_seconds", "held") else {
            continue;
        };
        if v > 0.0 && seen.last().is_none_or(|last| v > *last) {
            seen.push(v);
        }
    }
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n > 0").await,
        0,
        "a batch ran while throttled"
    );
    c.batch_execute("UPDATE control SET hold = false")
        .await
        .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, 500);
    db.drop_db().await;
}
