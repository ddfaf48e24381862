//! Property tests for spec parsing: random and mutated YAML specs never panic, and every error
//! is a spec error (exit 2) that starts with `file:line:col:` and names the field, unless the
//! text is not YAML at all (then the parser's own message, still with `file:line:col:`).

use backfill::spec::{Env, load_file};
use proptest::prelude::*;
use std::path::Path;

const PG: &str = r#"name: job-1
postgres:
  url: postgres://app:pw@127.0.0.1:5432/db?sslmode=disable
  table: public.t
  key: id
  where: n = 0 AND created_at < now() - interval '1 day'
  lock: skip_locked
  statement: UPDATE t SET n = 1 WHERE id = ANY($1)
batch:
  size: 1000
  target: 500ms
  min: 100
  max: 100000
  pause: 0ms
limits:
  statement_timeout: 30s
  lock_timeout: 3s
  idle_in_transaction_session_timeout: 60s
  max_runtime: 45m
  max_transaction_age: 10m
throttle:
  max_replication_lag: 10s
  max_active_backends: 50
  query: SELECT false
  interval: 1s
state:
  schema: backfill
"#;

const CH: &str = r#"name: ch-job
clickhouse:
  url: http://default:pw@127.0.0.1:8123/default
  user: default
  password: pw
  source: src
  time_column: ts
  split_column: project_id
  from: 2025-01-01
  to: 2025-03-01
  chunks: [month, day, split]
  target: dst
  settings: { max_memory_usage: 5000000000, flag: true, ratio: 0.5, mode: fast }
  statement: INSERT INTO {target} SELECT * FROM src WHERE {chunk}
batch:
  size: 10
"#;

/// Values that probe types, bounds, YAML syntax and the URL/SQL checks.
const VALUES: &[&str] = &[
    "0",
    "1",
    "-1",
    "1e3",
    "0.5",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "0ms",
    "25d",
    "24d",
    "2147483647ms",
    "2147483648ms",
    "99999999999999999999s",
    "5 minutes",
    "-3s",
    "1h30m",
    "~",
    "null",
    "true",
    "[]",
    "{}",
    "[1, 2]",
    "{a: 1}",
    "'unterminated",
    "\"unterminated",
    "&anchor x",
    "*nope",
    "!!binary aGVsbG8=",
    "|",
    ">-",
    "${UNSET_VAR}",
    "${UNSET_VAR:-5s}",
    "postgres:/u:pw@h/db",
    "'host=h password=pw dbname=d'",
    "postgres://u:p/w@h/db",
    "http://u:1/x@h:8123/db",
    "'n = 0) OR (true'",
    "'true); DROP TABLE victim; --'",
    "x ~ 'y' -- c",
    "2025-13-01",
    "[split, month]",
    "\u{0}",
    "\u{feff}",
    "é密🔑",
];

#[derive(Debug, Clone)]
enum Mutation {
    /// Replace the value of line `n` (after its first `: `) with a value.
    Value(usize, String),
    Delete(usize),
    Duplicate(usize),
    Indent(usize, bool),
    /// Insert text at a byte position (rounded down to a char boundary).
    Insert(usize, String),
    Truncate(usize),
    UnknownKey(usize),
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(VALUES).prop_map(str::to_string),
        1 => "[ -~]{0,30}",
        1 => any::<String>(),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => (any::<u32>(), prop::sample::select(vec!["ms", "s", "m", "h", "d", ""]))
            .prop_map(|(n, u)| format!("{n}{u}")),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let n = 0usize..40;
    prop_oneof![
        6 => (n.clone(), value()).prop_map(|(n, v)| Mutation::Value(n, v)),
        1 => n.clone().prop_map(Mutation::Delete),
        1 => n.clone().prop_map(Mutation::Duplicate),
        1 => (n.clone(), any::<bool>()).prop_map(|(n, more)| Mutation::Indent(n, more)),
        1 => (0usize..1200, "[ -~\n\t]{1,6}").prop_map(|(at, s)| Mutation::Insert(at, s)),
        1 => (0usize..1200).prop_map(Mutation::Truncate),
        1 => n.prop_map(Mutation::UnknownKey),
    ]
}

