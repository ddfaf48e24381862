//! One job per target, one runner per job: a lock table next to the target,
//! `<target>__backfill_lock`. ClickHouse has no compare-and-set, but `CREATE TABLE` (without IF
//! NOT EXISTS) succeeds for exactly one creator and `RENAME TABLE` for exactly one renamer, so
//! the lock is taken by creating the table, and taken over from a dead runner by renaming the
//! table to a name that only that runner's takeover can use.
//!
//! The table's first row names the job and the runner that holds it (`host:pid:start`); the
//! runner appends a heartbeat every few seconds. Its job keeps the target until it is done (the
//! table is dropped) or reset: between runs the lock is released for the same job only, so
//! another job can never land into a target whose chunks are half done. A runner is dead when
//! it released the lock, when it ran on this host and its process is gone, or when its
//! heartbeat is older than `TTL`; then the next runner of the same job takes over at once (or
//! after waiting out the heartbeat of a runner on another host).

use super::client::{exec, ident, literal, rows, table_rows};
use super::errors::{UNKNOWN_TABLE, code};
use crate::error::{Error, Result, StopReason};
use clickhouse::Client;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A heartbeat older than this belongs to a dead runner.
const TTL: Duration = Duration::from_secs(30);
const HEARTBEAT: Duration = Duration::from_secs(5);
const TABLE_EXISTS: u32 = 57;

/// This process: `host:pid:start:here` (the start time tells a reused pid from the same
/// process; `here` names the pid namespace and the boot, see `here`).
pub fn me() -> String {
    format!(
        "{}:{}:{}",
        crate::state::runner_id(),
        start_ticks(std::process::id()).unwrap_or(0),
        crate::state::here()
    )
}

/// A token of this runner at this moment, `bytes` bytes as hex: its host, pid namespace, pid
/// and start (`me`), and the time, hashed. Never the same for two runners, nor twice in one:
/// what names a runner's staging tables and query ids (made once per job a runner opens), and a
/// job's home mark.
pub fn token(bytes: usize) -> String {
    use sha2::{Digest, Sha256};
    let seed = format!(
        "{}:{}",
        me(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
    );
    hex::encode(&Sha256::digest(seed.as_bytes())[..bytes])
}

/// A process's start time in clock ticks since boot (`/proc/<pid>/stat`, field 22).
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// The runner `host:pid:start:here` if it ran where this process can see its pid: the same
/// host name, pid namespace and boot. `(pid, start)`.
fn seen_from_here(runner: &str) -> Option<(u32, u64)> {
    let mut it = runner.rsplitn(4, ':');
    let (Some(here_of), Some(start), Some(pid), Some(host)) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return None;
    };
    let ours = crate::state::here();
    if ours.is_empty() || here_of != ours || host != crate::state::hostname() {
        return None;
    }
    Some((pid.parse().ok()?, start.parse().ok()?))
}

/// Whether the runner is certainly gone: it ran where this process can see its pid, and that
/// process is not running any more. A runner in another pid namespace (another container
/// with the same host name) or from an older version is never taken for gone: its heartbeat
/// decides.
pub(super) fn gone_here(runner: &str) -> bool {
    seen_from_here(runner).is_some_and(|(pid, start)| start_ticks(pid) != Some(start))
}

/// Whether the runner is certainly alive: another process this process can see, still
/// running.
fn alive_here(runner: &str) -> bool {
    runner != me()
        && seen_from_here(runner).is_some_and(|(pid, start)| start_ticks(pid) == Some(start))
}

/// The holder as the lock table says.
#[derive(Debug, Clone)]
struct Holder {
    job: String,
    runner: String,
    token: String,
    /// Seconds since its last heartbeat (or release).
    age: u64,
    released: bool,
    /// Its job is done (`ChLock::mark_done`): the target is free for any job, whatever store
    /// keeps that job's state.
    done: bool,
}

impl Holder {
    /// Whether its runner is gone: it released the lock, ran on this host and its process is
    /// gone, or its heartbeat is older than `TTL`.
    fn dead(&self) -> bool {
        self.released || gone_here(&self.runner) || self.age >= TTL.as_secs()
    }

    /// Whether it is gone for a runner of its own job: as `dead`, but a runner whose job is
    /// done is still cleaning up after it (dropping the job's staging tables and landings
    /// ledger, which a runner of the same job would make again under the same names) until its
    /// process is gone, its heartbeat is older than `TTL` or it drops the lock table.
    fn gone_for_own_job(&self) -> bool {
        (self.released && !self.done) || gone_here(&self.runner) || self.age >= TTL.as_secs()
    }

