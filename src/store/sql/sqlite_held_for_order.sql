-- What an order holds on a product: the quantity of the product's last
-- StockHeld for the order, NULL when a StockReturned or StockSold came after
-- it, no row when it never held. The expression matches the index of
-- migration 0010,
-- named here: without statistics SQLite would rather scan the product's
-- events through the primary key (in sequence order), which grows with orders.
SELECT json_extract(payload, '$.stockHeld.quantity')
FROM events INDEXED BY events_product_holds
WHERE aggregate_type = 'Product'
  AND aggregate_id = $1
  AND coalesce(json_extract(payload, '$.stockHeld.orderId'), json_extract(payload, '$.stockReturned.orderId'), json_extract(payload, '$.stockSold.orderId')) = $2
ORDER BY sequence DESC
LIMIT 1
