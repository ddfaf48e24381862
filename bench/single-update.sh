#!/usr/bin/env bash
# single-update.sh: what batching costs — one big UPDATE vs backfill with 1 and with 2 workers
# (and, with KEYSET=1, a hand-written keyset loop), interleaved round by round.
#
#   bench/single-update.sh                       # 1,000,000 flowsheet rows, 3 rounds
#   ROWS=200000 ROUNDS=5 bench/single-update.sh
#   KEYSET=1 bench/single-update.sh              # also the plpgsql keyset loop
#   TARGET_MS=100 bench/single-update.sh         # backfill with batch.target 100ms
#   BACKFILL=/path/to/backfill bench/single-update.sh
#
# Loads scripts/demo-data.sql once into the template database backfill_bench_tpl (VACUUM
# (FREEZE, ANALYZE)d like a production table), then runs ROUNDS rounds; each round runs every
# contender once, on its own fresh clone (CREATE DATABASE ... TEMPLATE, then CHECKPOINT, not
# timed), in an order that rotates from round to round, so a machine whose speed drifts (other
# work on it) charges every contender alike:
#   single UPDATE  one UPDATE of every track row, in one transaction (the thing to avoid in prod)
#   backfill Nw    `$BACKFILL run` of bench/flowsheet-dj-name.yaml with `workers: N`, at the
#                  engine's default batch settings unless TARGET_MS is set; BACKFILL defaults to
#                  target/release/backfill, built with `cargo build --release --locked` if missing
#   keyset loop    (KEYSET=1) a server-side DO loop: next 5000 keys after the cursor (FOR UPDATE
#                  SKIP LOCKED), UPDATE ... WHERE id = ANY(keys), COMMIT — one transaction per batch
# Times are whole commands (process start to exit). After each run it counts wrong rows (must be
# 0). For backfill runs: peak RSS by /usr/bin/time -v; the longest batch from its debug log
# (select + statement + commit of one batch, the engine's own timing); the longest engine
# transaction seen by sampling pg_stat_activity every ~50ms (sessions named backfill:<job>).
# Prints each contender's median, min and max seconds, and each ratio as the median of the
# per-round ratios with both medians beside it; then the targets. Exit status 1 if a contender
# failed or left wrong rows. The clones and the template are dropped at the end
# (KEEP_TEMPLATE=1 keeps backfill_bench_tpl).
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS=${ROWS:-1000000}
ROUNDS=${ROUNDS:-3}
KEYSET=${KEYSET:-0}
TARGET_MS=${TARGET_MS:-}
BACKFILL=${BACKFILL:-target/release/backfill}
SKIP_BACKFILL=${SKIP_BACKFILL:-0}
KEEP_TEMPLATE=${KEEP_TEMPLATE:-0}
BATCH=5000
TPL=backfill_bench_tpl
export LOG_TAG=bench

# UPDATE_SQL, keyset_sql, CHECK_SQL, psql helpers, build_template, clone, find_backfill, ...
# shellcheck source-path=SCRIPTDIR/..
source bench/lib.sh

for v in ROWS ROUNDS; do
    case ${!v} in '' | *[!0-9]* | 0) die "$v must be a whole number above 0, got '${!v}'" ;; esac
done
case $TARGET_MS in '' | *[!0-9]*) [ -z "$TARGET_MS" ] || die "TARGET_MS must be a whole number" ;; esac
[ -f "$SPEC" ] || die "$SPEC is missing"
command -v jq >/dev/null 2>&1 || die "jq is needed to read backfill's JSON log (apt-get install jq)"

