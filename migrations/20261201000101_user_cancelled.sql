-- A shopper may cancel their own order while it is in flight (POST /api/orders/{id}/cancel):
-- reason USER_CANCELLED. The reason's CHECK (named by PostgreSQL after the inline constraint
-- of 20261121000002_pipeline.sql) is replaced by one that also allows it.
ALTER TABLE orders
    DROP CONSTRAINT orders_reason_check,
    ADD CONSTRAINT orders_reason_check CHECK (reason IN ('OUT_OF_STOCK', 'COUPON_INVALID', 'INSUFFICIENT_BALANCE',
        'TIMEOUT', 'PROCESSING_FAILED', 'ADMIN_CANCELLED', 'USER_CANCELLED'));
