#!/usr/bin/env bash
# oltp.sh: what a backfill costs the application — single UPDATE vs keyset loop vs backfill,
# each alone and again under a steady pgbench OLTP load.
#
#   bench/oltp.sh                      # 1,000,000 flowsheet rows
#   bench/oltp.sh --big                # 2,600,000 rows (the size of the real incident)
#   bench/oltp.sh --rows 200000        # or ROWS=200000 bench/oltp.sh
#   bench/oltp.sh --strict             # exit 1 if a target below is missed, too
#   BACKFILL=/path/to/backfill bench/oltp.sh
#
# Builds the flowsheet dataset (scripts/demo-data.sql) once as the template database
# backfill_oltp_tpl, then runs every contender on its own fresh clone (CREATE DATABASE ...
# TEMPLATE), first with no load and then while pgbench drives the application:
#   single UPDATE   one UPDATE ... FROM of every track row, in one transaction
#   keyset loop     a server-side DO loop of fixed 5000-row keyset batches (FOR UPDATE SKIP
#                   LOCKED), one COMMIT per batch; it reports its longest batch itself
#   backfill        `$BACKFILL run bench/flowsheet-dj-name.yaml` once per worker count in WORKERS
#                   (default "1 2": the spec with `workers: N`), at the engine's default batch
#                   settings unless TARGET_MS sets batch.target, with BACKFILL_LOG=info,backfill=debug --log-format json;
#                   its "batch done" lines give the longest batch and the per-batch breakdown, and
#                   /usr/bin/time -v its peak RSS. BACKFILL defaults to target/release/backfill,
#                   built with `cargo build --release --locked` if missing.
# The load (bench/oltp-update.sql + bench/oltp-read.sql, weight 1:1): random single-row UPDATEs of
# flowsheet by id and reads by show_id, `pgbench -n -c 4 -j 2 -R 200 --latency-limit=50` with
# per-transaction logs. It is started on the contender's clone, warmed up, and stopped
# (pg_terminate_backend on its sessions, which makes pgbench flush its logs and exit) a few seconds
# after the contender ends; only transactions *scheduled* inside the contender's run window are
# counted, so one that waited on a lock is charged to the run that made it wait (a skipped one,
# logged without its schedule, counts if logged between the start and pgbench's stop). Latency is from
# the scheduled start (it includes schedule lag); "late" = over the latency limit or skipped by
# pgbench because it was already that late. "idle" is pgbench alone for IDLE_SECS on a fresh clone.
# "longest xact" samples pg_stat_activity every ~100ms during the run: the oldest open transaction
# in the clone, pgbench's own sessions left out. After every run the wrong-rows check must say 0.
#
# Prints a results table, backfill's per-batch breakdown, and the targets: backfill total time
# <= 1.25x the single UPDATE with 1 worker and <= 0.8x with 2 (no load), no engine transaction
# open longer than 1 s (sampled), longest batch <= 2x batch.target (when TARGET_MS is set), OLTP
# p99 during backfill <= 2x idle, 0 wrong rows after every run, engine peak RSS under 30 MB.
#
# The contender `cpu` (CONTENDERS="cpu ...", only under the load) runs HOGS busy loops (default: one
# per CPU) for CPU_SECS seconds that touch no database: the application's p99 then is what any
# work that keeps every CPU busy costs it, however it locks, writes or batches.
#
# APART=1 gives the application a copy of flowsheet of its own (flowsheet_app, same rows and
# indexes): it then shares the server's CPUs, WAL, disk and buffers with the contender but never a
# row, so the p99 measured is the floor that a contender of that size leaves whatever its locks.
#
# Environment: ROWS, BACKFILL, APART (0), WORKERS ("1 2"), TARGET_MS (unset), CONTENDERS ("single keyset
# backfill": which to run), RATE (200), CLIENTS (4), THREADS (2), LATENCY_LIMIT_MS (50),
# IDLE_SECS (10), HOGS (nproc), CPU_SECS (8), WARMUP_SECS (3), TAIL_SECS (3), RUN_TIMEOUT (1800 s per contender),
# KEEP_TEMPLATE=1 (keep backfill_oltp_tpl), KEEP_WORK=1 (keep the logs directory).
# Clones and (unless KEEP_TEMPLATE=1) the template are dropped on exit, also on failure or ^C.
# Exit status 1 if a contender failed, or the single UPDATE or backfill left wrong rows (with
# --strict also if a target was missed); wrong rows left by the keyset loop under load are
# reported, not fatal: that is the keyset + SKIP LOCKED gotcha backfill exists to avoid.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

