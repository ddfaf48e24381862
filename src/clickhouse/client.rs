//! The ClickHouse HTTP client for a job: credentials from the spec, settings on chunk queries,
//! the quirks of old servers (18.16 cannot answer RowBinaryWithNamesAndTypes, so schema
//! validation is off; the crate is built without lz4, so nothing is compressed), and what the
//! server can do (`SELECT version()`). Every statement goes out as written (`query_raw`): the
//! crate's `query()` would take any `?` in user SQL or in a quoted value for a bind placeholder.

use super::errors::ch_error;
use crate::error::{Error, Result};
use crate::spec::ClickhouseSpec;
use clickhouse::Client;

/// A client for the job's database, with what its server supports.
#[derive(Clone)]
pub struct Db {
    pub client: Client,
    pub server: Server,
}

/// The server's version and the features the job picks by it.
#[derive(Debug, Clone, Default)]
pub struct Server {
    pub version: String,
    /// `ALTER TABLE ... MOVE PARTITION ... TO TABLE` (20.1 and later): a chunk lands by moving
    /// its parts into the target, leaving every other part of the target alone.
    pub move_partition: bool,
    /// `REPLACE PARTITION` from an empty source drops the target's partition (old servers);
    /// newer ones refuse it, so an empty partition is restored with DROP PARTITION there.
    pub replace_from_empty: bool,
    /// An `INSERT ... SELECT` squashes up to `min_insert_block_size_rows` (a million) result
    /// rows into one block in memory before writing it, and the byte limit beside it does not
    /// count aggregate states: 26.9 needed 770 MiB for that after a GROUP BY that had spilled
    /// at 400 MiB. 18.16 did not (measured on the skewed month of bench/clickhouse-skew.sh).
    pub squashes_in_memory: bool,
}

impl Server {
    pub fn of(version: &str) -> Server {
        let mut it = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
        Server {
            version: version.to_string(),
            move_partition: (major, minor) >= (20, 1),
            replace_from_empty: major < 24,
            squashes_in_memory: major >= 20,
        }
    }
}

/// A client for the job's database.
pub fn connect(spec: &ClickhouseSpec) -> Client {
    let mut c = Client::default()
        .with_url(&spec.endpoint)
        .with_database(&spec.database)
        .with_validation(false);
    if let Some(u) = &spec.user {
        c = c.with_user(u);
    }
    if let Some(p) = &spec.password {
        c = c.with_password(p);
    }
    c
}

/// How long the first request may take. A TLS handshake sent to a plain-HTTP port can wait
/// for bytes that never come until the server's receive timeout (30 minutes on 18.16).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// `SELECT version()`, or an error that names the (redacted) URL and what to check.
pub async fn version(client: &Client, spec: &ClickhouseSpec) -> Result<String> {
    let first = fetch_text(client, "SELECT version()", "connecting");
    let e = match tokio::time::timeout(CONNECT_TIMEOUT, first).await {
        Ok(Ok(v)) => return Ok(v.trim().to_string()),
        Ok(Err(e)) => e,
        Err(_) => Error::Connect(format!(
            "connecting: no answer within {}s",
            CONNECT_TIMEOUT.as_secs()
        )),
    };
    let why = e.to_string();
    let hint = match super::errors::code(&why) {
        Some(516) | Some(192) | Some(193) | Some(194) => {
            " — check the user and password (the password is not shown)"
        }
        Some(81) => " — check the database name in clickhouse.url",
        Some(_) => "",
        None if spec.endpoint.starts_with("https://") => {
            if answers_plain_http(spec).await {
                " — that port answers plain HTTP: write the URL with http://, or use the \
                 server's https port (8443 by default)"
            } else {
                " — is ClickHouse running there, and is that port its https port (8443 by \
                 default)?"
            }
        }
        None => " — is ClickHouse running and listening on that host and port?",
    };
    Err(Error::Connect(format!(
        "cannot connect to {}: {}{hint}",
        spec.redacted_url(),
        why.trim_start_matches("connecting: ")
    )))
}

/// Whether the endpoint of an https:// URL answers a plain-HTTP `SELECT 1` (a TLS URL pointed
/// at the http port).
async fn answers_plain_http(spec: &ClickhouseSpec) -> bool {
    let plain = ClickhouseSpec {
        endpoint: spec.endpoint.replacen("https://", "http://", 1),
        ..spec.clone()
    };
    let client = connect(&plain);
    let probe = fetch_text(&client, "SELECT 1", "probing plain HTTP");
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(5), probe).await,
        Ok(Ok(ref v)) if v.trim() == "1"
    )
}

/// Run a statement that returns nothing.
pub async fn exec(client: &Client, sql: &str, what: &str) -> Result<()> {
    client
        .query_raw(sql)
        .execute()
        .await
        .map_err(|e| ch_error(what, &e))
}

