//! What a job's store says, in the same shape for every backend: the job's status, counters,
//! its units (ranges or chunks) and its live workers. Each backend keeps its own tables and
//! fills these types in; commands only read them.

use chrono::{DateTime, Utc};
use serde::Serialize;

/// Lifecycle of a job in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// A runner is working on it (a live worker holds a slot).
    #[default]
    Running,
    /// Stopped early (deadline, signal, window, rows still locked); resumes on the next run.
    Stopped,
    /// Failed with `last_error`; resumes from the checkpoint on the next run.
    Failed,
    /// Every row done (and `verify` returned 0).
    Done,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Stopped => "stopped",
            Status::Failed => "failed",
            Status::Done => "done",
        }
    }

    pub fn parse(s: &str) -> Status {
        match s {
            "done" => Status::Done,
            "failed" => Status::Failed,
            "stopped" => Status::Stopped,
            _ => Status::Running,
        }
    }
}

/// A job's record in its store.
#[derive(Debug, Clone, Serialize, Default)]
pub struct JobState {
    /// (Not serialized: `status` output names the job and its shown status itself.)
    #[serde(skip_serializing)]
    pub job: String,
    #[serde(skip_serializing)]
    pub status: Status,
    /// `backfill pause` is in effect.
    pub paused: bool,
    /// Where the next run would resume, in words (`after key 1234`, `3 of 16 ranges done`).
    pub resume: Option<String>,
    /// The walk's position: the last key done in the furthest range that made progress (for a
    /// single worker, the one cursor of its ordered walk).
    pub cursor: Option<String>,
    /// Keys walked (including skipped ones); source rows for ClickHouse chunks.
    pub keys_done: i64,
    /// Rows the statement reported as affected.
    pub rows_done: i64,
    pub batches_done: i64,
    /// Rows skipped under SKIP LOCKED and later retried.
    pub rows_retried: i64,
    /// Skipped rows still waiting for their retry.
    pub rows_pending_retry: i64,
    /// Units (ranges or chunks): how many, how many finished.
    pub units_total: i64,
    pub units_done: i64,
    /// Workers holding a slot right now (in any process).
    pub workers_active: i64,
    pub spec_hash: String,
    pub started_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// `host:pid` of the runner that last started it.
    pub runner: Option<String>,
    /// Why a running job's workers wait for the `throttle:` conditions right now, if they do.
    pub throttled: Option<String>,
}

/// One unit of a job (a key range or a chunk) as `status` shows it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct UnitState {
    /// `range 3 (1000, 2000]`, `2026-01`, `2026-01-15/project_id[...]`.
    pub unit: String,
    /// `pending`, `walking`, `retrying`, `done`, `split`, `staged`, `failed`.
    pub status: String,
    /// Worker holding it, if any (`host:pid/w0`).
    pub owner: Option<String>,
    pub cursor: Option<String>,
    pub keys_done: i64,
    pub rows_done: i64,
    pub batches_done: i64,
    pub attempts: i64,
    pub pending_retry: i64,
    pub note: String,
}

/// `host:pid` of this process, recorded as the runner.
pub fn runner_id() -> String {
    format!("{}:{}", hostname(), std::process::id())
}

/// This machine's (or pod's) host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Where this process's pids mean something: its pid namespace and the kernel's boot. Two
/// containers on one host can share a host name (`docker run --network host` gives each the
/// host's) while each numbers its processes from 1: a runner's pid can be looked up in
/// `/proc` only by a process in the same pid namespace of the same boot. Empty if unknown.
pub fn here() -> String {
    let ns = std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .map(|l| {
            l.to_string_lossy()
                .chars()
                .filter(char::is_ascii_digit)
                .collect::<String>()
        })
        .unwrap_or_default();
    let boot: String = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(12)
        .collect();
    if ns.is_empty() || boot.is_empty() {
        return String::new();
    }
    format!("{ns}.{boot}")
}
