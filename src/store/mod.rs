//! The event store and its global log, over two backends behind one seam:
//! PostgreSQL through postgres-es (production) and a file-backed SQLite
//! through sqlite-es (the embedded default).
//!
//! cqrs-es owns aggregates' streams (load, optimistic append). Our own
//! migrations add what it lacks: every stored event also gets an event id, a
//! recorded-at time and a global, commit-ordered, gap-free position, and
//! [`Store::read_log`] reads that log from any position. How the position is
//! made safe on each backend is in ARCHITECTURE.md ("The global log").

mod batch;
mod group;
mod inline;
mod lean;
mod postgres;
mod sqlite;
mod statements;
mod tail;

pub use group::Param;

use std::any::Any;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::{EventStoreAggregateContext, PersistedEventRepository, PersistedEventStore};
use cqrs_es::{Aggregate, AggregateError, EventEnvelope, EventStore};
pub use postgres::AttemptRow;
use postgres_es::PostgresEventRepository;
use serde_json::Value;
use sqlite_es::SqliteEventRepository;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::SqlitePool;
pub use statements::Statements;
use tokio::sync::watch;
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
    /// A statement run for a batch of callers failed (`batch.rs`): every
    /// caller in the batch gets its error, as text.
    #[error("database error: {0}")]
    Batched(String),
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

/// What this process has appended, counted in all and per aggregate type.
#[derive(Debug, Clone, Default)]
pub struct Appends {
    total: u64,
    by_type: Vec<(&'static str, u64)>,
}

impl Appends {
    fn count(&mut self, aggregate_type: &'static str) {
        self.total = self.total.wrapping_add(1);
        match self.by_type.iter_mut().find(|(t, _)| *t == aggregate_type) {
            Some((_, n)) => *n = n.wrapping_add(1),
            None => self.by_type.push((aggregate_type, 1)),
        }
    }

    /// Appends of these types (`[]`: of any type).
    fn of(&self, interest: &[&str]) -> u64 {
        if interest.is_empty() {
            return self.total;
        }
        self.by_type
            .iter()
            .filter(|(t, _)| interest.contains(t))
            .fold(0, |sum, (_, n)| sum.wrapping_add(*n))
    }
}

/// A log reader's wake-up: [`AppendWatch::mark`] before looking for work,
/// then [`AppendWatch::changed`] resolves once this process has appended
/// an event of interest since the mark.
pub struct AppendWatch {
    receiver: watch::Receiver<Appends>,
    interest: &'static [&'static str],
    seen: u64,
}

impl AppendWatch {
    pub fn mark(&mut self) {
        self.seen = self.receiver.borrow_and_update().of(self.interest);
    }

    /// Errs only when the store is gone.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        let (seen, interest) = (self.seen, self.interest);
        self.receiver
            .wait_for(|a| a.of(interest) != seen)
            .await
            .map(|_| ())
    }
}

