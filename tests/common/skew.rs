//! The skewed ClickHouse dataset of tests/clickhouse.rs, shared with scripts/ch-calibrate.sh
//! (through examples/ch_skew_data.rs) so that calibration measures exactly the tests' data.

/// Distinct (project_id, test_case_id) keys of a normal month; it has twice as many rows.
pub const SKEW_K: u64 = 65_536;

/// The big month, 5x a normal month in rows and in distinct keys.
pub const BIG_MONTH: &str = "2026-01";
/// The big month's heavy day: 3K distinct keys (196,608) over 16 projects and 6K rows (393,216),
/// more than a normal month; the big month's other 30 days share 2K keys and 4K rows.
pub const HEAVY_DAY: &str = "2026-01-15";

/// Tables `runs` (source: MergeTree partitioned by month, one part per month) and `agg`
/// (AggregatingMergeTree target: countState/sumState by key) in `db`, with six months
/// 2025-11..2026-04 of `k` keys (2k rows) each, except 2026-01: 5k keys (10k rows), 3k of them
/// (6k rows) on 2026-01-15. Project and test case come from one number, but every day draws
/// from all of them, so each day holds all 16 projects. With `second_big`, 2026-03 is big too,
/// spread evenly over its days (no heavy day).
pub fn build_skew(q: &dyn Fn(&str), k: u64, second_big: bool) {
    q(
        "CREATE TABLE runs (ran_at DateTime, project_id UInt32, test_case_id UInt64,
                          duration_ms UInt32)
       ENGINE = MergeTree PARTITION BY toYYYYMM(ran_at)
       ORDER BY (project_id, test_case_id, ran_at)",
    );
    q("CREATE TABLE agg (project_id UInt32, test_case_id UInt64,
                         runs AggregateFunction(count), total AggregateFunction(sum, UInt32))
       ENGINE = AggregatingMergeTree ORDER BY (project_id, test_case_id)");
    let mut normal = vec![
        ("2025-11-01", 30),
        ("2025-12-01", 31),
        ("2026-02-01", 28),
        ("2026-04-01", 30),
    ];
    if second_big {
        q(&format!(
            "INSERT INTO runs
             SELECT toDateTime('2026-03-01 00:00:00') + intHash32(number) % (31 * 86400),
                    toUInt32(number % {big} % 16 + 1), number % {big},
                    toUInt32(intHash32(number + 7) % 1000)
               FROM numbers({rows})",
            big = 5 * k,
            rows = 10 * k
        ));
    } else {
        normal.push(("2026-03-01", 31));
    }
    // One INSERT per month: each month is one part (under 1,048,576 rows), as calibrated.
    for (start, days) in normal {
        q(&format!(
            "INSERT INTO runs
             SELECT toDateTime('{start} 00:00:00') + intHash32(number) % ({days} * 86400),
                    toUInt32(number % {k} % 16 + 1), number % {k},
                    toUInt32(intHash32(number + 7) % 1000)
               FROM numbers({rows})",
            rows = 2 * k
        ));
    }
    // The big month: rows below 2H are the heavy day's (H keys), the others spread over the
    // other 30 days (day index 0..29, skipping the 15th) with 2K keys of their own.
    let h = 3 * k;
    q(&format!(
        "INSERT INTO runs
         SELECT if(number < 2 * {h},
                   toDateTime('{HEAVY_DAY} 00:00:00') + intHash32(number) % 86400,
                   toDateTime('{BIG_MONTH}-01 00:00:00')
                     + (intHash32(number) % 30 + (intHash32(number) % 30 >= 14)) * 86400
                     + intHash32(number + 1) % 86400),
                toUInt32(tc % 16 + 1),
                if(number < 2 * {h}, number % {h}, {h} + number % (2 * {k})) AS tc,
                toUInt32(intHash32(number + 7) % 1000)
           FROM numbers({rows})",
        rows = 10 * k
    ));
}
