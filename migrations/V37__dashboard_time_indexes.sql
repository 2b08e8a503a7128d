-- warden schema, version 37: time indexes for the dashboards' fleet-wide
-- panels.
--
-- Building them holds writes to the two tables back (the score pass's
-- snapshots, alert deliveries) for as long as the build reads them:
-- seconds for 30 days of a thousand agents' scores. Queued behind a long
-- reader (a report, pg_dump), the build would hold every writer behind it
-- in turn; past 10 s waiting for its lock the migration fails instead,
-- and is tried again at the next start.
SET LOCAL lock_timeout = '10s';
--
-- health_history had an index by agent only, so a fleet-wide range (the
-- Score distribution heatmap, the score_trend report without an agent)
-- read whole day partitions: seconds for a week of a thousand agents.
-- Its rows are written in time order, so a BRIN index is nearly free to
-- keep, as the heartbeats' and metrics' are.
CREATE INDEX health_history_time_idx ON warden.health_history USING brin (evaluated_at);

-- Deliveries by channel reads the deliveries of the alerts opened in the
-- range; a delivery is made after its alert opened, so the panel bounds
-- them by created_at too, through this index (rows are updated as they
-- are sent, which would scatter a BRIN index's ranges).
CREATE INDEX alert_deliveries_created_idx ON warden.alert_deliveries (created_at);
