//! The day-chunked ClickHouse dataset most ClickHouse tests share: `runs`, a source of `days`
//! days from 2025-10-01 with `per_day` rows each (3,000 test cases in 8 projects, partitioned
//! by month), and targets shaped like `agg` (an AggregatingMergeTree partitioned by
//! `project_id % 4`: every day lands in four partitions).

use super::ch::ChDb;

/// `runs`, filled.
pub fn build_runs(db: &ChDb, days: u64, per_day: u64) {
    db.q(
        "CREATE TABLE runs (ran_at DateTime, project_id UInt32, test_case_id UInt64,
                             duration_ms UInt32)
          ENGINE = MergeTree PARTITION BY toYYYYMM(ran_at)
          ORDER BY (project_id, test_case_id, ran_at)",
    );
    db.q(&format!(
        "INSERT INTO runs
         SELECT toDateTime('2025-10-01 00:00:00') + intDiv(number, {per_day}) * 86400
                  + intHash32(number) % 86400,
                toUInt32(tc % 8 + 1), intHash32(number + 3) % 3000 AS tc,
                toUInt32(number % 1000)
           FROM numbers({})",
        days * per_day
    ));
}

/// An empty table shaped like `agg`. On 18.16 a restore (rerun, reset, lost state) waits until
/// the parts it replaced are off disk, which takes `old_parts_lifetime` seconds (8 minutes by
/// default): the tests' targets let them go sooner.
pub fn create_agg(db: &ChDb, name: &str, old_parts_lifetime: u32) {
    db.q(&format!(
        "CREATE TABLE {name} (project_id UInt32, test_case_id UInt64,
                              runs AggregateFunction(count), total AggregateFunction(sum, UInt32))
          ENGINE = AggregatingMergeTree PARTITION BY project_id % 4
          ORDER BY (project_id, test_case_id)
          SETTINGS old_parts_lifetime = {old_parts_lifetime}, cleanup_delay_period = 1,
                   cleanup_delay_period_random_add = 0"
    ));
}

/// `runs` and an empty `agg` whose replaced parts leave the disk after a second.
pub fn build_days(db: &ChDb, days: u64, per_day: u64) {
    build_runs(db, days, per_day);
    create_agg(db, "agg", 1);
}
