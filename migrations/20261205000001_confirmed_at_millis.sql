-- One time precision: an event shows data.confirmedAt to the millisecond, and a replay's window
-- is compared with confirmed_events.confirmed_at, which kept microseconds: a window of
-- [t, t + 0.5 ms) missed an event shown at t. New rows are written as whole milliseconds (the
-- order step truncates once, for the event and the row); rows written before are truncated here
-- to what their events show (chrono writes confirmedAt truncated, never rounded).
--
-- No CHECK constraint: a previous release's order worker, still running during a rolling
-- update, writes microseconds until it is replaced (docs/UPGRADING.md).
UPDATE confirmed_events
SET confirmed_at = date_trunc('milliseconds', confirmed_at)
WHERE confirmed_at <> date_trunc('milliseconds', confirmed_at);
