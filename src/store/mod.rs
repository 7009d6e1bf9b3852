//! The event store and its global log, over two backends behind one seam:
//! PostgreSQL through postgres-es (production) and a file-backed SQLite
//! through sqlite-es (the embedded default).
//!
//! cqrs-es owns aggregates' streams (load, optimistic append). Our own
//! migrations add what it lacks: every stored event also gets an event id, a
//! recorded-at time and a global, commit-ordered, gap-free position, and
//! [`Store::read_log`] reads that log from any position. How the position is
//! made safe on each backend is in ARCHITECTURE.md ("The global log").

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::SqlitePool;
use tokio::sync::watch;

/// Runs `$body` with `$es` bound to a cqrs-es event store for aggregate `$A`
/// on whichever backend `$store` is, over the pool that `read`s or
/// `write`s (the same one on PostgreSQL).
/// `snapshots`: loads start from the latest snapshot (taken every
/// [`SNAPSHOT_EVERY`] events), so a busy aggregate — a hot product — stays
/// cheap to load as its history grows; `events`: the plain event store.
macro_rules! with_event_store {
    ($store:expr, $A:ty, $mode:ident, $access:ident, |$es:ident| $body:expr) => {
        match $store {
            Store::Postgres(db) => {
                let $es = with_event_store!(@new $mode, $A, lean::Lean::postgres(&db.pool, &db.batched));
                $body
            }
            Store::Sqlite(db) => {
                let $es = with_event_store!(@new $mode, $A, lean::Lean::sqlite(&db.$access, &db.commits));
                $body
            }
        }
    };
    (@new snapshots, $A:ty, $repo:expr) => {
        PersistedEventStore::<_, $A>::new_snapshot_store($repo, SNAPSHOT_EVERY)
    };
    (@new events, $A:ty, $repo:expr) => {
        PersistedEventStore::<_, $A>::new_event_store($repo)
    };
}

/// Runs `$body` with `$pool` bound to whichever pool `$store` holds: for
/// SQL written once for both dialects (SQLite accepts `$1`-style
/// parameters too). On SQLite this is the writing connection: use
/// [`on_read_pool!`] for queries that only read.
macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        on_pool!(@ $store, write, |$pool| $body)
    };
    (@ $store:expr, $sqlite:ident, |$pool:ident| $body:expr) => {
        match $store {
            Store::Postgres(db) => {
                let $pool = &*db.statements;
                $body
            }
            Store::Sqlite(db) => {
                let $pool = &db.$sqlite;
                $body
            }
        }
    };
}

/// One write statement, for SQL written once for both dialects, with its
/// arguments (owned: on SQLite they travel to the writer task): on
/// PostgreSQL through the pool, on SQLite in the writer's group commit
/// (`group.rs`: it shares a commit with the writes waiting beside it).
/// `write_statement!(@sqlite db, …)` is the SQLite half alone, for a write
/// that PostgreSQL makes another way.
macro_rules! write_statement {
    ($store:expr, $sql:expr, [$($value:expr),* $(,)?]) => {
        match $store {
            Store::Postgres(db) => sqlx::query(&$sql)
                $(.bind($value))*
                .execute(&*db.statements)
                .await
                .map(|_| ()),
            Store::Sqlite(db) => write_statement!(@sqlite db, $sql, [$($value),*]),
        }
    };
    (@sqlite $db:expr, $sql:expr, [$($value:expr),* $(,)?]) => {{
        let params = vec![$($crate::store::sql::Param::from($value)),*];
        $db.execute(vec![(String::from($sql), params)], false).await
    }};
}

/// [`on_pool!`] for statements that only read: on SQLite they go to the
/// read-only connections, beside the writer.
macro_rules! on_read_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        on_pool!(@ $store, read, |$pool| $body)
    };
}

mod aggregates;
mod batch;
mod cache;
mod dead_letters;
mod group;
mod idempotency;
mod inline;
mod lean;
mod leases;
mod log;
mod notifications;
mod postgres;
pub mod read_models;
mod sql;
mod sqlite;
mod statements;
mod tail;
mod timers;

pub use aggregates::Executed;
pub use dead_letters::{DeadLetter, DeadLetterStatus};
pub use leases::{LeaderSession, SESSION_IDLE_TIMEOUT};
pub use log::{AppendWatch, LogEntry};
pub use notifications::{AttemptRow, Claim, NotificationAttempt, CLAIM_LEASE_MS};
pub use sqlite::{lock_data_dir, DataDirLock};
use statements::Statements;
pub use timers::{Timer, TimerKind};

