//! `backfill plan`: a dry run. Pending rows, batches, where it would resume, an ETA and the WAL
//! it would write from sample batches that are rolled back, whether the statement converges,
//! and the sessions that would stop `run`. Writes nothing, creates nothing.

use super::{OnJob, with_backend};
use crate::engine::Backend;
use crate::engine::plan::{Plan, PlanOptions};
use crate::error::Result;
use crate::outln;
use crate::postgres::Access;
use crate::progress::{fmt_bytes, fmt_duration};
use crate::spec::Spec;
use std::time::Duration;

struct PlanJob(PlanOptions);

impl OnJob for PlanJob {
    type Out = Plan;

    async fn call<B: Backend>(self, _spec: &Spec, backend: B) -> Result<Plan> {
        backend.plan(self.0).await
    }
}

pub async fn plan(specs: &[Spec], exact: bool, samples: u32, json: bool) -> Result<()> {
    let opts = PlanOptions { exact, samples };
    let mut plans = Vec::new();
    for spec in specs {
        let mut p = with_backend(spec, Access::ReadOnly, 1, PlanJob(opts)).await?;
        if let Some(w) = &spec.window
            && p.skip.is_none()
        {
            p.notes.push(window_note(w, jiff::Timestamp::now()));
        }
        if !json {
            print(&p);
        }
        plans.push(p);
    }
    if json {
        let doc = serde_json::json!({ "jobs": plans });
        outln!(
            "{}",
            serde_json::to_string_pretty(&doc).expect("serializable")
        );
    }
    Ok(())
}

/// Whether `run` would start now, by the spec's window.
fn window_note(w: &crate::engine::window::Window, now: jiff::Timestamp) -> String {
    use crate::engine::window::Position;
    let at = |z: &jiff::Zoned| z.strftime("%Y-%m-%d %H:%M %Z").to_string();
    match w.position(now) {
        Position::Inside { ends } => format!(
            "window:       {} (open now; run stops at {} and resumes next time)",
            w.text(),
            at(&ends)
        ),
        Position::Outside { opens } => format!(
            "window:       {} (closed now: run would exit 75 writing nothing; it opens next at {})",
            w.text(),
            at(&opens)
        ),
    }
}

fn print(p: &Plan) {
    outln!("{}  ({}, {})", p.job, p.database, p.target);
    let resume = if p.status == "pending" {
        p.resume.clone()
    } else {
        format!(
            "{} (status {}, {} keys and {} batches done)",
            p.resume, p.status, p.keys_done, p.batches_done
        )
    };
    if let Some(skip) = &p.skip {
        outln!("  status:       {skip}");
        outln!("  resume at:    {resume}");
        return;
    }
    for b in &p.blockers {
        outln!("  WARNING:      run would refuse to start: {b}");
    }
    outln!("  resume at:    {resume}");
    outln!(
        "  pending rows: {}{} ({}){}",
        if p.pending_exact { "" } else { "~" },
        p.pending_rows,
        if p.pending_exact {
            "counted"
        } else {
            "estimate; --exact counts"
        },
        if p.pending_retry > 0 {
            format!(" + {} skipped earlier, waiting for retry", p.pending_retry)
        } else {
            String::new()
        }
    );
    if p.batch_size > 0 {
        outln!("  batches:      {} of {}", p.batches, p.batch_size);
    }
    if let Some(s) = &p.sample {
        outln!(
            "  sample:       {} batch(es), {} keys in {:.0}ms (rolled back): ~{:.0} rows/s",
            s.batches,
            s.keys,
            s.seconds * 1000.0,
            s.rows_per_second
        );
    }
    if let Some(eta) = p.estimate_seconds {
        let settled = p
            .settled_batch_size
            .map(|n| format!("; batches should settle near {n} keys"))
            .unwrap_or_default();
        outln!(
            "  estimate:     ~{}{settled}",
            fmt_duration(Duration::from_secs_f64(eta.max(0.0)))
        );
    }
    if let Some(w) = &p.wal {
        outln!(
            "  WAL:          ~{:.0} bytes/row, ~{} in all, ~{}/s while running (standbys must absorb it)",
            w.bytes_per_row,
            fmt_bytes(w.total_bytes),
            fmt_bytes(w.bytes_per_second as u64)
        );
    }
    if let Some(i) = &p.idempotency {
        if i.converges {
            outln!("  idempotent:   yes ({})", i.reason);
        } else {
            outln!("  WARNING:      statement is NOT idempotent: {}", i.reason);
        }
    }
    for n in &p.notes {
        outln!("  {n}");
    }
    if !p.units.is_empty() {
        let done = p.units.iter().filter(|u| u.status == "done").count();
        outln!("  units:        {} ({done} done)", p.units.len());
        for u in p
            .units
            .iter()
            .filter(|u| u.status != "done" || p.units.len() <= 24)
        {
            let rows = u.rows.map_or("?".to_string(), |r| r.to_string());
            outln!(
                "    {:<28} {:>12} rows  {:<8} {}",
                u.unit,
                rows,
                u.status,
                u.note
            );
        }
    }
}
