//! Reading the checkpoint store (`backfill.jobs`, `backfill.skipped_keys`) from tests.

use tokio_postgres::Client;

/// A job's record in `backfill.jobs`.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub status: String,
    pub cursor: Option<String>,
    pub keys_done: i64,
    pub rows_done: i64,
    pub batches_done: i64,
    pub rows_retried: i64,
    pub last_error: Option<String>,
}

/// The job's record, or `None` while the store or the record does not exist yet.
pub async fn job_row(c: &Client, job: &str) -> Option<JobRow> {
    let r = c
        .query_opt(
            "SELECT status, cursor, keys_done, rows_done, batches_done, rows_retried, last_error
               FROM backfill.jobs WHERE job = $1",
            &[&job],
        )
        .await
        .ok()??;
    Some(JobRow {
        status: r.get(0),
        cursor: r.get(1),
        keys_done: r.get(2),
        rows_done: r.get(3),
        batches_done: r.get(4),
        rows_retried: r.get(5),
        last_error: r.get(6),
    })
}

/// Whether the `backfill` schema (the checkpoint store) exists.
pub async fn has_store(c: &Client) -> bool {
    c.query_one("SELECT to_regnamespace('backfill') IS NOT NULL", &[])
        .await
        .expect("to_regnamespace")
        .get(0)
}

/// The job's whole record as text (`None` when there is none, or no store), to compare before
/// and after.
pub async fn job_record(c: &Client, job: &str) -> Option<String> {
    if !has_store(c).await {
        return None;
    }
    c.query_opt(
        "SELECT j::text FROM backfill.jobs j WHERE job = $1",
        &[&job],
    )
    .await
    .expect("read backfill.jobs")
    .map(|r| r.get(0))
}
