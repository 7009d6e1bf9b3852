//! PostgreSQL specifics: the sequencer that numbers the global log.
//!
//! postgres-es inserts rows with no position. Before reading, a reader runs
//! the sequencer, which numbers the committed rows in a commit-safe order
//! (migration 0005): a log read in the same statement ([`read_log`],
//! migration 0007), other reads before theirs
//! (`Store::sequence_for_reading`); `Pg::sequencing` decides when.
//!
//! And the statements many saga handlers make at once, each run for a
//! batch of callers ([`Batched`], `batch.rs`).

use std::future::Future;
use std::sync::Arc;

use cqrs_es::persist::SerializedEvent;
use sqlx::postgres::PgRow;
use sqlx::Row;

use super::batch::Batcher;
use super::notifications::AttemptRow;
use super::sql::{bind_events, insert_sql};
use super::timers::{millis, Cancel, Timer, TimerKind, TimerWrite};
use super::{corrupt, LogEntry, Statements, StoreError};

/// Requests one batched statement takes at most.
const MAX_BATCH: usize = 256;

/// Rows one batched INSERT of appends takes at most (PostgreSQL binds at
/// most 65,535 parameters, eight per row); a batch with more runs its
/// appends one by one.
const MAX_BATCH_ROWS: usize = 4_096;

/// One append without a snapshot: an aggregate's new events, stored
/// together or not at all.
#[derive(Debug)]
pub(super) struct Append {
    pub aggregate_type: &'static str,
    pub events: Vec<SerializedEvent>,
}

/// The batched statements (`batch.rs`): appends without a snapshot, made
/// by every command that changes something; hold lookups, made for every
/// item of every order the stock side reserves or releases; and a
/// notification's progress check and attempt record, made for every
/// notification; and scheduling writes, two or three per order.
#[derive(Debug)]
pub(super) struct Batched {
    /// Appends, each answered with its own statement's outcome.
    pub appends: Batcher<Append, Result<(), sqlx::Error>>,
    /// (product, order) → the units the order holds on the product.
    pub holds: Batcher<(String, String), Option<i64>>,
    /// Event id → (attempts made, attempts that delivered).
    pub notification_progress: Batcher<String, (i64, i64)>,
    pub notification_attempts: Batcher<AttemptRow, ()>,
    /// A notification attempt to claim before sending → whether it was
    /// taken.
    pub notification_claims: Batcher<AttemptRow, bool>,
    /// Scheduling writes, each answered with its own statement's outcome.
    pub timer_writes: Batcher<TimerWrite, Result<(), sqlx::Error>>,
}

impl Batched {
    /// Starts the batching tasks on the current runtime.
    pub(super) fn spawn(statements: &Arc<Statements>) -> Self {
        Batched {
            appends: Batcher::spawn(MAX_BATCH, on(statements, append_batch)),
            holds: Batcher::spawn(MAX_BATCH, on(statements, held_for_orders)),
            notification_progress: Batcher::spawn(MAX_BATCH, on(statements, notification_progress)),
            notification_attempts: Batcher::spawn(
                MAX_BATCH,
                on(statements, record_notification_attempts),
            ),
            notification_claims: Batcher::spawn(MAX_BATCH, on(statements, claim_notifications)),
            timer_writes: Batcher::spawn(MAX_BATCH, on(statements, schedule_timer_batch)),
        }
    }
}

/// A batch's statement, run on the single-statement connections.
fn on<Req: 'static, Res, Fut>(
    statements: &Arc<Statements>,
    run: fn(Arc<Statements>, Vec<Req>) -> Fut,
) -> impl Fn(Vec<Req>) -> Fut + Send + 'static
where
    Fut: Future<Output = Result<Vec<Res>, StoreError>> + 'static,
{
    let pool = statements.clone();
    move |requests| run(pool.clone(), requests)
}

async fn held_for_orders(
    pool: Arc<Statements>,
    pairs: Vec<(String, String)>,
) -> Result<Vec<Option<i64>>, StoreError> {
    let (products, orders): (Vec<String>, Vec<String>) = pairs.into_iter().unzip();
    Ok(
        sqlx::query_scalar(include_str!("sql/pg_held_for_orders.sql"))
            .bind(products)
            .bind(orders)
            .fetch_all(&*pool)
            .await?,
    )
}

async fn notification_progress(
    pool: Arc<Statements>,
    event_ids: Vec<String>,
) -> Result<Vec<(i64, i64)>, StoreError> {
    Ok(
        sqlx::query_as(include_str!("sql/pg_notification_progress.sql"))
            .bind(event_ids)
            .fetch_all(&*pool)
            .await?,
    )
}

