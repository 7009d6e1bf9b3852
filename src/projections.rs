//! Keeps the read models (`order_views`, `order_history`, `product_views`,
//! `saga_stats`) up to date from the global log, and answers queries on
//! them.
//!
//! Each batch of log entries is applied in one transaction together with
//! the projection's checkpoint, and the checkpoint moves only if it still
//! holds the position the batch was read from — so every event is applied
//! exactly once, even with several instances running the projection, and a
//! crash at any instant loses nothing. After a commit, status changes go to
//! subscribers and waiters learn the new position.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use order_saga_domain::{CancelReason, OrderStatus};
use order_saga_projections::{
    project, HistoryRecord, OrderFilter, OrderRecord, OrderTime, ProductRecord, ReadOp, StageStart,
    StatRecord, StatusChange, StoredEvent,
};
use sqlx::{Postgres, Row, Sqlite, Transaction};
use tokio::sync::{broadcast, watch};

use crate::health::{pause_until_append, Heartbeat, Shutdown, Tasks};
use crate::store::{bind_params, values_placeholders, Lite, LogEntry, Param, Store, StoreError};

/// The checkpoint of the read models.
pub const CHECKPOINT: &str = "projection.read_models";
/// The checkpoint of the read models being rebuilt beside the live ones.
const NEXT_CHECKPOINT: &str = "projection.read_models.next";
const BATCH: i64 = 500;
/// How long the background projection lets appends gather before a pass:
/// read models lag the log by about this much more, for a fraction of the
/// statements (under steady load a pass per append had been the norm).
const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// The read-model tables; a rebuild fills `<table>_next` and swaps.
const TABLES: [&str; 4] = [
    "order_views",
    "order_history",
    "product_views",
    "saga_stats",
];

/// Which set of read-model tables a batch is applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Target {
    /// The tables readers read.
    Live,
    /// The shadow tables of a rebuild.
    Next,
}

impl Target {
    /// `sql` with the table names of this target.
    fn sql(self, sql: &str) -> String {
        match self {
            Target::Live => sql.to_string(),
            Target::Next => TABLES.iter().fold(sql.to_string(), |sql, table| {
                sql.replace(table, &format!("{table}_next"))
            }),
        }
    }

    fn checkpoint(self) -> &'static str {
        match self {
            Target::Live => CHECKPOINT,
            Target::Next => NEXT_CHECKPOINT,
        }
    }
}

