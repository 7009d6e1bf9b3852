-- A hold ends when it is returned or sold (StockSold, once the order is
-- paid): the holds index (migration 0006) learns the third event.
DROP INDEX events_product_holds;
CREATE INDEX events_product_holds ON events (
    aggregate_id,
    (coalesce(payload -> 'stockHeld' ->> 'orderId',
              payload -> 'stockReturned' ->> 'orderId',
              payload -> 'stockSold' ->> 'orderId')),
    sequence
) WHERE aggregate_type = 'Product';
