-- A dead letter's `recorded_at` was the recording transaction's start (now()). The dashboard's
-- trend windows end where no transaction that has written is still open (db::history::
-- SETTLED_UNTIL), but a transaction that has begun and not written yet has no transaction id
-- and holds nothing back: a letter it recorded later kept an earlier time, in a window already
-- counted, and the dead-letter trend missed it. The time of the insert itself, as status rows
-- have (order_status_history.at), is never before a window closed without it.
ALTER TABLE dead_letters ALTER COLUMN recorded_at SET DEFAULT clock_timestamp();
