-- The events live_session records, and no others: a typo or an event added in code without
-- being listed here fails at the INSERT (and in tests/integration/live_session/
-- test_data_hygiene.py), not in a consumer downstream. To add a subject, write a new migration
-- that drops and re-adds this constraint with the longer list.
ALTER TABLE events ADD CONSTRAINT events_subject_known CHECK (subject IN (
    'live_session.v1.session.created',
    'live_session.v1.session.closed'
));
