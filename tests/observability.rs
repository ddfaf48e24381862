//! The dashboard and alert rules shipped in deploy/ against promtool and against the engine:
//! the rules pass `promtool check rules` and their unit tests (`promtool test rules`), every
//! alert has a case that fires and one that stays quiet, the dashboard is well formed, and every
//! metric the dashboard and the rules query is one real runs export (a Postgres job that is
//! throttled, paused and retried, scraped while it runs and pushed at exit, and a ClickHouse job
//! that splits chunks), while every metric src/metrics.rs defines is on the dashboard.
//!
//! promtool comes from the Debian package `prometheus` (`.ci/run` installs it); without it the
//! promtool tests fail and say so.

mod common;
use common::ch::ChDb;
use common::prom::{free_port, receiver, scrape, value};
use common::{TestDb, backfill, count, path_str};
use promql_parser::label::MatchOp;
use promql_parser::parser::{self, Expr};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RULES: &str = "deploy/prometheus/backfill-alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/backfill-alerts.test.yml";
const DASHBOARD: &str = "deploy/grafana/backfill-dashboard.json";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Value {
    serde_saphyr::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// promtool from PATH (Debian puts it in /usr/bin); missing is a failure, never a skip.
fn promtool() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("promtool"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "promtool not found on PATH: install the Debian package `prometheus` \
                 (apt-get install --no-install-recommends prometheus; `bash .ci/run` does it)"
            )
        })
}

fn promtool_ok(args: &[&str]) -> String {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(root().join("deploy/prometheus"))
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {} failed:\n{text}",
        args.join(" ")
    );
    text
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let file = |p: &str| {
        Path::new(p)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    };
    let checked = promtool_ok(&["check", "rules", &file(RULES)]);
    let alerts = alerts();
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{checked}"
    );
    let tested = promtool_ok(&["test", "rules", &file(RULE_TESTS)]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// The rules file's alerts: name -> expression.
fn alerts() -> BTreeMap<String, String> {
    let rules = yaml(RULES);
    let mut out = BTreeMap::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("only alerting rules");
            let expr = rule["expr"].as_str().expect("expr").to_string();
            assert!(out.insert(name.to_string(), expr).is_none(), "{name} twice");
        }
    }
    out
}

/// Jobs (`backfill_job` values) a test group's input series name.
fn jobs_in(group: &Value) -> BTreeSet<String> {
    let mut jobs = BTreeSet::new();
    for s in group["input_series"].as_array().expect("input_series") {
        let series = s["series"].as_str().expect("series");
        let Ok(Expr::VectorSelector(vs)) = parser::parse(series) else {
            panic!("not a series selector: {series}");
        };
        for m in &vs.matchers.matchers {
            if m.name == "backfill_job" {
                jobs.insert(m.value.clone());
            }
        }
    }
    jobs
}

#[test]
fn every_alert_has_a_test_that_fires_it_and_one_where_it_stays_quiet() {
    let tests = yaml(RULE_TESTS);
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for group in tests["tests"].as_array().expect("tests") {
        let jobs = jobs_in(group);
        for case in group["alert_rule_test"].as_array().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_string();
            let expected: BTreeSet<String> = case["exp_alerts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| {
                    a["exp_labels"]["backfill_job"]
                        .as_str()
                        .expect("an expected alert names its backfill_job")
                        .to_string()
                })
                .collect();
            if !expected.is_empty() {
                fires.insert(name.clone());
            }
            // Quiet: some job in the input series is not among the alerts expected.
            if jobs.iter().any(|j| !expected.contains(j)) {
                quiet.insert(name);
            }
        }
    }
    for name in alerts().keys() {
        assert!(fires.contains(name), "no test case fires {name}");
        assert!(
            quiet.contains(name),
            "no test case where {name} stays quiet"
        );
    }
}

/// Grafana's interval variables, replaced by a duration so the expression parses as PromQL.
fn without_grafana_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
}

