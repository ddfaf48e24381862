//! The `backfill` binary: parse arguments, set up logging, run the command, map the outcome to
//! an exit code (0 done, 1 failed, 2 bad spec or usage, 75 stopped early with progress saved).

use backfill::cli::{Cli, LogFormat};
use clap::Parser;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Set up the tracing subscriber; returns whether logs (and so error lines) are JSON.
fn init_logging(format: LogFormat) -> bool {
    // A bare level (BACKFILL_LOG=debug) applies to backfill only: the database drivers' debug
    // output would log every batch's key array byte by byte. Full directives pass through.
    let filter = match std::env::var("BACKFILL_LOG").or_else(|_| std::env::var("RUST_LOG")) {
        Ok(v) if !v.contains(['=', ',']) => EnvFilter::new(format!("info,backfill={v}")),
        Ok(v) => EnvFilter::new(v),
        Err(_) => EnvFilter::new("info"),
    };
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(backfill::progress::LogWriter)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_target(false);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    json
}

fn main() {
    // A panic message goes through redaction like everything else printed.
    std::panic::set_hook(Box::new(|info| {
        let message = format!("panic: {info}");
        backfill::progress::print_error(&message, None);
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            let trace = std::backtrace::Backtrace::force_capture().to_string();
            eprintln!("{}", backfill::redact::redact(&trace));
        }
    }));
    // A password in an argument (a URL passed where a spec path belongs, or as the value of
    // an option) is masked like a spec's: registered before anything can print it, and the
    // argument parser's own errors and help go through redaction too.
    for arg in std::env::args_os().skip(1) {
        let arg = arg.to_string_lossy();
        backfill::redact::register_url(&arg);
        if let Some((_, value)) = arg.split_once('=') {
            backfill::redact::register_url(value);
        }
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let text = backfill::redact::redact(&e.render().to_string()).into_owned();
            if e.use_stderr() {
                eprint!("{text}");
            } else {
                print!("{text}");
            }
            std::process::exit(e.exit_code());
        }
    };
    let json = init_logging(cli.log_format);
    backfill::progress::set_json_errors(json);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if matches!(cli.command, backfill::cli::Command::Run { .. }) {
        // At once: SIGTERM while the specs load is a stop (75), not the default death (143).
        let _in_runtime = runtime.enter();
        backfill::engine::Stop::install();
    }
    let code = runtime.block_on(async {
        match backfill::commands::execute(cli.command).await {
            Ok(()) => backfill::error::EXIT_DONE,
            Err(e) => {
                let code = e.exit_code();
                match &e {
                    // Not a failure: progress is saved and a later run resumes.
                    backfill::Error::Stopped(_) => backfill::progress::print_stopped(
                        &format!("{e}; run again to resume"),
                        code,
                    ),
                    _ => backfill::progress::print_error(&e.to_string(), Some(code)),
                }
                code
            }
        }
    });
    // Do not wait for background tasks (signal listener, pooled connections) to wind down.
    runtime.shutdown_background();
    std::process::exit(code);
}
