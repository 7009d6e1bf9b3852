//! The event store and its global log, over two backends behind one seam:
//! PostgreSQL through postgres-es (production) and a file-backed SQLite
//! through sqlite-es (the embedded default).
//!
//! cqrs-es owns aggregates' streams (load, optimistic append). Our own
//! migrations add what it lacks: every stored event also gets an event id, a
//! recorded-at time and a global, commit-ordered, gap-free position, and
//! [`Store::read_log`] reads that log from any position. How the position is
//! made safe on each backend is in ARCHITECTURE.md ("The global log").

mod postgres;
mod sqlite;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::{EventStoreAggregateContext, PersistedEventStore};
use cqrs_es::{Aggregate, AggregateError, EventEnvelope, EventStore};
use postgres_es::PostgresEventRepository;
use serde_json::Value;
use sqlite_es::SqliteEventRepository;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::SqlitePool;
use uuid::Uuid;

/// How many events one [`Store::read_log`] call returns at most.
pub const MAX_LOG_BATCH: i64 = 10_000;

/// Which database holds the events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    Postgres { url: String, pool_size: u32 },
    Sqlite { data_dir: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("DATABASE_URL: {0}")]
    BadUrl(String),
    #[error("cannot open the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stored event at position {position} is unreadable: {message}")]
    Corrupt { position: i64, message: String },
    #[error("stored row is unreadable: {0}")]
    CorruptRow(String),
}

/// One entry of the global log: a stored event with its metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    pub position: i64,
    pub event_id: Uuid,
    pub recorded_at: DateTime<Utc>,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: Value,
    pub metadata: Value,
}

/// What a command did: the aggregate's state after it, and the events it
/// stored (none for a no-op such as an exact repeat).
#[derive(Debug)]
pub struct Executed<A: Aggregate> {
    pub aggregate: A,
    pub events: Vec<EventEnvelope<A>>,
}

