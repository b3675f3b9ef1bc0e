-- Coverage reports: credentials by issue time, renewals by parent.
CREATE INDEX issued_credentials_issued_at ON issued_credentials (issued_at);
CREATE INDEX issued_credentials_parent_serial ON issued_credentials (parent_serial);
