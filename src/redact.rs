//! Secrets never leave the process: passwords are found the way the drivers read them, kept in
//! a process-wide registry, and masked as `***` in everything printed (logs, stdout, errors).
//!
//! - `register_url` / `register_secret` / `register_spec_text`: called by `spec` while a spec
//!   is loaded, before anything about it can be printed.
//! - `redact(text)`: every registered secret, in every spelling, replaced by `***`. The log
//!   writer, the final `error:` line and `outln!` / `errln!` go through it.
//! - `redacted_url(url)`: a connection string for display, its password shown as `***`, for
//!   every form a driver accepts (URL, libpq key=value) and forms it would misread.

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::{Arc, LazyLock, RwLock};

/// What a secret is replaced with.
pub const MASK: &str = "***";

/// `println!` whose text goes through `redact` first: commands print with this. A stdout
/// that cannot be written (a pipe whose reader has gone: `| head`, a log shipper that died)
/// loses the line and nothing else: `println!` panicked there (exit 101), and `run dir/` died
/// after its first job's summary, the next jobs never started.
#[macro_export]
macro_rules! outln {
    () => { $crate::redact::write_line(false, "") };
    ($($arg:tt)*) => {
        $crate::redact::write_line(false, &$crate::redact::redact(&::std::format!($($arg)*)))
    };
}

/// `eprintln!` whose text goes through `redact` first (and, like `outln!`, never panics).
#[macro_export]
macro_rules! errln {
    () => { $crate::redact::write_line(true, "") };
    ($($arg:tt)*) => {
        $crate::redact::write_line(true, &$crate::redact::redact(&::std::format!($($arg)*)))
    };
}

/// A write to stdout has failed: nobody reads it any more (see `stdout_gone`).
static STDOUT_GONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `line` and a newline on stderr (`err`) or stdout; a failed write is ignored (and noted for
/// stdout).
pub fn write_line(err: bool, line: &str) {
    use std::io::Write;
    if err {
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    } else if writeln!(std::io::stdout().lock(), "{line}").is_err() {
        STDOUT_GONE.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether a write to stdout has failed: a command that only prints (`status --watch`) stops.
pub fn stdout_gone() -> bool {
    STDOUT_GONE.load(std::sync::atomic::Ordering::Relaxed)
}

pub use crate::{errln, outln};

/// Secrets (spellings) shorter than this many characters are masked only where they stand
/// alone, not inside a longer word or number: masking every `pw` would garble the output (a
/// temp dir `.tmpwXyz` included), and such a password hides nothing anyway.
const SHORT: usize = 4;

/// A set of secrets (each in all its spellings) and the automata that find them.
#[derive(Clone, Default)]
pub struct Redactor {
    patterns: BTreeSet<String>,
    /// Patterns of at least `SHORT` characters: masked wherever they occur.
    long: Option<AhoCorasick>,
    /// Shorter patterns: masked where they stand alone.
    short: Option<AhoCorasick>,
}

impl Redactor {
    /// A redactor for these secret values (their spellings are added).
    pub fn new<S: AsRef<str>>(secrets: impl IntoIterator<Item = S>) -> Redactor {
        let mut r = Redactor::default();
        r.add(secrets);
        r
    }

    /// Add secrets; false if all their spellings were known already.
    fn add<S: AsRef<str>>(&mut self, secrets: impl IntoIterator<Item = S>) -> bool {
        let before = self.patterns.len();
        for s in secrets {
            self.patterns.extend(spellings(s.as_ref()));
        }
        let grew = self.patterns.len() != before;
        if grew {
            self.rebuild();
        }
        grew
    }

    fn rebuild(&mut self) {
        let build = |short: bool| {
            let set: Vec<&String> = self
                .patterns
                .iter()
                .filter(|p| (p.chars().count() < SHORT) == short)
                .collect();
            // A noncontiguous NFA builds fastest; a handful of secrets needs no DFA.
            (!set.is_empty()).then(|| {
                AhoCorasick::builder()
                    .kind(Some(AhoCorasickKind::NoncontiguousNFA))
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(set)
                    .expect("secret patterns build an automaton")
            })
        };
        self.long = build(false);
        self.short = build(true);
    }

    /// `text` with every secret replaced by `***`.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        match self.run(text.as_bytes()) {
            None => Cow::Borrowed(text),
            Some(out) => Cow::Owned(
                String::from_utf8(out)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            ),
        }
    }

    /// `redact` for bytes that may not be UTF-8 (what a log writer is handed).
    pub fn redact_bytes<'a>(&self, bytes: &'a [u8]) -> Cow<'a, [u8]> {
        match self.run(bytes) {
            None => Cow::Borrowed(bytes),
            Some(out) => Cow::Owned(out),
        }
    }

    /// The input with secrets masked, or `None` if it holds none. Repeated until nothing is
    /// left, so a secret can never be reassembled from what surrounds a masked one.
    /// (Terminates: every change removes at least one character other than `*`, and secrets
    /// made only of `*` are not kept.)
    fn run(&self, input: &[u8]) -> Option<Vec<u8>> {
        let mut cur: Option<Vec<u8>> = None;
        loop {
            let mut changed = false;
            for (finder, alone_only) in [(&self.long, false), (&self.short, true)] {
                let Some(finder) = finder else { continue };
                loop {
                    let text = cur.as_deref().unwrap_or(input);
                    if !finder.is_match(text) {
                        break;
                    }
                    let mut hit = false;
                    let mut next = Vec::with_capacity(text.len());
                    finder.replace_all_with_bytes(text, &mut next, |m, found, dst| {
                        if !alone_only || stands_alone(text, m.start(), m.end()) {
                            dst.extend_from_slice(MASK.as_bytes());
                            hit = true;
                        } else {
                            dst.extend_from_slice(found);
                        }
                        true
                    });
                    if !hit {
                        break;
                    }
                    cur = Some(next);
                    changed = true;
                }
            }
            if !changed {
                return cur;
            }
        }
    }
}

