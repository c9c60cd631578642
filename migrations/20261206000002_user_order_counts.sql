-- Each user's number of orders: the `total` of GET /api/orders, a route shops poll to watch
-- their orders. Counting them on every request read all of a user's orders (and each one's
-- HOT chain) for one number, so a poll cost grew with the user's history: at 300 orders a
-- user, a quarter of PostgreSQL's CPU under load went to it.
--
-- Kept by triggers, not by the accept, so that every writer of `orders` keeps it right: the
-- previous release during a rolling update, a test or an operator inserting by hand. One
-- upsert per user per statement (statement-level, with the rows as a transition table), in user
-- order, so two accepts that share users lock their counts in the same order. Orders are never
-- deleted by orderflow; a delete or truncate by hand is counted too. `user_id` never changes.
CREATE TABLE user_order_counts (
    user_id BIGINT PRIMARY KEY,
    orders  BIGINT NOT NULL CHECK (orders >= 0)
) WITH (fillfactor = 50); -- room for HOT updates: every accept updates its users' rows

CREATE FUNCTION user_order_counts_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO user_order_counts (user_id, orders)
    SELECT user_id, count(*) FROM placed GROUP BY user_id ORDER BY user_id
    ON CONFLICT (user_id) DO UPDATE SET orders = user_order_counts.orders + EXCLUDED.orders;
    RETURN NULL;
END $$;

CREATE FUNCTION user_order_counts_remove() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE user_order_counts c SET orders = c.orders - d.n
    FROM (SELECT user_id, count(*) AS n FROM removed GROUP BY user_id) d
    WHERE c.user_id = d.user_id;
    RETURN NULL;
END $$;

CREATE FUNCTION user_order_counts_clear() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM user_order_counts;
    RETURN NULL;
END $$;

-- The triggers first: they lock `orders` against writes until this migration commits, so the
-- count below sees every order written before, and the triggers every order written after.
CREATE TRIGGER user_order_counts_add AFTER INSERT ON orders
    REFERENCING NEW TABLE AS placed FOR EACH STATEMENT EXECUTE FUNCTION user_order_counts_add();
CREATE TRIGGER user_order_counts_remove AFTER DELETE ON orders
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION user_order_counts_remove();
CREATE TRIGGER user_order_counts_clear AFTER TRUNCATE ON orders
    FOR EACH STATEMENT EXECUTE FUNCTION user_order_counts_clear();

INSERT INTO user_order_counts (user_id, orders) SELECT user_id, count(*) FROM orders GROUP BY user_id;
