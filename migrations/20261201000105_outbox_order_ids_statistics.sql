-- No planner statistics for the outbox's order ids either (see 20261201000103): the element
-- statistics of a uuid[] column with a dozen ids per row were half of what analyzing the
-- outbox cost (197 -> 106 ms at 29,000 rows), and the one query on it, an order's messages
-- (`order_ids @> ARRAY[$1]`), uses the GIN index on the default estimate all the same.
ALTER TABLE outbox ALTER COLUMN order_ids SET STATISTICS 0;