/// Whether `text[start..end]` is not part of a longer word or number.
fn stands_alone(text: &[u8], start: usize, end: usize) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b >= 0x80;
    let before = start.checked_sub(1).map(|i| text[i]);
    let after = text.get(end).copied();
    !before.is_some_and(word) && !after.is_some_and(word)
}

static REGISTRY: LazyLock<RwLock<Arc<Redactor>>> = LazyLock::new(Default::default);

fn current() -> Arc<Redactor> {
    REGISTRY.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Remember a secret value: from now on `redact` hides it in every spelling.
pub fn register_secret(secret: &str) {
    register_all([secret]);
}

fn register_all<S: AsRef<str>>(secrets: impl IntoIterator<Item = S>) {
    let mut guard = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    let mut next = (**guard).clone();
    if next.add(secrets) {
        *guard = Arc::new(next);
    }
}

/// Remember every password a connection string holds or a parser could take from it.
pub fn register_url(url: &str) {
    register_all(url_secrets(url));
}

/// Remember what a spec file's text shows of its secrets before it is parsed: URLs anywhere,
/// and the values of `url:` and `password:` keys. (A YAML error quotes no line of a spec that
/// may hold a secret: `spec::load`.)
pub fn register_spec_text(text: &str) {
    let mut found: Vec<String> = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start().trim_start_matches("- ");
        for key in ["url:", "password:"] {
            if let Some(value) = trimmed.strip_prefix(key) {
                let value = unquote(value.trim());
                if key == "url:" {
                    found.extend(url_secrets(value));
                } else if !value.is_empty() && !is_var_reference(value) {
                    found.push(value.to_string());
                }
            }
        }
        found.extend(userinfo_passwords(line).into_iter().map(str::to_string));
    }
    register_all(candidates(found));
}

/// `text` with every registered secret replaced by `***`.
pub fn redact(text: &str) -> Cow<'_, str> {
    let r = current();
    match r.redact(text) {
        Cow::Borrowed(_) => Cow::Borrowed(text),
        Cow::Owned(s) => Cow::Owned(s),
    }
}

/// `redact` for bytes (log output).
pub fn redact_bytes(bytes: &[u8]) -> Cow<'_, [u8]> {
    let r = current();
    match r.redact_bytes(bytes) {
        Cow::Borrowed(_) => Cow::Borrowed(bytes),
        Cow::Owned(s) => Cow::Owned(s),
    }
}

/// A connection string for display: its password (in the userinfo, a `password=` parameter,
/// or whatever a parser could misread as one) shown as `***`. Works for URLs, libpq
/// `key=value` strings and malformed forms alike; never returns any of its passwords.
pub fn redacted_url(url: &str) -> String {
    let masked = if authority_start(url).is_none() && url.contains('=') {
        splice_mask(url, &keyword_value_spans(url, Terminators::Whitespace))
    } else {
        mask_url(url)
    };
    Redactor::new(url_secrets(url)).redact(&masked).into_owned()
}

