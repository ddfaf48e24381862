//! Cutting a job's key space into ranges `(lo, hi]` that workers claim: bounds from the key's
//! histogram in `pg_stats` (equal numbers of rows per range), else from a block sample of the
//! table, never from a full scan. The first range starts below every key and the last one has
//! no upper bound, so no key falls outside every range. (Rows committed behind a cursor after
//! the walk passed, or whose key moves behind it, are not walked: README, "What a walk sees".)

use super::errors::db_error;
use super::store::Store;
use super::table::TableInfo;
use crate::error::Result;
use deadpool_postgres::GenericClient;
use tokio_postgres::Client;

/// How many ranges a job of `workers` workers is cut into: one for a single worker (its walk
/// stays one ordered pass), else enough that workers rarely wait for each other at the end and
/// few enough that claiming stays cheap.
pub fn target_count(workers: u32) -> usize {
    if workers <= 1 {
        1
    } else {
        (workers as usize * 4).clamp(8, 256)
    }
}

/// Inner bounds (sorted, distinct, as text) that cut the key space into about `n` ranges.
pub async fn bounds(c: &Client, t: &TableInfo, n: usize) -> Result<Vec<String>> {
    let from_stats: Option<Vec<String>> = c
        .query_opt(
            "SELECT s.histogram_bounds::text::text[]
               FROM pg_stats s
              WHERE s.schemaname = $1 AND s.tablename = $2 AND s.attname = $3
                AND s.histogram_bounds IS NOT NULL
              ORDER BY s.inherited DESC LIMIT 1",
            &[&t.schema, &t.table, &t.key_name],
        )
        .await
        .map_err(|e| db_error("reading the key's histogram", &e))?
        .and_then(|r| r.get(0));
    let all = match from_stats {
        Some(b) if b.len() > 2 => b,
        _ => sample(c, t).await?,
    };
    Ok(pick(&all, n))
}

/// Keys from a block sample of about 3000 rows, sorted by the key's own order. The table's
/// size is its own and its leaves' (a partitioned table has no pages of its own, nor
/// statistics until someone analyzes it by hand: it was cut into one range, whatever
/// `workers` said; `pg_partition_tree` lists nothing for a plain table).
async fn sample(c: &Client, t: &TableInfo) -> Result<Vec<String>> {
    let (rel, key) = (&t.rel, &t.key);
    let pages: f64 = c
        .query_one(
            "SELECT coalesce(sum(greatest(c.relpages,
                        pg_relation_size(c.oid) / current_setting('block_size')::int)), 0)::float8
               FROM pg_class c
              WHERE c.oid = to_regclass($1)
                 OR c.oid IN (SELECT p.relid FROM pg_partition_tree(to_regclass($1)) p
                               WHERE p.isleaf)",
            &[rel],
        )
        .await
        .map_err(|e| db_error("sizing the table", &e))?
        .get(0);
    if pages < 2.0 {
        return Ok(Vec::new());
    }
    // ~30 blocks of the table, at least 0.01%.
    let percent = (3000.0 / pages).clamp(0.01, 100.0);
    let sql = format!(
        "SELECT s.k::text FROM (SELECT DISTINCT {key} AS k FROM {rel} TABLESAMPLE SYSTEM ({percent})
                                 WHERE {key} IS NOT NULL) s ORDER BY s.k"
    );
    let rows = c
        .query(&sql, &[])
        .await
        .map_err(|e| db_error("sampling the key space", &e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// About `n - 1` evenly spaced inner bounds out of `all` (sorted).
fn pick(all: &[String], n: usize) -> Vec<String> {
    if n < 2 || all.len() < 3 {
        return Vec::new();
    }
    // The histogram's first and last entries are the smallest and largest keys seen: inner
    // bounds come from between them.
    let inner = &all[1..all.len() - 1];
    let want = (n - 1).min(inner.len());
    let mut out: Vec<String> = (1..=want)
        .map(|i| inner[(i * inner.len()) / (want + 1)].clone())
        .collect();
    out.dedup();
    out
}

/// Create the job's ranges if it has none: from `bounds`, or, for a job checkpointed by an
/// older version (a cursor on the job row), one range continuing at that cursor. Runs under a
/// transaction-level lock on the job, so two runners starting together create them once.
pub async fn create<C: GenericClient>(
    c: &C,
    store: &Store,
    job: &str,
    inner: &[String],
    legacy_cursor: Option<&str>,
) -> Result<u64> {
    let rg = store.ranges();
    let count: i64 = c
        .query_one(
            &format!("SELECT count(*) FROM {rg} WHERE job = $1"),
            &[&job],
        )
        .await
        .map_err(|e| db_error("reading the job's ranges", &e))?
        .get(0);
    if count > 0 {
        return Ok(count as u64);
    }
    if let Some(cursor) = legacy_cursor {
        let sql = format!(
            "INSERT INTO {rg} (job, range_no, lo, hi, cursor, status, keys_done, rows_done,
                               batches_done, rows_retried)
             SELECT job, 0, NULL, NULL, $2, 'walking', keys_done, rows_done, batches_done,
                    rows_retried
               FROM {} WHERE job = $1",
            store.jobs()
        );
        c.execute(&sql, &[&job, &cursor])
            .await
            .map_err(|e| db_error("upgrading the job's checkpoint", &e))?;
        return Ok(1);
    }
    let mut los: Vec<Option<&str>> = vec![None];
    los.extend(inner.iter().map(|b| Some(b.as_str())));
    let mut his: Vec<Option<&str>> = inner.iter().map(|b| Some(b.as_str())).collect();
    his.push(None);
    let nos: Vec<i32> = (0..los.len() as i32).collect();
    let sql = format!(
        "INSERT INTO {rg} (job, range_no, lo, hi, cursor)
         SELECT $1, n, lo, hi, lo FROM unnest($2::int[], $3::text[], $4::text[]) AS u(n, lo, hi)"
    );
    c.execute(&sql, &[&job, &nos, &los, &his])
        .await
        .map_err(|e| db_error("creating the job's ranges", &e))?;
    Ok(nos.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::pick;

    #[test]
    fn picks_evenly_and_never_the_extremes() {
        let all: Vec<String> = (0..101).map(|i| format!("{i:03}")).collect();
        let b = pick(&all, 4);
        assert_eq!(b, ["025", "050", "075"]);
        assert!(pick(&all[..2], 4).is_empty());
        assert!(pick(&all, 1).is_empty());
        let few: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        assert_eq!(pick(&few, 16), ["b", "c"]);
    }
}
