-- The events outbox records, and no others: a typo or an event added in code without being
-- listed here fails at the INSERT (and in tests/integration/outbox/test_data_hygiene.py), not
-- in a consumer downstream. To add a subject, write a new migration that drops and re-adds
-- this constraint with the longer list.
ALTER TABLE events ADD CONSTRAINT events_subject_known CHECK (subject IN (
    'outbox.v1.message.sent',
    'outbox.v1.message.blocked_optout',
    'outbox.v1.message.dead_lettered',
    'outbox.v1.message.status_changed',
    'outbox.v1.message.redriven',
    'outbox.v1.message.discarded',
    'outbox.v1.recipient.unsubscribed'
));
