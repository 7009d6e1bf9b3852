-- Read models, built from the global log by the projections
-- (src/projections.rs) in one transaction with their checkpoint
-- ('projection.read_models'). Times are milliseconds since the epoch.

CREATE TABLE order_views
(
    order_id            text PRIMARY KEY,
    created_position    bigint NOT NULL UNIQUE,
    user_id             text NOT NULL,
    store_id            text NOT NULL,
    status              text NOT NULL,
    items               text NOT NULL,
    total_amount        text NOT NULL,
    cancel_reason       text,
    created_at_ms       bigint NOT NULL,
    stock_replied_at_ms bigint,
    confirmed_at_ms     bigint,
    payment_wait_at_ms  bigint,
    cancelled_at_ms     bigint,
    version             bigint NOT NULL
);
CREATE INDEX order_views_status ON order_views (status, created_position);
CREATE INDEX order_views_user ON order_views (user_id, created_position);
CREATE INDEX order_views_store ON order_views (store_id, created_position);

CREATE TABLE order_history
(
    order_id       text NOT NULL,
    position       bigint NOT NULL,
    aggregate_type text NOT NULL,
    sequence       bigint NOT NULL,
    event_type     text NOT NULL,
    recorded_at_ms bigint NOT NULL,
    payload        text NOT NULL,
    PRIMARY KEY (order_id, position)
);

CREATE TABLE product_views
(
    product_id text PRIMARY KEY,
    price      text,
    available  bigint NOT NULL,
    reserved   bigint NOT NULL
);

CREATE TABLE saga_stats
(
    metric   text PRIMARY KEY,
    count    bigint NOT NULL,
    total_ms bigint NOT NULL,
    max_ms   bigint NOT NULL
);
