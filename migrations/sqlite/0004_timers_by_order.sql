-- Cancelling an order's timers finds them without a scan.
CREATE INDEX timers_order ON timers (order_id, kind);
