-- warden schema, version 38: when an alert last repeated.
--
-- Repeats were counted from the policy's last level, so raising
-- `repeat_interval` after many repeats put the next one as many new
-- intervals out (ten repeats at 4 h, then 24 h: the eleventh 264 h after
-- the last level). Each repeat now comes `repeat_interval` after the one
-- before, which needs its time: for alerts still open that repeated
-- before this, when their latest repeat was queued.
--
-- Adding a column without a default only changes the catalog, but waits
-- for the table's lock behind any long reader: past 10 s the migration
-- fails instead, and is tried again at the next start.
SET LOCAL lock_timeout = '10s';
ALTER TABLE warden.alerts ADD COLUMN last_repeat_at timestamptz;
COMMENT ON COLUMN warden.alerts.last_repeat_at IS 'The time the latest repeat stood for: repeats fall repeat_interval apart from it';
UPDATE warden.alerts a
SET last_repeat_at = (SELECT max(n.created_at) FROM warden.alert_notifications n
                      WHERE n.alert_id = a.id AND n.kind = 'repeat')
WHERE NOT a.closed AND a.repeats > 0;
