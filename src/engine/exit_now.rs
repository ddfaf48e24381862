//! What a second signal does before the process exits: it cancels the statements the
//! process's sessions are running, so that their transactions end now and their locks with
//! them. A closed socket alone is not enough: Postgres does not notice it while a statement
//! runs (`client_connection_check_interval` is 0 by default), and a backend went on running
//! the batch, its rows locked, until the statement ended or hit `statement_timeout`.
//! Backends register how to cancel each session they open; the exit waits for those requests,
//! bounded, then goes.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A cancel request for one session, as a future to await.
pub type Cancel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How to make that request, any number of times.
pub type MakeCancel = Box<dyn Fn() -> Cancel + Send + Sync>;

static NEXT: AtomicU64 = AtomicU64::new(0);

fn registry() -> &'static Mutex<BTreeMap<u64, MakeCancel>> {
    static R: std::sync::OnceLock<Mutex<BTreeMap<u64, MakeCancel>>> = std::sync::OnceLock::new();
    R.get_or_init(Default::default)
}

/// Cancel this session on a second signal; `forget` the returned id once it is closed.
pub fn register(cancel: MakeCancel) -> u64 {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    registry()
        .lock()
        .expect("cancel registry")
        .insert(id, cancel);
    id
}

pub fn forget(id: u64) {
    registry().lock().expect("cancel registry").remove(&id);
}

/// Send every registered cancel request at once and wait for them, at most `limit`.
pub async fn cancel_all(limit: Duration) {
    let requests: Vec<Cancel> = registry()
        .lock()
        .expect("cancel registry")
        .values()
        .map(|make| make())
        .collect();
    if requests.is_empty() {
        return;
    }
    let mut all = tokio::task::JoinSet::new();
    for r in requests {
        all.spawn(r);
    }
    let joined = async { while all.join_next().await.is_some() {} };
    if tokio::time::timeout(limit, joined).await.is_err() {
        tracing::warn!(
            "cancelling the statements in flight took over {}s; exiting anyway (the server \
             ends them when it next reads from their sockets, or at statement_timeout)",
            limit.as_secs()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    /// One test: the registry is the process's, shared by every test that runs at once.
    #[tokio::test]
    async fn cancels_what_is_registered_nothing_forgotten_and_gives_up_on_a_hang() {
        let hits = Arc::new(AtomicUsize::new(0));
        let make = |n: usize| -> MakeCancel {
            let hits = hits.clone();
            Box::new(move || {
                let hits = hits.clone();
                Box::pin(async move {
                    hits.fetch_add(n, Ordering::SeqCst);
                })
            })
        };
        let a = register(make(1));
        let b = register(make(10));
        forget(a);
        cancel_all(Duration::from_secs(5)).await;
        assert_eq!(hits.load(Ordering::SeqCst), 10);
        let hung = register(Box::new(|| Box::pin(std::future::pending())));
        let started = std::time::Instant::now();
        cancel_all(Duration::from_millis(50)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(hits.load(Ordering::SeqCst), 20);
        forget(b);
        forget(hung);
    }
}
