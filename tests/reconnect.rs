//! Every connection of a run killed by the server mid-run (pg_terminate_backend), the worker's
//! own included (it holds the worker's slot and range locks): the worker reconnects, takes its
//! slot and its range again, resumes from the committed checkpoint, and every row is done
//! exactly once. The same for connections cut while the run is still starting.

mod common;
use common::proxy::FaultProxy;
use common::runner::spawn;
use common::{TestDb, backfill, count};
use std::time::{Duration, Instant};

/// `src(id, v)` with `rows` rows, and an unconstrained `dst(id, v)` (a batch applied twice
/// shows as duplicate ids there).
async fn copy_tables(c: &tokio_postgres::Client, rows: i64) {
    c.batch_execute(&format!(
        "CREATE TABLE src (id bigint PRIMARY KEY, v int);
         INSERT INTO src SELECT i, i % 7 FROM generate_series(1, {rows}) i;
         CREATE TABLE dst (id bigint, v int);"
    ))
    .await
    .unwrap();
}

/// The Postgres server `db` is on, for a proxy in front of it.
fn server_of(db: &TestDb) -> std::net::SocketAddr {
    let u = url::Url::parse(&db.url).unwrap();
    format!("{}:{}", u.host_str().unwrap(), u.port().unwrap_or(5432))
        .parse()
        .unwrap()
}

/// `dst` holds every one of `rows` ids of `src`, each once.
async fn every_row_once(c: &tokio_postgres::Client, rows: i64) {
    assert_eq!(count(c, "SELECT count(*) FROM dst").await, rows);
    assert_eq!(count(c, "SELECT count(DISTINCT id) FROM dst").await, rows);
}

/// The lock `tx` holds is let go (a moment after a cut, so the run has seen it): the run
/// that waited for it, having reconnected, ends done (0) with every one of 3000 rows once.
async fn let_go_and_finish(
    tx: tokio_postgres::Transaction<'_>,
    r: common::runner::Running,
    c: &tokio_postgres::Client,
) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.rollback().await.unwrap();
    let (code, out, err) = r.finish(Duration::from_secs(120)).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("retrying"), "{err}");
    every_row_once(c, 3000).await;
}

