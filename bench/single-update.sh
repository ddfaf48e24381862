#!/usr/bin/env bash
# single-update.sh: what batching costs — backfill vs one big UPDATE vs a hand-written keyset loop.
#
#   bench/single-update.sh                       # 1,000,000 flowsheet rows
#   ROWS=200000 bench/single-update.sh
#   SKIP_BACKFILL=1 bench/single-update.sh       # only the two psql contenders
#   BACKFILL=/path/to/backfill bench/single-update.sh
#
# Loads scripts/demo-data.sql once into the template database backfill_bench_tpl, then gives
# each contender its own fresh clone (CREATE DATABASE ... TEMPLATE) and times it:
#   single UPDATE  one UPDATE of every track row, in one transaction (the thing to avoid in prod)
#   backfill       `$BACKFILL run bench/flowsheet-dj-name.yaml` with DATABASE_URL at the clone;
#                  BACKFILL defaults to target/release/backfill, built with
#                  `cargo build --release --locked` if missing; skipped if that fails
#   keyset loop    a server-side DO loop: next 5000 keys after the cursor (FOR UPDATE SKIP
#                  LOCKED), UPDATE ... WHERE id = ANY(keys), COMMIT — one transaction per batch
# After each one it counts wrong rows (must be 0): track rows whose dj_name differs from the
# COALESCE computed by a join, plus non-track rows that got a dj_name. Peak RSS of the backfill
# process is measured with /usr/bin/time -v. The clones and the template are dropped at the end
# (KEEP_TEMPLATE=1 keeps backfill_bench_tpl). Exit status 1 if a contender failed or left wrong rows.
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS=${ROWS:-1000000}
BACKFILL=${BACKFILL:-target/release/backfill}
SKIP_BACKFILL=${SKIP_BACKFILL:-0}
KEEP_TEMPLATE=${KEEP_TEMPLATE:-0}
BATCH=5000
TPL=backfill_bench_tpl
export LOG_TAG=bench

# UPDATE_SQL, keyset_sql, CHECK_SQL, psql helpers, build_template, clone, find_backfill, ...
# shellcheck source-path=SCRIPTDIR/..
source bench/lib.sh

case $ROWS in '' | *[!0-9]*) die "ROWS must be a whole number, got '$ROWS'" ;; esac
[ -f "$SPEC" ] || die "$SPEC is missing"

WORK=$(mktemp -d)
cleanup() {
    drop_clones
    if [ "$KEEP_TEMPLATE" = 1 ]; then
        log "keeping template database ${TPL} (KEEP_TEMPLATE=1)"
    else
        drop_template || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- Results table -----------------------------------------------------------------------------
NAMES=() SECS=() WRONG=() RSS=() NOTES=()
FAILED=0
record() { # name seconds wrong rss note
    NAMES+=("$1") SECS+=("$2") WRONG+=("$3") RSS+=("$4") NOTES+=("$5")
    [ "$3" = 0 ] || [ "$3" = - ] || FAILED=1
}

# --- Postgres and the dataset ------------------------------------------------------------------
scripts/services.sh

build_template "$ROWS"

TARGET_ROWS=$(psql_value -d "$TPL" -c \
    "SELECT count(*) FROM wxyc_schema.flowsheet WHERE entry_type = 'track' AND dj_name IS NULL")
BEFORE=$(wrong_rows "$TPL")
log "${TARGET_ROWS} track rows to fill; wrong rows before any update: ${BEFORE} (rows whose COALESCE is NULL are right as they are)"
[ "$TARGET_ROWS" -gt 0 ] || die "no rows to update: ROWS=${ROWS} is too small"

# --- (a) one single UPDATE ---------------------------------------------------------------------
db=backfill_bench_single
clone "$db"
log "single UPDATE: running"
start=$(now)
psql_admin -d "$db" -c "$UPDATE_SQL"
secs=$(elapsed "$start" "$(now)")
wrong=$(wrong_rows "$db")
log "single UPDATE: ${secs} s, wrong rows: ${wrong}"
record "single UPDATE" "$secs" "$wrong" "-" "1 transaction"
drop_db "$db"

# --- (b) backfill ------------------------------------------------------------------------------
if find_backfill; then
    db=backfill_bench_backfill
    clone "$db"
    log "backfill: running $BACKFILL run $SPEC (log: ${WORK}/backfill.log)"
    timer=()
    if have_gnu_time; then
        timer=(/usr/bin/time -v -o "${WORK}/time.txt")
    else
        log "backfill: /usr/bin/time unavailable, peak RSS not measured"
    fi
    start=$(now)
    status=0
    DATABASE_URL="${PG_BASE_URL}/${db}" "${timer[@]}" "$BACKFILL" run "$SPEC" \
        >"${WORK}/backfill.log" 2>&1 || status=$?
    secs=$(elapsed "$start" "$(now)")
    rss=$(peak_rss "${WORK}/time.txt")
    tail -n 5 "${WORK}/backfill.log" | sed 's/^/    /' >&2
    wrong=$(wrong_rows "$db")
    note="exit ${status}"
    if [ "$status" != 0 ]; then
        log "backfill: FAILED with exit status ${status}; last lines of its log:"
        tail -n 30 "${WORK}/backfill.log" | sed 's/^/    /' >&2
        FAILED=1
        note="FAILED: exit ${status}"
    fi
    log "backfill: ${secs} s, peak RSS ${rss}, wrong rows: ${wrong}"
    record "backfill" "$secs" "$wrong" "$rss" "$note"
    drop_db "$db"
else
    record "backfill" - - - "skipped"
fi

# --- (c) hand-written keyset loop --------------------------------------------------------------
db=backfill_bench_keyset
clone "$db"
log "keyset loop: running (batches of ${BATCH}, one transaction each)"
start=$(now)
psql_admin -d "$db" -c "$(keyset_sql "$BATCH")"
secs=$(elapsed "$start" "$(now)")
wrong=$(wrong_rows "$db")
log "keyset loop: ${secs} s, wrong rows: ${wrong}"
record "keyset loop (${BATCH})" "$secs" "$wrong" "-" "plpgsql DO + COMMIT"
drop_db "$db"

# --- Report ------------------------------------------------------------------------------------
echo
echo "single UPDATE vs batched, ${ROWS} flowsheet rows, ${TARGET_ROWS} track rows to fill ($(psql_value -d postgres -c 'SHOW server_version'))"
printf '%-20s %9s %11s %10s %11s %11s  %s\n' contender seconds rows/s "vs UPDATE" "wrong rows" "peak RSS" note
base=${SECS[0]}
for i in "${!NAMES[@]}"; do
    if [ "${SECS[$i]}" = - ]; then
        rate=- ratio=-
    else
        rate=$(awk -v n="$TARGET_ROWS" -v s="${SECS[$i]}" 'BEGIN { printf "%.0f", (s > 0 ? n / s : 0) }')
        ratio=$(awk -v b="$base" -v s="${SECS[$i]}" 'BEGIN { printf "%.2fx", (b > 0 ? s / b : 0) }')
    fi
    printf '%-20s %9s %11s %10s %11s %11s  %s\n' "${NAMES[$i]}" "${SECS[$i]}" "$rate" "$ratio" \
        "${WRONG[$i]}" "${RSS[$i]}" "${NOTES[$i]}"
done

[ "$FAILED" = 0 ] || { log "FAILED: a contender failed or left wrong rows"; exit 1; }
