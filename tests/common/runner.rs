//! `backfill run` in the background, and waiting (bounded) for what it does.

use super::{backfill, count, path_str};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Poll `done` every `every` until it holds; fail if it does not within `limit`.
pub async fn wait_until(
    what: &str,
    limit: Duration,
    every: Duration,
    mut done: impl AsyncFnMut() -> bool,
) {
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(every).await;
    }
}

/// Wait (bounded) until no session of a `backfill` process is left on this database: a runner
/// that was killed or stopped has then had its open transaction rolled back (or committed whole)
/// and its runner lock released.
pub async fn wait_runner_sessions_gone(c: &Client) {
    wait_until(
        "the runner's sessions to end",
        Duration::from_secs(60),
        Duration::from_millis(20),
        async || {
            count(
                c,
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND application_name LIKE 'backfill:%'",
            )
            .await
                == 0
        },
    )
    .await;
}

/// A running `backfill run` whose output goes to files in `dir` (no pipe to fill up). Dropping
/// it kills the process if it is still running, so a failed test leaves no runner behind.
pub struct Running {
    pub child: Child,
    out: PathBuf,
    err: PathBuf,
}

/// Start `backfill run <args> <spec>`, with stdout and stderr in `<dir>/<tag>.out` and `.err`.
pub fn spawn(dir: &Path, tag: &str, args: &[&str], spec: &Path) -> Running {
    let mut cmd = backfill();
    cmd.arg("run").args(args).arg(spec);
    spawn_cmd(dir, tag, cmd)
}

/// Start `cmd`, with stdout and stderr in `<dir>/<tag>.out` and `.err`.
pub fn spawn_cmd(dir: &Path, tag: &str, mut cmd: Command) -> Running {
    let out = dir.join(format!("{tag}.out"));
    let err = dir.join(format!("{tag}.err"));
    let child = cmd
        .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&err).unwrap()))
        .spawn()
        .expect("spawn backfill run");
    Running { child, out, err }
}

/// `cmd` run as pid 1 of a pid namespace of its own, with its own `/proc` (as in a container
/// that shares the host's name): `unshare --pid --fork --mount-proc`, which exits with its
/// status and takes it down if killed itself.
pub fn in_own_pid_namespace(cmd: &Command) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--pid", "--fork", "--kill-child", "--mount-proc"])
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdin(Stdio::null());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

impl Running {
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_some()
    }

    /// The file the runner's stderr goes to (to read while it runs).
    pub fn stderr_path(&self) -> &Path {
        &self.err
    }

    /// What the runner has written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// SIGTERM to the process we started.
    pub fn sigterm(&self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -TERM failed");
    }

    /// SIGTERM, then wait for the exit, bounded; returns (code, stdout, stderr).
    pub async fn stop(self, limit: Duration) -> (i32, String, String) {
        self.sigterm();
        self.finish(limit).await
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) -> ExitStatus {
        self.child.kill().expect("SIGKILL the runner");
        self.child.wait().expect("wait for killed runner")
    }

    /// Poll `done` every `every` until it holds; fail if it does not within `limit` or if the
    /// runner exits first.
    pub async fn wait_until(
        &mut self,
        what: &str,
        limit: Duration,
        every: Duration,
        mut done: impl AsyncFnMut() -> bool,
    ) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                panic!("runner exited ({s}) before {what}:\n{}", self.stderr());
            }
            if done().await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {limit:?} waiting for {what}"
            );
            tokio::time::sleep(every).await;
        }
    }

    /// Wait for the exit, bounded; returns (code, stdout, stderr).
    pub async fn finish(mut self, limit: Duration) -> (i32, String, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "runner did not exit within {limit:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        (
            status.code().unwrap_or(-1),
            std::fs::read_to_string(&self.out).unwrap(),
            self.stderr(),
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `backfill run <spec>` to completion, which must exit 0; returns stdout. `what` names the run
/// in the failure message.
pub fn run_to_end(spec: &Path, what: &str) -> String {
    let out = backfill()
        .arg("run")
        .arg(spec)
        .output()
        .expect("run backfill");
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what} of {}:\n{o}\n{e}",
        path_str(spec)
    );
    o
}