/// A copy job of `rows` rows through a proxy (small batches, 1 s timeouts), run until `first`
/// rows are in `dst`: the proxy, the spec and the run, for a test to make the network go
/// silent under.
async fn copy_through_proxy(
    db: &TestDb,
    c: &tokio_postgres::Client,
    rows: i64,
    first: i64,
) -> (FaultProxy, std::path::PathBuf, common::runner::Running) {
    copy_tables(c, rows).await;
    let proxy = FaultProxy::start(server_of(db)).await;
    let spec = db.spec(
        "copy.yaml",
        &format!(
            "name: copy
postgres:
  url: {}
  table: src
  key: id
  statement: INSERT INTO dst SELECT id, v FROM src WHERE id = ANY($1)
batch: {{size: 100, target: 0, pause: 20ms}}
limits: {{statement_timeout: 1s, lock_timeout: 1s}}
",
            proxy.url_for(&db.url)
        ),
    );
    let mut r = spawn(db.dir.path(), "run", &[], &spec);
    r.wait_until(
        "the first batches",
        Duration::from_secs(60),
        Duration::from_millis(20),
        async || count(c, "SELECT count(*) FROM dst").await >= first,
    )
    .await;
    (proxy, spec, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_batch_connection_is_replaced_without_double_apply() {
    let db = TestDb::new("reconnect").await;
    let c = db.client().await;
    copy_tables(&c, 12000).await;
    let spec = db.spec(
        "copy.yaml",
        "name: copy
postgres:
  url: $URL
  table: src
  key: id
  statement: INSERT INTO dst SELECT id, v FROM src WHERE id = ANY($1)
batch: {size: 200, target: 0, pause: 30ms}
",
    );
    let mut child = backfill().arg("run").arg(&spec).spawn().unwrap();
    // Every session of the run: the worker's (with its advisory locks) and the pooled ones.
    let batch_backend = "SELECT pid FROM pg_stat_activity
         WHERE application_name = 'backfill:copy' AND datname = current_database()";
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while kills < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if child.try_wait().unwrap().is_some() {
            break;
        }
        let done = count(&c, "SELECT count(*) FROM dst").await;
        if done < 2000 * (kills + 1) {
            continue;
        }
        let killed = c
            .query(
                &format!("SELECT pg_terminate_backend(pid) FROM ({batch_backend}) b"),
                &[],
            )
            .await
            .unwrap();
        if !killed.is_empty() {
            kills += 1;
        }
    }
    let status = child.wait().unwrap();
    assert_eq!(
        kills, 3,
        "the run ended before its connection could be killed 3 times"
    );
    assert_eq!(status.code(), Some(0));
    every_row_once(&c, 12000).await;
    assert_eq!(
        count(
            &c,
            &format!(
                "SELECT keys_done FROM {} WHERE job = 'copy' AND status = 'done'",
                common::store::JOB_VIEW
            )
        )
        .await,
        12000
    );
    db.drop_db().await;
}

/// Connections cut while the run is still starting (its preflight waits for the table's lock)
/// are opened again, as they are mid-run: before, the start-up steps failed the run with exit 1
/// on the first lost connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_during_start_up_are_opened_again() {
    let db = TestDb::new("reconnect_start").await;
    let c = db.client().await;
    copy_tables(&c, 3000).await;
    let proxy = FaultProxy::start(server_of(&db)).await;
    let spec = db.spec(
        "copy.yaml",
        &format!(
            "name: copy
postgres:
  url: {}
  table: src
  key: id
  statement: INSERT INTO dst SELECT id, v FROM src WHERE id = ANY($1)
batch: {{size: 200, target: 0}}
limits:
  lock_timeout: 60s
",
            proxy.url_for(&db.url)
        ),
    );
    // A "migration" holds the table: the run starts anyway (--ignore-preflight) and its
    // preflight waits for the lock.
    let mut m = db.client().await;
    let tx = m.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE src IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut r = spawn(db.dir.path(), "run", &["--ignore-preflight"], &spec);
    let waiting = "SELECT pid FROM pg_stat_activity
         WHERE application_name = 'backfill:copy' AND datname = current_database()
           AND wait_event_type = 'Lock'";
    // A backend whose client was cut keeps waiting for the lock (the server notices only when
    // it next writes to the socket): each round waits for a session of the run it has not
    // cut yet.
    let mut cut: Vec<i32> = Vec::new();
    for round in 0..2 {
        let mut now: Vec<i32> = Vec::new();
        r.wait_until(
            "the run to wait for the table's lock",
            Duration::from_secs(60),
            Duration::from_millis(50),
            async || {
                now = c
                    .query(waiting, &[])
                    .await
                    .unwrap()
                    .iter()
                    .map(|row| row.get(0))
                    .collect();
                now.iter().any(|p| !cut.contains(p))
            },
        )
        .await;
        cut.extend(now);
        assert!(proxy.cut_all().await > 0, "round {round}: nothing to cut");
    }
    let_go_and_finish(tx, r, &c).await;
    drop(m);
    db.drop_db().await;
}

