-- no-transaction
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
-- dead_letters gets the same in 20261205000006 (one statement per file: CREATE INDEX
-- CONCURRENTLY cannot share a query with another statement).
-- Built CONCURRENTLY (outside a transaction: the `no-transaction` line above), so the release
-- still running beside this one (docs/UPGRADING.md) keeps writing history while the index is
-- built; IF NOT EXISTS makes a rerun after an interrupted build harmless.
CREATE INDEX CONCURRENTLY IF NOT EXISTS order_status_history_at_brin ON order_status_history USING brin (at)
    WITH (autosummarize = on);
