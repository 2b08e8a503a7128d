-- warden schema, version 5: alerting.
--
-- warden.alerts is the transactional outbox the evaluator writes (one row
-- per incident, in the incident's own statement). The escalator, one
-- replica at a time, reads it and decides what to send; every message it
-- decides on is a warden.alert_deliveries row, which the dispatchers of all
-- replicas claim with FOR UPDATE SKIP LOCKED and send. warden.alert_notifications
-- is the ledger of which alert was told what on which channel: its primary
-- key (alert, channel, kind, level, sequence) makes every notification
-- happen at most once, whatever replicas do.
--
-- Contract columns are untouched; this migration only adds.

-- What the escalator remembers about each alert.
ALTER TABLE warden.alerts
    -- Where the alert comes from: an incident, or a failing channel.
    ADD COLUMN source            text NOT NULL DEFAULT 'incident' CHECK (source IN ('incident', 'channel')),
    -- Agent id (incident alerts; NULL for the fleet) or channel name.
    ADD COLUMN subject           text COLLATE "C",
    -- Issue type, or 'channel_failing'.
    ADD COLUMN issue             text,
    ADD COLUMN summary           text,
    -- Route and policy the alert was sent by (fixed at its first message).
    ADD COLUMN route             text,
    ADD COLUMN policy            text,
    -- The group it waits in for its first message (see alert_groups).
    ADD COLUMN group_id          bigint,
    -- When its first message went out: escalation levels count from here.
    ADD COLUMN paged_at          timestamptz,
    -- Repeats sent so far (escalation_level counts levels notified).
    ADD COLUMN repeats           integer NOT NULL DEFAULT 0 CHECK (repeats >= 0),
    -- Why nothing is being sent right now: silence:<id>, maintenance:<name>,
    -- dependency:<agent>, fleet_outage:<incident>, no_route. NULL: not suppressed.
    ADD COLUMN suppressed_reason text,
    -- The page waits for an automated recovery until this time.
    ADD COLUMN held_until        timestamptz,
    -- When the next escalation level or repeat is due.
    ADD COLUMN next_escalation_at timestamptz,
    ADD COLUMN ack_comment       text CHECK (char_length(ack_comment) <= 1024),
    -- The recovery engine gave up (system event recovery_failed) and the
    -- alert was paged or updated because of it.
    ADD COLUMN recovery_failed_at timestamptz,
    -- The escalator is done with it: resolved and its resolution sent.
    ADD COLUMN closed            boolean NOT NULL DEFAULT false;

-- Alerts resolved before alerting existed have nothing left to send.
UPDATE warden.alerts SET closed = true WHERE state = 'resolved';
UPDATE warden.alerts a SET subject = i.agent_id, issue = i.issue_type, summary = i.summary
FROM warden.incidents i WHERE i.id = a.incident_id;

CREATE INDEX alerts_active_idx ON warden.alerts (id) WHERE NOT closed;
CREATE INDEX alerts_state_idx ON warden.alerts (state, id);

-- Alerts that became ready together on one route and go out as one
-- message per channel at flush_at.
CREATE TABLE warden.alert_groups (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    route     text NOT NULL,
    opened_at timestamptz NOT NULL,
    flush_at  timestamptz NOT NULL,
    flushed   boolean NOT NULL DEFAULT false
);

CREATE INDEX alert_groups_route_idx ON warden.alert_groups (route, flush_at DESC);
CREATE UNIQUE INDEX alert_groups_one_pending_idx ON warden.alert_groups (route) WHERE NOT flushed;

ALTER TABLE warden.alerts
    ADD CONSTRAINT alerts_group_fk FOREIGN KEY (group_id) REFERENCES warden.alert_groups (id);

-- Deliveries: one message to one channel, covering one alert or a group.
ALTER TABLE warden.alert_deliveries
    -- Policy level (1-based; 0 for resolutions and channel alerts) and the
    -- repeat number.
    ADD COLUMN level            integer NOT NULL DEFAULT 0 CHECK (level >= 0),
    ADD COLUMN sequence         integer NOT NULL DEFAULT 0 CHECK (sequence >= 0),
    -- Every alert the message covers (alert_id is the first of them).
    ADD COLUMN alert_ids        bigint[] NOT NULL DEFAULT '{}',
    ADD COLUMN route            text,
    -- Sent with the message (Idempotency-Key) so receivers can drop a
    -- repeat after an at-least-once retry.
    ADD COLUMN idempotency_key  text NOT NULL DEFAULT gen_random_uuid()::text,
    -- What else the message says: auto_recovered_attempt, recovery_failed, ...
    ADD COLUMN detail           jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- Lease of the dispatcher sending it; an expired lease is retried.
    ADD COLUMN claimed_by       text,
    ADD COLUMN claimed_until    timestamptz,
    ADD COLUMN last_attempt_at  timestamptz,
    ADD COLUMN last_status_code integer,
    ADD COLUMN last_latency_ms  integer;

-- Deliveries made moot before they were sent (e.g. an escalation of an
-- alert acknowledged meanwhile).
ALTER TABLE warden.alert_deliveries DROP CONSTRAINT alert_deliveries_state_check;
ALTER TABLE warden.alert_deliveries ADD CONSTRAINT alert_deliveries_state_check
    CHECK (state IN ('pending', 'sent', 'dead', 'cancelled'));

CREATE UNIQUE INDEX alert_deliveries_idempotency_idx ON warden.alert_deliveries (idempotency_key);
CREATE INDEX alert_deliveries_alert_ids_idx ON warden.alert_deliveries USING gin (alert_ids);
CREATE INDEX alert_deliveries_pending_channel_idx ON warden.alert_deliveries (channel, id) WHERE state = 'pending';

-- The ledger: which alert was told what, on which channel, by which message.
CREATE TABLE warden.alert_notifications (
    alert_id    bigint NOT NULL REFERENCES warden.alerts (id),
    channel     text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('firing', 'escalation', 'repeat', 'resolved')),
    level       integer NOT NULL,
    sequence    integer NOT NULL,
    delivery_id bigint REFERENCES warden.alert_deliveries (id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (alert_id, channel, kind, level, sequence)
);

CREATE INDEX alert_notifications_delivery_idx ON warden.alert_notifications (delivery_id);

-- Every send attempt: when, how long, what came back.
CREATE TABLE warden.alert_delivery_attempts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id bigint NOT NULL REFERENCES warden.alert_deliveries (id),
    channel     text NOT NULL,
    attempt     integer NOT NULL CHECK (attempt >= 1),
    started_at  timestamptz NOT NULL,
    latency_ms  integer NOT NULL CHECK (latency_ms >= 0),
    status_code integer,
    outcome     text NOT NULL CHECK (outcome IN ('sent', 'failed', 'dead')),
    error       text,
    replica     text
);

