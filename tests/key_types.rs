//! Every key type the keyset walk supports: many small batches, so the cursor goes through its
//! text form (and back into the key's type) hundreds of times, and every row is updated once.

mod common;
use common::{TestDb, count, run};

/// Batch size that divides none of the row counts below: the last batch is a partial one.
const SIZE: i64 = 37;

/// Create `t (k <coltype> PRIMARY KEY, n int)` filled from `values` (a SELECT of one column),
/// run a job that increments `n` by key, and check the result. Returns the number of rows.
async fn check_key_type(hint: &str, coltype: &str, values: &str) -> i64 {
    let db = TestDb::new(hint).await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE t (k {coltype} PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (k) SELECT v FROM ({values}) s(v);
         ANALYZE t;"
    ))
    .await
    .unwrap_or_else(|e| panic!("setup for {coltype}: {e:?}"));
    let rows = count(&c, "SELECT count(*) FROM t").await;
    assert!(rows > 1000, "{coltype}: setup made only {rows} rows");

    let spec = db.spec(
        "job.yaml",
        &format!(
            "postgres:
  url: $URL
  table: t
  key: k
  statement: UPDATE t SET n = n + 1 WHERE k = ANY($1)
batch: {{size: {SIZE}, target: 0}}
"
        ),
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(
        code, 0,
        "{coltype}: run failed\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(out.contains("1 run, 0 skipped"), "{coltype}: {out}");

    // Every row exactly once: none skipped (n = 0), none twice (n > 1).
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n = 0").await,
        0,
        "{coltype}: rows never updated"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE n > 1").await,
        0,
        "{coltype}: rows updated twice"
    );
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, rows);

    let job = c
        .query_one(
            &format!("SELECT status, keys_done, rows_done, batches_done, cursor FROM {} WHERE job = 'job'", common::store::JOB_VIEW),
            &[],
        )
        .await
        .expect("job record");
    assert_eq!(job.get::<_, &str>(0), "done", "{coltype}");
    assert_eq!(job.get::<_, i64>(1), rows, "{coltype}: keys_done");
    assert_eq!(job.get::<_, i64>(2), rows, "{coltype}: rows_done");
    assert_eq!(
        job.get::<_, i64>(3),
        (rows + SIZE - 1) / SIZE,
        "{coltype}: batches_done"
    );
    // The cursor's text form reads back as the largest key.
    let cursor: String = job.get(4);
    let same: bool = c
        .query_one(
            &format!("SELECT $1::text::{coltype} = (SELECT k FROM t ORDER BY k DESC LIMIT 1)"),
            &[&cursor],
        )
        .await
        .unwrap_or_else(|e| panic!("{coltype}: cursor {cursor:?} does not read back: {e:?}"))
        .get(0);
    assert!(same, "{coltype}: cursor {cursor:?} is not the largest key");
    assert_eq!(
        count(&c, "SELECT count(*) FROM backfill.skipped_keys").await,
        0
    );

    // A second run has nothing to do.
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{coltype}: second run\n{out}\n{err}");
    assert!(out.contains("0 run, 1 skipped"), "{coltype}: {out}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n = 1").await, rows);

    drop(c);
    db.drop_db().await;
    rows
}

#[tokio::test]
async fn integer_key() {
    // Negative, zero and positive keys, with gaps.
    check_key_type(
        "kt_int",
        "integer",
        "SELECT i * 3 FROM generate_series(-1500, 1500) i
         UNION ALL SELECT v FROM (VALUES (2147483647), (-2147483648)) x(v)",
    )
    .await;
}

#[tokio::test]
async fn bigint_key() {
    // Values far outside the int4 range, on both sides.
    check_key_type(
        "kt_bigint",
        "bigint",
        "SELECT i * 4294967311 FROM generate_series(-1200, 1200) i
         UNION ALL SELECT v FROM (VALUES (9223372036854775807), (-9223372036854775808)) x(v)",
    )
    .await;
}

