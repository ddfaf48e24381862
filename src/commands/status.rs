//! `backfill status`: what each job's store says (status, counters, units, live workers), as
//! text or JSON; `--watch` redraws it with the rate and ETA seen between refreshes. A job
//! whose database cannot be reached is reported as such; the others are still shown.

use super::{OnJob, with_backend};
use crate::engine::{Backend, Estimate};
use crate::error::{Error, Result};
use crate::outln;
use crate::postgres::Access;
use crate::progress::fmt_duration;
use crate::spec::Spec;
use crate::state::{JobState, UnitState};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Serialize)]
struct Entry {
    job: String,
    spec: String,
    database: String,
    /// `pending` when the store has no record yet, `paused`, or the stored status.
    status: String,
    spec_changed: bool,
    #[serde(flatten)]
    state: Option<JobState>,
    /// Ranges or chunks, when the job has more than one.
    #[serde(skip_serializing_if = "one_or_none")]
    units: Vec<UnitState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remaining_rows: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn one_or_none(units: &[UnitState]) -> bool {
    units.len() <= 1
}

struct Look {
    estimate: bool,
}

impl OnJob for Look {
    type Out = (Option<JobState>, Vec<UnitState>, Option<Estimate>, String);

    async fn call<B: Backend>(self, _spec: &Spec, backend: B) -> Result<Self::Out> {
        let state = backend.load().await?;
        let units = backend.units().await?;
        let est = if self.estimate && state.is_some() {
            match backend.preflight().await {
                Ok(()) => backend.estimate().await.ok(),
                Err(_) => None,
            }
        } else {
            None
        };
        Ok((state, units, est, backend.describe().0))
    }
}

async fn entry(spec: &Spec, estimate: bool) -> Entry {
    let base = Entry {
        job: spec.name.clone(),
        spec: spec.file.display().to_string(),
        database: spec.source.redacted_url(),
        status: "unknown".into(),
        spec_changed: false,
        state: None,
        units: Vec::new(),
        remaining_rows: None,
        error: None,
    };
    match with_backend(spec, Access::ReadOnly, 1, Look { estimate }).await {
        Ok((state, units, est, database)) => Entry {
            status: match &state {
                None => "pending".into(),
                Some(s) if s.paused && s.status != crate::state::Status::Done => "paused".into(),
                Some(s) => s.status.as_str().into(),
            },
            spec_changed: state.as_ref().is_some_and(|s| !spec.hash_is(&s.spec_hash)),
            state,
            units,
            remaining_rows: est.map(|e| e.rows + e.pending_retry),
            database,
            ..base
        },
        Err(e) => Entry {
            error: Some(crate::redact::redact(&e.to_string()).into_owned()),
            ..base
        },
    }
}

pub async fn status(specs: &[Spec], json: bool, watch: bool, every: Duration) -> Result<()> {
    if !watch {
        let mut entries = Vec::new();
        for spec in specs {
            entries.push(entry(spec, false).await);
        }
        let failed: Vec<String> = entries
            .iter()
            .filter_map(|e| e.error.as_ref().map(|err| format!("{}: {err}", e.job)))
            .collect();
        if json {
            let doc = serde_json::json!({ "jobs": entries });
            outln!(
                "{}",
                serde_json::to_string_pretty(&doc).expect("serializable")
            );
        } else {
            for e in &entries {
                print(e, None);
            }
        }
        return if failed.is_empty() {
            Ok(())
        } else {
            Err(Error::Connect(format!(
                "{} of {} job(s) could not be read: {}",
                failed.len(),
                entries.len(),
                failed.join("; ")
            )))
        };
    }
    watch_loop(specs, json, every).await
}

/// Redraw until interrupted, with the rate seen between two looks.
async fn watch_loop(specs: &[Spec], json: bool, every: Duration) -> Result<()> {
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal();
    let mut last: Vec<Option<(Instant, i64)>> = vec![None; specs.len()];
    loop {
        let mut frame = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let e = entry(spec, true).await;
            let now = Instant::now();
            let keys = e.state.as_ref().map(|s| s.keys_done);
            let rate = match (last[i], keys) {
                (Some((t, k0)), Some(k1)) if now > t => {
                    Some((k1 - k0).max(0) as f64 / (now - t).as_secs_f64())
                }
                _ => None,
            };
            if let Some(k) = keys {
                last[i] = Some((now, k));
            }
            frame.push((e, rate));
        }
        if tty && !json {
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), b"\x1b[2J\x1b[H");
        }
        if json {
            // One line per redraw, with the rate and ETA the text shows.
            let docs: Vec<_> = frame
                .iter()
                .map(|(e, rate)| Watched {
                    entry: e,
                    rate_rows_per_second: *rate,
                    eta_seconds: eta(e, *rate).map(|d| d.as_secs_f64()),
                })
                .collect();
            outln!("{}", serde_json::json!({ "jobs": docs }));
        } else {
            outln!(
                "backfill status — {} (every {}; Ctrl-C to quit)",
                chrono::Utc::now().format("%H:%M:%S UTC"),
                fmt_duration(every)
            );
            for (e, rate) in &frame {
                print(e, *rate);
            }
        }
        // Nobody reads the output any more (`| head -1`): nothing left to watch for.
        if crate::redact::stdout_gone() {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// A job in a `--watch --json` frame: its entry, and the rate seen since the last redraw.
#[derive(Serialize)]
struct Watched<'a> {
    #[serde(flatten)]
    entry: &'a Entry,
    rate_rows_per_second: Option<f64>,
    eta_seconds: Option<f64>,
}

