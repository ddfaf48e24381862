//! What the engine refuses, and how it says so: keys that can be NULL, specs that try to make
//! read-only commands write, a table locked by another session, several jobs where one cannot
//! be read or fails (the others are still reported, the untried ones named), and a checkpoint
//! resumed under another table or key.

mod common;
use common::store::job_row;
use common::{TestDb, checksum, count, run};
use tokio_postgres::Client;

fn job(url: &str, table: &str, key: &str, where_: &str, statement: &str, extra: &str) -> String {
    let w = if where_.is_empty() {
        String::new()
    } else {
        format!("  where: \"{where_}\"\n")
    };
    format!(
        "postgres:
  url: {url}
  table: {table}
  key: {key}
{w}  statement: \"{statement}\"
batch: {{size: 100, target: 0}}
{extra}"
    )
}

/// The statement of `copy_job`.
const COPY: &str = "INSERT INTO dst SELECT id FROM src WHERE id = ANY($1)";

/// An INSERT job (every row of `src`, 1000 keys, into `dst`, which has no unique key: a job
/// done twice doubles it): the client and the spec's text.
async fn copy_job(db: &TestDb) -> (Client, String) {
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE src (id bigint PRIMARY KEY);
         INSERT INTO src SELECT g FROM generate_series(1, 1000) g;
         CREATE TABLE dst (id bigint);
         ANALYZE src;",
    )
    .await
    .unwrap();
    (c, job(&db.url, "src", "id", "", COPY, ""))
}

