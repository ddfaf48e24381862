//! `postgres.where` is ONE boolean expression. Checked on the real server: what `validate`
//! accepts is valid Postgres, and spliced as `spec::where_sql` wraps it, what the engine appends
//! (`AND <its own condition>`) still applies, trailing `-- comment` or not. What `validate`
//! refuses would have escaped a naive `WHERE (<where>)` splice; through the binary it exits 2
//! naming the field and line.

mod common;
use backfill::spec::{check_where, where_sql};
use common::{TestDb, run};

const ACCEPTED: &[&str] = &[
    "entry_type = 'track' AND dj_name IS NULL",
    "id::text <> '' AND created_at::date >= '2024-01-01'",
    "a IS DISTINCT FROM b",
    "name ILIKE 'abc%'",
    "name ~ '^abc' AND name !~* 'y'",
    "status = ANY(ARRAY['a', 'b'])",
    "payload->>'kind' = 'x' AND payload->'a' IS NOT NULL",
    "n BETWEEN 1 AND 10",
    "owner_id IN (SELECT id FROM users WHERE active)",
    "lower(name) = 'abc1' AND coalesce(n, 0) >= 1",
    "created_at < now() - interval '1 day'",
    "EXISTS (SELECT 1 FROM users u WHERE u.id = owner_id)",
    "true -- every row",
    "n >= 0 /* block */ -- and a line comment",
    "name <> 'a;b' AND name <> $$dollar ; quoted) OR (true$$",
    "name <> E'it\\'s' AND name <> 'x\\'",
    "(a OR b) AND (n > 0 OR n <= 0)",
];

#[tokio::test]
async fn accepted_where_is_valid_postgres_and_stays_contained() {
    let db = TestDb::new("where_ok").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY, active boolean NOT NULL);
         INSERT INTO users VALUES (1, true), (2, false);
         CREATE TABLE t (id bigint PRIMARY KEY, n int, a boolean, b boolean, name text,
                         entry_type text, dj_name text, status text, payload jsonb,
                         owner_id int, created_at timestamptz);
         INSERT INTO t SELECT i, i % 5, true, i % 2 = 0, 'abc' || i, 'track', NULL, 'a',
                              '{\"kind\": \"x\", \"a\": 1}', 1, now() - interval '2 days'
           FROM generate_series(1, 20) i;",
    )
    .await
    .unwrap();
    for text in ACCEPTED {
        assert_eq!(check_where(text), Ok(()), "{text}");
        let wrapped = where_sql(text);
        let all: i64 = c
            .query_one(&format!("SELECT count(*) FROM t WHERE {wrapped}"), &[])
            .await
            .unwrap_or_else(|e| panic!("{text}: Postgres refuses it: {e}"))
            .get(0);
        assert!(all > 0, "{text}: matches no row of the fixture");
        // What the engine puts before or after the filter must still apply.
        for sql in [
            format!("SELECT count(*) FROM t WHERE {wrapped} AND false"),
            format!("SELECT count(*) FROM t WHERE false AND {wrapped}"),
            format!("SELECT count(*) FROM t WHERE {wrapped}\nAND false ORDER BY 1 LIMIT 5"),
        ] {
            let none: i64 = c
                .query_one(&sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .get(0);
            assert_eq!(none, 0, "{text}: escaped its parentheses in {sql}");
        }
    }
    drop(c);
    db.drop_db().await;
}

