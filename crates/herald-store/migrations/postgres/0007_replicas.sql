-- Replica heartbeats: each server replica records, every few seconds and
-- whenever it changes, the trust-bundle sequence and policy set it serves,
-- so `herald replicas` shows whether every replica has caught up.

CREATE TABLE replicas (
    replica_id         TEXT PRIMARY KEY,
    address            TEXT NOT NULL,
    version            TEXT NOT NULL,
    started_at         BIGINT NOT NULL,   -- Unix seconds
    last_seen_ms       BIGINT NOT NULL,   -- Unix milliseconds
    bundle_sequence    BIGINT NOT NULL,
    policy_digest      TEXT NOT NULL,     -- hex SHA-256 of the policy set in effect; '' without policies
    policy_generation  BIGINT NOT NULL
);

CREATE INDEX replicas_last_seen ON replicas (last_seen_ms);
