-- Numbers the committed events that have no position yet, continuing after
-- the highest position. Runs only while holding the sequencer's advisory
-- lock, in its own transaction, so runs never overlap.
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
WITH base AS (
    SELECT COALESCE(MAX(position), 0) AS last FROM events
),
pending AS (
    SELECT aggregate_type, aggregate_id, sequence,
           row_number() OVER (ORDER BY tx, aggregate_type, aggregate_id, sequence) AS n
    FROM events
    WHERE position IS NULL
    ORDER BY tx, aggregate_type, aggregate_id, sequence
    LIMIT $1
)
UPDATE events e
SET position = base.last + pending.n
FROM pending, base
WHERE e.aggregate_type = pending.aggregate_type
  AND e.aggregate_id = pending.aggregate_id
  AND e.sequence = pending.sequence
