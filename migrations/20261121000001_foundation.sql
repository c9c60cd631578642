-- Products: stock is the units on hand; initial_stock and restocked let the audit prove
-- stock conservation (stock = initial_stock + restocked - units held by orders).
CREATE TABLE products (
    id            BIGSERIAL PRIMARY KEY,
    name          TEXT        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    price         BIGINT      NOT NULL CHECK (price >= 0),
    stock         BIGINT      NOT NULL CHECK (stock >= 0),
    initial_stock BIGINT      NOT NULL CHECK (initial_stock >= 0),
    restocked     BIGINT      NOT NULL DEFAULT 0 CHECK (restocked >= 0),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX products_lower_name_idx ON products (lower(name) text_pattern_ops);

-- Balances: one row per user that has ever charged. The ledger is the proof.
CREATE TABLE balances (
    user_id    BIGINT PRIMARY KEY CHECK (user_id > 0),
    balance    BIGINT      NOT NULL CHECK (balance >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE balance_ledger (
    id            BIGSERIAL PRIMARY KEY,
    user_id       BIGINT      NOT NULL,
    kind          TEXT        NOT NULL CHECK (kind IN ('CHARGE', 'PAYMENT', 'REFUND')),
    amount        BIGINT      NOT NULL CHECK (amount >= 0),
    balance_after BIGINT      NOT NULL CHECK (balance_after >= 0),
    order_id      UUID,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((kind = 'CHARGE') = (order_id IS NULL))
);
CREATE INDEX balance_ledger_user_idx ON balance_ledger (user_id, id DESC);
-- An order is paid at most once and refunded at most once, whatever is redelivered.
CREATE UNIQUE INDEX balance_ledger_order_kind_uq ON balance_ledger (order_id, kind) WHERE order_id IS NOT NULL;

-- Coupons: `issued` counts rows in user_coupons; the CHECK makes overselling impossible.
CREATE TABLE coupons (
    id               BIGSERIAL PRIMARY KEY,
    name             TEXT        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    discount_type    TEXT        NOT NULL CHECK (discount_type IN ('FIXED', 'PERCENT')),
    discount_value   BIGINT      NOT NULL CHECK (discount_value > 0),
    quantity         INTEGER     NOT NULL CHECK (quantity > 0),
    issued           INTEGER     NOT NULL DEFAULT 0,
    issue_starts_at  TIMESTAMPTZ,
    issue_ends_at    TIMESTAMPTZ,
    expires_at       TIMESTAMPTZ,
    min_order_amount BIGINT      NOT NULL DEFAULT 0 CHECK (min_order_amount >= 0),
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT coupons_issued_within_quantity CHECK (issued BETWEEN 0 AND quantity),
    CHECK (discount_type <> 'PERCENT' OR discount_value <= 100)
);

CREATE TABLE user_coupons (
    id        BIGSERIAL PRIMARY KEY,
    coupon_id BIGINT      NOT NULL REFERENCES coupons (id),
    user_id   BIGINT      NOT NULL CHECK (user_id > 0),
    status    TEXT        NOT NULL DEFAULT 'AVAILABLE' CHECK (status IN ('AVAILABLE', 'USED')),
    order_id  UUID,
    issued_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    used_at   TIMESTAMPTZ,
    CONSTRAINT user_coupons_one_per_user UNIQUE (coupon_id, user_id),
    CHECK ((status = 'USED') = (order_id IS NOT NULL))
);
CREATE INDEX user_coupons_user_idx ON user_coupons (user_id, id DESC);

-- Idempotency keys (per user and scope), kept at least 24 hours. The stored request lets a
-- retry with another body be told apart (422) from a true retry (replayed response).
CREATE TABLE idempotency_keys (
    user_id     BIGINT      NOT NULL,
    scope       TEXT        NOT NULL,
    key         TEXT        NOT NULL,
    request     JSONB       NOT NULL,
    status_code SMALLINT    NOT NULL,
    response    JSONB       NOT NULL,
    headers     JSONB       NOT NULL DEFAULT '{}'::jsonb,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, scope, key)
);
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);
