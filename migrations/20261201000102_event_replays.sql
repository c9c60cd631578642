-- Replays of order.confirmed (POST /api/admin/events/replay, `orderflow events replay`).
--
-- The original event must outlive the outbox (published rows are pruned after a day), so every
-- order.confirmed written to the outbox is also kept here, with its exact id, headers and body
-- bytes, in the transaction that confirmed the order (the order worker writes it with the event
-- and the sales count, in one statement per batch). One row per order, forever (a few hundred
-- bytes per confirmed order). `confirmed_at` is the event's `data.confirmedAt`,
-- the time a consumer sees, and what a replay's window is about.
CREATE TABLE confirmed_events (
    order_id     UUID        PRIMARY KEY REFERENCES orders (id),
    event_id     UUID        NOT NULL,
    confirmed_at TIMESTAMPTZ NOT NULL,
    headers      JSONB       NOT NULL DEFAULT '{}'::jsonb,
    body         BYTEA       NOT NULL,
    recorded_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX confirmed_events_confirmed_at_idx ON confirmed_events (confirmed_at, order_id);

-- Orders confirmed before this migration: their events, as long as the outbox still has them
-- (published rows are pruned after a day; older events cannot be replayed with their ids).
INSERT INTO confirmed_events (order_id, event_id, confirmed_at, headers, body)
SELECT DISTINCT ON (o.order_ids[1]) o.order_ids[1], o.message_id,
       COALESCE((convert_from(o.body, 'UTF8')::jsonb #>> '{data,confirmedAt}')::timestamptz, o.created_at),
       o.headers, o.body
FROM outbox o
WHERE o.message_type = 'order.confirmed' AND o.exchange = 'orderflow.events'
  AND EXISTS (SELECT 1 FROM orders WHERE id = o.order_ids[1])
ORDER BY o.order_ids[1], o.id
ON CONFLICT (order_id) DO NOTHING;

-- One replay: the window [window_from, window_to) of data.confirmedAt, published through the
-- outbox chunk by chunk (keyset cursor: confirmed_at, order_id; it starts just before the
-- window). `pending` holds the outbox
-- ids of the chunk written last, until the relay has published (or parked) them. Whoever runs
-- it holds a lease (renewed at every step); a RUNNING replay whose lease ran out is resumed by
-- any API process.
CREATE TABLE event_replays (
    id           BIGSERIAL   PRIMARY KEY,
    state        TEXT        NOT NULL DEFAULT 'RUNNING' CHECK (state IN ('RUNNING', 'DONE', 'CANCELLED')),
    window_from  TIMESTAMPTZ NOT NULL,
    window_to    TIMESTAMPTZ NOT NULL,
    chunk_size   INTEGER     NOT NULL CHECK (chunk_size BETWEEN 1 AND 1000),
    pause_ms     INTEGER     NOT NULL CHECK (pause_ms BETWEEN 0 AND 10000),
    total        BIGINT      NOT NULL CHECK (total >= 0),
    enqueued     BIGINT      NOT NULL DEFAULT 0 CHECK (enqueued >= 0),
    published    BIGINT      NOT NULL DEFAULT 0 CHECK (published >= 0),
    parked       BIGINT      NOT NULL DEFAULT 0 CHECK (parked >= 0),
    cursor_at    TIMESTAMPTZ NOT NULL,
    cursor_order UUID        NOT NULL,
    pending      BIGINT[]    NOT NULL DEFAULT '{}',
    lease_owner  UUID,
    lease_until  TIMESTAMPTZ,
    requested_by TEXT        NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at  TIMESTAMPTZ,
    CHECK (window_from < window_to),
    CHECK ((state = 'RUNNING') = (finished_at IS NULL))
);
CREATE INDEX event_replays_running_idx ON event_replays (id) WHERE state = 'RUNNING';
