#!/usr/bin/env bash
# services.sh: make sure the local Postgres the tests, demos and benchmarks use is up.
#
# Idempotent and non-interactive; run as root on Debian (12). It:
#   - installs postgresql with apt-get if it is missing, creates/starts the newest cluster;
#   - waits (bounded) until 127.0.0.1:5432 accepts connections;
#   - makes sure user postgres can connect over TCP to 127.0.0.1 without a password (trust);
#   - puts `host all bf_pwtest 127.0.0.1/32 scram-sha-256` at the top of pg_hba.conf and creates
#     role bf_pwtest (password 'right-password'), so a test can check that a wrong password is
#     refused even though everything else on 127.0.0.1 is trust;
#   - turns TLS on with a test CA and a server certificate for 127.0.0.1 and localhost that it
#     generates into /var/lib/postgresql/backfill-test-tls/ (kept while valid; tests trust
#     ca.crt there for sslmode=verify-ca/verify-full).
#   - installs clickhouse-server and clickhouse-client (Debian 12 ships 18.16) if missing and,
#     unless 127.0.0.1:8123 already answers `SELECT 1`, starts the server in the background
#     (log: /var/log/clickhouse-server/backfill-ci.log) and waits (bounded) for it; the tests use
#     its HTTP interface as user default without a password (tests/common/ch.rs).
# Progress goes to stderr; nothing is printed on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

PGHOST_ADDR=127.0.0.1
PGPORT_NUM=5432
PWTEST_ROLE=bf_pwtest
PWTEST_PASSWORD=right-password
PWTEST_RULE="host all ${PWTEST_ROLE} ${PGHOST_ADDR}/32 scram-sha-256"
TRUST_RULE="host all postgres ${PGHOST_ADDR}/32 trust"
TLS_DIR=/var/lib/postgresql/backfill-test-tls   # tests/tls.rs reads $TLS_DIR/ca.crt

