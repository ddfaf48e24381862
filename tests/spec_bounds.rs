//! Every number and duration of a spec is bounded at `validate` (exit 2, file:line, field)
//! instead of failing at run time; `max_transaction_age: 0` means off; with JSON logs the final
//! error line is one JSON object with the exit code.

mod common;
use backfill::spec::{Env, load_file};
use common::run;
use std::time::Duration;

const BASE: &str = "postgres:
  url: postgres://u:pw@localhost/db
  table: t
  key: id
  statement: UPDATE t SET x = 1 WHERE id = ANY($1)
";

/// `section` is appended to BASE; its first line is line 6.
fn refused(section: &str, line: u32, field: &str, text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.yaml");
    std::fs::write(&path, format!("{BASE}{section}")).unwrap();
    for cmd in ["validate", "run"] {
        let (code, out, err) = run(&[&cmd, &path]);
        let all = format!("{section}\nstdout:\n{out}\nstderr:\n{err}");
        assert_eq!(code, 2, "{cmd}: {all}");
        let place = format!("{}:{line}:", path.display());
        assert!(err.contains(&place), "{cmd}: want {place}: {all}");
        assert!(err.contains(&format!("field `{field}`")), "{cmd}: {all}");
        assert!(err.contains(text), "{cmd}: want {text:?}: {all}");
    }
}

#[test]
fn batch_sizes_are_bounded() {
    refused(
        "batch:\n  size: 9223372036854775808\n",
        7,
        "batch.size",
        "at most 1000000",
    );
    refused(
        "batch:\n  size: 18446744073709551615\n",
        7,
        "batch.size",
        "at most 1000000",
    );
    refused(
        "batch:\n  size: 18446744073709551616\n",
        7,
        "batch.size",
        "",
    );
    refused("batch:\n  size: -1\n", 7, "batch.size", "");
    refused(
        "batch:\n  size: 10\n  max: 2000000\n",
        8,
        "batch.max",
        "too large",
    );
    refused(
        "batch:\n  size: 10\n  min: 0\n",
        8,
        "batch.min",
        "at least 1",
    );
    refused("batch:\n  target: 2h\n", 7, "batch.target", "at most 1h");
    refused("batch:\n  pause: 1d\n", 7, "batch.pause", "at most 1h");
}

#[test]
fn timeouts_fit_postgres() {
    for field in [
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
    ] {
        refused(
            &format!("limits:\n  {field}: 2147483648ms\n"),
            7,
            &format!("limits.{field}"),
            "2147483647ms",
        );
        refused(
            &format!("limits:\n  {field}: 30d\n"),
            7,
            &format!("limits.{field}"),
            "too long",
        );
    }
    refused(
        "limits:\n  max_runtime: 400d\n",
        7,
        "limits.max_runtime",
        "too long",
    );
    refused(
        "limits:\n  max_transaction_age: 400d\n",
        7,
        "limits.max_transaction_age",
        "too long",
    );
    refused(
        "limits:\n  lock_timeout: 99999999999999999999s\n",
        7,
        "limits.lock_timeout",
        "",
    );
    // Waiting for ever while holding rows: refused, not taken as "off".
    refused(
        "limits:\n  lock_timeout: 0\n",
        7,
        "limits.lock_timeout",
        "for ever",
    );
}

#[test]
fn throttle_values_are_bounded() {
    refused(
        "throttle:\n  interval: 2h\n",
        7,
        "throttle.interval",
        "too long",
    );
    refused(
        "throttle:\n  interval: 0\n",
        7,
        "throttle.interval",
        "more than 0",
    );
    for n in ["0", "262144", "4294967296", "99999999999999"] {
        refused(
            &format!("throttle:\n  max_active_backends: {n}\n"),
            7,
            "throttle.max_active_backends",
            "out of range",
        );
    }
    refused(
        "throttle:\n  max_replication_lag: 400d\n",
        7,
        "throttle.max_replication_lag",
        "too long",
    );
}

#[test]
fn limits_at_the_bounds_pass_and_zero_means_off() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.yaml");
    let load = |section: &str| {
        std::fs::write(&path, format!("{BASE}{section}")).unwrap();
        load_file(&path, &Env::process()).unwrap_or_else(|e| panic!("{e}"))
    };
    let spec = load(
        "batch:\n  size: 1000000\n  max: 1000000\nlimits:\n  statement_timeout: 2147483647ms\n  \
         lock_timeout: 1ms\n  max_transaction_age: 0\nthrottle:\n  max_active_backends: 262143\n",
    );
    assert_eq!(spec.batch.size, 1_000_000);
    assert_eq!(
        spec.limits.statement_timeout,
        Duration::from_millis(2_147_483_647)
    );
    assert_eq!(spec.limits.lock_timeout, Duration::from_millis(1));
    assert_eq!(spec.limits.max_transaction_age, None, "0 must mean off");
    assert_eq!(spec.throttle.unwrap().max_active_backends, Some(262_143));
    let spec = load("");
    assert_eq!(
        spec.limits.max_transaction_age,
        Some(Duration::from_secs(600))
    );
    let spec = load("limits:\n  max_transaction_age: 1h\n");
    assert_eq!(
        spec.limits.max_transaction_age,
        Some(Duration::from_secs(3600))
    );
}

#[test]
fn json_logs_end_with_a_json_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.yaml");
    std::fs::write(&path, format!("{BASE}batch:\n  size: 0\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_backfill"))
        .args(["--log-format", "json", "validate"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert_eq!(lines[0]["level"], "ERROR");
    assert!(
        lines[0]["message"]
            .as_str()
            .unwrap()
            .contains("field `batch.size`"),
        "{err}"
    );
    let last = &lines[1];
    assert_eq!(last["level"], "ERROR");
    assert_eq!(last["exit_code"], 2);
    assert!(last["message"].as_str().unwrap().contains("invalid spec"));
    assert!(last["timestamp"].is_string());
    // Text logs keep the plain line.
    let (code, _, err) = run(&[&"validate", &path]);
    assert_eq!(code, 2);
    assert!(err.lines().last().unwrap().starts_with("error: "), "{err}");
}

#[test]
fn command_line_durations_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.yaml");
    std::fs::write(&path, BASE).unwrap();
    for args in [
        ["--max-runtime", "18446744073709551615s"],
        ["--max-runtime", "367d"],
        ["--push-interval", "0"],
        ["--progress-interval", "2h"],
    ] {
        let (code, _, err) = run(&[&"run", &args[0], &args[1], &path]);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("out of range"), "{args:?}: {err}");
    }
    // A watch that redraws in a loop would read the store as fast as it answers.
    let (code, _, err) = run(&[&"status", &"--watch", &"--interval", &"0s", &path]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("out of range: 100ms to 1h"), "{err}");
}
