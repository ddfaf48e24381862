//! Prometheus metrics: the names (all `backfill_`, labelled `backfill_job`: a plain `job` label
//! would clash with Prometheus's own target label), helpers the engine calls,
//! the `/metrics` listener (`--metrics-addr`) and a push-gateway client (`--pushgateway`) that
//! pushes every interval and once more at exit.

use crate::error::{Error, Result};
use crate::redact::redact_url;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const ROWS: &str = "backfill_rows_total";
pub const KEYS: &str = "backfill_keys_total";
pub const BATCHES: &str = "backfill_batches_total";
pub const BATCH_SECONDS: &str = "backfill_batch_duration_seconds";
pub const BATCH_SIZE: &str = "backfill_batch_size";
pub const RETRIED_ROWS: &str = "backfill_rows_retried_total";
pub const SKIPPED_ROWS: &str = "backfill_rows_skipped_total";
pub const RETRIES: &str = "backfill_retries_total";
pub const SPLITS: &str = "backfill_chunk_splits_total";
pub const THROTTLED: &str = "backfill_throttled_seconds";
pub const REMAINING: &str = "backfill_remaining_rows";
pub const ETA: &str = "backfill_eta_seconds";
pub const LAST_BATCH: &str = "backfill_last_batch_timestamp_seconds";
pub const LAST_SUCCESS: &str = "backfill_last_success_timestamp_seconds";
pub const STATUS: &str = "backfill_job_status";
pub const PAUSED: &str = "backfill_paused";
pub const WORKERS: &str = "backfill_workers";
pub const DEADLINE: &str = "backfill_deadline_timestamp_seconds";

/// Statuses exported by `backfill_job_status{status=...}` (1 for the current one).
pub const STATUSES: [&str; 5] = ["running", "stopped", "failed", "done", "skipped"];

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The label every series carries.
pub const JOB_LABEL: &str = "backfill_job";

fn job(job: &str) -> [(&'static str, String); 1] {
    [(JOB_LABEL, job.to_string())]
}

/// One committed batch of one worker.
#[allow(clippy::too_many_arguments)]
pub fn unit(
    name: &str,
    worker: &str,
    keys: u64,
    rows: u64,
    retried: u64,
    skipped: u64,
    took: Duration,
    size: u64,
) {
    let l = job(name);
    counter!(KEYS, &l).increment(keys);
    counter!(ROWS, &l).increment(rows);
    counter!(RETRIED_ROWS, &l).increment(retried);
    counter!(SKIPPED_ROWS, &l).increment(skipped);
    if keys + retried > 0 {
        counter!(BATCHES, &l).increment(1);
        histogram!(BATCH_SECONDS, &l).record(took.as_secs_f64());
    }
    gauge!(BATCH_SIZE, JOB_LABEL => name.to_string(), "worker" => worker.to_string())
        .set(size as f64);
    gauge!(LAST_BATCH, &l).set(now_secs());
}

/// The progress estimate after a unit.
pub fn estimate(name: &str, remaining: u64, eta: Option<Duration>) {
    let l = job(name);
    gauge!(REMAINING, &l).set(remaining as f64);
    gauge!(ETA, &l).set(eta.map_or(f64::NAN, |d| d.as_secs_f64()));
}

/// A unit retried, by reason (`lock_timeout`, `statement_timeout`, `connection_lost`, ...).
pub fn retry(name: &str, reason: &'static str) {
    counter!(RETRIES, JOB_LABEL => name.to_string(), "reason" => reason).increment(1);
}

/// A ClickHouse chunk split one level down (`day`, `split`).
pub fn split(name: &str, level: &'static str) {
    counter!(SPLITS, JOB_LABEL => name.to_string(), "level" => level).increment(1);
}

/// Time workers waited for the throttle, in worker-seconds (two workers waiting one second add
/// two). Recorded at every check of the throttle while it holds the job, so it grows as the
/// throttling happens. A gauge that only grows during a run: counters are integers.
pub fn throttled(name: &str, d: Duration) {
    gauge!(THROTTLED, &job(name)).increment(d.as_secs_f64());
}

/// 1 while the job's workers wait for `backfill unpause`.
pub fn paused(name: &str, on: bool) {
    gauge!(PAUSED, &job(name)).set(if on { 1.0 } else { 0.0 });
}

/// Workers of this process working on the job.
pub fn workers(name: &str, n: usize) {
    gauge!(WORKERS, &job(name)).set(n as f64);
}

/// When this run of the job stops at its next batch boundary (the earlier of `max_runtime` and
/// the end of the run window), if either is set.
pub fn deadline(name: &str, at: Option<Instant>) {
    let Some(at) = at else { return };
    let now = Instant::now();
    let unix = if at >= now {
        now_secs() + (at - now).as_secs_f64()
    } else {
        now_secs() - (now - at).as_secs_f64()
    };
    gauge!(DEADLINE, &job(name)).set(unix);
}

/// A job that ended before its work began: `failed` unless it was a stop (window closed,
/// slots taken, preflight blockers, a signal), which leaves the status as it was.
pub fn not_started(name: &str, error: &Error) {
    if !matches!(error, Error::Stopped(_)) {
        status(name, "failed");
    }
}

/// The job's status; `done` also sets the last-success timestamp.
pub fn status(name: &str, current: &str) {
    for s in STATUSES {
        let v = if s == current { 1.0 } else { 0.0 };
        gauge!(STATUS, JOB_LABEL => name.to_string(), "status" => s).set(v);
    }
    if current == "done" {
        gauge!(LAST_SUCCESS, &job(name)).set(now_secs());
    }
}

/// Where metrics go for this process; `finish` does the final push.
pub struct Exporter {
    push: Option<Push>,
}

/// The pusher: one task sends every push in turn, the final one included, so no two pushes are
/// ever in flight together (a gateway could apply an older one last) and none is cut off midway.
struct Push {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// How long one push may take before it is given up; an unanswered gateway never holds the job.
const PUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Install the recorder, start the listener and/or the pusher.
pub fn install(
    listen: Option<SocketAddr>,
    push: Option<&str>,
    every: Duration,
) -> Result<Exporter> {
    // The push client speaks TLS through rustls, which needs a process-wide crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let buckets = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
    let mut builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(BATCH_SECONDS.into()), &buckets)
        .map_err(|e| Error::Usage(format!("metrics: {e}")))?;
    let handle = match listen {
        Some(addr) => {
            builder = builder.with_http_listener(addr);
            let (recorder, exporter) = builder
                .build()
                .map_err(|e| Error::Usage(format!("--metrics-addr {addr}: cannot listen: {e}")))?;
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder)
                .map_err(|e| Error::Usage(format!("metrics: {e}")))?;
            tokio::spawn(async move {
                if let Err(e) = exporter.await {
                    tracing::error!("metrics listener stopped: {e:?}");
                }
            });
            tracing::info!("serving Prometheus metrics on http://{addr}/metrics");
            handle
        }
        None => builder
            .install_recorder()
            .map_err(|e| Error::Usage(format!("metrics: {e}")))?,
    };
    describe();
    let push = match push {
        Some(raw) => Some(start_push(raw, every, handle)?),
        None => None,
    };
    Ok(Exporter { push })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(ROWS, "Rows the statement reported as affected");
    describe_counter!(KEYS, "Keys walked past the cursor");
    describe_counter!(BATCHES, "Units of work committed (batches or chunks)");
    describe_histogram!(BATCH_SECONDS, "Duration of one committed unit");
    describe_gauge!(BATCH_SIZE, "Current batch size");
    describe_counter!(
        RETRIED_ROWS,
        "Rows processed by the retry pass after being locked"
    );
    describe_counter!(
        SKIPPED_ROWS,
        "Rows skipped because another transaction held them"
    );
    describe_counter!(RETRIES, "Units retried, by reason");
    describe_counter!(SPLITS, "ClickHouse chunks split one level down, by level");
    describe_gauge!(
        THROTTLED,
        "Worker-seconds spent waiting for the throttle in this run, updated while it waits"
    );
    describe_gauge!(REMAINING, "Estimated rows left");
    describe_gauge!(ETA, "Estimated seconds to completion");
    describe_gauge!(LAST_BATCH, "Unix time of the last committed unit");
    describe_gauge!(LAST_SUCCESS, "Unix time the job last finished");
    describe_gauge!(STATUS, "1 for the job's current status");
    describe_gauge!(PAUSED, "1 while the job is paused by backfill pause");
    describe_gauge!(WORKERS, "Workers of this process working on the job");
    describe_gauge!(
        DEADLINE,
        "Unix time this run stops at (max_runtime or the end of the run window)"
    );
}