log() { echo "services: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# psql as user postgres over TCP, never prompting for a password.
tcp_psql() {
    psql -X -q -A -t -w -v ON_ERROR_STOP=1 -h "$PGHOST_ADDR" -p "$PGPORT_NUM" -U postgres -d postgres "$@"
}
# psql as OS user postgres over the Unix socket (peer auth on a stock Debian install).
local_psql() {
    runuser -u postgres -- psql -X -q -A -t -w -v ON_ERROR_STOP=1 -p "$PGPORT_NUM" -d postgres "$@"
}

# Put a line at the very top of a file, keeping its owner and mode (rewrite in place).
prepend_line() {
    local file=$1 line=$2 tmp
    [ -e "$file.orig" ] || cp -p "$file" "$file.orig"   # one-time backup of the untouched file
    tmp=$(mktemp)
    { printf '%s\n' "$line"; cat "$file"; } >"$tmp"
    cat "$tmp" >"$file"
    rm -f "$tmp"
}

# True if the file has this rule as an active line (whitespace-insensitive).
has_rule() {
    local file=$1 rule=$2
    awk -v want="$rule" '
        BEGIN { n = split(want, w, /[ \t]+/); want = w[1]; for (i = 2; i <= n; i++) want = want " " w[i] }
        { sub(/#.*/, ""); $1 = $1; if ($0 == want) found = 1 }
        END { exit found ? 0 : 1 }' "$file"
}

# --- 1. PostgreSQL installed -------------------------------------------------------------------
if ! command -v pg_lsclusters >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1 \
    || [ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]; then
    log "postgresql is not installed: installing it with apt-get"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql
else
    log "postgresql is installed"
fi

# Newest cluster version (as the brief: the newest directory in /etc/postgresql); if there is
# no cluster at all yet, the newest installed server version.
newest_subdir() { find "$1" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | sort -V | tail -1; }
PGVER=$(newest_subdir /etc/postgresql || true)
[ -n "$PGVER" ] || PGVER=$(newest_subdir /usr/lib/postgresql || true)
[ -n "$PGVER" ] || die "cannot find an installed PostgreSQL version"

if ! pg_lsclusters -h | awk -v v="$PGVER" '$1 == v && $2 == "main" { found = 1 } END { exit !found }'; then
    log "creating cluster $PGVER/main"
    pg_createcluster --port "$PGPORT_NUM" "$PGVER" main >&2
fi

# --- 2. Cluster running ------------------------------------------------------------------------
cluster_status() {
    pg_lsclusters -h | awk -v v="$PGVER" '$1 == v && $2 == "main" { print $4 }'
}
if [ "$(cluster_status)" != "online" ]; then
    log "cluster $PGVER/main is $(cluster_status): starting it"
    if ! pg_ctlcluster --skip-systemctl-redirect "$PGVER" main start >&2; then
        log "pg_ctlcluster refused --skip-systemctl-redirect (or failed): retrying without it"
        pg_ctlcluster "$PGVER" main start >&2
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
[ "$ready" = 1 ] || die "postgres on $PGHOST_ADDR:$PGPORT_NUM not ready after 60 s"

# --- 3. Where pg_hba.conf is -------------------------------------------------------------------
HBA_FILE=$(tcp_psql -c 'SHOW hba_file' 2>/dev/null || local_psql -c 'SHOW hba_file' 2>/dev/null || true)
[ -n "$HBA_FILE" ] || HBA_FILE=/etc/postgresql/$PGVER/main/pg_hba.conf
[ -f "$HBA_FILE" ] || die "pg_hba.conf not found at $HBA_FILE"
log "pg_hba.conf is $HBA_FILE"

reload_conf() {
    if ! tcp_psql -c 'SELECT pg_reload_conf()' >/dev/null 2>&1; then
        local_psql -c 'SELECT pg_reload_conf()' >/dev/null 2>&1 \
            || pg_ctlcluster "$PGVER" main reload >&2
    fi
}

# --- 4. Trust for user postgres over TCP -------------------------------------------------------
if tcp_psql -c 'SELECT 1' >/dev/null 2>&1; then
    log "user postgres can connect to $PGHOST_ADDR:$PGPORT_NUM without a password"
else
    log "user postgres needs a password on $PGHOST_ADDR: adding '$TRUST_RULE' to the top of pg_hba.conf"
    has_rule "$HBA_FILE" "$TRUST_RULE" || prepend_line "$HBA_FILE" "$TRUST_RULE"
    reload_conf
    tcp_psql -c 'SELECT 1' >/dev/null || die "user postgres still cannot connect over TCP without a password"
fi

# --- 5. Password-checked rule for bf_pwtest, first in the file ---------------------------------
if has_rule "$HBA_FILE" "$PWTEST_RULE"; then
    log "pg_hba.conf already has '$PWTEST_RULE'"
else
    log "adding '$PWTEST_RULE' to the top of pg_hba.conf"
    prepend_line "$HBA_FILE" "$PWTEST_RULE"
fi
tcp_psql -c 'SELECT pg_reload_conf()' >/dev/null

hba_errors=$(tcp_psql -c "SELECT line_number || ': ' || error FROM pg_hba_file_rules WHERE error IS NOT NULL")
[ -z "$hba_errors" ] || die "pg_hba.conf has errors (the server keeps its previous rules):
$hba_errors"
# Verify the server loaded it, and that no earlier host rule would match bf_pwtest first.
first_rule=$(tcp_psql -c "
    SELECT auth_method || ' ' || array_to_string(user_name, ',') || ' ' || coalesce(error, 'ok')
      FROM pg_hba_file_rules
     WHERE type IN ('host', 'hostssl', 'hostnossl')
       AND user_name && ARRAY['all', '${PWTEST_ROLE}']
     ORDER BY line_number
     LIMIT 1")
[ "$first_rule" = "scram-sha-256 ${PWTEST_ROLE} ok" ] \
    || die "first host rule for ${PWTEST_ROLE} in pg_hba_file_rules is '$first_rule', want 'scram-sha-256 ${PWTEST_ROLE} ok'"
log "pg_hba_file_rules: '$PWTEST_RULE' is loaded and comes first"

# --- 6. Role bf_pwtest -------------------------------------------------------------------------
if [ "$(tcp_psql -c "SELECT 1 FROM pg_roles WHERE rolname = '${PWTEST_ROLE}'")" = 1 ]; then
    log "role ${PWTEST_ROLE} exists"
else
    log "creating role ${PWTEST_ROLE}"
    tcp_psql -c "SET password_encryption = 'scram-sha-256'" \
        -c "CREATE ROLE ${PWTEST_ROLE} LOGIN PASSWORD '${PWTEST_PASSWORD}'"
fi

# Check the behaviour the tests rely on: right password accepted, wrong password refused.
if ! PGPASSWORD=$PWTEST_PASSWORD psql -X -q -A -t -w -h "$PGHOST_ADDR" -p "$PGPORT_NUM" \
    -U "$PWTEST_ROLE" -d postgres -c 'SELECT 1' >/dev/null 2>&1; then
    die "${PWTEST_ROLE} cannot log in with its password (role changed by hand? ALTER ROLE ${PWTEST_ROLE} LOGIN PASSWORD '${PWTEST_PASSWORD}')"
fi
if PGPASSWORD=wrong-password psql -X -q -A -t -w -h "$PGHOST_ADDR" -p "$PGPORT_NUM" \
    -U "$PWTEST_ROLE" -d postgres -c 'SELECT 1' >/dev/null 2>&1; then
    die "${PWTEST_ROLE} logged in with a wrong password"
fi
log "${PWTEST_ROLE}: right password accepted, wrong password refused"

# --- 7. TLS with a test CA ---------------------------------------------------------------------
# True if the server certificate chains to our CA, names 127.0.0.1 and localhost, and is valid
# for at least another week.
tls_files_ok() {
    [ -s "$TLS_DIR/ca.crt" ] && [ -s "$TLS_DIR/server.crt" ] && [ -s "$TLS_DIR/server.key" ] \
        && openssl verify -CAfile "$TLS_DIR/ca.crt" "$TLS_DIR/server.crt" >/dev/null 2>&1 \
        && openssl x509 -in "$TLS_DIR/server.crt" -noout -checkend 604800 >/dev/null 2>&1 \
        && openssl x509 -in "$TLS_DIR/server.crt" -noout -ext subjectAltName 2>/dev/null \
            | grep -q 'IP Address:127.0.0.1' \
        && openssl x509 -in "$TLS_DIR/server.crt" -noout -ext subjectAltName 2>/dev/null \
            | grep -q 'DNS:localhost'
}

# A new CA (its key is thrown away after signing) and a server key and certificate signed by it.
make_tls_files() {
    local tmp
    tmp=$(mktemp -d)
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
        -days 3650 -subj "/CN=backfill test CA" -keyout "$tmp/ca.key" -out "$tmp/ca.crt" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
        -subj "/CN=127.0.0.1" -keyout "$tmp/server.key" -out "$tmp/server.csr" 2>/dev/null
    printf '%s\n' "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=serverAuth" \
        "subjectAltName=IP:127.0.0.1,DNS:localhost" >"$tmp/server.ext"
    openssl x509 -req -sha256 -days 3650 -in "$tmp/server.csr" -CA "$tmp/ca.crt" \
        -CAkey "$tmp/ca.key" -CAcreateserial -extfile "$tmp/server.ext" -out "$tmp/server.crt" 2>/dev/null
    install -d -m 0755 -o postgres -g postgres "$TLS_DIR"
    install -m 0644 -o postgres -g postgres "$tmp/ca.crt" "$TLS_DIR/ca.crt"
    install -m 0644 -o postgres -g postgres "$tmp/server.crt" "$TLS_DIR/server.crt"
    install -m 0600 -o postgres -g postgres "$tmp/server.key" "$TLS_DIR/server.key"
    rm -rf "$tmp"
}

if ! command -v openssl >/dev/null 2>&1; then
    log "openssl is not installed: installing it with apt-get"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y openssl
fi
tls_reload=0
if tls_files_ok; then
    log "test TLS certificate in $TLS_DIR is valid"
else
    log "generating a test CA and server certificate (127.0.0.1, localhost) in $TLS_DIR"
    make_tls_files
    tls_files_ok || die "the generated certificate in $TLS_DIR does not verify against its CA"
    tls_reload=1
fi
for setting in "ssl=on" "ssl_cert_file=$TLS_DIR/server.crt" "ssl_key_file=$TLS_DIR/server.key"; do
    name=${setting%%=*}
    want=${setting#*=}
    if [ "$(tcp_psql -c "SHOW $name")" != "$want" ]; then
        log "ALTER SYSTEM SET $name = '$want'"
        tcp_psql -c "ALTER SYSTEM SET $name = '$want'"
        tls_reload=1
    fi
done
if [ "$tls_reload" = 1 ]; then
    tcp_psql -c 'SELECT pg_reload_conf()' >/dev/null
    sleep 1   # the postmaster re-reads its configuration asynchronously
fi
# The check tests rely on, with libpq itself: TLS on, certificate signed by our CA, for 127.0.0.1.
tls_ok=0
for _ in $(seq 1 10); do
    if [ "$(psql -X -q -A -t -w -v ON_ERROR_STOP=1 \
        "host=$PGHOST_ADDR port=$PGPORT_NUM user=postgres dbname=postgres sslmode=verify-full sslrootcert=$TLS_DIR/ca.crt" \
        -c 'SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()' 2>/dev/null)" = t ]; then
        tls_ok=1
        break
    fi
    sleep 1
done
[ "$tls_ok" = 1 ] || die "postgres does not serve the test certificate over TLS (sslmode=verify-full with $TLS_DIR/ca.crt fails); see the server log"
log "TLS: on, with the certificate in $TLS_DIR (CA: $TLS_DIR/ca.crt)"
log "ready: postgres://postgres@${PGHOST_ADDR}:${PGPORT_NUM}/postgres"

# --- 8. ClickHouse -----------------------------------------------------------------------------
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
    (cd / && setsid "${run_as[@]}" clickhouse-server --config-file="$CH_CONFIG" \
        >"$CH_LOG" 2>&1 </dev/null &)
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