ROWS=${ROWS:-1000000}
STRICT=0
while [ $# -gt 0 ]; do
    case $1 in
        --rows) [ $# -ge 2 ] || { usage >&2; exit 2; }; ROWS=$2; shift 2 ;;
        --rows=*) ROWS=${1#--rows=}; shift ;;
        --big) ROWS=2600000; shift ;;
        --strict) STRICT=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "oltp.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done

BACKFILL=${BACKFILL:-target/release/backfill}
RATE=${RATE:-200}
CLIENTS=${CLIENTS:-4}
THREADS=${THREADS:-2}
LATENCY_LIMIT_MS=${LATENCY_LIMIT_MS:-50}
IDLE_SECS=${IDLE_SECS:-10}
WARMUP_SECS=${WARMUP_SECS:-3}
TAIL_SECS=${TAIL_SECS:-3}
RUN_TIMEOUT=${RUN_TIMEOUT:-1800}
HOGS=${HOGS:-$(nproc)}
CPU_SECS=${CPU_SECS:-8}
KEEP_TEMPLATE=${KEEP_TEMPLATE:-0}
KEEP_WORK=${KEEP_WORK:-0}
BATCH=5000          # the keyset loop's fixed batch
TARGET_MS=${TARGET_MS:-}      # backfill's batch.target in ms; unset = the engine's default
WORKERS=${WORKERS:-1 2}       # backfill runs, one per worker count
CONTENDERS=${CONTENDERS:-single keyset backfill}
APART=${APART:-0}
TPL=backfill_oltp_tpl
export LOG_TAG=oltp

# UPDATE_SQL, keyset_sql, CHECK_SQL, psql helpers, build_template, clone, find_backfill, ...
# shellcheck source-path=SCRIPTDIR/..
source bench/lib.sh

for v in ROWS RATE CLIENTS THREADS LATENCY_LIMIT_MS IDLE_SECS WARMUP_SECS TAIL_SECS RUN_TIMEOUT; do
    case ${!v} in '' | *[!0-9]*) die "$v must be a whole number, got '${!v}'" ;; esac
done
[ -f "$SPEC" ] || die "$SPEC is missing"
for f in bench/oltp-update.sql bench/oltp-read.sql; do [ -f "$f" ] || die "$f is missing"; done
case $APART in 0 | 1) ;; *) die "APART must be 0 or 1, got '$APART'" ;; esac
command -v jq >/dev/null 2>&1 || die "jq is needed to read backfill's JSON log (apt-get install jq)"
PGBENCH=$(command -v pgbench || true)
if [ -z "$PGBENCH" ]; then
    PGBENCH=$(find /usr/lib/postgresql -path '*/bin/pgbench' 2>/dev/null | sort -V | tail -n 1)
fi
{ [ -n "$PGBENCH" ] && [ -x "$PGBENCH" ]; } || die "pgbench not found (package postgresql-contrib / postgresql-client)"
PSQL=(psql -X -q -w -v ON_ERROR_STOP=1 -h 127.0.0.1 -p 5432 -U postgres)
NSHOWS=$(( ROWS / 50 > 0 ? ROWS / 50 : 1 ))   # as in scripts/demo-data.sql

case $TARGET_MS in '' | *[!0-9]*) [ -z "$TARGET_MS" ] || die "TARGET_MS must be a whole number, got '$TARGET_MS'" ;; esac
for n in $WORKERS; do
    case $n in '' | *[!0-9]* | 0) die "WORKERS must be whole numbers above 0, got '$WORKERS'" ;; esac
done
for c in $CONTENDERS; do
    case $c in single | keyset | backfill | cpu) ;; *) die "CONTENDERS: unknown contender '$c'" ;; esac
