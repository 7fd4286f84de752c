-- Retention deletes finished messages oldest change first (store.DELETE_FINISHED_MESSAGES);
-- without this index every round would scan the whole table for the few old ones. Messages
-- still in the outbox's or an operator's hands (pending, sending, dead) are never purged.
CREATE INDEX messages_finished_idx ON messages (updated_at)
    WHERE status IN ('sent', 'delivered', 'read', 'failed', 'undelivered', 'blocked', 'discarded');
