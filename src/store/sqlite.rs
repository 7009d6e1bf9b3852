//! SQLite specifics: the embedded store in one file under the data
//! directory, in WAL mode so readers never block the single writer.
//!
//! Positions are assigned by a trigger inside the writing transaction;
//! SQLite has one writer at a time, so position order is commit order.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cqrs_es::persist::SerializedEvent;
use rusqlite::OptionalExtension;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::ConnectOptions;
use uuid::Uuid;

use super::inline::Readers;
use super::{corrupt, Lite, LogEntry, Shared, Store, StoreError};

/// How long a write waits for another process's (a second instance, the
/// CLI) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The lock file in a data directory, held (an exclusive `flock`) by the
/// process serving it.
const LOCK_FILE: &str = "order-saga.lock";

/// Held while this process serves a data directory; dropping it (or the
/// process ending, however it ends) releases the directory.
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

/// Takes the data directory for this process alone, or fails naming it
/// (and the process id that holds it) when another process serves it. The
/// analysts' read-only commands and `product set` do not take it, so they
/// stay usable beside a running service.
pub fn lock_data_dir(data_dir: &Path) -> Result<DataDirLock, StoreError> {
    use std::io::{Read, Seek, Write};
    let dir_error = |source| StoreError::DataDir {
        path: data_dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(dir_error)?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(data_dir.join(LOCK_FILE))
        .map_err(dir_error)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(StoreError::DataDirInUse {
                path: data_dir.to_path_buf(),
                holder: if pid.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {pid})")
                },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(dir_error(e)),
    }
    file.set_len(0).map_err(dir_error)?;
    file.rewind().map_err(dir_error)?;
    write!(file, "{}", std::process::id()).map_err(dir_error)?;
    Ok(DataDirLock { _file: file })
}

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
        .busy_timeout(BUSY_TIMEOUT)
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
    let writer = super::group::open_writer(&data_dir.join(DB_FILE), BUSY_TIMEOUT, WRITER_CACHE)
        .map_err(StoreError::Connect)?;
    tokio::spawn(checkpoints(options.clone(), write.clone()));
    Ok(Store::Sqlite(Lite {
        commits: super::group::GroupCommit::start(write.clone(), writer),
        readers: Arc::new(Readers::new(
            &data_dir.join(DB_FILE),
            BUSY_TIMEOUT,
            READER_CACHE,
        )),
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

pub(super) fn read_log(
    readers: &Readers,
    after: i64,
    limit: i64,
) -> Result<Vec<LogEntry>, StoreError> {
    read_entries(
        readers,
        include_str!("sql/sqlite_read_log.sql"),
        (after, limit),
    )
}

/// One aggregate's stored events, with their log metadata, oldest first.
pub(super) fn read_aggregate(
    readers: &Readers,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Vec<LogEntry>, StoreError> {
    read_entries(
        readers,
        include_str!("sql/read_aggregate.sql"),
        (aggregate_type, aggregate_id),
    )
}

/// The log entries a statement selects (the log's columns, by name).
fn read_entries(
    readers: &Readers,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<LogEntry>, StoreError> {
    let rows = readers.read(|conn| {
        conn.prepare_cached(sql)?
            .query_map(params, Row::read)?
            .collect::<rusqlite::Result<Vec<_>>>()
    })?;
    rows.into_iter().map(Row::entry).collect()
}

/// The events of the given aggregates stored after the given sequences,
/// oldest first per aggregate, by the statement `sql` (parameters: the
/// type, then each aggregate's id and sequence).
pub(super) fn newer_events(
    readers: &Readers,
    sql: &str,
    aggregate_type: &str,
    after: &[(&str, usize)],
) -> Result<Vec<SerializedEvent>, StoreError> {
    let mut params: Vec<Box<dyn rusqlite::ToSql + '_>> = vec![Box::new(aggregate_type)];
    for (id, sequence) in after {
        params.push(Box::new(*id));
        params.push(Box::new(i64::try_from(*sequence).unwrap_or(i64::MAX)));
    }
    let rows = readers.read(|conn| {
        conn.prepare_cached(sql)?
            .query_map(rusqlite::params_from_iter(params), |row| {
                Ok((
                    row.get::<_, String>("aggregate_type")?,
                    row.get::<_, String>("aggregate_id")?,
                    row.get::<_, i64>("sequence")?,
                    row.get::<_, String>("event_type")?,
                    row.get::<_, String>("event_version")?,
                    row.get::<_, String>("payload")?,
                    row.get::<_, String>("metadata")?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
    })?;
    rows.into_iter()
        .map(
            |(kind, id, sequence, event_type, version, payload, metadata)| {
                let unreadable = |e: serde_json::Error| {
                    StoreError::CorruptRow(format!("{kind} {id} event {sequence}: {e}"))
                };
                Ok(SerializedEvent::new(
                    id.clone(),
                    usize::try_from(sequence).unwrap_or_default(),
                    kind.clone(),
                    event_type,
                    version,
                    serde_json::from_str(&payload).map_err(unreadable)?,
                    serde_json::from_str(&metadata).map_err(unreadable)?,
                ))
            },
        )
        .collect()
}

/// The quantity `held_for_order` reads (`sqlite_held_for_order.sql`): no
/// row when the order never held, NULL when it gave the units back.
pub(super) fn held_for_order(
    readers: &Readers,
    product_id: &str,
    order_id: &str,
) -> Result<Option<Option<i64>>, StoreError> {
    Ok(readers.read(|conn| {
        conn.prepare_cached(include_str!("sql/sqlite_held_for_order.sql"))?
            .query_row((product_id, order_id), |row| row.get(0))
            .optional()
    })?)
}

/// Attempts at one event's notification, and how many delivered it.
pub(super) fn notification_progress(
    readers: &Readers,
    sql: &str,
    event_id: &str,
) -> Result<(i64, i64), StoreError> {
    Ok(readers.read(|conn| {
        conn.prepare_cached(sql)?
            .query_row([event_id], |row| Ok((row.get(0)?, row.get(1)?)))
    })?)
}

/// A log row as SQLite stores it, before its text is parsed.
struct Row {
    position: i64,
    event_id: String,
    recorded_at: String,
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    event_type: String,
    event_version: String,
    payload: String,
    metadata: String,
}

impl Row {
    fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Row {
            position: row.get("position")?,
            event_id: row.get("event_id")?,
            recorded_at: row.get("recorded_at")?,
            aggregate_type: row.get("aggregate_type")?,
            aggregate_id: row.get("aggregate_id")?,
            sequence: row.get("sequence")?,
            event_type: row.get("event_type")?,
            event_version: row.get("event_version")?,
            payload: row.get("payload")?,
            metadata: row.get("metadata")?,
        })
    }

    fn entry(self) -> Result<LogEntry, StoreError> {
        let position = self.position;
        Ok(LogEntry {
            position,
            event_id: Uuid::from_str(&self.event_id).map_err(|e| corrupt(position, e))?,
            recorded_at: DateTime::parse_from_rfc3339(&self.recorded_at)
                .map_err(|e| corrupt(position, e))?
                .with_timezone(&Utc),
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            sequence: self.sequence,
            event_type: self.event_type,
            event_version: self.event_version,
            payload: serde_json::from_str(&self.payload).map_err(|e| corrupt(position, e))?,
            metadata: serde_json::from_str(&self.metadata).map_err(|e| corrupt(position, e))?,
        })
    }
}
