-- The sequencer as one function, so a run is one statement (one round trip)
-- instead of BEGIN, lock, set_config, UPDATE, COMMIT.
--
-- Numbers up to max_rows committed events that have no position yet,
-- continuing after the highest position; returns how many it numbered.
--
-- The advisory lock (key derived from the schema, so test schemas in one
-- database do not contend) is held until the calling transaction ends, so
-- runs never overlap: a second caller waits. The UPDATE takes its snapshot
-- after the lock is held (a VOLATILE function's statements each take a fresh
-- snapshot under READ COMMITTED), so it sees every earlier run's positions.
--
-- Why no event is ever skipped by a reader: a run numbers exactly the rows
-- visible to its snapshot, i.e. committed before it started; a row that
-- commits later is numbered by a later run, which (holding the lock after
-- this run committed) sees this run's positions and continues above them.
-- So positions become visible in increasing order, without gaps, and a
-- reader that checkpoints the last position it read can never find a
-- smaller one appear later.
--
-- Within a run rows go in (tx, aggregate, sequence) order. An aggregate's
-- event n+1 is written by a transaction that loaded event n after it
-- committed, so its xid is larger: per-aggregate order is kept.
--
-- The run commits without waiting for the disk (see ARCHITECTURE.md,
-- "Performance": the WAL is replayed as a prefix).
CREATE FUNCTION order_saga_sequence(max_rows bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    numbered bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '.order_saga.sequencer'));
    PERFORM set_config('synchronous_commit', 'off', true);
    WITH base AS (
        SELECT COALESCE(MAX(position), 0) AS last FROM events
    ),
    pending AS (
        SELECT aggregate_type, aggregate_id, sequence,
               row_number() OVER (ORDER BY tx, aggregate_type, aggregate_id, sequence) AS n
        FROM events
        WHERE position IS NULL
        ORDER BY tx, aggregate_type, aggregate_id, sequence
        LIMIT max_rows
    )
    UPDATE events e
    SET position = base.last + pending.n
    FROM pending, base
    WHERE e.aggregate_type = pending.aggregate_type
      AND e.aggregate_id = pending.aggregate_id
      AND e.sequence = pending.sequence;
    GET DIAGNOSTICS numbered = ROW_COUNT;
    RETURN numbered;
END
$$;
