-- Herald datastore, version 1 (PostgreSQL; mirrors migrations/sqlite).

CREATE TABLE join_tokens (
    token_hash  BYTEA PRIMARY KEY,          -- SHA-256 of the token; the token itself is never stored
    token_id    TEXT NOT NULL UNIQUE,      -- public identifier, for listing and audit
    spiffe_id   TEXT NOT NULL,
    created_at  BIGINT NOT NULL,          -- Unix seconds
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT,
    created_by  TEXT NOT NULL
);

CREATE TABLE issued_credentials (
    serial             TEXT PRIMARY KEY,   -- lowercase hex
    kind               TEXT NOT NULL,      -- 'x509_svid'
    spiffe_id          TEXT NOT NULL,
    not_before         BIGINT NOT NULL,
    not_after          BIGINT NOT NULL,
    issued_at          BIGINT NOT NULL,
    evidence_type      TEXT NOT NULL,
    evidence_digest    TEXT,
    policy             TEXT,
    parent_serial      TEXT,
    public_key_sha256  TEXT NOT NULL,
    ca_key_id          TEXT NOT NULL
);
CREATE INDEX issued_credentials_spiffe_id ON issued_credentials (spiffe_id);
CREATE INDEX issued_credentials_not_after ON issued_credentials (not_after);

CREATE TABLE revocations (
    serial      TEXT PRIMARY KEY,
    revoked_at  BIGINT NOT NULL,
    reason      TEXT NOT NULL,
    revoked_by  TEXT NOT NULL
);

CREATE TABLE ca_keys (
    key_id         TEXT PRIMARY KEY,
    kind           TEXT NOT NULL,          -- 'x509'
    status         TEXT NOT NULL,          -- 'active', 'prepared', 'retired'
    cert_der       BYTEA NOT NULL,
    chain_der      BYTEA NOT NULL,          -- certificates above, concatenated DER, ending with the anchor
    encrypted_key  BYTEA NOT NULL,          -- PKCS#8 sealed with the key-encryption key
    not_before     BIGINT NOT NULL,
    not_after      BIGINT NOT NULL,
    created_at     BIGINT NOT NULL
);

CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);

CREATE TABLE audit_log (
    seq              BIGINT PRIMARY KEY,  -- 1, 2, 3, ... without gaps
    time_ms          BIGINT NOT NULL,
    caller           TEXT NOT NULL,
    action           TEXT NOT NULL,
    evidence_type    TEXT,
    evidence_digest  TEXT,
    policy           TEXT,
    spiffe_id        TEXT,
    serial           TEXT,
    outcome          TEXT NOT NULL,
    reason           TEXT,
    prev_hash        BYTEA NOT NULL,
    hash             BYTEA NOT NULL
);

-- Append-only: history cannot be edited through SQL without first dropping
-- these, and the hash chain catches it even then.
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END
$$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
