//! Connection pool for a job's database: bounded size and wait, fixed session settings, TLS as
//! the URL's `sslmode` asks, and connection errors that say what to fix without ever showing the
//! password.

use super::errors::describe;
use super::tls::{self, Tls};
use crate::error::{Error, Result};
use crate::redact::redact_url;
use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use std::time::Duration;

/// Set on every new session: the forms in which dates and floats are printed, so that key
/// values read back from their text are the same values (ISO dates read the same whatever the
/// order of a date's fields; floats printed exactly). Nothing else: `where`, `statement` and
/// `verify` run in these sessions and must mean what they mean in the operator's own (psql's)
/// session, with the database's and role's time zone and date field order (sessions in UTC
/// read `created_at::date` in UTC, and the job did other rows than `where` says). A `SET`
/// after the start changes only the form of `DateStyle`, where a start-up option would also
/// reset its field order over the database's own.
const OUTPUT_FORMS: &str = "SET DateStyle = ISO; SET extra_float_digits = 3";

/// How long to wait for a TCP connection or a free pooled connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP keepalive: the first probe after this long without traffic, then one every
/// `KEEPALIVE_INTERVAL`, the connection closed after `KEEPALIVE_RETRIES` unanswered.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

/// A pool for `url`. Sessions print dates in ISO form and floats exactly (`OUTPUT_FORMS`);
/// standard string literals (as `where` was checked); and
/// `application_name` = `backfill:<job>` so DBAs can see who is working. TLS follows the
/// URL's `sslmode` and `sslrootcert` (see `tls`); the CA file is read here.
/// `read_only` sessions default to read-only transactions (`plan`, `status`, `verify`), with
/// row security off (a query a policy would apply to fails rather than run the policy).
/// `lock_timeout` (zero: the server's) bounds every lock wait of the session: a batch sets
/// its own per transaction, but the store's writes, the estimate's EXPLAIN and the preflight
/// would otherwise queue behind a migration's ACCESS EXCLUSIVE lock for as long as it is held.
pub fn pool(
    url: &str,
    job: &str,
    read_only: bool,
    size: usize,
    lock_timeout: Duration,
) -> Result<Pool> {
    let invalid = |e: String| Error::Connect(format!("{}: invalid URL: {e}", redact_url(url)));
    let (rest, tls) = tls::split_url(url).map_err(invalid)?;
    let mut cfg: tokio_postgres::Config = rest.parse().map_err(|e| invalid(format!("{e}")))?;
    let connector = tls
        .connector()
        .map_err(|e| Error::Connect(format!("cannot connect to {}: {e}", redact_url(url))))?;
    cfg.ssl_mode(tls.ssl_mode());
    if cfg.get_application_name().is_none() {
        cfg.application_name(format!("backfill:{job}"));
    }
    // standard_conforming_strings: `where` is checked as standard SQL, where a backslash in a
    // string literal is an ordinary character. A database or role set to `off` would read
    // `'a\' OR ...` as an escaped quote and let the rest of `where` out of its parentheses:
    // it comes after the URL's own `options`, so that nothing can set it otherwise.
    let mut options = format!(
        "{} -c standard_conforming_strings=on",
        cfg.get_options().unwrap_or("")
    );
    if read_only {
        // row_security off: a query a row security policy would apply to fails instead. A
        // policy's condition is planned and run with every read of its table (the estimate,
        // the sample's keys, verify), and it may call what writes where no rollback reaches.
        options.push_str(" -c default_transaction_read_only=on -c row_security=off");
    }
    if !lock_timeout.is_zero() {
        options.push_str(&format!(
            " -c lock_timeout={}",
            lock_timeout.as_millis().max(1)
        ));
    }
    cfg.options(options.trim());
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(CONNECT_TIMEOUT);
    }
    // A peer gone without a word (a network that drops packets silently) is noticed within a
    // minute, not after the two hours of the default keepalive: the socket is closed and the
    // worker reconnects. The URL's own settings win.
    if cfg.get_keepalives_idle() == Duration::from_secs(2 * 3600) {
        cfg.keepalives_idle(KEEPALIVE_IDLE);
    }
    if cfg.get_keepalives_interval().is_none() {
        cfg.keepalives_interval(KEEPALIVE_INTERVAL);
    }
    if cfg.get_keepalives_retries().is_none() {
        cfg.keepalives_retries(KEEPALIVE_RETRIES);
    }
    if cfg.get_tcp_user_timeout().is_none() {
        cfg.tcp_user_timeout(KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_RETRIES);
    }
    let manager = Manager::from_config(
        cfg,
        connector,
        ManagerConfig {
            // Verified: an idle connection is asked a round trip before it is handed out again
            // (bounded by `recycle_timeout`), so one that went silent while idle is dropped and
            // replaced instead of hanging the caller.
            recycling_method: RecyclingMethod::Verified,
        },
    );
    Pool::builder(manager)
        .post_create(Hook::async_fn(|client, _| {
            Box::pin(async move {
                client
                    .batch_execute(OUTPUT_FORMS)
                    .await
                    .map_err(HookError::Backend)
            })
        }))
        .max_size(size.max(2))
        .wait_timeout(Some(CONNECT_TIMEOUT * 3))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| Error::Connect(format!("{}: {e}", redact_url(url))))
}

/// Have a second signal cancel what `c` is running (`engine::exit_now`), over TLS as the URL
/// says. Returns the registration's id.
pub fn cancel_on_exit(c: &tokio_postgres::Client, url: &str) -> std::result::Result<u64, String> {
    let (_, tls) = tls::split_url(url)?;
    let connector = tls.connector()?;
    let token = c.cancel_token();
    Ok(crate::engine::exit_now::register(Box::new(move || {
        let (token, connector) = (token.clone(), connector.clone());
        Box::pin(async move {
            if let Err(e) = token.cancel_query(connector).await {
                tracing::debug!("cancelling a statement in flight: {e}");
            }
        })
    })))
}

/// A connection from the pool, or an error naming the (redacted) URL and what to check.
pub async fn get(pool: &Pool, url: &str) -> Result<Object> {
    pool.get().await.map_err(|e| {
        let target = redact_url(url);
        let tls = tls::split_url(url).map(|(_, t)| t).unwrap_or_default();
        let why = match &e {
            PoolError::Backend(pg) => with_hint(pg, &tls),
            PoolError::Timeout(_) => format!(
                "timed out after {}s (is the host reachable and the port right?)",
                CONNECT_TIMEOUT.as_secs()
            ),
            other => other.to_string(),
        };
        Error::Connect(format!("cannot connect to {target}: {why}"))
    })
}

fn with_hint(e: &tokio_postgres::Error, tls: &Tls) -> String {
    if let Some(why) = tls::explain(e, tls) {
        return why;
    }
    let text = describe(e);
    let hint = match e.code().map(|c| c.code()) {
        Some("28P01") | Some("28000") => {
            " — check the user and password in postgres.url (the password is not shown)"
        }
        Some("3D000") => " — check the database name in postgres.url",
        _ if text.contains("Connection refused") => {
            " — is Postgres running and listening on that host and port?"
        }
        _ => "",
    };
    format!("{text}{hint}")
}
