-- no-transaction
-- A bulk action's items (GET /api/admin/bulk-actions/{id}/items) are listed in the order they
-- were acted on (`at`, then `item`), a page at a time. The primary key (bulk_action_id, item)
-- does not give that order, so every page sorted all of the action's items (an action over
-- 100,000 dead letters: 100,000 rows sorted per page, O(n²) to page through). Built
-- CONCURRENTLY so a running action keeps writing its items.
CREATE INDEX CONCURRENTLY IF NOT EXISTS bulk_action_items_order_idx ON bulk_action_items (bulk_action_id, at, item);
