-- SPIFFE federation (mirrors migrations/sqlite/0011).

CREATE TABLE federated_bundles (
    trust_domain     TEXT PRIMARY KEY,
    jwks             TEXT NOT NULL,
    sequence         BIGINT,
    refresh_hint     BIGINT,
    source           TEXT NOT NULL,   -- 'endpoint' or 'manual'
    updated_at_ms    BIGINT NOT NULL,
    checked_at_ms    BIGINT NOT NULL,
    last_error       TEXT,
    last_error_at_ms BIGINT
);
