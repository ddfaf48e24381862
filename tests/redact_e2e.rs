//! End to end: whatever the password and however the URL is written, the real binary never
//! prints it (stdout or stderr, text or JSON logs) from `validate`, `plan`, `status` or `run`,
//! whether the spec is refused, the server is unreachable, or it refuses the login. In JSON
//! mode every stderr line is one JSON object and the last one carries the exit code.
//!
//! Servers: nothing listens on 127.0.0.1:1; the machine's Postgres (trust auth) refuses a role
//! that does not exist; ClickHouse refuses a password for user `default` (which has none).

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use proptest::prelude::*;
use std::path::Path;
use std::process::{Command, Stdio};

const PG_ROLE: &str = "bf_no_such_role_e2e";

struct Case {
    label: &'static str,
    /// The `postgres:` or `clickhouse:` section.
    yaml: String,
    /// Exit code of `validate`; the other commands exit this too when it is 2, else 1.
    validate: i32,
}

fn json(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn pg(label: &'static str, url: &str, validate: i32) -> Case {
    Case {
        label,
        yaml: format!(
            "postgres:\n  url: {}\n  table: t\n  key: id\n  statement: UPDATE t SET n = 1 WHERE id = ANY($1)\n",
            json(url)
        ),
        validate,
    }
}

fn ch(label: &'static str, url: &str, password: Option<&str>, validate: i32) -> Case {
    let password = password.map_or(String::new(), |p| format!("  password: {}\n", json(p)));
    Case {
        label,
        yaml: format!(
            "clickhouse:\n  url: {}\n{password}  source: src\n  time_column: ts\n  target: dst\n  from: 2025-01-01\n  to: 2025-02-01\n  statement: INSERT INTO {{target}} SELECT * FROM src WHERE {{chunk}}\n",
            json(url)
        ),
        validate,
    }
}

/// Every form a password can take in a spec, with the exit code `validate` must give.
fn cases(pw: &str) -> Vec<Case> {
    let enc = utf8_percent_encode(pw, NON_ALPHANUMERIC).to_string();
    let quoted = pw.replace('\\', "\\\\").replace('\'', "\\'");
    let misread_pg = if pw.contains(['/', '?', '#', '@']) {
        2
    } else {
        0
    };
    let misread_ch = if pw.contains(['/', '?', '#', '@', '\\']) {
        2
    } else {
        0
    };
    vec![
        pg(
            "pg encoded, role refused",
            &format!("postgres://{PG_ROLE}:{enc}@127.0.0.1:5432/postgres"),
            0,
        ),
        pg(
            "pg encoded, unreachable",
            &format!("postgresql://u:{enc}@127.0.0.1:1/postgres?sslmode=disable"),
            0,
        ),
        pg(
            "pg password parameter",
            &format!("postgres://{PG_ROLE}@127.0.0.1:5432/postgres?password={enc}"),
            0,
        ),
        pg(
            "pg unencoded",
            &format!("postgres://{PG_ROLE}:{pw}@127.0.0.1:5432/postgres"),
            misread_pg,
        ),
        pg(
            "pg one slash",
            &format!("postgres:/u:{pw}@127.0.0.1:1/postgres"),
            2,
        ),
        pg(
            "pg key=value",
            &format!("host=127.0.0.1 port=1 user=u password='{quoted}' dbname=postgres"),
            2,
        ),
        ch(
            "ch encoded, password refused",
            &format!("http://default:{enc}@127.0.0.1:8123/default"),
            None,
            0,
        ),
        ch(
            "ch encoded, unreachable",
            &format!("http://default:{enc}@127.0.0.1:1/default"),
            None,
            0,
        ),
        ch(
            "ch unencoded",
            &format!("http://default:{pw}@127.0.0.1:1/default"),
            None,
            misread_ch,
        ),
        ch(
            "ch one slash",
            &format!("http:/u:{pw}@127.0.0.1:1/db"),
            None,
            2,
        ),
        ch(
            "ch password field",
            "http://default@127.0.0.1:8123/default",
            Some(pw),
            0,
        ),
    ]
}

fn backfill(format: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backfill"));
    c.arg("--log-format").arg(format);
    c.env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .env("BACKFILL_LOG", "debug")
        .stdin(Stdio::null());
    for a in args {
        c.arg(a);
    }
    let out = c.output().expect("run backfill");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run every command on every form of `pw`, in both log formats; check nothing shows it.
fn never_shown(pw: &str, dir: &Path) {
    for (i, case) in cases(pw).iter().enumerate() {
        let spec = dir.join(format!("job{i}.yaml"));
        std::fs::write(&spec, &case.yaml).unwrap();
        for cmd in ["validate", "plan", "status", "run"] {
            let want = match (cmd, case.validate) {
                (_, 2) => 2,
                ("validate", c) => c,
                _ => 1,
            };
            for format in ["text", "json"] {
                let (code, out, err) = backfill(format, &[&cmd, &spec]);
                let what = format!(
                    "{} / {cmd} / {format} / password {pw:?}\nspec:\n{}\nstdout:\n{out}\nstderr:\n{err}",
                    case.label, case.yaml
                );
                assert!(
                    !out.contains(pw) && !err.contains(pw),
                    "the password was printed: {what}"
                );
                assert_eq!(code, want, "exit code: {what}");
                if code == 0 {
                    continue;
                }
                let last = err.lines().last().unwrap_or("");
                if format == "text" {
                    assert!(last.starts_with("error: "), "last line: {what}");
                    continue;
                }
                // A short or quote-holding password may mask JSON syntax itself (redaction
                // wins); otherwise every line must stay one JSON object.
                if pw.chars().count() < 6 || pw.contains('"') {
                    continue;
                }
                for line in err.lines() {
                    let v: serde_json::Value = serde_json::from_str(line)
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{what}"));
                    assert!(v["level"].is_string() && v["message"].is_string(), "{what}");
                }
                let v: serde_json::Value = serde_json::from_str(last).unwrap();
                assert_eq!(v["level"], "ERROR", "{what}");
                assert_eq!(v["exit_code"], want, "{what}");
            }
        }
    }
}

#[test]
fn tricky_passwords_are_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    for pw in [
        "s3cr3t-plain-pw",
        "p/a?s#s@w:o%rd",
        "it's \"quoted\" \\ back",
        "sp ace&and=eq+plus",
        "ünï/cødé🔑?密码",
        "50%25off%zz",
    ] {
        never_shown(pw, dir.path());
    }
}

/// Printable characters, URL and quoting specials, and unicode; no `${` (a spec would read it
/// as a variable) and long enough that masking it leaves the output readable.
fn password() -> impl Strategy<Value = String> {
    let special = prop::sample::select(vec![
        '/', '?', '#', '@', ':', '%', '\'', '"', '\\', ' ', '&', '=', '+', '[', ']', 'é', '密',
        '🔑',
    ]);
    let c = prop_oneof![3 => prop::char::range('!', '~'), 2 => special, 1 => prop::char::any()];
    prop::collection::vec(c, 8..20)
        .prop_map(|v| v.into_iter().collect::<String>())
        .prop_filter("printable, no ${", |s: &String| {
            !s.chars().any(char::is_control) && !s.contains("${")
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 6,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]
    #[test]
    fn random_passwords_are_never_shown(pw in password()) {
        let dir = tempfile::tempdir().unwrap();
        never_shown(&pw, dir.path());
    }
}

/// A YAML error quotes the spec's lines: the secrets on them are masked there too.
#[test]
fn yaml_errors_do_not_quote_the_password() {
    let dir = tempfile::tempdir().unwrap();
    for (yaml, secret) in [
        (
            "postgres:\n  url: postgres://u:SeKrEt-yaml: x@127.0.0.1:1/d\n  table: t\n  key: id\n  statement: UPDATE t SET n = 1 WHERE id = ANY($1)\n",
            "SeKrEt-yaml",
        ),
        (
            "clickhouse:\n  url: http://default@127.0.0.1:8123/default\n  password: \"SeKrEt-ch\\q\"\n  source: s\n",
            "SeKrEt-ch",
        ),
        (
            "postgres:\n  url: 'host=h password=SeKrEt-kv dbname=d'\n  table: [t\n",
            "SeKrEt-kv",
        ),
    ] {
        let spec = dir.path().join("job.yaml");
        std::fs::write(&spec, yaml).unwrap();
        for format in ["text", "json"] {
            let (code, out, err) = backfill(format, &[&"validate", &spec]);
            assert_eq!(code, 2, "{yaml}\n{err}");
            assert!(err.contains("job.yaml:"), "{err}");
            assert!(
                !out.contains(secret) && !err.contains(secret),
                "{format}: {yaml}\n{out}\n{err}"
            );
        }
    }
}

/// A URL typed where a spec path belongs (`backfill plan $DATABASE_URL`), or as the value of an
/// option, is masked like a spec's: the file error and the argument parser's own errors
/// echoed it with its password.
#[test]
fn a_url_given_as_an_argument_is_masked() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["plan", "postgres://app:SeKrEt-arg1@db.internal:5432/prod"],
            "SeKrEt-arg1",
        ),
        (
            &["status", "postgres://app@db/prod?password=SeKrEt-arg2"],
            "SeKrEt-arg2",
        ),
        (
            &[
                "run",
                "--metrics-addr",
                "postgres://u:SeKrEt-arg3@h/db",
                "x.yaml",
            ],
            "SeKrEt-arg3",
        ),
        (
            &["run", "--max-runtime=http://u:SeKrEt-arg4@h", "x.yaml"],
            "SeKrEt-arg4",
        ),
        (
            &["verify", "host=db password=SeKrEt-arg5 dbname=prod"],
            "SeKrEt-arg5",
        ),
    ];
    for (args, secret) in cases {
        for format in ["text", "json"] {
            let argv: Vec<&dyn AsRef<std::ffi::OsStr>> = args
                .iter()
                .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
                .collect();
            let (code, out, err) = backfill(format, &argv);
            assert_eq!(code, 2, "{args:?} {format}:\n{out}\n{err}");
            assert!(
                !out.contains(secret) && !err.contains(secret),
                "{args:?} {format}:\n{out}\n{err}"
            );
            assert!(
                err.contains("***"),
                "{args:?} {format}: masked, not dropped:\n{err}"
            );
        }
    }
}
