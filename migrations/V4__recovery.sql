-- warden schema, version 4: the recovery engine.
--
-- A job is the recovery of one incident (or a manual run for an agent). It
-- lives here, not in any process, so a replica can die at any point and
-- another picks the job up: jobs are claimed with FOR UPDATE SKIP LOCKED
-- and a lease, and every attempt is a recovery_actions row written before
-- it starts and finished after.

CREATE TABLE warden.recovery_jobs (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- NULL for a manual run (POST /v1/agents/{id}/recover).
    incident_id       bigint UNIQUE REFERENCES warden.incidents (id),
    agent_id          text COLLATE "C" NOT NULL,
    strategy          text NOT NULL,
    -- pending: waiting to run its first or next attempt (at next_run_at)
    -- running: an action is executing (lease_owner holds it until lease_until)
    -- verifying: the action finished; waiting for the agent to come back
    -- succeeded / exhausted / cancelled: over
    state             text NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'running', 'verifying', 'succeeded', 'exhausted', 'cancelled')),
    manual            boolean NOT NULL DEFAULT false,
    -- Position in the strategy's action list, and attempts made with it.
    action_index      integer NOT NULL DEFAULT 0 CHECK (action_index >= 0),
    action_attempts   integer NOT NULL DEFAULT 0 CHECK (action_attempts >= 0),
    attempts          integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_run_at       timestamptz NOT NULL DEFAULT now(),
    verify_until      timestamptz,
    current_action_id bigint REFERENCES warden.recovery_actions (id),
    lease_owner       text,
    lease_until       timestamptz,
    -- Attempts before this moment do not count against the attempt limit
    -- (set when an operator resets an exhausted recovery).
    window_start      timestamptz,
    outcome           text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    CHECK ((state IN ('succeeded', 'exhausted', 'cancelled')) = (finished_at IS NOT NULL))
);

CREATE INDEX recovery_jobs_due_idx ON warden.recovery_jobs (next_run_at) WHERE state = 'pending';
CREATE INDEX recovery_jobs_active_idx ON warden.recovery_jobs (state) WHERE state IN ('running', 'verifying');
CREATE INDEX recovery_jobs_agent_idx ON warden.recovery_jobs (agent_id, created_at);

-- Which job an action row belongs to.
ALTER TABLE warden.recovery_actions ADD COLUMN job_id bigint REFERENCES warden.recovery_jobs (id);
CREATE INDEX recovery_actions_job_idx ON warden.recovery_actions (job_id);
CREATE INDEX recovery_actions_started_idx ON warden.recovery_actions (agent_id, started_at);