/// The run's very first read, of the job's state, on a session the server then ends (a
/// failover, a DBA's pg_terminate_backend): the server was reached, so this is a lost
/// connection, retried like the later start-up steps. It failed the run with exit 1 (the
/// failed-job alert) as if the address were wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ended_while_the_state_is_first_read_is_opened_again() {
    let db = TestDb::new("reconnect_load").await;
    let c = db.client().await;
    copy_tables(&c, 3000).await;
    c.batch_execute("CREATE TABLE other (id bigint PRIMARY KEY, n int)")
        .await
        .unwrap();
    let job = |name: &str, table: &str, statement: &str| {
        db.spec(
            &format!("{name}.yaml"),
            &format!(
                "name: {name}
postgres:
  url: $URL
  table: {table}
  key: id
  statement: {statement}
batch: {{size: 200, target: 0}}
"
            ),
        )
    };
    // Another job makes the store.
    let first = job(
        "first",
        "other",
        "UPDATE other SET n = 1 WHERE id = ANY($1)",
    );
    let (code, out, err) = common::run(&[&"run", &first]);
    assert_eq!(code, 0, "{out}\n{err}");
    // The store's jobs table held: the copy's first read waits, and its session is ended.
    let mut m = db.client().await;
    let tx = m.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE backfill.jobs IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let copy = job(
        "copy",
        "src",
        "INSERT INTO dst SELECT id, v FROM src WHERE id = ANY($1)",
    );
    let mut r = spawn(db.dir.path(), "run", &[], &copy);
    let waiting = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE application_name = 'backfill:copy' AND datname = current_database()
           AND wait_event_type = 'Lock'";
    r.wait_until(
        "the run's first read to wait, and its session ended",
        Duration::from_secs(60),
        Duration::from_millis(50),
        async || count(&c, waiting).await > 0,
    )
    .await;
    let_go_and_finish(tx, r, &c).await;
    drop(m);
    db.drop_db().await;
}

/// The network goes silent mid-run (packets dropped without a word: the socket stays open and
/// no error ever comes, and the server keeps the session). The run waited for the answer for
/// ever, its session's locks held, and neither `max_runtime` nor a SIGTERM could end it. A
/// batch's round trip now waits at most twice `statement_timeout` plus `lock_timeout` (and a
/// few seconds) before the connection is taken for lost: the worker drops it, reconnects, ends
/// its earlier session, still open on the server with the worker's slot (it used to stop
/// there with 75, "slot taken"), and the job finishes with every row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gone_silent_is_taken_for_lost_and_replaced() {
    let db = TestDb::new("silent").await;
    let c = db.client().await;
    let (proxy, _spec, r) = copy_through_proxy(&db, &c, 5000, 1000).await;
    proxy.freeze_open();
    let (code, out, err) = r.finish(Duration::from_secs(120)).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("no answer from the server"), "{err}");
    assert!(err.contains("ended this worker's earlier session"), "{err}");
    every_row_once(&c, 5000).await;
    db.drop_db().await;
}

/// The network goes silent while the job is paused: the worker asks every second whether it
/// still is, on its own connection, outside any batch. That question waited for its answer for
/// ever (as a range claim, a retry page or giving a range back did): after `unpause` the run
/// never went on, and neither `max_runtime` nor a SIGTERM could end it. Every round trip of a
/// worker now waits at most twice `statement_timeout` plus `lock_timeout` (and a few seconds):
/// the connection is taken for lost and replaced, and the job finishes with every row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gone_silent_while_paused_is_taken_for_lost_and_replaced() {
    let db = TestDb::new("silentpause").await;
    let c = db.client().await;
    let (proxy, spec, mut r) = copy_through_proxy(&db, &c, 3000, 500).await;
    let control = |cmd: &str| {
        let out = backfill().arg(cmd).arg(&spec).output().unwrap();
        assert!(out.status.success(), "{cmd}: {out:?}");
    };
    control("pause");
    r.wait_until(
        "the run to be paused",
        Duration::from_secs(60),
        Duration::from_millis(50),
        async || said_paused(&db),
    )
    .await;
    // The worker's connection, open now, goes silent; the controls connect anew.
    proxy.freeze_open();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    control("unpause");
    let (code, out, err) = r.finish(Duration::from_secs(90)).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("reading the pause flag: no answer"), "{err}");
    every_row_once(&c, 3000).await;
    db.drop_db().await;
}

/// Whether the run writing `run.err` in `db`'s directory has said it is paused.
fn said_paused(db: &TestDb) -> bool {
    std::fs::read_to_string(db.dir.path().join("run.err"))
        .unwrap_or_default()
        .contains("waiting for unpause")
}
