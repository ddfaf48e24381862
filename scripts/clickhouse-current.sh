#!/usr/bin/env bash
# clickhouse-current.sh: a current ClickHouse (26.x) on 127.0.0.1:8124 (HTTP) and :9001 (native),
# beside Debian's 18.16 on :8123, for the tests that run on both (tests/common/ch.rs).
#
# Idempotent and non-interactive; run as root on Debian (12). The server is chDB (PyPI package
# `chdb-core`: ClickHouse as a library) kept serving by one Python process:
#   - a virtualenv with chdb-core in $VENV (default /var/cache/backfill/chdb-venv; the wheel and
#     its pandas/pyarrow are ~900 MB installed, so it is kept between runs and reused);
#   - $HOME_DIR (default /var/tmp/backfill-ch-current) holds config.xml (ports), data/ (the
#     server's data: databases and tables survive a restart of the process), server.pid and
#     server.log;
#   - unless 127.0.0.1:8124 already answers `SELECT 1`, it starts, detached (setsid), Python
#     calling chdb's `query` with `SYSTEM START LISTEN HTTP; SYSTEM START LISTEN TCP;` and then
#     a query that never ends (sleepEachRow over system.numbers), and waits (bounded) until the
#     server answers.
# The server lives as long as that never-ending query: a `KILL QUERY` that matches it stops the
# server, so tests must scope every KILL QUERY (e.g. to their own database name).
# Progress goes to stderr; nothing is printed on stdout.
set -euo pipefail

CHDB_CORE_VERSION=${CHDB_CORE_VERSION:-26.9.0}
VENV=${BACKFILL_CHDB_VENV:-/var/cache/backfill/chdb-venv}
HOME_DIR=${BACKFILL_CH_CURRENT_DIR:-/var/tmp/backfill-ch-current}
HTTP_PORT=8124
TCP_PORT=9001
URL=http://127.0.0.1:$HTTP_PORT
LOG=$HOME_DIR/server.log
PIDFILE=$HOME_DIR/server.pid
WAIT_S=60

log() { echo "clickhouse-current: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

answers() { [ "$(curl -s --max-time 5 "$URL/?query=SELECT%201" 2>/dev/null)" = 1 ]; }

# --- 1. Tools: curl, python3 with venv -----------------------------------------------------------
need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3 || true)
[ -n "$PY" ] || need+=(python3)
if [ "${#need[@]}" -gt 0 ]; then
    log "installing ${need[*]} with apt-get"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
    PY=/usr/bin/python3
fi

if answers; then
    log "ClickHouse answers on $URL: $(curl -s "$URL/?query=SELECT%20version()")"
    exit 0
fi

# --- 2. The virtualenv with chdb-core ------------------------------------------------------------
venv_ok() {
    [ -x "$VENV/bin/python" ] \
        && [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("chdb-core"))' 2>/dev/null)" = "$CHDB_CORE_VERSION" ]
}
if venv_ok; then
    log "chdb-core $CHDB_CORE_VERSION is installed in $VENV"
else
    if [ ! -x "$VENV/bin/pip" ]; then
        log "creating the virtualenv $VENV"
        rm -rf "$VENV"
        mkdir -p "$(dirname "$VENV")"
        if ! "$PY" -m venv "$VENV" >/dev/null 2>&1; then
            rm -rf "$VENV"
            log "python3 -m venv failed: installing python3-venv with apt-get"
            apt-get update -qq >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
            "$PY" -m venv "$VENV"
        fi
    fi
    log "installing chdb-core==$CHDB_CORE_VERSION into $VENV (large: ~180 MB of wheels)"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "chdb-core==$CHDB_CORE_VERSION" >&2
    venv_ok || die "chdb-core $CHDB_CORE_VERSION is not importable from $VENV after pip install"
fi

# --- 3. Start the server -------------------------------------------------------------------------
mkdir -p "$HOME_DIR/data"
cat >"$HOME_DIR/config.xml" <<EOF
<clickhouse>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$HTTP_PORT</http_port>
    <tcp_port>$TCP_PORT</tcp_port>
</clickhouse>
EOF

# A previous server process of ours that is alive but does not answer holds the data directory's
# lock: stop it first (only the process recorded in our own pid file, and only if it is chdb).
if [ -s "$PIDFILE" ]; then
    old=$(cat "$PIDFILE")
    if [ -n "$old" ] && grep -q "backfill-ch-current" "/proc/$old/cmdline" 2>/dev/null; then
        log "server process $old does not answer: stopping it"
        kill "$old" 2>/dev/null || true
        kill -CONT "$old" 2>/dev/null || true
        for _ in $(seq 1 20); do
            kill -0 "$old" 2>/dev/null || break
            sleep 0.5
        done
        kill -9 "$old" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
fi

# chdb reads config.xml from its working directory. The argv tag `backfill-ch-current` marks the
# process as ours (see above).
SERVE='
import sys
import chdb._chdb as chdb
chdb.query(
    "SYSTEM START LISTEN HTTP; SYSTEM START LISTEN TCP; "
    "SELECT sleepEachRow(1) FROM system.numbers SETTINGS max_block_size = 1, "
    "function_sleep_max_microseconds_per_block = 0, max_execution_time = 0 FORMAT Null",
    "TabSeparated",
    path=sys.argv[1],
)
print("clickhouse-current: the serving query ended: server stopped", file=sys.stderr)
'
log "starting chdb $CHDB_CORE_VERSION on $URL (data: $HOME_DIR/data, log: $LOG)"
echo "--- $(date -u +%FT%TZ) start" >>"$LOG"
(
    cd "$HOME_DIR"
    setsid "$VENV/bin/python" -c "$SERVE" "$HOME_DIR/data" backfill-ch-current \
        >>"$LOG" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
)
pid=$(cat "$PIDFILE")
for _ in $(seq 1 $((WAIT_S * 2))); do
    if answers; then
        log "ready: ClickHouse $(curl -s "$URL/?query=SELECT%20version()") on $URL (user default), pid $pid"
        exit 0
    fi
    kill -0 "$pid" 2>/dev/null || { tail -n 30 "$LOG" >&2; die "the server process exited (log above: $LOG)"; }
    sleep 0.5
done
tail -n 30 "$LOG" >&2 || true
die "ClickHouse does not answer on $URL after $WAIT_S s (log above: $LOG)"
