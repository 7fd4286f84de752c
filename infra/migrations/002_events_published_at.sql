-- Retention deletes published events oldest first (`infra.retention.DELETE_PUBLISHED_EVENTS`);
-- without this index every round would scan the whole table to find the few old rows.
-- Unpublished rows are left out: the relay finds those through events_unpublished_idx.
CREATE INDEX events_published_at_idx ON events (published_at) WHERE published_at IS NOT NULL;
