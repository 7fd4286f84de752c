-- The live sessions this service has seen (from routing's MessageRouted and live_session's
-- session.closed events): the session a message without a session id belongs to, the seller's
-- address for their summary, and whether the end-of-live summaries were sent.
CREATE TABLE sessions (
    id                 uuid        NOT NULL,
    tenant_id          text        NOT NULL,
    status             text        NOT NULL,
    opened_at          timestamptz NOT NULL,
    closed_at          timestamptz,
    summarized_at      timestamptz,
    seller_channel     text,
    seller_value       text,
    seller_reply_from  text,
    seller_account_sid text,
    seller_last_at     timestamptz,
    CONSTRAINT sessions_pkey PRIMARY KEY (id),
    CONSTRAINT sessions_status_known CHECK (status IN ('open', 'closed')),
    CONSTRAINT sessions_closed_has_time CHECK ((status = 'closed') = (closed_at IS NOT NULL)),
    CONSTRAINT sessions_summarized_only_closed CHECK (summarized_at IS NULL OR status = 'closed')
);

-- A tenant's current session: its most recently opened open one, else its last one.
CREATE INDEX sessions_by_tenant_open_first ON sessions (tenant_id, (status = 'open') DESC, opened_at DESC);

CREATE TABLE items (
    id             uuid        NOT NULL,
    tenant_id      text        NOT NULL,
    session_id     uuid        NOT NULL,
    code           text        NOT NULL,
    title          text        NOT NULL,
    price_cents    bigint,
    currency       text        NOT NULL,
    stock          integer     NOT NULL,
    held           integer     NOT NULL DEFAULT 0,
    confirmed      integer     NOT NULL DEFAULT 0,
    waiting        integer     NOT NULL DEFAULT 0,
    max_per_client integer     NOT NULL,
    status         text        NOT NULL,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    CONSTRAINT items_pkey PRIMARY KEY (id),
    CONSTRAINT items_session_fkey FOREIGN KEY (session_id) REFERENCES sessions (id),
    -- The same code in two tenants or two sessions is two items.
    CONSTRAINT items_code_unique_per_session UNIQUE (tenant_id, session_id, code),
    -- The guarantee itself: never oversold, whatever the callers do.
    CONSTRAINT items_units_within_stock CHECK (held + confirmed <= stock),
    CONSTRAINT items_counts_not_negative CHECK (held >= 0 AND confirmed >= 0 AND waiting >= 0),
    CONSTRAINT items_stock_range CHECK (stock BETWEEN 0 AND 10000),
    CONSTRAINT items_max_per_client_range CHECK (max_per_client BETWEEN 1 AND 100),
    CONSTRAINT items_status_known CHECK (status IN ('open', 'closed')),
    CONSTRAINT items_price_not_negative CHECK (price_cents IS NULL OR price_cents >= 0)
);

CREATE TABLE reservations (
    id             uuid        NOT NULL,
    tenant_id      text        NOT NULL,
    session_id     uuid        NOT NULL,
    item_id        uuid        NOT NULL,
    client_channel text        NOT NULL,
    client_value   text        NOT NULL,
    -- Where replies to this client go from (Twilio `From`) and through which account.
    reply_from     text        NOT NULL,
    account_sid    text        NOT NULL,
    quantity       integer     NOT NULL,
    status         text        NOT NULL,
    release_reason text,
    message_sid    text        NOT NULL,
    received_at    timestamptz NOT NULL,
    expires_at     timestamptz,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    CONSTRAINT reservations_pkey PRIMARY KEY (id),
    CONSTRAINT reservations_item_fkey FOREIGN KEY (item_id) REFERENCES items (id),
    -- One claim per inbound message, however often it is delivered.
    CONSTRAINT reservations_one_per_message_sid UNIQUE (message_sid),
    CONSTRAINT reservations_quantity_positive CHECK (quantity > 0),
    CONSTRAINT reservations_status_known
        CHECK (status IN ('held', 'waiting', 'confirmed', 'released')),
    CONSTRAINT reservations_held_expires CHECK ((status = 'held') = (expires_at IS NOT NULL)),
    CONSTRAINT reservations_released_has_reason
        CHECK ((status = 'released') = (release_reason IS NOT NULL)),
    CONSTRAINT reservations_release_reason_known
        CHECK (release_reason IN ('cancelled', 'expired', 'item_closed', 'session_ended'))
);

-- One live (held, waiting or confirmed) reservation per client and item.
CREATE UNIQUE INDEX reservations_one_live_per_client ON reservations (item_id, client_channel, client_value)
    WHERE status <> 'released';
-- The waitlist, first come first served by the gateway's received_at, then MessageSid.
CREATE INDEX reservations_waitlist ON reservations (item_id, received_at, message_sid)
    WHERE status = 'waiting';
-- The hold sweeper scans held reservations by expiry.
CREATE INDEX reservations_held_by_expiry ON reservations (expires_at) WHERE status = 'held';
-- ListReservations and the summaries: a session's reservations in claim order.
CREATE INDEX reservations_by_session ON reservations (session_id, received_at, id);

-- Inbound messages already handled: a redelivered MessageSid changes nothing twice.
CREATE TABLE processed_inbound (
    message_sid  text        NOT NULL,
    tenant_id    text        NOT NULL,
    outcome      text        NOT NULL,
    processed_at timestamptz NOT NULL,
    CONSTRAINT processed_inbound_pkey PRIMARY KEY (message_sid)
);

-- Retention deletes ledger rows oldest first (`store.ledger_purges`).
CREATE INDEX processed_inbound_processed_at_idx ON processed_inbound (processed_at);

-- Replies to send, written in the transaction that decided them and handed to the outbox's
-- Enqueue afterwards (idempotent on the key), so a crash between the two sends once.
CREATE TABLE replies (
    id              uuid        NOT NULL DEFAULT uuidv7(),
    tenant_id       text        NOT NULL,
    idempotency_key text        NOT NULL,
    sender          text        NOT NULL,
    recipient_channel text        NOT NULL,
    recipient_value text        NOT NULL,
    account_sid     text        NOT NULL,
    -- The text; with a content_sid it is the template's variable "1".
    body            text        NOT NULL,
    content_sid     text,
    correlation_id  text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    enqueued_at     timestamptz,
    outbox_message_id text,
    -- Why the outbox refused it for good (one line); such a reply is not retried.
    failure         text,
    CONSTRAINT replies_pkey PRIMARY KEY (id),
    CONSTRAINT replies_key_unique UNIQUE (tenant_id, idempotency_key)
);

CREATE INDEX replies_pending ON replies (created_at) WHERE enqueued_at IS NULL;
-- Retention deletes sent replies oldest first; pending ones are never purged.
CREATE INDEX replies_enqueued_at_idx ON replies (enqueued_at) WHERE enqueued_at IS NOT NULL;

ALTER TABLE events ADD CONSTRAINT events_subject_known CHECK (subject IN (
    'live_catalog.v1.item.posted',
    'live_catalog.v1.item.updated',
    'live_catalog.v1.item.sold_out',
    'live_catalog.v1.item.closed',
    'live_catalog.v1.reservation.held',
    'live_catalog.v1.reservation.confirmed',
    'live_catalog.v1.reservation.released',
    'live_catalog.v1.reservation.promoted',
    'live_catalog.v1.waitlist.joined',
    'live_catalog.v1.session.summarized'
));
