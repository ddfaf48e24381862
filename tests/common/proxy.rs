//! A fault-injecting TCP proxy in the test process, to put between the binary and a real
//! Postgres or ClickHouse: cut every open connection, refuse new ones for a while, and (HTTP mode,
//! for ClickHouse) per-request faults: drop a request before it reaches the server, forward it and
//! drop the response (the statement ran, the reply is lost), or hold it; chosen by a predicate on
//! the request, by count (the Nth matching request) or at random with a seed. Everything it did
//! is counted (`stats`) and logged (`events`, and on stderr).
//!
//! ```ignore
//! let proxy = FaultProxy::start_http(ch_addr).await;
//! let id = proxy.add_rule(Rule::new(Fault::DropResponse).when_contains("REPLACE PARTITION").nth(2));
//! let spec_url = proxy.url_for(&db.url);
//! // ... run the binary against spec_url ...
//! assert_eq!(proxy.rule_fired(id), 1);
//! ```

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What happens to a request a rule fires on (HTTP mode).
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Close the client's connection without forwarding the request: the server never sees it.
    DropRequest,
    /// Forward the request, read the server's whole response (the statement ran to its end),
    /// then close the client's connection without sending any of it.
    DropResponse,
    /// Wait this long, then forward the request as usual.
    Hold(Duration),
    /// Wait until `FaultProxy::release_held`, then forward the request as usual.
    HoldUntilReleased,
    /// Wait until `FaultProxy::release_held`, then close the client's connection without
    /// forwarding the request (the server never sees it): a request lost at a moment the
    /// test chooses.
    HoldThenDrop,
    /// Do not forward the request; answer it with this HTTP status and body, as the server
    /// does for an error it really gives (the text should be one seen from the real server).
    Answer(u16, String),
}

/// Which of the matching requests a rule fires on.
#[derive(Clone, Debug)]
enum When {
    Every,
    /// The Nth (1-based) matching request only.
    Nth(u64),
    /// Each matching request with probability p, from a seeded generator (repeatable).
    Random(f64, u64),
}

/// A per-request fault: `Rule::new(fault)`, narrowed with `when_contains`/`matching`, and
/// `nth`/`random`/`times`. Rules are tried in the order they were added; the first that fires
/// decides what happens to the request (later rules do not see it).
pub struct Rule {
    fault: Fault,
    pred: Arc<dyn Fn(&HttpRequest) -> bool + Send + Sync>,
    when: When,
    limit: Option<u64>,
    label: String,
}

impl Rule {
    /// A rule firing on every request.
    pub fn new(fault: Fault) -> Rule {
        Rule {
            label: format!("{fault:?}"),
            fault,
            pred: Arc::new(|_| true),
            when: When::Every,
            limit: None,
        }
    }

    /// Only requests whose text (`HttpRequest::text`: method, decoded URL and body) contains
    /// `needle`.
    pub fn when_contains(mut self, needle: &str) -> Rule {
        let needle = needle.to_string();
        self.label = format!("{} on {needle:?}", self.label);
        self.pred = Arc::new(move |r: &HttpRequest| r.text().contains(&needle));
        self
    }

    /// Only requests for which `pred` holds.
    pub fn matching(mut self, pred: impl Fn(&HttpRequest) -> bool + Send + Sync + 'static) -> Rule {
        self.label = format!("{} on a predicate", self.label);
        self.pred = Arc::new(pred);
        self
    }

    /// Fire on the nth (1-based) matching request only.
    pub fn nth(mut self, n: u64) -> Rule {
        assert!(n >= 1, "nth counts from 1");
        self.label = format!("{} (match #{n})", self.label);
        self.when = When::Nth(n);
        self
    }

    /// Fire on each matching request with probability `p`, drawn from a generator seeded with
    /// `seed`: the same requests in the same order get the same faults.
    pub fn random(mut self, p: f64, seed: u64) -> Rule {
        self.label = format!("{} (p={p}, seed {seed})", self.label);
        self.when = When::Random(p, seed);
        self
    }

    /// Fire at most `n` times.
    pub fn times(mut self, n: u64) -> Rule {
        self.label = format!("{} (at most {n}x)", self.label);
        self.limit = Some(n);
        self
    }
}

struct RuleState {
    rule: Rule,
    rng: Option<StdRng>,
    matched: u64,
    fired: u64,
}

/// A rule's handle, for `rule_matched`/`rule_fired`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleId(usize);

