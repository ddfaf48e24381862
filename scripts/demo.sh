#!/usr/bin/env bash
# demo.sh: a real backfill on a demo dataset, start to finish.
#
#   bash scripts/demo.sh              # 200,000 flowsheet rows
#   ROWS=1000000 bash scripts/demo.sh
#
# Starts Postgres if needed, (re)creates the database backfill_demo with the flowsheet and CI
# tables (scripts/demo-db.sh), builds backfill, then for the Postgres jobs in jobs/: validate,
# plan (a dry run: pending rows, batches, ETA), run (with progress), run again (both skipped), and
# status. (The ClickHouse example lives in jobs/clickhouse/; `run jobs` does not descend into it.)
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "demo: cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

cat >&2 <<'EOF2'
demo: what this changes on this machine, and nothing else:
demo:   - installs Debian's postgresql with apt-get if it is missing, and starts it if it is down
demo:     (or, if user postgres cannot connect to 127.0.0.1:5432 without a password, a private
demo:     cluster of the suite's own on port 55432 under /var/tmp; pg_hba.conf, server settings
demo:     and roles of the machine's Postgres are never changed);
demo:   - drops and recreates the database backfill_demo there, and fills it;
demo:   - builds target/release/backfill.
demo: It uses no ClickHouse and installs none.
EOF2
DATABASE_URL=$(scripts/demo-db.sh)
export DATABASE_URL

# Cargo's own progress (a first release build takes a few minutes on 2 cores).
echo "demo: building backfill (release)" >&2
cargo build --release --locked
bf=target/release/backfill

step() { printf '\n$ %s\n' "$*"; "$@"; }
step "$bf" validate jobs
step "$bf" plan jobs
step "$bf" --log-format text run jobs
step "$bf" --log-format text run jobs
step "$bf" status jobs

wrong=$(psql -X -A -t -w -d "$DATABASE_URL" -c "
    SELECT count(*) FROM wxyc_schema.flowsheet f
      JOIN wxyc_schema.shows s ON s.id = f.show_id
      LEFT JOIN wxyc_schema.auth_user u ON u.id = s.primary_dj_id
     WHERE f.entry_type = 'track' AND f.dj_name IS DISTINCT FROM COALESCE(u.dj_name, s.legacy_dj_name, u.name)")
printf '\ndemo: flowsheet rows whose dj_name is wrong after the run: %s\n' "$wrong"
[ "$wrong" = 0 ]
