//! The job's long queries on the server, by id. ClickHouse goes on running an `INSERT ...
//! SELECT` whose client is gone: a killed runner's chunk inserts ran on for minutes (up to 25
//! of them, 270 MiB each on 26.x), holding memory beside the runner that took over. So every
//! chunk insert carries a `query_id` made of the job's prefix (its target and name) and this
//! runner's; the runner that takes the target's lock kills whatever else runs under the job's
//! prefix (only runners that lost the lock can have sent it), and a second signal kills this
//! runner's own before the process exits.

use super::client::{exec, literal, table_rows};
use crate::error::Result;
use clickhouse::Client;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long the kill of a dead runner's queries may take before the run goes on without it.
const KILL_WAIT: Duration = Duration::from_secs(30);

/// The query ids of one job's runner.
pub struct Queries {
    /// Every runner of the job: `backfill-<hash of target and job>-`.
    job: String,
    /// This runner: the job's prefix, then a token of this process and moment.
    runner: String,
    next: AtomicU64,
}

impl Queries {
    /// `target`: the target as `database.table`; `runner`: this runner's token
    /// (`lock::token`). Letters, digits and `-` only, so that the prefixes are matched by
    /// `LIKE` as written.
    pub fn new(target: &str, job: &str, runner: &str) -> Queries {
        use sha2::{Digest, Sha256};
        let h = Sha256::digest(format!("{target}\n{job}").as_bytes());
        let job = format!("backfill-{}-", hex::encode(&h[..8]));
        Queries {
            runner: format!("{job}{runner}-"),
            job,
            next: AtomicU64::new(0),
        }
    }

    /// A fresh id for one query of this runner (a running id cannot be used twice).
    pub fn id(&self) -> String {
        format!(
            "{}{}",
            self.runner,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// `client` with a fresh query id on what it sends.
    pub fn tagged(&self, client: &Client) -> Client {
        client.clone().with_setting("query_id", self.id())
    }

    /// Kill the job's queries that are not this runner's: called with the target's lock held,
    /// they are those of runners that lost it (killed, or taken over). Waits for them to end,
    /// at most `KILL_WAIT`; how many there were.
    pub async fn kill_leftovers(&self, client: &Client) -> Result<usize> {
        let whose = format!(
            "query_id LIKE {} AND query_id NOT LIKE {}",
            literal(&format!("{}%", self.job)),
            literal(&format!("{}%", self.runner))
        );
        let running = table_rows(
            client,
            &format!("SELECT query_id FROM system.processes WHERE {whose}"),
            "finding the job's queries left running",
        )
        .await?
        .len();
        if running == 0 {
            return Ok(0);
        }
        tracing::warn!(
            "{running} query(ies) of an earlier runner of this job are still running on the \
             server: killing them"
        );
        let sql = format!("KILL QUERY WHERE {whose} SYNC");
        let kill = exec(client, &sql, "killing the job's queries left running");
        match tokio::time::timeout(KILL_WAIT, kill).await {
            Ok(r) => r?,
            Err(_) => tracing::warn!(
                "the queries left running did not end within {}s of KILL QUERY; going on",
                KILL_WAIT.as_secs()
            ),
        }
        Ok(running)
    }

    /// Have a second signal kill this runner's queries (`engine::exit_now`); `forget` the id
    /// when the job is done with.
    pub fn kill_on_exit(&self, client: &Client) -> u64 {
        let client = client.clone();
        let sql = format!(
            "KILL QUERY WHERE query_id LIKE {} ASYNC",
            literal(&format!("{}%", self.runner))
        );
        crate::engine::exit_now::register(Box::new(move || {
            let (client, sql) = (client.clone(), sql.clone());
            Box::pin(async move {
                if let Err(e) = exec(&client, &sql, "killing this runner's queries").await {
                    tracing::warn!("{e}");
                }
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_share_the_jobs_prefix_and_differ_by_runner_and_query() {
        use crate::clickhouse::lock::token;
        let a = Queries::new("db.agg", "fill", &token(4));
        let b = Queries::new("db.agg", "fill", &token(4));
        let other = Queries::new("db.agg", "fill2", &token(4));
        assert_ne!(a.runner, b.runner);
        let (a1, a2) = (a.id(), a.id());
        assert_ne!(a1, a2);
        assert!(a1.starts_with(&a.job) && a1.starts_with(&a.runner));
        assert!(b.id().starts_with(&a.job));
        assert!(!other.id().starts_with(&a.job));
        // Nothing LIKE reads as a wildcard, nothing a literal must escape.
        assert!(
            a1.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{a1}"
        );
    }
}
