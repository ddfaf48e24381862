-- demo-data.sql: (re)create the demo/benchmark dataset for the example backfill jobs.
--
--   psql -X -v ON_ERROR_STOP=1 -v rows=1000000 -d backfill_demo -f scripts/demo-data.sql
--
-- In the current database it drops and recreates:
--   wxyc_schema.auth_user   ~2000 users, 40% without a dj_name
--   wxyc_schema.shows       rows/50 shows; 10% have no primary DJ but a legacy_dj_name,
--                           5% have neither, ~1/7 have both (COALESCE order matters)
--   wxyc_schema.flowsheet   :rows entries, 50 per show, 90% 'track' and 10% 'talkset' /
--                           'breakpoint', dj_name all NULL  (job: flowsheet-dj-name)
--   ci.ci_builds            rows/4 builds, 30% 'pending'
--   ci.ci_pending_builds    empty  (job: populate the queue table from ci_builds)
-- Everything is derived from the row number with modulo arithmetic, so the same :rows always
-- gives the same data. Foreign keys and indexes are added after the load (much faster).

\set ON_ERROR_STOP on
\set QUIET on
\if :{?rows}
\else
\set rows 200000
\endif

-- Fails (and stops the script) unless rows is a whole number.
SELECT (:'rows')::bigint AS rows \gset
SELECT 2000 AS users,
       greatest(1, :rows / 50) AS nshows,
       :rows / 4 AS nbuilds
\gset
\echo demo-data: loading :rows flowsheet rows, :nshows shows, :users users, :nbuilds ci builds

SET client_min_messages = warning;
BEGIN;

DROP SCHEMA IF EXISTS wxyc_schema CASCADE;
DROP SCHEMA IF EXISTS ci CASCADE;
CREATE SCHEMA wxyc_schema;
CREATE SCHEMA ci;

-- Users: ids 1..2000; every 5th and every 5th+1 (40%) has no DJ name.
CREATE TABLE wxyc_schema.auth_user (
    id      int PRIMARY KEY,
    name    text NOT NULL,
    dj_name text
);
INSERT INTO wxyc_schema.auth_user (id, name, dj_name)
SELECT i,
       'User ' || i,
       CASE WHEN i % 5 IN (0, 1) THEN NULL ELSE 'DJ ' || i END
  FROM generate_series(1, :users) AS i;

-- Shows: primary DJ scattered over the users (7919 is prime, so every user gets shows).
--   i % 20 in (0, 10): no primary DJ, legacy name        (10%)
--   i % 20 = 5:        no primary DJ, no legacy name     (5%, entries stay NULL)
--   otherwise:         primary DJ; every 7th also has a legacy name
CREATE TABLE wxyc_schema.shows (
    id             int PRIMARY KEY,
    primary_dj_id  int,
    legacy_dj_name text
);
INSERT INTO wxyc_schema.shows (id, primary_dj_id, legacy_dj_name)
SELECT i,
       CASE WHEN i % 20 IN (0, 5, 10) THEN NULL ELSE 1 + (i * 7919) % :users END,
       CASE WHEN i % 20 IN (0, 10) OR (i % 20 <> 5 AND i % 7 = 0)
            THEN 'Legacy DJ ' || (i % 300) END
  FROM generate_series(1, :nshows) AS i;

-- Flowsheet: 50 consecutive entries per show (the remainder goes to the last show);
-- every 10th entry is a talkset or a breakpoint, the rest are tracks.
CREATE TABLE wxyc_schema.flowsheet (
    id         bigserial PRIMARY KEY,
    show_id    int,
    entry_type text NOT NULL,
    artist     text,
    track      text,
    dj_name    text
);
INSERT INTO wxyc_schema.flowsheet (id, show_id, entry_type, artist, track, dj_name)
SELECT i,
       least(:nshows, 1 + (i - 1) / 50),
       CASE WHEN i % 10 <> 0 THEN 'track'
            WHEN i % 20 = 0 THEN 'breakpoint'
            ELSE 'talkset' END,
       CASE WHEN i % 10 <> 0 THEN 'Artist ' || (i * 31) % 5003 END,
       CASE WHEN i % 10 <> 0 THEN 'Track ' || (i * 17) % 20011 END,
       NULL
  FROM generate_series(1, :rows) AS i;
SELECT setval(pg_get_serial_sequence('wxyc_schema.flowsheet', 'id'),
              greatest(:rows, 1), :rows > 0) AS flowsheet_id_seq \gset

ALTER TABLE wxyc_schema.shows
    ADD FOREIGN KEY (primary_dj_id) REFERENCES wxyc_schema.auth_user (id);
ALTER TABLE wxyc_schema.flowsheet
    ADD FOREIGN KEY (show_id) REFERENCES wxyc_schema.shows (id);
CREATE INDEX flowsheet_show_id_idx ON wxyc_schema.flowsheet (show_id);

-- CI builds: one per minute from 2025-01-01; statuses cycle so 30% are pending.
CREATE TABLE ci.ci_builds (
    id         bigint PRIMARY KEY,
    project_id int,
    status     text,
    created_at timestamptz
);
INSERT INTO ci.ci_builds (id, project_id, status, created_at)
SELECT i,
       1 + (i * 37) % 250,
       (ARRAY['pending', 'success', 'pending', 'failed', 'success',
              'pending', 'success', 'running', 'success', 'canceled'])[1 + i % 10],
       timestamptz '2025-01-01 00:00:00+00' + i * interval '1 minute'
  FROM generate_series(1, :nbuilds) AS i;

CREATE TABLE ci.ci_pending_builds (
    build_id   bigint PRIMARY KEY,
    project_id int,
    queued_at  timestamptz
);

COMMIT;

ANALYZE wxyc_schema.auth_user, wxyc_schema.shows, wxyc_schema.flowsheet,
        ci.ci_builds, ci.ci_pending_builds;

RESET client_min_messages;
SELECT format('demo-data: %s flowsheet rows (%s tracks), %s shows, %s users, %s ci builds (%s pending)',
              (SELECT count(*) FROM wxyc_schema.flowsheet),
              (SELECT count(*) FROM wxyc_schema.flowsheet WHERE entry_type = 'track'),
              (SELECT count(*) FROM wxyc_schema.shows),
              (SELECT count(*) FROM wxyc_schema.auth_user),
              (SELECT count(*) FROM ci.ci_builds),
              (SELECT count(*) FROM ci.ci_builds WHERE status = 'pending')) AS summary
\gset
\echo :summary
