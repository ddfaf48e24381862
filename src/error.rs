//! Typed errors: what went wrong, whether a retry can help, and which exit code it maps to.

use std::time::Duration;

/// Exit code: every job finished.
pub const EXIT_DONE: i32 = 0;
/// Exit code: a job failed; its checkpoint and error are kept.
pub const EXIT_FAILED: i32 = 1;
/// Exit code: bad spec or usage; nothing was touched.
pub const EXIT_USAGE: i32 = 2;
/// Exit code: stopped early with progress saved; run again to resume.
pub const EXIT_STOPPED: i32 = 75;

/// Why a run stopped before its job was done (always resumable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    Deadline(Duration),
    Signal(&'static str),
    /// Another runner holds the job (or all `workers` slots are taken).
    LockHeld(String),
    RowsStillLocked(u64),
    Preflight(String),
    /// Started outside the spec's window (nothing was written), or the window closed.
    Window(String),
    /// Another worker of this job failed; the others stop at their next boundary.
    Aborted,
    /// This runner's lock went away under it (its connection was lost): it stopped writing.
    LockLost(String),
    /// A lock another session holds (a migration's table lock) outlasted every retry of a
    /// batch: nothing is wrong with the job, it waits for the next run.
    LockWait(String),
    /// Other sessions' transactions conflicted with every retry of a batch (a deadlock, a
    /// serialization failure): contention, as `LockWait` is; the batch rolled back whole.
    Conflict(String),
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Deadline(d) => write!(
                f,
                "max runtime of {} reached",
                humantime::format_duration(*d)
            ),
            StopReason::Signal(s) => write!(f, "received {s}"),
            StopReason::LockHeld(who) => write!(f, "job is already being run by {who}"),
            StopReason::RowsStillLocked(n) => write!(
                f,
                "{n} row(s) skipped because other transactions held their locks are still locked \
                 after every retry; they stay recorded and are retried first on the next run"
            ),
            StopReason::Preflight(why) => write!(f, "preflight refused to start: {why}"),
            StopReason::Window(why) => write!(f, "{why}"),
            StopReason::Aborted => write!(f, "another worker of this job failed"),
            StopReason::LockWait(why) => write!(
                f,
                "another session held a lock this job needs through every retry ({why}); \
                 progress is saved: run again once it is released"
            ),
            StopReason::Conflict(why) => write!(
                f,
                "other sessions' transactions conflicted with this job's batch through every \
                 retry ({why}); the batch was rolled back whole and progress is saved: run \
                 again when the load is lower"
            ),
            StopReason::LockLost(why) => write!(
                f,
                "this runner lost its lock ({why}); it landed and recorded nothing after that"
            ),
        }
    }
}

/// Every error the library returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A spec that cannot be run as written: the message names file, line and field.
    #[error("{0}")]
    Spec(String),
    /// Wrong command-line use.
    #[error("{0}")]
    Usage(String),
    /// Cannot reach or log in to a database. The URL in the message is redacted.
    #[error("{0}")]
    Connect(String),
    /// The database rejected what the spec asks for (missing table, bad SQL) before any write.
    #[error("{0}")]
    Preflight(String),
    /// A statement failed while the job ran.
    #[error("{message}")]
    Db { message: String, kind: DbErrorKind },
    /// This worker no longer owns the unit it was working on (its claim was taken over after
    /// its connection was lost): nothing was written; it must claim again.
    #[error("{0}")]
    Lost(String),
    /// The spec's `verify:` query says the job is not done.
    #[error("{0}")]
    Verify(String),
    /// The run stopped early; progress is saved.
    #[error("stopped: {0}")]
    Stopped(StopReason),
    /// Local I/O (reading a spec file, a directory).
    #[error("{0}")]
    Io(String),
}

/// How a database error should be handled by the driver loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbErrorKind {
    /// The statement ran over `statement_timeout`: retry with a smaller batch.
    StatementTimeout,
    /// `lock_timeout` (SQLSTATE 55P03): retry the same batch after a pause.
    LockTimeout,
    /// Serialization failure (40001): retry after a pause.
    Serialization,
    /// Deadlock (40P01): retry after a pause.
    Deadlock,
    /// Other errors that a retry at the same size can cure (ClickHouse 159, 202, 252...).
    Transient,
    /// The connection was lost: reconnect, then retry.
    ConnectionLost,
    /// ClickHouse MEMORY_LIMIT_EXCEEDED (241): the chunk is split, never retried as it is.
    MemoryLimit,
    /// Anything else: the job fails.
    Fatal,
}

impl DbErrorKind {
    /// Worth retrying the same unit after a pause.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            DbErrorKind::LockTimeout
                | DbErrorKind::Serialization
                | DbErrorKind::Deadlock
                | DbErrorKind::Transient
                | DbErrorKind::ConnectionLost
        )
    }
}

impl Error {
    /// The process exit code this error maps to (see DESIGN.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Spec(_) | Error::Usage(_) => EXIT_USAGE,
            Error::Stopped(_) | Error::Lost(_) => EXIT_STOPPED,
            // Another session's lock outlasted lock_timeout (a migration's, on the table or the
            // store): nothing is wrong with the job or the spec; run again later.
            Error::Db {
                kind: DbErrorKind::LockTimeout,
                ..
            } => EXIT_STOPPED,
            Error::Connect(_)
            | Error::Preflight(_)
            | Error::Db { .. }
            | Error::Verify(_)
            | Error::Io(_) => EXIT_FAILED,
        }
    }

    /// A short label for metrics: why a unit was retried.
    pub fn retry_reason(&self) -> &'static str {
        match self {
            Error::Connect(_) => "connection_lost",
            Error::Lost(_) => "claim_lost",
            Error::Db { kind, .. } => match kind {
                DbErrorKind::StatementTimeout => "statement_timeout",
                DbErrorKind::LockTimeout => "lock_timeout",
                DbErrorKind::Serialization => "serialization_failure",
                DbErrorKind::Deadlock => "deadlock",
                DbErrorKind::Transient => "transient",
                DbErrorKind::ConnectionLost => "connection_lost",
                DbErrorKind::MemoryLimit => "memory_limit",
                DbErrorKind::Fatal => "other",
            },
            _ => "other",
        }
    }

    /// The retry class of a database error; `None` for errors that are never retried.
    pub fn db_kind(&self) -> Option<DbErrorKind> {
        match self {
            Error::Db { kind, .. } => Some(*kind),
            // Reaching the server failed after it had been reached once: worth retrying.
            Error::Connect(_) => Some(DbErrorKind::ConnectionLost),
            _ => None,
        }
    }

    /// A fatal database error with this message.
    pub fn fatal(message: impl Into<String>) -> Error {
        Error::Db {
            message: message.into(),
            kind: DbErrorKind::Fatal,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
