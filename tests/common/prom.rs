//! Prometheus from the outside: a free port for `--metrics-addr`, a scrape of `/metrics`, a
//! value out of the text format, and a tiny push gateway that records what `--pushgateway`
//! sends.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `/metrics` page on `port` (headers and body), or `None` while nothing answers.
pub fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// The value of `name{backfill_job="..."}` in a Prometheus text payload.
pub fn value(payload: &str, name: &str, job: &str) -> Option<f64> {
    let prefix = format!("{name}{{backfill_job=\"{job}\"}} ");
    payload
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// One request the push gateway received: request line, headers, body.
pub type Received = Arc<Mutex<Vec<(String, String, String)>>>;

/// A tiny push gateway: records every request, answers 200.
pub fn receiver() -> (u16, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut r = BufReader::new(stream);
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let (mut headers, mut len) = (String::new(), 0usize);
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                headers.push_str(&h);
            }
            let mut body = vec![0; len];
            let _ = r.read_exact(&mut body);
            sink.lock().unwrap().push((
                line.trim().to_string(),
                headers,
                String::from_utf8_lossy(&body).into_owned(),
            ));
            let _ = r
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (port, got)
}
