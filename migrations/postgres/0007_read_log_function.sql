-- A log reader's read as one statement: when asked (sequence_limit > 0), run
-- the sequencer first (order_saga_sequence, migration 0005), then read up to
-- max_rows entries after `after` — one round trip instead of two.
--
-- The read takes its snapshot after the sequencer's run (a VOLATILE
-- function's statements each take a fresh one), so it sees the positions
-- just assigned. The sequencer's advisory lock is held until this call's
-- transaction ends, i.e. also during the read: a concurrent run waits for
-- it, as it would have waited for the run alone.
--
-- Every row carries `numbered`, how many events this call numbered: if it
-- numbered any, they follow `after` (a reader never reads past the highest
-- position), so an empty answer means none.
CREATE FUNCTION order_saga_read_log(after bigint, max_rows bigint, sequence_limit bigint)
RETURNS TABLE (
    log_position   bigint,
    event_id       uuid,
    recorded_at    timestamptz,
    aggregate_type text,
    aggregate_id   text,
    sequence       bigint,
    event_type     text,
    event_version  text,
    payload        json,
    metadata       json,
    numbered       bigint
)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    run bigint := 0;
BEGIN
    IF sequence_limit > 0 THEN
        run := order_saga_sequence(sequence_limit);
    END IF;
    RETURN QUERY
        SELECT e.position, e.event_id, e.recorded_at, e.aggregate_type, e.aggregate_id,
               e.sequence, e.event_type, e.event_version, e.payload, e.metadata, run
        FROM events e
        WHERE e.position > after
        ORDER BY e.position
        LIMIT max_rows;
END
$$;
