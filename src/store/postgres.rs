//! PostgreSQL specifics: the sequencer that numbers the global log.
//!
//! postgres-es inserts rows with no position. Before reading, a reader runs
//! the sequencer, which numbers the committed rows in a commit-safe order
//! (migration 0005): a log read in the same statement ([`read_log`],
//! migration 0007), other reads before theirs
//! (`Store::sequence_for_reading`); `Pg::sequencing` decides when.

use sqlx::postgres::PgRow;
use sqlx::Row;

use super::{corrupt, LogEntry, Statements, StoreError};

/// Numbers up to `limit` committed events; returns how many. Waits while
/// another session runs the sequencer, so that everything committed before
/// the call is numbered when it returns (up to `limit`). One statement: the
/// run is the function `order_saga_sequence` (migration 0005, which says
/// why it never lets a reader skip an event).
pub(super) async fn sequence(pool: &Statements, limit: i64) -> Result<u64, StoreError> {
    let numbered: i64 = sqlx::query_scalar("SELECT order_saga_sequence($1)")
        .bind(limit)
        .fetch_one(pool)
        .await?;
    Ok(u64::try_from(numbered).unwrap_or(0))
}

/// Up to `limit` log entries after `after`; with `sequence_limit`, the
/// sequencer numbers up to that many events first, in the same statement
/// (`order_saga_read_log`, migration 0007). Returns the entries and how
/// many events were numbered.
pub(super) async fn read_log(
    pool: &Statements,
    after: i64,
    limit: i64,
    sequence_limit: Option<i64>,
) -> Result<(Vec<LogEntry>, u64), StoreError> {
    let rows = sqlx::query(
        "SELECT log_position AS position, event_id, recorded_at, aggregate_type, aggregate_id, \
         sequence, event_type, event_version, payload, metadata, numbered \
         FROM order_saga_read_log($1, $2, $3)",
    )
    .bind(after)
    .bind(limit)
    .bind(sequence_limit.unwrap_or(0))
    .fetch_all(pool)
    .await?;
    let numbered = match rows.first() {
        Some(row) => u64::try_from(row.try_get::<i64, _>("numbered")?).unwrap_or(0),
        None => 0,
    };
    let entries = rows.iter().map(entry).collect::<Result<_, _>>()?;
    Ok((entries, numbered))
}

/// One aggregate's stored events, with their log metadata, oldest first.
pub(super) async fn read_aggregate(
    pool: &Statements,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Vec<LogEntry>, StoreError> {
    let rows = sqlx::query(include_str!("sql/read_aggregate.sql"))
        .bind(aggregate_type)
        .bind(aggregate_id)
        .fetch_all(pool)
        .await?;
    rows.iter().map(entry).collect()
}

fn entry(row: &PgRow) -> Result<LogEntry, StoreError> {
    let position: i64 = row.try_get("position")?;
    let sequence: i64 = row.try_get("sequence")?;
    Ok(LogEntry {
        position,
        event_id: row.try_get("event_id")?,
        recorded_at: row.try_get("recorded_at")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        payload: row.try_get("payload").map_err(|e| corrupt(position, e))?,
        metadata: row.try_get("metadata").map_err(|e| corrupt(position, e))?,
    })
}
