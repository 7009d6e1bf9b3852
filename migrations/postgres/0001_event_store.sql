-- The event store: postgres-es's `events` table, plus the global log.
--
-- postgres-es inserts (aggregate_type, aggregate_id, sequence, event_type,
-- event_version, payload, metadata); the columns after those fill in by
-- default inside the same transaction:
--   event_id     a UUID per stored event, stable for ever (integration eventId)
--   recorded_at  when the row was written
--   tx           the writing transaction's id (xid8): the sequencer's order
--   position     the global log position: NULL at insert, then assigned by the
--                sequencer (src/store/sql/pg_sequence.sql) in commit-safe order,
--                dense, 1, 2, 3, ... See ARCHITECTURE.md, "The global log".
CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    event_id       uuid                         NOT NULL DEFAULT gen_random_uuid(),
    recorded_at    timestamptz                  NOT NULL DEFAULT clock_timestamp(),
    tx             xid8                         NOT NULL DEFAULT pg_current_xact_id(),
    position       bigint,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE UNIQUE INDEX events_event_id ON events (event_id);
CREATE UNIQUE INDEX events_position ON events (position);
-- What the sequencer still has to number, in the order it numbers it.
CREATE INDEX events_unsequenced ON events (tx, aggregate_type, aggregate_id, sequence)
    WHERE position IS NULL;

-- postgres-es's snapshot table (used once snapshots are turned on).
CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json                                 NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);

-- How far each reader of the global log has come.
CREATE TABLE checkpoints
(
    name       text PRIMARY KEY,
    position   bigint      NOT NULL CHECK (position >= 0)
);

-- Idempotency-Key of POST /api/v1/orders -> the order it created.
CREATE TABLE idempotency_keys
(
    key         text PRIMARY KEY,
    order_id    text        NOT NULL,
    fingerprint text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