WORK=$(mktemp -d)
SAMPLER_PID=
cleanup() {
    [ -z "$SAMPLER_PID" ] || touch "$WORK/sampler.stop"
    drop_clones
    if [ "$KEEP_TEMPLATE" = 1 ]; then
        log "keeping template database ${TPL} (KEEP_TEMPLATE=1)"
    else
        drop_template || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- Longest engine transaction: a psql fed one query every ~50ms --------------------------------
XACT_SQL="SELECT coalesce(round(extract(epoch FROM max(clock_timestamp() - xact_start)) * 1000), 0)
  FROM pg_stat_activity
 WHERE datname = current_database() AND application_name LIKE 'backfill:%';"
sampler_start() { # db file
    rm -f "$WORK/sampler.stop"
    {
        while [ ! -e "$WORK/sampler.stop" ]; do
            printf '%s\n' "$XACT_SQL"
            sleep 0.05
        done 2>/dev/null | psql_value -d "$1" >"$2" 2>&1
    } &
    SAMPLER_PID=$!
}
sampler_stop() { # file -> longest transaction in ms
    touch "$WORK/sampler.stop"
    wait "$SAMPLER_PID" || true
    SAMPLER_PID=
    awk '/^[0-9]+$/ && $1 > m { m = $1 } END { print m + 0 }' "$1"
}

# --- Contenders -----------------------------------------------------------------------------------
CONTENDERS=(single)
if find_backfill; then
    CONTENDERS+=(backfill1 backfill2)
    for n in 1 2; do
        spec_with_workers "$n" >"$WORK/spec-$n.yaml"
        if [ -n "$TARGET_MS" ]; then
            sed -i "s/^  size: 5000$/  size: 5000\n  target: ${TARGET_MS}ms/" "$WORK/spec-$n.yaml"
            grep -q "target: ${TARGET_MS}ms" "$WORK/spec-$n.yaml" || die "could not set batch.target"
        fi
    done
fi
[ "$KEYSET" != 1 ] || CONTENDERS+=(keyset)
have_gnu_time || log "/usr/bin/time unavailable: peak RSS not measured"

name_of() {
    case $1 in
        single) echo "single UPDATE" ;;
        backfill*) echo "backfill ${1#backfill}w" ;;
        keyset) echo "keyset loop (${BATCH})" ;;
    esac
}

# Per contender: seconds of each round, and for backfill the worst batch/xact and RSS.
declare -A SECS=() BATCH_MS=() XACT_MS=() RSS_KB=() WRONG=() NOTE=()
FAILED=0