enum Tx {
    Pg(Transaction<'static, Postgres>),
    Lite(Transaction<'static, Sqlite>),
    /// A live batch on SQLite: its statements are gathered, then written
    /// at commit as one write of the store's group commit, guarded by the
    /// checkpoint's claim. No connection is held while the batch is worked
    /// out: on the single writer, a transaction held across a round trip
    /// per statement kept every other write waiting.
    Gathered {
        db: Lite,
        guard: Option<(String, Vec<Param>)>,
        statements: Vec<(String, Vec<Param>)>,
    },
}

impl Tx {
    async fn begin(store: &Store) -> Result<Self, StoreError> {
        Ok(match store {
            Store::Postgres(db) => {
                let mut tx = db.pool.begin().await?;
                // Read models are rebuilt from the log with their
                // checkpoint: no need to wait for the disk.
                sqlx::query(crate::store::RELAXED).execute(&mut *tx).await?;
                Tx::Pg(tx)
            }
            Store::Sqlite(db) => Tx::Lite(db.write.begin().await?),
        })
    }

    /// A transaction for one live batch: on SQLite, gathered.
    async fn begin_batch(store: &Store) -> Result<Self, StoreError> {
        match store {
            Store::Sqlite(db) => Ok(Tx::Gathered {
                db: db.clone(),
                guard: None,
                statements: Vec::new(),
            }),
            Store::Postgres(_) => Tx::begin(store).await,
        }
    }

    /// Runs a write statement; returns the rows it changed (0 when it is
    /// gathered for the commit).
    async fn run(&mut self, sql: String, params: Vec<Param>) -> Result<u64, StoreError> {
        Ok(match self {
            Tx::Pg(t) => bind_params(sqlx::query(&sql), params)
                .execute(&mut **t)
                .await?
                .rows_affected(),
            Tx::Lite(t) => bind_params(sqlx::query(&sql), params)
                .execute(&mut **t)
                .await?
                .rows_affected(),
            Tx::Gathered { statements, .. } => {
                statements.push((sql, params));
                0
            }
        })
    }

    /// The first column of the first row, an integer or NULL (none without
    /// a row). A gathered batch reads what is committed.
    async fn read_i64(
        &mut self,
        sql: &str,
        params: Vec<Param>,
    ) -> Result<Option<Option<i64>>, StoreError> {
        let row = match self {
            Tx::Pg(t) => bind_params(sqlx::query(sql), params)
                .fetch_optional(&mut **t)
                .await?
                .map(|row| row.try_get(0))
                .transpose()?,
            Tx::Lite(t) => bind_params(sqlx::query(sql), params)
                .fetch_optional(&mut **t)
                .await?
                .map(|row| row.try_get(0))
                .transpose()?,
            Tx::Gathered { db, .. } => bind_params(sqlx::query(sql), params)
                .fetch_optional(&db.read)
                .await?
                .map(|row| row.try_get(0))
                .transpose()?,
        };
        Ok(row)
    }

    /// Commits; false when a gathered batch's claim failed (another
    /// instance moved the checkpoint first) and nothing was written.
    async fn commit(self) -> Result<bool, StoreError> {
        match self {
            Tx::Pg(t) => t.commit().await?,
            Tx::Lite(t) => t.commit().await?,
            Tx::Gathered {
                db,
                guard,
                mut statements,
            } => {
                let guarded = guard.is_some();
                if let Some(guard) = guard {
                    statements.insert(0, guard);
                }
                if statements.is_empty() {
                    return Ok(true);
                }
                return match db.execute(statements, guarded).await {
                    Ok(()) => Ok(true),
                    Err(sqlx::Error::RowNotFound) => Ok(false),
                    Err(e) => Err(e.into()),
                };
            }
        }
        Ok(true)
    }
}

pub struct Projections {
    store: Store,
    changes: broadcast::Sender<StatusChange>,
    progress: watch::Sender<i64>,
    heartbeat: Heartbeat,
    starts: StageStarts,
    /// Where this process last moved each target's checkpoint to, so the
    /// next batch need not read it back; if another instance moved it
    /// since, the claim fails and the checkpoint is read again.
    claimed: std::sync::Mutex<HashMap<Target, i64>>,
}

/// When recent orders reached each stage start (created, stock replied,
/// confirmed), as the projection wrote it to `order_views`: timing a stage
/// needs its start, and reading it back cost a query per stage. Each of
/// these columns is written once per order, from its event's recorded time,
/// so a remembered value is the stored one (whichever instance applied
/// it); a miss reads the table. Bounded: starts over when full.
#[derive(Default)]
struct StageStarts {
    entries: std::sync::Mutex<HashMap<(Target, String, StageStart), i64>>,
}

/// Stage starts remembered at most: enough for the orders in flight (a
/// miss only costs the query).
const STAGE_STARTS_KEPT: usize = 10_000;

impl StageStarts {
    fn remember(&self, target: Target, order_id: &str, start: StageStart, at_ms: i64) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= STAGE_STARTS_KEPT {
            entries.clear();
        }
        entries.insert((target, order_id.to_string(), start), at_ms);
    }

    fn recall(&self, target: Target, order_id: &str, start: StageStart) -> Option<i64> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.get(&(target, order_id.to_string(), start)).copied()
    }
}

fn stored(entry: &LogEntry) -> StoredEvent {
    StoredEvent {
        position: entry.position,
        recorded_at_ms: entry.recorded_at.timestamp_millis(),
        aggregate_type: entry.aggregate_type.clone(),
        aggregate_id: entry.aggregate_id.clone(),
        sequence: entry.sequence,
        event_type: entry.event_type.clone(),
        payload: entry.payload.clone(),
    }
}

fn start_column(start: StageStart) -> &'static str {
    match start {
        StageStart::Created => "created_at_ms",
        StageStart::StockReplied => "stock_replied_at_ms",
        StageStart::Confirmed => "confirmed_at_ms",
    }
}

impl Projections {
    pub fn new(store: Store) -> Arc<Self> {
        let (changes, _) = broadcast::channel(4096);
        let (progress, _) = watch::channel(0);
        Arc::new(Projections {
            store,
            changes,
            progress,
            heartbeat: Heartbeat::default(),
            starts: StageStarts::default(),
            claimed: std::sync::Mutex::default(),
        })
    }

    /// Status changes as they are projected.
    pub fn subscribe(&self) -> broadcast::Receiver<StatusChange> {
        self.changes.subscribe()
    }

    /// The last log position applied (0 before anything).
    pub async fn position(&self) -> Result<i64, StoreError> {
        self.store.load_checkpoint(CHECKPOINT).await
    }

    /// Applies the next batch of the log; returns how many entries.
    pub async fn run_once(&self) -> Result<usize, StoreError> {
        let (applied, changes) = self.apply_batch(Target::Live).await?;
        for change in changes {
            let _ = self.changes.send(change);
        }
        if let Some(last) = applied {
            self.progress.send_replace(last);
        }
        Ok(usize::from(applied.is_some()))
    }

