#!/usr/bin/env bash
# remote-run.sh: the host side of run-job.sh. run-job.sh sends this file over SSH as `bash -c`
# with the spec on stdin; it can also be run on the host directly:
#
#   remote-run.sh <ssh-target|""> <container> <image> <spec-file-name> <env-file> <max-runtime> \
#       <deadline-seconds> <stop-timeout-seconds> <network|""> <pull: missing|always|never> \
#       [backfill run args...] < spec.yaml
#
# Refuses (exit 75) while a container of the job exists; otherwise gets the image as the pull
# policy says and runs the spec in a one-shot container bounded by `timeout`. Exits with the
# container's exit code; 125 (as `docker run` does) when the image cannot be had: nothing ran.
set -euo pipefail

if (($# < 10)); then
    echo "remote-run.sh: expected 10 arguments, got $# (see the header of this file)" >&2
    exit 2
fi
target=$1 name=$2 image=$3 file=$4 env_file=$5 max_runtime=$6 deadline=$7 stop_timeout=$8
network=$9 pull=${10}
shift 10

# Never fail on a message: after Ctrl-C or a dropped connection stderr is a broken pipe, and
# the clean-up below must still run.
say() { printf 'run-job: %s\n' "$*" >&2 || true; }
# Commands printed for the operator run on this host: from the operator's machine via ssh.
on_host=${target:+ssh $target }

# 1. One container per job. --all: an exited container that was not removed blocks the name too.
# The name filter is a regular expression: anchor it, and escape the only special character a
# container name can hold.
exact="name=^${name//./\\.}\$"
existing=$(docker ps --all --filter "$exact" --format '{{.Names}} ({{.Status}})' </dev/null)
if [[ -n $existing ]]; then
    cat >&2 <<EOF
run-job: refusing to start: a container of this job already exists on ${HOSTNAME:-the host}:
    $existing
  follow its log:    ${on_host}docker logs -f $name
  inspect it:        ${on_host}docker inspect $name
  stop it at the next batch boundary (progress is saved; it exits 75):
                     ${on_host}docker stop --time $stop_timeout $name
  remove it once it has exited (only needed if it was not started with --rm):
                     ${on_host}docker rm $name
EOF
    exit 75
fi

if [[ ! -r $env_file ]]; then
    say "cannot read the env file $env_file on ${HOSTNAME:-the host}: create it (mode 600) with" \
        "DATABASE_URL=postgres://... or pass --env-file PATH-ON-HOST"
    exit 2
fi

# 2. The spec from stdin, in a private directory removed on exit. It holds no secrets (the URL is
# ${DATABASE_URL}, from the env file), and the container's non-root user must be able to read it.
dir=$(mktemp -d "${TMPDIR:-/tmp}/${name}.XXXXXX")
trap 'rm -rf "$dir"' EXIT
cat >"$dir/$file"
chmod 0755 "$dir"
chmod 0644 "$dir/$file"

# 3. The image. An image built or loaded on the host and never pushed runs with the default
# policy (missing). A failed pull is reported as what it is, before anything starts: exit 125,
# never 1 (which means the job failed).
if id=$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null </dev/null) && [[ $pull != always ]]; then
    say "using $image as found on ${HOSTNAME:-the host} (${id:0:19}; --pull $pull)"
elif [[ $pull == never ]]; then
    say "image $image is not on ${HOSTNAME:-the host} and --pull is never: nothing was started." \
        "Load it there (docker save IMAGE | ${on_host}docker load) or use --pull missing"
    exit 125
else
    say "pulling $image (--pull $pull)"
    if ! docker pull --quiet "$image" </dev/null >/dev/null; then
        say "docker pull $image failed (message above): nothing was started and no job was" \
            "touched. Push the image, log the host in to its registry (docker login), or load it" \
            "on the host (docker save IMAGE | ${on_host}docker load) and use --pull missing or never"
        exit 125
    fi
fi

# 4. The run. The engine stops itself at a batch boundary after --max-runtime (exit 75). timeout
# is the backstop: at max-runtime + margin it sends SIGTERM to the docker client, which passes it
# to the container (the engine stops at the next batch boundary); if the client is still there
# stop-timeout seconds later it is killed, and step 5 stops the container for good.
# --preserve-status: report the container's own exit code (75), not timeout's 124.
args=(run --rm --name "$name"
    --stop-timeout "$stop_timeout"
    --env-file "$env_file"
    --volume "$dir/$file:/jobs/$file:ro"
    --read-only --cap-drop ALL --security-opt no-new-privileges)
if [[ -n $network ]]; then
    args+=(--network "$network")
fi
args+=("$image" run --max-runtime "$max_runtime" "$@" "/jobs/$file")

say "starting $name on ${HOSTNAME:-the host}: $image, max runtime $max_runtime, hard deadline ${deadline}s"
rc=0
timeout --preserve-status --signal=TERM --kill-after="$stop_timeout" "$deadline" \
    docker "${args[@]}" </dev/null || rc=$?

# 5. Never leave the container behind its client: if the client was killed (deadline) or died
# with the SSH session (Ctrl-C, dropped connection), stop the container: SIGTERM, then SIGKILL
# after stop-timeout. A second SIGTERM makes the engine exit at once; the open batch rolls back.
trap '' PIPE
if [[ -n $(docker ps --quiet --filter "$exact" </dev/null) ]]; then
    say "the docker client exited ($rc) but $name is still running: stopping it"
    docker stop --time "$stop_timeout" "$name" >/dev/null </dev/null || true
fi
exit "$rc"
