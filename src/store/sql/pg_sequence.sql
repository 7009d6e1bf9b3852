-- Numbers the next batch of committed, not yet numbered events, in
-- (tx, aggregate_type, aggregate_id, sequence) order, continuing after the
-- highest position. Runs only while holding the sequencer's advisory lock,
-- in its own transaction.
--
-- Only rows whose transaction is below the snapshot's xmin are taken: every
-- such transaction has finished, and every transaction still able to commit
-- has a tx at or above xmin, so no row can later appear *before* what is
-- numbered here. Positions therefore become visible in order, without gaps.
WITH base AS (
    SELECT COALESCE(MAX(position), 0) AS last FROM events
),
pending AS (
    SELECT aggregate_type, aggregate_id, sequence,
           row_number() OVER (ORDER BY tx, aggregate_type, aggregate_id, sequence) AS n
    FROM events
    WHERE position IS NULL
      AND tx < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY tx, aggregate_type, aggregate_id, sequence
    LIMIT $1
)
UPDATE events e
SET position = base.last + pending.n
FROM pending, base
WHERE e.aggregate_type = pending.aggregate_type
  AND e.aggregate_id = pending.aggregate_id
  AND e.sequence = pending.sequence
