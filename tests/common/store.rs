//! Reading the checkpoint store (`backfill.jobs`, `backfill.ranges`, `backfill.skipped_keys`)
//! from tests: a job's totals over its ranges, and where its walk stands.

use tokio_postgres::Client;

/// A job's record: its status from `backfill.jobs`, its counters summed over its ranges.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub status: String,
    /// The walk's position: the cursor of the furthest range that has made progress.
    pub cursor: Option<String>,
    pub keys_done: i64,
    pub rows_done: i64,
    pub batches_done: i64,
    pub rows_retried: i64,
    pub last_error: Option<String>,
}

/// SQL for a job's row (`$1` = job): status, cursor, keys, rows, batches, retried, error.
pub const JOB_ROW_SQL: &str = "
    SELECT j.status,
           (SELECT r.cursor FROM backfill.ranges r
             WHERE r.job = j.job AND r.cursor IS DISTINCT FROM r.lo
             ORDER BY r.range_no DESC LIMIT 1),
           coalesce((SELECT sum(keys_done) FROM backfill.ranges r WHERE r.job = j.job), 0)::bigint,
           coalesce((SELECT sum(rows_done) FROM backfill.ranges r WHERE r.job = j.job), 0)::bigint,
           coalesce((SELECT sum(batches_done) FROM backfill.ranges r WHERE r.job = j.job), 0)::bigint,
           coalesce((SELECT sum(rows_retried) FROM backfill.ranges r WHERE r.job = j.job), 0)::bigint,
           j.last_error
      FROM backfill.jobs j WHERE j.job = $1";

/// The job's record, or `None` while the store or the record does not exist yet.
pub async fn job_row(c: &Client, job: &str) -> Option<JobRow> {
    let r = c.query_opt(JOB_ROW_SQL, &[&job]).await.ok()??;
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

/// The job's whole record as text (`None` when there is none, or no store), ranges included,
/// to compare before and after.
pub async fn job_record(c: &Client, job: &str) -> Option<String> {
    if !has_store(c).await {
        return None;
    }
    c.query_opt(
        "SELECT j::text || coalesce((SELECT string_agg(r::text, '|' ORDER BY r.range_no)
                                        FROM backfill.ranges r WHERE r.job = j.job), '')
           FROM backfill.jobs j WHERE job = $1",
        &[&job],
    )
    .await
    .expect("read backfill.jobs")
    .map(|r| r.get(0))
}

/// Every job's row as a subquery (`FROM {JOB_VIEW} WHERE job = ...`), with the columns of the
/// store's older one-cursor layout: job, status, cursor, keys_done, rows_done, batches_done,
/// rows_retried, last_error.
pub const JOB_VIEW: &str = "(
    SELECT j.job, j.status,
           (SELECT r.cursor FROM backfill.ranges r
             WHERE r.job = j.job AND r.cursor IS DISTINCT FROM r.lo
             ORDER BY r.range_no DESC LIMIT 1) AS cursor,
           coalesce((SELECT sum(keys_done) FROM backfill.ranges r WHERE r.job = j.job), 0)::bigint AS keys_done,
           coalesce((SELECT sum(rows_done) FROM backfill.ranges r WHERE r.job = j.job), 0)::bigint AS rows_done,
           coalesce((SELECT sum(batches_done) FROM backfill.ranges r WHERE r.job = j.job), 0)::bigint AS batches_done,
           coalesce((SELECT sum(rows_retried) FROM backfill.ranges r WHERE r.job = j.job), 0)::bigint AS rows_retried,
           j.last_error
      FROM backfill.jobs j) jv";

/// The copy job `copy` (`src` into `dst`, a table without a unique constraint) ended with every
/// source row exactly once: none doubled, none lost, the job done with every key counted once,
/// no range unfinished, no skipped key left.
pub async fn copy_done_exactly_once(c: &Client, rows: i64) {
    let n = async |sql: &str| -> i64 { c.query_one(sql, &[]).await.unwrap().get(0) };
    assert_eq!(
        n("SELECT count(*) - count(DISTINCT id) FROM dst").await,
        0,
        "rows doubled"
    );
    assert_eq!(
        n("SELECT count(*) FROM src s WHERE NOT EXISTS (SELECT 1 FROM dst d WHERE d.id = s.id)")
            .await,
        0,
        "rows lost"
    );
    assert_eq!(n("SELECT count(*) FROM dst").await, rows);
    let j = job_row(c, "copy").await.expect("job recorded");
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.keys_done, rows, "{j:?}");
    assert_eq!(j.rows_done, rows, "{j:?}");
    assert_eq!(
        n("SELECT count(*) FROM backfill.ranges WHERE job = 'copy' AND status <> 'done'").await,
        0
    );
    assert_eq!(
        n("SELECT count(*) FROM backfill.skipped_keys WHERE job = 'copy'").await,
        0
    );
}
