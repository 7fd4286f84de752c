-- Audit-class events (an operator or a tenant user changed something: seller phones, channels,
-- consent, dead-letter redrives and discards) name who did it. They are kept for the audit
-- retention (`AUDIT_RETENTION_DAYS`), the other published events for `EVENTS_RETENTION_DAYS`,
-- and the relay also copies them to the AUDIT stream (`infra.events`, `infra.streams`).
ALTER TABLE events ADD COLUMN actor text;
ALTER TABLE events ADD CONSTRAINT events_audit_has_tenant
    CHECK (actor IS NULL OR tenant_id IS NOT NULL);

-- One index per purge, so neither scans past the rows the other keeps.
DROP INDEX events_published_at_idx;
CREATE INDEX events_published_at_idx ON events (published_at)
    WHERE published_at IS NOT NULL AND actor IS NULL;
CREATE INDEX events_audit_published_at_idx ON events (published_at)
    WHERE published_at IS NOT NULL AND actor IS NOT NULL;
