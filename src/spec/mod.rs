//! Job specs: the validated types the engine runs, and loading them from files and directories.
//! Every spec error is raised here, naming file, line and field.

mod canonical;
mod ch_verify;
mod clickhouse;
mod duration;
mod env;
mod load;
mod raw;
mod urls;
mod validate;
mod where_expr;

pub use ch_verify::refusal as ch_verify_refusal;
pub use duration::{format as format_duration, parse as parse_duration};
pub use load::{Env, duplicate_names, expand_paths, load_file};
pub use raw::{ChunkLevel, LockMode};
pub use where_expr::{check as check_where, wrap as where_sql};

use std::path::PathBuf;
use std::time::Duration;

/// Largest `batch.size` / `batch.max`: one batch's keys travel as one array parameter.
pub const MAX_BATCH_SIZE: u64 = 1_000_000;
/// Largest Postgres timeout (`statement_timeout`, `lock_timeout`,
/// `idle_in_transaction_session_timeout`): the server's limit, 2^31-1 milliseconds.
pub const MAX_PG_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);
/// Largest `max_runtime`, `max_transaction_age`, `max_replication_lag`: a year.
pub const MAX_LONG_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// Largest `batch.target`, `batch.pause`, `throttle.interval`: an hour.
pub const MAX_SHORT_DURATION: Duration = Duration::from_secs(3600);
/// Largest `throttle.max_active_backends`: Postgres's own limit on backends (2^18-1).
pub const MAX_BACKENDS: u64 = 262_143;

/// One validated job.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Keys the checkpoint: `name:` or the file stem.
    pub name: String,
    pub file: PathBuf,
    pub source: Source,
    pub batch: Batch,
    pub limits: Limits,
    /// Schema of the checkpoint tables in the target database.
    pub state_schema: String,
    /// When to pause between batches; `None` never pauses.
    pub throttle: Option<Throttle>,
    /// At most this many workers share the job (threads, processes, pods).
    pub workers: u32,
    /// Batches start only inside this daily window.
    pub window: Option<crate::engine::window::Window>,
    /// Hash of what the job does (backend, table, key, where, statement): a change is reported.
    /// For Postgres `<sql>.<table>`: the canonical SQL (`canonical`), so a spec laid out anew is
    /// the same spec, then the table and key as written (see `twin_hash`).
    pub hash: String,
    /// The hash earlier versions kept: of the spec's SQL as written (Postgres; for ClickHouse
    /// the same as `hash`).
    pub hash_as_written: String,
    /// Unset environment variables (only tolerated by `validate`).
    pub unresolved: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum Source {
    Postgres(PostgresSpec),
    Clickhouse(ClickhouseSpec),
}

impl Spec {
    /// Whether a job's kept spec hash is this spec's (as this version or an earlier one hashed
    /// it).
    pub fn hash_is(&self, kept: &str) -> bool {
        kept == self.hash || kept == self.hash_as_written
    }

    /// The part of `hash` that says what the job does, without how its table is spelled: a
    /// job with the same part over the same table and key as the server resolves them is this
    /// spec's twin.
    pub fn twin_hash(&self) -> &str {
        self.hash.split('.').next().unwrap_or(&self.hash)
    }
}

impl Source {
    /// The database URL with its password hidden, for anything printed.
    pub fn redacted_url(&self) -> String {
        match self {
            Source::Postgres(p) => p.redacted_url(),
            Source::Clickhouse(c) => c.redacted_url(),
        }
    }
}

/// A ClickHouse job: `source`'s time range cut into chunks, each inserted by `statement`.
#[derive(Clone)]
pub struct ClickhouseSpec {
    /// `http(s)://host:port` without credentials or path.
    pub endpoint: String,
    pub database: String,
    pub user: Option<String>,
    /// Never print this.
    pub password: Option<String>,
    /// `postgres://...` (with its password: never print this): the job's state and the
    /// target's lock live in this Postgres database instead of next to the target.
    pub state_url: Option<String>,
    pub source: String,
    pub time_column: String,
    pub split_column: Option<String>,
    pub from: Option<chrono::NaiveDate>,
    /// Exclusive.
    pub to: Option<chrono::NaiveDate>,
    pub chunks: Vec<ChunkLevel>,
    pub target: String,
    /// Sent with every chunk query.
    pub settings: Vec<(String, String)>,
    pub statement: String,
    /// One read-only query returning one integer; 0 = the job really is done.
    pub verify: Option<String>,
    /// Land although materialized views read from the target: chunks land by attaching
    /// partitions, which fires none of them.
    pub land_without_views: bool,
}

impl ClickhouseSpec {
    pub fn redacted_url(&self) -> String {
        let user = match (&self.user, &self.password) {
            (Some(u), Some(_)) => format!("{u}:***@"),
            (Some(u), None) => format!("{u}@"),
            _ => String::new(),
        };
        match self.endpoint.split_once("://") {
            Some((scheme, host)) => format!("{scheme}://{user}{host}/{}", self.database),
            None => self.endpoint.clone(),
        }
    }
}

impl std::fmt::Debug for ClickhouseSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickhouseSpec")
            .field("url", &self.redacted_url())
            .field("source", &self.source)
            .field("target", &self.target)
            .field("chunks", &self.chunks)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
pub struct PostgresSpec {
    /// Connection URL with the password in it: never print this, print `redacted_url()`.
    pub url: String,
    pub table: String,
    pub key: String,
    /// As written (one SQL expression, checked); splice `where_sql()` instead.
    pub where_: Option<String>,
    pub lock: LockMode,
    pub statement: String,
    /// One read-only query returning one integer; 0 = the job really is done.
    pub verify: Option<String>,
}

impl PostgresSpec {
    pub fn redacted_url(&self) -> String {
        crate::redact::redacted_url(&self.url)
    }

    /// The `where` filter as the engine must splice it into SQL: `(\n<where>\n)`, or `true`
    /// when there is none. Validation proved `where` is one expression, and the newlines end
    /// a trailing `-- comment` before the closing parenthesis: nothing can escape it. Splice
    /// this, never `where_` itself.
    pub fn where_sql(&self) -> String {
        self.where_
            .as_deref()
            .map_or_else(|| "true".to_string(), where_sql)
    }
}

impl std::fmt::Debug for PostgresSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSpec")
            .field("url", &self.redacted_url())
            .field("table", &self.table)
            .field("key", &self.key)
            .field("where", &self.where_)
            .field("lock", &self.lock)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub size: u64,
    /// Target duration of one batch; zero keeps the size fixed.
    pub target: Duration,
    pub min: u64,
    pub max: u64,
    pub pause: Duration,
    /// Postgres: lock the next batch's keys on a second connection while the current batch's
    /// statement runs (faster; twice the rows locked, for twice as long). Off by default.
    pub walk_ahead: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Zero means no limit (the server default).
    pub statement_timeout: Duration,
    pub lock_timeout: Duration,
    pub idle_in_transaction_session_timeout: Duration,
    pub max_runtime: Option<Duration>,
    /// Preflight refuses to start while a transaction in the database is older than this;
    /// `None` (written `0`) = off.
    pub max_transaction_age: Option<Duration>,
}

/// Pause the job while any of these holds; checked every `interval` off the batch path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Throttle {
    pub max_replication_lag: Option<Duration>,
    pub max_active_backends: Option<u32>,
    /// SQL returning one boolean: true = pause.
    pub query: Option<String>,
    pub interval: Duration,
}
