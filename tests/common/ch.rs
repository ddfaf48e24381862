//! ClickHouse test harness: the two test servers (18.16 and a current release, `ChServer`), a
//! database of its own per test on either, queries over plain HTTP (std::net, no client
//! library: results are TSV text), spec files, readers of the checkpoint table
//! `backfill_chunks`, and `ch_test!`, which makes one test body into a test per server.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

/// One of the ClickHouse servers the tests run against, reached over HTTP as user default
/// without a password.
#[derive(Clone, Debug)]
pub struct ChServer {
    /// `18.16` or `current`: names the server in messages.
    pub label: &'static str,
    /// `http://127.0.0.1:8123` (no trailing slash).
    pub url: String,
    /// The script that starts it.
    pub script: &'static str,
}

impl ChServer {
    /// Debian's ClickHouse 18.16: BACKFILL_TEST_CH, default http://127.0.0.1:8123.
    pub fn v18() -> ChServer {
        ChServer {
            label: "18.16",
            url: env_url("BACKFILL_TEST_CH", "http://127.0.0.1:8123"),
            script: "scripts/services.sh",
        }
    }

    /// A current ClickHouse (26.x, chDB): BACKFILL_TEST_CH_CURRENT, default
    /// http://127.0.0.1:8124.
    pub fn current() -> ChServer {
        ChServer {
            label: "current",
            url: env_url("BACKFILL_TEST_CH_CURRENT", "http://127.0.0.1:8124"),
            script: "scripts/clickhouse-current.sh",
        }
    }

    /// The same server at another URL (e.g. through a FaultProxy).
    pub fn at(&self, url: &str) -> ChServer {
        ChServer {
            url: url.trim_end_matches('/').to_string(),
            ..self.clone()
        }
    }

    /// `host:port`
    pub fn host_port(&self) -> String {
        let rest = self.url.strip_prefix("http://").unwrap_or(&self.url);
        rest.split('/').next().unwrap_or(rest).to_string()
    }

    /// The socket address (for FaultProxy::start_http).
    pub fn addr(&self) -> std::net::SocketAddr {
        use std::net::ToSocketAddrs;
        self.host_port()
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .unwrap_or_else(|| panic!("ClickHouse {}: bad address {}", self.label, self.url))
    }

    /// Run one statement in `database` with extra `settings` (URL parameters). Returns the body,
    /// or the server's message. `wait_end_of_query=1` makes the server buffer the result, so a
    /// failure is always an HTTP error and never a 200 with the exception appended to a
    /// half-sent body. Panics, naming the script that starts the server, if it cannot connect.
    pub fn try_query_with(
        &self,
        database: Option<&str>,
        sql: &str,
        settings: &[(&str, &str)],
    ) -> Result<String, String> {
        let mut path = String::from("/?wait_end_of_query=1");
        if let Some(db) = database {
            path.push_str(&format!("&database={db}"));
        }
        for (k, v) in settings {
            path.push_str(&format!("&{k}={v}"));
        }
        let addr = self.host_port();
        let mut s = TcpStream::connect(&addr).unwrap_or_else(|e| {
            panic!(
                "cannot connect to ClickHouse {} at {addr}: {e} (start it with {})",
                self.label, self.script
            )
        });
        s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        // HTTP/1.0: the server closes the connection after the response, never chunks it.
        let head = format!(
            "POST {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            sql.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(sql.as_bytes()).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap_or_else(|e| {
            panic!(
                "reading ClickHouse {}'s answer to {sql}: {e} (is it up? {})",
                self.label, self.script
            )
        });
        let raw = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let status = head.split_whitespace().nth(1).unwrap_or("");
        if status == "200" {
            Ok(body.to_string())
        } else {
            Err(format!("HTTP {status}: {}", body.trim()))
        }
    }

    pub fn try_query(&self, database: Option<&str>, sql: &str) -> Result<String, String> {
        self.try_query_with(database, sql, &[])
    }

    /// Run one statement; panics with the server's message if it fails.
    pub fn query(&self, database: Option<&str>, sql: &str) -> String {
        self.try_query(database, sql)
            .unwrap_or_else(|e| panic!("ClickHouse {}: {sql}\n-> {e}", self.label))
    }

    /// `SELECT version()`, e.g. `18.16.1` or `26.9.2.1`.
    pub fn version(&self) -> String {
        self.query(None, "SELECT version()").trim().to_string()
    }

    /// Panics, naming the script that starts the server, unless it answers `SELECT 1`.
    pub fn check_up(&self) {
        match self.try_query(None, "SELECT 1") {
            Ok(b) if b.trim() == "1" => {}
            other => panic!(
                "ClickHouse {} at {} does not answer SELECT 1 ({other:?}): start it with {}",
                self.label, self.url, self.script
            ),
        }
    }
}

