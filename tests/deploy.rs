//! Deployment artifacts: the SSH one-shot script (shellcheck, and its arguments and exit codes
//! against stub `ssh` and `docker` commands; tests/ssh.rs runs it for real), the Kubernetes
//! manifests (schema validation, consistency with the image and with each other, and
//! deploy/k8s/render.sh rendering them for a user's image and specs), the Dockerfile (hadolint),
//! and the engine reading specs from a ConfigMap mount. Needs no database and no Docker engine.
//!
//! The linters come from `.ci/run` (a venv in target/ci-tools) or from PATH; a missing linter
//! fails its test (run .ci/run once to install them).

use serde_json::Value;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const SPEC: &str = "jobs/0001_flowsheet-dj-name.yaml";
const CONTAINER: &str = "backfill-0001_flowsheet-dj-name";
const SSH_TARGET: &str = "deploy@db1.example";
const IMAGE: &str = "registry.example.com/backfill:1.2.3";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A linter from target/ci-tools/bin (installed by .ci/run) or PATH; missing is a failure.
fn tool(name: &str) -> PathBuf {
    let ci_tools = root().join("target/ci-tools/bin").join(name);
    let found = if ci_tools.is_file() {
        Some(ci_tools)
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
    };
    found.unwrap_or_else(|| {
        panic!("{name} not found in target/ci-tools/bin or PATH: run `bash .ci/run` once (it installs it)")
    })
}

fn yaml(path: &str) -> Value {
    let body = fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_saphyr::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn write_exec(path: &Path, body: &str) {
    fs::write(path, body).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

// ---- deploy/ssh/run-job.sh --------------------------------------------------------------------

/// Stands in for ssh: drops options, records the target, and runs the command string with a
/// POSIX shell here, the way sshd hands it to the remote login shell.
const STUB_SSH: &str = r#"#!/bin/sh
while [ $# -gt 0 ]; do case $1 in -[opliF]) shift 2 ;; -*) shift ;; *) break ;; esac; done
printf '%s\n' "$1" >> "$STUB_DIR/ssh-targets"
shift
exec sh -c "$*"
"#;

/// Stands in for docker: one line per call in $STUB_DIR/docker-calls, arguments separated by
/// tabs. `ps` prints $STUB_PS (or $STUB_PS_AFTER_RUN once `run` was called); `run` prints the
/// mounted spec and a few lines, then behaves as $STUB_RUN says.
const STUB_DOCKER: &str = r#"#!/usr/bin/env bash
(IFS=$'\t'; printf '%s\n' "$*") >> "$STUB_DIR/docker-calls"
case $1 in
ps)
    if [ -n "${STUB_PS:-}" ]; then
        printf '%s\n' "$STUB_PS"
    elif [ -n "${STUB_PS_AFTER_RUN:-}" ] && grep -q '^run' "$STUB_DIR/docker-calls"; then
        printf '%s\n' "$STUB_PS_AFTER_RUN"
    fi
    ;;
image)
    # image inspect --format {{.Id}} IMAGE
    if [ -n "${STUB_IMAGE_ID:-}" ]; then echo "$STUB_IMAGE_ID"; else echo "Error: No such image: $4" >&2; exit 1; fi
    ;;
pull)
    [ "${STUB_PULL_EXIT:-0}" = 0 ] || { echo "Error response from daemon: pull access denied" >&2; exit "$STUB_PULL_EXIT"; }
    echo "sha256:0123456789abcdef" ;;
