-- Tenants (shops), the business addresses they receive on, and the phones of their sellers.
CREATE TABLE tenants (
    tenant_id    text        NOT NULL,
    display_name text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tenants_pkey PRIMARY KEY (tenant_id),
    CONSTRAINT tenants_tenant_id_format CHECK (tenant_id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    CONSTRAINT tenants_display_name_not_blank CHECK (btrim(display_name) <> '')
);

-- A channel is either a sender address (WhatsApp or SMS number, stored in Twilio's form
-- `whatsapp:+14155238886` / `+14155238886`) or a Messaging Service SID, never both.
CREATE TABLE channels (
    channel_id            uuid        NOT NULL,
    tenant_id             text        NOT NULL,
    kind                  text        NOT NULL,
    address               text,
    messaging_service_sid text,
    account_sid           text        NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT channels_pkey PRIMARY KEY (channel_id),
    CONSTRAINT channels_tenant_fkey FOREIGN KEY (tenant_id) REFERENCES tenants (tenant_id),
    CONSTRAINT channels_kind_known CHECK (kind IN ('whatsapp', 'sms', 'messaging_service')),
    CONSTRAINT channels_target_matches_kind CHECK (
        (kind = 'messaging_service' AND messaging_service_sid ~ '^MG[0-9a-f]{32}$' AND address IS NULL)
        OR (kind = 'whatsapp' AND address ~ '^whatsapp:\+[0-9]+$' AND messaging_service_sid IS NULL)
        OR (kind = 'sms' AND address ~ '^\+[0-9]+$' AND messaging_service_sid IS NULL)
    ),
    CONSTRAINT channels_account_sid_format CHECK (account_sid ~ '^AC[0-9a-f]{32}$'),
    -- One receiving address, one tenant: the heart of tenant resolution.
    CONSTRAINT channels_address_key UNIQUE (address),
    CONSTRAINT channels_messaging_service_sid_key UNIQUE (messaging_service_sid)
);

-- ListChannels: a tenant's channels in the order they were added, paged by (created_at, id).
CREATE INDEX channels_by_tenant ON channels (tenant_id, created_at, channel_id);

CREATE TABLE seller_phones (
    seller_phone_id uuid        NOT NULL,
    tenant_id       text        NOT NULL,
    kind            text        NOT NULL,
    -- E.164 number (kind 'phone') or WhatsApp user ID (kind 'wa_id'), matched as-is against
    -- the sender of inbound messages.
    address         text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT seller_phones_pkey PRIMARY KEY (seller_phone_id),
    CONSTRAINT seller_phones_tenant_fkey FOREIGN KEY (tenant_id) REFERENCES tenants (tenant_id),
    CONSTRAINT seller_phones_kind_known CHECK (kind IN ('phone', 'wa_id')),
    CONSTRAINT seller_phones_address_matches_kind CHECK (
        (kind = 'phone' AND address ~ '^\+[0-9]+$')
        OR (kind = 'wa_id' AND address ~ '^[A-Z]{2}\.(ENT\.)?[A-Za-z0-9]{1,128}$')
    ),
    -- Also the index ResolveSender and ListSellerPhones (keyset on address) run on.
    CONSTRAINT seller_phones_tenant_address_key UNIQUE (tenant_id, address)
);