fn env_url(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
        .trim_end_matches('/')
        .to_string()
}

/// One test body, two #[test]s: `NAME::v18` on ClickHouse 18.16 and `NAME::current` on the
/// current server. The attributes are put on both (`#[test]`, or `#[tokio::test(...)]` on an
/// `async fn`); the body gets the server as `$srv: ChServer`.
///
/// ```ignore
/// ch_test! {
///     #[test]
///     fn lands_once(srv) {
///         let db = ChDb::new_on(&srv, "once");
///     }
/// }
/// ```
#[macro_export]
macro_rules! ch_test {
    ($(#[$attr:meta])* async fn $name:ident($srv:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            async fn body($srv: $crate::common::ch::ChServer) $body
            $(#[$attr])*
            async fn v18() {
                body($crate::common::ch::ChServer::v18()).await
            }
            $(#[$attr])*
            async fn current() {
                body($crate::common::ch::ChServer::current()).await
            }
        }
    };
    ($(#[$attr:meta])* fn $name:ident($srv:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            fn body($srv: $crate::common::ch::ChServer) $body
            $(#[$attr])*
            fn v18() {
                body($crate::common::ch::ChServer::v18())
            }
            $(#[$attr])*
            fn current() {
                body($crate::common::ch::ChServer::current())
            }
        }
    };
}

/// The 18.16 server's URL (BACKFILL_TEST_CH).
pub fn server_url() -> String {
    ChServer::v18().url
}

/// `ChServer::try_query_with` on the 18.16 server.
pub fn try_query_with(
    database: Option<&str>,
    sql: &str,
    settings: &[(&str, &str)],
) -> Result<String, String> {
    ChServer::v18().try_query_with(database, sql, settings)
}

/// `ChServer::try_query` on the 18.16 server.
pub fn try_query(database: Option<&str>, sql: &str) -> Result<String, String> {
    ChServer::v18().try_query(database, sql)
}

/// `ChServer::query` on the 18.16 server.
pub fn query(database: Option<&str>, sql: &str) -> String {
    ChServer::v18().query(database, sql)
}

/// One row of `backfill_chunks` (a chunk, the job row `''`, `#pause`, `#merges`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    pub chunk: String,
    pub level: String,
    pub status: String,
    pub rows: u64,
    pub source_rows: u64,
    pub attempts: u32,
    pub memory_bytes: u64,
    /// The server's error code of the last failed attempt (241: out of memory).
    pub code: u32,
    /// 1 once lighter settings were tried.
    pub light: u32,
    pub error: String,
    pub staging: String,
    pub runner: String,
    pub children: Vec<String>,
}

/// Undo TSV escaping (`\t`, `\n`, `\\`, `\'`).
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut it = field.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some(o) => out.push(o),
            None => out.push('\\'),
        }
    }
    out
}

/// A database of its own for one test, dropped when this value is dropped (also when the test
/// panics; set BACKFILL_TEST_KEEP_CH=1 to keep it for a look).
pub struct ChDb {
    pub name: String,
    /// `http://127.0.0.1:8123/<name>`: the spec's `clickhouse.url`.
    pub url: String,
    pub dir: tempfile::TempDir,
    pub server: ChServer,
}

impl ChDb {
    /// A database on the 18.16 server.
    pub fn new(hint: &str) -> ChDb {
        ChDb::new_on(&ChServer::v18(), hint)
    }

    /// A database on `server`; panics, naming the script that starts it, if it is not up.
    pub fn new_on(server: &ChServer, hint: &str) -> ChDb {
        server.check_up();
        let name = format!(
            "bf_ch_{}_{}_{}",
            hint,
            std::process::id(),
            rand::random::<u32>()
        );
        server.query(None, &format!("CREATE DATABASE {name}"));
        ChDb {
            url: format!("{}/{name}", server.url),
            name,
            dir: tempfile::tempdir().expect("tempdir"),
            server: server.clone(),
        }
    }

    /// A database of this one's name on `server` (another server's twin, as staging and prod
    /// are), its own, dropped when it is dropped.
    pub fn same_name_on(&self, server: &ChServer) -> ChDb {
        server.check_up();
        server.query(None, &format!("CREATE DATABASE {}", self.name));
        ChDb {
            url: format!("{}/{}", server.url, self.name),
            name: self.name.clone(),
            dir: tempfile::tempdir().expect("tempdir"),
            server: server.clone(),
        }
    }

