#!/usr/bin/env bash
# services.sh: make sure the servers the tests, demos and benchmarks use are up.
#
#   scripts/services.sh                     # start what is missing; nothing on stdout
#   eval "$(scripts/services.sh --env)"     # the same, then export the servers' URLs:
#                                           # BACKFILL_TEST_PG, BACKFILL_TEST_CH,
#                                           # BACKFILL_TEST_CH_CURRENT
#   scripts/services.sh --pg-only [--env]   # Postgres only (the demo)
#
# Idempotent and non-interactive; run as root on Debian (12). It never reconfigures the
# machine's Postgres (no pg_hba.conf edits, no ALTER SYSTEM, no roles): the tests that need TLS,
# passwords, restarts or server settings start private clusters of their own
# (tests/common/cluster.rs). It:
#   - installs postgresql (and openssl, which those tests use for their certificates) with
#     apt-get if missing, creates the newest cluster if there is none, starts it, and waits
#     (bounded) until 127.0.0.1:5432 accepts connections;
#   - checks that user postgres can connect to 127.0.0.1:5432 without a password. If it cannot
#     (a stock Debian install asks for a password over TCP), it does NOT edit pg_hba.conf: it
#     starts a private cluster for the test suite instead (data in /var/tmp/backfill-test-pg,
#     port 55432, run as user postgres, trust auth on 127.0.0.1 only) and reports that URL as
#     BACKFILL_TEST_PG (BACKFILL_PRIVATE_PG=1 forces this);
#   - installs clickhouse-server and clickhouse-client (Debian 12 ships 18.16) if missing and,
#     unless 127.0.0.1:8123 already answers `SELECT 1`, starts the server in the background
#     (log: /var/log/clickhouse-server/backfill-ci.log) and waits (bounded) for it; the tests use
#     its HTTP interface as user default without a password (tests/common/ch.rs);
#   - starts a current ClickHouse (26.x) on 127.0.0.1:8124 (scripts/clickhouse-current.sh).
# Progress goes to stderr; stdout has the `export` lines of --env only.
set -euo pipefail
cd "$(dirname "$0")/.."

PRINT_ENV=0
PG_ONLY=0
for arg in "$@"; do
    case "$arg" in
        --env) PRINT_ENV=1 ;;
        --pg-only) PG_ONLY=1 ;;
        *) echo "usage: scripts/services.sh [--env] [--pg-only]" >&2; exit 2 ;;
    esac
done

PGHOST_ADDR=127.0.0.1
PGPORT_NUM=5432
PRIVATE_PG_DIR=${BACKFILL_PRIVATE_PG_DIR:-/var/tmp/backfill-test-pg}
PRIVATE_PG_PORT=${BACKFILL_PRIVATE_PG_PORT:-55432}

