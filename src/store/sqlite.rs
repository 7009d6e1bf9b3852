//! SQLite specifics: the embedded store in one file under the data
//! directory, in WAL mode so readers never block the single writer.
//!
//! Positions are assigned by a trigger inside the writing transaction;
//! SQLite has one writer at a time, so position order is commit order.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Row};
use uuid::Uuid;

use super::{corrupt, Lite, LogEntry, Shared, Store, StoreError};

/// The database file inside the data directory.
pub const DB_FILE: &str = "order-saga.sqlite";

/// Read-only connections beside the writer.
const READERS: u32 = 4;

/// SQLite's page cache per connection (negative: KiB), on top of the
/// operating system's file cache, which every connection shares. Small and
/// fixed, so the service's memory stays flat as the file grows (at 64 MiB
/// per connection it grew 2.5-fold over a 10-minute run; at 16 MiB for the
/// writer and 4 MiB per reader it still filled for minutes): the writer
/// keeps the index pages its inserts touch, readers mostly read the log's
/// tail, and a page missing here is a read from the file cache.
const WRITER_CACHE: &str = "-8192";
const READER_CACHE: &str = "-1024";

/// WAL pages after which a commit copies the WAL back into the database
/// file (SQLite's default is 1,000, ~4 MiB). That copy, with its fsync,
/// runs in the committing writer's path: every write waits for it. Here it
/// is only the fallback; the copies are made by `checkpoints` below.
const WAL_AUTOCHECKPOINT: &str = "10000";

/// How often a connection of its own copies the WAL back into the database
/// file: a PASSIVE checkpoint, which waits for no one, while the writer
/// goes on appending to the WAL. Measurements: ARCHITECTURE.md,
/// "Performance", "WAL checkpoints off the writer's path".
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

pub(super) async fn open(data_dir: &Path) -> Result<Store, StoreError> {
    std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
        path: data_dir.to_path_buf(),
        source,
    })?;
    let options = SqliteConnectOptions::new()
        .filename(data_dir.join(DB_FILE))
        .create_if_missing(true)
        // With WAL, NORMAL survives a crash of the process (kill -9); only
        // an OS crash or power loss can lose the last commits.
        .synchronous(SqliteSynchronous::Normal)
        // Another process writing the same file (a second instance, the
        // CLI) is waited for.
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
    let write = SqlitePoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect_with(
            options
                .clone()
                .journal_mode(SqliteJournalMode::Wal)
                .pragma("cache_size", WRITER_CACHE)
                .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT),
        )
        .await
        .map_err(StoreError::Connect)?;
    let read = SqlitePoolOptions::new()
        .max_connections(READERS)
        .test_before_acquire(false)
        .connect_with(
            options
                .clone()
                .read_only(true)
                .pragma("cache_size", READER_CACHE),
        )
        .await
        .map_err(StoreError::Connect)?;
    tokio::spawn(checkpoints(options.clone(), write.clone()));
    Ok(Store::Sqlite(Lite {
        commits: super::group::GroupCommit::start(write.clone()),
        write,
        read,
        shared: Shared::new(),
    }))
}

/// Copies the WAL back into the database file every `CHECKPOINT_EVERY`,
/// on a connection of its own, until the writer's pool closes. Without it
/// (it could not connect) the writer's automatic checkpoints still run.
async fn checkpoints(options: SqliteConnectOptions, write: SqlitePool) {
    let mut conn = match options.connect().await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::warn!(error = %e, "no WAL checkpoint connection: the writer checkpoints");
            return;
        }
    };
    let mut every = tokio::time::interval(CHECKPOINT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if write.is_closed() {
            break;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut conn)
            .await
        {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
}

pub(super) async fn read_log(
    pool: &SqlitePool,
    after: i64,
    limit: i64,
) -> Result<Vec<LogEntry>, StoreError> {
    let rows = sqlx::query(include_str!("sql/sqlite_read_log.sql"))
        .bind(after)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter().map(entry).collect()
}

/// One aggregate's stored events, with their log metadata, oldest first.
pub(super) async fn read_aggregate(
    pool: &SqlitePool,
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

fn entry(row: &SqliteRow) -> Result<LogEntry, StoreError> {
    let position: i64 = row.try_get("position")?;
    let event_id: String = row.try_get("event_id")?;
    let recorded_at: String = row.try_get("recorded_at")?;
    let payload: String = row.try_get("payload")?;
    let metadata: String = row.try_get("metadata")?;
    Ok(LogEntry {
        position,
        event_id: Uuid::from_str(&event_id).map_err(|e| corrupt(position, e))?,
        recorded_at: DateTime::parse_from_rfc3339(&recorded_at)
            .map_err(|e| corrupt(position, e))?
            .with_timezone(&Utc),
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        payload: serde_json::from_str(&payload).map_err(|e| corrupt(position, e))?,
        metadata: serde_json::from_str(&metadata).map_err(|e| corrupt(position, e))?,
    })
}