/// The former name of `redacted_url`.
pub fn redact_url(url: &str) -> String {
    redacted_url(url)
}

/// Every password a connection string may hold: as tokio-postgres reads it (URL or key=value),
/// as the `url` crate reads it, as written, and what a misparse would take for one (the text
/// between `scheme://user:` and the first or the last `@`).
pub fn url_secrets(url: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let tls_stripped = crate::postgres::tls::split_url(url).map(|(rest, _)| rest);
    for form in std::iter::once(url.to_string()).chain(tls_stripped) {
        if let Ok(cfg) = form.parse::<tokio_postgres::Config>()
            && let Some(pw) = cfg.get_password()
        {
            found.push(String::from_utf8_lossy(pw).into_owned());
        }
    }
    if let Ok(u) = url::Url::parse(url) {
        if let Some(pw) = u.password() {
            found.push(pw.to_string());
        }
        for (k, v) in u.query_pairs() {
            if k.to_ascii_lowercase().contains("password") {
                found.push(v.into_owned());
                // `?password%3Ds3cr3t` is the key `password=s3cr3t` with no value: the secret
                // is in the key (a driver refusing the URL echoes it back).
                if let Some((_, rest)) = k.split_once('=') {
                    found.push(rest.trim().to_string());
                }
            }
        }
    }
    found.extend(userinfo_passwords(url).into_iter().map(str::to_string));
    for terminators in [Terminators::Whitespace, Terminators::Query] {
        for span in keyword_value_spans(url, terminators) {
            let written = &url[span.range.clone()];
            found.push(written.to_string());
            found.push(unescape_libpq(written));
        }
    }
    candidates(found)
}

/// Candidates as written, plus their percent-decoded forms; without empty ones, `${VAR}`
/// references, and the part of a password before an unencoded `@` when the whole is there
/// (`u:ab@cd@host` is read as password `ab`; `ab@cd` covers it wherever it could be printed,
/// and `ab` alone would mask every `ab` in the output for nothing).
fn candidates(mut found: Vec<String>) -> Vec<String> {
    let decoded: Vec<String> = found
        .iter()
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    found.extend(decoded);
    found.retain(|s| !s.is_empty() && !is_var_reference(s));
    found.sort();
    found.dedup();
    let all = found.clone();
    found.retain(|c| !all.iter().any(|d| d.starts_with(&format!("{c}@"))));
    found
}

/// The ways a secret can be spelled in output: as is, percent-encoded (upper and lower hex,
/// userinfo and form encoding), JSON- and Debug-escaped, and libpq-quoted. Secrets made only
/// of `*` are dropped: the mask itself would show them.
fn spellings(secret: &str) -> Vec<String> {
    if secret.is_empty() || secret.chars().all(|c| c == '*') {
        return Vec::new();
    }
    let encoded = utf8_percent_encode(secret, NON_ALPHANUMERIC).to_string();
    let mut out = vec![
        secret.to_string(),
        lower_hex(&encoded),
        encoded,
        url::form_urlencoded::byte_serialize(secret.as_bytes()).collect(),
    ];
    if let Ok(mut u) = url::Url::parse("http://u@h/")
        && u.set_password(Some(secret)).is_ok()
        && let Some(pw) = u.password()
    {
        out.push(pw.to_string());
    }
    let quoted = secret.replace('\\', "\\\\").replace('\'', "\\'");
    for base in [secret.to_string(), quoted] {
        let debug = strip_quotes(&format!("{base:?}"));
        let json = strip_quotes(&serde_json::to_string(&base).unwrap_or_default());
        let json_of_debug = strip_quotes(&serde_json::to_string(&debug).unwrap_or_default());
        out.extend([base, debug, json, json_of_debug]);
    }
    out.retain(|s| !s.is_empty() && !s.chars().all(|c| c == '*'));
    out
}

fn strip_quotes(s: &str) -> String {
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
        .to_string()
}

/// `%2F` -> `%2f`: some encoders write lower-case hex.
fn lower_hex(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut hex_left = 0;
    for c in encoded.chars() {
        if c == '%' {
            hex_left = 2;
            out.push(c);
        } else if hex_left > 0 {
            hex_left -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return &v[1..v.len() - 1];
        }
    }
    v
}