/// A reader runs the sequencer at least this often even when this process
/// appended nothing: other processes may have.
const SEQUENCE_AT_LEAST_EVERY: Duration = Duration::from_millis(100);

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
        let params = vec![$($crate::store::Param::from($value)),*];
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

    /// Wakes on every append through this store in this process: a log
    /// reader that found nothing waits for this, or for its poll interval —
    /// appends by other processes are seen by polling only.
    pub fn appends(&self) -> AppendWatch {
        self.appends_of(&[])
    }

    /// [`Store::appends`] for a reader with work only in some aggregate
    /// types' events (`[]`: all of them): appends of other types do not wake
    /// it, and cost it no read.
    pub fn appends_of(&self, interest: &'static [&'static str]) -> AppendWatch {
        AppendWatch {
            receiver: self.shared().appended.subscribe(),
            interest,
            seen: 0,
        }
    }

    fn appended(&self, aggregate_type: &'static str) {
        self.shared()
            .appended
            .send_modify(|a| a.count(aggregate_type));
    }

    /// Loads the aggregate, lets it handle the command and appends what it
    /// emitted, once. A concurrent writer to the same aggregate makes this
    /// fail with `AggregateError::AggregateConflict`; see
    /// [`Store::execute_retrying`].
    pub async fn execute<A: Aggregate + Clone + 'static>(
        &self,
        aggregate_id: &str,
        command: A::Command,
        services: &A::Services,
        metadata: HashMap<String, String>,
    ) -> Result<Executed<A>, AggregateError<A::Error>>
    where
        A::Command: Clone,
    {
        let _turn = self.shared().writers.lock(A::TYPE, aggregate_id).await;
        // A remembered state is tried as it is, without asking for newer
        // events first: if another process appended meanwhile, this append
        // takes a sequence that is taken and fails (AggregateConflict: the
        // entry is forgotten and the caller tries again on a fresh load). A
        // command that appends nothing — a repeat, a refusal — has no such
        // check, so that outcome counts only if no newer events exist.
        let cache = &self.shared().cache;
        if let (Some(cached), Some(before)) =
            (cache.get::<A>(aggregate_id), cache.get::<A>(aggregate_id))
        {
            let sequence = before.current_sequence;
            let tried = self
                .execute_loaded(
                    aggregate_id,
                    cached,
                    command.clone(),
                    services,
                    metadata.clone(),
                )
                .await;
            let appended = matches!(&tried, Ok(done) if !done.events.is_empty());
            if appended || matches!(tried, Err(AggregateError::AggregateConflict)) {
                return tried;
            }
            match self.catch_up(aggregate_id, before).await {
                Ok(context) if context.current_sequence == sequence => {
                    if tried.is_err() {
                        cache.put(aggregate_id, context);
                    }
                    return tried;
                }
                Ok(context) => {
                    return self
                        .execute_loaded(aggregate_id, context, command, services, metadata)
                        .await
                }
                Err(e) => {
                    self.shared().cache.forget::<A>(aggregate_id);
                    return Err(e);
                }
            }
        }
        match self.load_context::<A>(aggregate_id).await {
            Ok(context) => {
                self.execute_loaded(aggregate_id, context, command, services, metadata)
                    .await
            }
            Err(e) => {
                self.shared().cache.forget::<A>(aggregate_id);
                Err(e)
            }
        }
    }

    /// [`Store::execute`] for an aggregate id that cannot have been used
    /// yet (a UUID made just now): the command runs on the empty state
    /// without a load. Were the id taken after all, the append would find
    /// its first sequence taken and fail with `AggregateConflict`.
    pub async fn execute_new<A: Aggregate + Clone + 'static>(
        &self,
        aggregate_id: &str,
        command: A::Command,
        services: &A::Services,
        metadata: HashMap<String, String>,
    ) -> Result<Executed<A>, AggregateError<A::Error>> {
        let _turn = self.shared().writers.lock(A::TYPE, aggregate_id).await;
        let empty = EventStoreAggregateContext {
            aggregate_id: aggregate_id.to_string(),
            aggregate: A::default(),
            current_sequence: 0,
            current_snapshot: None,
        };
        self.execute_loaded(aggregate_id, empty, command, services, metadata)
            .await
    }

    /// Runs the command on `context` and appends what it emitted; caches
    /// the state after it, or forgets the entry on failure. The caller holds
    /// the aggregate's turn.
    async fn execute_loaded<A: Aggregate + Clone + 'static>(
        &self,
        aggregate_id: &str,
        context: EventStoreAggregateContext<A>,
        command: A::Command,
        services: &A::Services,
        metadata: HashMap<String, String>,
    ) -> Result<Executed<A>, AggregateError<A::Error>> {
        let result = with_event_store!(self, A, snapshots, write, |es| {
            execute_on(&es, context, command, services, metadata).await
        });
        match result {
            Ok((done, after)) => {
                if !done.events.is_empty() {
                    self.appended(A::TYPE);
                }
                self.shared().cache.put(aggregate_id, after);
                Ok(done)
            }
            Err(e) => {
                self.shared().cache.forget::<A>(aggregate_id);
                Err(e)
            }
        }
    }

    /// The aggregate's state from the database. An order's or a
    /// reservation's stream stays a few events long and is never
    /// snapshotted (a snapshot comes every [`SNAPSHOT_EVERY`] events): its
    /// events are read in one statement, without asking for a snapshot
    /// first.
    async fn load_context<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<EventStoreAggregateContext<A>, AggregateError<A::Error>> {
        if SHORT_STREAMS.contains(&A::TYPE) {
            with_event_store!(self, A, events, read, |es| es
                .load_aggregate(aggregate_id)
                .await)
        } else {
            with_event_store!(self, A, snapshots, read, |es| es
                .load_aggregate(aggregate_id)
                .await)
        }
    }

    /// A remembered state brought up to date: only the events stored after
    /// it are read.
    async fn catch_up<A: Aggregate>(
        &self,
        aggregate_id: &str,
        mut context: EventStoreAggregateContext<A>,
    ) -> Result<EventStoreAggregateContext<A>, AggregateError<A::Error>> {
        let newer = match self {
            Store::Postgres(db) => {
                PostgresEventRepository::new(db.pool.clone())
                    .get_last_events::<A>(aggregate_id, context.current_sequence)
                    .await?
            }
            Store::Sqlite(db) => {
                SqliteEventRepository::new(db.read.clone())
                    .get_last_events::<A>(aggregate_id, context.current_sequence)
                    .await?
            }
        };
        for serialized in newer {
            let envelope = EventEnvelope::<A>::try_from(serialized)?;
            context.current_sequence = envelope.sequence;
            context.aggregate.apply(envelope.payload);
        }
        Ok(context)
    }

    /// [`Store::execute`], reloading and trying again when another writer got
    /// to the aggregate first (at most `attempts` times).
    pub async fn execute_retrying<A: Aggregate + Clone + 'static>(
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
        let stored = with_event_store!(self, A, events, write, |es| es
            .commit(events, context, metadata)
            .await);
        self.shared().cache.forget::<A>(aggregate_id);
        if matches!(&stored, Ok(events) if !events.is_empty()) {
            self.appended(A::TYPE);
        }
        stored
    }

    /// The aggregate's current state and sequence; `None` if it has no
    /// events.
    pub async fn load<A: Aggregate + Clone + 'static>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<(A, usize)>, AggregateError<A::Error>> {
        let context = match self.shared().cache.get::<A>(aggregate_id) {
            Some(cached) => self.catch_up(aggregate_id, cached).await?,
            None => self.load_context::<A>(aggregate_id).await?,
        };
        // Only commands (one at a time per aggregate) write the cache: a
        // load racing a command could put back an older snapshot number.
        Ok((context.current_sequence > 0).then_some((context.aggregate, context.current_sequence)))
    }

    /// [`Store::load`] of several aggregates of one type, in order: the
    /// ones this process remembers are brought up to date by one read for
    /// all of them (the others load one by one).
    pub async fn load_many<A: Aggregate + Clone + 'static>(
        &self,
        aggregate_ids: &[String],
    ) -> Result<Vec<Option<(A, usize)>>, AggregateError<A::Error>> {
        let cache = &self.shared().cache;
        let mut contexts: Vec<Option<EventStoreAggregateContext<A>>> =
            aggregate_ids.iter().map(|id| cache.get::<A>(id)).collect();
        let remembered: Vec<(&str, usize)> = aggregate_ids
            .iter()
            .zip(&contexts)
            .filter_map(|(id, c)| c.as_ref().map(|c| (id.as_str(), c.current_sequence)))
            .collect();
        if !remembered.is_empty() {
            for serialized in self.newer_events(A::TYPE, &remembered).await? {
                let Some(context) = aggregate_ids
                    .iter()
                    .position(|id| *id == serialized.aggregate_id)
                    .and_then(|i| contexts[i].as_mut())
                else {
                    continue;
                };
                let envelope = EventEnvelope::<A>::try_from(serialized)?;
                context.current_sequence = envelope.sequence;
                context.aggregate.apply(envelope.payload);
            }
        }
        let mut loaded = Vec::with_capacity(aggregate_ids.len());
        for (id, context) in aggregate_ids.iter().zip(contexts) {
            loaded.push(match context {
                Some(c) => (c.current_sequence > 0).then_some((c.aggregate, c.current_sequence)),
                None => self.load::<A>(id).await?,
            });
        }
        Ok(loaded)
    }

    /// The events of the given aggregates stored after the given
    /// sequences, oldest first per aggregate: one statement.
    async fn newer_events<E: std::error::Error>(
        &self,
        aggregate_type: &str,
        after: &[(&str, usize)],
    ) -> Result<Vec<cqrs_es::persist::SerializedEvent>, AggregateError<E>> {
        // One SELECT per aggregate, each a range of the primary key (an OR
        // of the conditions can make SQLite scan the type's every event).
        let selects: Vec<String> = (0..after.len())
            .map(|i| {
                format!(
                    "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, \
                     payload, metadata FROM events \
                     WHERE aggregate_type = $1 AND aggregate_id = ${} AND sequence > ${}",
                    i * 2 + 2,
                    i * 2 + 3
                )
            })
            .collect();
        let sql = format!(
            "{} ORDER BY aggregate_id, sequence",
            selects.join(" UNION ALL ")
        );
        macro_rules! newer {
            ($pool:expr) => {{
                let mut query = sqlx::query(&sql).bind(aggregate_type);
                for (id, sequence) in after {
                    query = query
                        .bind(*id)
                        .bind(i64::try_from(*sequence).unwrap_or(i64::MAX));
                }
                let rows = query
                    .fetch_all($pool)
                    .await
                    .map_err(|e| AggregateError::DatabaseConnectionError(Box::new(e)))?;
                rows.iter()
                    .map(serialized_event)
                    .collect::<Result<Vec<_>, sqlx::Error>>()
            }};
        }
        let events = match self {
            Store::Postgres(db) => newer!(&*db.statements),
            Store::Sqlite(db) => {
                return sqlite::newer_events(&db.readers, &sql, aggregate_type, after).map_err(
                    |e| match e {
                        StoreError::CorruptRow(_) => {
                            AggregateError::DeserializationError(Box::new(e))
                        }
                        e => AggregateError::DatabaseConnectionError(Box::new(e)),
                    },
                );
            }
        };
        events.map_err(|e| AggregateError::DeserializationError(Box::new(e)))
    }

    /// The aggregate's stored events, oldest first.
    pub async fn load_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        with_event_store!(self, A, events, read, |es| es
            .load_events(aggregate_id)
            .await)
    }

    /// Gives every committed event a global position now, instead of at the
    /// next read. A no-op on SQLite, where the position is assigned at
    /// insert. Returns how many events were numbered.
    pub async fn sequence_pending(&self) -> Result<u64, StoreError> {
        match self {
            Store::Postgres(db) => postgres::sequence(&db.statements, MAX_LOG_BATCH).await,
            Store::Sqlite(_) => Ok(0),
        }
    }

    /// Before a read of aggregates' log entries on PostgreSQL: runs the
    /// sequencer if due ([`Pg::sequencing`]; a read of the global log runs
    /// it in its own statement instead).
    async fn sequence_for_reading(&self) -> Result<(), StoreError> {
        let Store::Postgres(db) = self else {
            return Ok(());
        };
        db.sequencing(|due| async move {
            match due {
                true => postgres::sequence(&db.statements, MAX_LOG_BATCH)
                    .await
                    .map(|n| ((), n)),
                false => Ok(((), 0)),
            }
        })
        .await
    }

    /// Up to `limit` log entries after `after`, in position order. Positions
    /// are dense and appear in order: a reader that checkpoints the last
    /// position it handled never skips an event.
    ///
    /// Readers near the end of the log share one database read per new
    /// stretch (the log tail, `src/store/tail.rs`); the answer is the same
    /// as a direct read's.
    pub async fn read_log(&self, after: i64, limit: i64) -> Result<Vec<LogEntry>, StoreError> {
        let limit = limit.clamp(1, MAX_LOG_BATCH);
        let tail = &self.shared().tail;
        let wanted = usize::try_from(limit).unwrap_or(usize::MAX);
        match tail.lookup(after, wanted) {
            tail::Lookup::Served(entries) => Ok(entries),
            tail::Lookup::AtHead { head, generation } => {
                let _refreshing = tail.refresh.lock().await;
                match tail.after_wait(generation, after, wanted) {
                    tail::AfterWait::Served(entries) => Ok(entries),
                    tail::AfterWait::Refresh => {
                        let mut read = self
                            .read_log_directly(head, tail::TAIL_REFRESH.max(limit))
                            .await?;
                        tail.extend(head, &read);
                        read.truncate(wanted);
                        Ok(read)
                    }
                    tail::AfterWait::Outside => self.read_log_directly(after, limit).await,
                }
            }
            tail::Lookup::Outside { generation } => {
                let read = self.read_log_directly(after, limit).await?;
                if read.len() < wanted {
                    tail.seed(generation, after, &read);
                }
                Ok(read)
            }
        }
    }

    /// [`Store::read_log`] from the database. On PostgreSQL the sequencer
    /// runs in the same statement unless it ran since this process last
    /// appended and not long ago (see [`Pg::sequencing`]).
    async fn read_log_directly(&self, after: i64, limit: i64) -> Result<Vec<LogEntry>, StoreError> {
        let db = match self {
            Store::Postgres(db) => db,
            Store::Sqlite(db) => return sqlite::read_log(&db.readers, after, limit),
        };
        db.sequencing(|due| {
            postgres::read_log(&db.statements, after, limit, due.then_some(MAX_LOG_BATCH))
        })
        .await
    }

    /// The log entries of the given aggregates with this id (e.g. an order
    /// and its stock reservation), in position order.
    pub async fn aggregate_log(
        &self,
        aggregate_types: &[&str],
        aggregate_id: &str,
    ) -> Result<Vec<LogEntry>, StoreError> {
        self.sequence_for_reading().await?;
        let mut entries = Vec::new();
        for aggregate_type in aggregate_types {
            entries.extend(match self {
                Store::Postgres(db) => {
                    postgres::read_aggregate(&db.statements, aggregate_type, aggregate_id).await?
                }
                Store::Sqlite(db) => {
                    sqlite::read_aggregate(&db.readers, aggregate_type, aggregate_id)?
                }
            });
        }
        entries.sort_by_key(|e| e.position);
        Ok(entries)
    }

    /// The highest global position assigned so far.
    pub async fn head_position(&self) -> Result<i64, StoreError> {
        let head: Option<i64> = on_read_pool!(self, |pool| {
            sqlx::query_scalar("SELECT MAX(position) FROM events")
                .fetch_one(pool)
                .await
        })?;
        Ok(head.unwrap_or(0))
    }

    /// The last position the named reader recorded (0 if none).
    pub async fn load_checkpoint(&self, name: &str) -> Result<i64, StoreError> {
        let position: Option<i64> = on_read_pool!(self, |pool| {
            sqlx::query_scalar("SELECT position FROM checkpoints WHERE name = $1")
                .bind(name)
                .fetch_optional(pool)
                .await
        })?;
        Ok(position.unwrap_or(0))
    }

    /// Records how far the named reader has come. On PostgreSQL without
    /// waiting for the flush to disk (see [`RELAXED`]): a checkpoint lost
    /// to a database crash only means messages delivered again.
    pub async fn save_checkpoint(&self, name: &str, position: i64) -> Result<(), StoreError> {
        let sql = match self {
            Store::Postgres(_) => include_str!("sql/pg_save_checkpoint.sql"),
            Store::Sqlite(_) => include_str!("sql/save_checkpoint.sql"),
        };
        write_statement!(self, sql, [name.to_string(), position])?;
        Ok(())
    }

    /// Units `order_id` holds on the product, by the product's stored
    /// events (the Product aggregate keeps only totals): the quantity of its
    /// last `StockHeld` there, unless a `StockReturned` came after it.
    pub async fn held_for_order(
        &self,
        product_id: &str,
        order_id: &str,
    ) -> Result<Option<u32>, StoreError> {
        let quantity: Option<i64> = match self {
            Store::Postgres(db) => {
                db.batched
                    .holds
                    .run((product_id.to_string(), order_id.to_string()))
                    .await?
            }
            Store::Sqlite(db) => {
                sqlite::held_for_order(&db.readers, product_id, order_id)?.flatten()
            }
        };
        quantity
            .map(|q| {
                u32::try_from(q).map_err(|_| {
                    StoreError::CorruptRow(format!(
                        "product {product_id}: order {order_id} holds {q} units"
                    ))
                })
            })
            .transpose()
    }

    /// Ids of every aggregate of a type that has events, sorted.
    pub async fn aggregate_ids(&self, aggregate_type: &str) -> Result<Vec<String>, StoreError> {
        let ids = on_read_pool!(self, |pool| {
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

/// Handles `command` on the loaded `context` and commits what it emitted;
/// returns what it did and the aggregate's context after it.
async fn execute_on<A, ES>(
    store: &ES,
    context: EventStoreAggregateContext<A>,
    command: A::Command,
    services: &A::Services,
    metadata: HashMap<String, String>,
) -> Result<(Executed<A>, EventStoreAggregateContext<A>), AggregateError<A::Error>>
where
    A: Aggregate + Clone,
    ES: EventStore<A, AC = EventStoreAggregateContext<A>>,
{
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
    let (id, sequence, snapshot) = (
        context.aggregate_id.clone(),
        context.current_sequence,
        context.current_snapshot,
    );
    let events = if events.is_empty() {
        Vec::new()
    } else {
        store.commit(events, context, metadata).await?
    };
    let after = EventStoreAggregateContext {
        aggregate_id: id,
        aggregate: aggregate.clone(),
        current_sequence: sequence + events.len(),
        current_snapshot: snapshot_after(sequence, snapshot, events.len()),
    };
    Ok((Executed { aggregate, events }, after))
}

/// The snapshot number after appending `appended` events at `sequence`:
/// cqrs-es's snapshot store writes the next snapshot when the append
/// reaches a multiple of [`SNAPSHOT_EVERY`].
fn snapshot_after(sequence: usize, snapshot: Option<usize>, appended: usize) -> Option<usize> {
    let next_at = SNAPSHOT_EVERY - sequence % SNAPSHOT_EVERY;
    if appended > 0 && appended >= next_at {
        Some(snapshot.map_or(1, |n| n + 1))
    } else {
        snapshot
    }
}

/// Recently used aggregates' states, so that loading one reads only the
/// events stored since (none, usually) instead of its snapshot and the
/// events after it. Never a source of truth: every load still asks the
/// store for newer events, and a failed command forgets the entry. Written
/// only by commands, under their aggregate's lock, so an entry is exactly
/// what this process committed last. Bounded, in two generations: new
/// entries go to the young one; when it is full the old one is dropped and
/// the young one becomes old, and an old entry that is used again moves
/// back to the young one. So what is in use — a busy product above all —
/// stays, while orders that are done age out. (Dropping everything when
/// full made every busy product reload at once, every minute or so.)
#[derive(Default)]
struct AggregateCache {
    generations: Mutex<Generations>,
}

type Entries = HashMap<AggregateKey, Box<dyn Any + Send>>;

#[derive(Default)]
struct Generations {
    young: Entries,
    old: Entries,
}

impl Generations {
    fn insert(&mut self, key: AggregateKey, entry: Box<dyn Any + Send>) {
        self.old.remove(&key);
        if self.young.len() >= CACHE_CAPACITY / 2 {
            self.old = std::mem::take(&mut self.young);
            self.old.remove(&key);
        }
        self.young.insert(key, entry);
    }
}

/// An aggregate's type and id.
type AggregateKey = (&'static str, String);

/// A lock per aggregate, held while a command on it runs.
#[derive(Default, Debug)]
struct KeyedLocks {
    locks: Mutex<HashMap<AggregateKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds one aggregate's lock; the lock is dropped from the map when its
/// last holder or waiter is done.
struct Turn<'a> {
    locks: &'a KeyedLocks,
    key: AggregateKey,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    async fn lock(&self, aggregate_type: &'static str, aggregate_id: &str) -> Turn<'_> {
        let key = (aggregate_type, aggregate_id.to_string());
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(key.clone()).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        Turn {
            locks: self,
            key,
            guard: Some(guard),
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.locks.locks.lock().unwrap_or_else(|e| e.into_inner());
        // Only the map holds it now: nobody waits for it.
        if locks
            .get(&self.key)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            locks.remove(&self.key);
        }
    }
}

/// Aggregates held at most by one store's cache.
const CACHE_CAPACITY: usize = 20_000;

impl std::fmt::Debug for AggregateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AggregateCache")
    }
}

impl AggregateCache {
    fn get<A: Aggregate + Clone + 'static>(
        &self,
        aggregate_id: &str,
    ) -> Option<EventStoreAggregateContext<A>> {
        let key = (A::TYPE, aggregate_id.to_string());
        let mut generations = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = generations.old.remove(&key) {
            generations.insert(key.clone(), entry);
        }
        let cached = generations
            .young
            .get(&key)?
            .downcast_ref::<(A, usize, Option<usize>)>()?;
        Some(EventStoreAggregateContext {
            aggregate_id: aggregate_id.to_string(),
            aggregate: cached.0.clone(),
            current_sequence: cached.1,
            current_snapshot: cached.2,
        })
    }

    fn put<A: Aggregate + 'static>(
        &self,
        aggregate_id: &str,
        context: EventStoreAggregateContext<A>,
    ) {
        let mut generations = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        generations.insert(
            (A::TYPE, aggregate_id.to_string()),
            Box::new((
                context.aggregate,
                context.current_sequence,
                context.current_snapshot,
            )),
        );
    }

    fn forget<A: Aggregate>(&self, aggregate_id: &str) {
        let key = (A::TYPE, aggregate_id.to_string());
        let mut generations = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        generations.young.remove(&key);
        generations.old.remove(&key);
    }
}

/// Binds [`Param`]s to a statement through sqlx as the values they were
/// made from: an integer as a 64-bit integer, text and NULL as text.
pub fn bind_params<'q, DB>(
    query: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    params: Vec<Param>,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    params.into_iter().fold(query, |query, param| match param {
        Param::Null => query.bind(None::<String>),
        Param::Int(i) => query.bind(i),
        Param::Text(s) => query.bind(s),
    })
}

