//! The Postgres throttle probe: replication lag, active backends, and a custom query, read on a
//! connection of its own so it never waits behind a batch, under timeouts of its own so that a
//! probe stuck behind a lock ends (and counts as "pause") instead of hanging.

use super::connect;
use super::errors::db_error;
use crate::engine::Probe;
use crate::error::{Error, Result};
use crate::spec::Throttle;
use deadpool_postgres::{ClientWrapper, Object, Pool};

/// How long one probe query may wait for a lock, and run, before it fails (and the job pauses).
const PROBE_LOCK_TIMEOUT_MS: u64 = 1000;
const PROBE_STATEMENT_TIMEOUT_MS: u64 = 5000;

pub struct PgProbe {
    pool: Pool,
    url: String,
    /// The job's application_name: its own connections are not load to throttle on.
    app: String,
    spec: Throttle,
    /// Out of the pool: its session carries the probe's timeouts.
    conn: Option<ClientWrapper>,
}

impl PgProbe {
    pub fn new(pool: Pool, url: &str, job: &str, spec: Throttle) -> PgProbe {
        PgProbe {
            pool,
            url: url.to_string(),
            app: format!("backfill:{job}"),
            spec,
            conn: None,
        }
    }

    async fn reasons(&mut self) -> Result<Option<String>> {
        if self.conn.is_none() {
            let c = Object::take(connect::get(&self.pool, &self.url).await?);
            // Read-only: the probe only looks (a `throttle.query` that writes, a data-modifying
            // CTE, fails instead of writing every interval).
            c.batch_execute(&format!(
                "SET statement_timeout = {PROBE_STATEMENT_TIMEOUT_MS}; \
                 SET lock_timeout = {PROBE_LOCK_TIMEOUT_MS}; \
                 SET default_transaction_read_only = on"
            ))
            .await
            .map_err(|e| db_error("throttle: setting the probe's timeouts", &e))?;
            self.conn = Some(c);
        }
        let c = self.conn.as_ref().expect("connected above");
        if let Some(max) = self.spec.max_replication_lag {
            // On a primary: the slowest standby's replay lag. On a standby: its own.
            let lag: Option<f64> = c
                .query_one(
                    "SELECT CASE WHEN pg_is_in_recovery()
                         THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8
                         ELSE (SELECT max(extract(epoch FROM replay_lag))::float8
                                 FROM pg_stat_replication) END",
                    &[],
                )
                .await
                .map_err(|e| db_error("throttle: reading replication lag", &e))?
                .get(0);
            if let Some(lag) = lag.filter(|l| *l > max.as_secs_f64()) {
                return Ok(Some(format!(
                    "replication lag {lag:.1}s > max_replication_lag {}s",
                    max.as_secs_f64()
                )));
            }
        }
        if let Some(max) = self.spec.max_active_backends {
            let active: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE state = 'active' AND backend_type = 'client backend'
                        AND pid <> pg_backend_pid() AND application_name <> $1",
                    &[&self.app],
                )
                .await
                .map_err(|e| db_error("throttle: counting active backends", &e))?
                .get(0);
            if active > i64::from(max) {
                return Ok(Some(format!(
                    "{active} active backends > max_active_backends {max}"
                )));
            }
        }
        if let Some(q) = &self.spec.query {
            let row = c
                .query_one(q.as_str(), &[])
                .await
                .map_err(|e| db_error("throttle.query", &e))?;
            let pause: Option<bool> = row.try_get(0).map_err(|_| {
                Error::Preflight(
                    "throttle.query must return one row with one boolean column (true = pause)"
                        .into(),
                )
            })?;
            if pause == Some(true) {
                return Ok(Some("throttle.query returned true".into()));
            }
        }
        Ok(None)
    }
}

impl Probe for PgProbe {
    async fn check(&mut self) -> Result<Option<String>> {
        let r = self.reasons().await;
        if r.is_err() {
            // Start from a fresh connection next time.
            self.conn = None;
        }
        r
    }
}
