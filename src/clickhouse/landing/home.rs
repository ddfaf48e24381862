//! The job's home mark beside its target, `<prefix>_home`: a token its state's job record keeps
//! too. A state kept in Postgres does not say which ClickHouse server the job landed on, and two
//! servers whose database and table have the same names (staging and prod sharing one
//! `state_url`) read the same records; the token says whose they are.

use super::Landing;
use crate::clickhouse::client::{exec_repeatable, literal, rows};
use crate::error::Result;
use std::collections::HashSet;

impl Landing {
    fn home(&self) -> String {
        self.q(&format!("{}_home", self.prefix))
    }

    /// The name of the home mark, for messages.
    pub fn home_name(&self) -> String {
        self.home()
    }

    /// The tokens of the jobs of this name that started on this server (reads only).
    pub async fn homes(&self) -> Result<HashSet<String>> {
        if !self.exists(&self.home()).await? {
            return Ok(HashSet::new());
        }
        let sql = format!("SELECT DISTINCT token FROM {}", self.home());
        Ok(rows(&self.client, &sql, "reading the job's home mark")
            .await?
            .into_iter()
            .filter_map(|r| r.into_iter().next())
            .filter(|t| !t.is_empty())
            .collect())
    }

    /// Note `token` on this server; done before the job's record names it, so a record never
    /// names a token its server lacks. Noting it twice is noting it once (`homes` reads each
    /// token once), so a lost answer is sent again.
    pub async fn note_home(&self, token: &str) -> Result<()> {
        exec_repeatable(
            &self.client,
            &format!(
                "CREATE TABLE IF NOT EXISTS {} (token String, noted DateTime DEFAULT now())
                 ENGINE = MergeTree ORDER BY token",
                self.home()
            ),
            "creating the job's home mark",
        )
        .await?;
        exec_repeatable(
            &self.client,
            &format!(
                "INSERT INTO {} (token) VALUES ({})",
                self.home(),
                literal(token)
            ),
            "noting the job's home mark",
        )
        .await
    }
}

/// A new token, 16 hex digits (`lock::token`).
pub fn new_token() -> String {
    crate::clickhouse::lock::token(8)
}
