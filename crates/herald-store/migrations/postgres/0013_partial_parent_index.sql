-- Renewals by parent, indexing only credentials that have one.
--
-- Every credential issued on fresh evidence (a mint, an exchange) has no
-- parent, and its NULL entry rewrote a page of this index in each write
-- transaction for nothing: no query looks credentials up by a NULL parent.
-- Queries by parent (`parent_serial = …`, revocation's descent, rotation
-- reports) imply the condition, so they use the partial index as before.
DROP INDEX issued_credentials_parent_serial;
CREATE INDEX issued_credentials_parent_serial ON issued_credentials (parent_serial)
    WHERE parent_serial IS NOT NULL;
