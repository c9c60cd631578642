-- Orders. The row records what the order currently holds (stock_held, coupon_held,
-- paid_amount); compensation is driven by these, never by the state it started from.
CREATE TABLE orders (
    id              UUID PRIMARY KEY,
    user_id         BIGINT      NOT NULL CHECK (user_id > 0),
    status          TEXT        NOT NULL CHECK (status IN ('PENDING', 'STOCK_RESERVED', 'COUPON_APPLIED',
                                    'PAID', 'CONFIRMED', 'CANCELLING', 'CANCELLED', 'COMPENSATION_FAILED')),
    reason          TEXT CHECK (reason IN ('OUT_OF_STOCK', 'COUPON_INVALID', 'INSUFFICIENT_BALANCE',
                                    'TIMEOUT', 'PROCESSING_FAILED', 'ADMIN_CANCELLED')),
    coupon_id       BIGINT,
    total_amount    BIGINT      NOT NULL CHECK (total_amount >= 0),
    discount_amount BIGINT      NOT NULL DEFAULT 0 CHECK (discount_amount >= 0 AND discount_amount <= total_amount),
    paid_amount     BIGINT      NOT NULL DEFAULT 0 CHECK (paid_amount >= 0),
    stock_held      BOOLEAN     NOT NULL DEFAULT false,
    coupon_held     BOOLEAN     NOT NULL DEFAULT false,
    trace_parent    TEXT,
    deadline_at     TIMESTAMPTZ NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX orders_user_idx ON orders (user_id, created_at DESC);
-- The recovery sweep and the ops views look only at orders still in flight.
CREATE INDEX orders_open_deadline_idx ON orders (deadline_at)
    WHERE status NOT IN ('CONFIRMED', 'CANCELLED');

CREATE TABLE order_items (
    order_id   UUID   NOT NULL REFERENCES orders (id),
    product_id BIGINT NOT NULL REFERENCES products (id),
    quantity   INTEGER NOT NULL CHECK (quantity BETWEEN 1 AND 1000),
    unit_price BIGINT NOT NULL CHECK (unit_price >= 0),
    PRIMARY KEY (order_id, product_id)
);

CREATE TABLE order_status_history (
    id          BIGSERIAL PRIMARY KEY,
    order_id    UUID        NOT NULL REFERENCES orders (id),
    from_status TEXT,
    to_status   TEXT        NOT NULL,
    reason      TEXT,
    at          TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX order_status_history_order_idx ON order_status_history (order_id, id);

-- Transactional outbox: rows are written in the transaction that decides to send them and
-- published only by the relay. message_id is stable across re-publishes.
CREATE TABLE outbox (
    id           BIGSERIAL PRIMARY KEY,
    message_id   UUID        NOT NULL UNIQUE,
    exchange     TEXT        NOT NULL,
    routing_key  TEXT        NOT NULL,
    message_type TEXT        NOT NULL,
    order_id     UUID,
    headers      JSONB       NOT NULL DEFAULT '{}'::jsonb,
    body         JSONB       NOT NULL,
    expiration_ms BIGINT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at      TIMESTAMPTZ
);
CREATE INDEX outbox_unsent_idx ON outbox (id) WHERE sent_at IS NULL;

-- Wake the relay when a transaction that wrote outbox rows commits.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('orderflow_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Inbox: one row per (consumer, message) processed, written with the effect.
CREATE TABLE inbox (
    consumer     TEXT        NOT NULL,
    message_id   UUID        NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- Popular products: hourly buckets of confirmed quantities, fed by order.confirmed.
CREATE TABLE product_sales_hourly (
    product_id BIGINT      NOT NULL,
    bucket     TIMESTAMPTZ NOT NULL,
    quantity   BIGINT      NOT NULL CHECK (quantity >= 0),
    PRIMARY KEY (product_id, bucket)
);
CREATE INDEX product_sales_hourly_bucket_idx ON product_sales_hourly (bucket);
