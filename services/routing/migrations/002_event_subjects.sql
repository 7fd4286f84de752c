-- The events routing records, and no others: a typo or an event added in code without being
-- listed here fails at the INSERT (and in tests/integration/routing/test_data_hygiene.py), not
-- in a consumer downstream. To add a subject, write a new migration that drops and re-adds
-- this constraint with the longer list.
ALTER TABLE events ADD CONSTRAINT events_subject_known CHECK (subject IN (
    'routing.v1.message.routed',
    'routing.v1.message.unroutable',
    'routing.v1.opt_out.recorded',
    'routing.v1.opt_out.removed'
));
