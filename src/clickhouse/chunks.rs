//! Chunks of a ClickHouse job: months of the job's time range, days of a month, and ranges of
//! `split_column` values inside a chunk (halved at the median value, down to one value). Each
//! has a stable id that names its values, a predicate for `{chunk}` that the source's partition
//! key and sorting key can prune on, and a definition kept in the store with its record.

use super::client::{ident, literal};
use crate::spec::{ChunkLevel, ClickhouseSpec};
use chrono::{Datelike, Days, Months, NaiveDate};
use serde::{Deserialize, Serialize};

/// A range of `split_column` values: `lo <= v < hi` (an end that is `None` is open), or the
/// one value `lo` when `single`; and the rows whose value is NULL when `nulls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Values {
    pub lo: Option<String>,
    pub hi: Option<String>,
    #[serde(default)]
    pub single: bool,
    /// A NULL is in no range: the lowest half of every split keeps them, so that the halves
    /// of a chunk hold all its rows.
    #[serde(default)]
    pub nulls: bool,
    /// A single value whose NULLs were cut off into a chunk of their own (`apart`): its id
    /// says so, its parent (the same value with the NULLs) having the same value.
    #[serde(default)]
    pub nulls_apart: bool,
}

impl Values {
    /// Only the rows whose value is NULL (`apart`'s second chunk).
    pub fn only_nulls(&self) -> bool {
        self.nulls && !self.single && self.lo.is_none() && self.hi.is_none()
    }
}

/// A unit of a ClickHouse job: a time range, perhaps narrowed to some `split_column` values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub level: ChunkLevel,
    /// Inclusive, clipped to the job's range.
    pub from: NaiveDate,
    /// Exclusive, clipped to the job's range.
    pub to: NaiveDate,
    /// `2025-11` for a month, `2025-11-03` for a day; a value range keeps its parent's label.
    pub label: String,
    pub values: Option<Values>,
    /// Rows of the source inside the chunk, when known.
    #[serde(default)]
    pub rows: Option<u64>,
}

/// How a `split_column` value is written in SQL: numbers bare (18.16 refuses to compare a
/// number with a string literal), everything else as a string literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ValueKind {
    Number,
    #[default]
    Text,
}

impl ValueKind {
    /// From a ClickHouse type name.
    pub fn of(type_name: &str) -> ValueKind {
        let t = type_name
            .trim_start_matches("LowCardinality(")
            .trim_start_matches("Nullable(");
        if ["Int", "UInt", "Float", "Decimal"]
            .iter()
            .any(|p| t.starts_with(p))
        {
            ValueKind::Number
        } else {
            ValueKind::Text
        }
    }

    pub fn sql(self, v: &str) -> String {
        let numeric = !v.is_empty()
            && v.chars()
                .all(|c| c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E'));
        match self {
            ValueKind::Number if numeric => v.to_string(),
            _ => literal(v),
        }
    }
}

/// What the source's columns hold (read at preflight): how chunk predicates are written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Kinds {
    pub time: TimeKind,
    pub value: ValueKind,
}

impl Chunk {
    /// Stable id, the key of the chunk's record in the state table, naming its values.
    pub fn id(&self, spec: &ClickhouseSpec) -> String {
        let Some(v) = &self.values else {
            return self.label.clone();
        };
        let col = spec.split_column.as_deref().unwrap_or("split");
        if v.single && v.nulls_apart {
            let lo = v.lo.as_deref().unwrap_or("");
            return format!("{}/{col}={lo} not NULL", self.label);
        }
        if v.single {
            return format!("{}/{col}={}", self.label, v.lo.as_deref().unwrap_or(""));
        }
        if v.only_nulls() {
            return format!("{}/{col} IS NULL", self.label);
        }
        format!(
            "{}/{col}[{}..{})",
            self.label,
            v.lo.as_deref().unwrap_or(""),
            v.hi.as_deref().unwrap_or("")
        )
    }

