#!/usr/bin/env bash
# test.sh: the test suite against real servers. Starts (installing if needed) the servers the
# integration tests use (scripts/services.sh: Postgres, ClickHouse 18.16 and a current
# ClickHouse), passes their URLs on (BACKFILL_TEST_PG, BACKFILL_TEST_CH,
# BACKFILL_TEST_CH_CURRENT), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "test: cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
servers=$(scripts/services.sh --env)
eval "$servers"
echo "test: BACKFILL_TEST_PG=$BACKFILL_TEST_PG BACKFILL_TEST_CH=$BACKFILL_TEST_CH BACKFILL_TEST_CH_CURRENT=$BACKFILL_TEST_CH_CURRENT" >&2
cargo test --locked "$@"
