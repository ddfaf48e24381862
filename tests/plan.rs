//! `plan` is a dry run: it writes nothing (not even the checkpoint store), counts what is left,
//! and says where a run would resume.

mod common;
use common::store::has_store;
use common::{TestDb, checksum, count, make_table, run};
use std::path::{Path, PathBuf};
use tokio_postgres::Client;

/// The value after `label` on the line of stdout that contains it.
fn line_with<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .find(|l| l.contains(label))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{out}"))
}

/// What the job below could touch: the table, the table it inserts into, the sequence behind
/// `log.id` (`nextval` is not transactional: a rolled-back sample would still advance it),
/// schemas.
async fn snapshot(c: &Client) -> String {
    let seq: String = c
        .query_one(
            "SELECT last_value::text || ' ' || is_called::text FROM log_id_seq",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    format!(
        "t={} log={} seq={seq} schemas={}",
        checksum(c, "t").await,
        checksum(c, "log").await,
        count(c, "SELECT count(*) FROM pg_namespace").await
    )
}

#[tokio::test]
async fn plan_writes_nothing_and_counts_pending_rows() {
    let db = TestDb::new("plan_nowrite").await;
    let c = db.client().await;
    // 2345 rows, of which the `where` leaves 1955 (every 6th row is already done).
    c.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0, done bool NOT NULL DEFAULT false);
         INSERT INTO t (id, done) SELECT i, i % 6 = 0 FROM generate_series(1, 2345) i;
         CREATE TABLE log (id serial PRIMARY KEY, t_id bigint NOT NULL);
         ANALYZE t;",
    )
    .await
    .unwrap();
    let pending = count(&c, "SELECT count(*) FROM t WHERE NOT done").await;
    assert_eq!(pending, 1955);
    // The statement writes two tables and a sequence: all of it must be rolled back.
    let spec = db.spec(
        "job.yaml",
        "postgres:
  url: $URL
  table: t
  key: id
  where: NOT done
  statement: |
    WITH u AS (UPDATE t SET n = n + 1, done = true WHERE id = ANY($1) RETURNING id)
    INSERT INTO log (t_id) SELECT id FROM u
batch: {size: 100, target: 0}
",
    );
    let before = snapshot(&c).await;

    // Default: planner estimate and 3 sample batches (rolled back), but not of a statement
    // that draws from a sequence: no rollback gives its values back.
    let (code, out, err) = run(&[&"plan", &spec]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(line_with(&out, "resume at:").contains("the start"), "{out}");
    assert!(
        line_with(&out, "pending rows:").contains("~"),
        "an estimate is marked: {out}"
    );
    assert!(line_with(&out, "batches:").contains("of 100"), "{out}");
    let sample = line_with(&out, "sample:");
    assert!(
        sample.contains("not run") && sample.contains("pg_catalog.nextval"),
        "{out}"
    );
    assert_eq!(snapshot(&c).await, before, "plan changed the database");
    assert!(!has_store(&c).await, "plan created the checkpoint store");
    // The same without the sequence: sampled, and rolled back.
    let plain = db.spec(
        "plain.yaml",
        "name: plain
postgres:
  url: $URL
  table: t
  key: id
  where: NOT done
  statement: |
    WITH u AS (UPDATE t SET n = n + 1, done = true WHERE id = ANY($1) RETURNING id)
    INSERT INTO log (id, t_id) SELECT -id, id FROM u
batch: {size: 100, target: 0}
",
    );
    let (code, out, err) = run(&[&"plan", &plain]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let sample = line_with(&out, "sample:");
    assert!(
        sample.contains("3 batch(es), 300 keys") && sample.contains("rolled back"),
        "{out}"
    );
    assert_eq!(snapshot(&c).await, before, "plan changed the database");
    // A trigger on a table the statement writes could draw from a sequence too.
    c.batch_execute(
        "CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO log (t_id) VALUES (NEW.id); RETURN NEW; END $$;
         CREATE TRIGGER t_audit AFTER UPDATE ON t FOR EACH ROW EXECUTE FUNCTION audit();",
    )
    .await
    .unwrap();
    let (code, out, err) = run(&[&"plan", &plain]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let sample = line_with(&out, "sample:");
    assert!(
        sample.contains("not run") && sample.contains("t_audit on t"),
        "{out}"
    );
    assert_eq!(snapshot(&c).await, before, "plan changed the database");
    c.batch_execute("DROP TRIGGER t_audit ON t").await.unwrap();
    // A trigger whose function only computes (an `updated_at` stamp) does not stop the
    // sample; one whose WHEN draws, or whose function calls what draws, does.
    c.batch_execute(
        "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN IF TG_OP = 'UPDATE' AND now() IS NOT NULL THEN NEW.n := NEW.n; END IF;
                    PERFORM pg_notify('touched', NEW.id::text);
                    RETURN NEW; END $$;
         CREATE TRIGGER t_touch BEFORE UPDATE ON t FOR EACH ROW
           WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION touch();
         CREATE TRIGGER t_same BEFORE UPDATE ON t FOR EACH ROW
           EXECUTE FUNCTION suppress_redundant_updates_trigger();",
    )
    .await
    .unwrap();
    let (code, out, err) = run(&[&"plan", &plain]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(line_with(&out, "sample:").contains("rolled back"), "{out}");
    assert_eq!(snapshot(&c).await, before, "plan changed the database");
    for (trigger, function, calls) in [
        (
            "CREATE TRIGGER t_when BEFORE UPDATE ON t FOR EACH ROW \
             WHEN (nextval('log_id_seq') > 0) EXECUTE FUNCTION touch()",
            "",
            "pg_catalog.nextval",
        ),
        (
            "CREATE TRIGGER t_when BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION stamp()",
            "CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN NEW.n := NEW.n + 0 * nextval('log_id_seq'); RETURN NEW; END $$;",
            "pg_catalog.nextval",
        ),
        // The function's own search path finds other.draw(), which draws; this session's
        // path would find the harmless public.draw().
        (
            "CREATE TRIGGER t_when BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION pathed()",
            "CREATE SCHEMA other;
             CREATE FUNCTION other.draw() RETURNS bigint LANGUAGE sql
               AS $$ SELECT 0 * nextval('log_id_seq') $$;
             CREATE FUNCTION public.draw() RETURNS bigint LANGUAGE sql STABLE AS 'SELECT 0::bigint';
             CREATE FUNCTION pathed() RETURNS trigger LANGUAGE plpgsql SET search_path = other, public
               AS $$ BEGIN NEW.n := NEW.n + draw(); RETURN NEW; END $$;",
            "other.draw",
        ),
        // A view its body reads that draws; a variable of a domain whose CHECK draws.
        (
            "CREATE TRIGGER t_when BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION via_view()",
            "CREATE VIEW drawv AS SELECT nextval('log_id_seq') AS v;
             CREATE FUNCTION via_view() RETURNS trigger LANGUAGE plpgsql
               AS $$ DECLARE x bigint; BEGIN SELECT v INTO x FROM drawv; RETURN NEW; END $$;",
            "pg_catalog.nextval",
        ),
        (
            "CREATE TRIGGER t_when BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION typed()",
            "CREATE FUNCTION key_draw(a bigint) RETURNS bool LANGUAGE plpgsql
               AS $$ BEGIN PERFORM nextval('log_id_seq'); RETURN true; END $$;
             CREATE DOMAIN drawn_id AS bigint CHECK (key_draw(VALUE));
             CREATE FUNCTION typed() RETURNS trigger LANGUAGE plpgsql
               AS $$ DECLARE x drawn_id; BEGIN x := NEW.id; RETURN NEW; END $$;",
            "public.key_draw",
        ),
    ] {
        c.batch_execute(&format!("{function} {trigger}"))
            .await
            .unwrap();
        let before = snapshot(&c).await;
        let (code, out, err) = run(&[&"plan", &plain]);
        assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
        let sample = line_with(&out, "sample:");
        assert!(
            sample.contains("not run") && sample.contains("t_when on t") && sample.contains(calls),
            "{trigger}: {out}"
        );
        assert_eq!(
            snapshot(&c).await,
            before,
            "{trigger}: plan changed the database"
        );
        c.batch_execute("DROP TRIGGER t_when ON t").await.unwrap();
    }
    c.batch_execute(
        "DROP TRIGGER t_touch ON t; DROP TRIGGER t_same ON t; DROP SCHEMA other CASCADE",
    )
    .await
    .unwrap();

    // --exact counts, and the batch count follows from it.
    let (code, out, err) = run(&[&"plan", &"--exact", &spec]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        line_with(&out, "pending rows:").contains(&format!("{pending} (counted)")),
        "{out}"
    );
    let batches = (pending + 99) / 100;
    assert!(
        line_with(&out, "batches:").contains(&format!("batches:      {batches} of 100")),
        "want {batches} batches in:\n{out}"
    );
    assert_eq!(
        snapshot(&c).await,
        before,
        "plan --exact changed the database"
    );
    assert!(!has_store(&c).await);

    // --samples 0 skips the sample batches.
    let (code, out, _) = run(&[&"plan", &"--exact", &"--samples", &"0", &spec]);
    assert_eq!(code, 0);
    assert!(!out.contains("sample:"), "{out}");
    assert_eq!(snapshot(&c).await, before);

    // After a real run, nothing is pending and plan still writes nothing.
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM log").await, pending);
    let after_run = snapshot(&c).await;
    let store_before = checksum(&c, "backfill.jobs").await;
    let (code, out, err) = run(&[&"plan", &"--exact", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    // A finished job: plan says run would skip it, and estimates nothing.
    assert!(
        line_with(&out, "status:").contains("run would skip this job"),
        "{out}"
    );
    assert!(!out.contains("pending rows:"), "{out}");
    assert!(
        line_with(&out, "resume at:").contains("status done"),
        "{out}"
    );
    assert_eq!(snapshot(&c).await, after_run);
    assert_eq!(
        checksum(&c, "backfill.jobs").await,
        store_before,
        "plan changed the checkpoint"
    );
    drop(c);
    db.drop_db().await;
}

#[tokio::test]
async fn plan_says_where_a_failed_run_resumes() {
    let db = TestDb::new("plan_resume").await;
    let c = db.client().await;
    // The statement divides by zero at id 6001 while ctl.fail is set: the run fails there with
    // its checkpoint after 6000; clearing ctl.fail lets the same spec go on.
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT i FROM generate_series(1, 10000) i;
         CREATE TABLE ctl (fail bool NOT NULL);
         INSERT INTO ctl VALUES (true);
         ANALYZE t;",
    )
    .await
    .unwrap();
    let spec = db.spec(
        "job.yaml",
        "postgres:
  url: $URL
  table: t
  key: id
  statement: >-
    UPDATE t SET n = n + 1 / (CASE WHEN id = 6001 AND (SELECT fail FROM ctl) THEN 0 ELSE 1 END)
     WHERE id = ANY($1)
batch: {size: 500, target: 0}
",
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("division by zero"), "{err}");
    let cursor: Option<String> = c
        .query_one(
            &format!(
                "SELECT cursor FROM {} WHERE job = 'job'",
                common::store::JOB_VIEW
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(cursor.as_deref(), Some("6000"));
    c.batch_execute("UPDATE ctl SET fail = false")
        .await
        .unwrap();

    let before = checksum(&c, "t").await;
    let store_before = checksum(&c, "backfill.jobs").await;
    for args in [vec!["plan"], vec!["plan", "--exact"]] {
        let mut argv: Vec<&dyn AsRef<std::ffi::OsStr>> = args
            .iter()
            .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
            .collect();
        argv.push(&spec);
        let (code, out, err) = run(&argv);
        assert_eq!(code, 0, "{args:?}\nstdout:\n{out}\nstderr:\n{err}");
        let resume = line_with(&out, "resume at:");
        assert!(resume.contains("after key 6000"), "{args:?}: {out}");
        assert!(resume.contains("status failed"), "{args:?}: {out}");
        assert!(
            resume.contains("6000 keys and 12 batches done"),
            "{args:?}: {out}"
        );
        assert_eq!(checksum(&c, "t").await, before, "{args:?} changed rows");
        assert_eq!(
            checksum(&c, "backfill.jobs").await,
            store_before,
            "{args:?} changed the checkpoint"
        );
    }
    let (_, out, _) = run(&[&"plan", &"--exact", &spec]);
    assert!(
        line_with(&out, "pending rows:").contains("4000 (counted)"),
        "{out}"
    );
    assert!(
        line_with(&out, "batches:").contains("batches:      8 of 500"),
        "{out}"
    );

    // The run resumes where plan said, and every row ends up updated once.
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n = 1").await,
        10_000
    );
    drop(c);
    db.drop_db().await;
}

#[tokio::test]
async fn plan_after_a_run_stopped_by_max_runtime() {
    let db = TestDb::new("plan_stopped").await;
    let c = db.client().await;
    make_table(&c, 3000).await;
    // 300 batches with a 100ms pause each: far longer than the 2s allowed.
    let spec = db.spec(
        "job.yaml",
        "postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1)
batch: {size: 10, target: 0, pause: 100ms}
",
    );
    // Each run stops at its deadline and the next resumes; a few runs (bounded) make sure some
    // batches were committed even on a slow machine.
    let mut cursor = None;
    let mut row = None;
    for _ in 0..5 {
        let (code, out, err) = run(&[&"run", &"--max-runtime", &"2s", &spec]);
        assert_eq!(code, 75, "stdout:\n{out}\nstderr:\n{err}");
        assert!(out.contains("max runtime"), "{out}");
        let r = c
            .query_one(
                &format!(
                    "SELECT status, cursor, keys_done FROM {} WHERE job = 'job'",
                    common::store::JOB_VIEW
                ),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(r.get::<_, &str>(0), "stopped");
        cursor = r.get::<_, Option<String>>(1);
        row = Some(r);
        if cursor.is_some() {
            break;
        }
    }
    let (Some(cursor), Some(row)) = (cursor, row) else {
        panic!("five runs of 2s committed no batch");
    };
    let done: i64 = row.get(2);
    let cursor_id: i64 = cursor.parse().expect("numeric cursor");
    assert_eq!(done, cursor_id, "keys_done matches the cursor");
    assert_eq!(
        count(
            &c,
            &format!("SELECT count(*) FROM t WHERE id <= {cursor_id} AND n = 1")
        )
        .await,
        done
    );
    assert_eq!(
        count(
            &c,
            &format!("SELECT count(*) FROM t WHERE id > {cursor_id} AND n <> 0")
        )
        .await,
        0
    );

    let before = checksum(&c, "t").await;
    let (code, out, err) = run(&[&"plan", &"--exact", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        line_with(&out, "resume at:").contains(&format!("after key {cursor} (status stopped")),
        "{out}"
    );
    let left = 3000 - cursor_id;
    assert!(
        line_with(&out, "pending rows:").contains(&format!("{left} (counted)")),
        "{out}"
    );
    assert!(
        line_with(&out, "batches:").contains(&format!("batches:      {} of 10", (left + 9) / 10)),
        "{out}"
    );
    assert_eq!(checksum(&c, "t").await, before);
    drop(c);
    db.drop_db().await;
}

// ------------------------------------------------------------------------------------------------
// The plan warns: statements that do not converge, and the WAL a job will write
// ------------------------------------------------------------------------------------------------

/// `plan --json` of one spec: its one job's document.
fn plan_json(spec: &std::path::Path) -> serde_json::Value {
    let (code, out, err) = run(&[&"plan", &"--json", &spec]);
    assert_eq!(code, 0, "plan --json:\n{out}\n{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("plan --json is JSON");
    doc["jobs"][0].clone()
}

#[tokio::test]
async fn plan_flags_statements_that_would_apply_twice_and_not_those_that_converge() {
    let db = TestDb::new("plan_idem").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0, v int NOT NULL);
         INSERT INTO t (id, v) SELECT i, i * 7 FROM generate_series(1, 2000) i;
         CREATE TABLE log (t_id bigint, v int);
         CREATE TABLE queue (t_id bigint PRIMARY KEY, v int);
         ANALYZE t;",
    )
    .await
    .unwrap();
    let snapshot = async |c: &Client| {
        format!(
            "{} {} {}",
            checksum(c, "t").await,
            checksum(c, "log").await,
            checksum(c, "queue").await
        )
    };
    let before = snapshot(&c).await;
    // (statement, converges, what the reason must say)
    let cases: [(&str, bool, &str); 7] = [
        (
            "INSERT INTO log SELECT id, v FROM t WHERE id = ANY($1)",
            false,
            "writes different rows into log (e.g. an INSERT without ON CONFLICT)",
        ),
        (
            "UPDATE t SET n = n + 1 WHERE id = ANY($1)",
            false,
            "changes the rows of t again (e.g. `n = n + 1`)",
        ),
        // A unique key turns the second application into an error: not idempotent either (a
        // retried batch would fail the job), and the plan must still finish.
        (
            "INSERT INTO queue SELECT id, v FROM t WHERE id = ANY($1)",
            false,
            "duplicate key",
        ),
        (
            "UPDATE t SET n = v + 1 WHERE id = ANY($1)",
            true,
            "leaves the same rows",
        ),
        (
            "INSERT INTO queue SELECT id, v FROM t WHERE id = ANY($1) ON CONFLICT DO NOTHING",
            true,
            "leaves the same rows",
        ),
        (
            "INSERT INTO queue SELECT id, v FROM t WHERE id = ANY($1)
              ON CONFLICT (t_id) DO UPDATE SET v = EXCLUDED.v",
            true,
            "leaves the same rows",
        ),
        (
            "DELETE FROM log WHERE t_id = ANY($1)",
            true,
            "leaves the same rows",
        ),
    ];
    for (i, (statement, converges, reason)) in cases.iter().enumerate() {
        let spec = db.spec(
            &format!("case{i}.yaml"),
            &format!(
                "name: case{i}
postgres:
  url: $URL
  table: t
  key: id
  statement: |
    {}
batch: {{size: 100, target: 0}}
",
                statement.replace('\n', "\n    ")
            ),
        );
        let (code, out, err) = run(&[&"plan", &spec]);
        assert_eq!(code, 0, "{statement}\nstdout:\n{out}\nstderr:\n{err}");
        if *converges {
            let line = line_with(&out, "idempotent:");
            assert!(
                line.contains("yes") && line.contains(reason),
                "{statement}: {out}"
            );
            assert!(!out.contains("NOT idempotent"), "{statement}: {out}");
        } else {
            let line = line_with(&out, "NOT idempotent");
            assert!(line.contains("WARNING"), "{statement}: {out}");
            assert!(
                line.contains(reason),
                "{statement}: want {reason:?} in {out}"
            );
            assert!(
                line.contains("a batch retried after a lost COMMIT reply"),
                "the reason says why it matters: {out}"
            );
        }
        let doc = plan_json(&spec);
        assert_eq!(
            doc["idempotency"]["converges"],
            serde_json::json!(*converges),
            "{statement}: {doc}"
        );
        let why = doc["idempotency"]["reason"].as_str().unwrap_or_default();
        assert!(why.contains(reason), "{statement}: {doc}");
        // The samples and the second application were rolled back.
        assert_eq!(
            snapshot(&c).await,
            before,
            "{statement}: plan changed the data"
        );
    }
    drop(c);
    db.drop_db().await;
}

/// A statement whose plan reads the whole table for every batch (`= ANY($1)` over a large share
/// of the table makes Postgres choose a sequential scan) is named by `plan`, with the fix; the
/// same statement bounded by the batch's key range is not.
#[tokio::test]
async fn plan_names_a_statement_that_reads_the_whole_table_per_batch() {
    let db = TestDb::new("plan_seqscan").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0, pad text);
         INSERT INTO t (id, pad) SELECT i, repeat('x', 50) FROM generate_series(1, 40000) i;
         ANALYZE t;",
    )
    .await
    .unwrap();
    let spec_with = |name: &str, cond: &str| {
        db.spec(
            name,
            &format!(
                "postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET n = 1 WHERE {cond}
batch:
  size: 10000
  target: 0ms
"
            ),
        )
    };
    let notes = |doc: &serde_json::Value| -> Vec<String> {
        doc["notes"]
            .as_array()
            .expect("notes")
            .iter()
            .filter_map(|n| n.as_str().map(str::to_string))
            .filter(|n| n.contains("sequential scan"))
            .collect()
    };
    let plain = plan_json(&spec_with("plain.yaml", "id = ANY($1)"));
    let flagged = notes(&plain);
    assert_eq!(flagged.len(), 1, "{plain}");
    assert!(
        flagged[0].contains("read 40000 rows of t")
            && flagged[0].contains("id BETWEEN $2 AND $3 AND coalesce(id = ANY($1), false)"),
        "{}",
        flagged[0]
    );
    let ranged = plan_json(&spec_with(
        "ranged.yaml",
        "id BETWEEN $2 AND $3 AND coalesce(id = ANY($1), false)",
    ));
    assert!(notes(&ranged).is_empty(), "{ranged}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n <> 0").await, 0);
    db.drop_db().await;
}

/// A job on table `t` of `db` with this `where`, statement and verify, batches of 100.
fn t_spec(db: &TestDb, name: &str, where_: &str, statement: &str, verify: &str) -> PathBuf {
    db.spec(
        &format!("{name}.yaml"),
        &format!(
            "name: {name}
postgres:
  url: $URL
  table: t
  key: id
  where: {where_}
  statement: {statement}
  verify: {verify}
batch: {{size: 100, target: 0}}
"
        ),
    )
}

/// `backfill ARGS SPEC`.
fn run_on(args: &[&str], spec: &Path) -> (i32, String, String) {
    let mut argv: Vec<&dyn AsRef<std::ffi::OsStr>> = args
        .iter()
        .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
        .collect();
    argv.push(&spec);
    run(&argv)
}

/// Functions that write where neither a rollback nor a read-only transaction reaches: a
/// sequence drawn (`nextval`, also inside a plpgsql function or through a serial column it
/// inserts into), `dblink_exec` (a connection of its own), built-ins that run SQL given as
/// text (`query_to_xml`) or rewrite an index even read-only (`brin_summarize_new_values`):
/// every volatile built-in counts but those known to be harmless. `plan` evaluates no `where` or
/// statement that calls one, and `verify` refuses one; a STABLE function still works.
#[tokio::test]
async fn plan_and_verify_call_nothing_that_writes_past_their_transaction() {
    let db = TestDb::new("plan_effects").await;
    let c = db.client().await;
    let conn = format!("'{}'", db.url.replace('\'', "''"));
    c.batch_execute(&format!(
        "CREATE EXTENSION IF NOT EXISTS dblink;
         CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0, done bool NOT NULL DEFAULT false);
         INSERT INTO t (id) SELECT i FROM generate_series(1, 3000) i;
         CREATE TABLE audit (id bigserial PRIMARY KEY, note text);
         CREATE SEQUENCE s;
         CREATE FUNCTION side(x bigint) RETURNS bigint LANGUAGE plpgsql AS $$
           BEGIN PERFORM nextval('s'); RETURN x; END $$;
         CREATE FUNCTION side_ins(x bigint) RETURNS bool LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO audit (note) VALUES ('side_ins ' || x); RETURN true; END $$;
         CREATE FUNCTION side_dblink() RETURNS bool LANGUAGE sql AS $$
           SELECT dblink_exec({conn}, 'INSERT INTO audit (note) VALUES (''dblink'')') IS NOT NULL $$;
         CREATE FUNCTION still_open(x bigint) RETURNS bool LANGUAGE sql STABLE AS $$
           SELECT NOT done FROM t WHERE id = x $$;
         -- Reached without a call in the text: an operator, an aggregate's step, a domain's
         -- CHECK, a written table's CHECK.
         CREATE FUNCTION side_op(a bigint, b int) RETURNS bool LANGUAGE plpgsql AS $$
           BEGIN PERFORM nextval('s'); RETURN a > b; END $$;
         CREATE OPERATOR @@ (LEFTARG = bigint, RIGHTARG = int, FUNCTION = side_op);
         CREATE FUNCTION side_step(st bigint, v bigint) RETURNS bigint LANGUAGE plpgsql AS $$
           BEGIN PERFORM nextval('s'); RETURN st + v; END $$;
         CREATE AGGREGATE side_sum(bigint) (SFUNC = side_step, STYPE = bigint, INITCOND = '0');
         CREATE FUNCTION side_dom(x bigint) RETURNS bool LANGUAGE plpgsql AS $$
           BEGIN PERFORM nextval('s'); RETURN x > 0; END $$;
         CREATE DOMAIN pos AS bigint CHECK (side_dom(VALUE));
         CREATE FUNCTION side_chk(x bigint) RETURNS bool LANGUAGE plpgsql AS $$
           BEGIN PERFORM nextval('s'); RETURN x > 0; END $$;
         CREATE TABLE checked (id bigint PRIMARY KEY, v bigint CHECK (side_chk(v)));
         CREATE TABLE dommed (id bigint PRIMARY KEY, v pos);
         CREATE TABLE upserted (id bigint PRIMARY KEY, v bigint);
         CREATE INDEX audit_brin ON audit USING brin (id);
         ANALYZE t;",
    ))
    .await
    .unwrap();
    let snapshot = async |c: &Client| {
        count(
            c,
            "SELECT (SELECT last_value FROM s) * 1000000 + (SELECT last_value FROM audit_id_seq) * 1000
                    + (SELECT count(*) FROM audit) + (SELECT sum(n) FROM t)",
        )
        .await
    };
    let before = snapshot(&c).await;
    let spec = |name: &str, where_: &str, statement: &str, verify: &str| {
        t_spec(&db, name, where_, statement, verify)
    };
    let plain = "UPDATE t SET n = n + 1 WHERE id = ANY($1)";
    let open = "SELECT count(*) FROM t WHERE NOT done";
    // `plan` of `statement`: its sample batches are not run, the reason names `called`, and
    // nothing moved.
    let refused = async |name: &str, statement: &str, called: &str| {
        let (code, out, err) = run(&[&"plan", &spec(name, "NOT done", statement, open)]);
        assert_eq!(code, 0, "{name}:\n{out}\n{err}");
        let sample = line_with(&out, "sample:");
        assert!(
            sample.contains("not run") && sample.contains(called),
            "{name}:\n{out}"
        );
        assert_eq!(snapshot(&c).await, before, "{name} wrote:\n{out}");
    };
    // `where`: no sample batch and no exact count evaluates it.
    for (name, where_, called) in [
        (
            "w_nextval",
            "nextval('s') > 0 AND NOT done",
            "pg_catalog.nextval",
        ),
        ("w_ins", "side_ins(id) AND NOT done", "public.side_ins"),
        (
            "w_dblink",
            "side_dblink() AND NOT done",
            "public.dblink_exec",
        ),
        ("w_operator", "id @@ 0 AND NOT done", "public.side_op"),
        ("w_domain", "id::pos > 0 AND NOT done", "public.side_dom"),
        // A built-in that runs SQL given as text, which no plan shows.
        (
            "w_query_to_xml",
            "query_to_xml('SELECT nextval(''s'')', true, false, '') IS NOT NULL AND NOT done",
            "pg_catalog.query_to_xml",
        ),
    ] {
        for args in [vec!["plan"], vec!["plan", "--exact"]] {
            let (code, out, err) = run_on(&args, &spec(name, where_, plain, open));
            assert_eq!(code, 0, "{name} {args:?}:\n{out}\n{err}");
            assert!(
                line_with(&out, "where calls ").contains(called) && !out.contains("rolled back"),
                "{name} {args:?}:\n{out}"
            );
            assert_eq!(snapshot(&c).await, before, "{name} {args:?} wrote:\n{out}");
        }
    }
    // The statement: no sample batch runs it.
    for (name, statement, called) in [
        (
            "st_side",
            "UPDATE t SET n = side(id) - id + n + 1 WHERE id = ANY($1)",
            "public.side",
        ),
        (
            "st_dblink",
            "UPDATE t SET n = n + 1 WHERE id = ANY($1) AND side_dblink()",
            "public.dblink_exec",
        ),
        (
            "st_query_to_xml",
            "UPDATE t SET n = n + 1 WHERE id = ANY($1) AND query_to_xml('SELECT nextval(''s'')', true, false, '') IS NOT NULL",
            "pg_catalog.query_to_xml",
        ),
        (
            "st_check",
            "INSERT INTO checked SELECT id, id FROM t WHERE id = ANY($1)",
            "public.side_chk",
        ),
        (
            "st_domain_column",
            "INSERT INTO dommed SELECT id, id FROM t WHERE id = ANY($1)",
            "public.side_dom",
        ),
        (
            "st_on_conflict",
            "INSERT INTO upserted SELECT id, 1 FROM t WHERE id = ANY($1) ON CONFLICT (id) DO UPDATE SET v = side(excluded.v)",
            "public.side",
        ),
    ] {
        refused(name, statement, called).await;
    }
    // An assignment cast through a volatile function: no plan prints it.
    c.batch_execute(
        "CREATE TYPE mood AS ENUM ('calm');
         CREATE FUNCTION side_cast(m mood) RETURNS bigint LANGUAGE plpgsql AS $$
           BEGIN PERFORM nextval('s'); RETURN 1; END $$;
         CREATE CAST (mood AS bigint) WITH FUNCTION side_cast(mood) AS ASSIGNMENT;
         CREATE TABLE moody (id bigint PRIMARY KEY, m mood NOT NULL DEFAULT 'calm', v bigint);
         INSERT INTO moody (id) SELECT i FROM generate_series(1, 3000) i;",
    )
    .await
    .unwrap();
    let cast = "UPDATE moody SET v = moody.m FROM t WHERE moody.id = t.id AND t.id = ANY($1)";
    refused("st_cast", cast, "public.side_cast").await;
    c.batch_execute("DROP CAST (mood AS bigint)").await.unwrap();
    // MERGE: EXPLAIN does not print its actions, nor the serial default an insert would use.
    c.batch_execute("CREATE TABLE q (id serial PRIMARY KEY, src bigint UNIQUE, v int)")
        .await
        .unwrap();
    let q_seq =
        async |c: &Client| count(c, "SELECT last_value + is_called::int FROM q_id_seq").await;
    let q_before = q_seq(&c).await;
    let merge = "MERGE INTO q USING (SELECT id FROM t WHERE id = ANY($1)) s ON q.src = s.id \
                 WHEN NOT MATCHED THEN INSERT (src, v) VALUES (s.id, 1)";
    let (code, out, err) = run(&[&"plan", &spec("st_merge", "NOT done", merge, open)]);
    assert_eq!(code, 0, "{out}\n{err}");
    let sample = line_with(&out, "sample:");
    assert!(
        sample.contains("not run") && sample.contains("q.id"),
        "{out}"
    );
    assert_eq!(q_seq(&c).await, q_before, "plan drew from q_id_seq:\n{out}");
    // verify: refused, before it runs.
    for (name, verify, called) in [
        (
            "v_dblink",
            "SELECT count(*) - count(*) FROM (SELECT side_dblink() AS z OFFSET 0) x",
            "public.dblink_exec",
        ),
        (
            "v_side",
            "SELECT count(*) - count(*) FROM (SELECT side(1) AS z OFFSET 0) x",
            "public.side",
        ),
        (
            "v_aggregate",
            "SELECT side_sum(id) - side_sum(id) FROM t",
            "public.side_step",
        ),
        (
            "v_limit",
            "SELECT count(*) - count(*) FROM (SELECT 1 FROM t LIMIT side(5)) x",
            "public.side",
        ),
        // Built-ins that write what a read-only transaction does not stop: SQL given as text
        // (another backend ended, here), and a BRIN index's summaries.
        (
            "v_query_to_xml",
            "SELECT count(*) - count(*) FROM (SELECT query_to_xml('SELECT pg_terminate_backend(0)', true, false, '') AS z OFFSET 0) x",
            "pg_catalog.query_to_xml",
        ),
        (
            "v_brin",
            "SELECT brin_summarize_new_values('audit_brin') * 0",
            "pg_catalog.brin_summarize_new_values",
        ),
    ] {
        let (code, out, err) = run(&[&"verify", &spec(name, "NOT done", plain, verify)]);
        assert_eq!(code, 1, "{name}:\n{out}\n{err}");
        assert!(
            line_with(&err, "postgres.verify calls ").contains(called),
            "{name}:\n{err}"
        );
        assert_eq!(snapshot(&c).await, before, "{name} wrote:\n{err}");
    }
    // A STABLE function is read-only: sampled, counted and verified as before.
    let stable = spec(
        "stable",
        "still_open(id)",
        plain,
        "SELECT count(*) FROM t WHERE still_open(id)",
    );
    let (code, out, err) = run(&[&"plan", &"--exact", &stable]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(line_with(&out, "sample:").contains("rolled back"), "{out}");
    let (code, out, err) = run(&[&"verify", &stable]);
    assert_eq!(code, 1, "3000 rows are open: {out}\n{err}");
    assert!(out.contains("verify returned 3000"), "{out}\n{err}");
    // Names mean what the parser makes of them: pgcrypto's volatile public.gen_random_uuid()
    // is hidden by the gen_random_uuid() of pg_catalog, first on the search path, and does not
    // stop a sample or a verify. Nor do the random draws of uuid-ossp and pgcrypto, in C.
    c.batch_execute(
        "CREATE EXTENSION IF NOT EXISTS pgcrypto; CREATE EXTENSION IF NOT EXISTS \"uuid-ossp\"",
    )
    .await
    .unwrap();
    let uuid = spec(
        "uuid",
        "NOT done",
        "UPDATE t SET n = n + 1 WHERE id = ANY($1) AND gen_random_uuid() IS NOT NULL \
         AND uuid_generate_v4() IS NOT NULL AND length(gen_random_bytes(4)) = 4",
        "SELECT count(*) FROM t WHERE done = false AND uuid_generate_v1mc() IS NOT NULL",
    );
    let (code, out, err) = run(&[&"plan", &uuid]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(line_with(&out, "sample:").contains("rolled back"), "{out}");
    let (code, out, err) = run(&[&"verify", &uuid]);
    assert_eq!(code, 1, "3000 rows are open: {out}\n{err}");
    assert!(out.contains("verify returned 3000"), "{out}\n{err}");
    assert_eq!(snapshot(&c).await, before);
    // A row security policy's WITH CHECK runs on every row written, and no plan prints it.
    c.batch_execute(
        "CREATE FUNCTION pol_ok(x bigint) RETURNS bool LANGUAGE plpgsql AS $$
           BEGIN PERFORM nextval('s'); RETURN true; END $$;
         CREATE TABLE guarded (t_id bigint);
         ALTER TABLE guarded ENABLE ROW LEVEL SECURITY;
         CREATE POLICY p_ins ON guarded FOR INSERT WITH CHECK (pol_ok(t_id));",
    )
    .await
    .unwrap();
    let guarded = spec(
        "guarded",
        "NOT done",
        "INSERT INTO guarded SELECT id FROM t WHERE id = ANY($1)",
        open,
    );
    let (code, out, err) = run(&[&"plan", &guarded]);
    assert_eq!(code, 0, "{out}\n{err}");
    let sample = line_with(&out, "sample:");
    assert!(
        sample.contains("not run") && sample.contains("public.pol_ok"),
        "{out}"
    );
    // What a write runs that its plan does not print: the CHECK of a domain inside a composite
    // column's type (a field assigned), an assignment cast through a function that draws
    // (an int result into an enum column).
    c.batch_execute(
        "CREATE FUNCTION zip_ok(z text) RETURNS bool LANGUAGE plpgsql AS $$
           BEGIN PERFORM nextval('s'); RETURN true; END $$;
         CREATE DOMAIN zipcode AS text CHECK (zip_ok(VALUE));
         CREATE TYPE address AS (street text, zip zipcode);
         CREATE TABLE addressed (id bigint, addr address);
         CREATE TYPE feel AS ENUM ('low', 'high');
         CREATE FUNCTION int_to_mood(i int) RETURNS feel LANGUAGE plpgsql AS $$
           BEGIN PERFORM nextval('s'); RETURN 'low'; END $$;
         CREATE CAST (int AS feel) WITH FUNCTION int_to_mood(int) AS ASSIGNMENT;
         CREATE TABLE moods (id bigint, m feel);",
    )
    .await
    .unwrap();
    for (name, statement, called) in [
        (
            "composite",
            "INSERT INTO addressed (id, addr.zip) SELECT id, '10001' FROM t WHERE id = ANY($1)",
            "public.zip_ok",
        ),
        (
            "assigned",
            "INSERT INTO moods (id, m) SELECT id, length('ab') FROM t WHERE id = ANY($1)",
            "public.int_to_mood",
        ),
    ] {
        refused(name, statement, called).await;
    }
    // A key of a domain whose CHECK draws: binding a key value runs it.
    c.batch_execute(
        "CREATE FUNCTION key_ok(a bigint) RETURNS bool LANGUAGE plpgsql AS $$
           BEGIN PERFORM nextval('s'); RETURN true; END $$;
         CREATE DOMAIN kid AS bigint CHECK (key_ok(VALUE));
         CREATE TABLE t3 (id kid PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t3 (id) SELECT i FROM generate_series(1, 500) i;
         ANALYZE t3;",
    )
    .await
    .unwrap();
    let s_value = "SELECT last_value * 10 + is_called::int FROM s";
    let drawn = count(&c, s_value).await;
    let keyed = db.spec(
        "keyed.yaml",
        "name: keyed
postgres:
  url: $URL
  table: t3
  key: id
  statement: UPDATE t3 SET n = n + 1 WHERE id = ANY($1::kid[])
batch: {size: 100, target: 0}
",
    );
    for args in [vec!["plan"], vec!["plan", "--exact"]] {
        let (code, out, err) = run_on(&args, &keyed);
        assert_eq!(code, 0, "{args:?}: {out}\n{err}");
        assert!(
            line_with(&out, "the key's type kid runs").contains("public.key_ok")
                && !out.contains("rolled back"),
            "{args:?}: {out}"
        );
        assert_eq!(
            count(&c, s_value).await,
            drawn,
            "{args:?} drew from s:\n{out}"
        );
    }
    db.drop_db().await;
}

/// What a write or a sort runs with no name or symbol in any text: the expressions and
/// predicates of the written table's indexes and its generated columns (an IMMUTABLE-declared
/// plpgsql function may still draw a sequence), and the support functions of an operator
/// class made in the database (a key type's btree comparison, run by every keyset step and
/// every ORDER BY). `plan` runs no sample over them and `verify` refuses them; an index over a
/// function that draws nothing is sampled as before.
#[tokio::test]
async fn plan_and_verify_see_what_indexes_and_sorts_run() {
    let db = TestDb::new("plan_index_fns").await;
    let c = db.client().await;
    let conn = format!("'{}'", db.url.replace('\'', "''"));
    c.batch_execute(
        "CREATE EXTENSION IF NOT EXISTS dblink;
         CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0, done bool NOT NULL DEFAULT false);
         INSERT INTO t (id) SELECT i FROM generate_series(1, 3000) i;
         CREATE TABLE audit (id bigserial PRIMARY KEY, note text);
         CREATE SEQUENCE s;
         CREATE FUNCTION draw_imm(x bigint) RETURNS bigint LANGUAGE plpgsql IMMUTABLE AS $$
           BEGIN PERFORM nextval('s'); RETURN x; END $$;
         CREATE FUNCTION draw_ok(x bigint) RETURNS bool LANGUAGE plpgsql IMMUTABLE AS $$
           BEGIN PERFORM nextval('s'); RETURN x > 0; END $$;
         CREATE FUNCTION plain_imm(x bigint) RETURNS bigint LANGUAGE plpgsql IMMUTABLE AS $$
           BEGIN RETURN x * 2; END $$;
         CREATE TABLE indexed (id bigint, v bigint);
         CREATE INDEX ON indexed (draw_imm(v));
         CREATE TABLE partial (id bigint, v bigint);
         CREATE INDEX ON partial (id) WHERE draw_ok(v);
         CREATE TABLE generated (id bigint, v bigint,
                                 g bigint GENERATED ALWAYS AS (draw_imm(v)) STORED);
         CREATE TABLE harmless (id bigint, v bigint);
         CREATE INDEX ON harmless (plain_imm(v));
         ANALYZE t;",
    )
    .await
    .unwrap();
    let snapshot = async |c: &Client| {
        count(
            c,
            "SELECT (SELECT last_value FROM s) * 1000000 + (SELECT count(*) FROM audit) * 1000
                    + (SELECT sum(n) FROM t)",
        )
        .await
    };
    let before = snapshot(&c).await;
    let open = "SELECT count(*) FROM t WHERE NOT done";
    for (name, statement, called) in [
        (
            "index_expression",
            "INSERT INTO indexed SELECT id, id FROM t WHERE id = ANY($1)",
            "pg_catalog.nextval",
        ),
        (
            "index_predicate",
            "INSERT INTO partial SELECT id, id FROM t WHERE id = ANY($1)",
            "pg_catalog.nextval",
        ),
        (
            "generated_column",
            "INSERT INTO generated (id, v) SELECT id, id FROM t WHERE id = ANY($1)",
            "pg_catalog.nextval",
        ),
    ] {
        let spec = t_spec(&db, name, "NOT done", statement, open);
        let (code, out, err) = run_on(&["plan"], &spec);
        assert_eq!(code, 0, "{name}:\n{out}\n{err}");
        let sample = line_with(&out, "sample:");
        assert!(
            sample.contains("not run") && sample.contains(called),
            "{name}:\n{out}"
        );
        assert_eq!(snapshot(&c).await, before, "{name} wrote:\n{out}");
    }
    // An index over a function that draws nothing: sampled (and rolled back) as before.
    let spec = t_spec(
        &db,
        "harmless_index",
        "NOT done",
        "INSERT INTO harmless SELECT id, id FROM t WHERE id = ANY($1)",
        open,
    );
    let (code, out, err) = run_on(&["plan"], &spec);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(line_with(&out, "sample:").contains("rolled back"), "{out}");
    assert_eq!(count(&c, "SELECT count(*) FROM harmless").await, 0);
    // A json key with a btree class of its own, made now: every check in the database reads
    // the support functions of operator families made in it.
    c.batch_execute(&format!(
        "-- Its comparison writes through another connection (once per transaction), which a
         -- read-only transaction does not stop.
         CREATE FUNCTION side_dblink() RETURNS bool LANGUAGE sql AS $$
           SELECT dblink_exec({conn}, 'INSERT INTO audit (note) VALUES (''cmp'')') IS NOT NULL $$;
         CREATE FUNCTION jcmp(a json, b json) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
           BEGIN
             IF current_setting('plan_test.cmp', true) IS DISTINCT FROM 'y' THEN
               PERFORM side_dblink();
               PERFORM set_config('plan_test.cmp', 'y', true);
             END IF;
             RETURN CASE WHEN a::text < b::text THEN -1 WHEN a::text > b::text THEN 1 ELSE 0 END;
           END $$;
         CREATE FUNCTION jlt(json, json) RETURNS bool LANGUAGE sql IMMUTABLE AS 'SELECT $1::text < $2::text';
         CREATE FUNCTION jle(json, json) RETURNS bool LANGUAGE sql IMMUTABLE AS 'SELECT $1::text <= $2::text';
         CREATE FUNCTION jeq(json, json) RETURNS bool LANGUAGE sql IMMUTABLE AS 'SELECT $1::text = $2::text';
         CREATE FUNCTION jge(json, json) RETURNS bool LANGUAGE sql IMMUTABLE AS 'SELECT $1::text >= $2::text';
         CREATE FUNCTION jgt(json, json) RETURNS bool LANGUAGE sql IMMUTABLE AS 'SELECT $1::text > $2::text';
         CREATE OPERATOR < (LEFTARG = json, RIGHTARG = json, FUNCTION = jlt);
         CREATE OPERATOR <= (LEFTARG = json, RIGHTARG = json, FUNCTION = jle);
         CREATE OPERATOR = (LEFTARG = json, RIGHTARG = json, FUNCTION = jeq);
         CREATE OPERATOR >= (LEFTARG = json, RIGHTARG = json, FUNCTION = jge);
         CREATE OPERATOR > (LEFTARG = json, RIGHTARG = json, FUNCTION = jgt);
         CREATE OPERATOR CLASS json_ops DEFAULT FOR TYPE json USING btree AS
           OPERATOR 1 <, OPERATOR 2 <=, OPERATOR 3 =, OPERATOR 4 >=, OPERATOR 5 >,
           FUNCTION 1 jcmp(json, json);
         CREATE TABLE j (k json PRIMARY KEY, v int);
         INSERT INTO j SELECT to_json(lpad(g::text, 6, '0')), NULL FROM generate_series(1, 300) g;
         ANALYZE j;",
    ))
    .await
    .unwrap();
    // Building j's primary key ran the comparison: count from here.
    let before = snapshot(&c).await;
    // The json key: every keyset step compares keys with jcmp.
    let keyed = db.spec(
        "json_key.yaml",
        "name: json_key
postgres:
  url: $URL
  table: j
  key: k
  where: v IS NULL
  statement: UPDATE j SET v = 1 WHERE k = ANY($1)
batch: {size: 50, target: 0}
",
    );
    let (code, out, err) = run_on(&["plan"], &keyed);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        line_with(&out, "the key's type json runs").contains("public.side_dblink")
            && !out.contains("rolled back"),
        "{out}"
    );
    assert_eq!(snapshot(&c).await, before, "plan of json_key wrote:\n{out}");
    // verify sorts json: refused before it runs.
    let sorted = t_spec(
        &db,
        "v_sorted",
        "NOT done",
        "UPDATE t SET n = n + 1 WHERE id = ANY($1)",
        "SELECT count(*) - count(*) FROM (SELECT k FROM j ORDER BY k) s",
    );
    let (code, out, err) = run_on(&["verify"], &sorted);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        line_with(&err, "postgres.verify calls ").contains("public.side_dblink"),
        "{err}"
    );
    assert_eq!(snapshot(&c).await, before, "verify wrote:\n{err}");
    db.drop_db().await;
}

/// Planning any query over a table folds the constant calls in its indexes' expressions and
/// predicates (and CHECKs and policies) as the server first reads them: an IMMUTABLE-declared
/// function there that writes through another connection runs during a mere `EXPLAIN`, in a
/// read-only transaction, before any check that only reads the plan. `verify` refuses a
/// query that names such a table; `plan` plans nothing over a job's table that has one (no
/// sample, no count, rows from the catalog) and `status` estimates without planning either.
#[tokio::test]
async fn plan_verify_and_status_fold_no_index_that_writes() {
    let db = TestDb::new("plan_folded").await;
    let c = db.client().await;
    let conn = format!("'{}'", db.url.replace('\'', "''"));
    c.batch_execute(&format!(
        "CREATE EXTENSION IF NOT EXISTS dblink;
         CREATE TABLE audit (id bigserial PRIMARY KEY, note text);
         CREATE FUNCTION marker(x text) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
           BEGIN
             PERFORM dblink_exec({conn}, format('INSERT INTO audit (note) VALUES (%L)', x));
             RETURN 0;
           END $$;
         -- Left VOLATILE, as plpgsql functions are by default: never folded while planning.
         CREATE FUNCTION valid(x int) RETURNS bool LANGUAGE plpgsql AS $$
           BEGIN
             PERFORM dblink_exec({conn}, 'INSERT INTO audit (note) VALUES (''valid'')');
             RETURN x >= 0;
           END $$;"
    ))
    .await
    .unwrap();
    // Another statement: marker's connection must see audit committed.
    c.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0, done bool NOT NULL DEFAULT false);
         INSERT INTO t (id) SELECT i FROM generate_series(1, 3000) i;
         CREATE TABLE r (id bigint, v int);
         INSERT INTO r SELECT i, i FROM generate_series(1, 100) i;
         CREATE INDEX ON r (id) WHERE v > marker('r_predicate');
         CREATE TABLE w (id bigint PRIMARY KEY, v int NOT NULL DEFAULT 0, done bool NOT NULL DEFAULT false);
         INSERT INTO w (id) SELECT i FROM generate_series(1, 2000) i;
         CREATE INDEX ON w ((v + marker('w_expression')));
         CREATE TABLE parted (id bigint, v int) PARTITION BY RANGE (id);
         CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (1000);
         CREATE INDEX ON parted_1 (v) WHERE v < marker('partition_predicate');
         CREATE VIEW r_view AS SELECT id FROM r;
         CREATE TABLE keyed (id bigint, v int) PARTITION BY RANGE ((v + marker('partition_key')));
         CREATE TABLE keyed_1 PARTITION OF keyed FOR VALUES FROM (0) TO (1000);
         CREATE TABLE defaulted (id bigint, d int DEFAULT marker('default'));
         CREATE TABLE checked (id bigint, v int CHECK (valid(v)));
         INSERT INTO checked SELECT i, i FROM generate_series(1, 10) i;
         ANALYZE;",
    )
    .await
    .unwrap();
    // Building the indexes ran marker: count from here.
    let audit = async || count(&c, "SELECT count(*) FROM audit").await;
    let before = audit().await;
    // verify naming r, a partitioned table whose partition has one, or a view over r.
    for (name, verify) in [
        ("v_table", "SELECT count(*) - count(*) FROM r"),
        ("v_partition", "SELECT count(*) - count(*) FROM parted"),
        ("v_view", "SELECT count(*) - count(*) FROM r_view"),
        ("v_key", "SELECT count(*) - count(*) FROM keyed"),
    ] {
        let spec = t_spec(
            &db,
            name,
            "NOT done",
            "UPDATE t SET n = n + 1 WHERE id = ANY($1)",
            verify,
        );
        let (code, out, err) = run_on(&["verify"], &spec);
        assert_eq!(code, 1, "{name}:\n{out}\n{err}");
        assert!(
            line_with(&err, "postgres.verify calls ").contains("public.dblink_exec"),
            "{name}:\n{err}"
        );
        assert_eq!(audit().await, before, "verify {name} wrote:\n{err}");
    }
    // plan of a job over w, and of a job over t whose statement writes r.
    let over_w = db.spec(
        "over_w.yaml",
        "name: over_w
postgres:
  url: $URL
  table: w
  key: id
  where: NOT done
  statement: UPDATE w SET done = true WHERE id = ANY($1)
batch: {size: 100, target: 0}
",
    );
    let (code, out, err) = run_on(&["plan", "--exact"], &over_w);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        line_with(&out, "planning a query over public.w runs").contains("public.dblink_exec")
            && !out.contains("rolled back"),
        "{out}"
    );
    assert_eq!(audit().await, before, "plan of over_w wrote:\n{out}");
    let into_r = t_spec(
        &db,
        "into_r",
        "NOT done",
        "INSERT INTO r SELECT id, 1 FROM t WHERE id = ANY($1)",
        "SELECT 0",
    );
    let (code, out, err) = run_on(&["plan"], &into_r);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        line_with(&out, "sample:").contains("not run")
            && line_with(&out, "sample:").contains("public.dblink_exec"),
        "{out}"
    );
    assert_eq!(audit().await, before, "plan of into_r wrote:\n{out}");
    // An INSERT filling in a default that folds (its plan shows the value).
    let into_defaulted = t_spec(
        &db,
        "into_defaulted",
        "NOT done",
        "INSERT INTO defaulted (id) SELECT id FROM t WHERE id = ANY($1)",
        "SELECT 0",
    );
    let (code, out, err) = run_on(&["plan"], &into_defaulted);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        line_with(&out, "sample:").contains("public.dblink_exec"),
        "{out}"
    );
    assert_eq!(
        audit().await,
        before,
        "plan of into_defaulted wrote:\n{out}"
    );
    // A CHECK calling a VOLATILE function runs only when rows are written: verify over its
    // table runs (its answer, 0), and plan of a job over it samples.
    let reads_checked = t_spec(
        &db,
        "reads_checked",
        "NOT done",
        "UPDATE t SET n = n + 1 WHERE id = ANY($1)",
        "SELECT count(*) - 10 FROM checked",
    );
    let (code, out, err) = run_on(&["verify"], &reads_checked);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(audit().await, before, "verify of checked wrote:\n{err}");
    // run over w writes (each new session folds marker once): status afterwards does not.
    let (code, out, err) = run_on(&["run"], &over_w);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM w WHERE done").await, 2000);
    let after_run = audit().await;
    let (code, out, err) = run_on(&["status"], &over_w);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(audit().await, after_run, "status wrote:\n{out}");
    db.drop_db().await;
}