    /// The level the chunk's learning is kept under.
    pub fn level_name(&self) -> &'static str {
        match (&self.values, self.level) {
            (Some(_), _) | (_, ChunkLevel::Split) => "split",
            (_, ChunkLevel::Day) => "day",
            (_, ChunkLevel::Month) => "month",
        }
    }

    /// The predicate substituted for `{chunk}`.
    pub fn predicate(&self, spec: &ClickhouseSpec, kinds: &Kinds) -> String {
        let time = time_predicate(spec, &kinds.time, self.from, self.to);
        let (Some(v), Some(col)) = (&self.values, &spec.split_column) else {
            return time;
        };
        let c = ident(col);
        let mut conds = Vec::new();
        if v.single {
            let lo = v.lo.as_deref().unwrap_or("");
            conds.push(format!("{c} = {}", kinds.value.sql(lo)));
        } else {
            if let Some(lo) = &v.lo {
                conds.push(format!("{c} >= {}", kinds.value.sql(lo)));
            }
            if let Some(hi) = &v.hi {
                conds.push(format!("{c} < {}", kinds.value.sql(hi)));
            }
        }
        match (conds.is_empty(), v.nulls) {
            (true, true) => format!("{time} AND {c} IS NULL"),
            (true, false) => time,
            (false, false) => format!("{time} AND {}", conds.join(" AND ")),
            (false, true) => format!("{time} AND ({} OR {c} IS NULL)", conds.join(" AND ")),
        }
    }

    /// A single value that holds the NULLs too (the lowest value of a split: the lower half
    /// keeps the NULLs all the way down), cut in two: the value alone, and the NULLs alone.
    /// Without this, a day whose lowest value and NULLs each fit but not together failed as
    /// "one value".
    pub fn apart(&self) -> Option<[Chunk; 2]> {
        let v = self.values.as_ref().filter(|v| v.single && v.nulls)?;
        let child = |values| Chunk {
            level: ChunkLevel::Split,
            values: Some(values),
            rows: None,
            ..self.clone()
        };
        Some([
            child(Values {
                lo: v.lo.clone(),
                hi: None,
                single: true,
                nulls: false,
                nulls_apart: true,
            }),
            child(Values {
                nulls: true,
                ..Values::default()
            }),
        ])
    }

    /// The two halves of this chunk's values, cut at `median` (the first value of the upper
    /// half); `single` marks a half that holds one value.
    pub fn halves(&self, median: &str, low_single: Option<&str>, high_single: bool) -> [Chunk; 2] {
        // An unsplit chunk holds the NULLs: its lower half keeps them.
        let v = self.values.clone().unwrap_or(Values {
            nulls: true,
            ..Values::default()
        });
        let low = match low_single {
            Some(only) => Values {
                lo: Some(only.to_string()),
                hi: None,
                single: true,
                nulls: v.nulls,
                nulls_apart: false,
            },
            None => Values {
                lo: v.lo.clone(),
                hi: Some(median.to_string()),
                single: false,
                nulls: v.nulls,
                nulls_apart: false,
            },
        };
        let high = if high_single {
            Values {
                lo: Some(median.to_string()),
                hi: None,
                single: true,
                nulls: false,
                nulls_apart: false,
            }
        } else {
            Values {
                lo: Some(median.to_string()),
                hi: v.hi.clone(),
                single: false,
                nulls: false,
                nulls_apart: false,
            }
        };
        let child = |values| Chunk {
            level: ChunkLevel::Split,
            values: Some(values),
            rows: None,
            ..self.clone()
        };
        [child(low), child(high)]
    }
}

/// What `time_column` holds, read from the server: it decides how boundaries are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeKind {
    /// `wide`: Date32, which holds days before 1970.
    Date { wide: bool },
    /// With the column's own time zone (`DateTime('Asia/Tokyo')`), if its type names one
    /// (else the server's, filled in at preflight); `wide`: DateTime64, which holds times before
    /// 1970; `by_date`: the server prunes on `toDate(col)` (20.1 and later), so bounds compare
    /// the day itself.
    DateTime {
        zone: Option<String>,
        wide: bool,
        by_date: bool,
    },
}