    /// Applies the next batch to `target`, with its checkpoint; returns the
    /// position reached (none if there was nothing, or another instance
    /// applied it first) and the status changes.
    async fn apply_batch(
        &self,
        target: Target,
    ) -> Result<(Option<i64>, Vec<StatusChange>), StoreError> {
        let remembered = self.claimed_position(target, None);
        let from = match remembered {
            Some(from) => from,
            None => self.store.load_checkpoint(target.checkpoint()).await?,
        };
        let entries = self.store.read_log(from, BATCH).await?;
        let Some(last) = entries.last().map(|e| e.position) else {
            return Ok((None, Vec::new()));
        };
        let mut tx = Tx::begin_batch(&self.store).await?;
        if !claim(&mut tx, target.checkpoint(), from, last).await? {
            self.forget_claimed(target);
            return Ok((None, Vec::new()));
        }
        let changes = apply_entries(&mut tx, &entries, target, &self.starts).await;
        let committed = match changes {
            Ok(changes) => tx.commit().await.map(|applied| applied.then_some(changes)),
            Err(e) => Err(e),
        };
        match committed {
            Ok(None) => {
                self.forget_claimed(target);
                Ok((None, Vec::new()))
            }
            Ok(Some(changes)) => {
                self.claimed_position(target, Some(last));
                Ok((Some(last), changes))
            }
            Err(e) => {
                self.forget_claimed(target);
                Err(e)
            }
        }
    }

    /// The remembered checkpoint of `target`, after setting it to `set`.
    fn claimed_position(&self, target: Target, set: Option<i64>) -> Option<i64> {
        let mut claimed = self.claimed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(position) = set {
            claimed.insert(target, position);
        }
        claimed.get(&target).copied()
    }

    fn forget_claimed(&self, target: Target) {
        let mut claimed = self.claimed.lock().unwrap_or_else(|e| e.into_inner());
        claimed.remove(&target);
    }

    /// Runs until the projection has caught up with the log as it is now
    /// (whichever instance applies the batches).
    pub async fn catch_up(&self) -> Result<(), StoreError> {
        self.store.sequence_pending().await?;
        let head = self.store.head_position().await?;
        while self.position().await? < head {
            if self.run_once().await? == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Ok(())
    }

    /// Keeps the read models up to date in the background until
    /// `shutdown` turns true.
    pub fn spawn(self: &Arc<Self>, poll: Duration, mut shutdown: Shutdown) -> Tasks {
        let this = self.clone();
        let mut tasks = Tasks::default();
        tasks.push(tokio::spawn(async move {
            let mut appends = this.store.appends();
            loop {
                this.heartbeat.beat();
                appends.mark();
                let idle = match this.run_once().await {
                    Ok(n) => n == 0,
                    Err(e) => {
                        tracing::warn!(error = %e, "projection failed; retrying");
                        true
                    }
                };
                if (idle && pause_until_append(poll, &mut shutdown, &mut appends).await)
                    || *shutdown.borrow()
                {
                    break;
                }
                // Let more appends gather, so one batch — one transaction,
                // one statistics write per metric — covers several events
                // instead of each append waking a batch of its own.
                tokio::time::sleep(BATCH_WINDOW).await;
            }
        }));
        tasks
    }

    /// Beats while the projection loop runs.
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    /// Builds the read models again from position 0 beside the live ones
    /// (`<table>_next`), while readers keep reading the live tables; then,
    /// in one transaction that holds the live projection still, finishes
    /// the last stretch and swaps the tables. `progress` hears (position
    /// reached, log head) after each batch.
    pub async fn rebuild(&self, mut progress: impl FnMut(i64, i64)) -> Result<(), StoreError> {
        let ddl = Target::Next.sql(self.read_model_ddl());
        let mut tx = Tx::begin(&self.store).await?;
        for table in TABLES {
            exec(&mut tx, &format!("DROP TABLE IF EXISTS {table}_next")).await?;
        }
        for statement in statements(&ddl) {
            exec(&mut tx, statement).await?;
        }
        set_checkpoint(&mut tx, NEXT_CHECKPOINT, 0).await?;
        tx.commit().await?;
        self.forget_claimed(Target::Next);

        let head = self.store.head_position().await?;
        while let (Some(position), _) = self.apply_batch(Target::Next).await? {
            progress(position, head.max(position));
        }

        let mut tx = Tx::begin(&self.store).await?;
        // Hold the live projection: its checkpoint row stays ours until the
        // swap commits.
        let live = lock_checkpoint(&mut tx, CHECKPOINT).await?;
        let mut position = lock_checkpoint(&mut tx, NEXT_CHECKPOINT).await?;
        loop {
            let entries = self.store.read_log(position, BATCH).await?;
            let Some(last) = entries.last().map(|e| e.position) else {
                break;
            };
            apply_entries(&mut tx, &entries, Target::Next, &self.starts).await?;
            position = last;
        }
        for table in TABLES {
            exec(&mut tx, &format!("DROP TABLE {table}")).await?;
            exec(
                &mut tx,
                &format!("ALTER TABLE {table}_next RENAME TO {table}"),
            )
            .await?;
        }
        // Indexes keep the names they were created with: give them back the
        // live ones.
        for statement in statements(self.read_model_ddl()).filter(|s| s.contains("CREATE INDEX")) {
            if let Some(name) = statement
                .split_whitespace()
                .skip_while(|w| *w != "INDEX")
                .nth(1)
            {
                exec(
                    &mut tx,
                    &format!("DROP INDEX IF EXISTS {}", Target::Next.sql(name)),
                )
                .await?;
                exec(&mut tx, statement).await?;
            }
        }
        set_checkpoint(&mut tx, CHECKPOINT, position.max(live)).await?;
        exec(
            &mut tx,
            &format!("DELETE FROM checkpoints WHERE name = '{NEXT_CHECKPOINT}'"),
        )
        .await?;
        tx.commit().await?;
        self.forget_claimed(Target::Live);
        progress(position, position);
        self.progress.send_replace(position);
        Ok(())
    }

    fn read_model_ddl(&self) -> &'static str {
        match self.store {
            Store::Postgres(_) => include_str!("../migrations/postgres/0003_read_models.sql"),
            Store::Sqlite(_) => include_str!("../migrations/sqlite/0003_read_models.sql"),
        }
    }