    /// What a runner of this host that keeps the target is doing.
    fn busy_here(&self) -> String {
        let doing = if self.done {
            "cleaning up after the job, which is done"
        } else {
            "running"
        };
        format!(
            "runner {} on this host, {doing} (its heartbeat is {}s old)",
            self.runner, self.age
        )
    }
}

/// A held lock: dropped or released explicitly; `lost` turns true if another runner took it.
pub struct ChLock {
    client: Client,
    table: String,
    job: String,
    token: String,
    lost: Arc<AtomicBool>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Drop for ChLock {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// A target as `database.table`, unquoted (what keys its lock).
pub fn target_name(database: &str, target: &str) -> String {
    match target.split_once('.') {
        Some((d, t)) => format!("{}.{}", d.trim_matches('`'), t.trim_matches('`')),
        None => format!("{database}.{}", target.trim_matches('`')),
    }
}

/// The lock table's name for a target (`db`.`name__backfill_lock`).
pub fn table_for(database: &str, target: &str) -> String {
    let (db, t) = match target.split_once('.') {
        Some((d, t)) => (
            d.trim_matches('`').to_string(),
            t.trim_matches('`').to_string(),
        ),
        None => (database.to_string(), target.trim_matches('`').to_string()),
    };
    ident(&format!("{db}.{t}__backfill_lock"))
}

async fn holder(client: &Client, table: &str) -> Result<Option<Holder>> {
    let sql = format!(
        "SELECT job, runner, token,
                toUInt64(greatest(0, toInt64(now()) - toInt64(max(heartbeat)))),
                max(released)
           FROM (SELECT job, runner, token, heartbeat, released, rowNumberInAllBlocks() AS n
                   FROM {table})
          GROUP BY job, runner, token
          ORDER BY min(n) LIMIT 1"
    );
    match rows(client, &sql, "reading the target's lock").await {
        Ok(r) => Ok(r.into_iter().next().and_then(|r| {
            (r.len() == 5).then(|| Holder {
                job: r[0].clone(),
                runner: r[1].clone(),
                token: r[2].clone(),
                age: r[3].parse().unwrap_or(0),
                released: r[4] != "0",
                done: r[4] == DONE_MARK,
            })
        })),
        Err(e) if err_code(&e) == Some(UNKNOWN_TABLE) => Ok(None),
        Err(e) => Err(e),
    }
}

fn err_code(e: &Error) -> Option<u32> {
    code(&e.to_string())
}

/// `released` of a runner's last row that says its job is done (1: released for its next run,
/// 0: a heartbeat). A runner's rows never go back to a lower value, so its largest is its last.
const DONE_MARK: &str = "2";

async fn append(client: &Client, table: &str, job: &str, token: &str, released: u8) -> Result<()> {
    let sql = format!(
        "INSERT INTO {table} (job, runner, token, heartbeat, released) VALUES ({}, {}, {}, now(), {released})",
        literal(job),
        literal(&me()),
        literal(token),
    );
    exec(client, &sql, "writing the target's lock").await
}

/// Who keeps `job` out of the target right now, if anyone: another job, or a runner of this
/// one that is certainly running here. Reads only. A runner of this job that this process
/// cannot see (another host or container) with a heartbeat younger than `TTL` is left to
/// `acquire`, which watches its heartbeat: a killed pod's successor then takes over once the
/// TTL has passed, where this check made it exit 75 until then.
/// `done`: whether a job is done (see `acquire`).
pub async fn held_by_other(
    client: &Client,
    database: &str,
    target: &str,
    job: &str,
    done: impl AsyncFn(&str) -> Result<bool>,
) -> Result<Option<String>> {
    let table = table_for(database, target);
    Ok(match holder(client, &table).await? {
        Some(h) if h.job != job && h.dead() && (h.done || done(&h.job).await?) => None,
        Some(h) if h.job != job => Some(format!(
            "job {:?} (runner {}): it writes the same target, and one job at a time may; \
             it keeps the target until it is done or `backfill reset`",
            h.job, h.runner
        )),
        Some(h) if !h.gone_for_own_job() && alive_here(&h.runner) => Some(h.busy_here()),
        _ => None,
    })
}

/// Take the target's lock for `job`, or say who holds it (`Err(Stopped(LockHeld))`). Another
/// job keeps the target until it is done: `done` tells whether a job is, for a lock table left
/// by a job recorded done whose runner is gone (its clean-up cut short by a lost answer or a
/// kill after its record): the target is free, and the table is moved out of the way as a dead
/// runner's is. Without that, every other job on the target stopped with 75 for good.
pub async fn acquire(
    client: &Client,
    database: &str,
    target: &str,
    job: &str,
    done: impl AsyncFn(&str) -> Result<bool>,
) -> Result<ChLock> {
    let table = table_for(database, target);
    let token = format!(
        "{:x}{:x}",
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0),
        std::process::id()
    );
    let started = Instant::now();
    let mut waiting_said = false;
    let mut last_age = None;
    loop {
        let create = format!(
            "CREATE TABLE {table} (job String, runner String, token String, heartbeat DateTime,
                                   released UInt8) ENGINE = Log"
        );
        match exec(client, &create, "taking the target's lock").await {
            Ok(()) => {
                append(client, &table, job, &token, 0).await?;
                return Ok(start(client, table, job, token));
            }
            Err(e) if err_code(&e) == Some(TABLE_EXISTS) => {}
            Err(e) => return Err(e),
        }
        let Some(h) = holder(client, &table).await? else {
            // Created a moment ago by someone who has not written its row yet (or dropped in
            // between): look again shortly; an empty table older than TTL is taken over below.
            if started.elapsed() > TTL {
                take_over(client, &table, "empty").await?;
            } else {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            continue;
        };
        if h.job != job && h.dead() && (h.done || done(&h.job).await?) {
            tracing::warn!(
                "job {:?} is done but still kept the target (its clean-up was cut short): it \
                 is free for job {job:?}",
                h.job
            );
            take_over(client, &table, &h.token).await?;
            continue;
        }
        if h.job != job {
            return Err(Error::Stopped(StopReason::LockHeld(format!(
                "job {:?} (runner {}): it writes the same target, and one job at a time may; \
                 it keeps the target until it is done or `backfill reset`",
                h.job, h.runner
            ))));
        }
        if !h.gone_for_own_job() && alive_here(&h.runner) {
            // A process of this host that is running: no heartbeat to wait for.
            return Err(Error::Stopped(StopReason::LockHeld(h.busy_here())));
        }
        if h.gone_for_own_job() {
            take_over(client, &table, &h.token).await?;
            continue;
        }
        // Alive as far as we can tell: a runner this process cannot see (another host, or
        // another container of this one) whose heartbeat is fresh. Watch
        // it: a heartbeat that moves means a live runner (exit 75); one that stops moving for
        // TTL means a dead one.
        if last_age.is_some_and(|a| h.age < a) {
            return Err(Error::Stopped(StopReason::LockHeld(format!(
                "runner {} (its heartbeat is {}s old)",
                h.runner, h.age
            ))));
        }
        last_age = Some(h.age);
        if !waiting_said {
            tracing::warn!(
                "job {job} is held by runner {} on another host or container, last seen {}s \
                 ago: waiting up \
                 to {}s for its heartbeat (a live runner keeps this one out; a dead one is taken \
                 over)",
                h.runner,
                h.age,
                TTL.as_secs()
            );
            waiting_said = true;
        }
        tokio::time::sleep(HEARTBEAT + Duration::from_secs(1)).await;
    }
}

/// Move a dead holder's table out of the way. Only one renamer can win: the new name is the
/// dead holder's own, so a second takeover of the same holder finds it taken.
async fn take_over(client: &Client, table: &str, dead_token: &str) -> Result<()> {
    let safe: String = dead_token
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let gone = format!("{}_gone_{safe}`", table.trim_end_matches('`'));
    let sql = format!("RENAME TABLE {table} TO {gone}");
    // The moved table stays until the job is done or reset (`drop_table`): dropping it now
    // would free its name for a runner that saw the same dead holder and comes late.
    match exec(client, &sql, "taking over the target's lock").await {
        Ok(()) => Ok(()),
        // Someone else moved it first: look again.
        Err(e) if matches!(err_code(&e), Some(TABLE_EXISTS) | Some(UNKNOWN_TABLE)) => Ok(()),
        Err(e) => Err(e),
    }
}

fn start(client: &Client, table: String, job: &str, token: String) -> ChLock {
    let lost = Arc::new(AtomicBool::new(false));
    let (c, t, j, k, l) = (
        client.clone(),
        table.clone(),
        job.to_string(),
        token.clone(),
        lost.clone(),
    );
    let heartbeat = tokio::spawn(async move {
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            match holder(&c, &t).await {
                Ok(Some(h)) if h.token == k => {
                    if let Err(e) = append(&c, &t, &j, &k, 0).await {
                        tracing::warn!("renewing the target's lock: {e}");
                    }
                }
                Ok(_) => {
                    tracing::error!("the target's lock was taken over by another runner");
                    l.store(true, Ordering::SeqCst);
                    return;
                }
                Err(e) => tracing::warn!("reading the target's lock: {e}"),
            }
        }
    });
    ChLock {
        client: client.clone(),
        table,
        job: job.to_string(),
        token,
        lost,
        heartbeat,
    }
}

