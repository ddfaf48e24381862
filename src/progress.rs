//! Counters, rate and ETA for a running job: an indicatif bar on a TTY, otherwise a log line
//! every few seconds (`batch N: M rows, total K, remaining ~R, ETA T`).

use crate::engine::{Estimate, Outcome};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How often the remaining-work estimate is refreshed (a planner estimate: cheap).
pub const REFRESH_EVERY: Duration = Duration::from_secs(30);

/// Every bar of the process is drawn through this, so log lines can be printed above it.
fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(MultiProgress::new)
}

/// A stderr writer for logs that hides the progress bar while a line is written, so a log line
/// never lands in the middle of the bar, and masks every registered secret (tracing's
/// `MakeWriter`; the formatter hands it one whole event per write, text or JSON).
#[derive(Clone, Copy, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let shown = crate::redact::redact_bytes(buf);
        bars().suspend(|| std::io::stderr().write_all(&shown))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        LogWriter
    }
}

/// Whether error lines are JSON objects (`--log-format json`) rather than `error: ...` text.
static JSON_ERRORS: AtomicBool = AtomicBool::new(false);

/// Write error lines as JSON objects from now on (the log format is JSON).
pub fn set_json_errors(on: bool) {
    JSON_ERRORS.store(on, Ordering::Relaxed);
}

/// Print an error to stderr, redacted: `error: <message>`, or with JSON logs one object
/// `{"timestamp", "level": "ERROR", "message", "exit_code"}` (the code when it ends the run).
pub fn print_error(message: &str, exit_code: Option<i32>) {
    print_final("ERROR", "error: ", message, exit_code);
}

/// The final line of a run that stopped early with its progress saved (exit 75): not an error.
pub fn print_stopped(message: &str, exit_code: i32) {
    print_final("WARN", "", message, Some(exit_code));
}

fn print_final(level: &str, prefix: &str, message: &str, exit_code: Option<i32>) {
    let message = crate::redact::redact(message);
    let line = if JSON_ERRORS.load(Ordering::Relaxed) {
        // Keys in the order tracing's JSON lines have them.
        let json = |v: &str| serde_json::to_string(v).expect("a string serializes");
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let code = exit_code.map_or(String::new(), |c| format!(",\"exit_code\":{c}"));
        format!(
            "{{\"timestamp\":{},\"level\":\"{level}\",\"message\":{}{code}}}",
            json(&now),
            json(&message)
        )
    } else {
        format!("{prefix}{message}")
    };
    let line = format!("{}\n", crate::redact::redact(&line));
    bars().suspend(|| {
        let _ = std::io::stderr().write_all(line.as_bytes());
    });
}

/// Totals of one run of one job.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub keys: u64,
    pub rows: u64,
    pub batches: u64,
    pub retried: u64,
    pub skipped: u64,
    /// Time spent paused by the throttle.
    pub throttled: Duration,
}

pub struct Progress {
    job: String,
    started: Instant,
    pub totals: Totals,
    /// Estimate of what was left when it was last refreshed, and the keys done by then.
    estimate: Estimate,
    at_estimate: Totals,
    estimated_at: Instant,
    /// Keys per second, smoothed.
    rate: Option<f64>,
    last_log: Instant,
    log_every: Duration,
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(job: &str, estimate: Estimate, log_every: Duration) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(estimate.rows + estimate.pending_retry);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {human_pos}/~{human_len} rows  {per_sec}  ETA {eta}  {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_prefix(job.to_string());
            bars().add(b)
        });
        Progress {
            job: job.to_string(),
            started: Instant::now(),
            totals: Totals::default(),
            estimate,
            at_estimate: Totals::default(),
            estimated_at: Instant::now(),
            rate: None,
            last_log: Instant::now(),
            log_every,
            bar,
        }
    }

    pub fn job(&self) -> &str {
        &self.job
    }

    pub fn needs_refresh(&self) -> bool {
        self.estimated_at.elapsed() >= REFRESH_EVERY
    }

    pub fn refresh(&mut self, estimate: Estimate) {
        self.estimate = estimate;
        self.at_estimate = self.totals;
        self.estimated_at = Instant::now();
    }

    /// Rows left, by the last estimate less what was done since.
    pub fn remaining(&self) -> u64 {
        let (now, then) = (&self.totals, &self.at_estimate);
        let pending = (self.estimate.pending_retry + now.skipped - then.skipped)
            .saturating_sub(now.retried - then.retried);
        self.estimate.rows.saturating_sub(now.keys - then.keys) + pending
    }

    pub fn eta(&self) -> Option<Duration> {
        let rate = self.rate.filter(|r| *r > 0.0)?;
        Some(Duration::from_secs_f64(self.remaining() as f64 / rate))
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Account for one batch of `size` by `worker` that took `took`.
    pub fn record(&mut self, out: &Outcome, took: Duration, size: u64, worker: &str) {
        let t = &mut self.totals;
        t.keys += out.keys;
        t.rows += out.rows;
        t.retried += out.retried;
        t.skipped += out.skipped;
        if out.keys + out.retried > 0 {
            t.batches += 1;
        }
        let work = (out.keys + out.retried) as f64;
        if work > 0.0 {
            let r = work / took.as_secs_f64().max(1e-4);
            self.rate = Some(self.rate.map_or(r, |p| 0.2 * r + 0.8 * p));
        }
        tracing::debug!(
            job = %self.job, worker, batch = t.batches, size, keys = out.keys, rows = out.rows,
            retried = out.retried, skipped = out.skipped,
            select_ms = out.timings.select.as_millis() as u64,
            statement_ms = out.timings.statement.as_millis() as u64,
            commit_ms = out.timings.commit.as_millis() as u64,
            "batch done"
        );
        let (keys, batches) = (t.keys, t.batches);
        let eta = self.eta();
        crate::metrics::unit(
            &self.job,
            worker,
            out.keys,
            out.rows,
            out.retried,
            out.skipped,
            took,
            size,
        );
        crate::metrics::estimate(&self.job, self.remaining(), eta);
        if let Some(bar) = &self.bar {
            bar.set_length(keys + self.remaining());
            bar.set_position(keys);
            bar.set_message(format!("batch {batches} size {size}"));
        } else if self.last_log.elapsed() >= self.log_every {
            self.last_log = Instant::now();
            tracing::info!(
                job = %self.job, batch = batches, rows = out.keys, total = keys,
                remaining = self.remaining(),
                "batch {batches}: {} rows, total {keys}, remaining ~{}, ETA {}",
                out.keys,
                self.remaining(),
                eta.map(fmt_duration).unwrap_or_else(|| "unknown".into())
            );
        }
    }

    pub fn add_throttled(&mut self, d: Duration) {
        self.totals.throttled += d;
        crate::metrics::throttled(&self.job, d);
        if let Some(bar) = &self.bar {
            bar.set_message(format!("throttled {}", fmt_duration(self.totals.throttled)));
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `512 B`, `3.2 MiB`, `1.5 GiB`.
pub fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `1h02m`, `3m10s`, `12s`: rounded to seconds.
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{}s", d.as_secs_f64().round() as u64),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}
