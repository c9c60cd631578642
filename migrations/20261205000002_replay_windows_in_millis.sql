-- A replay's window is kept in whole milliseconds (its bounds rounded up, which holds exactly the
-- events the requested bounds hold: event times are whole milliseconds), so a requested window
-- narrower than a millisecond, such as [t + 0.2 ms, t + 0.7 ms), becomes an empty one: allowed,
-- it replays nothing. The CHECK (window_from < window_to) of 20261201000102 was unnamed; it is
-- found by its definition.
-- compatible: the new check is looser than the one it replaces (<= for <); the previous release
-- only writes windows with window_from < window_to.
DO $$
DECLARE
    name text;
BEGIN
    SELECT conname INTO name FROM pg_constraint
    WHERE conrelid = 'event_replays'::regclass AND contype = 'c'
      AND pg_get_constraintdef(oid) = 'CHECK ((window_from < window_to))';
    IF name IS NOT NULL THEN
        EXECUTE format('ALTER TABLE event_replays DROP CONSTRAINT %I', name);
    END IF;
END $$;
ALTER TABLE event_replays ADD CONSTRAINT event_replays_window_check CHECK (window_from <= window_to);