impl Default for TimeKind {
    fn default() -> TimeKind {
        TimeKind::DateTime {
            zone: None,
            wide: false,
            by_date: false,
        }
    }
}

impl TimeKind {
    /// From a ClickHouse type name (`Date`, `DateTime('UTC')`, `Nullable(DateTime64(3))`, ...);
    /// `None` for a column that holds no dates.
    pub fn of(type_name: &str) -> Option<TimeKind> {
        let t = type_name
            .trim_start_matches("Nullable(")
            .trim_start_matches("LowCardinality(");
        if t.starts_with("DateTime") {
            // The zone is the type's one quoted argument: DateTime64(3, 'Asia/Tokyo').
            let zone = t
                .split_once('\'')
                .and_then(|(_, rest)| rest.split_once('\''))
                .map(|(zone, _)| zone.to_string());
            Some(TimeKind::DateTime {
                zone,
                wide: t.starts_with("DateTime64"),
                by_date: false,
            })
        } else if t.starts_with("Date") {
            Some(TimeKind::Date {
                wide: t.starts_with("Date32"),
            })
        } else {
            None
        }
    }
}

/// The time part of a chunk's predicate. It must agree with `toDate(col)`, which labels the
/// days and months, in the column's zone (its own, else the server's, filled in at preflight).
/// - Current servers (`by_date`): the day itself, `toDate(col, 'zone') >= '2025-11-01' AND ...`,
///   which they prune on.
/// - 18.16: the column compared with constants, `col >= toDateTime('2025-11-01 00:00:00',
///   'zone') AND ...` (wrapping the column in `toDate()` reads the whole table there: measured
///   30M of 30M rows per day chunk; a bare string would be read in the server's zone, not the
///   column's). A chunk from 1970-01-01, the least `Date`, has no lower bound: `toDate` puts
///   every earlier time there (epoch 0 in a zone west of UTC). Not so for Date32 and
///   DateTime64, which hold earlier days: a job from 1970-01-01 leaves those to another job.
pub fn time_predicate(
    spec: &ClickhouseSpec,
    kind: &TimeKind,
    from: NaiveDate,
    to: NaiveDate,
) -> String {
    let col = ident(&spec.time_column);
    // Current servers: the day itself, as `toDate` labels it (toDate32 for DateTime64, which
    // holds days a Date does not), in the column's zone named outright (a `session_timezone`
    // in the spec's settings changes nothing). Exact in every zone, a day that starts at 01:00
    // (clocks springing forward at midnight) and the greatest DateTime included.
    if let TimeKind::DateTime {
        zone,
        wide,
        by_date: true,
    } = kind
    {
        let day = format!(
            "{}({col}{})",
            if *wide { "toDate32" } else { "toDate" },
            zone.as_deref()
                .map(|z| format!(", {}", literal(z)))
                .unwrap_or_default()
        );
        return format!(
            "{day} >= {} AND {day} < {}",
            literal(&from.to_string()),
            literal(&to.to_string())
        );
    }
    let written = |d: NaiveDate| match kind {
        TimeKind::Date { .. } => literal(&d.to_string()),
        TimeKind::DateTime { zone: None, .. } => literal(&format!("{d} 00:00:00")),
        TimeKind::DateTime {
            zone: Some(zone), ..
        } => format!(
            "toDateTime({}, {})",
            literal(&format!("{d} 00:00:00")),
            literal(zone)
        ),
    };
    // 18.16 reads a date written past 2105 as 0 (its calendar ends there), and its `toDate`
    // puts the times of a DateTime's last day, 2106-02-07 (the greatest DateTime, a "never"
    // sentinel, among them), on day 0, 1970-01-01. So a bound past 2105 counts days from
    // 2105-12-31 (no bound at all past the last day a type holds), and the times `toDate`
    // puts on day 0 go with the chunk from 1970-01-01, as their day says.
    let date = |y, m, d| NaiveDate::from_ymd_opt(y, m, d).expect("a date");
    let wide = matches!(
        kind,
        TimeKind::Date { wide: true } | TimeKind::DateTime { wide: true, .. }
    );
    let last_written = date(2105, 12, 31);
    let datetime = matches!(kind, TimeKind::DateTime { wide: false, .. });
    let holds_up_to = if datetime {
        date(2106, 2, 7)
    } else {
        date(2149, 6, 6)
    };
    let at = |d: NaiveDate| {
        if d <= last_written || wide {
            return Some(written(d));
        }
        let days = (d - last_written).num_days();
        (d <= holds_up_to).then(|| match kind {
            TimeKind::Date { .. } => format!("(toDate('{last_written}') + {days})"),
            TimeKind::DateTime { zone, .. } => format!(
                "(toDateTime('{last_written} 00:00:00'{}) + {})",
                zone.as_deref()
                    .map(|z| format!(", {}", literal(z)))
                    .unwrap_or_default(),
                days * 86_400
            ),
        })
    };
    let day_zero = format!("toUInt16(toDate({col})) = 0");
    let open_below = !wide && from <= date(1970, 1, 1);
    let mut conds = Vec::new();
    if !open_below {
        match at(from) {
            Some(lo) => conds.push(format!("{col} >= {lo}")),
            None => return "0 = 1".to_string(),
        }
    }
    if let Some(hi) = at(to) {
        conds.push(format!("{col} < {hi}"));
    }
    if datetime && to > last_written {
        conds.push(format!("NOT {day_zero}"));
    }
    match (conds.len(), open_below && datetime) {
        (0, _) => "1 = 1".to_string(),
        (_, false) => conds.join(" AND "),
        (1, true) => format!("({} OR {day_zero})", conds[0]),
        (_, true) => format!("(({}) OR {day_zero})", conds.join(" AND ")),
    }
}

