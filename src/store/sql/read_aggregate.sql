SELECT position, event_id, recorded_at, aggregate_type, aggregate_id, sequence,
       event_type, event_version, payload, metadata
FROM events
WHERE aggregate_type = $1 AND aggregate_id = $2 AND position IS NOT NULL
ORDER BY position