async fn nullable_table(c: &Client) {
    c.batch_execute(
        "CREATE TABLE t (k int UNIQUE, n int NOT NULL DEFAULT 0);
         INSERT INTO t (k) SELECT g FROM generate_series(1, 1000) g;
         INSERT INTO t (k) VALUES (NULL), (NULL);
         ANALYZE t;",
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_key_that_can_be_null_is_refused_unless_where_leaves_nulls_out() {
    let db = TestDb::new("ref_null").await;
    let c = db.client().await;
    nullable_table(&c).await;
    let spec = db.spec(
        "job.yaml",
        &job(
            &db.url,
            "t",
            "k",
            "",
            "UPDATE t SET n = 1 WHERE k = ANY($1)",
            "",
        ),
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("postgres.key"), "{err}");
    assert!(err.contains("can be NULL"), "{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n <> 0").await, 0);
    assert!(
        !common::store::has_store(&c).await,
        "nothing may be written before the refusal"
    );

    // Said knowingly: the rows with a NULL key are left out, every other row is done.
    let spec = db.spec(
        "job.yaml",
        &job(
            &db.url,
            "t",
            "k",
            "k IS NOT NULL AND n = 0",
            "UPDATE t SET n = 1 WHERE k = ANY($1)",
            "",
        ),
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, 1000);
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE k IS NULL AND n = 0").await,
        2
    );
    drop(c);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_null_key_present_the_last_rows_locked_are_still_recorded_and_done_later() {
    let db = TestDb::new("ref_null_locked").await;
    let c = db.client().await;
    nullable_table(&c).await;
    // Another session holds the last three rows for the whole first run.
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; SELECT * FROM t WHERE k > 997 FOR UPDATE")
        .await
        .unwrap();
    let spec = db.spec(
        "job.yaml",
        &job(
            &db.url,
            "t",
            "k",
            "k IS NOT NULL",
            "UPDATE t SET n = n + 1 WHERE k = ANY($1)",
            "limits: {lock_timeout: 100ms}\n",
        ),
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(
        code, 75,
        "rows still locked must stop the run, not finish it:\n{out}\n{err}"
    );
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, 997);
    assert_eq!(
        count(&c, "SELECT count(*) FROM backfill.skipped_keys").await,
        3,
        "the locked rows are recorded for their retry"
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, 1000);
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n > 1").await, 0);
    drop((c, holder));
    db.drop_db().await;
}

#[tokio::test]
async fn plan_status_and_verify_cannot_be_made_to_write() {
    let db = TestDb::new("ref_readonly").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT generate_series(1, 500);
         CREATE TABLE audit (at timestamptz DEFAULT now());
         -- A function that writes, called from every place a spec can put SQL.
         CREATE FUNCTION evil() RETURNS boolean LANGUAGE sql VOLATILE AS
           'INSERT INTO audit DEFAULT VALUES; DELETE FROM t WHERE id > 250; SELECT true';
         ANALYZE t;",
    )
    .await
    .unwrap();
    let spec = db.spec(
        "job.yaml",
        &format!(
            "postgres:
  url: {}
  table: t
  key: id
  where: evil() AND n = 0
  statement: UPDATE t SET n = n + 1 WHERE id = ANY($1) AND evil()
  verify: SELECT count(*) FROM t WHERE n = 0 AND evil()
throttle:
  query: SELECT evil()
",
            db.url
        ),
    );
    let before = checksum(&c, "t").await;
    for args in [
        vec!["plan"],
        vec!["plan", "--exact"],
        vec!["status"],
        vec!["status", "--json"],
        vec!["verify"],
    ] {
        let mut argv: Vec<&dyn AsRef<std::ffi::OsStr>> = args
            .iter()
            .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
            .collect();
        argv.push(&spec);
        let (code, out, err) = run(&argv);
        // verify runs its query read-only and fails on the function's write; status runs no
        // spec SQL; plan's sample batches run the statement in a transaction that is always
        // rolled back.
        if args[0] == "verify" {
            assert_ne!(code, 0, "{args:?} ran a writing function:\n{out}\n{err}");
            assert!(err.contains("read-only"), "{args:?}: {err}");
        }
        assert_eq!(checksum(&c, "t").await, before, "{args:?} changed rows");
        assert_eq!(
            count(&c, "SELECT count(*) FROM audit").await,
            0,
            "{args:?} wrote\n{out}\n{err}"
        );
        assert!(
            !common::store::has_store(&c).await,
            "{args:?} created the checkpoint store"
        );
    }
    drop(c);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_locked_by_another_session_is_named_not_blamed_on_the_spec() {
    let db = TestDb::new("ref_locked").await;
    let c = db.client().await;
    common::make_table(&c, 100).await;
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let spec = db.spec(
        "job.yaml",
        &job(
            &db.url,
            "t",
            "id",
            "n = 0",
            "UPDATE t SET n = 1 WHERE id = ANY($1)",
            "limits: {lock_timeout: 200ms}\n",
        ),
    );
    let (code, _, err) = run(&[&"run", &spec]);
    assert_eq!(code, 75, "{err}");
    assert!(err.contains("AccessExclusiveLock"), "{err}");
    let (code, _, err) = run(&[&"run", &"--ignore-preflight", &spec]);
    assert_eq!(code, 75, "{err}");
    assert!(err.contains("locked by another session"), "{err}");
    assert!(
        !err.contains("postgres.where:"),
        "the lock is not the where clause's fault: {err}"
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    drop((c, holder));
    db.drop_db().await;
}

#[tokio::test]
async fn several_jobs_report_the_healthy_ones_and_name_the_untried_ones() {
    let db = TestDb::new("ref_several").await;
    let c = db.client().await;
    common::make_table(&c, 300).await;
    let dir = db.dir.path().join("jobs");
    std::fs::create_dir(&dir).unwrap();
    let write = |name: &str, url: &str, statement: &str| {
        std::fs::write(dir.join(name), job(url, "t", "id", "", statement, "")).unwrap();
    };
    write(
        "0001_ok.yaml",
        &db.url,
        "UPDATE t SET n = n + 1 WHERE id = ANY($1)",
    );
    write(
        "0002_broken.yaml",
        &db.url,
        "UPDATE t SET n = 1 / 0 WHERE id = ANY($1)",
    );
    write(
        "0003_never.yaml",
        &db.url,
        "UPDATE t SET n = 5 WHERE id = ANY($1)",
    );
    let (code, out, err) = run(&[&"run", &dir]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("0001_ok: done"), "{out}");
    assert!(out.contains("0002_broken: FAILED"), "{out}");
    assert!(out.contains("1 run, 0 skipped, 1 failed"), "{out}");
    assert!(
        out.contains("not tried:") && out.contains("0003_never.yaml"),
        "{out}"
    );
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 5").await, 0);

    // One job's database is gone: status still shows the others.
    let missing = db.url.replace(&db.name, &format!("{}_missing", db.name));
    write(
        "0002_broken.yaml",
        &missing,
        "UPDATE t SET n = 1 WHERE id = ANY($1)",
    );
    let (code, out, err) = run(&[&"status", &dir]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("0001_ok  [done]"), "{out}");
    assert!(out.contains("0003_never  [pending]"), "{out}");
    assert!(
        out.contains("0002_broken") && out.contains("cannot read its store"),
        "{out}"
    );
    assert!(err.contains("does not exist"), "{err}");
    assert!(job_row(&c, "0001_ok").await.is_some());
    drop(c);
    db.drop_db().await;
}

/// A statement that sets the key moves rows where the walk goes next: `SET id = id + 100000`
/// walked every row again and again (sum(n) in the millions after a minute, never done), and
/// plan called it idempotent. Refused by `run` and `plan` before anything is written.
#[tokio::test]
async fn a_statement_that_moves_keys_is_refused() {
    let db = TestDb::new("ref_moves").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT g FROM generate_series(1, 1000) g;
         ANALYZE t;",
    )
    .await
    .unwrap();
    for (name, statement) in [
        (
            "moves",
            "UPDATE t SET id = id + 100000, n = n + 1 WHERE id = ANY($1)",
        ),
        (
            "moves_in_with",
            "WITH m AS (UPDATE public.t SET (n, id) = (n + 1, id + 100000) WHERE id = ANY($1) RETURNING id) SELECT count(*) FROM m",
        ),
    ] {
        let spec = db.spec(
            &format!("{name}.yaml"),
            &format!(
                "name: {name}\n{}",
                job(
                    &db.url,
                    "t",
                    "id",
                    "",
                    statement,
                    "limits: {max_runtime: 10s}\n"
                )
            ),
        );
        for command in ["run", "plan"] {
            let (code, out, err) = run(&[&command, &spec]);
            assert_eq!(code, 1, "{command} {name}:\n{out}\n{err}");
            assert!(
                err.contains("postgres.statement") && err.contains("sets the key column id"),
                "{command} {name}:\n{err}"
            );
        }
        assert_eq!(
            count(&c, "SELECT count(*) FROM t WHERE n = 0 AND id <= 1000").await,
            1000,
            "{name}: nothing written"
        );
    }
    drop(c);
    db.drop_db().await;
}

/// The name keys the checkpoint, and defaults to the spec file's stem: a finished INSERT job
/// whose file was renamed ran again from the first key under its new name and doubled every
/// row, exit 0. A new name for a spec the store already has is refused, naming the other job;
/// `--rerun` runs it knowingly.
#[tokio::test]
async fn a_renamed_spec_is_not_a_new_job() {
    let db = TestDb::new("ref_renamed").await;
    let (c, body) = copy_job(&db).await;
    let first = db.spec("copy_a.yaml", &body);
    let (code, out, err) = run(&[&"run", &first]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM dst").await, 1000);
    std::fs::remove_file(&first).unwrap();
    let renamed = db.spec("copy_b.yaml", &body);
    let (code, out, err) = run(&[&"run", &renamed]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("job copy_b is new") && err.contains("job copy_a (done)"),
        "{err}"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM dst").await,
        1000,
        "nothing doubled"
    );
    // Renamed and laid out anew, its table schema-qualified: the same spec all the same (it
    // was compared as written, so this one ran again from the first key).
    let laid_out = db.spec(
        "copy_c.yaml",
        &job(
            &db.url,
            "public.src",
            "id",
            "",
            "insert into dst\\n  select id from src   -- the batch's keys\\n   where id = any($1)",
            "",
        ),
    );
    let (code, out, err) = run(&[&"run", &laid_out]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("job copy_c is new") && err.contains("job copy_a (done)"),
        "{err}"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM dst").await,
        1000,
        "nothing doubled"
    );
    // Knowingly: every row once more.
    let (code, out, err) = run(&[&"run", &"--rerun", &renamed]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM dst").await, 2000);
    assert_eq!(count(&c, "SELECT count(DISTINCT id) FROM dst").await, 1000);
    drop(c);
    db.drop_db().await;
}

/// Each store keeps its own checkpoints: a finished INSERT job whose spec gained a
/// `state.schema` ran again from the first key in the new store and doubled every row, exit 0
/// (and next to the old runner, had it still been at work). The same spec recorded in another
/// store of the database is refused, naming the store; `--rerun` runs it knowingly.
#[tokio::test]
async fn a_spec_whose_state_schema_changed_is_not_a_new_job() {
    let db = TestDb::new("ref_moved").await;
    let (c, body) = copy_job(&db).await;
    // An application's own `jobs` and `ranges` tables, of other types, are not a store.
    c.batch_execute(
        "CREATE SCHEMA app;
         CREATE TABLE app.jobs (job bigint, status int, spec_hash bytea, walks int,
                                updated_at bigint);
         CREATE TABLE app.ranges (id int);",
    )
    .await
    .unwrap();
    let spec = db.spec("copy.yaml", &body);
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM dst").await, 1000);
    let spec = db.spec("copy.yaml", &format!("{body}state:\n  schema: moved\n"));
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("state.schema") && err.contains("job copy (done) in the store backfill"),
        "{err}"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM dst").await,
        1000,
        "nothing doubled"
    );
    // Knowingly: every row once more.
    let (code, out, err) = run(&[&"run", &"--rerun", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM dst").await, 2000);
    drop(c);
    db.drop_db().await;
}

/// A done job whose `table` was edited is skipped, and said to have changed (`--rerun` runs
/// it on the new table), while a statement laid out anew is the same spec: how the table is
/// spelled is left out of the hash only where twins are looked for.
#[tokio::test]
async fn a_done_job_whose_table_was_edited_is_said_to_have_changed() {
    let db = TestDb::new("ref_edited").await;
    let (c, body) = copy_job(&db).await;
    c.batch_execute(
        "CREATE TABLE src2 (id bigint PRIMARY KEY);
         INSERT INTO src2 SELECT g FROM generate_series(1, 10) g;",
    )
    .await
    .unwrap();
    let (code, out, err) = run(&[&"run", &db.spec("copy.yaml", &body)]);
    assert_eq!(code, 0, "{out}\n{err}");
    let laid_out = body.replace("INSERT INTO dst SELECT", "insert into dst\\n    select");
    assert_ne!(laid_out, body);
    let (code, out, err) = run(&[&"run", &db.spec("copy.yaml", &laid_out)]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("skipped") && !format!("{out}{err}").contains("spec changed"),
        "{out}\n{err}"
    );
    let edited = body.replace("table: src\n", "table: src2\n");
    assert_ne!(edited, body);
    let (code, out, err) = run(&[&"run", &db.spec("copy.yaml", &edited)]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("skipped") && format!("{out}{err}").contains("spec changed"),
        "{out}\n{err}"
    );
    assert_eq!(count(&c, "SELECT count(*) FROM dst").await, 1000);
    drop(c);
    db.drop_db().await;
}

/// A store last written by an earlier version: its `jobs` table has no `walks` column, and its
/// records carry the hash of the spec as written. Such a store was not read for twins at all,
/// so the same spec under `state.schema: moved` did every row again (2000 rows for 1000).
#[tokio::test]
async fn a_store_of_an_earlier_version_is_read_for_twins() {
    let db = TestDb::new("ref_oldstore").await;
    let (c, body) = copy_job(&db).await;
    let spec = db.spec("copy.yaml", &body);
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM dst").await, 1000);
    // As an earlier version left it: the hash of the spec's parts as written, no `walks`.
    let as_written = {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in ["postgres", "src", "id", "", COPY, "skip_locked"] {
            h.update(part.as_bytes());
            h.update([0u8]);
        }
        hex::encode(&h.finalize()[..8])
    };
    c.execute(
        "UPDATE backfill.jobs SET spec_hash = $1 WHERE job = 'copy'",
        &[&as_written],
    )
    .await
    .unwrap();
    c.batch_execute("ALTER TABLE backfill.jobs DROP COLUMN walks")
        .await
        .unwrap();
    let moved = db.spec("copy.yaml", &format!("{body}state:\n  schema: moved\n"));
    let (code, out, err) = run(&[&"run", &moved]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("state.schema") && err.contains("job copy (done) in the store backfill"),
        "{err}"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM dst").await,
        1000,
        "nothing doubled"
    );
    drop(c);
    db.drop_db().await;
}

/// A checkpoint is a position in one key of one table. Resumed with the spec's `key` (or
/// `table`) changed, the old cursor was cast to the new key: rows before it in the new order
/// were never done and rows after it were done twice, and the run ended 0. Now the resume is
/// refused before anything is written, the checkpoint kept; a reset starts over.
#[tokio::test]
async fn a_checkpoint_is_not_resumed_under_another_key_or_table() {
    let db = TestDb::new("rekey").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, k2 bigint UNIQUE NOT NULL, n int NOT NULL DEFAULT 0);
         INSERT INTO t SELECT g, 10001 - g, 0 FROM generate_series(1, 10000) g;
         CREATE TABLE t2 (LIKE t INCLUDING ALL);
         CREATE TABLE log (id bigint);
         CREATE TABLE knob (fail_at bigint);
         INSERT INTO knob VALUES (3001);",
    )
    .await
    .unwrap();
    let statement = "WITH u AS (UPDATE t SET n = n + 1 WHERE id = ANY($1) \
                     AND 1 / (CASE WHEN id = (SELECT fail_at FROM knob) THEN 0 ELSE 1 END) = 1 \
                     RETURNING id) INSERT INTO log SELECT id FROM u";
    let write = |table: &str, key: &str| {
        db.spec(
            "rekey.yaml",
            &format!(
                "name: rekey\n{}",
                job("$URL", table, key, "", statement, "")
            ),
        )
    };
    let spec = write("t", "id");
    let (code, _o, err) = run(&[&"run", &spec]);
    assert_eq!(code, 1, "the statement fails at id 3001:\n{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM log").await, 3000);
    c.execute("UPDATE knob SET fail_at = NULL", &[])
        .await
        .unwrap();
    let cursor = async || -> Option<String> {
        c.query_one(
            "SELECT cursor FROM backfill.ranges WHERE job = 'rekey'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    };
    assert_eq!(cursor().await.as_deref(), Some("3000"));

    for (table, key) in [("t", "k2"), ("t2", "id")] {
        let spec = write(table, key);
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 2, "{table} by {key}:\n{out}\n{err}");
        assert!(
            err.contains("cannot carry over") && err.contains("backfill reset"),
            "{err}"
        );
        assert!(err.contains("postgres.key"), "{err}");
        assert_eq!(
            count(&c, "SELECT count(*) FROM log").await,
            3000,
            "nothing written"
        );
        assert_eq!(cursor().await.as_deref(), Some("3000"), "checkpoint kept");
    }

    // The spec it started with (the same file, written back) resumes where it stopped: every
    // row once.
    let spec = write("t", "id");
    let (code, _o, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM log").await, 10_000);
    assert_eq!(
        count(&c, "SELECT count(DISTINCT id) FROM log").await,
        10_000
    );

    // A reset forgets the checkpoint; then the new key is walked from its start.
    let spec = write("t", "k2");
    let (code, _o, err) = run(&[&"reset", &spec, &"--yes"]);
    assert_eq!(code, 0, "{err}");
    let (code, _o, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n <> 2").await, 0);
    drop(c);
    db.drop_db().await;
}

/// A checkpoint is a position in the key's order, which its collation and operator family
/// give: a migration that changed the key column's collation (or its type to one that sorts
/// otherwise) between two runs of an unfinished job had the cursor compared in the new order,
/// and the resume ended done (exit 0) with rows never done and others done twice. Now such a
/// resume is refused before anything is written; a column widened in the same family (int to
/// bigint) resumes, and so does the column changed back.
#[tokio::test]
async fn a_checkpoint_is_not_resumed_once_the_keys_order_changed() {
    let db = TestDb::new("reorder").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (k text COLLATE \"C\" PRIMARY KEY);
         INSERT INTO t SELECT CASE WHEN g % 2 = 0 THEN upper(chr(97 + g % 26))
                                   ELSE chr(97 + (g / 2) % 26) END || md5(g::text)
           FROM generate_series(1, 3000) g;
         CREATE TABLE n (id int PRIMARY KEY);
         INSERT INTO n SELECT g FROM generate_series(1, 3000) g;
         CREATE TABLE ts (k timestamp PRIMARY KEY);
         INSERT INTO ts SELECT timestamp '2024-01-01' + g * interval '1 minute'
           FROM generate_series(1, 3000) g;
         CREATE TABLE log (k text);
         CREATE TABLE knob (fail_at text);
         INSERT INTO knob SELECT k FROM t ORDER BY k OFFSET 1500 LIMIT 1;
         ANALYZE;",
    )
    .await
    .unwrap();
    let logged = async || count(&c, "SELECT count(*) FROM log").await;
    let cursor = async |job: &str| -> Option<String> {
        c.query_one("SELECT cursor FROM backfill.ranges WHERE job = $1", &[&job])
            .await
            .unwrap()
            .get(0)
    };
    // Fails part-way (at the knob's key), keeping its checkpoint.
    let spec = |name: &str, table: &str, key: &str| {
        let statement = format!(
            "WITH u AS (SELECT {key}::text AS k FROM {table} WHERE {key} = ANY($1) \
             AND 1 / (CASE WHEN {key}::text = (SELECT fail_at FROM knob) THEN 0 ELSE 1 END) = 1) \
             INSERT INTO log SELECT k FROM u"
        );
        db.spec(
            &format!("{name}.yaml"),
            &format!(
                "name: {name}\n{}",
                job("$URL", table, key, "", &statement, "")
            ),
        )
    };
    let text = spec("text", "t", "k");
    let (code, _o, err) = run(&[&"run", &text]);
    assert_eq!(code, 1, "the statement fails at the knob's key:\n{err}");
    assert_eq!(logged().await, 1500);
    let at = cursor("text").await;
    c.batch_execute("ALTER TABLE t ALTER COLUMN k TYPE text COLLATE \"en-US-x-icu\"")
        .await
        .unwrap();
    c.execute("UPDATE knob SET fail_at = NULL", &[])
        .await
        .unwrap();
    let (code, out, err) = run(&[&"run", &text]);
    assert_eq!(code, 2, "resumed in another collation:\n{out}\n{err}");
    assert!(
        err.contains("cannot carry over") && err.contains("en-US-x-icu"),
        "{err}"
    );
    assert_eq!(logged().await, 1500, "nothing written");
    assert_eq!(cursor("text").await, at, "checkpoint kept");
    // The column as it was: resumed where it stopped, every row once.
    c.batch_execute("ALTER TABLE t ALTER COLUMN k TYPE text COLLATE \"C\"")
        .await
        .unwrap();
    let (code, out, err) = run(&[&"run", &text]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(logged().await, 3000);
    assert_eq!(count(&c, "SELECT count(DISTINCT k) FROM log").await, 3000);

    // An int key: widened to bigint it sorts the same and resumes; as text it would not.
    c.batch_execute("TRUNCATE log; UPDATE knob SET fail_at = '1501'")
        .await
        .unwrap();
    let ints = spec("ints", "n", "id");
    let (code, _o, err) = run(&[&"run", &ints]);
    assert_eq!(code, 1, "the statement fails at 1501:\n{err}");
    assert_eq!(logged().await, 1500);
    c.batch_execute("UPDATE knob SET fail_at = NULL; ALTER TABLE n ALTER COLUMN id TYPE text")
        .await
        .unwrap();
    let (code, out, err) = run(&[&"run", &ints]);
    assert_eq!(code, 2, "resumed as text:\n{out}\n{err}");
    assert!(err.contains("cannot carry over"), "{err}");
    assert_eq!(logged().await, 1500, "nothing written");
    c.batch_execute("ALTER TABLE n ALTER COLUMN id TYPE bigint USING id::bigint")
        .await
        .unwrap();
    let (code, out, err) = run(&[&"run", &ints]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(logged().await, 3000);
    assert_eq!(count(&c, "SELECT count(DISTINCT k) FROM log").await, 3000);

    // timestamp to timestamptz sorts alike (one operator family), but the values moved by the
    // offset of the session that changed the column: the cursor's text means another instant.
    c.batch_execute(
        "TRUNCATE log;
         UPDATE knob SET fail_at = (SELECT k::text FROM ts ORDER BY k OFFSET 1500 LIMIT 1)",
    )
    .await
    .unwrap();
    let stamps = spec("stamps", "ts", "k");
    let (code, _o, err) = run(&[&"run", &stamps]);
    assert_eq!(code, 1, "the statement fails at the knob's stamp:\n{err}");
    assert_eq!(logged().await, 1500);
    c.batch_execute(
        "UPDATE knob SET fail_at = NULL; SET TimeZone = 'America/New_York';
         ALTER TABLE ts ALTER COLUMN k TYPE timestamptz",
    )
    .await
    .unwrap();
    let (code, out, err) = run(&[&"run", &stamps]);
    assert_eq!(code, 2, "resumed as timestamptz:\n{out}\n{err}");
    assert!(err.contains("cannot carry over"), "{err}");
    assert_eq!(logged().await, 1500, "nothing written");
    c.batch_execute("ALTER TABLE ts ALTER COLUMN k TYPE timestamp; RESET TimeZone")
        .await
        .unwrap();
    let (code, out, err) = run(&[&"run", &stamps]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(logged().await, 3000);
    assert_eq!(count(&c, "SELECT count(DISTINCT k) FROM log").await, 3000);
    drop(c);
    db.drop_db().await;
}

/// The same table is the same table under another search_path: a checkpoint records the table
/// schema-qualified. It recorded the name as `regclass::text` prints it, without the schema
/// when the schema is on the search_path, so a resume under another search_path was refused
/// as if it walked another table.
#[tokio::test]
async fn a_checkpoint_resumes_under_another_search_path() {
    let db = TestDb::new("rekey_path").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE SCHEMA s;
         CREATE TABLE s.t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO s.t SELECT g, 0 FROM generate_series(1, 1000) g;
         CREATE TABLE public.knob (fail_at bigint);
         INSERT INTO public.knob VALUES (501);",
    )
    .await
    .unwrap();
    let statement = "UPDATE s.t SET n = n + 1 WHERE id = ANY($1) \
                     AND 1 / (CASE WHEN id = (SELECT fail_at FROM public.knob) THEN 0 ELSE 1 END) = 1";
    let write = |url: &str| {
        db.spec(
            "path.yaml",
            &format!("name: path\n{}", job(url, "s.t", "id", "", statement, "")),
        )
    };
    let (code, _o, err) = run(&[&"run", &write("$URL")]);
    assert_eq!(code, 1, "the statement fails at id 501:\n{err}");
    c.execute("UPDATE public.knob SET fail_at = NULL", &[])
        .await
        .unwrap();
    let url = format!("{}?options=-c%20search_path%3Ds,public", db.url);
    let (code, out, err) = run(&[&"run", &write(&url)]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM s.t WHERE n <> 1").await, 0);
    drop(c);
    db.drop_db().await;
}

/// A store written before the `walks` column (an upgrade from an older release) is still the
/// job's store for every command that only reads or deletes: `status` shows the checkpoint,
/// `reset` deletes it. An earlier check for the newest column made such a store invisible
/// until something wrote to it: `status` said "no checkpoint yet", `reset` deleted nothing
/// and said so, and `run --rerun` of a finished job did nothing.
#[tokio::test]
async fn a_store_from_before_the_walks_column_is_still_read_and_reset() {
    let db = TestDb::new("oldstore").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t SELECT g, 0 FROM generate_series(1, 5000) g;
         CREATE TABLE knob (fail_at bigint);
         INSERT INTO knob VALUES (2001);",
    )
    .await
    .unwrap();
    let statement = "UPDATE t SET n = n + 1 WHERE id = ANY($1) \
                     AND 1 / (CASE WHEN id = (SELECT fail_at FROM knob) THEN 0 ELSE 1 END) = 1";
    let spec = db.spec(
        "old.yaml",
        &format!("name: old\n{}", job("$URL", "t", "id", "", statement, "")),
    );
    let (code, _o, err) = run(&[&"run", &spec]);
    assert_eq!(code, 1, "{err}");
    c.batch_execute("ALTER TABLE backfill.jobs DROP COLUMN walks; UPDATE knob SET fail_at = NULL")
        .await
        .unwrap();

    let (code, out, err) = run(&[&"status", &spec]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("no checkpoint yet"), "{out}");
    assert!(out.contains("2000"), "status shows the checkpoint: {out}");

    // The next run upgrades the store in place and resumes: every row once.
    let (code, _o, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n <> 1").await, 0);
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM information_schema.columns
              WHERE table_schema = 'backfill' AND table_name = 'jobs' AND column_name = 'walks'"
        )
        .await,
        1
    );

    // Old again, and finished: reset deletes its checkpoint, and the next run starts over.
    c.batch_execute("ALTER TABLE backfill.jobs DROP COLUMN walks")
        .await
        .unwrap();
    let (code, out, err) = run(&[&"reset", &spec, &"--yes"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("no checkpoint to delete"), "{out}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM backfill.ranges WHERE job = 'old'").await,
        0
    );
    let (code, _o, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n <> 2").await, 0);
    drop(c);
    db.drop_db().await;
}
