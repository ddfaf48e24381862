//! Preflight for wedges: sessions that hold or wait for an AccessExclusiveLock on the table,
//! and transactions older than `limits.max_transaction_age` in the database. Starting a backfill
//! behind either piles more work onto a queue that is already stuck.

use super::errors::db_error;
use crate::error::Result;
use std::time::Duration;
use tokio_postgres::Client;

/// One line per session that should stop the job from starting. Reads only the catalog and the
/// statistics views: it takes no lock on the table, so it cannot queue behind the lock it finds.
/// `max_age` `None`: old transactions are not checked.
pub async fn find(client: &Client, table: &str, max_age: Option<Duration>) -> Result<Vec<String>> {
    let rel = client
        .query_one("SELECT to_regclass($1)::oid", &[&table])
        .await
        .map_err(|e| db_error("preflight: resolving the table", &e))?;
    let rel_oid: Option<u32> = rel.get(0);
    let rows = match rel_oid {
        // A missing table is reported by the schema checks.
        None => Vec::new(),
        Some(rel_oid) => client
        .query(
            "SELECT a.pid, bool_or(l.granted), extract(epoch FROM now() - coalesce(a.xact_start, a.query_start))::float8,
                    coalesce(a.state, ''), left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), 80)
               FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'relation' AND l.relation = $1 AND l.mode = 'AccessExclusiveLock'
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND a.pid <> pg_backend_pid()
              GROUP BY a.pid, a.xact_start, a.query_start, a.state, a.query
              ORDER BY 3 DESC NULLS LAST",
            &[&rel_oid],
        )
        .await
        .map_err(|e| db_error("preflight: reading locks on the table", &e))?,
    };
    let mut found: Vec<String> = rows
        .iter()
        .map(|r| {
            let verb = if r.get::<_, bool>(1) {
                "holds"
            } else {
                "waits for"
            };
            describe(
                r.get(0),
                &format!("{verb} an AccessExclusiveLock on {table}"),
                r.get(2),
                r.get(3),
                r.get(4),
            )
        })
        .collect();
    let Some(max_age) = max_age else {
        return Ok(found);
    };
    let old = client
        .query(
            "SELECT pid, extract(epoch FROM now() - xact_start)::float8, coalesce(state, ''),
                    left(regexp_replace(coalesce(query, ''), '\\s+', ' ', 'g'), 80)
               FROM pg_stat_activity
              WHERE datname = current_database() AND backend_type = 'client backend'
                AND xact_start < now() - make_interval(secs => $1)
                AND pid <> pg_backend_pid()
              ORDER BY xact_start",
            &[&max_age.as_secs_f64()],
        )
        .await
        .map_err(|e| db_error("preflight: reading open transactions", &e))?;
    for r in &old {
        let pid: i32 = r.get(0);
        if rows.iter().any(|l| l.get::<_, i32>(0) == pid) {
            continue;
        }
        found.push(describe(
            pid,
            &format!(
                "has had a transaction open longer than max_transaction_age {}s",
                max_age.as_secs()
            ),
            r.get(1),
            r.get(2),
            r.get(3),
        ));
    }
    Ok(found)
}

fn describe(pid: i32, what: &str, age: Option<f64>, state: String, query: String) -> String {
    let age = age.map_or("?".into(), |a| {
        crate::progress::fmt_duration(Duration::from_secs_f64(a.max(0.0)))
    });
    format!("pid {pid} {what} (transaction age {age}, state {state:?}): {query}")
}
