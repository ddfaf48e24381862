//! Prometheus from the outside: a free port for `--metrics-addr`, a scrape of `/metrics`, a
//! value out of the text format, and a tiny push gateway that records what `--pushgateway`
//! sends.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
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
    let (port, got, _) = slow_receiver(Duration::ZERO);
    (port, got)
}

/// A push gateway that takes `delay` to answer each request. Each connection is served on its
/// own thread, as a real gateway would; a request is recorded when it has been read whole (the
/// order a gateway applies them in), and the third value is the most connections that were
/// ever open at once: pushes that overlap can land in either order.
pub fn slow_receiver(delay: Duration) -> (u16, Received, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let (open, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (sink, peak) = (got.clone(), most.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let now = open.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            let (sink, open) = (sink.clone(), open.clone());
            std::thread::spawn(move || {
                serve(stream, delay, &sink);
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (port, got, most)
}

fn serve(stream: TcpStream, delay: Duration, sink: &Received) {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
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
    if r.read_exact(&mut body).is_err() {
        return;
    }
    std::thread::sleep(delay);
    sink.lock().unwrap().push((
        line.trim().to_string(),
        headers,
        String::from_utf8_lossy(&body).into_owned(),
    ));
    let _ = r
        .get_mut()
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
}
