-- save_checkpoint.sql, committed without waiting for the disk (store::RELAXED).
INSERT INTO checkpoints (name, position)
SELECT $1, $2 FROM (SELECT set_config('synchronous_commit', 'off', true)) AS relaxed
ON CONFLICT (name) DO UPDATE SET position = excluded.position
WHERE checkpoints.position < excluded.position
