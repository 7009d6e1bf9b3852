-- Attempts made so far for each of a batch of notifications ($1, event
-- ids), and how many delivered it, answered in the batch's order (an event
-- id asked twice is answered twice). One index lookup per event id: the
-- lateral aggregate always gives a row, and a join on the whole table would
-- be planned without knowing how few ids the array holds.
SELECT made.attempts, made.delivered
FROM unnest($1::text[]) WITH ORDINALITY AS k(event_id, n)
CROSS JOIN LATERAL (
    SELECT count(*) AS attempts,
           coalesce(sum(CASE WHEN a.outcome = 'delivered' THEN 1 ELSE 0 END), 0) AS delivered
    FROM notification_attempts a
    WHERE a.event_id = k.event_id
) made
ORDER BY k.n
