-- The SHA-256 of each issued X.509 SVID's DER, hex. A renewal or a node
-- call presenting exactly these bytes is Herald's own certificate, so it
-- is authenticated by this comparison instead of a signature check (one
-- hash of ~600 bytes against one ECDSA P-256 verification). NULL for
-- other kinds and for records written before this column: those are
-- checked by signature as before.
ALTER TABLE issued_credentials ADD COLUMN cert_sha256 TEXT;
