-- A batch of scheduling writes (timers.rs), no two on the same order: drops
-- the pending timers the writes cancel, one per index of $1–$3 (mode 'kind':
-- the order's timers of that kind; mode 'saga': all of the order's but that
-- kind and notification retries, $12), and stores the timers, one per index
-- of $4–$11, unless one with the id exists. One statement, one commit.
WITH cancelled AS (
    DELETE FROM timers AS t
    USING unnest($1::text[], $2::text[], $3::text[]) AS c(mode, kind, order_id)
    WHERE t.order_id = c.order_id
      AND CASE c.mode
              WHEN 'kind' THEN t.kind = c.kind
              ELSE t.kind <> c.kind AND t.kind <> $12
          END
)
INSERT INTO timers (timer_id, kind, order_id, attempt, due_at_ms, causation_id, correlation_id, payload)
SELECT *
FROM unnest($4::text[], $5::text[], $6::text[], $7::bigint[], $8::bigint[], $9::text[], $10::text[], $11::text[])
ON CONFLICT (timer_id) DO NOTHING
