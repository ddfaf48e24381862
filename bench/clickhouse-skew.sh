#!/usr/bin/env bash
# clickhouse-skew.sh: the oversized-month incident, measured — one unchunked INSERT ... SELECT
# of a per-test-case aggregate vs `backfill` (month -> day -> split) under a memory cap.
#
#   bench/clickhouse-skew.sh                   # 30,000,000 source rows over six months
#   bench/clickhouse-skew.sh --rows 3000000    # or ROWS=3000000 bench/clickhouse-skew.sh
#   KEEP=1 bench/clickhouse-skew.sh            # keep the database and the logs afterwards
#   CAP=400000000 bench/clickhouse-skew.sh     # force the cap instead of choosing it
#   CH_URL=http://127.0.0.1:8124 bench/clickhouse-skew.sh   # the current server (26.9) instead
#   WORKERS=2 bench/clickhouse-skew.sh         # `workers: 2` in the job's spec
#
# Steps (ClickHouse at CH_URL, default http://127.0.0.1:8123 (18.16), user default):
#   1. Drop and create database backfill_chbench; load test_case_runs (MergeTree, PARTITION BY
#      toYYYYMM(ran_at), ORDER BY (project_id, test_case_id, ran_at)) from system.numbers in
#      batches of at most LOAD_BATCH rows: six months 2025-11 .. 2026-04, where 2026-01 holds 5x
#      the rows of each other month and draws its test cases from a 25x larger set, so it has
#      many more distinct (project_id, test_case_id) keys. Day, second, project, test case,
#      status and duration each come from their own hash of the row number (independent), so
#      every day holds every project. Then OPTIMIZE ... FINAL (one part per month), timed apart.
#   2. Per month: the job's SELECT for that month alone into a scratch table, no memory cap,
#      logged (log_queries=1, a known query_id): its rows, distinct keys, seconds, peak memory
#      (system.query_log memory_usage of the QueryFinish row; a server without system.query_log,
#      like chdb's 26.9, gives them in its X-ClickHouse-Summary header instead).
#   3. The cap: halfway between the largest normal month's peak and the big month's peak
#      (rounded down to a MiB), unless CAP is set: the big month fails under it, the others pass.
#   4. Unchunked: the whole job in one INSERT ... SELECT into a reference copy of the target, no
#      cap (max_memory_usage=0): wall time and peak memory. Then the same query with the cap into
#      a scratch table: expected to fail with Code: 241 (MEMORY_LIMIT_EXCEEDED), the incident.
#   5. backfill: a spec in a temp file (job chbench-skew, settings max_memory_usage = the cap and
#      log_queries = 1), `$BACKFILL --log-format json run SPEC` under /usr/bin/time -v (engine
#      peak RSS) and `timeout RUN_TIMEOUT`. BACKFILL defaults to target/release/backfill, built
#      with `cargo build --release --locked` if missing or older than src/ (a failed build is
#      retried once after BUILD_RETRY_SECS). Afterwards: backfill_chunks FINAL (chunks per level
#      and status, attempts; every chunk that ran out of memory) and, from system.query_log when
#      the server has it, its chunk INSERTs into the workers' staging tables
#      test_case_runs_recent_100__backfill_chbench_skew_<name hash>_s_<chunk hash>: peak memory per level and month.
#      Without query_log, the per-level table comes from backfill_chunks (attempts, seconds from
#      a chunk's first attempt to its record done or split).
#   6. Verify: both targets grouped by key (countMerge, sumMerge, sumMerge, maxMerge) must hold
#      the same rows: a hash sum of each, and the exact count of rows in only one of them.
# Prints the contenders table, the ratio of backfill's total time to the summed time of each month
# alone without a cap (the target is <= 1.3), the per-month table and backfill's chunk queries
# per level.
#
# Environment: ROWS, CAP, BACKFILL, CH_URL, WORKERS, LOAD_BATCH (5000000), CH_TIMEOUT (1800 s per query),
# RUN_TIMEOUT (3600 s for backfill), BUILD_RETRY_SECS (60), BUILD_TIMEOUT (1800 s), KEEP=1.
# Exit status 1 if the load, the reference query or backfill fails, if the capped unchunked query
# does not fail with Code: 241, or if backfill's target differs from the reference.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

