//! Command-line definitions (clap). No behaviour lives here.

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "backfill",
    version,
    about = "Resumable batched backfills: small committed batches, checkpoints, resume after a kill.",
    after_help = "Exit codes: 0 all done; 1 failed; 2 bad spec or usage; 75 stopped early with \
                  progress saved (run again to resume)."
)]
pub struct Cli {
    /// Log format: text on a terminal and json otherwise, unless set.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Auto,
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run jobs; a directory runs its *.yaml in file-name order, skipping finished jobs.
    Run {
        #[arg(required = true, value_name = "SPEC_OR_DIR")]
        specs: Vec<PathBuf>,
        /// Stop at a batch boundary after this long (e.g. 45m; 0 = no limit) and exit 75; run
        /// again to resume.
        #[arg(long, value_parser = parse_runtime, value_name = "DURATION")]
        max_runtime: Option<Duration>,
        /// Run finished jobs again from the start (their checkpoint is reset first).
        #[arg(long)]
        rerun: bool,
        /// Start even when another session holds or waits for an ACCESS EXCLUSIVE lock on the
        /// table, or a transaction is older than limits.max_transaction_age.
        #[arg(long)]
        ignore_preflight: bool,
        /// Serve Prometheus metrics on this address while the job runs (e.g. 0.0.0.0:9464).
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Push metrics to this Prometheus push gateway URL periodically and once at exit
        /// (e.g. http://pushgateway:9091/metrics/job/backfill).
        #[arg(long, value_name = "URL")]
        pushgateway: Option<String>,
        /// How often to log a progress line when stderr is not a terminal.
        #[arg(long, value_parser = parse_interval, default_value = "5s", value_name = "DURATION")]
        progress_interval: Duration,
        /// How often to push to the push gateway.
        #[arg(long, value_parser = parse_push_interval, default_value = "15s", value_name = "DURATION")]
        push_interval: Duration,
        /// Worker threads of this process (default: the spec's `workers`); more processes on
        /// the same spec join until `workers` are active.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
        workers: Option<u32>,
    },
    /// Dry run: pending rows, batch count, where it would resume, estimated duration. No writes.
    Plan {
        #[arg(required = true, value_name = "SPEC_OR_DIR")]
        specs: Vec<PathBuf>,
        /// Count pending rows exactly (a full scan) instead of the planner's estimate.
        #[arg(long)]
        exact: bool,
        /// Sample batches to time (run in a transaction that is rolled back); 0 skips timing.
        #[arg(long, default_value_t = 3, value_name = "N")]
        samples: u32,
        /// One JSON document for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Show what the checkpoint store says about each job.
    Status {
        #[arg(required = true, value_name = "SPEC_OR_DIR")]
        specs: Vec<PathBuf>,
        /// One JSON document for scripts.
        #[arg(long)]
        json: bool,
        /// Redraw every few seconds (workers, rate, ETA, paused or throttled) until interrupted.
        #[arg(long)]
        watch: bool,
        /// How often `--watch` redraws (at least 100ms).
        #[arg(long, value_parser = parse_watch_interval, default_value = "2s", value_name = "DURATION")]
        interval: Duration,
    },
    /// Run the spec's `verify:` check alone (read-only): exit 0 when it returns 0.
    Verify {
        #[arg(required = true, value_name = "SPEC")]
        specs: Vec<PathBuf>,
    },
    /// Pause running workers after their open batch (they wait; started jobs wait too).
    Pause {
        #[arg(required = true, value_name = "SPEC")]
        specs: Vec<PathBuf>,
    },
    /// Let paused workers go on.
    Unpause {
        #[arg(required = true, value_name = "SPEC")]
        specs: Vec<PathBuf>,
    },
    /// Parse and check specs without touching a database.
    Validate {
        #[arg(required = true, value_name = "SPEC_OR_DIR")]
        specs: Vec<PathBuf>,
    },
    /// Forget a job's checkpoint so the next run starts from the beginning.
    Reset {
        #[arg(value_name = "SPEC")]
        spec: PathBuf,
        /// Required: confirms that the checkpoint should be deleted.
        #[arg(long)]
        yes: bool,
        /// ClickHouse: the next run restores the partitions the job landed in even where other
        /// writers have put rows since (they are dropped with the job's; copy them first).
        #[arg(long)]
        discard_foreign_rows: bool,
    },
}

fn parse_bounded(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = crate::spec::parse_duration(s)?;
    if d < min || d > max {
        return Err(format!(
            "{s} is out of range: {} to {}",
            crate::spec::format_duration(min),
            crate::spec::format_duration(max)
        ));
    }
    Ok(d)
}

fn parse_runtime(s: &str) -> Result<Duration, String> {
    parse_bounded(s, Duration::ZERO, crate::spec::MAX_LONG_DURATION)
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    parse_bounded(s, Duration::ZERO, crate::spec::MAX_SHORT_DURATION)
}

/// `status --watch`: each refresh reads the store; a zero interval would read it in a loop.
fn parse_watch_interval(s: &str) -> Result<Duration, String> {
    parse_bounded(
        s,
        Duration::from_millis(100),
        crate::spec::MAX_SHORT_DURATION,
    )
}

fn parse_push_interval(s: &str) -> Result<Duration, String> {
    parse_bounded(s, Duration::from_millis(1), crate::spec::MAX_SHORT_DURATION)
}
