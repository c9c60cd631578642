-- no-transaction
-- dead_letters rows are recorded in time order (recorded_at = the recording transaction's
-- start): a BRIN index keeps the trend sampler's count of the last seconds' dead letters
-- (api/src/trends.rs) cheap in an incident with thousands of them. Built CONCURRENTLY, like
-- 20261205000004's, so the release running beside this one keeps recording dead letters.
CREATE INDEX CONCURRENTLY IF NOT EXISTS dead_letters_recorded_at_brin ON dead_letters USING brin (recorded_at)
    WITH (autosummarize = on);
