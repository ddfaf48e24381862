-- oltp-read.sql: pgbench script for bench/oltp.sh — the application reading one show's entries
-- (about 50 rows through flowsheet_show_id_idx). Needs -D nshows=<number of shows>.
\set show random(1, :nshows)
SELECT count(*) FROM wxyc_schema.flowsheet WHERE show_id = :show;