done
wants() { case " $CONTENDERS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

WORK=$(mktemp -d)
# The application's scripts, pointed at its own copy of the table when APART=1.
for f in update read; do
    if [ "$APART" = 1 ]; then
        sed 's/wxyc_schema\.flowsheet /wxyc_schema.flowsheet_app /' "bench/oltp-$f.sql" >"$WORK/oltp-$f.sql"
        grep -q flowsheet_app "$WORK/oltp-$f.sql" || die "could not point bench/oltp-$f.sql at flowsheet_app"
    else
        cp "bench/oltp-$f.sql" "$WORK/oltp-$f.sql"
    fi
done
# The job as written, with `workers: N` and (if TARGET_MS is set) batch.target: $WORK/spec-N.yaml.
for n in $WORKERS; do
    spec_with_workers "$n" >"$WORK/spec-$n.yaml"
    if [ -n "$TARGET_MS" ]; then
        sed -i "s/^  size: 5000$/  size: 5000\n  target: ${TARGET_MS}ms/" "$WORK/spec-$n.yaml"
        grep -q "target: ${TARGET_MS}ms" "$WORK/spec-$n.yaml" || die "could not set batch.target in a copy of $SPEC"
    fi
done
PGB_PID=
SAMPLER_PID=
cleanup() {
    local status=$?
    if [ -n "$PGB_PID" ] && kill -0 "$PGB_PID" 2>/dev/null; then kill "$PGB_PID" 2>/dev/null || true; fi
    [ -z "$SAMPLER_PID" ] || touch "$WORK/sampler.stop"
    drop_clones
    if [ "$KEEP_TEMPLATE" = 1 ]; then
        log "keeping template database ${TPL} (KEEP_TEMPLATE=1)"
    else
        drop_template || true
    fi
    if [ "$KEEP_WORK" = 1 ]; then log "logs kept in ${WORK}"; else rm -rf "$WORK"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ms() { awk -v s="$1" -v e="$2" 'BEGIN { printf "%.0f", (e - s) * 1000 }'; }
# 412 -> "412 ms", 15210 -> "15.21 s", "-" stays.
fmt_ms() {
    case $1 in '' | - | n/a) echo "${1:--}"; return ;; esac
    awk -v m="$1" 'BEGIN { if (m >= 1000) printf "%.2f s", m / 1000; else printf "%.0f ms", m }'
}
# Wait (bounded) for a background pid to exit; kill it if it does not. Returns its status.
wait_pid() {
    local pid=$1 secs=$2 i=0 status=0
    while kill -0 "$pid" 2>/dev/null && [ "$i" -lt $((secs * 10)) ]; do
        sleep 0.1
        i=$((i + 1))
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid ${pid} still running after ${secs}s: killing it"
        kill "$pid" 2>/dev/null || true
    fi
    wait "$pid" || status=$?
    return "$status"
}

# --- Longest transaction: a psql fed one query every ~100ms ----------------------------------
XACT_SQL="SELECT coalesce(round(extract(epoch FROM max(clock_timestamp() - xact_start)) * 1000), 0)
  FROM pg_stat_activity
 WHERE datname = current_database() AND backend_type = 'client backend'
   AND pid <> pg_backend_pid() AND application_name IS DISTINCT FROM 'pgbench';"
sampler_start() { # db tag
    rm -f "$WORK/sampler.stop"
    {
        while [ ! -e "$WORK/sampler.stop" ]; do
            printf '%s\n' "$XACT_SQL"
            sleep 0.1
        done 2>/dev/null | "${PSQL[@]}" -A -t -d "$1" >"$WORK/xact.$2" 2>&1
    } &
    SAMPLER_PID=$!
}
sampler_stop() { # tag -> longest transaction in ms
    touch "$WORK/sampler.stop"
    wait_pid "$SAMPLER_PID" 10 || true
    SAMPLER_PID=
    awk '/^[0-9]+$/ && $1 > m { m = $1 } END { print m + 0 }' "$WORK/xact.$1"
}

# --- The OLTP load -----------------------------------------------------------------------------
pgbench_start() { # db tag
    local db=$1 tag=$2 i=0 n=0
    "$PGBENCH" -h 127.0.0.1 -p 5432 -U postgres -n -c "$CLIENTS" -j "$THREADS" -R "$RATE" \
        -T $((RUN_TIMEOUT + IDLE_SECS + 120)) --latency-limit="$LATENCY_LIMIT_MS" \
        -l --log-prefix="$WORK/pgb.$tag" -D rows="$ROWS" -D nshows="$NSHOWS" \
        -f "$WORK/oltp-update.sql@1" -f "$WORK/oltp-read.sql@1" "$db" >"$WORK/pgbench.$tag.out" 2>&1 &
    PGB_PID=$!
    while [ "$n" -lt "$CLIENTS" ]; do
        if ! kill -0 "$PGB_PID" 2>/dev/null || [ "$i" -ge 150 ]; then
            cat "$WORK/pgbench.$tag.out" >&2
            die "pgbench did not connect its ${CLIENTS} clients to ${db}"
        fi
        sleep 0.1
        i=$((i + 1))
        n=$(psql_value -d postgres -c "SELECT count(*) FROM pg_stat_activity
                                        WHERE datname = '${db}' AND application_name = 'pgbench'")
    done
    sleep "$WARMUP_SECS"
}
# Ending pgbench's sessions makes every client abort and pgbench flush its logs and exit (2);
# SIGINT is ignored by background jobs and SIGTERM would lose the buffered log lines.
pgbench_stop() { # db
    psql_value -d postgres -c "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                                WHERE datname = '$1' AND application_name = 'pgbench'" >/dev/null
    wait_pid "$PGB_PID" 15 || true
    PGB_PID=
}
# "p50 p99 max late total" (ms, ms, ms, count, count) of the transactions scheduled in [t0, t1].
# Log line: client tx latency_us script epoch_s epoch_us lag_us, where latency_us counts from the
# scheduled start and is "skipped" (or "failed") instead for a transaction pgbench dropped. A
# skipped one is logged when its client catches up, without its schedule: those logged from t0
# until pgbench was stopped ($4) are counted — after the contender only its backlog is skipped.
oltp_stats() { # tag t0 t1 t_stop
    local logs=("$WORK"/pgb."$1".*)
    [ -e "${logs[0]}" ] || { echo "- - - - 0"; return; }
    cat "${logs[@]}" | awk -v t0="$2" -v t1="$3" -v t2="$4" -v lim=$((LATENCY_LIMIT_MS * 1000)) '
        NF >= 6 {
            done_at = $5 + $6 / 1e6
            if ($3 ~ /^[0-9]+$/) {
                sched = done_at - $3 / 1e6
                if (sched < t0 || sched > t1) next
                print "L", $3
                if ($3 > lim) late++
            } else {
                if (done_at < t0 || done_at > t2) next
                late++
            }
            total++
        }
        END { print "C", late + 0, total + 0 }' >"$WORK/oltp.$1"
    {
        awk '$1 == "L" { print $2 }' "$WORK/oltp.$1" | sort -n \
            | awk '{ v[NR] = $1 }
                   function pick(p,  i) { i = int(NR * p + 0.999999); if (i < 1) i = 1; return v[i] / 1000 }
                   END { if (NR) printf "%.1f %.1f %.1f", pick(0.5), pick(0.99), v[NR] / 1000
                         else printf "- - -" }'
        awk '$1 == "C" { printf " %d %d\n", $2, $3 }' "$WORK/oltp.$1"
    }
}

# --- Results -----------------------------------------------------------------------------------
R_NAME=() R_LOAD=() R_SECS=() R_BATCH=() R_XACT=() R_P50=() R_P99=() R_MAX=() R_LATE=() R_TX=()
R_WRONG=() R_RSS=() R_NOTE=()
FAILED=0
record() { # name load secs longest_batch_ms longest_xact_ms "p50 p99 max late tx" wrong rss note
    local p50 p99 max late tx
    read -r p50 p99 max late tx <<<"$6"
    R_NAME+=("$1") R_LOAD+=("$2") R_SECS+=("$3") R_BATCH+=("$4") R_XACT+=("$5")
    R_P50+=("$p50") R_P99+=("$p99") R_MAX+=("$max") R_LATE+=("$late") R_TX+=("$tx")
    R_WRONG+=("$7") R_RSS+=("$8") R_NOTE+=("$9")
}
# Backfill breakdown, per load: batches avg_keys final_size retried select statement commit wall
B_LOAD=() B_LINE=()

# --- Contenders: each sets C_BATCH_MS, C_RSS, C_NOTE and returns the command's status ----------
run_single() { # db tag
    C_RSS=- C_NOTE="1 transaction"
    timeout -k 10 "$RUN_TIMEOUT" "${PSQL[@]}" -d "$1" -c "$UPDATE_SQL" >"$WORK/$2.log" 2>&1
}
run_keyset() { # db tag
    local status=0
    C_RSS=- C_NOTE="plpgsql DO + COMMIT"
    timeout -k 10 "$RUN_TIMEOUT" "${PSQL[@]}" -d "$1" -c "$(keyset_sql "$BATCH")" \
        >"$WORK/$2.log" 2>&1 || status=$?
    C_BATCH_MS=$(sed -n 's/.*longest batch \([0-9.]*\) ms.*/\1/p' "$WORK/$2.log" | tail -n 1)
    C_BATCH_MS=${C_BATCH_MS:--}
    sed 's/^/    /' "$WORK/$2.log" >&2
    return "$status"
}
run_backfill() { # db tag workers
    local status=0 timer=()
    C_NOTE='' C_RSS=n/a
    if have_gnu_time; then timer=(/usr/bin/time -v -o "$WORK/time.$2"); fi
    DATABASE_URL="${PG_BASE_URL}/$1" BACKFILL_LOG=info,backfill=debug \
        timeout -k 10 "$RUN_TIMEOUT" "${timer[@]}" "$BACKFILL" run --log-format json "$WORK/spec-$3.yaml" \
        >"$WORK/$2.out" 2>"$WORK/$2.log" || status=$?
    C_RSS=$(peak_rss "$WORK/time.$2")
    # One "batch done" line per batch: size keys retried select_ms statement_ms commit_ms.
    jq -R -r 'fromjson? | select(.message == "batch done")
              | [.size, .keys, (.retried // 0), .select_ms, .statement_ms, .commit_ms] | @tsv' \
        "$WORK/$2.log" >"$WORK/batches.$2" || true
    C_BATCH_MS=$(awk '{ t = $4 + $5 + $6; if (t > m) m = t } END { print m + 0 }' "$WORK/batches.$2")
    sed 's/^/    /' "$WORK/$2.out" >&2
    if [ "$status" != 0 ]; then
        log "backfill: exit status ${status}; last lines of its log:"
        tail -n 20 "$WORK/$2.log" | sed 's/^/    /' >&2
    fi
    C_NOTE="exit ${status}"
    return "$status"
}
run_cpu() {
    local pids=() i
    C_NOTE="${CPU_SECS}s, no database"
    for ((i = 0; i < HOGS; i++)); do
        timeout "$CPU_SECS" sh -c 'while :; do :; done' &
        pids+=($!)
    done
    wait "${pids[@]}" || true   # timeout ends each loop with status 124
}
backfill_breakdown() { # tag wall_seconds -> one line for B_LINE
    awk -v wall="$2" '
        $2 + $3 > 0 { n++; keys += $2; retried += $3; last = $1 }
        { sel += $4; st += $5; co += $6 }
        END {
            client = wall - (sel + st + co) / 1000
            printf "%d %.0f %d %d %.2f %.2f %.2f %.2f %.2f", n, (n ? keys / n : 0), last, retried,
                   sel / 1000, st / 1000, co / 1000, client, wall
        }' "$WORK/batches.$1"
}

# One contender on a fresh clone, with or without the load.
# $1 = single|keyset|backfillN (N workers)|idle.
run() { # kind load(none|pgbench)
    local kind=$1 load=$2 db="backfill_oltp_$1_$2" tag="$1.$2" name t0 t1 t2 secs status=0 xact
    local stats="- - - - -" wrong workers=
    case $kind in
        single) name="single UPDATE" ;;
        keyset) name="keyset loop (${BATCH})" ;;
        backfill*) workers=${kind#backfill} name="backfill ${workers}w" kind=backfill ;;
        idle) name="(pgbench alone)" ;;
        cpu) name="cpu: ${HOGS} busy loops" ;;
    esac
    clone "$db"
    [ "$load" = none ] || pgbench_start "$db" "$tag"
    log "${name}, load ${load}: running"
    C_BATCH_MS=- C_RSS=- C_NOTE=-
    sampler_start "$db" "$tag"
    t0=$(now)
    case $kind in
        single) run_single "$db" "$tag" || status=$? ;;
        keyset) run_keyset "$db" "$tag" || status=$? ;;
        backfill) run_backfill "$db" "$tag" "$workers" || status=$? ;;
        idle) sleep "$IDLE_SECS" ;;
        cpu) run_cpu ;;
    esac
    t1=$(now)
    xact=$(sampler_stop "$tag")
    secs=$(elapsed "$t0" "$t1")
    [ "$kind" != single ] || C_BATCH_MS=$(ms "$t0" "$t1")
    if [ "$load" != none ]; then
        sleep "$TAIL_SECS"   # let transactions that waited on the contender's locks finish
        t2=$(now)
        pgbench_stop "$db"
        stats=$(oltp_stats "$tag" "$t0" "$t1" "$t2")
    fi
    if [ "$status" != 0 ] && [ "$kind" != backfill ]; then
        log "${name}: FAILED with exit status ${status}"
        tail -n 20 "$WORK/$tag.log" 2>/dev/null | sed 's/^/    /' >&2 || true
        C_NOTE="FAILED: exit ${status}"
    fi
    [ "$status" = 0 ] || FAILED=1
    if [ "$kind" = idle ] || [ "$kind" = cpu ]; then
        wrong=-
        secs=-
        [ "$kind" = cpu ] || C_NOTE="${IDLE_SECS}s of load, no contender"
    else
        wrong=$(wrong_rows "$db")
        if [ "$wrong" != 0 ] && { [ "$kind" != keyset ] || [ "$load" = none ]; }; then FAILED=1; fi
    fi
    if [ "$kind" = backfill ]; then
        B_LOAD+=("${load}/${workers}w")
        B_LINE+=("$(backfill_breakdown "$tag" "$secs")")
    fi
    log "${name}, load ${load}: ${secs} s, longest batch $(fmt_ms "$C_BATCH_MS"), longest xact $(fmt_ms "$xact"), OLTP p50 p99 max late tx: ${stats}, wrong rows: ${wrong}"
    record "$name" "$load" "$secs" "$C_BATCH_MS" "$xact" "$stats" "$wrong" "$C_RSS" "$C_NOTE"
    drop_db "$db"
}