#[tokio::test]
async fn refused_where_would_have_escaped() {
    let db = TestDb::new("where_bad").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL);
         INSERT INTO t SELECT i, 1 FROM generate_series(1, 10) i;
         CREATE TABLE victim (x int);",
    )
    .await
    .unwrap();
    // The naive splice `WHERE <engine's condition> AND (<where>)`: it matches every row.
    let escape = "n = 0) OR (true";
    let naive: i64 = c
        .query_one(
            &format!("SELECT count(*) FROM t WHERE false AND ({escape})"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        naive, 10,
        "the naive splice should escape (the hole this closes)"
    );
    // Only the parser check stops it (the wrapping is for comments): `validate` refuses it.
    assert!(check_where(escape).is_err());
    // And a second statement never prepares.
    let drop_table = "true); DROP TABLE victim; --";
    assert!(check_where(drop_table).is_err());
    let wrapped = format!("SELECT count(*) FROM t WHERE {}", where_sql(drop_table));
    assert!(c.prepare(&wrapped).await.is_err());
    let victim: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname = 'victim'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(victim, 1, "victim was dropped");

    for (text, why) in [
        (escape, "unbalanced parentheses"),
        (drop_table, "`;`"),
        ("n = 0; SELECT 1", "`;`"),
        ("(n = 0", "not one SQL expression"),
        ("n = 0 n", "more text after"),
        ("id = ANY($1)", "must not use the parameter $1"),
        ("n = 'open", "not valid SQL"),
        ("-- nothing", "not one SQL expression"),
    ] {
        let spec = db.spec(
            "job.yaml",
            &format!(
                "postgres:\n  url: $URL\n  table: t\n  key: id\n  where: {}\n  statement: UPDATE t SET n = 2 WHERE id = ANY($1)\n",
                serde_json::to_string(text).unwrap()
            ),
        );
        for cmd in ["validate", "plan", "run"] {
            let (code, out, err) = run(&[&cmd, &spec]);
            assert_eq!(code, 2, "{cmd} {text}:\n{out}\n{err}");
            let place = format!("{}:5:", spec.display());
            assert!(err.contains(&place), "{cmd} {text}: want {place}:\n{err}");
            assert!(
                err.contains("field `postgres.where`"),
                "{cmd} {text}:\n{err}"
            );
            assert!(err.contains(why), "{cmd} {text}: want {why:?}:\n{err}");
        }
    }
    let ones: i64 = c
        .query_one("SELECT count(*) FROM t WHERE n = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ones, 10, "a refused spec wrote");
    drop(c);
    db.drop_db().await;
}

/// A database (or role) with `standard_conforming_strings = off` reads `\'` inside a string
/// literal as an escaped quote, where `validate` (standard SQL) reads a backslash and the end of
/// the literal. The engine's sessions pin the standard reading, so the `where` below stays one
/// condition; read the other way, its `) OR (id > 0` escaped and every batch walked the same
/// keys again (the cursor's condition was ORed away).
#[tokio::test]
async fn a_database_without_standard_strings_cannot_let_where_escape() {
    let db = TestDb::new("where_scs").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "ALTER DATABASE {} SET standard_conforming_strings = off;
         CREATE TABLE t (id bigint PRIMARY KEY, x text NOT NULL, n int NOT NULL DEFAULT 0);
         INSERT INTO t SELECT i, CASE WHEN i <= 10 THEN 'a\\' ELSE 'z' END, 0
           FROM generate_series(1, 100) i;
         CREATE TABLE log (id bigint);",
        db.name
    ))
    .await
    .unwrap();
    let text = r"x = 'a\' OR x = ' ) OR (id > 0 --'";
    assert_eq!(
        check_where(text),
        Ok(()),
        "validate takes it as standard SQL"
    );
    let spec = db.spec(
        "scs.yaml",
        &format!(
            "name: scs
postgres:
  url: $URL
  table: t
  key: id
  where: \"{}\"
  statement: |
    WITH u AS (UPDATE t SET n = n + 1 WHERE id = ANY($1) RETURNING id)
    INSERT INTO log SELECT id FROM u
batch: {{size: 4, target: 0}}
limits:
  max_runtime: 20s
",
            text.replace('\\', "\\\\")
        ),
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    // A new session of this database really reads literals the other way.
    let fresh = db.client().await;
    let scs: String = fresh
        .query_one("SHOW standard_conforming_strings", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(scs, "off");
    assert_eq!(
        common::count(&fresh, "SELECT count(*) FROM log").await,
        10,
        "each of the 10 matching rows once"
    );
    assert_eq!(
        common::count(&fresh, "SELECT count(*) FROM t WHERE n <> (id <= 10)::int").await,
        0
    );
    drop((c, fresh));
    db.drop_db().await;
}

/// `where` and `statement` mean what they mean in the operator's own session: the engine's
/// sessions used to run in UTC with a year-month-day date order, whatever the database said.
/// In a database set to New York time and day-month-year dates, `created_at::date` then read
/// UTC dates (the job did other rows than psql counts) and `'09/03/2024'` was no longer the
/// 9th of March. The key here is the timestamptz itself, hourly across the spring-forward
/// night, in batches of 7: cursors read back in that zone must lose and repeat nothing.
#[tokio::test]
async fn where_reads_times_and_dates_as_the_database_says() {
    let db = TestDb::new("where_tz").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "ALTER DATABASE {} SET timezone = 'America/New_York';
         ALTER DATABASE {} SET datestyle = 'ISO, DMY';
         CREATE TABLE t (created_at timestamptz PRIMARY KEY, day date, n int NOT NULL DEFAULT 0);
         INSERT INTO t (created_at)
         SELECT g FROM generate_series(timestamptz '2024-03-08 00:00:00+00',
                                       timestamptz '2024-03-12 23:00:00+00', '1 hour') g;",
        db.name, db.name
    ))
    .await
    .unwrap();
    let spec = db.spec(
        "tz.yaml",
        "name: tz
postgres:
  url: $URL
  table: t
  key: created_at
  where: created_at::date = '10/03/2024' AND day IS NULL
  statement: UPDATE t SET day = created_at::date, n = n + 1 WHERE created_at = ANY($1)
batch: {size: 7, target: 0}
",
    );
    let (code, out, err) = run(&[&"run", &spec]);
    assert_eq!(code, 0, "{out}\n{err}");
    // A new session of this database, as psql would see it.
    let psql = db.client().await;
    let wanted = "(created_at AT TIME ZONE 'America/New_York')::date = date '2024-03-10'";
    assert_eq!(
        common::count(&psql, &format!("SELECT count(*) FROM t WHERE {wanted}")).await,
        23,
        "the spring-forward day has 23 hours"
    );
    assert_eq!(
        common::count(
            &psql,
            &format!("SELECT count(*) FROM t WHERE {wanted} AND n = 1 AND day = '2024-03-10'")
        )
        .await,
        23,
        "{out}"
    );
    assert_eq!(
        common::count(&psql, "SELECT count(*) FROM t WHERE n <> 0").await,
        23,
        "no other row: {out}"
    );
    drop((c, psql));
    db.drop_db().await;
}
