-- claim_notification.sql: pg_claim_notifications.sql for one attempt
-- ($1 event id, $2 attempt, $3 order id, $4 kind, $5 claim time, $6 lease).
INSERT INTO notification_attempts
    (event_id, attempt, order_id, kind, outcome, error, attempted_at_ms)
SELECT $1, $2, $3, $4, 'sending', NULL, $5
WHERE NOT EXISTS (
    SELECT 1 FROM notification_attempts d
    WHERE d.event_id = $1 AND (d.outcome = 'delivered' OR d.attempt > $2)
)
ON CONFLICT (event_id, attempt) DO UPDATE SET attempted_at_ms = excluded.attempted_at_ms
WHERE notification_attempts.outcome = 'sending'
  AND notification_attempts.attempted_at_ms <= excluded.attempted_at_ms - $6
RETURNING attempt
