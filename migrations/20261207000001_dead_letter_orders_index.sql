-- no-transaction
-- An order's timeline (GET /api/admin/orders/{id}/timeline) lists the dead letters about it: those that
-- name it in `order_ids` (a command about a batch of orders) as well as by `order_id`. The
-- array had no index, so each timeline read every dead letter ever recorded (they are kept,
-- replayed or discarded, for the record). GIN answers `order_ids @> ARRAY[id]`. Built
-- CONCURRENTLY so the release running beside this one keeps recording dead letters.
CREATE INDEX CONCURRENTLY IF NOT EXISTS dead_letters_order_ids_idx ON dead_letters USING gin (order_ids);
