//! A private Postgres cluster per test: initdb into a temp dir, started on a free port of
//! 127.0.0.1 (as user postgres when the tests run as root), with TLS, a password role and server
//! settings on request; restart, stop, start again, terminate backends and ALTER SYSTEM on this
//! cluster alone; stopped (`-m immediate`) and removed when dropped, also when the test panics.
//!
//! ```ignore
//! let pg = PgCluster::start(ClusterOpts::new().tls().password_role("bf_pw", "right")).await;
//! let db = pg.create_db("hint").await;      // a TestDb: db.url, db.spec(..), db.client()
//! pg.restart().await;
//! ```

use super::{TestDb, connect};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

/// How long the server may take to accept connections after a start or restart.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Prefix of the clusters' temp dirs: `bf-pgcluster-<pid>-<random>`.
const DIR_PREFIX: &str = "bf-pgcluster-";

/// What a cluster starts with (a builder: `ClusterOpts::new().tls().setting("k", "v")`).
#[derive(Clone, Debug, Default)]
pub struct ClusterOpts {
    tls: bool,
    password_role: Option<(String, String)>,
    settings: Vec<(String, String)>,
}

impl ClusterOpts {
    pub fn new() -> ClusterOpts {
        ClusterOpts::default()
    }

    /// TLS on (`ssl = on`) with a server certificate for 127.0.0.1 and localhost signed by a
    /// fresh test CA (`PgCluster::ca_path`). Plain connections are still accepted.
    pub fn tls(mut self) -> ClusterOpts {
        self.tls = true;
        self
    }

    /// A login role whose connections over TCP are checked with scram-sha-256 (everyone else,
    /// user postgres included, stays trust).
    pub fn password_role(mut self, user: &str, password: &str) -> ClusterOpts {
        self.password_role = Some((user.to_string(), password.to_string()));
        self
    }

    /// A server setting in postgresql.conf from the start (e.g. `idle_session_timeout`, `1s`).
    pub fn setting(mut self, name: &str, value: &str) -> ClusterOpts {
        self.settings.push((name.to_string(), value.to_string()));
        self
    }
}

/// A running private cluster; see the module docs.
pub struct PgCluster {
    /// Owns the directory: data/, the socket, tls/, server.log.
    root: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    opts: ClusterOpts,
}

/// True when this process runs as root (initdb and postgres refuse root: run them as postgres).
fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// uid and gid of user postgres, from /etc/passwd.
fn postgres_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() > 3 && f[0] == "postgres" {
                Some((f[2].parse().ok()?, f[3].parse().ok()?))
            } else {
                None
            }
        })
        .expect("no user postgres in /etc/passwd: install postgresql (scripts/services.sh)")
}

/// Give a path to user postgres (when running as root).
fn give_to_postgres(path: &Path) {
    if is_root() {
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown postgres {}: {e}", path.display()));
    }
}