#[tokio::test]
async fn uuid_key() {
    check_key_type(
        "kt_uuid",
        "uuid",
        "SELECT gen_random_uuid() FROM generate_series(1, 2500)
         UNION ALL SELECT v::uuid FROM (VALUES ('00000000-0000-0000-0000-000000000000'),
                                             ('ffffffff-ffff-ffff-ffff-ffffffffffff')) x(v)",
    )
    .await;
}

#[tokio::test]
async fn text_key_with_icu_collation() {
    // An ICU collation orders 'a' < 'B' < 'b' (case-insensitive first), unlike the database's
    // byte-order default: a cursor compared in the wrong collation skips or repeats rows.
    // Plus values that are awkward in text and array literals.
    let rows = check_key_type(
        "kt_text",
        "text COLLATE \"en-x-icu\"",
        "SELECT (CASE i % 5 WHEN 0 THEN 'a' WHEN 1 THEN 'B' WHEN 2 THEN 'b' WHEN 3 THEN 'A' ELSE '_' END)
                || i || (CASE WHEN i % 2 = 0 THEN upper(md5(i::text)) ELSE md5(i::text) END)
           FROM generate_series(1, 2500) i
         UNION ALL SELECT v FROM (VALUES (''), (' '), ('NULL'), ('null'), ('a,b'), ('{x}'),
             ('q\"uote'), ('back\\slash'), ('it''s'), ('Ärger'), ('arger'), ('Zebra'), ('zebra'),
             ('10'), ('9'), ('éa'), ('ea'), ('🎉 party'), (E'tab\\tin')) x(v)",
    )
    .await;
    assert_eq!(rows, 2519);
}

#[tokio::test]
async fn timestamptz_key() {
    // Microsecond steps, local times in zones with odd offsets (+05:30, +12:45, DST), literal
    // offsets, years before 1000 and BC, and the infinities. '2500-01-01 BC' is the smallest
    // finite key but its text sorts after the 2024 keys of the same batch.
    check_key_type(
        "kt_tstz",
        "timestamptz",
        "SELECT (timestamp '2024-03-09 22:00:00.000001' + i * interval '17 minutes 3.000007 seconds')
                AT TIME ZONE (ARRAY['UTC', 'Asia/Kolkata', 'America/New_York', 'Pacific/Chatham',
                                    'Asia/Kathmandu'])[1 + i % 5]
           FROM generate_series(0, 2999) i
         UNION ALL SELECT v::timestamptz FROM (VALUES
             ('2030-06-01 12:00:00.123456+05:45'), ('2030-06-01 12:00:00.123457-03:30'),
             ('2030-06-01 12:00:00.123458+14'), ('0999-12-31 23:59:59.999999+00'),
             ('0044-03-15 12:00:00+00 BC'), ('2500-01-01 00:00:00+00 BC'), ('infinity'),
             ('-infinity')) x(v)",
    )
    .await;
}

#[tokio::test]
async fn date_key() {
    check_key_type(
        "kt_date",
        "date",
        "SELECT date '1999-12-01' + i FROM generate_series(-1500, 1500) i
         UNION ALL SELECT v::date FROM (VALUES ('0001-01-01 BC'), ('4000-01-01 BC'), ('9999-12-31'),
                                              ('infinity'), ('-infinity')) x(v)",
    )
    .await;
}

#[tokio::test]
async fn numeric_key() {
    // High scale, negatives, and NaN (which sorts above every number).
    check_key_type(
        "kt_numeric",
        "numeric",
        "SELECT round(i::numeric / 7, 20) FROM generate_series(-1500, 1500) i
         UNION ALL SELECT v::numeric FROM (VALUES ('12345678901234567890.123456789012345678'),
                                                 ('-0.000000000000000000001'), ('NaN')) x(v)",
    )
    .await;
}