/// `${NAME}` alone: an unexpanded variable, not a secret.
fn is_var_reference(s: &str) -> bool {
    s.starts_with("${") && s.ends_with('}') && s[2..s.len() - 1].find(['{', '}']).is_none()
}

/// Where the authority of a URL starts: after `scheme://`, or after `scheme:` and any number
/// of slashes (the `postgres:/user:pw@host` typo). `None` unless `s` starts with a scheme.
pub(crate) fn authority_start(s: &str) -> Option<usize> {
    let colon = s.find(':')?;
    let scheme = &s[..colon];
    let is_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !is_scheme {
        return None;
    }
    let after = &s[colon + 1..];
    Some(colon + 1 + after.len() - after.trim_start_matches('/').len())
}

/// What a parser could take for the password of `scheme://user:...@host`: the text after
/// `user:` up to the first `@` and up to the last `@`; also for URLs inside a longer text.
fn userinfo_passwords(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    if let Some(start) = authority_start(s) {
        out.extend(userinfo_after(&s[start..]));
    }
    for (i, _) in s.match_indices("://") {
        out.extend(userinfo_after(&s[i + 3..]));
    }
    out
}

/// The password candidates of an authority `user:...@host...` (none without a `user:`).
fn userinfo_after(rest: &str) -> Vec<&str> {
    let Some(colon) = rest.find(':') else {
        return Vec::new();
    };
    let user = &rest[..colon];
    if user.contains(['@', '/', '?', '#']) || user.contains(char::is_whitespace) {
        return Vec::new();
    }
    let after = &rest[colon + 1..];
    let mut out = Vec::new();
    if let Some(i) = after.find('@') {
        out.push(&after[..i]);
    }
    if let Some(i) = after.rfind('@') {
        out.push(&after[..i]);
    }
    out
}