ROWS=${ROWS:-30000000}
while [ $# -gt 0 ]; do
    case $1 in
        --rows) [ $# -ge 2 ] || { usage >&2; exit 2; }; ROWS=$2; shift 2 ;;
        --rows=*) ROWS=${1#--rows=}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "clickhouse-skew.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done

CH_URL=${CH_URL:-http://127.0.0.1:8123}
CH_URL=${CH_URL%/}
BACKFILL=${BACKFILL:-target/release/backfill}
LOAD_BATCH=${LOAD_BATCH:-5000000}
CH_TIMEOUT=${CH_TIMEOUT:-1800}
RUN_TIMEOUT=${RUN_TIMEOUT:-3600}
BUILD_RETRY_SECS=${BUILD_RETRY_SECS:-60}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-1800}
KEEP=${KEEP:-0}
CAP=${CAP:-}
DB=backfill_chbench
SRC=test_case_runs
TARGET=test_case_runs_recent_100
REF=${TARGET}_reference       # the unchunked query's copy of the target
SCRATCH=${TARGET}_scratch     # per-month and capped runs: their rows are thrown away
JOB=chbench-skew
# + _<chunk hash>: backfill's staging tables for job $JOB (a name with other characters than
# letters, digits and _ gets the first 4 bytes of its SHA-256 after it: landing/names.rs)
STAGING=${TARGET}__backfill_chbench_skew_$(printf %s "$JOB" | sha256sum | cut -c1-8)_s
WORKERS=${WORKERS:-}
MONTHS=(2025-11 2025-12 2026-01 2026-02 2026-03 2026-04)
BIG=2026-01
PROJECTS=200
export LOG_TAG=ch-skew

# log, die, now, elapsed, find_backfill, have_gnu_time, peak_rss
# shellcheck source-path=SCRIPTDIR/..
source bench/lib.sh

case $WORKERS in *[!0-9]*) die "WORKERS must be a whole number, got '${WORKERS}'" ;; esac
for v in ROWS LOAD_BATCH CH_TIMEOUT RUN_TIMEOUT BUILD_RETRY_SECS BUILD_TIMEOUT; do
    case ${!v} in '' | *[!0-9]*) die "$v must be a whole number, got '${!v}'" ;; esac
done
case $CAP in *[!0-9]*) die "CAP must be a number of bytes, got '${CAP}'" ;; esac
[ "$ROWS" -ge 100000 ] || die "ROWS must be at least 100000 (got ${ROWS})"
[ "$LOAD_BATCH" -gt 0 ] || die "LOAD_BATCH must be positive"
command -v curl >/dev/null 2>&1 || die "curl is needed"

# Test cases per project: normal months draw from TC_NORMAL, the big month from 25x as many.
# 30M rows: 3M rows and <= 200k keys per normal month, 15M rows and ~4.75M keys in 2026-01.
TC_NORMAL=$(( ROWS / 30000 > 10 ? ROWS / 30000 : 10 ))
TC_BIG=$(( TC_NORMAL * 25 ))
NORMAL_ROWS=$(( ROWS / 10 ))
BIG_ROWS=$(( ROWS - 5 * NORMAL_ROWS ))

