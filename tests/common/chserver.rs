//! A private ClickHouse 18.16 server per test (`clickhouse-server` of this machine): a minimal
//! config.xml in a temp dir with its own data, tmp and user_files paths, HTTP and native ports
//! picked free on 127.0.0.1 (never the shared servers' 8123, 8124, 9000, 9001, 9009), and the
//! users of /etc/clickhouse-server/users.xml (user default, no password). Stop (SIGTERM, waits
//! for the process to exit), start again on the same ports and data, restart; stopped and removed
//! when dropped, also when the test panics.
//!
//! ```ignore
//! let ch = PrivateCh::start();
//! let db = ChDb::new_on(&ch.server(), "hint");
//! ch.restart();
//! ```
//!
//! 18.16 runs as root; when the tests run as another user, the server runs as that user (the temp
//! dir is theirs).

use super::ch::ChServer;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the server may take to answer `SELECT 1` after a start.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a SIGTERM may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Ports of the shared servers; a private server must never take one of them.
const SHARED_PORTS: [u16; 5] = [8123, 8124, 9000, 9001, 9009];
const USERS_XML: &str = "/etc/clickhouse-server/users.xml";

/// A running private 18.16 server; see the module docs.
pub struct PrivateCh {
    /// Owns config.xml, users.xml, data/, tmp/, user_files/, log/ and server.out.
    root: tempfile::TempDir,
    pub http_port: u16,
    pub tcp_port: u16,
    child: Option<Child>,
}

/// A TCP port on 127.0.0.1 that nothing listens on right now, and not a shared server's.
fn free_port() -> u16 {
    loop {
        let p = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if !SHARED_PORTS.contains(&p) {
            return p;
        }
    }
}

fn config(root: &Path, http: u16, tcp: u16) -> String {
    let d = root.display();
    format!(
        r#"<?xml version="1.0"?>
<yandex>
  <logger>
    <level>information</level>
    <log>{d}/log/server.log</log>
    <errorlog>{d}/log/server.err.log</errorlog>
    <size>10M</size>
    <count>1</count>
  </logger>
  <http_port>{http}</http_port>
  <tcp_port>{tcp}</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{d}/data/</path>
  <tmp_path>{d}/tmp/</tmp_path>
  <user_files_path>{d}/user_files/</user_files_path>
  <format_schema_path>{d}/data/format_schemas/</format_schema_path>
  <users_config>{d}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>268435456</mark_cache_size>
  <uncompressed_cache_size>0</uncompressed_cache_size>
  <max_concurrent_queries>50</max_concurrent_queries>
  <mlock_executable>false</mlock_executable>
</yandex>
"#
    )
}

impl PrivateCh {
    /// Write the config and start the server; waits until it answers `SELECT 1` over HTTP.
    pub fn start() -> PrivateCh {
        let root = tempfile::Builder::new()
            .prefix("bf-chserver-")
            .tempdir()
            .expect("tempdir");
        for d in ["data", "tmp", "user_files", "log"] {
            std::fs::create_dir_all(root.path().join(d)).expect("mkdir");
        }
        let users = std::fs::read_to_string(USERS_XML)
            .unwrap_or_else(|e| panic!("read {USERS_XML}: {e} (install clickhouse-server)"));
        std::fs::write(root.path().join("users.xml"), users).expect("write users.xml");
        let (http_port, tcp_port) = (free_port(), free_port());
        assert_ne!(http_port, tcp_port, "two free ports");
        std::fs::write(
            root.path().join("config.xml"),
            config(root.path(), http_port, tcp_port),
        )
        .expect("write config.xml");
        let mut ch = PrivateCh {
            root,
            http_port,
            tcp_port,
            child: None,
        };
        ch.start_again();
        ch
    }

    pub fn dir(&self) -> &Path {
        self.root.path()
    }

    /// The server for `ChDb::new_on`.
    pub fn server(&self) -> ChServer {
        ChServer {
            label: "18.16 (private)",
            url: format!("http://127.0.0.1:{}", self.http_port),
            script: "tests/common/chserver.rs (PrivateCh)",
        }
    }

    fn out_path(&self) -> PathBuf {
        self.root.path().join("server.out")
    }

    /// The last `n` lines of the server's output and error log.
    pub fn log_tail(&self, n: usize) -> String {
        let mut text = String::new();
        for p in [self.out_path(), self.root.path().join("log/server.err.log")] {
            let all = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = all.lines().collect();
            text.push_str(&format!("--- {}\n", p.display()));
            for l in &lines[lines.len().saturating_sub(n)..] {
                text.push_str(l);
                text.push('\n');
            }
        }
        text
    }

    /// Whether the HTTP port answers `SELECT 1` with `1`.
    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.http_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let sql = "SELECT 1";
        let head = format!(
            "POST / HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{sql}",
            sql.len()
        );
        if s.write_all(head.as_bytes()).is_err() {
            return false;
        }
        let mut raw = String::new();
        if s.read_to_string(&mut raw).is_err() {
            return false;
        }
        raw.starts_with("HTTP/1.0 200") && raw.ends_with("\r\n\r\n1\n")
    }

    /// Start the server (after `stop`) on the same ports and data; waits until it answers.
    pub fn start_again(&mut self) {
        assert!(
            self.child.is_none(),
            "the private server is running already"
        );
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.out_path())
            .expect("open server.out");
        let err = out.try_clone().expect("clone server.out");
        let child = Command::new("clickhouse-server")
            .arg(format!(
                "--config-file={}",
                self.root.path().join("config.xml").display()
            ))
            .current_dir(self.root.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start clickhouse-server: {e} (install clickhouse-server)"));
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.answers() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "the private clickhouse-server exited with {status} at start:\n{}",
                    self.log_tail(30)
                );
            }
            assert!(
                Instant::now() < deadline,
                "the private clickhouse-server does not answer SELECT 1 on port {} after {:?}:\n{}",
                self.http_port,
                READY_TIMEOUT,
                self.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then wait for the process to exit (SIGKILL after STOP_TIMEOUT). Returns false
    /// if it had to be killed.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return true,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return false;
                }
            }
        }
    }

    /// Stop (SIGTERM, waited for) and start again on the same data.
    pub fn restart(&mut self) {
        assert!(
            self.stop(),
            "the private clickhouse-server did not stop within {STOP_TIMEOUT:?} of SIGTERM:\n{}",
            self.log_tail(30)
        );
        self.start_again();
    }
}

impl Drop for PrivateCh {
    fn drop(&mut self) {
        self.stop();
    }
}