/// Every vector selector in `expr`, depth first.
fn selectors<'a>(expr: &'a Expr, out: &mut Vec<&'a promql_parser::parser::VectorSelector>) {
    match expr {
        Expr::Aggregate(a) => {
            selectors(&a.expr, out);
            if let Some(p) = &a.param {
                selectors(p, out);
            }
        }
        Expr::Unary(u) => selectors(&u.expr, out),
        Expr::Binary(b) => {
            selectors(&b.lhs, out);
            selectors(&b.rhs, out);
        }
        Expr::Paren(p) => selectors(&p.expr, out),
        Expr::Subquery(s) => selectors(&s.expr, out),
        Expr::VectorSelector(vs) => out.push(vs),
        Expr::MatrixSelector(ms) => out.push(&ms.vs),
        Expr::Call(c) => {
            for a in &c.args.args {
                selectors(a, out);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// The metric name a selector reads: its name, or an exact `__name__` matcher.
fn metric_name(vs: &promql_parser::parser::VectorSelector) -> String {
    vs.name
        .clone()
        .or_else(|| {
            vs.matchers
                .matchers
                .iter()
                .find(|m| m.name == "__name__" && m.op == MatchOp::Equal)
                .map(|m| m.value.clone())
        })
        .unwrap_or_else(|| panic!("a selector without a metric name: {vs}"))
}

fn parse(expr: &str, whence: &str) -> Expr {
    parser::parse(&without_grafana_variables(expr))
        .unwrap_or_else(|e| panic!("{whence}: not PromQL ({e}):\n{expr}"))
}

/// Every `expr` in the dashboard (panels, rows' panels), with the panel's title.
fn dashboard_exprs(dash: &Value) -> Vec<(String, String)> {
    fn walk(v: &Value, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(o) => {
                let title = o.get("title").and_then(Value::as_str).unwrap_or(title);
                if let Some(Value::String(e)) = o.get("expr") {
                    out.push((title.to_string(), e.clone()));
                }
                for child in o.values() {
                    walk(child, title, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|c| walk(c, title, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], "", &mut out);
    out
}

/// The `job` variable's query: `label_values(METRIC, backfill_job)`.
fn job_variable(dash: &Value) -> &Value {
    dash["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .find(|v| v["name"] == "job")
        .expect("a `job` template variable")
}

/// Metric names the dashboard queries (panels and the `job` variable).
fn dashboard_metrics() -> BTreeSet<String> {
    let dash = dashboard();
    let mut names = BTreeSet::new();
    for (title, expr) in dashboard_exprs(&dash) {
        let parsed = parse(&expr, &format!("{DASHBOARD}: panel {title:?}"));
        let mut found = Vec::new();
        selectors(&parsed, &mut found);
        assert!(!found.is_empty(), "panel {title:?} reads no metric: {expr}");
        names.extend(found.into_iter().map(metric_name));
    }
    let query = job_variable(&dash)["query"]["query"]
        .as_str()
        .expect("job variable query");
    let metric = query
        .strip_prefix("label_values(")
        .and_then(|q| q.split_once(','))
        .map(|(m, _)| m.trim().to_string())
        .unwrap_or_else(|| panic!("job variable: {query}"));
    names.insert(metric);
    names
}

/// Metric names the alert rules query.
fn rule_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (alert, expr) in alerts() {
        let mut found = Vec::new();
        let parsed = parse(&expr, &format!("{RULES}: {alert}"));
        selectors(&parsed, &mut found);
        names.extend(found.into_iter().map(metric_name));
    }
    names
}

#[test]
fn dashboard_is_well_formed_and_filters_every_query_by_the_job_variable() {
    let dash = dashboard();
    assert!(dash["uid"].is_string() && dash["title"].is_string());
    let var = job_variable(&dash);
    assert_eq!(var["type"], "query");
    assert_eq!(var["multi"], true);
    assert_eq!(var["includeAll"], true);
    let ds = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data source variable");
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().unwrap());

    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, u64, u64, u64, u64)> = Vec::new();
    for p in panels {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "id twice: {title}"
        );
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24 && w > 0 && h > 0, "{title}: gridPos {g}");
        for (other, ox, oy, ow, oh) in &boxes {
            let apart = x + w <= *ox || ox + ow <= x || y + h <= *oy || oy + oh <= y;
            assert!(apart, "{title} overlaps {other}");
        }
        boxes.push((title.to_string(), x, y, w, h));
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], ds_ref.as_str(), "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        let refs: BTreeSet<_> = targets.iter().map(|t| t["refId"].to_string()).collect();
        assert_eq!(refs.len(), targets.len(), "{title}: refIds not unique");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            let mut found = Vec::new();
            let parsed = parse(expr, title);
            selectors(&parsed, &mut found);
            for vs in found {
                let filtered = vs.matchers.matchers.iter().any(|m| {
                    m.name == "backfill_job" && m.op.to_string() == "=~" && m.value == "$job"
                });
                assert!(
                    filtered,
                    "{title}: {} is not filtered by backfill_job=~\"$job\"",
                    metric_name(vs)
                );
            }
        }
    }
}