WORK=$(mktemp -d)
START=$(now)
T0=$(date +%s)   # query_log rows of this run are at or after this second
RUN_ID="chbench-$$-${T0}"
cleanup() {
    local status=$?
    if [ "$KEEP" = 1 ]; then
        log "keeping database ${DB} and the logs in ${WORK} (KEEP=1)"
    else
        curl -sS --max-time 120 "${CH_URL}/" --data-binary "DROP DATABASE IF EXISTS ${DB}" >/dev/null 2>&1 \
            || log "could not drop database ${DB}"
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ch PARAMS SQL: run SQL over HTTP with URL params (a&b=c, may be empty); the answer on stdout.
# Fails (status 22, the server's error text on stdout) on an HTTP error.
ch() {
    curl -sS --fail-with-body --max-time "$CH_TIMEOUT" "${CH_URL}/?${1}" --data-binary "$2"
}
ch_ok() { ch "" "$1" >/dev/null || die "query failed: $1"; }
mib() { # bytes -> "123.4 MiB", "-" stays
    case $1 in '' | - | n/a) echo "${1:--}"; return ;; esac
    awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'
}
# chq QUERY_ID PARAMS SQL: ch with log_queries=1 and a known query id; its response headers are
# kept in $WORK/QUERY_ID.h (X-ClickHouse-Summary, for servers without system.query_log).
chq() {
    curl -sS --fail-with-body --max-time "$CH_TIMEOUT" -D "$WORK/$1.h" \
        "${CH_URL}/?${2}&log_queries=1&query_id=$1" --data-binary "$3"
}
# A number field of the X-ClickHouse-Summary header kept by chq, or "-".
summary() { # query_id field
    local v
    v=$(tr -d '\r' <"$WORK/$1.h" 2>/dev/null | sed -n 's/^X-ClickHouse-Summary: //Ip' \
        | grep -o "\"$2\":\"[0-9]*\"" | grep -o '[0-9][0-9]*' | head -n 1)
    echo "${v:--}"
}
# Peak memory (bytes), server time (ms) and written rows of a query run by chq: "mem ms rows", or
# "- - -". From system.query_log (type 2: finished, 4: failed) when the server keeps it, else from
# the summary header (finished queries only).
logged() { # query_id type
    local out ns
    if [ "$QLOG" = 0 ]; then
        [ "$2" = 2 ] || { echo "- - -"; return; }
        ns=$(summary "$1" elapsed_ns)
        [ "$ns" = - ] || ns=$(( ns / 1000000 ))
        echo "$(summary "$1" memory_usage) ${ns} $(summary "$1" written_rows)"
        return
    fi
    out=$(ch "" "SELECT memory_usage, query_duration_ms, written_rows
                   FROM system.query_log
                  WHERE event_date >= yesterday() AND query_id = '$1' AND type = $2
                  ORDER BY event_time DESC LIMIT 1" | tr '\t' ' ')
    echo "${out:-- - -}"
}

# The job's SELECT: one row of aggregate states per (project_id, test_case_id).
select_sql() { # predicate
    cat <<SQL
SELECT project_id, test_case_id,
       countState(),
       sumState(toUInt8(if(status = 2, 1, 0))),
       sumState(duration_ms),
       maxState(ran_at)
  FROM ${SRC}
 WHERE $1
 GROUP BY project_id, test_case_id
SQL
}
# backfill's chunk predicate for [from, to), as src/clickhouse/chunks.rs writes it.
month_pred() { # YYYY-MM
    local from="$1-01" to
    to=$(date -u -d "${from} +1 month" +%F)
    echo "\`ran_at\` >= '${from} 00:00:00' AND \`ran_at\` < '${to} 00:00:00'"
}
# Grouped contents of a target table, for the comparison.
grouped_sql() { # table
    cat <<SQL
SELECT project_id, test_case_id, countMerge(runs) AS c, sumMerge(failures) AS f,
       sumMerge(total_ms) AS t, maxMerge(last_run) AS m
  FROM ${DB}.$1
 GROUP BY project_id, test_case_id
SQL
}

# --- ClickHouse and the binary -----------------------------------------------------------------
ok=0
for _ in $(seq 1 30); do
    if ch "" "SELECT 1" >/dev/null 2>&1; then ok=1; break; fi
    sleep 1
done
[ "$ok" = 1 ] || die "ClickHouse does not answer at ${CH_URL} (waited 30 s)"
CH_VERSION=$(ch "" "SELECT version()")
# Whether the server keeps system.query_log (18.16 does, chdb's 26.9 does not): log one query, flush.
ch "log_queries=1" "SELECT 1" >/dev/null
ch_ok "SYSTEM FLUSH LOGS"
QLOG=$(ch "" "SELECT count() FROM system.tables WHERE database = 'system' AND name = 'query_log'")
[ "$QLOG" = 1 ] || log "no system.query_log on this server: query stats come from X-ClickHouse-Summary and backfill_chunks"
log "ClickHouse ${CH_VERSION} at ${CH_URL}; $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"

# target/release/backfill is (re)built when it is missing or older than src/, Cargo.toml or
# Cargo.lock (a stale binary may not know the clickhouse section); a failed build is retried once.
build() { timeout -k 10 "$BUILD_TIMEOUT" cargo build --release --locked >&2; }
HAVE_BACKFILL=1
BUILD_NOTE="up to date"
if [ "$BACKFILL" = target/release/backfill ] && command -v cargo >/dev/null 2>&1 \
    && { [ ! -x "$BACKFILL" ] || [ -n "$(find src Cargo.toml Cargo.lock -newer "$BACKFILL" -print -quit)" ]; }; then
    log "backfill: ${BACKFILL} is missing or older than the sources: cargo build --release --locked"
    BUILD_NOTE="built"
    if ! build; then
        log "backfill: build failed; retrying once in ${BUILD_RETRY_SECS} s (src/ may be changing)"
        sleep "$BUILD_RETRY_SECS"
        BUILD_NOTE="built on the second try"
        build || { HAVE_BACKFILL=0; BUILD_NOTE="build failed twice"; }
    fi
elif ! find_backfill; then
    HAVE_BACKFILL=0
    BUILD_NOTE="not found"
fi
[ "$HAVE_BACKFILL" = 1 ] || die "no backfill binary (${BUILD_NOTE}): nothing to compare"
have_gnu_time || log "no /usr/bin/time: engine RSS will be n/a"
log "backfill: ${BACKFILL} (${BUILD_NOTE}, modified $(date -u -r "$BACKFILL" '+%F %T') UTC)"

# --- 1. Source and targets ---------------------------------------------------------------------
ch_ok "DROP DATABASE IF EXISTS ${DB}"
ch_ok "CREATE DATABASE ${DB}"
ch_ok "CREATE TABLE ${DB}.${SRC} (
         ran_at DateTime, project_id UInt32, test_case_id UInt64, status UInt8, duration_ms UInt32
       ) ENGINE = MergeTree PARTITION BY toYYYYMM(ran_at) ORDER BY (project_id, test_case_id, ran_at)"
