#!/usr/bin/env bash
# ch-calibrate.sh: find the max_memory_usage band for the skewed-dataset tests of
# tests/clickhouse.rs (SKEW_LIMIT), measured on the real ClickHouse server.
#
#   scripts/ch-calibrate.sh              # the tests' size (SKEW_K)
#   K=16384 scripts/ch-calibrate.sh      # another size (rows and keys scale with K)
#   CH_URL=http://127.0.0.1:8123 KEEP=1 scripts/ch-calibrate.sh   # keep the database
#
# 1. Builds the dataset into a scratch database with examples/ch_skew_data.rs, which includes
#    the tests' own builder (tests/common/skew.rs), with both big months.
# 2. Runs the job's statement (SKEW_STATEMENT in the test; keep STATEMENT below the same) on each
#    chunk the ladder would run, with the chunk predicates the engine writes
#    (src/clickhouse/chunks.rs), max_threads=1 and a candidate max_memory_usage N:
#      must pass: every normal month, every day of a big month except the heavy one, both
#                 halves of the heavy day's projects;
#      must fail with Code 241: each big month and the heavy day.
# 3. Bisects (to RES bytes) the smallest N at which everything that must pass passes (lo) and the
#    largest N at which everything that must fail still fails (hi); prints the band [lo, hi]
#    and its middle, the value for SKEW_LIMIT. Exit 1 if there is no band.
# Also prints each chunk's peak memory without a limit (system.query_log), for reference.
set -euo pipefail
cd "$(dirname "$0")/.."

