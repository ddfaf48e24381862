-- The tables of the ClickHouse example job 0001_test-case-runs-recent-100.yaml, to try it on a
-- database of your own (tests/container.rs runs the job in the image against exactly these):
--   clickhouse-client --database DB --multiquery < jobs/clickhouse/tables.sql
--   CLICKHOUSE_URL=http://default@127.0.0.1:8123/DB backfill run jobs/clickhouse

-- Raw test runs, one partition per month (the chunk ladder uses system.parts for row counts).
CREATE TABLE test_case_runs (
    ran_at DateTime,
    project_id UInt32,
    test_case_id UInt64,
    status String,
    duration_ms UInt32
) ENGINE = MergeTree
PARTITION BY toYYYYMM(ran_at)
ORDER BY (project_id, test_case_id, ran_at);

-- One row of aggregate states per test case; read with countMerge(runs), sumMerge(failures) ...
CREATE TABLE test_case_runs_recent_100 (
    project_id UInt32,
    test_case_id UInt64,
    runs AggregateFunction(count),
    failures AggregateFunction(sum, UInt64),
    total_ms AggregateFunction(sum, UInt64),
    last_run AggregateFunction(max, DateTime)
) ENGINE = AggregatingMergeTree
ORDER BY (project_id, test_case_id);
