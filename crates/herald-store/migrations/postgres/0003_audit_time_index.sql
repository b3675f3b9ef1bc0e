-- Audit export and reports select by time window.
CREATE INDEX audit_log_time_ms ON audit_log (time_ms);