/// A ClickHouse job's clean-up listing its staging tables (its patterns in parentheses), not
/// the one a start makes of what lost runners left.
fn is_staging_listing(r: &HttpRequest) -> bool {
    let t = r.text();
    t.contains("FROM system.tables") && t.contains("AND ((startsWith") && t.contains("_s_")
}

/// One HTTP request as the client sent it (body de-chunked).
#[derive(Clone, Debug)]
pub struct HttpRequest {
    pub method: String,
    /// The request target as sent (`/?database=x&query=...`, percent-encoded).
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    /// The target with its query string decoded (`+` and `%XX`).
    pub fn decoded_target(&self) -> String {
        match self.target.split_once('?') {
            Some((path, query)) => {
                let pairs: Vec<String> = url::form_urlencoded::parse(query.as_bytes())
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                format!("{path}?{}", pairs.join("&"))
            }
            None => self.target.clone(),
        }
    }

    /// `METHOD decoded-target\nbody`: what `Rule::when_contains` searches.
    pub fn text(&self) -> String {
        format!(
            "{} {}\n{}",
            self.method,
            self.decoded_target(),
            String::from_utf8_lossy(&self.body)
        )
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The first 160 characters of `text()` on one line, for logs.
    pub fn summary(&self) -> String {
        let t: String = self.text().replace(['\n', '\r'], " ");
        t.chars().take(160).collect()
    }
}

/// What the proxy did so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Client connections accepted.
    pub connections: u64,
    /// Client connections open now.
    pub open: u64,
    /// Connections closed by `cut_all`.
    pub cut: u64,
    /// Times `refuse_for`/`refuse` closed the listener.
    pub refusals: u64,
    /// Complete HTTP requests read from clients.
    pub requests: u64,
    /// Requests forwarded whose response is passed back to the client.
    pub forwarded: u64,
    pub dropped_requests: u64,
    pub dropped_responses: u64,
    pub held: u64,
    /// Requests answered by the proxy itself (`Fault::Answer`).
    pub answered: u64,
    /// Idle upstream connections the server closed (the next request opened a new one).
    pub upstream_closed: u64,
}

/// One thing the proxy did: `what` is `dropped request`, `dropped response`, `held`, `cut`, ...
#[derive(Clone, Debug)]
pub struct Event {
    pub conn: u64,
    pub what: String,
    pub detail: String,
}

struct Shared {
    upstream: SocketAddr,
    http: bool,
    rules: Mutex<Vec<RuleState>>,
    stats: Mutex<Stats>,
    events: Mutex<Vec<Event>>,
    /// Open connections: id -> cut generation they started in.
    open: Mutex<BTreeMap<u64, u64>>,
    next_conn: Mutex<u64>,
    cut: watch::Sender<u64>,
    /// Refuse new connections until then (None: accept).
    refuse_until: watch::Sender<Option<Instant>>,
    /// Whether the listener is bound right now.
    listening: watch::Sender<bool>,
    release: watch::Sender<u64>,
    /// Connections with an id up to this one relay nothing more (`freeze_open`).
    frozen_upto: Mutex<Option<u64>>,
}

impl Shared {
    fn event(&self, conn: u64, what: &str, detail: String) {
        eprintln!(
            "fault proxy -> {}: conn {conn}: {what}: {detail}",
            self.upstream
        );
        self.events.lock().unwrap().push(Event {
            conn,
            what: what.to_string(),
            detail,
        });
    }

    fn stat(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut self.stats.lock().unwrap());
    }

    /// The fault for this request, if a rule fires (and the rule's label).
    fn decide(&self, req: &HttpRequest) -> Option<(Fault, String)> {
        let mut rules = self.rules.lock().unwrap();
        for st in rules.iter_mut() {
            if st.rule.limit.is_some_and(|l| st.fired >= l) || !(st.rule.pred)(req) {
                continue;
            }
            st.matched += 1;
            let fire = match st.rule.when {
                When::Every => true,
                When::Nth(n) => st.matched == n,
                When::Random(p, _) => st.rng.as_mut().expect("rng").random_bool(p),
            };
            if fire {
                st.fired += 1;
                return Some((st.rule.fault.clone(), st.rule.label.clone()));
            }
        }
        None
    }
}

