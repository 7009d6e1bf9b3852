-- Dead letters an operator acts on: each is PENDING until it is redriven
-- (handed back to its consumer, which handled it) or discarded, and is
-- kept with that outcome; `redrives` counts the redrives that failed.
ALTER TABLE dead_letters ADD COLUMN status text NOT NULL DEFAULT 'PENDING';
ALTER TABLE dead_letters ADD COLUMN redrives integer NOT NULL DEFAULT 0;
ALTER TABLE dead_letters ADD COLUMN recorded_at_ms integer;
ALTER TABLE dead_letters ADD COLUMN settled_at_ms integer;
UPDATE dead_letters SET recorded_at_ms = CAST(unixepoch(recorded_at, 'subsec') * 1000 AS integer);
CREATE INDEX dead_letters_pending ON dead_letters (id) WHERE status = 'PENDING';
