//! Postgres error classification and operator-readable messages (SQLSTATE, detail, hint).

use crate::error::{DbErrorKind, Error};
use tokio_postgres::error::SqlState;

/// Which retry class a Postgres error belongs to.
pub fn classify(e: &tokio_postgres::Error) -> DbErrorKind {
    if e.is_closed() {
        return DbErrorKind::ConnectionLost;
    }
    match e.code() {
        Some(c) if *c == SqlState::QUERY_CANCELED => DbErrorKind::StatementTimeout,
        Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE => DbErrorKind::LockTimeout,
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE => DbErrorKind::Serialization,
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED => DbErrorKind::Deadlock,
        Some(c)
            if c.code().starts_with("08")
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT =>
        {
            DbErrorKind::ConnectionLost
        }
        Some(_) => DbErrorKind::Fatal,
        // No SQLSTATE: an I/O or protocol failure on the socket.
        None => DbErrorKind::ConnectionLost,
    }
}

/// The server's own words: `message (SQLSTATE 42P01) detail: … hint: …`, or the client's error.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(&format!("; detail: {d}"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            if let Some(w) = db.where_() {
                s.push_str(&format!("; where: {w}"));
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(&format!(": {inner}"));
                src = inner.source();
            }
            s
        }
    }
}

/// A typed `Error::Db` for a failure while doing `context`.
pub fn db_error(context: &str, e: &tokio_postgres::Error) -> Error {
    Error::Db {
        message: format!("{context}: {}", describe(e)),
        kind: classify(e),
    }
}

/// The SQLSTATE of an error, if the server sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}
