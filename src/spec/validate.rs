//! Checks a parsed spec without touching a database, and builds the validated `Spec`.

use super::duration::Dur;
use super::env::expand;
use super::load::Env;
use super::raw::{Count, RawBatch, RawLimits, RawPostgres, RawSpec, RawThrottle};
use super::{Batch, Limits, PostgresSpec, Source, Spec, Throttle};
use crate::error::{Error, Result};
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::Duration;

pub(super) struct Ctx<'a> {
    path: &'a Path,
    env: &'a Env<'a>,
    pub(super) unresolved: Vec<String>,
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
        self.text_or_unset(s, field).map(|(value, _)| value)
    }

    /// `text`, and whether every `${VAR}` in it was set: `false` only where unset variables
    /// are allowed (`validate`), and then the value is the text as written. Whether a value is
    /// a template is known here, never guessed from it: an expanded value may contain `${`
    /// itself (a password, say).
    pub(super) fn text_or_unset(
        &mut self,
        s: &Spanned<String>,
        field: &str,
    ) -> Result<(String, bool)> {
        let (value, resolved) = match expand(&s.value, self.env.lookup) {
            Ok(v) => (v, true),
            Err(var) if self.env.allow_unset => {
                self.unresolved.push(format!("{field}: ${{{var}}}"));
                (s.value.clone(), false)
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
        Ok((value, resolved))
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
    let walk_ahead = raw
        .batch
        .as_ref()
        .and_then(|b| b.value.walk_ahead.as_ref().filter(|w| w.value).cloned());
    let batch = batch(&cx, raw.batch.as_ref())?;
    let postgres = matches!(source, Source::Postgres(_));
    let limits = limits(&cx, &raw.limits.unwrap_or_default(), postgres)?;
    if let Some(w) = &walk_ahead {
        // The batch walked ahead holds its locks and waits, idle in its transaction, for the
        // statement before it: not through a pause, and not past the idle limit.
        if !batch.pause.is_zero() {
            return cx.at(
                w,
                "batch.walk_ahead",
                "cannot go with batch.pause: the rows locked for the next batch would stay \
                 locked through every pause"
                    .to_string(),
            );
        }
        // Zero is no limit.
        let (idle, statement) = (
            limits.idle_in_transaction_session_timeout,
            limits.statement_timeout,
        );
        if !idle.is_zero() && (statement.is_zero() || idle <= statement) {
            return cx.at(
                w,
                "batch.walk_ahead",
                "needs limits.idle_in_transaction_session_timeout above \
                 limits.statement_timeout: the batch walked ahead waits, idle in its \
                 transaction, for the statement before it"
                    .to_string(),
            );
        }
    }
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
            // With `state_url`, in the Postgres schema `backfill`; else ClickHouse keeps its
            // state table in the job's database unless told otherwise.
            Source::Clickhouse(ch) if ch.state_url.is_some() => "backfill".to_string(),
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
        Some(w) if w.value.0 == 0 || w.value.0 > 256 => {
            return cx.at(
                w,
                "workers",
                format!("{} is not between 1 and 256", w.value.0),
            );
        }
        Some(w) => w.value.0 as u32,
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
    let (hash, hash_as_written) = match &source {
        Source::Postgres(pg) => {
            let lock = match pg.lock {
                super::LockMode::SkipLocked => "skip_locked",
                super::LockMode::None => "none",
            };
            let where_ = pg.where_.as_deref().unwrap_or("");
            (
                // `<what it does>.<where>`: the SQL, canonical; then the table and key as
                // written, so that a done job whose table was edited is said to have changed.
                // Twins are found by the first part alone, next to the table and key as the
                // server resolves them (`walks`): `t` and `public.t` are one table there.
                format!(
                    "{}.{}",
                    hash(&[
                        "postgres",
                        &super::canonical::expression(where_),
                        &super::canonical::statement(&pg.statement),
                        lock,
                    ]),
                    hash(&[&pg.table, &pg.key])
                ),
                hash(&[
                    "postgres",
                    &pg.table,
                    &pg.key,
                    where_,
                    pg.statement.trim(),
                    lock,
                ]),
            )
        }
        Source::Clickhouse(ch) => {
            let h = super::clickhouse::hash(ch);
            (h.clone(), h)
        }
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
        hash_as_written,
        unresolved: cx.unresolved,
    })
}

/// A Postgres connection URL (`postgres.url`, `clickhouse.state_url`): its password registered
/// for redaction before anything can print it, and refused (naming `field`) when a driver
/// would misread it or it names no database. A URL with an unset `${VAR}` is checked once the
/// variable is known (`validate` without the secret keeps going).
pub(super) fn postgres_url(cx: &mut Ctx, at: &Spanned<String>, field: &str) -> Result<String> {
    let (url, resolved) = cx.text_or_unset(at, field)?;
    // Before anything can print it: the password, however the URL is written.
    crate::redact::register_url(&url);
    if !resolved {
        return Ok(url);
    }
    super::urls::check_postgres(&url).or_else(|why| cx.at(at, field, why))?;
    // sslmode/sslrootcert are ours (tokio-postgres knows no verify-ca/verify-full).
    let parsed = crate::postgres::tls::split_url(&url).and_then(|(rest, _)| {
        rest.parse::<tokio_postgres::Config>()
            .map_err(|e| e.to_string())
    });
    let shown = crate::redact::redacted_url(&url);
    match parsed {
        Err(e) => cx.at(at, field, format!("{shown} does not parse: {e}")),
        // libpq would quietly use the user's name as the database: say which one instead.
        Ok(cfg) if cfg.get_dbname().is_none_or(str::is_empty) => cx.at(
            at,
            field,
            format!("{shown} has no database name (postgres://user@host:5432/DATABASE)"),
        ),
        Ok(_) => Ok(url),
    }
}

fn postgres(cx: &mut Ctx, pg: &Spanned<RawPostgres>) -> Result<PostgresSpec> {
    let p = &pg.value;
    let url = postgres_url(cx, &p.url, "postgres.url")?;
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
        Some(w) => {
            let unresolved = cx.unresolved.len();
            let text = cx.text(w, "postgres.where")?;
            // Checked once its ${VAR}s are known (`validate` without them cannot).
            if cx.unresolved.len() == unresolved {
                super::where_expr::check(&text).or_else(|why| cx.at(w, "postgres.where", why))?;
            }
            Some(text)
        }
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

/// A number or duration as written, with where it was written (if it was).
struct Value<T> {
    value: T,
    /// Line and column.
    place: Option<(u64, u64)>,
    field: &'static str,
}

impl<T: Copy> Value<T> {
    fn new(raw: Option<&Spanned<T>>, default: T, field: &'static str) -> Self {
        Value {
            value: raw.map_or(default, |s| s.value),
            place: raw.map(|s| (s.referenced.line(), s.referenced.column())),
            field,
        }
    }

    fn map<U>(self, f: impl FnOnce(T) -> U) -> Value<U> {
        Value {
            value: f(self.value),
            place: self.place,
            field: self.field,
        }
    }

    fn fail<R>(&self, cx: &Ctx, fallback: Option<&Spanned<RawBatch>>, why: String) -> Result<R> {
        match (self.place, fallback) {
            (Some((line, col)), _) => cx.err(line, col, self.field, why),
            (None, Some(f)) => cx.at(f, self.field, why),
            (None, None) => cx.err(0, 0, self.field, why),
        }
    }
}

impl Value<Dur> {
    fn dur(raw: Option<&Spanned<Dur>>, default: Duration, field: &'static str) -> Self {
        Value::new(raw, Dur(default), field)
    }

    /// The duration, or an error if above `max` (zero is always allowed: it means off).
    fn at_most(&self, cx: &Ctx, max: Duration, why: &str) -> Result<Duration> {
        let d = self.value.0;
        if d > max {
            return self.fail(
                cx,
                None,
                format!(
                    "{} is too long: at most {} ({why})",
                    super::format_duration(d),
                    super::format_duration(max)
                ),
            );
        }
        Ok(d)
    }
}

fn batch(cx: &Ctx, raw: Option<&Spanned<RawBatch>>) -> Result<Batch> {
    let default = RawBatch::default();
    let b = raw.map(|s| &s.value).unwrap_or(&default);
    let size = Value::new(b.size.as_ref(), Count(1000), "batch.size");
    let min = Value::new(b.min.as_ref(), Count(100.min(size.value.0)), "batch.min");
    let max = Value::new(
        b.max.as_ref(),
        Count(100_000.max(size.value.0).min(super::MAX_BATCH_SIZE)),
        "batch.max",
    );
    let [size, min, max] = [size, min, max].map(|v| v.map(|c| c.0));
    for v in [&size, &min, &max] {
        if v.value == 0 {
            return v.fail(cx, raw, "must be at least 1".into());
        }
        if v.value > super::MAX_BATCH_SIZE {
            return v.fail(
                cx,
                raw,
                format!(
                    "{} is too large: at most {} keys per batch (one batch is one transaction \
                     and its keys travel as one array)",
                    v.value,
                    super::MAX_BATCH_SIZE
                ),
            );
        }
    }
    if min.value > max.value {
        return min.fail(
            cx,
            raw,
            format!("{} is larger than batch.max {}", min.value, max.value),
        );
    }
    if size.value < min.value || size.value > max.value {
        return size.fail(
            cx,
            raw,
            format!(
                "{} is outside batch.min..batch.max ({}..{})",
                size.value, min.value, max.value
            ),
        );
    }
    let short = super::MAX_SHORT_DURATION;
    let target = Value::dur(
        b.target.as_ref(),
        Duration::from_millis(100),
        "batch.target",
    )
    .at_most(cx, short, "0 keeps the size fixed")?;
    let pause = Value::dur(b.pause.as_ref(), Duration::ZERO, "batch.pause").at_most(
        cx,
        short,
        "a pause between batches",
    )?;
    Ok(Batch {
        size: size.value,
        target,
        min: min.value,
        max: max.value,
        pause,
        walk_ahead: b.walk_ahead.as_ref().is_some_and(|w| w.value),
    })
}

/// `limits`; `postgres`: the job's batches are Postgres transactions (the lock timeout bounds
/// their waits).
fn limits(cx: &Ctx, raw: &RawLimits, postgres: bool) -> Result<Limits> {
    let pg = super::MAX_PG_TIMEOUT;
    let pg_why = "Postgres's limit; 0 = no limit";
    let long = super::MAX_LONG_DURATION;
    let timeout = |raw, default, field| Value::dur(raw, default, field).at_most(cx, pg, pg_why);
    Ok(Limits {
        statement_timeout: timeout(
            raw.statement_timeout.as_ref(),
            Duration::from_secs(30),
            "limits.statement_timeout",
        )?,
        lock_timeout: {
            let v = Value::dur(
                raw.lock_timeout.as_ref(),
                Duration::from_secs(3),
                "limits.lock_timeout",
            );
            let d = v.at_most(cx, pg, "Postgres's limit")?;
            if d.is_zero() && postgres {
                // A batch (or a retry round waiting for rows the application holds) would wait
                // for ever while holding the row locks it has already taken: the application
                // queues behind it, and nothing (not max_runtime, not SIGTERM) ends the wait.
                return v.fail(
                    cx,
                    None,
                    "0 would let a batch wait for a lock for ever while it holds the rows it has \
                     locked already, and the application queue behind it: give a bound (the \
                     default is 3s; a lock timeout is retried, then the run stops with 75)"
                        .into(),
                );
            }
            d
        },
        idle_in_transaction_session_timeout: timeout(
            raw.idle_in_transaction_session_timeout.as_ref(),
            Duration::from_secs(60),
            "limits.idle_in_transaction_session_timeout",
        )?,
        max_runtime: Some(
            Value::dur(
                raw.max_runtime.as_ref(),
                Duration::ZERO,
                "limits.max_runtime",
            )
            .at_most(cx, long, "0 = no limit")?,
        )
        .filter(|d| !d.is_zero()),
        max_transaction_age: Some(
            Value::dur(
                raw.max_transaction_age.as_ref(),
                Duration::from_secs(600),
                "limits.max_transaction_age",
            )
            .at_most(cx, long, "0 = off")?,
        )
        .filter(|d| !d.is_zero()),
    })
}

fn throttle(cx: &mut Ctx, section: &Spanned<RawThrottle>) -> Result<Throttle> {
    let t = &section.value;
    let query = match &t.query {
        Some(q) => Some(cx.text(q, "throttle.query")?),
        None => None,
    };
    let interval = Value::dur(
        t.interval.as_ref(),
        Duration::from_secs(1),
        "throttle.interval",
    );
    let interval = interval.at_most(cx, super::MAX_SHORT_DURATION, "how often to check")?;
    if interval.is_zero() {
        let at = t
            .interval
            .as_ref()
            .map_or(&section.referenced, |s| &s.referenced);
        return cx.err(
            at.line(),
            at.column(),
            "throttle.interval",
            "must be more than 0",
        );
    }
    let lag = Value::dur(
        t.max_replication_lag.as_ref(),
        Duration::ZERO,
        "throttle.max_replication_lag",
    )
    .at_most(cx, super::MAX_LONG_DURATION, "0 = off")?;
    let backends = match &t.max_active_backends {
        Some(b) if b.value.0 == 0 || b.value.0 > super::MAX_BACKENDS => {
            return cx.at(
                b,
                "throttle.max_active_backends",
                format!(
                    "{} is out of range: 1..{} (leave it out to not throttle on backends)",
                    b.value.0,
                    super::MAX_BACKENDS
                ),
            );
        }
        Some(b) => Some(u32::try_from(b.value.0).expect("bounded above")),
        None => None,
    };
    Ok(Throttle {
        max_replication_lag: Some(lag).filter(|d| !d.is_zero()),
        max_active_backends: backends,
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
