//! Deployment artifacts: the SSH one-shot script (shellcheck, and its behaviour against stub
//! `ssh` and `docker` commands), the Kubernetes manifests (schema validation, consistency with
//! the image and with each other), the Dockerfile (hadolint), and the engine reading specs from
//! a ConfigMap mount. Needs no database and no Docker engine.
//!
//! The linters come from `.ci/run` (a venv in target/ci-tools) or from PATH. Outside CI a
//! missing linter skips its test with a message; with CI set it fails.

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

/// A linter from target/ci-tools/bin (installed by .ci/run) or PATH; `None` means skip, which
/// is only allowed outside CI.
fn tool(name: &str) -> Option<PathBuf> {
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
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is required in CI (.ci/run installs it) but was not found"
        );
        eprintln!("SKIPPED: {name} not found (not in target/ci-tools/bin or PATH; run .ci/run)");
    }
    found
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
pull) echo "sha256:0123456789abcdef" ;;
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
fn ssh_scripts_pass_shellcheck() {
    let Some(shellcheck) = tool("shellcheck") else {
        return;
    };
    let scripts: Vec<PathBuf> = fs::read_dir(root().join("deploy/ssh"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .collect();
    assert!(scripts.len() >= 2, "deploy/ssh scripts: {scripts:?}");
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
    assert_eq!(order, ["ps", "pull", "run", "ps"], "{calls:?}");
    assert!(calls[1].contains(&IMAGE.to_string()), "{:?}", calls[1]);

    let run = &calls[2];
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

#[test]
fn k8s_manifests_validate_against_the_api_schemas() {
    let Some(validator) = tool("kubernetes-validate") else {
        return;
    };
    let manifests: Vec<PathBuf> = fs::read_dir(root().join("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert_eq!(manifests.len(), 4, "{manifests:?}");
    for version in ["1.29.0", "1.37.0"] {
        let out = Command::new(&validator)
            .args(["--strict", "--quiet", "--kubernetes-version", version])
            .args(&manifests)
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
fn dockerfile_passes_hadolint() {
    let Some(hadolint) = tool("hadolint") else {
        return;
    };
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

/// The pod spec of a Job (`spec`) or a CronJob (`spec.jobTemplate.spec`), and its Job spec.
fn job_spec(manifest: &Value) -> &Value {
    match manifest["kind"].as_str() {
        Some("Job") => &manifest["spec"],
        Some("CronJob") => &manifest["spec"]["jobTemplate"]["spec"],
        other => panic!("not a Job or CronJob: {other:?}"),
    }
}

#[test]
fn k8s_job_and_cronjob_stop_themselves_before_the_deadline_and_share_a_pod_spec() {
    let dockerfile = fs::read_to_string(root().join("Dockerfile")).unwrap();
    let user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER in Dockerfile");
    let uid: u64 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("numeric USER");

    let mut pods = Vec::new();
    for path in ["deploy/k8s/job.yaml", "deploy/k8s/cronjob.yaml"] {
        let manifest = yaml(path);
        let job = job_spec(&manifest);
        let pod = &job["template"]["spec"];
        let container = &pod["containers"][0];
        let args: Vec<&str> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args[0], "run", "{path}");
        assert_eq!(*args.last().unwrap(), "/jobs", "{path}");
        let max_runtime =
            seconds(args[args.iter().position(|a| *a == "--max-runtime").unwrap() + 1]);
        let deadline = job["activeDeadlineSeconds"].as_u64().unwrap();
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        // The engine stops itself first, and a stop at the deadline still has its grace period.
        assert!(grace >= 60, "{path}: grace {grace}s is not above one batch");
        assert!(
            deadline >= max_runtime + grace,
            "{path}: activeDeadlineSeconds {deadline} <= --max-runtime {max_runtime} + grace {grace}"
        );
        assert_eq!(pod["restartPolicy"], "Never", "{path}");
        assert_eq!(
            pod["securityContext"]["runAsUser"].as_u64(),
            Some(uid),
            "{path}"
        );
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{path}");
        assert_eq!(
            container["securityContext"]["readOnlyRootFilesystem"], true,
            "{path}"
        );
        assert_eq!(
            container["env"][0]["valueFrom"]["secretKeyRef"]["name"], "backfill-db",
            "{path}"
        );
        // Exit 2 (bad spec) fails the Job at once.
        let rules = job["podFailurePolicy"]["rules"].as_array().unwrap();
        assert!(
            rules.iter().any(|r| r["action"] == "FailJob"
                && r["onExitCodes"]["values"]
                    .as_array()
                    .unwrap()
                    .contains(&2.into())),
            "{path}: {rules:?}"
        );
        // Same pod either way, apart from the --max-runtime value.
        let mut pod = pod.clone();
        let args = pod["containers"][0]["args"].as_array_mut().unwrap();
        let i = args.iter().position(|a| a == "--max-runtime").unwrap();
        args[i + 1] = "<max-runtime>".into();
        pods.push((pod, job["podFailurePolicy"].clone()));
    }
    assert_eq!(
        pods[0], pods[1],
        "job.yaml and cronjob.yaml pod specs drifted apart"
    );
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

/// The alerts in deploy/README.md only use metric names the engine exports.
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
    assert!(names.len() >= 4, "{names:?}");
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
