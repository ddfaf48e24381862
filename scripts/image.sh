#!/usr/bin/env bash
# image.sh: build the production image from ./Dockerfile on a machine with no registry.
#
#   bash scripts/image.sh                 # builds backfill:local (IMAGE=name:tag to change it)
#   eval "$(bash scripts/image.sh)"       # ... and point this shell's docker at the daemon
#   bash scripts/image.sh --stop          # stop the private daemon started here
#
# The build is the plain `docker build` of the Dockerfile that deploy/README.md gives operators
# with a registry. The only difference is where the base images come from: here they cannot be
# pulled, so each FROM image that is not in the daemon yet is made locally and tagged with the
# name the FROM line uses (kept for later builds; REBUILD_BASES=1 makes them again):
#   rust:<version>-bookworm          Debian bookworm (debootstrap --variant=minbase, plus gcc and
#                                    libc6-dev) with this machine's Rust toolchain, which must be
#                                    <version>; laid out like the official image (/usr/local/cargo)
#   gcr.io/distroless/cc-debian12:*  the same rootfs trimmed to what distroless/cc holds: glibc,
#                                    libgcc, libstdc++, libssl, CA certificates, tzdata, netbase,
#                                    /etc/passwd with root, nobody and nonroot (65532); no shell
#
# Docker: uses its own daemon, started here if its socket does not answer (installing docker.io
# with apt-get if dockerd is missing): state under $STATE_DIR (default /var/lib/backfill-docker),
# socket and runtime state under $RUN_DIR (default /run/backfill-docker). It never touches a
# system daemon, its images or the host's firewall: no bridge, no iptables rules, so builds and
# containers use --network host. The daemon keeps running for the tests and later builds.
#
# stdout: `export DOCKER_HOST=...` and `export BACKFILL_IMAGE=...` lines (nothing else);
# progress, timings and the image size go to stderr. Safe to run concurrently (one lock).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-backfill:local}
STATE_DIR=${STATE_DIR:-/var/lib/backfill-docker}
RUN_DIR=${RUN_DIR:-/run/backfill-docker}
SOCK=$RUN_DIR/docker.sock
export DOCKER_HOST=unix://$SOCK

log() { printf 'image: %s\n' "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

answers() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1 </dev/null; }

if [[ ${1:-} == --stop ]]; then
    if [[ -f $RUN_DIR/dockerd.pid ]] && kill "$(cat "$RUN_DIR/dockerd.pid")" 2>/dev/null; then
        log "stopping dockerd $(cat "$RUN_DIR/dockerd.pid")"
        for _ in $(seq 100); do answers || break; sleep 0.2; done
    else
        log "no private dockerd running"
    fi
    exit 0