log() { echo "services: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# psql as user postgres over TCP to 127.0.0.1:PORT, never prompting for a password.
tcp_psql() {
    local port=$1
    shift
    psql -X -q -A -t -w -v ON_ERROR_STOP=1 -h "$PGHOST_ADDR" -p "$port" -U postgres -d postgres "$@"
}

apt_install() {
    log "installing $* with apt-get"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# --- 1. PostgreSQL and openssl installed ---------------------------------------------------------
if ! command -v pg_lsclusters >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1 \
    || [ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]; then
    apt_install postgresql
else
    log "postgresql is installed"
fi
command -v openssl >/dev/null 2>&1 || apt_install openssl

# Newest cluster version (the newest directory in /etc/postgresql); if there is no cluster at
# all yet, the newest installed server version.
newest_subdir() { find "$1" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | sort -V | tail -1; }
PGVER=$(newest_subdir /etc/postgresql || true)
[ -n "$PGVER" ] || PGVER=$(newest_subdir /usr/lib/postgresql || true)
[ -n "$PGVER" ] || die "cannot find an installed PostgreSQL version"

if ! pg_lsclusters -h | awk -v v="$PGVER" '$1 == v && $2 == "main" { found = 1 } END { exit !found }'; then
    log "creating cluster $PGVER/main"
    pg_createcluster --port "$PGPORT_NUM" "$PGVER" main >&2
fi

# --- 2. The machine's cluster running ------------------------------------------------------------
cluster_status() {
    pg_lsclusters -h | awk -v v="$PGVER" '$1 == v && $2 == "main" { print $4 }'
}
if [ "$(cluster_status)" != "online" ]; then
    log "cluster $PGVER/main is $(cluster_status): starting it"
    if ! pg_ctlcluster --skip-systemctl-redirect "$PGVER" main start >&2; then
        log "pg_ctlcluster refused --skip-systemctl-redirect (or failed): retrying without it"
        pg_ctlcluster "$PGVER" main start >&2 || log "cluster $PGVER/main does not start"
    fi
else
    log "cluster $PGVER/main is online"
fi

log "waiting for $PGHOST_ADDR:$PGPORT_NUM to accept connections"
ready=0
for _ in $(seq 1 60); do
    if pg_isready -q -h "$PGHOST_ADDR" -p "$PGPORT_NUM"; then
        ready=1
        break
    fi
    sleep 1
done
[ "$ready" = 1 ] || log "postgres on $PGHOST_ADDR:$PGPORT_NUM is not ready after 60 s"

# --- 3. Which Postgres the tests use -------------------------------------------------------------
# The machine's, when user postgres gets in over TCP without a password; else a private cluster
# of the test suite's own (never an edit of the machine's pg_hba.conf).
start_private_cluster() {
    local data=$PRIVATE_PG_DIR/data ver bin
    if tcp_psql "$PRIVATE_PG_PORT" -c 'SELECT 1' >/dev/null 2>&1; then
        log "the private cluster on $PGHOST_ADDR:$PRIVATE_PG_PORT is up ($PRIVATE_PG_DIR)"
        return
    fi
    ver=$(cat "$data/PG_VERSION" 2>/dev/null || true)
    if [ -z "$ver" ] || [ ! -x "/usr/lib/postgresql/$ver/bin/postgres" ]; then
        ver=$(newest_subdir /usr/lib/postgresql)
        log "creating a private cluster ($ver) in $PRIVATE_PG_DIR, port $PRIVATE_PG_PORT, trust auth"
        rm -rf "$PRIVATE_PG_DIR"
        install -d -m 0700 -o postgres -g postgres "$PRIVATE_PG_DIR"
        if ! runuser -u postgres -- "/usr/lib/postgresql/$ver/bin/initdb" -D "$data" -U postgres \
            --auth=trust --encoding=UTF8 >"$PRIVATE_PG_DIR/initdb.log" 2>&1; then
            cat "$PRIVATE_PG_DIR/initdb.log" >&2
            die "initdb of the private cluster failed (output above)"
        fi
        {
            echo
            echo "# scripts/services.sh: the test suite's private cluster"
            echo "port = $PRIVATE_PG_PORT"
            echo "listen_addresses = '$PGHOST_ADDR'"
            echo "unix_socket_directories = '$PRIVATE_PG_DIR'"
        } >>"$data/postgresql.conf"
        printf '%s\n' "local all all trust" "host all all $PGHOST_ADDR/32 trust" >"$data/pg_hba.conf"
    fi
    bin=/usr/lib/postgresql/$ver/bin
    log "starting the private cluster in $PRIVATE_PG_DIR (log: $PRIVATE_PG_DIR/server.log)"
    if ! (cd / && runuser -u postgres -- "$bin/pg_ctl" -D "$data" -l "$PRIVATE_PG_DIR/server.log" -w -t 60 start >/dev/null); then
        tail -n 30 "$PRIVATE_PG_DIR/server.log" >&2 || true
        die "the private cluster in $PRIVATE_PG_DIR does not start (log above)"
    fi
    tcp_psql "$PRIVATE_PG_PORT" -c 'SELECT 1' >/dev/null \
        || die "user postgres cannot connect to the private cluster on $PGHOST_ADDR:$PRIVATE_PG_PORT"
}

if [ "${BACKFILL_PRIVATE_PG:-}" != 1 ] && [ "$ready" = 1 ] \
    && tcp_psql "$PGPORT_NUM" -c 'SELECT 1' >/dev/null 2>&1; then
    log "user postgres can connect to $PGHOST_ADDR:$PGPORT_NUM without a password"
    PG_URL="postgres://postgres@${PGHOST_ADDR}:${PGPORT_NUM}/postgres"
else
    if [ "${BACKFILL_PRIVATE_PG:-}" = 1 ]; then
        log "BACKFILL_PRIVATE_PG=1: the tests get a private cluster"
    else
        log "user postgres cannot connect to $PGHOST_ADDR:$PGPORT_NUM without a password: the tests get a private cluster (pg_hba.conf is left alone)"
    fi
    start_private_cluster
    PG_URL="postgres://postgres@${PGHOST_ADDR}:${PRIVATE_PG_PORT}/postgres"
fi
log "ready: $PG_URL"
if [ "$PG_ONLY" = 1 ]; then
    [ "$PRINT_ENV" = 0 ] || printf 'export BACKFILL_TEST_PG=%q\n' "$PG_URL"
    exit 0
fi

# --- 4. ClickHouse 18.16 -----------------------------------------------------------------------------
CH_HTTP=http://127.0.0.1:8123
CH_CONFIG=/etc/clickhouse-server/config.xml
CH_LOG=/var/log/clickhouse-server/backfill-ci.log

ch_answers() { [ "$(curl -s --max-time 5 "$CH_HTTP/?query=SELECT%201" 2>/dev/null)" = 1 ]; }

if ! command -v clickhouse-server >/dev/null 2>&1 || ! command -v curl >/dev/null 2>&1; then
    log "clickhouse-server (or curl) is not installed: installing it with apt-get"
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y clickhouse-server clickhouse-client curl >&2
else
    log "clickhouse-server is installed"
fi

if ch_answers; then
    log "clickhouse answers on $CH_HTTP"
else
    # Debian's unit runs the server as user clickhouse, and a fresh install leaves
    # /var/lib/clickhouse to that user. A server started as root before (as on the machines
    # these scripts were written on) leaves root-owned files there that user clickhouse cannot
    # open: then it has to run as root again (18.16 allows that). Decide by ownership.
    run_as=(runuser -u clickhouse --)
    if ! id clickhouse >/dev/null 2>&1 \
        || [ -n "$(find /var/lib/clickhouse /var/log/clickhouse-server ! -user clickhouse \
            ! -path "$CH_LOG" -print -quit 2>/dev/null)" ]; then
        run_as=()
    fi
    install -d -m 0755 /var/log/clickhouse-server
    log "clickhouse does not answer on $CH_HTTP: starting it as ${run_as[2]:-root} (log: $CH_LOG)"
    # The redirections are on the whole background subshell, not only on the server: a
    # subshell left holding our stdout keeps `$(scripts/services.sh --env)` waiting forever.
    (cd / && exec setsid "${run_as[@]}" clickhouse-server --config-file="$CH_CONFIG") \
        >"$CH_LOG" 2>&1 </dev/null &
    ready=0
    for _ in $(seq 1 60); do
        if ch_answers; then
            ready=1
            break
        fi
        sleep 1
    done
    if [ "$ready" != 1 ]; then
        tail -n 30 "$CH_LOG" >&2 || true
        die "clickhouse does not answer on $CH_HTTP after 60 s (log above: $CH_LOG)"
    fi
fi
log "ready: clickhouse $(curl -s "$CH_HTTP/?query=SELECT%20version()") on $CH_HTTP (user default)"

# --- 5. Current ClickHouse -----------------------------------------------------------------------
CH_CURRENT_HTTP=http://127.0.0.1:8124
scripts/clickhouse-current.sh

if [ "$PRINT_ENV" = 1 ]; then
    printf 'export BACKFILL_TEST_PG=%q\n' "$PG_URL"
    printf 'export BACKFILL_TEST_CH=%q\n' "$CH_HTTP"
    printf 'export BACKFILL_TEST_CH_CURRENT=%q\n' "$CH_CURRENT_HTTP"
fi
