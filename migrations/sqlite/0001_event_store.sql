-- The event store: sqlite-es's `events` table, plus the global log.
--
-- sqlite-es inserts (aggregate_type, aggregate_id, sequence, event_type,
-- event_version, payload, metadata); event_id and recorded_at fill in by
-- default, and the trigger below gives each row the next global position in
-- the same transaction. SQLite has one writer at a time, so that order is
-- commit order. See ARCHITECTURE.md, "The global log".
CREATE TABLE events
(
    aggregate_type text                          NOT NULL,
    aggregate_id   text                          NOT NULL,
    sequence       integer CHECK (sequence >= 0) NOT NULL,
    event_type     text                          NOT NULL,
    event_version  text                          NOT NULL,
    payload        text                          NOT NULL,
    metadata       text                          NOT NULL,
    -- a random (version 4) UUID in its canonical text form
    event_id       text                          NOT NULL DEFAULT (lower(
        hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' || substr(hex(randomblob(2)), 2) || '-' ||
        substr('89ab', 1 + (abs(random()) % 4), 1) || substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6)))),
    recorded_at    text                          NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    position       integer,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
) STRICT;

CREATE UNIQUE INDEX events_event_id ON events (event_id);
CREATE UNIQUE INDEX events_position ON events (position);

CREATE TRIGGER events_assign_position AFTER INSERT ON events
BEGIN
    UPDATE events
    SET position = (SELECT COALESCE(MAX(position), 0) + 1 FROM events)
    WHERE rowid = NEW.rowid;
END;

-- sqlite-es's snapshot table (used once snapshots are turned on).
CREATE TABLE snapshots
(
    aggregate_type   text                                  NOT NULL,
    aggregate_id     text                                  NOT NULL,
    last_sequence    integer CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot integer CHECK (current_snapshot >= 0) NOT NULL,
    payload          text                                  NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
) STRICT;

-- How far each reader of the global log has come.
CREATE TABLE checkpoints
(
    name       text PRIMARY KEY,
    position   integer NOT NULL CHECK (position >= 0)
) STRICT;

-- Idempotency-Key of POST /api/v1/orders -> the order it created.
CREATE TABLE idempotency_keys
(
    key         text PRIMARY KEY,
    order_id    text NOT NULL,
    fingerprint text NOT NULL,
    created_at  text NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;
