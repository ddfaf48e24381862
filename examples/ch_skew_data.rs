//! Builds the skewed dataset of tests/clickhouse.rs into an existing ClickHouse database, for
//! scripts/ch-calibrate.sh: `cargo run --example ch_skew_data -- DATABASE [K]`.

#[allow(dead_code)]
#[path = "../tests/common/ch.rs"]
mod ch;
#[path = "../tests/common/skew.rs"]
mod skew;

fn main() {
    let mut args = std::env::args().skip(1);
    let db = args.next().expect("usage: ch_skew_data DATABASE [K]");
    let k = args
        .next()
        .filter(|v| !v.is_empty())
        .map_or(skew::SKEW_K, |v| v.parse().expect("K is a whole number"));
    skew::build_skew(
        &|sql| {
            ch::query(Some(&db), sql);
        },
        k,
        true,
    );
}
