-- warden schema, version 19: one row per attempt of a delivery.
--
-- A dispatcher that could not record a send's outcome tries again; the
-- first try may have committed before its answer was lost, or may still
-- be open on the server. This key makes the retry wait for that try and
-- then write nothing twice (INSERT ... ON CONFLICT DO NOTHING): each claim
-- of a delivery is one attempt, numbered by the claim, made by one replica.
CREATE UNIQUE INDEX alert_delivery_attempts_once
    ON warden.alert_delivery_attempts (delivery_id, attempt, replica) NULLS NOT DISTINCT;