async fn record_notification_attempts(
    pool: Arc<Statements>,
    rows: Vec<AttemptRow>,
) -> Result<Vec<()>, StoreError> {
    let count = rows.len();
    let mut columns = AttemptColumns::default();
    for row in rows {
        columns.push(row);
    }
    sqlx::query(include_str!("sql/pg_record_notification_attempts.sql"))
        .bind(columns.event_ids)
        .bind(columns.attempts)
        .bind(columns.order_ids)
        .bind(columns.kinds)
        .bind(columns.outcomes)
        .bind(columns.errors)
        .bind(columns.attempted_at_ms)
        .execute(&*pool)
        .await?;
    Ok(vec![(); count])
}

/// Claims a batch of notification attempts before they are sent
/// (`pg_claim_notifications.sql`); answers, per request, whether it was
/// taken — once per attempt, for its first request in the batch.
async fn claim_notifications(
    pool: Arc<Statements>,
    rows: Vec<AttemptRow>,
) -> Result<Vec<bool>, StoreError> {
    let keys: Vec<(String, i64)> = rows
        .iter()
        .map(|row| (row.event_id.clone(), row.attempt))
        .collect();
    let mut columns = AttemptColumns::default();
    for row in rows {
        columns.push(row);
    }
    let taken: Vec<(String, i64)> = sqlx::query_as(include_str!("sql/pg_claim_notifications.sql"))
        .bind(columns.event_ids)
        .bind(columns.attempts)
        .bind(columns.order_ids)
        .bind(columns.kinds)
        .bind(columns.attempted_at_ms)
        .bind(super::notifications::CLAIM_LEASE_MS)
        .fetch_all(&*pool)
        .await?;
    let mut taken: std::collections::HashSet<(String, i64)> = taken.into_iter().collect();
    Ok(keys.into_iter().map(|key| taken.remove(&key)).collect())
}

/// Stores a batch of appends: all of them in one multi-row INSERT, one
/// implicit transaction and one commit. The statement is atomic, so a
/// failure stores none of them; then — a sequence taken by another writer,
/// a lost connection, anything — each append runs again alone and gets its
/// own outcome, as it would have without the batch (a conflict between two
/// instances is rare: within one, an aggregate's commands take turns). Rows
/// go in key order, so two instances' batches cannot deadlock on each
/// other's keys. The batch as a whole never fails: each append gets its
/// own outcome.
async fn append_batch(
    pool: Arc<Statements>,
    appends: Vec<Append>,
) -> Result<Vec<Result<(), sqlx::Error>>, StoreError> {
    let rows: usize = appends.iter().map(|a| a.events.len()).sum();
    if appends.len() > 1 && rows <= MAX_BATCH_ROWS {
        let mut order: Vec<usize> = (0..appends.len()).collect();
        order.sort_by(|&a, &b| append_key(&appends[a]).cmp(&append_key(&appends[b])));
        let sql = insert_sql(rows, "::uuid");
        let query = order.iter().fold(sqlx::query(&sql), |query, &i| {
            bind_events(query, appends[i].aggregate_type, &appends[i].events)
        });
        if query.execute(&*pool).await.is_ok() {
            return Ok(appends.iter().map(|_| Ok(())).collect());
        }
    }
    let mut outcomes = Vec::with_capacity(appends.len());
    for append in &appends {
        outcomes.push(append_alone(&pool, append).await);
    }
    Ok(outcomes)
}

/// Where an append's rows sort among a batch's.
fn append_key(append: &Append) -> (&str, &str, usize) {
    match append.events.first() {
        Some(first) => (
            append.aggregate_type,
            first.aggregate_id.as_str(),
            first.sequence,
        ),
        None => (append.aggregate_type, "", 0),
    }
}

async fn append_alone(pool: &Statements, append: &Append) -> Result<(), sqlx::Error> {
    if append.events.is_empty() {
        return Ok(());
    }
    let sql = insert_sql(append.events.len(), "::uuid");
    bind_events(sqlx::query(&sql), append.aggregate_type, &append.events)
        .execute(pool)
        .await
        .map(|_| ())
}

