-- Users of an identity provider (AUTH_ISSUER): (issuer, sub) gets an orderflow user id on first
-- sight, from 1,000,000,000,000 up (ids below are the shared-secret tokens' subs), so balances,
-- orders and coupons keep their integer ids.
CREATE SEQUENCE external_user_ids START 1000000000000;
CREATE TABLE external_users (
    user_id    BIGINT      PRIMARY KEY DEFAULT nextval('external_user_ids'),
    issuer     TEXT        NOT NULL,
    subject    TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (issuer, subject)
);
ALTER SEQUENCE external_user_ids OWNED BY external_users.user_id;
