-- Routing's tables. The `events` table (outbox of domain events) comes from infra's own migration.

-- One row per inbound MessageSid ever processed: the exactly-once guard. A redelivered or
-- re-published webhook conflicts on the primary key and has no second effect, however long
-- after the JetStream duplicate window it comes back.
CREATE TABLE processed_inbound (
    message_sid     text        NOT NULL,
    tenant_id       text,
    outcome         text        NOT NULL,
    sender_role     text,
    decision        text,
    live_session_id text,
    stream_sequence bigint      NOT NULL,
    received_at     timestamptz NOT NULL,
    processed_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT processed_inbound_pkey PRIMARY KEY (message_sid),
    CONSTRAINT processed_inbound_outcome_check CHECK (outcome IN ('routed', 'unroutable')),
    CONSTRAINT processed_inbound_sender_role_check CHECK (sender_role IN ('seller', 'client')),
    CONSTRAINT processed_inbound_decision_check
        CHECK (decision IN ('opt_out', 'opt_in', 'help', 'live_signal', 'conversation')),
    CONSTRAINT processed_inbound_routed_has_tenant_check
        CHECK (outcome <> 'routed' OR (tenant_id IS NOT NULL AND decision IS NOT NULL))
);
-- Retention deletes by age.
CREATE INDEX processed_inbound_processed_at_idx ON processed_inbound (processed_at);

-- Current opt-outs: a row means "send nothing but COMPLIANCE messages to this address".
-- Opting back in deletes the row; the history stays in consent_log.
CREATE TABLE opt_outs (
    id           bigint      GENERATED ALWAYS AS IDENTITY,
    tenant_id    text        NOT NULL,
    channel      text        NOT NULL,
    address      text        NOT NULL,
    opted_out_at timestamptz NOT NULL,
    source       text        NOT NULL,
    message_sid  text        NOT NULL DEFAULT '',
    keyword      text        NOT NULL DEFAULT '',
    actor        text        NOT NULL,
    reason       text        NOT NULL DEFAULT '',
    CONSTRAINT opt_outs_pkey PRIMARY KEY (tenant_id, channel, address),
    CONSTRAINT opt_outs_id_key UNIQUE (id),
    CONSTRAINT opt_outs_channel_check CHECK (channel IN ('sms', 'whatsapp', 'messenger')),
    CONSTRAINT opt_outs_source_check CHECK (source IN ('keyword', 'operator', 'carrier'))
);
-- ListOptOuts: a tenant's opt-outs newest first, keyset-paginated on (opted_out_at, id).
CREATE INDEX opt_outs_tenant_recent_idx ON opt_outs (tenant_id, opted_out_at DESC, id DESC);

-- Every consent expression applied to the ledger (keyword, operator, carrier), in the order
-- the person made them (`effective_at`). The newest non-stale row per address is the guard that
-- stops an older STOP processed late from undoing a newer START.
CREATE TABLE consent_log (
    id           bigint      GENERATED ALWAYS AS IDENTITY,
    tenant_id    text        NOT NULL,
    channel      text        NOT NULL,
    address      text        NOT NULL,
    state        text        NOT NULL,
    outcome      text        NOT NULL,
    effective_at timestamptz NOT NULL,
    source       text        NOT NULL,
    message_sid  text        NOT NULL DEFAULT '',
    keyword      text        NOT NULL DEFAULT '',
    actor        text        NOT NULL,
    reason       text        NOT NULL DEFAULT '',
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT consent_log_pkey PRIMARY KEY (id),
    CONSTRAINT consent_log_channel_check CHECK (channel IN ('sms', 'whatsapp', 'messenger')),
    CONSTRAINT consent_log_state_check CHECK (state IN ('opted_out', 'opted_in')),
    CONSTRAINT consent_log_outcome_check CHECK (outcome IN ('changed', 'unchanged', 'stale')),
    CONSTRAINT consent_log_source_check CHECK (source IN ('keyword', 'operator', 'carrier'))
);
CREATE INDEX consent_log_address_idx
    ON consent_log (tenant_id, channel, address, effective_at DESC)
    WHERE outcome <> 'stale';

-- When each address last wrote to each tenant: WhatsApp's 24-hour customer-service window.
CREATE TABLE last_inbound (
    tenant_id       text        NOT NULL,
    channel         text        NOT NULL,
    address         text        NOT NULL,
    last_inbound_at timestamptz NOT NULL,
    message_sid     text        NOT NULL,
    CONSTRAINT last_inbound_pkey PRIMARY KEY (tenant_id, channel, address),
    CONSTRAINT last_inbound_channel_check CHECK (channel IN ('sms', 'whatsapp', 'messenger'))
);

-- Inbound stream messages routing gave up on: undecodable ones (terminated at once) and ones
-- whose every delivery failed. Kept with their raw payload so ops can see and re-publish them.
CREATE TABLE failed_inbound (
    id              bigint      GENERATED ALWAYS AS IDENTITY,
    stream          text        NOT NULL,
    stream_sequence bigint      NOT NULL,
    message_sid     text        NOT NULL DEFAULT '',
    reason          text        NOT NULL,
    detail          text        NOT NULL,
    deliveries      integer     NOT NULL,
    payload         bytea       NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT failed_inbound_pkey PRIMARY KEY (id),
    -- A terminate that did not reach NATS brings the same delivery back: record it once.
    CONSTRAINT failed_inbound_stream_sequence_key UNIQUE (stream, stream_sequence),
    CONSTRAINT failed_inbound_reason_check
        CHECK (reason IN ('undecodable', 'deliveries_exhausted'))
);
CREATE INDEX failed_inbound_recorded_at_idx ON failed_inbound (recorded_at);