# --- Postgres, the binary, the dataset ---------------------------------------------------------
START=$(now)
scripts/services.sh
HAVE_BACKFILL=1
find_backfill || HAVE_BACKFILL=0
build_template "$ROWS"
if [ "$APART" = 1 ]; then
    log "APART=1: the application gets its own copy of flowsheet (flowsheet_app)"
    psql_admin -d postgres -c "ALTER DATABASE ${TPL} IS_TEMPLATE false"
    psql_admin -d "$TPL" -c "CREATE TABLE wxyc_schema.flowsheet_app AS TABLE wxyc_schema.flowsheet" \
        -c "ALTER TABLE wxyc_schema.flowsheet_app ADD PRIMARY KEY (id)" \
        -c "CREATE INDEX ON wxyc_schema.flowsheet_app (show_id)" \
        -c "VACUUM (FREEZE, ANALYZE) wxyc_schema.flowsheet_app"
    psql_admin -d postgres -c "ALTER DATABASE ${TPL} IS_TEMPLATE true"
fi
TARGET_ROWS=$(psql_value -d "$TPL" -c \
    "SELECT count(*) FROM wxyc_schema.flowsheet WHERE entry_type = 'track' AND dj_name IS NULL")
[ "$TARGET_ROWS" -gt 0 ] || die "no rows to update: ROWS=${ROWS} is too small"
log "${TARGET_ROWS} track rows to fill; load: ${CLIENTS} clients, ${RATE} tx/s, latency limit ${LATENCY_LIMIT_MS} ms"

