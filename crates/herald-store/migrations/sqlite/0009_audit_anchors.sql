-- Anchoring the audit chain.
--
-- `detail` holds what one field cannot: an aggregated record's count and
-- window. It is part of a record's hash only when present, so records
-- written before it keep theirs.
--
-- `audit_checkpoints`: signed checkpoints of the chain's head (sequence
-- number and hash), each a JWS by an `audit` key of the key ring. A
-- database writer can recompute every hash after an edit, but cannot sign
-- a checkpoint: one kept off the machine detects truncation and rewrites.

ALTER TABLE audit_log ADD COLUMN detail TEXT;

CREATE TABLE audit_checkpoints (
    seq      INTEGER PRIMARY KEY,   -- the last record the checkpoint covers
    hash     BLOB NOT NULL,         -- that record's hash
    time_ms  INTEGER NOT NULL,
    key_id   TEXT NOT NULL,         -- the audit key that signed it
    jws      TEXT NOT NULL          -- the signed checkpoint
);

CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit_checkpoints is append-only');
END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit_checkpoints is append-only');
END;