ch_ok "CREATE TABLE ${DB}.${TARGET} (
         project_id UInt32, test_case_id UInt64,
         runs AggregateFunction(count),
         failures AggregateFunction(sum, UInt8),
         total_ms AggregateFunction(sum, UInt32),
         last_run AggregateFunction(max, DateTime)
       ) ENGINE = AggregatingMergeTree ORDER BY (project_id, test_case_id)"
ch_ok "CREATE TABLE ${DB}.${REF} AS ${DB}.${TARGET}"

# Rows n in [off, off + cnt) of a month: day, second, project, test case, status and duration
# from independent hashes of n (cityHash64 with different salts).
load_batch() { # month off cnt test_cases
    local from="$1-01" days
    days=$(date -u -d "${from} +1 month -1 day" +%d)
    ch_ok "INSERT INTO ${DB}.${SRC}
           SELECT toDateTime(toDate('${from}') + cityHash64(n, 1) % ${days}) + cityHash64(n, 2) % 86400,
                  toUInt32(1 + cityHash64(n, 3) % ${PROJECTS}),
                  toUInt64(cityHash64(n, 4) % $4),
                  toUInt8(multiIf(cityHash64(n, 5) % 100 < 85, 0, cityHash64(n, 5) % 100 < 92, 1, 2)),
                  toUInt32(20 + cityHash64(n, 6) % 60000)
             FROM (SELECT $2 + number AS n FROM system.numbers LIMIT $3)"
}

log "loading ${ROWS} rows: ${NORMAL_ROWS} per normal month, ${BIG_ROWS} in ${BIG}; ${PROJECTS} projects x ${TC_NORMAL} test cases (x ${TC_BIG} in ${BIG})"
t=$(now)
off=0
batches=0
for m in "${MONTHS[@]}"; do
    if [ "$m" = "$BIG" ]; then left=$BIG_ROWS tc=$TC_BIG; else left=$NORMAL_ROWS tc=$TC_NORMAL; fi
    while [ "$left" -gt 0 ]; do
        cnt=$(( left < LOAD_BATCH ? left : LOAD_BATCH ))
        load_batch "$m" "$off" "$cnt" "$tc"
        off=$((off + cnt)) left=$((left - cnt)) batches=$((batches + 1))
    done
done
LOAD_SECS=$(elapsed "$t" "$(now)")
t=$(now)
ch_ok "OPTIMIZE TABLE ${DB}.${SRC} FINAL"
OPT_SECS=$(elapsed "$t" "$(now)")
LOADED=$(ch "" "SELECT count() FROM ${DB}.${SRC}")
[ "$LOADED" = "$ROWS" ] || die "loaded ${LOADED} rows, expected ${ROWS}"
SRC_SIZE=$(ch "" "SELECT sum(bytes_on_disk) FROM system.parts WHERE database = '${DB}' AND table = '${SRC}' AND active")
log "loaded ${LOADED} rows in ${batches} INSERTs: ${LOAD_SECS} s; OPTIMIZE FINAL ${OPT_SECS} s; $(mib "$SRC_SIZE") on disk"
# Independence check: every day holds (nearly) every project.
MIN_PROJ=$(ch "" "SELECT min(p) FROM (SELECT toDate(ran_at) AS d, uniqExact(project_id) AS p FROM ${DB}.${SRC} GROUP BY d)")
log "fewest projects on one day: ${MIN_PROJ} of ${PROJECTS}"

# --- 2. Per-month peaks (no cap) -----------------------------------------------------------------
M_ROWS=() M_KEYS=() M_SECS=() M_PEAK=()
for m in "${MONTHS[@]}"; do
    ch_ok "DROP TABLE IF EXISTS ${DB}.${SCRATCH}"
    ch_ok "CREATE TABLE ${DB}.${SCRATCH} AS ${DB}.${TARGET}"
    qid="${RUN_ID}-month-${m}"
    chq "$qid" "database=${DB}&max_memory_usage=0" \
        "INSERT INTO ${DB}.${SCRATCH} $(select_sql "$(month_pred "$m")")" >/dev/null \
        || die "the ${m} query failed without a cap"
    M_ROWS+=("$(ch "" "SELECT sum(rows) FROM system.parts WHERE database = '${DB}' AND table = '${SRC}' AND active AND partition = '${m/-/}'")")
done
ch_ok "SYSTEM FLUSH LOGS"
for m in "${MONTHS[@]}"; do
    read -r mem ms keys <<<"$(logged "${RUN_ID}-month-${m}" 2)"
    secs=$(awk -v ms="$ms" 'BEGIN { if (ms ~ /^[0-9]+$/) printf "%.2f", ms / 1000; else print "-" }')
    M_PEAK+=("$mem") M_SECS+=("$secs") M_KEYS+=("$keys")
    log "month ${m}: peak $(mib "$mem"), ${secs} s, ${keys} keys"