fn start_push(raw: &str, every: Duration, handle: PrometheusHandle) -> Result<Push> {
    crate::redact::register_url(raw);
    let shown = redact_url(raw);
    let parsed =
        url::Url::parse(raw).map_err(|e| Error::Usage(format!("--pushgateway {shown}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(Error::Usage(format!(
            "--pushgateway {shown}: must be http:// or https://"
        )));
    }
    let auth = (!parsed.username().is_empty()).then(|| {
        use base64::Engine;
        let pair = format!("{}:{}", parsed.username(), parsed.password().unwrap_or(""));
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    });
    let mut bare = parsed.clone();
    let _ = bare.set_username("");
    let _ = bare.set_password(None);
    let url: hyper::Uri = bare
        .as_str()
        .parse()
        .map_err(|e| Error::Usage(format!("--pushgateway {shown}: {e}")))?;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        loop {
            // A push under way when the stop comes is finished: the select has already chosen.
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = &mut stopped => break,
            }
            match push_once(&url, auth.as_deref(), handle.render()).await {
                Ok(()) => {}
                Err(e) => tracing::warn!("pushing metrics to {shown}: {e}"),
            }
        }
        match push_once(&url, auth.as_deref(), handle.render()).await {
            Ok(()) => tracing::debug!("pushed final metrics to {shown}"),
            Err(e) => tracing::warn!("final metrics push to {shown}: {e}"),
        }
    });
    Ok(Push { stop, task })
}

impl Exporter {
    /// Push one last time (a short-lived job's final numbers), after any push under way, each
    /// bounded by `PUSH_TIMEOUT`.
    pub async fn finish(self) {
        let Some(push) = self.push else { return };
        let _ = push.stop.send(());
        let _ = push.task.await;
    }
}

async fn push_once(
    url: &hyper::Uri,
    auth: Option<&str>,
    body: String,
) -> std::result::Result<(), String> {
    match tokio::time::timeout(PUSH_TIMEOUT, send(url, auth, body)).await {
        Ok(sent) => sent,
        Err(_) => Err(format!("no answer within {PUSH_TIMEOUT:?}")),
    }
}

async fn send(
    url: &hyper::Uri,
    auth: Option<&str>,
    body: String,
) -> std::result::Result<(), String> {
    use http_body_util::Full;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| format!("no TLS roots: {e}"))?
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Full<hyper::body::Bytes>> =
        Client::builder(TokioExecutor::new()).build(https);
    let mut req = hyper::Request::builder()
        .method(hyper::Method::PUT)
        .uri(url.clone())
        .header("content-type", "text/plain; version=0.0.4");
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let req = req.body(Full::from(body)).map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", resp.status()))
    }
}
