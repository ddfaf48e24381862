//! The SQL of one batch, built once per job from the resolved table and spec.

use super::table::TableInfo;
use crate::spec::{Limits, LockMode};
use std::time::Duration;

/// Every statement a Postgres job runs, as text (prepared and cached per connection).
#[derive(Debug, Clone)]
pub struct BatchSql {
    /// `BEGIN` plus the per-batch `SET LOCAL` timeouts, sent in one round trip.
    pub begin: String,
    /// Next keys from the start. $1 size, $2 job (skip_locked only).
    /// Returns (keys, last key as text, keys walked, keys skipped).
    pub first: String,
    /// Next keys after the cursor: as `first`, then the cursor (text) as the last param.
    pub after: String,
    /// Keys only, no locks and no writes (for `plan`'s sample batches). $1 size, $2 cursor.
    /// Returns (keys, last key as text, count).
    pub sample_first: String,
    pub sample_after: String,
    /// Skipped keys to retry. $1 job, $2 after (text or NULL), $3 limit.
    pub pending: String,
    /// Lock skipped keys again, skipping those still locked. $1 text[].
    pub relock_skip: String,
    /// Lock skipped keys again, waiting up to lock_timeout. $1 text[].
    pub relock_wait: String,
    /// Of $1 text[], those still matching `where` and not in $2 (the keys we locked).
    pub still_needed: String,
    /// Forget retried keys. $1 job, $2 text[].
    pub forget: String,
    /// Advance the checkpoint (see `state::postgres::advance_sql`).
    pub advance: String,
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

impl BatchSql {
    pub fn new(t: &TableInfo, lock: LockMode, limits: &Limits, state_schema: &str) -> BatchSql {
        let (rel, key, ty, filter) = (&t.rel, &t.key, &t.key_type, &t.filter);
        // plan_cache_mode: `statement` is prepared once; after five runs Postgres would switch to
        // a generic plan that cannot see how many keys $1 holds (nested loops over 30k keys).
        let begin = format!(
            "BEGIN; SET LOCAL statement_timeout = {}; SET LOCAL lock_timeout = {}; \
             SET LOCAL idle_in_transaction_session_timeout = {}; \
             SET LOCAL plan_cache_mode = force_custom_plan",
            ms(limits.statement_timeout),
            ms(limits.lock_timeout),
            ms(limits.idle_in_transaction_session_timeout)
        );
        // Params: $1 size, then (skip_locked only) $2 job, then the cursor.
        let cursor_param = if lock == LockMode::SkipLocked { 3 } else { 2 };
        let select = |cursor: &str| match lock {
            // Lock first: the next `size` rows that can be locked, in one index range scan.
            // Then one unlocked scan up to the last locked key finds what SKIP LOCKED passed
            // over; those keys are recorded for the retry pass (only computed when some were).
            // If nothing could be locked, every remaining row is held by others: `seen` then
            // covers all of them, so the cursor never moves past a row nobody recorded.
            LockMode::SkipLocked => format!(
                "WITH locked AS (
                     SELECT {key} AS k FROM {rel} WHERE {cursor} ({filter})
                      ORDER BY {key} LIMIT $1 FOR UPDATE SKIP LOCKED
                 ), seen AS (
                     SELECT {key} AS k FROM {rel} WHERE {cursor} ({filter})
                        AND {key} <= coalesce(
                            (SELECT l.k FROM locked l ORDER BY l.k DESC LIMIT 1),
                            (SELECT {key} FROM {rel} ORDER BY {key} DESC LIMIT 1))
                 ), skipped AS (
                     INSERT INTO {state_schema}.skipped_keys (job, key)
                     SELECT $2, s.k::text FROM seen s
                      WHERE (SELECT count(*) FROM seen) > (SELECT count(*) FROM locked)
                        AND s.k NOT IN (SELECT l.k FROM locked l)
                     ON CONFLICT DO NOTHING RETURNING 1
                 )
                 SELECT (SELECT array_agg(k ORDER BY k) FROM locked),
                        (SELECT s.k::text AS last_key FROM seen s ORDER BY s.k DESC LIMIT 1),
                        (SELECT count(*) FROM seen),
                        (SELECT count(*) FROM skipped)"
            ),
            LockMode::None => format!(
                "WITH range AS (
                     SELECT {key} AS k FROM {rel} WHERE {cursor} ({filter}) ORDER BY {key} LIMIT $1
                 )
                 SELECT (SELECT array_agg(k ORDER BY k) FROM range),
                        (SELECT k::text AS last_key FROM range ORDER BY range.k DESC LIMIT 1),
                        (SELECT count(*) FROM range),
                        0::bigint"
            ),
        };
        let sample = |cursor: &str| {
            format!(
                "SELECT array_agg(k ORDER BY k), (array_agg(k::text ORDER BY k DESC))[1], count(*) FROM (
                     SELECT {key} AS k FROM {rel}
                      WHERE {cursor} ({filter}) ORDER BY {key} LIMIT $1) s"
            )
        };
        let relock = |wait: bool| {
            format!(
                "SELECT array_agg(k ORDER BY k), array_agg(k::text ORDER BY k) FROM (
                     SELECT {key} AS k FROM {rel}
                      WHERE {key} = ANY(CAST($1::text[] AS {ty}[])) AND ({filter})
                      ORDER BY {key} FOR UPDATE{}) s",
                if wait { "" } else { " SKIP LOCKED" }
            )
        };
        BatchSql {
            begin,
            first: select(""),
            after: select(&format!("{key} > CAST(${cursor_param}::text AS {ty}) AND")),
            sample_first: sample(""),
            sample_after: sample(&format!("{key} > CAST($2::text AS {ty}) AND")),
            pending: format!(
                "SELECT key FROM {state_schema}.skipped_keys
                  WHERE job = $1 AND ($2::text IS NULL OR key > $2) ORDER BY key LIMIT $3"
            ),
            relock_skip: relock(false),
            relock_wait: relock(true),
            still_needed: format!(
                "SELECT coalesce(array_agg(k::text), '{{}}') FROM (
                     SELECT {key} AS k FROM {rel}
                      WHERE {key} = ANY(CAST($1::text[] AS {ty}[])) AND ({filter})) s
                  WHERE NOT (k = ANY(CAST($2::text[] AS {ty}[])))"
            ),
            forget: format!(
                "DELETE FROM {state_schema}.skipped_keys WHERE job = $1 AND key = ANY($2::text[])"
            ),
            advance: crate::state::postgres::advance_sql(state_schema),
        }
    }
}