/// What a Prometheus text page holds: sample names, and each family's type.
#[derive(Default, Debug)]
struct Exported {
    samples: BTreeSet<String>,
    types: BTreeMap<String, String>,
}

impl Exported {
    fn add(&mut self, page: &str) {
        for line in page.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let mut it = t.split_whitespace();
                if let (Some(n), Some(ty)) = (it.next(), it.next()) {
                    self.types.insert(n.to_string(), ty.to_string());
                }
            } else if line.starts_with("backfill_") {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                self.samples.insert(line[..end].to_string());
            }
        }
    }

    /// The family a sample name belongs to: a histogram's or summary's `_bucket`, `_sum` and
    /// `_count` samples belong to its base name; every other name is its own family (a counter
    /// `x_count` stays `x_count`).
    fn family(&self, name: &str) -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                let composite = matches!(
                    self.types.get(base).map(String::as_str),
                    Some("histogram" | "summary")
                );
                if composite && (suffix != "_bucket" || self.types[base] == "histogram") {
                    return base.to_string();
                }
            }
        }
        name.to_string()
    }

    fn families(&self) -> BTreeSet<String> {
        self.samples.iter().map(|s| self.family(s)).collect()
    }
}

/// The metric names src/metrics.rs defines (`pub const X: &str = "backfill_..."`; not the
/// label names, `pub const X_LABEL`).
fn defined_metrics() -> BTreeSet<String> {
    read("src/metrics.rs")
        .lines()
        .filter(|l| l.starts_with("pub const ") && l.contains(": &str = \"backfill_"))
        .filter(|l| !l.split(':').next().unwrap_or("").ends_with("_LABEL"))
        .map(|l| l.split('"').nth(1).expect("quoted name").to_string())
        .collect()
}

/// Scrape until `done` holds for a page; every page goes into `seen`.
async fn scrape_until(
    port: u16,
    seen: &mut Exported,
    what: &str,
    mut done: impl FnMut(&str) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(page) = scrape(port) {
            seen.add(&page);
            if done(&page) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Postgres job that goes through every state a dashboard shows: throttled from the start,
/// paused with `backfill pause`, retried on a lock timeout, then done. Scraped all along on
/// `--metrics-addr`, and its final numbers pushed at exit.
async fn postgres_run(seen: &mut Exported) {
    let db = TestDb::new("obs").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT generate_series(1, 2000);
         CREATE TABLE control (hold bool NOT NULL);
         INSERT INTO control VALUES (true);",
    )
    .await
    .unwrap();
    let spec = db.spec(
        "observed.yaml",
        "postgres:
  url: $URL
  table: t
  key: id
  lock: none
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1)
batch: {size: 100, target: 200ms, min: 50, max: 400, pause: 20ms}
limits: {lock_timeout: 100ms, max_runtime: 10m}
throttle:
  query: SELECT hold FROM control
  interval: 100ms
",
    );
    let (push_port, pushed) = receiver();
    let port = free_port();
    let mut child = backfill()
        .args(["run", "--metrics-addr", &format!("127.0.0.1:{port}")])
        .args([
            "--pushgateway",
            &format!("http://127.0.0.1:{push_port}/metrics/job/backfill"),
        ])
        .args(["--push-interval", "1h"])
        .arg(&spec)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let job = "observed";
    let positive = |name: &'static str| move |p: &str| value(p, name, job).is_some_and(|v| v > 0.0);
    // Throttled from the start.
    scrape_until(
        port,
        seen,
        "throttled time",
        positive("backfill_throttled_seconds"),
    )
    .await;
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n > 0").await, 0);
    // A row lock that the batch reaching it waits for, until lock_timeout: a retry.
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; SELECT * FROM t WHERE id = 1500 FOR UPDATE")
        .await
        .unwrap();
    // Paused while still throttled; the workers see the pause once the throttle lets go.
    let control = |cmd: &str| {
        let out = backfill().arg(cmd).arg(&spec).output().unwrap();
        assert!(out.status.success(), "backfill {cmd}: {out:?}");
    };
    control("pause");
    c.batch_execute("UPDATE control SET hold = false")
        .await
        .unwrap();
    scrape_until(port, seen, "the pause", positive("backfill_paused")).await;
    control("unpause");
    scrape_until(port, seen, "a retry on the locked row", |p| {
        p.contains("backfill_retries_total{backfill_job=\"observed\",reason=\"lock_timeout\"}")
    })
    .await;
    holder.batch_execute("ROLLBACK").await.unwrap();
    // The deadline gauge is this run's end: within max_runtime from now.
    let page = scrape(port).expect("a page while running");
    let deadline = value(&page, "backfill_deadline_timestamp_seconds", job).expect("deadline");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        deadline > now && deadline <= now + 600.0,
        "{deadline} vs {now}"
    );
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, 2000);
    let pushed = pushed.lock().unwrap().clone();
    let (_, _, last) = pushed.last().expect("the final push");
    assert!(
        last.contains("backfill_job_status{backfill_job=\"observed\",status=\"done\"} 1"),
        "{last}"
    );
    seen.add(last);
    db.drop_db().await;
}

