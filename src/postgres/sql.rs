//! The SQL of one job's batches and claims, built once per job from the resolved table, the
//! spec and the store. Every value travels as a parameter; only identifiers resolved by the
//! database and the `where` expression checked by a parser are spliced in.

use super::store::{RETRYING, Store};
use super::table::TableInfo;
use crate::spec::{Limits, LockMode};
use std::time::Duration;

/// Every statement a Postgres job's workers run, as text (prepared and cached per connection).
#[derive(Debug, Clone)]
pub struct BatchSql {
    /// The per-batch `SET LOCAL` timeouts, sent right after `BEGIN`.
    pub begin_locals: String,
    /// The next keys of a range after its cursor, locked.
    /// skip_locked: $1 size, $2 job, $3 range_no, $4 cursor, $5 hi (text, NULL = unbounded).
    /// none: $1 size, $2 cursor, $3 hi.
    /// Returns (keys, last key walked as text, keys walked, keys skipped, first key, last key).
    pub walk: String,
    /// `walk` of `lock: none`: the keys, unlocked. $1 size, $2 cursor, $3 hi. For a
    /// `skip_locked` job whose statement takes its rows' locks itself (`own_locks`).
    pub walk_free: String,
    /// Before such a statement: a lock timeout short enough that a row the application
    /// holds costs the batch little.
    pub try_begin: String,
    /// After it ran: the job's lock timeout back.
    pub try_keep: String,
    /// Keys only, no locks and no writes (for `plan`'s sample batches).
    /// $1 size, $2 cursor, $3 hi. Returns (keys, last key as text, count, first, last).
    pub sample: String,
    /// Skipped keys of a range to retry. $1 job, $2 range_no, $3 after (text or NULL), $4 limit.
    pub pending: String,
    /// Lock skipped keys again, skipping those still locked. $1 text[]. Returns (keys, keys as
    /// text, first key, last key).
    pub relock_skip: String,
    /// Lock skipped keys again, waiting up to lock_timeout. $1 text[].
    pub relock_wait: String,
    /// Of $1 text[], those still matching `where` and not in $2 (the keys we locked).
    pub still_needed: String,
    /// Forget retried keys. $1 job, $2 text[].
    pub forget: String,
    /// Skipped keys waiting in a range. $1 job, $2 range_no.
    pub skipped_count: String,
    /// Advance a range's checkpoint, fenced by its claim. $1 job, $2 range_no, $3 epoch,
    /// $4 cursor (NULL keeps it), $5 keys, $6 rows, $7 retried, $8 batches, $9 status (NULL
    /// keeps it). Returns the job's pause flag; no row = the claim was lost.
    pub advance: String,
    /// `advance` for a keyset batch: also fenced by the cursor the batch walked from ($10), so
    /// a batch walked ahead never commits after the batch before it rolled back.
    pub advance_walk: String,
    /// Ranges not done yet: part-walked ones first, then untouched ones, then those waiting
    /// for their retry pass. $1 job.
    pub candidates: String,
    /// Take a range whose advisory lock this session holds. $1 job, $2 range_no, $3 owner.
    /// Returns (epoch, status, cursor, hi).
    pub take: String,
    /// Give a range back, fenced. $1 job, $2 range_no, $3 epoch.
    pub release: String,
    /// The job's pause flag. $1 job.
    pub paused: String,
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// How long a statement that takes its own row locks waits for a row another transaction
/// holds before its batch locks its keys `FOR UPDATE SKIP LOCKED` instead (at most the job's
/// `lock_timeout`). Long enough for a short application transaction to end, short against a
/// batch.
const TRY_LOCK: Duration = Duration::from_millis(20);

impl BatchSql {
    pub fn new(t: &TableInfo, lock: LockMode, limits: &Limits, store: &Store) -> BatchSql {
        let (rel, key, ty, filter) = (&t.rel, &t.key, &t.key_type, &t.filter);
        let (ranges, jobs, skipped) = (store.ranges(), store.jobs(), store.skipped());
        // plan_cache_mode: statements are prepared once; after five runs Postgres would switch
        // to a generic plan that cannot see how many keys $1 holds, nor the range's bounds.
        // synchronous_commit: a batch commits without waiting for its WAL to reach the disk.
        // The batch and its checkpoint are one transaction, so a server crash can only lose
        // both together: the lost batches are done again on resume, never twice, never
        // skipped. Waiting for a flush per batch cost as much as the work of small batches.
        let begin_locals = format!(
            "SET LOCAL statement_timeout = {}; SET LOCAL lock_timeout = {}; \
             SET LOCAL idle_in_transaction_session_timeout = {}; \
             SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL synchronous_commit = off",
            ms(limits.statement_timeout),
            ms(limits.lock_timeout),
            ms(limits.idle_in_transaction_session_timeout)
        );
        let range = |c: u32, h: u32| {
            format!(
                "{key} IS NOT NULL AND (${c}::text IS NULL OR {key} > CAST(${c}::text AS {ty}))
                 AND (${h}::text IS NULL OR {key} <= CAST(${h}::text AS {ty})) AND {filter}"
            )
        };
        let walk_locked = {
            // Lock first: the next `size` rows of the range that can be locked, in one index
            // range scan. Then every key of the range up to the last locked one (or, when the
            // batch came out short, to the range's last key) that the statement's snapshot
            // holds and that was not locked (an anti-join, hashed, which spills to disk rather
            // than turn quadratic as `NOT IN` does past work_mem) is recorded for the range's
            // retry pass, so the
            // cursor never moves past a row nobody recorded. (Comparing counts instead let a
            // row locked elsewhere go unrecorded when another row's key moved into the batch
            // meanwhile: locked under its new key, which the snapshot does not hold, it made
            // the counts equal.) Aggregates go through one sorted array (every key type sorts;
            // not all have min/max), the bound through a scalar subquery (a join would put its
            // column names next to the table's, where `where` could find them ambiguous). The
            // WITH queries have names no table of the user's is expected to have: `where` may
            // name tables in subqueries, which a WITH query of the same name would shadow.
            let r = range(4, 5);
            format!(
                "WITH backfill__locked AS (
                         SELECT {key} AS k FROM {rel} WHERE {r}
                          ORDER BY {key} LIMIT $1 FOR UPDATE SKIP LOCKED
                     ), backfill__l AS (
                         SELECT a.keys, coalesce(cardinality(a.keys), 0) AS n, a.keys[1] AS lo,
                                a.keys[cardinality(a.keys)] AS hi
                           FROM (SELECT array_agg(x.k ORDER BY x.k) AS keys
                                   FROM backfill__locked x) a
                     ), backfill__top AS (
                         -- A full batch ends at its last locked key. A short one scanned to the
                         -- end of the range: then everything up to the range's last key was
                         -- seen, so a short batch means the range's walk is over.
                         SELECT CASE WHEN l.n >= $1 THEN l.hi
                                ELSE (SELECT {key} FROM {rel} WHERE {r} ORDER BY {key} DESC LIMIT 1)
                                END AS b
                           FROM backfill__l l
                     ), backfill__skipped AS (
                         INSERT INTO {skipped} (job, range_no, key)
                         SELECT $2, $3, {key}::text FROM {rel}
                          WHERE {r} AND {key} <= (SELECT t.b FROM backfill__top t)
                            AND NOT EXISTS (SELECT 1 FROM backfill__locked x
                                             WHERE x.k = {rel}.{key})
                         ON CONFLICT DO NOTHING RETURNING 1
                     )
                     SELECT l.keys, (SELECT t.b::text FROM backfill__top t),
                            l.n + (SELECT count(*) FROM backfill__skipped),
                            (SELECT count(*) FROM backfill__skipped), l.lo, l.hi
                       FROM backfill__l l"
            )
        };
        let walk_free = {
            let r = range(2, 3);
            format!(
                "WITH backfill__a AS (
                         SELECT array_agg(b.k ORDER BY b.k) AS keys FROM (
                             SELECT {key} AS k FROM {rel} WHERE {r} ORDER BY {key} LIMIT $1
                         ) b
                     )
                     SELECT a.keys, a.keys[cardinality(a.keys)]::text,
                            coalesce(cardinality(a.keys), 0)::bigint, 0::bigint,
                            a.keys[1], a.keys[cardinality(a.keys)]
                       FROM backfill__a a"
            )
        };
        let walk = match lock {
            LockMode::SkipLocked => walk_locked,
            LockMode::None => walk_free.clone(),
        };
        let r = range(2, 3);
        // plan's sample batches lock their keys as a walk does, passing over rows the
        // application holds: waiting on one would fail the plan on a busy table.
        let sample = format!(
            "WITH backfill__b AS (SELECT {key} AS k FROM {rel} WHERE {r} ORDER BY {key} LIMIT $1
                                  FOR UPDATE SKIP LOCKED)
             SELECT (SELECT array_agg(b.k ORDER BY b.k) FROM backfill__b b),
                    (SELECT b.k::text AS last_key FROM backfill__b b ORDER BY b.k DESC LIMIT 1),
                    (SELECT count(*) FROM backfill__b),
                    (SELECT b.k FROM backfill__b b ORDER BY b.k LIMIT 1),
                    (SELECT b.k FROM backfill__b b ORDER BY b.k DESC LIMIT 1)"
        );
        let relock = |wait: bool| {
            format!(
                "SELECT array_agg(s.k ORDER BY s.k), array_agg(s.k::text ORDER BY s.k),
                        (array_agg(s.k ORDER BY s.k))[1], (array_agg(s.k ORDER BY s.k DESC))[1]
                   FROM (
                     SELECT {key} AS k FROM {rel}
                      WHERE {key} = ANY(CAST($1::text[] AS {ty}[])) AND {filter}
                      ORDER BY {key} FOR UPDATE{}) s",
                if wait { "" } else { " SKIP LOCKED" }
            )
        };
        let advance = format!(
            "UPDATE {ranges} SET cursor = coalesce($4, cursor),
                    keys_done = keys_done + $5, rows_done = rows_done + $6,
                    rows_retried = rows_retried + $7, batches_done = batches_done + $8,
                    status = coalesce($9, status), heartbeat = now()
              WHERE job = $1 AND range_no = $2 AND epoch = $3"
        );
        let returning = format!("RETURNING (SELECT j.paused FROM {jobs} j WHERE j.job = $1)");
        let lock_ms = ms(limits.lock_timeout);
        let try_ms = match lock_ms {
            0 => ms(TRY_LOCK),
            n => n.min(ms(TRY_LOCK)),
        };
        BatchSql {
            begin_locals,
            walk,
            walk_free,
            try_begin: format!("SET LOCAL lock_timeout = {try_ms}"),
            try_keep: format!("SET LOCAL lock_timeout = {lock_ms}"),
            sample,
            pending: format!(
                "SELECT key FROM {skipped}
                  WHERE job = $1 AND range_no = $2 AND ($3::text IS NULL OR key > $3)
                  ORDER BY key LIMIT $4"
            ),
            relock_skip: relock(false),
            relock_wait: relock(true),
            // The recorded texts themselves, not the rows' keys as text: a key updated to an
            // equal value of another spelling (numeric 1.0 -> 1.00, a case-insensitive
            // collation) would match no recorded text, and its record would be forgotten.
            // Both comparisons are on the column, in its collation (a case-insensitive one
            // locks `abc` for a record `ABC`: compared as plain text, it stayed "still locked").
            still_needed: format!(
                "SELECT coalesce(array_agg(backfill__pending.backfill__key), '{{}}')
                   FROM unnest($1::text[]) AS backfill__pending(backfill__key)
                  WHERE EXISTS (
                      SELECT 1 FROM {rel}
                       WHERE {key} = CAST(backfill__pending.backfill__key AS {ty}) AND {filter}
                         AND NOT ({key} = ANY(CAST($2::text[] AS {ty}[]))))"
            ),
            forget: format!("DELETE FROM {skipped} WHERE job = $1 AND key = ANY($2::text[])"),
            skipped_count: format!(
                "SELECT count(*) FROM {skipped} WHERE job = $1 AND range_no = $2"
            ),
            advance: format!("{advance} {returning}"),
            advance_walk: format!(
                "{advance} AND cursor IS NOT DISTINCT FROM $10::text {returning}"
            ),
            candidates: format!(
                "SELECT range_no FROM {ranges} WHERE job = $1 AND status <> 'done'
                  ORDER BY status = '{RETRYING}', status = 'pending', range_no"
            ),
            take: format!(
                "UPDATE {ranges} SET epoch = nextval('{s}.epochs'), owner = $3, heartbeat = now(),
                        status = CASE WHEN status = 'pending' THEN 'walking' ELSE status END
                  WHERE job = $1 AND range_no = $2 AND status <> 'done'
                 RETURNING epoch, status, cursor, hi",
                s = store.schema
            ),
            release: format!(
                "UPDATE {ranges} SET owner = NULL WHERE job = $1 AND range_no = $2 AND epoch = $3"
            ),
            paused: format!("SELECT coalesce((SELECT paused FROM {jobs} WHERE job = $1), false)"),
        }
    }
}