run)
    for a in "$@"; do
        case $a in *:/jobs/*:ro) echo "stub: mounted spec follows"; cat "${a%%:*}" ;; esac
    done
    echo "stub: container stdout"
    echo "stub: container stderr" >&2
    case ${STUB_RUN:-exit} in
    exit) exit "${STUB_RUN_EXIT:-0}" ;;
    stops-on-sigterm)
        trap 'kill "$!"; echo "stub: SIGTERM, stopping after the current batch"; exit 75' TERM
        sleep 30 & wait
        exit 0 ;;
    ignores-sigterm)
        trap 'echo "stub: SIGTERM ignored"' TERM
        for _ in $(seq 100); do sleep 0.2; done
        exit 0 ;;
    esac
    ;;
stop) ;;
*) echo "stub docker: unexpected command $1" >&2; exit 99 ;;
esac
"#;

struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("bin")).unwrap();
        fs::create_dir(dir.path().join("remote-tmp")).unwrap();
        write_exec(&dir.path().join("bin/ssh"), STUB_SSH);
        write_exec(&dir.path().join("bin/docker"), STUB_DOCKER);
        fs::write(
            dir.path().join("db.env"),
            "DATABASE_URL=postgres://u:p@db/app\n",
        )
        .unwrap();
        Host { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn env_file(&self) -> String {
        self.path("db.env").display().to_string()
    }

    /// Run deploy/ssh/run-job.sh with the stubs; `env` adds STUB_* and other variables.
    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let path = format!(
            "{}:{}",
            self.path("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("bash");
        cmd.arg("deploy/ssh/run-job.sh")
            .args(args)
            .current_dir(root())
            .env("PATH", path)
            .env("SSH", self.path("bin/ssh"))
            .env("STUB_DIR", self.dir.path())
            .env("LOG_DIR", self.path("logs"))
            .env("TMPDIR", self.path("remote-tmp"));
        for var in [
            "STOP_TIMEOUT",
            "DEADLINE_MARGIN",
            "STUB_PS",
            "STUB_PS_AFTER_RUN",
            "STUB_RUN",
            "STUB_IMAGE_ID",
            "STUB_PULL_EXIT",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().copied());
        cmd.output().expect("run bash")
    }

    /// The recorded docker calls, each as its argument list.
    fn docker_calls(&self) -> Vec<Vec<String>> {
        fs::read_to_string(self.path("docker-calls"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.split('\t').map(str::to_string).collect())
            .collect()
    }

    fn docker_call(&self, command: &str) -> Option<Vec<String>> {
        self.docker_calls().into_iter().find(|c| c[0] == command)
    }

    fn logs(&self) -> Vec<PathBuf> {
        match fs::read_dir(self.path("logs")) {
            Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
            Err(_) => vec![],
        }
    }

    fn remote_leftovers(&self) -> Vec<PathBuf> {
        fs::read_dir(self.path("remote-tmp"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }
}

/// The value following `flag` in `args`.
fn after<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).map(String::as_str)
}

#[test]
fn deploy_scripts_pass_shellcheck() {
    let shellcheck = tool("shellcheck");
    let mut scripts: Vec<PathBuf> = ["deploy/ssh", "deploy/k8s"]
        .iter()
        .flat_map(|d| fs::read_dir(root().join(d)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .collect();
    assert!(scripts.len() >= 3, "deploy scripts: {scripts:?}");
    scripts.push(root().join("scripts/image.sh"));
    let out = Command::new(shellcheck).args(&scripts).output().unwrap();
    assert!(out.status.success(), "shellcheck:\n{}", text(&out));
}

#[test]
fn ssh_refuses_while_a_container_of_the_job_exists() {
    let host = Host::new();
    let out = host.run(
        &[SSH_TARGET, IMAGE, SPEC, "--env-file", &host.env_file()],
        &[("STUB_PS", &format!("{CONTAINER} (Up 12 minutes)"))],
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(75), "{all}");
    assert!(all.contains("refusing to start"), "{all}");
    assert!(
        all.contains(&format!("{CONTAINER} (Up 12 minutes)")),
        "{all}"
    );
    for how in [
        format!("ssh {SSH_TARGET} docker logs -f {CONTAINER}"),
        format!("ssh {SSH_TARGET} docker inspect {CONTAINER}"),
        format!("ssh {SSH_TARGET} docker stop --time 120 {CONTAINER}"),
        format!("ssh {SSH_TARGET} docker rm {CONTAINER}"),
    ] {
        assert!(all.contains(&how), "missing `{how}` in:\n{all}");
    }
    let ps = host.docker_call("ps").expect("docker ps was called");
    assert_eq!(
        after(&ps, "--filter"),
        Some(format!("name=^{CONTAINER}$").as_str())
    );
    assert!(host.docker_call("run").is_none(), "docker run was called");
    assert!(host.docker_call("pull").is_none(), "docker pull was called");
    assert!(host.remote_leftovers().is_empty());
}

#[test]
fn ssh_run_propagates_exit_75_tees_the_log_and_runs_a_locked_down_one_shot_container() {
    let host = Host::new();
    let pushgateway = "http://pgw:9091/metrics/job/it's a test";
    let out = host.run(
        &[
            SSH_TARGET,
            IMAGE,
            SPEC,
            "--env-file",
            &host.env_file(),
            "--max-runtime",
            "45m",
            "--",
            "--pushgateway",
            pushgateway,
        ],
        &[("STUB_RUN_EXIT", "75")],
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(75), "{all}");
    assert!(all.contains("exit 75"), "{all}");

    // The log file, named after the job, holds the container's stdout and stderr.
    let logs = host.logs();
    assert_eq!(logs.len(), 1, "{logs:?}");
    let name = logs[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(
        name.starts_with("0001_flowsheet-dj-name-") && name.ends_with(".log"),
        "{name}"
    );
    let log = fs::read_to_string(&logs[0]).unwrap();
    for line in [
        "stub: container stdout",
        "stub: container stderr",
        "exit 75",
    ] {
        assert!(log.contains(line), "log lacks {line:?}:\n{log}");
    }
    // The spec reached the host intact.
    let spec = fs::read_to_string(root().join(SPEC)).unwrap();
    assert!(log.contains(&spec), "log lacks the mounted spec:\n{log}");

    assert_eq!(
        fs::read_to_string(host.path("ssh-targets")).unwrap().trim(),
        SSH_TARGET
    );
    let calls = host.docker_calls();
    let order: Vec<&str> = calls.iter().map(|c| c[0].as_str()).collect();
    // Not on the host (default --pull missing): looked up, then pulled.
    assert_eq!(order, ["ps", "image", "pull", "run", "ps"], "{calls:?}");
    assert!(calls[2].contains(&IMAGE.to_string()), "{:?}", calls[2]);

    let run = &calls[3];
    assert!(run.contains(&"--rm".to_string()), "{run:?}");
    assert_eq!(after(run, "--name"), Some(CONTAINER), "{run:?}");
    assert_eq!(after(run, "--stop-timeout"), Some("120"), "{run:?}");
    assert_eq!(
        after(run, "--env-file"),
        Some(host.env_file().as_str()),
        "{run:?}"
    );
    let mount = after(run, "--volume").expect("a --volume");
    assert!(
        mount.ends_with(":/jobs/0001_flowsheet-dj-name.yaml:ro"),
        "{mount}"
    );
    assert!(run.contains(&"--read-only".to_string()), "{run:?}");
    // After the image: the engine's arguments, ours verbatim (quotes and spaces included).
    let image_at = run.iter().position(|a| a == IMAGE).expect("image");
    assert_eq!(
        &run[image_at + 1..],
        [
            "run",
            "--max-runtime",
            "45m",
            "--pushgateway",
            pushgateway,
            "/jobs/0001_flowsheet-dj-name.yaml"
        ],
        "{run:?}"
    );
    // The uploaded spec is removed from the host afterwards.
    assert!(
        host.remote_leftovers().is_empty(),
        "{:?}",
        host.remote_leftovers()
    );
}

#[test]
fn ssh_run_exit_0_and_1_are_passed_through() {
    for code in ["0", "1"] {
        let host = Host::new();
        let out = host.run(
            &[SSH_TARGET, IMAGE, SPEC, "--env-file", &host.env_file()],
            &[("STUB_RUN_EXIT", code)],
        );
        assert_eq!(
            out.status.code(),
            Some(code.parse().unwrap()),
            "{}",
            text(&out)
        );
    }
}

#[test]
fn ssh_deadline_sends_sigterm_and_the_engine_exit_code_survives() {
    // max-runtime 1s + margin 1s: `timeout` sends SIGTERM at 2s; the stub stops like the engine.
    let host = Host::new();
    let started = Instant::now();
    let out = host.run(
        &[
            SSH_TARGET,
            IMAGE,
            SPEC,
            "--env-file",
            &host.env_file(),
            "--max-runtime",
            "1s",
        ],
        &[("STUB_RUN", "stops-on-sigterm"), ("DEADLINE_MARGIN", "1")],
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(75), "{all}");
    assert!(all.contains("stub: SIGTERM, stopping"), "{all}");
    assert!(started.elapsed() < Duration::from_secs(20), "{all}");
    assert!(
        host.docker_call("stop").is_none(),
        "{:?}",
        host.docker_calls()
    );
}

#[test]
fn ssh_hard_deadline_kills_the_client_and_stops_the_container() {
    // Ignores SIGTERM: killed 1s (STOP_TIMEOUT) after the deadline, then `docker stop`.
    let host = Host::new();
    let out = host.run(
        &[
            SSH_TARGET,
            IMAGE,
            SPEC,
            "--env-file",
            &host.env_file(),
            "--max-runtime",
            "1s",
        ],
        &[
            ("STUB_RUN", "ignores-sigterm"),
            ("STUB_PS_AFTER_RUN", "0123456789ab"),
            ("DEADLINE_MARGIN", "0"),
            ("STOP_TIMEOUT", "1"),
        ],
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(137), "{all}");
    let stop = host
        .docker_call("stop")
        .expect("docker stop after the kill");
    assert_eq!(stop, ["stop", "--time", "1", CONTAINER]);
}

#[test]
fn ssh_usage_errors_exit_2_before_starting_anything() {
    let host = Host::new();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![SSH_TARGET, IMAGE], "expected <user@host>"),
        (
            vec![SSH_TARGET, IMAGE, SPEC, "--max-runtime", "45 minutes"],
            "--max-runtime",
        ),
        (
            vec![SSH_TARGET, IMAGE, SPEC, "--max-runtime", "0s"],
            "more than 0",
        ),
        (
            vec![SSH_TARGET, IMAGE, "jobs/nope.yaml"],
            "cannot read the spec",
        ),
        (vec![SSH_TARGET, IMAGE, SPEC, "--bogus"], "unknown option"),
        (
            vec![SSH_TARGET, IMAGE, SPEC, "--pull", "sometimes"],
            "use missing, always or never",
        ),
        // Checked on the host, before anything is pulled or run.
        (
            vec![SSH_TARGET, IMAGE, SPEC, "--env-file", "/nonexistent/db.env"],
            "cannot read the env file /nonexistent/db.env",
        ),
    ];
    for (args, message) in cases {
        let out = host.run(&args, &[]);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {all}");
        assert!(
            all.contains(message),
            "{args:?}: expected {message:?} in {all}"
        );
    }
    assert!(
        host.docker_call("run").is_none(),
        "{:?}",
        host.docker_calls()
    );
    assert!(
        host.docker_call("pull").is_none(),
        "{:?}",
        host.docker_calls()
    );
}

// ---- deploy/k8s, Dockerfile --------------------------------------------------------------------

/// kubernetes-validate, strict, against the oldest (1.29) and newest supported API schemas.
fn validate_manifests(manifests: &[PathBuf]) {
    let validator = tool("kubernetes-validate");
    for version in ["1.29.0", "1.37.0"] {
        let out = Command::new(&validator)
            .args(["--strict", "--quiet", "--kubernetes-version", version])
            .args(manifests)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "Kubernetes {version}:\n{}",
            text(&out)
        );
    }
}

#[test]
fn k8s_manifests_validate_against_the_api_schemas() {
    let manifests: Vec<PathBuf> = fs::read_dir(root().join("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert_eq!(manifests.len(), 5, "{manifests:?}");
    validate_manifests(&manifests);
}

#[test]
fn dockerfile_passes_hadolint() {
    let hadolint = tool("hadolint");
    let out = Command::new(hadolint)
        .arg(root().join("Dockerfile"))
        .output()
        .unwrap();
    assert!(out.status.success(), "hadolint:\n{}", text(&out));
}

fn seconds(duration: &str) -> u64 {
    let (n, unit) = duration.split_at(duration.len() - 1);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("duration {duration}"));
    match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => panic!("duration {duration}"),
    }
}

/// The Job spec of a Job (`spec`) or a CronJob (`spec.jobTemplate.spec`).
fn job_spec(manifest: &Value) -> &Value {
    match manifest["kind"].as_str() {
        Some("Job") => &manifest["spec"],
        Some("CronJob") => &manifest["spec"]["jobTemplate"]["spec"],
        other => panic!("not a Job or CronJob: {other:?}"),
    }
}

/// The numeric uid the Dockerfile runs as.
fn image_uid() -> u64 {
    let dockerfile = fs::read_to_string(root().join("Dockerfile")).unwrap();
    let user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER in Dockerfile");
    user.split(':')
        .next()
        .unwrap()
        .parse()
        .expect("numeric USER")
}

/// The container's args.
fn args_of(manifest: &Value) -> Vec<String> {
    job_spec(manifest)["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// The value after `flag` in the container's args.
fn arg_after(manifest: &Value, flag: &str) -> Option<String> {
    let args = args_of(manifest);
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).cloned()
}

/// What every workload (Job, CronJob, Indexed Job; checked in or rendered) must get right: the
/// engine stops itself (`--max-runtime`) before the deadline, with a grace period for the open
/// batch; non-root as the image; a read-only root; the URLs from the Secret; a bad spec fails at
/// once. Returns the pod spec and failure policy with the per-workload values blanked out, so
/// the workloads can be compared with each other.
fn check_workload(what: &str, manifest: &Value) -> (Value, Value) {
    let job = job_spec(manifest);
    let pod = &job["template"]["spec"];
    let container = &pod["containers"][0];
    let args = args_of(manifest);
    assert_eq!(args[0], "run", "{what}");
    assert_eq!(args.last().unwrap(), "/jobs", "{what}");
    let max_runtime = seconds(&arg_after(manifest, "--max-runtime").expect("--max-runtime"));
    let deadline = job["activeDeadlineSeconds"].as_u64().unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    // The engine stops itself first, and a stop at the deadline still has its grace period.
    assert!(grace >= 60, "{what}: grace {grace}s is not above one batch");
    assert!(
        deadline >= max_runtime + grace,
        "{what}: activeDeadlineSeconds {deadline} <= --max-runtime {max_runtime} + grace {grace}"
    );
    assert_eq!(pod["restartPolicy"], "Never", "{what}");
    assert_eq!(
        pod["securityContext"]["runAsUser"].as_u64(),
        Some(image_uid()),
        "{what}"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{what}");
    assert_eq!(
        container["securityContext"]["readOnlyRootFilesystem"], true,
        "{what}"
    );
    // Postgres and ClickHouse specs: both URLs from the Secret, each optional.
    let env = container["env"].as_array().expect("env");
    for var in ["DATABASE_URL", "CLICKHOUSE_URL"] {
        let e = env
            .iter()
            .find(|e| e["name"] == var)
            .unwrap_or_else(|| panic!("{what}: no {var} in {env:?}"));
        let key = &e["valueFrom"]["secretKeyRef"];
        assert_eq!(key["name"], "backfill-db", "{what}: {e}");
        assert_eq!(key["key"], var, "{what}: {e}");
        assert_eq!(key["optional"], true, "{what}: {e}");
    }
    // The specs come from the ConfigMap, mounted at /jobs.
    assert_eq!(container["volumeMounts"][0]["mountPath"], "/jobs", "{what}");
    assert!(pod["volumes"][0]["configMap"]["name"].is_string(), "{what}");
    // Exit 2 (bad spec) fails the Job at once.
    let rules = job["podFailurePolicy"]["rules"].as_array().unwrap();
    assert!(
        rules.iter().any(|r| r["action"] == "FailJob"
            && r["onExitCodes"]["values"]
                .as_array()
                .unwrap()
                .contains(&2.into())),
        "{what}: {rules:?}"
    );

    let mut pod = pod.clone();
    pod["terminationGracePeriodSeconds"] = "<grace>".into();
    pod["volumes"][0]["configMap"]["name"] = "<configmap>".into();
    let c = &mut pod["containers"][0];
    c["image"] = "<image>".into();
    let args = c["args"].as_array_mut().unwrap();
    let i = args.iter().position(|a| a == "--max-runtime").unwrap();
    args[i + 1] = "<max-runtime>".into();
    // An Indexed Job's pods run one worker each; otherwise the pods are the same.
    if let Some(i) = args.iter().position(|a| a == "--workers") {
        args.drain(i..i + 2);
    }
    (pod, job["podFailurePolicy"].clone())
}

#[test]
fn k8s_job_cronjob_and_indexed_job_stop_themselves_before_the_deadline_and_share_a_pod_spec() {
    let mut pods = Vec::new();
    for path in [
        "deploy/k8s/job.yaml",
        "deploy/k8s/cronjob.yaml",
        "deploy/k8s/indexed-job.yaml",
    ] {
        pods.push((path, check_workload(path, &yaml(path))));
    }
    for (path, pod) in &pods[1..] {
        assert_eq!(
            &pods[0].1, pod,
            "deploy/k8s/job.yaml and {path} pod specs drifted apart"
        );
    }
    let cron = yaml("deploy/k8s/cronjob.yaml");
    assert_eq!(cron["spec"]["concurrencyPolicy"], "Forbid");
    let indexed = yaml("deploy/k8s/indexed-job.yaml");
    assert_eq!(indexed["spec"]["completionMode"], "Indexed");
    assert_eq!(
        indexed["spec"]["parallelism"],
        indexed["spec"]["completions"]
    );
    assert_eq!(arg_after(&indexed, "--workers").as_deref(), Some("1"));
}

// ---- deploy/k8s/render.sh -----------------------------------------------------------------------

/// What a user passes: their registry's image, and their spec files.
const USER_IMAGE: &str = "registry.acme.test/platform/backfill:2026-11-30.4f3c2a1";

/// Run deploy/k8s/render.sh; returns (exit code, stdout, stderr).
fn render(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("bash")
        .arg(root().join("deploy/k8s/render.sh"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Render, validate the output against the API schemas, and return (ConfigMap, workload).
fn rendered(args: &[&str]) -> (Value, Value) {
    let (code, out, err) = render(args);
    assert_eq!(code, 0, "render.sh {args:?}: {err}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    fs::write(&file, &out).unwrap();
    validate_manifests(&[file]);
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
    assert_eq!(docs.len(), 2, "{out}");
    assert_eq!(docs[0]["kind"], "ConfigMap", "{out}");
    let (configmap, workload) = (docs[0].clone(), docs[1].clone());
    // The workload mounts the ConfigMap rendered with it, and runs the user's image.
    let pod = &job_spec(&workload)["template"]["spec"];
    assert_eq!(
        pod["volumes"][0]["configMap"]["name"],
        configmap["metadata"]["name"]
    );
    assert_eq!(pod["containers"][0]["image"], USER_IMAGE);
    (configmap, workload)
}

/// The longest batch a Postgres spec allows: 2 x statement_timeout (the key select and the
/// statement each run under it; lock waits count inside it).
fn one_batch_seconds(spec: &Value) -> u64 {
    2 * seconds(
        spec["limits"]["statement_timeout"]
            .as_str()
            .unwrap_or("30s"),
    )
}

#[test]
fn k8s_render_job_for_a_users_image_and_spec() {
    let (configmap, job) = rendered(&["--image", USER_IMAGE, "--max-runtime", "40m", "job", SPEC]);
    let pod = check_workload("rendered job", &job);
    // Same pod as the checked-in job.yaml, apart from image, max-runtime, grace and ConfigMap.
    assert_eq!(
        pod,
        check_workload("job.yaml", &yaml("deploy/k8s/job.yaml"))
    );
    assert_eq!(job["kind"], "Job");
    assert_eq!(arg_after(&job, "--max-runtime").as_deref(), Some("40m"));
    assert!(job["spec"]["activeDeadlineSeconds"].as_u64().unwrap() > 40 * 60);
    let spec_text = fs::read_to_string(root().join(SPEC)).unwrap();
    let file = Path::new(SPEC).file_name().unwrap().to_str().unwrap();
    assert_eq!(configmap["data"][file].as_str(), Some(spec_text.as_str()));
    let spec: Value = serde_saphyr::from_str(&spec_text).unwrap();
    let grace = job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(grace > one_batch_seconds(&spec), "grace {grace}s");
}

#[test]
fn k8s_render_cronjob_forbids_overlap_and_keeps_the_schedule() {
    let (configmap, cron) = rendered(&[
        "--image",
        USER_IMAGE,
        "--schedule",
        "30 1 * * 1-5",
        "--time-zone",
        "Europe/Berlin",
        "--grace",
        "300",
        "--name",
        "dj-names",
        "cronjob",
        "jobs",
    ]);
    check_workload("rendered cronjob", &cron);
    assert_eq!(cron["kind"], "CronJob");
    assert_eq!(cron["metadata"]["name"], "dj-names");
    assert_eq!(configmap["metadata"]["name"], "dj-names-jobs");
    assert_eq!(cron["spec"]["concurrencyPolicy"], "Forbid");
    assert_eq!(cron["spec"]["schedule"], "30 1 * * 1-5");
    assert_eq!(cron["spec"]["timeZone"], "Europe/Berlin");
    let job = job_spec(&cron);
    assert_eq!(
        job["template"]["spec"]["terminationGracePeriodSeconds"],
        300
    );
    assert!(job["activeDeadlineSeconds"].as_u64().unwrap() >= 90 * 60 + 300);
    // A directory gives its Postgres specs, not the ClickHouse ones in jobs/clickhouse/.
    let mut keys: Vec<&String> = configmap["data"].as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        ["0001_flowsheet-dj-name.yaml", "0002_ci-pending-builds.yaml"]
    );
}

#[test]
fn k8s_render_indexed_job_runs_one_worker_per_pod_and_checks_the_specs_workers() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("0001_flowsheet-dj-name.yaml");
    let text = fs::read_to_string(root().join(SPEC)).unwrap();
    fs::write(&spec, format!("{text}workers: 6\n")).unwrap();
    let spec = spec.to_str().unwrap();

    let (configmap, job) =
        rendered(&["--image", USER_IMAGE, "--workers", "6", "indexed-job", spec]);
    let pod = check_workload("rendered indexed job", &job);
    assert_eq!(
        pod,
        check_workload("job.yaml", &yaml("deploy/k8s/job.yaml"))
    );
    assert_eq!(job["spec"]["completionMode"], "Indexed");
    assert_eq!(job["spec"]["parallelism"], 6);
    assert_eq!(job["spec"]["completions"], 6);
    let args = args_of(&job);
    assert_eq!(&args[..3], ["run", "--workers", "1"], "{args:?}");
    assert!(
        configmap["data"]["0001_flowsheet-dj-name.yaml"]
            .as_str()
            .unwrap()
            .ends_with("workers: 6\n")
    );

    // A spec that does not say `workers: 6` would leave pods with nothing to claim.
    let (code, out, err) = render(&["--image", USER_IMAGE, "--workers", "6", "indexed-job", SPEC]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("needs workers: 6"), "{err}");
    assert!(out.is_empty(), "{out}");
}

#[test]
fn k8s_render_clickhouse_spec_and_refuse_a_grace_period_shorter_than_a_batch() {
    let (configmap, job) = rendered(&["--image", USER_IMAGE, "job", "jobs/clickhouse"]);
    check_workload("rendered ClickHouse job", &job);
    let file = "0001_test-case-runs-recent-100.yaml";
    assert_eq!(
        configmap["data"][file].as_str(),
        Some(
            fs::read_to_string(root().join("jobs/clickhouse").join(file))
                .unwrap()
                .as_str()
        )
    );

    // statement_timeout 30s: a batch may take 60s.
    for (grace, ok) in [("60", false), ("61", true)] {
        let (code, _, err) = render(&["--image", USER_IMAGE, "--grace", grace, "job", SPEC]);
        assert_eq!(code == 0, ok, "--grace {grace}: {err}");
        if !ok {
            assert_eq!(code, 2, "{err}");
            assert!(err.contains("statement_timeout"), "{err}");
        }
    }
    for bad in [
        vec!["job", SPEC],
        vec!["--image", USER_IMAGE, "deployment", SPEC],
        vec![
            "--image",
            USER_IMAGE,
            "--max-runtime",
            "45 minutes",
            "job",
            SPEC,
        ],
        vec!["--image", USER_IMAGE, "--workers", "3", "job", SPEC],
        vec!["--image", USER_IMAGE, "job", "jobs/nope.yaml"],
    ] {
        let (code, out, err) = render(&bad);
        assert_eq!(code, 2, "{bad:?}: {out}{err}");
        assert!(out.is_empty(), "{bad:?}: {out}");
    }
}

#[test]
fn k8s_configmap_holds_the_example_job_spec_verbatim() {
    let configmap = yaml("deploy/k8s/configmap.yaml");
    let file = Path::new(SPEC).file_name().unwrap().to_str().unwrap();
    let spec = fs::read_to_string(root().join(SPEC)).unwrap();
    assert_eq!(
        configmap["data"][file].as_str(),
        Some(spec.as_str()),
        "deploy/k8s/configmap.yaml is out of date with {SPEC}: regenerate its data with\n  \
         kubectl create configmap backfill-jobs --from-file={SPEC} --dry-run=client -o yaml"
    );
}

#[test]
fn k8s_example_secret_is_a_placeholder() {
    let secret = yaml("deploy/k8s/secret.example.yaml");
    let url = secret["stringData"]["DATABASE_URL"].as_str().unwrap();
    assert!(
        url.contains("CHANGE-ME") && url.contains(".invalid"),
        "{url}"
    );
}

/// A ConfigMap volume: each key is a symlink into `..data`, itself a symlink to a timestamped
/// directory. The engine must find the specs through the links and ignore the dot entries.
#[test]
fn engine_reads_specs_from_a_configmap_mount() {
    let mount = tempfile::tempdir().unwrap();
    let version = mount.path().join("..2026_11_21_04_00_00.123456789");
    fs::create_dir(&version).unwrap();
    let file = Path::new(SPEC).file_name().unwrap();
    fs::copy(root().join(SPEC), version.join(file)).unwrap();
    std::os::unix::fs::symlink(
        "..2026_11_21_04_00_00.123456789",
        mount.path().join("..data"),
    )
    .unwrap();
    std::os::unix::fs::symlink(Path::new("..data").join(file), mount.path().join(file)).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_backfill"))
        .args(["validate"])
        .arg(mount.path())
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("flowsheet-dj-name"), "{all}");
    assert_eq!(all.matches("ok ").count(), 1, "exactly one spec: {all}");
}

// ---- deploy/README.md ---------------------------------------------------------------------------

/// deploy/README.md only names metrics the engine defines (the alert rules and the dashboard it
/// points to are checked against real runs by tests/observability.rs).
#[test]
fn deploy_readme_alerts_use_exported_metric_names() {
    let readme = fs::read_to_string(root().join("deploy/README.md")).unwrap();
    let metrics = fs::read_to_string(root().join("src/metrics.rs")).unwrap();
    let mut names: Vec<&str> = readme
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("backfill_"))
        .collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            metrics.contains(&format!("\"{base}\"")),
            "deploy/README.md uses {name}, which src/metrics.rs does not define"
        );
    }
}
