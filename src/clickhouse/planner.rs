//! Row counts that guide the ladder: the job's time range, rows per month (from system.parts
//! when the source is partitioned by month, else one GROUP BY), rows per day of a month, and
//! the distinct `split_column` values of a chunk.

use super::chunks::{Chunk, TimeKind, time_predicate};
use super::client::{ident, literal};
use super::errors::ch_error;
use crate::error::{Error, Result};
use crate::spec::ClickhouseSpec;
use chrono::{Datelike, Days, NaiveDate};
use clickhouse::{Client, Row};
use serde::Deserialize;
use std::collections::HashMap;

#[derive(Row, Deserialize)]
struct Count {
    label: String,
    rows: u64,
}

/// [from, to) of the job: the spec's bounds, else the source's min/max of `time_column`.
pub async fn range(c: &Client, spec: &ClickhouseSpec) -> Result<Option<(NaiveDate, NaiveDate)>> {
    if let (Some(f), Some(t)) = (spec.from, spec.to) {
        return Ok(Some((f, t)));
    }
    #[derive(Row, Deserialize)]
    struct Bounds {
        lo: String,
        hi: String,
        n: u64,
    }
    let col = ident(&spec.time_column);
    let sql = format!(
        "SELECT toString(min(toDate({col}))) AS lo, toString(max(toDate({col}))) AS hi, count() AS n FROM {}",
        ident(&spec.source)
    );
    let b: Bounds = c
        .query(&sql)
        .fetch_one()
        .await
        .map_err(|e| ch_error("finding the source's time range", &e))?;
    if b.n == 0 {
        return Ok(None);
    }
    let parse = |s: &str| {
        s.parse::<NaiveDate>()
            .map_err(|e| Error::Preflight(format!("source time range {s:?}: {e}")))
    };
    let from = spec.from.unwrap_or(parse(&b.lo)?);
    let to = spec.to.unwrap_or(parse(&b.hi)? + Days::new(1));
    Ok((from < to).then_some((from, to)))
}

/// Source rows per month label (`2025-11`) in [from, to).
pub async fn month_rows(
    c: &Client,
    spec: &ClickhouseSpec,
    kind: TimeKind,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<HashMap<String, u64>> {
    let aligned = from.day() == 1 && to.day() == 1;
    if aligned && partitioned_by_month(c, spec).await? {
        let (db, table) = qualified(spec);
        let parts: Vec<Count> = c
            .query(
                "SELECT partition AS label, sum(rows) AS rows FROM system.parts
                  WHERE database = ? AND table = ? AND active GROUP BY partition",
            )
            .bind(db)
            .bind(table)
            .fetch_all()
            .await
            .map_err(|e| ch_error("reading the source's partitions", &e))?;
        return Ok(parts
            .into_iter()
            .filter_map(|p| {
                let (y, m) = p.label.trim_matches('\'').split_at_checked(4)?;
                Some((format!("{y}-{m}"), p.rows))
            })
            .collect());
    }
    let col = ident(&spec.time_column);
    let sql = format!(
        "SELECT substring(toString(toDate({col})), 1, 7) AS label, count() AS rows FROM {}
          WHERE {} GROUP BY label",
        ident(&spec.source),
        time_predicate(spec, kind, from, to)
    );
    counts(c, &sql, "counting the source's rows per month").await
}

/// Source rows per day (`2025-11-03`) inside a chunk.
pub async fn day_rows(
    c: &Client,
    spec: &ClickhouseSpec,
    kind: TimeKind,
    chunk: &Chunk,
) -> Result<HashMap<String, u64>> {
    let sql = format!(
        "SELECT toString(toDate({})) AS label, count() AS rows FROM {} WHERE {} GROUP BY label",
        ident(&spec.time_column),
        ident(&spec.source),
        chunk.predicate(spec, kind)
    );
    counts(c, &sql, "counting the source's rows per day").await
}

/// Source rows inside a chunk.
pub async fn rows(c: &Client, spec: &ClickhouseSpec, kind: TimeKind, chunk: &Chunk) -> Result<u64> {
    let sql = format!(
        "SELECT count() FROM {} WHERE {}",
        ident(&spec.source),
        chunk.predicate(spec, kind)
    );
    c.query(&sql)
        .fetch_one()
        .await
        .map_err(|e| ch_error("counting the chunk's rows", &e))
}

/// Distinct `split_column` values in a chunk's time range.
pub async fn distinct(
    c: &Client,
    spec: &ClickhouseSpec,
    kind: TimeKind,
    chunk: &Chunk,
) -> Result<u64> {
    let col = spec.split_column.as_deref().unwrap_or_default();
    let sql = format!(
        "SELECT uniqExact({}) FROM {} WHERE {}",
        ident(col),
        ident(&spec.source),
        time_predicate(spec, kind, chunk.from, chunk.to)
    );
    c.query(&sql)
        .fetch_one()
        .await
        .map_err(|e| ch_error("counting split_column values", &e))
}

async fn counts(c: &Client, sql: &str, what: &str) -> Result<HashMap<String, u64>> {
    let rows: Vec<Count> = c
        .query(sql)
        .fetch_all()
        .await
        .map_err(|e| ch_error(what, &e))?;
    Ok(rows.into_iter().map(|r| (r.label, r.rows)).collect())
}

fn qualified(spec: &ClickhouseSpec) -> (String, String) {
    match spec.source.split_once('.') {
        Some((d, t)) => (d.trim_matches('`').into(), t.trim_matches('`').into()),
        None => (spec.database.clone(), spec.source.trim_matches('`').into()),
    }
}

async fn partitioned_by_month(c: &Client, spec: &ClickhouseSpec) -> Result<bool> {
    let (db, table) = qualified(spec);
    let keys: Vec<String> = c
        .query("SELECT partition_key FROM system.tables WHERE database = ? AND name = ?")
        .bind(db)
        .bind(table)
        .fetch_all()
        .await
        .map_err(|e| ch_error("reading the source table", &e))?;
    let want = format!("toYYYYMM({})", spec.time_column.trim_matches('`'));
    Ok(keys.first().is_some_and(|k| k.replace(' ', "") == want))
}

/// Check that the source has the columns the spec names; returns what `time_column` holds.
pub async fn check_source(c: &Client, spec: &ClickhouseSpec) -> Result<TimeKind> {
    #[derive(Row, Deserialize)]
    struct Column {
        name: String,
        #[serde(rename = "type")]
        ty: String,
    }
    let (db, table) = qualified(spec);
    let columns: Vec<Column> = c
        .query("SELECT name, type FROM system.columns WHERE database = ? AND table = ?")
        .bind(&db)
        .bind(&table)
        .fetch_all()
        .await
        .map_err(|e| ch_error("reading the source table", &e))?;
    let cols: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
    if cols.is_empty() {
        return Err(Error::Preflight(format!(
            "clickhouse.source: table {db}.{table} does not exist"
        )));
    }
    for (field, col) in [
        ("clickhouse.time_column", Some(&spec.time_column)),
        ("clickhouse.split_column", spec.split_column.as_ref()),
    ] {
        if let Some(col) = col
            && !cols.contains(&col.trim_matches('`'))
        {
            return Err(Error::Preflight(format!(
                "{field}: column {} does not exist in {db}.{table} (columns: {})",
                literal(col),
                cols.join(", ")
            )));
        }
    }
    let time = columns
        .iter()
        .find(|c| c.name == spec.time_column.trim_matches('`'))
        .map(|c| TimeKind::of(&c.ty))
        .unwrap_or_default();
    Ok(time)
}
