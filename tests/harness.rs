//! The test harness itself against real servers: private Postgres clusters (start, restart,
//! stop, crash, terminate, settings, TLS, a password role, cleanup on drop), the fault proxy in
//! front of Postgres and of both ClickHouse servers (cut, refuse, dropped requests and responses,
//! Nth and seeded random faults, held requests), and the message when a server is down.

mod common;
use common::ch::{ChDb, ChServer};
use common::cluster::{ClusterOpts, PgCluster, unrelated_ca};
use common::proxy::{Fault, FaultProxy, Rule};
use common::{TestDb, connect, count};
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Whether a connection to this URL succeeds.
async fn connects(url: &str) -> bool {
    tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .is_ok()
}

/// One value from `psql` with a libpq connection string (TLS checks are libpq's own).
fn psql(conninfo: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-w", conninfo, "-c", sql])
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

// ------------------------------------------------------------------------------------------------
// Private Postgres clusters
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_cluster_is_private_and_gone_after_drop() {
    let pg = PgCluster::start_default().await;
    assert_ne!(pg.port(), 5432);
    let db = pg.create_db("h_private").await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2)")
        .await
        .unwrap();
    assert_eq!(count(&c, "SELECT count(*) FROM t").await, 2);
    let port: String = c
        .query_one("SELECT current_setting('port')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port, pg.port().to_string());
    // The database is on the cluster, not on the machine's server.
    let machine = connect(&common::admin_url()).await;
    assert_eq!(
        count(
            &machine,
            &format!(
                "SELECT count(*) FROM pg_database WHERE datname = '{}'",
                db.name
            )
        )
        .await,
        0
    );
    let data_dir: String = c
        .query_one("SELECT current_setting('data_directory')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(Path::new(&data_dir).is_dir());
    let url = pg.url("postgres");
    drop(c);
    drop(pg);
    assert!(!connects(&url).await, "the server still answers after drop");
    assert!(!Path::new(&data_dir).exists(), "{data_dir} left behind");
}

#[tokio::test]
async fn a_cluster_is_stopped_when_its_test_panics() {
    let (tx, rx) = std::sync::mpsc::channel();
    let test = tokio::spawn(async move {
        let pg = PgCluster::start_default().await;
        tx.send(pg.url("postgres")).unwrap();
        panic!("the test fails while its cluster runs");
    });
    assert!(test.await.unwrap_err().is_panic());
    let url = rx.recv().unwrap();
    assert!(!connects(&url).await, "the server outlived the panic");
}

#[tokio::test]
async fn restart_ends_sessions_and_keeps_committed_rows() {
    let pg = PgCluster::start_default().await;
    let db = pg.create_db("h_restart").await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100)")
        .await
        .unwrap();
    pg.restart().await;
    assert!(
        c.query_one("SELECT 1", &[]).await.is_err(),
        "a session survived the restart"
    );
    let c = db.client().await;
    assert_eq!(count(&c, "SELECT count(*) FROM t").await, 100);

    pg.stop().await;
    assert!(!connects(&db.url).await, "answers while stopped");
    pg.start_again().await;
    let c = db.client().await;
    c.batch_execute("INSERT INTO t VALUES (101)").await.unwrap();
    pg.crash().await;
    assert!(!connects(&db.url).await, "answers after the crash");
    pg.start_again().await;
    let c = db.client().await;
    assert_eq!(
        count(&c, "SELECT count(*) FROM t").await,
        101,
        "a committed row was lost in the crash"
    );
}

#[tokio::test]
async fn terminate_ends_the_matching_sessions_only() {
    let pg = PgCluster::start_default().await;
    let db = pg.create_db("h_term").await;
    let victim1 = connect(&format!("{}?application_name=victim-1", db.url)).await;
    let victim2 = connect(&format!("{}?application_name=victim-2", db.url)).await;
    let bystander = connect(&format!("{}?application_name=bystander", db.url)).await;
    assert_eq!(pg.terminate("victim-%").await, 2);
    assert!(victim1.query_one("SELECT 1", &[]).await.is_err());
    assert!(victim2.query_one("SELECT 1", &[]).await.is_err());
    assert_eq!(count(&bystander, "SELECT 7::bigint").await, 7);
    assert_eq!(pg.terminate("victim-%").await, 0);
}

#[tokio::test]
async fn settings_at_start_and_set_apply_to_this_cluster_only() {
    let pg = PgCluster::start(ClusterOpts::new().setting("idle_session_timeout", "5min")).await;
    let show = async |url: &str| -> String {
        connect(url)
            .await
            .query_one("SELECT current_setting('idle_session_timeout')", &[])
            .await
            .unwrap()
            .get(0)
    };
    assert_eq!(show(&pg.url("postgres")).await, "5min");
    let machine_before = show(&common::admin_url()).await;
    pg.set("idle_session_timeout", "1000ms").await;
    assert_eq!(show(&pg.url("postgres")).await, "1s");
    assert_eq!(show(&common::admin_url()).await, machine_before);
    // The setting really acts: an idle session is ended by the server.
    let idle = pg.admin().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !idle.is_closed() {
        assert!(
            Instant::now() < deadline,
            "idle session still open after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn tls_cluster_serves_a_certificate_of_its_ca_only() {
    let pg = PgCluster::start(ClusterOpts::new().tls()).await;
    let base = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        pg.port()
    );
    let ssl = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    let ca = pg.ca_path();
    for mode in ["verify-full", "verify-ca"] {
        let conninfo = format!("{base} sslmode={mode} sslrootcert={}", ca.display());
        assert_eq!(psql(&conninfo, ssl).as_deref(), Ok("t"), "{mode}");
    }
    assert_eq!(
        psql(&format!("{base} sslmode=disable"), ssl).as_deref(),
        Ok("f")
    );
    let dir = tempfile::tempdir().unwrap();
    let wrong = unrelated_ca(dir.path());
    let err = psql(
        &format!("{base} sslmode=verify-ca sslrootcert={}", wrong.display()),
        ssl,
    )
    .unwrap_err();
    assert!(err.contains("certificate verify failed"), "{err}");
}

#[tokio::test]
async fn password_role_needs_its_password_postgres_does_not() {
    let pg = PgCluster::start(ClusterOpts::new().password_role("bf_pw", "right-pw")).await;
    let url = |user: &str| format!("postgres://{user}@127.0.0.1:{}/postgres", pg.port());
    assert!(connects(&url("bf_pw:right-pw")).await);
    let err = tokio_postgres::connect(&url("bf_pw:wrong-pw"), tokio_postgres::NoTls)
        .await
        .err()
        .expect("a wrong password was accepted");
    let reason = err.as_db_error().map(|e| e.message().to_string());
    assert!(
        reason
            .as_deref()
            .is_some_and(|m| m.contains("password authentication failed")),
        "{err:?}"
    );
    assert!(connects(&url("postgres")).await);
}

// ------------------------------------------------------------------------------------------------
// The fault proxy in front of Postgres (plain TCP)
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_passes_postgres_then_cuts_and_refuses() {
    let db = TestDb::new("h_tcpproxy").await;
    let upstream = {
        let u = url::Url::parse(&db.url).unwrap();
        format!("{}:{}", u.host_str().unwrap(), u.port().unwrap_or(5432))
            .parse()
            .unwrap()
    };
    let proxy = FaultProxy::start(upstream).await;
    let via = proxy.url_for(&db.url);
    assert!(via.contains(&proxy.addr().port().to_string()), "{via}");
    let c1 = connect(&via).await;
    let c2 = connect(&via).await;
    assert_eq!(count(&c1, "SELECT 1::bigint").await, 1);
    assert_eq!(proxy.cut_all().await, 2);
    assert!(c1.query_one("SELECT 1", &[]).await.is_err());
    assert!(c2.query_one("SELECT 1", &[]).await.is_err());
    let c3 = connect(&via).await;
    assert_eq!(count(&c3, "SELECT 3::bigint").await, 3);

    proxy.refuse().await;
    let err = tokio_postgres::connect(&via, tokio_postgres::NoTls)
        .await
        .err()
        .expect("connected while refusing");
    assert!(format!("{err:?}").contains("ConnectionRefused"), "{err:?}");
    assert_eq!(
        count(&c3, "SELECT 4::bigint").await,
        4,
        "an open connection survives a refusal"
    );
    proxy.accept_again().await;
    assert!(connects(&via).await);

    // A refusal for a while ends by itself.
    proxy.refuse_for(Duration::from_millis(300)).await;
    assert!(!connects(&via).await);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !connects(&via).await {
        assert!(Instant::now() < deadline, "still refusing after 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = proxy.stats();
    assert_eq!((stats.cut, stats.refusals), (2, 2), "{stats:?}");
    drop((c1, c2, c3));
    db.drop_db().await;
}

// ------------------------------------------------------------------------------------------------
// The fault proxy in front of ClickHouse (HTTP)
// ------------------------------------------------------------------------------------------------

/// A statement through `server` (e.g. a proxy's URL), off the async threads.
async fn q_via(server: &ChServer, db: &str, sql: &str) -> Result<String, String> {
    let (server, db, sql) = (server.clone(), db.to_string(), sql.to_string());
    tokio::task::spawn_blocking(move || server.try_query(Some(&db), &sql))
        .await
        .unwrap()
}

/// A database with `t (k UInt64)` and a proxy in front of its server.
fn ch_setup(srv: &ChServer, hint: &str) -> ChDb {
    let db = ChDb::new_on(srv, hint);
    db.q("CREATE TABLE t (k UInt64) ENGINE = MergeTree ORDER BY k");
    db
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_proxy_forwards_keep_alive_chunked_and_100_continue(srv) {
        srv.check_up();
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let addr = proxy.addr();
        let raw = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            let q1 = "SELECT 101";
            let q4 = "SELECT 404";
            let req = format!(
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{q1}\
                 POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                 7\r\nSELECT \r\n3\r\n202\r\n0\r\n\r\n\
                 GET /?query=SELECT%20303 HTTP/1.1\r\nHost: x\r\n\r\n\
                 POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close\r\n\
                 Content-Length: {}\r\n\r\n{q4}",
                q1.len(),
                q4.len()
            );
            s.write_all(req.as_bytes()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out).unwrap();
            String::from_utf8_lossy(&out).into_owned()
        })
        .await
        .unwrap();
        let at = |needle: &str| {
            raw.find(needle)
                .unwrap_or_else(|| panic!("{needle:?} not in:\n{raw}"))
        };
        assert!(at("101\n") < at("202\n") && at("202\n") < at("303\n") && at("303\n") < at("404\n"));
        assert_eq!(raw.matches("HTTP/1.1 200").count(), 4, "{raw}");
        assert!(raw.contains("HTTP/1.1 100 Continue"), "{raw}");
        let stats = proxy.stats();
        assert_eq!(
            (stats.connections, stats.requests, stats.forwarded),
            (1, 4, 4),
            "{stats:?}"
        );
    }
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_request_never_reaches_the_server(srv) {
        let db = ch_setup(&srv, "h_dropreq");
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let via = srv.at(&proxy.http_url());
        let rule = proxy.add_rule(Rule::new(Fault::DropRequest).when_contains("INSERT INTO t").times(1));
        assert_eq!(q_via(&via, &db.name, "SELECT 5").await.as_deref(), Ok("5\n"));
        let r = q_via(&via, &db.name, "INSERT INTO t VALUES (1)").await;
        assert!(r.is_err(), "{r:?}");
        assert_eq!(db.num("SELECT count() FROM t"), 0, "the dropped insert ran");
        assert_eq!(q_via(&via, &db.name, "INSERT INTO t VALUES (2)").await, Ok(String::new()));
        assert_eq!(db.q("SELECT k FROM t"), "2\n");
        assert_eq!((proxy.rule_matched(rule), proxy.rule_fired(rule)), (1, 1));
        let stats = proxy.stats();
        assert_eq!((stats.dropped_requests, stats.forwarded), (1, 2), "{stats:?}");
        let events = proxy.events();
        assert!(
            events.iter().any(|e| e.what == "dropped request" && e.detail.contains("INSERT INTO t VALUES (1)")),
            "{events:?}"
        );
    }
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_response_ran_on_the_server(srv) {
        let db = ch_setup(&srv, "h_dropresp");
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let via = srv.at(&proxy.http_url());
        proxy.add_rule(Rule::new(Fault::DropResponse).when_contains("INSERT INTO t"));
        let r = q_via(&via, &db.name, "INSERT INTO t SELECT number FROM numbers(10)").await;
        assert!(r.is_err(), "the client got an answer: {r:?}");
        assert_eq!(db.num("SELECT count() FROM t"), 10, "the insert did not run");
        assert_eq!(proxy.stats().dropped_responses, 1);
    }
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nth_and_seeded_random_faults_are_repeatable(srv) {
        let db = ch_setup(&srv, "h_nth");
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let via = srv.at(&proxy.http_url());
        let nth = proxy.add_rule(Rule::new(Fault::DropRequest).when_contains("SELECT 42").nth(2));
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(q_via(&via, &db.name, "SELECT 42").await.is_ok());
        }
        assert_eq!(got, [true, false, true]);
        assert_eq!((proxy.rule_matched(nth), proxy.rule_fired(nth)), (3, 1));
        assert!(q_via(&via, &db.name, "SELECT 43").await.is_ok(), "not matching");

        let pattern = async |seed: u64| {
            let proxy = FaultProxy::start_http(srv.addr()).await;
            let via = srv.at(&proxy.http_url());
            proxy.add_rule(Rule::new(Fault::DropResponse).when_contains("SELECT 7").random(0.5, seed));
            let mut oks = Vec::new();
            for _ in 0..16 {
                oks.push(q_via(&via, &db.name, "SELECT 7").await.is_ok());
            }
            assert_eq!(proxy.stats().dropped_responses as usize, oks.iter().filter(|o| !**o).count());
            oks
        };
        let first = pattern(7).await;
        assert_eq!(pattern(7).await, first, "same seed, other faults");
        assert!(first.contains(&true) && first.contains(&false), "{first:?}");
    }
}

ch_test! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_request_reaches_the_server_when_released(srv) {
        let db = ch_setup(&srv, "h_hold");
        let proxy = FaultProxy::start_http(srv.addr()).await;
        let via = srv.at(&proxy.http_url());
        proxy.add_rule(Rule::new(Fault::HoldUntilReleased).when_contains("INSERT INTO t"));
        let name = db.name.clone();
        let insert = tokio::spawn(async move {
            q_via(&via, &name, "INSERT INTO t VALUES (9)").await
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while proxy.stats().held == 0 {
            assert!(Instant::now() < deadline, "the insert never reached the proxy");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(db.num("SELECT count() FROM t"), 0, "a held request reached the server");
        assert!(!insert.is_finished());
        proxy.release_held();
        assert_eq!(insert.await.unwrap(), Ok(String::new()));
        assert_eq!(db.num("SELECT count() FROM t"), 1);
    }
}

/// 18.16 closes an idle keep-alive connection after 3 s (keep_alive_timeout): the client's
/// connection to the proxy stays usable, its next request goes over a new upstream connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_reconnects_when_the_server_closes_an_idle_connection() {
    let srv = ChServer::v18();
    srv.check_up();
    let proxy = FaultProxy::start_http(srv.addr()).await;
    let addr = proxy.addr();
    let ask = |s: &mut std::net::TcpStream, n: u32| {
        let q = format!("SELECT {n}");
        let req = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{q}",
            q.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        // The answer is short: read until its body shows up.
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains(&format!("{n}\n")) {
            let k = s.read(&mut buf).unwrap();
            assert!(
                k > 0,
                "connection closed: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..k]);
        }
    };
    let mut s = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        ask(&mut s, 11);
        s
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.stats().upstream_closed == 0 {
        assert!(
            Instant::now() < deadline,
            "the server kept the idle connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::task::spawn_blocking(move || ask(&mut s, 12))
        .await
        .unwrap();
    let stats = proxy.stats();
    assert_eq!(
        (stats.connections, stats.forwarded, stats.upstream_closed),
        (1, 2, 1),
        "{stats:?}"
    );
}

#[test]
fn an_unreachable_clickhouse_fails_naming_its_script() {
    for (srv, script) in [
        (ChServer::v18(), "scripts/services.sh"),
        (ChServer::current(), "scripts/clickhouse-current.sh"),
    ] {
        let down = srv.at("http://127.0.0.1:1");
        let err = std::panic::catch_unwind(|| ChDb::new_on(&down, "h_down"))
            .err()
            .expect("a database on a server that is down");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains(script), "{msg}");
    }
}
