-- The claim (store.OutboxStore.claim_due_messages) as one function, so that a claim is one
-- round trip: its planner settings are the function's own, where they were SET LOCAL in a
-- transaction of four statements (BEGIN, SET, the claim, COMMIT). At a trickle of a message or
-- two per claim, those round trips were most of what a claim cost the worker and PostgreSQL.
--
-- The settings walk the due index in order and stop after `$2` rows. Right after a burst of
-- enqueues the table statistics lag behind (until autovacuum analyzes it) and the planner would
-- rather sort every due row to find the oldest few: with a backlog of a million, every claim.
-- It also expects a row or two from `due`, and would then pair due and locked rows with a
-- nested loop comparing every pair: 40,000 comparisons for a batch of 200.
--
-- One statement: pick due rows (skipping those another worker holds), take the lease, and
-- record a lease that ran out as an attempt whose outcome must be reconciled. A `sending` row
-- is due when its lease expired: `next_attempt_at` doubles as the lease expiry for the index.
-- Arguments: the worker id, how many at most, the lease (seconds), the saturated
-- "sender tenant" pairs to skip, and the ids this worker still holds.
CREATE FUNCTION claim_due_messages(text, integer, double precision, text[], uuid[])
RETURNS TABLE (
    id uuid, tenant_id text, correlation_id text, kind text, account_sid text, sender text,
    recipient_channel text, recipient text, body text, content_sid text,
    content_variables text, attempt_count integer, max_attempts integer,
    reconcile_failures integer, budget_started_at timestamptz, attempt_started_at timestamptz,
    reconcile_since timestamptz,
    traceparent text, prior_status text
)
LANGUAGE sql VOLATILE
SET enable_sort = off
SET enable_bitmapscan = off
SET enable_nestloop = off
AS $claim$
WITH due AS (
    SELECT id, status AS prior_status, attempt_started_at AS prior_started_at,
           lease_owner AS prior_owner
    FROM messages
    WHERE status IN ('pending', 'sending') AND next_attempt_at <= now()
      AND NOT (sender || ' ' || tenant_id = ANY ($4::text[]))
      -- A worker never claims again what it still holds (a result not yet written after its
      -- lease ran out): that result would be written over the new claim as if it were its own.
      AND NOT (id = ANY ($5::uuid[]))
    ORDER BY next_attempt_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE messages m SET
        status = 'sending',
        lease_owner = $1,
        lease_expires_at = now() + make_interval(secs => $3),
        next_attempt_at = now() + make_interval(secs => $3),
        attempt_started_at = now(),
        attempt_count = m.attempt_count + (due.prior_status = 'sending')::int,
        reconcile_since = CASE WHEN due.prior_status = 'sending'
            THEN coalesce(m.reconcile_since, due.prior_started_at, m.updated_at)
            ELSE m.reconcile_since END,
        updated_at = now()
    FROM due
    -- `= ANY (ARRAY(...))`: primary-key look-ups, never a scan of the table.
    WHERE m.id = ANY (ARRAY(SELECT id FROM due)) AND m.id = due.id
    RETURNING m.id, m.tenant_id, m.correlation_id, m.kind, m.account_sid, m.sender,
        m.recipient_channel, m.recipient, m.body, m.content_sid, m.content_variables,
        m.attempt_count, m.max_attempts, m.reconcile_failures, m.budget_started_at,
        m.attempt_started_at, m.reconcile_since, m.traceparent, due.prior_status, due.prior_started_at,
        due.prior_owner
), lease_expiries AS (
    INSERT INTO attempts (message_id, outcome, started_at, finished_at, error_message, worker_id)
    SELECT id, 'lease_expired', coalesce(prior_started_at, now()), now(),
        'the worker lease ran out before a result was recorded', coalesce(prior_owner, '')
    FROM claimed
    WHERE prior_status = 'sending'
)
SELECT id, tenant_id, correlation_id, kind, account_sid, sender, recipient_channel, recipient,
    body, content_sid, content_variables, attempt_count, max_attempts, reconcile_failures,
    budget_started_at, attempt_started_at, reconcile_since, traceparent, prior_status
FROM claimed
$claim$;
