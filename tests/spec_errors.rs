//! Bad specs exit 2 and name file, line and field; `validate` needs no database.

mod common;
use common::run;

fn check(yaml: &str, want_line: Option<u32>, want_field: &str, want_text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.yaml");
    std::fs::write(&path, yaml).unwrap();
    let (code, _out, err) = run(&[&"validate", &path]);
    assert_eq!(code, 2, "exit code for:\n{yaml}\nstderr:\n{err}");
    let place = match want_line {
        Some(l) => format!("{}:{l}:", path.display()),
        None => path.display().to_string(),
    };
    assert!(err.contains(&place), "want {place:?} in:\n{err}");
    if !want_field.is_empty() {
        assert!(
            err.contains(&format!("field `{want_field}`")),
            "want field {want_field:?} in:\n{err}"
        );
    }
    assert!(err.contains(want_text), "want {want_text:?} in:\n{err}");
}

const GOOD: &str = "postgres:
  url: postgres://u:pw@localhost/db
  table: t
  key: id
  statement: UPDATE t SET x = 1 WHERE id = ANY($1)
";

#[test]
fn good_spec_validates_without_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0001_good.yaml");
    std::fs::write(&path, GOOD).unwrap();
    let (code, out, err) = run(&[&"validate", &dir.path()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("job 0001_good"), "{out}");
}

#[test]
fn unknown_field() {
    check(
        &GOOD.replace("  key: id\n", "  key: id\n  tabel: x\n"),
        Some(5),
        "postgres.tabel",
        "unknown field",
    );
}

#[test]
fn missing_key_table_statement() {
    check(
        &GOOD.replace("  key: id\n", ""),
        None,
        "postgres.key",
        "missing field",
    );
    check(
        &GOOD.replace("  table: t\n", ""),
        None,
        "postgres.table",
        "missing field",
    );
    check(
        "postgres:\n  url: postgres://h/db\n  table: t\n  key: id\n",
        None,
        "postgres.statement",
        "missing field",
    );
}

#[test]
fn wrong_type() {
    check(
        &format!("{GOOD}batch:\n  size: lots\n"),
        Some(7),
        "batch.size",
        "not a whole number",
    );
}

/// Each way of writing a number that is not a plain whole number says which it is: a float
/// (`10.0`, `1e3`, `0010`) was "far too large", and quoted text "5000 is far too large".
#[test]
fn a_count_written_otherwise_says_how() {
    for (value, want) in [
        (
            "10.0",
            "plain whole number (a decimal point, an exponent or leading zeros): write 10",
        ),
        ("1e3", "write 1000"),
        ("0010", "write 10"),
        ("\"5000\"", "\"5000\" is text (quoted, or tagged !!str)"),
        ("!!str 10", "\"10\" is text"),
        ("99999999999999999999", "far too large"),
    ] {
        check(
            &format!("{GOOD}batch:\n  size: {value}\n"),
            Some(7),
            "batch.size",
            want,
        );
    }
}

/// `workers` is a count like the others: a negative one says so (it was a bare "invalid u64").
#[test]
fn negative_workers() {
    check(
        &format!("{GOOD}workers: -1\n"),
        Some(6),
        "workers",
        "-1 is negative: write a whole number",
    );
}

/// Two YAML documents in one file: the message is for whoever writes the spec, not serde's
/// hint for Rust programmers (`use from_str_multiple`).
#[test]
fn a_second_document_in_one_file() {
    check(
        &format!("{GOOD}---\n{GOOD}"),
        Some(7),
        "",
        "a spec file holds one job",
    );
}

#[test]
fn bad_duration() {
    check(
        &format!("{GOOD}limits:\n  max_runtime: 5 minutes\n"),
        Some(7),
        "limits.max_runtime",
        "invalid duration",
    );
    check(
        &format!("{GOOD}batch:\n  pause: 250\n"),
        Some(7),
        "batch.pause",
        "unit is required",
    );
}

#[test]
fn duplicate_key() {
    check(
        &GOOD.replace("  key: id\n", "  key: id\n  key: uid\n"),
        Some(5),
        "postgres.key",
        "duplicate key",
    );
}

#[test]
fn bad_lock_mode() {
    check(
        &GOOD.replace("  key: id\n", "  key: id\n  lock: nowait\n"),
        Some(5),
        "postgres.lock",
        "skip_locked",
    );
}

#[test]
fn statement_without_param() {
    check(
        &GOOD.replace("ANY($1)", "ANY('{1}')"),
        Some(5),
        "postgres.statement",
        "must use $1",
    );
}

#[test]
fn min_above_max() {
    check(
        &format!("{GOOD}batch:\n  min: 500\n  max: 100\n  size: 200\n"),
        Some(7),
        "batch.min",
        "larger than batch.max",
    );
}

#[test]
fn size_zero() {
    check(
        &format!("{GOOD}batch:\n  size: 0\n"),
        Some(7),
        "batch.size",
        "at least 1",
    );
}