    /// Waits (at most `timeout`) until the order's read model has reached
    /// `version`; returns it as it then is.
    pub async fn wait_for_order(
        &self,
        order_id: &str,
        version: i64,
        timeout: Duration,
    ) -> Result<Option<OrderRecord>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut progress = self.progress.subscribe();
        loop {
            let record = self.order(order_id).await?;
            if record.as_ref().is_some_and(|r| r.version >= version)
                || tokio::time::Instant::now() >= deadline
            {
                return Ok(record);
            }
            // Woken by this instance's projection, or re-checked shortly in
            // case another instance applied it.
            let _ = tokio::time::timeout(Duration::from_millis(20), progress.changed()).await;
        }
    }

    pub async fn order(&self, order_id: &str) -> Result<Option<OrderRecord>, StoreError> {
        let row: Option<OrderRow> = on_read_pool!(&self.store, |pool| sqlx::query_as(
            "SELECT * FROM order_views WHERE order_id = $1"
        )
        .bind(order_id)
        .fetch_optional(pool)
        .await)?;
        row.map(OrderRow::into_record).transpose()
    }

    /// Orders matching `filter`, oldest first, after the cursor position.
    pub async fn orders(
        &self,
        filter: &OrderFilter,
        after: i64,
        limit: i64,
    ) -> Result<Vec<OrderRecord>, StoreError> {
        let status = filter.status.map(|s| s.as_str());
        let rows: Vec<OrderRow> = on_read_pool!(&self.store, |pool| sqlx::query_as(
            "SELECT * FROM order_views \
             WHERE (CAST($1 AS TEXT) IS NULL OR status = $1) \
               AND (CAST($2 AS TEXT) IS NULL OR user_id = $2) \
               AND (CAST($3 AS TEXT) IS NULL OR store_id = $3) \
               AND created_position > $4 \
             ORDER BY created_position LIMIT $5"
        )
        .bind(status)
        .bind(filter.user_id.as_deref())
        .bind(filter.store_id.as_deref())
        .bind(after)
        .bind(limit)
        .fetch_all(pool)
        .await)?;
        rows.into_iter().map(OrderRow::into_record).collect()
    }

    pub async fn history(&self, order_id: &str) -> Result<Vec<HistoryRecord>, StoreError> {
        let rows: Vec<(i64, String, i64, String, i64, String)> =
            on_read_pool!(&self.store, |pool| sqlx::query_as(
                "SELECT position, aggregate_type, sequence, event_type, recorded_at_ms, payload \
             FROM order_history WHERE order_id = $1 ORDER BY position"
            )
            .bind(order_id)
            .fetch_all(pool)
            .await)?;
        rows.into_iter()
            .map(
                |(position, aggregate_type, sequence, event_type, recorded_at_ms, payload)| {
                    Ok(HistoryRecord {
                        position,
                        aggregate_type,
                        sequence,
                        event_type,
                        recorded_at_ms,
                        payload: serde_json::from_str(&payload)
                            .map_err(|e| StoreError::CorruptRow(e.to_string()))?,
                    })
                },
            )
            .collect()
    }

    /// Every status the order has had, oldest first.
    pub async fn status_history(&self, order_id: &str) -> Result<Vec<StatusChange>, StoreError> {
        let history = self.history(order_id).await?;
        Ok(history
            .into_iter()
            .filter(|h| h.aggregate_type == "Order")
            .filter_map(|h| {
                let event = StoredEvent {
                    position: h.position,
                    recorded_at_ms: h.recorded_at_ms,
                    aggregate_type: h.aggregate_type,
                    aggregate_id: order_id.to_string(),
                    sequence: h.sequence,
                    event_type: h.event_type,
                    payload: h.payload,
                };
                project(&event).ok()?.iter().find_map(ReadOp::status_change)
            })
            .collect())
    }

    pub async fn product(&self, product_id: &str) -> Result<Option<ProductRecord>, StoreError> {
        Ok(self
            .products()
            .await?
            .into_iter()
            .find(|p| p.product_id == product_id))
    }

    pub async fn products(&self) -> Result<Vec<ProductRecord>, StoreError> {
        let rows: Vec<(String, Option<String>, i64, i64)> = on_read_pool!(&self.store, |pool| {
            sqlx::query_as(
            "SELECT product_id, price, available, reserved FROM product_views ORDER BY product_id"
        )
        .fetch_all(pool)
        .await
        })?;
        rows.into_iter()
            .map(|(product_id, price, available, reserved)| {
                Ok(ProductRecord {
                    product_id,
                    price: price
                        .map(|p| p.parse())
                        .transpose()
                        .map_err(|e| StoreError::CorruptRow(format!("price: {e}")))?,
                    available,
                    reserved,
                })
            })
            .collect()
    }

    pub async fn stats(&self) -> Result<Vec<StatRecord>, StoreError> {
        let rows: Vec<(String, i64, i64, i64)> =
            on_read_pool!(&self.store, |pool| sqlx::query_as(
                "SELECT metric, count, total_ms, max_ms FROM saga_stats ORDER BY metric"
            )
            .fetch_all(pool)
            .await)?;
        Ok(rows
            .into_iter()
            .map(|(metric, count, total_ms, max_ms)| StatRecord {
                metric,
                count,
                total_ms,
                max_ms,
            })
            .collect())
    }
}