fn month_start(d: NaiveDate) -> NaiveDate {
    d.with_day(1).expect("day 1 exists")
}

/// The top rung's chunks covering [from, to).
pub fn top(spec: &ClickhouseSpec, from: NaiveDate, to: NaiveDate) -> Vec<Chunk> {
    match spec.chunks.first() {
        Some(ChunkLevel::Day) => days(from, to),
        Some(ChunkLevel::Split) => vec![whole(from, to)],
        _ => months(from, to),
    }
}

fn whole(from: NaiveDate, to: NaiveDate) -> Chunk {
    Chunk {
        level: ChunkLevel::Split,
        from,
        to,
        label: format!("{from}..{to}"),
        values: None,
        rows: None,
    }
}

pub fn months(from: NaiveDate, to: NaiveDate) -> Vec<Chunk> {
    let mut out = Vec::new();
    let mut m = month_start(from);
    while m < to {
        let next = m + Months::new(1);
        out.push(Chunk {
            level: ChunkLevel::Month,
            from: m.max(from),
            to: next.min(to),
            label: format!("{:04}-{:02}", m.year(), m.month()),
            values: None,
            rows: None,
        });
        m = next;
    }
    out
}

pub fn days(from: NaiveDate, to: NaiveDate) -> Vec<Chunk> {
    let mut out = Vec::new();
    let mut d = from;
    while d < to {
        let next = d + Days::new(1);
        out.push(Chunk {
            level: ChunkLevel::Day,
            from: d,
            to: next,
            label: d.to_string(),
            values: None,
            rows: None,
        });
        d = next;
    }
    out
}

