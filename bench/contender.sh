#!/usr/bin/env bash
# contender.sh: one contender of bench/single-update.sh as one process, for timing it from
# outside (`/usr/bin/time -v`, hyperfine, or any whole-process timer that alternates two commands).
#
#   bench/contender.sh prepare 12        # template (ROWS rows) + 12 fresh clones, queued
#   bench/contender.sh run single        # the next queued clone: one big UPDATE
#   bench/contender.sh run backfill 2    # the next queued clone: `backfill run`, 2 workers
#   bench/contender.sh run keyset        # the next queued clone: the plpgsql keyset loop
#   bench/contender.sh check             # wrong rows of every clone used so far (must be 0)
#   bench/contender.sh cleanup           # drop the clones and the template
#
# A clone costs seconds to make (CREATE DATABASE ... TEMPLATE and a CHECKPOINT), so `prepare`
# makes them all up front and `run` only takes the next one from the queue: the time of a `run`
# is the contender's work alone, plus the start of one psql or backfill process. Every run takes
# its own clone, so `run` can be repeated as often as clones were prepared.
# Queue and logs live in $QUEUE_DIR (default /tmp/backfill-contenders). Backfill runs log at
# debug (JSON) into $QUEUE_DIR/<clone>.log: their "batch done" lines give each batch's
# select/statement/commit milliseconds. Environment: ROWS (1000000), BACKFILL, SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS=${ROWS:-1000000}
BACKFILL=${BACKFILL:-target/release/backfill}
QUEUE_DIR=${QUEUE_DIR:-/tmp/backfill-contenders}
TPL=backfill_contender_tpl
export LOG_TAG=contender

# shellcheck source-path=SCRIPTDIR/..
source bench/lib.sh

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

next_clone() { # -> name of the next unused clone (and marks it used)
    local n
    n=$(cat "$QUEUE_DIR/next" 2>/dev/null || echo 1)
    [ -n "$(psql_value -d postgres -c "SELECT 1 FROM pg_database WHERE datname = 'backfill_q${n}'")" ] \
        || die "no clone backfill_q${n} left: run 'bench/contender.sh prepare N' first"
    echo $((n + 1)) >"$QUEUE_DIR/next"
    echo "backfill_q${n}" >>"$QUEUE_DIR/used"
    echo "backfill_q${n}"
}

case ${1:-} in
    prepare)
        count=${2:-12}
        case $count in '' | *[!0-9]*) die "prepare needs a number of clones" ;; esac
        mkdir -p "$QUEUE_DIR"
        rm -f "$QUEUE_DIR/next" "$QUEUE_DIR/used"
        scripts/services.sh
        build_template "$ROWS"
        for i in $(seq 1 "$count"); do
            drop_db "backfill_q${i}"
            psql_admin -d postgres -c "CREATE DATABASE backfill_q${i} TEMPLATE ${TPL}"
        done
        psql_admin -d postgres -c CHECKPOINT
        echo 1 >"$QUEUE_DIR/next"
        log "${count} clones of ${ROWS} rows queued"
        ;;
    run)
        kind=${2:-}
        db=$(next_clone)
        case $kind in
            single) exec "${PSQL_CMD[@]}" -d "$db" -c "$UPDATE_SQL" ;;
            keyset) exec "${PSQL_CMD[@]}" -d "$db" -c "$(keyset_sql 5000)" ;;
            backfill)
                workers=${3:-1}
                spec=$QUEUE_DIR/spec-${workers}.yaml
                spec_with_workers "$workers" >"$spec"
                DATABASE_URL="${PG_BASE_URL}/${db}" BACKFILL_LOG=info,backfill=debug \
                    exec "$BACKFILL" run --log-format json "$spec" >"$QUEUE_DIR/$db.out" 2>"$QUEUE_DIR/$db.log"
                ;;
            *) usage >&2; exit 2 ;;
        esac
        ;;
    check)
        bad=0
        while read -r db; do
            w=$(wrong_rows "$db")
            log "${db}: ${w} wrong rows"
            [ "$w" = 0 ] || bad=1
        done <"$QUEUE_DIR/used"
        exit "$bad"
        ;;
    cleanup)
        for db in $(psql_value -d postgres -c "SELECT datname FROM pg_database WHERE datname LIKE 'backfill\_q%'"); do
            drop_db "$db"
        done
        drop_template || true
        rm -rf "$QUEUE_DIR"
        ;;
    -h | --help) usage ;;
    *) usage >&2; exit 2 ;;
esac
