#!/usr/bin/env bash
# run-job.sh: run one backfill job as a one-shot Docker container on a host over SSH.
#
#   deploy/ssh/run-job.sh [options] <user@host> <image:tag> <spec.yaml> [-- <backfill run args>]
#
#   --env-file PATH     env file on the host with DATABASE_URL=... (default /etc/backfill/backfill.env)
#   --max-runtime DUR   the engine stops at a batch boundary after this long and exits 75; run again
#                       to resume (default 45m; units h, m, s: 90s, 45m, 1h30m)
#   --network NAME      docker network of the container (e.g. host when the database is on the host)
#   --pull POLICY       missing (default): use the host's copy of the image, pull only if it has none;
#                       always: pull first (a moving tag); never: the image must be on the host
#                       (built or `docker load`ed there, never pushed). A failed pull runs nothing and
#                       exits 125: it is not a job failure.
#   -- ARGS             passed to `backfill run`, e.g. -- --pushgateway http://pgw:9091/metrics/job/backfill
#
# The spec is copied to the host and mounted read-only; the container is named backfill-<file stem>
# and refuses to start twice. The log is also written to $LOG_DIR/<file stem>-<UTC time>.log.
# Environment: SSH (default "ssh"; e.g. "ssh -p 2222"), LOG_DIR (default logs), STOP_TIMEOUT
# (seconds to finish a batch after SIGTERM, default 120), DEADLINE_MARGIN (seconds after
# --max-runtime before the hard deadline, default 300).
#
# Exit code: the engine's: 0 done; 1 failed; 2 bad spec; 75 stopped early with progress saved (run
# again to resume). Also 75 when a container of this job already exists on the host; 2 bad usage;
# 125 docker could not get the image or start the container (nothing ran); 137 killed after
# ignoring SIGTERM; 255 ssh failed.
set -euo pipefail

usage() { sed -n '3,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
bad_usage() {
    echo "run-job: $*" >&2
    echo "usage: run-job.sh [--env-file PATH] [--max-runtime 45m] [--network NAME] [--pull missing|always|never] <user@host> <image:tag> <spec.yaml> [-- ARGS]" >&2
    exit 2
}

# "1h30m" -> 5400; fails on anything else.
seconds() {
    local rest=$1 total=0 n
    [[ $rest =~ ^([0-9]+[hms])+$ ]] || return 1
    while [[ $rest =~ ^([0-9]+)([hms])(.*)$ ]]; do
        n=$((10#${BASH_REMATCH[1]}))
        case ${BASH_REMATCH[2]} in
        h) total=$((total + n * 3600)) ;;
        m) total=$((total + n * 60)) ;;
        s) total=$((total + n)) ;;
        esac
        rest=${BASH_REMATCH[3]}
    done
    echo "$total"
}

# Quote for the remote login shell (POSIX sh rules: works for sh, dash, bash, zsh).
quote() {
    local s out=""
    for s in "$@"; do
        out+="'${s//"'"/"'\\''"}' "
    done
    printf '%s' "$out"
}

env_file=/etc/backfill/backfill.env
max_runtime=45m
network=
pull=missing
positional=()
extra=()
while (($#)); do
    case $1 in
    --env-file | --max-runtime | --network | --pull)
        (($# >= 2)) || bad_usage "$1 needs a value"
        case $1 in
        --env-file) env_file=$2 ;;
        --max-runtime) max_runtime=$2 ;;
        --network) network=$2 ;;
        --pull) pull=$2 ;;
        esac
        shift 2
        ;;
    --env-file=*) env_file=${1#*=} && shift ;;
    --max-runtime=*) max_runtime=${1#*=} && shift ;;
    --network=*) network=${1#*=} && shift ;;
    --pull=*) pull=${1#*=} && shift ;;
    -h | --help) usage && exit 0 ;;
    --) shift && extra=("$@") && break ;;
    -*) bad_usage "unknown option $1" ;;
    *) positional+=("$1") && shift ;;
    esac
done
((${#positional[@]} == 3)) || bad_usage "expected <user@host> <image:tag> <spec.yaml>, got ${#positional[@]} arguments"
host=${positional[0]} image=${positional[1]} spec=${positional[2]}

[[ -f $spec && -r $spec ]] || bad_usage "cannot read the spec $spec"
file=$(basename -- "$spec")
# The file name becomes the container name and, without `name:` in the spec, the job's name.
[[ $file =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*\.ya?ml$ ]] ||
    bad_usage "spec file name $file: use letters, digits, '_', '.', '-' and end in .yaml"
job=${file%.*}
name=backfill-$job
[[ -n $env_file ]] || bad_usage "--env-file is empty"
[[ $pull =~ ^(missing|always|never)$ ]] || bad_usage "--pull $pull: use missing, always or never"
max_seconds=$(seconds "$max_runtime") || bad_usage "--max-runtime $max_runtime: use h, m, s units, e.g. 45m or 1h30m"
((max_seconds > 0)) || bad_usage "--max-runtime must be more than 0: the run has to end inside its window"
stop_timeout=${STOP_TIMEOUT:-120}
margin=${DEADLINE_MARGIN:-300}
[[ $stop_timeout =~ ^[0-9]+$ && $margin =~ ^[0-9]+$ ]] || bad_usage "STOP_TIMEOUT and DEADLINE_MARGIN are whole seconds"
deadline=$((max_seconds + margin))

read -r -a ssh <<<"${SSH:-ssh}"
((${#ssh[@]})) || ssh=(ssh)

log_dir=${LOG_DIR:-logs}
mkdir -p -- "$log_dir"
log=$log_dir/$job-$(date -u +%Y%m%dT%H%M%SZ).log
say() { printf 'run-job: %s\n' "$*" | tee -a "$log" >&2; }

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
remote_script=$(<"$here/remote-run.sh")
remote_cmd="bash -c $(quote "$remote_script") remote-run.sh $(quote "$host" "$name" "$image" "$file" \
    "$env_file" "$max_runtime" "$deadline" "$stop_timeout" "$network" "$pull" "${extra[@]}")"

say "$spec -> $host: container $name, image $image (pull: $pull), env file $env_file, max runtime $max_runtime; log $log"
rc=0
"${ssh[@]}" "$host" "$remote_cmd" <"$spec" 2>&1 | tee -a "$log" || rc=$?

case $rc in
0) meaning="done" ;;
1) meaning="failed: read the error above, fix it, run again (it resumes at the checkpoint)" ;;
2) meaning="bad spec or usage: nothing was touched" ;;
75) meaning="stopped early with progress saved (or the job is already running): run again later to resume" ;;
125) meaning="docker could not get the image or start the container: nothing ran, no job was touched" ;;
137) meaning="killed after ignoring SIGTERM: progress up to the last committed batch is saved" ;;
255) meaning="ssh failed (or the connection dropped: check for the container on the host)" ;;
*) meaning="unexpected" ;;
esac
say "exit $rc: $meaning"
exit "$rc"
