-- Anchoring the audit chain (mirrors migrations/sqlite/0009).

ALTER TABLE audit_log ADD COLUMN detail TEXT;

CREATE TABLE audit_checkpoints (
    seq      BIGINT PRIMARY KEY,    -- the last record the checkpoint covers
    hash     BYTEA NOT NULL,        -- that record's hash
    time_ms  BIGINT NOT NULL,
    key_id   TEXT NOT NULL,         -- the audit key that signed it
    jws      TEXT NOT NULL          -- the signed checkpoint
);

CREATE FUNCTION audit_checkpoints_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_checkpoints is append-only';
END
$$;
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_checkpoints_append_only();
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_checkpoints_append_only();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_checkpoints_append_only();