impl ChLock {
    /// Whether another runner took the lock (this one must stop writing), as the heartbeat
    /// last saw.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Whether this runner still holds the lock, read now: the heartbeat looks every few
    /// seconds, and a runner stopped (SIGSTOP, a frozen VM) for longer than the TTL resumes
    /// believing it holds a lock another runner has taken over; a failed heartbeat read kept
    /// it believing so. Every write a runner makes after a pause is checked with this first.
    pub async fn verify(&self) -> Result<bool> {
        if self.lost() {
            return Ok(false);
        }
        let ours = holder(&self.client, &self.table)
            .await?
            .is_some_and(|h| h.token == self.token && !h.released);
        if !ours {
            self.lost.store(true, Ordering::SeqCst);
        }
        Ok(ours)
    }

    /// Stop renewing; the job keeps the target (for its next run only).
    pub async fn release(&self) -> Result<()> {
        self.heartbeat.abort();
        match holder(&self.client, &self.table).await? {
            Some(h) if h.token == self.token => {
                append(&self.client, &self.table, &self.job, &self.token, 1).await
            }
            _ => Ok(()),
        }
    }

    /// The job is done (its record says so): noted in the lock table before anything else of
    /// the clean-up, so that a clean-up cut short leaves a table any job may take over, whatever
    /// store keeps this job's state (another job's runner asks only its own store whether this
    /// job is done). Only while the lock is still this runner's. The heartbeat goes on until
    /// the table is dropped: a runner of this same job waits for the clean-up to end.
    pub async fn mark_done(&self) -> Result<()> {
        match holder(&self.client, &self.table).await? {
            Some(h) if h.token == self.token => {
                append(&self.client, &self.table, &self.job, &self.token, 2).await
            }
            _ => Ok(()),
        }
    }

