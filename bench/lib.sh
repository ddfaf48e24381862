# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts that source it
# lib.sh: shared pieces of the benchmarks in bench/ (sourced, not run).
#
#   source bench/lib.sh      # from the repository root, after `set -euo pipefail`
#
# Provides: the flowsheet dj_name job as SQL (UPDATE_SQL, keyset_sql, CHECK_SQL) and as a spec
# (SPEC, default bench/flowsheet-dj-name.yaml; spec_with_workers N prints it with `workers: N`),
# psql helpers (PSQL_CMD, psql_admin, psql_value), a template database built from
# scripts/demo-data.sql (build_template, drop_template), fresh per-contender copies of it
# (clone, drop_db, drop_clones), the wrong-rows check (wrong_rows), and finding/building the
# backfill binary (find_backfill) and /usr/bin/time (have_gnu_time).
#
# Callers set TPL (template database name) before build_template/clone; LOG_TAG prefixes log
# lines (default "bench"); BACKFILL and SKIP_BACKFILL are read by find_backfill.

PG_BASE_URL=postgres://postgres@127.0.0.1:5432
SPEC=${SPEC:-bench/flowsheet-dj-name.yaml}
CLONES=()

# The job in one statement: every track row that still has no dj_name, in one transaction.
UPDATE_SQL="UPDATE wxyc_schema.flowsheet f
   SET dj_name = COALESCE(u.dj_name, s.legacy_dj_name, u.name)
  FROM wxyc_schema.shows s
  LEFT JOIN wxyc_schema.auth_user u ON u.id = s.primary_dj_id
 WHERE f.show_id = s.id AND f.entry_type = 'track' AND f.dj_name IS NULL"

# The hand-written keyset loop: a server-side DO block; next $1 keys after the cursor
# (FOR UPDATE SKIP LOCKED), UPDATE ... WHERE id = ANY(keys), COMMIT — one transaction per batch.
# It ends with a NOTICE `keyset loop: R rows updated in B batches of up to N; longest batch M ms`
# (a batch is timed from its SELECT to the end of its COMMIT, with clock_timestamp()).
keyset_sql() {
    local batch=$1
    cat <<SQL
DO \$\$
DECLARE
    cursor_id  bigint := NULL;
    keys       bigint[];
    n          bigint;
    total      bigint := 0;
    batches    int := 0;
    t0         timestamptz;
    longest_ms float8 := 0;
BEGIN
    LOOP
        t0 := clock_timestamp();
        SELECT array_agg(id ORDER BY id) INTO keys
          FROM (SELECT id FROM wxyc_schema.flowsheet
                 WHERE (cursor_id IS NULL OR id > cursor_id)
                   AND entry_type = 'track' AND dj_name IS NULL
                 ORDER BY id
                 LIMIT ${batch}
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
        longest_ms := greatest(longest_ms,
                               extract(epoch FROM clock_timestamp() - t0) * 1000);
    END LOOP;
    RAISE NOTICE 'keyset loop: % rows updated in % batches of up to ${batch}; longest batch % ms',
        total, batches, round(longest_ms::numeric, 1);
END
\$\$
SQL
}

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

log() { echo "${LOG_TAG:-bench}: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
PSQL_CMD=(psql -X -q -w -v ON_ERROR_STOP=1 -h 127.0.0.1 -p 5432 -U postgres)
psql_admin() { "${PSQL_CMD[@]}" "$@"; }
psql_value() { psql_admin -A -t "$@"; }
now() { date +%s.%N; }
elapsed() { awk -v s="$1" -v e="$2" 'BEGIN { printf "%.2f", e - s }'; }

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
drop_clones() {
    local db
    for db in "${CLONES[@]}"; do
        drop_db "$db" || true
    done
}

# A fresh copy of the template, with its dirty pages flushed so the timing starts clean.
clone() {
    local db=$1
    drop_db "$db"
    CLONES+=("$db")
    psql_admin -d postgres -c "CREATE DATABASE ${db} TEMPLATE ${TPL}" -c "CHECKPOINT"
}

# (Re)build the template database TPL with $1 flowsheet rows: load, VACUUM (FREEZE, ANALYZE) —
# like a production table: vacuumed, analyzed, hint bits set, so no contender pays for that —
# and mark it a template.
build_template() {
    local rows=$1 start
    log "building template ${TPL} with ${rows} flowsheet rows"
    drop_template
    psql_admin -d postgres -c "CREATE DATABASE ${TPL}"
    start=$(now)
    psql_admin -d "$TPL" -v rows="$rows" -f scripts/demo-data.sql >&2
    psql_admin -d "$TPL" -c "VACUUM (FREEZE, ANALYZE)"
    psql_admin -d postgres -c "ALTER DATABASE ${TPL} IS_TEMPLATE true"
    log "template ready in $(elapsed "$start" "$(now)") s"
}

wrong_rows() { psql_value -d "$1" -c "$CHECK_SQL"; }

# The bench job (SPEC) with `workers: N`: N workers share it (`run` starts N threads).
spec_with_workers() {
    sed '/^workers:/d' "$SPEC"
    echo "workers: $1"
}

# Sets BACKFILL to a runnable binary, building target/release/backfill if it is missing;
# returns 1 (with the reason logged) if there is none or SKIP_BACKFILL=1.
find_backfill() {
    if [ "${SKIP_BACKFILL:-0}" = 1 ]; then
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

# "12.3 MB" from a /usr/bin/time -v report, or n/a.
peak_rss() {
    if [ -f "$1" ]; then
        awk -F': ' '/Maximum resident set size/ { printf "%.1f MB", $2 / 1024 }' "$1"
    else
        echo n/a
    fi
}