for load in none pgbench; do
    [ "$load" = none ] || run idle pgbench
    if wants cpu && [ "$load" != none ]; then run cpu "$load"; fi
    if wants single; then run single "$load"; fi
    if wants keyset; then run keyset "$load"; fi
    if wants backfill && [ "$HAVE_BACKFILL" = 1 ]; then
        for n in $WORKERS; do run "backfill$n" "$load"; done
    fi
done

# --- Report ------------------------------------------------------------------------------------
idle_p99=-
for i in "${!R_NAME[@]}"; do [ "${R_NAME[$i]}" != "(pgbench alone)" ] || idle_p99=${R_P99[$i]}; done
single_secs() { # load
    local i
    for i in "${!R_NAME[@]}"; do
        if [ "${R_NAME[$i]}" = "single UPDATE" ] && [ "${R_LOAD[$i]}" = "$1" ]; then echo "${R_SECS[$i]}"; return; fi
    done
    echo -
}
ratio() { # a b -> a/b with an x, or -
    case "$1$2" in *-*) echo - ;; *) awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", (b > 0 ? a / b : 0) }' ;; esac
}

echo
echo "OLTP benchmark: ${ROWS} flowsheet rows, ${TARGET_ROWS} track rows to fill; load = pgbench ${CLIENTS} clients, -R ${RATE}, latency limit ${LATENCY_LIMIT_MS} ms$([ "$APART" = 0 ] || echo ', on its own copy of the table (APART=1)') ($(psql_value -d postgres -c 'SHOW server_version'), $(nproc) CPUs)"
p() { case $1 in -) echo - ;; *) echo "$1 ms" ;; esac; }
fmt='%-18s %-7s %8s %8s %8s %9s %9s %8s %8s %9s %13s %6s %9s  %s\n'
# shellcheck disable=SC2059  # the format is ours
printf "$fmt" contender load seconds rows/s "x UPDATE" "longest" "longest" "OLTP" "OLTP" "OLTP" "late" wrong "peak" note
# shellcheck disable=SC2059
printf "$fmt" "" "" "" "" "same load" batch xact p50 p99 max "(tx)" rows RSS ""
for i in "${!R_NAME[@]}"; do
    secs=${R_SECS[$i]}
    if [ "$secs" = - ]; then rate=- x=-
    else
        rate=$(awk -v n="$TARGET_ROWS" -v s="$secs" 'BEGIN { printf "%.0f", (s > 0 ? n / s : 0) }')
        x=$(ratio "$secs" "$(single_secs "${R_LOAD[$i]}")")
    fi
    late=-
    if [ "${R_TX[$i]}" != - ]; then
        late=$(awk -v l="${R_LATE[$i]}" -v t="${R_TX[$i]}" 'BEGIN { printf "%d/%d %.1f%%", l, t, (t > 0 ? 100 * l / t : 0) }')
    fi
    # shellcheck disable=SC2059
    printf "$fmt" "${R_NAME[$i]}" "${R_LOAD[$i]}" "$secs" "$rate" "$x" "$(fmt_ms "${R_BATCH[$i]}")" \
        "$(fmt_ms "${R_XACT[$i]}")" "$(p "${R_P50[$i]}")" "$(p "${R_P99[$i]}")" "$(p "${R_MAX[$i]}")" \
        "$late" "${R_WRONG[$i]}" "${R_RSS[$i]}" "${R_NOTE[$i]}"
