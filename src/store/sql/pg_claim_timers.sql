-- Claims due timers nobody holds (or whose holder's lease ran out); other
-- instances skip the rows locked here instead of waiting for them.
UPDATE timers SET leased_until_ms = $2
WHERE timer_id IN (
    SELECT timer_id FROM timers
    WHERE due_at_ms <= $1 AND (leased_until_ms IS NULL OR leased_until_ms <= $1)
    ORDER BY due_at_ms
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
RETURNING timer_id, kind, order_id, attempt, due_at_ms, causation_id, correlation_id, payload