    /// The job is done (or reset): the target is free for any job.
    pub async fn drop_table(&self) -> Result<()> {
        self.heartbeat.abort();
        // Only while it is still this runner's: a runner stalled past TTL after its job's done
        // record may find the target taken over by another job (a done job keeps nothing),
        // whose lock this must not drop.
        match holder(&self.client, &self.table).await? {
            Some(h) if h.token != self.token => Ok(()),
            _ => drop_all(&self.client, &self.table).await,
        }
    }
}

/// Drop a lock table and the tables of runners taken over from.
pub async fn drop_all(client: &Client, table: &str) -> Result<()> {
    let unquoted = table.replace('`', "");
    let (db, name) = unquoted.split_once('.').unwrap_or(("", &unquoted));
    // The lock table and the tables it was renamed to by takeovers (`<lock>_gone_<token>`,
    // letters and digits): never a job's table whose name merely starts the same way (a job
    // named `lockfix` keeps `<target>__backfill_lockfix_base`).
    let sql = format!(
        "SELECT name FROM system.tables WHERE database = {} AND (name = {} OR {})",
        literal(db),
        literal(name),
        super::landing::starts_then(&format!("{name}_gone_"), "[A-Za-z0-9]+")
    );
    for r in table_rows(client, &sql, "finding the target's lock tables").await? {
        if let Some(n) = r.first() {
            exec(
                client,
                &format!("DROP TABLE IF EXISTS {}", ident(&format!("{db}.{n}"))),
                "freeing the target",
            )
            .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_made_up_one_is_not() {
        let me = me();
        assert!(!gone_here(&me), "{me}");
        assert!(!alive_here(&me), "this process is not another runner");
        let host = crate::state::hostname();
        let here = crate::state::here();
        assert!(!here.is_empty());
        assert!(gone_here(&format!(
            "{host}:{}:1:{here}",
            std::process::id()
        )));
        // pid 1 of this namespace is running, and is not this process.
        let init = format!("{host}:1:{}:{here}", start_ticks(1).unwrap());
        assert!(alive_here(&init) && !gone_here(&init), "{init}");
        assert!(!gone_here(&format!("some-other-host:1:1:{here}")));
        // Another pid namespace, or an older runner that did not say which: its pid means
        // nothing here.
        assert!(!gone_here(&format!(
            "{host}:{}:1:1.{here}",
            std::process::id()
        )));
        assert!(!gone_here(&format!("{host}:{}:1", std::process::id())));
        assert!(!alive_here(&format!(
            "{host}:1:{}",
            start_ticks(1).unwrap()
        )));
    }
}