CH_URL=${CH_URL:-http://127.0.0.1:8123}
DB=bf_ch_calibrate_$$
RES=${RES:-16384}
STATEMENT='INSERT INTO {target}
SELECT project_id, test_case_id, countState(), sumState(duration_ms)
  FROM runs WHERE {chunk} GROUP BY project_id, test_case_id'

log() { echo "ch-calibrate: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# q SQL [extra URL parameters]: the body on success; on failure the server's message, exit 1.
q() {
    curl -sS --fail-with-body "$CH_URL/?database=$DB${2:+&$2}" --data-binary "$1"
}

cleanup() {
    if [ -n "${KEEP:-}" ]; then
        log "kept database $DB"
    else
        curl -sS "$CH_URL/" --data-binary "DROP DATABASE IF EXISTS $DB" >/dev/null || true
    fi
}
trap cleanup EXIT

[ "$(curl -sS "$CH_URL/?query=SELECT%201" 2>/dev/null)" = 1 ] \
    || die "ClickHouse does not answer at $CH_URL (run scripts/services.sh)"
log "server $(curl -sS "$CH_URL/" --data-binary 'SELECT version()'), database $DB"
curl -sS --fail-with-body "$CH_URL/" --data-binary "CREATE DATABASE $DB" >/dev/null

work=$(mktemp -d)
trap 'cleanup; rm -rf "$work"' EXIT
log "building the dataset (cargo run --example ch_skew_data)"
if ! cargo run --quiet --example ch_skew_data -- "$DB" "${K:-}" >"$work/build.log" 2>&1; then
    cat "$work/build.log" >&2
    die "building the dataset failed"
fi

# The engine's predicates (src/clickhouse/chunks.rs).
time_pred() { printf "\`ran_at\` >= '%s 00:00:00' AND \`ran_at\` < '%s 00:00:00'" "$1" "$2"; }
group_pred() {
    printf "%s AND \`project_id\` IN (SELECT DISTINCT \`project_id\` FROM \`runs\` WHERE %s ORDER BY \`project_id\` LIMIT %s, %s)" \
        "$(time_pred "$1" "$2")" "$(time_pred "$1" "$2")" "$3" "$4"
}
next_day() { q "SELECT toString(toDate('$1') + 1)"; }
next_month() { q "SELECT toString(addMonths(toDate('$1'), 1))"; }

# Chunks: "label<TAB>predicate", in the files pass.txt and fail.txt.
: >"$work/pass.txt"
: >"$work/fail.txt"
normal_rows=$(q "SELECT min(c) FROM (SELECT count() AS c FROM runs GROUP BY toYYYYMM(ran_at))")
heavy_day=$(q "SELECT toString(toDate(ran_at)) AS d FROM runs GROUP BY d ORDER BY count() DESC LIMIT 1")
for month in $(q "SELECT DISTINCT toString(toStartOfMonth(ran_at)) AS m FROM runs ORDER BY m"); do
    end=$(next_month "$month")
    rows=$(q "SELECT count() FROM runs WHERE $(time_pred "$month" "$end")")
    if [ "$rows" = "$normal_rows" ]; then
        printf '%s\t%s\n' "${month%-01}" "$(time_pred "$month" "$end")" >>"$work/pass.txt"
        continue
    fi
    printf '%s\t%s\n' "${month%-01}" "$(time_pred "$month" "$end")" >>"$work/fail.txt"
    for day in $(q "SELECT DISTINCT toString(toDate(ran_at)) AS d FROM runs WHERE $(time_pred "$month" "$end") ORDER BY d"); do
        if [ "$day" = "$heavy_day" ]; then
            printf '%s\t%s\n' "$day" "$(time_pred "$day" "$(next_day "$day")")" >>"$work/fail.txt"
            n=$(q "SELECT uniqExact(project_id) FROM runs WHERE $(time_pred "$day" "$(next_day "$day")")")
            half=$((n / 2))
            printf '%s\t%s\n' "$day/project_id[0..$half)" \
                "$(group_pred "$day" "$(next_day "$day")" 0 "$half")" >>"$work/pass.txt"
            printf '%s\t%s\n' "$day/project_id[$half..$n)" \
                "$(group_pred "$day" "$(next_day "$day")" "$half" "$((n - half))")" >>"$work/pass.txt"
        else
            printf '%s\t%s\n' "$day" "$(time_pred "$day" "$(next_day "$day")")" >>"$work/pass.txt"
        fi
    done
done
log "$(wc -l <"$work/pass.txt") chunks must pass, $(wc -l <"$work/fail.txt") must fail (heavy day $heavy_day)"
q "CREATE TABLE st AS agg" >/dev/null

# attempt PREDICATE LIMIT: 0 if the chunk's statement passes, 1 on Code 241; dies otherwise.
attempt() {
    local sql out
    sql=${STATEMENT//\{target\}/st}
    sql=${sql//\{chunk\}/$1}
    if out=$(q "$sql" "max_memory_usage=$2&max_threads=1" 2>&1); then
        return 0
    fi
    case $out in
        *"Code: 241"*) return 1 ;;
        *) die "unexpected failure at max_memory_usage=$2: $out" ;;
    esac
}

# all_pass N: every chunk of pass.txt passes under N.
all_pass() {
    local label pred
    while IFS=$'\t' read -r label pred; do
        attempt "$pred" "$1" || return 1
    done <"$work/pass.txt"
}
# all_fail N: every chunk of fail.txt fails under N.
all_fail() {
    local label pred
    while IFS=$'\t' read -r label pred; do
        attempt "$pred" "$1" && return 1
    done <"$work/fail.txt"
    return 0
}

# Peak memory of each chunk without a limit, for reference.
log "peak memory per chunk without a limit (system.query_log):"
while IFS=$'\t' read -r label pred; do
    id="calibrate-$$-$RANDOM$RANDOM"
    sql=${STATEMENT//\{target\}/st}
    sql=${sql//\{chunk\}/$pred}
    q "$sql" "max_threads=1&log_queries=1&query_id=$id" >/dev/null
    echo "$label $id"
done < <(cat "$work/fail.txt" "$work/pass.txt") >"$work/ids.txt"
q "SYSTEM FLUSH LOGS" >/dev/null
while read -r label id; do
    printf '  %-32s %12s bytes\n' "$label" \
        "$(q "SELECT max(memory_usage) FROM system.query_log WHERE query_id = '$id' AND type = 2")" >&2
done <"$work/ids.txt"

MAX=$((8 * 1024 * 1024 * 1024))
all_pass "$MAX" || die "a chunk that must pass fails even at $MAX bytes"
all_fail 1048576 || die "a chunk that must fail passes even at 1 MiB"

# lo: smallest N with all_pass (all_pass(MAX) holds, all_pass(1 MiB) does not).
a=1048576 b=$MAX
while [ $((b - a)) -gt "$RES" ]; do
    m=$(((a + b) / 2))
    if all_pass "$m"; then b=$m; else a=$m; fi
done
lo=$b
# hi: largest N with all_fail.
a=1048576 b=$MAX
while [ $((b - a)) -gt "$RES" ]; do
    m=$(((a + b) / 2))
    if all_fail "$m"; then a=$m; else b=$m; fi
done
hi=$a

if [ "$lo" -gt "$hi" ]; then
    die "no band: everything that must pass needs $lo bytes, but a chunk that must fail passes from $hi bytes"
fi
mid=$(((lo + hi) / 2 / RES * RES))
if ! all_pass "$mid" || ! all_fail "$mid"; then
    die "the middle of the band, $mid, does not hold"
fi
echo "band: $lo .. $hi bytes (resolution $RES); middle: $mid"