/// The rung below `level` in the spec's ladder, if any.
pub fn next_level(spec: &ClickhouseSpec, level: ChunkLevel) -> Option<ChunkLevel> {
    let at = spec.chunks.iter().position(|l| *l == level)?;
    spec.chunks.get(at + 1).copied()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    pub(in crate::clickhouse) fn spec() -> ClickhouseSpec {
        crate::spec::ClickhouseSpec {
            endpoint: "http://h:8123".into(),
            database: "db".into(),
            user: None,
            password: None,
            state_url: None,
            source: "runs".into(),
            time_column: "ran_at".into(),
            split_column: Some("project_id".into()),
            from: None,
            to: None,
            chunks: vec![ChunkLevel::Month, ChunkLevel::Day, ChunkLevel::Split],
            target: "agg".into(),
            settings: vec![],
            statement: String::new(),
            verify: None,
            land_without_views: false,
        }
    }

    #[test]
    fn months_are_clipped_to_the_range() {
        let m = months(d("2025-11-15"), d("2026-02-03"));
        let labels: Vec<_> = m.iter().map(|c| c.label.as_str()).collect();
        assert_eq!(labels, ["2025-11", "2025-12", "2026-01", "2026-02"]);
        assert_eq!((m[0].from, m[0].to), (d("2025-11-15"), d("2025-12-01")));
        assert_eq!((m[3].from, m[3].to), (d("2026-02-01"), d("2026-02-03")));
        assert_eq!(days(m[3].from, m[3].to).len(), 2);
    }

    #[test]
    fn boundaries_compare_the_column_itself() {
        let dt = |zone: Option<&str>, wide| TimeKind::DateTime {
            zone: zone.map(str::to_string),
            wide,
            by_date: false,
        };
        let date = |wide| TimeKind::Date { wide };
        assert_eq!(
            TimeKind::of("DateTime('UTC')"),
            Some(dt(Some("UTC"), false))
        );
        assert_eq!(TimeKind::of("DateTime"), Some(dt(None, false)));
        assert_eq!(
            TimeKind::of("Nullable(DateTime64(3))"),
            Some(dt(None, true))
        );
        assert_eq!(
            TimeKind::of("Nullable(DateTime64(3, 'Asia/Tokyo'))"),
            Some(dt(Some("Asia/Tokyo"), true))
        );
        assert_eq!(TimeKind::of("Date"), Some(date(false)));
        assert_eq!(TimeKind::of("Date32"), Some(date(true)));
        assert_eq!(TimeKind::of("UInt32"), None);
        let spec = spec();
        let (f, t) = (d("2025-11-01"), d("2025-12-01"));
        assert_eq!(
            time_predicate(&spec, &dt(None, false), f, t),
            "`ran_at` >= '2025-11-01 00:00:00' AND `ran_at` < '2025-12-01 00:00:00'"
        );
        assert_eq!(
            time_predicate(&spec, &dt(Some("Asia/Tokyo"), false), f, t),
            "`ran_at` >= toDateTime('2025-11-01 00:00:00', 'Asia/Tokyo') \
             AND `ran_at` < toDateTime('2025-12-01 00:00:00', 'Asia/Tokyo')"
        );
        assert_eq!(
            time_predicate(&spec, &date(false), f, t),
            "`ran_at` >= '2025-11-01' AND `ran_at` < '2025-12-01'"
        );
        // The least Date takes every earlier time: no lower bound. Date32 and DateTime64 hold
        // earlier days, which a job from 1970-01-01 leaves out.
        let epoch = d("1970-01-01");
        assert_eq!(
            time_predicate(&spec, &date(false), epoch, t),
            "`ran_at` < '2025-12-01'"
        );
        assert_eq!(
            time_predicate(&spec, &date(true), epoch, t),
            "`ran_at` >= '1970-01-01' AND `ran_at` < '2025-12-01'"
        );
        assert!(time_predicate(&spec, &dt(None, true), epoch, t).contains(">= '1970-01-01"));
        // 18.16's calendar ends with 2105: bounds past it count days from its last day, and
        // the times its `toDate` puts on day 0 go with the first chunk.
        let (feb, end) = (d("2106-02-01"), d("2106-03-01"));
        assert_eq!(
            time_predicate(&spec, &dt(None, false), epoch, t),
            "(`ran_at` < '2025-12-01 00:00:00' OR toUInt16(toDate(`ran_at`)) = 0)"
        );
        assert_eq!(
            time_predicate(&spec, &dt(None, false), f, feb),
            "`ran_at` >= '2025-11-01 00:00:00' AND `ran_at` < (toDateTime('2105-12-31 00:00:00') + 2764800) \
             AND NOT toUInt16(toDate(`ran_at`)) = 0"
        );
        assert_eq!(
            time_predicate(&spec, &dt(None, false), feb, end),
            "`ran_at` >= (toDateTime('2105-12-31 00:00:00') + 2764800) AND NOT toUInt16(toDate(`ran_at`)) = 0"
        );
        assert_eq!(
            time_predicate(&spec, &dt(None, false), epoch, end),
            "(NOT toUInt16(toDate(`ran_at`)) = 0 OR toUInt16(toDate(`ran_at`)) = 0)"
        );
        assert_eq!(
            time_predicate(&spec, &date(false), f, end),
            "`ran_at` >= '2025-11-01' AND `ran_at` < (toDate('2105-12-31') + 60)"
        );
        assert_eq!(
            time_predicate(&spec, &date(true), f, end),
            "`ran_at` >= '2025-11-01' AND `ran_at` < '2106-03-01'"
        );
        // Current servers compare the day itself, in the zone named.
        let by_date = |wide| TimeKind::DateTime {
            zone: Some("America/Santiago".into()),
            wide,
            by_date: true,
        };
        assert_eq!(
            time_predicate(&spec, &by_date(false), f, t),
            "toDate(`ran_at`, 'America/Santiago') >= '2025-11-01' \
             AND toDate(`ran_at`, 'America/Santiago') < '2025-12-01'"
        );
        assert!(time_predicate(&spec, &by_date(true), epoch, t).starts_with("toDate32("));
    }

    #[test]
    fn halves_name_their_values_and_prune_on_them() {
        let spec = spec();
        let kinds = Kinds {
            time: TimeKind::Date { wide: false },
            value: ValueKind::Number,
        };
        let day = days(d("2025-11-03"), d("2025-11-04")).remove(0);
        let [a, b] = day.halves("9", None, false);
        assert_eq!(a.id(&spec), "2025-11-03/project_id[..9)");
        assert_eq!(b.id(&spec), "2025-11-03/project_id[9..)");
        // The lowest half of every split keeps the rows whose value is NULL.
        assert!(
            a.predicate(&spec, &kinds)
                .ends_with("AND (`project_id` < 9 OR `project_id` IS NULL)")
        );
        assert!(
            b.predicate(&spec, &kinds)
                .ends_with("AND `project_id` >= 9")
        );
        let [c, e] = b.halves("12", Some("9"), true);
        assert_eq!(c.id(&spec), "2025-11-03/project_id=9");
        assert!(c.predicate(&spec, &kinds).ends_with("AND `project_id` = 9"));
        assert_eq!(e.id(&spec), "2025-11-03/project_id=12");
        let [g, _] = a.halves("5", Some("1"), false);
        assert!(
            g.predicate(&spec, &kinds)
                .ends_with("AND (`project_id` = 1 OR `project_id` IS NULL)")
        );
        // That one value with the NULLs is cut once more: the value alone, the NULLs alone.
        assert!(c.apart().is_none());
        let [one, nulls] = g.apart().expect("a value with the NULLs");
        assert_eq!(one.id(&spec), "2025-11-03/project_id=1 not NULL");
        assert!(
            one.predicate(&spec, &kinds)
                .ends_with("AND `project_id` = 1")
        );
        assert_eq!(nulls.id(&spec), "2025-11-03/project_id IS NULL");
        assert!(
            nulls
                .predicate(&spec, &kinds)
                .ends_with("AND `project_id` IS NULL")
        );
        assert!(one.apart().is_none() && nulls.apart().is_none());
        let text = Kinds {
            time: TimeKind::Date { wide: false },
            value: ValueKind::Text,
        };
        assert!(
            a.predicate(&spec, &text)
                .ends_with("AND (`project_id` < '9' OR `project_id` IS NULL)")
        );
        assert_eq!(ValueKind::Number.sql("1; DROP"), "'1; DROP'");
    }
}
