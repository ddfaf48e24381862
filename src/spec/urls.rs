//! Connection URLs that a driver would misread (a one-slash typo, an unencoded `/ ? # @` in
//! the password, a ClickHouse URL whose host or port would come out wrong) are refused at
//! `validate`. Every message shows the URL redacted and says nothing about the password.

use crate::redact::{authority_start, redacted_url};
use percent_encoding::percent_decode_str;

const ENCODE: &str = "percent-encode the password (/ as %2F, ? as %3F, # as %23, @ as %40)";

/// Why tokio-postgres would misread `url` (or cannot read it as a URL at all).
pub(super) fn check_postgres(url: &str) -> Result<(), String> {
    let shown = redacted_url(url);
    let Some(scheme) = scheme_of(url, &["postgres", "postgresql"]) else {
        if authority_start(url).is_none() && url.contains('=') {
            return Err(format!(
                "{shown} is a key=value connection string; write it as a URL: \
                 postgres://user:password@host:5432/database ({ENCODE})"
            ));
        }
        return Err(format!("{shown} is not a postgres:// URL"));
    };
    let rest = two_slashes(url, scheme, &shown)?;
    userinfo(rest, &shown, &['/', '?', '#'])
}

/// Why the `url` crate would read another host, port, user or password from `url` than it
/// shows (the ClickHouse client is given what the `url` crate reads).
pub(super) fn check_clickhouse(url: &str) -> Result<(), String> {
    let shown = redacted_url(url);
    let Some(scheme) = scheme_of(url, &["http", "https"]) else {
        return Err(format!(
            "{shown}: ClickHouse is reached over http:// or https://"
        ));
    };
    let rest = two_slashes(url, scheme, &shown)?;
    // For http(s) a backslash ends the host like a slash does.
    userinfo(rest, &shown, &['/', '?', '#', '\\'])?;
    let Ok(parsed) = url::Url::parse(url) else {
        // split_url reports the parser's reason.
        return Ok(());
    };
    let wrong = || {
        Err(format!(
            "{shown}: the URL parser would read another host, port, user or password than \
             written; {ENCODE}"
        ))
    };
    let (info, host_port) = match rest.find('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let host_port = &host_port[..host_port
        .find(['/', '?', '#', '\\'])
        .unwrap_or(host_port.len())];
    let (host, port) = match host_port.rfind(':') {
        Some(i) if !host_port[i..].contains(']') => (&host_port[..i], Some(&host_port[i + 1..])),
        _ => (host_port, None),
    };
    let normal_host = url::Host::parse(host).map(|h| h.to_string()).ok();
    if normal_host.as_deref() != parsed.host_str() {
        return wrong();
    }
    if let Some(port) = port.filter(|p| !p.is_empty())
        && port.parse::<u16>().ok() != parsed.port_or_known_default()
    {
        return wrong();
    }
    let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    let (user, password) = match info.map(|i| i.split_once(':').unwrap_or((i, ""))) {
        Some((u, p)) => (decode(u), decode(p)),
        None => (String::new(), String::new()),
    };
    if decode(parsed.username()) != user || decode(parsed.password().unwrap_or("")) != password {
        return wrong();
    }
    Ok(())
}

/// The scheme of `url` among `schemes` (case-insensitive), the longest that fits.
fn scheme_of(url: &str, schemes: &[&'static str]) -> Option<&'static str> {
    let lower = url.get(..12).unwrap_or(url).to_ascii_lowercase();
    schemes
        .iter()
        .filter(|s| lower.starts_with(&format!("{s}:")))
        .max_by_key(|s| s.len())
        .copied()
}

/// The text after `scheme://`, or why the scheme is not followed by exactly `://`.
fn two_slashes<'a>(url: &'a str, scheme: &str, shown: &str) -> Result<&'a str, String> {
    let want = format!("{scheme}://");
    match url.strip_prefix(&want) {
        Some(rest) if !rest.starts_with('/') || scheme.starts_with("postgres") => Ok(rest),
        _ => Err(format!(
            "{shown}: write `{want}` (lower case, two slashes): the driver would read this \
             differently"
        )),
    }
}

/// `user:password@` may hold one `@` (its end) and none of `specials`.
fn userinfo(rest: &str, shown: &str, specials: &[char]) -> Result<(), String> {
    if rest.matches('@').count() > 1 {
        return Err(format!(
            "{shown}: more than one `@`: the driver would take part of the password for the \
             host; {ENCODE}"
        ));
    }
    if let Some(at) = rest.find('@')
        && rest[..at].contains(specials)
    {
        let list: Vec<String> = specials.iter().map(|c| c.to_string()).collect();
        return Err(format!(
            "{shown}: the user:password part before `@` holds one of {} unencoded, so the \
             driver would read another host, port or password; {ENCODE}",
            list.join(" ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_forms() {
        for ok in [
            "postgres://u:pw@h:5432/db",
            "postgresql://u:p%2F%3F%23%40w@h/db?sslmode=require",
            "postgres://u@h/db",
            "postgres://h/db",
            "postgres:///db",
            "postgres://u:p:w@h/db",
            "postgres://u:p w%@h/db",
        ] {
            assert_eq!(check_postgres(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("postgres:/u:pw@h/db", "two slashes"),
            ("postgres:u:pw@h/db", "two slashes"),
            ("Postgres://u:pw@h/db", "two slashes"),
            ("host=h user=u password=pw dbname=db", "key=value"),
            ("mysql://u:pw@h/db", "not a postgres:// URL"),
            ("postgres://u:p/w@h/db", "percent-encode"),
            ("postgres://u:p?w@h/db", "percent-encode"),
            ("postgres://u:p#w@h/db", "percent-encode"),
            ("postgres://u:p@w@h/db", "more than one `@`"),
            ("postgres://h/db?application_name=a@b", "percent-encode"),
        ] {
            let e = check_postgres(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains("pw") && !e.contains("p/w"), "{bad}: {e}");
        }
    }

    #[test]
    fn clickhouse_forms() {
        for ok in [
            "http://h:8123/db",
            "https://u:p%2Fw@h:8443/db",
            "http://u:p%40w@[::1]:8123",
            "http://default@127.0.0.1:8123/default",
            "http://u:p w@h:8123/db",
        ] {
            assert_eq!(check_clickhouse(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("http:/u:pw@h:8123/db", "two slashes"),
            ("http:///h:8123/db", "two slashes"),
            ("ftp://u:pw@h/db", "http:// or https://"),
            ("http://u:12/pw@h:8123/db", "percent-encode"),
            ("http://u:8123?pw@h:8123/db", "percent-encode"),
            ("http://u:pw#x@h:8123/db", "percent-encode"),
            ("http://u:p\\w@h:8123/db", "percent-encode"),
            ("http://u:p@w@h:8123/db", "more than one `@`"),
        ] {
            let e = check_clickhouse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains("pw") && !e.contains("p@w"), "{bad}: {e}");
        }
    }
}