/// A foreign table (postgres_fdw) is read and written by its server, in a remote transaction of
/// its own that this one's rollback or read-only mode does not make harmless: a remote view
/// that calls `nextval`, a remote `bigserial` filled by a routed insert. `plan` evaluates no
/// `where` or statement that reaches one, and `verify` refuses one, as they do a volatile
/// function: also when a function reads it (STABLE, reached by name, through an operator,
/// with a SQL-standard body, through a view), and when only a later sample batch's keys reach
/// it (each batch's plan is its own).
#[tokio::test]
async fn plan_and_verify_reach_no_foreign_server() {
    let db = TestDb::new("plan_fdw").await;
    let c = db.client().await;
    let at = c
        .query_one(
            "SELECT coalesce(host(inet_server_addr()), '127.0.0.1'), inet_server_port()::text,
                    current_user::text",
            &[],
        )
        .await
        .unwrap();
    let (host, port, user): (String, String, String) = (at.get(0), at.get(1), at.get(2));
    c.batch_execute(&format!(
        "CREATE EXTENSION IF NOT EXISTS postgres_fdw;
         CREATE SERVER loop FOREIGN DATA WRAPPER postgres_fdw
           OPTIONS (host '{host}', port '{port}', dbname '{db}');
         CREATE USER MAPPING FOR CURRENT_USER SERVER loop OPTIONS (user '{user}');
         CREATE SCHEMA remote;
         CREATE SEQUENCE remote.s;
         CREATE VIEW remote.drawing AS SELECT nextval('remote.s') AS v;
         CREATE TABLE remote.audit (id bigserial PRIMARY KEY, note text);
         CREATE TABLE remote.routed_r (id bigint, note text, seq bigserial);
         CREATE FOREIGN TABLE drawing_f (v bigint) SERVER loop
           OPTIONS (schema_name 'remote', table_name 'drawing');
         CREATE FOREIGN TABLE \"a(\"\"x)b\" (v bigint) SERVER loop
           OPTIONS (schema_name 'remote', table_name 'drawing');
         CREATE FOREIGN TABLE audit_f (note text) SERVER loop
           OPTIONS (schema_name 'remote', table_name 'audit');
         CREATE TABLE routed (id bigint, note text) PARTITION BY RANGE (id);
         CREATE FOREIGN TABLE routed_f PARTITION OF routed FOR VALUES FROM (0) TO (1000000000)
           SERVER loop OPTIONS (schema_name 'remote', table_name 'routed_r');
         -- Read-only by their own account (STABLE), and they are: here, the server is not.
         CREATE FUNCTION reads_f() RETURNS bigint LANGUAGE sql STABLE
           AS 'SELECT count(*) - count(*) FROM drawing_f';
         CREATE FUNCTION calls_reads_f() RETURNS bigint LANGUAGE plpgsql STABLE
           AS $$ BEGIN RETURN reads_f(); END $$;
         -- Reached other than by name: an operator's function.
         CREATE FUNCTION at_f(a bigint, b int) RETURNS bool LANGUAGE plpgsql STABLE
           AS $$ BEGIN RETURN a + (SELECT count(*) - count(*) FROM drawing_f) >= b; END $$;
         CREATE OPERATOR %%% (LEFTARG = bigint, RIGHTARG = int, FUNCTION = at_f);
         -- A SQL-standard body (no source text: its reads are dependencies), and a body that
         -- reads the foreign table through a view.
         CREATE FUNCTION reads_std() RETURNS bigint LANGUAGE sql STABLE
           BEGIN ATOMIC SELECT count(*) - count(*) FROM drawing_f; END;
         CREATE VIEW drawing_v AS SELECT v FROM drawing_f;
         CREATE FUNCTION reads_v() RETURNS bigint LANGUAGE plpgsql STABLE
           AS $$ BEGIN RETURN (SELECT count(*) - count(*) FROM drawing_v); END $$;
         -- The operator used inside a body, and inside a view a body reads.
         CREATE FUNCTION wrap_op(a bigint) RETURNS bool LANGUAGE plpgsql STABLE
           AS $$ BEGIN RETURN a %%% 0; END $$;
         CREATE TABLE few (id bigint); INSERT INTO few VALUES (1);
         CREATE VIEW op_view AS SELECT id FROM few WHERE id %%% 0;
         CREATE FUNCTION wrap_view() RETURNS bigint LANGUAGE plpgsql STABLE
           AS $$ BEGIN RETURN (SELECT count(*) - count(*) FROM op_view); END $$;
         -- A quoted name with capitals outside ASCII.
         CREATE FOREIGN TABLE \"Заказы\" (v bigint) SERVER loop
           OPTIONS (schema_name 'remote', table_name 'drawing');
         CREATE FUNCTION reads_ru() RETURNS bigint LANGUAGE sql STABLE
           AS $$ SELECT count(*) - count(*) FROM \"Заказы\" $$;
         -- STABLE, and it only reads: a table named by data, through EXECUTE.
         CREATE FUNCTION row_count(tbl text) RETURNS bigint LANGUAGE plpgsql STABLE AS $$
           DECLARE n bigint;
           BEGIN EXECUTE format('SELECT count(*) FROM %I', tbl) INTO n; RETURN n; END $$;
         -- A chain of calls longer than any fixed depth.
         CREATE FUNCTION ch0() RETURNS bigint LANGUAGE plpgsql STABLE
           AS $$ BEGIN RETURN (SELECT count(*) - count(*) FROM drawing_f); END $$;
         DO $$ BEGIN FOR i IN 1..40 LOOP
           EXECUTE format('CREATE FUNCTION ch%s() RETURNS bigint LANGUAGE plpgsql STABLE
                           AS $b$ BEGIN RETURN ch%s(); END $b$', i, i - 1);
         END LOOP; END $$;
         CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0, done bool NOT NULL DEFAULT false);
         INSERT INTO t (id) SELECT i FROM generate_series(1, 3000) i;
         ANALYZE t;",
        db = db.name
    ))
    .await
    .unwrap();
    // Sequences are not transactional: a draw stays after the remote transaction aborts.
    let snapshot = async |c: &Client| {
        count(
            c,
            "SELECT (SELECT last_value + is_called::int FROM remote.s) * 1000000
                    + (SELECT last_value + is_called::int FROM remote.audit_id_seq) * 10000
                    + (SELECT last_value + is_called::int FROM remote.routed_r_seq_seq) * 100
                    + (SELECT count(*) FROM remote.audit) + (SELECT count(*) FROM remote.routed_r)
                    + (SELECT sum(n) FROM t)",
        )
        .await
    };
    let before = snapshot(&c).await;
    let spec = |name: &str, where_: &str, statement: &str, verify: &str| {
        t_spec(&db, name, where_, statement, verify)
    };
    let plain = "UPDATE t SET n = n + 1 WHERE id = ANY($1)";
    let open = "SELECT count(*) FROM t WHERE NOT done";
    let reads = "id > (SELECT count(*) - count(*) FROM drawing_f) AND NOT done";
    for args in [vec!["plan"], vec!["plan", "--exact"]] {
        let (code, out, err) = run_on(&args, &spec("w_foreign", reads, plain, open));
        assert_eq!(code, 0, "{args:?}:\n{out}\n{err}");
        assert_eq!(snapshot(&c).await, before, "{args:?} wrote:\n{out}");
        assert!(
            out.contains("where calls the foreign server of drawing_f (server loop)")
                && !out.contains("rolled back"),
            "{args:?}:\n{out}"
        );
    }
    for (name, statement, reached) in [
        (
            "st_foreign_insert",
            "INSERT INTO audit_f (note) SELECT 'x' FROM t WHERE id = ANY($1)",
            "audit_f",
        ),
        // Routed into a partition that is a foreign table: the plan names only the parent.
        (
            "st_foreign_partition",
            "INSERT INTO routed (id, note) SELECT id, 'x' FROM t WHERE id = ANY($1)",
            "routed_f",
        ),
        (
            "st_foreign_read",
            "UPDATE t SET n = n + 1 WHERE id = ANY($1) AND EXISTS (SELECT 1 FROM drawing_f)",
            "drawing_f",
        ),
        // Only from the second batch on (keys 101..200): the first batch's plan, custom for
        // its keys, has no scan of drawing_f at all.
        (
            "st_later_batch",
            "UPDATE t SET n = n + 1 WHERE id = ANY($1) \
             AND (SELECT count(*) FROM drawing_f WHERE $1[1] > 100) >= 0",
            "drawing_f",
        ),
    ] {
        let (code, out, err) = run(&[&"plan", &spec(name, "NOT done", statement, open)]);
        assert_eq!(code, 0, "{name}:\n{out}\n{err}");
        assert_eq!(snapshot(&c).await, before, "{name} wrote:\n{out}");
        let sample = line_with(&out, "sample:");
        assert!(
            sample.contains("not run")
                && sample.contains(&format!("the foreign server of {reached} (server loop")),
            "{name}:\n{out}"
        );
    }
    for (name, verify) in [
        ("v_foreign", "SELECT count(*) - count(*) FROM drawing_f"),
        // Through a STABLE function's body, and through one that calls it.
        (
            "v_function",
            "SELECT reads_f() + count(*) FROM t WHERE done",
        ),
        (
            "v_nested",
            "SELECT calls_reads_f() + count(*) FROM t WHERE done",
        ),
        // A STABLE built-in that reads a table named as text, which no plan shows.
        (
            "v_to_xml",
            "SELECT length(table_to_xml('drawing_f', true, false, '')::text) * 0",
        ),
        // A name the pushed-down scan prints quoted, with quotes and parentheses in it.
        ("v_odd_name", r#"SELECT count(*) - count(*) FROM "a(""x)b""#),
        (
            "v_operator",
            "SELECT count(*) - count(*) FROM t WHERE id %%% 0",
        ),
        (
            "v_sql_body",
            "SELECT reads_std() + count(*) FROM t WHERE done",
        ),
        ("v_view", "SELECT reads_v() + count(*) FROM t WHERE done"),
        (
            "v_op_in_body",
            "SELECT count(*) - count(*) FROM t WHERE wrap_op(id)",
        ),
        ("v_op_in_view", "SELECT wrap_view()"),
        ("v_non_ascii", "SELECT reads_ru()"),
        ("v_chain", "SELECT ch40()"),
        (
            "v_execute",
            "SELECT count(*) - count(*) FROM t WHERE row_count(concat('dr', 'awing_f')) < 0",
        ),
    ] {
        let (code, out, err) = run(&[&"verify", &spec(name, "NOT done", plain, verify)]);
        assert_eq!(snapshot(&c).await, before, "{name} wrote:\n{out}\n{err}");
        assert_eq!(code, 1, "{name}: {out}\n{err}");
        let refused = line_with(&err, "postgres.verify calls ");
        assert!(
            refused.contains("(server loop")
                || refused.contains("pg_catalog.table_to_xml")
                || refused.contains("row_count(text), which runs SQL built at run time"),
            "{name}: {err}"
        );
    }
    // The idempotency check reads back what the sample wrote in a table, not in its
    // inheritance children: here one is a foreign table over a view that draws.
    c.batch_execute(
        "CREATE TABLE log (t_id bigint);
         CREATE VIEW remote.rv_log AS SELECT 0::bigint AS t_id FROM remote.audit
           WHERE nextval('remote.s') > 0;
         INSERT INTO remote.audit (note) VALUES ('a'), ('b');
         CREATE FOREIGN TABLE log_far () INHERITS (log) SERVER loop
           OPTIONS (schema_name 'remote', table_name 'rv_log');",
    )
    .await
    .unwrap();
    let before = snapshot(&c).await;
    let logged = spec(
        "logged",
        "NOT done",
        "INSERT INTO log (t_id) SELECT id FROM t WHERE id = ANY($1)",
        open,
    );
    let (code, out, err) = run(&[&"plan", &logged]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(line_with(&out, "sample:").contains("rolled back"), "{out}");
    assert_eq!(snapshot(&c).await, before, "logged wrote:\n{out}");
    let (code, out, err) = run_on(
        &["plan"],
        &spec(
            "w_function",
            "calls_reads_f() = 0 AND NOT done",
            plain,
            open,
        ),
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(snapshot(&c).await, before, "w_function wrote:\n{out}");
    assert!(
        out.contains(
            "where calls the foreign server of drawing_f (server loop, read in reads_f())"
        ),
        "{out}"
    );
    for args in [vec!["plan"], vec!["plan", "--exact"]] {
        let (code, out, err) = run_on(
            &args,
            &spec("w_operator", "(id %%% 0) AND NOT done", plain, open),
        );
        assert_eq!(code, 0, "{args:?}:\n{out}\n{err}");
        assert_eq!(
            snapshot(&c).await,
            before,
            "w_operator {args:?} wrote:\n{out}"
        );
        assert!(
            out.contains(
                "where calls the foreign server of drawing_f (server loop, read in \
                 at_f(bigint,integer))"
            ),
            "{args:?}: {out}"
        );
    }
    // Planning alone runs a STABLE function called with constant arguments (to estimate the
    // condition): the check reads the SQL before it plans it, in plan, status and verify.
    let planned = spec("w_planned", "n > reads_f() AND NOT done", plain, open);
    for args in [vec!["plan"], vec!["plan", "--exact"], vec!["status"]] {
        let (code, out, err) = run_on(&args, &planned);
        assert_eq!(
            snapshot(&c).await,
            before,
            "w_planned {args:?} wrote:\n{out}\n{err}"
        );
        assert_eq!(code, 0, "{args:?}:\n{out}\n{err}");
    }
    let (_, out, _) = run(&[&"plan", &planned]);
    assert!(
        out.contains(
            "where calls the foreign server of drawing_f (server loop, read in reads_f())"
        ),
        "{out}"
    );
    let (code, out, err) = run(&[
        &"plan",
        &spec(
            "st_planned",
            "NOT done",
            "UPDATE t SET n = n + 1 WHERE id = ANY($1) AND n <> reads_f()",
            open,
        ),
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(snapshot(&c).await, before, "st_planned wrote:\n{out}");
    assert!(line_with(&out, "sample:").contains("not run"), "{out}");
    let (code, out, err) = run(&[
        &"verify",
        &spec(
            "v_planned",
            "NOT done",
            plain,
            "SELECT count(*) FROM t WHERE n > reads_f()",
        ),
    ]);
    assert_eq!(snapshot(&c).await, before, "v_planned wrote:\n{out}\n{err}");
    assert_eq!(code, 1, "{out}\n{err}");
    // A STABLE C function that runs SQL given as text (tablefunc's crosstab).
    c.batch_execute("CREATE EXTENSION IF NOT EXISTS tablefunc")
        .await
        .unwrap();
    let (code, out, err) = run(&[
        &"verify",
        &spec(
            "v_crosstab",
            "NOT done",
            plain,
            "SELECT count(*) * 0 FROM crosstab('SELECT 1::text, 1::text, v::text FROM drawing_f') \
             AS ct(r text, c text)",
        ),
    ]);
    assert_eq!(
        snapshot(&c).await,
        before,
        "v_crosstab wrote:\n{out}\n{err}"
    );
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("public.crosstab"), "{err}");
    // A local table is still sampled and verified.
    let local = spec("local", "NOT done", plain, open);
    let (code, out, err) = run(&[&"plan", &local]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(line_with(&out, "sample:").contains("rolled back"), "{out}");
    assert_eq!(snapshot(&c).await, before);
    db.drop_db().await;
}

#[tokio::test]
async fn plan_does_not_flag_the_shipped_demo_jobs() {
    let db = TestDb::new("plan_demo").await;
    // The demo dataset, as scripts/demo-db.sh loads it (smaller).
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("psql")
        .args([
            "-X",
            "-q",
            "-w",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            "rows=20000",
        ])
        .args(["-d", &db.url, "-f"])
        .arg(root.join("scripts/demo-data.sql"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run psql (install postgresql-client)");
    assert!(
        out.status.success(),
        "demo-data.sql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cmd = common::backfill();
    let out = cmd
        .args(["plan", "--json"])
        .arg(root.join("jobs"))
        .env("DATABASE_URL", &db.url)
        .output()
        .expect("run backfill plan");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("plan --json is JSON");
    let jobs = doc["jobs"].as_array().expect("jobs");
    let names: Vec<&str> = jobs.iter().filter_map(|j| j["job"].as_str()).collect();
    assert_eq!(names, ["flowsheet-dj-name", "ci-pending-builds"], "{doc}");
    for j in jobs {
        assert_eq!(
            j["idempotency"]["converges"], true,
            "a shipped job is flagged: {j}"
        );
        assert!(
            j["wal"]["bytes_per_row"].as_f64().is_some_and(|b| b > 0.0),
            "{j}"
        );
    }
    db.drop_db().await;
}

/// WAL the cluster wrote between two LSNs read on `c`.
async fn wal_lsn(c: &Client) -> String {
    c.query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// WAL bytes of the whole cluster between two LSNs.
async fn wal_between(c: &Client, before: &str, after: &str) -> f64 {
    c.query_one(
        "SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)::float8",
        &[&after, &before],
    )
    .await
    .unwrap()
    .get(0)
}

/// The WAL forecast of `plan --json`: (total bytes, bytes per row).
fn wal_forecast(spec: &std::path::Path) -> (f64, f64) {
    let doc = plan_json(spec);
    let wal = &doc["wal"];
    assert!(
        wal["bytes_per_second"].as_f64().is_some_and(|b| b > 0.0),
        "{doc}"
    );
    (
        wal["total_bytes"].as_f64().expect("wal.total_bytes"),
        wal["bytes_per_row"].as_f64().expect("wal.bytes_per_row"),
    )
}

/// The forecast is within 2x of what the run writes, on a quiet server and while other
/// sessions write WAL of their own (production has traffic: their WAL is not the job's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_forecasts_the_wal_the_run_writes() {
    const ROWS: i64 = 50_000;
    // A cluster of its own: the WAL measured around the run is this job's alone (no other test,
    // no autovacuum).
    let pg = common::cluster::PgCluster::start(
        common::cluster::ClusterOpts::new().setting("autovacuum", "off"),
    )
    .await;
    let db = pg.create_db("plan_wal").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0, pad text NOT NULL);
         INSERT INTO t (id, pad) SELECT i, repeat('x', 40) FROM generate_series(1, {ROWS}) i;
         ANALYZE t;
         CHECKPOINT;"
    ))
    .await
    .unwrap();
    let spec = db.spec(
        "wal.yaml",
        "name: wal
postgres:
  url: $URL
  table: t
  key: id
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1)
batch: {size: 1000, target: 0}
",
    );
    let (code, out, err) = run(&[&"plan", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(line_with(&out, "WAL:").contains("bytes/row"), "{out}");
    c.batch_execute("CHECKPOINT").await.unwrap();
    let quiet = wal_forecast(&spec);

    // Another session writes WAL without pause (big rows into a table of another database)
    // while plan samples.
    let other = pg.create_db("plan_wal_other").await;
    let writer = other.client().await;
    writer
        .batch_execute("CREATE TABLE junk (pad text)")
        .await
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rounds = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let busy = tokio::spawn({
        let (stop, rounds) = (stop.clone(), rounds.clone());
        async move {
            use std::sync::atomic::Ordering::SeqCst;
            while !stop.load(SeqCst) {
                writer
                    .batch_execute(
                        "INSERT INTO junk SELECT repeat(md5(i::text), 60)
                           FROM generate_series(1, 2000) i",
                    )
                    .await
                    .unwrap();
                rounds.fetch_add(1, SeqCst);
            }
        }
    });
    let writing = async || rounds.load(std::sync::atomic::Ordering::SeqCst);
    let r0 = writing().await;
    common::runner::wait_until(
        "the other session to write",
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(10),
        async || writing().await > r0,
    )
    .await;
    c.batch_execute("CHECKPOINT").await.unwrap();
    let spec_busy = spec.clone();
    let r1 = writing().await;
    let busy_forecast = tokio::task::spawn_blocking(move || wal_forecast(&spec_busy))
        .await
        .unwrap();
    assert!(
        writing().await > r1,
        "the other session wrote nothing during plan"
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    busy.await.unwrap();

    c.batch_execute("CHECKPOINT").await.unwrap();
    let before = wal_lsn(&c).await;
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    let after = wal_lsn(&c).await;
    let actual = wal_between(&c, &before, &after).await;
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, ROWS);
    for (when, (forecast, per_row)) in [("quiet", quiet), ("busy", busy_forecast)] {
        let ratio = forecast / actual;
        eprintln!(
            "{when}: WAL forecast {forecast:.0} bytes ({per_row:.1}/row), written {actual:.0} \
             ({:.1}/row): ratio {ratio:.2}",
            actual / ROWS as f64
        );
        assert!(
            (0.5..=2.0).contains(&ratio),
            "{when}: forecast {forecast:.0} bytes vs {actual:.0} written by the run (ratio {ratio:.2})"
        );
    }
    drop(c);
}

/// The statement deletes from a table whose rows another table references `ON DELETE CASCADE`,
/// and that table has a trigger that draws from a sequence. The cascade runs through the
/// server's internal triggers, which no plan shows: `plan` ran its sample batches and rolled
/// them back, and the sequence had moved by 300. Triggers of tables a cascade writes count as
/// the statement's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_sees_the_triggers_a_foreign_keys_cascade_runs() {
    let db = TestDb::new("plan_cascade").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE parent (id bigint PRIMARY KEY);
         INSERT INTO parent SELECT generate_series(1, 1000);
         CREATE TABLE child (id bigint PRIMARY KEY,
                             parent_id bigint REFERENCES parent ON DELETE CASCADE);
         INSERT INTO child SELECT i, i FROM generate_series(1, 1000) i;
         CREATE TABLE grandchild (id bigint PRIMARY KEY,
                                  child_id bigint REFERENCES child ON DELETE SET NULL);
         INSERT INTO grandchild SELECT i, i FROM generate_series(1, 1000) i;
         CREATE SEQUENCE audit_seq;
         CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM nextval('audit_seq'); RETURN NEW; END $$;
         CREATE TRIGGER grandchild_audit AFTER UPDATE ON grandchild
           FOR EACH ROW EXECUTE FUNCTION audit();
         ANALYZE parent;",
    )
    .await
    .unwrap();
    let spec = db.spec(
        "job.yaml",
        "postgres:
  url: $URL
  table: parent
  key: id
  statement: DELETE FROM parent WHERE id = ANY($1)
batch: {size: 100, target: 0}
",
    );
    let seq = "SELECT last_value * 10 + is_called::int FROM audit_seq";
    let before = count(&c, seq).await;
    let (code, out, err) = run(&[&"plan", &spec]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let sample = line_with(&out, "sample:");
    assert!(
        sample.contains("not run") && sample.contains("grandchild_audit on grandchild"),
        "{out}"
    );
    assert_eq!(count(&c, seq).await, before, "plan drew from the sequence");
    assert_eq!(count(&c, "SELECT count(*) FROM parent").await, 1000);
    drop(c);
    db.drop_db().await;
}

/// What else a foreign key's cascade runs that no plan shows: a rule on the table it deletes
/// from (the cascade's DELETE is rewritten like any other: here it inserts into a table with a
/// `bigserial`), and the default a SET DEFAULT fills in (here one that calls `nextval`). The
/// sample batches ran, rolled back, and the sequences had moved. Both now keep the sample from
/// running, as a trigger there does. A default is read as text: `nextval('s'::text)` leaves
/// no dependency in the catalog (a MERGE's insert missed it too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_sees_the_rules_and_defaults_a_foreign_keys_cascade_runs() {
    let db = TestDb::new("plan_cascade_rules").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE parent (id bigint PRIMARY KEY);
         INSERT INTO parent SELECT generate_series(1, 1000);
         CREATE TABLE child (id bigint PRIMARY KEY,
                             parent_id bigint REFERENCES parent ON DELETE CASCADE);
         INSERT INTO child SELECT i, i FROM generate_series(1, 1000) i;
         CREATE TABLE log (id bigserial PRIMARY KEY, note text);
         CREATE RULE child_log AS ON DELETE TO child DO ALSO
           INSERT INTO log (note) VALUES ('child ' || OLD.id);
         CREATE SEQUENCE d_seq;
         CREATE TABLE other (id bigint PRIMARY KEY,
                             parent_id bigint
                               DEFAULT CASE WHEN nextval('d_seq'::text) > 0 THEN NULL::bigint END
                               REFERENCES parent ON DELETE SET DEFAULT);
         INSERT INTO other SELECT i, i FROM generate_series(1, 1000) i;
         ANALYZE parent;",
    )
    .await
    .unwrap();
    const DELETE: &str = "DELETE FROM parent WHERE id = ANY($1)";
    let parent_spec = |name: &str, statement: &str| {
        db.spec(
            &format!("{name}.yaml"),
            &format!(
                "postgres:
  url: $URL
  table: parent
  key: id
  statement: {statement}
batch: {{size: 100, target: 0}}
"
            ),
        )
    };
    let seqs = "SELECT (SELECT last_value * 10 + is_called::int FROM log_id_seq) * 100000
                       + (SELECT last_value * 10 + is_called::int FROM d_seq)
                       + (SELECT count(*) FROM log)";
    let before = count(&c, seqs).await;
    for (name, drop, reached) in [
        // Both: the rule is the first thing found.
        ("both", "", "a rule (child_log on child)"),
        (
            "set_default",
            "DROP RULE child_log ON child",
            "by other_parent_id_fkey",
        ),
    ] {
        if !drop.is_empty() {
            c.batch_execute(drop).await.unwrap();
        }
        let (code, out, err) = run(&[&"plan", &parent_spec(name, DELETE)]);
        assert_eq!(code, 0, "{name}: stdout:\n{out}\nstderr:\n{err}");
        assert_eq!(
            count(&c, seqs).await,
            before,
            "{name}: plan drew from a sequence:\n{out}"
        );
        let sample = line_with(&out, "sample:");
        assert!(
            sample.contains("not run") && sample.contains(reached),
            "{name}: {out}"
        );
    }
    // Defaults no plan prints: a MERGE's insert, one the column takes from its domain, and
    // DEFAULT in the SET list of an ON CONFLICT DO UPDATE (its INSERT gives every column), also
    // through a view whose own default it is.
    c.batch_execute(
        "CREATE SEQUENCE m_seq;
         CREATE TABLE merged (id bigint DEFAULT nextval('m_seq'::text), src bigint UNIQUE);
         CREATE DOMAIN drawn AS bigint DEFAULT nextval('m_seq');
         CREATE TABLE merged_dom (id drawn, src bigint UNIQUE);
         CREATE TABLE upserted (src bigint PRIMARY KEY, d bigint DEFAULT nextval('m_seq'));
         INSERT INTO upserted SELECT i, 0 FROM generate_series(1, 1000) i;
         CREATE TABLE under (src bigint PRIMARY KEY, d bigint NOT NULL DEFAULT 0);
         INSERT INTO under SELECT i, 0 FROM generate_series(1, 1000) i;
         CREATE VIEW over AS SELECT * FROM under;
         ALTER VIEW over ALTER d SET DEFAULT nextval('m_seq');",
    )
    .await
    .unwrap();
    let m_seq = "SELECT last_value * 10 + is_called::int FROM m_seq";
    let m_before = count(&c, m_seq).await;
    for (name, statement, column) in [
        (
            "merge",
            "MERGE INTO merged USING (SELECT id FROM parent WHERE id = ANY($1)) s \
             ON merged.src = s.id WHEN NOT MATCHED THEN INSERT (src) VALUES (s.id)",
            "merged.id",
        ),
        (
            "merge_domain",
            "MERGE INTO merged_dom USING (SELECT id FROM parent WHERE id = ANY($1)) s \
             ON merged_dom.src = s.id WHEN NOT MATCHED THEN INSERT (src) VALUES (s.id)",
            "merged_dom.id",
        ),
        (
            "upsert_default",
            "INSERT INTO upserted (src, d) SELECT id, 0 FROM parent WHERE id = ANY($1) \
             ON CONFLICT (src) DO UPDATE SET d = DEFAULT",
            "upserted.d",
        ),
        // Through a view with a default of its own: the plan names only the table.
        (
            "upsert_view_default",
            "INSERT INTO over (src, d) SELECT id, 0 FROM parent WHERE id = ANY($1) \
             ON CONFLICT (src) DO UPDATE SET d = DEFAULT",
            "over.d",
        ),
    ] {
        let (code, out, err) = run(&[&"plan", &parent_spec(name, statement)]);
        assert_eq!(code, 0, "{name}: stdout:\n{out}\nstderr:\n{err}");
        assert_eq!(
            count(&c, m_seq).await,
            m_before,
            "{name}: plan drew from m_seq:\n{out}"
        );
        let sample = line_with(&out, "sample:");
        assert!(
            sample.contains("not run") && sample.contains(column),
            "{name}: {out}"
        );
    }
    // The CHECK of a table the cascade writes (here: when SET NULL leaves parent_id NULL).
    c.batch_execute(
        "CREATE FUNCTION orphan_ok(o bigint) RETURNS bool LANGUAGE plpgsql AS $$
           BEGIN PERFORM nextval('m_seq'); RETURN true; END $$;
         CREATE TABLE checked (id bigint PRIMARY KEY,
                               parent_id bigint REFERENCES parent ON DELETE SET NULL,
                               CHECK (parent_id IS NOT NULL OR orphan_ok(id)));
         INSERT INTO checked SELECT i, i FROM generate_series(1, 1000) i;",
    )
    .await
    .unwrap();
    let m_before = count(&c, m_seq).await;
    let (code, out, err) = run(&[&"plan", &parent_spec("cascade_check", DELETE)]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(
        count(&c, m_seq).await,
        m_before,
        "plan drew from m_seq:\n{out}"
    );
    let sample = line_with(&out, "sample:");
    assert!(
        sample.contains("not run") && sample.contains("public.orphan_ok"),
        "{out}"
    );
    c.batch_execute("DROP TABLE checked").await.unwrap();
    // Without either, the sample runs, and is rolled back.
    c.batch_execute("ALTER TABLE other ALTER COLUMN parent_id SET DEFAULT NULL")
        .await
        .unwrap();
    let (code, out, err) = run(&[&"plan", &parent_spec("plain", DELETE)]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(line_with(&out, "sample:").contains("rolled back"), "{out}");
    assert_eq!(count(&c, "SELECT count(*) FROM parent").await, 1000);
    assert_eq!(
        count(&c, "SELECT count(*) FROM other WHERE parent_id IS NULL").await,
        0
    );
    drop(c);
    db.drop_db().await;
}
