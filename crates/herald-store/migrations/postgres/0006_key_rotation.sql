-- Key rotation: when each key entered its status (activation and
-- retirement are timed from it), the lookup that says when the last
-- credential a key signed expires, and leases that let one replica at a
-- time drive scheduled work such as rotation.

ALTER TABLE ca_keys ADD COLUMN status_since BIGINT NOT NULL DEFAULT 0;
UPDATE ca_keys SET status_since = created_at;

CREATE INDEX issued_credentials_ca_key ON issued_credentials (ca_key_id, not_after);

CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  BIGINT NOT NULL           -- Unix milliseconds
);