/// The SQL statements of a migration file.
fn statements(ddl: &str) -> impl Iterator<Item = &str> {
    ddl.split(';').filter(|s| {
        s.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"))
    })
}

async fn exec(tx: &mut Tx, sql: &str) -> Result<(), StoreError> {
    tx.run(sql.to_string(), Vec::new()).await?;
    Ok(())
}

async fn set_checkpoint(tx: &mut Tx, name: &str, position: i64) -> Result<(), StoreError> {
    tx.run(
        include_str!("store/sql/save_checkpoint.sql").to_string(),
        vec![name.into(), position.into()],
    )
    .await?;
    Ok(())
}

/// Creates the named checkpoint's row, at 0, unless it exists (in a
/// gathered batch at once: the batch's claim needs the row).
async fn ensure_checkpoint(tx: &mut Tx, name: &str) -> Result<(), StoreError> {
    let sql =
        "INSERT INTO checkpoints (name, position) VALUES ($1, 0) ON CONFLICT (name) DO NOTHING";
    match tx {
        Tx::Gathered { db, .. } => {
            db.execute(vec![(sql.to_string(), vec![name.into()])], false)
                .await?;
        }
        _ => {
            tx.run(sql.to_string(), vec![name.into()]).await?;
        }
    }
    Ok(())
}

/// Locks the named checkpoint's row for the rest of the transaction and
/// returns its position.
async fn lock_checkpoint(tx: &mut Tx, name: &str) -> Result<i64, StoreError> {
    ensure_checkpoint(tx, name).await?;
    tx.run(
        "UPDATE checkpoints SET position = position WHERE name = $1".to_string(),
        vec![name.into()],
    )
    .await?;
    let position = tx
        .read_i64(
            "SELECT position FROM checkpoints WHERE name = $1",
            vec![name.into()],
        )
        .await?
        .flatten()
        .ok_or_else(|| StoreError::CorruptRow(format!("checkpoint {name} has no position")))?;
    Ok(position)
}

