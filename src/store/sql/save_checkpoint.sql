-- save_checkpoint.sql: a consumer's or the relay's checkpoint, which only
-- moves forward (an instance that lost its role, or a late write, never
-- takes it back over positions another instance handled since).
INSERT INTO checkpoints (name, position) VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE SET position = excluded.position
WHERE checkpoints.position < excluded.position
