//! Reading without writing: `plan`, `status` and `verify` run their queries in transactions
//! started `READ ONLY` (on sessions whose default is read-only too), so nothing a spec says can
//! make them write.

use super::errors::db_error;
use crate::error::{Error, Result};
use crate::spec::Limits;
use tokio_postgres::Client;

/// Run the spec's `verify:` query in a read-only transaction: one integer, 0 = done.
pub async fn verify(c: &Client, sql: &str, limits: &Limits) -> Result<i64> {
    c.batch_execute(&format!(
        "BEGIN READ ONLY; SET LOCAL statement_timeout = {}",
        limits.statement_timeout.as_millis()
    ))
    .await
    .map_err(|e| db_error("verify", &e))?;
    // Checked in the transaction: the check's settings (`effects`) end with it.
    let row = match refuse_outside_calls(c, sql).await {
        Ok(()) => c.query_one(sql, &[]).await,
        Err(e) => {
            let _ = c.batch_execute("ROLLBACK").await;
            return Err(e);
        }
    };
    let _ = c.batch_execute("ROLLBACK").await;
    let row = row.map_err(|e| {
        let mut err = db_error("verify", &e);
        if let Error::Db { message, .. } = &mut err {
            *message = format!("postgres.verify: {message}");
        }
        err
    })?;
    let n = row
        .try_get::<_, i64>(0)
        .or_else(|_| row.try_get::<_, i32>(0).map(i64::from))
        .or_else(|_| row.try_get::<_, i16>(0).map(i64::from))
        .map_err(|_| {
            Error::Preflight(
                "postgres.verify must return one row with one integer (0 = the job is done), \
                 e.g. SELECT count(*) FROM ... WHERE <not done yet>"
                    .into(),
            )
        })?;
    Ok(n)
}

/// Refuse a `verify:` query that calls a function whose effects a read-only transaction does
/// not stop (a sequence drawn, `dblink_exec` writing through a connection of its own), or reads
/// a foreign table (its server runs what it runs in a transaction of its own).
pub async fn refuse_outside_calls(c: &Client, sql: &str) -> Result<()> {
    let calls = super::effects::outside_calls(c, sql, &[]).await?;
    if calls.is_empty() {
        return Ok(());
    }
    Err(Error::Preflight(format!(
        "postgres.verify calls {}: a volatile function or a foreign server can write where a \
         read-only transaction does not reach (a sequence, another connection, a remote \
         transaction of its own), and verify writes nothing; check without it, or, if a \
         function only reads, declare it STABLE (which Postgres requires of a function that \
         does not modify the database)",
        calls.join(", ")
    )))
}
