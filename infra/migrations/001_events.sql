-- The transactional outbox of domain events every service writes in the same transaction as
-- the change it describes; `infra.events.EventRelay` publishes them to JetStream.
CREATE TABLE events (
    id           uuid        NOT NULL DEFAULT uuidv7(),
    subject      text        NOT NULL,
    aggregate_id text        NOT NULL,
    tenant_id    text,
    payload      bytea       NOT NULL,
    traceparent  text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    CONSTRAINT events_pkey PRIMARY KEY (id),
    CONSTRAINT events_subject_format CHECK (subject ~ '^[a-z_]+\.v[0-9]+\.[a-z_]+\.[a-z_]+$')
);

-- The relay only ever scans what is not yet published, oldest first.
CREATE INDEX events_unpublished_idx ON events (id) WHERE published_at IS NULL;
