-- Read models, built from the global log by the projections
-- (src/projections.rs) in one transaction with their checkpoint
-- ('projection.read_models'). Times are milliseconds since the epoch.

CREATE TABLE order_views
(
    order_id            text PRIMARY KEY,
    created_position    integer NOT NULL UNIQUE,
    user_id             text NOT NULL,
    store_id            text NOT NULL,
    status              text NOT NULL,
    items               text NOT NULL,
    total_amount        text NOT NULL,
    cancel_reason       text,
    created_at_ms       integer NOT NULL,
    stock_replied_at_ms integer,
    confirmed_at_ms     integer,
    payment_wait_at_ms  integer,
    cancelled_at_ms     integer,
    version             integer NOT NULL
) STRICT;
CREATE INDEX order_views_status ON order_views (status, created_position);
CREATE INDEX order_views_user ON order_views (user_id, created_position);
CREATE INDEX order_views_store ON order_views (store_id, created_position);

CREATE TABLE order_history
(
    order_id       text NOT NULL,
    position       integer NOT NULL,
    aggregate_type text NOT NULL,
    sequence       integer NOT NULL,
    event_type     text NOT NULL,
    recorded_at_ms integer NOT NULL,
    payload        text NOT NULL,
    PRIMARY KEY (order_id, position)
) STRICT;

CREATE TABLE product_views
(
    product_id text PRIMARY KEY,
    price      text,
    available  integer NOT NULL,
    reserved   integer NOT NULL
) STRICT;

CREATE TABLE saga_stats
(
    metric   text PRIMARY KEY,
    count    integer NOT NULL,
    total_ms integer NOT NULL,
    max_ms   integer NOT NULL
) STRICT;
