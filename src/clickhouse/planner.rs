//! What the source holds: the job's time range, rows per month (from system.parts when the
//! source is partitioned by `toYYYYMM(time_column)`, else one GROUP BY), rows per day of a
//! chunk, the rows of one chunk, where to cut a chunk's `split_column` values in half, and the
//! checks of the columns the spec names.

use super::chunks::{Chunk, Kinds, TimeKind, ValueKind, time_predicate};
use super::client::{ident, literal, number, rows, table_rows};
use crate::error::{Error, Result};
use crate::spec::ClickhouseSpec;
use chrono::{Datelike, Days, NaiveDate};
use clickhouse::Client;
use std::collections::HashMap;

/// [from, to) of the job: the spec's bounds, else the source's min/max of `time_column`.
pub async fn range(c: &Client, spec: &ClickhouseSpec) -> Result<Option<(NaiveDate, NaiveDate)>> {
    if let (Some(f), Some(t)) = (spec.from, spec.to) {
        return Ok(Some((f, t)));
    }
    let col = ident(&spec.time_column);
    // Day numbers, not dates as text: 18.16 prints a Date past 2106-02-07 as 1970-01-01 (its
    // calendar ends there), and the range came out empty, the job done with nothing landed.
    let sql = format!(
        "SELECT toUInt16(min(toDate({col}))), toUInt16(max(toDate({col}))), count() FROM {}",
        ident(&spec.source)
    );
    let r = rows(c, &sql, "finding the source's time range").await?;
    let Some(r) = r.first().filter(|r| r.len() == 3) else {
        return Err(Error::fatal("finding the source's time range: no answer"));
    };
    if r[2] == "0" {
        return Ok(None);
    }
    // Day 0 is 1970-01-01, where `toDate` puts a DateTime never set (epoch 0), and every
    // earlier time of a zone west of UTC.
    let parse = |s: &str| {
        let days: u64 = s.parse().map_err(|e| {
            Error::Preflight(format!(
                "source time range: day {s:?}: {e}; set clickhouse.from and clickhouse.to"
            ))
        })?;
        Ok::<_, Error>(NaiveDate::from_ymd_opt(1970, 1, 1).expect("a date") + Days::new(days))
    };
    let from = spec.from.unwrap_or(parse(&r[0])?);
    let to = spec.to.unwrap_or(parse(&r[1])? + Days::new(1));
    Ok((from < to).then_some((from, to)))
}

/// Why a `to` past tomorrow (UTC, a day of slack for the source's time zone) cannot be, unless
/// the source already holds rows up to it (the caller checks): the
/// chunks of days still to come would run now, empty or short, be recorded done, and the rows
/// those days bring never be filled, the job done all the same. Tomorrow is what `to` defaults
/// to when the source has rows of today.
pub fn to_come(to: NaiveDate, today: NaiveDate) -> Option<String> {
    let tomorrow = today + chrono::Days::new(1);
    (to > tomorrow).then(|| {
        format!(
            "{to} is after tomorrow ({tomorrow}): the days from {tomorrow} on have not happened \
             yet, and their chunks would be recorded done with the rows they hold now and never \
             filled again; set `to` to {tomorrow} or earlier (or leave it out: the day after the \
             newest row), and give the days to come a job of their own once they are over"
        )
    })
}

/// Source rows of `day` and later.
pub async fn rows_from(c: &Client, spec: &ClickhouseSpec, day: NaiveDate) -> Result<u64> {
    let sql = format!(
        "SELECT count() FROM {} WHERE toDate({}) >= toDate({})",
        ident(&spec.source),
        ident(&spec.time_column),
        literal(&day.to_string())
    );
    number(c, &sql, "counting the source's rows of days to come").await
}

