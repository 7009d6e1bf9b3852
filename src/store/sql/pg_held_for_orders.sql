-- What each order holds on each product, for a batch of (product, order)
-- pairs ($1 and $2, one pair per index), answered in the pairs' order: the
-- quantity of the product's last StockHeld for the order, NULL when a
-- StockReturned or StockSold came after it or it never held. The expression
-- matches the index of migration 0010.
SELECT (
    SELECT (e.payload -> 'stockHeld' ->> 'quantity')::bigint
    FROM events e
    WHERE e.aggregate_type = 'Product'
      AND e.aggregate_id = k.product_id
      AND coalesce(e.payload -> 'stockHeld' ->> 'orderId',
                   e.payload -> 'stockReturned' ->> 'orderId',
                   e.payload -> 'stockSold' ->> 'orderId') = k.order_id
    ORDER BY e.sequence DESC
    LIMIT 1
)
FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(product_id, order_id, n)
ORDER BY k.n
