//! The ClickHouse HTTP client for a job: credentials from the spec, settings on every chunk
//! query, and the quirks of old servers (18.16 cannot answer RowBinaryWithNamesAndTypes, so
//! schema validation is off; the crate is built without lz4, so nothing is compressed).

use super::errors::ch_error;
use crate::error::{Error, Result};
use crate::spec::ClickhouseSpec;
use clickhouse::Client;

/// A client for the job's database. `settings` are attached to chunk queries only.
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

/// The same client with the spec's `settings` (e.g. max_memory_usage) on every query.
pub fn with_settings(client: &Client, spec: &ClickhouseSpec) -> Client {
    spec.settings
        .iter()
        .fold(client.clone(), |c, (k, v)| c.with_setting(k, v))
}

/// `SELECT version()`, or an error that names the (redacted) URL and what to check.
pub async fn version(client: &Client, spec: &ClickhouseSpec) -> Result<String> {
    client
        .query("SELECT version()")
        .fetch_one::<String>()
        .await
        .map_err(|e| {
            let why = ch_error("", &e).to_string();
            let hint = if why.contains("Code: 516")
                || why.contains("Code: 192")
                || why.contains("Code: 193")
            {
                " — check the user and password (the password is not shown)"
            } else if why.contains("Code: 81") {
                " — check the database name in clickhouse.url"
            } else if why.contains("onnect") {
                " — is ClickHouse running and listening on that host and port?"
            } else {
                ""
            };
            Error::Connect(format!(
                "cannot connect to {}{}{hint}",
                spec.redacted_url(),
                why.trim_start_matches(':')
            ))
        })
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
