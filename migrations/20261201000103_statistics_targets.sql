-- No planner statistics for payload columns. The planner never filters, joins or sorts on a
-- message's body or headers, a stored response or a kept event, yet every ANALYZE sampled and
-- measured them: they were most of what analyzing outbox (188 ms at 27,000 rows) and
-- idempotency_keys (153 ms at 14,000) cost, and with autovacuum off the recovery worker
-- analyzes tables as they grow (workers/src/statistics.rs).
ALTER TABLE outbox
    ALTER COLUMN headers SET STATISTICS 0,
    ALTER COLUMN body SET STATISTICS 0,
    ALTER COLUMN last_error SET STATISTICS 0;
ALTER TABLE idempotency_keys
    ALTER COLUMN request SET STATISTICS 0,
    ALTER COLUMN response SET STATISTICS 0,
    ALTER COLUMN headers SET STATISTICS 0;
ALTER TABLE confirmed_events
    ALTER COLUMN headers SET STATISTICS 0,
    ALTER COLUMN body SET STATISTICS 0;
ALTER TABLE dead_letters
    ALTER COLUMN headers SET STATISTICS 0,
    ALTER COLUMN body SET STATISTICS 0;
ALTER TABLE orders
    ALTER COLUMN trace_parent SET STATISTICS 0;