done

# --- 3. The cap ----------------------------------------------------------------------------------
NORMAL_MAX=0 NORMAL_MAX_MONTH='' BIG_PEAK=0
for i in "${!MONTHS[@]}"; do
    [ "${M_PEAK[$i]}" != - ] || die "no query_log row for month ${MONTHS[$i]}"
    if [ "${MONTHS[$i]}" = "$BIG" ]; then
        BIG_PEAK=${M_PEAK[$i]}
    elif [ "${M_PEAK[$i]}" -gt "$NORMAL_MAX" ]; then
        NORMAL_MAX=${M_PEAK[$i]} NORMAL_MAX_MONTH=${MONTHS[$i]}
    fi
done
HALF=$(( (NORMAL_MAX + BIG_PEAK) / 2 / 1048576 * 1048576 ))
if [ -n "$CAP" ]; then
    CAP_NOTE="CAP=${CAP} set by the caller (halfway would be ${HALF})"
else
    [ "$BIG_PEAK" -gt $(( NORMAL_MAX * 3 / 2 )) ] \
        || die "the big month's peak ($(mib "$BIG_PEAK")) is not 1.5x the largest normal month's ($(mib "$NORMAL_MAX")): too few rows (${ROWS}) to show the incident"
    CAP=$HALF
    CAP_NOTE="halfway between the largest normal month's peak (${NORMAL_MAX_MONTH}: ${NORMAL_MAX} B = $(mib "$NORMAL_MAX")) and ${BIG}'s (${BIG_PEAK} B = $(mib "$BIG_PEAK")), rounded down to a MiB"
fi
log "cap: max_memory_usage = ${CAP} ($(mib "$CAP")): ${CAP_NOTE}"

# --- 4. Unchunked: no cap, then the cap ----------------------------------------------------------
ALL_SQL=$(select_sql 1)
log "unchunked, no cap: running"
t=$(now)
chq "${RUN_ID}-unchunked" "database=${DB}&max_memory_usage=0" \
    "INSERT INTO ${DB}.${REF} ${ALL_SQL}" >"$WORK/unchunked.out" \
    || { cat "$WORK/unchunked.out" >&2; die "the unchunked query failed without a cap"; }
U_SECS=$(elapsed "$t" "$(now)")

log "unchunked, cap ${CAP}: running (expecting Code: 241)"
ch_ok "DROP TABLE IF EXISTS ${DB}.${SCRATCH}"
ch_ok "CREATE TABLE ${DB}.${SCRATCH} AS ${DB}.${TARGET}"
t=$(now)
C_STATUS=0
chq "${RUN_ID}-capped" "database=${DB}&max_memory_usage=${CAP}" \
    "INSERT INTO ${DB}.${SCRATCH} ${ALL_SQL}" >"$WORK/capped.out" 2>&1 || C_STATUS=$?
C_SECS=$(elapsed "$t" "$(now)")
C_ERROR=$(grep -v '^curl:' "$WORK/capped.out" | head -c 300 | tr '\n' ' ')
if [ "$C_STATUS" = 0 ]; then
    C_RESULT="ok (no error!)"
elif grep -q 'Code: 241' "$WORK/capped.out"; then
    C_RESULT="Code 241"
else
    C_RESULT="error: $(grep -o 'Code: [0-9]*' "$WORK/capped.out" | head -n 1)"
fi
ch_ok "DROP TABLE IF EXISTS ${DB}.${SCRATCH}"
ch_ok "SYSTEM FLUSH LOGS"
read -r U_PEAK _ U_KEYS <<<"$(logged "${RUN_ID}-unchunked" 2)"
read -r C_PEAK _ _ <<<"$(logged "${RUN_ID}-capped" 4)"
log "unchunked: ${U_SECS} s, peak $(mib "$U_PEAK"), ${U_KEYS} keys; with the cap: ${C_RESULT} after ${C_SECS} s (${C_ERROR})"

# --- 5. backfill under the cap -------------------------------------------------------------------
RUN_SPEC=$WORK/${JOB}.yaml
{
    echo "name: ${JOB}"
    [ -z "$WORKERS" ] || echo "workers: ${WORKERS}"
    cat <<YAML
clickhouse:
  url: ${CH_URL}/${DB}
  source: ${SRC}
  time_column: ran_at
  split_column: project_id
  from: ${MONTHS[0]}-01
  to: $(date -u -d "${MONTHS[-1]}-01 +1 month" +%F)
  chunks: [month, day, split]
  target: ${TARGET}
  settings: { max_memory_usage: ${CAP}, log_queries: 1 }
  statement: |
    INSERT INTO {target}
YAML
    select_sql '{chunk}' | sed 's/^/    /'
} >"$RUN_SPEC"
"$BACKFILL" validate "$RUN_SPEC" >"$WORK/validate.out" 2>&1 \
    || { cat "$WORK/validate.out" >&2; die "backfill validate rejects the generated spec ${RUN_SPEC}"; }