/// Run a statement that does the same when run twice (`CREATE TABLE IF NOT EXISTS`, `DROP
/// TABLE IF EXISTS`, `SYSTEM STOP/START MERGES`): lost on the way, it is sent again a few times
/// (`resend`), where one lost answer failed a run at start or sent a chunk back to be retried.
pub async fn exec_repeatable(client: &Client, sql: &str, what: &str) -> Result<()> {
    resend(|| client.query_raw(sql).execute())
        .await
        .map_err(|e| ch_error(what, &e))
}

/// `once` again while it is lost on the way (the connection reset, the answer cut off), a few
/// times over about a second: only for requests whose second run changes nothing. A server
/// that does not answer at all still fails within a few seconds.
async fn resend<T, F>(once: impl FnMut() -> F) -> std::result::Result<T, clickhouse::error::Error>
where
    F: std::future::Future<Output = std::result::Result<T, clickhouse::error::Error>>,
{
    use backon::{ExponentialBuilder, Retryable};
    once.retry(
        ExponentialBuilder::default()
            .with_min_delay(std::time::Duration::from_millis(100))
            .with_max_times(3)
            .with_jitter(),
    )
    .when(|e| matches!(e, clickhouse::error::Error::Network(_)))
    .await
}

/// Run a query (a read: every caller's is a SELECT) and return its TabSeparated text. A
/// request lost on the way is sent again (`resend`): reading twice changes nothing, and one
/// such loss failed a run at start (exit 1, "cannot connect ... is ClickHouse running?") or at
/// any read of a landing.
pub async fn fetch_text(client: &Client, sql: &str, what: &str) -> Result<String> {
    let bytes = resend(|| async {
        client
            .query_raw(sql)
            .fetch_bytes("TabSeparated")?
            .collect()
            .await
            .map(|b| b.to_vec())
    })
    .await
    .map_err(|e| ch_error(what, &e))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The rows of a query on `system.tables`. ClickHouse before 20 lists a database's tables, then
/// reads each one's metadata; a table that another session drops in between fails the whole
/// read with UNKNOWN_TABLE, naming a table the read never asked about (18.16, measured: about
/// one read in a thousand while another session creates and drops tables in the database, as
/// the engine's own staging does). Such a read is taken again; if the catalog keeps changing
/// under it, the failure is transient (the unit is retried, not the job failed).
pub async fn table_rows(client: &Client, sql: &str, what: &str) -> Result<Vec<Vec<String>>> {
    use super::errors::{UNKNOWN_TABLE, code, db_code};
    use crate::error::DbErrorKind;
    use backon::{ConstantBuilder, Retryable};
    (|| rows(client, sql, what))
        .retry(
            ConstantBuilder::default()
                .with_delay(std::time::Duration::from_millis(20))
                .with_max_times(5)
                .with_jitter(),
        )
        .when(|e: &Error| db_code(e) == Some(UNKNOWN_TABLE))
        .await
        .map_err(|e| match e {
            Error::Db { message, .. } if code(&message) == Some(UNKNOWN_TABLE) => Error::Db {
                message,
                kind: DbErrorKind::Transient,
            },
            e => e,
        })
}

/// A query's rows, fields unescaped.
pub async fn rows(client: &Client, sql: &str, what: &str) -> Result<Vec<Vec<String>>> {
    let text = fetch_text(client, sql, what).await?;
    Ok(text
        .lines()
        .map(|l| l.split('\t').map(unescape).collect())
        .collect())
}

/// The one number a query returns.
pub async fn number(client: &Client, sql: &str, what: &str) -> Result<u64> {
    let text = fetch_text(client, sql, what).await?;
    text.trim()
        .parse()
        .map_err(|_| Error::fatal(format!("{what}: {text:?} is not a number")))
}

/// Undo TabSeparated escaping.
pub fn unescape(field: &str) -> String {
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
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some(o) => out.push(o),
            None => out.push('\\'),
        }
    }
    out
}

/// Quote an identifier for ClickHouse SQL (backticks), keeping `db.table` qualified names.
pub fn ident(name: &str) -> String {
    name.split('.')
        .map(|p| format!("`{}`", p.trim_matches('`').replace('`', "\\`")))
        .collect::<Vec<_>>()
        .join(".")
}

/// A string literal for ClickHouse SQL.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_by_version() {
        let old = Server::of("18.16.1");
        assert!(!old.move_partition && old.replace_from_empty && !old.squashes_in_memory);
        let new = Server::of("26.9.2.1");
        assert!(new.move_partition && !new.replace_from_empty && new.squashes_in_memory);
    }

    #[test]
    fn tsv_fields_round_trip() {
        assert_eq!(unescape("a\\tb\\\\c\\'d"), "a\tb\\c'd");
        assert_eq!(literal("it's a ?"), "'it\\'s a ?'");
    }
}
