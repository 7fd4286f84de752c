-- The events seller_admin records, and no others: a typo or an event added in code without
-- being listed here fails at the INSERT (and in tests/integration/seller_admin/
-- test_data_hygiene.py), not in a consumer downstream. To add a subject, write a new migration
-- that drops and re-adds this constraint with the longer list.
ALTER TABLE events ADD CONSTRAINT events_subject_known CHECK (subject IN (
    'seller_admin.v1.tenant.created',
    'seller_admin.v1.channel.added',
    'seller_admin.v1.channel.removed',
    'seller_admin.v1.seller_phone.added',
    'seller_admin.v1.seller_phone.removed'
));
