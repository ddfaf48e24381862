#!/usr/bin/env bash
# render.sh: the Kubernetes manifests for your image and specs, ready for `kubectl apply -f -`.
#
#   deploy/k8s/render.sh --image IMAGE [options] job|cronjob|indexed-job <spec.yaml | dir>...
#
#   --image IMAGE       the image to run (required), e.g. registry.example.com/backfill:abc123
#   --max-runtime DUR   the engine stops at a batch boundary after this long and exits 75 (default
#                       45m; cronjob 90m); activeDeadlineSeconds is set to DUR + grace + 8 minutes
#   --grace SECONDS     terminationGracePeriodSeconds (default 120): a SIGTERM'd pod finishes its
#                       batch in this time, so it must be longer than one batch of every spec
#                       (2 x statement_timeout: the key select and the statement), checked here
#   --workers N         indexed-job: N pods (parallelism = completions = N), each `run --workers 1`;
#                       every spec must say `workers: N` (checked)
#   --schedule CRON     cronjob: when (default "0 3 * * *"); --time-zone TZ (default America/New_York)
#   --name NAME         the Job or CronJob's name (default backfill, backfill-nightly,
#                       backfill-parallel); the ConfigMap is NAME-jobs (default backfill-jobs)
#
# Prints two documents: a ConfigMap holding the specs (a directory gives its *.yaml, as `backfill
# run DIR` reads it) and the workload, made from job.yaml, cronjob.yaml or indexed-job.yaml beside
# this script with the values above. URLs come from the backfill-db Secret (secret.example.yaml).
# Exit 2 on bad usage or a spec that does not fit (grace too short, workers mismatch).
set -euo pipefail

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
usage() { sed -n '3,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() {
    echo "render: $*" >&2
    exit 2
}

# "1h30m", "500ms", "0" -> milliseconds; fails on anything else.
millis() {
    local rest=$1 total=0 n
    [[ $rest == 0 ]] && echo 0 && return
    [[ $rest =~ ^([0-9]+(ms|s|m|h|d))+$ ]] || return 1
    while [[ $rest =~ ^([0-9]+)(ms|s|m|h|d)(.*)$ ]]; do
        n=$((10#${BASH_REMATCH[1]}))
        case ${BASH_REMATCH[2]} in
        ms) total=$((total + n)) ;;
        s) total=$((total + n * 1000)) ;;
        m) total=$((total + n * 60000)) ;;
        h) total=$((total + n * 3600000)) ;;
        d) total=$((total + n * 86400000)) ;;
        esac
        rest=${BASH_REMATCH[3]}
    done
    echo "$total"
}

image='' max_runtime='' grace=120 workers='' schedule="0 3 * * *" tz=America/New_York name=
positional=()
while (($#)); do
    case $1 in
    --image | --max-runtime | --grace | --workers | --schedule | --time-zone | --name)
        (($# >= 2)) || die "$1 needs a value"
        case $1 in
        --image) image=$2 ;;
        --max-runtime) max_runtime=$2 ;;
        --grace) grace=$2 ;;
        --workers) workers=$2 ;;
        --schedule) schedule=$2 ;;
        --time-zone) tz=$2 ;;
        --name) name=$2 ;;
        esac
        shift 2
        ;;
    -h | --help) usage && exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) positional+=("$1") && shift ;;
    esac
done
((${#positional[@]} >= 2)) || die "expected job|cronjob|indexed-job and at least one spec (see --help)"
kind=${positional[0]}
inputs=("${positional[@]:1}")
case $kind in
job) template=job.yaml default_name=backfill default_max=45m ;;
cronjob) template=cronjob.yaml default_name=backfill-nightly default_max=90m ;;
indexed-job) template=indexed-job.yaml default_name=backfill-parallel default_max=45m ;;
*) die "unknown kind $kind: use job, cronjob or indexed-job" ;;
esac

