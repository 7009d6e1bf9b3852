INSERT INTO timers (timer_id, kind, order_id, attempt, due_at_ms, causation_id, correlation_id, payload)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (timer_id) DO NOTHING