/// The proxy; stops (and closes every connection) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// A plain TCP proxy to `upstream` (Postgres, or any protocol): connection faults only.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        FaultProxy::start_mode(upstream, false).await
    }

    /// An HTTP/1.x proxy to `upstream` (ClickHouse's HTTP interface): connection faults and
    /// per-request rules. Keep-alive, Content-Length and chunked bodies, `Expect: 100-continue`
    /// (answered by the proxy) and HTTP/1.0 read-to-close responses are understood.
    pub async fn start_http(upstream: SocketAddr) -> FaultProxy {
        FaultProxy::start_mode(upstream, true).await
    }

    async fn start_mode(upstream: SocketAddr, http: bool) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            http,
            rules: Mutex::new(Vec::new()),
            stats: Mutex::new(Stats::default()),
            events: Mutex::new(Vec::new()),
            open: Mutex::new(BTreeMap::new()),
            next_conn: Mutex::new(0),
            cut: watch::Sender::new(0),
            refuse_until: watch::Sender::new(None),
            listening: watch::Sender::new(true),
            release: watch::Sender::new(0),
            frozen_upto: Mutex::new(None),
        });
        let task = tokio::spawn(accept_loop(shared.clone(), addr, listener));
        FaultProxy { addr, shared, task }
    }

    /// Every connection open now goes silent for good, as behind a network that drops packets
    /// without a word: the proxy keeps reading both sides (so neither sees an error or a full
    /// buffer) and forwards nothing more, not even a close (the server keeps the session of a
    /// client that gave up on it, until it is ended there). New connections work as usual.
    /// Plain TCP mode only.
    pub fn freeze_open(&self) {
        let last = self.shared.open.lock().unwrap().keys().next_back().copied();
        *self.shared.frozen_upto.lock().unwrap() = last;
        self.shared
            .event(0, "froze", format!("connections up to {last:?}"));
    }

    /// Where clients connect: 127.0.0.1:<port>.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `url` (http://..., postgres://...) with its host and port replaced by the proxy's; user,
    /// password, path and query are kept.
    pub fn url_for(&self, url: &str) -> String {
        let mut u = url::Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        u.set_host(Some("127.0.0.1")).expect("set host");
        u.set_port(Some(self.addr.port())).expect("set port");
        u.to_string()
    }

    /// Add a per-request rule (HTTP mode only).
    pub fn add_rule(&self, rule: Rule) -> RuleId {
        assert!(
            self.shared.http,
            "per-request rules need FaultProxy::start_http"
        );
        let rng = match rule.when {
            When::Random(_, seed) => Some(StdRng::seed_from_u64(seed)),
            _ => None,
        };
        let mut rules = self.shared.rules.lock().unwrap();
        rules.push(RuleState {
            rule,
            rng,
            matched: 0,
            fired: 0,
        });
        RuleId(rules.len() - 1)
    }

    /// Remove every rule (their counts are lost; ids become invalid).
    pub fn clear_rules(&self) {
        self.shared.rules.lock().unwrap().clear();
    }

    /// Requests that matched the rule's predicate (and reached it).
    pub fn rule_matched(&self, id: RuleId) -> u64 {
        self.shared.rules.lock().unwrap()[id.0].matched
    }

    /// Requests the rule fired on.
    /// Lose the answers to a ClickHouse job's listing of its staging tables (the clean-up
    /// after its done record), more times than a read is retried: the clean-up fails.
    pub fn lose_staging_listing(&self) -> RuleId {
        self.add_rule(
            Rule::new(Fault::DropResponse)
                .matching(is_staging_listing)
                .times(4),
        )
    }

    /// Hold a ClickHouse job's first listing of its staging tables (the clean-up after its done
    /// record) until `release_held`.
    pub fn hold_staging_listing(&self) -> RuleId {
        self.add_rule(
            Rule::new(Fault::HoldUntilReleased)
                .matching(is_staging_listing)
                .nth(1),
        )
    }

    pub fn rule_fired(&self, id: RuleId) -> u64 {
        self.shared.rules.lock().unwrap()[id.0].fired
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats.lock().unwrap().clone()
    }

    pub fn events(&self) -> Vec<Event> {
        self.shared.events.lock().unwrap().clone()
    }

    /// Close every open connection now (the clients see their connection end); returns how
    /// many. New connections are accepted as before.
    pub async fn cut_all(&self) -> usize {
        // Count and signal under the lock: no connection registers or leaves in between.
        let (generation, before) = {
            let open = self.shared.open.lock().unwrap();
            let mut g = 0;
            self.shared.cut.send_modify(|c| {
                *c += 1;
                g = *c;
            });
            (g, open.len())
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self
                .shared
                .open
                .lock()
                .unwrap()
                .values()
                .filter(|&&g| g < generation)
                .count();
            if left == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{left} connections still open 10 s after cut_all"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.shared
            .event(0, "cut", format!("{before} open connection(s)"));
        before
    }

    /// Refuse new connections (the port is closed: connection refused) for `d`, then accept
    /// again. Open connections are left alone. Returns once the port is closed.
    pub async fn refuse_for(&self, d: Duration) {
        self.shared
            .refuse_until
            .send_replace(Some(Instant::now() + d));
        self.wait_listening(false).await;
    }

    /// Refuse new connections until `accept_again`.
    pub async fn refuse(&self) {
        self.refuse_for(Duration::from_secs(24 * 3600)).await;
    }

    /// Accept new connections again; returns once the port is open.
    pub async fn accept_again(&self) {
        self.shared.refuse_until.send_replace(None);
        self.wait_listening(true).await;
    }

    async fn wait_listening(&self, want: bool) {
        let mut rx = self.shared.listening.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|&l| l == want))
            .await
            .expect("the proxy's listener did not change state within 10 s")
            .expect("proxy stopped");
    }

    /// Let every request held by `Fault::HoldUntilReleased` go on.
    pub fn release_held(&self) {
        self.shared.release.send_modify(|r| *r += 1);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.cut.send_modify(|c| *c += 1);
    }
}