use cache::{AggregateCache, KeyedLocks};
use log::Appends;
use log::SEQUENCE_AT_LEAST_EVERY;
use sql::corrupt;
use sql::Param;

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
    #[error(
        "DATA_DIR (--data-dir) {path}: in use by another order-saga process{holder}; \
         the embedded store serves one process (run several instances on PostgreSQL: DATABASE_URL)"
    )]
    DataDirInUse { path: PathBuf, holder: String },
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stored event at position {position} is unreadable: {message}")]
    Corrupt { position: i64, message: String },
    #[error("stored row is unreadable: {0}")]
    CorruptRow(String),
    /// A statement run for a batch of callers failed (`batch.rs`): every
    /// caller in the batch gets its error, as text.
    #[error("database error: {0}")]
    Batched(String),
}

/// The event store. Cheap to clone: pools and shared state behind `Arc`s.
#[derive(Clone, Debug)]
pub enum Store {
    Postgres(Pg),
    Sqlite(Lite),
}

/// PostgreSQL: single statements on connections of their own (no ping
/// after each, `statements.rs`); transactions, migrations and the event
/// libraries' queries on sqlx's pool.
#[derive(Clone, Debug)]
pub struct Pg {
    pub pool: PgPool,
    pub statements: Arc<Statements>,
    shared: Arc<Shared>,
    batched: Arc<postgres::Batched>,
}

impl Pg {
    /// Attempts made so far for one event's notification, and how many of
    /// them delivered it (a batched statement: `batch.rs`).
    pub async fn notification_progress(&self, event_id: &str) -> Result<(i64, i64), StoreError> {
        self.batched
            .notification_progress
            .run(event_id.to_string())
            .await
    }

    /// Claims one notification attempt (a batched statement: `batch.rs`).
    pub async fn claim_notification(&self, row: AttemptRow) -> Result<bool, StoreError> {
        self.batched.notification_claims.run(row).await
    }

    /// Runs one scheduling write (a batched statement: `batch.rs`): its
    /// own statement's outcome.
    async fn schedule_timers(
        &self,
        write: timers::TimerWrite,
    ) -> Result<Result<(), sqlx::Error>, StoreError> {
        self.batched.timer_writes.run(write).await
    }

    /// Records one notification attempt (a batched statement: `batch.rs`);
    /// an attempt already recorded stays as it is.
    pub async fn record_notification_attempt(&self, row: AttemptRow) -> Result<(), StoreError> {
        self.batched.notification_attempts.run(row).await
    }

    /// Runs `work`, telling it whether to run the sequencer first: not if a
    /// run from this process started after its last append and less than
    /// [`SEQUENCE_AT_LEAST_EVERY`] ago. Runs are one at a time per process,
    /// so readers woken by one append share one. `work` answers with how
    /// many events it numbered; a run that numbered a full batch (more may
    /// be waiting) or failed is not counted, so the next reader runs again.
    async fn sequencing<T, W, F>(&self, work: W) -> Result<T, StoreError>
    where
        W: FnOnce(bool) -> F,
        F: std::future::Future<Output = Result<(T, u64), StoreError>>,
    {
        let mut last = self.shared.sequenced.lock().await;
        let appends = self.shared.appended.borrow().total;
        if last.0 == appends && last.1.elapsed() < SEQUENCE_AT_LEAST_EVERY {
            drop(last);
            return work(false).await.map(|(done, _)| done);
        }
        *last = (appends, std::time::Instant::now());
        let result = work(true).await;
        if !matches!(&result, Ok((_, numbered)) if *numbered < MAX_LOG_BATCH as u64) {
            last.0 = appends.wrapping_sub(1);
        }
        result.map(|(done, _)| done)
    }
}

/// SQLite: one writer at a time — the group writer's connection, which
/// holds sqlx's one writing connection while it writes (SQLite has a single
/// writer; queuing for it in-process is far cheaper than SQLite's sleeping
/// busy handler) — and read-only connections beside it (WAL: readers never
/// wait): sqlx's pool for the longer reads, rusqlite's for the hot ones.
#[derive(Clone, Debug)]
pub struct Lite {
    pub write: SqlitePool,
    pub read: SqlitePool,
    /// Event appends, the saga's bookkeeping and the read models' batches,
    /// committed in groups by the writer task on a rusqlite connection of
    /// its own, while it holds `write` (`group.rs`).
    commits: group::GroupCommit,
    /// The hot reads, run in place (`inline.rs`).
    readers: Arc<inline::Readers>,
    shared: Arc<Shared>,
}

