//! Shared test harness: a fresh Postgres database per test (on the local server or on a private
//! cluster, `cluster`), spec files, the real binary, and a fault-injecting proxy (`proxy`).
#![allow(dead_code)]

pub mod ch;
pub mod chserver;
pub mod cluster;
pub mod days;
pub mod docker;
pub mod prom;
pub mod proxy;
pub mod runner;
pub mod skew;
pub mod store;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use tokio_postgres::{Client, NoTls};

/// Admin connection URL for the local test server (override with BACKFILL_TEST_PG).
pub fn admin_url() -> String {
    std::env::var("BACKFILL_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e} (run scripts/services.sh)"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A database of its own for one test, dropped by `drop_db` (left behind if the test panics).
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub dir: tempfile::TempDir,
    /// The admin URL of the server the database is on (its `postgres` database).
    pub admin_url: String,
}

impl TestDb {
    /// A database on the local test server (`admin_url()`).
    pub async fn new(hint: &str) -> TestDb {
        TestDb::new_on(&admin_url(), hint).await
    }

    /// A database on the server of `admin` (a URL naming a database to connect to as admin).
    pub async fn new_on(admin: &str, hint: &str) -> TestDb {
        let name = format!(
            "bf_{}_{}_{}",
            hint,
            std::process::id(),
            rand::random::<u32>()
        );
        connect(admin)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let url = match admin.rfind('/') {
            Some(i) => format!("{}/{name}", &admin[..i]),
            None => panic!("admin url without database: {admin}"),
        };
        TestDb {
            name,
            url,
            dir: tempfile::tempdir().expect("tempdir"),
            admin_url: admin.to_string(),
        }
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// Write a spec file into this test's directory; `$URL` in the text becomes the db URL.
    pub fn spec(&self, file: &str, yaml: &str) -> PathBuf {
        let path = self.dir.path().join(file);
        std::fs::write(&path, yaml.replace("$URL", &self.url)).expect("write spec");
        path
    }

    pub async fn drop_db(self) {
        let admin = connect(&self.admin_url).await;
        let _ = admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

/// The real binary, with logs as text so assertions can read them.
pub fn backfill() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backfill"));
    c.arg("--log-format").arg("text");
    c.env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .env_remove("BACKFILL_LOG");
    c.stdin(Stdio::null());
    c
}

/// Run to completion; returns (exit code, stdout, stderr).
pub fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> (i32, String, String) {
    let mut c = backfill();
    for a in args {
        c.arg(a);
    }
    let out: Output = c.output().expect("run backfill");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// A count from a query returning one bigint.
pub async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// A stable checksum of a table's contents (order-independent).
pub async fn checksum(c: &Client, table: &str) -> String {
    c.query_one(
        &format!(
            "SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t"
        ),
        &[],
    )
    .await
    .expect("checksum")
    .get(0)
}

/// `t (id int PRIMARY KEY, n int)` with ids 1..=rows, not analyzed.
pub async fn make_int_table(c: &Client, rows: i64) {
    c.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT generate_series(1, {rows});"
    ))
    .await
    .expect("create t");
}

/// `t (id bigint PRIMARY KEY, n int)` with ids 1..=rows.
pub async fn make_table(c: &Client, rows: i64) {
    c.batch_execute(&format!(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT i FROM generate_series(1, {rows}) i;
         ANALYZE t;"
    ))
    .await
    .expect("create t");
}
