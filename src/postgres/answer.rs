//! Waiting for the server's answer on one of a worker's connections, bounded: every round trip
//! a worker makes (a batch's, a claim's, a retry page's, a pause check, giving locks back) is
//! either answered in time or taken for a lost connection.

use crate::error::{DbErrorKind, Error, Result};
use crate::spec::Limits;
use std::time::Duration;

/// How much longer than its own limits (twice `statement_timeout`, and `lock_timeout`) a
/// server may take to answer one round trip before the connection is taken for lost.
const ANSWER_SLACK: Duration = Duration::from_secs(5);

/// How long to wait for the answer to one round trip: the session's `statement_timeout` and
/// `lock_timeout` bound what the server does, so an answer that has not come long after them
/// was lost on the way (a network that drops packets silently, or a proxy that hangs, leaves
/// the socket open and the client waiting for ever, its session's locks held). `None` when the
/// spec lets a statement or a lock wait run unbounded (a timeout of 0).
pub fn answer_limit(limits: &Limits) -> Option<Duration> {
    (!limits.statement_timeout.is_zero() && !limits.lock_timeout.is_zero())
        .then(|| limits.statement_timeout * 2 + limits.lock_timeout + ANSWER_SLACK)
}

/// `fut`, round trips on one connection, or a lost connection once `limit` passes without
/// their answer.
pub async fn answered<T>(
    limit: Option<Duration>,
    what: &str,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let Some(limit) = limit else {
        return fut.await;
    };
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
        Err(Error::Db {
            message: format!(
                "{what}: no answer from the server in {}s, long past statement_timeout and \
                 lock_timeout; the connection is taken for lost",
                limit.as_secs()
            ),
            kind: DbErrorKind::ConnectionLost,
        })
    })
}

/// Whether `e` says the connection is gone (then it is dropped, never used again).
pub fn lost(e: &Error) -> bool {
    e.db_kind() == Some(DbErrorKind::ConnectionLost)
}