#[tokio::test]
async fn double_precision_key() {
    // Needs the shortest exact text form (extra_float_digits) to come back as the same value.
    check_key_type(
        "kt_float8",
        "double precision",
        "SELECT i * 0.1 + 1e-9 * i FROM generate_series(-1500, 1500) i
         UNION ALL SELECT v::float8 FROM (VALUES ('1.7976931348623157e308'), ('5e-324'),
                                                 ('Infinity'), ('-Infinity'), ('NaN')) x(v)",
    )
    .await;
}

#[tokio::test]
async fn key_without_unique_index_is_refused() {
    let db = TestDb::new("kt_nounique").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (k bigint NOT NULL, n int NOT NULL DEFAULT 0);
         CREATE INDEX t_k ON t (k);
         INSERT INTO t (k) SELECT i FROM generate_series(1, 100) i;",
    )
    .await
    .unwrap();
    let spec = db.spec(
        "job.yaml",
        "postgres:
  url: $URL
  table: t
  key: k
  statement: UPDATE t SET n = n + 1 WHERE k = ANY($1)
batch: {size: 10, target: 0}
",
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("postgres.key"), "{err}");
    assert!(err.contains("unique"), "{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n <> 0").await, 0);
    let store: Option<String> = c
        .query_one("SELECT to_regnamespace('backfill')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        store, None,
        "a refused job must not create the checkpoint store"
    );

    // A unique index on a partial set of rows does not count either.
    c.batch_execute("CREATE UNIQUE INDEX t_k_part ON t (k) WHERE k > 50")
        .await
        .unwrap();
    let (code, _, err) = run(&[&"run", &spec]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("postgres.key") && err.contains("unique"),
        "{err}"
    );

    // Nor does a unique index over more than the key.
    c.batch_execute("DROP INDEX t_k_part; CREATE UNIQUE INDEX t_k_n ON t (k, n)")
        .await
        .unwrap();
    let (code, _, err) = run(&[&"run", &spec]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("postgres.key") && err.contains("unique"),
        "{err}"
    );
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n <> 0").await, 0);

    drop(c);
    db.drop_db().await;
}

