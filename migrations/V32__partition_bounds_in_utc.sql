-- warden schema, version 32: partition bounds whatever the caller's
-- session settings.
--
-- ensure_partitions turned each day into timestamptz bounds in the
-- session's TimeZone and wrote them into the DDL as text in its DateStyle.
-- warden's own sessions run in UTC, but an operator calling the function
-- from psql in another zone (Asia/Kolkata, say) made days that began
-- hours away from midnight UTC: heartbeats of those hours found no partition,
-- and the next upkeep in UTC failed on the overlap and made no more days.
ALTER FUNCTION warden.ensure_partitions(date, date) SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD';