/// The URL with everything between `user:` and the last `@`, and `password=` parameters,
/// replaced by `***`.
fn mask_url(s: &str) -> String {
    let Some(start) = authority_start(s) else {
        return s.to_string();
    };
    let rest = &s[start..];
    let mut out = s[..start].to_string();
    match (rest.find(':'), rest.rfind('@')) {
        (Some(c), Some(at)) if c < at && !rest[..c].contains(['@', '/', '?', '#']) => {
            out.push_str(&rest[..c]);
            out.push(':');
            out.push_str(MASK);
            out.push_str(&rest[at..]);
        }
        _ => out.push_str(rest),
    }
    let spans = keyword_value_spans(&out, Terminators::Query);
    splice_mask(&out, &spans)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Terminators {
    /// libpq key=value: a value ends at whitespace (unless quoted).
    Whitespace,
    /// URL query: a value ends at `&`, `#` or whitespace.
    Query,
}

struct ValueSpan {
    /// The value as written (inside the quotes when quoted).
    range: Range<usize>,
}

/// The values of every `...password = value` in `s` (case-insensitive keyword, so
/// `sslpassword` too), as tokio-postgres's key=value parser or a URL query would delimit them.
/// Lenient: an unterminated quote runs to the end.
fn keyword_value_spans(s: &str, terminators: Terminators) -> Vec<ValueSpan> {
    const KEY: &[u8] = b"password";
    let b = s.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i + KEY.len() <= b.len() {
        if !b[i..i + KEY.len()].eq_ignore_ascii_case(KEY) {
            i += 1;
            continue;
        }
        let mut j = i + KEY.len();
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        if j >= b.len() || b[j] != b'=' {
            i += 1;
            continue;
        }
        j += 1;
        while terminators == Terminators::Whitespace && j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        let (start, end, next) =
            if terminators == Terminators::Whitespace && b.get(j) == Some(&b'\'') {
                let start = j + 1;
                let mut k = start;
                while k < b.len() && b[k] != b'\'' {
                    k += if b[k] == b'\\' { 2 } else { 1 };
                }
                let end = k.min(b.len());
                (start, end, end + 1)
            } else {
                let mut k = j;
                while k < b.len() {
                    let c = b[k];
                    let stop = c.is_ascii_whitespace()
                        || (terminators == Terminators::Query && matches!(c, b'&' | b'#'));
                    if stop {
                        break;
                    }
                    k += if c == b'\\' && terminators == Terminators::Whitespace {
                        2
                    } else {
                        1
                    };
                }
                let end = k.min(b.len());
                (j, end, end)
            };
        // Keep spans on character boundaries (a backslash may precede a multi-byte char).
        let end = (end..=b.len())
            .find(|&e| s.is_char_boundary(e))
            .unwrap_or(b.len());
        if end > start {
            spans.push(ValueSpan { range: start..end });
        }
        i = next.max(i + 1);
    }
    spans
}

/// `s` with each span replaced by `***`.
fn splice_mask(s: &str, spans: &[ValueSpan]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut at = 0;
    for span in spans {
        if span.range.start < at {
            continue;
        }
        out.push_str(&s[at..span.range.start]);
        out.push_str(MASK);
        at = span.range.end;
    }
    out.push_str(&s[at..]);
    out
}

/// A libpq value as written -> as read: `\x` is `x`.
fn unescape_libpq(written: &str) -> String {
    let mut out = String::with_capacity(written.len());
    let mut chars = written.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hides_passwords() {
        assert_eq!(
            redacted_url("postgres://app:s3cr3t@db:5432/prod"),
            "postgres://app:***@db:5432/prod"
        );
        assert_eq!(
            redacted_url("postgres://db/prod?user=a&password=s3cr3t"),
            "postgres://db/prod?user=a&password=***"
        );
        assert_eq!(
            redacted_url("postgres://app@db/prod"),
            "postgres://app@db/prod"
        );
        assert_eq!(redacted_url("not a url://u:pw@h"), "not a url://u:***@h");
    }

    #[test]
    fn hides_passwords_in_every_form() {
        for (url, want) in [
            (
                "host=db user=app password=s3cr3t dbname=prod",
                "host=db user=app password=*** dbname=prod",
            ),
            (
                "host=db password = 'it\\'s a secret' dbname=prod",
                "host=db password = '***' dbname=prod",
            ),
            ("postgres:/app:s3cr3t@db/prod", "postgres:/app:***@db/prod"),
            (
                "postgres://app:s3/cr?et@db/prod",
                "postgres://app:***@db/prod",
            ),
            (
                "postgres://app:s3@cr@et@db/prod",
                "postgres://app:***@db/prod",
            ),
            (
                "http://app:12/x@db:8123/prod",
                "http://app:***@db:8123/prod",
            ),
            (
                "postgres://db/prod?sslpassword=k3y&password=s3cr3t#x",
                "postgres://db/prod?sslpassword=***&password=***#x",
            ),
        ] {
            assert_eq!(redacted_url(url), want, "{url}");
        }
    }

    #[test]
    fn finds_the_password_the_driver_reads() {
        let s = url_secrets("host=h password='a\\'b c' dbname=d");
        assert!(s.contains(&"a'b c".to_string()), "{s:?}");
        let s = url_secrets("postgres://u:p%2Fw@h/d");
        assert!(s.contains(&"p/w".to_string()), "{s:?}");
        assert!(s.contains(&"p%2Fw".to_string()), "{s:?}");
        assert!(url_secrets("postgres://u@h/d").is_empty());
        for url in [
            "postgres://u@h/d?password%3Ds3cr3t",
            "postgres://u@h/d?password%3D%20s3cr3t",
        ] {
            assert!(url_secrets(url).contains(&"s3cr3t".to_string()), "{url}");
            assert!(
                !redacted_url(url).contains("s3cr3t"),
                "{}",
                redacted_url(url)
            );
        }
        assert!(url_secrets("${DATABASE_URL}").is_empty());
    }

    #[test]
    fn the_registry_redacts_everything_printed() {
        let before = redact("x_unique_secret_41 and pw%2F41");
        assert!(before.contains("x_unique_secret_41"));
        register_url("postgres://u:x_unique_secret_41@h/db");
        register_url("host=h password='pw/41' dbname=d");
        register_spec_text("clickhouse:\n  password: \"x_field_secret_41\"\n");
        for text in [
            "x_unique_secret_41 and pw%2F41 and pw/41 and x_field_secret_41",
            "{\"message\":\"x_unique_secret_41\"}",
        ] {
            let out = redact(text);
            assert!(!out.contains("secret_41") && !out.contains("41"), "{out}");
            let bytes = redact_bytes(text.as_bytes());
            assert_eq!(String::from_utf8_lossy(&bytes), out);
        }
        assert_eq!(redact("nothing to hide"), "nothing to hide");
    }

    #[test]
    fn replaces_until_nothing_is_left() {
        let r = Redactor::new(["x***"]);
        assert_eq!(r.redact("xx***"), "***");
        let r = Redactor::new(["abab"]);
        assert!(!r.redact("abababab").contains("abab"));
        // A secret of only stars cannot be hidden by a mask of stars; it is not kept.
        assert_eq!(Redactor::new(["**"]).redact("x**"), "x**");
        // A short one is masked where it stands alone, not inside words.
        let r = Redactor::new(["pw"]);
        assert_eq!(
            r.redact("pw /tmp/.tmpwXyz u:pw@h \"pw\""),
            "*** /tmp/.tmpwXyz u:***@h \"***\""
        );
    }

    #[test]
    fn spellings_cover_escapes() {
        let r = Redactor::new(["p\"w\\/ä"]);
        for text in [
            "p\"w\\/ä".to_string(),
            serde_json::to_string("p\"w\\/ä").unwrap(),
            format!("{:?}", "p\"w\\/ä"),
            utf8_percent_encode("p\"w\\/ä", NON_ALPHANUMERIC).to_string(),
            lower_hex(&utf8_percent_encode("p\"w\\/ä", NON_ALPHANUMERIC).to_string()),
        ] {
            assert!(
                !r.redact(&text).contains("w\\"),
                "{text} -> {}",
                r.redact(&text)
            );
            assert!(r.redact(&text).contains(MASK), "{text}");
        }
    }

    /// A password of any printable characters, including URL and quoting specials and unicode.
    fn password() -> impl Strategy<Value = String> {
        let special = prop::sample::select(vec![
            '/', '?', '#', '@', ':', '%', '\'', '"', '\\', ' ', '&', '=', '+', '$', '{', '}', '[',
            ']', '*', 'é', '密', '🔑',
        ]);
        let any = prop::char::range(' ', '~');
        let c = prop_oneof![any, special, prop::char::any()];
        prop::collection::vec(c, 1..24)
            .prop_map(|v| v.into_iter().collect::<String>())
            .prop_filter("printable, not only stars", |s: &String| {
                !s.chars().all(|c| c == '*') && !s.chars().any(char::is_control)
            })
    }

    /// The forms a password ends up in a connection string, properly or not.
    fn forms(pw: &str) -> Vec<String> {
        let enc = utf8_percent_encode(pw, NON_ALPHANUMERIC).to_string();
        let quoted = pw.replace('\\', "\\\\").replace('\'', "\\'");
        vec![
            format!("postgres://app:{enc}@db:5432/prod"),
            format!("postgres://app:{pw}@db:5432/prod"),
            format!("postgresql://app:{pw}@db/prod?sslmode=require"),
            format!("postgres:/app:{pw}@db/prod"),
            format!("postgres:app:{pw}@db/prod"),
            format!("postgres://db/prod?user=app&password={enc}&sslmode=disable"),
            format!("host=db user=app password='{quoted}' dbname=prod"),
            format!("http://default:{enc}@ch:8123/db"),
            format!("http://default:{pw}@ch:8123/db"),
            format!("https:/default:{pw}@ch/db"),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Whatever the form, `redacted_url` never shows the password.
        #[test]
        fn redacted_url_never_shows_the_password(
            pw in password().prop_filter("long", |p| p.chars().count() >= SHORT),
        ) {
            for url in forms(&pw) {
                let shown = redacted_url(&url);
                prop_assert!(!shown.contains(&pw), "{url:?} -> {shown:?}");
            }
        }

    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 64,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Found in the URL as `register_url` finds it, the password is gone from any text that
        /// quotes it, in any spelling: raw, as written in the URL, JSON- and Debug-escaped.
        /// (A local redactor: the process-wide one would grow with every case.)
        #[test]
        fn url_secrets_never_survive_redact(
            pw in password().prop_filter("long", |p| p.chars().count() >= SHORT),
            noise in "[ -~]{0,20}",
        ) {
            for url in forms(&pw) {
                let r = Redactor::new(url_secrets(&url));
                let texts = [
                    format!("{noise}{pw}{noise}"),
                    format!("cannot connect to {url}: refused"),
                    serde_json::json!({ "message": format!("{noise}{pw}"), "url": url })
                        .to_string(),
                    format!("{:?}", format!("error {pw} {url}")),
                ];
                for text in texts {
                    let out = r.redact(&text);
                    prop_assert!(!out.contains(&pw), "{url:?}: {text:?} -> {out:?}");
                    let bytes = r.redact_bytes(text.as_bytes());
                    prop_assert!(
                        !String::from_utf8_lossy(&bytes).contains(&pw),
                        "bytes {text:?}"
                    );
                }
            }
        }
    }
}
