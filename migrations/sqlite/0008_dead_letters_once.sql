-- A message is dead-lettered once per consumer group, however many
-- instances gave up on it (a partition that moved mid-batch, two holders
-- for a moment): keep the first of any repeats, then refuse them.
DELETE FROM dead_letters
WHERE event_id IS NOT NULL
  AND id NOT IN (
      SELECT min(id) FROM dead_letters WHERE event_id IS NOT NULL GROUP BY consumer, event_id
  );

CREATE UNIQUE INDEX dead_letters_once ON dead_letters (consumer, event_id)
    WHERE event_id IS NOT NULL;
