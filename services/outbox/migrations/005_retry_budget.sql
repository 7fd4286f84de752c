-- A message is retried until its kind's deadline (OUTBOX_RETRY_BUDGET_*_SECONDS), counted from
-- this moment: when it was first due (enqueued, or its not_before), or redriven. The deadline
-- itself is not stored, so a changed budget applies to the messages already waiting. Those
-- waiting when this migration runs start their budget now.
ALTER TABLE messages ADD COLUMN budget_started_at timestamptz NOT NULL DEFAULT now();
