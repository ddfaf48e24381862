//! deploy/ssh/run-job.sh over real SSH to this machine, with the real Docker daemon and the
//! production image (scripts/image.sh; built here, never pushed): each test starts a private
//! sshd on a free loopback port with a host key and an authorized key it makes in a temp dir
//! (the system's sshd and its config are never touched), and a database of its own. It checks
//! the exit codes (0, and 75 when the script's `timeout --signal=TERM` ends the run), the log
//! tee'd locally, the refusal of a second run of the same job while one runs, and that an image
//! only on the host runs while a failed pull is reported as such (125), not as a job failure.
//! sshd, ssh or docker missing is a failure, not a skip (.ci/run installs them).

mod common;
use common::docker::{docker, image, text};
use common::runner::wait_until;
use common::{TestDb, count};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const TARGET: &str = "root@127.0.0.1";

/// A private sshd for one test; killed when dropped.
struct Sshd {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "backfill-test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("ssh-keygen (openssh-client)");
    assert!(out.status.success(), "ssh-keygen: {}", text(&out));
}

impl Sshd {
    fn start() -> Sshd {
        let sshd = Path::new("/usr/sbin/sshd");
        assert!(
            sshd.is_file(),
            "/usr/sbin/sshd not found: install openssh-server (.ci/run does)"
        );
        let docker_host = image().docker_host.clone();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        keygen(&d.join("host_key"));
        keygen(&d.join("client_key"));
        fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        fs::set_permissions(d.join("authorized_keys"), fs::Permissions::from_mode(0o600)).unwrap();
        // sshd needs its privilege separation directory (the ssh service makes it at start).
        fs::create_dir_all("/run/sshd").unwrap();

        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let host_pub = fs::read_to_string(d.join("host_key.pub")).unwrap();
        fs::write(
            d.join("known_hosts"),
            format!("[127.0.0.1]:{port} {host_pub}"),
        )
        .unwrap();
        // The remote docker talks to the test daemon, as a host's docker is configured for its
        // own daemon.
        fs::write(
            d.join("sshd_config"),
            format!(
                "Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
AllowUsers root
StrictModes no
SetEnv DOCKER_HOST={docker_host}
",
                d = d.display()
            ),
        )
        .unwrap();
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(fs::File::create(d.join("sshd.log")).unwrap()))
            .spawn()
            .expect("start sshd");
        let mut s = Sshd { dir, port, child };