impl Lite {
    /// One write — its statements, all or none; with `guarded`, only if
    /// the first changes a row (else `RowNotFound`) — in the writer's group
    /// commit; see [`write_statement!`].
    pub async fn execute(
        &self,
        statements: Vec<(String, Vec<Param>)>,
        guarded: bool,
    ) -> Result<(), sqlx::Error> {
        self.commits.execute(statements, guarded).await
    }

    /// Attempts at one event's notification and how many delivered it, by
    /// `sql` (one row of two counts), read in place (`inline.rs`).
    pub fn notification_progress(
        &self,
        sql: &str,
        event_id: &str,
    ) -> Result<(i64, i64), StoreError> {
        sqlite::notification_progress(&self.readers, sql, event_id)
    }
}

/// What every clone of one store shares in this process.
#[derive(Debug)]
struct Shared {
    /// Bumped after every append, so log readers wake at once instead of
    /// at their next poll.
    appended: watch::Sender<Appends>,
    cache: AggregateCache,
    /// One command at a time per aggregate in this process: contending
    /// writers queue here instead of failing their append and retrying.
    writers: KeyedLocks,
    /// PostgreSQL: the value of `appended` when the sequencer last ran
    /// from this process, and when.
    sequenced: tokio::sync::Mutex<(u64, std::time::Instant)>,
    /// The newest stretch of the log, shared by this process's readers.
    tail: tail::LogTail,
}

impl Shared {
    fn new() -> Arc<Self> {
        Arc::new(Shared {
            appended: watch::Sender::new(Appends::default()),
            cache: AggregateCache::default(),
            writers: KeyedLocks::default(),
            sequenced: tokio::sync::Mutex::new((0, std::time::Instant::now())),
            tail: tail::LogTail::default(),
        })
    }
}

/// PostgreSQL: makes the current transaction commit without waiting for
/// its WAL to reach the disk. Only for writes whose loss in a database
/// crash is harmless — checkpoints (messages are delivered again), timer
/// bookkeeping (a timer that fires again finds nothing to do), read models
/// (rebuilt from the log with their checkpoint) and global-log numbering.
/// The last is safe because the WAL is replayed as a prefix: anything
/// durable that was done after reading a position (a command, a
/// checkpoint) was flushed together with the numbering before it.
pub const RELAXED: &str = "SELECT set_config('synchronous_commit', 'off', true)";

/// Events between two snapshots of an aggregate. Only products get this
/// many; a product's snapshot holds every order holding stock on it, so a
/// snapshot costs more as orders accumulate, and commands find a product in
/// the aggregate cache anyway: the snapshot is for a cold load (a restart),
/// which then replays at most this many events — a few milliseconds.
pub const SNAPSHOT_EVERY: usize = 1000;

/// Aggregate types whose streams stay far below [`SNAPSHOT_EVERY`] events
/// (an order has at most four, its stock reservation three): they never
/// have a snapshot, so a load need not ask for one.
const SHORT_STREAMS: &[&str] = &["Order", "StockReservation"];

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
        // A quarter of the connections (at least 2) for transactions and
        // the libraries' queries, the rest (at least 2) for single
        // statements, which are most of the traffic.
        let libraries = (pool_size / 4).max(2);
        let pool = PgPoolOptions::new()
            .max_connections(libraries)
            .acquire_timeout(Duration::from_secs(10))
            // A broken connection fails its statement, which is retried;
            // pinging before every use would double the round trips.
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await
            .map_err(StoreError::Connect)?;
        let statements = Arc::new(Statements::new(
            options,
            pool_size.saturating_sub(libraries).max(2),
        ));
        Ok(Store::Postgres(Pg {
            pool,
            batched: Arc::new(postgres::Batched::spawn(&statements)),
            statements,
            shared: Shared::new(),
        }))
    }

    /// Applies the backend's migrations from `migrations/` (embedded in the
    /// binary at build time).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Store::Postgres(db) => {
                sqlx::migrate!("./migrations/postgres")
                    .run(&db.pool)
                    .await?
            }
            Store::Sqlite(db) => sqlx::migrate!("./migrations/sqlite").run(&db.write).await?,
        }
        Ok(())
    }

    /// Whether this store can serve one process only (the embedded store:
    /// its data directory is locked by the process serving it), so every
    /// single-instance role is that process's without an election.
    pub fn is_single_node(&self) -> bool {
        matches!(self, Store::Sqlite(_))
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
        match self {
            Store::Postgres(db) => {
                db.statements.close().await;
                db.pool.close().await;
            }
            Store::Sqlite(db) => {
                db.read.close().await;
                db.write.close().await;
            }
        }
    }

    fn shared(&self) -> &Shared {
        match self {
            Store::Postgres(db) => &db.shared,
            Store::Sqlite(db) => &db.shared,
        }
    }
}
