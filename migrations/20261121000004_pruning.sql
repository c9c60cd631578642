-- The recovery worker prunes old bookkeeping (sweep.rs). Rows arrive in time order, so BRIN
-- indexes find the old ones for almost no write cost.
CREATE INDEX inbox_processed_at_brin ON inbox USING brin (processed_at);
CREATE INDEX outbox_sent_at_brin ON outbox USING brin (sent_at);
