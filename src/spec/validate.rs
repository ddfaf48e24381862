//! Checks a parsed spec without touching a database, and builds the validated `Spec`.

use super::env::expand;
use super::load::Env;
use super::raw::{RawBatch, RawLimits, RawPostgres, RawSpec, RawThrottle};
use super::{Batch, Limits, PostgresSpec, Source, Spec, Throttle};
use crate::error::{Error, Result};
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::Duration;

pub(super) struct Ctx<'a> {
    path: &'a Path,
    env: &'a Env<'a>,
    unresolved: Vec<String>,
}

impl Ctx<'_> {
    pub(super) fn err<T>(
        &self,
        line: u64,
        col: u64,
        field: &str,
        why: impl std::fmt::Display,
    ) -> Result<T> {
        let place = if line > 0 {
            format!("{}:{line}:{col}", self.path.display())
        } else {
            self.path.display().to_string()
        };
        Err(Error::Spec(format!("{place}: field `{field}`: {why}")))
    }

    pub(super) fn at<T, U>(
        &self,
        s: &Spanned<U>,
        field: &str,
        why: impl std::fmt::Display,
    ) -> Result<T> {
        self.err(s.referenced.line(), s.referenced.column(), field, why)
    }

    /// Expand `${VAR}`s in a string field; reject it if empty afterwards.
    pub(super) fn text(&mut self, s: &Spanned<String>, field: &str) -> Result<String> {
        let value = match expand(&s.value, self.env.lookup) {
            Ok(v) => v,
            Err(var) if self.env.allow_unset => {
                self.unresolved.push(format!("{field}: ${{{var}}}"));
                s.value.clone()
            }
            Err(var) => {
                return self.at(
                    s,
                    field,
                    format!(
                        "environment variable {var} is not set (write ${{{var}:-default}} for a default)"
                    ),
                );
            }
        };
        if value.trim().is_empty() {
            return self.at(s, field, "must not be empty");
        }
        Ok(value)
    }
}

pub(super) fn validate(path: &Path, raw: RawSpec, env: &Env) -> Result<Spec> {
    let mut cx = Ctx {
        path,
        env,
        unresolved: Vec::new(),
    };
    let name = match &raw.name {
        Some(n) => cx.text(n, "name")?,
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        let why = format!("job name {name:?} may only use letters, digits, '-', '_' and '.'");
        return match &raw.name {
            Some(n) => cx.at(n, "name", why),
            None => cx.err(0, 0, "name", why),
        };
    }
    let source = match (&raw.postgres, &raw.clickhouse) {
        (Some(pg), None) => Source::Postgres(postgres(&mut cx, pg)?),
        (None, Some(ch)) => Source::Clickhouse(super::clickhouse::validate(&mut cx, ch)?),
        (Some(_), Some(ch)) => {
            return cx.at(
                ch,
                "clickhouse",
                "a job has either a `postgres:` or a `clickhouse:` section, not both",
            );
        }
        (None, None) => {
            return cx.err(
                1,
                1,
                "postgres",
                "missing section: a job needs a `postgres:` or a `clickhouse:` section",
            );
        }
    };
    let batch = batch(&cx, raw.batch.as_ref())?;
    let limits = limits(raw.limits.unwrap_or_default());
    let state_schema = match raw.state.and_then(|s| s.schema) {
        Some(s) => {
            let v = cx.text(&s, "state.schema")?;
            if !is_identifier(&v) {
                return cx.at(
                    &s,
                    "state.schema",
                    format!("{v:?} is not a plain identifier"),
                );
            }
            v
        }
        None => match &source {
            Source::Postgres(_) => "backfill".to_string(),
            // ClickHouse keeps its state table in the job's database unless told otherwise.
            Source::Clickhouse(ch) => ch.database.clone(),
        },
    };
    let throttle = match &raw.throttle {
        Some(t) if matches!(source, Source::Clickhouse(_)) => {
            return cx.at(t, "throttle", "throttling is for postgres jobs only");
        }
        Some(t) => Some(throttle(&mut cx, t)?),
        None => None,
    };
    let workers = match &raw.workers {
        None => 1,
        Some(w) if w.value == 0 || w.value > 256 => {
            return cx.at(
                w,
                "workers",
                format!("{} is not between 1 and 256", w.value),
            );
        }
        Some(w) => w.value as u32,
    };
    let window = match &raw.window {
        None => None,
        Some(w) => {
            let text = cx.text(w, "window")?;
            Some(
                crate::engine::window::Window::parse(&text)
                    .or_else(|why| cx.at(w, "window", why))?,
            )
        }
    };
    let hash = match &source {
        Source::Postgres(pg) => hash(&[
            "postgres",
            &pg.table,
            &pg.key,
            pg.where_.as_deref().unwrap_or(""),
            pg.statement.trim(),
            match pg.lock {
                super::LockMode::SkipLocked => "skip_locked",
                super::LockMode::None => "none",
            },
        ]),
        Source::Clickhouse(ch) => super::clickhouse::hash(ch),
    };
    Ok(Spec {
        name,
        file: path.to_path_buf(),
        source,
        batch,
        limits,
        state_schema,
        throttle,
        workers,
        window,
        hash,
        unresolved: cx.unresolved,
    })
}