timer=()
if [ -x /usr/bin/time ]; then timer=(/usr/bin/time -v -o "$WORK/time.backfill"); fi
log "backfill: running $(basename "$RUN_SPEC") (timeout ${RUN_TIMEOUT} s)"
B_STATUS=0
t=$(now)
BACKFILL_LOG=info timeout -k 10 "$RUN_TIMEOUT" "${timer[@]}" \
    "$BACKFILL" --log-format json run "$RUN_SPEC" >"$WORK/backfill.out" 2>"$WORK/backfill.log" \
    || B_STATUS=$?
B_SECS=$(elapsed "$t" "$(now)")
B_RSS=$(peak_rss "$WORK/time.backfill")
sed 's/^/    /' "$WORK/backfill.out" >&2
if [ "$B_STATUS" = 0 ]; then
    B_RESULT=ok
else
    B_RESULT="FAILED: exit ${B_STATUS}"
    log "backfill: exit status ${B_STATUS}; last lines of its log:"
    tail -n 20 "$WORK/backfill.log" | sed 's/^/    /' >&2
fi
SPLITS_LOGGED=$(grep -c 'splitting chunk' "$WORK/backfill.log" || true)
log "backfill: ${B_RESULT} in ${B_SECS} s, engine peak RSS ${B_RSS}, ${SPLITS_LOGGED} split(s) logged"

