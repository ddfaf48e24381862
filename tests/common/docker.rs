//! The production image and the Docker daemon it lives in, for tests that run real containers:
//! `scripts/image.sh` builds the image from the working tree (or finds it up to date) once per
//! test binary. A missing daemon, docker or image is a test failure, never a skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// Where the image is: the daemon's socket and the image's name.
pub struct Image {
    pub docker_host: String,
    pub name: String,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The image, built by `scripts/image.sh` on first use (its log is shown if a test fails).
pub fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let out = Command::new("bash")
            .arg(root().join("scripts/image.sh"))
            .current_dir(root())
            .stdin(Stdio::null())
            .output()
            .expect("run bash scripts/image.sh");
        let log = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        assert!(
            out.status.success(),
            "scripts/image.sh failed ({}): these tests need Docker (root, docker.io, debootstrap: \
             .ci/run installs them). Its last lines:\n{}",
            out.status,
            tail.join("\n")
        );
        eprintln!("scripts/image.sh:\n{}", tail.join("\n"));
        let exports = String::from_utf8_lossy(&out.stdout);
        let var = |name: &str| {
            exports
                .lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .unwrap_or_else(|| panic!("scripts/image.sh printed no {name}: {exports}"))
                .to_string()
        };
        Image {
            docker_host: var("DOCKER_HOST"),
            name: var("BACKFILL_IMAGE"),
        }
    })
}

/// `docker` against the image's daemon, with no stdin.
pub fn docker() -> Command {
    let mut c = Command::new("docker");
    c.env("DOCKER_HOST", &image().docker_host)
        .stdin(Stdio::null());
    c
}

/// Run `docker <args>`; returns the output whatever the exit status.
pub fn docker_out(args: &[&str]) -> Output {
    docker()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("docker {args:?}: {e}"))
}

/// stdout and stderr of a command, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A container name unique to this test process; the container is removed (`docker rm -f`)
/// when this value is dropped, also when the test fails.
pub struct ContainerName(pub String);

impl ContainerName {
    pub fn new(hint: &str) -> ContainerName {
        ContainerName(format!(
            "bf-test-{hint}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ))
    }
}

impl Drop for ContainerName {
    fn drop(&mut self) {
        let _ = docker()
            .args(["rm", "--force", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `docker run --rm` arguments for a one-shot backfill container, locked down as deploy/ssh and
/// deploy/k8s run it (read-only root, no capabilities), on the host network (the test servers
/// listen on 127.0.0.1), with `spec` mounted read-only at `/jobs/<file name>`.
pub fn run_args(name: &str, env: &[(&str, &str)], spec: Option<&Path>) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--rm",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (k, v) in env {
        args.push("--env".into());
        args.push(format!("{k}={v}"));
    }
    if let Some(spec) = spec {
        let file = spec.file_name().unwrap().to_string_lossy();
        args.push("--volume".into());
        args.push(format!("{}:/jobs/{file}:ro", spec.display()));
    }
    args.push(image().name.clone());
    args.push("--log-format".into());
    args.push("text".into());
    args
}
