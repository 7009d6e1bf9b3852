-- Orders that were waiting for their payment before the payment deadline
-- existed get one: 30 minutes (the default) after their wait opened, as the
-- read model has it. Later orders get theirs when the wait opens. The
-- deadline's cause is a fixed id: its expiry is a command on the order,
-- an exact repeat if it fires twice.
INSERT INTO timers (timer_id, kind, order_id, attempt, due_at_ms, causation_id, correlation_id, payload)
SELECT 'PaymentTimeout:' || order_id || ':0', 'PaymentTimeout', order_id, 0,
       coalesce(payment_wait_at_ms, created_at_ms) + 1800000,
       '00000000-0000-7000-8000-000000000000', NULL, '{}'
FROM order_views
WHERE status = 'PAYMENT_WAIT'
ON CONFLICT (timer_id) DO NOTHING;
