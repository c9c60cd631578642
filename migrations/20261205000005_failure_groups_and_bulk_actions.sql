-- Failure groups and bulk actions (issue 28): in an incident thousands of messages fail for one
-- cause; operators act on the cause, not on each message.

-- What a failure looks like once the parts that differ between messages of one cause (ids,
-- numbers, long hex) are taken out: "product 17 of order 0190...: stock < 3" and "product 9
-- of order 0191...: stock < 1" are one kind. Immutable, so groups are stable across releases
-- that keep this function.
CREATE FUNCTION error_kind(error TEXT) RETURNS TEXT
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT left(regexp_replace(regexp_replace(regexp_replace(error,
        '[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}', '<id>', 'g'),
        '\m[0-9a-fA-F]{16,}\M', '<hex>', 'g'),
        '[0-9]+(\.[0-9]+)?', '#', 'g'), 300)
$$;

-- A failure group: where it failed, what it was, why the broker gave up on it and the kind of
-- the error. Unit separators keep ('a', 'bc') and ('ab', 'c') apart; '-' stands for unknown.
CREATE FUNCTION failure_group(queue TEXT, message_type TEXT, reason TEXT, error TEXT) RETURNS TEXT
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT md5(coalesce(queue, '-') || chr(31) || coalesce(message_type, '-') || chr(31)
               || coalesce(reason, '-') || chr(31) || coalesce(error_kind(error), '-'))
$$;

-- The error a consumer last failed a message with. The broker dead-letters a message without
-- saying why the consumer failed it (only `delivery_limit` or `rejected`), so the consumer
-- runtime writes the error here when it returns or rejects a delivery, and the recovery worker
-- copies it onto the dead letter. Pruned after 7 days by the sweep.
CREATE TABLE delivery_failures (
    consumer   TEXT        NOT NULL,
    message_id UUID        NOT NULL,
    error      TEXT        NOT NULL,
    failed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX delivery_failures_message_idx ON delivery_failures (message_id);
-- B-tree, not BRIN: an upsert rewrites failed_at, so rows are not in time order.
CREATE INDEX delivery_failures_failed_at_idx ON delivery_failures (failed_at);

-- Every bulk action an operator started: replay or discard the dead letters matching a filter
-- (a failure group, a queue, a type, a time window), cancel the orders stuck in a status past a
-- time, retry the compensations of parked orders. Run in chunks by whoever holds the lease
-- (renewed at every chunk); a RUNNING action whose lease ran out is resumed by any API
-- process. Each chunk moves its items out of the filter (a letter leaves NEW, an order leaves
-- its status) in the transaction that acts on them, so a resumed action never acts twice.
CREATE TABLE bulk_actions (
    id           BIGSERIAL   PRIMARY KEY,
    action       TEXT        NOT NULL CHECK (action IN ('REPLAY_DEAD_LETTERS', 'DISCARD_DEAD_LETTERS',
                                                        'CANCEL_ORDERS', 'RETRY_COMPENSATIONS',
                                                        'RETRY_PARKED', 'DISCARD_PARKED')),
    filter       JSONB       NOT NULL,
    state        TEXT        NOT NULL DEFAULT 'RUNNING' CHECK (state IN ('RUNNING', 'DONE', 'CANCELLED', 'FAILED')),
    chunk_size   INTEGER     NOT NULL CHECK (chunk_size BETWEEN 1 AND 1000),
    pause_ms     INTEGER     NOT NULL CHECK (pause_ms BETWEEN 0 AND 10000),
    -- Items matching the filter when the action was created.
    total        BIGINT      NOT NULL CHECK (total >= 0),
    -- Items acted on.
    done         BIGINT      NOT NULL DEFAULT 0 CHECK (done >= 0),
    -- Dead letters that matched but could not be replayed (body not JSON, destination gone):
    -- left NEW, with the reason in `last_skip`.
    skipped      BIGINT      NOT NULL DEFAULT 0 CHECK (skipped >= 0),
    last_skip    TEXT,
    -- Dead letters and parked rows: the highest id looked at (skipped letters stay NEW behind
    -- it), and the highest id there was when the action was created: what died after the
    -- operator confirmed (a replay that died again, if the cause is still there) is left for
    -- the next action, so an action always ends.
    cursor_id    BIGINT      NOT NULL DEFAULT 0,
    upto_id      BIGINT      NOT NULL DEFAULT 0,
    -- Chunks that failed in a row (the database or the broker down, say) and the last error;
    -- the action is FAILED after 10.
    failures     INTEGER     NOT NULL DEFAULT 0,
    last_error   TEXT,
    lease_owner  UUID,
    lease_until  TIMESTAMPTZ,
    requested_by TEXT        NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at  TIMESTAMPTZ,
    CHECK ((state = 'RUNNING') = (finished_at IS NULL))
);
CREATE INDEX bulk_actions_running_idx ON bulk_actions (id) WHERE state = 'RUNNING';

-- What each bulk action did to each item, written in the chunk's transaction: the audit of who
-- (the action's requested_by) did what to which dead letter or order, and why an item was
-- skipped. One row per item and action, so an item is never counted twice.
CREATE TABLE bulk_action_items (
    bulk_action_id BIGINT      NOT NULL REFERENCES bulk_actions (id),
    -- A dead letter's id, an outbox row's id or an order's id, as text.
    item           TEXT        NOT NULL,
    outcome        TEXT        NOT NULL CHECK (outcome IN ('DONE', 'SKIPPED')),
    -- What it did (REPLAYED, DISCARDED, RETRIED, CANCELLING, CANCELLED) or why it skipped it.
    detail         TEXT        NOT NULL,
    at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (bulk_action_id, item)
);

-- A dead letter knows the error that killed it, its group, who resolved it (and through which
-- bulk action), and how often its message had been replayed before this death.
ALTER TABLE dead_letters
    ADD COLUMN error            TEXT,
    ADD COLUMN failure_group    TEXT,
    ADD COLUMN resolved_by      TEXT,
    ADD COLUMN bulk_action_id   BIGINT REFERENCES bulk_actions (id),
    ADD COLUMN previous_replays INTEGER NOT NULL DEFAULT 0;
UPDATE dead_letters SET failure_group = failure_group(source_queue, message_type, reason, NULL);

-- Filled in as a letter is recorded, by whichever release records it: the error its consumer
-- last failed it with, its group, and how often its message had been replayed before.
CREATE FUNCTION dead_letter_enrich() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.error IS NULL AND NEW.message_id ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        SELECT error INTO NEW.error FROM delivery_failures
        WHERE message_id = NEW.message_id::uuid ORDER BY failed_at DESC LIMIT 1;
    END IF;
    NEW.failure_group := failure_group(NEW.source_queue, NEW.message_type, NEW.reason, NEW.error);
    IF NEW.message_id IS NOT NULL THEN
        SELECT count(*) INTO NEW.previous_replays FROM dead_letters
        WHERE message_id = NEW.message_id AND status = 'REPLAYED';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER dead_letter_enrich BEFORE INSERT ON dead_letters
    FOR EACH ROW EXECUTE FUNCTION dead_letter_enrich();
ALTER TABLE dead_letters ALTER COLUMN error SET STATISTICS 0;
-- Groups and their letters are read among the NEW ones; replays of one message by its id.
CREATE INDEX dead_letters_group_idx ON dead_letters (failure_group, id) WHERE status = 'NEW';
CREATE INDEX dead_letters_message_idx ON dead_letters (message_id);
