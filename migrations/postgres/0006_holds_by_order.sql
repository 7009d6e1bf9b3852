-- What an order holds on a product is no longer kept in the Product
-- aggregate (its state grew with every order): it is looked up in the
-- product's own StockHeld / StockReturned events, by product and order,
-- the last one first.
CREATE INDEX events_product_holds ON events (
    aggregate_id,
    (coalesce(payload -> 'stockHeld' ->> 'orderId', payload -> 'stockReturned' ->> 'orderId')),
    sequence
) WHERE aggregate_type = 'Product';

-- Product snapshots taken before carried the per-order holds and no total:
-- drop them; the next load replays the product's events instead.
DELETE FROM snapshots WHERE aggregate_type = 'Product';
