//! Validation of a spec's `clickhouse:` section (no server needed).

use super::ClickhouseSpec;
use super::raw::{ChunkLevel, RawClickhouse};
use super::validate::{Ctx, hash as hash_parts};
use crate::error::Result;
use chrono::NaiveDate;
use serde_saphyr::Spanned;

pub(super) fn validate(cx: &mut Ctx, ch: &Spanned<RawClickhouse>) -> Result<ClickhouseSpec> {
    let c = &ch.value;
    let (raw_url, resolved) = cx.text_or_unset(&c.url, "clickhouse.url")?;
    // Before anything can print it: the password, however the URL is written.
    crate::redact::register_url(&raw_url);
    let (endpoint, database, url_user, url_password) = if !resolved {
        // `validate` without the secret: keep going to check the rest.
        (raw_url.clone(), "default".to_string(), None, None)
    } else {
        super::urls::check_clickhouse(&raw_url)
            .and_then(|()| split_url(&raw_url))
            .or_else(|why| cx.at(&c.url, "clickhouse.url", why))?
    };
    let user = match &c.user {
        Some(u) => Some(cx.text(u, "clickhouse.user")?),
        None => url_user,
    };
    let password = match &c.password {
        Some(p) => {
            let value = cx.text(p, "clickhouse.password")?;
            crate::redact::register_secret(&value);
            Some(value)
        }
        None => url_password,
    };
    let state_url = match &c.state_url {
        Some(u) => Some(super::validate::postgres_url(
            cx,
            u,
            "clickhouse.state_url",
        )?),
        None => None,
    };
    let source = cx.text(&c.source, "clickhouse.source")?;
    let time_column = cx.text(&c.time_column, "clickhouse.time_column")?;
    let split_column = match &c.split_column {
        Some(s) => Some(cx.text(s, "clickhouse.split_column")?),
        None => None,
    };
    let from = date(cx, c.from.as_ref(), "clickhouse.from")?;
    let to = date(cx, c.to.as_ref(), "clickhouse.to")?;
    if let (Some(f), Some(t), Some(span)) = (from, to, c.to.as_ref())
        && f >= t
    {
        return cx.at(
            span,
            "clickhouse.to",
            format!("{t} is not after clickhouse.from {f} (to is exclusive)"),
        );
    }
    let chunks = match &c.chunks {
        Some(l) => {
            let levels = l.value.clone();
            let ordered = levels.windows(2).all(|w| w[0] < w[1]);
            if levels.is_empty() || !ordered {
                return cx.at(
                    l,
                    "clickhouse.chunks",
                    "list the levels coarse to fine, each once, e.g. [month, day, split]",
                );
            }
            levels
        }
        None if split_column.is_some() => {
            vec![ChunkLevel::Month, ChunkLevel::Day, ChunkLevel::Split]
        }
        None => vec![ChunkLevel::Month, ChunkLevel::Day],
    };
    if chunks.contains(&ChunkLevel::Split) && split_column.is_none() {
        let at = c.chunks.as_ref().map_or(&ch.referenced, |l| &l.referenced);
        return cx.err(
            at.line(),
            at.column(),
            "clickhouse.split_column",
            "the chunks ladder has `split`, so split_column must name the column to split by",
        );
    }
    let target = cx.text(&c.target, "clickhouse.target")?;
    for (name, field, span) in [
        (&source, "clickhouse.source", &c.source),
        (&target, "clickhouse.target", &c.target),
    ] {
        if let Some(why) = bad_table_name(name) {
            return cx.at(span, field, why);
        }
    }
    if let Some(why) = bad_table_name(&database) {
        return cx.at(
            &c.url,
            "clickhouse.url",
            format!("the database name: {why}"),
        );
    }
    let statement = cx.text(&c.statement, "clickhouse.statement")?;
    for placeholder in ["{chunk}", "{target}"] {
        if !statement.contains(placeholder) {
            return cx.at(
                &c.statement,
                "clickhouse.statement",
                format!(
                    "must use {placeholder} (the chunk's predicate and the table to insert into)"
                ),
            );
        }
    }
    // Chunks land from the staging table the statement inserts into: anything else (a
    // SELECT) would run every chunk, insert nothing, and report the job done.
    if !starts_with_insert_into_target(&statement) {
        return cx.at(
            &c.statement,
            "clickhouse.statement",
            "must be one `INSERT INTO {target} ...` statement: chunks land from the table it \
             inserts into",
        );
    }
    // The chunk is inserted into a staging table of its own, which `{target}` names: read
    // anywhere else in the statement (an anti-join against what the target holds, say), it
    // would read that empty table, not the target, and every chunk insert rows the target has.
    if statement.matches("{target}").count() > 1 {
        return cx.at(
            &c.statement,
            "clickhouse.statement",
            "uses {target} more than once: it names the chunk's staging table, where the chunk \
             is inserted, not the target; to read the target in the statement, write its name",
        );
    }
    // The engine names each chunk insert (`query_id`, the job's prefix and the runner's) to
    // find and kill what a lost runner left running: a fixed one would collide with itself.
    if let Some(v) = c.settings.get("query_id") {
        return cx.at(
            v,
            "clickhouse.settings.query_id",
            "is set by the engine on every chunk insert (backfill-<job>-<runner>-<n>), to find \
             and kill what a killed runner left running; leave it out",
        );
    }
    let settings = c
        .settings
        .iter()
        .map(|(k, v)| (k.clone(), v.value.as_text()))
        .collect();
    let verify = match &c.verify {
        Some(v) => {
            let sql = cx.text(v, "clickhouse.verify")?;
            if let Some(why) = super::ch_verify::refusal(&sql, &[]) {
                return cx.at(v, "clickhouse.verify", why);
            }
            Some(sql)
        }
        None => None,
    };
    Ok(ClickhouseSpec {
        endpoint,
        database,
        user,
        password,
        state_url,
        source,
        time_column,
        split_column,
        from,
        to,
        chunks,
        target,
        settings,
        statement,
        verify,
        land_without_views: c.land_without_views.as_ref().is_some_and(|b| b.value),
    })
}

