-- Claims a batch of notification attempts before they are sent, one per
-- index of the arrays ($1 event ids, $2 attempts, $3 order ids, $4 kinds,
-- $5 the claim times in clock millis; $6 the lease in millis). An attempt
-- is taken when nobody made it yet (and no attempt of the event delivered
-- or came after it), or when its claim is older than the lease and was
-- never completed (its claimer died while sending). Answers the attempts
-- taken; an attempt asked twice in the batch is taken once.
WITH asked AS (
    SELECT DISTINCT ON (event_id, attempt) *
    FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[])
        AS u(event_id, attempt, order_id, kind, at_ms)
)
INSERT INTO notification_attempts AS n
    (event_id, attempt, order_id, kind, outcome, error, attempted_at_ms)
SELECT a.event_id, a.attempt, a.order_id, a.kind, 'sending', NULL, a.at_ms
FROM asked a
WHERE NOT EXISTS (
    SELECT 1 FROM notification_attempts d
    WHERE d.event_id = a.event_id AND (d.outcome = 'delivered' OR d.attempt > a.attempt)
)
ON CONFLICT (event_id, attempt) DO UPDATE SET attempted_at_ms = excluded.attempted_at_ms
WHERE n.outcome = 'sending' AND n.attempted_at_ms <= excluded.attempted_at_ms - $6
RETURNING n.event_id, n.attempt