CREATE INDEX alert_delivery_attempts_delivery_idx ON warden.alert_delivery_attempts (delivery_id);
CREATE INDEX alert_delivery_attempts_channel_idx ON warden.alert_delivery_attempts (channel, started_at);

-- Health of each channel, kept by the dispatchers.
CREATE TABLE warden.alert_channels (
    channel              text PRIMARY KEY,
    kind                 text NOT NULL,
    consecutive_failures integer NOT NULL DEFAULT 0,
    sent                 bigint NOT NULL DEFAULT 0,
    failed               bigint NOT NULL DEFAULT 0,
    last_attempt_at      timestamptz,
    last_success_at      timestamptz,
    last_failure_at      timestamptz,
    last_status_code     integer,
    last_latency_ms      integer,
    last_error           text
);

-- Silences: matching alerts are recorded but not sent between starts_at
-- and ends_at. Every given matcher must match; at least one is given.
CREATE TABLE warden.silences (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    agent_id   text COLLATE "C",
    issue_type text CHECK (issue_type IN (
                   'agent_unresponsive', 'heartbeat_late', 'extended_offline',
                   'restart_loop', 'flapping', 'high_error_rate',
                   'resource_exhaustion', 'performance_degradation', 'fleet_outage')),
    labels     jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(labels) = 'object'),
    starts_at  timestamptz NOT NULL,
    ends_at    timestamptz NOT NULL,
    comment    text NOT NULL CHECK (char_length(comment) BETWEEN 1 AND 1024),
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Set when removed before its end (kept for the record).
    removed_at timestamptz,
    CHECK (ends_at > starts_at),
    CHECK (agent_id IS NOT NULL OR issue_type IS NOT NULL OR labels <> '{}'::jsonb)
);

CREATE INDEX silences_active_idx ON warden.silences (ends_at) WHERE removed_at IS NULL;

-- Alerting at a glance, for dashboards: per channel, what was sent and how.
CREATE VIEW warden.alert_channel_stats AS
SELECT d.channel,
       count(*) FILTER (WHERE d.state = 'pending') AS pending,
       count(*) FILTER (WHERE d.state = 'sent') AS sent,
       count(*) FILTER (WHERE d.state = 'dead') AS dead,
       avg(d.attempts) FILTER (WHERE d.state = 'sent') AS mean_attempts,
       max(d.sent_at) AS last_sent_at
FROM warden.alert_deliveries d
GROUP BY d.channel;