#[test]
fn not_a_postgres_url() {
    check(
        &GOOD.replace("postgres://u:pw@localhost/db", "mysql://u:pw@localhost/db"),
        Some(2),
        "postgres.url",
        "not a postgres:// URL",
    );
}

#[test]
fn unset_variable_is_fatal_for_run_but_not_validate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.yaml");
    std::fs::write(
        &path,
        GOOD.replace("postgres://u:pw@localhost/db", "${BF_TEST_SURELY_UNSET}"),
    )
    .unwrap();
    let (code, out, err) = run(&[&"validate", &path]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("BF_TEST_SURELY_UNSET"), "{out}");
    let (code, _, err) = run(&[&"run", &path]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("{}:2:", path.display()))
            && err.contains("BF_TEST_SURELY_UNSET is not set"),
        "{err}"
    );
}

#[test]
fn bad_job_name() {
    check(
        &format!("name: 'my job!'\n{GOOD}"),
        Some(1),
        "name",
        "may only use",
    );
}

#[test]
fn not_yaml_mapping() {
    check("postgres: [\n", Some(1), "postgres", "");
}

#[test]
fn empty_file() {
    check("", Some(1), "", "empty");
}

#[test]
fn passwords_never_echoed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.yaml");
    std::fs::write(
        &path,
        GOOD.replace(
            "postgres://u:pw@localhost/db",
            "mysql://u:hunter2@localhost/db",
        ),
    )
    .unwrap();
    let (code, out, err) = run(&[&"validate", &path]);
    assert_eq!(code, 2);
    assert!(
        !out.contains("hunter2") && !err.contains("hunter2"),
        "{out}{err}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let (code, _, _) = run(&[&"run"]);
    assert_eq!(code, 2);
    let (code, _, _) = run(&[&"frobnicate"]);
    assert_eq!(code, 2);
    let (code, _, err) = run(&[&"run", &"/nonexistent/spec.yaml"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, _) = run(&[&"run", &"--max-runtime", &"5 minutes", &"x.yaml"]);
    assert_eq!(code, 2);
}

/// `batch.walk_ahead` holds the next batch's locks while the current statement runs: refused
/// with a pause between batches (held through it) or an idle-in-transaction limit a statement
/// may outlast (the batch ahead waits idle for it and would be killed).
#[test]
fn walk_ahead_refuses_a_pause_and_a_short_idle_limit() {
    check(
        &format!("{GOOD}batch:\n  walk_ahead: true\n  pause: 10ms\n"),
        Some(7),
        "batch.walk_ahead",
        "cannot go with batch.pause",
    );
    check(
        &format!(
            "{GOOD}batch:\n  walk_ahead: true\nlimits:\n  statement_timeout: 30s\n  \
             idle_in_transaction_session_timeout: 10s\n"
        ),
        Some(7),
        "batch.walk_ahead",
        "above limits.statement_timeout",
    );
    check(
        &format!("{GOOD}batch:\n  walk_ahead: true\nlimits:\n  statement_timeout: 0s\n"),
        Some(7),
        "batch.walk_ahead",
        "above limits.statement_timeout",
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.yaml");
    std::fs::write(&path, format!("{GOOD}batch:\n  walk_ahead: true\n")).unwrap();
    let (code, out, err) = run(&[&"validate", &path]);
    assert_eq!(code, 0, "{out}{err}");
}

/// A URL is checked by what the environment gave, even when the value holds `${` itself (a
/// password, say): only a variable that is not set leaves the check for later. It once skipped
/// the checks, and a ClickHouse URL's database was then taken as `default`.
#[test]
fn a_url_whose_value_holds_dollar_brace_is_still_checked() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "pg.yaml",
            GOOD.replace("postgres://u:pw@localhost/db", "${BF_TEST_URL}"),
            "postgres://u:Hunt${er@x@localhost/db",
            "more than one `@`",
        ),
        (
            "ch.yaml",
            "clickhouse:
  url: ${BF_TEST_URL}
  source: src
  time_column: ts
  target: dst
  statement: INSERT INTO {target} SELECT * FROM src WHERE {chunk}
"
            .to_string(),
            "ftp://default:pw${x@127.0.0.1:8123/db",
            "clickhouse.url",
        ),
    ];
    for (file, yaml, url, want) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, yaml).unwrap();
        let out = common::backfill()
            .arg("validate")
            .arg(&path)
            .env("BF_TEST_URL", url)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{file}: {err}");
        assert!(err.contains(want), "{file}: want {want:?} in {err}");
        assert!(!err.contains("Hunt") && !err.contains("pw$"), "{err}");
    }
}

