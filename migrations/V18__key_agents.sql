-- warden schema, version 18: keys that report for some agents only.
--
-- A key handed to one machine used to be able to send heartbeats and
-- events for any agent id: a stolen or misconfigured key could keep a dead
-- agent looking alive. `agents` lists what the key may report for, each an
-- exact agent id or the start of one followed by `*` ("web-*"); NULL means
-- any agent, as before. The constraint holds hand-written rows to the form
-- `warden keys create --agent` checks: no empty pattern, no lone `*`
-- (which would allow every agent), no `*` but at the end.
ALTER TABLE warden.api_keys
    ADD COLUMN agents text[]
        CHECK (agents IS NULL
               OR (cardinality(agents) BETWEEN 1 AND 1000
                   AND array_position(agents, NULL) IS NULL
                   AND array_to_string(agents, ',') ~ '^[A-Za-z0-9._:-]+\*?(,[A-Za-z0-9._:-]+\*?)*$'));

COMMENT ON COLUMN warden.api_keys.agents IS
    'Agent ids this key may send heartbeats and events for: exact ids or prefixes ending in *; NULL for any agent.';
