-- warden schema, version 38: when an alert last repeated.
--
-- Repeats were counted from the policy's last level, so raising
-- `repeat_interval` after many repeats put the next one as many new
-- intervals out (ten repeats at 4 h, then 24 h: the eleventh 264 h after
-- the last level). Each repeat now comes `repeat_interval` after the one
-- before, which needs its time. Alerts that repeated before this keep the
-- old count until their next repeat.
--
-- Adding a column without a default only changes the catalog, but waits
-- for the table's lock behind any long reader: past 10 s the migration
-- fails instead, and is tried again at the next start.
SET LOCAL lock_timeout = '10s';
ALTER TABLE warden.alerts ADD COLUMN last_repeat_at timestamptz;
COMMENT ON COLUMN warden.alerts.last_repeat_at IS 'When the latest repeat message was queued (the escalator''s clock)';
