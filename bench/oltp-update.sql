-- oltp-update.sql: pgbench script for bench/oltp.sh — the application writing one flowsheet row.
-- Needs -D rows=<flowsheet rows>. Touches no column the backfill job reads or writes.
\set id random(1, :rows)
UPDATE wxyc_schema.flowsheet SET artist = artist WHERE id = :id;
