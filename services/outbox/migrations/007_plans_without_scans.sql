-- Claims and results as the primary-key look-ups they were written as, whatever the planner
-- believes about `messages`. A plan made while the table was small -- right after a start or
-- a burst, before autovacuum first analyzes it, and kept since in the plan caches of prepared
-- statements and SQL functions -- turned the look-ups by `id = ANY (...)` into a scan of the
-- whole table at every claim and every batch of results, until the next ANALYZE: 1,600 pages
-- read per statement at 11,000 messages, most of PostgreSQL's time under load.
-- `enable_seqscan = off` leaves the indexes the cheapest plan in every case.
ALTER FUNCTION claim_due_messages(text, integer, double precision, text[], uuid[])
    SET enable_seqscan = off;

-- The results of many claims (store.OutboxStore.record_resolutions), moved into a function for
-- the same setting: status, attempt rows and events in one statement. A row is written only
-- while the worker `$1` still holds its lease -- except an acceptance by Twilio, which is
-- recorded even after a lost lease (it is the truth; whoever holds the message now will find it
-- sent) unless that Twilio SID is already someone's. Returns the ids written.
CREATE FUNCTION record_resolutions(text, resolution_row[], attempt_row[], event_row[])
RETURNS TABLE (ids uuid[], unused boolean)
LANGUAGE sql VOLATILE
SET enable_seqscan = off
AS $resolve$
WITH input AS MATERIALIZED (
    SELECT * FROM unnest($2::resolution_row[])
), taken AS MATERIALIZED (
    SELECT twilio_sid FROM messages
    WHERE twilio_sid = ANY (ARRAY(SELECT twilio_sid FROM input WHERE twilio_sid IS NOT NULL))
), updated AS (
    UPDATE messages m SET
        status = i.status,
        attempt_count = m.attempt_count + i.attempt_increment,
        reconcile_failures = CASE WHEN i.status = 'pending'
            THEN m.reconcile_failures + i.reconcile_failure_increment ELSE 0 END,
        next_attempt_at = coalesce(i.next_attempt_at, m.next_attempt_at),
        reconcile_since = i.reconcile_since,
        twilio_sid = coalesce(i.twilio_sid, m.twilio_sid),
        twilio_status = coalesce(i.twilio_status, m.twilio_status),
        sent_at = coalesce(i.sent_at, m.sent_at),
        dead_reason = i.dead_reason,
        dead_at = CASE WHEN i.status = 'dead' THEN now() END,
        last_error_code = coalesce(i.error_code, m.last_error_code),
        last_error_message = coalesce(i.error_message, m.last_error_message),
        lease_owner = NULL,
        lease_expires_at = NULL,
        updated_at = now()
    FROM input i
    -- `m.id = ANY` makes this primary-key look-ups whatever the table statistics say; the
    -- ownership rule is a CASE so no other index (e.g. over all pending rows) is scanned.
    WHERE m.id = ANY (ARRAY(SELECT id FROM input)) AND m.id = i.id
      AND CASE
        WHEN m.status = 'sending' AND m.lease_owner = $1 THEN true
        WHEN i.status = 'sent' THEN m.twilio_sid IS NULL
            AND m.status IN ('pending', 'sending', 'dead')
        ELSE false END
      AND (i.twilio_sid IS NULL OR i.twilio_sid NOT IN (SELECT twilio_sid FROM taken))
    RETURNING m.id
), attempts_written AS (
    INSERT INTO attempts (message_id, outcome, started_at, finished_at, http_status,
        error_code, error_message, twilio_sid, worker_id)
    SELECT a.message_id, a.outcome, a.started_at, a.finished_at, a.http_status, a.error_code,
        a.error_message, a.twilio_sid, $1
    FROM unnest($3::attempt_row[]) AS a
    WHERE a.message_id IN (SELECT id FROM updated)
), events_written AS (
    INSERT INTO events (subject, aggregate_id, tenant_id, payload, traceparent)
    SELECT e.subject, e.message_id::text, e.tenant_id, e.payload, e.traceparent
    FROM unnest($4::event_row[])
        WITH ORDINALITY AS e(message_id, subject, tenant_id, payload, traceparent, n)
    WHERE e.message_id IN (SELECT id FROM updated)
    ORDER BY e.n
    RETURNING 1
)
SELECT array(SELECT id FROM updated) AS ids,
    (SELECT pg_notify('events_' || current_schema(), '')
     WHERE EXISTS (SELECT 1 FROM events_written)) IS NULL AS unused
$resolve$;

-- The ownership rule of these two is a CASE, not plain conditions: `status = 'sending'` would
-- let the planner scan the due index (every pending row, a million after a burst) instead of
-- probing the primary key for the few ids held. Arguments: the ids, the worker id, and for
-- `renew_leases` the lease (seconds); it returns the ids still held.
CREATE FUNCTION renew_leases(uuid[], text, double precision)
RETURNS SETOF uuid
LANGUAGE sql VOLATILE
SET enable_seqscan = off
AS $renew$
UPDATE messages SET
    lease_expires_at = now() + make_interval(secs => $3::float8),
    next_attempt_at = now() + make_interval(secs => $3::float8)
WHERE id = ANY ($1::uuid[])
    AND CASE WHEN status = 'sending' AND lease_owner = $2::text THEN true ELSE false END
RETURNING id
$renew$;

CREATE FUNCTION release_messages(uuid[], text)
RETURNS void
LANGUAGE sql VOLATILE
SET enable_seqscan = off
AS $release$
UPDATE messages SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL,
    next_attempt_at = now(), updated_at = now()
WHERE id = ANY ($1::uuid[])
    AND CASE WHEN status = 'sending' AND lease_owner = $2::text THEN true ELSE false END
$release$;