async fn accept_loop(shared: Arc<Shared>, addr: SocketAddr, listener: TcpListener) {
    let mut listener = Some(listener);
    let mut refuse = shared.refuse_until.subscribe();
    loop {
        let until = *refuse.borrow_and_update();
        if let Some(until) = until.filter(|&u| u > Instant::now()) {
            if listener.take().is_some() {
                shared.stat(|s| s.refusals += 1);
                shared.event(
                    0,
                    "refusing",
                    format!("new connections for {:?}", until - Instant::now()),
                );
            }
            shared.listening.send_replace(false);
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => {}
                _ = refuse.changed() => {}
            }
            continue;
        }
        let l = match &listener {
            Some(l) => l,
            None => {
                listener = Some(rebind(addr).await);
                shared.event(0, "accepting", "again".into());
                listener.as_ref().unwrap()
            }
        };
        shared.listening.send_replace(true);
        tokio::select! {
            accepted = l.accept() => {
                if let Ok((client, _)) = accepted {
                    let id = {
                        let mut n = shared.next_conn.lock().unwrap();
                        *n += 1;
                        *n
                    };
                    tokio::spawn(connection(shared.clone(), client, id));
                }
            }
            _ = refuse.changed() => {}
        }
    }
}

/// Bind the same address again (SO_REUSEADDR is set by tokio on Unix); retried briefly.
async fn rebind(addr: SocketAddr) -> TcpListener {
    let mut last = None;
    for _ in 0..200 {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the proxy cannot listen on {addr} again: {last:?}");
}

async fn connection(shared: Arc<Shared>, client: TcpStream, id: u64) {
    let mut cut = shared.cut.subscribe();
    {
        let mut open = shared.open.lock().unwrap();
        let generation = *cut.borrow_and_update();
        open.insert(id, generation);
    }
    shared.stat(|s| {
        s.connections += 1;
        s.open += 1;
    });
    let work = async {
        let upstream = match TcpStream::connect(shared.upstream).await {
            Ok(u) => u,
            Err(e) => {
                shared.event(id, "upstream refused", e.to_string());
                return;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        if shared.http {
            if let Err(e) = serve_http(&shared, id, client, upstream).await
                && e.kind() != io::ErrorKind::UnexpectedEof
            {
                shared.event(id, "closed", e.to_string());
            }
        } else {
            let (cr, cw) = client.into_split();
            let (ur, uw) = upstream.into_split();
            let frozen = || {
                shared
                    .frozen_upto
                    .lock()
                    .unwrap()
                    .is_some_and(|upto| id <= upto)
            };
            tokio::join!(relay(cr, uw, &frozen), relay(ur, cw, &frozen));
        }
    };
    tokio::select! {
        _ = work => {}
        _ = cut.changed() => {
            shared.stat(|s| s.cut += 1);
        }
    }
    shared.open.lock().unwrap().remove(&id);
    shared.stat(|s| s.open -= 1);
}

/// Copy `from` to `to` until `from` ends, then close `to`; while `frozen`, what is read is
/// dropped, and the end is not passed on (`to` stays open until the connection is cut).
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: &impl Fn() -> bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) if frozen() => {}
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    if frozen() {
        std::future::pending::<()>().await;
    }
    let _ = to.shutdown().await;
}

/// A buffered reader that hands out raw bytes: heads, lines, n bytes.
struct Buffered<R> {
    inner: R,
    buf: Vec<u8>,
}

const MAX_HEAD: usize = 1 << 20;

impl<R: AsyncRead + Unpin> Buffered<R> {
    fn new(inner: R) -> Self {
        Buffered {
            inner,
            buf: Vec::new(),
        }
    }

    /// Read more; Ok(0) at end of stream.
    async fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 16384];
        let n = self.inner.read(&mut tmp).await?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        self.buf.drain(..n).collect()
    }

    /// A message head through its blank line; None at a clean end of stream before it.
    async fn head(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                return Ok(Some(self.take(i + 4)));
            }
            if self.buf.len() > MAX_HEAD {
                return Err(io::Error::other("HTTP head over 1 MiB"));
            }
            if self.fill().await? == 0 {
                return if self.buf.iter().all(|b| b.is_ascii_whitespace()) {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
        }
    }

    /// One line through CRLF.
    async fn line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                return Ok(self.take(i + 2));
            }
            if self.buf.len() > MAX_HEAD {
                return Err(io::Error::other("line over 1 MiB"));
            }
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Exactly n bytes, passed to `out` piece by piece as they arrive.
    async fn pass(&mut self, mut n: usize, out: &mut impl FnMut(&[u8])) -> io::Result<()> {
        while n > 0 {
            if self.buf.is_empty() && self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let k = n.min(self.buf.len());
            let piece = self.take(k);
            out(&piece);
            n -= k;
        }
        Ok(())
    }

    /// Everything up to the end of the stream.
    async fn pass_to_end(&mut self, out: &mut impl FnMut(&[u8])) -> io::Result<()> {
        loop {
            if !self.buf.is_empty() {
                let piece = std::mem::take(&mut self.buf);
                out(&piece);
            }
            if self.fill().await? == 0 {
                return Ok(());
            }
        }
    }

    /// A chunked body: raw bytes (as sent) to `raw`, payload to `payload`.
    async fn chunked(
        &mut self,
        raw: &mut impl FnMut(&[u8]),
        payload: &mut impl FnMut(&[u8]),
    ) -> io::Result<()> {
        loop {
            let size_line = self.line().await?;
            raw(&size_line);
            let text = String::from_utf8_lossy(&size_line);
            let hex = text.trim().split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(hex, 16)
                .map_err(|_| io::Error::other(format!("bad chunk size {text:?}")))?;
            if size == 0 {
                // Trailers, then the blank line.
                loop {
                    let l = self.line().await?;
                    raw(&l);
                    if l == b"\r\n" {
                        return Ok(());
                    }
                }
            }
            self.pass(size, &mut |b| {
                raw(b);
                payload(b);
            })
            .await?;
            let crlf = self.line().await?;
            raw(&crlf);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[derive(PartialEq)]
enum BodyLen {
    None,
    Fixed(usize),
    Chunked,
    ToEnd,
}

fn headers_of(hs: &[httparse::Header]) -> Vec<(String, String)> {
    hs.iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

fn header<'a>(hs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    hs.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn body_len(hs: &[(String, String)]) -> io::Result<Option<BodyLen>> {
    if header(hs, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        return Ok(Some(BodyLen::Chunked));
    }
    match header(hs, "content-length") {
        Some(v) => v
            .trim()
            .parse()
            .map(|n| Some(BodyLen::Fixed(n)))
            .map_err(|_| io::Error::other(format!("bad Content-Length {v:?}"))),
        None => Ok(None),
    }
}

/// A request read from the client: what the predicates see, and the bytes to forward.
struct ReadRequest {
    req: HttpRequest,
    raw: Vec<u8>,
    http10: bool,
}

async fn read_request<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut Buffered<R>,
    client_w: &mut W,
) -> io::Result<Option<ReadRequest>> {
    let Some(head) = r.head().await? else {
        return Ok(None);
    };
    let mut hbuf = [httparse::EMPTY_HEADER; 128];
    let mut parsed = httparse::Request::new(&mut hbuf);
    // Leading blank lines (allowed between requests) are skipped by the parser.
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        other => return Err(io::Error::other(format!("bad request head: {other:?}"))),
    }
    let method = parsed.method.unwrap_or("").to_string();
    let target = parsed.path.unwrap_or("").to_string();
    let version = parsed.version.unwrap_or(1);
    let headers = headers_of(parsed.headers);
    let expect_continue =
        header(&headers, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    // The forwarded head: as sent, without Expect (the proxy answers 100 Continue itself).
    let mut raw = format!("{method} {target} HTTP/1.{version}\r\n").into_bytes();
    for (k, v) in &headers {
        if !k.eq_ignore_ascii_case("expect") {
            raw.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
    }
    raw.extend_from_slice(b"\r\n");
    if expect_continue {
        client_w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }
    let mut body = Vec::new();
    match body_len(&headers)?.unwrap_or(BodyLen::None) {
        BodyLen::Chunked => {
            let mut raw_body = Vec::new();
            r.chunked(&mut |b| raw_body.extend_from_slice(b), &mut |b| {
                body.extend_from_slice(b)
            })
            .await?;
            raw.extend_from_slice(&raw_body);
        }
        BodyLen::Fixed(n) => {
            r.pass(n, &mut |b| body.extend_from_slice(b)).await?;
            raw.extend_from_slice(&body);
        }
        BodyLen::None | BodyLen::ToEnd => {}
    }
    Ok(Some(ReadRequest {
        req: HttpRequest {
            method,
            target,
            headers,
            body,
        },
        raw,
        http10: version == 0,
    }))
}

/// Read one response from upstream and pass it to the client (`to_client`) or drop it.
/// Returns whether the connection can carry another request.
async fn relay_response<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    up: &mut Buffered<R>,
    client_w: &mut W,
    to_client: bool,
    head_request: bool,
) -> io::Result<bool> {
    loop {
        let head = up
            .head()
            .await?
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let mut hbuf = [httparse::EMPTY_HEADER; 128];
        let mut parsed = httparse::Response::new(&mut hbuf);
        match parsed.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {}
            other => return Err(io::Error::other(format!("bad response head: {other:?}"))),
        }
        let code = parsed.code.unwrap_or(0);
        let version = parsed.version.unwrap_or(1);
        let headers = headers_of(parsed.headers);
        // Write as we read; collect in `out` and flush after each piece.
        let mut out: Vec<u8> = Vec::new();
        if to_client {
            client_w.write_all(&head).await?;
        }
        if (100..200).contains(&code) {
            continue;
        }
        let len = if head_request || code == 204 || code == 304 {
            BodyLen::None
        } else {
            body_len(&headers)?.unwrap_or(BodyLen::ToEnd)
        };
        let conn = header(&headers, "connection").map(str::to_ascii_lowercase);
        let mut keep = match conn.as_deref() {
            Some(c) if c.contains("close") => false,
            Some(c) if c.contains("keep-alive") => true,
            _ => version == 1,
        };
        match len {
            BodyLen::None => {}
            BodyLen::Fixed(n) => {
                // Stream in pieces so large results do not sit in the proxy.
                let mut left = n;
                while left > 0 {
                    let k = left.min(1 << 16);
                    up.pass(k, &mut |b| out.extend_from_slice(b)).await?;
                    if to_client {
                        client_w.write_all(&out).await?;
                    }
                    out.clear();
                    left -= k;
                }
            }
            BodyLen::Chunked => relay_chunked(up, client_w, to_client).await?,
            BodyLen::ToEnd => {
                up.pass_to_end(&mut |b| out.extend_from_slice(b)).await?;
                if to_client {
                    client_w.write_all(&out).await?;
                }
                keep = false;
            }
        }
        if to_client {
            client_w.flush().await?;
        }
        return Ok(keep);
    }
}