/// Why a table name (`table` or `db.table`, each part optionally in backticks) cannot be used:
/// a backtick or backslash inside a part would have to be escaped in every name the job builds
/// from it and read back unescaped from the server's tables; refused instead.
fn bad_table_name(name: &str) -> Option<String> {
    name.split('.')
        .map(|p| p.trim_matches('`'))
        .any(|p| p.contains('`') || p.contains('\\'))
        .then(|| {
            format!("{name:?} has a backtick or backslash inside a name, which is not supported")
        })
}

/// `INSERT INTO {target}` first, after comments and whitespace, and one statement only.
fn starts_with_insert_into_target(sql: &str) -> bool {
    let mut rest = sql.trim_start();
    loop {
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.split_once('\n').map_or("", |(_, t)| t).trim_start();
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.split_once("*/").map_or("", |(_, t)| t).trim_start();
        } else {
            break;
        }
    }
    let words: Vec<&str> = rest.split_whitespace().take(3).collect();
    let trailing = sql.trim_end().trim_end_matches(';');
    words.len() == 3
        && words[0].eq_ignore_ascii_case("insert")
        && words[1].eq_ignore_ascii_case("into")
        && words[2].starts_with("{target}")
        && !trailing.contains(';')
}

fn date(cx: &mut Ctx, v: Option<&Spanned<String>>, field: &str) -> Result<Option<NaiveDate>> {
    let Some(v) = v else { return Ok(None) };
    let text = cx.text(v, field)?;
    match NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d") {
        Ok(d) => Ok(Some(d)),
        Err(e) => cx.at(
            v,
            field,
            format!("{text:?} is not a date like 2025-11-01: {e}"),
        ),
    }
}

/// `http(s)://user:password@host:port/database` → (endpoint, database, user, password).
type UrlParts = (String, String, Option<String>, Option<String>);

