//! Session advisory locks keyed by text (`hashtextextended`): the one place their SQL lives.

use super::errors::db_error;
use crate::error::Result;
use tokio_postgres::Client;

/// Try to take the lock `key` on this session, exclusively or shared; `what` names the step in
/// errors. Returns whether it was taken.
pub async fn try_lock(c: &Client, key: &str, shared: bool, what: &str) -> Result<bool> {
    let sql = if shared {
        "SELECT pg_try_advisory_lock_shared(hashtextextended($1, 0))"
    } else {
        "SELECT pg_try_advisory_lock(hashtextextended($1, 0))"
    };
    Ok(c.query_one(sql, &[&key])
        .await
        .map_err(|e| db_error(what, &e))?
        .get(0))
}

/// Release the lock `key` held on this session (explicitly: a closed session's locks outlive
/// the client for a moment).
pub async fn unlock(c: &Client, key: &str, shared: bool, what: &str) -> Result<()> {
    let sql = if shared {
        "SELECT pg_advisory_unlock_shared(hashtextextended($1, 0))"
    } else {
        "SELECT pg_advisory_unlock(hashtextextended($1, 0))"
    };
    c.execute(sql, &[&key])
        .await
        .map(|_| ())
        .map_err(|e| db_error(what, &e))
}