# Chunks by level and status from the checkpoint store.
STATE=$(ch "" "SELECT level, status, count(), sum(attempts), sum(source_rows), sum(rows)
                 FROM ${DB}.backfill_chunks FINAL
                WHERE job = '${JOB}' AND chunk NOT IN ('', '#pause', '#merges')
                GROUP BY level, status ORDER BY level, status" || true)
# Every chunk that ran out of memory at least once (code 241 kept, or split, or light).
OOM=$(ch "" "SELECT chunk, level, status, source_rows, attempts, light, code, memory_bytes
               FROM ${DB}.backfill_chunks FINAL
              WHERE job = '${JOB}' AND chunk NOT IN ('', '#pause', '#merges')
                AND (status = 'split' OR light = 1 OR code = 241 OR attempts > 1)
              ORDER BY chunk" || true)
B_ATTEMPTS=$(awk -F'\t' '{ n += $4 } END { print n + 0 }' <<<"$STATE")
done_at() { # level -> done chunks of that level
    awk -F'\t' -v l="$1" '$1 == l && $2 == "done" { n += $3 } END { print n + 0 }' <<<"$STATE"
}
B_CHUNKS="$(done_at month)/$(done_at day)/$(done_at split)"
B_SPLIT=$(awk -F'\t' '$2 == "split" { n += $3 } END { print n + 0 }' <<<"$STATE")

# backfill's chunk queries from query_log: INSERTs into its staging tables, by level and month
# (level: a split chunk's predicate names project_id; a day spans one day). Without query_log:
# the same columns from backfill_chunks (failed attempts: those of split chunks, and all but the
# last of done ones; peak memory of finished attempts and seconds unknown, 0).
ch_ok "SYSTEM FLUSH LOGS"
if [ "$QLOG" = 0 ]; then
CHUNKQ=$(ch "" "SELECT level, substring(chunk, 1, 7) AS month, countIf(status = 'done'),
                       sum(if(status = 'done', attempts - 1, attempts)), 0,
                       maxIf(memory_bytes, code = 241), 0, 0
                  FROM ${DB}.backfill_chunks FINAL
                 WHERE job = '${JOB}' AND chunk NOT IN ('', '#pause', '#merges')
                 GROUP BY level, month ORDER BY month, level")
else
CHUNKQ=$(ch "" "SELECT level, month, countIf(type = 2), countIf(type = 4),
                       maxIf(memory_usage, type = 2), maxIf(memory_usage, type = 4),
                       round(maxIf(query_duration_ms, type = 2) / 1000, 2),
                       round(sumIf(query_duration_ms, type = 2) / 1000, 2)
                  FROM (SELECT type, memory_usage, query_duration_ms,
                               extractAll(query, '\'([0-9]{4}-[0-9]{2}-[0-9]{2})') AS d,
                               multiIf(position(query, '\`project_id\`') > 0, 'split',
                                       toDate(d[2]) - toDate(d[1]) = 1, 'day', 'month') AS level,
                               substring(d[1], 1, 7) AS month
                          FROM system.query_log
                         WHERE event_date >= yesterday() AND event_time >= toDateTime(${T0})
                           AND type IN (2, 4) AND query LIKE 'INSERT INTO%'
                           AND position(query, '${STAGING}') > 0 AND length(d) >= 2)
                 GROUP BY level, month ORDER BY month, level")
fi
B_PEAK=$(awk -F'\t' '$5 > m { m = $5 } END { print m + 0 }' <<<"$CHUNKQ")

# --- 6. Verify -----------------------------------------------------------------------------------
check_sql() { # table -> "keys hash"
    ch "max_memory_usage=0" "SELECT count(), sum(cityHash64(project_id, test_case_id, c, f, t, toUInt32(m)))
                               FROM ($(grouped_sql "$1"))" | tr '\t' ' '
}
REF_CHECK=$(check_sql "$REF")
B_CHECK=$(check_sql "$TARGET")
DIFF=$(ch "max_memory_usage=0" "SELECT count() FROM (
            SELECT project_id, test_case_id, c, f, t, m, count() AS n
              FROM ($(grouped_sql "$REF") UNION ALL $(grouped_sql "$TARGET"))
             GROUP BY project_id, test_case_id, c, f, t, m
            HAVING n != 2)")
log "reference (keys, hash): ${REF_CHECK}; backfill: ${B_CHECK}; rows in only one of them: ${DIFF}"
if [ "$DIFF" = 0 ] && [ "$REF_CHECK" = "$B_CHECK" ]; then
    B_EQUAL="yes: 0 differences"
else
    B_EQUAL="NO: ${DIFF} differences"
fi
RUNS_TOTAL=$(ch "" "SELECT countMerge(runs) FROM ${DB}.${REF}")
[ "$RUNS_TOTAL" = "$ROWS" ] || die "the reference counts ${RUNS_TOTAL} runs, the source has ${ROWS}"

# --- Report --------------------------------------------------------------------------------------
echo
echo "ClickHouse ${CH_VERSION}, $(nproc) CPUs, $(awk '/MemTotal/ { printf "%.0f GB", $2 / 1048576 }' /proc/meminfo) RAM (shared, noisy); ${ROWS} source rows in ${#MONTHS[@]} months ($(mib "$SRC_SIZE") on disk), ${U_KEYS} (project_id, test_case_id) keys"
echo "load: ${batches} INSERT ... SELECT FROM system.numbers batches in ${LOAD_SECS} s, OPTIMIZE FINAL ${OPT_SECS} s; fewest projects on a day: ${MIN_PROJ}/${PROJECTS}"
echo "cap: max_memory_usage = ${CAP} ($(mib "$CAP")): ${CAP_NOTE}"
echo
fmt='%-22s %-10s %8s %12s %-16s %10s %-10s %s\n'
# shellcheck disable=SC2059  # the format is ours
printf "$fmt" contender cap seconds "peak query" "chunks" "engine" result "equal to reference"
# shellcheck disable=SC2059
printf "$fmt" "" "" "" memory "(months/days/splits)" RSS "" ""
# shellcheck disable=SC2059
printf "$fmt" "unchunked INSERT" none "$U_SECS" "$(mib "$U_PEAK")" "1 query" - ok "(is the reference)"
# shellcheck disable=SC2059
printf "$fmt" "unchunked INSERT" "$(mib "$CAP")" "$C_SECS" "$(mib "$C_PEAK")*" "1 query" - "$C_RESULT" -
# shellcheck disable=SC2059
printf "$fmt" "backfill" "$(mib "$CAP")" "$B_SECS" "$(mib "$B_PEAK")" "${B_CHUNKS} +${B_SPLIT} split" "$B_RSS" "$B_RESULT" "$B_EQUAL"
echo "(* memory when it failed; backfill: max over its chunk queries that finished; chunks = chunks done"
echo "   per level, +N split = chunks that hit the cap and were cut into smaller ones)"
MONTHS_SUM=$(printf '%s\n' "${M_SECS[@]}" | awk '$1 != "-" { s += $1 } END { printf "%.2f", s }')
RATIO=$(awk -v b="$B_SECS" -v m="$MONTHS_SUM" 'BEGIN { if (m > 0) printf "%.2f", b / m; else print "-" }')
echo
echo "ratio: backfill ${B_SECS} s (wall, whole run) / each month alone without a cap, summed ${MONTHS_SUM} s = ${RATIO}x (target <= 1.3x); chunk attempts: ${B_ATTEMPTS}"

echo
echo "per month (each month's SELECT alone, no cap; backfill's chunk queries for it, under the cap)"
mfmt='%-8s %10s %10s %8s %12s %-6s %-40s %12s %9s\n'
# shellcheck disable=SC2059
printf "$mfmt" month rows keys seconds "peak memory" "< cap" "backfill ran it as" "its peak" "its secs"
for i in "${!MONTHS[@]}"; do
    m=${MONTHS[$i]}
    under=yes
    [ "${M_PEAK[$i]}" -lt "$CAP" ] || under=NO
    # e.g. "month failed -> 31 days": failed queries first, then those that landed.
    how=$(awk -F'\t' -v m="$m" '$2 == m { ok[$1] = $3; bad[$1] = $4 }
        END {
            n = split("month day split", lv, " ")
            for (i = 1; i <= n; i++) if (bad[lv[i]]) {
                printf "%s%d %s%s failed", sep, bad[lv[i]], lv[i], (bad[lv[i]] > 1 ? "s" : ""); sep = ", "
            }
            if (sep) sep = " -> "
            for (i = 1; i <= n; i++) if (ok[lv[i]]) {
                printf "%s%d %s%s", sep, ok[lv[i]], lv[i], (ok[lv[i]] > 1 ? "s" : ""); sep = " + "
            }
        }' <<<"$CHUNKQ")
    bpeak=$(awk -F'\t' -v m="$m" '$2 == m && $5 > p { p = $5 } END { print p + 0 }' <<<"$CHUNKQ")
    bsecs=$(awk -F'\t' -v m="$m" '$2 == m { s += $8 } END { printf "%.2f", s }' <<<"$CHUNKQ")
    # shellcheck disable=SC2059
    printf "$mfmt" "$m" "${M_ROWS[$i]}" "${M_KEYS[$i]}" "${M_SECS[$i]}" "$(mib "${M_PEAK[$i]}")" "$under" \
        "${how:--}" "$(mib "$bpeak")" "$bsecs"
done
echo "(rows: source rows; keys: distinct (project_id, test_case_id) = rows written; backfill ran it as:"
echo " its chunk queries that failed, then those that landed (chunks cut without a try because they are"
echo " not smaller than one that failed are not listed); its secs: their server time, summed)"

echo
if [ "$QLOG" = 1 ]; then
    echo "backfill chunk queries by level (query_log: INSERTs into ${STAGING}_<chunk hash>)"
else
    echo "backfill chunks by level (no query_log: from backfill_chunks; finished peaks and seconds unknown, shown as 0)"
fi
lfmt='%-6s %9s %7s %14s %15s %10s %10s\n'
# shellcheck disable=SC2059
printf "$lfmt" level finished failed "peak memory" "failed at" "max secs" "sum secs"
for level in month day split; do
    awk -F'\t' -v l="$level" '$1 == l { ok += $3; bad += $4; if ($5 > p) p = $5; if ($6 > fp) fp = $6
                                        if ($7 > mx) mx = $7; s += $8; n++ }
        END { if (n) printf "%s\t%d\t%d\t%d\t%d\t%.2f\t%.2f\n", l, ok, bad, p, fp, mx, s }' <<<"$CHUNKQ" \
        | while IFS=$'\t' read -r l a b p fp mx s; do
            fpm=-
            [ "$fp" = 0 ] || fpm=$(mib "$fp")
            # shellcheck disable=SC2059
            printf "$lfmt" "$l" "$a" "$b" "$(mib "$p")" "$fpm" "$mx" "$s"
        done
done
echo
echo "backfill_chunks FINAL, job ${JOB}"
sfmt='%-6s %-8s %7s %9s %12s %12s\n'
# shellcheck disable=SC2059
printf "$sfmt" level status chunks attempts "source rows" "rows written"
while IFS=$'\t' read -r l st n a sr rw; do
    # shellcheck disable=SC2059
    [ -z "$l" ] || printf "$sfmt" "$l" "$st" "$n" "$a" "$sr" "$rw"
done <<<"$STATE"
echo
echo "chunks that ran out of memory (backfill_chunks FINAL; light = its last attempt ran with lighter settings)"
ofmt='%-36s %-6s %-7s %12s %9s %6s %6s %14s\n'
# shellcheck disable=SC2059
printf "$ofmt" chunk level status "source rows" attempts light code "would use"
while IFS=$'\t' read -r c l st sr a li co mb; do
    # shellcheck disable=SC2059
    [ -z "$c" ] || printf "$ofmt" "$c" "$l" "$st" "$sr" "$a" "$li" "$co" "$(mib "$mb")"
done <<<"$OOM"
log "whole benchmark took $(elapsed "$START" "$(now)") s"

FAILED=0
[ "$B_STATUS" = 0 ] || FAILED=1
[ "$C_RESULT" = "Code 241" ] || { log "the capped unchunked query did not fail with Code 241: ${C_RESULT}"; FAILED=1; }
[ "$B_EQUAL" = "yes: 0 differences" ] || { log "backfill's target differs from the reference"; FAILED=1; }
[ "$FAILED" = 0 ] || exit 1