/// Applies log entries to `target`'s tables; returns the status changes.
async fn apply_entries(
    tx: &mut Tx,
    entries: &[LogEntry],
    target: Target,
    starts: &StageStarts,
) -> Result<Vec<StatusChange>, StoreError> {
    let mut changes = Vec::new();
    let mut stats = Stats::new();
    let mut history = Vec::new();
    let mut stock = StockChanges::new();
    let mut orders = OrderChanges::default();
    for entry in entries {
        match project(&stored(entry)) {
            Ok(ops) => {
                for op in ops {
                    changes.extend(op.status_change());
                    match op {
                        // Written together after the loop: nothing in the
                        // batch reads them back.
                        ReadOp::History { .. } => history.push(op),
                        ReadOp::ProductStock {
                            product_id,
                            available,
                            reserved_delta,
                        } => {
                            let change = stock.entry(product_id).or_insert((available, 0));
                            change.0 = available;
                            change.1 += reserved_delta;
                        }
                        ReadOp::InsertOrder { .. }
                        | ReadOp::SetStatus { .. }
                        | ReadOp::StockReplied { .. } => orders.add(op, target, starts)?,
                        op => apply(tx, &op, target, &mut stats, starts, &orders).await?,
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "projection skipped an unreadable event"),
        }
    }
    add_orders(tx, target, &orders).await?;
    add_history(tx, target, &history).await?;
    add_stock(tx, target, &stock).await?;
    add_stats(tx, target, &stats).await?;
    Ok(changes)
}

/// A batch's stock changes per product: the last available level and the
/// sum of the changes to `reserved` (one row per product: a multi-row
/// upsert may touch each row once).
type StockChanges = std::collections::BTreeMap<String, (u32, i64)>;

/// Rows per multi-row INSERT (7 parameters each, well under both
/// databases' limits on bound parameters).
const ROWS_PER_INSERT: usize = 500;

/// A batch's changes to `order_views`: the new rows, and per order what
/// its later events set — written as one multi-row INSERT and one
/// multi-row UPDATE for the whole batch (a statement per event before).
/// Applying an order's changes in event order gives the same row as
/// applying only the last value of each column, which is what is kept.
#[derive(Default)]
struct OrderChanges {
    new: Vec<NewOrder>,
    set: std::collections::BTreeMap<String, OrderPatch>,
}

struct NewOrder {
    order_id: String,
    position: i64,
    user_id: String,
    store_id: String,
    items: String,
    total_amount: String,
    at_ms: i64,
    version: i64,
}

/// The last value each column got in the batch; `None`: unchanged.
#[derive(Default)]
struct OrderPatch {
    /// Status, cancel reason (set together: NULL unless cancelled) and version.
    status: Option<(&'static str, Option<&'static str>, i64)>,
    stock_replied_at_ms: Option<i64>,
    confirmed_at_ms: Option<i64>,
    payment_wait_at_ms: Option<i64>,
    cancelled_at_ms: Option<i64>,
}

impl OrderChanges {
    fn add(&mut self, op: ReadOp, target: Target, starts: &StageStarts) -> Result<(), StoreError> {
        match op {
            ReadOp::InsertOrder {
                order_id,
                position,
                user_id,
                store_id,
                items,
                total_amount,
                at_ms,
                version,
            } => {
                let items = serde_json::to_string(&items)
                    .map_err(|e| StoreError::CorruptRow(e.to_string()))?;
                starts.remember(target, &order_id, StageStart::Created, at_ms);
                self.new.push(NewOrder {
                    order_id,
                    position,
                    user_id,
                    store_id,
                    items,
                    total_amount: total_amount.to_string(),
                    at_ms,
                    version,
                });
            }
            ReadOp::SetStatus {
                order_id,
                status,
                time,
                cancel_reason,
                at_ms,
                version,
            } => {
                if matches!(time, OrderTime::Confirmed) {
                    starts.remember(target, &order_id, StageStart::Confirmed, at_ms);
                }
                let patch = self.set.entry(order_id).or_default();
                patch.status = Some((
                    status.as_str(),
                    cancel_reason.map(CancelReason::as_str),
                    version,
                ));
                *match time {
                    OrderTime::Confirmed => &mut patch.confirmed_at_ms,
                    OrderTime::PaymentWait => &mut patch.payment_wait_at_ms,
                    OrderTime::Cancelled => &mut patch.cancelled_at_ms,
                } = Some(at_ms);
            }
            ReadOp::StockReplied { order_id, at_ms } => {
                starts.remember(target, &order_id, StageStart::StockReplied, at_ms);
                self.set.entry(order_id).or_default().stock_replied_at_ms = Some(at_ms);
            }
            _ => {}
        }
        Ok(())
    }

    /// A stage's start set earlier in this batch, not yet written.
    fn start(&self, order_id: &str, from: StageStart) -> Option<i64> {
        match from {
            StageStart::Created => self
                .new
                .iter()
                .find(|o| o.order_id == order_id)
                .map(|o| o.at_ms),
            StageStart::StockReplied => self.set.get(order_id)?.stock_replied_at_ms,
            StageStart::Confirmed => self.set.get(order_id)?.confirmed_at_ms,
        }
    }
}

/// A batch's `order_views` changes: new rows first, then every order's
/// changes in one UPDATE (SQLite and PostgreSQL name a VALUES list's
/// columns `column1`, `column2`, …; the casts give every row's NULLs one type).
async fn add_orders(tx: &mut Tx, target: Target, orders: &OrderChanges) -> Result<(), StoreError> {
    for chunk in orders.new.chunks(ROWS_PER_INSERT) {
        let sql = target.sql(&format!(
            "INSERT INTO order_views (order_id, created_position, user_id, store_id, status, \
             items, total_amount, created_at_ms, version) VALUES {} \
             ON CONFLICT (order_id) DO NOTHING",
            values_placeholders(chunk.len(), 9, 0)
        ));
        let mut params = Vec::with_capacity(chunk.len() * 9);
        for o in chunk {
            params.extend([
                o.order_id.as_str().into(),
                o.position.into(),
                o.user_id.as_str().into(),
                o.store_id.as_str().into(),
                "ORDER_CREATED".into(),
                o.items.as_str().into(),
                o.total_amount.as_str().into(),
                o.at_ms.into(),
                o.version.into(),
            ]);
        }
        tx.run(sql, params).await?;
    }
    let set: Vec<_> = orders.set.iter().collect();
    for chunk in set.chunks(ROWS_PER_INSERT) {
        let rows = (0..chunk.len())
            .map(|row| {
                let p = |c: usize| row * 8 + c;
                format!(
                    "(CAST(${} AS TEXT), CAST(${} AS TEXT), CAST(${} AS TEXT), CAST(${} AS BIGINT), \
                     CAST(${} AS BIGINT), CAST(${} AS BIGINT), CAST(${} AS BIGINT), CAST(${} AS BIGINT))",
                    p(1), p(2), p(3), p(4), p(5), p(6), p(7), p(8)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let sql = target.sql(&format!(
            "UPDATE order_views SET \
             status = COALESCE(v.column2, order_views.status), \
             cancel_reason = CASE WHEN v.column2 IS NULL THEN order_views.cancel_reason ELSE v.column3 END, \
             version = COALESCE(v.column4, order_views.version), \
             stock_replied_at_ms = COALESCE(v.column5, order_views.stock_replied_at_ms), \
             confirmed_at_ms = COALESCE(v.column6, order_views.confirmed_at_ms), \
             payment_wait_at_ms = COALESCE(v.column7, order_views.payment_wait_at_ms), \
             cancelled_at_ms = COALESCE(v.column8, order_views.cancelled_at_ms) \
             FROM (VALUES {rows}) AS v WHERE order_views.order_id = v.column1"
        ));
        let mut params = Vec::with_capacity(chunk.len() * 8);
        for (order_id, patch) in chunk {
            let (status, reason, version) = match patch.status {
                Some((status, reason, version)) => (Some(status), reason, Some(version)),
                None => (None, None, None),
            };
            // Numbers travel as text too: PostgreSQL keeps the parameter
            // types of a statement's first run, and a NULL is bound as text.
            let number = |n: Option<i64>| Param::from(n.map(|n| n.to_string()));
            params.extend([
                order_id.as_str().into(),
                status.into(),
                reason.into(),
                number(version),
                number(patch.stock_replied_at_ms),
                number(patch.confirmed_at_ms),
                number(patch.payment_wait_at_ms),
                number(patch.cancelled_at_ms),
            ]);
        }
        tx.run(sql, params).await?;
    }
    Ok(())
}

/// A batch's `order_history` rows, a few hundred per statement.
async fn add_history(tx: &mut Tx, target: Target, history: &[ReadOp]) -> Result<(), StoreError> {
    for chunk in history.chunks(ROWS_PER_INSERT) {
        let sql = target.sql(&format!(
            "INSERT INTO order_history (order_id, position, aggregate_type, sequence, event_type, \
             recorded_at_ms, payload) VALUES {} ON CONFLICT DO NOTHING",
            values_placeholders(chunk.len(), 7, 0)
        ));
        let mut params = Vec::with_capacity(chunk.len() * 7);
        for op in chunk {
            if let ReadOp::History {
                order_id,
                position,
                aggregate_type,
                sequence,
                event_type,
                at_ms,
                payload,
            } = op
            {
                params.extend([
                    order_id.as_str().into(),
                    (*position).into(),
                    aggregate_type.as_str().into(),
                    (*sequence).into(),
                    event_type.as_str().into(),
                    (*at_ms).into(),
                    payload.to_string().into(),
                ]);
            }
        }
        tx.run(sql, params).await?;
    }
    Ok(())
}

/// A batch's stock changes: one upsert for all its products.
async fn add_stock(tx: &mut Tx, target: Target, stock: &StockChanges) -> Result<(), StoreError> {
    if stock.is_empty() {
        return Ok(());
    }
    // A new row's price stays NULL until the product's price is projected.
    let sql = target.sql(&format!(
        "INSERT INTO product_views (product_id, available, reserved) VALUES {} \
         ON CONFLICT (product_id) DO UPDATE SET available = excluded.available, \
         reserved = product_views.reserved + excluded.reserved",
        values_placeholders(stock.len(), 3, 0)
    ));
    let mut params = Vec::with_capacity(stock.len() * 3);
    for (product_id, (available, reserved_delta)) in stock {
        params.extend([
            product_id.as_str().into(),
            i64::from(*available).into(),
            (*reserved_delta).into(),
        ]);
    }
    tx.run(sql, params).await?;
    Ok(())
}

/// A batch's additions to `saga_stats`, per metric: count, total and
/// maximum milliseconds. Written once per metric and batch.
type Stats = std::collections::BTreeMap<String, (i64, i64, i64)>;

fn count(stats: &mut Stats, metric: &str, duration_ms: Option<i64>) {
    let ms = duration_ms.unwrap_or(0);
    let entry = stats.entry(metric.to_string()).or_insert((0, 0, 0));
    entry.0 += 1;
    entry.1 += ms;
    entry.2 = entry.2.max(ms);
}

/// Moves the named checkpoint from `from` to `to` if it is still at `from`.
async fn claim(tx: &mut Tx, name: &str, from: i64, to: i64) -> Result<bool, StoreError> {
    // A checkpoint past 0 has its row already.
    if from == 0 {
        ensure_checkpoint(tx, name).await?;
    }
    let sql = "UPDATE checkpoints SET position = $3 WHERE name = $1 AND position = $2".to_string();
    let params = vec![name.into(), from.into(), to.into()];
    if let Tx::Gathered { guard, .. } = tx {
        // Decided at commit, where it guards the batch's writes.
        *guard = Some((sql, params));
        return Ok(true);
    }
    Ok(tx.run(sql, params).await? == 1)
}

async fn apply(
    tx: &mut Tx,
    op: &ReadOp,
    target: Target,
    stats: &mut Stats,
    starts: &StageStarts,
    pending: &OrderChanges,
) -> Result<(), StoreError> {
    match op {
        // Gathered by `apply_entries` into `OrderChanges`.
        ReadOp::InsertOrder { .. } | ReadOp::SetStatus { .. } | ReadOp::StockReplied { .. } => {}
        ReadOp::ProductPrice { product_id, price } => {
            tx.run(
                target.sql(
                    "INSERT INTO product_views (product_id, price, available, reserved) \
                     VALUES ($1, $2, 0, 0) \
                     ON CONFLICT (product_id) DO UPDATE SET price = excluded.price",
                ),
                vec![product_id.as_str().into(), price.to_string().into()],
            )
            .await?;
        }
        // Batched by `apply_entries`.
        ReadOp::History { .. } | ReadOp::ProductStock { .. } => {}
        ReadOp::Count { metric } => count(stats, metric, None),
        ReadOp::StageDone {
            order_id,
            stage,
            from,
            at_ms,
        } => {
            let started = match starts
                .recall(target, order_id, *from)
                .or_else(|| pending.start(order_id, *from))
            {
                Some(started) => Some(started),
                None => {
                    let sql = format!(
                        "SELECT {} FROM order_views WHERE order_id = $1",
                        start_column(*from)
                    );
                    tx.read_i64(&target.sql(&sql), vec![order_id.as_str().into()])
                        .await?
                        .flatten()
                }
            };
            if let Some(started) = started {
                let metric = order_saga_projections::stage_metric(*stage);
                count(stats, &metric, Some((at_ms - started).max(0)));
            }
        }
    }
    Ok(())
}

/// Adds a batch's statistics: one statement for all its metrics.
async fn add_stats(tx: &mut Tx, target: Target, stats: &Stats) -> Result<(), StoreError> {
    if stats.is_empty() {
        return Ok(());
    }
    let sql = target.sql(&format!(
        "INSERT INTO saga_stats (metric, count, total_ms, max_ms) VALUES {} \
         ON CONFLICT (metric) DO UPDATE SET count = saga_stats.count + excluded.count, \
         total_ms = saga_stats.total_ms + excluded.total_ms, \
         max_ms = CASE WHEN excluded.max_ms > saga_stats.max_ms THEN excluded.max_ms ELSE saga_stats.max_ms END",
        values_placeholders(stats.len(), 4, 0)
    ));
    let mut params = Vec::with_capacity(stats.len() * 4);
    for (metric, (n, total_ms, max_ms)) in stats {
        params.extend([
            metric.as_str().into(),
            (*n).into(),
            (*total_ms).into(),
            (*max_ms).into(),
        ]);
    }
    tx.run(sql, params).await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct OrderRow {
    order_id: String,
    created_position: i64,
    user_id: String,
    store_id: String,
    status: String,
    items: String,
    total_amount: String,
    cancel_reason: Option<String>,
    created_at_ms: i64,
    stock_replied_at_ms: Option<i64>,
    confirmed_at_ms: Option<i64>,
    payment_wait_at_ms: Option<i64>,
    cancelled_at_ms: Option<i64>,
    version: i64,
}

impl OrderRow {
    fn into_record(self) -> Result<OrderRecord, StoreError> {
        let bad =
            |what: &str| StoreError::CorruptRow(format!("order view {}: {what}", self.order_id));
        let status = match self.status.as_str() {
            "ORDER_CREATED" => OrderStatus::OrderCreated,
            "ORDER_CONFIRMED" => OrderStatus::OrderConfirmed,
            "PAYMENT_WAIT" => OrderStatus::PaymentWait,
            "ORDER_CANCELLED" => OrderStatus::OrderCancelled,
            _ => return Err(bad("unknown status")),
        };
        Ok(OrderRecord {
            status,
            items: serde_json::from_str(&self.items).map_err(|e| bad(&e.to_string()))?,
            total_amount: self.total_amount.parse().map_err(|_| bad("total"))?,
            cancel_reason: self
                .cancel_reason
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(|_| bad("cancel reason"))?,
            created_position: self.created_position,
            user_id: self.user_id,
            store_id: self.store_id,
            created_at_ms: self.created_at_ms,
            stock_replied_at_ms: self.stock_replied_at_ms,
            confirmed_at_ms: self.confirmed_at_ms,
            payment_wait_at_ms: self.payment_wait_at_ms,
            cancelled_at_ms: self.cancelled_at_ms,
            version: self.version,
            order_id: self.order_id,
        })
    }
}