[[ -n $image ]] || die "--image is required (the image you pushed, e.g. registry.example.com/backfill:abc123)"
[[ $image =~ ^[A-Za-z0-9][A-Za-z0-9._:/@-]*$ ]] || die "--image $image does not look like an image reference"
name=${name:-$default_name}
[[ $name =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ && ${#name} -le 47 ]] ||
    die "--name $name: lower-case letters, digits and '-', at most 47 characters"
configmap=$name-jobs
[[ $name == "$default_name" ]] && configmap=backfill-jobs
max_runtime=${max_runtime:-$default_max}
max_ms=$(millis "$max_runtime") || die "--max-runtime $max_runtime: use units ms, s, m, h, e.g. 45m or 1h30m"
((max_ms >= 1000)) || die "--max-runtime must be at least 1s: the run has to end inside its window"
[[ $grace =~ ^[1-9][0-9]*$ ]] || die "--grace $grace: whole seconds, more than 0"
if [[ $kind == indexed-job ]]; then
    [[ $workers =~ ^[1-9][0-9]*$ ]] || die "indexed-job needs --workers N (N >= 1)"
elif [[ -n $workers ]]; then
    die "--workers is for indexed-job (a Job or CronJob pod runs the spec's workers as threads)"
fi
if [[ $kind == cronjob ]]; then
    [[ $schedule =~ ^[^\"\\]+$ ]] || die "--schedule $schedule"
    [[ $tz =~ ^[A-Za-z0-9_+/-]+$ ]] || die "--time-zone $tz"
fi
# Whole seconds, rounded up, plus the grace period and 8 minutes for start-up and a retry.
deadline=$(((max_ms + 999) / 1000 + grace + 480))

# ---- the specs ----------------------------------------------------------------------------------
files=()
for input in "${inputs[@]}"; do
    if [[ -d $input ]]; then
        found=0
        for f in "$input"/*.yaml "$input"/*.yml; do
            [[ -f $f ]] || continue
            files+=("$f") && found=1
        done
        ((found)) || die "$input: no *.yaml specs in this directory"
    elif [[ -f $input && -r $input ]]; then
        files+=("$input")
    else
        die "cannot read the spec $input"
    fi
done

# One batch's bound and the workers of a spec, from its block-style YAML: "<kind> <ms> <workers>".
spec_facts() {
    awk '
        /^[^[:space:]#]/ { section = $1 }
        /^clickhouse:/ { kind = "clickhouse" }
        /^workers:/ { workers = $2 }
        section == "limits:" && $1 == "statement_timeout:" { st = $2 }
        END { print (kind ? kind : "postgres"), (st ? st : "30s"), (workers ? workers : 1) }
    ' "$1"
}

declare -A keys=()
for f in "${files[@]}"; do
    key=${f##*/}
    [[ $key =~ ^[-._a-zA-Z0-9]+$ ]] || die "$f: a ConfigMap key must be letters, digits, '-', '_', '.'"
    [[ -z ${keys[$key]:-} ]] || die "$f and ${keys[$key]} have the same file name: one ConfigMap key each"
    keys[$key]=$f
    [[ -s $f ]] || die "$f is empty"
    read -r spec_kind st spec_workers < <(spec_facts "$f")
    if [[ $spec_kind == postgres ]]; then
        st_ms=$(millis "$st") || die "$f: statement_timeout $st is not a duration"
        ((st_ms > 0)) ||
            die "$f: statement_timeout 0 leaves a batch unbounded; set one so --grace can cover a batch"
        ((2 * st_ms < grace * 1000)) ||
            die "$f: one batch may take 2 x statement_timeout = $((2 * st_ms / 1000))s, not less than --grace ${grace}s: raise --grace or lower the spec's statement_timeout"
    else
        echo "render: $f is a ClickHouse job: a chunk still running after the ${grace}s grace period is killed and redone by the next run (chunks land whole or not at all)" >&2
    fi
    if [[ $kind == indexed-job && $spec_workers != "$workers" ]]; then
        die "$f says workers: $spec_workers; an Indexed Job of $workers pods needs workers: $workers in every spec"
    fi
done

# ---- output -------------------------------------------------------------------------------------
cat <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: $configmap
  labels:
    app.kubernetes.io/name: backfill
data:
EOF
for f in "${files[@]}"; do
    # Literal block scalars: "|" keeps one final newline, "|-" none, "|+" all of them; the
    # indentation indicator is needed when the first line starts with a space.
    tail_bytes=$(tail -c 2 "$f" | od -An -tx1 | tr -d ' \n')
    case $tail_bytes in
    0a0a) chomp=+ ;;
    *0a) chomp= ;;
    *) chomp=- ;;
    esac
    indicator=
    [[ $(grep -m1 -v '^$' "$f") == [[:space:]]* ]] && indicator=2
    printf '  %s: |%s%s\n' "${f##*/}" "$indicator" "$chomp"
    awk '{ print (length($0) ? "    " $0 : "") }' "$f"
done
echo ---

# The template with comments dropped and the values above put in.
awk -v image="$image" -v max="$max_runtime" -v deadline="$deadline" -v grace="$grace" \
    -v workers="$workers" -v schedule="$schedule" -v tz="$tz" -v name="$name" \
    -v configmap="$configmap" -v default_name="$default_name" '
    function indent(s) { match(s, /^ */); return substr(s, 1, RLENGTH) }
    /^[[:space:]]*#/ { next }
    next_is_max { sub(/- .*/, "- " max); next_is_max = 0 }
    /^  name: / && !named && $2 == default_name { $0 = "  name: " name; named = 1 }
    /^[[:space:]]*- --max-runtime$/ { next_is_max = 1 }
    /^[[:space:]]*image: / { $0 = indent($0) "image: \"" image "\"" }
    /^[[:space:]]*activeDeadlineSeconds: / { $0 = indent($0) "activeDeadlineSeconds: " deadline }
    /^[[:space:]]*terminationGracePeriodSeconds: / { $0 = indent($0) "terminationGracePeriodSeconds: " grace }
    /^[[:space:]]*(parallelism|completions): / && workers != "" { sub(/: .*/, ": " workers) }
    /^  schedule: / { $0 = "  schedule: \"" schedule "\"" }
    /^  timeZone: / { $0 = "  timeZone: " tz }
    /^[[:space:]]*name: backfill-jobs$/ { sub(/backfill-jobs$/, configmap) }
    { print }
' "$here/$template"