/// The event store. Cheap to clone: it is a connection pool.
#[derive(Clone, Debug)]
pub enum Store {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$es` bound to a cqrs-es event store for aggregate `$A`
/// on whichever backend `$store` is.
/// `snapshots`: loads start from the latest snapshot (taken every
/// [`SNAPSHOT_EVERY`] events), so a busy aggregate — a hot product — stays
/// cheap to load as its history grows; `events`: the plain event store.
macro_rules! with_event_store {
    ($store:expr, $A:ty, snapshots, |$es:ident| $body:expr) => {
        match $store {
            Store::Postgres(pool) => {
                let $es = PersistedEventStore::<_, $A>::new_snapshot_store(
                    PostgresEventRepository::new(pool.clone()),
                    SNAPSHOT_EVERY,
                );
                $body
            }
            Store::Sqlite(pool) => {
                let $es = PersistedEventStore::<_, $A>::new_snapshot_store(
                    SqliteEventRepository::new(pool.clone()),
                    SNAPSHOT_EVERY,
                );
                $body
            }
        }
    };
    ($store:expr, $A:ty, events, |$es:ident| $body:expr) => {
        match $store {
            Store::Postgres(pool) => {
                let $es = PersistedEventStore::<_, $A>::new_event_store(
                    PostgresEventRepository::new(pool.clone()),
                );
                $body
            }
            Store::Sqlite(pool) => {
                let $es = PersistedEventStore::<_, $A>::new_event_store(
                    SqliteEventRepository::new(pool.clone()),
                );
                $body
            }
        }
    };
}

/// Events between two snapshots of an aggregate.
pub const SNAPSHOT_EVERY: usize = 100;

/// Runs `$body` with `$pool` bound to whichever pool `$store` holds: for
/// SQL written once for both dialects (SQLite accepts `$1`-style
/// parameters too).
macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match $store {
            Store::Postgres($pool) => $body,
            Store::Sqlite($pool) => $body,
        }
    };
}

impl Store {
    /// Connects to the configured database (creating the SQLite file and its
    /// directory if needed). Does not migrate: see [`Store::migrate`].
    pub async fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        match config {
            StoreConfig::Postgres { url, pool_size } => {
                let options: PgConnectOptions = url
                    .parse()
                    .map_err(|e: sqlx::Error| StoreError::BadUrl(e.to_string()))?;
                Self::connect_postgres(options, *pool_size).await
            }
            StoreConfig::Sqlite { data_dir } => sqlite::open(data_dir).await,
        }
    }

    pub async fn connect_postgres(
        options: PgConnectOptions,
        pool_size: u32,
    ) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(StoreError::Connect)?;
        Ok(Store::Postgres(pool))
    }

    /// Applies the backend's migrations from `migrations/` (embedded in the
    /// binary at build time).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Store::Postgres(pool) => sqlx::migrate!("./migrations/postgres").run(pool).await?,
            Store::Sqlite(pool) => sqlx::migrate!("./migrations/sqlite").run(pool).await?,
        }
        Ok(())
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgres",
            Store::Sqlite(_) => "sqlite",
        }
    }

    /// Answers when the database does.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(self, |pool| sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .map(drop))?;
        Ok(())
    }

    pub async fn close(&self) {
        on_pool!(self, |pool| pool.close().await)
    }

    /// Loads the aggregate, lets it handle the command and appends what it
    /// emitted, once. A concurrent writer to the same aggregate makes this
    /// fail with `AggregateError::AggregateConflict`; see
    /// [`Store::execute_retrying`].
    pub async fn execute<A: Aggregate + Clone>(
        &self,
        aggregate_id: &str,
        command: A::Command,
        services: &A::Services,
        metadata: HashMap<String, String>,
    ) -> Result<Executed<A>, AggregateError<A::Error>> {
        with_event_store!(self, A, snapshots, |es| {
            execute_on(&es, aggregate_id, command, services, metadata).await
        })
    }

    /// [`Store::execute`], reloading and trying again when another writer got
    /// to the aggregate first (at most `attempts` times).
    pub async fn execute_retrying<A: Aggregate + Clone>(
        &self,
        aggregate_id: &str,
        command: A::Command,
        services: &A::Services,
        metadata: HashMap<String, String>,
        attempts: u32,
    ) -> Result<Executed<A>, AggregateError<A::Error>>
    where
        A::Command: Clone,
    {
        let mut left = attempts.max(1);
        loop {
            left -= 1;
            match self
                .execute(aggregate_id, command.clone(), services, metadata.clone())
                .await
            {
                Err(AggregateError::AggregateConflict) if left > 0 => continue,
                other => return other,
            }
        }
    }

    /// Appends `events` as if the aggregate were at `expected_sequence`: the
    /// raw optimistic append, for writers that already hold the state.
    pub async fn append<A: Aggregate>(
        &self,
        aggregate_id: &str,
        expected_sequence: usize,
        events: Vec<A::Event>,
        metadata: HashMap<String, String>,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        let context = EventStoreAggregateContext {
            aggregate_id: aggregate_id.to_string(),
            aggregate: A::default(),
            current_sequence: expected_sequence,
            current_snapshot: None,
        };
        with_event_store!(self, A, events, |es| es
            .commit(events, context, metadata)
            .await)
    }

    /// The aggregate's current state and sequence; `None` if it has no
    /// events.
    pub async fn load<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<(A, usize)>, AggregateError<A::Error>> {
        let context = with_event_store!(self, A, snapshots, |es| es
            .load_aggregate(aggregate_id)
            .await)?;
        Ok((context.current_sequence > 0).then_some((context.aggregate, context.current_sequence)))
    }

    /// The aggregate's stored events, oldest first.
    pub async fn load_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        with_event_store!(self, A, events, |es| es.load_events(aggregate_id).await)
    }

    /// Gives every committed event a global position now, instead of at the
    /// next read. A no-op on SQLite, where the position is assigned at
    /// insert. Returns how many events were numbered.
    pub async fn sequence_pending(&self) -> Result<u64, StoreError> {
        match self {
            Store::Postgres(pool) => postgres::sequence(pool, MAX_LOG_BATCH).await,
            Store::Sqlite(_) => Ok(0),
        }
    }

    /// Up to `limit` log entries after `after`, in position order. Positions
    /// are dense and appear in order: a reader that checkpoints the last
    /// position it handled never skips an event.
    pub async fn read_log(&self, after: i64, limit: i64) -> Result<Vec<LogEntry>, StoreError> {
        let limit = limit.clamp(1, MAX_LOG_BATCH);
        match self {
            Store::Postgres(pool) => postgres::read_log(pool, after, limit).await,
            Store::Sqlite(pool) => sqlite::read_log(pool, after, limit).await,
        }
    }

    /// The log entries of the given aggregates with this id (e.g. an order
    /// and its stock reservation), in position order.
    pub async fn aggregate_log(
        &self,
        aggregate_types: &[&str],
        aggregate_id: &str,
    ) -> Result<Vec<LogEntry>, StoreError> {
        let mut entries = Vec::new();
        for aggregate_type in aggregate_types {
            entries.extend(match self {
                Store::Postgres(pool) => {
                    postgres::read_aggregate(pool, aggregate_type, aggregate_id).await?
                }
                Store::Sqlite(pool) => {
                    sqlite::read_aggregate(pool, aggregate_type, aggregate_id).await?
                }
            });
        }
        entries.sort_by_key(|e| e.position);
        Ok(entries)
    }

    /// The highest global position assigned so far.
    pub async fn head_position(&self) -> Result<i64, StoreError> {
        let head: Option<i64> = on_pool!(self, |pool| {
            sqlx::query_scalar("SELECT MAX(position) FROM events")
                .fetch_one(pool)
                .await
        })?;
        Ok(head.unwrap_or(0))
    }

    /// The last position the named reader recorded (0 if none).
    pub async fn load_checkpoint(&self, name: &str) -> Result<i64, StoreError> {
        let position: Option<i64> = on_pool!(self, |pool| {
            sqlx::query_scalar("SELECT position FROM checkpoints WHERE name = $1")
                .bind(name)
                .fetch_optional(pool)
                .await
        })?;
        Ok(position.unwrap_or(0))
    }

    /// Records how far the named reader has come.
    pub async fn save_checkpoint(&self, name: &str, position: i64) -> Result<(), StoreError> {
        on_pool!(self, |pool| {
            sqlx::query(include_str!("sql/save_checkpoint.sql"))
                .bind(name)
                .bind(position)
                .execute(pool)
                .await
                .map(|_| ())
        })?;
        Ok(())
    }

    /// Ids of every aggregate of a type that has events, sorted.
    pub async fn aggregate_ids(&self, aggregate_type: &str) -> Result<Vec<String>, StoreError> {
        let ids = on_pool!(self, |pool| {
            sqlx::query_scalar(
                "SELECT DISTINCT aggregate_id FROM events WHERE aggregate_type = $1 ORDER BY 1",
            )
            .bind(aggregate_type)
            .fetch_all(pool)
            .await
        })?;
        Ok(ids)
    }

    /// Binds `key` to `order_id` unless it is bound already; returns the
    /// binding that holds (`order_id`, `fingerprint`).
    pub async fn claim_idempotency_key(
        &self,
        key: &str,
        order_id: &str,
        fingerprint: &str,
    ) -> Result<(String, String), StoreError> {
        let claimed = on_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO idempotency_keys (key, order_id, fingerprint) VALUES ($1, $2, $3) \
                 ON CONFLICT (key) DO NOTHING",
            )
            .bind(key)
            .bind(order_id)
            .bind(fingerprint)
            .execute(pool)
            .await?;
            sqlx::query_as("SELECT order_id, fingerprint FROM idempotency_keys WHERE key = $1")
                .bind(key)
                .fetch_one(pool)
                .await
        })?;
        Ok(claimed)
    }

    /// Forgets a key that created nothing (its request was refused).
    pub async fn release_idempotency_key(
        &self,
        key: &str,
        order_id: &str,
    ) -> Result<(), StoreError> {
        on_pool!(self, |pool| {
            sqlx::query("DELETE FROM idempotency_keys WHERE key = $1 AND order_id = $2")
                .bind(key)
                .bind(order_id)
                .execute(pool)
                .await
                .map(|_| ())
        })?;
        Ok(())
    }
}

async fn execute_on<A, ES>(
    store: &ES,
    aggregate_id: &str,
    command: A::Command,
    services: &A::Services,
    metadata: HashMap<String, String>,
) -> Result<Executed<A>, AggregateError<A::Error>>
where
    A: Aggregate + Clone,
    ES: EventStore<A, AC = EventStoreAggregateContext<A>>,
{
    let context = store.load_aggregate(aggregate_id).await?;
    // The command runs on a copy: the sink applies its events there, and
    // the store gets the context as loaded, so a snapshot taken in this
    // commit applies each event exactly once.
    let mut aggregate = context.aggregate.clone();
    let sink = EventSink::default();
    aggregate
        .handle(command, services, &sink)
        .await
        .map_err(AggregateError::UserError)?;
    let events = sink.collect().await;
    let events = if events.is_empty() {
        Vec::new()
    } else {
        store.commit(events, context, metadata).await?
    };
    Ok(Executed { aggregate, events })
}

fn corrupt(position: i64, message: impl ToString) -> StoreError {
    StoreError::Corrupt {
        position,
        message: message.to_string(),
    }
}