# One run of contender $1 in round $2: sets SECS etc.
run_one() { # kind round
    local kind=$1 round=$2 db="backfill_bench_$1" start secs status=0 wrong timer=() n rss xact batch
    clone "$db"
    case $kind in
        single)
            start=$(now)
            psql_admin -d "$db" -c "$UPDATE_SQL" || status=$?
            secs=$(elapsed "$start" "$(now)")
            ;;
        keyset)
            start=$(now)
            psql_admin -d "$db" -c "$(keyset_sql "$BATCH")" 2>"$WORK/keyset.log" || status=$?
            secs=$(elapsed "$start" "$(now)")
            ;;
        backfill*)
            n=${kind#backfill}
            if [ -x /usr/bin/time ]; then timer=(/usr/bin/time -v -o "$WORK/time.txt"); fi
            sampler_start "$db" "$WORK/xact.txt"
            start=$(now)
            DATABASE_URL="${PG_BASE_URL}/${db}" BACKFILL_LOG=info,backfill=debug \
                "${timer[@]}" "$BACKFILL" run --log-format json "$WORK/spec-$n.yaml" \
                >"$WORK/run.out" 2>"$WORK/run.log" || status=$?
            secs=$(elapsed "$start" "$(now)")
            xact=$(sampler_stop "$WORK/xact.txt")
            batch=$(jq -R -r 'fromjson? | select(.message == "batch done")
                              | (.select_ms + .statement_ms + .commit_ms)' "$WORK/run.log" \
                | awk '$1 > m { m = $1 } END { print m + 0 }')
            rss=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$WORK/time.txt" 2>/dev/null || true)
            [ "${XACT_MS[$kind]:-0}" -ge "$xact" ] || XACT_MS[$kind]=$xact
            [ "${BATCH_MS[$kind]:-0}" -ge "$batch" ] || BATCH_MS[$kind]=$batch
            if [ -n "$rss" ] && [ "${RSS_KB[$kind]:-0}" -lt "$rss" ]; then RSS_KB[$kind]=$rss; fi
            if [ "$status" != 0 ]; then
                log "$(name_of "$kind"): exit status ${status}; last lines of its log:"
                tail -n 20 "$WORK/run.log" | sed 's/^/    /' >&2
            fi
            ;;
    esac
    wrong=$(wrong_rows "$db")
    log "round ${round}: $(name_of "$kind"): ${secs} s, exit ${status}, wrong rows ${wrong}"
    SECS[$kind]="${SECS[$kind]:-} ${secs}"
    WRONG[$kind]=$((${WRONG[$kind]:-0} + wrong))
    if [ "$status" != 0 ]; then
        NOTE[$kind]="FAILED: exit ${status}"
        FAILED=1
    fi
    [ "$wrong" = 0 ] || FAILED=1
    drop_db "$db"
}

# --- Postgres and the dataset ----------------------------------------------------------------------
scripts/services.sh
build_template "$ROWS"
TARGET_ROWS=$(psql_value -d "$TPL" -c \
    "SELECT count(*) FROM wxyc_schema.flowsheet WHERE entry_type = 'track' AND dj_name IS NULL")
[ "$TARGET_ROWS" -gt 0 ] || die "no rows to update: ROWS=${ROWS} is too small"
log "${TARGET_ROWS} track rows to fill; ${ROUNDS} round(s) of: ${CONTENDERS[*]}"

count=${#CONTENDERS[@]}
for round in $(seq 1 "$ROUNDS"); do
    for i in $(seq 0 $((count - 1))); do
        run_one "${CONTENDERS[$(((i + round - 1) % count))]}" "$round"
    done
done

# --- Report ----------------------------------------------------------------------------------------
# "median min max" of the numbers given.
stats() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "%.2f %.2f %.2f", m, v[1], v[NR] }'; }
# "median min max" of a contender's seconds.
stats_of() { # kind
    local v
    read -r -a v <<<"${SECS[$1]}"
    stats "${v[@]}"
}
# Median over the rounds of (contender's seconds / single UPDATE's seconds) in the same round.
ratio_median() { # kind
    local a b q=() i
    read -r -a a <<<"${SECS[$1]}"
    read -r -a b <<<"${SECS[single]}"
    for i in "${!a[@]}"; do
        q+=("$(awk -v x="${a[$i]}" -v y="${b[$i]}" 'BEGIN { printf "%.4f", (y > 0 ? x / y : 0) }')")
    done
    stats "${q[@]}" | awk '{ printf "%.2fx", $1 }'
}
mb() { [ -n "${1:-}" ] && awk -v k="$1" 'BEGIN { printf "%.1f MB", k / 1024 }' || echo -; }
ms() { [ -n "${1:-}" ] && echo "$1 ms" || echo -; }

echo
echo "single UPDATE vs backfill, ${ROWS} flowsheet rows, ${TARGET_ROWS} track rows to fill, ${ROUNDS} interleaved round(s)"
echo "($(psql_value -d postgres -c 'SHOW server_version'), $(nproc) CPUs, batch.target ${TARGET_MS:-default}${TARGET_MS:+ms}; seconds are whole commands)"
fmt='%-18s %8s %8s %8s %10s %12s %12s %10s %6s  %s\n'
# shellcheck disable=SC2059  # the format is ours
printf "$fmt" contender "median s" "min s" "max s" "x UPDATE" "longest" "longest" "peak" wrong note
# shellcheck disable=SC2059
printf "$fmt" "" "" "" "" "(median)" "batch" "engine xact" RSS rows ""
read -r single_median _ <<<"$(stats_of single)"
for kind in "${CONTENDERS[@]}"; do
    read -r med lo hi <<<"$(stats_of "$kind")"
    x=1.00x
    [ "$kind" = single ] || x=$(ratio_median "$kind")
    # shellcheck disable=SC2059
    printf "$fmt" "$(name_of "$kind")" "$med" "$lo" "$hi" "$x" "$(ms "${BATCH_MS[$kind]:-}")" \
        "$(ms "${XACT_MS[$kind]:-}")" "$(mb "${RSS_KB[$kind]:-}")" "${WRONG[$kind]}" "${NOTE[$kind]:-}"
done
echo "(x UPDATE: median of the per-round ratios; the single UPDATE's median is ${single_median} s)"

if [ "${#CONTENDERS[@]}" -gt 1 ] && [ -n "${SECS[backfill1]:-}" ]; then
    echo
    echo "targets"
    verdict() { if [ "$1" = 1 ]; then echo "  met     $2"; else echo "  MISSED  $2"; fi; }
    for kind in backfill1 backfill2; do
        limit=1.25
        [ "$kind" = backfill1 ] || limit=0.8
        ratio=$(ratio_median "$kind")
        read -r med _ <<<"$(stats_of "$kind")"
        verdict "$(awk -v r="${ratio%x}" -v l="$limit" 'BEGIN { print (r + 0 <= l) ? 1 : 0 }')" \
            "$(name_of "$kind"): total time <= ${limit}x single UPDATE: ${ratio} (${med} s vs ${single_median} s)"
        verdict "$(awk -v k="${RSS_KB[$kind]:-0}" 'BEGIN { print (k > 0 && k < 30 * 1024) ? 1 : 0 }')" \
            "$(name_of "$kind"): engine peak RSS < 30 MB: $(mb "${RSS_KB[$kind]:-}")"
    done
    verdict "$(awk -v x="${XACT_MS[backfill2]:-99999}" 'BEGIN { print (x <= 1000) ? 1 : 0 }')" \
        "backfill 2w: no engine transaction open longer than 1 s (sampled): $(ms "${XACT_MS[backfill2]:-}")"
fi

[ "$FAILED" = 0 ] || { log "FAILED: a contender failed or left wrong rows"; exit 1; }
