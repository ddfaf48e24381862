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
SPEC=bench/flowsheet-dj-name.yaml
TPL=backfill_bench_tpl
PG_BASE_URL=postgres://postgres@127.0.0.1:5432

UPDATE_SQL="UPDATE wxyc_schema.flowsheet f
   SET dj_name = COALESCE(u.dj_name, s.legacy_dj_name, u.name)
  FROM wxyc_schema.shows s
  LEFT JOIN wxyc_schema.auth_user u ON u.id = s.primary_dj_id
 WHERE f.show_id = s.id AND f.entry_type = 'track' AND f.dj_name IS NULL"

KEYSET_SQL="DO \$\$
DECLARE
    cursor_id bigint := NULL;
    keys      bigint[];
    n         bigint;
    total     bigint := 0;
    batches   int := 0;
BEGIN
    LOOP
        SELECT array_agg(id ORDER BY id) INTO keys
          FROM (SELECT id FROM wxyc_schema.flowsheet
                 WHERE (cursor_id IS NULL OR id > cursor_id)
                   AND entry_type = 'track' AND dj_name IS NULL
                 ORDER BY id
                 LIMIT ${BATCH}
                   FOR UPDATE SKIP LOCKED) AS batch;
        EXIT WHEN keys IS NULL;
        UPDATE wxyc_schema.flowsheet f
           SET dj_name = COALESCE(u.dj_name, s.legacy_dj_name, u.name)
          FROM wxyc_schema.shows s
          LEFT JOIN wxyc_schema.auth_user u ON u.id = s.primary_dj_id
         WHERE f.show_id = s.id AND f.id = ANY(keys);
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
        batches := batches + 1;
        cursor_id := keys[array_length(keys, 1)];
        COMMIT;
    END LOOP;
    RAISE NOTICE 'keyset loop: % rows updated in % batches of up to ${BATCH}', total, batches;
END
\$\$"

# Wrong rows: track rows whose dj_name is not what the join says (a show with no DJ at all must
# stay NULL), and rows that are not tracks but were given a dj_name anyway.
CHECK_SQL="SELECT
  (SELECT count(*)
     FROM wxyc_schema.flowsheet f
     LEFT JOIN wxyc_schema.shows s ON s.id = f.show_id
     LEFT JOIN wxyc_schema.auth_user u ON u.id = s.primary_dj_id
    WHERE f.entry_type = 'track'
      AND f.dj_name IS DISTINCT FROM COALESCE(u.dj_name, s.legacy_dj_name, u.name))
+ (SELECT count(*) FROM wxyc_schema.flowsheet WHERE entry_type <> 'track' AND dj_name IS NOT NULL)"

log() { echo "bench: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
psql_admin() { psql -X -q -w -v ON_ERROR_STOP=1 -h 127.0.0.1 -p 5432 -U postgres "$@"; }
psql_value() { psql_admin -A -t "$@"; }
now() { date +%s.%N; }
elapsed() { awk -v s="$1" -v e="$2" 'BEGIN { printf "%.2f", e - s }'; }

case $ROWS in '' | *[!0-9]*) die "ROWS must be a whole number, got '$ROWS'" ;; esac
[ -f "$SPEC" ] || die "$SPEC is missing"

WORK=$(mktemp -d)
CLONES=()
drop_db() {
    psql_admin -d postgres -c "SET client_min_messages = warning" \
        -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)"
}
drop_template() {
    if [ "$(psql_value -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '${TPL}'")" = 1 ]; then
        psql_admin -d postgres -c "ALTER DATABASE ${TPL} IS_TEMPLATE false"
        drop_db "$TPL"
    fi
}
cleanup() {
    local db
    for db in "${CLONES[@]}"; do
        drop_db "$db" || true
    done
    if [ "$KEEP_TEMPLATE" = 1 ]; then
        log "keeping template database ${TPL} (KEEP_TEMPLATE=1)"
    else
        drop_template || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# A fresh copy of the template, with its dirty pages flushed so the timing starts clean.
clone() {
    local db=$1
    drop_db "$db"
    CLONES+=("$db")
    psql_admin -d postgres -c "CREATE DATABASE ${db} TEMPLATE ${TPL}" -c "CHECKPOINT"
}

wrong_rows() { psql_value -d "$1" -c "$CHECK_SQL"; }

# --- Results table -----------------------------------------------------------------------------
NAMES=() SECS=() WRONG=() RSS=() NOTES=()
FAILED=0
record() { # name seconds wrong rss note
    NAMES+=("$1") SECS+=("$2") WRONG+=("$3") RSS+=("$4") NOTES+=("$5")
    [ "$3" = 0 ] || [ "$3" = - ] || FAILED=1
}

# --- Postgres and the dataset ------------------------------------------------------------------
scripts/services.sh

log "building template ${TPL} with ${ROWS} flowsheet rows"
drop_template
psql_admin -d postgres -c "CREATE DATABASE ${TPL}"
start=$(now)
psql_admin -d "$TPL" -v rows="$ROWS" -f scripts/demo-data.sql >&2
# Like a production table: vacuumed and analyzed, hint bits set, so no contender pays for that.
psql_admin -d "$TPL" -c "VACUUM (FREEZE, ANALYZE)"
psql_admin -d postgres -c "ALTER DATABASE ${TPL} IS_TEMPLATE true"
log "template ready in $(elapsed "$start" "$(now)") s"

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
find_backfill() {
    if [ "$SKIP_BACKFILL" = 1 ]; then
        log "backfill: skipped (SKIP_BACKFILL=1)"
        return 1
    fi
    if [ ! -x "$BACKFILL" ] && [ "$BACKFILL" = target/release/backfill ]; then
        if ! command -v cargo >/dev/null 2>&1; then
            log "backfill: skipped: $BACKFILL is missing and cargo is not installed"
            return 1
        fi
        log "backfill: $BACKFILL is missing: cargo build --release --locked"
        if ! cargo build --release --locked >&2; then
            log "backfill: skipped: cargo build --release --locked failed (see above)"
            return 1
        fi
    fi
    if [ -x "$BACKFILL" ]; then
        return 0
    elif command -v "$BACKFILL" >/dev/null 2>&1; then
        BACKFILL=$(command -v "$BACKFILL")
        return 0
    fi
    log "backfill: skipped: '$BACKFILL' is not an executable (set BACKFILL=/path/to/backfill)"
    return 1
}

# /usr/bin/time -v gives the peak RSS; install it if it is missing (Debian package `time`).
have_gnu_time() {
    [ -x /usr/bin/time ] && return 0
    log "installing package 'time' for /usr/bin/time -v"
    DEBIAN_FRONTEND=noninteractive apt-get install -y time >&2 \
        || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y time >&2; } \
        || true
    [ -x /usr/bin/time ]
}

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
    rss=n/a
    if [ -f "${WORK}/time.txt" ]; then
        rss=$(awk -F': ' '/Maximum resident set size/ { printf "%.1f MB", $2 / 1024 }' "${WORK}/time.txt")
    fi
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
psql_admin -d "$db" -c "$KEYSET_SQL"
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