/// A YAML error quotes no line of a spec that may hold a password, however the spec lays it
/// out (a flow mapping, a query parameter, a folded URL's second line, block scalars, quoted
/// or explicit keys), in text and in JSON logs; it still names file, line and column.
#[test]
fn passwords_in_yaml_error_snippets_are_masked() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [
        "postgres: {url: \"host=h password=Hunter2Secret\", bogus: 1}\n",
        "postgres: {\"url\": \"postgres://u@127.0.0.1:5/db?sslmode=disable&password=Hunter2Secret\", x: }\n",
        "postgres: {table: t, url: \"host=127.0.0.1 password=Hunter2Secret dbname=x\", key: id, statement: \"UPDATE t SET n=1 WHERE id = ANY($1)\"}\nbatch: {size: abc}\n",
        "postgres:\n  url: >-\n    host=127.0.0.1 port=5\n    password=Hunter2Secret dbname=d\n  table: [t\n",
        "clickhouse: {url: \"http://127.0.0.1:8123/db\", password: Hunter2Secret, source: [x}\n",
        // Layouts a line-by-line search for `password:` does not see.
        "clickhouse:\n  url: http://default@127.0.0.1:8123/db\n  \"password\": Hunter2Secret\n  source: [src\n",
        "clickhouse:\n  url: http://default@127.0.0.1:8123/db\n  password : Hunter2Secret\n  source: {a\n",
        "clickhouse:\n  url: http://default@127.0.0.1:8123/db\n  ? password\n  : Hunter2Secret\n  source: [src\n",
        "clickhouse:\n  url: http://default@127.0.0.1:8123/db\n  password: |-\n    Hunter2Secret\n  source: [src\n",
        "clickhouse:\n  url: http://default@127.0.0.1:8123/db\n  password: \"Multi\n    Hunter2Secret\"\n  source: [src\n",
        "clickhouse: {url: http://default@127.0.0.1:8123/db,\n  password:\n    Hunter2Secret,\n  source: src, time_column: [ts}\n",
        "postgres:\n  url: >-\n    host=127.0.0.1 user=postgres password\n    = Hunter2Secret dbname=x\n  table: t\n  key: [id\n",
        "postgres:\n  url: host=127.0.0.1 password='wxyz#Hunter2Secret' dbname=x\n  table: [t\n",
        "postgres:\n  url: \"host=127.0.0.1 password='abcd Hunter2Secret'\"\n  table: [t\n",
    ];
    for (i, yaml) in specs.iter().enumerate() {
        let path = dir.path().join(format!("s{i}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        for format in ["text", "json"] {
            let o = std::process::Command::new(env!("CARGO_BIN_EXE_backfill"))
                .args(["--log-format", format, "validate"])
                .arg(&path)
                .env("NO_COLOR", "1")
                .output()
                .unwrap();
            let (code, out, err) = (
                o.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
            );
            assert_eq!(code, 2, "{yaml}\n{err}");
            // The spec's own error, not a usage error.
            assert!(err.contains(&format!("s{i}.yaml:")), "{err}");
            assert!(
                !out.contains("Hunter2") && !err.contains("Hunter2"),
                "{format}, spec:\n{yaml}\nprinted:\n{out}{err}"
            );
        }
    }
    // A spec with no secret in it still gets the spot quoted.
    let path = dir.path().join("plain.yaml");
    std::fs::write(&path, "postgres:\n  url: ${DATABASE_URL}\n  table: [t\n").unwrap();
    let (code, _, err) = run(&[&"validate", &path]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("3 |   table: [t"), "{err}");
}

/// Two specs under one job name would share one checkpoint: `validate` refuses them as `run`
/// does, naming both files.
#[test]
fn validate_refuses_two_specs_with_one_job_name() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["a.yaml", "b.yaml"] {
        std::fs::write(dir.path().join(file), format!("name: samejob\n{GOOD}")).unwrap();
    }
    let (code, out, err) = run(&[&"validate", &dir.path()]);
    assert_eq!(code, 2, "{out}{err}");
    let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
    assert!(
        err.contains(&format!(
            "{}: job name \"samejob\" is also the name of {}",
            b.display(),
            a.display()
        )),
        "{err}"
    );
    // One file named twice is one spec, not two jobs of one name.
    let dot = dir.path().join(".").join("a.yaml");
    let (code, out, err) = run(&[&"validate", &a, &dot]);
    assert_eq!(code, 0, "{out}{err}");
}

/// A YAML tag the spec does not know is refused, not dropped: `table: !include t.sql` was read
/// as the table `t.sql`. YAML's own tags still read as written.
#[test]
fn an_unknown_tag_is_refused() {
    check(
        &GOOD.replace("  table: t\n", "  table: !include t.sql\n"),
        Some(3),
        "",
        "unsupported tag `!include`",
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.yaml");
    std::fs::write(&path, GOOD.replace("  table: t\n", "  table: !!str t\n")).unwrap();
    let (code, out, err) = run(&[&"validate", &path]);
    assert_eq!(code, 0, "{out}{err}");
}

/// The engine names every chunk insert itself (to find and kill what a killed runner left
/// running): a `query_id` among the spec's settings is refused where it is written.
#[test]
fn a_query_id_among_the_clickhouse_settings_is_refused() {
    check(
        "clickhouse:
  url: http://default@127.0.0.1:8123/db
  source: src
  time_column: ts
  target: dst
  settings:
    max_threads: 2
    query_id: fixed
  statement: INSERT INTO {target} SELECT * FROM src WHERE {chunk}
",
        Some(8),
        "clickhouse.settings.query_id",
        "set by the engine",
    );
}