/// A chunked response body, passed on chunk by chunk as it arrives (ClickHouse streams results
/// and progress this way).
async fn relay_chunked<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    up: &mut Buffered<R>,
    client_w: &mut W,
    to_client: bool,
) -> io::Result<()> {
    let mut out = Vec::new();
    loop {
        out.clear();
        let size_line = up.line().await?;
        out.extend_from_slice(&size_line);
        let text = String::from_utf8_lossy(&size_line);
        let hex = text.trim().split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(hex, 16)
            .map_err(|_| io::Error::other(format!("bad chunk size {text:?}")))?;
        if size == 0 {
            loop {
                let l = up.line().await?;
                out.extend_from_slice(&l);
                if l == b"\r\n" {
                    break;
                }
            }
        } else {
            up.pass(size, &mut |b| out.extend_from_slice(b)).await?;
            out.extend_from_slice(&up.line().await?);
        }
        if to_client {
            client_w.write_all(&out).await?;
            client_w.flush().await?;
        }
        if size == 0 {
            return Ok(());
        }
    }
}

async fn serve_http(
    shared: &Shared,
    id: u64,
    client: TcpStream,
    upstream: TcpStream,
) -> io::Result<()> {
    let (cr, mut cw) = client.into_split();
    let mut cr = Buffered::new(cr);
    let split = |u: TcpStream| {
        let (r, w) = u.into_split();
        (Buffered::new(r), w)
    };
    let mut up = Some(split(upstream));
    let mut release = shared.release.subscribe();
    loop {
        // Between requests, the server may close an idle keep-alive connection: then the next
        // request goes over a new one, as a client talking to the server directly would open
        // (the client's own connection stays open).
        if cr.buf.is_empty()
            && let Some((ur, _)) = up.as_mut()
        {
            tokio::select! {
                n = cr.fill() => if n? == 0 { return Ok(()) },
                n = ur.fill() => if !matches!(n, Ok(k) if k > 0) {
                    up = None;
                    shared.stat(|s| s.upstream_closed += 1);
                },
            }
        }
        let Some(rr) = read_request(&mut cr, &mut cw).await? else {
            return Ok(());
        };
        shared.stat(|s| s.requests += 1);
        let fault = shared.decide(&rr.req);
        match &fault {
            Some((Fault::DropRequest, label)) => {
                shared.stat(|s| s.dropped_requests += 1);
                shared.event(
                    id,
                    "dropped request",
                    format!("[{label}] {}", rr.req.summary()),
                );
                return Ok(());
            }
            Some((Fault::Answer(status, body), label)) => {
                shared.stat(|s| s.answered += 1);
                shared.event(
                    id,
                    "answered",
                    format!("{status} [{label}] {}", rr.req.summary()),
                );
                let head = format!(
                    "HTTP/1.1 {status} Error\r\nContent-Type: text/plain; charset=UTF-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                cw.write_all(head.as_bytes()).await?;
                cw.write_all(body.as_bytes()).await?;
                cw.flush().await?;
                return Ok(());
            }
            Some((Fault::Hold(d), label)) => {
                shared.stat(|s| s.held += 1);
                shared.event(id, "held", format!("{d:?} [{label}] {}", rr.req.summary()));
                tokio::time::sleep(*d).await;
            }
            Some((Fault::HoldThenDrop, label)) => {
                release.borrow_and_update();
                shared.stat(|s| s.held += 1);
                shared.event(
                    id,
                    "held, to drop",
                    format!("[{label}] {}", rr.req.summary()),
                );
                let _ = release.changed().await;
                shared.stat(|s| s.dropped_requests += 1);
                shared.event(id, "dropped request", rr.req.summary());
                return Ok(());
            }
            Some((Fault::HoldUntilReleased, label)) => {
                // Only releases from now on count (before `held` is visible to the test).
                release.borrow_and_update();
                shared.stat(|s| s.held += 1);
                shared.event(
                    id,
                    "held until released",
                    format!("[{label}] {}", rr.req.summary()),
                );
                let _ = release.changed().await;
                shared.event(id, "released", rr.req.summary());
            }
            _ => {}
        }
        if up.is_none() {
            up = Some(split(TcpStream::connect(shared.upstream).await?));
        }
        let (ur, uw) = up.as_mut().expect("upstream");
        uw.write_all(&rr.raw).await?;
        uw.flush().await?;
        let head_request = rr.req.method.eq_ignore_ascii_case("HEAD");
        if let Some((Fault::DropResponse, label)) = &fault {
            relay_response(ur, &mut cw, false, head_request).await?;
            shared.stat(|s| s.dropped_responses += 1);
            shared.event(
                id,
                "dropped response",
                format!("[{label}] {}", rr.req.summary()),
            );
            return Ok(());
        }
        // Counted before the client can have the answer, so a test that has it sees the count.
        shared.stat(|s| s.forwarded += 1);
        let keep = relay_response(ur, &mut cw, true, head_request).await?;
        if !keep || rr.http10 {
            return Ok(());
        }
    }
}
