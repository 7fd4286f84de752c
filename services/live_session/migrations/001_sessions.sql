-- Live sessions: at most one active session per tenant, closed when idle or by hand.
CREATE TABLE sessions (
    id               uuid        NOT NULL,
    tenant_id        text        NOT NULL,
    status           text        NOT NULL,
    started_at       timestamptz NOT NULL,
    last_activity_at timestamptz NOT NULL,
    closed_at        timestamptz,
    close_reason     text,
    CONSTRAINT sessions_pkey PRIMARY KEY (id),
    CONSTRAINT sessions_tenant_id_not_blank CHECK (tenant_id <> ''),
    CONSTRAINT sessions_status_known CHECK (status IN ('active', 'closed')),
    CONSTRAINT sessions_close_reason_known CHECK (close_reason IN ('idle', 'manual')),
    -- A closed session always says when and why; an active one never does.
    CONSTRAINT sessions_closed_fields_match_status CHECK (
        (status = 'active' AND closed_at IS NULL AND close_reason IS NULL)
        OR (status = 'closed' AND closed_at IS NOT NULL AND close_reason IS NOT NULL)
    ),
    CONSTRAINT sessions_activity_after_start CHECK (last_activity_at >= started_at)
);

-- The guarantee itself: a second active session for a tenant cannot exist, whatever the
-- callers do. Touch's INSERT ... ON CONFLICT targets this index.
CREATE UNIQUE INDEX sessions_one_active_per_tenant ON sessions (tenant_id) WHERE status = 'active';

-- The sweeper scans active sessions oldest activity first.
CREATE INDEX sessions_active_by_last_activity ON sessions (last_activity_at) WHERE status = 'active';

-- ListSessions: a tenant's sessions newest first, paged by (started_at, id).
CREATE INDEX sessions_by_tenant_newest ON sessions (tenant_id, started_at DESC, id DESC);
