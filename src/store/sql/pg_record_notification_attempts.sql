-- A batch of notification attempts' outcomes, one per index of the arrays:
-- each completes its claim (outcome 'sending', pg_claim_notifications.sql);
-- an attempt already completed is left as it is, and so is an attempt asked
-- twice in the batch after its first.
INSERT INTO notification_attempts AS n
    (event_id, attempt, order_id, kind, outcome, error, attempted_at_ms)
SELECT DISTINCT ON (event_id, attempt) *
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[])
    AS u(event_id, attempt, order_id, kind, outcome, error, attempted_at_ms)
ON CONFLICT (event_id, attempt) DO UPDATE
SET outcome = excluded.outcome, error = excluded.error, attempted_at_ms = excluded.attempted_at_ms
WHERE n.outcome = 'sending'
