-- A replayed dead letter is published again with its original message id (so consumers'
-- inboxes keep it idempotent); the outbox must therefore accept a message id twice.
ALTER TABLE outbox DROP CONSTRAINT outbox_message_id_key;

-- Every message that reached the dead-letter queue, recorded by the recovery worker.
CREATE TABLE dead_letters (
    id           BIGSERIAL PRIMARY KEY,
    -- One death of one message (message id, queue, death count): at-least-once dead
    -- lettering may deliver the same death twice; it is recorded once.
    fingerprint  UUID        NOT NULL UNIQUE,
    message_id   TEXT,
    message_type TEXT,
    order_id     UUID,
    source_queue TEXT,
    exchange     TEXT,
    routing_key  TEXT,
    reason       TEXT,
    death_count  BIGINT      NOT NULL DEFAULT 1,
    headers      JSONB       NOT NULL DEFAULT '{}'::jsonb,
    body         BYTEA       NOT NULL,
    dead_at      TIMESTAMPTZ,
    recorded_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    status       TEXT        NOT NULL DEFAULT 'NEW' CHECK (status IN ('NEW', 'REPLAYED', 'DISCARDED')),
    resolved_at  TIMESTAMPTZ
);
CREATE INDEX dead_letters_status_idx ON dead_letters (status, id DESC);
CREATE INDEX dead_letters_order_idx ON dead_letters (order_id);