/// Source rows per month label (`2025-11`) in [from, to).
pub async fn month_rows(
    c: &Client,
    spec: &ClickhouseSpec,
    kind: &TimeKind,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<HashMap<String, u64>> {
    let aligned = from.day() == 1 && to.day() == 1;
    if aligned && partitioned_by_month(c, spec).await? {
        let (db, table) = qualified(spec);
        let sql = format!(
            "SELECT partition, sum(rows) FROM system.parts
              WHERE database = {} AND table = {} AND active GROUP BY partition",
            literal(&db),
            literal(&table)
        );
        return Ok(rows(c, &sql, "reading the source's partitions")
            .await?
            .into_iter()
            .filter_map(|r| {
                let (y, m) = r.first()?.trim_matches('\'').split_at_checked(4)?;
                Some((format!("{y}-{m}"), r.get(1)?.parse().ok()?))
            })
            .collect());
    }
    let col = ident(&spec.time_column);
    let sql = format!(
        "SELECT substring(toString(toDate({col})), 1, 7) AS label, count() FROM {}
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
    kinds: &Kinds,
    chunk: &Chunk,
) -> Result<HashMap<String, u64>> {
    let sql = format!(
        "SELECT toString(toDate({})) AS label, count() FROM {} WHERE {} GROUP BY label",
        ident(&spec.time_column),
        ident(&spec.source),
        chunk.predicate(spec, kinds)
    );
    counts(c, &sql, "counting the source's rows per day").await
}

/// Source rows inside a chunk.
pub async fn chunk_rows(
    c: &Client,
    spec: &ClickhouseSpec,
    kinds: &Kinds,
    chunk: &Chunk,
) -> Result<u64> {
    let sql = format!(
        "SELECT count() FROM {} WHERE {}",
        ident(&spec.source),
        chunk.predicate(spec, kinds)
    );
    number(c, &sql, "counting the chunk's rows").await
}

/// A chunk's source rows and each of its children's, read in one query (one set of parts),
/// so that rows written meanwhile count on both sides: (the chunk's rows, each child's).
pub async fn cover(
    c: &Client,
    spec: &ClickhouseSpec,
    kinds: &Kinds,
    chunk: &Chunk,
    kids: &[Chunk],
) -> Result<(u64, Vec<u64>)> {
    let each: Vec<String> = kids
        .iter()
        .map(|k| format!("countIf({})", k.predicate(spec, kinds)))
        .collect();
    let sql = format!(
        "SELECT count(), {} FROM {} WHERE {}",
        each.join(", "),
        ident(&spec.source),
        chunk.predicate(spec, kinds)
    );
    let r = rows(
        c,
        &sql,
        "counting the rows of a chunk and of its smaller chunks",
    )
    .await?;
    let nums: Vec<u64> = r
        .first()
        .map(|r| r.iter().filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_default();
    match nums.split_first() {
        Some((&n, each)) if each.len() == kids.len() => Ok((n, each.to_vec())),
        _ => Err(Error::fatal(
            "counting the rows of a chunk and of its smaller chunks: no answer",
        )),
    }
}

/// Where to cut a chunk's `split_column` values in half: `None` if it holds fewer than two;
/// else the first value of the upper half, with the lower half's only value if it has one, and
/// whether the upper half has one.
pub async fn median(
    c: &Client,
    spec: &ClickhouseSpec,
    kinds: &Kinds,
    chunk: &Chunk,
) -> Result<Option<(String, Option<String>, bool)>> {
    let col = ident(spec.split_column.as_deref().unwrap_or_default());
    let (src, pred) = (ident(&spec.source), chunk.predicate(spec, kinds));
    let n = number(
        c,
        &format!("SELECT uniqExact({col}) FROM {src} WHERE {pred}"),
        "counting split_column values",
    )
    .await?;
    if n < 2 {
        return Ok(None);
    }
    // As hex: the bound is written back into the chunk's predicate, so it must be the value's
    // very bytes; a String that is not UTF-8 would come back altered (U+FFFD), and a predicate
    // on the altered value never splits the chunk, which was split again and again.
    let at = |i: u64| {
        format!(
            "SELECT hex(toString(v)) FROM (SELECT DISTINCT {col} AS v FROM {src}
                                            WHERE {pred} AND {col} IS NOT NULL)
              ORDER BY v LIMIT 1 OFFSET {i}"
        )
    };
    let value = async |i: u64| -> Result<String> {
        let r = rows(c, &at(i), "finding where to split the chunk").await?;
        let h = r
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next())
            .ok_or_else(|| Error::fatal("finding where to split the chunk: the source changed"))?;
        let bytes = hex::decode(&h)
            .map_err(|e| Error::fatal(format!("finding where to split the chunk: {e}")))?;
        String::from_utf8(bytes).map_err(|e| {
            Error::fatal(format!(
                "chunk {}: a value of clickhouse.split_column is not UTF-8 text ({:?}), so the \
                 chunk cannot be split at it; split by another column, or give the chunk \
                 more memory (clickhouse.settings)",
                chunk.id(spec),
                String::from_utf8_lossy(e.as_bytes())
            ))
        })
    };
    let m = n / 2;
    let mid = value(m).await?;
    let low_single = if m == 1 { Some(value(0).await?) } else { None };
    Ok(Some((mid, low_single, n - m == 1)))
}

/// Rows per label (18.16 prints day 0, 1970-01-01, as 0000-00-00).
async fn counts(c: &Client, sql: &str, what: &str) -> Result<HashMap<String, u64>> {
    let mut out = HashMap::new();
    for r in rows(c, sql, what).await? {
        if let (Some(label), Some(Ok(n))) = (r.first(), r.get(1).map(|n| n.parse::<u64>())) {
            let label = match label.as_str() {
                "0000-00-00" => "1970-01-01",
                "0000-00" => "1970-01",
                l => l,
            };
            *out.entry(label.to_string()).or_default() += n;
        }
    }
    Ok(out)
}

fn qualified(spec: &ClickhouseSpec) -> (String, String) {
    match spec.source.split_once('.') {
        Some((d, t)) => (d.trim_matches('`').into(), t.trim_matches('`').into()),
        None => (spec.database.clone(), spec.source.trim_matches('`').into()),
    }
}

async fn partitioned_by_month(c: &Client, spec: &ClickhouseSpec) -> Result<bool> {
    let (db, table) = qualified(spec);
    let sql = format!(
        "SELECT partition_key FROM system.tables WHERE database = {} AND name = {}",
        literal(&db),
        literal(&table)
    );
    let keys = table_rows(c, &sql, "reading the source table").await?;
    let want = format!("toYYYYMM({})", spec.time_column.trim_matches('`'));
    Ok(keys
        .first()
        .and_then(|r| r.first())
        .is_some_and(|k| k.replace(' ', "") == want))
}

/// Check that the source has the columns the spec names, with types the chunks can use;
/// returns how their values are written.
pub async fn check_source(c: &Client, spec: &ClickhouseSpec, by_date: bool) -> Result<Kinds> {
    let (db, table) = qualified(spec);
    let sql = format!(
        "SELECT name, type FROM system.columns WHERE database = {} AND table = {}",
        literal(&db),
        literal(&table)
    );
    let columns = rows(c, &sql, "reading the source table").await?;
    if columns.is_empty() {
        return Err(Error::Preflight(format!(
            "clickhouse.source: table {db}.{table} does not exist"
        )));
    }
    let type_of = |col: &str| {
        columns
            .iter()
            .find(|r| r.first().map(String::as_str) == Some(col.trim_matches('`')))
            .and_then(|r| r.get(1).cloned())
    };
    let names: Vec<&str> = columns
        .iter()
        .filter_map(|r| r.first().map(String::as_str))
        .collect();
    let missing = |field: &str, col: &str| {
        Error::Preflight(format!(
            "{field}: column {} does not exist in {db}.{table} (columns: {})",
            literal(col),
            names.join(", ")
        ))
    };
    let time_type = type_of(&spec.time_column)
        .ok_or_else(|| missing("clickhouse.time_column", &spec.time_column))?;
    let time = TimeKind::of(&time_type).ok_or_else(|| {
        Error::Preflight(format!(
            "clickhouse.time_column: column {} of {db}.{table} is {time_type}; chunks are cut \
             by date, so it must be a Date or DateTime column",
            literal(&spec.time_column)
        ))
    })?;
    // A DateTime without a zone of its own is read in the server's zone by `toDate()` here,
    // but a chunk query carries the spec's settings, and `session_timezone` among them would
    // read a bare bound in another zone: the bounds name the server's zone.
    let time = match time {
        TimeKind::DateTime { zone, wide, .. } => {
            let zone = match zone {
                Some(z) => Some(z),
                None => rows(c, "SELECT timezone()", "reading the server's time zone")
                    .await?
                    .first()
                    .and_then(|r| r.first())
                    .cloned(),
            };
            TimeKind::DateTime {
                zone,
                wide,
                by_date,
            }
        }
        other => other,
    };
    left_behind(c, spec, &time_type).await?;
    let value = match &spec.split_column {
        Some(col) => {
            ValueKind::of(&type_of(col).ok_or_else(|| missing("clickhouse.split_column", col))?)
        }
        None => ValueKind::default(),
    };
    Ok(Kinds { time, value })
}

/// Refuse a source with rows no chunk would ever read: a NULL time (in no day), or, in a
/// `DateTime64` or `Date32` column, a time outside what a `Date` holds (1970-01-01 to
/// 2149-06-05), which the chunks' dates would wrap around. With `from` and `to` both set, the
/// rows outside them (NULL times included) are left out knowingly and do not count.
async fn left_behind(c: &Client, spec: &ClickhouseSpec, time_type: &str) -> Result<()> {
    let inner = time_type
        .trim_start_matches("Nullable(")
        .trim_start_matches("LowCardinality(");
    let nullable = time_type.starts_with("Nullable(");
    let wide = inner.starts_with("DateTime64") || inner.starts_with("Date32");
    if (!nullable && !wide) || (spec.from.is_some() && spec.to.is_some()) {
        return Ok(());
    }
    let col = ident(&spec.time_column);
    // An end the spec gives leaves the rows beyond it out knowingly.
    let mut out = vec!["0".to_string()];
    if wide && spec.from.is_none() {
        out.push(format!("{col} < '1970-01-01'"));
    }
    if wide && spec.to.is_none() {
        out.push(format!("{col} >= '2149-06-06'"));
    }
    let sql = format!(
        "SELECT countIf(isNull({col})), countIf(NOT isNull({col}) AND ({})) FROM {}",
        out.join(" OR "),
        ident(&spec.source)
    );
    let r = rows(c, &sql, "looking for rows no chunk would read").await?;
    let n = |i: usize| -> u64 {
        r.first()
            .and_then(|r| r.get(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (nulls, outside) = (n(0), n(1));
    if nulls > 0 {
        return Err(Error::Preflight(format!(
            "clickhouse.time_column: {nulls} row(s) of {} have a NULL {}; chunks are cut by \
             time, so no chunk would read them. Give them a time, or set clickhouse.from and \
             clickhouse.to to leave them out knowingly",
            spec.source, spec.time_column
        )));
    }
    if outside > 0 {
        return Err(Error::Preflight(format!(
            "clickhouse.time_column: {outside} row(s) of {} have a {} before 1970-01-01 or \
             after 2149-06-05, which chunks (dates) cannot hold; set clickhouse.from and \
             clickhouse.to to leave them out knowingly",
            spec.source, spec.time_column
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_to_past_tomorrow_is_refused() {
        use super::to_come;
        let d = |s: &str| s.parse::<chrono::NaiveDate>().unwrap();
        assert!(to_come(d("2026-12-02"), d("2026-12-01")).is_none());
        assert!(to_come(d("2026-11-01"), d("2026-12-01")).is_none());
        let why = to_come(d("2027-01-01"), d("2026-12-01")).unwrap();
        assert!(why.contains("after tomorrow (2026-12-02)"), "{why}");
    }
}
