-- SPIFFE federation: the bundles of the trust domains this one federates
-- with, one row per trust domain, shared by replicas and kept across
-- restarts. A document fetched from a trust domain's endpoint (or set by
-- hand) only ever updates that trust domain's row.
--
-- `sequence` is the document's spiffe_sequence: a document with a lower
-- one is refused. `checked_at_ms` is the last successful fetch (content
-- changed or not); `last_error*` the last failure since then, which is
-- how stale a bundle is shown to be.

CREATE TABLE federated_bundles (
    trust_domain     TEXT PRIMARY KEY,
    jwks             TEXT NOT NULL,
    sequence         INTEGER,
    refresh_hint     INTEGER,
    source           TEXT NOT NULL,   -- 'endpoint' or 'manual'
    updated_at_ms    INTEGER NOT NULL,
    checked_at_ms    INTEGER NOT NULL,
    last_error       TEXT,
    last_error_at_ms INTEGER
);
