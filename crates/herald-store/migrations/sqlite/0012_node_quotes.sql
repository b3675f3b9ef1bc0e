-- Continuous attestation: each node's last quote — its TPM clock (which,
-- within one resetCount, never goes backwards), when it was checked and
-- how that ended ('ok' or the refusal's stable code) — so a renewal with
-- a fresh quote is compared with the last one and `herald node list`
-- shows every node's standing.

ALTER TABLE nodes ADD COLUMN quote_clock INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN last_quote_at INTEGER;
ALTER TABLE nodes ADD COLUMN last_quote_result TEXT;
