-- An SMS channel or a Messaging Service may declare the alphanumeric sender ID (`ChezMarie`)
-- its tenant sends SMS under where carriers allow one; the outbox accepts that ID as a sender of
-- this tenant only. Twilio's rule: 1-11 letters, digits or spaces, at least one letter. One
-- channel per ID whatever its case, so no shop can send under another's name.
ALTER TABLE channels ADD COLUMN alphanumeric_sender_id text;
ALTER TABLE channels ADD CONSTRAINT channels_alphanumeric_sender_id_format CHECK (
    alphanumeric_sender_id ~ '^[A-Za-z0-9 ]{1,11}$' AND alphanumeric_sender_id ~ '[A-Za-z]'
);
ALTER TABLE channels ADD CONSTRAINT channels_alphanumeric_sender_id_on_sms CHECK (
    alphanumeric_sender_id IS NULL OR kind IN ('sms', 'messaging_service')
);
CREATE UNIQUE INDEX channels_alphanumeric_sender_id_key ON channels (upper(alphanumeric_sender_id));
