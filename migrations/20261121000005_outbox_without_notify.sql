-- The outbox no longer NOTIFYs on insert. PostgreSQL serialises the commits of all
-- transactions that sent a NOTIFY (a database-wide lock is held from pre-commit until the
-- commit is over, WAL flush included), so with every pipeline transaction writing to the
-- outbox, commits could not be group-flushed and the whole pipeline queued on one lock.
-- The relay is woken in-process after commits and polls on a short interval otherwise.
DROP TRIGGER IF EXISTS outbox_notify ON outbox;
DROP FUNCTION IF EXISTS outbox_notify();