/// A key unique only by an index that orders it otherwise than the column (another collation,
/// another operator class) is refused before anything is written. Under a case-insensitive
/// column collation, such an index held `k0004` and `K0004` apart while the walk (`key >
/// cursor`, in the column's collation) took them for equal: a batch that ended on one passed
/// over the other, and 125 of 1000 rows were never touched, the job done with exit 0. Under a
/// deterministic collation nothing was lost, but no index served the walk's order: a sort of
/// the whole range per batch.
#[tokio::test]
async fn a_key_unique_only_in_another_ordering_is_refused() {
    let db = TestDb::new("kt_collation").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
         CREATE TABLE t (k text COLLATE ci NOT NULL, n int NOT NULL DEFAULT 0);
         CREATE UNIQUE INDEX t_k_c ON t (k COLLATE \"C\");
         INSERT INTO t (k) SELECT 'k' || lpad(g::text, 4, '0') FROM generate_series(1, 500) g;
         INSERT INTO t (k) SELECT 'K' || lpad(g::text, 4, '0') FROM generate_series(1, 500) g;
         CREATE TABLE u (k text COLLATE \"en-x-icu\" NOT NULL, n int NOT NULL DEFAULT 0);
         CREATE UNIQUE INDEX u_k_pattern ON u (k text_pattern_ops);
         INSERT INTO u (k) SELECT 'k' || g FROM generate_series(1, 100) g;
         CREATE EXTENSION citext;
         CREATE TABLE v (k citext NOT NULL, n int NOT NULL DEFAULT 0);
         CREATE UNIQUE INDEX v_k_text ON v (k text_ops);
         INSERT INTO v (k) SELECT unnest(ARRAY['a', 'A', 'b', 'B', 'c', 'C', 'd', 'D']);",
    )
    .await
    .unwrap();
    // citext's own ordering is case-blind; a unique index by text's (its default operator
    // class, but text's) held 'a' and 'A' apart.
    for (table, index) in [
        ("t", "t_k_c (COLLATE \"C\""),
        ("u", "operator class text_pattern_ops"),
        (
            "v",
            "v_k_text (COLLATE \"default\", operator class text_ops)",
        ),
    ] {
        let spec = db.spec(
            "job.yaml",
            &format!(
                "postgres:
  url: $URL
  table: {table}
  key: k
  statement: UPDATE {table} SET n = n + 1 WHERE k COLLATE \"C\" = ANY($1::text[] COLLATE \"C\")
batch: {{size: 7, target: 0}}
"
            ),
        );
        let (code, out, err) = run(&[&"run", &spec]);
        assert_eq!(code, 1, "{table}: {out}{err}");
        assert!(
            err.contains("postgres.key") && err.contains(index),
            "{table}: {err}"
        );
        assert!(err.contains("orders it otherwise"), "{table}: {err}");
        let written = count(&c, &format!("SELECT count(*) FROM {table} WHERE n <> 0")).await;
        assert_eq!(written, 0, "{table}");
    }
    // With a unique index in the column's own ordering beside it, the walk has one to use.
    c.batch_execute("CREATE UNIQUE INDEX u_k ON u (k)")
        .await
        .unwrap();
    let spec = db.spec(
        "job.yaml",
        "postgres:
  url: $URL
  table: u
  key: k
  statement: UPDATE u SET n = n + 1 WHERE k = ANY($1)
batch: {size: 7, target: 0}
",
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(count(&c, "SELECT count(*) FROM u WHERE n = 1").await, 100);
    drop(c);
    db.drop_db().await;
}

/// Tables inheriting from the job's table can repeat its keys (a unique index holds in one
/// table): the job is refused before anything is written, naming a child. Before, the run
/// failed reading the key's histogram (`pg_stats` has a row for the parent alone and one for
/// the whole tree). A declaratively partitioned table, whose unique index holds across its
/// partitions, runs with several workers, every row once.
#[tokio::test]
async fn inheritance_is_refused_and_partitions_run() {
    let db = TestDb::new("kt_inherit").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         CREATE TABLE tc (PRIMARY KEY (id)) INHERITS (t);
         INSERT INTO t (id) SELECT g FROM generate_series(1, 1500) g;
         INSERT INTO tc (id) SELECT g FROM generate_series(1001, 3000) g;
         ANALYZE t; ANALYZE tc;
         CREATE TABLE p (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0) PARTITION BY RANGE (id);
         CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (1000);
         CREATE TABLE p2 PARTITION OF p FOR VALUES FROM (1000) TO (100000);
         INSERT INTO p (id) SELECT g FROM generate_series(1, 3000) g;
         ANALYZE p;
         CREATE TABLE dst (id bigint);",
    )
    .await
    .unwrap();
    let spec = |table: &str| {
        db.spec(
            &format!("{table}.yaml"),
            &format!(
                "name: inherit-{table}
postgres:
  url: $URL
  table: {table}
  key: id
  statement: INSERT INTO dst SELECT id FROM {table} WHERE id = ANY($1)
workers: 3
batch: {{size: 100, target: 0}}
"
            ),
        )
    };
    let (code, out, err) = run(&[&"run", &"--workers", &"3", &spec("t")]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("postgres.table") && err.contains("inheriting") && err.contains("tc"),
        "{err}"
    );
    assert_eq!(count(&c, "SELECT count(*) FROM dst").await, 0);
    let (code, out, err) = run(&[&"run", &"--workers", &"3", &spec("p")]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM (SELECT DISTINCT id FROM dst) d").await,
        3000
    );
    assert_eq!(count(&c, "SELECT count(*) FROM dst").await, 3000);
    drop(c);
    db.drop_db().await;
}
