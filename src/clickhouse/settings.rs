//! The settings the engine adds to a chunk's query, those the spec does not set itself: under a
//! memory cap every attempt spills at half the cap (`capped`), and a chunk that still runs out
//! of memory is tried once more lighter (`lighter`). Both sets are probed once before the first
//! chunk: a server whose profile forbids changing one (a settings constraint, readonly) runs the
//! chunks without that set instead of failing every chunk on it.

use super::client::{Server, exec};
use super::errors::refuses_setting;
use crate::error::Result;
use crate::spec::ClickhouseSpec;

pub type Settings = Vec<(&'static str, String)>;

/// The smallest memory cap the engine spills under. Spilling has a memory cost of its own (the
/// merge of the spilled buckets: 10-20 MB measured on 18.16 and 26.9), so under a cap of tens
/// of MB a chunk that fitted as it was could fail with the spill (checked: a 33 MB GROUP BY under
/// a 40 MB cap); from a few hundred MB on, that cost is lost in the margin.
const MIN_SPILL_CAP: u64 = 256 << 20;

/// Settings every attempt carries under a memory cap: a GROUP BY or ORDER BY spills to disk at
/// half the cap instead of failing at the cap (ClickHouse's own advice for
/// `max_bytes_before_external_group_by`); and, on servers that squash insert blocks in memory
/// (`Server::squashes_in_memory`), the INSERT writes blocks of at most 262,144 rows rather than
/// a million (a quarter of the memory, four times the parts of the default; 18.16 keeps its
/// default, so a copy of many rows makes no more parts there than before). A chunk whose GROUP
/// BY stays under half the cap runs as before; a bigger one is saved a failed attempt and the
/// slower lighter retry (bench/README.md: the skewed month, on 18.16 and 26.9). Nothing under a
/// cap below `MIN_SPILL_CAP`.
pub fn capped(spec: &ClickhouseSpec, cap: u64, server: &Server) -> Settings {
    if cap < MIN_SPILL_CAP {
        return Vec::new();
    }
    let half = (cap / 2).to_string();
    let mut want = vec![
        ("max_bytes_before_external_group_by", half.clone()),
        ("max_bytes_before_external_sort", half),
    ];
    if server.squashes_in_memory {
        want.push(("min_insert_block_size_rows", "262144".to_string()));
    }
    unset(spec, want)
}

/// Settings that make an `INSERT ... SELECT ... GROUP BY` use less memory: one thread, small
/// blocks, insert blocks not squashed beyond a quarter of the memory cap, and a GROUP BY that
/// spills to disk at a quarter of it. (Measured on 18.16 and 26.9: the skewed test month needs
/// 58 MB as it is, and fits in 26 MB like this.)
pub fn lighter(spec: &ClickhouseSpec, cap: u64) -> Settings {
    let mut want = vec![
        ("max_threads", "1".to_string()),
        ("max_block_size", "8192".to_string()),
        ("min_insert_block_size_rows", "8192".to_string()),
    ];
    if cap > 0 {
        want.push(("max_bytes_before_external_group_by", (cap / 4).to_string()));
        want.push(("min_insert_block_size_bytes", (cap / 4).to_string()));
    }
    unset(spec, want)
}

/// Those of `want` the spec leaves alone.
fn unset(spec: &ClickhouseSpec, want: Settings) -> Settings {
    want.into_iter()
        .filter(|(k, _)| !spec.settings.iter().any(|(s, _)| s == k))
        .collect()
}

/// `client` with `set` on top (later settings win over earlier ones of the same name).
pub fn with(client: &clickhouse::Client, set: &[(&'static str, String)]) -> clickhouse::Client {
    set.iter()
        .fold(client.clone(), |c, (k, v)| c.with_setting(*k, v.clone()))
}

/// Those of `set` the server takes with the spec's settings, one by one; each it refuses (an
/// unknown setting, a readonly profile, a settings constraint) is left out with a warning.
/// Any other error (the network, a busy server) is the preflight's to report.
pub async fn probe(client: &clickhouse::Client, set: Settings, what: &str) -> Result<Settings> {
    let mut kept = Vec::with_capacity(set.len());
    for (k, v) in set {
        let one = [(k, v)];
        match exec(&with(client, &one), "SELECT 1", "").await {
            Ok(()) => kept.extend(one),
            Err(e) if refuses_setting(&e) => tracing::warn!(
                "the server refuses the {what} setting {k}: chunks run without it: {}",
                e.to_string().trim_start_matches(": ")
            ),
            Err(e) => return Err(e),
        }
    }
    Ok(kept)
}
