#!/usr/bin/env bash
# demo-db.sh: (re)create the local demo database `backfill_demo` for trying out backfill jobs.
#
#   scripts/demo-db.sh                 # 200,000 flowsheet rows
#   ROWS=1000000 scripts/demo-db.sh    # bigger
#
# Starts Postgres if needed (scripts/services.sh, whose BACKFILL_TEST_PG says which server: the
# machine's on 127.0.0.1:5432 or the test suite's private one), drops and recreates backfill_demo, loads
# scripts/demo-data.sql into it, and prints the connection URL on stdout, e.g.
#   export DATABASE_URL=$(scripts/demo-db.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

DB=backfill_demo
ROWS=${ROWS:-200000}

log() { echo "demo-db: $*" >&2; }

servers=$(scripts/services.sh --pg-only --env)
eval "$servers"
SERVER=${BACKFILL_TEST_PG%/*}   # postgres://postgres@127.0.0.1:PORT
URL="${SERVER}/${DB}"
# psql_admin DATABASE [psql args]
psql_admin() {
    local db=$1
    shift
    psql -X -q -w -v ON_ERROR_STOP=1 -d "${SERVER}/${db}" "$@"
}

log "recreating database ${DB}"
psql_admin postgres -c "SET client_min_messages = warning" \
    -c "DROP DATABASE IF EXISTS ${DB} WITH (FORCE)" \
    -c "CREATE DATABASE ${DB}"

log "loading scripts/demo-data.sql with rows=${ROWS}"
start=$(date +%s.%N)
psql_admin "$DB" -v rows="$ROWS" -f scripts/demo-data.sql >&2
log "loaded in $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s"

echo "$URL"
