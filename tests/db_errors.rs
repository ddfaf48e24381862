//! Database problems end with an actionable message and the right exit code, never show a
//! password, and leave the checkpoint as it was.

mod common;
use common::cluster::{ClusterOpts, PgCluster};
use common::store::{has_store, job_record};
use common::{TestDb, admin_url, connect, count, run};
use tokio_postgres::Client;

const SECRET: &str = "wrong-secret-123";

/// `t (id bigint PRIMARY KEY, name text, x int, n int)` with ids 1..=rows.
async fn make_table(c: &Client, rows: i64) {
    c.batch_execute(&format!(
        "CREATE TABLE t (id bigint PRIMARY KEY, name text NOT NULL, x int, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id, name) SELECT i, 'name ' || i FROM generate_series(1, {rows}) i;
         ANALYZE t;"
    ))
    .await
    .expect("create t");
}

fn job_yaml(url: &str, table: &str, key: &str, extra: &str, statement: &str) -> String {
    format!(
        "postgres:
  url: {url}
  table: {table}
  key: {key}
{extra}  statement: {statement}
batch: {{size: 100, target: 0}}
"
    )
}

fn url_with(db: &TestDb, userinfo: &str, hostport: &str) -> String {
    format!("postgres://{userinfo}@{hostport}/{}", db.name)
}

