-- warden schema, version 29: recently resolved incidents by an index.
--
-- The console's incidents page lists, and counts, the incidents resolved
-- in the last days (resolved_at > now() - N days) on every load and live
-- refresh. No index led to them: each read was a scan of every incident
-- ever kept. Retention keeps resolved incidents for months.
CREATE INDEX incidents_resolved_idx ON warden.incidents (resolved_at) WHERE state = 'resolved';
