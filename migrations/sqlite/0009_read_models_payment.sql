-- After PAYMENT_WAIT: when an order was paid and completed, and how much
-- of each product is sold. (A rebuild's tables get these columns too: it
-- runs this file after 0003.)
ALTER TABLE order_views ADD COLUMN paid_at_ms integer;
ALTER TABLE order_views ADD COLUMN completed_at_ms integer;
ALTER TABLE product_views ADD COLUMN sold integer NOT NULL DEFAULT 0;