        // Ready when a command runs over it.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = s.ssh_command().arg(TARGET).arg("true").output().unwrap();
            if out.status.success() {
                break;
            }
            assert!(
                s.child.try_wait().unwrap().is_none() && Instant::now() < deadline,
                "sshd did not accept a login: {}\nsshd log:\n{}",
                text(&out),
                fs::read_to_string(s.path("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// The ssh command line, as run-job.sh's SSH variable (words split on spaces).
    fn ssh(&self) -> String {
        format!(
            "ssh -F /dev/null -p {} -i {} -o IdentitiesOnly=yes -o BatchMode=yes \
             -o StrictHostKeyChecking=yes -o UserKnownHostsFile={} -o LogLevel=ERROR",
            self.port,
            self.path("client_key").display(),
            self.path("known_hosts").display()
        )
    }

    fn ssh_command(&self) -> Command {
        let ssh = self.ssh();
        let mut words = ssh.split(' ');
        let mut c = Command::new(words.next().unwrap());
        c.args(words).stdin(Stdio::null());
        c
    }

    /// deploy/ssh/run-job.sh with this sshd, logs in `<dir>/logs`.
    fn run_job(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut c = Command::new("bash");
        c.arg(root().join("deploy/ssh/run-job.sh"))
            .args(args)
            .current_dir(self.dir.path())
            .env("SSH", self.ssh())
            .env("LOG_DIR", self.path("logs"))
            .env_remove("STOP_TIMEOUT")
            .env_remove("DEADLINE_MARGIN")
            .envs(env.iter().copied())
            .stdin(Stdio::null());
        c
    }

    fn logs(&self) -> Vec<PathBuf> {
        match fs::read_dir(self.path("logs")) {
            Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
            Err(_) => vec![],
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test database with `src` (ids 1..=rows) and `dst` (no unique constraint: a batch applied
/// twice shows up as duplicates), an env file with its URL, and an INSERT spec whose batches of
/// 100 rows each sleep `sleep` seconds. The spec's file name is unique, and so is the container
/// run-job.sh names after it (`backfill-<file stem>`).
struct Job {
    db: TestDb,
    spec: PathBuf,
    env_file: PathBuf,
    container: String,
    rows: i64,
}

impl Job {
    async fn new(hint: &str, rows: i64, sleep: f64) -> Job {
        let db = TestDb::new(hint).await;
        db.client()
            .await
            .batch_execute(&format!(
                "CREATE TABLE src (id bigint PRIMARY KEY);
                 INSERT INTO src SELECT generate_series(1, {rows});
                 ANALYZE src;
                 CREATE TABLE dst (id bigint NOT NULL);"
            ))
            .await
            .unwrap();
        let stem = format!("ssh-{hint}-{}", rand::random::<u32>());
        let spec = db.spec(
            &format!("{stem}.yaml"),
            &format!(
                "name: {stem}
postgres:
  url: ${{DATABASE_URL}}
  table: src
  key: id
  lock: none
  statement: |
    INSERT INTO dst (id) SELECT id FROM src
     WHERE id = ANY($1) AND (SELECT pg_sleep({sleep})) IS NOT NULL
batch:
  size: 100
  target: 0
"
            ),
        );
        let env_file = db.dir.path().join("backfill.env");
        fs::write(&env_file, format!("DATABASE_URL={}\n", db.url)).unwrap();
        fs::set_permissions(&env_file, fs::Permissions::from_mode(0o600)).unwrap();
        Job {
            db,
            spec,
            env_file,
            container: format!("backfill-{stem}"),
            rows,
        }
    }

    /// run-job.sh arguments for this job: target, image, spec, env file, host network, and more.
    fn args<'a>(&'a self, image: &'a str, more: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            TARGET,
            image,
            self.spec.to_str().unwrap(),
            "--env-file",
            self.env_file.to_str().unwrap(),
            "--network",
            "host",
        ];
        args.extend_from_slice(more);
        args
    }

    async fn counts(&self) -> (i64, i64) {
        let c = self.db.client().await;
        (
            count(&c, "SELECT count(*) FROM dst").await,
            count(&c, "SELECT count(DISTINCT id) FROM dst").await,
        )
    }

    fn container_exists(&self) -> bool {
        let out = docker()
            .args(["ps", "--all", "--quiet", "--filter"])
            .arg(format!("name=^{}$", self.container))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        !out.stdout.is_empty()
    }
}

fn code_and_text(out: &Output) -> (i32, String) {
    (out.status.code().unwrap_or(-1), text(out))
}

#[tokio::test]
async fn ssh_run_exits_0_tees_the_log_and_runs_the_image_that_was_never_pushed() {
    let img = image().name.clone();
    let sshd = Sshd::start();
    let job = Job::new("ok", 500, 0.0).await;

    // Default pull policy (missing): the image exists only in the host's daemon.
    let out = sshd.run_job(&job.args(&img, &[]), &[]).output().unwrap();
    let (code, all) = code_and_text(&out);
    // What an operator sees (shown with --nocapture).
    eprintln!("run-job.sh over ssh, exit {code}:\n{all}");
    assert_eq!(code, 0, "{all}");
    assert_eq!(job.counts().await, (job.rows, job.rows), "{all}");
    assert!(all.contains(&format!("using {img} as found on")), "{all}");
    assert!(!all.contains("pulling"), "{all}");
    assert!(all.contains("run-job: exit 0: done"), "{all}");

    // The log on this side holds what the engine printed and the verdict.
    let logs = sshd.logs();
    assert_eq!(logs.len(), 1, "{logs:?}");
    let stem = job.spec.file_stem().unwrap().to_str().unwrap();
    let log_name = logs[0].file_name().unwrap().to_str().unwrap();
    assert!(log_name.starts_with(&format!("{stem}-")), "{log_name}");
    let log = fs::read_to_string(&logs[0]).unwrap();
    assert!(log.contains(stem), "log lacks the job's name:\n{log}");
    assert!(log.contains("run-job: exit 0: done"), "{log}");
    assert!(
        log.contains("1 run"),
        "log lacks the engine's summary:\n{log}"
    );
    // --rm: no container left; the uploaded spec is gone from the host.
    assert!(!job.container_exists());
    let leftovers: Vec<_> = fs::read_dir("/tmp")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&job.container))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // --pull never runs it too.
    let out = sshd
        .run_job(&job.args(&img, &["--pull", "never"]), &[])
        .output()
        .unwrap();
    let (code, all) = code_and_text(&out);
    assert_eq!(code, 0, "{all}");
    assert!(all.contains("0 run, 1 skipped"), "{all}");
    job.db.drop_db().await;
}

#[tokio::test]
async fn ssh_pull_failures_exit_125_and_read_as_nothing_ran() {
    let img = image().name.clone();
    let sshd = Sshd::start();
    let job = Job::new("pull", 200, 0.0).await;
    let cases = [
        // Not on the host, and the registry does not resolve.
        ("registry.example.invalid/backfill:nope", "missing"),
        // A moving tag refreshed first: the pull fails even though the host has the image.
        (img.as_str(), "always"),
        // Not on the host and pulling is not allowed.
        ("registry.example.invalid/backfill:nope", "never"),
    ];
    for (image, pull) in cases {
        let out = sshd
            .run_job(&job.args(image, &["--pull", pull]), &[])
            .output()
            .unwrap();
        let (code, all) = code_and_text(&out);
        assert_eq!(code, 125, "{image} --pull {pull}: {all}");
        assert!(
            all.contains("nothing was started") && all.contains("nothing ran"),
            "{image} --pull {pull}: {all}"
        );
        assert!(!all.contains("failed: read the error"), "{all}");
        assert!(!job.container_exists());
    }
    assert_eq!(job.counts().await, (0, 0), "a job ran");
    job.db.drop_db().await;
}

#[tokio::test]
async fn ssh_deadline_sigterm_exits_75_and_the_next_run_resumes_with_every_row_once() {
    let img = image().name.clone();
    let sshd = Sshd::start();
    // 10 batches of about a second each.
    let job = Job::new("term", 1000, 1.0).await;

    // --max-runtime 4s and no margin: the script's `timeout --signal=TERM` fires at 4 s, before
    // the engine's own deadline (it started later); the engine finishes its batch and exits 75.
    let out = sshd
        .run_job(
            &job.args(&img, &["--max-runtime", "4s"]),
            &[("DEADLINE_MARGIN", "0")],
        )
        .output()
        .unwrap();
    let (code, all) = code_and_text(&out);
    assert_eq!(code, 75, "{all}");
    assert!(all.contains("SIGTERM"), "the stop was not a SIGTERM: {all}");
    assert!(all.contains("run-job: exit 75"), "{all}");
    let (rows, distinct) = job.counts().await;
    assert!(rows < job.rows, "the run was not stopped: {all}");
    assert_eq!(rows % 100, 0, "a partial batch: {rows}");
    assert_eq!(rows, distinct);
    assert!(!job.container_exists(), "{all}");

    let out = sshd.run_job(&job.args(&img, &[]), &[]).output().unwrap();
    let (code, all) = code_and_text(&out);
    // What an operator sees (shown with --nocapture).
    eprintln!("run-job.sh over ssh, exit {code}:\n{all}");
    assert_eq!(code, 0, "{all}");
    assert_eq!(job.counts().await, (job.rows, job.rows), "{all}");
    assert_eq!(sshd.logs().len(), 2);
    job.db.drop_db().await;
}

#[tokio::test]
async fn ssh_refuses_a_second_run_of_a_job_that_is_running_and_says_how_to_look_at_it() {
    let img = image().name.clone();
    let sshd = Sshd::start();
    // 20 batches of half a second: the first run is still going when the second one comes.
    let job = Job::new("twice", 2000, 0.5).await;

    let first = sshd
        .run_job(&job.args(&img, &[]), &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let c = job.db.client().await;
    wait_until(
        "the first run's first batch",
        Duration::from_secs(120),
        Duration::from_millis(100),
        async || count(&c, "SELECT count(*) FROM dst").await > 0,
    )
    .await;
    assert!(job.container_exists());

    let out = sshd.run_job(&job.args(&img, &[]), &[]).output().unwrap();
    let (code, all) = code_and_text(&out);
    assert_eq!(code, 75, "{all}");
    assert!(all.contains("refusing to start"), "{all}");
    for how in [
        format!("ssh {TARGET} docker logs -f {}", job.container),
        format!("ssh {TARGET} docker inspect {}", job.container),
        format!("ssh {TARGET} docker stop --time 120 {}", job.container),
        format!("ssh {TARGET} docker rm {}", job.container),
    ] {
        assert!(all.contains(&how), "missing `{how}` in:\n{all}");
    }

    // The first run was not disturbed.
    let out = first.wait_with_output().unwrap();
    let (code, all) = code_and_text(&out);
    // What an operator sees (shown with --nocapture).
    eprintln!("run-job.sh over ssh, exit {code}:\n{all}");
    assert_eq!(code, 0, "{all}");
    assert_eq!(job.counts().await, (job.rows, job.rows), "{all}");
    drop(c);
    job.db.drop_db().await;
}