    /// Run a statement in this database; panics if it fails.
    pub fn q(&self, sql: &str) -> String {
        self.server.query(Some(&self.name), sql)
    }

    pub fn try_q(&self, sql: &str) -> Result<String, String> {
        self.server.try_query(Some(&self.name), sql)
    }

    /// A statement in this database with extra settings (URL parameters).
    pub fn try_q_with(&self, sql: &str, settings: &[(&str, &str)]) -> Result<String, String> {
        self.server.try_query_with(Some(&self.name), sql, settings)
    }

    /// `KILL QUERY` of the running queries whose text names this database, and of no other (a
    /// KILL QUERY that matched the current server's serving query would stop that server).
    pub fn kill_queries(&self) -> String {
        self.server.query(
            None,
            &format!(
                "KILL QUERY WHERE query LIKE '%{}%' AND query NOT LIKE '%KILL QUERY%' SYNC",
                self.name
            ),
        )
    }

    /// The rows of a query, fields split on tabs (TSV, unescaped).
    pub fn rows(&self, sql: &str) -> Vec<Vec<String>> {
        self.q(sql)
            .lines()
            .map(|l| l.split('\t').map(unescape).collect())
            .collect()
    }

    /// The one number a query returns.
    pub fn num(&self, sql: &str) -> u64 {
        let out = self.q(sql);
        out.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{sql}: {out:?} is not a number: {e}"))
    }

    /// Tables in this database, sorted. 18.16 fails a read of `system.tables` with Code 60 when
    /// a table is dropped while it reads (the engine's staging tables are): read again.
    pub fn tables(&self) -> Vec<String> {
        let sql = format!(
            "SELECT name FROM system.tables WHERE database = '{}' ORDER BY name",
            self.name
        );
        let mut tries = 0;
        loop {
            match self.try_q(&sql) {
                Ok(out) => return out.lines().map(str::to_string).collect(),
                Err(e) if e.contains("Code: 60") && tries < 20 => tries += 1,
                Err(e) => panic!("ClickHouse {}: {sql}\n-> {e}", self.server.label),
            }
        }
    }

    pub fn has_table(&self, table: &str) -> bool {
        self.tables().iter().any(|t| t == table)
    }

    /// Write a spec file into this test's directory; `$URL` in the text becomes the db URL.
    pub fn spec(&self, file: &str, yaml: &str) -> PathBuf {
        let path = self.dir.path().join(file);
        std::fs::write(&path, yaml.replace("$URL", &self.url)).expect("write spec");
        path
    }

    /// Every record of a job in `backfill_chunks FINAL` (empty while the table does not exist).
    pub fn records(&self, job: &str) -> Vec<Record> {
        if !self.has_table("backfill_chunks") {
            return Vec::new();
        }
        self.rows(&format!(
            "SELECT chunk, level, status, rows, source_rows, attempts, memory_bytes, code, light,
                    error, staging, runner, arrayStringConcat(children, '|')
               FROM backfill_chunks FINAL WHERE job = '{job}' ORDER BY chunk FORMAT TSV"
        ))
        .into_iter()
        .map(|f| Record {
            chunk: f[0].clone(),
            level: f[1].clone(),
            status: f[2].clone(),
            rows: f[3].parse().unwrap(),
            source_rows: f[4].parse().unwrap(),
            attempts: f[5].parse().unwrap(),
            memory_bytes: f[6].parse().unwrap(),
            code: f[7].parse().unwrap(),
            light: f[8].parse().unwrap(),
            error: f[9].clone(),
            staging: f[10].clone(),
            runner: f[11].clone(),
            children: f[12]
                .split('|')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect(),
        })
        .collect()
    }

    /// The chunk records of a job (without the job row and the flags).
    pub fn chunks(&self, job: &str) -> Vec<Record> {
        self.records(job)
            .into_iter()
            .filter(|r| !r.chunk.is_empty() && !r.chunk.starts_with('#'))
            .collect()
    }

    /// One record by chunk id (`""` = the job's own row).
    pub fn record(&self, job: &str, chunk: &str) -> Option<Record> {
        self.records(job).into_iter().find(|r| r.chunk == chunk)
    }
}

impl Drop for ChDb {
    fn drop(&mut self) {
        if std::env::var_os("BACKFILL_TEST_KEEP_CH").is_some() {
            eprintln!("keeping ClickHouse database {}", self.name);
            return;
        }
        let _ = self
            .server
            .try_query(None, &format!("DROP DATABASE IF EXISTS {}", self.name));
    }
}
