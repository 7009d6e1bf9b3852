-- A batch of notification attempts, one per index of the arrays; an attempt
-- already recorded is left as it is.
INSERT INTO notification_attempts
    (event_id, attempt, order_id, kind, outcome, error, attempted_at_ms)
SELECT *
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[])
ON CONFLICT (event_id, attempt) DO NOTHING
