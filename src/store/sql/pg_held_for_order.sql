-- What an order holds on a product: the quantity of the product's last
-- StockHeld for the order, NULL when a StockReturned came after it, no row
-- when it never held. The expression matches the index of migration 0006.
SELECT (payload -> 'stockHeld' ->> 'quantity')::bigint
FROM events
WHERE aggregate_type = 'Product'
  AND aggregate_id = $1
  AND coalesce(payload -> 'stockHeld' ->> 'orderId', payload -> 'stockReturned' ->> 'orderId') = $2
ORDER BY sequence DESC
LIMIT 1