fn apply(text: &str, m: &Mutation) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        return text.to_string();
    }
    let pick = |n: usize| n % lines.len().max(1);
    match m {
        Mutation::Value(n, v) => {
            let i = pick(*n);
            if let Some((key, _)) = lines[i].split_once(": ") {
                lines[i] = format!("{key}: {v}");
            } else {
                lines[i] = format!("{} {v}", lines[i]);
            }
        }
        Mutation::Delete(n) => {
            let i = pick(*n);
            lines.remove(i);
        }
        Mutation::Duplicate(n) => {
            let i = pick(*n);
            lines.insert(i, lines[i].clone());
        }
        Mutation::Indent(n, more) => {
            let i = pick(*n);
            lines[i] = if *more {
                format!("  {}", lines[i])
            } else {
                lines[i].trim_start_matches(' ').to_string()
            };
        }
        Mutation::UnknownKey(n) => {
            let i = pick(*n);
            let indent = lines[i].len() - lines[i].trim_start().len();
            lines.insert(i, format!("{}bogus_key: 1", " ".repeat(indent)));
        }
        Mutation::Insert(at, s) => {
            let joined = lines.join("\n");
            let mut at = (*at).min(joined.len());
            while !joined.is_char_boundary(at) {
                at -= 1;
            }
            return format!("{}{s}{}", &joined[..at], &joined[at..]);
        }
        Mutation::Truncate(at) => {
            let joined = lines.join("\n");
            let mut at = (*at).min(joined.len());
            while !joined.is_char_boundary(at) {
                at -= 1;
            }
            return joined[..at].to_string();
        }
    }
    lines.join("\n") + "\n"
}

/// Load `text` as a spec file both ways (`validate` tolerates unset variables, `run` does not)
/// and check every outcome.
fn check(dir: &Path, text: &str) -> Result<(), TestCaseError> {
    let path = dir.join("job.yaml");
    std::fs::write(&path, text).unwrap();
    let lookup = |name: &str| (name == "SET_VAR").then(|| "5s".to_string());
    for allow_unset in [true, false] {
        let env = Env {
            lookup: &lookup,
            allow_unset,
        };
        match load_file(&path, &env) {
            Ok(spec) => {
                // What callers do with a valid spec must not panic either.
                let _ = spec.source.redacted_url();
                if let backfill::spec::Source::Postgres(pg) = &spec.source {
                    let _ = pg.where_sql();
                }
                prop_assert!(spec.batch.size >= 1 && spec.batch.size <= spec.batch.max);
                prop_assert!(spec.batch.max <= backfill::spec::MAX_BATCH_SIZE);
                prop_assert!(spec.limits.statement_timeout <= backfill::spec::MAX_PG_TIMEOUT);
                prop_assert!(spec.limits.lock_timeout <= backfill::spec::MAX_PG_TIMEOUT);
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert_eq!(e.exit_code(), 2, "{}\n---\n{}", msg, text);
                let rest = msg.strip_prefix(&format!("{}:", path.display()));
                prop_assert!(rest.is_some(), "no file in: {}\n---\n{}", msg, text);
                let rest = rest.unwrap();
                let lines = text.lines().count().max(1) + 1;
                let located = located(rest);
                match located {
                    Some((line, after)) => {
                        prop_assert!(
                            (1..=lines).contains(&line),
                            "line {} of {}: {}\n---\n{}",
                            line,
                            lines,
                            msg,
                            text
                        );
                        prop_assert!(
                            after.starts_with(" field `") || is_yaml_syntax(after),
                            "no field named: {}\n---\n{}",
                            msg,
                            text
                        );
                    }
                    // Only a spec-wide field (the job name from the file name) has no line.
                    None => prop_assert!(rest.starts_with(" field `"), "{}", msg),
                }
            }
        }
    }
    Ok(())
}

/// `LINE:COL: rest` -> (LINE, rest).
fn located(s: &str) -> Option<(usize, &str)> {
    let (line, rest) = s.split_once(':')?;
    let (col, rest) = rest.split_once(':')?;
    col.parse::<usize>().ok()?;
    Some((line.parse().ok()?, rest))
}

/// Text that is not YAML (or not a mapping of fields) has no field to name: it says so.
fn is_yaml_syntax(after: &str) -> bool {
    after.starts_with(" not valid YAML for a spec: ") || after.starts_with(" the spec is empty")
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1500,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn mutated_specs_fail_cleanly(
        base in prop::sample::select(vec![PG, CH]),
        ms in prop::collection::vec(mutation(), 1..4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut text = base.to_string();
        for m in &ms {
            text = apply(&text, m);
        }
        check(dir.path(), &text)?;
    }

    #[test]
    fn random_text_fails_cleanly(text in any::<String>()) {
        let dir = tempfile::tempdir().unwrap();
        check(dir.path(), &text)?;
    }
}

#[test]
fn the_base_specs_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    for text in [PG, CH] {
        let path = dir.path().join("job.yaml");
        std::fs::write(&path, text).unwrap();
        let env = Env::process();
        if let Err(e) = load_file(&path, &env) {
            panic!("{e}");
        }
    }
}
