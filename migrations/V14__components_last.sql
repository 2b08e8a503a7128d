-- agent_status.components moves to the end of the row.
--
-- Every heartbeat rewrites its agent's row. When the new version lands on
-- the same page (a HOT update, almost always here), PostgreSQL logs only
-- the bytes between the first and the last that differ from the old one.
-- components (about 500 bytes once an agent has been scored) sat between
-- columns every heartbeat changes (last_seen ... beats_decayed), so every
-- heartbeat logged it again although only the score pass changes it:
-- about 1,040 bytes of WAL per heartbeat against 580 with it last
-- (BENCHMARKS.md, "Ingest (2026-12-05)"). Keep columns that ingest writes
-- ahead of it.
--
-- With wal_level = logical PostgreSQL logs every updated row whole, and
-- this changes nothing.
--
-- PostgreSQL cannot reorder columns; adding a new one and dropping the old
-- leaves a dropped-column slot, which costs a bit in each row's null
-- bitmap. The copy rewrites every row once (clearing the old column, so
-- rows do not grow), under the lock ALTER TABLE takes: heartbeats to this
-- database wait for it, seconds per 100,000 agents. Behind a long query on
-- agent_status the lock would keep them waiting as long; the migration
-- gives up instead (warden reports it and exits; start it again).
SET LOCAL lock_timeout = '10s';
ALTER TABLE warden.agent_status ADD COLUMN components_moved jsonb;
UPDATE warden.agent_status SET components_moved = components, components = NULL WHERE components IS NOT NULL;
ALTER TABLE warden.agent_status DROP COLUMN components;
ALTER TABLE warden.agent_status RENAME COLUMN components_moved TO components;
-- Migrations run in one transaction; later ones wait as long as they need.
RESET lock_timeout;