/// `($n, $n+1, …), (…)`: `rows` groups of `columns` numbered parameters,
/// numbered after the statement's first `skip` — the VALUES of a multi-row
/// INSERT, for both backends.
pub fn values_placeholders(rows: usize, columns: usize, skip: usize) -> String {
    (0..rows)
        .map(|row| {
            let params: Vec<String> = (1..=columns)
                .map(|c| format!("${}", skip + row * columns + c))
                .collect();
            format!("({})", params.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// An event row as cqrs-es reads it, on either backend.
fn serialized_event<R: sqlx::Row>(row: &R) -> Result<cqrs_es::persist::SerializedEvent, sqlx::Error>
where
    for<'r> &'r str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> sqlx::types::Json<Value>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let sequence: i64 = row.try_get("sequence")?;
    let payload: sqlx::types::Json<Value> = row.try_get("payload")?;
    let metadata: sqlx::types::Json<Value> = row.try_get("metadata")?;
    Ok(cqrs_es::persist::SerializedEvent::new(
        row.try_get("aggregate_id")?,
        usize::try_from(sequence).unwrap_or_default(),
        row.try_get("aggregate_type")?,
        row.try_get("event_type")?,
        row.try_get("event_version")?,
        payload.0,
        metadata.0,
    ))
}

fn corrupt(position: i64, message: impl ToString) -> StoreError {
    StoreError::Corrupt {
        position,
        message: message.to_string(),
    }
}
