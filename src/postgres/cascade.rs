//! The relations a write of one table reaches, as SQL the checks of `plan` share (`hidden`,
//! `triggers`, `effects`): the table, its partitions and inheritance children, and what a
//! foreign key's cascading action writes from them.

/// The edges from a table to what a write of it also writes: parent to partition or child, and
/// a referenced table to the table whose foreign key cascades from it (ON DELETE/UPDATE
/// CASCADE, SET NULL, SET DEFAULT), as `(src, dst)`.
macro_rules! edges {
    () => {
        "SELECT inhparent AS src, inhrelid AS dst FROM pg_inherits
         UNION ALL
         SELECT confrelid, conrelid FROM pg_constraint
          WHERE contype = 'f'
            AND (confdeltype NOT IN ('a', 'r') OR confupdtype NOT IN ('a', 'r'))"
    };
}

/// `edges!`, as a value.
pub const EDGES: &str = edges!();

/// The relations a write of `$1.$2` reaches (`written`), transitively over `EDGES`.
pub const WRITTEN: &str = concat!(
    "WITH RECURSIVE edges(src, dst) AS (",
    edges!(),
    "), written(rel) AS (
        SELECT (SELECT k.oid FROM pg_class k JOIN pg_namespace n ON n.oid = k.relnamespace
                 WHERE n.nspname = $1::text AND k.relname = $2::text)
        UNION
        SELECT e.dst FROM written w JOIN edges e ON e.src = w.rel
    )"
);