/// Runs a batch of scheduling writes (`pg_schedule_timers.sql`): in runs
/// of consecutive writes on orders of their own, each run one statement
/// and one commit; a write on an order already in the run starts the next
/// one, so every write's cancel sees the timers written before it, as it
/// would alone. A run that fails runs again write by write, as
/// [`append_batch`] does, and each write gets its own outcome. Timers go
/// in id order, so two instances' runs cannot deadlock on their keys.
async fn schedule_timer_batch(
    pool: Arc<Statements>,
    writes: Vec<TimerWrite>,
) -> Result<Vec<Result<(), sqlx::Error>>, StoreError> {
    let mut outcomes = Vec::with_capacity(writes.len());
    for run in runs_on_distinct_orders(&writes) {
        if run.len() > 1 && schedule_timers(&pool, run).await.is_ok() {
            outcomes.extend(run.iter().map(|_| Ok(())));
            continue;
        }
        for write in run {
            outcomes.push(schedule_timers(&pool, std::slice::from_ref(write)).await);
        }
    }
    Ok(outcomes)
}

/// `writes` cut into consecutive runs in which no two writes change the
/// same order's timers.
fn runs_on_distinct_orders(writes: &[TimerWrite]) -> Vec<&[TimerWrite]> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut orders = std::collections::HashSet::new();
    for (i, write) in writes.iter().enumerate() {
        if write.orders().any(|order| orders.contains(order)) {
            runs.push(&writes[start..i]);
            start = i;
            orders.clear();
        }
        orders.extend(write.orders());
    }
    if start < writes.len() {
        runs.push(&writes[start..]);
    }
    runs
}

async fn schedule_timers(pool: &Statements, writes: &[TimerWrite]) -> Result<(), sqlx::Error> {
    let mut cancelled: Vec<(&str, &str, &str)> = writes
        .iter()
        .filter_map(|w| w.cancel.as_ref())
        .map(|(cancel, order_id)| match cancel {
            Cancel::Kind(kind) => (order_id.as_str(), "kind", kind.as_str()),
            Cancel::SagaBut(kind) => (order_id.as_str(), "saga", kind.as_str()),
        })
        .collect();
    cancelled.sort_unstable();
    let mut cancels = (Vec::new(), Vec::new(), Vec::new());
    for (order_id, mode, kind) in cancelled {
        cancels.0.push(mode);
        cancels.1.push(kind);
        cancels.2.push(order_id);
    }
    let mut timers: Vec<&Timer> = writes.iter().flat_map(|w| &w.timers).collect();
    timers.sort_by_cached_key(|t| t.id());
    let mut columns = TimerColumns::default();
    for timer in timers {
        columns.push(timer);
    }
    sqlx::query(include_str!("sql/pg_schedule_timers.sql"))
        .bind(cancels.0)
        .bind(cancels.1)
        .bind(cancels.2)
        .bind(columns.timer_ids)
        .bind(columns.kinds)
        .bind(columns.order_ids)
        .bind(columns.attempts)
        .bind(columns.due_at_ms)
        .bind(columns.causation_ids)
        .bind(columns.correlation_ids)
        .bind(columns.payloads)
        .bind(TimerKind::NotifyRetry.as_str())
        .execute(pool)
        .await
        .map(|_| ())
}

/// Timers as the arrays the scheduling statement unnests.
#[derive(Default)]
struct TimerColumns<'a> {
    timer_ids: Vec<String>,
    kinds: Vec<&'static str>,
    order_ids: Vec<&'a str>,
    attempts: Vec<i64>,
    due_at_ms: Vec<i64>,
    causation_ids: Vec<&'a str>,
    correlation_ids: Vec<Option<&'a str>>,
    payloads: Vec<String>,
}

impl<'a> TimerColumns<'a> {
    fn push(&mut self, timer: &'a Timer) {
        self.timer_ids.push(timer.id());
        self.kinds.push(timer.kind.as_str());
        self.order_ids.push(&timer.order_id);
        self.attempts.push(i64::from(timer.attempt));
        self.due_at_ms.push(millis(timer.due_at));
        self.causation_ids.push(&timer.causation_id);
        self.correlation_ids.push(timer.correlation_id.as_deref());
        self.payloads.push(timer.payload.to_string());
    }
}

/// Attempt rows as the arrays the batch INSERT unnests.
#[derive(Default)]
struct AttemptColumns {
    event_ids: Vec<String>,
    attempts: Vec<i64>,
    order_ids: Vec<String>,
    kinds: Vec<&'static str>,
    outcomes: Vec<&'static str>,
    errors: Vec<Option<String>>,
    attempted_at_ms: Vec<i64>,
}

impl AttemptColumns {
    fn push(&mut self, row: AttemptRow) {
        self.event_ids.push(row.event_id);
        self.attempts.push(row.attempt);
        self.order_ids.push(row.order_id);
        self.kinds.push(row.kind);
        self.outcomes.push(row.outcome);
        self.errors.push(row.error);
        self.attempted_at_ms.push(row.attempted_at_ms);
    }
}

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
