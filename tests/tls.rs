//! TLS to Postgres against a real server: sslmode from the URL, certificates checked against
//! a test CA, and clear errors when they do not match. The tests that need TLS on the server
//! start a private cluster with TLS (tests/common/cluster.rs): the machine's Postgres is never
//! reconfigured.

mod common;
use common::cluster::{ClusterOpts, PgCluster, unrelated_ca};
use common::{TestDb, count, make_table, run};
use std::path::PathBuf;
use tokio_postgres::Client;

const ROWS: i64 = 300;

/// A job over `t` that records in `n` whether its own session is encrypted: 1 = TLS, 2 = plain.
/// Each call is a job of its own (file `job<N>.yaml`), so none is skipped as already done; the
/// same spec under a new name, run knowingly (`--rerun`, which the twin check asks for).
fn spec(db: &TestDb, url: &str) -> PathBuf {
    let n = std::fs::read_dir(db.dir.path()).map_or(0, |d| d.count());
    db.spec(
        &format!("job{n}.yaml"),
        &format!(
            "postgres:
  url: '{url}'
  table: t
  key: id
  statement: |
    UPDATE t SET n = CASE WHEN (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())
                          THEN 1 ELSE 2 END
     WHERE id = ANY($1)
batch: {{size: 100, target: 0}}
"
        ),
    )
}

/// A database holding `t` on the local server (tests that need no TLS on the server).
async fn setup(hint: &str) -> (TestDb, Client) {
    let db = TestDb::new(hint).await;
    let c = db.client().await;
    make_table(&c, ROWS).await;
    (db, c)
}

/// A private cluster with TLS (a fresh test CA, a certificate for 127.0.0.1 and localhost) and a
/// database holding `t` on it.
async fn setup_tls(hint: &str) -> (PgCluster, TestDb, Client) {
    let pg = PgCluster::start(ClusterOpts::new().tls()).await;
    let db = pg.create_db(hint).await;
    let c = db.client().await;
    make_table(&c, ROWS).await;
    (pg, db, c)
}

/// The CA that signed the cluster's certificate, as a string for URLs.
fn server_ca(pg: &PgCluster) -> String {
    pg.ca_path().display().to_string()
}

/// Run the job at `url`; expect exit 0 with every row marked `n` (1 = TLS, 2 = plain).
async fn runs_with(db: &TestDb, c: &Client, url: &str, n: i64) {
    let (code, out, err) = run(&[&"run", &"--rerun", &spec(db, url)]);
    assert_eq!(code, 0, "{url}\n{out}\n{err}");
    let marked = count(c, &format!("SELECT count(*) FROM t WHERE n = {n}")).await;
    assert_eq!(
        marked,
        ROWS,
        "{url}: rows whose session had ssl = {}",
        n == 1
    );
}

/// The same database, reached through a host name that the certificate does not list.
fn unlisted_host_url(pg: &PgCluster, db: &TestDb, query: &str) -> String {
    format!(
        "postgres://postgres@not-in-the-cert.invalid:{}/{}?hostaddr=127.0.0.1&{query}",
        pg.port(),
        db.name
    )
}

#[tokio::test]
async fn require_prefer_and_disable() {
    let (_pg, db, c) = setup_tls("tls_modes").await;
    runs_with(&db, &c, &format!("{}?sslmode=require", db.url), 1).await;
    runs_with(&db, &c, &format!("{}?sslmode=disable", db.url), 2).await;
    // No sslmode: libpq's default, prefer, which uses TLS when the server offers it.
    runs_with(&db, &c, &db.url, 1).await;
    db.drop_db().await;
}

#[tokio::test]
async fn verify_full_with_the_right_ca() {
    let (pg, db, c) = setup_tls("tls_full").await;
    let ca = server_ca(&pg);
    let url = format!("{}?sslmode=verify-full&sslrootcert={ca}", db.url);
    runs_with(&db, &c, &url, 1).await;
    // libpq: require with a root certificate checks the chain like verify-ca.
    let url = format!("{}?sslrootcert={ca}&sslmode=require", db.url);
    runs_with(&db, &c, &url, 1).await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_wrong_ca_is_refused_with_a_clear_message() {
    let (_pg, db, c) = setup_tls("tls_wrong").await;
    let wrong = unrelated_ca(db.dir.path());
    let base = db.url.replace("postgres@", "postgres:s3cr3t-pw@");
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = format!("{base}?sslmode={mode}&sslrootcert={}", wrong.display());
        let (code, out, err) = run(&[&"run", &spec(&db, &url)]);
        assert_eq!(code, 1, "{mode}\n{out}\n{err}");
        for want in [
            format!("TLS certificate verification failed ({mode})"),
            "the server's certificate is not signed by the CA in sslrootcert".into(),
            wrong.display().to_string(),
            "check sslrootcert (the CA that signed the server's certificate)".into(),
            "postgres:***@127.0.0.1".into(),
        ] {
            assert!(err.contains(&want), "{mode}: want {want:?} in:\n{err}");
        }
        assert!(!err.contains("s3cr3t") && !out.contains("s3cr3t"), "{err}");
    }
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE n <> 0").await, 0);
    db.drop_db().await;
}

#[tokio::test]
async fn verify_ca_ignores_the_host_name_verify_full_does_not() {
    let (pg, db, c) = setup_tls("tls_name").await;
    let ca = server_ca(&pg);
    let url = unlisted_host_url(&pg, &db, &format!("sslmode=verify-ca&sslrootcert={ca}"));
    runs_with(&db, &c, &url, 1).await;

    let url = unlisted_host_url(&pg, &db, &format!("sslmode=verify-full&sslrootcert={ca}"));
    let (code, out, err) = run(&[&"run", &spec(&db, &url)]);
    assert_eq!(code, 1, "{out}\n{err}");
    for want in [
        "TLS certificate verification failed (verify-full)",
        "not valid for name \"not-in-the-cert.invalid\"",
        "127.0.0.1",
        "or use sslmode=verify-ca",
    ] {
        assert!(err.contains(want), "want {want:?} in:\n{err}");
    }
    db.drop_db().await;
}

#[tokio::test]
async fn a_missing_root_cert_file_is_named() {
    let (db, _c) = setup("tls_nofile").await;
    let missing = db.dir.path().join("no-such-ca.crt");
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        db.url,
        missing.display()
    );
    let (code, out, err) = run(&[&"run", &spec(&db, &url)]);
    assert_eq!(code, 1, "{out}\n{err}");
    let want = format!("cannot read sslrootcert file {}", missing.display());
    assert!(err.contains(&want), "want {want:?} in:\n{err}");
    assert!(err.contains("PEM file with the CA certificate"), "{err}");
    db.drop_db().await;
}

#[tokio::test]
async fn an_unknown_sslmode_is_a_spec_error() {
    let (db, _c) = setup("tls_badmode").await;
    let spec = spec(&db, &format!("{}?sslmode=verify", db.url));
    let (code, out, err) = run(&[&"validate", &spec]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("postgres.url") && err.contains("\"verify\" is not one of disable"),
        "{err}"
    );
    db.drop_db().await;
}
