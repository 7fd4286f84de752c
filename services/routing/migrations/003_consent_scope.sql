-- Consent per person: a STOP on one phone channel (sms, whatsapp) stops the person's number on
-- every phone channel of the tenant, unless the tenant narrows consent to the channel
-- (ROUTING_TENANT_RULES consent_scope). The rows already there are per channel and stay
-- effective exactly as before.
--
-- opt_outs: `scope` says what a row covers; `channel` stays the channel it was expressed on.
-- `scope_key` is the channel for a per-channel row and 'person' for a person-wide one, so one
-- number has at most one person-wide row and one row per channel.
ALTER TABLE opt_outs
    ADD COLUMN scope text NOT NULL DEFAULT 'channel',
    ADD CONSTRAINT opt_outs_scope_check CHECK (scope IN ('channel', 'person')),
    ADD CONSTRAINT opt_outs_person_phone_check
        CHECK (scope = 'channel' OR channel IN ('sms', 'whatsapp')),
    ADD COLUMN scope_key text NOT NULL
        GENERATED ALWAYS AS (CASE WHEN scope = 'person' THEN 'person' ELSE channel END) STORED;
-- CheckOptOuts probes (tenant_id, address) for the channel's key and the person's key.
ALTER TABLE opt_outs DROP CONSTRAINT opt_outs_pkey;
ALTER TABLE opt_outs ADD CONSTRAINT opt_outs_pkey PRIMARY KEY (tenant_id, address, scope_key);

-- consent_log: the scope each expression was applied with (the rows already there: channel).
ALTER TABLE consent_log
    ADD COLUMN scope text NOT NULL DEFAULT 'channel',
    ADD CONSTRAINT consent_log_scope_check CHECK (scope IN ('channel', 'person')),
    ADD CONSTRAINT consent_log_person_phone_check
        CHECK (scope = 'channel' OR channel IN ('sms', 'whatsapp'));
-- A person-wide expression is ordered against the person's expressions on every phone channel.
DROP INDEX consent_log_address_idx;
CREATE INDEX consent_log_address_idx
    ON consent_log (tenant_id, address, effective_at DESC)
    WHERE outcome <> 'stale';
