#!/usr/bin/env bash
# test.sh: the test suite against real servers. Starts (installing if needed) the local
# Postgres the integration tests use, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "test: cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
scripts/services.sh
cargo test --locked "$@"