/// A ClickHouse job whose one day does not fit the memory limit: it is split by day, then by
/// project, and fails on the project that fits nowhere. Its final numbers come from the push.
fn clickhouse_run(seen: &mut Exported) {
    let db = ChDb::new("obs");
    db.q(
        "CREATE TABLE ev (ran_at DateTime, project_id UInt32, k UInt64)
          ENGINE = MergeTree PARTITION BY toYYYYMM(ran_at) ORDER BY (project_id, ran_at)",
    );
    db.q("INSERT INTO ev SELECT toDateTime('2025-11-01 01:00:00'), 1, number FROM numbers(300000)");
    db.q("INSERT INTO ev SELECT toDateTime('2025-11-01 02:00:00'), 2, number FROM numbers(10)");
    db.q(
        "CREATE TABLE out (project_id UInt32, ks AggregateFunction(groupUniqArray, UInt64))
          ENGINE = AggregatingMergeTree ORDER BY project_id",
    );
    let spec = db.spec(
        "splits.yaml",
        "name: splits
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
    let (port, pushed) = receiver();
    let out = backfill()
        .args(["run", "--push-interval", "1h", "--pushgateway"])
        .arg(format!("http://127.0.0.1:{port}/metrics/job/backfill"))
        .arg(path_str(&spec))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let pushed = pushed.lock().unwrap().clone();
    let (_, _, last) = pushed.last().expect("the final push");
    assert!(
        last.contains("backfill_chunk_splits_total{backfill_job=\"splits\",level=\"split\"}"),
        "{last}"
    );
    seen.add(last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_queried_is_exported_and_every_metric_is_on_the_dashboard() {
    let mut seen = Exported::default();
    postgres_run(&mut seen).await;
    clickhouse_run(&mut seen);
    let defined = defined_metrics();
    assert!(defined.len() >= 18, "{defined:?}");

    // The runs exported every metric the engine defines (so the check below is not vacuous).
    let families = seen.families();
    let missing: Vec<_> = defined.difference(&families).collect();
    assert!(
        missing.is_empty(),
        "defined but never exported: {missing:?}"
    );
    let undeclared: Vec<_> = families.difference(&defined).collect();
    assert!(
        undeclared.is_empty(),
        "exported but not in src/metrics.rs: {undeclared:?}"
    );

    // Every name the dashboard or the rules query is a sample the engine exports: a histogram
    // is read through its _bucket, _sum and _count samples, never its base name.
    let dash = dashboard_metrics();
    let rules = rule_metrics();
    for (what, names) in [(DASHBOARD, &dash), (RULES, &rules)] {
        let unknown: Vec<_> = names
            .iter()
            .filter(|n| !seen.samples.contains(*n))
            .collect();
        assert!(
            unknown.is_empty(),
            "{what} queries metrics the engine does not export: {unknown:?}\nexported: {:?}",
            seen.samples
        );
    }

    // Conversely, every metric the engine defines is on the dashboard.
    let on_dashboard: BTreeSet<String> = dash.iter().map(|n| seen.family(n)).collect();
    let absent: Vec<_> = defined.difference(&on_dashboard).collect();
    assert!(absent.is_empty(), "not on the dashboard: {absent:?}");
}