done
echo "(longest batch: one transaction of work — the single UPDATE's whole run; longest xact: oldest open transaction"
echo " seen in the clone, pgbench sessions excluded; OLTP columns count transactions scheduled during the run)"

if [ "${#B_LOAD[@]}" -gt 0 ]; then
    echo
    echo "backfill per batch (batch.target ${TARGET_MS:-default}${TARGET_MS:+ms}; select, statement, commit summed over the workers; client = wall time minus their sum, negative with several workers)"
    bfmt='%-12s %8s %10s %10s %8s %9s %10s %9s %9s %9s\n'
    # shellcheck disable=SC2059
    printf "$bfmt" load batches "avg keys" "final size" retried "select s" "statement s" "commit s" "client s" "wall s"
    for i in "${!B_LOAD[@]}"; do
        # shellcheck disable=SC2059,SC2086  # our format; B_LINE holds space-separated numbers
        printf "$bfmt" "${B_LOAD[$i]}" ${B_LINE[$i]}
    done
fi

# --- Targets -----------------------------------------------------------------------------------
MISSED=0
verdict() { # ok(0/1) text
    if [ "$1" = 1 ]; then echo "  met     $2"; else echo "  MISSED  $2"; MISSED=1; fi
}
echo
echo "targets"
for i in "${!R_NAME[@]}"; do
    case ${R_NAME[$i]} in "backfill "*w) ;; *) continue ;; esac
    name=${R_NAME[$i]}
    load=${R_LOAD[$i]}
    r=$(ratio "${R_SECS[$i]}" "$(single_secs "$load")")
    limit=1.25
    [ "$name" = "backfill 1w" ] || limit=0.8
    if [ "$load" = none ]; then
        verdict "$(awk -v r="${r%x}" -v l="$limit" 'BEGIN { print (r != "-" && r + 0 <= l) ? 1 : 0 }')" \
            "${name}: total time <= ${limit}x single UPDATE (no load): ${r}"
    else
        echo "  (info)  ${name}: total time vs single UPDATE under load: ${r}"
    fi
    verdict "$(awk -v x="${R_XACT[$i]}" 'BEGIN { print (x != "-" && x + 0 <= 1000) ? 1 : 0 }')" \
        "${name}: longest engine transaction <= 1 s (load ${load}): $(fmt_ms "${R_XACT[$i]}")"
    if [ -n "$TARGET_MS" ]; then
        verdict "$(awk -v b="${R_BATCH[$i]}" -v t="$TARGET_MS" 'BEGIN { print (b != "-" && b + 0 <= 2 * t) ? 1 : 0 }')" \
            "${name}: longest batch <= 2x batch.target = $((2 * TARGET_MS)) ms (load ${load}): $(fmt_ms "${R_BATCH[$i]}")"
    fi
    if [ "$load" != none ]; then
        verdict "$(awk -v p="${R_P99[$i]}" -v i="$idle_p99" 'BEGIN { print (p != "-" && i != "-" && p + 0 <= 2 * i) ? 1 : 0 }')" \
            "${name}: OLTP p99 <= 2x idle (${idle_p99} ms): ${R_P99[$i]} ms ($(ratio "${R_P99[$i]}" "$idle_p99"))"
    fi
    verdict "$(awk -v r="${R_RSS[$i]% MB}" 'BEGIN { print (r != "n/a" && r + 0 < 30) ? 1 : 0 }')" \
        "${name}: engine peak RSS < 30 MB (load ${load}): ${R_RSS[$i]}"
done
for i in "${!R_NAME[@]}"; do
    case ${R_NAME[$i]} in "cpu: "*) ;; *) continue ;; esac
    echo "  (info)  ${R_NAME[$i]}, no database: OLTP p99 ${R_P99[$i]} ms ($(ratio "${R_P99[$i]}" "$idle_p99") idle): the floor for any contender that keeps every CPU busy"
done
bad=()
for i in "${!R_NAME[@]}"; do
    case ${R_WRONG[$i]} in 0 | -) ;; *) bad+=("${R_NAME[$i]}/${R_LOAD[$i]}: ${R_WRONG[$i]}") ;; esac
done
if [ "${#bad[@]}" = 0 ]; then
    verdict 1 "0 wrong rows after every run"
else
    verdict 0 "0 wrong rows after every run (${bad[*]})"
fi
log "whole benchmark took $(elapsed "$START" "$(now)") s"

[ "$FAILED" = 0 ] || { log "FAILED: a contender failed or left wrong rows"; exit 1; }
[ "$STRICT" = 0 ] || [ "$MISSED" = 0 ] || { log "a target was missed (--strict)"; exit 1; }