/// The newest /usr/lib/postgresql/<version>/bin.
fn newest_bin() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("/usr/lib/postgresql: install postgresql (scripts/services.sh)")
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no /usr/lib/postgresql/*/bin/initdb: install postgresql")
        .1
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run a command and panic with its output if it fails.
fn check(what: &str, out: std::io::Result<Output>) -> Output {
    let out = out.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        output_text(&out)
    );
    out
}

/// `openssl` with these arguments; panics with its output if it fails.
fn openssl(args: &[&dyn AsRef<std::ffi::OsStr>]) {
    let mut c = std::process::Command::new("openssl");
    for a in args {
        c.arg(a);
    }
    check("openssl (apt-get install openssl)", c.output());
}

/// A new self-signed test CA in `dir` (`<name>.crt`, `<name>.key`); returns the certificate.
fn make_ca(dir: &Path, name: &str, cn: &str) -> PathBuf {
    let (key, cert) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.crt")),
    );
    let subj = format!("/CN={cn}");
    openssl(&[
        &"req",
        &"-x509",
        &"-new",
        &"-newkey",
        &"ec",
        &"-pkeyopt",
        &"ec_paramgen_curve:prime256v1",
        &"-nodes",
        &"-sha256",
        &"-days",
        &"30",
        &"-subj",
        &subj,
        &"-addext",
        &"basicConstraints=critical,CA:TRUE",
        &"-addext",
        &"keyUsage=critical,keyCertSign,cRLSign",
        &"-keyout",
        &key,
        &"-out",
        &cert,
    ]);
    cert
}

/// A CA of its own in `dir` that signed nothing any server has (for negative tests).
pub fn unrelated_ca(dir: &Path) -> PathBuf {
    make_ca(dir, "unrelated-ca", "backfill unrelated test CA")
}

/// A test CA and a server key and certificate for 127.0.0.1 and localhost signed by it, in
/// `dir`: ca.crt, server.crt, server.key.
fn make_server_tls(dir: &Path) {
    let ca = make_ca(dir, "ca", "backfill test CA");
    let (key, csr, crt, ext) = (
        dir.join("server.key"),
        dir.join("server.csr"),
        dir.join("server.crt"),
        dir.join("server.ext"),
    );
    openssl(&[
        &"req",
        &"-new",
        &"-newkey",
        &"ec",
        &"-pkeyopt",
        &"ec_paramgen_curve:prime256v1",
        &"-nodes",
        &"-sha256",
        &"-subj",
        &"/CN=127.0.0.1",
        &"-keyout",
        &key,
        &"-out",
        &csr,
    ]);
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("write server.ext");
    openssl(&[
        &"x509",
        &"-req",
        &"-sha256",
        &"-days",
        &"30",
        &"-in",
        &csr,
        &"-CA",
        &ca,
        &"-CAkey",
        &dir.join("ca.key"),
        &"-CAcreateserial",
        &"-extfile",
        &ext,
        &"-out",
        &crt,
    ]);
    for f in [&key, &crt] {
        give_to_postgres(f);
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
}

/// Single-quoted for postgresql.conf and SQL.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Stop and remove the clusters of test processes that died without dropping theirs (killed
/// by a signal or a timeout): dirs `bf-pgcluster-<pid>-*` whose pid is gone.
fn reap_stale(bin: &Path) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let data = e.path().join("data");
        if data.join("postmaster.pid").exists() {
            let _ = pg_command(bin, "pg_ctl", &e.path())
                .arg("stop")
                .arg("-D")
                .arg(&data)
                .args(["-m", "immediate", "-w", "-t", "30"])
                .output();
        }
        let _ = std::fs::remove_dir_all(e.path());
    }
}

/// A Postgres program, run as user postgres when we are root, from `cwd` (a directory user
/// postgres can enter).
fn pg_command(bin: &Path, program: &str, cwd: &Path) -> std::process::Command {
    let exe = bin.join(program);
    let mut c = if is_root() {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(exe);
        c
    } else {
        std::process::Command::new(exe)
    };
    c.current_dir(cwd).stdin(std::process::Stdio::null());
    c
}

impl PgCluster {
    /// initdb, configure and start a cluster; panics (with the server log) if it does not come
    /// up within a minute.
    pub async fn start(opts: ClusterOpts) -> PgCluster {
        let bin = newest_bin();
        reap_stale(&bin);
        let root = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .expect("cluster temp dir");
        give_to_postgres(root.path());
        let cluster = PgCluster {
            root,
            bin,
            port: 0,
            opts,
        };
        let mut cluster = cluster;
        cluster.init().await;
        cluster.first_start().await;
        if let Some((user, password)) = cluster.opts.password_role.clone() {
            cluster
                .admin()
                .await
                .batch_execute(&format!(
                    "SET password_encryption = 'scram-sha-256';
                     CREATE ROLE \"{user}\" LOGIN PASSWORD {}",
                    quote(&password)
                ))
                .await
                .expect("create the password role");
        }
        cluster
    }

    /// The default options.
    pub async fn start_default() -> PgCluster {
        PgCluster::start(ClusterOpts::new()).await
    }

    fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join("server.log")
    }

    fn tls_dir(&self) -> PathBuf {
        self.root.path().join("tls")
    }

    fn cmd(&self, program: &str) -> tokio::process::Command {
        pg_command(&self.bin, program, self.root.path()).into()
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    async fn init(&self) {
        let out = self
            .cmd("initdb")
            .arg("-D")
            .arg(self.data())
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ])
            .output()
            .await;
        check("initdb", out);

        let mut conf = String::from(
            "\n# tests/common/cluster.rs\n\
             listen_addresses = '127.0.0.1'\n\
             fsync = off\n\
             shared_buffers = 16MB\n\
             max_connections = 100\n",
        );
        conf.push_str(&format!(
            "unix_socket_directories = {}\n",
            quote(&self.root.path().display().to_string())
        ));
        if self.opts.tls {
            let dir = self.tls_dir();
            std::fs::create_dir(&dir).expect("mkdir tls");
            make_server_tls(&dir);
            give_to_postgres(&dir);
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = {}\nssl_key_file = {}\n",
                quote(&dir.join("server.crt").display().to_string()),
                quote(&dir.join("server.key").display().to_string())
            ));
        }
        for (k, v) in &self.opts.settings {
            conf.push_str(&format!("{k} = {}\n", quote(v)));
        }
        let conf_path = self.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).expect("read postgresql.conf");
        text.push_str(&conf);
        std::fs::write(&conf_path, text).expect("write postgresql.conf");

        let mut hba = String::from("local all all trust\n");
        if let Some((user, _)) = &self.opts.password_role {
            hba.push_str(&format!("host all \"{user}\" 127.0.0.1/32 scram-sha-256\n"));
        }
        hba.push_str("host all all 127.0.0.1/32 trust\n");
        std::fs::write(self.data().join("pg_hba.conf"), hba).expect("write pg_hba.conf");
    }

    /// Start on a free port; another process may take the port between the check and the
    /// bind, so try a few.
    async fn first_start(&mut self) {
        for _ in 0..5 {
            self.port = free_port();
            if self.pg_ctl_start().await {
                self.wait_ready().await;
                return;
            }
            let log = self.log_tail(20);
            if !log.contains("could not bind") && !log.contains("already in use") {
                panic!(
                    "the private cluster in {} did not start:\n{log}",
                    self.root.path().display()
                );
            }
        }
        panic!(
            "the private cluster found no free port:\n{}",
            self.log_tail(20)
        );
    }

    /// `pg_ctl start`, waiting (bounded) for it; false if it failed.
    async fn pg_ctl_start(&self) -> bool {
        let out = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.log_path())
            .arg("-o")
            .arg(format!("-p {}", self.port))
            .args(["-w", "-t", &READY_TIMEOUT.as_secs().to_string(), "start"])
            .output()
            .await
            .expect("run pg_ctl start");
        out.status.success()
    }

    /// Wait (bounded) until the server accepts connections; panics with the log tail if not.
    async fn wait_ready(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match tokio_postgres::connect(&self.url("postgres"), NoTls).await {
                Ok((client, conn)) => {
                    drop(client);
                    let _ = conn.await;
                    return;
                }
                Err(e) if Instant::now() > deadline => panic!(
                    "the private cluster on port {} does not accept connections after {:?}: \
                     {e}\n--- server log\n{}",
                    self.port,
                    READY_TIMEOUT,
                    self.log_tail(30)
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`
    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// `postgres://postgres@127.0.0.1:PORT/<db>`
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The CA that signed the server's certificate (TLS clusters only).
    pub fn ca_path(&self) -> PathBuf {
        assert!(self.opts.tls, "this cluster was started without .tls()");
        self.tls_dir().join("ca.crt")
    }

    /// A connection as user postgres to database `postgres`.
    pub async fn admin(&self) -> Client {
        connect(&self.url("postgres")).await
    }

    /// A database of its own on this cluster, used like `TestDb::new`.
    pub async fn create_db(&self, hint: &str) -> TestDb {
        TestDb::new_on(&self.url("postgres"), hint).await
    }

    /// `pg_ctl restart -m fast`: every session ends; waits until connections are accepted again.
    pub async fn restart(&self) {
        let out = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.log_path())
            .arg("-o")
            .arg(format!("-p {}", self.port))
            .args([
                "-m",
                "fast",
                "-w",
                "-t",
                &READY_TIMEOUT.as_secs().to_string(),
            ])
            .arg("restart")
            .output()
            .await
            .expect("run pg_ctl restart");
        assert!(
            out.status.success(),
            "pg_ctl restart failed:\n{}\n--- server log\n{}",
            output_text(&out),
            self.log_tail(30)
        );
        self.wait_ready().await;
    }

    /// `pg_ctl stop -m fast` (waits until the server is gone).
    pub async fn stop(&self) {
        self.stop_mode("fast").await;
    }

    /// `pg_ctl stop -m immediate`: the server dies without a checkpoint, as in a crash (it
    /// recovers from the WAL at the next start).
    pub async fn crash(&self) {
        self.stop_mode("immediate").await;
    }

    async fn stop_mode(&self, mode: &str) {
        let out = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", mode, "-w", "-t", "60", "stop"])
            .output()
            .await;
        check(&format!("pg_ctl stop -m {mode}"), out);
    }

    /// Start after `stop`/`crash`, on the same port; waits until connections are accepted.
    pub async fn start_again(&self) {
        assert!(
            self.pg_ctl_start().await,
            "pg_ctl start failed:\n{}",
            self.log_tail(30)
        );
        self.wait_ready().await;
    }

    /// `pg_terminate_backend` of every session whose application_name is LIKE `pattern` (not
    /// the one asking); returns how many were terminated.
    pub async fn terminate(&self, application_name_like: &str) -> i64 {
        self.admin()
            .await
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
                   FROM pg_stat_activity
                  WHERE application_name LIKE $1 AND pid <> pg_backend_pid()",
                &[&application_name_like],
            )
            .await
            .expect("terminate backends")
            .get(0)
    }

    /// `ALTER SYSTEM SET <setting> = '<value>'` and `pg_reload_conf()` on this cluster; waits
    /// (bounded) until new sessions see the value. Settings that need a restart take effect at
    /// `restart()`.
    pub async fn set(&self, setting: &str, value: &str) {
        let admin = self.admin().await;
        admin
            .batch_execute(&format!("ALTER SYSTEM SET {setting} = {}", quote(value)))
            .await
            .unwrap_or_else(|e| panic!("ALTER SYSTEM SET {setting}: {e}"));
        admin
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .expect("pg_reload_conf");
        // The value as the server shows it ('1000ms' shows as '1s'), where a session may set it.
        let want: String = match admin
            .query_one("SELECT set_config($1, $2, true)", &[&setting, &value])
            .await
        {
            Ok(row) => row.get(0),
            Err(_) => value.to_string(),
        };
        drop(admin);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now: String = self
                .admin()
                .await
                .query_one("SELECT current_setting($1)", &[&setting])
                .await
                .expect("current_setting")
                .get(0);
            if now == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{setting} is {now:?} in new sessions, want {want:?}, 10 s after pg_reload_conf \
                 (does it need a restart?)\n{}",
                self.log_tail(10)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = pg_command(&self.bin, "pg_ctl", self.root.path())
                .arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "-t", "30", "stop"])
                .output();
        }
        // The TempDir removes the directory.
    }
}
