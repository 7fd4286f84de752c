-- Outbound messages and their send attempts. A message is claimed by one sender worker at a
-- time under a lease; see services/outbox/store.py for the statements that use these indexes.
CREATE TABLE messages (
    id                  uuid        NOT NULL DEFAULT uuidv7(),
    tenant_id           text        NOT NULL,
    idempotency_key     text        NOT NULL,
    correlation_id      text        NOT NULL DEFAULT '',
    kind                text        NOT NULL,
    account_sid         text        NOT NULL,
    -- Twilio `From` ("whatsapp:+1...", "+1...") or a Messaging Service SID ("MG...").
    sender              text        NOT NULL,
    recipient_channel   text        NOT NULL,
    recipient           text        NOT NULL,
    body                text,
    content_sid         text,
    -- Twilio's ContentVariables JSON, exactly as sent.
    content_variables   text,
    status              text        NOT NULL DEFAULT 'pending',
    attempt_count       integer     NOT NULL DEFAULT 0,
    max_attempts        integer     NOT NULL,
    -- Reconciliations that failed to get an answer from Twilio (bounded like attempts).
    reconcile_failures  integer     NOT NULL DEFAULT 0,
    -- When due (pending) or when the lease runs out (sending): one column for the claim query.
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    lease_owner         text,
    lease_expires_at    timestamptz,
    -- When the current or last claim began: the earliest moment a send could have happened.
    attempt_started_at  timestamptz,
    -- Set while an earlier attempt may have been accepted by Twilio without us knowing: the
    -- next claim asks Twilio (messages since this time) before any resend.
    reconcile_since     timestamptz,
    twilio_sid          text,
    twilio_status       text,
    dead_reason         text,
    last_error_code     integer,
    last_error_message  text,
    -- The enqueuer's trace context, so the send span joins the trace of its cause.
    traceparent         text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    sent_at             timestamptz,
    dead_at             timestamptz,
    CONSTRAINT messages_pkey PRIMARY KEY (id),
    CONSTRAINT messages_tenant_idempotency_key_key UNIQUE (tenant_id, idempotency_key),
    CONSTRAINT messages_kind_check CHECK (kind IN ('conversational', 'compliance')),
    CONSTRAINT messages_recipient_channel_check
        CHECK (recipient_channel IN ('sms', 'whatsapp', 'messenger')),
    CONSTRAINT messages_status_check CHECK (status IN (
        'pending', 'sending', 'sent', 'delivered', 'read', 'failed', 'undelivered',
        'blocked', 'dead', 'discarded')),
    CONSTRAINT messages_content_check CHECK ((body IS NULL) <> (content_sid IS NULL)),
    CONSTRAINT messages_dead_reason_check CHECK (status <> 'dead' OR dead_reason IS NOT NULL),
    CONSTRAINT messages_lease_check
        CHECK (status <> 'sending' OR (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CONSTRAINT messages_accepted_sid_check
        CHECK (status NOT IN ('sent', 'delivered', 'read', 'failed', 'undelivered')
               OR twilio_sid IS NOT NULL)
);

-- Every status change rewrites the row and so adds an entry to each index whose predicate
-- the new version matches: partial indexes keep that to a few entries per message.

-- One Twilio message belongs to at most one outbox message (reconciliation relies on it);
-- status callbacks find their message by it.
CREATE UNIQUE INDEX messages_twilio_sid_key ON messages (twilio_sid) WHERE twilio_sid IS NOT NULL;
-- The claim query: due rows in time order, among the only two states a worker claims.
CREATE INDEX messages_due_idx ON messages (next_attempt_at) WHERE status IN ('pending', 'sending');
-- ListDeadLetters, newest first, keyset-paginated.
CREATE INDEX messages_dead_letters_idx ON messages (tenant_id, dead_at DESC, id DESC)
    WHERE status = 'dead';
-- Reconciliation's check that no identical message is mid-send.
CREATE INDEX messages_sending_recipient_idx ON messages (recipient, sender)
    WHERE status = 'sending';

CREATE TABLE attempts (
    id            bigint      GENERATED ALWAYS AS IDENTITY,
    message_id    uuid        NOT NULL,
    outcome       text        NOT NULL,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL,
    http_status   integer,
    error_code    integer,
    error_message text,
    twilio_sid    text,
    worker_id     text        NOT NULL,
    CONSTRAINT attempts_pkey PRIMARY KEY (id),
    CONSTRAINT attempts_message_id_fkey FOREIGN KEY (message_id) REFERENCES messages (id)
        ON DELETE CASCADE,
    CONSTRAINT attempts_outcome_check CHECK (outcome IN (
        'accepted', 'retryable_error', 'permanent_error', 'outcome_unknown', 'lease_expired',
        'reconciled_found', 'reconciled_not_found'))
);

CREATE INDEX attempts_message_id_idx ON attempts (message_id, id);
