-- Messages may carry several orders (a command for a batch of orders), so an outbox row names
-- every order it concerns; the ops timeline finds an order's messages through the GIN index.
ALTER TABLE outbox ADD COLUMN order_ids UUID[] NOT NULL DEFAULT '{}';
UPDATE outbox SET order_ids = ARRAY[order_id] WHERE order_id IS NOT NULL;
ALTER TABLE outbox DROP COLUMN order_id;
CREATE INDEX outbox_order_ids_idx ON outbox USING gin (order_ids);

-- The body is the exact bytes to publish: the relay sends it as stored (no JSON round trip),
-- and a dead letter's original body, whatever it holds, can be published again unchanged.
ALTER TABLE outbox ALTER COLUMN body TYPE BYTEA USING convert_to(body::text, 'UTF8');

-- A row the broker refuses (no such exchange, unroutable, nacked, channel closed by it) is
-- retried on its own schedule, so it never holds back the rows behind it; after a few attempts
-- it is parked for an operator (retry or discard), with the reason.
ALTER TABLE outbox
    ADD COLUMN attempts      INTEGER     NOT NULL DEFAULT 0,
    ADD COLUMN retry_at      TIMESTAMPTZ,
    ADD COLUMN last_error    TEXT,
    ADD COLUMN parked_at     TIMESTAMPTZ,
    ADD COLUMN discarded_at  TIMESTAMPTZ;
DROP INDEX outbox_unsent_idx;
-- What the relay reads: unsent and not parked.
CREATE INDEX outbox_pending_idx ON outbox (id) WHERE sent_at IS NULL AND parked_at IS NULL;
-- What operators look at: parked and not yet discarded (few).
CREATE INDEX outbox_parked_idx ON outbox (id) WHERE parked_at IS NOT NULL AND sent_at IS NULL AND discarded_at IS NULL;

-- A dead command may name several orders; the recovery worker acts for each of them.
ALTER TABLE dead_letters ADD COLUMN order_ids UUID[] NOT NULL DEFAULT '{}';
UPDATE dead_letters SET order_ids = ARRAY[order_id] WHERE order_id IS NOT NULL;
