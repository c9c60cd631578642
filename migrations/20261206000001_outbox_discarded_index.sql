-- no-transaction
-- The sweep's pruning (workers/src/sweep.rs) deletes outbox rows discarded over a day ago
-- every pass, now for as many rounds as rows are due. Without an index on discarded_at each
-- round read the whole outbox (a day of rows: tens of millions at a few hundred orders a
-- second) to find the few an operator discarded. Partial: only discarded rows are in it, so
-- it costs the hot path nothing. Built CONCURRENTLY, like 20261205000004's, so the release
-- running beside this one keeps writing the outbox.
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_discarded_idx ON outbox (discarded_at) WHERE discarded_at IS NOT NULL;
