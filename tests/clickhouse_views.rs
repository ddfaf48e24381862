//! Materialized views that read from a ClickHouse target, on both servers (`ch_test!`). Chunks
//! land by attaching (or moving) partitions, which fires no materialized view, so a view on the
//! target never saw the backfilled rows, and the job ended done with exit 0. `plan` and `run`
//! now refuse such a target naming the views (exit 1, nothing written), and
//! `land_without_views: true` lands anyway with a warning. Asserts exit codes, messages and
//! what the tables hold.

mod common;
use common::ch::ChDb;
use common::days::build_days;
use common::run;
use std::path::PathBuf;

fn all_output(out: &str, err: &str) -> String {
    format!("--- stdout\n{out}--- stderr\n{err}")
}

fn spec(db: &ChDb, job: &str, extra: &str) -> PathBuf {
    db.spec(
        &format!("{job}.yaml"),
        &format!(
            "name: {job}
clickhouse:
  url: $URL
  source: runs
  time_column: ran_at
  chunks: [day]
  target: agg
{extra}  statement: |
    INSERT INTO {{target}}
    SELECT project_id, test_case_id, countState(), sumState(duration_ms)
      FROM runs WHERE {{chunk}} GROUP BY project_id, test_case_id
"
        ),
    )
}

ch_test! {
    #[test]
    fn a_target_that_feeds_a_materialized_view_is_refused_unless_the_spec_says(srv) {
        let db = ChDb::new_on(&srv, "views");
        build_days(&db, 3, 300);
        db.q("CREATE TABLE per_project (project_id UInt32, c UInt64)
              ENGINE = SummingMergeTree ORDER BY project_id");
        db.q("CREATE MATERIALIZED VIEW agg_counts TO per_project
              AS SELECT project_id, count() AS c FROM agg GROUP BY project_id");
        let view = format!("{}.agg_counts", db.name);

        let refused = spec(&db, "views", "");
        for cmd in ["plan", "run"] {
            let (code, out, err) = run(&[&cmd, &refused]);
            let all = all_output(&out, &err);
            assert_eq!(code, 1, "{cmd}: {all}");
            assert!(
                err.contains(&view) && err.contains("land_without_views"),
                "{cmd} names the view and the way out: {all}"
            );
        }
        assert_eq!(db.num("SELECT count() FROM agg"), 0, "nothing landed");
        assert!(db.records("views").is_empty(), "nothing recorded");

        // Not a boolean: the spec error names the field.
        let bad = spec(&db, "views", "  land_without_views: sometimes\n");
        let (code, out, err) = run(&[&"validate", &bad]);
        assert_eq!(code, 2, "{}", all_output(&out, &err));
        assert!(err.contains("land_without_views"), "{}", all_output(&out, &err));

        // Said so: the job lands, with a warning, and the view saw none of it.
        let allowed = spec(&db, "views", "  land_without_views: true\n");
        let (code, out, err) = run(&[&"run", &allowed]);
        let all = all_output(&out, &err);
        assert_eq!(code, 0, "{all}");
        assert!(err.contains(&view) && err.contains("WARN"), "{all}");
        assert_eq!(db.num("SELECT countMerge(runs) FROM agg"), 900);
        assert_eq!(db.num("SELECT count() FROM per_project"), 0);
    }
}