fn postgres(cx: &mut Ctx, pg: &Spanned<RawPostgres>) -> Result<PostgresSpec> {
    let p = &pg.value;
    let url = cx.text(&p.url, "postgres.url")?;
    let url_resolved = !url.contains("${");
    if url_resolved {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return cx.at(
                &p.url,
                "postgres.url",
                format!(
                    "{} is not a postgres:// URL",
                    crate::redact::redact_url(&url)
                ),
            );
        }
        // sslmode/sslrootcert are ours (tokio-postgres knows no verify-ca/verify-full).
        let parsed = crate::postgres::tls::split_url(&url).and_then(|(rest, _)| {
            rest.parse::<tokio_postgres::Config>()
                .map_err(|e| e.to_string())
        });
        match parsed {
            Err(e) => {
                return cx.at(
                    &p.url,
                    "postgres.url",
                    format!("{} does not parse: {e}", crate::redact::redact_url(&url)),
                );
            }
            // libpq would quietly use the user's name as the database: say which one instead.
            Ok(cfg) if cfg.get_dbname().is_none_or(str::is_empty) => {
                return cx.at(
                    &p.url,
                    "postgres.url",
                    format!(
                        "{} has no database name (postgres://user@host:5432/DATABASE)",
                        crate::redact::redact_url(&url)
                    ),
                );
            }
            Ok(_) => {}
        }
    }
    let table = cx.text(&p.table, "postgres.table")?;
    let key = cx.text(&p.key, "postgres.key")?;
    let quoted = key.len() > 2 && key.starts_with('"') && key.ends_with('"');
    if !(is_identifier(&key) || quoted) {
        return cx.at(
            &p.key,
            "postgres.key",
            format!("{key:?} must be one column name (quote it as \"Name\" if it needs quoting)"),
        );
    }
    let where_ = match &p.where_ {
        Some(w) => Some(cx.text(w, "postgres.where")?),
        None => None,
    };
    let statement = cx.text(&p.statement, "postgres.statement")?;
    if !statement.contains("$1") {
        return cx.at(
            &p.statement,
            "postgres.statement",
            "must use $1 (the array of the batch's keys), e.g. `WHERE id = ANY($1)`",
        );
    }
    if statement.contains("$4") {
        return cx.at(
            &p.statement,
            "postgres.statement",
            "may only use $1 (the array of the batch's keys), and $2 and $3 (its first and last key)",
        );
    }
    let verify = match &p.verify {
        Some(v) => Some(cx.text(v, "postgres.verify")?),
        None => None,
    };
    Ok(PostgresSpec {
        url,
        table,
        key,
        where_,
        lock: p.lock,
        statement,
        verify,
    })
}

fn batch(cx: &Ctx, raw: Option<&Spanned<RawBatch>>) -> Result<Batch> {
    let default = RawBatch::default();
    let b = raw.map(|s| &s.value).unwrap_or(&default);
    let size = b.size.unwrap_or(1000);
    let min = b.min.unwrap_or(100.min(size));
    let max = b.max.unwrap_or(100_000.max(size));
    let fail = |field: &str, why: String| match raw {
        Some(s) => cx.at(s, field, why),
        None => cx.err(0, 0, field, why),
    };
    if size == 0 {
        return fail("batch.size", "must be at least 1".into());
    }
    if min == 0 {
        return fail("batch.min", "must be at least 1".into());
    }
    if min > max {
        return fail("batch.min", format!("{min} is larger than batch.max {max}"));
    }
    if size < min || size > max {
        return fail(
            "batch.size",
            format!("{size} is outside batch.min..batch.max ({min}..{max})"),
        );
    }
    Ok(Batch {
        size,
        target: b.target.map(|d| d.0).unwrap_or(Duration::from_millis(500)),
        min,
        max,
        pause: b.pause.map(|d| d.0).unwrap_or_default(),
    })
}

fn limits(raw: RawLimits) -> Limits {
    let statement_timeout = raw
        .statement_timeout
        .map(|d| d.0)
        .unwrap_or(Duration::from_secs(30));
    Limits {
        statement_timeout,
        lock_timeout: raw
            .lock_timeout
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(3)),
        idle_in_transaction_session_timeout: raw
            .idle_in_transaction_session_timeout
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(60)),
        max_runtime: raw.max_runtime.map(|d| d.0).filter(|d| !d.is_zero()),
        max_transaction_age: raw
            .max_transaction_age
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(600)),
    }
}

fn throttle(cx: &mut Ctx, section: &Spanned<RawThrottle>) -> Result<Throttle> {
    let t = &section.value;
    let query = match &t.query {
        Some(q) => Some(cx.text(q, "throttle.query")?),
        None => None,
    };
    let interval = t.interval.map(|d| d.0).unwrap_or(Duration::from_secs(1));
    if interval.is_zero() {
        return cx.at(section, "throttle.interval", "must be more than 0");
    }
    Ok(Throttle {
        max_replication_lag: t.max_replication_lag.map(|d| d.0).filter(|d| !d.is_zero()),
        max_active_backends: t.max_active_backends,
        query,
        interval,
    })
}

pub(super) fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// What the job does, not how fast: batch sizes, limits and the URL's host may change freely.
pub(super) fn hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    hex::encode(&h.finalize()[..8])
}
