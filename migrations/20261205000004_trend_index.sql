-- The API's trend sampler (api/src/trends.rs) reads, every TREND_SAMPLE_INTERVAL, the status
-- changes and dead letters of the last few seconds: `at >= $1 AND at < $2`. Neither table had
-- an index on its time column, so each sample would scan the whole history.
--
-- BRIN, not B-tree: order_status_history is append-only and `at` is clock_timestamp() at
-- insert, so rows lie on disk in (nearly) time order. A BRIN index keeps one min/max pair per
-- range of 128 pages: a few kilobytes for millions of rows, and an insert touches it only when
-- it widens the last range, where a B-tree would add a leaf entry (and WAL) to every one of an
-- order's five history rows on the hot path. A window of seconds then reads the last range or
-- two. autosummarize summarizes each range as it fills, so the tail is not left to VACUUM
-- (unsummarized ranges are always read, which would grow the scan between vacuums).
-- dead_letters rows are recorded in time order too (recorded_at = the recording
-- transaction's start); the same index keeps that count cheap in an incident with thousands.
-- Building a BRIN index is one pass over the table and holds writes only for that pass.
CREATE INDEX order_status_history_at_brin ON order_status_history USING brin (at)
    WITH (autosummarize = on);
CREATE INDEX dead_letters_recorded_at_brin ON dead_letters USING brin (recorded_at)
    WITH (autosummarize = on);
