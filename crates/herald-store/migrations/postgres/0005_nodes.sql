-- Node registry: one row per TPM (EK) that has attested.

CREATE TABLE nodes (
    ek_hash           TEXT PRIMARY KEY,     -- hex SHA-256 of the EK public area (TPMT_PUBLIC)
    spiffe_id         TEXT NOT NULL UNIQUE, -- one identity per EK, one EK per identity
    ak_name           TEXT NOT NULL,        -- hex TPM name of the attestation key last used
    policy            TEXT NOT NULL,
    status            TEXT NOT NULL,        -- 'active' | 'banned'
    reset_count       BIGINT NOT NULL,     -- from the last quote's TPMS_CLOCK_INFO
    restart_count     BIGINT NOT NULL,
    firmware_version  BIGINT NOT NULL,     -- u64 bit pattern
    golden_set        TEXT,
    enrolled_at       BIGINT NOT NULL,     -- Unix seconds
    last_attested_at  BIGINT NOT NULL,
    attestations      BIGINT NOT NULL,
    banned_at         BIGINT,
    banned_by         TEXT,
    ban_reason        TEXT
);
