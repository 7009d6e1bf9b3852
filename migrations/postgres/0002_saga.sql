-- The saga's durable state beside the event store.

-- Deadlines and scheduled retries. A timer is claimed with a lease (so a
-- crashed claimer's timers fire again elsewhere) and deleted once its action
-- is done. Times are milliseconds since the epoch on the saga's clock.
CREATE TABLE timers
(
    timer_id        text PRIMARY KEY,
    kind            text   NOT NULL,
    order_id        text   NOT NULL,
    attempt         bigint  NOT NULL,
    due_at_ms       bigint NOT NULL,
    leased_until_ms bigint,
    causation_id    text   NOT NULL,
    correlation_id  text,
    payload         text   NOT NULL
);
CREATE INDEX timers_due ON timers (due_at_ms);

-- Messages a consumer could not decode or handle, with the error.
CREATE TABLE dead_letters
(
    id          bigserial PRIMARY KEY,
    consumer    text NOT NULL,
    topic       text NOT NULL,
    event_id    text,
    error       text NOT NULL,
    payload     text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

-- Every attempt to notify a customer, and how it went.
CREATE TABLE notification_attempts
(
    event_id        text    NOT NULL,
    attempt         bigint  NOT NULL,
    order_id        text    NOT NULL,
    kind            text    NOT NULL,
    outcome         text    NOT NULL,
    error           text,
    attempted_at_ms bigint  NOT NULL,
    PRIMARY KEY (event_id, attempt)
);