fi
(($# == 0)) || die "usage: scripts/image.sh [--stop]  (IMAGE=name:tag to name the image)"
[[ $(id -u) == 0 ]] || die "run as root: it starts a Docker daemon and debootstraps base images"

mkdir -p "$STATE_DIR" "$RUN_DIR"
exec 9>"$STATE_DIR/image.lock"
flock 9

# ---- the daemon ---------------------------------------------------------------------------------
start_daemon() {
    if ! command -v dockerd >/dev/null; then
        log "installing docker.io (dockerd, containerd, runc)"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >&2
    fi
    command -v docker >/dev/null || die "no docker client after installing docker.io"
    # A daemon killed without a clean stop (the machine's session ended) leaves its pid file.
    local old
    old=$(cat "$RUN_DIR/dockerd.pid" 2>/dev/null) || true
    if [[ -n $old ]]; then
        if [[ $(cat "/proc/$old/comm" 2>/dev/null) == dockerd ]]; then
            die "dockerd $old is running but does not answer on $DOCKER_HOST (log: $STATE_DIR/dockerd.log)"
        fi
        rm -f "$RUN_DIR/dockerd.pid"
    fi
    log "starting dockerd: $DOCKER_HOST, data $STATE_DIR/data, log $STATE_DIR/dockerd.log"
    # setsid: the daemon outlives this script and is not in its process group (a Ctrl-C or a
    # test harness killing the group does not take it down).
    setsid dockerd \
        --data-root "$STATE_DIR/data" \
        --exec-root "$RUN_DIR/exec" \
        --pidfile "$RUN_DIR/dockerd.pid" \
        --host "$DOCKER_HOST" \
        --bridge none --iptables=false --ip-forward=false --ip-masq=false \
        >>"$STATE_DIR/dockerd.log" 2>&1 </dev/null 9>&- &
    local pid=$!
    for _ in $(seq 150); do
        answers && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    tail -n 20 "$STATE_DIR/dockerd.log" >&2 || true
    die "dockerd did not answer on $DOCKER_HOST (log above: $STATE_DIR/dockerd.log)"
}
answers || start_daemon
log "docker: client $(docker version --format '{{.Client.Version}}' 2>/dev/null), daemon $(docker version --format '{{.Server.Version}}') at $DOCKER_HOST"

# ---- base images --------------------------------------------------------------------------------
# The Debian mirror apt uses (no host is written into this file); debootstrap's own default if
# none is configured.
apt_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        awk '/^URIs:/ { uri = $2 } /^Suites:/ && / bookworm( |$)/ && uri { print uri; exit }
             /^$/ { uri = "" }' "$f"
    done | head -n 1 | grep . && return
    awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true
}

work=
root=
cleanup() { [[ -z $work ]] || rm -rf "$work"; }
trap cleanup EXIT

# Sets $root to a bookworm rootfs in a scratch directory, made once per run.
ensure_rootfs() {
    if [[ -z $work ]]; then
        work=$(mktemp -d "$STATE_DIR/work.XXXXXX")
    fi
    root=$work/rootfs
    if [[ ! -f $root/etc/debian_version ]]; then
        command -v debootstrap >/dev/null || {
            log "installing debootstrap"
            apt-get update -qq >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
        }
        local t0 mirror
        t0=$(now)
        mirror=$(apt_mirror)
        log "debootstrap --variant=minbase bookworm (gcc, libc6-dev, ca-certificates, tzdata)${mirror:+ from $mirror}"
        debootstrap --variant=minbase --include=ca-certificates,tzdata,netbase,gcc,libc6-dev \
            bookworm "$work/rootfs" ${mirror:+"$mirror"} >"$work/debootstrap.log" 2>&1 || {
            tail -n 20 "$work/debootstrap.log" >&2
            die "debootstrap failed"
        }
        log "debootstrap done in $(since "$t0")"
        # Debian's CA bundle, before make_rust adds this machine's own CAs to the rootfs.
        cp "$root/etc/ssl/certs/ca-certificates.crt" "$work/debian-ca-certificates.crt"
    fi
}

import() { # dir name docker-import-args...
    local dir=$1 name=$2
    shift 2
    tar --numeric-owner -C "$dir" -c . | docker import "$@" \
        --message "local stand-in for $name made by scripts/image.sh (no registry here)" - "$name" >/dev/null
    log "imported $name ($(docker image inspect --format '{{.Size}}' "$name" | awk '{ printf "%.0f MB", $1 / 1e6 }'))"
}

# rust:<version>-bookworm: the rootfs plus this machine's toolchain, where the official image
# keeps it (RUSTUP_HOME=/usr/local/rustup, CARGO_HOME=/usr/local/cargo, cargo on PATH).
make_rust() { # name version
    local name=$1 want=$2 have sysroot tc
    have=$(rustc --version 2>/dev/null | awk '{ print $2 }') || true
    [[ -n $have ]] || die "$name: no rustc on this machine to put into the builder image"
    [[ $have == "$want" || $have == "$want".* ]] ||
        die "$name: this machine has rustc $have, the Dockerfile asks for $want: change one of them"
    sysroot=$(rustc --print sysroot)
    ensure_rootfs
    tc=usr/local/rustup/toolchains/$have-x86_64-unknown-linux-gnu
    rm -rf "${root:?}/usr/local/rustup" "$root/usr/local/cargo"
    mkdir -p "$root/$tc" "$root/usr/local/cargo/bin"
    # The compiler and the standard library; not the docs (800 MB) or the sources.
    tar -C "$sysroot" -c --exclude=./share --exclude=./lib/rustlib/src --exclude=./lib/rustlib/rustc-src . |
        tar -C "$root/$tc" -x
    for b in cargo rustc rustdoc; do
        ln -s "/$tc/bin/$b" "$root/usr/local/cargo/bin/$b"
    done
    # The builder fetches crates: it trusts what this machine trusts (a proxy's or a company's
    # CA in /usr/local/share/ca-certificates), as a builder image on an operator's network would.
    local extra=(/usr/local/share/ca-certificates/*.crt)
    if [[ -f ${extra[0]} ]]; then
        log "$name trusts this machine's extra CAs: ${extra[*]##*/}"
        cp "${extra[@]}" "$root/usr/local/share/ca-certificates/"
        chroot "$root" update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates in the rootfs failed"
    fi
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    import "$root" "$name" \
        --change "ENV RUSTUP_HOME=/usr/local/rustup" \
        --change "ENV CARGO_HOME=/usr/local/cargo" \
        --change "ENV RUST_VERSION=$have" \
        --change "ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change "CMD [\"bash\"]"
    # The toolchain stays out of the rootfs the runtime image is cut from.
    rm -rf "${root:?}/usr/local/rustup" "$root/usr/local/cargo"
}

# gcr.io/distroless/cc-debian12: the files of distroless/cc's packages, nothing else (no shell,
# no package manager), with its users and its dpkg status for image scanners.
make_distroless() { # name
    local name=$1 out pkg list p dir
    ensure_rootfs
    out=$work/runtime
    rm -rf "$out"
    mkdir -p "$out"
    for p in bin lib lib64 sbin; do # merged /usr: keep the same top-level links
        [[ -L $root/$p ]] && cp -P "$root/$p" "$out/$p"
    done
    list=$work/runtime.files
    : >"$list"
    local pkgs=(base-files netbase tzdata ca-certificates libc6 libgcc-s1 libstdc++6 libssl3 libgomp1)
    mkdir -p "$out/var/lib/dpkg/status.d"
    for pkg in "${pkgs[@]}"; do
        p=$root/var/lib/dpkg/info/$pkg.list
        [[ -f $p ]] || p=$root/var/lib/dpkg/info/$pkg:amd64.list
        [[ -f $p ]] || die "$name: package $pkg is not in the debootstrap rootfs"
        # Regular files and symlinks (directories come with them), documentation left out,
        # each path with its directory resolved inside the rootfs (merged /usr).
        while IFS= read -r f; do
            case $f in /usr/share/doc/* | /usr/share/man/* | /usr/share/lintian/* | /usr/share/locale/*) continue ;; esac
            if [[ -d $root$f ]] || [[ ! -f $root$f && ! -L $root$f ]]; then continue; fi
            dir=$(readlink -f "$root$(dirname "$f")")
            printf '%s\n' "${dir#"$root"/}/$(basename "$f")" >>"$list"
        done <"$p"
        awk -v pkg="$pkg" 'BEGIN { RS = ""; ORS = "\n\n" } $0 ~ "(^|\n)Package: " pkg "\n" { print }' \
            "$root/var/lib/dpkg/status" >"$out/var/lib/dpkg/status.d/$pkg"
    done
    sort -u "$list" | tar -C "$root" -c --no-recursion -T - | tar -C "$out" -x
    # Made by update-ca-certificates, so in no package's list; Debian's, without local additions.
    mkdir -p "$out/etc/ssl/certs"
    cp "$work/debian-ca-certificates.crt" "$out/etc/ssl/certs/ca-certificates.crt"
    mkdir -p "$out/tmp" "$out/root" "$out/home/nonroot"
    chmod 1777 "$out/tmp"
    chmod 0700 "$out/root"
    chown 65532:65532 "$out/home/nonroot"
    cat >"$out/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
    cat >"$out/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
tty:x:5:
staff:x:50:
nonroot:x:65532:
EOF
    echo 'hosts: files dns' >"$out/etc/nsswitch.conf"
    local user=0 workdir=/root
    [[ $name == *:nonroot* ]] && user=65532 workdir=/home/nonroot
    import "$out" "$name" \
        --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
        --change "USER $user" \
        --change "WORKDIR $workdir"
}

# Is the base image already here, and (for the builder) still the machine's toolchain?
have_base() { # name
    local env
    env=$(docker image inspect --format '{{join .Config.Env " "}}' "$1" 2>/dev/null) || return 1
    [[ ${REBUILD_BASES:-0} != 1 ]] || return 1
    case $1 in
    rust:*) [[ " $env " == *" RUST_VERSION=$(rustc --version 2>/dev/null | awk '{ print $2 }') "* ]] ;;
    esac
}

t_bases=$(now)
stages=()
while read -r from; do
    read -r _ base _ <<<"$from"
    # FROM <an earlier stage>: nothing to make.
    [[ " ${stages[*]} " == *" ${base,,} "* ]] && continue
    stages+=("$(awk '{ print tolower($NF) }' <<<"$from")")
    if have_base "$base"; then
        log "base image $base: already in the daemon"
        continue
    fi
    case $base in
    rust:*-bookworm) v=${base#rust:} && make_rust "$base" "${v%-bookworm}" ;;
    gcr.io/distroless/cc-debian12:*) make_distroless "$base" ;;
    *) die "no local stand-in for the base image $base: load it into this daemon (docker load) or teach scripts/image.sh" ;;
    esac
done < <(grep -iE '^FROM[[:space:]]' Dockerfile)
cleanup
work=
log "base images ready in $(since "$t_bases")"

# ---- the image ----------------------------------------------------------------------------------
t_build=$(now)
log "docker build -t $IMAGE . (the operators' command, plus --network host: no bridge here)"
docker build --network host --force-rm -t "$IMAGE" . >&2
# Keep the builder stage (the compiled dependencies) tagged, then drop what earlier builds left
# behind: every change to src/ leaves an untagged builder image of a few hundred MB.
docker build --network host --target builder -t backfill-builder-cache:latest . >/dev/null
docker image prune --force >/dev/null
size=$(docker image inspect --format '{{.Size}}' "$IMAGE")
log "built $IMAGE in $(since "$t_build"): $(awk -v s="$size" 'BEGIN { printf "%.1f MB", s / 1e6 }') ($size bytes)"

printf 'export DOCKER_HOST=%s\n' "$DOCKER_HOST"
printf 'export BACKFILL_IMAGE=%s\n' "$IMAGE"
