-- Single-use evidence: OIDC token jtis (or digests) seen, kept until the
-- token's exp plus leeway. A key present with expires_at in the future
-- means "already used".
CREATE TABLE replay_cache (
    key         TEXT PRIMARY KEY,          -- 'jti:<issuer>#<jti>' or 'sha256:<digest>'
    expires_at  BIGINT NOT NULL           -- Unix seconds
);
CREATE INDEX replay_cache_expires_at ON replay_cache (expires_at);
