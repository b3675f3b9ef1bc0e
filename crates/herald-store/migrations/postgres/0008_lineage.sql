-- Lineage and join-token purposes.
--
-- Every credential records the root of its lineage (the credential issued
-- on fresh evidence that it descends from, itself for a root), when that
-- evidence was presented, and how the lineage began (origin: node,
-- bootstrap, break_glass, exchange, workload). Renewal re-checks the
-- lineage; revocation follows parent_serial down to every descendant.
-- Join tokens carry what they may be used for.

ALTER TABLE join_tokens ADD COLUMN purpose TEXT NOT NULL DEFAULT 'bootstrap';
ALTER TABLE join_tokens ADD COLUMN policies TEXT NOT NULL DEFAULT '';   -- comma-separated policy names
ALTER TABLE join_tokens ADD COLUMN reason TEXT;                         -- required for break_glass

ALTER TABLE issued_credentials ADD COLUMN origin TEXT NOT NULL DEFAULT '';
ALTER TABLE issued_credentials ADD COLUMN root_serial TEXT NOT NULL DEFAULT '';
ALTER TABLE issued_credentials ADD COLUMN root_at BIGINT NOT NULL DEFAULT 0;

-- Credentials issued before lineage was recorded become roots of their own.
-- Renewals recorded then named no policy that still exists, so they renew
-- no further: their holders present fresh evidence once.
UPDATE issued_credentials SET root_serial = serial, root_at = issued_at,
    origin = CASE
        WHEN evidence_type IN ('tpm', 'tpm+join_token') THEN 'node'
        WHEN evidence_type = 'join_token' THEN 'bootstrap'
        WHEN evidence_type LIKE 'oidc%' THEN 'exchange'
        WHEN parent_serial IS NOT NULL AND spiffe_id IN (SELECT spiffe_id FROM nodes) THEN 'node'
        WHEN parent_serial IS NOT NULL THEN 'workload'
        ELSE ''
    END;