#[tokio::test]
async fn wrong_password_is_refused_and_never_shown() {
    // A private cluster whose pg_hba.conf checks role bf_pwtest's password (scram-sha-256) while
    // user postgres stays trust.
    let pg =
        PgCluster::start(ClusterOpts::new().password_role("bf_pwtest", "right-password")).await;
    let db = pg.create_db("dbe_pw").await;
    let c = db.client().await;
    make_table(&c, 500).await;

    // A finished checkpoint under the same job name, written with the right credentials.
    let good = db.spec(
        "job.yaml",
        &job_yaml(
            "$URL",
            "t",
            "id",
            "",
            "UPDATE t SET n = n + 1 WHERE id = ANY($1)",
        ),
    );
    let (code, out, err) = run(&[&"run", &good]);
    assert_eq!(code, 0, "{out}\n{err}");
    let before = job_record(&c, "job").await;
    assert!(before.is_some());
    let table_before = common::checksum(&c, "t").await;

    // The role and its rule are really there: the right password gets in.
    let right = url_with(&db, "bf_pwtest:right-password", &pg.host_port());
    let (ok, conn) = tokio_postgres::connect(&right, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("bf_pwtest with the right password: {e}"));
    drop(ok);
    let _ = conn.await;

    let url = url_with(&db, &format!("bf_pwtest:{SECRET}"), &pg.host_port());
    let spec = db.spec(
        "job.yaml",
        &job_yaml(
            &url,
            "t",
            "id",
            "",
            "UPDATE t SET n = n + 1 WHERE id = ANY($1)",
        ),
    );
    for cmd in ["run", "plan", "status"] {
        let (code, out, err) = run(&[&cmd, &spec]);
        assert_eq!(code, 1, "{cmd}: exit code\nstdout:\n{out}\nstderr:\n{err}");
        assert!(
            !out.contains(SECRET) && !err.contains(SECRET),
            "{cmd}: the password was printed\nstdout:\n{out}\nstderr:\n{err}"
        );
        assert!(
            err.contains("password authentication failed"),
            "{cmd}: want the server's reason\n{err}"
        );
        assert!(
            err.contains("bf_pwtest:***@"),
            "{cmd}: want the redacted URL\n{err}"
        );
        // A refused login is reported at once: the first contact is never retried.
        assert!(
            !err.contains("retrying"),
            "{cmd}: retried a refused login\n{err}"
        );
    }
    // `validate` never connects, but must not echo it either.
    let (code, out, err) = run(&[&"validate", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        !out.contains(SECRET) && !err.contains(SECRET),
        "{out}\n{err}"
    );

    assert_eq!(job_record(&c, "job").await, before, "checkpoint changed");
    assert_eq!(common::checksum(&c, "t").await, table_before);
    drop(c);
    db.drop_db().await;
}

#[tokio::test]
async fn unreachable_database() {
    let db = TestDb::new("dbe_unreach").await;
    // Port 1: nothing listens there, the connection is refused at once.
    let url = url_with(&db, "postgres:pw-unreach-9", "127.0.0.1:1");
    let spec = db.spec(
        "job.yaml",
        &job_yaml(&url, "t", "id", "", "UPDATE t SET n = 1 WHERE id = ANY($1)"),
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("cannot connect"), "{err}");
    assert!(
        !err.contains("retrying"),
        "the first contact is never retried:\n{err}"
    );
    let redacted = format!("postgres://postgres:***@127.0.0.1:1/{}", db.name);
    assert!(err.contains(&redacted), "want {redacted} in:\n{err}");
    assert!(
        !out.contains("pw-unreach-9") && !err.contains("pw-unreach-9"),
        "{out}\n{err}"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn database_that_does_not_exist() {
    let db = TestDb::new("dbe_nodb").await;
    let missing = format!("{}_missing", db.name);
    // The same server as the test database (BACKFILL_TEST_PG), another database name.
    let server = db.url.rsplit_once('/').expect("db url has a path").0;
    let url = format!("{server}/{missing}");
    let spec = db.spec(
        "job.yaml",
        &job_yaml(&url, "t", "id", "", "UPDATE t SET n = 1 WHERE id = ANY($1)"),
    );
    for cmd in ["run", "plan", "status"] {
        let (code, out, err) = run(&[&cmd, &spec]);
        assert_eq!(code, 1, "{cmd}\nstdout:\n{out}\nstderr:\n{err}");
        assert!(err.contains("cannot connect"), "{cmd}: {err}");
        assert!(
            err.contains(&format!("database \"{missing}\" does not exist")),
            "{cmd}: want the server's reason naming the database\n{err}"
        );
        assert!(err.contains("database name"), "{cmd}: want the hint\n{err}");
    }
    let admin = connect(&admin_url()).await;
    assert_eq!(
        count(
            &admin,
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{missing}'")
        )
        .await,
        0,
        "the database must not be created"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn url_without_a_database_name() {
    // Without a path the server would pick a database named after the user (here the admin
    // `postgres` database): a backfill must not land in a database nobody named.
    let db = TestDb::new("dbe_nodbname").await;
    let server = db
        .url
        .rsplit_once('/')
        .map(|(server, _)| server.to_string())
        .expect("db url has a path");
    let table = format!("{}_t", db.name);
    let spec = db.spec(
        "job.yaml",
        &job_yaml(
            &server,
            &table,
            "id",
            "",
            "UPDATE t SET n = 1 WHERE id = ANY($1)",
        ),
    );
    for cmd in ["run", "plan"] {
        let (code, out, err) = run(&[&cmd, &spec]);
        assert!(
            code == 1 || code == 2,
            "{cmd}: exit code {code}\nstdout:\n{out}\nstderr:\n{err}"
        );
        assert!(
            err.contains("postgres.url") && err.contains("database name"),
            "{cmd}: want a message saying postgres.url names no database, got:\n{err}"
        );
    }
    db.drop_db().await;
}

/// Run `yaml` (with `$URL`) on a db holding `t`; it must be refused before any write with exit 1
/// and a message containing each of `want`.
async fn refused(hint: &str, yaml: &str, want: &[&str]) {
    let db = TestDb::new(hint).await;
    let c = db.client().await;
    make_table(&c, 300).await;
    let before = common::checksum(&c, "t").await;
    let spec = db.spec("job.yaml", yaml);
    for cmd in ["run", "plan"] {
        let (code, out, err) = run(&[&cmd, &spec]);
        assert_eq!(code, 1, "{cmd}: exit code\nstdout:\n{out}\nstderr:\n{err}");
        for w in want {
            assert!(err.contains(w), "{cmd}: want {w:?} in stderr:\n{err}");
        }
        assert!(
            !has_store(&c).await,
            "{cmd}: the checkpoint store was created"
        );
        assert_eq!(
            common::checksum(&c, "t").await,
            before,
            "{cmd}: rows changed"
        );
    }
    drop(c);
    db.drop_db().await;
}

#[tokio::test]
async fn missing_table() {
    refused(
        "dbe_notable",
        &job_yaml(
            "$URL",
            "public.no_such_table",
            "id",
            "",
            "UPDATE t SET n = 1 WHERE id = ANY($1)",
        ),
        &["postgres.table", "public.no_such_table", "does not exist"],
    )
    .await;
}

#[tokio::test]
async fn missing_key_column() {
    refused(
        "dbe_nokey",
        &job_yaml(
            "$URL",
            "t",
            "no_such_col",
            "",
            "UPDATE t SET n = 1 WHERE id = ANY($1)",
        ),
        &["postgres.key", "no_such_col", "does not exist"],
    )
    .await;
}

#[tokio::test]
async fn where_referencing_a_missing_column() {
    refused(
        "dbe_where",
        &job_yaml(
            "$URL",
            "t",
            "id",
            "  where: no_such_col IS NULL\n",
            "UPDATE t SET n = 1 WHERE id = ANY($1)",
        ),
        &["postgres.where", "column \"no_such_col\" does not exist"],
    )
    .await;
}

#[tokio::test]
async fn statement_with_a_syntax_error() {
    refused(
        "dbe_syntax",
        &job_yaml(
            "$URL",
            "t",
            "id",
            "",
            "UPDATE t SETT n = 1 WHERE id = ANY($1)",
        ),
        &["postgres.statement", "syntax error at or near"],
    )
    .await;
}

#[tokio::test]
async fn statement_using_keys_as_the_wrong_type() {
    // $1 compared with a text column while the key is bigint: $1 would be text[].
    refused(
        "dbe_type",
        &job_yaml(
            "$URL",
            "t",
            "id",
            "",
            "UPDATE t SET n = 1 WHERE name = ANY($1)",
        ),
        &["postgres.statement", "text[]", "must be bigint[]"],
    )
    .await;
}

#[tokio::test]
async fn statement_failing_mid_run_keeps_the_last_committed_batch() {
    let db = TestDb::new("dbe_midrun").await;
    let c = db.client().await;
    make_table(&c, 10_000).await;
    let yaml = |statement: &str| {
        format!(
            "postgres:
  url: $URL
  table: t
  key: id
  statement: {statement}
batch: {{size: 1000, target: 0}}
"
        )
    };
    let spec = db.spec(
        "job.yaml",
        &yaml("UPDATE t SET x = 100 / (id - 5000), n = n + 1 WHERE id = ANY($1)"),
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("division by zero"), "{err}");
    assert!(out.contains("job: FAILED"), "{out}");

    // Batches 1..=4 committed with their checkpoint; batch 5 (4001..=5000) rolled back whole.
    let row = c
        .query_one(
            &format!(
                "SELECT status, cursor, keys_done, rows_done, batches_done, last_error
               FROM {} WHERE job = 'job'",
                common::store::JOB_VIEW
            ),
            &[],
        )
        .await
        .expect("job record");
    assert_eq!(row.get::<_, &str>(0), "failed");
    assert_eq!(row.get::<_, Option<&str>>(1), Some("4000"), "cursor");
    assert_eq!(row.get::<_, i64>(2), 4000, "keys_done");
    assert_eq!(row.get::<_, i64>(3), 4000, "rows_done");
    assert_eq!(row.get::<_, i64>(4), 4, "batches_done");
    let last_error: Option<String> = row.get(5);
    assert!(
        last_error
            .as_deref()
            .is_some_and(|e| e.contains("division by zero")),
        "last_error: {last_error:?}"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE id <= 4000 AND n = 1").await,
        4000
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE id <= 4000 AND n <> 1").await,
        0
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE id > 4000 AND n <> 0").await,
        0
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM t WHERE x IS NOT NULL AND id > 4000"
        )
        .await,
        0
    );

    // A spec that is refused by preflight leaves the failed checkpoint exactly as it was.
    let failed = job_record(&c, "job").await;
    db.spec(
        "job.yaml",
        &yaml("UPDATE t SET x = 100 / NULLIF(id - 5000, 0), n = n + 1 WHERE idd = ANY($1)"),
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("postgres.statement"), "{err}");
    assert_eq!(
        job_record(&c, "job").await,
        failed,
        "refused run changed the checkpoint"
    );

    // Fixed: resumes after 4000 with a warning that the spec changed, and finishes.
    db.spec(
        "job.yaml",
        &yaml("UPDATE t SET x = 100 / NULLIF(id - 5000, 0), n = n + 1 WHERE id = ANY($1)"),
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("spec changed"),
        "want the spec-changed warning in:\n{err}"
    );
    assert!(err.contains("key 4000"), "want where it resumed in:\n{err}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n = 1").await,
        10_000
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE x IS NULL").await,
        1,
        "only id 5000"
    );
    let row = c
        .query_one(
            &format!(
                "SELECT status, cursor, keys_done, last_error FROM {} WHERE job = 'job'",
                common::store::JOB_VIEW
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "done");
    assert_eq!(row.get::<_, Option<&str>>(1), Some("10000"));
    assert_eq!(row.get::<_, i64>(2), 10_000);
    assert_eq!(
        row.get::<_, Option<&str>>(3),
        None,
        "last_error cleared when done"
    );
    drop(c);
    db.drop_db().await;
}
