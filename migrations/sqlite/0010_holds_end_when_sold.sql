-- A hold ends when it is returned or sold (StockSold, once the order is
-- paid): the holds index (migration 0006) learns the third event.
DROP INDEX events_product_holds;
CREATE INDEX events_product_holds ON events (
    aggregate_id,
    coalesce(json_extract(payload, '$.stockHeld.orderId'), json_extract(payload, '$.stockReturned.orderId'), json_extract(payload, '$.stockSold.orderId')),
    sequence
) WHERE aggregate_type = 'Product';