fn split_url(raw: &str) -> std::result::Result<UrlParts, String> {
    let shown = crate::redact::redacted_url(raw);
    let u = url::Url::parse(raw).map_err(|e| format!("{shown} is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!(
            "{shown}: ClickHouse is reached over http:// or https://"
        ));
    }
    let host = u.host_str().ok_or_else(|| format!("{shown} has no host"))?;
    // Nothing after the path is read: a `?database=` or `?password=` would be dropped and the
    // job would run against another database, or without its password.
    if u.query().is_some() || u.fragment().is_some() {
        return Err(format!(
            "{shown}: a ClickHouse URL takes no ?parameters or #fragment (they would be \
             ignored): name the database in the path (http://host:8123/DATABASE), the user \
             and password before the host or as clickhouse.user and clickhouse.password, and \
             server settings under clickhouse.settings"
        ));
    }
    // `.` and `..` segments (also as `%2e`) are resolved by the parser before the path below
    // is read: `/analytics/..` would quietly be database `default`. Look at the path as written.
    let written = raw.split_once("://").map_or(raw, |(_, rest)| rest);
    let written = written.find('/').map_or("", |i| &written[i..]);
    let dot_segment = written.split('/').any(|seg| {
        let seg = percent_encoding::percent_decode_str(seg).decode_utf8_lossy();
        seg == "." || seg == ".."
    });
    if dot_segment {
        return Err(format!(
            "{shown}: the path must be one database name (http://host:8123/DATABASE), without \
             `.` or `..`"
        ));
    }
    let port = u.port_or_known_default().unwrap_or(8123);
    let endpoint = format!("{}://{host}:{port}", u.scheme());
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    // The path is percent-encoded like the user and password (`/%C3%BCber` is `über`).
    let database = decode(u.path().trim_matches('/'));
    let database = if database.is_empty() {
        "default".to_string()
    } else if database.contains('/') {
        return Err(format!(
            "{shown}: the path must be one database name (http://host:8123/DATABASE)"
        ));
    } else {
        database
    };
    let user = (!u.username().is_empty()).then(|| decode(u.username()));
    let password = u.password().map(decode);
    Ok((endpoint, database, user, password))
}

/// What the job does: source, columns, range, ladder, target and statement (not settings).
pub(super) fn hash(ch: &ClickhouseSpec) -> String {
    let range = format!("{:?}..{:?}", ch.from, ch.to);
    let ladder = format!("{:?}", ch.chunks);
    hash_parts(&[
        "clickhouse",
        &ch.source,
        &ch.time_column,
        ch.split_column.as_deref().unwrap_or(""),
        &range,
        &ladder,
        &ch.target,
        ch.statement.trim(),
    ])
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_url_is_read_whole_or_refused() {
        use super::split_url;
        let (endpoint, db, user, pw) =
            split_url("http://u:p%40ss@ch.local:8123/analytics").unwrap();
        assert_eq!(
            (
                endpoint.as_str(),
                db.as_str(),
                user.as_deref(),
                pw.as_deref()
            ),
            ("http://ch.local:8123", "analytics", Some("u"), Some("p@ss"))
        );
        assert_eq!(split_url("https://ch.local:8443/").unwrap().1, "default");
        // Parameters would be dropped: the job would run against `default`, or unauthenticated.
        for url in [
            "http://127.0.0.1:8123/?database=analytics",
            "http://127.0.0.1:8123/analytics?password=secret1",
            "http://127.0.0.1:8123/analytics#x",
            "http://127.0.0.1:8123/analytics/extra",
            "http://127.0.0.1:8123/analytics/..",
            "http://127.0.0.1:8123/analytics/%2e%2E",
            "http://127.0.0.1:8123/other/../analytics",
            "http://127.0.0.1:8123/./analytics",
        ] {
            let why = split_url(url).expect_err(url);
            assert!(!why.contains("secret1"), "{why}");
        }
    }

    #[test]
    fn the_statement_inserts_into_the_target() {
        use super::starts_with_insert_into_target as ok;
        assert!(ok("INSERT INTO {target} SELECT 1 FROM t WHERE {chunk}"));
        assert!(ok(
            "-- fill it\n  insert into {target} (a) SELECT a FROM t WHERE {chunk};"
        ));
        assert!(!ok("SELECT * FROM t WHERE {chunk} -- {target}"));
        assert!(!ok(
            "INSERT INTO other SELECT * FROM {target} WHERE {chunk}"
        ));
        assert!(!ok(
            "INSERT INTO {target} SELECT 1 WHERE {chunk}; DROP TABLE x"
        ));
    }
}