/// Time left at `rate` keys/s for the rows the estimate says remain (none while nothing moves).
fn eta(e: &Entry, rate: Option<f64>) -> Option<Duration> {
    match (e.remaining_rows, rate) {
        (Some(left), Some(r)) if r > 0.0 => Duration::try_from_secs_f64(left as f64 / r).ok(),
        _ => None,
    }
}

fn print(e: &Entry, rate: Option<f64>) {
    outln!("{}  [{}]  {}", e.job, e.status, e.database);
    if let Some(err) = &e.error {
        outln!("    cannot read its store: {err}");
        return;
    }
    let Some(s) = &e.state else {
        outln!("    no checkpoint yet");
        return;
    };
    outln!(
        "    {}  keys {}  rows {}  batches {}  retried {}  waiting for retry {}",
        s.resume.as_deref().unwrap_or("-"),
        s.keys_done,
        s.rows_done,
        s.batches_done,
        s.rows_retried,
        s.rows_pending_retry
    );
    outln!(
        "    units {} of {} done  workers active {}{}",
        s.units_done,
        s.units_total,
        s.workers_active,
        if s.paused {
            "  PAUSED (backfill unpause)"
        } else {
            ""
        }
    );
    if let Some(why) = &s.throttled {
        outln!("    throttled: {why}");
    }
    if let Some(r) = rate {
        let eta = eta(e, rate).map_or("unknown".into(), fmt_duration);
        outln!(
            "    rate {:.0} rows/s  remaining ~{}  ETA {eta}",
            r,
            e.remaining_rows.map_or("?".to_string(), |n| n.to_string())
        );
    }
    let t = |v: &Option<chrono::DateTime<chrono::Utc>>| {
        v.map_or("-".to_string(), |d| {
            d.format("%Y-%m-%d %H:%M:%S UTC").to_string()
        })
    };
    outln!(
        "    started {}  updated {}  finished {}  runner {}",
        t(&s.started_at),
        t(&s.updated_at),
        t(&s.finished_at),
        s.runner.as_deref().unwrap_or("-")
    );
    if e.spec_changed {
        outln!("    spec changed since the checkpoint was written");
    }
    if let Some(err) = &s.last_error {
        outln!("    last error: {err}");
    }
    print_units(&e.units);
}

/// Counts by status, then every unit not done (ranges being walked, chunks split or failed).
fn print_units(units: &[UnitState]) {
    if units.len() <= 1 {
        return;
    }
    let mut by_status = std::collections::BTreeMap::<&str, usize>::new();
    for u in units {
        *by_status.entry(u.status.as_str()).or_default() += 1;
    }
    let counts: Vec<String> = by_status.iter().map(|(s, n)| format!("{n} {s}")).collect();
    outln!("    units: {}", counts.join(", "));
    for u in units.iter().filter(|u| u.status != "done") {
        let why: String = u.note.chars().take(160).collect();
        let at = u
            .cursor
            .as_deref()
            .map(|c| format!("at {c}  "))
            .unwrap_or_default();
        outln!(
            "      {:<36} {:<8} {}keys {}  {}{}",
            u.unit,
            u.status,
            at,
            u.keys_done,
            u.owner
                .as_deref()
                .map(|o| format!("worker {o}  "))
                .unwrap_or_default(),
            why
        );
    }
}
